//! `pipewatch verify`: the seed's `test_monitoring_schema.py` as a command.
//!
//! Checks that every object exists, then, inside one transaction that is always rolled
//! back, inserts test data and checks the progress trigger (3 levels, status and failure
//! propagation), every query function and view, partition creation, retention and the
//! agent role. Prints a checklist; exits 1 when any check fails. Leaves no data behind.

use super::out::outln;
use super::Context;
use crate::db::migrate::{self, State};
use crate::db::schema::{self, Inventory, Kind};
use crate::db::typed::p;
use crate::exit::Code;
use anyhow::{bail, ensure};
use futures_util::SinkExt;
use std::fmt::Debug;
use tokio_postgres::Client;
use uuid::Uuid;

#[derive(Debug, clap::Args)]
pub struct Args {}

/// The outcome of one check.
#[derive(Debug)]
enum Outcome {
    Pass(String),
    Fail(String),
    Skip(String),
}

/// A check's body: `Ok(Some(detail))` passes, `Ok(None)` is skipped, `Err` fails.
type Body = anyhow::Result<Option<String>>;

struct Checklist {
    items: Vec<(String, Outcome)>,
}

impl Checklist {
    fn push(&mut self, name: &str, r: Body) {
        let outcome = match r {
            Ok(Some(d)) => Outcome::Pass(d),
            Ok(None) => Outcome::Skip(String::new()),
            Err(e) => Outcome::Fail(format!("{e:#}").replace('\n', " ")),
        };
        self.items.push((name.to_string(), outcome));
    }
}

/// Runs a check inside a savepoint so that a failing statement does not abort the rest.
macro_rules! check {
    ($list:expr, $client:expr, $name:expr, $body:expr) => {{
        $client.batch_execute("SAVEPOINT pw_check").await?;
        let r: Body = $body.await;
        if r.is_ok() {
            $client.batch_execute("RELEASE SAVEPOINT pw_check").await?;
        } else {
            $client
                .batch_execute("ROLLBACK TO SAVEPOINT pw_check")
                .await?;
        }
        $list.push($name, r);
    }};
}

fn expect_eq<T: PartialEq + Debug>(what: &str, got: T, want: T) -> anyhow::Result<()> {
    ensure!(got == want, "{what}: expected {want:?}, got {got:?}");
    Ok(())
}

pub async fn execute(_args: Args, ctx: &Context) -> anyhow::Result<Code> {
    let client = ctx.connect().await?;
    let list = run(&client).await?;
    let mut failed = 0;
    let mut skipped = 0;
    outln!("Success Metrics:");
    for (name, outcome) in &list.items {
        match outcome {
            Outcome::Pass(d) if d.is_empty() => outln!("  ✅ {name}"),
            Outcome::Pass(d) => outln!("  ✅ {name} ({d})"),
            Outcome::Skip(d) => {
                skipped += 1;
                outln!("  ➖ {name}: skipped{d}");
            }
            Outcome::Fail(e) => {
                failed += 1;
                outln!("  ❌ {name}: {e}");
            }
        }
    }
    let total = list.items.len();
    if failed == 0 {
        outln!(
            "All {} checks passed{}; test data rolled back.",
            total - skipped,
            if skipped > 0 {
                format!(" ({skipped} skipped)")
            } else {
                String::new()
            }
        );
        Ok(Code::Success)
    } else {
        outln!("{failed} of {total} checks FAILED; test data rolled back.");
        Ok(Code::Failure)
    }
}

fn objects(inv: &Inventory, kind: Kind, names: &[&str]) -> Body {
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !inv.has(kind, n))
        .collect();
    ensure!(missing.is_empty(), "missing: {}", missing.join(", "));
    Ok(Some(names.join(", ")))
}

/// Every check, in order. Everything after the object checks happens in a transaction
/// that is rolled back before returning.
async fn run(client: &Client) -> anyhow::Result<Checklist> {
    let mut list = Checklist { items: Vec::new() };
    let inv = schema::inspect(client).await?;
    list.push(
        "All 4 monitoring tables created",
        objects(&inv, Kind::Table, schema::MONITORING_TABLES),
    );
    list.push(
        "Experiments and bookkeeping tables created",
        objects(&inv, Kind::Table, schema::OTHER_TABLES),
    );
    list.push(
        "All 3 monitoring views created",
        objects(&inv, Kind::View, schema::VIEWS),
    );
    list.push(
        "All 5 utility functions created",
        objects(&inv, Kind::Function, schema::FUNCTIONS),
    );
    list.push(
        "Partition helper functions created",
        objects(&inv, Kind::Function, schema::HELPER_FUNCTIONS),
    );
    list.push("Progress aggregation trigger installed", {
        let t = inv.items.iter().find(|i| i.kind == Kind::Trigger);
        match t {
            Some(t) if t.present => Ok(Some(schema::TRIGGER.to_string())),
            _ => Err(anyhow::anyhow!(
                "trigger {} on pipeline_progress is missing",
                schema::TRIGGER
            )),
        }
    });
    list.push("Default and today's partitions exist", {
        let missing: Vec<&str> = inv
            .items
            .iter()
            .filter(|i| i.kind == Kind::Partition && !i.present)
            .map(|i| i.name.as_str())
            .collect();
        if missing.is_empty() {
            Ok(Some("logs, events, metrics".to_string()))
        } else {
            Err(anyhow::anyhow!("missing: {}", missing.join(", ")))
        }
    });
    list.push("Every migration applied and unchanged", {
        match migrate::status(client).await {
            Err(e) => Err(e),
            Ok(ms) => {
                let bad: Vec<String> = ms
                    .iter()
                    .filter_map(|m| match &m.state {
                        State::Pending => Some(format!("{} pending", m.version)),
                        State::Changed { .. } => Some(format!("{} changed", m.version)),
                        _ => None,
                    })
                    .collect();
                if bad.is_empty() {
                    Ok(Some(format!("{} applied", ms.len())))
                } else {
                    Err(anyhow::anyhow!("{}", bad.join(", ")))
                }
            }
        }
    });

    client.batch_execute("BEGIN").await?;
    let result = data_checks(client, &mut list).await;
    let rollback = client.batch_execute("ROLLBACK").await;
    result?;
    rollback?;
    Ok(list)
}

async fn data_checks(c: &Client, list: &mut Checklist) -> anyhow::Result<()> {
    // Fresh ids from the server (gen_random_uuid is built in since PostgreSQL 13).
    let ids = c
        .query_typed_one("SELECT gen_random_uuid(), gen_random_uuid()", &[])
        .await?;
    let (sample, tree): (Uuid, Uuid) = (ids.get(0), ids.get(1));

    check!(list, c, "Test data insertion working", async {
        // The experiment row is optional (a real experiments table may demand more columns).
        c.batch_execute("SAVEPOINT pw_exp").await?;
        let named = c
            .execute_typed(
                "INSERT INTO experiments (id, name) VALUES ($1, 'pipewatch verify')",
                &[p(&sample)],
            )
            .await;
        if named.is_err() {
            c.batch_execute("ROLLBACK TO SAVEPOINT pw_exp").await?;
        } else {
            c.batch_execute("RELEASE SAVEPOINT pw_exp").await?;
        }
        let n = migrate::insert_test_data(c, sample).await?;
        expect_eq("progress nodes", n.progress_nodes, 10)?;
        expect_eq("log records", n.logs, 10)?;
        expect_eq("events", n.events, 3)?;
        expect_eq("metric samples", n.metrics, 6)?;
        Ok(Some(format!(
            "{} logs, {} events, {} metrics, {} progress nodes",
            n.logs, n.events, n.metrics, n.progress_nodes
        )))
    });

    check!(
        list,
        c,
        "Progress aggregation trigger working (percent through 3 levels)",
        async {
            c.execute_typed(
                "INSERT INTO pipeline_progress (experiment_id, node_id, parent_node_id, level, status, progress_percent)
                 VALUES ($1, 'root', NULL, 'pipeline', 'pending', NULL),
                        ($1, 'pa', 'root', 'phase', 'pending', NULL),
                        ($1, 'pb', 'root', 'phase', 'pending', NULL),
                        ($1, 'a1', 'pa', 'step', 'completed', 100),
                        ($1, 'a2', 'pa', 'step', 'running', 50),
                        ($1, 'b1', 'pb', 'step', 'pending', NULL)", &[p(&tree)])
            .await?;
            let got = node_states(c, tree, &["pa", "pb", "root"]).await?;
            expect_eq(
                "pa, pb, root",
                got,
                vec![
                    ("running".into(), "75.00".into()),
                    ("pending".into(), "0.00".into()),
                    ("running".into(), "37.50".into()),
                ],
            )?;
            Ok(Some("75 % and 0 % → 37.5 % at the root".into()))
        }
    );

    check!(
        list,
        c,
        "Status propagation: completed reaches the root",
        async {
            c.execute_typed(
                "UPDATE pipeline_progress SET status = 'completed', progress_percent = 100,
                    completed_at = now()
              WHERE experiment_id = $1 AND node_id IN ('a2', 'b1')",
                &[p(&tree)],
            )
            .await?;
            let got = node_states(c, tree, &["pa", "pb", "root"]).await?;
            let done = ("completed".to_string(), "100.00".to_string());
            expect_eq("pa, pb, root", got, vec![done.clone(), done.clone(), done])?;
            let completed_at: bool = c
                .query_typed_one(
                    "SELECT completed_at IS NOT NULL FROM pipeline_progress
                  WHERE experiment_id = $1 AND node_id = 'root'",
                    &[p(&tree)],
                )
                .await?
                .get(0);
            expect_eq("root completed_at set", completed_at, true)?;
            Ok(Some(String::new()))
        }
    );

    check!(list, c, "Failure propagation", async {
        c.execute_typed(
            "UPDATE pipeline_progress SET status = 'failed'
              WHERE experiment_id = $1 AND node_id = 'b1'",
            &[p(&tree)],
        )
        .await?;
        let got: Vec<String> = node_states(c, tree, &["pa", "pb", "root"])
            .await?
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        expect_eq(
            "pa, pb, root",
            got,
            vec!["completed".into(), "failed".into(), "failed".into()],
        )?;
        Ok(Some(
            "a failed step fails its phase and the pipeline".into(),
        ))
    });

    check!(list, c, "Missing parent rows are created", async {
        c.execute_typed(
            "INSERT INTO pipeline_progress (experiment_id, node_id, parent_node_id, level, status, progress_percent)
             VALUES ($1, 'orphan', 'ghost', 'step', 'running', 40)", &[p(&tree)])
        .await?;
        let row = c
            .query_typed_opt(
                "SELECT name, level, status, progress_percent::text FROM pipeline_progress
                  WHERE experiment_id = $1 AND node_id = 'ghost'",
                &[p(&tree)],
            )
            .await?;
        let Some(row) = row else {
            bail!("no row for parent 'ghost'");
        };
        let got: (String, String, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        expect_eq(
            "ghost",
            got,
            (
                "ghost".into(),
                "phase".into(),
                "running".into(),
                "40.00".into(),
            ),
        )?;
        Ok(Some(String::new()))
    });

    check!(
        list,
        c,
        "get_progress_tree returns the tree depth first",
        async {
            let rows = c
                .query_typed(
                    "SELECT node_id, depth FROM get_progress_tree($1)",
                    &[p(&tree)],
                )
                .await?;
            let got: Vec<(String, i32)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            let want: Vec<(String, i32)> = [
                ("root", 0),
                ("pa", 1),
                ("a1", 2),
                ("a2", 2),
                ("pb", 1),
                ("b1", 2),
                ("ghost", 0),
                ("orphan", 1),
            ]
            .iter()
            .map(|(n, d)| (n.to_string(), *d))
            .collect();
            expect_eq("node_id, depth", got, want)?;
            Ok(Some("8 nodes".into()))
        }
    );

    check!(
        list,
        c,
        "get_experiment_logs: level, search, limit",
        async {
            let count = |level: Option<&'static str>, search: Option<&'static str>, limit: i32| async move {
                let rows = c
                    .query_typed(
                        "SELECT level FROM get_experiment_logs($1, $2, $3, $4)",
                        &[p(&sample), p(&level), p(&search), p(&limit)],
                    )
                    .await?;
                anyhow::Ok(rows.len())
            };
            expect_eq("all records", count(None, None, 100).await?, 10)?;
            expect_eq(
                "p_level => 'WARNING'",
                count(Some("WARNING"), None, 100).await?,
                3,
            )?;
            expect_eq(
                "p_level => 'ERROR'",
                count(Some("ERROR"), None, 100).await?,
                2,
            )?;
            expect_eq(
                "p_level => 'CRITICAL'",
                count(Some("CRITICAL"), None, 100).await?,
                0,
            )?;
            expect_eq(
                "p_search => 'memoryerror'",
                count(None, Some("memoryerror"), 100).await?,
                2,
            )?;
            expect_eq(
                "p_search in traceback 'np.load'",
                count(None, Some("np.load"), 100).await?,
                2,
            )?;
            expect_eq(
                "p_search => '%' (literal)",
                count(None, Some("%"), 100).await?,
                0,
            )?;
            expect_eq("p_limit => 3", count(None, None, 3).await?, 3)?;
            let newest: bool = c
                .query_typed_one(
                    "SELECT bool_and(ok) FROM (
                    SELECT ts <= lag(ts) OVER () OR lag(ts) OVER () IS NULL AS ok
                      FROM get_experiment_logs($1)) s",
                    &[p(&sample)],
                )
                .await?
                .get(0);
            expect_eq("newest first", newest, true)?;
            Ok(Some("10 / WARNING 3 / ERROR 2 / search 2 / limit 3".into()))
        }
    );

    check!(list, c, "get_error_summary groups errors", async {
        let rows = c
            .query_typed(
                "SELECT message, count, nodes, sample_traceback IS NOT NULL
                   FROM get_error_summary($1)",
                &[p(&sample)],
            )
            .await?;
        let got: Vec<(String, i64, Vec<String>, bool)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        expect_eq(
            "groups",
            got,
            vec![(
                "Failed to load tile 93: MemoryError".into(),
                2,
                vec!["cluster.kmeans".into()],
                true,
            )],
        )?;
        Ok(Some("1 message × 2, with traceback".into()))
    });

    check!(list, c, "recent_experiment_errors view", async {
        let n: i64 = c
            .query_typed_one(
                "SELECT count(*) FROM recent_experiment_errors WHERE experiment_id = $1",
                &[p(&sample)],
            )
            .await?
            .get(0);
        expect_eq("error rows", n, 2)?;
        Ok(Some("2 rows".into()))
    });

    check!(list, c, "experiment_progress_summary view", async {
        let row = c
            .query_typed_opt(
                "SELECT total_nodes, running_nodes, completed_nodes, overall_percent::text
                   FROM experiment_progress_summary WHERE experiment_id = $1",
                &[p(&sample)],
            )
            .await?;
        let Some(row) = row else {
            bail!("no row for the test experiment")
        };
        let got: (i64, i64, i64, String) = (row.get(0), row.get(1), row.get(2), row.get(3));
        expect_eq(
            "total, running, completed, percent",
            got,
            (10, 3, 4, "51.39".into()),
        )?;
        Ok(Some("10 nodes, 51.39 %".into()))
    });

    check!(list, c, "active_pipeline_monitoring view", async {
        let row = c
            .query_typed_opt(
                "SELECT records_last_hour, errors_last_hour, cpu_percent, running_nodes
                   FROM active_pipeline_monitoring
                  WHERE experiment_id = $1 AND host = 'pipewatch-test' AND daemon = 'test-data'",
                &[p(&sample)],
            )
            .await?;
        let Some(row) = row else {
            bail!("no row for the test daemon")
        };
        let got: (i64, i64, Option<f64>, i64) = (row.get(0), row.get(1), row.get(2), row.get(3));
        expect_eq(
            "records, errors, cpu, running nodes",
            got,
            (10, 2, Some(85.0), 3),
        )?;
        Ok(Some(String::new()))
    });

    check!(
        list,
        c,
        "pipewatch_ensure_partitions moves rows out of the default partition",
        async {
            let ts = "now() + interval '20 days'";
            c.execute_typed(
                &format!(
                    "INSERT INTO pipeline_logs (ts, level, message, experiment_id)
                 VALUES ({ts}, 'INFO', 'future record', $1)"
                ),
                &[p(&sample)],
            )
            .await?;
            c.execute_typed(
                &format!("SELECT pipewatch_ensure_partitions({ts}, {ts})"),
                &[],
            )
            .await?;
            let row = c
                .query_typed_one(
                    "SELECT tableoid::regclass::text,
                        'pipeline_logs_p' || to_char((ts AT TIME ZONE 'UTC')::date, 'YYYYMMDD')
                   FROM pipeline_logs WHERE experiment_id = $1 AND message = 'future record'",
                    &[p(&sample)],
                )
                .await?;
            let (got, want): (String, String) = (row.get(0), row.get(1));
            expect_eq("partition", got, want.clone())?;
            Ok(Some(want))
        }
    );

    check!(list, c, "cleanup_old_logs removes old rows", async {
        c.execute_typed(
            "INSERT INTO pipeline_logs (ts, level, message, experiment_id)
             VALUES (now() - interval '4000 days', 'INFO', 'ancient', $1)",
            &[p(&sample)],
        )
        .await?;
        c.execute_typed(
            "INSERT INTO pipeline_events (ts, experiment_id, event_type)
             VALUES (now() - interval '4000 days', $1, 'ancient')",
            &[p(&sample)],
        )
        .await?;
        c.execute_typed(
            "INSERT INTO pipeline_metrics (ts, experiment_id) VALUES (now() - interval '4000 days', $1)", &[p(&sample)])
        .await?;
        let removed: i64 = c
            .query_typed_one("SELECT cleanup_old_logs(3650)", &[])
            .await?
            .get(0);
        ensure!(
            removed >= 3,
            "cleanup_old_logs(3650) returned {removed}, expected at least 3"
        );
        let left: i64 = c
            .query_typed_one(
                "SELECT (SELECT count(*) FROM pipeline_logs WHERE experiment_id = $1)
                      + (SELECT count(*) FROM pipeline_events WHERE experiment_id = $1)
                      + (SELECT count(*) FROM pipeline_metrics WHERE experiment_id = $1)",
                &[p(&sample)],
            )
            .await?
            .get(0);
        // 10 logs + 1 future log + 3 events + 6 metrics remain.
        expect_eq("rows left", left, 20)?;
        Ok(Some(format!(
            "{removed} old rows removed, recent rows kept"
        )))
    });

    check!(
        list,
        c,
        "pipewatch_agent can COPY into pipeline_logs but not DELETE",
        async { agent_role(c, sample).await }
    );
    Ok(())
}

/// Status and percent (as text) of the given nodes, in that order.
async fn node_states(
    c: &Client,
    experiment: Uuid,
    nodes: &[&str],
) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for n in nodes {
        let row = c
            .query_typed_opt(
                "SELECT status, coalesce(progress_percent::text, 'NULL') FROM pipeline_progress
                  WHERE experiment_id = $1 AND node_id = $2",
                &[p(&experiment), p(n)],
            )
            .await?;
        match row {
            Some(r) => out.push((r.get(0), r.get(1))),
            None => bail!("node {n} does not exist"),
        }
    }
    Ok(out)
}

/// As `pipewatch_agent`: COPY into the parent table works, DELETE is refused. Skipped when
/// the role does not exist or this user may not act as it.
async fn agent_role(c: &Client, experiment: Uuid) -> Body {
    let usable: bool = c
        .query_typed_one(
            "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pipewatch_agent')
                AND pg_has_role(current_user, 'pipewatch_agent', 'USAGE')",
            &[],
        )
        .await?
        .get(0);
    if !usable {
        return Ok(None);
    }
    // COPY into a missing table leaves the connection's protocol state confused; ask first.
    let table: bool = c
        .query_typed_one("SELECT to_regclass('pipeline_logs') IS NOT NULL", &[])
        .await?
        .get(0);
    ensure!(table, "pipeline_logs does not exist");
    c.batch_execute("SET LOCAL ROLE pipewatch_agent").await?;
    let result = async {
        let sink = c
            .copy_in(
                "COPY pipeline_logs (ts, level, message, experiment_id, host, daemon) FROM STDIN",
            )
            .await?;
        let line = format!(
            "2000-01-01 00:00:00+00\tINFO\tcopied as agent\t{experiment}\tverify\tverify\n"
        );
        let mut sink = Box::pin(sink);
        sink.send(bytes::Bytes::from(line)).await?;
        let n = sink.as_mut().finish().await?;
        expect_eq("rows copied", n, 1)?;
        c.batch_execute("SAVEPOINT pw_delete").await?;
        let denied = c
            .execute_typed(
                "DELETE FROM pipeline_logs WHERE experiment_id = $1",
                &[p(&experiment)],
            )
            .await;
        c.batch_execute("ROLLBACK TO SAVEPOINT pw_delete").await?;
        match denied {
            Ok(_) => bail!("DELETE was allowed"),
            Err(e)
                if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(Some("COPY ok, DELETE denied".to_string()))
    }
    .await;
    // On failure the check's savepoint rollback undoes SET LOCAL ROLE; on success reset it.
    if result.is_ok() {
        c.batch_execute("RESET ROLE").await?;
    }
    result
}
