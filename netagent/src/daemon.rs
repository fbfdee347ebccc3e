//! The daemon's life, from a checked configuration to exit:
//!
//! ```text
//! signal handlers (SIGHUP, SIGTERM, SIGINT: before anything else)
//!   ─▶ netlink ─▶ Agent (state file loaded; records that do not fit the config: refused)
//!   ─▶ recover (bridges, reconcile, sweep)
//!   ─▶ serve (every socket listens) ─▶ upkeep tasks, link-deletion watch,
//!      libvirt discovery (`libvirt_discover`) ─▶ sd_notify READY=1
//!      (SIGTERM / SIGINT before this point: start-up stopped, clean exit)
//!   ─▶ … SIGHUP ─▶ RELOADING=1 ─▶ the file read again and applied, or refused whole ─▶ READY=1
//!   ─▶ … SIGTERM / SIGINT ─▶ STOPPING=1 ─▶ stop accepting ─▶ drain (≤ 30 s) ─▶ exit
//! ```
//!
//! The configuration it is given is the effective one: the file and the
//! VMs registered at run time ([`crate::registry::with_stored_vms`]), so
//! the records of registered VMs are kept like those of the file's.
//!
//! NICs stay plugged at exit: they belong to running pods, and the state file
//! has them for the next start. `nestless-netagent` (`main.rs`) only parses
//! its arguments, sets up logging and the runtime, and calls [`run`].

use std::{sync::Arc, time::Duration};

use crate::{
    agent::{Agent, ReconcileReport},
    config::Config,
    error::AgentError,
    links::{deleted_links, owner_alias, Netlink},
    names::HOST_IF_PREFIX,
    registry::Registry,
    server::{self, ServeError, VmListeners},
    stale::StalePolicy,
};

/// How often each VM's upkeep runs.
pub const UPKEEP_PERIOD: Duration = Duration::from_secs(2);
/// How long a shutdown waits for operations in flight.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// No netlink socket.
    #[error("cannot open a netlink socket: {0}")]
    Netlink(#[source] std::io::Error),
    /// The agent could not be built (the state file, or records in it that
    /// do not fit the configuration).
    #[error(transparent)]
    Agent(AgentError),
    /// Recovery at start failed.
    #[error("recovery failed: {0}")]
    Recover(#[source] AgentError),
    /// A listener could not be set up.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// The signal handlers could not be installed.
    #[error("cannot install the signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

/// `nestless-netagent --release-stale`: the NICs of state records that
/// `config` no longer accounts for are unplugged and their records dropped
/// (with everything else a start recovers), then it returns; the agent is
/// started afterwards as usual. Refused while an agent serves the admin
/// socket: its in-flight operations would look like orphans.
///
/// # Errors
/// [`DaemonError::Serve`] ([`ServeError::InUse`]) when an agent runs, and
/// those of a start's recovery.
pub async fn release_stale(config: Config) -> Result<ReconcileReport, DaemonError> {
    let admin = &config.agent.admin_socket;
    if std::os::unix::net::UnixStream::connect(admin).is_ok() {
        return Err(ServeError::InUse(admin.clone()).into());
    }
    let owner = owner_alias(&config.agent.state_dir);
    let links = Arc::new(Netlink::new(&owner).map_err(DaemonError::Netlink)?);
    let agent = Agent::new(config, links, StalePolicy::Release).map_err(DaemonError::Agent)?;
    agent.recover().await.map_err(DaemonError::Recover)
}

/// Runs the agent for `config` until SIGTERM or SIGINT. State records that
/// do not fit `config` stop it before it serves (see [`crate::stale`] and
/// [`release_stale`]).
///
/// # Errors
/// See [`DaemonError`]; a signal is a clean exit.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    // Installed first, before any socket is bound: a signal during
    // start-up never meets the default action (which would kill the agent
    // between two steps). SIGTERM and SIGINT stop the start-up where it is
    // (like a crash there, which the next start recovers from, but with a
    // clean exit); a SIGHUP waits for the loop below, which reloads then.
    let signal = |kind| tokio::signal::unix::signal(kind).map_err(DaemonError::Signals);
    use tokio::signal::unix::SignalKind;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (agent, registry, running, upkeep) = tokio::select! {
        started = start(config) => started?,
        _ = term.recv() => {
            log::info!("SIGTERM during start-up: stopping before serving");
            return Ok(());
        }
        _ = int.recv() => {
            log::info!("SIGINT during start-up: stopping before serving");
            return Ok(());
        }
    };
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    log::info!("ready: serving {} VM(s)", agent.vms().len());

    loop {
        tokio::select! {
            _ = term.recv() => {
                log::info!("SIGTERM: shutting down");
                break;
            }
            _ = int.recv() => {
                log::info!("SIGINT: shutting down");
                break;
            }
            _ = hup.recv() => {
                log::info!("SIGHUP: reloading {}", agent.config().path.display());
                // systemd (v253 and newer) terminates a service whose
                // RELOADING=1 comes without MONOTONIC_USEC: both, or neither.
                if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading, now]);
                }
                // Refused or applied, the outcome is logged and kept by the registry.
                let _ = registry.reload().await;
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
            }
        }
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    registry.stop_upkeep();
    for t in upkeep {
        t.abort();
    }
    running.stop_accepting();
    // Let operations in flight finish, so that none is cut between steps.
    if !agent.drain(DRAIN_TIMEOUT).await {
        log::warn!(
            "operations still running after {}s: exiting anyway (the next start recovers them)",
            DRAIN_TIMEOUT.as_secs()
        );
    }
    // NICs stay plugged: they belong to running pods. The state file has them.
    Ok(())
}

/// What [`start`] leaves running: the agent, its registry, the listeners
/// and the background tasks.
type Started = (
    Arc<Agent>,
    Arc<Registry>,
    server::Running,
    Vec<tokio::task::JoinHandle<()>>,
);

/// The agent's start-up: state loaded, recovery, the listeners bound, the
/// upkeep, discovery and the link-deletion watch running.
async fn start(config: Config) -> Result<Started, DaemonError> {
    for w in &config.warnings {
        log::warn!("{w}");
    }
    let owner = owner_alias(&config.agent.state_dir);
    let links = Arc::new(Netlink::new(&owner).map_err(DaemonError::Netlink)?);
    let agent =
        Arc::new(Agent::new(config, links, StalePolicy::Refuse).map_err(DaemonError::Agent)?);
    let report = agent.recover().await.map_err(DaemonError::Recover)?;
    log::info!(
        "recovered: {} NIC(s) kept, {} rolled back, {} detached, {} released, {} deferred, {} orphan(s) removed",
        report.kept,
        report.rolled_back,
        report.detached,
        report.released,
        report.deferred,
        report.orphans
    );
    let registry = Arc::new(Registry::new(
        agent.clone(),
        Arc::new(VmListeners::new(agent.clone())),
        UPKEEP_PERIOD,
    ));
    let running = server::serve(registry.clone()).await?;
    registry.spawn_upkeep_all();
    let mut upkeep = Vec::new();
    // Domains with the nestless metadata element come and go by themselves.
    #[cfg(feature = "libvirt")]
    let settings = agent.config().agent.clone();
    #[cfg(feature = "libvirt")]
    if settings.libvirt_discover {
        log::info!(
            "discovering libvirt domains on {} every {} ms",
            settings.libvirt_uri,
            settings.libvirt_poll.as_millis()
        );
        upkeep.push(crate::discover::spawn(
            registry.clone(),
            &settings.libvirt_uri,
            settings.libvirt_poll,
        ));
    }
    // NICs whose host end someone deletes are released at once, rather
    // than at the upkeep's next presence check.
    match deleted_links(HOST_IF_PREFIX) {
        Ok(mut deleted) => {
            let agent = agent.clone();
            upkeep.push(tokio::spawn(async move {
                while let Some(name) = deleted.recv().await {
                    agent.host_link_gone(&name);
                }
            }));
        }
        Err(e) => log::warn!(
            "cannot watch link deletions ({e}): NICs removed behind the agent's back are found by the upkeep every {}s",
            UPKEEP_PERIOD.as_secs()
        ),
    }
    Ok((agent, registry, running, upkeep))
}
