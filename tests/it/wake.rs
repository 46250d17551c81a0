//! Wake-ups: an idle reader sleeps on its notifications (its poll backs off far) and still
//! ships a new file or a write to an idle file promptly; without notifications it polls.

use crate::support::agent::{append, json_line, wait_until, Agent, Env};
use crate::support::pipewatch_cmd;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn count(env: &Env) -> i64 {
    env.count("SELECT count(*) FROM pipeline_logs WHERE daemon = 'app'")
}

/// Starts `pipewatch run` with `PIPEWATCH_TEST_NO_INOTIFY` set.
fn spawn_without_inotify(env: &Env, config: &std::path::Path) -> Agent {
    let log = env.path("agent-no-inotify.stderr");
    let err = std::fs::File::create(&log).expect("agent log file");
    let child = pipewatch_cmd(&["--config", config.to_str().expect("utf-8"), "run"])
        .stdout(Stdio::null())
        .stderr(err)
        .env("PIPEWATCH_LOG", "pipewatch=debug")
        .env("PIPEWATCH_TEST_NO_INOTIFY", "1")
        .spawn()
        .expect("spawn pipewatch run");
    Agent { child, log }
}

/// How long a line takes to arrive after it is written.
fn shipped_within(env: &Env, expect: i64) -> Duration {
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(30), || count(env) >= expect),
        "{expect} rows never arrived"
    );
    t.elapsed()
}

#[test]
fn an_idle_reader_ships_a_new_file_and_a_write_to_an_idle_file_at_once_though_its_poll_is_rare() {
    let env = Env::new();
    std::fs::create_dir_all(env.path("logs")).expect("mkdir");
    let a = env.path("logs/a.jsonl");
    append(&a, &(0..5).map(json_line).collect::<Vec<_>>());
    let cfg = env.config("[daemons.app]\nlogs = [\"$DIR/logs/*.jsonl\"]\n");
    let agent = env.spawn(&cfg);
    shipped_within(&env, 5);
    // Idle for 9 s: the poll has backed off (250 ms doubling) to 8 s, so only a notification
    // ships within 2 s (a missed one would usually take seconds more).
    std::thread::sleep(Duration::from_secs(9));
    append(&env.path("logs/b.jsonl"), &[json_line(5)]);
    let new_file = shipped_within(&env, 6);
    std::thread::sleep(Duration::from_secs(9));
    append(&a, &[json_line(6)]);
    let idle_write = shipped_within(&env, 7);
    let (code, _, stderr) = agent.terminate();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        new_file < Duration::from_secs(2) && idle_write < Duration::from_secs(2),
        "a new file took {new_file:?}, a write to an idle file {idle_write:?}"
    );
    assert_eq!(
        env.count("SELECT count(DISTINCT message) FROM pipeline_logs WHERE daemon = 'app'"),
        7
    );
}

#[test]
fn without_notifications_the_poll_still_ships_new_files_and_writes() {
    let env = Env::new();
    std::fs::create_dir_all(env.path("logs")).expect("mkdir");
    let a = env.path("logs/a.jsonl");
    append(&a, &(0..5).map(json_line).collect::<Vec<_>>());
    let cfg = env.config("[daemons.app]\nlogs = [\"$DIR/logs/*.jsonl\"]\n");
    let agent = spawn_without_inotify(&env, &cfg);
    shipped_within(&env, 5);
    std::thread::sleep(Duration::from_secs(3));
    append(&env.path("logs/b.jsonl"), &[json_line(5)]);
    let new_file = shipped_within(&env, 6);
    std::thread::sleep(Duration::from_secs(3));
    append(&a, &[json_line(6)]);
    let idle_write = shipped_within(&env, 7);
    let (code, _, stderr) = agent.terminate();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("polling only"), "{stderr}");
    // Unwatched, the poll stays at 250 ms.
    assert!(
        new_file < Duration::from_secs(2) && idle_write < Duration::from_secs(2),
        "a new file took {new_file:?}, a write to an idle file {idle_write:?}"
    );
    assert_eq!(
        env.count("SELECT count(DISTINCT message) FROM pipeline_logs WHERE daemon = 'app'"),
        7
    );
}
