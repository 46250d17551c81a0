//! Shows configuration and connection strings with secrets hidden.
//!
//! Everything printed or logged about a database URL goes through [`redact_url`].

use super::{Config, Format, StartAt};
use std::fmt::Write as _;

/// Hides the password of a libpq URL (`postgres://user:secret@host`) or key=value string
/// (`password=secret`).
pub fn redact_url(url: &str) -> String {
    let trimmed = url.trim();
    if let Some(scheme_end) = trimmed.find("://") {
        let (scheme, rest) = trimmed.split_at(scheme_end + 3);
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let authority = match authority.rfind('@') {
            Some(at) => {
                let (userinfo, hosts) = authority.split_at(at);
                match userinfo.find(':') {
                    Some(colon) => format!("{}:***{}", &userinfo[..colon], hosts),
                    None => authority.to_string(),
                }
            }
            None => authority.to_string(),
        };
        let tail = redact_query_password(tail);
        return format!("{scheme}{authority}{tail}");
    }
    redact_kv(trimmed)
}

fn redact_query_password(tail: &str) -> String {
    let Some(q) = tail.find('?') else {
        return tail.to_string();
    };
    let (path, query) = tail.split_at(q + 1);
    let parts: Vec<String> = query
        .split('&')
        .map(|p| {
            if p.to_ascii_lowercase().starts_with("password=") {
                "password=***".to_string()
            } else {
                p.to_string()
            }
        })
        .collect();
    format!("{path}{}", parts.join("&"))
}

fn redact_kv(s: &str) -> String {
    let re = regex::Regex::new(r#"(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)"#);
    match re {
        Ok(re) => re.replace_all(s, "${1}***").into_owned(),
        Err(_) => "***".to_string(),
    }
}

/// The resolved configuration as `check-config` prints it.
pub fn describe(config: &Config, effective_url: Option<&str>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "config file: {}", config.source.display());
    let _ = writeln!(out, "[database]");
    let _ = writeln!(
        out,
        "  url = {}",
        effective_url.map_or("(not set)".to_string(), redact_url)
    );
    if let Some(p) = &config.database.password_file {
        let _ = writeln!(out, "  password_file = {} (contents hidden)", p.display());
    }
    if let Some(p) = &config.database.ca_file {
        let _ = writeln!(out, "  ca_file = {}", p.display());
    }
    let l = &config.database.limits;
    let secs = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let _ = writeln!(
        out,
        "  connect_timeout = {}, query_timeout = {}",
        secs(l.connect_timeout),
        secs(l.query_timeout)
    );
    let _ = writeln!(
        out,
        "  keepalives_idle = {}, keepalives_interval = {}, keepalives_count = {}, tcp_user_timeout = {}",
        secs(l.keepalives_idle),
        secs(l.keepalives_interval),
        l.keepalives_count,
        secs(l.tcp_user_timeout)
    );
    let _ = writeln!(out, "[agent]");
    let _ = writeln!(out, "  host = {}", config.agent.host);
    if let Some(l) = &config.agent.metrics_listen {
        let _ = writeln!(out, "  metrics_listen = {l}");
    }
    let _ = writeln!(
        out,
        "  stuck_after = {}",
        humantime::format_duration(config.agent.stuck_after)
    );
    let _ = writeln!(out, "[batch]");
    let _ = writeln!(out, "  max_records = {}", config.batch.max_records);
    let _ = writeln!(out, "  max_bytes = {}", config.batch.max_bytes);
    let _ = writeln!(
        out,
        "  max_wait = {}",
        humantime::format_duration(config.batch.max_wait)
    );
    if let Some(r) = &config.retention {
        let _ = writeln!(out, "[retention]");
        let _ = writeln!(
            out,
            "  older_than = {}",
            humantime::format_duration(r.older_than)
        );
    }
    for d in &config.daemons {
        let _ = writeln!(out, "[daemons.{}]", d.name);
        let _ = writeln!(out, "  logs = {:?}", d.logs);
        let fmt = match d.format {
            Format::Auto => "auto",
            Format::Json => "json",
            Format::Text => "text",
        };
        let _ = writeln!(out, "  format = {fmt}");
        if let Some(p) = &d.text_pattern {
            let _ = writeln!(out, "  text_pattern = {:?}", p.as_str());
        }
        if let Some(p) = &d.path_pattern {
            let _ = writeln!(out, "  path_pattern = {:?}", p.as_str());
        }
        if let Some(e) = &d.experiment_id {
            let _ = writeln!(out, "  experiment_id = {e}");
        }
        if let Some(n) = &d.node_id {
            let _ = writeln!(out, "  node_id = {n}");
        }
        let start = match d.start_at {
            StartAt::Beginning => "beginning",
            StartAt::End => "end",
        };
        let _ = writeln!(out, "  start_at = {start}");
        let _ = writeln!(out, "  max_line_bytes = {}", d.max_line_bytes);
        if let Some(p) = &d.pid_file {
            let _ = writeln!(out, "  pid_file = {}", p.display());
        }
        if let Some(p) = &d.process_match {
            let _ = writeln!(out, "  process_match = {:?}", p.as_str());
        }
        let _ = writeln!(
            out,
            "  metrics_interval = {}",
            humantime::format_duration(d.metrics_interval)
        );
        if !d.disks.is_empty() {
            let _ = writeln!(out, "  disks = {:?}", d.disks);
        }
        let _ = writeln!(
            out,
            "  stall_after = {}",
            humantime::format_duration(d.stall_after)
        );
        let _ = writeln!(
            out,
            "  busy_stall_after = {}",
            humantime::format_duration(d.busy_stall_after)
        );
        if let Some(words) = &d.stack_dump {
            let _ = writeln!(out, "  stack_dump = {words:?}");
        }
        let _ = writeln!(out, "  rules = {}", d.rules.len());
        for line in d.rules.describe() {
            let _ = writeln!(out, "    {line}");
        }
    }
    out
}

/// Whether a URL or key=value string carries a password.
pub fn has_password(url: &str) -> bool {
    redact_url(url) != url.trim()
}

/// Warnings about secrets others may read: a config file holding a password, or a password
/// file, readable by every user.
pub fn exposure_warnings(config: &Config) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let world_readable = |p: &std::path::Path| {
        std::fs::metadata(p)
            .map(|m| m.permissions().mode() & 0o004 != 0)
            .unwrap_or(false)
    };
    let mut out = Vec::new();
    if config.database.url.as_deref().is_some_and(has_password) && world_readable(&config.source) {
        out.push(format!(
            "{} holds a database password and is readable by every user: chmod o-r it, or move the password to password_file",
            config.source.display()
        ));
    }
    if let Some(pf) = &config.database.password_file {
        if world_readable(pf) {
            out.push(format!(
                "password_file {} is readable by every user: chmod o-r it",
                pf.display()
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn hides_passwords() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db?sslmode=require"),
            "postgres://u:***@h:5432/db?sslmode=require"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact_url("postgres://u@h/db?password=x&sslmode=disable"),
            "postgres://u@h/db?password=***&sslmode=disable"
        );
        assert_eq!(
            redact_url("host=h user=u password=secret dbname=d"),
            "host=h user=u password=*** dbname=d"
        );
        assert_eq!(
            redact_url("host=h password='a b' dbname=d"),
            "host=h password=*** dbname=d"
        );
    }
}
