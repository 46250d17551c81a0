//! Text lines: a record from the named captures of `text_pattern`, and the rules that tell a
//! continuation line (a Python traceback, an indented line) from the start of a new record.
//!
//! Pure: no I/O; the pattern is compiled once by the config loader, never here.

use super::normalize::{level_from_str, ts_from_str, NumericScale};
use crate::model::{Level, Record};
use regex::Regex;
use serde_json::Value;
use uuid::Uuid;

/// The first line of a Python traceback.
pub fn is_traceback_start(line: &str) -> bool {
    line.starts_with("Traceback (most recent call last):")
}

/// The lines Python prints between chained exceptions.
pub fn is_chain_line(line: &str) -> bool {
    line.starts_with("During handling of the above exception, another exception occurred")
        || line.starts_with("The above exception was the direct cause of the following exception")
}

/// Whether the line starts with a space or a tab.
pub fn is_indented(line: &str) -> bool {
    matches!(line.as_bytes().first(), Some(b' ' | b'\t'))
}

/// A record from a line that `re` matched: the captures `ts`/`timestamp`/`time`/`asctime`,
/// `level`/`levelname`, `logger`/`name`, `message`/`msg`, `experiment_id`, `node_id` and
/// `stage` fill their fields; any other named capture goes to context. Without a message
/// capture the whole line is the message.
pub fn record_from_captures(re: &Regex, caps: &regex::Captures<'_>, line: &str) -> Record {
    let mut rec = Record::new(String::new());
    let mut message = None;
    for (i, name) in re.capture_names().enumerate() {
        let (Some(name), Some(m)) = (name, caps.get(i)) else {
            continue;
        };
        let v = m.as_str();
        match name {
            "message" | "msg" => message = Some(v),
            "ts" | "timestamp" | "time" | "asctime" => match ts_from_str(v) {
                Some(t) => rec.ts = Some(t),
                None => {
                    rec.note("ts_error", format!("cannot read `{name}` as a time"));
                    rec.context
                        .insert(name.to_string(), Value::String(v.to_string()));
                }
            },
            "level" | "levelname" => match level_from_str(v, NumericScale::Python) {
                Some(l) => rec.level = l,
                None => {
                    rec.level = Level::Info;
                    rec.note("level_raw", v);
                }
            },
            "logger" | "name" => rec.logger = Some(v.to_string()),
            "experiment_id" => match Uuid::parse_str(v.trim()) {
                Ok(u) => rec.experiment_id = Some(u),
                Err(_) => {
                    rec.context
                        .insert("experiment_id".into(), Value::String(v.to_string()));
                }
            },
            "node_id" => rec.node_id = Some(v.to_string()),
            "stage" => rec.stage = Some(v.to_string()),
            other => {
                rec.context
                    .insert(other.to_string(), Value::String(v.to_string()));
            }
        }
    }
    rec.message = message.unwrap_or(line).to_string();
    rec
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATTERN: &str = r"^(?P<ts>\S+ \S+) (?P<level>[A-Z]+) (?P<logger>\S+): (?P<message>.*?)(?: \[(?P<job>\w+)\])?$";

    /// `(line, expected record as debug-ish tuple)`: ts, level, logger, message, context.
    fn check(line: &str, expected: (Option<&str>, Level, Option<&str>, &str, &str)) {
        let re = Regex::new(PATTERN).expect("test pattern compiles");
        let caps = re.captures(line).expect("test line matches");
        let r = record_from_captures(&re, &caps, line);
        let got = (
            r.ts.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
            r.level,
            r.logger.clone(),
            r.message.clone(),
            Value::Object(r.context.clone()).to_string(),
        );
        let want = (
            expected.0.map(str::to_string),
            expected.1,
            expected.2.map(str::to_string),
            expected.3.to_string(),
            expected.4.to_string(),
        );
        assert_eq!(got, want, "line {line:?}");
    }

    #[test]
    fn captures() {
        check(
            "2024-05-01 12:00:00,123 WARNING geo.cluster: slow tile",
            (
                Some("2024-05-01T12:00:00.123Z"),
                Level::Warning,
                Some("geo.cluster"),
                "slow tile",
                "{}",
            ),
        );
        check(
            "2024-05-01 12:00:00,123 ERROR a: boom [j7]",
            (
                Some("2024-05-01T12:00:00.123Z"),
                Level::Error,
                Some("a"),
                "boom",
                r#"{"job":"j7"}"#,
            ),
        );
        check(
            "not a-time LOUD a: hi",
            (
                None,
                Level::Info,
                Some("a"),
                "hi",
                r#"{"_pipewatch":{"ts_error":"cannot read `ts` as a time","level_raw":"LOUD"},"ts":"not a-time"}"#,
            ),
        );
    }

    #[test]
    fn classifiers() {
        assert!(is_traceback_start("Traceback (most recent call last):"));
        assert!(!is_traceback_start(" Traceback (most recent call last):"));
        assert!(is_chain_line(
            "During handling of the above exception, another exception occurred:"
        ));
        assert!(is_chain_line(
            "The above exception was the direct cause of the following exception:"
        ));
        assert!(is_indented("  File \"x.py\", line 1, in <module>"));
        assert!(is_indented("\tat foo"));
        assert!(!is_indented("ValueError: bad"));
    }
}
