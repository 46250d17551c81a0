//! Is the database usable by the agent, not only reachable? For `check-config`: every
//! migration applied, and the role able to do each thing the agent does — read checkpoints,
//! COPY into pipeline_logs, insert events and metrics, upsert progress, checkpoints and the
//! agent row, create partitions (and apply retention when configured) — tried for real in
//! one transaction that is rolled back. Each refusal names the grant or command that fixes it.
//!
//! Returns findings; never prints, never commits.

use super::migrate::{self, State};
use crate::db::typed::p;
use bytes::Bytes;
use futures_util::SinkExt;
use tokio_postgres::Client;

/// One line of the verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub ok: bool,
    pub text: String,
}

impl Finding {
    fn ok(text: impl Into<String>) -> Finding {
        Finding {
            ok: true,
            text: text.into(),
        }
    }

    fn fail(text: impl Into<String>) -> Finding {
        Finding {
            ok: false,
            text: text.into(),
        }
    }
}

/// The daemon name the trial rows carry (all rolled back).
const PROBE: &str = "pipewatch-check-config";

/// What the agent does, as SQL a role must be allowed to run: (what, statement). `$1` is the
/// agent's host.
const ACTIONS: &[(&str, &str)] = &[
    (
        "read pipewatch_checkpoints",
        "SELECT count(*) FROM pipewatch_checkpoints WHERE host = $1",
    ),
    (
        "insert into pipeline_events",
        "INSERT INTO pipeline_events (event_type, message, host, daemon) \
         VALUES ('agent_started', 'check-config', $1, 'pipewatch-check-config')",
    ),
    (
        "insert into pipeline_metrics",
        "INSERT INTO pipeline_metrics (host, daemon) VALUES ($1, 'pipewatch-check-config')",
    ),
    (
        "upsert pipeline_progress",
        "INSERT INTO pipeline_progress (experiment_id, node_id, status, details) \
         VALUES ('00000000-0000-4000-8000-00000000c0c0', 'pipewatch-check-config', 'running', \
                 jsonb_build_object('host', $1::text)) \
         ON CONFLICT (experiment_id, node_id) DO UPDATE SET status = EXCLUDED.status, \
         updated_at = EXCLUDED.updated_at",
    ),
    (
        "upsert pipewatch_checkpoints",
        "INSERT INTO pipewatch_checkpoints (host, daemon, fingerprint, path, position) \
         VALUES ($1, 'pipewatch-check-config', 'probe', '/dev/null', 0) \
         ON CONFLICT (host, daemon, fingerprint) DO UPDATE SET position = EXCLUDED.position",
    ),
    (
        "upsert pipewatch_agents",
        "INSERT INTO pipewatch_agents (agent_id, host, daemons) \
         VALUES ($1 || '/pipewatch-check-config', $1, ARRAY['pipewatch-check-config']) \
         ON CONFLICT (agent_id) DO UPDATE SET last_commit_at = now()",
    ),
    (
        "create daily partitions (pipewatch_ensure_partitions)",
        "SELECT pipewatch_ensure_partitions(now(), now() + interval '1 day') \
         WHERE $1::text IS NOT NULL",
    ),
];

/// Checks the schema version, then (when there is a schema) the role's privileges.
/// `retention`: the config asks this agent to apply retention.
pub async fn check(client: &mut Client, host: &str, retention: bool) -> Vec<Finding> {
    let mut findings = Vec::new();
    let schema_present = match migrate::status(&*client).await {
        Ok(statuses) => {
            let pending: Vec<String> = statuses
                .iter()
                .filter(|m| m.state == State::Pending)
                .map(|m| format!("{}_{}", m.version, m.name))
                .collect();
            let changed: Vec<String> = statuses
                .iter()
                .filter(|m| matches!(m.state, State::Changed { .. }))
                .map(|m| format!("{}_{}", m.version, m.name))
                .collect();
            let total = statuses.len();
            if pending.len() == total {
                findings.push(Finding::fail(
                    "schema: not created in this database: run `pipewatch migrate` (as a role that may create tables)",
                ));
                false
            } else {
                if pending.is_empty() {
                    findings.push(Finding::ok(format!(
                        "schema: all {total} migrations applied"
                    )));
                } else {
                    findings.push(Finding::fail(format!(
                        "schema: {} of {total} migrations pending ({}): run `pipewatch migrate`",
                        pending.len(),
                        pending.join(", ")
                    )));
                }
                if !changed.is_empty() {
                    findings.push(Finding::fail(format!(
                        "schema: migration {} changed since it was applied: this binary does not match the schema",
                        changed.join(", ")
                    )));
                }
                true
            }
        }
        Err(e) => {
            findings.push(Finding::fail(format!(
                "schema: cannot read pipewatch_schema_migrations: {}",
                explain(&e, &role(client).await)
            )));
            // A role without privileges: say which ones it lacks too.
            is_permission_error(&e)
        }
    };
    if schema_present {
        findings.extend(privileges(client, host, retention).await);
    }
    findings
}

async fn role(client: &Client) -> String {
    client
        .query_typed_one("SELECT current_user::text", &[])
        .await
        .map(|r| r.get::<_, String>(0))
        .unwrap_or_else(|_| "this role".to_string())
}

/// Tries each action under a savepoint (so one refusal does not hide the next) inside one
/// transaction, then rolls everything back.
async fn privileges(client: &mut Client, host: &str, retention: bool) -> Vec<Finding> {
    let user = role(client).await;
    let mut refused = Vec::new();
    let mut tried = Vec::new();
    let tx = match client.transaction().await {
        Ok(tx) => tx,
        Err(e) => {
            return vec![Finding::fail(format!(
                "role {user}: cannot open a transaction: {e}"
            ))]
        }
    };
    // COPY first: it is how every log row is written. COPY FROM needs INSERT; a refused
    // COPY can leave the connection unusable, so the privilege is asked first.
    tried.push("COPY into pipeline_logs");
    let may_insert = tx
        .query_typed_one("SELECT has_table_privilege('pipeline_logs', 'INSERT')", &[])
        .await
        .map(|r| r.get::<_, bool>(0));
    match may_insert {
        Ok(true) => {
            if let Err(e) = copy_probe(&tx, host).await {
                refused.push(format!(
                    "COPY into pipeline_logs: {}",
                    explain_pg(&e, &user)
                ));
                let _ = tx.batch_execute("ROLLBACK TO SAVEPOINT pw_probe").await;
            }
        }
        Ok(false) => refused.push(format!(
            "COPY into pipeline_logs: permission denied for table pipeline_logs; {}",
            grant(&user)
        )),
        Err(e) => refused.push(format!(
            "COPY into pipeline_logs: {}",
            explain_pg(&e, &user)
        )),
    }
    for (what, sql) in ACTIONS {
        tried.push(what);
        let result = async {
            tx.batch_execute("SAVEPOINT pw_probe").await?;
            tx.execute_typed(sql, &[p(&host)]).await
        }
        .await;
        if let Err(e) = result {
            refused.push(format!("{what}: {}", explain_pg(&e, &user)));
            let _ = tx.batch_execute("ROLLBACK TO SAVEPOINT pw_probe").await;
        }
    }
    if retention {
        tried.push("apply retention");
        let allowed = tx
            .query_typed_one(
                "SELECT has_function_privilege('pipewatch_apply_retention(interval,text,interval)', 'EXECUTE')", &[])
            .await
            .map(|r| r.get::<_, bool>(0));
        match allowed {
            Ok(true) => {}
            Ok(false) => refused.push(format!(
                "apply retention ([retention]): permission denied for function pipewatch_apply_retention; {}",
                grant(&user)
            )),
            Err(e) => refused.push(format!("apply retention: {}", explain_pg(&e, &user))),
        }
    }
    let rollback = tx.rollback().await;
    if refused.is_empty() {
        vec![Finding::ok(format!(
            "role {user} may do what the agent does ({}; tried and rolled back)",
            tried.join(", ")
        ))]
    } else {
        refused
            .into_iter()
            .map(|r| Finding::fail(format!("role {user} cannot {r}")))
            .chain(
                rollback.err().map(|e| {
                    Finding::fail(format!("role {user}: rolling the trial back failed: {e}"))
                }),
            )
            .collect()
    }
}

/// One row through the agent's own binary COPY, under a savepoint.
async fn copy_probe(
    tx: &tokio_postgres::Transaction<'_>,
    host: &str,
) -> Result<(), tokio_postgres::Error> {
    tx.batch_execute("SAVEPOINT pw_probe").await?;
    let sink = tx
        .copy_in::<_, Bytes>(crate::agent::copyrow::COPY_STATEMENT)
        .await?;
    futures_util::pin_mut!(sink);
    let row = crate::model::LogRow {
        ts: chrono::Utc::now(),
        level: crate::model::Level::Info,
        message: "check-config".into(),
        logger: None,
        experiment_id: None,
        node_id: None,
        stage: None,
        context: serde_json::json!({}),
        traceback: None,
        metrics: None,
        host: host.to_string(),
        daemon: PROBE.to_string(),
        source: None,
    };
    let mut buf = Vec::new();
    buf.extend_from_slice(crate::agent::copyrow::HEADER);
    buf.extend_from_slice(&crate::agent::copyrow::encode(&row).0);
    buf.extend_from_slice(crate::agent::copyrow::TRAILER);
    sink.send(Bytes::from(buf)).await?;
    sink.finish().await?;
    Ok(())
}

fn grant(user: &str) -> String {
    format!("grant the agent's role: `GRANT pipewatch_agent TO {user}` (as an administrator)")
}

fn is_permission_error(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<tokio_postgres::Error>())
        .any(|pg| pg.code().is_some_and(|c| c.code() == "42501"))
}

fn explain(e: &anyhow::Error, user: &str) -> String {
    match e
        .chain()
        .find_map(|c| c.downcast_ref::<tokio_postgres::Error>())
    {
        Some(pg) => explain_pg(pg, user),
        None => format!("{e:#}"),
    }
}

/// The server's reason and the fix: a grant for 42501, `migrate` for a missing object.
fn explain_pg(e: &tokio_postgres::Error, user: &str) -> String {
    let Some(db) = e.as_db_error() else {
        return e.to_string();
    };
    match db.code().code() {
        "42501" => format!("{}; {}", db.message(), grant(user)),
        "42P01" | "42883" | "42703" => {
            format!("{}; run `pipewatch migrate`", db.message())
        }
        _ => db.message().to_string(),
    }
}
