//! Helpers shared by the integration tests: a throwaway PostgreSQL and the real binary.

#![allow(dead_code)]

pub mod agent;
pub mod nonroot;
pub mod pg;
pub mod pooler;
pub mod proxy;

use std::path::PathBuf;
use std::process::{Command, Output};

/// The `pipewatch` binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pipewatch"))
}

/// Runs the binary with `args`, isolated from the caller's environment variables.
pub fn pipewatch(args: &[&str]) -> Output {
    pipewatch_cmd(args)
        .output()
        .expect("the pipewatch binary runs")
}

/// A `Command` for the binary with the pipewatch environment cleared.
pub fn pipewatch_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .env_remove("PIPEWATCH_DATABASE_URL")
        .env_remove("PIPEWATCH_CONFIG")
        .env_remove("PGPASSWORD")
        .env_remove("RUST_LOG")
        .env_remove("PIPEWATCH_LOG");
    cmd
}

/// stdout and stderr as strings.
pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
