//! The fleet benchmark (issue 10): N real agent processes into one PostgreSQL.
//!
//! It starts a throwaway PostgreSQL, and for each fleet size N (`--agents 50,100,200`) and
//! each way in (`--modes direct,pooled`) a fresh database and N release `pipewatch run`
//! processes, each with its own `[agent] host`, config, log file and stderr log. One writer
//! thread appends `--rate` lines a second to every agent's file, each line stamped with its
//! write time. It reports per run: rows/s committed, write→commit latency p50/p99 per agent,
//! server connections used (pg_stat_activity), PostgreSQL and agent CPU per 1,000 rows, and
//! exactly-once per agent (exact counts, no duplicate `seq`).
//!
//! On the largest direct fleet it then measures partition maintenance under load (a probe
//! writer's longest commit while tomorrow's partitions are created and old ones dropped, with a
//! slow operator query holding a lock) and a database outage (`pg_ctl stop -m fast`, i.e.
//! SIGINT to the postmaster; start again after `--outage-secs`): connection attempts per second
//! while down and after, counted by a loopback TCP proxy every direct agent connects through,
//! and the time until every agent has caught up.
//!
//! It touches nothing but its own temp dir, its own cluster (and pgbouncer) and the processes
//! it starts (each ended by its PID). Run: `cargo run --release --example fleet`.

mod common;

use anyhow::{anyhow, bail, Context as _};
use chrono::{DateTime, SecondsFormat, Utc};
use clap::Parser;
use pipewatch::db::throwaway::{Pooler, Throwaway};
use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(
    name = "fleet",
    about = "pipewatch fleet benchmark: many agents, one PostgreSQL"
)]
struct Opts {
    /// Fleet sizes, one run each.
    #[arg(long, value_delimiter = ',', default_value = "50,100,200")]
    agents: Vec<usize>,
    /// Ways in: `direct` (through a counting loopback proxy) and/or `pooled` (pgbouncer,
    /// transaction mode).
    #[arg(long, value_delimiter = ',', default_value = "direct,pooled")]
    modes: Vec<String>,
    /// Lines per second written to each agent's file.
    #[arg(long, default_value_t = 20)]
    rate: u64,
    /// Seconds of the measured window of each run.
    #[arg(long, default_value_t = 30)]
    secs: u64,
    /// Seconds PostgreSQL is down in the outage phase (0: no outage).
    #[arg(long, default_value_t = 60)]
    outage_secs: u64,
    /// Run the partition-maintenance phase (0: no).
    #[arg(long, default_value_t = 1)]
    maintenance: u8,
    /// Seconds the slow operator query holds its lock during maintenance.
    #[arg(long, default_value_t = 6)]
    reader_secs: u64,
    /// The longest wait for the fleet to catch up (after a window or the outage).
    #[arg(long, default_value_t = 180)]
    catchup_secs: u64,
    /// pgbouncer's server pool size (pooled mode).
    #[arg(long, default_value_t = 20)]
    pool_size: u32,
    /// Run this agent binary instead of target/release/pipewatch (e.g. an older build, for a
    /// same-machine comparison).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// `[batch] max_wait` of every agent (default: the agent's own default).
    #[arg(long)]
    max_wait: Option<String>,
}

const DAEMON: &str = "worker";

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn max_of(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// utime + stime of a process (fields 14, 15), in seconds; plus its reaped children's when
/// `children` (fields 16, 17).
fn cpu_of(pid: u32, children: bool) -> f64 {
    let Some(f) = stat_fields(pid) else {
        return 0.0;
    };
    // `f` starts at field 3.
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let mut ticks = n(11) + n(12);
    if children {
        ticks += n(13) + n(14);
    }
    ticks / clk_tck()
}

/// CPU seconds of the PostgreSQL server so far: the postmaster, its reaped children (ended
/// backends) and its live children.
fn server_cpu(postmaster: u32) -> f64 {
    let mut total = cpu_of(postmaster, true);
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Some(f) = stat_fields(pid) else { continue };
            if f.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(postmaster) {
                total += cpu_of(pid, false);
            }
        }
    }
    total
}

/// The postmaster's PID, from `postmaster.pid` in the data directory the server reports.
async fn postmaster_pid(url: &str) -> anyhow::Result<u32> {
    let c = common::connect(url).await?;
    let dir: String = c
        .query_one("SELECT current_setting('data_directory')", &[])
        .await?
        .try_get(0)?;
    let text = std::fs::read_to_string(Path::new(&dir).join("postmaster.pid"))
        .with_context(|| format!("read {dir}/postmaster.pid"))?;
    text.lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| anyhow!("no PID in {dir}/postmaster.pid"))
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

/// `pg_ctl stop -m fast` is SIGINT to the postmaster; waits until it is gone.
fn stop_fast(postmaster: u32) -> anyhow::Result<()> {
    // SAFETY: signalling the postmaster of the cluster this process started.
    unsafe { libc::kill(postmaster as libc::pid_t, libc::SIGINT) };
    let by = Instant::now() + Duration::from_secs(60);
    while alive(postmaster) {
        if Instant::now() > by {
            bail!("PostgreSQL did not stop within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn ts_text(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

// ---------------------------------------------------------------------------------------------
// The counting proxy: every direct agent connects through it
// ---------------------------------------------------------------------------------------------

/// Connection attempts seen, and whether each reached the server.
#[derive(Default)]
struct Attempts {
    at: Mutex<Vec<(Instant, bool)>>,
}

async fn start_proxy(upstream: u16) -> anyhow::Result<(u16, Arc<Attempts>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("bind the counting proxy")?;
    let port = listener.local_addr()?.port();
    let attempts = Arc::new(Attempts::default());
    let seen = attempts.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let when = Instant::now();
            let seen = seen.clone();
            tokio::spawn(async move {
                let _ = client.set_nodelay(true);
                match tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await {
                    Ok(mut server) => {
                        let _ = server.set_nodelay(true);
                        if let Ok(mut v) = seen.at.lock() {
                            v.push((when, true));
                        }
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                    // The server is down: close at once, as a refused connection would.
                    Err(_) => {
                        if let Ok(mut v) = seen.at.lock() {
                            v.push((when, false));
                        }
                    }
                }
            });
        }
    });
    Ok((port, attempts))
}

impl Attempts {
    /// Attempts in [from, to): count, per second (mean), the busiest second, the busiest
    /// 100 ms.
    fn between(&self, from: Instant, to: Instant) -> (usize, f64, usize, usize) {
        let v: Vec<Instant> = match self.at.lock() {
            Ok(v) => v
                .iter()
                .filter(|(t, _)| *t >= from && *t < to)
                .map(|(t, _)| *t)
                .collect(),
            Err(_) => Vec::new(),
        };
        let secs = (to - from).as_secs_f64().max(1e-9);
        let bucket = |width: f64| {
            let mut counts: HashMap<u64, usize> = HashMap::new();
            for t in &v {
                *counts
                    .entry(((*t - from).as_secs_f64() / width) as u64)
                    .or_default() += 1;
            }
            counts.values().copied().max().unwrap_or(0)
        };
        (v.len(), v.len() as f64 / secs, bucket(1.0), bucket(0.1))
    }
}

// ---------------------------------------------------------------------------------------------
// The writer: one thread appends to every agent's file
// ---------------------------------------------------------------------------------------------

struct Writer {
    stop: AtomicBool,
    /// Lines written per file.
    lines: Vec<AtomicU64>,
    /// Bytes written per file (the position an agent has caught up to).
    bytes: Vec<AtomicU64>,
}

fn spawn_writer(
    files: Vec<PathBuf>,
    rate: u64,
) -> anyhow::Result<(Arc<Writer>, std::thread::JoinHandle<anyhow::Result<()>>)> {
    let mut handles = Vec::new();
    for p in &files {
        handles.push(
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(p)
                .with_context(|| format!("open {}", p.display()))?,
        );
    }
    let state = Arc::new(Writer {
        stop: AtomicBool::new(false),
        lines: files.iter().map(|_| AtomicU64::new(0)).collect(),
        bytes: files.iter().map(|_| AtomicU64::new(0)).collect(),
    });
    let s = state.clone();
    let n = files.len().max(1);
    let join = std::thread::spawn(move || {
        let start = Instant::now();
        let mut seq = vec![0u64; n];
        let mut bytes = vec![0u64; n];
        let mut buf = String::new();
        while !s.stop.load(Ordering::SeqCst) {
            let el = start.elapsed().as_secs_f64();
            for (i, f) in handles.iter_mut().enumerate() {
                // Files are offset from each other by a fraction of a line interval, as
                // independent daemons would be.
                let due = ((el * rate as f64) + i as f64 / n as f64) as u64;
                if due <= seq[i] {
                    continue;
                }
                buf.clear();
                while seq[i] < due {
                    let now = Utc::now();
                    buf.push_str(&format!(
                        "{{\"timestamp\": \"{}\", \"level\": \"info\", \"event\": \"tile {} of shard s-{} processed in {} ms\", \"logger\": \"geo.worker\", \"seq\": {}, \"stage\": \"clustering\"}}\n",
                        ts_text(now),
                        seq[i],
                        i % 17,
                        (seq[i] * 7919) % 900 + 20,
                        seq[i]
                    ));
                    seq[i] += 1;
                }
                f.write_all(buf.as_bytes())?;
                bytes[i] += buf.len() as u64;
                s.lines[i].store(seq[i], Ordering::SeqCst);
                s.bytes[i].store(bytes[i], Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    });
    Ok((state, join))
}

// ---------------------------------------------------------------------------------------------
// The fleet
// ---------------------------------------------------------------------------------------------

struct Fleet {
    children: Vec<Child>,
    files: Vec<PathBuf>,
    hosts: Vec<String>,
}

impl Fleet {
    fn start(
        bin: &Path,
        dir: &Path,
        n: usize,
        url: &str,
        max_wait: Option<&str>,
    ) -> anyhow::Result<Fleet> {
        let mut fleet = Fleet {
            children: Vec::new(),
            files: Vec::new(),
            hosts: Vec::new(),
        };
        for i in 0..n {
            let host = format!("fleet-{i:03}");
            let adir = dir.join(&host);
            std::fs::create_dir_all(&adir)?;
            let file = adir.join("worker.jsonl");
            std::fs::File::create(&file)?;
            let config = adir.join("pipewatch.toml");
            let batch = max_wait
                .map(|w| format!("[batch]\nmax_wait = \"{w}\"\n\n"))
                .unwrap_or_default();
            std::fs::write(
                &config,
                format!(
                    "[agent]\nhost = \"{host}\"\n\n{batch}[daemons.{DAEMON}]\nlogs = [\"{}/*.jsonl\"]\n",
                    adir.display()
                ),
            )?;
            let stderr = std::fs::File::create(adir.join("agent.log"))?;
            let child = Command::new(bin)
                .arg("--config")
                .arg(&config)
                .args(["--database-url", url, "run"])
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .context("start pipewatch run")?;
            fleet.children.push(child);
            fleet.files.push(file);
            fleet.hosts.push(host);
        }
        Ok(fleet)
    }

    fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    fn cpu(&self) -> f64 {
        self.pids().into_iter().map(|p| cpu_of(p, false)).sum()
    }

    /// SIGTERM to every agent, then waits; returns how many exited 0.
    fn stop(&mut self) -> usize {
        for c in &self.children {
            // SAFETY: signalling children we started and have not reaped.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        }
        let by = Instant::now() + Duration::from_secs(30);
        let mut clean = 0;
        for c in &mut self.children {
            loop {
                match c.try_wait() {
                    Ok(Some(st)) => {
                        if st.success() {
                            clean += 1;
                        }
                        break;
                    }
                    Ok(None) if Instant::now() < by => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
        self.children.clear();
        clean
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits until every agent's `agent_started` is committed.
async fn wait_started(db: &tokio_postgres::Client, n: usize) -> anyhow::Result<f64> {
    let t = Instant::now();
    loop {
        let k: i64 = db
            .query_one(
                "SELECT count(DISTINCT host) FROM pipeline_events WHERE event_type = 'agent_started'",
                &[],
            )
            .await?
            .try_get(0)?;
        if k as usize >= n {
            return Ok(t.elapsed().as_secs_f64());
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("only {k} of {n} agents started within 120 s (see their agent.log)");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Committed positions per host.
async fn positions(db: &tokio_postgres::Client) -> anyhow::Result<HashMap<String, i64>> {
    let rows = db
        .query(
            "SELECT host, max(position)::int8 FROM pipewatch_checkpoints GROUP BY host",
            &[],
        )
        .await?;
    let mut m = HashMap::new();
    for r in rows {
        m.insert(r.try_get::<_, String>(0)?, r.try_get::<_, i64>(1)?);
    }
    Ok(m)
}

/// Waits until every agent's committed position reaches `target` bytes; returns for each
/// host the seconds after `since` when it got there (None: not within the limit).
async fn wait_caught_up(
    url: &str,
    fleet: &Fleet,
    target: &[u64],
    since: Instant,
    limit: Duration,
) -> anyhow::Result<Vec<Option<f64>>> {
    let mut done: Vec<Option<f64>> = vec![None; fleet.hosts.len()];
    let mut db: Option<tokio_postgres::Client> = None;
    while done.iter().any(Option::is_none) && since.elapsed() < limit {
        if db.as_ref().is_none_or(|c| c.is_closed()) {
            db = common::connect(url).await.ok();
        }
        if let Some(c) = &db {
            if let Ok(pos) = positions(c).await {
                let now = since.elapsed().as_secs_f64();
                for (i, h) in fleet.hosts.iter().enumerate() {
                    if done[i].is_none() && pos.get(h).copied().unwrap_or(0) >= target[i] as i64 {
                        done[i] = Some(now);
                    }
                }
            } else {
                db = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(done)
}

/// Server connections (client backends of `dbname`) other than ours, sampled every second
/// until `stop`; returns the largest count.
fn sample_connections(
    url: String,
    dbname: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut most = 0usize;
        let Ok(c) = common::connect(&url).await else {
            return 0;
        };
        while !stop.load(Ordering::SeqCst) {
            if let Ok(row) = c
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
                     AND datname = $1 AND pid <> pg_backend_pid()",
                    &[&dbname],
                )
                .await
            {
                most = most.max(row.get::<_, i64>(0) as usize);
            }
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
        most
    })
}

// ---------------------------------------------------------------------------------------------
// One run
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct RunFigures {
    label: String,
    agents: usize,
    start_secs: f64,
    offered: f64,
    rows_per_sec: f64,
    p50_median: f64,
    p50_max: f64,
    p99_median: f64,
    p99_max: f64,
    max_ms: f64,
    connections: usize,
    pg_cpu_per_k: f64,
    agent_cpu_per_k: f64,
    pg_cpu_pct: f64,
    agent_rss_mib: f64,
    exact: usize,
    written: u64,
    arrived: i64,
    clean_exits: usize,
    maintenance: Option<Maintenance>,
    outage: Option<Outage>,
}

struct Maintenance {
    reader_secs: u64,
    baseline_max_ms: f64,
    naive_drop_max_ms: f64,
    naive_drop_secs: f64,
    ensure_secs: f64,
    /// Partitions created during the slow query, and after it.
    created: (i32, i32),
    cleanup_secs: f64,
    cleanup_max_ms: f64,
    cleanup_output: String,
    agents_max_ms: f64,
    naive_agents_max_ms: f64,
    old_partitions_left: i64,
    old_rows_left: i64,
}

struct Outage {
    down_secs: f64,
    down_attempts: usize,
    down_per_sec: f64,
    down_peak_sec: usize,
    down_peak_100ms: usize,
    after_attempts: usize,
    after_per_sec: f64,
    after_peak_sec: usize,
    after_peak_100ms: usize,
    first_back: f64,
    median_back: f64,
    all_back: f64,
    missing: usize,
    peak_connections: usize,
}

struct Ctx {
    cluster: Throwaway,
    bin: PathBuf,
    dir: PathBuf,
    postmaster: u32,
    proxy_port: u16,
    attempts: Arc<Attempts>,
    counter: usize,
}

impl Ctx {
    async fn fresh_db(&mut self) -> anyhow::Result<(String, String)> {
        self.counter += 1;
        let name = format!("fleet_{}", self.counter);
        let url = common::migrated_db(&self.cluster, &self.bin, &name).await?;
        Ok((name, url))
    }
}

async fn one_run(
    ctx: &mut Ctx,
    opts: &Opts,
    n: usize,
    mode: &str,
    extras: bool,
) -> anyhow::Result<RunFigures> {
    let (name, url) = ctx.fresh_db().await?;
    let db = common::connect(&url).await?;
    if extras && opts.maintenance > 0 {
        prepare_old_partitions(&db).await?;
    }
    let mut bouncer = None;
    let agent_url = match mode {
        "direct" => format!(
            "postgres://postgres@127.0.0.1:{}/{name}?sslmode=disable",
            ctx.proxy_port
        ),
        "pooled" => {
            let b = Pooler::start(ctx.cluster.port, opts.pool_size, &[])?;
            let u = b.url(&name);
            bouncer = Some(b);
            u
        }
        other => bail!("unknown mode {other:?} (direct or pooled)"),
    };
    let rundir = ctx.dir.join(format!("{mode}-{n}"));
    std::fs::create_dir_all(&rundir)?;
    println!("  {mode} {n}: starting {n} agents …");
    let mut fleet = Fleet::start(&ctx.bin, &rundir, n, &agent_url, opts.max_wait.as_deref())?;
    let start_secs = wait_started(&db, n).await?;
    let (writer, join) = spawn_writer(fleet.files.clone(), opts.rate)?;
    // A few seconds to settle, then the window.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampler = sample_connections(url.clone(), name.clone(), stop_sampling.clone());
    let t0 = Utc::now();
    let pg0 = server_cpu(ctx.postmaster);
    let ag0 = fleet.cpu();
    let w0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(opts.secs)).await;
    let t1 = Utc::now();
    let window = w0.elapsed().as_secs_f64();
    let pg1 = server_cpu(ctx.postmaster);
    let ag1 = fleet.cpu();
    let mut rss: Vec<f64> = fleet
        .pids()
        .into_iter()
        .filter_map(|p| common::vm_bytes(p, "VmRSS").ok())
        .map(|b| b as f64 / 1048576.0)
        .collect();
    let agent_rss_mib = median(&mut rss);
    stop_sampling.store(true, Ordering::SeqCst);
    let connections = sampler.await.unwrap_or(0);
    let committed: i64 = db
        .query_one(
            "SELECT count(*) FROM pipeline_logs WHERE daemon = $1 AND ingested_at >= $2 AND ingested_at < $3",
            &[&DAEMON, &t0, &t1],
        )
        .await?
        .try_get(0)?;

    let maintenance = if extras && opts.maintenance > 0 {
        Some(maintenance_phase(ctx, opts, &url).await?)
    } else {
        None
    };
    let outage = if extras && opts.outage_secs > 0 {
        Some(outage_phase(ctx, opts, &url, &fleet, &writer).await?)
    } else {
        None
    };

    writer.stop.store(true, Ordering::SeqCst);
    join.join()
        .map_err(|_| anyhow!("the writer thread panicked"))??;
    let target: Vec<u64> = writer
        .bytes
        .iter()
        .map(|b| b.load(Ordering::SeqCst))
        .collect();
    let caught = wait_caught_up(
        &url,
        &fleet,
        &target,
        Instant::now(),
        Duration::from_secs(opts.catchup_secs),
    )
    .await?;
    let behind = caught.iter().filter(|c| c.is_none()).count();
    if behind > 0 {
        println!(
            "  warning: {behind} agents had not caught up within {} s",
            opts.catchup_secs
        );
    }
    let clean_exits = fleet.stop();
    drop(bouncer);

    // Exactly once, per agent.
    let db = common::connect(&url).await?;
    let rows = db
        .query(
            "SELECT host, count(*), count(DISTINCT (context->>'seq')::int8), \
             min((context->>'seq')::int8), max((context->>'seq')::int8) \
             FROM pipeline_logs WHERE daemon = $1 GROUP BY host",
            &[&DAEMON],
        )
        .await?;
    let mut got: HashMap<String, (i64, i64, i64, i64)> = HashMap::new();
    for r in rows {
        got.insert(
            r.try_get(0)?,
            (r.try_get(1)?, r.try_get(2)?, r.try_get(3)?, r.try_get(4)?),
        );
    }
    let mut exact = 0;
    let mut written = 0u64;
    let mut arrived = 0i64;
    for (i, h) in fleet.hosts.iter().enumerate() {
        let w = writer.lines[i].load(Ordering::SeqCst);
        written += w;
        let (c, d, lo, hi) = got.get(h).copied().unwrap_or((0, 0, -1, -1));
        arrived += c;
        if c == w as i64 && d == c && (w == 0 || (lo == 0 && hi == w as i64 - 1)) {
            exact += 1;
        } else {
            println!("  {h}: written {w}, arrived {c} ({d} distinct, seq {lo}..={hi})");
        }
    }

    // Latency per agent over the lines written in the window.
    let lat = db
        .query(
            "SELECT host, percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), \
             percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), max(ms) FROM ( \
               SELECT host, (extract(epoch FROM ingested_at - ts) * 1000)::float8 AS ms \
               FROM pipeline_logs WHERE daemon = $1 AND ts >= $2 AND ts < $3) s GROUP BY host",
            &[&DAEMON, &t0, &t1],
        )
        .await?;
    let mut p50s = Vec::new();
    let mut p99s = Vec::new();
    let mut maxs = Vec::new();
    for r in lat {
        p50s.push(r.try_get::<_, f64>(1)?);
        p99s.push(r.try_get::<_, f64>(2)?);
        maxs.push(r.try_get::<_, f64>(3)?);
    }
    let k = committed.max(1) as f64 / 1000.0;
    Ok(RunFigures {
        label: mode.to_string(),
        agents: n,
        start_secs,
        offered: (n as u64 * opts.rate) as f64,
        rows_per_sec: committed as f64 / window,
        p50_median: median(&mut p50s.clone()),
        p50_max: max_of(&p50s),
        p99_median: median(&mut p99s.clone()),
        p99_max: max_of(&p99s),
        max_ms: max_of(&maxs),
        connections,
        pg_cpu_per_k: (pg1 - pg0) / k,
        agent_cpu_per_k: (ag1 - ag0) / k,
        pg_cpu_pct: (pg1 - pg0) / window * 100.0,
        agent_rss_mib,
        exact,
        written,
        arrived,
        clean_exits,
        maintenance,
        outage,
    })
}

// ---------------------------------------------------------------------------------------------
// Partition maintenance under load
// ---------------------------------------------------------------------------------------------

/// Old daily partitions (3–9 days ago) with rows in them, for retention to drop.
async fn prepare_old_partitions(db: &tokio_postgres::Client) -> anyhow::Result<()> {
    db.batch_execute(
        "SELECT pipewatch_ensure_partitions(now() - interval '9 days', now() - interval '3 days');
         INSERT INTO pipeline_logs (ts, level, message, host, daemon)
         SELECT now() - interval '3 days 1 hour' - g * interval '3 seconds', 'INFO', 'old line ' || g,
                'old-host', 'old'
           FROM generate_series(1, 150000) g;
         ANALYZE pipeline_logs;",
    )
    .await
    .context("prepare old partitions")
}

/// A probe writer: one row per 20 ms in its own transaction; returns the commit latencies
/// (ms) with their start times.
fn spawn_probe(url: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<(Instant, f64)>> {
    tokio::spawn(async move {
        let mut out = Vec::new();
        let Ok(c) = common::connect(&url).await else {
            return out;
        };
        let Ok(stmt) = c
            .prepare(
                "INSERT INTO pipeline_logs (ts, level, message, host, daemon) \
                 VALUES (now(), 'INFO', 'probe', 'probe', 'probe')",
            )
            .await
        else {
            return out;
        };
        while !stop.load(Ordering::SeqCst) {
            let t = Instant::now();
            if c.execute(&stmt, &[]).await.is_err() {
                break;
            }
            out.push((t, t.elapsed().as_secs_f64() * 1000.0));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        out
    })
}

fn worst(probe: &[(Instant, f64)], from: Instant, to: Instant) -> f64 {
    probe
        .iter()
        .filter(|(t, _)| *t >= from && *t < to)
        .map(|(_, ms)| *ms)
        .fold(0.0, f64::max)
}

/// A slow operator query: holds ACCESS SHARE on pipeline_logs (and its partitions) for
/// `secs` seconds.
fn spawn_reader(url: String, secs: u64) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        let c = common::connect(&url).await?;
        c.batch_execute(&format!(
            "BEGIN; SELECT count(*) FROM pipeline_logs WHERE ts > now() - interval '10 days'; \
             SELECT pg_sleep({secs}); COMMIT"
        ))
        .await?;
        Ok(())
    })
}

async fn maintenance_phase(ctx: &Ctx, opts: &Opts, url: &str) -> anyhow::Result<Maintenance> {
    println!("  maintenance under load …");
    let db = common::connect(url).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let probe = spawn_probe(url.to_string(), stop.clone());
    let m0 = Utc::now();
    let base0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let base1 = Instant::now();

    // Baseline of what maintenance used to do: a plain DROP of the oldest partition while a
    // slow query reads the table.
    let oldest: Option<String> = db
        .query_opt(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'pipeline_logs'::regclass AND c.relname ~ '_p[0-9]{8}$' \
             ORDER BY c.relname LIMIT 1",
            &[],
        )
        .await?
        .map(|r| r.get(0));
    let reader = spawn_reader(url.to_string(), opts.reader_secs);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n0 = Instant::now();
    if let Some(p) = &oldest {
        db.batch_execute(&format!("DROP TABLE {p}")).await?;
    }
    let naive_drop_secs = n0.elapsed().as_secs_f64();
    let _ = reader.await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let n1 = Instant::now();
    let naive_end = Utc::now();

    // Now the real thing: tomorrow's partitions (and the month after) and retention, with
    // the same slow query running.
    let reader = spawn_reader(url.to_string(), opts.reader_secs);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c1 = Instant::now();
    let out = Command::new(&ctx.bin)
        .args(["--database-url", url, "cleanup", "--older-than", "2d"])
        .stdin(Stdio::null())
        .output()
        .context("run pipewatch cleanup")?;
    let cleanup_secs = c1.elapsed().as_secs_f64();
    let cleanup_output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    if !out.status.success() {
        println!("  cleanup failed: {cleanup_output}");
    }
    let c0 = Instant::now();
    let created: i32 = db
        .query_one(
            "SELECT pipewatch_ensure_partitions(now(), now() + interval '30 days')",
            &[],
        )
        .await?
        .try_get(0)?;
    let ensure_secs = c0.elapsed().as_secs_f64();
    let _ = reader.await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Once more without the slow query: the partitions it could not lock go now.
    let out2 = Command::new(&ctx.bin)
        .args(["--database-url", url, "cleanup", "--older-than", "2d"])
        .stdin(Stdio::null())
        .output()
        .context("run pipewatch cleanup")?;
    let created_after: i32 = db
        .query_one(
            "SELECT pipewatch_ensure_partitions(now(), now() + interval '30 days')",
            &[],
        )
        .await?
        .try_get(0)?;
    let c3 = Instant::now();
    let cleanup_output = format!(
        "{cleanup_output} | then: {}",
        String::from_utf8_lossy(&out2.stdout).trim()
    );
    stop.store(true, Ordering::SeqCst);
    let probe = probe.await.unwrap_or_default();
    let m1 = Utc::now();
    let left: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'pipeline_logs'::regclass AND c.relname ~ '_p[0-9]{8}$' \
             AND to_date(right(c.relname, 8), 'YYYYMMDD') < (now() - interval '2 days')::date - 1",
            &[],
        )
        .await?
        .try_get(0)?;
    let old_rows: i64 = db
        .query_one(
            "SELECT count(*) FROM pipeline_logs WHERE daemon = 'old'",
            &[],
        )
        .await?
        .try_get(0)?;
    let agents_max = |from: DateTime<Utc>, to: DateTime<Utc>| {
        let db = &db;
        async move {
            let v: Option<f64> = db
                .query_one(
                    "SELECT max(extract(epoch FROM ingested_at - ts) * 1000)::float8 \
                     FROM pipeline_logs WHERE daemon = $1 AND ts >= $2 AND ts < $3",
                    &[&DAEMON, &from, &to],
                )
                .await?
                .try_get(0)?;
            anyhow::Ok(v.unwrap_or(f64::NAN))
        }
    };
    let naive_agents_max_ms = agents_max(m0, naive_end).await?;
    let agents_max_ms = agents_max(naive_end, m1).await?;
    Ok(Maintenance {
        reader_secs: opts.reader_secs,
        baseline_max_ms: worst(&probe, base0, base1),
        naive_drop_max_ms: worst(&probe, base1, n1),
        naive_drop_secs,
        ensure_secs,
        created: (created, created_after),
        cleanup_secs,
        cleanup_max_ms: worst(&probe, n1, c3),
        cleanup_output,
        agents_max_ms,
        naive_agents_max_ms,
        old_partitions_left: left,
        old_rows_left: old_rows,
    })
}

// ---------------------------------------------------------------------------------------------
// Outage
// ---------------------------------------------------------------------------------------------

async fn outage_phase(
    ctx: &mut Ctx,
    opts: &Opts,
    url: &str,
    fleet: &Fleet,
    writer: &Writer,
) -> anyhow::Result<Outage> {
    println!("  outage: PostgreSQL down for {} s …", opts.outage_secs);
    let down = Instant::now();
    stop_fast(ctx.postmaster)?;
    tokio::time::sleep(Duration::from_secs(opts.outage_secs)).await;
    ctx.cluster.start()?;
    let up = Instant::now();
    ctx.postmaster = postmaster_pid(url).await?;
    let target: Vec<u64> = writer
        .bytes
        .iter()
        .map(|b| b.load(Ordering::SeqCst))
        .collect();
    let dbname = url
        .rsplit('/')
        .next()
        .and_then(|s| s.split('?').next())
        .unwrap_or("")
        .to_string();
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampler = sample_connections(url.to_string(), dbname, stop_sampling.clone());
    let back = wait_caught_up(
        url,
        fleet,
        &target,
        up,
        Duration::from_secs(opts.catchup_secs),
    )
    .await?;
    stop_sampling.store(true, Ordering::SeqCst);
    let peak_connections = sampler.await.unwrap_or(0);
    let (da, dps, dpeak, d100) = ctx.attempts.between(down, up);
    let after_end = up + Duration::from_secs(10);
    let (aa, aps, apeak, a100) = ctx.attempts.between(up, after_end);
    let mut times: Vec<f64> = back.iter().flatten().copied().collect();
    let missing = back.iter().filter(|b| b.is_none()).count();
    Ok(Outage {
        down_secs: (up - down).as_secs_f64(),
        down_attempts: da,
        down_per_sec: dps,
        down_peak_sec: dpeak,
        down_peak_100ms: d100,
        after_attempts: aa,
        after_per_sec: aps,
        after_peak_sec: apeak,
        after_peak_100ms: a100,
        first_back: times.iter().copied().fold(f64::NAN, f64::min),
        median_back: median(&mut times),
        all_back: max_of(&times),
        missing,
        peak_connections,
    })
}

// ---------------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------------

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    let opts = Opts::parse();
    match run(opts).await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("fleet: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run(opts: Opts) -> anyhow::Result<bool> {
    let bin = match &opts.agent_bin {
        Some(b) => b.clone(),
        None => common::pipewatch_binary("fleet")?,
    };
    let tmp = tempfile::Builder::new()
        .prefix("pipewatch-fleet-")
        .tempdir()
        .context("create a temp dir")?;
    let most = opts.agents.iter().copied().max().unwrap_or(0);
    let cluster = Throwaway::start_with(
        &format!(
            "max_connections = {}\nshared_buffers = 128MB\n",
            (most + 50).max(100)
        ),
        |_| {},
    )?;
    let postmaster = postmaster_pid(&cluster.url("postgres")).await?;
    let (proxy_port, attempts) = start_proxy(cluster.port).await?;
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "pipewatch fleet benchmark: {} agents × {} lines/s, {} s windows, modes {:?}, outage {} s, max_wait {}; {} CPUs; binary {}",
        opts.agents
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join("/"),
        opts.rate,
        opts.secs,
        opts.modes,
        opts.outage_secs,
        opts.max_wait.as_deref().unwrap_or("default"),
        cpus,
        bin.display()
    );
    let mut ctx = Ctx {
        cluster,
        bin,
        dir: tmp.path().to_path_buf(),
        postmaster,
        proxy_port,
        attempts,
        counter: 0,
    };
    let mut all = Vec::new();
    for mode in &opts.modes {
        for &n in &opts.agents {
            let extras = mode == "direct" && n == most;
            let f = one_run(&mut ctx, &opts, n, mode, extras).await?;
            print_run(&f);
            all.push(f);
        }
    }
    println!();
    println!(
        "{:<7} {:>6} {:>8} {:>8} {:>13} {:>13} {:>8} {:>6} {:>10} {:>10} {:>11}",
        "mode",
        "agents",
        "offered",
        "rows/s",
        "p50 med/max",
        "p99 med/max",
        "max ms",
        "conns",
        "pg cpu/1k",
        "agt cpu/1k",
        "exact"
    );
    let mut ok = true;
    for f in &all {
        println!(
            "{:<7} {:>6} {:>8.0} {:>8.0} {:>6.0}/{:<6.0} {:>6.0}/{:<6.0} {:>8.0} {:>6} {:>9.3}s {:>9.3}s {:>5}/{:<5}",
            f.label,
            f.agents,
            f.offered,
            f.rows_per_sec,
            f.p50_median,
            f.p50_max,
            f.p99_median,
            f.p99_max,
            f.max_ms,
            f.connections,
            f.pg_cpu_per_k,
            f.agent_cpu_per_k,
            f.exact,
            f.agents
        );
        ok &= f.exact == f.agents;
    }
    println!(
        "{}",
        if ok {
            "exactly once: every agent exact"
        } else {
            "exactly once: FAILED"
        }
    );
    Ok(ok)
}

fn print_run(f: &RunFigures) {
    println!(
        "  {} {}: started in {:.1} s; {:.0} rows/s committed of {:.0} offered; latency per agent p50 median {:.0} ms (max {:.0}), p99 median {:.0} ms (max {:.0}), max {:.0} ms; {} server connections; PostgreSQL {:.0} % CPU, {:.3} CPU s per 1,000 rows (agents {:.3}, median agent RSS {:.1} MiB); exact {}/{} ({} written, {} arrived); {} clean exits",
        f.label,
        f.agents,
        f.start_secs,
        f.rows_per_sec,
        f.offered,
        f.p50_median,
        f.p50_max,
        f.p99_median,
        f.p99_max,
        f.max_ms,
        f.connections,
        f.pg_cpu_pct,
        f.pg_cpu_per_k,
        f.agent_cpu_per_k,
        f.agent_rss_mib,
        f.exact,
        f.agents,
        f.written,
        f.arrived,
        f.clean_exits
    );
    if let Some(m) = &f.maintenance {
        println!(
            "  maintenance: probe commit max {:.0} ms at rest; a plain DROP of a partition behind a {}-s query: {:.2} s, probe max {:.0} ms, agents' max latency {:.0} ms; with the same query: ensure_partitions (30 days) {:.2} s ({} created, {} after the query), cleanup {:.2} s, probe max {:.0} ms, agents' max latency {:.0} ms; old partitions left {}, old rows left {}; cleanup said: {}",
            m.baseline_max_ms,
            m.reader_secs,
            m.naive_drop_secs,
            m.naive_drop_max_ms,
            m.naive_agents_max_ms,
            m.ensure_secs,
            m.created.0,
            m.created.1,
            m.cleanup_secs,
            m.cleanup_max_ms,
            m.agents_max_ms,
            m.old_partitions_left,
            m.old_rows_left,
            m.cleanup_output
        );
    }
    if let Some(o) = &f.outage {
        println!(
            "  outage {:.1} s: attempts while down {} ({:.1}/s, busiest second {}, busiest 100 ms {}); first 10 s after: {} ({:.1}/s, busiest second {}, busiest 100 ms {}); caught up: first {:.1} s, median {:.1} s, all {:.1} s after restart ({} not); peak server connections {}",
            o.down_secs,
            o.down_attempts,
            o.down_per_sec,
            o.down_peak_sec,
            o.down_peak_100ms,
            o.after_attempts,
            o.after_per_sec,
            o.after_peak_sec,
            o.after_peak_100ms,
            o.first_back,
            o.median_back,
            o.all_back,
            o.missing,
            o.peak_connections
        );
    }
}
