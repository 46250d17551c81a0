//! The service as systemd runs it: the unit file verifies cleanly with its hardening, the agent
//! speaks sd_notify (READY, STATUS, WATCHDOG, STOPPING), and SIGHUP reloads the config without
//! losing or repeating a line and refuses an invalid one.

use crate::support::agent::{append, json_line, wait_until, Env};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

#[test]
fn the_unit_file_verifies_and_is_hardened() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("packaging/pipewatch.service")).unwrap();
    for want in [
        "Type=notify",
        "Restart=on-failure",
        "WatchdogSec=",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "User=pipewatch",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=\n",
        "ReadOnlyPaths=/",
        "LimitNOFILE=65536",
        "ExecStartPre=/usr/bin/pipewatch --config /etc/pipewatch/pipewatch.toml check-config\n",
    ] {
        assert!(unit.contains(want), "unit lacks {want:?}");
    }
    let Ok(analyze) = which("systemd-analyze") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("pipewatch.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/bin/pipewatch", env!("CARGO_BIN_EXE_pipewatch")),
    )
    .unwrap();
    let out = std::process::Command::new(analyze)
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}

fn which(cmd: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(cmd))
                .find(|c| c.exists())
        })
        .ok_or(())
}

#[test]
fn the_agent_speaks_sd_notify() {
    let env = Env::new();
    append(&env.path("a.jsonl"), &[json_line(0)]);
    let cfg = env.config("[daemons.app]\nlogs = [\"$DIR/*.jsonl\"]\n");
    let sock_path = env.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let log = env.path("agent.stderr");
    let mut child = crate::support::pipewatch_cmd(&["--config", cfg.to_str().unwrap(), "run"])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline
        && !(got.contains("READY=1") && got.matches("WATCHDOG=1").count() >= 2)
    {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
            got.push('\n');
        }
    }
    // SAFETY: our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && !got.contains("STOPPING=1") {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
            got.push('\n');
        }
    }
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(got.contains("READY=1"), "{got}");
    assert!(got.matches("WATCHDOG=1").count() >= 2, "{got}");
    assert!(got.contains("STATUS=files 1, records shipped"), "{got}");
    assert!(got.contains("STOPPING=1"), "{got}");
}

#[test]
fn sighup_adds_and_changes_daemons_without_loss_and_refuses_a_bad_config() {
    let env = Env::new();
    std::fs::create_dir_all(env.path("a")).unwrap();
    std::fs::create_dir_all(env.path("b")).unwrap();
    append(
        &env.path("a/x.jsonl"),
        &(0..100).map(json_line).collect::<Vec<_>>(),
    );
    append(
        &env.path("b/y.jsonl"),
        &(0..50).map(json_line).collect::<Vec<_>>(),
    );
    let cfg = env.config("[daemons.alpha]\nlogs = [\"$DIR/a/*.jsonl\"]\n");
    let agent = env.spawn(&cfg);
    let count = |d: &str| {
        env.count(&format!(
            "SELECT count(*) FROM pipeline_logs WHERE daemon = '{d}'"
        ))
    };
    assert!(wait_until(Duration::from_secs(15), || count("alpha") == 100));
    let hup = || unsafe { libc::kill(agent.child.id() as i32, libc::SIGHUP) };
    // Add a daemon, and change alpha (a default experiment): neither loses nor repeats a line.
    env.config(
        "[daemons.alpha]\nlogs = [\"$DIR/a/*.jsonl\"]\nexperiment_id = \"6f1c2a4e-0000-4000-8000-000000000009\"\n\n[daemons.beta]\nlogs = [\"$DIR/b/*.jsonl\"]\n",
    );
    hup();
    assert!(
        wait_until(Duration::from_secs(15), || count("beta") == 50),
        "{}",
        agent.stderr()
    );
    append(
        &env.path("a/x.jsonl"),
        &(100..150).map(json_line).collect::<Vec<_>>(),
    );
    assert!(
        wait_until(Duration::from_secs(15), || count("alpha") == 150),
        "{}",
        agent.stderr()
    );
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_logs WHERE daemon = 'alpha' AND experiment_id IS NOT NULL"),
        50,
        "the new lines carry the new default"
    );
    // An invalid config is refused; the running one keeps working.
    std::fs::write(&cfg, "[daemons.alpha]\nlogz = []\n").unwrap();
    hup();
    assert!(wait_until(Duration::from_secs(10), || agent
        .stderr()
        .contains("config reload refused")));
    append(
        &env.path("b/y.jsonl"),
        &(50..60).map(json_line).collect::<Vec<_>>(),
    );
    assert!(
        wait_until(Duration::from_secs(15), || count("beta") == 60),
        "{}",
        agent.stderr()
    );
    let (code, _, stderr) = agent.terminate();
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(count("alpha"), 150);
    assert_eq!(
        env.count("SELECT count(DISTINCT message) FROM pipeline_logs WHERE daemon = 'alpha'"),
        150
    );
    assert!(stderr.contains("unknown key `logz`"), "{stderr}");
}
