//! Parsing lines into records. (Interim version; replaced by the parse work.)

use crate::agent::lines::Line;
use crate::config::Format;
use crate::model::Record;

#[derive(Debug, Clone)]
pub struct ParseOptions {
    pub format: Format,
    pub text_pattern: Option<regex::Regex>,
}

pub struct Parser {
    opts: ParseOptions,
}

impl Parser {
    pub fn new(opts: ParseOptions) -> Self {
        Parser { opts }
    }
    pub fn push(&mut self, line: Line, out: &mut Vec<(Record, u64)>) {
        if let Some(r) = parse_line(&line.bytes, &self.opts) {
            out.push((r, line.end));
        }
    }
    pub fn flush(&mut self, _out: &mut Vec<(Record, u64)>) {}
    pub fn holding(&self) -> bool {
        false
    }
}

pub fn parse_line(line: &[u8], _opts: &ParseOptions) -> Option<Record> {
    let s = String::from_utf8_lossy(line).replace('\0', "");
    if s.trim().is_empty() {
        return None;
    }
    match serde_json::from_str::<serde_json::Value>(&s) {
        Ok(serde_json::Value::Object(mut m)) => {
            let msg = m
                .remove("message")
                .or_else(|| m.remove("event"))
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default();
            let mut r = Record::new(msg);
            r.context = m;
            Some(r)
        }
        _ => {
            let mut r = Record::new(s);
            r.note("parse_error", "not a JSON object");
            Some(r)
        }
    }
}
