//! Parsing and normalising log lines into [`crate::model::Record`]s. Never fails.
