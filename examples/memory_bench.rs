//! The memory benchmark (issue 9 #7): the agent's peak RSS, measured from the outside.
//!
//! It starts a throwaway PostgreSQL and runs the real `pipewatch run` (default settings
//! unless a scenario says otherwise) on two workloads: 360 records of 900 KB each in one file,
//! and a directory of 5,000 small files. For each it waits until every record is committed,
//! reads the agent's peak RSS (`VmHWM` of /proc/PID/status) and its open descriptors, stops
//! it with SIGTERM and checks the exact row count. It prints one line per scenario.
//!
//! It touches nothing but its own temp dir, its own cluster and the processes it starts
//! (each ended by its PID). Run it with `cargo run --release --example memory_bench`.

mod common;

use anyhow::{bail, Context as _};
use pipewatch::db::throwaway::Throwaway;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: f64 = 1024.0 * 1024.0;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A child that is killed if the benchmark bails out early.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: signalling the PID of a child we own and have not reaped.
            unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGKILL) };
            let _ = self.0.wait();
        }
    }
}

/// What one scenario measured.
struct Figures {
    peak_rss: u64,
    max_fds: usize,
    seconds: f64,
}

struct Bench {
    cluster: Throwaway,
    bin: PathBuf,
    dir: PathBuf,
    dbs: usize,
}

impl Bench {
    /// Runs the agent on `glob` until `expect` rows are committed; `batch` is extra TOML for
    /// the `[batch]` table. With `stall`, a lock holds every commit back for that long after
    /// the agent starts (a slow database: the readers run ahead as far as the bounds allow).
    async fn scenario(
        &mut self,
        label: &str,
        glob: &Path,
        batch: &str,
        expect: i64,
        stall: Duration,
    ) -> anyhow::Result<Figures> {
        self.dbs += 1;
        let name = format!("memory_{}", self.dbs);
        let url = common::migrated_db(&self.cluster, &self.bin, &name).await?;
        let config = self.dir.join(format!("{label}.toml"));
        std::fs::write(
            &config,
            format!(
                "[agent]\nhost = \"bench\"\n\n[batch]\n{batch}\n[daemons.app]\nlogs = [\"{}\"]\n",
                glob.display()
            ),
        )?;
        let log = self.dir.join(format!("{label}.log"));
        let locker = common::connect(&url).await?;
        if !stall.is_zero() {
            locker
                .batch_execute("BEGIN; LOCK TABLE pipeline_logs IN ACCESS EXCLUSIVE MODE")
                .await?;
        }
        let t0 = Instant::now();
        let child = Command::new(&self.bin)
            .arg("--config")
            .arg(&config)
            .args(["--database-url", &url, "run"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("start pipewatch run")?;
        let mut agent = Guard(child);
        let pid = agent.0.id();
        let client = common::connect(&url).await?;
        let mut max_fds = 0;
        if !stall.is_zero() {
            tokio::time::sleep(stall).await;
            max_fds = open_fds(pid);
            locker.batch_execute("ROLLBACK").await?;
        }
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            max_fds = max_fds.max(open_fds(pid));
            let n: i64 = client
                .query_one(
                    "SELECT count(*) FROM pipeline_logs WHERE daemon = 'app'",
                    &[],
                )
                .await?
                .get(0);
            if n >= expect {
                break;
            }
            if Instant::now() > deadline || agent.0.try_wait()?.is_some() {
                bail!(
                    "{label}: {n} of {expect} rows; agent log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let seconds = t0.elapsed().as_secs_f64();
        let peak_rss = common::vm_bytes(pid, "VmHWM")?;
        // SAFETY: signalling the PID of a child we own and have not reaped.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        let st = agent.0.wait()?;
        if !st.success() {
            bail!("{label}: agent exited {st}");
        }
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM pipeline_logs WHERE daemon = 'app'",
                &[],
            )
            .await?
            .get(0);
        if n != expect {
            bail!("{label}: {n} rows, expected exactly {expect}");
        }
        Ok(Figures {
            peak_rss,
            max_fds,
            seconds,
        })
    }
}

/// 360 lines of about 900 KB each (a JSON record with a long message).
fn write_big(path: &Path) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let filler: String = (0..900_000)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    for i in 0..360 {
        writeln!(
            f,
            r#"{{"timestamp": "2026-11-29T10:00:00Z", "level": "info", "event": "big {i} {filler}", "seq": {i}}}"#
        )?;
    }
    f.flush()?;
    Ok(())
}

/// 5,000 files of three short lines each.
fn write_many(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for i in 0..5000 {
        let mut text = String::new();
        for j in 0..3 {
            text.push_str(&format!(
                "{{\"timestamp\": \"2026-11-29T10:00:00Z\", \"level\": \"info\", \"event\": \"file {i} line {j}\"}}\n"
            ));
        }
        std::fs::write(dir.join(format!("f{i:05}.jsonl")), text)?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("memory bench failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let bin = common::pipewatch_binary("memory_bench")?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().to_path_buf();
    let cluster = Throwaway::new()?;
    let mut bench = Bench {
        cluster,
        bin,
        dir: dir.clone(),
        dbs: 0,
    };
    std::fs::create_dir_all(dir.join("big"))?;
    write_big(&dir.join("big/app.jsonl"))?;
    write_many(&dir.join("many"))?;
    let big = dir.join("big/*.jsonl");
    let unbounded = "max_bytes = 1073741824\n";
    let held = Duration::from_secs(5);
    let none = Duration::ZERO;
    let scenarios: [(&str, &str, PathBuf, &str, i64, Duration); 5] = [
        ("big", "360 × 900 KB, defaults", big.clone(), "", 360, none),
        (
            "big",
            "360 × 900 KB, defaults, commits held 5 s",
            big.clone(),
            "",
            360,
            held,
        ),
        (
            "big_unbounded",
            "360 × 900 KB, no byte bound (max_bytes = 1 GiB)",
            big.clone(),
            unbounded,
            360,
            none,
        ),
        (
            "big_unbounded",
            "360 × 900 KB, no byte bound, commits held 5 s",
            big,
            unbounded,
            360,
            held,
        ),
        (
            "many",
            "5,000 files × 3 lines, defaults",
            dir.join("many/*.jsonl"),
            "",
            15_000,
            none,
        ),
    ];
    println!(
        "{:<50} {:>14} {:>10} {:>10}",
        "scenario", "peak RSS MiB", "max fds", "seconds"
    );
    let mut failed = false;
    for (label, title, glob, batch, expect, stall) in scenarios {
        let f = bench.scenario(label, &glob, batch, expect, stall).await?;
        let mib = f.peak_rss as f64 / MIB;
        let verdict = if label == "big" {
            let ok = mib < 160.0;
            failed |= !ok;
            if ok {
                "  (goal < 160: pass)"
            } else {
                "  (goal < 160: FAIL)"
            }
        } else {
            ""
        };
        println!(
            "{title:<50} {mib:>14.1} {:>10} {:>10.1}{verdict}",
            f.max_fds, f.seconds
        );
    }
    if failed {
        bail!("peak RSS above the goal");
    }
    Ok(())
}
