//! Daemon lifecycle: which process is "the daemon" from one sample to the next, and the
//! `daemon_started` / `daemon_exited` / `daemon_restarted` transitions between them.
//!
//! A pure state machine: the caller says which root processes it found and whether the
//! previous one still lives; nothing here reads `/proc` or builds rows.

/// A process identity: a pid plus its start time, so a reused pid is a different process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcId {
    pub pid: u32,
    /// Start time after boot, in clock ticks.
    pub start_ticks: u64,
}

/// A lifecycle transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The first process seen for this daemon since the agent started.
    Started { pid: u32 },
    /// The process is gone.
    Exited { pid: u32 },
    /// A new process after an earlier one (which exited, or which the pid file no longer
    /// names).
    Restarted { pid: u32, previous_pid: u32 },
}

/// The per-daemon state.
#[derive(Debug, Clone, Default)]
pub struct Lifecycle {
    /// The process currently taken as the daemon.
    current: Option<ProcId>,
    /// The last process taken as the daemon, alive or not.
    last: Option<ProcId>,
}

impl Lifecycle {
    /// A daemon not seen yet.
    pub fn new() -> Lifecycle {
        Lifecycle::default()
    }

    /// The process currently taken as the daemon.
    pub fn current(&self) -> Option<ProcId> {
        self.current
    }

    /// Feeds the root processes found now (pid-file process, or topmost command-line
    /// matches; first = preferred) and whether the current process still runs (it may run
    /// without being a root any more, when the pid file names another).
    pub fn observe(&mut self, roots: &[ProcId], current_alive: bool) -> Vec<Change> {
        let mut out = Vec::new();
        if let Some(cur) = self.current {
            if roots.contains(&cur) {
                return out;
            }
            if !current_alive {
                out.push(Change::Exited { pid: cur.pid });
            }
            self.current = None;
        }
        if let Some(new) = roots.first().copied() {
            match self.last {
                Some(prev) if prev != new => out.push(Change::Restarted {
                    pid: new.pid,
                    previous_pid: prev.pid,
                }),
                Some(_) => {}
                None => out.push(Change::Started { pid: new.pid }),
            }
            self.current = Some(new);
            self.last = Some(new);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: u32) -> ProcId {
        ProcId {
            pid,
            start_ticks: u64::from(pid) * 10,
        }
    }

    /// Runs a scenario of (roots, current alive?, expected changes).
    fn check(name: &str, steps: &[(&[ProcId], bool, &[Change])]) {
        let mut l = Lifecycle::new();
        for (i, (roots, alive, expected)) in steps.iter().enumerate() {
            assert_eq!(
                l.observe(roots, *alive),
                expected.to_vec(),
                "{name}: step {i}"
            );
        }
    }

    #[test]
    fn scenarios() {
        use Change::*;
        check(
            "start, exit, restart under a new pid",
            &[
                (&[], false, &[]),
                (&[p(10)], true, &[Started { pid: 10 }]),
                (&[p(10)], true, &[]),
                (&[], false, &[Exited { pid: 10 }]),
                (&[], false, &[]),
                (
                    &[p(11)],
                    true,
                    &[Restarted {
                        pid: 11,
                        previous_pid: 10,
                    }],
                ),
            ],
        );
        check(
            "pid file switches to a new pid in one interval",
            &[
                (&[p(10)], true, &[Started { pid: 10 }]),
                (
                    &[p(20)],
                    false,
                    &[
                        Exited { pid: 10 },
                        Restarted {
                            pid: 20,
                            previous_pid: 10,
                        },
                    ],
                ),
            ],
        );
        check(
            "pid file names another live process while the old one still runs",
            &[
                (&[p(10)], true, &[Started { pid: 10 }]),
                (
                    &[p(20)],
                    true,
                    &[Restarted {
                        pid: 20,
                        previous_pid: 10,
                    }],
                ),
            ],
        );
        check(
            "a reused pid is a new process",
            &[
                (&[p(10)], true, &[Started { pid: 10 }]),
                (
                    &[ProcId {
                        pid: 10,
                        start_ticks: 999,
                    }],
                    false,
                    &[
                        Exited { pid: 10 },
                        Restarted {
                            pid: 10,
                            previous_pid: 10,
                        },
                    ],
                ),
            ],
        );
        check(
            "a second matching instance does not displace the current one",
            &[
                (&[p(10)], true, &[Started { pid: 10 }]),
                (&[p(5), p(10)], true, &[]),
                (
                    &[p(5)],
                    false,
                    &[
                        Exited { pid: 10 },
                        Restarted {
                            pid: 5,
                            previous_pid: 10,
                        },
                    ],
                ),
            ],
        );
    }
}
