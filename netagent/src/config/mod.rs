//! Agent configuration: `/etc/nestless/netagent.toml`.
//!
//! ```text
//! text ──raw (serde, typed fields, deny_unknown_fields)──▶ RawConfig
//!      ──check (the rules between values)──────────────────▶ Config
//! ```
//!
//! * `raw`: the file's schema. Fields deserialise straight into their types
//!   (`ipnet` CIDRs, `std::net` addresses, [`MacPrefix`], durations, the
//!   `backend` tag) and every rule about one value alone is checked there.
//! * `check`: the rules between values (gateway in subnet, overlaps,
//!   duplicates, backend keys, quotas), building the checked [`Config`].
//! * this file: the checked types and [`ConfigError`].
//!
//! Every error names the file and the key, e.g. `netagent.toml: network[0]
//! ("default").gateway: 10.0.0.1 is outside subnet 10.88.0.0/16`.
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

mod check;
mod raw;

use std::{
    collections::BTreeMap,
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    ops::Deref,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::{Ipv4Net, Ipv6Net};
use nestless_model::mac::parse_hex_bytes;
use serde::{Deserialize, Deserializer, Serialize};

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
    /// The file is not valid TOML.
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The TOML parser's account, with the line.
        message: String,
    },
    /// A key is unknown, or its value is wrong (mistyped, out of range, or
    /// at odds with another).
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

/// Something in a valid configuration that may still fail at run time:
/// `--check-config` prints it, the agent logs it at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    /// The file.
    pub path: PathBuf,
    /// The key, as [`ConfigError::Invalid`] names it.
    pub key: String,
    /// What may fail.
    pub message: String,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.path.display(), self.key, self.message)
    }
}

/// Most ports a Linux bridge holds: `BR_MAX_PORTS` (1 << 10) less port 0,
/// which the kernel keeps. Adding one more fails with `EXFULL`.
pub const BRIDGE_MAX_PORTS: u32 = 1023;

// ---------------------------------------------------------------- checked form

/// Whether the agent listens on AF_VSOCK. In the file: `true`, `false` or
/// `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenVsock {
    /// Listen when the host has AF_VSOCK (vhost_vsock loaded); otherwise only unix sockets.
    Auto,
    /// Always; failing to listen is an error.
    Yes,
    /// Never.
    No,
}

impl<'de> Deserialize<'de> for ListenVsock {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ListenVsock, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ListenVsock;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true, false or \"auto\"")
            }
            fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<ListenVsock, E> {
                Ok(if b { ListenVsock::Yes } else { ListenVsock::No })
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<ListenVsock, E> {
                match s {
                    "auto" => Ok(ListenVsock::Auto),
                    other => Err(E::custom(format!(
                        "{other:?} is not true, false or \"auto\""
                    ))),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<ListenVsock, E> {
                Err(E::custom(format!("{n} is not true, false or \"auto\"")))
            }
        }
        d.deserialize_any(V)
    }
}

/// The first bytes of every MAC the agent hands out: 0 to 5 bytes, not a
/// multicast prefix. In the file: `"52:54:00"` (the default), or `""` for
/// random locally administered MACs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacPrefix(Vec<u8>);

impl Default for MacPrefix {
    /// QEMU's `52:54:00`.
    fn default() -> MacPrefix {
        MacPrefix(vec![0x52, 0x54, 0x00])
    }
}

impl Deref for MacPrefix {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl std::str::FromStr for MacPrefix {
    type Err = String;
    fn from_str(p: &str) -> Result<MacPrefix, String> {
        if p.is_empty() {
            return Ok(MacPrefix(Vec::new()));
        }
        let n = p.split([':', '-']).count();
        let bytes = (n <= 5)
            .then(|| parse_hex_bytes(p, n))
            .flatten()
            .ok_or_else(|| format!("{p:?} is not 0 to 5 hex bytes like \"52:54:00\""))?;
        if bytes.first().is_some_and(|b| b & 1 == 1) {
            return Err(format!("{p:?} is a multicast prefix"));
        }
        Ok(MacPrefix(bytes))
    }
}

impl<'de> Deserialize<'de> for MacPrefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<MacPrefix, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Agent-wide settings (`[agent]`).
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// Where the state store lives (`state.db`; `state.json` before).
    pub state_dir: PathBuf,
    /// Which store holds the state (`state_store`, default `"sqlite"`; see
    /// [`crate::state`]).
    pub state_store: crate::state::StoreKind,
    /// The root-only unix socket `nestlessctl` talks to.
    pub admin_socket: PathBuf,
    /// AF_VSOCK port, also the `<uds>_<port>` suffix of vhost-device-vsock sockets.
    pub vsock_port: u32,
    /// Whether to listen on AF_VSOCK.
    pub listen_vsock: ListenVsock,
    /// First bytes of every MAC the agent hands out (0 to 5 bytes).
    pub mac_prefix: MacPrefix,
    /// Deadline of one QMP command.
    pub qmp_timeout: Duration,
    /// How long to wait for the guest to release an unplugged device.
    pub unplug_timeout: Duration,
    /// Connections one VM may hold at once; `None`: one per NIC of its
    /// `max_nics` and 16 more, at least 64 (`server::conns::vm_budget`).
    pub max_connections_per_vm: Option<usize>,
    /// A connection (of a VM or the admin socket) that carries nothing this
    /// long is closed.
    pub idle_timeout: Duration,
    /// Requests one VM may make per second, past its burst.
    pub requests_per_sec_per_vm: u32,
    /// Requests one VM may make at once.
    pub request_burst_per_vm: u32,
    /// The libvirt connection URI of `backend = "libvirt"` VMs that give
    /// none (`libvirt_uri`, default `qemu:///system`), and of discovery.
    pub libvirt_uri: String,
    /// Whether running domains carrying the nestless metadata element are
    /// registered and served by themselves (`libvirt_discover`, default
    /// false; see [`crate::backend::libvirt::discover`]).
    pub libvirt_discover: bool,
    /// How often libvirt is asked which domains run (`libvirt_poll_ms`,
    /// default 1000).
    pub libvirt_poll: Duration,
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

/// Smallest MTU of a link that carries IPv6 (RFC 8200): below it the kernel
/// disables IPv6 on the link and refuses its addresses.
pub const IPV6_MIN_MTU: u32 = 1280;

/// Size of the block of reserved subnet anycast addresses at the top of
/// every IPv6 subnet (RFC 2526).
const ANYCAST6_BLOCK: u128 = 128;

impl NetworkConfig {
    /// The IPv6 address paired with `v4`: the IPv6 subnet's network plus the
    /// IPv4 address's host offset. `None` without `subnet6`, or when `v4` is
    /// not in the subnet or the offset does not fit.
    pub fn ipv6_for(&self, v4: Ipv4Addr) -> Option<Ipv6Addr> {
        let net6 = self.subnet6?;
        mirror6(self.subnet, net6, v4)
    }

    /// Whether the allocator may hand `v4` out: in the range, and not
    /// [`NetworkConfig::unleasable`].
    pub fn leases(&self, v4: Ipv4Addr) -> bool {
        (self.range.0..=self.range.1).contains(&v4) && self.unleasable(v4).is_none()
    }

    /// Why the IPv4 address `v4` (of the range) cannot be leased, or `None`:
    /// the gateway, or an address whose IPv6 mirror is the IPv6 gateway or
    /// not a host address of `subnet6`.
    pub fn unleasable(&self, v4: Ipv4Addr) -> Option<String> {
        if v4 == self.gateway {
            return Some("the gateway".into());
        }
        let net6 = self.subnet6?;
        let Some(v6) = mirror6(self.subnet, net6, v4) else {
            return Some(format!("its IPv6 mirror is outside {net6}"));
        };
        if Some(v6) == self.gateway6 {
            return Some(format!("its IPv6 mirror {v6} is gateway6"));
        }
        reserved6(net6, v6).map(|why| format!("its IPv6 mirror {v6} is {why}"))
    }
}

/// `net6`'s network plus the host offset of `v4` in `subnet`.
pub fn mirror6(subnet: Ipv4Net, net6: Ipv6Net, v4: Ipv4Addr) -> Option<Ipv6Addr> {
    if !subnet.contains(&v4) {
        return None;
    }
    let offset = u128::from(u32::from(v4) - u32::from(subnet.network()));
    let host_bits = 128 - u32::from(net6.prefix_len());
    if host_bits < 128 && offset >> host_bits != 0 {
        return None;
    }
    Some(Ipv6Addr::from(u128::from(net6.network()) + offset))
}

/// Why `a`, an address of `net6`, is no host's address: the subnet-router
/// anycast address (all host bits zero), or one of the reserved subnet
/// anycast addresses, the top 128 of the subnet (RFC 2526; the all-ones
/// address among them). `None` for a usable address.
pub fn reserved6(net6: Ipv6Net, a: Ipv6Addr) -> Option<&'static str> {
    if !net6.contains(&a) {
        return Some("outside subnet6");
    }
    let host_bits = 128 - u32::from(net6.prefix_len());
    let offset = u128::from(a) - u128::from(net6.network());
    let size = if host_bits >= 128 {
        u128::MAX
    } else {
        1u128 << host_bits
    };
    if offset == 0 {
        Some("the subnet-router anycast address of subnet6")
    } else if offset >= size.saturating_sub(ANYCAST6_BLOCK) {
        Some("a reserved subnet anycast address of subnet6 (its top 128, RFC 2526)")
    } else {
        None
    }
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
    /// A libvirt domain: taps on the bridge, handed to libvirt as
    /// unmanaged `<interface type='ethernet'>` devices.
    Libvirt {
        /// libvirt's connection URI.
        uri: String,
        /// The domain's name.
        domain: String,
        /// Also add the NICs to the domain's persistent definition.
        persist_nics: bool,
    },
}

impl BackendConfig {
    /// `qemu` or `netns`.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendConfig::Qemu { .. } => "qemu",
            BackendConfig::Netns { .. } => "netns",
            BackendConfig::Libvirt { .. } => "libvirt",
        }
    }

    /// The QMP socket or the namespace path.
    pub fn endpoint(&self) -> &Path {
        match self {
            BackendConfig::Qemu { qmp_socket, .. } => qmp_socket,
            BackendConfig::Netns { netns } => netns,
            BackendConfig::Libvirt { domain, .. } => Path::new(domain),
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
    /// Registered at run time ([`VmSpec`], kept in `vms.json`) rather than a
    /// `[[vm]]` entry of the file.
    pub registered: bool,
    /// Registered by the agent from a running libvirt domain's nestless
    /// metadata (and unregistered when the domain stops).
    pub discovered: bool,
}

/// A VM registered at run time (`RegisterVm`, `nestlessctl vm add`): the
/// keys of a `[[vm]]` entry, kept as given in the registered VMs' store
/// (`<state_dir>/vms.json`) and checked with the file's entries
/// ([`Config::with_registered`]) each time the effective configuration is
/// built. `None` is a key left out (its default, as in the file).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// `name`.
    pub name: String,
    /// `backend`: `"qemu"`, `"netns"` or `"libvirt"`.
    pub backend: String,
    /// `network`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// `cid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cid: Option<u32>,
    /// `vsock_uds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_uds: Option<PathBuf>,
    /// `socket`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// `max_nics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_nics: Option<u32>,
    /// `warm_pool`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_pool: Option<u32>,
    /// `qmp_socket` (qemu).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qmp_socket: Option<PathBuf>,
    /// `hotplug_slots` (qemu).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug_slots: Option<Vec<String>>,
    /// `netns` (netns): a name under `/run/netns` or a path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// `domain` (libvirt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// `libvirt_uri` (libvirt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt_uri: Option<String>,
    /// `persist_nics` (libvirt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persist_nics: Option<bool>,
    /// Registered from a domain's metadata by the agent itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub discovered: bool,
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
    /// What may fail at run time though the file is valid.
    pub warnings: Vec<ConfigWarning>,
    /// The file's entries, kept to check them again with another set of
    /// registered VMs.
    file: raw::RawConfig,
    /// The registered VMs (also in `vms`, after the file's), as given.
    registered: Vec<VmSpec>,
    /// Where the registered VMs are kept (errors about them name it).
    registered_path: PathBuf,
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
        check::check(path, raw::from_toml(path, text)?, Path::new(""), &[])
    }

    /// The effective configuration of this file with `vms` as the
    /// registered VMs (kept in `store`, which errors about them name):
    /// everything checked together, as if the registered VMs were `[[vm]]`
    /// entries after the file's. A registered VM may not share a name (or
    /// a socket, CID, QMP socket, namespace) with one of the file's.
    pub fn with_registered(&self, store: &Path, vms: &[VmSpec]) -> Result<Config, ConfigError> {
        check::check(&self.path, self.file.clone(), store, vms)
    }

    /// How errors name network `name`: `network[1] ("name")` (its entry in
    /// the file), or `network ("name")` when the file has none.
    pub fn network_key(&self, name: &str) -> String {
        match self.file.network.iter().position(|n| n.name == name) {
            Some(i) => format!("network[{i}] ({name:?})"),
            None => format!("network ({name:?})"),
        }
    }

    /// How errors name VM `name`: `vm[0] ("name")` (its entry in the file)
    /// or `registered vm ("name")`.
    pub fn vm_key(&self, name: &str) -> String {
        match self.file.vm.iter().position(|v| v.name == name) {
            Some(i) => format!("vm[{i}] ({name:?})"),
            None => raw::registered_key(name),
        }
    }

    /// The registered VMs, as given.
    pub fn registered(&self) -> &[VmSpec] {
        &self.registered
    }

    /// Where the registered VMs are kept (empty when there are none).
    pub fn registered_path(&self) -> &Path {
        &self.registered_path
    }

    /// The VM with this name.
    pub fn vm(&self, name: &str) -> Option<&VmConfig> {
        self.vms.iter().find(|v| v.name == name)
    }
}

pub use crate::names::check_ifname;

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

    /// `state_store` takes the two stores by name; anything else is an
    /// error at its key.
    #[test]
    fn state_store_is_checked_at_load() {
        use crate::state::StoreKind;
        let with =
            |v: &str| GOOD.replacen("[agent]\n", &format!("[agent]\nstate_store = {v}\n"), 1);
        assert!(GOOD.contains("[agent]\n"));
        assert_eq!(parse(GOOD).unwrap().agent.state_store, StoreKind::Sqlite);
        let c = parse(&with("\"json\"")).unwrap();
        assert_eq!(c.agent.state_store, StoreKind::Json);
        for bad in ["\"redb\"", "1", "\"\""] {
            let e = err(&with(bad));
            assert!(
                e.starts_with("test.toml:") && e.contains("agent.state_store"),
                "{bad}: {e}"
            );
        }
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
            ("subnet = \"0.0.0.0/0\"\ngateway = \"10.88.0.1\"", ".subnet", "too large (at least /8)"),
            ("subnet = \"10.88.0.0/16\"\ngateway = \"10.99.0.1\"", ".gateway", "outside subnet"),
            ("subnet = \"10.88.0.0/16\"\ngateway = \"10.88.0.0\"", ".gateway", "network or broadcast"),
            ("subnet = \"10.88.0.0/16\"\ngateway = \"banana\"", ".gateway", "not an IPv4 address"),
            ("subnet = \"10.88.0.0/16\"\ngateway = \"10.88.0.1\"\nmtu = 10", ".mtu", "between 68"),
            ("subnet = \"10.88.0.0/16\"\ngateway = \"10.88.0.1\"\nrange_start = \"10.88.9.0\"\nrange_end = \"10.88.1.0\"", ".range_end", "comes before"),
            ("subnet = \"10.88.0.0/16\"\ngateway = \"10.88.0.1\"\nsubnet6 = \"fd00::/120\"", ".subnet6", "too small"),
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

    /// The network of issue 9 (items 3 and 7), with one key changed: each
    /// case is refused naming that key.
    fn net6(extra: &str) -> String {
        with_network(&format!(
            "subnet = \"10.20.30.0/24\"\ngateway = \"10.20.30.254\"\n\
             subnet6 = \"fd00:20::/64\"\ngateway6 = \"fd00:20::1\"\n{extra}"
        ))
    }

    /// Issue 9, item 3: the IPv6 side of a network: its gateway is a host
    /// address inside subnet6, subnet6 is a network of host addresses, and
    /// it can mirror the whole IPv4 range.
    #[test]
    fn ipv6_networks() {
        let c = parse(&net6("")).unwrap();
        let n = &c.networks["n"];
        assert_eq!(
            n.unleasable("10.20.30.1".parse().unwrap()).unwrap(),
            "its IPv6 mirror fd00:20::1 is gateway6"
        );
        assert!(n.unleasable("10.20.30.2".parse().unwrap()).is_none());
        let v6 = |subnet6: &str, gateway6: &str, range: &str| {
            with_network(&format!(
                "subnet = \"10.0.0.0/24\"\ngateway = \"10.0.0.1\"\nsubnet6 = \"{subnet6}\"\n{gateway6}{range}"
            ))
        };
        let cases = [
            (v6("fd00::/64", "gateway6 = \"fd01::1\"\n", ""), ".gateway6", "outside subnet6"),
            (v6("fd00::/64", "gateway6 = \"fd00::\"\n", ""), ".gateway6", "subnet-router anycast"),
            (v6("fd00::/64", "gateway6 = \"fd00::ffff:ffff:ffff:ff80\"\n", ""), ".gateway6", "reserved subnet anycast"),
            (v6("fd00::/64", "gateway6 = \"fd00::ffff:ffff:ffff:ffff\"\n", ""), ".gateway6", "reserved subnet anycast"),
            // /24 of IPv4 needs more than the 256 addresses of a /120: its
            // top 128 are anycast addresses.
            (v6("fd00::/120", "", ""), ".subnet6", "too small to mirror the IPv4 range 10.0.0.1-10.0.0.254"),
            (v6("ff02::/64", "", ""), ".subnet6", "multicast"),
            (v6("::/64", "", ""), ".subnet6", "unspecified and loopback"),
            (v6("::ffff:0:0/96", "", ""), ".subnet6", "IPv4-mapped"),
            (with_network("subnet = \"10.0.0.0/24\"\ngateway = \"10.0.0.1\"\nsubnet6 = \"fd00::/64\"\nmtu = 1279"), ".mtu", "below 1280"),
            (with_network("subnet = \"127.1.0.0/24\"\ngateway = \"127.1.0.1\""), ".subnet", "loopback"),
            (with_network("subnet = \"224.1.0.0/24\"\ngateway = \"224.1.0.1\""), ".subnet", "multicast"),
            (with_network("subnet = \"0.0.0.0/24\"\ngateway = \"0.0.0.1\""), ".subnet", "this network"),
            (with_network("subnet = \"240.0.0.0/24\"\ngateway = \"240.0.0.1\""), ".subnet", "reserved"),
            // A range of one address, which is a gateway's mirror.
            (v6("fd00::/64", "gateway6 = \"fd00::5\"\n", "range_start = \"10.0.0.5\"\nrange_end = \"10.0.0.5\""), ".range_end", "holds no address to lease"),
            (with_network("subnet = \"10.0.0.0/24\"\ngateway = \"10.0.0.5\"\nrange_start = \"10.0.0.5\"\nrange_end = \"10.0.0.5\""), ".range_end", "holds no address to lease"),
        ];
        for (text, key, msg) in cases {
            let e = err(&text);
            assert!(e.contains(key) && e.contains(msg), "{text}\n{e}");
        }
        // The edges that are right: 1280 with IPv6, a /119 for a /24, a
        // gateway6 anywhere else in subnet6.
        for ok in [
            with_network("subnet = \"10.0.0.0/24\"\ngateway = \"10.0.0.1\"\nsubnet6 = \"fd00::/64\"\nmtu = 1280"),
            with_network("subnet = \"10.0.0.0/24\"\ngateway = \"10.0.0.1\"\nmtu = 576"),
            v6("fd00::/119", "gateway6 = \"fd00::17f\"\n", ""),
            v6("fd00::/64", "gateway6 = \"fd00::ffff:ffff:ffff:ff7f\"\n", ""),
        ] {
            parse(&ok).unwrap_or_else(|e| panic!("{ok}\n{e}"));
        }
    }

    /// Issue 9, item 7: routes `ip route add` refuses, and gateways that
    /// are no router's address, are refused at check time naming the key.
    #[test]
    fn routes_the_kernel_refuses() {
        let route = |r: &str| net6(&format!("routes = [{r}]"));
        let cases = [
            (route("{destination = \"10.50.0.0/16\", gateway = \"10.99.0.1\"}"), ".routes[0].gateway", "outside subnet 10.20.30.0/24"),
            (route("{destination = \"fd50::/48\", gateway = \"fd99::1\"}"), ".routes[0].gateway", "outside subnet6 fd00:20::/64"),
            (route("{destination = \"10.50.0.1/16\", gateway = \"10.20.30.254\"}"), ".routes[0].destination", "host bits set (did you mean 10.50.0.0/16?)"),
            (route("{destination = \"fd50::1/48\"}"), ".routes[0].destination", "host bits"),
            (route("{destination = \"10.50.0.0/16\", gateway = \"fd00:20::1\"}"), ".routes[0].gateway", "another address family"),
            (route("{destination = \"fd50::/48\", gateway = \"10.20.30.254\"}"), ".routes[0].gateway", "another address family"),
            (route("{destination = \"10.50.0.0/16\", gateway = \"10.20.30.0\"}"), ".routes[0].gateway", "network or broadcast"),
            (route("{destination = \"10.50.0.0/16\", gateway = \"10.20.30.255\"}"), ".routes[0].gateway", "network or broadcast"),
            (route("{destination = \"fd50::/48\", gateway = \"fd00:20::\"}"), ".routes[0].gateway", "subnet-router anycast"),
            (route("{destination = \"10.50.0.0/16\", gateway = \"10.20.30.7\"}"), ".routes[0].gateway", "lease range"),
            (route("{destination = \"fd50::/48\", gateway = \"fd00:20::7\"}"), ".routes[0].gateway", "lease range"),
            (route("{destination = \"0.0.0.0/0\", gateway = \"10.20.30.254\"}"), ".routes[0].destination", "default route"),
            (route("{destination = \"::/0\", gateway = \"fd00:20::1\"}"), ".routes[0].destination", "default route"),
            (route("{destination = \"10.20.30.0/24\"}"), ".routes[0].destination", "own subnet"),
            (route("{destination = \"fd00:20::/64\"}"), ".routes[0].destination", "own subnet"),
            (
                route("{destination = \"10.50.0.0/16\"}, {destination = \"10.60.0.0/16\"}, {destination = \"10.50.0.0/16\", gateway = \"10.20.30.254\"}"),
                ".routes[2].destination",
                "routed already by routes[0]",
            ),
        ];
        for (text, key, msg) in cases {
            let e = err(&text);
            assert!(e.contains(key) && e.contains(msg), "{text}\n{e}");
        }
        // What the kernel takes: a gateway on the link outside the range,
        // the gateways themselves, on-link routes, ::/0 without gateway6.
        let ok = net6(
            "range_end = \"10.20.30.200\"\nroutes = [{destination = \"10.50.0.0/16\", gateway = \"10.20.30.250\"}, \
             {destination = \"10.60.0.0/16\", gateway = \"10.20.30.254\"}, {destination = \"fd50::/48\", gateway = \"fd00:20::1\"}, \
             {destination = \"fd60::/48\", gateway = \"fd00:20::fa\"}, {destination = \"172.16.0.0/12\"}]",
        );
        let c = parse(&ok).unwrap_or_else(|e| panic!("{ok}\n{e}"));
        assert_eq!(c.networks["n"].routes.len(), 5);
        parse(&with_network(
            "subnet = \"10.0.0.0/24\"\ngateway = \"10.0.0.1\"\nsubnet6 = \"fd00::/64\"\nroutes = [{destination = \"::/0\"}]",
        ))
        .unwrap();
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

    #[cfg(feature = "libvirt")]
    #[test]
    fn libvirt_vms() {
        let net = with_network("subnet = \"10.88.0.0/16\"\ngateway = \"10.88.0.1\"");
        let c = parse(&format!(
            "[agent]\nlibvirt_uri = \"qemu+ssh://h/system\"\nlibvirt_discover = true\nlibvirt_poll_ms = 250\n{net}\
             [[vm]]\nname=\"a\"\nbackend=\"libvirt\"\ncid=3\n\
             [[vm]]\nname=\"b\"\nbackend=\"libvirt\"\ndomain=\"dom b\"\nlibvirt_uri=\"qemu:///session\"\npersist_nics=true\ncid=4\n"
        ))
        .unwrap();
        assert!(c.agent.libvirt_discover);
        assert_eq!(c.agent.libvirt_poll, Duration::from_millis(250));
        assert_eq!(
            c.vms[0].backend,
            BackendConfig::Libvirt {
                uri: "qemu+ssh://h/system".into(),
                domain: "a".into(),
                persist_nics: false
            }
        );
        assert_eq!(
            c.vms[1].backend,
            BackendConfig::Libvirt {
                uri: "qemu:///session".into(),
                domain: "dom b".into(),
                persist_nics: true
            }
        );
        let d = parse(&format!(
            "{net}[[vm]]\nname=\"a\"\nbackend=\"libvirt\"\ncid=3\n"
        ))
        .unwrap();
        assert!(!d.agent.libvirt_discover);
        assert_eq!(
            d.vms[0].backend,
            BackendConfig::Libvirt {
                uri: "qemu:///system".into(),
                domain: "a".into(),
                persist_nics: false
            }
        );
        let cases = [
            (
                "name=\"a\"\nbackend=\"libvirt\"\ncid=3\nqmp_socket=\"/q\"",
                ".backend",
                "not for backend = \"libvirt\"",
            ),
            (
                "name=\"a\"\nbackend=\"libvirt\"\ncid=3\nnetns=\"x\"",
                ".backend",
                "not for backend = \"libvirt\"",
            ),
            (
                "name=\"a\"\nbackend=\"qemu\"\nqmp_socket=\"/q\"\ncid=3\ndomain=\"d\"",
                ".domain",
                "only for backend = \"libvirt\"",
            ),
            (
                "name=\"a\"\nbackend=\"libvirt\"\ncid=3\ndomain=\"a/b\"",
                ".domain",
                "not a libvirt domain name",
            ),
            (
                "name=\"a\"\nbackend=\"libvirt\"\ncid=3\nlibvirt_uri=\"system\"",
                ".libvirt_uri",
                "not a libvirt connection URI",
            ),
            (
                "name=\"a\"\nbackend=\"libvirt\"\ncid=3\ndiscovered=true",
                ".discovered",
                "never in the file",
            ),
            (
                "name=\"a\"\nbackend=\"libvirt\"",
                "vm[0] (\"a\")",
                "needs a cid",
            ),
        ];
        for (vm, key, msg) in cases {
            let e = err(&format!("{net}[[vm]]\n{vm}\n"));
            assert!(e.contains(key) && e.contains(msg), "{vm}: {e}");
        }
        let e = err(&format!("[agent]\nlibvirt_uri = \"nope\"\n{net}"));
        assert!(e.contains("agent.libvirt_uri"), "{e}");
        let two = format!(
            "{net}[[vm]]\nname=\"a\"\nbackend=\"libvirt\"\ndomain=\"d\"\ncid=3\n[[vm]]\nname=\"b\"\nbackend=\"libvirt\"\ndomain=\"d\"\ncid=4\n"
        );
        let e = err(&two);
        assert!(
            e.contains("vm[1] (\"b\").domain") && e.contains("already VM \"a\""),
            "{e}"
        );
        // A domain's metadata goes through the checks of a registered VM.
        let xml = |inner: &str| {
            format!(
                "<domain><name>web-1</name><metadata><n:vm xmlns:n='{}'>{inner}</n:vm></metadata>\
                 <devices><vsock model='virtio'><cid address='9'/></vsock></devices></domain>",
                crate::backend::domxml::METADATA_NS
            )
        };
        let store = Path::new("/s/vms.json");
        let spec = |inner: &str| {
            crate::backend::domxml::domain_spec("web-1", &xml(inner), "qemu:///system")
                .unwrap()
                .unwrap()
        };
        let r = d
            .with_registered(store, &[spec("<n:max-nics>4</n:max-nics>")])
            .unwrap();
        let vm = r.vm("web-1").unwrap();
        assert!(vm.registered && vm.discovered);
        assert_eq!((vm.cid, vm.max_nics), (Some(9), 4));
        let e = d
            .with_registered(store, &[spec("<n:network>nope</n:network>")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("registered vm (\"web-1\").network"), "{e}");
        let e = d
            .with_registered(store, &[spec("<n:max-nics>0</n:max-nics>")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("registered vm (\"web-1\").max_nics"), "{e}");
    }

    #[cfg(not(feature = "libvirt"))]
    #[test]
    fn libvirt_is_refused_without_the_feature() {
        let net = with_network("subnet = \"10.88.0.0/16\"\ngateway = \"10.88.0.1\"");
        let e = err(&format!(
            "{net}[[vm]]\nname=\"a\"\nbackend=\"libvirt\"\ncid=3\n"
        ));
        assert!(
            e.contains("vm[0] (\"a\").backend") && e.contains("without libvirt"),
            "{e}"
        );
        let e = err(&format!("[agent]\nlibvirt_discover = true\n{net}"));
        assert!(e.contains("agent.libvirt_discover"), "{e}");
    }

    /// Issue 11, item 8: one VM cannot be given more NICs than a bridge
    /// has ports (an error); VMs whose quotas add up to more share the
    /// bridge's ports (a warning naming the network's bridge).
    #[test]
    fn bridge_port_limit() {
        let net = with_network("subnet = \"10.0.0.0/20\"\ngateway = \"10.0.0.1\"");
        let vm = |name: &str, cid: u32, max: u32| {
            format!("[[vm]]\nname = \"{name}\"\nbackend = \"netns\"\nnetns = \"{name}\"\ncid = {cid}\nmax_nics = {max}\n")
        };
        let e = err(&format!("{net}{}", vm("a", 3, 1024)));
        assert!(
            e.contains("vm[0] (\"a\").max_nics")
                && e.contains("1023, the most ports a Linux bridge holds"),
            "{e}"
        );
        let c = parse(&format!("{net}{}", vm("a", 3, 1023))).unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let c = parse(&format!("{net}{}{}", vm("a", 3, 600), vm("b", 4, 424))).unwrap();
        assert_eq!(c.warnings.len(), 1);
        let w = c.warnings[0].to_string();
        assert!(
            w.starts_with("test.toml: network[0] (\"n\").bridge:")
                && w.contains("may hold 1024 NICs")
                && w.contains("at most 1023 ports")
                && w.contains("RESOURCE_EXHAUSTED"),
            "{w}"
        );
        let c = parse(&format!("{net}{}{}", vm("a", 3, 600), vm("b", 4, 423))).unwrap();
        assert!(c.warnings.is_empty());
    }

    /// Issue 11, item 9: configurations that load but cannot work are
    /// refused, each naming the file and the key.
    #[test]
    fn configs_that_cannot_work_are_refused() {
        let net = with_network("subnet = \"10.88.0.0/16\"\ngateway = \"10.88.0.1\"");
        let agent = "[agent]\nadmin_socket = \"/run/nl/admin.sock\"\n";
        let vm = |name: &str, rest: &str| format!("[[vm]]\nname = \"{name}\"\n{rest}\n");
        let netns = |ns: &str, sock: &str| {
            format!("backend = \"netns\"\nnetns = \"{ns}\"\nsocket = \"{sock}\"")
        };
        let qemu = |qmp: &str, cid: u32| {
            format!("backend = \"qemu\"\nqmp_socket = \"{qmp}\"\ncid = {cid}")
        };
        let cases: Vec<(String, &str, &str)> = vec![
            // A VM socket that is the admin socket, or another VM's.
            (
                format!("{agent}{net}{}", vm("a", &netns("x", "/run/nl/admin.sock"))),
                "vm[0] (\"a\").socket",
                "the admin socket",
            ),
            (
                format!(
                    "{agent}{net}{}{}",
                    vm("a", &netns("x", "/run/nl/a.sock")),
                    vm("b", &netns("y", "/run/nl/a.sock"))
                ),
                "vm[1] (\"b\").socket",
                "already VM \"a\"'s socket",
            ),
            // vhost-device-vsock's <uds>_<port> landing on the admin socket names vsock_uds.
            (
                format!(
                    "[agent]\nadmin_socket = \"/run/nl/v_7070\"\n{net}{}",
                    vm(
                        "a",
                        "backend = \"netns\"\nnetns = \"x\"\nvsock_uds = \"/run/nl/v\""
                    )
                ),
                "vm[0] (\"a\").vsock_uds",
                "the admin socket",
            ),
            // Two VMs on one QEMU, or one namespace.
            (
                format!(
                    "{net}{}{}",
                    vm("a", &qemu("/run/q", 3)),
                    vm("b", &qemu("/run/q", 4))
                ),
                "vm[1] (\"b\").qmp_socket",
                "already VM \"a\"'s",
            ),
            (
                format!(
                    "{net}{}{}",
                    vm("a", &netns("x", "/run/nl/a.sock")),
                    vm("b", &netns("/run/netns/x", "/run/nl/b.sock"))
                ),
                "vm[1] (\"b\").netns",
                "already VM \"a\"'s",
            ),
            // A QMP socket the agent would listen on.
            (
                format!("{agent}{net}{}", vm("a", &qemu("/run/nl/admin.sock", 3))),
                "vm[0] (\"a\").qmp_socket",
                "the admin socket",
            ),
            (
                format!(
                    "{net}{}{}",
                    vm("a", &netns("x", "/run/nl/a.sock")),
                    vm("b", &qemu("/run/nl/a.sock", 4))
                ),
                "vm[1] (\"b\").qmp_socket",
                "VM \"a\"'s socket",
            ),
            // Relative paths.
            (
                format!("[agent]\nstate_dir = \"state\"\n{net}"),
                "agent.state_dir",
                "not an absolute path",
            ),
            (
                format!("[agent]\nadmin_socket = \"admin.sock\"\n{net}"),
                "agent.admin_socket",
                "not an absolute path",
            ),
            (
                format!("{net}{}", vm("a", &netns("x", "a.sock"))),
                "vm[0] (\"a\").socket",
                "not an absolute path",
            ),
            (
                format!(
                    "{net}{}",
                    vm("a", "backend = \"netns\"\nnetns = \"x\"\nvsock_uds = \"v\"")
                ),
                "vm[0] (\"a\").vsock_uds",
                "not an absolute path",
            ),
            (
                format!("{net}{}", vm("a", &qemu("q.qmp", 3))),
                "vm[0] (\"a\").qmp_socket",
                "not an absolute path",
            ),
            // Subnets of no host addresses. Whole halves of the space are
            // refused as larger than a /8 before that.
            (
                with_network("subnet = \"0.0.0.0/1\"\ngateway = \"10.0.0.1\""),
                ".subnet",
                "too large (at least /8)",
            ),
            (
                with_network("subnet = \"0.0.0.0/8\"\ngateway = \"0.0.0.1\""),
                ".subnet",
                "\"this network\"",
            ),
            (
                with_network("subnet = \"224.0.0.0/8\"\ngateway = \"224.0.0.1\""),
                ".subnet",
                "multicast",
            ),
            (
                with_network("subnet = \"127.0.0.0/8\"\ngateway = \"127.0.0.1\""),
                ".subnet",
                "loopback",
            ),
            (
                with_network("subnet = \"239.1.0.0/16\"\ngateway = \"239.1.0.1\""),
                ".subnet",
                "multicast",
            ),
            (
                with_network(
                    "subnet = \"10.0.0.0/24\"\ngateway = \"10.0.0.1\"\nsubnet6 = \"::/1\"",
                ),
                ".subnet6",
                "unspecified and loopback",
            ),
            (
                with_network(
                    "subnet = \"10.0.0.0/24\"\ngateway = \"10.0.0.1\"\nsubnet6 = \"8000::/1\"",
                ),
                ".subnet6",
                "multicast",
            ),
            (
                with_network(
                    "subnet = \"10.0.0.0/24\"\ngateway = \"10.0.0.1\"\nsubnet6 = \"::1/128\"",
                ),
                ".subnet6",
                "unspecified and loopback",
            ),
            (
                with_network(
                    "subnet = \"10.0.0.0/24\"\ngateway = \"10.0.0.1\"\nsubnet6 = \"ff05::/64\"",
                ),
                ".subnet6",
                "multicast",
            ),
            (
                format!("{net}[hostlo]\nsubnet = \"127.0.0.0/24\""),
                "hostlo.subnet",
                "loopback",
            ),
            (
                format!("{net}[hostlo]\nsubnet = \"224.0.0.0/24\""),
                "hostlo.subnet",
                "multicast",
            ),
            (
                format!("{net}[hostlo]\nsubnet = \"0.0.0.0/1\""),
                "hostlo.subnet",
                "\"this network\"",
            ),
        ];
        for (text, key, msg) in &cases {
            let e = err(text);
            assert!(
                e.starts_with("test.toml: ") && e.contains(key) && e.contains(msg),
                "{text}\nwant {key:?} / {msg:?}, got: {e}"
            );
        }
        // Bridges named like the agent's own links, too long, or with
        // control characters; control characters in names and paths.
        let bridge = |b: &str| {
            format!("[[network]]\nname = \"n\"\nbridge = \"{b}\"\nsubnet = \"10.0.0.0/24\"\ngateway = \"10.0.0.1\"\n")
        };
        for (b, msg) in [
            ("nlh0", "prefix of the links the agent makes"),
            ("nlgbr", "prefix of the links the agent makes"),
            ("nls1234abcd", "prefix of the links the agent makes"),
            ("bridge-of-16-chr", "IFNAMSIZ"),
            ("br\\u0001x", "not a valid interface name"),
            ("br\\u007f", "not a valid interface name"),
            ("br\\tx", "not a valid interface name"),
        ] {
            let e = err(&bridge(b));
            assert!(
                e.contains("network[0] (\"n\").bridge") && e.contains(msg),
                "{b}: {e}"
            );
        }
        for ok in ["nlbr0", "nltb123456", "br-tenant-a", "n"] {
            parse(&bridge(ok)).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        let ctl = [
            ("[[network]]\nname = \"n\\u001b[2J\"\nbridge = \"br0\"\nsubnet = \"10.0.0.0/24\"\ngateway = \"10.0.0.1\"\n".to_string(), "network[0]", "control character"),
            (format!("[agent]\nstate_dir = \"/var/lib/x\\ny\"\n{net}"), "agent.state_dir", "control character"),
            (format!("[agent]\nadmin_socket = \"/run/a\\rb\"\n{net}"), "agent.admin_socket", "control character"),
            (format!("{net}{}", vm("a", &netns("x\\u0007", "/run/a.sock"))), "vm[0] (\"a\").netns", "control character"),
            (format!("{net}{}", vm("a", &netns("x", "/run/a\\n.sock"))), "vm[0] (\"a\").socket", "control character"),
            (format!("{net}{}", vm("a", &qemu("/run/q\\u0000", 3))), "vm[0] (\"a\").qmp_socket", "control character"),
            (format!("{net}{}", vm("a", &format!("{}\nhotplug_slots = [\"rp\\n1\"]", qemu("/run/q", 3)))), "vm[0] (\"a\").hotplug_slots[0]", "not a QEMU bus id"),
            (format!("{net}{}", vm("a\\n", &netns("x", "/run/a.sock"))), "vm[0]", "characters of"),
        ];
        for (text, key, msg) in ctl {
            let e = err(&text);
            assert!(
                e.contains(key) && e.contains(msg),
                "{text}\nwant {key:?} / {msg:?}, got: {e}"
            );
        }
        // What stays valid: one VM per endpoint, absolute paths.
        parse(&format!(
            "{agent}{net}{}{}",
            vm("a", &netns("x", "/run/nl/a.sock")),
            vm("b", &qemu("/run/nl/b.qmp", 3))
        ))
        .unwrap();
    }

    #[test]
    fn bad_agent_settings() {
        assert!(err("[agent]\nmac_prefix = \"01:00\"").contains("multicast"));
        assert!(err("[agent]\nmac_prefix = \"xx\"").contains("agent.mac_prefix"));
        assert!(err("[agent]\nlisten_vsock = \"maybe\"").contains("agent.listen_vsock"));
        assert!(err("[agent]\nqmp_timeout_ms = 0").contains("agent.qmp_timeout_ms"));
        for (bad, key) in [
            ("max_connections_per_vm = 0", "agent.max_connections_per_vm"),
            (
                "max_connections_per_vm = 70000",
                "agent.max_connections_per_vm",
            ),
            ("idle_timeout_secs = 60", "agent.idle_timeout_secs"),
            ("idle_timeout_secs = 90000", "agent.idle_timeout_secs"),
            (
                "requests_per_sec_per_vm = 0",
                "agent.requests_per_sec_per_vm",
            ),
            ("request_burst_per_vm = 0", "agent.request_burst_per_vm"),
            ("request_burst_per_vm = -1", "agent.request_burst_per_vm"),
        ] {
            let e = err(&format!("[agent]\n{bad}"));
            assert!(e.contains(key), "{bad}: {e}");
            assert!(e.contains("test.toml"), "{bad}: names no file: {e}");
        }
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

    #[test]
    fn typed_fields_name_their_key() {
        let net = with_network("subnet = \"10.88.0.0/16\"\ngateway = \"10.88.0.1\"");
        let vm = "[[vm]]\nname=\"a\"\nbackend=\"qemu\"\ncid=3\n";
        let cases = [
            ("[agent]\nvsock_port = \"x\"".to_string(), "agent.vsock_port", "u32"),
            ("[agent]\nvsock_port = 0".to_string(), "agent.vsock_port", "not a usable port"),
            ("[agent]\nlisten_vsock = 3".to_string(), "agent.listen_vsock", "not true, false"),
            ("[agnet]\n".to_string(), "agnet", "unknown field"),
            (format!("{net}{vm}qmp_socket = 5\n"), "vm[0] (\"a\").qmp_socket", "invalid type"),
            (
                format!("{net}{vm}qmp_socket = \"/q\"\nhotplug_slots = [\"rp1\", \"a,b\"]\n"),
                "vm[0] (\"a\").hotplug_slots[1]",
                "not a QEMU bus id",
            ),
            (
                format!("{net}[[vm]]\nname=\"a\"\nbackend=\"qemu\"\nqmp_socket=\"/q\"\ncid = -1\n"),
                "vm[0] (\"a\").cid",
                "-1",
            ),
            (
                format!("{net}[[vm]]\nbackend=\"qemu\"\nqmp_socket=\"/q\"\ncid=3\n"),
                "vm[0]",
                "missing field `name`",
            ),
            (
                with_network("subnet = \"10.88.0.0/16\"\ngateway = \"10.88.0.1\"\nroutes = [{destination = \"10.0.0.0/8\", gateway = \"x\"}]"),
                "network[0] (\"n\").routes[0].gateway",
                "not an IP address",
            ),
            (
                with_network("subnet = \"10.88.0.0/16\"\ngateway = \"10.88.0.1\"\nsubnet6 = \"fd00::1/64\""),
                "network[0] (\"n\").subnet6",
                "host bits",
            ),
        ];
        for (text, key, msg) in cases {
            let e = err(&text);
            assert!(
                e.starts_with("test.toml: ") && e.contains(key) && e.contains(msg),
                "{text}: {e}"
            );
        }
        // Not TOML at all: the parser's account, with the file.
        let e = err("[agent\n");
        assert!(e.starts_with("test.toml: ") && e.contains("line 1"), "{e}");
    }
}
