//! A throwaway local PostgreSQL: `initdb` + `pg_ctl` in a temp dir on a free loopback port,
//! run as the `postgres` user when we are root (PostgreSQL refuses to run as root). Used by
//! `pipewatch demo` and by the test harness. Stopped and removed on drop; a watchdog process
//! also stops it if this process dies without dropping it.
//!
//! [`Pooler`] puts a throwaway pgbouncer (transaction pooling, a small server pool) in front
//! of a server, for the tests and benchmarks that must behave like production behind one.
//! Never touches a pgbouncer it did not start.

use anyhow::{anyhow, bail, Context as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A local cluster owned by this process.
#[derive(Debug)]
pub struct Throwaway {
    pub port: u16,
    dir: PathBuf,
    bindir: PathBuf,
}

/// Where `initdb` and `pg_ctl` live: `pg_config --bindir`, `PATH`, or the newest
/// `/usr/lib/postgresql/*/bin`.
pub fn find_bindir() -> anyhow::Result<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.join("initdb").exists() && p.join("pg_ctl").exists() {
            return Ok(p);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if d.join("initdb").exists() && d.join("pg_ctl").exists() {
                return Ok(d);
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
    candidates.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    candidates
        .into_iter()
        .rev()
        .find(|p| p.join("initdb").exists() && p.join("pg_ctl").exists())
        .ok_or_else(|| {
            anyhow!(
                "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin; \
                 install them (Debian: apt-get install postgresql) or pass --database-url"
            )
        })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("bind a free loopback port")?;
    Ok(l.local_addr()?.port())
}

/// Runs a PostgreSQL tool, as `postgres` when we are root.
fn pg_tool(bindir: &Path, tool: &str, args: &[&str]) -> anyhow::Result<Output> {
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
        .with_context(|| format!("cannot run {}", exe.display()))
}

fn chown_postgres(path: &Path) -> anyhow::Result<()> {
    if !is_root() {
        return Ok(());
    }
    let st = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(path)
        .status()
        .context("cannot run chown")?;
    if !st.success() {
        bail!(
            "chown postgres {} failed: is there a `postgres` system user? (Debian: apt-get install postgresql)",
            path.display()
        );
    }
    Ok(())
}

fn utf8(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("path is not UTF-8: {}", p.display()))
}

impl Throwaway {
    /// initdb and start a cluster; `extra_conf` is appended to postgresql.conf and `prepare`
    /// may add files to the data directory first.
    pub fn start_with(extra_conf: &str, prepare: impl FnOnce(&Path)) -> anyhow::Result<Throwaway> {
        let bindir = find_bindir()?;
        let dir = std::env::temp_dir().join(format!(
            "pipewatch-pg-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        chown_postgres(&dir)?;
        let data = dir.join("data");
        let out = pg_tool(
            &bindir,
            "initdb",
            &[
                "-D",
                utf8(&data)?,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        )?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let conf_path = data.join("postgresql.conf");
        let mut conf = std::fs::read_to_string(&conf_path).unwrap_or_default();
        conf.push_str(
            "\nfsync = off\nfull_page_writes = off\nmax_connections = 200\nshared_buffers = 64MB\n",
        );
        conf.push_str(extra_conf);
        conf.push('\n');
        std::fs::write(&conf_path, conf).context("write postgresql.conf")?;
        prepare(&data);
        chown_postgres(&data)?;
        let cluster = Throwaway {
            port: free_port()?,
            dir,
            bindir,
        };
        cluster.start()?;
        cluster.spawn_watchdog();
        Ok(cluster)
    }

    /// A plain cluster.
    pub fn new() -> anyhow::Result<Throwaway> {
        Throwaway::start_with("", |_| {})
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Starts (again) and waits until connections are accepted.
    pub fn start(&self) -> anyhow::Result<()> {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={}",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log");
        let data = self.data_dir();
        let mut last = String::new();
        for _ in 0..3 {
            let out = pg_tool(
                &self.bindir,
                "pg_ctl",
                &[
                    "-D",
                    utf8(&data)?,
                    "-l",
                    utf8(&log)?,
                    "-o",
                    &opts,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
            )?;
            if out.status.success() {
                return Ok(());
            }
            last = format!(
                "{}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        bail!("pg_ctl start failed: {}", last.trim())
    }

    /// Stops immediately (an outage, for tests).
    pub fn stop(&self) {
        if let Ok(data) = utf8(&self.data_dir()) {
            let _ = pg_tool(
                &self.bindir,
                "pg_ctl",
                &["-D", data, "-m", "immediate", "-w", "stop"],
            );
        }
    }

    /// URL of database `db` (TLS off: it is a loopback throwaway).
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// Stops the cluster when this process is gone, however it ends.
    fn spawn_watchdog(&self) {
        let pg_ctl = self.bindir.join("pg_ctl");
        let stop = format!(
            "{}'{}' -D '{}' -m immediate -w stop >/dev/null 2>&1",
            if is_root() {
                "runuser -u postgres -- "
            } else {
                ""
            },
            pg_ctl.display(),
            self.data_dir().display()
        );
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop}; rm -rf '{dir}'",
            pid = std::process::id(),
            dir = self.dir.display()
        );
        let _ = Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }
}

impl Drop for Throwaway {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A throwaway pgbouncer on a free loopback port in front of one PostgreSQL server:
/// `pool_mode = transaction`, `pool_size` server connections per database and user, every
/// database of the server reachable by name, `trust` login for the listed users. Run as the
/// `postgres` user when we are root (pgbouncer refuses root); stopped by its PID on drop, and
/// by a watchdog if this process dies first.
#[derive(Debug)]
pub struct Pooler {
    pub port: u16,
    dir: PathBuf,
    child: Option<std::process::Child>,
}

/// Where Debian puts pgbouncer; else `PATH`.
pub fn find_pgbouncer() -> Option<PathBuf> {
    let debian = PathBuf::from("/usr/sbin/pgbouncer");
    if debian.exists() {
        return Some(debian);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join("pgbouncer"))
        .find(|p| p.exists())
}

/// The uid and gid of the `postgres` user.
fn postgres_ids() -> anyhow::Result<(u32, u32)> {
    let name = std::ffi::CString::new("postgres").expect("no NUL in a literal");
    // SAFETY: getpwnam is given a valid C string; the returned record is read at once, before
    // any other call that could overwrite it.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        bail!("there is no `postgres` system user to run pgbouncer as (Debian: apt-get install postgresql)");
    }
    // SAFETY: pw is non-null and points at getpwnam's static record.
    Ok(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

impl Pooler {
    /// Starts pgbouncer in front of the server on `server_port` (127.0.0.1), with at most
    /// `pool_size` server connections per database and user; `users` may log in (`postgres`
    /// always can). Waits until it accepts connections.
    pub fn start(server_port: u16, pool_size: u32, users: &[&str]) -> anyhow::Result<Pooler> {
        Pooler::start_with(server_port, pool_size, users, "")
    }

    /// Like [`Pooler::start`], with `extra` appended to the `[pgbouncer]` section.
    pub fn start_with(
        server_port: u16,
        pool_size: u32,
        users: &[&str],
        extra: &str,
    ) -> anyhow::Result<Pooler> {
        use std::os::unix::process::CommandExt as _;
        let exe = find_pgbouncer().ok_or_else(|| {
            anyhow!("pgbouncer not found at /usr/sbin/pgbouncer or on PATH (Debian: apt-get install pgbouncer)")
        })?;
        let dir = std::env::temp_dir().join(format!(
            "pipewatch-pgbouncer-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let port = free_port()?;
        let mut userlist = String::from("\"postgres\" \"\"\n");
        for u in users.iter().filter(|u| **u != "postgres") {
            userlist.push_str(&format!("\"{}\" \"\"\n", u.replace('"', "\"\"")));
        }
        std::fs::write(dir.join("userlist.txt"), userlist).context("write pgbouncer userlist")?;
        let d = utf8(&dir)?;
        // server_login_retry and server_check_delay are short so that a server restarted
        // under it is used again within a second, as a test expects.
        let ini = format!(
            "[databases]\n* = host=127.0.0.1 port={server_port}\n\n[pgbouncer]\n\
             listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = trust\nauth_file = {d}/userlist.txt\n\
             pool_mode = transaction\ndefault_pool_size = {pool_size}\nmin_pool_size = 0\n\
             reserve_pool_size = 0\nmax_client_conn = 2000\nmax_db_connections = 0\n\
             server_login_retry = 1\nserver_check_delay = 1\n\
             admin_users = postgres\nstats_users = postgres\n\
             logfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\n{extra}\n"
        );
        std::fs::write(dir.join("pgbouncer.ini"), ini).context("write pgbouncer.ini")?;
        chown_postgres(&dir)?;
        let mut cmd = Command::new(&exe);
        cmd.arg(dir.join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if is_root() {
            let (uid, gid) = postgres_ids()?;
            cmd.uid(uid).gid(gid);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot run {}", exe.display()))?;
        let mut pooler = Pooler {
            port,
            dir,
            child: Some(child),
        };
        pooler.spawn_watchdog();
        pooler.wait_ready()?;
        Ok(pooler)
    }

    /// Polls until pgbouncer accepts a TCP connection (at most 15 s).
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        loop {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            let exited = match self.child.as_mut() {
                Some(c) => c.try_wait().ok().flatten(),
                None => None,
            };
            if exited.is_some() || std::time::Instant::now() > deadline {
                bail!(
                    "pgbouncer did not start on 127.0.0.1:{} ({}): {}",
                    self.port,
                    exited.map_or("still not listening after 15 s".into(), |s| s.to_string()),
                    self.log().trim()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// pgbouncer's own log so far (for messages of a failing test).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }

    /// URL of database `db` through the pooler (TLS off: loopback).
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// URL of pgbouncer's admin console (`SHOW POOLS`, `SHOW STATS`; simple queries only).
    pub fn admin_url(&self) -> String {
        self.url("pgbouncer")
    }

    /// The PID of the pgbouncer process, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Stops pgbouncer (SIGTERM: immediate shutdown, then SIGKILL after 5 s) by its PID.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = std::fs::write(self.dir.join("stopped"), b"");
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: kill has no memory-safety preconditions; pid is our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kills pgbouncer when this process is gone, however it ends.
    fn spawn_watchdog(&self) {
        let Some(pid) = self.pid() else { return };
        // It gives up as soon as the pooler was stopped or dropped (the marker or the
        // directory is gone), so it never signals a PID that may belong to someone else now.
        let script = format!(
            "d='{dir}'; while kill -0 {me} 2>/dev/null && [ -d \"$d\" ] && [ ! -e \"$d/stopped\" ]; \
             do sleep 1; done; [ -d \"$d\" ] && [ ! -e \"$d/stopped\" ] || exit 0; \
             kill -TERM {pid} 2>/dev/null; sleep 1; kill -KILL {pid} 2>/dev/null; rm -rf \"$d\"",
            me = std::process::id(),
            dir = self.dir.display()
        );
        let _ = Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }
}

impl Drop for Pooler {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
