//! Where commands print: stdout writes that end a command quietly (exit 0) when the reader
//! went away (`pipewatch status | head -1`), and the one colour decision.
//!
//! Every command prints through `outln!` / `out!` instead of `println!`, which panics on a
//! closed pipe. Nothing here touches stderr except [`note`], which never fails.

use std::fmt;
use std::io::{IsTerminal, Write};

/// stdout was closed by its reader: a normal end for a command, exit 0 without a word.
#[derive(Debug)]
pub struct StdoutClosed;

impl fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("stdout was closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// Turns a failed stdout write into an error: [`StdoutClosed`] for a broken pipe, otherwise
/// the I/O error with context.
pub fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        anyhow::Error::new(StdoutClosed)
    } else {
        anyhow::Error::new(e).context("cannot write to stdout")
    }
}

/// Writes formatted text to stdout (the target of `out!` and `outln!`).
pub fn write_fmt(args: fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args).map_err(stdout_error)
}

/// Flushes stdout (after text without a newline).
pub fn flush() -> anyhow::Result<()> {
    std::io::stdout().flush().map_err(stdout_error)
}

/// Whether an error chain is a closed stdout.
pub fn is_closed(err: &anyhow::Error) -> bool {
    err.chain().any(|c| c.is::<StdoutClosed>())
}

/// `print!` that returns an error (with `?`) instead of panicking when stdout is closed.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::out::write_fmt(format_args!($($arg)*))?
    };
}

/// `println!` that returns an error (with `?`) instead of panicking when stdout is closed.
macro_rules! outln {
    () => {
        $crate::cli::out::write_fmt(format_args!("\n"))?
    };
    ($($arg:tt)*) => {
        $crate::cli::out::write_fmt(format_args!("{}\n", format_args!($($arg)*)))?
    };
}

pub(crate) use out;
pub(crate) use outln;

/// `NO_COLOR` set to anything non-empty turns colour off everywhere (no-color.org).
pub fn no_color() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
}

/// Colour on stdout: only on a terminal, never with `NO_COLOR`.
pub fn color_stdout() -> bool {
    !no_color() && std::io::stdout().is_terminal()
}

/// Colour on stderr (the agent's own log): only on a terminal, never with `NO_COLOR`.
pub fn color_stderr() -> bool {
    !no_color() && std::io::stderr().is_terminal()
}

/// A line on stderr for the user (`pipewatch: …`); a closed or full stderr is ignored.
pub fn note(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "pipewatch: {line}");
}
