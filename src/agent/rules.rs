//! Rules: progress, events and context derived from the lines daemons already write.
//!
//! A daemon's `[[daemons.NAME.rules]]` are compiled once when the config is loaded
//! ([`Rules::compile`]), which checks everything that can be checked without a record: the
//! regexes, the keys, every `{template}` and every literal value. [`Rules::apply`] then runs in
//! the tail task, once per parsed record and before routing: one `RegexSet` pass per distinct
//! field decides which rules match (a field with one rule asks `is_match`), only those whose
//! outputs name a capture run their regex again for `captures`, and their output fills the
//! record's `progress`, `event`, columns and context exactly as if the record had carried them
//! itself, so routing treats both alike.
//!
//! Semantics, in short:
//! * Sticky values (a [`Sticky`] per file) are applied first and only fill what the record
//!   lacks: a record's own value wins over a sticky one.
//! * Every rule matches against the record as it stands after the sticky values, before any
//!   rule applied; matching rules apply in order and `stop = true` ends the list.
//! * A `set` overwrites the record's value (the later rule wins); a value that renders empty
//!   sets nothing. `progress` and `event` fill the record's single slot only when it is still
//!   empty: the record's own progress or event wins, then the first rule that produced one.
//! * A value that cannot be converted at run time (an item count that is not a number, an
//!   unknown status) leaves that field unset and is noted under
//!   `context._pipewatch.rule_error`; nothing here fails or panics on input.
//!
//! This module does no I/O and knows no database type (`check-config --sample` reads its file
//! in `cli::sample` and calls [`report`]). It depends on the config's raw rules and on
//! `suggest`, never on the config loader or the exit codes.

use crate::config::raw::RawRule;
use crate::model::{EventSpec, Level, ProgressUpdate, Record};
use crate::suggest::suggest;
use regex::{Captures, Regex, RegexSet};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use uuid::Uuid;

/// The keys a `progress` table accepts.
const PROGRESS_KEYS: &[&str] = &[
    "node_id",
    "parent_node_id",
    "level",
    "name",
    "status",
    "percent",
    "items_done",
    "items_total",
    "details",
];
/// Progress fields that a capture of the same name fills when the table does not (CONTRACT.md
/// §2); `level` and `parent_node_id` are not among them, since a capture named `level` is far
/// more often a log level.
const CAPTURE_FILLS: &[&str] = &[
    "node_id",
    "name",
    "status",
    "percent",
    "items_done",
    "items_total",
];
/// The keys an `event` table accepts.
const EVENT_KEYS: &[&str] = &["event_type", "severity", "message", "details"];
/// The values of `pipeline_progress.level`.
const PROGRESS_LEVELS: &[&str] = &["pipeline", "phase", "step", "substep"];
/// The values of `pipeline_progress.status`.
const STATUSES: &[&str] = &["pending", "running", "completed", "failed", "cancelled"];

/// One problem with one rule, for the config loader to locate.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleProblem {
    /// 0-based index of the rule in its daemon's list.
    pub index: usize,
    /// The rule's key at fault (`match`, `progress.node_id`, …).
    pub key: String,
    /// The offending value as written in the file, when there is one.
    pub value: Option<String>,
    /// What is wrong and, where possible, how to fix it.
    pub reason: String,
}

/// Values set by sticky rules, in force for the following records of the same file.
///
/// Serialised into the checkpoint row (jsonb) so it survives restarts; copied to the next file
/// of the daemon on rotation. Keys are `set` keys (`stage`, `node_id`, a context key …).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sticky(pub Map<String, Value>);

impl Sticky {
    /// The JSON object stored in the checkpoint row.
    pub fn to_json(&self) -> Value {
        Value::Object(self.0.clone())
    }

    /// Reads a stored value back; anything but an object yields no sticky values.
    pub fn from_json(v: &Value) -> Sticky {
        match v {
            Value::Object(m) => Sticky(m.clone()),
            _ => Sticky::default(),
        }
    }
}

/// What a rule's regex runs over, and what `{record.PATH}` reads.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    Message,
    Level,
    Logger,
    Stage,
    NodeId,
    ExperimentId,
    Traceback,
    Ts,
    /// A dotted path inside the record's context.
    Context(Vec<String>),
}

impl Field {
    /// Parses `message`, `logger`, `context.worker`, `worker`, `extra.a.b` (a context path).
    fn parse(s: &str) -> Result<Field, String> {
        let s = s.trim();
        Ok(match s {
            "message" => Field::Message,
            "level" => Field::Level,
            "logger" => Field::Logger,
            "stage" => Field::Stage,
            "node_id" => Field::NodeId,
            "experiment_id" => Field::ExperimentId,
            "traceback" => Field::Traceback,
            "ts" => Field::Ts,
            "" => return Err("is empty; name a record field such as `message`".into()),
            "context" => {
                return Err(
                    "names the whole context; name a key inside it, e.g. `context.worker`".into(),
                )
            }
            _ => {
                let path = s.strip_prefix("context.").unwrap_or(s);
                let parts: Vec<String> = path.split('.').map(str::to_string).collect();
                if parts.iter().any(String::is_empty) {
                    return Err("has an empty path segment".into());
                }
                Field::Context(parts)
            }
        })
    }

    /// The field's text in `r`, borrowed where possible; `None` when absent.
    fn text<'r>(&self, r: &'r Record) -> Option<Cow<'r, str>> {
        match self {
            Field::Message => Some(Cow::Borrowed(r.message.as_str())),
            Field::Level => Some(Cow::Borrowed(r.level.as_str())),
            Field::Logger => r.logger.as_deref().map(Cow::Borrowed),
            Field::Stage => r.stage.as_deref().map(Cow::Borrowed),
            Field::NodeId => r.node_id.as_deref().map(Cow::Borrowed),
            Field::ExperimentId => match r.experiment_id {
                Some(u) => Some(Cow::Owned(u.to_string())),
                None => r.context.get("experiment_id").and_then(value_text),
            },
            Field::Traceback => r.traceback.as_deref().map(Cow::Borrowed),
            Field::Ts => r.ts.map(|t| Cow::Owned(t.to_rfc3339())),
            Field::Context(path) => {
                let (first, rest) = path.split_first()?;
                let mut v = r.context.get(first)?;
                for p in rest {
                    v = v.as_object()?.get(p)?;
                }
                value_text(v)
            }
        }
    }

    /// The spelling used in `describe`.
    fn name(&self) -> String {
        match self {
            Field::Message => "message".into(),
            Field::Level => "level".into(),
            Field::Logger => "logger".into(),
            Field::Stage => "stage".into(),
            Field::NodeId => "node_id".into(),
            Field::ExperimentId => "experiment_id".into(),
            Field::Traceback => "traceback".into(),
            Field::Ts => "ts".into(),
            Field::Context(p) => format!("context.{}", p.join(".")),
        }
    }
}

/// A JSON value as text: strings as they are, null as absent, anything else as JSON.
fn value_text(v: &Value) -> Option<Cow<'_, str>> {
    match v {
        Value::String(s) => Some(Cow::Borrowed(s.as_str())),
        Value::Null => None,
        other => Some(Cow::Owned(other.to_string())),
    }
}

/// The capture groups of one rule's match. A rule whose outputs name no capture does not run
/// its regex again after the `RegexSet` decided that it matches: its groups read as empty.
enum Caps<'t> {
    None,
    Some(Captures<'t>),
}

impl Caps<'_> {
    /// The text of group `i`; empty when the group did not participate.
    fn get(&self, i: usize) -> &str {
        match self {
            Caps::None => "",
            Caps::Some(c) => c.get(i).map_or("", |m| m.as_str()),
        }
    }
}

/// One piece of a template.
#[derive(Debug, Clone)]
enum Piece {
    Lit(String),
    /// A capture group of the rule's regex, by index.
    Cap(usize),
    /// `{record.PATH}`.
    Field(Field),
}

/// A value with `{capture}` and `{record.PATH}` placeholders, checked at compile time.
#[derive(Debug, Clone)]
struct Template {
    source: String,
    pieces: Vec<Piece>,
}

impl Template {
    /// Whether rendering reads the record's context (`{record.context.…}`, or
    /// `{record.experiment_id}`, which falls back to it).
    fn reads_context(&self) -> bool {
        self.pieces
            .iter()
            .any(|p| matches!(p, Piece::Field(Field::Context(_) | Field::ExperimentId)))
    }

    /// Whether rendering reads a capture group of the rule's regex.
    fn reads_captures(&self) -> bool {
        self.pieces.iter().any(|p| matches!(p, Piece::Cap(_)))
    }

    /// Parses `src`; capture names are checked against `re` when it compiled.
    fn parse(src: &str, re: Option<&Regex>) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut chars = src.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '}' => return Err("unmatched `}` (write `}}` for a literal brace)".into()),
                '{' => {
                    let mut name = String::new();
                    let mut closed = false;
                    for c in chars.by_ref() {
                        if c == '}' {
                            closed = true;
                            break;
                        }
                        if c == '{' {
                            return Err(
                                "`{` inside a placeholder (write `{{` for a literal brace)".into(),
                            );
                        }
                        name.push(c);
                    }
                    if !closed {
                        return Err("unclosed `{` (write `{{` for a literal brace)".into());
                    }
                    if !lit.is_empty() {
                        pieces.push(Piece::Lit(std::mem::take(&mut lit)));
                    }
                    pieces.push(placeholder(name.trim(), re)?);
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            pieces.push(Piece::Lit(lit));
        }
        Ok(Template {
            source: src.to_string(),
            pieces,
        })
    }

    /// A template that is exactly one capture group.
    fn capture(index: usize, name: &str) -> Template {
        Template {
            source: format!("{{{name}}}"),
            pieces: vec![Piece::Cap(index)],
        }
    }

    /// The text when the template has no placeholder.
    fn literal(&self) -> Option<&str> {
        match self.pieces.as_slice() {
            [] => Some(""),
            [Piece::Lit(s)] => Some(s),
            _ => None,
        }
    }

    fn render(&self, caps: &Caps<'_>, r: &Record) -> String {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Lit(s) => out.push_str(s),
                Piece::Cap(i) => out.push_str(caps.get(*i)),
                Piece::Field(f) => {
                    if let Some(t) = f.text(r) {
                        out.push_str(&t);
                    }
                }
            }
        }
        out
    }
}

/// Resolves the name inside `{…}`.
fn placeholder(name: &str, re: Option<&Regex>) -> Result<Piece, String> {
    if name.is_empty() {
        return Err(
            "empty `{}`: name a capture or `record.PATH` (write `{{` for a literal brace)".into(),
        );
    }
    if let Some(path) = name.strip_prefix("record.") {
        return Field::parse(path)
            .map(Piece::Field)
            .map_err(|e| format!("`{{{name}}}`: the record path {e}"));
    }
    let Some(re) = re else {
        // The regex did not compile; that is reported already, so capture names go unchecked.
        return Ok(Piece::Cap(0));
    };
    if let Some(i) = capture_index(re, name) {
        return Ok(Piece::Cap(i));
    }
    let names: Vec<&str> = re.capture_names().flatten().collect();
    let mut reason = format!("`{{{name}}}` names a capture that the regex does not define");
    if let Some(best) = suggest(name, &names) {
        let _ = write!(reason, " (did you mean `{{{best}}}`?)");
    }
    if names.is_empty() {
        reason.push_str("; it defines no named capture (write `(?P<name>…)`)");
    } else {
        let _ = write!(reason, "; its captures: {}", names.join(", "));
    }
    reason.push_str("; `{record.PATH}` reads a record field");
    Err(reason)
}

fn capture_index(re: &Regex, name: &str) -> Option<usize> {
    re.capture_names().position(|n| n == Some(name))
}

/// A value that is either a template or a literal number from the TOML file.
#[derive(Debug, Clone)]
enum Val {
    Text(Template),
    Number(f64),
}

impl Val {
    fn render(&self, caps: &Caps<'_>, r: &Record) -> String {
        match self {
            Val::Text(t) => t.render(caps, r),
            Val::Number(n) => number_text(*n),
        }
    }

    fn source(&self) -> String {
        match self {
            Val::Text(t) => t.source.clone(),
            Val::Number(n) => number_text(*n),
        }
    }
}

fn number_text(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        n.to_string()
    }
}

/// A `details` or `set` value: a template, or a literal JSON value from a non-string TOML value.
#[derive(Debug, Clone)]
enum DetailVal {
    Text(Template),
    Literal(Value),
}

impl DetailVal {
    fn render(&self, caps: &Caps<'_>, r: &Record) -> Value {
        match self {
            DetailVal::Text(t) => Value::String(t.render(caps, r)),
            DetailVal::Literal(v) => v.clone(),
        }
    }
}

/// A compiled `progress` table.
#[derive(Debug, Clone)]
struct ProgressSpec {
    node_id: Val,
    parent_node_id: Option<Val>,
    level: Option<Val>,
    name: Option<Val>,
    status: Option<Val>,
    percent: Option<Val>,
    items_done: Option<Val>,
    items_total: Option<Val>,
    details: Vec<(String, DetailVal)>,
}

/// A compiled `severity`.
#[derive(Debug, Clone)]
enum Severity {
    Fixed(Level),
    Text(Template),
}

/// A compiled `event` table.
#[derive(Debug, Clone)]
struct EventRule {
    event_type: Template,
    severity: Severity,
    message: Option<Template>,
    details: Vec<(String, DetailVal)>,
}

/// One compiled rule.
#[derive(Debug, Clone)]
struct Rule {
    regex: Regex,
    field: Field,
    progress: Option<ProgressSpec>,
    event: Option<EventRule>,
    set: Vec<(String, DetailVal)>,
    sticky: bool,
    stop: bool,
    /// Whether the outputs name a capture group (see [`Rule::outputs_read_captures`]).
    needs_captures: bool,
}

impl Rule {
    /// Whether what this rule produces reads the record's context (a template naming it).
    fn outputs_read_context(&self) -> bool {
        self.any_template(Template::reads_context)
    }

    /// Whether what this rule produces names a capture group: otherwise its regex need not
    /// run again for captures once the `RegexSet` found that it matches.
    fn outputs_read_captures(&self) -> bool {
        self.any_template(Template::reads_captures)
    }

    /// Whether any template of the rule's outputs satisfies `f`.
    fn any_template(&self, f: fn(&Template) -> bool) -> bool {
        let val = |v: &Val| matches!(v, Val::Text(t) if f(t));
        let details = |d: &[(String, DetailVal)]| {
            d.iter()
                .any(|(_, v)| matches!(v, DetailVal::Text(t) if f(t)))
        };
        let progress = self.progress.as_ref().is_some_and(|p| {
            val(&p.node_id)
                || [&p.parent_node_id, &p.level, &p.name, &p.status]
                    .into_iter()
                    .chain([&p.percent, &p.items_done, &p.items_total])
                    .flatten()
                    .any(val)
                || details(&p.details)
        });
        let event = self.event.as_ref().is_some_and(|e| {
            f(&e.event_type)
                || matches!(&e.severity, Severity::Text(t) if f(t))
                || e.message.as_ref().is_some_and(f)
                || details(&e.details)
        });
        progress || event || details(&self.set)
    }
}

/// The rules that read one field, matched together by one `RegexSet`.
#[derive(Debug, Clone)]
struct Group {
    field: Field,
    set: RegexSet,
    /// Rule indices, in the order of the set's patterns.
    members: Vec<usize>,
}

/// A daemon's compiled rules.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Vec<Rule>,
    groups: Vec<Group>,
    /// Whether matching reads the record's context (a context path, or `experiment_id`,
    /// which falls back to it): then a record's raw context is expanded before matching.
    match_reads_context: bool,
    /// Whether a rule's output reads the record's context: then a matched record's raw
    /// context is expanded before the outputs are rendered.
    outputs_read_context: bool,
}

/// Which rules matched one record: a bit per rule, kept on the stack for up to 128 rules.
enum Matched {
    Bits(u128),
    Many(Vec<bool>),
}

impl Matched {
    fn new(rules: usize) -> Matched {
        if rules <= 128 {
            Matched::Bits(0)
        } else {
            Matched::Many(vec![false; rules])
        }
    }

    fn set(&mut self, i: usize) {
        match self {
            Matched::Bits(b) => {
                if i < 128 {
                    *b |= 1 << i;
                }
            }
            Matched::Many(v) => {
                if let Some(m) = v.get_mut(i) {
                    *m = true;
                }
            }
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Matched::Bits(b) => *b == 0,
            Matched::Many(v) => !v.contains(&true),
        }
    }

    fn get(&self, i: usize) -> bool {
        match self {
            Matched::Bits(b) => i < 128 && b & (1 << i) != 0,
            Matched::Many(v) => v.get(i).copied().unwrap_or(false),
        }
    }
}

/// A list that holds its first item inline: most records match one rule, and most rules set
/// one value, so a list of one allocates nothing.
#[derive(Debug, Clone)]
struct OneOrMore<T> {
    first: Option<T>,
    rest: Vec<T>,
}

impl<T> Default for OneOrMore<T> {
    fn default() -> Self {
        OneOrMore {
            first: None,
            rest: Vec::new(),
        }
    }
}

impl<T> OneOrMore<T> {
    fn push(&mut self, item: T) {
        if self.first.is_none() {
            self.first = Some(item);
        } else {
            self.rest.push(item);
        }
    }

    fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    fn iter(&self) -> impl Iterator<Item = &T> {
        self.first.iter().chain(&self.rest)
    }
}

impl<T> IntoIterator for OneOrMore<T> {
    type Item = T;
    type IntoIter = std::iter::Chain<std::option::IntoIter<T>, std::vec::IntoIter<T>>;

    fn into_iter(self) -> Self::IntoIter {
        self.first.into_iter().chain(self.rest)
    }
}

/// What one matching rule produces for one record.
#[derive(Debug, Clone, Default)]
struct Output {
    index: usize,
    progress: Option<ProgressUpdate>,
    event: Option<EventSpec>,
    set: OneOrMore<(String, Value)>,
    sticky: bool,
    errors: Vec<String>,
}

/// Collects the problems of one rule.
struct Problems<'a> {
    index: usize,
    list: &'a mut Vec<RuleProblem>,
}

impl Problems<'_> {
    fn push(&mut self, key: impl Into<String>, value: Option<String>, reason: impl Into<String>) {
        self.list.push(RuleProblem {
            index: self.index,
            key: key.into(),
            value,
            reason: reason.into(),
        });
    }
}

/// A string as it is most likely written in TOML: a literal string when it has backslashes.
fn quote(s: &str) -> String {
    if s.contains('\\') && !s.contains('\'') && !s.contains('\n') {
        format!("'{s}'")
    } else {
        format!("{s:?}")
    }
}

/// A TOML value as written in the file, for error messages.
fn toml_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => quote(s),
        other => other.to_string(),
    }
}

/// A TOML value as JSON (dates as their text).
fn toml_to_json(v: &toml::Value) -> Value {
    match v {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Float(f) => {
            serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number)
        }
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => Value::Object(
            t.iter()
                .map(|(k, v)| (k.clone(), toml_to_json(v)))
                .collect(),
        ),
    }
}

/// The text of a regex error without the echoed pattern.
fn regex_error(e: &regex::Error) -> String {
    let text = e.to_string();
    let last = text.lines().last().unwrap_or("").trim();
    last.strip_prefix("error: ").unwrap_or(last).to_string()
}

/// Runtime conversions, shared with compile-time checks of literal values.
fn conv_count(s: &str) -> Result<i64, String> {
    let t = s.trim();
    if let Ok(n) = t.parse::<i64>() {
        return if n >= 0 {
            Ok(n)
        } else {
            Err("must not be negative".into())
        };
    }
    match t.parse::<f64>() {
        Ok(f) if f.fract() == 0.0 && (0.0..9.0e15).contains(&f) => Ok(f as i64),
        _ => Err("not a whole number of items".into()),
    }
}

fn conv_percent(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let t = t.strip_suffix('%').unwrap_or(t).trim_end();
    match t.parse::<f64>() {
        Ok(f) if (0.0..=100.0).contains(&f) => Ok(f),
        Ok(_) => Err("a percentage must be between 0 and 100".into()),
        Err(_) => Err("not a number".into()),
    }
}

fn conv_status(s: &str) -> Result<String, String> {
    let t = s.trim().to_ascii_lowercase();
    if STATUSES.contains(&t.as_str()) {
        Ok(t)
    } else {
        Err(format!("not a status; use one of {}", STATUSES.join(", ")))
    }
}

fn conv_level(s: &str) -> Result<String, String> {
    let t = s.trim().to_ascii_lowercase();
    if PROGRESS_LEVELS.contains(&t.as_str()) {
        Ok(t)
    } else {
        Err(format!(
            "not a progress level; use one of {}",
            PROGRESS_LEVELS.join(", ")
        ))
    }
}

fn conv_severity(s: &str) -> Result<Level, String> {
    Level::from_db(s.trim())
        .ok_or_else(|| "not a severity; use one of DEBUG, INFO, WARNING, ERROR, CRITICAL".into())
}

/// A compile-time check of a literal text value.
type TextCheck = fn(&str) -> Result<String, String>;

/// Compiles a string template; when it is a literal (no placeholders), `check` must accept it.
fn template_val(
    p: &mut Problems<'_>,
    key: &str,
    s: &str,
    re: Option<&Regex>,
    check: impl Fn(&str) -> Result<(), String>,
) -> Option<Val> {
    let checked = Template::parse(s, re).and_then(|t| match t.literal().map(&check) {
        Some(Err(e)) => Err(e),
        _ => Ok(t),
    });
    match checked {
        Ok(t) => Some(Val::Text(t)),
        Err(e) => {
            p.push(key, Some(quote(s)), e);
            None
        }
    }
}

/// Compiles one table value that must be a string template (numbers are taken as text).
fn text_val(
    p: &mut Problems<'_>,
    key: &str,
    v: &toml::Value,
    re: Option<&Regex>,
    check: Option<TextCheck>,
) -> Option<Val> {
    match v {
        toml::Value::String(s) => template_val(p, key, s, re, |lit| match check {
            Some(check) => check(lit).map(drop),
            None => Ok(()),
        }),
        toml::Value::Integer(_) | toml::Value::Float(_) if check.is_none() => {
            let text = toml_text(v);
            Some(Val::Text(Template {
                source: text.clone(),
                pieces: vec![Piece::Lit(text)],
            }))
        }
        other => {
            p.push(key, Some(toml_text(other)), "must be a string");
            None
        }
    }
}

/// Compiles a numeric table value: a TOML number or a template converted at run time.
fn number_val(
    p: &mut Problems<'_>,
    key: &str,
    v: &toml::Value,
    re: Option<&Regex>,
    check: fn(&str) -> Result<f64, String>,
) -> Option<Val> {
    match v {
        toml::Value::Integer(_) | toml::Value::Float(_) => {
            let text = toml_text(v);
            match check(&text) {
                Ok(n) => Some(Val::Number(n)),
                Err(e) => {
                    p.push(key, Some(text), e);
                    None
                }
            }
        }
        toml::Value::String(s) => template_val(p, key, s, re, |lit| check(lit).map(drop)),
        other => {
            p.push(
                key,
                Some(toml_text(other)),
                "must be a number or a string template",
            );
            None
        }
    }
}

/// Compiles a `details` table or a `set` table: strings are templates, other values literal.
fn detail_table(
    p: &mut Problems<'_>,
    prefix: &str,
    table: &BTreeMap<String, toml::Value>,
    re: Option<&Regex>,
) -> Vec<(String, DetailVal)> {
    let mut out = Vec::new();
    for (k, v) in table {
        let key = format!("{prefix}.{k}");
        if k.trim().is_empty() {
            p.push(key, None, "an empty key names nothing");
            continue;
        }
        if k == "_pipewatch" {
            p.push(
                key,
                None,
                "`_pipewatch` is reserved for the agent's own notes; choose another key",
            );
            continue;
        }
        match v {
            toml::Value::String(s) => match Template::parse(s, re) {
                Ok(t) => out.push((k.clone(), DetailVal::Text(t))),
                Err(e) => p.push(key, Some(quote(s)), e),
            },
            other => out.push((k.clone(), DetailVal::Literal(toml_to_json(other)))),
        }
    }
    out
}

/// The `details` value of a table, which must itself be a table.
fn details_of(
    p: &mut Problems<'_>,
    prefix: &str,
    v: Option<&toml::Value>,
    re: Option<&Regex>,
) -> Vec<(String, DetailVal)> {
    match v {
        None => Vec::new(),
        Some(toml::Value::Table(t)) => {
            let map: BTreeMap<String, toml::Value> =
                t.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            detail_table(p, &format!("{prefix}.details"), &map, re)
        }
        Some(other) => {
            p.push(
                format!("{prefix}.details"),
                Some(toml_text(other)),
                "must be a table, e.g. { tile = \"{tile}\" }",
            );
            Vec::new()
        }
    }
}

/// Reports keys of `table` that are not in `valid`, with a suggestion.
fn unknown_keys(
    p: &mut Problems<'_>,
    prefix: &str,
    table: &BTreeMap<String, toml::Value>,
    valid: &[&str],
) {
    for k in table.keys() {
        if !valid.contains(&k.as_str()) {
            let mut reason = format!("unknown key `{k}`");
            if let Some(best) = suggest(k, valid) {
                let _ = write!(reason, " (did you mean `{best}`?)");
            }
            let _ = write!(reason, "; valid keys here: {}", valid.join(", "));
            p.push(format!("{prefix}.{k}"), None, reason);
        }
    }
}

fn compile_progress(
    p: &mut Problems<'_>,
    table: &BTreeMap<String, toml::Value>,
    re: Option<&Regex>,
) -> Option<ProgressSpec> {
    unknown_keys(p, "progress", table, PROGRESS_KEYS);
    let before = p.list.len();
    // A table entry wins; otherwise a capture of the same name fills the field.
    let field = |name: &str, p: &mut Problems<'_>| -> Option<Val> {
        let key = format!("progress.{name}");
        match table.get(name) {
            Some(v) => match name {
                "percent" => number_val(p, &key, v, re, conv_percent),
                "items_done" | "items_total" => {
                    number_val(p, &key, v, re, |s| conv_count(s).map(|n| n as f64))
                }
                "status" => text_val(p, &key, v, re, Some(conv_status)),
                "level" => text_val(p, &key, v, re, Some(conv_level)),
                _ => text_val(p, &key, v, re, None),
            },
            None if CAPTURE_FILLS.contains(&name) => {
                let re = re?;
                let i = capture_index(re, name)?;
                Some(Val::Text(Template::capture(i, name)))
            }
            None => None,
        }
    };
    let node_id = field("node_id", p);
    let parent_node_id = field("parent_node_id", p);
    let level = field("level", p);
    let name = field("name", p);
    let status = field("status", p);
    let percent = field("percent", p);
    let items_done = field("items_done", p);
    let items_total = field("items_total", p);
    let details = details_of(p, "progress", table.get("details"), re);
    let node_id = match node_id {
        Some(n) => n,
        None => {
            if !table.contains_key("node_id") && re.is_some() {
                p.push(
                    "progress.node_id",
                    None,
                    "is required: give `node_id` in the progress table or name a capture \
                     `(?P<node_id>…)` in `match`",
                );
            }
            return None;
        }
    };
    if p.list.len() != before {
        return None;
    }
    Some(ProgressSpec {
        node_id,
        parent_node_id,
        level,
        name,
        status,
        percent,
        items_done,
        items_total,
        details,
    })
}

fn compile_event(
    p: &mut Problems<'_>,
    table: &BTreeMap<String, toml::Value>,
    re: Option<&Regex>,
) -> Option<EventRule> {
    unknown_keys(p, "event", table, EVENT_KEYS);
    let before = p.list.len();
    let template = |p: &mut Problems<'_>, key: &str| -> Option<Template> {
        match text_val(p, &format!("event.{key}"), table.get(key)?, re, None)? {
            Val::Text(t) => Some(t),
            Val::Number(_) => None,
        }
    };
    let event_type = template(p, "event_type");
    if event_type.is_none() && !table.contains_key("event_type") {
        p.push(
            "event.event_type",
            None,
            "is required: name the event, e.g. event_type = \"out_of_memory\"",
        );
    }
    if let Some(lit) = event_type.as_ref().and_then(Template::literal) {
        if lit.trim().is_empty() {
            p.push("event.event_type", Some("\"\"".into()), "must not be empty");
        }
    }
    let severity = match template(p, "severity") {
        None => Severity::Fixed(Level::Info),
        Some(t) => match t.literal().map(conv_severity) {
            Some(Ok(level)) => Severity::Fixed(level),
            Some(Err(e)) => {
                p.push("event.severity", Some(quote(&t.source)), e);
                Severity::Fixed(Level::Info)
            }
            None => Severity::Text(t),
        },
    };
    let message = template(p, "message");
    let details = details_of(p, "event", table.get("details"), re);
    if p.list.len() != before {
        return None;
    }
    Some(EventRule {
        event_type: event_type?,
        severity,
        message,
        details,
    })
}

fn compile_set(
    p: &mut Problems<'_>,
    table: &BTreeMap<String, toml::Value>,
    re: Option<&Regex>,
) -> Vec<(String, DetailVal)> {
    let set = detail_table(p, "set", table, re);
    for (k, v) in &set {
        match (k.as_str(), v) {
            ("level", DetailVal::Text(t)) => {
                if let Some(Err(e)) = t.literal().map(conv_severity) {
                    p.push("set.level", Some(quote(&t.source)), e);
                }
            }
            (
                "stage" | "node_id" | "logger" | "message" | "experiment_id" | "traceback"
                | "level",
                DetailVal::Literal(v),
            ) if !(v.is_string() || v.is_number()) => {
                p.push(
                    format!("set.{k}"),
                    Some(v.to_string()),
                    "must be a string template",
                );
            }
            _ => {}
        }
    }
    set
}

fn compile_rule(index: usize, raw: &RawRule, problems: &mut Vec<RuleProblem>) -> Option<Rule> {
    let mut p = Problems {
        index,
        list: problems,
    };
    let before = p.list.len();
    let regex = match raw.match_.as_deref() {
        None => {
            p.push(
                "match",
                None,
                "is required: a regex over the rule's field, e.g. match = 'Processed (?P<items_done>\\d+)'",
            );
            None
        }
        Some(s) => match Regex::new(s) {
            Ok(re) => Some(re),
            Err(e) => {
                p.push(
                    "match",
                    Some(quote(s)),
                    format!("invalid regex: {}", regex_error(&e)),
                );
                None
            }
        },
    };
    let field = match Field::parse(raw.field.as_deref().unwrap_or("message")) {
        Ok(f) => Some(f),
        Err(e) => {
            p.push(
                "field",
                raw.field.as_deref().map(quote),
                format!(
                    "{e}; use message, level, logger, stage, node_id, experiment_id, \
                     traceback or a context path such as `context.worker`"
                ),
            );
            None
        }
    };
    if raw.progress.is_none()
        && raw.event.is_none()
        && raw.set.as_ref().is_none_or(|s| s.is_empty())
    {
        p.push(
            "match",
            raw.match_.as_deref().map(quote),
            "the rule produces nothing: give it `progress`, `event` or `set`",
        );
    }
    if raw.sticky && raw.set.is_none() {
        p.push(
            "sticky",
            Some("true".into()),
            "only `set` values can be sticky, and this rule has no `set`",
        );
    }
    let re = regex.as_ref();
    let progress = raw
        .progress
        .as_ref()
        .and_then(|t| compile_progress(&mut p, t, re));
    let event = raw
        .event
        .as_ref()
        .and_then(|t| compile_event(&mut p, t, re));
    let set = raw
        .set
        .as_ref()
        .map(|t| compile_set(&mut p, t, re))
        .unwrap_or_default();
    if p.list.len() != before {
        return None;
    }
    let mut rule = Rule {
        regex: regex?,
        field: field?,
        progress,
        event,
        set,
        sticky: raw.sticky,
        stop: raw.stop,
        needs_captures: false,
    };
    rule.needs_captures = rule.outputs_read_captures();
    Some(rule)
}

impl Rules {
    /// Compiles a daemon's rules, collecting every problem of every rule.
    pub fn compile(raw: &[RawRule]) -> Result<Rules, Vec<RuleProblem>> {
        let mut problems = Vec::new();
        let mut rules = Vec::new();
        for (i, r) in raw.iter().enumerate() {
            if let Some(rule) = compile_rule(i, r, &mut problems) {
                rules.push(rule);
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut groups: Vec<(Field, Vec<usize>)> = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            match groups.iter_mut().find(|(f, _)| *f == rule.field) {
                Some((_, members)) => members.push(i),
                None => groups.push((rule.field.clone(), vec![i])),
            }
        }
        let mut compiled = Vec::new();
        for (field, members) in groups {
            let patterns = members.iter().map(|&i| rules[i].regex.as_str());
            match RegexSet::new(patterns) {
                Ok(set) => compiled.push(Group {
                    field,
                    set,
                    members,
                }),
                Err(e) => problems.push(RuleProblem {
                    index: members.first().copied().unwrap_or(0),
                    key: "match".into(),
                    value: None,
                    reason: format!(
                        "the rules on field `{}` are too large to match together: {}",
                        field.name(),
                        regex_error(&e)
                    ),
                }),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let match_reads_context = compiled
            .iter()
            .any(|g| matches!(g.field, Field::Context(_) | Field::ExperimentId));
        let outputs_read_context = rules.iter().any(Rule::outputs_read_context);
        Ok(Rules {
            rules,
            groups: compiled,
            match_reads_context,
            outputs_read_context,
        })
    }

    /// How many rules the daemon has.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether the daemon has no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// One line per rule for `check-config`, e.g.
    /// `#0 match 'Processed (?P<items_done>\d+)' on message → progress tiles`.
    pub fn describe(&self) -> Vec<String> {
        self.rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut out = Vec::new();
                if let Some(pr) = &r.progress {
                    out.push(format!("progress {}", pr.node_id.source()));
                }
                if let Some(ev) = &r.event {
                    let sev = match &ev.severity {
                        Severity::Fixed(l) => l.as_str().to_string(),
                        Severity::Text(t) => t.source.clone(),
                    };
                    out.push(format!("event {} ({sev})", ev.event_type.source));
                }
                if !r.set.is_empty() {
                    let keys: Vec<&str> = r.set.iter().map(|(k, _)| k.as_str()).collect();
                    let sticky = if r.sticky { " (sticky)" } else { "" };
                    out.push(format!("set {}{sticky}", keys.join(", ")));
                }
                let stop = if r.stop { "; stop" } else { "" };
                format!(
                    "#{i} match {} on {} → {}{stop}",
                    quote_always(r.regex.as_str()),
                    r.field.name(),
                    out.join(", ")
                )
            })
            .collect()
    }

    /// Applies the rules in order to one record: sticky values first (filling only what the
    /// record lacks), then every matching rule until one with `stop`. Never panics, never
    /// fails; values that cannot be converted are noted under `context._pipewatch.rule_error`.
    ///
    /// A record's raw context (see [`Record::raw_context`]) is expanded only when something
    /// reads it or overwrites one of its keys: a rule matching on a context path, a matched
    /// rule whose output names the context, a `set` of a key the raw context holds (keys it
    /// lacks, and sticky values, are added after it). Without rules and sticky values nothing
    /// is done at all.
    pub fn apply(&self, record: &mut Record, sticky: &mut Sticky) {
        if self.rules.is_empty() && sticky.0.is_empty() {
            return;
        }
        if self.match_reads_context {
            record.expand_context();
        }
        fill_sticky(record, sticky);
        let matched = self.matched(record);
        if matched.is_empty() {
            return;
        }
        if self.outputs_read_context {
            record.expand_context();
        }
        let outputs = self.outputs(record, &matched);
        commit(record, sticky, outputs);
    }

    /// Which rules match the record: one `RegexSet` pass per field.
    fn matched(&self, record: &Record) -> Matched {
        let mut matched = Matched::new(self.rules.len());
        for g in &self.groups {
            if let Some(text) = g.field.text(record) {
                if let [rule] = g.members[..] {
                    // One pattern: `is_match` answers without allocating a set of matches.
                    if g.set.is_match(&text) {
                        matched.set(rule);
                    }
                    continue;
                }
                for i in g.set.matches(&text).iter() {
                    if let Some(&rule) = g.members.get(i) {
                        matched.set(rule);
                    }
                }
            }
        }
        matched
    }

    /// What each matching rule produces, in rule order, up to the first `stop`.
    fn outputs(&self, record: &Record, matched: &Matched) -> OneOrMore<Output> {
        let mut outputs = OneOrMore::default();
        for (i, rule) in self.rules.iter().enumerate() {
            if !matched.get(i) {
                continue;
            }
            let Some(text) = rule.field.text(record) else {
                continue;
            };
            let caps = if rule.needs_captures {
                match rule.regex.captures(&text) {
                    Some(c) => Caps::Some(c),
                    None => continue,
                }
            } else {
                Caps::None
            };
            outputs.push(rule.evaluate(i, &caps, record));
            if rule.stop {
                break;
            }
        }
        outputs
    }
}

/// A string in single quotes, or debug-quoted when it holds a single quote.
fn quote_always(s: &str) -> String {
    if s.contains('\'') || s.contains('\n') {
        format!("{s:?}")
    } else {
        format!("'{s}'")
    }
}

impl Rule {
    fn evaluate(&self, index: usize, caps: &Caps<'_>, r: &Record) -> Output {
        let mut out = Output {
            index,
            sticky: self.sticky,
            ..Output::default()
        };
        let mut errors = Vec::new();
        if let Some(spec) = &self.progress {
            out.progress = spec.evaluate(caps, r, &mut errors);
        }
        if let Some(ev) = &self.event {
            out.event = ev.evaluate(caps, r, &mut errors);
        }
        for (k, v) in &self.set {
            out.set.push((k.clone(), v.render(caps, r)));
        }
        out.errors = errors
            .into_iter()
            .map(|e| format!("rule #{index}: {e}"))
            .collect();
        out
    }
}

/// Renders an optional value and converts it; a failure is noted and leaves the field unset.
fn convert<T>(
    val: Option<&Val>,
    key: &str,
    caps: &Caps<'_>,
    r: &Record,
    errors: &mut Vec<String>,
    conv: impl Fn(&str) -> Result<T, String>,
) -> Option<T> {
    let text = val?.render(caps, r);
    if text.trim().is_empty() {
        return None;
    }
    match conv(&text) {
        Ok(v) => Some(v),
        Err(e) => {
            errors.push(format!("{key} = {text:?}: {e}"));
            None
        }
    }
}

fn non_empty(s: String) -> Option<String> {
    if s.trim().is_empty() {
        None
    } else {
        Some(s)
    }
}

impl ProgressSpec {
    fn evaluate(
        &self,
        caps: &Caps<'_>,
        r: &Record,
        errors: &mut Vec<String>,
    ) -> Option<ProgressUpdate> {
        let Some(node_id) = non_empty(self.node_id.render(caps, r)) else {
            errors.push(format!(
                "progress.node_id = {:?}: renders empty; no progress produced",
                self.node_id.source()
            ));
            return None;
        };
        let text = |v: &Option<Val>| v.as_ref().and_then(|v| non_empty(v.render(caps, r)));
        let details = if self.details.is_empty() {
            None
        } else {
            Some(Value::Object(
                self.details
                    .iter()
                    .map(|(k, v)| (k.clone(), v.render(caps, r)))
                    .collect(),
            ))
        };
        Some(ProgressUpdate {
            node_id,
            parent_node_id: text(&self.parent_node_id),
            level: convert(
                self.level.as_ref(),
                "progress.level",
                caps,
                r,
                errors,
                conv_level,
            ),
            name: text(&self.name),
            status: convert(
                self.status.as_ref(),
                "progress.status",
                caps,
                r,
                errors,
                conv_status,
            ),
            percent: convert(
                self.percent.as_ref(),
                "progress.percent",
                caps,
                r,
                errors,
                conv_percent,
            ),
            items_done: convert(
                self.items_done.as_ref(),
                "progress.items_done",
                caps,
                r,
                errors,
                conv_count,
            ),
            items_total: convert(
                self.items_total.as_ref(),
                "progress.items_total",
                caps,
                r,
                errors,
                conv_count,
            ),
            details,
        })
    }
}

impl EventRule {
    fn evaluate(&self, caps: &Caps<'_>, r: &Record, errors: &mut Vec<String>) -> Option<EventSpec> {
        let Some(event_type) = non_empty(self.event_type.render(caps, r)) else {
            errors.push(format!(
                "event.event_type = {:?}: renders empty; no event produced",
                self.event_type.source
            ));
            return None;
        };
        let severity = match &self.severity {
            Severity::Fixed(l) => *l,
            Severity::Text(t) => {
                let text = t.render(caps, r);
                match conv_severity(&text) {
                    Ok(l) => l,
                    Err(e) => {
                        errors.push(format!("event.severity = {text:?}: {e}; INFO used"));
                        Level::Info
                    }
                }
            }
        };
        Some(EventSpec {
            event_type,
            severity,
            message: self
                .message
                .as_ref()
                .and_then(|m| non_empty(m.render(caps, r))),
            details: self
                .details
                .iter()
                .map(|(k, v)| (k.clone(), v.render(caps, r)))
                .collect(),
        })
    }
}

/// Fills what the record lacks from the sticky values.
fn fill_sticky(record: &mut Record, sticky: &Sticky) {
    if sticky.0.is_empty() {
        return;
    }
    let mut ignored = Vec::new();
    for (k, v) in &sticky.0 {
        set_value(
            record,
            Cow::Borrowed(k),
            Cow::Borrowed(v),
            false,
            &mut ignored,
        );
    }
}

/// Applies the outputs of the matching rules to the record, in order.
fn commit(record: &mut Record, sticky: &mut Sticky, outputs: OneOrMore<Output>) {
    let mut errors = Vec::new();
    for out in outputs {
        errors.extend(out.errors);
        if record.progress.is_none() {
            record.progress = out.progress;
        }
        if record.event.is_none() {
            record.event = out.event;
        }
        for (k, v) in out.set {
            // A sticky value is stored again only when it changed.
            if out.sticky && sticky.0.get(&k) != Some(&v) {
                sticky.0.insert(k.clone(), v.clone());
            }
            set_value(record, Cow::Owned(k), Cow::Owned(v), true, &mut errors);
        }
    }
    if !errors.is_empty() {
        note_errors(record, errors);
    }
}

/// Appends to `context._pipewatch.rule_error`, one message per error joined by "; ".
fn note_errors(record: &mut Record, errors: Vec<String>) {
    let previous = record
        .context
        .get("_pipewatch")
        .and_then(|n| n.get("rule_error"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let mut text = previous.unwrap_or_default();
    for e in errors {
        if !text.is_empty() {
            text.push_str("; ");
        }
        text.push_str(&e);
    }
    record.note("rule_error", text);
}

/// Sets one `set` key on the record. `overwrite` false only fills a value the record lacks.
/// A value that is empty sets nothing. Key and value are copied only when they are stored.
fn set_value(
    record: &mut Record,
    key: Cow<'_, str>,
    value: Cow<'_, Value>,
    overwrite: bool,
    errors: &mut Vec<String>,
) {
    match value.as_ref() {
        Value::Null => return,
        Value::String(s) if s.trim().is_empty() => return,
        _ => {}
    }
    let column = |slot: &mut Option<String>, value: Cow<'_, Value>| {
        if overwrite || slot.is_none() {
            *slot = Some(value_string(value));
        }
    };
    match key.as_ref() {
        "stage" => column(&mut record.stage, value),
        "node_id" => column(&mut record.node_id, value),
        "logger" => column(&mut record.logger, value),
        "traceback" => column(&mut record.traceback, value),
        "message" => {
            if overwrite {
                record.message = value_string(value);
            }
        }
        "level" => {
            if overwrite {
                let text = value_string(value);
                match conv_severity(&text) {
                    Ok(l) => record.level = l,
                    Err(e) => errors.push(format!("set.level = {text:?}: {e}")),
                }
            }
        }
        "experiment_id" => {
            let parsed = match value.as_ref() {
                Value::String(s) => Uuid::parse_str(s.trim()),
                other => Uuid::parse_str(other.to_string().trim()),
            };
            match parsed {
                Ok(u) => {
                    if overwrite || record.experiment_id.is_none() {
                        record.experiment_id = Some(u);
                    }
                }
                Err(_) => set_context(record, key, value, overwrite),
            }
        }
        _ => set_context(record, key, value, overwrite),
    }
}

/// A value as column text: a string as it is (moved when owned), anything else as JSON.
fn value_string(value: Cow<'_, Value>) -> String {
    match value {
        Cow::Owned(Value::String(s)) => s,
        Cow::Borrowed(Value::String(s)) => s.clone(),
        other => other.to_string(),
    }
}

/// Sets a context key (only when absent unless `overwrite`); a raw context is expanded only to
/// overwrite a key it holds, since a key it lacks may be added after it.
fn set_context(record: &mut Record, key: Cow<'_, str>, value: Cow<'_, Value>, overwrite: bool) {
    if overwrite {
        if raw_may_hold(record, &key) && record.context_has(&key) {
            record.expand_context();
        }
        record.context.insert(key.into_owned(), value.into_owned());
    } else if !has_context_key(record, &key) {
        record.context.insert(key.into_owned(), value.into_owned());
    }
}

/// [`Record::context_has`], with the raw part searched only when it may hold the key.
fn has_context_key(record: &Record, key: &str) -> bool {
    record.context.contains_key(key) || (raw_may_hold(record, key) && record.context_has(key))
}

/// Whether the record's raw context may hold `key`: false only when it is empty, or when the
/// key needs no escaping in JSON (as the raw part is written) and its text occurs nowhere in
/// it, which a search for the bytes answers faster than walking the raw object.
fn raw_may_hold(record: &Record, key: &str) -> bool {
    let raw = record.raw_context.as_bytes();
    if raw.is_empty() {
        return false;
    }
    let plain = key.bytes().all(|c| c >= 0x20 && c != b'"' && c != b'\\');
    !plain || memchr::memmem::find(raw, key.as_bytes()).is_some()
}

/// The dry run: for each record (already parsed), what each matching rule produces. Records are
/// numbered from 1; sticky values carry from one record to the next as in one file.
pub fn sample_report(rules: &Rules, records: &[Record]) -> String {
    let numbered: Vec<(usize, Record)> = records
        .iter()
        .enumerate()
        .map(|(i, r)| (i + 1, r.clone()))
        .collect();
    report(rules, "record", numbered)
}

/// The report behind [`sample_report`], with caller-chosen numbers (line numbers for files).
/// What the rules make of records numbered by the line (`what`) they end on.
pub fn report(rules: &Rules, what: &str, records: Vec<(usize, Record)>) -> String {
    let mut out = String::new();
    let mut sticky = Sticky::default();
    let mut hits = vec![0usize; rules.len()];
    let mut matched_records = 0usize;
    let total = records.len();
    for (n, mut record) in records {
        record.expand_context();
        fill_sticky(&mut record, &sticky);
        let matched = rules.matched(&record);
        if matched.is_empty() {
            continue;
        }
        let outputs = rules.outputs(&record, &matched);
        if outputs.is_empty() {
            continue;
        }
        matched_records += 1;
        let _ = writeln!(out, "{what} {n}: {}", shorten(&record.message, 100));
        for o in outputs.iter() {
            if let Some(h) = hits.get_mut(o.index) {
                *h += 1;
            }
            let mut parts = Vec::new();
            if let Some(p) = &o.progress {
                parts.push(describe_progress(p));
            }
            if let Some(e) = &o.event {
                parts.push(describe_event(e));
            }
            if !o.set.is_empty() {
                let kv: Vec<String> = o.set.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let sticky = if o.sticky { " (sticky)" } else { "" };
                parts.push(format!("set {}{sticky}", kv.join(" ")));
            }
            if parts.is_empty() {
                parts.push("nothing".into());
            }
            let _ = writeln!(out, "  #{} → {}", o.index, parts.join("; "));
            for e in &o.errors {
                let _ = writeln!(out, "  error: {e}");
            }
        }
        commit(&mut record, &mut sticky, outputs);
    }
    let _ = writeln!(
        out,
        "{matched_records} of {total} {what}s matched at least one rule"
    );
    for (i, h) in hits.iter().enumerate() {
        let _ = writeln!(out, "  #{i}: {h} match(es)");
    }
    out
}

fn shorten(s: &str, max: usize) -> String {
    let line = s.lines().next().unwrap_or("");
    if line.chars().count() <= max && line.len() == s.len() {
        line.to_string()
    } else {
        let cut: String = line.chars().take(max).collect();
        format!("{cut}…")
    }
}

fn describe_progress(p: &ProgressUpdate) -> String {
    let mut s = format!("progress node_id={:?}", p.node_id);
    let mut text = |k: &str, v: &Option<String>| {
        if let Some(v) = v {
            let _ = write!(s, " {k}={v:?}");
        }
    };
    text("parent_node_id", &p.parent_node_id);
    text("level", &p.level);
    text("name", &p.name);
    text("status", &p.status);
    if let Some(v) = p.percent {
        let _ = write!(s, " percent={v}");
    }
    if let Some(v) = p.items_done {
        let _ = write!(s, " items_done={v}");
    }
    if let Some(v) = p.items_total {
        let _ = write!(s, " items_total={v}");
    }
    if let Some(d) = &p.details {
        let _ = write!(s, " details={d}");
    }
    s
}

fn describe_event(e: &EventSpec) -> String {
    let mut s = format!("event {} {}", e.event_type, e.severity);
    if let Some(m) = &e.message {
        let _ = write!(s, " message={m:?}");
    }
    if !e.details.is_empty() {
        let _ = write!(s, " details={}", Value::Object(e.details.clone()));
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Parses `[[rules]]` TOML into raw rules.
    fn raw(toml_text: &str) -> Vec<RawRule> {
        #[derive(serde::Deserialize)]
        struct File {
            rules: Vec<RawRule>,
        }
        toml::from_str::<File>(toml_text).unwrap().rules
    }

    fn compile(toml_text: &str) -> Rules {
        Rules::compile(&raw(toml_text)).unwrap()
    }

    /// The problems as `[INDEX].KEY = VALUE: REASON` lines.
    fn problems(toml_text: &str) -> Vec<String> {
        Rules::compile(&raw(toml_text))
            .unwrap_err()
            .into_iter()
            .map(|p| match p.value {
                Some(v) => format!("[{}].{} = {}: {}", p.index, p.key, v, p.reason),
                None => format!("[{}].{}: {}", p.index, p.key, p.reason),
            })
            .collect()
    }

    /// Rules give the same records whether a record's context is still raw (the parser's
    /// fast path) or already a map: sticky values, `set`, context fields, templates.
    #[test]
    fn raw_and_expanded_contexts_give_the_same_records() {
        let sticky_rule = "[[rules]]\nmatch = '^phase (?P<p>\\w+)'\nset = { phase = \"{p}\", seq = \"{p}\" }\nsticky = true\n";
        let event_rule = "[[rules]]\nmatch = 'done'\nevent = { event_type = \"done\", severity = \"info\", details = { b = \"{record.context.batch.shard}\" } }\n";
        let context_rule = "[[rules]]\nmatch = '^w(?P<w>\\d)'\nfield = \"context.worker\"\nset = { from_ctx = \"{record.context.batch.size}\", worker_seen = \"yes\" }\n";
        let plain_rule = "[[rules]]\nmatch = 'work'\nset = { tag = \"w\", worker = \"set\" }\nevent = { event_type = \"work\", severity = \"info\" }\n";
        // Without and with a rule matching on a context field (which expands every record),
        // and with no output naming the context (a matched record stays raw unless a key it
        // holds is overwritten).
        for text in [
            format!("{sticky_rule}{plain_rule}"),
            format!("{sticky_rule}{event_rule}"),
            format!("{sticky_rule}{context_rule}{event_rule}"),
        ] {
            check_raw_and_expanded(&compile(&text));
        }
    }

    fn check_raw_and_expanded(rules: &Rules) {
        use crate::agent::parse::{ParseOptions, Parser};
        let lines = [
            r#"{"msg": "start", "worker": "w1", "seq": 1, "batch": {"size": 512, "shard": "s-1"}}"#,
            r#"{"msg": "phase main", "seq": 2, "batch": {"size": 1, "shard": "s-2"}}"#,
            r#"{"msg": "work", "phase": "own", "worker": "w2", "batch": {"size": 2}}"#,
            r#"{"msg": "work done", "batch": {"size": 3, "shard": "s-3"}}"#,
            r#"{"msg": "no context at all"}"#,
        ];
        let mut p = Parser::new(ParseOptions {
            format: crate::config::Format::Auto,
            text_pattern: None,
        });
        let (mut raw_sticky, mut map_sticky) = (Sticky::default(), Sticky::default());
        let mut raw_seen = 0;
        for line in lines {
            let mut out = Vec::new();
            let bytes = line.as_bytes().to_vec();
            p.push(
                crate::agent::lines::Line {
                    end: bytes.len() as u64 + 1,
                    bytes,
                    start: 0,
                    truncated_from: None,
                },
                &mut out,
            );
            let (mut raw, _) = out.pop().expect("a record");
            raw_seen += usize::from(!raw.raw_context.is_empty());
            let mut map = raw.clone();
            map.expand_context();
            rules.apply(&mut raw, &mut raw_sticky);
            rules.apply(&mut map, &mut map_sticky);
            raw.expand_context();
            assert_eq!(raw, map, "line {line}");
        }
        assert_eq!(raw_seen, 4);
        assert_eq!(raw_sticky.0, map_sticky.0);
        assert_eq!(raw_sticky.0.get("phase"), Some(&json!("main")));
    }

    /// Applies `rules` to one record with the given message.
    fn apply(rules: &Rules, message: &str) -> Record {
        let mut r = Record::new(message);
        rules.apply(&mut r, &mut Sticky::default());
        r
    }

    const CONTRACT: &str = r#"
        [[rules]]
        match = 'Processed (?P<items_done>\d+)/(?P<items_total>\d+) tiles'
        field = "message"
        progress = { node_id = "tiles", parent_node_id = "clustering", level = "step", name = "Tile processing" }

        [[rules]]
        match = '^=== Stage: (?P<stage>\w+) ==='
        set = { stage = "{stage}" }
        sticky = true

        [[rules]]
        match = 'MemoryError|Killed process|Out of memory'
        event = { event_type = "out_of_memory", severity = "CRITICAL" }
    "#;

    #[test]
    fn contract_example_progress_from_captures() {
        let rules = compile(CONTRACT);
        let r = apply(&rules, "Processed 5/10 tiles");
        assert_eq!(
            r.progress,
            Some(ProgressUpdate {
                node_id: "tiles".into(),
                parent_node_id: Some("clustering".into()),
                level: Some("step".into()),
                name: Some("Tile processing".into()),
                status: None,
                percent: None,
                items_done: Some(5),
                items_total: Some(10),
                details: None,
            })
        );
        assert_eq!(r.event, None);
        assert_eq!(r.stage, None);
        assert!(r.context.is_empty());
    }

    #[test]
    fn contract_example_event() {
        let rules = compile(CONTRACT);
        let r = apply(&rules, "worker died: MemoryError in tile 7");
        assert_eq!(
            r.event,
            Some(EventSpec {
                event_type: "out_of_memory".into(),
                severity: Level::Critical,
                message: None,
                details: Map::new(),
            })
        );
        assert_eq!(r.progress, None);
    }

    #[test]
    fn sticky_stage_holds_for_following_records_until_set_again() {
        let rules = compile(CONTRACT);
        let mut sticky = Sticky::default();
        let mut run = |msg: &str, own_stage: Option<&str>| {
            let mut r = Record::new(msg);
            r.stage = own_stage.map(str::to_string);
            rules.apply(&mut r, &mut sticky);
            r.stage
        };
        assert_eq!(run("starting", None), None);
        assert_eq!(run("=== Stage: load ===", None), Some("load".into()));
        assert_eq!(run("reading", None), Some("load".into()));
        // A record's own value wins over a sticky one.
        assert_eq!(run("own", Some("mine")), Some("mine".into()));
        assert_eq!(run("=== Stage: cluster ===", None), Some("cluster".into()));
        assert_eq!(run("Processed 1/2 tiles", None), Some("cluster".into()));
        assert_eq!(
            sticky.0,
            json!({"stage": "cluster"}).as_object().unwrap().clone()
        );
    }

    #[test]
    fn sticky_round_trips_through_json() {
        let mut s = Sticky::default();
        s.0.insert("stage".into(), json!("load"));
        s.0.insert("worker".into(), json!("w1"));
        let j = s.to_json();
        assert_eq!(j, json!({"stage": "load", "worker": "w1"}));
        assert_eq!(Sticky::from_json(&j), s);
        assert_eq!(Sticky::from_json(&json!(null)), Sticky::default());
        assert_eq!(Sticky::from_json(&json!([1, 2])), Sticky::default());
    }

    #[test]
    fn restored_sticky_applies_to_the_next_file() {
        let rules = compile(CONTRACT);
        let mut sticky = Sticky::from_json(&json!({"stage": "cluster", "worker": "w1"}));
        let mut r = Record::new("first line of the rotated file");
        rules.apply(&mut r, &mut sticky);
        assert_eq!(r.stage.as_deref(), Some("cluster"));
        assert_eq!(r.context.get("worker"), Some(&json!("w1")));
    }

    #[test]
    fn no_match_changes_nothing() {
        let rules = compile(CONTRACT);
        let r = apply(&rules, "nothing to see");
        assert_eq!(r, Record::new("nothing to see"));
    }

    #[test]
    fn every_matching_rule_applies_in_order_and_stop_ends_the_list() {
        let rules = compile(
            r#"
            [[rules]]
            match = 'tile (?P<tile>\d+)'
            set = { tile = "{tile}", first = "a" }
            [[rules]]
            match = 'tile'
            set = { first = "b" }
            stop = true
            [[rules]]
            match = 'tile'
            set = { never = "c" }
            "#,
        );
        let r = apply(&rules, "tile 42 done");
        assert_eq!(
            Value::Object(r.context),
            json!({"tile": "42", "first": "b"})
        );
    }

    #[test]
    fn captures_named_like_progress_fields_fill_them() {
        let rules = compile(
            r#"
            [[rules]]
            match = '(?P<node_id>\w+): (?P<percent>[\d.]+)% (?P<status>\w+)'
            progress = { level = "substep", parent_node_id = "{record.stage}" }
            "#,
        );
        let mut r = Record::new("tiles: 42.5% RUNNING");
        r.stage = Some("clustering".into());
        rules.apply(&mut r, &mut Sticky::default());
        let p = r.progress.unwrap();
        assert_eq!(p.node_id, "tiles");
        assert_eq!(p.percent, Some(42.5));
        assert_eq!(p.status.as_deref(), Some("running"));
        assert_eq!(p.level.as_deref(), Some("substep"));
        assert_eq!(p.parent_node_id.as_deref(), Some("clustering"));
    }

    #[test]
    fn captures_named_level_or_parent_do_not_fill_progress() {
        let rules = compile(
            r#"
            [[rules]]
            match = '(?P<level>[A-Z]+) (?P<parent_node_id>\w+) (?P<node_id>\w+)'
            progress = { status = "running" }
            "#,
        );
        let r = apply(&rules, "ERROR root tiles");
        let p = r.progress.unwrap();
        assert_eq!(p.node_id, "tiles");
        assert_eq!(p.level, None);
        assert_eq!(p.parent_node_id, None);
        assert!(r.context.is_empty());
    }

    #[test]
    fn table_value_wins_over_capture_of_same_name() {
        let rules = compile(
            r#"
            [[rules]]
            match = 'node (?P<node_id>\w+) (?P<items_done>\d+)'
            progress = { node_id = "fixed" }
            "#,
        );
        let p = apply(&rules, "node abc 7").progress.unwrap();
        assert_eq!(p.node_id, "fixed");
        assert_eq!(p.items_done, Some(7));
    }

    #[test]
    fn conversion_failures_leave_field_unset_and_are_noted() {
        let rules = compile(
            r#"
            [[rules]]
            match = 'done (?P<items_done>\S+) of (?P<items_total>\S+) (?P<status>\w+)'
            progress = { node_id = "n" }
            "#,
        );
        let r = apply(&rules, "done many of 10 finished");
        let p = r.progress.clone().unwrap();
        assert_eq!(p.items_done, None);
        assert_eq!(p.items_total, Some(10));
        assert_eq!(p.status, None);
        assert_eq!(
            r.context["_pipewatch"]["rule_error"],
            json!(
                "rule #0: progress.status = \"finished\": not a status; use one of \
                 pending, running, completed, failed, cancelled; \
                 rule #0: progress.items_done = \"many\": not a whole number of items"
            )
        );
    }

    #[test]
    fn existing_pipewatch_notes_are_kept() {
        let rules = compile(
            r#"
            [[rules]]
            match = 'x(?P<items_done>\w+)'
            progress = { node_id = "n" }
            "#,
        );
        let mut r = Record::new("xabc");
        r.note("truncated_from_bytes", 100);
        rules.apply(&mut r, &mut Sticky::default());
        assert_eq!(r.context["_pipewatch"]["truncated_from_bytes"], json!(100));
        assert_eq!(
            r.context["_pipewatch"]["rule_error"],
            json!("rule #0: progress.items_done = \"abc\": not a whole number of items")
        );
    }

    #[test]
    fn templates_read_record_fields_and_escape_braces() {
        let rules = compile(
            r#"
            [[rules]]
            match = 'failed on (?P<tile>\S+)'
            event = { event_type = "tile_failed", severity = "error", message = "{{{tile}}} by {record.logger}{record.missing}", details = { tile = "{tile}", worker = "{record.context.worker}", attempt = 3 } }
            "#,
        );
        let mut r = Record::new("failed on t-9");
        r.logger = Some("geo.tiles".into());
        r.context.insert("worker".into(), json!("w3"));
        rules.apply(&mut r, &mut Sticky::default());
        let e = r.event.unwrap();
        assert_eq!(e.severity, Level::Error);
        assert_eq!(e.message.as_deref(), Some("{t-9} by geo.tiles"));
        assert_eq!(
            Value::Object(e.details),
            json!({"attempt": 3, "tile": "t-9", "worker": "w3"})
        );
    }

    #[test]
    fn field_selects_other_record_fields_and_context_paths() {
        let rules = compile(
            r#"
            [[rules]]
            match = '^geo\.io'
            field = "logger"
            set = { component = "io" }
            [[rules]]
            match = '^gpu'
            field = "context.host.kind"
            set = { accel = "yes" }
            [[rules]]
            match = '^7$'
            field = "attempt"
            set = { seventh = "yes" }
            "#,
        );
        let mut r = Record::new("m");
        r.logger = Some("geo.io.reader".into());
        r.context.insert("host".into(), json!({"kind": "gpu-a100"}));
        r.context.insert("attempt".into(), json!(7));
        rules.apply(&mut r, &mut Sticky::default());
        assert_eq!(r.context["component"], json!("io"));
        assert_eq!(r.context["accel"], json!("yes"));
        assert_eq!(r.context["seventh"], json!("yes"));
        // The message does not match `^geo\.io`: fields are not mixed up.
        assert_eq!(apply(&rules, "geo.io x").context.len(), 0);
    }

    #[test]
    fn set_fills_columns_and_context() {
        let rules = compile(
            r#"
            [[rules]]
            match = 'exp=(?P<e>\S+) node=(?P<n>\S+)'
            set = { experiment_id = "{e}", node_id = "{n}", level = "warning", extra = "{e}" }
            "#,
        );
        let r = apply(
            &rules,
            "exp=6f1c2a4e-0000-4000-8000-000000000001 node=tiles",
        );
        assert_eq!(
            r.experiment_id.map(|u| u.to_string()).as_deref(),
            Some("6f1c2a4e-0000-4000-8000-000000000001")
        );
        assert_eq!(r.node_id.as_deref(), Some("tiles"));
        assert_eq!(r.level, Level::Warning);
        // A value that is not a UUID goes to context, as the parser does.
        let r = apply(&rules, "exp=run-7 node=tiles");
        assert_eq!(r.experiment_id, None);
        assert_eq!(r.context["experiment_id"], json!("run-7"));
    }

    #[test]
    fn records_own_progress_and_event_win() {
        let rules = compile(CONTRACT);
        let mut r = Record::new("Processed 5/10 tiles");
        let own = ProgressUpdate {
            node_id: "own".into(),
            ..ProgressUpdate::default()
        };
        r.progress = Some(own.clone());
        rules.apply(&mut r, &mut Sticky::default());
        assert_eq!(r.progress, Some(own));
    }

    #[test]
    fn many_rules_on_several_fields_match_in_one_pass() {
        let mut text = String::new();
        for i in 0..20 {
            let field = if i % 2 == 0 { "message" } else { "logger" };
            let _ = write!(
                text,
                "[[rules]]\nmatch = 'token{i}\\b'\nfield = \"{field}\"\nset = {{ r{i} = \"x\" }}\n"
            );
        }
        let rules = compile(&text);
        assert_eq!(rules.len(), 20);
        assert_eq!(rules.groups.len(), 2);
        let mut r = Record::new("token4 and token7 and token10");
        r.logger = Some("token7".into());
        rules.apply(&mut r, &mut Sticky::default());
        let keys: Vec<&str> = r.context.keys().map(String::as_str).collect();
        assert_eq!(keys, vec!["r4", "r7", "r10"]);
    }

    /// More rules than the matched-rules bitmask holds: every matching rule still applies, in
    /// order, up to `stop`.
    #[test]
    fn more_than_128_rules_all_apply() {
        let mut text = String::new();
        for i in 0..140 {
            let stop = if i == 135 { "stop = true\n" } else { "" };
            let _ = write!(
                text,
                "[[rules]]\nmatch = '\\bt{i}\\b|all'\nset = {{ r{i} = \"x\" }}\n{stop}"
            );
        }
        let rules = compile(&text);
        let r = apply(&rules, "t3 t127 t128 t139");
        let keys: Vec<&str> = r.context.keys().map(String::as_str).collect();
        assert_eq!(keys, vec!["r3", "r127", "r128", "r139"]);
        let r = apply(&rules, "all");
        assert_eq!(r.context.len(), 136);
        assert!(r.context.contains_key("r135") && !r.context.contains_key("r136"));
    }

    #[test]
    fn compile_errors_are_clear() {
        let cases: &[(&str, &[&str])] = &[
            (
                "[[rules]]\nmatch = 'Processed (\\d+'\nset = { a = \"b\" }",
                &["[0].match = 'Processed (\\d+': invalid regex: unclosed group"],
            ),
            (
                "[[rules]]\nset = { a = \"b\" }",
                &["[0].match: is required: a regex over the rule's field, e.g. match = 'Processed (?P<items_done>\\d+)'"],
            ),
            (
                "[[rules]]\nmatch = 'x'",
                &["[0].match = \"x\": the rule produces nothing: give it `progress`, `event` or `set`"],
            ),
            (
                "[[rules]]\nmatch = 'x (?P<tile>\\d+)'\nset = { t = \"{tiel}\" }",
                &["[0].set.t = \"{tiel}\": `{tiel}` names a capture that the regex does not define (did you mean `{tile}`?); its captures: tile; `{record.PATH}` reads a record field"],
            ),
            (
                "[[rules]]\nmatch = 'x'\nset = { t = \"{tile}\" }",
                &["[0].set.t = \"{tile}\": `{tile}` names a capture that the regex does not define; it defines no named capture (write `(?P<name>…)`); `{record.PATH}` reads a record field"],
            ),
            (
                "[[rules]]\nmatch = '(?P<items_done>\\d+)'\nprogress = { name = \"x\" }",
                &["[0].progress.node_id: is required: give `node_id` in the progress table or name a capture `(?P<node_id>…)` in `match`"],
            ),
            (
                "[[rules]]\nmatch = 'x'\nprogress = { node_id = \"n\", parnet_node_id = \"p\" }",
                &["[0].progress.parnet_node_id: unknown key `parnet_node_id` (did you mean `parent_node_id`?); valid keys here: node_id, parent_node_id, level, name, status, percent, items_done, items_total, details"],
            ),
            (
                "[[rules]]\nmatch = 'x'\nevent = { event_type = \"e\", severty = \"ERROR\" }",
                &["[0].event.severty: unknown key `severty` (did you mean `severity`?); valid keys here: event_type, severity, message, details"],
            ),
            (
                "[[rules]]\nmatch = 'x'\nevent = { severity = \"ERROR\" }",
                &["[0].event.event_type: is required: name the event, e.g. event_type = \"out_of_memory\""],
            ),
            (
                "[[rules]]\nmatch = 'x'\nevent = { event_type = \"e\", severity = \"FATAL\" }",
                &["[0].event.severity = \"FATAL\": not a severity; use one of DEBUG, INFO, WARNING, ERROR, CRITICAL"],
            ),
            (
                "[[rules]]\nmatch = 'x'\nprogress = { node_id = \"n\", level = \"task\", status = \"Done\", percent = 120, items_done = -1 }",
                &[
                    "[0].progress.level = \"task\": not a progress level; use one of pipeline, phase, step, substep",
                    "[0].progress.status = \"Done\": not a status; use one of pending, running, completed, failed, cancelled",
                    "[0].progress.percent = 120: a percentage must be between 0 and 100",
                    "[0].progress.items_done = -1: must not be negative",
                ],
            ),
            (
                "[[rules]]\nmatch = 'x'\nset = { _pipewatch = \"x\" }",
                &["[0].set._pipewatch: `_pipewatch` is reserved for the agent's own notes; choose another key"],
            ),
            (
                "[[rules]]\nmatch = 'x'\nset = { a = \"{\" }",
                &["[0].set.a = \"{\": unclosed `{` (write `{{` for a literal brace)"],
            ),
            (
                "[[rules]]\nmatch = 'x'\nset = { a = \"}\" }",
                &["[0].set.a = \"}\": unmatched `}` (write `}}` for a literal brace)"],
            ),
            (
                "[[rules]]\nmatch = 'x'\nset = { a = \"{}\" }",
                &["[0].set.a = \"{}\": empty `{}`: name a capture or `record.PATH` (write `{{` for a literal brace)"],
            ),
            (
                "[[rules]]\nmatch = 'x'\nprogress = { node_id = \"n\" }\nsticky = true",
                &["[0].sticky = true: only `set` values can be sticky, and this rule has no `set`"],
            ),
            (
                "[[rules]]\nmatch = 'x'\nfield = \"context\"\nset = { a = \"b\" }",
                &["[0].field = \"context\": names the whole context; name a key inside it, e.g. `context.worker`; use message, level, logger, stage, node_id, experiment_id, traceback or a context path such as `context.worker`"],
            ),
            (
                "[[rules]]\nmatch = 'x'\nprogress = { node_id = \"n\", name = true }",
                &["[0].progress.name = true: must be a string"],
            ),
            (
                "[[rules]]\nmatch = 'x'\nset = { a = \"b\" }\n[[rules]]\nmatch = '('\nset = { a = \"{nope}\" }",
                &["[1].match = \"(\": invalid regex: unclosed group"],
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(problems(input), *expected, "for {input}");
        }
    }

    #[test]
    fn literal_values_are_accepted_when_valid() {
        let rules = compile(
            r#"
            [[rules]]
            match = 'x'
            progress = { node_id = 12, level = "Phase", status = "COMPLETED", percent = 100, items_done = 3, items_total = "4" }
            "#,
        );
        let p = apply(&rules, "x").progress.unwrap();
        assert_eq!(p.node_id, "12");
        assert_eq!(p.level.as_deref(), Some("phase"));
        assert_eq!(p.status.as_deref(), Some("completed"));
        assert_eq!(p.percent, Some(100.0));
        assert_eq!(p.items_done, Some(3));
        assert_eq!(p.items_total, Some(4));
    }

    #[test]
    fn describe_lists_each_rule() {
        let rules = compile(CONTRACT);
        assert_eq!(
            rules.describe(),
            vec![
                "#0 match 'Processed (?P<items_done>\\d+)/(?P<items_total>\\d+) tiles' on message → progress tiles",
                "#1 match '^=== Stage: (?P<stage>\\w+) ===' on message → set stage (sticky)",
                "#2 match 'MemoryError|Killed process|Out of memory' on message → event out_of_memory (CRITICAL)",
            ]
        );
    }

    #[test]
    fn sample_report_shows_what_each_rule_produces() {
        let rules = compile(CONTRACT);
        let records: Vec<Record> = [
            "=== Stage: tiling ===",
            "Processed 5/10 tiles",
            "plain",
            "Out of memory",
        ]
        .into_iter()
        .map(Record::new)
        .collect();
        assert_eq!(
            sample_report(&rules, &records),
            "record 1: === Stage: tiling ===\n\
             \x20 #1 → set stage=\"tiling\" (sticky)\n\
             record 2: Processed 5/10 tiles\n\
             \x20 #0 → progress node_id=\"tiles\" parent_node_id=\"clustering\" level=\"step\" name=\"Tile processing\" items_done=5 items_total=10\n\
             record 4: Out of memory\n\
             \x20 #2 → event out_of_memory CRITICAL\n\
             3 of 4 records matched at least one rule\n\
             \x20 #0: 1 match(es)\n\
             \x20 #1: 1 match(es)\n\
             \x20 #2: 1 match(es)\n"
        );
    }

    #[test]
    fn empty_rules_do_nothing() {
        let rules = Rules::compile(&[]).unwrap();
        assert!(rules.is_empty());
        let mut sticky = Sticky::default();
        let mut r = Record::new("x");
        rules.apply(&mut r, &mut sticky);
        assert_eq!(r, Record::new("x"));
        assert_eq!(sticky, Sticky::default());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod props {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    proptest! {
        /// Any template text and any regex either compile or give problems; nothing panics.
        #[test]
        fn compile_never_panics(pattern in ".{0,40}", template in ".{0,40}", field in "[a-z._]{0,12}") {
            let rule = RawRule {
                match_: Some(pattern),
                field: Some(field),
                set: Some([("k".to_string(), toml::Value::String(template.clone()))].into()),
                event: Some([("event_type".to_string(), toml::Value::String(template))].into()),
                ..RawRule::default()
            };
            let _ = Rules::compile(&[rule]);
        }

        /// The quick search of a raw context never answers "absent" for a key it holds: any
        /// key (quotes, backslashes, control characters, non-ASCII), at any depth.
        #[test]
        fn raw_search_never_misses_a_key(
            keys in proptest::collection::vec("[a-z\"\\\\\u{1}é ]{0,4}", 0..6),
            probe in "[a-z\"\\\\\u{1}é ]{0,4}",
            nested in any::<bool>(),
        ) {
            let mut map = Map::new();
            for (i, k) in keys.iter().enumerate() {
                let v = if nested { json!({ "in": k, "n": i }) } else { json!(i) };
                map.insert(k.clone(), v);
            }
            let mut r = Record::new("m");
            r.raw_context = Value::Object(map).to_string();
            for k in keys.iter().chain([&probe]) {
                prop_assert_eq!(has_context_key(&r, k), r.context_has(k), "key {:?}", k);
            }
        }

        /// Any message through rules with every kind of conversion never panics, and a record
        /// that nothing matches comes out unchanged.
        #[test]
        fn apply_never_panics(message in ".{0,200}", stage in proptest::option::of(".{0,10}")) {
            let text = r#"
                [[rules]]
                match = '(?P<node_id>\S+) (?P<items_done>\S+)/(?P<items_total>\S+) (?P<percent>\S+) (?P<status>\S+)'
                progress = { name = "{record.stage}", level = "step" }
                [[rules]]
                match = '(?P<a>\S*) (?P<b>.*)'
                event = { event_type = "e{a}", severity = "{b}", details = { b = "{b}" } }
                set = { level = "{a}", experiment_id = "{b}", stage = "{a}" }
                sticky = true
            "#;
            #[derive(serde::Deserialize)]
            struct File {
                rules: Vec<RawRule>,
            }
            let rules = Rules::compile(&toml::from_str::<File>(text).unwrap().rules).unwrap();
            let mut sticky = Sticky::default();
            let mut r = Record::new(message.clone());
            r.stage = stage;
            let before = r.clone();
            rules.apply(&mut r, &mut sticky);
            if !message.contains(' ') {
                prop_assert_eq!(r, before);
            }
            let mut next = Record::new(message);
            rules.apply(&mut next, &mut sticky);
        }
    }
}
