//! The benchmark workload, shared by `bench` and `line_bench`: realistic structlog lines from
//! a deterministic generator, the same records as `pipeline_logs` columns, and twenty rules.

use chrono::{DateTime, SecondsFormat, Utc};
use std::fmt::Write as _;
use uuid::Uuid;

/// Twenty realistic rules over the generated messages: progress, sticky `set`, events, and
/// context extraction; most match rarely or never, as in production.
pub const RULES_TOML: &str = r#"
[[daemons.clusterer.rules]]
match = 'Processed (?P<items_done>\d+)/(?P<items_total>\d+) tiles'
field = "message"
progress = { node_id = "tiles", parent_node_id = "clustering", level = "step", name = "Tile processing" }

[[daemons.clusterer.rules]]
match = '^=== Phase: (?P<phase>\w+) ==='
set = { phase = "{phase}" }
sticky = true

[[daemons.clusterer.rules]]
match = 'MemoryError|Killed process|Out of memory'
event = { event_type = "out_of_memory", severity = "CRITICAL" }

[[daemons.clusterer.rules]]
match = 'Epoch (?P<items_done>\d+)/(?P<items_total>\d+) finished'
progress = { node_id = "training", parent_node_id = "clustering", level = "step", name = "Training" }

[[daemons.clusterer.rules]]
match = 'Checkpoint saved to (?P<path>\S+)'
event = { event_type = "checkpoint_saved", severity = "INFO" }

[[daemons.clusterer.rules]]
match = 'from shard (?P<shard>s-\d+)'
set = { shard = "{shard}" }

[[daemons.clusterer.rules]]
match = 'Connection (?:refused|reset|timed out)'
event = { event_type = "connection_error", severity = "WARNING" }

[[daemons.clusterer.rules]]
match = 'Retrying in (?P<retry_secs>\d+(?:\.\d+)?) ?s'
set = { retry_secs = "{retry_secs}" }

[[daemons.clusterer.rules]]
match = 'Traceback \(most recent call last\)'
set = { has_traceback = "true" }

[[daemons.clusterer.rules]]
match = '(?i)deadlock detected'
event = { event_type = "deadlock", severity = "ERROR" }

[[daemons.clusterer.rules]]
match = 'Slow query: (?P<query_ms>\d+) ms'
set = { slow_query_ms = "{query_ms}" }

[[daemons.clusterer.rules]]
match = '^Starting (?P<component>[\w.]+) v(?P<version>[\d.]+)'
event = { event_type = "component_started", severity = "INFO" }

[[daemons.clusterer.rules]]
match = 'disk (?:quota|space) (?:exceeded|low)'
event = { event_type = "disk_low", severity = "WARNING" }

[[daemons.clusterer.rules]]
match = 'Cluster (?P<cluster_id>\d+) merged'
set = { cluster_id = "{cluster_id}" }

[[daemons.clusterer.rules]]
match = 'GPU (?P<gpu>\d+) (?:error|fault)'
event = { event_type = "gpu_fault", severity = "ERROR" }

[[daemons.clusterer.rules]]
match = 'Pipeline (?P<status>completed|failed|cancelled)'
progress = { node_id = "clustering", level = "pipeline", name = "Clustering" }

[[daemons.clusterer.rules]]
match = 'Wrote (?P<rows>\d+) rows to (?P<table>\w+)'
set = { target_table = "{table}" }

[[daemons.clusterer.rules]]
match = 'SIGTERM|SIGKILL|received signal \d+'
event = { event_type = "signal_received", severity = "WARNING" }

[[daemons.clusterer.rules]]
match = '^clusterer\.export'
field = "logger"
set = { exporter = "yes" }

[[daemons.clusterer.rules]]
match = 'Validation failed for tile (?P<tile>\d+): (?P<reason>.+)$'
event = { event_type = "validation_failed", severity = "WARNING" }
"#;

/// A small deterministic generator (splitmix64), so every run writes the same lines.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One generated record, both as the structlog line and as pipeline_logs' columns.
pub struct Generated {
    pub line: String,
    pub row: CopyRow,
}

/// A row pre-converted to pipeline_logs' columns (host, daemon and source are shared).
pub struct CopyRow {
    pub ts: DateTime<Utc>,
    pub level: &'static str,
    pub message: String,
    pub logger: &'static str,
    pub experiment_id: Uuid,
    pub node_id: String,
    pub stage: &'static str,
    pub context: String,
    pub traceback: Option<String>,
    pub metrics: Option<String>,
}

const EXPERIMENTS: [Uuid; 4] = [
    Uuid::from_u128(0x6f1c2a4e_0000_4000_8000_000000000001),
    Uuid::from_u128(0x6f1c2a4e_0000_4000_8000_000000000002),
    Uuid::from_u128(0x6f1c2a4e_0000_4000_8000_000000000003),
    Uuid::from_u128(0x6f1c2a4e_0000_4000_8000_000000000004),
];
const STAGES: [&str; 4] = ["ingest", "clustering", "merge", "export"];
const PHASES: [&str; 3] = ["warmup", "main", "cooldown"];
const LOGGERS: [&str; 4] = [
    "clusterer.tiles",
    "clusterer.merge",
    "clusterer.io",
    "clusterer.export",
];

const TRACEBACK: &str = "Traceback (most recent call last):\n  File \"/opt/geo/clusterer/tiles.py\", line 214, in process_tile\n    geom = shapely.wkb.loads(raw)\n  File \"/usr/lib/python3/dist-packages/shapely/wkb.py\", line 17, in loads\n    return geos.WKBReader(geos.lgeos).read(data)\nshapely.errors.WKBReadingError: Could not create geometry because of errors while reading input.";

/// The i-th record: a realistic mix of messages, levels and context.
pub fn generate(rng: &mut Rng, i: u64, ts: DateTime<Utc>, extra: Option<&str>) -> Generated {
    let exp = EXPERIMENTS[(i / 50_000) as usize % EXPERIMENTS.len()];
    let stage = STAGES[(i / 20_000) as usize % STAGES.len()];
    let worker = rng.below(16);
    let node_id = format!("worker-{worker:02}");
    let r = rng.below(10_000);
    let (level, logger_ix, message) = match r {
        0..=49 => (
            "info",
            0,
            format!("Processed {}/{} tiles", i % 40_000, 40_000),
        ),
        50 => (
            "info",
            0,
            format!("=== Phase: {} ===", PHASES[(i / 1000) as usize % 3]),
        ),
        51..=70 => (
            "info",
            2,
            format!("Checkpoint saved to /data/ckpt/{exp}/step-{}.pt", i / 100),
        ),
        71..=2570 => (
            "info",
            2,
            format!(
                "Loaded {} points from shard s-{:02} in {} ms",
                rng.below(90_000) + 1000,
                rng.below(64),
                rng.below(900) + 10
            ),
        ),
        2571..=4570 => (
            "info",
            1,
            format!(
                "Cluster {} merged with cluster {}: {} members, radius {:.3} km",
                rng.below(1_000_000),
                rng.below(1_000_000),
                rng.below(5000) + 2,
                rng.below(100_000) as f64 / 1000.0
            ),
        ),
        4571..=5570 => (
            "info",
            3,
            format!("Wrote {} rows to geo_clusters_staging", rng.below(50_000)),
        ),
        5571..=8570 => (
            "debug",
            0,
            format!(
                "Computed tile {}/{} zoom {}: {} features",
                rng.below(4096),
                rng.below(4096),
                rng.below(18) + 1,
                rng.below(2000)
            ),
        ),
        8571..=8870 => (
            "warning",
            2,
            format!("Slow query: {} ms on geo_points", rng.below(9000) + 1000),
        ),
        8871..=8970 => (
            "warning",
            2,
            format!(
                "Retrying in {}.5s after timeout talking to tile-server-{}",
                rng.below(10),
                rng.below(8)
            ),
        ),
        8971..=9020 => (
            "error",
            0,
            format!(
                "Failed to parse geometry for feature {}",
                rng.below(10_000_000)
            ),
        ),
        9021 => (
            "critical",
            1,
            format!("MemoryError while allocating {} bytes", rng.below(1 << 34)),
        ),
        _ => (
            "info",
            1,
            format!(
                "Heartbeat: queue depth {}, workers {}",
                rng.below(500),
                rng.below(16) + 1
            ),
        ),
    };
    let logger = LOGGERS[logger_ix];
    let traceback = (level == "error").then(|| TRACEBACK.to_string());
    let metrics = (r % 20 == 3).then(|| {
        format!(
            r#"{{"points_per_sec": {}, "rss_mb": {}}}"#,
            rng.below(200_000),
            rng.below(4096)
        )
    });
    // The fields that are not columns: what pipeline_logs.context holds.
    let mut context = format!(
        r#"{{"batch": {{"size": {}, "shard": "s-{:02}"}}, "duration_ms": {}.{}, "seq": {i}"#,
        512 << rng.below(3),
        rng.below(64),
        rng.below(5000),
        rng.below(10)
    );
    if let Some(extra) = extra {
        context.push_str(", ");
        context.push_str(extra);
    }
    context.push('}');
    let ts_text = ts.to_rfc3339_opts(SecondsFormat::Micros, true);
    let mut line = String::with_capacity(400);
    let _ = write!(
        line,
        r#"{{"event": {}, "experiment_id": "{exp}", "node_id": "{node_id}", "stage": "{stage}", "#,
        json_string(&message)
    );
    // The context object's members, spliced in without its braces.
    line.push_str(&context[1..context.len() - 1]);
    if let Some(m) = &metrics {
        let _ = write!(line, r#", "metrics": {m}"#);
    }
    if let Some(tb) = &traceback {
        let _ = write!(line, r#", "exception": {}"#, json_string(tb));
    }
    let _ = writeln!(
        line,
        r#", "level": "{level}", "logger": "{logger}", "timestamp": "{ts_text}"}}"#
    );
    Generated {
        line,
        row: CopyRow {
            ts,
            level: match level {
                "debug" => "DEBUG",
                "warning" => "WARNING",
                "error" => "ERROR",
                "critical" => "CRITICAL",
                _ => "INFO",
            },
            message,
            logger,
            experiment_id: exp,
            node_id,
            stage,
            context,
            traceback,
            metrics,
        },
    }
}

pub fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}
