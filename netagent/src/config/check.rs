//! The rules between values, once each value is typed ([`super::raw`]): a
//! gateway inside its subnet, a range in order that holds an address to
//! lease, subnets of host addresses, IPv6 large enough to mirror the IPv4
//! range (and an MTU that IPv6 takes), routes that `ip route add` takes
//! (gateway on the link and of the destination's family, no host bits, no
//! duplicate) with a gateway that is a router's address, no overlapping subnets, names, CIDs or
//! sockets used twice, a VM's backend keys matching its `backend`, a VM
//! reachable somehow, a warm pool within the quota, the Hostlo subnet apart
//! from every network. And what cannot work once running (issue 11, item
//! 9): a relative `state_dir`, admin socket or VM socket (resolved against
//! the working directory: two agents would share, and sweep, one state);
//! a VM socket that is the admin socket, another VM's socket or a QMP
//! socket; two VMs on one `qmp_socket` or one `netns` (two tenants driving
//! one VM); a bridge named like the links the agent makes and sweeps
//! (`nlh`, `nlg`, `nls`); a control character in a path. Each error names
//! the file and the key.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use nestless_model::hostlo::DEFAULT_SEGMENT_SUBNET;

use crate::names::AGENT_LINK_PREFIXES;

use super::{
    mirror6,
    raw::{
        has_control, registered_key, segment_subnet_rule, vm_from_spec, BackendKind, RawConfig,
        RawHostlo, RawNetwork, RawVm,
    },
    reserved6, AgentSettings, BackendConfig, Config, ConfigError, ConfigWarning, HostloConfig,
    NetworkConfig, RouteConfig, VmConfig, VmSpec, BRIDGE_MAX_PORTS, IPV6_MIN_MTU,
};

/// The IPv4 address of `net`'s subnet whose IPv6 mirror in `s6` is `a`.
fn mirrored4(net: &NetworkConfig, s6: Ipv6Net, a: std::net::Ipv6Addr) -> Option<Ipv4Addr> {
    let offset = u128::from(a).checked_sub(u128::from(s6.network()))?;
    let v4 = u32::from(net.subnet.network()).checked_add(u32::try_from(offset).ok()?)?;
    let v4 = Ipv4Addr::from(v4);
    net.subnet.contains(&v4).then_some(v4)
}

/// Why the IPv4 network `net` holds no host addresses, or `None`: "this
/// network" (0/8), loopback (127/8), multicast (224/4), reserved (240/4).
fn not_unicast4(net: Ipv4Net) -> Option<&'static str> {
    [
        ("0.0.0.0/8", "in 0.0.0.0/8 (\"this network\")"),
        ("127.0.0.0/8", "loopback"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved (240.0.0.0/4)"),
    ]
    .into_iter()
    .find_map(|(block, why)| {
        let block: Ipv4Net = block.parse().ok()?;
        (block.contains(&net.network()) || net.contains(&block.network())).then_some(why)
    })
}

/// Why the IPv6 network `net` holds no host addresses, or `None`: one that
/// meets ::/96 (the unspecified and loopback addresses), IPv4-mapped
/// addresses (::ffff:0:0/96) or multicast (ff00::/8).
fn not_unicast6(net: Ipv6Net) -> Option<&'static str> {
    [
        ("::/96", "in ::/96 (the unspecified and loopback addresses)"),
        ("::ffff:0:0/96", "IPv4-mapped"),
        ("ff00::/8", "multicast"),
    ]
    .into_iter()
    .find_map(|(block, why)| {
        let block: Ipv6Net = block.parse().ok()?;
        (block.contains(&net.network()) || net.contains(&block.network())).then_some(why)
    })
}

/// The checked configuration of `raw`, read from `path`, with the VMs
/// `registered` at run time (kept in `store`) after the file's.
pub(super) fn check(
    path: &Path,
    raw: RawConfig,
    store: &Path,
    registered: &[VmSpec],
) -> Result<Config, ConfigError> {
    Checker { path }.check(raw, store, registered)
}

/// What the VMs checked so far hold: names (and the key that named each),
/// CIDs, sockets the agent listens on, endpoints (QMP sockets, namespaces).
#[derive(Default)]
struct Seen {
    names: HashMap<String, String>,
    cids: HashMap<u32, String>,
    sockets: HashMap<PathBuf, String>,
    endpoints: HashMap<PathBuf, String>,
}

struct Checker<'a> {
    path: &'a Path,
}

impl Checker<'_> {
    fn err(&self, key: impl fmt::Display, message: impl fmt::Display) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            message: message.to_string(),
        }
    }

    /// A path the agent binds, opens or keeps state in: absolute (a
    /// relative one depends on the working directory the agent happens to
    /// start in), without control characters.
    fn path(&self, key: impl fmt::Display, p: &Path) -> Result<(), ConfigError> {
        let text = p.to_string_lossy();
        if has_control(&text) {
            return Err(self.err(key, format!("{text:?} holds a control character")));
        }
        if !p.is_absolute() {
            return Err(self.err(key, format!("{} is not an absolute path", p.display())));
        }
        Ok(())
    }

    fn check(
        &self,
        raw: RawConfig,
        store: &Path,
        registered: &[VmSpec],
    ) -> Result<Config, ConfigError> {
        let file = raw.clone();
        let a = raw.agent;
        self.path("agent.state_dir", &a.state_dir)?;
        self.path("agent.admin_socket", &a.admin_socket)?;
        let agent = AgentSettings {
            state_dir: a.state_dir,
            admin_socket: a.admin_socket,
            vsock_port: a.vsock_port,
            listen_vsock: a.listen_vsock,
            mac_prefix: a.mac_prefix,
            qmp_timeout: a.qmp_timeout,
            unplug_timeout: a.unplug_timeout,
            state_store: a.state_store,
            max_connections_per_vm: a.max_connections_per_vm,
            idle_timeout: a.idle_timeout,
            requests_per_sec_per_vm: a.requests_per_sec_per_vm,
            request_burst_per_vm: a.request_burst_per_vm,
            libvirt_uri: a.libvirt_uri,
            libvirt_discover: a.libvirt_discover,
            libvirt_poll: a.libvirt_poll,
        };
        #[cfg(not(feature = "libvirt"))]
        if agent.libvirt_discover {
            return Err(self.err(
                "agent.libvirt_discover",
                "this nestless-netagent is built without libvirt (cargo feature \"libvirt\")",
            ));
        }
        if raw.network.is_empty() {
            return Err(self.err("network", "at least one [[network]] is required"));
        }
        let mut networks = BTreeMap::new();
        let mut bridges = HashMap::new();
        // The key of each network, by name.
        let mut net_keys: HashMap<String, String> = HashMap::new();
        for (i, n) in raw.network.into_iter().enumerate() {
            let key = format!("network[{i}] ({:?})", n.name);
            let net = self.check_network(&key, n)?;
            net_keys
                .entry(net.name.clone())
                .or_insert_with(|| key.clone());
            for other in networks.values() {
                let other: &NetworkConfig = other;
                if other.subnet.contains(&net.subnet.network())
                    || net.subnet.contains(&other.subnet.network())
                {
                    return Err(self.err(
                        format!("{key}.subnet"),
                        format!(
                            "{} overlaps network {:?} ({})",
                            net.subnet, other.name, other.subnet
                        ),
                    ));
                }
            }
            if let Some(other) = bridges.insert(net.bridge.clone(), net.name.clone()) {
                return Err(self.err(
                    format!("{key}.bridge"),
                    format!(
                        "bridge {:?} is already used by network {other:?}",
                        net.bridge
                    ),
                ));
            }
            if networks.insert(net.name.clone(), net).is_some() {
                return Err(self.err(format!("{key}.name"), "duplicate network name"));
            }
        }
        let mut vms = Vec::new();
        let mut seen = Seen::default();
        // Every socket the agent listens on, and whose it is.
        seen.sockets.insert(
            agent.admin_socket.clone(),
            "the admin socket (agent.admin_socket)".into(),
        );
        for (i, v) in raw.vm.into_iter().enumerate() {
            let key = format!("vm[{i}] ({:?})", v.name);
            vms.push(self.vm_entry(&key, v, false, &agent, &networks, &mut seen)?);
        }
        for spec in registered {
            let v = vm_from_spec(store, spec)?;
            let at = Checker { path: store };
            let key = registered_key(&spec.name);
            // A name the file has too: both places named.
            if let Some(file_key) = seen.names.get(&v.name) {
                return Err(at.err(
                    format!("{key}.name"),
                    format!(
                        "duplicate VM name: {}: {file_key} has it too (remove one of them)",
                        self.path.display()
                    ),
                ));
            }
            vms.push(at.vm_entry(&key, v, true, &agent, &networks, &mut seen)?);
        }
        let hostlo = self.check_hostlo(raw.hostlo, &networks)?;
        let warnings = self.bridge_ports(&networks, &net_keys, &vms);
        Ok(Config {
            path: self.path.to_path_buf(),
            agent,
            networks,
            vms,
            hostlo,
            warnings,
            file,
            registered: registered.to_vec(),
            registered_path: store.to_path_buf(),
        })
    }

    /// One `[[vm]]` entry (or registered VM) `v`, named `key`, checked
    /// alone and against the VMs `seen` before it.
    fn vm_entry(
        &self,
        key: &str,
        v: RawVm,
        registered: bool,
        agent: &AgentSettings,
        networks: &BTreeMap<String, NetworkConfig>,
        seen: &mut Seen,
    ) -> Result<VmConfig, ConfigError> {
        let socket_key = if v.socket.is_none() && v.vsock_uds.is_some() {
            "vsock_uds"
        } else {
            "socket"
        };
        if v.discovered && !registered {
            return Err(self.err(
                format!("{key}.discovered"),
                "set by the agent on the domains it discovers, never in the file",
            ));
        }
        let mut vm = self.check_vm(key, socket_key, v, agent, networks)?;
        vm.registered = registered;
        if seen
            .names
            .insert(vm.name.clone(), key.to_string())
            .is_some()
        {
            return Err(self.err(format!("{key}.name"), "duplicate VM name"));
        }
        if let Some(cid) = vm.cid {
            if let Some(other) = seen.cids.insert(cid, vm.name.clone()) {
                return Err(self.err(
                    format!("{key}.cid"),
                    format!("CID {cid} is already VM {other:?}'s"),
                ));
            }
        }
        let endpoint_key = match vm.backend {
            BackendConfig::Qemu { .. } => "qmp_socket",
            BackendConfig::Netns { .. } => "netns",
            BackendConfig::Libvirt { .. } => "domain",
        };
        let endpoint = vm.backend.endpoint().to_path_buf();
        if let Some(other) = seen.endpoints.insert(endpoint.clone(), vm.name.clone()) {
            return Err(self.err(
                format!("{key}.{endpoint_key}"),
                format!(
                    "{} is already VM {other:?}'s: two VMs of the agent would drive one VM",
                    endpoint.display()
                ),
            ));
        }
        if let Some(owner) = seen.sockets.get(&endpoint) {
            return Err(self.err(
                format!("{key}.{endpoint_key}"),
                format!(
                    "{} is {owner}, which the agent listens on",
                    endpoint.display()
                ),
            ));
        }
        if let Some(sock) = &vm.unix_socket {
            if let Some(other) = seen
                .sockets
                .insert(sock.clone(), format!("VM {:?}'s socket", vm.name))
            {
                return Err(self.err(
                    format!("{key}.{socket_key}"),
                    format!("{} is already {other}", sock.display()),
                ));
            }
            if let Some(other) = seen.endpoints.get(sock) {
                return Err(self.err(
                    format!("{key}.{socket_key}"),
                    format!(
                        "{} is VM {other:?}'s QMP socket or namespace",
                        sock.display()
                    ),
                ));
            }
        }
        Ok(vm)
    }

    /// A network whose VMs may hold more NICs together than its bridge has
    /// ports ([`BRIDGE_MAX_PORTS`]; one VM's `max_nics` cannot exceed it):
    /// a warning, not an error, since quotas are often overcommitted. The
    /// attach past the last port is refused with `RESOURCE_EXHAUSTED`
    /// (`BackendError::BridgeFull`).
    fn bridge_ports(
        &self,
        networks: &BTreeMap<String, NetworkConfig>,
        net_keys: &HashMap<String, String>,
        vms: &[VmConfig],
    ) -> Vec<ConfigWarning> {
        networks
            .values()
            .filter_map(|net| {
                let on: Vec<&VmConfig> = vms.iter().filter(|v| v.network == net.name).collect();
                let total: u64 = on.iter().map(|v| u64::from(v.max_nics)).sum();
                (total > u64::from(BRIDGE_MAX_PORTS)).then(|| ConfigWarning {
                    path: self.path.to_path_buf(),
                    key: format!(
                        "{}.bridge",
                        net_keys.get(&net.name).map_or("network", String::as_str)
                    ),
                    message: format!(
                        "the {} VM(s) on it may hold {total} NICs (max_nics), but bridge {} holds at most {BRIDGE_MAX_PORTS} ports (fewer with an uplink): attaches past that are refused (RESOURCE_EXHAUSTED)",
                        on.len(),
                        net.bridge
                    ),
                })
            })
            .collect()
    }

    fn check_hostlo(
        &self,
        h: RawHostlo,
        networks: &BTreeMap<String, NetworkConfig>,
    ) -> Result<HostloConfig, ConfigError> {
        let subnet: Ipv4Net = match h.subnet {
            Some(s) => s,
            None => segment_subnet_rule(DEFAULT_SEGMENT_SUBNET)
                .map_err(|m| self.err("hostlo.subnet", m))?,
        };
        if let Some(why) = not_unicast4(subnet) {
            return Err(self.err(
                "hostlo.subnet",
                format!("{subnet} is {why}: not a network of host addresses"),
            ));
        }
        if let Some(n) = networks
            .values()
            .find(|n| n.subnet.contains(&subnet.network()) || subnet.contains(&n.subnet.network()))
        {
            return Err(self.err(
                "hostlo.subnet",
                format!("{subnet} overlaps network {:?} ({})", n.name, n.subnet),
            ));
        }
        Ok(HostloConfig { subnet, mtu: h.mtu })
    }

    fn check_network(&self, key: &str, n: RawNetwork) -> Result<NetworkConfig, ConfigError> {
        if let Some(p) = AGENT_LINK_PREFIXES
            .iter()
            .find(|p| n.bridge.starts_with(*p))
        {
            return Err(self.err(
                format!("{key}.bridge"),
                format!(
                    "{:?} starts with {p:?}, a prefix of the links the agent makes and removes ({})",
                    n.bridge,
                    AGENT_LINK_PREFIXES.join(", ")
                ),
            ));
        }
        let subnet = n.subnet;
        if let Some(why) = not_unicast4(subnet) {
            return Err(self.err(
                format!("{key}.subnet"),
                format!("{subnet} is {why}: not a network of host addresses"),
            ));
        }
        let usable =
            |a: Ipv4Addr| subnet.contains(&a) && a != subnet.network() && a != subnet.broadcast();
        let gateway = n.gateway;
        if !usable(gateway) {
            return Err(self.err(
                format!("{key}.gateway"),
                format!(
                    "{gateway} is outside subnet {subnet} or is its network or broadcast address"
                ),
            ));
        }
        let first = n
            .range_start
            .unwrap_or_else(|| Ipv4Addr::from(u32::from(subnet.network()) + 1));
        let last = n
            .range_end
            .unwrap_or_else(|| Ipv4Addr::from(u32::from(subnet.broadcast()) - 1));
        for (field, a) in [("range_start", first), ("range_end", last)] {
            if !usable(a) {
                return Err(self.err(
                    format!("{key}.{field}"),
                    format!("{a} is not a usable address of {subnet}"),
                ));
            }
        }
        if first > last {
            return Err(self.err(
                format!("{key}.range_end"),
                format!("{last} comes before range_start {first}"),
            ));
        }
        if n.subnet6.is_some() && n.mtu < IPV6_MIN_MTU {
            return Err(self.err(
                format!("{key}.mtu"),
                format!(
                    "{} is below {IPV6_MIN_MTU}, the least a link with IPv6 (subnet6) may have: the kernel refuses the IPv6 address",
                    n.mtu
                ),
            ));
        }
        match (n.subnet6, n.gateway6) {
            (None, Some(_)) => {
                return Err(self.err(format!("{key}.gateway6"), "set without subnet6"))
            }
            (Some(s6), g6) => {
                if let Some(why) = not_unicast6(s6) {
                    return Err(self.err(
                        format!("{key}.subnet6"),
                        format!("{s6} is {why}: not a network of host addresses"),
                    ));
                }
                // IPv6 addresses mirror the IPv4 host offset: the mirror of
                // the whole range must be host addresses of subnet6.
                for a in [first, last] {
                    let mirror = mirror6(subnet, s6, a);
                    if let Some(why) = mirror.map_or(Some("outside subnet6"), |m| reserved6(s6, m))
                    {
                        return Err(self.err(
                            format!("{key}.subnet6"),
                            format!(
                                "{s6} is too small to mirror the IPv4 range {first}-{last}: the mirror of {a} is {why}"
                            ),
                        ));
                    }
                }
                if let Some(g6) = g6 {
                    if let Some(why) = reserved6(s6, g6) {
                        return Err(self.err(format!("{key}.gateway6"), format!("{g6} is {why}")));
                    }
                }
            }
            (None, None) => {}
        }
        let net = NetworkConfig {
            name: n.name,
            bridge: n.bridge,
            subnet,
            gateway,
            range: (first, last),
            mtu: n.mtu,
            manage_bridge: n.manage_bridge,
            subnet6: n.subnet6,
            gateway6: n.gateway6,
            routes: Vec::new(),
        };
        let leasable = u32::from(first)..=u32::from(last);
        if !leasable
            .clone()
            .any(|a| net.unleasable(Ipv4Addr::from(a)).is_none())
        {
            return Err(self.err(
                format!("{key}.range_end"),
                format!("the range {first}-{last} holds no address to lease (the gateways are never leased)"),
            ));
        }
        let mut routes: Vec<RouteConfig> = Vec::new();
        for (j, r) in n.routes.into_iter().enumerate() {
            let rkey = format!("{key}.routes[{j}]");
            let route = RouteConfig {
                destination: r.destination,
                gateway: r.gateway,
            };
            self.check_route(&rkey, &net, &route, &routes)?;
            routes.push(route);
        }
        Ok(NetworkConfig { routes, ..net })
    }

    /// One extra route of `net`, given the ones before it: what `ip route
    /// add` refuses (a gateway off the link or of the other family, a
    /// destination with host bits, a route that is there already: the
    /// default route, the subnet's own, an earlier one) and a gateway that
    /// is no router's address (network, broadcast or anycast address, an
    /// address the range hands to pods).
    fn check_route(
        &self,
        rkey: &str,
        net: &NetworkConfig,
        r: &RouteConfig,
        before: &[RouteConfig],
    ) -> Result<(), ConfigError> {
        let dest = r.destination;
        if dest.addr().is_ipv6() && net.subnet6.is_none() {
            return Err(self.err(format!("{rkey}.destination"), "an IPv6 route needs subnet6"));
        }
        if dest.trunc() != dest {
            return Err(self.err(
                format!("{rkey}.destination"),
                format!("{dest} has host bits set (did you mean {}?)", dest.trunc()),
            ));
        }
        let default_route = match dest {
            IpNet::V4(_) => Some("gateway"),
            IpNet::V6(_) => net.gateway6.map(|_| "gateway6"),
        };
        if dest.prefix_len() == 0 {
            if let Some(via) = default_route {
                return Err(self.err(
                    format!("{rkey}.destination"),
                    format!("{dest} is the default route, which {via} gives already"),
                ));
            }
        }
        if dest == IpNet::V4(net.subnet) || net.subnet6.is_some_and(|s6| dest == IpNet::V6(s6)) {
            return Err(self.err(
                format!("{rkey}.destination"),
                format!("{dest} is the network's own subnet, reached on the link already"),
            ));
        }
        if let Some(i) = before.iter().position(|b| b.destination == dest) {
            return Err(self.err(
                format!("{rkey}.destination"),
                format!("{dest} is routed already by routes[{i}]"),
            ));
        }
        let Some(g) = r.gateway else {
            return Ok(());
        };
        let why = match (g, dest) {
            (IpAddr::V4(_), IpNet::V6(_)) | (IpAddr::V6(_), IpNet::V4(_)) => {
                Some("of another address family than the destination".to_string())
            }
            (IpAddr::V4(g4), _) => {
                if !net.subnet.contains(&g4) {
                    Some(format!(
                        "outside subnet {}: the kernel refuses a gateway off the link",
                        net.subnet
                    ))
                } else if g4 == net.subnet.network() || g4 == net.subnet.broadcast() {
                    Some(format!(
                        "the network or broadcast address of {}",
                        net.subnet
                    ))
                } else if net.leases(g4) {
                    Some(format!(
                        "in the lease range {}-{}: a pod may be given it",
                        net.range.0, net.range.1
                    ))
                } else {
                    None
                }
            }
            (IpAddr::V6(g6), _) => {
                let s6 = net.subnet6.unwrap_or_default();
                if !s6.contains(&g6) {
                    Some(format!(
                        "outside subnet6 {s6}: the kernel refuses a gateway off the link"
                    ))
                } else if let Some(why) = reserved6(s6, g6) {
                    Some(why.to_string())
                } else if mirrored4(net, s6, g6).is_some_and(|a| net.leases(a)) {
                    Some(format!(
                        "the IPv6 mirror of an address of the lease range {}-{}: a pod may be given it",
                        net.range.0, net.range.1
                    ))
                } else {
                    None
                }
            }
        };
        match why {
            Some(why) => Err(self.err(format!("{rkey}.gateway"), format!("{g} is {why}"))),
            None => Ok(()),
        }
    }

    fn check_vm(
        &self,
        key: &str,
        socket_key: &str,
        v: RawVm,
        agent: &AgentSettings,
        networks: &BTreeMap<String, NetworkConfig>,
    ) -> Result<VmConfig, ConfigError> {
        let network = match v.network {
            Some(n) => n,
            None if networks.len() == 1 => networks.keys().next().cloned().unwrap_or_default(),
            None => {
                return Err(self.err(
                    format!("{key}.network"),
                    "required when there is more than one network",
                ))
            }
        };
        if !networks.contains_key(&network) {
            return Err(self.err(
                format!("{key}.network"),
                format!("no [[network]] is named {network:?}"),
            ));
        }
        let backend = match v.backend {
            _ if v.discovered && v.backend != BackendKind::Libvirt => {
                return Err(self.err(
                    format!("{key}.discovered"),
                    "only for backend = \"libvirt\" (set by the agent on the domains it discovers)",
                ));
            }
            BackendKind::Qemu | BackendKind::Netns
                if v.domain.is_some() || v.libvirt_uri.is_some() || v.persist_nics.is_some() =>
            {
                return Err(self.err(
                    format!("{key}.domain"),
                    "domain, libvirt_uri and persist_nics are only for backend = \"libvirt\"",
                ));
            }
            #[cfg(not(feature = "libvirt"))]
            BackendKind::Libvirt => {
                return Err(self.err(
                    format!("{key}.backend"),
                    "this nestless-netagent is built without libvirt (cargo feature \"libvirt\"; a static build cannot link libvirt.so)",
                ));
            }
            #[cfg(feature = "libvirt")]
            BackendKind::Libvirt => {
                if v.qmp_socket.is_some() || v.hotplug_slots.is_some() || v.netns.is_some() {
                    return Err(self.err(
                        format!("{key}.backend"),
                        "qmp_socket, hotplug_slots and netns are not for backend = \"libvirt\"",
                    ));
                }
                BackendConfig::Libvirt {
                    uri: v.libvirt_uri.unwrap_or_else(|| agent.libvirt_uri.clone()),
                    domain: v.domain.unwrap_or_else(|| v.name.clone()),
                    persist_nics: v.persist_nics.unwrap_or(false),
                }
            }
            BackendKind::Qemu => {
                if v.netns.is_some() {
                    return Err(self.err(format!("{key}.netns"), "only for backend = \"netns\""));
                }
                let qmp_socket = v.qmp_socket.ok_or_else(|| {
                    self.err(
                        format!("{key}.qmp_socket"),
                        "required for backend = \"qemu\"",
                    )
                })?;
                self.path(format!("{key}.qmp_socket"), &qmp_socket)?;
                BackendConfig::Qemu {
                    qmp_socket,
                    hotplug_slots: v.hotplug_slots.unwrap_or_default(),
                }
            }
            BackendKind::Netns => {
                if v.qmp_socket.is_some() || v.hotplug_slots.is_some() {
                    return Err(
                        self.err(format!("{key}.qmp_socket"), "only for backend = \"qemu\"")
                    );
                }
                let netns = v.netns.ok_or_else(|| {
                    self.err(format!("{key}.netns"), "required for backend = \"netns\"")
                })?;
                BackendConfig::Netns { netns }
            }
        };
        let unix_socket = match (v.socket, v.vsock_uds) {
            (Some(_), Some(_)) => {
                return Err(self.err(
                    format!("{key}.socket"),
                    "give either socket or vsock_uds, not both",
                ));
            }
            (Some(s), None) => Some(s),
            (None, Some(uds)) => {
                let mut s = uds.into_os_string();
                s.push(format!("_{}", agent.vsock_port));
                Some(PathBuf::from(s))
            }
            (None, None) => None,
        };
        if let Some(s) = &unix_socket {
            self.path(format!("{key}.{socket_key}"), s)?;
        }
        if v.cid.is_none() && unix_socket.is_none() {
            return Err(self.err(
                key,
                "needs a cid, a vsock_uds or a socket, or the VM cannot reach the agent",
            ));
        }
        if v.warm_pool > v.max_nics {
            return Err(self.err(
                format!("{key}.warm_pool"),
                format!("{} is more than max_nics ({})", v.warm_pool, v.max_nics),
            ));
        }
        Ok(VmConfig {
            warm_pool: v.warm_pool,
            name: v.name,
            backend,
            network,
            cid: v.cid,
            unix_socket,
            max_nics: v.max_nics,
            registered: false,
            discovered: v.discovered,
        })
    }
}
