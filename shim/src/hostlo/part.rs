//! One part of a Hostlo pod, running inside the shim of its sandbox.
//!
//! ```text
//! join:  HostloJoin ─▶ segment NIC ─▶ hostlo0 in the pod netns
//!        mux (TCP+UDP) on <segment address>:7071
//! loop:  every second  discover served ports ─▶ HostloPublish when changed
//!        watcher task  HostloWatch (long poll) ─▶ new view ─▶ re-plan relays:
//!                      for each port of another part (not in conflict):
//!                      relay on 127.0.0.1:P and [::1]:P (part 0: + the pod's
//!                      IPv4 and IPv6 addresses) ─▶ that part's mux
//!
//! IPv6: the segment between the parts is IPv4 (169.254.77.0/24), which
//! carries the relayed connections whatever their family; localhost is both
//! 127.0.0.1 and ::1 in every part, and the mux delivers to the address the
//! service listens on (::1 for a service bound to ::1 or to ::).
//! stop:  relays end, HostloLeave
//! ```

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::Arc,
    time::Duration,
};

use tokio::{sync::mpsc, task::JoinHandle};

use super::{
    discover::{self, Listening},
    relay::{self, Targets},
    sockets::NetnsSockets,
    HostloError, HostloSpec, Port, Proto, MUX_PORT, SEGMENT_IFNAME,
};
use crate::{
    agent_client::{AgentClient, ClientError, PodView},
    config::AgentEndpoint,
    podnet::guest::{plug_into_pod, NicSpec},
};

/// A running part. Stop it with [`Part::stop`].
pub struct Part {
    /// The part's segment address.
    pub address: Ipv4Addr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Part {
    /// Stops the relays and leaves the pod (the agent unplugs the segment NIC).
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Part {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// Joins the pod and starts the part's relays.
///
/// `pod_ips` are the addresses of the sandbox's own NIC: part 0's relays
/// listen on them too (the pod's addresses toward the network, IPv4 and IPv6).
pub async fn join(
    agent: &AgentEndpoint,
    nic_wait: Duration,
    spec: &HostloSpec,
    sandbox_id: &str,
    netns: &Path,
    pod_ips: &[IpAddr],
) -> Result<Part, HostloError> {
    let client = AgentClient::connect(agent).await?;
    let (nic, view) = match client.hostlo_join(&spec.pod, spec.part, sandbox_id).await {
        Ok(joined) => joined,
        // A segment NIC the part cannot use: the part has joined all the same.
        Err(e @ ClientError::BadNic { .. }) => {
            leave_after_failure(&client, spec).await;
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    let attempt = async {
        let nspec = NicSpec::for_nic(&nic, SEGMENT_IFNAME);
        plug_into_pod(&nspec, netns, nic_wait, false).await?;
        let address = match nspec.addresses.first() {
            Some((IpAddr::V4(a), _)) => *a,
            _ => {
                return Err(HostloError::Agent(ClientError::BadNic {
                    id: nic.id.clone(),
                    reason: "segment NIC without an IPv4 address".into(),
                    created: true,
                }))
            }
        };
        let sockets =
            Arc::new(
                NetnsSockets::open(netns).map_err(|source| HostloError::Socket {
                    op: format!("enter {}", netns.display()),
                    source,
                })?,
            );
        let mux = SocketAddr::new(IpAddr::V4(address), MUX_PORT);
        let tcp = sockets
            .tcp_listener(mux)
            .await
            .map_err(|source| HostloError::Socket {
                op: format!("listen on {mux}/tcp"),
                source,
            })?;
        let udp = sockets
            .udp_bind(mux)
            .await
            .map_err(|source| HostloError::Socket {
                op: format!("bind {mux}/udp"),
                source,
            })?;
        Ok((address, sockets, tcp, udp))
    }
    .await;
    let (address, sockets, tcp, udp) = match attempt {
        Ok(x) => x,
        Err(e) => {
            leave_after_failure(&client, spec).await;
            return Err(e);
        }
    };
    let targets: Targets = Arc::default();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let run = Runner {
        agent: agent.clone(),
        spec: spec.clone(),
        segment: IpAddr::V4(address),
        pod_ips: pod_ips.to_vec(),
        sockets,
        targets,
        relays: HashMap::new(),
        published: None,
    };
    log::info!(
        "hostlo {}: part {} joined, segment address {address}",
        spec.pod,
        spec.part
    );
    let task = tokio::spawn(run.run(client, view, tcp, udp, stop_rx));
    Ok(Part {
        address,
        stop: Some(stop_tx),
        task: Some(task),
    })
}

/// Leaves the pod after a join that failed half-way (logged, not returned).
async fn leave_after_failure(client: &AgentClient, spec: &HostloSpec) {
    if let Err(undo) = client.hostlo_leave(&spec.pod, spec.part).await {
        log::error!(
            "hostlo {}: leaving after a failed join failed: {undo}",
            spec.pod
        );
    }
}

struct Runner {
    agent: AgentEndpoint,
    spec: HostloSpec,
    segment: IpAddr,
    /// The addresses of the sandbox's own NIC (part 0 listens there too).
    pod_ips: Vec<IpAddr>,
    sockets: Arc<NetnsSockets>,
    targets: Targets,
    /// (port, listen address) -> relay task.
    relays: HashMap<(Port, IpAddr), JoinHandle<()>>,
    published: Option<Vec<Port>>,
}

impl Runner {
    async fn run(
        mut self,
        client: AgentClient,
        first: PodView,
        tcp: tokio::net::TcpListener,
        udp: tokio::net::UdpSocket,
        mut stop: tokio::sync::oneshot::Receiver<()>,
    ) {
        let muxes = [
            tokio::spawn(relay::tcp_mux(
                tcp,
                self.targets.clone(),
                self.sockets.clone(),
            )),
            tokio::spawn(relay::udp_mux(
                udp,
                self.targets.clone(),
                self.sockets.clone(),
            )),
        ];
        let (views_tx, mut views) = mpsc::channel(4);
        let watcher = tokio::spawn(watch(
            self.agent.clone(),
            self.spec.pod.clone(),
            first.version,
            views_tx,
        ));
        self.apply(&first).await;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = tick.tick() => self.publish(&client).await,
                Some(v) = views.recv() => self.apply(&v).await,
            }
        }
        watcher.abort();
        for m in muxes {
            m.abort();
        }
        for (_, r) in self.relays.drain() {
            r.abort();
        }
        match client.hostlo_leave(&self.spec.pod, self.spec.part).await {
            Ok(()) => log::info!("hostlo {}: part {} left", self.spec.pod, self.spec.part),
            Err(e) => log::warn!("hostlo {}: leave failed: {e}", self.spec.pod),
        }
    }

    async fn discover(&self) -> Vec<Listening> {
        let mut found = Vec::new();
        for (file, proto) in [
            ("tcp", Proto::Tcp),
            ("tcp6", Proto::Tcp),
            ("udp", Proto::Udp),
            ("udp6", Proto::Udp),
        ] {
            match self.sockets.proc_net(file).await {
                Ok(t) => found.extend(discover::parse_table(&t, proto)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => log::debug!("hostlo: cannot read {file}: {e}"),
            }
        }
        found
    }

    async fn publish(&mut self, client: &AgentClient) {
        let found = self.discover().await;
        let relayed: Vec<Port> = self.relays.keys().map(|(p, _)| *p).collect();
        let mut ports: BTreeSet<Port> = discover::served(&found, self.segment, &relayed)
            .into_iter()
            .collect();
        ports.extend(self.spec.declared.iter().copied());
        {
            let mut t = self.targets.lock().expect("targets lock");
            t.clear();
            for l in &found {
                let p = Port {
                    port: l.port,
                    proto: l.proto,
                };
                if l.addr != self.segment && !relayed.contains(&p) {
                    t.entry(p).or_insert(deliver_to(l.addr));
                }
            }
        }
        let ports: Vec<Port> = ports.into_iter().collect();
        if self.published.as_ref() == Some(&ports) {
            return;
        }
        match client
            .hostlo_publish(&self.spec.pod, self.spec.part, &ports)
            .await
        {
            Ok(conflicts) => {
                for c in conflicts {
                    log::warn!(
                        "hostlo {}: port {} is served by parts {}: conflict, not relayed",
                        self.spec.pod,
                        c.port,
                        c.parts
                            .iter()
                            .map(u32::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                log::info!(
                    "hostlo {}: part {} serves {}",
                    self.spec.pod,
                    self.spec.part,
                    ports
                        .iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                );
                self.published = Some(ports);
            }
            Err(e) => log::warn!("hostlo {}: publish failed: {e}", self.spec.pod),
        }
    }

    async fn apply(&mut self, view: &PodView) {
        let conflicts: BTreeSet<Port> = view.conflicts.iter().map(|c| c.port).collect();
        // Part 0 holds the pod IP (its eth0): its relays also listen there, so
        // that the network outside and the other parts (which reach the pod
        // IP over the tenant network) get to ports any part serves.
        let mut listen: Vec<IpAddr> = vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ];
        if self.spec.part == 0 {
            listen.extend(view.pod_ip);
            listen.extend(self.pod_ips.iter().filter(|a| a.is_ipv6()));
        }
        let mut wanted: HashMap<(Port, IpAddr), SocketAddr> = HashMap::new();
        for part in &view.parts {
            if part.part == self.spec.part {
                continue;
            }
            for port in &part.ports {
                if conflicts.contains(port) {
                    continue;
                }
                for l in &listen {
                    wanted.insert((*port, *l), SocketAddr::new(part.address, MUX_PORT));
                }
            }
        }
        self.relays.retain(|k, task| {
            let keep = wanted.contains_key(k) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for ((port, listen_addr), mux) in wanted {
            if self.relays.contains_key(&(port, listen_addr)) {
                continue;
            }
            let at = SocketAddr::new(listen_addr, port.port);
            let refused = |e: std::io::Error| {
                // A pod without IPv6 has no ::1: nothing to relay there.
                if listen_addr.is_ipv6() && e.kind() == std::io::ErrorKind::AddrNotAvailable {
                    log::debug!("hostlo {}: no relay of {port} on {at}: {e}", self.spec.pod);
                } else {
                    log::warn!("hostlo {}: cannot relay {port} on {at}: {e}", self.spec.pod);
                }
            };
            let task = match port.proto {
                Proto::Tcp => match self.sockets.tcp_listener(at).await {
                    Ok(l) => {
                        tokio::spawn(relay::tcp_egress(l, port.port, mux, self.sockets.clone()))
                    }
                    Err(e) => {
                        refused(e);
                        continue;
                    }
                },
                Proto::Udp => match self.sockets.udp_bind(at).await {
                    Ok(s) => {
                        tokio::spawn(relay::udp_egress(s, port.port, mux, self.sockets.clone()))
                    }
                    Err(e) => {
                        refused(e);
                        continue;
                    }
                },
            };
            log::debug!("hostlo {}: relay {port} on {at} -> {mux}", self.spec.pod);
            self.relays.insert((port, listen_addr), task);
        }
    }
}

/// Where the mux delivers a connection for a service listening on `addr`:
/// an address of its own as it is; loopback or "any" as the loopback of the
/// same family (a service on `::` also takes `::1`, whether or not it takes
/// IPv4 too).
fn deliver_to(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(a) if a.is_loopback() || a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(a) if a.is_loopback() || a.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    }
}

/// Long-polls the pod's view and sends each new one; reconnects when the
/// agent goes away (it restarts with the pod's state).
async fn watch(agent: AgentEndpoint, pod: String, mut since: u64, out: mpsc::Sender<PodView>) {
    loop {
        let client = match AgentClient::connect(&agent).await {
            Ok(c) => c,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        loop {
            match client
                .hostlo_watch(&pod, since, Duration::from_secs(25))
                .await
            {
                Ok(v) if v.version > since => {
                    since = v.version;
                    if out.send(v).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    log::debug!("hostlo {pod}: watch: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_are_reached_at_the_loopback_of_their_family() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(deliver_to(ip("127.0.0.1")), ip("127.0.0.1"));
        assert_eq!(deliver_to(ip("0.0.0.0")), ip("127.0.0.1"));
        assert_eq!(deliver_to(ip("::1")), ip("::1"));
        assert_eq!(deliver_to(ip("::")), ip("::1"));
        assert_eq!(deliver_to(ip("10.0.0.5")), ip("10.0.0.5"));
        assert_eq!(deliver_to(ip("fd00::5")), ip("fd00::5"));
    }
}
