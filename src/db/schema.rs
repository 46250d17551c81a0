//! The inventory of database objects pipewatch needs, and a read-only check of which exist.
//!
//! Used by `migrate --check-only`, by `migrate` (to say what it created) and by `verify`.
//! Never changes the database.

use crate::db::typed::p;
use anyhow::Context as _;
use tokio_postgres::GenericClient;

/// What kind of object an [`Item`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Table,
    View,
    Function,
    Trigger,
    Partition,
    Role,
}

impl Kind {
    /// The word shown to people.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Table => "table",
            Kind::View => "view",
            Kind::Function => "function",
            Kind::Trigger => "trigger",
            Kind::Partition => "partition",
            Kind::Role => "role",
        }
    }
}

/// The four monitoring tables of CONTRACT.md §3.
pub const MONITORING_TABLES: &[&str] = &[
    "pipeline_logs",
    "pipeline_events",
    "pipeline_progress",
    "pipeline_metrics",
];

/// The other tables: experiments (created only when absent) and the agent's bookkeeping.
pub const OTHER_TABLES: &[&str] = &[
    "experiments",
    "pipewatch_schema_migrations",
    "pipewatch_checkpoints",
    "pipewatch_agents",
    "pipewatch_retention",
];

/// The three monitoring views.
pub const VIEWS: &[&str] = &[
    "recent_experiment_errors",
    "experiment_progress_summary",
    "active_pipeline_monitoring",
];

/// The five utility functions of the contract, by signature.
pub const FUNCTIONS: &[&str] = &[
    "get_progress_tree(uuid)",
    "get_experiment_logs(uuid,text,text,integer,timestamptz,text)",
    "get_error_summary(uuid,timestamptz)",
    "cleanup_old_logs(integer)",
    "update_parent_progress()",
];

/// pipewatch's own helper functions.
pub const HELPER_FUNCTIONS: &[&str] = &[
    "pipewatch_ensure_partitions(timestamptz,timestamptz)",
    "pipewatch_level_rank(text)",
    "pipewatch_apply_retention(integer,text,interval)",
    "pipewatch_cleanup_before(timestamptz)",
    "pipewatch_cleanup_older_than(interval)",
    "pipewatch_apply_retention(interval,text,interval)",
];

/// The partitioned tables.
pub const PARTITIONED: &[&str] = &["pipeline_logs", "pipeline_events", "pipeline_metrics"];

/// The trigger on pipeline_progress.
pub const TRIGGER: &str = "pipeline_progress_update_parent";

/// The roles (optional: created only when the migrating user may create roles).
pub const ROLES: &[&str] = &["pipewatch_agent", "pipewatch_reader"];

/// One object and whether it exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub kind: Kind,
    pub name: String,
    pub present: bool,
    /// A required object makes the schema incomplete when missing; roles are optional.
    pub required: bool,
}

/// Every object pipewatch needs, present or not.
#[derive(Debug, Clone)]
pub struct Inventory {
    pub items: Vec<Item>,
}

impl Inventory {
    /// Required objects that are missing.
    pub fn missing(&self) -> impl Iterator<Item = &Item> {
        self.items.iter().filter(|i| i.required && !i.present)
    }

    /// Whether `name` of `kind` exists.
    pub fn has(&self, kind: Kind, name: &str) -> bool {
        self.items
            .iter()
            .any(|i| i.kind == kind && i.name == name && i.present)
    }

    /// Present / total of the given kind (required items only).
    pub fn count(&self, kind: Kind) -> (usize, usize) {
        let of_kind = self.items.iter().filter(|i| i.kind == kind && i.required);
        let total = of_kind.clone().count();
        (of_kind.filter(|i| i.present).count(), total)
    }
}

/// Looks up every object in the current search path.
pub async fn inspect(client: &impl GenericClient) -> anyhow::Result<Inventory> {
    let mut items = Vec::new();
    for t in MONITORING_TABLES.iter().chain(OTHER_TABLES) {
        let present = relation_exists(client, t, &["r", "p"]).await?;
        items.push(item(Kind::Table, t, present, true));
    }
    for v in VIEWS {
        let present = relation_exists(client, v, &["v", "m"]).await?;
        items.push(item(Kind::View, v, present, true));
    }
    for f in FUNCTIONS.iter().chain(HELPER_FUNCTIONS) {
        let present: bool = client
            .query_typed_one("SELECT to_regprocedure($1) IS NOT NULL", &[p(f)])
            .await
            .with_context(|| format!("cannot look up function {f}"))?
            .get(0);
        items.push(item(Kind::Function, f, present, true));
    }
    let trigger: bool = client
        .query_typed_one(
            "SELECT EXISTS (SELECT 1 FROM pg_trigger
                             WHERE tgname = $1 AND tgrelid = to_regclass('pipeline_progress'))",
            &[p(&TRIGGER)],
        )
        .await
        .context("cannot look up the progress trigger")?
        .get(0);
    items.push(item(
        Kind::Trigger,
        &format!("{TRIGGER} (update_parent_progress on pipeline_progress)"),
        trigger,
        true,
    ));
    // The DEFAULT partition and today's daily partition of each partitioned table.
    let today: String = client
        .query_typed_one(
            "SELECT to_char((now() AT TIME ZONE 'UTC')::date, 'YYYYMMDD')",
            &[],
        )
        .await?
        .get(0);
    for t in PARTITIONED {
        for part in [format!("{t}_default"), format!("{t}_p{today}")] {
            let present: bool = client
                .query_typed_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_inherits
                                     WHERE inhrelid = to_regclass($1)
                                       AND inhparent = to_regclass($2))",
                    &[p(&part), p(t)],
                )
                .await
                .context("cannot look up partitions")?
                .get(0);
            items.push(item(Kind::Partition, &part, present, true));
        }
    }
    for r in ROLES {
        let present: bool = client
            .query_typed_one(
                "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)",
                &[p(r)],
            )
            .await
            .context("cannot look up roles")?
            .get(0);
        items.push(item(Kind::Role, r, present, false));
    }
    Ok(Inventory { items })
}

fn item(kind: Kind, name: &str, present: bool, required: bool) -> Item {
    Item {
        kind,
        name: name.to_string(),
        present,
        required,
    }
}

async fn relation_exists(
    client: &impl GenericClient,
    name: &str,
    kinds: &[&str],
) -> anyhow::Result<bool> {
    let kinds: Vec<String> = kinds.iter().map(|k| k.to_string()).collect();
    let row = client
        .query_typed_one(
            "SELECT EXISTS (SELECT 1 FROM pg_class
                             WHERE oid = to_regclass($1) AND relkind::text = ANY ($2))",
            &[p(&name), p(&kinds)],
        )
        .await
        .with_context(|| format!("cannot look up {name}"))?;
    Ok(row.get(0))
}

/// The sample queries of the seed, ready to paste into psql, for `migrate --show-queries`.
/// `experiment` replaces the placeholder id when given.
pub fn sample_queries(experiment: Option<&str>) -> String {
    let id = experiment.unwrap_or("00000000-0000-0000-0000-000000000000");
    format!(
        "-- Recent errors, newest first, with the experiment's name:
SELECT ts, experiment_name, node_id, level, message
  FROM recent_experiment_errors
 WHERE experiment_id = '{id}'
 LIMIT 10;

-- The progress tree, depth first:
SELECT repeat('  ', depth) || node_id AS node, status, progress_percent, items_done, items_total
  FROM get_progress_tree('{id}'::uuid);

-- Logs at ERROR or above mentioning 'memory', newest first:
SELECT ts, level, node_id, message
  FROM get_experiment_logs('{id}'::uuid, p_level := 'ERROR', p_search := 'memory', p_limit := 50);

-- Errors grouped by message:
SELECT message, count, first_seen, last_seen, nodes
  FROM get_error_summary('{id}'::uuid);

-- Progress per experiment:
SELECT * FROM experiment_progress_summary;

-- Daemons active in the last hour:
SELECT * FROM active_pipeline_monitoring;

-- Retention: delete log, event and metric rows older than 30 days:
SELECT cleanup_old_logs(30);

-- Table sizes:
SELECT c.relname AS table_name,
       pg_size_pretty(coalesce(sum(pg_total_relation_size(i.inhrelid)), 0)
                      + pg_total_relation_size(c.oid)) AS size
  FROM pg_class c
  LEFT JOIN pg_inherits i ON i.inhparent = c.oid
 WHERE c.relname LIKE 'pipeline\\_%' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
 GROUP BY c.relname, c.oid
 ORDER BY c.relname;
"
    )
}
