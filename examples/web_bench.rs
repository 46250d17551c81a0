//! The web view's benchmark (issue 12): page latency on real volumes.
//!
//! Starts a throwaway PostgreSQL, migrates it, fills it server-side with `generate_series`
//! (10 million log rows over 30 days in 10 experiments, a month of 10-second metrics for the
//! measured experiment's 4 daemons, events, a progress tree, agents), then serves the web view
//! in this process and requests every page over loopback HTTP, printing p50/p95 per page and
//! the ratio to a static file served by the same server in the same run (the HTTP floor).
//!
//! Touches nothing but its own cluster and temp dir. Run with
//! `cargo run --release --example web_bench` (`--logs N` for a smaller fill).

use anyhow::{bail, Context as _};
use clap::Parser;
use pipewatch::db::throwaway::Throwaway;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(name = "web_bench", about = "pipewatch web page latency")]
struct Opts {
    /// Log rows to generate (spread over 30 days and 10 experiments).
    #[arg(long, default_value_t = 10_000_000)]
    logs: i64,
    /// Requests per page (after 2 warm-up requests).
    #[arg(long, default_value_t = 40)]
    reps: usize,
    /// Keep the filled database until Ctrl-C (prints its URL), to look at query plans.
    #[arg(long)]
    keep: bool,
    /// Measure a database an earlier `--keep` run filled, instead of starting and filling one.
    #[arg(long, value_name = "URL")]
    reuse: Option<String>,
}

const EXPERIMENTS: i64 = 10;
const MAIN: &str = "5eed0000-0000-4000-8000-000000000000";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    let (pg, url) = match &o.reuse {
        Some(u) => (None, u.clone()),
        None => {
            eprintln!("starting a throwaway PostgreSQL …");
            let pg = tokio::task::spawn_blocking(Throwaway::new).await??;
            let url = pg.url("postgres");
            (Some(pg), url)
        }
    };
    let target = pipewatch::db::DbTarget::parse(&url, None, None)?;
    let mut client = pipewatch::db::connect(&target).await?;
    if o.reuse.is_none() {
        pipewatch::db::migrate::apply(&mut client).await?;
        fill(&client, o.logs).await?;
    }

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let state = Arc::new(pipewatch::web::AppState::new(
        target,
        pipewatch::web::Access::Loopback,
    ));
    tokio::spawn(pipewatch::web::serve(
        listener,
        state,
        std::future::pending(),
    ));

    let e = MAIN;
    let newest: i64 = client
        .query_one(
            "SELECT max(id) - 50 FROM pipeline_logs WHERE experiment_id = $1::text::uuid",
            &[&e],
        )
        .await?
        .get(0);
    let page2 = client
        .query_one(
            "SELECT ts::text, id FROM pipeline_logs WHERE experiment_id = $1::text::uuid \
             ORDER BY ts DESC, id DESC OFFSET 99 LIMIT 1",
            &[&e],
        )
        .await?;
    let (p2ts, p2id): (String, i64) = (page2.get(0), page2.get(1));
    let p2ts = chrono::DateTime::parse_from_str(&p2ts, "%Y-%m-%d %H:%M:%S%.f%#z")
        .map(|t| t.to_rfc3339())
        .unwrap_or(p2ts)
        .replace('+', "%2B");
    let pages: Vec<(&str, String)> = vec![
        ("static file (HTTP floor)", "/static/style.css".into()),
        ("experiments list", "/".into()),
        (
            "experiment (default: last 24 h)",
            format!("/experiments/{e}"),
        ),
        (
            "experiment, window 30d",
            format!("/experiments/{e}?window=30d"),
        ),
        (
            "charts fragment, 30d",
            format!("/experiments/{e}/charts?window=30d"),
        ),
        (
            "progress fragment (live)",
            format!("/experiments/{e}/progress"),
        ),
        ("logs, newest 100", format!("/logs?experiment={e}")),
        (
            "logs, page 2 (cursor)",
            format!("/logs?experiment={e}&before_ts={p2ts}&before_id={p2id}"),
        ),
        (
            "logs, level ERROR",
            format!("/logs?experiment={e}&level=ERROR"),
        ),
        (
            "logs, node + since 1h",
            format!("/logs?experiment={e}&node=worker-3&since=1h"),
        ),
        (
            "logs, search common word",
            format!("/logs?experiment={e}&search=tiles"),
        ),
        (
            "logs, follow (after id)",
            format!("/api/logs?experiment={e}&after_id={newest}"),
        ),
        ("agents", "/agents".into()),
        ("experiment JSON", format!("/api/experiments/{e}")),
    ];
    println!(
        "\n{:<34} {:>9} {:>9} {:>9}  (ms; {} requests each; ratio = p50 / HTTP floor p50)",
        "page", "p50", "p95", "ratio", o.reps
    );
    let mut floor = None;
    let mut worst: f64 = 0.0;
    for (name, path) in &pages {
        let mut times = Vec::with_capacity(o.reps);
        for i in 0..o.reps + 2 {
            let t = Instant::now();
            let (status, len) = get(addr, path).await?;
            if status != 200 {
                bail!("{path}: HTTP {status}");
            }
            if len == 0 {
                bail!("{path}: empty body");
            }
            if i >= 2 {
                times.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
        times.sort_by(f64::total_cmp);
        let p = |q: f64| times[((times.len() as f64 - 1.0) * q).round() as usize];
        let (p50, p95) = (p(0.5), p(0.95));
        let base = *floor.get_or_insert(p50);
        if floor.is_some() && *name != pages[0].0 {
            worst = worst.max(p95);
        }
        println!(
            "{name:<34} {p50:>9.1} {p95:>9.1} {:>8.0}×",
            p50 / base.max(0.001)
        );
    }
    println!(
        "\nworst page p95: {worst:.1} ms (target < 200 ms): {}",
        if worst < 200.0 { "PASS" } else { "FAIL" }
    );
    if o.keep {
        println!("database kept at {url}; Ctrl-C to stop");
        let _ = tokio::signal::ctrl_c().await;
    }
    drop(client);
    drop(pg);
    Ok(())
}

/// One GET over a new connection; the status and the body length.
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, usize)> {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || -> anyhow::Result<(u16, usize)> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        let text = String::from_utf8_lossy(&buf);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map_or(0, |(_, b)| b.len());
        Ok((status, body))
    })
    .await?
}

/// Fills the database server-side.
async fn fill(c: &tokio_postgres::Client, logs: i64) -> anyhow::Result<()> {
    let step = |what: &str| {
        eprint!("{what} … ");
        let _ = std::io::stderr().flush();
        Instant::now()
    };
    let done = |t: Instant| eprintln!("{:.1} s", t.elapsed().as_secs_f64());
    c.batch_execute(
        "SELECT pipewatch_ensure_partitions(now() - interval '31 days', now() + interval '1 day')",
    )
    .await
    .context("partitions")?;
    c.batch_execute(&format!(
        "INSERT INTO experiments (id, name) SELECT ('5eed0000-0000-4000-8000-' || lpad(i::text, 12, '0'))::uuid, \
         'bench-' || i FROM generate_series(0, {}) i ON CONFLICT DO NOTHING",
        EXPERIMENTS - 1
    ))
    .await?;
    let chunk = 1_000_000i64;
    let mut from = 0i64;
    while from < logs {
        let to = (from + chunk).min(logs);
        let t = step(&format!("log rows {from}..{to} of {logs}"));
        // Spread evenly over 30 days, newest at now; experiment = i mod 10.
        c.batch_execute(&format!(
            "INSERT INTO pipeline_logs (ts, level, message, logger, experiment_id, node_id, stage, \
                 context, traceback, host, daemon, source) \
             SELECT now() - ((i::float8 / {logs}) * interval '30 days'), \
                    CASE WHEN i % 997 = 0 THEN 'ERROR' WHEN i % 101 = 0 THEN 'WARNING' \
                         WHEN i % 7 = 0 THEN 'DEBUG' ELSE 'INFO' END, \
                    CASE WHEN i % 997 = 0 THEN 'tile ' || (i % 13) || ' failed: invalid geometry' \
                         ELSE 'Processed ' || i || ' tiles in chunk ' || (i % 1000) END, \
                    'geo.clusterer', \
                    ('5eed0000-0000-4000-8000-' || lpad((i % {EXPERIMENTS})::text, 12, '0'))::uuid, \
                    'worker-' || (i % 8), 'clustering', \
                    jsonb_build_object('chunk', i % 1000), \
                    CASE WHEN i % 997 = 0 THEN 'Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: ring' END, \
                    'host-' || (i % 4), 'daemon-' || (i % 4), '/var/log/geo/clusterer.jsonl' \
               FROM generate_series({from}, {} ) i",
            to - 1
        ))
        .await
        .context("log rows")?;
        done(t);
        from = to;
    }
    let t = step("a month of metrics for 4 daemons (10 s)");
    c.batch_execute(&format!(
        "INSERT INTO pipeline_metrics (ts, experiment_id, host, daemon, pid, cpu_percent, memory_rss_bytes, \
             memory_percent, disk_read_bytes_per_sec, disk_write_bytes_per_sec, disk_used_percent, records_per_sec, custom) \
         SELECT now() - s * interval '10 seconds', '{MAIN}', 'host-' || d, 'daemon-' || d, 1000 + d, \
                50 + 40 * sin(s / 300.0 + d), 500e6 + 1e6 * (s % 5000) + d * 1e8, 10, \
                1e6 * (1 + cos(s / 100.0)), 2e6 * (1 + sin(s / 70.0)), 40, 200 + 100 * sin(s / 500.0), '{{}}' \
           FROM generate_series(0, 30 * 8640) s, generate_series(0, 3) d"
    ))
    .await
    .context("metrics")?;
    done(t);
    let t = step("events, progress, agents");
    c.batch_execute(&format!(
        "INSERT INTO pipeline_events (ts, experiment_id, event_type, severity, message, details, host, daemon) \
         SELECT now() - s * interval '1 hour', '{MAIN}', \
                (ARRAY['daemon_stalled','daemon_recovered','daemon_restarted','out_of_memory','daemon_exited'])[1 + s % 5], \
                'WARNING', 'event ' || s, '{{}}', 'host-' || (s % 4), 'daemon-' || (s % 4) \
           FROM generate_series(0, 720) s;
         INSERT INTO pipeline_progress (experiment_id, node_id, parent_node_id, level, name, status, progress_percent, updated_at) \
         SELECT '{MAIN}', 'root', NULL, 'pipeline', 'Geo clustering', 'running', 0, now();
         INSERT INTO pipeline_progress (experiment_id, node_id, parent_node_id, level, name, status, progress_percent, items_done, items_total, updated_at) \
         SELECT '{MAIN}', 'phase-' || p, 'root', 'phase', 'Phase ' || p, 'running', 0, 0, 0, now() FROM generate_series(1, 5) p;
         INSERT INTO pipeline_progress (experiment_id, node_id, parent_node_id, level, name, status, progress_percent, items_done, items_total, updated_at) \
         SELECT '{MAIN}', 'step-' || p || '-' || s, 'phase-' || p, 'step', 'Step ' || s, \
                CASE WHEN s < 4 THEN 'completed' ELSE 'running' END, least(100, s * 12), s * 12, 100, now() \
           FROM generate_series(1, 5) p, generate_series(1, 8) s;
         INSERT INTO pipewatch_agents (agent_id, host, daemons, version, started_at, last_commit_at, records_shipped) \
         SELECT 'host-' || h || '/daemon-' || h, 'host-' || h, ARRAY['daemon-' || h], '0.1.0', now() - interval '30 days', now(), {logs} / 4 \
           FROM generate_series(0, 3) h;"
    ))
    .await
    .context("events, progress, agents")?;
    // As autovacuum would have by then on a real month of data.
    c.batch_execute("VACUUM ANALYZE").await.context("vacuum")?;
    done(t);
    Ok(())
}
