//! The SQL behind the operator commands and the demo, returning plain structs.
//!
//! Read-only; every value from a user goes in as a parameter, never as SQL text.

use crate::db::typed::p;
use chrono::{DateTime, Utc};
use tokio_postgres::Client;
use uuid::Uuid;

/// One node of `get_progress_tree`.
#[derive(Debug, Clone, PartialEq)]
pub struct TreeRow {
    pub node_id: String,
    pub parent_node_id: Option<String>,
    pub depth: i32,
    pub level: Option<String>,
    pub name: Option<String>,
    pub status: Option<String>,
    pub percent: Option<f64>,
    pub items_done: Option<i64>,
    pub items_total: Option<i64>,
    pub updated_at: Option<DateTime<Utc>>,
}

/// The experiment's progress tree, depth-first.
pub async fn progress_tree(client: &Client, experiment: Uuid) -> anyhow::Result<Vec<TreeRow>> {
    let rows = client
        .query_typed(
            "SELECT node_id, parent_node_id, depth::int4, level::text, name::text, status::text, \
             progress_percent::float8, items_done::int8, items_total::int8, updated_at \
             FROM get_progress_tree($1)",
            &[p(&experiment)],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| TreeRow {
            node_id: r.get(0),
            parent_node_id: r.get(1),
            depth: r.get(2),
            level: r.get(3),
            name: r.get(4),
            status: r.get(5),
            percent: r.get(6),
            items_done: r.get(7),
            items_total: r.get(8),
            updated_at: r.get(9),
        })
        .collect())
}

/// Resolves an experiment given as a UUID or a name (exact name, newest first). A UUID is
/// known when it has an experiments row or any record (no table references experiments, so
/// records may come first).
pub async fn resolve_experiment(client: &Client, id_or_name: &str) -> anyhow::Result<Option<Uuid>> {
    if let Ok(u) = Uuid::parse_str(id_or_name) {
        let known: bool = client
            .query_typed_one(
                "SELECT EXISTS (SELECT 1 FROM experiments WHERE id = $1) \
                     OR EXISTS (SELECT 1 FROM pipeline_logs WHERE experiment_id = $1) \
                     OR EXISTS (SELECT 1 FROM pipeline_progress WHERE experiment_id = $1) \
                     OR EXISTS (SELECT 1 FROM pipeline_events WHERE experiment_id = $1) \
                     OR EXISTS (SELECT 1 FROM pipeline_metrics WHERE experiment_id = $1)",
                &[p(&u)],
            )
            .await?
            .get(0);
        return Ok(known.then_some(u));
    }
    let row = client
        .query_typed_opt(
            "SELECT id FROM experiments WHERE name = $1 LIMIT 1",
            &[p(&id_or_name)],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// The experiment's name, when it has an experiments row with one.
pub async fn experiment_name(client: &Client, id: Uuid) -> anyhow::Result<Option<String>> {
    let row = client
        .query_typed_opt(
            "SELECT name::text FROM experiments WHERE id = $1 AND name IS NOT NULL",
            &[p(&id)],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Up to `limit` experiments to suggest: rows of `experiments` (newest first), else ids that
/// only records carry.
pub async fn some_experiments(
    client: &Client,
    limit: i64,
) -> anyhow::Result<Vec<(Uuid, Option<String>)>> {
    // The real database's experiments table may lack created_at.
    let rows = match client
        .query_typed(
            "SELECT id, name::text FROM experiments ORDER BY created_at DESC NULLS LAST, id LIMIT $1", &[p(&limit)])
        .await
    {
        Ok(rows) => rows,
        Err(_) => {
            client
                .query_typed(
                    "SELECT id, name::text FROM experiments ORDER BY id LIMIT $1", &[p(&limit)])
                .await?
        }
    };
    let mut out: Vec<(Uuid, Option<String>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    if (out.len() as i64) < limit {
        let rows = client
            .query_typed(
                "SELECT DISTINCT experiment_id FROM pipeline_progress \
                 WHERE experiment_id NOT IN (SELECT id FROM experiments) LIMIT $1",
                &[p(&(limit - out.len() as i64))],
            )
            .await?;
        out.extend(rows.iter().map(|r| (r.get(0), None)));
    }
    Ok(out)
}
