//! Chart geometry: a daemon's downsampled series and the window's marks turned into the
//! numbers an SVG template draws (polyline points, axis labels, mark positions). Pure: no I/O,
//! no markup; the template escapes every label.

use super::data::{DaemonSeries, Mark};
use chrono::{DateTime, Utc};
use serde::Serialize;

/// The drawing area, in SVG user units.
pub const WIDTH: f64 = 560.0;
pub const HEIGHT: f64 = 120.0;

/// One line of a chart.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Line {
    pub name: &'static str,
    /// CSS class choosing the colour.
    pub class: &'static str,
    /// `x,y x,y …`, numbers only.
    pub points: String,
    /// The newest value, formatted.
    pub last: String,
}

/// A vertical mark on the time axis.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MarkPos {
    pub x: String,
    /// `event` kinds: the event type, or `error` for an error record.
    pub kind: String,
    pub label: String,
    pub at: String,
}

/// One chart: a measure of one daemon.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Chart {
    pub title: &'static str,
    pub max_label: String,
    pub lines: Vec<Line>,
    pub marks: Vec<MarkPos>,
    pub from_label: String,
    pub to_label: String,
}

/// A daemon's four charts.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DaemonCharts {
    pub host: String,
    pub daemon: String,
    pub charts: Vec<Chart>,
}

/// Formats a byte amount (or rate) with a binary unit.
pub fn bytes(v: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = v;
    let mut i = 0;
    while v.abs() >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

fn plain(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn x_of(t: DateTime<Utc>, from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    let span = (to - from).num_milliseconds().max(1) as f64;
    let x = (t - from).num_milliseconds() as f64 / span * WIDTH;
    x.clamp(0.0, WIDTH)
}

fn time_label(t: DateTime<Utc>, from: DateTime<Utc>, to: DateTime<Utc>) -> String {
    if (to - from).num_hours() >= 24 {
        t.format("%m-%d %H:%M").to_string()
    } else {
        t.format("%H:%M:%S").to_string()
    }
}

/// The charts of every daemon, in the order given.
pub fn build(
    series: &[DaemonSeries],
    marks: &[Mark],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Vec<DaemonCharts> {
    series
        .iter()
        .map(|s| {
            let mine: Vec<&Mark> = marks
                .iter()
                .filter(|m| {
                    m.daemon.as_deref().is_none_or(|d| d == s.daemon)
                        && m.host.as_deref().is_none_or(|h| h == s.host)
                })
                .collect();
            let chart = |title: &'static str,
                         lines: &[(&'static str, &'static str, &[Option<f64>])],
                         fmt: fn(f64) -> String| {
                one_chart(title, &s.t, lines, &mine, from, to, fmt)
            };
            DaemonCharts {
                host: s.host.clone(),
                daemon: s.daemon.clone(),
                charts: vec![
                    chart("CPU %", &[("cpu %", "s-cpu", &s.cpu)], plain),
                    chart("RSS", &[("rss", "s-rss", &s.rss)], bytes),
                    chart(
                        "disk I/O per second",
                        &[("read", "s-read", &s.read), ("write", "s-write", &s.write)],
                        bytes,
                    ),
                    chart("records/s", &[("records/s", "s-rps", &s.rps)], plain),
                ],
            }
        })
        .collect()
}

fn one_chart(
    title: &'static str,
    t: &[DateTime<Utc>],
    lines: &[(&'static str, &'static str, &[Option<f64>])],
    marks: &[&Mark],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    fmt: fn(f64) -> String,
) -> Chart {
    let max = lines
        .iter()
        .flat_map(|(_, _, v)| v.iter().flatten())
        .fold(0.0f64, |a, &b| if b.is_finite() { a.max(b) } else { a });
    let top = if max > 0.0 { max * 1.1 } else { 1.0 };
    let lines = lines
        .iter()
        .map(|(name, class, values)| {
            let mut points = String::new();
            for (ts, v) in t.iter().zip(values.iter()) {
                let Some(v) = v.filter(|v| v.is_finite()) else {
                    continue;
                };
                let x = x_of(*ts, from, to);
                let y = HEIGHT - (v / top * HEIGHT).clamp(0.0, HEIGHT);
                if !points.is_empty() {
                    points.push(' ');
                }
                points.push_str(&format!("{x:.1},{y:.1}"));
            }
            let last = values
                .iter()
                .rev()
                .flatten()
                .next()
                .map_or_else(|| "-".to_string(), |v| fmt(*v));
            Line {
                name,
                class,
                points,
                last,
            }
        })
        .collect();
    Chart {
        title,
        max_label: fmt(top),
        lines,
        marks: marks
            .iter()
            .map(|m| MarkPos {
                x: format!("{:.1}", x_of(m.ts, from, to)),
                kind: m.kind.clone(),
                label: m.label.clone(),
                at: m.ts.format("%Y-%m-%d %H:%M:%S").to_string(),
            })
            .collect(),
        from_label: time_label(from, from, to),
        to_label: time_label(to, from, to),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn points_scale_into_the_box_and_skip_missing_values() {
        let from = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let to = from + chrono::Duration::seconds(100);
        let s = DaemonSeries {
            host: "h".into(),
            daemon: "d".into(),
            t: vec![from, from + chrono::Duration::seconds(50), to],
            cpu: vec![Some(0.0), None, Some(110.0)],
            rss: vec![Some(1024.0), Some(2048.0), None],
            read: vec![None, None, None],
            write: vec![Some(1.0), Some(1.0), Some(1.0)],
            rps: vec![Some(5.0), Some(5.0), Some(5.0)],
        };
        let marks = vec![
            Mark {
                ts: from + chrono::Duration::seconds(25),
                kind: "daemon_stalled".into(),
                label: "<b>".into(),
                host: Some("h".into()),
                daemon: Some("d".into()),
            },
            Mark {
                ts: from,
                kind: "error".into(),
                label: "other daemon".into(),
                host: Some("h".into()),
                daemon: Some("other".into()),
            },
        ];
        let c = build(&[s], &marks, from, to);
        assert_eq!(c.len(), 1);
        let cpu = &c[0].charts[0];
        // 110 is the max; the top is 10 % above it.
        assert_eq!(cpu.lines[0].points, "0.0,120.0 560.0,10.9");
        assert_eq!(cpu.lines[0].last, "110");
        assert_eq!(cpu.marks.len(), 1, "only this daemon's marks");
        assert_eq!(cpu.marks[0].x, "140.0");
        assert_eq!(c[0].charts[1].lines[0].last, "2.0 KiB");
        assert_eq!(c[0].charts[2].lines.len(), 2, "read and write");
        assert_eq!(c[0].charts[2].lines[0].points, "");
    }

    #[test]
    fn byte_units() {
        assert_eq!(bytes(0.0), "0 B");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(bytes(3.0 * 1024.0 * 1024.0 * 1024.0), "3.0 GiB");
    }
}
