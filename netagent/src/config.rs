//! Agent configuration: `/etc/nestless/netagent.toml`.
//!
//! The file is parsed into raw serde structs (`deny_unknown_fields`, so a
//! misspelt key is an error) and then checked into [`Config`], whose values are
//! typed (CIDRs, addresses, MAC prefix, paths). Every error names the file and
//! the key, e.g. `netagent.toml: network[0] ("default").gateway: 10.0.0.1 is
//! outside subnet 10.88.0.0/16`.
//!
//! ```toml
//! [agent]
//! state_dir = "/var/lib/nestless"
//! admin_socket = "/run/nestless/admin.sock"
//! vsock_port = 7070
//! listen_vsock = "auto"
//!
//! [[network]]
//! name = "default"
//! bridge = "nlbr0"
//! subnet = "10.88.0.0/16"
//! gateway = "10.88.0.1"
//!
//! [[vm]]
//! name = "vm1"
//! backend = "qemu"
//! qmp_socket = "/run/vm1.qmp"
//! cid = 3
//! network = "default"
//! ```

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::Deserialize;

use nestless_model::hostlo::{DEFAULT_SEGMENT_MTU, DEFAULT_SEGMENT_SUBNET};
use nestless_model::mac::parse_hex_bytes;

/// Default location of the agent's configuration.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/nestless/netagent.toml";

/// A configuration error: which file, which key, what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The TOML parser's account, with line and key.
        message: String,
    },
    /// A value is wrong.
    #[error("{path}: {key}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key, e.g. `network[0] ("default").subnet`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

// ---------------------------------------------------------------- raw form

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    agent: RawAgent,
    #[serde(default)]
    network: Vec<RawNetwork>,
    #[serde(default)]
    vm: Vec<RawVm>,
    #[serde(default)]
    hostlo: RawHostlo,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHostlo {
    subnet: Option<String>,
    mtu: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    state_dir: Option<PathBuf>,
    admin_socket: Option<PathBuf>,
    vsock_port: Option<u32>,
    listen_vsock: Option<toml::Value>,
    mac_prefix: Option<String>,
    qmp_timeout_ms: Option<u64>,
    unplug_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    name: String,
    bridge: String,
    subnet: String,
    gateway: String,
    range_start: Option<String>,
    range_end: Option<String>,
    mtu: Option<u32>,
    #[serde(default)]
    manage_bridge: bool,
    subnet6: Option<String>,
    gateway6: Option<String>,
    #[serde(default)]
    routes: Vec<RawRoute>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    destination: String,
    gateway: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    name: String,
    backend: String,
    network: Option<String>,
    cid: Option<u32>,
    vsock_uds: Option<PathBuf>,
    socket: Option<PathBuf>,
    max_nics: Option<u32>,
    warm_pool: Option<u32>,
    // qemu
    qmp_socket: Option<PathBuf>,
    hotplug_slots: Option<Vec<String>>,
    // netns
    netns: Option<String>,
}

// ---------------------------------------------------------------- checked form

/// Whether the agent listens on AF_VSOCK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenVsock {
    /// Listen when the host has AF_VSOCK (vhost_vsock loaded); otherwise only unix sockets.
    Auto,
    /// Always; failing to listen is an error.
    Yes,
    /// Never.
    No,
}

/// Agent-wide settings (`[agent]`).
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// Where `state.json` lives.
    pub state_dir: PathBuf,
    /// The root-only unix socket `nestlessctl` talks to.
    pub admin_socket: PathBuf,
    /// AF_VSOCK port, also the `<uds>_<port>` suffix of vhost-device-vsock sockets.
    pub vsock_port: u32,
    /// Whether to listen on AF_VSOCK.
    pub listen_vsock: ListenVsock,
    /// First bytes of every MAC the agent hands out (0 to 5 bytes).
    pub mac_prefix: Vec<u8>,
    /// Deadline of one QMP command.
    pub qmp_timeout: Duration,
    /// How long to wait for the guest to release an unplugged device.
    pub unplug_timeout: Duration,
}

/// An extra route given to NICs of a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// Destination, e.g. `10.0.0.0/8`.
    pub destination: ipnet::IpNet,
    /// Next hop; `None` for on-link.
    pub gateway: Option<std::net::IpAddr>,
}

/// A network the agent hands out addresses on (`[[network]]`).
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// Name VMs refer to.
    pub name: String,
    /// Host bridge the NICs' host ends join.
    pub bridge: String,
    /// IPv4 subnet.
    pub subnet: Ipv4Net,
    /// IPv4 gateway (inside `subnet`), the default route of every NIC.
    pub gateway: Ipv4Addr,
    /// First and last address handed out (inclusive).
    pub range: (Ipv4Addr, Ipv4Addr),
    /// MTU of the NICs.
    pub mtu: u32,
    /// Create the bridge and give it the gateway address if missing.
    pub manage_bridge: bool,
    /// Optional IPv6 subnet; a NIC's IPv6 address has the same host offset as its IPv4 one.
    pub subnet6: Option<Ipv6Net>,
    /// Optional IPv6 gateway.
    pub gateway6: Option<Ipv6Addr>,
    /// Extra routes.
    pub routes: Vec<RouteConfig>,
}

/// How a VM's NICs are provided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendConfig {
    /// A QEMU VM: taps on the bridge, hot-plugged over QMP.
    Qemu {
        /// The VM's QMP socket (dedicated to the agent).
        qmp_socket: PathBuf,
        /// Hot-plug buses to use (pcie-root-port ids, or `pci.0`); empty = discover.
        hotplug_slots: Vec<String>,
    },
    /// A network namespace standing in for a VM: veth pairs.
    Netns {
        /// Path of the namespace (`/run/netns/NAME` for a bare name).
        netns: PathBuf,
    },
}

impl BackendConfig {
    /// `qemu` or `netns`.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendConfig::Qemu { .. } => "qemu",
            BackendConfig::Netns { .. } => "netns",
        }
    }

    /// The QMP socket or the namespace path.
    pub fn endpoint(&self) -> &Path {
        match self {
            BackendConfig::Qemu { qmp_socket, .. } => qmp_socket,
            BackendConfig::Netns { netns } => netns,
        }
    }
}

/// A VM the agent serves (`[[vm]]`).
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Unique name.
    pub name: String,
    /// Backend.
    pub backend: BackendConfig,
    /// Default network of the VM's NICs.
    pub network: String,
    /// vsock CID (when reached over AF_VSOCK).
    pub cid: Option<u32>,
    /// Unix socket the agent listens on for this VM.
    pub unix_socket: Option<PathBuf>,
    /// At most this many NICs at once (pooled ones included).
    pub max_nics: u32,
    /// NICs kept plugged and unassigned, so that an attach only assigns one.
    pub warm_pool: u32,
}

/// Hostlo settings (`[hostlo]`).
#[derive(Debug, Clone)]
pub struct HostloConfig {
    /// Subnet of every pod segment (isolated bridges may share it); part k
    /// gets address k + 1. At least a /24.
    pub subnet: Ipv4Net,
    /// MTU of segment NICs (large: it carries loopback traffic).
    pub mtu: u32,
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from.
    pub path: PathBuf,
    /// `[agent]`.
    pub agent: AgentSettings,
    /// Networks by name.
    pub networks: BTreeMap<String, NetworkConfig>,
    /// VMs, in file order.
    pub vms: Vec<VmConfig>,
    /// `[hostlo]`.
    pub hostlo: HostloConfig,
}

impl Config {
    /// Reads and checks a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Checks `text` as if read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " | "),
        })?;
        Checker { path }.check(raw)
    }

    /// The VM with this name.
    pub fn vm(&self, name: &str) -> Option<&VmConfig> {
        self.vms.iter().find(|v| v.name == name)
    }
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
        let agent = self.check_agent(raw.agent)?;
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
        let text = h.subnet.unwrap_or_else(|| DEFAULT_SEGMENT_SUBNET.into());
        let subnet: Ipv4Net = text
            .parse()
            .map_err(|_| self.err("hostlo.subnet", format!("{text:?} is not an IPv4 CIDR")))?;
        if subnet.trunc() != subnet || subnet.prefix_len() > 24 {
            return Err(self.err(
                "hostlo.subnet",
                format!("{subnet} must be a network of at least /24"),
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
        let mtu = h.mtu.unwrap_or(DEFAULT_SEGMENT_MTU);
        if !(68..=65535).contains(&mtu) {
            return Err(self.err("hostlo.mtu", format!("{mtu} is not between 68 and 65535")));
        }
        Ok(HostloConfig { subnet, mtu })
    }

    fn check_agent(&self, a: RawAgent) -> Result<AgentSettings, ConfigError> {
        let listen_vsock = match a.listen_vsock {
            None => ListenVsock::Auto,
            Some(toml::Value::Boolean(true)) => ListenVsock::Yes,
            Some(toml::Value::Boolean(false)) => ListenVsock::No,
            Some(toml::Value::String(s)) if s == "auto" => ListenVsock::Auto,
            Some(other) => {
                return Err(self.err(
                    "agent.listen_vsock",
                    format!("{other} is not true, false or \"auto\""),
                ))
            }
        };
        let mac_prefix = match a.mac_prefix {
            None => vec![0x52, 0x54, 0x00],
            Some(p) if p.is_empty() => Vec::new(),
            Some(p) => {
                let n = p.split([':', '-']).count();
                let bytes = (n <= 5)
                    .then(|| parse_hex_bytes(&p, n))
                    .flatten()
                    .ok_or_else(|| {
                        self.err(
                            "agent.mac_prefix",
                            format!("{p:?} is not 0 to 5 hex bytes like \"52:54:00\""),
                        )
                    })?;
                if bytes.first().is_some_and(|b| b & 1 == 1) {
                    return Err(
                        self.err("agent.mac_prefix", format!("{p:?} is a multicast prefix"))
                    );
                }
                bytes
            }
        };
        let vsock_port = a.vsock_port.unwrap_or(nestless_protos::DEFAULT_VSOCK_PORT);
        if vsock_port == 0 || vsock_port == u32::MAX {
            return Err(self.err(
                "agent.vsock_port",
                format!("{vsock_port} is not a usable port"),
            ));
        }
        let ms = |key: &str, v: Option<u64>, default: u64| -> Result<Duration, ConfigError> {
            match v.unwrap_or(default) {
                0 => Err(self.err(format!("agent.{key}"), "must be more than 0")),
                n if n > 3_600_000 => {
                    Err(self.err(format!("agent.{key}"), "must be at most an hour"))
                }
                n => Ok(Duration::from_millis(n)),
            }
        };
        Ok(AgentSettings {
            state_dir: a.state_dir.unwrap_or_else(|| "/var/lib/nestless".into()),
            admin_socket: a
                .admin_socket
                .unwrap_or_else(|| "/run/nestless/admin.sock".into()),
            vsock_port,
            listen_vsock,
            mac_prefix,
            qmp_timeout: ms("qmp_timeout_ms", a.qmp_timeout_ms, 5_000)?,
            unplug_timeout: ms("unplug_timeout_ms", a.unplug_timeout_ms, 10_000)?,
        })
    }

    fn check_network(&self, key: &str, n: RawNetwork) -> Result<NetworkConfig, ConfigError> {
        if n.name.is_empty() || n.name.len() > 64 {
            return Err(self.err(format!("{key}.name"), "must be 1 to 64 characters"));
        }
        check_ifname(&n.bridge).map_err(|m| self.err(format!("{key}.bridge"), m))?;
        let subnet: Ipv4Net = n.subnet.parse().map_err(|_| {
            self.err(
                format!("{key}.subnet"),
                format!("{:?} is not an IPv4 CIDR like 10.88.0.0/16", n.subnet),
            )
        })?;
        if subnet.trunc() != subnet {
            return Err(self.err(
                format!("{key}.subnet"),
                format!(
                    "{subnet} has host bits set (did you mean {}?)",
                    subnet.trunc()
                ),
            ));
        }
        if subnet.prefix_len() > 30 {
            return Err(self.err(
                format!("{key}.subnet"),
                format!("{subnet} is too small (at most /30)"),
            ));
        }
        let parse4 = |field: &str, s: &str| -> Result<Ipv4Addr, ConfigError> {
            s.parse().map_err(|_| {
                self.err(
                    format!("{key}.{field}"),
                    format!("{s:?} is not an IPv4 address"),
                )
            })
        };
        let gateway = parse4("gateway", &n.gateway)?;
        let usable =
            |a: Ipv4Addr| subnet.contains(&a) && a != subnet.network() && a != subnet.broadcast();
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
            .as_deref()
            .map(|s| parse4("range_start", s))
            .transpose()?;
        let last = n
            .range_end
            .as_deref()
            .map(|s| parse4("range_end", s))
            .transpose()?;
        let first = first.unwrap_or_else(|| Ipv4Addr::from(u32::from(subnet.network()) + 1));
        let last = last.unwrap_or_else(|| Ipv4Addr::from(u32::from(subnet.broadcast()) - 1));
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
        let mtu = n.mtu.unwrap_or(1500);
        if !(68..=65535).contains(&mtu) {
            return Err(self.err(
                format!("{key}.mtu"),
                format!("{mtu} is not between 68 and 65535"),
            ));
        }
        let subnet6 = n
            .subnet6
            .as_deref()
            .map(|s| {
                s.parse::<Ipv6Net>().map_err(|_| {
                    self.err(
                        format!("{key}.subnet6"),
                        format!("{s:?} is not an IPv6 CIDR like fd00:88::/64"),
                    )
                })
            })
            .transpose()?;
        let gateway6 = n
            .gateway6
            .as_deref()
            .map(|s| {
                s.parse::<Ipv6Addr>().map_err(|_| {
                    self.err(
                        format!("{key}.gateway6"),
                        format!("{s:?} is not an IPv6 address"),
                    )
                })
            })
            .transpose()?;
        match (subnet6, gateway6) {
            (None, Some(_)) => {
                return Err(self.err(format!("{key}.gateway6"), "set without subnet6"))
            }
            (Some(s6), g6) => {
                if s6.trunc() != s6 {
                    return Err(
                        self.err(format!("{key}.subnet6"), format!("{s6} has host bits set"))
                    );
                }
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
        for (j, r) in n.routes.iter().enumerate() {
            let rkey = format!("{key}.routes[{j}]");
            let destination: ipnet::IpNet = r.destination.parse().map_err(|_| {
                self.err(
                    format!("{rkey}.destination"),
                    format!("{:?} is not a CIDR", r.destination),
                )
            })?;
            let gateway = r
                .gateway
                .as_deref()
                .map(|g| {
                    g.parse::<std::net::IpAddr>().map_err(|_| {
                        self.err(
                            format!("{rkey}.gateway"),
                            format!("{g:?} is not an IP address"),
                        )
                    })
                })
                .transpose()?;
            if let Some(g) = gateway {
                if g.is_ipv4() != destination.addr().is_ipv4() {
                    return Err(self.err(
                        format!("{rkey}.gateway"),
                        "address family differs from the destination's",
                    ));
                }
            }
            if destination.addr().is_ipv6() && subnet6.is_none() {
                return Err(self.err(format!("{rkey}.destination"), "an IPv6 route needs subnet6"));
            }
            routes.push(RouteConfig {
                destination,
                gateway,
            });
        }
        Ok(NetworkConfig {
            name: n.name,
            bridge: n.bridge,
            subnet,
            gateway,
            range: (first, last),
            mtu,
            manage_bridge: n.manage_bridge,
            subnet6,
            gateway6,
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
        if v.name.is_empty()
            || v.name.len() > 64
            || !v
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(self.err(
                format!("{key}.name"),
                "must be 1 to 64 characters of [A-Za-z0-9._-]",
            ));
        }
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
        let backend = match v.backend.as_str() {
            "qemu" => {
                if v.netns.is_some() {
                    return Err(self.err(format!("{key}.netns"), "only for backend = \"netns\""));
                }
                let qmp_socket = v.qmp_socket.ok_or_else(|| {
                    self.err(
                        format!("{key}.qmp_socket"),
                        "required for backend = \"qemu\"",
                    )
                })?;
                let hotplug_slots = v.hotplug_slots.unwrap_or_default();
                for (j, s) in hotplug_slots.iter().enumerate() {
                    if s.is_empty() || s.len() > 64 || s.contains(',') {
                        return Err(self.err(
                            format!("{key}.hotplug_slots[{j}]"),
                            format!("{s:?} is not a QEMU bus id"),
                        ));
                    }
                }
                BackendConfig::Qemu {
                    qmp_socket,
                    hotplug_slots,
                }
            }
            "netns" => {
                if v.qmp_socket.is_some() || v.hotplug_slots.is_some() {
                    return Err(
                        self.err(format!("{key}.qmp_socket"), "only for backend = \"qemu\"")
                    );
                }
                let ns = v.netns.ok_or_else(|| {
                    self.err(format!("{key}.netns"), "required for backend = \"netns\"")
                })?;
                let netns = if ns.starts_with('/') {
                    PathBuf::from(ns)
                } else if !ns.is_empty() && !ns.contains('/') && ns != "." && ns != ".." {
                    Path::new("/run/netns").join(ns)
                } else {
                    return Err(self.err(
                        format!("{key}.netns"),
                        format!("{ns:?} is neither a name nor an absolute path"),
                    ));
                };
                BackendConfig::Netns { netns }
            }
            other => {
                return Err(self.err(
                    format!("{key}.backend"),
                    format!("{other:?} is not \"qemu\" or \"netns\""),
                ));
            }
        };
        if let Some(cid) = v.cid {
            if cid <= 2 || cid == u32::MAX {
                return Err(self.err(
                    format!("{key}.cid"),
                    format!("{cid} is reserved (guest CIDs start at 3)"),
                ));
            }
        }
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
        let max_nics = v.max_nics.unwrap_or(16);
        if !(1..=1024).contains(&max_nics) {
            return Err(self.err(
                format!("{key}.max_nics"),
                format!("{max_nics} is not between 1 and 1024"),
            ));
        }
        let warm_pool = v.warm_pool.unwrap_or(0);
        if warm_pool > max_nics {
            return Err(self.err(
                format!("{key}.warm_pool"),
                format!("{warm_pool} is more than max_nics ({max_nics})"),
            ));
        }
        Ok(VmConfig {
            warm_pool,
            name: v.name,
            backend,
            network,
            cid: v.cid,
            unix_socket,
            max_nics,
        })
    }
}

/// Checks a Linux interface name.
pub fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!("{name:?} is not 1 to 15 characters"));
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
        || name == "."
        || name == ".."
    {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [agent]
        state_dir = "/tmp/x"
        vsock_port = 7000
        mac_prefix = "52:54:00"

        [[network]]
        name = "default"
        bridge = "nlbr0"
        subnet = "10.88.0.0/24"
        gateway = "10.88.0.1"
        range_start = "10.88.0.10"
        range_end = "10.88.0.20"
        subnet6 = "fd00:88::/64"
        gateway6 = "fd00:88::1"
        routes = [{ destination = "192.168.0.0/16", gateway = "10.88.0.254" }]

        [[vm]]
        name = "vm1"
        backend = "qemu"
        qmp_socket = "/run/vm1.qmp"
        cid = 3
        vsock_uds = "/run/vm1.vsock"

        [[vm]]
        name = "local"
        backend = "netns"
        netns = "vmns"
        socket = "/run/nestless/local.sock"
        max_nics = 4
    "#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text)
    }

    fn err(text: &str) -> String {
        parse(text).expect_err("should fail").to_string()
    }

    #[test]
    fn good_config() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.agent.vsock_port, 7000);
        assert_eq!(c.agent.listen_vsock, ListenVsock::Auto);
        let n = &c.networks["default"];
        assert_eq!(
            n.range,
            ("10.88.0.10".parse().unwrap(), "10.88.0.20".parse().unwrap())
        );
        assert_eq!(n.mtu, 1500);
        assert_eq!(n.routes.len(), 1);
        let vm1 = c.vm("vm1").unwrap();
        assert_eq!(
            vm1.unix_socket.as_deref(),
            Some(Path::new("/run/vm1.vsock_7000"))
        );
        assert_eq!(vm1.network, "default", "single network is the default");
        assert_eq!(vm1.max_nics, 16);
        let local = c.vm("local").unwrap();
        assert_eq!(
            local.backend,
            BackendConfig::Netns {
                netns: "/run/netns/vmns".into()
            }
        );
    }

    fn with_network(net: &str) -> String {
        format!("[[network]]\nname = \"n\"\nbridge = \"br0\"\n{net}\n")
    }

    #[test]
    fn unknown_key_names_the_file_and_key() {
        let e = err("[agent]\nstate_dirr = \"/x\"\n");
        assert!(
            e.starts_with("test.toml:") && e.contains("state_dirr"),
            "{e}"
        );
        let e = err(&(GOOD.to_string()
            + "\n[[vm]]\nname=\"x\"\nbackend=\"netns\"\nnetns=\"a\"\nsocket=\"/s\"\nbogus=1\n"));
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn bad_networks() {
        let cases = [
            ("subnet = \"10.88.0/16\"\ngateway = \"10.88.0.1\"", "network[0] (\"n\").subnet", "not an IPv4 CIDR"),
            ("subnet = \"10.88.0.5/16\"\ngateway = \"10.88.0.1\"", ".subnet", "host bits"),
            ("subnet = \"10.88.0.0/16\"\ngateway = \"10.99.0.1\"", ".gateway", "outside subnet"),
            ("subnet = \"10.88.0.0/16\"\ngateway = \"10.88.0.0\"", ".gateway", "network or broadcast"),
            ("subnet = \"10.88.0.0/16\"\ngateway = \"banana\"", ".gateway", "not an IPv4 address"),
            ("subnet = \"10.88.0.0/16\"\ngateway = \"10.88.0.1\"\nmtu = 10", ".mtu", "between 68"),
            ("subnet = \"10.88.0.0/16\"\ngateway = \"10.88.0.1\"\nrange_start = \"10.88.9.0\"\nrange_end = \"10.88.1.0\"", ".range_end", "comes before"),
            ("subnet = \"10.88.0.0/16\"\ngateway = \"10.88.0.1\"\nsubnet6 = \"fd00::/120\"", ".subnet6", "smaller"),
            ("subnet = \"10.88.0.0/16\"\ngateway = \"10.88.0.1\"\ngateway6 = \"fd00::1\"", ".gateway6", "without subnet6"),
            ("subnet = \"10.88.0.0/16\"\ngateway = \"10.88.0.1\"\nroutes = [{destination = \"fd00::/8\"}]", ".routes[0].destination", "needs subnet6"),
        ];
        for (net, key, msg) in cases {
            let e = err(&with_network(net));
            assert!(e.contains(key) && e.contains(msg), "{net}: {e}");
        }
        let e = err("[[network]]\nname = \"n\"\nbridge = \"a-very-long-bridge-name\"\nsubnet = \"10.0.0.0/8\"\ngateway = \"10.0.0.1\"");
        assert!(e.contains(".bridge"), "{e}");
        let two = "[[network]]\nname=\"a\"\nbridge=\"b1\"\nsubnet=\"10.0.0.0/16\"\ngateway=\"10.0.0.1\"\n[[network]]\nname=\"b\"\nbridge=\"b2\"\nsubnet=\"10.0.5.0/24\"\ngateway=\"10.0.5.1\"";
        assert!(err(two).contains("overlaps"));
        assert!(err("").contains("at least one [[network]]"));
    }

    #[test]
    fn bad_vms() {
        let net = with_network("subnet = \"10.88.0.0/16\"\ngateway = \"10.88.0.1\"");
        let cases = [
            ("name=\"a\"\nbackend=\"xen\"\ncid=3", ".backend", "\"xen\""),
            (
                "name=\"a\"\nbackend=\"qemu\"\ncid=3",
                ".qmp_socket",
                "required",
            ),
            (
                "name=\"a\"\nbackend=\"qemu\"\nqmp_socket=\"/q\"\ncid=2",
                ".cid",
                "reserved",
            ),
            (
                "name=\"a\"\nbackend=\"qemu\"\nqmp_socket=\"/q\"",
                "vm[0] (\"a\")",
                "needs a cid",
            ),
            (
                "name=\"a\"\nbackend=\"netns\"\nnetns=\"../x\"\ncid=3",
                ".netns",
                "neither",
            ),
            (
                "name=\"a\"\nbackend=\"netns\"\nnetns=\"x\"\ncid=3\nnetwork=\"zz\"",
                ".network",
                "no [[network]]",
            ),
            (
                "name=\"a b\"\nbackend=\"netns\"\nnetns=\"x\"\ncid=3",
                ".name",
                "characters",
            ),
            (
                "name=\"a\"\nbackend=\"netns\"\nnetns=\"x\"\ncid=3\nmax_nics=0",
                ".max_nics",
                "between 1",
            ),
            (
                "name=\"a\"\nbackend=\"netns\"\nnetns=\"x\"\ncid=3\nmax_nics=2\nwarm_pool=3",
                ".warm_pool",
                "more than max_nics",
            ),
            (
                "name=\"a\"\nbackend=\"netns\"\nnetns=\"x\"\nsocket=\"rel\"",
                ".socket",
                "absolute",
            ),
        ];
        for (vm, key, msg) in cases {
            let e = err(&format!("{net}[[vm]]\n{vm}\n"));
            assert!(e.contains(key) && e.contains(msg), "{vm}: {e}");
        }
        let dup_cid = format!("{net}[[vm]]\nname=\"a\"\nbackend=\"netns\"\nnetns=\"x\"\ncid=5\n[[vm]]\nname=\"b\"\nbackend=\"netns\"\nnetns=\"y\"\ncid=5\n");
        let e = err(&dup_cid);
        assert!(
            e.contains("vm[1] (\"b\").cid") && e.contains("already VM \"a\""),
            "{e}"
        );
        let dup_name = format!("{net}[[vm]]\nname=\"a\"\nbackend=\"netns\"\nnetns=\"x\"\ncid=5\n[[vm]]\nname=\"a\"\nbackend=\"netns\"\nnetns=\"y\"\ncid=6\n");
        assert!(err(&dup_name).contains("duplicate VM name"));
    }

    #[test]
    fn bad_agent_settings() {
        assert!(err("[agent]\nmac_prefix = \"01:00\"").contains("multicast"));
        assert!(err("[agent]\nmac_prefix = \"xx\"").contains("agent.mac_prefix"));
        assert!(err("[agent]\nlisten_vsock = \"maybe\"").contains("agent.listen_vsock"));
        assert!(err("[agent]\nqmp_timeout_ms = 0").contains("agent.qmp_timeout_ms"));
        let net = with_network("subnet = \"10.88.0.0/16\"\ngateway = \"10.88.0.1\"");
        assert!(err(&format!("{net}[hostlo]\nsubnet = \"10.88.5.0/24\"")).contains("hostlo.subnet"));
        assert!(
            err(&format!("{net}[hostlo]\nsubnet = \"169.254.1.0/25\"")).contains("at least /24")
        );
        assert_eq!(
            parse(&net).unwrap().hostlo.subnet.to_string(),
            "169.254.77.0/24"
        );
    }
}
