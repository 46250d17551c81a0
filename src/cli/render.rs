//! Drawing for terminals: the progress tree with bars, ages and colours.
//!
//! Pure string building; the caller decides where it goes.

use crate::db::queries::TreeRow;
use chrono::{DateTime, Utc};

/// ANSI colour, or nothing when output is not a terminal.
pub fn paint(text: &str, code: &str, color: bool) -> String {
    if color {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_string()
    }
}

/// `12s`, `5m`, `3h`, `2d` ago.
pub fn age(ts: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    let Some(ts) = ts else { return "-".into() };
    let s = (now - ts).num_seconds().max(0);
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86_399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

fn bar(percent: f64, width: usize) -> String {
    let filled = ((percent.clamp(0.0, 100.0) / 100.0) * width as f64).round() as usize;
    format!(
        "{}{}",
        "█".repeat(filled),
        "░".repeat(width - filled.min(width))
    )
}

fn status_color(status: &str) -> &'static str {
    match status {
        "completed" => "32",
        "failed" => "31",
        "running" => "36",
        "cancelled" => "33",
        _ => "2",
    }
}

/// The tree as lines: indentation by depth, bar, percent, items, status and age.
pub fn progress_tree(rows: &[TreeRow], now: DateTime<Utc>, color: bool) -> String {
    let mut out = String::new();
    let label_width = rows
        .iter()
        .map(|r| r.depth.max(0) as usize * 2 + label(r).chars().count())
        .max()
        .unwrap_or(0)
        .min(48);
    for r in rows {
        let indent = "  ".repeat(r.depth.max(0) as usize);
        let name = format!("{indent}{}", label(r));
        let pad = label_width.saturating_sub(name.chars().count());
        let pct = r.percent.unwrap_or(0.0);
        let status = r.status.as_deref().unwrap_or("pending");
        let items = match (r.items_done, r.items_total) {
            (Some(d), Some(t)) => format!(" {d}/{t}"),
            (Some(d), None) => format!(" {d}"),
            _ => String::new(),
        };
        out.push_str(&format!(
            "{name}{} {} {:>5.1}%{items}  {}  {}\n",
            " ".repeat(pad),
            bar(pct, 20),
            pct,
            paint(status, status_color(status), color),
            paint(&age(r.updated_at, now), "2", color),
        ));
    }
    out
}

fn label(r: &TreeRow) -> String {
    match &r.name {
        Some(n) if n != &r.node_id => format!("{n} ({})", r.node_id),
        _ => r.node_id.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_an_indented_tree() {
        let now = Utc::now();
        let rows = vec![
            TreeRow {
                node_id: "pipeline".into(),
                parent_node_id: None,
                depth: 0,
                level: Some("pipeline".into()),
                name: Some("pipeline".into()),
                status: Some("running".into()),
                percent: Some(50.0),
                items_done: None,
                items_total: None,
                updated_at: Some(now - chrono::Duration::seconds(5)),
            },
            TreeRow {
                node_id: "tiles".into(),
                parent_node_id: Some("pipeline".into()),
                depth: 1,
                level: Some("step".into()),
                name: Some("Tile processing".into()),
                status: Some("completed".into()),
                percent: Some(100.0),
                items_done: Some(10),
                items_total: Some(10),
                updated_at: Some(now),
            },
        ];
        let s = progress_tree(&rows, now, false);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("pipeline "));
        assert!(
            lines[0].contains(" 50.0%")
                && lines[0].contains("running")
                && lines[0].contains("5s ago")
        );
        assert!(lines[1].starts_with("  Tile processing (tiles)"));
        assert!(lines[1].contains("100.0% 10/10") && lines[1].contains("████████████████████"));
    }
}
