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

// ---------------------------------------------------------------------------------------------
// Two connections: with a backlog, batch N+1 streams on a second connection while N commits
// (sink.rs `ship`). Commits stay strictly in order and every lost reply stays exact.
// ---------------------------------------------------------------------------------------------

use crate::support::proxy::{Fault, Proxy};
use std::path::PathBuf;

/// Lines in the backlog: about 150 small batches, so batches stream behind one another.
const BACKLOG: usize = 30_000;

/// A backlog of `BACKLOG` lines in `app.jsonl`, a proxy in front of the database, a config
/// through it with small batches, and a record of the order positions were written in.
fn backlog(env: &Env) -> (Proxy, PathBuf) {
    append(
        &env.path("app.jsonl"),
        &(0..BACKLOG).map(json_line).collect::<Vec<_>>(),
    );
    // Every position write, numbered in the order it happened: a transaction writes its
    // positions only once it holds the agent's row, so the numbers follow the commit order.
    env.sql(
        "CREATE TABLE pw_order (seq bigserial, fingerprint text, position bigint); \
         CREATE FUNCTION pw_order_fn() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           INSERT INTO pw_order (fingerprint, position) VALUES (NEW.fingerprint, NEW.position); \
           RETURN NEW; END $$; \
         CREATE TRIGGER pw_order_tr AFTER INSERT OR UPDATE ON pipewatch_checkpoints \
           FOR EACH ROW EXECUTE FUNCTION pw_order_fn();",
    );
    let (proxy, url) = Proxy::for_url(&env.db);
    let cfg = env.path("backlog.toml");
    std::fs::write(
        &cfg,
        format!(
            "[database]\nurl = \"{url}\"\n\n[agent]\nhost = \"test-host\"\n\n\
             [batch]\nmax_records = 200\nmax_wait = \"100ms\"\n\n\
             [daemons.app]\nlogs = [\"{}/*.jsonl\"]\n",
            env.dir.path().display()
        ),
    )
    .unwrap();
    (proxy, cfg)
}

/// Every line exactly once, the committed position at the end of the file, and positions
/// committed in file order (never one behind a position committed before it).
fn judge_backlog(env: &Env, stderr: &str) {
    assert_eq!(
        (
            env.count("SELECT count(*) FROM pipeline_logs WHERE daemon = 'app'"),
            env.count("SELECT count(DISTINCT message) FROM pipeline_logs WHERE daemon = 'app'"),
        ),
        (BACKLOG as i64, BACKLOG as i64),
        "rows (total, distinct): a batch lost or committed twice\n{stderr}"
    );
    let len = std::fs::metadata(env.path("app.jsonl")).unwrap().len();
    let end = env.sql("SELECT position FROM pipewatch_checkpoints WHERE daemon = 'app'");
    assert_eq!(end.trim(), len.to_string(), "{stderr}");
    let behind = env.count(
        "SELECT count(*) FROM (SELECT position < lag(position) OVER \
           (PARTITION BY fingerprint ORDER BY seq) AS back FROM pw_order) o WHERE back",
    );
    assert_eq!(behind, 0, "a position was committed out of order\n{stderr}");
}

/// The run succeeded, [`judge_backlog`] holds, and its log shows the case under test
/// happened: a batch had been streamed behind the one that failed (`note` is what the sink
/// says then; `case` names the failure for the message).
fn judge_overlap(env: &Env, out: &std::process::Output, note: &str, case: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    judge_backlog(env, &stderr);
    assert!(
        stderr.contains(note),
        "no batch was streamed behind the one {case}\n{stderr}"
    );
}

#[test]
fn a_batch_rolled_back_while_the_next_streams_behind_it_is_retried_first_then_the_next() {
    let env = Env::new();
    let (proxy, cfg) = backlog(&env);
    // Batch N's connection closes instead of sending its COMMIT (the server rolls N back)
    // while N+1, streamed behind it, waits for the agent's row: N+1 must not commit.
    proxy.arm_in_overlap(Fault::DropBeforeCommit);
    let out = env.run_once(&cfg);
    assert_eq!(
        proxy.fired().len(),
        1,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    judge_overlap(
        &env,
        &out,
        "the batch streamed behind it did not commit either",
        "that failed",
    );
}

#[test]
fn a_lost_commit_reply_while_the_next_batch_streams_behind_it_commits_each_once() {
    let env = Env::new();
    let (proxy, cfg) = backlog(&env);
    // N commits but its reply is lost and its connection closed (new ones are refused for a
    // moment); N+1, streamed behind it on the other connection, finds N committed and
    // commits: N must not be committed again.
    proxy.arm_in_overlap(Fault::LoseReply(Duration::from_millis(500)));
    let out = env.run_once(&cfg);
    assert_eq!(
        proxy.fired().len(),
        1,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    judge_overlap(
        &env,
        &out,
        "the batch streamed behind it committed, so it had committed too",
        "whose reply was lost",
    );
}

#[test]
fn a_connection_silent_after_commit_while_the_next_batch_streams_commits_each_once() {
    let env = Env::new();
    let (proxy, cfg) = backlog(&env);
    let cfg_text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        cfg_text.replace(
            "[agent]",
            "connect_timeout = \"2s\"\nquery_timeout = \"2s\"\n\n[agent]",
        ),
    )
    .unwrap();
    // N's COMMIT reaches the server, then its connection goes silent for good; new
    // connections are silent too until healed. N+1, streamed behind it, finds N committed.
    proxy.arm_in_overlap(Fault::SilenceAfterCommit);
    let out = std::thread::scope(|s| {
        let run = s.spawn(|| env.run_once(&cfg));
        assert!(
            wait_until(Duration::from_secs(30), || !proxy.fired().is_empty()),
            "the fault never fired"
        );
        std::thread::sleep(Duration::from_secs(3));
        proxy.heal();
        run.join().unwrap()
    });
    judge_overlap(
        &env,
        &out,
        "the batch streamed behind it committed, so it had committed too",
        "that went silent",
    );
}

#[test]
fn an_agent_killed_mid_backlog_with_two_batches_in_flight_resumes_exactly_once() {
    let env = Env::new();
    let (proxy, cfg) = backlog(&env);
    let agent = env.spawn(&cfg);
    // Killed once a second connection carries batches and part of the backlog is committed.
    let rows = || env.count("SELECT count(*) FROM pipeline_logs WHERE daemon = 'app'");
    let midway = wait_until(Duration::from_secs(30), || {
        proxy.connections().0 >= 2 && rows() >= 2000
    });
    agent.kill9();
    let at_kill = rows();
    assert!(midway, "no second connection, or nothing committed");
    assert!(
        at_kill < BACKLOG as i64,
        "the backlog was done before the kill ({at_kill} rows): nothing was in flight"
    );
    let out = env.run_once(&cfg);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    judge_backlog(&env, &stderr);
}
