//! Configuration: the TOML file (`raw`), its validated form (`resolve`) and how it is shown
//! with secrets hidden (`redact`).
//!
//! Loading reads only the config file and the password file; it never touches the network.

pub mod raw;
pub mod redact;
pub mod resolve;

pub use resolve::{
    load, AgentConfig, BatchConfig, Config, ConfigError, ConnectionLimits, DaemonConfig,
    DatabaseConfig, Format, RetentionConfig, StartAt,
};
