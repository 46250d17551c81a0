//! The embedded migrations (`migrations/*.sql`) and the runner that applies them.
//!
//! Each file is applied once, in order, in its own transaction, while that transaction holds
//! an advisory lock, so any number of hosts may run `migrate` at once. Applied files are
//! recorded in `pipewatch_schema_migrations` with the SHA-256 of their text; a file changed
//! after it was applied is reported, never silently re-run. After the files, the daily
//! partitions from yesterday through 7 days ahead are created.
//!
//! This module does not print: it returns [`Report`]s for `cli::migrate` to show.

use crate::db::typed::p;
use anyhow::Context as _;
use tokio_postgres::{Client, GenericClient};
use uuid::Uuid;

/// One embedded migration file.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// The sortable prefix of the file name, e.g. `0003`.
    pub version: &'static str,
    /// The rest of the file name without `.sql`, e.g. `partitions`.
    pub name: &'static str,
    /// The file's text, applied as one batch.
    pub sql: &'static str,
}

macro_rules! migration {
    ($version:literal, $name:literal) => {
        Migration {
            version: $version,
            name: $name,
            sql: include_str!(concat!("../../migrations/", $version, "_", $name, ".sql")),
        }
    };
}

/// Every migration, in the order it is applied.
pub const MIGRATIONS: &[Migration] = &[
    migration!("0001", "experiments"),
    migration!("0002", "pipeline_tables"),
    migration!("0003", "partitions"),
    migration!("0004", "progress_trigger"),
    migration!("0005", "query_functions"),
    migration!("0006", "views"),
    migration!("0007", "agent_bookkeeping"),
    migration!("0008", "roles"),
    migration!("0009", "retention"),
    migration!("0010", "exact_retention"),
    migration!("0011", "checkpoint_identity"),
    migration!("0012", "fleet"),
];

/// The key of the advisory lock every schema change holds (`hashtext('pipewatch_migrate')`
/// would do as well; a fixed number is easier to find in `pg_locks`).
pub const LOCK_KEY: i64 = 0x7069_7065_7761_7463; // "pipewatc"

/// The table the runner keeps its record in; created by the runner itself.
const BOOKKEEPING_SQL: &str = "CREATE TABLE IF NOT EXISTS pipewatch_schema_migrations (
    version    text PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

/// The state of one migration file in a database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Applied by this run.
    AppliedNow,
    /// Applied before, with the same checksum.
    Applied,
    /// Not applied yet.
    Pending,
    /// Applied before, but the embedded file has changed since (the recorded checksum differs).
    Changed { recorded: String },
}

/// A migration and its state.
#[derive(Debug, Clone)]
pub struct MigrationStatus {
    pub version: &'static str,
    pub name: &'static str,
    pub checksum: String,
    pub state: State,
}

/// What [`apply`] did.
#[derive(Debug, Clone)]
pub struct Report {
    /// Every embedded migration and what became of it.
    pub migrations: Vec<MigrationStatus>,
    /// Daily partitions created by this run.
    pub partitions_created: i32,
}

impl Report {
    /// Versions applied by this run.
    pub fn applied_now(&self) -> Vec<&'static str> {
        self.with_state(|s| *s == State::AppliedNow)
    }

    /// Versions whose file changed after they were applied.
    pub fn changed(&self) -> Vec<&'static str> {
        self.with_state(|s| matches!(s, State::Changed { .. }))
    }

    fn with_state(&self, f: impl Fn(&State) -> bool) -> Vec<&'static str> {
        self.migrations
            .iter()
            .filter(|m| f(&m.state))
            .map(|m| m.version)
            .collect()
    }
}

/// The SHA-256 (hex) of each embedded file, computed by the server (no extension needed).
async fn checksums(client: &impl GenericClient) -> anyhow::Result<Vec<String>> {
    let texts: Vec<&str> = MIGRATIONS.iter().map(|m| m.sql).collect();
    let rows = client
        .query_typed(
            "SELECT encode(sha256(convert_to(t, 'UTF8')), 'hex')
               FROM unnest($1::text[]) WITH ORDINALITY AS u(t, n) ORDER BY n",
            &[p(&texts)],
        )
        .await
        .context("cannot compute migration checksums")?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The recorded checksums by version, or `None` when the bookkeeping table does not exist.
async fn recorded(
    client: &impl GenericClient,
) -> anyhow::Result<Option<std::collections::HashMap<String, String>>> {
    let exists: bool = client
        .query_typed_one(
            "SELECT to_regclass('pipewatch_schema_migrations') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let rows = client
        .query_typed(
            "SELECT version, checksum FROM pipewatch_schema_migrations",
            &[],
        )
        .await
        .context("cannot read pipewatch_schema_migrations")?;
    Ok(Some(rows.iter().map(|r| (r.get(0), r.get(1))).collect()))
}

/// Each migration's state, without changing anything (for `--check-only` and `verify`).
pub async fn status(client: &impl GenericClient) -> anyhow::Result<Vec<MigrationStatus>> {
    let sums = checksums(client).await?;
    let done = recorded(client).await?.unwrap_or_default();
    Ok(MIGRATIONS
        .iter()
        .zip(sums)
        .map(|(m, checksum)| {
            let state = match done.get(m.version) {
                None => State::Pending,
                Some(r) if *r == checksum => State::Applied,
                Some(r) => State::Changed {
                    recorded: r.clone(),
                },
            };
            MigrationStatus {
                version: m.version,
                name: m.name,
                checksum,
                state,
            }
        })
        .collect())
}

/// Applies every pending migration, each in its own transaction under the advisory lock,
/// then creates the daily partitions from yesterday through 7 days ahead.
///
/// Safe to call from many processes at once: each file is applied exactly once.
pub async fn apply(client: &mut Client) -> anyhow::Result<Report> {
    let sums = checksums(&*client).await?;
    {
        let tx = client.transaction().await?;
        lock(&tx).await?;
        tx.batch_execute(BOOKKEEPING_SQL)
            .await
            .context("cannot create pipewatch_schema_migrations")?;
        tx.commit().await?;
    }
    let mut migrations = Vec::with_capacity(MIGRATIONS.len());
    for (m, checksum) in MIGRATIONS.iter().zip(sums) {
        let tx = client.transaction().await?;
        lock(&tx).await?;
        let row = tx
            .query_typed_opt(
                "SELECT checksum FROM pipewatch_schema_migrations WHERE version = $1",
                &[p(&m.version)],
            )
            .await?;
        let state = match row {
            Some(r) => {
                let recorded: String = r.get(0);
                if recorded == checksum {
                    State::Applied
                } else {
                    State::Changed { recorded }
                }
            }
            None => {
                tx.batch_execute(m.sql)
                    .await
                    .with_context(|| format!("migration {}_{}.sql failed", m.version, m.name))?;
                tx.execute_typed(
                    "INSERT INTO pipewatch_schema_migrations (version, name, checksum)
                     VALUES ($1, $2, $3)",
                    &[p(&m.version), p(&m.name), p(&checksum)],
                )
                .await?;
                State::AppliedNow
            }
        };
        tx.commit()
            .await
            .with_context(|| format!("cannot commit migration {}_{}", m.version, m.name))?;
        migrations.push(MigrationStatus {
            version: m.version,
            name: m.name,
            checksum,
            state,
        });
    }
    let partitions_created = ensure_partitions_ahead(client).await?;
    Ok(Report {
        migrations,
        partitions_created,
    })
}

/// Creates the daily partitions from yesterday through 7 days ahead; returns how many.
pub async fn ensure_partitions_ahead(client: &mut Client) -> anyhow::Result<i32> {
    let tx = client.transaction().await?;
    lock(&tx).await?;
    let n: i32 = tx
        .query_typed_one(
            "SELECT pipewatch_ensure_partitions(now() - interval '1 day', now() + interval '7 days')", &[])
        .await
        .context("cannot create the daily partitions")?
        .get(0);
    tx.commit().await?;
    Ok(n)
}

async fn lock(tx: &impl GenericClient) -> anyhow::Result<()> {
    tx.execute_typed("SELECT pg_advisory_xact_lock($1)", &[p(&LOCK_KEY)])
        .await
        .context("cannot take the migration lock")?;
    Ok(())
}

/// What `--force` drops: every monitoring object and the agent's bookkeeping. `experiments`
/// and the roles stay.
const DROP_SQL: &str = "
DROP VIEW IF EXISTS active_pipeline_monitoring, experiment_progress_summary,
                    recent_experiment_errors CASCADE;
DROP TABLE IF EXISTS pipeline_logs, pipeline_events, pipeline_metrics, pipeline_progress,
                     pipewatch_checkpoints, pipewatch_agents, pipewatch_schema_migrations CASCADE;
DROP FUNCTION IF EXISTS get_progress_tree(uuid),
                        get_experiment_logs(uuid, text, text, integer, timestamptz, text),
                        get_error_summary(uuid, timestamptz),
                        cleanup_old_logs(integer),
                        pipewatch_cleanup_older_than(interval),
                        pipewatch_cleanup_before(timestamptz),
                        update_parent_progress(),
                        pipewatch_ensure_partitions(timestamptz, timestamptz),
                        pipewatch_level_rank(text) CASCADE;
";

/// Drops every monitoring object and all its data (for `migrate --force`), in one
/// transaction under the migration lock. The caller has confirmed.
pub async fn drop_all(client: &mut Client) -> anyhow::Result<()> {
    let tx = client.transaction().await?;
    lock(&tx).await?;
    tx.batch_execute(DROP_SQL)
        .await
        .context("cannot drop the monitoring objects")?;
    tx.commit().await?;
    Ok(())
}

/// An experiment row, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Experiment {
    pub id: Uuid,
    pub name: String,
}

/// Up to `limit` experiments, newest first where `created_at` exists.
pub async fn list_experiments(
    client: &impl GenericClient,
    limit: i64,
) -> anyhow::Result<Vec<Experiment>> {
    let rows = client
        .query_typed(
            "SELECT id, coalesce(name::text, '') FROM experiments ORDER BY id LIMIT $1",
            &[p(&limit)],
        )
        .await
        .context("cannot list experiments")?;
    Ok(rows
        .iter()
        .map(|r| Experiment {
            id: r.get(0),
            name: r.get(1),
        })
        .collect())
}

/// The experiment with this id, if any.
pub async fn find_experiment(
    client: &impl GenericClient,
    id: Uuid,
) -> anyhow::Result<Option<Experiment>> {
    let row = client
        .query_typed_opt(
            "SELECT id, coalesce(name::text, '') FROM experiments WHERE id = $1",
            &[p(&id)],
        )
        .await
        .context("cannot read experiments")?;
    Ok(row.map(|r| Experiment {
        id: r.get(0),
        name: r.get(1),
    }))
}

/// Rows written by [`insert_test_data`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestDataCounts {
    pub progress_nodes: i64,
    pub logs: i64,
    pub errors: i64,
    pub events: i64,
    pub metrics: i64,
}

/// The sample written by `--test-data`: a 3-level progress tree (the pipeline and phase
/// rows are named here and aggregated by the trigger), logs from DEBUG to CRITICAL with a traceback, events and a
/// short metrics series, all from host `pipewatch-test` and daemon `test-data`.
const TEST_PARENTS_SQL: &str = r#"
INSERT INTO pipeline_progress AS t (experiment_id, node_id, parent_node_id, level, name, status,
                                   updated_at)
SELECT $1, node_id, parent, level, name, 'pending', now() - interval '1 hour'
  FROM (VALUES
    ('geo_pipeline', NULL, 'pipeline', 'Geo clustering pipeline'),
    ('ingest', 'geo_pipeline', 'phase', 'Ingest'),
    ('clustering', 'geo_pipeline', 'phase', 'Clustering'),
    ('export', 'geo_pipeline', 'phase', 'Export')
  ) AS v(node_id, parent, level, name)
ON CONFLICT (experiment_id, node_id) DO UPDATE
   SET parent_node_id = EXCLUDED.parent_node_id, level = EXCLUDED.level, name = EXCLUDED.name
"#;

/// The steps of the sample tree; the trigger aggregates them into the rows above.
const TEST_STEPS_SQL: &str = r#"
INSERT INTO pipeline_progress AS t (experiment_id, node_id, parent_node_id, level, name, status,
                                   progress_percent, items_done, items_total, started_at,
                                   completed_at, updated_at)
SELECT $1, node_id, parent, 'step', name, status, pct, done, total,
       CASE WHEN status <> 'pending' THEN now() - make_interval(mins => age + 10) END,
       CASE WHEN status = 'completed' THEN now() - make_interval(mins => age) END,
       now() - make_interval(mins => age)
  FROM (VALUES
    ('ingest.download',  'ingest',     'Download tiles',   'completed', 100::numeric, 120, 120, 50),
    ('ingest.validate',  'ingest',     'Validate tiles',   'completed', 100,          120, 120, 45),
    ('cluster.features', 'clustering', 'Extract features', 'completed', 100,          120, 120, 35),
    ('cluster.kmeans',   'clustering', 'K-means',          'running',   62.5,         75,  120, 5),
    ('cluster.merge',    'clustering', 'Merge clusters',   'pending',   NULL,         NULL, NULL, 5),
    ('export.geojson',   'export',     'Write GeoJSON',    'pending',   NULL,         NULL, NULL, 5)
  ) AS v(node_id, parent, name, status, pct, done, total, age)
ON CONFLICT (experiment_id, node_id) DO UPDATE
   SET status = EXCLUDED.status, progress_percent = EXCLUDED.progress_percent,
       items_done = EXCLUDED.items_done, items_total = EXCLUDED.items_total,
       started_at = EXCLUDED.started_at, completed_at = EXCLUDED.completed_at,
       updated_at = EXCLUDED.updated_at
"#;

/// Inserts a realistic sample for `experiment_id` (which need not exist in `experiments`;
/// the CLI checks that first). Returns the rows written.
pub async fn insert_test_data(
    client: &impl GenericClient,
    experiment_id: Uuid,
) -> anyhow::Result<TestDataCounts> {
    // Progress: the tree's upper rows first (so they carry names), then the steps.
    for sql in [TEST_PARENTS_SQL, TEST_STEPS_SQL] {
        client
            .execute_typed(sql, &[p(&experiment_id)])
            .await
            .context("cannot insert test progress")?;
    }
    let logs = client
        .execute_typed(
            r#"INSERT INTO pipeline_logs (ts, level, message, logger, experiment_id, node_id, stage,
                                         context, traceback, metrics, host, daemon, source)
               SELECT now() - make_interval(mins => m), lvl, msg, lg, $1, node, stage,
                      jsonb_build_object('test_data', true), tb, met::jsonb,
                      'pipewatch-test', 'test-data', '/var/log/geo/test-data.jsonl'
                 FROM (VALUES
                   (55, 'INFO', 'Pipeline started', 'geo.pipeline', 'geo_pipeline', 'ingest', NULL, NULL),
                   (50, 'DEBUG', 'Connecting to tile store', 'geo.ingest', 'ingest.download', 'ingest', NULL, NULL),
                   (46, 'INFO', 'Processed 120/120 tiles', 'geo.ingest', 'ingest.download', 'ingest', NULL, '{"tiles_per_sec": 4.1}'),
                   (44, 'WARNING', 'Tile 17 has no elevation data; using defaults', 'geo.ingest', 'ingest.validate', 'ingest', NULL, NULL),
                   (36, 'INFO', 'Extracted features for 120 tiles', 'geo.features', 'cluster.features', 'clustering', NULL, '{"features": 48213, "seconds": 512.4}'),
                   (20, 'INFO', 'K-means iteration 10, inertia 1834.2', 'geo.kmeans', 'cluster.kmeans', 'clustering', NULL, NULL),
                   (12, 'ERROR', 'Failed to load tile 93: MemoryError', 'geo.kmeans', 'cluster.kmeans', 'clustering',
                    E'Traceback (most recent call last):\n  File "/opt/geo/kmeans.py", line 88, in load_tile\n    data = np.load(path)\nMemoryError: Unable to allocate 2.1 GiB', NULL),
                   (8, 'ERROR', 'Failed to load tile 93: MemoryError', 'geo.kmeans', 'cluster.kmeans', 'clustering',
                    E'Traceback (most recent call last):\n  File "/opt/geo/kmeans.py", line 88, in load_tile\n    data = np.load(path)\nMemoryError: Unable to allocate 2.1 GiB', NULL),
                   (6, 'INFO', 'Retrying tile 93 with a smaller chunk size', 'geo.kmeans', 'cluster.kmeans', 'clustering', NULL, NULL),
                   (5, 'INFO', 'Processed 75/120 tiles', 'geo.kmeans', 'cluster.kmeans', 'clustering', NULL, '{"tiles_per_sec": 0.8}')
                 ) AS v(m, lvl, msg, lg, node, stage, tb, met)"#, &[p(&experiment_id)])
        .await
        .context("cannot insert test logs")?;
    let events = client
        .execute_typed(
            r#"INSERT INTO pipeline_events (ts, experiment_id, node_id, event_type, severity, message,
                                           details, host, daemon)
               SELECT now() - make_interval(mins => m), $1, node, et, sev, msg, det::jsonb,
                      'pipewatch-test', 'test-data'
                 FROM (VALUES
                   (55, 'geo_pipeline', 'daemon_started', 'INFO', 'Daemon test-data started', '{"pid": 4242}'),
                   (36, 'cluster.features', 'stage_completed', 'INFO', 'Feature extraction finished', '{"tiles": 120}'),
                   (12, 'cluster.kmeans', 'out_of_memory', 'CRITICAL', 'MemoryError while loading tile 93', '{"tile": 93}')
                 ) AS v(m, node, et, sev, msg, det)"#, &[p(&experiment_id)])
        .await
        .context("cannot insert test events")?;
    let metrics = client
        .execute_typed(
            r#"INSERT INTO pipeline_metrics (ts, experiment_id, node_id, host, daemon, pid, cpu_percent,
                                            memory_rss_bytes, memory_percent,
                                            disk_read_bytes_per_sec, disk_write_bytes_per_sec,
                                            disk_used_percent, records_per_sec, custom)
               SELECT now() - make_interval(mins => m), $1, 'cluster.kmeans', 'pipewatch-test',
                      'test-data', 4242, 85 + m, (2.0 + m / 10.0) * 1073741824, 25 + m / 2.0,
                      1048576 * m, 524288, 61.5, 0.8,
                      jsonb_build_object('test_data', true)
                 FROM generate_series(0, 50, 10) AS m"#, &[p(&experiment_id)])
        .await
        .context("cannot insert test metrics")?;
    let nodes: i64 = client
        .query_typed_one(
            "SELECT count(*) FROM pipeline_progress WHERE experiment_id = $1",
            &[p(&experiment_id)],
        )
        .await?
        .get(0);
    Ok(TestDataCounts {
        progress_nodes: nodes,
        logs: logs as i64,
        errors: 2,
        events: events as i64,
        metrics: metrics as i64,
    })
}
