//! Nothing stops silently: a reader thread that panics is restarted, reported and loses or
//! repeats no line; an agent whose commits are stuck tells systemd why, stops petting the
//! watchdog, and `pipewatch status` shows it.

use crate::support::agent::{append, json_line, wait_until, Agent, Env};
use crate::support::{pipewatch_cmd, text};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn lines(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(json_line).collect()
}

/// Starts `pipewatch run` with extra environment variables; stderr goes to a file.
fn spawn_with(env: &Env, config: &Path, vars: &[(&str, &str)]) -> Agent {
    let log = env.path("agent.stderr");
    let mut cmd = pipewatch_cmd(&["--config", config.to_str().unwrap(), "run"]);
    cmd.stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .env("PIPEWATCH_LOG", "pipewatch=debug");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    Agent {
        child: cmd.spawn().unwrap(),
        log,
    }
}

fn status(env: &Env) -> String {
    let out = pipewatch_cmd(&["--database-url", &env.db, "status"])
        .output()
        .unwrap();
    let (o, e) = text(&out);
    assert!(out.status.success(), "status failed: {e}");
    o
}

/// Every sequence number in `0..n` once in daemon `app`'s rows, nothing else.
fn assert_exactly(env: &Env, n: usize) {
    let q = |sql: &str| env.count(sql);
    let total = q("SELECT count(*) FROM pipeline_logs WHERE daemon = 'app'");
    let distinct = q("SELECT count(DISTINCT message) FROM pipeline_logs WHERE daemon = 'app'");
    let expected = q(&format!(
        "SELECT count(*) FROM generate_series(0, {}) s WHERE EXISTS \
         (SELECT 1 FROM pipeline_logs WHERE daemon = 'app' AND message = 'line ' || s)",
        n - 1
    ));
    assert_eq!(
        (total, distinct, expected),
        (n as i64, n as i64, n as i64),
        "rows (total, distinct, of the expected)"
    );
}

#[test]
fn a_reader_that_panics_is_restarted_reported_and_ships_every_line_once() {
    let env = Env::new();
    let first = env.path("a.jsonl");
    append(&first, &lines(0..1000));
    let cfg = env.config("[daemons.app]\nlogs = [\"$DIR/*.jsonl\"]\n");
    // The reader panics at its second INFO line: when it opens the second file, while lines
    // of the first are read, in flight or being committed.
    let agent = spawn_with(&env, &cfg, &[("PIPEWATCH_TEST_PANIC_READER", "app@2")]);
    let count = || env.count("SELECT count(*) FROM pipeline_logs WHERE daemon = 'app'");
    assert!(
        wait_until(Duration::from_secs(20), || count() > 0),
        "{}",
        agent.stderr()
    );
    let writer = {
        let (first, second) = (first.clone(), env.path("b.jsonl"));
        std::thread::spawn(move || {
            for i in 0..20 {
                let from = 1000 + i * 100;
                append(&first, &lines(from..from + 100));
                if i == 5 {
                    append(&second, &lines(3000..3500));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    writer.join().unwrap();
    let n = 3500;
    let errors = || {
        env.count(
            "SELECT count(*) FROM pipeline_events WHERE event_type = 'agent_error' \
             AND severity = 'ERROR' AND daemon = 'app' AND host = 'test-host' \
             AND details->>'daemon' = 'app' \
             AND details->>'error' LIKE 'panicked: test panic (PIPEWATCH_TEST_PANIC_READER)%'",
        )
    };
    let done = wait_until(Duration::from_secs(30), || {
        count() >= n as i64 && errors() == 1
    });
    assert!(
        done,
        "lines {} errors {}:\n{}",
        count(),
        errors(),
        agent.stderr()
    );
    let shown = status(&env);
    assert!(
        shown.contains("reader failures since start: 1, last")
            && shown.contains("the reader of daemon app failed: panicked: test panic"),
        "{shown}"
    );
    // Longer than the reader's poll, the batcher's wait and the restart backoff: a late
    // duplicate would show.
    std::thread::sleep(Duration::from_millis(1500));
    let (code, _, stderr) = agent.terminate();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("reader failed; starting it again")
            && stderr.contains("reader started again"),
        "{stderr}"
    );
    assert!(!stderr.contains("RUST_BACKTRACE"), "{stderr}");
    assert_exactly(&env, n);
    assert_eq!(errors(), 1);
}

/// Reads datagrams until `until` holds for what was received, or `timeout` passes.
fn receive(
    sock: &UnixDatagram,
    got: &mut Vec<String>,
    timeout: Duration,
    until: impl Fn(&[String]) -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if until(got) {
            return true;
        }
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    until(got)
}

/// A config for the stuck-agent tests: `stuck_after = "2s"`, `max_wait = "100ms"`, daemon
/// `app` reading `*.jsonl` of the test's directory, with `daemon_extra` in its table.
fn stuck_config(env: &Env, daemon_extra: &str) -> std::path::PathBuf {
    let cfg = env.path("pipewatch.toml");
    std::fs::write(
        &cfg,
        format!(
            "[database]\nurl = \"{}\"\n\n[agent]\nhost = \"test-host\"\nstuck_after = \"2s\"\n\n\
             [batch]\nmax_wait = \"100ms\"\n\n[daemons.app]\nlogs = [\"{}/*.jsonl\"]\n{daemon_extra}",
            env.db,
            env.dir.path().display()
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn a_stuck_agent_tells_systemd_why_stops_the_watchdog_and_status_shows_it() {
    let env = Env::new();
    let log = env.path("app.jsonl");
    append(&log, &lines(0..10));
    let cfg = stuck_config(&env, "metrics_interval = \"1s\"\n");
    let sock_path = env.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let agent = spawn_with(
        &env,
        &cfg,
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let count = || env.count("SELECT count(*) FROM pipeline_logs WHERE daemon = 'app'");
    let mut got = Vec::new();
    let healthy = receive(&sock, &mut got, Duration::from_secs(20), |g| {
        g.iter().filter(|m| *m == "WATCHDOG=1").count() >= 2
    });
    assert!(
        healthy && wait_until(Duration::from_secs(20), || count() == 10),
        "{got:?}"
    );
    // A real schema fault: a column the agent writes is renamed away.
    env.sql("ALTER TABLE pipeline_logs RENAME COLUMN logger TO logger_gone");
    append(&log, &lines(10..20));
    got.clear();
    let stuck = receive(&sock, &mut got, Duration::from_secs(30), |g| {
        g.iter()
            .any(|m| m.starts_with("STATUS=STUCK: no commit for"))
    });
    assert!(stuck, "{got:?}\n{}", agent.stderr());
    let said = got
        .iter()
        .find(|m| m.starts_with("STATUS=STUCK"))
        .unwrap()
        .clone();
    assert!(said.contains("(stuck_after 2s): a batch of"), "{said}");
    assert!(said.contains("42703"), "the database's reason: {said}");
    // From now on systemd hears no WATCHDOG=1 (it would restart the agent): watch for longer
    // than several watchdog intervals (200 ms here).
    got.clear();
    receive(&sock, &mut got, Duration::from_millis(1500), |_| false);
    assert!(got.iter().all(|m| m != "WATCHDOG=1"), "{got:?}");
    assert!(got.iter().any(|m| m.starts_with("STATUS=STUCK")), "{got:?}");
    // `status` cannot read the agent's own word (it cannot write), but it sees the silence.
    let judged = wait_until(Duration::from_secs(20), || {
        status(&env).contains("STUCK? no commit for")
    });
    let shown = status(&env);
    assert!(judged, "{shown}");
    assert!(shown.contains("(stuck_after 2s)"), "{shown}");
    // Fixed: shipping resumes, the watchdog is petted again, every line lands once.
    env.sql("ALTER TABLE pipeline_logs RENAME COLUMN logger_gone TO logger");
    got.clear();
    let resumed = receive(&sock, &mut got, Duration::from_secs(30), |g| {
        g.iter().filter(|m| *m == "WATCHDOG=1").count() >= 2
    });
    assert!(resumed, "{got:?}\n{}", agent.stderr());
    assert!(wait_until(Duration::from_secs(20), || count() == 20));
    assert!(wait_until(Duration::from_secs(20), || status(&env)
        .contains("  running")));
    let (code, _, stderr) = agent.terminate();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("shipping is stuck; no longer petting the systemd watchdog")
            && stderr.contains("shipping resumed"),
        "{stderr}"
    );
    assert_exactly(&env, 20);
    assert!(status(&env).contains("  stopped"));
}

#[test]
fn a_reader_that_panics_during_a_backfill_is_restarted_and_the_backfill_completes() {
    let env = Env::new();
    append(&env.path("a.jsonl"), &lines(0..600));
    append(&env.path("b.jsonl"), &lines(600..1000));
    let cfg = env.config("[daemons.app]\nlogs = [\"$DIR/*.jsonl\"]\n");
    let out = pipewatch_cmd(&["--config", cfg.to_str().unwrap(), "run", "--once"])
        .env("PIPEWATCH_TEST_PANIC_READER", "app@2")
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("reader failed; starting it again"),
        "{stderr}"
    );
    assert_exactly(&env, 1000);
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_events WHERE event_type = 'agent_error'"),
        1
    );
}

#[test]
fn without_systemd_a_stuck_agent_still_says_so_and_when_it_resumes() {
    // No NOTIFY_SOCKET: the watchdog sleeps until a batch could first be stuck, so it must
    // still wake for the batch that arrives while it sleeps.
    let env = Env::new();
    let log = env.path("app.jsonl");
    append(&log, &lines(0..10));
    let cfg = stuck_config(&env, "");
    let agent = spawn_with(&env, &cfg, &[]);
    let count = || env.count("SELECT count(*) FROM pipeline_logs WHERE daemon = 'app'");
    assert!(wait_until(Duration::from_secs(20), || count() == 10));
    // Idle for longer than `stuck_after` first: the watchdog is asleep when the batch comes.
    std::thread::sleep(Duration::from_millis(2500));
    env.sql("ALTER TABLE pipeline_logs RENAME COLUMN logger TO logger_gone");
    append(&log, &lines(10..20));
    let stuck_line = "shipping is stuck; no longer petting the systemd watchdog";
    let stuck = wait_until(Duration::from_secs(15), || {
        agent.stderr().contains(stuck_line)
    });
    assert!(stuck, "{}", agent.stderr());
    assert!(agent.stderr().contains("(stuck_after 2s): a batch of"));
    env.sql("ALTER TABLE pipeline_logs RENAME COLUMN logger_gone TO logger");
    assert!(wait_until(Duration::from_secs(30), || count() == 20));
    let resumed = wait_until(Duration::from_secs(20), || {
        agent.stderr().contains("shipping resumed")
    });
    assert!(resumed, "{}", agent.stderr());
    let (code, _, stderr) = agent.terminate();
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stderr.matches(stuck_line).count(), 1, "{stderr}");
    assert_exactly(&env, 20);
}
