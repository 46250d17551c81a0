//! Rules end to end: progress, events and sticky context derived from plain log lines, through
//! the real binary into a real PostgreSQL — including rotation, restarts and `kill -9` under a
//! running agent, and text-format lines parsed with `text_pattern`.

use crate::support::agent::{append, wait_until, Env};
use std::time::Duration;

const EXP: &str = "6f1c2a4e-0000-4000-8000-0000000000e1";

/// The rows of `query`, one string per row (columns joined by `|`).
fn rows(env: &Env, query: &str) -> Vec<String> {
    let out = env.sql(query);
    if out.is_empty() {
        Vec::new()
    } else {
        out.lines().map(str::to_string).collect()
    }
}

/// A structlog-style line with `message` at second `sec` of 2024-05-01 12:00.
fn line(sec: u32, message: &str) -> String {
    format!(
        r#"{{"event": "{message}", "level": "info", "logger": "geo.cluster", "timestamp": "2024-05-01T12:00:{sec:02}Z"}}"#
    )
}

/// The progress rows of `EXP`: node, parent, level, status, percent, items done/total.
fn progress_rows(env: &Env) -> Vec<String> {
    rows(
        env,
        &format!(
            "SELECT node_id, coalesce(parent_node_id, '-'), level, status, \
             coalesce(progress_percent::numeric(5,2)::text, '-'), \
             coalesce(items_done::text, '-'), coalesce(items_total::text, '-') \
             FROM pipeline_progress WHERE experiment_id = '{EXP}' ORDER BY node_id"
        ),
    )
}

const PROGRESS_RULES: &str = r#"
[[daemons.clu.rules]]
match = 'Processed (?P<items_done>\d+)/(?P<items_total>\d+) tiles'
progress = { node_id = "tiles", parent_node_id = "clustering", level = "step", name = "Tile processing" }

[[daemons.clu.rules]]
match = '^Tiles done$'
progress = { node_id = "tiles", status = "completed" }

[[daemons.clu.rules]]
match = '^Tiles (?P<status>failed|cancelled)$'
progress = { node_id = "tiles" }

[[daemons.clu.rules]]
match = 'Indexing (?P<percent>[\d.]+)%'
progress = { node_id = "index", parent_node_id = "clustering", level = "step", status = "running" }
"#;

#[test]
fn progress_from_plain_messages_with_derived_percent_and_status_transitions() {
    let env = Env::new();
    let log = env.path("clu.jsonl");
    let cfg = env.config(&format!(
        "[daemons.clu]\nlogs = [\"$DIR/*.jsonl\"]\nexperiment_id = \"{EXP}\"\n{PROGRESS_RULES}"
    ));
    append(&log, &[line(1, "Processed 4200/10000 tiles")]);
    env.run_once_ok(&cfg);
    assert_eq!(
        progress_rows(&env),
        [
            "clustering|-|phase|running|42.00|-|-",
            "tiles|clustering|step|running|42.00|4200|10000",
        ]
    );
    append(
        &log,
        &[
            line(2, "Indexing 10%"),
            line(3, "Processed 10000/10000 tiles"),
            line(4, "Tiles done"),
        ],
    );
    env.run_once_ok(&cfg);
    assert_eq!(
        progress_rows(&env),
        [
            "clustering|-|phase|running|55.00|-|-",
            "index|clustering|step|running|10.00|-|-",
            "tiles|clustering|step|completed|100.00|10000|10000",
        ]
    );
    assert_eq!(
        env.sql(&format!(
            "SELECT name || '|' || to_char(started_at AT TIME ZONE 'UTC', 'HH24:MI:SS') || '|' || \
             to_char(completed_at AT TIME ZONE 'UTC', 'HH24:MI:SS') FROM pipeline_progress \
             WHERE experiment_id = '{EXP}' AND node_id = 'tiles'"
        )),
        "Tile processing|12:00:01|12:00:04"
    );
    append(&log, &[line(5, "Indexing 40.5%"), line(6, "Tiles failed")]);
    env.run_once_ok(&cfg);
    assert_eq!(
        progress_rows(&env),
        [
            "clustering|-|phase|failed|70.25|-|-",
            "index|clustering|step|running|40.50|-|-",
            "tiles|clustering|step|failed|100.00|10000|10000",
        ]
    );
    // Each line is still a log record of its own.
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_logs WHERE daemon = 'clu'"),
        6
    );
}

#[test]
fn events_from_messages_every_matching_rule_applies_until_stop() {
    let env = Env::new();
    append(
        &env.path("clu.jsonl"),
        &[
            line(1, "worker died: MemoryError in tile 7"),
            line(2, "retrying tile 9"),
            line(3, "tile 3 ok"),
            line(4, "nothing to see"),
        ],
    );
    let cfg = env.config(&format!(
        r#"[daemons.clu]
logs = ["$DIR/*.jsonl"]
experiment_id = "{EXP}"

[[daemons.clu.rules]]
match = 'MemoryError|Killed process|Out of memory'
event = {{ event_type = "out_of_memory", severity = "CRITICAL" }}

[[daemons.clu.rules]]
match = 'tile (?P<tile>\d+)'
set = {{ tile = "{{tile}}" }}

[[daemons.clu.rules]]
match = '^retrying tile (?P<t>\d+)'
event = {{ event_type = "retry", severity = "WARNING", message = "retry by {{record.logger}}", details = {{ tile = "{{t}}", earlier_set = "{{record.context.tile}}" }} }}
stop = true

[[daemons.clu.rules]]
match = 'tile'
set = {{ seen = "yes" }}
"#
    ));
    env.run_once_ok(&cfg);
    // Rules see the record as it was before any rule applied: `{record.context.tile}` is empty
    // although an earlier rule sets `tile` on the same record.
    assert_eq!(
        rows(
            &env,
            "SELECT to_char(ts AT TIME ZONE 'UTC', 'HH24:MI:SS'), experiment_id, event_type, \
             severity, message, details::text FROM pipeline_events WHERE daemon = 'clu' ORDER BY ts"
        ),
        [
            format!("12:00:01|{EXP}|out_of_memory|CRITICAL|worker died: MemoryError in tile 7|{{}}"),
            format!("12:00:02|{EXP}|retry|WARNING|retry by geo.cluster|{{\"tile\": \"9\", \"earlier_set\": \"\"}}"),
        ]
    );
    assert_eq!(
        rows(
            &env,
            "SELECT message, level, context::text FROM pipeline_logs WHERE daemon = 'clu' ORDER BY ts"
        ),
        [
            r#"worker died: MemoryError in tile 7|INFO|{"seen": "yes", "tile": "7"}"#,
            r#"retrying tile 9|INFO|{"tile": "9"}"#,
            r#"tile 3 ok|INFO|{"seen": "yes", "tile": "3"}"#,
            "nothing to see|INFO|{}",
        ]
    );
}

const STICKY_CFG: &str = r#"[daemons.clu]
logs = ["$DIR/*.jsonl"]

[[daemons.clu.rules]]
match = '^=== Stage: (?P<stage>\w+) ==='
set = { stage = "{stage}" }
sticky = true
"#;

/// The stage of the record with `message` ('-' for none); empty when it has not landed.
fn stage_of(env: &Env, message: &str) -> String {
    env.sql(&format!(
        "SELECT coalesce(stage, '-') FROM pipeline_logs WHERE daemon = 'clu' AND message = '{message}'"
    ))
}

/// Waits until the record with `message` has landed; returns its stage.
fn landed(env: &Env, message: &str) -> String {
    assert!(
        wait_until(Duration::from_secs(15), || !stage_of(env, message)
            .is_empty()),
        "record {message:?} did not land"
    );
    stage_of(env, message)
}

#[test]
fn sticky_stage_survives_rotation_restart_and_kill9() {
    let env = Env::new();
    let log = env.path("clu.jsonl");
    let cfg = env.config(STICKY_CFG);
    append(
        &log,
        &[
            line(0, "before"),
            line(1, "=== Stage: clustering ==="),
            line(2, "a1"),
        ],
    );
    let agent = env.spawn(&cfg);
    assert_eq!(landed(&env, "a1"), "clustering");
    assert_eq!(stage_of(&env, "before"), "-");
    assert_eq!(stage_of(&env, "=== Stage: clustering ==="), "clustering");

    // (a) Rotation by rename + create while the agent runs: the new file inherits the stage.
    append(&log, &[line(3, "a2")]);
    std::fs::rename(&log, env.path("clu.jsonl.1")).unwrap();
    append(&log, &[line(4, "b1")]);
    assert_eq!(landed(&env, "b1"), "clustering");
    assert_eq!(landed(&env, "a2"), "clustering");

    // (b) SIGTERM, more lines, start again: the new lines still carry the stage.
    let (code, _, stderr) = agent.terminate();
    assert_eq!(code, Some(0), "{stderr}");
    append(&log, &[line(5, "c1")]);
    let agent = env.spawn(&cfg);
    assert_eq!(landed(&env, "c1"), "clustering");

    // (c) kill -9 after the lines were committed, then start again.
    append(&log, &[line(6, "d1")]);
    assert_eq!(landed(&env, "d1"), "clustering");
    agent.kill9();
    append(&log, &[line(7, "e1")]);
    let agent = env.spawn(&cfg);
    assert_eq!(landed(&env, "e1"), "clustering");

    // A new stage replaces it.
    append(&log, &[line(8, "=== Stage: refine ==="), line(9, "f1")]);
    assert_eq!(landed(&env, "f1"), "refine");
    let (code, _, stderr) = agent.terminate();
    assert_eq!(code, Some(0), "{stderr}");
    // Every line exactly once.
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_logs WHERE daemon = 'clu'"),
        10
    );
    assert_eq!(
        env.count("SELECT count(DISTINCT message) FROM pipeline_logs WHERE daemon = 'clu'"),
        10
    );
}

#[test]
fn rules_apply_to_text_lines_parsed_with_text_pattern() {
    let env = Env::new();
    append(
        &env.path("clu.log"),
        &[
            "2024-05-01 12:00:00,000 INFO geo.cluster: === Stage: tiling ===".to_string(),
            "2024-05-01 12:00:01,000 INFO geo.cluster: Processed 25/100 tiles".to_string(),
            "2024-05-01 12:00:02,000 ERROR geo.cluster: tile failed".to_string(),
            "Traceback (most recent call last):".to_string(),
            r#"  File "c.py", line 3, in run"#.to_string(),
            "MemoryError".to_string(),
            "2024-05-01 12:00:03,000 WARNING geo.io: slow disk".to_string(),
        ],
    );
    let cfg = env.config(&format!(
        r#"[daemons.clu]
logs = ["$DIR/*.log"]
format = "text"
text_pattern = '^(?P<ts>\S+ \S+) (?P<level>[A-Z]+) (?P<logger>\S+): (?P<message>.*)$'
experiment_id = "{EXP}"

[[daemons.clu.rules]]
match = 'Processed (?P<items_done>\d+)/(?P<items_total>\d+) tiles'
progress = {{ node_id = "tiles", parent_node_id = "clustering", level = "step" }}

[[daemons.clu.rules]]
match = '^=== Stage: (?P<stage>\w+) ==='
set = {{ stage = "{{stage}}" }}
sticky = true

[[daemons.clu.rules]]
match = 'MemoryError'
field = "traceback"
event = {{ event_type = "out_of_memory", severity = "CRITICAL" }}

[[daemons.clu.rules]]
match = '^geo\.io$'
field = "logger"
set = {{ node_id = "io" }}
"#
    ));
    env.run_once_ok(&cfg);
    assert_eq!(
        rows(
            &env,
            "SELECT to_char(ts AT TIME ZONE 'UTC', 'HH24:MI:SS'), level, logger, message, \
             coalesce(stage, '-'), coalesce(node_id, '-'), (traceback IS NOT NULL) \
             FROM pipeline_logs WHERE daemon = 'clu' ORDER BY ts"
        ),
        [
            "12:00:00|INFO|geo.cluster|=== Stage: tiling ===|tiling|-|f",
            "12:00:01|INFO|geo.cluster|Processed 25/100 tiles|tiling|-|f",
            "12:00:02|ERROR|geo.cluster|tile failed|tiling|-|t",
            "12:00:03|WARNING|geo.io|slow disk|tiling|io|f",
        ]
    );
    assert_eq!(
        rows(
            &env,
            "SELECT to_char(ts AT TIME ZONE 'UTC', 'HH24:MI:SS'), event_type, severity, message \
             FROM pipeline_events WHERE daemon = 'clu'"
        ),
        ["12:00:02|out_of_memory|CRITICAL|tile failed"]
    );
    assert_eq!(
        progress_rows(&env),
        [
            "clustering|-|phase|running|25.00|-|-",
            "tiles|clustering|step|running|25.00|25|100",
        ]
    );
}
