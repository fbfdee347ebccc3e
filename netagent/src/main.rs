//! `nestless-netagent`: the host agent daemon.
//!
//! Parses its arguments, sets up logging, loads and checks the configuration,
//! and starts the runtime; the daemon itself (recover, serve, upkeep,
//! sd_notify, signals, drain) is [`nestless_netagent::daemon::run`]. Run by
//! systemd as `nestless-netagent.service` (Type=notify: READY=1 is sent once
//! recovery is done and every socket listens).

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use nestless_netagent::{config::Config, daemon};

#[derive(Parser)]
#[command(
    name = "nestless-netagent",
    version,
    about = "nestless host agent: hot-plugs host-provided NICs into VMs"
)]
struct Args {
    /// Configuration file.
    #[arg(long, short, default_value = nestless_netagent::config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Check the configuration and exit (0: valid, 2: invalid).
    #[arg(long)]
    check_config: bool,
    /// Before starting, drop the state records that break the state file's
    /// invariants (two NICs on one address, MAC, id or attachment),
    /// keeping the oldest of each group; the file is backed up first to
    /// state.json.bak-<unix seconds>. The way out of a start refused for
    /// such records.
    #[arg(long)]
    drop_conflicting_records: bool,
    /// Log filter (error, warn, info, debug, trace), overriding RUST_LOG.
    #[arg(long)]
    log_level: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if let Some(l) = &args.log_level {
        logger.parse_filters(l);
    }
    logger.init();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nestless-netagent: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        for w in &config.warnings {
            eprintln!("warning: {w}");
        }
        println!(
            "{}: valid ({} network(s), {} VM(s))",
            args.config.display(),
            config.networks.len(),
            config.vms.len()
        );
        return ExitCode::SUCCESS;
    }
    if args.drop_conflicting_records {
        let state = nestless_netagent::state::StateFile::in_dir(&config.agent.state_dir);
        match state.drop_conflicting() {
            Ok(dropped) => {
                for r in &dropped {
                    log::warn!(
                        "dropped conflicting state record {} (VM {}, {} on {}, MAC {}, sandbox {:?})",
                        r.id,
                        r.vm,
                        r.ipv4,
                        r.network,
                        r.mac,
                        r.sandbox_id
                    );
                }
                if dropped.is_empty() {
                    log::info!("{}: no conflicting records", state.path().display());
                }
            }
            Err(e) => {
                eprintln!("nestless-netagent: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nestless-netagent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(daemon::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("nestless-netagent: {e}");
            ExitCode::FAILURE
        }
    }
}
