//! The sink sends a batch's rows, positions, agent row and COMMIT in one flight (issue 13):
//! a statement that fails after the COPY, with COMMIT already on its way, must leave nothing
//! committed — no rows, no positions — and the batch must land exactly once when the fault
//! goes away.

use crate::support::agent::{append, json_line, wait_until, Env};
use std::time::Duration;

#[test]
fn a_statement_failing_after_the_copy_with_commit_already_sent_commits_nothing_then_exactly_once() {
    let env = Env::new();
    // A trigger on the positions table fails every write while `pw_fail` has a row, with a
    // retryable SQLSTATE (serialization failure): the agent retries the same batch.
    env.sql(
        "CREATE TABLE pw_fail (x int); INSERT INTO pw_fail VALUES (1); \
         CREATE FUNCTION pw_fail_fn() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF EXISTS (SELECT 1 FROM pw_fail) THEN \
             RAISE EXCEPTION 'injected checkpoint failure' USING ERRCODE = '40001'; \
           END IF; RETURN NEW; END $$; \
         CREATE TRIGGER pw_fail_tr BEFORE INSERT OR UPDATE ON pipewatch_checkpoints \
           FOR EACH ROW EXECUTE FUNCTION pw_fail_fn();",
    );
    let n = 1200;
    append(
        &env.path("app.jsonl"),
        &(0..n).map(json_line).collect::<Vec<_>>(),
    );
    let cfg = env.config("[daemons.app]\nlogs = [\"$DIR/*.jsonl\"]\n");
    let agent = env.spawn(&cfg);
    let failed_twice = wait_until(Duration::from_secs(30), || {
        agent
            .stderr()
            .matches("injected checkpoint failure")
            .count()
            >= 2
    });
    assert!(failed_twice, "no failed commit:\n{}", agent.stderr());
    // The COPY of those attempts ran and COMMIT was sent with it: still nothing committed.
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_logs WHERE daemon = 'app'"),
        0,
        "rows of a failed batch were committed:\n{}",
        agent.stderr()
    );
    assert_eq!(
        env.count("SELECT count(*) FROM pipewatch_checkpoints"),
        0,
        "a position was committed"
    );
    env.sql("DELETE FROM pw_fail");
    let landed = wait_until(Duration::from_secs(60), || {
        env.count("SELECT count(*) FROM pipeline_logs WHERE daemon = 'app'") >= n as i64
    });
    // Long enough for a batch retried twice to show.
    std::thread::sleep(Duration::from_millis(1500));
    let (code, _, stderr) = agent.terminate();
    assert!(landed, "lines missing:\n{stderr}");
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        (
            env.count("SELECT count(*) FROM pipeline_logs WHERE daemon = 'app'"),
            env.count("SELECT count(DISTINCT message) FROM pipeline_logs WHERE daemon = 'app'"),
        ),
        (n as i64, n as i64),
        "{stderr}"
    );
    let end = env.sql(
        "SELECT position FROM pipewatch_checkpoints WHERE daemon = 'app' AND path LIKE '%app.jsonl'",
    );
    let len = std::fs::metadata(env.path("app.jsonl"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert_eq!(end.trim(), len.to_string(), "{stderr}");
}
