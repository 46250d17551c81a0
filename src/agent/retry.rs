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

/// Capped exponential backoff with full jitter: the n-th delay is uniform in
/// `[0, min(max, min × 2ⁿ)]`, from the first retry on. When a database restart drops every
/// agent of a fleet at the same instant, their retries spread over the whole window instead of
/// arriving together (±25 % around a shared schedule kept them in step: 200 agents retried
/// within the same 50 ms). [`Backoff::steady`] keeps a regular period (±25 %) for waits that
/// must not become short, such as logins after a refusal.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
    seed: u64,
    full: bool,
}

/// The shortest delay full jitter returns, so that a retry is never an immediate spin.
const FLOOR: Duration = Duration::from_millis(1);

impl Backoff {
    /// Full jitter, the base doubling from `min` up to `max`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff::with(min, max, true)
    }

    /// A regular period with ±25 % jitter (no growth).
    pub fn steady(period: Duration) -> Backoff {
        Backoff::with(period, period, false)
    }

    fn with(min: Duration, max: Duration, full: bool) -> Backoff {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9);
        // Agents started in the same instant differ by their PID.
        let seed =
            (now ^ (u64::from(std::process::id()) << 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        Backoff {
            next: min,
            min,
            max,
            seed,
            full,
        }
    }

    /// A uniform number in [0, 1).
    fn unit(&mut self) -> f64 {
        // xorshift64: cheap, good enough for jitter.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        (self.seed >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The next delay; each call doubles the base up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let unit = self.unit();
        let base = self.next.min(self.max);
        self.next = (self.next * 2).min(self.max);
        if self.full {
            base.mul_f64(unit).max(FLOOR.min(base))
        } else {
            base.mul_f64(0.75 + 0.5 * unit)
        }
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Spreads an agent's catch-up after an outage: for `window` after the database is back, each
/// committed batch is followed by a pause of `rows / rows_per_sec`, so one agent with a large
/// backlog cannot take the server from the others coming back with it. A batch of steady-state
/// size pauses for a few milliseconds at most; outside the window nothing pauses.
#[derive(Debug, Clone)]
pub struct CatchUp {
    rows_per_sec: f64,
    window: Duration,
    until: Option<std::time::Instant>,
}

/// Rows per second one agent commits at most while catching up.
pub const CATCHUP_ROWS_PER_SEC: f64 = 10_000.0;
/// How long after an outage the catch-up pace holds.
pub const CATCHUP_WINDOW: Duration = Duration::from_secs(60);

impl Default for CatchUp {
    fn default() -> CatchUp {
        CatchUp::new(CATCHUP_ROWS_PER_SEC, CATCHUP_WINDOW)
    }
}

impl CatchUp {
    pub fn new(rows_per_sec: f64, window: Duration) -> CatchUp {
        CatchUp {
            rows_per_sec: rows_per_sec.max(1.0),
            window,
            until: None,
        }
    }

    /// The database is reachable again after an outage.
    pub fn begin(&mut self) {
        self.until = Some(std::time::Instant::now() + self.window);
    }

    /// Whether the catch-up pace holds now.
    pub fn active(&self) -> bool {
        self.until
            .is_some_and(|until| std::time::Instant::now() < until)
    }

    /// The pause after committing `rows`, while catching up.
    pub fn pause_after(&mut self, rows: usize) -> Option<Duration> {
        let until = self.until?;
        if std::time::Instant::now() >= until {
            self.until = None;
            return None;
        }
        let pause = Duration::from_secs_f64(rows as f64 / self.rows_per_sec);
        (pause >= Duration::from_millis(1)).then_some(pause)
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
    fn full_jitter_from_the_first_retry_grows_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays[0] <= Duration::from_millis(100));
        assert!(delays[1] <= Duration::from_millis(200));
        assert!(delays
            .iter()
            .all(|d| *d <= Duration::from_secs(2) && *d >= FLOOR));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn full_jitter_spreads_the_first_retries_of_a_fleet() {
        // 200 agents dropped at the same instant: their first retries cover the whole
        // [0, 100 ms] window instead of a band around 100 ms.
        let firsts: Vec<f64> = (0..200)
            .map(|i| {
                let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
                b.seed = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                b.next_delay().as_secs_f64() * 1000.0
            })
            .collect();
        let early = firsts.iter().filter(|ms| **ms < 25.0).count();
        let late = firsts.iter().filter(|ms| **ms > 75.0).count();
        assert!(early > 25 && late > 25, "early {early}, late {late}");
        // Capped: at the cap the delays are uniform in [0, cap], mean about half.
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let capped: Vec<f64> = (0..400)
            .map(|_| b.next_delay().as_secs_f64())
            .skip(20)
            .collect();
        let mean = capped.iter().sum::<f64>() / capped.len() as f64;
        assert!((3.5..6.5).contains(&mean), "mean {mean}");
    }

    #[test]
    fn steady_keeps_its_period() {
        let mut b = Backoff::steady(Duration::from_secs(60));
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_secs(45) && d <= Duration::from_secs(75),
                "{d:?}"
            );
        }
    }

    #[test]
    fn catch_up_paces_large_batches_only_inside_its_window() {
        let mut c = CatchUp::new(5000.0, Duration::from_millis(200));
        assert_eq!(c.pause_after(5000), None, "no outage, no pause");
        c.begin();
        assert_eq!(c.pause_after(5000), Some(Duration::from_secs(1)));
        assert_eq!(
            c.pause_after(4),
            None,
            "a steady-state batch does not pause"
        );
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(c.pause_after(5000), None, "the window is over");
    }
}
