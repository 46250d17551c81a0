//! `pipewatch check-config`: validate the config, print it resolved with secrets hidden,
//! check that globs match and that every directory and file they reach can be read by the
//! user it runs as (`access`), that pid files and process patterns resolve, and that the
//! database is usable: reachable, fully migrated, and the role allowed to do what the agent
//! does (`db::usable`). Exit 1 when anything fails; the packaged unit runs it before `run`.

use super::out::{out, outln};
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
    // Two daemons matching one existing file is a configuration error, as for `run`.
    crate::config::check_shared_files(&config)?;
    out!(
        "{}",
        crate::config::redact::describe(&config, ctx.database_url(Some(&config)).ok().as_deref())
    );
    let mut ok = true;
    outln!();
    outln!("checks:");
    for d in &config.daemons {
        for pattern in &d.logs {
            let report = super::access::check_glob(pattern);
            for refusal in &report.refused {
                ok = false;
                outln!("  [fail] daemons.{}: logs {pattern:?}: {refusal}", d.name);
            }
            let n = report.readable.len();
            if !report.refused.is_empty() {
                if n > 0 {
                    outln!(
                        "  [ok]   daemons.{}: logs {pattern:?}: {n} other file(s) readable",
                        d.name
                    );
                }
            } else if let Some(base) = &report.missing_base {
                outln!(
                    "  [warn] daemons.{}: logs {pattern:?} matches no file yet (directory {} does not exist)",
                    d.name,
                    base.display()
                );
            } else if n == 0 {
                outln!(
                    "  [warn] daemons.{}: logs {pattern:?} matches no file yet",
                    d.name
                );
            } else {
                outln!(
                    "  [ok]   daemons.{}: logs {pattern:?} matches {n} file(s), all readable by {}",
                    d.name,
                    super::access::current_user()
                );
            }
        }
        if let Some(pf) = &d.pid_file {
            match std::fs::read_to_string(pf) {
                Ok(s) => match s.trim().parse::<u32>() {
                    Ok(pid) if std::path::Path::new(&format!("/proc/{pid}")).exists() => {
                        outln!(
                            "  [ok]   daemons.{}: pid_file {} → pid {pid} (running)",
                            d.name,
                            pf.display()
                        )
                    }
                    Ok(pid) => outln!(
                        "  [warn] daemons.{}: pid_file {} → pid {pid}, which is not running",
                        d.name,
                        pf.display()
                    ),
                    Err(_) => outln!(
                        "  [warn] daemons.{}: pid_file {} does not hold a pid ({:?})",
                        d.name,
                        pf.display(),
                        s.trim()
                    ),
                },
                Err(e) => outln!(
                    "  [warn] daemons.{}: pid_file {}: {e}",
                    d.name,
                    pf.display()
                ),
            }
        }
        if let Some(re) = &d.process_match {
            let pids = crate::agent::metrics::process::match_processes(re);
            if pids.is_empty() {
                outln!(
                    "  [warn] daemons.{}: process_match {:?} matches no running process",
                    d.name,
                    re.as_str()
                );
            } else {
                outln!(
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
            Ok(mut client) => match client.query_typed_one("SELECT version()", &[]).await {
                Ok(row) => {
                    let v: String = row.get(0);
                    outln!(
                        "  [ok]   database {} reachable ({})",
                        target.display,
                        v.split(',').next().unwrap_or(&v)
                    );
                    let findings = crate::db::usable::check(
                        &mut client,
                        &config.agent.host,
                        config.retention.is_some(),
                    )
                    .await;
                    for f in findings {
                        ok &= f.ok;
                        let word = if f.ok { "[ok]  " } else { "[fail]" };
                        outln!("  {word} {}", f.text);
                    }
                }
                Err(e) => {
                    ok = false;
                    outln!("  [fail] database {}: {e}", target.display);
                }
            },
            Err(e) => {
                ok = false;
                // A refused login is a configuration error (exit 2), not an outage.
                refused |= e.chain().any(|c| c.is::<crate::exit::UsageError>());
                outln!("  [fail] {e:#}");
            }
        },
        Err(e) => {
            ok = false;
            outln!("  [fail] database: {e:#}");
        }
    }
    if let Some(sample) = &args.sample {
        out!(
            "{}",
            super::sample::sample_file_report(&config, args.daemon.as_deref(), sample)?
        );
    }
    Ok(if refused {
        Code::Usage
    } else if ok {
        Code::Success
    } else {
        Code::Failure
    })
}
