//! `pipewatch status`: the fleet at a glance from the database — agents by host with their last
//! commit, table and partition sizes, oldest and newest partition, migrations applied.

use super::out::outln;
use super::render::{age, paint};
use super::Context;
use crate::exit::Code;
use chrono::{DateTime, Utc};

#[derive(Debug, clap::Args)]
pub struct Args {}

pub async fn execute(_args: Args, ctx: &Context) -> anyhow::Result<Code> {
    let client = ctx.connect().await?;
    let color = super::out::color_stdout();
    let now = Utc::now();
    outln!("{}", paint("agents", "1", color));
    let agents = client
        .query(
            "SELECT host, array_to_string(daemons, ','), coalesce(version, '-'), last_commit_at, \
             records_shipped, records_quarantined, coalesce(details->>'lag_bytes', '0') \
             FROM pipewatch_agents ORDER BY host, agent_id",
            &[],
        )
        .await?;
    if agents.is_empty() {
        outln!("  no agent has committed anything yet");
    }
    for r in &agents {
        let host: String = r.get(0);
        let daemons: String = r.get(1);
        let version: String = r.get(2);
        let last: Option<DateTime<Utc>> = r.get(3);
        let shipped: i64 = r.get(4);
        let quarantined: i64 = r.get(5);
        let lag: String = r.get(6);
        outln!(
            "  {host:<20} {daemons:<30} v{version:<8} last commit {:<10} shipped {shipped} quarantined {quarantined} lag {lag} B",
            age(last, now)
        );
    }
    outln!("\n{}", paint("tables", "1", color));
    let sizes = client
        .query(
            "SELECT c.relname, pg_size_pretty(CASE WHEN c.relkind = 'p' THEN \
               (SELECT coalesce(sum(pg_total_relation_size(i.inhrelid)), 0)::int8 FROM pg_inherits i WHERE i.inhparent = c.oid) \
               ELSE pg_total_relation_size(c.oid) END), \
               (SELECT count(*) FROM pg_inherits i WHERE i.inhparent = c.oid) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') \
               AND (c.relname LIKE 'pipeline\\_%' OR c.relname LIKE 'pipewatch\\_%') AND NOT c.relispartition \
             ORDER BY c.relname",
            &[],
        )
        .await?;
    for r in &sizes {
        let name: String = r.get(0);
        let size: String = r.get(1);
        let parts: i64 = r.get(2);
        let p = if parts > 0 {
            format!("{parts} partitions")
        } else {
            String::new()
        };
        outln!("  {name:<30} {size:>10}  {p}");
    }
    let range = client
        .query_opt(
            "SELECT min(c.relname), max(c.relname) FROM pg_inherits i \
             JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'pipeline_logs'::regclass AND c.relname ~ '_p[0-9]{8}$'",
            &[],
        )
        .await?;
    if let Some(r) = range {
        let oldest: Option<String> = r.get(0);
        let newest: Option<String> = r.get(1);
        outln!(
            "  log partitions: oldest {}, newest {}",
            oldest.unwrap_or_else(|| "-".into()),
            newest.unwrap_or_else(|| "-".into())
        );
    }
    outln!("\n{}", paint("migrations", "1", color));
    let migrations = client
        .query(
            "SELECT version, coalesce(name, ''), applied_at FROM pipewatch_schema_migrations ORDER BY version",
            &[],
        )
        .await?;
    for r in &migrations {
        let v: String = r.get(0);
        let name: String = r.get(1);
        let at: DateTime<Utc> = r.get(2);
        outln!(
            "  {v} {name:<30} applied {}",
            at.format("%Y-%m-%d %H:%M:%S")
        );
    }
    Ok(Code::Success)
}
