//! Running the real binary as an unprivileged user (`nobody`) for the permission tests. They
//! need root (as the throwaway PostgreSQL does) and `runuser`; elsewhere they say so and pass.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Whether this process may run commands as `nobody`; prints why not when it may not.
pub fn available() -> bool {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let runuser = Command::new("runuser").arg("--version").output().is_ok();
    if !(root && runuser) {
        eprintln!("skipped: needs root and runuser to run pipewatch as nobody");
    }
    root && runuser
}

/// The binary, at a path `nobody` may execute: the build output when every directory on its
/// way is searchable by others, else a copy in a world-readable temp dir.
pub fn bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let built = super::bin();
        let reachable = built
            .ancestors()
            .skip(1)
            .all(|a| std::fs::metadata(a).is_ok_and(|m| m.mode() & 0o001 != 0))
            && std::fs::metadata(&built).is_ok_and(|m| m.mode() & 0o005 == 0o005);
        if reachable {
            return built;
        }
        let dir = std::env::temp_dir().join(format!("pipewatch-it-bin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let copy = dir.join("pipewatch");
        std::fs::copy(&built, &copy).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        copy
    })
    .clone()
}

/// `runuser -u nobody -- pipewatch ARGS`, with the pipewatch environment cleared.
pub fn cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "nobody", "--"])
        .arg(bin())
        .args(args)
        .env_remove("PIPEWATCH_DATABASE_URL")
        .env_remove("PIPEWATCH_CONFIG")
        .env_remove("PGPASSWORD")
        .env_remove("RUST_LOG")
        .env_remove("PIPEWATCH_LOG");
    cmd
}

/// A temp dir that other users may enter and list (tempfile makes them 0700).
pub fn open_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o755);
    dir
}

/// `chmod MODE PATH`.
pub fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}
