//! The file's schema: what `netagent.toml` deserialises into, with typed
//! fields (`ipnet` and `std::net` types, [`MacPrefix`], [`Duration`]s, the
//! [`BackendKind`] tag), defaults, and every rule that one value alone
//! decides (a CIDR's host bits, an MTU's range, a CID's reserved values).
//! `deny_unknown_fields` everywhere: a misspelt key is an error.
//!
//! A value that does not deserialise is reported at its key:
//! [`from_toml`] follows the path serde was at (`network[0].subnet`) and
//! names a `[[network]]` or `[[vm]]` entry as the checked errors do,
//! `network[0] ("default").subnet`. The rules between values are in
//! [`super::check`].

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use nestless_model::hostlo::DEFAULT_SEGMENT_MTU;
use serde::{de::Error as _, Deserialize, Deserializer};

use crate::state::StoreKind;

use super::{check_ifname, ConfigError, ListenVsock, MacPrefix, BRIDGE_MAX_PORTS};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub agent: RawAgent,
    #[serde(default)]
    pub network: Vec<RawNetwork>,
    #[serde(default)]
    pub vm: Vec<RawVm>,
    #[serde(default)]
    pub hostlo: RawHostlo,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawHostlo {
    /// `None`: `nestless_model::hostlo::DEFAULT_SEGMENT_SUBNET`.
    #[serde(deserialize_with = "segment_subnet")]
    pub subnet: Option<Ipv4Net>,
    #[serde(deserialize_with = "mtu")]
    pub mtu: u32,
}

impl Default for RawHostlo {
    fn default() -> RawHostlo {
        RawHostlo {
            subnet: None,
            mtu: DEFAULT_SEGMENT_MTU,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAgent {
    pub state_dir: PathBuf,
    pub admin_socket: PathBuf,
    #[serde(deserialize_with = "vsock_port")]
    pub vsock_port: u32,
    pub listen_vsock: ListenVsock,
    pub mac_prefix: MacPrefix,
    #[serde(rename = "qmp_timeout_ms", deserialize_with = "millis")]
    pub qmp_timeout: Duration,
    #[serde(rename = "unplug_timeout_ms", deserialize_with = "millis")]
    pub unplug_timeout: Duration,
    #[serde(deserialize_with = "state_store")]
    pub state_store: StoreKind,
    #[serde(deserialize_with = "some_connections")]
    pub max_connections_per_vm: Option<usize>,
    #[serde(rename = "idle_timeout_secs", deserialize_with = "idle_secs")]
    pub idle_timeout: Duration,
    #[serde(deserialize_with = "rate")]
    pub requests_per_sec_per_vm: u32,
    #[serde(deserialize_with = "rate")]
    pub request_burst_per_vm: u32,
    #[serde(deserialize_with = "libvirt_uri")]
    pub libvirt_uri: String,
    pub libvirt_discover: bool,
    #[serde(rename = "libvirt_poll_ms", deserialize_with = "millis")]
    pub libvirt_poll: Duration,
}

impl Default for RawAgent {
    fn default() -> RawAgent {
        RawAgent {
            state_dir: "/var/lib/nestless".into(),
            admin_socket: "/run/nestless/admin.sock".into(),
            vsock_port: nestless_protos::DEFAULT_VSOCK_PORT,
            listen_vsock: ListenVsock::Auto,
            mac_prefix: MacPrefix::default(),
            qmp_timeout: Duration::from_millis(5_000),
            unplug_timeout: Duration::from_millis(10_000),
            state_store: StoreKind::default(),
            max_connections_per_vm: None,
            idle_timeout: crate::server::conns::IDLE_TIMEOUT,
            requests_per_sec_per_vm: crate::server::conns::REQUESTS_PER_SEC_PER_VM,
            request_burst_per_vm: crate::server::conns::REQUEST_BURST_PER_VM,
            libvirt_uri: crate::backend::libvirt::DEFAULT_URI.into(),
            libvirt_discover: false,
            libvirt_poll: crate::backend::libvirt::DEFAULT_POLL,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNetwork {
    #[serde(deserialize_with = "network_name")]
    pub name: String,
    #[serde(deserialize_with = "ifname")]
    pub bridge: String,
    #[serde(deserialize_with = "network_subnet")]
    pub subnet: Ipv4Net,
    #[serde(deserialize_with = "ipv4")]
    pub gateway: Ipv4Addr,
    #[serde(default, deserialize_with = "some_ipv4")]
    pub range_start: Option<Ipv4Addr>,
    #[serde(default, deserialize_with = "some_ipv4")]
    pub range_end: Option<Ipv4Addr>,
    #[serde(default = "default_mtu", deserialize_with = "mtu")]
    pub mtu: u32,
    #[serde(default)]
    pub manage_bridge: bool,
    #[serde(default, deserialize_with = "some_subnet6")]
    pub subnet6: Option<Ipv6Net>,
    #[serde(default, deserialize_with = "some_ipv6")]
    pub gateway6: Option<Ipv6Addr>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    #[serde(deserialize_with = "cidr")]
    pub destination: IpNet,
    #[serde(default, deserialize_with = "some_ip")]
    pub gateway: Option<IpAddr>,
}

/// The `backend` tag of a `[[vm]]`: which keys go with it is a rule between
/// keys ([`super::check`] builds the tagged [`super::BackendConfig`]), because
/// serde reports an error inside a flattened, internally tagged enum at the
/// table rather than at its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub(super) enum BackendKind {
    Qemu,
    Netns,
    Libvirt,
}

impl TryFrom<String> for BackendKind {
    type Error = String;
    fn try_from(s: String) -> Result<BackendKind, String> {
        match s.as_str() {
            "qemu" => Ok(BackendKind::Qemu),
            "netns" => Ok(BackendKind::Netns),
            "libvirt" => Ok(BackendKind::Libvirt),
            other => Err(format!(
                "{other:?} is not \"qemu\", \"netns\" or \"libvirt\""
            )),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVm {
    #[serde(deserialize_with = "vm_name")]
    pub name: String,
    pub backend: BackendKind,
    pub network: Option<String>,
    #[serde(default, deserialize_with = "some_cid")]
    pub cid: Option<u32>,
    pub vsock_uds: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    #[serde(default = "default_max_nics", deserialize_with = "max_nics")]
    pub max_nics: u32,
    #[serde(default)]
    pub warm_pool: u32,
    // qemu
    pub qmp_socket: Option<PathBuf>,
    #[serde(default, deserialize_with = "some_bus_ids")]
    pub hotplug_slots: Option<Vec<String>>,
    // netns
    #[serde(default, deserialize_with = "some_netns")]
    pub netns: Option<PathBuf>,
    // libvirt
    #[serde(default, deserialize_with = "some_domain")]
    pub domain: Option<String>,
    #[serde(default, deserialize_with = "some_libvirt_uri")]
    pub libvirt_uri: Option<String>,
    pub persist_nics: Option<bool>,
    /// Set by the agent on the VMs it registers from a domain's nestless
    /// metadata ([`crate::backend::libvirt::discover`]).
    #[serde(default)]
    pub discovered: bool,
}

/// A registered VM ([`super::VmSpec`]) through the same schema as a
/// `[[vm]]` entry, so that every rule about one value holds for it too; an
/// error names `path` (the registered VMs' store) and the key,
/// `registered vm ("name").cid`.
pub(super) fn vm_from_spec(path: &Path, spec: &super::VmSpec) -> Result<RawVm, ConfigError> {
    let key = registered_key(&spec.name);
    let invalid = |k: String, message: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        key: k,
        message,
    };
    let value = toml::Value::try_from(spec).map_err(|e| invalid(key.clone(), e.to_string()))?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        let k = if field.is_empty() || field == "." {
            key.clone()
        } else {
            format!("{key}.{field}")
        };
        invalid(k, e.into_inner().to_string())
    })
}

/// How errors name registered VM `name`: `registered vm ("name")`.
pub(super) fn registered_key(name: &str) -> String {
    format!("registered vm ({name:?})")
}

/// Deserialises the file, or says which key of `path` is wrong.
pub(super) fn from_toml(path: &Path, text: &str) -> Result<RawConfig, ConfigError> {
    serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
        let key = key_of(e.path(), text);
        let inner = e.into_inner();
        if key.is_empty() {
            ConfigError::Syntax {
                path: path.to_path_buf(),
                message: inner.to_string().trim_end().replace('\n', " | "),
            }
        } else {
            ConfigError::Invalid {
                path: path.to_path_buf(),
                key,
                message: inner.message().to_string(),
            }
        }
    })
}

/// `network[0] ("default").routes[1].gateway` for serde's
/// `network[0].routes[1].gateway`: a `[[network]]` or `[[vm]]` entry is
/// named as [`super::check`] names it.
fn key_of(path: &serde_path_to_error::Path, text: &str) -> String {
    use serde_path_to_error::Segment;
    let doc: Option<toml::Table> = text.parse().ok();
    let mut key = String::new();
    let mut top: Option<&str> = None;
    for (depth, seg) in path.iter().enumerate() {
        match seg {
            Segment::Map { key: k } => {
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(k);
                if depth == 0 {
                    top = Some(k);
                }
            }
            Segment::Seq { index } => {
                key.push_str(&format!("[{index}]"));
                if depth == 1 && matches!(top, Some("network" | "vm")) {
                    let name = doc
                        .as_ref()
                        .and_then(|d| d.get(top?)?.get(*index)?.get("name")?.as_str());
                    if let Some(name) = name {
                        key.push_str(&format!(" ({name:?})"));
                    }
                }
            }
            Segment::Enum { variant } => {
                key.push('.');
                key.push_str(variant);
            }
            Segment::Unknown => {}
        }
    }
    key
}

// ---------------------------------------------------------------- one value

/// A string field parsed by `parse`, whose error is the message.
fn parsed<'de, D: Deserializer<'de>, T>(
    d: D,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, D::Error> {
    let s = String::deserialize(d)?;
    parse(&s).map_err(D::Error::custom)
}

fn default_mtu() -> u32 {
    1500
}

fn default_max_nics() -> u32 {
    16
}

/// Whether `s` holds a control character (a newline, an escape
/// sequence): refused in every name and path of the file, which the agent
/// writes into log lines and replies.
pub(super) fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

fn network_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    parsed(d, |s| {
        if s.is_empty() || s.len() > 64 {
            Err("must be 1 to 64 characters".into())
        } else if has_control(s) {
            Err(format!("{s:?} holds a control character"))
        } else {
            Ok(s.to_string())
        }
    })
}

fn vm_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    parsed(d, |s| {
        if s.is_empty()
            || s.len() > 64
            || !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            Err("must be 1 to 64 characters of [A-Za-z0-9._-]".into())
        } else {
            Ok(s.to_string())
        }
    })
}

/// A libvirt domain name: what libvirt allows, less control characters
/// and `/` (it names files under `/etc/libvirt` and `/run/libvirt`).
fn some_domain<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    parsed(d, |s| {
        if s.is_empty() || s.len() > 255 || has_control(s) || s.contains('/') {
            Err(format!(
                "{s:?} is not a libvirt domain name (1 to 255 characters, no '/' or control character)"
            ))
        } else {
            Ok(Some(s.to_string()))
        }
    })
}

fn check_libvirt_uri(s: &str) -> Result<String, String> {
    match s.split_once("://") {
        Some((scheme, _)) if !scheme.is_empty() && !has_control(s) => Ok(s.to_string()),
        _ => Err(format!(
            "{s:?} is not a libvirt connection URI (e.g. \"qemu:///system\")"
        )),
    }
}

fn libvirt_uri<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    parsed(d, check_libvirt_uri)
}

fn some_libvirt_uri<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    parsed(d, |s| check_libvirt_uri(s).map(Some))
}

fn ifname<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    parsed(d, |s| check_ifname(s).map(|()| s.to_string()))
}

fn network_subnet<'de, D: Deserializer<'de>>(d: D) -> Result<Ipv4Net, D::Error> {
    parsed(d, |s| {
        let subnet: Ipv4Net = s
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 CIDR like 10.88.0.0/16"))?;
        if subnet.trunc() != subnet {
            return Err(format!(
                "{subnet} has host bits set (did you mean {}?)",
                subnet.trunc()
            ));
        }
        if subnet.prefix_len() > 30 {
            return Err(format!("{subnet} is too small (at most /30)"));
        }
        // The agent keeps a bitmap of a network's addresses: 2 MiB for a /8,
        // 512 MiB for a /0.
        if subnet.prefix_len() < 8 {
            return Err(format!("{subnet} is too large (at least /8)"));
        }
        Ok(subnet)
    })
}

fn segment_subnet<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Ipv4Net>, D::Error> {
    parsed(d, segment_subnet_rule).map(Some)
}

/// A Hostlo segment subnet: an IPv4 network of at least /24.
pub(super) fn segment_subnet_rule(s: &str) -> Result<Ipv4Net, String> {
    let subnet: Ipv4Net = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv4 CIDR"))?;
    if subnet.trunc() != subnet || subnet.prefix_len() > 24 {
        return Err(format!("{subnet} must be a network of at least /24"));
    }
    Ok(subnet)
}

fn some_subnet6<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Ipv6Net>, D::Error> {
    parsed(d, |s| {
        let s6: Ipv6Net = s
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv6 CIDR like fd00:88::/64"))?;
        if s6.trunc() != s6 {
            return Err(format!("{s6} has host bits set"));
        }
        Ok(Some(s6))
    })
}

fn ipv4<'de, D: Deserializer<'de>>(d: D) -> Result<Ipv4Addr, D::Error> {
    parsed(d, |s| {
        s.parse()
            .map_err(|_| format!("{s:?} is not an IPv4 address"))
    })
}

fn some_ipv4<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Ipv4Addr>, D::Error> {
    ipv4(d).map(Some)
}

fn some_ipv6<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Ipv6Addr>, D::Error> {
    parsed(d, |s| {
        s.parse()
            .map(Some)
            .map_err(|_| format!("{s:?} is not an IPv6 address"))
    })
}

fn cidr<'de, D: Deserializer<'de>>(d: D) -> Result<IpNet, D::Error> {
    parsed(d, |s| s.parse().map_err(|_| format!("{s:?} is not a CIDR")))
}

fn some_ip<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IpAddr>, D::Error> {
    parsed(d, |s| {
        s.parse()
            .map(Some)
            .map_err(|_| format!("{s:?} is not an IP address"))
    })
}

fn mtu<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let mtu = u32::deserialize(d)?;
    if !(68..=65535).contains(&mtu) {
        return Err(D::Error::custom(format!(
            "{mtu} is not between 68 and 65535"
        )));
    }
    Ok(mtu)
}

fn vsock_port<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let port = u32::deserialize(d)?;
    if port == 0 || port == u32::MAX {
        return Err(D::Error::custom(format!("{port} is not a usable port")));
    }
    Ok(port)
}

fn state_store<'de, D: Deserializer<'de>>(d: D) -> Result<StoreKind, D::Error> {
    String::deserialize(d)?.parse().map_err(D::Error::custom)
}

fn millis<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match u64::deserialize(d)? {
        0 => Err(D::Error::custom("must be more than 0")),
        n if n > 3_600_000 => Err(D::Error::custom("must be at most an hour")),
        n => Ok(Duration::from_millis(n)),
    }
}

fn some_connections<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    match u32::deserialize(d)? {
        n @ 1..=65_536 => Ok(Some(n as usize)),
        n => Err(D::Error::custom(format!(
            "{n} is not between 1 and 65536 (leave the key out for one per NIC of the VM's max_nics, and 16 more, at least 64)"
        ))),
    }
}

fn idle_secs<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let max_watch = crate::agent::MAX_WATCH.as_secs();
    match u64::deserialize(d)? {
        n if n <= max_watch => Err(D::Error::custom(format!(
            "{n} is not more than {max_watch} (a HostloWatch long poll is silent that long)"
        ))),
        n if n > 86_400 => Err(D::Error::custom(format!("{n} is more than a day"))),
        n => Ok(Duration::from_secs(n)),
    }
}

fn rate<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    match u32::deserialize(d)? {
        n @ 1..=1_000_000 => Ok(n),
        n => Err(D::Error::custom(format!(
            "{n} is not between 1 and 1000000"
        ))),
    }
}

fn some_cid<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let cid = u32::deserialize(d)?;
    if cid <= 2 || cid == u32::MAX {
        return Err(D::Error::custom(format!(
            "{cid} is reserved (guest CIDs start at 3)"
        )));
    }
    Ok(Some(cid))
}

fn max_nics<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = u32::deserialize(d)?;
    if !(1..=BRIDGE_MAX_PORTS).contains(&n) {
        return Err(D::Error::custom(format!(
            "{n} is not between 1 and {BRIDGE_MAX_PORTS}, the most ports a Linux bridge holds"
        )));
    }
    Ok(n)
}

/// A QEMU bus id (`device_add bus=`): 1 to 64 characters, no comma.
struct BusId(String);

impl<'de> Deserialize<'de> for BusId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<BusId, D::Error> {
        parsed(d, |s| {
            if s.is_empty() || s.len() > 64 || s.contains(',') || has_control(s) {
                Err(format!("{s:?} is not a QEMU bus id"))
            } else {
                Ok(BusId(s.to_string()))
            }
        })
    }
}

fn some_bus_ids<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    let ids = Vec::<BusId>::deserialize(d)?;
    Ok(Some(ids.into_iter().map(|b| b.0).collect()))
}

/// A network namespace: an absolute path, or a name under `/run/netns`.
fn some_netns<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    parsed(d, |ns| {
        if has_control(ns) {
            Err(format!("{ns:?} holds a control character"))
        } else if ns.starts_with('/') {
            Ok(Some(PathBuf::from(ns)))
        } else if !ns.is_empty() && !ns.contains('/') && ns != "." && ns != ".." {
            Ok(Some(Path::new("/run/netns").join(ns)))
        } else {
            Err(format!("{ns:?} is neither a name nor an absolute path"))
        }
    })
}
