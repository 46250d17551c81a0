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
    Ok(Code::Success)
}
