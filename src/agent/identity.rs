//! Which file is this, and where do I resume? The one home of file identity and positions.
//!
//! A file is an inode (`dev`, `ino`) plus a *lineage*: the content written since the inode was
//! last truncated. Each lineage has a key `dev:ino:gen` (`gen` random, chosen when the lineage
//! is first read) under which its position is committed. A position is a [`Mark`]: the offset
//! plus evidence that the bytes before it are the bytes that were shipped — a checksum of the
//! first `min(position, HEAD_BYTES)` bytes (the head) and of the `TAIL_BYTES` before the
//! position (the tail). A mark is trusted only while both still match the file.
//!
//! - Files that begin alike are different inodes, so they never share a mark.
//! - A file truncated and rewritten keeps its inode but fails the checks: its old mark becomes
//!   an [`Orphan`] and the new content is a new lineage read from 0.
//! - A copy (copytruncate, a move across file systems) is a new inode whose content matches an
//!   orphan: it *adopts* the orphan's position. A copy shorter than that position (lines read
//!   between the copy and the truncate) matches one of the orphan's recent line-end anchors.
//! - A new inode that is still a prefix of a file being read may be a copy about to be
//!   truncated: the reader waits (see `tail.rs`), it never guesses.
//!
//! Reads only with positioned reads (`read_at`); never moves a file's cursor.

use crate::agent::fingerprint::{fnv1a_prefixes, hash_tail_bytes, tail_hash, TAIL_BYTES};
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// How many leading bytes of a file its head checksum covers at most.
pub const HEAD_BYTES: usize = 4096;
/// How many recent line ends a file being read remembers (for copies shorter than the
/// position: lines read between a copy and the truncate).
pub const ANCHORS: usize = 1024;
/// How long a mark whose file was truncated or vanished can still be adopted by a copy.
pub const ORPHAN_TTL: Duration = Duration::from_secs(15 * 60);
/// Orphans kept per daemon at most (the oldest go first), and how many of the newest keep
/// the head bytes and anchors of a lineage that was being read.
const MAX_ORPHANS: usize = 2048;
const MAX_RICH_ORPHANS: usize = 32;

/// A committed (or sent) position of one lineage.
#[derive(Debug, Clone, PartialEq)]
pub struct Mark {
    /// `dev:ino:gen`, or a legacy first-line fingerprint (rows of earlier versions).
    pub key: String,
    /// The path the file was read at.
    pub path: String,
    pub position: u64,
    /// Checksum of the first `min(position, HEAD_BYTES)` bytes; `None` on legacy rows.
    pub head_hash: Option<String>,
    /// Checksum of the `TAIL_BYTES` before `position`.
    pub tail_hash: Option<String>,
    /// Sticky rule values in force at `position` (opaque here).
    pub sticky: Value,
}

/// A new lineage key for an inode.
pub fn new_key(dev: u64, ino: u64) -> String {
    let gen: u32 = rand_u32();
    format!("{dev:x}:{ino:x}:{gen:08x}")
}

/// The inode a key names; `None` for legacy keys.
pub fn key_inode(key: &str) -> Option<(u64, u64)> {
    let mut parts = key.split(':');
    let dev = u64::from_str_radix(parts.next()?, 16).ok()?;
    let ino = u64::from_str_radix(parts.next()?, 16).ok()?;
    parts.next()?;
    Some((dev, ino))
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() as u32
}

/// The head checksum of a position, from the head bytes in hand (which must cover it).
pub fn head_hash(head: &[u8], position: u64) -> Option<String> {
    let n = (position as usize).min(HEAD_BYTES);
    (head.len() >= n).then(|| hash_tail_bytes(&head[..n]))
}

/// Reads up to `n` bytes from offset 0; fewer when the file is shorter.
pub fn read_head(file: &File, n: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    let mut filled = 0;
    while filled < n {
        let k = file.read_at(&mut buf[filled..], filled as u64)?;
        if k == 0 {
            break;
        }
        filled += k;
    }
    buf.truncate(filled);
    Ok(buf)
}

/// Whether `mark` fits `file` (of length `len`): the head and the tail match. Returns the
/// head bytes read (the first `min(len, HEAD_BYTES)`) when it fits.
pub fn verify(file: &File, len: u64, mark: &Mark) -> std::io::Result<Option<Vec<u8>>> {
    if mark.position > len {
        return Ok(None);
    }
    let head = read_head(file, (len as usize).min(HEAD_BYTES))?;
    match &mark.head_hash {
        Some(h) => {
            if head_hash(&head, mark.position).as_ref() != Some(h) {
                return Ok(None);
            }
        }
        // A row of an earlier version: its key is the first line's checksum.
        None => {
            if crate::agent::fingerprint::fingerprint(file)?.as_deref() != Some(mark.key.as_str()) {
                return Ok(None);
            }
        }
    }
    if mark.position > 0 && tail_hash(file, mark.position)? != mark.tail_hash {
        return Ok(None);
    }
    Ok(Some(head))
}

/// Recent line ends of a file being read, with the tail checksum before each.
#[derive(Debug, Clone, Default)]
pub struct Anchors {
    ring: VecDeque<(u64, u64)>,
}

impl Anchors {
    /// Remembers line end `end` and the checksum of the bytes before it.
    pub fn push(&mut self, end: u64, hash: u64) {
        if self.ring.back().is_some_and(|(e, _)| *e >= end) {
            return;
        }
        if self.ring.len() == ANCHORS {
            self.ring.pop_front();
        }
        self.ring.push_back((end, hash));
    }

    /// The tail checksum at `end`, when it is a remembered line end.
    pub fn get(&self, end: u64) -> Option<String> {
        let i = self.ring.binary_search_by_key(&end, |(e, _)| *e).ok()?;
        Some(format!("{:016x}", self.ring[i].1))
    }

    /// The remembered line ends at or below `len`, newest first.
    fn ends_up_to(&self, len: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ring
            .iter()
            .rev()
            .filter(move |(e, _)| *e <= len)
            .copied()
    }
}

/// A mark whose file no longer holds it: truncated (with what was in hand of it) or vanished.
#[derive(Debug, Clone)]
pub struct Orphan {
    pub mark: Mark,
    pub since: Instant,
    /// The head bytes and recent line ends of a lineage that was being read when it ended.
    pub head: Option<Vec<u8>>,
    pub anchors: Anchors,
}

/// The positions of one daemon's files: by key, by inode, and the orphans.
#[derive(Debug, Default)]
pub struct Catalog {
    marks: HashMap<String, Mark>,
    by_inode: HashMap<(u64, u64), Vec<String>>,
    orphans: Vec<Orphan>,
}

/// What to do with a file opened for reading.
#[derive(Debug, PartialEq)]
pub enum Resume {
    /// A known lineage: continue at its mark. Carries the head bytes read.
    Known { mark: Mark, head: Vec<u8> },
    /// A copy of a lineage that ended: continue at `position` under a new key.
    Adopted {
        mark: Mark,
        position: u64,
        head: Vec<u8>,
    },
    /// Content never seen: a new lineage.
    New { head: Vec<u8> },
}

impl Catalog {
    /// The catalog of committed positions, oldest first. Legacy marks start as orphans.
    pub fn load(marks: Vec<Mark>) -> Catalog {
        let mut c = Catalog::default();
        for m in marks {
            if key_inode(&m.key).is_some() {
                c.record(m);
            } else {
                c.push_orphan(Orphan {
                    mark: m,
                    since: Instant::now(),
                    head: None,
                    anchors: Anchors::default(),
                });
            }
        }
        c
    }

    /// Remembers the latest position of a lineage.
    pub fn record(&mut self, mark: Mark) {
        if let Some(ino) = key_inode(&mark.key) {
            let keys = self.by_inode.entry(ino).or_default();
            if !keys.contains(&mark.key) {
                keys.push(mark.key.clone());
            }
        }
        self.marks.insert(mark.key.clone(), mark);
    }

    /// Whether a position of this inode is known.
    pub fn knows(&self, dev: u64, ino: u64) -> bool {
        self.by_inode.contains_key(&(dev, ino))
    }

    /// Finds where to resume `file` (inode `dev`/`ino`, length `len`), which is not being read.
    /// Marks of this inode that no longer fit become orphans; then orphans are tried.
    pub fn resolve(
        &mut self,
        file: &File,
        dev: u64,
        ino: u64,
        len: u64,
    ) -> std::io::Result<Resume> {
        let keys = self.by_inode.get(&(dev, ino)).cloned().unwrap_or_default();
        // Checked before anything changes: an I/O error leaves the catalog as it was.
        let mut found = None;
        // Newest lineage first: it is the one most likely to still fit.
        for key in keys.iter().rev() {
            let Some(mark) = self.marks.get(key) else {
                continue;
            };
            if let Some(head) = verify(file, len, mark)? {
                found = Some((mark.clone(), head));
                break;
            }
        }
        let keep = found.as_ref().map(|(m, _)| m.key.clone());
        self.by_inode.remove(&(dev, ino));
        for key in keys {
            if Some(&key) == keep.as_ref() {
                continue;
            }
            if let Some(m) = self.marks.remove(&key) {
                self.push_orphan(Orphan {
                    mark: m,
                    since: Instant::now(),
                    head: None,
                    anchors: Anchors::default(),
                });
            }
        }
        if let Some((mark, head)) = found {
            self.by_inode.insert((dev, ino), vec![mark.key.clone()]);
            return Ok(Resume::Known { mark, head });
        }
        self.adopt(file, (dev, ino), len)
    }

    /// An orphan whose content `file` continues: a copy. Never an orphan of the file's own
    /// inode: that inode was truncated, so what it holds now is new.
    fn adopt(&mut self, file: &File, inode: (u64, u64), len: u64) -> std::io::Result<Resume> {
        let head = read_head(file, (len as usize).min(HEAD_BYTES))?;
        let first_line_end = head.iter().position(|b| *b == b'\n').map(|i| i as u64 + 1);
        // The best match: a current-format mark over a legacy one, then the furthest position.
        let mut chosen: Option<(usize, u64, bool)> = None;
        for (i, o) in self.orphans.iter().enumerate() {
            let m = &o.mark;
            if m.position == 0 || key_inode(&m.key) == Some(inode) {
                continue;
            }
            let legacy = m.head_hash.is_none();
            let better = |pos: u64| {
                chosen.is_none_or(|(_, p, l)| (l && !legacy) || (l == legacy && pos > p))
            };
            // A position within the first line proves nothing: files that begin alike (the
            // same banner) would be taken for copies of each other, and a banner lost.
            let within_first_line = |pos: u64| first_line_end.is_none_or(|e| pos <= e);
            if m.position <= len {
                if within_first_line(m.position) || !better(m.position) {
                    continue;
                }
                if verify(file, len, m)?.is_some() {
                    chosen = Some((i, m.position, legacy));
                }
            } else if let Some(oh) = &o.head {
                // Shorter than the position: a copy taken before the last lines were read.
                let n = head.len().min(oh.len());
                if n == 0 || head[..n] != oh[..n] {
                    continue;
                }
                for (end, hash) in o.anchors.ends_up_to(len) {
                    if within_first_line(end) || !better(end) {
                        break;
                    }
                    let at = tail_hash(file, end)?;
                    if at == Some(format!("{hash:016x}")) {
                        chosen = Some((i, end, legacy));
                        break;
                    }
                }
            }
        }
        let chosen = chosen.map(|(i, pos, _)| (i, pos));
        match chosen {
            Some((i, position)) => {
                let o = self.orphans.swap_remove(i);
                Ok(Resume::Adopted {
                    mark: o.mark,
                    position,
                    head,
                })
            }
            None => Ok(Resume::New { head }),
        }
    }

    fn push_orphan(&mut self, o: Orphan) {
        self.orphans.push(o);
        if self.orphans.len() > MAX_ORPHANS {
            let excess = self.orphans.len() - MAX_ORPHANS;
            self.orphans.drain(..excess);
        }
        let rich = self.orphans.iter().filter(|o| o.head.is_some()).count();
        if rich > MAX_RICH_ORPHANS {
            let mut drop = rich - MAX_RICH_ORPHANS;
            for o in self.orphans.iter_mut() {
                if drop == 0 {
                    break;
                }
                if o.head.is_some() {
                    o.head = None;
                    o.anchors = Anchors::default();
                    drop -= 1;
                }
            }
        }
    }

    /// Marks of an inode whose file is now shorter than them (truncated, perhaps to nothing)
    /// become orphans, so a copy can adopt them even before the file is read again.
    pub fn shrunk(&mut self, dev: u64, ino: u64, len: u64) {
        let Some(keys) = self.by_inode.get_mut(&(dev, ino)) else {
            return;
        };
        let gone: Vec<String> = keys
            .iter()
            .filter(|k| self.marks.get(*k).is_some_and(|m| m.position > len))
            .cloned()
            .collect();
        keys.retain(|k| !gone.contains(k));
        for key in gone {
            if let Some(mark) = self.marks.remove(&key) {
                self.push_orphan(Orphan {
                    mark,
                    since: Instant::now(),
                    head: None,
                    anchors: Anchors::default(),
                });
            }
        }
    }

    /// The key of a live mark of another inode (a file not being read now) whose content
    /// `file` repeats up to the mark: maybe a copy of that file, about to be truncated.
    pub fn live_copy_of(
        &self,
        file: &File,
        len: u64,
        head: &[u8],
        inode: (u64, u64),
    ) -> std::io::Result<Option<String>> {
        let first_line_end = head.iter().position(|b| *b == b'\n').map(|i| i as u64 + 1);
        // The head checksum of every prefix, in one pass.
        let prefix = fnv1a_prefixes(head);
        for (key, m) in &self.marks {
            let Some(want) = &m.head_hash else { continue };
            if m.position > len
                || key_inode(key) == Some(inode)
                || first_line_end.is_none_or(|e| m.position <= e)
            {
                continue;
            }
            let n = (m.position as usize).min(HEAD_BYTES);
            if n > head.len() || u64::from_str_radix(want, 16).ok() != Some(prefix[n]) {
                continue;
            }
            if tail_hash(file, m.position)? == m.tail_hash {
                return Ok(Some(key.clone()));
            }
        }
        Ok(None)
    }

    /// Whether `key` is a live mark (its file has not been truncated or gone).
    pub fn is_live(&self, key: &str) -> bool {
        self.marks.contains_key(key)
    }

    /// A lineage being read ended (its file was truncated or replaced under the handle): its
    /// mark becomes an orphan that a copy can adopt, with the bytes in hand of it.
    pub fn ended(&mut self, key: &str, head: Vec<u8>, anchors: Anchors) {
        let Some(mark) = self.marks.remove(key) else {
            return;
        };
        if let Some(ino) = key_inode(key) {
            if let Some(keys) = self.by_inode.get_mut(&ino) {
                keys.retain(|k| k != key);
            }
        }
        self.push_orphan(Orphan {
            mark,
            since: Instant::now(),
            head: Some(head),
            anchors,
        });
    }

    /// Marks of inodes that are neither among `present` nor open become orphans (vanished);
    /// orphans older than [`ORPHAN_TTL`] are forgotten.
    pub fn sweep(&mut self, present: &dyn Fn(u64, u64) -> bool) {
        let gone: Vec<(u64, u64)> = self
            .by_inode
            .keys()
            .filter(|(d, i)| !present(*d, *i))
            .copied()
            .collect();
        for ino in gone {
            for key in self.by_inode.remove(&ino).unwrap_or_default() {
                if let Some(mark) = self.marks.remove(&key) {
                    self.push_orphan(Orphan {
                        mark,
                        since: Instant::now(),
                        head: None,
                        anchors: Anchors::default(),
                    });
                }
            }
        }
        self.orphans.retain(|o| o.since.elapsed() < ORPHAN_TTL);
    }
}

/// Whether a file being read was truncated or rewritten: the bytes before `read_pos` no longer
/// equal the bytes in hand (`head`, and `carry` just before `read_pos`).
pub fn content_moved(
    file: &File,
    read_pos: u64,
    head: &[u8],
    carry: &[u8],
) -> std::io::Result<bool> {
    // Called on every read: stack buffers, no allocation (a heap buffer of this size made
    // glibc consolidate its free lists on every call).
    let n = (read_pos as usize).min(head.len()).min(HEAD_BYTES);
    let mut now = [0u8; HEAD_BYTES];
    let mut filled = 0;
    while filled < n {
        let k = file.read_at(&mut now[filled..n], filled as u64)?;
        if k == 0 {
            break;
        }
        filled += k;
    }
    if now[..filled] != head[..n] {
        return Ok(true);
    }
    let k = (carry.len() as u64).min(read_pos).min(TAIL_BYTES) as usize;
    if k == 0 {
        return Ok(false);
    }
    let mut buf = [0u8; TAIL_BYTES as usize];
    match file.read_exact_at(&mut buf[..k], read_pos - k as u64) {
        Ok(()) => {}
        // Shorter than the read position: truncated.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(true),
        Err(e) => return Err(e),
    }
    Ok(buf[..k] != carry[carry.len() - k..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::fingerprint::fnv1a;
    use crate::agent::fingerprint::tests::file_with;

    fn mark_at(key: &str, content: &[u8], position: u64) -> Mark {
        let start = position.saturating_sub(TAIL_BYTES) as usize;
        Mark {
            key: key.into(),
            path: "/x".into(),
            position,
            head_hash: head_hash(content, position),
            tail_hash: Some(hash_tail_bytes(&content[start..position as usize])),
            sticky: Value::Null,
        }
    }

    const BANNER: &[u8] = b"{\"event\":\"logging configured\"}\n";

    fn content(tag: &str, lines: usize) -> Vec<u8> {
        let mut v = BANNER.to_vec();
        for i in 0..lines {
            v.extend_from_slice(format!("{{\"f\":\"{tag}\",\"n\":{i}}}\n").as_bytes());
        }
        v
    }

    #[test]
    fn keys_name_their_inode_and_differ_per_lineage() {
        let a = new_key(0x801, 1234);
        assert_eq!(key_inode(&a), Some((0x801, 1234)));
        assert_eq!(key_inode("2a-00ff00ff00ff00ff"), None);
        assert_ne!(new_key(1, 2), new_key(1, 2));
    }

    #[test]
    fn a_known_inode_resumes_when_its_content_still_fits() {
        let a = content("a", 10);
        let (_t, f) = file_with(&a);
        let m = mark_at("1:10:aa", &a, a.len() as u64 - 12);
        let mut c = Catalog::load(vec![m.clone()]);
        match c.resolve(&f, 1, 0x10, a.len() as u64).unwrap() {
            Resume::Known { mark, .. } => assert_eq!(mark, m),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn files_that_begin_alike_are_told_apart() {
        // Same banner, same length, same inode number on another device: no mark is shared.
        let a = content("a", 10);
        let b = content("b", 10);
        let (_ta, fa) = file_with(&a);
        let (_tb, fb) = file_with(&b);
        let ma = mark_at("1:10:aa", &a, a.len() as u64);
        let mut c = Catalog::load(vec![ma]);
        assert!(matches!(
            c.resolve(&fb, 2, 0x10, b.len() as u64).unwrap(),
            Resume::New { .. }
        ));
        assert!(matches!(
            c.resolve(&fa, 1, 0x10, a.len() as u64).unwrap(),
            Resume::Known { .. }
        ));
    }

    #[test]
    fn rewritten_in_place_is_new_and_its_old_mark_can_be_adopted_by_the_copy() {
        // copytruncate while stopped: the inode now holds new content (longer than before,
        // same banner); the copy holds the old content.
        let old = content("old", 20);
        let new = content("new", 40);
        let (_t1, rewritten) = file_with(&new);
        let (_t2, copy) = file_with(&old);
        let m = mark_at("1:10:aa", &old, old.len() as u64);
        let mut c = Catalog::load(vec![m]);
        assert!(matches!(
            c.resolve(&rewritten, 1, 0x10, new.len() as u64).unwrap(),
            Resume::New { .. }
        ));
        match c.resolve(&copy, 1, 0x11, old.len() as u64).unwrap() {
            Resume::Adopted { position, .. } => assert_eq!(position, old.len() as u64),
            other => panic!("{other:?}"),
        }
        // Adopted once only.
        assert!(matches!(
            c.resolve(&copy, 1, 0x12, old.len() as u64).unwrap(),
            Resume::New { .. }
        ));
    }

    #[test]
    fn a_copy_shorter_than_the_position_matches_an_anchor() {
        let full = content("x", 30);
        let copy_len = BANNER.len() + 20 * 15; // somewhere in the middle
        let cut = full[..copy_len]
            .iter()
            .rposition(|b| *b == b'\n')
            .map(|i| i + 1)
            .unwrap();
        let (_t, copy) = file_with(&full[..cut]);
        let mut c = Catalog::default();
        let m = mark_at("1:10:aa", &full, full.len() as u64);
        c.record(m);
        let mut anchors = Anchors::default();
        let mut end = 0;
        for line in full.split_inclusive(|b| *b == b'\n') {
            end += line.len();
            let s = end.saturating_sub(TAIL_BYTES as usize);
            anchors.push(end as u64, fnv1a(&full[s..end]));
        }
        c.ended(
            "1:10:aa",
            full[..HEAD_BYTES.min(full.len())].to_vec(),
            anchors,
        );
        match c.resolve(&copy, 1, 0x11, cut as u64).unwrap() {
            Resume::Adopted { position, .. } => assert_eq!(position, cut as u64),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_truncated_file_never_adopts_its_own_old_position() {
        // A daemon restarting into its file writes the same banner: the file's old mark (at
        // the end of the banner) fits byte for byte, but the inode was truncated.
        let banner_only = BANNER.to_vec();
        let (_t, f) = file_with(&content("new", 2));
        let mut c = Catalog::default();
        c.record(mark_at("1:10:aa", &banner_only, banner_only.len() as u64));
        c.ended("1:10:aa", banner_only.clone(), Anchors::default());
        assert!(matches!(
            c.resolve(&f, 1, 0x10, content("new", 2).len() as u64)
                .unwrap(),
            Resume::New { .. }
        ));
        // Nor does another inode holding only the banner: within the first line nothing tells
        // a copy from a new file that begins alike, and shipping a banner twice beats losing
        // one.
        let (_t2, copy) = file_with(&banner_only);
        assert!(matches!(
            c.resolve(&copy, 1, 0x11, banner_only.len() as u64).unwrap(),
            Resume::New { .. }
        ));
    }

    #[test]
    fn a_file_found_shorter_than_its_mark_orphans_it_for_the_copy() {
        let a = content("a", 8);
        let (_t, copy) = file_with(&a);
        let mut c = Catalog::default();
        c.record(mark_at("1:10:aa", &a, a.len() as u64));
        // The original, idle and closed, is truncated to nothing; its copy appears.
        c.shrunk(1, 0x10, 0);
        assert!(!c.is_live("1:10:aa"));
        assert!(matches!(
            c.resolve(&copy, 1, 0x11, a.len() as u64).unwrap(),
            Resume::Adopted { .. }
        ));
    }

    #[test]
    fn a_copy_of_a_closed_file_is_seen_before_the_truncate() {
        let a = content("a", 8);
        let (_t, copy) = file_with(&a);
        let mut c = Catalog::default();
        c.record(mark_at("1:10:aa", &a, a.len() as u64));
        assert_eq!(
            c.live_copy_of(&copy, a.len() as u64, &a, (1, 0x11))
                .unwrap(),
            Some("1:10:aa".to_string())
        );
        // Its own inode, or a file that differs, is no copy.
        assert_eq!(
            c.live_copy_of(&copy, a.len() as u64, &a, (1, 0x10))
                .unwrap(),
            None
        );
        let b = content("b", 8);
        let (_t, other) = file_with(&b);
        assert_eq!(
            c.live_copy_of(&other, b.len() as u64, &b, (1, 0x12))
                .unwrap(),
            None
        );
    }

    #[test]
    fn a_current_mark_is_preferred_to_a_legacy_one_and_the_furthest_wins() {
        let a = content("a", 8);
        let (_t, copy) = file_with(&a);
        let fp = crate::agent::fingerprint::fingerprint(&copy)
            .unwrap()
            .unwrap();
        let mut legacy = mark_at(&fp, &a, a.len() as u64);
        legacy.head_hash = None;
        let early = mark_at("1:10:aa", &a, a.len() as u64 - 12);
        let late = mark_at("1:10:bb", &a, a.len() as u64);
        let mut c = Catalog::load(vec![legacy, early.clone(), late.clone()]);
        c.sweep(&|_, _| false);
        match c.resolve(&copy, 2, 0x11, a.len() as u64).unwrap() {
            Resume::Adopted { mark, position, .. } => {
                assert_eq!((mark.key.as_str(), position), ("1:10:bb", a.len() as u64))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_vanished_mark_within_the_first_line_is_not_adopted() {
        // A file that held only its banner vanished; a new file with the same banner appears:
        // it is a new file, not a copy (its banner must be shipped).
        let banner_only = BANNER.to_vec();
        let other = content("z", 3);
        let (_t, f) = file_with(&other);
        let mut c = Catalog::default();
        c.record(mark_at("1:10:aa", &banner_only, banner_only.len() as u64));
        c.sweep(&|_, _| false);
        assert!(matches!(
            c.resolve(&f, 1, 0x11, other.len() as u64).unwrap(),
            Resume::New { .. }
        ));
        // Beyond the first line, a vanished file's copy is recognised (moved across devices).
        let a = content("a", 5);
        let (_t, fa) = file_with(&a);
        c.record(mark_at("1:20:bb", &a, a.len() as u64));
        c.sweep(&|_, _| false);
        assert!(matches!(
            c.resolve(&fa, 9, 0x99, a.len() as u64).unwrap(),
            Resume::Adopted { .. }
        ));
    }

    #[test]
    fn legacy_marks_are_adopted_by_first_line_and_tail() {
        let a = content("a", 5);
        let (_t, f) = file_with(&a);
        let fp = crate::agent::fingerprint::fingerprint(&f).unwrap().unwrap();
        let mut m = mark_at(&fp, &a, a.len() as u64);
        m.head_hash = None;
        let mut c = Catalog::load(vec![m]);
        assert!(matches!(
            c.resolve(&f, 1, 2, a.len() as u64).unwrap(),
            Resume::Adopted { .. }
        ));
    }

    #[test]
    fn content_moved_sees_a_rewrite_with_the_same_banner() {
        let old = content("old", 5);
        let (t, f) = file_with(&old);
        let pos = old.len() as u64;
        let carry = &old[old.len() - TAIL_BYTES as usize..];
        assert!(!content_moved(&f, pos, &old, carry).unwrap());
        let new = content("new", 9);
        std::fs::write(t.path(), &new).unwrap();
        assert!(content_moved(&f, pos, &old, carry).unwrap());
        std::fs::write(t.path(), &old[..10]).unwrap();
        assert!(content_moved(&f, pos, &old, carry).unwrap());
    }
}
