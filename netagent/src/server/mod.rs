//! The agent's listeners and ttrpc services.
//!
//! The calling VM is decided when a connection is accepted, never from a
//! request: each VM has its own ttrpc server, fed by a channel into which the
//! accept loops hand connections:
//!
//! ```text
//!  AF_VSOCK :7070 ──accept──▶ peer CID ──▶ VM with that CID ─┐
//!  <uds>_7070 (vhost-device-vsock, per VM) ──▶ that VM ──────┤──▶ ttrpc server of the VM
//!  socket = "/run/nestless/x.sock" (per VM) ──▶ that VM ─────┘    (NetAgent, caller fixed)
//!  unknown CID ──▶ a server that refuses every call
//!  admin.sock (0600, peer uid 0 checked) ──▶ Admin service (nestlessctl)
//! ```
//!
//! VMs join and leave while the agent runs ([`crate::registry`]):
//! [`VmListeners`] starts a VM's server and socket and adds its CID to the
//! vsock accept loop's table, or stops them.
//!
//! * this file: the listeners, the per-VM servers and [`serve`];
//! * [`vm`]: the `NetAgent` service of one VM: parse (convert), call the
//!   agent, convert the reply; nothing else;
//! * [`admin`]: the `Admin` service (nestlessctl);
//! * [`convert`]: protobuf ⇄ domain; the one place requests are checked;
//! * [`conns`]: per-VM connection budgets and idle timeouts (the admin
//!   socket has its own budget);
//! * [`refusals`]: bounded logs about refused requests (fields cut, a
//!   token bucket of lines per VM).

pub mod admin;
pub mod conns;
pub mod convert;
pub mod refusals;
pub mod vm;

use std::{
    collections::HashMap,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use nestless_protos::agent_ttrpc;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::UnixListener,
    sync::mpsc,
    task::JoinHandle,
};
use ttrpc::r#async::transport::Listener;

use self::{
    admin::AdminService,
    conns::{vm_budget, Budget, RateBudget, Tracked, MAX_ADMIN_CONNS, MIN_CONNS_PER_VM},
    refusals::RefusalLog,
    vm::VmService,
};
use crate::{
    agent::{Agent, Vm},
    config::ListenVsock,
    registry::Registry,
};

/// Listener set-up failures.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A unix socket could not be made.
    #[error("cannot listen on {path}: {source}")]
    Unix {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another process serves the socket.
    #[error("{0} is in use by another process (is another agent running?)")]
    InUse(PathBuf),
    /// AF_VSOCK could not be used though the configuration demands it.
    #[error("cannot listen on AF_VSOCK port {port}: {source}")]
    Vsock {
        /// The port.
        port: u32,
        /// Why.
        source: std::io::Error,
    },
    /// ttrpc refused to start.
    #[error("cannot start the ttrpc server for {what}: {source}")]
    Ttrpc {
        /// Which server.
        what: String,
        /// Why.
        source: ttrpc::Error,
    },
}

trait Io: AsyncRead + AsyncWrite + Send + Sync + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin> Io for T {}
type Conn = Box<dyn Io>;

fn channel_listener() -> (mpsc::Sender<Conn>, Listener) {
    let (tx, rx) = mpsc::channel::<Conn>(64);
    let stream =
        futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|c| (Ok(c), rx)) },
        );
    (tx, Listener::new(stream))
}

/// Binds a unix socket: a stale socket file is replaced, a live one is an error.
fn bind_unix(path: &Path, mode: u32) -> Result<UnixListener, ServeError> {
    let err = |source| ServeError::Unix {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServeError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(err)?;
        }
        Ok(_) => {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            )))
        }
        Err(_) => {}
    }
    let l = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    Ok(l)
}

/// The running listeners; see [`Running::stop_accepting`].
pub struct Running {
    servers: Vec<ttrpc::r#async::Server>,
    tasks: Vec<JoinHandle<()>>,
    sockets: Vec<PathBuf>,
    listeners: Arc<VmListeners>,
    /// Whether AF_VSOCK is being served.
    pub vsock: bool,
}

impl Running {
    /// Stops accepting and removes the socket files. Connections already
    /// open are not cut here: the caller drains the agent
    /// ([`Agent::drain`]) and exits, which closes them.
    pub fn stop_accepting(self) {
        for t in &self.tasks {
            t.abort();
        }
        for p in &self.sockets {
            let _ = std::fs::remove_file(p);
        }
        self.listeners.stop_all();
        // ttrpc's own Server::shutdown panics when its listener stream has
        // ended (ttrpc 0.9); the servers simply go away with the process.
        std::mem::forget(self.servers);
    }
}

async fn start_server(
    what: &str,
    listener: Listener,
    services: HashMap<String, ttrpc::r#async::Service>,
) -> Result<ttrpc::r#async::Server, ServeError> {
    let mut server = ttrpc::r#async::Server::new()
        .add_listener(listener)
        .register_service(services);
    server.start().await.map_err(|source| ServeError::Ttrpc {
        what: what.to_string(),
        source,
    })?;
    Ok(server)
}

/// `stream` as a connection of `budget`, or `None` (closed, logged within
/// bounds) when the budget is spent.
fn admit<S: Io + 'static>(
    stream: S,
    budget: &Budget,
    refusals: &RefusalLog,
    what: &str,
) -> Option<Conn> {
    match budget.admit() {
        Some(permit) => Some(Box::new(Tracked::new(stream, permit, budget.idle()))),
        None => {
            refusals.warn(
                what,
                format_args!(
                    "{what}: connection refused: {} open, the most it may hold (RESOURCE_EXHAUSTED)",
                    budget.max()
                ),
            );
            None
        }
    }
}

fn accept_unix(
    listener: UnixListener,
    tx: mpsc::Sender<Conn>,
    what: String,
    root_only: bool,
    budget: Budget,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let refusals = RefusalLog::default();
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    if root_only {
                        match stream.peer_cred() {
                            Ok(c) if c.uid() == 0 => {}
                            Ok(c) => {
                                log::warn!("{what}: refused a connection from uid {}", c.uid());
                                continue;
                            }
                            Err(e) => {
                                log::warn!("{what}: cannot read peer credentials: {e}");
                                continue;
                            }
                        }
                    }
                    let Some(conn) = admit(stream, &budget, &refusals, &what) else {
                        continue;
                    };
                    if tx.send(conn).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    log::warn!("{what}: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    })
}

/// A VM's connections: the channel into its ttrpc server, its budget,
/// and how the logs name it.
type VmDoor = (mpsc::Sender<Conn>, Budget, String);

/// The per-VM servers and sockets, which VMs join and leave while the agent
/// runs ([`crate::registry`]).
pub struct VmListeners {
    agent: Arc<Agent>,
    /// VMs reached over AF_VSOCK, by CID (the vsock accept loop reads it).
    by_cid: Arc<std::sync::RwLock<HashMap<u32, VmDoor>>>,
    served: std::sync::Mutex<HashMap<String, VmListener>>,
    /// Whether AF_VSOCK is served (set once the listener is bound).
    vsock: std::sync::atomic::AtomicBool,
}

struct VmListener {
    task: Option<JoinHandle<()>>,
    socket: Option<PathBuf>,
    cid: Option<u32>,
    /// The VM's connection budget (shared by its socket and its CID).
    budget: Budget,
}

impl VmListeners {
    /// None yet, for `agent`'s VMs.
    pub fn new(agent: Arc<Agent>) -> VmListeners {
        VmListeners {
            agent,
            by_cid: Arc::default(),
            served: std::sync::Mutex::default(),
            vsock: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn served(&self) -> std::sync::MutexGuard<'_, HashMap<String, VmListener>> {
        self.served
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts serving `vm`: its ttrpc server, its unix socket (bound now),
    /// its CID.
    ///
    /// # Errors
    /// [`ServeError`] when the socket cannot be bound or the server started.
    pub async fn add(&self, vm: &Vm) -> Result<(), ServeError> {
        let name = vm.config.name.clone();
        // One budget per VM, whichever way it connects.
        let cfg = self.agent.config();
        let budget = Budget::new(
            cfg.agent
                .max_connections_per_vm
                .unwrap_or_else(|| vm_budget(vm.max_nics())),
        )
        .with_idle(cfg.agent.idle_timeout);
        let (tx, listener) = channel_listener();
        let mut entry = VmListener {
            task: None,
            socket: None,
            cid: vm.config.cid,
            budget: budget.clone(),
        };
        if let Some(path) = &vm.config.unix_socket {
            let l = bind_unix(path, 0o660)?;
            entry.socket = Some(path.clone());
            entry.task = Some(accept_unix(
                l,
                tx.clone(),
                format!("VM {name} socket {}", path.display()),
                false,
                budget.clone(),
            ));
        }
        let service = agent_ttrpc::create_net_agent(Arc::new(VmService::new(
            self.agent.clone(),
            Some(name.clone()),
            RateBudget::new(
                cfg.agent.request_burst_per_vm,
                cfg.agent.requests_per_sec_per_vm,
            ),
        )));
        let server = match start_server(&format!("VM {name}"), listener, service).await {
            Ok(s) => s,
            Err(e) => {
                stop_listener(entry);
                return Err(e);
            }
        };
        // ttrpc's own Server::shutdown panics when its listener stream has
        // ended (ttrpc 0.9): the server ends with its listener (the channel
        // closes when the VM leaves) and is not shut down.
        std::mem::forget(server);
        if let Some(path) = &entry.socket {
            log::info!("VM {name}: listening on {}", path.display());
        }
        if let Some(cid) = vm.config.cid {
            if entry.socket.is_none() && !self.vsock.load(std::sync::atomic::Ordering::Acquire) {
                log::warn!(
                    "VM {name}: CID {cid}, but the agent does not listen on AF_VSOCK (listen_vsock, or no vhost_vsock): the VM cannot call in"
                );
            }
            self.by_cid
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(cid, (tx, budget, format!("VM {name} (vsock CID {cid})")));
        }
        if let Some(old) = self.served().insert(name, entry) {
            stop_listener(old);
        }
        Ok(())
    }

    /// VM `name`'s quota is now `max_nics`: its connection budget follows
    /// ([`vm_budget`]), unless `max_connections_per_vm` fixes it.
    pub fn set_quota(&self, name: &str, max_nics: u32) {
        if self.agent.config().agent.max_connections_per_vm.is_some() {
            return;
        }
        if let Some(l) = self.served().get(name) {
            l.budget.set_max(vm_budget(max_nics));
        }
    }

    /// Stops serving VM `name`: its socket is closed and removed, its CID
    /// forgotten. Connections already open stay until their peer closes
    /// them; their calls are refused (the VM is no longer served).
    pub fn remove(&self, name: &str) {
        let Some(entry) = self.served().remove(name) else {
            return;
        };
        if let Some(cid) = entry.cid {
            self.by_cid
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&cid);
        }
        stop_listener(entry);
    }

    /// Stops every VM listener (at shutdown).
    pub fn stop_all(&self) {
        let all: Vec<VmListener> = self.served().drain().map(|(_, l)| l).collect();
        self.by_cid
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        for l in all {
            stop_listener(l);
        }
    }
}

fn stop_listener(l: VmListener) {
    if let Some(t) = l.task {
        t.abort();
    }
    if let Some(p) = l.socket {
        let _ = std::fs::remove_file(p);
    }
}

/// Starts every listener: each VM the agent serves now (VMs registered
/// later are added by the registry), AF_VSOCK, and the admin socket.
pub async fn serve(registry: Arc<Registry>) -> Result<Running, ServeError> {
    let agent = registry.agent().clone();
    let cfg = agent.config();
    let mut running = Running {
        servers: Vec::new(),
        tasks: Vec::new(),
        sockets: Vec::new(),
        listeners: registry.listeners().clone(),
        vsock: false,
    };
    // AF_VSOCK is bound first (whether it listens decides a warning about
    // VMs with a CID), then the VMs are added, then it accepts: a VM's CID
    // is in the table before its first connection can be taken.
    let vsock = if cfg.agent.listen_vsock != ListenVsock::No {
        let port = cfg.agent.vsock_port;
        match tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
            libc::VMADDR_CID_ANY,
            port,
        )) {
            Ok(l) => Some(l),
            Err(e) if cfg.agent.listen_vsock == ListenVsock::Auto => {
                log::info!("AF_VSOCK not available ({e}); serving VMs on unix sockets only");
                None
            }
            Err(source) => return Err(ServeError::Vsock { port, source }),
        }
    } else {
        None
    };
    running.vsock = vsock.is_some();
    registry
        .listeners()
        .vsock
        .store(running.vsock, std::sync::atomic::Ordering::Release);
    for vm in agent.vms() {
        registry.listeners().add(&vm).await?;
    }
    let by_cid = registry.listeners().by_cid.clone();
    if let Some(l) = vsock {
        let (unknown_tx, listener) = channel_listener();
        let service = agent_ttrpc::create_net_agent(Arc::new(VmService::new(
            agent.clone(),
            None,
            RateBudget::new(
                cfg.agent.request_burst_per_vm,
                cfg.agent.requests_per_sec_per_vm,
            ),
        )));
        running
            .servers
            .push(start_server("unknown callers", listener, service).await?);
        log::info!("listening on AF_VSOCK port {}", cfg.agent.vsock_port);
        let unknown_budget = Budget::new(MIN_CONNS_PER_VM).with_idle(cfg.agent.idle_timeout);
        running.tasks.push(tokio::spawn(async move {
            let refusals = RefusalLog::default();
            let unknown_refusals = RefusalLog::default();
            loop {
                match l.accept().await {
                    Ok((stream, addr)) => {
                        let door = by_cid
                            .read()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .get(&addr.cid())
                            .cloned();
                        let (tx, conn) = match &door {
                            Some((tx, budget, what)) => {
                                (tx, admit(stream, budget, &refusals, what))
                            }
                            None => {
                                unknown_refusals.warn(
                                    "unknown",
                                    format_args!(
                                        "vsock connection from CID {}, which no configured VM has",
                                        addr.cid()
                                    ),
                                );
                                (
                                    &unknown_tx,
                                    admit(
                                        stream,
                                        &unknown_budget,
                                        &unknown_refusals,
                                        "unknown vsock callers",
                                    ),
                                )
                            }
                        };
                        if let Some(conn) = conn {
                            let _ = tx.send(conn).await;
                        }
                    }
                    Err(e) => {
                        log::warn!("vsock accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        }));
    }
    let (tx, listener) = channel_listener();
    let admin = agent_ttrpc::create_admin(Arc::new(AdminService::new(registry.clone())));
    running
        .servers
        .push(start_server("admin", listener, admin).await?);
    let path = cfg.agent.admin_socket.clone();
    let l = bind_unix(&path, 0o600)?;
    running.sockets.push(path.clone());
    running.tasks.push(accept_unix(
        l,
        tx,
        format!("admin socket {}", path.display()),
        true,
        Budget::new(MAX_ADMIN_CONNS).with_idle(cfg.agent.idle_timeout),
    ));
    log::info!("admin socket {}", path.display());
    Ok(running)
}
