//! A throwaway PostgreSQL for tests: initdb + pg_ctl on a free loopback port in a temp dir,
//! run as the `postgres` user when the tests run as root. One shared cluster per test binary
//! (each test gets its own database), or a dedicated one that a test may stop and restart.
//! `PIPEWATCH_TEST_DATABASE_URL` replaces the shared cluster.
//!
//! A watchdog shell process stops the cluster when the test binary exits, however it exits.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A running (or stopped) cluster.
pub struct Cluster {
    pub port: u16,
    dir: PathBuf,
    bindir: PathBuf,
    /// Base URL without a database name; `None` for an external server.
    external: Option<String>,
}

static SHARED: OnceLock<Cluster> = OnceLock::new();
static DB_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// The cluster shared by this test binary.
pub fn shared() -> &'static Cluster {
    SHARED.get_or_init(|| match std::env::var("PIPEWATCH_TEST_DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => Cluster {
            port: 0,
            dir: PathBuf::new(),
            bindir: PathBuf::new(),
            external: Some(url),
        },
        _ => Cluster::start_new(),
    })
}

/// A fresh, empty database on the shared cluster; returns its URL.
pub fn fresh_db() -> String {
    shared().create_db()
}

fn find_bindir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.join("initdb").exists() {
            return p;
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if d.join("initdb").exists() && d.join("pg_ctl").exists() {
                return d;
            }
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    candidates.sort();
    candidates
        .into_iter()
        .rev()
        .find(|p| p.join("initdb").exists())
        .expect("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port");
    l.local_addr().expect("local addr").port()
}

/// Runs a PostgreSQL tool, as `postgres` when we are root.
fn pg_tool(bindir: &Path, tool: &str, args: &[&str]) -> std::process::Output {
    let exe = bindir.join(tool);
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    cmd.args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()))
}

impl Cluster {
    /// initdb + start a new cluster in a temp dir on a free port.
    pub fn start_new() -> Cluster {
        Cluster::start_with("", |_| {})
    }

    /// Like [`Cluster::start_new`], with extra `postgresql.conf` lines and a hook that may put
    /// files (certificates) into the data directory before the server starts.
    pub fn start_with(extra_conf: &str, prepare: impl FnOnce(&Path)) -> Cluster {
        let bindir = find_bindir();
        let base = std::env::temp_dir().join(format!(
            "pipewatch-pg-{}-{}",
            std::process::id(),
            DB_COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).expect("create cluster dir");
        if is_root() {
            let st = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&base)
                .status()
                .expect("chown");
            assert!(st.success(), "chown of the cluster dir to postgres failed");
        }
        let data = base.join("data");
        let out = pg_tool(
            &bindir,
            "initdb",
            &[
                "-D",
                data.to_str().expect("utf-8 path"),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        );
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let conf =
            "\nfsync = off\nfull_page_writes = off\nmax_connections = 200\nshared_buffers = 64MB\n";
        let mut existing =
            std::fs::read_to_string(data.join("postgresql.conf")).unwrap_or_default();
        existing.push_str(conf);
        existing.push_str(extra_conf);
        existing.push('\n');
        // Written as root; postgres only needs to read it.
        std::fs::write(data.join("postgresql.conf"), existing).expect("write postgresql.conf");
        prepare(&data);
        if is_root() {
            let _ = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&data)
                .status();
        }
        let cluster = Cluster {
            port: free_port(),
            dir: base,
            bindir,
            external: None,
        };
        cluster.start();
        cluster.spawn_watchdog();
        cluster
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Starts (or restarts) the server and waits until it accepts connections.
    pub fn start(&self) {
        assert!(self.external.is_none(), "cannot start an external server");
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={}",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log");
        for attempt in 0..3 {
            let out = pg_tool(
                &self.bindir,
                "pg_ctl",
                &[
                    "-D",
                    self.data_dir().to_str().expect("utf-8"),
                    "-l",
                    log.to_str().expect("utf-8"),
                    "-o",
                    &opts,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
            );
            if out.status.success() {
                return;
            }
            if attempt == 2 {
                panic!(
                    "pg_ctl start failed: {}{}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Stops the server immediately (simulates an outage).
    pub fn stop(&self) {
        if self.external.is_some() {
            return;
        }
        let _ = pg_tool(
            &self.bindir,
            "pg_ctl",
            &[
                "-D",
                self.data_dir().to_str().expect("utf-8"),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }

    /// Stops the cluster when this test process is gone, even after a panic or SIGKILL.
    fn spawn_watchdog(&self) {
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop}; rm -rf '{dir}'",
            pid = std::process::id(),
            stop = if is_root() {
                format!(
                    "runuser -u postgres -- '{}' -D '{}' -m immediate -w stop >/dev/null 2>&1",
                    self.bindir.join("pg_ctl").display(),
                    self.data_dir().display()
                )
            } else {
                format!(
                    "'{}' -D '{}' -m immediate -w stop >/dev/null 2>&1",
                    self.bindir.join("pg_ctl").display(),
                    self.data_dir().display()
                )
            },
            dir = self.dir.display()
        );
        let _ = Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }

    /// URL of database `db` on this cluster.
    pub fn url(&self, db: &str) -> String {
        match &self.external {
            Some(base) => replace_db(base, db),
            None => format!(
                "postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable",
                self.port
            ),
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

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.external.is_none() {
            self.stop();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
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
        .expect("psql runs");
    assert!(
        out.status.success(),
        "psql failed for {sql:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim_end().to_string()
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
