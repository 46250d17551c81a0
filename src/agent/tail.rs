//! One reader per daemon, on its own thread: discovers the daemon's files, reads new bytes,
//! splits, parses, applies rules, routes, and sends chunks of rows with the file position
//! after them. The only module that opens log files.
//!
//! Handles files that appear later, rename+create and copytruncate rotation, deleted-but-open
//! files, compressed files (never read) and identity by first-line checksum. Notify events are
//! hints; a poll every [`POLL_INTERVAL`] is the truth.

use crate::agent::activity::{FileActivity, ProgressActivity, SharedActivity};
use crate::agent::batch::{Checkpoint, FileChunk, Item};
use crate::agent::copyrow;
use crate::agent::fingerprint::{
    compressed_name, fingerprint, looks_compressed, tail_hash, window_tail_hash, TAIL_BYTES,
};
use crate::agent::lines::{Line, LineSplitter};
use crate::agent::parse::{ParseOptions, Parser};
use crate::agent::route::{path_captures, route, SourceContext};
use crate::agent::rules::Sticky;
use crate::config::{DaemonConfig, StartAt};
use crate::model::Record;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How often globs are expanded and files checked when no notify event arrives.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How long a file that was renamed away or deleted is kept open after its last growth.
pub const ROTATED_GRACE: Duration = Duration::from_secs(2);
/// How long an idle file at EOF stays open before it is let go (reopened when it grows).
pub const IDLE_CLOSE: Duration = Duration::from_secs(60);
/// How long a reader woken by a notify hint waits before reading: a tenth of `max_wait`, at
/// most 50 ms, so a line still reaches the sink well within `max_wait`.
fn wake_debounce(max_wait: Duration) -> Duration {
    (max_wait / 10).min(Duration::from_millis(50))
}

/// How often a file that could not be opened is tried again.
const UNREADABLE_RETRY: Duration = Duration::from_secs(30);
/// Bytes read per read call.
const READ_BYTES: usize = 256 * 1024;
/// Records per chunk sent to the batcher, at most.
const CHUNK_RECORDS: usize = 1000;

/// What a notify event says: file names changed (look for new files now), or only contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    Names,
    Data,
}

/// A position stored in `pipewatch_checkpoints`.
#[derive(Debug, Clone)]
pub struct StoredCheckpoint {
    pub fingerprint: String,
    pub path: String,
    pub position: u64,
    pub tail_hash: Option<String>,
    pub sticky: Value,
}

/// What a reader needs from the agent.
pub struct ReaderSetup {
    pub daemon: Arc<DaemonConfig>,
    pub host: String,
    /// Backfill mode: read every file to EOF once, then finish.
    pub once: bool,
    pub max_records: usize,
    pub max_wait: Duration,
    /// This daemon's committed positions, oldest first.
    pub checkpoints: Vec<StoredCheckpoint>,
    pub tx: mpsc::Sender<Item>,
    pub activity: SharedActivity,
    pub stop: CancellationToken,
    /// Notify hints (any message means "look now").
    pub wake: std::sync::mpsc::Receiver<Hint>,
}

/// What the reader knows of a position it has sent (committed or about to be).
#[derive(Debug, Clone)]
struct Position {
    position: u64,
    tail_hash: Option<String>,
    sticky: Sticky,
}

/// Why discovery skips a path until it changes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Skip {
    /// Compressed: never read.
    Compressed,
    /// Same first line as a file being read (a copy): looked at again when that one goes.
    Duplicate,
    /// Let go while idle at EOF.
    Idle,
    /// Could not be opened (permissions): said once, tried again when the file changes.
    Unreadable,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Seen {
    dev: u64,
    ino: u64,
    len: u64,
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
    fingerprint: String,
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
    positions: HashMap<String, Position>,
    /// Sticky values of the file last read at a path, inherited by the next file there.
    sticky_by_path: HashMap<String, Sticky>,
    opts: ParseOptions,
    buf: Vec<u8>,
    lines: Vec<Line>,
    records: Vec<(Record, u64)>,
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
        let mut positions = HashMap::new();
        let mut sticky_by_path = HashMap::new();
        for cp in &setup.checkpoints {
            let sticky = Sticky::from_json(&cp.sticky);
            sticky_by_path.insert(cp.path.clone(), sticky.clone());
            positions.insert(
                cp.fingerprint.clone(),
                Position {
                    position: cp.position,
                    tail_hash: cp.tail_hash.clone(),
                    sticky,
                },
            );
        }
        let opts = ParseOptions {
            format: setup.daemon.format,
            text_pattern: setup.daemon.text_pattern.clone(),
        };
        Reader {
            setup,
            files: Vec::new(),
            seen: HashMap::new(),
            positions,
            sticky_by_path,
            opts,
            buf: vec![0; READ_BYTES],
            lines: Vec::new(),
            records: Vec::new(),
        }
    }

    /// Runs until stopped (or, with `once`, until every file is read to EOF).
    pub fn run(mut self) {
        let name = self.setup.daemon.name.clone();
        tracing::debug!(daemon = %name, "reader started");
        self.discover(true);
        let mut last_discover = Instant::now();
        loop {
            if self.setup.stop.is_cancelled() {
                break;
            }
            let mut progressed = false;
            let order = self.read_order();
            let tracked = self.files.len();
            for i in order {
                // A file let go (truncated) shifts the indices: start the round again.
                if self.setup.stop.is_cancelled() || self.files.len() != tracked {
                    break;
                }
                match self.read_some(i) {
                    Ok(true) => progressed = true,
                    Ok(false) => {}
                    Err(Flow::Closed) => return,
                    Err(Flow::Continue) => {}
                }
            }
            if self.setup.once {
                if !progressed {
                    if self.flush_all(Duration::ZERO) == Flow::Closed {
                        return;
                    }
                    break;
                }
                continue;
            }
            if self.flush_all(self.setup.max_wait) == Flow::Closed {
                return;
            }
            self.let_go();
            let mut names_changed = false;
            if !progressed {
                // Idle: wait for a hint or the poll interval. A hint usually means a write
                // has begun; waiting a moment lets a burst of writes be read at once, which
                // keeps a steadily written file from costing a wake-up per line.
                if let Ok(hint) = self.setup.wake.recv_timeout(POLL_INTERVAL) {
                    names_changed = hint == Hint::Names;
                    std::thread::sleep(wake_debounce(self.setup.max_wait));
                }
            }
            while let Ok(hint) = self.setup.wake.try_recv() {
                names_changed |= hint == Hint::Names;
            }
            // New files are looked for when names change (a file created or rotated), and
            // otherwise once per poll interval, the safety net for missed events.
            if names_changed || last_discover.elapsed() >= POLL_INTERVAL {
                self.discover(false);
                last_discover = Instant::now();
            }
        }
        tracing::debug!(daemon = %name, "reader stopped");
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
        for pattern in &daemon.logs {
            let paths = match glob::glob(pattern) {
                Ok(p) => p,
                Err(_) => continue,
            };
            for path in paths.filter_map(Result::ok) {
                self.consider(&path, startup);
            }
        }
    }

    /// A file whose first line changed under the same handle was truncated and rewritten.
    fn check_replaced(&mut self) {
        let mut i = 0;
        while i < self.files.len() {
            let t = &self.files[i];
            let len = t.file.metadata().map(|m| m.len()).unwrap_or(0);
            let replaced = len < t.read_pos
                || !matches!(fingerprint(&t.file), Ok(Some(fp)) if fp == t.fingerprint);
            if replaced {
                if self.replaced(i).is_err() {
                    return;
                }
                continue;
            }
            i += 1;
        }
    }

    /// Hands over what the parser holds, lets the file go and forgets why copies were skipped.
    fn truncated(&mut self, i: usize) -> Flow {
        let flow = self.flush_file(i);
        let t = self.files.remove(i);
        self.seen.remove(&t.path);
        self.seen.retain(|_, s| s.skip != Skip::Duplicate);
        flow
    }

    fn consider(&mut self, path: &Path, startup: bool) {
        if compressed_name(path) {
            return;
        }
        let meta = match std::fs::metadata(path) {
            Ok(m) if m.is_file() => m,
            _ => return,
        };
        let (dev, ino, len) = (meta.dev(), meta.ino(), meta.len());
        if let Some(t) = self.files.iter_mut().find(|t| t.dev == dev && t.ino == ino) {
            if t.path == path {
                t.rotated = false;
            }
            return;
        }
        if let Some(s) = self.seen.get(path) {
            let unchanged = match s.skip {
                Skip::Compressed => true,
                // Permissions may be fixed without the file changing: look again now and then.
                Skip::Unreadable => s.at.elapsed() < UNREADABLE_RETRY,
                Skip::Duplicate | Skip::Idle => s.len == len,
            };
            if s.dev == dev && s.ino == ino && unchanged {
                return;
            }
        }
        let file = match File::open(path) {
            Ok(f) => f,
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cannot open log file; will retry when it changes");
                self.seen.insert(
                    path.to_path_buf(),
                    Seen {
                        dev,
                        ino,
                        len,
                        skip: Skip::Unreadable,
                        at: Instant::now(),
                    },
                );
                return;
            }
        };
        if looks_compressed(&file) {
            self.seen.insert(
                path.to_path_buf(),
                Seen {
                    dev,
                    ino,
                    len,
                    skip: Skip::Compressed,
                    at: Instant::now(),
                },
            );
            return;
        }
        let fp = match fingerprint(&file) {
            Ok(Some(fp)) => fp,
            _ => return,
        };
        if self.files.iter().any(|t| t.fingerprint == fp) {
            self.seen.insert(
                path.to_path_buf(),
                Seen {
                    dev,
                    ino,
                    len,
                    skip: Skip::Duplicate,
                    at: Instant::now(),
                },
            );
            return;
        }
        let source = path.to_string_lossy().into_owned();
        let mut announce = false;
        let (start, sticky) = match self.positions.get(&fp) {
            Some(p) => {
                let fits =
                    p.position <= len && tail_hash(&file, p.position).ok().flatten() == p.tail_hash;
                if fits {
                    (p.position, p.sticky.clone())
                } else {
                    tracing::warn!(path = %source, position = p.position, "stored position does not match the file's content; reading it from the start");
                    (0, Sticky::default())
                }
            }
            None => {
                let inherited = self
                    .sticky_by_path
                    .get(&source)
                    .cloned()
                    .unwrap_or_default();
                let start = if startup && self.setup.daemon.start_at == StartAt::End {
                    announce = true;
                    last_line_end(&file, len)
                } else {
                    0
                };
                (start, inherited)
            }
        };
        let mut file = file;
        if file.seek(SeekFrom::Start(start)).is_err() {
            return;
        }
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
            fingerprint: fp.clone(),
            splitter: LineSplitter::new(start, self.setup.daemon.max_line_bytes),
            parser: Parser::new(self.opts.clone()),
            sticky,
            captures,
            read_pos: start,
            last_data: Instant::now(),
            rotated: false,
            at_eof: false,
            carry: Vec::new(),
        });
        if announce {
            // Commit the skipped-to position, so the next start does not skip again.
            let hash = self
                .files
                .last()
                .and_then(|t| tail_hash(&t.file, start).ok().flatten());
            self.send_position(&fp, start, hash);
        }
    }

    /// Sends a position with no rows (`start_at = "end"`).
    fn send_position(&mut self, fp: &str, position: u64, tail_hash: Option<String>) {
        let Some(t) = self.files.iter().find(|t| t.fingerprint == fp) else {
            return;
        };
        self.positions.insert(
            fp.to_string(),
            Position {
                position,
                tail_hash: tail_hash.clone(),
                sticky: t.sticky.clone(),
            },
        );
        let chunk = FileChunk {
            logs: Vec::new(),
            events: Vec::new(),
            progress: Vec::new(),
            checkpoint: Checkpoint {
                daemon: self.setup.daemon.name.clone(),
                fingerprint: fp.to_string(),
                path: t.source.clone(),
                position,
                tail_hash,
                sticky: t.sticky.to_json(),
            },
        };
        let _ = self.setup.tx.blocking_send(Item::Chunk(chunk));
    }

    /// Reads one buffer from file `i`; `Ok(true)` when bytes were read.
    fn read_some(&mut self, i: usize) -> Result<bool, Flow> {
        let t = &mut self.files[i];
        let n = match t.file.read(&mut self.buf) {
            Ok(n) => n,
            Err(error) => {
                tracing::warn!(path = %t.source, %error, "read failed");
                return Err(Flow::Continue);
            }
        };
        if n == 0 {
            t.at_eof = true;
            let len = t.file.metadata().map(|m| m.len()).unwrap_or(0);
            if len < t.read_pos {
                return self.replaced(i);
            }
            self.note_lag(i);
            return Ok(false);
        }
        // The file may have been truncated and rewritten past our offset since the last read
        // (copytruncate while we waited for the database): then what we just read belongs to
        // the new content. Checking after the read makes that certain; the bytes are dropped
        // and the path is read again as a new file.
        if !matches!(fingerprint(&t.file), Ok(Some(fp)) if fp == t.fingerprint) {
            return self.replaced(i);
        }
        let buf_start = t.read_pos;
        t.at_eof = false;
        t.read_pos += n as u64;
        t.last_data = Instant::now();
        self.lines.clear();
        t.splitter.push(&self.buf[..n], &mut self.lines);
        self.records.clear();
        for line in self.lines.drain(..) {
            t.parser.push(line, &mut self.records);
        }
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
        self.note_lag(i);
        if flow == Flow::Closed {
            return Err(Flow::Closed);
        }
        Ok(true)
    }

    /// File `i` was truncated or replaced under its handle: hand over what it holds, let it go,
    /// and let discovery pick the path up again as a new file.
    fn replaced(&mut self, i: usize) -> Result<bool, Flow> {
        tracing::info!(path = %self.files[i].source, "file truncated (copytruncate?); reading it again from the start");
        match self.truncated(i) {
            Flow::Closed => Err(Flow::Closed),
            Flow::Continue => Ok(true),
        }
    }

    fn note_lag(&self, i: usize) {
        let t = &self.files[i];
        let len = t.file.metadata().map(|m| m.len()).unwrap_or(0);
        let committed = t.splitter.committed_offset();
        if let Ok(mut a) = self.setup.activity.lock() {
            let e = a
                .files
                .entry(t.source.clone())
                .or_insert_with(|| FileActivity {
                    daemon: self.setup.daemon.name.clone(),
                    ..FileActivity::default()
                });
            e.lag_bytes = len.saturating_sub(committed);
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
        let max = self.setup.max_records.clamp(1, CHUNK_RECORDS);
        let mut iter = records.into_iter().peekable();
        while iter.peek().is_some() {
            let mut logs = Vec::new();
            let mut events = Vec::new();
            let mut progress = Vec::new();
            let mut end = t.splitter.committed_offset();
            let mut seen = ChunkSummary::default();
            for (mut rec, rec_end) in iter.by_ref().take(max) {
                daemon.rules.apply(&mut rec, &mut t.sticky);
                let routed = route(rec, &src, now);
                end = rec_end;
                if let Some(e) = routed.event {
                    events.push(e);
                }
                if let Some(p) = routed.progress {
                    progress.push(p);
                }
                logs.push(copyrow::encode(&routed.log));
                seen.count += 1;
                seen.experiment_id = routed.log.experiment_id.or(seen.experiment_id);
                seen.last = Some(routed.log);
            }
            note_activity(&self.setup.activity, &daemon.name, &seen, &progress, now);
            let hash = window
                .and_then(|(w, buf)| window_tail_hash(&w.carry, buf, w.buf_start, end))
                .or_else(|| tail_hash(&t.file, end).ok().flatten());
            let sticky_json = t.sticky.to_json();
            self.positions.insert(
                t.fingerprint.clone(),
                Position {
                    position: end,
                    tail_hash: hash.clone(),
                    sticky: t.sticky.clone(),
                },
            );
            self.sticky_by_path
                .insert(t.source.clone(), t.sticky.clone());
            let chunk = FileChunk {
                logs,
                events,
                progress,
                checkpoint: Checkpoint {
                    daemon: daemon.name.clone(),
                    fingerprint: t.fingerprint.clone(),
                    path: t.source.clone(),
                    position: end,
                    tail_hash: hash,
                    sticky: sticky_json,
                },
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
                let t = self.files.remove(i);
                tracing::debug!(path = %t.source, rotated = t.rotated, "letting go of file");
                if !t.rotated {
                    let len = t.file.metadata().map(|m| m.len()).unwrap_or(0);
                    self.seen.insert(
                        t.path.clone(),
                        Seen {
                            dev: t.dev,
                            ino: t.ino,
                            len,
                            skip: Skip::Idle,
                            at: Instant::now(),
                        },
                    );
                } else if let Ok(mut a) = self.setup.activity.lock() {
                    a.files.remove(&t.source);
                }
                continue;
            }
            i += 1;
        }
    }
}

/// What a chunk's records say about the daemon: how many, the last one, its latest experiment.
#[derive(Default)]
struct ChunkSummary {
    count: u64,
    last: Option<crate::model::LogRow>,
    experiment_id: Option<uuid::Uuid>,
}

/// Records what the daemon is doing for the metrics sampler and stall detector.
fn note_activity(
    activity: &SharedActivity,
    daemon: &str,
    seen: &ChunkSummary,
    progress: &[crate::model::ProgressRow],
    now: DateTime<Utc>,
) {
    let Some(last) = &seen.last else { return };
    let Ok(mut a) = activity.lock() else { return };
    let d = a.daemons.entry(daemon.to_string()).or_default();
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
