//! The reader's per-line cost in isolation (issue 13): the bench's structlog lines pushed
//! through the same public functions a reader calls — `LineSplitter::each_line` →
//! `Parser::push_ref` → `Rules::apply` → `route_fields` → `copyrow::encode_fields` — on one
//! thread, with no file, channel or database.
//!
//! Prints, per configuration (no rules / the bench's 20 rules), the median over `--reps` passes
//! of ns per line and the allocations and allocated bytes per line, counted by a global
//! allocator wrapped around the system one. Run it with
//! `cargo run --release --example line_bench -- --lines 100000 --reps 7`; compare two builds by
//! running both binaries in the same session.

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use pipewatch::agent::copyrow;
use pipewatch::agent::lines::LineSplitter;
use pipewatch::agent::parse::{ParseOptions, Parser};
use pipewatch::agent::route::{route_fields, SourceContext};
use pipewatch::agent::rules::{Rules, Sticky};
use pipewatch::config::raw::RawRule;
use pipewatch::config::Format;
use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The system allocator, counting calls and bytes.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The 20 rules of `examples/bench.rs`, as a daemon's `rules` array.
const RULES_TOML: &str = r#"
[[rules]]
match = 'Processed (?P<items_done>\d+)/(?P<items_total>\d+) tiles'
field = "message"
progress = { node_id = "tiles", parent_node_id = "clustering", level = "step", name = "Tile processing" }
[[rules]]
match = '^=== Phase: (?P<phase>\w+) ==='
set = { phase = "{phase}" }
sticky = true
[[rules]]
match = 'MemoryError|Killed process|Out of memory'
event = { event_type = "out_of_memory", severity = "CRITICAL" }
[[rules]]
match = 'Epoch (?P<items_done>\d+)/(?P<items_total>\d+) finished'
progress = { node_id = "training", parent_node_id = "clustering", level = "step", name = "Training" }
[[rules]]
match = 'Checkpoint saved to (?P<path>\S+)'
event = { event_type = "checkpoint_saved", severity = "INFO" }
[[rules]]
match = 'from shard (?P<shard>s-\d+)'
set = { shard = "{shard}" }
[[rules]]
match = 'Connection (?:refused|reset|timed out)'
event = { event_type = "connection_error", severity = "WARNING" }
[[rules]]
match = 'Retrying in (?P<retry_secs>\d+(?:\.\d+)?) ?s'
set = { retry_secs = "{retry_secs}" }
[[rules]]
match = 'Traceback \(most recent call last\)'
set = { has_traceback = "true" }
[[rules]]
match = '(?i)deadlock detected'
event = { event_type = "deadlock", severity = "ERROR" }
[[rules]]
match = 'Slow query: (?P<query_ms>\d+) ms'
set = { slow_query_ms = "{query_ms}" }
[[rules]]
match = '^Starting (?P<component>[\w.]+) v(?P<version>[\d.]+)'
event = { event_type = "component_started", severity = "INFO" }
[[rules]]
match = 'disk (?:quota|space) (?:exceeded|low)'
event = { event_type = "disk_low", severity = "WARNING" }
[[rules]]
match = 'Cluster (?P<cluster_id>\d+) merged'
set = { cluster_id = "{cluster_id}" }
[[rules]]
match = 'GPU (?P<gpu>\d+) (?:error|fault)'
event = { event_type = "gpu_fault", severity = "ERROR" }
[[rules]]
match = 'Pipeline (?P<status>completed|failed|cancelled)'
progress = { node_id = "clustering", level = "pipeline", name = "Clustering" }
[[rules]]
match = 'Wrote (?P<rows>\d+) rows to (?P<table>\w+)'
set = { target_table = "{table}" }
[[rules]]
match = 'SIGTERM|SIGKILL|received signal \d+'
event = { event_type = "signal_received", severity = "WARNING" }
[[rules]]
match = '^clusterer\.export'
field = "logger"
set = { exporter = "yes" }
[[rules]]
match = 'Validation failed for tile (?P<tile>\d+): (?P<reason>.+)$'
event = { event_type = "validation_failed", severity = "WARNING" }
"#;

#[derive(serde::Deserialize)]
struct RulesFile {
    rules: Vec<RawRule>,
}

/// splitmix64, as in `examples/bench.rs`, so every run reads the same lines.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const EXPERIMENTS: [&str; 4] = [
    "6f1c2a4e-0000-4000-8000-000000000001",
    "6f1c2a4e-0000-4000-8000-000000000002",
    "6f1c2a4e-0000-4000-8000-000000000003",
    "6f1c2a4e-0000-4000-8000-000000000004",
];
const STAGES: [&str; 4] = ["ingest", "clustering", "merge", "export"];
const LOGGERS: [&str; 4] = [
    "clusterer.tiles",
    "clusterer.merge",
    "clusterer.io",
    "clusterer.export",
];
const TRACEBACK: &str = "Traceback (most recent call last):\n  File \"/opt/geo/clusterer/tiles.py\", line 214, in process_tile\n    geom = shapely.wkb.loads(raw)\nshapely.errors.WKBReadingError: Could not create geometry because of errors while reading input.";

/// The i-th line, in the shape and mix of `examples/bench.rs` `generate` (structlog JSON:
/// message, experiment_id, node_id, stage, nested batch, duration_ms, seq, 5 % metrics,
/// 0.5 % exception, level, logger, ISO timestamp).
fn line(rng: &mut Rng, i: u64, ts: DateTime<Utc>) -> String {
    let exp = EXPERIMENTS[(i / 50_000) as usize % 4];
    let stage = STAGES[(i / 20_000) as usize % 4];
    let worker = rng.below(16);
    let r = rng.below(10_000);
    let (level, logger, message) = match r {
        0..=49 => ("info", 0, format!("Processed {}/40000 tiles", i % 40_000)),
        50 => ("info", 0, "=== Phase: main ===".to_string()),
        51..=2570 => (
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
        8571..=8970 => (
            "warning",
            2,
            format!("Slow query: {} ms on geo_points", rng.below(9000) + 1000),
        ),
        8971..=9020 => (
            "error",
            0,
            format!(
                "Failed to parse geometry for feature {}",
                rng.below(10_000_000)
            ),
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
    let mut s = String::with_capacity(400);
    let _ = write!(
        s,
        r#"{{"event": {}, "experiment_id": "{exp}", "node_id": "worker-{worker:02}", "stage": "{stage}", "batch": {{"size": {}, "shard": "s-{:02}"}}, "duration_ms": {}.{}, "seq": {i}"#,
        serde_json::Value::String(message),
        512 << rng.below(3),
        rng.below(64),
        rng.below(5000),
        rng.below(10)
    );
    if r % 20 == 3 {
        let _ = write!(
            s,
            r#", "metrics": {{"points_per_sec": {}, "rss_mb": {}}}"#,
            rng.below(200_000),
            rng.below(4096)
        );
    }
    if level == "error" {
        let _ = write!(
            s,
            r#", "exception": {}"#,
            serde_json::Value::String(TRACEBACK.into())
        );
    }
    let _ = writeln!(
        s,
        r#", "level": "{level}", "logger": "{}", "timestamp": "{}"}}"#,
        LOGGERS[logger],
        ts.to_rfc3339_opts(SecondsFormat::Micros, true)
    );
    s
}

/// One pass over `data` as a reader does it; returns the encoded bytes (so nothing is
/// optimised away).
fn pass(data: &[u8], rules: &Rules) -> usize {
    let opts = ParseOptions {
        format: Format::Auto,
        text_pattern: None,
    };
    let mut splitter = LineSplitter::new(0, 1024 * 1024);
    let mut parser = Parser::new(opts);
    let mut sticky = Sticky::default();
    let captures = serde_json::Map::new();
    let src = SourceContext {
        host: "bench-host",
        daemon: "clusterer",
        source: "/var/log/clusterer/clusterer.jsonl",
        path_captures: &captures,
        default_experiment_id: None,
        default_node_id: None,
    };
    let now = Utc::now();
    let mut records = Vec::new();
    let mut total = 0usize;
    for chunk in data.chunks(256 * 1024) {
        records.clear();
        splitter.each_line(chunk, |line| parser.push_ref(line, &mut records));
        let mut rows = Vec::with_capacity(records.len());
        let row_src = copyrow::RowSource {
            host: src.host,
            daemon: src.daemon,
            source: Some(src.source),
        };
        let mut buf = bytes::BytesMut::with_capacity(16 * 1024);
        for (mut rec, _end) in records.drain(..) {
            rules.apply(&mut rec, &mut sticky);
            let routed = route_fields(rec, &src, now);
            let row = copyrow::encode_fields(&routed.log, row_src, &mut buf);
            total += row.0.len();
            rows.push(row);
        }
        std::hint::black_box(&rows);
    }
    total
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let mut n = 100_000u64;
    let mut reps = 7usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--lines" => n = args.next().unwrap_or_default().parse()?,
            "--reps" => reps = args.next().unwrap_or_default().parse()?,
            other => anyhow::bail!("unknown argument {other:?} (--lines N, --reps N)"),
        }
    }
    let mut rng = Rng(42);
    let start = Utc
        .timestamp_opt(1_790_000_000, 0)
        .single()
        .unwrap_or_else(Utc::now);
    let mut data = Vec::new();
    for i in 0..n {
        let ts = start + chrono::Duration::milliseconds(i as i64);
        data.extend_from_slice(line(&mut rng, i, ts).as_bytes());
    }
    let none = Rules::compile(&[]).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let file: RulesFile = toml::from_str(RULES_TOML)?;
    let twenty = Rules::compile(&file.rules).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    println!(
        "{n} lines, {:.0} bytes/line, {reps} passes each (median)",
        data.len() as f64 / n as f64
    );
    for (name, rules) in [("no rules", &none), ("20 rules", &twenty)] {
        let (mut ns, mut allocs, mut bytes) = (Vec::new(), Vec::new(), Vec::new());
        let mut out = 0;
        for _ in 0..reps {
            let (a0, b0) = (
                ALLOCS.load(Ordering::Relaxed),
                BYTES.load(Ordering::Relaxed),
            );
            let t = Instant::now();
            out = pass(&data, rules);
            ns.push(t.elapsed().as_nanos() as f64 / n as f64);
            allocs.push((ALLOCS.load(Ordering::Relaxed) - a0) as f64 / n as f64);
            bytes.push((BYTES.load(Ordering::Relaxed) - b0) as f64 / n as f64);
        }
        println!(
            "{name:>9}: {:7.0} ns/line  {:6.1} allocations/line  {:6.0} bytes allocated/line  ({} COPY bytes)",
            median(&mut ns),
            median(&mut allocs),
            median(&mut bytes),
            out
        );
    }
    Ok(())
}
