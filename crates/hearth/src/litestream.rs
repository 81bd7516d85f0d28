//! Litestream compatibility: runs Litestream 0.5 command lines (parsed by `litestream_args`) with hearth's
//! own replicate and restore, using Litestream's exit codes (1 for every error, usage errors included).

use std::process::ExitCode;

use crate::litestream_args::{self, LitestreamCommand};
use crate::sqlite::{self, Failure, RestoreArgs, Source};

pub fn main(args: Vec<String>) -> ExitCode {
    crate::init_logging(None);
    let command = match litestream_args::parse(&args) {
        Ok(c) => c,
        Err(e) => {
            print!("{}", e.stdout);
            eprint!("{}", e.stderr);
            return ExitCode::from(e.exit_code);
        }
    };
    let Some(result) = crate::block_on("Error", async {
        match command {
            LitestreamCommand::Help(text) => {
                print!("{text}");
                Ok(ExitCode::SUCCESS)
            }
            LitestreamCommand::Version { .. } => {
                println!(
                    "hearth {} (litestream 0.5 compatible)",
                    env!("CARGO_PKG_VERSION")
                );
                Ok(ExitCode::SUCCESS)
            }
            LitestreamCommand::Unsupported { message, .. } => {
                Err(Failure::Runtime(anyhow::anyhow!(message)))
            }
            LitestreamCommand::Databases(a) => {
                let source = Source {
                    config: a.config,
                    no_expand_env: a.no_expand_env,
                    db_and_urls: Vec::new(),
                };
                let config = sqlite::load_config(&source)?;
                println!("path\treplicas");
                for db in &config.dbs {
                    let names: Vec<&str> = db.replicas.iter().map(|r| r.name.as_str()).collect();
                    println!("{}\t{}", db.path.display(), names.join(","));
                }
                Ok(ExitCode::SUCCESS)
            }
            LitestreamCommand::Replicate(a) => {
                if let Some(level) = &a.log_level {
                    crate::set_log_level_flag(level);
                }
                if a.force_snapshot || a.enforce_retention {
                    return Err(Failure::Runtime(anyhow::anyhow!(
                        "-force-snapshot and -enforce-retention are not supported by hearth; hearth snapshots and enforces retention on its own schedule"
                    )));
                }
                let source = Source {
                    config: a.config,
                    no_expand_env: a.no_expand_env,
                    db_and_urls: a.db_and_urls,
                };
                let exec = a.exec.map(|e| sqlite_shell_words(&e));
                sqlite::replicate_cmd(&source, false, exec, a.once).await
            }
            LitestreamCommand::Restore(a) => {
                let args = RestoreArgs {
                    config: a.config.clone(),
                    no_expand_env: a.no_expand_env,
                    output: a.output.clone(),
                    txid: a.txid,
                    timestamp: a.timestamp_time(),
                    if_db_not_exists: a.if_db_not_exists,
                    if_replica_exists: a.if_replica_exists,
                    parallelism: a.parallelism.unwrap_or(8),
                    dry_run: a.dry_run,
                    target: a.target.clone(),
                };
                sqlite::restore_cmd(&args).await
            }
        }
    }) else {
        return ExitCode::FAILURE;
    };
    // Litestream exits 1 for every error, including bad configuration.
    match result {
        Ok(code) => code,
        Err(Failure::Usage(e)) | Err(Failure::Runtime(e)) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn sqlite_shell_words(s: &str) -> Vec<String> {
    sqlite::shell_words(s)
}
