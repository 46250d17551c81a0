//! The SQL behind the operator commands and the demo, returning plain structs.
//!
//! Read-only; every value from a user goes in as a parameter, never as SQL text.

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
        .query(
            "SELECT node_id, parent_node_id, depth::int4, level::text, name::text, status::text, \
             progress_percent::float8, items_done::int8, items_total::int8, updated_at \
             FROM get_progress_tree($1)",
            &[&experiment],
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

/// Resolves an experiment given as a UUID or a name (exact name, newest first).
pub async fn resolve_experiment(client: &Client, id_or_name: &str) -> anyhow::Result<Option<Uuid>> {
    if let Ok(u) = Uuid::parse_str(id_or_name) {
        return Ok(Some(u));
    }
    let row = client
        .query_opt(
            "SELECT id FROM experiments WHERE name = $1 LIMIT 1",
            &[&id_or_name],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}
