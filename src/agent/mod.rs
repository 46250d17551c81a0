//! The agent: discovers log files, tails them, parses and routes records, batches rows and
//! commits them with file positions in one transaction; samples daemon metrics alongside.

pub mod activity;
pub mod lines;
pub mod metrics;
pub mod parse;
pub mod route;
pub mod rules;
