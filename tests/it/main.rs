//! The integration tests: one binary, real PostgreSQL, real files, the real `pipewatch` binary.

#![allow(clippy::unwrap_used)]

mod support;

mod config;
mod day_one;
mod faults;
mod fleet;
mod harness;
mod identity;
mod metrics;
mod migrate;
mod operate;
mod packaging;
mod pipelined;
mod pooler;
mod privileges;
mod records;
mod regression;
mod rules_config;
mod rules_e2e;
mod schema;
mod shipper;
mod supervise;
mod tidy;
mod tls;
mod verify;
mod wake;
mod web;
mod why;
