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
        env.count(
            "SELECT count(*) FROM pipeline_events WHERE event_type = 'record_quarantined'"
        ),
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
    let _ = append;
}
