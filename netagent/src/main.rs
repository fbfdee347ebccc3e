//! `nestless-netagent`: the host agent daemon.
//!
//! Parses its arguments, sets up logging, loads and checks the configuration,
//! and starts the runtime; the daemon itself (recover, serve, upkeep,
//! sd_notify, signals, drain) is [`nestless_netagent::daemon::run`]. Run by
//! systemd as `nestless-netagent.service` (Type=notify: READY=1 is sent once
//! recovery is done and every socket listens).

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use nestless_netagent::{
    config::Config,
    daemon,
    registry::{self, RegistryError},
    stale::{self, StalePolicy},
};

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
    /// Check the configuration, and the state file against it, and exit
    /// (0: valid, 2: invalid, or the state file has records that do not fit).
    #[arg(long)]
    check_config: bool,
    /// Unplug the NICs of state records that the configuration no longer
    /// accounts for (a network renamed or removed, an address outside its
    /// network's range now, ...) or that claim what an older record holds
    /// (an address, MAC, id or attachment), free their addresses, and exit.
    /// The agent refuses to start while there are any.
    #[arg(long, conflicts_with = "check_config")]
    release_stale: bool,
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
    // The file, with the VMs registered at run time (kept in the state directory).
    let config = match Config::load(&args.config)
        .map_err(RegistryError::from)
        .and_then(registry::with_stored_vms)
    {
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
        return match stale::load(&config, StalePolicy::Refuse) {
            Ok((state, sorted)) => {
                println!(
                    "{}: {} NIC record(s) fit{}",
                    state.display(),
                    sorted.fits.len(),
                    match sorted.vm_gone.len() {
                        0 => String::new(),
                        n => format!(", {n} of VMs no longer configured (dropped at start)"),
                    }
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("nestless-netagent: {e}");
                ExitCode::from(2)
            }
        };
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
    if args.release_stale {
        return match rt.block_on(daemon::release_stale(config)) {
            Ok(r) => {
                println!(
                    "released {} NIC(s) (stale records, and those of VMs no longer configured); {} orphan(s) removed, {} kept, {} deferred",
                    r.released, r.orphans, r.kept, r.deferred
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("nestless-netagent: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match rt.block_on(daemon::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("nestless-netagent: {e}");
            ExitCode::FAILURE
        }
    }
}
