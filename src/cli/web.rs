//! `pipewatch web`: serve the read-only web view (`crate::web`) until Ctrl-C or SIGTERM.
//!
//! Loopback by default; another address needs `--token-file` (or `--insecure`, said loudly).

use super::Context;
use crate::exit::{usage, Code};
use anyhow::Context as _;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to listen on (loopback by default; any other address needs --token-file)
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// File holding the access token (at least 16 characters; surrounding whitespace is
    /// ignored). Clients send it as `Authorization: Bearer TOKEN`, or as the password of HTTP
    /// basic auth (any user name), which browsers ask for
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Serve a non-loopback address without any credential (anyone who can reach it reads
    /// every log)
    #[arg(long)]
    pub insecure: bool,
}

/// The shortest token accepted.
const MIN_TOKEN_CHARS: usize = 16;

/// Reads and checks a token file.
pub fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| usage(format!("cannot read --token-file {}: {e}", path.display())))?;
    let token = text.trim().to_string();
    if token.chars().count() < MIN_TOKEN_CHARS {
        return Err(usage(format!(
            "--token-file {}: the token must be at least {MIN_TOKEN_CHARS} characters (it has {})",
            path.display(),
            token.chars().count()
        )));
    }
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        if m.permissions().mode() & 0o004 != 0 {
            tracing::warn!(
                "the token file {} is readable by every user; chmod o-r it",
                path.display()
            );
        }
    }
    Ok(token)
}

pub async fn execute(args: Args, ctx: &Context) -> anyhow::Result<Code> {
    let token = args.token_file.as_deref().map(read_token).transpose()?;
    let access = crate::web::access_for(args.listen, token, args.insecure).map_err(usage)?;
    if matches!(access, crate::web::Access::Open) {
        tracing::warn!(
            "serving {} without a credential (--insecure): anyone who can reach it reads every log",
            args.listen
        );
    }
    let config = ctx.optional_config()?;
    let target = ctx.db_target(config.as_ref())?;
    // Connect once now, so a wrong URL or password is said at start, not at the first page.
    drop(crate::db::connect(&target).await?);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    // A closed stdout does not stop a server: the address is also in the log below.
    let said = super::out::write_fmt(format_args!(
        "pipewatch web: http://{addr}/ (Ctrl-C to stop)\n"
    ))
    .and_then(|()| super::out::flush());
    if let Err(e) = said {
        if !super::out::is_closed(&e) {
            return Err(e);
        }
    }
    tracing::debug!(%addr, "serving the web view");
    let state = std::sync::Arc::new(crate::web::AppState::new(target, access));
    let mut stop = super::StopSignals::new()?;
    crate::web::serve(listener, state, async move { stop.recv().await }).await?;
    Ok(Code::Success)
}
