//! A loopback TCP proxy between the agent and PostgreSQL that injects network faults on
//! command, so the exactly-once guarantees can be tested against real faults:
//!
//! * it passes traffic;
//! * at the next `COMMIT` (the simple-query message tokio-postgres sends) it can let the
//!   COMMIT reach the server, swallow the reply, close the connection and refuse new ones for
//!   a while ([`Fault::LoseReply`]);
//! * or stop forwarding in both directions without closing anything, before or after the
//!   COMMIT reaches the server ([`Fault::SilenceBeforeCommit`], [`Fault::SilenceAfterCommit`]):
//!   that connection stays silent for good (a flow a firewall forgot), and so do new ones until
//!   [`Proxy::heal`];
//! * or close the connection instead of forwarding the COMMIT: the server rolls back
//!   ([`Fault::DropBeforeCommit`]);
//! * at the next COMMIT, a later one ([`Proxy::arm_at`]), or the next one sent while another
//!   connection is inside a transaction ([`Proxy::arm_in_overlap`]).
//!
//! Threads only; every socket is polled with a short read timeout so dropping the proxy ends
//! them.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What to do at the next COMMIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The COMMIT reaches the server; its reply never reaches the client, the connection is
    /// closed, and new connections are refused for this long.
    LoseReply(Duration),
    /// Nothing more is forwarded from just before the COMMIT: the server keeps an open
    /// transaction. New connections are silent too until [`Proxy::heal`].
    SilenceBeforeCommit,
    /// The COMMIT reaches the server, then nothing more is forwarded either way. New
    /// connections are silent too until [`Proxy::heal`].
    SilenceAfterCommit,
    /// The COMMIT never reaches the server: both sides of that connection are closed (the
    /// server rolls the transaction back). New connections pass.
    DropBeforeCommit,
}

#[derive(Default)]
struct Control {
    armed: Option<Fault>,
    /// COMMITs to let pass before the armed fault.
    skip: usize,
    /// Fire only at a COMMIT sent while another connection is inside a transaction.
    overlap: bool,
    refuse_until: Option<Instant>,
    /// New connections start silent.
    silent: bool,
    fired: Vec<(Fault, Instant)>,
}

struct Shared {
    upstream: SocketAddr,
    control: Mutex<Control>,
    stop: AtomicBool,
    accepted: AtomicUsize,
    refused: AtomicUsize,
    /// Connections inside a transaction (between a `BEGIN…` and a `COMMIT`/`ROLLBACK` query).
    in_tx: AtomicUsize,
}

/// One proxied connection's state, seen by both directions.
struct Link {
    /// Forward nothing more, close nothing.
    frozen: AtomicBool,
    /// Swallow the server's next bytes (the COMMIT's reply), then close both sides.
    cut: AtomicBool,
}

/// A running proxy; stops when dropped.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

const POLL: Duration = Duration::from_millis(50);

impl Proxy {
    /// A proxy in front of `upstream`, listening on a free loopback port.
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared {
            upstream,
            control: Mutex::new(Control::default()),
            stop: AtomicBool::new(false),
            accepted: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            in_tx: AtomicUsize::new(0),
        });
        let s = shared.clone();
        let accept = std::thread::spawn(move || accept_loop(listener, s));
        Proxy {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// A proxy in front of the server of `url` (`postgres://user@127.0.0.1:PORT/db?…`), and
    /// the same URL pointing at the proxy.
    pub fn for_url(url: &str) -> (Proxy, String) {
        let rest = url.split_once("@127.0.0.1:").expect("a loopback URL").1;
        let port: u16 = rest
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|p| p.parse().ok())
            .expect("a port in the URL");
        let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], port)));
        let proxied = url.replacen(
            &format!("@127.0.0.1:{port}/"),
            &format!("@127.0.0.1:{}/", proxy.addr.port()),
            1,
        );
        (proxy, proxied)
    }

    /// Injects `fault` at the next COMMIT on any connection.
    pub fn arm(&self, fault: Fault) {
        self.arm_at(fault, 0);
    }

    /// Injects `fault` at a later COMMIT on any connection, after `skip` have passed.
    pub fn arm_at(&self, fault: Fault, skip: usize) {
        let mut c = self.control();
        c.armed = Some(fault);
        c.skip = skip;
        c.overlap = false;
    }

    /// Injects `fault` at the first COMMIT sent while another connection is inside a
    /// transaction (the agent streams a batch behind the one committing).
    pub fn arm_in_overlap(&self, fault: Fault) {
        let mut c = self.control();
        c.armed = Some(fault);
        c.skip = 0;
        c.overlap = true;
    }

    /// Faults injected so far, with when.
    pub fn fired(&self) -> Vec<(Fault, Instant)> {
        self.control().fired.clone()
    }

    /// New connections pass traffic again (silent ones stay silent).
    pub fn heal(&self) {
        let mut c = self.control();
        c.silent = false;
        c.refuse_until = None;
    }

    /// Connections accepted and forwarded, and connections refused.
    pub fn connections(&self) -> (usize, usize) {
        (
            self.shared.accepted.load(Ordering::SeqCst),
            self.shared.refused.load(Ordering::SeqCst),
        )
    }

    fn control(&self) -> std::sync::MutexGuard<'_, Control> {
        self.shared.control.lock().expect("proxy control lock")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(_) => continue,
        };
        let (refuse, silent) = {
            let c = shared.control.lock().expect("proxy control lock");
            (c.refuse_until.is_some_and(|t| Instant::now() < t), c.silent)
        };
        if refuse {
            // Closed before a byte is exchanged: the client's connection attempt fails.
            shared.refused.fetch_add(1, Ordering::SeqCst);
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(server) = TcpStream::connect(shared.upstream) else {
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let link = Arc::new(Link {
            frozen: AtomicBool::new(silent),
            cut: AtomicBool::new(false),
        });
        for s in [&client, &server] {
            let _ = s.set_nonblocking(false);
            let _ = s.set_read_timeout(Some(POLL));
            let _ = s.set_nodelay(true);
        }
        let (c2, s2) = match (client.try_clone(), server.try_clone()) {
            (Ok(c), Ok(s)) => (c, s),
            _ => continue,
        };
        {
            let (shared, link) = (shared.clone(), link.clone());
            std::thread::spawn(move || client_to_server(client, server, shared, link));
        }
        let shared = shared.clone();
        std::thread::spawn(move || server_to_client(s2, c2, shared, link));
    }
}

/// Whether a frontend message is a simple query that begins with `word` (case-insensitive).
fn is_query(kind: u8, body: &[u8], word: &str) -> bool {
    kind == b'Q'
        && body.len() >= word.len()
        && body[..word.len()].eq_ignore_ascii_case(word.as_bytes())
}

/// Whether a frontend message is the simple query `COMMIT`.
fn is_commit(kind: u8, body: &[u8]) -> bool {
    kind == b'Q'
        && std::str::from_utf8(body)
            .map(|q| {
                q.trim_end_matches('\0')
                    .trim()
                    .eq_ignore_ascii_case("COMMIT")
            })
            .unwrap_or(false)
}

/// Where the reply to a COMMIT starts in `bytes`: its CommandComplete, tagged `COMMIT` (or
/// `ROLLBACK` when the transaction had failed).
fn commit_reply(bytes: &[u8]) -> Option<usize> {
    let complete = |tag: &[u8]| {
        let mut m = vec![b'C'];
        m.extend_from_slice(&(4 + tag.len() as u32 + 1).to_be_bytes());
        m.extend_from_slice(tag);
        m.push(0);
        m
    };
    [complete(b"COMMIT"), complete(b"ROLLBACK")]
        .iter()
        .filter_map(|m| bytes.windows(m.len()).position(|w| w == m.as_slice()))
        .min()
}

/// Waits, forwarding nothing, until the proxy stops.
fn park(shared: &Shared) {
    while !shared.stop.load(Ordering::SeqCst) {
        std::thread::sleep(POLL);
    }
}

/// Client → server, one whole frontend message at a time, watching for COMMIT.
fn client_to_server(
    mut client: TcpStream,
    mut server: TcpStream,
    shared: Arc<Shared>,
    link: Arc<Link>,
) {
    let mut pending: Vec<u8> = Vec::new();
    // Whether this connection is inside a transaction, counted in `shared.in_tx` until it
    // ends or the connection does.
    struct InTx<'a>(&'a Shared, bool);
    impl InTx<'_> {
        fn set(&mut self, on: bool) {
            if on != self.1 {
                if on {
                    self.0.in_tx.fetch_add(1, Ordering::SeqCst);
                } else {
                    self.0.in_tx.fetch_sub(1, Ordering::SeqCst);
                }
                self.1 = on;
            }
        }
    }
    impl Drop for InTx<'_> {
        fn drop(&mut self) {
            self.set(false);
        }
    }
    let mut in_tx = InTx(&shared, false);
    // The startup packet (and an SSL/GSS request before it) has no type byte.
    let mut untyped = true;
    // After TLS starts the stream cannot be parsed: pass it through.
    let mut opaque = false;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        if link.frozen.load(Ordering::SeqCst) {
            return park(&shared);
        }
        let n = match client.read(&mut buf) {
            Ok(0) => {
                let _ = server.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => {
                let _ = server.shutdown(Shutdown::Both);
                return;
            }
        };
        if link.frozen.load(Ordering::SeqCst) {
            return park(&shared);
        }
        if opaque {
            if server.write_all(&buf[..n]).is_err() {
                return;
            }
            continue;
        }
        pending.extend_from_slice(&buf[..n]);
        loop {
            let head = if untyped { 4 } else { 5 };
            if pending.len() < head {
                break;
            }
            let len_at = if untyped { 0 } else { 1 };
            let len = u32::from_be_bytes([
                pending[len_at],
                pending[len_at + 1],
                pending[len_at + 2],
                pending[len_at + 3],
            ]) as usize;
            if !(4..=(1 << 30)).contains(&len) {
                opaque = true;
                break;
            }
            let total = len_at + len;
            if pending.len() < total {
                break;
            }
            let message: Vec<u8> = pending.drain(..total).collect();
            if untyped {
                let code = message
                    .get(4..8)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                    .unwrap_or(0);
                // SSLRequest / GSSENCRequest: what follows may be encrypted, so it is passed
                // through unparsed (the faults need `sslmode=disable`).
                opaque = code == 80_877_103 || code == 80_877_104;
                untyped = false;
                if server.write_all(&message).is_err() {
                    return;
                }
                continue;
            }
            let commit = is_commit(message[0], &message[5..]);
            if is_query(message[0], &message[5..], "BEGIN") {
                in_tx.set(true);
            }
            let fault = if commit {
                let mut c = shared.control.lock().expect("proxy control lock");
                let others = shared.in_tx.load(Ordering::SeqCst) - usize::from(in_tx.1);
                let fault = if c.armed.is_some() && c.skip > 0 {
                    c.skip -= 1;
                    None
                } else if c.overlap && others == 0 {
                    None
                } else {
                    c.armed.take()
                };
                if let Some(f) = fault {
                    c.fired.push((f, Instant::now()));
                    match f {
                        Fault::LoseReply(refuse_for) => {
                            c.refuse_until = Some(Instant::now() + refuse_for);
                        }
                        Fault::SilenceBeforeCommit | Fault::SilenceAfterCommit => c.silent = true,
                        Fault::DropBeforeCommit => {}
                    }
                }
                fault
            } else {
                None
            };
            match fault {
                None => {}
                Some(Fault::LoseReply(_)) => link.cut.store(true, Ordering::SeqCst),
                Some(Fault::SilenceBeforeCommit) => {
                    link.frozen.store(true, Ordering::SeqCst);
                    return park(&shared);
                }
                Some(Fault::SilenceAfterCommit) => link.frozen.store(true, Ordering::SeqCst),
                Some(Fault::DropBeforeCommit) => {
                    let _ = client.shutdown(Shutdown::Both);
                    let _ = server.shutdown(Shutdown::Both);
                    return;
                }
            }
            if commit || is_query(message[0], &message[5..], "ROLLBACK") {
                in_tx.set(false);
            }
            if server.write_all(&message).is_err() {
                return;
            }
            if link.frozen.load(Ordering::SeqCst) {
                return park(&shared);
            }
        }
        if opaque && !pending.is_empty() {
            if server.write_all(&pending).is_err() {
                return;
            }
            pending.clear();
        }
    }
}

/// Server → client, unless frozen; after a cut COMMIT, swallows the reply and closes.
fn server_to_client(
    mut server: TcpStream,
    mut client: TcpStream,
    shared: Arc<Shared>,
    link: Arc<Link>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    // After a cut COMMIT: the server's bytes until the COMMIT's reply.
    let mut held: Vec<u8> = Vec::new();
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        if link.frozen.load(Ordering::SeqCst) {
            return park(&shared);
        }
        let n = match server.read(&mut buf) {
            Ok(0) => {
                let _ = client.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => {
                let _ = client.shutdown(Shutdown::Both);
                return;
            }
        };
        if link.frozen.load(Ordering::SeqCst) {
            return park(&shared);
        }
        if link.cut.load(Ordering::SeqCst) {
            // Replies to statements sent before the COMMIT (a client may pipeline them with
            // it) are delivered; the COMMIT's reply never is, so the COMMIT has run on the
            // server when both sides are closed.
            held.extend_from_slice(&buf[..n]);
            if let Some(at) = commit_reply(&held) {
                let _ = client.write_all(&held[..at]);
                let _ = client.shutdown(Shutdown::Both);
                let _ = server.shutdown(Shutdown::Both);
                return;
            }
            continue;
        }
        if client.write_all(&buf[..n]).is_err() {
            let _ = server.shutdown(Shutdown::Both);
            return;
        }
    }
}
