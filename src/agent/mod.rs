//! The agent: discovers log files, tails them, parses and routes records, batches rows and
//! commits them with file positions in one transaction; samples daemon metrics alongside.
//!
//! [`run`] wires the tasks: one reader thread per daemon (`tail`), a notify watcher that only
//! wakes readers, the metrics thread, and the batcher + sink on the async runtime.

pub mod activity;
pub mod batch;
pub mod copyrow;
pub mod fingerprint;
pub mod identity;
pub mod lines;
pub mod metrics;
pub mod parse;
pub mod retry;
pub mod route;
pub mod rules;
pub mod shutdown;
pub mod sink;
pub mod supervisor;
pub mod tail;

use crate::config::Config;
use crate::db::DbTarget;
use batch::{Batch, Batcher, Item};
use sink::{Sink, SinkError, SinkOptions};
use std::time::Duration;
use supervisor::Supervisor;
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
    /// Log files and directories that could not be read, with the error.
    pub unreadable: Vec<(String, String)>,
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
    let target_for_reload = target.clone();
    let mut sink = Sink::new(
        target,
        host.clone(),
        names.clone(),
        activity.clone(),
        SinkOptions {
            give_up_after: once.then(once_give_up),
            schema_fatal: once,
            stop: Some(stop.clone()),
            drain: DRAIN_DEADLINE,
        },
    );
    sink.connect(Some(&stop)).await?;
    tracing::info!(host = %host, daemons = ?names, once, "agent started");

    crate::telemetry::sd_notify("READY=1");

    let (tx, rx) = mpsc::channel::<Item>(CHANNEL_CAPACITY);
    // Sent while the channel is still empty: nothing receives until the batcher starts below,
    // so a send after the readers have filled the channel would wait forever.
    let started = metrics::agent_started_event(&host, &config);
    let _ = tx
        .send(Item::Rows {
            metrics: vec![],
            events: vec![started],
        })
        .await;
    let mut sup = Supervisor::new(&config, once, tx.clone(), activity.clone(), stop.clone());
    for d in &config.daemons {
        let checkpoints = sink.load_checkpoints(&d.name).await?;
        sup.start(d, checkpoints);
    }
    // The metrics thread: samples on each daemon's interval; with `once`, one sample after the
    // backfill.
    let readers_done = CancellationToken::new();
    let (reload_tx, reload_rx) = std::sync::mpsc::channel::<Vec<crate::config::DaemonConfig>>();
    let sampler = {
        let (tx, host, daemons, activity, stop, done) = (
            tx.clone(),
            host.clone(),
            config.daemons.clone(),
            activity.clone(),
            stop.clone(),
            readers_done.clone(),
        );
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || sample_loop(tx, host, daemons, activity, once, stop, done, reload_rx))
    };
    if let Err(error) = &sampler {
        tracing::error!(%error, "cannot start the metrics thread; metrics are off");
    }
    if let (Some(listen), false) = (&config.agent.metrics_listen, once) {
        match listen.parse::<std::net::SocketAddr>() {
            Ok(addr) => {
                let (activity, stop) = (activity.clone(), stop.clone());
                tokio::spawn(async move {
                    if let Err(error) = metrics::prometheus::serve(addr, activity, stop).await {
                        tracing::error!(error = %format!("{error:#}"), "Prometheus endpoint stopped");
                    }
                });
            }
            Err(error) => tracing::error!(%listen, %error, "metrics_listen is not an address"),
        }
    }
    if let (Some(retention), false) = (&config.retention, once) {
        tokio::spawn(retain(
            target_for_reload.clone(),
            host.clone(),
            retention.older_than,
            stop.clone(),
        ));
    }
    drop(tx);
    let supervisor = tokio::spawn(supervise(
        sup,
        config.clone(),
        target_for_reload,
        once,
        stop.clone(),
        readers_done,
        reload_tx,
    ));
    let notifier = tokio::spawn(notify_systemd(activity.clone(), stop.clone()));

    // The batcher fills the next batch while the sink commits the current one.
    let mut batcher = Batcher::new(rx, config.batch.max_records, config.batch.max_wait);
    let (batch_tx, mut batches) = mpsc::channel::<Batch>(1);
    tokio::spawn(async move {
        while let Some(batch) = batcher.next().await {
            if batch_tx.send(batch).await.is_err() {
                break;
            }
        }
    });
    // The sink itself ends retrying a drain time after the stop signal.
    let result = loop {
        let Some(batch) = batches.recv().await else {
            break Ok(());
        };
        if let Err(e) = sink.commit(batch, None).await {
            break Err(e);
        }
    };
    let counters = activity.lock().map(|a| a.agent.clone()).unwrap_or_default();
    let summary = Summary {
        records_shipped: counters.records_shipped,
        records_quarantined: counters.records_quarantined,
        batches: counters.batches_committed,
        unreadable: activity
            .lock()
            .map(|a| a.unreadable.clone().into_iter().collect())
            .unwrap_or_default(),
    };
    if result.is_ok() {
        let reason = if once { "backfill complete" } else { "signal" };
        let stopped = metrics::agent_stopped_event(&host, reason, &counters);
        let batch = Batch {
            events: vec![stopped],
            ..Batch::default()
        };
        let d = tokio::time::Instant::now() + DRAIN_DEADLINE;
        if let Err(error) = sink.commit(batch, Some(d)).await {
            tracing::warn!(%error, "could not record agent_stopped");
        }
    }
    crate::telemetry::sd_notify("STOPPING=1");
    notifier.abort();
    if result.is_ok() {
        let _ = supervisor.await;
    }
    result.map(|()| summary)
}

/// Owns the readers until the agent stops; applies SIGHUP reloads meanwhile.
async fn supervise(
    mut sup: Supervisor,
    mut config: Config,
    target: DbTarget,
    once: bool,
    stop: CancellationToken,
    readers_done: CancellationToken,
    reload_metrics: std::sync::mpsc::Sender<Vec<crate::config::DaemonConfig>>,
) {
    if once {
        sup.close();
        sup.join_all().await;
        readers_done.cancel();
        return;
    }
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(h) => Some(h),
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP; reload disabled");
            None
        }
    };
    loop {
        let got_hup = async {
            match &mut hup {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = got_hup => {
                crate::telemetry::sd_notify("RELOADING=1");
                let loaded = crate::config::load(&config.source)
                    .and_then(|c| crate::config::check_shared_files(&c).map(|()| c));
                match loaded {
                    Err(errors) => {
                        for e in &errors.0 {
                            tracing::error!(error = %e, "config reload refused; keeping the running config");
                        }
                    }
                    Ok(new) => match sup.reload(&config, &new, &target).await {
                        Ok(()) => {
                            tracing::info!(daemons = new.daemons.len(), "config reloaded");
                            let _ = reload_metrics.send(new.daemons.clone());
                            config = new;
                        }
                        Err(error) => tracing::error!(error = %format!("{error:#}"), "config reload failed"),
                    },
                }
                crate::telemetry::sd_notify("READY=1");
            }
        }
    }
    sup.close();
    sup.join_all().await;
    readers_done.cancel();
}

/// `[retention]`: shortly after start and then hourly, offers to apply the retention; the
/// database lets one agent of the fleet do it once a day (`pipewatch_apply_retention`). The
/// age is exact to the second: `36h` keeps 36 hours, not one day.
async fn retain(target: DbTarget, host: String, older_than: Duration, stop: CancellationToken) {
    let seconds = older_than.as_secs_f64();
    let age = humantime::format_duration(Duration::from_secs(older_than.as_secs())).to_string();
    let mut wait = Duration::from_secs(2);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
        wait = Duration::from_secs(3600);
        let result = async {
            let client = crate::db::connect(&target).await?;
            let row = client
                .query_one(
                    "SELECT pipewatch_apply_retention(make_interval(secs => $1::float8), $2)",
                    &[&seconds, &host],
                )
                .await?;
            anyhow::Ok(row.get::<_, Option<i64>>(0))
        }
        .await;
        match result {
            Ok(Some(rows)) => tracing::info!(rows, older_than = %age, "retention applied"),
            Ok(None) => tracing::debug!("retention already applied today by this or another agent"),
            Err(error) => tracing::warn!(error = %format!("{error:#}"), "cannot apply retention"),
        }
    }
}

/// Samples the daemons until the agent stops; with `once`, one sample when the readers are done.
#[allow(clippy::too_many_arguments)]
fn sample_loop(
    tx: mpsc::Sender<Item>,
    host: String,
    daemons: Vec<crate::config::DaemonConfig>,
    activity: activity::SharedActivity,
    once: bool,
    stop: CancellationToken,
    readers_done: CancellationToken,
    reload: std::sync::mpsc::Receiver<Vec<crate::config::DaemonConfig>>,
) {
    let mut watcher = metrics::Watcher::new(host.clone(), daemons, activity.clone());
    let send = |tick: metrics::Tick| {
        if tick.metrics.is_empty() && tick.events.is_empty() {
            return true;
        }
        tx.blocking_send(Item::Rows {
            metrics: tick.metrics,
            events: tick.events,
        })
        .is_ok()
    };
    if once {
        while !readers_done.is_cancelled() && !stop.is_cancelled() {
            std::thread::sleep(Duration::from_millis(20));
        }
        send(watcher.tick(std::time::Instant::now()));
        return;
    }
    loop {
        let now = std::time::Instant::now();
        let wait = watcher.next_due(now).min(Duration::from_millis(250));
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        if stop.is_cancelled() {
            return;
        }
        if let Ok(daemons) = reload.try_recv() {
            watcher = metrics::Watcher::new(host.clone(), daemons, activity.clone());
        }
        let now = std::time::Instant::now();
        if watcher.next_due(now).is_zero() && !send(watcher.tick(now)) {
            return;
        }
    }
}

/// systemd STATUS and WATCHDOG pings while the agent runs.
async fn notify_systemd(activity: activity::SharedActivity, stop: CancellationToken) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let every = crate::telemetry::watchdog_interval()
        .unwrap_or(Duration::from_secs(10))
        .min(Duration::from_secs(10));
    loop {
        let status = match activity.lock() {
            // Why the database cannot be used (login refused, unreachable) comes first.
            Ok(a) if a.agent.db_problem.is_some() => {
                let problem = a.agent.db_problem.as_deref().unwrap_or_default();
                format!("STATUS={problem}")
            }
            Ok(a) => format!(
                "STATUS=files {}, records shipped {}, lag {} bytes, reconnects {}",
                a.files.len(),
                a.agent.records_shipped,
                a.files.values().map(|f| f.lag_bytes).sum::<u64>(),
                a.agent.reconnects
            ),
            Err(_) => "STATUS=running".to_string(),
        };
        crate::telemetry::sd_notify(&status);
        crate::telemetry::sd_notify("WATCHDOG=1");
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
    }
}
