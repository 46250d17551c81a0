//! What the agent makes of records, end to end through the real binary and database: bad
//! input, the common JSON formats, context precedence, progress ordering and aggregation,
//! events, text tracebacks, and rules (progress from messages, sticky stage across rotation and
//! restarts).

use crate::support::agent::{append, append_bytes, wait_until, Env};
use std::time::Duration;

const EXP: &str = "6f1c2a4e-0000-4000-8000-000000000001";
const EXP2: &str = "6f1c2a4e-0000-4000-8000-000000000002";

fn once(env: &Env, daemon_toml: &str) {
    let cfg = env.config(daemon_toml);
    env.run_once_ok(&cfg);
}

#[test]
fn bad_input_is_stored_with_the_reason_and_nothing_is_dropped() {
    let env = Env::new();
    let log = env.path("bad.jsonl");
    let mut bytes: Vec<u8> = Vec::new();
    bytes.extend_from_slice(b"{not json at all\n");
    bytes.extend_from_slice(b"[1, 2, 3]\n");
    bytes.extend_from_slice(b"\"just a string\"\n");
    bytes.extend_from_slice(b"{\"event\": \"raw nul \x00 here\"}\n");
    bytes
        .extend_from_slice(b"{\"event\": \"escaped \\u0000 nul\", \"k\\u0000ey\": \"v\\u0000\"}\n");
    bytes.extend_from_slice(b"{\"event\": \"bad utf8 \xff\xfe here\"}\n");
    bytes.extend_from_slice(&[b'['; 300]);
    bytes.extend_from_slice(b"\n");
    bytes.extend_from_slice(
        b"{\"event\": \"huge\", \"n\": 1e400, \"m\": 123456789012345678901234567890}\n",
    );
    bytes.extend_from_slice(b"   \n\n");
    bytes.extend_from_slice(b"{\"event\": \"crlf\"}\r\n");
    let mut long = b"{\"event\": \"".to_vec();
    long.extend(std::iter::repeat_n(b'x', 5 * 1024 * 1024));
    long.extend_from_slice(b"\"}\n");
    bytes.extend_from_slice(&long);
    bytes.extend_from_slice(b"{\"event\": \"partial, no newline yet\"");
    append_bytes(&log, &bytes);
    once(&env, "[daemons.app]\nlogs = [\"$DIR/*.jsonl\"]\n");
    // Ten complete non-blank lines; the blank ones and the partial last line are not rows.
    assert_eq!(env.count("SELECT count(*) FROM pipeline_logs"), 10);
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_logs WHERE context->'_pipewatch' ? 'parse_error'"),
        5,
        "{}",
        env.sql("SELECT left(message, 40), context->'_pipewatch' FROM pipeline_logs")
    );
    assert_eq!(
        env.sql("SELECT message FROM pipeline_logs WHERE message LIKE 'raw nul%'"),
        "raw nul  here"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_logs WHERE (context->'_pipewatch'->>'nul_removed')::boolean"),
        2
    );
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_logs WHERE (context->'_pipewatch'->>'invalid_utf8')::boolean"),
        1
    );
    assert_eq!(
        env.sql("SELECT context->'_pipewatch'->>'truncated_from_bytes' FROM pipeline_logs WHERE length(message) > 1000"),
        (long.len() - 1).to_string()
    );
    assert_eq!(
        env.sql("SELECT message FROM pipeline_logs WHERE message = 'crlf'"),
        "crlf"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_logs WHERE context->'_pipewatch' ? 'quarantined'"),
        0
    );
    // The partial line lands once its newline does.
    append_bytes(&log, b"}\n");
    once(&env, "[daemons.app]\nlogs = [\"$DIR/*.jsonl\"]\n");
    assert_eq!(env.count("SELECT count(*) FROM pipeline_logs"), 11);
}

#[test]
fn common_json_formats_are_understood_without_configuration() {
    let env = Env::new();
    append(
        &env.path("f.jsonl"),
        &[
            r#"{"event": "structlog line", "level": "warning", "timestamp": "2024-05-01T12:00:00.123Z", "logger": "geo.a"}"#.into(),
            r#"{"message": "pjl line", "levelname": "ERROR", "asctime": "2024-05-01 12:00:00,123", "name": "geo.b", "exc_info": "Traceback (most recent call last):\nValueError: x"}"#.into(),
            format!(r#"{{"text": "loguru line\n", "record": {{"message": "loguru line", "level": {{"name": "CRITICAL", "no": 50}}, "time": {{"repr": "2024-05-01 12:00:00.123456+00:00", "timestamp": 1714564800.123456}}, "name": "geo.c", "extra": {{"experiment_id": "{EXP}", "node_id": "n7"}}, "exception": null}}}}"#),
            r#"{"@timestamp": "2024-05-01T12:00:00.123Z", "log.level": "info", "message": "ecs line", "log": {"logger": "geo.d"}, "error": {"stack_trace": "java.lang.Oops\n\tat x"}}"#.into(),
            r#"{"level": 50, "time": 1714564800123, "msg": "pino line", "name": "geo.e", "err": {"stack": "Error: bad\n    at f"}}"#.into(),
        ],
    );
    once(&env, "[daemons.app]\nlogs = [\"$DIR/*.jsonl\"]\n");
    let rows = env.sql(
        "SELECT message || '|' || level || '|' || coalesce(logger, '-') || '|' || \
         to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS') || '|' || \
         coalesce(experiment_id::text, '-') || '|' || coalesce(node_id, '-') || '|' || (traceback IS NOT NULL) \
         FROM pipeline_logs ORDER BY id",
    );
    let want = [
        "structlog line|WARNING|geo.a|2024-05-01 12:00:00.123|-|-|false".to_string(),
        "pjl line|ERROR|geo.b|2024-05-01 12:00:00.123|-|-|true".to_string(),
        format!("loguru line|CRITICAL|geo.c|2024-05-01 12:00:00.123|{EXP}|n7|false"),
        "ecs line|INFO|geo.d|2024-05-01 12:00:00.123|-|-|true".to_string(),
        "pino line|ERROR|geo.e|2024-05-01 12:00:00.123|-|-|true".to_string(),
    ];
    assert_eq!(
        rows.lines().collect::<Vec<_>>(),
        want.iter().map(String::as_str).collect::<Vec<_>>()
    );
}

#[test]
fn context_precedence_record_then_path_then_daemon_default() {
    let env = Env::new();
    let dir = env.path(EXP2);
    std::fs::create_dir_all(&dir).unwrap();
    append(
        &dir.join("node-a.jsonl"),
        &[
            format!(r#"{{"event": "own", "experiment_id": "{EXP}"}}"#),
            r#"{"event": "from path"}"#.into(),
            r#"{"event": "not a uuid", "experiment_id": "exp-42"}"#.into(),
        ],
    );
    once(
        &env,
        "[daemons.app]\nlogs = [\"$DIR/*/*.jsonl\"]\npath_pattern = '/(?P<experiment_id>[0-9a-f-]{36})/(?P<node_id>[^/]+)\\.jsonl$'\nexperiment_id = \"6f1c2a4e-0000-4000-8000-000000000003\"\n",
    );
    let rows = env.sql(
        "SELECT message || '|' || coalesce(experiment_id::text, '-') || '|' || coalesce(node_id, '-') || '|' || coalesce(context->>'experiment_id', '-') FROM pipeline_logs ORDER BY id",
    );
    assert_eq!(
        rows.lines().collect::<Vec<_>>(),
        vec![
            format!("own|{EXP}|node-a|-"),
            format!("from path|{EXP2}|node-a|-"),
            format!("not a uuid|{EXP2}|node-a|exp-42"),
        ]
    );
}

#[test]
fn progress_builds_a_tree_and_an_older_update_never_overwrites_a_newer_one() {
    let env = Env::new();
    let p = |ts: &str, node: &str, extra: &str| {
        format!(
            r#"{{"event": "p", "timestamp": "{ts}", "experiment_id": "{EXP}", "progress": {{"node_id": "{node}"{extra}}}}}"#
        )
    };
    append(
        &env.path("p.jsonl"),
        &[
            p(
                "2026-11-28T10:00:00Z",
                "pipe",
                r#", "level": "pipeline", "status": "running""#,
            ),
            p(
                "2026-11-28T10:00:01Z",
                "load",
                r#", "parent_node_id": "pipe", "level": "phase", "status": "completed", "percent": 100"#,
            ),
            p(
                "2026-11-28T10:00:02Z",
                "tiles",
                r#", "parent_node_id": "cluster", "level": "step", "items_done": 25, "items_total": 100"#,
            ),
            p(
                "2026-11-28T10:00:03Z",
                "cluster",
                r#", "parent_node_id": "pipe", "level": "phase", "status": "running""#,
            ),
            // Older than the stored row: ignored.
            p(
                "2026-11-28T09:59:00Z",
                "tiles",
                r#", "items_done": 99, "items_total": 100"#,
            ),
            // Equal time: the later line wins.
            p(
                "2026-11-28T10:00:02Z",
                "tiles",
                r#", "items_done": 50, "items_total": 100"#,
            ),
        ],
    );
    once(&env, "[daemons.app]\nlogs = [\"$DIR/*.jsonl\"]\n");
    let tree = || {
        env.sql(&format!(
            "SELECT node_id || ' ' || depth || ' ' || status || ' ' || progress_percent FROM get_progress_tree('{EXP}')"
        ))
    };
    let mut got: Vec<String> = tree().lines().map(str::to_string).collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            "cluster 1 running 50.00",
            "load 1 completed 100.00",
            "pipe 0 running 75.00",
            "tiles 2 running 50.00"
        ],
        "{}",
        tree()
    );
    // A second run with an older update changes nothing; a failed child fails its parents.
    append(
        &env.path("p.jsonl"),
        &[
            p(
                "2026-11-28T09:00:00Z",
                "tiles",
                r#", "status": "completed", "percent": 100"#,
            ),
            p("2026-11-28T10:00:05Z", "tiles", r#", "status": "failed""#),
        ],
    );
    once(&env, "[daemons.app]\nlogs = [\"$DIR/*.jsonl\"]\n");
    let t = tree();
    assert!(
        t.contains("tiles 2 failed 50.00")
            && t.contains("cluster 1 failed")
            && t.contains("pipe 0 failed"),
        "{t}"
    );
    // Every line is also a log row.
    assert_eq!(env.count("SELECT count(*) FROM pipeline_logs"), 8);
}

#[test]
fn event_lines_land_in_events_and_in_logs() {
    let env = Env::new();
    append(
        &env.path("e.jsonl"),
        &[format!(
            r#"{{"event": "checkpoint written", "level": "warning", "event_type": "checkpoint_saved", "severity": "WARNING", "details": {{"rows": 12}}, "experiment_id": "{EXP}", "node_id": "n1"}}"#
        )],
    );
    once(&env, "[daemons.app]\nlogs = [\"$DIR/*.jsonl\"]\n");
    assert_eq!(
        env.sql("SELECT event_type || '|' || severity || '|' || message || '|' || (details->>'rows') || '|' || experiment_id || '|' || node_id || '|' || daemon FROM pipeline_events WHERE event_type = 'checkpoint_saved'"),
        format!("checkpoint_saved|WARNING|checkpoint written|12|{EXP}|n1|app")
    );
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_logs WHERE message = 'checkpoint written'"),
        1
    );
}

#[test]
fn text_lines_with_a_traceback_become_one_record() {
    let env = Env::new();
    append(
        &env.path("t.log"),
        &[
            "2026-11-28 10:00:00,123 INFO geo.tiles: starting".into(),
            "2026-11-28 10:00:01,000 ERROR geo.tiles: tile 7 failed".into(),
            "Traceback (most recent call last):".into(),
            "  File \"tiles.py\", line 3, in run".into(),
            "    explode()".into(),
            "ZeroDivisionError: division by zero".into(),
            "2026-11-28 10:00:02,000 INFO geo.tiles: carrying on".into(),
        ],
    );
    once(
        &env,
        "[daemons.app]\nlogs = [\"$DIR/*.log\"]\nformat = \"text\"\ntext_pattern = '^(?P<ts>\\S+ \\S+) (?P<level>[A-Z]+) (?P<logger>\\S+): (?P<message>.*)$'\n",
    );
    assert_eq!(env.count("SELECT count(*) FROM pipeline_logs"), 3);
    assert_eq!(
        env.sql("SELECT level || '|' || logger || '|' || to_char(ts AT TIME ZONE 'UTC', 'HH24:MI:SS') || '|' || split_part(traceback, E'\\n', 4) FROM pipeline_logs WHERE message = 'tile 7 failed'"),
        "ERROR|geo.tiles|10:00:01|ZeroDivisionError: division by zero"
    );
}

const RULES: &str = r#"[daemons.app]
logs = ["$DIR/logs/*.jsonl"]
experiment_id = "6f1c2a4e-0000-4000-8000-000000000001"

[[daemons.app.rules]]
match = 'Processed (?P<items_done>\d+)/(?P<items_total>\d+) tiles'
progress = { node_id = "tiles", parent_node_id = "clustering", level = "step", name = "Tile processing" }

[[daemons.app.rules]]
match = '^=== Stage: (?P<stage>\w+) ==='
set = { stage = "{stage}" }
sticky = true

[[daemons.app.rules]]
match = 'MemoryError'
event = { event_type = "out_of_memory", severity = "CRITICAL" }
stop = true

[[daemons.app.rules]]
match = 'Error'
event = { event_type = "some_error", severity = "ERROR" }
"#;

fn msg(m: &str) -> String {
    serde_json::json!({ "event": m, "level": "info" }).to_string()
}

#[test]
fn rules_derive_progress_events_and_a_sticky_stage_across_rotation_and_restarts() {
    let env = Env::new();
    std::fs::create_dir_all(env.path("logs")).unwrap();
    let log = env.path("logs/app.jsonl");
    append(
        &log,
        &[
            msg("=== Stage: clustering ==="),
            msg("Processed 4200/10000 tiles"),
            msg("MemoryError in merge"),
            msg("ValueError in tile"),
        ],
    );
    let cfg = env.config(RULES);
    let agent = env.spawn(&cfg);
    assert!(wait_until(Duration::from_secs(15), || env
        .count("SELECT count(*) FROM pipeline_logs")
        == 4));
    assert_eq!(
        env.sql(&format!("SELECT items_done || '/' || items_total || ' ' || progress_percent || ' ' || status FROM pipeline_progress WHERE experiment_id = '{EXP}' AND node_id = 'tiles'")),
        "4200/10000 42.00 running"
    );
    assert_eq!(env.sql(&format!("SELECT progress_percent FROM pipeline_progress WHERE experiment_id = '{EXP}' AND node_id = 'clustering'")), "42.00");
    // `stop` after the MemoryError rule: no second event for that line.
    assert_eq!(
        env.sql("SELECT string_agg(event_type || ':' || severity, ',' ORDER BY id) FROM pipeline_events WHERE daemon = 'app'"),
        "out_of_memory:CRITICAL,some_error:ERROR"
    );
    // Rotation by rename+create: the stage carries into the next file.
    std::fs::rename(&log, env.path("logs/app.jsonl.1")).unwrap();
    append(&log, &[msg("Processed 5000/10000 tiles")]);
    assert!(wait_until(Duration::from_secs(15), || env
        .count("SELECT count(*) FROM pipeline_logs")
        == 5));
    let (code, _, err) = agent.terminate();
    assert_eq!(code, Some(0), "{err}");
    // A restart: the stage is restored from the checkpoint.
    append(&log, &[msg("Processed 6000/10000 tiles")]);
    let agent = env.spawn(&cfg);
    assert!(wait_until(Duration::from_secs(15), || env
        .count("SELECT count(*) FROM pipeline_logs")
        == 6));
    agent.kill9();
    // And after kill -9.
    append(&log, &[msg("Processed 7000/10000 tiles")]);
    let agent = env.spawn(&cfg);
    assert!(wait_until(Duration::from_secs(15), || env
        .count("SELECT count(*) FROM pipeline_logs")
        == 7));
    let (code, _, err) = agent.terminate();
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_logs WHERE stage = 'clustering'"),
        7
    );
    assert_eq!(
        env.count("SELECT count(DISTINCT message) FROM pipeline_logs"),
        7
    );
    assert_eq!(
        env.sql(&format!("SELECT items_done FROM pipeline_progress WHERE experiment_id = '{EXP}' AND node_id = 'tiles'")),
        "7000"
    );
}
