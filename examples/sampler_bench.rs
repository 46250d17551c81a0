//! Measures what sampling costs: 20 idle child processes watched as 20 daemons (half by pid
//! file, half by `process_match`), `Watcher::tick` run back to back, CPU time per tick
//! measured with `getrusage`, and the share of one core that makes at a 10 s interval.
//! A baseline (an empty loop of the same count) is measured in the same run.
//!
//! With `--idle`, the daemons are the bench's idle ones instead: no process to watch (sampled
//! at host level), each with a log file and its activity filled as after reading ten lines,
//! so the tick's own cost (the activity, the agent's row with its `files`) is what is measured.
//!
//! Run: `cargo run --release --example sampler_bench [ticks] [--idle] [--gap-ms N]`; it also
//! prints the median thread CPU of one tick.

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

/// CPU time of the calling thread so far.
fn thread_cpu() -> Duration {
    // SAFETY: timespec is plain old data and clock_gettime only writes into it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out pointer for a clock every Linux has.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn main() -> anyhow::Result<()> {
    let ticks: u32 = std::env::args()
        .skip(1)
        .find_map(|s| s.parse().ok())
        .unwrap_or(200);
    let idle = std::env::args().any(|a| a == "--idle");
    // `--gap-ms N`: the pause between ticks (the agent's is 10 s: caches are cold by then).
    let gap = Duration::from_millis(
        std::env::args()
            .skip_while(|a| a != "--gap-ms")
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(2),
    );
    let dir = tempfile::tempdir()?;
    let mut kids: Vec<Child> = Vec::new();
    let mut toml = String::from("[agent]\nhost = \"bench\"\n");
    let shared = activity::shared();
    for i in (0..DAEMONS).filter(|_| idle) {
        let logs = dir.path().join(format!("d{i:02}"));
        toml.push_str(&format!(
            "[daemons.idle{i:02}]\nlogs = [{:?}]\nmetrics_interval = \"1ms\"\n",
            logs.join("*.jsonl").display().to_string()
        ));
        let mut a = shared.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let d = a.daemons.entry(format!("idle{i:02}")).or_default();
        for n in 0..10 {
            d.remember_line(
                "info",
                &format!("step {n} of the pipeline finished in 12.5 ms with 4096 items"),
                None,
            );
        }
        d.records_read = 10;
        d.last_read_at = Some(chrono::Utc::now());
        d.last_record_ts = d.last_read_at;
        d.last_message = Some("step 9 of the pipeline finished".into());
        d.last_stage = Some("transform".into());
        d.last_node_id = Some("node-7".into());
        d.last_experiment_id = Some(uuid::Uuid::new_v4());
        let path = logs.join("app.jsonl").display().to_string();
        a.files.insert(
            path,
            activity::FileActivity {
                daemon: format!("idle{i:02}"),
                size: 3300,
                committed: 3300,
                last_commit_at: Some(chrono::Utc::now()),
                ..Default::default()
            },
        );
    }
    for i in (0..DAEMONS).filter(|_| !idle) {
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
    let mut w = Watcher::new("bench".into(), config.daemons, shared);
    let first = w.tick(Instant::now());
    let alive = first
        .metrics
        .iter()
        .filter(|m| m.daemon != "pipewatch" && m.pid.is_some())
        .count();

    let c0 = cpu_time();
    let t0 = Instant::now();
    let mut rows = 0usize;
    let mut each = Vec::with_capacity(ticks as usize);
    for _ in 0..ticks {
        std::thread::sleep(gap);
        let before = thread_cpu();
        let tick = w.tick(Instant::now());
        each.push(thread_cpu() - before);
        rows += tick.metrics.len();
        // Dropped where the agent drops them: on another thread (the sink's).
        std::thread::spawn(move || drop(tick)).join().ok();
    }
    let wall = t0.elapsed();
    let work = cpu_time() - c0;

    let b0 = cpu_time();
    for _ in 0..ticks {
        std::thread::sleep(gap);
        std::hint::black_box(Instant::now());
        std::thread::spawn(|| ()).join().ok();
    }
    let base = cpu_time() - b0;
    each.sort();
    println!(
        "thread CPU of one tick, {} ms apart: median {:.3} ms, p90 {:.3} ms",
        gap.as_millis(),
        each[each.len() / 2].as_secs_f64() * 1000.0,
        each[each.len() * 9 / 10].as_secs_f64() * 1000.0
    );

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
