//! The optional stack dumper (`stack_dump = "py-spy dump --pid {pid}"`): the command split
//! into words without a shell, `{pid}` replaced, run with a deadline and its output cut at a
//! size. Also the bounded runner other diagnosis commands (`dmesg`) use.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a stack dump may take.
pub const STACK_TIMEOUT: Duration = Duration::from_secs(5);
/// The most output kept of one stack dump.
pub const STACK_MAX_BYTES: usize = 16 * 1024;

/// Splits a command line into words the way a shell would for plain words and quotes
/// (`'…'`, `"…"`, backslash), without expanding anything. An error names the problem.
pub fn split_words(s: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err("a single quote is not closed".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c) => cur.push(c),
                            None => return Err("a double quote is not closed".into()),
                        },
                        Some(c) => cur.push(c),
                        None => return Err("a double quote is not closed".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => cur.push(c),
                    None => return Err("the command ends with a lone backslash".into()),
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

/// Validates a `stack_dump` value: words, a program, and `{pid}` somewhere.
pub fn parse_stack_dump(s: &str) -> Result<Vec<String>, String> {
    let words = split_words(s)?;
    if words.is_empty() {
        return Err("is empty: give a command such as \"py-spy dump --pid {pid}\"".into());
    }
    if !words.iter().any(|w| w.contains("{pid}")) {
        return Err("must contain {pid} (replaced by the daemon's process id)".into());
    }
    Ok(words)
}

/// What a bounded command printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// stdout, then stderr when stdout is empty; cut at the byte limit.
    pub text: String,
    pub truncated: bool,
    pub timed_out: bool,
    /// The exit code; `None` when killed (timeout) or ended by a signal.
    pub code: Option<i32>,
}

/// Runs `argv` without a shell, stdin closed, killed after `timeout`, keeping at most
/// `max_bytes` of output. An error when it cannot be started.
pub fn run_bounded(argv: &[String], timeout: Duration, max_bytes: usize) -> Result<Output, String> {
    let (prog, args) = argv.split_first().ok_or("no command")?;
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {prog}: {e}"))?;
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            let mut truncated = false;
            if let Some(mut p) = pipe {
                let mut buf = [0u8; 8192];
                // Keep reading to the end so the child never blocks on a full pipe.
                while let Ok(n) = p.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let room = max_bytes.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                    truncated |= n > room;
                }
            }
            (kept, truncated)
        })
    };
    let out = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() >= deadline => {
                timed_out = true;
                let _ = child.kill();
                break child.wait().ok();
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => break None,
        }
    };
    // A grandchild holding the pipes open must not hold us: the readers are left behind
    // after the deadline (they end when the pipe closes).
    let join = |h: std::thread::JoinHandle<(Vec<u8>, bool)>| {
        let until = Instant::now() + Duration::from_millis(500);
        while !h.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        if h.is_finished() {
            h.join().unwrap_or_default()
        } else {
            (Vec::new(), false)
        }
    };
    let (o, o_trunc) = join(out);
    let (e, e_trunc) = join(err);
    let (bytes, truncated) = if o.is_empty() {
        (e, e_trunc)
    } else {
        (o, o_trunc)
    };
    Ok(Output {
        text: String::from_utf8_lossy(&bytes).into_owned(),
        truncated,
        timed_out,
        code: status.and_then(|s| s.code()),
    })
}

/// Runs the configured stack dumper for `pid`.
pub fn dump(argv: &[String], pid: u32) -> Result<Output, String> {
    let argv: Vec<String> = argv
        .iter()
        .map(|w| w.replace("{pid}", &pid.to_string()))
        .collect();
    run_bounded(&argv, STACK_TIMEOUT, STACK_MAX_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words() {
        let ok = |s: &str, w: &[&str]| {
            assert_eq!(
                split_words(s),
                Ok(w.iter().map(|s| s.to_string()).collect()),
                "{s}"
            )
        };
        ok(
            "py-spy dump --pid {pid}",
            &["py-spy", "dump", "--pid", "{pid}"],
        );
        ok(
            "  a  'b c'  \"d \\\" e\" f\\ g ''",
            &["a", "b c", "d \" e", "f g", ""],
        );
        ok("", &[]);
        assert!(split_words("a 'b").is_err());
        assert!(split_words("a \"b").is_err());
        assert!(parse_stack_dump("py-spy dump").is_err());
        assert!(parse_stack_dump("  ").is_err());
        assert!(parse_stack_dump("gdb -p {pid} -batch").is_ok());
    }

    #[test]
    fn bounded_runs() {
        let sh = |script: &str| vec!["sh".to_string(), "-c".to_string(), script.to_string()];
        let o = run_bounded(&sh("echo hello; exit 3"), Duration::from_secs(5), 100).unwrap();
        assert_eq!(
            (o.text.as_str(), o.code, o.timed_out),
            ("hello\n", Some(3), false)
        );
        let o = run_bounded(&sh("yes | head -c 100000"), Duration::from_secs(5), 1000).unwrap();
        assert_eq!((o.text.len(), o.truncated), (1000, true));
        let start = Instant::now();
        let o = run_bounded(&sh("exec sleep 30"), Duration::from_millis(300), 100).unwrap();
        assert!(o.timed_out && o.code.is_none(), "{o:?}");
        assert!(start.elapsed() < Duration::from_secs(5));
        let e = run_bounded(
            &["/nonexistent/prog".to_string()],
            Duration::from_secs(1),
            10,
        );
        assert!(e.unwrap_err().contains("cannot run /nonexistent/prog"));
    }
}
