//! `pipewatch migrate`: apply the embedded migrations, or report what exists
//! (`--check-only`), drop and recreate (`--force --yes`), insert a sample (`--test-data`),
//! print the seed's sample queries (`--show-queries`).
//!
//! The work is done by `db::migrate` and `db::schema`; this module only decides what to
//! run and prints the result.

use super::out::{out, outln};
use super::Context;
use crate::db::migrate::{self, MigrationStatus, State};
use crate::db::schema::{self, Inventory, Kind};
use crate::exit::{usage, Code};
use anyhow::Context as _;
use std::io::{BufRead, IsTerminal, Write};
use uuid::Uuid;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Report each table, view, function and migration without changing anything; exit 1
    /// when something is missing, pending or changed
    #[arg(long)]
    pub check_only: bool,

    /// Drop and recreate every monitoring object: ALL logs, events, metrics, progress and
    /// checkpoints are lost (experiments stay); needs --yes unless a terminal confirms
    #[arg(long)]
    pub force: bool,

    /// Confirm --force without a prompt
    #[arg(long, requires = "force")]
    pub yes: bool,

    /// After migrating, insert a realistic sample (progress tree, logs with an error and a
    /// traceback, events, metrics) for this existing experiment
    #[arg(long, value_name = "EXPERIMENT_ID")]
    pub test_data: Option<String>,

    /// Print the sample queries, ready to paste into psql (alone: no database needed)
    #[arg(long)]
    pub show_queries: bool,
}

pub async fn execute(args: Args, ctx: &Context) -> anyhow::Result<Code> {
    if args.check_only && (args.force || args.test_data.is_some()) {
        return Err(usage(
            "--check-only changes nothing; it cannot be combined with --force or --test-data",
        ));
    }
    let experiment = match &args.test_data {
        None => None,
        Some(s) => Some(Uuid::parse_str(s.trim()).map_err(|e| {
            usage(format!(
                "--test-data {s:?} is not an experiment id (a UUID): {e}"
            ))
        })?),
    };
    if args.show_queries && !args.check_only && !args.force && experiment.is_none() {
        out!("{}", schema::sample_queries(None));
        return Ok(Code::Success);
    }
    if args.force && !args.yes && !confirm_force()? {
        outln!("Nothing dropped.");
        return Ok(Code::Failure);
    }

    let mut client = ctx.connect().await?;
    if args.check_only {
        return check_only(&client).await;
    }

    let before = schema::inspect(&client).await?;
    if args.force {
        migrate::drop_all(&mut client).await?;
        outln!("Dropped every monitoring object and its data (--force).");
    }
    let report = migrate::apply(&mut client).await?;
    let after = schema::inspect(&client).await?;

    outln!("Migrations:");
    for m in &report.migrations {
        outln!("  {}", migration_line(m));
    }
    outln!("Objects:");
    for item in &after.items {
        let existed = !args.force && before.has(item.kind, &item.name);
        let word = match (item.present, existed, item.required) {
            (true, true, _) => "exists ",
            (true, false, _) => "created",
            (false, _, true) => "MISSING",
            (false, _, false) => "absent ",
        };
        let note = if !item.present && !item.required {
            "  (optional: the migrating user may not create roles)"
        } else {
            ""
        };
        outln!("  {word}  {:<9} {}{note}", item.kind.label(), item.name);
    }
    outln!(
        "Partitions: {} daily partitions created (yesterday through 7 days ahead).",
        report.partitions_created
    );

    let mut code = Code::Success;
    let changed = report.changed();
    if !changed.is_empty() {
        super::out::note(&format!(
            "warning: migration {} changed after it was applied; it was not re-run (run `migrate --force --yes` to recreate, losing data, or restore the file)",
            changed.join(", ")
        ));
    }
    let missing: Vec<String> = after.missing().map(|i| i.name.clone()).collect();
    if missing.is_empty() {
        outln!("{}", summary("Schema complete", &after));
    } else {
        outln!("Still missing after migrate: {}", missing.join(", "));
        code = Code::Failure;
    }

    if let Some(id) = experiment {
        match migrate::find_experiment(&client, id).await? {
            Some(exp) => {
                let counts = migrate::insert_test_data(&client, id).await?;
                outln!(
                    "Test data for experiment {} ({}): {} progress nodes, {} log records ({} errors), {} events, {} metric samples.",
                    exp.id, exp.name, counts.progress_nodes, counts.logs, counts.errors, counts.events, counts.metrics
                );
            }
            None => {
                let known = migrate::list_experiments(&client, 5).await?;
                let list = if known.is_empty() {
                    "there are no experiments in the experiments table".to_string()
                } else {
                    let shown: Vec<String> = known
                        .iter()
                        .map(|e| format!("{} ({})", e.id, e.name))
                        .collect();
                    format!("existing experiments: {}", shown.join(", "))
                };
                anyhow::bail!("--test-data: no experiment with id {id}; {list}");
            }
        }
    }
    if args.show_queries {
        out!("{}", schema::sample_queries(args.test_data.as_deref()));
    }
    Ok(code)
}

/// `--check-only`: list every object and migration; exit 0 only when nothing is missing,
/// pending or changed.
async fn check_only(client: &tokio_postgres::Client) -> anyhow::Result<Code> {
    let inventory = schema::inspect(client).await?;
    let migrations = migrate::status(client).await?;
    let groups = [
        (Kind::Table, "Tables"),
        (Kind::View, "Views"),
        (Kind::Function, "Functions"),
        (Kind::Trigger, "Trigger"),
        (Kind::Partition, "Partitions (default and today's)"),
        (Kind::Role, "Roles (optional)"),
    ];
    for (kind, title) in groups {
        outln!("{title}:");
        for item in inventory.items.iter().filter(|i| i.kind == kind) {
            let word = match (item.present, item.required) {
                (true, _) => "ok     ",
                (false, true) => "MISSING",
                (false, false) => "absent ",
            };
            outln!("  {word}  {}", item.name);
        }
    }
    outln!("Migrations:");
    for m in &migrations {
        outln!("  {}", migration_line(m));
    }
    let missing = inventory.missing().count();
    let pending = migrations
        .iter()
        .filter(|m| m.state == State::Pending)
        .count();
    let changed = migrations
        .iter()
        .filter(|m| matches!(m.state, State::Changed { .. }))
        .count();
    if missing == 0 && pending == 0 && changed == 0 {
        outln!("{}", summary("Up to date", &inventory));
        Ok(Code::Success)
    } else {
        let mut parts = Vec::new();
        if missing > 0 {
            parts.push(format!("{missing} objects missing"));
        }
        if pending > 0 {
            parts.push(format!("{pending} migrations pending"));
        }
        if changed > 0 {
            parts.push(format!("{changed} migrations changed since applied"));
        }
        outln!(
            "Not up to date: {}. Run `pipewatch migrate`.",
            parts.join(", ")
        );
        Ok(Code::Failure)
    }
}

fn migration_line(m: &MigrationStatus) -> String {
    let word = match &m.state {
        State::AppliedNow => "applied now".to_string(),
        State::Applied => "already applied".to_string(),
        State::Pending => "PENDING".to_string(),
        State::Changed { recorded } => format!(
            "CHANGED since applied (recorded checksum {}…, file {}…); not re-run",
            short(recorded),
            short(&m.checksum)
        ),
    };
    format!("{}_{:<20} {word}", m.version, m.name)
}

fn short(s: &str) -> &str {
    s.get(..12).unwrap_or(s)
}

fn summary(head: &str, inv: &Inventory) -> String {
    let (t, tt) = inv.count(Kind::Table);
    let (v, vt) = inv.count(Kind::View);
    let (f, ft) = inv.count(Kind::Function);
    format!("{head}: {t}/{tt} tables, {v}/{vt} views, {f}/{ft} functions, trigger and partitions in place.")
}

/// Asks on the terminal before `--force` drops data; a non-terminal stdin without `--yes`
/// is a usage error.
fn confirm_force() -> anyhow::Result<bool> {
    const WHAT: &str = "--force drops pipeline_logs, pipeline_events, pipeline_metrics, pipeline_progress, pipewatch_checkpoints and pipewatch_agents: all their data would be lost";
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(usage(format!(
            "{WHAT}; pass --yes to confirm (stdin is not a terminal, so pipewatch cannot ask)"
        )));
    }
    let mut out = std::io::stdout();
    writeln!(out, "{WHAT}.").context("cannot write to stdout")?;
    write!(out, "Type 'yes' to drop and recreate them: ").context("cannot write to stdout")?;
    out.flush().context("cannot write to stdout")?;
    let mut answer = String::new();
    stdin
        .lock()
        .read_line(&mut answer)
        .context("cannot read the answer from the terminal")?;
    Ok(answer.trim() == "yes")
}
