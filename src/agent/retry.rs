//! Deciding what a database error means for a batch — retry it, split it, or wait for an
//! operator — in one place, plus the capped exponential backoff with jitter.

use std::time::Duration;

/// What to do after an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Connection lost, server shutting down, out of resources, serialization failure:
    /// reconnect if needed and retry the same batch.
    Retry,
    /// The database refused the data itself: split the batch to isolate the bad record.
    Data,
    /// Missing tables or privileges: nothing pipewatch can fix by itself.
    Schema,
    /// The server refused the login (password, role, database name, CONNECT privilege): a
    /// configuration error, not an outage. Retried slowly by a running agent only. Told
    /// apart at connect time by `db::connect::is_login_error`.
    Login,
}

/// Classifies by SQLSTATE class; errors without a SQLSTATE are connection problems.
pub fn classify(err: &tokio_postgres::Error) -> ErrorKind {
    if err.is_closed() {
        return ErrorKind::Retry;
    }
    match err.code() {
        None => ErrorKind::Retry,
        Some(code) => classify_sqlstate(code.code()),
    }
}

/// Classifies a five-character SQLSTATE.
pub fn classify_sqlstate(code: &str) -> ErrorKind {
    match code.get(..2).unwrap_or("") {
        // Connection, resources, operator intervention, system errors, transaction rollback
        // (serialization, deadlock), lock not available, internal errors.
        "08" | "53" | "57" | "58" | "40" | "55" | "XX" | "25" => ErrorKind::Retry,
        // Undefined table or column, insufficient privilege, invalid schema.
        "42" | "3F" | "28" => ErrorKind::Schema,
        // Data exceptions (22), integrity constraints (23), and anything else about the rows.
        _ => ErrorKind::Data,
    }
}

/// Capped exponential backoff with ±25 % jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
    seed: u64,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9)
            | 1;
        Backoff {
            next: min,
            min,
            max,
            seed,
        }
    }

    /// The next delay; each call doubles the base up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        // xorshift64: cheap, good enough for jitter.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let unit = (self.seed % 1000) as f64 / 1000.0; // 0..1
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        base.mul_f64(0.75 + 0.5 * unit).min(self.max)
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        for (code, kind) in [
            ("08006", ErrorKind::Retry),
            ("57P01", ErrorKind::Retry),
            ("53300", ErrorKind::Retry),
            ("40001", ErrorKind::Retry),
            ("22P05", ErrorKind::Data),
            ("22008", ErrorKind::Data),
            ("23514", ErrorKind::Data),
            ("42P01", ErrorKind::Schema),
            ("42501", ErrorKind::Schema),
        ] {
            assert_eq!(classify_sqlstate(code), kind, "{code}");
        }
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(75) && delays[0] <= Duration::from_millis(125));
        assert!(delays[9] <= Duration::from_secs(2));
        assert!(delays[9] >= Duration::from_millis(1500));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(125));
    }
}
