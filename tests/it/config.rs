//! Configuration as users meet it: the example file parses, bad keys and values are named
//! with file, line, key and value, and the database URL precedence holds.

use crate::support::{pipewatch_cmd, text};
use std::path::Path;

fn write(dir: &Path, body: &str) -> std::path::PathBuf {
    let p = dir.join("pipewatch.toml");
    std::fs::write(&p, body).unwrap();
    p
}

fn check_config(cfg: &Path) -> (Option<i32>, String, String) {
    let out = pipewatch_cmd(&["--config", cfg.to_str().unwrap(), "check-config"])
        .output()
        .unwrap();
    let (o, e) = text(&out);
    (out.status.code(), o, e)
}

#[test]
fn the_example_config_parses_with_every_key() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/pipewatch.example.toml");
    let cfg = pipewatch::config::load(&path).expect("the example config is valid");
    assert_eq!(cfg.daemons.len(), 1);
    let d = &cfg.daemons[0];
    assert_eq!(d.name, "clusterer");
    assert_eq!(d.rules.len(), 3);
    assert_eq!(cfg.batch.max_records, 5000);
    assert_eq!(cfg.batch.max_bytes, 4 * 1024 * 1024);
    assert_eq!(cfg.agent.stuck_after, std::time::Duration::from_secs(300));
    assert_eq!(cfg.batch.max_wait, std::time::Duration::from_millis(200));
    assert_eq!(d.max_line_bytes, 1_048_576);
    // Uncommenting every optional key must also parse.
    let text = std::fs::read_to_string(&path).unwrap();
    let uncommented: String = text
        .lines()
        .map(|l| {
            let t = l.trim_start();
            let is_key = t.starts_with("# ")
                && t[2..]
                    .split_once(" = ")
                    .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
            let is_table = t.starts_with("# [");
            if is_key || is_table {
                t[2..].to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), &uncommented);
    let full = pipewatch::config::load(&p).expect("every key uncommented is valid");
    assert!(full.retention.is_some());
    assert!(full.daemons[0].pid_file.is_some());
    assert!(full.daemons[0].text_pattern.is_some());
    assert_eq!(full.agent.host, "worker-07");
}

#[test]
fn unknown_key_names_file_line_key_and_suggests() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "[daemons.app]\nlogs = [\"/tmp/x/*.jsonl\"]\nmax_line_byte = 10\n",
    );
    let (code, _, err) = check_config(&cfg);
    assert_eq!(code, Some(2), "{err}");
    let expected = format!(
        "pipewatch: {}:3: daemons.app.max_line_byte: unknown key `max_line_byte` (did you mean `max_line_bytes`?)",
        cfg.display()
    );
    assert!(
        err.starts_with(&expected),
        "got:\n{err}\nwanted prefix:\n{expected}"
    );
}

#[test]
fn bad_values_are_all_reported_with_their_line_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "[batch]\nmax_wait = \"soon\"\nmax_bytes = 12\n\n[agent]\nstuck_after = \"0s\"\n\n[daemons.app]\nlogs = [\"/tmp/x/*.jsonl\"]\nformat = \"xml\"\nexperiment_id = \"abc\"\ntext_pattern = \"(unclosed\"\n",
    );
    let (code, _, err) = check_config(&cfg);
    assert_eq!(code, Some(2), "{err}");
    let f = cfg.display();
    for want in [
        format!("{f}:2: batch.max_wait = \"soon\": not a duration"),
        format!("{f}:3: batch.max_bytes = 12: must be between 1024 and 1073741824 (1 GiB)"),
        format!("{f}:6: agent.stuck_after = \"0s\": must be greater than zero"),
        format!("{f}:10: daemons.app.format = \"xml\": must be one of auto, json, text"),
        format!("{f}:11: daemons.app.experiment_id = \"abc\": not a UUID"),
        format!("{f}:12: daemons.app.text_pattern = \"(unclosed\": invalid regex"),
    ] {
        assert!(err.contains(&want), "missing {want:?} in:\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn run_without_daemons_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "[database]\nurl = \"postgres://127.0.0.1:1/x\"\n",
    );
    let out = pipewatch_cmd(&["--config", cfg.to_str().unwrap(), "run", "--once"])
        .output()
        .unwrap();
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no daemon configured"), "{err}");
}

#[test]
fn a_missing_explicit_config_file_is_named() {
    let out = pipewatch_cmd(&["--config", "/nonexistent/pw.toml", "check-config"])
        .output()
        .unwrap();
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("/nonexistent/pw.toml: cannot read config file"),
        "{err}"
    );
}

#[test]
fn check_config_redacts_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "[database]\nurl = \"postgres://u:hunter2@127.0.0.1:1/db?sslmode=disable\"\n\n[daemons.app]\nlogs = [\"/tmp/nope/*.jsonl\"]\n",
    );
    let (code, out, err) = check_config(&cfg);
    assert_eq!(code, Some(1), "the database is unreachable: {out}{err}");
    assert!(out.contains("postgres://u:***@127.0.0.1:1/db"), "{out}");
    assert!(
        !out.contains("hunter2") && !err.contains("hunter2"),
        "{out}{err}"
    );
    assert!(out.contains("matches no file yet"), "{out}");
}

#[test]
fn database_url_precedence_flag_over_env_over_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "[database]\nurl = \"postgres://file@127.0.0.1:1/db\"\n\n[daemons.app]\nlogs = [\"/tmp/nope/*.jsonl\"]\n",
    );
    let c = cfg.to_str().unwrap();
    let out = pipewatch_cmd(&["--config", c, "check-config"])
        .env("PIPEWATCH_DATABASE_URL", "postgres://env@127.0.0.1:1/db")
        .output()
        .unwrap();
    assert!(text(&out).0.contains("postgres://env@"), "{:?}", text(&out));
    let out = pipewatch_cmd(&[
        "--config",
        c,
        "--database-url",
        "postgres://flag@127.0.0.1:1/db",
        "check-config",
    ])
    .env("PIPEWATCH_DATABASE_URL", "postgres://env@127.0.0.1:1/db")
    .output()
    .unwrap();
    assert!(
        text(&out).0.contains("postgres://flag@"),
        "{:?}",
        text(&out)
    );
    let out = pipewatch_cmd(&["--config", c, "check-config"])
        .output()
        .unwrap();
    assert!(
        text(&out).0.contains("postgres://file@"),
        "{:?}",
        text(&out)
    );
}

#[test]
fn a_world_readable_config_with_a_password_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "[database]\nurl = \"postgres://u:hunter2@127.0.0.1:1/db\"\n\n[daemons.app]\nlogs = [\"/tmp/nope/*.jsonl\"]\n",
    );
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (_, _, err) = check_config(&cfg);
    assert!(
        err.contains("holds a database password and is readable by every user"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (_, _, err) = check_config(&cfg);
    assert!(!err.contains("readable by every user"), "{err}");
}
