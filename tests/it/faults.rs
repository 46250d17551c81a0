//! Network faults injected for real between the agent and PostgreSQL (`support::proxy`): a
//! COMMIT whose reply is lost while the server is unreachable, a connection that goes silent
//! without closing; and logins the server refuses, which are configuration errors, not
//! outages. Exact counts: the expected sequence numbers, nothing else, nothing twice.

use crate::support::agent::{append, json_line, wait_until, Agent, Env};
use crate::support::proxy::{Fault, Proxy};
use crate::support::{pg, pipewatch_cmd};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A config for daemon `app` reading `$DIR/*.jsonl`, with `url` and extra `[database]` keys.
fn config(env: &Env, url: &str, database: &str) -> PathBuf {
    let p = env.path("faults.toml");
    std::fs::write(
        &p,
        format!(
            "[database]\nurl = \"{url}\"\n{database}\n[agent]\nhost = \"test-host\"\n\n\
             [batch]\nmax_records = 500\nmax_wait = \"100ms\"\n\n\
             [daemons.app]\nlogs = [\"{}/*.jsonl\"]\n",
            env.dir.path().display()
        ),
    )
    .unwrap();
    p
}

/// Appends `line N` records to `log` in small chunks until stopped; returns how many.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<usize>,
}

impl Writer {
    fn start(log: PathBuf) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut n = 0;
            while !s.load(Ordering::SeqCst) {
                append(&log, &(n..n + 10).map(json_line).collect::<Vec<_>>());
                n += 10;
                std::thread::sleep(Duration::from_millis(20));
            }
            n
        });
        Writer { stop, thread }
    }

    fn finish(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

fn rows(env: &Env) -> i64 {
    env.count("SELECT count(*) FROM pipeline_logs WHERE daemon = 'app'")
}

/// Waits until lines `0..n` are all there, watches a while longer for late duplicates, stops
/// the agent (exit 0) and asserts each landed exactly once; returns the agent's stderr.
fn settle_and_judge(env: &Env, agent: Agent, n: usize) -> String {
    let expected = |env: &Env| {
        env.count(&format!(
            "SELECT count(DISTINCT message) FROM pipeline_logs WHERE daemon = 'app' \
             AND message IN (SELECT 'line ' || s FROM generate_series(0, {}) s)",
            n as i64 - 1
        ))
    };
    let done = wait_until(Duration::from_secs(60), || expected(env) == n as i64);
    // Longer than max_wait, the retry backoff's first steps and a lock wait: a batch retried
    // twice would show by now.
    std::thread::sleep(Duration::from_millis(2500));
    let (code, _, stderr) = agent.terminate();
    assert!(done, "lines missing:\n{stderr}");
    assert_eq!(code, Some(0), "{stderr}");
    let total = rows(env);
    let distinct =
        env.count("SELECT count(DISTINCT message) FROM pipeline_logs WHERE daemon = 'app'");
    assert_eq!(
        (total, distinct, expected(env)),
        (n as i64, n as i64, n as i64),
        "rows (total, distinct, of the expected) — a batch committed twice?\n{stderr}"
    );
    stderr
}

#[test]
fn a_commit_whose_reply_is_lost_while_the_server_is_unreachable_is_committed_once() {
    let env = Env::new();
    let (proxy, url) = Proxy::for_url(&env.db);
    let cfg = config(&env, &url, "");
    let writer = Writer::start(env.path("app.jsonl"));
    // The first fault hits the agent's very first commit, the one that creates its row.
    proxy.arm(Fault::LoseReply(Duration::from_secs(2)));
    let agent = env.spawn(&cfg);
    let rounds = 5;
    for round in 0..rounds {
        if round > 0 {
            // Let the agent ship something through a healthy connection first.
            let before = rows(&env);
            assert!(
                wait_until(Duration::from_secs(30), || rows(&env) > before + 20),
                "no progress before round {round}:\n{}",
                agent.stderr()
            );
            proxy.arm(Fault::LoseReply(Duration::from_secs(2)));
        }
        assert!(
            wait_until(Duration::from_secs(30), || proxy.fired().len() == round + 1),
            "no COMMIT went through the proxy in round {round}:\n{}",
            agent.stderr()
        );
    }
    // Shipping resumes after the last fault.
    let after = rows(&env);
    assert!(
        wait_until(Duration::from_secs(30), || rows(&env) > after + 20),
        "no progress after the faults:\n{}",
        agent.stderr()
    );
    // The agent came back while the server was still "unreachable" to it.
    let (_, refused) = proxy.connections();
    assert!(refused >= 1, "the proxy refused no connection");
    let n = writer.finish();
    assert!(n >= 500, "the writer wrote only {n} lines");
    let stderr = settle_and_judge(&env, agent, n);
    // Every lost reply was a committed batch, recognised as such by the next attempt.
    assert_eq!(
        stderr
            .matches("batch was committed before the connection was lost")
            .count(),
        rounds,
        "{stderr}"
    );
    assert!(
        stderr.contains("database reachable again after"),
        "{stderr}"
    );
}

/// Polls the agent's stderr until `needle` occurs `times` times; returns when it did.
fn wait_for_log(agent: &Agent, needle: &str, times: usize, within: Duration) -> Option<Instant> {
    let mut seen = None;
    wait_until(within, || {
        if agent.stderr().matches(needle).count() >= times {
            seen = Some(Instant::now());
        }
        seen.is_some()
    });
    seen
}

#[test]
fn a_connection_that_goes_silent_is_noticed_within_the_query_timeout_and_shipping_resumes_once() {
    let env = Env::new();
    let (proxy, url) = Proxy::for_url(&env.db);
    let cfg = config(
        &env,
        &url,
        "connect_timeout = \"2s\"\nquery_timeout = \"2s\"\nkeepalives_idle = \"1s\"\n\
         keepalives_interval = \"1s\"\nkeepalives_count = 2\ntcp_user_timeout = \"3s\"\n",
    );
    let agent = env.spawn(&cfg);
    let writer = Writer::start(env.path("app.jsonl"));
    let faults = [Fault::SilenceBeforeCommit, Fault::SilenceAfterCommit];
    for (round, fault) in faults.into_iter().enumerate() {
        let before = rows(&env);
        assert!(
            wait_until(Duration::from_secs(30), || rows(&env) > before + 20),
            "no progress before {fault:?}:\n{}",
            agent.stderr()
        );
        proxy.arm(fault);
        assert!(
            wait_until(Duration::from_secs(30), || proxy.fired().len() == round + 1),
            "no COMMIT went through the proxy ({fault:?}):\n{}",
            agent.stderr()
        );
        let fired_at = proxy.fired()[round].1;
        // The batch's attempt began before its COMMIT was held: 2 s (query_timeout, plus a
        // few ms for its bytes) after that at most, with slack for a loaded machine (measured
        // on a quiet one: 2.0 s).
        let noticed = wait_for_log(&agent, "; reconnecting", round + 1, Duration::from_secs(15));
        let took = noticed.map(|t| t - fired_at);
        assert!(
            took.is_some_and(|t| t < Duration::from_millis(4500)),
            "silence noticed after {took:?} ({fault:?}):\n{}",
            agent.stderr()
        );
        eprintln!("{fault:?}: noticed {took:?} after the connection went silent");
        // New connections are silent too: the handshake has a deadline of its own.
        assert!(
            wait_for_log(
                &agent,
                "of connecting (connect_timeout)",
                round + 1,
                Duration::from_secs(15)
            )
            .is_some(),
            "a silent handshake was not given up ({fault:?}):\n{}",
            agent.stderr()
        );
        proxy.heal();
    }
    let after = rows(&env);
    assert!(
        wait_until(Duration::from_secs(30), || rows(&env) > after + 20),
        "no progress after the faults:\n{}",
        agent.stderr()
    );
    let n = writer.finish();
    let stderr = settle_and_judge(&env, agent, n);
    // The COMMIT that reached the server before the silence was recognised as committed.
    assert_eq!(
        stderr
            .matches("batch was committed before the connection was lost")
            .count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("; reconnecting"), "{stderr}");
}

/// A cluster where only `postgres` logs in without a password, with role `pw` (password
/// `right`, member of `pipewatch_agent`) and a migrated database; returns it and its URL
/// for `pw` with `password`.
fn password_cluster() -> (pg::Cluster, Env) {
    let cluster = pg::Cluster::start_with("password_encryption = 'scram-sha-256'\n", |data| {
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhost all postgres 127.0.0.1/32 trust\n\
             host all all 127.0.0.1/32 scram-sha-256\n",
        )
        .unwrap();
    });
    let env = Env::with_db(cluster.create_db());
    env.sql("CREATE ROLE pw LOGIN PASSWORD 'right' IN ROLE pipewatch_agent");
    (cluster, env)
}

fn as_pw(env: &Env, password: &str) -> String {
    env.db.replacen(
        "postgres://postgres@",
        &format!("postgres://pw:{password}@"),
        1,
    )
}

/// Runs every command that needs the database with `url` in a config file; each must exit 2
/// at once, saying in one line that the login was refused and why.
fn every_command_refuses(env: &Env, url: &str, reason: &str, fix: &str) {
    let cfg = config(env, url, "");
    let cfg = cfg.to_str().unwrap();
    let commands: [&[&str]; 9] = [
        &["run", "--once"],
        &["logs", "-e", "some-experiment"],
        &["progress", "-e", "some-experiment"],
        &["errors"],
        &["cleanup", "--older-than", "30d", "--dry-run"],
        &["status"],
        &["migrate"],
        &["verify"],
        &["check-config"],
    ];
    let mut slowest = Duration::ZERO;
    for args in commands {
        let mut all = vec!["--config", cfg];
        all.extend_from_slice(args);
        let t = Instant::now();
        let out = pipewatch_cmd(&all).output().unwrap();
        let took = t.elapsed();
        slowest = slowest.max(took);
        let (stdout, stderr) = crate::support::text(&out);
        let said = format!("{stdout}{stderr}");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {said}");
        // The old behaviour retried for 30 s.
        assert!(took < Duration::from_secs(5), "{args:?} took {took:?}");
        let line = said
            .lines()
            .find(|l| l.contains("cannot log in to the database"))
            .unwrap_or_else(|| panic!("{args:?} did not say why: {said}"));
        assert!(line.contains(reason), "{args:?}: {line}");
        assert!(
            line.ends_with(&format!(
                "— this is a configuration error ({fix}), not a network problem"
            )),
            "{args:?}: {line}"
        );
        assert!(
            !said.contains(":right@") && !said.contains(":wrong@"),
            "{said}"
        );
        if args[0] != "check-config" {
            assert!(
                stderr
                    .lines()
                    .last()
                    .unwrap_or_default()
                    .starts_with("pipewatch: cannot log in"),
                "{args:?}: {stderr}"
            );
        }
    }
    eprintln!("{reason}: the slowest command exited 2 after {slowest:?}");
}

#[test]
fn a_wrong_password_an_unknown_role_or_database_exit_2_at_once_from_every_command() {
    let (_cluster, env) = password_cluster();
    append(&env.path("a.jsonl"), &[json_line(0)]);
    let wrong = as_pw(&env, "wrong");
    every_command_refuses(
        &env,
        &wrong,
        &format!(
            "{}: 28P01 password authentication failed for user \"pw\"",
            wrong.replace(":wrong@", ":***@")
        ),
        "password, role or database name",
    );
    let unknown_role = env
        .db
        .replacen("postgres://postgres@", "postgres://nobody_here:right@", 1);
    every_command_refuses(
        &env,
        &unknown_role,
        "28P01 password authentication failed for user \"nobody_here\"",
        "password, role or database name",
    );
    // With trust authentication the server names the missing role and database.
    let shared = Env::new();
    let unknown_role = shared
        .db
        .replacen("postgres://postgres@", "postgres://nobody_here@", 1);
    every_command_refuses(
        &shared,
        &unknown_role,
        "28000 role \"nobody_here\" does not exist",
        "password, role or database name",
    );
    let base = shared.db.split_once('?').unwrap().0;
    let (root, _) = base.rsplit_once('/').unwrap();
    let unknown_db = shared.db.replacen(base, &format!("{root}/no_such_db"), 1);
    every_command_refuses(
        &shared,
        &unknown_db,
        "3D000 database \"no_such_db\" does not exist",
        "password, role or database name",
    );
    // A role without CONNECT on the database.
    shared.sql(&format!(
        "CREATE ROLE pw_noconnect_{pid} LOGIN; REVOKE CONNECT ON DATABASE {db} FROM PUBLIC",
        pid = std::process::id(),
        db = base.rsplit_once('/').unwrap().1
    ));
    let no_connect = shared.db.replacen(
        "postgres://postgres@",
        &format!("postgres://pw_noconnect_{}@", std::process::id()),
        1,
    );
    every_command_refuses(
        &shared,
        &no_connect,
        "42501 permission denied for database",
        "grant the role CONNECT on the database",
    );
}

#[test]
fn a_running_agent_says_a_refused_login_is_not_a_network_problem_and_resumes_when_fixed() {
    let (_cluster, env) = password_cluster();
    append(
        &env.path("app.jsonl"),
        &(0..50).map(json_line).collect::<Vec<_>>(),
    );
    let cfg = config(&env, &as_pw(&env, "wrong"), "");
    let sock_path = env.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let log = env.path("agent.stderr");
    let child = pipewatch_cmd(&["--config", cfg.to_str().unwrap(), "run"])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("PIPEWATCH_LOGIN_RETRY_SECS", "1")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut agent = Agent { child, log };
    let mut status = String::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline && !status.contains("not a network problem") {
        if let Ok(n) = sock.recv(&mut buf) {
            status.push_str(&String::from_utf8_lossy(&buf[..n]));
            status.push('\n');
        }
    }
    assert!(
        status.contains("STATUS=cannot log in to the database")
            && status.contains("28P01")
            && status.contains("not a network problem"),
        "STATUS: {status}\n{}",
        agent.stderr()
    );
    // Retried, and said each time, while the process keeps running.
    assert!(
        wait_until(Duration::from_secs(15), || agent
            .stderr()
            .matches("this is not a network problem")
            .count()
            >= 2),
        "{}",
        agent.stderr()
    );
    assert!(agent.is_running(), "{}", agent.stderr());
    assert_eq!(rows(&env), 0);
    // The password is fixed under the running agent: it logs in and ships.
    env.sql("ALTER ROLE pw PASSWORD 'wrong'");
    assert!(
        wait_until(Duration::from_secs(20), || rows(&env) == 50),
        "{}",
        agent.stderr()
    );
    let (code, _, stderr) = agent.terminate();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("database reachable again after"),
        "{stderr}"
    );
    assert!(!stderr.contains(":wrong@"), "password leaked: {stderr}");
}

#[test]
fn a_lock_on_the_agent_row_held_elsewhere_delays_commits_but_never_blocks_them_for_good() {
    // Another session holds the agent's row, as the transaction of a lost connection or a
    // second agent with the same host and daemons would: the agent's lock wait ends, it says
    // why, retries, and ships everything once when the row is free.
    let env = Env::new();
    let log = env.path("app.jsonl");
    append(&log, &(0..100).map(json_line).collect::<Vec<_>>());
    let cfg = config(&env, &env.db, "query_timeout = \"2s\"\n");
    let agent = env.spawn(&cfg);
    assert!(
        wait_until(Duration::from_secs(20), || rows(&env) == 100),
        "{}",
        agent.stderr()
    );
    let holder = {
        let db = env.db.clone();
        std::thread::spawn(move || {
            pg::psql(
                &db,
                "BEGIN; SELECT 1 FROM pipewatch_agents WHERE agent_id = 'test-host/app' FOR UPDATE; \
                 SELECT pg_sleep(4); COMMIT;",
            )
        })
    };
    // The holder has the lock once its session waits in pg_sleep.
    assert!(wait_until(Duration::from_secs(10), || {
        env.count(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(4)%' AND state = 'active' AND pid <> pg_backend_pid()"
    ) == 1
    }));
    append(&log, &(100..300).map(json_line).collect::<Vec<_>>());
    assert!(
        wait_for_log(&agent, "55P03", 1, Duration::from_secs(10)).is_some(),
        "{}",
        agent.stderr()
    );
    assert_eq!(rows(&env), 100);
    holder.join().unwrap();
    let stderr = settle_and_judge(&env, agent, 300);
    assert!(
        stderr.contains("another session holds this agent's row"),
        "{stderr}"
    );
}

#[test]
fn database_deadlines_are_validated_with_file_line_key_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[database]\nurl = \"postgres://u@127.0.0.1:1/db\"\nquery_timeout = \"0s\"\n\
         connect_timeout = \"soon\"\nkeepalives_count = 0\ntcp_user_timeout = \"500ms\"\n\
         keepalive_idle = \"30s\"\n\n[daemons.app]\nlogs = [\"/tmp/none/*.jsonl\"]\n",
    )
    .unwrap();
    let out = pipewatch_cmd(&["--config", cfg.to_str().unwrap(), "check-config"])
        .output()
        .unwrap();
    let (_, stderr) = crate::support::text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    // An unknown key stops parsing first, with a suggestion.
    assert!(stderr.contains("keepalive_idle"), "{stderr}");
    assert!(stderr.contains("keepalives_idle"), "{stderr}");
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("keepalive_idle = \"30s\"\n", ""),
    )
    .unwrap();
    let out = pipewatch_cmd(&["--config", cfg.to_str().unwrap(), "check-config"])
        .output()
        .unwrap();
    let (_, stderr) = crate::support::text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let file = cfg.display().to_string();
    for expected in [
        format!("{file}:3: database.query_timeout = \"0s\": must be greater than zero"),
        format!("{file}:4: database.connect_timeout = \"soon\": not a duration"),
        format!("{file}:5: database.keepalives_count = 0: must be between 1 and 100"),
        format!("{file}:6: database.tcp_user_timeout = \"500ms\": must be at least \"1s\""),
    ] {
        assert!(stderr.contains(&expected), "{expected}\n{stderr}");
    }
    assert_eq!(stderr.lines().count(), 4, "{stderr}");
}

#[test]
fn the_agents_connection_probes_an_idle_peer_after_keepalives_idle() {
    // Keepalives cannot be made to fire through a proxy on loopback (its kernel answers the
    // probes), but the kernel shows the timer they run on: 7 s here, 2 h without the setting.
    let env = Env::new();
    let (proxy, url) = Proxy::for_url(&env.db);
    let port = url
        .split_once("@127.0.0.1:")
        .and_then(|(_, rest)| rest.split('/').next())
        .unwrap()
        .to_string();
    append(&env.path("app.jsonl"), &[json_line(0)]);
    let cfg = config(&env, &url, "keepalives_idle = \"7s\"\n");
    let agent = env.spawn(&cfg);
    assert!(wait_until(Duration::from_secs(20), || rows(&env) == 1));
    let mut timers = String::new();
    let found = wait_until(Duration::from_secs(10), || {
        let out = std::process::Command::new("ss")
            .args([
                "-tnoH",
                "state",
                "established",
                "dst",
                &format!("127.0.0.1:{port}"),
            ])
            .output()
            .unwrap();
        timers = String::from_utf8_lossy(&out.stdout).into_owned();
        timers.contains("timer:(keepalive,")
    });
    let (code, _, stderr) = agent.terminate();
    assert_eq!(code, Some(0), "{stderr}");
    drop(proxy);
    assert!(found, "no keepalive timer on the agent's sockets: {timers}");
    for line in timers.lines().filter(|l| l.contains("keepalive")) {
        let left = line
            .split("timer:(keepalive,")
            .nth(1)
            .and_then(|t| t.split(',').next())
            .unwrap_or_default();
        let secs: f64 = left
            .strip_suffix("sec")
            .and_then(|s| s.parse().ok())
            .or_else(|| {
                left.strip_suffix("ms")
                    .and_then(|s| s.parse::<f64>().ok())
                    .map(|ms| ms / 1000.0)
            })
            .unwrap_or_else(|| panic!("keepalive timer {left:?} is not below a minute: {line}"));
        assert!(secs <= 7.0, "{line}");
    }
}
