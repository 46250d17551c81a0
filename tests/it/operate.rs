//! The operator commands against a real database with known data: output checked as a person
//! (or a script reading `--json`) would.

use crate::support::agent::{append, Env};
use crate::support::{pipewatch_cmd, text};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

const EXP: &str = "11111111-2222-4333-8444-555555555555";

/// A migrated database with one experiment `exp-a`, logs at every level, a progress tree and
/// old rows for cleanup.
fn seeded() -> Env {
    let env = Env::new();
    env.sql(&format!(
        "INSERT INTO experiments (id, name) VALUES ('{EXP}', 'exp-a');
         INSERT INTO pipeline_logs (ts, level, message, experiment_id, node_id, stage, traceback, host, daemon)
         SELECT now() - (g || ' seconds')::interval,
                (ARRAY['DEBUG','INFO','WARNING','ERROR','CRITICAL'])[1 + g % 5],
                CASE WHEN g % 5 = 3 THEN 'disk full on /data' ELSE 'message ' || g END,
                '{EXP}', 'node-' || (g % 2), 'stage-x',
                CASE WHEN g % 5 = 3 THEN 'Traceback (most recent call last):\n  File \"x.py\"\nOSError: disk full' END,
                'h1', 'clusterer'
           FROM generate_series(1, 50) g;
         INSERT INTO pipeline_logs (ts, level, message, experiment_id, host, daemon)
         VALUES (now() - interval '40 days', 'INFO', 'ancient', '{EXP}', 'h1', 'clusterer');
         INSERT INTO pipeline_progress (experiment_id, node_id, parent_node_id, level, name, status, progress_percent, updated_at)
         VALUES ('{EXP}', 'root', NULL, 'pipeline', 'Root', 'running', 0, now()),
                ('{EXP}', 'a', 'root', 'phase', 'Phase A', 'completed', 100, now()),
                ('{EXP}', 'b', 'root', 'phase', 'Phase B', 'running', 50, now());"
    ));
    env
}

fn run(env: &Env, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["--database-url", env.db.as_str()];
    all.extend_from_slice(args);
    let out = pipewatch_cmd(&all).output().unwrap();
    let (o, e) = text(&out);
    (out.status.code(), o, e)
}

fn json_lines(s: &str) -> Vec<Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn logs_filters_by_level_search_node_and_limit_and_prints_json_lines() {
    let env = seeded();
    let (code, out, err) = run(
        &env,
        &["logs", "--experiment", "exp-a", "--json", "--limit", "1000"],
    );
    assert_eq!(code, Some(0), "{err}");
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 51);
    // Oldest first, like a log.
    assert_eq!(rows[0]["message"], "ancient");
    let (_, out, _) = run(
        &env,
        &["logs", "-e", EXP, "--level", "error", "--limit", "1000"],
    );
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 20);
    assert!(rows
        .iter()
        .all(|r| r["level"] == "ERROR" || r["level"] == "CRITICAL"));
    let (_, out, _) = run(
        &env,
        &[
            "logs",
            "-e",
            EXP,
            "--search",
            "DISK FULL",
            "--limit",
            "1000",
        ],
    );
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 10);
    assert!(rows[0]["traceback"].as_str().unwrap().contains("OSError"));
    let (_, out, _) = run(
        &env,
        &["logs", "-e", EXP, "--node", "node-1", "--limit", "1000"],
    );
    assert_eq!(json_lines(&out).len(), 25);
    let (_, out, _) = run(&env, &["logs", "-e", EXP, "--limit", "5"]);
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 5);
    assert_eq!(
        rows[4]["message"], "message 1",
        "the newest five, oldest first"
    );
    let (_, out, _) = run(
        &env,
        &["logs", "-e", EXP, "--since", "20s", "--limit", "1000"],
    );
    let n = json_lines(&out).len();
    assert!((19..=21).contains(&n), "{n} rows in the last 20 s");
}

#[test]
fn logs_errors_name_the_problem() {
    let env = seeded();
    let (code, _, err) = run(&env, &["logs", "--experiment", "nope"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("no experiment named \"nope\"")
            && err.contains("exp-a (11111111-2222-4333-8444-555555555555)"),
        "{err}"
    );
    let (code, _, err) = run(&env, &["logs", "--experiment", "exp-a", "--level", "LOUD"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--level \"LOUD\" is not one of"), "{err}");
}

#[test]
fn logs_follow_streams_new_rows() {
    let env = seeded();
    let mut child = pipewatch_cmd(&[
        "--database-url",
        &env.db,
        "logs",
        "-e",
        "exp-a",
        "--follow",
        "--limit",
        "1",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    // Lines arrive on a channel so that a silent follower fails the test instead of hanging it.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = || rx.recv_timeout(Duration::from_secs(10)).ok();
    let first: Option<Value> = next().map(|l| serde_json::from_str(&l).unwrap());
    env.sql(&format!(
        "INSERT INTO pipeline_logs (ts, level, message, experiment_id) VALUES (now(), 'INFO', 'fresh one', '{EXP}'), (now(), 'INFO', 'fresh two', '{EXP}')"
    ));
    let got: Vec<String> = (0..2)
        .filter_map(|_| next())
        .map(|l| {
            serde_json::from_str::<Value>(&l).unwrap()["message"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    // SAFETY: our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(
        first.map(|f| f["message"].clone()),
        Some(Value::from("message 1"))
    );
    assert_eq!(got, vec!["fresh one", "fresh two"]);
    assert!(
        status.success(),
        "the follower stops cleanly on SIGTERM: {status:?}"
    );
}

#[test]
fn progress_draws_the_tree_depth_first() {
    let env = seeded();
    let (code, out, err) = run(&env, &["progress", "--experiment", "exp-a"]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].starts_with("Root (root)"), "{out}");
    assert!(
        lines[1].starts_with("  Phase A (a)")
            && lines[1].contains("100.0%")
            && lines[1].contains("completed"),
        "{out}"
    );
    assert!(
        lines[2].starts_with("  Phase B (b)")
            && lines[2].contains(" 50.0%")
            && lines[2].contains("running"),
        "{out}"
    );
    // The trigger aggregated the root from its children.
    assert!(lines[0].contains(" 75.0%"), "{out}");
}

#[test]
fn errors_groups_by_message_with_counts_and_a_traceback() {
    let env = seeded();
    let (code, out, err) = run(&env, &["errors", "--experiment", "exp-a"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("   10× ERROR    disk full on /data"), "{out}");
    assert!(out.contains("OSError: disk full"), "{out}");
    assert!(out.contains("nodes node-1"), "{out}");
    let (code, out, _) = run(&env, &["errors"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("disk full on /data") && out.contains("experiment exp-a"),
        "{out}"
    );
}

#[test]
fn cleanup_dry_run_counts_then_deletes() {
    let env = seeded();
    let (code, out, err) = run(&env, &["cleanup", "--older-than", "30d", "--dry-run"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("pipeline_logs") && out.contains("           1 rows older than"),
        "{out}"
    );
    assert!(out.contains("dry run: 1 rows would be deleted"), "{out}");
    assert_eq!(env.count("SELECT count(*) FROM pipeline_logs"), 51);
    let (code, out, err) = run(&env, &["cleanup", "--older-than", "30d"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with("deleted 1 log, event and metric rows older than 30days (before "),
        "{out}"
    );
    assert_eq!(env.count("SELECT count(*) FROM pipeline_logs"), 50);
    let (code, _, err) = run(&env, &["cleanup", "--older-than", "3h"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("shorter than a day"), "{err}");
}

#[test]
fn status_shows_agents_tables_and_migrations() {
    let env = Env::new();
    append(&env.path("a.jsonl"), &[r#"{"event": "hello"}"#.to_string()]);
    let cfg = env.config("[daemons.app]\nlogs = [\"$DIR/*.jsonl\"]\n");
    env.run_once_ok(&cfg);
    let (code, out, err) = run(&env, &["status"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("test-host") && out.contains("app") && out.contains("shipped 1 "),
        "{out}"
    );
    assert!(
        out.contains("pipeline_logs") && out.contains("partitions"),
        "{out}"
    );
    assert!(out.contains("0001 ") && out.contains("0008 "), "{out}");
}

#[test]
fn hostile_text_is_stored_intact_never_executed() {
    let env = Env::new();
    let nasty = [
        r"'); DROP TABLE pipeline_logs; --",
        r#"Robert"); DELETE FROM pipewatch_checkpoints; --"#,
        r"\! rm -rf / \copy pipeline_logs to '/tmp/x'",
        r"back\slash \\ and \N and \. alone",
        "tab\there, quote ' and \" double",
        "$$ dollar $$ quoting $tag$",
    ];
    let lines: Vec<String> = nasty
        .iter()
        .map(|m| {
            serde_json::json!({ "event": m, "level": "info", "context": { "k'ey": m } }).to_string()
        })
        .collect();
    append(&env.path("a.jsonl"), &lines);
    let cfg = env.config("[daemons.app]\nlogs = [\"$DIR/*.jsonl\"]\n");
    env.run_once_ok(&cfg);
    let out = pipewatch_cmd(&["--database-url", &env.db, "logs", "-e", "x", "--json"])
        .output()
        .unwrap();
    // No experiment: the command fails cleanly; query the table directly instead.
    assert_eq!(out.status.code(), Some(1));
    let got: Vec<String> = env
        .sql("SELECT message FROM pipeline_logs ORDER BY id")
        .split('\n')
        .map(str::to_string)
        .collect();
    assert_eq!(got.len(), nasty.len(), "{got:?}");
    for (g, want) in got.iter().zip(nasty.iter()) {
        assert_eq!(g, want);
    }
    assert_eq!(env.count("SELECT count(*) FROM pipewatch_checkpoints"), 1);
}

#[test]
fn demo_runs_end_to_end_and_cleans_up() {
    let out = pipewatch_cmd(&["demo", "--duration", "14s"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    for want in [
        "starting a throwaway PostgreSQL",
        "schema migrated",
        "Tile processing (tiles)",
        "200/200",
        "tile 61 failed: invalid geometry",
        "ValueError: self-intersecting ring",
        "1× tile 61 failed",
        "daemon_started",
        "daemon_stalled",
        "waiting_network: waiting on the network",
        "out_of_memory",
        "agent_stopped",
        "clusterer",
        "explore further",
    ] {
        assert!(
            stdout.contains(want),
            "missing {want:?} in:\n{stdout}\n{stderr}"
        );
    }
    // The simulated daemon is gone.
    let pid = stdout
        .lines()
        .find_map(|l| l.split("started (pid ").nth(1))
        .and_then(|s| s.trim_end_matches(')').parse::<i32>().ok())
        .expect("the demo names the daemon's pid");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "daemon {pid} still running"
    );
}

#[test]
fn commands_on_an_unmigrated_database_say_to_migrate_in_one_line() {
    let db = crate::support::pg::fresh_db();
    for args in [vec!["status"], vec!["logs", "-e", EXP], vec!["errors"]] {
        let mut all = vec!["--database-url", db.as_str()];
        all.extend(args.iter().copied());
        let out = pipewatch_cmd(&all).output().unwrap();
        let (_, err) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains("run `pipewatch migrate`"), "{args:?}: {err}");
    }
}

/// A `--since` longer than timestamps go: every row, not a crash (DateTime overflow) or a
/// database "timestamp out of range".
#[test]
fn logs_and_errors_with_an_enormous_since() {
    let env = seeded();
    for since in ["9000y", "100000000y"] {
        let (code, out, err) = run(&env, &["logs", "--experiment", "exp-a", "--since", since]);
        assert_eq!(code, Some(0), "logs --since {since}: {err}");
        assert!(out.contains("ancient"), "logs --since {since}: {out}");
        let (code, out, err) = run(&env, &["errors", "--since", since]);
        assert_eq!(code, Some(0), "errors --since {since}: {err}");
        assert!(
            out.contains("disk full on /data"),
            "errors --since {since}: {out}"
        );
    }
}
