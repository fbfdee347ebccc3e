//! State records that the configuration no longer accounts for.
//!
//! The state file was written under the configuration of the agent's last
//! run, and the configuration may have changed since: a network renamed,
//! resized or given another gateway, a VM moved to another network, the
//! Hostlo subnet changed. A record that no longer fits must not be served as
//! if it did: its address would not be leased (the next NIC would get it
//! again: two NICs, one address) and its network would not be found.
//!
//! [`sort`] goes through the records once, oldest first (creation time,
//! then file order), and takes the lease of every record that fits. Each
//! one that does not gets a [`Misfit`] naming the configuration key at
//! odds with it, or the older record it clashes with: the state file's own
//! invariants are checked here too, so that no two records share an id
//! (and so a host link name), a MAC, an IPv4 address of a network, an IPv6
//! address, an attachment (VM, scope, sandbox, interface) or a Hostlo
//! part. What happens then is the operator's choice ([`StalePolicy`]):
//!
//! ```text
//! state     ──sort(config)──▶ fits ─────────────▶ the record store, leases taken
//!                  ├─────────▶ VM not configured ─▶ dropped (the VM's removal says so)
//!                  └─────────▶ misfits ─▶ Refuse (default): StaleRecords, the agent does not start
//!                                        └▶ Release (`nestless-netagent --release-stale`):
//!                                           dropped; the reconciliation finds their devices
//!                                           and host links without a record and removes them
//!                                           as orphans
//! ```
//!
//! Refusing is the default because every way of carrying a misfit over
//! guesses: a renamed network may be the old one under a new name or a new
//! tenant on the same bridge, and a NIC whose address left the range cannot
//! keep it without clashing with what the range now hands out. Two records
//! that claim one address, MAC or attachment (a hand-edited or restored
//! file) are refused the same way: of the two, the older keeps it, and
//! the newer is the misfit. The operator knows which; the error names the
//! state file, the config file and the key or the other record, and says
//! the two ways out: restore the configuration the NICs were made with, or
//! run `nestless-netagent --release-stale` once (it unplugs them, frees
//! their addresses and exits), then start the agent.
//!
//! After [`sort`], every BrFusion record in the store holds its lease, so
//! freeing a record's lease when it goes never frees another record's.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;
use nestless_model::MacAddr;

use crate::{
    config::Config,
    hostlo::{self, Part},
    ipam::Ipam,
    names::{NicId, DEFAULT_IFNAME},
    state::{self, NicRecord, State, StateError},
};

/// What to do with records that do not fit the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StalePolicy {
    /// Refuse to start ([`StaleRecords`]).
    #[default]
    Refuse,
    /// Drop them; the reconciliation removes what they left as orphans
    /// (`nestless-netagent --release-stale`).
    Release,
}

/// Why a record does not fit the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Misfit {
    /// An older record has the same id, and so the same host link.
    IdTaken {
        /// The host link's name.
        host_if: String,
    },
    /// Its network is not configured (renamed or removed).
    UnknownNetwork {
        /// The record's network.
        network: String,
    },
    /// Its VM is configured on another network now.
    VmMoved {
        /// The VM's key in the config (`vm[0] ("vm1")`).
        vm_key: String,
        /// The VM's network now.
        network: String,
    },
    /// An older record has the same MAC.
    MacTaken {
        /// That record.
        other: NicId,
    },
    /// Its address is now the network's gateway.
    Gateway {
        /// The network.
        network: String,
    },
    /// Its address is outside the network's range now.
    OutsideRange {
        /// The network.
        network: String,
        /// The range's first address.
        first: Ipv4Addr,
        /// The range's last address.
        last: Ipv4Addr,
    },
    /// An older record has the same address on the same network.
    AddressTaken {
        /// That record.
        other: NicId,
    },
    /// An older record has the same IPv6 address.
    Ipv6Taken {
        /// The address.
        address: Ipv6Addr,
        /// That record.
        other: NicId,
    },
    /// An older record is the same attachment: VM, scope (containerd
    /// namespace), sandbox and interface.
    AttachmentTaken {
        /// That record.
        other: NicId,
    },
    /// Its IPv6 address is outside the network's `subnet6`, or is `gateway6`.
    Ipv6 {
        /// The network.
        network: String,
        /// What is wrong.
        what: String,
    },
    /// A Hostlo part whose number or segment address does not fit
    /// `[hostlo] subnet`.
    HostloAddress {
        /// The part.
        part: u32,
        /// The segment subnet.
        subnet: Ipv4Net,
    },
    /// An older record holds the same part of the same Hostlo pod (of the
    /// same tenant network: pods are named per network).
    HostloPartTaken {
        /// The pod.
        pod: String,
        /// The part.
        part: u32,
        /// That record.
        other: NicId,
    },
    /// A Hostlo part whose segment bridge is neither its pod's nor the one
    /// of records written before pods were scoped per tenant network.
    HostloSegment {
        /// The segment the record names.
        segment: String,
        /// The pod's.
        want: String,
    },
    /// An older part of another Hostlo pod is on the same segment bridge.
    HostloSegmentTaken {
        /// The segment.
        segment: String,
        /// That part's record.
        other: NicId,
    },
}

impl fmt::Display for Misfit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Misfit::IdTaken { host_if } => write!(
                f,
                "an older record has the same id (and host link {host_if})"
            ),
            Misfit::UnknownNetwork { network } => write!(
                f,
                "network {network:?} is not in the config (key [[network]] name)"
            ),
            Misfit::VmMoved { vm_key, network } => write!(
                f,
                "its VM is on network {network:?} now (key {vm_key}.network)"
            ),
            Misfit::MacTaken { other } => write!(f, "NIC {other} has the same MAC"),
            Misfit::Gateway { network } => write!(
                f,
                "the address is the gateway of network {network:?} now (key network ({network:?}).gateway)"
            ),
            Misfit::OutsideRange {
                network,
                first,
                last,
            } => write!(
                f,
                "the address is outside the range {first} to {last} of network {network:?} (keys network ({network:?}).subnet, range_start, range_end)"
            ),
            Misfit::AddressTaken { other } => {
                write!(f, "NIC {other} has the same address")
            }
            Misfit::Ipv6Taken { address, other } => {
                write!(f, "NIC {other} has the same IPv6 address {address}")
            }
            Misfit::AttachmentTaken { other } => write!(
                f,
                "NIC {other} is the same attachment (VM, scope, sandbox, interface)"
            ),
            Misfit::Ipv6 { network, what } => write!(
                f,
                "{what} (keys network ({network:?}).subnet6, gateway6)"
            ),
            Misfit::HostloAddress { part, subnet } => write!(
                f,
                "the segment address is not part {part}'s in {subnet} (key hostlo.subnet)"
            ),
            Misfit::HostloPartTaken { pod, part, other } => write!(
                f,
                "NIC {other} holds part {part} of Hostlo pod {pod:?} too"
            ),
            Misfit::HostloSegment { segment, want } => write!(
                f,
                "its segment bridge {segment:?} is not its pod's ({want})"
            ),
            Misfit::HostloSegmentTaken { segment, other } => write!(
                f,
                "NIC {other}, of another Hostlo pod, is on its segment bridge {segment:?} too"
            ),
        }
    }
}

/// A record that does not fit, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct StaleRecord {
    /// The record.
    pub record: NicRecord,
    /// Why it does not fit.
    pub misfit: Misfit,
}

impl fmt::Display for StaleRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.record;
        write!(f, "NIC {} (VM {}, ", r.id, r.vm)?;
        match &r.hostlo {
            Some(h) => write!(f, "Hostlo pod {:?} part {}", h.pod, h.part)?,
            None if r.pooled => f.write_str("warm pool")?,
            None => write!(f, "sandbox {:?}", r.sandbox_id)?,
        }
        write!(f, ", {} on {:?}): {}", r.ipv4, r.network, self.misfit)
    }
}

/// The state file has records the configuration does not account for, and
/// the agent was not told to release them.
#[derive(Debug, thiserror::Error)]
#[error(
    "state file {} does not fit config {}: {}; restore the configuration these NICs were made with, or run nestless-netagent --release-stale once to unplug them and free their addresses",
    state.display(),
    config.display(),
    list(records)
)]
pub struct StaleRecords {
    /// The state file.
    pub state: PathBuf,
    /// The config file.
    pub config: PathBuf,
    /// The records, each with why.
    pub records: Vec<StaleRecord>,
}

fn list(records: &[StaleRecord]) -> String {
    records
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The records of a state file, sorted against a configuration.
#[derive(Debug)]
pub struct Sorted {
    /// Records that fit, their leases taken in `ipam`.
    pub fits: Vec<NicRecord>,
    /// An allocator per configured network.
    pub ipam: HashMap<String, Ipam>,
    /// Records of VMs that are not configured (no lease taken).
    pub vm_gone: Vec<NicRecord>,
    /// Records that do not fit (no lease taken).
    pub misfits: Vec<StaleRecord>,
}

/// Why the state file cannot be taken as it is.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Unreadable or corrupt.
    #[error(transparent)]
    State(#[from] StateError),
    /// Records that do not fit, refused.
    #[error(transparent)]
    Stale(#[from] StaleRecords),
}

/// Reads the state of `config` without changing it ([`state::read_dir`])
/// and sorts its records against it; with [`StalePolicy::Refuse`], records
/// that do not fit are an error. What `nestless-netagent --check-config`
/// does; returns the path read.
///
/// # Errors
/// [`LoadError`].
pub fn load(config: &Config, policy: StalePolicy) -> Result<(PathBuf, Sorted), LoadError> {
    let (path, saved) = state::read_dir(&config.agent.state_dir, config.agent.state_store)?;
    let sorted = sort_saved(config, saved, &path, policy)?;
    Ok((path, sorted))
}

/// Sorts `saved` (read from `path`) against `config`, the allocation
/// cursors taken up; with [`StalePolicy::Refuse`], records that do not fit
/// are an error. What the agent does at start.
///
/// # Errors
/// [`LoadError::Stale`].
pub fn sort_saved(
    config: &Config,
    saved: State,
    path: &Path,
    policy: StalePolicy,
) -> Result<Sorted, LoadError> {
    let mut sorted = sort(config, saved.nics);
    // Next-fit goes on where the previous run stopped (see `Ipam`).
    for (network, last) in &saved.last_leased {
        if let Some(ipam) = sorted.ipam.get_mut(network) {
            ipam.resume_after(*last);
        }
    }
    if !sorted.misfits.is_empty() && policy == StalePolicy::Refuse {
        return Err(StaleRecords {
            state: path.to_path_buf(),
            config: config.path.clone(),
            records: std::mem::take(&mut sorted.misfits),
        }
        .into());
    }
    Ok(sorted)
}

/// Sorts `records` against `config` and against each other (see the
/// module doc).
pub fn sort(config: &Config, mut records: Vec<NicRecord>) -> Sorted {
    let mut sorted = Sorted {
        fits: Vec::new(),
        ipam: config
            .networks
            .values()
            .map(|n| (n.name.clone(), Ipam::new(n)))
            .collect(),
        vm_gone: Vec::new(),
        misfits: Vec::new(),
    };
    // Of two records that claim one thing, the older keeps it (a stable
    // sort: file order among records of one second).
    records.sort_by_key(|r| r.created_unix);
    let mut ids = HashSet::new();
    let mut macs: HashMap<MacAddr, NicId> = HashMap::new();
    let mut addresses: HashMap<(String, Ipv4Addr), NicId> = HashMap::new();
    let mut addresses6: HashMap<Ipv6Addr, NicId> = HashMap::new();
    let mut attachments: HashMap<(String, String, String, String), NicId> = HashMap::new();
    let mut parts: HashMap<(String, String, u32), NicId> = HashMap::new();
    let mut segments: HashMap<String, ((String, String), NicId)> = HashMap::new();
    // What only one record may hold: the VM, scope, sandbox and interface
    // of a NIC given to a sandbox (an empty interface is `eth0`).
    let attachment = |r: &NicRecord| {
        (r.hostlo.is_none() && !r.pooled).then(|| {
            let interface = match r.interface.as_str() {
                "" => DEFAULT_IFNAME,
                i => i,
            };
            (
                r.vm.clone(),
                r.scope.clone(),
                r.sandbox_id.clone(),
                interface.to_string(),
            )
        })
    };
    for rec in records {
        if !ids.insert(rec.id.clone()) {
            sorted.misfits.push(StaleRecord {
                misfit: Misfit::IdTaken {
                    host_if: rec.id.names().host_if,
                },
                record: rec,
            });
            continue;
        }
        let Some((vm_index, vm)) = config
            .vms
            .iter()
            .enumerate()
            .find(|(_, v)| v.name == rec.vm)
        else {
            sorted.vm_gone.push(rec);
            continue;
        };
        let misfit = (|| {
            let Some(net) = config.networks.get(&rec.network) else {
                return Some(Misfit::UnknownNetwork {
                    network: rec.network.clone(),
                });
            };
            if vm.network != rec.network {
                return Some(Misfit::VmMoved {
                    vm_key: format!("vm[{vm_index}] ({:?})", vm.name),
                    network: vm.network.clone(),
                });
            }
            if let Some(other) = macs.get(&rec.mac) {
                return Some(Misfit::MacTaken {
                    other: other.clone(),
                });
            }
            if let Some(h) = &rec.hostlo {
                let subnet = config.hostlo.subnet;
                let fits = Part::parse(h.part)
                    .ok()
                    .map(|p| hostlo::part_address(subnet, p))
                    == Some(rec.ipv4);
                if !fits {
                    return Some(Misfit::HostloAddress {
                        part: h.part,
                        subnet,
                    });
                }
                let want = hostlo::segment_bridge(&rec.network, &h.pod);
                let segment = h.bridge();
                if segment != want && segment != hostlo::legacy_segment_bridge(&h.pod) {
                    return Some(Misfit::HostloSegment { segment, want });
                }
                if let Some(other) = parts.get(&(rec.network.clone(), h.pod.clone(), h.part)) {
                    return Some(Misfit::HostloPartTaken {
                        pod: h.pod.clone(),
                        part: h.part,
                        other: other.clone(),
                    });
                }
                if let Some((pod, other)) = segments.get(&segment) {
                    if *pod != (rec.network.clone(), h.pod.clone()) {
                        return Some(Misfit::HostloSegmentTaken {
                            segment,
                            other: other.clone(),
                        });
                    }
                }
                return None;
            }
            if rec.ipv4 == net.gateway {
                return Some(Misfit::Gateway {
                    network: net.name.clone(),
                });
            }
            let (first, last) = net.range;
            if rec.ipv4 < first || rec.ipv4 > last {
                return Some(Misfit::OutsideRange {
                    network: net.name.clone(),
                    first,
                    last,
                });
            }
            if let Some(other) = addresses.get(&(net.name.clone(), rec.ipv4)) {
                return Some(Misfit::AddressTaken {
                    other: other.clone(),
                });
            }
            if let (Some(v6), Some(s6)) = (rec.ipv6, net.subnet6) {
                if !s6.contains(&v6) {
                    return Some(Misfit::Ipv6 {
                        network: net.name.clone(),
                        what: format!("the IPv6 address {v6} is outside {s6}"),
                    });
                }
                if Some(v6) == net.gateway6 {
                    return Some(Misfit::Ipv6 {
                        network: net.name.clone(),
                        what: format!("the IPv6 address {v6} is the gateway"),
                    });
                }
            }
            if let Some(v6) = rec.ipv6 {
                if let Some(other) = addresses6.get(&v6) {
                    return Some(Misfit::Ipv6Taken {
                        address: v6,
                        other: other.clone(),
                    });
                }
            }
            // What is left of the addresses never leased: IPv6 mirrors
            // (of gateway6, outside subnet6, a reserved anycast address).
            if let Some(why) = net.unleasable(rec.ipv4) {
                return Some(Misfit::Ipv6 {
                    network: net.name.clone(),
                    what: format!("the address {} is never leased: {why}", rec.ipv4),
                });
            }
            if let Some(other) = attachment(&rec).and_then(|a| attachments.get(&a)) {
                return Some(Misfit::AttachmentTaken {
                    other: other.clone(),
                });
            }
            None
        })();
        if let Some(misfit) = misfit {
            sorted.misfits.push(StaleRecord {
                record: rec,
                misfit,
            });
            continue;
        }
        macs.insert(rec.mac, rec.id.clone());
        match &rec.hostlo {
            Some(h) => {
                parts.insert((rec.network.clone(), h.pod.clone(), h.part), rec.id.clone());
                segments
                    .entry(h.bridge())
                    .or_insert_with(|| ((rec.network.clone(), h.pod.clone()), rec.id.clone()));
            }
            None => {
                addresses.insert((rec.network.clone(), rec.ipv4), rec.id.clone());
                if let Some(v6) = rec.ipv6 {
                    addresses6.insert(v6, rec.id.clone());
                }
                if let Some(a) = attachment(&rec) {
                    attachments.insert(a, rec.id.clone());
                }
                if let Some(ipam) = sorted.ipam.get_mut(&rec.network) {
                    if let Err(e) = ipam.reserve(rec.ipv4) {
                        // The checks above leave nothing for reserve to refuse.
                        log::error!("NIC {}: {e}", rec.id);
                    }
                }
            }
        }
        sorted.fits.push(rec);
    }
    sorted
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, path::Path};

    use super::*;
    use crate::{hostlo::HostloRef, lifecycle::NicState};

    fn config() -> Config {
        Config::parse(
            Path::new("/etc/nestless/netagent.toml"),
            r#"
            [[network]]
            name = "green"
            bridge = "br0"
            subnet = "10.40.0.0/24"
            gateway = "10.40.0.1"
            range_end = "10.40.0.100"
            subnet6 = "fd00:40::/64"
            gateway6 = "fd00:40::9"
            [[network]]
            name = "other"
            bridge = "br1"
            subnet = "10.41.0.0/24"
            gateway = "10.41.0.1"
            [[vm]]
            name = "vm1"
            backend = "netns"
            netns = "a"
            socket = "/run/a.sock"
            network = "green"
            [[vm]]
            name = "vm2"
            backend = "netns"
            netns = "b"
            socket = "/run/b.sock"
            network = "other"
            "#,
        )
        .unwrap()
    }

    fn rec(id: &str, vm: &str, network: &str, ipv4: &str, mac: u8) -> NicRecord {
        NicRecord {
            id: id.parse().unwrap(),
            vm: vm.into(),
            sandbox_id: format!("sb-{id}"),
            scope: String::new(),
            interface: "eth0".into(),
            network: network.into(),
            mac: MacAddr([0x52, 0x54, 0, 0, 0, mac]),
            ipv4: ipv4.parse().unwrap(),
            ipv6: None,
            state: NicState::Attached,
            slot: None,
            labels: BTreeMap::new(),
            created_unix: 0,
            hostlo: None,
            pooled: false,
        }
    }

    fn part(id: &str, vm: &str, network: &str, pod: &str, part: u32, mac: u8) -> NicRecord {
        NicRecord {
            ipv4: Ipv4Addr::from(u32::from(Ipv4Addr::new(169, 254, 77, 1)) + part),
            hostlo: Some(HostloRef {
                pod: pod.into(),
                part,
                ports: vec![],
                segment: None,
            }),
            ..rec(id, vm, network, "169.254.77.1", mac)
        }
    }

    /// Every kind of misfit, each beside a record that fits, and the leases
    /// only of those that fit.
    #[test]
    fn every_misfit_is_named_and_holds_no_lease() {
        let cfg = config();
        let v6 = |r: NicRecord, a: &str| NicRecord {
            ipv6: Some(a.parse().unwrap()),
            ..r
        };
        let records = vec![
            rec("00000000a1", "vm1", "green", "10.40.0.2", 1),
            rec("00000000a2", "vm1", "blue", "10.40.0.3", 2),
            rec("00000000a3", "vm1", "other", "10.41.0.3", 3),
            rec("00000000a4", "vm1", "green", "10.40.0.4", 1),
            rec("00000000a5", "vm1", "green", "10.40.0.1", 5),
            rec("00000000a6", "vm1", "green", "10.40.0.101", 6),
            rec("00000000a7", "vm1", "green", "10.40.0.2", 7),
            v6(
                rec("00000000a8", "vm1", "green", "10.40.0.8", 8),
                "fd00:41::8",
            ),
            v6(
                rec("00000000a9", "vm1", "green", "10.40.0.9", 9),
                "fd00:40::9",
            ),
            part("00000000b0", "vm1", "green", "web", 0, 10),
            NicRecord {
                ipv4: "169.254.77.9".parse().unwrap(),
                ..part("00000000b1", "vm1", "green", "web", 1, 11)
            },
            part("00000000b2", "vm1", "green", "web", 300, 12),
            part("00000000b3", "vm1", "green", "web", 0, 13),
            // Tenant "other"'s own pod "web": another pod, it fits.
            {
                let mut r = part("00000000b4", "vm2", "other", "web", 2, 14);
                if let Some(h) = r.hostlo.as_mut() {
                    h.segment = Some(hostlo::segment_bridge("other", "web"));
                }
                r
            },
            {
                let mut r = part("00000000b5", "vm2", "other", "db", 3, 15);
                if let Some(h) = r.hostlo.as_mut() {
                    h.segment = Some("nls0123456789ab".into());
                }
                r
            },
            {
                // Scoped "db" of "other": fits.
                let mut r = part("00000000b6", "vm2", "other", "db", 4, 16);
                if let Some(h) = r.hostlo.as_mut() {
                    h.segment = Some(hostlo::segment_bridge("other", "db"));
                }
                r
            },
            {
                // Another pod on the legacy segment of "web": refused (two
                // pods on one segment: a hash collision the check after it
                // catches too).
                let mut r = part("00000000b7", "vm2", "other", "api", 5, 17);
                if let Some(h) = r.hostlo.as_mut() {
                    h.segment = Some(hostlo::legacy_segment_bridge("web"));
                }
                r
            },
            rec("00000000c0", "gone", "green", "10.40.0.2", 20),
            v6(
                rec("00000000c1", "vm1", "green", "10.40.0.10", 21),
                "fd00:40::a",
            ),
            rec("00000000c2", "vm1", "green", "10.40.0.9", 22),
        ];
        let s = sort(&cfg, records);
        let fits: Vec<String> = s.fits.iter().map(|r| r.id.to_string()).collect();
        assert_eq!(
            fits,
            [
                "00000000a1",
                "00000000b0",
                "00000000b4",
                "00000000b6",
                "00000000c1"
            ]
        );
        assert_eq!(s.vm_gone.len(), 1);
        let why: Vec<(String, String)> = s
            .misfits
            .iter()
            .map(|m| (m.record.id.to_string(), m.misfit.to_string()))
            .collect();
        let b7 = format!(
            "its segment bridge {:?} is not its pod's",
            hostlo::legacy_segment_bridge("web")
        );
        let expect = [
            (
                "00000000a2",
                "network \"blue\" is not in the config (key [[network]] name)",
            ),
            (
                "00000000a3",
                "its VM is on network \"green\" now (key vm[0] (\"vm1\").network)",
            ),
            ("00000000a4", "NIC 00000000a1 has the same MAC"),
            ("00000000a5", "the gateway of network \"green\""),
            ("00000000a6", "outside the range 10.40.0.1 to 10.40.0.100"),
            ("00000000a7", "NIC 00000000a1 has the same address"),
            ("00000000a8", "fd00:41::8 is outside fd00:40::/64"),
            ("00000000a9", "fd00:40::9 is the gateway"),
            (
                "00000000b1",
                "not part 1's in 169.254.77.0/24 (key hostlo.subnet)",
            ),
            ("00000000b2", "not part 300's"),
            (
                "00000000b3",
                "NIC 00000000b0 holds part 0 of Hostlo pod \"web\" too",
            ),
            (
                "00000000b5",
                "its segment bridge \"nls0123456789ab\" is not its pod's",
            ),
            ("00000000b7", b7.as_str()),
            (
                "00000000c2",
                "10.40.0.9 is never leased: its IPv6 mirror fd00:40::9 is gateway6",
            ),
        ];
        assert_eq!(why.len(), expect.len(), "{why:#?}");
        for ((id, text), (want_id, want)) in why.iter().zip(expect) {
            assert_eq!(id, want_id);
            assert!(text.contains(want), "{id}: {text:?} lacks {want:?}");
        }
        let green = &s.ipam["green"];
        assert_eq!(green.leased(), 2, "a1 and c1 only");
        assert!(green.is_leased("10.40.0.2".parse().unwrap()));
        assert_eq!(s.ipam["other"].leased(), 0);
    }

    #[test]
    fn the_error_names_the_files_the_key_and_the_ways_out() {
        let cfg = config();
        let s = sort(&cfg, vec![rec("00000000a2", "vm1", "blue", "10.40.0.2", 2)]);
        let e = StaleRecords {
            state: "/var/lib/nestless/state.json".into(),
            config: cfg.path.clone(),
            records: s.misfits,
        }
        .to_string();
        for want in [
            "state file /var/lib/nestless/state.json",
            "config /etc/nestless/netagent.toml",
            "NIC 00000000a2 (VM vm1, sandbox \"sb-00000000a2\", 10.40.0.2 on \"blue\")",
            "[[network]] name",
            "restore the configuration",
            "--release-stale",
        ] {
            assert!(e.contains(want), "{e}\nlacks {want:?}");
        }
    }

    /// The state file's own invariants (issue 11, item 5): records that
    /// share an id (a host link), an IPv6 address or an attachment do not
    /// fit either; the older of two keeps what they share, whatever the
    /// file order, and a pooled NIC or a NIC of another scope or interface
    /// is another attachment.
    #[test]
    fn records_claiming_one_thing_leave_it_to_the_oldest() {
        let cfg = config();
        let at = |r: NicRecord, created_unix: i64| NicRecord { created_unix, ..r };
        let v6 = |r: NicRecord, a: &str| NicRecord {
            ipv6: Some(a.parse().unwrap()),
            ..r
        };
        let same_sandbox = |r: NicRecord| NicRecord {
            sandbox_id: "sb".into(),
            ..r
        };
        let records = vec![
            // Newer, first in the file: a1's address and MAC.
            at(rec("00000000a0", "vm1", "green", "10.40.0.2", 1), 20),
            at(rec("00000000a1", "vm1", "green", "10.40.0.2", 1), 10),
            // a1's id (another address, MAC and sandbox).
            at(rec("00000000a1", "vm1", "green", "10.40.0.3", 3), 30),
            // One IPv6 address twice.
            at(
                v6(
                    rec("00000000b0", "vm1", "green", "10.40.0.4", 4),
                    "fd00:40::4",
                ),
                10,
            ),
            at(
                v6(
                    rec("00000000b1", "vm1", "green", "10.40.0.5", 5),
                    "fd00:40::4",
                ),
                11,
            ),
            // One attachment twice; then the same sandbox in another
            // scope, on another interface, and pooled: all fit.
            at(
                same_sandbox(rec("00000000c0", "vm1", "green", "10.40.0.6", 6)),
                10,
            ),
            at(
                same_sandbox(rec("00000000c1", "vm1", "green", "10.40.0.7", 7)),
                11,
            ),
            NicRecord {
                scope: "team-one".into(),
                ..same_sandbox(rec("00000000c2", "vm1", "green", "10.40.0.8", 8))
            },
            NicRecord {
                interface: "net1".into(),
                ..same_sandbox(rec("00000000c3", "vm1", "green", "10.40.0.13", 9))
            },
            NicRecord {
                pooled: true,
                sandbox_id: String::new(),
                ..rec("00000000c4", "vm1", "green", "10.40.0.10", 10)
            },
            NicRecord {
                pooled: true,
                sandbox_id: String::new(),
                ..rec("00000000c5", "vm1", "green", "10.40.0.11", 11)
            },
            // An empty interface is eth0: c0's attachment again.
            NicRecord {
                interface: String::new(),
                ..at(
                    same_sandbox(rec("00000000c6", "vm1", "green", "10.40.0.12", 12)),
                    12,
                )
            },
        ];
        let s = sort(&cfg, records);
        let mut fits: Vec<String> = s.fits.iter().map(|r| r.id.to_string()).collect();
        fits.sort();
        assert_eq!(
            fits,
            [
                "00000000a1",
                "00000000b0",
                "00000000c0",
                "00000000c2",
                "00000000c3",
                "00000000c4",
                "00000000c5"
            ]
        );
        let why: Vec<(String, String)> = s
            .misfits
            .iter()
            .map(|m| (m.record.id.to_string(), m.misfit.to_string()))
            .collect();
        let expect = [
            (
                "00000000b1",
                "NIC 00000000b0 has the same IPv6 address fd00:40::4",
            ),
            ("00000000c1", "NIC 00000000c0 is the same attachment"),
            ("00000000c6", "NIC 00000000c0 is the same attachment"),
            ("00000000a0", "NIC 00000000a1 has the same MAC"),
            (
                "00000000a1",
                "an older record has the same id (and host link nlh00000000a1)",
            ),
        ];
        assert_eq!(why.len(), expect.len(), "{why:#?}");
        for (want_id, want) in expect {
            assert!(
                why.iter()
                    .any(|(id, text)| id == want_id && text.contains(want)),
                "{want_id}: {want:?} not in {why:#?}"
            );
        }
        let green = &s.ipam["green"];
        assert_eq!(green.leased(), 7, "one lease per record kept");
        assert!(!green.is_leased("10.40.0.3".parse().unwrap()), "a1's twin");
        // The refusal names both records of each pair and the way out.
        let e = StaleRecords {
            state: "/var/lib/nestless/state.json".into(),
            config: cfg.path.clone(),
            records: s.misfits,
        }
        .to_string();
        for want in [
            "NIC 00000000a0 (VM vm1, sandbox \"sb-00000000a0\", 10.40.0.2 on \"green\"): NIC 00000000a1 has the same MAC",
            "--release-stale",
        ] {
            assert!(e.contains(want), "{e}\nlacks {want:?}");
        }
    }
}
