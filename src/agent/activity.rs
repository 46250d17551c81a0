//! What the shipper has seen of each daemon, shared with the metrics sampler and stall
//! detector (which read it) and the self-monitoring (which reports it).
//!
//! Plain data behind a mutex; writers hold the lock only to copy a few fields.

use crate::model::Level;
use chrono::{DateTime, Utc};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use uuid::Uuid;

/// The latest known state of one daemon's log output.
#[derive(Debug, Clone, Default)]
pub struct DaemonActivity {
    /// Records read from this daemon's files since the agent started.
    pub records_read: u64,
    /// When the agent last read a record of this daemon (wall clock of the read).
    pub last_read_at: Option<DateTime<Utc>>,
    /// The last record's own time, level, message, stage and node.
    pub last_record_ts: Option<DateTime<Utc>>,
    pub last_level: Option<Level>,
    pub last_message: Option<String>,
    pub last_stage: Option<String>,
    pub last_node_id: Option<String>,
    /// The most recent experiment seen in this daemon's records (for metrics rows).
    pub last_experiment_id: Option<Uuid>,
    /// The last progress node that was updated while `running`, its percent and items, and
    /// when its percent or items last changed.
    pub progress: Option<ProgressActivity>,
    /// Its last few lines (level, message, a traceback's last line), newest last, for the
    /// `daemon_exited` event: at most [`RECENT_LINES`] of at most [`RECENT_LINE_CHARS`].
    pub recent_lines: VecDeque<String>,
}

/// How many recent lines are kept per daemon.
pub const RECENT_LINES: usize = 20;
/// How long a kept line may be, in characters.
pub const RECENT_LINE_CHARS: usize = 300;

impl DaemonActivity {
    /// Remembers one line the daemon wrote, forgetting the oldest beyond [`RECENT_LINES`].
    pub fn remember_line(&mut self, level: &str, message: &str, traceback: Option<&str>) {
        let mut line = format!("{level} {message}");
        if let Some(last) = traceback.and_then(|t| t.lines().rev().find(|l| !l.trim().is_empty())) {
            line.push_str(" | ");
            line.push_str(last.trim());
        }
        if line.chars().count() > RECENT_LINE_CHARS {
            line = line.chars().take(RECENT_LINE_CHARS).collect();
            line.push('…');
        }
        if self.recent_lines.len() >= RECENT_LINES {
            self.recent_lines.pop_front();
        }
        self.recent_lines.push_back(line);
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProgressActivity {
    pub experiment_id: Option<Uuid>,
    pub node_id: String,
    pub status: Option<String>,
    pub percent: Option<f64>,
    pub items_done: Option<i64>,
    /// Wall-clock time of the last change of percent or items.
    pub advanced_at: DateTime<Utc>,
}

/// Per file, for lag reporting.
#[derive(Debug, Clone, Default)]
pub struct FileActivity {
    pub daemon: String,
    /// Bytes between the committed position and the file's size at the last check.
    pub lag_bytes: u64,
    /// The file's size at the last check (set by its reader).
    pub size: u64,
    /// The last committed position (set by the sink).
    pub committed: u64,
    pub last_commit_at: Option<DateTime<Utc>>,
}

/// Counters for the agent itself.
#[derive(Debug, Clone, Default)]
pub struct AgentCounters {
    pub records_shipped: u64,
    pub records_quarantined: u64,
    pub reconnects: u64,
    pub batches_committed: u64,
    pub last_commit_at: Option<DateTime<Utc>>,
    /// Why the database cannot be used right now (unreachable, login refused), for systemd's
    /// `STATUS=`; `None` while it works.
    pub db_problem: Option<String>,
    /// Set while the sink holds a batch it has not committed yet: when it received it.
    pub committing_since: Option<DateTime<Utc>>,
    /// Rows in that batch.
    pub committing_rows: usize,
    /// Readers that failed, by daemon (absent: never failed).
    pub readers: HashMap<String, ReaderHealth>,
    /// Set while shipping is stuck (see [`Stuck`]).
    pub stuck: Option<Stuck>,
}

/// A reader thread that failed (panicked, ended on its own or could not be started).
#[derive(Debug, Clone, Default)]
pub struct ReaderHealth {
    /// Failures since the agent started.
    pub failures: u64,
    /// Times a new reader was started after a failure.
    pub restarts: u64,
    /// The last failure: the panic message or why the thread ended.
    pub last_error: Option<String>,
    pub last_failed_at: Option<DateTime<Utc>>,
    /// From a failure until the new reader runs.
    pub down: bool,
}

/// Shipping is stuck: no commit for longer than `[agent] stuck_after` while a batch waits.
#[derive(Debug, Clone)]
pub struct Stuck {
    /// When the batch that cannot be committed reached the sink.
    pub since: DateTime<Utc>,
    /// One line: how long, and the sink's last error when it said one.
    pub reason: String,
}

/// Everything the agent's tasks share about activity.
#[derive(Debug, Default)]
pub struct Activity {
    pub daemons: HashMap<String, DaemonActivity>,
    pub files: HashMap<String, FileActivity>,
    pub agent: AgentCounters,
    /// Log files and directories that cannot be read, with the error (retried meanwhile).
    pub unreadable: std::collections::BTreeMap<String, String>,
}

/// The shared handle.
pub type SharedActivity = Arc<Mutex<Activity>>;

/// A new, empty shared activity.
pub fn shared() -> SharedActivity {
    Arc::new(Mutex::new(Activity::default()))
}
