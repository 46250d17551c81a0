//! Owns the per-daemon reader threads and the file notifications (`watch`): starts them, stops them, and on
//! SIGHUP applies a new configuration — daemons added, removed or changed — without losing or
//! repeating a line: a replaced reader is stopped and joined, everything it sent is committed
//! (a barrier through the batcher), and only then is its successor started from the committed
//! positions.
//!
//! Nothing stops silently: a reader thread that panics, ends while the agent is not stopping,
//! or cannot be started is reported (an `agent_error` event, an ERROR line, `activity`) and
//! started again with backoff (1 s doubling to 60 s) the same way: barrier, then positions
//! from the database.

use crate::agent::activity::SharedActivity;
use crate::agent::batch::Item;
use crate::agent::tail::{self, Hint, StoredCheckpoint};
use crate::agent::watch::{Waker, Wakers, Watch};
use crate::config::{Config, DaemonConfig};
use crate::db::DbTarget;
use crate::model::{EventRow, Level};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The first wait before a failed reader is started again; doubled per failure.
pub const RESTART_BACKOFF_MIN: Duration = Duration::from_secs(1);
/// The longest wait before a failed reader is started again. A reader that ran this long
/// before failing starts over from the shortest wait.
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// With `run --once`, a daemon whose reader fails this many times in a row fails the run.
pub const ONCE_MAX_FAILURES: u32 = 4;

/// A running reader.
struct Running {
    /// The daemon's config as text, to notice changes.
    fingerprint: String,
    stop: CancellationToken,
    thread: std::thread::JoinHandle<()>,
    /// Tells this reader's exit apart from a predecessor's.
    id: u64,
    started: Instant,
    /// The config it runs with, to start it again after a failure.
    config: DaemonConfig,
}

/// A reader thread ended: sent by the thread itself as its last act, panic or not.
#[derive(Debug)]
pub struct ReaderExit {
    pub daemon: String,
    id: u64,
    /// The panic message, if it panicked.
    pub panic: Option<String>,
}

/// A failed reader waiting to be started again.
struct Restart {
    daemon: DaemonConfig,
    due: Instant,
}

/// The wait before the `n`th restart in a row (1-based): 1 s, 2 s, 4 s … at most 60 s.
fn restart_delay(n: u32) -> Duration {
    let doubled = RESTART_BACKOFF_MIN.saturating_mul(1u32 << n.saturating_sub(1).min(16));
    doubled.min(RESTART_BACKOFF_MAX)
}

/// Consecutive failures of one daemon's reader.
#[derive(Debug, Clone, Copy, Default)]
struct Failures {
    in_a_row: u32,
}

/// The readers of one agent.
pub struct Supervisor {
    host: String,
    once: bool,
    max_records: usize,
    max_wait: std::time::Duration,
    /// Files open at once, at most, for all readers together.
    max_open_files: usize,
    /// Every daemon in config order with its globs: a file two daemons match is the first's.
    order: Vec<(String, Vec<glob::Pattern>)>,
    tx: mpsc::Sender<Item>,
    activity: SharedActivity,
    /// The agent's stop token; readers get child tokens.
    stop: CancellationToken,
    readers: BTreeMap<String, Running>,
    /// Failed readers and when to start them again.
    restarts: BTreeMap<String, Restart>,
    failures: BTreeMap<String, Failures>,
    next_id: u64,
    exits: mpsc::UnboundedSender<ReaderExit>,
    /// With `run --once`: the daemon that failed too often, and why.
    gave_up: Option<String>,
    /// `agent_error` events not sent yet.
    pending_events: Vec<EventRow>,
    /// Hints go to every reader's waker.
    wakers: Wakers,
    watcher: Option<Arc<Watch>>,
}

fn describe(d: &DaemonConfig) -> String {
    format!("{d:?}")
}

impl Supervisor {
    pub fn new(
        config: &Config,
        once: bool,
        tx: mpsc::Sender<Item>,
        activity: SharedActivity,
        stop: CancellationToken,
    ) -> (Supervisor, mpsc::UnboundedReceiver<ReaderExit>) {
        let (exits, exits_rx) = mpsc::unbounded_channel();
        let wakers: Wakers = Arc::new(Mutex::new(BTreeMap::new()));
        let watcher = if once {
            None
        } else {
            Watch::start(Arc::clone(&wakers))
        };
        let sup = Supervisor {
            host: config.agent.host.clone(),
            once,
            max_records: config.batch.max_records,
            max_wait: config.batch.max_wait,
            max_open_files: open_files_budget(config.agent.max_open_files),
            order: glob_order(config),
            tx,
            activity,
            stop,
            readers: BTreeMap::new(),
            restarts: BTreeMap::new(),
            failures: BTreeMap::new(),
            next_id: 0,
            exits,
            gave_up: None,
            pending_events: Vec::new(),
            wakers,
            watcher,
        };
        (sup, exits_rx)
    }

    /// Starts a reader for `daemon` from `checkpoints`. A thread that cannot be started is a
    /// failure like any other: reported and tried again later.
    pub fn start(&mut self, daemon: &DaemonConfig, checkpoints: Vec<StoredCheckpoint>) {
        if daemon.logs.is_empty() {
            return;
        }
        let (wake_tx, wake_rx) = std::sync::mpsc::channel();
        if let Ok(mut w) = self.wakers.lock() {
            let roots = daemon.logs.iter().map(|g| glob_root(g).0).collect();
            w.insert(daemon.name.clone(), Waker { tx: wake_tx, roots });
        }
        let watched = match &self.watcher {
            Some(watcher) => watch_globs(watcher, &daemon.logs),
            None => false,
        };
        let stop = self.stop.child_token();
        let earlier = self
            .order
            .iter()
            .take_while(|(name, _)| *name != daemon.name)
            .cloned()
            .collect();
        let daemons = self.order.len().max(1);
        let setup = tail::ReaderSetup {
            daemon: Arc::new(daemon.clone()),
            host: self.host.clone(),
            once: self.once,
            max_records: self.max_records,
            max_wait: self.max_wait,
            max_open_files: (self.max_open_files / daemons).max(4),
            earlier,
            checkpoints,
            tx: self.tx.clone(),
            activity: self.activity.clone(),
            stop: stop.clone(),
            wake: wake_rx,
            watched,
            watch: self.watcher.clone(),
        };
        let name = daemon.name.clone();
        self.next_id += 1;
        let id = self.next_id;
        let exits = self.exits.clone();
        let daemon_name = name.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("read-{name}"))
            .spawn(move || {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                    tail::Reader::new(setup).run()
                }));
                let panic = outcome
                    .err()
                    .map(|p| crate::telemetry::panic_message(p.as_ref()));
                // The supervisor may be gone already (the agent is stopping): nothing to tell.
                let _ = exits.send(ReaderExit {
                    daemon: daemon_name,
                    id,
                    panic,
                });
            });
        match spawned {
            Ok(thread) => {
                self.readers.insert(
                    name.clone(),
                    Running {
                        fingerprint: describe(daemon),
                        stop,
                        thread,
                        id,
                        started: Instant::now(),
                        config: daemon.clone(),
                    },
                );
                let mut a = self.activity.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(h) = a.agent.readers.get_mut(&name) {
                    if h.down {
                        h.down = false;
                        h.restarts += 1;
                    }
                }
            }
            Err(error) => {
                let reason = format!("cannot start the reader thread: {error}");
                self.failed(daemon.clone(), reason, Duration::ZERO);
            }
        }
    }

    /// Records a reader failure (log, activity, an `agent_error` event) and schedules its
    /// restart. `ran` is how long the failed reader had run.
    fn failed(&mut self, daemon: DaemonConfig, reason: String, ran: Duration) {
        let name = daemon.name.clone();
        let f = self.failures.entry(name.clone()).or_default();
        if ran >= RESTART_BACKOFF_MAX {
            f.in_a_row = 0;
        }
        f.in_a_row += 1;
        let in_a_row = f.in_a_row;
        let delay = restart_delay(in_a_row);
        let total = {
            // Plain data: a lock poisoned by a panicking writer still holds readable values.
            let mut a = self.activity.lock().unwrap_or_else(|e| e.into_inner());
            let h = a.agent.readers.entry(name.clone()).or_default();
            h.failures += 1;
            h.last_error = Some(reason.clone());
            h.last_failed_at = Some(chrono::Utc::now());
            h.down = true;
            h.failures
        };
        if self.once && in_a_row >= ONCE_MAX_FAILURES {
            tracing::error!(daemon = %name, error = %reason, failures = in_a_row, "reader failed again; giving up");
            self.gave_up = Some(format!(
                "the reader of daemon {name} failed {in_a_row} times in a row, last: {reason}"
            ));
        } else {
            tracing::error!(daemon = %name, error = %reason, failures = in_a_row, retry_in = ?delay, "reader failed; starting it again");
            self.restarts.insert(
                name.clone(),
                Restart {
                    daemon,
                    due: Instant::now() + delay,
                },
            );
        }
        let event = EventRow {
            ts: chrono::Utc::now(),
            experiment_id: None,
            node_id: None,
            event_type: "agent_error".into(),
            severity: Level::Error,
            message: Some(format!("the reader of daemon {name} failed: {reason}")),
            details: serde_json::json!({
                "daemon": name,
                "error": reason,
                "failures": total,
                "failures_in_a_row": in_a_row,
                "restart_in_secs": self.gave_up.is_none().then_some(delay.as_secs_f64()),
            }),
            host: self.host.clone(),
            daemon: name,
        };
        self.pending_events.push(event);
    }

    /// Handles a reader thread's end: a panic, or an end while the agent is not stopping
    /// (outside `--once`), is a failure; a reader that was stopped or replaced is not.
    pub async fn on_exit(&mut self, exit: ReaderExit) {
        let current = self
            .readers
            .get(&exit.daemon)
            .is_some_and(|r| r.id == exit.id);
        if !current {
            return;
        }
        let Some(r) = self.readers.remove(&exit.daemon) else {
            return;
        };
        let expected = exit.panic.is_none() && (self.once || r.stop.is_cancelled());
        let ran = r.started.elapsed();
        let Running { thread, config, .. } = r;
        // The thread has sent its exit as its last act: joining is immediate.
        if let Err(error) = tokio::task::spawn_blocking(move || thread.join()).await {
            tracing::warn!(daemon = %exit.daemon, %error, "cannot join a reader thread");
        }
        if expected {
            self.failures.remove(&exit.daemon);
            return;
        }
        let reason = match exit.panic {
            Some(p) => format!("panicked: {p}"),
            None => "the reader thread ended while the agent was running".to_string(),
        };
        self.failed(config, reason, ran);
        self.flush_events().await;
    }

    /// Sends the failure events noted so far (they go through the batcher like any row).
    pub async fn flush_events(&mut self) {
        let events = std::mem::take(&mut self.pending_events);
        if events.is_empty() {
            return;
        }
        let item = Item::Rows {
            metrics: vec![],
            events,
        };
        tokio::select! {
            _ = self.tx.send(item) => {}
            _ = self.stop.cancelled() => {}
        }
    }

    /// When the next restart is due, if any.
    pub fn next_restart(&self) -> Option<Instant> {
        self.restarts.values().map(|r| r.due).min()
    }

    /// Whether no reader runs or waits to be restarted (`--once` is then done).
    pub fn is_idle(&self) -> bool {
        self.readers.is_empty() && self.restarts.is_empty()
    }

    /// With `--once`: why the run failed (a reader that kept failing).
    pub fn gave_up(&self) -> Option<&str> {
        self.gave_up.as_deref()
    }

    /// Starts the readers whose restart is due, as a reload would: everything their
    /// predecessors sent is committed first (a barrier), then positions come from the
    /// database. When the database does not answer, they are tried again later.
    pub async fn restart_due(&mut self, target: &DbTarget) {
        let now = Instant::now();
        let due: Vec<String> = self
            .restarts
            .iter()
            .filter(|(_, r)| r.due <= now)
            .map(|(n, _)| n.clone())
            .collect();
        if due.is_empty() {
            return;
        }
        if !self.barrier().await {
            return;
        }
        let mut daemons = Vec::new();
        for name in &due {
            if let Some(r) = self.restarts.remove(name) {
                daemons.push(r.daemon);
            }
        }
        match self.start_from_db(&daemons, target).await {
            Ok(()) => {
                for d in &daemons {
                    if self.readers.contains_key(&d.name) {
                        tracing::info!(daemon = %d.name, "reader started again");
                    }
                }
            }
            Err(error) => {
                let reason = format!("cannot load positions: {error:#}");
                tracing::warn!(error = %reason, "cannot start failed readers again yet");
                for d in daemons {
                    let delay = restart_delay(self.failures.get(&d.name).map_or(1, |f| f.in_a_row));
                    self.restarts.insert(
                        d.name.clone(),
                        Restart {
                            daemon: d,
                            due: Instant::now() + delay,
                        },
                    );
                }
            }
        }
        self.flush_events().await;
    }

    /// Waits until everything sent so far is committed; false when the agent stops first.
    async fn barrier(&mut self) -> bool {
        let (btx, brx) = tokio::sync::oneshot::channel();
        tokio::select! {
            sent = self.tx.send(Item::Barrier(btx)) => {
                if sent.is_err() {
                    return false;
                }
            }
            _ = self.stop.cancelled() => return false,
        }
        tokio::select! {
            done = brx => done.is_ok(),
            _ = self.stop.cancelled() => false,
        }
    }

    /// Stops one reader (or forgets its pending restart) and waits for its thread.
    async fn stop_reader(&mut self, name: &str) {
        self.restarts.remove(name);
        if let Some(r) = self.readers.remove(name) {
            r.stop.cancel();
            if let Ok(mut w) = self.wakers.lock() {
                if let Some(waker) = w.remove(name) {
                    let _ = waker.tx.send(Hint::Names);
                }
            }
            if let Err(error) = tokio::task::spawn_blocking(move || r.thread.join()).await {
                tracing::warn!(daemon = %name, %error, "cannot join a reader thread");
            }
        }
    }

    /// Waits until every reader has finished (`run --once`, or after the stop token).
    pub async fn join_all(&mut self) {
        // Idle readers wait for a hint up to 5 s: wake them to see the stop now.
        if let Ok(w) = self.wakers.lock() {
            for waker in w.values() {
                let _ = waker.tx.send(Hint::Names);
            }
        }
        let readers = std::mem::take(&mut self.readers);
        self.restarts.clear();
        for (name, r) in readers {
            if let Err(error) = tokio::task::spawn_blocking(move || r.thread.join()).await {
                tracing::warn!(daemon = %name, %error, "cannot join a reader thread");
            }
        }
        if let Some(w) = self.watcher.take() {
            w.shutdown();
        }
    }

    /// Drops the supervisor's own sender so the batcher ends when the readers do.
    pub fn close(&mut self) {
        let (dead, _) = mpsc::channel(1);
        self.tx = dead;
    }

    /// Applies a new configuration. Changes to `[database]`, `[agent]` or `[batch]` need a restart
    /// and are reported, not applied.
    pub async fn reload(
        &mut self,
        old: &Config,
        new: &Config,
        target: &DbTarget,
    ) -> anyhow::Result<()> {
        if format!("{:?}{:?}{:?}", old.database, old.agent, old.batch)
            != format!("{:?}{:?}{:?}", new.database, new.agent, new.batch)
        {
            tracing::warn!(
                "changes to [database], [agent] or [batch] take effect at the next restart"
            );
        }
        self.order = glob_order(new);
        let wanted: BTreeMap<&str, &DaemonConfig> =
            new.daemons.iter().map(|d| (d.name.as_str(), d)).collect();
        let mut to_start = Vec::new();
        // A reader waiting to be restarted after a failure counts as running: removed, it is
        // forgotten; changed, it starts now with the new config (after the barrier below).
        let mut running: Vec<String> = self.readers.keys().cloned().collect();
        let mut stopped_any = false;
        for (name, r) in std::mem::take(&mut self.restarts) {
            match wanted.get(name.as_str()) {
                Some(d) if describe(d) != describe(&r.daemon) => {
                    stopped_any = true;
                    to_start.push((*d).clone());
                }
                Some(_) => {
                    self.restarts.insert(name.clone(), r);
                }
                None => {
                    tracing::info!(daemon = %name, "daemon removed from the config; not restarting its failed reader")
                }
            }
            running.push(name);
        }
        for name in &running {
            if !self.readers.contains_key(name) {
                continue;
            }
            match wanted.get(name.as_str()) {
                None => {
                    tracing::info!(daemon = %name, "daemon removed from the config; stopping its reader");
                    self.stop_reader(name).await;
                    stopped_any = true;
                }
                Some(d)
                    if self
                        .readers
                        .get(name)
                        .is_some_and(|r| r.fingerprint != describe(d)) =>
                {
                    tracing::info!(daemon = %name, "daemon config changed; restarting its reader");
                    self.stop_reader(name).await;
                    stopped_any = true;
                    to_start.push((*d).clone());
                }
                Some(_) => {}
            }
        }
        for d in &new.daemons {
            if !running.contains(&d.name) {
                tracing::info!(daemon = %d.name, "daemon added to the config");
                to_start.push(d.clone());
            }
        }
        if stopped_any {
            // Everything the stopped readers sent must be committed before positions are read.
            if !self.barrier().await {
                return Ok(());
            }
        }
        if to_start.is_empty() {
            return Ok(());
        }
        // Positions come from the database; retry until it answers (or the agent stops).
        let mut backoff = crate::agent::retry::Backoff::new(
            std::time::Duration::from_millis(200),
            std::time::Duration::from_secs(30),
        );
        let mut pending = to_start;
        while !pending.is_empty() {
            match self.start_from_db(&pending, target).await {
                Ok(()) => pending.clear(),
                Err(error) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %format!("{error:#}"), retry_in = ?delay, "cannot load positions for reloaded daemons");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.stop.cancelled() => return Ok(()),
                    }
                }
            }
        }
        Ok(())
    }

    async fn start_from_db(
        &mut self,
        daemons: &[DaemonConfig],
        target: &DbTarget,
    ) -> anyhow::Result<()> {
        let client = crate::db::connect(target).await?;
        let mut loaded = Vec::new();
        for d in daemons {
            loaded.push(crate::agent::sink::load_checkpoints(&client, &self.host, &d.name).await?);
        }
        for (d, checkpoints) in daemons.iter().zip(loaded) {
            self.start(d, checkpoints);
        }
        Ok(())
    }
}

/// Each daemon's name and compiled globs, in config order.
fn glob_order(config: &Config) -> Vec<(String, Vec<glob::Pattern>)> {
    config
        .daemons
        .iter()
        .map(|d| {
            let globs = d
                .logs
                .iter()
                .filter_map(|g| glob::Pattern::new(g).ok())
                .collect();
            (d.name.clone(), globs)
        })
        .collect()
}

/// `max_open_files`, kept under the process's descriptor limit (with room for sockets).
fn open_files_budget(configured: usize) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        1024
    };
    let usable = usize::try_from(soft)
        .unwrap_or(usize::MAX)
        .saturating_sub(64)
        .max(8);
    if usable < configured {
        tracing::warn!(configured, limit = soft, "max_open_files is above the open-files limit (LimitNOFILE); holding at most {usable} log files open");
    }
    configured.min(usable)
}

/// Watches the directories of `globs` for names; whether every one of them is watched.
fn watch_globs(watcher: &Watch, globs: &[String]) -> bool {
    let mut all = true;
    for pattern in globs {
        let (dir, recursive) = glob_root(pattern);
        all &= watcher.watch_dir(&dir, recursive);
    }
    all
}

/// The deepest directory of a glob without wildcards, and whether wildcards span directories.
fn glob_root(pattern: &str) -> (std::path::PathBuf, bool) {
    let mut root = std::path::PathBuf::from("/");
    let parts: Vec<&str> = pattern.split('/').filter(|p| !p.is_empty()).collect();
    for (i, part) in parts.iter().enumerate() {
        if part.contains(['*', '?', '[']) {
            return (root, i + 1 < parts.len());
        }
        if i + 1 == parts.len() {
            return (root, false);
        }
        root.push(part);
    }
    (root, false)
}

#[cfg(test)]
mod tests {
    use super::{glob_root, restart_delay};
    use std::path::PathBuf;
    use std::time::Duration;

    #[test]
    fn restarts_wait_one_second_doubling_to_a_minute() {
        let secs: Vec<u64> = [1, 2, 3, 6, 7, 8, 40, u32::MAX]
            .iter()
            .map(|&n| restart_delay(n).as_secs())
            .collect();
        assert_eq!(secs, vec![1, 2, 4, 32, 60, 60, 60, 60]);
        assert_eq!(restart_delay(0), Duration::from_secs(1));
    }

    #[test]
    fn a_hint_goes_to_the_readers_whose_directories_it_is_in() {
        let (tx, _rx) = std::sync::mpsc::channel();
        let w = crate::agent::watch::Waker {
            tx,
            roots: vec![
                glob_root("/var/log/geo/*.jsonl").0,
                glob_root("/data/*/logs/*.log").0,
            ],
        };
        assert!(w.concerned(Some(&PathBuf::from("/var/log/geo/a.jsonl"))));
        assert!(w.concerned(Some(&PathBuf::from("/data/x/logs/b.log"))));
        assert!(!w.concerned(Some(&PathBuf::from("/var/log/other/a.jsonl"))));
        assert!(!w.concerned(Some(&PathBuf::from("/var/log/geology/a.jsonl"))));
        assert!(w.concerned(None));
    }

    #[test]
    fn glob_roots() {
        assert_eq!(
            glob_root("/var/log/geo/*.jsonl"),
            (PathBuf::from("/var/log/geo"), false)
        );
        assert_eq!(
            glob_root("/data/*/logs/*.jsonl"),
            (PathBuf::from("/data"), true)
        );
        assert_eq!(
            glob_root("/var/log/app.jsonl"),
            (PathBuf::from("/var/log"), false)
        );
    }
}
