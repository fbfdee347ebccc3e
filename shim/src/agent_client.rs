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
//!  AttachNic(sandbox, labels) ───────────────▶ lease, tap, device_add
//!   ◀── Nic{id, mac, addresses, routes, mtu}   (checked here into a Nic)
//!   connection broke under the request? dial again, ask once more
//!  DetachNic(sandbox) ───────────────────────▶ unplug; NOT_FOUND = done
//!  HostloJoin / Publish / Watch / Leave ─────▶ the pod's view (a PodView)
//! ```
//!
//! Attach and detach are idempotent per sandbox on the agent's side, which is
//! what makes the one retry after a broken connection safe.

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
    /// The agent handed out a NIC whose description cannot be used (the NIC
    /// is leased all the same: callers give it back).
    #[error("unusable reply from the host agent: NIC {id}: {reason}")]
    BadNic {
        /// The NIC's id.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl ClientError {
    /// The ttrpc status code that says what failed: the agent's own code for
    /// a refusal, `UNAVAILABLE` when it cannot be reached, `INTERNAL` for a
    /// reply the shim cannot use.
    pub fn code(&self) -> ttrpc::Code {
        match self {
            Self::AgentRefused { code, .. } => *code,
            Self::AgentUnavailable { .. } => ttrpc::Code::UNAVAILABLE,
            Self::BadReply(_) | Self::BadNic { .. } => ttrpc::Code::INTERNAL,
        }
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
                .ok_or_else(|| bad(format!("route {:?}", r.destination)))?;
            let gateway =
                optional_ip(&r.gateway).map_err(|()| bad(format!("gateway {:?}", r.gateway)))?;
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
            id: nic.id,
            sandbox_id: nic.sandbox_id,
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
    /// The sandbox it belongs to.
    pub sandbox_id: String,
    /// The checked NIC.
    pub nic: Result<Nic, ClientError>,
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
    /// same sandbox with the same NIC, so the retry cannot make a second one.
    ///
    /// # Errors
    /// [`ClientError::AgentRefused`] with the agent's code,
    /// [`ClientError::AgentUnavailable`], [`ClientError::BadReply`] when the
    /// reply holds no NIC, and [`ClientError::BadNic`] when the NIC it holds
    /// cannot be used (the NIC is attached then: the caller detaches it).
    pub async fn attach(
        &self,
        sandbox_id: &str,
        labels: &HashMap<String, String>,
    ) -> Result<Nic, ClientError> {
        let req = pb::AttachNicRequest {
            sandbox_id: sandbox_id.into(),
            labels: labels.clone(),
            ..Default::default()
        };
        let resp = match self.client.attach_nic(self.ctx(), &req).await {
            Err(e) if is_transport(&e) => {
                log::warn!("sandbox {sandbox_id}: AttachNic: {e}; asking again");
                let again = AgentClient::connect(&self.endpoint).await?;
                again.client.attach_nic(again.ctx(), &req).await
            }
            other => other,
        }
        .map_err(|e| self.refused("AttachNic", e))?;
        resp.nic
            .into_option()
            .ok_or(ClientError::BadReply("AttachNic returned no NIC".into()))?
            .try_into()
    }

    /// `DetachNic` by sandbox; a NIC already gone is success. Asked once more
    /// on a new connection when the connection breaks under the request.
    ///
    /// # Errors
    /// [`ClientError::AgentRefused`] (other than `NOT_FOUND`), [`ClientError::AgentUnavailable`].
    pub async fn detach(&self, sandbox_id: &str) -> Result<(), ClientError> {
        let req = pb::DetachNicRequest {
            sandbox_id: sandbox_id.into(),
            ..Default::default()
        };
        let result = match self.client.detach_nic(self.ctx(), &req).await {
            Err(e) if is_transport(&e) => {
                log::warn!("sandbox {sandbox_id}: DetachNic: {e}; asking again");
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

    /// `ListNics`: the calling VM's NICs.
    ///
    /// # Errors
    /// [`ClientError::AgentRefused`], [`ClientError::AgentUnavailable`].
    pub async fn list(&self) -> Result<Vec<ListedNic>, ClientError> {
        let r = self
            .client
            .list_nics(self.ctx(), &pb::ListNicsRequest::default())
            .await
            .map_err(|e| self.refused("ListNics", e))?;
        Ok(r.nics
            .into_iter()
            .map(|n| ListedNic {
                id: n.id.clone(),
                sandbox_id: n.sandbox_id.clone(),
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
