//! The agent core: NIC records, leases and the per-VM backends.
//!
//! Every operation on a VM holds that VM's operation lock, so the operations
//! of one VM are serialised (slot choice, idempotency) while different VMs
//! proceed concurrently. Records change in memory, are persisted, and only
//! then do the side effects of the step happen (write-ahead, see
//! [`crate::lifecycle`]). Saves are serialised and each writes the latest
//! snapshot, so the file never goes back in time.
//!
//! ```text
//! AttachNic(sandbox)                         DetachNic(nic)
//!   lock VM                                    lock VM
//!   same sandbox attached? ─▶ return it        find the VM's record ─▶ NotFound
//!   quota, lease, MAC, id                      record Detaching, persist
//!   record Attaching, persist                  backend.unplug (idempotent)
//!   backend.plug ──fail──▶ drop record,        drop record, free lease, persist
//!   record Attached,       free lease
//!   persist, reply
//! ```

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex as StdMutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use nestless_model::MacAddr;
use tokio::sync::Mutex;

use crate::{
    backend::{netns::NetnsBackend, qemu::QemuBackend, BackendError, NicPlan, VmBackend},
    config::{BackendConfig, Config, NetworkConfig, VmConfig},
    error::AgentError,
    hostlo::{self, HostloRef, PodView, Port},
    ipam::Ipam,
    lifecycle::{self, Event, NicState, Presence, Recovery},
    links::HostLinks,
    names::{Invalid, NicId, NicNames, HOST_IF_PREFIX},
    qmp::QmpClient,
    state::{NicRecord, StateFile},
};

/// Longest sandbox id accepted.
pub const MAX_SANDBOX_ID: usize = 128;
/// Most labels on one NIC.
pub const MAX_LABELS: usize = 16;
/// Longest label key or value.
pub const MAX_LABEL_LEN: usize = 253;

/// An attach request, checked.
#[derive(Debug, Clone, Default)]
pub struct AttachRequest {
    /// The sandbox (idempotency key within the VM).
    pub sandbox_id: String,
    /// Network; `None` for the VM's own.
    pub network: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

impl AttachRequest {
    /// Checks the fields of a request.
    pub fn validate(&self) -> Result<(), AgentError> {
        check_sandbox_id(&self.sandbox_id)?;
        if let Some(n) = &self.network {
            if n.is_empty() || n.len() > 64 {
                return Err(invalid("network", "must be 1 to 64 characters"));
            }
        }
        if self.labels.len() > MAX_LABELS {
            return Err(invalid(
                "labels",
                format!("{} labels, at most {MAX_LABELS}", self.labels.len()),
            ));
        }
        for (k, v) in &self.labels {
            if k.is_empty() || k.len() > MAX_LABEL_LEN || v.len() > MAX_LABEL_LEN {
                return Err(invalid(
                    "labels",
                    format!(
                        "key {k:?}: keys 1 to {MAX_LABEL_LEN} bytes, values up to {MAX_LABEL_LEN}"
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> AgentError {
    Invalid::new(field, reason).into()
}

/// Checks a sandbox id: 1 to 128 characters of `[A-Za-z0-9_.-]`.
pub fn check_sandbox_id(id: &str) -> Result<(), AgentError> {
    if id.is_empty() || id.len() > MAX_SANDBOX_ID {
        return Err(invalid(
            "sandbox_id",
            format!("must be 1 to {MAX_SANDBOX_ID} characters"),
        ));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
    {
        return Err(invalid(
            "sandbox_id",
            format!("{id:?} has characters outside [A-Za-z0-9_.-]"),
        ));
    }
    Ok(())
}

/// Which NIC a detach names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicSelector {
    /// By NIC id.
    Id(NicId),
    /// By the sandbox it was attached for.
    Sandbox(String),
}

/// A served VM: its configuration, backend and operation lock.
pub struct Vm {
    /// Configuration.
    pub config: VmConfig,
    /// Backend.
    pub backend: Arc<dyn VmBackend>,
    op: Mutex<()>,
    seen_generation: StdMutex<u64>,
    wake: tokio::sync::Notify,
}

struct Inner {
    records: BTreeMap<NicId, NicRecord>,
    ipam: HashMap<String, Ipam>,
    /// Version of each Hostlo pod's last change (see [`Agent::hostlo_watch`]).
    pod_versions: HashMap<String, u64>,
    /// Source of versions: starts at the start time in microseconds, so that
    /// versions keep growing across restarts.
    next_version: u64,
}

/// How a new NIC is addressed and where it is plugged.
struct NewNic<'a> {
    network: &'a str,
    bridge: String,
    mtu: u32,
    /// A fixed address (Hostlo segment) instead of a lease from the network.
    fixed_ipv4: Option<std::net::Ipv4Addr>,
    /// A preferred MAC (Hostlo: stable per pod and part, so that a restarted
    /// part's neighbours need not relearn it); random when taken or absent.
    mac: Option<MacAddr>,
    sandbox_id: &'a str,
    labels: BTreeMap<String, String>,
    pooled: bool,
    hostlo: Option<HostloRef>,
}

/// The agent.
pub struct Agent {
    config: Config,
    state: StateFile,
    links: Arc<dyn HostLinks>,
    vms: BTreeMap<String, Arc<Vm>>,
    inner: StdMutex<Inner>,
    save_lock: Mutex<()>,
    started: Instant,
    hostlo_changed: tokio::sync::watch::Sender<u64>,
}

/// Result of an attach.
#[derive(Debug, Clone)]
pub struct Attached {
    /// The record.
    pub record: NicRecord,
    /// False when the sandbox already had it.
    pub created: bool,
}

/// What a reconciliation did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Records kept.
    pub kept: usize,
    /// Half-done attaches undone.
    pub rolled_back: usize,
    /// Interrupted detaches finished.
    pub detached: usize,
    /// NICs the VM lost, released.
    pub released: usize,
    /// Records left for later (VM unreachable, or cleanup failed).
    pub deferred: usize,
    /// Objects found with no record, removed.
    pub orphans: usize,
}

impl Agent {
    /// An agent with real backends (QMP clients, netlink) for `config`.
    pub fn new(config: Config, links: Arc<dyn HostLinks>) -> Result<Agent, AgentError> {
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
        Agent::with_backends(config, links, backends)
    }

    /// An agent with the given backends (tests use fakes), its records loaded
    /// from the state file.
    pub fn with_backends(
        config: Config,
        links: Arc<dyn HostLinks>,
        mut backends: HashMap<String, Arc<dyn VmBackend>>,
    ) -> Result<Agent, AgentError> {
        let state = StateFile::in_dir(&config.agent.state_dir);
        let mut inner = Inner {
            records: BTreeMap::new(),
            ipam: config
                .networks
                .values()
                .map(|n| (n.name.clone(), Ipam::new(n)))
                .collect(),
            pod_versions: HashMap::new(),
            next_version: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(1),
        };
        for rec in state.load()? {
            let known_vm = config.vm(&rec.vm).is_some();
            let leased = if rec.hostlo.is_some() {
                Some(Ok(()))
            } else {
                inner
                    .ipam
                    .get_mut(&rec.network)
                    .map(|i| i.reserve(rec.ipv4))
            };
            match (known_vm, leased) {
                (true, Some(Ok(()))) => {}
                (vm, lease) => {
                    // The configuration changed under the record. Keep it so that
                    // the reconciliation cleans it up, but say so.
                    log::warn!(
                        "state record {} (VM {}, {} on {}) does not fit the configuration (VM known: {vm}, lease: {lease:?})",
                        rec.id,
                        rec.vm,
                        rec.ipv4,
                        rec.network
                    );
                }
            }
            inner.records.insert(rec.id.clone(), rec);
        }
        let vms = config
            .vms
            .iter()
            .filter_map(|vm| {
                let backend = backends.remove(&vm.name)?;
                Some((
                    vm.name.clone(),
                    Arc::new(Vm {
                        config: vm.clone(),
                        backend,
                        op: Mutex::new(()),
                        seen_generation: StdMutex::new(0),
                        wake: tokio::sync::Notify::new(),
                    }),
                ))
            })
            .collect();
        Ok(Agent {
            config,
            state,
            links,
            vms,
            inner: StdMutex::new(inner),
            save_lock: Mutex::new(()),
            started: Instant::now(),
            hostlo_changed: tokio::sync::watch::channel(0).0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The state file.
    pub fn state_file(&self) -> &StateFile {
        &self.state
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
    pub fn vm(&self, name: &str) -> Result<&Arc<Vm>, AgentError> {
        self.vms
            .get(name)
            .ok_or_else(|| AgentError::UnknownVm(name.to_string()))
    }

    /// A network by name.
    pub fn network(&self, name: &str) -> Option<&NetworkConfig> {
        self.config.networks.get(name)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("agent state lock poisoned")
    }

    /// All records (a snapshot), optionally of one VM.
    pub fn records(&self, vm: Option<&str>) -> Vec<NicRecord> {
        self.lock()
            .records
            .values()
            .filter(|r| vm.is_none_or(|v| r.vm == v))
            .cloned()
            .collect()
    }

    async fn persist(&self) -> Result<(), AgentError> {
        let _g = self.save_lock.lock().await;
        let snapshot: Vec<NicRecord> = self.lock().records.values().cloned().collect();
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || state.save(&snapshot))
            .await
            .expect("state save task panicked")?;
        Ok(())
    }

    fn set_state(&self, id: &NicId, event: Event) -> Option<NicState> {
        let mut inner = self.lock();
        let rec = inner.records.get_mut(id)?;
        match lifecycle::transition(Some(rec.state), event) {
            Ok(Some(next)) => {
                rec.state = next;
                Some(next)
            }
            Ok(None) | Err(_) => {
                log::error!("NIC {id}: event {event:?} in state {:?} ignored", rec.state);
                None
            }
        }
    }

    fn drop_record(&self, id: &NicId) -> Option<NicRecord> {
        let mut inner = self.lock();
        let rec = inner.records.remove(id)?;
        if rec.hostlo.is_none() {
            if let Some(ipam) = inner.ipam.get_mut(&rec.network) {
                ipam.release(rec.ipv4);
            }
        }
        Some(rec)
    }

    /// Gives VM `vm` a NIC for `req.sandbox_id` (or returns the one it has).
    pub async fn attach(&self, vm: &str, req: AttachRequest) -> Result<Attached, AgentError> {
        req.validate()?;
        let vmh = self.vm(vm)?.clone();
        let network = req
            .network
            .clone()
            .unwrap_or_else(|| vmh.config.network.clone());
        if network != vmh.config.network {
            return Err(AgentError::NetworkNotAllowed {
                vm: vm.to_string(),
                network,
                allowed: vmh.config.network.clone(),
            });
        }
        let _op = vmh.op.lock().await;
        let existing = self
            .lock()
            .records
            .values()
            .find(|r| r.vm == vm && r.hostlo.is_none() && r.sandbox_id == req.sandbox_id)
            .cloned();
        if let Some(rec) = existing {
            if rec.state == NicState::Attached {
                return Ok(Attached {
                    record: rec,
                    created: false,
                });
            }
            // A failed rollback or detach left it: finish that first.
            self.remove_nic(&vmh, &rec.id).await?;
        }
        // A warm NIC: already plugged and leased, only assigned here.
        let pooled = self
            .lock()
            .records
            .values()
            .find(|r| {
                r.vm == vm
                    && r.pooled
                    && r.hostlo.is_none()
                    && r.state == NicState::Attached
                    && r.network == network
            })
            .map(|r| r.id.clone());
        if let Some(id) = pooled {
            let before = self
                .lock()
                .records
                .get(&id)
                .cloned()
                .expect("pooled record");
            {
                let mut inner = self.lock();
                let r = inner.records.get_mut(&id).expect("pooled record");
                r.pooled = false;
                r.sandbox_id = req.sandbox_id.clone();
                r.labels = req.labels.clone();
            }
            if let Err(e) = self.persist().await {
                self.lock().records.insert(id, before);
                return Err(e);
            }
            vmh.wake.notify_one();
            let record = self
                .lock()
                .records
                .get(&id)
                .cloned()
                .expect("record just written");
            log::info!(
                "VM {vm}: gave warm NIC {} ({}, {}) to sandbox {}",
                record.id,
                record.mac,
                record.ipv4,
                record.sandbox_id
            );
            return Ok(Attached {
                record,
                created: true,
            });
        }
        let record = self
            .plug_new(
                &vmh,
                self.brfusion_nic(&network, &req.sandbox_id, &req.labels, false),
            )
            .await?;
        if vmh.config.warm_pool > 0 {
            vmh.wake.notify_one();
        }
        log::info!(
            "VM {vm}: attached NIC {} ({}, {}) for sandbox {}{}",
            record.id,
            record.mac,
            record.ipv4,
            record.sandbox_id,
            record
                .slot
                .as_deref()
                .map(|s| format!(" on {s}"))
                .unwrap_or_default()
        );
        Ok(Attached {
            record,
            created: true,
        })
    }

    fn brfusion_nic<'a>(
        &self,
        network: &'a str,
        sandbox_id: &'a str,
        labels: &BTreeMap<String, String>,
        pooled: bool,
    ) -> NewNic<'a> {
        let net = self
            .network(network)
            .expect("VM networks are checked at config load");
        NewNic {
            network,
            bridge: net.bridge.clone(),
            mtu: net.mtu,
            fixed_ipv4: None,
            mac: None,
            sandbox_id,
            labels: labels.clone(),
            pooled,
            hostlo: None,
        }
    }

    /// Leases, names, records (write-ahead) and plugs a new NIC. Caller holds the VM lock.
    async fn plug_new(&self, vmh: &Vm, new: NewNic<'_>) -> Result<NicRecord, AgentError> {
        let vm = vmh.config.name.as_str();
        let network = new.network;
        let record = {
            let mut inner = self.lock();
            let count = inner.records.values().filter(|r| r.vm == vm).count() as u32;
            if count >= vmh.config.max_nics {
                return Err(AgentError::QuotaExceeded {
                    vm: vm.to_string(),
                    quota: vmh.config.max_nics,
                });
            }
            let (ipv4, ipv6) = match new.fixed_ipv4 {
                Some(a) => (a, None),
                None => {
                    let ipam = inner
                        .ipam
                        .get_mut(network)
                        .expect("an allocator per network");
                    let ipv4 = ipam.allocate()?;
                    (ipv4, ipam.ipv6_for(ipv4))
                }
            };
            let used_macs: HashSet<MacAddr> = inner.records.values().map(|r| r.mac).collect();
            let mac = match new.mac.filter(|m| !used_macs.contains(m)) {
                Some(m) => m,
                None => loop {
                    let m = crate::names::random_mac(&self.config.agent.mac_prefix);
                    if !used_macs.contains(&m) && !m.is_multicast() {
                        break m;
                    }
                },
            };
            let id = loop {
                let id = NicId::random();
                if !inner.records.contains_key(&id) {
                    break id;
                }
            };
            let rec = NicRecord {
                id: id.clone(),
                vm: vm.to_string(),
                sandbox_id: new.sandbox_id.to_string(),
                network: network.to_string(),
                mac,
                ipv4,
                ipv6,
                state: NicState::Attaching,
                slot: None,
                labels: new.labels.clone(),
                created_unix: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0),
                hostlo: new.hostlo.clone(),
                pooled: new.pooled,
            };
            inner.records.insert(id, rec.clone());
            rec
        };
        if let Err(e) = self.persist().await {
            self.drop_record(&record.id);
            return Err(e);
        }
        let plan = NicPlan {
            id: record.id.clone(),
            mac: record.mac,
            bridge: new.bridge.clone(),
            mtu: new.mtu,
        };
        match vmh.backend.plug(&plan).await {
            Ok(plugged) => {
                {
                    let mut inner = self.lock();
                    if let Some(r) = inner.records.get_mut(&record.id) {
                        r.slot = plugged.slot;
                    }
                }
                self.set_state(&record.id, Event::Plugged);
                if let Err(e) = self.persist().await {
                    // Not durable: undo, so that a restart cannot find a NIC the caller never got.
                    if let Err(undo) = self.remove_nic(vmh, &record.id).await {
                        log::error!("NIC {}: undo after a failed save failed: {undo}", record.id);
                    }
                    return Err(e);
                }
                Ok(self
                    .lock()
                    .records
                    .get(&record.id)
                    .cloned()
                    .expect("record just written"))
            }
            Err(e) => {
                // The backend undid its own steps; forget the record.
                self.set_state(&record.id, Event::Failed);
                self.drop_record(&record.id);
                if let Err(pe) = self.persist().await {
                    log::error!("NIC {}: cannot persist the rollback: {pe}", record.id);
                }
                Err(e.into())
            }
        }
    }

    /// Tops VM `vm`'s warm pool up to its configured size, one NIC per lock
    /// hold (an attach waiting for the lock goes between two). Returns how
    /// many NICs it plugged.
    pub async fn refill_pool(&self, vm: &str) -> Result<usize, AgentError> {
        let vmh = self.vm(vm)?.clone();
        let mut plugged = 0;
        loop {
            let _op = vmh.op.lock().await;
            let (pooled, total) = {
                let inner = self.lock();
                let mine = inner.records.values().filter(|r| r.vm == vm);
                let pooled = mine.clone().filter(|r| r.pooled).count() as u32;
                (pooled, mine.count() as u32)
            };
            if pooled >= vmh.config.warm_pool || total >= vmh.config.max_nics {
                return Ok(plugged);
            }
            let rec = self
                .plug_new(
                    &vmh,
                    self.brfusion_nic(&vmh.config.network, "", &BTreeMap::new(), true),
                )
                .await?;
            log::debug!("VM {vm}: warm NIC {} ({}) plugged", rec.id, rec.mac);
            plugged += 1;
        }
    }

    /// The VM's upkeep wake-up (an attach took a warm NIC).
    pub fn wakeup(&self, vm: &str) -> Option<&tokio::sync::Notify> {
        self.vms.get(vm).map(|v| &v.wake)
    }

    fn bump(&self, pod: &str) {
        let v = {
            let mut inner = self.lock();
            inner.next_version += 1;
            let v = inner.next_version;
            inner.pod_versions.insert(pod.to_string(), v);
            v
        };
        self.hostlo_changed.send_replace(v);
    }

    fn hostlo_record(&self, pod: &str, part: u32) -> Option<NicRecord> {
        self.lock()
            .records
            .values()
            .find(|r| {
                r.hostlo
                    .as_ref()
                    .is_some_and(|h| h.pod == pod && h.part == part)
            })
            .cloned()
    }

    /// The Hostlo pods the agent knows.
    pub fn hostlo_pods(&self) -> Vec<String> {
        let mut pods: Vec<String> = self
            .lock()
            .records
            .values()
            .filter_map(|r| r.hostlo.as_ref().map(|h| h.pod.clone()))
            .collect();
        pods.sort();
        pods.dedup();
        pods
    }

    /// The pod as its parts see it; `None` when no part is in.
    pub fn hostlo_view(&self, pod: &str) -> Option<PodView> {
        let inner = self.lock();
        let mut parts = BTreeMap::new();
        let mut part0 = None;
        for r in inner.records.values() {
            if let Some(h) = r.hostlo.as_ref().filter(|h| h.pod == pod) {
                parts.insert(h.part, (r.ipv4, h.ports.clone()));
                if h.part == 0 {
                    part0 = Some((r.vm.clone(), r.sandbox_id.clone()));
                }
            }
        }
        if parts.is_empty() {
            return None;
        }
        let pod_ip = part0.and_then(|(vm, sb)| {
            inner
                .records
                .values()
                .find(|r| r.vm == vm && r.hostlo.is_none() && !r.pooled && r.sandbox_id == sb)
                .map(|r| r.ipv4)
        });
        let ports: BTreeMap<u32, Vec<Port>> =
            parts.iter().map(|(k, (_, p))| (*k, p.clone())).collect();
        Some(PodView {
            version: inner
                .pod_versions
                .get(pod)
                .copied()
                .unwrap_or(self.boot_version()),
            conflicts: hostlo::conflicts(&ports),
            parts,
            pod_ip,
            prefix_len: self.config.hostlo.subnet.prefix_len(),
        })
    }

    fn boot_version(&self) -> u64 {
        // Versions of pods loaded from the state file: the agent's start time,
        // newer than anything a previous run handed out.
        (SystemTime::now() - self.started.elapsed())
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1)
    }

    /// Puts part `part` of Hostlo pod `pod` in VM `vm`: a NIC on the pod's segment.
    pub async fn hostlo_join(
        &self,
        vm: &str,
        pod: &str,
        part: u32,
        sandbox_id: &str,
    ) -> Result<(NicRecord, PodView), AgentError> {
        hostlo::check_pod(pod)?;
        hostlo::check_part(part)?;
        check_sandbox_id(sandbox_id)?;
        let vmh = self.vm(vm)?.clone();
        let _op = vmh.op.lock().await;
        if let Some(r) = self.hostlo_record(pod, part) {
            if r.vm != vm {
                return Err(AgentError::HostloPartTaken {
                    pod: pod.to_string(),
                    part,
                    vm: r.vm,
                });
            }
            if r.state == NicState::Attached && r.sandbox_id == sandbox_id {
                let view = self.hostlo_view(pod).expect("the pod has this part");
                return Ok((r, view));
            }
            // A restarted part (new sandbox) or a half-done one: start afresh.
            self.remove_nic(&vmh, &r.id).await?;
        }
        let bridge = hostlo::segment_bridge(pod);
        {
            let inner = self.lock();
            for r in inner.records.values() {
                let Some(h) = r.hostlo.as_ref() else { continue };
                if h.pod == pod && r.network != vmh.config.network {
                    return Err(AgentError::HostloTenant {
                        pod: pod.to_string(),
                        network: r.network.clone(),
                        vm: vm.to_string(),
                        vm_network: vmh.config.network.clone(),
                    });
                }
                if h.pod != pod && hostlo::segment_bridge(&h.pod) == bridge {
                    return Err(Invalid::new(
                        "pod",
                        format!("{pod:?} and the running pod {:?} map to the same segment {bridge}: rename one", h.pod),
                    )
                    .into());
                }
            }
        }
        self.links
            .ensure_segment(&bridge, self.config.hostlo.mtu)
            .await
            .map_err(BackendError::from)?;
        let new = NewNic {
            network: &vmh.config.network,
            bridge: bridge.clone(),
            mtu: self.config.hostlo.mtu,
            fixed_ipv4: Some(hostlo::part_address(self.config.hostlo.subnet, part)),
            mac: Some(hostlo::part_mac(&self.config.agent.mac_prefix, pod, part)),
            sandbox_id,
            labels: BTreeMap::new(),
            pooled: false,
            hostlo: Some(HostloRef {
                pod: pod.to_string(),
                part,
                ports: Vec::new(),
            }),
        };
        let rec = match self.plug_new(&vmh, new).await {
            Ok(r) => r,
            Err(e) => {
                self.remove_segment_if_empty(pod).await;
                return Err(e);
            }
        };
        self.bump(pod);
        log::info!(
            "Hostlo pod {pod}: part {part} joined from VM {vm} ({} on {bridge})",
            rec.ipv4
        );
        let view = self.hostlo_view(pod).expect("the pod has this part");
        Ok((rec, view))
    }

    async fn remove_segment_if_empty(&self, pod: &str) {
        if self.hostlo_view(pod).is_some() {
            return;
        }
        let bridge = hostlo::segment_bridge(pod);
        match self.links.delete(&bridge).await {
            Ok(true) => log::info!("Hostlo pod {pod}: last part gone, segment {bridge} removed"),
            Ok(false) => {}
            Err(e) => log::warn!("Hostlo pod {pod}: cannot remove segment {bridge}: {e}"),
        }
        self.lock().pod_versions.remove(pod);
    }

    /// Takes part `part` of Hostlo pod `pod` out of VM `vm`.
    pub async fn hostlo_leave(&self, vm: &str, pod: &str, part: u32) -> Result<(), AgentError> {
        hostlo::check_pod(pod)?;
        hostlo::check_part(part)?;
        let vmh = self.vm(vm)?.clone();
        let _op = vmh.op.lock().await;
        let rec = self
            .hostlo_record(pod, part)
            .filter(|r| r.vm == vm)
            .ok_or_else(|| AgentError::NicNotFound {
                vm: vm.to_string(),
                what: format!("for part {part} of Hostlo pod {pod:?}"),
            })?;
        self.remove_nic(&vmh, &rec.id).await?;
        log::info!("Hostlo pod {pod}: part {part} left VM {vm}");
        self.bump(pod);
        self.remove_segment_if_empty(pod).await;
        Ok(())
    }

    /// Sets the ports part `part` serves; returns the conflicts it is in.
    pub async fn hostlo_publish(
        &self,
        vm: &str,
        pod: &str,
        part: u32,
        ports: &[Port],
    ) -> Result<Vec<hostlo::Conflict>, AgentError> {
        hostlo::check_pod(pod)?;
        hostlo::check_part(part)?;
        let ports = hostlo::check_ports(ports)?;
        let vmh = self.vm(vm)?.clone();
        let _op = vmh.op.lock().await;
        let rec = self
            .hostlo_record(pod, part)
            .filter(|r| r.vm == vm)
            .ok_or_else(|| AgentError::NicNotFound {
                vm: vm.to_string(),
                what: format!("for part {part} of Hostlo pod {pod:?}"),
            })?;
        let old = rec
            .hostlo
            .as_ref()
            .map(|h| h.ports.clone())
            .unwrap_or_default();
        if old != ports {
            if let Some(h) = self
                .lock()
                .records
                .get_mut(&rec.id)
                .and_then(|r| r.hostlo.as_mut())
            {
                h.ports = ports.clone();
            }
            if let Err(e) = self.persist().await {
                if let Some(h) = self
                    .lock()
                    .records
                    .get_mut(&rec.id)
                    .and_then(|r| r.hostlo.as_mut())
                {
                    h.ports = old;
                }
                return Err(e);
            }
            self.bump(pod);
        }
        let view = self.hostlo_view(pod).expect("the pod has this part");
        let mine: Vec<hostlo::Conflict> = view
            .conflicts
            .into_iter()
            .filter(|c| c.parts.contains(&part))
            .collect();
        for c in &mine {
            log::warn!(
                "Hostlo pod {pod}: port {}/{} is served by parts {:?}: not forwarded",
                c.port.port,
                c.port.proto.as_str(),
                c.parts
            );
        }
        Ok(mine)
    }

    /// The pod's view once its version passes `since` (or at `timeout`).
    /// Only a VM holding a part of the pod may watch it.
    pub async fn hostlo_watch(
        &self,
        vm: &str,
        pod: &str,
        since: u64,
        timeout: Duration,
    ) -> Result<PodView, AgentError> {
        hostlo::check_pod(pod)?;
        self.vm(vm)?;
        let holds = self
            .lock()
            .records
            .values()
            .any(|r| r.vm == vm && r.hostlo.as_ref().is_some_and(|h| h.pod == pod));
        if !holds {
            return Err(AgentError::NicNotFound {
                vm: vm.to_string(),
                what: format!("in Hostlo pod {pod:?} (join it first)"),
            });
        }
        let mut changes = self.hostlo_changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout.min(Duration::from_secs(60));
        loop {
            let view = self
                .hostlo_view(pod)
                .ok_or_else(|| AgentError::NicNotFound {
                    vm: vm.to_string(),
                    what: format!("in Hostlo pod {pod:?} (it has no part left)"),
                })?;
            if view.version > since {
                return Ok(view);
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Ok(view);
            }
        }
    }

    /// Takes back a NIC of VM `vm`.
    pub async fn detach(&self, vm: &str, which: NicSelector) -> Result<NicRecord, AgentError> {
        if let NicSelector::Sandbox(s) = &which {
            check_sandbox_id(s)?;
        }
        let vmh = self.vm(vm)?.clone();
        let _op = vmh.op.lock().await;
        let found = self
            .lock()
            .records
            .values()
            .find(|r| {
                r.vm == vm
                    && r.hostlo.is_none()
                    && match &which {
                        NicSelector::Id(id) => &r.id == id,
                        NicSelector::Sandbox(s) => &r.sandbox_id == s,
                    }
            })
            .cloned();
        let Some(rec) = found else {
            return Err(AgentError::NicNotFound {
                vm: vm.to_string(),
                what: match which {
                    NicSelector::Id(id) => format!("with id {id}"),
                    NicSelector::Sandbox(s) => format!("for sandbox {s}"),
                },
            });
        };
        self.remove_nic(&vmh, &rec.id).await?;
        log::info!(
            "VM {vm}: detached NIC {} ({}) of sandbox {}",
            rec.id,
            rec.ipv4,
            rec.sandbox_id
        );
        Ok(rec)
    }

    /// Records Detaching, unplugs, drops the record. Caller holds the VM lock.
    async fn remove_nic(&self, vmh: &Vm, id: &NicId) -> Result<(), AgentError> {
        if self.set_state(id, Event::Detach).is_some() {
            self.persist().await?;
        }
        vmh.backend.unplug(id).await?;
        self.set_state(id, Event::Unplugged);
        self.drop_record(id);
        self.persist().await
    }

    /// Brings VM `vm`'s records in line with what its backend has.
    pub async fn reconcile_vm(&self, vm: &str) -> Result<ReconcileReport, AgentError> {
        let vmh = self.vm(vm)?.clone();
        let _op = vmh.op.lock().await;
        let mut report = ReconcileReport::default();
        let generation = match vmh.backend.probe().await {
            Ok(g) => Some(g),
            Err(e) => {
                log::warn!("VM {vm}: not reachable, reconciliation deferred: {e}");
                None
            }
        };
        let records = self.records(Some(vm));
        let ids: Vec<NicId> = records.iter().map(|r| r.id.clone()).collect();
        let presence = if generation.is_some() {
            vmh.backend.presence(&ids).await
        } else {
            ids.iter().map(|i| (i.clone(), Presence::Unknown)).collect()
        };
        for rec in &records {
            let p = presence.get(&rec.id).copied().unwrap_or(Presence::Unknown);
            let action = lifecycle::recovery(rec.state, p);
            match action {
                Recovery::Keep => {
                    report.kept += 1;
                    continue;
                }
                Recovery::Defer => {
                    report.deferred += 1;
                    continue;
                }
                _ => {}
            }
            match self.remove_nic(&vmh, &rec.id).await {
                Ok(()) => {
                    log::info!(
                        "VM {vm}: NIC {} ({:?}, {}) cleaned up: {action:?}",
                        rec.id,
                        rec.state,
                        rec.ipv4
                    );
                    if let Some(h) = &rec.hostlo {
                        self.bump(&h.pod);
                        self.remove_segment_if_empty(&h.pod).await;
                    }
                    match action {
                        Recovery::RollBack => report.rolled_back += 1,
                        Recovery::FinishDetach => report.detached += 1,
                        _ => report.released += 1,
                    }
                }
                Err(e) => {
                    log::warn!("VM {vm}: cleanup of NIC {} deferred: {e}", rec.id);
                    report.deferred += 1;
                }
            }
        }
        if generation.is_some() {
            let known: Vec<NicId> = self.lock().records.keys().cloned().collect();
            match vmh.backend.orphans(&known).await {
                Ok(orphans) => {
                    for id in orphans {
                        match vmh.backend.unplug(&id).await {
                            Ok(()) => {
                                log::info!("VM {vm}: removed orphaned NIC objects of {id}");
                                report.orphans += 1;
                            }
                            Err(e) => log::warn!("VM {vm}: cannot remove orphaned NIC {id}: {e}"),
                        }
                    }
                }
                Err(e) => log::warn!("VM {vm}: cannot list orphans: {e}"),
            }
        }
        if let Some(g) = generation {
            *vmh.seen_generation.lock().expect("generation lock") = g;
        }
        Ok(report)
    }

    /// Deletes host links the agent made that no record accounts for.
    /// Call only when no operation is in flight (at start).
    pub async fn sweep_host_links(&self) -> Result<usize, AgentError> {
        let names = self
            .links
            .list_owned(HOST_IF_PREFIX)
            .await
            .map_err(BackendError::from)?;
        let known: HashSet<NicId> = self.lock().records.keys().cloned().collect();
        let mut removed = 0;
        for name in names {
            match NicNames::id_from_name(&name) {
                Some(id) if known.contains(&id) => {}
                _ => {
                    if self.links.delete(&name).await.map_err(BackendError::from)? {
                        log::info!("removed orphaned host interface {name}");
                        removed += 1;
                    }
                }
            }
        }
        Ok(removed)
    }

    /// Everything the agent does at start before serving: bridges, then
    /// every VM reconciled, then the host links swept.
    pub async fn recover(&self) -> Result<ReconcileReport, AgentError> {
        for net in self.config.networks.values() {
            if net.manage_bridge {
                self.links
                    .ensure_bridge(
                        &net.bridge,
                        Some((net.gateway.into(), net.subnet.prefix_len())),
                        net.mtu,
                    )
                    .await
                    .map_err(BackendError::from)?;
            } else if !self
                .links
                .exists(&net.bridge)
                .await
                .map_err(BackendError::from)?
            {
                log::warn!(
                    "network {}: bridge {} does not exist (yet); attaches will fail until it does",
                    net.name,
                    net.bridge
                );
            }
        }
        let mut total = ReconcileReport::default();
        for name in self.vms.keys() {
            let r = self.reconcile_vm(name).await?;
            total.kept += r.kept;
            total.rolled_back += r.rolled_back;
            total.detached += r.detached;
            total.released += r.released;
            total.deferred += r.deferred;
            total.orphans += r.orphans;
        }
        // Records of VMs no longer configured: nothing can unplug them; drop
        // them (their host links go with the sweep below).
        let stale: Vec<NicId> = self
            .lock()
            .records
            .values()
            .filter(|r| !self.vms.contains_key(&r.vm))
            .map(|r| r.id.clone())
            .collect();
        for id in &stale {
            if let Some(r) = self.drop_record(id) {
                log::warn!(
                    "dropped NIC {} of VM {} which is no longer configured",
                    r.id,
                    r.vm
                );
                total.released += 1;
            }
        }
        if !stale.is_empty() {
            self.persist().await?;
        }
        total.orphans += self.sweep_host_links().await?;
        // Segments of Hostlo pods that no part holds any more.
        let live: HashSet<String> = self
            .hostlo_pods()
            .iter()
            .map(|p| hostlo::segment_bridge(p))
            .collect();
        for name in self
            .links
            .list_owned(hostlo::SEGMENT_PREFIX)
            .await
            .map_err(BackendError::from)?
        {
            if !live.contains(&name)
                && self.links.delete(&name).await.map_err(BackendError::from)?
            {
                log::info!("removed orphaned Hostlo segment {name}");
                total.orphans += 1;
            }
        }
        Ok(total)
    }

    /// One round of the background upkeep of VM `vm`: if its backend was
    /// reconnected (QEMU restarted) or a cleanup is pending, reconcile.
    pub async fn tend_vm(&self, vm: &str) -> Result<Option<ReconcileReport>, AgentError> {
        let vmh = self.vm(vm)?.clone();
        let pending = self
            .lock()
            .records
            .values()
            .any(|r| r.vm == vm && r.state != NicState::Attached);
        let generation = match vmh.backend.probe().await {
            Ok(g) => g,
            Err(_) => return Ok(None),
        };
        let seen = *vmh.seen_generation.lock().expect("generation lock");
        let report = if generation != seen || pending {
            if generation != seen && seen != 0 {
                log::info!(
                    "VM {vm}: backend reconnected (generation {seen} -> {generation}), reconciling"
                );
            }
            Some(self.reconcile_vm(vm).await?)
        } else {
            None
        };
        if vmh.config.warm_pool > 0 {
            if let Err(e) = self.refill_pool(vm).await {
                log::warn!("VM {vm}: cannot refill the warm pool: {e}");
            }
        }
        Ok(report)
    }

    /// Waits until no VM operation is in flight (each VM's lock is taken and
    /// held: nothing new starts). False when `timeout` passed first.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let all = async {
            let mut guards = Vec::new();
            for vm in self.vms.values() {
                guards.push(vm.op.lock().await);
            }
            std::mem::forget(guards);
        };
        tokio::time::timeout(timeout, all).await.is_ok()
    }

    /// Number of NICs VM `vm` has.
    pub fn nic_count(&self, vm: &str) -> usize {
        self.lock().records.values().filter(|r| r.vm == vm).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{backend::fake::FakeQemu, links::fake::FakeLinks};
    use std::path::Path;

    fn config(dir: &Path, range_end: &str) -> Config {
        Config::parse(
            Path::new("t.toml"),
            &format!(
                r#"
                [agent]
                state_dir = "{}"
                unplug_timeout_ms = 200
                [[network]]
                name = "n"
                bridge = "br0"
                subnet = "10.9.0.0/24"
                gateway = "10.9.0.1"
                range_end = "{range_end}"
                [[vm]]
                name = "vm1"
                backend = "qemu"
                qmp_socket = "/q1"
                cid = 3
                max_nics = 3
                [[vm]]
                name = "vm2"
                backend = "qemu"
                qmp_socket = "/q2"
                cid = 4
                "#,
                dir.display()
            ),
        )
        .unwrap()
    }

    struct Rig {
        agent: Agent,
        q1: Arc<FakeQemu>,
        q2: Arc<FakeQemu>,
        links: Arc<FakeLinks>,
    }

    fn rig(dir: &Path, range_end: &str) -> Rig {
        let links = Arc::new(FakeLinks::default());
        let q1 = Arc::new(FakeQemu::new(4));
        let q2 = Arc::new(FakeQemu::new(4));
        rig_with(dir, range_end, links, q1, q2)
    }

    fn rig_with(
        dir: &Path,
        range_end: &str,
        links: Arc<FakeLinks>,
        q1: Arc<FakeQemu>,
        q2: Arc<FakeQemu>,
    ) -> Rig {
        let cfg = config(dir, range_end);
        let t = Duration::from_millis(200);
        let mut b: HashMap<String, Arc<dyn VmBackend>> = HashMap::new();
        b.insert(
            "vm1".into(),
            Arc::new(QemuBackend::new(
                "vm1",
                q1.clone(),
                links.clone(),
                vec![],
                t,
            )),
        );
        b.insert(
            "vm2".into(),
            Arc::new(QemuBackend::new(
                "vm2",
                q2.clone(),
                links.clone(),
                vec![],
                t,
            )),
        );
        Rig {
            agent: Agent::with_backends(cfg, links.clone(), b).unwrap(),
            q1,
            q2,
            links,
        }
    }

    fn req(sb: &str) -> AttachRequest {
        AttachRequest {
            sandbox_id: sb.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn attach_is_idempotent_per_sandbox() {
        let dir = tempfile::tempdir().unwrap();
        let r = rig(dir.path(), "10.9.0.254");
        let a = r.agent.attach("vm1", req("sb1")).await.unwrap();
        assert!(a.created);
        let b = r.agent.attach("vm1", req("sb1")).await.unwrap();
        assert!(!b.created);
        assert_eq!(a.record.id, b.record.id);
        assert_eq!(r.q1.devices.lock().unwrap().len(), 1);
        // Same sandbox id from another VM is another NIC.
        let c = r.agent.attach("vm2", req("sb1")).await.unwrap();
        assert_ne!(c.record.id, a.record.id);
        assert_ne!(c.record.ipv4, a.record.ipv4);
    }

    #[tokio::test]
    async fn bad_input_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let r = rig(dir.path(), "10.9.0.3");
        let before = r.agent.records(None);
        for (vm, rq, code) in [
            ("nope", req("sb"), ttrpc::Code::PERMISSION_DENIED),
            ("vm1", req(""), ttrpc::Code::INVALID_ARGUMENT),
            ("vm1", req("a/b"), ttrpc::Code::INVALID_ARGUMENT),
            ("vm1", req(&"x".repeat(129)), ttrpc::Code::INVALID_ARGUMENT),
            (
                "vm1",
                AttachRequest {
                    sandbox_id: "s".into(),
                    network: Some("other".into()),
                    ..Default::default()
                },
                ttrpc::Code::PERMISSION_DENIED,
            ),
        ] {
            let e = r.agent.attach(vm, rq).await.unwrap_err();
            assert_eq!(e.code(), code, "{e}");
        }
        assert_eq!(r.agent.records(None), before);
        // Subnet of two addresses (10.9.0.2, .3): the third attach fails cleanly.
        r.agent.attach("vm1", req("a")).await.unwrap();
        r.agent.attach("vm2", req("b")).await.unwrap();
        let e = r.agent.attach("vm2", req("c")).await.unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::RESOURCE_EXHAUSTED, "{e}");
        assert!(e.to_string().contains("no free address"), "{e}");
        assert_eq!(r.agent.records(None).len(), 2);
        assert_eq!(r.q2.devices.lock().unwrap().len(), 1);
        // A VM naming another's NIC: not found, nothing changes.
        let theirs = r.agent.records(Some("vm1"))[0].id.clone();
        let e = r
            .agent
            .detach("vm2", NicSelector::Id(theirs))
            .await
            .unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::NOT_FOUND);
        assert_eq!(r.q1.devices.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn quota_and_detach_free_leases() {
        let dir = tempfile::tempdir().unwrap();
        let r = rig(dir.path(), "10.9.0.254");
        for s in ["a", "b", "c"] {
            r.agent.attach("vm1", req(s)).await.unwrap();
        }
        let e = r.agent.attach("vm1", req("d")).await.unwrap_err();
        assert!(
            matches!(e, AgentError::QuotaExceeded { quota: 3, .. }),
            "{e}"
        );
        let rec = r
            .agent
            .detach("vm1", NicSelector::Sandbox("b".into()))
            .await
            .unwrap();
        assert!(!r.agent.lock().ipam["n"].is_leased(rec.ipv4));
        r.agent.attach("vm1", req("d")).await.unwrap();
        let e = r
            .agent
            .detach("vm1", NicSelector::Sandbox("b".into()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::NOT_FOUND);
    }

    #[tokio::test]
    async fn failed_plug_leaves_no_record_or_lease() {
        let dir = tempfile::tempdir().unwrap();
        let r = rig(dir.path(), "10.9.0.254");
        *r.q1.fail.lock().unwrap() = Some("device_add");
        assert!(r.agent.attach("vm1", req("a")).await.is_err());
        assert!(r.agent.records(None).is_empty());
        assert_eq!(r.agent.lock().ipam["n"].leased(), 0);
        assert!(StateFile::in_dir(dir.path()).load().unwrap().is_empty());
        assert!(r.links.links.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn restart_recovers_every_interrupted_state() {
        let dir = tempfile::tempdir().unwrap();
        let links = Arc::new(FakeLinks::default());
        let q1 = Arc::new(FakeQemu::new(4));
        let q2 = Arc::new(FakeQemu::new(4));
        let keep;
        {
            let r = rig_with(
                dir.path(),
                "10.9.0.254",
                links.clone(),
                q1.clone(),
                q2.clone(),
            );
            keep = r.agent.attach("vm1", req("keep")).await.unwrap().record;
            r.agent.attach("vm1", req("detaching")).await.unwrap();
            r.agent.attach("vm2", req("lost")).await.unwrap();
        }
        // Simulate crashes mid-way by editing the durable state: one record
        // stuck in Detaching, one in Attaching whose device was half made.
        let sf = StateFile::in_dir(dir.path());
        let mut recs = sf.load().unwrap();
        for r in recs.iter_mut() {
            if r.sandbox_id == "detaching" {
                r.state = NicState::Detaching;
            }
        }
        let half = NicRecord {
            id: "00000000ee".parse().unwrap(),
            sandbox_id: "half".into(),
            state: NicState::Attaching,
            ipv4: "10.9.0.200".parse().unwrap(),
            ..keep.clone()
        };
        recs.push(half.clone());
        sf.save(&recs).unwrap();
        q1.netdevs.lock().unwrap().insert(half.id.names().netdev);
        links.links.lock().unwrap().insert(half.id.names().host_if);
        // An orphan netdev no record knows, and VM2's QEMU lost its device (restart).
        q1.netdevs.lock().unwrap().insert("nln-00000000ff".into());
        links.links.lock().unwrap().insert("nlh00000000ff".into());
        q2.devices.lock().unwrap().clear();

        let r = rig_with(
            dir.path(),
            "10.9.0.254",
            links.clone(),
            q1.clone(),
            q2.clone(),
        );
        let report = r.agent.recover().await.unwrap();
        assert_eq!(
            report,
            ReconcileReport {
                kept: 1,
                rolled_back: 1,
                detached: 1,
                released: 1,
                deferred: 0,
                // ff's netdev (VM1's orphan sweep also removes its tap).
                orphans: 1,
            }
        );
        let left = r.agent.records(None);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].id, keep.id);
        assert_eq!(sf.load().unwrap(), left);
        assert_eq!(r.agent.lock().ipam["n"].leased(), 1);
        assert_eq!(q1.devices.lock().unwrap().len(), 1);
        assert_eq!(q1.netdevs.lock().unwrap().len(), 1);
        assert_eq!(
            links
                .links
                .lock()
                .unwrap()
                .iter()
                .cloned()
                .collect::<Vec<_>>(),
            vec![keep.id.names().host_if]
        );
    }

    #[tokio::test]
    async fn warm_pool_is_claimed_without_a_hot_plug_and_refilled() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), "10.9.0.254");
        cfg.vms[0].warm_pool = 2;
        let links = Arc::new(FakeLinks::default());
        let q1 = Arc::new(FakeQemu::new(4));
        let t = Duration::from_millis(200);
        let mut b: HashMap<String, Arc<dyn VmBackend>> = HashMap::new();
        b.insert(
            "vm1".into(),
            Arc::new(QemuBackend::new(
                "vm1",
                q1.clone(),
                links.clone(),
                vec![],
                t,
            )),
        );
        b.insert(
            "vm2".into(),
            Arc::new(QemuBackend::new(
                "vm2",
                Arc::new(FakeQemu::new(1)),
                links.clone(),
                vec![],
                t,
            )),
        );
        let agent = Agent::with_backends(cfg.clone(), links.clone(), b).unwrap();
        assert_eq!(agent.refill_pool("vm1").await.unwrap(), 2);
        assert_eq!(q1.devices.lock().unwrap().len(), 2);
        let adds = |q: &FakeQemu| {
            q.log
                .lock()
                .unwrap()
                .iter()
                .filter(|c| *c == "device_add")
                .count()
        };
        let before = adds(&q1);
        let a = agent.attach("vm1", req("sb")).await.unwrap();
        assert!(a.created && !a.record.pooled && a.record.sandbox_id == "sb");
        assert_eq!(adds(&q1), before, "a warm attach plugs nothing");
        assert_eq!(
            agent
                .records(Some("vm1"))
                .iter()
                .filter(|r| r.pooled)
                .count(),
            1
        );
        // The pool is topped up; the quota (3) caps it: 1 assigned + 2 pooled.
        assert_eq!(agent.refill_pool("vm1").await.unwrap(), 1);
        assert_eq!(agent.nic_count("vm1"), 3);
        // Pooled NICs survive a restart like any other.
        drop(agent);
        let mut b: HashMap<String, Arc<dyn VmBackend>> = HashMap::new();
        b.insert(
            "vm1".into(),
            Arc::new(QemuBackend::new(
                "vm1",
                q1.clone(),
                links.clone(),
                vec![],
                t,
            )),
        );
        let agent = Agent::with_backends(cfg, links, b).unwrap();
        let rep = agent.recover().await.unwrap();
        assert_eq!(rep.kept, 3);
        assert_eq!(
            agent
                .records(Some("vm1"))
                .iter()
                .filter(|r| r.pooled)
                .count(),
            2
        );
        let again = agent.attach("vm1", req("sb")).await.unwrap();
        assert!(!again.created && again.record.id == a.record.id);
    }

    #[tokio::test]
    async fn hostlo_pod_spans_vms_of_one_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::parse(
            Path::new("t.toml"),
            &format!(
                r#"
                [agent]
                state_dir = "{}"
                [[network]]
                name = "a"
                bridge = "bra"
                subnet = "10.9.0.0/24"
                gateway = "10.9.0.1"
                [[network]]
                name = "b"
                bridge = "brb"
                subnet = "10.10.0.0/24"
                gateway = "10.10.0.1"
                [[vm]]
                name = "vm1"
                backend = "qemu"
                qmp_socket = "/q1"
                cid = 3
                network = "a"
                [[vm]]
                name = "vm2"
                backend = "qemu"
                qmp_socket = "/q2"
                cid = 4
                network = "a"
                [[vm]]
                name = "other"
                backend = "qemu"
                qmp_socket = "/q3"
                cid = 5
                network = "b"
                "#,
                dir.path().display()
            ),
        )
        .unwrap();
        let links = Arc::new(FakeLinks::default());
        let t = Duration::from_millis(200);
        let qs: Vec<Arc<FakeQemu>> = (0..3).map(|_| Arc::new(FakeQemu::new(4))).collect();
        let mut b: HashMap<String, Arc<dyn VmBackend>> = HashMap::new();
        for (name, q) in ["vm1", "vm2", "other"].iter().zip(&qs) {
            b.insert(
                name.to_string(),
                Arc::new(QemuBackend::new(name, q.clone(), links.clone(), vec![], t)),
            );
        }
        let agent = Arc::new(Agent::with_backends(cfg.clone(), links.clone(), b).unwrap());
        // Part 0 has a BrFusion NIC: it becomes the pod IP.
        let main = agent.attach("vm1", req("sb0")).await.unwrap().record;
        let (n0, v0) = agent.hostlo_join("vm1", "web", 0, "sb0").await.unwrap();
        assert_eq!(
            n0.ipv4,
            "169.254.77.1".parse::<std::net::Ipv4Addr>().unwrap()
        );
        assert_eq!(v0.pod_ip, Some(main.ipv4));
        let bridge = hostlo::segment_bridge("web");
        assert!(links.links.lock().unwrap().contains(&bridge));
        // The same join again is the same NIC.
        assert_eq!(
            agent
                .hostlo_join("vm1", "web", 0, "sb0")
                .await
                .unwrap()
                .0
                .id,
            n0.id
        );
        // Another tenant's VM is refused; a taken part is refused.
        let e = agent.hostlo_join("other", "web", 1, "x").await.unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::PERMISSION_DENIED, "{e}");
        let e = agent.hostlo_join("vm2", "web", 0, "x").await.unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::ALREADY_EXISTS, "{e}");
        // A watcher of part 0 wakes when part 1 joins and publishes.
        let since = v0.version;
        let w = {
            let agent = agent.clone();
            tokio::spawn(async move {
                agent
                    .hostlo_watch("vm1", "web", since, Duration::from_secs(10))
                    .await
            })
        };
        let (n1, _) = agent.hostlo_join("vm2", "web", 1, "sb1").await.unwrap();
        assert_eq!(
            n1.ipv4,
            "169.254.77.2".parse::<std::net::Ipv4Addr>().unwrap()
        );
        let seen = w.await.unwrap().unwrap();
        assert!(seen.version > since && seen.parts.len() == 2);
        let tcp = |port| Port {
            port,
            proto: hostlo::Proto::Tcp,
        };
        assert!(agent
            .hostlo_publish("vm2", "web", 1, &[tcp(8080)])
            .await
            .unwrap()
            .is_empty());
        let c = agent
            .hostlo_publish("vm1", "web", 0, &[tcp(80), tcp(8080)])
            .await
            .unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].parts, vec![0, 1]);
        // Publishing, watching or leaving a part the VM does not hold: not found.
        assert_eq!(
            agent
                .hostlo_publish("vm1", "web", 1, &[])
                .await
                .unwrap_err()
                .code(),
            ttrpc::Code::NOT_FOUND
        );
        assert_eq!(
            agent
                .hostlo_watch("other", "web", 0, t)
                .await
                .unwrap_err()
                .code(),
            ttrpc::Code::NOT_FOUND
        );
        assert_eq!(
            agent
                .hostlo_leave("vm1", "web", 1)
                .await
                .unwrap_err()
                .code(),
            ttrpc::Code::NOT_FOUND
        );
        // Hostlo NICs are not BrFusion NICs: DetachNic cannot take them.
        assert_eq!(
            agent
                .detach("vm1", NicSelector::Id(n0.id.clone()))
                .await
                .unwrap_err()
                .code(),
            ttrpc::Code::NOT_FOUND
        );
        // A restart keeps the pod with its ports.
        drop(agent);
        let mut b: HashMap<String, Arc<dyn VmBackend>> = HashMap::new();
        for (name, q) in ["vm1", "vm2", "other"].iter().zip(&qs) {
            b.insert(
                name.to_string(),
                Arc::new(QemuBackend::new(name, q.clone(), links.clone(), vec![], t)),
            );
        }
        let agent = Agent::with_backends(cfg, links.clone(), b).unwrap();
        agent.recover().await.unwrap();
        let v = agent.hostlo_view("web").unwrap();
        assert_eq!(v.parts[&0].1, vec![tcp(80), tcp(8080)]);
        assert!(
            v.version > seen.version,
            "versions keep growing across restarts"
        );
        // The last part leaving removes the segment.
        agent.hostlo_leave("vm1", "web", 0).await.unwrap();
        assert!(links.links.lock().unwrap().contains(&bridge));
        agent.hostlo_leave("vm2", "web", 1).await.unwrap();
        assert!(!links.links.lock().unwrap().contains(&bridge));
        assert!(agent.hostlo_view("web").is_none());
        assert_eq!(
            agent.records(None).len(),
            1,
            "only the BrFusion NIC is left"
        );
    }

    #[tokio::test]
    async fn unreachable_vm_defers_and_stuck_unplug_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let r = rig(dir.path(), "10.9.0.254");
        let a = r.agent.attach("vm1", req("a")).await.unwrap().record;
        *r.q1.guest_releases.lock().unwrap() = false;
        let e = r
            .agent
            .detach("vm1", NicSelector::Id(a.id.clone()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::DEADLINE_EXCEEDED, "{e}");
        assert_eq!(
            r.agent.records(None)[0].state,
            NicState::Detaching,
            "lease held until the device is gone"
        );
        *r.q1.down.lock().unwrap() = true;
        assert_eq!(
            r.agent.tend_vm("vm1").await.unwrap(),
            None,
            "unreachable: nothing to do yet"
        );
        *r.q1.down.lock().unwrap() = false;
        *r.q1.guest_releases.lock().unwrap() = true;
        let rep = r.agent.tend_vm("vm1").await.unwrap().unwrap();
        assert_eq!(rep.detached, 1);
        assert!(r.agent.records(None).is_empty());
    }
}
