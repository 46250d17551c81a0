//! The binary COPY encoding of `pipeline_logs` rows. Readers encode each row as they route it,
//! on their own thread, so the sink's single connection only streams bytes; a row is decoded
//! again only when the database refuses it and it must be quarantined.
//!
//! No I/O. The column order is the one [`COPY_STATEMENT`] names.

use crate::model::{Level, LogFields, LogRow};
use bytes::{BufMut, Bytes, BytesMut};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use std::io::Write as _;
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use uuid::Uuid;

/// The statement the rows are encoded for; its column order is the encoding's.
pub const COPY_STATEMENT: &str = "COPY pipeline_logs (ts, level, message, logger, experiment_id, \
     node_id, stage, context, traceback, metrics, host, daemon, source) FROM STDIN (FORMAT binary)";

/// The start of a binary COPY stream: signature, flags, header extension length.
pub const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// The end of a binary COPY stream.
pub const TRAILER: &[u8] = &[0xff, 0xff];

const TYPES: [Type; 13] = [
    Type::TIMESTAMPTZ,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::UUID,
    Type::TEXT,
    Type::TEXT,
    Type::JSONB,
    Type::TEXT,
    Type::JSONB,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
];

/// One encoded row.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedRow(pub Bytes);

/// The columns every row of one file shares.
#[derive(Debug, Clone, Copy)]
pub struct RowSource<'a> {
    pub host: &'a str,
    pub daemon: &'a str,
    pub source: Option<&'a str>,
}

/// Encodes a row; a field that cannot be encoded (it cannot happen for these types, but the
/// API allows it) is written as NULL where the column allows it, else as an empty string.
pub fn encode(r: &LogRow) -> EncodedRow {
    let mut buf = BytesMut::with_capacity(256 + r.message.len());
    let level = r.level.as_str();
    write_row(
        &mut buf,
        [
            &r.ts,
            &level,
            &r.message,
            &r.logger,
            &r.experiment_id,
            &r.node_id,
            &r.stage,
            &r.context,
            &r.traceback,
            &r.metrics,
            &r.host,
            &r.daemon,
            &r.source,
        ],
    );
    EncodedRow(buf.freeze())
}

/// Encodes a routed row into `buf` and splits it off, so the rows of one chunk share a few
/// allocations. The bytes are exactly [`encode`]'s of the same row with its context expanded
/// ([`LogFields::into_row`]): the raw part of the context is already serialised as
/// `serde_json` writes it, and the rest is serialised after it.
pub fn encode_fields(f: &LogFields, src: RowSource<'_>, buf: &mut BytesMut) -> EncodedRow {
    buf.reserve(
        96 + f.message.len()
            + f.raw_context.len()
            + f.traceback.as_ref().map_or(0, String::len)
            + src.host.len()
            + src.daemon.len()
            + src.source.map_or(0, str::len),
    );
    let level = f.level.as_str();
    let context = ContextParts {
        raw: &f.raw_context,
        rest: &f.context,
    };
    write_row(
        buf,
        [
            &f.ts,
            &level,
            &f.message,
            &f.logger,
            &f.experiment_id,
            &f.node_id,
            &f.stage,
            &context,
            &f.traceback,
            &f.metrics,
            &src.host,
            &src.daemon,
            &src.source,
        ],
    );
    EncodedRow(buf.split().freeze())
}

/// Appends one row (field count, then each field's length and bytes) to `buf`.
fn write_row(buf: &mut BytesMut, values: [&(dyn ToSql + Sync); 13]) {
    buf.put_i16(values.len() as i16);
    for (value, ty) in values.iter().zip(TYPES.iter()) {
        let len_at = buf.len();
        buf.put_i32(0);
        match value.to_sql_checked(ty, buf) {
            Ok(IsNull::No) => {
                let len = (buf.len() - len_at - 4) as i32;
                buf[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
            }
            Ok(IsNull::Yes) | Err(_) => {
                buf.truncate(len_at + 4);
                buf[len_at..len_at + 4].copy_from_slice(&(-1i32).to_be_bytes());
            }
        }
    }
}

/// A context as raw JSON object text (or empty) followed by a map's members.
#[derive(Debug)]
struct ContextParts<'a> {
    raw: &'a str,
    rest: &'a Map<String, Value>,
}

impl ToSql for ContextParts<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        if *ty == Type::JSONB {
            out.put_u8(1);
        }
        let Some(head) = self.raw.strip_suffix('}') else {
            serde_json::to_writer(out.writer(), self.rest)?;
            return Ok(IsNull::No);
        };
        out.put_slice(head.as_bytes());
        let mut first = head.len() <= 1;
        let mut w = out.writer();
        for (k, v) in self.rest {
            if !first {
                w.write_all(b",")?;
            }
            first = false;
            serde_json::to_writer(&mut w, k)?;
            w.write_all(b":")?;
            serde_json::to_writer(&mut w, v)?;
        }
        w.write_all(b"}")?;
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::JSON | Type::JSONB)
    }

    to_sql_checked!();
}

/// Reads an encoded row back (to quarantine it); `None` if the bytes are not a row.
pub fn decode(row: &EncodedRow) -> Option<LogRow> {
    let bytes = &row.0[..];
    let count = i16::from_be_bytes(bytes.get(0..2)?.try_into().ok()?);
    if count != 13 {
        return None;
    }
    let mut fields: Vec<Option<&[u8]>> = Vec::with_capacity(13);
    let mut at = 2;
    for _ in 0..13 {
        let len = i32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if len < 0 {
            fields.push(None);
        } else {
            let end = at + len as usize;
            fields.push(Some(bytes.get(at..end)?));
            at = end;
        }
    }
    fn get<'a, T: FromSql<'a>>(ty: &Type, raw: Option<&'a [u8]>) -> Option<T> {
        raw.and_then(|r| T::from_sql(ty, r).ok())
    }
    let text = |i: usize| get::<String>(&Type::TEXT, fields[i]);
    Some(LogRow {
        ts: get::<DateTime<Utc>>(&Type::TIMESTAMPTZ, fields[0]).unwrap_or_else(Utc::now),
        level: text(1)
            .and_then(|l| Level::from_db(&l))
            .unwrap_or(Level::Info),
        message: text(2).unwrap_or_default(),
        logger: text(3),
        experiment_id: get::<Uuid>(&Type::UUID, fields[4]),
        node_id: text(5),
        stage: text(6),
        context: get::<Value>(&Type::JSONB, fields[7]).unwrap_or(Value::Object(Default::default())),
        traceback: text(8),
        metrics: get::<Value>(&Type::JSONB, fields[9]),
        host: text(10).unwrap_or_default(),
        daemon: text(11).unwrap_or_default(),
        source: text(12),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_row_survives_encoding_and_decoding() {
        let row = LogRow {
            ts: DateTime::parse_from_rfc3339("2026-11-28T10:00:00.123456Z")
                .unwrap()
                .with_timezone(&Utc),
            level: Level::Error,
            message: "boom ✓ 'quoted'".into(),
            logger: Some("geo".into()),
            experiment_id: Some(Uuid::nil()),
            node_id: None,
            stage: Some("clustering".into()),
            context: json!({"a": [1, 2, {"b": null}], "k": "v"}),
            traceback: Some("Traceback…".into()),
            metrics: None,
            host: "h".into(),
            daemon: "d".into(),
            source: Some("/var/log/x.jsonl".into()),
        };
        let enc = encode(&row);
        assert_eq!(decode(&enc), Some(row));
        assert_eq!(decode(&EncodedRow(Bytes::from_static(b"\x00\x01"))), None);
    }

    /// The reader's path (parser fast path, `route_fields`, `encode_fields` into a shared
    /// buffer) gives byte-identical rows to the full path (expanded record, `route`,
    /// `encode`), for odd lines, with and without path captures.
    #[test]
    fn encoding_from_fields_is_byte_identical() {
        use crate::agent::lines::Line;
        use crate::agent::parse::{ParseOptions, Parser};
        use crate::agent::route::{route, route_fields, SourceContext};
        use crate::config::Format;
        let lines = [
            r#"{"event": "Loaded", "experiment_id": "6f1c2a4e-0000-4000-8000-000000000001", "node_id": "w-1", "stage": "ingest", "batch": {"size": 512, "shard": "s-07"}, "duration_ms": 12.3, "seq": 9, "level": "info", "logger": "l", "timestamp": "2026-11-30T01:00:00.000001Z"}"#,
            r#"{"msg": "notes too", "time": "tomorrow", "a": [1, 2.5e-3, "é
"], "progress": "x"}"#,
            r#"{"msg": "p", "progress": {"node_id": "n", "percent": 5}, "k": 1}"#,
            r#"{"msg": "only columns", "level": "error"}"#,
            r#"{"msg": "ctx", "context": {"a": 1}, "a": 2}"#,
            r#"{"msg": "café", "x": {"y": {"z": null}}, "experiment_id": "not-a-uuid"}"#,
            "not json at all",
            r#"{"msg": "dup", "a": 1, "a": 2}"#,
        ];
        let mut caps = Map::new();
        caps.insert("worker".into(), Value::String("w7".into()));
        caps.insert("experiment_id".into(), Value::String("bad".into()));
        let none = Map::new();
        for captures in [&none, &caps] {
            let src = SourceContext {
                host: "h",
                daemon: "d",
                source: "/var/log/x.jsonl",
                path_captures: captures,
                default_experiment_id: None,
                default_node_id: Some("node"),
            };
            let row_src = RowSource {
                host: "h",
                daemon: "d",
                source: Some("/var/log/x.jsonl"),
            };
            let now = Utc::now();
            let mut buf = BytesMut::with_capacity(64);
            let mut raw_seen = false;
            for line in lines {
                let mut p = Parser::new(ParseOptions {
                    format: Format::Auto,
                    text_pattern: None,
                });
                let mut out = Vec::new();
                let bytes = line.as_bytes().to_vec();
                let end = bytes.len() as u64 + 1;
                p.push(
                    Line {
                        bytes,
                        start: 0,
                        end,
                        truncated_from: None,
                    },
                    &mut out,
                );
                let (rec, _) = out.pop().expect("a record");
                raw_seen |= !rec.raw_context.is_empty();
                let mut expanded = rec.clone();
                expanded.expand_context();
                let full = encode(&route(expanded, &src, now).log);
                let fast = encode_fields(&route_fields(rec, &src, now).log, row_src, &mut buf);
                assert_eq!(fast, full, "line {line}");
                assert_eq!(
                    decode(&fast).map(|r| r.context),
                    decode(&full).map(|r| r.context)
                );
            }
            assert!(raw_seen, "the fast path was never taken");
        }
    }
}
