//! The binary COPY encoding of `pipeline_logs` rows. Readers encode each row as they route it,
//! on their own thread, so the sink's single connection only streams bytes; a row is decoded
//! again only when the database refuses it and it must be quarantined.
//!
//! No I/O. The column order is the one [`COPY_STATEMENT`] names.

use crate::model::{Level, LogRow};
use bytes::{BufMut, Bytes, BytesMut};
use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type};
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

/// Encodes a row; a field that cannot be encoded (it cannot happen for these types, but the
/// API allows it) is written as NULL where the column allows it, else as an empty string.
pub fn encode(r: &LogRow) -> EncodedRow {
    let level = r.level.as_str();
    let values: [&(dyn ToSql + Sync); 13] = [
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
    ];
    let mut buf = BytesMut::with_capacity(256 + r.message.len());
    buf.put_i16(values.len() as i16);
    for (value, ty) in values.iter().zip(TYPES.iter()) {
        let len_at = buf.len();
        buf.put_i32(0);
        match value.to_sql_checked(ty, &mut buf) {
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
    EncodedRow(buf.freeze())
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
}
