//! `pipewatch why`: what a daemon is doing. `why DAEMON` takes a live diagnosis on this host
//! (the config says how to find the daemon's process; no database); `why --experiment E`
//! shows the last diagnosis stored for that experiment's daemons (`daemon_stalled`, and what
//! is known of a `daemon_exited`). Both print the same rendering, or JSON with `--json`.

use super::out::outln;
use super::render::paint;
use super::Context;
use crate::agent::metrics::process;
use crate::db::typed::p;
use crate::diagnose::{self, Options};
use crate::exit::{usage, Code};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The daemon (its name in the config) to diagnose live on this host
    #[arg(required_unless_present = "experiment", conflicts_with = "experiment")]
    pub daemon: Option<String>,
    /// Show the last diagnosis stored for this experiment's daemons (id or name)
    #[arg(long, short)]
    pub experiment: Option<String>,
    /// Print JSON (an array: one object per process, or per daemon with --experiment)
    #[arg(long)]
    pub json: bool,
    /// How long CPU is measured per thread for a live diagnosis
    #[arg(long, default_value = "1s", value_parser = super::interval_arg)]
    pub window: Duration,
}

pub async fn execute(args: Args, ctx: &Context) -> anyhow::Result<Code> {
    match (&args.daemon, &args.experiment) {
        (Some(d), _) => live(d, &args, ctx).await,
        (None, Some(e)) => stored(e, &args, ctx).await,
        (None, None) => Err(usage("give a DAEMON name or --experiment E")),
    }
}

/// The most processes of one daemon diagnosed live (a broad `process_match` can match many).
const MAX_PROCESSES: usize = 16;

/// Whether `pid` is a kernel thread (`PF_KTHREAD` in the flags of `/proc/PID/stat`).
pub fn kernel_thread(pid: u32) -> bool {
    const PF_KTHREAD: u64 = 0x0020_0000;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| {
            // After the command name (which may hold spaces and parentheses): state, ppid,
            // pgrp, session, tty_nr, tpgid, flags.
            let (_, rest) = t.rsplit_once(')')?;
            rest.split_whitespace().nth(6)?.parse::<u64>().ok()
        })
        .is_some_and(|flags| flags & PF_KTHREAD != 0)
}

/// The daemon's root processes now, and how they were found (for the "not running" line).
fn find(cfg: &crate::config::resolve::DaemonConfig) -> anyhow::Result<(Vec<u32>, String)> {
    let alive = |pid: u32| std::path::Path::new(&format!("/proc/{pid}")).exists();
    let mut how = Vec::new();
    if let Some(path) = &cfg.pid_file {
        match process::read_pid_file(path) {
            // A stale pid file's number can be reused by a kernel thread after a reboot.
            Ok(pid) if alive(pid) && kernel_thread(pid) => how.push(format!(
                "its pid file {} names pid {pid}, which is a kernel thread, not the daemon \
                 (a stale pid file?)",
                path.display()
            )),
            Ok(pid) if alive(pid) => return Ok((vec![pid], String::new())),
            Ok(pid) => how.push(format!(
                "its pid file {} names pid {pid}, which is not running",
                path.display()
            )),
            Err(e) => how.push(format!("{e} ({})", path.display())),
        }
    }
    if let Some(re) = &cfg.process_match {
        let pids = process::match_processes(re);
        if !pids.is_empty() {
            return Ok((pids, String::new()));
        }
        how.push(format!("no process matches {:?}", re.as_str()));
    }
    if how.is_empty() {
        anyhow::bail!(
            "daemon {} has neither pid_file nor process_match in the config: pipewatch cannot find its process",
            cfg.name
        );
    }
    Ok((Vec::new(), how.join("; ")))
}

async fn live(name: &str, args: &Args, ctx: &Context) -> anyhow::Result<Code> {
    let config = ctx.load_config()?;
    let Some(cfg) = config.daemons.iter().find(|d| d.name == name).cloned() else {
        let names: Vec<&str> = config.daemons.iter().map(|d| d.name.as_str()).collect();
        let hint = crate::suggest::suggest(name, &names)
            .map(|s| format!(" (did you mean {s:?}?)"))
            .unwrap_or_default();
        anyhow::bail!(
            "no daemon {name:?} in {}{hint}; daemons: {}",
            ctx.config_path.display(),
            names.join(", ")
        );
    };
    let (mut pids, how) = find(&cfg)?;
    if pids.len() > MAX_PROCESSES {
        tracing::warn!(
            "{} processes match daemon {name}; diagnosing the first {MAX_PROCESSES} (by pid)",
            pids.len()
        );
        pids.truncate(MAX_PROCESSES);
    }
    if pids.is_empty() {
        if args.json {
            outln!("[]");
        }
        anyhow::bail!("daemon {name} is not running: {how}");
    }
    let window = args.window;
    let stack_dump = cfg.stack_dump.clone();
    // All processes are looked at together: each look measures CPU over `window`.
    let diagnoses = tokio::task::spawn_blocking(move || {
        std::thread::scope(|scope| {
            let looks: Vec<_> = pids
                .iter()
                .map(|pid| {
                    let opts = Options {
                        window,
                        cpu_percent: None,
                        stack_dump: stack_dump.clone(),
                        silence: None,
                    };
                    scope.spawn(move || diagnose::take(*pid, &opts))
                })
                .collect();
            looks
                .into_iter()
                .filter_map(|h| h.join().ok().flatten())
                .collect::<Vec<_>>()
        })
    })
    .await?;
    if diagnoses.is_empty() {
        anyhow::bail!("daemon {name} exited while being looked at");
    }
    let items: Vec<Value> = diagnoses
        .into_iter()
        .map(|d| {
            let mut j = d.json;
            j["daemon"] = json!(name);
            j
        })
        .collect();
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&items)?);
        return Ok(Code::Success);
    }
    let color = super::out::color_stdout();
    for j in &items {
        render(name, j, color)?;
    }
    Ok(Code::Success)
}

async fn stored(experiment: &str, args: &Args, ctx: &Context) -> anyhow::Result<Code> {
    let client = ctx.connect().await?;
    let exp = super::experiment_arg(&client, experiment).await?;
    let rows = client
        .query_typed(
            "SELECT DISTINCT ON (e.host, e.daemon) e.ts, e.host, e.daemon, e.event_type, \
             coalesce(e.message, ''), e.details, \
             (SELECT min(r.ts) FROM pipeline_events r WHERE r.event_type = 'daemon_recovered' \
                AND r.host = e.host AND r.daemon = e.daemon AND r.ts >= e.ts \
                AND r.details->>'recovered_from' = 'daemon_stalled') \
             FROM pipeline_events e \
             WHERE e.experiment_id = $1 AND ((e.event_type = 'daemon_stalled' AND e.details ? 'diagnosis') \
                OR e.event_type = 'daemon_exited') \
             ORDER BY e.host, e.daemon, e.ts DESC, e.id DESC",
            &[p(&exp)],
        )
        .await?;
    let items: Vec<Value> = rows
        .iter()
        .map(|r| {
            let ts: DateTime<Utc> = r.get(0);
            let recovered: Option<DateTime<Utc>> = r.get(6);
            json!({
                "ts": ts.to_rfc3339(),
                // Events need not come from an agent: host and daemon may be missing.
                "host": r.get::<_, Option<String>>(1),
                "daemon": r.get::<_, Option<String>>(2),
                "event_type": r.get::<_, String>(3),
                "message": r.get::<_, String>(4),
                "details": r.get::<_, Value>(5),
                "recovered_at": recovered.map(|t| t.to_rfc3339()),
            })
        })
        .collect();
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&items)?);
        return Ok(Code::Success);
    }
    if items.is_empty() {
        outln!("no diagnosis stored for experiment {experiment}: none of its daemons stalled or exited");
        return Ok(Code::Success);
    }
    let color = super::out::color_stdout();
    for it in &items {
        let daemon = it["daemon"].as_str().unwrap_or("?");
        let when = it["ts"].as_str().unwrap_or("");
        let recovered = it["recovered_at"]
            .as_str()
            .map(|t| format!(" — recovered at {t}"))
            .unwrap_or_default();
        outln!(
            "{} on {} at {when}{recovered}",
            paint(it["event_type"].as_str().unwrap_or(""), "1", color),
            it["host"].as_str().unwrap_or("?")
        );
        let details = &it["details"];
        if details.get("diagnosis").is_some() {
            render(daemon, &details["diagnosis"], color)?;
        } else {
            outln!("{daemon}: {}", it["message"].as_str().unwrap_or(""));
            if let Some(lines) = details["last_lines"].as_array().filter(|l| !l.is_empty()) {
                outln!("  last lines:");
                for l in lines.iter().rev().take(10).rev() {
                    outln!("    {}", l.as_str().unwrap_or(""));
                }
            }
        }
        outln!("");
    }
    Ok(Code::Success)
}

fn mib(b: &Value) -> String {
    b.as_u64()
        .map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / 1_048_576.0))
}

/// Prints one diagnosis (the JSON the agent stores, or a live one).
fn render(daemon: &str, d: &Value, color: bool) -> anyhow::Result<()> {
    let p = &d["process"];
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    outln!(
        "{daemon} (pid {}, {}): {}",
        p["pid"],
        s(&p["command"]),
        paint(&s(&d["kind"]), "1;33", color)
    );
    outln!("  {}", s(&d["verdict"]));
    let threads = p["threads"].as_array().cloned().unwrap_or_default();
    outln!(
        "  cpu {} over {}s · rss {} · {} descriptors · {} thread(s)",
        p["cpu_percent"]
            .as_f64()
            .map_or("-".into(), |c| format!("{c:.1}%")),
        d["cpu_window_secs"].as_f64().unwrap_or(0.0),
        mib(&p["rss_bytes"]),
        p["fd_total"],
        p["thread_total"].as_u64().unwrap_or(threads.len() as u64)
    );
    if let Some(sil) = d.get("silence") {
        outln!(
            "  during the silence ({}s{}): cpu {}s, read {} B, written {} B, rss {} → {} ({})",
            sil["secs"],
            if sil["busy"] == true { ", busy" } else { "" },
            sil["cpu_seconds"],
            sil["read_bytes"],
            sil["write_bytes"],
            mib(&sil["rss_bytes_then"]),
            mib(&sil["rss_bytes_now"]),
            s(&sil["rss_trend"])
        );
    }
    outln!("  threads:");
    for t in threads.iter().take(32) {
        let fd = t["fd_target"]
            .as_str()
            .map(|f| format!(" → {f}"))
            .unwrap_or_default();
        let wchan = t["wchan"]
            .as_str()
            .map(|w| format!(" [{w}]"))
            .unwrap_or_default();
        outln!(
            "    {:>7} {:<16} {} {}{fd}{wchan}",
            t["tid"],
            s(&t["name"]),
            s(&t["state"]),
            s(&t["syscall"]),
        );
    }
    // Of all the threads (the diagnosis holds at most 256 of them), not just of those listed.
    let thread_total = p["thread_total"]
        .as_u64()
        .map_or(threads.len(), |n| n as usize);
    if thread_total > 32 {
        outln!("    … {} more", thread_total - threads.len().min(32));
    }
    if let Some(fds) = p["fds"].as_array().filter(|f| !f.is_empty()) {
        outln!("  descriptors:");
        for f in fds.iter().take(24) {
            let target = s(&f["target"]);
            let suffix = format!(" (fd {})", f["fd"]);
            outln!(
                "    {:>4} {}",
                f["fd"],
                target.strip_suffix(&suffix).unwrap_or(&target)
            );
        }
        let fd_total = p["fd_total"]
            .as_u64()
            .map_or(fds.len(), |n| n as usize)
            .max(fds.len());
        if fd_total > 24 {
            outln!("    … {} more", fd_total - 24);
        }
    }
    render_children(p, 1)?;
    if let Some(stacks) = d["stacks"].as_array() {
        for st in stacks {
            outln!("  stack dump of pid {}:", st["pid"]);
            let text = st["output"]
                .as_str()
                .or_else(|| st["error"].as_str())
                .unwrap_or("");
            for l in text.lines() {
                outln!("    {l}");
            }
        }
    }
    Ok(())
}

fn render_children(p: &Value, depth: usize) -> anyhow::Result<()> {
    let Some(kids) = p["children"].as_array().filter(|k| !k.is_empty()) else {
        return Ok(());
    };
    if depth == 1 {
        outln!("  children:");
    }
    for k in kids {
        outln!(
            "  {}{} {} {}: {}",
            "  ".repeat(depth),
            k["pid"],
            k["command"].as_str().unwrap_or(""),
            k["kind"].as_str().unwrap_or(""),
            k["verdict"].as_str().unwrap_or("")
        );
        render_children(k, depth + 1)?;
    }
    Ok(())
}

/// One line per daemon stall with a diagnosis since `since` (of one experiment, or all):
/// `time host/daemon kind: verdict`, newest first, at most `limit`. For `pipewatch errors`.
pub async fn verdict_lines(
    client: &tokio_postgres::Client,
    experiment: Option<uuid::Uuid>,
    since: DateTime<Utc>,
    limit: i64,
) -> anyhow::Result<Vec<String>> {
    let rows = client
        .query_typed(
            "SELECT ts, host, daemon, details->'diagnosis'->>'kind', details->'diagnosis'->>'verdict' \
             FROM pipeline_events WHERE event_type = 'daemon_stalled' AND details ? 'diagnosis' \
             AND ts >= $1 AND ($2::uuid IS NULL OR experiment_id = $2) \
             ORDER BY ts DESC, id DESC LIMIT $3",
            &[p(&since), p(&experiment), p(&limit)],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let ts: DateTime<Utc> = r.get(0);
            format!(
                "{} {}/{} {}: {}",
                ts.format("%Y-%m-%d %H:%M:%S"),
                r.get::<_, Option<String>>(1).unwrap_or_else(|| "?".into()),
                r.get::<_, Option<String>>(2).unwrap_or_else(|| "?".into()),
                r.get::<_, Option<String>>(3).unwrap_or_default(),
                r.get::<_, Option<String>>(4).unwrap_or_default()
            )
        })
        .collect())
}
