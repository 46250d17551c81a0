//! The integration tests: one binary, real PostgreSQL, real files, the real `pipewatch` binary.

mod support;

mod harness;
mod rules_config;
