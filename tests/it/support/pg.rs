//! A throwaway PostgreSQL for tests: initdb + pg_ctl on a free loopback port in a temp dir,
//! run as the `postgres` user when the tests run as root. One shared cluster per test binary
//! (each test gets its own database), or a dedicated one that a test may stop and restart.
//! `PIPEWATCH_TEST_DATABASE_URL` replaces the shared cluster.
//!
//! The cluster itself is `pipewatch::db::throwaway` (shared with `pipewatch demo`).

use pipewatch::db::throwaway::Throwaway;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A running (or stopped) cluster, or an external server.
pub struct Cluster {
    inner: Option<Throwaway>,
    /// Base URL of an external server (`PIPEWATCH_TEST_DATABASE_URL`).
    external: Option<String>,
}

static SHARED: OnceLock<Cluster> = OnceLock::new();
static DB_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// The cluster shared by this test binary.
pub fn shared() -> &'static Cluster {
    SHARED.get_or_init(|| match std::env::var("PIPEWATCH_TEST_DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => Cluster {
            inner: None,
            external: Some(url),
        },
        _ => Cluster::start_new(),
    })
}

/// A fresh, empty database on the shared cluster; returns its URL.
pub fn fresh_db() -> String {
    shared().create_db()
}

impl Cluster {
    /// A dedicated cluster (for tests that stop and start it).
    pub fn start_new() -> Cluster {
        Cluster::start_with("", |_| {})
    }

    /// A dedicated cluster with extra `postgresql.conf` lines and data-directory files.
    pub fn start_with(extra_conf: &str, prepare: impl FnOnce(&Path)) -> Cluster {
        let t = Throwaway::start_with(extra_conf, prepare)
            .unwrap_or_else(|e| panic!("cannot start a throwaway PostgreSQL: {e:#}"));
        Cluster {
            inner: Some(t),
            external: None,
        }
    }

    /// Starts the server again after [`Cluster::stop`].
    pub fn start(&self) {
        if let Some(t) = &self.inner {
            t.start().unwrap_or_else(|e| panic!("{e:#}"));
        }
    }

    /// Stops the server immediately (an outage).
    pub fn stop(&self) {
        if let Some(t) = &self.inner {
            t.stop();
        }
    }

    /// URL of database `db` on this cluster.
    pub fn url(&self, db: &str) -> String {
        match (&self.external, &self.inner) {
            (Some(base), _) => replace_db(base, db),
            (None, Some(t)) => t.url(db),
            (None, None) => unreachable!("a cluster is external or owned"),
        }
    }

    /// Creates a new empty database and returns its URL.
    pub fn create_db(&self) -> String {
        let n = DB_COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("pw_test_{}_{n}", std::process::id());
        let admin = match &self.external {
            Some(base) => base.clone(),
            None => self.url("postgres"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new("psql")
                .args([
                    &admin,
                    "-q",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-c",
                    &format!("CREATE DATABASE {name}"),
                ])
                .stdin(Stdio::null())
                .output();
            match out {
                Ok(o) if o.status.success() => break,
                Ok(o) if Instant::now() > deadline => panic!(
                    "CREATE DATABASE failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) if Instant::now() > deadline => panic!("psql not runnable: {e}"),
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
        self.url(&name)
    }
}

/// Replaces the database name of a URL (path part) or key=value string.
fn replace_db(base: &str, db: &str) -> String {
    if let Some(rest) = base
        .strip_prefix("postgres://")
        .or_else(|| base.strip_prefix("postgresql://"))
    {
        let (authority, tail) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let query = tail.find('?').map(|i| &tail[i..]).unwrap_or("");
        format!("postgres://{authority}/{db}{query}")
    } else {
        let kept: Vec<&str> = base
            .split_whitespace()
            .filter(|p| !p.starts_with("dbname="))
            .collect();
        format!("{} dbname={db}", kept.join(" "))
    }
}

/// Runs SQL with psql and returns the unaligned, tuples-only output.
pub fn psql(url: &str, sql: &str) -> String {
    try_psql(url, sql).unwrap_or_else(|stderr| panic!("psql failed for {sql:?}: {stderr}"))
}

/// Like [`psql`] but returns stderr on failure instead of panicking.
pub fn try_psql(url: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args([
            url,
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}
