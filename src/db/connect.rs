//! Building a connection from a libpq-style URL or key=value string, with `sslmode`,
//! `sslrootcert`/`ca_file` and `password_file` handled the way libpq users expect.
//!
//! Never logs or prints a password: only [`DbTarget::display`] is shown to people.

use crate::config::redact::redact_url;
use anyhow::{bail, Context as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;
use tokio_postgres::Client;

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<SslMode> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => bail!(
                "sslmode={other:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
            ),
        })
    }
}

/// A resolved database target: the parsed connection settings plus TLS choices.
#[derive(Clone)]
pub struct DbTarget {
    pub config: tokio_postgres::Config,
    pub ssl_mode: SslMode,
    pub ca_file: Option<PathBuf>,
    /// The URL with its password hidden, for messages.
    pub display: String,
}

impl std::fmt::Debug for DbTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbTarget")
            .field("display", &self.display)
            .field("ssl_mode", &self.ssl_mode)
            .finish()
    }
}

impl DbTarget {
    /// Parses `url`; `password_file` and `ca_file` come from the config file.
    pub fn parse(
        url: &str,
        password_file: Option<&Path>,
        ca_file: Option<&Path>,
    ) -> anyhow::Result<DbTarget> {
        let display = redact_url(url);
        let (rest, ssl_mode, root_cert) =
            extract_ssl(url).with_context(|| format!("invalid database URL {display}"))?;
        let mut config = tokio_postgres::Config::from_str(&rest)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("invalid database URL {display}"))?;
        config.ssl_mode(match ssl_mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_application_name().is_none() {
            config.application_name("pipewatch");
        }
        if config.get_password().is_none() {
            if let Some(pf) = password_file {
                let pw = std::fs::read_to_string(pf)
                    .with_context(|| format!("cannot read password_file {}", pf.display()))?;
                config.password(pw.trim_end_matches(['\n', '\r']));
            } else if let Ok(pw) = std::env::var("PGPASSWORD") {
                config.password(pw);
            }
        }
        if config.get_user().is_none() {
            if let Ok(u) = std::env::var("PGUSER") {
                config.user(&u);
            } else if let Ok(u) = std::env::var("USER") {
                config.user(&u);
            }
        }
        let ca_file = root_cert
            .map(PathBuf::from)
            .or_else(|| ca_file.map(Path::to_path_buf));
        Ok(DbTarget {
            config,
            ssl_mode,
            ca_file,
            display,
        })
    }
}

/// Removes `sslmode` and `sslrootcert` from a URL or key=value string (tokio-postgres knows
/// only some of libpq's modes) and returns them separately.
fn extract_ssl(url: &str) -> anyhow::Result<(String, SslMode, Option<String>)> {
    let url = url.trim();
    let mut mode = None;
    let mut root = None;
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            None => url.to_string(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for part in query.split('&') {
                    match part.split_once('=') {
                        Some(("sslmode", v)) => mode = Some(v.to_string()),
                        Some(("sslrootcert", v)) => root = Some(percent_decode(v)),
                        _ if part.is_empty() => {}
                        _ => kept.push(part),
                    }
                }
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for part in url.split_whitespace() {
            match part.split_once('=') {
                Some(("sslmode", v)) => mode = Some(v.trim_matches('\'').to_string()),
                Some(("sslrootcert", v)) => root = Some(v.trim_matches('\'').to_string()),
                _ => kept.push(part),
            }
        }
        kept.join(" ")
    };
    let mode = match mode {
        Some(m) => m.parse()?,
        None => match std::env::var("PGSSLMODE") {
            Ok(m) => m.parse()?,
            Err(_) => SslMode::Prefer,
        },
    };
    Ok((rest, mode, root))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Connects and spawns the connection task; the error names the target (password hidden).
pub async fn connect(target: &DbTarget) -> anyhow::Result<Client> {
    let client = crate::db::tls::connect(target)
        .await
        .with_context(|| format!("cannot connect to {}", target.display))?;
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_ssl_options() {
        let (rest, mode, root) = extract_ssl(
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
        )
        .expect("parses");
        assert_eq!(rest, "postgres://u@h/db?application_name=x");
        assert_eq!(mode, SslMode::VerifyFull);
        assert_eq!(root.as_deref(), Some("/etc/ca.pem"));
        let (rest, mode, _) = extract_ssl("host=h sslmode=disable dbname=d").expect("parses");
        assert_eq!(rest, "host=h dbname=d");
        assert_eq!(mode, SslMode::Disable);
        assert!(extract_ssl("postgres://h/db?sslmode=bogus").is_err());
    }
}
