//! `pipewatch run`: the agent.

use super::Context;
use crate::exit::Code;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Ship everything currently in the matched files up to EOF, commit, and exit
    #[arg(long)]
    pub once: bool,
}

pub async fn execute(_args: Args, _ctx: &Context) -> anyhow::Result<Code> {
    anyhow::bail!("`run` is not implemented yet")
}
