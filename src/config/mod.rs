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

/// Refuses a config in which two daemons' globs match the same existing file (it would be
/// shipped twice): one error per file, naming both daemons. Files that appear later and
/// match both are shipped by the first daemon in config order (see the reader).
pub fn check_shared_files(config: &Config) -> Result<(), resolve::ConfigErrors> {
    use std::collections::BTreeMap;
    use std::os::unix::fs::MetadataExt;
    let mut owner: BTreeMap<(u64, u64), (&str, std::path::PathBuf)> = BTreeMap::new();
    let mut errors = Vec::new();
    for d in &config.daemons {
        let mut mine = std::collections::BTreeSet::new();
        for pattern in &d.logs {
            let Ok(paths) = glob::glob(pattern) else {
                continue;
            };
            for path in paths.filter_map(Result::ok) {
                let Ok(meta) = std::fs::metadata(&path) else {
                    continue;
                };
                if !meta.is_file() || !mine.insert((meta.dev(), meta.ino())) {
                    continue;
                }
                match owner.get(&(meta.dev(), meta.ino())) {
                    Some((first, first_path)) => errors.push(ConfigError {
                        file: config.source.clone(),
                        line: None,
                        key: Some(format!("daemons.{}.logs", d.name)),
                        value: None,
                        reason: format!(
                            "matches {} which daemons.{first}.logs also matches{}: a file is \
                             shipped by one daemon only; narrow one of the globs",
                            path.display(),
                            if *first_path == path {
                                String::new()
                            } else {
                                format!(" (as {})", first_path.display())
                            }
                        ),
                    }),
                    None => {
                        owner.insert((meta.dev(), meta.ino()), (&d.name, path));
                    }
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(resolve::ConfigErrors(errors))
    }
}
