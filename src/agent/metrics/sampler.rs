//! Reading the counters of a process tree, of the host and of filesystems, and turning two
//! readings into rates.
//!
//! The per-process figures come from `/proc/PID/stat`, `/proc/PID/io` and `/proc/PID/fd`,
//! read only for the pids of the trees being sampled. These are cumulative counters, so each
//! daemon gets a correct rate over its own interval however often the shared process table is
//! refreshed (sysinfo 0.30 only exposes deltas since its last refresh, which would shrink one
//! daemon's window whenever another daemon is sampled). Parsing is pure and unit-tested;
//! nothing here fails a sample: an unreadable file leaves its figure out.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

/// Rates over a shorter window than this are too coarse (CPU time counts in 10 ms ticks)
/// and are reported as unknown.
pub const MIN_RATE_WINDOW_SECS: f64 = 0.2;

/// The counters of one process from `/proc/PID/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatCounters {
    /// User plus system CPU time, in clock ticks.
    pub cpu_ticks: u64,
    /// Start time after boot, in clock ticks; tells a reused pid from the old process.
    pub start_ticks: u64,
    /// Resident set size, in pages.
    pub rss_pages: u64,
    /// Number of threads.
    pub threads: u64,
}

/// Parses `/proc/PID/stat`. The command name may hold spaces and parentheses, so fields are
/// counted after the last `)`.
pub fn parse_stat(text: &str) -> Option<StatCounters> {
    let rest = &text[text.rfind(')')? + 1..];
    // Field 3 (state) is index 0 here, so field n is at index n - 3.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |n: usize| f.get(n - 3).and_then(|s| s.parse::<u64>().ok());
    Some(StatCounters {
        cpu_ticks: num(14)?.saturating_add(num(15)?),
        threads: num(20)?,
        start_ticks: num(22)?,
        rss_pages: num(24)?,
    })
}

/// Bytes a process caused to be fetched from and sent to storage (`/proc/PID/io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IoCounters {
    pub read_bytes: u64,
    pub write_bytes: u64,
}

/// Parses `/proc/PID/io`.
pub fn parse_io(text: &str) -> Option<IoCounters> {
    let mut read = None;
    let mut write = None;
    for line in text.lines() {
        let mut parts = line.splitn(2, ':');
        let key = parts.next().unwrap_or("").trim();
        let value = parts.next().and_then(|v| v.trim().parse::<u64>().ok());
        match key {
            "read_bytes" => read = value,
            "write_bytes" => write = value,
            _ => {}
        }
    }
    Some(IoCounters {
        read_bytes: read?,
        write_bytes: write?,
    })
}

/// Seconds since boot from `/proc/uptime`.
pub fn parse_uptime(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse::<f64>().ok()
}

/// Everything read about one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PidReading {
    pub stat: StatCounters,
    /// `None` when the kernel does not allow reading it.
    pub io: Option<IoCounters>,
    /// Open file descriptors; `None` when the directory cannot be listed.
    pub fds: Option<u64>,
}

/// Whether `/proc/PID/stat` describes a zombie or dead process (exited, not yet reaped).
pub fn stat_is_defunct(text: &str) -> bool {
    let state = text
        .rfind(')')
        .and_then(|i| text[i + 1..].split_whitespace().next());
    matches!(state, Some("Z" | "X" | "x"))
}

/// Reads a `/proc` file whole. `std::fs::read_to_string` asks for the size first (`/proc`
/// says 0) and then reads 32, 32, 64, … bytes a call (eight calls for `/proc/stat`); this reads
/// into a buffer that holds the usual file at once: two calls (the text, then the end).
pub fn read_proc(path: &str) -> Option<String> {
    use std::io::Read;
    let mut text = String::with_capacity(4096);
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .ok()?;
    Some(text)
}

/// Reads one process; `None` when it is gone (a zombie counts as gone: it has exited).
pub fn read_pid(pid: u32) -> Option<PidReading> {
    let base = format!("/proc/{pid}");
    let text = read_proc(&format!("{base}/stat"))?;
    if stat_is_defunct(&text) {
        return None;
    }
    let stat = parse_stat(&text)?;
    let io = read_proc(&format!("{base}/io")).and_then(|t| parse_io(&t));
    let fds = std::fs::read_dir(format!("{base}/fd"))
        .ok()
        .map(|rd| rd.filter(|e| e.is_ok()).count() as u64);
    Some(PidReading { stat, io, fds })
}

/// Constants of the running kernel needed to turn counters into units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clock {
    /// Clock ticks per second (`_SC_CLK_TCK`).
    pub ticks_per_sec: f64,
    /// Bytes per page (`_SC_PAGESIZE`).
    pub page_size: u64,
}

impl Clock {
    /// Reads the constants from the C library, with Linux's usual values as fallbacks.
    pub fn from_os() -> Clock {
        // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
        let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        // SAFETY: as above.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        Clock {
            ticks_per_sec: if tck > 0 { tck as f64 } else { 100.0 },
            page_size: if page > 0 { page as u64 } else { 4096 },
        }
    }
}

/// The readings of one process tree at one moment.
#[derive(Debug, Clone, Default)]
pub struct TreeReading {
    /// When it was taken (monotonic).
    pub at: Option<Instant>,
    /// Seconds since boot when it was taken; a process started after this belongs wholly to
    /// the next window.
    pub uptime_secs: f64,
    pub pids: HashMap<u32, PidReading>,
}

/// Reads every pid of a tree now. Processes that vanished in between are left out.
pub fn read_tree(pids: &[u32], at: Instant, uptime_secs: f64) -> TreeReading {
    TreeReading {
        at: Some(at),
        uptime_secs,
        pids: pids
            .iter()
            .filter_map(|p| read_pid(*p).map(|r| (*p, r)))
            .collect(),
    }
}

/// Seconds since boot now: `CLOCK_BOOTTIME`, the clock `/proc/uptime` shows and process start
/// times count on, read without a file (opening `/proc/uptime` was the dearest of a tick's
/// reads). Falls back to the file, then to 0 (then every new process counts as older than the
/// window, which under- rather than over-reports).
pub fn uptime_now() -> f64 {
    // SAFETY: timespec is plain old data; clock_gettime only writes into it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out pointer; an unknown clock is an error return, not UB.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } == 0 {
        return ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9;
    }
    read_proc("/proc/uptime")
        .and_then(|t| parse_uptime(&t))
        .unwrap_or(0.0)
}

/// A tree's usage over the window between two readings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TreeUsage {
    /// 100 = one core, over the window; `None` without a usable previous reading.
    pub cpu_percent: Option<f64>,
    pub rss_bytes: u64,
    pub read_bytes_per_sec: Option<f64>,
    pub write_bytes_per_sec: Option<f64>,
    pub threads: u64,
    /// Sum over the processes whose descriptors could be counted; `None` if none could.
    pub open_fds: Option<u64>,
    /// Number of processes in the tree.
    pub processes: usize,
}

/// Computes the usage between `prev` and `cur`. A process in both (same start time) counts
/// its counter difference; one that started inside the window counts whole; one that joined
/// the tree but is older than the window (a pid file now naming an old process) counts
/// nothing for this window, rather than its whole life.
pub fn usage(prev: Option<&TreeReading>, cur: &TreeReading, clock: Clock) -> TreeUsage {
    let mut u = TreeUsage {
        processes: cur.pids.len(),
        ..TreeUsage::default()
    };
    let mut fds = None::<u64>;
    for r in cur.pids.values() {
        u.rss_bytes = u
            .rss_bytes
            .saturating_add(r.stat.rss_pages.saturating_mul(clock.page_size));
        u.threads = u.threads.saturating_add(r.stat.threads);
        if let Some(n) = r.fds {
            fds = Some(fds.unwrap_or(0).saturating_add(n));
        }
    }
    u.open_fds = fds;
    let Some(prev) = prev else { return u };
    let (Some(t0), Some(t1)) = (prev.at, cur.at) else {
        return u;
    };
    let secs = t1.saturating_duration_since(t0).as_secs_f64();
    if secs < MIN_RATE_WINDOW_SECS {
        return u;
    }
    let mut cpu_ticks = 0u64;
    let mut read = 0u64;
    let mut write = 0u64;
    let mut io_known = false;
    for (pid, r) in &cur.pids {
        let before = prev
            .pids
            .get(pid)
            .filter(|p| p.stat.start_ticks == r.stat.start_ticks);
        let started_in_window = r.stat.start_ticks as f64 / clock.ticks_per_sec >= prev.uptime_secs;
        match before {
            Some(b) => {
                cpu_ticks += r.stat.cpu_ticks.saturating_sub(b.stat.cpu_ticks);
                if let (Some(i0), Some(i1)) = (b.io, r.io) {
                    io_known = true;
                    read += i1.read_bytes.saturating_sub(i0.read_bytes);
                    write += i1.write_bytes.saturating_sub(i0.write_bytes);
                }
            }
            None if started_in_window => {
                cpu_ticks += r.stat.cpu_ticks;
                if let Some(i1) = r.io {
                    io_known = true;
                    read += i1.read_bytes;
                    write += i1.write_bytes;
                }
            }
            None => {}
        }
    }
    if !cur.pids.is_empty() {
        u.cpu_percent = Some(cpu_ticks as f64 * 100.0 / (clock.ticks_per_sec * secs));
    }
    if io_known {
        u.read_bytes_per_sec = Some(read as f64 / secs);
        u.write_bytes_per_sec = Some(write as f64 / secs);
    }
    u
}

/// The host's CPU counters from the first line of `/proc/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostCpu {
    /// All jiffies, summed over CPUs.
    pub total: u64,
    /// Idle plus iowait jiffies.
    pub idle: u64,
    /// Number of CPUs (the `cpuN` lines).
    pub cpus: u32,
}

/// Parses `/proc/stat`.
pub fn parse_proc_stat(text: &str) -> Option<HostCpu> {
    let mut lines = text.lines();
    let first = lines.next()?;
    let mut f = first.split_whitespace();
    if f.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = f.filter_map(|s| s.parse().ok()).collect();
    if v.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal; guest time is already in user.
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    let cpus = lines
        .filter(|l| {
            l.strip_prefix("cpu")
                .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count() as u32;
    Some(HostCpu {
        total,
        idle,
        cpus: cpus.max(1),
    })
}

/// Reads `/proc/stat`.
pub fn read_host_cpu() -> Option<HostCpu> {
    parse_proc_stat(&read_proc("/proc/stat")?)
}

/// Host CPU use between two readings, 100 = one core (so a busy 8-core host reads 800).
pub fn host_cpu_percent(prev: HostCpu, cur: HostCpu) -> Option<f64> {
    let total = cur.total.checked_sub(prev.total)?;
    let idle = cur.idle.checked_sub(prev.idle)?;
    if total == 0 {
        return None;
    }
    Some(total.saturating_sub(idle) as f64 / total as f64 * 100.0 * f64::from(cur.cpus))
}

/// Host memory from `/proc/meminfo`, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostMemory {
    pub total: u64,
    pub available: u64,
}

/// Parses `/proc/meminfo`.
pub fn parse_meminfo(text: &str) -> Option<HostMemory> {
    let mut total = None;
    let mut available = None;
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let key = parts.next();
        let kib = parts.next().and_then(|v| v.parse::<u64>().ok());
        match key {
            Some("MemTotal:") => total = kib,
            Some("MemAvailable:") => available = kib,
            _ => {}
        }
    }
    Some(HostMemory {
        total: total?.saturating_mul(1024),
        available: available?.saturating_mul(1024),
    })
}

/// Reads `/proc/meminfo`.
pub fn read_host_memory() -> Option<HostMemory> {
    parse_meminfo(&read_proc("/proc/meminfo")?)
}

/// Percent used of the filesystem holding `path`, as `df` computes it (blocks reserved for
/// root count as neither used nor available). `statvfs` on the configured path itself is
/// exact for a path below a mount point and cheaper than listing every mount.
pub fn disk_used_percent(path: &Path) -> Option<f64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain old data; all-zero is a valid value to be overwritten.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated string and `st` a valid out pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return None;
    }
    used_percent(st.f_blocks as u64, st.f_bfree as u64, st.f_bavail as u64)
}

/// `df`'s use%: used / (used + available to unprivileged users).
pub fn used_percent(blocks: u64, free: u64, avail: u64) -> Option<f64> {
    let used = blocks.saturating_sub(free);
    let denom = used.saturating_add(avail);
    if denom == 0 {
        return None;
    }
    Some(used as f64 / denom as f64 * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const STAT: &str = "4242 (python3 (worker) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
        250 50 0 0 20 0 7 0 123456 100000000 2048 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";

    #[test]
    fn stat_fields_after_the_last_parenthesis() {
        assert_eq!(
            parse_stat(STAT),
            Some(StatCounters {
                cpu_ticks: 300,
                start_ticks: 123456,
                rss_pages: 2048,
                threads: 7
            })
        );
        assert_eq!(parse_stat("garbage"), None);
        assert!(!stat_is_defunct(STAT));
        assert!(stat_is_defunct("9 (a) b) Z 1 2"));
        assert!(!stat_is_defunct("garbage"));
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
    }

    #[test]
    fn io_and_uptime_and_meminfo() {
        let io =
            "rchar: 10\nwchar: 20\nread_bytes: 4096\nwrite_bytes: 8192\ncancelled_write_bytes: 0\n";
        assert_eq!(
            parse_io(io),
            Some(IoCounters {
                read_bytes: 4096,
                write_bytes: 8192
            })
        );
        assert_eq!(parse_io("rchar: 1\n"), None);
        assert_eq!(parse_uptime("12345.67 999.0\n"), Some(12345.67));
        assert_eq!(parse_uptime(""), None);
        // The clock read is the one the file shows (the file rounds to 10 ms).
        let file = parse_uptime(&read_proc("/proc/uptime").unwrap()).unwrap();
        let clock = uptime_now();
        assert!((clock - file).abs() < 0.5, "{clock} vs {file}");
        let mem = "MemTotal:       16000000 kB\nMemFree:  1 kB\nMemAvailable:    8000000 kB\n";
        assert_eq!(
            parse_meminfo(mem),
            Some(HostMemory {
                total: 16_000_000 * 1024,
                available: 8_000_000 * 1024
            })
        );
    }

    #[test]
    fn host_cpu() {
        let a = parse_proc_stat("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1\ncpu1 1\nintr 5\n")
            .expect("parses");
        assert_eq!(
            a,
            HostCpu {
                total: 1000,
                idle: 800,
                cpus: 2
            }
        );
        let b = HostCpu {
            total: 2000,
            idle: 1300,
            cpus: 2,
        };
        // 500 of 1000 jiffies busy on 2 CPUs = one core.
        assert_eq!(host_cpu_percent(a, b), Some(100.0));
        assert_eq!(host_cpu_percent(b, a), None);
        assert_eq!(parse_proc_stat("intr 1\n"), None);
    }

    #[test]
    fn df_use_percent() {
        assert_eq!(used_percent(100, 40, 30), Some(60.0 / 90.0 * 100.0));
        assert_eq!(used_percent(0, 0, 0), None);
        let root = disk_used_percent(Path::new("/")).expect("statvfs of /");
        assert!((0.0..=100.0).contains(&root), "{root}");
        assert_eq!(disk_used_percent(Path::new("/nonexistent/xyz")), None);
    }

    fn reading(at: Instant, uptime: f64, pids: &[(u32, u64, u64, u64)]) -> TreeReading {
        TreeReading {
            at: Some(at),
            uptime_secs: uptime,
            pids: pids
                .iter()
                .map(|(pid, start, cpu, io)| {
                    (
                        *pid,
                        PidReading {
                            stat: StatCounters {
                                cpu_ticks: *cpu,
                                start_ticks: *start,
                                rss_pages: 10,
                                threads: 2,
                            },
                            io: Some(IoCounters {
                                read_bytes: *io,
                                write_bytes: *io * 2,
                            }),
                            fds: Some(3),
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn usage_over_a_window() {
        let clock = Clock {
            ticks_per_sec: 100.0,
            page_size: 4096,
        };
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(10);
        // Uptime 1000 s at the first reading; pid 3 starts at 1005 s (tick 100500).
        let prev = reading(t0, 1000.0, &[(1, 500, 1000, 0), (2, 600, 50, 100)]);
        let cur = reading(
            t1,
            1010.0,
            &[
                (1, 500, 2000, 10_000), // 1000 ticks = 10 s of CPU in 10 s.
                (2, 999, 70, 100),      // Pid reused by an old process: counts nothing.
                (3, 100_500, 100, 50),  // New in the window: counts whole.
            ],
        );
        let u = usage(Some(&prev), &cur, clock);
        assert_eq!(u.cpu_percent, Some(110.0));
        assert_eq!(u.read_bytes_per_sec, Some(1005.0));
        assert_eq!(u.write_bytes_per_sec, Some(2010.0));
        assert_eq!(u.rss_bytes, 3 * 10 * 4096);
        assert_eq!(u.threads, 6);
        assert_eq!(u.open_fds, Some(9));
        assert_eq!(u.processes, 3);

        let first = usage(None, &cur, clock);
        assert_eq!(first.cpu_percent, None);
        assert_eq!(first.rss_bytes, 3 * 10 * 4096);
        let too_short = reading(
            t0 + Duration::from_millis(50),
            1000.05,
            &[(1, 500, 1001, 0)],
        );
        assert_eq!(usage(Some(&prev), &too_short, clock).cpu_percent, None);
        let gone = reading(t1, 1010.0, &[]);
        assert_eq!(usage(Some(&prev), &gone, clock).cpu_percent, None);
    }

    #[test]
    fn reads_this_process() {
        let me = read_pid(std::process::id()).expect("own /proc entry");
        assert!(me.stat.threads >= 1);
        assert!(me.stat.rss_pages > 0);
        assert!(me.fds.is_some_and(|n| n >= 3));
        assert!(read_pid(u32::MAX - 1).is_none());
    }

    #[test]
    fn an_unreaped_child_is_gone() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep runs");
        assert!(read_pid(child.id()).is_some());
        child.kill().expect("kill own child");
        // Until it is reaped the child is a zombie; poll (bounded) for the state change.
        let deadline = Instant::now() + Duration::from_secs(5);
        while read_pid(child.id()).is_some() {
            assert!(Instant::now() < deadline, "still alive after kill");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(std::path::Path::new(&format!("/proc/{}", child.id())).exists());
        child.wait().expect("reap own child");
    }
}
