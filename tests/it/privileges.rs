//! Least privilege: the agent works with nothing but `pipewatch_agent`, and that role cannot
//! delete or change the schema. Retention configured in the agent runs once for the fleet.

use crate::support::agent::{append, Env};
use crate::support::pg;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

static N: AtomicUsize = AtomicUsize::new(0);

/// A login role that is only a member of `role`, and the test database's URL for it.
fn login_as(env: &Env, role: &str) -> (String, String) {
    let name = format!(
        "pw_login_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    );
    env.sql(&format!("CREATE ROLE {name} LOGIN IN ROLE {role}"));
    let url = env
        .db
        .replacen("postgres://postgres@", &format!("postgres://{name}@"), 1);
    (name, url)
}

#[test]
fn the_agent_ships_as_pipewatch_agent_which_cannot_delete_or_alter() {
    let env = Env::new();
    let (_, url) = login_as(&env, "pipewatch_agent");
    let exp = "6f1c2a4e-0000-4000-8000-000000000001";
    append(
        &env.path("a.jsonl"),
        &[
            format!(
                r#"{{"event": "start", "experiment_id": "{exp}", "progress": {{"node_id": "root", "level": "pipeline", "status": "running"}}}}"#
            ),
            format!(
                r#"{{"event": "child", "experiment_id": "{exp}", "progress": {{"node_id": "c", "parent_node_id": "root", "percent": 40}}}}"#
            ),
            format!(
                r#"{{"event": "boom", "level": "error", "experiment_id": "{exp}", "event_type": "tile_failed", "severity": "ERROR"}}"#
            ),
        ],
    );
    let cfg = env.path("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[database]\nurl = \"{url}\"\n[agent]\nhost = \"least\"\n[daemons.app]\nlogs = [\"{}/*.jsonl\"]\n",
            env.dir.path().display()
        ),
    )
    .unwrap();
    env.run_once_ok(&cfg);
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_logs WHERE host = 'least'"),
        3
    );
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_events WHERE event_type = 'tile_failed'"),
        1
    );
    assert_eq!(
        env.sql("SELECT progress_percent FROM pipeline_progress WHERE node_id = 'root'"),
        "40.00"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_metrics WHERE host = 'least'"),
        2
    );
    assert_eq!(
        env.count("SELECT count(*) FROM pipewatch_checkpoints WHERE host = 'least'"),
        1
    );
    // A second run resumes from the checkpoint it may read.
    env.run_once_ok(&cfg);
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_logs WHERE host = 'least'"),
        3
    );
    for (sql, what) in [
        ("DELETE FROM pipeline_logs", "delete logs"),
        ("DELETE FROM pipewatch_checkpoints", "delete checkpoints"),
        ("TRUNCATE pipeline_events", "truncate events"),
        ("DROP TABLE pipeline_metrics", "drop a table"),
        ("CREATE TABLE sneaky (x int)", "create a table"),
        ("SELECT cleanup_old_logs(1)", "run cleanup"),
    ] {
        let err = pg::try_psql(&url, sql).expect_err(what);
        assert!(
            err.contains("permission denied") || err.contains("must be owner"),
            "{what}: {err}"
        );
    }
    assert_eq!(env.count("SELECT count(*) FROM pipeline_logs"), 3);
}

#[test]
fn the_reader_role_can_query_but_not_write() {
    let env = Env::new();
    let (_, url) = login_as(&env, "pipewatch_reader");
    env.sql(
        "INSERT INTO experiments (id, name) VALUES ('6f1c2a4e-0000-4000-8000-000000000002', 'r')",
    );
    assert_eq!(
        pg::psql(&url, "SELECT count(*) FROM recent_experiment_errors"),
        "0"
    );
    assert_eq!(
        pg::psql(
            &url,
            "SELECT count(*) FROM get_experiment_logs('6f1c2a4e-0000-4000-8000-000000000002')"
        ),
        "0"
    );
    let err = pg::try_psql(
        &url,
        "INSERT INTO pipeline_logs (ts, level, message) VALUES (now(), 'INFO', 'x')",
    )
    .expect_err("readers cannot write");
    assert!(err.contains("permission denied"), "{err}");
}

#[test]
fn configured_retention_runs_once_for_the_fleet() {
    let env = Env::new();
    env.sql(
        "INSERT INTO pipeline_logs (ts, level, message) VALUES (now() - interval '40 days', 'INFO', 'old'), (now(), 'INFO', 'new');
         INSERT INTO pipeline_events (ts, event_type) VALUES (now() - interval '40 days', 'old_event')",
    );
    let (_, url) = login_as(&env, "pipewatch_agent");
    std::fs::write(env.path("a.jsonl"), "").unwrap();
    let cfg = env.path("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[database]\nurl = \"{url}\"\n[agent]\nhost = \"keeper\"\n[retention]\nolder_than = \"30d\"\n[daemons.app]\nlogs = [\"{}/*.jsonl\"]\n",
            env.dir.path().display()
        ),
    )
    .unwrap();
    let a = env.spawn(&cfg);
    let b = env.spawn(&cfg);
    let done = crate::support::agent::wait_until(Duration::from_secs(20), || {
        env.count("SELECT count(*) FROM pipewatch_retention WHERE last_run_at IS NOT NULL") == 1
    });
    std::thread::sleep(Duration::from_millis(500));
    let (_, _, ea) = a.terminate();
    let (_, _, eb) = b.terminate();
    assert!(done, "retention never ran:\n{ea}\n{eb}");
    assert_eq!(env.sql("SELECT message FROM pipeline_logs"), "new");
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_events WHERE event_type = 'old_event'"),
        0
    );
    assert_eq!(
        env.sql(
            "SELECT last_days || ' ' || last_rows || ' ' || last_host FROM pipewatch_retention"
        ),
        "30 2 keeper"
    );
    let applied = ea.matches("retention applied").count() + eb.matches("retention applied").count();
    assert_eq!(applied, 1, "exactly one agent applies it:\n{ea}\n{eb}");
}
