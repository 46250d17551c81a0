//! Exit codes and the marker error that selects the usage code.
//!
//! `main` is the only place that turns these into a process exit.

use std::fmt;

/// 0 success, 1 runtime failure, 2 usage or configuration error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Success = 0,
    Failure = 1,
    Usage = 2,
}

impl From<Code> for std::process::ExitCode {
    fn from(c: Code) -> Self {
        std::process::ExitCode::from(c as u8)
    }
}

/// An error caused by how pipewatch was invoked or configured (exit code 2).
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Shorthand for returning a usage error through `anyhow`.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg.into()))
}

/// The exit code an error chain deserves.
pub fn code_for(err: &anyhow::Error) -> Code {
    for cause in err.chain() {
        if cause.is::<UsageError>() || cause.is::<crate::config::resolve::ConfigErrors>() {
            return Code::Usage;
        }
    }
    Code::Failure
}

/// Advice for errors with a usual cause: a missing table or function means the schema was
/// never migrated (or is older than this binary).
pub fn hint_for(err: &anyhow::Error) -> Option<&'static str> {
    for cause in err.chain() {
        if let Some(pg) = cause.downcast_ref::<tokio_postgres::Error>() {
            let code = pg.code().map(|c| c.code());
            if matches!(code, Some("42P01" | "42883" | "42703")) {
                return Some(" (is the schema migrated? run `pipewatch migrate`)");
            }
        }
    }
    None
}
