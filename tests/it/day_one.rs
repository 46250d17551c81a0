//! Day one in production (issue 14): the traps a new operator fell into, each through the
//! real binary — as `nobody` where the trap is about permissions — and named after the
//! symptom it closes.

use crate::support::agent::{append, json_line, wait_until, Env};
use crate::support::{nonroot, pg, pipewatch_cmd, text};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const EXP: &str = "11111111-2222-4333-8444-555555555555";
const UNKNOWN: &str = "99999999-8888-4777-8666-555555555555";

static N: AtomicUsize = AtomicUsize::new(0);

fn run(db: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["--database-url", db];
    all.extend_from_slice(args);
    let out = pipewatch_cmd(&all).output().unwrap();
    let (o, e) = text(&out);
    (out.status.code(), o, e)
}

/// A migrated database with experiment `exp-a`: logs (one error with a traceback) and a
/// progress tree.
fn seeded() -> Env {
    let env = Env::new();
    env.sql(&format!(
        "INSERT INTO experiments (id, name) VALUES ('{EXP}', 'exp-a');
         INSERT INTO pipeline_logs (ts, level, message, experiment_id, node_id, traceback)
         VALUES (now() - interval '1 minute', 'INFO', 'hello', '{EXP}', 'n1', NULL),
                (now(), 'ERROR', 'disk full', '{EXP}', 'n1', 'Traceback\n  OSError: disk full');
         INSERT INTO pipeline_progress (experiment_id, node_id, parent_node_id, level, name, status, progress_percent)
         VALUES ('{EXP}', 'root', NULL, 'pipeline', 'Root', 'running', 0),
                ('{EXP}', 'a', 'root', 'phase', 'Phase A', 'running', 50);"
    ));
    env
}

/// Runs `pipewatch ARGS` on a pseudo-terminal (`script`), returning what the terminal
/// showed, or `None` when `script` is not available.
fn on_a_terminal(args: &[&str], envs: &[(&str, &str)]) -> Option<String> {
    let mut line = crate::support::bin().display().to_string();
    for a in args {
        line.push_str(&format!(" '{a}'"));
    }
    let mut cmd = Command::new("script");
    cmd.args(["-qec", &line, "/dev/null"])
        .stdin(Stdio::null())
        .env_remove("NO_COLOR")
        .env_remove("PIPEWATCH_DATABASE_URL")
        .env_remove("PIPEWATCH_CONFIG");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().ok()?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{line}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Some(String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n"))
}

// ---------------------------------------------------------------- 1. unreadable log files

/// Symptom: a log directory or file the pipewatch user may not read made `check-config` say
/// "matches no file yet" or "[ok] matches 1 file(s)", and exit 0.
#[test]
fn check_config_as_a_non_root_user_names_each_unreadable_file_and_directory() {
    if !nonroot::available() {
        return;
    }
    let env = Env::new();
    let dir = nonroot::open_dir();
    let logs = dir.path().join("logs");
    let locked = dir.path().join("locked");
    for d in [&logs, &locked] {
        std::fs::create_dir(d).unwrap();
    }
    append(&logs.join("a.jsonl"), &[json_line(0)]);
    append(&logs.join("b.jsonl"), &[json_line(1)]);
    append(&locked.join("c.jsonl"), &[json_line(2)]);
    nonroot::chmod(&logs, 0o755);
    nonroot::chmod(&logs.join("a.jsonl"), 0o644);
    nonroot::chmod(&logs.join("b.jsonl"), 0o640);
    nonroot::chmod(&locked, 0o700);
    let cfg = dir.path().join("pipewatch.toml");
    let (l, k) = (logs.display(), locked.display());
    std::fs::write(
        &cfg,
        format!(
            "[database]\nurl = \"{}\"\n[daemons.app]\nlogs = [\"{l}/*.jsonl\", \"{k}/*.jsonl\"]\n",
            env.db
        ),
    )
    .unwrap();
    nonroot::chmod(&cfg, 0o644);
    let out = nonroot::cmd(&["--config", cfg.to_str().unwrap(), "check-config"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    for want in [
        format!(
            "  [fail] daemons.app: logs \"{l}/*.jsonl\": cannot open {l}/b.jsonl: Permission denied (os error 13) (owner root:root, mode 0640); as user nobody: add nobody to group root (`usermod -aG root nobody`, or `SupplementaryGroups=root` in the unit), or grant an ACL: `setfacl -m u:nobody:r {l}/b.jsonl`"
        ),
        format!("  [ok]   daemons.app: logs \"{l}/*.jsonl\": 1 other file(s) readable"),
        format!(
            "  [fail] daemons.app: logs \"{k}/*.jsonl\": cannot list directory {k}: Permission denied (os error 13) (owner root:root, mode 0700); as user nobody: add nobody to group root (`usermod -aG root nobody`, or `SupplementaryGroups=root` in the unit), or grant an ACL: `setfacl -m u:nobody:rX {k}`; for files created later: `setfacl -d -m u:nobody:r {k}`"
        ),
    ] {
        assert!(lines.contains(&want.as_str()), "missing {want:?} in:\n{stdout}");
    }
    assert!(!stdout.contains("matches no file yet"), "{stdout}");
    // The same config as root: everything is readable.
    let out = pipewatch_cmd(&["--config", cfg.to_str().unwrap(), "check-config"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!(
            "  [ok]   daemons.app: logs \"{l}/*.jsonl\" matches 2 file(s), all readable by root\n"
        )),
        "{stdout}"
    );
}

// ---------------------------------------------------------------- 2. a usable database

/// Symptom: `check-config` said "[ok] database reachable" for a database without the schema,
/// or with a role that may not write what the agent writes.
#[test]
fn check_config_says_the_database_is_fine_only_when_the_agent_could_use_it() {
    let dir = tempfile::tempdir().unwrap();
    let check = |url: &str| {
        let cfg = dir.path().join("pipewatch.toml");
        std::fs::write(
            &cfg,
            format!(
                "[database]\nurl = \"{url}\"\n[agent]\nhost = \"h\"\n[daemons.app]\nlogs = [\"{}/*.jsonl\"]\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let out = pipewatch_cmd(&["--config", cfg.to_str().unwrap(), "check-config"])
            .output()
            .unwrap();
        let (o, e) = text(&out);
        (out.status.code(), o, e)
    };
    // No schema at all.
    let (code, out, err) = check(&pg::fresh_db());
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("  [ok]   database "), "{out}");
    assert!(
        out.contains("  [fail] schema: not created in this database: run `pipewatch migrate` (as a role that may create tables)\n"),
        "{out}"
    );
    // Migrated, as the owner: usable, and the trial left nothing behind.
    let env = Env::new();
    let (code, out, err) = check(&env.db);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains(&format!(
            "  [ok]   schema: all {} migrations applied\n",
            pipewatch::db::migrate::MIGRATIONS.len()
        )),
        "{out}"
    );
    assert!(
        out.contains("  [ok]   role postgres may do what the agent does (COPY into pipeline_logs, read pipewatch_checkpoints, insert into pipeline_events, insert into pipeline_metrics, upsert pipeline_progress, upsert pipewatch_checkpoints, upsert pipewatch_agents, create daily partitions (pipewatch_ensure_partitions); tried and rolled back)\n"),
        "{out}"
    );
    for t in [
        "pipeline_logs",
        "pipeline_events",
        "pipeline_metrics",
        "pipeline_progress",
        "pipewatch_checkpoints",
        "pipewatch_agents",
    ] {
        assert_eq!(env.count(&format!("SELECT count(*) FROM {t}")), 0, "{t}");
    }
    // A login role without the agent's role: every refusal names the grant.
    let role = format!(
        "pw_day1_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    );
    env.sql(&format!("CREATE ROLE {role} LOGIN"));
    let url = env
        .db
        .replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    let (code, out, err) = check(&url);
    assert_eq!(code, Some(1), "{out}{err}");
    let grant =
        format!("grant the agent's role: `GRANT pipewatch_agent TO {role}` (as an administrator)");
    for (what, object) in [
        ("COPY into pipeline_logs", "table pipeline_logs"),
        ("read pipewatch_checkpoints", "table pipewatch_checkpoints"),
        ("insert into pipeline_events", "table pipeline_events"),
        ("insert into pipeline_metrics", "table pipeline_metrics"),
        ("upsert pipeline_progress", "table pipeline_progress"),
        (
            "upsert pipewatch_checkpoints",
            "table pipewatch_checkpoints",
        ),
        ("upsert pipewatch_agents", "table pipewatch_agents"),
        (
            "create daily partitions (pipewatch_ensure_partitions)",
            "function pipewatch_ensure_partitions",
        ),
    ] {
        let want = format!(
            "  [fail] role {role} cannot {what}: permission denied for {object}; {grant}\n"
        );
        assert!(out.contains(&want), "missing {want:?} in:\n{out}");
    }
    // Granted: usable.
    env.sql(&format!("GRANT pipewatch_agent TO {role}"));
    let (code, out, err) = check(&url);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains(&format!("  [ok]   role {role} may do what the agent does")),
        "{out}"
    );
    // A migration pending (an older schema than this binary).
    env.sql("DELETE FROM pipewatch_schema_migrations WHERE version = '0010'");
    let (code, out, _) = check(&env.db);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "  [fail] schema: 1 of {} migrations pending (0010_exact_retention): run `pipewatch migrate`\n",
            pipewatch::db::migrate::MIGRATIONS.len()
        )),
        "{out}"
    );
}

// ---------------------------------------------------------------- 4. exact retention age

/// Symptom: `cleanup --older-than 36h` deleted a row 30 hours old (ages were rounded down to
/// whole days).
#[test]
fn cleanup_older_than_36h_keeps_a_row_30_hours_old_and_cuts_at_the_exact_age() {
    let env = Env::new();
    // Daily partitions back to 5 days ago, so that whole partitions can be dropped.
    env.sql("SELECT pipewatch_ensure_partitions(now() - interval '5 days', now())");
    let insert = |label: &str, age: &str| {
        env.sql(&format!(
            "INSERT INTO pipeline_logs (ts, level, message) VALUES (now() - interval '{age}', 'INFO', '{label}');
             INSERT INTO pipeline_events (ts, event_type) VALUES (now() - interval '{age}', '{label}');
             INSERT INTO pipeline_metrics (ts, daemon) VALUES (now() - interval '{age}', '{label}');"
        ))
    };
    let t0: String =
        env.sql("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')");
    // Relative to one instant, so that the rows' ages differ exactly as written.
    env.sql(&format!(
        "INSERT INTO pipeline_logs (ts, level, message) SELECT t, 'INFO', l FROM (VALUES
           (TIMESTAMP '{t0}' AT TIME ZONE 'UTC' - interval '36 hours' + interval '1 second', 'younger'),
           (TIMESTAMP '{t0}' AT TIME ZONE 'UTC' - interval '36 hours' - interval '1 second', 'older')) v(t, l);
         INSERT INTO pipeline_events (ts, event_type) SELECT t, l FROM (VALUES
           (TIMESTAMP '{t0}' AT TIME ZONE 'UTC' - interval '36 hours' + interval '1 second', 'younger'),
           (TIMESTAMP '{t0}' AT TIME ZONE 'UTC' - interval '36 hours' - interval '1 second', 'older')) v(t, l);
         INSERT INTO pipeline_metrics (ts, daemon) SELECT t, l FROM (VALUES
           (TIMESTAMP '{t0}' AT TIME ZONE 'UTC' - interval '36 hours' + interval '1 second', 'younger'),
           (TIMESTAMP '{t0}' AT TIME ZONE 'UTC' - interval '36 hours' - interval '1 second', 'older')) v(t, l);"
    ));
    insert("thirty-hours", "30 hours");
    insert("four-days", "4 days");
    let old_partition =
        env.sql("SELECT to_char((now() - interval '4 days') AT TIME ZONE 'UTC', 'YYYYMMDD')");
    let (code, out, err) = run(&env.db, &["cleanup", "--older-than", "36h"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with("deleted ")
            && out.contains(" log, event and metric rows older than 1day 12h (before "),
        "{out}"
    );
    // The cut-off the command used: now() - 36 h on the server, a moment after t0.
    let cutoff = out
        .split("(before ")
        .nth(1)
        .and_then(|s| s.strip_suffix(" UTC)\n"))
        .unwrap_or_else(|| panic!("no cut-off in {out:?}"));
    let after_t0 = env.sql(&format!(
        "SELECT extract(epoch FROM TIMESTAMP '{cutoff}' - (TIMESTAMP '{t0}' - interval '36 hours'))"
    ));
    let after_t0: f64 = after_t0.parse().unwrap();
    assert!(
        (0.0..30.0).contains(&after_t0),
        "cut-off {cutoff} is not 36 h before the command ran (t0 {t0})"
    );
    // The row 1 s younger than the cut-off stays — unless the command itself took over a
    // second to reach the database, when it was (correctly) older than 36 h by then.
    let younger_kept = after_t0 <= 1.0;
    let label = |t: &str, col: &str| -> Vec<String> {
        let s = env.sql(&format!("SELECT {col} FROM {t} ORDER BY ts"));
        s.lines().map(str::to_string).collect()
    };
    let want: Vec<String> = if younger_kept {
        vec!["younger".into(), "thirty-hours".into()]
    } else {
        vec!["thirty-hours".into()]
    };
    for (t, col) in [
        ("pipeline_logs", "message"),
        ("pipeline_events", "event_type"),
        ("pipeline_metrics", "daemon"),
    ] {
        assert_eq!(
            label(t, col),
            want,
            "{t} after cleanup --older-than 36h:\n{out}"
        );
        assert_eq!(
            env.sql(&format!(
                "SELECT to_regclass('{t}_p{old_partition}') IS NULL"
            )),
            "t",
            "{t}: the partition of 4 days ago lies wholly before the cut-off and is dropped"
        );
    }
    let deleted = if younger_kept { 6 } else { 9 };
    assert!(out.starts_with(&format!("deleted {deleted} ")), "{out}");
}

/// `cleanup` refuses an age under a day (a typo such as `30m` for `30d`).
#[test]
fn cleanup_refuses_an_age_under_a_day() {
    let (code, _, err) = run(
        "postgres://nowhere.invalid/x",
        &["cleanup", "--older-than", "23h"],
    );
    assert_eq!(code, Some(2));
    assert_eq!(
        err,
        "pipewatch: --older-than 23h is shorter than a day; retention keeps at least 1d\n"
    );
}

// ---------------------------------------------------------------- 5. SIGTERM, stderr closed

/// Symptom: `pipewatch run 2>&1 | head -c1`, then `kill -TERM`: the agent kept shipping until
/// SIGKILL (logging panicked the task that listens for signals).
#[test]
fn sigterm_stops_the_agent_when_stderr_is_a_closed_pipe() {
    let env = Env::new();
    append(
        &env.path("a.jsonl"),
        &(0..100).map(json_line).collect::<Vec<_>>(),
    );
    let cfg = env.config("[daemons.app]\nlogs = [\"$DIR/*.jsonl\"]\n");
    let mut child = pipewatch_cmd(&["--config", cfg.to_str().unwrap(), "run"])
        .env("PIPEWATCH_LOG", "pipewatch=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away at once, like `head -c1` after one byte.
    drop(child.stderr.take());
    assert!(wait_until(Duration::from_secs(20), || env
        .count("SELECT count(*) FROM pipeline_logs")
        == 100));
    // SAFETY: our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "the agent must stop within 5 s of SIGTERM and exit 0"
    );
}

/// The same with a reader that stays but never reads: a full stderr pipe must not hold up
/// the agent or its shutdown (log lines are dropped instead).
#[test]
fn sigterm_stops_the_agent_when_stderr_is_a_full_pipe_nobody_reads() {
    use std::os::fd::AsRawFd;
    let env = Env::new();
    // Many files: each is logged when it is opened, which fills a one-page pipe.
    for f in 0..80 {
        append(&env.path(&format!("f{f:02}.jsonl")), &[json_line(f)]);
    }
    let cfg = env.config("[daemons.app]\nlogs = [\"$DIR/*.jsonl\"]\n");
    let mut child = pipewatch_cmd(&["--config", cfg.to_str().unwrap(), "run"])
        .env("PIPEWATCH_LOG", "pipewatch=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    // SAFETY: fcntl on our own open pipe; shrinking it to one page only makes it fill sooner.
    unsafe { libc::fcntl(stderr.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    let shipped = wait_until(Duration::from_secs(20), || {
        env.count("SELECT count(*) FROM pipeline_logs") == 80
    });
    // SAFETY: our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(stderr);
    assert!(shipped, "the agent ships although nobody reads its log");
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "the agent must stop within 5 s of SIGTERM and exit 0"
    );
}

// ---------------------------------------------------------------- 6. closed stdout

/// Symptom: `status | head -1` (and cleanup, check-config, migrate --check-only) panicked
/// with "failed printing to stdout: Broken pipe" (exit 101); `logs | head -1` printed an error.
#[test]
fn every_command_ends_quietly_with_exit_0_when_stdout_is_closed() {
    let env = seeded();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("pipewatch.toml");
    std::fs::write(
        &cfg,
        format!(
            "[database]\nurl = \"{}\"\n[daemons.app]\nlogs = [\"{}/*.jsonl\"]\n",
            env.db,
            dir.path().display()
        ),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    let db = env.db.as_str();
    for args in [
        vec!["--database-url", db, "status"],
        vec![
            "--database-url",
            db,
            "cleanup",
            "--older-than",
            "30d",
            "--dry-run",
        ],
        vec!["--database-url", db, "cleanup", "--older-than", "30d"],
        vec!["--config", cfg, "check-config"],
        vec!["--database-url", db, "migrate", "--check-only"],
        vec!["--database-url", db, "migrate"],
        vec!["--database-url", db, "verify"],
        vec!["--database-url", db, "logs", "-e", "exp-a"],
        vec!["--database-url", db, "logs", "-e", "exp-a", "--json"],
        vec!["--database-url", db, "errors"],
        vec!["--database-url", db, "errors", "-e", "exp-a"],
        vec!["--database-url", db, "progress", "-e", "exp-a"],
        vec!["--database-url", db, "experiments", "list"],
        vec!["migrate", "--show-queries"],
        vec!["manpage"],
        vec!["--help"],
    ] {
        let mut child = pipewatch_cmd(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader is gone before the first byte is written.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).into_owned()
            ),
            (Some(0), String::new()),
            "{args:?}"
        );
    }
}

// ---------------------------------------------------------------- 7. colour

/// Symptom: ANSI colour codes in stderr written to a file or a pipe; `NO_COLOR` ignored by
/// `logs`.
#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    let env = seeded();
    append(&env.path("a.jsonl"), &[json_line(0)]);
    let cfg = env.config("[daemons.app]\nlogs = [\"$DIR/*.jsonl\"]\n");
    // The agent's own log to a pipe.
    let out = pipewatch_cmd(&["--config", cfg.to_str().unwrap(), "run", "--once"])
        .env("PIPEWATCH_LOG", "pipewatch=info")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(!out.stderr.is_empty(), "the agent logs something");
    assert!(
        !out.stderr.contains(&0x1b),
        "ESC in stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The operator commands to a pipe.
    for args in [
        vec!["status"],
        vec!["errors"],
        vec!["progress", "-e", "exp-a"],
        vec!["logs", "-e", "exp-a"],
    ] {
        let mut all = vec!["--database-url", env.db.as_str()];
        all.extend(args.iter().copied());
        let out = pipewatch_cmd(&all).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(
            !out.stdout.contains(&0x1b) && !out.stderr.contains(&0x1b),
            "{args:?}"
        );
    }
    // On a terminal: colour, unless NO_COLOR is set.
    let args = ["--database-url", env.db.as_str(), "logs", "-e", "exp-a"];
    let Some(coloured) = on_a_terminal(&args, &[]) else {
        eprintln!("skipped the terminal part: `script` is not available");
        return;
    };
    assert!(coloured.contains('\x1b'), "{coloured:?}");
    assert!(coloured.contains("disk full"), "{coloured:?}");
    for args in [
        vec!["--database-url", env.db.as_str(), "logs", "-e", "exp-a"],
        vec!["--database-url", env.db.as_str(), "status"],
        vec!["--database-url", env.db.as_str(), "errors"],
        vec!["--database-url", env.db.as_str(), "progress", "-e", "exp-a"],
    ] {
        let plain = on_a_terminal(&args, &[("NO_COLOR", "1")]).unwrap();
        assert!(!plain.contains('\x1b'), "{args:?}: {plain:?}");
    }
}

// ---------------------------------------------------------------- 8. --interval

/// Symptom: `progress --watch --interval 0` spun (80 MB of output); `--interval 5` was
/// refused although the help said seconds.
#[test]
fn progress_interval_takes_seconds_refuses_too_short_and_documents_the_minimum() {
    for bad in ["0", "0.1", "100ms", "0s"] {
        let out = pipewatch_cmd(&["progress", "-e", "x", "--watch", "--interval", bad])
            .output()
            .unwrap();
        let (_, err) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert!(
            err.contains(&format!(
                "invalid value '{bad}' for '--interval <INTERVAL>': \"{bad}\" is too short: the interval must be at least 200ms"
            )),
            "{bad}: {err}"
        );
    }
    let out = pipewatch_cmd(&["progress", "-e", "x", "--interval", "soon"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out)
            .1
            .contains("write seconds (5) or a duration (500ms, 2s)"),
        "{}",
        text(&out).1
    );
    let help = text(&pipewatch_cmd(&["progress", "--help"]).output().unwrap()).0;
    assert!(
        help.contains("seconds (5, 0.5) or a duration (500ms, 2s, 1m); at least 200ms"),
        "{help}"
    );
    // A bare number is seconds: the watch draws, waits, and stops cleanly on SIGTERM.
    let env = seeded();
    for interval in ["5", "500ms"] {
        let mut child = pipewatch_cmd(&[
            "--database-url",
            &env.db,
            "progress",
            "-e",
            "exp-a",
            "--watch",
            "--interval",
            interval,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        let first = BufReader::new(child.stdout.take().unwrap())
            .lines()
            .next()
            .and_then(Result::ok)
            .unwrap_or_default();
        assert!(first.starts_with("Root (root)"), "{interval}: {first:?}");
        // SAFETY: our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{interval}: {}", text(&out).1);
    }
}

// ---------------------------------------------------------------- 9. unreadable default config

/// Runs `pipewatch ARGS` as `nobody` in a private mount namespace whose
/// /etc/pipewatch/pipewatch.toml is the packaged `0640 root` file; `None` when mount
/// namespaces are not available here.
fn with_unreadable_default_config(args: &[&str]) -> Option<(Option<i32>, String, String)> {
    let tmp = tempfile::tempdir().unwrap();
    let (upper, work) = (tmp.path().join("upper"), tmp.path().join("work"));
    std::fs::create_dir(&upper).unwrap();
    std::fs::create_dir(&work).unwrap();
    let script = format!(
        "mount -t overlay overlay -o lowerdir=/etc,upperdir={},workdir={} /etc || exit 97
         mkdir -p /etc/pipewatch
         printf '[database]\\nurl = \"postgres://pipewatch@db.invalid/geo\"\\n' > /etc/pipewatch/pipewatch.toml
         chmod 0640 /etc/pipewatch/pipewatch.toml
         exec runuser -u nobody -- {} \"$@\"",
        upper.display(),
        work.display(),
        nonroot::bin().display()
    );
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script, "sh"])
        .args(args)
        .env_remove("PIPEWATCH_DATABASE_URL")
        .env_remove("PIPEWATCH_CONFIG")
        .output()
        .ok()?;
    if out.status.code() == Some(97)
        || (!out.status.success() && out.stderr.starts_with(b"unshare"))
    {
        eprintln!(
            "skipped: no private mount namespace here: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let (o, e) = text(&out);
    Some((out.status.code(), o, e))
}

/// Symptom: a user outside the `pipewatch` group could not run `pipewatch --database-url URL
/// status`: the unreadable default config was an error although only a URL was needed.
#[test]
fn a_user_who_may_not_read_the_default_config_can_query_with_a_url() {
    if !nonroot::available() {
        return;
    }
    let env = seeded();
    let Some((code, out, err)) =
        with_unreadable_default_config(&["--database-url", &env.db, "status"])
    else {
        return;
    };
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(
        err,
        "pipewatch: note: skipping the default config /etc/pipewatch/pipewatch.toml (Permission denied (os error 13)); this command needs only the database URL given\n"
    );
    assert!(out.starts_with("agents\n"), "{out}");
    // Without a URL the config is needed: its error is the answer.
    let (code, _, err) = with_unreadable_default_config(&["status"]).unwrap();
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(
        err,
        "pipewatch: /etc/pipewatch/pipewatch.toml: cannot read config file: Permission denied (os error 13)\n"
    );
    // `run` always needs it.
    let (code, _, err) =
        with_unreadable_default_config(&["--database-url", &env.db, "run", "--once"]).unwrap();
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("cannot read config file: Permission denied"),
        "{err}"
    );
}

// ---------------------------------------------------------------- 10. consistency

/// Symptom: an unknown experiment UUID printed nothing and exited 0 where an unknown name
/// exited 1; `errors -e NAME` showed the UUID where `errors` showed the name.
#[test]
fn an_unknown_experiment_id_fails_like_an_unknown_name_and_errors_show_the_name() {
    let env = seeded();
    let some = format!("some that exist: exp-a ({EXP})");
    for cmd in ["logs", "progress", "errors"] {
        let (code, out, err) = run(&env.db, &[cmd, "-e", UNKNOWN]);
        assert_eq!((code, out.as_str()), (Some(1), ""), "{cmd}: {err}");
        assert_eq!(
            err,
            format!("pipewatch: no experiment with id {UNKNOWN} (no experiments row and no records); {some}\n"),
            "{cmd}"
        );
        let (code, _, err) = run(&env.db, &[cmd, "-e", "nope"]);
        assert_eq!(code, Some(1), "{cmd}: {err}");
        assert_eq!(
            err,
            format!("pipewatch: no experiment named \"nope\"; {some}\n"),
            "{cmd}"
        );
    }
    // An id that only records carry (no experiments row) is known.
    let orphan = "77777777-8888-4777-8666-555555555555";
    env.sql(&format!(
        "INSERT INTO pipeline_logs (ts, level, message, experiment_id) VALUES (now(), 'ERROR', 'orphan', '{orphan}')"
    ));
    let (code, out, err) = run(&env.db, &["logs", "-e", orphan]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("\"message\":\"orphan\""), "{out}");
    let (_, out, _) = run(&env.db, &["errors", "-e", orphan]);
    assert!(out.contains(&format!("experiment {orphan}")), "{out}");
    // The name, as plain `errors` shows it.
    let (code, out, _) = run(&env.db, &["errors", "-e", EXP]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("experiment exp-a\n") && !out.contains(EXP),
        "{out}"
    );
    let (code, out, _) = run(&env.db, &["progress", "-e", orphan]);
    assert_eq!(
        (code, out),
        (
            Some(0),
            format!("no progress recorded for experiment {orphan}\n")
        )
    );
    env.sql(&format!(
        "INSERT INTO experiments (id, name) VALUES ('{orphan}', 'exp-b')"
    ));
    let (_, out, _) = run(&env.db, &["progress", "-e", orphan]);
    assert_eq!(out, "no progress recorded for experiment exp-b\n");
    let (_, plain, _) = run(&env.db, &["errors"]);
    assert!(
        plain.contains("disk full") && plain.contains("experiment exp-a\n"),
        "{plain}"
    );
}

/// Symptom: an empty `logs` printed nothing on a terminal.
#[test]
fn empty_logs_say_no_records_on_a_terminal_and_nothing_as_json() {
    let env = seeded();
    let (code, out, err) = run(&env.db, &["logs", "-e", "exp-a", "--level", "CRITICAL"]);
    assert_eq!((code, out.as_str(), err.as_str()), (Some(0), "", ""));
    let args = [
        "--database-url",
        env.db.as_str(),
        "logs",
        "-e",
        "exp-a",
        "--level",
        "CRITICAL",
    ];
    let Some(shown) = on_a_terminal(&args, &[]) else {
        return;
    };
    assert_eq!(shown, "no records\n");
}

// ---------------------------------------------------------------- 11. docs and experiments

/// `experiments add` creates the row that names an experiment; duplicates are refused.
#[test]
fn experiments_add_prints_the_id_and_refuses_a_duplicate_name_or_id() {
    let env = Env::new();
    let (code, out, err) = run(&env.db, &["experiments", "add", "survey-2026"]);
    assert_eq!(code, Some(0), "{err}");
    let id = out.trim().to_string();
    assert!(
        uuid::Uuid::parse_str(&id).is_ok() && out == format!("{id}\n"),
        "{out}"
    );
    let (code, out, err) = run(&env.db, &["experiments", "add", "survey-2026"]);
    assert_eq!((code, out.as_str()), (Some(1), ""));
    assert_eq!(
        err,
        format!("pipewatch: an experiment named \"survey-2026\" exists already (id {id})\n")
    );
    let (code, _, err) = run(&env.db, &["experiments", "add", "other", "--id", &id]);
    assert_eq!(code, Some(1));
    assert_eq!(
        err,
        format!("pipewatch: an experiment with id {id} exists already (named \"survey-2026\")\n")
    );
    let (code, out, err) = run(&env.db, &["experiments", "add", "given", "--id", EXP]);
    assert_eq!((code, out.clone()), (Some(0), format!("{EXP}\n")), "{err}");
    let (code, _, err) = run(&env.db, &["experiments", "add", "bad", "--id", "nope"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.starts_with("pipewatch: --id \"nope\" is not a UUID"),
        "{err}"
    );
    let (code, out, _) = run(&env.db, &["experiments", "list"]);
    assert_eq!(code, Some(0));
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    let mut want = vec![format!("{EXP}  given"), format!("{id}  survey-2026")];
    want.sort();
    assert_eq!(lines, want);
    // The new experiment is usable by name at once.
    let (code, out, _) = run(&env.db, &["logs", "-e", "given", "--json"]);
    assert_eq!((code, out.as_str()), (Some(0), ""));
}

/// Every key the parser accepts, table by table, found by asking the parser itself (an
/// unknown key's error lists the valid ones).
fn accepted_keys() -> Vec<(&'static str, String)> {
    let probe = |text: &str| -> Vec<String> {
        let err = pipewatch::config::resolve::parse(Path::new("probe.toml"), text)
            .err()
            .unwrap_or_else(|| panic!("the probe key was accepted in:\n{text}"));
        let reason = &err.0[0].reason;
        let list = reason
            .split("valid keys here: ")
            .nth(1)
            .unwrap_or_else(|| panic!("no key list in {reason:?}"));
        list.split(", ").map(|k| k.trim().to_string()).collect()
    };
    let daemon = "[daemons.d]\nlogs = [\"/x/*.log\"]\n";
    let rule = format!("{daemon}[[daemons.d.rules]]\nmatch = 'x'\n");
    let mut keys = Vec::new();
    for (table, text) in [
        ("", "zz_probe = 1\n".to_string()),
        ("database", "[database]\nzz_probe = 1\n".to_string()),
        ("agent", "[agent]\nzz_probe = 1\n".to_string()),
        ("batch", "[batch]\nzz_probe = 1\n".to_string()),
        ("retention", "[retention]\nzz_probe = 1\n".to_string()),
        ("daemons.NAME", format!("{daemon}zz_probe = 1\n")),
        ("rules", format!("{rule}zz_probe = 1\n")),
        (
            "progress",
            format!("{rule}progress = {{ node_id = \"n\", zz_probe = 1 }}\n"),
        ),
        (
            "event",
            format!("{rule}event = {{ event_type = \"e\", zz_probe = 1 }}\n"),
        ),
    ] {
        for k in probe(&text) {
            keys.push((table, k));
        }
    }
    keys
}

/// Symptom: the example config claimed to list every key but missed some.
#[test]
fn the_example_config_shows_every_key_the_parser_accepts() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/pipewatch.example.toml");
    let example = std::fs::read_to_string(&path).unwrap();
    // The example's lines by table ("rules" gathers every [[daemons.*.rules]] element; the
    // inline progress/event keys are looked for in the rule sections).
    let mut section = String::new();
    let mut by_table: std::collections::HashMap<String, String> = Default::default();
    for line in example.lines() {
        let t = line.trim_start_matches('#').trim();
        if t.starts_with('[') && t.ends_with(']') {
            let name = t.trim_matches(|c| c == '[' || c == ']');
            section = if name.ends_with(".rules") {
                "rules".into()
            } else if name.starts_with("daemons.") {
                "daemons.NAME".into()
            } else {
                name.into()
            };
            continue;
        }
        let entry = by_table.entry(section.clone()).or_default();
        entry.push_str(t);
        entry.push('\n');
    }
    let shows = |table: &str, key: &str| -> bool {
        let text = by_table.get(table).map(String::as_str).unwrap_or("");
        let re = regex::Regex::new(&format!(r"(^|[\s{{,]){}\s*=", regex::escape(key))).unwrap();
        text.lines().any(|l| re.is_match(l))
    };
    // A key whose value is a table shows as a header: `[database]`, `[[daemons.x.rules]]`.
    let header = |table: &str, key: &str| -> bool {
        example.lines().any(|l| {
            let t = l.trim_start_matches('#').trim();
            t.starts_with('[')
                && if table.is_empty() {
                    t.starts_with(&format!("[{key}]")) || t.starts_with(&format!("[{key}."))
                } else {
                    t.ends_with(&format!(".{key}]]")) || t.ends_with(&format!(".{key}]"))
                }
        })
    };
    let mut missing = Vec::new();
    for (table, key) in accepted_keys() {
        let home = match table {
            "progress" | "event" => "rules",
            t => t,
        };
        if !shows(home, &key) && !header(table, &key) {
            missing.push(if table.is_empty() {
                format!("`{key}` (top level)")
            } else {
                format!("`{key}` in [{table}]")
            });
        }
    }
    assert!(
        missing.is_empty(),
        "config/pipewatch.example.toml does not show {}, which the parser accepts: add each (commented out, with its default) to the example",
        missing.join(", ")
    );
}

/// The committed man page is what the command line generates today.
#[test]
fn the_committed_man_page_is_generated_from_the_current_command_line() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/pipewatch.1");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    let fresh = pipewatch::cli::manpage::render().unwrap();
    assert!(
        committed == fresh,
        "packaging/pipewatch.1 is stale: refresh it with `{}`",
        pipewatch::cli::manpage::REFRESH
    );
    for want in [
        "PIPEWATCH CHECK-CONFIG",
        "PIPEWATCH EXPERIMENTS",
        "at least 200ms",
        "NO_COLOR",
    ] {
        assert!(fresh.contains(want), "{want}");
    }
    let toml =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    assert!(
        toml.contains(r#"["packaging/pipewatch.1", "usr/share/man/man1/pipewatch.1", "644"]"#),
        "the .deb ships the man page"
    );
}
