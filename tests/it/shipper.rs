//! The shipper against real files and a real PostgreSQL: exact row counts, no duplicates,
//! across rotation of every style, SIGKILL, restarts and a database outage.

use crate::support::agent::{append, append_bytes, json_line, wait_until, Env};
use crate::support::pg;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn lines(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(json_line).collect()
}

/// Asserts the daemon's rows are exactly the messages `line 0` … `line n-1`, once each.
fn assert_exactly(env: &Env, daemon: &str, n: usize) {
    let total = env.count(&format!(
        "SELECT count(*) FROM pipeline_logs WHERE daemon = '{daemon}'"
    ));
    let distinct = env.count(&format!(
        "SELECT count(DISTINCT message) FROM pipeline_logs WHERE daemon = '{daemon}'"
    ));
    let expected = env.count(&format!(
        "SELECT count(*) FROM generate_series(0, {}) s WHERE EXISTS \
         (SELECT 1 FROM pipeline_logs WHERE daemon = '{daemon}' AND message = 'line ' || s)",
        n as i64 - 1
    ));
    assert_eq!(
        (total, distinct, expected),
        (n as i64, n as i64, n as i64),
        "rows (total, distinct, of the expected) for daemon {daemon}"
    );
}

fn daemon_cfg(name: &str, glob: &str) -> String {
    format!("[daemons.{name}]\nlogs = [\"{glob}\"]\n")
}

#[test]
fn backfill_ships_every_line_once_and_a_second_run_ships_nothing() {
    let env = Env::new();
    std::fs::create_dir_all(env.path("a")).unwrap();
    std::fs::create_dir_all(env.path("b")).unwrap();
    append(&env.path("a/one.jsonl"), &lines(0..250));
    append(&env.path("a/two.jsonl"), &lines(250..600));
    append(&env.path("b/x.jsonl"), &lines(0..1234));
    let cfg = env.config(&format!(
        "{}\n{}",
        daemon_cfg("alpha", "$DIR/a/*.jsonl"),
        daemon_cfg("beta", "$DIR/b/*.jsonl")
    ));
    env.run_once_ok(&cfg);
    assert_exactly(&env, "alpha", 600);
    assert_exactly(&env, "beta", 1234);
    env.run_once_ok(&cfg);
    assert_exactly(&env, "alpha", 600);
    assert_exactly(&env, "beta", 1234);
    // Positions are committed per file.
    assert_eq!(
        env.count("SELECT count(*) FROM pipewatch_checkpoints WHERE host = 'test-host'"),
        3
    );
    // New lines only are shipped by the next run.
    append(&env.path("a/two.jsonl"), &lines(600..700));
    env.run_once_ok(&cfg);
    assert_exactly(&env, "alpha", 700);
}

#[test]
fn partial_last_line_is_held_until_its_newline_arrives() {
    let env = Env::new();
    let log = env.path("app.jsonl");
    append(&log, &lines(0..10));
    let partial = json_line(10);
    let (head, tail) = partial.split_at(20);
    append_bytes(&log, head.as_bytes());
    let cfg = env.config(&daemon_cfg("app", "$DIR/*.jsonl"));
    env.run_once_ok(&cfg);
    assert_exactly(&env, "app", 10);
    append_bytes(&log, tail.as_bytes());
    env.run_once_ok(&cfg);
    assert_exactly(&env, "app", 10);
    append_bytes(&log, b"\n");
    env.run_once_ok(&cfg);
    assert_exactly(&env, "app", 11);
}

#[test]
fn start_at_end_skips_existing_content_only_without_a_checkpoint() {
    let env = Env::new();
    let log = env.path("app.jsonl");
    append(&log, &lines(0..50));
    let cfg = env.config(&format!(
        "{}start_at = \"end\"\n",
        daemon_cfg("app", "$DIR/*.jsonl")
    ));
    env.run_once_ok(&cfg);
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_logs WHERE daemon = 'app'"),
        0
    );
    append(&log, &lines(50..60));
    env.run_once_ok(&cfg);
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_logs WHERE daemon = 'app'"),
        10
    );
}

/// How the writer rotates.
#[derive(Clone, Copy, Debug)]
enum Rotation {
    RenameCreate,
    CopyTruncate,
    RenameCompress,
    RenameDelete,
}

/// Writes lines `from..n` to `log` 25 at a time with short pauses, rotating after about every
/// `every` lines.
fn writer(log: PathBuf, from: usize, n: usize, every: usize, style: Rotation) {
    let mut gen = 0;
    for start in (from..n).step_by(25) {
        let end = (start + 25).min(n);
        append(&log, &lines(start..end));
        if end % every < 25 && end < n {
            gen += 1;
            rotate(&log, gen, style);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn rotate(log: &Path, gen: usize, style: Rotation) {
    let rotated = log.with_file_name(format!(
        "{}.{gen}",
        log.file_name().unwrap().to_string_lossy()
    ));
    match style {
        Rotation::RenameCreate => {
            std::fs::rename(log, &rotated).unwrap();
        }
        Rotation::CopyTruncate => {
            std::fs::copy(log, &rotated).unwrap();
            std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(log)
                .unwrap();
        }
        Rotation::RenameCompress => {
            std::fs::rename(log, &rotated).unwrap();
            // Give the agent a moment, as logrotate's delaycompress would not even do.
            std::thread::sleep(Duration::from_millis(30));
            let st = std::process::Command::new("gzip")
                .arg("-f")
                .arg(&rotated)
                .status()
                .unwrap();
            assert!(st.success());
        }
        Rotation::RenameDelete => {
            std::fs::rename(log, &rotated).unwrap();
            std::thread::sleep(Duration::from_millis(30));
            std::fs::remove_file(&rotated).unwrap();
        }
    }
}

fn rotation_case(style: Rotation, glob: &str) {
    let env = Env::new();
    std::fs::create_dir_all(env.path("logs")).unwrap();
    let log = env.path("logs/app.jsonl");
    append(&log, &lines(0..1));
    let cfg = env.config(&daemon_cfg("app", glob));
    let agent = env.spawn(&cfg);
    let n = 3000;
    // The first line is already written.
    let w = {
        let log = log.clone();
        std::thread::spawn(move || writer(log, 1, n, 500, style))
    };
    w.join().unwrap();
    settle_and_judge(&env, agent, n);
}

/// Waits for `n` rows of daemon `app`, gives a duplicate time to show up, stops the agent with
/// SIGTERM (exit 0) and asserts every line landed exactly once.
fn settle_and_judge(env: &Env, agent: crate::support::agent::Agent, n: usize) {
    let done = wait_until(Duration::from_secs(30), || {
        env.count("SELECT count(*) FROM pipeline_logs WHERE daemon = 'app'") >= n as i64
    });
    std::thread::sleep(Duration::from_millis(700));
    let (code, _, stderr) = agent.terminate();
    assert!(done, "not all lines arrived:\n{stderr}");
    assert_eq!(code, Some(0), "{stderr}");
    if env.count("SELECT count(*) FROM pipeline_logs") != n as i64 {
        eprintln!("{stderr}");
    }
    assert_exactly(env, "app", n);
}

#[test]
fn rotation_rename_and_create_while_writing() {
    rotation_case(Rotation::RenameCreate, "$DIR/logs/*.jsonl");
}

#[test]
fn rotation_rename_and_create_with_rotated_files_matched_by_the_glob() {
    rotation_case(Rotation::RenameCreate, "$DIR/logs/app.jsonl*");
}

#[test]
fn rotation_copytruncate_while_writing() {
    rotation_case(Rotation::CopyTruncate, "$DIR/logs/app.jsonl*");
}

#[test]
fn rotation_rename_then_compress_while_writing() {
    rotation_case(Rotation::RenameCompress, "$DIR/logs/app.jsonl*");
}

#[test]
fn rotation_rename_then_delete_while_writing() {
    rotation_case(Rotation::RenameDelete, "$DIR/logs/*.jsonl");
}

#[test]
fn sigkill_at_random_moments_then_restart_loses_and_duplicates_nothing() {
    let env = Env::new();
    std::fs::create_dir_all(env.path("logs")).unwrap();
    let log = env.path("logs/app.jsonl");
    let cfg = env.config(&daemon_cfg("app", "$DIR/logs/app.jsonl*"));
    let n = 6000;
    let w = {
        let log = log.clone();
        std::thread::spawn(move || writer(log, 0, n, 1500, Rotation::RenameCreate))
    };
    // Pseudo-random kill delays, fixed per run for reproducibility.
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..6 {
        let agent = env.spawn(&cfg);
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(150 + seed % 600));
        agent.kill9();
    }
    w.join().unwrap();
    let agent = env.spawn(&cfg);
    settle_and_judge(&env, agent, n);
}

#[test]
fn database_outage_under_a_running_agent_loses_nothing() {
    let cluster = pg::Cluster::start_new();
    let env = Env::with_db(cluster.create_db());
    let log = env.path("app.jsonl");
    append(&log, &lines(0..100));
    let cfg = env.config(&daemon_cfg("app", "$DIR/*.jsonl"));
    let agent = env.spawn(&cfg);
    assert!(wait_until(Duration::from_secs(20), || env
        .count("SELECT count(*) FROM pipeline_logs")
        >= 100));
    cluster.stop();
    append(&log, &lines(100..1100));
    std::thread::sleep(Duration::from_secs(2));
    append(&log, &lines(1100..1500));
    cluster.start();
    let done = wait_until(Duration::from_secs(60), || {
        pg::try_psql(&env.db, "SELECT count(*) FROM pipeline_logs")
            .map(|s| s.trim() == "1500")
            .unwrap_or(false)
    });
    std::thread::sleep(Duration::from_millis(500));
    let (code, _, stderr) = agent.terminate();
    assert!(done, "rows missing after the outage:\n{stderr}");
    assert_eq!(code, Some(0), "{stderr}");
    assert_exactly(&env, "app", 1500);
    assert!(
        stderr.contains("retrying"),
        "the agent said nothing about the outage:\n{stderr}"
    );
}

#[test]
fn sigterm_commits_what_was_read_and_exits_zero_quickly() {
    let env = Env::new();
    let log = env.path("app.jsonl");
    append(&log, &lines(0..2000));
    let cfg = env.config(&daemon_cfg("app", "$DIR/*.jsonl"));
    let agent = env.spawn(&cfg);
    assert!(wait_until(Duration::from_secs(20), || env
        .count("SELECT count(*) FROM pipeline_logs")
        >= 2000));
    let (code, took, stderr) = agent.terminate();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_exactly(&env, "app", 2000);
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_events WHERE event_type IN ('agent_started', 'agent_stopped')"),
        2
    );
}

#[test]
fn once_exits_one_with_a_clear_message_when_the_database_is_unreachable() {
    let env_dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = env_dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[database]\nurl = \"postgres://nobody:secret@127.0.0.1:{port}/db?sslmode=disable\"\n\n[daemons.app]\nlogs = [\"{}/*.jsonl\"]\n",
            env_dir.path().display()
        ),
    )
    .unwrap();
    let out = crate::support::pipewatch_cmd(&["--config", cfg.to_str().unwrap(), "run", "--once"])
        .env("PIPEWATCH_ONCE_GIVE_UP_SECS", "2")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.contains("unreachable"), "{stderr}");
    assert!(last.contains(&format!("127.0.0.1:{port}")), "{stderr}");
    assert!(!stderr.contains("secret"), "password leaked: {stderr}");
}

#[test]
fn a_record_the_database_refuses_is_quarantined_and_the_rest_still_land() {
    let env = Env::new();
    // A constraint the agent cannot know about makes one record unacceptable.
    env.sql(
        "ALTER TABLE pipeline_logs ADD CONSTRAINT no_poison CHECK (message NOT LIKE '%POISON%')",
    );
    let log = env.path("app.jsonl");
    let mut ls = lines(0..300);
    ls[123] = r#"{"event": "POISON pill", "level": "info"}"#.to_string();
    append(&log, &ls);
    let cfg = env.config(&daemon_cfg("app", "$DIR/*.jsonl"));
    env.run_once_ok(&cfg);
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_logs WHERE daemon = 'app'"),
        300
    );
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_logs WHERE context->'_pipewatch' ? 'quarantined'"),
        1
    );
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_events WHERE event_type = 'record_quarantined'"),
        1
    );
    // The other 299 are the original lines.
    assert_eq!(
        env.count("SELECT count(DISTINCT message) FROM pipeline_logs WHERE message LIKE 'line %'"),
        299
    );
}

#[test]
fn sigterm_while_the_database_is_down_exits_zero_and_loses_nothing() {
    let cluster = pg::Cluster::start_new();
    let env = Env::with_db(cluster.create_db());
    let log = env.path("app.jsonl");
    append(&log, &lines(0..100));
    let cfg = env.config(&daemon_cfg("app", "$DIR/*.jsonl"));
    let agent = env.spawn(&cfg);
    assert!(wait_until(Duration::from_secs(20), || env
        .count("SELECT count(*) FROM pipeline_logs")
        == 100));
    cluster.stop();
    append(&log, &lines(100..300));
    std::thread::sleep(Duration::from_millis(500));
    let (code, took, stderr) = agent.terminate();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
    cluster.start();
    env.run_once_ok(&cfg);
    assert_exactly(&env, "app", 300);
}
