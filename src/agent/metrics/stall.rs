//! Stall detection: a pure state machine per daemon, fed one observation per sample.
//!
//! A daemon *stalls* when it is alive but has written no log record and stayed below its
//! CPU threshold for `stall_after`, or has written nothing for `busy_stall_after` however
//! busy its CPU was (a busy loop is a hang too); its *progress stalls* when its running progress node has
//! not advanced for `stall_after` although records keep coming. Each episode yields one
//! event, and one `daemon_recovered` when it moves again. No I/O and no clock: time comes in
//! with each observation, so tests drive it with synthetic time.

use crate::agent::activity::ProgressActivity;
use chrono::{DateTime, Duration, Utc};

/// One observation of a daemon.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub now: DateTime<Utc>,
    /// Whether its process is alive; `None` for a daemon without process discovery (only
    /// progress stalls apply to it).
    pub alive: Option<bool>,
    /// CPU use over the last window (100 = one core); `None` when unknown.
    pub cpu_percent: Option<f64>,
    /// When the agent last read a record of it.
    pub last_read_at: Option<DateTime<Utc>>,
    /// Its last running progress node, as the shipper saw it.
    pub progress: Option<ProgressActivity>,
    /// Its cumulative counters now, when read (kept from the last moment of life so an
    /// episode can say what the silence cost).
    pub counters: Option<Counters>,
}

/// Cumulative counters of a daemon's process tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    pub cpu_ticks: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub rss_bytes: u64,
}

/// What the machine decided at one observation.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// Silent and idle for `stall_after` (`busy` false; `quiet_since` is when it last showed
    /// life), or silent for `busy_stall_after` while busy (`busy` true; `quiet_since` is its
    /// last output). `then` holds the counters at `quiet_since`, when known.
    DaemonStalled {
        quiet_since: DateTime<Utc>,
        busy: bool,
        then: Option<Counters>,
    },
    /// The progress node has not advanced since `since` although records keep coming.
    ProgressStalled {
        node_id: String,
        since: DateTime<Utc>,
    },
    /// A stall episode ended; `from` is the event type of the episode.
    Recovered {
        from: &'static str,
        stalled_since: DateTime<Utc>,
    },
}

/// The per-daemon state.
#[derive(Debug, Clone)]
pub struct StallDetector {
    stall_after: Duration,
    busy_stall_after: Duration,
    cpu_threshold: f64,
    /// The last moment the daemon showed life (record read, CPU above threshold, start of
    /// watching, or process (re)appearing), and its counters then.
    last_active: Option<(DateTime<Utc>, Option<Counters>)>,
    /// The last moment it wrote something (or watching started), and its counters then.
    last_output: Option<(DateTime<Utc>, Option<Counters>)>,
    /// Set while a daemon stall episode is open: the `quiet_since` it reported and whether
    /// it was a busy stall (which only output ends).
    daemon_stall: Option<(DateTime<Utc>, bool)>,
    /// Set while a progress stall episode is open: its node and the `advanced_at` it saw.
    progress_stall: Option<(String, DateTime<Utc>)>,
}

impl StallDetector {
    /// A detector for one daemon. Durations beyond chrono's range are treated as never.
    pub fn new(
        stall_after: std::time::Duration,
        busy_stall_after: std::time::Duration,
        cpu_threshold: f64,
    ) -> StallDetector {
        StallDetector {
            stall_after: Duration::from_std(stall_after).unwrap_or(Duration::MAX),
            busy_stall_after: Duration::from_std(busy_stall_after).unwrap_or(Duration::MAX),
            cpu_threshold,
            last_active: None,
            last_output: None,
            daemon_stall: None,
            progress_stall: None,
        }
    }

    /// Feeds one observation; returns what changed (at most one daemon and one progress
    /// transition).
    pub fn observe(&mut self, o: &Observation) -> Vec<Transition> {
        let mut out = Vec::new();
        self.observe_daemon(o, &mut out);
        self.observe_progress(o, &mut out);
        out
    }

    fn observe_daemon(&mut self, o: &Observation, out: &mut Vec<Transition>) {
        if o.alive != Some(true) {
            // No process discovery, or a dead daemon: not stalled (an exit is reported
            // elsewhere); when it comes back the quiet time starts afresh.
            self.last_active = None;
            self.last_output = None;
            self.daemon_stall = None;
            return;
        }
        let busy = o.cpu_percent.is_some_and(|c| c >= self.cpu_threshold);
        let read = o.last_read_at.map(|r| r.min(o.now));
        // A moment moves forward to `now` (busy) or to the last read; the counters are
        // those of the observation that moved it.
        let advance = |prev: Option<(DateTime<Utc>, Option<Counters>)>, now_too: bool| {
            let mut t = prev.map_or(o.now, |(t, _)| t);
            if now_too {
                t = o.now;
            }
            if let Some(r) = read {
                t = t.max(r);
            }
            match prev {
                Some((p, c)) if p == t => (t, c),
                _ => (t, o.counters),
            }
        };
        let active = advance(self.last_active, busy);
        let output = advance(self.last_output, false);
        self.last_active = Some(active);
        self.last_output = Some(output);
        match self.daemon_stall {
            Some((since, busy_episode))
                if output.0 > since || (!busy_episode && active.0 > since) =>
            {
                self.daemon_stall = None;
                out.push(Transition::Recovered {
                    from: "daemon_stalled",
                    stalled_since: since,
                });
            }
            Some(_) => {}
            None => {
                if o.now - active.0 >= self.stall_after {
                    self.daemon_stall = Some((active.0, false));
                    out.push(Transition::DaemonStalled {
                        quiet_since: active.0,
                        busy: false,
                        then: active.1,
                    });
                } else if o.now - output.0 >= self.busy_stall_after {
                    self.daemon_stall = Some((output.0, true));
                    out.push(Transition::DaemonStalled {
                        quiet_since: output.0,
                        busy: true,
                        then: output.1,
                    });
                }
            }
        }
    }

    fn observe_progress(&mut self, o: &Observation, out: &mut Vec<Transition>) {
        let running = o
            .progress
            .as_ref()
            .filter(|p| p.status.as_deref().is_none_or(|s| s == "running"));
        if let Some((node, advanced_at)) = self.progress_stall.clone() {
            let still = running.is_some_and(|p| p.node_id == node && p.advanced_at <= advanced_at);
            if !still {
                self.progress_stall = None;
                out.push(Transition::Recovered {
                    from: "progress_stalled",
                    stalled_since: advanced_at,
                });
            }
            return;
        }
        let Some(p) = running else { return };
        let logs_keep_coming = o
            .last_read_at
            .is_some_and(|r| r > p.advanced_at && o.now - r < self.stall_after);
        if logs_keep_coming && o.now - p.advanced_at >= self.stall_after {
            self.progress_stall = Some((p.node_id.clone(), p.advanced_at));
            out.push(Transition::ProgressStalled {
                node_id: p.node_id.clone(),
                since: p.advanced_at,
            });
        }
    }

    /// Whether a daemon stall episode is open.
    pub fn daemon_stalled(&self) -> bool {
        self.daemon_stall.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0)
            .single()
            .expect("valid test time")
    }

    /// One step of a scenario: time, alive, cpu, last read, progress (node, advanced_at),
    /// and the transitions expected.
    struct Step {
        at: i64,
        alive: Option<bool>,
        cpu: Option<f64>,
        read: Option<i64>,
        progress: Option<(&'static str, i64)>,
        expect: Vec<Transition>,
    }

    fn step(at: i64, alive: bool, cpu: f64, read: Option<i64>, expect: Vec<Transition>) -> Step {
        Step {
            at,
            alive: Some(alive),
            cpu: Some(cpu),
            read,
            progress: None,
            expect,
        }
    }

    /// Runs a scenario with `stall_after` = 60 s and a CPU threshold of 2 %.
    fn check(name: &str, steps: Vec<Step>) {
        let mut d = StallDetector::new(
            std::time::Duration::from_secs(60),
            std::time::Duration::from_secs(300),
            2.0,
        );
        for s in steps {
            let o = Observation {
                now: t(s.at),
                alive: s.alive,
                cpu_percent: s.cpu,
                last_read_at: s.read.map(t),
                progress: s.progress.map(|(node, adv)| ProgressActivity {
                    experiment_id: None,
                    node_id: node.to_string(),
                    status: Some("running".into()),
                    percent: Some(10.0),
                    items_done: None,
                    advanced_at: t(adv),
                }),
                counters: None,
            };
            assert_eq!(d.observe(&o), s.expect, "{name}: at t={}", s.at);
        }
    }

    fn stalled(since: i64) -> Vec<Transition> {
        vec![Transition::DaemonStalled {
            quiet_since: t(since),
            busy: false,
            then: None,
        }]
    }

    fn busy_stalled(since: i64) -> Vec<Transition> {
        vec![Transition::DaemonStalled {
            quiet_since: t(since),
            busy: true,
            then: None,
        }]
    }

    fn recovered(from: &'static str, since: i64) -> Vec<Transition> {
        vec![Transition::Recovered {
            from,
            stalled_since: t(since),
        }]
    }

    #[test]
    fn daemon_stall_scenarios() {
        check(
            "silent and idle: one event per episode, recovered on a record",
            vec![
                step(0, true, 0.0, None, vec![]),
                step(30, true, 0.5, None, vec![]),
                step(60, true, 0.0, None, stalled(0)),
                step(90, true, 0.0, None, vec![]),
                step(120, true, 1.0, None, vec![]),
                step(150, true, 0.0, Some(140), recovered("daemon_stalled", 0)),
                step(180, true, 0.0, Some(140), vec![]),
                step(200, true, 0.0, Some(140), stalled(140)),
            ],
        );
        check(
            "CPU above the threshold is life",
            vec![
                step(0, true, 0.0, None, vec![]),
                step(50, true, 80.0, None, vec![]),
                step(100, true, 0.0, None, vec![]),
                step(110, true, 0.0, None, stalled(50)),
                step(120, true, 3.0, None, recovered("daemon_stalled", 50)),
            ],
        );
        check(
            "busy without output: a busy stall after busy_stall_after, ended only by output",
            vec![
                step(0, true, 95.0, Some(0), vec![]),
                step(120, true, 99.0, Some(0), vec![]),
                step(299, true, 99.0, Some(0), vec![]),
                step(300, true, 99.0, Some(0), busy_stalled(0)),
                step(330, true, 0.0, Some(0), vec![]),
                step(400, true, 0.0, Some(0), vec![]),
                step(410, true, 50.0, Some(405), recovered("daemon_stalled", 0)),
                step(500, true, 50.0, Some(405), vec![]),
            ],
        );
        check(
            "records keep it alive",
            vec![
                step(0, true, 0.0, Some(0), vec![]),
                step(50, true, 0.0, Some(45), vec![]),
                step(100, true, 0.0, Some(95), vec![]),
                step(150, true, 0.0, Some(149), vec![]),
            ],
        );
        check(
            "a dead daemon is not stalled and starts afresh",
            vec![
                step(0, true, 0.0, None, vec![]),
                step(60, true, 0.0, None, stalled(0)),
                step(70, false, 0.0, None, vec![]),
                step(80, true, 0.0, None, vec![]),
                step(130, true, 0.0, None, vec![]),
                step(140, true, 0.0, None, stalled(80)),
            ],
        );
        check(
            "unknown CPU is not life",
            vec![
                Step {
                    at: 0,
                    alive: Some(true),
                    cpu: None,
                    read: None,
                    progress: None,
                    expect: vec![],
                },
                Step {
                    at: 61,
                    alive: Some(true),
                    cpu: None,
                    read: None,
                    progress: None,
                    expect: stalled(0),
                },
            ],
        );
        check(
            "no process discovery: never a daemon stall",
            vec![
                Step {
                    at: 0,
                    alive: None,
                    cpu: None,
                    read: None,
                    progress: None,
                    expect: vec![],
                },
                Step {
                    at: 600,
                    alive: None,
                    cpu: None,
                    read: None,
                    progress: None,
                    expect: vec![],
                },
            ],
        );
    }

    fn prog(at: i64, read: i64, node: &'static str, adv: i64, expect: Vec<Transition>) -> Step {
        Step {
            at,
            alive: Some(true),
            cpu: Some(50.0),
            read: Some(read),
            progress: Some((node, adv)),
            expect,
        }
    }

    #[test]
    fn counters_come_from_the_last_moment_of_life() {
        let mut d = StallDetector::new(
            std::time::Duration::from_secs(60),
            std::time::Duration::from_secs(300),
            2.0,
        );
        let c = |cpu_ticks| Counters {
            cpu_ticks,
            ..Counters::default()
        };
        let mut o = |at, cpu, ticks| {
            d.observe(&Observation {
                now: t(at),
                alive: Some(true),
                cpu_percent: Some(cpu),
                last_read_at: None,
                progress: None,
                counters: Some(c(ticks)),
            })
        };
        assert_eq!(o(0, 0.0, 10), vec![]);
        assert_eq!(o(30, 50.0, 40), vec![]);
        assert_eq!(o(60, 0.0, 41), vec![]);
        assert_eq!(
            o(90, 0.0, 41),
            vec![Transition::DaemonStalled {
                quiet_since: t(30),
                busy: false,
                then: Some(c(40)),
            }]
        );
    }

    #[test]
    fn progress_stall_scenarios() {
        let pstalled = |node: &str, since| {
            vec![Transition::ProgressStalled {
                node_id: node.to_string(),
                since: t(since),
            }]
        };
        check(
            "logs keep coming but the node does not advance",
            vec![
                prog(0, 0, "tiles", 0, vec![]),
                prog(30, 29, "tiles", 0, vec![]),
                prog(60, 59, "tiles", 0, pstalled("tiles", 0)),
                prog(90, 89, "tiles", 0, vec![]),
                prog(120, 119, "tiles", 100, recovered("progress_stalled", 0)),
                prog(150, 149, "tiles", 100, vec![]),
                prog(160, 159, "tiles", 100, pstalled("tiles", 100)),
                prog(200, 199, "merge", 195, recovered("progress_stalled", 100)),
            ],
        );
        check(
            "silent logs: no progress stall (that is a daemon stall)",
            vec![
                prog(0, 0, "tiles", 0, vec![]),
                prog(100, 0, "tiles", 0, vec![]),
            ],
        );
    }
}
