//! The agent's own logging: a `tracing` subscriber writing to stderr.
//!
//! `RUST_LOG` (or `PIPEWATCH_LOG`) overrides the default filter. Logging never fails the
//! caller and never blocks it for long: a closed, full or broken stderr loses lines, never the
//! shutdown (a closed pipe used to panic the signal task, and SIGTERM went unheard). Colour
//! only on a terminal, never with `NO_COLOR`.

use std::io::Write;
use tracing_subscriber::EnvFilter;

/// stderr for the subscriber, dropping whatever cannot be written (EPIPE, ENOSPC…) and never
/// waiting long for a reader that does not read: a line waits at most [`STDERR_PATIENCE_MS`]
/// for room in the pipe, and once one had to be dropped, the next ones are dropped at once until a
/// write goes through again. A stuck `| less` or journal costs log lines, never the agent.
struct LossyStderr;

/// How long (ms) one log line may wait for room on stderr.
const STDERR_PATIENCE_MS: i32 = 50;

/// A line was dropped and none written since: do not wait for stderr.
static STDERR_STUCK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether fd 2 can take bytes now (or within `timeout_ms`): a pipe with room, a file, a
/// terminal. A closed pipe (POLLERR) or a full one is not.
fn stderr_writable(timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: 2,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd, count 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    rc > 0 && pfd.revents & libc::POLLOUT != 0 && pfd.revents & libc::POLLERR == 0
}

impl Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use std::sync::atomic::Ordering;
        let patience = if STDERR_STUCK.load(Ordering::Relaxed) {
            0
        } else {
            STDERR_PATIENCE_MS
        };
        let written = stderr_writable(patience) && std::io::stderr().lock().write_all(buf).is_ok();
        STDERR_STUCK.store(!written, Ordering::Relaxed);
        // Report the whole buffer as written whatever happened: nothing upstream may retry,
        // complain on stderr (which is what failed) or panic.
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LossyStderr {
    type Writer = LossyStderr;

    fn make_writer(&'a self) -> Self::Writer {
        LossyStderr
    }
}

/// Installs the subscriber once; `verbose` raises the default level to debug, `quiet` lowers
/// it to warnings.
pub fn init(verbose: bool, quiet: bool) {
    let default = match (verbose, quiet) {
        (true, _) => "pipewatch=debug",
        (false, true) => "pipewatch=warn",
        (false, false) => "pipewatch=info",
    };
    let filter = std::env::var("PIPEWATCH_LOG")
        .ok()
        .and_then(|s| EnvFilter::try_new(s).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(LossyStderr)
        // tracing-subscriber reports its own write errors with eprintln!, which panics on a
        // closed stderr.
        .log_internal_errors(false)
        .with_ansi(crate::cli::out::color_stderr())
        .with_target(false)
        .try_init();
}

/// Sends a state line to systemd (`READY=1`, `STATUS=…`, `WATCHDOG=1`, `STOPPING=1`) when
/// running under a `Type=notify` unit; does nothing otherwise.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket name.
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), std::path::Path::new(&path))
    };
    if let Err(error) = result {
        tracing::debug!(%error, "sd_notify failed");
    }
}

/// The watchdog interval systemd asked for (half of `WATCHDOG_USEC`), if any.
pub fn watchdog_interval() -> Option<std::time::Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    Some(std::time::Duration::from_micros(usec / 2))
}
