//! `pipewatch demo`: the whole product in twenty seconds on a fresh machine. Starts a throwaway
//! PostgreSQL (or uses `--database-url`), migrates, starts a simulated pipeline daemon (this
//! binary, hidden `demo-daemon` command) that writes JSON logs with progress, an error with a
//! traceback and a stall, runs the agent on it while drawing the progress tree, then prints
//! what an operator would look at. Cleans up after itself.

use super::out::{out, outln};
use super::render;
use super::Context;
use crate::db::throwaway::Throwaway;
use crate::db::typed::p;
use crate::exit::Code;
use anyhow::Context as _;
use chrono::Utc;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use uuid::Uuid;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// How long the agent runs on the simulated daemon
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Keep the database and files after the demo until Ctrl-C, to explore with psql
    #[arg(long)]
    pub keep: bool,
}

/// The simulated daemon's arguments (hidden command `demo-daemon`).
#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    /// Directory for logs and the pid file
    #[arg(long)]
    pub dir: PathBuf,
    /// How long the whole simulated run takes
    #[arg(long, default_value = "16s", value_parser = humantime::parse_duration)]
    pub length: Duration,
}

const DEMO_CONFIG: &str = r#"# Written by `pipewatch demo`.
[database]
url = "$URL"

[agent]
host = "demo-host"

[batch]
max_records = 5000
max_wait = "200ms"

[daemons.clusterer]
logs = ["$DIR/logs/*.jsonl"]
experiment_id = "$EXP"
pid_file = "$DIR/clusterer.pid"
metrics_interval = "1s"
disks = ["$DIR"]
stall_after = "2s"

# Plain messages become progress, context and events without touching the daemon.
[[daemons.clusterer.rules]]
match = 'Processed (?P<items_done>\d+)/(?P<items_total>\d+) tiles'
progress = { node_id = "tiles", parent_node_id = "clustering", level = "step", name = "Tile processing" }

[[daemons.clusterer.rules]]
match = '^=== Stage: (?P<stage>\w+) ==='
set = { stage = "{stage}" }
sticky = true

[[daemons.clusterer.rules]]
match = 'MemoryError|Killed process|Out of memory'
event = { event_type = "out_of_memory", severity = "CRITICAL" }
"#;

pub async fn execute(args: Args, ctx: &Context) -> anyhow::Result<Code> {
    let color = super::out::color_stdout();
    let terminal = std::io::stdout().is_terminal();
    let title = |s: &str| -> anyhow::Result<()> {
        outln!("\n{}", render::paint(s, "1", color));
        Ok(())
    };
    title("pipewatch demo")?;
    // A database: the one given, or a throwaway local cluster.
    let explicit = ctx.database_url_flag.clone().or_else(|| {
        std::env::var("PIPEWATCH_DATABASE_URL")
            .ok()
            .filter(|s| !s.trim().is_empty())
    });
    let mut throwaway = None;
    let url = match explicit {
        Some(u) => {
            outln!(
                "• using the database given: {}",
                crate::config::redact::redact_url(&u)
            );
            u
        }
        None => {
            out!("• starting a throwaway PostgreSQL … ");
            let _ = std::io::stdout().flush();
            let t = tokio::task::spawn_blocking(Throwaway::new)
                .await
                .context("starting PostgreSQL")??;
            let u = t.url("postgres");
            outln!("listening on 127.0.0.1:{}", t.port);
            throwaway = Some(t);
            u
        }
    };
    let target = crate::db::DbTarget::parse(&url, None, None)?;
    let mut client = crate::db::connect(&target).await?;
    crate::db::migrate::apply(&mut client).await?;
    outln!("• schema migrated");

    let experiment = Uuid::new_v4();
    let name = format!("demo-clustering-{}", Utc::now().format("%Y%m%d-%H%M%S"));
    client
        .execute_typed(
            "INSERT INTO experiments (id, name) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[p(&experiment), p(&name)],
        )
        .await
        .context("creating the demo experiment")?;
    outln!("• experiment {name} ({experiment})");

    let dir = tempfile::Builder::new()
        .prefix("pipewatch-demo-")
        .tempdir()
        .context("creating a temp dir")?;
    std::fs::create_dir_all(dir.path().join("logs"))?;
    let config_path = dir.path().join("pipewatch.toml");
    let config_text = DEMO_CONFIG
        .replace("$URL", &url)
        .replace("$DIR", &dir.path().display().to_string())
        .replace("$EXP", &experiment.to_string());
    std::fs::write(&config_path, &config_text)?;
    let config = crate::config::load(&config_path)?;
    outln!("• agent config: {}", config_path.display());

    let exe = std::env::current_exe().context("locating the pipewatch binary")?;
    let length = args
        .duration
        .saturating_sub(Duration::from_secs(4))
        .max(Duration::from_secs(6));
    let mut daemon = std::process::Command::new(exe)
        .arg("demo-daemon")
        .arg("--dir")
        .arg(dir.path())
        .arg("--length")
        .arg(humantime::format_duration(length).to_string())
        .stdin(std::process::Stdio::null())
        .spawn()
        .map(KillOnDrop)
        .context("starting the simulated daemon")?;
    outln!(
        "• simulated daemon `clusterer` started (pid {})",
        daemon.0.id()
    );

    let stop = tokio_util::sync::CancellationToken::new();
    let agent = tokio::spawn(crate::agent::run(
        config,
        target.clone(),
        false,
        stop.clone(),
    ));
    title(&format!(
        "progress of {name} (live, {}s)",
        args.duration.as_secs()
    ))?;
    let started = Instant::now();
    let mut last_lines = 0usize;
    while started.elapsed() < args.duration {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if agent.is_finished() {
            break;
        }
        let rows = crate::db::queries::progress_tree(&client, experiment)
            .await
            .unwrap_or_default();
        let tree = render::progress_tree(&rows, Utc::now(), color);
        if terminal {
            // Redraw in place.
            if last_lines > 0 {
                out!("\x1b[{last_lines}A\x1b[J");
            }
            out!("{tree}");
            last_lines = tree.lines().count();
            let _ = std::io::stdout().flush();
        }
    }
    stop.cancel();
    let _ = daemon.0.kill();
    let _ = daemon.0.wait();
    let summary = agent.await.context("the agent task failed")??;
    if !terminal {
        let rows = crate::db::queries::progress_tree(&client, experiment).await?;
        out!("{}", render::progress_tree(&rows, Utc::now(), false));
    }
    outln!(
        "\n• agent shipped {} records in {} transactions",
        summary.records_shipped,
        summary.batches
    );

    print_report(&client, experiment, color).await?;

    title("explore further")?;
    outln!("  psql '{url}'");
    outln!("    SELECT * FROM get_progress_tree('{experiment}');");
    outln!("    SELECT ts, level, message FROM get_experiment_logs('{experiment}', p_level := 'WARNING');");
    outln!("    SELECT * FROM active_pipeline_monitoring;");
    outln!("  pipewatch --database-url '{url}' logs --experiment {name}");
    if args.keep {
        outln!("\nThe database and files are kept; press Ctrl-C to clean up and exit.");
        let _ = tokio::signal::ctrl_c().await;
    } else {
        outln!("  (run `pipewatch demo --keep` to keep the database running while you explore)");
    }
    drop(client);
    drop(throwaway);
    cleanup(dir.path());
    Ok(Code::Success)
}

/// The simulated daemon, killed however the demo ends (even when stdout closes under it).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn cleanup(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

async fn print_report(
    client: &tokio_postgres::Client,
    experiment: Uuid,
    color: bool,
) -> anyhow::Result<()> {
    let title = |s: &str| -> anyhow::Result<()> {
        outln!("\n{}", render::paint(s, "1", color));
        Ok(())
    };
    title("recent errors (recent_experiment_errors)")?;
    let rows = client
        .query_typed(
            "SELECT ts, level, coalesce(node_id, '-'), coalesce(stage, '-'), message, traceback \
             FROM recent_experiment_errors WHERE experiment_id = $1 LIMIT 5",
            &[p(&experiment)],
        )
        .await?;
    for r in &rows {
        let ts: chrono::DateTime<Utc> = r.get(0);
        let level: String = r.get(1);
        let node: String = r.get(2);
        let stage: String = r.get(3);
        let msg: String = r.get(4);
        let tb: Option<String> = r.get(5);
        outln!(
            "  {} {} node={node} stage={stage} {msg}",
            ts.format("%H:%M:%S%.3f"),
            render::paint(&level, "31", color)
        );
        if let Some(tb) = tb {
            for l in tb.lines() {
                outln!("      {l}");
            }
        }
    }
    title("error summary (get_error_summary)")?;
    let rows = client
        .query_typed(
            "SELECT message, count, first_seen, last_seen, nodes FROM get_error_summary($1)",
            &[p(&experiment)],
        )
        .await?;
    for r in &rows {
        let msg: String = r.get(0);
        let count: i64 = r.get(1);
        let first: chrono::DateTime<Utc> = r.get(2);
        let last: chrono::DateTime<Utc> = r.get(3);
        let nodes: Vec<String> = r.get(4);
        outln!(
            "  {count}× {msg}  (first {}, last {}, nodes {})",
            first.format("%H:%M:%S"),
            last.format("%H:%M:%S"),
            nodes.join(",")
        );
    }
    title("events (pipeline_events)")?;
    let rows = client
        .query_typed(
            "SELECT ts, severity, event_type, coalesce(message, '') FROM pipeline_events \
             WHERE host = 'demo-host' ORDER BY ts, id",
            &[],
        )
        .await?;
    for r in &rows {
        let ts: chrono::DateTime<Utc> = r.get(0);
        let sev: String = r.get(1);
        let et: String = r.get(2);
        let msg: String = r.get(3);
        outln!("  {} {:<8} {:<18} {msg}", ts.format("%H:%M:%S"), sev, et);
    }
    title("metrics sample (pipeline_metrics)")?;
    let rows = client
        .query_typed(
            "SELECT ts, daemon, pid, cpu_percent::float8, memory_rss_bytes::int8, records_per_sec::float8 \
             FROM pipeline_metrics WHERE host = 'demo-host' ORDER BY ts DESC, id DESC LIMIT 6", &[])
        .await?;
    outln!(
        "  {:<12} {:<10} {:>7} {:>7} {:>10} {:>10}",
        "time",
        "daemon",
        "pid",
        "cpu%",
        "rss MiB",
        "records/s"
    );
    for r in &rows {
        let ts: chrono::DateTime<Utc> = r.get(0);
        let daemon: String = r.get(1);
        let pid: Option<i32> = r.get(2);
        let cpu: Option<f64> = r.get(3);
        let rss: Option<i64> = r.get(4);
        let rps: Option<f64> = r.get(5);
        outln!(
            "  {:<12} {:<10} {:>7} {:>7} {:>10} {:>10}",
            ts.format("%H:%M:%S"),
            daemon,
            pid.map_or("-".into(), |p| p.to_string()),
            cpu.map_or("-".into(), |c| format!("{c:.1}")),
            rss.map_or("-".into(), |b| format!("{:.1}", b as f64 / 1_048_576.0)),
            rps.map_or("-".into(), |v| format!("{v:.1}")),
        );
    }
    Ok(())
}

/// The simulated pipeline daemon: writes structlog-style JSON lines as a real one would.
pub fn run_daemon(args: DaemonArgs) -> anyhow::Result<Code> {
    std::fs::write(
        args.dir.join("clusterer.pid"),
        format!("{}\n", std::process::id()),
    )?;
    let log_path = args.dir.join("logs").join("clusterer.jsonl");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let unit = args.length.as_secs_f64() / 16.0;
    let mut emit = |level: &str, event: &str, extra: serde_json::Value| -> anyhow::Result<()> {
        let mut obj = serde_json::json!({
            "timestamp": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "level": level,
            "logger": "geo.clusterer",
            "event": event,
        });
        if let (Some(o), serde_json::Value::Object(e)) = (obj.as_object_mut(), extra) {
            o.extend(e);
        }
        writeln!(log, "{obj}")?;
        Ok(())
    };
    let busy = |d: Duration| {
        // Burn CPU for part of the time, so metrics have something to show.
        let end = Instant::now() + d / 2;
        let mut x: u64 = 1;
        while Instant::now() < end {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        }
        std::hint::black_box(x);
        std::thread::sleep(d / 2);
    };
    let step = |n: f64| Duration::from_secs_f64(unit * n);
    use serde_json::json;
    emit(
        "info",
        "clusterer starting",
        json!({"node_id": "main", "version": "2.3.1"}),
    )?;
    emit(
        "info",
        "pipeline started",
        json!({"progress": {"node_id": "pipeline", "level": "pipeline", "name": "Geo clustering", "status": "running"}}),
    )?;
    emit("info", "=== Stage: loading ===", json!({}))?;
    for i in 0..=5 {
        emit(
            "info",
            &format!("loaded chunk {i}/5"),
            json!({"node_id": "loader", "progress": {"node_id": "load", "parent_node_id": "pipeline", "level": "phase", "name": "Load tiles", "status": if i == 5 {"completed"} else {"running"}, "items_done": i, "items_total": 5}, "metrics": {"rows_loaded": i * 10_000}}),
        )?;
        busy(step(0.5));
    }
    emit("info", "=== Stage: clustering ===", json!({}))?;
    emit(
        "info",
        "clustering started",
        json!({"progress": {"node_id": "clustering", "parent_node_id": "pipeline", "level": "phase", "name": "Clustering", "status": "running"}}),
    )?;
    for i in (0..=120).step_by(10) {
        emit(
            "info",
            &format!("Processed {i}/200 tiles"),
            json!({"node_id": "worker-1"}),
        )?;
        if i == 60 {
            emit(
                "error",
                "tile 61 failed: invalid geometry",
                json!({"node_id": "worker-1", "exception": "Traceback (most recent call last):\n  File \"clusterer/tiles.py\", line 88, in process_tile\n    poly = make_polygon(points)\n  File \"clusterer/geometry.py\", line 21, in make_polygon\n    raise ValueError(\"self-intersecting ring\")\nValueError: self-intersecting ring"}),
            )?;
        }
        busy(step(0.5));
    }
    // The hang: alive, silent, idle.
    std::thread::sleep(step(6.0));
    emit(
        "warning",
        "MemoryError while merging clusters; retrying with smaller chunks",
        json!({"node_id": "worker-1"}),
    )?;
    for i in (130..=200).step_by(10) {
        emit(
            "info",
            &format!("Processed {i}/200 tiles"),
            json!({"node_id": "worker-1"}),
        )?;
        busy(step(0.2));
    }
    emit(
        "info",
        "clustering done",
        json!({"progress": {"node_id": "tiles", "status": "completed"}}),
    )?;
    emit(
        "info",
        "clustering finished",
        json!({"progress": {"node_id": "clustering", "status": "completed"}}),
    )?;
    emit("info", "=== Stage: export ===", json!({}))?;
    emit(
        "info",
        "export started",
        json!({"progress": {"node_id": "export", "parent_node_id": "pipeline", "level": "phase", "name": "Export", "status": "running", "percent": 0}}),
    )?;
    busy(step(0.5));
    emit(
        "info",
        "export finished",
        json!({"event_type": "export_written", "details": {"rows": 200}, "progress": {"node_id": "export", "status": "completed", "percent": 100}}),
    )?;
    // Stay alive (as a daemon does) until stopped.
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}
