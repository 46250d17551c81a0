//! Finding a daemon's processes: by pid file or by a regex over command lines, plus every
//! descendant (pipelines fork workers, and their cost belongs to the daemon).
//!
//! Reads `/proc` through sysinfo's process table and reads pid files; it never signals,
//! never writes, and never fails a sample: an unreadable pid file or a vanished process just
//! means "no process".

use regex::Regex;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use sysinfo::{ProcessRefreshKind, System, UpdateKind};

/// Pids whose command line matches `re` (threads and this agent itself excluded).
///
/// A one-off scan for `check-config`; the sampler uses [`ProcessTable::matching`] on the table
/// it refreshes anyway.
pub fn match_processes(re: &Regex) -> Vec<u32> {
    let mut sys = System::new();
    sys.refresh_processes_specifics(table_refresh_kind(true));
    let mut pids = ProcessTable::from_system(&sys).matching(re);
    pids.sort_unstable();
    pids
}

/// What a table refresh reads: the process list with parent links, and command lines (read
/// once per process) only when some daemon is matched by command line.
pub fn table_refresh_kind(with_cmd: bool) -> ProcessRefreshKind {
    let kind = ProcessRefreshKind::new();
    if with_cmd {
        kind.with_cmd(UpdateKind::OnlyIfNotSet)
    } else {
        kind
    }
}

/// Why a pid file gave no pid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PidFileError {
    /// The file could not be read (missing, permissions); carries the OS error text.
    Unreadable(String),
    /// The file's first word is not a positive integer; carries the text found.
    Invalid(String),
}

impl std::fmt::Display for PidFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PidFileError::Unreadable(e) => write!(f, "cannot read pid file: {e}"),
            PidFileError::Invalid(s) => write!(f, "pid file does not hold a pid: {s:?}"),
        }
    }
}

/// Reads the pid in a pid file (its first whitespace-separated word).
pub fn read_pid_file(path: &Path) -> Result<u32, PidFileError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| PidFileError::Unreadable(e.to_string()))?;
    parse_pid(&text)
}

/// Parses pid-file text: the first word, a positive integer.
pub fn parse_pid(text: &str) -> Result<u32, PidFileError> {
    let word = text.split_whitespace().next().unwrap_or("");
    match word.parse::<u32>() {
        Ok(pid) if pid > 0 => Ok(pid),
        _ => Err(PidFileError::Invalid(word.chars().take(40).collect())),
    }
}

/// A snapshot of the host's processes: parent links and command lines, without threads.
#[derive(Debug, Default, Clone)]
pub struct ProcessTable {
    /// Parent of each process (absent for the roots of the host).
    parents: HashMap<u32, u32>,
    /// Children of each process.
    children: HashMap<u32, Vec<u32>>,
    /// The command line of each process, words joined by single spaces.
    cmdlines: HashMap<u32, String>,
    /// The agent's own pid, never matched by a pattern.
    own_pid: u32,
}

impl ProcessTable {
    /// Builds the table from a refreshed sysinfo `System`, leaving threads out (sysinfo lists
    /// each thread as a process whose parent is its owner, which would double-count it).
    pub fn from_system(sys: &System) -> ProcessTable {
        let mut t = ProcessTable {
            own_pid: std::process::id(),
            ..ProcessTable::default()
        };
        for (pid, p) in sys.processes() {
            if p.thread_kind().is_some() {
                continue;
            }
            let pid = pid.as_u32();
            t.cmdlines.insert(pid, p.cmd().join(" "));
            if let Some(parent) = p.parent() {
                t.parents.insert(pid, parent.as_u32());
            }
        }
        t.link_children();
        t
    }

    /// Builds a table from explicit `(pid, parent, cmdline)` triples; for tests.
    pub fn from_entries(entries: &[(u32, Option<u32>, &str)]) -> ProcessTable {
        let mut t = ProcessTable::default();
        for (pid, parent, cmd) in entries {
            t.cmdlines.insert(*pid, (*cmd).to_string());
            if let Some(pp) = parent {
                t.parents.insert(*pid, *pp);
            }
        }
        t.link_children();
        t
    }

    fn link_children(&mut self) {
        self.children.clear();
        for (pid, parent) in &self.parents {
            if self.cmdlines.contains_key(parent) {
                self.children.entry(*parent).or_default().push(*pid);
            }
        }
    }

    /// Whether the process exists in this snapshot.
    pub fn contains(&self, pid: u32) -> bool {
        self.cmdlines.contains_key(&pid)
    }

    /// Processes whose command line matches, keeping only the topmost of each matched
    /// subtree (a forked worker often has its parent's command line; it is counted through
    /// its parent). Kernel threads (empty command line) and the agent never match.
    pub fn matching(&self, re: &Regex) -> Vec<u32> {
        let matched: HashSet<u32> = self
            .cmdlines
            .iter()
            .filter(|(pid, cmd)| **pid != self.own_pid && !cmd.is_empty() && re.is_match(cmd))
            .map(|(pid, _)| *pid)
            .collect();
        let mut roots: Vec<u32> = matched
            .iter()
            .copied()
            .filter(|pid| !self.ancestors(*pid).any(|a| matched.contains(&a)))
            .collect();
        roots.sort_unstable();
        roots
    }

    /// The ancestors of `pid`, nearest first (bounded, in case of a corrupt parent cycle).
    fn ancestors(&self, pid: u32) -> impl Iterator<Item = u32> + '_ {
        let mut cur = pid;
        let mut steps = 0;
        std::iter::from_fn(move || {
            steps += 1;
            if steps > 4096 {
                return None;
            }
            let parent = *self.parents.get(&cur)?;
            if parent == cur {
                return None;
            }
            cur = parent;
            Some(parent)
        })
    }

    /// The given roots that exist plus all their descendants, each once, sorted.
    pub fn tree(&self, roots: &[u32]) -> Vec<u32> {
        let mut seen = HashSet::new();
        let mut stack: Vec<u32> = roots
            .iter()
            .copied()
            .filter(|p| self.contains(*p))
            .collect();
        while let Some(pid) = stack.pop() {
            if !seen.insert(pid) {
                continue;
            }
            if let Some(kids) = self.children.get(&pid) {
                stack.extend(kids.iter().copied());
            }
        }
        let mut out: Vec<u32> = seen.into_iter().collect();
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_pid(text: &str, expected: Result<u32, PidFileError>) {
        assert_eq!(parse_pid(text), expected, "pid file text {text:?}");
    }

    #[test]
    fn pid_file_text() {
        check_pid("1234\n", Ok(1234));
        check_pid("  77  extra words\n", Ok(77));
        check_pid("", Err(PidFileError::Invalid(String::new())));
        check_pid("0\n", Err(PidFileError::Invalid("0".into())));
        check_pid("-5", Err(PidFileError::Invalid("-5".into())));
        check_pid("abc", Err(PidFileError::Invalid("abc".into())));
        check_pid(
            "99999999999",
            Err(PidFileError::Invalid("99999999999".into())),
        );
    }

    #[test]
    fn missing_pid_file_is_unreadable() {
        let r = read_pid_file(Path::new("/nonexistent/pipewatch-test.pid"));
        assert!(matches!(r, Err(PidFileError::Unreadable(_))), "{r:?}");
    }

    fn table() -> ProcessTable {
        ProcessTable::from_entries(&[
            (1, None, "/sbin/init"),
            (10, Some(1), "python3 -m clusterer --config a"),
            (11, Some(10), "python3 -m clusterer --config a"),
            (12, Some(10), "python3 -c worker"),
            (13, Some(12), "sort -u"),
            (20, Some(1), "python3 -m ingester"),
            (21, Some(20), "python3 -m clusterer --dry-run"),
            (30, Some(1), ""),
        ])
    }

    #[test]
    fn matching_keeps_topmost_matches() {
        let t = table();
        let re = Regex::new(r"python3? .*clusterer").expect("valid test regex");
        assert_eq!(t.matching(&re), vec![10, 21]);
        let re = Regex::new(r".*").expect("valid test regex");
        assert_eq!(t.matching(&re), vec![1], "empty command lines never match");
        let re = Regex::new(r"nothing-like-this").expect("valid test regex");
        assert!(t.matching(&re).is_empty());
    }

    #[test]
    fn tree_includes_all_descendants_once() {
        let t = table();
        assert_eq!(t.tree(&[10]), vec![10, 11, 12, 13]);
        assert_eq!(t.tree(&[10, 12]), vec![10, 11, 12, 13]);
        assert_eq!(t.tree(&[20]), vec![20, 21]);
        assert_eq!(t.tree(&[999]), Vec::<u32>::new());
    }

    #[test]
    fn real_table_finds_this_process_tree() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep runs");
        let mut sys = System::new();
        sys.refresh_processes_specifics(table_refresh_kind(true));
        let t = ProcessTable::from_system(&sys);
        let me = std::process::id();
        let tree = t.tree(&[me]);
        assert!(tree.contains(&child.id()), "{tree:?}");
        let re = Regex::new("^sleep 30$").expect("valid test regex");
        assert!(t.matching(&re).contains(&child.id()));
        child.kill().expect("kill own child");
        child.wait().expect("reap own child");
    }
}
