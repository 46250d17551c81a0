//! Building a connection from a libpq-style URL or key=value string, with `sslmode`,
//! `sslrootcert`/`ca_file` and `password_file` handled the way libpq users expect.
//!
//! Every connection gets the `[database]` deadlines and keepalives ([`ConnectionLimits`]);
//! a login the server refuses is told apart from an outage ([`LoginRefused`]).
//!
//! Never logs or prints a password: only [`DbTarget::display`] is shown to people.

use crate::config::redact::redact_url;
use crate::config::ConnectionLimits;
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
    /// The deadlines and keepalives in force (the URL's own parameters included).
    pub limits: ConnectionLimits,
    /// The limits the URL itself set (libpq parameters), which win over the config file.
    url_limits: UrlLimits,
    /// Whether the URL named the `application_name` itself (then it is never replaced).
    url_application_name: bool,
}

/// What the URL said about the limits; `None` where it said nothing.
#[derive(Debug, Clone, Copy, Default)]
struct UrlLimits {
    connect_timeout: Option<Duration>,
    keepalives_idle: Option<Duration>,
    keepalives_interval: Option<Duration>,
    keepalives_count: Option<u32>,
    tcp_user_timeout: Option<Duration>,
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
        // tokio-postgres's default idle time (2 h) stands for "not in the URL".
        let idle = config.get_keepalives_idle();
        let url_limits = UrlLimits {
            connect_timeout: config.get_connect_timeout().copied(),
            keepalives_idle: (idle != Duration::from_secs(2 * 3600)).then_some(idle),
            keepalives_interval: config.get_keepalives_interval(),
            keepalives_count: config.get_keepalives_retries(),
            tcp_user_timeout: config
                .get_tcp_user_timeout()
                .copied()
                .filter(|d| !d.is_zero()),
        };
        let url_application_name = config.get_application_name().is_some();
        if !url_application_name {
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
        let mut target = DbTarget {
            config,
            ssl_mode,
            ca_file,
            display,
            limits: ConnectionLimits::default(),
            url_limits,
            url_application_name,
        };
        target.set_limits(&ConnectionLimits::default());
        Ok(target)
    }

    /// Names the connections in `pg_stat_activity` (e.g. `pipewatch/worker-07`), unless the
    /// URL set `application_name` itself. PostgreSQL keeps 63 bytes of it; so does this.
    pub fn with_application_name(mut self, name: &str) -> DbTarget {
        if !self.url_application_name {
            let mut end = name.len().min(63);
            while !name.is_char_boundary(end) {
                end -= 1;
            }
            self.config.application_name(&name[..end]);
        }
        self
    }

    /// Applies the `[database]` limits; parameters the URL sets itself win.
    pub fn with_limits(mut self, limits: &ConnectionLimits) -> DbTarget {
        self.set_limits(limits);
        self
    }

    fn set_limits(&mut self, limits: &ConnectionLimits) {
        let u = self.url_limits;
        let l = ConnectionLimits {
            connect_timeout: u.connect_timeout.unwrap_or(limits.connect_timeout),
            query_timeout: limits.query_timeout,
            keepalives_idle: u.keepalives_idle.unwrap_or(limits.keepalives_idle),
            keepalives_interval: u.keepalives_interval.unwrap_or(limits.keepalives_interval),
            keepalives_count: u.keepalives_count.unwrap_or(limits.keepalives_count),
            tcp_user_timeout: u.tcp_user_timeout.unwrap_or(limits.tcp_user_timeout),
        };
        self.config
            .connect_timeout(l.connect_timeout)
            .keepalives_idle(l.keepalives_idle)
            .keepalives_interval(l.keepalives_interval)
            .keepalives_retries(l.keepalives_count)
            .tcp_user_timeout(l.tcp_user_timeout);
        self.limits = l;
    }
}

/// The server refused the login: wrong password, unknown role or database, no CONNECT
/// privilege. Retrying cannot help until someone changes the configuration or the role.
#[derive(Debug, Clone)]
pub struct LoginRefused {
    /// The target, password hidden.
    pub target: String,
    /// SQLSTATE and the server's message.
    pub reason: String,
    /// What to check.
    pub fix: &'static str,
}

impl std::fmt::Display for LoginRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot log in to the database {}: {} — this is a configuration error ({}), not a network problem",
            self.target, self.reason, self.fix
        )
    }
}

impl std::error::Error for LoginRefused {}

impl LoginRefused {
    /// The refused login in a connection error, if that is what it is.
    pub fn find(target: &DbTarget, err: &anyhow::Error) -> Option<LoginRefused> {
        let pg = err
            .chain()
            .find_map(|c| c.downcast_ref::<tokio_postgres::Error>())?;
        if !is_login_error(pg) {
            return None;
        }
        let code = pg.code().map(|c| c.code().to_string());
        let hba = pg
            .as_db_error()
            .is_some_and(|db| db.message().contains("pg_hba.conf"));
        let fix = match code.as_deref() {
            Some("42501") => "grant the role CONNECT on the database",
            Some(_) if hba => {
                "the server's pg_hba.conf does not admit this host, role, database or sslmode"
            }
            None => {
                "no password is configured: set password_file, the URL's password or PGPASSWORD"
            }
            _ => "password, role or database name",
        };
        Some(LoginRefused {
            target: target.display.clone(),
            reason: describe(pg),
            fix,
        })
    }
}

/// Whether a connect-time error means "this login can never succeed as configured": class 28
/// (invalid authorization specification, invalid password), 3D000 (no such database), 42501
/// (no CONNECT privilege), or no password configured when the server asks for one.
pub fn is_login_error(err: &tokio_postgres::Error) -> bool {
    match err.code() {
        Some(code) => is_login_sqlstate(code.code()),
        // tokio-postgres's own error when the server asks for a password and none is set.
        None => err.to_string().contains("password missing"),
    }
}

/// The SQLSTATEs of [`is_login_error`].
pub fn is_login_sqlstate(code: &str) -> bool {
    code.starts_with("28") || code == "3D000" || code == "42501"
}

/// One line: SQLSTATE, message and detail of a database error, or the chain of causes.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} {}", db.code().code(), db.message());
            if let Some(d) = db.detail() {
                s.push_str(&format!(" ({d})"));
            }
            s
        }
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(cause) = src {
                s.push_str(&format!(": {cause}"));
                src = cause.source();
            }
            s
        }
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
/// A refused login is a usage error (exit 2): retrying cannot fix it.
pub async fn connect(target: &DbTarget) -> anyhow::Result<Client> {
    match crate::db::tls::connect(target).await {
        Ok(client) => Ok(client),
        Err(e) => match LoginRefused::find(target, &e) {
            Some(refused) => Err(crate::exit::usage(refused.to_string())),
            None => Err(e.context(format!("cannot connect to {}", target.display))),
        },
    }
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

    #[test]
    fn application_name_unless_the_url_sets_it() {
        let t = DbTarget::parse("postgres://u@h/db", None, None).expect("parses");
        assert_eq!(t.config.get_application_name(), Some("pipewatch"));
        let t = t.with_application_name("pipewatch/worker-07");
        assert_eq!(t.config.get_application_name(), Some("pipewatch/worker-07"));
        let long = format!("pipewatch/{}é", "h".repeat(52));
        let t = t.with_application_name(&long);
        assert_eq!(t.config.get_application_name().map(str::len), Some(62));
        let t = DbTarget::parse("postgres://u@h/db?application_name=mine", None, None)
            .expect("parses")
            .with_application_name("pipewatch/worker-07");
        assert_eq!(t.config.get_application_name(), Some("mine"));
    }

    #[test]
    fn login_sqlstates() {
        for (code, login) in [
            ("28P01", true),
            ("28000", true),
            ("3D000", true),
            ("42501", true),
            ("08006", false),
            ("57P03", false),
            ("53300", false),
            ("42P01", false),
        ] {
            assert_eq!(is_login_sqlstate(code), login, "{code}");
        }
    }

    #[test]
    fn limits_from_the_config_unless_the_url_sets_them() {
        let limits = ConnectionLimits {
            connect_timeout: Duration::from_secs(3),
            query_timeout: Duration::from_secs(4),
            keepalives_idle: Duration::from_secs(5),
            keepalives_interval: Duration::from_secs(6),
            keepalives_count: 7,
            tcp_user_timeout: Duration::from_secs(8),
        };
        let t = DbTarget::parse("postgres://u@h/db", None, None)
            .expect("parses")
            .with_limits(&limits);
        assert_eq!(t.limits, limits);
        assert_eq!(
            t.config.get_connect_timeout(),
            Some(&Duration::from_secs(3))
        );
        assert_eq!(t.config.get_keepalives_idle(), Duration::from_secs(5));
        assert_eq!(t.config.get_keepalives_retries(), Some(7));
        assert_eq!(
            t.config.get_tcp_user_timeout(),
            Some(&Duration::from_secs(8))
        );
        let t = DbTarget::parse(
            "postgres://u@h/db?connect_timeout=20&keepalives_idle=40",
            None,
            None,
        )
        .expect("parses")
        .with_limits(&limits);
        assert_eq!(t.limits.connect_timeout, Duration::from_secs(20));
        assert_eq!(t.limits.keepalives_idle, Duration::from_secs(40));
        assert_eq!(t.limits.keepalives_interval, Duration::from_secs(6));
        // Defaults without a config file.
        let t = DbTarget::parse("host=h dbname=d", None, None).expect("parses");
        assert_eq!(t.limits, ConnectionLimits::default());
        assert!(t.config.get_keepalives());
    }
}
