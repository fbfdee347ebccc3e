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
use crate::{agent::Agent, config::ListenVsock};

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

/// Starts every listener of `agent`'s configuration.
pub async fn serve(agent: Arc<Agent>) -> Result<Running, ServeError> {
    let cfg = agent.config().clone();
    let mut running = Running {
        servers: Vec::new(),
        tasks: Vec::new(),
        sockets: Vec::new(),
        vsock: false,
    };
    let mut by_cid: HashMap<u32, (mpsc::Sender<Conn>, Budget, String)> = HashMap::new();
    for vm in agent.vms() {
        let name = vm.config.name.clone();
        // One budget per VM, whichever way it connects.
        let budget = Budget::new(
            cfg.agent
                .max_connections_per_vm
                .unwrap_or_else(|| vm_budget(vm.config.max_nics)),
        )
        .with_idle(cfg.agent.idle_timeout);
        let (tx, listener) = channel_listener();
        let service = agent_ttrpc::create_net_agent(Arc::new(VmService::new(
            agent.clone(),
            Some(name.clone()),
            RateBudget::new(
                cfg.agent.request_burst_per_vm,
                cfg.agent.requests_per_sec_per_vm,
            ),
        )));
        running
            .servers
            .push(start_server(&format!("VM {name}"), listener, service).await?);
        if let Some(path) = &vm.config.unix_socket {
            let l = bind_unix(path, 0o660)?;
            running.sockets.push(path.clone());
            running.tasks.push(accept_unix(
                l,
                tx.clone(),
                format!("VM {name} socket {}", path.display()),
                false,
                budget.clone(),
            ));
            log::info!("VM {name}: listening on {}", path.display());
        }
        if let Some(cid) = vm.config.cid {
            by_cid.insert(cid, (tx, budget, format!("VM {name} (vsock CID {cid})")));
        }
    }
    if cfg.agent.listen_vsock != ListenVsock::No && !by_cid.is_empty() {
        let port = cfg.agent.vsock_port;
        match tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
            libc::VMADDR_CID_ANY,
            port,
        )) {
            Ok(l) => {
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
                running.vsock = true;
                log::info!("listening on AF_VSOCK port {port}");
                let unknown_budget =
                    Budget::new(MIN_CONNS_PER_VM).with_idle(cfg.agent.idle_timeout);
                running.tasks.push(tokio::spawn(async move {
                    let refusals = RefusalLog::default();
                    let unknown_refusals = RefusalLog::default();
                    loop {
                        match l.accept().await {
                            Ok((stream, addr)) => {
                                let (tx, conn) = match by_cid.get(&addr.cid()) {
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
            Err(e) if cfg.agent.listen_vsock == ListenVsock::Auto => {
                log::info!("AF_VSOCK not available ({e}); serving VMs on unix sockets only");
            }
            Err(source) => return Err(ServeError::Vsock { port, source }),
        }
    }
    let (tx, listener) = channel_listener();
    let admin = agent_ttrpc::create_admin(Arc::new(AdminService::new(agent.clone())));
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
