//! One reader per daemon, on its own thread: discovers the daemon's files, reads new bytes,
//! splits, parses, applies rules, routes, and sends chunks of rows with the file position
//! after them. The only module that opens log files.
//!
//! Which file is which and where to resume is decided by [`crate::agent::identity`]; this
//! module does discovery (globs, rename and copytruncate rotation, deleted-but-open files,
//! compressed files never read, files claimed by an earlier daemon), holds at most
//! `max_open_files` open, and checks on every read that the bytes before the read position
//! are still the bytes it read. File notifications ([`crate::agent::watch`]) are hints; a poll
//! is the truth.

use crate::agent::activity::{FileActivity, ProgressActivity, SharedActivity};
use crate::agent::batch::{Checkpoint, FileChunk, Item};
use crate::agent::copyrow;
use crate::agent::fingerprint::{
    compressed_name, hash_tail_bytes, looks_compressed, tail_hash, window_tail_fnv,
    window_tail_hash, TAIL_BYTES,
};
use crate::agent::identity::{self, content_moved, Anchors, Catalog, Mark, Resume, HEAD_BYTES};
use crate::agent::lines::LineSplitter;
use crate::agent::parse::{ParseOptions, Parser};
use crate::agent::route::{path_captures, route_fields, SourceContext};
use crate::agent::rules::Sticky;
use crate::config::{DaemonConfig, StartAt};
use crate::model::{EventRow, Level, Record};
use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How often globs are expanded and files checked when no notification can arrive.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// The longest poll interval of a reader whose directories are watched while something is
/// pending on time (a possible copy, a file waiting for a slot, a renamed-away file, a degraded
/// watcher), reached by doubling [`POLL_INTERVAL`] while nothing changes.
pub const IDLE_POLL_MAX: Duration = Duration::from_secs(5);
/// The longest poll interval of a reader whose directories are watched and whose files are
/// all armed for their next write, with nothing pending on time: notifications wake it for
/// new names and new data; the poll is the safety net.
pub const IDLE_POLL_ARMED: Duration = Duration::from_secs(30);
/// How long a file that was renamed away or deleted is kept open after its last growth.
pub const ROTATED_GRACE: Duration = Duration::from_secs(2);
/// How long an idle file at EOF stays open before it is let go (reopened when it grows).
pub const IDLE_CLOSE: Duration = Duration::from_secs(60);
/// How long a new file that is still a prefix of a file being read waits to be told apart
/// (a copytruncate's copy: the original is truncated right after) after its last change.
pub const COPY_WAIT: Duration = Duration::from_secs(10);
/// The longest a new file waits as a possible copy, however it grows meanwhile (a file that
/// stays a growing prefix of another, e.g. written through `tee`, is a file of its own).
pub const COPY_WAIT_MAX: Duration = Duration::from_secs(60);

/// How often a file that could not be opened is tried again.
const UNREADABLE_RETRY: Duration = Duration::from_secs(30);
/// Bytes read per read call.
const READ_BYTES: usize = 256 * 1024;
/// Records per chunk sent to the batcher, at most.
const CHUNK_RECORDS: usize = 1000;
/// Encoded log bytes per chunk sent to the batcher, at most (a chunk holds at least one row).
const CHUNK_BYTES: usize = 1024 * 1024;

/// What a notify event says: file names changed (look for new files now), or only contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    Names,
    Data,
}

/// A position stored in `pipewatch_checkpoints`.
pub type StoredCheckpoint = Mark;

/// What a reader needs from the agent.
pub struct ReaderSetup {
    pub daemon: Arc<DaemonConfig>,
    pub host: String,
    /// Backfill mode: read every file to EOF once, then finish.
    pub once: bool,
    pub max_records: usize,
    pub max_wait: Duration,
    /// At most this many files open at once (the longest idle at EOF are let go first).
    pub max_open_files: usize,
    /// Daemons earlier in the config and their globs: a path one of them matches is theirs.
    pub earlier: Vec<(String, Vec<glob::Pattern>)>,
    /// This daemon's committed positions, oldest first.
    pub checkpoints: Vec<StoredCheckpoint>,
    pub tx: mpsc::Sender<Item>,
    pub activity: SharedActivity,
    pub stop: CancellationToken,
    /// Notify hints (any message means "look now").
    pub wake: std::sync::mpsc::Receiver<Hint>,
    /// Every directory of the daemon's globs is watched: hints arrive, so the poll may back
    /// off while idle (otherwise it stays at [`POLL_INTERVAL`]).
    pub watched: bool,
    /// The notifications, to arm files for their next write when idle.
    pub watch: Option<Arc<crate::agent::watch::Watch>>,
}

/// Why discovery skips a path until it changes.
#[derive(Debug, Clone, PartialEq)]
enum Skip {
    /// Compressed: never read.
    Compressed,
    /// Still a prefix of the file being read under this key: maybe a copy about to be
    /// truncated. Looked at again when it changes, when that file ends, or after
    /// [`COPY_WAIT`].
    CopyOf(String),
    /// Let go while idle at EOF.
    Idle,
    /// Could not be opened (permissions): said once, tried again when its permissions change
    /// and every [`UNREADABLE_RETRY`].
    Unreadable,
    /// An earlier daemon's glob matches it: that daemon ships it.
    Claimed,
}

#[derive(Debug, Clone, PartialEq)]
struct Seen {
    dev: u64,
    ino: u64,
    len: u64,
    /// Status change time (a `chmod` or `setfacl` changes it), in nanoseconds.
    ctime: i128,
    /// When this path was first skipped for the same reason (bounds the wait of a copy).
    first: Instant,
    skip: Skip,
    at: Instant,
}

struct Tracked {
    /// The path the file was opened at: the `source` of its rows.
    path: PathBuf,
    source: String,
    dev: u64,
    ino: u64,
    file: File,
    /// The lineage key its positions are committed under.
    key: String,
    /// The first (up to [`HEAD_BYTES`]) bytes of the file, as read.
    head: Vec<u8>,
    /// Recent line ends and the checksum before each.
    anchors: Anchors,
    splitter: LineSplitter,
    parser: Parser,
    sticky: Sticky,
    captures: Map<String, Value>,
    /// Offset of the next read.
    read_pos: u64,
    /// Last time bytes were read (or the file was opened).
    last_data: Instant,
    /// The path no longer refers to this file (renamed away or deleted).
    rotated: bool,
    /// Reached EOF at the last read.
    at_eof: bool,
    /// The (up to) [`TAIL_BYTES`] bytes before `read_pos`, for position checksums.
    carry: Vec<u8>,
}

/// The bytes in hand around a read buffer.
struct Window {
    carry: Vec<u8>,
    buf_start: u64,
}

/// The per-daemon reader.
pub struct Reader {
    setup: ReaderSetup,
    files: Vec<Tracked>,
    seen: HashMap<PathBuf, Seen>,
    catalog: Catalog,
    /// Sticky values of the file last read at a path, inherited by the next file there.
    sticky_by_path: HashMap<String, Sticky>,
    /// Paths whose failure was reported (once each, until they can be read again).
    reported: HashSet<String>,
    /// Files matched but not opened for lack of a free slot at the last discovery.
    waiting_for_slot: usize,
    /// A new file matched at the last discovery was still empty: a data hint means "look for
    /// files again" then, not only "read".
    empty_matched: bool,
    /// The empty files matched at the last discovery (armed for their first write).
    empty_paths: Vec<PathBuf>,
    /// Watch descriptors of the files armed for their next write.
    armed: HashSet<i32>,
    /// A file was let go because it was truncated or replaced: look for files again soon.
    rediscover: bool,
    opts: ParseOptions,
    buf: Vec<u8>,
    records: Vec<(Record, u64)>,
}

/// What one read of a file found.
#[derive(Debug, PartialEq)]
enum ReadOutcome {
    /// Nothing new (at EOF).
    Nothing,
    /// Bytes, fewer than asked for: the file's end was reached.
    CaughtUp,
    /// A full buffer, or a file let go: read again right away.
    More,
}

/// Why a reader stopped sending.
#[derive(Debug, PartialEq)]
enum Flow {
    Continue,
    /// The batcher is gone (shutdown).
    Closed,
}

impl Reader {
    pub fn new(setup: ReaderSetup) -> Reader {
        let mut sticky_by_path = HashMap::new();
        for cp in &setup.checkpoints {
            sticky_by_path.insert(cp.path.clone(), Sticky::from_json(&cp.sticky));
        }
        let catalog = Catalog::load(setup.checkpoints.clone());
        let opts = ParseOptions {
            format: setup.daemon.format,
            text_pattern: setup.daemon.text_pattern.clone(),
        };
        Reader {
            setup,
            files: Vec::new(),
            seen: HashMap::new(),
            catalog,
            sticky_by_path,
            reported: HashSet::new(),
            waiting_for_slot: 0,
            empty_matched: false,
            empty_paths: Vec::new(),
            armed: HashSet::new(),
            rediscover: false,
            opts,
            buf: vec![0; READ_BYTES],
            records: Vec::new(),
        }
    }

    /// Runs until stopped (or, with `once`, until every file is read to EOF).
    pub fn run(mut self) {
        let name = self.setup.daemon.name.clone();
        tracing::debug!(daemon = %name, "reader started");
        self.discover(true);
        let mut last_discover = Instant::now();
        let mut idle_poll = POLL_INTERVAL;
        // Every file of interest is armed for its next write (since the last wake-up).
        let mut armed = false;
        loop {
            if self.setup.stop.is_cancelled() {
                break;
            }
            let mut progressed = false;
            // Bytes were read but every read was short: caught up for now.
            let mut got_data = false;
            let order = self.read_order();
            let tracked = self.files.len();
            for i in order {
                // A file let go (truncated) shifts the indices: start the round again.
                if self.setup.stop.is_cancelled() || self.files.len() != tracked {
                    break;
                }
                match self.read_some(i) {
                    Ok(ReadOutcome::More) => progressed = true,
                    Ok(ReadOutcome::CaughtUp) => got_data = true,
                    Ok(ReadOutcome::Nothing) => {}
                    Err(Flow::Closed) => return,
                    Err(Flow::Continue) => {}
                }
            }
            if self.setup.once {
                progressed |= got_data;
            }
            if self.setup.once {
                if !progressed {
                    if self.flush_all(Duration::ZERO) == Flow::Closed {
                        return;
                    }
                    if self.waiting_for_slot == 0 {
                        break;
                    }
                    // More files than slots: let the finished ones go and open the next.
                    self.let_go_finished();
                    self.discover(true);
                }
                continue;
            }
            if self.flush_all(self.setup.max_wait) == Flow::Closed {
                return;
            }
            self.let_go();
            let mut names_changed = false;
            // The watcher can be trusted to wake this reader: polls may be rare.
            let trusted =
                self.setup.watched && self.setup.watch.as_ref().is_some_and(|w| w.healthy());
            let calm = trusted && self.nothing_pending();
            let cap = if calm { IDLE_POLL_ARMED } else { IDLE_POLL_MAX };
            // Nothing waits on time and a write or a new name wakes this reader: the
            // safety-net poll starts backed off instead of doubling its way up from 250 ms.
            idle_poll = if calm { cap } else { idle_poll.min(cap) };
            if got_data && !progressed {
                // Data is flowing and every file is caught up: read again at the next read of
                // the readers' shared grid, without waiting for a hint (one wake-up per period
                // while a file is written steadily, however many writes there are, and in step
                // with the other readers, so their chunks make one batch; armed files fired
                // once).
                // Watched: a new or renamed file is a name event and a truncation is seen by
                // the read itself, so the safety-net poll stays backed off (not every 250 ms).
                idle_poll = if trusted { cap } else { POLL_INTERVAL };
                armed = false;
                std::thread::sleep(crate::agent::batch::until_next_read(self.setup.max_wait));
            } else if !progressed {
                // Idle: arm the files for their next write first, then read once more (a
                // write just before the watches were in place is not missed), then wait.
                if !armed {
                    armed = true;
                    if self.arm() {
                        continue;
                    }
                }
                // A held record is handed over after `max_wait`: wake up for it.
                let holding = self.files.iter().any(|t| t.parser.holding());
                let wait = if holding {
                    idle_poll.min(POLL_INTERVAL)
                } else {
                    idle_poll
                };
                // A hint usually means a write has begun; waiting for the grid's next read lets
                // a burst of writes be read at once, in the same batch as the other readers'.
                match self.setup.wake.recv_timeout(wait) {
                    Ok(hint) => {
                        names_changed = hint == Hint::Names || self.empty_matched;
                        idle_poll = POLL_INTERVAL;
                        armed = false;
                        std::thread::sleep(crate::agent::batch::until_next_read(
                            self.setup.max_wait,
                        ));
                    }
                    // Nothing happened for a whole interval: a watched reader polls less
                    // often (a notification still wakes it at once).
                    Err(_) if self.setup.watched => {
                        idle_poll = (idle_poll * 2).min(cap);
                    }
                    Err(_) => {}
                }
            }
            // The agent stopping wakes idle readers with a hint: nothing more to do.
            if self.setup.stop.is_cancelled() {
                break;
            }
            while let Ok(hint) = self.setup.wake.try_recv() {
                names_changed |= hint == Hint::Names || self.empty_matched;
                armed = false;
            }
            // New files are looked for when names change (a file created or rotated), after a
            // file was let go as truncated, and otherwise once per poll interval, the safety
            // net for missed events.
            if names_changed || self.rediscover || last_discover.elapsed() >= idle_poll {
                if self.waiting_for_slot > 0 {
                    self.let_go_finished();
                }
                self.rediscover = false;
                self.discover(false);
                last_discover = Instant::now();
                armed = false;
            }
        }
        tracing::debug!(daemon = %name, "reader stopped");
    }

    /// Arms every file of interest for its next write: the open files (through their
    /// descriptors, so a renamed-away file is the one armed), files let go while idle or
    /// waiting as possible copies, and empty files. Watches of files no longer of interest
    /// are removed. Whether any was armed.
    fn arm(&mut self) -> bool {
        let Some(w) = self.setup.watch.clone() else {
            return false;
        };
        let mut now = HashSet::new();
        for t in &self.files {
            let target = PathBuf::from(format!("/proc/self/fd/{}", t.file.as_raw_fd()));
            now.extend(w.arm(&target, &t.path));
        }
        for (path, s) in &self.seen {
            if matches!(s.skip, Skip::Idle | Skip::CopyOf(_)) {
                now.extend(w.arm(path, path));
            }
        }
        for path in &self.empty_paths {
            now.extend(w.arm(path, path));
        }
        for wd in self.armed.difference(&now) {
            w.disarm(*wd);
        }
        let any = !now.is_empty();
        self.armed = now;
        any
    }

    /// Nothing waits on time: no possible copy, unreadable file or file waiting for a slot,
    /// no renamed-away file in its grace period, no empty file (its first write must be
    /// seen), no held record.
    fn nothing_pending(&self) -> bool {
        self.waiting_for_slot == 0
            && !self.empty_matched
            && self.files.iter().all(|t| !t.rotated && !t.parser.holding())
            && self
                .seen
                .values()
                .all(|s| !matches!(s.skip, Skip::CopyOf(_) | Skip::Unreadable))
    }

    /// Files renamed away first (they will not grow much longer), then the rest.
    fn read_order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.files.len()).collect();
        order.sort_by_key(|&i| !self.files[i].rotated);
        order
    }

    /// Expands the globs, starts reading new files, notices renamed and replaced ones.
    fn discover(&mut self, startup: bool) {
        let daemon = Arc::clone(&self.setup.daemon);
        for t in &mut self.files {
            match std::fs::metadata(&t.path) {
                Ok(m) if m.dev() == t.dev && m.ino() == t.ino => {}
                _ => {
                    if !t.rotated {
                        tracing::debug!(path = %t.source, "file renamed away or deleted; reading it to its end");
                    }
                    t.rotated = true;
                }
            }
        }
        self.check_replaced();
        let mut found: Vec<(PathBuf, std::fs::Metadata)> = Vec::new();
        let mut dir_errors: HashSet<String> = HashSet::new();
        let mut present: HashSet<(u64, u64)> = HashSet::new();
        for pattern in &daemon.logs {
            let paths = match glob::glob(pattern) {
                Ok(p) => p,
                Err(_) => continue,
            };
            for entry in paths {
                match entry {
                    Ok(path) => {
                        if let Ok(m) = std::fs::metadata(&path) {
                            if m.is_file() {
                                present.insert((m.dev(), m.ino()));
                                found.push((path, m));
                            }
                        }
                    }
                    Err(e) => {
                        let dir = e.path().to_string_lossy().into_owned();
                        let error = e.error().to_string();
                        self.cannot_read(&dir, &error, "cannot list a log directory");
                        dir_errors.insert(dir);
                    }
                }
            }
        }
        for t in &self.files {
            present.insert((t.dev, t.ino));
        }
        // Marks of files that are gone become orphans a copy may adopt; old ones are forgotten.
        self.catalog.sweep(&|d, i| present.contains(&(d, i)));
        // Forget what is gone: skip notes of paths no longer matched, and sticky values of
        // paths long gone once they outnumber the files by far.
        let paths: HashSet<&Path> = found.iter().map(|(p, _)| p.as_path()).collect();
        self.seen.retain(|p, _| paths.contains(p.as_path()));
        // A directory listed again, a file gone: no longer unreadable.
        let healed: Vec<String> = self
            .reported
            .iter()
            .filter(|p| !dir_errors.contains(*p) && !paths.contains(Path::new(p.as_str())))
            .cloned()
            .collect();
        for p in healed {
            self.readable_again(&p);
        }
        if self.sticky_by_path.len() > 4 * (paths.len() + self.files.len()) + 64 {
            let open: HashSet<&str> = self.files.iter().map(|t| t.source.as_str()).collect();
            self.sticky_by_path
                .retain(|p, _| paths.contains(Path::new(p)) || open.contains(p.as_str()));
        }
        drop(paths);
        // Files with a known position first, so a truncated file's old position is an orphan
        // before the copy is considered.
        found.sort_by_key(|(_, m)| !self.catalog.knows(m.dev(), m.ino()));
        self.waiting_for_slot = 0;
        self.empty_matched = false;
        self.empty_paths.clear();
        for (path, meta) in found {
            self.consider(&path, &meta, startup);
        }
    }

    /// A file whose bytes before the read position changed under the same handle was
    /// truncated and rewritten.
    fn check_replaced(&mut self) {
        let mut i = 0;
        while i < self.files.len() {
            let t = &self.files[i];
            let len = t.file.metadata().map(|m| m.len()).unwrap_or(0);
            let replaced = len < t.read_pos
                || content_moved(&t.file, t.read_pos, &t.head, &t.carry).unwrap_or(false);
            if replaced {
                if self.replaced(i).is_err() {
                    return;
                }
                continue;
            }
            i += 1;
        }
    }

    /// Hands over what the parser holds, lets the file go (its position becomes an orphan a
    /// copy can adopt) and looks again at files that waited as its possible copies.
    fn truncated(&mut self, i: usize) -> Flow {
        let flow = self.flush_file(i);
        let t = self.files.remove(i);
        self.rediscover = true;
        self.seen.remove(&t.path);
        self.seen
            .retain(|_, s| !matches!(&s.skip, Skip::CopyOf(k) if *k == t.key));
        self.catalog.ended(&t.key, t.head, t.anchors);
        flow
    }

    /// Reports a file or directory that cannot be read: once, as a warning and an
    /// `agent_error` event, and in the agent's activity (status, `run --once`'s exit code).
    fn cannot_read(&mut self, path: &str, error: &str, what: &str) {
        if let Ok(mut a) = self.setup.activity.lock() {
            a.unreadable.insert(path.to_string(), error.to_string());
        }
        if !self.reported.insert(path.to_string()) {
            return;
        }
        let user = current_user();
        tracing::warn!(daemon = %self.setup.daemon.name, %path, %error, "{what}; retrying every {} s", UNREADABLE_RETRY.as_secs());
        let message = format!(
            "{what} {path}: {error} — the agent runs as {user}: add it to the file's group or \
             grant it read access (setfacl -m u:{user}:r FILE, and X on the directories)"
        );
        let event = EventRow {
            ts: Utc::now(),
            experiment_id: self.setup.daemon.experiment_id,
            node_id: None,
            event_type: "agent_error".into(),
            severity: Level::Error,
            message: Some(message),
            details: json!({"path": path, "error": error, "daemon": self.setup.daemon.name}),
            host: self.setup.host.clone(),
            daemon: self.setup.daemon.name.clone(),
        };
        let _ = self.setup.tx.blocking_send(Item::Rows {
            metrics: Vec::new(),
            events: vec![event],
        });
    }

    fn readable_again(&mut self, path: &str) {
        if self.reported.remove(path) {
            tracing::info!(daemon = %self.setup.daemon.name, %path, "log file readable again");
        }
        if let Ok(mut a) = self.setup.activity.lock() {
            a.unreadable.remove(path);
        }
    }

    /// The daemon earlier in the config whose glob matches `path`, if any.
    fn claimed_by(&self, path: &Path) -> Option<&str> {
        self.setup
            .earlier
            .iter()
            .find(|(_, globs)| globs.iter().any(|g| g.matches_path(path)))
            .map(|(name, _)| name.as_str())
    }

    fn skip(&mut self, path: &Path, meta: &std::fs::Metadata, skip: Skip) {
        let first = match self.seen.get(path) {
            Some(s) if s.skip == skip && s.dev == meta.dev() && s.ino == meta.ino() => s.first,
            _ => Instant::now(),
        };
        self.seen.insert(
            path.to_path_buf(),
            Seen {
                dev: meta.dev(),
                ino: meta.ino(),
                len: meta.len(),
                ctime: ctime_of(meta),
                first,
                skip,
                at: Instant::now(),
            },
        );
    }

    fn consider(&mut self, path: &Path, meta: &std::fs::Metadata, startup: bool) {
        if compressed_name(path) {
            return;
        }
        let (dev, ino, len) = (meta.dev(), meta.ino(), meta.len());
        if let Some(t) = self.files.iter_mut().find(|t| t.dev == dev && t.ino == ino) {
            if t.path == path {
                t.rotated = false;
            }
            return;
        }
        if let Some(s) = self.seen.get(path) {
            let unchanged = match &s.skip {
                Skip::Compressed | Skip::Claimed => true,
                // Permissions may be fixed without the file changing: look again now and then.
                Skip::Unreadable => s.ctime == ctime_of(meta) && s.at.elapsed() < UNREADABLE_RETRY,
                Skip::Idle => s.len == len,
                Skip::CopyOf(of) => {
                    s.len == len
                        && s.at.elapsed() < COPY_WAIT
                        && (self.catalog.is_live(of) || self.files.iter().any(|t| t.key == *of))
                }
            };
            if s.dev == dev && s.ino == ino && unchanged {
                return;
            }
        }
        if let Some(owner) = self.claimed_by(path) {
            tracing::warn!(daemon = %self.setup.daemon.name, path = %path.display(), %owner, "file matches the globs of two daemons; shipped by {owner}, the first in the config");
            self.skip(path, meta, Skip::Claimed);
            return;
        }
        // A known file now shorter than its position was truncated: its position is an orphan
        // a copy may adopt, even while the file itself has nothing to read.
        self.catalog.shrunk(dev, ino, len);
        if len == 0 {
            // Opened once it has bytes: its first write's hint looks again at once (a file
            // created empty and renamed away soon after must not be missed).
            self.empty_matched = true;
            self.empty_paths.push(path.to_path_buf());
            return;
        }
        if self.files.len() >= self.setup.max_open_files && !self.free_a_slot() {
            self.waiting_for_slot += 1;
            return;
        }
        let source = path.to_string_lossy().into_owned();
        let file = match File::open(path) {
            Ok(f) => f,
            Err(error) => {
                if matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                    // Out of descriptors (a lower limit than configured): try again later.
                    tracing::warn!(path = %source, %error, "too many open files; reading it later");
                    self.waiting_for_slot += 1;
                    return;
                }
                self.cannot_read(&source, &error.to_string(), "cannot open log file");
                self.skip(path, meta, Skip::Unreadable);
                return;
            }
        };
        self.readable_again(&source);
        if looks_compressed(&file) {
            self.skip(path, meta, Skip::Compressed);
            return;
        }
        let resume = match self.catalog.resolve(&file, dev, ino, len) {
            Ok(r) => r,
            Err(error) => {
                self.cannot_read(&source, &error.to_string(), "cannot read log file");
                self.skip(path, meta, Skip::Unreadable);
                return;
            }
        };
        let mut announce = false;
        let (key, start, sticky, head) = match resume {
            Resume::Known { mark, head } => {
                let sticky = Sticky::from_json(&mark.sticky);
                (mark.key, mark.position, sticky, head)
            }
            Resume::Adopted {
                mark,
                position,
                head,
            } => {
                tracing::info!(path = %source, from = %mark.path, position, "a copy of a file already read (copytruncate?); continuing after what was shipped");
                announce = true;
                let sticky = Sticky::from_json(&mark.sticky);
                (identity::new_key(dev, ino), position, sticky, head)
            }
            Resume::New { head } => {
                if !self.setup.once {
                    let of = self.copy_of(&file, len, &head).or_else(|| {
                        self.catalog
                            .live_copy_of(&file, len, &head, (dev, ino))
                            .ok()
                            .flatten()
                    });
                    if let Some(of) = of {
                        // How long it has been a prefix at this length, and since first seen.
                        let (waited, since_first) = match self.seen.get(path) {
                            Some(s)
                                if s.dev == dev
                                    && s.ino == ino
                                    && matches!(s.skip, Skip::CopyOf(_)) =>
                            {
                                let at = if s.len == len {
                                    s.at.elapsed()
                                } else {
                                    Duration::ZERO
                                };
                                (at, s.first.elapsed())
                            }
                            _ => (Duration::ZERO, Duration::ZERO),
                        };
                        if waited < COPY_WAIT && since_first < COPY_WAIT_MAX {
                            if waited.is_zero() {
                                tracing::debug!(path = %source, "new file repeats a file already read; waiting to see whether it is a copy");
                                self.skip(path, meta, Skip::CopyOf(of));
                            }
                            return;
                        }
                        tracing::debug!(path = %source, "repeats a file already read, but that file was not truncated: a file of its own");
                    }
                }
                let inherited = self
                    .sticky_by_path
                    .get(&source)
                    .cloned()
                    .unwrap_or_default();
                // `end` is for the files present when the daemon is first watched: a daemon
                // with positions (a restart, a reload, a reader restarted) reads new files whole.
                let start = if startup
                    && self.setup.daemon.start_at == StartAt::End
                    && self.setup.checkpoints.is_empty()
                {
                    announce = true;
                    last_line_end(&file, len)
                } else {
                    0
                };
                (identity::new_key(dev, ino), start, inherited, head)
            }
        };
        self.seen.remove(path);
        let mut file = file;
        if let Err(error) = file.seek(SeekFrom::Start(start)) {
            self.cannot_read(&source, &error.to_string(), "cannot read log file");
            return;
        }
        let carry = read_before(&file, start).unwrap_or_default();
        let captures = match &self.setup.daemon.path_pattern {
            Some(re) => path_captures(re, &source),
            None => Map::new(),
        };
        tracing::info!(daemon = %self.setup.daemon.name, path = %source, offset = start, "reading file");
        self.files.push(Tracked {
            path: path.to_path_buf(),
            source,
            dev,
            ino,
            file,
            key: key.clone(),
            head,
            anchors: Anchors::default(),
            splitter: LineSplitter::new(start, self.setup.daemon.max_line_bytes),
            parser: Parser::new(self.opts.clone()),
            sticky,
            captures,
            read_pos: start,
            last_data: Instant::now(),
            rotated: false,
            at_eof: false,
            carry,
        });
        if announce {
            // Commit the position now, so the next start neither skips nor repeats.
            let i = self.files.len() - 1;
            let hash = self.files[i].carry_hash(start);
            self.send_position(i, start, hash);
        }
    }

    /// The key of a file being read that `file` (new, of length `len`, starting with `head`)
    /// is still a prefix of: possibly a copy taken just before a truncate.
    fn copy_of(&self, file: &File, len: u64, head: &[u8]) -> Option<String> {
        for t in &self.files {
            let t_len = t.file.metadata().map(|m| m.len()).unwrap_or(0);
            if t_len < t.read_pos {
                // Truncated since it was last checked: a new file now is likely its copy;
                // wait until the truncation is handled and the copy can adopt its position.
                return Some(t.key.clone());
            }
            if len > t_len || t.head.len() < head.len().min(HEAD_BYTES) {
                continue;
            }
            if t.head[..head.len()] != *head {
                continue;
            }
            if len as usize <= head.len() {
                return Some(t.key.clone());
            }
            let k = TAIL_BYTES.min(len) as usize;
            let mut a = vec![0u8; k];
            let mut b = vec![0u8; k];
            let at = len - k as u64;
            if file.read_exact_at(&mut a, at).is_ok()
                && t.file.read_exact_at(&mut b, at).is_ok()
                && a == b
            {
                return Some(t.key.clone());
            }
        }
        None
    }

    /// Lets the longest idle file at EOF go to make room; false when none can go.
    fn free_a_slot(&mut self) -> bool {
        let candidate = self
            .files
            .iter()
            .enumerate()
            .filter(|(_, t)| t.releasable())
            .max_by_key(|(_, t)| t.last_data.elapsed())
            .map(|(i, _)| i);
        match candidate {
            Some(i) => {
                self.release(i);
                true
            }
            None => false,
        }
    }

    /// Lets every file at EOF go (more files than slots).
    fn let_go_finished(&mut self) {
        let mut i = 0;
        while i < self.files.len() {
            if self.files[i].releasable() {
                self.release(i);
                continue;
            }
            i += 1;
        }
    }

    /// Closes file `i` (at EOF, nothing held); it is opened again when it grows.
    fn release(&mut self, i: usize) {
        let t = self.files.remove(i);
        tracing::debug!(path = %t.source, rotated = t.rotated, "letting go of file");
        if !t.rotated {
            // What was read, not the size now: bytes written since are read when it reopens.
            let len = t.read_pos;
            self.seen.insert(
                t.path.clone(),
                Seen {
                    dev: t.dev,
                    ino: t.ino,
                    len,
                    ctime: 0,
                    first: Instant::now(),
                    skip: Skip::Idle,
                    at: Instant::now(),
                },
            );
        } else if let Ok(mut a) = self.setup.activity.lock() {
            a.files.remove(&t.source);
        }
    }

    /// Sends a position with no rows (`start_at = "end"`, an adopted copy).
    fn send_position(&mut self, i: usize, position: u64, tail_hash: Option<String>) {
        let t = &self.files[i];
        let checkpoint = t.checkpoint(&self.setup.daemon.name, position, tail_hash);
        self.catalog.record(checkpoint.mark());
        let chunk = FileChunk {
            logs: Vec::new(),
            events: Vec::new(),
            progress: Vec::new(),
            checkpoint,
        };
        let _ = self.setup.tx.blocking_send(Item::Chunk(chunk));
    }

    /// Reads one buffer from file `i`.
    fn read_some(&mut self, i: usize) -> Result<ReadOutcome, Flow> {
        let t = &mut self.files[i];
        let n = match t.file.read(&mut self.buf) {
            Ok(n) => n,
            Err(error) => {
                // Said once per file (and as an event), not once per poll.
                let source = t.source.clone();
                self.cannot_read(&source, &error.to_string(), "cannot read log file");
                return Err(Flow::Continue);
            }
        };
        if !self.reported.is_empty() && self.reported.contains(&t.source) {
            let source = t.source.clone();
            self.readable_again(&source);
        }
        let t = &mut self.files[i];
        if n == 0 {
            t.at_eof = true;
            let len = t.file.metadata().map(|m| m.len()).unwrap_or(0);
            if len < t.read_pos {
                return self.replaced(i);
            }
            self.note_lag(i, len);
            return Ok(ReadOutcome::Nothing);
        }
        // The file may have been truncated and rewritten past our offset since the last read
        // (copytruncate, or a daemon reopening it with O_TRUNC): then what we just read belongs
        // to new content. Checking the bytes before the read position after the read makes
        // that certain; the bytes are dropped and the file is read again as new.
        match content_moved(&t.file, t.read_pos, &t.head, &t.carry) {
            Ok(false) => {}
            Ok(true) => return self.replaced(i),
            Err(error) => {
                // Unknown: read these bytes again later rather than guess.
                let (pos, source) = (t.read_pos, t.source.clone());
                let _ = t.file.seek(SeekFrom::Start(pos));
                self.cannot_read(&source, &error.to_string(), "cannot read log file");
                return Err(Flow::Continue);
            }
        }
        let buf_start = t.read_pos;
        t.at_eof = false;
        t.read_pos += n as u64;
        t.last_data = Instant::now();
        if buf_start == 0 {
            // The head as read now (the file may have changed since it was opened).
            t.head = self.buf[..n.min(HEAD_BYTES)].to_vec();
        } else if t.head.len() < HEAD_BYTES && buf_start <= t.head.len() as u64 {
            let from = t.head.len() - buf_start as usize;
            let upto = (HEAD_BYTES - buf_start as usize).min(n);
            if from < upto {
                t.head.extend_from_slice(&self.buf[from..upto]);
            }
        }
        self.records.clear();
        // Lines are parsed where they lie in the buffer; every line end is remembered (the
        // ring keeps the last `identity::ANCHORS`).
        let (buf, records) = (&self.buf[..n], &mut self.records);
        let Tracked {
            splitter,
            parser,
            anchors,
            carry,
            ..
        } = t;
        splitter.each_line(buf, |line| {
            if let Some(h) = window_tail_fnv(carry, buf, buf_start, line.end) {
                anchors.push(line.end, h);
            }
            parser.push_ref(line, records);
        });
        let records = std::mem::take(&mut self.records);
        let flow = if records.is_empty() {
            Flow::Continue
        } else {
            let window = Window {
                carry: std::mem::take(&mut self.files[i].carry),
                buf_start,
            };
            let buf = std::mem::take(&mut self.buf);
            let flow = self.ship(i, records, Some((&window, &buf[..n])));
            self.buf = buf;
            self.files[i].carry = window.carry;
            flow
        };
        let t = &mut self.files[i];
        let mut carry = std::mem::take(&mut t.carry);
        carry.extend_from_slice(&self.buf[n.saturating_sub(TAIL_BYTES as usize)..n]);
        let excess = carry.len().saturating_sub(TAIL_BYTES as usize);
        carry.drain(..excess);
        t.carry = carry;
        if flow == Flow::Closed {
            return Err(Flow::Closed);
        }
        if n < self.buf.len() {
            // A short read of a regular file ends at its end: its size is the read position
            // (no stat needed).
            let len = self.files[i].read_pos;
            self.note_lag(i, len);
            return Ok(ReadOutcome::CaughtUp);
        }
        let len = self.files[i].file.metadata().map(|m| m.len()).unwrap_or(0);
        self.note_lag(i, len);
        Ok(ReadOutcome::More)
    }

    /// File `i` was truncated or replaced under its handle: hand over what it holds, let it go,
    /// and let discovery pick the path up again as a new file.
    fn replaced(&mut self, i: usize) -> Result<ReadOutcome, Flow> {
        tracing::info!(path = %self.files[i].source, "file truncated or rewritten (copytruncate?); reading it again from the start");
        match self.truncated(i) {
            Flow::Closed => Err(Flow::Closed),
            Flow::Continue => Ok(ReadOutcome::More),
        }
    }

    /// Tells the shared activity how far behind file `i` (now `len` bytes long) is.
    fn note_lag(&self, i: usize, len: u64) {
        let t = &self.files[i];
        if let Ok(mut a) = self.setup.activity.lock() {
            // Looked up by reference first: no key allocated on every read.
            if !a.files.contains_key(&t.source) {
                a.files.insert(
                    t.source.clone(),
                    FileActivity {
                        daemon: self.setup.daemon.name.clone(),
                        ..FileActivity::default()
                    },
                );
            }
            let Some(e) = a.files.get_mut(&t.source) else {
                return;
            };
            e.size = len;
            e.lag_bytes = len.saturating_sub(e.committed);
        }
    }

    /// Hands over held text records of files idle for `idle` (all files when zero).
    fn flush_all(&mut self, idle: Duration) -> Flow {
        for i in 0..self.files.len() {
            let t = &self.files[i];
            let due = t.parser.holding()
                && (idle.is_zero() || (t.at_eof && t.last_data.elapsed() >= idle));
            if due && self.flush_file(i) == Flow::Closed {
                return Flow::Closed;
            }
        }
        Flow::Continue
    }

    fn flush_file(&mut self, i: usize) -> Flow {
        let mut out = Vec::new();
        self.files[i].parser.flush(&mut out);
        if out.is_empty() {
            return Flow::Continue;
        }
        self.ship(i, out, None)
    }

    /// Applies rules, routes and sends the records of file `i` in chunks. `window` is the
    /// buffer just read (with the bytes before it), for position checksums.
    fn ship(
        &mut self,
        i: usize,
        records: Vec<(Record, u64)>,
        window: Option<(&Window, &[u8])>,
    ) -> Flow {
        let now: DateTime<Utc> = Utc::now();
        let daemon = Arc::clone(&self.setup.daemon);
        let host = self.setup.host.clone();
        let t = &mut self.files[i];
        let src = SourceContext {
            host: &host,
            daemon: &daemon.name,
            source: &t.source,
            path_captures: &t.captures,
            default_experiment_id: daemon.experiment_id,
            default_node_id: daemon.node_id.as_deref(),
        };
        let row_src = copyrow::RowSource {
            host: &host,
            daemon: &daemon.name,
            source: Some(&t.source),
        };
        let max = self.setup.max_records.clamp(1, CHUNK_RECORDS);
        let mut iter = records.into_iter().peekable();
        while iter.peek().is_some() {
            // The chunk's rows are encoded into shared blocks of this size (split off as
            // they are written): a few allocations per chunk instead of one per row.
            let mut buf = bytes::BytesMut::with_capacity(16 * 1024);
            let mut logs = Vec::new();
            let mut bytes = 0usize;
            let mut events = Vec::new();
            let mut progress = Vec::new();
            let mut end = t.splitter.committed_offset();
            let mut seen = ChunkSummary::default();
            while logs.len() < max && bytes < CHUNK_BYTES {
                let Some((mut rec, rec_end)) = iter.next() else {
                    break;
                };
                daemon.rules.apply(&mut rec, &mut t.sticky);
                let routed = route_fields(rec, &src, now);
                end = rec_end;
                if let Some(e) = routed.event {
                    events.push(e);
                }
                if let Some(p) = routed.progress {
                    progress.push(p);
                }
                let row = copyrow::encode_fields(&routed.log, row_src, &mut buf);
                bytes += row.0.len();
                logs.push(row);
                seen.count += 1;
                seen.experiment_id = routed.log.experiment_id.or(seen.experiment_id);
                seen.keep(routed.log);
            }
            note_activity(&self.setup.activity, &daemon.name, &seen, &progress, now);
            // Position checksums come from the bytes in hand, never from reading the file
            // again (it may have been truncated meanwhile).
            let hash = window
                .and_then(|(w, buf)| window_tail_hash(&w.carry, buf, w.buf_start, end))
                .or_else(|| t.anchors.get(end))
                .or_else(|| tail_hash(&t.file, end).ok().flatten());
            let checkpoint = t.checkpoint(&daemon.name, end, hash);
            self.catalog.record(checkpoint.mark());
            self.sticky_by_path
                .insert(t.source.clone(), t.sticky.clone());
            let chunk = FileChunk {
                logs,
                events,
                progress,
                checkpoint,
            };
            if self.setup.tx.blocking_send(Item::Chunk(chunk)).is_err() {
                return Flow::Closed;
            }
        }
        Flow::Continue
    }

    /// Closes files renamed away (after a grace period) and files idle at EOF for long.
    fn let_go(&mut self) {
        let mut i = 0;
        while i < self.files.len() {
            let t = &self.files[i];
            let idle = t.last_data.elapsed();
            let done = t.at_eof
                && !t.parser.holding()
                && ((t.rotated && idle >= ROTATED_GRACE) || idle >= IDLE_CLOSE);
            if done {
                self.release(i);
                continue;
            }
            i += 1;
        }
    }
}

impl Tracked {
    /// At EOF with nothing held, and not a renamed-away file within its grace period.
    fn releasable(&self) -> bool {
        self.at_eof
            && !self.parser.holding()
            && (!self.rotated || self.last_data.elapsed() >= ROTATED_GRACE)
    }

    /// The checkpoint of position `end` of this file.
    fn checkpoint(&self, daemon: &str, end: u64, tail_hash: Option<String>) -> Checkpoint {
        Checkpoint {
            daemon: daemon.to_string(),
            fingerprint: self.key.clone(),
            path: self.source.clone(),
            position: end,
            head_hash: identity::head_hash(&self.head, end),
            tail_hash,
            sticky: self.sticky.to_json(),
        }
    }

    /// The tail checksum of `pos` when it is the read position (the carry covers it).
    fn carry_hash(&self, pos: u64) -> Option<String> {
        if pos != self.read_pos {
            return tail_hash(&self.file, pos).ok().flatten();
        }
        let k = (TAIL_BYTES.min(pos)) as usize;
        (self.carry.len() >= k).then(|| hash_tail_bytes(&self.carry[self.carry.len() - k..]))
    }
}

/// A file's status change time in nanoseconds.
fn ctime_of(meta: &std::fs::Metadata) -> i128 {
    i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec())
}

/// The (up to) [`TAIL_BYTES`] bytes before `pos`.
fn read_before(file: &File, pos: u64) -> std::io::Result<Vec<u8>> {
    let start = pos.saturating_sub(TAIL_BYTES);
    let mut buf = vec![0u8; (pos - start) as usize];
    file.read_exact_at(&mut buf, start)?;
    Ok(buf)
}

/// The name of the user the agent runs as (for messages about permissions).
fn current_user() -> String {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|p| {
            p.lines().find_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                let _ = f.next();
                (f.next()?.parse::<u32>().ok()? == uid).then(|| name.to_string())
            })
        })
        .unwrap_or_else(|| format!("uid {uid}"))
}

/// What a chunk's records say about the daemon: how many, the last one, its latest experiment.
#[derive(Default)]
struct ChunkSummary {
    count: u64,
    /// The chunk's last records (at most `activity::RECENT_LINES`), newest last.
    recent: std::collections::VecDeque<crate::model::LogFields>,
    experiment_id: Option<uuid::Uuid>,
}

impl ChunkSummary {
    fn keep(&mut self, row: crate::model::LogFields) {
        if self.recent.len() >= crate::agent::activity::RECENT_LINES {
            self.recent.pop_front();
        }
        self.recent.push_back(row);
    }
}

/// Records what the daemon is doing for the metrics sampler and stall detector.
fn note_activity(
    activity: &SharedActivity,
    daemon: &str,
    seen: &ChunkSummary,
    progress: &[crate::model::ProgressRow],
    now: DateTime<Utc>,
) {
    let Some(last) = seen.recent.back() else {
        return;
    };
    let Ok(mut a) = activity.lock() else { return };
    let d = a.daemons.entry(daemon.to_string()).or_default();
    for r in &seen.recent {
        d.remember_line(r.level.as_str(), &r.message, r.traceback.as_deref());
    }
    d.records_read += seen.count;
    d.last_read_at = Some(now);
    d.last_record_ts = Some(last.ts);
    d.last_level = Some(last.level);
    d.last_message = Some(truncate(&last.message, 500));
    d.last_stage = last.stage.clone();
    d.last_node_id = last.node_id.clone();
    if let Some(e) = seen.experiment_id {
        d.last_experiment_id = Some(e);
    }
    for p in progress {
        let u = &p.update;
        let same = d.progress.as_ref().is_some_and(|cur| {
            cur.node_id == u.node_id && cur.experiment_id == Some(p.experiment_id)
        });
        let advanced = !same
            || d.progress.as_ref().is_some_and(|cur| {
                (u.percent.is_some() && cur.percent != u.percent)
                    || (u.items_done.is_some() && cur.items_done != u.items_done)
                    || (u.status.is_some() && cur.status != u.status)
            });
        let prev = d.progress.take();
        let advanced_at = match (&prev, advanced) {
            (Some(cur), false) => cur.advanced_at,
            _ => now,
        };
        d.progress = Some(ProgressActivity {
            experiment_id: Some(p.experiment_id),
            node_id: u.node_id.clone(),
            status: u
                .status
                .clone()
                .or_else(|| prev.as_ref().and_then(|c| c.status.clone())),
            percent: u.percent.or_else(|| prev.as_ref().and_then(|c| c.percent)),
            items_done: u
                .items_done
                .or_else(|| prev.as_ref().and_then(|c| c.items_done)),
            advanced_at,
        });
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// The offset after the last newline at or before `len` (`start_at = "end"`).
fn last_line_end(file: &File, len: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut pos = len;
    let mut buf = vec![0u8; 64 * 1024];
    while pos > 0 {
        let start = pos.saturating_sub(buf.len() as u64);
        let n = (pos - start) as usize;
        if file.read_exact_at(&mut buf[..n], start).is_err() {
            return 0;
        }
        if let Some(i) = buf[..n].iter().rposition(|b| *b == b'\n') {
            return start + i as u64 + 1;
        }
        pos = start;
    }
    0
}
