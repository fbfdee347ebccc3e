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

use std::{
    collections::HashMap,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use nestless_protos::{agent as pb, agent_ttrpc, PROTOCOL_VERSION};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::UnixListener,
    sync::mpsc,
    task::JoinHandle,
};
use ttrpc::r#async::{transport::Listener, TtrpcContext};

use crate::{agent::Agent, config::ListenVsock, convert, error::AgentError, lifecycle::NicState};

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

/// The NetAgent service bound to one caller.
struct VmService {
    agent: Arc<Agent>,
    /// `None`: a caller no VM matches.
    vm: Option<String>,
}

impl VmService {
    fn caller(&self) -> Result<&str, ttrpc::Error> {
        self.vm.as_deref().ok_or_else(|| {
            AgentError::UnknownVm("no VM with the caller's vsock CID is configured on this host (the agent logs the CID)".into())
                .to_ttrpc()
        })
    }
}

#[async_trait::async_trait]
impl agent_ttrpc::NetAgent for VmService {
    async fn health(
        &self,
        _: &TtrpcContext,
        _: pb::HealthRequest,
    ) -> ttrpc::Result<pb::HealthResponse> {
        let vm = self.caller()?;
        let vmh = self.agent.vm(vm)?;
        Ok(pb::HealthResponse {
            protocol_version: PROTOCOL_VERSION.into(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            vm: vm.into(),
            nics_in_use: self.agent.nic_count(vm) as u32,
            nic_quota: vmh.config.max_nics,
            ..Default::default()
        })
    }

    async fn attach_nic(
        &self,
        _: &TtrpcContext,
        req: pb::AttachNicRequest,
    ) -> ttrpc::Result<pb::AttachNicResponse> {
        let vm = self.caller()?;
        let done = self
            .agent
            .attach(vm, convert::attach_request(&req))
            .await
            .map_err(|e| {
                log::warn!(
                    "VM {vm}: AttachNic for sandbox {:?} failed: {e}",
                    req.sandbox_id
                );
                e
            })?;
        let net = self
            .agent
            .network(&done.record.network)
            .expect("record networks exist");
        Ok(pb::AttachNicResponse {
            nic: protobuf::MessageField::some(convert::nic(&done.record, net)),
            created: done.created,
            ..Default::default()
        })
    }

    async fn detach_nic(
        &self,
        _: &TtrpcContext,
        req: pb::DetachNicRequest,
    ) -> ttrpc::Result<pb::DetachNicResponse> {
        let vm = self.caller()?;
        let which = convert::detach_selector(&req)?;
        self.agent.detach(vm, which).await.map_err(|e| {
            log::warn!("VM {vm}: DetachNic failed: {e}");
            e
        })?;
        Ok(pb::DetachNicResponse::default())
    }

    async fn hostlo_join(
        &self,
        _: &TtrpcContext,
        req: pb::HostloJoinRequest,
    ) -> ttrpc::Result<pb::HostloJoinResponse> {
        let vm = self.caller()?;
        let (rec, view) = self
            .agent
            .hostlo_join(vm, &req.pod, req.part, &req.sandbox_id)
            .await
            .map_err(|e| {
                log::warn!("VM {vm}: HostloJoin {:?}/{} failed: {e}", req.pod, req.part);
                e
            })?;
        let h = &self.agent.config().hostlo;
        let nic = pb::Nic {
            id: rec.id.to_string(),
            sandbox_id: rec.sandbox_id.clone(),
            network: format!("hostlo:{}", req.pod),
            mac: rec.mac.to_string(),
            addresses: vec![pb::IpConfig {
                address: rec.ipv4.to_string(),
                prefix_len: u32::from(h.subnet.prefix_len()),
                ..Default::default()
            }],
            mtu: h.mtu,
            ..Default::default()
        };
        Ok(pb::HostloJoinResponse {
            nic: protobuf::MessageField::some(nic),
            pod: protobuf::MessageField::some(convert::hostlo_view(&view)),
            ..Default::default()
        })
    }

    async fn hostlo_leave(
        &self,
        _: &TtrpcContext,
        req: pb::HostloLeaveRequest,
    ) -> ttrpc::Result<pb::HostloLeaveResponse> {
        let vm = self.caller()?;
        self.agent.hostlo_leave(vm, &req.pod, req.part).await?;
        Ok(pb::HostloLeaveResponse::default())
    }

    async fn hostlo_publish(
        &self,
        _: &TtrpcContext,
        req: pb::HostloPublishRequest,
    ) -> ttrpc::Result<pb::HostloPublishResponse> {
        let vm = self.caller()?;
        let ports = convert::hostlo_ports(&req.ports)?;
        let conflicts = self
            .agent
            .hostlo_publish(vm, &req.pod, req.part, &ports)
            .await?;
        Ok(pb::HostloPublishResponse {
            conflicts: conflicts.iter().map(convert::hostlo_conflict).collect(),
            ..Default::default()
        })
    }

    async fn hostlo_watch(
        &self,
        _: &TtrpcContext,
        req: pb::HostloWatchRequest,
    ) -> ttrpc::Result<pb::HostloWatchResponse> {
        let vm = self.caller()?;
        let timeout = std::time::Duration::from_millis(u64::from(req.timeout_ms));
        let view = self
            .agent
            .hostlo_watch(vm, &req.pod, req.since_version, timeout)
            .await?;
        Ok(convert::hostlo_view(&view))
    }

    async fn list_nics(
        &self,
        _: &TtrpcContext,
        _: pb::ListNicsRequest,
    ) -> ttrpc::Result<pb::ListNicsResponse> {
        let vm = self.caller()?;
        let nics = self
            .agent
            .records(Some(vm))
            .iter()
            .filter(|r| r.state == NicState::Attached && !r.pooled && r.hostlo.is_none())
            .filter_map(|r| self.agent.network(&r.network).map(|n| convert::nic(r, n)))
            .collect();
        Ok(pb::ListNicsResponse {
            nics,
            ..Default::default()
        })
    }
}

struct AdminService {
    agent: Arc<Agent>,
}

#[async_trait::async_trait]
impl agent_ttrpc::Admin for AdminService {
    async fn status(
        &self,
        _: &TtrpcContext,
        _: pb::StatusRequest,
    ) -> ttrpc::Result<pb::StatusResponse> {
        Ok(pb::StatusResponse {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            protocol_version: PROTOCOL_VERSION.into(),
            uptime_seconds: self.agent.uptime().as_secs(),
            state_file: self.agent.state_file().path().display().to_string(),
            vms: self.agent.vms().count() as u32,
            nics: self.agent.records(None).len() as u32,
            ..Default::default()
        })
    }

    async fn list_vms(
        &self,
        _: &TtrpcContext,
        _: pb::ListVmsRequest,
    ) -> ttrpc::Result<pb::ListVmsResponse> {
        let mut vms = Vec::new();
        for vm in self.agent.vms() {
            let status =
                match tokio::time::timeout(std::time::Duration::from_secs(1), vm.backend.probe())
                    .await
                {
                    Ok(Ok(_)) => "ok".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "no answer within 1s".to_string(),
                };
            vms.push(pb::VmInfo {
                name: vm.config.name.clone(),
                backend: vm.backend.kind().into(),
                endpoint: vm.config.backend.endpoint().display().to_string(),
                network: vm.config.network.clone(),
                cid: vm.config.cid.unwrap_or(0),
                unix_socket: vm
                    .config
                    .unix_socket
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                nics: self.agent.nic_count(&vm.config.name) as u32,
                max_nics: vm.config.max_nics,
                status,
                ..Default::default()
            });
        }
        Ok(pb::ListVmsResponse {
            vms,
            ..Default::default()
        })
    }

    async fn list_all_nics(
        &self,
        _: &TtrpcContext,
        req: pb::ListAllNicsRequest,
    ) -> ttrpc::Result<pb::ListAllNicsResponse> {
        let vm = (!req.vm.is_empty()).then_some(req.vm.as_str());
        if let Some(v) = vm {
            self.agent.vm(v)?;
        }
        Ok(pb::ListAllNicsResponse {
            nics: self
                .agent
                .records(vm)
                .iter()
                .map(|r| convert::nic_record(r, self.agent.network(&r.network)))
                .collect(),
            ..Default::default()
        })
    }

    async fn list_hostlo_pods(
        &self,
        _: &TtrpcContext,
        _: pb::ListHostloPodsRequest,
    ) -> ttrpc::Result<pb::ListHostloPodsResponse> {
        let records = self.agent.records(None);
        let pods = self
            .agent
            .hostlo_pods()
            .into_iter()
            .filter_map(|pod| {
                let view = self.agent.hostlo_view(&pod)?;
                let mut members: Vec<(u32, String)> = records
                    .iter()
                    .filter_map(|r| {
                        r.hostlo
                            .as_ref()
                            .filter(|h| h.pod == pod)
                            .map(|h| (h.part, r.vm.clone()))
                    })
                    .collect();
                members.sort();
                let network = records
                    .iter()
                    .find(|r| r.hostlo.as_ref().is_some_and(|h| h.pod == pod))
                    .map(|r| r.network.clone())
                    .unwrap_or_default();
                Some(pb::HostloPodInfo {
                    bridge: crate::hostlo::segment_bridge(&pod),
                    pod,
                    network,
                    members: members.iter().map(|(p, vm)| format!("{p}:{vm}")).collect(),
                    view: protobuf::MessageField::some(convert::hostlo_view(&view)),
                    ..Default::default()
                })
            })
            .collect();
        Ok(pb::ListHostloPodsResponse {
            pods,
            ..Default::default()
        })
    }

    async fn list_leases(
        &self,
        _: &TtrpcContext,
        _: pb::ListLeasesRequest,
    ) -> ttrpc::Result<pb::ListLeasesResponse> {
        Ok(pb::ListLeasesResponse {
            leases: self
                .agent
                .records(None)
                .iter()
                .map(convert::lease)
                .collect(),
            ..Default::default()
        })
    }
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

fn accept_unix(
    listener: UnixListener,
    tx: mpsc::Sender<Conn>,
    what: String,
    root_only: bool,
) -> JoinHandle<()> {
    tokio::spawn(async move {
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
                    if tx.send(Box::new(stream)).await.is_err() {
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
    let mut by_cid: HashMap<u32, mpsc::Sender<Conn>> = HashMap::new();
    for vm in agent.vms() {
        let name = vm.config.name.clone();
        let (tx, listener) = channel_listener();
        let service = agent_ttrpc::create_net_agent(Arc::new(VmService {
            agent: agent.clone(),
            vm: Some(name.clone()),
        }));
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
            ));
            log::info!("VM {name}: listening on {}", path.display());
        }
        if let Some(cid) = vm.config.cid {
            by_cid.insert(cid, tx);
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
                let service = agent_ttrpc::create_net_agent(Arc::new(VmService {
                    agent: agent.clone(),
                    vm: None,
                }));
                running
                    .servers
                    .push(start_server("unknown callers", listener, service).await?);
                running.vsock = true;
                log::info!("listening on AF_VSOCK port {port}");
                running.tasks.push(tokio::spawn(async move {
                    loop {
                        match l.accept().await {
                            Ok((stream, addr)) => {
                                let tx = by_cid.get(&addr.cid()).cloned().unwrap_or_else(|| {
                                    log::warn!(
                                        "vsock connection from CID {}, which no configured VM has",
                                        addr.cid()
                                    );
                                    unknown_tx.clone()
                                });
                                let _ = tx.send(Box::new(stream)).await;
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
    let admin = agent_ttrpc::create_admin(Arc::new(AdminService {
        agent: agent.clone(),
    }));
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
    ));
    log::info!("admin socket {}", path.display());
    Ok(running)
}

/// Spawns the per-VM upkeep: every `period`, reconcile a VM whose backend
/// reconnected (QEMU restarted) or that has a cleanup pending.
pub fn spawn_upkeep(agent: Arc<Agent>, period: std::time::Duration) -> Vec<JoinHandle<()>> {
    let names: Vec<String> = agent.vms().map(|v| v.config.name.clone()).collect();
    names
        .into_iter()
        .map(|name| {
            let agent = agent.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let wake = agent.wakeup(&name).expect("a served VM");
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = wake.notified() => {}
                    }
                    match agent.tend_vm(&name).await {
                        Ok(Some(report)) if report != Default::default() => {
                            log::info!("VM {name}: upkeep {report:?}")
                        }
                        Ok(_) => {}
                        Err(e) => log::warn!("VM {name}: upkeep failed: {e}"),
                    }
                }
            })
        })
        .collect()
}
