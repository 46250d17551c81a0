//! The agent's own logging: a `tracing` subscriber writing to stderr.
//!
//! `RUST_LOG` (or `PIPEWATCH_LOG`) overrides the default filter.

use tracing_subscriber::EnvFilter;

/// Installs the subscriber once; `verbose` raises the default level to debug.
pub fn init(verbose: bool) {
    let default = if verbose {
        "pipewatch=debug"
    } else {
        "pipewatch=info"
    };
    let filter = std::env::var("PIPEWATCH_LOG")
        .ok()
        .and_then(|s| EnvFilter::try_new(s).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
