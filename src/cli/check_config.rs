//! `pipewatch check-config`: validate the config, print it resolved with secrets hidden,
//! check that globs match, that pid files and process patterns resolve, and that the
//! database is reachable.

use super::Context;
use crate::exit::Code;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Show what each daemon's rules produce for the lines of FILE (a dry run)
    #[arg(long, value_name = "FILE")]
    pub sample: Option<PathBuf>,
    /// The daemon whose rules --sample uses [default: the only one, or the first]
    #[arg(long, value_name = "NAME")]
    pub daemon: Option<String>,
}

pub async fn execute(args: Args, ctx: &Context) -> anyhow::Result<Code> {
    let config = ctx.load_config()?;
    print!(
        "{}",
        crate::config::redact::describe(&config, ctx.database_url(Some(&config)).ok().as_deref())
    );
    let mut ok = true;
    println!();
    println!("checks:");
    for d in &config.daemons {
        for pattern in &d.logs {
            let matched: Vec<_> = glob::glob(pattern)
                .map(|paths| {
                    paths
                        .filter_map(Result::ok)
                        .filter(|p| p.is_file())
                        .collect()
                })
                .unwrap_or_default();
            if matched.is_empty() {
                println!(
                    "  [warn] daemons.{}: logs {pattern:?} matches no file yet",
                    d.name
                );
            } else {
                println!(
                    "  [ok]   daemons.{}: logs {pattern:?} matches {} file(s)",
                    d.name,
                    matched.len()
                );
            }
        }
        if let Some(pf) = &d.pid_file {
            match std::fs::read_to_string(pf) {
                Ok(s) => match s.trim().parse::<u32>() {
                    Ok(pid) if std::path::Path::new(&format!("/proc/{pid}")).exists() => {
                        println!(
                            "  [ok]   daemons.{}: pid_file {} → pid {pid} (running)",
                            d.name,
                            pf.display()
                        )
                    }
                    Ok(pid) => println!(
                        "  [warn] daemons.{}: pid_file {} → pid {pid}, which is not running",
                        d.name,
                        pf.display()
                    ),
                    Err(_) => println!(
                        "  [warn] daemons.{}: pid_file {} does not hold a pid ({:?})",
                        d.name,
                        pf.display(),
                        s.trim()
                    ),
                },
                Err(e) => println!(
                    "  [warn] daemons.{}: pid_file {}: {e}",
                    d.name,
                    pf.display()
                ),
            }
        }
        if let Some(re) = &d.process_match {
            let pids = crate::agent::metrics::process::match_processes(re);
            if pids.is_empty() {
                println!(
                    "  [warn] daemons.{}: process_match {:?} matches no running process",
                    d.name,
                    re.as_str()
                );
            } else {
                println!(
                    "  [ok]   daemons.{}: process_match {:?} matches pid(s) {:?}",
                    d.name,
                    re.as_str(),
                    pids
                );
            }
        }
    }
    let mut refused = false;
    match ctx.db_target(Some(&config)) {
        Ok(target) => match crate::db::connect(&target).await {
            Ok(client) => match client.query_one("SELECT version()", &[]).await {
                Ok(row) => {
                    let v: String = row.get(0);
                    println!(
                        "  [ok]   database {} reachable ({})",
                        target.display,
                        v.split(',').next().unwrap_or(&v)
                    );
                }
                Err(e) => {
                    ok = false;
                    println!("  [fail] database {}: {e}", target.display);
                }
            },
            Err(e) => {
                ok = false;
                // A refused login is a configuration error (exit 2), not an outage.
                refused |= e.chain().any(|c| c.is::<crate::exit::UsageError>());
                println!("  [fail] {e:#}");
            }
        },
        Err(e) => {
            ok = false;
            println!("  [fail] database: {e:#}");
        }
    }
    if let Some(sample) = &args.sample {
        crate::agent::rules::print_sample(&config, args.daemon.as_deref(), sample)?;
    }
    Ok(if refused {
        Code::Usage
    } else if ok {
        Code::Success
    } else {
        Code::Failure
    })
}
