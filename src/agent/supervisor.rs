//! Owns the per-daemon reader threads and the notify watcher: starts them, stops them, and on
//! SIGHUP applies a new configuration — daemons added, removed or changed — without losing or
//! repeating a line: a replaced reader is stopped and joined, everything it sent is committed
//! (a barrier through the batcher), and only then is its successor started from the committed
//! positions.

use crate::agent::activity::SharedActivity;
use crate::agent::batch::Item;
use crate::agent::tail::{self, Hint, StoredCheckpoint};
use crate::config::{Config, DaemonConfig};
use crate::db::DbTarget;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A running reader.
struct Running {
    /// The daemon's config as text, to notice changes.
    fingerprint: String,
    stop: CancellationToken,
    thread: std::thread::JoinHandle<()>,
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
    /// Notify hints go to every reader's waker.
    wakers: Arc<Mutex<BTreeMap<String, std::sync::mpsc::Sender<Hint>>>>,
    watcher: Option<notify::RecommendedWatcher>,
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
    ) -> Supervisor {
        let wakers: Arc<Mutex<BTreeMap<String, std::sync::mpsc::Sender<Hint>>>> =
            Arc::new(Mutex::new(BTreeMap::new()));
        let watcher = if once {
            None
        } else {
            make_watcher(Arc::clone(&wakers))
        };
        Supervisor {
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
            wakers,
            watcher,
        }
    }

    /// Starts a reader for `daemon` from `checkpoints`.
    pub fn start(&mut self, daemon: &DaemonConfig, checkpoints: Vec<StoredCheckpoint>) {
        if daemon.logs.is_empty() {
            return;
        }
        let (wake_tx, wake_rx) = std::sync::mpsc::channel();
        if let Ok(mut w) = self.wakers.lock() {
            w.insert(daemon.name.clone(), wake_tx);
        }
        if let Some(watcher) = &mut self.watcher {
            watch_globs(watcher, &daemon.logs);
        }
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
        };
        let name = daemon.name.clone();
        match std::thread::Builder::new()
            .name(format!("read-{name}"))
            .spawn(move || tail::Reader::new(setup).run())
        {
            Ok(thread) => {
                self.readers.insert(
                    name,
                    Running {
                        fingerprint: describe(daemon),
                        stop,
                        thread,
                    },
                );
            }
            Err(error) => tracing::error!(daemon = %name, %error, "cannot start reader thread"),
        }
    }

    /// Stops one reader and waits for its thread.
    async fn stop_reader(&mut self, name: &str) {
        if let Some(r) = self.readers.remove(name) {
            r.stop.cancel();
            if let Ok(mut w) = self.wakers.lock() {
                if let Some(waker) = w.remove(name) {
                    let _ = waker.send(Hint::Names);
                }
            }
            let _ = tokio::task::spawn_blocking(move || r.thread.join()).await;
        }
    }

    /// Waits until every reader has finished (`run --once`, or after the stop token).
    pub async fn join_all(&mut self) {
        let readers = std::mem::take(&mut self.readers);
        for (_, r) in readers {
            let _ = tokio::task::spawn_blocking(move || r.thread.join()).await;
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
        let running: Vec<String> = self.readers.keys().cloned().collect();
        let mut stopped_any = false;
        for name in &running {
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
            let (btx, brx) = tokio::sync::oneshot::channel();
            if self.tx.send(Item::Barrier(btx)).await.is_ok() {
                let _ = brx.await;
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

/// A watcher that wakes every reader on any event (a hint only), saying whether names
/// changed (a file created, renamed or removed) or only contents.
fn make_watcher(
    wakers: Arc<Mutex<BTreeMap<String, std::sync::mpsc::Sender<Hint>>>>,
) -> Option<notify::RecommendedWatcher> {
    use notify::event::{EventKind, ModifyKind};
    notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let hint = match res.map(|e| e.kind) {
            Ok(EventKind::Modify(ModifyKind::Data(_))) => Hint::Data,
            Ok(EventKind::Access(_)) => return,
            _ => Hint::Names,
        };
        if let Ok(w) = wakers.lock() {
            for waker in w.values() {
                let _ = waker.send(hint);
            }
        }
    })
    .map_err(|error| tracing::warn!(%error, "file notifications unavailable; polling only"))
    .ok()
}

fn watch_globs(watcher: &mut notify::RecommendedWatcher, globs: &[String]) {
    use notify::{RecursiveMode, Watcher};
    for pattern in globs {
        let (dir, recursive) = glob_root(pattern);
        let mode = if recursive {
            RecursiveMode::Recursive
        } else {
            RecursiveMode::NonRecursive
        };
        if let Err(error) = watcher.watch(&dir, mode) {
            tracing::debug!(dir = %dir.display(), %error, "cannot watch directory; polling it");
        }
    }
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
    use super::glob_root;
    use std::path::PathBuf;

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
