//! "Why is it stuck?" with processes that really hang: two threads deadlocked on two locks, a
//! read from a loopback TCP server that never answers, a busy loop, a read from a FIFO
//! nobody writes, a process stopped with SIGSTOP, a parent waiting on a stuck child. Each
//! must get the right verdict kind and name the right descriptor, peer or child — live
//! through `pipewatch why DAEMON --json`, and stored by a running agent in its
//! `daemon_stalled` event within `stall_after` + one interval. With py-spy, the deadlock's
//! stored diagnosis holds both threads' Python stacks. A daemon killed by a signal gets its
//! signal and last lines in `daemon_exited`.
//!
//! Run with `--nocapture` to see each case's verdict and time to verdict.

use crate::support::agent::{wait_until, Env};
use crate::support::{pipewatch_cmd, text};
use serde_json::Value;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A hanging program, killed and reaped when dropped.
struct Hang {
    child: Child,
    name: &'static str,
}

impl Drop for Hang {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const DEADLOCK: &str = r#"
import threading, time
a = threading.Lock()
b = threading.Lock()
def worker_one():
    with a:
        time.sleep(0.3)
        with b:
            pass
def worker_two():
    with b:
        time.sleep(0.3)
        with a:
            pass
t1 = threading.Thread(target=worker_one, name="one")
t2 = threading.Thread(target=worker_two, name="two")
t1.start(); t2.start()
t1.join(); t2.join()
"#;

const NETWORK: &str = r#"
import socket, sys
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
c.recv(100)
"#;

const BUSY: &str = "x = 0\nwhile True:\n    x += 1\n";

const FIFO: &str = r#"
import sys
f = open(sys.argv[1], "rb", buffering=0)
f.read(1)
"#;

/// What one case expects.
struct Case {
    name: &'static str,
    kind: &'static str,
    /// A piece `target` must contain (a peer, a FIFO path, a child pid).
    target: Option<String>,
}

/// The six hanging programs, their pid files and what each should be diagnosed as. The
/// returned values keep the server socket and the FIFO's writer end open.
struct Scene {
    hangs: Vec<Hang>,
    cases: Vec<Case>,
    _server: TcpListener,
    _fifo_writer: std::fs::File,
    started: Instant,
}

fn python() -> &'static str {
    "python3"
}

fn spawn(name: &'static str, mut cmd: Command, dir: &Path) -> Hang {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{name}: cannot start: {e}"));
    std::fs::write(dir.join(format!("{name}.pid")), format!("{}\n", child.id())).unwrap();
    Hang { child, name }
}

fn py(script: &str, dir: &Path, file: &str, args: &[&str]) -> Command {
    let path = dir.join(file);
    std::fs::write(&path, script).unwrap();
    let mut c = Command::new(python());
    c.arg(path).args(args);
    c
}

fn scene(dir: &Path) -> Scene {
    let started = Instant::now();
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let fifo = dir.join("in.fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    // The writer end is held open (read-write does not block on Linux) and never written.
    let fifo_writer = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let mut hangs = vec![
        spawn("deadlock", py(DEADLOCK, dir, "deadlock.py", &[]), dir),
        spawn(
            "network",
            py(NETWORK, dir, "network.py", &[&port.to_string()]),
            dir,
        ),
        spawn("busy", py(BUSY, dir, "busy.py", &[]), dir),
        spawn(
            "fifo",
            py(FIFO, dir, "fifo.py", &[fifo.to_str().unwrap()]),
            dir,
        ),
    ];
    let mut stopped = Command::new("sleep");
    stopped.arg("300");
    let stopped = spawn("stopped", stopped, dir);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(stopped.child.id() as i32, libc::SIGSTOP) };
    hangs.push(stopped);
    let mut parent = Command::new("sh");
    parent.args(["-c", "sleep 300; echo done"]);
    hangs.push(spawn("child", parent, dir));
    let cases = vec![
        Case {
            name: "deadlock",
            kind: "waiting_lock",
            target: None,
        },
        Case {
            name: "network",
            kind: "waiting_network",
            target: Some(format!("127.0.0.1:{port}")),
        },
        Case {
            name: "busy",
            kind: "busy_loop",
            target: None,
        },
        Case {
            name: "fifo",
            kind: "blocked_io",
            target: Some(format!("FIFO {}", fifo.display())),
        },
        Case {
            name: "stopped",
            kind: "stopped",
            target: None,
        },
        Case {
            name: "child",
            kind: "waiting_child",
            target: Some("pid ".into()),
        },
    ];
    Scene {
        hangs,
        cases,
        _server: server,
        _fifo_writer: fifo_writer,
        started,
    }
}

/// Kills one of the scene's programs now (it is reaped when the scene drops).
fn stop(hangs: &[Hang], name: &str) {
    if let Some(h) = hangs.iter().find(|h| h.name == name) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(h.child.id() as i32, libc::SIGKILL) };
    }
}

/// The `[daemons.*]` tables for the scene (pid files only), with `extra` in each.
fn daemons_toml(dir: &Path, cases: &[Case], extra: &str) -> String {
    cases
        .iter()
        .map(|c| {
            format!(
                "[daemons.{n}]\npid_file = \"{}\"\n{extra}\n",
                dir.join(format!("{}.pid", c.name)).display(),
                n = c.name
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The sleeping child of the `sh` parent (its pid, once forked).
fn child_of(pid: u32) -> Option<u32> {
    let t = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    t.split_whitespace().next()?.parse().ok()
}

fn check_target(case: &Case, d: &Value, hangs: &[Hang]) {
    let Some(want) = &case.target else { return };
    let target = d["target"].as_str().unwrap_or("");
    let want = if case.name == "child" {
        let parent = hangs.iter().find(|h| h.name == "child").unwrap().child.id();
        format!(
            "pid {}",
            child_of(parent).expect("the shell forked its child")
        )
    } else {
        want.clone()
    };
    assert!(
        target.contains(&want),
        "{}: target {target:?} should name {want:?}; verdict: {}",
        case.name,
        d["verdict"]
    );
}

#[test]
fn why_names_what_each_hung_process_waits_on() {
    let dir = tempfile::tempdir().unwrap();
    let s = scene(dir.path());
    let config = dir.path().join("pipewatch.toml");
    std::fs::write(&config, daemons_toml(dir.path(), &s.cases, "")).unwrap();
    for case in &s.cases {
        let mut last = Value::Null;
        let ok = wait_until(Duration::from_secs(20), || {
            let out = pipewatch_cmd(&[
                "--config",
                config.to_str().unwrap(),
                "why",
                case.name,
                "--json",
                "--window",
                "300ms",
            ])
            .output()
            .unwrap();
            let (stdout, stderr) = text(&out);
            assert!(out.status.success(), "{}: {stderr}", case.name);
            last = serde_json::from_str::<Value>(&stdout).unwrap_or(Value::Null)[0].clone();
            last["kind"] == case.kind
        });
        assert!(
            ok,
            "{}: expected {}, got {}",
            case.name,
            case.kind,
            serde_json::to_string_pretty(&last).unwrap()
        );
        check_target(case, &last, &s.hangs);
        assert_eq!(last["daemon"], case.name);
        if case.name == "busy" {
            // Spinning no longer than needed: other tests measure CPU on this machine.
            stop(&s.hangs, "busy");
        }
        eprintln!(
            "why live  {:<9} {:<16} after {:>5.2}s  {}",
            case.name,
            case.kind,
            s.started.elapsed().as_secs_f64(),
            last["verdict"].as_str().unwrap_or("")
        );
    }
    // The human rendering says the same, and a daemon that is not running is exit 1.
    let out = pipewatch_cmd(&["--config", config.to_str().unwrap(), "why", "network"])
        .output()
        .unwrap();
    let (stdout, _) = text(&out);
    assert!(stdout.contains("waiting_network"), "{stdout}");
    assert!(stdout.contains("recvfrom"), "{stdout}");
    std::fs::write(dir.path().join("network.pid"), "999999999\n").unwrap();
    let out = pipewatch_cmd(&["--config", config.to_str().unwrap(), "why", "network"])
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("daemon network is not running: its pid file")
            && stderr.contains("names pid 999999999, which is not running"),
        "{stderr}"
    );
    let out = pipewatch_cmd(&["--config", config.to_str().unwrap(), "why", "netwrk"])
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no daemon \"netwrk\""), "{stderr}");
    assert!(stderr.contains("did you mean \"network\""), "{stderr}");
}

fn have_py_spy() -> bool {
    let found = Command::new("py-spy")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "py-spy is missing in CI (.ci/run installs it)"
        );
        eprintln!("note: py-spy not installed; the stack part of the test is skipped");
    }
    found
}

/// The first event of a type of a daemon, as JSON (`ts`, `message`, `details`).
fn event(env: &Env, daemon: &str, event_type: &str) -> Option<Value> {
    let t = env.sql(&format!(
        "SELECT json_build_object('ts', ts, 'message', message, 'details', details, \
         'experiment_id', experiment_id)::text FROM pipeline_events \
         WHERE daemon = '{daemon}' AND event_type = '{event_type}' ORDER BY ts, id LIMIT 1"
    ));
    serde_json::from_str(t.trim()).ok()
}

fn time(v: &Value) -> chrono::DateTime<chrono::FixedOffset> {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap())
        .or_else(|_| {
            chrono::DateTime::parse_from_str(v.as_str().unwrap(), "%Y-%m-%dT%H:%M:%S%.f%:z")
        })
        .unwrap()
}

const DYING: &str = r#"
import json, sys, time
with open(sys.argv[1], "a") as f:
    for m in ["loading tiles", "merging clusters", "MemoryError: cannot allocate 8 GiB for the merge"]:
        f.write(json.dumps({"level": "error" if "Error" in m else "info", "event": m}) + "\n")
        f.flush()
time.sleep(300)
"#;

#[test]
fn the_agent_stores_the_diagnosis_when_a_stall_opens() {
    let env = Env::new();
    let dir = env.dir.path();
    let s = scene(dir);
    let py_spy = have_py_spy();
    // Each daemon's stall_after, busy_stall_after and interval.
    let (stall_after, busy_after, interval) = (1.0, 2.0, 0.25);
    let exp = "6f1c2a4e-0000-4000-8000-00000000e11e";
    let common = format!(
        "experiment_id = \"{exp}\"\nmetrics_interval = \"250ms\"\nstall_after = \"1s\"\nbusy_stall_after = \"2s\""
    );
    let mut toml = daemons_toml(dir, &s.cases, &common);
    if py_spy {
        toml = toml.replacen(
            "[daemons.deadlock]\n",
            "[daemons.deadlock]\nstack_dump = \"py-spy dump --pid {pid}\"\n",
            1,
        );
    }
    // A daemon that logs, then is killed by a signal; the test is its parent and does not
    // reap it until the agent has seen it go.
    let log = dir.join("dying.jsonl");
    std::fs::write(&log, "").unwrap();
    let mut dying = spawn(
        "dying",
        py(DYING, dir, "dying.py", &[log.to_str().unwrap()]),
        dir,
    );
    toml.push_str(&format!(
        "\n[daemons.dying]\nlogs = [\"{}\"]\npid_file = \"{}\"\n{common}\n",
        log.display(),
        dir.join("dying.pid").display()
    ));
    // Let every program reach its hang before the agent starts watching.
    assert!(wait_until(Duration::from_secs(10), || {
        child_of(
            s.hangs
                .iter()
                .find(|h| h.name == "child")
                .unwrap()
                .child
                .id(),
        )
        .is_some()
            && std::fs::read_to_string(&log).is_ok_and(|t| t.lines().count() == 3)
    }));
    std::thread::sleep(Duration::from_millis(500));
    let config = env.config(&toml);
    let agent_started = Instant::now();
    let agent = env.spawn(&config);
    let all = s.cases.len() as i64;
    assert!(
        wait_until(Duration::from_secs(30), || {
            env.count(
            "SELECT count(DISTINCT daemon) FROM pipeline_events WHERE event_type = 'daemon_stalled' \
             AND daemon <> 'dying'"
        ) == all
        }),
        "not every daemon stalled: {}\n{}",
        env.sql("SELECT daemon, event_type, message FROM pipeline_events ORDER BY ts"),
        std::fs::read_to_string(&agent.log).unwrap_or_default()
    );
    let to_verdict = agent_started.elapsed();
    stop(&s.hangs, "busy");
    for case in &s.cases {
        let e = event(&env, case.name, "daemon_stalled").unwrap();
        let d = &e["details"]["diagnosis"];
        assert_eq!(
            d["kind"],
            case.kind,
            "{}: {}",
            case.name,
            serde_json::to_string_pretty(&e).unwrap()
        );
        check_target(case, d, &s.hangs);
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains(d["verdict"].as_str().unwrap()),
            "the message says the verdict: {}",
            e["message"]
        );
        let limit = if case.kind == "busy_loop" {
            busy_after
        } else {
            stall_after
        };
        let quiet = time(&e["details"]["quiet_since"]);
        let took = (time(&e["ts"]) - quiet).num_milliseconds() as f64 / 1000.0;
        assert!(
            took >= limit && took <= limit + interval + 0.25,
            "{}: verdict {took}s after the silence began (limit {limit}s + {interval}s)",
            case.name
        );
        assert!(serde_json::to_string(&e["details"]).unwrap().len() <= 64 * 1024);
        eprintln!(
            "agent     {:<9} {:<16} {took:>5.2}s after the silence began  {}",
            case.name,
            case.kind,
            d["verdict"].as_str().unwrap_or("")
        );
    }
    eprintln!(
        "agent: all six stored {:.2}s after the agent started",
        to_verdict.as_secs_f64()
    );
    // The busy stall says what the silence cost.
    let busy = event(&env, "busy", "daemon_stalled").unwrap();
    assert_eq!(busy["details"]["busy"], true);
    let cpu = busy["details"]["diagnosis"]["silence"]["cpu_seconds"]
        .as_f64()
        .unwrap();
    assert!(cpu > 0.3, "a busy loop burns CPU while silent: {cpu}s");
    if py_spy {
        let stacks =
            &event(&env, "deadlock", "daemon_stalled").unwrap()["details"]["diagnosis"]["stacks"];
        let out = stacks[0]["output"].as_str().unwrap_or("");
        for f in ["worker_one", "worker_two", "deadlock.py"] {
            assert!(out.contains(f), "py-spy output lacks {f}: {stacks}");
        }
        eprintln!("py-spy: both threads' stacks stored ({} bytes)", out.len());
    }

    // `why --experiment` shows the stored diagnoses.
    let out = pipewatch_cmd(&[
        "--database-url",
        &env.db,
        "why",
        "--experiment",
        exp,
        "--json",
    ])
    .output()
    .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let items: Vec<Value> = serde_json::from_str(&stdout).unwrap();
    let network = items.iter().find(|i| i["daemon"] == "network").unwrap();
    assert_eq!(network["details"]["diagnosis"]["kind"], "waiting_network");
    let out = pipewatch_cmd(&["--database-url", &env.db, "why", "--experiment", exp])
        .output()
        .unwrap();
    let (stdout, _) = text(&out);
    assert!(stdout.contains("waiting_lock"), "{stdout}");
    assert!(stdout.contains("a likely deadlock"), "{stdout}");
    // `errors` lists the stalls with their verdict line.
    let out = pipewatch_cmd(&["--database-url", &env.db, "errors", "--experiment", exp])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("stalled daemons"), "{stdout}");
    assert!(
        stdout.contains("test-host/fifo blocked_io: blocked on I/O: pid "),
        "{stdout}"
    );

    // The dying daemon: its lines are shipped, then SIGKILL; unreaped, it is a zombie whose
    // status the agent can read.
    assert!(wait_until(Duration::from_secs(10), || env.count(
        "SELECT count(*) FROM pipeline_logs WHERE daemon = 'dying'"
    ) == 3));
    // SAFETY: signalling our own child, which stays unreaped until the end of the test.
    unsafe { libc::kill(dying.child.id() as i32, libc::SIGKILL) };
    assert!(wait_until(Duration::from_secs(10), || event(
        &env,
        "dying",
        "daemon_exited"
    )
    .is_some()));
    let e = event(&env, "dying", "daemon_exited").unwrap();
    assert_eq!(e["details"]["exit"]["signal"], 9, "{e}");
    assert_eq!(e["details"]["exit"]["signal_name"], "SIGKILL");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("killed by signal 9 (SIGKILL)"),
        "{e}"
    );
    let lines = e["details"]["last_lines"].as_array().unwrap();
    assert_eq!(lines.len(), 3, "{e}");
    assert_eq!(
        lines[2],
        "ERROR MemoryError: cannot allocate 8 GiB for the merge"
    );
    assert_eq!(
        e["details"]["exit"]["telling_lines"][0],
        "ERROR MemoryError: cannot allocate 8 GiB for the merge"
    );
    let _ = dying.child.wait();
    let (code, _, stderr) = agent.terminate();
    assert_eq!(code, Some(0), "{stderr}");
    drop(s);
    let _ = std::io::stderr().flush();
}

#[test]
fn without_ptrace_rights_why_says_what_it_cannot_see() {
    if !crate::support::nonroot::available() {
        return;
    }
    let dir = crate::support::nonroot::open_dir();
    let mut sleeper = Command::new("sleep");
    sleeper.arg("300");
    let _hang = spawn("sleeper", sleeper, dir.path());
    let config = dir.path().join("pipewatch.toml");
    std::fs::write(
        &config,
        format!(
            "[daemons.sleeper]\npid_file = \"{}\"\n",
            dir.path().join("sleeper.pid").display()
        ),
    )
    .unwrap();
    for p in [&config, &dir.path().join("sleeper.pid")] {
        crate::support::nonroot::chmod(p, 0o644);
    }
    let out = crate::support::nonroot::cmd(&[
        "--config",
        config.to_str().unwrap(),
        "why",
        "sleeper",
        "--json",
        "--window",
        "200ms",
    ])
    .output()
    .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let d = &serde_json::from_str::<Value>(&stdout).unwrap()[0];
    assert_eq!(d["kind"], "sleeping", "{d}");
    assert!(
        d["verdict"]
            .as_str()
            .unwrap()
            .contains("not readable: pipewatch needs ptrace rights over it"),
        "{d}"
    );
}

/// A process with more threads and descriptors than a diagnosis holds: the counts shown are
/// the process's, not the bounded lists', and "… N more" counts what is not listed.
#[test]
fn why_counts_all_threads_and_descriptors_of_a_big_process() {
    let dir = tempfile::tempdir().unwrap();
    let script = "import threading, time\n\
                  fs = [open('/dev/null') for _ in range(400)]\n\
                  ev = threading.Event()\n\
                  ts = [threading.Thread(target=ev.wait, daemon=True) for _ in range(299)]\n\
                  [t.start() for t in ts]\n\
                  open(__import__('sys').argv[1], 'w').write('ready')\n\
                  time.sleep(300)\n";
    let ready = dir.path().join("ready");
    let _hang = spawn(
        "big",
        py(script, dir.path(), "big.py", &[ready.to_str().unwrap()]),
        dir.path(),
    );
    assert!(wait_until(Duration::from_secs(20), || ready.exists()));
    let config = dir.path().join("pipewatch.toml");
    std::fs::write(
        &config,
        format!(
            "[daemons.big]\npid_file = \"{}\"\n",
            dir.path().join("big.pid").display()
        ),
    )
    .unwrap();
    let why = |json: bool| {
        let mut args = vec!["--config", config.to_str().unwrap(), "why", "big"];
        args.extend(["--window", "200ms"]);
        if json {
            args.push("--json");
        }
        let out = pipewatch_cmd(&args).output().unwrap();
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
        stdout
    };
    let d = &serde_json::from_str::<Value>(&why(true)).unwrap()[0];
    let p = &d["process"];
    assert_eq!(p["thread_total"], 300, "{p}");
    assert_eq!(p["threads"].as_array().unwrap().len(), 256);
    let fd_total = p["fd_total"].as_u64().unwrap();
    assert!(fd_total >= 403, "{fd_total}");
    let shown = why(false);
    assert!(shown.contains(" 300 thread(s)"), "{shown}");
    assert!(shown.contains("    … 268 more\n"), "threads: {shown}");
    assert!(
        shown.contains(&format!("    … {} more\n", fd_total - 24)),
        "descriptors: {shown}"
    );
}

/// `why --experiment`: an unknown experiment is one clear line and exit 1; stored events
/// written by something other than an agent (no host, no daemon, details not an object)
/// are shown, not a crash.
#[test]
fn why_experiment_unknown_and_odd_stored_events() {
    let env = Env::new();
    let run = |args: &[&str]| {
        let mut a = vec!["--database-url", env.db.as_str(), "why"];
        a.extend_from_slice(args);
        pipewatch_cmd(&a).output().unwrap()
    };
    let out = run(&["--experiment", "no-such-experiment"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("no-such-experiment"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    let exp = "0dd0dd00-0000-4000-8000-000000000001";
    env.sql(&format!(
        "INSERT INTO pipeline_events (experiment_id, event_type, message, details, host, daemon) VALUES \
         ('{exp}', 'daemon_exited', 'gone', '{{}}', NULL, 'd1'), \
         ('{exp}', 'daemon_exited', NULL, '[1]', 'h', NULL), \
         ('{exp}', 'daemon_stalled', 'stuck', '{{\"diagnosis\": \"not an object\"}}', 'h', 'd2'), \
         ('{exp}', 'daemon_stalled', 'stuck', '{{\"diagnosis\": {{\"kind\": \"sleeping\"}}}}', NULL, NULL)"
    ));
    // `pipewatch errors` lists the stall verdicts too.
    let a = vec![
        "--database-url",
        env.db.as_str(),
        "errors",
        "--experiment",
        exp,
    ];
    let out = pipewatch_cmd(&a).output().unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("?/? sleeping"), "{stdout}");
    for json in [false, true] {
        let mut args = vec!["--experiment", exp];
        if json {
            args.push("--json");
        }
        let out = run(&args);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stdout}{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        if json {
            assert_eq!(
                serde_json::from_str::<Value>(&stdout)
                    .unwrap()
                    .as_array()
                    .map(Vec::len),
                Some(4),
                "{stdout}"
            );
        } else {
            assert!(stdout.contains("gone") && stdout.contains("d2"), "{stdout}");
        }
    }
}

/// A `process_match` that matches many processes: `why` looks at them at the same time (one
/// CPU window, not one per process) and at 16 of them at most, saying so.
#[test]
fn why_with_a_broad_process_match_is_bounded_in_time_and_output() {
    let dir = tempfile::tempdir().unwrap();
    let marker = format!("pw-broad-{}", std::process::id());
    let _hangs: Vec<Hang> = (0..20)
        .map(|_| {
            let mut c = Command::new(python());
            c.args(["-c", "import time; time.sleep(300)", &marker]);
            let child = c.stdin(Stdio::null()).spawn().unwrap();
            Hang {
                child,
                name: "broad",
            }
        })
        .collect();
    let config = dir.path().join("pipewatch.toml");
    std::fs::write(
        &config,
        format!("[daemons.broad]\nprocess_match = \"{marker}\"\n"),
    )
    .unwrap();
    // Wait until all twenty run (python started and its command line is visible).
    let started = Instant::now();
    let out = loop {
        let t = Instant::now();
        let out = pipewatch_cmd(&[
            "--config",
            config.to_str().unwrap(),
            "why",
            "broad",
            "--json",
            "--window",
            "1s",
        ])
        .output()
        .unwrap();
        let took = t.elapsed();
        let (_, stderr) = text(&out);
        if stderr.contains("20 processes match") || started.elapsed() > Duration::from_secs(60) {
            break (out, took);
        }
    };
    let ((stdout, stderr), took) = (text(&out.0), out.1);
    assert!(out.0.status.success(), "{stderr}");
    assert!(
        stderr.contains("20 processes match daemon broad; diagnosing the first 16"),
        "{stderr}"
    );
    let items = serde_json::from_str::<Value>(&stdout).unwrap();
    assert_eq!(items.as_array().map(Vec::len), Some(16), "{stdout}");
    assert!(took < Duration::from_secs(6), "took {took:?}");
}

/// A stale pid file whose number a kernel thread now has: not the daemon, said so, rather
/// than a verdict about the kernel thread.
#[test]
fn why_with_a_pid_file_naming_a_kernel_thread() {
    // A kernel thread: PF_KTHREAD (0x200000) in the flags of /proc/PID/stat.
    let kthread = std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let flags: u64 = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(6)?
            .parse()
            .ok()?;
        (flags & 0x0020_0000 != 0).then_some(pid)
    });
    let Some(pid) = kthread else {
        eprintln!("no kernel thread visible here (a PID namespace); skipped");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("stale.pid");
    std::fs::write(&pid_file, format!("{pid}\n")).unwrap();
    let config = dir.path().join("pipewatch.toml");
    std::fs::write(
        &config,
        format!("[daemons.stale]\npid_file = \"{}\"\n", pid_file.display()),
    )
    .unwrap();
    let out = pipewatch_cmd(&["--config", config.to_str().unwrap(), "why", "stale"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!(
            "daemon stale is not running: its pid file {} names pid {pid}, which is a kernel thread",
            pid_file.display()
        )),
        "{stderr}"
    );
}
