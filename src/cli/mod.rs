//! The command line: global options, the subcommands, and the shared [`Context`] that
//! resolves the config file and database URL the way CONTRACT.md §1 says.
//!
//! Only `cli` prints for the user; everything below it returns values or errors.

use crate::config::{self, Config};
use crate::db::DbTarget;
use crate::exit::{usage, Code};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

pub mod access;
pub mod check_config;
pub mod cleanup;
pub mod demo;
pub mod errors;
pub mod experiments;
pub mod logs;
pub mod manpage;
pub mod migrate;
pub mod out;
pub mod progress;
pub mod render;
pub mod run;
pub mod sample;
pub mod status;
pub mod verify;
pub mod web;
pub mod why;

/// The default config file.
pub const DEFAULT_CONFIG: &str = "/etc/pipewatch/pipewatch.toml";

/// pipewatch: ship data-pipeline daemons' logs, progress, events and metrics to PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "pipewatch", version, about, long_about = None)]
pub struct Cli {
    /// Config file [default: /etc/pipewatch/pipewatch.toml]
    #[arg(long, global = true, env = "PIPEWATCH_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Database URL (libpq URL or key=value string); overrides PIPEWATCH_DATABASE_URL and
    /// the config file's `[database] url`
    #[arg(long, global = true, value_name = "URL")]
    pub database_url: Option<String>,

    /// Log the agent's own activity at debug level
    #[arg(long, short, global = true)]
    pub verbose: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: tail every configured daemon's logs and ship them
    Run(run::Args),
    /// Apply the embedded database migrations
    Migrate(migrate::Args),
    /// Test the monitoring schema end to end (rolled back) and print a checklist
    Verify(verify::Args),
    /// Validate the config, print it resolved (secrets hidden) and check files and database
    CheckConfig(check_config::Args),
    /// Query an experiment's logs
    Logs(logs::Args),
    /// Draw an experiment's progress tree
    Progress(progress::Args),
    /// List recent errors, grouped
    Errors(errors::Args),
    /// Delete log, event and metric rows older than a given age
    Cleanup(cleanup::Args),
    /// Show the fleet, table sizes and migrations at a glance
    Status(status::Args),
    /// Demonstrate pipewatch end to end against a throwaway local PostgreSQL
    Demo(demo::Args),
    /// Create or list experiments (rows that give an experiment id a name)
    Experiments(experiments::Args),
    /// What a daemon is doing: a live diagnosis, or the last one stored for an experiment
    Why(why::Args),
    /// Serve a read-only web view of experiments, progress, resources, logs and agents
    Web(web::Args),
    /// Print the man page (roff), generated from this command line
    #[command(hide = true)]
    Manpage,
    /// The demo's simulated pipeline daemon
    #[command(hide = true)]
    DemoDaemon(demo::DaemonArgs),
}

/// What every subcommand gets: where the config is and how to reach the database.
#[derive(Debug, Clone)]
pub struct Context {
    /// The config path, and whether the user chose it (flag or environment).
    pub config_path: PathBuf,
    pub config_explicit: bool,
    /// `--database-url`.
    pub database_url_flag: Option<String>,
    /// The subcommand's name: connections show as `pipewatch/<command>` in
    /// `pg_stat_activity` (the agent's as `pipewatch/<host>`).
    pub command: &'static str,
}

impl Context {
    /// Loads the config file; a missing file is an error. Secrets readable by others are
    /// warned about.
    pub fn load_config(&self) -> anyhow::Result<Config> {
        let config = config::load(&self.config_path)?;
        for warning in config::redact::exposure_warnings(&config) {
            tracing::warn!("{warning}");
        }
        Ok(config)
    }

    /// Loads the config file when there is one; a missing default file is not an error. A
    /// default file this user may not read (the packaged one is `root:pipewatch 0640`) is
    /// skipped with a one-line note when the database URL comes from elsewhere; a file
    /// chosen with `--config` or `PIPEWATCH_CONFIG` must always be readable.
    pub fn optional_config(&self) -> anyhow::Result<Option<Config>> {
        if !self.config_explicit {
            match std::fs::File::open(&self.config_path) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) if self.url_outside_config().is_some() => {
                    out::note(&format!(
                        "note: skipping the default config {} ({e}); this command needs only the database URL given",
                        self.config_path.display()
                    ));
                    return Ok(None);
                }
                Err(_) => {}
            }
        }
        self.load_config().map(Some)
    }

    /// The database URL from the flag or the environment, if either gives one.
    fn url_outside_config(&self) -> Option<String> {
        if let Some(u) = &self.database_url_flag {
            return Some(u.clone());
        }
        std::env::var("PIPEWATCH_DATABASE_URL")
            .ok()
            .filter(|u| !u.trim().is_empty())
    }

    /// The database URL by precedence: flag > `PIPEWATCH_DATABASE_URL` > `[database] url`.
    pub fn database_url(&self, config: Option<&Config>) -> anyhow::Result<String> {
        if let Some(u) = self.url_outside_config() {
            return Ok(u);
        }
        if let Some(u) = config.and_then(|c| c.database.url.clone()) {
            return Ok(u);
        }
        Err(usage(format!(
            "no database URL: pass --database-url, set PIPEWATCH_DATABASE_URL, or set [database] url in {}",
            self.config_path.display()
        )))
    }

    /// The resolved database target, with the config's password and CA files and its
    /// `[database]` deadlines when present.
    pub fn db_target(&self, config: Option<&Config>) -> anyhow::Result<DbTarget> {
        let url = self.database_url(config)?;
        let db = config.map(|c| &c.database);
        let target = DbTarget::parse(
            &url,
            db.and_then(|d| d.password_file.as_deref()),
            db.and_then(|d| d.ca_file.as_deref()),
        )
        .map_err(|e| usage(format!("{e:#}")))?;
        let target = target.with_application_name(&format!("pipewatch/{}", self.command));
        Ok(match db {
            Some(d) => target.with_limits(&d.limits),
            None => target,
        })
    }

    /// For commands that need only the database: loads the config if present, then connects.
    pub async fn connect(&self) -> anyhow::Result<tokio_postgres::Client> {
        let config = self.optional_config()?;
        let target = self.db_target(config.as_ref())?;
        crate::db::connect(&target).await
    }
}

impl Command {
    /// The subcommand as typed.
    fn name(&self) -> &'static str {
        match self {
            Command::Run(_) => "run",
            Command::Migrate(_) => "migrate",
            Command::Verify(_) => "verify",
            Command::CheckConfig(_) => "check-config",
            Command::Logs(_) => "logs",
            Command::Progress(_) => "progress",
            Command::Errors(_) => "errors",
            Command::Cleanup(_) => "cleanup",
            Command::Status(_) => "status",
            Command::Demo(_) => "demo",
            Command::Experiments(_) => "experiments",
            Command::Why(_) => "why",
            Command::Web(_) => "web",
            Command::Manpage => "manpage",
            Command::DemoDaemon(_) => "demo-daemon",
        }
    }
}

/// Runs the chosen subcommand.
pub async fn dispatch(cli: Cli) -> anyhow::Result<Code> {
    let ctx = Context {
        config_explicit: cli.config.is_some(),
        config_path: cli.config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG)),
        database_url_flag: cli.database_url,
        command: cli.command.name(),
    };
    match cli.command {
        Command::Run(a) => run::execute(a, &ctx).await,
        Command::Migrate(a) => migrate::execute(a, &ctx).await,
        Command::Verify(a) => verify::execute(a, &ctx).await,
        Command::CheckConfig(a) => check_config::execute(a, &ctx).await,
        Command::Logs(a) => logs::execute(a, &ctx).await,
        Command::Progress(a) => progress::execute(a, &ctx).await,
        Command::Errors(a) => errors::execute(a, &ctx).await,
        Command::Cleanup(a) => cleanup::execute(a, &ctx).await,
        Command::Status(a) => status::execute(a, &ctx).await,
        Command::Demo(a) => demo::execute(a, &ctx).await,
        Command::Experiments(a) => experiments::execute(a, &ctx).await,
        Command::Why(a) => why::execute(a, &ctx).await,
        Command::Web(a) => web::execute(a, &ctx).await,
        Command::Manpage => manpage::execute(),
        Command::DemoDaemon(a) => demo::run_daemon(a),
    }
}

/// An `--experiment` value (UUID or name) as an id. An unknown one — a name no experiment
/// has, or a UUID with neither an experiments row nor any record — is an error (exit 1) that
/// lists a few experiments that do exist.
pub async fn experiment_arg(
    client: &tokio_postgres::Client,
    value: &str,
) -> anyhow::Result<uuid::Uuid> {
    if let Some(id) = crate::db::queries::resolve_experiment(client, value).await? {
        return Ok(id);
    }
    let what = match uuid::Uuid::parse_str(value) {
        Ok(id) => format!("no experiment with id {id} (no experiments row and no records)"),
        Err(_) => format!("no experiment named {value:?}"),
    };
    let known: Vec<String> = crate::db::queries::some_experiments(client, 5)
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|(id, name)| match name {
            Some(n) => format!("{n} ({id})"),
            None => id.to_string(),
        })
        .collect();
    if known.is_empty() {
        anyhow::bail!("{what}, and there are no experiments yet")
    }
    anyhow::bail!("{what}; some that exist: {}", known.join(", "))
}

/// The shortest `--interval` accepted: anything faster only burns CPU and floods the screen.
pub const MIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

/// Parses an interval: a bare number is seconds (`5`, `0.5`), anything else a duration
/// (`500ms`, `2s`, `1m`); at least [`MIN_INTERVAL`].
pub fn interval_arg(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let d = match t.parse::<f64>() {
        Ok(secs) if (0.0..1e9).contains(&secs) => std::time::Duration::from_secs_f64(secs),
        Ok(_) => return Err(format!("{s:?} is not a number of seconds")),
        Err(_) => humantime::parse_duration(t).map_err(|e| {
            format!("{s:?} is not an interval ({e}): write seconds (5) or a duration (500ms, 2s)")
        })?,
    };
    if d < MIN_INTERVAL {
        return Err(format!(
            "{s:?} is too short: the interval must be at least 200ms"
        ));
    }
    Ok(d)
}

/// The time `ago` before now, no earlier than 0001-01-01 UTC: a `--since` longer than
/// timestamps go means "since the beginning", not an overflow or "timestamp out of range".
pub fn since_cutoff(ago: std::time::Duration) -> chrono::DateTime<chrono::Utc> {
    let floor = chrono::NaiveDate::from_ymd_opt(1, 1, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map_or(chrono::DateTime::<chrono::Utc>::UNIX_EPOCH, |t| t.and_utc());
    chrono::Duration::from_std(ago)
        .ok()
        .and_then(|d| chrono::Utc::now().checked_sub_signed(d))
        .map_or(floor, |t| t.max(floor))
}

/// A LIKE pattern matching `text` anywhere, with `%`, `_` and `\\` escaped.
pub fn like_pattern(text: &str) -> String {
    let mut p = String::from("%");
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

/// SIGINT or SIGTERM, registered once so that a signal arriving between two waits is not lost.
pub struct StopSignals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub fn new() -> anyhow::Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    /// Resolves at the next SIGINT or SIGTERM.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}
