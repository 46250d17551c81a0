//! Why a daemon is gone: its wait status (readable while it is a zombie), an OOM kill found in
//! the kernel log (`/dev/kmsg`, else `dmesg`), and telling lines among the last it wrote. The
//! agent usually is not the daemon's parent and cannot reap it: this says what is known, and
//! says nothing rather than guess.

use serde_json::{json, Value};
use std::io::Read;
use std::time::Duration;

/// Signal names for the common signals (Linux numbering).
pub fn signal_name(sig: i32) -> Option<&'static str> {
    Some(match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        10 => "SIGUSR1",
        11 => "SIGSEGV",
        12 => "SIGUSR2",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        24 => "SIGXCPU",
        25 => "SIGXFSZ",
        31 => "SIGSYS",
        _ => return None,
    })
}

/// A `waitpid` status split into exit code or signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub core_dumped: bool,
}

/// Splits a `waitpid` status (`/proc/PID/stat` field 52 of a zombie).
pub fn split_status(status: i32) -> ExitStatus {
    let sig = status & 0x7f;
    if sig == 0 {
        ExitStatus {
            code: Some((status >> 8) & 0xff),
            signal: None,
            core_dumped: false,
        }
    } else {
        ExitStatus {
            code: None,
            signal: Some(sig),
            core_dumped: status & 0x80 != 0,
        }
    }
}

/// `exit code 3`, `killed by signal 9 (SIGKILL)`, `… (core dumped)`.
pub fn describe_status(status: i32) -> String {
    let s = split_status(status);
    match (s.code, s.signal) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => {
            let name = signal_name(sig)
                .map(|n| format!(" ({n})"))
                .unwrap_or_default();
            let core = if s.core_dumped { ", core dumped" } else { "" };
            format!("killed by signal {sig}{name}{core}")
        }
        _ => "unknown status".into(),
    }
}

/// The kernel's OOM-kill line for `pid` among kernel log lines, if any.
pub fn find_oom_kill<'a>(lines: impl Iterator<Item = &'a str>, pid: u32) -> Option<String> {
    let needle = format!("Killed process {pid} (");
    let needle2 = format!(",pid={pid},");
    let mut found = None;
    for l in lines {
        if l.contains(&needle) || (l.contains("oom-kill:") && l.contains(&needle2)) {
            // The `Killed process` line says the most; keep the last match.
            if l.contains(&needle) || found.is_none() {
                found = Some(strip_kmsg_prefix(l).to_string());
            }
        }
    }
    found
}

/// `6,1234,5678,-;Out of memory…` → `Out of memory…` (dmesg lines pass unchanged).
fn strip_kmsg_prefix(l: &str) -> &str {
    match l.split_once(';') {
        Some((head, rest)) if head.split(',').count() >= 3 => rest,
        _ => l,
    }
}

/// Lines that say why a process died, among the last it wrote.
pub fn telling_lines(last_lines: &[String]) -> Vec<String> {
    const SIGNS: [&str; 8] = [
        "MemoryError",
        "Killed",
        "Out of memory",
        "out of memory",
        "Segmentation fault",
        "core dumped",
        "Traceback",
        "panicked",
    ];
    last_lines
        .iter()
        .filter(|l| SIGNS.iter().any(|s| l.contains(s)))
        .cloned()
        .collect()
}

/// Reads the kernel log: `/dev/kmsg` (non-blocking, bounded), else `dmesg` with a timeout.
/// Empty when neither is readable (an unprivileged agent).
pub fn kernel_log() -> Vec<String> {
    const MAX_BYTES: usize = 8 << 20;
    let mut lines = Vec::new();
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags_nonblock()
        .open("/dev/kmsg")
    {
        let mut buf = vec![0u8; 8192];
        let mut total = 0usize;
        // Each read returns one record; EAGAIN at the end, EPIPE when a record was overwritten
        // (skip it and go on).
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    total += n;
                    lines.push(String::from_utf8_lossy(&buf[..n]).trim_end().to_string());
                    if total > MAX_BYTES {
                        break;
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(_) => break,
            }
        }
        if !lines.is_empty() {
            return lines;
        }
    }
    match super::stack::run_bounded(&["dmesg".to_string()], Duration::from_secs(3), MAX_BYTES) {
        Ok(out) => out.text.lines().map(str::to_string).collect(),
        Err(_) => Vec::new(),
    }
}

trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlock for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK)
    }
}

/// The wait status of `pid` when it is an unreaped zombie (its parent has not waited yet).
pub fn zombie_status(pid: u32) -> Option<i32> {
    let st = super::proc::parse_stat(&super::proc::read(format!("/proc/{pid}/stat"))?)?;
    if matches!(st.state, 'Z' | 'X') {
        st.exit_code
    } else {
        None
    }
}

/// What is known about how `pid` ended, as the `exit` object of a `daemon_exited` event, plus
/// a short phrase for its message. `zombie_status` is the wait status read while it was a
/// zombie, when it was seen as one.
pub fn explain(pid: u32, zombie_status: Option<i32>, last_lines: &[String]) -> (Value, String) {
    let mut how = Vec::new();
    let mut exit = serde_json::Map::new();
    if let Some(st) = zombie_status {
        let s = split_status(st);
        exit.insert("code".into(), json!(s.code));
        exit.insert("signal".into(), json!(s.signal));
        exit.insert("signal_name".into(), json!(s.signal.and_then(signal_name)));
        exit.insert("core_dumped".into(), json!(s.core_dumped));
        exit.insert("source".into(), json!("/proc stat of the unreaped process"));
        how.push(describe_status(st));
    }
    let kernel = kernel_log();
    exit.insert("kernel_log_readable".into(), json!(!kernel.is_empty()));
    if let Some(line) = find_oom_kill(kernel.iter().map(String::as_str), pid) {
        exit.insert("oom_killed".into(), json!(true));
        exit.insert("kernel_log".into(), json!(line));
        how.push("killed by the OOM killer".into());
    }
    let telling = telling_lines(last_lines);
    if !telling.is_empty() {
        if how.is_empty() {
            how.push(format!("its last words: {}", telling[telling.len() - 1]));
        }
        exit.insert("telling_lines".into(), json!(telling));
    }
    if how.is_empty() {
        exit.insert(
            "unknown".into(),
            json!("not the agent's child: its exit status cannot be read, and the kernel log has no OOM kill of it"),
        );
    }
    (Value::Object(exit), how.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(describe_status(0), "exit code 0");
        assert_eq!(describe_status(3 << 8), "exit code 3");
        assert_eq!(describe_status(9), "killed by signal 9 (SIGKILL)");
        assert_eq!(
            describe_status(11 | 0x80),
            "killed by signal 11 (SIGSEGV), core dumped"
        );
        assert_eq!(split_status(15).signal, Some(15));
    }

    #[test]
    fn oom_lines() {
        let log = [
            "6,100,5000,-;eth0: link up",
            "3,101,6000,-;oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),task=python3,pid=4242,uid=0",
            "3,102,6001,-;Out of memory: Killed process 4242 (python3) total-vm:9000kB, anon-rss:8000kB",
            "[ 12.5] Out of memory: Killed process 999 (java) total-vm:1kB",
        ];
        assert_eq!(
            find_oom_kill(log.iter().copied(), 4242).as_deref(),
            Some("Out of memory: Killed process 4242 (python3) total-vm:9000kB, anon-rss:8000kB")
        );
        assert_eq!(
            find_oom_kill(log.iter().copied(), 999).as_deref(),
            Some("[ 12.5] Out of memory: Killed process 999 (java) total-vm:1kB")
        );
        assert_eq!(find_oom_kill(log.iter().copied(), 42), None);
        assert_eq!(find_oom_kill(log.iter().copied(), 424), None);
    }

    #[test]
    fn telling() {
        let lines: Vec<String> = [
            "INFO step 3",
            "ERROR MemoryError: cannot allocate",
            "INFO ok",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            telling_lines(&lines),
            vec!["ERROR MemoryError: cannot allocate"]
        );
    }
}
