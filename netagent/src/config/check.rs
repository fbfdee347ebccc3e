//! The rules between values, once each value is typed ([`super::raw`]): a
//! gateway inside its subnet, a range in order, IPv6 sized like IPv4, routes
//! of a family the network has, no overlapping subnets, names, CIDs or
//! sockets used twice, a VM's backend keys matching its `backend`, a VM
//! reachable somehow, a warm pool within the quota, the Hostlo subnet apart
//! from every network. Each error names the file and the key.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;
use nestless_model::hostlo::DEFAULT_SEGMENT_SUBNET;

use super::{
    raw::{segment_subnet_rule, BackendKind, RawConfig, RawHostlo, RawNetwork, RawVm},
    AgentSettings, BackendConfig, Config, ConfigError, HostloConfig, NetworkConfig, RouteConfig,
    VmConfig,
};

/// The checked configuration of `raw`, read from `path`.
pub(super) fn check(path: &Path, raw: RawConfig) -> Result<Config, ConfigError> {
    Checker { path }.check(raw)
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

    fn check(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let a = raw.agent;
        let agent = AgentSettings {
            state_dir: a.state_dir,
            admin_socket: a.admin_socket,
            vsock_port: a.vsock_port,
            listen_vsock: a.listen_vsock,
            mac_prefix: a.mac_prefix,
            qmp_timeout: a.qmp_timeout,
            unplug_timeout: a.unplug_timeout,
        };
        if raw.network.is_empty() {
            return Err(self.err("network", "at least one [[network]] is required"));
        }
        let mut networks = BTreeMap::new();
        let mut bridges = HashMap::new();
        for (i, n) in raw.network.into_iter().enumerate() {
            let key = format!("network[{i}] ({:?})", n.name);
            let net = self.check_network(&key, n)?;
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
        let mut names = HashSet::new();
        let mut cids = HashMap::new();
        let mut sockets = HashMap::new();
        for (i, v) in raw.vm.into_iter().enumerate() {
            let key = format!("vm[{i}] ({:?})", v.name);
            let vm = self.check_vm(&key, v, &agent, &networks)?;
            if !names.insert(vm.name.clone()) {
                return Err(self.err(format!("{key}.name"), "duplicate VM name"));
            }
            if let Some(cid) = vm.cid {
                if let Some(other) = cids.insert(cid, vm.name.clone()) {
                    return Err(self.err(
                        format!("{key}.cid"),
                        format!("CID {cid} is already VM {other:?}'s"),
                    ));
                }
            }
            if let Some(sock) = &vm.unix_socket {
                if let Some(other) = sockets.insert(sock.clone(), vm.name.clone()) {
                    return Err(self.err(
                        format!("{key}.socket"),
                        format!("{} is already VM {other:?}'s socket", sock.display()),
                    ));
                }
            }
            vms.push(vm);
        }
        let hostlo = self.check_hostlo(raw.hostlo, &networks)?;
        Ok(Config {
            path: self.path.to_path_buf(),
            agent,
            networks,
            vms,
            hostlo,
        })
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
        let subnet = n.subnet;
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
        match (n.subnet6, n.gateway6) {
            (None, Some(_)) => {
                return Err(self.err(format!("{key}.gateway6"), "set without subnet6"))
            }
            (Some(s6), g6) => {
                // IPv6 addresses mirror the IPv4 host offset: the v6 subnet must hold them.
                let host_bits6 = 128 - u32::from(s6.prefix_len());
                let host_bits4 = 32 - u32::from(subnet.prefix_len());
                if host_bits6 < host_bits4 {
                    return Err(self.err(
                        format!("{key}.subnet6"),
                        format!("{s6} is smaller than the IPv4 subnet {subnet}"),
                    ));
                }
                if let Some(g6) = g6 {
                    if !s6.contains(&g6) || g6 == s6.network() {
                        return Err(self.err(
                            format!("{key}.gateway6"),
                            format!("{g6} is outside subnet6 {s6}"),
                        ));
                    }
                }
            }
            (None, None) => {}
        }
        let mut routes = Vec::new();
        for (j, r) in n.routes.into_iter().enumerate() {
            let rkey = format!("{key}.routes[{j}]");
            if let Some(g) = r.gateway {
                if g.is_ipv4() != r.destination.addr().is_ipv4() {
                    return Err(self.err(
                        format!("{rkey}.gateway"),
                        "address family differs from the destination's",
                    ));
                }
            }
            if r.destination.addr().is_ipv6() && n.subnet6.is_none() {
                return Err(self.err(format!("{rkey}.destination"), "an IPv6 route needs subnet6"));
            }
            routes.push(RouteConfig {
                destination: r.destination,
                gateway: r.gateway,
            });
        }
        Ok(NetworkConfig {
            name: n.name,
            bridge: n.bridge,
            subnet,
            gateway,
            range: (first, last),
            mtu: n.mtu,
            manage_bridge: n.manage_bridge,
            subnet6: n.subnet6,
            gateway6: n.gateway6,
            routes,
        })
    }

    fn check_vm(
        &self,
        key: &str,
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
            if !s.is_absolute() {
                return Err(self.err(
                    format!("{key}.socket"),
                    format!("{} is not an absolute path", s.display()),
                ));
            }
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
        })
    }
}
