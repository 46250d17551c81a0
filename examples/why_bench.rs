//! Measures what a diagnosis costs the agent when a stall opens: `diagnose::take` (no CPU
//! window, as the agent takes it) of a Python process with 8 threads blocked on a loopback
//! socket, wall time per call, median of N. Baseline in the same run: one metrics read of the
//! same process (`sampler::read_tree`, what every sample does anyway). Prints medians and the
//! ratio.
//!
//! Run: `cargo run --release --example why_bench [calls]`.

use pipewatch::agent::metrics::sampler;
use pipewatch::diagnose::{self, Options};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const HANG: &str = r#"
import socket, sys, threading
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def wait():
    threading.Event().wait()
for _ in range(7):
    threading.Thread(target=wait, daemon=True).start()
c.recv(10)
"#;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let calls: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let server = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = server.local_addr()?.port().to_string();
    let mut kid = Command::new("python3")
        .args(["-c", HANG, &port])
        .stdin(Stdio::null())
        .spawn()?;
    let pid = kid.id();
    // Until it is blocked in recv with all its threads.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let d = diagnose::take(pid, &Options::default());
        if d.as_ref().is_some_and(|d| {
            d.verdict.kind.as_str() == "waiting_network" && d.snapshot.threads.len() == 8
        }) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the hanging process never hung");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut base = Vec::with_capacity(calls);
    let mut diag = Vec::with_capacity(calls);
    let mut bytes = 0;
    for _ in 0..calls {
        let t = Instant::now();
        std::hint::black_box(sampler::read_tree(&[pid], Instant::now(), 0.0));
        base.push(t.elapsed());
        let t = Instant::now();
        let d = diagnose::take(pid, &Options::default());
        diag.push(t.elapsed());
        bytes = d.map_or(0, |d| serde_json::to_string(&d.json).map_or(0, |s| s.len()));
    }
    let _ = kid.kill();
    let _ = kid.wait();
    let (b, d) = (median(base), median(diag));
    println!("calls: {calls} (8 threads, 1 socket)");
    println!("baseline sampler::read_tree median: {:?}", b);
    println!("diagnose::take (no window) median:   {:?}", d);
    println!(
        "ratio: {:.1}x; diagnosis JSON {} bytes",
        d.as_secs_f64() / b.as_secs_f64(),
        bytes
    );
    Ok(())
}
