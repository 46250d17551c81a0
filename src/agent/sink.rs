//! The sink: writes each batch in one transaction — log rows by binary COPY, events, metrics,
//! progress upserts, the file positions and the agent's row — so rows and positions commit
//! together (exactly once). Retries on connection loss, splits a batch the database refuses
//! to isolate the bad record, and never loses the records behind it.
//!
//! A commit whose reply was lost is recognised inside the next attempt's own transaction:
//! it first locks the agent's row and compares `last_batch_id` with the batch's id. Every
//! attempt has a deadline (`query_timeout` plus time for the bytes it sends), so a connection
//! that went silent is dropped and replaced instead of waited on forever. A refused login is
//! a configuration error: fatal with `--once`, retried slowly (and said plainly) otherwise.
//!
//! The only agent module that talks to PostgreSQL.

use crate::agent::activity::SharedActivity;
use crate::agent::batch::{Batch, Checkpoint};
use crate::agent::copyrow::{self, EncodedRow};
use crate::agent::retry::{classify, Backoff, CatchUp, ErrorKind};
use crate::db::connect::LoginRefused;
use crate::db::DbTarget;
use crate::model::{EventRow, Level, LogRow, MetricRow, ProgressRow};
use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use futures_util::{pin_mut, SinkExt};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Transaction};
use uuid::Uuid;

const INSERT_EVENTS: &str = "INSERT INTO pipeline_events (ts, experiment_id, node_id, event_type, \
     severity, message, details, host, daemon) \
     SELECT * FROM unnest($1::timestamptz[], $2::uuid[], $3::text[], $4::text[], $5::text[], \
     $6::text[], $7::jsonb[], $8::text[], $9::text[])";

const INSERT_METRICS: &str =
    "INSERT INTO pipeline_metrics (ts, experiment_id, node_id, host, daemon, \
     pid, cpu_percent, memory_rss_bytes, memory_percent, disk_read_bytes_per_sec, \
     disk_write_bytes_per_sec, disk_used_percent, records_per_sec, custom) \
     SELECT * FROM unnest($1::timestamptz[], $2::uuid[], $3::text[], $4::text[], $5::text[], \
     $6::int4[], $7::float8[], $8::int8[], $9::float8[], $10::float8[], $11::float8[], \
     $12::float8[], $13::float8[], $14::jsonb[])";

const UPSERT_PROGRESS: &str = "INSERT INTO pipeline_progress AS p (experiment_id, node_id, \
     parent_node_id, level, name, status, progress_percent, items_done, items_total, started_at, \
     completed_at, updated_at, details) \
     VALUES ($1, $2, $3, $4, COALESCE($5, $2), COALESCE($6, 'running'), \
     (SELECT CASE WHEN v IS NOT NULL THEN GREATEST(0.0, LEAST(100.0, v)) END FROM (SELECT \
         COALESCE($7::float8, 100.0 * $8::int8 / NULLIF($9::int8, 0), \
                  CASE WHEN $6 = 'completed' THEN 100.0 END) AS v) AS pct), $8::int8, \
     $9::int8, CASE WHEN COALESCE($6, 'running') <> 'pending' THEN $12::timestamptz END, \
     CASE WHEN $6 IN ('completed', 'failed', 'cancelled') THEN $10::timestamptz END, $10::timestamptz, \
     COALESCE($11::jsonb, '{}'::jsonb)) \
     ON CONFLICT (experiment_id, node_id) DO UPDATE SET \
     parent_node_id = COALESCE(EXCLUDED.parent_node_id, p.parent_node_id), \
     level = COALESCE($4, p.level), \
     name = COALESCE($5, p.name), \
     status = COALESCE($6, p.status), \
     progress_percent = (SELECT CASE WHEN v IS NOT NULL THEN GREATEST(0.0, LEAST(100.0, v)) END \
         FROM (SELECT COALESCE($7::float8, \
             100.0 * COALESCE($8::int8, p.items_done) / NULLIF(COALESCE($9::int8, p.items_total), 0), \
             CASE WHEN $6 = 'completed' THEN 100.0 END, p.progress_percent) AS v) AS pct), \
     items_done = COALESCE($8::int8, p.items_done), \
     items_total = COALESCE($9::int8, p.items_total), \
     started_at = COALESCE(p.started_at, CASE WHEN COALESCE($6, p.status) <> 'pending' THEN $12::timestamptz END), \
     completed_at = CASE WHEN COALESCE($6, p.status) IN ('completed', 'failed', 'cancelled') \
                    THEN COALESCE(p.completed_at, $10::timestamptz) END, \
     updated_at = $10::timestamptz, \
     details = CASE WHEN $11::jsonb IS NULL THEN p.details ELSE COALESCE(p.details, '{}'::jsonb) || $11::jsonb END \
     WHERE p.updated_at <= $10::timestamptz";

const UPSERT_CHECKPOINTS: &str =
    "INSERT INTO pipewatch_checkpoints (host, daemon, fingerprint, path, \
     position, head_hash, tail_hash, sticky, updated_at) \
     SELECT $1, d, f, p, pos, hh, th, st, now() FROM unnest($2::text[], $3::text[], $4::text[], \
     $5::int8[], $6::text[], $7::text[], $8::jsonb[]) AS u(d, f, p, pos, hh, th, st) \
     ON CONFLICT (host, daemon, fingerprint) DO UPDATE SET path = EXCLUDED.path, \
     position = EXCLUDED.position, head_hash = EXCLUDED.head_hash, \
     tail_hash = EXCLUDED.tail_hash, sticky = EXCLUDED.sticky, updated_at = now()";

const LOAD_CHECKPOINTS: &str = "SELECT fingerprint, path, position, head_hash, tail_hash, sticky \
     FROM pipewatch_checkpoints WHERE host = $1 AND daemon = $2 ORDER BY updated_at";

const UPSERT_AGENT: &str = "INSERT INTO pipewatch_agents AS a (agent_id, host, daemons, version, \
     started_at, last_commit_at, last_batch_id, records_shipped, records_quarantined, details) \
     VALUES ($1, $2, $3, $4, $5, now(), $6, $7, $8, $9) \
     ON CONFLICT (agent_id) DO UPDATE SET host = EXCLUDED.host, daemons = EXCLUDED.daemons, \
     version = EXCLUDED.version, started_at = EXCLUDED.started_at, last_commit_at = now(), \
     last_batch_id = EXCLUDED.last_batch_id, \
     records_shipped = a.records_shipped + EXCLUDED.records_shipped, \
     records_quarantined = a.records_quarantined + EXCLUDED.records_quarantined, \
     details = EXCLUDED.details";

/// The longest wait between two attempts to reach the database.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The wait between two logins after the server refused one (±25 %): slow, since only a
/// person can fix it, but a password fixed under a running agent is picked up.
pub const LOGIN_RETRY: Duration = Duration::from_secs(45);

/// The login retry; `PIPEWATCH_LOGIN_RETRY_SECS` shortens it (for tests).
fn login_retry() -> Duration {
    std::env::var("PIPEWATCH_LOGIN_RETRY_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(LOGIN_RETRY)
}

/// Locks the agent's row for the rest of the transaction and reads the id of the last batch
/// it committed: the lost-reply check, serialised with any other transaction of this agent.
const LOCK_AGENT: &str =
    "SELECT last_batch_id FROM pipewatch_agents WHERE agent_id = $1 FOR UPDATE";

/// Creates the agent's row on its first commit (a concurrent creator wins; then it is locked).
const CREATE_AGENT: &str = "INSERT INTO pipewatch_agents (agent_id, host, daemons) \
     VALUES ($1, $2, $3) ON CONFLICT (agent_id) DO NOTHING";

/// Why a commit could not be completed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The database stayed unreachable (or kept failing) past the allowed time.
    #[error("database {target} unreachable for {secs} s: {last}")]
    Unreachable {
        target: String,
        secs: u64,
        last: String,
    },
    /// The schema is missing or the role lacks privileges.
    #[error("{0}")]
    Schema(String),
    /// The server refused the login (`--once` only; a running agent keeps trying slowly).
    #[error("{0}")]
    Login(LoginRefused),
    /// Shutdown's drain deadline passed before the batch could be committed.
    #[error("gave up committing at shutdown: {0}")]
    Deadline(String),
}

/// How the sink behaves when the database misbehaves.
#[derive(Debug, Clone)]
pub struct SinkOptions {
    /// Give up after the database has been unreachable this long (`run --once`: 30 s).
    pub give_up_after: Option<Duration>,
    /// Configuration errors — a missing schema or privilege, a refused login — are fatal
    /// (`--once`) rather than retried.
    pub schema_fatal: bool,
    /// The agent's stop signal: once it fires, retrying ends after `drain`.
    pub stop: Option<tokio_util::sync::CancellationToken>,
    pub drain: Duration,
}

/// A failed attempt: its kind, a one-line description, and whether the database could not
/// be reached at all (no connection, connection lost, no reply): that is an outage.
struct Failure {
    kind: ErrorKind,
    text: String,
    disconnected: bool,
    /// Set when the server refused the login.
    refused: Option<LoginRefused>,
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Failure {
        Failure {
            kind: classify(&e),
            text: describe(&e),
            disconnected: e.is_closed() || e.code().is_none(),
            refused: None,
        }
    }
}

impl Failure {
    /// No reply within `limit`: the connection is presumed dead.
    fn silent(limit: Duration) -> Failure {
        Failure {
            kind: ErrorKind::Retry,
            text: format!("no reply from the database for {}", seconds(limit)),
            disconnected: true,
            refused: None,
        }
    }
}

impl Failure {
    /// The batch streamed behind another found, once it held the agent's row, that the batch
    /// before it had not committed: it rolled back, and both are retried in order.
    fn out_of_order() -> Failure {
        Failure {
            kind: ErrorKind::Retry,
            text: "the batch before it did not commit".into(),
            disconnected: false,
            refused: None,
        }
    }
}

/// What a successful attempt found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    /// Committed now, with this many records quarantined.
    Now(usize),
    /// An earlier attempt had committed the batch; its reply was lost.
    Before,
    /// The batch streamed behind this one had committed, so this one had too (batches commit
    /// strictly in order); neither reply arrived.
    WithLater,
}

/// What an attempt's lost-reply check compares the agent's `last_batch_id` with.
#[derive(Debug, Clone, Copy)]
struct Check {
    /// This batch: equal means an earlier attempt committed it.
    id: Uuid,
    /// The batch that was streamed behind this one, if its fate is unknown: equal means both
    /// committed (it commits only after this one did).
    later: Option<Uuid>,
    /// Streamed behind this batch (which may still be committing on the other connection):
    /// lock the agent's row only after the rows, and commit only if this batch was the last.
    after: Option<Uuid>,
}

/// A connection and the task driving it.
struct Conn {
    client: Client,
    task: tokio::task::AbortHandle,
}

impl Conn {
    /// Drops the connection; its task is aborted so a silent socket is closed now.
    fn close(self) {
        self.task.abort();
    }
}

/// What every transaction of this agent writes besides the batch.
struct WriteCtx {
    agent_id: String,
    host: String,
    daemons: Vec<String>,
    started_at: DateTime<Utc>,
    details: Value,
    /// `BEGIN` and the transaction's settings.
    begin: String,
}

/// The future of one batch's write on its own connection: gives the connection back unless
/// it failed.
type WriteFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = (Option<Conn>, Result<Written, Failure>)> + Send>,
>;

/// A batch being written on a connection of its own (`Sink::ship`).
struct Flight {
    batch: std::sync::Arc<Batch>,
    barriers: Vec<tokio::sync::oneshot::Sender<()>>,
    check: Check,
    write: WriteFuture,
    /// Fires once this flight's transaction holds the agent's row (dropped if it never
    /// will): the batch streamed behind it asks for the row only then, so it queues behind.
    locked: Option<oneshot::Receiver<()>>,
}

/// The order of one flight's transaction among the agent's: it says when it holds the
/// agent's row, and the one behind it asks for the row only after that.
struct Turn {
    /// Told once this transaction holds the agent's row and found its predecessor committed.
    holding: Option<oneshot::Sender<()>>,
    /// Fires (or is dropped) once the transaction before holds the agent's row.
    before: Option<oneshot::Receiver<()>>,
}

/// A second connection unused this long is closed (a fleet keeps one connection per agent
/// except while an agent has a backlog).
pub const SPARE_IDLE: Duration = Duration::from_secs(30);

/// An outage in progress: since when, and how many attempts failed.
struct Outage {
    since: Instant,
    failed: u32,
}

/// "30 s", "2.5 s".
fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

pub use crate::db::connect::describe;

/// How long one attempt to write a batch may take: `query_timeout` for the replies, plus a
/// second per MiB sent (a link slower than 1 MiB/s is not "healthy"), times the passes that
/// isolating a refused record may make over the rows (halving: about log2(rows) + 2), plus
/// 10 ms per row for isolation's savepoints. A large legitimate batch is not cut; a silent
/// connection is noticed after about `query_timeout`.
pub fn attempt_deadline(
    query_timeout: Duration,
    bytes: usize,
    rows: usize,
    isolate: bool,
) -> Duration {
    let transfer = Duration::from_secs_f64(bytes as f64 / (1024.0 * 1024.0));
    if !isolate {
        return query_timeout + transfer;
    }
    let passes = 2 + (usize::BITS - rows.leading_zeros());
    query_timeout + transfer * passes + Duration::from_millis(10) * rows as u32
}

/// Settings of each of the sink's transactions, from `query_timeout`: a lock wait ends with
/// an error (retried) instead of hanging, and the server itself ends a transaction whose
/// connection went silent, releasing the agent's row for the next attempt.
///
/// `SET LOCAL`, sent first in every transaction, never a session `SET`: behind a pooler in
/// transaction mode the next transaction may run on another server connection, and a session
/// setting would leak to whichever client gets this one next.
fn transaction_settings(query_timeout: Duration) -> String {
    let ms = query_timeout.as_millis();
    format!(
        "SET LOCAL lock_timeout = '{}ms'; SET LOCAL idle_in_transaction_session_timeout = '{ms}ms'",
        ms / 2
    )
}

/// The sink's connection and identity.
pub struct Sink {
    target: DbTarget,
    client: Option<Client>,
    /// The task driving `client`'s connection; aborted to close a silent socket.
    conn_task: Option<tokio::task::AbortHandle>,
    /// Since when the database has been unreachable (or refusing the login), if it is.
    outage: Option<Outage>,
    /// Spaces out logins after a refusal.
    login_backoff: Backoff,
    /// Paces commits for a while after an outage (retry.rs).
    catch_up: CatchUp,
    pub agent_id: String,
    host: String,
    daemons: Vec<String>,
    started_at: DateTime<Utc>,
    activity: SharedActivity,
    options: SinkOptions,
    last_partition_check: Option<Instant>,
    /// When the agent's stop was first seen, plus the drain time.
    stopped_at: Option<tokio::time::Instant>,
    /// The second connection, open while there is a backlog (see [`Sink::ship`]), and when it
    /// was last used.
    spare: Option<(Conn, Instant)>,
    /// This sink has committed (so the agent's row exists).
    committed: bool,
}

impl Sink {
    pub fn new(
        target: DbTarget,
        host: String,
        daemons: Vec<String>,
        activity: SharedActivity,
        options: SinkOptions,
    ) -> Sink {
        let mut sorted = daemons.clone();
        sorted.sort();
        Sink {
            target: target.with_application_name(&format!("pipewatch/{host}")),
            client: None,
            conn_task: None,
            outage: None,
            login_backoff: Backoff::steady(login_retry()),
            catch_up: CatchUp::default(),
            agent_id: format!("{host}/{}", sorted.join(",")),
            host,
            daemons: sorted,
            started_at: Utc::now(),
            activity,
            options,
            last_partition_check: None,
            stopped_at: None,
            spare: None,
            committed: false,
        }
    }

    /// Connects (once) and returns the client; errors are connection failures or a refused
    /// login.
    async fn client(&mut self) -> Result<&mut Client, Failure> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.disconnect();
        }
        if self.client.is_none() {
            let (c, task) = match crate::db::tls::connect_with_task(&self.target).await {
                Ok(connected) => connected,
                Err(e) => {
                    return Err(match LoginRefused::find(&self.target, &e) {
                        Some(refused) => Failure {
                            kind: ErrorKind::Login,
                            text: refused.to_string(),
                            disconnected: false,
                            refused: Some(refused),
                        },
                        None => Failure {
                            kind: ErrorKind::Retry,
                            text: format!("{e:#}"),
                            disconnected: true,
                            refused: None,
                        },
                    })
                }
            };
            self.client = Some(c);
            self.conn_task = Some(task);
            self.note_reachable();
        }
        self.client.as_mut().ok_or_else(|| Failure {
            kind: ErrorKind::Retry,
            text: "not connected".into(),
            disconnected: true,
            refused: None,
        })
    }

    /// Drops the connection. Its task is aborted too: a request waiting on a silent socket
    /// would otherwise keep that socket open for as long as the kernel does.
    fn disconnect(&mut self) {
        self.client = None;
        if let Some(task) = self.conn_task.take() {
            task.abort();
        }
    }

    /// An open connection for a [`Flight`]: the main one, else the spare; `None` when neither
    /// is open (the flight connects).
    fn take_conn(&mut self) -> Option<Conn> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.disconnect();
        }
        match (self.client.take(), self.conn_task.take()) {
            (Some(client), Some(task)) => Some(Conn { client, task }),
            _ => self
                .spare
                .take()
                .map(|(c, _)| c)
                .filter(|c| !c.client.is_closed()),
        }
    }

    /// Takes back a flight's connection: as the main one if that is gone, else as the spare.
    fn return_conn(&mut self, conn: Option<Conn>) {
        let Some(conn) = conn else { return };
        if conn.client.is_closed() {
            conn.close();
        } else if self.client.is_none() {
            self.client = Some(conn.client);
            self.conn_task = Some(conn.task);
        } else if let Some((old, _)) = self.spare.replace((conn, Instant::now())) {
            old.close();
        }
    }

    /// Counts a failed attempt towards the current outage (or starts one), and tells
    /// systemd's `STATUS=` what is wrong.
    fn note_failure(&mut self, f: &Failure) {
        if !(f.disconnected || f.kind == ErrorKind::Login) {
            return;
        }
        let outage = self.outage.get_or_insert(Outage {
            since: Instant::now(),
            failed: 0,
        });
        outage.failed += 1;
        let problem = match &f.refused {
            Some(refused) => refused.to_string(),
            None => format!(
                "database unreachable for {}: {}",
                seconds(Duration::from_secs(outage.since.elapsed().as_secs())),
                f.text
            ),
        };
        crate::telemetry::sd_notify(&format!("STATUS={problem}"));
        if let Ok(mut a) = self.activity.lock() {
            a.agent.db_problem = Some(problem);
        }
    }

    /// Ends the current outage, if any, saying how long it lasted.
    fn note_reachable(&mut self) {
        self.login_backoff.reset();
        if let Some(outage) = self.outage.take() {
            self.catch_up.begin();
            let after = outage.since.elapsed();
            tracing::info!(
                after_secs = after.as_secs_f64(),
                attempts = outage.failed + 1,
                "database reachable again after {:.1} s ({} attempts)",
                after.as_secs_f64(),
                outage.failed + 1
            );
            if let Ok(mut a) = self.activity.lock() {
                a.agent.db_problem = None;
            }
        }
    }

    /// After a refused login: says plainly that this is a configuration error (on every
    /// attempt, so about once a minute) and returns the slow retry delay.
    fn login_refused(&mut self, f: &Failure) -> Duration {
        let delay = self.login_backoff.next_delay();
        tracing::error!(
            error = %f.text,
            retry_in = ?delay,
            "the database refused the login: fix the password, role or database name; this is not a network problem (retrying slowly)"
        );
        delay
    }

    /// Connects, retrying with backoff within the sink's limits. Used at startup.
    pub async fn connect(
        &mut self,
        stop: Option<&tokio_util::sync::CancellationToken>,
    ) -> Result<(), SinkError> {
        let mut backoff = Backoff::new(Duration::from_millis(100), MAX_BACKOFF);
        let first_failure = Instant::now();
        loop {
            let f = match self.client().await {
                Ok(_) => return Ok(()),
                Err(f) => f,
            };
            self.note_failure(&f);
            let delay = match f.refused {
                Some(refused) if self.options.schema_fatal => {
                    return Err(SinkError::Login(refused))
                }
                Some(_) => self.login_refused(&f),
                None => {
                    if let Some(limit) = self.options.give_up_after {
                        if first_failure.elapsed() >= limit {
                            return Err(SinkError::Unreachable {
                                target: self.target.display.clone(),
                                secs: limit.as_secs(),
                                last: f.text,
                            });
                        }
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %f.text, retry_in = ?delay, "cannot reach the database");
                    delay
                }
            };
            if let Some(stop) = stop {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return Err(SinkError::Deadline(f.text)),
                }
            } else {
                tokio::time::sleep(delay).await;
            }
        }
    }

    /// Loads this daemon's committed positions.
    pub async fn load_checkpoints(
        &mut self,
        daemon: &str,
    ) -> Result<Vec<crate::agent::tail::StoredCheckpoint>, SinkError> {
        let host = self.host.clone();
        let client = self.client().await.map_err(|f| SinkError::Schema(f.text))?;
        load_checkpoints(client, &host, daemon)
            .await
            .map_err(|e| SinkError::Schema(schema_hint(&describe(&e))))
    }

    /// Creates upcoming daily partitions (at start, then every few hours).
    async fn maintain_partitions(&mut self) {
        if self
            .last_partition_check
            .is_some_and(|t| t.elapsed() < Duration::from_secs(6 * 3600))
        {
            return;
        }
        self.last_partition_check = Some(Instant::now());
        let limit = self.target.limits.query_timeout;
        let settings = transaction_settings(limit);
        if let Ok(client) = self.client().await {
            // One message, so one implicit transaction: its settings apply to it alone.
            let sql = format!(
                "{settings}; SELECT pipewatch_ensure_partitions(now() - interval '1 day', now() + interval '3 days')"
            );
            let ensure = client.batch_execute(&sql);
            match tokio::time::timeout(limit, ensure).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %describe(&e), "cannot create upcoming partitions; rows go to the default partition")
                }
                Err(_) => {
                    tracing::warn!(
                        "no reply from the database for {}; reconnecting",
                        seconds(limit)
                    );
                    self.disconnect();
                }
            }
        }
    }

    /// Commits a batch, retrying and isolating as needed. Returns once the batch is durably
    /// committed, or with an error when the limits are exceeded (the batch is then not
    /// committed, and its lines are read again at the next start).
    pub async fn commit(
        &mut self,
        mut batch: Batch,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<(), SinkError> {
        let barriers = std::mem::take(&mut batch.barriers);
        let rows = batch.logs.len();
        let check = Check {
            id: Uuid::new_v4(),
            later: None,
            after: None,
        };
        self.commit_rows(&batch, check, deadline).await?;
        for b in barriers {
            let _ = b.send(());
        }
        // After an outage, a running agent follows a large batch with a pause (the next one
        // keeps filling); `run --once` is a backfill an operator asked for: full speed.
        let paced = self.options.give_up_after.is_none();
        if let Some(pause) = self.catch_up.pause_after(rows).filter(|_| paced) {
            match self.options.stop.clone() {
                Some(stop) => {
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = stop.cancelled() => {}
                    }
                }
                None => tokio::time::sleep(pause).await,
            }
        }
        Ok(())
    }

    /// Commits the batches `batches` yields, in order, until it closes: the agent's sink loop.
    ///
    /// A batch that arrives full while the one before it commits — a backlog — is streamed
    /// meanwhile on a second connection and commits right after it (`pipelined`, streamed
    /// behind). The second connection is opened only then and closed once unused for
    /// [`SPARE_IDLE`]. When a batch fails, the batch streamed behind it is awaited (it can only
    /// commit after finding the failed one committed), then whatever is not known committed
    /// is retried in order on one connection, the earlier batch's lost-reply check also
    /// recognising the later batch's id.
    pub async fn ship(&mut self, batches: &mut mpsc::Receiver<Batch>) -> Result<(), SinkError> {
        let mut next = None;
        loop {
            let batch = match next.take() {
                Some(batch) => batch,
                None => match self.receive(batches).await {
                    Some(batch) => batch,
                    None => return Ok(()),
                },
            };
            self.note_committing(Some(&batch));
            let result = if self.may_overlap() && !batch.is_empty() {
                self.ship_overlapped(batch, batches).await.map(|n| next = n)
            } else {
                self.commit(batch, None).await
            };
            self.note_committing(None);
            result?;
        }
    }

    /// The next batch; closes the spare connection when it has been idle long enough.
    async fn receive(&mut self, batches: &mut mpsc::Receiver<Batch>) -> Option<Batch> {
        loop {
            let Some((_, used)) = &self.spare else {
                return batches.recv().await;
            };
            let idle_at = tokio::time::Instant::from_std(*used + SPARE_IDLE);
            tokio::select! {
                batch = batches.recv() => return batch,
                _ = tokio::time::sleep_until(idle_at) => {
                    if let Some((conn, _)) = self.spare.take() {
                        conn.close();
                        tracing::debug!("closed the second connection (no backlog)");
                    }
                }
            }
        }
    }

    /// For the stuck watchdog: since when the oldest uncommitted batch has been committing.
    fn note_committing(&self, batch: Option<&Batch>) {
        let mut a = self.activity.lock().unwrap_or_else(|e| e.into_inner());
        a.agent.committing_since = batch.map(|_| Utc::now());
        a.agent.committing_rows = batch.map_or(0, Batch::rows);
    }

    /// Whether batches may be written as flights (and streamed behind one another): after this
    /// sink's first commit (the agent's row exists), not while a running agent paces its
    /// catch-up after an outage, not while stopping.
    fn may_overlap(&self) -> bool {
        let paced = self.options.give_up_after.is_none() && self.catch_up.active();
        let stopping = self.options.stop.as_ref().is_some_and(|s| s.is_cancelled());
        self.committed && !paced && !stopping
    }

    /// Commits `first`, streaming each batch that arrives full meanwhile behind it on the
    /// other connection. Returns a batch received but not started.
    async fn ship_overlapped(
        &mut self,
        first: Batch,
        batches: &mut mpsc::Receiver<Batch>,
    ) -> Result<Option<Batch>, SinkError> {
        self.maintain_partitions().await;
        let mut front = self.launch(first, None);
        loop {
            let arrived = tokio::select! {
                out = &mut front.write => Err(out),
                batch = batches.recv() => Ok(batch),
            };
            let behind = match arrived {
                Err(out) => {
                    self.land(front, out).await?;
                    return Ok(None);
                }
                Ok(Some(b))
                    if (b.full || self.spare.is_some()) && !b.is_empty() && self.may_overlap() =>
                {
                    b
                }
                Ok(other) => {
                    let out = (&mut front.write).await;
                    self.land(front, out).await?;
                    return Ok(other);
                }
            };
            let mut back = self.launch(behind, Some(&mut front));
            let mut back_out = None;
            let (conn, result) = loop {
                tokio::select! {
                    out = &mut front.write => break out,
                    out = &mut back.write, if back_out.is_none() => back_out = Some(out),
                }
            };
            self.return_conn(conn);
            match (result, back_out) {
                (Ok(written), None) => {
                    self.landed(front, written);
                    front = back;
                    self.note_committing(Some(&front.batch));
                }
                (Ok(written), Some(out)) => {
                    self.landed(front, written);
                    self.land(back, out).await?;
                    return Ok(None);
                }
                (Err(failure), out) => {
                    let (conn, back_result) = match out {
                        Some(out) => out,
                        None => (&mut back.write).await,
                    };
                    self.return_conn(conn);
                    self.recover(front, failure, back, back_result).await?;
                    return Ok(None);
                }
            }
        }
    }

    /// Starts writing `batch` on a connection of its own (the main one when open), behind the
    /// batch `after` when that one may still be committing.
    fn launch(&mut self, mut batch: Batch, after: Option<&mut Flight>) -> Flight {
        let barriers = std::mem::take(&mut batch.barriers);
        let check = Check {
            id: Uuid::new_v4(),
            later: None,
            after: after.as_ref().map(|f| f.check.id),
        };
        let (holding, locked) = oneshot::channel();
        let turn = Turn {
            holding: Some(holding),
            before: after.and_then(|f| f.locked.take()),
        };
        let bytes: usize = batch.logs.iter().map(|r| r.0.len()).sum();
        let limit = attempt_deadline(
            self.target.limits.query_timeout,
            bytes,
            batch.logs.len(),
            false,
        );
        let batch = Arc::new(batch);
        let rows = Arc::clone(&batch);
        let ctx = self.write_ctx();
        let source = self.take_conn().ok_or_else(|| self.target.clone());
        let write = Box::pin(async move {
            let conn = match source {
                Ok(conn) => conn,
                Err(target) => match crate::db::tls::connect_with_task(&target).await {
                    Ok((client, task)) => Conn { client, task },
                    Err(e) => {
                        let failure = Failure {
                            kind: ErrorKind::Retry,
                            text: format!("{e:#}"),
                            disconnected: true,
                            refused: None,
                        };
                        return (None, Err(failure));
                    }
                },
            };
            let write = pipelined(&conn.client, &ctx, &rows, check, turn);
            match tokio::time::timeout(limit, write).await {
                Ok(Ok(written)) => (Some(conn), Ok(written)),
                Ok(Err(failure)) => {
                    conn.close();
                    (None, Err(failure))
                }
                Err(_) => {
                    tracing::warn!(
                        "no reply from the database for {}; reconnecting",
                        seconds(limit)
                    );
                    conn.close();
                    (None, Err(Failure::silent(limit)))
                }
            }
        });
        Flight {
            batch,
            barriers,
            check,
            write,
            locked: Some(locked),
        }
    }

    /// A flight ended with nothing streamed behind it: done, or retried alone.
    async fn land(
        &mut self,
        flight: Flight,
        (conn, result): (Option<Conn>, Result<Written, Failure>),
    ) -> Result<(), SinkError> {
        self.return_conn(conn);
        match result {
            Ok(written) => self.landed(flight, written),
            Err(failure) => {
                tracing::warn!(error = %failure.text, "commit failed; retrying the same batch");
                let check = Check {
                    id: flight.check.id,
                    later: None,
                    after: None,
                };
                self.commit_rows(&flight.batch, check, None).await?;
                finish(flight);
            }
        }
        Ok(())
    }

    /// `front` failed while `back` was streamed behind it. A `back` that committed found
    /// `front` committed first. Otherwise both are retried in order; `front`'s lost-reply
    /// check takes `back`'s id for "both committed".
    async fn recover(
        &mut self,
        front: Flight,
        failure: Failure,
        back: Flight,
        back_result: Result<Written, Failure>,
    ) -> Result<(), SinkError> {
        tracing::warn!(error = %failure.text, "commit failed; retrying the same batch");
        if let Ok(written) = back_result {
            tracing::info!("the batch streamed behind it committed, so it had committed too");
            self.landed(front, Written::Before);
            self.landed(back, written);
            return Ok(());
        }
        if let Err(f) = &back_result {
            tracing::warn!(error = %f.text, "the batch streamed behind it did not commit either; retrying both in order");
        }
        let check = Check {
            id: front.check.id,
            later: Some(back.check.id),
            after: None,
        };
        let both = self.commit_rows(&front.batch, check, None).await?;
        finish(front);
        if both {
            self.note_commit(&back.batch, 0);
        } else {
            let check = Check {
                id: back.check.id,
                later: None,
                after: None,
            };
            self.commit_rows(&back.batch, check, None).await?;
        }
        finish(back);
        Ok(())
    }

    /// A flight committed (now, or by an attempt whose reply was lost).
    fn landed(&mut self, flight: Flight, written: Written) {
        match written {
            Written::Now(quarantined) => self.note_commit(&flight.batch, quarantined),
            Written::Before | Written::WithLater => {
                tracing::info!("batch was committed before the connection was lost");
                self.note_commit(&flight.batch, 0);
            }
        }
        finish(flight);
    }

    /// Commits one batch on the main connection, retrying and isolating as needed. Returns
    /// whether the batch `check.later` names turned out committed as well.
    async fn commit_rows(
        &mut self,
        batch: &Batch,
        check: Check,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<bool, SinkError> {
        if batch.is_empty() {
            return Ok(false);
        }
        self.maintain_partitions().await;
        let check = Check {
            after: None,
            ..check
        };
        let mut backoff = Backoff::new(Duration::from_millis(100), MAX_BACKOFF);
        let mut unreachable_since: Option<Instant> = None;
        let mut isolate = false;
        let mut schema_logged = false;
        let bytes: usize = batch.logs.iter().map(|r| r.0.len()).sum();
        loop {
            let failure = match self.attempt(batch, check, isolate, bytes).await {
                Ok(Written::Now(quarantined)) => {
                    self.note_commit(batch, quarantined);
                    return Ok(false);
                }
                Ok(written) => {
                    tracing::info!("batch was committed before the connection was lost");
                    self.note_commit(batch, 0);
                    return Ok(written == Written::WithLater);
                }
                Err(f) => f,
            };
            self.note_failure(&failure);
            let delay = match failure.kind {
                ErrorKind::Data if !isolate => {
                    tracing::warn!(error = %failure.text, rows = batch.logs.len(), "database refused a batch; isolating the bad record");
                    isolate = true;
                    continue;
                }
                ErrorKind::Schema => {
                    let msg = schema_hint(&failure.text);
                    if self.options.schema_fatal {
                        return Err(SinkError::Schema(msg));
                    }
                    if !schema_logged {
                        tracing::error!(error = %msg, "cannot write; retrying until fixed");
                        schema_logged = true;
                    }
                    backoff.next_delay()
                }
                ErrorKind::Login => match failure.refused.clone() {
                    Some(refused) if self.options.schema_fatal => {
                        return Err(SinkError::Login(refused))
                    }
                    _ => self.login_refused(&failure),
                },
                _ => {
                    // Whatever happened to the connection, the next attempt uses a new one
                    // and finds out in its own transaction whether this one committed.
                    self.disconnect();
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    if let Some(limit) = self.options.give_up_after {
                        if since.elapsed() >= limit {
                            return Err(SinkError::Unreachable {
                                target: self.target.display.clone(),
                                secs: limit.as_secs(),
                                last: failure.text,
                            });
                        }
                    }
                    if let Ok(mut a) = self.activity.lock() {
                        a.agent.reconnects += 1;
                    }
                    backoff.next_delay()
                }
            };
            if let Some(d) = deadline.or_else(|| self.drain_deadline()) {
                if tokio::time::Instant::now() + delay > d {
                    return Err(SinkError::Deadline(failure.text));
                }
            }
            if failure.kind != ErrorKind::Login {
                tracing::warn!(error = %failure.text, retry_in = ?delay, "commit failed; retrying the same batch");
            }
            match self.options.stop.clone() {
                Some(stop) if !stop.is_cancelled() => {
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.cancelled() => {}
                    }
                }
                _ => tokio::time::sleep(delay).await,
            }
        }
    }

    /// Once the agent is stopping, the time by which retrying must end.
    fn drain_deadline(&mut self) -> Option<tokio::time::Instant> {
        let stopping = self.options.stop.as_ref().is_some_and(|s| s.is_cancelled());
        if !stopping {
            return None;
        }
        let drain = self.options.drain;
        Some(
            *self
                .stopped_at
                .get_or_insert_with(|| tokio::time::Instant::now() + drain),
        )
    }

    fn note_commit(&mut self, batch: &Batch, quarantined: usize) {
        self.committed = true;
        let now = Utc::now();
        if let Ok(mut a) = self.activity.lock() {
            a.agent.records_shipped += batch.logs.len() as u64;
            a.agent.records_quarantined += quarantined as u64;
            a.agent.batches_committed += 1;
            a.agent.last_commit_at = Some(now);
            for cp in &batch.checkpoints {
                if let Some(f) = a.files.get_mut(&cp.path) {
                    f.last_commit_at = Some(now);
                    f.committed = cp.position;
                    f.lag_bytes = f.size.saturating_sub(cp.position);
                }
            }
        }
    }

    /// What `pipewatch status` shows of this agent: files read, bytes behind, reconnects.
    fn agent_details(&self) -> Value {
        match self.activity.lock() {
            Ok(a) => json!({
                "files": a.files.len(),
                "lag_bytes": a.files.values().map(|f| f.lag_bytes).sum::<u64>(),
                "reconnects": a.agent.reconnects,
                "pid": std::process::id(),
                "unreadable": a.unreadable,
                "readers": a.agent.readers.iter().map(|(name, h)| (name.clone(), json!({
                    "failures": h.failures,
                    "restarts": h.restarts,
                    "down": h.down,
                    "last_error": h.last_error,
                    "last_failed_at": h.last_failed_at.map(|t| t.to_rfc3339()),
                }))).collect::<Map<String, Value>>(),
            }),
            Err(_) => json!({}),
        }
    }

    /// One attempt under its deadline: connects if needed (bounded by `connect_timeout`),
    /// then writes (bounded by [`attempt_deadline`]). No reply in time drops the connection.
    async fn attempt(
        &mut self,
        batch: &Batch,
        check: Check,
        isolate: bool,
        bytes: usize,
    ) -> Result<Written, Failure> {
        self.client().await?;
        let limit = attempt_deadline(
            self.target.limits.query_timeout,
            bytes,
            batch.logs.len(),
            isolate,
        );
        match tokio::time::timeout(limit, self.write(batch, check, isolate)).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(
                    "no reply from the database for {}; reconnecting",
                    seconds(limit)
                );
                self.disconnect();
                Err(Failure::silent(limit))
            }
        }
    }

    /// One attempt: the whole batch in one transaction. With `isolate`, every statement runs
    /// under a savepoint and refused rows are quarantined. Returns how many were quarantined,
    /// or that an earlier attempt whose reply was lost had committed the batch already.
    async fn write(
        &mut self,
        batch: &Batch,
        check: Check,
        isolate: bool,
    ) -> Result<Written, Failure> {
        if !isolate {
            let ctx = self.write_ctx();
            let client = self.client().await?;
            let turn = Turn {
                holding: None,
                before: None,
            };
            let result = pipelined(client, &ctx, batch, check, turn).await;
            if result.is_err() {
                // The transaction may be open (or aborted) on this connection: drop it, the
                // server rolls back; the next attempt connects again and finds out in its own
                // transaction whether this one committed.
                self.disconnect();
            }
            return result;
        }
        let agent_id = self.agent_id.clone();
        let host = self.host.clone();
        let daemons = self.daemons.clone();
        let started_at = self.started_at;
        let details = self.agent_details();
        let settings = transaction_settings(self.target.limits.query_timeout);
        let client = self.client().await?;
        let tx = client.transaction().await?;
        tx.batch_execute(&settings).await?;
        // The lost-reply check, inside this attempt's transaction: the agent's row stays
        // locked until COMMIT, so no other attempt can commit in between.
        let last = lock_agent(&tx, &agent_id, &host, &daemons).await?;
        if last == Some(check.id) {
            tx.rollback().await?;
            return Ok(Written::Before);
        }
        if last.is_some() && last == check.later {
            tx.rollback().await?;
            return Ok(Written::WithLater);
        }
        let mut quarantined = Vec::new();
        isolate_logs(&tx, &batch.logs, &mut quarantined).await?;
        let mut events: Vec<EventRow> = batch.events.clone();
        for (row, reason) in &quarantined {
            events.push(quarantine_event(row, reason));
        }
        {
            for e in &events {
                tx.batch_execute("SAVEPOINT pw_row").await?;
                let r = insert_events(tx.client(), std::slice::from_ref(e)).await;
                finish_savepoint(&tx, r, "event").await?;
            }
            for m in &batch.metrics {
                tx.batch_execute("SAVEPOINT pw_row").await?;
                let r = insert_metrics(tx.client(), std::slice::from_ref(m)).await;
                finish_savepoint(&tx, r, "metric").await?;
            }
            for p in collapse_progress(&batch.progress) {
                tx.batch_execute("SAVEPOINT pw_row").await?;
                let r = upsert_progress(tx.client(), std::slice::from_ref(&p)).await;
                finish_savepoint(&tx, r, "progress").await?;
            }
        }
        upsert_checkpoints(tx.client(), &host, &batch.checkpoints).await?;
        let row = AgentRow {
            agent_id: &agent_id,
            host: &host,
            daemons: &daemons,
            started_at,
            details: &details,
        };
        upsert_agent(
            tx.client(),
            &row,
            check.id,
            batch.logs.len(),
            quarantined.len(),
        )
        .await?;
        tx.commit().await?;
        Ok(Written::Now(quarantined.len()))
    }

    /// What this agent's transactions write besides the batch.
    fn write_ctx(&self) -> WriteCtx {
        WriteCtx {
            agent_id: self.agent_id.clone(),
            host: self.host.clone(),
            daemons: self.daemons.clone(),
            started_at: self.started_at,
            details: self.agent_details(),
            begin: format!(
                "BEGIN; {}",
                transaction_settings(self.target.limits.query_timeout)
            ),
        }
    }
}

/// One attempt without isolation, pipelined on the connection: three round trips a batch
/// however many statements it has. (1) `BEGIN` with the transaction's settings, the agent's
/// row locked (the lost-reply check) and the COPY statement prepared, sent together; (2) the
/// COPY starts; (3) its rows, then events, metrics, progress, positions, the agent's row and
/// `COMMIT`, sent together.
///
/// Streamed behind a batch still committing on another connection (`check.after`), the
/// agent's row is locked after the rows, events and metrics instead — the lock waits for
/// that batch's transaction to end — and progress, positions, the agent's row and `COMMIT`
/// are sent only once the row shows that batch as the last committed (a fourth round trip);
/// otherwise this transaction rolls back. So batches commit strictly in order, and a batch
/// committed behind another proves that one committed.
///
/// Exact: the server runs the statements in order in one transaction; a statement that fails
/// aborts the transaction, so every statement after it fails too (its error is returned,
/// nothing is committed: `COMMIT` of an aborted transaction rolls back), and the agent's row,
/// updated last before `COMMIT`, fails whenever anything before it did. The COPY statement is
/// closed before `COMMIT` (pooler-safe). On an error the caller drops the connection.
async fn pipelined(
    client: &Client,
    ctx: &WriteCtx,
    batch: &Batch,
    check: Check,
    mut turn: Turn,
) -> Result<Written, Failure> {
    let row = AgentRow {
        agent_id: &ctx.agent_id,
        host: &ctx.host,
        daemons: &ctx.daemons,
        started_at: ctx.started_at,
        details: &ctx.details,
    };
    let id: [(&(dyn ToSql + Sync), Type); 1] = [(&ctx.agent_id, Type::TEXT)];
    let with_logs = !batch.logs.is_empty();
    let lock_first = check.after.is_none();
    let prepare_copy = async {
        if with_logs {
            client
                .prepare_typed(copyrow::COPY_STATEMENT, &[])
                .await
                .map(Some)
        } else {
            Ok(None)
        }
    };
    let lock = async {
        if lock_first {
            client.query_typed_opt(LOCK_AGENT, &id).await.map(Some)
        } else {
            Ok(None)
        }
    };
    // Round trip 1. `try_join!` polls in order, and each request is sent on its first poll:
    // the server sees BEGIN, the lock, then the PREPARE.
    let (_, locked, statement) =
        futures_util::try_join!(client.batch_execute(&ctx.begin), lock, prepare_copy)
            .map_err(busy)?;
    if let Some(locked) = locked {
        let last = match locked {
            Some(r) => r.try_get::<_, Option<Uuid>>(0)?,
            // The very first commit of this agent: create its row, then lock it.
            None => {
                client
                    .execute_typed(
                        CREATE_AGENT,
                        &[
                            (&ctx.agent_id, Type::TEXT),
                            (&ctx.host, Type::TEXT),
                            (&ctx.daemons, Type::TEXT_ARRAY),
                        ],
                    )
                    .await
                    .map_err(busy)?;
                match client
                    .query_typed_opt(LOCK_AGENT, &id)
                    .await
                    .map_err(busy)?
                {
                    Some(r) => r.try_get::<_, Option<Uuid>>(0)?,
                    None => None,
                }
            }
        };
        let found = if last == Some(check.id) {
            Some(Written::Before)
        } else if last.is_some() && last == check.later {
            Some(Written::WithLater)
        } else {
            None
        };
        if let Some(found) = found {
            drop(statement);
            client.batch_execute("ROLLBACK").await?;
            return Ok(found);
        }
        if let Some(holding) = turn.holding.take() {
            let _ = holding.send(());
        }
    }
    // Round trip 2: the COPY starts. The statement is dropped right after, which queues its
    // Close behind the COPY data and before everything below.
    let sink = match statement {
        Some(statement) => {
            let sink = client.copy_in::<_, Bytes>(&statement).await?;
            drop(statement);
            Some(sink)
        }
        None => None,
    };
    let copy = async {
        match sink {
            Some(sink) => stream_rows(sink, &batch.logs).await,
            None => Ok(()),
        }
    };
    let progress = collapse_progress(&batch.progress);
    if lock_first {
        // Round trip 3.
        futures_util::try_join!(
            copy,
            insert_events(client, &batch.events),
            insert_metrics(client, &batch.metrics),
            upsert_progress(client, &progress),
            upsert_checkpoints(client, &ctx.host, &batch.checkpoints),
            upsert_agent(client, &row, check.id, batch.logs.len(), 0),
            client.batch_execute("COMMIT"),
        )?;
        return Ok(Written::Now(0));
    }
    // Round trip 3, behind another batch: the rows, then the agent's row, locked once that
    // batch's transaction has ended. Progress and positions come after the lock: they may
    // update rows that batch updated, and must apply after it.
    // The lock is asked for only once the batch before holds the row (or has failed), so that
    // it queues behind that batch's transaction instead of overtaking it.
    let before = turn.before.take();
    let lock = async {
        if let Some(before) = before {
            let _ = before.await;
        }
        client.query_typed_opt(LOCK_AGENT, &id).await
    };
    let (_, _, _, locked) = futures_util::try_join!(
        copy,
        insert_events(client, &batch.events),
        insert_metrics(client, &batch.metrics),
        lock,
    )
    .map_err(busy)?;
    let last = match locked {
        Some(r) => r.try_get::<_, Option<Uuid>>(0)?,
        None => None,
    };
    if last == Some(check.id) || last.is_none() || last != check.after {
        client.batch_execute("ROLLBACK").await?;
        return if last == Some(check.id) {
            Ok(Written::Before)
        } else {
            Err(Failure::out_of_order())
        };
    }
    if let Some(holding) = turn.holding.take() {
        let _ = holding.send(());
    }
    // Round trip 4.
    futures_util::try_join!(
        upsert_progress(client, &progress),
        upsert_checkpoints(client, &ctx.host, &batch.checkpoints),
        upsert_agent(client, &row, check.id, batch.logs.len(), 0),
        client.batch_execute("COMMIT"),
    )?;
    Ok(Written::Now(0))
}

/// Answers a committed flight's barriers and drops its batch (returning its byte permits).
fn finish(flight: Flight) {
    for b in flight.barriers {
        let _ = b.send(());
    }
}

/// The agent's own row, as each commit writes it.
struct AgentRow<'a> {
    agent_id: &'a str,
    host: &'a str,
    daemons: &'a [String],
    started_at: DateTime<Utc>,
    details: &'a Value,
}

/// Records the batch in the agent's row: `last_batch_id` (the lost-reply check) and counters.
async fn upsert_agent(
    client: &Client,
    a: &AgentRow<'_>,
    batch_id: Uuid,
    rows: usize,
    quarantined: usize,
) -> Result<(), tokio_postgres::Error> {
    let version = env!("CARGO_PKG_VERSION");
    client
        .execute_typed(
            UPSERT_AGENT,
            &[
                (&a.agent_id, Type::TEXT),
                (&a.host, Type::TEXT),
                (&a.daemons, Type::TEXT_ARRAY),
                (&version, Type::TEXT),
                (&a.started_at, Type::TIMESTAMPTZ),
                (&batch_id, Type::UUID),
                (&(rows as i64), Type::INT8),
                (&(quarantined as i64), Type::INT8),
                (&a.details, Type::JSONB),
            ],
        )
        .await?;
    Ok(())
}

/// Adds who may hold the agent's row to a lock timeout.
fn busy(e: tokio_postgres::Error) -> Failure {
    let mut f = Failure::from(e);
    if f.text.starts_with("55P03") {
        f.text.push_str(
            " — another session holds this agent's row: the transaction of a lost connection \
             (the server ends it within query_timeout) or a second agent with the same host \
             and daemons",
        );
    }
    f
}

/// Locks the agent's row (creating it on the very first commit) and returns its
/// `last_batch_id`.
async fn lock_agent(
    tx: &Transaction<'_>,
    agent_id: &str,
    host: &str,
    daemons: &[String],
) -> Result<Option<Uuid>, Failure> {
    let id: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 1] = [(&agent_id, Type::TEXT)];
    let mut row = tx.query_typed_opt(LOCK_AGENT, &id).await.map_err(busy)?;
    if row.is_none() {
        tx.execute_typed(
            CREATE_AGENT,
            &[
                (&agent_id, Type::TEXT),
                (&host, Type::TEXT),
                (&daemons, Type::TEXT_ARRAY),
            ],
        )
        .await
        .map_err(busy)?;
        row = tx.query_typed_opt(LOCK_AGENT, &id).await.map_err(busy)?;
    }
    match row {
        Some(row) => Ok(row.try_get::<_, Option<Uuid>>(0)?),
        None => Ok(None),
    }
}

/// Adds "run pipewatch migrate" to errors that mean the schema is missing.
fn schema_hint(text: &str) -> String {
    if text.starts_with("42P01") || text.starts_with("42883") || text.starts_with("42703") {
        format!("{text} — the monitoring schema is missing or outdated: run `pipewatch migrate`")
    } else if text.starts_with("42501") {
        format!("{text} — the database role lacks a privilege (grant it pipewatch_agent)")
    } else {
        text.to_string()
    }
}

/// Bytes sent to the server per COPY message.
const COPY_CHUNK: usize = 256 * 1024;

/// Streams already encoded rows with one binary COPY (its statement prepared and closed
/// inside the transaction).
async fn copy_logs(tx: &Transaction<'_>, rows: &[EncodedRow]) -> Result<(), tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let sink = tx.copy_in::<_, Bytes>(copyrow::COPY_STATEMENT).await?;
    stream_rows(sink, rows).await
}

/// Streams already encoded rows into a started binary COPY and ends it.
///
/// `copy_in` needs a named prepared statement; the caller prepares it inside its transaction
/// and drops it as soon as `copy_in` returned, which queues its Close behind the COPY data and
/// before anything else the transaction sends (COMMIT included): it never outlives the
/// transaction, so a pooler in transaction mode cannot hand it to another client.
async fn stream_rows(
    sink: tokio_postgres::CopyInSink<Bytes>,
    rows: &[EncodedRow],
) -> Result<(), tokio_postgres::Error> {
    pin_mut!(sink);
    let mut buf = BytesMut::with_capacity(COPY_CHUNK + 4096);
    buf.extend_from_slice(copyrow::HEADER);
    for r in rows {
        buf.extend_from_slice(&r.0);
        if buf.len() >= COPY_CHUNK {
            sink.send(buf.split().freeze()).await?;
        }
    }
    buf.extend_from_slice(copyrow::TRAILER);
    sink.send(buf.freeze()).await?;
    sink.finish().await?;
    Ok(())
}

/// Ends the savepoint opened before a row's statement: a data error rolls back to it and is
/// logged (the row is skipped); other errors propagate.
async fn finish_savepoint(
    tx: &Transaction<'_>,
    result: Result<(), tokio_postgres::Error>,
    what: &str,
) -> Result<(), Failure> {
    match result {
        Ok(()) => {
            tx.batch_execute("RELEASE SAVEPOINT pw_row").await?;
            Ok(())
        }
        Err(e) if classify(&e) == ErrorKind::Data => {
            tracing::warn!(error = %describe(&e), what, "row refused by the database; skipped");
            tx.batch_execute("ROLLBACK TO SAVEPOINT pw_row").await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// COPY with binary splitting: halves that fail are split again; a single refused row is
/// replaced by a quarantine row that keeps its content as text.
async fn isolate_logs(
    tx: &Transaction<'_>,
    rows: &[EncodedRow],
    quarantined: &mut Vec<(LogRow, String)>,
) -> Result<(), Failure> {
    let mut stack = vec![(0usize, rows.len())];
    while let Some((lo, hi)) = stack.pop() {
        if lo >= hi {
            continue;
        }
        tx.batch_execute("SAVEPOINT pw_split").await?;
        match copy_logs(tx, &rows[lo..hi]).await {
            Ok(()) => {
                tx.batch_execute("RELEASE SAVEPOINT pw_split").await?;
            }
            Err(e) if classify(&e) == ErrorKind::Data => {
                tx.batch_execute("ROLLBACK TO SAVEPOINT pw_split").await?;
                if hi - lo == 1 {
                    let reason = describe(&e);
                    let row =
                        copyrow::decode(&rows[lo]).unwrap_or_else(|| minimal_row(None, &reason));
                    let row = &row;
                    let safe = copyrow::encode(&quarantine_row(row, &reason));
                    tx.batch_execute("SAVEPOINT pw_split").await?;
                    let stored = match copy_logs(tx, std::slice::from_ref(&safe)).await {
                        Ok(()) => {
                            tx.batch_execute("RELEASE SAVEPOINT pw_split").await?;
                            true
                        }
                        Err(e2) if classify(&e2) == ErrorKind::Data => {
                            tx.batch_execute("ROLLBACK TO SAVEPOINT pw_split").await?;
                            false
                        }
                        Err(e2) => return Err(e2.into()),
                    };
                    if !stored {
                        let minimal = copyrow::encode(&minimal_row(Some(row), &reason));
                        copy_logs(tx, std::slice::from_ref(&minimal)).await?;
                    }
                    tracing::warn!(error = %reason, source = ?row.source, "record quarantined");
                    quarantined.push((row.clone(), reason));
                } else {
                    let mid = lo + (hi - lo) / 2;
                    // Pop order keeps the file order: lower half first.
                    stack.push((mid, hi));
                    stack.push((lo, mid));
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The refused row in a form the database accepts: content kept as escaped text.
fn quarantine_row(row: &LogRow, reason: &str) -> LogRow {
    let mut context = Map::new();
    context.insert(
        "_pipewatch".into(),
        json!({ "quarantined": reason, "original_ts": row.ts.to_rfc3339() }),
    );
    context.insert(
        "raw_context".into(),
        Value::String(escape(&row.context.to_string())),
    );
    if let Some(m) = &row.metrics {
        context.insert("raw_metrics".into(), Value::String(escape(&m.to_string())));
    }
    LogRow {
        ts: Utc::now(),
        level: row.level,
        message: escape(&row.message),
        logger: row.logger.as_deref().map(escape),
        experiment_id: row.experiment_id,
        node_id: row.node_id.as_deref().map(escape),
        stage: row.stage.as_deref().map(escape),
        context: Value::Object(context),
        traceback: row.traceback.as_deref().map(escape),
        metrics: None,
        host: row.host.clone(),
        daemon: row.daemon.clone(),
        source: row.source.clone(),
    }
}

/// The last resort when even the escaped form is refused, or the row cannot be read back.
fn minimal_row(row: Option<&LogRow>, reason: &str) -> LogRow {
    let origin = |f: fn(&LogRow) -> String| row.map(f).unwrap_or_default();
    LogRow {
        ts: Utc::now(),
        level: Level::Error,
        message: "record quarantined: the database refused it".into(),
        logger: None,
        experiment_id: None,
        node_id: None,
        stage: None,
        context: json!({ "_pipewatch": { "quarantined": reason } }),
        traceback: None,
        metrics: None,
        host: origin(|r| r.host.clone()),
        daemon: origin(|r| r.daemon.clone()),
        source: row.and_then(|r| r.source.clone()),
    }
}

fn escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c == '\0' {
                "\\u0000".chars().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

fn quarantine_event(row: &LogRow, reason: &str) -> EventRow {
    EventRow {
        ts: Utc::now(),
        experiment_id: row.experiment_id,
        node_id: None,
        event_type: "record_quarantined".into(),
        severity: Level::Warning,
        message: Some(format!(
            "a record from {} was refused by the database and stored as text",
            row.source.as_deref().unwrap_or("?")
        )),
        details: json!({ "error": reason, "source": row.source }),
        host: row.host.clone(),
        daemon: row.daemon.clone(),
    }
}

async fn insert_events(tx: &Client, rows: &[EventRow]) -> Result<(), tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let ts: Vec<DateTime<Utc>> = rows.iter().map(|r| r.ts).collect();
    let exp: Vec<Option<Uuid>> = rows.iter().map(|r| r.experiment_id).collect();
    let node: Vec<Option<&str>> = rows.iter().map(|r| r.node_id.as_deref()).collect();
    let et: Vec<&str> = rows.iter().map(|r| r.event_type.as_str()).collect();
    let sev: Vec<&str> = rows.iter().map(|r| r.severity.as_str()).collect();
    let msg: Vec<Option<&str>> = rows.iter().map(|r| r.message.as_deref()).collect();
    let det: Vec<&Value> = rows.iter().map(|r| &r.details).collect();
    let host: Vec<&str> = rows.iter().map(|r| r.host.as_str()).collect();
    let daemon: Vec<&str> = rows.iter().map(|r| r.daemon.as_str()).collect();
    tx.execute_typed(
        INSERT_EVENTS,
        &[
            (&ts, Type::TIMESTAMPTZ_ARRAY),
            (&exp, Type::UUID_ARRAY),
            (&node, Type::TEXT_ARRAY),
            (&et, Type::TEXT_ARRAY),
            (&sev, Type::TEXT_ARRAY),
            (&msg, Type::TEXT_ARRAY),
            (&det, Type::JSONB_ARRAY),
            (&host, Type::TEXT_ARRAY),
            (&daemon, Type::TEXT_ARRAY),
        ],
    )
    .await?;
    Ok(())
}

async fn insert_metrics(tx: &Client, rows: &[MetricRow]) -> Result<(), tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let now = Utc::now();
    let ts: Vec<DateTime<Utc>> = rows.iter().map(|r| r.ts.unwrap_or(now)).collect();
    let exp: Vec<Option<Uuid>> = rows.iter().map(|r| r.experiment_id).collect();
    let node: Vec<Option<&str>> = rows.iter().map(|r| r.node_id.as_deref()).collect();
    let host: Vec<&str> = rows.iter().map(|r| r.host.as_str()).collect();
    let daemon: Vec<&str> = rows.iter().map(|r| r.daemon.as_str()).collect();
    let pid: Vec<Option<i32>> = rows.iter().map(|r| r.pid).collect();
    let cpu: Vec<Option<f64>> = rows.iter().map(|r| r.cpu_percent).collect();
    let rss: Vec<Option<i64>> = rows.iter().map(|r| r.memory_rss_bytes).collect();
    let mem: Vec<Option<f64>> = rows.iter().map(|r| r.memory_percent).collect();
    let rd: Vec<Option<f64>> = rows.iter().map(|r| r.disk_read_bytes_per_sec).collect();
    let wr: Vec<Option<f64>> = rows.iter().map(|r| r.disk_write_bytes_per_sec).collect();
    let du: Vec<Option<f64>> = rows.iter().map(|r| r.disk_used_percent).collect();
    let rps: Vec<Option<f64>> = rows.iter().map(|r| r.records_per_sec).collect();
    // Serialised from the rows themselves (the same jsonb as a `Value`), not from a deep copy.
    let custom: Vec<tokio_postgres::types::Json<&serde_json::Map<String, Value>>> = rows
        .iter()
        .map(|r| tokio_postgres::types::Json(&r.custom))
        .collect();
    tx.execute_typed(
        INSERT_METRICS,
        &[
            (&ts, Type::TIMESTAMPTZ_ARRAY),
            (&exp, Type::UUID_ARRAY),
            (&node, Type::TEXT_ARRAY),
            (&host, Type::TEXT_ARRAY),
            (&daemon, Type::TEXT_ARRAY),
            (&pid, Type::INT4_ARRAY),
            (&cpu, Type::FLOAT8_ARRAY),
            (&rss, Type::INT8_ARRAY),
            (&mem, Type::FLOAT8_ARRAY),
            (&rd, Type::FLOAT8_ARRAY),
            (&wr, Type::FLOAT8_ARRAY),
            (&du, Type::FLOAT8_ARRAY),
            (&rps, Type::FLOAT8_ARRAY),
            (&custom, Type::JSONB_ARRAY),
        ],
    )
    .await?;
    Ok(())
}

/// A progress update to send, and the time of the earliest update it stands for (its
/// `started_at` when it starts the node).
#[derive(Debug, Clone, PartialEq)]
pub struct Upsert {
    pub row: ProgressRow,
    pub first_at: DateTime<Utc>,
}

/// Drops an update when a later one of the same node, at least as new, sets every field it
/// sets: applying both or only the later gives the same row. Anything else is kept, in order,
/// so the database decides (an older update never overwrites a newer row).
pub fn collapse_progress(rows: &[ProgressRow]) -> Vec<Upsert> {
    fn covers(old: &crate::model::ProgressUpdate, new: &crate::model::ProgressUpdate) -> bool {
        (old.parent_node_id.is_none() || new.parent_node_id.is_some())
            && (old.level.is_none() || new.level.is_some())
            && (old.name.is_none() || new.name.is_some())
            && (old.status.is_none() || new.status.is_some())
            && (old.percent.is_none() || new.percent.is_some())
            && (old.items_done.is_none() || new.items_done.is_some())
            && (old.items_total.is_none() || new.items_total.is_some())
            && old.details.is_none()
    }
    let mut out: Vec<Option<Upsert>> = Vec::with_capacity(rows.len());
    let mut last: HashMap<(Uuid, &str), usize> = HashMap::new();
    for r in rows {
        let key = (r.experiment_id, r.update.node_id.as_str());
        let mut first_at = r.updated_at;
        if let Some(&i) = last.get(&key) {
            if let Some(prev) = out[i].as_ref() {
                if r.updated_at >= prev.row.updated_at && covers(&prev.row.update, &r.update) {
                    first_at = prev.first_at.min(r.updated_at);
                    out[i] = None;
                }
            }
        }
        last.insert(key, out.len());
        out.push(Some(Upsert {
            row: r.clone(),
            first_at,
        }));
    }
    out.into_iter().flatten().collect()
}

async fn upsert_progress(tx: &Client, rows: &[Upsert]) -> Result<(), tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    // Unnamed statements (no prepared statement outlives its use: pooler-safe).
    let futures = rows.iter().map(|up| {
        let r = &up.row;
        let u = &r.update;
        async move {
            tx.execute_typed(
                UPSERT_PROGRESS,
                &[
                    (&r.experiment_id, Type::UUID),
                    (&u.node_id, Type::TEXT),
                    (&u.parent_node_id, Type::TEXT),
                    (&u.level, Type::TEXT),
                    (&u.name, Type::TEXT),
                    (&u.status, Type::TEXT),
                    (&u.percent, Type::FLOAT8),
                    (&u.items_done, Type::INT8),
                    (&u.items_total, Type::INT8),
                    (&r.updated_at, Type::TIMESTAMPTZ),
                    (&u.details, Type::JSONB),
                    (&up.first_at, Type::TIMESTAMPTZ),
                ],
            )
            .await
        }
    });
    // Sent in order, pipelined: one round trip for the lot.
    futures_util::future::try_join_all(futures).await?;
    Ok(())
}

async fn upsert_checkpoints(
    tx: &Client,
    host: &str,
    cps: &[Checkpoint],
) -> Result<(), tokio_postgres::Error> {
    if cps.is_empty() {
        return Ok(());
    }
    let d: Vec<&str> = cps.iter().map(|c| c.daemon.as_str()).collect();
    let f: Vec<&str> = cps.iter().map(|c| c.fingerprint.as_str()).collect();
    let p: Vec<&str> = cps.iter().map(|c| c.path.as_str()).collect();
    let pos: Vec<i64> = cps.iter().map(|c| c.position as i64).collect();
    let hh: Vec<Option<&str>> = cps.iter().map(|c| c.head_hash.as_deref()).collect();
    let th: Vec<Option<&str>> = cps.iter().map(|c| c.tail_hash.as_deref()).collect();
    let st: Vec<&Value> = cps.iter().map(|c| &c.sticky).collect();
    tx.execute_typed(
        UPSERT_CHECKPOINTS,
        &[
            (&host, Type::TEXT),
            (&d, Type::TEXT_ARRAY),
            (&f, Type::TEXT_ARRAY),
            (&p, Type::TEXT_ARRAY),
            (&pos, Type::INT8_ARRAY),
            (&hh, Type::TEXT_ARRAY),
            (&th, Type::TEXT_ARRAY),
            (&st, Type::JSONB_ARRAY),
        ],
    )
    .await?;
    Ok(())
}

/// Offers to apply `[retention]` (rows older than `seconds`); the database lets one agent of
/// the fleet do it once a day. `None` when it was done today already.
pub async fn apply_retention(
    target: &DbTarget,
    seconds: f64,
    host: &str,
) -> anyhow::Result<Option<i64>> {
    let client = crate::db::connect(target).await?;
    let row = client
        .query_typed_one(
            "SELECT pipewatch_apply_retention(make_interval(secs => $1::float8), $2)",
            &[(&seconds, Type::FLOAT8), (&host, Type::TEXT)],
        )
        .await?;
    Ok(row.get::<_, Option<i64>>(0))
}

/// A daemon's committed positions, oldest first.
pub async fn load_checkpoints(
    client: &Client,
    host: &str,
    daemon: &str,
) -> Result<Vec<crate::agent::identity::Mark>, tokio_postgres::Error> {
    let rows = client
        .query_typed(
            LOAD_CHECKPOINTS,
            &[(&host, Type::TEXT), (&daemon, Type::TEXT)],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| crate::agent::identity::Mark {
            key: r.get(0),
            path: r.get(1),
            position: r.get::<_, i64>(2).max(0) as u64,
            head_hash: r.get(3),
            tail_hash: r.get(4),
            sticky: r.get(5),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ProgressUpdate;

    fn up(secs: i64, node: &str, percent: Option<f64>, status: Option<&str>) -> ProgressRow {
        ProgressRow {
            experiment_id: Uuid::nil(),
            updated_at: DateTime::from_timestamp(secs, 0).unwrap(),
            update: ProgressUpdate {
                node_id: node.into(),
                percent,
                status: status.map(str::to_string),
                ..ProgressUpdate::default()
            },
        }
    }

    #[test]
    fn the_attempt_deadline_grows_with_the_batch_not_for_a_small_one() {
        let q = Duration::from_secs(30);
        assert_eq!(attempt_deadline(q, 0, 0, false), q);
        assert_eq!(attempt_deadline(q, 10 * 1024, 50, false).as_secs(), 30);
        // 64 MiB of rows: about a minute more.
        assert_eq!(
            attempt_deadline(q, 64 * 1024 * 1024, 5000, false),
            Duration::from_secs(94)
        );
        // Isolating 5000 rows of 5 MiB: log2 passes and savepoints on top.
        let iso = attempt_deadline(q, 5 * 1024 * 1024, 5000, true);
        assert_eq!(iso, Duration::from_secs(30 + 5 * 15 + 50));
        assert_eq!(seconds(Duration::from_secs(30)), "30 s");
        assert_eq!(seconds(Duration::from_millis(2500)), "2.5 s");
    }

    #[test]
    fn only_updates_fully_covered_by_a_newer_one_are_dropped() {
        let rows = vec![
            up(10, "a", Some(10.0), None),
            up(11, "b", Some(1.0), None),
            up(12, "a", Some(20.0), None),
            // Older than the kept one: kept, the database will refuse it.
            up(5, "a", Some(99.0), Some("completed")),
            // Newer but does not set `status`, which the previous one sets: both kept.
            up(13, "a", Some(30.0), None),
        ];
        let got: Vec<(String, i64, i64)> = collapse_progress(&rows)
            .into_iter()
            .map(|u| {
                (
                    u.row.update.node_id.clone(),
                    u.row.updated_at.timestamp(),
                    u.first_at.timestamp(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("b".into(), 11, 11),
                ("a".into(), 12, 10),
                ("a".into(), 5, 5),
                ("a".into(), 13, 13)
            ]
        );
    }
}
