//! The `pipewatch` binary: parses the command line, runs the command, maps errors to exit codes.

use clap::Parser;
use pipewatch::cli::out::note;
use pipewatch::cli::Cli;
use pipewatch::exit::{code_for, Code};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap prints help/version to stdout and errors to stderr with its own codes.
            let code = if e.use_stderr() {
                Code::Usage
            } else {
                Code::Success
            };
            let _ = e.print();
            return code.into();
        }
    };
    // The demo prints its own story; the agent inside it only speaks up about problems.
    let quiet = matches!(cli.command, pipewatch::cli::Command::Demo(_));
    pipewatch::telemetry::init(cli.verbose, quiet);
    // One thread runs every task: the agent's readers and metrics are threads of their own, so
    // its tasks (batcher, sink, connections, watchdog) only hand bytes along, and on one thread
    // they do it without waking other threads (same run, two agents side by side at 1,000
    // lines/s: 1.39–1.49 % of a core against 1.85–2.01 % with two workers; backfill 1.24 against
    // 1.14 × a raw COPY). The web view serves many clients at once: two workers.
    let mut builder = match cli.command {
        pipewatch::cli::Command::Web(_) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(2);
            b
        }
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            note(&format!("cannot start the async runtime: {e}"));
            return Code::Failure.into();
        }
    };
    match runtime.block_on(pipewatch::cli::dispatch(cli)) {
        Ok(code) => code.into(),
        // The reader of stdout went away (`| head -1`): a normal end, as for every Unix tool.
        Err(err) if pipewatch::cli::out::is_closed(&err) => Code::Success.into(),
        Err(err) => {
            let code = code_for(&err);
            let mut text = format!("{err:#}");
            if let Some(hint) = pipewatch::exit::hint_for(&err) {
                text.push_str(hint);
            }
            // One line per problem: configuration errors list each problem on its own line;
            // anything else (a server message with a HINT line, say) is kept on one.
            let is_config = err
                .chain()
                .any(|c| c.is::<pipewatch::config::resolve::ConfigErrors>());
            if !is_config {
                text = text.lines().map(str::trim).collect::<Vec<_>>().join(" ");
            }
            for line in text.lines() {
                note(line);
            }
            code.into()
        }
    }
}
