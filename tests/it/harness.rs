//! The test harness itself works: a cluster starts, databases are separate, outages are real.

use crate::support::pg;

#[test]
fn fresh_databases_are_separate_and_empty() {
    let a = pg::fresh_db();
    let b = pg::fresh_db();
    assert_ne!(a, b);
    pg::psql(&a, "CREATE TABLE only_in_a (x int)");
    assert_eq!(
        pg::psql(
            &b,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'only_in_a'"
        ),
        "0"
    );
    assert_eq!(
        pg::psql(
            &a,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'only_in_a'"
        ),
        "1"
    );
}

#[test]
fn a_dedicated_cluster_can_stop_and_start() {
    let c = pg::Cluster::start_new();
    let url = c.create_db();
    pg::psql(&url, "CREATE TABLE t (x int); INSERT INTO t VALUES (1)");
    c.stop();
    assert!(pg::try_psql(&url, "SELECT 1").is_err());
    c.start();
    assert_eq!(pg::psql(&url, "SELECT count(*) FROM t"), "1");
}
