//! The agent: discovers log files, tails them, parses and routes records, batches rows and
//! commits them with file positions in one transaction; samples daemon metrics alongside.
//!
//! [`run`] wires the tasks: one reader thread per daemon (`tail`), a notify watcher that only
//! wakes readers, the metrics thread, and the batcher + sink on the async runtime.

pub mod activity;
pub mod batch;
pub mod fingerprint;
pub mod lines;
pub mod metrics;
pub mod parse;
pub mod retry;
pub mod route;
pub mod rules;
pub mod shutdown;
pub mod sink;
pub mod tail;

use crate::config::Config;
use crate::db::DbTarget;
use crate::model::{EventRow, Level};
use batch::{Batch, Batcher, Item};
use chrono::Utc;
use serde_json::json;
use sink::{Sink, SinkError, SinkOptions};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long shutdown may spend committing what was read.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// `run --once` gives up when the database stays unreachable this long.
pub const ONCE_GIVE_UP: Duration = Duration::from_secs(30);
/// Items in flight between readers and the batcher.
const CHANNEL_CAPACITY: usize = 4;

/// The `--once` give-up time; `PIPEWATCH_ONCE_GIVE_UP_SECS` shortens it (for tests).
fn once_give_up() -> Duration {
    std::env::var("PIPEWATCH_ONCE_GIVE_UP_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(ONCE_GIVE_UP)
}

/// What a run did, for the final log line.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub records_shipped: u64,
    pub records_quarantined: u64,
    pub batches: u64,
}

/// Runs the agent until `stop` is cancelled (or, with `once`, until every file is shipped).
pub async fn run(
    config: Config,
    target: DbTarget,
    once: bool,
    stop: CancellationToken,
) -> Result<Summary, SinkError> {
    let activity = activity::shared();
    let host = config.agent.host.clone();
    let names: Vec<String> = config.daemons.iter().map(|d| d.name.clone()).collect();
    let mut sink = Sink::new(
        target,
        host.clone(),
        names.clone(),
        activity.clone(),
        SinkOptions {
            give_up_after: once.then(once_give_up),
            schema_fatal: once,
        },
    );
    sink.connect(Some(&stop)).await?;
    tracing::info!(host = %host, daemons = ?names, once, "agent started");

    let (tx, rx) = mpsc::channel::<Item>(CHANNEL_CAPACITY);
    let mut wakers = Vec::new();
    let mut readers = Vec::new();
    for d in &config.daemons {
        if d.logs.is_empty() {
            continue;
        }
        let checkpoints = sink.load_checkpoints(&d.name).await?;
        let (wake_tx, wake_rx) = std::sync::mpsc::channel();
        wakers.push(wake_tx);
        let setup = tail::ReaderSetup {
            daemon: Arc::new(d.clone()),
            host: host.clone(),
            once,
            max_records: config.batch.max_records,
            max_wait: config.batch.max_wait,
            checkpoints,
            tx: tx.clone(),
            activity: activity.clone(),
            stop: stop.clone(),
            wake: wake_rx,
        };
        let name = d.name.clone();
        match std::thread::Builder::new()
            .name(format!("read-{name}"))
            .spawn(move || tail::Reader::new(setup).run())
        {
            Ok(h) => readers.push(h),
            Err(error) => tracing::error!(daemon = %name, %error, "cannot start reader thread"),
        }
    }
    let _watcher = if once { None } else { watch(&config, wakers) };

    let started = agent_event(
        &host,
        "agent_started",
        Level::Info,
        "pipewatch agent started",
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "daemons": names,
            "once": once,
            "config": config.source.display().to_string(),
        }),
    );
    let _ = tx
        .send(Item::Rows {
            metrics: vec![],
            events: vec![started],
        })
        .await;
    drop(tx);

    let mut batcher = Batcher::new(rx, config.batch.max_records, config.batch.max_wait);
    let mut deadline: Option<tokio::time::Instant> = None;
    let result = loop {
        let next = tokio::select! {
            b = batcher.next() => b,
            _ = stop.cancelled(), if deadline.is_none() => {
                deadline = Some(tokio::time::Instant::now() + DRAIN_DEADLINE);
                continue;
            }
        };
        let Some(batch) = next else { break Ok(()) };
        if let Err(e) = sink.commit(batch, deadline).await {
            break Err(e);
        }
    };
    let summary = {
        let a = activity.lock().map(|a| a.agent.clone()).unwrap_or_default();
        Summary {
            records_shipped: a.records_shipped,
            records_quarantined: a.records_quarantined,
            batches: a.batches_committed,
        }
    };
    if result.is_ok() {
        let reason = if once { "backfill complete" } else { "signal" };
        let stopped = agent_event(
            &host,
            "agent_stopped",
            Level::Info,
            "pipewatch agent stopped",
            json!({
                "version": env!("CARGO_PKG_VERSION"),
                "reason": reason,
                "records_shipped": summary.records_shipped,
                "records_quarantined": summary.records_quarantined,
            }),
        );
        let batch = Batch {
            events: vec![stopped],
            ..Batch::default()
        };
        let d = deadline.unwrap_or_else(|| tokio::time::Instant::now() + DRAIN_DEADLINE);
        if let Err(error) = sink.commit(batch, Some(d)).await {
            tracing::warn!(%error, "could not record agent_stopped");
        }
    }
    if result.is_ok() {
        for h in readers {
            let _ = h.join();
        }
    }
    result.map(|()| summary)
}

fn agent_event(
    host: &str,
    kind: &str,
    severity: Level,
    message: &str,
    details: serde_json::Value,
) -> EventRow {
    EventRow {
        ts: Utc::now(),
        experiment_id: None,
        node_id: None,
        event_type: kind.to_string(),
        severity,
        message: Some(message.to_string()),
        details,
        host: host.to_string(),
        daemon: "pipewatch".to_string(),
    }
}

/// Watches the directories of every glob and wakes all readers on any event (a hint only).
fn watch(
    config: &Config,
    wakers: Vec<std::sync::mpsc::Sender<()>>,
) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let mut watcher = notify::recommended_watcher(move |_res: notify::Result<notify::Event>| {
        for w in &wakers {
            let _ = w.send(());
        }
    })
    .map_err(|error| tracing::warn!(%error, "file notifications unavailable; polling only"))
    .ok()?;
    for d in &config.daemons {
        for pattern in &d.logs {
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
    Some(watcher)
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
