//! Turns a [`RawConfig`] into a validated [`Config`]: regexes compiled, durations parsed,
//! defaults filled. Every problem is collected and reported with file, line, key and value.
//!
//! Pure apart from reading the file itself.

use super::raw::{RawConfig, RawDaemon, RawDatabase, RawRule};
use regex::Regex;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use uuid::Uuid;

/// Default `[batch] max_records`.
pub const DEFAULT_MAX_RECORDS: usize = 5000;
/// Log files held open at once by default (the agent also stays under its descriptor limit).
pub const DEFAULT_MAX_OPEN_FILES: usize = 256;
/// Default `[batch] max_bytes`: about 4 MiB of encoded log rows per transaction.
pub const DEFAULT_MAX_BYTES: usize = 4 * 1024 * 1024;
/// The largest `[batch] max_bytes` (the in-flight budget is twice it, counted in a `u32`).
pub const MAX_MAX_BYTES: usize = 1024 * 1024 * 1024;
/// Default `[agent] stuck_after`.
pub const DEFAULT_STUCK_AFTER: Duration = Duration::from_secs(300);
/// Default `[batch] max_wait`.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_millis(200);
/// Default `max_line_bytes`.
pub const DEFAULT_MAX_LINE_BYTES: usize = 1024 * 1024;
/// Default `metrics_interval`.
pub const DEFAULT_METRICS_INTERVAL: Duration = Duration::from_secs(10);
/// Default `stall_after`.
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(300);
/// Default `busy_stall_after`: this many times `stall_after`.
pub const BUSY_STALL_FACTOR: u32 = 6;
/// Default `stall_cpu_percent`: below this a process counts as idle.
pub const DEFAULT_STALL_CPU_PERCENT: f64 = 2.0;

/// Default `[database] connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `[database] query_timeout`.
pub const DEFAULT_QUERY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `[database] keepalives_idle`.
pub const DEFAULT_KEEPALIVES_IDLE: Duration = Duration::from_secs(30);
/// Default `[database] keepalives_interval`.
pub const DEFAULT_KEEPALIVES_INTERVAL: Duration = Duration::from_secs(10);
/// Default `[database] keepalives_count`.
pub const DEFAULT_KEEPALIVES_COUNT: u32 = 3;
/// Default `[database] tcp_user_timeout`.
pub const DEFAULT_TCP_USER_TIMEOUT: Duration = Duration::from_secs(60);

/// One configuration problem, located as precisely as the file allows.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    /// Dotted key path, e.g. `daemons.clusterer.max_line_bytes`.
    pub key: Option<String>,
    pub value: Option<String>,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        f.write_str(": ")?;
        if let Some(key) = &self.key {
            write!(f, "{key}")?;
            if let Some(value) = &self.value {
                write!(f, " = {value}")?;
            }
            f.write_str(": ")?;
        }
        f.write_str(&self.reason)
    }
}

/// All the problems found in one file; displayed one per line.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// `format = auto | json | text`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Auto,
    Json,
    Text,
}

/// `start_at = beginning | end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    Beginning,
    End,
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// `[database] url`; overridden by `--database-url` and `PIPEWATCH_DATABASE_URL`.
    pub url: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    /// Deadlines and dead-peer detection for every connection.
    pub limits: ConnectionLimits,
}

/// How long the database may take to answer, and how a connection that went silent is
/// noticed. The URL's libpq parameters of the same names win over these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// TCP connect, TLS handshake and login together: a server that accepts but never
    /// answers must not hold a command or the agent forever.
    pub connect_timeout: Duration,
    /// The longest the agent waits for the reply to one round trip; a batch's transaction
    /// gets this plus time for the bytes it sends (see `agent::sink`).
    pub query_timeout: Duration,
    /// TCP keepalive: an idle connection is probed after this long without traffic …
    pub keepalives_idle: Duration,
    /// … then every this long …
    pub keepalives_interval: Duration,
    /// … and declared dead after this many unanswered probes.
    pub keepalives_count: u32,
    /// TCP_USER_TIMEOUT: data sent but not acknowledged for this long drops the connection
    /// (keepalives cannot see that case: they only probe an idle connection).
    pub tcp_user_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> ConnectionLimits {
        ConnectionLimits {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            query_timeout: DEFAULT_QUERY_TIMEOUT,
            keepalives_idle: DEFAULT_KEEPALIVES_IDLE,
            keepalives_interval: DEFAULT_KEEPALIVES_INTERVAL,
            keepalives_count: DEFAULT_KEEPALIVES_COUNT,
            tcp_user_timeout: DEFAULT_TCP_USER_TIMEOUT,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The `host` column of every row this agent writes.
    pub host: String,
    /// Where to serve Prometheus metrics; off when `None`.
    pub metrics_listen: Option<String>,
    /// Log files held open at once, at most, across all daemons.
    pub max_open_files: usize,
    /// No commit for this long while a batch waits: the agent is stuck, tells systemd (and
    /// stops petting its watchdog) and `pipewatch status`.
    pub stuck_after: Duration,
}

#[derive(Debug, Clone)]
pub struct BatchConfig {
    pub max_records: usize,
    /// Approximate bytes of rows per transaction; twice this bounds what is held in flight.
    pub max_bytes: usize,
    pub max_wait: Duration,
}

#[derive(Debug, Clone)]
pub struct RetentionConfig {
    pub older_than: Duration,
}

/// One `[daemons.NAME]` table, validated.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub name: String,
    pub logs: Vec<String>,
    pub format: Format,
    pub text_pattern: Option<Regex>,
    pub path_pattern: Option<Regex>,
    pub experiment_id: Option<Uuid>,
    pub node_id: Option<String>,
    pub start_at: StartAt,
    pub max_line_bytes: usize,
    pub pid_file: Option<PathBuf>,
    pub process_match: Option<Regex>,
    pub metrics_interval: Duration,
    pub disks: Vec<PathBuf>,
    pub stall_after: Duration,
    pub stall_cpu_percent: f64,
    /// No log output for this long while busy (CPU at or above `stall_cpu_percent`) is a
    /// busy-loop stall.
    pub busy_stall_after: Duration,
    /// The stack dumper's words (`{pid}` not replaced yet), run when a stall opens and by
    /// `pipewatch why`; `None`: off.
    pub stack_dump: Option<Vec<String>>,
    pub rules: crate::agent::rules::Rules,
}

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub source: PathBuf,
    pub database: DatabaseConfig,
    pub agent: AgentConfig,
    pub batch: BatchConfig,
    pub retention: Option<RetentionConfig>,
    pub daemons: Vec<DaemonConfig>,
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            line: None,
            key: None,
            value: None,
            reason: format!("cannot read config file: {e}"),
        }])
    })?;
    parse(path, &text)
}

/// Validates config text as if read from `path`.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
    let raw: RawConfig =
        toml::from_str(text).map_err(|e| ConfigErrors(vec![toml_error(path, text, &e)]))?;
    Resolver {
        file: path,
        text,
        errors: Vec::new(),
    }
    .resolve(raw)
}

/// Describes a TOML or serde error with its line, the table it is in and a suggestion.
fn toml_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let line = e.span().map(|s| line_of(text, s.start));
    let section = e
        .span()
        .map(|s| section_at(text, s.start))
        .unwrap_or_default();
    let msg = e.message().trim().to_string();
    let unknown = Regex::new(r"^unknown field `([^`]*)`, expected (?:one of )?(.*)$").ok();
    if let Some(caps) = unknown.as_ref().and_then(|re| re.captures(&msg)) {
        let key = caps.get(1).map_or("", |m| m.as_str());
        let expected: Vec<&str> = caps
            .get(2)
            .map_or("", |m| m.as_str())
            // serde lists three or more as "`a`, `b`, `c`" and two as "`a` or `b`".
            .split(", ")
            .flat_map(|s| s.split(" or "))
            .map(|s| s.trim_matches('`'))
            .collect();
        let mut reason = format!("unknown key `{key}`");
        if let Some(best) = suggest(key, &expected) {
            reason.push_str(&format!(" (did you mean `{best}`?)"));
        }
        reason.push_str(&format!("; valid keys here: {}", expected.join(", ")));
        let full = if section.is_empty() {
            key.to_string()
        } else {
            format!("{section}.{key}")
        };
        return ConfigError {
            file: path.to_path_buf(),
            line,
            key: Some(full),
            value: None,
            reason,
        };
    }
    // Name the key whose value is at fault: the left side of `key = value` on that line.
    let section_key = || (!section.is_empty()).then(|| section.clone());
    let (key, value) = match e.span() {
        Some(span) => {
            let at = span.start.min(text.len());
            let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
            let lhs = &text[line_start..at];
            match lhs.split_once('=') {
                Some((k, _)) if !k.trim().is_empty() => {
                    let k = k.trim();
                    let full = match section_key() {
                        Some(s) => format!("{s}.{k}"),
                        None => k.to_string(),
                    };
                    let value = text.get(span.clone()).map(|v| v.trim().to_string());
                    (Some(full), value)
                }
                _ => (section_key(), None),
            }
        }
        None => (section_key(), None),
    };
    // The message may span lines (TOML syntax errors); keep it on one.
    let reason = msg.lines().map(str::trim).collect::<Vec<_>>().join(" ");
    ConfigError {
        file: path.to_path_buf(),
        line,
        key,
        value,
        reason,
    }
}

pub use crate::suggest::suggest;

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// The `[table]` header in force at `offset`, without brackets; for an `[[array]]` header,
/// the array's name with the 0-based index of the element, e.g. `daemons.x.rules[2]`.
fn section_at(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    for line in before.lines().rev() {
        let t = line.trim();
        if t.starts_with('[') {
            let name = t.trim_matches(|c| c == '[' || c == ']').trim().to_string();
            if t.starts_with("[[") {
                let header = t.replace(' ', "");
                let index = before
                    .lines()
                    .filter(|l| l.trim().replace(' ', "") == header)
                    .count()
                    .saturating_sub(1);
                return format!("{name}[{index}]");
            }
            return name;
        }
    }
    String::new()
}

struct Resolver<'a> {
    file: &'a Path,
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl Resolver<'_> {
    /// Records an error for `section.key`, locating its line in the file.
    fn err(&mut self, section: &str, key: &str, value: Option<String>, reason: impl Into<String>) {
        let line = self.locate(section, key);
        let full = if section.is_empty() {
            key.to_string()
        } else {
            format!("{section}.{key}")
        };
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line,
            key: Some(full),
            value,
            reason: reason.into(),
        });
    }

    /// Finds the line of `key = …` inside `[section]` (first match), or of the header itself.
    fn locate(&self, section: &str, key: &str) -> Option<usize> {
        let mut in_section = section.is_empty();
        let mut header_line = None;
        let leaf = key.split('.').next().unwrap_or(key);
        for (i, line) in self.text.lines().enumerate() {
            let t = line.trim();
            if t.starts_with('[') {
                let name = t.trim_matches(|c| c == '[' || c == ']').trim();
                in_section = name == section;
                if in_section && header_line.is_none() {
                    header_line = Some(i + 1);
                }
                continue;
            }
            if in_section {
                if let Some(rest) = t.strip_prefix(leaf) {
                    if rest.trim_start().starts_with('=') {
                        return Some(i + 1);
                    }
                }
            }
        }
        header_line
    }

    fn duration(
        &mut self,
        section: &str,
        key: &str,
        value: Option<&String>,
        default: Duration,
    ) -> Duration {
        match value {
            None => default,
            Some(s) => match humantime::parse_duration(s) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => {
                    self.err(
                        section,
                        key,
                        Some(format!("{s:?}")),
                        "must be greater than zero",
                    );
                    default
                }
                Err(e) => {
                    self.err(
                        section,
                        key,
                        Some(format!("{s:?}")),
                        format!("not a duration ({e}); write e.g. \"200ms\", \"10s\", \"5m\""),
                    );
                    default
                }
            },
        }
    }

    fn regex(&mut self, section: &str, key: &str, value: Option<&String>) -> Option<Regex> {
        let s = value?;
        match Regex::new(s) {
            Ok(r) => Some(r),
            Err(e) => {
                let detail = e
                    .to_string()
                    .lines()
                    .last()
                    .unwrap_or("")
                    .trim()
                    .to_string();
                self.err(
                    section,
                    key,
                    Some(format!("{s:?}")),
                    format!("invalid regex: {detail}"),
                );
                None
            }
        }
    }

    fn resolve(mut self, raw: RawConfig) -> Result<Config, ConfigErrors> {
        let limits = self.limits(&raw.database);
        let database = DatabaseConfig {
            url: raw.database.url.clone(),
            password_file: raw.database.password_file.as_ref().map(PathBuf::from),
            ca_file: raw.database.ca_file.as_ref().map(PathBuf::from),
            limits,
        };
        let host = match raw.agent.host.as_deref().map(str::trim) {
            Some("") => {
                self.err("agent", "host", Some("\"\"".into()), "must not be empty");
                String::new()
            }
            Some(h) => h.to_string(),
            None => default_hostname(),
        };
        if let Some(listen) = &raw.agent.metrics_listen {
            if listen.parse::<std::net::SocketAddr>().is_err() {
                self.err(
                    "agent",
                    "metrics_listen",
                    Some(format!("{listen:?}")),
                    "not an address:port such as \"127.0.0.1:9187\"",
                );
            }
        }
        let max_open_files = match raw.agent.max_open_files {
            None => DEFAULT_MAX_OPEN_FILES,
            Some(n) if (8..=1_000_000).contains(&n) => n as usize,
            Some(n) => {
                self.err(
                    "agent",
                    "max_open_files",
                    Some(n.to_string()),
                    "must be between 8 and 1000000",
                );
                DEFAULT_MAX_OPEN_FILES
            }
        };
        let stuck_after = self.duration(
            "agent",
            "stuck_after",
            raw.agent.stuck_after.as_ref(),
            DEFAULT_STUCK_AFTER,
        );
        let agent = AgentConfig {
            host,
            metrics_listen: raw.agent.metrics_listen.clone(),
            max_open_files,
            stuck_after,
        };
        let max_records = match raw.batch.max_records {
            None => DEFAULT_MAX_RECORDS,
            Some(n) if (1..=1_000_000).contains(&n) => n as usize,
            Some(n) => {
                self.err(
                    "batch",
                    "max_records",
                    Some(n.to_string()),
                    "must be between 1 and 1000000",
                );
                DEFAULT_MAX_RECORDS
            }
        };
        let max_bytes = match raw.batch.max_bytes {
            None => DEFAULT_MAX_BYTES,
            Some(n) if (1024..=MAX_MAX_BYTES as i64).contains(&n) => n as usize,
            Some(n) => {
                self.err(
                    "batch",
                    "max_bytes",
                    Some(n.to_string()),
                    format!("must be between 1024 and {MAX_MAX_BYTES} (1 GiB)"),
                );
                DEFAULT_MAX_BYTES
            }
        };
        let max_wait = self.duration(
            "batch",
            "max_wait",
            raw.batch.max_wait.as_ref(),
            DEFAULT_MAX_WAIT,
        );
        let batch = BatchConfig {
            max_records,
            max_bytes,
            max_wait,
        };
        let retention = raw.retention.as_ref().and_then(|r| {
            if r.enabled == Some(false) {
                return None;
            }
            let older_than = match &r.older_than {
                Some(_) => self.duration(
                    "retention",
                    "older_than",
                    r.older_than.as_ref(),
                    Duration::ZERO,
                ),
                None => {
                    self.err(
                        "retention",
                        "older_than",
                        None,
                        "is required in [retention], e.g. \"30d\"",
                    );
                    Duration::ZERO
                }
            };
            if !older_than.is_zero() && older_than < Duration::from_secs(86_400) {
                self.err(
                    "retention",
                    "older_than",
                    r.older_than.as_ref().map(|v| format!("{v:?}")),
                    "retention keeps at least \"1d\" (the age is honoured to the second)",
                );
            }
            Some(RetentionConfig { older_than })
        });
        let mut daemons = Vec::new();
        for (name, d) in &raw.daemons {
            if let Some(dc) = self.daemon(name, d) {
                daemons.push(dc);
            }
        }
        if self.errors.is_empty() {
            Ok(Config {
                source: self.file.to_path_buf(),
                database,
                agent,
                batch,
                retention,
                daemons,
            })
        } else {
            Err(ConfigErrors(self.errors))
        }
    }

    /// `[database]` deadlines and keepalives.
    fn limits(&mut self, db: &RawDatabase) -> ConnectionLimits {
        let d = ConnectionLimits::default();
        let s = "database";
        let keepalives_count = match db.keepalives_count {
            None => d.keepalives_count,
            Some(n) if (1..=100).contains(&n) => n as u32,
            Some(n) => {
                self.err(
                    s,
                    "keepalives_count",
                    Some(n.to_string()),
                    "must be between 1 and 100",
                );
                d.keepalives_count
            }
        };
        let limits = ConnectionLimits {
            connect_timeout: self.duration(
                s,
                "connect_timeout",
                db.connect_timeout.as_ref(),
                d.connect_timeout,
            ),
            query_timeout: self.duration(
                s,
                "query_timeout",
                db.query_timeout.as_ref(),
                d.query_timeout,
            ),
            keepalives_idle: self.duration(
                s,
                "keepalives_idle",
                db.keepalives_idle.as_ref(),
                d.keepalives_idle,
            ),
            keepalives_interval: self.duration(
                s,
                "keepalives_interval",
                db.keepalives_interval.as_ref(),
                d.keepalives_interval,
            ),
            keepalives_count,
            tcp_user_timeout: self.duration(
                s,
                "tcp_user_timeout",
                db.tcp_user_timeout.as_ref(),
                d.tcp_user_timeout,
            ),
        };
        // Below a second the agent would give up on a healthy server under ordinary load;
        // TCP options are whole seconds (TCP_USER_TIMEOUT milliseconds) in the kernel.
        for (key, value, raw) in [
            (
                "connect_timeout",
                limits.connect_timeout,
                &db.connect_timeout,
            ),
            ("query_timeout", limits.query_timeout, &db.query_timeout),
            (
                "keepalives_idle",
                limits.keepalives_idle,
                &db.keepalives_idle,
            ),
            (
                "keepalives_interval",
                limits.keepalives_interval,
                &db.keepalives_interval,
            ),
            (
                "tcp_user_timeout",
                limits.tcp_user_timeout,
                &db.tcp_user_timeout,
            ),
        ] {
            if value < Duration::from_secs(1) {
                self.err(
                    s,
                    key,
                    raw.as_ref().map(|v| format!("{v:?}")),
                    "must be at least \"1s\"",
                );
            }
        }
        limits
    }

    fn daemon(&mut self, name: &str, d: &RawDaemon) -> Option<DaemonConfig> {
        let section = format!("daemons.{name}");
        let s = section.as_str();
        if name == "pipewatch" {
            self.err(
                "daemons",
                name,
                None,
                "the daemon name `pipewatch` is reserved for the agent's own metrics",
            );
        }
        if d.logs.is_empty() && d.pid_file.is_none() && d.process_match.is_none() {
            self.err(
                s,
                "logs",
                None,
                "a daemon needs `logs`, `pid_file` or `process_match`",
            );
        }
        for g in &d.logs {
            if let Err(e) = glob::Pattern::new(g) {
                self.err(
                    s,
                    "logs",
                    Some(format!("{g:?}")),
                    format!("invalid glob: {e}"),
                );
            } else if !g.starts_with('/') {
                self.err(
                    s,
                    "logs",
                    Some(format!("{g:?}")),
                    "log globs must be absolute paths",
                );
            }
        }
        let format = match d.format.as_deref() {
            None | Some("auto") => Format::Auto,
            Some("json") => Format::Json,
            Some("text") => Format::Text,
            Some(other) => {
                self.err(
                    s,
                    "format",
                    Some(format!("{other:?}")),
                    "must be one of auto, json, text",
                );
                Format::Auto
            }
        };
        let text_pattern = self.regex(s, "text_pattern", d.text_pattern.as_ref());
        if format == Format::Text && d.text_pattern.is_none() {
            // Without a pattern every line is a message; that is allowed.
        }
        let path_pattern = self.regex(s, "path_pattern", d.path_pattern.as_ref());
        let experiment_id = d
            .experiment_id
            .as_ref()
            .and_then(|v| match Uuid::parse_str(v) {
                Ok(u) => Some(u),
                Err(_) => {
                    self.err(s, "experiment_id", Some(format!("{v:?}")), "not a UUID");
                    None
                }
            });
        let start_at = match d.start_at.as_deref() {
            None | Some("beginning") => StartAt::Beginning,
            Some("end") => StartAt::End,
            Some(other) => {
                self.err(
                    s,
                    "start_at",
                    Some(format!("{other:?}")),
                    "must be `beginning` or `end`",
                );
                StartAt::Beginning
            }
        };
        let max_line_bytes = match d.max_line_bytes {
            None => DEFAULT_MAX_LINE_BYTES,
            Some(n) if (64..=(1 << 30)).contains(&n) => n as usize,
            Some(n) => {
                self.err(
                    s,
                    "max_line_bytes",
                    Some(n.to_string()),
                    "must be between 64 and 1073741824",
                );
                DEFAULT_MAX_LINE_BYTES
            }
        };
        let process_match = self.regex(s, "process_match", d.process_match.as_ref());
        let metrics_interval = self.duration(
            s,
            "metrics_interval",
            d.metrics_interval.as_ref(),
            DEFAULT_METRICS_INTERVAL,
        );
        let stall_after = self.duration(
            s,
            "stall_after",
            d.stall_after.as_ref(),
            DEFAULT_STALL_AFTER,
        );
        let stall_cpu_percent = match d.stall_cpu_percent {
            None => DEFAULT_STALL_CPU_PERCENT,
            Some(v) if (0.0..=100.0).contains(&v) => v,
            Some(v) => {
                self.err(
                    s,
                    "stall_cpu_percent",
                    Some(v.to_string()),
                    "must be between 0 and 100",
                );
                DEFAULT_STALL_CPU_PERCENT
            }
        };
        let busy_stall_after = self.duration(
            s,
            "busy_stall_after",
            d.busy_stall_after.as_ref(),
            stall_after.saturating_mul(BUSY_STALL_FACTOR),
        );
        let stack_dump = match &d.stack_dump {
            None => None,
            Some(v) => match crate::diagnose::stack::parse_stack_dump(v) {
                Ok(words) => Some(words),
                Err(reason) => {
                    self.err(s, "stack_dump", Some(format!("{v:?}")), reason);
                    None
                }
            },
        };
        let rules = self.rules(name, &d.rules);
        Some(DaemonConfig {
            name: name.to_string(),
            logs: d.logs.clone(),
            format,
            text_pattern,
            path_pattern,
            experiment_id,
            node_id: d.node_id.clone(),
            start_at,
            max_line_bytes,
            pid_file: d.pid_file.as_ref().map(PathBuf::from),
            process_match,
            metrics_interval,
            disks: d.disks.iter().map(PathBuf::from).collect(),
            stall_after,
            stall_cpu_percent,
            busy_stall_after,
            stack_dump,
            rules: rules.unwrap_or_default(),
        })
    }

    fn rules(&mut self, daemon: &str, raw: &[RawRule]) -> Option<crate::agent::rules::Rules> {
        match crate::agent::rules::Rules::compile(raw) {
            Ok(r) => Some(r),
            Err(problems) => {
                let section = format!("daemons.{daemon}.rules");
                for p in problems {
                    let line = self.locate_rule(&section, p.index, &p.key);
                    self.errors.push(ConfigError {
                        file: self.file.to_path_buf(),
                        line,
                        key: Some(format!("{section}[{}].{}", p.index, p.key)),
                        value: p.value,
                        reason: p.reason,
                    });
                }
                None
            }
        }
    }

    /// The line of `key` (its first segment) inside the `index`-th `[[section]]` element
    /// (0-based), or of the element's header when the key is not written there.
    fn locate_rule(&self, section: &str, index: usize, key: &str) -> Option<usize> {
        let header = format!("[[{section}]]");
        let lines: Vec<&str> = self.text.lines().collect();
        let start = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.trim().replace(' ', "") == header)
            .nth(index)
            .map(|(i, _)| i)?;
        let leaf = key.split('.').next().unwrap_or(key);
        let key_line = lines
            .iter()
            .enumerate()
            .skip(start + 1)
            .take_while(|(_, l)| !l.trim_start().starts_with('['))
            .find(|(_, l)| {
                l.trim_start()
                    .strip_prefix(leaf)
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            })
            .map(|(i, _)| i);
        Some(key_line.unwrap_or(start) + 1)
    }
}

/// The machine's hostname, or `localhost` when it cannot be read.
pub fn default_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length and gethostname NUL-terminates or
    // truncates within it.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        let s = String::from_utf8_lossy(&buf[..end]).trim().to_string();
        if !s.is_empty() {
            return s;
        }
    }
    "localhost".to_string()
}
