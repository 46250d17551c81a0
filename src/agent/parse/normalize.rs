//! Normalisation helpers shared by the JSON and text parsers: bytes to NUL-free UTF-8,
//! levels, timestamps, and scrubbing `\u0000` out of parsed JSON.
//!
//! Pure: no I/O, no regex compilation, no allocation on the common path (valid UTF-8, no NUL).

use crate::model::Level;
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};
use serde_json::{Map, Value};
use std::borrow::Cow;

/// What [`clean_text`] had to change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cleaned {
    pub invalid_utf8: bool,
    pub nul_removed: bool,
}

/// Turns raw bytes into NUL-free UTF-8: invalid sequences become U+FFFD and NUL bytes are
/// removed. Borrows when nothing had to change.
pub fn clean_text(bytes: &[u8]) -> (Cow<'_, str>, Cleaned) {
    let mut cleaned = Cleaned::default();
    let text = match std::str::from_utf8(bytes) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => {
            cleaned.invalid_utf8 = true;
            Cow::Owned(String::from_utf8_lossy(bytes).into_owned())
        }
    };
    if memchr::memchr(0, text.as_bytes()).is_none() {
        return (text, cleaned);
    }
    cleaned.nul_removed = true;
    (Cow::Owned(text.replace('\0', "")), cleaned)
}

/// Removes NUL characters from an owned string; true when there were any.
pub fn strip_nul(s: &mut String) -> bool {
    if memchr::memchr(0, s.as_bytes()).is_none() {
        return false;
    }
    s.retain(|c| c != '\0');
    true
}

/// Removes NUL characters from every string and key of a JSON value; true when any was found.
/// Recursion is bounded by serde_json's own nesting limit.
pub fn scrub_value(v: &mut Value) -> bool {
    match v {
        Value::String(s) => strip_nul(s),
        Value::Array(a) => a.iter_mut().fold(false, |acc, x| scrub_value(x) | acc),
        Value::Object(m) => scrub_map(m),
        _ => false,
    }
}

/// [`scrub_value`] for an object, including its keys.
pub fn scrub_map(m: &mut Map<String, Value>) -> bool {
    let mut found = false;
    if m.keys().any(|k| k.contains('\0')) {
        let old = std::mem::take(m);
        for (mut k, v) in old {
            strip_nul(&mut k);
            m.insert(k, v);
        }
        found = true;
    }
    for v in m.values_mut() {
        found |= scrub_value(v);
    }
    found
}

/// Drops an incomplete UTF-8 sequence at the end of a truncated line, so that cutting a line
/// inside a character is not reported as invalid UTF-8.
pub fn trim_partial_char(bytes: &[u8]) -> &[u8] {
    let n = bytes.len();
    // A UTF-8 character is at most 4 bytes: look back at most 3 bytes for its lead byte.
    for back in 1..=3.min(n) {
        let b = bytes[n - back];
        if b & 0b1100_0000 == 0b1000_0000 {
            continue; // A continuation byte: keep looking for the lead.
        }
        let width = if b < 0x80 {
            1
        } else if b >= 0xF0 {
            4
        } else if b >= 0xE0 {
            3
        } else if b >= 0xC0 {
            2
        } else {
            1
        };
        return if width > back {
            &bytes[..n - back]
        } else {
            bytes
        };
    }
    bytes
}

/// A level spelled as a word (`warn`, `WARNING`, `fatal` …) or a numeric string, which is
/// read on `numeric`'s scale. `None` when unknown.
pub fn level_from_str(s: &str, numeric: NumericScale) -> Option<Level> {
    let s = s.trim();
    let mut buf = [0u8; 16];
    if s.len() > buf.len() {
        return None;
    }
    let lower = &mut buf[..s.len()];
    lower.copy_from_slice(s.as_bytes());
    lower.make_ascii_lowercase();
    Some(match &*lower {
        b"trace" | b"debug" | b"verbose" | b"dbg" | b"fine" | b"finer" | b"finest" => Level::Debug,
        b"info" | b"information" | b"informational" | b"notice" | b"success" | b"inf" => {
            Level::Info
        }
        b"warn" | b"warning" | b"wrn" => Level::Warning,
        b"error" | b"err" | b"exception" | b"severe" => Level::Error,
        b"critical" | b"fatal" | b"crit" | b"alert" | b"emerg" | b"emergency" | b"panic"
        | b"ftl" => Level::Critical,
        _ => {
            let n: f64 = s.parse().ok()?;
            return level_from_number(n, numeric);
        }
    })
}

/// Which numeric scale a level number is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumericScale {
    /// pino/bunyan: 10 trace, 20 debug, 30 info, 40 warn, 50 error, 60 fatal. Used for a
    /// number in `level`/`severity`, since JSON loggers that write a numeric `level` are
    /// pino and bunyan.
    Pino,
    /// Python logging: 10 DEBUG, 20 INFO, 30 WARNING, 40 ERROR, 50 CRITICAL. Used for
    /// `levelno`.
    Python,
}

/// A numeric level on the given scale; values between the steps round down. `None` for
/// non-finite or negative numbers.
pub fn level_from_number(n: f64, scale: NumericScale) -> Option<Level> {
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    Some(match scale {
        NumericScale::Pino => match n {
            n if n < 30.0 => Level::Debug,
            n if n < 40.0 => Level::Info,
            n if n < 50.0 => Level::Warning,
            n if n < 60.0 => Level::Error,
            _ => Level::Critical,
        },
        NumericScale::Python => match n {
            n if n < 20.0 => Level::Debug,
            n if n < 30.0 => Level::Info,
            n if n < 40.0 => Level::Warning,
            n if n < 50.0 => Level::Error,
            _ => Level::Critical,
        },
    })
}

/// A level from a JSON value (string or number). `None` when unknown.
pub fn level_from_value(v: &Value, scale: NumericScale) -> Option<Level> {
    match v {
        Value::String(s) => level_from_str(s, scale),
        Value::Number(n) => n.as_f64().and_then(|f| level_from_number(f, scale)),
        _ => None,
    }
}

/// The earliest and latest years accepted as a record time.
const MIN_YEAR: i32 = 1;
const MAX_YEAR: i32 = 9999;

fn in_range(t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    use chrono::Datelike;
    (MIN_YEAR..=MAX_YEAR).contains(&t.year()).then_some(t)
}

/// The unit of an epoch number, told apart by magnitude: below 1e11 seconds (year 5138),
/// below 1e14 milliseconds, below 1e17 microseconds, else nanoseconds. Returns units per second.
pub fn epoch_unit(abs: f64) -> i64 {
    if abs < 1e11 {
        1
    } else if abs < 1e14 {
        1_000
    } else if abs < 1e17 {
        1_000_000
    } else {
        1_000_000_000
    }
}

/// An integer epoch time in the unit its magnitude suggests (see [`epoch_unit`]). `None`
/// when out of range (years 1–9999).
pub fn ts_from_epoch_int(n: i64) -> Option<DateTime<Utc>> {
    let unit = epoch_unit(n.unsigned_abs() as f64);
    let secs = n.div_euclid(unit);
    let nanos = n.rem_euclid(unit) * (1_000_000_000 / unit);
    DateTime::from_timestamp(secs, u32::try_from(nanos).ok()?).and_then(in_range)
}

/// A fractional epoch time, rounded to microseconds (PostgreSQL's precision, and about what
/// an f64 holds for current times in seconds). `None` when out of range (years 1–9999).
pub fn ts_from_epoch(x: f64) -> Option<DateTime<Utc>> {
    if !x.is_finite() {
        return None;
    }
    if x.fract() == 0.0 && x.abs() < 9e15 {
        return ts_from_epoch_int(x as i64);
    }
    let secs = x / epoch_unit(x.abs()) as f64;
    // Years 1..=9999 lie well within ±3e11 seconds, so the conversion below cannot overflow.
    if secs.abs() > 3e11 {
        return None;
    }
    let mut whole = secs.floor() as i64;
    let mut micros = ((secs - secs.floor()) * 1e6).round() as u32;
    if micros >= 1_000_000 {
        whole += 1;
        micros = 0;
    }
    DateTime::from_timestamp(whole, micros * 1_000).and_then(in_range)
}

/// A timestamp from a JSON value: a string (see [`ts_from_str`]) or an epoch number.
pub fn ts_from_value(v: &Value) -> Option<DateTime<Utc>> {
    match v {
        Value::String(s) => ts_from_str(s),
        Value::Number(n) => match n.as_i64() {
            Some(i) => ts_from_epoch_int(i),
            None => n.as_f64().and_then(ts_from_epoch),
        },
        _ => None,
    }
}

/// Parses RFC 3339 and its relatives: `YYYY-MM-DD[( |T)HH:MM[:SS[(.|,)fraction]]]` with an
/// optional `Z`, `±HH`, `±HHMM` or `±HH:MM` zone (naive = UTC), and numeric strings as epoch
/// times. `None` when unparseable or outside years 1–9999.
pub fn ts_from_str(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    let b = s.as_bytes();
    if b.len() >= 10 && b[4] == b'-' && b[7] == b'-' {
        return parse_iso(b);
    }
    if !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_digit() || *c == b'.' || *c == b'-')
    {
        return match s.parse::<i64>() {
            Ok(i) => ts_from_epoch_int(i),
            Err(_) => s.parse::<f64>().ok().and_then(ts_from_epoch),
        };
    }
    None
}

/// Reads `n` ASCII digits at `*i`, advancing it.
fn digits(b: &[u8], i: &mut usize, n: usize) -> Option<u32> {
    let end = i.checked_add(n)?;
    let part = b.get(*i..end)?;
    let mut v = 0u32;
    for c in part {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u32::from(c - b'0');
    }
    *i = end;
    Some(v)
}

fn parse_iso(b: &[u8]) -> Option<DateTime<Utc>> {
    let mut i = 0;
    let year = digits(b, &mut i, 4)?;
    i += 1;
    let month = digits(b, &mut i, 2)?;
    i += 1;
    let day = digits(b, &mut i, 2)?;
    let date = NaiveDate::from_ymd_opt(year as i32, month, day)?;
    let (mut h, mut m, mut sec, mut nanos) = (0, 0, 0, 0u32);
    if i < b.len() && matches!(b[i], b'T' | b't' | b' ') {
        i += 1;
        h = digits(b, &mut i, 2)?;
        if b.get(i) != Some(&b':') {
            return None;
        }
        i += 1;
        m = digits(b, &mut i, 2)?;
        if b.get(i) == Some(&b':') {
            i += 1;
            sec = digits(b, &mut i, 2)?;
            if matches!(b.get(i), Some(b'.' | b',')) {
                i += 1;
                let start = i;
                let mut scale = 100_000_000u32;
                while let Some(c) = b.get(i).filter(|c| c.is_ascii_digit()) {
                    nanos += u32::from(c - b'0') * scale;
                    scale /= 10;
                    i += 1;
                }
                if i == start {
                    return None;
                }
            }
        }
    }
    let time = NaiveTime::from_hms_nano_opt(h, m, sec, nanos)?;
    let naive = NaiveDateTime::new(date, time);
    // Zone: nothing (naive = UTC), 'Z', or an offset.
    let rest = b.get(i..)?;
    let rest = match rest.first() {
        Some(b' ') => &rest[1..],
        _ => rest,
    };
    let offset_secs: i32 = match rest {
        [] => 0,
        [b'Z' | b'z'] => 0,
        [b'U', b'T', b'C'] => 0,
        [sign @ (b'+' | b'-'), tail @ ..] => {
            let mut j = 0;
            let oh = digits(tail, &mut j, 2)?;
            let om = match &tail[j..] {
                [] => 0,
                [b':', _, _] => {
                    j += 1;
                    digits(tail, &mut j, 2)?
                }
                [_, _] => digits(tail, &mut j, 2)?,
                _ => return None,
            };
            if oh > 23 || om > 59 {
                return None;
            }
            let total = (oh * 3600 + om * 60) as i32;
            if *sign == b'-' {
                -total
            } else {
                total
            }
        }
        _ => return None,
    };
    let utc = Utc.from_utc_datetime(&naive) - chrono::Duration::seconds(i64::from(offset_secs));
    in_range(utc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ts(s: &str) -> Option<String> {
        ts_from_str(s).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
    }

    /// One table for the small helpers: `(input, expected)` rendered as strings.
    fn check(cases: &[(&str, Option<&str>)], f: impl Fn(&str) -> Option<String>) {
        for (input, expected) in cases {
            assert_eq!(f(input).as_deref(), *expected, "input {input:?}");
        }
    }

    #[test]
    fn timestamps() {
        check(
            &[
                ("2024-05-01T12:00:00Z", Some("2024-05-01T12:00:00Z")),
                (
                    "2024-05-01T12:00:00.123456+00:00",
                    Some("2024-05-01T12:00:00.123456Z"),
                ),
                ("2024-05-01T14:00:00+02:00", Some("2024-05-01T12:00:00Z")),
                ("2024-05-01T14:00:00+0200", Some("2024-05-01T12:00:00Z")),
                ("2024-05-01T10:00:00-02", Some("2024-05-01T12:00:00Z")),
                ("2024-05-01 12:00:00,123", Some("2024-05-01T12:00:00.123Z")),
                ("2024-05-01 12:00:00.123", Some("2024-05-01T12:00:00.123Z")),
                ("2024-05-01 12:00:00 UTC", Some("2024-05-01T12:00:00Z")),
                ("2024-05-01t12:00", Some("2024-05-01T12:00:00Z")),
                ("2024-05-01", Some("2024-05-01T00:00:00Z")),
                ("1714564800", Some("2024-05-01T12:00:00Z")),
                ("1714564800.5", Some("2024-05-01T12:00:00.500Z")),
                ("1714564800123", Some("2024-05-01T12:00:00.123Z")),
                ("0001-01-01T00:00:00Z", Some("0001-01-01T00:00:00Z")),
                ("0000-01-01T00:00:00Z", None),
                ("9999-12-31T23:59:59Z", Some("9999-12-31T23:59:59Z")),
                ("0001-01-01T00:00:00+01:00", None),
                ("2024-02-30T00:00:00Z", None),
                ("2024-05-01T25:00:00Z", None),
                ("2024-05-01T12:00:00.Z", None),
                ("2024-05-01T12:00:00 nonsense", None),
                ("yesterday", None),
                ("", None),
                ("-", None),
                ("1e400", None),
                ("99999999999999999999999", None),
            ],
            ts,
        );
    }

    #[test]
    fn epoch_numbers() {
        let f = |v: Value| ts_from_value(&v).map(|t| t.timestamp_millis());
        assert_eq!(f(json!(1714564800)), Some(1714564800000));
        assert_eq!(f(json!(1714564800.25)), Some(1714564800250));
        assert_eq!(f(json!(1714564800123u64)), Some(1714564800123));
        assert_eq!(f(json!(1714564800123456u64)), Some(1714564800123));
        assert_eq!(f(json!(1714564800123456789u64)), Some(1714564800123));
        assert_eq!(f(json!(0)), Some(0));
        assert_eq!(f(json!(u64::MAX)), Some(18446744073709));
        assert_eq!(f(json!(1e30)), None);
        assert_eq!(f(json!(-1e30)), None);
        assert_eq!(f(json!(true)), None);
    }

    #[test]
    fn levels() {
        let pino = |s: &str| level_from_str(s, NumericScale::Pino).map(|l| l.to_string());
        check(
            &[
                ("warn", Some("WARNING")),
                ("Warning", Some("WARNING")),
                ("FATAL", Some("CRITICAL")),
                ("trace", Some("DEBUG")),
                ("notice", Some("INFO")),
                ("exception", Some("ERROR")),
                ("emerg", Some("CRITICAL")),
                (" err ", Some("ERROR")),
                ("30", Some("INFO")),
                ("40", Some("WARNING")),
                ("60", Some("CRITICAL")),
                ("10", Some("DEBUG")),
                ("loud", None),
                ("a very long level name", None),
                ("-5", None),
                ("", None),
            ],
            pino,
        );
        let py = |s: &str| level_from_str(s, NumericScale::Python).map(|l| l.to_string());
        check(
            &[
                ("10", Some("DEBUG")),
                ("20", Some("INFO")),
                ("30", Some("WARNING")),
                ("40", Some("ERROR")),
                ("50", Some("CRITICAL")),
                ("25", Some("INFO")),
            ],
            py,
        );
        assert_eq!(
            level_from_value(&json!(50), NumericScale::Pino),
            Some(Level::Error)
        );
        assert_eq!(level_from_value(&json!(null), NumericScale::Pino), None);
    }

    #[test]
    fn text_cleaning() {
        let f = |b: &[u8]| {
            let (t, c) = clean_text(b);
            (t.into_owned(), c.invalid_utf8, c.nul_removed)
        };
        assert_eq!(f(b"plain"), ("plain".into(), false, false));
        assert_eq!(f(b"a\0b"), ("ab".into(), false, true));
        assert_eq!(f(b"a\xffb"), ("a\u{fffd}b".into(), true, false));
        assert_eq!(f(b"\0\xff"), ("\u{fffd}".into(), true, true));
    }

    #[test]
    fn partial_chars_are_trimmed() {
        let e = "é".as_bytes(); // 2 bytes
        let euro = "€".as_bytes(); // 3 bytes
        let crab = "🦀".as_bytes(); // 4 bytes
        assert_eq!(trim_partial_char(b"abc"), b"abc");
        assert_eq!(trim_partial_char(&[b'a', e[0]]), b"a");
        assert_eq!(trim_partial_char(&[b'a', e[0], e[1]]), &[b'a', e[0], e[1]]);
        assert_eq!(trim_partial_char(&[b'a', euro[0], euro[1]]), b"a");
        assert_eq!(trim_partial_char(&[b'a', crab[0], crab[1], crab[2]]), b"a");
        assert_eq!(trim_partial_char(crab), crab);
        assert_eq!(
            trim_partial_char(&[0x80, 0x80, 0x80, 0x80]),
            &[0x80, 0x80, 0x80, 0x80]
        );
        assert_eq!(trim_partial_char(b""), b"");
    }

    #[test]
    fn scrubbing_keys_and_values() {
        let mut v = json!({"a\u{0}b": ["x\u{0}", {"k": "v\u{0}"}], "n": 1});
        assert!(scrub_value(&mut v));
        assert_eq!(v, json!({"ab": ["x", {"k": "v"}], "n": 1}));
        assert!(!scrub_value(&mut v));
    }
}
