//! `pipewatch errors`: which errors, how often, where, first and last seen, and one traceback —
//! from `get_error_summary` for one experiment, or grouped over `recent_experiment_errors`.

use super::out::outln;
use super::render::paint;
use super::Context;
use crate::db::typed::p;
use crate::exit::Code;
use chrono::{DateTime, Utc};
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Experiment id or name (default: every experiment)
    #[arg(long, short)]
    pub experiment: Option<String>,
    /// Only errors newer than this
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub since: Duration,
    /// At most this many groups
    #[arg(long, default_value_t = 20)]
    pub limit: i64,
}

pub async fn execute(args: Args, ctx: &Context) -> anyhow::Result<Code> {
    let client = ctx.connect().await?;
    let color = super::out::color_stdout();
    let since = super::since_cutoff(args.since);
    let experiment = match &args.experiment {
        Some(e) => Some(super::experiment_arg(&client, e).await?),
        None => None,
    };
    let rows = match experiment {
        Some(exp) => {
            // Shown as plain `errors` shows it: by name where the experiment has one.
            let label = crate::db::queries::experiment_name(&client, exp)
                .await?
                .unwrap_or_else(|| exp.to_string());
            client
                .query_typed(
                    "SELECT message, count, first_seen, last_seen, nodes, sample_traceback, \
                     max_level, $2::text FROM get_error_summary($1, $3) LIMIT $4", &[p(&exp), p(&label), p(&since), p(&args.limit)])
                .await?
        }
        None => {
            client
                .query_typed(
                    "SELECT message, count(*), min(ts), max(ts), \
                     coalesce(array_agg(DISTINCT node_id) FILTER (WHERE node_id IS NOT NULL), '{}'), \
                     (array_agg(traceback ORDER BY ts DESC) FILTER (WHERE traceback IS NOT NULL))[1], \
                     max(level), \
                     coalesce(max(experiment_name), max(experiment_id::text), '-') \
                     FROM recent_experiment_errors WHERE ts >= $1 \
                     GROUP BY message ORDER BY count(*) DESC, max(ts) DESC LIMIT $2", &[p(&since), p(&args.limit)])
                .await?
        }
    };
    // Hung daemons are errors too: their diagnosed stalls, with the verdict line.
    let stalls = super::why::verdict_lines(&client, experiment, since, args.limit).await?;
    if rows.is_empty() && stalls.is_empty() {
        outln!("no errors since {}", since.format("%Y-%m-%d %H:%M:%S UTC"));
        return Ok(Code::Success);
    }
    if !stalls.is_empty() {
        outln!(
            "{}",
            paint(
                "stalled daemons (pipewatch why --experiment E for more):",
                "1",
                color
            )
        );
        for l in &stalls {
            outln!("  {l}");
        }
    }
    for r in &rows {
        let message: String = r.get(0);
        let count: i64 = r.get(1);
        let first: DateTime<Utc> = r.get(2);
        let last: DateTime<Utc> = r.get(3);
        let nodes: Vec<String> = r.get(4);
        let traceback: Option<String> = r.get(5);
        let level: String = r.get(6);
        let exp: String = r.get(7);
        outln!(
            "{} {} {}",
            paint(&format!("{count:>5}×"), "1", color),
            paint(&format!("{level:<8}"), "31", color),
            message
        );
        outln!(
            "       first {}  last {}  nodes {}  experiment {}",
            first.format("%Y-%m-%d %H:%M:%S"),
            last.format("%Y-%m-%d %H:%M:%S"),
            if nodes.is_empty() {
                "-".to_string()
            } else {
                nodes.join(",")
            },
            exp
        );
        if let Some(tb) = traceback {
            for l in tb.lines() {
                outln!("         {}", paint(l, "2", color));
            }
        }
    }
    Ok(Code::Success)
}
