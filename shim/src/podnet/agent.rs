//! The agent-backed pod network: ask the host agent for a NIC, then plug it
//! into the pod (see [`super::guest`]).
//!
//! ```text
//! shim                         host agent (vsock / unix)        VM kernel
//!  AttachNic(sandbox) ───────────▶ lease, tap, device_add ──────▶ ACPI hot-plug
//!  ◀─────────── Nic{mac, addresses, routes, mtu}
//!  wait for link with mac ◀──────────────────────────────────────── new ethN
//!  move into pod netns, name, addresses, routes, up
//! ```
//!
//! Attach is idempotent on the agent side (same sandbox, same NIC): a retry
//! after a lost reply, or a sandbox whose NIC `nestless-cni` already plugged,
//! gets the same NIC, which is then found already in place. A failed setup
//! detaches the NIC again, so that nothing is left leased.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use nestless_protos::{agent as pb, agent_ttrpc::NetAgentClient};

use super::{
    guest::{self, GuestNetError, NicSpec},
    PodNetError, PodNetInfo, PodNetRequest, PodNetwork,
};
use crate::config::{AgentAddress, AgentEndpoint, PodNetConfig};

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
    cfg: AgentEndpoint,
}

impl AgentClient {
    /// Connects, retrying until `connect_timeout` (the agent may be restarting).
    pub async fn connect(cfg: &AgentEndpoint) -> Result<AgentClient, PodNetError> {
        let address = ttrpc_address(&cfg.address);
        let start = Instant::now();
        loop {
            let left = cfg.connect_timeout.saturating_sub(start.elapsed());
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
                        request_timeout: cfg.request_timeout,
                        cfg: cfg.clone(),
                    })
                }
                Ok(Err(e)) if start.elapsed() >= cfg.connect_timeout => {
                    return Err(PodNetError::AgentUnavailable {
                        address,
                        reason: e.to_string(),
                    })
                }
                Ok(Err(_)) => {}
                Err(_) => {
                    return Err(PodNetError::AgentUnavailable {
                        address,
                        reason: format!("no connection within {:?}", cfg.connect_timeout),
                    })
                }
            }
            if start.elapsed() >= cfg.connect_timeout {
                return Err(PodNetError::AgentUnavailable {
                    address,
                    reason: format!("no connection within {:?}", cfg.connect_timeout),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn ctx(&self) -> ttrpc::context::Context {
        ttrpc::context::with_timeout(self.request_timeout.as_nanos() as i64)
    }

    fn refused(&self, op: &'static str, e: ttrpc::Error) -> PodNetError {
        match e {
            ttrpc::Error::RpcStatus(s) => PodNetError::AgentRefused {
                op,
                code: format!("{:?}", s.code()),
                message: s.message().to_string(),
            },
            other => PodNetError::AgentUnavailable {
                address: self.address.clone(),
                reason: format!("{op}: {other}"),
            },
        }
    }

    /// `AttachNic`. When the connection breaks under the request (the agent
    /// restarting), connects again and asks once more: the agent answers the
    /// same sandbox with the same NIC, so the retry cannot make a second one.
    pub async fn attach(
        &self,
        sandbox_id: &str,
        labels: &HashMap<String, String>,
    ) -> Result<pb::Nic, PodNetError> {
        let req = pb::AttachNicRequest {
            sandbox_id: sandbox_id.into(),
            labels: labels.clone(),
            ..Default::default()
        };
        let resp = match self.client.attach_nic(self.ctx(), &req).await {
            Err(e) if is_transport(&e) => {
                log::warn!("sandbox {sandbox_id}: AttachNic: {e}; asking again");
                let again = AgentClient::connect(&self.cfg).await?;
                again.client.attach_nic(again.ctx(), &req).await
            }
            other => other,
        }
        .map_err(|e| self.refused("AttachNic", e))?;
        resp.nic
            .into_option()
            .ok_or(PodNetError::BadReply("AttachNic returned no NIC".into()))
    }

    /// `DetachNic` by sandbox; a NIC already gone is success. Asked once more
    /// on a new connection when the connection breaks under the request.
    pub async fn detach(&self, sandbox_id: &str) -> Result<(), PodNetError> {
        let req = pb::DetachNicRequest {
            sandbox_id: sandbox_id.into(),
            ..Default::default()
        };
        let result = match self.client.detach_nic(self.ctx(), &req).await {
            Err(e) if is_transport(&e) => {
                log::warn!("sandbox {sandbox_id}: DetachNic: {e}; asking again");
                let again = AgentClient::connect(&self.cfg).await?;
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

    /// `ListNics`.
    pub async fn list(&self) -> Result<Vec<pb::Nic>, PodNetError> {
        let r = self
            .client
            .list_nics(self.ctx(), &pb::ListNicsRequest::default())
            .await
            .map_err(|e| self.refused("ListNics", e))?;
        Ok(r.nics)
    }

    /// `HostloJoin`: the segment NIC and the pod's view.
    pub async fn hostlo_join(
        &self,
        pod: &str,
        part: u32,
        sandbox_id: &str,
    ) -> Result<(pb::Nic, pb::HostloWatchResponse), PodNetError> {
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
            .ok_or(PodNetError::BadReply("HostloJoin returned no NIC".into()))?;
        Ok((nic, r.pod.into_option().unwrap_or_default()))
    }

    /// `HostloLeave`; a part already gone is success.
    pub async fn hostlo_leave(&self, pod: &str, part: u32) -> Result<(), PodNetError> {
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
    pub async fn hostlo_publish(
        &self,
        pod: &str,
        part: u32,
        ports: Vec<pb::HostloPort>,
    ) -> Result<Vec<pb::HostloConflict>, PodNetError> {
        let req = pb::HostloPublishRequest {
            pod: pod.into(),
            part,
            ports,
            ..Default::default()
        };
        let r = self
            .client
            .hostlo_publish(self.ctx(), &req)
            .await
            .map_err(|e| self.refused("HostloPublish", e))?;
        Ok(r.conflicts)
    }

    /// `HostloWatch`, waiting up to `wait` for a version past `since`.
    pub async fn hostlo_watch(
        &self,
        pod: &str,
        since: u64,
        wait: Duration,
    ) -> Result<pb::HostloWatchResponse, PodNetError> {
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
            .map_err(|e| self.refused("HostloWatch", e))
    }

    /// `Health`.
    pub async fn health(&self) -> Result<pb::HealthResponse, PodNetError> {
        self.client
            .health(self.ctx(), &pb::HealthRequest::default())
            .await
            .map_err(|e| self.refused("Health", e))
    }
}

fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (a, p) = s.split_once('/')?;
    Some((a.parse().ok()?, p.parse().ok()?))
}

/// What the guest must configure for `nic`, named `ifname`.
pub fn nic_spec(nic: &pb::Nic, ifname: &str) -> Result<NicSpec, PodNetError> {
    let bad = |what: String| PodNetError::BadReply(format!("NIC {}: {what}", nic.id));
    let mac = nic
        .mac
        .parse::<nestless_model::MacAddr>()
        .map_err(|e| bad(e.to_string()))?
        .0;
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
        addresses.push((ip, a.prefix_len as u8));
    }
    let mut routes = Vec::new();
    for r in &nic.routes {
        let (dst, prefix) =
            parse_cidr(&r.destination).ok_or_else(|| bad(format!("route {:?}", r.destination)))?;
        let via = if r.gateway.is_empty() {
            None
        } else {
            Some(
                r.gateway
                    .parse::<IpAddr>()
                    .map_err(|_| bad(format!("gateway {:?}", r.gateway)))?,
            )
        };
        routes.push((dst, prefix, via));
    }
    if !(68..=65535).contains(&nic.mtu) {
        return Err(bad(format!("MTU {}", nic.mtu)));
    }
    Ok(NicSpec {
        mac,
        ifname: ifname.to_string(),
        mtu: nic.mtu,
        addresses,
        routes,
    })
}

/// Puts the NIC described by `spec` into the namespace at `netns`,
/// configured. If it is already there and configured, does nothing.
pub async fn plug_into_pod(
    spec: &NicSpec,
    netns: &Path,
    wait: Duration,
) -> Result<(), GuestNetError> {
    let s = spec.clone();
    let already = {
        let netns = netns.to_path_buf();
        tokio::task::spawn_blocking(move || {
            guest::in_netns(&netns, move |h| async move {
                guest::check_configured(&h, &s).await
            })
        })
        .await
        .expect("netns worker")?
    };
    if already {
        return Ok(());
    }
    // In the pod namespace already (an earlier attempt stopped half-way)?
    let s = spec.clone();
    let in_pod = {
        let netns = netns.to_path_buf();
        tokio::task::spawn_blocking(move || {
            guest::in_netns(&netns, move |h| async move {
                Ok(guest::wait_for_mac_in(&h, &s.mac).await?.is_some())
            })
        })
        .await
        .expect("netns worker")?
    };
    if !in_pod {
        let (index, name) = guest::wait_for_mac(&spec.mac, wait).await?;
        guest::move_to_netns(index, &name, netns).await?;
    }
    let s = spec.clone();
    let netns = netns.to_path_buf();
    tokio::task::spawn_blocking(move || {
        guest::in_netns(
            &netns,
            move |h| async move { guest::configure(&h, &s).await },
        )
    })
    .await
    .expect("netns worker")
}

/// [`PodNetwork`] through the host agent.
///
/// A sandbox annotated as part of a Hostlo pod (see [`crate::hostlo`]) also
/// joins that pod after its own NIC is configured, and leaves it first on
/// teardown.
pub struct AgentNetwork {
    agent: AgentEndpoint,
    network: PodNetConfig,
    parts: tokio::sync::Mutex<HashMap<String, crate::hostlo::part::Part>>,
}

impl AgentNetwork {
    /// A pod network using the agent at `agent` and the guest settings `network`.
    pub fn new(agent: AgentEndpoint, network: PodNetConfig) -> AgentNetwork {
        AgentNetwork {
            agent,
            network,
            parts: Default::default(),
        }
    }
}

#[async_trait::async_trait]
impl PodNetwork for AgentNetwork {
    async fn setup(&self, req: &PodNetRequest) -> Result<PodNetInfo, PodNetError> {
        let hostlo = crate::hostlo::spec_from_annotations(&req.labels)
            .map_err(|e| PodNetError::BadReply(e.to_string()))?;
        let client = AgentClient::connect(&self.agent).await?;
        // The agent keeps short labels; the Hostlo port list is for the part.
        let labels: HashMap<String, String> = req
            .labels
            .iter()
            .filter(|(k, _)| k.as_str() != crate::hostlo::PORTS_ANNOTATION)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let nic = client.attach(&req.sandbox_id, &labels).await?;
        let ifname = self.network.interface.as_str().to_string();
        let result = async {
            let spec = nic_spec(&nic, &ifname)?;
            plug_into_pod(&spec, &req.netns, self.network.nic_wait).await?;
            Ok::<_, PodNetError>(())
        }
        .await;
        if let Err(e) = result {
            // Leave nothing leased behind a failed sandbox.
            if let Err(undo) = client.detach(&req.sandbox_id).await {
                log::error!(
                    "sandbox {}: releasing NIC {} after a failed setup failed: {undo}",
                    req.sandbox_id,
                    nic.id
                );
            }
            return Err(e);
        }
        if let Some(spec) = hostlo {
            match crate::hostlo::part::join(
                &self.agent,
                self.network.nic_wait,
                &spec,
                &req.sandbox_id,
                &req.netns,
            )
            .await
            {
                Ok(part) => {
                    self.parts.lock().await.insert(req.sandbox_id.clone(), part);
                }
                Err(e) => {
                    if let Err(undo) = client.detach(&req.sandbox_id).await {
                        log::error!("sandbox {}: releasing NIC {} after a failed Hostlo join failed: {undo}", req.sandbox_id, nic.id);
                    }
                    return Err(PodNetError::Hostlo(e.to_string()));
                }
            }
        }
        log::info!(
            "sandbox {}: NIC {} ({}) configured as {ifname} in {}",
            req.sandbox_id,
            nic.mac,
            nic.addresses
                .iter()
                .map(|a| format!("{}/{}", a.address, a.prefix_len))
                .collect::<Vec<_>>()
                .join(","),
            req.netns.display()
        );
        Ok(PodNetInfo {
            interface: ifname,
            mac: nic.mac.clone(),
            addresses: nic
                .addresses
                .iter()
                .map(|a| format!("{}/{}", a.address, a.prefix_len))
                .collect(),
        })
    }

    async fn teardown(&self, sandbox_id: &str) -> Result<(), PodNetError> {
        if let Some(part) = self.parts.lock().await.remove(sandbox_id) {
            part.stop().await;
        }
        let client = AgentClient::connect(&self.agent).await?;
        client.detach(sandbox_id).await?;
        log::info!("sandbox {sandbox_id}: NIC released");
        Ok(())
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
    fn spec_from_nic() {
        let s = nic_spec(&nic(), "eth0").unwrap();
        assert_eq!(s.addresses, vec![("10.0.0.5".parse().unwrap(), 24)]);
        assert_eq!(
            s.routes,
            vec![(
                "0.0.0.0".parse().unwrap(),
                0,
                Some("10.0.0.1".parse().unwrap())
            )]
        );
        let mut bad = nic();
        bad.addresses[0].prefix_len = 40;
        assert!(nic_spec(&bad, "eth0")
            .unwrap_err()
            .to_string()
            .contains("prefix /40"));
        let mut bad = nic();
        bad.mac = "nope".into();
        assert!(nic_spec(&bad, "eth0").is_err());
    }
}
