//! Routing: one [`Record`] to the rows it becomes — always a `pipeline_logs` row, plus a
//! `pipeline_progress` upsert when it carries progress and a `pipeline_events` row when it
//! carries an event.
//!
//! Pure: no I/O, no database types; the sink decides how rows reach PostgreSQL.
//!
//! Precedence for `experiment_id` and `node_id`: the record's own value, then the captures of
//! the daemon's `path_pattern` on the file's path, then the daemon's defaults. A value that is
//! not a UUID never fills `experiment_id` (it stays in context) and lets the next source fill
//! it. A progress
//! update is routed only when an experiment id is known (`pipeline_progress.experiment_id` is
//! not null); otherwise the log row notes `_pipewatch.progress_skipped`.

use crate::model::{EventRow, LogFields, LogRow, ProgressRow, Record};
use chrono::{DateTime, Utc};
use regex::Regex;
use serde_json::{Map, Value};
use uuid::Uuid;

/// Where a record was read from, and the daemon's defaults.
#[derive(Debug, Clone, Copy)]
pub struct SourceContext<'a> {
    /// The agent's host name (`host` column).
    pub host: &'a str,
    /// The daemon's name (`daemon` column).
    pub daemon: &'a str,
    /// The log file's path (`source` column).
    pub source: &'a str,
    /// Named captures of the daemon's path_pattern on this file's path.
    pub path_captures: &'a Map<String, Value>,
    pub default_experiment_id: Option<Uuid>,
    pub default_node_id: Option<&'a str>,
}

/// The rows one record becomes.
#[derive(Debug, Clone, PartialEq)]
pub struct Routed {
    pub log: LogRow,
    pub event: Option<EventRow>,
    pub progress: Option<ProgressRow>,
}

/// The rows one record becomes, its log row without the columns a file's rows share.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutedFields {
    pub log: LogFields,
    pub event: Option<EventRow>,
    pub progress: Option<ProgressRow>,
}

/// Routes a record. `read_time` is used when the record has no time of its own.
pub fn route(record: Record, src: &SourceContext, read_time: DateTime<Utc>) -> Routed {
    let r = route_fields(record, src, read_time);
    Routed {
        log: r.log.into_row(src.host, src.daemon, Some(src.source)),
        event: r.event,
        progress: r.progress,
    }
}

/// [`route`] without building the shared columns, and leaving a raw context raw unless
/// routing reads it (path captures, a progress update): what readers encode from.
pub fn route_fields(
    mut record: Record,
    src: &SourceContext,
    read_time: DateTime<Utc>,
) -> RoutedFields {
    if !src.path_captures.is_empty() || record.progress.is_some() {
        record.expand_context();
    }
    let ts = record.ts.unwrap_or(read_time);
    let caps = src.path_captures;

    // A non-UUID value (the record's, kept in its context, or a capture's) does not fill the
    // column; the next source in precedence order then may.
    let mut experiment_id = record.experiment_id;
    if experiment_id.is_none() {
        if let Some(v) = caps.get("experiment_id") {
            match v.as_str().map(|s| Uuid::parse_str(s.trim())) {
                Some(Ok(u)) => experiment_id = Some(u),
                _ => {
                    if !record.context.contains_key("experiment_id") {
                        record.context.insert("experiment_id".into(), v.clone());
                    }
                }
            }
        }
    }
    if experiment_id.is_none() {
        experiment_id = src.default_experiment_id;
    }
    let node_id = record
        .node_id
        .take()
        .or_else(|| caps.get("node_id").map(capture_text))
        .or_else(|| src.default_node_id.map(str::to_string));
    let stage = record
        .stage
        .take()
        .or_else(|| caps.get("stage").map(capture_text));
    for (k, v) in caps {
        if matches!(k.as_str(), "experiment_id" | "node_id" | "stage") {
            continue;
        }
        if !record.context.contains_key(k) {
            record.context.insert(k.clone(), v.clone());
        }
    }

    let progress = match record.progress.take() {
        Some(update) => match experiment_id {
            Some(experiment_id) => Some(ProgressRow {
                experiment_id,
                updated_at: ts,
                update,
            }),
            None => {
                record.note("progress_skipped", "no experiment_id");
                // Keep what the update said, so that nothing read is lost.
                record
                    .context
                    .entry("progress")
                    .or_insert_with(|| progress_value(&update));
                None
            }
        },
        None => None,
    };

    let event = record.event.take().map(|e| EventRow {
        ts,
        experiment_id,
        node_id: node_id.clone(),
        event_type: e.event_type,
        severity: e.severity,
        message: Some(e.message.unwrap_or_else(|| record.message.clone())),
        details: Value::Object(e.details),
        host: src.host.to_string(),
        daemon: src.daemon.to_string(),
    });

    let log = LogFields {
        ts,
        level: record.level,
        message: record.message,
        logger: record.logger,
        experiment_id,
        node_id,
        stage,
        context: record.context,
        raw_context: record.raw_context,
        traceback: record.traceback,
        metrics: record.metrics,
    };
    RoutedFields {
        log,
        event,
        progress,
    }
}

fn capture_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A progress update as the JSON object it was read from.
fn progress_value(u: &crate::model::ProgressUpdate) -> Value {
    let mut m = Map::new();
    m.insert("node_id".into(), Value::String(u.node_id.clone()));
    let strings = [
        ("parent_node_id", &u.parent_node_id),
        ("level", &u.level),
        ("name", &u.name),
        ("status", &u.status),
    ];
    for (k, v) in strings {
        if let Some(v) = v {
            m.insert(k.into(), Value::String(v.clone()));
        }
    }
    if let Some(p) = u.percent.and_then(serde_json::Number::from_f64) {
        m.insert("percent".into(), Value::Number(p));
    }
    if let Some(n) = u.items_done {
        m.insert("items_done".into(), n.into());
    }
    if let Some(n) = u.items_total {
        m.insert("items_total".into(), n.into());
    }
    if let Some(d) = &u.details {
        m.insert("details".into(), d.clone());
    }
    Value::Object(m)
}

/// The named captures of `pattern` on `path` (experiment_id, node_id, stage, or any other
/// name); empty when it does not match. Captures that did not participate are left out.
pub fn path_captures(pattern: &Regex, path: &str) -> Map<String, Value> {
    let mut m = Map::new();
    if let Some(caps) = pattern.captures(path) {
        for (i, name) in pattern.capture_names().enumerate() {
            if let (Some(name), Some(c)) = (name, caps.get(i)) {
                m.insert(name.to_string(), Value::String(c.as_str().to_string()));
            }
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EventSpec, Level, ProgressUpdate};
    use serde_json::json;

    const EXP_REC: &str = "00000000-0000-4000-8000-00000000000a";
    const EXP_PATH: &str = "00000000-0000-4000-8000-00000000000b";
    const EXP_DEF: &str = "00000000-0000-4000-8000-00000000000c";

    fn uuid(s: &str) -> Uuid {
        Uuid::parse_str(s).expect("test uuid")
    }

    fn read_time() -> DateTime<Utc> {
        DateTime::from_timestamp(1_714_564_800, 0).expect("valid time")
    }

    /// Routes `rec` with the given path captures and defaults, and compares the routed
    /// log row's (experiment, node, stage, context) and whether progress/event rows exist.
    fn check(
        rec: Record,
        caps: Value,
        default_exp: Option<&str>,
        expected: (Option<&str>, Option<&str>, Option<&str>, Value, bool, bool),
    ) -> Routed {
        let caps = match caps {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        let src = SourceContext {
            host: "h1",
            daemon: "d1",
            source: "/var/log/x.jsonl",
            path_captures: &caps,
            default_experiment_id: default_exp.map(uuid),
            default_node_id: Some("default-node"),
        };
        let r = route(rec, &src, read_time());
        let got = (
            r.log.experiment_id,
            r.log.node_id.clone(),
            r.log.stage.clone(),
            r.log.context.clone(),
            r.progress.is_some(),
            r.event.is_some(),
        );
        let want = (
            expected.0.map(uuid),
            expected.1.map(str::to_string),
            expected.2.map(str::to_string),
            expected.3,
            expected.4,
            expected.5,
        );
        assert_eq!(got, want);
        assert_eq!((r.log.host.as_str(), r.log.daemon.as_str()), ("h1", "d1"));
        assert_eq!(r.log.source.as_deref(), Some("/var/log/x.jsonl"));
        r
    }

    #[test]
    fn precedence() {
        let mut rec = Record::new("m");
        rec.experiment_id = Some(uuid(EXP_REC));
        rec.node_id = Some("rec-node".into());
        check(
            rec,
            json!({"experiment_id": EXP_PATH, "node_id": "path-node", "stage": "st", "shard": "7"}),
            Some(EXP_DEF),
            (
                Some(EXP_REC),
                Some("rec-node"),
                Some("st"),
                json!({"shard": "7"}),
                false,
                false,
            ),
        );
        check(
            Record::new("m"),
            json!({"experiment_id": EXP_PATH, "node_id": "path-node"}),
            Some(EXP_DEF),
            (
                Some(EXP_PATH),
                Some("path-node"),
                None,
                json!({}),
                false,
                false,
            ),
        );
        check(
            Record::new("m"),
            json!({}),
            Some(EXP_DEF),
            (
                Some(EXP_DEF),
                Some("default-node"),
                None,
                json!({}),
                false,
                false,
            ),
        );
        // A non-UUID capture goes to context and lets the default fill the column.
        check(
            Record::new("m"),
            json!({"experiment_id": "run-7"}),
            Some(EXP_DEF),
            (
                Some(EXP_DEF),
                Some("default-node"),
                None,
                json!({"experiment_id": "run-7"}),
                false,
                false,
            ),
        );
        // The record's own context keys win over captures of the same name.
        let mut rec = Record::new("m");
        rec.context.insert("shard".into(), json!(1));
        check(
            rec,
            json!({"shard": "7"}),
            None,
            (
                None,
                Some("default-node"),
                None,
                json!({"shard": 1}),
                false,
                false,
            ),
        );
    }

    #[test]
    fn progress_and_events() {
        let mut rec = Record::new("tile 5/20");
        rec.level = Level::Warning;
        rec.ts = DateTime::from_timestamp(1_700_000_000, 0);
        rec.progress = Some(ProgressUpdate {
            node_id: "tiles".into(),
            items_done: Some(5),
            ..ProgressUpdate::default()
        });
        rec.event = Some(EventSpec {
            event_type: "slow".into(),
            severity: Level::Warning,
            message: None,
            details: Map::new(),
        });
        let r = check(
            rec.clone(),
            json!({}),
            Some(EXP_DEF),
            (
                Some(EXP_DEF),
                Some("default-node"),
                None,
                json!({}),
                true,
                true,
            ),
        );
        let p = r.progress.expect("progress row");
        assert_eq!(
            (p.experiment_id, p.updated_at),
            (uuid(EXP_DEF), rec.ts.expect("ts"))
        );
        let e = r.event.expect("event row");
        assert_eq!(e.message.as_deref(), Some("tile 5/20"));
        assert_eq!((e.severity, e.ts), (Level::Warning, rec.ts.expect("ts")));
        assert_eq!(e.node_id.as_deref(), Some("default-node"));
        assert_eq!(e.details, json!({}));
        assert_eq!(r.log.ts, rec.ts.expect("ts"));

        // Without any experiment id the update is kept in context, not routed.
        let mut rec = Record::new("m");
        rec.progress = Some(ProgressUpdate {
            node_id: "tiles".into(),
            percent: Some(50.0),
            ..ProgressUpdate::default()
        });
        let r = check(
            rec,
            json!({}),
            None,
            (
                None,
                Some("default-node"),
                None,
                json!({"_pipewatch": {"progress_skipped": "no experiment_id"},
                       "progress": {"node_id": "tiles", "percent": 50.0}}),
                false,
                false,
            ),
        );
        assert_eq!(r.log.ts, read_time());
    }

    #[test]
    fn captures_of_a_path() {
        let re = Regex::new(
            r"/(?P<experiment_id>[0-9a-f-]{36})/(?P<node_id>[^/]+?)(?:-(?P<part>\d+))?\.jsonl$",
        )
        .expect("test pattern");
        let m = path_captures(&re, &format!("/logs/{EXP_PATH}/tiles.jsonl"));
        assert_eq!(
            Value::Object(m),
            json!({"experiment_id": EXP_PATH, "node_id": "tiles"})
        );
        let m = path_captures(&re, &format!("/logs/{EXP_PATH}/tiles-3.jsonl"));
        assert_eq!(
            Value::Object(m),
            json!({"experiment_id": EXP_PATH, "node_id": "tiles", "part": "3"})
        );
        assert!(path_captures(&re, "/elsewhere.log").is_empty());
    }
}
