//! Regressions, each named after the symptom it guards against.

use crate::support::agent::{append, json_line, wait_until, Env};
use crate::support::pg;
use std::time::Duration;

/// Symptom: after a copytruncate during a database outage, the agent read the rewritten file
/// from its old offset (a garbage half line, duplicates), and the copy was re-read from the
/// start because its position checksum was taken from the truncated file.
#[test]
fn copytruncate_while_the_database_is_down_neither_garbles_nor_duplicates() {
    let cluster = pg::Cluster::start_new();
    let env = Env::with_db(cluster.create_db());
    std::fs::create_dir_all(env.path("logs")).unwrap();
    let log = env.path("logs/app.jsonl");
    append(&log, &(0..2000).map(json_line).collect::<Vec<_>>());
    let cfg = env.config("[daemons.app]\nlogs = [\"$DIR/logs/app.jsonl*\"]\n");
    let agent = env.spawn(&cfg);
    assert!(wait_until(Duration::from_secs(20), || env
        .count("SELECT count(*) FROM pipeline_logs")
        == 2000));
    cluster.stop();
    // More than the agent can hold in memory: it blocks with the file far from read.
    append(&log, &(2000..30_000).map(json_line).collect::<Vec<_>>());
    std::thread::sleep(Duration::from_millis(500));
    // copytruncate, then the daemon writes past the agent's old offset.
    std::fs::copy(&log, env.path("logs/app.jsonl.1")).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&log)
        .unwrap();
    append(&log, &(30_000..60_000).map(json_line).collect::<Vec<_>>());
    cluster.start();
    let done = wait_until(Duration::from_secs(60), || {
        pg::try_psql(&env.db, "SELECT count(*) FROM pipeline_logs")
            .map(|s| s.trim().parse::<i64>().unwrap_or(0) >= 60_000)
            .unwrap_or(false)
    });
    std::thread::sleep(Duration::from_millis(700));
    let (code, _, stderr) = agent.terminate();
    assert!(done, "lines missing:\n{stderr}");
    assert_eq!(code, Some(0));
    assert_eq!(
        env.sql("SELECT count(*) || ' ' || count(DISTINCT message) || ' ' || count(*) FILTER (WHERE message NOT LIKE 'line %') FROM pipeline_logs"),
        "60000 60000 0"
    );
}

/// Symptom: an agent (re)started with four or more files holding unshipped lines hung for
/// good, looking healthy: the readers filled the channel before the batcher was started, and
/// the `agent_started` event waited for room that never came.
#[test]
fn many_files_with_unshipped_lines_at_start_do_not_hang_the_agent() {
    let env = Env::new();
    std::fs::create_dir_all(env.path("a")).unwrap();
    std::fs::create_dir_all(env.path("b")).unwrap();
    for f in 0..12 {
        crate::support::agent::append(
            &env.path(&format!("a/{f}.jsonl")),
            &(f * 10..f * 10 + 10).map(json_line).collect::<Vec<_>>(),
        );
    }
    append(
        &env.path("b/x.jsonl"),
        &(1000..1010).map(json_line).collect::<Vec<_>>(),
    );
    // Two daemons: loading the second one's positions gives the first one's reader time to
    // fill the channel.
    let cfg = env.config(
        "[daemons.a]\nlogs = [\"$DIR/a/*.jsonl\"]\n\n[daemons.b]\nlogs = [\"$DIR/b/*.jsonl\"]\n",
    );
    for _ in 0..3 {
        let agent = env.spawn(&cfg);
        let shipped = wait_until(Duration::from_secs(20), || {
            env.count("SELECT count(*) FROM pipeline_logs") == 130
        });
        let (code, _, stderr) = agent.terminate();
        assert!(shipped, "the agent did not ship:\n{stderr}");
        assert_eq!(code, Some(0));
        env.sql("TRUNCATE pipeline_logs; TRUNCATE pipewatch_checkpoints");
    }
}
