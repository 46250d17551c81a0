//! The records and rows that flow from the readers to the sink.
//!
//! Pure data: no I/O, no database types. Parsers produce [`Record`]s, routing turns them into
//! the row types below, and only the sink knows how those rows reach PostgreSQL.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

/// A severity, as stored in `level` and `severity` columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    Debug,
    Info,
    Warning,
    Error,
    Critical,
}

impl Level {
    /// The spelling stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Debug => "DEBUG",
            Level::Info => "INFO",
            Level::Warning => "WARNING",
            Level::Error => "ERROR",
            Level::Critical => "CRITICAL",
        }
    }

    /// Reads the stored spelling back (case-insensitive); `None` for anything else.
    pub fn from_db(s: &str) -> Option<Level> {
        match s.to_ascii_uppercase().as_str() {
            "DEBUG" => Some(Level::Debug),
            "INFO" => Some(Level::Info),
            "WARNING" => Some(Level::Warning),
            "ERROR" => Some(Level::Error),
            "CRITICAL" => Some(Level::Critical),
            _ => None,
        }
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A progress update carried by a record (its `progress` object, or produced by a rule).
/// Absent fields leave the stored row's value alone.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProgressUpdate {
    pub node_id: String,
    pub parent_node_id: Option<String>,
    /// `pipeline|phase|step|substep`.
    pub level: Option<String>,
    pub name: Option<String>,
    /// `pending|running|completed|failed|cancelled`.
    pub status: Option<String>,
    /// 0–100; derived from items when absent.
    pub percent: Option<f64>,
    pub items_done: Option<i64>,
    pub items_total: Option<i64>,
    pub details: Option<Value>,
}

/// An event carried by a record (its `event_type` field, or produced by a rule).
#[derive(Debug, Clone, PartialEq)]
pub struct EventSpec {
    pub event_type: String,
    pub severity: Level,
    /// Defaults to the record's message.
    pub message: Option<String>,
    pub details: Map<String, Value>,
}

/// One parsed log record, before routing. Parsing never fails: what could not be understood
/// is described under `context["_pipewatch"]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The record's own time; `None` when it carries none (the reader then uses read time).
    pub ts: Option<DateTime<Utc>>,
    pub level: Level,
    pub message: String,
    pub logger: Option<String>,
    /// The record's own experiment id, when it is a UUID (a non-UUID value goes to context).
    pub experiment_id: Option<Uuid>,
    pub node_id: Option<String>,
    pub stage: Option<String>,
    /// Every field not mapped to a column, nested objects kept; `_pipewatch` holds the
    /// agent's own notes. With a non-empty [`Record::raw_context`], only the members that
    /// follow those: read or change it after [`Record::expand_context`].
    pub context: Map<String, Value>,
    /// The first members of the context still as JSON text, a whole object (`{"k": v, …}`,
    /// each value as the line wrote it, keys distinct and not in `context`), or empty. The
    /// JSON parser's fast path leaves a line's plain fields here so that a record nobody
    /// looks into is never built as a map; the context is this object's members followed by
    /// `context`'s.
    pub raw_context: String,
    pub traceback: Option<String>,
    pub metrics: Option<Value>,
    pub progress: Option<ProgressUpdate>,
    pub event: Option<EventSpec>,
}

impl Record {
    /// An empty INFO record with the given message.
    pub fn new(message: impl Into<String>) -> Record {
        Record {
            ts: None,
            level: Level::Info,
            message: message.into(),
            logger: None,
            experiment_id: None,
            node_id: None,
            stage: None,
            context: Map::new(),
            raw_context: String::new(),
            traceback: None,
            metrics: None,
            progress: None,
            event: None,
        }
    }

    /// Moves the members of [`Record::raw_context`] into `context`, ahead of its own: after
    /// this, `context` is the whole context. Call it before reading or changing `context`.
    pub fn expand_context(&mut self) {
        self.context = expand(std::mem::take(&mut self.raw_context), &mut self.context);
    }

    /// Whether the context has `key`, in its raw part or in `context`, without expanding it.
    pub fn context_has(&self, key: &str) -> bool {
        self.context.contains_key(key) || raw_has_key(&self.raw_context, key)
    }

    /// Adds a note under `context._pipewatch.<key>` (never in the raw part, so the note
    /// needs no expansion).
    pub fn note(&mut self, key: &str, value: impl Into<Value>) {
        let notes = self
            .context
            .entry("_pipewatch")
            .or_insert_with(|| Value::Object(Map::new()));
        if !notes.is_object() {
            *notes = Value::Object(Map::new());
        }
        if let Value::Object(m) = notes {
            m.insert(key.to_string(), value.into());
        }
    }
}

/// Whether `raw` (a JSON object's text as `serde_json` writes it: no whitespace, or empty)
/// has the top-level key `key`.
fn raw_has_key(raw: &str, key: &str) -> bool {
    if raw.is_empty() {
        return false;
    }
    // The key as serde_json writes it (quoted; escaped only when it must be).
    let plain = key.bytes().all(|c| c >= 0x20 && c != b'"' && c != b'\\');
    let escaped;
    let want: &[u8] = if plain {
        key.as_bytes()
    } else {
        match serde_json::to_string(key) {
            Ok(e) => {
                escaped = e;
                &escaped.as_bytes()[1..escaped.len() - 1]
            }
            Err(_) => return false,
        }
    };
    let b = raw.as_bytes();
    let (mut depth, mut i, mut expect_key) = (0usize, 0usize, false);
    while i < b.len() {
        match b[i] {
            b'{' => {
                depth += 1;
                expect_key = depth == 1;
            }
            b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            b',' => expect_key = depth == 1,
            b'"' => {
                // A string: find its closing quote (escapes skip a byte).
                let mut j = i + 1;
                while j < b.len() && b[j] != b'"' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                let end = (j + 1).min(b.len());
                if expect_key && b.get(i + 1..j) == Some(want) {
                    return true;
                }
                expect_key = false;
                i = end;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    false
}

/// `raw` (a JSON object's text, or empty) followed by the members of `rest` as one map.
fn expand(raw: String, rest: &mut Map<String, Value>) -> Map<String, Value> {
    if raw.is_empty() {
        return std::mem::take(rest);
    }
    let mut map = match serde_json::from_str::<Map<String, Value>>(&raw) {
        Ok(m) => m,
        Err(e) => {
            // Cannot happen (the parser checked the text); keep it rather than lose it.
            let mut m = Map::new();
            m.insert("_pipewatch_raw_context".into(), Value::String(raw));
            m.insert("_pipewatch_raw_context_error".into(), e.to_string().into());
            m
        }
    };
    for (k, v) in std::mem::take(rest) {
        map.insert(k, v);
    }
    map
}

/// A routed `pipeline_logs` row without the columns every row of a file shares (`host`,
/// `daemon`, `source`): what a reader encodes, with its context possibly still partly text.
#[derive(Debug, Clone, PartialEq)]
pub struct LogFields {
    pub ts: DateTime<Utc>,
    pub level: Level,
    pub message: String,
    pub logger: Option<String>,
    pub experiment_id: Option<Uuid>,
    pub node_id: Option<String>,
    pub stage: Option<String>,
    /// The context members after those of `raw_context` (see [`Record::raw_context`]).
    pub context: Map<String, Value>,
    pub raw_context: String,
    pub traceback: Option<String>,
    pub metrics: Option<Value>,
}

impl LogFields {
    /// The whole row, its context as one map.
    pub fn into_row(mut self, host: &str, daemon: &str, source: Option<&str>) -> LogRow {
        let context = expand(std::mem::take(&mut self.raw_context), &mut self.context);
        LogRow {
            ts: self.ts,
            level: self.level,
            message: self.message,
            logger: self.logger,
            experiment_id: self.experiment_id,
            node_id: self.node_id,
            stage: self.stage,
            context: Value::Object(context),
            traceback: self.traceback,
            metrics: self.metrics,
            host: host.to_string(),
            daemon: daemon.to_string(),
            source: source.map(str::to_string),
        }
    }
}

/// A row of `pipeline_logs`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRow {
    pub ts: DateTime<Utc>,
    pub level: Level,
    pub message: String,
    pub logger: Option<String>,
    pub experiment_id: Option<Uuid>,
    pub node_id: Option<String>,
    pub stage: Option<String>,
    pub context: Value,
    pub traceback: Option<String>,
    pub metrics: Option<Value>,
    pub host: String,
    pub daemon: String,
    pub source: Option<String>,
}

/// A row of `pipeline_events`.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub ts: DateTime<Utc>,
    pub experiment_id: Option<Uuid>,
    pub node_id: Option<String>,
    pub event_type: String,
    pub severity: Level,
    pub message: Option<String>,
    pub details: Value,
    pub host: String,
    pub daemon: String,
}

/// An upsert into `pipeline_progress`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressRow {
    pub experiment_id: Uuid,
    /// The time of the record that carried the update; older never overwrites newer.
    pub updated_at: DateTime<Utc>,
    pub update: ProgressUpdate,
}

/// A row of `pipeline_metrics`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MetricRow {
    pub ts: Option<DateTime<Utc>>,
    pub experiment_id: Option<Uuid>,
    pub node_id: Option<String>,
    pub host: String,
    pub daemon: String,
    pub pid: Option<i32>,
    pub cpu_percent: Option<f64>,
    pub memory_rss_bytes: Option<i64>,
    pub memory_percent: Option<f64>,
    pub disk_read_bytes_per_sec: Option<f64>,
    pub disk_write_bytes_per_sec: Option<f64>,
    pub disk_used_percent: Option<f64>,
    pub records_per_sec: Option<f64>,
    pub custom: Map<String, Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_keys_are_found_at_the_top_level_only() {
        let raw = r#"{"a":{"b":1,"c":[{"d":2}]},"e\"q":"f","g":"a","h\\":null}"#;
        for (key, has) in [
            ("a", true),
            ("b", false),
            ("c", false),
            ("d", false),
            ("e\"q", true),
            ("f", false),
            ("g", true),
            ("h\\", true),
            ("h", false),
            ("", false),
        ] {
            assert_eq!(raw_has_key(raw, key), has, "key {key:?}");
        }
        assert!(!raw_has_key("", "a"));
        let mut r = Record::new("m");
        r.raw_context = raw.to_string();
        r.context.insert("z".into(), Value::Null);
        assert!(r.context_has("z") && r.context_has("g") && !r.context_has("b"));
        r.expand_context();
        let keys: Vec<&str> = r.context.keys().map(String::as_str).collect();
        assert_eq!(keys, ["a", "e\"q", "g", "h\\", "z"]);
        assert!(r.raw_context.is_empty());
    }
}
