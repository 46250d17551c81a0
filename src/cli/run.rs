//! `pipewatch run`: the agent, until SIGTERM/SIGINT, or once through every file (`--once`).

use super::Context;
use crate::exit::{usage, Code};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Ship everything currently in the matched files up to EOF, commit, and exit
    #[arg(long)]
    pub once: bool,
}

pub async fn execute(args: Args, ctx: &Context) -> anyhow::Result<Code> {
    let config = ctx.load_config()?;
    if config.daemons.is_empty() {
        return Err(usage(format!(
            "{}: no daemon configured: add a [daemons.NAME] table with `logs = [...]`",
            config.source.display()
        )));
    }
    crate::config::check_shared_files(&config)?;
    let target = ctx.db_target(Some(&config))?;
    let stop = crate::agent::shutdown::install();
    let summary = match crate::agent::run(config, target, args.once, stop).await {
        Ok(summary) => summary,
        // Stopped while the database was unreachable: nothing is lost (uncommitted lines are
        // read again at the next start), so this is still a clean stop.
        Err(crate::agent::sink::SinkError::Deadline(last)) => {
            tracing::warn!(error = %last, "stopped before the last batch could be committed; it is read again at the next start");
            return Ok(Code::Success);
        }
        // A refused login (`--once`): a configuration error, exit 2.
        Err(crate::agent::sink::SinkError::Login(refused)) => {
            return Err(usage(refused.to_string()))
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(
        records = summary.records_shipped,
        quarantined = summary.records_quarantined,
        batches = summary.batches,
        "agent stopped"
    );
    if args.once && !summary.unreadable.is_empty() {
        let list: Vec<String> = summary
            .unreadable
            .iter()
            .map(|(path, error)| format!("{path} ({error})"))
            .collect();
        anyhow::bail!(
            "{} log file(s) or directories could not be read and were not shipped: {} — \
             give the agent's user read access (its group, or setfacl -m u:USER:r)",
            list.len(),
            list.join(", ")
        );
    }
    Ok(Code::Success)
}
