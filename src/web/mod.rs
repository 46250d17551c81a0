//! `pipewatch web`: a read-only web view over the monitoring tables. axum serves pages rendered
//! by minijinja (HTML auto-escaping on every `.html` template), server-side SVG charts
//! (downsampled by the database), and the same data as JSON under `/api/...` or with
//! `Accept: application/json`. A small static script polls JSON for the live parts.
//!
//! Must not write to the database, prepare named statements or set session state (it runs as
//! `pipewatch_reader`, possibly through pgbouncer); must not show any database text unescaped.

pub mod chart;
pub mod data;

use crate::db::DbTarget;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio_postgres::Client;
use uuid::Uuid;

/// The policy every response carries: nothing inline, nothing from elsewhere, no framing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                       connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// How long one request may take before it is answered 503.
const REQUEST_DEADLINE: Duration = Duration::from_secs(15);

/// Database connections the server keeps (requests share them; tokio-postgres pipelines).
const POOL: usize = 6;

/// How the server checks who is asking.
#[derive(Clone)]
pub enum Access {
    /// Loopback only: any local client, with the Host header checked against DNS rebinding.
    Loopback,
    /// A token: `Authorization: Bearer TOKEN`, or HTTP basic auth with TOKEN as the password.
    /// Kept as its SHA-256 so that comparing takes the same time whatever the length.
    Token([u8; 32]),
    /// Anyone who can reach the address (`--insecure`).
    Open,
}

/// Hashes a token for [`Access::Token`].
pub fn token_access(token: &str) -> Access {
    let mut h = [0u8; 32];
    h.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());
    Access::Token(h)
}

/// Decides the access mode for a listen address, or says why the server must not start.
pub fn access_for(
    listen: SocketAddr,
    token: Option<String>,
    insecure: bool,
) -> Result<Access, String> {
    match (token, listen.ip().is_loopback(), insecure) {
        (Some(t), _, _) => Ok(token_access(&t)),
        (None, true, _) => Ok(Access::Loopback),
        (None, false, true) => Ok(Access::Open),
        (None, false, false) => Err(format!(
            "refusing to serve on {listen} without a credential: anyone who can reach that \
             address could read every log; pass --token-file FILE (clients then send the token \
             as a bearer token or a basic-auth password), or --insecure to allow it anyway"
        )),
    }
}

/// The server's shared state.
pub struct AppState {
    db: DbTarget,
    pool: Vec<tokio::sync::Mutex<Option<Arc<Client>>>>,
    next: AtomicUsize,
    env: minijinja::Environment<'static>,
    access: Access,
}

impl AppState {
    pub fn new(db: DbTarget, access: Access) -> AppState {
        AppState {
            db,
            pool: (0..POOL).map(|_| tokio::sync::Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            env: templates(),
            access,
        }
    }

    /// A connection from the pool, reconnecting one that closed.
    async fn client(&self) -> Result<Arc<Client>, WebError> {
        let slot = &self.pool[self.next.fetch_add(1, Ordering::Relaxed) % self.pool.len()];
        let mut guard = slot.lock().await;
        if let Some(c) = guard.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let c = Arc::new(crate::db::connect(&self.db).await?);
        *guard = Some(c.clone());
        Ok(c)
    }

    fn render(&self, name: &str, ctx: Value) -> Result<Response, WebError> {
        let t = self
            .env
            .get_template(name)
            .map_err(|e| WebError::Internal(anyhow::anyhow!("template {name}: {e:#}")))?;
        let html = t
            .render(ctx)
            .map_err(|e| WebError::Internal(anyhow::anyhow!("template {name}: {e:#}")))?;
        Ok(Html(html).into_response())
    }
}

/// The templates, compiled into the binary; `.html` names auto-escape.
fn templates() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    for (name, text) in [
        ("base.html", include_str!("templates/base.html")),
        (
            "experiments.html",
            include_str!("templates/experiments.html"),
        ),
        ("experiment.html", include_str!("templates/experiment.html")),
        (
            "progress_rows.html",
            include_str!("templates/progress_rows.html"),
        ),
        ("charts.html", include_str!("templates/charts.html")),
        ("logs.html", include_str!("templates/logs.html")),
        ("agents.html", include_str!("templates/agents.html")),
        ("error.html", include_str!("templates/error.html")),
    ] {
        if let Err(e) = env.add_template(name, text) {
            // A broken template is a build defect; the unit test below renders every one.
            tracing::error!(template = name, error = %e, "template does not compile");
        }
    }
    env.add_filter("dt", |v: Option<String>| display_time(v.as_deref()));
    env.add_filter("visible", |v: Option<String>| {
        visible(v.as_deref().unwrap_or(""))
    });
    env.add_filter("pct", |v: Option<f64>| {
        v.map_or_else(|| "-".to_string(), |p| format!("{p:.1} %"))
    });
    env.add_filter("bytes", |v: Option<f64>| {
        v.map_or_else(|| "-".to_string(), chart::bytes)
    });
    env
}

/// An RFC 3339 time as `YYYY-MM-DD HH:MM:SS` (UTC, as stored).
pub fn display_time(v: Option<&str>) -> String {
    match v.and_then(|s| DateTime::parse_from_rfc3339(s).ok()) {
        Some(t) => t
            .with_timezone(&Utc)
            .format("%Y-%m-%d %H:%M:%S")
            .to_string(),
        None => "-".to_string(),
    }
}

/// Text with its invisible and direction-changing characters shown as `\u{…}`: a log line
/// cannot reorder what a person reads (U+202E) or hide characters. Escaping for HTML happens
/// after this, in the template.
pub fn visible(s: &str) -> String {
    let hidden = |c: char| {
        (c.is_control() && c != '\n' && c != '\t')
            || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{061C}' | '\u{FEFF}')
    };
    if !s.chars().any(hidden) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if hidden(c) {
                format!("\\u{{{:04X}}}", c as u32)
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// What a request can fail with.
#[derive(Debug)]
pub enum WebError {
    NotFound(String),
    BadRequest(String),
    Internal(anyhow::Error),
}

impl From<anyhow::Error> for WebError {
    fn from(e: anyhow::Error) -> Self {
        WebError::Internal(e)
    }
}

impl From<tokio_postgres::Error> for WebError {
    fn from(e: tokio_postgres::Error) -> Self {
        WebError::Internal(anyhow::anyhow!(crate::db::connect::describe(&e)))
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let (status, text) = match self {
            WebError::NotFound(t) => (StatusCode::NOT_FOUND, t),
            WebError::BadRequest(t) => (StatusCode::BAD_REQUEST, t),
            WebError::Internal(e) => {
                tracing::warn!(error = %format!("{e:#}"), "web request failed");
                (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
            }
        };
        (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            text,
        )
            .into_response()
    }
}

type Shared = Arc<AppState>;

/// The routes, with the access check and the security headers.
pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/", get(experiments_page))
        .route("/api/experiments", get(experiments_api))
        .route("/experiments/{id}", get(experiment_page))
        .route("/api/experiments/{id}", get(experiment_api))
        .route("/api/experiments/{id}/progress", get(progress_api))
        .route("/experiments/{id}/progress", get(progress_fragment))
        .route("/experiments/{id}/charts", get(charts_fragment))
        .route("/api/experiments/{id}/metrics", get(metrics_api))
        .route("/logs", get(logs_page))
        .route("/api/logs", get(logs_api))
        .route("/agents", get(agents_page))
        .route("/api/agents", get(agents_api))
        .route("/static/app.js", get(app_js))
        .route("/static/style.css", get(style_css))
        .fallback(|| async { WebError::NotFound("no such page".into()) })
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Shared,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

/// Serves on loopback in the background (for `pipewatch demo --web`): port 8080 when free,
/// else any free port. Returns the address; the server ends with the runtime.
pub async fn spawn_local(db: DbTarget) -> anyhow::Result<SocketAddr> {
    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", 8080)).await {
        Ok(l) => l,
        Err(_) => tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?,
    };
    let addr = listener.local_addr()?;
    let state = Arc::new(AppState::new(db, Access::Loopback));
    tokio::spawn(async move {
        if let Err(e) = serve(listener, state, std::future::pending()).await {
            tracing::warn!(error = %format!("{e:#}"), "the web view stopped");
        }
    });
    Ok(addr)
}

/// Access check, request deadline and the security headers on every answer.
async fn guard(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let denied = match &state.access {
        Access::Open => None,
        Access::Loopback => (!loopback_host(req.headers())).then(|| {
            (
                StatusCode::FORBIDDEN,
                "this server answers only requests addressed to localhost",
            )
                .into_response()
        }),
        Access::Token(hash) => (!token_ok(req.headers(), hash)).then(|| {
            (
                StatusCode::UNAUTHORIZED,
                [(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"pipewatch\", charset=\"UTF-8\""),
                )],
                "a token is needed: send it as a bearer token or a basic-auth password",
            )
                .into_response()
        }),
    };
    let mut resp = match denied {
        Some(r) => r,
        None => match tokio::time::timeout(REQUEST_DEADLINE, next.run(req)).await {
            Ok(r) => r,
            Err(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the database did not answer in time",
            )
                .into_response(),
        },
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    resp
}

/// Whether the Host header names this machine's loopback (a page from another site that
/// rebinds its name to 127.0.0.1 sends its own name).
fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether the request carries the token (bearer, or basic-auth password), compared in
/// constant time over SHA-256 digests.
fn token_ok(headers: &HeaderMap, hash: &[u8; 32]) -> bool {
    use base64::Engine as _;
    let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    // The scheme's name is case-insensitive (RFC 9110 11.1): `bearer` is `Bearer`.
    let (scheme, rest) = v.trim_start().split_once(' ').unwrap_or((v, ""));
    let given: Vec<u8> = if scheme.eq_ignore_ascii_case("Bearer") {
        rest.trim().as_bytes().to_vec()
    } else if scheme.eq_ignore_ascii_case("Basic") {
        let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(rest.trim()) else {
            return false;
        };
        match raw.iter().position(|&c| c == b':') {
            Some(i) => raw[i + 1..].to_vec(),
            None => return false,
        }
    } else {
        return false;
    };
    let d = ring::digest::digest(&ring::digest::SHA256, &given);
    d.as_ref().ct_eq(hash).into()
}

/// Whether the client asked for JSON rather than a page.
fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json") && !a.contains("text/html"))
}

async fn app_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("static/app.js"),
    )
        .into_response()
}

async fn style_css() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("static/style.css"),
    )
        .into_response()
}

// ---- experiments ------------------------------------------------------------------------

async fn experiments_api(State(s): State<Shared>) -> Result<Response, WebError> {
    let c = s.client().await?;
    Ok(Json(data::experiments(&c).await?).into_response())
}

async fn experiments_page(
    State(s): State<Shared>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    if wants_json(&headers) {
        return experiments_api(State(s)).await;
    }
    let c = s.client().await?;
    let list = data::experiments(&c).await?;
    s.render("experiments.html", json!({ "experiments": list }))
}

/// An experiment given as a UUID or a name, with its name.
async fn experiment(c: &Client, id: &str) -> Result<(Uuid, Option<String>), WebError> {
    // PostgreSQL text cannot hold NUL, so no name has one (and sending it is a database error).
    if id.contains('\0') {
        return Err(WebError::NotFound(format!("no experiment {id:?}")));
    }
    match crate::db::queries::resolve_experiment(c, id).await? {
        Some(u) => Ok((u, crate::db::queries::experiment_name(c, u).await?)),
        None => Err(WebError::NotFound(format!("no experiment {id:?}"))),
    }
}

#[derive(Debug, Deserialize, Default)]
struct WindowQuery {
    window: Option<String>,
}

/// The chart window: its name, start and end. The end is the newest sample (so a finished
/// experiment still shows its last hour); `all` starts at the first sample, 30 days at most.
async fn window(c: &Client, experiment: Uuid, q: &WindowQuery) -> Result<Window, WebError> {
    if let Some(name) = &q.window {
        if data::window_length(name).is_none() {
            return Err(WebError::BadRequest(format!(
                "window {name:?} is not one of {}",
                data::WINDOWS.join(", ")
            )));
        }
    }
    let Some((first, last)) = data::metrics_span(c, experiment).await? else {
        return Ok((q.window.clone().unwrap_or_else(|| "all".into()), None));
    };
    // The default: the whole run while it is at most a day long, else its last day.
    let name = q.window.clone().unwrap_or_else(|| {
        if last - first <= chrono::Duration::days(1) {
            "all".into()
        } else {
            "24h".into()
        }
    });
    let minute = chrono::Duration::minutes(1);
    Ok((
        name.clone(),
        Some(match data::window_length(&name).flatten() {
            Some(l) => (last - l, last),
            // At least a minute, filled from the left as a young experiment grows.
            None if last - first < minute => (first, first + minute),
            None => (first.max(last - chrono::Duration::days(30)), last),
        }),
    ))
}

/// A chart window: its name and its time range (none without metrics).
type Window = (String, Option<(DateTime<Utc>, DateTime<Utc>)>);

/// The charts of a window: the series and the marks read at the same time on three
/// connections of the pool.
async fn charts_json(
    s: &AppState,
    c: &Client,
    experiment: Uuid,
    (name, range): Window,
) -> Result<(String, Value, Vec<chart::DaemonCharts>), WebError> {
    let Some((from, to)) = range else {
        return Ok((
            name.clone(),
            json!({"window": name, "daemons": [], "marks": []}),
            vec![],
        ));
    };
    let (c2, c3) = (s.client().await?, s.client().await?);
    let (series, marks) = tokio::try_join!(
        data::series(c, experiment, from, to),
        data::marks(&c2, &c3, experiment, from, to),
    )?;
    let charts = chart::build(&series, &marks, from, to);
    let j = json!({
        "window": name,
        "from": from.to_rfc3339(),
        "to": to.to_rfc3339(),
        "daemons": series.iter().map(|s| json!({
            "host": s.host,
            "daemon": s.daemon,
            "points": s.t.iter().enumerate().map(|(i, t)| json!({
                "ts": t.to_rfc3339(),
                "cpu_percent": s.cpu[i],
                "memory_rss_bytes": s.rss[i],
                "disk_read_bytes_per_sec": s.read[i],
                "disk_write_bytes_per_sec": s.write[i],
                "records_per_sec": s.rps[i],
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "marks": marks.iter().map(|m| json!({
            "ts": m.ts.to_rfc3339(), "kind": m.kind, "label": m.label,
            "host": m.host, "daemon": m.daemon,
        })).collect::<Vec<_>>(),
    });
    Ok((name, j, charts))
}

/// The whole experiment page's data; the four parts are read at the same time on
/// different connections of the pool. The error summary covers the chart window
/// (all of the run for `all`).
async fn experiment_json(
    s: &AppState,
    c: &Client,
    id: Uuid,
    name: Option<String>,
    q: &WindowQuery,
) -> Result<(Value, Vec<chart::DaemonCharts>), WebError> {
    let w = window(c, id, q).await?;
    // "all" means the whole run, errors before the first sample included.
    let since = w.1.filter(|_| w.0 != "all").map(|(from, _)| from);
    let (c2, c3, c4) = (s.client().await?, s.client().await?, s.client().await?);
    let (charts, progress, errors, events) = tokio::try_join!(
        charts_json(s, c, id, w),
        async { data::progress(&c2, id).await.map_err(WebError::from) },
        async { data::errors(&c3, id, since).await.map_err(WebError::from) },
        async { data::events(&c4, id).await.map_err(WebError::from) },
    )?;
    let (_, metrics, charts) = charts;
    let j = json!({
        "experiment": {"experiment_id": id.to_string(), "name": name},
        "progress": progress,
        "errors": errors,
        "events": events,
        "metrics": metrics,
    });
    Ok((j, charts))
}

async fn experiment_api(
    State(s): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<WindowQuery>,
) -> Result<Response, WebError> {
    let c = s.client().await?;
    let (id, name) = experiment(&c, &id).await?;
    let (j, _) = experiment_json(&s, &c, id, name, &q).await?;
    Ok(Json(j).into_response())
}

async fn experiment_page(
    State(s): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<WindowQuery>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    if wants_json(&headers) {
        return experiment_api(State(s), Path(id), Query(q)).await;
    }
    let c = s.client().await?;
    let (id, name) = experiment(&c, &id).await?;
    let (mut j, charts) = experiment_json(&s, &c, id, name, &q).await?;
    if let Some(o) = j.as_object_mut() {
        o.insert(
            "charts".into(),
            serde_json::to_value(&charts).unwrap_or_default(),
        );
        o.insert("windows".into(), json!(data::WINDOWS));
    }
    s.render("experiment.html", j)
}

async fn progress_api(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, WebError> {
    let c = s.client().await?;
    let (id, _) = experiment(&c, &id).await?;
    Ok(Json(data::progress(&c, id).await?).into_response())
}

/// The progress rows alone, for the page's live update.
async fn progress_fragment(
    State(s): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    if wants_json(&headers) {
        return progress_api(State(s), Path(id)).await;
    }
    let c = s.client().await?;
    let (id, _) = experiment(&c, &id).await?;
    s.render(
        "progress_rows.html",
        json!({ "progress": data::progress(&c, id).await? }),
    )
}

async fn metrics_api(
    State(s): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<WindowQuery>,
) -> Result<Response, WebError> {
    let c = s.client().await?;
    let (id, _) = experiment(&c, &id).await?;
    let w = window(&c, id, &q).await?;
    let (_, j, _) = charts_json(&s, &c, id, w).await?;
    Ok(Json(j).into_response())
}

/// The charts alone, for the page's live update.
async fn charts_fragment(
    State(s): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<WindowQuery>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    if wants_json(&headers) {
        return metrics_api(State(s), Path(id), Query(q)).await;
    }
    let c = s.client().await?;
    let (id, _) = experiment(&c, &id).await?;
    let w = window(&c, id, &q).await?;
    let (name, _, charts) = charts_json(&s, &c, id, w).await?;
    s.render(
        "charts.html",
        json!({ "charts": charts, "window": name, "experiment": {"experiment_id": id.to_string()} }),
    )
}

// ---- logs --------------------------------------------------------------------------------

/// The logs page's query: the filters of `pipewatch logs`, a page cursor and a follow position.
#[derive(Debug, Deserialize, Default, Clone, serde::Serialize)]
struct LogQuery {
    #[serde(default, skip_serializing_if = "blank")]
    experiment: Option<String>,
    #[serde(default, skip_serializing_if = "blank")]
    level: Option<String>,
    #[serde(default, skip_serializing_if = "blank")]
    search: Option<String>,
    #[serde(default, skip_serializing_if = "blank")]
    node: Option<String>,
    #[serde(default, skip_serializing_if = "blank")]
    since: Option<String>,
    #[serde(default, skip_serializing_if = "blank")]
    before_ts: Option<String>,
    #[serde(default, skip_serializing_if = "blank")]
    before_id: Option<String>,
    #[serde(default, skip_serializing_if = "blank")]
    after_id: Option<String>,
    #[serde(default, skip_serializing_if = "blank")]
    limit: Option<String>,
}

fn blank(v: &Option<String>) -> bool {
    v.as_deref().is_none_or(|s| s.trim().is_empty())
}

fn nonblank(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

impl LogQuery {
    /// The filter, with every value checked (a bad one is a 400 naming it).
    fn filter(&self, experiment: Uuid) -> Result<data::LogFilter, WebError> {
        let bad =
            |what: &str, v: &str, why: &str| WebError::BadRequest(format!("{what} {v:?} {why}"));
        let level = match nonblank(&self.level) {
            Some(l) => {
                let u = l.to_ascii_uppercase();
                if !data::LEVELS.contains(&u.as_str()) {
                    return Err(bad(
                        "level",
                        &l,
                        "is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
                    ));
                }
                Some(u)
            }
            None => None,
        };
        let since = match nonblank(&self.since) {
            Some(s) => {
                let d = humantime::parse_duration(&s)
                    .map_err(|_| bad("since", &s, "is not a duration (90s, 1h, 2d)"))?;
                // Older than PostgreSQL's timestamps go (4713 BC) is refused, not overflowed.
                let oldest = chrono::NaiveDate::from_ymd_opt(-4712, 1, 1)
                    .and_then(|d| d.and_hms_opt(0, 0, 0))
                    .map(|t| t.and_utc());
                let t = chrono::Duration::from_std(d)
                    .ok()
                    .and_then(|d| Utc::now().checked_sub_signed(d))
                    .filter(|t| oldest.is_some_and(|o| *t >= o))
                    .ok_or_else(|| bad("since", &s, "is too long"))?;
                Some(t)
            }
            None => None,
        };
        let int = |what: &str, v: &Option<String>| -> Result<Option<i64>, WebError> {
            nonblank(v)
                .map(|s| {
                    s.parse::<i64>()
                        .map_err(|_| bad(what, &s, "is not a number"))
                })
                .transpose()
        };
        let before = match (
            nonblank(&self.before_ts),
            int("before_id", &self.before_id)?,
        ) {
            (Some(t), Some(i)) => Some((
                DateTime::parse_from_rfc3339(&t)
                    .map_err(|_| bad("before_ts", &t, "is not an RFC 3339 time"))?
                    .with_timezone(&Utc),
                i,
            )),
            (None, None) => None,
            _ => {
                return Err(WebError::BadRequest(
                    "before_ts and before_id go together".into(),
                ))
            }
        };
        // PostgreSQL text cannot hold NUL: a value with one is refused, not a database error.
        for (what, v) in [("search", &self.search), ("node", &self.node)] {
            if let Some(v) = v.as_deref().filter(|v| v.contains('\0')) {
                return Err(bad(what, v, "contains a NUL character"));
            }
        }
        let limit = int("limit", &self.limit)?.unwrap_or(100);
        if !(1..=1000).contains(&limit) {
            return Err(bad(
                "limit",
                &limit.to_string(),
                "must be between 1 and 1000",
            ));
        }
        Ok(data::LogFilter {
            experiment,
            level,
            search: nonblank(&self.search),
            node: nonblank(&self.node),
            since,
            before,
            after_id: int("after_id", &self.after_id)?,
            limit,
        })
    }
}

async fn logs_api(
    State(s): State<Shared>,
    Query(q): Query<LogQuery>,
) -> Result<Response, WebError> {
    let Some(e) = nonblank(&q.experiment) else {
        return Err(WebError::BadRequest("experiment is required".into()));
    };
    let c = s.client().await?;
    let (id, _) = experiment(&c, &e).await?;
    let f = q.filter(id)?;
    Ok(Json(data::logs(&c, &f).await?).into_response())
}

async fn logs_page(
    State(s): State<Shared>,
    Query(q): Query<LogQuery>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    if wants_json(&headers) {
        return logs_api(State(s), Query(q)).await;
    }
    let c = s.client().await?;
    let Some(e) = nonblank(&q.experiment) else {
        let list = data::experiments(&c).await?;
        return s.render(
            "logs.html",
            json!({ "experiments": list, "levels": data::LEVELS, "q": q }),
        );
    };
    let (id, name) = experiment(&c, &e).await?;
    let f = q.filter(id)?;
    // Following starts after the newest row there was before the page's query.
    let newest = data::newest_log_id(&c, id).await?;
    let rows = data::logs(&c, &f).await?;
    let older = if rows.len() as i64 == f.limit {
        rows.last().map(|r| {
            let mut next = q.clone();
            next.before_ts = r["ts"].as_str().map(str::to_string);
            next.before_id = r["id"].as_i64().map(|i| i.to_string());
            next.after_id = None;
            serde_urlencoded::to_string(&next).unwrap_or_default()
        })
    } else {
        None
    };
    let mut follow_q = q.clone();
    follow_q.experiment = Some(id.to_string());
    follow_q.before_ts = None;
    follow_q.before_id = None;
    follow_q.after_id = None;
    follow_q.limit = None;
    s.render(
        "logs.html",
        json!({
            "experiment": {"experiment_id": id.to_string(), "name": name},
            "rows": rows,
            "levels": data::LEVELS,
            "q": q,
            "older": older,
            "newest": newest,
            "first_page": f.before.is_none(),
            "follow_src": format!("/api/logs?{}", serde_urlencoded::to_string(&follow_q).unwrap_or_default()),
        }),
    )
}

// ---- agents ------------------------------------------------------------------------------

async fn agents_api(State(s): State<Shared>) -> Result<Response, WebError> {
    let c = s.client().await?;
    Ok(Json(data::agents(&c).await?).into_response())
}

async fn agents_page(State(s): State<Shared>, headers: HeaderMap) -> Result<Response, WebError> {
    if wants_json(&headers) {
        return agents_api(State(s)).await;
    }
    let c = s.client().await?;
    let agents = data::agents(&c).await?;
    s.render(
        "agents.html",
        json!({ "agents": agents, "now": Utc::now().to_rfc3339() }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_characters_become_visible() {
        assert_eq!(visible("plain <b>"), "plain <b>");
        assert_eq!(visible("a\u{202E}cba"), "a\\u{202E}cba");
        assert_eq!(visible("bell\u{7}\nnext"), "bell\\u{0007}\nnext");
    }

    #[test]
    fn listen_policy() {
        let lo: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert!(matches!(access_for(lo, None, false), Ok(Access::Loopback)));
        assert!(matches!(access_for(any, None, true), Ok(Access::Open)));
        assert!(matches!(
            access_for(any, Some("t".repeat(20)), false),
            Ok(Access::Token(_))
        ));
        let err = access_for(any, None, false).err().unwrap();
        assert!(err.starts_with("refusing to serve on 0.0.0.0:8080 without a credential"));
    }

    #[test]
    fn token_and_host_checks() {
        let Access::Token(hash) = token_access("s3cret-token-value") else {
            panic!("token access");
        };
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            h
        };
        assert!(token_ok(&with("Bearer s3cret-token-value"), &hash));
        // user "x", password the token.
        assert!(token_ok(&with("Basic eDpzM2NyZXQtdG9rZW4tdmFsdWU="), &hash));
        assert!(!token_ok(&with("Bearer s3cret-token-valuX"), &hash));
        assert!(!token_ok(&with("Basic !!"), &hash));
        assert!(!token_ok(&HeaderMap::new(), &hash));
        let host = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_str(v).unwrap());
            loopback_host(&h)
        };
        assert!(host("127.0.0.1:8080"));
        assert!(host("localhost:1"));
        assert!(host("[::1]:8080"));
        assert!(!host("evil.example:8080"));
        assert!(!host("127.0.0.1.evil.example"));
    }

    #[test]
    fn every_template_compiles() {
        let env = templates();
        for name in [
            "base.html",
            "experiments.html",
            "experiment.html",
            "progress_rows.html",
            "charts.html",
            "logs.html",
            "agents.html",
            "error.html",
        ] {
            assert!(env.get_template(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn log_text_is_escaped_in_pages() {
        let env = templates();
        let t = env.get_template("logs.html").unwrap();
        let html = t
            .render(json!({
                "experiment": {"experiment_id": "x", "name": "<i>n</i>"},
                "rows": [{"id": 1, "ts": "2026-01-01T00:00:00+00:00", "level": "ERROR",
                          "message": "<script>alert(1)</script>\"'", "traceback": "<img src=x>"}],
                "levels": data::LEVELS, "q": {"search": "\"><b>"}, "newest": 1,
                "first_page": true, "follow_src": "/api/logs?experiment=x",
            }))
            .unwrap();
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(!html.contains("<img src=x>"));
        assert!(!html.contains("\"><b>"));
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;&#x2f;script&gt;"),
            "{html}"
        );
    }
}
