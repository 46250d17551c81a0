//! `pipewatch cleanup`: apply retention with the exact age asked for — whole daily partitions
//! dropped where they lie entirely before the cut-off, rows deleted from the rest
//! (`pipewatch_cleanup_before`); `--dry-run` only counts what would go.

use super::out::outln;
use super::Context;
use crate::db::typed::p;
use crate::exit::{usage, Code};
use chrono::{DateTime, Utc};
use std::time::Duration;

/// The shortest age `cleanup` (and `[retention]`) accepts: a typo such as `30m` for `30d`
/// must not empty the tables.
pub const MIN_AGE: Duration = Duration::from_secs(86_400);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Delete log, event and metric rows older than this age, exactly (e.g. 36h, 30d; at
    /// least 1d)
    #[arg(long, value_parser = humantime::parse_duration)]
    pub older_than: Duration,
    /// Only count what would be deleted
    #[arg(long)]
    pub dry_run: bool,
}

/// Checks a retention age: at least [`MIN_AGE`], and representable.
pub fn check_age(d: Duration) -> anyhow::Result<f64> {
    if d < MIN_AGE {
        return Err(usage(format!(
            "--older-than {} is shorter than a day; retention keeps at least 1d",
            humantime::format_duration(d)
        )));
    }
    if d.as_secs() > 100 * 366 * 86_400 {
        return Err(usage("--older-than is too long (at most 100 years)"));
    }
    Ok(d.as_secs_f64())
}

pub async fn execute(args: Args, ctx: &Context) -> anyhow::Result<Code> {
    let seconds = check_age(args.older_than)?;
    let client = ctx.connect().await?;
    // One cut-off from the server's clock, used for the counts and the deletion alike.
    let cutoff: DateTime<Utc> = client
        .query_typed_one(
            "SELECT now() - make_interval(secs => $1::float8)",
            &[p(&seconds)],
        )
        .await?
        .get(0);
    let age = humantime::format_duration(args.older_than);
    let shown = cutoff.format("%Y-%m-%d %H:%M:%S%.6f UTC");
    if args.dry_run {
        let mut total = 0i64;
        for table in ["pipeline_logs", "pipeline_events", "pipeline_metrics"] {
            let n: i64 = client
                .query_typed_one(
                    &format!("SELECT count(*) FROM {table} WHERE ts < $1"),
                    &[p(&cutoff)],
                )
                .await?
                .get(0);
            outln!("{table:<17} {n:>12} rows older than {shown}");
            total += n;
        }
        outln!("dry run: {total} rows would be deleted; nothing was changed");
        return Ok(Code::Success);
    }
    let n: i64 = client
        .query_typed_one("SELECT pipewatch_cleanup_before($1)::int8", &[p(&cutoff)])
        .await?
        .get(0);
    outln!("deleted {n} log, event and metric rows older than {age} (before {shown})");
    Ok(Code::Success)
}
