//! `nestless-netagent`: the host agent daemon.
//!
//! Loads and checks the configuration, recovers (reconciles the state file with
//! what the VMs and the host really have, removes orphans), then serves. Run by
//! systemd as `nestless-netagent.service` (Type=notify: READY=1 is sent once
//! recovery is done and every socket listens).

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Parser;
use nestless_netagent::{agent::Agent, config::Config, links::Netlink, server};

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
        println!(
            "{}: valid ({} network(s), {} VM(s))",
            args.config.display(),
            config.networks.len(),
            config.vms.len()
        );
        return ExitCode::SUCCESS;
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
    match rt.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e:#}");
            eprintln!("nestless-netagent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let owner = nestless_netagent::links::owner_alias(&config.agent.state_dir);
    let links = Arc::new(Netlink::new(&owner).context("cannot open a netlink socket")?);
    let agent = Arc::new(Agent::new(config, links)?);
    let report = agent.recover().await.context("recovery failed")?;
    log::info!(
        "recovered: {} NIC(s) kept, {} rolled back, {} detached, {} released, {} deferred, {} orphan(s) removed",
        report.kept,
        report.rolled_back,
        report.detached,
        report.released,
        report.deferred,
        report.orphans
    );
    let running = server::serve(agent.clone()).await?;
    let upkeep = nestless_netagent::agent::spawn_upkeep(agent.clone(), Duration::from_secs(2));
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    log::info!("ready: serving {} VM(s)", agent.vms().count());

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => log::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => log::info!("SIGINT: shutting down"),
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    for t in upkeep {
        t.abort();
    }
    running.stop_accepting();
    // Let operations in flight finish, so that none is cut between steps.
    if !agent.drain(Duration::from_secs(30)).await {
        log::warn!(
            "operations still running after 30s: exiting anyway (the next start recovers them)"
        );
    }
    // NICs stay plugged: they belong to running pods. The state file has them.
    Ok(())
}
