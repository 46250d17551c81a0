//! Everything through a real pgbouncer in transaction mode, with a server pool of 2 shared by
//! more clients than that (other pipewatch processes run all the while): backfill, a server
//! restart under a running agent, kill -9 and restart, and every operator command, migrate
//! and verify. Exact counts; every command exits 0.
//!
//! On the code before the conversion these fail with `42P05 prepared statement "s0" already
//! exists` (or `26000 … does not exist`): a named statement prepared outside a transaction
//! lands on one server connection and meets another client's statement of the same name.

use crate::support::agent::{append, json_line, wait_until, Env};
use crate::support::pg;
use crate::support::pooler::{self, Noise};
use crate::support::{pipewatch_cmd, text};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn lines(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(json_line).collect()
}

/// An agent config through `url`, with a short query timeout so that a connection cut by
/// the restart is noticed quickly.
fn agent_config(dir: &Path, name: &str, url: &str, host: &str, glob: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!(
            "[database]\nurl = \"{url}\"\nquery_timeout = \"5s\"\n\n[agent]\nhost = \"{host}\"\n\n\
             [batch]\nmax_records = 300\nmax_wait = \"100ms\"\n\n[daemons.app]\nlogs = [\"{glob}\"]\n"
        ),
    )
    .unwrap();
    p
}

/// `(total, distinct messages)` of a host's rows, read on the server directly.
fn counts(direct: &str, host: &str) -> (i64, i64) {
    let out = pg::psql(
        direct,
        &format!(
            "SELECT count(*), count(DISTINCT source || message) FROM pipeline_logs WHERE host = '{host}'"
        ),
    );
    let mut it = out.split('|').map(|s| s.trim().parse::<i64>().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

fn run(url: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["--database-url", url];
    all.extend_from_slice(args);
    let out = pipewatch_cmd(&all).output().unwrap();
    let (o, e) = text(&out);
    (out.status.code(), o, e)
}

/// What the noise clients run: read-only commands that each prepare several statements.
const NOISE: &[&[&str]] = &[
    &["status"],
    &["errors", "--since", "1h"],
    &["migrate", "--check-only"],
];

#[test]
fn backfill_migrate_verify_and_every_operator_command_work_through_pgbouncer() {
    let Some(pooled) = pooler::start(2) else {
        return;
    };
    let (direct, url) = pooled.create_db();
    // Three hosts migrate at once through the pool.
    let migrations: Vec<_> = (0..3)
        .map(|_| {
            pipewatch_cmd(&["--database-url", &url, "migrate"])
                .output()
                .unwrap()
        })
        .collect();
    for out in &migrations {
        assert!(out.status.success(), "migrate: {:?}", text(out));
    }
    let noise = Noise::start(&url, 2, NOISE);
    let env = Env::with_db(url.clone());
    // Three agents back-fill 2 files of 1,000 lines each, at once, through the same pool.
    let hosts = ["pool-a", "pool-b", "pool-c"];
    let mut configs = Vec::new();
    for h in hosts {
        std::fs::create_dir_all(env.path(h)).unwrap();
        append(&env.path(&format!("{h}/one.jsonl")), &lines(0..1000));
        append(&env.path(&format!("{h}/two.jsonl")), &lines(0..1000));
        let glob = format!("{}/*.jsonl", env.path(h).display());
        configs.push(agent_config(
            env.dir.path(),
            &format!("{h}.toml"),
            &url,
            h,
            &glob,
        ));
    }
    for round in 0..2 {
        let agents: Vec<_> = configs
            .iter()
            .map(|c| {
                pipewatch_cmd(&["--config", c.to_str().unwrap(), "run", "--once"])
                    .spawn()
                    .unwrap()
            })
            .collect();
        for a in agents {
            let out = a.wait_with_output().unwrap();
            assert!(out.status.success(), "run --once (round {round}) failed");
        }
        // The second round finds everything committed: nothing more.
        for h in hosts {
            assert_eq!(counts(&direct, h), (2000, 2000), "host {h}, round {round}");
        }
    }
    let cfg = configs[0].to_str().unwrap();
    let out = pipewatch_cmd(&["--config", cfg, "check-config"])
        .output()
        .unwrap();
    assert!(out.status.success(), "check-config: {:?}", text(&out));

    // Every operator command, through the pool, while the noise goes on.
    let (code, id, err) = run(&url, &["experiments", "add", "pooled-exp"]);
    assert_eq!(code, Some(0), "{err}");
    let id = id.trim().to_string();
    assert_eq!(id.len(), 36, "not an id: {id:?}");
    let (code, out, err) = run(&url, &["migrate", "--test-data", &id]);
    assert_eq!(code, Some(0), "{out}{err}");
    let checks: &[(&[&str], &str)] = &[
        (&["experiments", "list"], "pooled-exp"),
        (&["logs", "-e", "pooled-exp", "--limit", "1000"], "ERROR"),
        (&["progress", "-e", "pooled-exp"], "%"),
        (&["errors"], "pooled-exp"),
        (&["errors", "-e", "pooled-exp"], "Traceback"),
        (&["status"], "pool-a"),
        (&["migrate", "--check-only"], "0011"),
        (
            &["cleanup", "--older-than", "30d", "--dry-run"],
            "pipeline_logs",
        ),
        (&["cleanup", "--older-than", "3650d"], "deleted 0 log"),
        (&["verify"], "checks passed"),
        (&["migrate"], "0011"),
    ];
    for (args, expect) in checks {
        let (code, out, err) = run(&url, args);
        assert_eq!(code, Some(0), "{args:?}: {out}{err}");
        assert!(
            out.contains(expect),
            "{args:?} lacks {expect:?}:\n{out}{err}"
        );
        assert!(!err.contains("prepared statement"), "{args:?}: {err}");
    }
    let (runs, failures) = noise.finish();
    assert!(runs >= 4, "the noise clients ran only {runs} times");
    assert!(failures.is_empty(), "noise clients failed: {failures:#?}");
    for h in hosts {
        assert_eq!(counts(&direct, h), (2000, 2000), "host {h} at the end");
    }
}

#[test]
fn a_running_agent_behind_pgbouncer_survives_a_server_restart_and_kill_9_exactly_once() {
    let Some(pooled) = pooler::start(2) else {
        return;
    };
    let (direct, url) = pooled.create_db();
    let env = Env::with_db(url.clone());
    let noise = Noise::start(&url, 2, NOISE);
    let log = env.path("app.jsonl");
    append(&log, &lines(0..300));
    let glob = format!("{}/*.jsonl", env.dir.path().display());
    let cfg = agent_config(env.dir.path(), "agent.toml", &url, "pool-host", &glob);
    let agent = env.spawn(&cfg);
    let rows = || counts(&direct, "pool-host").0;
    assert!(
        wait_until(Duration::from_secs(30), || rows() >= 300),
        "backfill through the pooler:\n{}",
        agent.stderr()
    );
    // Operators see the agent by its host; pgbouncer passes the name on to the server
    // connection the agent's last transaction used (the noise would rename it).
    noise.pause();
    append(&log, &lines(300..310));
    assert!(wait_until(Duration::from_secs(30), || rows() >= 310));
    assert!(
        wait_until(Duration::from_secs(10), || pg::psql(
            &direct,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pipewatch/pool-host'"
        ) != "0"),
        "no server connection named pipewatch/pool-host"
    );

    // PostgreSQL restarted behind the pooler: the pooler stays, its server connections die.
    pooled.cluster.stop();
    append(&log, &lines(310..800));
    std::thread::sleep(Duration::from_secs(2));
    pooled.cluster.start();
    append(&log, &lines(800..1000));
    assert!(
        wait_until(Duration::from_secs(60), || rows() >= 1000),
        "rows missing after the restart ({}):\n{}",
        rows(),
        agent.stderr()
    );
    // Only now: right after the restart pgbouncer refuses clients for a moment
    // ("server login has been failing"), which the agent rides out and a command would not.
    noise.resume();

    // kill -9 while lines keep coming, then a new agent takes over from the checkpoints.
    append(&log, &lines(1000..1500));
    std::thread::sleep(Duration::from_millis(150));
    let first = agent.stderr();
    agent.kill9();
    append(&log, &lines(1500..2000));
    let agent = env.spawn(&cfg);
    assert!(
        wait_until(Duration::from_secs(60), || rows() >= 2000),
        "rows missing after kill -9 ({}):\n{first}\n---\n{}",
        rows(),
        agent.stderr()
    );
    // Longer than max_wait and the first retries: a batch committed twice would show.
    std::thread::sleep(Duration::from_millis(2500));
    let (code, _, stderr) = agent.terminate();
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        counts(&direct, "pool-host"),
        (2000, 2000),
        "{first}\n---\n{stderr}"
    );
    // The agent's timeouts were SET LOCAL: nothing stayed behind on the server connections
    // that other clients of the pool get.
    for _ in 0..6 {
        assert_eq!(
            pg::psql(
                &url,
                "SELECT current_setting('lock_timeout') || ' ' || current_setting('idle_in_transaction_session_timeout')"
            ),
            "0 0",
            "a session setting leaked to the pool"
        );
    }
    let (runs, failures) = noise.finish();
    assert!(runs >= 4, "the noise clients ran only {runs} times");
    assert!(failures.is_empty(), "noise clients failed: {failures:#?}");
}
