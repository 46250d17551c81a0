//! `check-config --sample FILE`: the agent's own splitter, parser and rules run over a sample
//! file, to show what the rules of a daemon make of it. Reads the file; writes nothing.

use crate::config::{Config, DaemonConfig};
use crate::model::Record;
use std::path::Path;

/// `check-config --sample FILE`: reads FILE's lines, turns each into a record and prints what
/// the rules of `daemon` (default: the first configured) produce, as text for the caller to
/// print.
pub fn sample_file_report(
    config: &Config,
    daemon: Option<&str>,
    file: &Path,
) -> anyhow::Result<String> {
    let d = match daemon {
        Some(name) => config
            .daemons
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = config.daemons.iter().map(|d| d.name.as_str()).collect();
                crate::exit::usage(format!(
                    "--daemon {name}: no such daemon in {} (configured: {})",
                    config.source.display(),
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                ))
            })?,
        None => config.daemons.first().ok_or_else(|| {
            crate::exit::usage(format!(
                "--sample needs a daemon whose rules to use, and {} configures none",
                config.source.display()
            ))
        })?,
    };
    let bytes = std::fs::read(file)
        .map_err(|e| anyhow::anyhow!("cannot read sample file {}: {e}", file.display()))?;
    let records = parse_sample(d, &bytes);
    let head = format!(
        "\nsample {} with the {} rule(s) of daemons.{}:\n",
        file.display(),
        d.rules.len(),
        d.name
    );
    Ok(head + &crate::agent::rules::report(&d.rules, "line", records))
}

/// Parses a sample file exactly as the agent would (same splitter, parser and line limit),
/// numbering each record by the line it ends on.
fn parse_sample(d: &DaemonConfig, bytes: &[u8]) -> Vec<(usize, Record)> {
    use crate::agent::lines::LineSplitter;
    use crate::agent::parse::{ParseOptions, Parser};
    let mut splitter = LineSplitter::new(0, d.max_line_bytes);
    let mut parser = Parser::new(ParseOptions {
        format: d.format,
        text_pattern: d.text_pattern.clone(),
    });
    let mut lines = Vec::new();
    splitter.push(bytes, &mut lines);
    if splitter.pending_len() > 0 {
        // A sample's last line needs no newline.
        splitter.push(b"\n", &mut lines);
    }
    let mut out = Vec::new();
    for line in lines {
        parser.push(line, &mut out);
    }
    parser.flush(&mut out);
    let line_ends: Vec<usize> = bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .map(|(i, _)| i + 1)
        .collect();
    out.into_iter()
        .map(|(r, end)| {
            let n = line_ends.partition_point(|e| (*e as u64) < end) + 1;
            (n, r)
        })
        .collect()
}
