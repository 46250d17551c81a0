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
pub mod watch;

use crate::config::Config;
use crate::db::DbTarget;
use batch::{Batch, Batcher, Item, Limits};
use sink::{Sink, SinkError, SinkOptions};
use std::time::Duration;
use supervisor::Supervisor;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long shutdown may spend committing what was read.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// `run --once` gives up when the database stays unreachable this long.
pub const ONCE_GIVE_UP: Duration = Duration::from_secs(30);
/// Items in flight between readers and the batcher. Each is one reader chunk (at most 1000
/// records read from one buffer, so about a read buffer plus one `max_line_bytes` line);
/// behind the channel, bytes are bounded by the batcher's budget (`2 × [batch] max_bytes`).
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
    let mut started = metrics::agent_started_event(&host, &config);
    if let Some(details) = started.details.as_object_mut() {
        // For `pipewatch status`: how long this agent may go without a commit.
        details.insert(
            "stuck_after_secs".into(),
            config.agent.stuck_after.as_secs_f64().into(),
        );
        details.insert(
            "commit_every_secs".into(),
            commit_every(&config).as_secs_f64().into(),
        );
    }
    if tx
        .send(Item::Rows {
            metrics: vec![],
            events: vec![started],
        })
        .await
        .is_err()
    {
        tracing::warn!("cannot record agent_started: the batcher is gone");
    }
    let (mut sup, exits) =
        Supervisor::new(&config, once, tx.clone(), activity.clone(), stop.clone());
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
        exits,
        config.clone(),
        target_for_reload,
        once,
        stop.clone(),
        readers_done,
        reload_tx,
    ));
    let notifier = tokio::spawn(watchdog(
        activity.clone(),
        config.agent.stuck_after,
        stop.clone(),
    ));

    // The batcher fills the next batch while the sink commits the current one; both, and the
    // batch waiting between them, share one byte budget.
    let limits = Limits {
        max_records: config.batch.max_records,
        max_bytes: config.batch.max_bytes,
        max_wait: config.batch.max_wait,
    };
    let mut batcher = Batcher::new(rx, limits, limits.budget());
    let (batch_tx, mut batches) = mpsc::channel::<Batch>(1);
    tokio::spawn(async move {
        while let Some(batch) = batcher.next().await {
            if batch_tx.send(batch).await.is_err() {
                break;
            }
        }
    });
    // The sink itself ends retrying a drain time after the stop signal.
    // It commits in order, streaming a backlog on a second connection (sink.rs).
    let result = sink.ship(&mut batches).await;
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
        match supervisor.await {
            // `--once` with a reader that kept failing: the run failed (what was committed
            // stays; the rest is read again at the next run).
            Ok(Some(failure)) => return Err(SinkError::Schema(failure)),
            Ok(None) => {}
            Err(error) => tracing::error!(%error, "the supervisor task failed"),
        }
    }
    result.map(|()| summary)
}

/// The longest a healthy agent goes without committing: its shortest metrics interval (every
/// sample is a row), or a minute without daemons sampled.
fn commit_every(config: &Config) -> Duration {
    config
        .daemons
        .iter()
        .map(|d| d.metrics_interval)
        .min()
        .unwrap_or(Duration::from_secs(60))
}

/// Owns the readers until the agent stops (with `once`: until every reader is done): applies
/// SIGHUP reloads and restarts readers that fail. Returns why a `--once` run failed, if it did.
#[allow(clippy::too_many_arguments)]
async fn supervise(
    mut sup: Supervisor,
    mut exits: mpsc::UnboundedReceiver<supervisor::ReaderExit>,
    mut config: Config,
    target: DbTarget,
    once: bool,
    stop: CancellationToken,
    readers_done: CancellationToken,
    reload_metrics: std::sync::mpsc::Sender<Vec<crate::config::DaemonConfig>>,
) -> Option<String> {
    let mut hup = if once {
        None
    } else {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(h) => Some(h),
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGHUP; reload disabled");
                None
            }
        }
    };
    loop {
        sup.flush_events().await;
        if once && (sup.is_idle() || sup.gave_up().is_some()) {
            break;
        }
        let got_hup = async {
            match &mut hup {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        let restart_at = sup.next_restart();
        let restart_due = async {
            match restart_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            Some(exit) = exits.recv() => sup.on_exit(exit).await,
            _ = restart_due => sup.restart_due(&target).await,
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
                            if reload_metrics.send(new.daemons.clone()).is_err() {
                                tracing::warn!("the metrics thread is gone; metrics keep the old config");
                            }
                            config = new;
                        }
                        Err(error) => tracing::error!(error = %format!("{error:#}"), "config reload failed"),
                    },
                }
                crate::telemetry::sd_notify("READY=1");
            }
        }
    }
    let gave_up = sup.gave_up().map(str::to_string);
    sup.close();
    sup.join_all().await;
    readers_done.cancel();
    gave_up
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
        let result = sink::apply_retention(&target, seconds, &host).await;
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
    // The rows close their batch at once (see `Item::Rows`): an idle agent's tick arms no
    // `max_wait` timer.
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
        // Asleep until the next sample is due (no wake-up in between): a reload wakes it,
        // and so does the stop, since the supervisor then drops the reload sender.
        let now = std::time::Instant::now();
        let wait = watcher.next_due(now);
        if !wait.is_zero() {
            match reload.recv_timeout(wait) {
                Ok(daemons) => {
                    watcher = metrics::Watcher::new(host.clone(), daemons, activity.clone());
                    continue;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    if stop.is_cancelled() {
                        return;
                    }
                    std::thread::sleep(wait.min(Duration::from_millis(250)));
                }
            }
        }
        if stop.is_cancelled() {
            return;
        }
        let now = std::time::Instant::now();
        if watcher.next_due(now).is_zero() && !send(watcher.tick(now)) {
            return;
        }
    }
}

/// Watches for a stuck agent and keeps systemd informed while the agent runs: `STATUS=` every
/// tick, `WATCHDOG=1` only while shipping is not stuck (so systemd restarts a stuck agent).
/// Without systemd to tell, it wakes only when shipping could have become stuck (see
/// [`next_check`]), not every tick.
async fn watchdog(
    activity: activity::SharedActivity,
    stuck_after: Duration,
    stop: CancellationToken,
) {
    let notify = std::env::var_os("NOTIFY_SOCKET").is_some();
    let every = crate::telemetry::watchdog_interval()
        .unwrap_or(Duration::from_secs(10))
        .min(Duration::from_secs(10))
        .min((stuck_after / 4).max(Duration::from_millis(100)));
    loop {
        let now = chrono::Utc::now();
        let mut wait = every;
        let status = {
            // Plain data: a lock poisoned by a panicking writer still holds readable values.
            let mut a = activity.lock().unwrap_or_else(|e| e.into_inner());
            let was = a.agent.stuck.is_some();
            let problem = crate::telemetry::last_sink_problem();
            a.agent.stuck = stuck(&a.agent, stuck_after, now, problem);
            match (&a.agent.stuck, was) {
                (Some(s), false) => {
                    tracing::error!(reason = %s.reason, "shipping is stuck; no longer petting the systemd watchdog")
                }
                (None, true) => tracing::info!("shipping resumed"),
                _ => {}
            }
            if !notify {
                wait = next_check(&a.agent, stuck_after, every, now);
                None
            } else {
                Some(status_line(&a))
            }
        };
        if let Some(status) = status {
            crate::telemetry::sd_notify(&format!("STATUS={status}"));
            if !status.starts_with("STUCK") {
                crate::telemetry::sd_notify("WATCHDOG=1");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Without systemd, how long the watchdog may sleep: shipping cannot become stuck before the
/// batch now committing has waited `stuck_after` (or, with none, before one that arrives from
/// now on has), so it wakes just then. While stuck it checks every `every` to see shipping
/// resume. (An idle agent wakes once per `stuck_after` instead of every 10 s.)
fn next_check(
    agent: &activity::AgentCounters,
    stuck_after: Duration,
    every: Duration,
    now: chrono::DateTime<chrono::Utc>,
) -> Duration {
    if agent.stuck.is_some() {
        return every;
    }
    // A `since` ahead of `now` (the wall clock stepped back) counts as just arrived.
    let waited = agent
        .committing_since
        .and_then(|since| (now - since).to_std().ok())
        .unwrap_or_default();
    let left = stuck_after.saturating_sub(waited);
    // The wall clock and the timer may disagree by a little: never spin.
    left.max(Duration::from_millis(50))
}

/// Whether shipping is stuck: a batch has waited longer than `stuck_after` for its commit.
/// The reason names the sink's last complaint when it made one while that batch waited.
fn stuck(
    agent: &activity::AgentCounters,
    stuck_after: Duration,
    now: chrono::DateTime<chrono::Utc>,
    sink_problem: Option<(chrono::DateTime<chrono::Utc>, String)>,
) -> Option<activity::Stuck> {
    let since = agent.committing_since?;
    let waited = (now - since).to_std().unwrap_or_default();
    if waited < stuck_after {
        return None;
    }
    let waited = humantime::format_duration(Duration::from_secs(waited.as_secs()));
    let mut reason = format!(
        "no commit for {waited} (stuck_after {}): a batch of {} rows waits",
        humantime::format_duration(stuck_after),
        agent.committing_rows
    );
    if let Some((at, problem)) = sink_problem.filter(|(at, _)| *at >= since) {
        reason.push_str(&format!(
            "; last error {}: {problem}",
            at.format("%H:%M:%S")
        ));
    }
    Some(activity::Stuck { since, reason })
}

/// The one-line state systemd shows: stuck first, then failed readers, then the counters.
fn status_line(a: &activity::Activity) -> String {
    if let Some(s) = &a.agent.stuck {
        return format!("STUCK: {}", s.reason);
    }
    // Why the database cannot be used (login refused, unreachable) comes next.
    if let Some(problem) = &a.agent.db_problem {
        return problem.clone();
    }
    let mut line = format!(
        "files {}, records shipped {}, lag {} bytes, reconnects {}",
        a.files.len(),
        a.agent.records_shipped,
        a.files.values().map(|f| f.lag_bytes).sum::<u64>(),
        a.agent.reconnects
    );
    let mut down: Vec<(&String, &activity::ReaderHealth)> =
        a.agent.readers.iter().filter(|(_, h)| h.down).collect();
    down.sort_by_key(|(name, _)| name.as_str());
    for (name, h) in down {
        line.push_str(&format!(
            "; reader {name} failed ({}), restarting",
            h.last_error.as_deref().unwrap_or("?")
        ));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    #[test]
    fn stuck_only_past_the_limit_and_with_the_sinks_complaint_made_meanwhile() {
        let t0 = Utc.with_ymd_and_hms(2026, 11, 29, 12, 0, 0).unwrap();
        let mut agent = activity::AgentCounters::default();
        let limit = Duration::from_secs(120);
        let at = |s: i64| t0 + chrono::Duration::seconds(s);
        assert!(
            stuck(&agent, limit, at(1000), None).is_none(),
            "nothing waits"
        );
        agent.committing_since = Some(t0);
        agent.committing_rows = 7;
        assert!(stuck(&agent, limit, at(119), None).is_none());
        let old = Some((at(-5), "from before".to_string()));
        let s = stuck(&agent, limit, at(130), old).unwrap();
        assert_eq!(s.since, t0);
        assert_eq!(
            s.reason,
            "no commit for 2m 10s (stuck_after 2m): a batch of 7 rows waits"
        );
        let new = Some((
            at(3),
            "commit failed; retrying the same batch: 42501 permission denied".to_string(),
        ));
        let s = stuck(&agent, limit, at(130), new).unwrap();
        assert!(
            s.reason.ends_with("; last error 12:00:03: commit failed; retrying the same batch: 42501 permission denied"),
            "{}",
            s.reason
        );
    }

    #[test]
    fn without_systemd_the_watchdog_wakes_when_a_batch_could_first_be_stuck() {
        let t0 = Utc.with_ymd_and_hms(2026, 11, 29, 12, 0, 0).unwrap();
        let at = |ms: i64| t0 + chrono::Duration::milliseconds(ms);
        let (limit, every) = (Duration::from_secs(300), Duration::from_secs(10));
        let mut agent = activity::AgentCounters::default();
        // Nothing committing: a batch arriving from now on is stuck at the earliest then.
        assert_eq!(next_check(&agent, limit, every, at(0)), limit);
        // A batch committing for 290.5 s: wake when it has waited the limit, and at that
        // moment the watchdog calls it stuck.
        agent.committing_since = Some(t0);
        let wait = next_check(&agent, limit, every, at(290_500));
        assert_eq!(wait, Duration::from_millis(9_500));
        assert!(stuck(&agent, limit, at(290_500), None).is_none());
        assert!(stuck(&agent, limit, at(290_500 + 9_500), None).is_some());
        // Past the limit (not yet judged) or a wall clock that stepped: never a busy loop.
        assert_eq!(
            next_check(&agent, limit, every, at(400_000)),
            Duration::from_millis(50)
        );
        assert_eq!(next_check(&agent, limit, every, at(-5_000)), limit);
        // Stuck: look again every tick to see shipping resume.
        agent.stuck = stuck(&agent, limit, at(400_000), None);
        assert_eq!(next_check(&agent, limit, every, at(400_000)), every);
    }

    #[test]
    fn the_status_line_says_stuck_first_then_failed_readers() {
        let mut a = activity::Activity::default();
        a.agent.records_shipped = 3;
        assert_eq!(
            status_line(&a),
            "files 0, records shipped 3, lag 0 bytes, reconnects 0"
        );
        a.agent.readers.insert(
            "app".into(),
            activity::ReaderHealth {
                failures: 1,
                last_error: Some("panicked: boom".into()),
                down: true,
                ..Default::default()
            },
        );
        assert_eq!(
            status_line(&a),
            "files 0, records shipped 3, lag 0 bytes, reconnects 0; reader app failed (panicked: boom), restarting"
        );
        a.agent.stuck = Some(activity::Stuck {
            since: Utc::now(),
            reason: "no commit for 5m".into(),
        });
        assert_eq!(status_line(&a), "STUCK: no commit for 5m");
    }
}
