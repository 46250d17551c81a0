//! The agent's own logging: a `tracing` subscriber writing to stderr, systemd notifications
//! (`sd_notify`, the watchdog interval), panics turned into log lines, and the sink's last
//! complaint kept for the stuck report.
//!
//! `RUST_LOG` (or `PIPEWATCH_LOG`) overrides the default filter. Logging never fails the
//! caller and never blocks it for long: a closed, full or broken stderr loses lines, never the
//! shutdown (a closed pipe used to panic the signal task, and SIGTERM went unheard). Colour
//! only on a terminal, never with `NO_COLOR`.

use chrono::{DateTime, Utc};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Test-only: `PIPEWATCH_TEST_PANIC_READER=DAEMON[@N]` makes the reader thread of `DAEMON`
/// panic once, at its `N`th log line of level INFO or above (default 1) — a real panic at a
/// real point of the reader's loop, to test supervision end to end. Read once at start;
/// unset (always, in production) it installs nothing.
pub const TEST_PANIC_READER_ENV: &str = "PIPEWATCH_TEST_PANIC_READER";

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
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(LossyStderr)
        // tracing-subscriber reports its own write errors with eprintln!, which panics on a
        // closed stderr.
        .log_internal_errors(false)
        .with_ansi(crate::cli::out::color_stderr())
        .with_target(false)
        .with_filter(filter);
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(SinkProblems.with_filter(LevelFilter::WARN))
        .with(TestPanic::from_env())
        .try_init();
    log_panics();
}

/// The sink's last warning or error: when, and the message with its `error` field.
static LAST_SINK_PROBLEM: Mutex<Option<(DateTime<Utc>, String)>> = Mutex::new(None);

/// The sink's last warning or error (e.g. "commit failed; retrying the same batch: 42501
/// permission denied for table pipeline_logs"), for the stuck report.
pub fn last_sink_problem() -> Option<(DateTime<Utc>, String)> {
    LAST_SINK_PROBLEM.lock().ok().and_then(|p| p.clone())
}

/// Keeps the last WARN/ERROR event of the sink module.
struct SinkProblems;

impl<S: tracing::Subscriber> Layer<S> for SinkProblems {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        if !event
            .metadata()
            .target()
            .starts_with("pipewatch::agent::sink")
        {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        let text = match fields.error {
            Some(error) => format!("{}: {error}", fields.message),
            None => fields.message,
        };
        if let Ok(mut last) = LAST_SINK_PROBLEM.lock() {
            *last = Some((Utc::now(), text));
        }
    }
}

/// The `message` and `error` fields of an event.
#[derive(Default)]
struct Fields {
    message: String,
    error: Option<String>,
}

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "error" => self.error = Some(format!("{value:?}")),
            _ => {}
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_string(),
            "error" => self.error = Some(value.to_string()),
            _ => {}
        }
    }
}

/// See [`TEST_PANIC_READER_ENV`].
struct TestPanic {
    thread: String,
    at: u64,
    seen: AtomicU64,
    fired: AtomicBool,
}

impl TestPanic {
    fn from_env() -> Option<TestPanic> {
        let value = std::env::var(TEST_PANIC_READER_ENV).ok()?;
        let (daemon, at) = match value.split_once('@') {
            Some((d, n)) => (d.to_string(), n.parse().unwrap_or(1)),
            None => (value, 1),
        };
        Some(TestPanic {
            thread: format!("read-{daemon}"),
            at,
            seen: AtomicU64::new(0),
            fired: AtomicBool::new(false),
        })
    }
}

impl<S: tracing::Subscriber> Layer<S> for TestPanic {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        use tracing::Level;
        let level = *event.metadata().level();
        if !matches!(level, Level::ERROR | Level::WARN | Level::INFO)
            || std::thread::current().name() != Some(self.thread.as_str())
        {
            return;
        }
        let n = self.seen.fetch_add(1, Ordering::SeqCst) + 1;
        if n >= self.at && !self.fired.swap(true, Ordering::SeqCst) {
            panic!(
                "test panic ({TEST_PANIC_READER_ENV}) in thread {}",
                self.thread
            );
        }
    }
}

/// Panics become one ERROR log line (thread, place, message) instead of a bare message and
/// backtrace on stderr; supervision restarts a reader that panicked.
fn log_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let thread = std::thread::current().name().unwrap_or("?").to_string();
            let location = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let message = panic_message(info.payload());
            tracing::error!(%thread, %location, error = %message, "panicked");
        }));
    });
}

/// The text of a panic payload (`panic!` with a literal or a formatted message).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-text payload".to_string()
    }
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
