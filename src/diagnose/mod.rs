//! "Why is it stuck?": a snapshot of a daemon's process tree — per thread its state, kernel
//! wait channel, the system call it is blocked in and what that descriptor is (file, FIFO,
//! pipe, socket and its peer); CPU over a short window; descriptors; children — judged into
//! a verdict (`verdict`), plus the optional stack dump (`stack`) and, for a daemon that is
//! gone, what is known of its end (`exit`).
//!
//! Used by the agent when a stall episode opens (stored in the `daemon_stalled` event) and by
//! `pipewatch why DAEMON`. Reads `/proc` only (and runs the configured stack dumper); never
//! signals or traces a process itself, never fails: what cannot be read is left out. The JSON
//! is bounded to [`MAX_DETAILS_BYTES`].

pub mod exit;
pub mod proc;
pub mod stack;
pub mod verdict;

use chrono::{DateTime, Utc};
use proc::{parse_epoll_targets, parse_stat, parse_status, parse_syscall, FdTarget, Io};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::time::Duration;
use verdict::{judge, ProcSnap, ThreadSnap, Verdict};

/// The most a diagnosis may take in an event's `details`.
pub const MAX_DETAILS_BYTES: usize = 64 * 1024;
/// Threads and descriptors read per process, children levels and children in all.
const MAX_THREADS: usize = 256;
const MAX_FDS: usize = 256;
const MAX_CHILD_DEPTH: usize = 3;
const MAX_CHILDREN: usize = 32;
/// Processes whose stacks are dumped (the root first).
const MAX_STACK_DUMPS: usize = 3;

/// How to take a snapshot.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// CPU is measured per thread over this window (zero: not measured).
    pub window: Duration,
    /// The process tree's CPU use measured elsewhere (the agent's last sample), used for
    /// the root when `window` is zero.
    pub cpu_percent: Option<f64>,
    /// The stack dumper's argv (`{pid}` not yet replaced), when configured.
    pub stack_dump: Option<Vec<String>>,
    /// What the agent knows about the silence, said in the verdict and stored.
    pub silence: Option<Silence>,
}

/// The silence the diagnosis explains (from the stall detector).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Silence {
    pub since: Option<DateTime<Utc>>,
    pub secs: f64,
    /// Whether the stall was a busy one (CPU kept up, no output).
    pub busy: bool,
    pub cpu_seconds: Option<f64>,
    pub read_bytes: Option<u64>,
    pub write_bytes: Option<u64>,
    pub rss_bytes_then: Option<u64>,
    pub rss_bytes_now: Option<u64>,
}

/// A taken diagnosis: the verdict and the snapshot it came from.
#[derive(Debug, Clone)]
pub struct Diagnosis {
    pub verdict: Verdict,
    pub snapshot: ProcSnap,
    pub json: Value,
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).ok().filter(|p| *p > 0).unwrap_or(4096)
}

/// The root and its descendants (bounded), each with its depth.
fn tree(root: u32, parents: &HashMap<u32, u32>) -> Vec<(u32, usize)> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (pid, pp) in parents {
        children.entry(*pp).or_default().push(*pid);
    }
    let mut out = vec![(root, 0)];
    let mut i = 0;
    while i < out.len() && out.len() <= MAX_CHILDREN {
        let (pid, depth) = out[i];
        i += 1;
        if depth >= MAX_CHILD_DEPTH {
            continue;
        }
        let mut kids = children.get(&pid).cloned().unwrap_or_default();
        kids.sort_unstable();
        for k in kids {
            if out.len() > MAX_CHILDREN {
                break;
            }
            out.push((k, depth + 1));
        }
    }
    out
}

/// CPU ticks of each thread of `pid`, and of the process.
fn cpu_ticks(pid: u32) -> (Option<u64>, HashMap<u32, u64>) {
    let process = proc::read(format!("/proc/{pid}/stat"))
        .and_then(|t| parse_stat(&t))
        .map(|s| s.cpu_ticks);
    let mut threads = HashMap::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in dir.flatten().take(MAX_THREADS) {
            let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(s) =
                proc::read(format!("/proc/{pid}/task/{tid}/stat")).and_then(|t| parse_stat(&t))
            {
                threads.insert(tid, s.cpu_ticks);
            }
        }
    }
    (process, threads)
}

type Ticks = HashMap<u32, (Option<u64>, HashMap<u32, u64>)>;

fn read_process(
    pid: u32,
    before: &Ticks,
    window: f64,
    sockets: &HashMap<u64, proc::Socket>,
) -> Option<ProcSnap> {
    let stat = parse_stat(&proc::read(format!("/proc/{pid}/stat"))?)?;
    let status = proc::read(format!("/proc/{pid}/status"))
        .map(|t| parse_status(&t))
        .unwrap_or_default();
    let cmdline = proc::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            c.split('\0')
                .filter(|w| !w.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let tps = ticks_per_sec();
    let pct = |b: Option<u64>, a: u64| {
        (window > 0.0)
            .then_some(())
            .and(b)
            .map(|b| (a.saturating_sub(b) as f64 / tps / window * 100.0 * 10.0).round() / 10.0)
    };
    let (proc_before, thread_before) = before
        .get(&pid)
        .map(|(p, t)| (*p, t.clone()))
        .unwrap_or_default();
    let mut threads = Vec::new();
    let mut thread_total = 0;
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        let mut tids: Vec<u32> = dir
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        tids.sort_unstable();
        thread_total = tids.len();
        for tid in tids.into_iter().take(MAX_THREADS) {
            let base = format!("/proc/{pid}/task/{tid}");
            let Some(ts) = proc::read(format!("{base}/stat")).and_then(|t| parse_stat(&t)) else {
                continue;
            };
            threads.push(ThreadSnap {
                tid,
                name: ts.comm.clone(),
                state: ts.state,
                wchan: proc::read(format!("{base}/wchan")).map(|w| w.trim().to_string()),
                syscall: proc::read(format!("{base}/syscall")).and_then(|t| parse_syscall(&t)),
                cpu_percent: pct(thread_before.get(&tid).copied(), ts.cpu_ticks),
            });
        }
    }
    let (fds, fd_total) = proc::read_fds(pid, MAX_FDS);
    let mut epoll = HashMap::new();
    for (fd, t) in fds
        .iter()
        .filter(|(_, t)| *t == FdTarget::Anon("eventpoll".into()))
        .take(8)
    {
        let _ = t;
        if let Some(info) = proc::read(format!("/proc/{pid}/fdinfo/{fd}")) {
            epoll.insert(*fd, parse_epoll_targets(&info));
        }
    }
    Some(ProcSnap {
        pid,
        comm: stat.comm.clone(),
        cmdline,
        state: stat.state,
        tracer_pid: status.tracer_pid,
        exit_code: stat.exit_code,
        thread_total: thread_total.max(threads.len()),
        threads,
        fds,
        fd_total,
        epoll,
        sockets: sockets.clone(),
        cpu_percent: pct(proc_before, stat.cpu_ticks),
        rss_bytes: Some(stat.rss_pages.saturating_mul(page_size())),
        children: Vec::new(),
        busy_throughout: false,
    })
}

/// Reads the storage I/O counters of `pid`.
pub fn read_io(pid: u32) -> Option<Io> {
    proc::read(format!("/proc/{pid}/io")).and_then(|t| proc::parse_io(&t))
}

/// Takes a diagnosis of `root` and its children; `None` when the process is gone.
pub fn take(root: u32, opts: &Options) -> Option<Diagnosis> {
    let parents = proc::read_parents();
    let members = tree(root, &parents);
    let mut before: Ticks = HashMap::new();
    if !opts.window.is_zero() {
        for (pid, _) in &members {
            before.insert(*pid, cpu_ticks(*pid));
        }
        std::thread::sleep(opts.window);
    }
    let window = opts.window.as_secs_f64();
    let sockets = proc::read_sockets(root);
    let mut snaps: HashMap<u32, ProcSnap> = HashMap::new();
    for (pid, _) in &members {
        // Sockets are read once, from the root's network namespace; a child elsewhere shows
        // its sockets by inode only.
        if let Some(mut s) = read_process(*pid, &before, window, &sockets) {
            if *pid != root {
                s.sockets.clear();
            }
            snaps.insert(*pid, s);
        }
    }
    // Children need the sockets to be judged: give each child the root's table while
    // judging, then assemble the tree deepest first.
    for s in snaps.values_mut() {
        if s.sockets.is_empty() {
            s.sockets = sockets.clone();
        }
    }
    let mut ordered: Vec<(u32, usize)> = members.clone();
    ordered.sort_by_key(|(_, d)| std::cmp::Reverse(*d));
    for (pid, _) in &ordered {
        let Some(parent) = parents.get(pid).copied() else {
            continue;
        };
        if *pid == root || !snaps.contains_key(&parent) {
            continue;
        }
        if let Some(child) = snaps.remove(pid) {
            if let Some(p) = snaps.get_mut(&parent) {
                p.children.push(child);
                p.children.sort_by_key(|c| c.pid);
            }
        }
    }
    let mut snapshot = snaps.remove(&root)?;
    if opts.window.is_zero() {
        snapshot.cpu_percent = opts.cpu_percent;
    }
    if let Some(s) = opts.silence.as_ref().filter(|s| s.busy) {
        snapshot.busy_throughout = true;
        // Over the whole silence, CPU says more than the last sample.
        if let Some(c) = s.cpu_seconds.filter(|_| s.secs > 0.0) {
            snapshot.cpu_percent = Some((c / s.secs * 1000.0).round() / 10.0);
        }
    }
    let silent = opts.silence.as_ref().filter(|s| s.secs > 0.0).map(|s| {
        humantime::format_duration(Duration::from_secs(s.secs.round() as u64)).to_string()
    });
    let verdict = judge(&snapshot, silent.as_deref());
    let mut json = to_json(&snapshot, &verdict, opts);
    if let Some(argv) = &opts.stack_dump {
        let mut stacks = Vec::new();
        let mut pids = vec![snapshot.pid];
        collect_pids(&snapshot, &mut pids);
        for pid in pids.into_iter().take(MAX_STACK_DUMPS) {
            stacks.push(match stack::dump(argv, pid) {
                Ok(o) => json!({
                    "pid": pid,
                    "output": o.text,
                    "truncated": o.truncated,
                    "timed_out": o.timed_out,
                    "exit_code": o.code,
                }),
                Err(e) => json!({ "pid": pid, "error": e }),
            });
        }
        json["stacks"] = Value::Array(stacks);
    }
    bound(&mut json);
    Some(Diagnosis {
        verdict,
        snapshot,
        json,
    })
}

fn collect_pids(p: &ProcSnap, out: &mut Vec<u32>) {
    for c in &p.children {
        out.push(c.pid);
        collect_pids(c, out);
    }
}

fn fd_text(p: &ProcSnap, fd: i32) -> String {
    verdict::describe_fd(p, fd).0
}

fn proc_json(p: &ProcSnap) -> Value {
    let threads: Vec<Value> = p
        .threads
        .iter()
        .map(|t| {
            let mut o = Map::new();
            o.insert("tid".into(), json!(t.tid));
            o.insert("name".into(), json!(t.name));
            o.insert("state".into(), json!(t.state.to_string()));
            if let Some(w) = t.wchan.as_deref().filter(|w| !w.is_empty() && *w != "0") {
                o.insert("wchan".into(), json!(w));
            }
            match &t.syscall {
                Some(proc::SyscallState::Running) => {
                    o.insert("syscall".into(), json!("running"));
                }
                Some(proc::SyscallState::Outside) => {
                    o.insert("syscall".into(), json!("none"));
                }
                Some(proc::SyscallState::In { nr, args }) => {
                    o.insert("syscall".into(), json!(verdict::syscall_name(*nr)));
                    let (_, call) = verdict::syscall(*nr);
                    use verdict::Call;
                    if matches!(
                        call,
                        Call::Read | Call::Write | Call::Connect | Call::Accept | Call::FileLock
                    ) || matches!(call, Call::Poll { epoll: true, .. })
                    {
                        if let Ok(fd) = i32::try_from(args[0]) {
                            o.insert("fd".into(), json!(fd));
                            o.insert("fd_target".into(), json!(fd_text(p, fd)));
                        }
                    }
                }
                None => {}
            }
            if let Some(c) = t.cpu_percent {
                o.insert("cpu_percent".into(), json!(c));
            }
            Value::Object(o)
        })
        .collect();
    let fds: Vec<Value> = p
        .fds
        .iter()
        .map(|(fd, _)| json!({ "fd": fd, "target": fd_text(p, *fd) }))
        .collect();
    let children: Vec<Value> = p
        .children
        .iter()
        .map(|c| {
            let mut cj = proc_json(c);
            let v = judge(c, None);
            cj["kind"] = json!(v.kind.as_str());
            cj["verdict"] = json!(v.verdict);
            cj
        })
        .collect();
    json!({
        "pid": p.pid,
        "command": p.cmdline,
        "name": p.comm,
        "state": p.state.to_string(),
        "cpu_percent": p.cpu_percent,
        "rss_bytes": p.rss_bytes,
        "threads": threads,
        "thread_total": p.thread_total.max(p.threads.len()),
        "fds": fds,
        "fd_total": p.fd_total,
        "children": children,
    })
}

fn to_json(p: &ProcSnap, v: &Verdict, opts: &Options) -> Value {
    let mut o = Map::new();
    o.insert("kind".into(), json!(v.kind.as_str()));
    o.insert("verdict".into(), json!(v.verdict));
    if let Some(t) = &v.target {
        o.insert("target".into(), json!(t));
    }
    if let Some(t) = v.tid {
        o.insert("tid".into(), json!(t));
    }
    o.insert(
        "taken_at".into(),
        json!(Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
    );
    o.insert("cpu_window_secs".into(), json!(opts.window.as_secs_f64()));
    if let Some(s) = &opts.silence {
        let trend = match (s.rss_bytes_then, s.rss_bytes_now) {
            (Some(a), Some(b)) if b > a + a / 20 => Some("growing"),
            (Some(a), Some(b)) if a > b + b / 20 => Some("shrinking"),
            (Some(_), Some(_)) => Some("steady"),
            _ => None,
        };
        o.insert(
            "silence".into(),
            json!({
                "since": s.since.map(|t| t.to_rfc3339()),
                "secs": (s.secs * 10.0).round() / 10.0,
                "busy": s.busy,
                "cpu_seconds": s.cpu_seconds.map(|c| (c * 100.0).round() / 100.0),
                "cpu_percent": s.cpu_seconds.filter(|_| s.secs > 0.0).map(|c| (c / s.secs * 1000.0).round() / 10.0),
                "read_bytes": s.read_bytes,
                "write_bytes": s.write_bytes,
                "rss_bytes_then": s.rss_bytes_then,
                "rss_bytes_now": s.rss_bytes_now,
                "rss_trend": trend,
            }),
        );
    }
    o.insert("process".into(), proc_json(p));
    Value::Object(o)
}

/// Cuts the JSON down to [`MAX_DETAILS_BYTES`]: stack output first, then descriptor and
/// thread lists, then children, then the process detail itself; says so in `truncated`.
pub fn bound(v: &mut Value) {
    let size = |v: &Value| serde_json::to_string(v).map_or(0, |s| s.len());
    if size(v) <= MAX_DETAILS_BYTES {
        return;
    }
    v["truncated"] = json!(true);
    if let Some(stacks) = v.get_mut("stacks").and_then(Value::as_array_mut) {
        for s in stacks.iter_mut() {
            if let Some(text) = s.get("output").and_then(Value::as_str) {
                let cut: String = text.chars().take(4096).collect();
                s["output"] = json!(cut);
            }
        }
    }
    for limit in [64usize, 16, 4] {
        if size(v) <= MAX_DETAILS_BYTES {
            return;
        }
        shrink_lists(&mut v["process"], limit);
    }
    if size(v) > MAX_DETAILS_BYTES {
        if let Some(o) = v.as_object_mut() {
            o.remove("stacks");
            o.insert("process".into(), json!({ "omitted": "too large" }));
        }
    }
}

fn shrink_lists(p: &mut Value, limit: usize) {
    for key in ["fds", "threads", "children"] {
        if let Some(a) = p.get_mut(key).and_then(Value::as_array_mut) {
            a.truncate(limit);
        }
    }
    if let Some(kids) = p.get_mut("children").and_then(Value::as_array_mut) {
        for k in kids {
            shrink_lists(k, limit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_keeps_details_under_the_limit() {
        let fds: Vec<Value> = (0..5000)
            .map(|i| json!({"fd": i, "target": format!("/very/long/path/number/{i:08}/data.parquet")}))
            .collect();
        let mut v = json!({
            "kind": "blocked_io",
            "verdict": "blocked",
            "stacks": [{"pid": 1, "output": "x".repeat(40_000)}],
            "process": {"pid": 1, "fds": fds, "threads": [], "children": []},
        });
        bound(&mut v);
        let n = serde_json::to_string(&v).unwrap().len();
        assert!(n <= MAX_DETAILS_BYTES, "{n}");
        assert_eq!(v["truncated"], true);
        assert_eq!(v["kind"], "blocked_io");
        assert_eq!(v["process"]["fds"].as_array().map(Vec::len), Some(64));
    }

    #[test]
    fn tree_is_bounded() {
        let mut parents = HashMap::new();
        for i in 2..200u32 {
            parents.insert(i, 1);
        }
        parents.insert(1000, 2);
        let t = tree(1, &parents);
        assert_eq!(t[0], (1, 0));
        assert!(t.len() <= MAX_CHILDREN + 1, "{}", t.len());
    }

    #[test]
    fn a_sleeping_child_is_diagnosed_live() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep runs");
        // Wait until it sleeps in the kernel.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut d = None;
        while std::time::Instant::now() < deadline {
            d = take(child.id(), &Options::default());
            if d.as_ref()
                .is_some_and(|d| d.verdict.kind == verdict::Kind::Sleeping)
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        let d = d.expect("diagnosed");
        assert_eq!(d.verdict.kind, verdict::Kind::Sleeping, "{:?}", d.verdict);
        assert_eq!(d.json["process"]["pid"], child.id());
        assert_eq!(d.json["kind"], "sleeping");
    }
}
