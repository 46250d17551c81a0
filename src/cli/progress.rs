//! `pipewatch progress`: an experiment's progress tree (`get_progress_tree`) drawn with bars,
//! percent, status and age; `--watch` redraws it.

use super::render;
use super::Context;
use crate::exit::Code;
use chrono::Utc;
use std::io::{IsTerminal, Write};
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Experiment id or name
    #[arg(long, short)]
    pub experiment: String,
    /// Redraw every few seconds until Ctrl-C
    #[arg(long, short)]
    pub watch: bool,
    /// Seconds between redraws with --watch
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
}

pub async fn execute(args: Args, ctx: &Context) -> anyhow::Result<Code> {
    let client = ctx.connect().await?;
    let experiment = super::experiment_arg(&client, &args.experiment).await?;
    let color = std::io::stdout().is_terminal();
    let mut stop = super::StopSignals::new()?;
    loop {
        let rows = crate::db::queries::progress_tree(&client, experiment).await?;
        let text = if rows.is_empty() {
            format!("no progress recorded for experiment {experiment}\n")
        } else {
            render::progress_tree(&rows, Utc::now(), color)
        };
        if args.watch && color {
            print!("\x1b[H\x1b[2J");
            println!(
                "{}",
                render::paint(
                    &format!(
                        "progress of {experiment} — {}",
                        Utc::now().format("%H:%M:%S")
                    ),
                    "1",
                    true
                )
            );
        }
        print!("{text}");
        let _ = std::io::stdout().flush();
        if !args.watch {
            return Ok(Code::Success);
        }
        tokio::select! {
            _ = tokio::time::sleep(args.interval) => {}
            _ = stop.recv() => return Ok(Code::Success),
        }
        if !color {
            println!();
        }
    }
}
