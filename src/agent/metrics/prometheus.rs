//! The optional Prometheus endpoint (`[agent] metrics_listen`): a minimal HTTP/1.1 responder
//! that answers `GET /metrics` with the agent's counters in the text exposition format.
//!
//! It only reads the shared activity and `/proc/self`; one request per connection, bounded
//! request size and time, and no other routes. It never writes to the database.

use crate::agent::activity::{Activity, SharedActivity};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The largest request head accepted.
const MAX_REQUEST_BYTES: usize = 8192;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `addr` and serves until `shutdown` is cancelled.
pub async fn serve(
    addr: SocketAddr,
    activity: SharedActivity,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {addr} for Prometheus metrics (agent.metrics_listen): {e}"
        )
    })?;
    serve_listener(listener, activity, shutdown).await
}

/// Serves on an already bound listener until `shutdown` is cancelled.
pub async fn serve_listener(
    listener: TcpListener,
    activity: SharedActivity,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                let activity = activity.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        r = handle(stream, activity) => {
                            if let Err(error) = r {
                                tracing::debug!(%error, "Prometheus request failed.");
                            }
                        }
                    }
                });
            }
            Err(error) => {
                // Accept errors (e.g. too many open files) are transient; pause briefly.
                tracing::warn!(%error, "Cannot accept a Prometheus connection.");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(mut stream: TcpStream, activity: SharedActivity) -> std::io::Result<()> {
    let head = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
        Ok(r) => r?,
        Err(_) => return Ok(()),
    };
    let (status, content_type, body) = match route(&head) {
        Route::Metrics => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(&snapshot(&activity), &read_self()),
        ),
        Route::NotFound => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found; try /metrics\n".to_string(),
        ),
        Route::MethodNotAllowed => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET is supported\n".to_string(),
        ),
        Route::BadRequest => (
            "400 Bad Request",
            "text/plain; charset=utf-8",
            "bad request\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Reads until the end of the request head (or the size limit, or EOF).
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while buf.len() < MAX_REQUEST_BYTES && !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(buf)
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

/// Decides the response from the request line.
fn route(head: &[u8]) -> Route {
    let line = head.split(|b| *b == b'\n').next().unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Route::BadRequest;
    };
    let path = target.split('?').next().unwrap_or(target);
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => Route::Metrics,
        ("GET" | "HEAD", _) => Route::NotFound,
        _ => Route::MethodNotAllowed,
    }
}

fn snapshot(activity: &SharedActivity) -> Activity {
    // Plain data: a poisoned lock still holds readable values.
    let a = activity.lock().unwrap_or_else(|e| e.into_inner());
    Activity {
        daemons: a.daemons.clone(),
        files: a.files.clone(),
        agent: a.agent.clone(),
        unreadable: a.unreadable.clone(),
    }
}

/// The agent's own CPU seconds and RSS bytes, when `/proc/self` can be read.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SelfUsage {
    pub cpu_seconds: Option<f64>,
    pub rss_bytes: Option<u64>,
}

fn read_self() -> SelfUsage {
    let clock = super::sampler::Clock::from_os();
    match super::sampler::read_pid(std::process::id()) {
        Some(r) => SelfUsage {
            cpu_seconds: Some(r.stat.cpu_ticks as f64 / clock.ticks_per_sec),
            rss_bytes: Some(r.stat.rss_pages.saturating_mul(clock.page_size)),
        },
        None => SelfUsage::default(),
    }
}

/// Escapes a label value per the exposition format.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the exposition text. Families are written in a fixed order, label sets sorted.
pub fn render(a: &Activity, me: &SelfUsage) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP pipewatch_{name} {help}");
        let _ = writeln!(out, "# TYPE pipewatch_{name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "pipewatch_{name}{labels} {v}");
        }
    };
    let c = &a.agent;
    family(
        "records_shipped_total",
        "counter",
        "Records committed to PostgreSQL since the agent started.",
        vec![(String::new(), c.records_shipped as f64)],
    );
    family(
        "records_quarantined_total",
        "counter",
        "Records the database refused and that were set aside.",
        vec![(String::new(), c.records_quarantined as f64)],
    );
    family(
        "reconnects_total",
        "counter",
        "Database reconnections.",
        vec![(String::new(), c.reconnects as f64)],
    );
    family(
        "batches_committed_total",
        "counter",
        "Transactions committed.",
        vec![(String::new(), c.batches_committed as f64)],
    );
    if let Some(t) = c.last_commit_at {
        family(
            "last_commit_timestamp_seconds",
            "gauge",
            "Unix time of the last commit.",
            vec![(String::new(), t.timestamp_millis() as f64 / 1000.0)],
        );
    }
    let mut daemons: Vec<_> = a.daemons.iter().collect();
    daemons.sort_by(|x, y| x.0.cmp(y.0));
    family(
        "daemon_records_read_total",
        "counter",
        "Records read from each daemon's logs since the agent started.",
        daemons
            .iter()
            .map(|(name, d)| {
                (
                    format!("{{daemon=\"{}\"}}", label(name)),
                    d.records_read as f64,
                )
            })
            .collect(),
    );
    family(
        "daemon_last_read_timestamp_seconds",
        "gauge",
        "Unix time the agent last read a record of each daemon.",
        daemons
            .iter()
            .filter_map(|(name, d)| {
                d.last_read_at.map(|t| {
                    (
                        format!("{{daemon=\"{}\"}}", label(name)),
                        t.timestamp_millis() as f64 / 1000.0,
                    )
                })
            })
            .collect(),
    );
    let mut files: Vec<_> = a.files.iter().collect();
    files.sort_by(|x, y| x.0.cmp(y.0));
    family(
        "file_lag_bytes",
        "gauge",
        "Bytes between the read position and the end of each watched file.",
        files
            .iter()
            .map(|(path, f)| {
                (
                    format!(
                        "{{daemon=\"{}\",file=\"{}\"}}",
                        label(&f.daemon),
                        label(path)
                    ),
                    f.lag_bytes as f64,
                )
            })
            .collect(),
    );
    family(
        "file_last_commit_timestamp_seconds",
        "gauge",
        "Unix time of the last commit of each watched file's position.",
        files
            .iter()
            .filter_map(|(path, f)| {
                f.last_commit_at.map(|t| {
                    (
                        format!(
                            "{{daemon=\"{}\",file=\"{}\"}}",
                            label(&f.daemon),
                            label(path)
                        ),
                        t.timestamp_millis() as f64 / 1000.0,
                    )
                })
            })
            .collect(),
    );
    if let Some(cpu) = me.cpu_seconds {
        family(
            "process_cpu_seconds_total",
            "counter",
            "CPU time used by the agent.",
            vec![(String::new(), cpu)],
        );
    }
    if let Some(rss) = me.rss_bytes {
        family(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory of the agent.",
            vec![(String::new(), rss as f64)],
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::activity::{DaemonActivity, FileActivity};

    #[test]
    fn routes() {
        let check = |head: &str, expected: Route| assert_eq!(route(head.as_bytes()), expected);
        check("GET /metrics HTTP/1.1\r\n\r\n", Route::Metrics);
        check("GET /metrics?x=1 HTTP/1.1\r\n\r\n", Route::Metrics);
        check("GET / HTTP/1.1\r\n\r\n", Route::NotFound);
        check("POST /metrics HTTP/1.1\r\n\r\n", Route::MethodNotAllowed);
        check("", Route::BadRequest);
    }

    #[test]
    fn renders_families_with_escaped_labels() {
        let mut a = Activity::default();
        a.agent.records_shipped = 42;
        a.daemons.insert(
            "clu\"st".into(),
            DaemonActivity {
                records_read: 7,
                ..DaemonActivity::default()
            },
        );
        a.files.insert(
            "/var/log/a.jsonl".into(),
            FileActivity {
                daemon: "clu\"st".into(),
                lag_bytes: 100,
                last_commit_at: None,
                ..FileActivity::default()
            },
        );
        let text = render(
            &a,
            &SelfUsage {
                cpu_seconds: Some(1.5),
                rss_bytes: Some(1024),
            },
        );
        assert!(text.contains(
            "# HELP pipewatch_records_shipped_total Records committed to PostgreSQL since the agent started.\n# TYPE pipewatch_records_shipped_total counter\npipewatch_records_shipped_total 42\n"
        ), "{text}");
        assert!(text.contains("pipewatch_daemon_records_read_total{daemon=\"clu\\\"st\"} 7\n"));
        assert!(text.contains(
            "pipewatch_file_lag_bytes{daemon=\"clu\\\"st\",file=\"/var/log/a.jsonl\"} 100\n"
        ));
        assert!(text.contains("pipewatch_process_cpu_seconds_total 1.5\n"));
        assert!(text.contains("pipewatch_process_resident_memory_bytes 1024\n"));
        assert!(!text.contains("pipewatch_last_commit_timestamp_seconds"));
    }
}
