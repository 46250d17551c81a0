//! Partition maintenance with many writers (issue 10): retention drops whole old partitions
//! without losing a row of today's, and maintenance gives up on a busy table (a slow report
//! holding its lock) rather than queue an ACCESS EXCLUSIVE request that stalls every writer.

use crate::support::agent::Env;
use crate::support::pg::psql;
use crate::support::{pipewatch_cmd, text};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Old daily partitions (4–6 days ago) holding `old` rows, 300 rows of today, and 40 rows 1.5
/// days old (inside the day the 2-day cut-off falls in, or the day after).
fn seeded() -> Env {
    let env = Env::new();
    env.sql(
        "SELECT pipewatch_ensure_partitions(now() - interval '6 days', now() - interval '4 days');
         INSERT INTO pipeline_logs (ts, level, message, host, daemon)
         SELECT now() - interval '4 days' - g * interval '10 minutes', 'INFO', 'old ' || g, 'h', 'old'
           FROM generate_series(1, 200) g;
         INSERT INTO pipeline_events (ts, event_type, host, daemon)
         SELECT now() - interval '4 days' - g * interval '1 hour', 'daemon_started', 'h', 'old'
           FROM generate_series(1, 20) g;
         INSERT INTO pipeline_logs (ts, level, message, host, daemon)
         SELECT now() - g * interval '1 second', 'INFO', 'today ' || g, 'h', 'today'
           FROM generate_series(1, 300) g;
         INSERT INTO pipeline_logs (ts, level, message, host, daemon)
         SELECT now() - interval '36 hours' - g * interval '1 second', 'INFO', 'recent ' || g, 'h', 'recent'
           FROM generate_series(1, 40) g;",
    );
    env
}

/// Names of pipeline_logs' daily partitions for days before `days_ago` days ago.
fn old_partitions(env: &Env, days_ago: u32) -> String {
    env.sql(&format!(
        "SELECT coalesce(string_agg(c.relname, ',' ORDER BY c.relname), '')
           FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
          WHERE i.inhparent IN ('pipeline_logs'::regclass, 'pipeline_events'::regclass)
            AND c.relname ~ '_p[0-9]{{8}}$'
            AND to_date(right(c.relname, 8), 'YYYYMMDD') < (now() - interval '{days_ago} days')::date"
    ))
}

fn cleanup(env: &Env, age: &str) -> (Option<i32>, String, Duration) {
    let t = Instant::now();
    let out = pipewatch_cmd(&["--database-url", &env.db, "cleanup", "--older-than", age])
        .output()
        .unwrap();
    let (o, e) = text(&out);
    (out.status.code(), format!("{o}{e}"), t.elapsed())
}

#[test]
fn retention_drops_whole_old_partitions_and_keeps_every_row_of_today() {
    let env = seeded();
    assert!(
        !old_partitions(&env, 3).is_empty(),
        "the seed made old partitions"
    );
    let (code, out, _) = cleanup(&env, "2d");
    assert_eq!(code, Some(0), "{out}");
    // 200 + 20 old rows in whole partitions, nothing else is older than 2 days.
    assert!(
        out.contains("deleted 220 log, event and metric rows older than 2days"),
        "{out}"
    );
    assert_eq!(
        old_partitions(&env, 3),
        "",
        "whole old partitions are dropped"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_logs WHERE daemon = 'today'"),
        300
    );
    assert_eq!(
        env.count(
            "SELECT count(DISTINCT message) FROM pipeline_logs WHERE daemon = 'today' \
             AND message ~ '^today [0-9]+$'"
        ),
        300
    );
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_logs WHERE daemon = 'recent'"),
        40
    );
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_logs WHERE daemon = 'old'"),
        0
    );
}

/// A slow report: holds ACCESS SHARE on pipeline_logs and all its partitions for `secs`.
fn slow_report(env: &Env, secs: u32) -> Child {
    let child = Command::new("psql")
        .args([
            env.db.as_str(),
            "-X",
            "-q",
            "-c",
            &format!(
                "BEGIN; SELECT count(*) FROM pipeline_logs; SELECT count(*) FROM pipeline_events; \
                 SELECT pg_sleep({secs}); COMMIT;"
            ),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let by = Instant::now() + Duration::from_secs(10);
    while env.count(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND pid <> pg_backend_pid()",
    ) == 0
    {
        assert!(Instant::now() < by, "the slow report did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// A writer committing one row of today every 20 ms on its own connection; returns the
/// number of rows and the longest commit.
fn probe(db: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(usize, Duration)> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&db, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut n = 0;
            let mut worst = Duration::ZERO;
            while !stop.load(Ordering::SeqCst) {
                let t = Instant::now();
                client
                    .batch_execute(
                        "INSERT INTO pipeline_logs (ts, level, message, host, daemon) \
                         VALUES (now(), 'INFO', 'probe', 'h', 'probe')",
                    )
                    .await
                    .unwrap();
                worst = worst.max(t.elapsed());
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (n, worst)
        })
    })
}

#[test]
fn maintenance_gives_up_on_a_busy_table_rather_than_stall_writers() {
    let env = seeded();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = probe(env.db.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let mut report = slow_report(&env, 10);
    let t = Instant::now();

    // Retention while the report runs: it cannot have the lock, so it deletes the old rows
    // instead of waiting, and returns long before the report ends.
    let (code, out, took) = cleanup(&env, "2d");
    assert_eq!(code, Some(0), "{out}");
    assert!(
        took < Duration::from_secs(7),
        "cleanup waited for the report: {took:?}"
    );
    assert!(
        out.contains("deleted 220 log, event and metric rows older than 2days"),
        "{out}"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_logs WHERE ts < now() - interval '2 days'"),
        0
    );
    assert!(
        !old_partitions(&env, 3).is_empty(),
        "the partitions stay while the report holds its lock"
    );
    // Creating a partition needs its table's DEFAULT partition, which the report reads for
    // logs and events: those two are skipped, not waited for; metrics' is created.
    let t1 = Instant::now();
    let created = psql(
        &env.db,
        "SELECT pipewatch_ensure_partitions(now() + interval '20 days', now() + interval '20 days')",
    );
    assert_eq!(
        created, "1",
        "only the metrics partition is created while the report runs"
    );
    assert!(t1.elapsed() < Duration::from_secs(4), "{:?}", t1.elapsed());
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "the test itself outlived the report"
    );

    // The writer never waited a second.
    stop.store(true, Ordering::SeqCst);
    let (rows, worst) = writer.join().unwrap();
    assert!(worst < Duration::from_secs(1), "a writer stalled {worst:?}");
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_logs WHERE daemon = 'probe'"),
        rows as i64
    );

    // Once the report is over, the next cleanup drops the (now empty) partitions and the
    // partition is created.
    report.wait().unwrap();
    let (code, out, _) = cleanup(&env, "2d");
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("deleted 0 log, event and metric rows"),
        "{out}"
    );
    assert_eq!(old_partitions(&env, 3), "");
    assert_eq!(
        psql(
            &env.db,
            "SELECT pipewatch_ensure_partitions(now() + interval '20 days', now() + interval '20 days')"
        ),
        "2"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM pipeline_logs WHERE daemon IN ('today', 'recent')"),
        340
    );
}

/// The way to Citus stays open: pipeline_progress's keys include the distribution column.
#[test]
fn progress_keys_include_the_distribution_column() {
    let env = Env::new();
    assert_eq!(
        env.sql(
            "SELECT string_agg(pg_get_constraintdef(oid), ' | ' ORDER BY contype, conname) \
             FROM pg_constraint WHERE conrelid = 'pipeline_progress'::regclass AND contype IN ('p', 'u')"
        ),
        "PRIMARY KEY (experiment_id, id) | UNIQUE (experiment_id, node_id)"
    );
}
