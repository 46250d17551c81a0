//! The JSON fast path: one pass over a line that builds only what becomes a column, and
//! writes every other top-level member straight into [`Record::raw_context`] in the exact
//! text `serde_json` would serialise it as — so a record whose context nobody looks into is
//! never built as a map, and its COPY row is byte-for-byte the full parser's.
//!
//! Pure: no I/O. It declines (returns `None`, and the full parser in `json`/`mod` runs) on
//! anything it does not handle exactly as the full parser would: invalid JSON, a line that
//! is not an object, a repeated key at any depth, `_pipewatch`, `record`, `context` or
//! `extra` at the top level (their handling reads or merges the other members), a `\u0000`
//! escape, a float whose text would not read back as the same number, more than
//! [`MAX_KEYS`] keys in one object.

use super::json::{record_from_slots, slot_of, Slots, NO_SLOTS};
use crate::model::Record;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use std::fmt;
use std::io::Write as _;

/// The most keys of one object the fast path takes (it checks them for repeats).
const MAX_KEYS: usize = 32;

/// The record of a JSON line, or `None` when the full parser must read it. `scratch` is a
/// buffer kept between lines (its contents do not matter).
pub(crate) fn record(text: &str, scratch: &mut Vec<u8>) -> Option<Record> {
    if text.contains("\\u0000") {
        return None; // NUL escapes are scrubbed (and noted) by the full parser.
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let mut slots = NO_SLOTS;
    scratch.clear();
    (&mut de)
        .deserialize_map(LineVisitor {
            raw: scratch,
            slots: &mut slots,
        })
        .ok()?;
    de.end().ok()?;
    let mut rec = record_from_slots(&mut slots);
    if !scratch.is_empty() {
        scratch.push(b'}');
        rec.raw_context = std::str::from_utf8(scratch).ok()?.to_owned();
    }
    Some(rec)
}

/// Why the fast path declined; never shown (the full parser then says what is wrong).
fn decline<E: de::Error>() -> E {
    E::custom("fast path declined")
}

/// The top-level object: column keys into slots, the rest transcoded into `raw`.
struct LineVisitor<'r> {
    raw: &'r mut Vec<u8>,
    slots: &'r mut Slots,
}

impl<'de> Visitor<'de> for LineVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let slots = self.slots;
        let mut keys = Keys::default();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            let key = key.as_str();
            match slot_of(key) {
                Some(i) => {
                    if matches!(key, "record" | "context" | "extra") || slots[i].is_some() {
                        return Err(decline());
                    }
                    slots[i] = Some(map.next_value::<Value>()?);
                }
                None if key == "_pipewatch" => return Err(decline()),
                None => {
                    self.raw.push(if self.raw.is_empty() { b'{' } else { b',' });
                    keys.add(self.raw, key)?;
                    self.raw.push(b':');
                    map.next_value_seed(Transcode { out: self.raw })?;
                }
            }
        }
        Ok(())
    }
}

/// A top-level key, borrowed from the line unless it had escapes.
enum Key<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl Key<'_> {
    fn as_str(&self) -> &str {
        match self {
            Key::Borrowed(s) => s,
            Key::Owned(s) => s,
        }
    }
}

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key::Borrowed(s))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key::Owned(s.to_string()))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Key<'de>, E> {
                Ok(Key::Owned(s))
            }
        }
        d.deserialize_str(V)
    }
}

/// The keys of one object written so far, as spans of the output (their serialised text,
/// which is equal exactly when the keys are).
#[derive(Default)]
struct Keys {
    spans: [(usize, usize); MAX_KEYS],
    len: usize,
}

impl Keys {
    /// Writes `key` serialised to `out`, declining on a repeat or too many keys.
    fn add<E: de::Error>(&mut self, out: &mut Vec<u8>, key: &str) -> Result<(), E> {
        if self.len == MAX_KEYS {
            return Err(decline());
        }
        let start = out.len();
        serde_json::to_writer(&mut *out, key).map_err(|_| decline::<E>())?;
        let new = &out[start..];
        if self.spans[..self.len]
            .iter()
            .any(|&(s, e)| &out[s..e] == new)
        {
            return Err(decline());
        }
        self.spans[self.len] = (start, out.len());
        self.len += 1;
        Ok(())
    }
}

/// Deserialises one value and writes it to `out` as `serde_json` serialises the `Value` it
/// would have become.
struct Transcode<'r> {
    out: &'r mut Vec<u8>,
}

impl<'de> DeserializeSeed<'de> for Transcode<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Transcode<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.out
            .extend_from_slice(if v { b"true" } else { b"false" });
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        write!(self.out, "{v}").map_err(|_| decline())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        write!(self.out, "{v}").map_err(|_| decline())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        if !v.is_finite() {
            return Err(decline()); // `Value` would hold null; not worth the special case.
        }
        let start = self.out.len();
        serde_json::to_writer(&mut *self.out, &v).map_err(|_| decline::<E>())?;
        // Reading the text back must give the same number (serde_json's default float
        // parsing is not always exact), or an expanded context would differ from the full
        // parser's.
        match serde_json::from_slice::<f64>(&self.out[start..]) {
            Ok(back) if back.to_bits() == v.to_bits() => Ok(()),
            _ => Err(decline()),
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        serde_json::to_writer(&mut *self.out, v).map_err(|_| decline())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.out.extend_from_slice(b"null");
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.out.push(b'[');
        let mut first = true;
        loop {
            let mark = self.out.len();
            if !first {
                self.out.push(b',');
            }
            if seq
                .next_element_seed(Transcode { out: self.out })?
                .is_none()
            {
                self.out.truncate(mark);
                break;
            }
            first = false;
        }
        self.out.push(b']');
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.out.push(b'{');
        let mut keys = Keys::default();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            if keys.len > 0 {
                self.out.push(b',');
            }
            keys.add(self.out, key.as_str())?;
            self.out.push(b':');
            map.next_value_seed(Transcode { out: self.out })?;
        }
        self.out.push(b'}');
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::parse::{json_record_full, ParseOptions};
    use crate::config::Format;
    use proptest::prelude::*;

    /// The fast path's record, expanded, equals the full parser's; its encoded context
    /// equals the full record's serialised context. Returns whether the fast path took it.
    fn check(line: &str) -> bool {
        let full = json_record_full(line.as_bytes(), None);
        let Some(mut fast) = record(line, &mut Vec::new()) else {
            return false;
        };
        let raw = fast.raw_context.clone();
        let rest = fast.context.clone();
        if !raw.is_empty() {
            // The raw part is already what serde_json writes for it.
            let parsed: serde_json::Map<String, Value> =
                serde_json::from_str(&raw).expect("raw context is JSON");
            assert_eq!(
                serde_json::to_string(&parsed).expect("serialises"),
                raw,
                "line {line}"
            );
            for k in rest.keys() {
                assert!(!parsed.contains_key(k), "key {k} twice, line {line}");
            }
        }
        fast.expand_context();
        assert_eq!(fast, full, "line {line}");
        true
    }

    #[test]
    fn corpus_of_odd_lines_matches_the_full_parser() {
        let taken = [
            r#"{"event": "tile done", "level": "warning", "timestamp": "2024-05-01T12:00:00.5Z", "logger": "geo", "tile": 7}"#,
            r#"{"msg": "x", "a": {"b": [1, 2.5, -3, 1e3, 0.1, -0.0, 1.7976931348623157e308, 5e-324], "c": null}, "d": true, "e": false}"#,
            r#"{"msg": "esc", "s": "quote \" backslash \\ slash \/ tab \t nl \n uni \u00e9 \ud83e\udd80 ctl \u0001 \u001f", "k\"ey": 1}"#,
            r#"{"msg": "n", "big": 123456789012345678901234567890, "neg": -9223372036854775808, "u": 18446744073709551615}"#,
            r#"  {"message": "spaces"  ,  "x" :  [ ]  , "y": { } }  "#,
            r#"{"message": "m", "msg": "also", "event": "third", "level": 30, "time": 1714564800123}"#,
            r#"{"event": "e", "event_type": "disk_low", "severity": "warning", "details": {"free": 1}, "x": 1}"#,
            r#"{"event": "e", "event_type": 5, "severity": "loud", "x": 1}"#,
            r#"{"msg": "p", "experiment_id": "6f1c2a4e-0000-4000-8000-000000000001", "progress": {"node_id": "n", "percent": 50}, "y": "z"}"#,
            r#"{"msg": "p", "progress": "nope", "experiment_id": "not-a-uuid", "node_id": 7, "stage": [1]}"#,
            r#"{"msg": "ecs", "@timestamp": "2024-05-01T12:00:00Z", "log": {"level": "error", "logger": "l", "x": 1}, "error": {"stack_trace": "tb"}, "z": 0}"#,
            r#"{"msg": "t", "time": "tomorrow", "_pipewatch_original": 1}"#,
            r#"{"msg": "m", "metrics": {"a": 1}, "exc_info": ["l1", "l2"], "w": "v"}"#,
            r#"{}"#,
            r#"{"only": "context"}"#,
        ];
        for line in taken {
            assert!(check(line), "fast path declined {line}");
        }
        let nested = format!(
            r#"{{"msg": "d", "a": {}1{}}}"#,
            "[".repeat(60),
            "]".repeat(60)
        );
        assert!(check(&nested));
        let declined = [
            r#"{"msg": "dup", "a": 1, "a": 2}"#,
            r#"{"msg": "dup", "a": {"b": 1, "b": 2}}"#,
            r#"{"msg": "dup", "msg": "again"}"#,
            r#"{"msg": "n", "_pipewatch": {"x": 1}}"#,
            r#"{"msg": "c", "context": {"a": 1}, "a": 2}"#,
            r#"{"msg": "c", "extra": {"a": 1}}"#,
            r#"{"record": {"level": {"name": "INFO"}, "message": "l"}, "text": "t"}"#,
            r#"{"msg": "a\u0000b"}"#,
            r#"{"msg": "n", "big": 1e400}"#,
            r#"{"a": 1} trailing"#,
            r#"[1, 2]"#,
            r#"{"a": 1"#,
            r#"{"a": "ctl	tab"}"#,
        ];
        for line in declined {
            assert!(!check(line), "fast path took {line}");
        }
        let deep = format!(
            r#"{{"msg": "d", "a": {}1{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert!(!check(&deep));
    }

    #[test]
    fn the_bench_line_is_taken_with_its_plain_fields_raw() {
        let line = r#"{"event": "Loaded 1 points", "experiment_id": "6f1c2a4e-0000-4000-8000-000000000001", "node_id": "worker-03", "stage": "ingest", "batch": {"size": 512, "shard": "s-07"}, "duration_ms": 12.3, "seq": 9, "level": "info", "logger": "clusterer.io", "timestamp": "2026-11-30T01:00:00.000001Z"}"#;
        let rec = record(line, &mut Vec::new()).expect("taken");
        assert_eq!(
            rec.raw_context,
            r#"{"batch":{"size":512,"shard":"s-07"},"duration_ms":12.3,"seq":9}"#
        );
        assert!(rec.context.is_empty());
        assert!(check(line));
        // The Parser uses it.
        let mut p = crate::agent::parse::Parser::new(ParseOptions {
            format: Format::Auto,
            text_pattern: None,
        });
        let mut out = Vec::new();
        p.push(
            crate::agent::lines::Line {
                bytes: line.as_bytes().to_vec(),
                start: 0,
                end: line.len() as u64 + 1,
                truncated_from: None,
            },
            &mut out,
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0.raw_context, rec.raw_context);
    }

    /// JSON-ish members built from a small alphabet, so repeats, escapes, numbers and
    /// nesting all occur.
    fn arb_value() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("1".to_string()),
            Just("-0".to_string()),
            Just("2.50".to_string()),
            Just("1e2".to_string()),
            Just("0.30000000000000004".to_string()),
            Just("123456789012345678901".to_string()),
            Just("null".to_string()),
            Just("true".to_string()),
            Just(r#""s""#.to_string()),
            Just(r#""\u00e9\n\"""#.to_string()),
            Just(r#""warning""#.to_string()),
            Just(r#""2024-05-01T12:00:00Z""#.to_string()),
            Just(r#""6f1c2a4e-0000-4000-8000-000000000001""#.to_string()),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| format!("[{}]", v.join(", "))),
                proptest::collection::vec((arb_key(), inner), 0..4).prop_map(|v| {
                    let m: Vec<String> = v.into_iter().map(|(k, v)| format!("{k}: {v}")).collect();
                    format!("{{{}}}", m.join(", "))
                }),
            ]
        })
    }

    fn arb_key() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(r#""a""#),
            Just(r#""b""#),
            Just(r#""msg""#),
            Just(r#""event""#),
            Just(r#""level""#),
            Just(r#""ts""#),
            Just(r#""node_id""#),
            Just(r#""stage""#),
            Just(r#""experiment_id""#),
            Just(r#""metrics""#),
            Just(r#""progress""#),
            Just(r#""event_type""#),
            Just(r#""details""#),
            Just(r#""severity""#),
            Just(r#""log""#),
            Just(r#""error""#),
            Just(r#""exception""#),
            Just(r#""k\"q""#),
            Just(r#""_pipewatch_original""#),
        ]
        .prop_map(str::to_string)
    }

    proptest! {
        /// Any object from the alphabet: when the fast path takes it, the expanded record is
        /// the full parser's and the raw part is canonical.
        #[test]
        fn fast_path_equals_full_parser(members in proptest::collection::vec((arb_key(), arb_value()), 0..8)) {
            let body: Vec<String> = members.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            let line = format!("{{{}}}", body.join(", "));
            check(&line);
        }
    }
}
