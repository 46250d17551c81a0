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

#[allow(dead_code)] // the COPY columns are the benchmark's, not needed here
#[path = "common/workload.rs"]
mod workload;

use chrono::{TimeZone, Utc};
use pipewatch::agent::copyrow;
use pipewatch::agent::lines::LineSplitter;
use pipewatch::agent::parse::{ParseOptions, Parser};
use pipewatch::agent::route::{route_fields, SourceContext};
use pipewatch::agent::rules::{Rules, Sticky};
use pipewatch::config::raw::RawRule;
use pipewatch::config::Format;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use workload::{generate, Rng, RULES_TOML};

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

#[derive(serde::Deserialize)]
struct RulesFile {
    rules: Vec<RawRule>,
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
        data.extend_from_slice(generate(&mut rng, i, ts, None).line.as_bytes());
    }
    let none = Rules::compile(&[]).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    // The bench's rules are a daemon's; here they are a `rules` array.
    let file: RulesFile =
        toml::from_str(&RULES_TOML.replace("[[daemons.clusterer.rules]]", "[[rules]]"))?;
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
