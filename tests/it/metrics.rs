//! Watching daemons with real child processes: CPU and memory of a burner, exit and restart
//! events through a pid file, a stall and its recovery, a `process_match` with children,
//! context joining, the Prometheus endpoint on a real socket, and the rows as stored.

// Tests may unwrap: a failure here is a test failure with its location.
#![allow(clippy::unwrap_used)]

use pipewatch::agent::activity::{self, DaemonActivity};
use pipewatch::agent::metrics::{prometheus, Tick, Watcher};
use pipewatch::config::resolve::{self, DaemonConfig};
use pipewatch::model::{EventRow, Level, MetricRow};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed and reaped when dropped.
struct Kid(Child);

impl Kid {
    fn perl(script: &str, args: &[&str]) -> Kid {
        Kid(Command::new("perl")
            .arg("-e")
            .arg(script)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .expect("perl runs"))
    }

    fn id(&self) -> u32 {
        self.0.id()
    }

    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        self.stop();
    }
}

const SLEEPER: &str = "sleep 120";
const BURNER: &str = r#"my $n = shift; my $x = "a" x $n; 1 while 1"#;

/// Parses one daemon's TOML body into a validated config.
fn daemon(name: &str, body: &str) -> DaemonConfig {
    let text = format!("[agent]\nhost = \"test-host\"\n[daemons.{name}]\n{body}\n");
    let cfg = resolve::parse(Path::new("/test/pipewatch.toml"), &text).expect("valid config");
    cfg.daemons.into_iter().next().expect("one daemon")
}

fn write_pid(path: &Path, pid: u32) {
    std::fs::write(path, format!("{pid}\n")).expect("write pid file");
}

/// Waits until the next sample is due, then takes it.
fn tick_when_due(w: &mut Watcher) -> Tick {
    std::thread::sleep(w.next_due(Instant::now()));
    w.tick(Instant::now())
}

fn rows_of<'a>(t: &'a Tick, daemon: &str) -> Vec<&'a MetricRow> {
    t.metrics.iter().filter(|m| m.daemon == daemon).collect()
}

fn events_of<'a>(t: &'a Tick, event_type: &str) -> Vec<&'a EventRow> {
    t.events
        .iter()
        .filter(|e| e.event_type == event_type)
        .collect()
}

/// Polls `/proc/PID/status` until the process's RSS reaches `bytes` (bounded wait).
fn wait_rss(pid: u32, bytes: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let kib: u64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if kib * 1024 >= bytes {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pid {pid} never reached {bytes} bytes RSS"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn burner_cpu_and_memory_are_measured() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("burner.pid");
    const MEM: u64 = 64 * 1024 * 1024;
    let kid = Kid::perl(BURNER, &[&MEM.to_string()]);
    write_pid(&pid_file, kid.id());
    wait_rss(kid.id(), MEM);
    let cfg = daemon(
        "burner",
        &format!(
            "pid_file = {:?}\nmetrics_interval = \"2s\"",
            pid_file.display().to_string()
        ),
    );
    let mut w = Watcher::new("test-host".into(), vec![cfg], activity::shared());
    // The measuring window: the baseline is in `new`, the sample two seconds later.
    std::thread::sleep(Duration::from_secs(2));
    let t = w.tick(Instant::now());
    let rows = rows_of(&t, "burner");
    assert_eq!(rows.len(), 1, "{t:?}");
    let r = rows[0];
    assert_eq!(r.pid, Some(kid.id() as i32));
    assert_eq!(r.host, "test-host");
    let cpu = r.cpu_percent.expect("CPU measured over two seconds");
    assert!((50.0..=150.0).contains(&cpu), "cpu {cpu}");
    let rss = r.memory_rss_bytes.expect("RSS") as f64;
    assert!(
        (rss - MEM as f64).abs() <= MEM as f64 * 0.25,
        "rss {rss} vs {MEM}"
    );
    assert!(r.memory_percent.is_some_and(|p| p > 0.0 && p < 100.0));
    assert_eq!(r.custom["threads"], 1);
    assert!(r.custom["open_fds"].as_u64().is_some_and(|n| n >= 3));
    assert_eq!(r.custom["processes"], 1);
    assert_eq!(events_of(&t, "daemon_started").len(), 1);
    assert_eq!(events_of(&t, "daemon_started")[0].details["pid"], kid.id());
    // The agent's own row comes with every tick at the shortest interval.
    let me = rows_of(&t, "pipewatch");
    assert_eq!(me.len(), 1);
    assert_eq!(me[0].pid, Some(std::process::id() as i32));
}

#[test]
fn an_exit_is_reported_within_two_intervals_with_the_last_record() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("d.pid");
    let mut kid = Kid::perl(SLEEPER, &[]);
    write_pid(&pid_file, kid.id());
    let act = activity::shared();
    let last_ts = chrono::Utc::now() - chrono::Duration::seconds(5);
    act.lock().unwrap().daemons.insert(
        "exiter".into(),
        DaemonActivity {
            records_read: 3,
            last_record_ts: Some(last_ts),
            last_level: Some(Level::Error),
            last_message: Some("disk full".into()),
            ..DaemonActivity::default()
        },
    );
    let cfg = daemon(
        "exiter",
        &format!(
            "pid_file = {:?}\nmetrics_interval = \"300ms\"",
            pid_file.display().to_string()
        ),
    );
    let mut w = Watcher::new("h".into(), vec![cfg], act);
    let first = w.tick(Instant::now());
    assert_eq!(events_of(&first, "daemon_started").len(), 1);
    let pid = kid.id();
    kid.stop();
    // Within two intervals: the exit shows in one of the next two samples.
    let mut exited = Vec::new();
    for _ in 0..2 {
        let t = tick_when_due(&mut w);
        exited.extend(events_of(&t, "daemon_exited").into_iter().cloned());
        if !exited.is_empty() {
            let row = rows_of(&t, "exiter")[0];
            assert_eq!(row.pid, None);
            assert_eq!(row.custom["alive"], false);
            break;
        }
    }
    assert_eq!(exited.len(), 1);
    let e = &exited[0];
    assert_eq!(e.severity, Level::Warning);
    assert_eq!(e.daemon, "exiter");
    assert_eq!(e.details["pid"], pid);
    assert_eq!(e.details["last_level"], "ERROR");
    assert_eq!(e.details["last_record_ts"], last_ts.to_rfc3339());
    // Gone stays gone: no further lifecycle events.
    let t = tick_when_due(&mut w);
    assert!(t.events.is_empty(), "{:?}", t.events);
}

#[test]
fn a_restart_under_a_new_pid_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("d.pid");
    let mut a = Kid::perl(SLEEPER, &[]);
    write_pid(&pid_file, a.id());
    let cfg = daemon(
        "restarter",
        &format!(
            "pid_file = {:?}\nmetrics_interval = \"300ms\"",
            pid_file.display().to_string()
        ),
    );
    let mut w = Watcher::new("h".into(), vec![cfg], activity::shared());
    let t = w.tick(Instant::now());
    assert_eq!(events_of(&t, "daemon_started").len(), 1);
    let old = a.id();
    a.stop();
    let b = Kid::perl(SLEEPER, &[]);
    write_pid(&pid_file, b.id());
    let t = tick_when_due(&mut w);
    let types: Vec<&str> = t.events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["daemon_exited", "daemon_restarted"]);
    assert_eq!(t.events[0].details["pid"], old);
    assert_eq!(t.events[1].details["pid"], b.id());
    assert_eq!(t.events[1].details["previous_pid"], old);
    assert_eq!(rows_of(&t, "restarter")[0].pid, Some(b.id() as i32));
    let t = tick_when_due(&mut w);
    assert!(t.events.is_empty(), "{:?}", t.events);
}

#[test]
fn a_silent_daemon_stalls_once_and_recovers_when_it_logs_again() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("d.pid");
    let kid = Kid::perl(SLEEPER, &[]);
    write_pid(&pid_file, kid.id());
    let act = activity::shared();
    act.lock().unwrap().daemons.insert(
        "sleepy".into(),
        DaemonActivity {
            last_message: Some("waiting for tiles".into()),
            last_stage: Some("clustering".into()),
            last_node_id: Some("tiles".into()),
            ..DaemonActivity::default()
        },
    );
    let cfg = daemon(
        "sleepy",
        &format!(
            "pid_file = {:?}\nmetrics_interval = \"250ms\"\nstall_after = \"1s\"",
            pid_file.display().to_string()
        ),
    );
    let mut w = Watcher::new("h".into(), vec![cfg], act.clone());
    let start = Instant::now();
    let mut stalls = Vec::new();
    while start.elapsed() < Duration::from_millis(2500) {
        let t = tick_when_due(&mut w);
        stalls.extend(events_of(&t, "daemon_stalled").into_iter().cloned());
        assert!(events_of(&t, "daemon_recovered").is_empty());
    }
    assert_eq!(stalls.len(), 1, "one event per episode");
    let s = &stalls[0];
    assert_eq!(s.severity, Level::Warning);
    assert_eq!(s.node_id.as_deref(), Some("tiles"));
    assert_eq!(s.details["last_message"], "waiting for tiles");
    assert_eq!(s.details["last_stage"], "clustering");
    assert_eq!(s.details["pid"], kid.id());
    // The shipper reads a new record of it.
    {
        let mut a = act.lock().unwrap();
        let d = a.daemons.get_mut("sleepy").unwrap();
        d.records_read += 1;
        d.last_read_at = Some(chrono::Utc::now());
    }
    let t = tick_when_due(&mut w);
    let rec = events_of(&t, "daemon_recovered");
    assert_eq!(rec.len(), 1, "{:?}", t.events);
    assert_eq!(rec[0].severity, Level::Info);
    assert_eq!(rec[0].details["recovered_from"], "daemon_stalled");
    assert!(rows_of(&t, "sleepy")[0]
        .records_per_sec
        .is_some_and(|r| r > 0.0));
}

#[test]
fn process_match_counts_the_children() {
    let marker = format!("pw-match-{}", std::process::id());
    // The parent forks two workers that rename themselves (so only the parent matches) and
    // hold 32 MiB each.
    let script = r#"
        my @kids;
        for (1..2) {
            my $pid = fork();
            if ($pid == 0) { $0 = "pw-worker"; my $x = "b" x (32*1024*1024); sleep 120; exit 0 }
            push @kids, $pid;
        }
        sleep 120;
    "#;
    let kid = Kid::perl(script, &[&marker]);
    let cfg = daemon(
        "forker",
        &format!("process_match = '{marker}'\nmetrics_interval = \"300ms\""),
    );
    // Wait until both workers hold their memory.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut w = Watcher::new("h".into(), vec![cfg], activity::shared());
    loop {
        let t = tick_when_due(&mut w);
        let r = rows_of(&t, "forker")[0].clone();
        if r.custom["processes"] == 3 && r.memory_rss_bytes.unwrap_or(0) >= 64 * 1024 * 1024 {
            assert_eq!(r.pid, Some(kid.id() as i32));
            assert_eq!(r.custom["threads"], 3);
            break;
        }
        assert!(Instant::now() < deadline, "children never counted: {r:?}");
    }
    let found =
        pipewatch::agent::metrics::process::match_processes(&regex::Regex::new(&marker).unwrap());
    assert_eq!(found, vec![kid.id()]);
}

#[test]
fn rows_join_the_most_recent_experiment_else_the_default() {
    let default_exp = "6f1c2a4e-0000-4000-8000-000000000001";
    let seen_exp = uuid::Uuid::parse_str("6f1c2a4e-0000-4000-8000-0000000000aa").unwrap();
    let act = activity::shared();
    act.lock().unwrap().daemons.insert(
        "seen".into(),
        DaemonActivity {
            last_experiment_id: Some(seen_exp),
            last_node_id: Some("tile-7".into()),
            ..DaemonActivity::default()
        },
    );
    let seen = daemon(
        "seen",
        &format!("logs = [\"/tmp/x/*.jsonl\"]\nexperiment_id = \"{default_exp}\""),
    );
    let unseen = daemon(
        "unseen",
        &format!("logs = [\"/tmp/y/*.jsonl\"]\nexperiment_id = \"{default_exp}\"\nnode_id = \"n1\"\ndisks = [\"/\", \"/tmp\"]"),
    );
    let mut w = Watcher::new("h".into(), vec![seen, unseen], act);
    // `run --once`: a single tick right after `new` yields one row per daemon and the agent.
    let t = w.tick(Instant::now());
    assert_eq!(t.metrics.len(), 3, "{:?}", t.metrics);
    let s = rows_of(&t, "seen")[0];
    assert_eq!(s.experiment_id, Some(seen_exp));
    assert_eq!(s.node_id.as_deref(), Some("tile-7"));
    let u = rows_of(&t, "unseen")[0];
    assert_eq!(
        u.experiment_id,
        Some(uuid::Uuid::parse_str(default_exp).unwrap())
    );
    assert_eq!(u.node_id.as_deref(), Some("n1"));
    // Neither has a process: host-level rows.
    assert_eq!(u.pid, None);
    assert_eq!(u.custom["scope"], "host");
    assert!(u.memory_rss_bytes.is_some_and(|b| b > 0));
    let disks = u.custom["disks"].as_object().expect("disks in custom");
    assert_eq!(disks.len(), 2);
    let fullest = disks
        .values()
        .filter_map(|v| v.as_f64())
        .fold(0.0, f64::max);
    assert_eq!(u.disk_used_percent, Some(fullest));
    assert!(t.events.is_empty(), "{:?}", t.events);
}

#[test]
fn prometheus_serves_metrics_on_a_real_socket() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let act = activity::shared();
    act.lock().unwrap().agent.records_shipped = 1234;
    let token = tokio_util::sync::CancellationToken::new();
    let (addr, server) = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(prometheus::serve_listener(
            listener,
            act.clone(),
            token.clone(),
        ));
        (addr, server)
    });
    let get = |path: &str| {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let ok = get("/metrics");
    assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    assert!(ok.contains("Content-Type: text/plain; version=0.0.4"));
    assert!(ok.contains("# TYPE pipewatch_records_shipped_total counter\n"));
    assert!(
        ok.contains("\npipewatch_records_shipped_total 1234\n"),
        "{ok}"
    );
    assert!(ok.contains("\npipewatch_process_resident_memory_bytes "));
    let missing = get("/");
    assert!(
        missing.starts_with("HTTP/1.1 404 Not Found\r\n"),
        "{missing}"
    );
    token.cancel();
    rt.block_on(server).unwrap().unwrap();
}

#[test]
fn a_progress_node_that_stops_advancing_while_logs_keep_coming() {
    let exp = uuid::Uuid::parse_str("6f1c2a4e-0000-4000-8000-0000000000bb").unwrap();
    let act = activity::shared();
    let now = chrono::Utc::now();
    act.lock().unwrap().daemons.insert(
        "looper".into(),
        DaemonActivity {
            records_read: 100,
            last_read_at: Some(now),
            last_message: Some("retrying tile 17".into()),
            progress: Some(activity::ProgressActivity {
                experiment_id: Some(exp),
                node_id: "tiles".into(),
                status: Some("running".into()),
                percent: Some(42.0),
                items_done: Some(420),
                advanced_at: now - chrono::Duration::seconds(30),
            }),
            ..DaemonActivity::default()
        },
    );
    let cfg = daemon(
        "looper",
        "logs = [\"/tmp/z/*.jsonl\"]\nmetrics_interval = \"250ms\"\nstall_after = \"10s\"",
    );
    let mut w = Watcher::new("h".into(), vec![cfg], act.clone());
    let t = w.tick(Instant::now());
    let stalled = events_of(&t, "progress_stalled");
    assert_eq!(stalled.len(), 1, "{:?}", t.events);
    assert_eq!(stalled[0].severity, Level::Warning);
    assert_eq!(stalled[0].experiment_id, Some(exp));
    assert_eq!(stalled[0].node_id.as_deref(), Some("tiles"));
    assert_eq!(stalled[0].details["percent"], 42.0);
    assert_eq!(stalled[0].details["items_done"], 420);
    // Host-level daemons never get a daemon stall.
    assert!(events_of(&t, "daemon_stalled").is_empty());
    let t = tick_when_due(&mut w);
    assert!(t.events.is_empty(), "one event per episode: {:?}", t.events);
    {
        let mut a = act.lock().unwrap();
        let d = a.daemons.get_mut("looper").unwrap();
        let p = d.progress.as_mut().unwrap();
        p.items_done = Some(421);
        p.advanced_at = chrono::Utc::now();
        d.last_read_at = Some(chrono::Utc::now());
    }
    let t = tick_when_due(&mut w);
    let rec = events_of(&t, "daemon_recovered");
    assert_eq!(rec.len(), 1, "{:?}", t.events);
    assert_eq!(rec[0].details["recovered_from"], "progress_stalled");
}

#[test]
fn stored_rows_carry_the_agents_files_and_each_daemons_scope() {
    use crate::support::agent::{append, Env};
    let env = Env::new();
    std::fs::create_dir_all(env.path("a")).unwrap();
    std::fs::create_dir_all(env.path("b")).unwrap();
    append(&env.path("a/app.jsonl"), &[r#"{"event": "a"}"#.to_string()]);
    append(&env.path("b/app.jsonl"), &[r#"{"event": "b"}"#.to_string()]);
    let cfg = env.config(
        "[daemons.alpha]\nlogs = [\"$DIR/a/*.jsonl\"]\n\n[daemons.beta]\nlogs = [\"$DIR/b/*.jsonl\"]\n",
    );
    env.run_once_ok(&cfg);
    let dir = env.dir.path().display().to_string();
    let q = "SELECT daemon || '|' || (custom->>'scope') || '|' || \
             coalesce((SELECT string_agg(k || '=' || (custom->'files'->k->>'daemon') || ',' || \
                 jsonb_typeof(custom->'files'->k->'lag_bytes') || ',' || \
                 (custom->'files'->k ? 'last_commit_at')::text, ';' ORDER BY k) \
               FROM jsonb_object_keys(custom->'files') k), '-') || '|' || \
             (custom ?& array['records_shipped', 'batches_committed', 'threads', 'lag_bytes_total'])::text \
             FROM pipeline_metrics ORDER BY daemon";
    let got: Vec<String> = env.sql(q).lines().map(str::to_string).collect();
    assert_eq!(
        got,
        [
            "alpha|host|-|false".to_string(),
            "beta|host|-|false".to_string(),
            format!("pipewatch|agent|{dir}/a/app.jsonl=alpha,number,true;{dir}/b/app.jsonl=beta,number,true|true"),
        ]
    );
}
