//! The shim's one protobuf edge: the client of the host agent (ttrpc over
//! vsock or a unix socket), the counterpart of the agent's `convert` module.
//!
//! Replies are turned into checked domain types here ([`Nic`], [`PodView`]),
//! so that nothing deeper in the shim, the CNI plugin or Hostlo sees a
//! generated struct; a reply that cannot be used is a [`ClientError`].
//!
//! ```text
//! shim / nestless-cni / Hostlo part          host agent (vsock / unix)
//!  connect (retried until connect_timeout) ──▶ accept
//!  AttachNic(scope, sandbox, interface, labels) ▶ lease, tap, device_add
//!   ◀── Nic{id, mac, addresses, routes, mtu}, created   (checked here into an Attached)
//!   connection broke under the request? dial again, ask once more
//!  DetachNic(nic id | scope, sandbox[, interface]) ▶ unplug; NOT_FOUND = done
//!  HostloJoin / Publish / Watch / Leave ─────▶ the pod's view (a PodView)
//! ```
//!
//! Attach and detach are idempotent per (scope, sandbox, interface) on the
//! agent's side, which is what makes the one retry after a broken connection
//! safe. A sandbox id is unique within its *scope*: the containerd namespace
//! of a container the shim attaches outside CRI, or the empty scope of CRI pod
//! sandboxes and CNI attachments ([`SandboxRef`]). A sandbox holds one NIC per
//! interface name (CNI_IFNAME); the agent's reply says whether this call made
//! the NIC (`created`): only then is it the caller's to give back on failure.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use nestless_model::{MacAddr, Port, Proto};
use nestless_protos::{agent as pb, agent_ttrpc::NetAgentClient};

use crate::config::{AgentAddress, AgentEndpoint};

/// Failures of a call to the host agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The host agent refused a request.
    #[error("host agent refused {op}: {code:?}: {message}")]
    AgentRefused {
        /// The request.
        op: &'static str,
        /// The agent's status code (e.g. `RESOURCE_EXHAUSTED`).
        code: ttrpc::Code,
        /// The agent's message.
        message: String,
    },
    /// The host agent could not be reached.
    #[error("host agent at {address} unreachable: {reason}")]
    AgentUnavailable {
        /// The agent address dialled.
        address: String,
        /// Why it failed.
        reason: String,
    },
    /// The agent's reply cannot be used.
    #[error("unusable reply from the host agent: {0}")]
    BadReply(String),
    /// The agent answered with a NIC that another sandbox or interface holds
    /// (an agent that does not key NICs by scope and interface name): it is
    /// left alone.
    #[error(
        "host agent answered sandbox {sandbox} ({interface}) with NIC {id}, which is {held_as}: \
         the agent does not keep them apart; nothing was changed"
    )]
    NotOurs {
        /// The sandbox asked for.
        sandbox: String,
        /// The interface asked for.
        interface: String,
        /// The NIC the agent returned.
        id: String,
        /// Whose it is.
        held_as: String,
    },
    /// The agent handed out a NIC whose description cannot be used (the NIC
    /// is leased all the same: the caller gives it back if it made it).
    #[error("unusable reply from the host agent: NIC {id}: {reason}")]
    BadNic {
        /// The NIC's id.
        id: String,
        /// What is wrong with it.
        reason: String,
        /// Whether the call that got it made it (then it is the caller's to give back).
        created: bool,
    },
}

impl ClientError {
    /// The ttrpc status code that says what failed: the agent's own code for
    /// a refusal, `UNAVAILABLE` when it cannot be reached, `INTERNAL` for a
    /// reply the shim cannot use, `ALREADY_EXISTS` for a NIC that is not ours.
    pub fn code(&self) -> ttrpc::Code {
        match self {
            Self::AgentRefused { code, .. } => *code,
            Self::AgentUnavailable { .. } => ttrpc::Code::UNAVAILABLE,
            Self::BadReply(_) | Self::BadNic { .. } => ttrpc::Code::INTERNAL,
            Self::NotOurs { .. } => ttrpc::Code::ALREADY_EXISTS,
        }
    }
}

/// The interface name a NIC takes when the request names none (the protocol's default).
pub const DEFAULT_INTERFACE: &str = "eth0";

/// A sandbox as the agent keys it: its id, unique within its scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SandboxRef {
    /// The namespace the id is unique in: the containerd namespace for a
    /// container attached outside CRI; empty for CRI pod sandboxes and CNI.
    pub scope: String,
    /// The sandbox id (CRI sandbox id, CNI_CONTAINERID or container id).
    pub id: String,
}

impl SandboxRef {
    /// `id` in `scope`.
    pub fn new(scope: impl Into<String>, id: impl Into<String>) -> SandboxRef {
        SandboxRef {
            scope: scope.into(),
            id: id.into(),
        }
    }

    /// `id` in the empty scope (CRI and CNI).
    pub fn unscoped(id: impl Into<String>) -> SandboxRef {
        SandboxRef::new("", id)
    }
}

impl std::fmt::Display for SandboxRef {
    /// `id`, or `scope/id` when the scope is not empty.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.scope.is_empty() {
            f.write_str(&self.id)
        } else {
            write!(f, "{}/{}", self.scope, self.id)
        }
    }
}

/// An interface name as the protocol carries it: empty means [`DEFAULT_INTERFACE`].
pub fn interface_or_default(name: &str) -> &str {
    if name.is_empty() {
        DEFAULT_INTERFACE
    } else {
        name
    }
}

/// One address of a [`Nic`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicAddress {
    /// The address.
    pub ip: IpAddr,
    /// Its prefix length (at most 32 for IPv4, 128 for IPv6).
    pub prefix_len: u8,
    /// The network's gateway for this address family, if any.
    pub gateway: Option<IpAddr>,
}

/// One route of a [`Nic`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicRoute {
    /// Destination network.
    pub destination: IpAddr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// Next hop; `None` for an on-link route.
    pub gateway: Option<IpAddr>,
}

/// A NIC the host agent handed out, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// The agent's id of the NIC.
    pub id: String,
    /// The sandbox it belongs to.
    pub sandbox_id: String,
    /// The scope it was attached in (empty from an agent that predates scopes).
    pub scope: String,
    /// The interface name it was attached for ([`DEFAULT_INTERFACE`] when the
    /// agent names none).
    pub interface: String,
    /// The labels it was attached with.
    pub labels: HashMap<String, String>,
    /// Its MAC: how the guest finds it.
    pub mac: MacAddr,
    /// MTU, 68 to 65535.
    pub mtu: u32,
    /// Addresses.
    pub addresses: Vec<NicAddress>,
    /// Routes.
    pub routes: Vec<NicRoute>,
}

impl Nic {
    /// The addresses in CIDR form (`10.0.0.5/24`).
    pub fn cidrs(&self) -> Vec<String> {
        self.addresses
            .iter()
            .map(|a| format!("{}/{}", a.ip, a.prefix_len))
            .collect()
    }
}

fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (a, p) = s.split_once('/')?;
    Some((a.parse().ok()?, p.parse().ok()?))
}

fn optional_ip(s: &str) -> Result<Option<IpAddr>, ()> {
    if s.is_empty() {
        Ok(None)
    } else {
        s.parse().map(Some).map_err(drop)
    }
}

impl TryFrom<pb::Nic> for Nic {
    type Error = ClientError;

    fn try_from(nic: pb::Nic) -> Result<Nic, ClientError> {
        let bad = |reason: String| ClientError::BadNic {
            id: nic.id.clone(),
            reason,
            created: true,
        };
        let mac = nic.mac.parse::<MacAddr>().map_err(|e| bad(e.to_string()))?;
        let mut addresses = Vec::new();
        for a in &nic.addresses {
            let ip: IpAddr = a
                .address
                .parse()
                .map_err(|_| bad(format!("address {:?}", a.address)))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            if a.prefix_len > max {
                return Err(bad(format!("prefix /{}", a.prefix_len)));
            }
            let gateway =
                optional_ip(&a.gateway).map_err(|()| bad(format!("gateway {:?}", a.gateway)))?;
            addresses.push(NicAddress {
                ip,
                prefix_len: a.prefix_len as u8,
                gateway,
            });
        }
        let mut routes = Vec::new();
        for r in &nic.routes {
            let (destination, prefix_len) = parse_cidr(&r.destination)
                .filter(|(ip, p)| *p <= if ip.is_ipv4() { 32 } else { 128 })
                .ok_or_else(|| bad(format!("route {:?}", r.destination)))?;
            let gateway =
                optional_ip(&r.gateway).map_err(|()| bad(format!("gateway {:?}", r.gateway)))?;
            if gateway.is_some_and(|g| g.is_ipv4() != destination.is_ipv4()) {
                return Err(bad(format!(
                    "route {} via {}: the families differ",
                    r.destination, r.gateway
                )));
            }
            routes.push(NicRoute {
                destination,
                prefix_len,
                gateway,
            });
        }
        if !(68..=65535).contains(&nic.mtu) {
            return Err(bad(format!("MTU {}", nic.mtu)));
        }
        Ok(Nic {
            interface: interface_or_default(&nic.interface).to_owned(),
            id: nic.id,
            sandbox_id: nic.sandbox_id,
            scope: nic.scope,
            labels: nic.labels,
            mac,
            mtu: nic.mtu,
            addresses,
            routes,
        })
    }
}

/// A NIC of `ListNics`: whose it is, and the NIC itself (or why the agent's
/// description of it cannot be used).
#[derive(Debug)]
pub struct ListedNic {
    /// The agent's id of the NIC.
    pub id: String,
    /// The sandbox it belongs to, in its scope.
    pub sandbox: SandboxRef,
    /// The interface name it was attached for ([`DEFAULT_INTERFACE`] when the agent names none).
    pub interface: String,
    /// The labels it was attached with.
    pub labels: HashMap<String, String>,
    /// The checked NIC (a [`ClientError::BadNic`] says why it cannot be used).
    pub nic: Result<Nic, ClientError>,
}

/// What `AttachNic` asks for.
#[derive(Debug, Clone, Copy)]
pub struct AttachArgs<'a> {
    /// The sandbox, in its scope.
    pub sandbox: &'a SandboxRef,
    /// The interface name the NIC takes in the pod (CNI_IFNAME).
    pub interface: &'a str,
    /// Labels the agent keeps with the NIC.
    pub labels: &'a HashMap<String, String>,
}

/// A NIC `AttachNic` returned, and whether this call made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    /// The NIC.
    pub nic: Nic,
    /// True when this call plugged it (also when the call had to ask again
    /// after a lost reply: the first attempt may have made it); false when the
    /// sandbox already had it (the shim after nestless-cni, a kubelet retry):
    /// then it is not the caller's to give back when something fails.
    pub created: bool,
}

/// What `DetachNic` releases.
#[derive(Debug, Clone, Copy)]
pub enum DetachTarget<'a> {
    /// One NIC, by the agent's id (what an undo path gives back: the NIC it made).
    Nic(&'a str),
    /// The sandbox's NIC with this interface name (CNI DEL).
    Interface(&'a SandboxRef, &'a str),
    /// Every NIC of the sandbox (the shim's teardown).
    Sandbox(&'a SandboxRef),
}

impl std::fmt::Display for DetachTarget<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Nic(id) => write!(f, "NIC {id}"),
            Self::Interface(sb, ifname) => write!(f, "the {ifname} NIC of sandbox {sb}"),
            Self::Sandbox(sb) => write!(f, "the NICs of sandbox {sb}"),
        }
    }
}

/// A port two or more parts of a Hostlo pod serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The port.
    pub port: Port,
    /// The parts that serve it (ascending).
    pub parts: Vec<u32>,
}

/// One part of a Hostlo pod, as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartView {
    /// The part index.
    pub part: u32,
    /// Its segment address.
    pub address: IpAddr,
    /// The ports it serves.
    pub ports: Vec<Port>,
}

/// The view of a Hostlo pod (`HostloWatch`). Entries the shim cannot use (an
/// unknown protocol, a port over 65535, a part without a usable address) are
/// left out: nothing could be relayed to them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodView {
    /// Grows with every change of the pod.
    pub version: u64,
    /// The parts.
    pub parts: Vec<PartView>,
    /// Ports in conflict: relayed by nobody.
    pub conflicts: Vec<Conflict>,
    /// Part 0's BrFusion address, while it has one.
    pub pod_ip: Option<IpAddr>,
}

fn port_of(p: &pb::HostloPort) -> Option<Port> {
    Some(Port {
        port: u16::try_from(p.port).ok()?,
        proto: p.protocol.parse::<Proto>().ok()?,
    })
}

fn conflicts_of(conflicts: &[pb::HostloConflict]) -> Vec<Conflict> {
    conflicts
        .iter()
        .filter_map(|c| {
            Some(Conflict {
                port: port_of(c.port.as_ref()?)?,
                parts: c.parts.clone(),
            })
        })
        .collect()
}

impl From<&pb::HostloWatchResponse> for PodView {
    fn from(v: &pb::HostloWatchResponse) -> PodView {
        PodView {
            version: v.version,
            parts: v
                .parts
                .iter()
                .filter_map(|p| {
                    Some(PartView {
                        part: p.part,
                        address: p.address.parse().ok()?,
                        ports: p.ports.iter().filter_map(port_of).collect(),
                    })
                })
                .collect(),
            conflicts: conflicts_of(&v.conflicts),
            pod_ip: v.pod_ip.parse().ok(),
        }
    }
}

/// Whether the NIC the agent replied with is the one asked for. The agent
/// echoes the scope and interface name it keyed the NIC by; one that predates
/// them echoes empty fields. A NIC this call created is ours whatever the
/// echo says (logged when the agent ignored the fields); a NIC the sandbox
/// already had must carry the scope and interface asked for, else it is
/// another sandbox's or another interface's NIC, refused untouched.
fn check_identity(
    nic: &Nic,
    sandbox: &SandboxRef,
    interface: &str,
    created: bool,
) -> Result<(), ClientError> {
    let want_if = interface_or_default(interface);
    if nic.scope == sandbox.scope && nic.interface == want_if {
        return Ok(());
    }
    if created {
        log::warn!(
            "sandbox {sandbox}: the host agent attached NIC {} without keying it by scope {:?} \
             and interface {want_if} (an agent that predates them?)",
            nic.id,
            sandbox.scope
        );
        return Ok(());
    }
    Err(ClientError::NotOurs {
        sandbox: sandbox.to_string(),
        interface: want_if.to_owned(),
        id: nic.id.clone(),
        held_as: if nic.scope.is_empty() {
            format!("{} of sandbox {}", nic.interface, nic.sandbox_id)
        } else {
            format!(
                "{} of sandbox {}/{}",
                nic.interface, nic.scope, nic.sandbox_id
            )
        },
    })
}

/// The ttrpc address for an agent address.
pub fn ttrpc_address(a: &AgentAddress) -> String {
    match a {
        AgentAddress::Vsock { cid, port } => format!("vsock://{cid}:{port}"),
        AgentAddress::Unix(p) => format!("unix://{}", p.display()),
    }
}

/// Whether a failed call failed on the connection (the agent restarting under
/// it), not with the agent's answer nor on the deadline: worth one more try.
fn is_transport(e: &ttrpc::Error) -> bool {
    matches!(
        e,
        ttrpc::Error::Socket(_)
            | ttrpc::Error::LocalClosed
            | ttrpc::Error::RemoteClosed
            | ttrpc::Error::Eof
    )
}

/// A connection to the host agent.
pub struct AgentClient {
    address: String,
    client: NetAgentClient,
    request_timeout: Duration,
    /// To connect again when the connection breaks under a request.
    endpoint: AgentEndpoint,
}

impl AgentClient {
    /// Connects, retrying until `connect_timeout` (the agent may be restarting).
    ///
    /// # Errors
    /// [`ClientError::AgentUnavailable`] when no connection is made in time.
    pub async fn connect(endpoint: &AgentEndpoint) -> Result<AgentClient, ClientError> {
        let address = ttrpc_address(&endpoint.address);
        let start = Instant::now();
        loop {
            let left = endpoint.connect_timeout.saturating_sub(start.elapsed());
            match tokio::time::timeout(
                left.max(Duration::from_millis(50)),
                ttrpc::r#async::Client::connect(&address),
            )
            .await
            {
                Ok(Ok(c)) => {
                    return Ok(AgentClient {
                        address,
                        client: NetAgentClient::new(c),
                        request_timeout: endpoint.request_timeout,
                        endpoint: endpoint.clone(),
                    })
                }
                Ok(Err(e)) if start.elapsed() >= endpoint.connect_timeout => {
                    return Err(ClientError::AgentUnavailable {
                        address,
                        reason: e.to_string(),
                    })
                }
                Ok(Err(_)) => {}
                Err(_) => {
                    return Err(ClientError::AgentUnavailable {
                        address,
                        reason: format!("no connection within {:?}", endpoint.connect_timeout),
                    })
                }
            }
            if start.elapsed() >= endpoint.connect_timeout {
                return Err(ClientError::AgentUnavailable {
                    address,
                    reason: format!("no connection within {:?}", endpoint.connect_timeout),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn ctx(&self) -> ttrpc::context::Context {
        ttrpc::context::with_timeout(self.request_timeout.as_nanos() as i64)
    }

    fn refused(&self, op: &'static str, e: ttrpc::Error) -> ClientError {
        match e {
            ttrpc::Error::RpcStatus(s) => ClientError::AgentRefused {
                op,
                code: s.code(),
                message: s.message().to_string(),
            },
            other => ClientError::AgentUnavailable {
                address: self.address.clone(),
                reason: format!("{op}: {other}"),
            },
        }
    }

    /// `AttachNic`. When the connection breaks under the request (the agent
    /// restarting), connects again and asks once more: the agent answers the
    /// same (scope, sandbox, interface) with the same NIC, so the retry cannot
    /// make a second one.
    ///
    /// The reply must be the NIC asked for: a NIC the call did not create
    /// whose scope or interface name is not the one asked for belongs to
    /// someone else (an agent that does not key NICs by them), and is refused
    /// ([`ClientError::NotOurs`]) without being touched.
    ///
    /// # Errors
    /// [`ClientError::AgentRefused`] with the agent's code,
    /// [`ClientError::AgentUnavailable`], [`ClientError::BadReply`] when the
    /// reply holds no NIC, [`ClientError::BadNic`] when the NIC it holds
    /// cannot be used (the NIC is attached then: the caller detaches it if it
    /// was created), and [`ClientError::NotOurs`].
    pub async fn attach(&self, args: &AttachArgs<'_>) -> Result<Attached, ClientError> {
        let sandbox = args.sandbox;
        let req = pb::AttachNicRequest {
            sandbox_id: sandbox.id.clone(),
            scope: sandbox.scope.clone(),
            interface: args.interface.into(),
            labels: args.labels.clone(),
            ..Default::default()
        };
        let mut retried = false;
        let resp = match self.client.attach_nic(self.ctx(), &req).await {
            Err(e) if is_transport(&e) => {
                log::warn!("sandbox {sandbox}: AttachNic: {e}; asking again");
                retried = true;
                let again = AgentClient::connect(&self.endpoint).await?;
                again.client.attach_nic(again.ctx(), &req).await
            }
            other => other,
        }
        .map_err(|e| self.refused("AttachNic", e))?;
        // After a lost reply, "already there" may well be the NIC the first
        // attempt made: it counts as this call's (it is this sandbox's either way).
        let created = resp.created || retried;
        let pb_nic = resp
            .nic
            .into_option()
            .ok_or(ClientError::BadReply("AttachNic returned no NIC".into()))?;
        let nic = Nic::try_from(pb_nic).map_err(|e| match e {
            ClientError::BadNic { id, reason, .. } => ClientError::BadNic {
                id,
                reason,
                created,
            },
            other => other,
        })?;
        check_identity(&nic, sandbox, args.interface, created)?;
        Ok(Attached { nic, created })
    }

    /// `DetachNic`; a NIC already gone is success. Asked once more on a new
    /// connection when the connection breaks under the request.
    ///
    /// # Errors
    /// [`ClientError::AgentRefused`] (other than `NOT_FOUND`), [`ClientError::AgentUnavailable`].
    pub async fn detach(&self, target: DetachTarget<'_>) -> Result<(), ClientError> {
        let mut req = pb::DetachNicRequest::default();
        match target {
            DetachTarget::Nic(id) => req.nic_id = id.into(),
            DetachTarget::Interface(sb, ifname) => {
                req.sandbox_id = sb.id.clone();
                req.scope = sb.scope.clone();
                req.interface = ifname.into();
            }
            DetachTarget::Sandbox(sb) => {
                req.sandbox_id = sb.id.clone();
                req.scope = sb.scope.clone();
            }
        }
        let result = match self.client.detach_nic(self.ctx(), &req).await {
            Err(e) if is_transport(&e) => {
                log::warn!("DetachNic of {target}: {e}; asking again");
                let again = AgentClient::connect(&self.endpoint).await?;
                again.client.detach_nic(again.ctx(), &req).await
            }
            other => other,
        };
        match result {
            Ok(_) => Ok(()),
            Err(ttrpc::Error::RpcStatus(s)) if s.code() == ttrpc::Code::NOT_FOUND => Ok(()),
            Err(e) => Err(self.refused("DetachNic", e)),
        }
    }

    /// `ListNics`: the calling VM's NICs, every page of them.
    ///
    /// # Errors
    /// [`ClientError::AgentRefused`], [`ClientError::AgentUnavailable`].
    pub async fn list(&self) -> Result<Vec<ListedNic>, ClientError> {
        let mut nics = Vec::new();
        let mut page_token = String::new();
        loop {
            let req = pb::ListNicsRequest {
                page_token,
                ..Default::default()
            };
            let r = self
                .client
                .list_nics(self.ctx(), &req)
                .await
                .map_err(|e| self.refused("ListNics", e))?;
            nics.extend(r.nics);
            if r.next_page_token.is_empty() {
                break;
            }
            page_token = r.next_page_token;
        }
        Ok(nics
            .into_iter()
            .map(|n| ListedNic {
                id: n.id.clone(),
                sandbox: SandboxRef::new(n.scope.clone(), n.sandbox_id.clone()),
                interface: interface_or_default(&n.interface).to_owned(),
                labels: n.labels.clone(),
                nic: n.try_into(),
            })
            .collect())
    }

    /// `HostloJoin`: the segment NIC and the pod's view.
    ///
    /// # Errors
    /// As [`Self::attach`]; on [`ClientError::BadNic`] the part has joined
    /// (the caller leaves again).
    pub async fn hostlo_join(
        &self,
        pod: &str,
        part: u32,
        sandbox_id: &str,
    ) -> Result<(Nic, PodView), ClientError> {
        let req = pb::HostloJoinRequest {
            pod: pod.into(),
            part,
            sandbox_id: sandbox_id.into(),
            ..Default::default()
        };
        let r = self
            .client
            .hostlo_join(self.ctx(), &req)
            .await
            .map_err(|e| self.refused("HostloJoin", e))?;
        let nic = r
            .nic
            .into_option()
            .ok_or(ClientError::BadReply("HostloJoin returned no NIC".into()))?
            .try_into()?;
        let view = r.pod.into_option().unwrap_or_default();
        Ok((nic, PodView::from(&view)))
    }

    /// `HostloLeave`; a part already gone is success.
    ///
    /// # Errors
    /// [`ClientError::AgentRefused`] (other than `NOT_FOUND`), [`ClientError::AgentUnavailable`].
    pub async fn hostlo_leave(&self, pod: &str, part: u32) -> Result<(), ClientError> {
        let req = pb::HostloLeaveRequest {
            pod: pod.into(),
            part,
            ..Default::default()
        };
        match self.client.hostlo_leave(self.ctx(), &req).await {
            Ok(_) => Ok(()),
            Err(ttrpc::Error::RpcStatus(s)) if s.code() == ttrpc::Code::NOT_FOUND => Ok(()),
            Err(e) => Err(self.refused("HostloLeave", e)),
        }
    }

    /// `HostloPublish`: returns the conflicts the part is in.
    ///
    /// # Errors
    /// [`ClientError::AgentRefused`], [`ClientError::AgentUnavailable`].
    pub async fn hostlo_publish(
        &self,
        pod: &str,
        part: u32,
        ports: &[Port],
    ) -> Result<Vec<Conflict>, ClientError> {
        let req = pb::HostloPublishRequest {
            pod: pod.into(),
            part,
            ports: ports
                .iter()
                .map(|p| pb::HostloPort {
                    port: u32::from(p.port),
                    protocol: p.proto.as_str().into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let r = self
            .client
            .hostlo_publish(self.ctx(), &req)
            .await
            .map_err(|e| self.refused("HostloPublish", e))?;
        Ok(conflicts_of(&r.conflicts))
    }

    /// `HostloWatch`, waiting up to `wait` for a version past `since`.
    ///
    /// # Errors
    /// [`ClientError::AgentRefused`], [`ClientError::AgentUnavailable`].
    pub async fn hostlo_watch(
        &self,
        pod: &str,
        since: u64,
        wait: Duration,
    ) -> Result<PodView, ClientError> {
        let req = pb::HostloWatchRequest {
            pod: pod.into(),
            since_version: since,
            timeout_ms: wait.as_millis() as u32,
            ..Default::default()
        };
        let ctx = ttrpc::context::with_timeout((wait + self.request_timeout).as_nanos() as i64);
        self.client
            .hostlo_watch(ctx, &req)
            .await
            .map(|v| PodView::from(&v))
            .map_err(|e| self.refused("HostloWatch", e))
    }

    /// `Health`.
    ///
    /// # Errors
    /// [`ClientError::AgentRefused`], [`ClientError::AgentUnavailable`].
    pub async fn health(&self) -> Result<(), ClientError> {
        self.client
            .health(self.ctx(), &pb::HealthRequest::default())
            .await
            .map(drop)
            .map_err(|e| self.refused("Health", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic() -> pb::Nic {
        pb::Nic {
            id: "0000000001".into(),
            mac: "52:54:00:00:00:01".into(),
            mtu: 1500,
            addresses: vec![pb::IpConfig {
                address: "10.0.0.5".into(),
                prefix_len: 24,
                gateway: "10.0.0.1".into(),
                ..Default::default()
            }],
            routes: vec![pb::Route {
                destination: "0.0.0.0/0".into(),
                gateway: "10.0.0.1".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn nic_from_reply() {
        let n = Nic::try_from(nic()).unwrap();
        assert_eq!(
            n.addresses,
            vec![NicAddress {
                ip: "10.0.0.5".parse().unwrap(),
                prefix_len: 24,
                gateway: Some("10.0.0.1".parse().unwrap()),
            }]
        );
        assert_eq!(
            n.routes,
            vec![NicRoute {
                destination: "0.0.0.0".parse().unwrap(),
                prefix_len: 0,
                gateway: Some("10.0.0.1".parse().unwrap()),
            }]
        );
        assert_eq!(n.cidrs(), vec!["10.0.0.5/24"]);
        assert_eq!(n.mac.to_string(), "52:54:00:00:00:01");
        let mut bad = nic();
        bad.addresses[0].prefix_len = 40;
        assert!(Nic::try_from(bad)
            .unwrap_err()
            .to_string()
            .contains("prefix /40"));
        let mut bad = nic();
        bad.mac = "nope".into();
        assert!(matches!(
            Nic::try_from(bad),
            Err(ClientError::BadNic { id, .. }) if id == "0000000001"
        ));
        let mut bad = nic();
        bad.mtu = 20;
        assert!(Nic::try_from(bad)
            .unwrap_err()
            .to_string()
            .contains("MTU 20"));
        let mut bad = nic();
        bad.routes[0].destination = "default".into();
        assert!(Nic::try_from(bad).is_err());
    }

    #[test]
    fn errors_carry_codes() {
        let refused = ClientError::AgentRefused {
            op: "AttachNic",
            code: ttrpc::Code::RESOURCE_EXHAUSTED,
            message: "VM vm1 has 4 NICs (max_nics = 4)".into(),
        };
        assert_eq!(refused.code(), ttrpc::Code::RESOURCE_EXHAUSTED);
        assert_eq!(
            refused.to_string(),
            "host agent refused AttachNic: RESOURCE_EXHAUSTED: VM vm1 has 4 NICs (max_nics = 4)"
        );
        let unreachable = ClientError::AgentUnavailable {
            address: "vsock://2:7070".into(),
            reason: "refused".into(),
        };
        assert_eq!(unreachable.code(), ttrpc::Code::UNAVAILABLE);
        assert_eq!(
            ClientError::BadReply("no NIC".into()).code(),
            ttrpc::Code::INTERNAL
        );
    }

    #[test]
    fn pod_view_keeps_what_can_be_relayed() {
        let port = |port: u32, protocol: &str| pb::HostloPort {
            port,
            protocol: protocol.into(),
            ..Default::default()
        };
        let v = pb::HostloWatchResponse {
            version: 7,
            parts: vec![
                pb::HostloPart {
                    part: 1,
                    address: "169.254.77.2".into(),
                    ports: vec![port(80, "tcp"), port(70000, "tcp"), port(53, "sctp")],
                    ..Default::default()
                },
                pb::HostloPart {
                    part: 2,
                    address: "".into(),
                    ..Default::default()
                },
            ],
            conflicts: vec![
                pb::HostloConflict {
                    port: Some(port(5432, "tcp")).into(),
                    parts: vec![1, 2],
                    ..Default::default()
                },
                pb::HostloConflict::default(),
            ],
            pod_ip: "10.0.0.5".into(),
            ..Default::default()
        };
        let view = PodView::from(&v);
        assert_eq!(view.version, 7);
        assert_eq!(
            view.parts,
            vec![PartView {
                part: 1,
                address: "169.254.77.2".parse().unwrap(),
                ports: vec![Port::tcp(80)],
            }]
        );
        assert_eq!(
            view.conflicts,
            vec![Conflict {
                port: Port::tcp(5432),
                parts: vec![1, 2]
            }]
        );
        assert_eq!(view.pod_ip, Some("10.0.0.5".parse().unwrap()));
        assert_eq!(
            PodView::from(&pb::HostloWatchResponse::default()).pod_ip,
            None
        );
    }
}
