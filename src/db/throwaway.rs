//! A throwaway local PostgreSQL: `initdb` + `pg_ctl` in a temp dir on a free loopback port,
//! run as the `postgres` user when we are root (PostgreSQL refuses to run as root). Used by
//! `pipewatch demo` and by the test harness. Stopped and removed on drop; a watchdog process
//! also stops it if this process dies without dropping it.

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
