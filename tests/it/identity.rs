//! File identity through the real binary: files that begin alike, files truncated and
//! rewritten, text records under copytruncate, a copy shorter than the committed position,
//! two daemons matching one file, more files than descriptors, and files the agent may not
//! read. Every case judges exact counts: the expected sequence numbers, nothing else, once.

use crate::support::agent::{append, append_bytes, json_line, wait_until, Agent, Env};
use crate::support::text;
use std::path::Path;
use std::time::Duration;

/// A first line many daemons write, without a timestamp.
const BANNER: &str = r#"{"event": "logging configured", "level": "info"}"#;

/// Longer than every release or idle window of the reader (2 s rotated grace, copy wait
/// aside), so a late duplicate shows up before judging.
const SETTLE: Duration = Duration::from_millis(2500);

fn lines(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(json_line).collect()
}

/// The daemon's `line N` rows are exactly `expected`, once each; `banners` banner rows; and
/// no row says it could not be parsed (a torn line would).
fn judge(env: &Env, daemon: &str, expected: &[usize], banners: i64) {
    let list = expected
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let q = |cond: &str| {
        env.count(&format!(
            "SELECT count(*) FROM pipeline_logs WHERE daemon = '{daemon}' AND {cond}"
        ))
    };
    let total_lines = q("message LIKE 'line %'");
    let distinct = env.count(&format!(
        "SELECT count(DISTINCT message) FROM pipeline_logs WHERE daemon = '{daemon}' \
         AND message LIKE 'line %'"
    ));
    let outside = if expected.is_empty() {
        q("message LIKE 'line %'")
    } else {
        q(&format!(
            "message LIKE 'line %' AND substr(message, 6)::int NOT IN ({list})"
        ))
    };
    let torn = q("context ? '_pipewatch'");
    let banner_rows = q("message = 'logging configured'");
    assert_eq!(
        (total_lines, distinct, outside, torn, banner_rows),
        (expected.len() as i64, expected.len() as i64, 0, 0, banners),
        "daemon {daemon}: (rows, distinct, outside the expected set, parse errors, banners)"
    );
}

fn wait_rows(env: &Env, daemon: &str, n: i64) -> bool {
    wait_until(Duration::from_secs(30), || {
        env.count(&format!(
            "SELECT count(*) FROM pipeline_logs WHERE daemon = '{daemon}'"
        )) >= n
    })
}

/// Waits for `n` rows of `daemon`; on timeout fails with the agent's log.
fn await_rows(env: &Env, agent: &Agent, daemon: &str, n: i64) {
    if !wait_rows(env, daemon, n) {
        let got = env.count(&format!(
            "SELECT count(*) FROM pipeline_logs WHERE daemon = '{daemon}'"
        ));
        panic!("{got} of {n} rows arrived; agent log:\n{}", agent.stderr());
    }
}

fn stop(agent: Agent) {
    let (code, _, stderr) = agent.terminate();
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn files_that_begin_alike_ship_every_line_once_running_stopped_killed_and_once() {
    let env = Env::new();
    std::fs::create_dir_all(env.path("logs")).unwrap();
    let files: Vec<_> = (1..=4)
        .map(|d| env.path(&format!("logs/app-2026-11-2{d}.jsonl")))
        .collect();
    for f in &files {
        append(f, &[BANNER.to_string()]);
    }
    let cfg = env.config("[daemons.app]\nlogs = [\"$DIR/logs/*.jsonl\"]\n");
    let mut seq = 0;
    // Appended in turn, a few lines at a time, while the agent runs.
    let mut write_round = |files: &[std::path::PathBuf], rounds: usize| {
        for _ in 0..rounds {
            for f in files {
                append(f, &lines(seq..seq + 3));
                seq += 3;
            }
        }
        seq
    };
    let agent = env.spawn(&cfg);
    let n = write_round(&files, 5);
    await_rows(&env, &agent, "app", n as i64 + 4);
    stop(agent);
    // While stopped.
    let n = write_round(&files, 3);
    let agent = env.spawn(&cfg);
    await_rows(&env, &agent, "app", n as i64 + 4);
    // Killed with SIGKILL in the middle of a burst.
    let n = write_round(&files, 4);
    std::thread::sleep(Duration::from_millis(150));
    agent.kill9();
    let n = {
        let _ = n;
        write_round(&files, 2)
    };
    let agent = env.spawn(&cfg);
    await_rows(&env, &agent, "app", n as i64 + 4);
    std::thread::sleep(SETTLE);
    stop(agent);
    // And a backfill run.
    let n = write_round(&files, 2);
    env.run_once_ok(&cfg);
    judge(&env, "app", &(0..n).collect::<Vec<_>>(), 4);
    // Each file has its own position.
    assert_eq!(
        env.count("SELECT count(*) FROM pipewatch_checkpoints WHERE daemon = 'app'"),
        4
    );
}

#[test]
fn files_shorter_than_any_fingerprint_are_shipped() {
    let env = Env::new();
    std::fs::create_dir_all(env.path("logs")).unwrap();
    append(&env.path("logs/a.jsonl"), &["{}".to_string()]);
    append(&env.path("logs/b.jsonl"), &["x".to_string()]);
    append(&env.path("logs/c.jsonl"), &[json_line(0)]);
    // Only a partial line: nothing yet, held until its newline.
    append_bytes(&env.path("logs/d.jsonl"), b"{\"event\": \"line 1\"");
    let cfg = env.config("[daemons.app]\nlogs = [\"$DIR/logs/*.jsonl\"]\n");
    env.run_once_ok(&cfg);
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_logs WHERE daemon = 'app'"),
        3
    );
    append_bytes(&env.path("logs/d.jsonl"), b"}\n");
    env.run_once_ok(&cfg);
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_logs WHERE daemon = 'app'"),
        4
    );
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_logs WHERE message = 'line 1'"),
        1
    );
}

/// Truncates `path` and writes `content` with one write, as a daemon restarting with O_TRUNC.
fn rewrite(path: &Path, content: &[String]) {
    let mut bytes = Vec::new();
    for l in content {
        bytes.extend_from_slice(l.as_bytes());
        bytes.push(b'\n');
    }
    std::fs::write(path, bytes).unwrap();
}

fn banner_and(range: std::ops::Range<usize>) -> Vec<String> {
    let mut v = vec![BANNER.to_string()];
    v.extend(lines(range));
    v
}

#[test]
fn a_file_truncated_and_rewritten_larger_is_shipped_whole_and_once() {
    let env = Env::new();
    let log = env.path("app.jsonl");
    rewrite(&log, &banner_and(0..20));
    let cfg = env.config("[daemons.app]\nlogs = [\"$DIR/app.jsonl\"]\n");
    let agent = env.spawn(&cfg);
    await_rows(&env, &agent, "app", 21);
    // Between two reads: same banner, more bytes than the file held.
    rewrite(&log, &banner_and(20..80));
    await_rows(&env, &agent, "app", 82);
    std::thread::sleep(SETTLE);
    stop(agent);
    judge(&env, "app", &(0..80).collect::<Vec<_>>(), 2);
    // The same while the agent is stopped.
    rewrite(&log, &banner_and(80..200));
    let agent = env.spawn(&cfg);
    await_rows(&env, &agent, "app", 203);
    std::thread::sleep(SETTLE);
    stop(agent);
    judge(&env, "app", &(0..200).collect::<Vec<_>>(), 3);
    // And for `run --once`.
    rewrite(&log, &banner_and(200..400));
    env.run_once_ok(&cfg);
    judge(&env, "app", &(0..400).collect::<Vec<_>>(), 4);
}

/// A text record with a traceback: three lines, one write.
fn text_record(n: usize) -> Vec<String> {
    vec![
        format!(
            "2026-11-28 10:00:00,{:03} ERROR geo.test: line {n}",
            n % 1000
        ),
        "Traceback (most recent call last):".to_string(),
        format!("  File \"step.py\", line {n}, in run"),
        format!("ValueError: bad tile {n}"),
    ]
}

#[test]
fn text_logs_under_copytruncate_ship_every_record_once_with_its_traceback() {
    let env = Env::new();
    std::fs::create_dir_all(env.path("logs")).unwrap();
    let log = env.path("logs/app.log");
    let cfg = env.config(
        "[daemons.app]\nlogs = [\"$DIR/logs/app.log*\"]\nformat = \"text\"\n\
         text_pattern = '^(?P<ts>\\S+ \\S+) (?P<level>[A-Z]+) (?P<logger>\\S+): (?P<message>.*)$'\n",
    );
    let agent = env.spawn(&cfg);
    let n = 1200;
    let mut gen = 0;
    for start in (0..n).step_by(20) {
        let mut chunk = Vec::new();
        for k in start..start + 20 {
            chunk.extend(text_record(k));
        }
        append(&log, &chunk);
        if start % 200 == 180 {
            gen += 1;
            let copy = env.path(&format!("logs/app.log.{gen}"));
            std::fs::copy(&log, &copy).unwrap();
            std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&log)
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(7));
    }
    assert!(
        wait_rows(&env, "app", n as i64),
        "{}",
        "not all records arrived"
    );
    std::thread::sleep(SETTLE);
    stop(agent);
    judge(&env, "app", &(0..n).collect::<Vec<_>>(), 0);
    // Each record carries its own traceback, whole.
    assert_eq!(
        env.count(
            "SELECT count(*) FROM pipeline_logs WHERE daemon = 'app' AND traceback LIKE \
             'Traceback (most recent call last):%ValueError: bad tile ' || substr(message, 6)"
        ),
        n as i64
    );
}

#[test]
fn a_copy_shorter_than_the_committed_position_is_recognised_as_shipped() {
    let env = Env::new();
    std::fs::create_dir_all(env.path("logs")).unwrap();
    std::fs::create_dir_all(env.path("aside")).unwrap();
    let log = env.path("logs/app.jsonl");
    append(&log, &banner_and(0..100));
    let cfg = env.config("[daemons.app]\nlogs = [\"$DIR/logs/app.jsonl*\"]\n");
    let agent = env.spawn(&cfg);
    await_rows(&env, &agent, "app", 101);
    // The copy is taken; lines written after it are read from the original; then the
    // truncate. The copy only shows up in the watched directory afterwards.
    std::fs::copy(&log, env.path("aside/app.jsonl.1")).unwrap();
    append(&log, &lines(100..150));
    await_rows(&env, &agent, "app", 151);
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&log)
        .unwrap();
    std::thread::sleep(Duration::from_millis(600));
    std::fs::rename(env.path("aside/app.jsonl.1"), env.path("logs/app.jsonl.1")).unwrap();
    append(&log, &lines(150..170));
    await_rows(&env, &agent, "app", 171);
    std::thread::sleep(SETTLE);
    stop(agent);
    judge(&env, "app", &(0..170).collect::<Vec<_>>(), 1);
}

#[test]
fn two_daemons_matching_one_existing_file_are_refused_naming_both() {
    let env = Env::new();
    std::fs::create_dir_all(env.path("logs")).unwrap();
    append(&env.path("logs/shared.jsonl"), &lines(0..3));
    let cfg = env.config(
        "[daemons.first]\nlogs = [\"$DIR/logs/*.jsonl\"]\n\n\
         [daemons.second]\nlogs = [\"$DIR/logs/shared*\"]\n",
    );
    let out = env.run_once(&cfg);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("daemons.second.logs")
            && stderr.contains("daemons.first.logs")
            && stderr.contains("shared.jsonl"),
        "{stderr}"
    );
    assert_eq!(env.count("SELECT count(*) FROM pipeline_logs"), 0);
    // check-config says the same.
    let out = crate::support::pipewatch(&["--config", cfg.to_str().unwrap(), "check-config"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("daemons.first.logs") && stderr.contains("shared.jsonl"),
        "{stderr}"
    );
}

#[test]
fn a_file_that_appears_later_matching_two_daemons_is_shipped_by_the_first_only() {
    let env = Env::new();
    std::fs::create_dir_all(env.path("logs")).unwrap();
    // "zeta" comes first in the file, so it wins although it sorts last.
    let cfg = env.config(
        "[daemons.zeta]\nlogs = [\"$DIR/logs/*.jsonl\"]\n\n\
         [daemons.alpha]\nlogs = [\"$DIR/logs/shared*\"]\n",
    );
    let agent = env.spawn(&cfg);
    std::thread::sleep(Duration::from_millis(500));
    append(&env.path("logs/shared.jsonl"), &lines(0..50));
    await_rows(&env, &agent, "zeta", 50);
    std::thread::sleep(SETTLE);
    let (code, _, stderr) = agent.terminate();
    assert_eq!(code, Some(0));
    judge(&env, "zeta", &(0..50).collect::<Vec<_>>(), 0);
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_logs WHERE daemon = 'alpha'"),
        0
    );
    assert!(stderr.contains("two daemons"), "{stderr}");
}

#[test]
fn more_files_than_descriptors_are_all_shipped_once() {
    use std::os::unix::process::CommandExt;
    let env = Env::new();
    std::fs::create_dir_all(env.path("logs")).unwrap();
    let files = 1500;
    for f in 0..files {
        append(
            &env.path(&format!("logs/f{f:05}.jsonl")),
            &lines(f * 2..f * 2 + 2),
        );
    }
    let cfg = env.config("[daemons.app]\nlogs = [\"$DIR/logs/*.jsonl\"]\n");
    let mut cmd =
        crate::support::pipewatch_cmd(&["--config", cfg.to_str().unwrap(), "run", "--once"]);
    // SAFETY: setrlimit in the child before exec, async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 128,
                rlim_max: 128,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    judge(&env, "app", &(0..files * 2).collect::<Vec<_>>(), 0);
}

/// Runs the binary as `nobody` (root reads every file, so permissions need another user).
fn as_nobody(args: &[&str]) -> std::process::Output {
    crate::support::nonroot::cmd(args)
        .output()
        .expect("runuser runs")
}

#[test]
fn a_file_the_agent_cannot_read_fails_run_once_and_is_reported() {
    use std::os::unix::fs::PermissionsExt;
    if !crate::support::nonroot::available() {
        return;
    }
    let env = Env::new();
    let dir = env.dir.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(env.path("logs")).unwrap();
    append(&env.path("logs/open.jsonl"), &lines(0..10));
    append(&env.path("logs/secret.jsonl"), &lines(10..20));
    std::fs::set_permissions(
        env.path("logs/secret.jsonl"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let cfg = env.config("[daemons.app]\nlogs = [\"$DIR/logs/*.jsonl\"]\n");
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = as_nobody(&["--config", cfg.to_str().unwrap(), "run", "--once"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("secret.jsonl") && stderr.contains("Permission denied"),
        "{stderr}"
    );
    // What could be read was shipped, and the failure is an event.
    judge(&env, "app", &(0..10).collect::<Vec<_>>(), 0);
    assert_eq!(
        env.count(
            "SELECT count(*) FROM pipeline_events WHERE event_type = 'agent_error' \
             AND message LIKE '%secret.jsonl%' AND severity = 'ERROR'"
        ),
        1
    );
    // Once readable, the next run ships it and succeeds.
    std::fs::set_permissions(
        env.path("logs/secret.jsonl"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = as_nobody(&["--config", cfg.to_str().unwrap(), "run", "--once"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
    judge(&env, "app", &(0..20).collect::<Vec<_>>(), 0);
}

#[test]
fn a_running_agent_reports_an_unreadable_file_in_status_and_ships_it_once_readable() {
    use std::os::unix::fs::PermissionsExt;
    if !crate::support::nonroot::available() {
        return;
    }
    let env = Env::new();
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(env.path("logs")).unwrap();
    append(&env.path("logs/open.jsonl"), &lines(0..10));
    let secret = env.path("logs/secret.jsonl");
    append(&secret, &lines(10..20));
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = env.config("[daemons.app]\nlogs = [\"$DIR/logs/*.jsonl\"]\n");
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let stderr_path = env.path("agent-nobody.stderr");
    let mut child = crate::support::nonroot::cmd(&["--config", cfg.to_str().unwrap(), "run"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let status = || {
        let out = crate::support::pipewatch(&["--database-url", &env.db, "status"]);
        text(&out).0
    };
    let reported = wait_until(Duration::from_secs(20), || {
        status().contains("cannot read (retried):") && status().contains("secret.jsonl")
    });
    let event = env.count(
        "SELECT count(*) FROM pipeline_events WHERE event_type = 'agent_error' \
         AND message LIKE '%secret.jsonl%'",
    );
    // Made readable (a chmod, as an ACL would): picked up without waiting for the retry.
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let shipped = wait_until(Duration::from_secs(10), || {
        env.count("SELECT count(*) FROM pipeline_logs WHERE daemon = 'app'") >= 20
    });
    let healed = wait_until(Duration::from_secs(10), || {
        !status().contains("cannot read")
    });
    // runuser passes SIGTERM on to the agent.
    // SAFETY: kill on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();
    let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert!(
        reported,
        "status never named the unreadable file:\n{}\n{log}",
        status()
    );
    assert_eq!(event, 1, "{log}");
    assert!(shipped, "{log}");
    assert!(healed, "{}", status());
    judge(&env, "app", &(0..20).collect::<Vec<_>>(), 0);
}

#[test]
fn a_copytruncate_of_a_quiet_file_while_the_agent_is_stopped_is_not_shipped_again() {
    let env = Env::new();
    std::fs::create_dir_all(env.path("logs")).unwrap();
    let log = env.path("logs/app.jsonl");
    append(&log, &banner_and(0..100));
    let cfg = env.config("[daemons.app]\nlogs = [\"$DIR/logs/app.jsonl*\"]\n");
    env.run_once_ok(&cfg);
    // logrotate's copytruncate at night, the daemon quiet: the original is left empty.
    std::fs::copy(&log, env.path("logs/app.jsonl.1")).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&log)
        .unwrap();
    env.run_once_ok(&cfg);
    judge(&env, "app", &(0..100).collect::<Vec<_>>(), 1);
    // The daemon writes again: only the new lines are shipped.
    append(&log, &lines(100..130));
    env.run_once_ok(&cfg);
    judge(&env, "app", &(0..130).collect::<Vec<_>>(), 1);
}

#[test]
fn start_at_end_skips_only_what_was_there_when_the_daemon_was_first_watched() {
    let env = Env::new();
    std::fs::create_dir_all(env.path("logs")).unwrap();
    append(&env.path("logs/old.jsonl"), &lines(0..50));
    let cfg = env.config("[daemons.app]\nlogs = [\"$DIR/logs/*.jsonl\"]\nstart_at = \"end\"\n");
    env.run_once_ok(&cfg);
    judge(&env, "app", &[], 0);
    // A file that appears while the agent is stopped is read whole at the next start.
    append(&env.path("logs/new.jsonl"), &lines(50..80));
    append(&env.path("logs/old.jsonl"), &lines(80..90));
    env.run_once_ok(&cfg);
    judge(&env, "app", &(50..90).collect::<Vec<_>>(), 0);
}
