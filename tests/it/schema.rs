//! The schema's behaviour in SQL: the progress trigger, the query functions, partitions and
//! retention. Each test migrates a fresh database with the real binary first.

use crate::support::{pg, pipewatch, text};

const EXP: &str = "6f1c2a4e-0000-4000-8000-000000000001";

fn migrated() -> String {
    let url = pg::fresh_db();
    let out = pipewatch(&["--database-url", &url, "migrate"]);
    let (o, e) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{o}{e}");
    url
}

/// `node:status:percent` of the given nodes, in that order.
fn states(url: &str, nodes: &[&str]) -> String {
    nodes
        .iter()
        .map(|n| {
            pg::psql(
                url,
                &format!(
                    "SELECT node_id || ':' || status || ':' || coalesce(progress_percent::text, '-')
                       FROM pipeline_progress WHERE experiment_id = '{EXP}' AND node_id = '{n}'"
                ),
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn three_level_tree(url: &str) {
    pg::psql(
        url,
        &format!(
            "INSERT INTO pipeline_progress (experiment_id, node_id, parent_node_id, level, status, progress_percent, updated_at)
             VALUES ('{EXP}', 'root', NULL, 'pipeline', 'pending', NULL, '2026-01-01 00:00+00'),
                    ('{EXP}', 'pa', 'root', 'phase', 'pending', NULL, '2026-01-01 00:00+00'),
                    ('{EXP}', 'pb', 'root', 'phase', 'pending', NULL, '2026-01-01 00:00+00'),
                    ('{EXP}', 'a1', 'pa', 'step', 'completed', 100, '2026-01-01 00:01+00'),
                    ('{EXP}', 'a2', 'pa', 'step', 'running', 50, '2026-01-01 00:02+00'),
                    ('{EXP}', 'b1', 'pb', 'step', 'pending', NULL, '2026-01-01 00:03+00')"
        ),
    );
}

#[test]
fn trigger_aggregates_percent_and_status_through_three_levels() {
    let url = migrated();
    three_level_tree(&url);
    assert_eq!(
        states(&url, &["pa", "pb", "root"]),
        "pa:running:75.00 pb:pending:0.00 root:running:37.50"
    );
    // The parent's updated_at is the greatest child's.
    assert_eq!(
        pg::psql(
            &url,
            &format!("SELECT updated_at FROM pipeline_progress WHERE experiment_id = '{EXP}' AND node_id = 'root'")
        ),
        "2026-01-01 00:03:00+00"
    );
    pg::psql(
        &url,
        &format!(
            "UPDATE pipeline_progress SET status = 'running', progress_percent = 20, started_at = '2026-01-01 00:04+00'
              WHERE experiment_id = '{EXP}' AND node_id = 'b1'"
        ),
    );
    assert_eq!(
        states(&url, &["pa", "pb", "root"]),
        "pa:running:75.00 pb:running:20.00 root:running:47.50"
    );
    pg::psql(
        &url,
        &format!(
            "UPDATE pipeline_progress SET status = 'completed', progress_percent = 100, completed_at = '2026-01-01 01:00+00'
              WHERE experiment_id = '{EXP}' AND node_id IN ('a2', 'b1')"
        ),
    );
    assert_eq!(
        states(&url, &["pa", "pb", "root"]),
        "pa:completed:100.00 pb:completed:100.00 root:completed:100.00"
    );
    assert_eq!(
        pg::psql(
            &url,
            &format!("SELECT started_at || ' ' || completed_at FROM pipeline_progress WHERE experiment_id = '{EXP}' AND node_id = 'pb'")
        ),
        "2026-01-01 00:04:00+00 2026-01-01 01:00:00+00"
    );
    // Items are not aggregated.
    assert_eq!(
        pg::psql(
            &url,
            &format!("SELECT count(*) FROM pipeline_progress WHERE experiment_id = '{EXP}' AND items_total IS NOT NULL")
        ),
        "0"
    );
}

#[test]
fn trigger_propagates_failure_to_the_root() {
    let url = migrated();
    three_level_tree(&url);
    pg::psql(
        &url,
        &format!("UPDATE pipeline_progress SET status = 'failed' WHERE experiment_id = '{EXP}' AND node_id = 'b1'"),
    );
    assert_eq!(
        states(&url, &["pa", "pb", "root"]),
        "pa:running:75.00 pb:failed:0.00 root:failed:37.50"
    );
    // Once the failed step is retried and runs again, the failure clears upwards.
    pg::psql(
        &url,
        &format!("UPDATE pipeline_progress SET status = 'running' WHERE experiment_id = '{EXP}' AND node_id = 'b1'"),
    );
    assert_eq!(
        states(&url, &["pb", "root"]),
        "pb:running:0.00 root:running:37.50"
    );
}

#[test]
fn trigger_creates_missing_parents_and_survives_a_cycle() {
    let url = migrated();
    pg::psql(
        &url,
        &format!(
            "INSERT INTO pipeline_progress (experiment_id, node_id, parent_node_id, level, status, progress_percent)
             VALUES ('{EXP}', 'tiles', 'clustering', 'step', 'running', 40)"
        ),
    );
    assert_eq!(
        pg::psql(
            &url,
            &format!("SELECT name || ':' || level || ':' || status || ':' || progress_percent FROM pipeline_progress WHERE experiment_id = '{EXP}' AND node_id = 'clustering'")
        ),
        "clustering:phase:running:40.00"
    );
    // A cycle (clustering's parent is tiles) must not recurse forever or fail the write.
    pg::psql(
        &url,
        &format!("UPDATE pipeline_progress SET parent_node_id = 'tiles' WHERE experiment_id = '{EXP}' AND node_id = 'clustering'"),
    );
    assert_eq!(
        pg::psql(
            &url,
            &format!("SELECT count(*) FROM pipeline_progress WHERE experiment_id = '{EXP}'")
        ),
        "2"
    );
    // The tree walk cuts the cycle too: no node has no parent, so nothing is a root.
    assert_eq!(
        pg::psql(
            &url,
            &format!("SELECT count(*) FROM get_progress_tree('{EXP}')")
        ),
        "0"
    );
}

#[test]
fn get_progress_tree_is_depth_first_with_depths_and_paths() {
    let url = migrated();
    three_level_tree(&url);
    assert_eq!(
        pg::psql(
            &url,
            &format!("SELECT string_agg(node_id || ':' || depth || ':' || array_to_string(path, '/'), ' ') FROM get_progress_tree('{EXP}')")
        ),
        "root:0:root pa:1:root/pa a1:2:root/pa/a1 a2:2:root/pa/a2 pb:1:root/pb b1:2:root/pb/b1"
    );
}

fn insert_logs(url: &str) {
    pg::psql(
        url,
        &format!(
            "INSERT INTO pipeline_logs (ts, level, message, traceback, experiment_id, node_id)
             VALUES (now() - interval '6 min', 'DEBUG', 'debug detail', NULL, '{EXP}', 'n1'),
                    (now() - interval '5 min', 'INFO', 'Processed 10% of tiles', NULL, '{EXP}', 'n1'),
                    (now() - interval '4 min', 'WARNING', 'slow tile_7', NULL, '{EXP}', 'n2'),
                    (now() - interval '3 min', 'ERROR', 'Failed: MemoryError', 'Traceback ...\nMemoryError', '{EXP}', 'n2'),
                    (now() - interval '2 min', 'CRITICAL', 'worker killed', 'Traceback ... OOM killer', '{EXP}', 'n1'),
                    (now() - interval '1 min', 'ERROR', 'Failed: MemoryError', NULL, '{EXP}', 'n1'),
                    (now(), 'ERROR', 'other experiment', NULL, gen_random_uuid(), 'n1')"
        ),
    );
}

fn logs(url: &str, args: &str) -> String {
    pg::psql(
        url,
        &format!("SELECT string_agg(level || ':' || message, ' | ') FROM get_experiment_logs('{EXP}'{args})"),
    )
}

#[test]
fn get_experiment_logs_level_search_limit_semantics() {
    let url = migrated();
    insert_logs(&url);
    assert_eq!(
        logs(&url, ""),
        "ERROR:Failed: MemoryError | CRITICAL:worker killed | ERROR:Failed: MemoryError | WARNING:slow tile_7 | INFO:Processed 10% of tiles | DEBUG:debug detail"
    );
    // p_level is a minimum severity, case-insensitive.
    assert_eq!(
        logs(&url, ", p_level := 'warning'"),
        "ERROR:Failed: MemoryError | CRITICAL:worker killed | ERROR:Failed: MemoryError | WARNING:slow tile_7"
    );
    assert_eq!(
        logs(&url, ", p_level := 'ERROR'"),
        "ERROR:Failed: MemoryError | CRITICAL:worker killed | ERROR:Failed: MemoryError"
    );
    assert_eq!(
        logs(&url, ", p_level := 'CRITICAL'"),
        "CRITICAL:worker killed"
    );
    // p_search: case-insensitive substring of message or traceback.
    assert_eq!(
        logs(&url, ", p_search := 'memoryERROR'"),
        "ERROR:Failed: MemoryError | ERROR:Failed: MemoryError"
    );
    assert_eq!(
        logs(&url, ", p_search := 'oom killer'"),
        "CRITICAL:worker killed"
    );
    // LIKE wildcards are literal.
    assert_eq!(
        logs(&url, ", p_search := '10%'"),
        "INFO:Processed 10% of tiles"
    );
    assert_eq!(
        logs(&url, ", p_search := '%'"),
        "INFO:Processed 10% of tiles"
    );
    assert_eq!(logs(&url, ", p_search := 'tile_'"), "WARNING:slow tile_7");
    assert_eq!(logs(&url, ", p_search := 'e_7'"), "WARNING:slow tile_7");
    assert_eq!(logs(&url, ", p_search := 'l_w'"), "");
    // p_limit, p_node_id, p_since.
    assert_eq!(
        logs(&url, ", p_limit := 2"),
        "ERROR:Failed: MemoryError | CRITICAL:worker killed"
    );
    assert_eq!(logs(&url, ", p_limit := 0"), "");
    assert_eq!(
        logs(&url, ", p_node_id := 'n2'"),
        "ERROR:Failed: MemoryError | WARNING:slow tile_7"
    );
    assert_eq!(
        logs(&url, ", p_since := now() - interval '150 seconds'"),
        "ERROR:Failed: MemoryError | CRITICAL:worker killed"
    );
    let err = pg::try_psql(
        &url,
        &format!("SELECT * FROM get_experiment_logs('{EXP}', 'LOUD')"),
    )
    .expect_err("fails");
    assert!(
        err.contains("unknown level LOUD: use DEBUG, INFO, WARNING, ERROR or CRITICAL"),
        "{err}"
    );
}

#[test]
fn get_error_summary_groups_by_message() {
    let url = migrated();
    insert_logs(&url);
    assert_eq!(
        pg::psql(
            &url,
            &format!("SELECT message, count, nodes, sample_traceback IS NOT NULL, max_level FROM get_error_summary('{EXP}')")
        ),
        "Failed: MemoryError|2|{n1,n2}|t|ERROR\nworker killed|1|{n1}|t|CRITICAL"
    );
    assert_eq!(
        pg::psql(
            &url,
            &format!(
                "SELECT count(*) FROM get_error_summary('{EXP}', now() - interval '150 seconds')"
            )
        ),
        "2"
    );
    assert_eq!(
        pg::psql(
            &url,
            &format!("SELECT count(*) FROM recent_experiment_errors WHERE experiment_id = '{EXP}'")
        ),
        "3"
    );
}

#[test]
fn ensure_partitions_moves_default_rows_and_caps_the_range() {
    let url = migrated();
    pg::psql(
        &url,
        "INSERT INTO pipeline_logs (ts, level, message) VALUES (now() + interval '12 days', 'INFO', 'early'), ('2099-01-01', 'INFO', 'odd')",
    );
    assert_eq!(
        pg::psql(&url, "SELECT count(*) FROM pipeline_logs_default"),
        "2"
    );
    assert_eq!(
        pg::psql(&url, "SELECT pipewatch_ensure_partitions(now() + interval '12 days', now() + interval '12 days')"),
        "3"
    );
    assert_eq!(
        pg::psql(&url, "SELECT tableoid::regclass || ':' || message FROM pipeline_logs ORDER BY ts"),
        format!(
            "pipeline_logs_p{}:early\npipeline_logs_default:odd",
            pg::psql(&url, "SELECT to_char(((now() + interval '12 days') AT TIME ZONE 'UTC')::date, 'YYYYMMDD')")
        )
    );
    // Far-future timestamps get no partitions; a second call creates nothing.
    assert_eq!(
        pg::psql(
            &url,
            "SELECT pipewatch_ensure_partitions('2099-01-01', '2099-01-02')"
        ),
        "0"
    );
    assert_eq!(
        pg::psql(&url, "SELECT pipewatch_ensure_partitions(now() + interval '12 days', now() + interval '12 days')"),
        "0"
    );
    // A range of 10 years is capped to 366 days.
    assert_eq!(
        pg::psql(&url, "SELECT pipewatch_ensure_partitions(now() - interval '10 years', now() - interval '2 days')"),
        (366 * 3).to_string()
    );
}

#[test]
fn cleanup_old_logs_drops_whole_partitions_and_deletes_in_the_others() {
    let url = migrated();
    pg::psql(
        &url,
        "SELECT pipewatch_ensure_partitions(now() - interval '40 days', now());
         INSERT INTO pipeline_logs (ts, level, message)
              SELECT now() - make_interval(days => d), 'INFO', 'day ' || d FROM generate_series(0, 40) d;
         INSERT INTO pipeline_logs (ts, level, message) VALUES ('1990-01-01', 'INFO', 'in default');
         INSERT INTO pipeline_events (ts, event_type) VALUES (now() - interval '35 days', 'old'), (now(), 'new');
         INSERT INTO pipeline_metrics (ts) VALUES (now() - interval '35 days'), (now());",
    );
    let before_parts = pg::psql(
        &url,
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'pipeline_logs'::regclass",
    );
    // 40 days back through 7 days ahead, plus the default partition.
    assert_eq!(before_parts, "49");
    // Logs older than 30 days: days 30..40 (day 30 was written a moment before the cutoff
    // was taken: 11 rows) and the default row; 1 event; 1 metric.
    assert_eq!(pg::psql(&url, "SELECT cleanup_old_logs(30)"), "14");
    assert_eq!(pg::psql(&url, "SELECT count(*) FROM pipeline_logs"), "30");
    assert_eq!(
        pg::psql(
            &url,
            "SELECT min(message) FROM pipeline_logs WHERE message = 'in default'"
        ),
        ""
    );
    assert_eq!(pg::psql(&url, "SELECT count(*) FROM pipeline_events"), "1");
    assert_eq!(pg::psql(&url, "SELECT count(*) FROM pipeline_metrics"), "1");
    // Partitions wholly older than the cutoff are gone; the boundary one stays.
    assert_eq!(
        pg::psql(
            &url,
            "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
              WHERE i.inhparent = 'pipeline_logs'::regclass
                AND to_date(right(c.relname, 8), 'YYYYMMDD') < ((now() - interval '30 days') AT TIME ZONE 'UTC')::date
                AND c.relname ~ '_p[0-9]{8}$'"
        ),
        "0"
    );
    let err = pg::try_psql(&url, "SELECT cleanup_old_logs(-1)").expect_err("fails");
    assert!(
        err.contains("cleanup_old_logs: p_days must be 0 or more, not -1"),
        "{err}"
    );
}
