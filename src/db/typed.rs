//! Query parameters that carry their PostgreSQL type, for unnamed statements
//! (`query_typed`, `execute_typed`): the type comes from the Rust type, so a call reads
//! `client.query_typed(SQL, &[p(&id), p(&limit)])`.
//!
//! Why: tokio-postgres prepares a named statement (`s0`, `s1`, …) for every plain
//! `query(&str, …)`. Behind a pooler in transaction mode (pgbouncer) a named statement
//! prepared outside a transaction may be executed, or closed, on another server connection,
//! and clashes with another client's statement of the same name. An unnamed statement is
//! parsed, bound and executed in one message sequence and never outlives it.
//!
//! Only builtin types: a non-builtin parameter or result type makes tokio-postgres prepare
//! and cache a named "typeinfo" statement, which is exactly what must not happen.

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

/// A Rust type's PostgreSQL type, and the type of an array of it.
pub trait PgType {
    const TYPE: Type;
    const ARRAY: Type;
}

macro_rules! pg_type {
    ($($rust:ty => $pg:ident, $arr:ident;)*) => {
        $(impl PgType for $rust {
            const TYPE: Type = Type::$pg;
            const ARRAY: Type = Type::$arr;
        })*
    };
}

pg_type! {
    str => TEXT, TEXT_ARRAY;
    String => TEXT, TEXT_ARRAY;
    bool => BOOL, BOOL_ARRAY;
    i16 => INT2, INT2_ARRAY;
    i32 => INT4, INT4_ARRAY;
    i64 => INT8, INT8_ARRAY;
    f64 => FLOAT8, FLOAT8_ARRAY;
    Uuid => UUID, UUID_ARRAY;
    DateTime<Utc> => TIMESTAMPTZ, TIMESTAMPTZ_ARRAY;
    Value => JSONB, JSONB_ARRAY;
}

impl<T: PgType + ?Sized> PgType for &T {
    const TYPE: Type = T::TYPE;
    const ARRAY: Type = T::ARRAY;
}

impl<T: PgType> PgType for Option<T> {
    const TYPE: Type = T::TYPE;
    const ARRAY: Type = T::ARRAY;
}

impl<T: PgType> PgType for Vec<T> {
    const TYPE: Type = T::ARRAY;
    const ARRAY: Type = Type::UNKNOWN;
}

impl<T: PgType> PgType for [T] {
    const TYPE: Type = T::ARRAY;
    const ARRAY: Type = Type::UNKNOWN;
}

/// A parameter with its type, for `query_typed` and friends.
pub fn p<T: ToSql + Sync + PgType>(value: &T) -> (&(dyn ToSql + Sync), Type) {
    (value, T::TYPE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_types_map_to_their_postgres_types() {
        let s = "x";
        let n: Option<i64> = None;
        let v: Vec<&str> = vec![];
        let ids: Vec<Option<Uuid>> = vec![];
        assert_eq!(p(&s).1, Type::TEXT);
        assert_eq!(p(&String::new()).1, Type::TEXT);
        assert_eq!(p(&n).1, Type::INT8);
        assert_eq!(p(&v).1, Type::TEXT_ARRAY);
        assert_eq!(p(&ids).1, Type::UUID_ARRAY);
        assert_eq!(p(&Utc::now()).1, Type::TIMESTAMPTZ);
        assert_eq!(p(&Value::Null).1, Type::JSONB);
        assert_eq!(p(&1.5f64).1, Type::FLOAT8);
    }
}
