//! Turning one parsed JSON object into a [`Record`]: recognises structlog, python-json-logger,
//! loguru (`serialize=True`), ECS and pino/bunyan field names without configuration.
//!
//! Pure: no I/O. Every field not mapped to a column stays in `context` (nested objects kept);
//! fields that could not be understood stay there too, with a note under `_pipewatch`.

use super::normalize::{level_from_value, ts_from_value, NumericScale};
use crate::model::{EventSpec, Level, ProgressUpdate, Record};
use serde_json::{Map, Value};
use uuid::Uuid;

/// The top-level keys this module looks at. Whatever of them is not consumed goes back into
/// `context` under the same key.
const KEYS: &[&str] = &[
    "message",
    "msg",
    "event",
    "level",
    "levelname",
    "severity",
    "levelno",
    "log.level",
    "timestamp",
    "@timestamp",
    "time",
    "ts",
    "asctime",
    "logger",
    "logger_name",
    "name",
    "log.logger",
    "exception",
    "exc_info",
    "exc_text",
    "traceback",
    "stack_trace",
    "stack",
    "error.stack_trace",
    "log",
    "error",
    "err",
    "record",
    "context",
    "extra",
    "experiment_id",
    "node_id",
    "stage",
    "metrics",
    "progress",
    "event_type",
    "details",
];

/// How many keys [`KEYS`] holds.
pub(crate) const KEY_COUNT: usize = KEYS.len();

/// The column-bearing values of a JSON line, by their index in [`KEYS`].
pub(crate) type Slots = [Option<Value>; KEY_COUNT];

/// No value in any slot.
pub(crate) const NO_SLOTS: Slots = [const { None }; KEY_COUNT];

/// The index of a key in [`KEYS`].
pub(crate) fn slot_of(key: &str) -> Option<usize> {
    KEYS.iter().position(|k| *k == key)
}

/// The slot index of a key known to be in [`KEYS`].
macro_rules! at {
    ($k:literal) => {{
        const I: usize = {
            let mut i = 0;
            loop {
                if const_eq(KEYS[i], $k) {
                    break i;
                }
                i += 1;
            }
        };
        I
    }};
}

const fn const_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The fields a record's columns may come from, plus the containers of domain fields.
struct Fields<'s> {
    slots: &'s mut Slots,
    /// `context`, `extra` and loguru's `record.extra` objects, in precedence order.
    containers: Vec<(&'static str, Map<String, Value>)>,
    ctx: Map<String, Value>,
}

impl Fields<'_> {
    fn take(&mut self, i: usize) -> Option<Value> {
        self.slots[i].take()
    }

    /// Takes the first non-null value of a domain field: top level first, then the
    /// containers in order.
    fn take_domain(&mut self, i: usize) -> Option<Value> {
        if matches!(self.slots[i], Some(ref v) if !v.is_null()) {
            return self.slots[i].take();
        }
        let key = KEYS[i];
        for (_, m) in &mut self.containers {
            if matches!(m.get(key), Some(v) if !v.is_null()) {
                return m.remove(key);
            }
        }
        None
    }

    /// Puts a value back into context under `key`, unless the context already has one.
    fn keep(&mut self, key: &str, v: Value) {
        if !self.ctx.contains_key(key) {
            self.ctx.insert(key.to_string(), v);
        }
    }
}

/// Builds a record from a JSON object. Never fails.
pub fn record_from_object(map: Map<String, Value>) -> Record {
    let mut slots = NO_SLOTS;
    let mut f = Fields {
        slots: &mut slots,
        containers: Vec::new(),
        ctx: Map::with_capacity(map.len()),
    };
    for (k, v) in map {
        match slot_of(&k) {
            Some(i) => f.slots[i] = Some(v),
            None if k == "_pipewatch" => {
                // The agent's own notes live under this key: keep the record's value aside.
                f.ctx.insert("_pipewatch_original".to_string(), v);
            }
            None => {
                f.ctx.insert(k, v);
            }
        }
    }
    build(f)
}

/// Builds a record from the values of the keys in [`KEYS`] alone, as
/// [`record_from_object`] does for an object without other keys. The caller has kept the
/// other members aside (they go to context before everything this adds to it) and promises
/// that none is `_pipewatch` and that the object holds no `record`, `context` or `extra`
/// (whose handling reads or merges with the other members).
/// The slots are left empty.
pub(crate) fn record_from_slots(slots: &mut Slots) -> Record {
    build(Fields {
        slots,
        containers: Vec::new(),
        ctx: Map::new(),
    })
}

fn build(mut f: Fields<'_>) -> Record {
    let mut rec = Record::new(String::new());

    // Loguru (`serialize=True`): the fields live in `record`.
    let mut loguru = Loguru::default();
    if let Some(Value::Object(mut r)) = f.take(at!("record")) {
        if r.get("level").is_some_and(Value::is_object)
            || r.get("time").is_some_and(Value::is_object)
        {
            loguru.apply(&mut r, &f);
            if let Some(Value::Object(extra)) = r.remove("extra") {
                loguru.extra = Some(extra);
            } else if let Some(v) = r.remove("extra") {
                r.insert("extra".into(), v);
            }
            if !r.is_empty() {
                f.ctx.insert("record".into(), Value::Object(r));
            }
        } else {
            f.slots[at!("record")] = Some(Value::Object(r));
        }
    }

    // Containers of domain fields.
    for i in [at!("context"), at!("extra")] {
        match f.take(i) {
            Some(Value::Object(m)) => f.containers.push((KEYS[i], m)),
            other => f.slots[i] = other,
        }
    }
    if let Some(extra) = loguru.extra.take() {
        f.containers.push(("extra", extra));
    }

    // ECS / pino nested objects that hold column values.
    let mut log_obj = take_object(&mut f, at!("log"));
    let mut error_obj = take_object(&mut f, at!("error"));
    let mut err_obj = take_object(&mut f, at!("err"));

    // Message: loguru's, else the first of `message`, `msg`, structlog's `event`.
    if let Some(m) = loguru.message.take() {
        rec.message = m;
    } else if let Some(m) = [at!("message"), at!("msg"), at!("event")]
        .into_iter()
        .find_map(|i| take_if(&mut f, i, |v| !v.is_null()))
    {
        rec.message = value_to_text(m);
    }

    // Event (needed before the level: `severity` then belongs to the event).
    let event_type = f.take_domain(at!("event_type"));
    let has_event = matches!(event_type, Some(Value::String(ref s)) if !s.is_empty());

    // Level: loguru's level name, else the first of `level`, `levelname`, `severity` (unless
    // it is the event's), ECS `log.level`, Python's `levelno`.
    let mut level_found = true;
    if let Some(v) = loguru.level.take() {
        set_level(&mut rec, Some(v), NumericScale::Python);
    } else {
        let found = [
            (at!("level"), NumericScale::Pino),
            (at!("levelname"), NumericScale::Pino),
            (at!("severity"), NumericScale::Pino),
            (at!("log.level"), NumericScale::Pino),
        ]
        .into_iter()
        .filter(|(i, _)| !(has_event && *i == at!("severity")))
        .find_map(|(i, scale)| take_if(&mut f, i, |v| !v.is_null()).map(|v| (v, scale)));
        if let Some((v, scale)) = found {
            set_level(&mut rec, Some(v), scale);
        } else if let Some(v) = log_obj.as_mut().and_then(|m| m.remove("level")) {
            set_level(&mut rec, Some(v), NumericScale::Pino);
        } else if let Some(v) = take_if(&mut f, at!("levelno"), |v| !v.is_null()) {
            set_level(&mut rec, Some(v), NumericScale::Python);
        } else {
            level_found = false;
        }
    }

    // Time.
    if let Some((key, v)) = loguru.time.take() {
        set_ts(&mut rec, &mut f, key, v);
    } else if let Some(i) = [
        at!("timestamp"),
        at!("@timestamp"),
        at!("time"),
        at!("ts"),
        at!("asctime"),
    ]
    .into_iter()
    .find(|i| matches!(f.slots[*i], Some(ref v) if !v.is_null()))
    {
        if let Some(v) = f.take(i) {
            set_ts(&mut rec, &mut f, KEYS[i], v);
        }
    }

    // Logger.
    rec.logger = loguru.logger.take().or_else(|| {
        [
            at!("logger"),
            at!("logger_name"),
            at!("name"),
            at!("log.logger"),
        ]
        .into_iter()
        .find_map(|i| take_if(&mut f, i, Value::is_string).map(value_to_text))
        .or_else(|| take_str_from(&mut log_obj, "logger"))
    });

    // Traceback.
    rec.traceback = loguru.traceback.take().or_else(|| {
        [
            at!("exception"),
            at!("exc_info"),
            at!("exc_text"),
            at!("traceback"),
            at!("stack_trace"),
            at!("stack"),
            at!("error.stack_trace"),
        ]
        .into_iter()
        .find_map(|i| {
            let tb = f.slots[i].as_ref().and_then(traceback_text)?;
            f.slots[i] = None;
            Some(tb)
        })
        .or_else(|| take_str_from(&mut error_obj, "stack_trace"))
        .or_else(|| take_str_from(&mut err_obj, "stack"))
    });
    for (key, obj) in [("log", log_obj), ("error", error_obj), ("err", err_obj)] {
        if let Some(m) = obj {
            if !m.is_empty() {
                f.keep(key, Value::Object(m));
            }
        }
    }

    // Domain fields: top level, then `context`, then `extra`.
    match f.take_domain(at!("experiment_id")) {
        Some(Value::String(s)) => match Uuid::parse_str(s.trim()) {
            Ok(u) => rec.experiment_id = Some(u),
            Err(_) => f.keep("experiment_id", Value::String(s)),
        },
        Some(other) => f.keep("experiment_id", other),
        None => {}
    }
    for (i, slot) in [
        (at!("node_id"), &mut rec.node_id),
        (at!("stage"), &mut rec.stage),
    ] {
        match f.take_domain(i) {
            Some(Value::String(s)) => *slot = Some(s),
            Some(Value::Number(n)) => *slot = Some(n.to_string()),
            Some(other) => f.keep(KEYS[i], other),
            None => {}
        }
    }
    match f.take_domain(at!("metrics")) {
        Some(m @ Value::Object(_)) => rec.metrics = Some(m),
        Some(other) => f.keep("metrics", other),
        None => {}
    }
    match f.take_domain(at!("progress")) {
        Some(Value::Object(p)) => match progress_from_object(&p) {
            Ok((update, problems)) => {
                rec.progress = Some(update);
                if !problems.is_empty() {
                    rec.note("progress_error", problems.join("; "));
                }
            }
            Err(why) => {
                rec.note("progress_error", why);
                f.keep("progress", Value::Object(p));
            }
        },
        Some(other) => {
            rec.note("progress_error", "progress is not an object");
            f.keep("progress", other);
        }
        None => {}
    }
    match event_type {
        Some(Value::String(event_type)) if has_event => {
            let severity = match f.take_domain(at!("severity")) {
                Some(v) => match level_from_value(&v, NumericScale::Pino) {
                    Some(l) => l,
                    None => {
                        rec.note("severity_raw", v);
                        rec.level
                    }
                },
                None => rec.level,
            };
            if !level_found {
                // An event record without a level of its own is logged at the event's severity.
                rec.level = severity;
            }
            let details = match f.take_domain(at!("details")) {
                Some(Value::Object(m)) => m,
                Some(other) => {
                    let mut m = Map::new();
                    m.insert("value".into(), other);
                    m
                }
                None => Map::new(),
            };
            rec.event = Some(EventSpec {
                event_type,
                severity,
                message: None,
                details,
            });
        }
        Some(other) => f.keep("event_type", other),
        None => {}
    }

    // Whatever is left: top-level slots back under their keys, then the containers' keys.
    for (key, slot) in KEYS.iter().zip(0..KEY_COUNT) {
        if let Some(v) = f.slots[slot].take() {
            f.keep(key, v);
        }
    }
    let containers = std::mem::take(&mut f.containers);
    for (name, m) in containers {
        for (k, v) in m {
            if f.ctx.contains_key(&k) {
                let dotted = format!("{name}.{k}");
                f.keep(&dotted, v);
            } else {
                f.ctx.insert(k, v);
            }
        }
    }
    // Notes made above must survive: merge them into the final context.
    let notes = rec.context.remove("_pipewatch");
    rec.context = f.ctx;
    if let Some(n) = notes {
        rec.context.insert("_pipewatch".into(), n);
    }
    rec
}

/// What a loguru `record` object contributed.
#[derive(Default)]
struct Loguru {
    message: Option<String>,
    level: Option<Value>,
    time: Option<(&'static str, Value)>,
    logger: Option<String>,
    traceback: Option<String>,
    extra: Option<Map<String, Value>>,
}

impl Loguru {
    fn apply(&mut self, r: &mut Map<String, Value>, f: &Fields<'_>) {
        if let Some(m) = r.remove("message") {
            self.message = Some(value_to_text(m));
        }
        match r.remove("level") {
            Some(Value::Object(mut l)) => {
                self.level = l.remove("name").or_else(|| l.remove("no"));
            }
            Some(other) => self.level = Some(other),
            None => {}
        }
        match r.remove("time") {
            Some(Value::Object(mut t)) => {
                self.time = t
                    .remove("timestamp")
                    .map(|v| ("record.time.timestamp", v))
                    .or_else(|| t.remove("repr").map(|v| ("record.time.repr", v)));
            }
            Some(other) => self.time = Some(("record.time", other)),
            None => {}
        }
        if let Some(Value::String(n)) = r.get("name") {
            self.logger = Some(n.clone());
            r.remove("name");
        }
        match r.remove("exception") {
            Some(Value::Object(e)) => {
                let text = f.ctx.get("text").and_then(Value::as_str).unwrap_or("");
                self.traceback = match e.get("traceback") {
                    Some(Value::String(tb)) if !tb.is_empty() => Some(tb.clone()),
                    _ => match text.find("Traceback (most recent call last)") {
                        Some(i) => Some(text[i..].trim_end().to_string()),
                        None => exception_summary(&e),
                    },
                };
            }
            Some(Value::Null) | None => {}
            Some(other) => {
                r.insert("exception".into(), other);
            }
        }
    }
}

/// `"Type: value"` from an exception object, when it has either.
fn exception_summary(e: &Map<String, Value>) -> Option<String> {
    let ty = e.get("type").and_then(Value::as_str);
    let val = e.get("value").and_then(Value::as_str);
    match (ty, val) {
        (Some(t), Some(v)) => Some(format!("{t}: {v}")),
        (Some(t), None) => Some(t.to_string()),
        (None, Some(v)) => Some(v.to_string()),
        (None, None) => None,
    }
}

/// A traceback from a value: a non-empty string, a list of lines, or an exception object.
fn traceback_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_string) => {
            let lines: Vec<&str> = a.iter().filter_map(Value::as_str).collect();
            if lines.iter().all(|l| l.ends_with('\n')) {
                Some(lines.concat().trim_end().to_string())
            } else {
                Some(lines.join("\n"))
            }
        }
        Value::Object(m) => match m.get("traceback").or_else(|| m.get("stack")) {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            _ => exception_summary(m),
        },
        _ => None,
    }
}

fn take_object(f: &mut Fields<'_>, i: usize) -> Option<Map<String, Value>> {
    match f.take(i) {
        Some(Value::Object(m)) => Some(m),
        other => {
            f.slots[i] = other;
            None
        }
    }
}

fn take_if(f: &mut Fields<'_>, i: usize, pred: impl Fn(&Value) -> bool) -> Option<Value> {
    if f.slots[i].as_ref().is_some_and(pred) {
        f.slots[i].take()
    } else {
        None
    }
}

fn take_str_from(obj: &mut Option<Map<String, Value>>, key: &str) -> Option<String> {
    let m = obj.as_mut()?;
    match m.get(key) {
        Some(Value::String(s)) if !s.is_empty() => {
            let s = s.clone();
            m.remove(key);
            Some(s)
        }
        _ => None,
    }
}

/// A string value as is; anything else as compact JSON.
pub fn value_to_text(v: Value) -> String {
    match v {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

fn set_level(rec: &mut Record, v: Option<Value>, scale: NumericScale) {
    let Some(v) = v else { return };
    match level_from_value(&v, scale) {
        Some(l) => rec.level = l,
        None => {
            rec.level = Level::Info;
            rec.note("level_raw", v);
        }
    }
}

fn set_ts(rec: &mut Record, f: &mut Fields<'_>, key: &'static str, v: Value) {
    match ts_from_value(&v) {
        Some(t) => rec.ts = Some(t),
        None => {
            rec.note("ts_error", format!("cannot read `{key}` as a time"));
            f.keep(key, v);
        }
    }
}

/// The five statuses of `pipeline_progress`, with common spellings of each.
fn normalise_status(s: &str) -> Option<&'static str> {
    Some(match s.trim().to_ascii_lowercase().as_str() {
        "pending" | "queued" | "waiting" | "scheduled" => "pending",
        "running" | "started" | "in_progress" | "in-progress" | "active" | "processing" => {
            "running"
        }
        "completed" | "complete" | "done" | "success" | "succeeded" | "finished" | "ok" => {
            "completed"
        }
        "failed" | "failure" | "error" | "errored" => "failed",
        "cancelled" | "canceled" | "aborted" => "cancelled",
        _ => return None,
    })
}

fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().trim_end_matches('%').parse().ok(),
        _ => None,
    }
    .filter(|x: &f64| x.is_finite())
}

fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|x| x.abs() < 9e18).map(|x| x as i64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A progress update from a `progress` object, with the problems found in its fields; `Err`
/// when it has no usable `node_id`.
pub fn progress_from_object(
    p: &Map<String, Value>,
) -> Result<(ProgressUpdate, Vec<String>), String> {
    let node_id = p
        .get("node_id")
        .and_then(as_text)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| "progress has no node_id".to_string())?;
    let mut u = ProgressUpdate {
        node_id,
        ..ProgressUpdate::default()
    };
    let mut problems = Vec::new();
    let mut details = Map::new();
    for (k, v) in p {
        if v.is_null() {
            continue;
        }
        match k.as_str() {
            "node_id" => {}
            "parent_node_id" | "parent" => u.parent_node_id = as_text(v),
            "name" => u.name = as_text(v),
            "level" => match v.as_str().map(|s| s.trim().to_ascii_lowercase()) {
                Some(l) if matches!(l.as_str(), "pipeline" | "phase" | "step" | "substep") => {
                    u.level = Some(l)
                }
                _ => problems.push(format!("unknown progress level {v}")),
            },
            "status" => match v.as_str().and_then(normalise_status) {
                Some(s) => u.status = Some(s.to_string()),
                None => problems.push(format!("unknown progress status {v}")),
            },
            "percent" | "progress_percent" => match as_f64(v) {
                Some(x) => u.percent = Some(x.clamp(0.0, 100.0)),
                None => problems.push(format!("progress percent is not a number: {v}")),
            },
            "items_done" => match as_i64(v) {
                Some(x) if x >= 0 => u.items_done = Some(x),
                _ => problems.push(format!("items_done is not a count: {v}")),
            },
            "items_total" => match as_i64(v) {
                Some(x) if x >= 0 => u.items_total = Some(x),
                _ => problems.push(format!("items_total is not a count: {v}")),
            },
            "details" => match v {
                Value::Object(m) => {
                    for (dk, dv) in m {
                        details.insert(dk.clone(), dv.clone());
                    }
                }
                other => {
                    details.insert("details".into(), other.clone());
                }
            },
            _ => {
                details.insert(k.clone(), v.clone());
            }
        }
    }
    if u.percent.is_none() {
        if let (Some(done), Some(total)) = (u.items_done, u.items_total) {
            if total > 0 {
                u.percent = Some((done as f64 * 100.0 / total as f64).clamp(0.0, 100.0));
            }
        }
    }
    if !details.is_empty() {
        u.details = Some(Value::Object(details));
    }
    Ok((u, problems))
}
