//! `pipewatch cleanup`.

use super::Context;
use crate::exit::Code;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub async fn execute(_args: Args, _ctx: &Context) -> anyhow::Result<Code> {
    anyhow::bail!("`cleanup` is not implemented yet")
}
