//! Hostlo, host side: pods whose parts run in several VMs of this host.
//!
//! A pod is named within its tenant network: the pod `db` of network `a`
//! and the pod `db` of network `b` are two pods, with two segments
//! ([`segment_bridge`] hashes both names), and nothing about one reaches
//! the other's VMs.
//!
//! Every part's VM gets a NIC on the pod's *segment*, a host bridge of its own
//! (`nls<hash>`, no uplink), with the address `.<part + 1>` of the segment
//! subnet (every segment uses the same subnet: they never meet). The guest
//! side (the shim) uses the segment to carry the pod's localhost traffic
//! between parts; the agent keeps who is in the pod and which ports each part
//! serves, and wakes watchers when that changes.
//!
//! ```text
//! part 0 (VM1)                host agent                         part 1 (VM2)
//!  HostloJoin(p,0,sb) ─────▶ bridge nls<h> (first part)
//!                            NIC on it (.1) ──hot-plug──▶ VM1
//!                                               ◀───────── HostloJoin(p,1,sb)
//!                            same tenant network? NIC (.2) ──▶ VM2
//!  HostloPublish(p,0,[80/tcp]) ─▶ version++ ──▶ wakes HostloWatch ─▶ part 1
//!                                               ◀───────── HostloPublish(p,1,[53/udp])
//!  HostloWatch ◀──────────── parts, ports, conflicts, pod IP
//!  HostloLeave(p,0) ───────▶ unplug; last part gone: bridge removed
//! ```
//!
//! The parts and their ports live in the NIC records (`NicRecord::hostlo`), so
//! they survive restarts like any NIC.

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::names::Invalid;

/// Prefix of segment bridges (distinct from `nlh`, the NICs' host ends).
pub const SEGMENT_PREFIX: &str = "nls";
/// Most parts in one pod (`.1` to `.253` of a /24).
pub const MAX_PARTS: u32 = 253;
/// Most ports one part may publish.
pub const MAX_PORTS: usize = 1024;

pub use nestless_model::{Port, Proto};

/// The Hostlo side of a NIC record: which pod and part it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostloRef {
    /// The Hostlo pod.
    pub pod: String,
    /// The part index.
    pub part: u32,
    /// The ports the part serves (sorted, unique).
    #[serde(default)]
    pub ports: Vec<Port>,
    /// The pod's segment bridge, [`segment_bridge`] of the record's network
    /// and the pod. Absent in records written before pods were scoped per
    /// tenant network: their segment is [`legacy_segment_bridge`] of the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<String>,
}

impl HostloRef {
    /// The segment bridge the part is on.
    pub fn bridge(&self) -> String {
        self.segment
            .clone()
            .unwrap_or_else(|| legacy_segment_bridge(&self.pod))
    }
}

/// A Hostlo pod name, checked: 1 to 63 characters of `[a-z0-9.-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodName(String);

impl PodName {
    /// Checks `pod` (field `pod`).
    pub fn parse(pod: &str) -> Result<PodName, Invalid> {
        if pod.is_empty()
            || pod.len() > 63
            || !pod
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        {
            return Err(Invalid::new(
                "pod",
                format!(
                    "{} is not 1 to 63 characters of [a-z0-9.-]",
                    crate::names::Quoted(pod)
                ),
            ));
        }
        Ok(PodName(pod.to_string()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for PodName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A part index, checked: 0 to [`MAX_PARTS`] - 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Part(u32);

impl Part {
    /// Checks `part` (field `part`).
    pub fn parse(part: u32) -> Result<Part, Invalid> {
        if part >= MAX_PARTS {
            return Err(Invalid::new(
                "part",
                format!("{part} is not between 0 and {}", MAX_PARTS - 1),
            ));
        }
        Ok(Part(part))
    }

    /// The index.
    pub fn get(self) -> u32 {
        self.0
    }
}

/// The ports a part publishes, checked and normalised: at most
/// [`MAX_PORTS`], no port 0, sorted, each once.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PortList(Vec<Port>);

impl PortList {
    /// Checks `ports` (fields `ports`, `ports.port`), then sorts and dedups them.
    pub fn new(ports: Vec<Port>) -> Result<PortList, Invalid> {
        if ports.len() > MAX_PORTS {
            return Err(Invalid::new(
                "ports",
                format!("{} ports, at most {MAX_PORTS}", ports.len()),
            ));
        }
        if let Some(p) = ports.iter().find(|p| p.port == 0) {
            return Err(Invalid::new(
                "ports.port",
                format!("port 0/{} is not a port", p.proto.as_str()),
            ));
        }
        let mut v = ports;
        v.sort();
        v.dedup();
        Ok(PortList(v))
    }

    /// The ports, sorted.
    pub fn as_slice(&self) -> &[Port] {
        &self.0
    }

    /// The ports, sorted.
    pub fn into_vec(self) -> Vec<Port> {
        self.0
    }
}

fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

fn fnv1a64(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The bytes naming pod `pod` of tenant network `network` (a network name
/// holds no NUL, so no two pairs give the same bytes).
fn pod_key<'a>(network: &'a str, pod: &'a str) -> impl Iterator<Item = u8> + 'a {
    network.bytes().chain([0]).chain(pod.bytes())
}

/// The segment bridge of pod `pod` of tenant network `network`: `nls` + 12
/// hex digits (48 bits) of a stable hash (FNV-1a, 64 bits) of both names,
/// the 15 bytes an interface name may have.
pub fn segment_bridge(network: &str, pod: &str) -> String {
    format!(
        "{SEGMENT_PREFIX}{:012x}",
        fnv1a64(pod_key(network, pod)) >> 16
    )
}

/// The segment bridge of `pod` in records written before pods were scoped
/// per tenant network: `nls` + 8 hex digits of FNV-1a (32 bits) of the pod
/// alone. Never made any more; kept so that such pods run on.
pub fn legacy_segment_bridge(pod: &str) -> String {
    format!("{SEGMENT_PREFIX}{:08x}", fnv1a(pod.bytes()))
}

/// The MAC of part `part`'s segment NIC: `prefix` then a stable hash of the
/// tenant network, the pod and the part, so that a part that comes back has
/// the same MAC and its peers' neighbour caches stay right.
pub fn part_mac(prefix: &[u8], network: &str, pod: &str, part: u32) -> nestless_model::MacAddr {
    let h = fnv1a(
        pod_key(network, pod)
            .chain(part.to_be_bytes())
            .chain(*b"hostlo"),
    )
    .to_be_bytes();
    let mut m = [0u8; 6];
    // Hash bytes fill whatever the prefix leaves, last bytes first.
    for (i, b) in m.iter_mut().enumerate() {
        *b = h[(i + 2) % 4];
    }
    // A prefix is at most 5 bytes (the config's rule); a longer one is cut.
    let n = prefix.len().min(m.len());
    m[..n].copy_from_slice(&prefix[..n]);
    if prefix.is_empty() {
        m[0] = (m[0] | 0x02) & 0xfe;
    }
    nestless_model::MacAddr(m)
}

/// The segment address of `part`: `.part + 1` of `subnet` (a network of
/// at least /24, the config's rule, holds every part).
pub fn part_address(subnet: ipnet::Ipv4Net, part: Part) -> Ipv4Addr {
    Ipv4Addr::from(
        u32::from(subnet.network())
            .saturating_add(part.get())
            .saturating_add(1),
    )
}

/// A port served by more than one part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The port.
    pub port: Port,
    /// The parts serving it.
    pub parts: Vec<u32>,
}

/// The ports served by more than one part, given each part's ports.
pub fn conflicts(parts: &BTreeMap<u32, Vec<Port>>) -> Vec<Conflict> {
    let mut by_port: BTreeMap<Port, Vec<u32>> = BTreeMap::new();
    for (part, ports) in parts {
        for p in ports {
            by_port.entry(*p).or_default().push(*part);
        }
    }
    by_port
        .into_iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(port, parts)| Conflict { port, parts })
        .collect()
}

/// A pod as its parts see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    /// Changes with every join, leave and publish.
    pub version: u64,
    /// part -> (segment address, ports).
    pub parts: BTreeMap<u32, (Ipv4Addr, Vec<Port>)>,
    /// Ports more than one part serves.
    pub conflicts: Vec<Conflict>,
    /// Part 0's BrFusion address.
    pub pod_ip: Option<Ipv4Addr>,
    /// Prefix length of the segment.
    pub prefix_len: u8,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(port: u16, proto: Proto) -> Port {
        Port { port, proto }
    }

    #[test]
    fn names_and_addresses() {
        let b = segment_bridge("a", "web-frontend");
        assert!(b.starts_with("nls") && b.len() == 15, "{b}");
        assert_eq!(b, segment_bridge("a", "web-frontend"), "stable");
        assert_ne!(b, segment_bridge("a", "web-frontenc"));
        // One pod name in two tenant networks: two segments.
        assert_ne!(b, segment_bridge("b", "web-frontend"));
        assert_ne!(segment_bridge("ab", "c"), segment_bridge("a", "bc"));
        // Records of before the scoping name their segment by the pod alone.
        let old = legacy_segment_bridge("web-frontend");
        assert!(old.starts_with("nls") && old.len() == 11, "{old}");
        let legacy = HostloRef {
            pod: "web-frontend".into(),
            part: 0,
            ports: vec![],
            segment: None,
        };
        assert_eq!(legacy.bridge(), old);
        let loaded: HostloRef =
            serde_json::from_str(r#"{"pod":"web-frontend","part":0,"ports":[]}"#).unwrap();
        assert_eq!(loaded, legacy, "a record of before the scoping loads");
        assert_eq!(
            part_address("169.254.77.0/24".parse().unwrap(), Part(0)),
            "169.254.77.1".parse::<Ipv4Addr>().unwrap()
        );
        assert_eq!(
            part_address("169.254.77.0/24".parse().unwrap(), Part(252)),
            "169.254.77.253".parse::<Ipv4Addr>().unwrap()
        );
    }

    #[test]
    fn part_macs_are_stable_and_distinct() {
        let p = [0x52, 0x54, 0x00];
        assert_eq!(part_mac(&p, "a", "web", 1), part_mac(&p, "a", "web", 1));
        assert_ne!(part_mac(&p, "a", "web", 1), part_mac(&p, "a", "web", 2));
        assert_ne!(part_mac(&p, "a", "web", 1), part_mac(&p, "a", "api", 1));
        assert_ne!(part_mac(&p, "a", "web", 1), part_mac(&p, "b", "web", 1));
        assert_eq!(&part_mac(&p, "a", "web", 1).0[..3], &p);
        assert!(!part_mac(&[], "a", "web", 1).is_multicast());
        // A prefix longer than a MAC is cut, not a panic.
        assert_eq!(part_mac(&[0x02; 8], "a", "web", 1).0, [0x02; 6]);
    }

    #[test]
    fn validation() {
        assert!(PodName::parse("a.b-1").is_ok());
        for bad in ["", "Upper", "a_b", &"x".repeat(64)] {
            assert!(PodName::parse(bad).is_err(), "{bad}");
        }
        assert!(Part::parse(252).is_ok() && Part::parse(253).is_err());
        assert_eq!(
            PortList::new(vec![
                p(80, Proto::Tcp),
                p(53, Proto::Udp),
                p(80, Proto::Tcp)
            ])
            .unwrap()
            .into_vec(),
            vec![p(53, Proto::Udp), p(80, Proto::Tcp)]
        );
        assert!(PortList::new(vec![p(0, Proto::Tcp)]).is_err());
        assert!(PortList::new(vec![p(1, Proto::Tcp); 1025]).is_err());
        assert!("sctp".parse::<Proto>().is_err());
    }

    #[test]
    fn conflicts_are_ports_of_several_parts() {
        let mut parts = BTreeMap::new();
        parts.insert(0, vec![p(80, Proto::Tcp), p(53, Proto::Udp)]);
        parts.insert(1, vec![p(53, Proto::Tcp), p(80, Proto::Tcp)]);
        parts.insert(2, vec![p(80, Proto::Tcp)]);
        assert_eq!(
            conflicts(&parts),
            vec![Conflict {
                port: p(80, Proto::Tcp),
                parts: vec![0, 1, 2]
            }]
        );
    }
}
