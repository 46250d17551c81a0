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

pub mod json;
pub mod normalize;
pub mod text;

use crate::agent::lines::Line;
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
}

impl Parser {
    pub fn new(opts: ParseOptions) -> Self {
        Parser { opts, held: None }
    }

    /// Returns the records completed by this line, each with the file offset just after its
    /// last line (the position that may be committed once it is shipped).
    pub fn push(&mut self, line: Line, out: &mut Vec<(Record, u64)>) {
        if is_blank(&line.bytes) {
            if let Some(h) = &mut self.held {
                h.blanks += 1;
            }
            return;
        }
        let text_line = match self.opts.format {
            Format::Text => true,
            Format::Json => false,
            Format::Auto => {
                self.opts.text_pattern.is_some() && first_byte(&line.bytes) != Some(b'{')
            }
        };
        if !text_line {
            self.flush(out);
            out.push((json_record(&line.bytes, line.truncated_from), line.end));
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

    fn push_text(&mut self, line: Line, out: &mut Vec<(Record, u64)>) {
        let bytes = match line.truncated_from {
            Some(_) => trim_partial_char(&line.bytes),
            None => &line.bytes[..],
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
    out.pop().map(|(r, _)| r)
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
fn json_record(bytes: &[u8], truncated_from: Option<u64>) -> Record {
    if truncated_from.is_some() {
        // A truncated line is never valid JSON: ship the kept prefix.
        let (text, cleaned) = clean_text(trim_partial_char(bytes));
        let mut rec = Record::new(text.into_owned());
        add_notes(&mut rec, cleaned, truncated_from);
        return rec;
    }
    let (text, cleaned) = clean_text(bytes);
    let mut rec = match first_byte(text.as_bytes()) {
        Some(b'{') => match serde_json::from_str::<Map<String, Value>>(&text) {
            Ok(mut map) => {
                // A `\u0000` escape decodes to NUL, which PostgreSQL refuses in text and jsonb.
                let nul = text.contains("\\u0000") && scrub_map(&mut map);
                let mut rec = json::record_from_object(map);
                if nul {
                    rec.note("nul_removed", true);
                }
                rec
            }
            Err(e) => invalid(&text, format!("invalid JSON: {e}")),
        },
        Some(b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n') => {
            match serde_json::from_str::<Value>(&text) {
                Ok(v) => invalid(&text, format!("JSON {} is not an object", kind(&v))),
                Err(e) => invalid(&text, format!("invalid JSON: {e}")),
            }
        }
        _ => invalid(&text, "not JSON".to_string()),
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
