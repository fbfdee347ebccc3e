//! VMs that come and go while the agent runs: registered ones (the Admin
//! service's `RegisterVm`, `UpdateVm`, `UnregisterVm`; `nestlessctl vm
//! add|set|rm`) and those of the configuration file reloaded on `SIGHUP`.
//!
//! The `[[vm]]` entries of the file are a static seed; registered VMs are
//! kept in `<state_dir>/vms.json` ([`VmStore`]) and checked with the file's
//! entries each time the effective configuration is built
//! ([`Config::with_registered`]): the same rules, a registered VM named as
//! `registered vm ("name")` in errors. Each change is checked whole first,
//! then made durable, then served:
//!
//! ```text
//! RegisterVm(spec)   lock ─▶ check file + registered + spec ─▶ vms.json ─▶ serve
//!                           (add VM, reconcile, socket, upkeep) ─▶ generation + 1
//! UnregisterVm(name) lock ─▶ NICs? refuse | force: release ─▶ stop serving
//!                           (socket removed, upkeep stopped) ─▶ vms.json ─▶ generation + 1
//! SIGHUP             lock ─▶ read + check file (with the registered VMs) ─▶ plan
//!                           (refused whole: nothing changes, last error kept) ─▶ apply
//! ```
//!
//! One change at a time (a lock); NIC operations go on meanwhile under each
//! VM's own lock.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::task::JoinHandle;

use crate::{
    agent::{spawn_vm_upkeep, Agent},
    config::{Config, ConfigError, NetworkConfig, VmConfig, VmSpec},
    error::AgentError,
    server::{ServeError, VmListeners},
};

/// Name of the registered VMs' store in the state directory.
pub const VMS_FILE: &str = "vms.json";

/// The registered VMs' store cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum VmStoreError {
    /// An I/O step failed.
    #[error("cannot {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not what the agent writes.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The JSON parser's account.
        message: String,
    },
}

/// `vms.json`: the registered VMs, rewritten whole at each change (VMs
/// change rarely) the way the state file is: a temporary file, fsynced,
/// renamed over it, the directory fsynced.
#[derive(Debug, Clone)]
pub struct VmStore {
    path: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    version: u32,
    vms: Vec<VmSpec>,
}

impl VmStore {
    /// The store of state directory `state_dir`.
    pub fn new(state_dir: &Path) -> VmStore {
        VmStore {
            path: state_dir.join(VMS_FILE),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> VmStoreError + '_ {
        move |source| VmStoreError::Io {
            what,
            path: self.path.clone(),
            source,
        }
    }

    /// The registered VMs; none when the file does not exist.
    ///
    /// # Errors
    /// [`VmStoreError`] when it cannot be read or parsed.
    pub fn load(&self) -> Result<Vec<VmSpec>, VmStoreError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io("read")(e)),
        };
        let file: StoreFile = serde_json::from_str(&text).map_err(|e| VmStoreError::Parse {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        if file.version != 1 {
            return Err(VmStoreError::Parse {
                path: self.path.clone(),
                message: format!("version {} is not 1", file.version),
            });
        }
        Ok(file.vms)
    }

    /// Replaces the registered VMs, atomically and durably.
    ///
    /// # Errors
    /// [`VmStoreError::Io`].
    pub fn save(&self, vms: &[VmSpec]) -> Result<(), VmStoreError> {
        let dir = self.path.parent().unwrap_or_else(|| Path::new("/"));
        fs::create_dir_all(dir).map_err(self.io("create the directory of"))?;
        let text = serde_json::to_vec_pretty(&StoreFile {
            version: 1,
            vms: vms.to_vec(),
        })
        .map_err(|e| self.io("encode")(std::io::Error::other(e)))?;
        crate::state::json::write_atomic(&self.path, &text).map_err(|(op, e)| self.io(op)(e))
    }
}

/// `config` (the file) with the VMs registered in its state directory: the
/// effective configuration an agent starts with.
///
/// # Errors
/// [`RegistryError::Store`], or [`RegistryError::Config`] when a registered
/// VM no longer fits the file (e.g. a `[[vm]]` of the file took its name:
/// both are named).
pub fn with_stored_vms(config: Config) -> Result<Config, RegistryError> {
    let store = VmStore::new(&config.agent.state_dir);
    let vms = store.load()?;
    Ok(config.with_registered(store.path(), &vms)?)
}

/// Why a change of the served VMs was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The change does not pass the configuration's checks.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No registered VM has that name.
    #[error("no registered VM is named {0:?}")]
    NotFound(String),
    /// A VM of that name is registered or configured already.
    #[error("VM {0:?} exists already")]
    Exists(String),
    /// The VM is a `[[vm]]` of the file, which only a reload changes.
    #[error("VM {name:?} is a [[vm]] of {path}: change it there and reload (SIGHUP)")]
    FileVm {
        /// The VM.
        name: String,
        /// The file.
        path: PathBuf,
    },
    /// Fields that need the VM's serving restarted changed while it has NICs.
    #[error("VM {vm:?} has {count} NIC(s): only max_nics and warm_pool change while it has NICs (changed: {fields})")]
    Busy {
        /// The VM.
        vm: String,
        /// Its NICs.
        count: usize,
        /// The fields that changed.
        fields: String,
    },
    /// The store could not be written.
    #[error(transparent)]
    Store(#[from] VmStoreError),
    /// The agent refused (e.g. the VM has NICs).
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The VM's socket could not be served.
    #[error(transparent)]
    Serve(#[from] ServeError),
}

impl RegistryError {
    /// The ttrpc status code.
    pub fn code(&self) -> ttrpc::Code {
        use ttrpc::Code;
        match self {
            RegistryError::Config(_) => Code::INVALID_ARGUMENT,
            RegistryError::NotFound(_) => Code::NOT_FOUND,
            RegistryError::Exists(_) => Code::ALREADY_EXISTS,
            RegistryError::FileVm { .. } | RegistryError::Busy { .. } => Code::FAILED_PRECONDITION,
            RegistryError::Store(_) | RegistryError::Serve(_) => Code::INTERNAL,
            RegistryError::Agent(e) => e.code(),
        }
    }
}

impl From<RegistryError> for ttrpc::Error {
    fn from(e: RegistryError) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

/// What a reload changes, decided before anything is: [`plan_reload`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadPlan {
    /// VMs no longer served (removed from the file).
    pub remove: Vec<String>,
    /// VMs whose serving restarts (a field other than the quota changed,
    /// or their network did); none has NICs.
    pub restart: Vec<String>,
    /// VMs newly served.
    pub add: Vec<String>,
    /// VMs whose quota or warm pool changes live.
    pub quota: Vec<String>,
    /// Networks added or changed (their bridges are made or looked for;
    /// none has NICs when changed).
    pub networks: Vec<String>,
}

impl ReloadPlan {
    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        *self == ReloadPlan::default()
    }
}

/// The fields of `a` and `b` (one VM) that need its serving restarted to
/// change: all but `max_nics` and `warm_pool`.
pub fn restart_fields(a: &VmConfig, b: &VmConfig) -> Vec<&'static str> {
    let mut f = Vec::new();
    if a.backend != b.backend {
        f.push(match b.backend {
            crate::config::BackendConfig::Qemu { .. } => "qmp_socket",
            crate::config::BackendConfig::Netns { .. } => "netns",
            crate::config::BackendConfig::Libvirt { .. } => "domain",
        });
    }
    if a.network != b.network {
        f.push("network");
    }
    if a.cid != b.cid {
        f.push("cid");
    }
    if a.unix_socket != b.unix_socket {
        f.push("socket");
    }
    f
}

/// The first field of network `a` that `b` changes, or `None`.
fn network_change(a: &NetworkConfig, b: &NetworkConfig) -> Option<&'static str> {
    [
        ("bridge", a.bridge != b.bridge),
        ("subnet", a.subnet != b.subnet),
        ("gateway", a.gateway != b.gateway),
        ("range_start", a.range.0 != b.range.0),
        ("range_end", a.range.1 != b.range.1),
        ("mtu", a.mtu != b.mtu),
        ("manage_bridge", a.manage_bridge != b.manage_bridge),
        ("subnet6", a.subnet6 != b.subnet6),
        ("gateway6", a.gateway6 != b.gateway6),
        ("routes", a.routes != b.routes),
    ]
    .into_iter()
    .find_map(|(k, changed)| changed.then_some(k))
}

/// What reloading from `old` to `new` (both effective configurations, the
/// file's VMs and the registered ones) changes, given how many NICs each
/// VM (`vm_nics`) and network (`net_nics`) has; or why it cannot be
/// applied, naming the file and key: a setting of `[agent]` or `[hostlo]`
/// changed (they take effect at a restart), a network removed, renamed or
/// changed while NICs use it, a VM removed while it has NICs, or changed
/// beyond its quota while it has NICs.
///
/// # Errors
/// [`ConfigError::Invalid`] naming `new.path` (or `old.path` for what was
/// removed) and the key.
pub fn plan_reload(
    old: &Config,
    new: &Config,
    vm_nics: impl Fn(&str) -> usize,
    net_nics: impl Fn(&str) -> usize,
) -> Result<ReloadPlan, ConfigError> {
    let refuse = |path: &Path, key: String, message: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        key,
        message,
    };
    let restart_only = "takes effect only at a restart of the agent: reload refused";
    let (a, b) = (&old.agent, &new.agent);
    for (key, changed) in [
        ("agent.state_dir", a.state_dir != b.state_dir),
        ("agent.admin_socket", a.admin_socket != b.admin_socket),
        ("agent.vsock_port", a.vsock_port != b.vsock_port),
        ("agent.listen_vsock", a.listen_vsock != b.listen_vsock),
        ("agent.mac_prefix", a.mac_prefix != b.mac_prefix),
        ("agent.qmp_timeout_ms", a.qmp_timeout != b.qmp_timeout),
        (
            "agent.unplug_timeout_ms",
            a.unplug_timeout != b.unplug_timeout,
        ),
        ("hostlo.subnet", old.hostlo.subnet != new.hostlo.subnet),
        ("hostlo.mtu", old.hostlo.mtu != new.hostlo.mtu),
    ] {
        if changed {
            return Err(refuse(&new.path, key.into(), restart_only.into()));
        }
    }
    let mut plan = ReloadPlan::default();
    let mut changed_nets = Vec::new();
    for (name, net) in &old.networks {
        let nics = net_nics(name);
        match new.networks.get(name) {
            None if nics > 0 => {
                return Err(refuse(
                    &old.path,
                    old.network_key(name),
                    format!("removed (or renamed) while {nics} NIC(s) use it: reload refused"),
                ))
            }
            None => {}
            Some(n) => {
                if let Some(field) = network_change(net, n) {
                    if nics > 0 {
                        return Err(refuse(
                            &new.path,
                            format!("{}.{field}", new.network_key(name)),
                            format!(
                                "changed while {nics} NIC(s) use network {name:?}: reload refused"
                            ),
                        ));
                    }
                    changed_nets.push(name.clone());
                }
            }
        }
    }
    for name in new.networks.keys() {
        if !old.networks.contains_key(name) || changed_nets.contains(name) {
            plan.networks.push(name.clone());
        }
    }
    for vm in &old.vms {
        let nics = vm_nics(&vm.name);
        match new.vm(&vm.name) {
            None => {
                if nics > 0 {
                    return Err(refuse(
                        &old.path,
                        old.vm_key(&vm.name),
                        format!(
                            "removed while it has {nics} NIC(s): detach them first; reload refused"
                        ),
                    ));
                }
                plan.remove.push(vm.name.clone());
            }
            Some(n) => {
                let mut fields = restart_fields(vm, n);
                if fields.is_empty() && changed_nets.contains(&n.network) {
                    fields.push("network");
                }
                if !fields.is_empty() {
                    if nics > 0 {
                        let path = if n.registered {
                            new.registered_path()
                        } else {
                            &new.path
                        };
                        return Err(refuse(
                            path,
                            format!("{}.{}", new.vm_key(&vm.name), fields[0]),
                            format!(
                                "changed while the VM has {nics} NIC(s) (only max_nics and warm_pool change live): reload refused"
                            ),
                        ));
                    }
                    plan.restart.push(vm.name.clone());
                } else if vm.max_nics != n.max_nics || vm.warm_pool != n.warm_pool {
                    plan.quota.push(vm.name.clone());
                }
            }
        }
    }
    for vm in &new.vms {
        if old.vm(&vm.name).is_none() {
            plan.add.push(vm.name.clone());
        }
    }
    Ok(plan)
}

/// The served VMs' changes: registration, update, unregistration, reload.
pub struct Registry {
    agent: Arc<Agent>,
    store: VmStore,
    listeners: Arc<VmListeners>,
    upkeep: Mutex<HashMap<String, JoinHandle<()>>>,
    upkeep_period: Duration,
    changes: tokio::sync::Mutex<()>,
    generation: AtomicU64,
    last_reload_error: Mutex<String>,
}

impl Registry {
    /// The registry of `agent`, whose VMs are served by `listeners` and
    /// kept up every `upkeep_period`.
    pub fn new(
        agent: Arc<Agent>,
        listeners: Arc<VmListeners>,
        upkeep_period: Duration,
    ) -> Registry {
        let store = VmStore::new(&agent.config().agent.state_dir);
        Registry {
            agent,
            store,
            listeners,
            upkeep: Mutex::new(HashMap::new()),
            upkeep_period,
            changes: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(1),
            last_reload_error: Mutex::new(String::new()),
        }
    }

    /// The agent.
    pub fn agent(&self) -> &Arc<Agent> {
        &self.agent
    }

    /// VM `name`'s quota and warm pool change live: the agent's limits, and
    /// the VM's connection budget with them.
    fn set_quota(&self, name: &str, max_nics: u32, warm_pool: u32) {
        if let Ok(vm) = self.agent.vm(name) {
            vm.set_quota(max_nics, warm_pool);
            self.listeners.set_quota(name, max_nics);
        }
    }

    /// The listeners.
    pub fn listeners(&self) -> &Arc<VmListeners> {
        &self.listeners
    }

    /// The configuration generation: 1 at start, one more per change applied.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Why the last reload was refused; empty when it was applied.
    pub fn last_reload_error(&self) -> String {
        self.last_reload_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set_reload_error(&self, e: String) {
        *self
            .last_reload_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = e;
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Starts the upkeep of every served VM (at start, once serving).
    pub fn spawn_upkeep_all(&self) {
        for vm in self.agent.vms() {
            self.spawn_upkeep(&vm.config.name);
        }
    }

    fn spawn_upkeep(&self, name: &str) {
        let Ok(vm) = self.agent.vm(name) else {
            return;
        };
        let task = spawn_vm_upkeep(self.agent.clone(), vm, self.upkeep_period);
        if let Some(old) = self
            .upkeep
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.to_string(), task)
        {
            old.abort();
        }
    }

    /// Stops every upkeep task (at shutdown).
    pub fn stop_upkeep(&self) {
        for (_, t) in self
            .upkeep
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain()
        {
            t.abort();
        }
    }

    /// Serves VM `name` of the effective configuration: added to the
    /// agent, reconciled (records kept from before, orphans removed), its
    /// socket bound, its upkeep started.
    async fn start_vm(&self, name: &str) -> Result<(), RegistryError> {
        let config = self.agent.config();
        let Some(vm) = config.vm(name) else {
            return Err(RegistryError::NotFound(name.to_string()));
        };
        if let Some(net) = config.networks.get(&vm.network) {
            if let Err(e) = self.agent.ensure_network(net).await {
                log::warn!("VM {name}: network {}: {e}", net.name);
            }
        }
        let Some(served) = self.agent.add_vm(vm) else {
            // Served already (the network is checked with the configuration).
            return Err(RegistryError::Exists(name.to_string()));
        };
        if let Err(e) = self.listeners.add(&served).await {
            let _ = self.agent.remove_vm(name, false).await;
            return Err(e.into());
        }
        match self.agent.reconcile_vm(name).await {
            Ok(r) if r != Default::default() => log::info!("VM {name}: reconciled {r:?}"),
            Ok(_) => {}
            Err(e) => log::warn!("VM {name}: reconciliation failed: {e}"),
        }
        self.spawn_upkeep(name);
        log::info!(
            "VM {name}: served ({} backend {}, network {})",
            vm.backend.kind(),
            vm.backend.endpoint().display(),
            vm.network
        );
        Ok(())
    }

    /// Stops serving VM `name`: out of the agent (refused while it has
    /// NICs, unless `force` releases them), socket removed, upkeep
    /// stopped. Returns how many NICs were released. A VM of the
    /// configuration that is not served (a reload could not bind its
    /// socket) has nothing to stop.
    async fn stop_vm(&self, name: &str, force: bool) -> Result<usize, RegistryError> {
        let released = match self.agent.remove_vm(name, force).await {
            Err(AgentError::UnknownVm(_)) => 0,
            other => other?,
        };
        self.listeners.remove(name);
        if let Some(t) = self
            .upkeep
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name)
        {
            t.abort();
        }
        log::info!("VM {name}: no longer served");
        Ok(released)
    }

    /// Registers VM `spec` and serves it at once.
    ///
    /// # Errors
    /// [`RegistryError::Exists`], [`RegistryError::Config`] (naming the
    /// field), [`RegistryError::Store`], [`RegistryError::Serve`] (its
    /// socket; the registration is then undone).
    pub async fn register(&self, spec: VmSpec) -> Result<VmConfig, RegistryError> {
        let _change = self.changes.lock().await;
        let config = self.agent.config();
        if config.vm(&spec.name).is_some() {
            return Err(RegistryError::Exists(spec.name));
        }
        let name = spec.name.clone();
        let mut specs = config.registered().to_vec();
        specs.push(spec);
        let new = config.with_registered(self.store.path(), &specs)?;
        let vm = new
            .vm(&name)
            .cloned()
            .ok_or_else(|| RegistryError::NotFound(name.clone()))?;
        self.store.save(&specs)?;
        self.agent.set_config(new);
        if let Err(e) = self.start_vm(&name).await {
            // Undone: the store and the configuration as they were.
            specs.pop();
            self.agent.set_config((*config).clone());
            if let Err(se) = self.store.save(&specs) {
                log::error!("VM {name}: cannot undo its registration in the store: {se}");
            }
            return Err(e);
        }
        self.bump();
        Ok(vm)
    }

    /// Replaces registered VM `spec.name`'s fields: the quota and warm pool
    /// change live; any other change restarts its serving, refused while it
    /// has NICs. Returns the VM and whether its serving restarted.
    ///
    /// # Errors
    /// [`RegistryError::NotFound`], [`RegistryError::FileVm`],
    /// [`RegistryError::Config`], [`RegistryError::Busy`], ...
    pub async fn update(&self, spec: VmSpec) -> Result<(VmConfig, bool), RegistryError> {
        let _change = self.changes.lock().await;
        let config = self.agent.config();
        let name = spec.name.clone();
        let old = self.registered_vm(&config, &name)?;
        let specs: Vec<VmSpec> = config
            .registered()
            .iter()
            .map(|s| {
                if s.name == name {
                    spec.clone()
                } else {
                    s.clone()
                }
            })
            .collect();
        let new = config.with_registered(self.store.path(), &specs)?;
        let vm = new
            .vm(&name)
            .cloned()
            .ok_or_else(|| RegistryError::NotFound(name.clone()))?;
        let fields = restart_fields(&old, &vm);
        if fields.is_empty() {
            self.store.save(&specs)?;
            self.agent.set_config(new);
            self.set_quota(&name, vm.max_nics, vm.warm_pool);
            self.bump();
            return Ok((vm, false));
        }
        let count = self.agent.nic_count(&name);
        if count > 0 {
            return Err(RegistryError::Busy {
                vm: name,
                count,
                fields: fields.join(", "),
            });
        }
        self.stop_vm(&name, false).await?;
        if let Err(e) = self.store.save(&specs) {
            // Served again as it was.
            if let Err(se) = self.start_vm(&name).await {
                log::error!("VM {name}: not served again after a failed update: {se}");
            }
            return Err(e.into());
        }
        self.agent.set_config(new);
        if let Err(e) = self.start_vm(&name).await {
            log::error!("VM {name}: updated but not served: {e}");
            self.bump();
            return Err(e);
        }
        self.bump();
        Ok((vm, true))
    }

    fn registered_vm(&self, config: &Config, name: &str) -> Result<VmConfig, RegistryError> {
        match config.vm(name) {
            Some(v) if v.registered => Ok(v.clone()),
            Some(_) => Err(RegistryError::FileVm {
                name: name.to_string(),
                path: config.path.clone(),
            }),
            None => Err(RegistryError::NotFound(name.to_string())),
        }
    }

    /// Unregisters VM `name`: refused while it has NICs unless `force`,
    /// which releases them first. Returns how many were released.
    ///
    /// # Errors
    /// [`RegistryError::NotFound`], [`RegistryError::FileVm`],
    /// [`RegistryError::Agent`] ([`AgentError::VmHasNics`]), ...
    pub async fn unregister(&self, name: &str, force: bool) -> Result<usize, RegistryError> {
        let _change = self.changes.lock().await;
        let config = self.agent.config();
        self.registered_vm(&config, name)?;
        let count = self.agent.nic_count(name);
        if count > 0 && !force {
            return Err(AgentError::VmHasNics {
                vm: name.to_string(),
                count,
            }
            .into());
        }
        // Its NICs are gone before it leaves the store: a crash in between
        // serves it again at the next start, without NICs.
        let released = self.stop_vm(name, force).await?;
        let specs: Vec<VmSpec> = config
            .registered()
            .iter()
            .filter(|s| s.name != name)
            .cloned()
            .collect();
        let new = config.with_registered(self.store.path(), &specs)?;
        self.store.save(&specs)?;
        self.agent.set_config(new);
        self.bump();
        Ok(released)
    }

    /// Reads the configuration file again and applies what changed (see
    /// [`plan_reload`]), or nothing: a file that does not load or check, or
    /// a change that cannot be applied, is logged and kept as the last
    /// reload error, and the agent goes on as it was.
    ///
    /// # Errors
    /// Why the reload was refused (also kept, see [`Registry::last_reload_error`]).
    pub async fn reload(&self) -> Result<ReloadPlan, RegistryError> {
        let _change = self.changes.lock().await;
        let result = self.reload_locked().await;
        match &result {
            Ok(plan) => {
                self.set_reload_error(String::new());
                log::info!(
                    "reloaded {}: generation {}; VMs added {:?}, removed {:?}, restarted {:?}, quota changed {:?}; networks added or changed {:?}",
                    self.agent.config().path.display(),
                    self.generation(),
                    plan.add,
                    plan.remove,
                    plan.restart,
                    plan.quota,
                    plan.networks
                );
            }
            Err(e) => {
                log::error!("reload refused, running configuration kept: {e}");
                self.set_reload_error(e.to_string());
            }
        }
        result
    }

    async fn reload_locked(&self) -> Result<ReloadPlan, RegistryError> {
        let old = self.agent.config();
        let file = Config::load(&old.path)?;
        let new = file.with_registered(self.store.path(), old.registered())?;
        let mut plan = plan_reload(
            &old,
            &new,
            |vm| self.agent.nic_count(vm),
            |net| self.agent.network_nic_count(net),
        )?;
        // A VM that an earlier reload could not serve (its socket could not
        // be bound) is tried again, changed or not.
        for vm in &new.vms {
            let planned = plan.add.contains(&vm.name) || plan.restart.contains(&vm.name);
            if !planned && self.agent.vm(&vm.name).is_err() {
                plan.add.push(vm.name.clone());
            }
        }
        for w in &new.warnings {
            log::warn!("{w}");
        }
        // Stop what goes or restarts. A VM that gained NICs since the plan
        // refuses the reload: what was stopped so far is served again.
        let mut stopped: Vec<&String> = Vec::new();
        for name in plan.remove.iter().chain(&plan.restart) {
            if let Err(e) = self.stop_vm(name, false).await {
                for again in stopped {
                    if let Err(se) = self.start_vm(again).await {
                        log::error!("VM {again}: not served again after a refused reload: {se}");
                    }
                }
                return Err(e);
            }
            stopped.push(name);
        }
        for net in &plan.networks {
            self.agent.forget_network(net);
        }
        self.agent.set_config(new.clone());
        for name in &plan.networks {
            if let Some(net) = new.networks.get(name) {
                if let Err(e) = self.agent.ensure_network(net).await {
                    log::warn!("network {name}: {e}");
                }
            }
        }
        for name in &plan.quota {
            if let Some(c) = new.vm(name) {
                self.set_quota(name, c.max_nics, c.warm_pool);
            }
        }
        let mut failed = None;
        for name in plan.add.iter().chain(&plan.restart) {
            if let Err(e) = self.start_vm(name).await {
                log::error!("VM {name}: not served after the reload: {e}");
                failed.get_or_insert(e);
            }
        }
        self.bump();
        match failed {
            Some(e) => Err(e),
            None => Ok(plan),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
        [agent]
        state_dir = "/tmp/nl-reg-test"
        admin_socket = "/run/nl-test/admin.sock"

        [[network]]
        name = "a"
        bridge = "bra"
        subnet = "10.1.0.0/24"
        gateway = "10.1.0.1"

        [[vm]]
        name = "v1"
        backend = "netns"
        netns = "ns1"
        socket = "/run/nl-test/v1.sock"
        network = "a"
    "#;

    fn cfg(text: &str) -> Config {
        Config::parse(Path::new("t.toml"), text).unwrap()
    }

    fn spec(name: &str, ns: &str) -> VmSpec {
        VmSpec {
            name: name.into(),
            backend: "netns".into(),
            netns: Some(ns.into()),
            socket: Some(format!("/run/nl-test/{name}.sock").into()),
            ..Default::default()
        }
    }

    fn none(_: &str) -> usize {
        0
    }

    #[test]
    fn registered_vms_are_checked_with_the_file() {
        let c = cfg(BASE);
        let store = Path::new("/s/vms.json");
        let e = c
            .with_registered(store, &[spec("v1", "ns9")])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/s/vms.json: registered vm (\"v1\").name: duplicate VM name: t.toml: vm[0] (\"v1\")"),
            "{e}"
        );
        let e = c
            .with_registered(store, &[spec("v2", "ns1")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("registered vm (\"v2\").netns") && e.contains("already VM \"v1\"'s"),
            "{e}"
        );
        // Each change of a good v2 refused, naming its field and why.
        // A change of the spec, the field named, why.
        type Case = (fn(&mut VmSpec), &'static str, &'static str);
        let cases: Vec<Case> = vec![
            (
                |s| s.socket = Some("/run/nl-test/admin.sock".into()),
                "socket",
                "admin socket",
            ),
            (
                |s| s.network = Some("nope".into()),
                "network",
                "no [[network]]",
            ),
            (|s| s.backend = "xen".into(), "backend", "xen"),
            (
                |s| {
                    s.max_nics = Some(2);
                    s.warm_pool = Some(3)
                },
                "warm_pool",
                "max_nics",
            ),
            // One-value rules of the file's schema hold too.
            (|s| s.cid = Some(2), "cid", "reserved"),
            (|s| s.max_nics = Some(5000), "max_nics", "1023"),
            (
                |s| s.socket = Some("relative.sock".into()),
                "socket",
                "absolute",
            ),
        ];
        for (change, field, why) in cases {
            let mut s = spec("v2", "ns2");
            change(&mut s);
            let e = c.with_registered(store, &[s]).unwrap_err().to_string();
            assert!(
                e.contains(&format!("registered vm (\"v2\").{field}")) && e.contains(why),
                "{field}: {e}"
            );
        }
        let mut s = spec("v2\n", "ns2");
        s.socket = None;
        assert!(c.with_registered(store, &[s]).is_err());
        let ok = c.with_registered(store, &[spec("v2", "ns2")]).unwrap();
        let v2 = ok.vm("v2").unwrap();
        assert!(v2.registered && !ok.vm("v1").unwrap().registered);
        assert_eq!(v2.max_nics, 16);
        assert_eq!(ok.registered().len(), 1);
        // Checked again with another file: kept with it.
        let again = ok.with_registered(store, ok.registered()).unwrap();
        assert_eq!(again.vms.len(), 2);
    }

    #[test]
    fn store_round_trips_and_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = VmStore::new(dir.path());
        assert!(store.load().unwrap().is_empty());
        let vms = vec![spec("a", "x"), spec("b", "y")];
        store.save(&vms).unwrap();
        assert_eq!(store.load().unwrap(), vms);
        store.save(&vms[1..]).unwrap();
        assert_eq!(store.load().unwrap(), vms[1..].to_vec());
        std::fs::write(store.path(), "{\"version\": 1, \"vms\": [{\"nme\": 1}]}").unwrap();
        let e = store.load().unwrap_err().to_string();
        assert!(e.contains("vms.json"), "{e}");
    }

    #[test]
    fn reload_plans() {
        let old = cfg(BASE);
        // Same file: nothing.
        assert!(plan_reload(&old, &cfg(BASE), none, none)
            .unwrap()
            .is_empty());
        // A VM added, one removed, a network added.
        let text = BASE.replace("name = \"v1\"", "name = \"v2\"").replace(
            "netns = \"ns1\"\n        socket = \"/run/nl-test/v1.sock\"",
            "netns = \"ns2\"\n        socket = \"/run/nl-test/v2.sock\"",
        ) + "\n[[network]]\nname = \"b\"\nbridge = \"brb\"\nsubnet = \"10.2.0.0/24\"\ngateway = \"10.2.0.1\"\n";
        let new = cfg(&text);
        let p = plan_reload(&old, &new, none, none).unwrap();
        assert_eq!(p.add, vec!["v2"]);
        assert_eq!(p.remove, vec!["v1"]);
        assert_eq!(p.networks, vec!["b"]);
        // The removed VM has NICs: refused, naming the old file's key.
        let e = plan_reload(&old, &new, |v| usize::from(v == "v1") * 2, none)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("vm[0] (\"v1\")") && e.contains("2 NIC(s)"),
            "{e}"
        );
        // A network removed under NICs.
        let two = cfg(&(BASE.to_string()
            + "\n[[network]]\nname = \"b\"\nbridge = \"brb\"\nsubnet = \"10.2.0.0/24\"\ngateway = \"10.2.0.1\"\n"));
        let e = plan_reload(&two, &old, none, |n| usize::from(n == "b"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("t.toml: network[1] (\"b\")") && e.contains("removed"),
            "{e}"
        );
        // ... and without NICs: fine.
        assert!(plan_reload(&two, &old, none, none)
            .unwrap()
            .networks
            .is_empty());
        // A subnet shrunk under live leases.
        let shrunk = cfg(&BASE.replace("10.1.0.0/24", "10.1.0.0/25"));
        let e = plan_reload(&old, &shrunk, none, |_| 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("network[0] (\"a\").subnet") && e.contains("changed while 1 NIC(s)"),
            "{e}"
        );
        // Without leases the network changes and its VMs restart.
        let p = plan_reload(&old, &shrunk, none, none).unwrap();
        assert_eq!(p.networks, vec!["a"]);
        assert_eq!(p.restart, vec!["v1"]);
        // Quota changes live, even with NICs.
        let q = cfg(&BASE.replace(
            "network = \"a\"",
            "network = \"a\"\nmax_nics = 4\nwarm_pool = 1",
        ));
        let p = plan_reload(&old, &q, |_| 3, none).unwrap();
        assert_eq!(p.quota, vec!["v1"]);
        assert!(p.restart.is_empty());
        // A socket change with NICs: refused; without: a restart.
        let s = cfg(&BASE.replace("/run/nl-test/v1.sock", "/run/nl-test/v1b.sock"));
        let e = plan_reload(&old, &s, |_| 1, none).unwrap_err().to_string();
        assert!(e.contains("vm[0] (\"v1\").socket"), "{e}");
        assert_eq!(
            plan_reload(&old, &s, none, none).unwrap().restart,
            vec!["v1"]
        );
        // [agent] and [hostlo] settings: only at a restart.
        let a = cfg(&BASE.replace("/tmp/nl-reg-test", "/tmp/other"));
        let e = plan_reload(&old, &a, none, none).unwrap_err().to_string();
        assert!(
            e.contains("agent.state_dir") && e.contains("restart"),
            "{e}"
        );
        let h = cfg(&(BASE.to_string() + "\n[hostlo]\nmtu = 1400\n"));
        let e = plan_reload(&old, &h, none, none).unwrap_err().to_string();
        assert!(e.contains("hostlo.mtu"), "{e}");
    }
}
