//! Running the real agent: a temp dir with log files and a config, `run --once`, a running
//! agent that can be stopped with SIGTERM or killed with SIGKILL, and polling helpers.

use super::{pg, pipewatch_cmd};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

/// A directory for logs and config, and a migrated database.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub db: String,
}

impl Env {
    /// A fresh database with the schema applied, and an empty temp dir.
    pub fn new() -> Env {
        Env::with_db(pg::fresh_db())
    }

    /// Uses `db`, applying the schema to it.
    pub fn with_db(db: String) -> Env {
        let out = pipewatch_cmd(&["--database-url", &db, "migrate"])
            .output()
            .expect("pipewatch migrate runs");
        assert!(
            out.status.success(),
            "migrate failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Env {
            dir: tempfile::tempdir().expect("temp dir"),
            db,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes `pipewatch.toml` with the database URL, small batches, and `daemons` (TOML).
    pub fn config(&self, daemons: &str) -> PathBuf {
        let p = self.path("pipewatch.toml");
        let text = format!(
            "[database]\nurl = \"{}\"\n\n[agent]\nhost = \"test-host\"\n\n[batch]\nmax_records = 500\nmax_wait = \"100ms\"\n\n{}",
            self.db,
            daemons.replace("$DIR", &self.dir.path().display().to_string())
        );
        std::fs::write(&p, text).expect("write config");
        p
    }

    /// `pipewatch --config C run --once`.
    pub fn run_once(&self, config: &Path) -> Output {
        pipewatch_cmd(&["--config", config.to_str().expect("utf-8"), "run", "--once"])
            .output()
            .expect("pipewatch runs")
    }

    /// `run --once` that must succeed.
    pub fn run_once_ok(&self, config: &Path) {
        let out = self.run_once(config);
        assert!(
            out.status.success(),
            "run --once failed ({:?}): {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts `pipewatch run`, its stderr going to a file in the temp dir.
    pub fn spawn(&self, config: &Path) -> Agent {
        let log = self.path(&format!(
            "agent-{}.log",
            Instant::now().elapsed().as_nanos()
        ));
        let n = std::fs::read_dir(self.dir.path())
            .map(|d| d.count())
            .unwrap_or(0);
        let log = log.with_file_name(format!("agent-{n}.stderr"));
        let err = std::fs::File::create(&log).expect("agent log file");
        let child = pipewatch_cmd(&["--config", config.to_str().expect("utf-8"), "run"])
            .stdout(Stdio::null())
            .stderr(err)
            .env("PIPEWATCH_LOG", "pipewatch=debug")
            .spawn()
            .expect("spawn pipewatch run");
        Agent { child, log }
    }

    /// Runs SQL on the test database.
    pub fn sql(&self, q: &str) -> String {
        pg::psql(&self.db, q)
    }

    /// `SELECT count(*) …` as a number.
    pub fn count(&self, q: &str) -> i64 {
        self.sql(q)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("not a count: {q}"))
    }
}

/// A running agent process.
pub struct Agent {
    pub child: Child,
    pub log: PathBuf,
}

impl Agent {
    fn signal(&self, sig: i32) {
        // SAFETY: kill on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// SIGTERM, then waits; returns the exit code and how long it took.
    pub fn terminate(mut self) -> (Option<i32>, Duration, String) {
        let t = Instant::now();
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return (st.code(), t.elapsed(), self.stderr());
            }
            if Instant::now() > deadline {
                self.signal(libc::SIGKILL);
                let _ = self.child.wait();
                panic!(
                    "agent did not stop within 30 s of SIGTERM:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// Polls `f` until it returns true or `timeout` passes; returns whether it became true.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Appends lines to a file (creating it), each with a trailing newline.
pub fn append(path: &Path, lines: &[String]) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open log for append");
    let mut buf = Vec::new();
    for l in lines {
        buf.extend_from_slice(l.as_bytes());
        buf.push(b'\n');
    }
    f.write_all(&buf).expect("append");
}

/// Appends raw bytes.
pub fn append_bytes(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open log for append");
    f.write_all(bytes).expect("append");
}

/// A structlog-style JSON line with a unique sequence number in its message.
pub fn json_line(seq: usize) -> String {
    format!(
        r#"{{"event": "line {seq}", "level": "info", "timestamp": "2026-11-28T10:00:00.{:06}Z", "logger": "geo.test", "seq": {seq}}}"#,
        seq % 1_000_000
    )
}
