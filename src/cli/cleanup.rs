//! `pipewatch cleanup`: apply retention with `cleanup_old_logs` (whole partitions dropped where
//! possible); `--dry-run` only counts what would go.

use super::Context;
use crate::exit::{usage, Code};
use chrono::Utc;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Delete log, event and metric rows older than this (whole days, e.g. 30d)
    #[arg(long, value_parser = humantime::parse_duration)]
    pub older_than: Duration,
    /// Only count what would be deleted
    #[arg(long)]
    pub dry_run: bool,
}

/// Whole days of a retention duration (at least one).
pub fn days(d: Duration) -> anyhow::Result<i32> {
    let days = d.as_secs() / 86_400;
    if days < 1 {
        return Err(usage(format!(
            "--older-than {} is shorter than a day; retention works in whole days",
            humantime::format_duration(d)
        )));
    }
    i32::try_from(days).map_err(|_| usage("--older-than is too long"))
}

pub async fn execute(args: Args, ctx: &Context) -> anyhow::Result<Code> {
    let days = days(args.older_than)?;
    let client = ctx.connect().await?;
    let cutoff = Utc::now() - chrono::Duration::days(i64::from(days));
    if args.dry_run {
        let mut total = 0i64;
        for table in ["pipeline_logs", "pipeline_events", "pipeline_metrics"] {
            let n: i64 = client
                .query_one(
                    &format!("SELECT count(*) FROM {table} WHERE ts < $1"),
                    &[&cutoff],
                )
                .await?
                .get(0);
            println!(
                "{table:<17} {n:>12} rows older than {}",
                cutoff.format("%Y-%m-%d %H:%M UTC")
            );
            total += n;
        }
        println!("dry run: {total} rows would be deleted; nothing was changed");
        return Ok(Code::Success);
    }
    let n: i64 = client
        .query_one("SELECT cleanup_old_logs($1)::int8", &[&days])
        .await?
        .get(0);
    println!(
        "deleted {n} log, event and metric rows older than {days} days (before {})",
        cutoff.format("%Y-%m-%d %H:%M UTC")
    );
    Ok(Code::Success)
}
