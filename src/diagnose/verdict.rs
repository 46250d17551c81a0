//! From a snapshot of a process tree to a verdict: a machine-readable `kind` and one line in
//! plain words naming what the daemon waits on. Pure: the snapshot types live here, filled by
//! `diagnose::take` (the I/O) and judged here, so every verdict is unit-tested on made-up
//! snapshots.

use super::proc::{port_name, FdTarget, Socket, SyscallState};
use serde::Serialize;
use std::collections::HashMap;

/// The verdict kinds (CONTRACT.md §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    BusyLoop,
    BlockedIo,
    WaitingNetwork,
    WaitingLock,
    WaitingChild,
    Sleeping,
    Stopped,
    Zombie,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::BusyLoop => "busy_loop",
            Kind::BlockedIo => "blocked_io",
            Kind::WaitingNetwork => "waiting_network",
            Kind::WaitingLock => "waiting_lock",
            Kind::WaitingChild => "waiting_child",
            Kind::Sleeping => "sleeping",
            Kind::Stopped => "stopped",
            Kind::Zombie => "zombie",
        }
    }
}

/// One thread as seen.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ThreadSnap {
    pub tid: u32,
    pub name: String,
    pub state: char,
    pub wchan: Option<String>,
    pub syscall: Option<SyscallState>,
    /// CPU use over the sampling window (100 = one core).
    pub cpu_percent: Option<f64>,
}

/// One process as seen, with its children.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProcSnap {
    pub pid: u32,
    pub comm: String,
    pub cmdline: String,
    pub state: char,
    /// Set when a debugger or tracer is attached.
    pub tracer_pid: Option<u32>,
    pub exit_code: Option<i32>,
    /// The threads read (bounded), and how many there are in all.
    pub threads: Vec<ThreadSnap>,
    pub thread_total: usize,
    /// The descriptors read (bounded), and how many there are in all.
    pub fds: Vec<(i32, FdTarget)>,
    pub fd_total: usize,
    /// For each epoll descriptor, the descriptors it watches.
    pub epoll: HashMap<i32, Vec<i32>>,
    /// The sockets of its network namespace, by inode.
    pub sockets: HashMap<u64, Socket>,
    /// CPU use of the whole process over the sampling window (100 = one core).
    pub cpu_percent: Option<f64>,
    pub rss_bytes: Option<u64>,
    pub children: Vec<ProcSnap>,
    /// The agent saw it above its CPU threshold for the whole silence (a busy stall): a busy
    /// loop whatever one short look at its threads shows.
    pub busy_throughout: bool,
}

/// The verdict: kind, a plain-words line, and what it names.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub kind: Kind,
    pub verdict: String,
    /// The thread the verdict is about, when one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tid: Option<u32>,
    /// The descriptor, peer, file or child it names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// CPU (100 = one core) at or above which a process counts as spinning.
pub const BUSY_CPU_PERCENT: f64 = 50.0;

/// What a system call means for a blocked thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// Reading or receiving on the descriptor in the first argument.
    Read,
    /// Writing or sending on it.
    Write,
    Connect,
    Accept,
    /// poll/select/epoll: waiting on several descriptors (the epoll one is the first
    /// argument of `epoll_wait`).
    Poll {
        epoll: bool,
        nfds_arg: Option<usize>,
    },
    Futex,
    /// `flock` or `fcntl(F_SETLKW)` on the first argument.
    FileLock,
    WaitChild,
    Sleep,
    Open,
    Other,
}

/// A system call's name and meaning on this architecture.
pub fn syscall(nr: i64) -> (&'static str, Call) {
    #[cfg(target_arch = "x86_64")]
    let t: (&str, Call) = match nr {
        0 => ("read", Call::Read),
        1 => ("write", Call::Write),
        2 => ("open", Call::Open),
        7 => (
            "poll",
            Call::Poll {
                epoll: false,
                nfds_arg: Some(1),
            },
        ),
        17 => ("pread64", Call::Read),
        18 => ("pwrite64", Call::Write),
        19 => ("readv", Call::Read),
        20 => ("writev", Call::Write),
        23 => (
            "select",
            Call::Poll {
                epoll: false,
                nfds_arg: Some(0),
            },
        ),
        34 => ("pause", Call::Sleep),
        35 => ("nanosleep", Call::Sleep),
        42 => ("connect", Call::Connect),
        43 => ("accept", Call::Accept),
        44 => ("sendto", Call::Write),
        45 => ("recvfrom", Call::Read),
        46 => ("sendmsg", Call::Write),
        47 => ("recvmsg", Call::Read),
        61 => ("wait4", Call::WaitChild),
        72 => ("fcntl", Call::FileLock),
        73 => ("flock", Call::FileLock),
        128 => ("rt_sigtimedwait", Call::Sleep),
        130 => ("rt_sigsuspend", Call::Sleep),
        202 => ("futex", Call::Futex),
        230 => ("clock_nanosleep", Call::Sleep),
        232 => (
            "epoll_wait",
            Call::Poll {
                epoll: true,
                nfds_arg: None,
            },
        ),
        247 => ("waitid", Call::WaitChild),
        257 => ("openat", Call::Open),
        270 => (
            "pselect6",
            Call::Poll {
                epoll: false,
                nfds_arg: Some(0),
            },
        ),
        271 => (
            "ppoll",
            Call::Poll {
                epoll: false,
                nfds_arg: Some(1),
            },
        ),
        281 => (
            "epoll_pwait",
            Call::Poll {
                epoll: true,
                nfds_arg: None,
            },
        ),
        288 => ("accept4", Call::Accept),
        295 => ("preadv", Call::Read),
        296 => ("pwritev", Call::Write),
        299 => ("recvmmsg", Call::Read),
        307 => ("sendmmsg", Call::Write),
        437 => ("openat2", Call::Open),
        441 => (
            "epoll_pwait2",
            Call::Poll {
                epoll: true,
                nfds_arg: None,
            },
        ),
        449 => ("futex_waitv", Call::Futex),
        _ => ("", Call::Other),
    };
    #[cfg(target_arch = "aarch64")]
    let t: (&str, Call) = match nr {
        22 => (
            "epoll_pwait",
            Call::Poll {
                epoll: true,
                nfds_arg: None,
            },
        ),
        25 => ("fcntl", Call::FileLock),
        32 => ("flock", Call::FileLock),
        56 => ("openat", Call::Open),
        63 => ("read", Call::Read),
        64 => ("write", Call::Write),
        65 => ("readv", Call::Read),
        66 => ("writev", Call::Write),
        67 => ("pread64", Call::Read),
        68 => ("pwrite64", Call::Write),
        72 => (
            "pselect6",
            Call::Poll {
                epoll: false,
                nfds_arg: Some(0),
            },
        ),
        73 => (
            "ppoll",
            Call::Poll {
                epoll: false,
                nfds_arg: Some(1),
            },
        ),
        95 => ("waitid", Call::WaitChild),
        98 => ("futex", Call::Futex),
        101 => ("nanosleep", Call::Sleep),
        115 => ("clock_nanosleep", Call::Sleep),
        133 => ("rt_sigsuspend", Call::Sleep),
        137 => ("rt_sigtimedwait", Call::Sleep),
        202 => ("accept", Call::Accept),
        203 => ("connect", Call::Connect),
        206 => ("sendto", Call::Write),
        207 => ("recvfrom", Call::Read),
        211 => ("sendmsg", Call::Write),
        212 => ("recvmsg", Call::Read),
        242 => ("accept4", Call::Accept),
        243 => ("recvmmsg", Call::Read),
        260 => ("wait4", Call::WaitChild),
        437 => ("openat2", Call::Open),
        441 => (
            "epoll_pwait2",
            Call::Poll {
                epoll: true,
                nfds_arg: None,
            },
        ),
        449 => ("futex_waitv", Call::Futex),
        _ => ("", Call::Other),
    };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let t: (&str, Call) = {
        let _ = nr;
        ("", Call::Other)
    };
    t
}

/// A syscall's name, or `syscall N` when this table does not know it.
pub fn syscall_name(nr: i64) -> String {
    match syscall(nr).0 {
        "" => format!("syscall {nr}"),
        n => n.to_string(),
    }
}

/// What one thread is waiting on, in order of how much it explains a hang.
#[derive(Debug, Clone, PartialEq)]
enum Wait {
    Zombie,
    Stopped,
    Disk(String),
    Network(String),
    File(String),
    Child,
    FileLock(String),
    Futex,
    Sleep(String),
    Running,
    Unknown(String),
}

/// Describes a descriptor: a file path, a FIFO, a pipe, or a socket with its peer.
pub fn describe_fd(p: &ProcSnap, fd: i32) -> (String, bool) {
    let Some((_, target)) = p.fds.iter().find(|(n, _)| *n == fd) else {
        return (format!("fd {fd}"), false);
    };
    match target {
        FdTarget::File { path, fifo: true } => (format!("FIFO {path} (fd {fd})"), false),
        FdTarget::File { path, .. } => (format!("{path} (fd {fd})"), false),
        FdTarget::Pipe { inode } => (format!("a pipe (fd {fd}, pipe:[{inode}])"), false),
        FdTarget::Anon(what) => (format!("{what} (fd {fd})"), false),
        FdTarget::Other(what) => (format!("{what} (fd {fd})"), false),
        FdTarget::Socket { inode } => match p.sockets.get(inode) {
            Some(s) => (describe_socket(s, fd), true),
            None => (format!("a socket (fd {fd}, socket:[{inode}])"), true),
        },
    }
}

/// `127.0.0.1:5432 (PostgreSQL), tcp ESTABLISHED from 127.0.0.1:40000 (fd 3)`.
fn describe_socket(s: &Socket, fd: i32) -> String {
    if s.proto == "unix" {
        let path = if s.local.is_empty() {
            "unnamed".to_string()
        } else {
            s.local.clone()
        };
        return format!("a unix socket {path}, {} (fd {fd})", s.state);
    }
    let service = s
        .remote_port
        .and_then(port_name)
        .map(|n| format!(" ({n})"))
        .unwrap_or_default();
    match (&s.remote, s.state) {
        (_, "LISTEN") => format!("{} listening, {} (fd {fd})", s.local, s.proto),
        (Some(r), state) if s.remote_port != Some(0) => {
            format!(
                "{r}{service}, {} {state} from {} (fd {fd})",
                s.proto, s.local
            )
        }
        _ => format!("{} {} {} (fd {fd})", s.proto, s.local, s.state),
    }
}

/// The peer named first in a socket description (`127.0.0.1:5432 (PostgreSQL)`).
fn peer_of(desc: &str) -> String {
    desc.split(',').next().unwrap_or(desc).to_string()
}

fn classify(p: &ProcSnap, t: &ThreadSnap) -> (Wait, Option<String>) {
    let wchan = t
        .wchan
        .as_deref()
        .filter(|w| !w.is_empty() && *w != "0")
        .map(|w| format!(" (kernel: {w})"))
        .unwrap_or_default();
    match t.state {
        'Z' | 'X' => return (Wait::Zombie, None),
        'T' | 't' => return (Wait::Stopped, None),
        'R' => return (Wait::Running, None),
        _ => {}
    }
    let Some(SyscallState::In { nr, args }) = &t.syscall else {
        if t.state == 'D' {
            return (Wait::Disk(format!("in the kernel{wchan}")), None);
        }
        return (Wait::Unknown(wchan), None);
    };
    let (name, call) = syscall(*nr);
    let name = if name.is_empty() {
        format!("syscall {nr}")
    } else {
        name.to_string()
    };
    let fd = i32::try_from(args[0]).unwrap_or(-1);
    let (wait, target) = match call {
        Call::Read | Call::Write | Call::Connect | Call::Accept => {
            let (desc, socket) = describe_fd(p, fd);
            let verb = match call {
                Call::Read => "reading from",
                Call::Write => "writing to",
                Call::Connect => "connecting to",
                _ => "waiting for a connection on",
            };
            let line = format!("{verb} {desc} in {name}{wchan}");
            if t.state == 'D' {
                (Wait::Disk(line), Some(desc))
            } else if socket {
                (Wait::Network(line), Some(peer_of(&desc)))
            } else {
                (Wait::File(line), Some(desc))
            }
        }
        Call::Poll { epoll, nfds_arg } => {
            let watched: Vec<i32> = if epoll {
                p.epoll.get(&fd).cloned().unwrap_or_default()
            } else {
                Vec::new()
            };
            let none = nfds_arg.is_some_and(|i| args[i] == 0) || (epoll && watched.is_empty());
            // The fds of poll/select live in the process's memory: name its sockets instead.
            let candidates: Vec<i32> = if epoll {
                watched
            } else {
                p.fds.iter().map(|(n, _)| *n).collect()
            };
            let peers: Vec<String> = candidates
                .iter()
                .filter_map(|n| {
                    let (desc, socket) = describe_fd(p, *n);
                    let useful = socket && !desc.contains(" listening") && desc.contains(':');
                    useful.then_some(desc)
                })
                .take(4)
                .collect();
            if !none && !peers.is_empty() {
                let line = format!("waiting in {name} on {}{wchan}", peers.join("; "));
                (Wait::Network(line), Some(peer_of(&peers[0])))
            } else {
                (
                    Wait::Sleep(format!("waiting in {name} with nothing to wait on{wchan}")),
                    None,
                )
            }
        }
        Call::Futex => (Wait::Futex, None),
        Call::FileLock if name == "flock" || args[1] == 7 || args[1] == 38 => {
            let (desc, _) = describe_fd(p, fd);
            (
                Wait::FileLock(format!("waiting for a lock on {desc} in {name}{wchan}")),
                Some(desc),
            )
        }
        Call::WaitChild => (Wait::Child, None),
        Call::Sleep => (Wait::Sleep(format!("sleeping in {name}")), None),
        Call::Open => {
            let what = if wchan.contains("fifo") || wchan.contains("pipe") {
                "opening a FIFO that has no writer yet"
            } else {
                "opening a file"
            };
            let line = format!("{what} in {name}{wchan}");
            if t.state == 'D' {
                (Wait::Disk(line), None)
            } else {
                (Wait::File(line), None)
            }
        }
        Call::FileLock | Call::Other => {
            let line = format!("in {name}{wchan}");
            if t.state == 'D' {
                (Wait::Disk(line), None)
            } else {
                (Wait::Unknown(line), None)
            }
        }
    };
    (wait, target)
}

fn thread_label(p: &ProcSnap, t: &ThreadSnap) -> String {
    if p.threads.len() <= 1 {
        format!("pid {}", p.pid)
    } else if t.tid == p.pid {
        format!("the main thread of pid {}", p.pid)
    } else {
        format!("thread {} (tid {})", t.name, t.tid)
    }
}

fn short_cmd(p: &ProcSnap) -> String {
    let c = if p.cmdline.is_empty() {
        &p.comm
    } else {
        &p.cmdline
    };
    let mut s: String = c.chars().take(60).collect();
    if c.chars().count() > 60 {
        s.push('…');
    }
    s
}

/// Judges a process tree. `silent_for` (e.g. "2m") is said in the line when known.
pub fn judge(p: &ProcSnap, silent_for: Option<&str>) -> Verdict {
    judge_depth(p, silent_for, 0)
}

fn judge_depth(p: &ProcSnap, silent_for: Option<&str>, depth: usize) -> Verdict {
    let quiet = silent_for
        .map(|s| format!(" — silent for {s}"))
        .unwrap_or_default();
    let v = |kind, verdict: String, tid, target| Verdict {
        kind,
        verdict,
        tid,
        target,
    };
    if matches!(p.state, 'Z' | 'X') {
        let code = p
            .exit_code
            .map(|c| format!(" ({})", super::exit::describe_status(c)))
            .unwrap_or_default();
        return v(
            Kind::Zombie,
            format!(
                "pid {} ({}) has exited{code} but its parent has not reaped it (zombie)",
                p.pid,
                short_cmd(p)
            ),
            None,
            None,
        );
    }
    if matches!(p.state, 'T' | 't')
        || p.threads.iter().all(|t| matches!(t.state, 'T' | 't')) && !p.threads.is_empty()
    {
        let by = match p.tracer_pid.filter(|t| *t != 0) {
            Some(tracer) => format!("stopped under a tracer or debugger (pid {tracer})"),
            None => "stopped by a signal (SIGSTOP/SIGTSTP); `kill -CONT` resumes it".to_string(),
        };
        return v(
            Kind::Stopped,
            format!("pid {} ({}) is {by}{quiet}", p.pid, short_cmd(p)),
            None,
            None,
        );
    }
    // Spinning: at least half a core, or a thread on a CPU right now with a share that a
    // loaded machine leaves it.
    let on_cpu = p
        .threads
        .iter()
        .any(|t| t.state == 'R' || t.syscall == Some(SyscallState::Running));
    let busy = |c: &f64| *c >= BUSY_CPU_PERCENT || (on_cpu && *c >= BUSY_CPU_PERCENT / 4.0);
    if let Some(cpu) = p
        .cpu_percent
        .filter(busy)
        .or_else(|| p.busy_throughout.then_some(p.cpu_percent.unwrap_or(0.0)))
    {
        let hot = p
            .threads
            .iter()
            .filter(|t| t.cpu_percent.is_some())
            .max_by(|a, b| {
                a.cpu_percent
                    .unwrap_or(0.0)
                    .total_cmp(&b.cpu_percent.unwrap_or(0.0))
            })
            .or_else(|| p.threads.iter().find(|t| t.state == 'R'));
        let (who, tid) = match hot {
            Some(t) => (thread_label(p, t), Some(t.tid)),
            None => (format!("pid {}", p.pid), None),
        };
        return v(
            Kind::BusyLoop,
            format!(
                "busy loop: {who} of {} spins at {cpu:.0}% CPU without writing a log line{quiet}",
                short_cmd(p)
            ),
            tid,
            None,
        );
    }
    let waits: Vec<(&ThreadSnap, Wait, Option<String>)> = p
        .threads
        .iter()
        .map(|t| {
            let (w, target) = classify(p, t);
            (t, w, target)
        })
        .collect();
    let first = |f: &dyn Fn(&Wait) -> Option<String>| {
        waits
            .iter()
            .find_map(|(t, w, target)| f(w).map(|line| (*t, line, target.clone())))
    };
    if let Some((t, line, target)) = first(&|w| match w {
        Wait::Disk(l) => Some(l.clone()),
        _ => None,
    }) {
        return v(
            Kind::BlockedIo,
            format!(
                "blocked in uninterruptible I/O (D state): {} {line}{quiet}",
                thread_label(p, t)
            ),
            Some(t.tid),
            target,
        );
    }
    if let Some((t, line, target)) = first(&|w| match w {
        Wait::Network(l) => Some(l.clone()),
        _ => None,
    }) {
        return v(
            Kind::WaitingNetwork,
            format!(
                "waiting on the network: {} is {line}{quiet}",
                thread_label(p, t)
            ),
            Some(t.tid),
            target,
        );
    }
    if let Some((t, line, target)) = first(&|w| match w {
        Wait::File(l) => Some(l.clone()),
        _ => None,
    }) {
        return v(
            Kind::BlockedIo,
            format!("blocked on I/O: {} is {line}{quiet}", thread_label(p, t)),
            Some(t.tid),
            target,
        );
    }
    if let Some((t, _, _)) = first(&|w| (*w == Wait::Child).then(String::new)) {
        let (child_line, target) = match p.children.first() {
            Some(c) if depth < 4 => {
                let cv = judge_depth(c, None, depth + 1);
                (
                    format!(" child pid {} ({}): {}", c.pid, short_cmd(c), cv.verdict),
                    Some(format!("pid {}", c.pid)),
                )
            }
            Some(c) => (
                format!(" child pid {}", c.pid),
                Some(format!("pid {}", c.pid)),
            ),
            None => (" a child (not found)".to_string(), None),
        };
        return v(
            Kind::WaitingChild,
            format!(
                "waiting for a child: {} waits for{child_line}{quiet}",
                thread_label(p, t)
            ),
            Some(t.tid),
            target,
        );
    }
    if let Some((t, line, target)) = first(&|w| match w {
        Wait::FileLock(l) => Some(l.clone()),
        _ => None,
    }) {
        return v(
            Kind::WaitingLock,
            format!(
                "waiting for a file lock: {} is {line}{quiet}",
                thread_label(p, t)
            ),
            Some(t.tid),
            target,
        );
    }
    let futex = waits.iter().filter(|(_, w, _)| *w == Wait::Futex).count();
    if futex > 0 && futex == waits.len() {
        let line = if futex >= 2 {
            format!(
                "waiting on locks: all {futex} threads of pid {} ({}) wait in futex — a likely deadlock{quiet}",
                p.pid,
                short_cmd(p)
            )
        } else {
            format!(
                "waiting on a lock: pid {} ({}) waits in futex and no other thread can release it{quiet}",
                p.pid,
                short_cmd(p)
            )
        };
        return v(Kind::WaitingLock, line, None, None);
    }
    let sleeping = first(&|w| match w {
        Wait::Sleep(l) => Some(l.clone()),
        _ => None,
    });
    let (tid, line) = match sleeping {
        Some((t, line, _)) => (Some(t.tid), format!("{} is {line}", thread_label(p, t))),
        None => {
            let what = waits
                .iter()
                .find_map(|(t, w, _)| match w {
                    Wait::Unknown(l) if !l.is_empty() => {
                        Some(format!("{} waits {}", thread_label(p, t), l.trim()))
                    }
                    _ => None,
                })
                .unwrap_or_else(|| format!("pid {} waits", p.pid));
            let blind = !p.threads.is_empty() && p.threads.iter().all(|t| t.syscall.is_none());
            let what = if blind {
                format!(
                    "{what} (its system calls and descriptors are not readable: pipewatch needs ptrace rights over it, see README \"Why is it stuck?\")"
                )
            } else {
                what
            };
            (None, what)
        }
    };
    v(
        Kind::Sleeping,
        format!("sleeping: {line}, using no CPU{quiet}"),
        tid,
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread(tid: u32, state: char, nr: i64, a0: u64) -> ThreadSnap {
        ThreadSnap {
            tid,
            name: format!("t{tid}"),
            state,
            wchan: None,
            syscall: Some(SyscallState::In {
                nr,
                args: [a0, 0, 0, 0, 0, 0],
            }),
            cpu_percent: Some(0.0),
        }
    }

    impl ProcSnap {
        fn syscall_outside(&mut self) {
            for t in &mut self.threads {
                t.syscall = Some(SyscallState::Outside);
            }
        }
    }

    fn proc_with(threads: Vec<ThreadSnap>) -> ProcSnap {
        ProcSnap {
            pid: 100,
            comm: "python3".into(),
            cmdline: "python3 app.py".into(),
            state: 'S',
            threads,
            ..ProcSnap::default()
        }
    }

    /// Checks kind, target and a piece of the line.
    fn check(name: &str, p: &ProcSnap, kind: Kind, target: Option<&str>, says: &str) {
        let v = judge(p, Some("2m"));
        assert_eq!(v.kind, kind, "{name}: {v:?}");
        assert_eq!(v.target.as_deref(), target, "{name}: {v:?}");
        assert!(
            v.verdict.contains(says),
            "{name}: {:?} lacks {says:?}",
            v.verdict
        );
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn verdicts() {
        let mut net = proc_with(vec![thread(100, 'S', 45, 3)]);
        net.fds = vec![(3, FdTarget::Socket { inode: 9 })];
        net.sockets.insert(
            9,
            Socket {
                proto: "tcp",
                local: "127.0.0.1:40000".into(),
                remote: Some("10.0.0.5:5432".into()),
                remote_port: Some(5432),
                state: "ESTABLISHED",
                rx_queue: 0,
            },
        );
        check(
            "recv on a TCP socket",
            &net,
            Kind::WaitingNetwork,
            Some("10.0.0.5:5432 (PostgreSQL)"),
            "reading from 10.0.0.5:5432 (PostgreSQL), tcp ESTABLISHED from 127.0.0.1:40000 (fd 3) in recvfrom",
        );
        let mut epoll = proc_with(vec![thread(100, 'S', 232, 4)]);
        epoll.fds = net.fds.clone();
        epoll.fds.push((4, FdTarget::Anon("eventpoll".into())));
        epoll.sockets = net.sockets.clone();
        epoll.epoll.insert(4, vec![3]);
        check(
            "epoll on a socket",
            &epoll,
            Kind::WaitingNetwork,
            Some("10.0.0.5:5432 (PostgreSQL)"),
            "waiting in epoll_wait on 10.0.0.5:5432",
        );
        epoll.epoll.insert(4, vec![]);
        check(
            "epoll on nothing",
            &epoll,
            Kind::Sleeping,
            None,
            "nothing to wait on",
        );

        let mut fifo = proc_with(vec![thread(100, 'S', 0, 5)]);
        fifo.fds = vec![(
            5,
            FdTarget::File {
                path: "/tmp/in.fifo".into(),
                fifo: true,
            },
        )];
        check(
            "read from a FIFO",
            &fifo,
            Kind::BlockedIo,
            Some("FIFO /tmp/in.fifo (fd 5)"),
            "reading from FIFO /tmp/in.fifo (fd 5) in read",
        );
        let mut disk = proc_with(vec![thread(100, 'D', 0, 5)]);
        disk.fds = vec![(
            5,
            FdTarget::File {
                path: "/mnt/nfs/big.parquet".into(),
                fifo: false,
            },
        )];
        check(
            "D state",
            &disk,
            Kind::BlockedIo,
            Some("/mnt/nfs/big.parquet (fd 5)"),
            "uninterruptible",
        );

        let lock = proc_with(vec![
            thread(100, 'S', 202, 0),
            thread(101, 'S', 202, 0),
            thread(102, 'S', 202, 0),
        ]);
        check("deadlock", &lock, Kind::WaitingLock, None, "all 3 threads");
        let mixed = proc_with(vec![thread(100, 'S', 202, 0), thread(101, 'S', 230, 0)]);
        check(
            "lock + sleeper",
            &mixed,
            Kind::Sleeping,
            None,
            "clock_nanosleep",
        );

        let mut parent = proc_with(vec![thread(100, 'S', 61, u64::MAX)]);
        parent.children = vec![ProcSnap {
            pid: 200,
            comm: "sleep".into(),
            cmdline: "sleep 1000".into(),
            state: 'S',
            threads: vec![thread(200, 'S', 230, 0)],
            ..ProcSnap::default()
        }];
        check(
            "parent waits on a child",
            &parent,
            Kind::WaitingChild,
            Some("pid 200"),
            "child pid 200 (sleep 1000): sleeping",
        );

        let mut stopped = proc_with(vec![thread(100, 'T', 0, 0)]);
        stopped.state = 'T';
        check("SIGSTOP", &stopped, Kind::Stopped, None, "SIGSTOP");
        stopped.tracer_pid = Some(77);
        check(
            "traced",
            &stopped,
            Kind::Stopped,
            None,
            "tracer or debugger (pid 77)",
        );

        let mut zombie = proc_with(vec![]);
        zombie.state = 'Z';
        zombie.exit_code = Some(9);
        check(
            "zombie",
            &zombie,
            Kind::Zombie,
            None,
            "killed by signal 9 (SIGKILL)",
        );

        let mut busy = proc_with(vec![
            ThreadSnap {
                cpu_percent: Some(98.0),
                state: 'R',
                syscall: Some(SyscallState::Running),
                ..thread(101, 'R', 0, 0)
            },
            thread(100, 'S', 202, 0),
        ]);
        busy.cpu_percent = Some(99.0);
        check("busy", &busy, Kind::BusyLoop, None, "thread t101 (tid 101)");
        let mut starved = proc_with(vec![thread(100, 'S', 0, 0)]);
        starved.syscall_outside();
        starved.cpu_percent = Some(20.0);
        check(
            "starved, not known busy",
            &starved,
            Kind::Sleeping,
            None,
            "",
        );
        starved.busy_throughout = true;
        check(
            "starved busy stall",
            &starved,
            Kind::BusyLoop,
            None,
            "spins at 20% CPU",
        );
        assert_eq!(judge(&busy, None).tid, Some(101));

        let sleeper = proc_with(vec![thread(100, 'S', 230, 0)]);
        check(
            "sleep",
            &sleeper,
            Kind::Sleeping,
            None,
            "sleeping in clock_nanosleep",
        );
        let mut blind = proc_with(vec![thread(100, 'S', 0, 0)]);
        blind.threads[0].syscall = None;
        check(
            "no ptrace rights",
            &blind,
            Kind::Sleeping,
            None,
            "needs ptrace rights",
        );
        let select0 = proc_with(vec![thread(100, 'S', 23, 0)]);
        check(
            "select(0)",
            &select0,
            Kind::Sleeping,
            None,
            "nothing to wait on",
        );
    }
}
