//! `pipewatch progress`: an experiment's progress tree (`get_progress_tree`) drawn with bars,
//! percent, status and age; `--watch` redraws it.

use super::out::{out, outln};
use super::render;
use super::Context;
use crate::exit::Code;
use chrono::Utc;
use std::io::IsTerminal;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Experiment id or name
    #[arg(long, short)]
    pub experiment: String,
    /// Redraw every few seconds until Ctrl-C
    #[arg(long, short)]
    pub watch: bool,
    /// Time between redraws with --watch: seconds (5, 0.5) or a duration (500ms, 2s, 1m);
    /// at least 200ms
    #[arg(long, default_value = "2", value_parser = super::interval_arg)]
    pub interval: Duration,
}

pub async fn execute(args: Args, ctx: &Context) -> anyhow::Result<Code> {
    let client = ctx.connect().await?;
    let experiment = super::experiment_arg(&client, &args.experiment).await?;
    // Named as the other commands name it: by name where the experiment has one.
    let label = crate::db::queries::experiment_name(&client, experiment)
        .await?
        .unwrap_or_else(|| experiment.to_string());
    let color = super::out::color_stdout();
    let terminal = std::io::stdout().is_terminal();
    let mut stop = super::StopSignals::new()?;
    loop {
        let rows = crate::db::queries::progress_tree(&client, experiment).await?;
        let text = if rows.is_empty() {
            format!("no progress recorded for experiment {label}\n")
        } else {
            render::progress_tree(&rows, Utc::now(), color)
        };
        if args.watch && terminal {
            out!("\x1b[H\x1b[2J");
            outln!(
                "{}",
                render::paint(
                    &format!("progress of {label} — {}", Utc::now().format("%H:%M:%S")),
                    "1",
                    color
                )
            );
        }
        out!("{text}");
        super::out::flush()?;
        if !args.watch {
            return Ok(Code::Success);
        }
        tokio::select! {
            _ = tokio::time::sleep(args.interval) => {}
            _ = stop.recv() => return Ok(Code::Success),
        }
        if !terminal {
            outln!();
        }
    }
}
