//! pipewatch: a sidecar agent that tails data-pipeline daemons' logs and ships records,
//! progress, events and metrics into PostgreSQL exactly once.
//!
//! # Layout
//! - `cli`: one module per subcommand; the only place that prints for the user.
//! - `config`: TOML → validated `Config`.
//! - `db`: connecting, migrations, schema checks, operator queries.
//! - `agent`: the shipper (discover → tail → parse → rules → route → batch → sink) and the
//!   metrics sampler.
//! - `web`: the read-only web view (`pipewatch web`).
//! - `model`: records and rows passed between the agent's stages.
//! - `diagnose`: what a silent daemon is doing (/proc snapshot → verdict), for `why` and stall events.

pub mod agent;
pub mod cli;
pub mod config;
pub mod db;
pub mod diagnose;
pub mod exit;
pub mod model;
pub mod suggest;
pub mod telemetry;
pub mod web;
