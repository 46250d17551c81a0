//! What the agent makes of records, end to end: bad input, the JSON formats recognised without
//! configuration, context precedence, progress, events, text with tracebacks, and metrics —
//! through the real binary into a real PostgreSQL, with exact row contents.

use crate::support::agent::{append, append_bytes, Env};

/// The rows of `query`, one string per row (columns joined by `|`).
fn rows(env: &Env, query: &str) -> Vec<String> {
    let out = env.sql(query);
    if out.is_empty() {
        Vec::new()
    } else {
        out.lines().map(str::to_string).collect()
    }
}

const EXP_A: &str = "6f1c2a4e-0000-4000-8000-00000000000a";
const EXP_B: &str = "6f1c2a4e-0000-4000-8000-00000000000b";
const EXP_C: &str = "6f1c2a4e-0000-4000-8000-00000000000c";

#[test]
fn bad_input_corpus_ships_every_complete_non_blank_line_with_the_reason() {
    let env = Env::new();
    let log = env.path("bad.jsonl");
    let mut b: Vec<u8> = Vec::new();
    let mut line = |bytes: &[u8]| {
        b.extend_from_slice(bytes);
        b.push(b'\n');
    };
    line(b"plain text, not json");
    line(b"nothing like json");
    line(br#"{"event": "broken", "#);
    line(b"[1,2]");
    line(br#""str""#);
    line(b"42");
    line(b"{\"event\": \"raw\x00nul\", \"seq\": 6}");
    line(br#"{"event": "esc\u0000aped", "k\u0000ey": "v\u0000al", "seq": 7}"#);
    line(b"{\"event\": \"bad \xff\xfe bytes\", \"seq\": 8}");
    // A 5 MiB line: a JSON object whose padding makes it exactly 5 * 2^20 bytes long.
    let head = br#"{"event": "huge line", "pad": ""#;
    let tail = br#""}"#;
    let mut big = head.to_vec();
    big.resize(5 * 1024 * 1024 - tail.len(), b'a');
    big.extend_from_slice(tail);
    assert_eq!(big.len(), 5_242_880);
    line(&big);
    line(&[&[b'['; 200][..], &[b']'; 200][..]].concat());
    line(br#"{"event": "too big a float", "n": 1e400}"#);
    line(br#"{"event": "big integer", "n": 123456789012345678901234567890}"#);
    line(br#"{"event": "epoch seconds", "timestamp": 1714564800}"#);
    line(br#"{"event": "epoch millis", "timestamp": 1714564800123}"#);
    line(br#"{"event": "python time", "timestamp": "2024-05-01 12:00:00,123"}"#);
    line(br#"{"event": "naive iso", "timestamp": "2024-05-01T12:00:00.5"}"#);
    line(br#"{"event": "nonsense time", "timestamp": "yesterday at noon"}"#);
    line(b"");
    line(b"   \t ");
    b.extend_from_slice(b"{\"event\": \"crlf\", \"seq\": 20}\r\n");
    b.extend_from_slice(b"\r\n");
    b.extend_from_slice(br#"{"event": "partial", "seq": 21"#);
    append_bytes(&log, &b);

    let cfg = env.config("[daemons.bad]\nlogs = [\"$DIR/*.jsonl\"]\n");
    env.run_once_ok(&cfg);

    let got = rows(
        &env,
        "SELECT left(message, 40), length(message), level, \
         coalesce(context->'_pipewatch'->>'parse_error', '-'), \
         (context - '_pipewatch')::text, \
         coalesce(((context->'_pipewatch') - 'parse_error')::text, '-') \
         FROM pipeline_logs WHERE daemon = 'bad' ORDER BY id",
    );
    let expected = [
        "plain text, not json|20|INFO|not JSON|{}|{}",
        // A line starting like `null`, `true` or `false` is tried as JSON and said to be invalid.
        "nothing like json|17|INFO|invalid JSON: expected ident at line 1 column 2|{}|{}",
        r#"{"event": "broken", |20|INFO|invalid JSON: EOF while parsing a value at line 1 column 20|{}|{}"#,
        "[1,2]|5|INFO|JSON array is not an object|{}|{}",
        r#""str"|5|INFO|JSON string is not an object|{}|{}"#,
        "42|2|INFO|JSON number is not an object|{}|{}",
        r#"rawnul|6|INFO|-|{"seq": 6}|{"nul_removed": true}"#,
        r#"escaped|7|INFO|-|{"key": "val", "seq": 7}|{"nul_removed": true}"#,
        "bad \u{fffd}\u{fffd} bytes|12|INFO|-|{\"seq\": 8}|{\"invalid_utf8\": true}",
        r#"{"event": "huge line", "pad": "aaaaaaaaa|1048576|INFO|-|{}|{"truncated_from_bytes": 5242880}"#,
        "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[|400|INFO|invalid JSON: recursion limit exceeded at line 1 column 128|{}|{}",
        r#"{"event": "too big a float", "n": 1e400}|40|INFO|invalid JSON: number out of range at line 1 column 39|{}|{}"#,
        r#"big integer|11|INFO|-|{"n": 123456789012345680000000000000}|-"#,
        "epoch seconds|13|INFO|-|{}|-",
        "epoch millis|12|INFO|-|{}|-",
        "python time|11|INFO|-|{}|-",
        "naive iso|9|INFO|-|{}|-",
        r#"nonsense time|13|INFO|-|{"timestamp": "yesterday at noon"}|{"ts_error": "cannot read `timestamp` as a time"}"#,
        r#"crlf|4|INFO|-|{"seq": 20}|-"#,
    ];
    assert_eq!(got, expected);

    // Record times: the record's own, read in each of the accepted shapes; read time otherwise.
    let ts = rows(
        &env,
        "SELECT message, to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') \
         FROM pipeline_logs WHERE daemon = 'bad' AND message IN \
         ('epoch seconds', 'epoch millis', 'python time', 'naive iso') ORDER BY id",
    );
    assert_eq!(
        ts,
        [
            "epoch seconds|2024-05-01 12:00:00.000000",
            "epoch millis|2024-05-01 12:00:00.123000",
            "python time|2024-05-01 12:00:00.123000",
            "naive iso|2024-05-01 12:00:00.500000",
        ]
    );
    assert_eq!(
        env.count(
            "SELECT count(*) FROM pipeline_logs WHERE daemon = 'bad' \
             AND message = 'nonsense time' AND ts > now() - interval '5 minutes'"
        ),
        1,
        "a record without a readable time gets its read time"
    );
    // Nothing was set aside.
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_events WHERE event_type = 'record_quarantined'"),
        0
    );
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_logs WHERE context->'_pipewatch' ? 'quarantined'"),
        0
    );

    // The partial last line is shipped once its newline arrives, and only then.
    append_bytes(&log, b"}\n");
    env.run_once_ok(&cfg);
    assert_eq!(
        rows(
            &env,
            "SELECT message, context::text FROM pipeline_logs WHERE daemon = 'bad' \
             AND id > (SELECT max(id) FROM pipeline_logs WHERE message = 'crlf')"
        ),
        [r#"partial|{"seq": 21}"#]
    );
}

#[test]
fn known_formats_are_recognised_without_configuration() {
    let env = Env::new();
    let lines = [
        // structlog
        format!(
            r#"{{"event": "tile done", "level": "warning", "timestamp": "2024-05-01T12:00:01.250000Z", "logger": "geo.tiles", "experiment_id": "{EXP_A}", "tile": 7}}"#
        ),
        // python-json-logger with exc_info
        r#"{"asctime": "2024-05-01 12:00:02,500", "levelname": "ERROR", "name": "geo.io", "message": "write failed", "exc_info": "Traceback (most recent call last):\n  File \"io.py\", line 9, in write\nOSError: disk full"}"#.to_string(),
        // loguru serialize=True: the traceback is in `text`, `record.exception.traceback` is true
        format!(
            r#"{{"text": "2024-05-01 12:00:03.000 | ERROR    | geo.loguru:run:10 - loguru failed\nTraceback (most recent call last):\n  File \"l.py\", line 10, in run\nValueError: bad\n", "record": {{"elapsed": {{"repr": "0:00:01.000000", "seconds": 1.0}}, "exception": {{"type": "ValueError", "value": "bad", "traceback": true}}, "extra": {{"experiment_id": "{EXP_B}", "node_id": "n7"}}, "file": {{"name": "l.py", "path": "/app/l.py"}}, "function": "run", "level": {{"icon": "x", "name": "ERROR", "no": 40}}, "line": 10, "message": "loguru failed", "module": "l", "name": "geo.loguru", "process": {{"id": 42, "name": "MainProcess"}}, "thread": {{"id": 1, "name": "MainThread"}}, "time": {{"repr": "2024-05-01 12:00:03.000000+00:00", "timestamp": 1714564803.0}}}}}}"#
        ),
        // ECS
        r#"{"@timestamp": "2024-05-01T12:00:04.000Z", "log.level": "error", "message": "ecs failed", "ecs.version": "1.6.0", "log": {"logger": "geo.ecs"}, "error": {"type": "KeyError", "message": "'k'", "stack_trace": "Traceback (most recent call last):\nKeyError: 'k'"}}"#.to_string(),
        // pino
        r#"{"level": 50, "time": 1714564805000, "pid": 1, "hostname": "h1", "name": "geo.pino", "msg": "pino failed", "err": {"type": "Error", "message": "boom", "stack": "Error: boom\n    at f (x.js:1:1)"}}"#.to_string(),
    ];
    append(&env.path("fmt.jsonl"), &lines);
    let cfg = env.config("[daemons.fmt]\nlogs = [\"$DIR/*.jsonl\"]\n");
    env.run_once_ok(&cfg);
    let got = rows(
        &env,
        "SELECT level, message, logger, replace(coalesce(traceback, '-'), E'\\n', '\\n'), \
         to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS'), \
         coalesce(experiment_id::text, '-'), coalesce(node_id, '-') \
         FROM pipeline_logs WHERE daemon = 'fmt' ORDER BY id",
    );
    assert_eq!(
        got,
        [
            format!("WARNING|tile done|geo.tiles|-|2024-05-01 12:00:01.250|{EXP_A}|-"),
            r#"ERROR|write failed|geo.io|Traceback (most recent call last):\n  File "io.py", line 9, in write\nOSError: disk full|2024-05-01 12:00:02.500|-|-"#.to_string(),
            format!(r#"ERROR|loguru failed|geo.loguru|Traceback (most recent call last):\n  File "l.py", line 10, in run\nValueError: bad|2024-05-01 12:00:03.000|{EXP_B}|n7"#),
            r#"ERROR|ecs failed|geo.ecs|Traceback (most recent call last):\nKeyError: 'k'|2024-05-01 12:00:04.000|-|-"#.to_string(),
            r#"ERROR|pino failed|geo.pino|Error: boom\n    at f (x.js:1:1)|2024-05-01 12:00:05.000|-|-"#.to_string(),
        ]
    );
    // What is not mapped to a column stays in context; none of them failed to parse.
    assert_eq!(
        env.count(
            "SELECT count(*) FROM pipeline_logs WHERE daemon = 'fmt' AND context ? '_pipewatch'"
        ),
        0
    );
    assert_eq!(
        rows(
            &env,
            "SELECT context->>'tile', context->>'pid', context->>'hostname' \
             FROM pipeline_logs WHERE daemon = 'fmt' AND message IN ('tile done', 'pino failed') \
             ORDER BY id"
        ),
        ["7||", "|1|h1"]
    );
}

#[test]
fn context_precedence_record_then_path_then_daemon_default() {
    let env = Env::new();
    std::fs::create_dir_all(env.path(EXP_B)).unwrap();
    std::fs::create_dir_all(env.path("plain")).unwrap();
    append(
        &env.path(&format!("{EXP_B}/node9.jsonl")),
        &[
            format!(r#"{{"event": "own", "experiment_id": "{EXP_A}"}}"#),
            r#"{"event": "from path"}"#.to_string(),
            r#"{"event": "not a uuid", "experiment_id": "exp-42"}"#.to_string(),
            r#"{"event": "in context", "context": {"node_id": "ctx-node", "stage": "ctx-stage", "k": 1}}"#.to_string(),
            format!(r#"{{"event": "in extra", "extra": {{"node_id": "extra-node", "stage": "extra-stage", "experiment_id": "{EXP_A}"}}}}"#),
            r#"{"event": "top wins", "node_id": "top", "context": {"node_id": "ctx"}}"#.to_string(),
        ],
    );
    append(
        &env.path("plain/other.jsonl"),
        &[r#"{"event": "default"}"#.to_string()],
    );
    let cfg = env.config(&format!(
        "[daemons.ctx]\nlogs = [\"$DIR/*/*.jsonl\"]\n\
         path_pattern = '/(?P<experiment_id>[0-9a-f-]{{36}})/(?P<node_id>[^/]+)\\.jsonl$'\n\
         experiment_id = \"{EXP_C}\"\n"
    ));
    env.run_once_ok(&cfg);
    let got = rows(
        &env,
        "SELECT message, experiment_id, coalesce(node_id, '-'), coalesce(stage, '-'), \
         context::text FROM pipeline_logs WHERE daemon = 'ctx' ORDER BY message",
    );
    assert_eq!(
        got,
        [
            format!("default|{EXP_C}|-|-|{{}}"),
            format!("from path|{EXP_B}|node9|-|{{}}"),
            format!("in context|{EXP_B}|ctx-node|ctx-stage|{{\"k\": 1}}"),
            format!("in extra|{EXP_A}|extra-node|extra-stage|{{}}"),
            format!("not a uuid|{EXP_B}|node9|-|{{\"experiment_id\": \"exp-42\"}}"),
            format!("own|{EXP_A}|node9|-|{{}}"),
            format!("top wins|{EXP_B}|top|-|{{\"node_id\": \"ctx\"}}"),
        ]
    );
}

/// A JSON line at second `sec` of 2024-05-01 12:00 carrying a `progress` object.
fn progress_line(sec: u32, progress: &str) -> String {
    format!(
        r#"{{"event": "progress at {sec}", "timestamp": "2024-05-01T12:00:{sec:02}Z", "progress": {progress}}}"#
    )
}

/// The progress rows of `EXP_A`: node, parent, level, status, percent, items done/total.
fn progress_rows(env: &Env) -> Vec<String> {
    rows(
        env,
        &format!(
            "SELECT node_id, coalesce(parent_node_id, '-'), level, status, coalesce(progress_percent::numeric(5,2)::text, '-'), \
             coalesce(items_done::text, '-'), coalesce(items_total::text, '-') \
             FROM pipeline_progress WHERE experiment_id = '{EXP_A}' ORDER BY node_id"
        ),
    )
}

fn progress_cfg(env: &Env) -> std::path::PathBuf {
    env.config(&format!(
        "[daemons.prog]\nlogs = [\"$DIR/*.jsonl\"]\nexperiment_id = \"{EXP_A}\"\n"
    ))
}

#[test]
fn progress_objects_build_a_tree_that_the_trigger_aggregates() {
    let env = Env::new();
    let log = env.path("prog.jsonl");
    append(
        &log,
        &[
            progress_line(
                0,
                r#"{"node_id": "pipe", "level": "pipeline", "name": "Pipeline", "status": "running"}"#,
            ),
            progress_line(
                1,
                r#"{"node_id": "ph1", "parent_node_id": "pipe", "level": "phase", "status": "running"}"#,
            ),
            progress_line(
                1,
                r#"{"node_id": "ph2", "parent_node_id": "pipe", "level": "phase", "status": "pending"}"#,
            ),
            progress_line(
                2,
                r#"{"node_id": "s1", "parent_node_id": "ph1", "level": "step", "items_done": 50, "items_total": 200}"#,
            ),
            progress_line(
                3,
                r#"{"node_id": "s2", "parent_node_id": "ph1", "level": "step", "status": "completed"}"#,
            ),
            progress_line(
                4,
                r#"{"node_id": "s3", "parent_node_id": "ph2", "level": "step", "status": "pending"}"#,
            ),
        ],
    );
    let cfg = progress_cfg(&env);
    env.run_once_ok(&cfg);
    assert_eq!(
        progress_rows(&env),
        [
            "ph1|pipe|phase|running|62.50|-|-",
            "ph2|pipe|phase|pending|0.00|-|-",
            "pipe|-|pipeline|running|31.25|-|-",
            "s1|ph1|step|running|25.00|50|200",
            "s2|ph1|step|completed|100.00|-|-",
            "s3|ph2|step|pending|-|-|-",
        ]
    );
    // Every progress record is also a log record.
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_logs WHERE daemon = 'prog'"),
        6
    );
    // The step finishes, then the other phase's step fails: failure walks up to the root.
    append(
        &log,
        &[
            progress_line(5, r#"{"node_id": "s1", "items_done": 200}"#),
            progress_line(6, r#"{"node_id": "s1", "status": "completed"}"#),
            progress_line(7, r#"{"node_id": "s3", "status": "failed", "percent": 10}"#),
        ],
    );
    env.run_once_ok(&cfg);
    assert_eq!(
        progress_rows(&env),
        [
            "ph1|pipe|phase|completed|100.00|-|-",
            "ph2|pipe|phase|failed|10.00|-|-",
            "pipe|-|pipeline|failed|55.00|-|-",
            "s1|ph1|step|completed|100.00|200|200",
            "s2|ph1|step|completed|100.00|-|-",
            "s3|ph2|step|failed|10.00|-|-",
        ]
    );
}

#[test]
fn an_older_progress_update_never_overwrites_a_newer_one() {
    let env = Env::new();
    let log = env.path("prog.jsonl");
    let cfg = progress_cfg(&env);
    append(
        &log,
        &[
            progress_line(
                10,
                r#"{"node_id": "s1", "level": "step", "items_done": 100, "items_total": 200}"#,
            ),
            // Older: ignored, within the same file and run.
            progress_line(5, r#"{"node_id": "s1", "items_done": 20}"#),
            // Equal times: the later line wins.
            progress_line(20, r#"{"node_id": "s1", "items_done": 120}"#),
            progress_line(20, r#"{"node_id": "s1", "items_done": 140}"#),
        ],
    );
    env.run_once_ok(&cfg);
    assert_eq!(progress_rows(&env), ["s1|-|step|running|70.00|140|200"]);
    let updated = || {
        env.sql(&format!(
            "SELECT to_char(updated_at AT TIME ZONE 'UTC', 'HH24:MI:SS') FROM pipeline_progress \
             WHERE experiment_id = '{EXP_A}' AND node_id = 's1'"
        ))
    };
    assert_eq!(updated(), "12:00:20");
    // Older again, in a later run: ignored too.
    append(
        &log,
        &[progress_line(
            15,
            r#"{"node_id": "s1", "items_done": 10, "status": "failed"}"#,
        )],
    );
    env.run_once_ok(&cfg);
    assert_eq!(progress_rows(&env), ["s1|-|step|running|70.00|140|200"]);
    assert_eq!(updated(), "12:00:20");
    // Equal to the stored time, in a later run: the later line wins.
    append(
        &log,
        &[progress_line(20, r#"{"node_id": "s1", "items_done": 150}"#)],
    );
    env.run_once_ok(&cfg);
    assert_eq!(progress_rows(&env), ["s1|-|step|running|75.00|150|200"]);
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_logs WHERE daemon = 'prog'"),
        6
    );
}

#[test]
fn an_older_progress_update_is_not_applied_when_a_newer_one_follows_it_in_the_same_batch() {
    let env = Env::new();
    let log = env.path("prog.jsonl");
    let cfg = progress_cfg(&env);
    append(
        &log,
        &[progress_line(
            20,
            r#"{"node_id": "s1", "level": "step", "items_done": 100, "items_total": 200}"#,
        )],
    );
    env.run_once_ok(&cfg);
    // In one batch: an update older than the stored row, then a newer one that says less.
    append(
        &log,
        &[
            progress_line(
                10,
                r#"{"node_id": "s1", "status": "failed", "items_total": 1000}"#,
            ),
            progress_line(30, r#"{"node_id": "s1", "items_done": 150}"#),
        ],
    );
    env.run_once_ok(&cfg);
    assert_eq!(progress_rows(&env), ["s1|-|step|running|75.00|150|200"]);
}

#[test]
fn a_progress_node_without_a_percent_is_not_stored_as_100_percent() {
    let env = Env::new();
    append(
        &env.path("prog.jsonl"),
        &[
            progress_line(
                1,
                r#"{"node_id": "queued", "level": "step", "status": "pending"}"#,
            ),
            progress_line(
                2,
                r#"{"node_id": "busy", "level": "step", "status": "running"}"#,
            ),
            progress_line(3, r#"{"node_id": "busy", "name": "Busy step"}"#),
        ],
    );
    env.run_once_ok(&progress_cfg(&env));
    assert_eq!(
        progress_rows(&env),
        ["busy|-|step|running|-|-|-", "queued|-|step|pending|-|-|-"]
    );
}

#[test]
fn event_records_land_in_events_and_in_logs() {
    let env = Env::new();
    append(
        &env.path("ev.jsonl"),
        &[
            format!(
                r#"{{"event": "checkpoint saved", "event_type": "checkpoint_saved", "severity": "info", "details": {{"path": "/data/ck1", "bytes": 1024}}, "timestamp": "2024-05-01T12:00:00Z", "experiment_id": "{EXP_A}", "node_id": "n1"}}"#
            ),
            r#"{"message": "disk almost full", "event_type": "disk_warning", "severity": "WARNING", "details": 97, "timestamp": "2024-05-01T12:00:01Z"}"#.to_string(),
            r#"{"event": "not an event", "event_type": 5}"#.to_string(),
        ],
    );
    let cfg = env.config("[daemons.ev]\nlogs = [\"$DIR/*.jsonl\"]\n");
    env.run_once_ok(&cfg);
    assert_eq!(
        rows(
            &env,
            "SELECT to_char(ts AT TIME ZONE 'UTC', 'HH24:MI:SS'), coalesce(experiment_id::text, '-'), \
             coalesce(node_id, '-'), event_type, severity, message, details::text, host \
             FROM pipeline_events WHERE daemon = 'ev' ORDER BY ts"
        ),
        [
            format!(r#"12:00:00|{EXP_A}|n1|checkpoint_saved|INFO|checkpoint saved|{{"path": "/data/ck1", "bytes": 1024}}|test-host"#),
            r#"12:00:01|-|-|disk_warning|WARNING|disk almost full|{"value": 97}|test-host"#.to_string(),
        ]
    );
    assert_eq!(
        rows(
            &env,
            "SELECT level, message, context::text FROM pipeline_logs WHERE daemon = 'ev' ORDER BY id"
        ),
        [
            "INFO|checkpoint saved|{}",
            "WARNING|disk almost full|{}",
            r#"INFO|not an event|{"event_type": 5}"#,
        ]
    );
}

#[test]
fn text_lines_with_a_traceback_become_one_record_each() {
    let env = Env::new();
    append(
        &env.path("app.log"),
        &[
            "2024-05-01 12:00:00,123 INFO geo.cluster: starting".to_string(),
            "2024-05-01 12:00:01,000 ERROR geo.cluster: tile failed".to_string(),
            "Traceback (most recent call last):".to_string(),
            r#"  File "c.py", line 3, in run"#.to_string(),
            "    do()".to_string(),
            "ValueError: bad tile".to_string(),
            "2024-05-01 12:00:02,000 WARNING geo.io: continuing".to_string(),
        ],
    );
    let cfg = env.config(
        "[daemons.txt]\nlogs = [\"$DIR/*.log\"]\nformat = \"text\"\n\
         text_pattern = '^(?P<ts>\\S+ \\S+) (?P<level>[A-Z]+) (?P<logger>\\S+): (?P<message>.*)$'\n",
    );
    env.run_once_ok(&cfg);
    assert_eq!(
        rows(
            &env,
            "SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS'), level, logger, message, \
             replace(coalesce(traceback, '-'), E'\\n', '\\n'), context::text \
             FROM pipeline_logs WHERE daemon = 'txt' ORDER BY id"
        ),
        [
            "2024-05-01 12:00:00.123|INFO|geo.cluster|starting|-|{}",
            r#"2024-05-01 12:00:01.000|ERROR|geo.cluster|tile failed|Traceback (most recent call last):\n  File "c.py", line 3, in run\n    do()\nValueError: bad tile|{}"#,
            "2024-05-01 12:00:02.000|WARNING|geo.io|continuing|-|{}",
        ]
    );
}

#[test]
fn once_takes_one_metrics_sample_per_daemon_with_its_latest_experiment() {
    let env = Env::new();
    append(
        &env.path("a.jsonl"),
        &[
            format!(r#"{{"event": "first", "experiment_id": "{EXP_A}"}}"#),
            format!(r#"{{"event": "second", "experiment_id": "{EXP_B}", "node_id": "nb"}}"#),
            r#"{"event": "third, without one"}"#.to_string(),
        ],
    );
    append(&env.path("b.log"), &[r#"{"event": "b"}"#.to_string()]);
    let cfg = env.config(&format!(
        "[daemons.alpha]\nlogs = [\"$DIR/*.jsonl\"]\n\n\
         [daemons.beta]\nlogs = [\"$DIR/*.log\"]\nexperiment_id = \"{EXP_C}\"\n\n\
         [daemons.gamma]\nlogs = [\"$DIR/*.none\"]\n"
    ));
    env.run_once_ok(&cfg);
    // The experiment is the latest one seen; the node is the last record's (it has none).
    assert_eq!(
        rows(
            &env,
            "SELECT daemon, coalesce(experiment_id::text, '-'), coalesce(node_id, '-'), \
             CASE WHEN pid IS NULL THEN '-' ELSE 'pid' END, host FROM pipeline_metrics ORDER BY daemon"
        ),
        [
            format!("alpha|{EXP_B}|-|-|test-host"),
            format!("beta|{EXP_C}|-|-|test-host"),
            "gamma|-|-|-|test-host".to_string(),
            "pipewatch|-|-|pid|test-host".to_string(),
        ]
    );
}
