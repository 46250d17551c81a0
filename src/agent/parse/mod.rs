//! Parsing and normalising log lines into [`Record`]s. Never fails: what cannot be understood
//! becomes a record whose `context._pipewatch` says why. Nothing read is dropped; only blank
//! lines (empty or ASCII whitespace only) are not records.
//!
//! Pure: no file or network I/O, no database types, no regex compilation per line.
//!
//! - `json`: one JSON object → record (structlog, python-json-logger, loguru, ECS, pino).
//! - `text`: `text_pattern` captures → record; traceback and continuation line rules.
//! - `normalize`: NUL/UTF-8 cleaning, levels, timestamps.
//!
//! Offsets: each record comes with the file offset just after its last line. Blank lines
//! yield nothing, so a run of blank lines at the end of a file is not covered by any record's
//! offset; re-reading them after a restart is harmless since they are not records. While
//! [`Parser::holding`] is true the held record's lines must not be committed.

mod fast;
pub mod json;
pub mod normalize;
pub mod text;

use crate::agent::lines::{Line, LineRef};
use crate::config::Format;
use crate::model::Record;
use normalize::{clean_text, scrub_map, trim_partial_char, Cleaned};
use regex::Regex;
use serde_json::{Map, Value};

/// How a daemon's lines are to be read.
#[derive(Debug, Clone)]
pub struct ParseOptions {
    /// `auto`: JSON objects, and text lines through `text_pattern` when one is given.
    /// `json`: every line is expected to be a JSON object. `text`: every line is text.
    pub format: Format,
    /// Named captures of this regex fill a text line's fields (see [`text`]).
    pub text_pattern: Option<Regex>,
}

/// The most bytes a held text record collects from its continuation lines before it is
/// handed out and the rest starts a new record; bounds memory against endless tracebacks.
const MAX_HELD_BYTES: usize = 4 * 1024 * 1024;
/// The most continuation lines joined to one record.
const MAX_HELD_LINES: usize = 10_000;

/// The largest buffer the JSON fast path keeps between lines.
const MAX_SCRATCH_BYTES: usize = 64 * 1024;

/// A text record waiting for its continuation lines.
#[derive(Debug)]
struct Held {
    rec: Record,
    /// The file offset just after its last (non-blank) line.
    end: u64,
    /// Whether a traceback has started: every later continuation line goes to `traceback`.
    tb_started: bool,
    /// Inside a traceback, before its final `XxxError: msg` line.
    in_tb: bool,
    /// The message is a traceback's first line, to be replaced by its final line.
    message_is_tb_header: bool,
    /// Blank lines seen since the last joined line, re-inserted if another line is joined.
    blanks: usize,
    lines: usize,
    bytes: usize,
}

/// Per-file parser: turns lines into records. JSON lines yield a record at once. Text lines
/// (format=text, or auto with a text_pattern and a non-JSON line) are held so that
/// continuation lines can be joined to the record before them.
#[derive(Debug)]
pub struct Parser {
    opts: ParseOptions,
    held: Option<Held>,
    /// The JSON fast path's buffer, kept between lines.
    scratch: Vec<u8>,
}

impl Parser {
    pub fn new(opts: ParseOptions) -> Self {
        Parser {
            opts,
            held: None,
            scratch: Vec::new(),
        }
    }

    /// Returns the records completed by this line, each with the file offset just after its
    /// last line (the position that may be committed once it is shipped).
    pub fn push(&mut self, line: Line, out: &mut Vec<(Record, u64)>) {
        self.push_ref(line.as_line_ref(), out);
    }

    /// [`Parser::push`] for a borrowed line (what readers use: no copy of a JSON line).
    pub fn push_ref(&mut self, line: LineRef<'_>, out: &mut Vec<(Record, u64)>) {
        if is_blank(line.bytes) {
            if let Some(h) = &mut self.held {
                h.blanks += 1;
            }
            return;
        }
        let text_line = match self.opts.format {
            Format::Text => true,
            Format::Json => false,
            Format::Auto => {
                self.opts.text_pattern.is_some() && first_byte(line.bytes) != Some(b'{')
            }
        };
        if !text_line {
            self.flush(out);
            let rec = json_record(line.bytes, line.truncated_from, &mut self.scratch);
            out.push((rec, line.end));
            return;
        }
        self.push_text(line, out);
    }

    /// Hands over a held text record (called at EOF/idle, and at shutdown).
    pub fn flush(&mut self, out: &mut Vec<(Record, u64)>) {
        flush_held(&mut self.held, out);
    }

    /// True while a text record is held (so the offset it started at must not be committed).
    pub fn holding(&self) -> bool {
        self.held.is_some()
    }

    fn push_text(&mut self, line: LineRef<'_>, out: &mut Vec<(Record, u64)>) {
        let bytes = match line.truncated_from {
            Some(_) => trim_partial_char(line.bytes),
            None => line.bytes,
        };
        let (text, cleaned) = clean_text(bytes);
        let caps = self
            .opts
            .text_pattern
            .as_ref()
            .map(|re| (re, re.captures(&text)));
        let starts_record = match (&caps, &self.held) {
            (Some((_, Some(_))), _) => true,
            (Some((_, None)), held) => held.is_none(),
            (None, None) => true,
            (None, Some(h)) => {
                !(h.in_tb
                    || text::is_indented(&text)
                    || text::is_traceback_start(&text)
                    || text::is_chain_line(&text))
            }
        };
        if starts_record {
            flush_held(&mut self.held, out);
            let mut rec = match caps {
                Some((re, Some(c))) => text::record_from_captures(re, &c, &text),
                Some((_, None)) => {
                    let mut r = Record::new(text.as_ref());
                    let why = match self.opts.format {
                        Format::Auto => "not JSON and does not match text_pattern",
                        _ => "line does not match text_pattern",
                    };
                    r.note("parse_error", why);
                    r
                }
                None => Record::new(text.as_ref()),
            };
            add_notes(&mut rec, cleaned, line.truncated_from);
            let tb_start = text::is_traceback_start(&text);
            if tb_start {
                // A traceback with nothing before it: its final line will be the message.
                rec.traceback = Some(text.into_owned());
            }
            self.held = Some(Held {
                rec,
                end: line.end,
                tb_started: tb_start,
                in_tb: tb_start,
                message_is_tb_header: tb_start,
                blanks: 0,
                lines: 1,
                bytes: 0,
            });
            return;
        }
        let Some(h) = &mut self.held else {
            return; // Unreachable: a continuation needs a held record.
        };
        if h.lines >= MAX_HELD_LINES || h.bytes + text.len() > MAX_HELD_BYTES {
            // Hand out what was collected; this line starts a record of its own.
            h.rec.note("continued_in_next_record", true);
            self.flush(out);
            let mut rec = Record::new(text.as_ref());
            rec.note("continuation_of_previous_record", true);
            add_notes(&mut rec, cleaned, line.truncated_from);
            self.held = Some(Held {
                rec,
                end: line.end,
                tb_started: false,
                in_tb: false,
                message_is_tb_header: false,
                blanks: 0,
                lines: 1,
                bytes: 0,
            });
            return;
        }
        let tb_start = text::is_traceback_start(&text);
        let chain = text::is_chain_line(&text);
        if tb_start {
            h.tb_started = true;
            h.in_tb = true;
        } else if h.in_tb && !chain && !text::is_indented(&text) {
            // The final `XxxError: message` line of a traceback.
            h.in_tb = false;
        } else if chain {
            h.tb_started = true;
        }
        let target = if h.tb_started {
            h.rec.traceback.get_or_insert_with(String::new)
        } else {
            &mut h.rec.message
        };
        if !target.is_empty() {
            target.push('\n');
        }
        for _ in 0..h.blanks {
            target.push('\n');
        }
        target.push_str(&text);
        if h.message_is_tb_header && !h.in_tb {
            // A traceback standing alone: its final line says what happened.
            h.rec.message = text.to_string();
            h.message_is_tb_header = false;
        }
        h.blanks = 0;
        h.lines += 1;
        h.bytes += text.len();
        h.end = line.end;
        add_notes(&mut h.rec, cleaned, line.truncated_from);
    }
}

/// Stateless: one line to one record (None for blank lines). Text lines are not joined.
pub fn parse_line(line: &[u8], opts: &ParseOptions) -> Option<Record> {
    if is_blank(line) {
        return None;
    }
    let mut p = Parser::new(opts.clone());
    let mut out = Vec::with_capacity(1);
    p.push(
        Line {
            bytes: line.to_vec(),
            start: 0,
            end: line.len() as u64,
            truncated_from: None,
        },
        &mut out,
    );
    p.flush(&mut out);
    out.pop().map(|(mut r, _)| {
        r.expand_context();
        r
    })
}

fn flush_held(held: &mut Option<Held>, out: &mut Vec<(Record, u64)>) {
    if let Some(h) = held.take() {
        out.push((h.rec, h.end));
    }
}

fn is_blank(b: &[u8]) -> bool {
    b.iter().all(u8::is_ascii_whitespace)
}

fn first_byte(b: &[u8]) -> Option<u8> {
    b.iter().copied().find(|c| !c.is_ascii_whitespace())
}

fn add_notes(rec: &mut Record, cleaned: Cleaned, truncated_from: Option<u64>) {
    if let Some(n) = truncated_from {
        rec.note("truncated_from_bytes", n);
    }
    if cleaned.nul_removed {
        rec.note("nul_removed", true);
    }
    if cleaned.invalid_utf8 {
        rec.note("invalid_utf8", true);
    }
}

/// A record from a line read as JSON: the object's fields, or the line as the message with a
/// `parse_error` note.
fn json_record(bytes: &[u8], truncated_from: Option<u64>, scratch: &mut Vec<u8>) -> Record {
    if truncated_from.is_none() {
        let (text, cleaned) = clean_text(bytes);
        let fast = fast::record(&text, scratch);
        if scratch.capacity() > MAX_SCRATCH_BYTES {
            *scratch = Vec::new(); // One long line does not keep its buffer for good.
        }
        if let Some(mut rec) = fast {
            add_notes(&mut rec, cleaned, None);
            return rec;
        }
        return full_record(&text, cleaned);
    }
    json_record_full(bytes, truncated_from)
}

/// [`json_record`] without the fast path (what the fast path is compared with).
pub(crate) fn json_record_full(bytes: &[u8], truncated_from: Option<u64>) -> Record {
    if truncated_from.is_some() {
        // A truncated line is never valid JSON: ship the kept prefix.
        let (text, cleaned) = clean_text(trim_partial_char(bytes));
        let mut rec = Record::new(text.into_owned());
        add_notes(&mut rec, cleaned, truncated_from);
        return rec;
    }
    let (text, cleaned) = clean_text(bytes);
    full_record(&text, cleaned)
}

/// The record of a whole (not truncated) line's cleaned text, by the full JSON parser.
fn full_record(text: &str, cleaned: Cleaned) -> Record {
    let mut rec = match first_byte(text.as_bytes()) {
        Some(b'{') => match serde_json::from_str::<Map<String, Value>>(text) {
            Ok(mut map) => {
                // A `\u0000` escape decodes to NUL, which PostgreSQL refuses in text and jsonb.
                let nul = text.contains("\\u0000") && scrub_map(&mut map);
                let mut rec = json::record_from_object(map);
                if nul {
                    rec.note("nul_removed", true);
                }
                rec
            }
            Err(e) => invalid(text, format!("invalid JSON: {e}")),
        },
        Some(b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n') => {
            match serde_json::from_str::<Value>(text) {
                Ok(v) => invalid(text, format!("JSON {} is not an object", kind(&v))),
                Err(e) => invalid(text, format!("invalid JSON: {e}")),
            }
        }
        _ => invalid(text, "not JSON".to_string()),
    };
    add_notes(&mut rec, cleaned, None);
    rec
}

fn invalid(text: &str, why: String) -> Record {
    let mut r = Record::new(text);
    r.note("parse_error", why);
    r
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::lines::LineSplitter;
    use proptest::prelude::*;
    use serde_json::json;

    fn opts(format: Format, pattern: Option<&str>) -> ParseOptions {
        ParseOptions {
            format,
            text_pattern: pattern.map(|p| Regex::new(p).expect("test pattern compiles")),
        }
    }

    /// A record as JSON, leaving out empty fields, for exact comparisons.
    fn render(r: &Record) -> Value {
        let mut r = r.clone();
        r.expand_context();
        let r = &r;
        let mut m = Map::new();
        if let Some(t) = r.ts {
            m.insert(
                "ts".into(),
                t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
                    .into(),
            );
        }
        m.insert("level".into(), r.level.as_str().into());
        m.insert("message".into(), r.message.clone().into());
        let opt = [
            ("logger", r.logger.clone()),
            ("experiment_id", r.experiment_id.map(|u| u.to_string())),
            ("node_id", r.node_id.clone()),
            ("stage", r.stage.clone()),
            ("traceback", r.traceback.clone()),
        ];
        for (k, v) in opt {
            if let Some(v) = v {
                m.insert(k.into(), v.into());
            }
        }
        if !r.context.is_empty() {
            m.insert("context".into(), Value::Object(r.context.clone()));
        }
        if let Some(x) = &r.metrics {
            m.insert("metrics".into(), x.clone());
        }
        if let Some(p) = &r.progress {
            m.insert("progress".into(), format!("{p:?}").into());
        }
        if let Some(e) = &r.event {
            m.insert(
                "event".into(),
                json!([e.event_type, e.severity.as_str(), e.message, e.details]),
            );
        }
        Value::Object(m)
    }

    /// Feeds `input` through a splitter and a parser, flushes, and compares every record
    /// (rendered) and its offset with `expected`.
    fn check(o: &ParseOptions, input: &[u8], expected: Value) {
        let mut s = LineSplitter::new(0, 100);
        let mut lines = Vec::new();
        s.push(input, &mut lines);
        let mut p = Parser::new(o.clone());
        let mut out = Vec::new();
        for l in lines {
            p.push(l, &mut out);
        }
        p.flush(&mut out);
        assert!(!p.holding());
        let got: Vec<Value> = out.iter().map(|(r, end)| json!([render(r), end])).collect();
        assert_eq!(
            Value::Array(got),
            expected,
            "input {:?}",
            String::from_utf8_lossy(input)
        );
    }

    /// One JSON line in auto mode → the rendered record.
    fn check1(line: &str, expected: Value) {
        let o = opts(Format::Auto, None);
        let got = parse_line(line.as_bytes(), &o).map(|r| render(&r));
        assert_eq!(got, Some(expected), "line {line}");
    }

    const EXP: &str = "6f1c2a4e-0000-4000-8000-000000000001";

    #[test]
    fn known_formats() {
        // structlog
        check1(
            r#"{"event": "tile done", "level": "warning", "timestamp": "2024-05-01T12:00:00.5Z", "logger": "geo", "tile": 7}"#,
            json!({"ts": "2024-05-01T12:00:00.500Z", "level": "WARNING", "message": "tile done", "logger": "geo", "context": {"tile": 7}}),
        );
        // python-json-logger
        check1(
            r#"{"asctime": "2024-05-01 12:00:00,123", "levelname": "ERROR", "name": "geo.io", "message": "boom", "exc_info": "Traceback (most recent call last):\n  x\nValueError: v"}"#,
            json!({"ts": "2024-05-01T12:00:00.123Z", "level": "ERROR", "message": "boom", "logger": "geo.io", "traceback": "Traceback (most recent call last):\n  x\nValueError: v"}),
        );
        // loguru serialize=True
        check1(
            &json!({"text": "12:00 | ERROR | oops\nTraceback (most recent call last):\n  f\nKeyError: 'k'\n",
                    "record": {"elapsed": {"repr": "0:00:01", "seconds": 1.0},
                               "exception": {"type": "KeyError", "value": "'k'", "traceback": true},
                               "extra": {"experiment_id": EXP, "node_id": "n1", "run": 3},
                               "function": "main", "level": {"icon": "x", "name": "ERROR", "no": 40},
                               "line": 9, "message": "oops", "name": "__main__",
                               "time": {"repr": "2024-05-01 12:00:00.000000+00:00", "timestamp": 1714564800.25}}})
            .to_string(),
            json!({"ts": "2024-05-01T12:00:00.250Z", "level": "ERROR", "message": "oops", "logger": "__main__",
                   "experiment_id": EXP, "node_id": "n1",
                   "traceback": "Traceback (most recent call last):\n  f\nKeyError: 'k'",
                   "context": {"text": "12:00 | ERROR | oops\nTraceback (most recent call last):\n  f\nKeyError: 'k'\n",
                               "record": {"elapsed": {"repr": "0:00:01", "seconds": 1.0}, "function": "main", "line": 9},
                               "run": 3}}),
        );
        // ECS, nested and dotted
        check1(
            r#"{"@timestamp": "2024-05-01T12:00:00.000Z", "log.level": "warn", "message": "m", "log": {"logger": "app", "origin": {"file": "a.py"}}, "error": {"type": "E", "stack_trace": "st"}}"#,
            json!({"ts": "2024-05-01T12:00:00Z", "level": "WARNING", "message": "m", "logger": "app", "traceback": "st",
                   "context": {"log": {"origin": {"file": "a.py"}}, "error": {"type": "E"}}}),
        );
        check1(
            r#"{"@timestamp": "2024-05-01T12:00:00Z", "log": {"level": "error", "logger": "x"}, "message": "m"}"#,
            json!({"ts": "2024-05-01T12:00:00Z", "level": "ERROR", "message": "m", "logger": "x"}),
        );
        // pino / bunyan
        check1(
            r#"{"level": 50, "time": 1714564800123, "pid": 1, "hostname": "h", "name": "svc", "msg": "bad", "err": {"type": "Error", "message": "bad", "stack": "Error: bad\n    at f"}, "v": 0}"#,
            json!({"ts": "2024-05-01T12:00:00.123Z", "level": "ERROR", "message": "bad", "logger": "svc", "traceback": "Error: bad\n    at f",
                   "context": {"pid": 1, "hostname": "h", "v": 0, "err": {"type": "Error", "message": "bad"}}}),
        );
        check1(
            r#"{"level": 30, "msg": "x"}"#,
            json!({"level": "INFO", "message": "x"}),
        );
        check1(
            r#"{"level": "60", "msg": "x"}"#,
            json!({"level": "CRITICAL", "message": "x"}),
        );
        check1(
            r#"{"levelno": 30, "msg": "x"}"#,
            json!({"level": "WARNING", "message": "x"}),
        );
        check1(
            r#"{"severity": "fatal", "msg": "x"}"#,
            json!({"level": "CRITICAL", "message": "x"}),
        );
        check1(
            r#"{"level": "loud", "msg": "x"}"#,
            json!({"level": "INFO", "message": "x", "context": {"_pipewatch": {"level_raw": "loud"}}}),
        );
        // A non-string message is kept as JSON text; no message at all is empty.
        check1(r#"{"msg": 42}"#, json!({"level": "INFO", "message": "42"}));
        check1(
            r#"{"a": 1}"#,
            json!({"level": "INFO", "message": "", "context": {"a": 1}}),
        );
        // The record's own `_pipewatch` is set aside, not mixed with the agent's notes.
        check1(
            r#"{"msg": "x", "_pipewatch": 1}"#,
            json!({"level": "INFO", "message": "x", "context": {"_pipewatch_original": 1}}),
        );
    }

    #[test]
    fn domain_fields() {
        // Top level, then `context`, then `extra`; consumed keys leave context.
        check1(
            &format!(
                r#"{{"msg": "m", "stage": "s0", "context": {{"experiment_id": "{EXP}", "node_id": "n", "stage": "s1", "k": 1}}, "extra": {{"node_id": "n2", "j": 2}}}}"#
            ),
            json!({"level": "INFO", "message": "m", "experiment_id": EXP, "node_id": "n", "stage": "s0",
                   "context": {"k": 1, "stage": "s1", "node_id": "n2", "j": 2}}),
        );
        // A non-UUID experiment id stays in context.
        check1(
            r#"{"msg": "m", "experiment_id": "exp-7", "node_id": 12}"#,
            json!({"level": "INFO", "message": "m", "node_id": "12", "context": {"experiment_id": "exp-7"}}),
        );
        check1(
            r#"{"msg": "m", "metrics": {"rows": 5}}"#,
            json!({"level": "INFO", "message": "m", "metrics": {"rows": 5}}),
        );
        check1(
            r#"{"msg": "m", "metrics": 5}"#,
            json!({"level": "INFO", "message": "m", "context": {"metrics": 5}}),
        );
        // Events: severity belongs to the event; default is the record's level.
        check1(
            r#"{"msg": "oom", "level": "error", "event_type": "out_of_memory", "severity": "critical", "details": {"rss": 1}}"#,
            json!({"level": "ERROR", "message": "oom", "event": ["out_of_memory", "CRITICAL", null, {"rss": 1}]}),
        );
        check1(
            r#"{"msg": "x", "event_type": "e", "severity": "warn"}"#,
            json!({"level": "WARNING", "message": "x", "event": ["e", "WARNING", null, {}]}),
        );
        check1(
            r#"{"msg": "x", "level": "warning", "extra": {"event_type": "e"}}"#,
            json!({"level": "WARNING", "message": "x", "event": ["e", "WARNING", null, {}]}),
        );
        check1(
            r#"{"msg": "x", "event_type": 5}"#,
            json!({"level": "INFO", "message": "x", "context": {"event_type": 5}}),
        );
    }

    #[test]
    fn progress_objects() {
        let p = |line: &str| {
            let r = parse_line(line.as_bytes(), &opts(Format::Json, None)).expect("a record");
            (r.progress, Value::Object(r.context))
        };
        let (u, ctx) = p(
            r#"{"msg": "x", "progress": {"node_id": "tiles", "parent_node_id": "c", "level": "Step", "name": "T", "status": "In_Progress", "items_done": 5, "items_total": 20, "eta": 3}}"#,
        );
        let u = u.expect("progress");
        assert_eq!(
            (
                u.node_id.as_str(),
                u.parent_node_id.as_deref(),
                u.level.as_deref(),
                u.status.as_deref()
            ),
            ("tiles", Some("c"), Some("step"), Some("running"))
        );
        assert_eq!(
            (u.percent, u.items_done, u.items_total),
            (Some(25.0), Some(5), Some(20))
        );
        assert_eq!(u.details, Some(json!({"eta": 3})));
        assert_eq!(ctx, json!({}));

        let (u, _) = p(r#"{"progress": {"node_id": "a", "percent": 140}}"#);
        assert_eq!(u.and_then(|u| u.percent), Some(100.0));
        let (u, _) = p(r#"{"progress": {"node_id": "a", "percent": "-3"}}"#);
        assert_eq!(u.and_then(|u| u.percent), Some(0.0));

        let (u, ctx) = p(r#"{"progress": {"node_id": "a", "status": "weird"}}"#);
        assert_eq!(u.map(|u| u.status), Some(None));
        assert_eq!(
            ctx,
            json!({"_pipewatch": {"progress_error": "unknown progress status \"weird\""}})
        );
        let (u, ctx) = p(r#"{"progress": {"percent": 5}}"#);
        assert_eq!(u, None);
        assert_eq!(
            ctx,
            json!({"progress": {"percent": 5}, "_pipewatch": {"progress_error": "progress has no node_id"}})
        );
        let (u, ctx) = p(r#"{"progress": 0.5}"#);
        assert_eq!(u, None);
        assert_eq!(
            ctx,
            json!({"progress": 0.5, "_pipewatch": {"progress_error": "progress is not an object"}})
        );
    }

    #[test]
    fn bad_input_corpus() {
        let auto = opts(Format::Auto, None);
        let json_only = opts(Format::Json, None);
        let deep = format!(
            "{}{}",
            "{\"a\":".repeat(200),
            "1".to_string() + &"}".repeat(200)
        );
        let cases: Vec<(&ParseOptions, Vec<u8>, Value)> = vec![
            (
                &auto,
                b"{\"a\": ".to_vec(),
                json!({"level": "INFO", "message": "{\"a\": ",
                "context": {"_pipewatch": {"parse_error": "invalid JSON: EOF while parsing a value at line 1 column 6"}}}),
            ),
            (
                &auto,
                b"[1, 2]".to_vec(),
                json!({"level": "INFO", "message": "[1, 2]",
                "context": {"_pipewatch": {"parse_error": "JSON array is not an object"}}}),
            ),
            (
                &json_only,
                b"\"s\"".to_vec(),
                json!({"level": "INFO", "message": "\"s\"",
                "context": {"_pipewatch": {"parse_error": "JSON string is not an object"}}}),
            ),
            (
                &auto,
                b"plain words".to_vec(),
                json!({"level": "INFO", "message": "plain words",
                "context": {"_pipewatch": {"parse_error": "not JSON"}}}),
            ),
            (
                &auto,
                b"{\"msg\": \"a\0b\"}".to_vec(),
                json!({"level": "INFO", "message": "ab",
                "context": {"_pipewatch": {"nul_removed": true}}}),
            ),
            (
                &auto,
                br#"{"msg": "a\u0000b", "k\u0000": ["\u0000"]}"#.to_vec(),
                json!({"level": "INFO", "message": "ab",
                "context": {"k": [""], "_pipewatch": {"nul_removed": true}}}),
            ),
            // An escaped backslash before "u0000" is no NUL: nothing to note.
            (
                &auto,
                br#"{"msg": "a\\u0000b"}"#.to_vec(),
                json!({"level": "INFO", "message": "a\\u0000b"}),
            ),
            (
                &auto,
                b"{\"msg\": \"caf\xe9\"}".to_vec(),
                json!({"level": "INFO", "message": "caf\u{fffd}",
                "context": {"_pipewatch": {"invalid_utf8": true}}}),
            ),
            (
                &auto,
                b"\xff\0".to_vec(),
                json!({"level": "INFO", "message": "\u{fffd}",
                "context": {"_pipewatch": {"parse_error": "not JSON", "nul_removed": true, "invalid_utf8": true}}}),
            ),
            (
                &auto,
                deep.clone().into_bytes(),
                json!({"level": "INFO", "message": deep,
                "context": {"_pipewatch": {"parse_error": "invalid JSON: recursion limit exceeded at line 1 column 636"}}}),
            ),
            (
                &auto,
                br#"{"msg": "n", "big": 123456789012345678901234567890}"#.to_vec(),
                json!({"level": "INFO", "message": "n",
                "context": {"big": 1.2345678901234568e29}}),
            ),
            (
                &auto,
                br#"{"msg": "n", "big": 1e400}"#.to_vec(),
                json!({"level": "INFO", "message": r#"{"msg": "n", "big": 1e400}"#,
                "context": {"_pipewatch": {"parse_error": "invalid JSON: number out of range at line 1 column 25"}}}),
            ),
            (
                &auto,
                br#"{"msg": "t", "time": "tomorrow"}"#.to_vec(),
                json!({"level": "INFO", "message": "t",
                "context": {"_pipewatch": {"ts_error": "cannot read `time` as a time"}, "time": "tomorrow"}}),
            ),
            (
                &auto,
                br#"{"msg": "t", "ts": 1e15, "timestamp": null}"#.to_vec(),
                json!({"ts": "2001-09-09T01:46:40Z", "level": "INFO", "message": "t",
                "context": {"timestamp": null}}),
            ),
            (
                &auto,
                br#"{"msg": "t", "timestamp": "10000-01-01T00:00:00Z"}"#.to_vec(),
                json!({"level": "INFO", "message": "t",
                "context": {"_pipewatch": {"ts_error": "cannot read `timestamp` as a time"}, "timestamp": "10000-01-01T00:00:00Z"}}),
            ),
            (
                &auto,
                br#"{"msg": "t", "time": -99999999999999}"#.to_vec(),
                json!({"level": "INFO", "message": "t",
                "context": {"_pipewatch": {"ts_error": "cannot read `time` as a time"}, "time": -99999999999999i64}}),
            ),
        ];
        for (o, line, expected) in cases {
            let got = parse_line(&line, o).map(|r| render(&r));
            assert_eq!(
                got,
                Some(expected),
                "line {:?}",
                String::from_utf8_lossy(&line)
            );
        }
        assert_eq!(parse_line(b"", &auto), None);
        assert_eq!(parse_line(b" \t\r", &auto), None);
    }

    #[test]
    fn truncated_lines() {
        // The splitter in `check` keeps 100 bytes; a cut inside 'é' drops the partial char.
        let long = format!("{{\"msg\": \"{}é{}\"}}\n", "x".repeat(90), "y".repeat(30));
        let kept = format!("{{\"msg\": \"{}", "x".repeat(90));
        check(
            &opts(Format::Auto, None),
            long.as_bytes(),
            json!([[{"level": "INFO", "message": kept, "context": {"_pipewatch": {"truncated_from_bytes": 133}}}, 134]]),
        );
        let text = format!("{}\n", "z".repeat(110));
        check(
            &opts(Format::Text, None),
            text.as_bytes(),
            json!([[{"level": "INFO", "message": "z".repeat(100), "context": {"_pipewatch": {"truncated_from_bytes": 110}}}, 111]]),
        );
    }

    #[test]
    fn five_mib_json_line_is_shipped_truncated() {
        let mut s = LineSplitter::new(0, 1024 * 1024);
        let mut p = Parser::new(opts(Format::Json, None));
        let (mut lines, mut out) = (Vec::new(), Vec::new());
        s.push(b"{\"msg\": \"", &mut lines);
        let chunk = vec![b'a'; 1024 * 1024];
        for _ in 0..5 {
            s.push(&chunk, &mut lines);
        }
        s.push(b"\"}\n{\"msg\": \"next\"}\n", &mut lines);
        for l in lines {
            p.push(l, &mut out);
        }
        assert_eq!(out.len(), 2);
        let (big, end) = &out[0];
        assert_eq!(big.message.len(), 1024 * 1024);
        assert_eq!(*end, 5 * 1024 * 1024 + 12);
        assert_eq!(
            Value::Object(big.context.clone()),
            json!({"_pipewatch": {"truncated_from_bytes": 5 * 1024 * 1024 + 11}})
        );
        assert_eq!(out[1].0.message, "next");
    }

    const PAT: &str = r"^(?P<ts>\S+ \S+) (?P<level>[A-Z]+) (?P<logger>\S+): (?P<message>.*)$";

    #[test]
    fn text_with_pattern_joins_tracebacks() {
        let input = b"2024-05-01 12:00:00,000 INFO a: start\n\
2024-05-01 12:00:01,000 ERROR a: failed\n\
Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n    f()\nValueError: bad\n\
\n\
During handling of the above exception, another exception occurred:\n\
\n\
Traceback (most recent call last):\n  File \"y.py\", line 2\nKeyError: 'k'\n\
\n\
2024-05-01 12:00:02,000 WARN b: after\nmore words\n";
        let tb = "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n    f()\nValueError: bad\n\nDuring handling of the above exception, another exception occurred:\n\nTraceback (most recent call last):\n  File \"y.py\", line 2\nKeyError: 'k'";
        check(
            &opts(Format::Text, Some(PAT)),
            input,
            json!([
                [{"ts": "2024-05-01T12:00:00Z", "level": "INFO", "message": "start", "logger": "a"}, 38],
                [{"ts": "2024-05-01T12:00:01Z", "level": "ERROR", "message": "failed", "logger": "a", "traceback": tb}, 313],
                [{"ts": "2024-05-01T12:00:02Z", "level": "WARNING", "message": "after\nmore words", "logger": "b"}, 363],
            ]),
        );
    }

    #[test]
    fn auto_with_pattern_mixes_json_and_text() {
        let input = b"junk first\n{\"msg\": \"j\"}\n2024-05-01 12:00:00,000 INFO a: t\n  indented\n{\"msg\": \"k\"}\n";
        check(
            &opts(Format::Auto, Some(PAT)),
            input,
            json!([
                [{"level": "INFO", "message": "junk first", "context": {"_pipewatch": {"parse_error": "not JSON and does not match text_pattern"}}}, 11],
                [{"level": "INFO", "message": "j"}, 24],
                [{"ts": "2024-05-01T12:00:00Z", "level": "INFO", "message": "t\n  indented", "logger": "a"}, 69],
                [{"level": "INFO", "message": "k"}, 82],
            ]),
        );
    }

    #[test]
    fn text_without_pattern() {
        let input =
            b"hello\nTraceback (most recent call last):\n  File \"x\"\nOSError: no\nnext line\n";
        check(
            &opts(Format::Text, None),
            input,
            json!([
                [{"level": "INFO", "message": "hello",
                  "traceback": "Traceback (most recent call last):\n  File \"x\"\nOSError: no"}, 64],
                [{"level": "INFO", "message": "next line"}, 74],
            ]),
        );
        // A traceback with nothing before it: its last line is the message.
        check(
            &opts(Format::Text, None),
            b"Traceback (most recent call last):\n  f\nE: x\n",
            json!([[{"level": "INFO", "message": "E: x", "traceback": "Traceback (most recent call last):\n  f\nE: x"}, 44]]),
        );
    }

    #[test]
    fn holding_and_offsets() {
        let mut p = Parser::new(opts(Format::Text, Some(PAT)));
        let mut out = Vec::new();
        let mut s = LineSplitter::new(100, 1024);
        let mut lines = Vec::new();
        s.push(
            b"2024-05-01 12:00:00,000 INFO a: one\n  two\n\n",
            &mut lines,
        );
        for l in lines.drain(..) {
            p.push(l, &mut out);
        }
        assert!(out.is_empty());
        assert!(p.holding());
        p.flush(&mut out);
        assert!(!p.holding());
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].1, 100 + 42);
        assert_eq!(out[0].0.message, "one\n  two");
    }

    #[test]
    fn held_records_are_bounded() {
        let mut p = Parser::new(opts(Format::Text, Some(PAT)));
        let mut out = Vec::new();
        let mut end = 0;
        let mut push = |p: &mut Parser, out: &mut Vec<(Record, u64)>, s: &str| {
            end += s.len() as u64 + 1;
            p.push(
                Line {
                    bytes: s.as_bytes().to_vec(),
                    start: 0,
                    end,
                    truncated_from: None,
                },
                out,
            );
        };
        push(&mut p, &mut out, "2024-05-01 12:00:00,000 INFO a: one");
        for _ in 0..MAX_HELD_LINES + 5 {
            push(&mut p, &mut out, "  cont");
        }
        p.flush(&mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].0.message.lines().count(), MAX_HELD_LINES);
        assert_eq!(out[1].0.message.lines().count(), 6);
    }

    fn has_nul(v: &Value) -> bool {
        match v {
            Value::String(s) => s.contains('\0'),
            Value::Array(a) => a.iter().any(has_nul),
            Value::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
            _ => false,
        }
    }

    /// A line reader for the property test: blank → None, else one record per line in json
    /// and auto modes.
    fn arb_bytes() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![
                Just(b'\n'),
                Just(b'{'),
                Just(b'}'),
                Just(b'"'),
                Just(b' '),
                Just(b'\\'),
                Just(0u8),
                any::<u8>()
            ],
            0..300,
        )
    }

    proptest! {
        /// Any bytes in JSON/auto mode: no panic, one record per complete non-blank line,
        /// in order, with its end offset, and no NUL in any text.
        #[test]
        fn every_nonblank_line_is_one_record(data in arb_bytes(), max in 1usize..40) {
            let mut s = LineSplitter::new(0, max);
            let mut lines = Vec::new();
            s.push(&data, &mut lines);
            let expected: Vec<u64> = lines
                .iter()
                .filter(|l| !is_blank(&l.bytes))
                .map(|l| l.end)
                .collect();
            let mut p = Parser::new(opts(Format::Auto, None));
            let mut out = Vec::new();
            for l in lines {
                p.push(l, &mut out);
            }
            prop_assert!(!p.holding());
            let ends: Vec<u64> = out.iter().map(|(_, e)| *e).collect();
            prop_assert_eq!(ends, expected);
            for (r, _) in &out {
                prop_assert!(!has_nul(&render(r)));
            }
        }

        /// Any text in text mode: no panic, records in offset order, and every non-blank
        /// line's content is found in exactly one record (nothing dropped).
        #[test]
        fn text_mode_drops_nothing(data in proptest::collection::vec(
            prop_oneof![Just("2024-05-01 12:00:00,000 INFO a: m"), Just("  at x"),
                        Just("Traceback (most recent call last):"), Just("E: y"), Just(""),
                        Just("During handling of the above exception, another exception occurred:")],
            0..30)) {
            let mut p = Parser::new(opts(Format::Text, Some(PAT)));
            let mut out = Vec::new();
            let mut end = 0;
            for l in &data {
                end += l.len() as u64 + 1;
                p.push(Line { bytes: l.as_bytes().to_vec(), start: 0, end, truncated_from: None }, &mut out);
            }
            p.flush(&mut out);
            // Nothing dropped: each distinct input line appears in the records' messages and
            // tracebacks at least as often as it was written.
            let mut written: std::collections::HashMap<&str, usize> = Default::default();
            for l in data.iter().filter(|l| !l.is_empty()) {
                *written.entry(l).or_default() += 1;
            }
            let mut shipped: std::collections::HashMap<String, usize> = Default::default();
            for (r, _) in &out {
                let texts = std::iter::once(r.message.as_str()).chain(r.traceback.as_deref());
                for line in texts.flat_map(str::lines) {
                    *shipped.entry(line.to_string()).or_default() += 1;
                }
                // A matched line's message is only its `message` capture.
                if r.logger.is_some() {
                    *shipped.entry("2024-05-01 12:00:00,000 INFO a: m".to_string()).or_default() += 1;
                }
            }
            for (line, n) in written {
                prop_assert!(shipped.get(line).copied().unwrap_or(0) >= n, "line {:?} lost", line);
            }
            prop_assert!(out.len() <= data.len());
            let ends: Vec<u64> = out.iter().map(|(_, e)| *e).collect();
            let mut sorted = ends.clone();
            sorted.sort_unstable();
            sorted.dedup();
            prop_assert_eq!(ends, sorted);
        }
    }
}
