//! Can the user pipewatch runs as read what a log glob names? `check-config` asks this of
//! every directory a glob walks and every file it matches, by listing and opening them for
//! real (never by reasoning about mode bits), and explains each refusal with the file's
//! owner, group and mode and the fix (a group or an ACL).
//!
//! Read-only: it opens and closes files, never reads from them, and never prints.

use std::fmt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// What one glob found.
#[derive(Debug, Default)]
pub struct GlobReport {
    /// Files that match and open for reading.
    pub readable: Vec<PathBuf>,
    /// Files or directories that could not be opened or listed.
    pub refused: Vec<Refusal>,
    /// The directory the glob starts from, when it does not exist.
    pub missing_base: Option<PathBuf>,
}

/// A path the current user may not open or list.
#[derive(Debug)]
pub struct Refusal {
    pub path: PathBuf,
    pub is_dir: bool,
    pub error: std::io::Error,
}

/// The user this process runs as, by name (or uid when it has none).
pub fn current_user() -> String {
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    user_name(uid).unwrap_or_else(|| uid.to_string())
}

fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: an all-zero passwd is a valid out-parameter; getpwuid_r writes strings into buf,
    // which outlives every pointer read below.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let rc = unsafe {
        libc::getpwuid_r(
            uid,
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
        return None;
    }
    // SAFETY: pw_name points to a NUL-terminated string inside buf.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

fn group_name(gid: u32) -> Option<String> {
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: as in user_name, for getgrgid_r.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    let rc = unsafe {
        libc::getgrgid_r(
            gid,
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() || grp.gr_name.is_null() {
        return None;
    }
    // SAFETY: gr_name points to a NUL-terminated string inside buf.
    let name = unsafe { std::ffi::CStr::from_ptr(grp.gr_name) };
    Some(name.to_string_lossy().into_owned())
}

/// The directory a glob starts from: its leading components without a wildcard, less the
/// last one (the file name part).
pub fn base_dir(pattern: &str) -> PathBuf {
    let mut base = PathBuf::new();
    let components: Vec<_> = Path::new(pattern).components().collect();
    let last = components.len().saturating_sub(1);
    for (i, c) in components.iter().enumerate() {
        let s = c.as_os_str().to_string_lossy();
        if i == last || s.contains(['*', '?', '[']) {
            break;
        }
        base.push(c);
    }
    if base.as_os_str().is_empty() {
        PathBuf::from("/")
    } else {
        base
    }
}

/// Lists the glob's directories and opens every file it matches, as this process's user.
pub fn check_glob(pattern: &str) -> GlobReport {
    let mut report = GlobReport::default();
    let base = base_dir(pattern);
    // The start directory: a refusal here used to read as "matches no file yet".
    match std::fs::read_dir(&base) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            report.missing_base = Some(base);
            return report;
        }
        Err(error) => {
            // Name the directory at fault: the first one on the way that may not be
            // entered, or the start directory itself when it only may not be listed.
            report
                .refused
                .push(blocked_ancestor(&base).unwrap_or(Refusal {
                    path: base,
                    is_dir: true,
                    error,
                }));
            return report;
        }
    }
    let Ok(paths) = glob::glob(pattern) else {
        return report;
    };
    for entry in paths {
        match entry {
            Ok(path) => {
                if path.is_dir() {
                    continue;
                }
                // Non-blocking: a FIFO matched by the glob must not hang the check.
                let opened = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&path);
                match opened {
                    Ok(_) => report.readable.push(path),
                    Err(error) => report.refused.push(Refusal {
                        path,
                        is_dir: false,
                        error,
                    }),
                }
            }
            // A directory the glob had to list and could not.
            Err(e) => {
                let path = e.path().to_path_buf();
                if !report.refused.iter().any(|r| r.path == path) {
                    report.refused.push(Refusal {
                        path,
                        is_dir: true,
                        error: e.into(),
                    });
                }
            }
        }
    }
    report
}

/// The first directory on the way to `dir` (from `/` down) that this user may not search.
fn blocked_ancestor(dir: &Path) -> Option<Refusal> {
    let mut ancestors: Vec<&Path> = dir.ancestors().collect();
    ancestors.reverse();
    for a in ancestors {
        if std::fs::symlink_metadata(a).is_err() {
            // Does not exist (or its parent was already reported): stop here.
            return None;
        }
        let c = std::ffi::CString::new(a.as_os_str().as_encoded_bytes()).ok()?;
        // SAFETY: c is a valid NUL-terminated path.
        if unsafe { libc::access(c.as_ptr(), libc::X_OK) } != 0 {
            return Some(Refusal {
                path: a.to_path_buf(),
                is_dir: true,
                error: std::io::Error::last_os_error(),
            });
        }
    }
    None
}

impl fmt::Display for Refusal {
    /// `cannot open FILE: Permission denied (os error 13); owner root:geo mode 0640; …fix`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let user = current_user();
        let (verb, perm) = if self.is_dir {
            ("list directory", "rX")
        } else {
            ("open", "r")
        };
        write!(f, "cannot {verb} {}: {}", self.path.display(), self.error)?;
        if let Ok(meta) = std::fs::metadata(&self.path) {
            let owner = user_name(meta.uid()).unwrap_or_else(|| meta.uid().to_string());
            let group = group_name(meta.gid()).unwrap_or_else(|| meta.gid().to_string());
            write!(
                f,
                " (owner {owner}:{group}, mode {:04o}); as user {user}: add {user} to group \
                 {group} (`usermod -aG {group} {user}`, or `SupplementaryGroups={group}` in the \
                 unit), or grant an ACL: `setfacl -m u:{user}:{perm} {}`",
                meta.mode() & 0o7777,
                self.path.display()
            )?;
        } else {
            write!(
                f,
                "; as user {user}: grant access to it and its parent directories \
                 (`setfacl -m u:{user}:{perm} DIR`)"
            )?;
        }
        if self.is_dir {
            write!(
                f,
                "; for files created later: `setfacl -d -m u:{user}:r {}`",
                self.path.display()
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_dir_stops_at_the_first_wildcard_or_the_file_name() {
        for (pattern, want) in [
            ("/var/log/geo/*.jsonl", "/var/log/geo"),
            ("/var/log/geo/app.jsonl", "/var/log/geo"),
            ("/var/log/*/x/*.log", "/var/log"),
            ("/data/run-[0-9]/out.log", "/data"),
            ("/x.log", "/"),
        ] {
            assert_eq!(base_dir(pattern), PathBuf::from(want), "{pattern}");
        }
    }
}
