//! `pipewatch status`: the fleet at a glance from the database — agents by host with their last
//! commit and state (running, stopped, stuck), reader failures, table and partition sizes,
//! oldest and newest partition, migrations applied.
//!
//! A stuck agent usually cannot write (its database is the fault), so its state is judged from
//! what it wrote before: no commit for longer than its `stuck_after` plus its commit interval
//! (both in its `agent_started` event) while it has not said `agent_stopped`.

use super::out::outln;
use super::render::{age, paint};
use super::Context;
use crate::exit::Code;
use chrono::{DateTime, Utc};

#[derive(Debug, clap::Args)]
pub struct Args {}

/// Each agent with what its events say: its limits (from `agent_started`), whether it said
/// `agent_stopped`, a stuck reason it managed to store, and its reader failures (`agent_error`)
/// since it started. Events are matched by host, pid and time since the agent's start.
const AGENTS: &str = "SELECT a.host, array_to_string(a.daemons, ','), coalesce(a.version, '-'), \
     a.last_commit_at, a.records_shipped, a.records_quarantined, \
     coalesce(a.details->>'lag_bytes', '0'), \
     (s.details->>'stuck_after_secs')::float8, (s.details->>'commit_every_secs')::float8, \
     EXISTS (SELECT 1 FROM pipeline_events e WHERE e.event_type = 'agent_stopped' \
         AND e.host = a.host AND e.ts >= a.started_at AND e.details->>'pid' = a.details->>'pid'), \
     a.details->'stuck'->>'reason', \
     f.n, f.last_at, f.last_message, \
     (SELECT string_agg(k, ', ' ORDER BY k) FROM jsonb_object_keys( \
         CASE WHEN jsonb_typeof(a.details->'unreadable') = 'object' \
         THEN a.details->'unreadable' END) k) \
     FROM pipewatch_agents a \
     LEFT JOIN LATERAL (SELECT e.details FROM pipeline_events e WHERE e.event_type = 'agent_started' \
         AND e.host = a.host AND e.ts >= a.started_at AND e.details->>'pid' = a.details->>'pid' \
         ORDER BY e.ts LIMIT 1) s ON true \
     LEFT JOIN LATERAL (SELECT count(*) AS n, max(e.ts) AS last_at, \
         (array_agg(e.message ORDER BY e.ts DESC))[1] AS last_message \
         FROM pipeline_events e WHERE e.event_type = 'agent_error' AND e.host = a.host \
         AND e.ts >= a.started_at AND e.daemon = ANY(a.daemons) \
         AND NOT e.details ? 'path') f ON true \
     ORDER BY a.host, a.agent_id";

/// `[agent] stuck_after` of an agent that did not say its own.
const DEFAULT_STUCK_AFTER_SECS: f64 = 300.0;
/// How often an agent that did not say commits at least (its metrics samples).
const DEFAULT_COMMIT_EVERY_SECS: f64 = 60.0;

/// An agent's limits, in seconds.
#[derive(Debug, Clone, Copy)]
struct Limits {
    stuck_after: f64,
    commit_every: f64,
}

/// An agent's state: `stopped`, `STUCK: reason` (stored by the agent), `STUCK? …` (silent for
/// longer than a running agent can be), or `running`.
fn state(
    now: DateTime<Utc>,
    last_commit: Option<DateTime<Utc>>,
    stopped: bool,
    said_stuck: Option<&str>,
    limits: Limits,
) -> String {
    if stopped {
        return "stopped".into();
    }
    if let Some(reason) = said_stuck {
        return format!("STUCK: {reason}");
    }
    let Some(last) = last_commit else {
        return "running".into();
    };
    let silent = (now - last).num_milliseconds() as f64 / 1000.0;
    if silent > limits.stuck_after + limits.commit_every {
        let d =
            |s: f64| humantime::format_duration(std::time::Duration::from_secs(s.max(0.0) as u64));
        return format!(
            "STUCK? no commit for {} (stuck_after {}): stuck, or ended without saying so; see its log",
            d(silent),
            d(limits.stuck_after)
        );
    }
    "running".into()
}

pub async fn execute(_args: Args, ctx: &Context) -> anyhow::Result<Code> {
    let client = ctx.connect().await?;
    let color = super::out::color_stdout();
    let now = Utc::now();
    outln!("{}", paint("agents", "1", color));
    let agents = client.query_typed(AGENTS, &[]).await?;
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
        let limits = Limits {
            stuck_after: r
                .get::<_, Option<f64>>(7)
                .unwrap_or(DEFAULT_STUCK_AFTER_SECS),
            commit_every: r
                .get::<_, Option<f64>>(8)
                .unwrap_or(DEFAULT_COMMIT_EVERY_SECS),
        };
        let stopped: bool = r.get(9);
        let said_stuck: Option<String> = r.get(10);
        let st = state(now, last, stopped, said_stuck.as_deref(), limits);
        let st = if st.starts_with("STUCK") {
            paint(&st, "1;31", color)
        } else {
            st
        };
        outln!(
            "  {host:<20} {daemons:<30} v{version:<8} last commit {:<10} shipped {shipped} quarantined {quarantined} lag {lag} B  {st}",
            age(last, now)
        );
        let failures: i64 = r.get(11);
        if failures > 0 {
            let at: Option<DateTime<Utc>> = r.get(12);
            let message: Option<String> = r.get(13);
            outln!(
                "  {:<20} {}",
                "",
                paint(
                    &format!(
                        "reader failures since start: {failures}, last {}: {}",
                        age(at, now),
                        message.unwrap_or_default()
                    ),
                    "31",
                    color
                )
            );
        }
        let unreadable: Option<String> = r.get(14);
        if let Some(paths) = unreadable {
            outln!(
                "  {:<20} {}",
                "",
                paint(&format!("cannot read (retried): {paths}"), "31", color)
            );
        }
    }
    outln!("\n{}", paint("tables", "1", color));
    let sizes = client
        .query_typed(
            "SELECT c.relname, pg_size_pretty(CASE WHEN c.relkind = 'p' THEN \
               (SELECT coalesce(sum(pg_total_relation_size(i.inhrelid)), 0)::int8 FROM pg_inherits i WHERE i.inhparent = c.oid) \
               ELSE pg_total_relation_size(c.oid) END), \
               (SELECT count(*) FROM pg_inherits i WHERE i.inhparent = c.oid) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') \
               AND (c.relname LIKE 'pipeline\\_%' OR c.relname LIKE 'pipewatch\\_%') AND NOT c.relispartition \
             ORDER BY c.relname", &[])
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
        .query_typed_opt(
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
        .query_typed(
            "SELECT version, coalesce(name, ''), applied_at FROM pipewatch_schema_migrations ORDER BY version", &[])
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

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn state_from_what_the_agent_wrote() {
        let now = Utc.with_ymd_and_hms(2026, 11, 29, 12, 0, 0).unwrap();
        let ago = |s: i64| Some(now - chrono::Duration::seconds(s));
        let limits = Limits {
            stuck_after: 120.0,
            commit_every: 10.0,
        };
        let check = |last, stopped, said: Option<&str>, want: &str| {
            assert_eq!(state(now, last, stopped, said, limits), want);
        };
        check(ago(5), false, None, "running");
        check(ago(129), false, None, "running");
        check(
            ago(200),
            false,
            None,
            "STUCK? no commit for 3m 20s (stuck_after 2m): stuck, or ended without saying so; see its log",
        );
        check(ago(200), true, None, "stopped");
        check(
            ago(5),
            false,
            Some("no commit for 5m"),
            "STUCK: no commit for 5m",
        );
        check(None, false, None, "running");
    }
}
