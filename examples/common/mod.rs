//! Helpers the benchmark examples share: the agent binary they measure, a database client,
//! and the memory figures of a process. Each example includes it with `mod common;`.

use anyhow::{anyhow, bail, Context as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use tokio_postgres::NoTls;

/// The `pipewatch` next to the running example (`target/release/examples/NAME` →
/// `target/release/pipewatch`), built first (together with `example`) when cargo runs us.
pub fn pipewatch_binary(example: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locate the bench binary")?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("unexpected bench location {}", exe.display()))?;
    let bin = dir.join("pipewatch");
    if let Some(cargo) = std::env::var_os("CARGO") {
        let release = dir.file_name().is_some_and(|n| n == "release");
        let mut cmd = Command::new(cargo);
        // Built together with this example, so that both see the same features (the example
        // unifies dev-dependency features) and neither build undoes the other.
        cmd.args([
            "build",
            "--bin",
            "pipewatch",
            "--example",
            example,
            "--manifest-path",
        ])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"));
        if release {
            cmd.arg("--release");
        }
        // `cargo run` sets these for us; a build script (ring's) watches CARGO_MANIFEST_DIR,
        // so passing them on would make each build undo the other.
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("CARGO_PKG_")
                || matches!(
                    k.as_ref(),
                    "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_BIN_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                )
            {
                cmd.env_remove(&key);
            }
        }
        let st = cmd.status().context("run cargo build --bin pipewatch")?;
        if !st.success() {
            bail!("cargo build --bin pipewatch failed");
        }
    }
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build --release` first",
            bin.display()
        );
    }
    Ok(bin)
}

/// A client whose connection task ends quietly (the cluster stops at the end).
pub async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connect to {url}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Creates database `name` in the throwaway cluster and migrates it with `bin`; its URL.
pub async fn migrated_db(
    cluster: &pipewatch::db::throwaway::Throwaway,
    bin: &Path,
    name: &str,
) -> anyhow::Result<String> {
    connect(&cluster.url("postgres"))
        .await?
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    let url = cluster.url(name);
    let out = Command::new(bin)
        .args(["--database-url", &url, "migrate"])
        .stdin(std::process::Stdio::null())
        .output()
        .context("run pipewatch migrate")?;
    if !out.status.success() {
        bail!(
            "pipewatch migrate failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(url)
}

/// A `Vm*` line of /proc/PID/status, in bytes.
pub fn vm_bytes(pid: u32, key: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    for line in status.lines() {
        if let Some(v) = line.strip_prefix(key).and_then(|v| v.strip_prefix(':')) {
            let kb: u64 = v.trim().trim_end_matches("kB").trim().parse()?;
            return Ok(kb * 1024);
        }
    }
    bail!("{key} not in /proc/{pid}/status")
}
