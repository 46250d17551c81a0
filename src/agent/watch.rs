//! File notifications (inotify; pipewatch is Linux-only): hints that wake readers, never the
//! truth (the readers' poll is).
//!
//! Two kinds of watches in one inotify instance, read by one thread (`inotify`):
//! - the directories of the daemons' globs, for names only (created, deleted, renamed,
//!   attributes): a file being written costs no event;
//! - a reader that goes idle arms its files with `IN_MODIFY | IN_ONESHOT`: the first write
//!   wakes it and removes the watch, so a steadily written file costs one event per idle
//!   period, not one per `write(2)`.
//!
//! Why not the `notify` crate: it always watches `IN_MODIFY` on the directories, so every
//! write of a daemon woke its thread and the reader (16 % of the agent's CPU at 1,000
//! lines/s), and it cannot arm a one-shot watch on a file.
//!
//! No inotify (or `PIPEWATCH_TEST_NO_INOTIFY` set): readers poll. The watch limit reached
//! (`ENOSPC`, `fs.inotify.max_user_watches`): one warning, and readers poll as if a directory
//! were unwatched from then on.

use crate::agent::tail::Hint;
use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// What a directory watch reports: names and attributes, never contents.
const DIR_MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR;
/// What an armed file reports: its next write (or truncation), once.
const FILE_MASK: u32 = libc::IN_MODIFY | libc::IN_ONESHOT;

/// Where a reader's hints go, and the directories its globs start from.
pub struct Waker {
    pub tx: std::sync::mpsc::Sender<Hint>,
    pub roots: Vec<PathBuf>,
}

impl Waker {
    /// Whether an event on `path` may concern this reader (`None`: may concern anyone).
    pub fn concerned(&self, path: Option<&Path>) -> bool {
        match path {
            None => true,
            Some(p) => self.roots.iter().any(|r| p.starts_with(r)),
        }
    }
}

pub type Wakers = Arc<Mutex<BTreeMap<String, Waker>>>;

/// What a watch descriptor stands for.
struct Watched {
    /// The directory, or the path a file was armed under (hints are routed by it).
    path: PathBuf,
    /// A directory watch, and whether its subdirectories are watched too.
    dir: Option<bool>,
}

/// The agent's inotify instance.
pub struct Watch {
    fd: OwnedFd,
    /// Written to end the event thread.
    stop: OwnedFd,
    wds: Mutex<HashMap<i32, Watched>>,
    wakers: Wakers,
    /// A directory watch was lost or a watch could not be added for lack of room: readers
    /// keep their poll short.
    degraded: AtomicBool,
    /// The watch limit was reported.
    warned_limit: AtomicBool,
}

impl Watch {
    /// Starts the instance and its event thread; `None` (with one warning) when inotify is
    /// unavailable.
    pub fn start(wakers: Wakers) -> Option<Arc<Watch>> {
        if std::env::var_os("PIPEWATCH_TEST_NO_INOTIFY").is_some() {
            tracing::warn!("file notifications disabled (PIPEWATCH_TEST_NO_INOTIFY); polling only");
            return None;
        }
        // SAFETY: plain syscalls; each returned descriptor is owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if fd < 0 {
            let error = std::io::Error::last_os_error();
            tracing::warn!(%error, "file notifications unavailable; polling only");
            return None;
        }
        // SAFETY: `fd` is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: as above.
        let stop = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if stop < 0 {
            let error = std::io::Error::last_os_error();
            tracing::warn!(%error, "file notifications unavailable; polling only");
            return None;
        }
        // SAFETY: `stop` is a new descriptor nobody else owns.
        let stop = unsafe { OwnedFd::from_raw_fd(stop) };
        let watch = Arc::new(Watch {
            fd,
            stop,
            wds: Mutex::new(HashMap::new()),
            wakers,
            degraded: AtomicBool::new(false),
            warned_limit: AtomicBool::new(false),
        });
        let w = Arc::clone(&watch);
        let spawned = std::thread::Builder::new()
            .name("inotify".into())
            .spawn(move || w.run());
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start the file notification thread; polling only");
            return None;
        }
        Some(watch)
    }

    /// Ends the event thread (the instance closes when the last reader lets it go).
    pub fn shutdown(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
        let _ = unsafe { libc::write(self.stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Whether readers may trust the watches and poll rarely.
    pub fn healthy(&self) -> bool {
        !self.degraded.load(Ordering::Relaxed)
    }

    /// Watches `dir` (and, when `recursive`, every directory below it) for names; whether
    /// every one of them is watched.
    pub fn watch_dir(&self, dir: &Path, recursive: bool) -> bool {
        if self.add(dir, DIR_MASK, Some(recursive)).is_none() {
            return false;
        }
        if !recursive {
            return true;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return false;
        };
        let mut all = true;
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                all &= self.watch_dir(&entry.path(), true);
            }
        }
        all
    }

    /// Arms a one-shot watch for the next write of the file at `target` (a path, or
    /// `/proc/self/fd/N` for an open file), routed as `label`. The watch descriptor, or
    /// `None` when it cannot be armed (the poll covers it).
    pub fn arm(&self, target: &Path, label: &Path) -> Option<i32> {
        self.add(target, FILE_MASK, None).inspect(|&wd| {
            if let Ok(mut wds) = self.wds.lock() {
                if let Some(w) = wds.get_mut(&wd) {
                    w.path = label.to_path_buf();
                }
            }
        })
    }

    /// Removes an armed file watch (one that has not fired yet).
    pub fn disarm(&self, wd: i32) {
        let Ok(mut wds) = self.wds.lock() else { return };
        if wds.get(&wd).is_some_and(|w| w.dir.is_none()) {
            wds.remove(&wd);
            // SAFETY: plain syscall; an already removed watch is EINVAL, which is fine.
            unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), wd) };
        }
    }

    fn add(&self, path: &Path, mask: u32, dir: Option<bool>) -> Option<i32> {
        let c = CString::new(path.as_os_str().as_bytes()).ok()?;
        let Ok(mut wds) = self.wds.lock() else {
            return None;
        };
        // SAFETY: `c` is a valid NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), mask) };
        if wd < 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::ENOSPC) {
                self.degraded.store(true, Ordering::Relaxed);
                if !self.warned_limit.swap(true, Ordering::Relaxed) {
                    tracing::warn!(path = %path.display(), "inotify watch limit reached (fs.inotify.max_user_watches); polling files that cannot be watched");
                }
            } else {
                tracing::debug!(path = %path.display(), %error, "cannot watch; polling it");
            }
            return None;
        }
        match wds.get_mut(&wd) {
            // The same inode again: a directory stays a directory watch.
            Some(w) if w.dir.is_some() && dir.is_none() => {}
            _ => {
                wds.insert(
                    wd,
                    Watched {
                        path: path.to_path_buf(),
                        dir,
                    },
                );
            }
        }
        Some(wd)
    }

    /// The event thread: reads events until [`Watch::shutdown`] and wakes the readers they
    /// concern.
    fn run(self: Arc<Self>) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfd.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if rc < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                break;
            }
            if fds[1].revents != 0 {
                break;
            }
            // SAFETY: reads into a buffer we own, at most its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                if n < 0
                    && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
                {
                    continue;
                }
                break;
            }
            self.dispatch(&buf[..n as usize]);
        }
        // Readers poll from now on.
        self.degraded.store(true, Ordering::Relaxed);
    }

    fn dispatch(&self, mut bytes: &[u8]) {
        const HEADER: usize = std::mem::size_of::<libc::inotify_event>();
        let mut hints: Vec<(Hint, Option<PathBuf>)> = Vec::new();
        while bytes.len() >= HEADER {
            // SAFETY: at least HEADER bytes remain; read_unaligned needs no alignment.
            let ev: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            let len = ev.len as usize;
            let name_bytes = &bytes[HEADER..(HEADER + len).min(bytes.len())];
            bytes = &bytes[(HEADER + len).min(bytes.len())..];
            let name_end = name_bytes
                .iter()
                .position(|b| *b == 0)
                .unwrap_or(name_bytes.len());
            let name = std::ffi::OsStr::from_bytes(&name_bytes[..name_end]);
            if ev.mask & libc::IN_Q_OVERFLOW != 0 {
                // Events were lost: everyone looks.
                hints.push((Hint::Names, None));
                continue;
            }
            let Ok(mut wds) = self.wds.lock() else { return };
            let Some(w) = wds.get(&ev.wd) else { continue };
            let path = if name.is_empty() {
                w.path.clone()
            } else {
                w.path.join(name)
            };
            match w.dir {
                Some(recursive) => {
                    if ev.mask & (libc::IN_IGNORED | libc::IN_DELETE_SELF | libc::IN_MOVE_SELF) != 0
                    {
                        // The directory itself went away: its readers poll from now on.
                        self.degraded.store(true, Ordering::Relaxed);
                        if ev.mask & libc::IN_IGNORED != 0 {
                            wds.remove(&ev.wd);
                        }
                    }
                    hints.push((Hint::Names, Some(path.clone())));
                    let new_dir = ev.mask & libc::IN_ISDIR != 0
                        && ev.mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0;
                    drop(wds);
                    if recursive && new_dir && !self.watch_dir(&path, true) {
                        self.degraded.store(true, Ordering::Relaxed);
                    }
                }
                None => {
                    if ev.mask & libc::IN_IGNORED != 0 {
                        wds.remove(&ev.wd);
                    }
                    if ev.mask & libc::IN_MODIFY != 0 {
                        hints.push((Hint::Data, Some(path)));
                    }
                }
            }
        }
        if hints.is_empty() {
            return;
        }
        if let Ok(w) = self.wakers.lock() {
            for waker in w.values() {
                for (hint, path) in &hints {
                    if waker.concerned(path.as_deref()) {
                        let _ = waker.tx.send(*hint);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn setup(root: &Path) -> (Arc<Watch>, std::sync::mpsc::Receiver<Hint>) {
        let wakers: Wakers = Arc::new(Mutex::new(BTreeMap::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        wakers.lock().unwrap().insert(
            "d".into(),
            Waker {
                tx,
                roots: vec![root.to_path_buf()],
            },
        );
        (Watch::start(wakers).expect("inotify"), rx)
    }

    #[test]
    fn names_wake_a_watched_directory_writes_only_an_armed_file_and_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let (w, rx) = setup(&root);
        assert!(w.watch_dir(&root, false));
        let file = root.join("a.log");
        std::fs::write(&file, "x\n").unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(2)), Ok(Hint::Names));
        while rx.recv_timeout(Duration::from_millis(200)).is_ok() {}
        // Writes to a file that is not armed: no hint at all.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .unwrap();
        use std::io::Write;
        for _ in 0..10 {
            f.write_all(b"y\n").unwrap();
        }
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        // Armed: the next write wakes once, however many follow.
        assert!(w.arm(&file, &file).is_some());
        for _ in 0..10 {
            f.write_all(b"z\n").unwrap();
        }
        assert_eq!(rx.recv_timeout(Duration::from_secs(2)), Ok(Hint::Data));
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        // Disarmed before a write: nothing.
        let wd = w.arm(&file, &file).unwrap();
        w.disarm(wd);
        f.write_all(b"w\n").unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        assert!(w.healthy());
        w.shutdown();
    }

    #[test]
    fn a_recursive_watch_follows_new_subdirectories() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let (w, rx) = setup(&root);
        assert!(w.watch_dir(&root, true));
        std::fs::create_dir(root.join("sub")).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(2)), Ok(Hint::Names));
        // The new directory's watch is added by the event thread.
        std::thread::sleep(Duration::from_millis(200));
        while rx.try_recv().is_ok() {}
        std::fs::write(root.join("sub/b.log"), "x\n").unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(2)), Ok(Hint::Names));
        w.shutdown();
    }
}
