//! Watching the daemons: finding their processes, sampling them into `pipeline_metrics`
//! rows, and reporting lifecycle and stall events for `pipeline_events`. The agent watches
//! itself the same way (daemon `pipewatch`).
//!
//! [`Watcher::tick`] is synchronous and does blocking `/proc` reads; the caller runs it off
//! the async runtime. This module produces rows only: it never talks to the database and
//! never changes the shared activity (it only reads it).
//!
//! Baselines: [`Watcher::new`] takes a first reading of every daemon, so the first `tick`
//! measures CPU and disk rates over the time since `new`. When that window is shorter than
//! [`sampler::MIN_RATE_WINDOW_SECS`] (as with `run --once`, which ticks right away), the rates
//! are `None` and the other figures are still reported.

pub mod lifecycle;
pub mod process;
pub mod prometheus;
pub mod sampler;
pub mod stall;

use crate::agent::activity::{
    Activity, AgentCounters, DaemonActivity, FileActivity, SharedActivity,
};
use crate::config::resolve::{Config, DaemonConfig, DEFAULT_METRICS_INTERVAL};
use crate::model::{EventRow, Level, MetricRow};
use chrono::{DateTime, Utc};
use lifecycle::{Change, Lifecycle, ProcId};
use process::ProcessTable;
use sampler::{Clock, HostCpu, TreeReading};
use serde_json::{json, Map, Value};
use stall::{Observation, StallDetector, Transition};
use std::time::{Duration, Instant};
use sysinfo::System;

/// The daemon name of the agent's own rows and events.
pub const AGENT_DAEMON: &str = "pipewatch";

/// What one tick produced, for the sink.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tick {
    pub metrics: Vec<MetricRow>,
    pub events: Vec<EventRow>,
}

/// One per agent: owns the process table and the per-daemon sampling state.
pub struct Watcher {
    host: String,
    activity: SharedActivity,
    /// sysinfo's process table, refreshed at most once per tick and only for parent links
    /// (and command lines, read once per process, when some daemon uses `process_match`).
    sys: System,
    with_cmd: bool,
    clock: Clock,
    daemons: Vec<DaemonState>,
    agent: AgentState,
}

/// Sampling state of one daemon.
struct DaemonState {
    cfg: DaemonConfig,
    /// When its next sample is due.
    due: Instant,
    /// The previous reading of its process tree (rates are differences to it).
    prev: Option<TreeReading>,
    /// The previous host CPU reading, for daemons sampled at host level.
    prev_host_cpu: Option<HostCpu>,
    /// Records read from its logs at the previous sample.
    prev_records: (Instant, u64),
    lifecycle: Lifecycle,
    stall: StallDetector,
    /// The pid-file problem already logged, so it is logged once per change.
    pid_file_problem: Option<String>,
    /// A `daemon_stalled` event whose diagnosis runs the stack dumper on its own thread (so
    /// a slow dumper never delays other samples); shipped once done.
    pending_stall: Option<std::thread::JoinHandle<EventRow>>,
    /// Its activity as of its last sample (the last lines only with a process to watch),
    /// updated in place (see `copy_activity`).
    seen: DaemonActivity,
}

/// Sampling state of the agent itself.
struct AgentState {
    interval: Duration,
    due: Instant,
    prev: Option<TreeReading>,
    prev_shipped: (Instant, u64),
}

impl Watcher {
    /// Builds the watcher and takes baseline readings (see the module docs).
    pub fn new(host: String, daemons: Vec<DaemonConfig>, activity: SharedActivity) -> Watcher {
        let now = Instant::now();
        let with_cmd = daemons.iter().any(|d| d.process_match.is_some());
        let interval = daemons
            .iter()
            .map(|d| d.metrics_interval)
            .min()
            .unwrap_or(DEFAULT_METRICS_INTERVAL);
        let (records, shipped) = {
            let a = activity.lock().unwrap_or_else(|e| e.into_inner());
            let records: Vec<u64> = daemons
                .iter()
                .map(|d| a.daemons.get(&d.name).map_or(0, |d| d.records_read))
                .collect();
            (records, a.agent.records_shipped)
        };
        let mut w = Watcher {
            host,
            sys: System::new(),
            with_cmd,
            clock: Clock::from_os(),
            daemons: daemons
                .into_iter()
                .zip(records)
                .map(|(cfg, records)| DaemonState {
                    prev_records: (now, records),
                    stall: StallDetector::new(
                        cfg.stall_after,
                        cfg.busy_stall_after,
                        cfg.stall_cpu_percent,
                    ),
                    cfg,
                    due: now,
                    prev: None,
                    prev_host_cpu: None,
                    lifecycle: Lifecycle::new(),
                    pid_file_problem: None,
                    pending_stall: None,
                    seen: DaemonActivity::default(),
                })
                .collect(),
            agent: AgentState {
                interval,
                due: now,
                prev: None,
                prev_shipped: (now, shipped),
            },
            activity,
        };
        let any_discovery = w.daemons.iter().any(|d| has_discovery(&d.cfg));
        let table = w.refresh_table(any_discovery);
        let uptime = sampler::uptime_now();
        for i in 0..w.daemons.len() {
            if has_discovery(&w.daemons[i].cfg) {
                let roots = w.roots(i, &table);
                let pids = table.tree(&roots);
                w.daemons[i].prev = Some(sampler::read_tree(&pids, now, uptime));
            } else {
                w.daemons[i].prev_host_cpu = sampler::read_host_cpu();
            }
        }
        w.agent.prev = Some(sampler::read_tree(&[std::process::id()], now, uptime));
        w
    }

    /// How long until the next sample is due (zero when one is due now).
    pub fn next_due(&self, now: Instant) -> Duration {
        self.daemons
            .iter()
            .map(|d| d.due)
            .chain(std::iter::once(self.agent.due))
            .min()
            .map_or(Duration::ZERO, |due| due.saturating_duration_since(now))
    }

    /// Samples every daemon due at `now` (and the agent itself when due), and returns the
    /// rows and events to ship. Refreshes the process table once, only when a due daemon
    /// needs it.
    pub fn tick(&mut self, now: Instant) -> Tick {
        let mut tick = Tick::default();
        let due: Vec<usize> = (0..self.daemons.len())
            .filter(|i| self.daemons[*i].due <= now)
            .collect();
        let agent_due = self.agent.due <= now;
        if due.is_empty() && !agent_due {
            return tick;
        }
        let wall = Utc::now();
        let needs_table = due.iter().any(|i| has_discovery(&self.daemons[*i].cfg));
        let table = self.refresh_table(needs_table);
        let uptime = sampler::uptime_now();
        let memory = sampler::read_host_memory();
        // One host CPU reading for every daemon sampled at host level.
        let host_cpu = due
            .iter()
            .any(|i| !has_discovery(&self.daemons[*i].cfg))
            .then(sampler::read_host_cpu)
            .flatten();
        let agent_seen = self.copy_activity(&due, agent_due);
        for i in due {
            let host = HostReadings {
                uptime,
                memory,
                cpu: host_cpu,
            };
            self.sample_daemon(i, &table, now, wall, host, &mut tick);
            let d = &mut self.daemons[i];
            d.due = next_after(d.due, d.cfg.metrics_interval, now);
        }
        if let Some(seen) = agent_seen {
            tick.metrics
                .push(self.sample_agent(now, wall, uptime, memory, seen));
            self.agent.due = next_after(self.agent.due, self.agent.interval, now);
        }
        tick
    }

    /// Brings the due daemons' copies of their activity up to date, and returns what the
    /// agent's own row needs when it is due, all under one short hold of the lock. The copies
    /// are kept from tick to tick and overwritten in place (`clone_from` reuses their
    /// strings), so an idle daemon costs no allocation. Its last lines are copied only for
    /// daemons with a process to watch (exit events carry them), and only when they changed.
    fn copy_activity(&mut self, due: &[usize], agent_due: bool) -> Option<AgentSeen> {
        // A writer that panicked left plain data behind; reading it is still sound.
        let a = self.activity.lock().unwrap_or_else(|e| e.into_inner());
        for &i in due {
            let d = &mut self.daemons[i];
            let Some(now) = a.daemons.get(&d.cfg.name) else {
                continue;
            };
            let seen = &mut d.seen;
            seen.records_read = now.records_read;
            seen.last_read_at = now.last_read_at;
            seen.last_record_ts = now.last_record_ts;
            seen.last_level = now.last_level;
            seen.last_message.clone_from(&now.last_message);
            seen.last_stage.clone_from(&now.last_stage);
            seen.last_node_id.clone_from(&now.last_node_id);
            seen.last_experiment_id = now.last_experiment_id;
            seen.progress.clone_from(&now.progress);
            if has_discovery(&d.cfg) && seen.recent_lines != now.recent_lines {
                seen.recent_lines.clone_from(&now.recent_lines);
            }
        }
        agent_due.then(|| AgentSeen::of(&a))
    }

    /// Refreshes sysinfo's process list when `needed`, and returns it without threads.
    fn refresh_table(&mut self, needed: bool) -> ProcessTable {
        if !needed {
            return ProcessTable::default();
        }
        self.sys
            .refresh_processes_specifics(process::table_refresh_kind(self.with_cmd));
        ProcessTable::from_system(&self.sys)
    }

    /// The daemon's root processes now: the pid-file process when the file names a live
    /// one, else the topmost `process_match` matches.
    fn roots(&mut self, i: usize, table: &ProcessTable) -> Vec<u32> {
        let d = &mut self.daemons[i];
        if let Some(path) = &d.cfg.pid_file {
            match process::read_pid_file(path) {
                Ok(pid) => {
                    d.pid_file_problem = None;
                    if table.contains(pid) {
                        return vec![pid];
                    }
                }
                Err(e) => {
                    let problem = e.to_string();
                    if d.pid_file_problem.as_deref() != Some(problem.as_str()) {
                        tracing::debug!(daemon = %d.cfg.name, path = %path.display(), error = %problem, "No pid from the pid file.");
                        d.pid_file_problem = Some(problem);
                    }
                }
            }
            if d.cfg.process_match.is_none() {
                return Vec::new();
            }
        }
        match &d.cfg.process_match {
            Some(re) => table.matching(re),
            None => Vec::new(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn sample_daemon(
        &mut self,
        i: usize,
        table: &ProcessTable,
        now: Instant,
        wall: DateTime<Utc>,
        readings: HostReadings,
        tick: &mut Tick,
    ) {
        let HostReadings {
            uptime,
            memory,
            cpu: host_cpu,
        } = readings;
        let discovery = has_discovery(&self.daemons[i].cfg);
        let roots = if discovery {
            self.roots(i, table)
        } else {
            Vec::new()
        };
        let clock = self.clock;
        let host = self.host.clone();
        let d = &mut self.daemons[i];
        let act = &d.seen;
        let experiment_id = act.last_experiment_id.or(d.cfg.experiment_id);
        let node_id = act.last_node_id.clone().or_else(|| d.cfg.node_id.clone());
        let mut row = MetricRow {
            ts: Some(wall),
            experiment_id,
            node_id: node_id.clone(),
            host: host.clone(),
            daemon: d.cfg.name.clone(),
            ..MetricRow::default()
        };
        let mut alive = None;
        let mut counters = None;
        if discovery {
            let pids = table.tree(&roots);
            let reading = sampler::read_tree(&pids, now, uptime);
            let usage = sampler::usage(d.prev.as_ref(), &reading, clock);
            let root_ids: Vec<ProcId> = roots
                .iter()
                .filter_map(|p| {
                    reading.pids.get(p).map(|r| ProcId {
                        pid: *p,
                        start_ticks: r.stat.start_ticks,
                    })
                })
                .collect();
            let current_alive = d.lifecycle.current().is_some_and(|c| {
                sampler::read_pid(c.pid).is_some_and(|r| r.stat.start_ticks == c.start_ticks)
            });
            for change in d.lifecycle.observe(&root_ids, current_alive) {
                tick.events
                    .push(lifecycle_event(&host, &d.cfg, act, change, wall));
            }
            let is_alive = !root_ids.is_empty();
            alive = Some(is_alive);
            row.pid = d
                .lifecycle
                .current()
                .and_then(|c| i32::try_from(c.pid).ok());
            row.custom.insert("scope".into(), json!("process"));
            row.custom.insert("alive".into(), json!(is_alive));
            row.custom
                .insert("processes".into(), json!(usage.processes));
            if is_alive {
                row.cpu_percent = usage.cpu_percent.map(round2);
                row.memory_rss_bytes = i64::try_from(usage.rss_bytes).ok();
                row.memory_percent = memory
                    .filter(|m| m.total > 0)
                    .map(|m| round2(usage.rss_bytes as f64 / m.total as f64 * 100.0));
                row.disk_read_bytes_per_sec = usage.read_bytes_per_sec.map(round2);
                row.disk_write_bytes_per_sec = usage.write_bytes_per_sec.map(round2);
                row.custom.insert("threads".into(), json!(usage.threads));
                if let Some(fds) = usage.open_fds {
                    row.custom.insert("open_fds".into(), json!(fds));
                }
                counters = Some(tree_counters(&reading, clock));
            }
            d.prev = Some(reading);
        } else {
            let cpu = host_cpu;
            row.custom.insert("scope".into(), json!("host"));
            if let (Some(a), Some(b)) = (d.prev_host_cpu, cpu) {
                row.cpu_percent = sampler::host_cpu_percent(a, b).map(round2);
            }
            d.prev_host_cpu = cpu.or(d.prev_host_cpu);
            if let Some(m) = memory.filter(|m| m.total > 0) {
                let used = m.total.saturating_sub(m.available);
                row.memory_rss_bytes = i64::try_from(used).ok();
                row.memory_percent = Some(round2(used as f64 / m.total as f64 * 100.0));
            }
        }
        let mut disks = Map::new();
        for path in &d.cfg.disks {
            if let Some(pct) = sampler::disk_used_percent(path) {
                let pct = round2(pct);
                disks.insert(path.display().to_string(), json!(pct));
                row.disk_used_percent = Some(row.disk_used_percent.map_or(pct, |m| m.max(pct)));
            }
        }
        if !disks.is_empty() {
            row.custom.insert("disks".into(), Value::Object(disks));
        }
        let (t0, r0) = d.prev_records;
        let secs = now.saturating_duration_since(t0).as_secs_f64();
        if secs >= sampler::MIN_RATE_WINDOW_SECS {
            row.records_per_sec = Some(round2(act.records_read.saturating_sub(r0) as f64 / secs));
        }
        d.prev_records = (now, act.records_read);
        let obs = Observation {
            now: wall,
            alive,
            cpu_percent: row.cpu_percent,
            last_read_at: act.last_read_at,
            progress: act.progress.clone(),
            counters,
        };
        for t in d.stall.observe(&obs) {
            // The hook: a stall episode opens, so look at what the process is doing.
            match (&t, d.lifecycle.current()) {
                (Transition::DaemonStalled { .. }, Some(cur)) if d.cfg.stack_dump.is_some() => {
                    let (cfg, act2, row2) = (d.cfg.clone(), act.clone(), row.clone());
                    let (host2, pid) = (host.clone(), cur.pid);
                    let cpu = row.cpu_percent;
                    let again = t.clone();
                    let spawned = std::thread::Builder::new()
                        .name("pipewatch-why".into())
                        .spawn(move || {
                            let diagnosis =
                                stall_diagnosis(&cfg, pid, &t, counters, cpu, clock, wall);
                            stall_event(&host2, &cfg, &act2, &row2, t, wall, diagnosis)
                        });
                    // An earlier episode that ended with the process is shipped first.
                    if let Some(h) = d.pending_stall.take() {
                        tick.events.extend(h.join().ok());
                    }
                    match spawned {
                        Ok(h) => d.pending_stall = Some(h),
                        Err(error) => {
                            tracing::warn!(daemon = %d.cfg.name, %error, "Cannot start the stack dump thread; the stall is stored without a diagnosis.");
                            tick.events
                                .push(stall_event(&host, &d.cfg, act, &row, again, wall, None));
                        }
                    }
                }
                (Transition::DaemonStalled { .. }, Some(cur)) => {
                    let diagnosis = stall_diagnosis(
                        &d.cfg,
                        cur.pid,
                        &t,
                        counters,
                        row.cpu_percent,
                        clock,
                        wall,
                    );
                    tick.events
                        .push(stall_event(&host, &d.cfg, act, &row, t, wall, diagnosis));
                }
                _ => {
                    // A recovery follows its stall: ship a pending one first.
                    if let Some(h) = d.pending_stall.take() {
                        tick.events.extend(h.join().ok());
                    }
                    tick.events
                        .push(stall_event(&host, &d.cfg, act, &row, t, wall, None));
                }
            }
        }
        if d.pending_stall.as_ref().is_some_and(|h| h.is_finished()) {
            if let Some(h) = d.pending_stall.take() {
                tick.events.extend(h.join().ok());
            }
        }
        tick.metrics.push(row);
    }

    fn sample_agent(
        &mut self,
        now: Instant,
        wall: DateTime<Utc>,
        uptime: f64,
        memory: Option<sampler::HostMemory>,
        seen: AgentSeen,
    ) -> MetricRow {
        let me = std::process::id();
        let reading = sampler::read_tree(&[me], now, uptime);
        let usage = sampler::usage(self.agent.prev.as_ref(), &reading, self.clock);
        self.agent.prev = Some(reading);
        let c = seen;
        let mut custom = Map::new();
        custom.insert("scope".into(), json!("agent"));
        custom.insert("records_shipped".into(), json!(c.records_shipped));
        custom.insert("records_quarantined".into(), json!(c.records_quarantined));
        custom.insert("reconnects".into(), json!(c.reconnects));
        custom.insert("batches_committed".into(), json!(c.batches_committed));
        custom.insert(
            "last_commit_at".into(),
            json!(c.last_commit_at.map(|t| t.to_rfc3339())),
        );
        custom.insert("threads".into(), json!(usage.threads));
        if let Some(fds) = usage.open_fds {
            custom.insert("open_fds".into(), json!(fds));
        }
        custom.insert("lag_bytes_total".into(), json!(c.lag_total));
        custom.insert("files".into(), Value::Object(c.files));
        let (t0, s0) = self.agent.prev_shipped;
        let secs = now.saturating_duration_since(t0).as_secs_f64();
        let records_per_sec = (secs >= sampler::MIN_RATE_WINDOW_SECS)
            .then(|| round2(c.records_shipped.saturating_sub(s0) as f64 / secs));
        self.agent.prev_shipped = (now, c.records_shipped);
        MetricRow {
            ts: Some(wall),
            experiment_id: None,
            node_id: None,
            host: self.host.clone(),
            daemon: AGENT_DAEMON.to_string(),
            pid: i32::try_from(me).ok(),
            cpu_percent: usage.cpu_percent.map(round2),
            memory_rss_bytes: i64::try_from(usage.rss_bytes).ok(),
            memory_percent: memory
                .filter(|m| m.total > 0)
                .map(|m| round2(usage.rss_bytes as f64 / m.total as f64 * 100.0)),
            disk_read_bytes_per_sec: usage.read_bytes_per_sec.map(round2),
            disk_write_bytes_per_sec: usage.write_bytes_per_sec.map(round2),
            disk_used_percent: None,
            records_per_sec,
            custom,
        }
    }
}

/// What the agent's own row shows of the shared activity, taken under the lock.
struct AgentSeen {
    records_shipped: u64,
    records_quarantined: u64,
    reconnects: u64,
    batches_committed: u64,
    last_commit_at: Option<DateTime<Utc>>,
    lag_total: u64,
    /// Each file by path (sorted): its daemon, lag and last commit.
    files: Map<String, Value>,
}

impl AgentSeen {
    /// Builds the `files` object straight from the shared map (no copy of it first).
    fn of(a: &Activity) -> AgentSeen {
        let c = &a.agent;
        let mut files = Map::new();
        let mut lag_total = 0u64;
        let mut paths: Vec<(&String, &FileActivity)> = a.files.iter().collect();
        paths.sort_unstable_by_key(|(path, _)| *path);
        for (path, f) in paths {
            lag_total = lag_total.saturating_add(f.lag_bytes);
            files.insert(
                path.clone(),
                json!({
                    "daemon": f.daemon,
                    "lag_bytes": f.lag_bytes,
                    "last_commit_at": f.last_commit_at.map(|t| t.to_rfc3339()),
                }),
            );
        }
        AgentSeen {
            records_shipped: c.records_shipped,
            records_quarantined: c.records_quarantined,
            reconnects: c.reconnects,
            batches_committed: c.batches_committed,
            last_commit_at: c.last_commit_at,
            lag_total,
            files,
        }
    }
}

/// What one tick reads of the host, once for every daemon.
#[derive(Clone, Copy)]
struct HostReadings {
    uptime: f64,
    memory: Option<sampler::HostMemory>,
    cpu: Option<HostCpu>,
}

/// Whether the daemon has a way to find its process.
fn has_discovery(cfg: &DaemonConfig) -> bool {
    cfg.pid_file.is_some() || cfg.process_match.is_some()
}

/// The next due time after `due`, keeping the cadence unless ticks fell behind.
fn next_after(due: Instant, interval: Duration, now: Instant) -> Instant {
    let next = due + interval;
    if next > now {
        next
    } else {
        now + interval
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn ts(t: Option<DateTime<Utc>>) -> Value {
    t.map_or(Value::Null, |t| json!(t.to_rfc3339()))
}

/// The cumulative counters of a tree reading, for the stall detector.
fn tree_counters(r: &TreeReading, clock: Clock) -> stall::Counters {
    let mut c = stall::Counters::default();
    for p in r.pids.values() {
        c.cpu_ticks = c.cpu_ticks.saturating_add(p.stat.cpu_ticks);
        c.rss_bytes = c
            .rss_bytes
            .saturating_add(p.stat.rss_pages.saturating_mul(clock.page_size));
        if let Some(io) = p.io {
            c.read_bytes = c.read_bytes.saturating_add(io.read_bytes);
            c.write_bytes = c.write_bytes.saturating_add(io.write_bytes);
        }
    }
    c
}

/// The diagnosis of a daemon whose stall episode just opened (what the silence cost comes
/// from the detector's counters at its last moment of life).
fn stall_diagnosis(
    cfg: &DaemonConfig,
    pid: u32,
    t: &Transition,
    now: Option<stall::Counters>,
    cpu_percent: Option<f64>,
    clock: Clock,
    wall: DateTime<Utc>,
) -> Option<crate::diagnose::Diagnosis> {
    let Transition::DaemonStalled {
        quiet_since,
        busy,
        then,
    } = t
    else {
        return None;
    };
    let delta = |f: fn(&stall::Counters) -> u64| match (then, now) {
        (Some(a), Some(b)) => Some(f(&b).saturating_sub(f(a))),
        _ => None,
    };
    let silence = crate::diagnose::Silence {
        since: Some(*quiet_since),
        secs: (wall - *quiet_since).num_milliseconds() as f64 / 1000.0,
        busy: *busy,
        cpu_seconds: delta(|c| c.cpu_ticks).map(|t| t as f64 / clock.ticks_per_sec),
        read_bytes: delta(|c| c.read_bytes),
        write_bytes: delta(|c| c.write_bytes),
        rss_bytes_then: then.map(|c| c.rss_bytes),
        rss_bytes_now: now.map(|c| c.rss_bytes),
    };
    let d = crate::diagnose::take(
        pid,
        &crate::diagnose::Options {
            // No extra window: the tick just measured the tree's CPU over its interval, and
            // a diagnosis must not delay the other daemons' samples.
            window: Duration::ZERO,
            cpu_percent,
            stack_dump: cfg.stack_dump.clone(),
            silence: Some(silence),
        },
    );
    if let Some(d) = &d {
        tracing::info!(daemon = %cfg.name, pid, kind = d.verdict.kind.as_str(), "{}", d.verdict.verdict);
    }
    d
}

/// An event of a daemon, its context from the activity, else from the config.
#[allow(clippy::too_many_arguments)]
fn daemon_event(
    host: &str,
    cfg: &DaemonConfig,
    act: &DaemonActivity,
    wall: DateTime<Utc>,
    event_type: &str,
    severity: Level,
    message: String,
    details: Value,
) -> EventRow {
    EventRow {
        ts: wall,
        experiment_id: act.last_experiment_id.or(cfg.experiment_id),
        node_id: act.last_node_id.clone().or_else(|| cfg.node_id.clone()),
        event_type: event_type.to_string(),
        severity,
        message: Some(message),
        details,
        host: host.to_string(),
        daemon: cfg.name.clone(),
    }
}

fn lifecycle_event(
    host: &str,
    cfg: &DaemonConfig,
    act: &DaemonActivity,
    change: Change,
    wall: DateTime<Utc>,
) -> EventRow {
    let name = &cfg.name;
    match change {
        Change::Started { pid } => daemon_event(
            host,
            cfg,
            act,
            wall,
            "daemon_started",
            Level::Info,
            format!("daemon {name} is running as pid {pid}"),
            json!({ "pid": pid }),
        ),
        Change::Exited { pid } => {
            let last_lines: Vec<String> = act.recent_lines.iter().cloned().collect();
            let (exit, how) = crate::diagnose::exit::explain(
                pid,
                crate::diagnose::exit::zombie_status(pid),
                &last_lines,
            );
            let how = if how.is_empty() {
                String::new()
            } else {
                format!(": {how}")
            };
            daemon_event(
                host,
                cfg,
                act,
                wall,
                "daemon_exited",
                Level::Warning,
                format!("daemon {name} (pid {pid}) exited{how}"),
                json!({
                    "pid": pid,
                    "last_record_ts": ts(act.last_record_ts),
                    "last_level": act.last_level.map(|l| l.as_str()),
                    "last_message": act.last_message,
                    "exit": exit,
                    "last_lines": last_lines,
                }),
            )
        }
        Change::Restarted { pid, previous_pid } => daemon_event(
            host,
            cfg,
            act,
            wall,
            "daemon_restarted",
            Level::Info,
            format!("daemon {name} restarted as pid {pid} (was {previous_pid})"),
            json!({ "pid": pid, "previous_pid": previous_pid }),
        ),
    }
}

fn stall_event(
    host: &str,
    cfg: &DaemonConfig,
    act: &DaemonActivity,
    row: &MetricRow,
    t: Transition,
    wall: DateTime<Utc>,
    diagnosis: Option<crate::diagnose::Diagnosis>,
) -> EventRow {
    let name = &cfg.name;
    let after = humantime::format_duration(cfg.stall_after).to_string();
    let progress = act.progress.as_ref();
    match t {
        Transition::DaemonStalled {
            quiet_since, busy, ..
        } => {
            let what = if busy {
                format!(
                    "has written nothing for {} while busy",
                    humantime::format_duration(cfg.busy_stall_after)
                )
            } else {
                format!("has written nothing and used almost no CPU for {after}")
            };
            let verdict = diagnosis
                .as_ref()
                .map(|d| format!(": {}", d.verdict.verdict))
                .unwrap_or_default();
            let mut e = daemon_event(
                host,
                cfg,
                act,
                wall,
                "daemon_stalled",
                Level::Warning,
                format!(
                    "daemon {name} {what}{verdict}; last: {}",
                    act.last_message.as_deref().unwrap_or("(no record yet)")
                ),
                json!({
                    "pid": row.pid,
                    "quiet_since": quiet_since.to_rfc3339(),
                    "stall_after_secs": cfg.stall_after.as_secs_f64(),
                    "cpu_percent": row.cpu_percent,
                    "last_record_ts": ts(act.last_record_ts),
                    "last_level": act.last_level.map(|l| l.as_str()),
                    "last_message": act.last_message,
                    "last_stage": act.last_stage,
                    "last_node_id": act.last_node_id,
                    "progress_node_id": progress.map(|p| p.node_id.clone()),
                    "progress_percent": progress.and_then(|p| p.percent),
                    "busy": busy,
                    "busy_stall_after_secs": cfg.busy_stall_after.as_secs_f64(),
                }),
            );
            if let Some(d) = diagnosis {
                e.details["diagnosis"] = d.json;
            }
            e
        }
        Transition::ProgressStalled { node_id, since } => {
            let mut e = daemon_event(
                host,
                cfg,
                act,
                wall,
                "progress_stalled",
                Level::Warning,
                format!(
                    "progress of {node_id} in daemon {name} has not advanced for {after} although it keeps logging"
                ),
                json!({
                    "node_id": node_id,
                    "percent": progress.and_then(|p| p.percent),
                    "items_done": progress.and_then(|p| p.items_done),
                    "advanced_at": since.to_rfc3339(),
                    "stall_after_secs": cfg.stall_after.as_secs_f64(),
                    "last_message": act.last_message,
                }),
            );
            e.node_id = Some(node_id);
            if let Some(exp) = progress.and_then(|p| p.experiment_id) {
                e.experiment_id = Some(exp);
            }
            e
        }
        Transition::Recovered {
            from,
            stalled_since,
        } => daemon_event(
            host,
            cfg,
            act,
            wall,
            "daemon_recovered",
            Level::Info,
            format!("daemon {name} moves again (after {from})"),
            json!({
                "recovered_from": from,
                "stalled_since": stalled_since.to_rfc3339(),
                "stalled_secs": (wall - stalled_since).num_milliseconds() as f64 / 1000.0,
                "pid": row.pid,
            }),
        ),
    }
}

/// The `agent_started` event: version, config file and a summary of each daemon.
pub fn agent_started_event(host: &str, config: &Config) -> EventRow {
    let daemons: Vec<Value> = config
        .daemons
        .iter()
        .map(|d| {
            json!({
                "name": d.name,
                "logs": d.logs,
                "pid_file": d.pid_file.as_ref().map(|p| p.display().to_string()),
                "process_match": d.process_match.as_ref().map(|r| r.as_str().to_string()),
                "metrics_interval": humantime::format_duration(d.metrics_interval).to_string(),
                "stall_after": humantime::format_duration(d.stall_after).to_string(),
                "experiment_id": d.experiment_id.map(|u| u.to_string()),
            })
        })
        .collect();
    EventRow {
        ts: Utc::now(),
        experiment_id: None,
        node_id: None,
        event_type: "agent_started".into(),
        severity: Level::Info,
        message: Some(format!(
            "pipewatch {} started on {host} watching {} daemon(s)",
            env!("CARGO_PKG_VERSION"),
            daemons.len()
        )),
        details: json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "config_file": config.source.display().to_string(),
            "daemons": daemons,
        }),
        host: host.to_string(),
        daemon: AGENT_DAEMON.into(),
    }
}

/// The `agent_stopped` event: why, and the agent's counters.
pub fn agent_stopped_event(host: &str, reason: &str, counters: &AgentCounters) -> EventRow {
    EventRow {
        ts: Utc::now(),
        experiment_id: None,
        node_id: None,
        event_type: "agent_stopped".into(),
        severity: Level::Info,
        message: Some(format!(
            "pipewatch {} stopped on {host}: {reason}",
            env!("CARGO_PKG_VERSION")
        )),
        details: json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "reason": reason,
            "records_shipped": counters.records_shipped,
            "records_quarantined": counters.records_quarantined,
            "reconnects": counters.reconnects,
            "batches_committed": counters.batches_committed,
            "last_commit_at": ts(counters.last_commit_at),
        }),
        host: host.to_string(),
        daemon: AGENT_DAEMON.into(),
    }
}
