//! `pipewatch experiments add NAME [--id UUID]` and `experiments list`: rows of the
//! `experiments` table for setups whose daemons do not create them. pipewatch never needs
//! one (no table references it); a row only gives an id a name in views and commands.

use super::out::outln;
use super::Context;
use crate::db::typed::p;
use crate::exit::{usage, Code};
use anyhow::Context as _;
use uuid::Uuid;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: Sub,
}

#[derive(Debug, clap::Subcommand)]
pub enum Sub {
    /// Create an experiment and print its id; a name or id that exists already is refused
    Add {
        /// The experiment's name (unique among experiments)
        name: String,
        /// Use this id (a UUID; e.g. the one the daemons already log) [default: a new one]
        #[arg(long)]
        id: Option<String>,
    },
    /// List experiments, newest first: id, name, created
    List {
        /// At most this many
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
}

pub async fn execute(args: Args, ctx: &Context) -> anyhow::Result<Code> {
    match args.command {
        Sub::Add { name, id } => add(ctx, &name, id.as_deref()).await,
        Sub::List { limit } => list(ctx, limit).await,
    }
}

async fn add(ctx: &Context, name: &str, id: Option<&str>) -> anyhow::Result<Code> {
    let name = name.trim();
    if name.is_empty() {
        return Err(usage("experiments add: the name must not be empty"));
    }
    let id = match id {
        Some(s) => Uuid::parse_str(s.trim())
            .map_err(|e| usage(format!("--id {s:?} is not a UUID: {e}")))?,
        None => Uuid::new_v4(),
    };
    let mut client = ctx.connect().await?;
    let tx = client.transaction().await?;
    // Serialise concurrent adds so that the two checks below hold until commit.
    tx.execute_typed("LOCK TABLE experiments IN SHARE ROW EXCLUSIVE MODE", &[])
        .await
        .context("cannot lock the experiments table")?;
    if let Some(row) = tx
        .query_typed_opt(
            "SELECT id FROM experiments WHERE name = $1 LIMIT 1",
            &[p(&name)],
        )
        .await?
    {
        let existing: Uuid = row.get(0);
        anyhow::bail!("an experiment named {name:?} exists already (id {existing})");
    }
    if let Some(row) = tx
        .query_typed_opt(
            "SELECT coalesce(name::text, '') FROM experiments WHERE id = $1",
            &[p(&id)],
        )
        .await?
    {
        let existing: String = row.get(0);
        anyhow::bail!("an experiment with id {id} exists already (named {existing:?})");
    }
    tx.execute_typed(
        "INSERT INTO experiments (id, name) VALUES ($1, $2)",
        &[p(&id), p(&name)],
    )
    .await
    .context("cannot insert into experiments")?;
    tx.commit().await?;
    outln!("{id}");
    Ok(Code::Success)
}

async fn list(ctx: &Context, limit: i64) -> anyhow::Result<Code> {
    if limit < 1 {
        return Err(usage("--limit must be at least 1"));
    }
    let client = ctx.connect().await?;
    let rows = crate::db::queries::some_experiments(&client, limit).await?;
    if rows.is_empty() {
        outln!("no experiments yet (`pipewatch experiments add NAME` creates one)");
    }
    for (id, name) in rows {
        outln!("{id}  {}", name.as_deref().unwrap_or("-"));
    }
    Ok(Code::Success)
}
