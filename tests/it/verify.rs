//! `pipewatch verify`: all green after migrate and leaves nothing behind; red on an empty
//! database.

use crate::support::{pg, pipewatch, text};

#[test]
fn verify_after_migrate_prints_an_all_green_checklist_and_leaves_no_data() {
    let url = pg::fresh_db();
    assert_eq!(
        pipewatch(&["--database-url", &url, "migrate"])
            .status
            .code(),
        Some(0)
    );
    let out = pipewatch(&["--database-url", &url, "verify"]);
    let (o, e) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{o}{e}");
    let checks: Vec<&str> = o.lines().filter(|l| l.starts_with("  ")).collect();
    assert_eq!(checks.len(), 22, "{o}");
    assert!(checks.iter().all(|l| l.starts_with("  ✅ ")), "{o}");
    for metric in [
        "✅ All 4 monitoring tables created",
        "✅ All 3 monitoring views created",
        "✅ All 5 utility functions created",
        "✅ Test data insertion working",
        "✅ Progress aggregation trigger working",
        "✅ Failure propagation",
        "✅ get_experiment_logs: level, search, limit",
        "✅ cleanup_old_logs removes old rows",
    ] {
        assert!(o.contains(metric), "{metric} missing in:\n{o}");
    }
    assert!(
        o.ends_with("All 22 checks passed; test data rolled back.\n"),
        "{o}"
    );
    for t in [
        "pipeline_logs",
        "pipeline_events",
        "pipeline_metrics",
        "pipeline_progress",
        "experiments",
    ] {
        assert_eq!(
            pg::psql(&url, &format!("SELECT count(*) FROM {t}")),
            "0",
            "{t}"
        );
    }
    // The partition verify created for its far-ahead record was rolled back too.
    assert_eq!(
        pg::psql(
            &url,
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'pipeline_logs'::regclass"
        ),
        "10"
    );
}

#[test]
fn verify_on_an_empty_database_fails_every_check() {
    let url = pg::fresh_db();
    let out = pipewatch(&["--database-url", &url, "verify"]);
    let (o, e) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{o}{e}");
    assert!(o.contains("  ❌ All 4 monitoring tables created: missing: pipeline_logs, pipeline_events, pipeline_progress, pipeline_metrics"), "{o}");
    assert!(
        o.ends_with("22 of 22 checks FAILED; test data rolled back.\n"),
        "{o}"
    );
}

#[test]
fn verify_reports_a_dropped_view_and_a_broken_function() {
    let url = pg::fresh_db();
    assert_eq!(
        pipewatch(&["--database-url", &url, "migrate"])
            .status
            .code(),
        Some(0)
    );
    pg::psql(
        &url,
        "DROP VIEW recent_experiment_errors;
         CREATE OR REPLACE FUNCTION get_error_summary(p_experiment_id uuid, p_since timestamptz DEFAULT NULL)
         RETURNS TABLE (message text, count bigint, first_seen timestamptz, last_seen timestamptz,
                        nodes text[], sample_traceback text, max_level text)
         LANGUAGE sql AS $$ SELECT NULL::text, 0::bigint, NULL::timestamptz, NULL::timestamptz, NULL::text[], NULL::text, NULL::text WHERE false $$",
    );
    let out = pipewatch(&["--database-url", &url, "verify"]);
    let (o, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{o}");
    let failed: Vec<&str> = o.lines().filter(|l| l.starts_with("  ❌")).collect();
    assert_eq!(
        failed,
        vec![
            "  ❌ All 3 monitoring views created: missing: recent_experiment_errors",
            "  ❌ get_error_summary groups errors: groups: expected [(\"Failed to load tile 93: MemoryError\", 2, [\"cluster.kmeans\"], true)], got []",
            "  ❌ recent_experiment_errors view: db error: ERROR: relation \"recent_experiment_errors\" does not exist",
        ],
        "{o}"
    );
}
