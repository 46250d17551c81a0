//! Serde structs mirroring the TOML file exactly; unknown keys are rejected here.
//!
//! No validation beyond types happens in this module: see `resolve` for that.

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub database: RawDatabase,
    #[serde(default)]
    pub agent: RawAgent,
    #[serde(default)]
    pub batch: RawBatch,
    #[serde(default)]
    pub retention: Option<RawRetention>,
    #[serde(default)]
    /// In the order of the file: a file two daemons match later is the first one's.
    pub daemons: indexmap::IndexMap<String, RawDaemon>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    pub url: Option<String>,
    pub password_file: Option<String>,
    pub ca_file: Option<String>,
    pub connect_timeout: Option<String>,
    pub query_timeout: Option<String>,
    pub keepalives_idle: Option<String>,
    pub keepalives_interval: Option<String>,
    pub keepalives_count: Option<i64>,
    pub tcp_user_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    pub host: Option<String>,
    pub metrics_listen: Option<String>,
    pub max_open_files: Option<i64>,
    pub stuck_after: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBatch {
    pub max_records: Option<i64>,
    pub max_bytes: Option<i64>,
    pub max_wait: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetention {
    pub older_than: Option<String>,
    pub enabled: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDaemon {
    #[serde(default)]
    pub logs: Vec<String>,
    pub format: Option<String>,
    pub text_pattern: Option<String>,
    pub path_pattern: Option<String>,
    pub experiment_id: Option<String>,
    pub node_id: Option<String>,
    pub start_at: Option<String>,
    pub max_line_bytes: Option<i64>,
    pub pid_file: Option<String>,
    pub process_match: Option<String>,
    pub metrics_interval: Option<String>,
    #[serde(default)]
    pub disks: Vec<String>,
    pub stall_after: Option<String>,
    pub stall_cpu_percent: Option<f64>,
    pub busy_stall_after: Option<String>,
    pub stack_dump: Option<String>,
    #[serde(default)]
    pub rules: Vec<RawRule>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    #[serde(rename = "match")]
    pub match_: Option<String>,
    pub field: Option<String>,
    pub progress: Option<BTreeMap<String, toml::Value>>,
    pub event: Option<BTreeMap<String, toml::Value>>,
    pub set: Option<BTreeMap<String, toml::Value>>,
    #[serde(default)]
    pub sticky: bool,
    #[serde(default)]
    pub stop: bool,
}
