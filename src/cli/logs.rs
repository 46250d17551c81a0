//! `pipewatch logs`: an experiment's log records through `get_experiment_logs`, as readable
//! columns on a terminal or JSON lines when piped (or with `--json`); `--follow` streams new
//! rows as they are committed.

use super::out::stdout_error;
use super::render::paint;
use super::Context;
use crate::db::typed::p;
use crate::exit::{usage, Code};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use std::io::{IsTerminal, Write};
use std::time::Duration;
use tokio_postgres::Row;
use uuid::Uuid;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Experiment id or name
    #[arg(long, short)]
    pub experiment: String,
    /// Minimum level: DEBUG, INFO, WARNING, ERROR, CRITICAL
    #[arg(long, short)]
    pub level: Option<String>,
    /// Case-insensitive text to find in the message or traceback
    #[arg(long, short)]
    pub search: Option<String>,
    /// Only records newer than this (e.g. 90s, 1h, 2d)
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<Duration>,
    /// Only this node
    #[arg(long)]
    pub node: Option<String>,
    /// At most this many records
    #[arg(long, default_value_t = 100)]
    pub limit: i32,
    /// Keep printing new records as they arrive (Ctrl-C to stop)
    #[arg(long, short)]
    pub follow: bool,
    /// JSON lines (the default when stdout is not a terminal)
    #[arg(long)]
    pub json: bool,
}

const COLUMNS: &str = "id, ts, level, message, logger, experiment_id, node_id, stage, context, \
                       traceback, metrics, host, daemon, source, ingested_at";

pub async fn execute(args: Args, ctx: &Context) -> anyhow::Result<Code> {
    if let Some(l) = &args.level {
        if crate::model::Level::from_db(l).is_none() {
            return Err(usage(format!(
                "--level {l:?} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
            )));
        }
    }
    if args.limit < 1 {
        return Err(usage("--limit must be at least 1"));
    }
    let client = ctx.connect().await?;
    let experiment = super::experiment_arg(&client, &args.experiment).await?;
    let json_out = args.json || !std::io::stdout().is_terminal();
    let color = !json_out && super::out::color_stdout();
    let since = args.since.map(super::since_cutoff);
    let level = args.level.as_ref().map(|l| l.to_ascii_uppercase());
    let newest: i64 = if args.follow {
        client
            .query_typed_one(
                "SELECT coalesce(max(id), 0) FROM pipeline_logs WHERE experiment_id = $1",
                &[p(&experiment)],
            )
            .await?
            .get(0)
    } else {
        0
    };
    let rows = client
        .query_typed(
            &format!(
                "SELECT {COLUMNS} FROM get_experiment_logs($1, p_level := $2, p_search := $3, \
                 p_limit := $4, p_since := $5, p_node_id := $6)"
            ),
            &[
                p(&experiment),
                p(&level),
                p(&args.search),
                p(&args.limit),
                p(&since),
                p(&args.node),
            ],
        )
        .await?;
    let mut out = std::io::stdout().lock();
    let mut last_id: i64 = 0;
    // Newest first from the function; print oldest first, like a log.
    for r in rows.iter().rev() {
        last_id = last_id.max(r.get::<_, i64>("id"));
        print_row(&mut out, r, json_out, color).map_err(stdout_error)?;
    }
    // Said to a person only: JSON output stays empty, so `| jq` sees no records.
    if rows.is_empty() && !json_out {
        let text = if args.follow {
            "no records yet; waiting for new ones (Ctrl-C to stop)"
        } else {
            "no records"
        };
        writeln!(out, "{text}").map_err(stdout_error)?;
    }
    out.flush().map_err(stdout_error)?;
    drop(out);
    if !args.follow {
        return Ok(Code::Success);
    }
    // Follow from the newest row there was before the first query (whatever the filters
    // showed), or the newest printed if one arrived in between: nothing twice, nothing missed.
    last_id = last_id.max(newest);
    follow(&client, experiment, &args, level, last_id, json_out, color).await
}

async fn follow(
    client: &tokio_postgres::Client,
    experiment: Uuid,
    args: &Args,
    level: Option<String>,
    mut last_id: i64,
    json_out: bool,
    color: bool,
) -> anyhow::Result<Code> {
    let search = args.search.as_ref().map(|s| crate::cli::like_pattern(s));
    let query = format!(
        "SELECT {COLUMNS} FROM pipeline_logs WHERE experiment_id = $1 AND id > $2 \
         AND ($3::text IS NULL OR pipewatch_level_rank(level) >= pipewatch_level_rank($3)) \
         AND ($4::text IS NULL OR message ILIKE $4 OR traceback ILIKE $4) \
         AND ($5::text IS NULL OR node_id = $5) ORDER BY id LIMIT 1000"
    );
    let mut stop = super::StopSignals::new()?;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.recv() => return Ok(Code::Success),
        }
        let rows = client
            .query_typed(
                &query,
                &[
                    p(&experiment),
                    p(&last_id),
                    p(&level),
                    p(&search),
                    p(&args.node),
                ],
            )
            .await?;
        let mut out = std::io::stdout().lock();
        for r in &rows {
            last_id = last_id.max(r.get::<_, i64>("id"));
            if print_row(&mut out, r, json_out, color).is_err() {
                // The reader went away (broken pipe): a normal end for a follower.
                return Ok(Code::Success);
            }
        }
        if out.flush().is_err() {
            return Ok(Code::Success);
        }
    }
}

fn print_row(out: &mut impl Write, r: &Row, json_out: bool, color: bool) -> std::io::Result<()> {
    let ts: DateTime<Utc> = r.get("ts");
    let level: String = r.get("level");
    let message: String = r.get("message");
    let node: Option<String> = r.get("node_id");
    let stage: Option<String> = r.get("stage");
    let traceback: Option<String> = r.get("traceback");
    if json_out {
        let obj = json!({
            "id": r.get::<_, i64>("id"),
            "ts": ts.to_rfc3339(),
            "level": level,
            "message": message,
            "logger": r.get::<_, Option<String>>("logger"),
            "experiment_id": r.get::<_, Option<Uuid>>("experiment_id").map(|u| u.to_string()),
            "node_id": node,
            "stage": stage,
            "context": r.get::<_, Value>("context"),
            "traceback": traceback,
            "metrics": r.get::<_, Option<Value>>("metrics"),
            "host": r.get::<_, Option<String>>("host"),
            "daemon": r.get::<_, Option<String>>("daemon"),
            "source": r.get::<_, Option<String>>("source"),
        });
        return writeln!(out, "{obj}");
    }
    let lc = match level.as_str() {
        "CRITICAL" => "1;31",
        "ERROR" => "31",
        "WARNING" => "33",
        "DEBUG" => "2",
        _ => "32",
    };
    writeln!(
        out,
        "{} {} {} {}",
        paint(&ts.format("%Y-%m-%d %H:%M:%S%.3f").to_string(), "2", color),
        paint(&format!("{level:<8}"), lc, color),
        paint(
            &format!(
                "[{}{}]",
                node.as_deref().unwrap_or("-"),
                stage.map(|s| format!("/{s}")).unwrap_or_default()
            ),
            "36",
            color
        ),
        message
    )?;
    if let Some(tb) = traceback {
        for l in tb.lines() {
            writeln!(out, "    {l}")?;
        }
    }
    Ok(())
}
