//! The web view's reads: every page's data as JSON values (the shapes `/api/...` returns and
//! the templates render). Read-only SELECTs as unnamed statements (`query_typed`), so they
//! work through pgbouncer's transaction pooling and need nothing but `pipewatch_reader`.
//!
//! Must not write, prepare named statements or set session state.

use chrono::{DateTime, Duration, Utc};
use serde_json::{json, Value};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Row};
use uuid::Uuid;

/// A query parameter with its type (`query_typed` needs both).
type P<'a> = (&'a (dyn ToSql + Sync), Type);

fn ts(v: Option<DateTime<Utc>>) -> Value {
    v.map_or(Value::Null, |t| Value::String(t.to_rfc3339()))
}

/// Levels, lowest first (`pipewatch_level_rank` order).
pub const LEVELS: [&str; 5] = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"];

/// The experiments, running first, then by last activity: status, overall percent, last
/// activity, errors in the last hour, stalled daemons (whose last lifecycle event is a stall).
pub async fn experiments(client: &Client) -> anyhow::Result<Value> {
    let rows = client
        .query_typed(
            "WITH ids AS ( \
                 SELECT id FROM experiments \
                 UNION SELECT DISTINCT experiment_id FROM pipeline_progress \
             ), s AS ( \
                 SELECT i.id, e.name::text AS name, ps.total_nodes, ps.running_nodes, \
                        ps.failed_nodes, ps.completed_nodes, ps.overall_percent::float8 AS pct, \
                        ps.last_update, \
                        (SELECT max(l.ts) FROM pipeline_logs l WHERE l.experiment_id = i.id) AS last_log \
                   FROM ids i \
                   LEFT JOIN experiments e ON e.id = i.id \
                   LEFT JOIN experiment_progress_summary ps ON ps.experiment_id = i.id \
             ) \
             SELECT s.id, s.name, \
                    CASE WHEN s.total_nodes IS NULL THEN NULL \
                         WHEN s.failed_nodes > 0 THEN 'failed' \
                         WHEN s.running_nodes > 0 THEN 'running' \
                         WHEN s.completed_nodes = s.total_nodes THEN 'completed' \
                         ELSE 'pending' END AS status, \
                    s.pct, greatest(s.last_update, s.last_log) AS last_activity, \
                    (SELECT count(*) FROM pipeline_logs l WHERE l.experiment_id = s.id \
                        AND l.level IN ('ERROR', 'CRITICAL') AND l.ts > now() - interval '1 hour') AS errors_last_hour, \
                    coalesce((SELECT array_agg(x.daemon ORDER BY x.daemon) FROM ( \
                        SELECT DISTINCT ON (ev.host, ev.daemon) ev.daemon, ev.event_type \
                          FROM pipeline_events ev \
                         WHERE ev.experiment_id = s.id AND ev.daemon IS NOT NULL \
                           AND ev.event_type IN ('daemon_stalled', 'progress_stalled', 'daemon_recovered', \
                               'daemon_exited', 'daemon_started', 'daemon_restarted') \
                         ORDER BY ev.host, ev.daemon, ev.ts DESC, ev.id DESC) x \
                      WHERE x.event_type IN ('daemon_stalled', 'progress_stalled')), '{}') AS stalled \
               FROM s \
              ORDER BY (s.running_nodes > 0) DESC NULLS LAST, \
                       greatest(s.last_update, s.last_log) DESC NULLS LAST, s.id \
              LIMIT 500",
            &[],
        )
        .await?;
    Ok(Value::Array(
        rows.iter()
            .map(|r| {
                json!({
                    "experiment_id": r.get::<_, Uuid>(0).to_string(),
                    "name": r.get::<_, Option<String>>(1),
                    "status": r.get::<_, Option<String>>(2),
                    "overall_percent": r.get::<_, Option<f64>>(3),
                    "last_activity": ts(r.get(4)),
                    "errors_last_hour": r.get::<_, i64>(5),
                    "stalled_daemons": r.get::<_, Vec<String>>(6),
                })
            })
            .collect(),
    ))
}

/// The experiment's progress tree (`get_progress_tree`, through the operator query).
pub async fn progress(client: &Client, experiment: Uuid) -> anyhow::Result<Value> {
    let rows = crate::db::queries::progress_tree(client, experiment).await?;
    Ok(Value::Array(
        rows.into_iter()
            .map(|r| {
                json!({
                    "node_id": r.node_id,
                    "parent_node_id": r.parent_node_id,
                    "depth": r.depth,
                    "level": r.level,
                    "name": r.name,
                    "status": r.status,
                    "progress_percent": r.percent,
                    "items_done": r.items_done,
                    "items_total": r.items_total,
                    "updated_at": ts(r.updated_at),
                })
            })
            .collect(),
    ))
}

/// The experiment's errors since `since` grouped by message (`get_error_summary`), one
/// traceback each.
pub async fn errors(
    client: &Client,
    experiment: Uuid,
    since: Option<DateTime<Utc>>,
) -> anyhow::Result<Value> {
    let rows = client
        .query_typed(
            "SELECT message, count, first_seen, last_seen, nodes, sample_traceback, max_level \
             FROM get_error_summary($1, $2) LIMIT 50",
            &{
                let p: [P; 2] = [(&experiment, Type::UUID), (&since, Type::TIMESTAMPTZ)];
                p
            },
        )
        .await?;
    Ok(Value::Array(
        rows.iter()
            .map(|r| {
                json!({
                    "message": r.get::<_, String>(0),
                    "count": r.get::<_, i64>(1),
                    "first_seen": ts(r.get(2)),
                    "last_seen": ts(r.get(3)),
                    "nodes": r.get::<_, Vec<String>>(4),
                    "traceback": r.get::<_, Option<String>>(5),
                    "level": r.get::<_, String>(6),
                })
            })
            .collect(),
    ))
}

/// The experiment's newest events (at most 200), newest first.
pub async fn events(client: &Client, experiment: Uuid) -> anyhow::Result<Value> {
    let rows = client
        .query_typed(
            "SELECT id, ts, event_type, severity, message, node_id, host, daemon, details \
             FROM pipeline_events WHERE experiment_id = $1 ORDER BY ts DESC, id DESC LIMIT 200",
            &[(&experiment, Type::UUID)],
        )
        .await?;
    Ok(Value::Array(rows.iter().map(event_json).collect()))
}

fn event_json(r: &Row) -> Value {
    json!({
        "id": r.get::<_, i64>(0),
        "ts": ts(r.get(1)),
        "event_type": r.get::<_, String>(2),
        "severity": r.get::<_, Option<String>>(3),
        "message": r.get::<_, Option<String>>(4),
        "node_id": r.get::<_, Option<String>>(5),
        "host": r.get::<_, Option<String>>(6),
        "daemon": r.get::<_, Option<String>>(7),
        "details": r.get::<_, Value>(8),
    })
}

/// The experiment's metrics time span (first and last sample), if it has any.
pub async fn metrics_span(
    client: &Client,
    experiment: Uuid,
) -> anyhow::Result<Option<(DateTime<Utc>, DateTime<Utc>)>> {
    let row = client
        .query_typed(
            "SELECT (SELECT ts FROM pipeline_metrics WHERE experiment_id = $1 ORDER BY ts LIMIT 1), \
                    (SELECT ts FROM pipeline_metrics WHERE experiment_id = $1 ORDER BY ts DESC LIMIT 1)",
            &[(&experiment, Type::UUID)],
        )
        .await?;
    let r = row.first();
    Ok(match r.map(|r| (r.get(0), r.get(1))) {
        Some((Some(a), Some(b))) => Some((a, b)),
        _ => None,
    })
}

/// One daemon's downsampled series: bucket start times and one value per bucket for each
/// measure (averages; RSS the bucket's maximum, so a spike is never averaged away).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DaemonSeries {
    pub host: String,
    pub daemon: String,
    pub t: Vec<DateTime<Utc>>,
    pub cpu: Vec<Option<f64>>,
    pub rss: Vec<Option<f64>>,
    pub read: Vec<Option<f64>>,
    pub write: Vec<Option<f64>>,
    pub rps: Vec<Option<f64>>,
}

/// A chart mark: an event or an error record at a time, for a daemon (or all when `None`).
#[derive(Debug, Clone, PartialEq)]
pub struct Mark {
    pub ts: DateTime<Utc>,
    pub kind: String,
    pub label: String,
    pub host: Option<String>,
    pub daemon: Option<String>,
}

/// The most rows read per bucket (see [`series`]).
pub const SAMPLE: i64 = 64;

/// How many buckets a chart has at most: the server sends no more points than a chart is wide.
pub const MAX_POINTS: i64 = 240;

/// Metrics per daemon between `from` and `to`, in at most [`MAX_POINTS`] buckets.
pub async fn series(
    client: &Client,
    experiment: Uuid,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> anyhow::Result<Vec<DaemonSeries>> {
    let span = (to - from).num_seconds().max(1) as f64;
    let bucket = (span / MAX_POINTS as f64).ceil().max(1.0);
    // One index range scan per bucket, reading at most SAMPLE rows of it: exact while a
    // bucket holds fewer rows (up to six hours at 10 s samples for four daemons),
    // a sample of each bucket's start beyond that, so a month costs what a day does.
    let rows = client
        .query_typed(
            "WITH b AS ( \
                 SELECT $2::timestamptz + (g * $4::float8) * interval '1 second' AS b0 \
                   FROM generate_series(0, ceil(extract(epoch FROM $3::timestamptz - $2::timestamptz) / $4)::int) g \
             ) \
             SELECT coalesce(s.host, ''), coalesce(s.daemon, ''), b.b0, \
                    avg(s.cpu_percent)::float8, max(s.memory_rss_bytes)::float8, \
                    avg(s.disk_read_bytes_per_sec)::float8, avg(s.disk_write_bytes_per_sec)::float8, \
                    avg(s.records_per_sec)::float8 \
               FROM b CROSS JOIN LATERAL ( \
                    SELECT m.host, m.daemon, m.cpu_percent, m.memory_rss_bytes, \
                           m.disk_read_bytes_per_sec, m.disk_write_bytes_per_sec, m.records_per_sec \
                      FROM pipeline_metrics m \
                     WHERE m.experiment_id = $1 AND m.ts >= b.b0 \
                       AND m.ts < b.b0 + $4 * interval '1 second' AND m.ts <= $3 \
                     ORDER BY m.ts LIMIT $5) s \
              GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
            &{
                let p: [P; 5] = [
                    (&experiment, Type::UUID),
                    (&from, Type::TIMESTAMPTZ),
                    (&to, Type::TIMESTAMPTZ),
                    (&bucket, Type::FLOAT8),
                    (&SAMPLE, Type::INT8),
                ];
                p
            },
        )
        .await?;
    let mut out: Vec<DaemonSeries> = Vec::new();
    for r in &rows {
        let host: String = r.get(0);
        let daemon: String = r.get(1);
        if out
            .last()
            .is_none_or(|s| s.host != host || s.daemon != daemon)
        {
            out.push(DaemonSeries {
                host,
                daemon,
                ..Default::default()
            });
        }
        if let Some(s) = out.last_mut() {
            s.t.push(r.get(2));
            s.cpu.push(r.get(3));
            s.rss.push(r.get(4));
            s.read.push(r.get(5));
            s.write.push(r.get(6));
            s.rps.push(r.get(7));
        }
    }
    Ok(out)
}

/// The events (not the agent's own start and stop) and error records between `from` and
/// `to`, as chart marks; at most 200 and 100, newest first.
pub async fn marks(
    events_client: &Client,
    errors_client: &Client,
    experiment: Uuid,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> anyhow::Result<Vec<Mark>> {
    let params: [P; 3] = [
        (&experiment, Type::UUID),
        (&from, Type::TIMESTAMPTZ),
        (&to, Type::TIMESTAMPTZ),
    ];
    let (events, errors) = tokio::join!(
        events_client.query_typed(
            "SELECT ts, event_type, coalesce(message, event_type), host, daemon FROM pipeline_events \
              WHERE experiment_id = $1 AND ts >= $2 AND ts <= $3 \
                AND event_type NOT IN ('agent_started', 'agent_stopped') \
              ORDER BY ts DESC LIMIT 200",
            &params,
        ),
        errors_client.query_typed(
            "SELECT ts, 'error', message, host, daemon FROM pipeline_logs \
              WHERE experiment_id = $1 AND level IN ('ERROR', 'CRITICAL') AND ts >= $2 AND ts <= $3 \
              ORDER BY ts DESC LIMIT 100",
            &params,
        ),
    );
    let (events, errors) = (events?, errors?);
    Ok(events
        .iter()
        .chain(errors.iter())
        .map(|r| Mark {
            ts: r.get(0),
            kind: r.get(1),
            label: r.get(2),
            host: r.get(3),
            daemon: r.get(4),
        })
        .collect())
}

/// The filters of `pipewatch logs`, plus a page cursor and a follow position.
#[derive(Debug, Clone, Default)]
pub struct LogFilter {
    pub experiment: Uuid,
    /// Minimum level (upper case, one of [`LEVELS`]).
    pub level: Option<String>,
    /// Case-insensitive substring of the message or traceback.
    pub search: Option<String>,
    pub node: Option<String>,
    pub since: Option<DateTime<Utc>>,
    /// Older than this `(ts, id)`: the next page.
    pub before: Option<(DateTime<Utc>, i64)>,
    /// Newer than this id, oldest first: following.
    pub after_id: Option<i64>,
    pub limit: i64,
}

/// The columns of `pipewatch logs --json`.
const LOG_COLUMNS: &str =
    "id, ts, level, message, logger, experiment_id, node_id, stage, context, \
                           traceback, metrics, host, daemon, source";

/// Log rows as `pipewatch logs --json` prints them: newest first, or oldest first after an id.
pub async fn logs(client: &Client, f: &LogFilter) -> anyhow::Result<Vec<Value>> {
    let rank = f
        .level
        .as_deref()
        .and_then(|l| LEVELS.iter().position(|x| *x == l))
        .map(|i| i as i32);
    // Only the error levels: spelled out so that the partial error index applies.
    let errors_only = rank.is_some_and(|r| r >= 3);
    let pattern = f
        .search
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(crate::cli::like_pattern);
    let level_sql = if errors_only {
        "AND level IN ('ERROR', 'CRITICAL') AND ($2::int4 = 3 OR level = 'CRITICAL')"
    } else {
        "AND ($2::int4 IS NULL OR pipewatch_level_rank(level) >= ($2::int4 + 1) * 10)"
    };
    let (before_ts, before_id) = match f.before {
        Some((t, i)) => (Some(t), Some(i)),
        None => (None, None),
    };
    let order = if f.after_id.is_some() {
        "ORDER BY id LIMIT $9"
    } else {
        "ORDER BY ts DESC, id DESC LIMIT $9"
    };
    let sql = format!(
        "SELECT {LOG_COLUMNS} FROM pipeline_logs \
          WHERE experiment_id = $1 {level_sql} \
            AND ($3::text IS NULL OR message ILIKE $3 OR traceback ILIKE $3) \
            AND ($4::text IS NULL OR node_id = $4) \
            AND ($5::timestamptz IS NULL OR ts >= $5) \
            AND ($6::timestamptz IS NULL OR (ts, id) < ($6, $7::int8)) \
            AND ($8::int8 IS NULL OR id > $8) \
          {order}"
    );
    let rows = client
        .query_typed(&sql, &{
            let p: [P; 9] = [
                (&f.experiment, Type::UUID),
                (&rank, Type::INT4),
                (&pattern, Type::TEXT),
                (&f.node, Type::TEXT),
                (&f.since, Type::TIMESTAMPTZ),
                (&before_ts, Type::TIMESTAMPTZ),
                (&before_id, Type::INT8),
                (&f.after_id, Type::INT8),
                (&f.limit, Type::INT8),
            ];
            p
        })
        .await?;
    Ok(rows.iter().map(log_json).collect())
}

/// One row in the shape of `pipewatch logs --json`.
fn log_json(r: &Row) -> Value {
    json!({
        "id": r.get::<_, i64>("id"),
        "ts": ts(r.get("ts")),
        "level": r.get::<_, String>("level"),
        "message": r.get::<_, String>("message"),
        "logger": r.get::<_, Option<String>>("logger"),
        "experiment_id": r.get::<_, Option<Uuid>>("experiment_id").map(|u| u.to_string()),
        "node_id": r.get::<_, Option<String>>("node_id"),
        "stage": r.get::<_, Option<String>>("stage"),
        "context": r.get::<_, Value>("context"),
        "traceback": r.get::<_, Option<String>>("traceback"),
        "metrics": r.get::<_, Option<Value>>("metrics"),
        "host": r.get::<_, Option<String>>("host"),
        "daemon": r.get::<_, Option<String>>("daemon"),
        "source": r.get::<_, Option<String>>("source"),
    })
}

/// The newest log id of an experiment (where following starts).
pub async fn newest_log_id(client: &Client, experiment: Uuid) -> anyhow::Result<i64> {
    let row = client
        .query_typed(
            "SELECT coalesce(max(id), 0) FROM pipeline_logs WHERE experiment_id = $1",
            &[(&experiment, Type::UUID)],
        )
        .await?;
    Ok(row.first().map_or(0, |r| r.get(0)))
}

/// The agents: host, daemons, version, last commit, records, lag.
pub async fn agents(client: &Client) -> anyhow::Result<Value> {
    let rows = client
        .query_typed(
            "SELECT agent_id, host, daemons, version, started_at, last_commit_at, records_shipped, \
                    records_quarantined, \
                    (SELECT CASE WHEN jsonb_typeof(m.custom->'lag_bytes_total') = 'number' \
                                 THEN (m.custom->>'lag_bytes_total')::float8::int8 END \
                       FROM pipeline_metrics m \
                      WHERE m.host = a.host AND m.daemon = 'pipewatch' \
                        AND m.ts >= coalesce(a.started_at, '-infinity') \
                      ORDER BY m.ts DESC LIMIT 1) \
               FROM pipewatch_agents a ORDER BY host, agent_id",
            &[],
        )
        .await?;
    Ok(Value::Array(
        rows.iter()
            .map(|r| {
                json!({
                    "agent_id": r.get::<_, String>(0),
                    "host": r.get::<_, String>(1),
                    "daemons": r.get::<_, Vec<String>>(2),
                    "version": r.get::<_, Option<String>>(3),
                    "started_at": ts(r.get(4)),
                    "last_commit_at": ts(r.get(5)),
                    "records_shipped": r.get::<_, i64>(6),
                    "records_quarantined": r.get::<_, i64>(7),
                    "lag_bytes": r.get::<_, Option<i64>>(8),
                })
            })
            .collect(),
    ))
}

/// A chart window by name: its length, or `None` for the experiment's whole span.
pub fn window_length(name: &str) -> Option<Option<Duration>> {
    Some(match name {
        "all" => None,
        "15m" => Some(Duration::minutes(15)),
        "1h" => Some(Duration::hours(1)),
        "6h" => Some(Duration::hours(6)),
        "24h" => Some(Duration::hours(24)),
        "7d" => Some(Duration::days(7)),
        "30d" => Some(Duration::days(30)),
        _ => return None,
    })
}

/// The window names offered, shortest first.
pub const WINDOWS: [&str; 7] = ["15m", "1h", "6h", "24h", "7d", "30d", "all"];
