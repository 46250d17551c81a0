//! `pipewatch migrate`: empty database, twice, concurrently, check-only, force, test data.

use crate::support::{pg, pipewatch, pipewatch_cmd, text};
use std::process::Stdio;

const MIGRATIONS: usize = 12;

fn migrate(url: &str, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec!["--database-url", url, "migrate"];
    args.extend_from_slice(extra);
    let out = pipewatch(&args);
    let (o, e) = text(&out);
    (out.status.code().unwrap_or(-1), o, e)
}

#[test]
fn check_only_on_an_empty_database_lists_everything_missing_then_migrate_fixes_it() {
    let url = pg::fresh_db();
    let (code, out, _) = migrate(&url, &["--check-only"]);
    assert_eq!(code, 1, "{out}");
    for name in [
        "pipeline_logs",
        "pipeline_events",
        "pipeline_progress",
        "pipeline_metrics",
        "experiments",
        "pipewatch_schema_migrations",
        "pipewatch_checkpoints",
        "pipewatch_agents",
        "recent_experiment_errors",
        "experiment_progress_summary",
        "active_pipeline_monitoring",
        "get_progress_tree(uuid)",
        "get_experiment_logs(uuid,text,text,integer,timestamptz,text)",
        "get_error_summary(uuid,timestamptz)",
        "cleanup_old_logs(integer)",
        "update_parent_progress()",
        "pipewatch_ensure_partitions(timestamptz,timestamptz)",
    ] {
        assert!(
            out.lines().any(|l| l.trim() == format!("MISSING  {name}")),
            "{name} not listed as missing in:\n{out}"
        );
    }
    assert_eq!(out.matches("PENDING").count(), MIGRATIONS, "{out}");
    assert!(
        out.contains(&format!(
            "Not up to date: 30 objects missing, {MIGRATIONS} migrations pending"
        )),
        "{out}"
    );
    // Check-only changed nothing.
    assert_eq!(
        pg::psql(
            &url,
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ),
        "0"
    );

    let (code, out, err) = migrate(&url, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.matches("applied now").count(), MIGRATIONS, "{out}");
    assert!(out.contains("created  table     pipeline_logs"), "{out}");
    assert!(
        out.contains("Schema complete: 9/9 tables, 3/3 views, 11/11 functions"),
        "{out}"
    );
    assert!(!out.contains("MISSING"), "{out}");

    let (code, out, _) = migrate(&url, &["--check-only"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Up to date"), "{out}");
    assert!(!out.contains("MISSING"), "{out}");

    // Yesterday through 7 days ahead: 9 daily partitions and a default per table.
    for t in ["pipeline_logs", "pipeline_events", "pipeline_metrics"] {
        let q = format!(
            "SELECT count(*) FILTER (WHERE c.relname ~ '_p[0-9]{{8}}$'),
                    count(*) FILTER (WHERE c.relname = '{t}_default')
               FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
              WHERE i.inhparent = '{t}'::regclass"
        );
        assert_eq!(pg::psql(&url, &q), "9|1", "{t}");
    }
}

#[test]
fn migrate_twice_applies_each_file_once() {
    let url = pg::fresh_db();
    assert_eq!(migrate(&url, &[]).0, 0);
    let first = pg::psql(&url, "SELECT string_agg(version || ':' || applied_at, ',' ORDER BY version) FROM pipewatch_schema_migrations");
    let (code, out, _) = migrate(&url, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.matches("already applied").count(), MIGRATIONS, "{out}");
    assert_eq!(out.matches("applied now").count(), 0, "{out}");
    assert!(
        out.contains("Partitions: 0 daily partitions created"),
        "{out}"
    );
    assert!(out.contains("exists   table     pipeline_logs"), "{out}");
    let second = pg::psql(&url, "SELECT string_agg(version || ':' || applied_at, ',' ORDER BY version) FROM pipewatch_schema_migrations");
    assert_eq!(first, second);
    assert_eq!(
        pg::psql(&url, "SELECT count(*) FROM pipewatch_schema_migrations"),
        MIGRATIONS.to_string()
    );
}

#[test]
fn an_existing_experiments_table_is_left_alone() {
    let url = pg::fresh_db();
    pg::psql(
        &url,
        "CREATE TABLE experiments (id uuid PRIMARY KEY, name text NOT NULL, owner text NOT NULL);
         INSERT INTO experiments VALUES ('6f1c2a4e-0000-4000-8000-000000000001', 'tiles', 'jason')",
    );
    assert_eq!(migrate(&url, &[]).0, 0);
    assert_eq!(
        pg::psql(&url, "SELECT name, owner FROM experiments"),
        "tiles|jason"
    );
}

#[test]
fn twenty_concurrent_migrate_processes_all_succeed_and_apply_each_file_once() {
    let url = pg::fresh_db();
    let children: Vec<_> = (0..20)
        .map(|_| {
            pipewatch_cmd(&["--database-url", &url, "migrate"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("test setup")
        })
        .collect();
    let mut applied_now = 0;
    for child in children {
        let out = child.wait_with_output().expect("test setup");
        let (o, e) = text(&out);
        assert_eq!(out.status.code(), Some(0), "{o}{e}");
        applied_now += o.matches("applied now").count();
    }
    assert_eq!(applied_now, MIGRATIONS);
    assert_eq!(
        pg::psql(&url, "SELECT count(*) FROM pipewatch_schema_migrations"),
        MIGRATIONS.to_string()
    );
    assert_eq!(
        pg::psql(
            &url,
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'pipeline_logs'::regclass"
        ),
        "10"
    );
}

#[test]
fn concurrent_apply_from_several_tasks_applies_each_file_once() {
    let url = pg::fresh_db();
    let rt = tokio::runtime::Runtime::new().expect("test setup");
    let reports = rt.block_on(async {
        let mut handles = Vec::new();
        for _ in 0..8 {
            let url = url.clone();
            handles.push(tokio::spawn(async move {
                let target = pipewatch::db::DbTarget::parse(&url, None, None).expect("test setup");
                let mut client = pipewatch::db::connect(&target).await.expect("test setup");
                pipewatch::db::migrate::apply(&mut client)
                    .await
                    .expect("test setup")
            }));
        }
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.expect("test setup"));
        }
        out
    });
    let applied: usize = reports.iter().map(|r| r.applied_now().len()).sum();
    assert_eq!(applied, MIGRATIONS);
    let partitions: i32 = reports.iter().map(|r| r.partitions_created).sum();
    assert_eq!(partitions, 27);
    assert!(reports.iter().all(|r| r.changed().is_empty()));
}

#[test]
fn check_only_on_a_partial_schema_lists_exactly_what_is_missing() {
    let url = pg::fresh_db();
    assert_eq!(migrate(&url, &[]).0, 0);
    pg::psql(
        &url,
        "DROP VIEW active_pipeline_monitoring; DROP FUNCTION get_error_summary(uuid, timestamptz)",
    );
    let (code, out, _) = migrate(&url, &["--check-only"]);
    assert_eq!(code, 1, "{out}");
    let missing: Vec<&str> = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("MISSING  "))
        .collect();
    assert_eq!(
        missing,
        vec![
            "active_pipeline_monitoring",
            "get_error_summary(uuid,timestamptz)"
        ]
    );
    assert!(out.contains("Not up to date: 2 objects missing."), "{out}");
}

#[test]
fn check_only_reports_pending_migrations_when_the_bookkeeping_is_partial() {
    let url = pg::fresh_db();
    assert_eq!(migrate(&url, &[]).0, 0);
    pg::psql(
        &url,
        "DELETE FROM pipewatch_schema_migrations WHERE version IN ('0007', '0008')",
    );
    let (code, out, _) = migrate(&url, &["--check-only"]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(out.matches("PENDING").count(), 2, "{out}");
    assert!(
        out.contains("Not up to date: 2 migrations pending."),
        "{out}"
    );
}

#[test]
fn a_changed_migration_is_reported_not_rerun() {
    let url = pg::fresh_db();
    assert_eq!(migrate(&url, &[]).0, 0);
    pg::psql(
        &url,
        "UPDATE pipewatch_schema_migrations SET checksum = 'deadbeef' WHERE version = '0006'",
    );
    let (code, out, err) = migrate(&url, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("0006_views")
            && out.contains("CHANGED since applied (recorded checksum deadbeef…"),
        "{out}"
    );
    assert!(
        err.contains("warning: migration 0006 changed after it was applied; it was not re-run"),
        "{err}"
    );
    assert_eq!(
        pg::psql(
            &url,
            "SELECT checksum FROM pipewatch_schema_migrations WHERE version = '0006'"
        ),
        "deadbeef"
    );
    let (code, out, _) = migrate(&url, &["--check-only"]);
    assert_eq!(code, 1);
    assert!(out.contains("1 migrations changed since applied"), "{out}");
}

#[test]
fn force_without_yes_refuses_and_keeps_the_data() {
    let url = pg::fresh_db();
    assert_eq!(migrate(&url, &[]).0, 0);
    pg::psql(
        &url,
        "INSERT INTO pipeline_logs (ts, level, message) VALUES (now(), 'INFO', 'keep me')",
    );
    let out = pipewatch_cmd(&["--database-url", &url, "migrate", "--force"])
        .stdin(Stdio::null())
        .output()
        .expect("test setup");
    let (o, e) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{o}{e}");
    assert_eq!(
        e.trim(),
        "pipewatch: --force drops pipeline_logs, pipeline_events, pipeline_metrics, pipeline_progress, pipewatch_checkpoints and pipewatch_agents: all their data would be lost; pass --yes to confirm (stdin is not a terminal, so pipewatch cannot ask)"
    );
    assert_eq!(pg::psql(&url, "SELECT count(*) FROM pipeline_logs"), "1");
}

#[test]
fn force_with_yes_recreates_everything_empty() {
    let url = pg::fresh_db();
    assert_eq!(migrate(&url, &[]).0, 0);
    pg::psql(
        &url,
        "INSERT INTO pipeline_logs (ts, level, message) VALUES (now(), 'INFO', 'gone');
         INSERT INTO experiments (id, name) VALUES ('6f1c2a4e-0000-4000-8000-000000000001', 'stays')",
    );
    let (code, out, err) = migrate(&url, &["--force", "--yes"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("Dropped every monitoring object"), "{out}");
    assert_eq!(out.matches("applied now").count(), MIGRATIONS, "{out}");
    assert_eq!(pg::psql(&url, "SELECT count(*) FROM pipeline_logs"), "0");
    assert_eq!(pg::psql(&url, "SELECT name FROM experiments"), "stays");
    assert_eq!(migrate(&url, &["--check-only"]).0, 0);
}

#[test]
fn test_data_with_an_unknown_id_says_there_are_no_experiments() {
    let url = pg::fresh_db();
    let (code, _, err) = migrate(
        &url,
        &["--test-data", "6f1c2a4e-0000-4000-8000-0000000000ff"],
    );
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        "pipewatch: --test-data: no experiment with id 6f1c2a4e-0000-4000-8000-0000000000ff; there are no experiments in the experiments table"
    );
}

#[test]
fn test_data_with_an_unknown_id_lists_up_to_five_experiments() {
    let url = pg::fresh_db();
    assert_eq!(migrate(&url, &[]).0, 0);
    pg::psql(
        &url,
        "INSERT INTO experiments (id, name)
         SELECT ('00000000-0000-4000-8000-00000000000' || n)::uuid, 'exp-' || n
           FROM generate_series(1, 7) n",
    );
    let (code, _, err) = migrate(
        &url,
        &["--test-data", "6f1c2a4e-0000-4000-8000-0000000000ff"],
    );
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        "pipewatch: --test-data: no experiment with id 6f1c2a4e-0000-4000-8000-0000000000ff; existing experiments: \
         00000000-0000-4000-8000-000000000001 (exp-1), 00000000-0000-4000-8000-000000000002 (exp-2), \
         00000000-0000-4000-8000-000000000003 (exp-3), 00000000-0000-4000-8000-000000000004 (exp-4), \
         00000000-0000-4000-8000-000000000005 (exp-5)"
    );
    assert_eq!(pg::psql(&url, "SELECT count(*) FROM pipeline_logs"), "0");
}

#[test]
fn test_data_that_is_not_a_uuid_is_a_usage_error() {
    let url = pg::fresh_db();
    let (code, _, err) = migrate(&url, &["--test-data", "tiles-2026"]);
    assert_eq!(code, 2);
    assert!(
        err.starts_with("pipewatch: --test-data \"tiles-2026\" is not an experiment id (a UUID)"),
        "{err}"
    );
}

#[test]
fn test_data_after_migrate_in_one_invocation_writes_a_realistic_sample() {
    let url = pg::fresh_db();
    // The experiment exists before the schema does, as in the real database.
    pg::psql(
        &url,
        "CREATE TABLE experiments (id uuid PRIMARY KEY, name text);
         INSERT INTO experiments VALUES ('6f1c2a4e-0000-4000-8000-000000000001', 'tiles-2026')",
    );
    let (code, out, err) = migrate(
        &url,
        &[
            "--test-data",
            "6f1c2a4e-0000-4000-8000-000000000001",
            "--show-queries",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(
        "Test data for experiment 6f1c2a4e-0000-4000-8000-000000000001 (tiles-2026): 10 progress nodes, 10 log records (2 errors), 3 events, 6 metric samples."
    ), "{out}");
    assert!(
        out.contains("FROM get_progress_tree('6f1c2a4e-0000-4000-8000-000000000001'::uuid)"),
        "{out}"
    );
    assert_eq!(
        pg::psql(
            &url,
            "SELECT string_agg(node_id || ':' || depth || ':' || status || ':' || coalesce(progress_percent::text, '-'), ' ')
               FROM get_progress_tree('6f1c2a4e-0000-4000-8000-000000000001')"
        ),
        "geo_pipeline:0:running:51.39 ingest:1:completed:100.00 ingest.download:2:completed:100.00 \
         ingest.validate:2:completed:100.00 clustering:1:running:54.17 cluster.features:2:completed:100.00 \
         cluster.kmeans:2:running:62.50 cluster.merge:2:pending:- export:1:pending:0.00 export.geojson:2:pending:-"
    );
    assert_eq!(
        pg::psql(
            &url,
            "SELECT count(*) FROM pipeline_logs WHERE level = 'ERROR' AND traceback LIKE 'Traceback%'"
        ),
        "2"
    );
    assert_eq!(pg::psql(&url, "SELECT count(*) FROM pipeline_events"), "3");
    assert_eq!(pg::psql(&url, "SELECT count(*) FROM pipeline_metrics"), "6");
}

#[test]
fn show_queries_alone_needs_no_database() {
    let out = pipewatch(&["migrate", "--show-queries"]);
    let (o, e) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{e}");
    assert!(
        o.contains("SELECT * FROM active_pipeline_monitoring;"),
        "{o}"
    );
    assert!(
        o.contains("p_level := 'ERROR', p_search := 'memory', p_limit := 50"),
        "{o}"
    );
    assert!(o.contains("SELECT cleanup_old_logs(30);"), "{o}");
}

#[test]
fn check_only_cannot_be_combined_with_force() {
    let out = pipewatch(&[
        "--database-url",
        "postgres://nobody@127.0.0.1:1/x",
        "migrate",
        "--check-only",
        "--force",
        "--yes",
    ]);
    let (_, e) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        e.trim(),
        "pipewatch: --check-only changes nothing; it cannot be combined with --force or --test-data"
    );
}

#[test]
fn the_agent_role_copies_into_the_parent_tables_without_ddl_or_delete_rights() {
    use futures_util::SinkExt;
    let url = pg::fresh_db();
    assert_eq!(migrate(&url, &[]).0, 0);
    let rt = tokio::runtime::Runtime::new().expect("test setup");
    rt.block_on(async {
        let target = pipewatch::db::DbTarget::parse(&url, None, None).expect("test setup");
        let client = pipewatch::db::connect(&target).await.expect("test setup");
        client.batch_execute("SET ROLE pipewatch_agent").await.expect("test setup");
        let sink = client
            .copy_in("COPY pipeline_logs (ts, level, message, host, daemon) FROM STDIN")
            .await
            .expect("test setup");
        let mut sink = Box::pin(sink);
        sink.send(bytes::Bytes::from_static(
            b"2026-01-01 00:00:00+00\tINFO\tcopied\th\td\n",
        ))
        .await
        .expect("test setup");
        assert_eq!(sink.as_mut().finish().await.expect("test setup"), 1);
        // The agent may create partitions through the SECURITY DEFINER function …
        let n: i32 = client
            .query_one(
                "SELECT pipewatch_ensure_partitions(now() + interval '10 days', now() + interval '10 days')",
                &[],
            )
            .await
            .expect("test setup")
            .get(0);
        assert_eq!(n, 3);
        // … but has no DDL or DELETE rights of its own.
        for sql in [
            "DELETE FROM pipeline_logs",
            "CREATE TABLE pipeline_logs_x PARTITION OF pipeline_logs FOR VALUES FROM ('2030-01-01') TO ('2030-01-02')",
            "SELECT cleanup_old_logs(0)",
        ] {
            let err = client.batch_execute(sql).await.expect_err("fails");
            assert_eq!(
                err.code(),
                Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
                "{sql}: {err}"
            );
        }
    });
    assert_eq!(
        pg::psql(
            &url,
            "SELECT tableoid::regclass, message FROM pipeline_logs"
        ),
        "pipeline_logs_default|copied"
    );
}
