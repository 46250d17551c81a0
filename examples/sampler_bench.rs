//! Measures what sampling costs: 20 idle child processes watched as 20 daemons (half by pid
//! file, half by `process_match`), `Watcher::tick` run back to back, CPU time per tick
//! measured with `getrusage`, and the share of one core that makes at a 10 s interval.
//! A baseline (an empty loop of the same count) is measured in the same run.
//!
//! Run: `cargo run --release --example sampler_bench [ticks]`.

use pipewatch::agent::activity;
use pipewatch::agent::metrics::Watcher;
use pipewatch::config::resolve;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DAEMONS: usize = 20;
const INTERVAL_SECS: f64 = 10.0;

/// User plus system CPU time of this process so far.
fn cpu_time() -> Duration {
    // SAFETY: rusage is plain old data and getrusage only writes into it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out pointer for RUSAGE_SELF.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn main() -> anyhow::Result<()> {
    let ticks: u32 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir()?;
    let mut kids: Vec<Child> = Vec::new();
    let mut toml = String::from("[agent]\nhost = \"bench\"\n");
    for i in 0..DAEMONS {
        let marker = format!("pw-bench-{}-{i}", std::process::id());
        let kid = Command::new("perl")
            .args(["-e", "sleep 600", &marker])
            .stdin(Stdio::null())
            .spawn()?;
        // Every daemon is due at every tick: the bench ticks back to back.
        if i % 2 == 0 {
            let pid_file = dir.path().join(format!("d{i}.pid"));
            std::fs::write(&pid_file, format!("{}\n", kid.id()))?;
            toml.push_str(&format!(
                "[daemons.d{i}]\npid_file = {:?}\nmetrics_interval = \"1ms\"\ndisks = [\"/\"]\n",
                pid_file.display().to_string()
            ));
        } else {
            toml.push_str(&format!(
                "[daemons.d{i}]\nprocess_match = '{marker}$'\nmetrics_interval = \"1ms\"\ndisks = [\"/\"]\n"
            ));
        }
        kids.push(kid);
    }
    let config = resolve::parse(Path::new("bench.toml"), &toml)
        .map_err(|e| anyhow::anyhow!("bench config: {e}"))?;
    let mut w = Watcher::new("bench".into(), config.daemons, activity::shared());
    let first = w.tick(Instant::now());
    let alive = first
        .metrics
        .iter()
        .filter(|m| m.daemon != "pipewatch" && m.pid.is_some())
        .count();

    let c0 = cpu_time();
    let t0 = Instant::now();
    let mut rows = 0usize;
    for _ in 0..ticks {
        std::thread::sleep(Duration::from_millis(2));
        rows += w.tick(Instant::now()).metrics.len();
    }
    let wall = t0.elapsed();
    let work = cpu_time() - c0;

    let b0 = cpu_time();
    for _ in 0..ticks {
        std::thread::sleep(Duration::from_millis(2));
        std::hint::black_box(Instant::now());
    }
    let base = cpu_time() - b0;

    let per_tick = work.saturating_sub(base).as_secs_f64() / f64::from(ticks);
    let processes = std::fs::read_dir("/proc")?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .count();
    println!("daemons: {DAEMONS} ({alive} found alive), host processes: {processes}");
    println!(
        "ticks: {ticks}, rows: {rows}, wall: {:.2} s",
        wall.as_secs_f64()
    );
    println!(
        "CPU with ticks: {:.1} ms, baseline loop: {:.1} ms",
        work.as_secs_f64() * 1000.0,
        base.as_secs_f64() * 1000.0
    );
    println!(
        "CPU per tick (minus baseline): {:.3} ms; at a {INTERVAL_SECS} s interval: {:.4} % of one core",
        per_tick * 1000.0,
        per_tick / INTERVAL_SECS * 100.0
    );
    for mut k in kids {
        let _ = k.kill();
        let _ = k.wait();
    }
    Ok(())
}
