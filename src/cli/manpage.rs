//! The man page, generated from the clap definition of the command line (`clap_mangen`), so
//! that `--help` and `man pipewatch` cannot disagree. The hidden `pipewatch manpage` command
//! prints it; `packaging/pipewatch.1` is its committed output (shipped in the .deb), and a
//! test fails when it is stale.

use super::out::out;
use super::Cli;
use crate::exit::Code;
use clap::CommandFactory;

/// Refreshes the committed page (the test that finds it stale says so).
pub const REFRESH: &str = "cargo run --quiet -- manpage > packaging/pipewatch.1";

/// What `--help` cannot say: exit codes, environment, files.
const EXTRA: &str = r#".SH "EXIT STATUS"
0 success (also when stdout is closed by its reader, as in \fBpipewatch status | head -1\fR);
1 runtime failure (database unreachable, verification failed, an unknown experiment, a log
file the agent may not read); 2 usage or configuration error.
.SH ENVIRONMENT
.TP
\fBPIPEWATCH_CONFIG\fR
The config file, as \fB--config\fR.
.TP
\fBPIPEWATCH_DATABASE_URL\fR
The database URL; \fB--database-url\fR wins over it, and it over \fB[database] url\fR.
.TP
\fBPIPEWATCH_LOG\fR, \fBRUST_LOG\fR
The agent's own log filter, e.g. \fBpipewatch=debug\fR.
.TP
\fBNO_COLOR\fR
Set: no colour anywhere. Without it, colour only on a terminal.
.SH FILES
.TP
\fI/etc/pipewatch/pipewatch.toml\fR
The default config. Commands that need only a database URL skip it, with a note, when the
user may not read it.
.TP
\fI/usr/share/doc/pipewatch/pipewatch.example.toml\fR
Every key, with its default.
"#;

/// The man page for `pipewatch` and each visible subcommand, as roff.
pub fn render() -> anyhow::Result<String> {
    let mut cmd = Cli::command();
    cmd.build();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    let mut text = String::from_utf8(page)?;
    text.push_str(EXTRA);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        // The global options are described once, on the main page.
        let sub = sub
            .clone()
            .mut_args(|a| if a.is_global_set() { a.hide(true) } else { a });
        let bin = sub.get_bin_name().unwrap_or(sub.get_name()).to_string();
        let man = clap_mangen::Man::new(sub);
        let mut part = Vec::new();
        man.render_synopsis_section(&mut part)?;
        man.render_description_section(&mut part)?;
        man.render_options_section(&mut part)?;
        let part = String::from_utf8(part)?
            .replace(".SH SYNOPSIS\n", "")
            .replace(".SH DESCRIPTION\n", ".PP\n")
            .replace(".SH OPTIONS\n", ".SS Options\n");
        text.push_str(&format!(".SH \"{}\"\n", bin.to_uppercase()));
        text.push_str(&part);
    }
    Ok(text)
}

/// `pipewatch manpage`: prints the page.
pub fn execute() -> anyhow::Result<Code> {
    out!("{}", render()?);
    Ok(Code::Success)
}
