//! A real pgbouncer (`pool_mode = transaction`, a server pool smaller than the number of
//! clients) in front of a dedicated throwaway PostgreSQL, for the pooler tests; and "noise":
//! other pipewatch processes sharing that pool all the while, so that a statement that
//! outlives its transaction, or a session setting, collides with someone else's.
//!
//! The pooler itself is `pipewatch::db::throwaway::Pooler`. Without pgbouncer the tests are
//! skipped with a note, except in CI (`CI=true`), where that is a failure.

use super::{pg, pipewatch_cmd};
use pipewatch::db::throwaway::{find_pgbouncer, Pooler};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// A dedicated server and a pgbouncer in front of it.
pub struct Pooled {
    pub cluster: pg::Cluster,
    pub pooler: Pooler,
}

/// Starts a server and a pgbouncer with `pool_size` server connections; `None` (after a
/// note) when pgbouncer is not installed outside CI.
pub fn start(pool_size: u32) -> Option<Pooled> {
    if find_pgbouncer().is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "pgbouncer is not installed (CI must install it: apt-get install pgbouncer)"
        );
        eprintln!("note: pgbouncer not installed; skipping the pooler test");
        return None;
    }
    let cluster = pg::Cluster::start_new();
    let port = port_of(&cluster.url("postgres"));
    let pooler = Pooler::start(port, pool_size, &[])
        .unwrap_or_else(|e| panic!("cannot start pgbouncer: {e:#}"));
    Some(Pooled { cluster, pooler })
}

/// The port of a `postgres://user@host:port/db` URL.
fn port_of(url: &str) -> u16 {
    let authority = url
        .split("://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .expect("a URL with an authority");
    authority
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a URL with a port")
}

impl Pooled {
    /// A new database: its direct URL (for checking) and its URL through the pooler.
    pub fn create_db(&self) -> (String, String) {
        let direct = self.cluster.create_db();
        let name = direct
            .rsplit('/')
            .next()
            .and_then(|t| t.split('?').next())
            .expect("a database name")
            .to_string();
        (direct, self.pooler.url(&name))
    }
}

/// Other clients of the pool: pipewatch processes (each numbering its statements from
/// `s0`, the likeliest name to clash) running `args` in a loop through the pooler.
pub struct Noise {
    active: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    /// Read-held while a run is in flight, so that [`Noise::pause`] can wait for them all.
    busy: Arc<RwLock<()>>,
    runs: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Noise {
    /// `clients` threads, each running the commands of `commands` in turn.
    pub fn start(url: &str, clients: usize, commands: &[&[&str]]) -> Noise {
        let mut noise = Noise {
            active: Arc::new(AtomicBool::new(true)),
            stop: Arc::new(AtomicBool::new(false)),
            busy: Arc::new(RwLock::new(())),
            runs: Arc::new(AtomicUsize::new(0)),
            failures: Arc::new(Mutex::new(Vec::new())),
            threads: Vec::new(),
        };
        let commands: Vec<Vec<String>> = commands
            .iter()
            .map(|c| c.iter().map(|s| s.to_string()).collect())
            .collect();
        let mut threads = Vec::new();
        for t in 0..clients {
            let (active, stop, busy) =
                (noise.active.clone(), noise.stop.clone(), noise.busy.clone());
            let (runs, failures) = (noise.runs.clone(), noise.failures.clone());
            let url = url.to_string();
            let commands = commands.clone();
            threads.push(std::thread::spawn(move || {
                let mut i = t;
                while !stop.load(Ordering::SeqCst) {
                    let guard = busy.read().unwrap_or_else(|e| e.into_inner());
                    if !active.load(Ordering::SeqCst) {
                        drop(guard);
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    let args = &commands[i % commands.len()];
                    i += 1;
                    let mut all = vec!["--database-url", url.as_str()];
                    all.extend(args.iter().map(String::as_str));
                    let out = pipewatch_cmd(&all).output().expect("pipewatch runs");
                    drop(guard);
                    runs.fetch_add(1, Ordering::SeqCst);
                    if !out.status.success() {
                        failures.lock().unwrap().push(format!(
                            "{args:?} exited {:?}: {}",
                            out.status.code(),
                            String::from_utf8_lossy(&out.stderr).trim()
                        ));
                    }
                }
            }));
        }
        noise.threads = threads;
        noise
    }

    /// Stops starting new runs and waits for those in flight (around a planned outage).
    pub fn pause(&self) {
        self.active.store(false, Ordering::SeqCst);
        // Every thread checks `active` under the read lock before a run.
        drop(self.busy.write().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn resume(&self) {
        self.active.store(true, Ordering::SeqCst);
    }

    /// Stops; returns how many runs there were and the failures.
    pub fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
        let failures = std::mem::take(&mut *self.failures.lock().unwrap());
        (self.runs.load(Ordering::SeqCst), failures)
    }
}

impl Drop for Noise {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
