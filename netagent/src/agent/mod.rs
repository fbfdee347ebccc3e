//! The agent core: NIC records, leases and the per-VM backends.
//!
//! Every operation on a VM holds that VM's operation lock, so the operations
//! of one VM are serialised (slot choice, idempotency) while different VMs
//! proceed concurrently. Records change in memory, are persisted, and only
//! then do the side effects of the step happen (write-ahead, see
//! [`crate::lifecycle`]). One writer thread does every save (group commit,
//! see `records`), so saves never overlap and the file never goes back in
//! time. The server runs each mutating operation as a task of its own, so
//! a cancelled request never stops one half-way.
//!
//! ```text
//! AttachNic(scope, sandbox, interface)       DetachNic(nic | scope, sandbox[, interface])
//!   lock VM                                    lock VM
//!   same attachment? ─▶ return it              find the VM's records ─▶ NotFound
//!   quota, lease, MAC, id                      record Detaching, persist
//!   record Attaching, persist                  backend.unplug (idempotent)
//!   backend.plug ──fail──▶ drop record,        drop record, free lease, persist
//!   record Attached,       free lease
//!   persist, reply
//! ```
//!
//! The requests the agent takes are already checked (`server::convert` parses
//! them into [`AttachRequest`], [`NicSelector`], [`HostloJoin`], …); nothing
//! here checks a request field again. One job per file:
//!
//! * this file: [`Agent`] and its construction, the [`Vm`] handle (config,
//!   backend, operation lock);
//! * `records`: the record store: records, leases, named queries, persistence;
//! * `attach`: BrFusion attach and detach (write-ahead plug and unplug);
//! * `pool`: the warm pool;
//! * `hostlo`: Hostlo join, leave, publish, watch and the pod views;
//! * `recovery`: reconciliation, start-up recovery, the orphan sweep, the
//!   per-VM upkeep and the drain at shutdown.

mod attach;
mod hostlo;
mod pool;
mod records;
mod recovery;

#[cfg(test)]
mod limits_tests;
#[cfg(test)]
mod rig;
#[cfg(test)]
mod stale_tests;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicBool, AtomicU64},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::sync::{Mutex, Notify};

pub use attach::{AttachRequest, Attached, Attachment, Labels, NetworkName, NicSelector};
pub use hostlo::{HostloJoin, HostloPart, HostloPodInfo, HostloPublish, HostloWatch, MAX_WATCH};
pub use recovery::{spawn_upkeep, ReconcileReport};

use crate::{
    backend::{netns::NetnsBackend, qemu::QemuBackend, VmBackend},
    config::{BackendConfig, Config, NetworkConfig, VmConfig},
    error::AgentError,
    links::HostLinks,
    qmp::QmpClient,
    stale::StalePolicy,
    state::{NicRecord, StateFile},
};
use records::Records;

/// A served VM: its configuration, its network, its backend and its
/// operation lock.
pub struct Vm {
    /// Configuration.
    pub config: VmConfig,
    /// Backend.
    pub backend: Arc<dyn VmBackend>,
    network: NetworkConfig,
    op: Mutex<()>,
    /// The backend's connection generation at the last reconciliation.
    seen_generation: AtomicU64,
    /// Wakes the VM's upkeep task before its next tick (a warm NIC was
    /// taken, a NIC's host end was deleted).
    upkeep: Notify,
    /// The guest restarted since the last reconciliation: the NICs given
    /// to sandboxes are released by the next one.
    guest_restarted: AtomicBool,
}

impl Vm {
    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The VM's (tenant) network.
    pub fn network(&self) -> &NetworkConfig {
        &self.network
    }
}

/// The agent.
pub struct Agent {
    config: Config,
    links: Arc<dyn HostLinks>,
    vms: BTreeMap<String, Arc<Vm>>,
    records: Records,
    hostlo: hostlo::Versions,
    /// Held by whatever checks or changes the parts of a Hostlo pod.
    segments: hostlo::SegmentLocks,
    started: Instant,
}

impl Agent {
    /// An agent with real backends (QMP clients, netlink) for `config`;
    /// `stale` says what to do with state records that do not fit it.
    pub fn new(
        config: Config,
        links: Arc<dyn HostLinks>,
        stale: StalePolicy,
    ) -> Result<Agent, AgentError> {
        let mut backends: HashMap<String, Arc<dyn VmBackend>> = HashMap::new();
        for vm in &config.vms {
            let b: Arc<dyn VmBackend> = match &vm.backend {
                BackendConfig::Qemu {
                    qmp_socket,
                    hotplug_slots,
                } => Arc::new(QemuBackend::new(
                    &vm.name,
                    Arc::new(QmpClient::new(qmp_socket, config.agent.qmp_timeout)),
                    links.clone(),
                    hotplug_slots.clone(),
                    config.agent.unplug_timeout,
                )),
                BackendConfig::Netns { netns } => {
                    Arc::new(NetnsBackend::new(&vm.name, netns.clone(), links.clone()))
                }
            };
            backends.insert(vm.name.clone(), b);
        }
        Agent::build(config, links, backends, stale)
    }

    /// An agent with the given backends (tests use fakes), its records loaded
    /// from the state file; it refuses records that do not fit the
    /// configuration ([`StalePolicy::Refuse`]). A VM without a backend here
    /// is not served.
    pub fn with_backends(
        config: Config,
        links: Arc<dyn HostLinks>,
        backends: HashMap<String, Arc<dyn VmBackend>>,
    ) -> Result<Agent, AgentError> {
        Agent::build(config, links, backends, StalePolicy::Refuse)
    }

    /// [`Agent::with_backends`], with records that do not fit dealt with as
    /// `stale` says.
    pub fn build(
        config: Config,
        links: Arc<dyn HostLinks>,
        mut backends: HashMap<String, Arc<dyn VmBackend>>,
        stale: StalePolicy,
    ) -> Result<Agent, AgentError> {
        let records = Records::load(&config, stale)?;
        let mut vms = BTreeMap::new();
        for vm in &config.vms {
            let Some(backend) = backends.remove(&vm.name) else {
                continue;
            };
            let Some(network) = config.networks.get(&vm.network) else {
                // Config::parse never lets this through; a config built by hand might.
                log::error!(
                    "VM {}: network {:?} is not configured; the VM is not served",
                    vm.name,
                    vm.network
                );
                continue;
            };
            vms.insert(
                vm.name.clone(),
                Arc::new(Vm {
                    config: vm.clone(),
                    backend,
                    network: network.clone(),
                    op: Mutex::new(()),
                    seen_generation: AtomicU64::new(0),
                    upkeep: Notify::new(),
                    guest_restarted: AtomicBool::new(false),
                }),
            );
        }
        Ok(Agent {
            config,
            links,
            vms,
            records,
            hostlo: hostlo::Versions::starting_now(),
            segments: hostlo::SegmentLocks::default(),
            started: Instant::now(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The state file.
    pub fn state_file(&self) -> &StateFile {
        self.records.state_file()
    }

    /// How long the agent has run.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The served VMs.
    pub fn vms(&self) -> impl Iterator<Item = &Arc<Vm>> {
        self.vms.values()
    }

    /// A served VM by name.
    ///
    /// # Errors
    /// [`AgentError::UnknownVm`] when no VM of that name is served.
    pub fn vm(&self, name: &str) -> Result<&Arc<Vm>, AgentError> {
        self.vms
            .get(name)
            .ok_or_else(|| AgentError::UnknownVm(crate::names::Quoted(name).to_string()))
    }

    /// A network by name.
    pub fn network(&self, name: &str) -> Option<&NetworkConfig> {
        self.config.networks.get(name)
    }

    /// All records (a snapshot), optionally of one VM.
    pub fn records(&self, vm_name: Option<&str>) -> Vec<NicRecord> {
        self.records.snapshot(vm_name)
    }

    /// A page of the records of VM `vm_name` (every VM: `None`) that `keep`
    /// keeps, in id order after `after`, at most `limit`; and whether more
    /// follow.
    pub fn records_page(
        &self,
        vm_name: Option<&str>,
        after: Option<&crate::names::NicId>,
        limit: usize,
        keep: impl Fn(&NicRecord) -> bool,
    ) -> (Vec<NicRecord>, bool) {
        self.records.page(vm_name, after, limit, keep)
    }

    /// Number of NICs VM `vm_name` has.
    pub fn nic_count(&self, vm_name: &str) -> usize {
        self.records.count(vm_name)
    }
}
