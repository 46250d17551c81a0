//! Parsing what `/proc` says about a process and its threads: `stat`, `syscall`, `status`,
//! `io`, descriptor targets, epoll `fdinfo`, and the socket tables `net/tcp*`, `net/udp*` and
//! `net/unix`. Pure functions over captured text (unit-tested below); the few readers at the
//! end only fetch the text and never fail: what cannot be read is left out.

use std::collections::HashMap;
use std::path::Path;

/// The fields of `/proc/PID/stat` (or `/proc/PID/task/TID/stat`) the diagnosis uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stat {
    /// The command name, as the kernel keeps it (at most 15 bytes; threads may rename).
    pub comm: String,
    /// R running, S sleeping, D uninterruptible (disk), Z zombie, T stopped, t traced…
    pub state: char,
    pub ppid: u32,
    /// User plus system CPU time, in clock ticks.
    pub cpu_ticks: u64,
    pub threads: u64,
    pub start_ticks: u64,
    pub rss_pages: u64,
    /// Field 52: the exit status as `waitpid` reports it (meaningful for a zombie).
    pub exit_code: Option<i32>,
}

/// Parses a `stat` line. The command name may hold spaces and parentheses, so fields are
/// counted after the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let f: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // Field 3 (state) is index 0 here, so field n is at index n - 3.
    let num = |n: usize| f.get(n - 3).and_then(|s| s.parse::<u64>().ok());
    Some(Stat {
        comm,
        state: f.first()?.chars().next()?,
        ppid: u32::try_from(num(4)?).ok()?,
        cpu_ticks: num(14)?.saturating_add(num(15)?),
        threads: num(20)?,
        start_ticks: num(22)?,
        rss_pages: num(24)?,
        exit_code: f.get(52 - 3).and_then(|s| s.parse::<i32>().ok()),
    })
}

/// What a thread's `syscall` file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyscallState {
    /// The thread is on a CPU.
    Running,
    /// Blocked, but not inside a system call (e.g. a page fault).
    Outside,
    /// Inside system call `nr` with these arguments.
    In { nr: i64, args: [u64; 6] },
}

/// Parses `/proc/PID/task/TID/syscall`: `running`, `-1 SP PC`, or `NR A1 … A6 SP PC`.
pub fn parse_syscall(text: &str) -> Option<SyscallState> {
    let mut words = text.split_whitespace();
    let first = words.next()?;
    if first == "running" {
        return Some(SyscallState::Running);
    }
    let nr: i64 = first.parse().ok()?;
    if nr < 0 {
        return Some(SyscallState::Outside);
    }
    let mut args = [0u64; 6];
    for a in &mut args {
        let w = words.next()?;
        *a = u64::from_str_radix(w.trim_start_matches("0x"), 16).ok()?;
    }
    Some(SyscallState::In { nr, args })
}

/// A few lines of `/proc/PID/status`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Status {
    pub name: Option<String>,
    pub tracer_pid: Option<u32>,
    pub vm_rss_kib: Option<u64>,
}

/// Parses `/proc/PID/status` (the keys used only).
pub fn parse_status(text: &str) -> Status {
    let mut s = Status::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key {
            "Name" => s.name = Some(value.to_string()),
            "TracerPid" => s.tracer_pid = value.parse().ok(),
            "VmRSS" => s.vm_rss_kib = value.split_whitespace().next().and_then(|v| v.parse().ok()),
            _ => {}
        }
    }
    s
}

/// Bytes moved by a process, from `/proc/PID/io`: `rchar`/`wchar` count every read and
/// write (sockets and pipes too), `read_bytes`/`write_bytes` only storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Io {
    pub rchar: u64,
    pub wchar: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
}

/// Parses `/proc/PID/io`; `None` when a field is missing.
pub fn parse_io(text: &str) -> Option<Io> {
    let mut get = HashMap::new();
    for line in text.lines() {
        if let Some((k, v)) = line.split_once(':') {
            if let Ok(n) = v.trim().parse::<u64>() {
                get.insert(k.trim(), n);
            }
        }
    }
    Some(Io {
        rchar: *get.get("rchar")?,
        wchar: *get.get("wchar")?,
        read_bytes: *get.get("read_bytes")?,
        write_bytes: *get.get("write_bytes")?,
    })
}

/// The descriptors an epoll instance watches, from `/proc/PID/fdinfo/EPFD` (`tfd:` lines).
pub fn parse_epoll_targets(fdinfo: &str) -> Vec<i32> {
    fdinfo
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("tfd:"))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

/// What a descriptor refers to, from its `/proc/PID/fd/N` link (and the file type behind it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FdTarget {
    /// A path; `fifo` when it is a named pipe.
    File {
        path: String,
        fifo: bool,
    },
    Pipe {
        inode: u64,
    },
    Socket {
        inode: u64,
    },
    /// `anon_inode:[eventpoll]`, `anon_inode:[eventfd]`…
    Anon(String),
    Other(String),
}

/// Classifies a descriptor's link text; `fifo` says whether the file behind it is a FIFO.
pub fn parse_fd_link(link: &str, fifo: bool) -> FdTarget {
    let inode = |prefix: &str| {
        link.strip_prefix(prefix)?
            .strip_suffix(']')?
            .parse::<u64>()
            .ok()
    };
    if let Some(inode) = inode("socket:[") {
        FdTarget::Socket { inode }
    } else if let Some(inode) = inode("pipe:[") {
        FdTarget::Pipe { inode }
    } else if let Some(rest) = link.strip_prefix("anon_inode:") {
        FdTarget::Anon(rest.trim_matches(|c| c == '[' || c == ']').to_string())
    } else if link.starts_with('/') {
        FdTarget::File {
            path: link.to_string(),
            fifo,
        }
    } else {
        FdTarget::Other(link.to_string())
    }
}

/// One socket from the kernel's tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Socket {
    /// `tcp`, `tcp6`, `udp`, `udp6` or `unix`.
    pub proto: &'static str,
    /// `ip:port` (`[ip]:port` for IPv6), or the unix path (empty when unnamed).
    pub local: String,
    /// The peer, for inet sockets (`0.0.0.0:0` when none).
    pub remote: Option<String>,
    pub remote_port: Option<u16>,
    /// `ESTABLISHED`, `SYN_SENT`, `LISTEN`… (unix: `CONNECTED`, `LISTEN`, `UNCONNECTED`).
    pub state: &'static str,
    /// Bytes waiting in the receive queue (inet only).
    pub rx_queue: u64,
}

/// Parses `/proc/PID/net/tcp`, `tcp6`, `udp` or `udp6` into sockets by inode.
pub fn parse_inet_table(text: &str, proto: &'static str, into: &mut HashMap<u64, Socket>) {
    let tcp = proto.starts_with("tcp");
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            continue;
        }
        let (Some((local, _)), Some((remote, remote_port))) = (inet_addr(f[1]), inet_addr(f[2]))
        else {
            continue;
        };
        let Ok(inode) = f[9].parse::<u64>() else {
            continue;
        };
        if inode == 0 {
            continue;
        }
        let state = u8::from_str_radix(f[3], 16).unwrap_or(0);
        let rx_queue = f[4]
            .split_once(':')
            .and_then(|(_, rx)| u64::from_str_radix(rx, 16).ok())
            .unwrap_or(0);
        into.insert(
            inode,
            Socket {
                proto,
                local,
                remote: Some(remote),
                remote_port: Some(remote_port),
                state: if tcp {
                    tcp_state(state)
                } else if remote_port == 0 {
                    "UNCONNECTED"
                } else {
                    "CONNECTED"
                },
                rx_queue,
            },
        );
    }
}

/// `0100007F:1538` → `127.0.0.1:5432`; IPv6 addresses are four host-order 32-bit words.
fn inet_addr(field: &str) -> Option<(String, u16)> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let text = match addr.len() {
        8 => {
            let n = u32::from_str_radix(addr, 16).ok()?;
            std::net::Ipv4Addr::from(n.to_le_bytes()).to_string()
        }
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
                chunk.copy_from_slice(&word.to_le_bytes());
            }
            let ip = std::net::Ipv6Addr::from(bytes);
            match ip.to_ipv4_mapped() {
                Some(v4) => v4.to_string(),
                None => format!("[{ip}]"),
            }
        }
        _ => return None,
    };
    Some((format!("{text}:{port}"), port))
}

fn tcp_state(code: u8) -> &'static str {
    match code {
        0x01 => "ESTABLISHED",
        0x02 => "SYN_SENT",
        0x03 => "SYN_RECV",
        0x04 => "FIN_WAIT1",
        0x05 => "FIN_WAIT2",
        0x06 => "TIME_WAIT",
        0x07 => "CLOSE",
        0x08 => "CLOSE_WAIT",
        0x09 => "LAST_ACK",
        0x0A => "LISTEN",
        0x0B => "CLOSING",
        _ => "UNKNOWN",
    }
}

/// Parses `/proc/PID/net/unix` into sockets by inode.
pub fn parse_unix_table(text: &str, into: &mut HashMap<u64, Socket>) {
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 7 {
            continue;
        }
        let Ok(inode) = f[6].parse::<u64>() else {
            continue;
        };
        let state = match f[5] {
            "01" if f[3] == "00010000" => "LISTEN",
            "01" => "UNCONNECTED",
            "02" => "CONNECTING",
            "03" => "CONNECTED",
            "04" => "DISCONNECTING",
            _ => "UNKNOWN",
        };
        into.insert(
            inode,
            Socket {
                proto: "unix",
                local: f.get(7).map(|s| s.to_string()).unwrap_or_default(),
                remote: None,
                remote_port: None,
                state,
                rx_queue: 0,
            },
        );
    }
}

/// A well-known service behind a port, to say "PostgreSQL" rather than "5432".
pub fn port_name(port: u16) -> Option<&'static str> {
    Some(match port {
        22 => "SSH",
        53 => "DNS",
        80 | 8080 => "HTTP",
        443 | 8443 => "HTTPS",
        2181 => "ZooKeeper",
        2379 => "etcd",
        3306 => "MySQL",
        5432 => "PostgreSQL",
        5672 => "RabbitMQ",
        6379 => "Redis",
        6432 => "PgBouncer",
        8123 => "ClickHouse",
        9000 => "MinIO/ClickHouse",
        9042 => "Cassandra",
        9092 => "Kafka",
        9200 => "Elasticsearch",
        11211 => "memcached",
        27017 => "MongoDB",
        _ => return None,
    })
}

// ---- readers: fetch the text, never fail ----

/// Reads a small `/proc` file as text.
pub fn read(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// The socket tables of the network namespace `pid` lives in.
pub fn read_sockets(pid: u32) -> HashMap<u64, Socket> {
    let mut sockets = HashMap::new();
    for proto in ["tcp", "tcp6", "udp", "udp6"] {
        if let Some(t) = read(format!("/proc/{pid}/net/{proto}")) {
            parse_inet_table(&t, proto, &mut sockets);
        }
    }
    if let Some(t) = read(format!("/proc/{pid}/net/unix")) {
        parse_unix_table(&t, &mut sockets);
    }
    sockets
}

/// The process's descriptors (at most `limit`, lowest first) and how many it has in all.
pub fn read_fds(pid: u32, limit: usize) -> (Vec<(i32, FdTarget)>, usize) {
    use std::os::unix::fs::FileTypeExt;
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return (Vec::new(), 0);
    };
    let mut fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    let total = fds.len();
    let out = fds
        .into_iter()
        .take(limit)
        .filter_map(|fd| {
            let p = format!("/proc/{pid}/fd/{fd}");
            let link = std::fs::read_link(&p).ok()?;
            let link = link.to_string_lossy();
            let fifo = link.starts_with('/')
                && std::fs::metadata(&p).is_ok_and(|m| m.file_type().is_fifo());
            Some((fd, parse_fd_link(&link, fifo)))
        })
        .collect();
    (out, total)
}

/// Every process's parent, from `/proc/*/stat` (bounded to the first 65536 entries).
pub fn read_parents() -> HashMap<u32, u32> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten().take(65536) {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(st) = read(format!("/proc/{pid}/stat")).and_then(|t| parse_stat(&t)) {
            out.insert(pid, st.ppid);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines() {
        let text = "4242 (python3 (x) y) S 4200 4242 4200 0 -1 4194560 1000 0 0 0 150 30 0 0 20 0 3 0 98765 30000000 2500 18446744073709551615 1 1 0 0 0 0 0 16781312 2 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 9";
        let s = parse_stat(text).expect("parses");
        assert_eq!(s.comm, "python3 (x) y");
        assert_eq!(s.state, 'S');
        assert_eq!(s.ppid, 4200);
        assert_eq!(s.cpu_ticks, 180);
        assert_eq!(s.threads, 3);
        assert_eq!(s.start_ticks, 98765);
        assert_eq!(s.rss_pages, 2500);
        assert_eq!(s.exit_code, Some(9));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn syscall_lines() {
        assert_eq!(parse_syscall("running\n"), Some(SyscallState::Running));
        assert_eq!(
            parse_syscall("-1 0x7ffd1 0x7f00\n"),
            Some(SyscallState::Outside)
        );
        assert_eq!(
            parse_syscall("45 0x3 0x7f5e 0x10000 0x0 0x0 0x0 0x7ffc 0x7f12\n"),
            Some(SyscallState::In {
                nr: 45,
                args: [3, 0x7f5e, 0x10000, 0, 0, 0]
            })
        );
        assert_eq!(parse_syscall("45 0x3"), None);
        assert_eq!(parse_syscall(""), None);
    }

    #[test]
    fn status_and_io() {
        let s = parse_status(
            "Name:\tpython3\nState:\tS (sleeping)\nTracerPid:\t0\nVmRSS:\t  10240 kB\n",
        );
        assert_eq!(s.name.as_deref(), Some("python3"));
        assert_eq!(s.tracer_pid, Some(0));
        assert_eq!(s.vm_rss_kib, Some(10240));
        let io = parse_io("rchar: 10\nwchar: 20\nsyscr: 1\nsyscw: 2\nread_bytes: 4096\nwrite_bytes: 0\ncancelled_write_bytes: 0\n");
        assert_eq!(
            io,
            Some(Io {
                rchar: 10,
                wchar: 20,
                read_bytes: 4096,
                write_bytes: 0
            })
        );
        assert_eq!(parse_io("rchar: 10\n"), None);
    }

    #[test]
    fn fd_links() {
        assert_eq!(
            parse_fd_link("socket:[123]", false),
            FdTarget::Socket { inode: 123 }
        );
        assert_eq!(
            parse_fd_link("pipe:[77]", false),
            FdTarget::Pipe { inode: 77 }
        );
        assert_eq!(
            parse_fd_link("anon_inode:[eventpoll]", false),
            FdTarget::Anon("eventpoll".into())
        );
        assert_eq!(
            parse_fd_link("/tmp/q.fifo", true),
            FdTarget::File {
                path: "/tmp/q.fifo".into(),
                fifo: true
            }
        );
        assert_eq!(
            parse_fd_link("anon_inode:bpf-map", false),
            FdTarget::Anon("bpf-map".into())
        );
        let epoll = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\ntfd:        5 events:       19 data:                5  pos:0 ino:3a2 sdev:8\ntfd:        7 events:       19 data:                7  pos:0 ino:3a3 sdev:8\n";
        assert_eq!(parse_epoll_targets(epoll), vec![5, 7]);
    }

    #[test]
    fn socket_tables() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:9C40 0100007F:1538 01 00000000:00000000 00:00000000 00000000     0        0 55501 1 0000000000000000 20 4 30 10 -1\n   1: 00000000:1F90 00000000:0000 0A 00000000:00000005 00:00000000 00000000     0        0 55502 1 0000000000000000 100 0 0 10 0\n";
        let mut m = HashMap::new();
        parse_inet_table(tcp, "tcp", &mut m);
        let s = &m[&55501];
        assert_eq!(s.local, "127.0.0.1:40000");
        assert_eq!(s.remote.as_deref(), Some("127.0.0.1:5432"));
        assert_eq!(s.state, "ESTABLISHED");
        assert_eq!(port_name(5432), Some("PostgreSQL"));
        assert_eq!(m[&55502].state, "LISTEN");
        assert_eq!(m[&55502].rx_queue, 5);
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:A000 01 00000000:00000000 00:00000000 00000000     0        0 66 1\n   1: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000200007F:0050 02 00000000:00000000 00:00000000 00000000     0        0 67 1\n";
        parse_inet_table(tcp6, "tcp6", &mut m);
        assert_eq!(m[&66].local, "[::1]:8080");
        assert_eq!(m[&66].remote.as_deref(), Some("[::1]:40960"));
        assert_eq!(m[&67].remote.as_deref(), Some("127.0.0.2:80"));
        assert_eq!(m[&67].state, "SYN_SENT");
        let unix = "Num       RefCount Protocol Flags    Type St Inode Path\n0000000000000000: 00000002 00000000 00010000 0001 01 900 /run/app.sock\n0000000000000000: 00000003 00000000 00000000 0001 03 901\n";
        parse_unix_table(unix, &mut m);
        assert_eq!(m[&900].state, "LISTEN");
        assert_eq!(m[&900].local, "/run/app.sock");
        assert_eq!(m[&901].state, "CONNECTED");
        assert_eq!(m[&901].local, "");
    }
}
