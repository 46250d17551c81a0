//! The pipewatch benchmark (issue 3 performance, issue 6 rules overhead), in one run.
//!
//! It starts a throwaway PostgreSQL, generates realistic structlog lines, and measures the
//! release binary `pipewatch` from the outside: backfill throughput (`run --once`) against the
//! physical limit of a single-connection binary COPY, the agent's CPU, memory and commit
//! latency under a steady load, its memory and exactly-once delivery across a database outage,
//! and the cost of 20 rules. It prints a summary table (figure, value, target, pass/fail).
//!
//! It must not touch anything but its own temp dir, its own cluster and the processes it
//! starts (each ended by its PID). Run it with `cargo run --release --example bench`; see
//! `benches/README.md` for the flags.

mod common;
#[path = "common/workload.rs"]
mod workload;

use anyhow::{anyhow, bail, Context as _};
use chrono::{Duration as ChronoDuration, SecondsFormat, Utc};
use clap::Parser;
use futures_util::pin_mut;
use pipewatch::db::throwaway::Throwaway;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use workload::{generate, CopyRow, Rng, RULES_TOML};

/// Sizes and durations; every flag has an environment variable for scripted runs.
#[derive(Debug, Parser)]
#[command(name = "bench", about = "pipewatch benchmark")]
struct Opts {
    /// Lines of the backfill file (agent --once, COPY, rules).
    #[arg(long, env = "BENCH_LINES", default_value_t = 1_000_000)]
    lines: u64,
    /// Repetitions of each backfill measurement (agent without rules, agent with rules,
    /// COPY); the median is reported.
    #[arg(long, env = "BENCH_REPS", default_value_t = 3)]
    reps: usize,
    /// Seconds of the steady-load window.
    #[arg(long, env = "BENCH_STEADY_SECS", default_value_t = 60)]
    steady_secs: u64,
    /// Seconds PostgreSQL is down in the outage phase.
    #[arg(long, env = "BENCH_OUTAGE_SECS", default_value_t = 60)]
    outage_secs: u64,
    /// Lines per second written by the steady writer.
    #[arg(long, env = "BENCH_RATE", default_value_t = 1000)]
    rate: u64,
    /// The longest to wait for the agent to catch up after the outage.
    #[arg(long, env = "BENCH_CATCHUP_SECS", default_value_t = 120)]
    catchup_secs: u64,
    /// Seconds the idle agent (20 daemons, no new lines) is measured; 0 skips it.
    #[arg(long, env = "BENCH_IDLE_SECS", default_value_t = 30)]
    idle_secs: u64,
    /// Skip the backfill phases (steps 2–4 and 7).
    #[arg(long)]
    skip_backfill: bool,
    /// Skip the steady-load and outage phases (steps 5–6).
    #[arg(long)]
    skip_steady: bool,
    /// An earlier `pipewatch` binary for a same-run before/after: its `run --once` (without
    /// rules) alternates with this build's, and the steady and idle phases run with it first;
    /// the table gives its figures and the ratios.
    #[arg(long, env = "BENCH_BASELINE")]
    baseline: Option<PathBuf>,
    /// `[batch] max_records` of the backfill agents (both builds); the default is the agent's
    /// own default. For finding out what a batch costs the server.
    #[arg(long, env = "BENCH_MAX_RECORDS")]
    max_records: Option<u64>,
}

const HOST: &str = "bench-host";
const DAEMON: &str = "clusterer";

/// The columns the agent's sink writes, in its order.
const COPY_LOGS: &str = "COPY pipeline_logs (ts, level, message, logger, experiment_id, node_id, \
     stage, context, traceback, metrics, host, daemon, source) FROM STDIN (FORMAT binary)";

const LOG_TYPES: [Type; 13] = [
    Type::TIMESTAMPTZ,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::UUID,
    Type::TEXT,
    Type::TEXT,
    Type::JSONB,
    Type::TEXT,
    Type::JSONB,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
];

/// Writes the backfill file and returns the rows, pre-converted, for the COPY.
fn write_backfill(path: &Path, lines: u64) -> anyhow::Result<(Vec<CopyRow>, u64)> {
    let file = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut rng = Rng(42);
    // One record per millisecond, ending now: every row falls in a recent daily partition.
    let start = Utc::now() - ChronoDuration::milliseconds(lines as i64);
    let mut rows = Vec::with_capacity(lines as usize);
    let mut bytes = 0u64;
    for i in 0..lines {
        let g = generate(
            &mut rng,
            i,
            start + ChronoDuration::milliseconds(i as i64),
            None,
        );
        bytes += g.line.len() as u64;
        out.write_all(g.line.as_bytes())?;
        rows.push(g.row);
    }
    out.flush()?;
    Ok((rows, bytes))
}

/// A jsonb value already serialised: the binary format is a version byte and the text.
#[derive(Debug)]
struct RawJsonb<'a>(&'a str);

impl ToSql for RawJsonb<'_> {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&[1]);
        out.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }
    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }
    to_sql_checked!();
}

// ---------------------------------------------------------------------------------------------
// Processes and databases
// ---------------------------------------------------------------------------------------------

/// The benchmark's shared state: the cluster, the binary, the temp dir.
struct Bench {
    cluster: Throwaway,
    bin: PathBuf,
    dir: PathBuf,
    db_counter: usize,
}

impl Bench {
    /// A fresh database with the migrations applied.
    async fn fresh_db(&mut self, label: &str) -> anyhow::Result<(String, String)> {
        self.db_counter += 1;
        let name = format!("bench_{label}_{}", self.db_counter);
        let url = common::migrated_db(&self.cluster, &self.bin, &name).await?;
        Ok((name, url))
    }

    async fn drop_db(&self, name: &str) -> anyhow::Result<()> {
        exec(
            &self.cluster.url("postgres"),
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        )
        .await
    }

    /// Writes a config for one daemon tailing `glob`, with or without the 20 rules.
    fn config(
        &self,
        name: &str,
        glob: &Path,
        rules: bool,
        max_records: Option<u64>,
    ) -> anyhow::Result<PathBuf> {
        let mut text = format!("[agent]\nhost = \"{HOST}\"\n\n");
        if let Some(n) = max_records {
            let _ = write!(text, "[batch]\nmax_records = {n}\n\n");
        }
        let _ = write!(
            text,
            "[daemons.{DAEMON}]\nlogs = [\"{}\"]\n",
            glob.display()
        );
        if rules {
            text.push_str(RULES_TOML);
        }
        let path = self.dir.join(format!("{name}.toml"));
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    }

    fn agent_command(
        &self,
        config: &Path,
        url: &str,
        once: bool,
        log: &str,
    ) -> anyhow::Result<Command> {
        let log_path = self.dir.join(log);
        let stderr = std::fs::File::create(&log_path)
            .with_context(|| format!("create {}", log_path.display()))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config")
            .arg(config)
            .args(["--database-url", url, "run"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        if once {
            cmd.arg("--once");
        }
        Ok(cmd)
    }
}

async fn exec(url: &str, sql: &str) -> anyhow::Result<()> {
    common::connect(url)
        .await?
        .batch_execute(sql)
        .await
        .with_context(|| sql.to_string())
}

async fn query_i64(url: &str, sql: &str) -> anyhow::Result<i64> {
    let row = common::connect(url)
        .await?
        .query_one(sql, &[])
        .await
        .with_context(|| sql.to_string())?;
    Ok(row.try_get::<_, i64>(0)?)
}

/// Before a measured run: a `CHECKPOINT` writes out the pages that creating and migrating
/// the fresh database dirtied, so that no run's window is charged for them (otherwise the
/// backend or the background writer writes them during the window, as much for the COPY as
/// for the agent, but not always as much). Returns the WAL insert position, to measure how
/// much WAL the run wrote (see [`Written::since`]).
async fn settle(url: &str) -> anyhow::Result<String> {
    let client = common::connect(url).await?;
    client.batch_execute("CHECKPOINT").await?;
    let row = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?;
    Ok(row.try_get(0)?)
}

/// What a run left on the server: WAL written since `lsn`, and the size of `pipeline_logs`
/// (all partitions, their indexes and TOAST).
struct Written {
    wal: i64,
    table: i64,
}

impl Written {
    async fn since(url: &str, lsn: &str) -> anyhow::Result<Written> {
        let row = common::connect(url)
            .await?
            .query_one(
                "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), $1::text::pg_lsn)::int8, \
                 (SELECT sum(pg_total_relation_size(i.inhrelid))::int8 FROM pg_inherits i \
                  WHERE i.inhparent = 'pipeline_logs'::regclass)",
                &[&lsn],
            )
            .await?;
        Ok(Written {
            wal: row.try_get(0)?,
            table: row.try_get::<_, Option<i64>>(1)?.unwrap_or(0),
        })
    }

    fn describe(&self) -> String {
        format!(
            "WAL {:.1} MiB, table {:.1} MiB",
            self.wal as f64 / MIB,
            self.table as f64 / MIB
        )
    }
}

/// Fields 3.. of /proc/PID/stat (after the command name, which may contain spaces).
fn stat_fields(pid: u32) -> anyhow::Result<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("odd /proc/{pid}/stat"))?;
    Ok(rest.split_whitespace().map(str::to_string).collect())
}

/// Clock ticks per second of /proc's CPU times.
fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// CPU time of a process's live threads in seconds, to the nanosecond: the sum of
/// `/proc/PID/task/*/schedstat` (utime+stime of /proc/PID/stat counts in 10 ms ticks, too
/// coarse for an idle agent). Threads that ended are not counted (the agent's live as long as
/// it does).
fn cpu_precise(pid: u32) -> anyhow::Result<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path().join("schedstat");
        // A thread may end between the listing and the read.
        if let Ok(text) = std::fs::read_to_string(&path) {
            ns += text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(ns as f64 / 1e9)
}

/// Per-thread CPU of a process: (thread id, name) → (ns on CPU, times scheduled), from
/// `/proc/PID/task/*/{comm,schedstat}`.
fn thread_cpu(pid: u32) -> std::collections::BTreeMap<(String, String), (u64, u64)> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(task.path().join("comm")),
            std::fs::read_to_string(task.path().join("schedstat")),
        ) else {
            continue;
        };
        let f: Vec<u64> = stat
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        if f.len() >= 3 {
            let tid = task.file_name().to_string_lossy().into_owned();
            out.insert((tid, comm.trim().to_string()), (f[0], f[2]));
        }
    }
    out
}

/// Prints where the CPU went between two [`thread_cpu`] snapshots, by thread kind (the
/// readers `read-*` together): ms on CPU and wake-ups (times scheduled).
fn print_threads(
    label: &str,
    before: &std::collections::BTreeMap<(String, String), (u64, u64)>,
    after: &std::collections::BTreeMap<(String, String), (u64, u64)>,
) {
    let mut kinds: std::collections::BTreeMap<String, (u64, u64, usize)> = Default::default();
    for (key, (ns, n)) in after {
        let (ns0, n0) = before.get(key).copied().unwrap_or((0, 0));
        let kind = if key.1.starts_with("read-") {
            "read-*".to_string()
        } else {
            key.1.clone()
        };
        let e = kinds.entry(kind).or_default();
        e.0 += ns.saturating_sub(ns0);
        e.1 += n.saturating_sub(n0);
        e.2 += 1;
    }
    let mut line = format!("  {label} per thread (ms CPU / wake-ups):");
    for (kind, (ns, n, threads)) in &kinds {
        let _ = write!(line, " {kind}");
        if *threads > 1 {
            let _ = write!(line, "×{threads}");
        }
        let _ = write!(line, " {:.1}/{n};", *ns as f64 / 1e6);
    }
    println!("{}", line.trim_end_matches(';'));
}

/// CPU seconds of a PostgreSQL server by kind of process: `ended` is the postmaster's own and
/// its reaped children's (utime+stime+cutime+cstime: backends and autovacuum workers that
/// ended), the others are live children by the title PostgreSQL gives them (`backend`,
/// `autovacuum`, `checkpointer`, `walwriter`, `bgwriter`, `other`). A before/after difference
/// of the total is exact to the clock tick; of a kind, as long as its processes live through
/// the window or end inside it (then they move to `ended`).
#[derive(Clone, Debug, Default)]
struct ServerCpu(std::collections::BTreeMap<&'static str, f64>);

impl ServerCpu {
    fn total(&self) -> f64 {
        self.0.values().sum()
    }

    /// Per-kind difference `self - before`.
    fn since(&self, before: &ServerCpu) -> ServerCpu {
        let mut out = self.clone();
        for (k, v) in &before.0 {
            *out.0.entry(k).or_default() -= v;
        }
        out
    }

    /// "backend 1.95 checkpointer 0.02 …", the kinds that used at least 5 ms.
    fn describe(&self) -> String {
        let mut s = String::new();
        for (k, v) in &self.0 {
            if v.abs() >= 0.005 {
                let _ = write!(s, "{k} {v:.2} ");
            }
        }
        s.trim_end().to_string()
    }
}

/// The kind of a PostgreSQL child from its process title.
fn server_kind(pid: u32) -> &'static str {
    let title = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let title = String::from_utf8_lossy(&title);
    let t = title.trim_start_matches("postgres: ");
    if t.starts_with("autovacuum") {
        "autovacuum"
    } else if t.starts_with("checkpointer") {
        "checkpointer"
    } else if t.starts_with("walwriter") {
        "walwriter"
    } else if t.starts_with("background writer") {
        "bgwriter"
    } else if t.starts_with("logical replication") {
        "other"
    } else {
        "backend"
    }
}

fn server_cpu(postmaster: u32) -> anyhow::Result<ServerCpu> {
    let f = stat_fields(postmaster)?;
    let field = |f: &[String], n: usize| -> anyhow::Result<f64> {
        // Field n of stat is f[n - 3].
        Ok(f.get(n - 3)
            .ok_or_else(|| anyhow!("short /proc stat"))?
            .parse::<f64>()?)
    };
    let hz = clock_ticks();
    let mut out = ServerCpu::default();
    out.0.insert(
        "ended",
        (field(&f, 14)? + field(&f, 15)? + field(&f, 16)? + field(&f, 17)?) / hz,
    );
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may end between the listing and the read.
        let Ok(f) = stat_fields(pid) else { continue };
        if f.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(postmaster) {
            let secs = (field(&f, 14).unwrap_or(0.0) + field(&f, 15).unwrap_or(0.0)) / hz;
            *out.0.entry(server_kind(pid)).or_default() += secs;
        }
    }
    Ok(out)
}

/// The PID of the cluster's postmaster: the parent of a backend.
async fn postmaster_pid(url: &str) -> anyhow::Result<u32> {
    let client = common::connect(url).await?;
    let row = client.query_one("SELECT pg_backend_pid()", &[]).await?;
    let backend: i32 = row.try_get(0)?;
    let f = stat_fields(backend as u32).context("read the backend's /proc stat")?;
    Ok(f.get(1)
        .ok_or_else(|| anyhow!("no ppid in /proc/{backend}/stat"))?
        .parse()?)
}

/// CPU seconds used by reaped children so far.
fn children_cpu() -> f64 {
    // SAFETY: rusage is plain data and getrusage only writes it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// Ends a child we started: SIGTERM, then SIGKILL after `grace`. Returns whether it exited 0.
fn stop_child(child: &mut Child, grace: Duration) -> anyhow::Result<bool> {
    if let Some(st) = child.try_wait()? {
        return Ok(st.success());
    }
    // SAFETY: signalling the PID of a child we own and have not reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Some(st) = child.try_wait()? {
            return Ok(st.success());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill()?;
    child.wait()?;
    Ok(false)
}

/// A child that is killed if the benchmark bails out early.
struct Guard(Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// "1.12..1.19": the range of `a[i] / b[i]` over the reps.
fn spread(a: &[f64], b: &[f64]) -> String {
    let r: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b).collect();
    let min = r.iter().copied().fold(f64::INFINITY, f64::min);
    let max = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.2}..{max:.2}")
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

// ---------------------------------------------------------------------------------------------
// Phases
// ---------------------------------------------------------------------------------------------

/// What one `run --once` measured.
struct OnceRun {
    rows_per_sec: f64,
    /// The agent's CPU seconds.
    cpu: f64,
    /// The PostgreSQL server's CPU seconds over the run, by kind of process.
    server_cpu: ServerCpu,
    /// Rule-derived progress rows, events, rows with a sticky `phase`.
    derived: (i64, i64, i64),
    /// WAL and table bytes.
    written: Written,
}

/// Lets the backend of a connection that just closed end and be reaped, so that its CPU
/// time is in the postmaster's cutime/cstime.
const BACKEND_EXIT: Duration = Duration::from_millis(300);

/// One `run --once` over the backfill file into a fresh database.
async fn once_run(
    bench: &mut Bench,
    config: &Path,
    expect: u64,
    label: &str,
) -> anyhow::Result<OnceRun> {
    let (name, url) = bench.fresh_db(label).await?;
    let log = format!("agent-{label}-{}.log", bench.db_counter);
    let mut cmd = bench.agent_command(config, &url, true, &log)?;
    let lsn = settle(&url).await?;
    let postmaster = postmaster_pid(&url).await?;
    tokio::time::sleep(BACKEND_EXIT).await;
    let server0 = server_cpu(postmaster)?;
    let cpu0 = children_cpu();
    let t0 = Instant::now();
    let st = cmd.status().context("run pipewatch run --once")?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = children_cpu() - cpu0;
    tokio::time::sleep(BACKEND_EXIT).await;
    let server_cpu = server_cpu(postmaster)?.since(&server0);
    let written = Written::since(&url, &lsn).await?;
    if !st.success() {
        let text = std::fs::read_to_string(bench.dir.join(&log)).unwrap_or_default();
        bail!(
            "pipewatch run --once ({label}) failed: {st}: {}",
            text.trim()
        );
    }
    let rows = query_i64(
        &url,
        &format!("SELECT count(*) FROM pipeline_logs WHERE daemon = '{DAEMON}'"),
    )
    .await?;
    if rows != expect as i64 {
        bail!("{label}: pipeline_logs has {rows} rows, expected exactly {expect}");
    }
    let progress = query_i64(&url, "SELECT count(*) FROM pipeline_progress").await?;
    let events = query_i64(
        &url,
        &format!("SELECT count(*) FROM pipeline_events WHERE daemon = '{DAEMON}'"),
    )
    .await?;
    let phase = query_i64(
        &url,
        "SELECT count(*) FROM pipeline_logs WHERE context ? 'phase'",
    )
    .await?;
    bench.drop_db(&name).await?;
    Ok(OnceRun {
        rows_per_sec: expect as f64 / wall,
        cpu,
        server_cpu,
        derived: (progress, events, phase),
        written,
    })
}

/// One binary COPY of the pre-converted rows into a fresh database; only the COPY is timed.
/// Returns rows/s and the server's CPU seconds from connecting to disconnecting.
async fn copy_run(
    bench: &mut Bench,
    rows: &[CopyRow],
    source: &str,
) -> anyhow::Result<(f64, ServerCpu, Written)> {
    let (name, url) = bench.fresh_db("copy").await?;
    let lsn = settle(&url).await?;
    let postmaster = postmaster_pid(&url).await?;
    tokio::time::sleep(BACKEND_EXIT).await;
    let server0 = server_cpu(postmaster)?;
    let client = common::connect(&url).await?;
    let t0 = Instant::now();
    let sink = client.copy_in(COPY_LOGS).await?;
    let writer = BinaryCopyInWriter::new(sink, &LOG_TYPES);
    pin_mut!(writer);
    for r in rows {
        let context = RawJsonb(&r.context);
        let metrics = r.metrics.as_deref().map(RawJsonb);
        writer
            .as_mut()
            .write(&[
                &r.ts,
                &r.level,
                &r.message,
                &r.logger,
                &r.experiment_id,
                &r.node_id,
                &r.stage,
                &context,
                &r.traceback,
                &metrics,
                &HOST,
                &DAEMON,
                &source,
            ])
            .await?;
    }
    let n = writer.finish().await?;
    let secs = t0.elapsed().as_secs_f64();
    drop(client);
    tokio::time::sleep(BACKEND_EXIT).await;
    let server = server_cpu(postmaster)?.since(&server0);
    let written = Written::since(&url, &lsn).await?;
    if n != rows.len() as u64 {
        bail!("COPY wrote {n} rows, expected {}", rows.len());
    }
    let count = query_i64(&url, "SELECT count(*) FROM pipeline_logs").await?;
    if count != rows.len() as i64 {
        bail!(
            "after COPY pipeline_logs has {count} rows, expected {}",
            rows.len()
        );
    }
    bench.drop_db(&name).await?;
    Ok((rows.len() as f64 / secs, server, written))
}

/// Appends `rate` lines a second to `path`, each stamped with its write time, until stopped.
fn spawn_writer(
    path: PathBuf,
    rate: u64,
    written: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<anyhow::Result<()>> {
    std::thread::spawn(move || {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        let mut rng = Rng(7);
        let start = Instant::now();
        let mut seq = 0u64;
        let mut buf = String::new();
        while !stop.load(Ordering::SeqCst) {
            let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
            buf.clear();
            while seq < due {
                let now = Utc::now();
                let extra = format!(
                    r#""written_at": "{}""#,
                    now.to_rfc3339_opts(SecondsFormat::Micros, true)
                );
                buf.push_str(&generate(&mut rng, seq, now, Some(&extra)).line);
                seq += 1;
            }
            if !buf.is_empty() {
                file.write_all(buf.as_bytes())?;
                written.store(seq, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    })
}

/// Figures of the steady-load and outage phases.
struct SteadyFigures {
    cpu_percent: f64,
    steady_rss_max: u64,
    steady_hwm: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    steady_rows: u64,
    outage_rss_max: u64,
    outage_hwm: u64,
    total_written: u64,
    arrived: i64,
    distinct: i64,
    catchup_secs: f64,
    clean_exit: bool,
}

async fn steady_and_outage(bench: &mut Bench, opts: &Opts) -> anyhow::Result<SteadyFigures> {
    let (name, url) = bench.fresh_db("steady").await?;
    let logdir = bench.dir.join("steady");
    std::fs::create_dir_all(&logdir)?;
    let file = logdir.join("clusterer.jsonl");
    std::fs::File::create(&file)?;
    let config = bench.config("steady", &logdir.join("*.jsonl"), false, None)?;
    let child = bench
        .agent_command(&config, &url, false, "agent-steady.log")?
        .spawn()
        .context("start pipewatch run")?;
    let pid = child.id();
    let mut guard = Guard(Some(child));

    // Ready when its agent_started event is committed.
    let ready_by = Instant::now() + Duration::from_secs(30);
    loop {
        let n = query_i64(
            &url,
            "SELECT count(*) FROM pipeline_events WHERE event_type = 'agent_started'",
        )
        .await
        .unwrap_or(0);
        if n > 0 {
            break;
        }
        if Instant::now() > ready_by {
            bail!("the agent did not start within 30 s (see agent-steady.log)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let written = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(file, opts.rate, written.clone(), stop.clone());

    // Steady window: CPU over the window, RSS sampled every 250 ms.
    println!(
        "  steady: {} lines/s for {} s …",
        opts.rate, opts.steady_secs
    );
    let cpu0 = cpu_precise(pid)?;
    let threads0 = thread_cpu(pid);
    let t0 = Instant::now();
    let mut steady_rss_max = 0;
    while t0.elapsed() < Duration::from_secs(opts.steady_secs) {
        steady_rss_max = steady_rss_max.max(common::vm_bytes(pid, "VmRSS")?);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let cpu1 = cpu_precise(pid)?;
    print_threads("steady", &threads0, &thread_cpu(pid));
    let window = t0.elapsed().as_secs_f64();
    let steady_hwm = common::vm_bytes(pid, "VmHWM")?;
    let steady_rows = written.load(Ordering::SeqCst);
    // Let the window's last lines commit (the writer keeps going) so that the outage does
    // not count in their latency.
    let settle_by = Instant::now() + Duration::from_secs(30);
    while query_i64(
        &url,
        &format!(
            "SELECT count(*) FROM pipeline_logs WHERE daemon = '{DAEMON}' \
             AND (context->>'seq')::bigint < {steady_rows}"
        ),
    )
    .await?
        < steady_rows as i64
    {
        if Instant::now() > settle_by {
            bail!("the steady window's lines did not arrive within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Outage: the writer keeps going; RSS sampled every second.
    let mut outage_rss_max = 0;
    if opts.outage_secs > 0 {
        println!("  outage: PostgreSQL down for {} s …", opts.outage_secs);
        bench.cluster.stop();
        let t1 = Instant::now();
        while t1.elapsed() < Duration::from_secs(opts.outage_secs) {
            outage_rss_max = outage_rss_max.max(common::vm_bytes(pid, "VmRSS")?);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        bench.cluster.start()?;
    }
    let restarted = Instant::now();
    // A few more seconds of writing after the restart, then the writer stops.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    writer
        .join()
        .map_err(|_| anyhow!("the writer thread panicked"))??;
    let total_written = written.load(Ordering::SeqCst);

    // Catch-up: every line arrived?
    let mut arrived;
    let deadline = Instant::now() + Duration::from_secs(opts.catchup_secs);
    loop {
        outage_rss_max = outage_rss_max.max(common::vm_bytes(pid, "VmRSS").unwrap_or(0));
        arrived = query_i64(
            &url,
            &format!("SELECT count(*) FROM pipeline_logs WHERE daemon = '{DAEMON}'"),
        )
        .await
        .unwrap_or(-1);
        if arrived >= total_written as i64 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let catchup_secs = restarted.elapsed().as_secs_f64();
    let outage_hwm = common::vm_bytes(pid, "VmHWM").unwrap_or(0);

    // A clean stop, then the exactly-once check over everything written.
    let mut child = guard
        .0
        .take()
        .ok_or_else(|| anyhow!("agent child missing"))?;
    let clean_exit = stop_child(&mut child, Duration::from_secs(20))?;
    let client = common::connect(&url).await?;
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), count(DISTINCT (context->>'seq')::bigint), \
                 COALESCE(min((context->>'seq')::bigint), -1), \
                 COALESCE(max((context->>'seq')::bigint), -1) \
                 FROM pipeline_logs WHERE daemon = '{DAEMON}'"
            ),
            &[],
        )
        .await?;
    let arrived: i64 = row.try_get(0)?;
    let distinct: i64 = row.try_get(1)?;
    let min_seq: i64 = row.try_get(2)?;
    let max_seq: i64 = row.try_get(3)?;
    if total_written > 0 && (min_seq != 0 || max_seq != total_written as i64 - 1) {
        println!(
            "  warning: seq range {min_seq}..={max_seq}, expected 0..={}",
            total_written - 1
        );
    }
    // Latency over the rows written in the steady window.
    let lat = client
        .query_one(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY l), \
             percentile_cont(0.99) WITHIN GROUP (ORDER BY l), max(l) FROM ( \
             SELECT (extract(epoch FROM ingested_at - (context->>'written_at')::timestamptz) * 1000)::float8 AS l \
             FROM pipeline_logs WHERE daemon = $1 AND (context->>'seq')::bigint < $2) s",
            &[&DAEMON, &(steady_rows as i64)],
        )
        .await?;
    let p50: Option<f64> = lat.try_get(0)?;
    let p99: Option<f64> = lat.try_get(1)?;
    let max: Option<f64> = lat.try_get::<_, Option<f64>>(2)?;
    drop(client);
    bench.drop_db(&name).await?;
    Ok(SteadyFigures {
        cpu_percent: (cpu1 - cpu0) / window * 100.0,
        steady_rss_max,
        steady_hwm,
        p50_ms: p50.unwrap_or(f64::NAN),
        p99_ms: p99.unwrap_or(f64::NAN),
        max_ms: max.unwrap_or(f64::NAN),
        steady_rows,
        outage_rss_max,
        outage_hwm,
        total_written,
        arrived,
        distinct,
        catchup_secs,
        clean_exit,
    })
}

/// Daemons of the idle phase.
const IDLE_DAEMONS: usize = 20;

/// 20 daemons configured, each with a small file read to its end, nothing new written: the
/// agent's CPU (% of one core) over `secs`, after every line is committed and a few seconds
/// of settling.
async fn idle_run(bench: &mut Bench, secs: u64) -> anyhow::Result<f64> {
    let (name, url) = bench.fresh_db("idle").await?;
    let mut text = format!("[agent]\nhost = \"{HOST}\"\n");
    for d in 0..IDLE_DAEMONS {
        let dir = bench.dir.join(format!("idle/d{d:02}"));
        std::fs::create_dir_all(&dir)?;
        let mut lines = String::new();
        let mut rng = Rng(d as u64);
        for i in 0..10 {
            lines.push_str(&generate(&mut rng, i, Utc::now(), None).line);
        }
        std::fs::write(dir.join("app.jsonl"), lines)?;
        let _ = write!(
            text,
            "\n[daemons.idle{d:02}]\nlogs = [\"{}\"]\n",
            dir.join("*.jsonl").display()
        );
    }
    let config = bench.dir.join("idle.toml");
    std::fs::write(&config, text).with_context(|| format!("write {}", config.display()))?;
    let child = bench
        .agent_command(&config, &url, false, "agent-idle.log")?
        .spawn()
        .context("start pipewatch run")?;
    let pid = child.id();
    let mut guard = Guard(Some(child));
    let expect = IDLE_DAEMONS as i64 * 10;
    let ready_by = Instant::now() + Duration::from_secs(30);
    while query_i64(&url, "SELECT count(*) FROM pipeline_logs")
        .await
        .unwrap_or(0)
        < expect
    {
        if Instant::now() > ready_by {
            bail!(
                "the idle agent did not ship its {expect} lines within 30 s (see agent-idle.log)"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!("  idle: {IDLE_DAEMONS} daemons, nothing written, for {secs} s …");
    let cpu0 = cpu_precise(pid)?;
    let threads0 = thread_cpu(pid);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let cpu = cpu_precise(pid)? - cpu0;
    print_threads("idle", &threads0, &thread_cpu(pid));
    let window = t0.elapsed().as_secs_f64();
    let mut child = guard
        .0
        .take()
        .ok_or_else(|| anyhow!("agent child missing"))?;
    if !stop_child(&mut child, Duration::from_secs(20))? {
        println!("  warning: the idle agent did not exit 0 on SIGTERM");
    }
    bench.drop_db(&name).await?;
    Ok(cpu / window * 100.0)
}

// ---------------------------------------------------------------------------------------------
// Summary
// ---------------------------------------------------------------------------------------------

struct Summary(Vec<(String, String, String, Option<bool>)>);

impl Summary {
    fn add(&mut self, figure: &str, value: String, target: &str, pass: Option<bool>) {
        self.0
            .push((figure.to_string(), value, target.to_string(), pass));
    }

    fn print(&self) {
        let w0 = self.0.iter().map(|r| r.0.len()).max().unwrap_or(6).max(6);
        let w1 = self.0.iter().map(|r| r.1.len()).max().unwrap_or(5).max(5);
        let w2 = self.0.iter().map(|r| r.2.len()).max().unwrap_or(6).max(6);
        println!();
        println!(
            "{:w0$}  {:>w1$}  {:w2$}  result",
            "figure", "value", "target"
        );
        println!("{}", "-".repeat(w0 + w1 + w2 + 12));
        for (f, v, t, p) in &self.0 {
            let r = match p {
                Some(true) => "pass",
                Some(false) => "FAIL",
                None => "-",
            };
            println!("{f:w0$}  {v:>w1$}  {t:w2$}  {r}");
        }
    }
}

const MIB: f64 = 1024.0 * 1024.0;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let opts = Opts::parse();
    match run(opts).await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("bench: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run(opts: Opts) -> anyhow::Result<bool> {
    let started = Instant::now();
    let bin = common::pipewatch_binary("bench")?;
    let tmp = tempfile::Builder::new()
        .prefix("pipewatch-bench-")
        .tempdir()
        .context("create a temp dir")?;
    println!("pipewatch benchmark: binary {}", bin.display());
    println!(
        "  lines {}, reps {}, steady {} s at {} lines/s, outage {} s; temp dir {}",
        opts.lines,
        opts.reps,
        opts.steady_secs,
        opts.rate,
        opts.outage_secs,
        tmp.path().display()
    );
    let cluster = Throwaway::new().context("start a throwaway PostgreSQL")?;
    let mut bench = Bench {
        cluster,
        bin,
        dir: tmp.path().to_path_buf(),
        db_counter: 0,
    };
    let mut summary = Summary(Vec::new());
    let reps = opts.reps.max(1);

    if !opts.skip_backfill {
        // 2. The backfill file.
        let logdir = bench.dir.join("backfill");
        std::fs::create_dir_all(&logdir)?;
        let file = logdir.join("clusterer.jsonl");
        let t = Instant::now();
        let (rows, bytes) = write_backfill(&file, opts.lines)?;
        println!(
            "generated {} lines, {:.0} MiB, {:.0} bytes/line on average, in {:.1} s",
            opts.lines,
            bytes as f64 / MIB,
            bytes as f64 / opts.lines.max(1) as f64,
            t.elapsed().as_secs_f64()
        );
        let source = file.display().to_string();
        let plain = bench.config("plain", &logdir.join("*.jsonl"), false, opts.max_records)?;
        let ruled = bench.config("rules", &logdir.join("*.jsonl"), true, opts.max_records)?;

        // 3, 4 and 7: COPY and agent runs without and with rules, interleaved so that drift in
        // the shared machine's load affects all alike.
        let (mut plain_rates, mut rules_rates, mut plain_cpu, mut rules_cpu) =
            (vec![], vec![], vec![], vec![]);
        let mut agent_server = vec![];
        let (mut base_rates, mut base_server, mut base_cpu) = (vec![], vec![], vec![]);
        let mut derived = (0, 0, 0);
        let (mut copy_rates, mut copy_server) = (vec![], vec![]);
        for rep in 0..reps {
            // 4. The physical limit, in the same round as the agent runs it is compared with.
            let (r, server, written) = copy_run(&mut bench, &rows, &source).await?;
            println!(
                "  binary COPY #{}: {:.0} rows/s (server CPU {:.2} s: {}; {})",
                rep + 1,
                r,
                server.total(),
                server.describe(),
                written.describe()
            );
            copy_rates.push(r);
            copy_server.push(server.total());
            if let Some(old) = &opts.baseline {
                let new = std::mem::replace(&mut bench.bin, old.clone());
                let r = once_run(&mut bench, &plain, opts.lines, "baseline").await;
                bench.bin = new;
                let r = r?;
                println!(
                    "  baseline run --once without rules #{}: {:.0} rows/s (agent CPU {:.1} s, server CPU {:.2} s: {}; {})",
                    rep + 1,
                    r.rows_per_sec,
                    r.cpu,
                    r.server_cpu.total(),
                    r.server_cpu.describe(),
                    r.written.describe()
                );
                base_rates.push(r.rows_per_sec);
                base_server.push(r.server_cpu.total());
                base_cpu.push(r.cpu);
            }
            let r = once_run(&mut bench, &plain, opts.lines, "plain").await?;
            println!(
                "  run --once without rules #{}: {:.0} rows/s (agent CPU {:.1} s, server CPU {:.2} s: {}; {})",
                rep + 1,
                r.rows_per_sec,
                r.cpu,
                r.server_cpu.total(),
                r.server_cpu.describe(),
                r.written.describe()
            );
            plain_rates.push(r.rows_per_sec);
            plain_cpu.push(r.cpu);
            agent_server.push(r.server_cpu.total());
            let r = once_run(&mut bench, &ruled, opts.lines, "rules").await?;
            let (p, e, ph) = r.derived;
            println!(
                "  run --once with 20 rules #{}: {:.0} rows/s (agent CPU {:.1} s; rule output: {p} progress rows, {e} events, {ph} rows with a sticky phase)",
                rep + 1,
                r.rows_per_sec,
                r.cpu
            );
            rules_rates.push(r.rows_per_sec);
            rules_cpu.push(r.cpu);
            derived = r.derived;
        }
        drop(rows);
        std::fs::remove_file(&file)?;

        let agent = median(&plain_rates);
        let copy = median(&copy_rates);
        let with_rules = median(&rules_rates);
        summary.add(
            &format!("agent run --once, rows/s (median of {reps})"),
            format!("{agent:.0}"),
            "",
            None,
        );
        summary.add(
            &format!("agent CPU s per {} lines (median)", opts.lines),
            format!("{:.1}", median(&plain_cpu)),
            "",
            None,
        );
        summary.add(
            &format!("binary COPY, rows/s (median of {reps})"),
            format!("{copy:.0}"),
            "",
            None,
        );
        summary.add(
            "ratio agent / COPY",
            format!("{:.2}", agent / copy),
            ">= 1.00",
            Some(agent / copy >= 1.0),
        );
        let per_k = 1000.0 / opts.lines.max(1) as f64 * 1000.0;
        let (server_agent, server_copy) = (median(&agent_server), median(&copy_server));
        summary.add(
            "server CPU ms per 1,000 rows: agent run (median)",
            format!("{:.2}", server_agent * per_k),
            "",
            None,
        );
        summary.add(
            "server CPU ms per 1,000 rows: binary COPY (median)",
            format!("{:.2}", server_copy * per_k),
            "",
            None,
        );
        summary.add(
            "ratio server CPU agent / COPY",
            format!("{:.2}", server_agent / server_copy),
            "<= 1.15",
            Some(server_agent / server_copy <= 1.15),
        );
        summary.add(
            "  the same, each rep with its own COPY (min-max)",
            spread(&agent_server, &copy_server),
            "",
            None,
        );
        if !base_rates.is_empty() {
            let base = median(&base_rates);
            summary.add(
                &format!("baseline run --once, rows/s (median of {reps})"),
                format!("{base:.0}"),
                "",
                None,
            );
            summary.add(
                "ratio baseline / COPY",
                format!("{:.2}", base / copy),
                "",
                None,
            );
            summary.add(
                "ratio agent / baseline",
                format!("{:.2}", agent / base),
                "",
                None,
            );
            summary.add(
                "baseline agent CPU s (median)",
                format!("{:.1}", median(&base_cpu)),
                "",
                None,
            );
            summary.add(
                "ratio server CPU baseline / COPY",
                format!("{:.2}", median(&base_server) / server_copy),
                "",
                None,
            );
            summary.add(
                "  the same, each rep with its own COPY (min-max)",
                spread(&base_server, &copy_server),
                "",
                None,
            );
        }
        summary.add(
            &format!("agent with 20 rules, rows/s (median of {reps})"),
            format!("{with_rules:.0}"),
            "",
            None,
        );
        let rules_active = derived.0 > 0 || derived.1 > 0 || derived.2 > 0;
        // CPU seconds are steadier than wall time on a shared machine: a second view.
        let cpu_ratio = median(&plain_cpu) / median(&rules_cpu);
        summary.add(
            "agent CPU s without rules / with rules (median)",
            format!("{cpu_ratio:.2}"),
            "",
            None,
        );
        summary.add(
            if rules_active {
                "ratio with rules / without"
            } else {
                "ratio with rules / without (RULES ARE A NO-OP: meaningless)"
            },
            format!("{:.2}", with_rules / agent),
            ">= 0.85",
            rules_active.then_some(with_rules / agent >= 0.85),
        );
    }

    if !opts.skip_steady {
        // 5 and 6.
        let base = match &opts.baseline {
            Some(b) => {
                println!("  baseline {}:", b.display());
                let this = std::mem::replace(&mut bench.bin, b.clone());
                let s = steady_and_outage(&mut bench, &opts).await;
                bench.bin = this;
                Some(s?)
            }
            None => None,
        };
        let s = steady_and_outage(&mut bench, &opts).await?;
        if let Some(b) = &base {
            summary.add(
                "baseline: steady agent CPU % / p99 ms",
                format!("{:.2} / {:.0}", b.cpu_percent, b.p99_ms),
                "",
                None,
            );
            summary.add(
                "steady agent CPU: this / baseline",
                format!("{:.2}", s.cpu_percent / b.cpu_percent),
                "",
                None,
            );
        }
        println!(
            "  steady: {} lines in the window; latency max {:.0} ms; caught up {:.1} s after the restart",
            s.steady_rows, s.max_ms, s.catchup_secs
        );
        summary.add(
            &format!("steady {} lines/s: agent CPU % of one core", opts.rate),
            format!("{:.2}", s.cpu_percent),
            "<= 0.8 %",
            Some(s.cpu_percent <= 0.8),
        );
        let rss = s.steady_rss_max.max(s.steady_hwm) as f64 / MIB;
        summary.add(
            "steady: agent max RSS, MiB (VmHWM)",
            format!("{rss:.1}"),
            "<= 12 MiB",
            Some(rss <= 12.0),
        );
        summary.add(
            "steady: commit latency p50, ms",
            format!("{:.0}", s.p50_ms),
            "",
            None,
        );
        summary.add(
            "steady: commit latency p99, ms",
            format!("{:.0}", s.p99_ms),
            "<= 250 ms",
            Some(s.p99_ms <= 250.0),
        );
        if opts.outage_secs > 0 {
            let rss = s.outage_rss_max.max(s.outage_hwm) as f64 / MIB;
            summary.add(
                &format!("outage {} s: agent max RSS, MiB", opts.outage_secs),
                format!("{rss:.1}"),
                "<= 64 MiB",
                Some(rss <= 64.0),
            );
            summary.add(
                "outage: caught up after restart, s",
                format!("{:.1}", s.catchup_secs),
                "",
                None,
            );
        }
        let once = s.arrived == s.total_written as i64 && s.distinct == s.arrived;
        summary.add(
            "steady+outage: lines written / rows / distinct",
            format!("{}/{}/{}", s.total_written, s.arrived, s.distinct),
            "all equal",
            Some(once),
        );
        summary.add(
            "agent exited 0 on SIGTERM",
            format!("{}", s.clean_exit),
            "true",
            Some(s.clean_exit),
        );
    }

    if opts.idle_secs > 0 {
        if let Some(b) = &opts.baseline {
            println!("  baseline {}:", b.display());
            let this = std::mem::replace(&mut bench.bin, b.clone());
            let idle = idle_run(&mut bench, opts.idle_secs).await;
            bench.bin = this;
            summary.add(
                &format!("baseline: {IDLE_DAEMONS} idle daemons: agent CPU %"),
                format!("{:.3}", idle?),
                "",
                None,
            );
        }
        let idle = idle_run(&mut bench, opts.idle_secs).await?;
        summary.add(
            &format!("{IDLE_DAEMONS} idle daemons: agent CPU % of one core"),
            format!("{idle:.3}"),
            "<= 0.1 %",
            Some(idle <= 0.1),
        );
    }

    summary.print();
    println!("\ntotal runtime {:.0} s", started.elapsed().as_secs_f64());
    let ok = summary.0.iter().all(|r| r.3 != Some(false));
    drop(bench);
    tmp.close().context("remove the temp dir")?;
    Ok(ok)
}
