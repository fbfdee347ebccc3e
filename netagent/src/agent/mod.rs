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
//! The served VMs and the effective configuration change while the agent
//! runs ([`crate::registry`]): each is behind a lock never held across an
//! await, and an operation works on its own `Arc` of its [`Vm`]. A VM taken
//! out ([`Agent::remove_vm`]) is marked retired under its operation lock:
//! an operation that was waiting for that lock refuses.
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
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Arc, RwLock, RwLockReadGuard,
    },
    time::{Duration, Instant},
};

use tokio::sync::{Mutex, Notify};

pub use attach::{AttachRequest, Attached, Attachment, Labels, NetworkName, NicSelector};
pub use hostlo::{HostloJoin, HostloPart, HostloPodInfo, HostloPublish, HostloWatch, MAX_WATCH};
pub use recovery::{spawn_upkeep, spawn_vm_upkeep, ReconcileReport};

use crate::{
    backend::{netns::NetnsBackend, qemu::QemuBackend, VmBackend},
    config::{BackendConfig, Config, NetworkConfig, VmConfig},
    error::AgentError,
    links::HostLinks,
    qmp::QmpClient,
    stale::StalePolicy,
    state::NicRecord,
};
use records::Records;

/// The real backend of `vm`: a QMP client, a namespace, or a libvirt domain.
fn real_backend(config: &Config, vm: &VmConfig, links: &Arc<dyn HostLinks>) -> Arc<dyn VmBackend> {
    match &vm.backend {
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
        #[cfg(feature = "libvirt")]
        BackendConfig::Libvirt {
            uri,
            domain,
            persist_nics,
        } => Arc::new(crate::backend::libvirt::LibvirtBackend::new(
            &vm.name,
            uri,
            domain,
            *persist_nics,
            links.clone(),
            config.agent.unplug_timeout,
        )),
        // The configuration refuses it in such a build; a VM made by hand
        // gets a backend that says why it cannot work.
        #[cfg(not(feature = "libvirt"))]
        BackendConfig::Libvirt { .. } => Arc::new(crate::backend::Unsupported {
            vm: vm.name.clone(),
            kind: "libvirt",
        }),
    }
}

/// A served VM: its configuration, its network, its backend and its
/// operation lock.
pub struct Vm {
    /// Configuration. Its `max_nics` and `warm_pool` are those the VM was
    /// served with first: an update changes them live, read them with
    /// [`Vm::max_nics`] and [`Vm::warm_pool`] (or [`Vm::live_config`]).
    pub config: VmConfig,
    max_nics: AtomicU32,
    warm_pool: AtomicU32,
    /// No longer served (unregistered, or removed from the file): an
    /// operation that took its lock after that refuses.
    retired: AtomicBool,
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

    /// Its NIC quota now.
    pub fn max_nics(&self) -> u32 {
        self.max_nics.load(Ordering::Acquire)
    }

    /// Its warm pool size now.
    pub fn warm_pool(&self) -> u32 {
        self.warm_pool.load(Ordering::Acquire)
    }

    /// Changes the quota and warm pool live (a smaller quota does not take
    /// NICs away: it refuses new ones until the VM is under it).
    pub fn set_quota(&self, max_nics: u32, warm_pool: u32) {
        self.max_nics.store(max_nics, Ordering::Release);
        self.warm_pool.store(warm_pool, Ordering::Release);
        self.upkeep.notify_one();
    }

    /// The configuration with the quota and warm pool of now.
    pub fn live_config(&self) -> VmConfig {
        VmConfig {
            max_nics: self.max_nics(),
            warm_pool: self.warm_pool(),
            ..self.config.clone()
        }
    }

    /// Whether the VM is no longer served.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Refuses an operation on a VM no longer served; call with its lock held.
    fn check_live(&self) -> Result<(), AgentError> {
        if self.is_retired() {
            return Err(AgentError::UnknownVm(format!(
                "{} (no longer served)",
                self.config.name
            )));
        }
        Ok(())
    }

    fn new(config: VmConfig, backend: Arc<dyn VmBackend>, network: NetworkConfig) -> Vm {
        Vm {
            max_nics: AtomicU32::new(config.max_nics),
            warm_pool: AtomicU32::new(config.warm_pool),
            retired: AtomicBool::new(false),
            config,
            backend,
            network,
            op: Mutex::new(()),
            seen_generation: AtomicU64::new(0),
            upkeep: Notify::new(),
            guest_restarted: AtomicBool::new(false),
        }
    }
}

/// The agent.
pub struct Agent {
    /// The effective configuration (file and registered VMs); replaced
    /// whole when VMs are registered or the file is reloaded.
    config: RwLock<Arc<Config>>,
    links: Arc<dyn HostLinks>,
    /// The served VMs. Never held across an await.
    vms: RwLock<BTreeMap<String, Arc<Vm>>>,
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
        let backends: HashMap<String, Arc<dyn VmBackend>> = config
            .vms
            .iter()
            .map(|vm| (vm.name.clone(), real_backend(&config, vm, &links)))
            .collect();
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
                Arc::new(Vm::new(vm.clone(), backend, network.clone())),
            );
        }
        Ok(Agent {
            config: RwLock::new(Arc::new(config)),
            links,
            vms: RwLock::new(vms),
            records,
            hostlo: hostlo::Versions::starting_now(),
            segments: hostlo::SegmentLocks::default(),
            started: Instant::now(),
        })
    }

    /// The effective configuration (a snapshot).
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the effective configuration (VMs registered or removed, the
    /// file reloaded). The served VMs change with [`Agent::add_vm`] and
    /// [`Agent::remove_vm`].
    pub fn set_config(&self, config: Config) {
        *self
            .config
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(config);
    }

    fn vms_read(&self) -> RwLockReadGuard<'_, BTreeMap<String, Arc<Vm>>> {
        self.vms
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts serving VM `vm` (of the effective configuration) with a real
    /// backend; its records (kept from before) are reconciled by the
    /// caller ([`Agent::reconcile_vm`]). Replaces nothing: `None` when a VM
    /// of that name is served already or its network is unknown.
    pub fn add_vm(&self, vm: &VmConfig) -> Option<Arc<Vm>> {
        let config = self.config();
        let network = config.networks.get(&vm.network)?.clone();
        let backend = real_backend(&config, vm, &self.links);
        self.add_vm_with(vm, backend, network)
    }

    /// [`Agent::add_vm`] with the given backend (tests use fakes).
    pub fn add_vm_with(
        &self,
        vm: &VmConfig,
        backend: Arc<dyn VmBackend>,
        network: NetworkConfig,
    ) -> Option<Arc<Vm>> {
        let mut vms = self
            .vms
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if vms.contains_key(&vm.name) {
            return None;
        }
        let served = Arc::new(Vm::new(vm.clone(), backend, network));
        vms.insert(vm.name.clone(), served.clone());
        Some(served)
    }

    /// Stops serving VM `name`: it is taken out of the served set under its
    /// operation lock and marked retired, so an operation that waited for
    /// the lock refuses. While it has NICs: refused
    /// ([`AgentError::VmHasNics`]), or with `force` they are released first
    /// ([`Agent::release_nics_locked`]) within the same hold of the lock,
    /// so no attach slips in between. Returns how many were released.
    ///
    /// # Errors
    /// [`AgentError::UnknownVm`], [`AgentError::VmHasNics`], or a NIC's
    /// cleanup (the VM then stays served, with the NICs not released).
    pub async fn remove_vm(&self, name: &str, force: bool) -> Result<usize, AgentError> {
        let vm = self.vm(name)?;
        let _op = vm.op.lock().await;
        let count = self.records.count(name);
        if count > 0 && !force {
            return Err(AgentError::VmHasNics {
                vm: name.to_string(),
                count,
            });
        }
        let released = self.release_nics_locked(&vm).await?;
        vm.retired.store(true, Ordering::Release);
        self.vms
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name);
        Ok(released)
    }

    /// Where the state store lives.
    pub fn state_path(&self) -> &std::path::Path {
        self.records.state_path()
    }

    /// How long the agent has run.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The served VMs (a snapshot).
    pub fn vms(&self) -> Vec<Arc<Vm>> {
        self.vms_read().values().cloned().collect()
    }

    /// Whether VM `name` is served.
    pub fn serves(&self, name: &str) -> bool {
        self.vms_read().contains_key(name)
    }

    /// A served VM by name.
    ///
    /// # Errors
    /// [`AgentError::UnknownVm`] when no VM of that name is served.
    pub fn vm(&self, name: &str) -> Result<Arc<Vm>, AgentError> {
        self.vms_read()
            .get(name)
            .cloned()
            .ok_or_else(|| AgentError::UnknownVm(crate::names::Quoted(name).to_string()))
    }

    /// A network by name.
    pub fn network(&self, name: &str) -> Option<NetworkConfig> {
        self.config().networks.get(name).cloned()
    }

    /// Forgets the allocator of network `name` (it changed, with no lease
    /// on it): the next lease starts one for its new settings.
    pub fn forget_network(&self, name: &str) {
        self.records.forget_network(name);
    }

    /// Number of NICs on network `name`.
    pub fn network_nic_count(&self, name: &str) -> usize {
        self.records
            .snapshot(None)
            .iter()
            .filter(|r| r.network == name)
            .count()
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
