//! The protocol's edge: protobuf requests parsed into the agent's checked
//! types, and the agent's records and views turned into protobuf replies.
//! Nothing else in the agent sees a protobuf struct.
//!
//! Parsing a request is the one place it is checked (as Firecracker's API
//! server parses a request into a checked action): `TryFrom<&pb::…Request>`
//! for [`AttachRequest`], [`NicSelector`], [`HostloJoin`], [`HostloPart`],
//! [`HostloPublish`] and [`HostloWatch`]. A bad field is an [`Invalid`]
//! naming it (ttrpc `INVALID_ARGUMENT`); the agent core never checks a
//! request field again.
//!
//! ```text
//! pb::AttachNicRequest ──TryFrom──▶ AttachRequest ──▶ Agent::attach ──▶ NicRecord ──nic()──▶ pb::Nic
//!                       └─ Invalid{field} ─▶ INVALID_ARGUMENT
//! ```

use std::{collections::BTreeMap, time::Duration};

use nestless_protos::agent as pb;

use crate::{
    agent::{
        AttachRequest, Attachment, HostloJoin, HostloPart, HostloPodInfo, HostloPublish,
        HostloWatch, Labels, NetworkName, NicSelector,
    },
    config::{HostloConfig, NetworkConfig, VmConfig, VmSpec},
    hostlo::{Conflict, Part, PodName, PodView, Port, PortList},
    names::{IfName, Invalid, NicId, Quoted, SandboxId, Scope},
    state::NicRecord,
};

// ---------------------------------------------------------------- requests
//
// Each request is parsed, and so checked, here and only here: the agent
// core takes the checked types. The rules live with the types
// (`SandboxId`, `NetworkName`, `Labels`, `PodName`, `Part`, `PortList`).

impl TryFrom<&pb::AttachNicRequest> for AttachRequest {
    type Error = Invalid;

    fn try_from(req: &pb::AttachNicRequest) -> Result<AttachRequest, Invalid> {
        Ok(AttachRequest {
            attachment: Attachment {
                scope: Scope::parse(&req.scope)?,
                sandbox_id: SandboxId::parse(&req.sandbox_id)?,
                interface: IfName::parse(&req.interface)?,
            },
            network: (!req.network.is_empty())
                .then(|| NetworkName::parse(&req.network))
                .transpose()?,
            labels: Labels::try_from(
                req.labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<BTreeMap<_, _>>(),
            )?,
        })
    }
}

impl TryFrom<&pb::DetachNicRequest> for NicSelector {
    type Error = Invalid;

    /// Exactly one of `nic_id` and `sandbox_id`; `scope` and `interface`
    /// only with `sandbox_id` (an empty `interface`: every NIC of the
    /// sandbox in that scope).
    fn try_from(req: &pb::DetachNicRequest) -> Result<NicSelector, Invalid> {
        match (req.nic_id.is_empty(), req.sandbox_id.is_empty()) {
            (false, true) => {
                for (field, value) in [("scope", &req.scope), ("interface", &req.interface)] {
                    if !value.is_empty() {
                        return Err(Invalid::new(field, "only with sandbox_id, not nic_id"));
                    }
                }
                req.nic_id
                    .parse::<NicId>()
                    .map(NicSelector::Id)
                    .map_err(|reason| Invalid::new("nic_id", reason))
            }
            (true, false) => Ok(NicSelector::Sandbox {
                scope: Scope::parse(&req.scope)?,
                sandbox_id: SandboxId::parse(&req.sandbox_id)?,
                interface: (!req.interface.is_empty())
                    .then(|| IfName::parse(&req.interface))
                    .transpose()?,
            }),
            _ => Err(Invalid::new(
                "nic_id",
                "give exactly one of nic_id and sandbox_id",
            )),
        }
    }
}

impl TryFrom<&pb::HostloJoinRequest> for HostloJoin {
    type Error = Invalid;

    fn try_from(req: &pb::HostloJoinRequest) -> Result<HostloJoin, Invalid> {
        Ok(HostloJoin {
            pod: PodName::parse(&req.pod)?,
            part: Part::parse(req.part)?,
            sandbox_id: SandboxId::parse(&req.sandbox_id)?,
        })
    }
}

impl TryFrom<&pb::HostloLeaveRequest> for HostloPart {
    type Error = Invalid;

    fn try_from(req: &pb::HostloLeaveRequest) -> Result<HostloPart, Invalid> {
        Ok(HostloPart {
            pod: PodName::parse(&req.pod)?,
            part: Part::parse(req.part)?,
        })
    }
}

impl TryFrom<&pb::HostloPublishRequest> for HostloPublish {
    type Error = Invalid;

    fn try_from(req: &pb::HostloPublishRequest) -> Result<HostloPublish, Invalid> {
        // Each port's number and protocol first, then the pod and part, then
        // the list as a whole.
        let ports = hostlo_ports(&req.ports)?;
        Ok(HostloPublish {
            pod: PodName::parse(&req.pod)?,
            part: Part::parse(req.part)?,
            ports: PortList::new(ports)?,
        })
    }
}

impl TryFrom<&pb::HostloWatchRequest> for HostloWatch {
    type Error = Invalid;

    fn try_from(req: &pb::HostloWatchRequest) -> Result<HostloWatch, Invalid> {
        Ok(HostloWatch {
            pod: PodName::parse(&req.pod)?,
            since: req.since_version,
            timeout: Duration::from_millis(u64::from(req.timeout_ms)),
        })
    }
}

/// Published ports from their protobuf form (fields `ports.port`,
/// `ports.protocol`).
fn hostlo_ports(ports: &[pb::HostloPort]) -> Result<Vec<Port>, Invalid> {
    ports
        .iter()
        .map(|p| {
            let port = u16::try_from(p.port).map_err(|_| {
                Invalid::new("ports.port", format!("{} is not a port number", p.port))
            })?;
            let proto = p
                .protocol
                .parse()
                .map_err(|_: nestless_model::PortParseError| {
                    Invalid::new(
                        "ports.protocol",
                        format!("{} is not tcp or udp", Quoted(&p.protocol)),
                    )
                })?;
            Ok(Port { port, proto })
        })
        .collect()
}

// ---------------------------------------------------------------- pages

/// NICs in a page when the client does not say (`page_size` 0).
pub const DEFAULT_PAGE_SIZE: usize = 128;
/// Most NICs in a page: 128 NICs with the largest labels a NIC may have
/// (16 KiB, [`crate::labels`]) and every other field at its longest make
/// about 2.3 MiB, well inside ttrpc's 4 MiB message limit.
pub const MAX_PAGE_SIZE: usize = 128;

/// A page of a NIC listing asked for: the NICs after id `after` (from the
/// first: `None`), at most `size` of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    /// The last NIC id of the previous page.
    pub after: Option<NicId>,
    /// How many at most.
    pub size: usize,
}

impl PageRequest {
    /// Checks `page_size` and `page_token` (fields `page_size`,
    /// `page_token`). The token is the last NIC id of the previous page
    /// (clients take it as opaque); a size past [`MAX_PAGE_SIZE`] is cut to
    /// it, 0 is [`DEFAULT_PAGE_SIZE`].
    pub fn parse(page_size: u32, page_token: &str) -> Result<PageRequest, Invalid> {
        let after = if page_token.is_empty() {
            None
        } else {
            Some(page_token.parse::<NicId>().map_err(|_| {
                Invalid::new(
                    "page_token",
                    format!(
                        "{} is not a page token of this listing (give the next_page_token of the previous reply, or none)",
                        Quoted(page_token)
                    ),
                )
            })?)
        };
        let size = match page_size as usize {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        Ok(PageRequest { after, size })
    }
}

/// The `next_page_token` of a page: its last NIC's id when more follow,
/// else empty.
pub fn next_page_token(page: &[NicRecord], more: bool) -> String {
    match page.last() {
        Some(r) if more => r.id.to_string(),
        _ => String::new(),
    }
}

// ---------------------------------------------------------------- replies

/// The NIC as the guest must configure it.
pub fn nic(rec: &NicRecord, net: &NetworkConfig) -> pb::Nic {
    let mut addresses = vec![pb::IpConfig {
        address: rec.ipv4.to_string(),
        prefix_len: u32::from(net.subnet.prefix_len()),
        gateway: net.gateway.to_string(),
        ..Default::default()
    }];
    let mut routes = vec![pb::Route {
        destination: "0.0.0.0/0".into(),
        gateway: net.gateway.to_string(),
        ..Default::default()
    }];
    if let (Some(v6), Some(net6)) = (rec.ipv6, net.subnet6) {
        addresses.push(pb::IpConfig {
            address: v6.to_string(),
            prefix_len: u32::from(net6.prefix_len()),
            gateway: net.gateway6.map(|g| g.to_string()).unwrap_or_default(),
            ..Default::default()
        });
        if let Some(g6) = net.gateway6 {
            routes.push(pb::Route {
                destination: "::/0".into(),
                gateway: g6.to_string(),
                ..Default::default()
            });
        }
    }
    for r in &net.routes {
        routes.push(pb::Route {
            destination: r.destination.to_string(),
            gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
            ..Default::default()
        });
    }
    pb::Nic {
        id: rec.id.to_string(),
        sandbox_id: rec.sandbox_id.clone(),
        network: rec.network.clone(),
        mac: rec.mac.to_string(),
        addresses,
        routes,
        mtu: net.mtu,
        labels: rec
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        scope: rec.scope.clone(),
        interface: rec.interface.clone(),
        ..Default::default()
    }
}

/// The admin view of a record.
pub fn nic_record(rec: &NicRecord, net: Option<&NetworkConfig>) -> pb::NicRecord {
    pb::NicRecord {
        vm: rec.vm.clone(),
        nic: protobuf::MessageField::from_option(net.map(|n| nic(rec, n))),
        state: if rec.pooled {
            "pooled".to_string()
        } else {
            rec.state.as_str().to_string()
        },
        host_ifname: rec.id.names().host_if,
        slot: rec.slot.clone().unwrap_or_default(),
        created_unix: rec.created_unix,
        ..Default::default()
    }
}

/// A Hostlo pod view.
pub fn hostlo_view(v: &PodView) -> pb::HostloWatchResponse {
    let port = |p: &Port| pb::HostloPort {
        port: u32::from(p.port),
        protocol: p.proto.as_str().to_string(),
        ..Default::default()
    };
    pb::HostloWatchResponse {
        version: v.version,
        parts: v
            .parts
            .iter()
            .map(|(part, (addr, ports))| pb::HostloPart {
                part: *part,
                address: addr.to_string(),
                ports: ports.iter().map(port).collect(),
                ..Default::default()
            })
            .collect(),
        conflicts: v.conflicts.iter().map(hostlo_conflict).collect(),
        pod_ip: v.pod_ip.map(|a| a.to_string()).unwrap_or_default(),
        prefix_len: u32::from(v.prefix_len),
        ..Default::default()
    }
}

/// A Hostlo port conflict.
pub fn hostlo_conflict(c: &Conflict) -> pb::HostloConflict {
    pb::HostloConflict {
        port: protobuf::MessageField::some(pb::HostloPort {
            port: u32::from(c.port.port),
            protocol: c.port.proto.as_str().to_string(),
            ..Default::default()
        }),
        parts: c.parts.clone(),
        ..Default::default()
    }
}

/// A Hostlo part's segment NIC as the guest must configure it.
pub fn hostlo_nic(rec: &NicRecord, pod: &str, hostlo: &HostloConfig) -> pb::Nic {
    pb::Nic {
        id: rec.id.to_string(),
        sandbox_id: rec.sandbox_id.clone(),
        network: format!("hostlo:{pod}"),
        mac: rec.mac.to_string(),
        addresses: vec![pb::IpConfig {
            address: rec.ipv4.to_string(),
            prefix_len: u32::from(hostlo.subnet.prefix_len()),
            ..Default::default()
        }],
        mtu: hostlo.mtu,
        ..Default::default()
    }
}

/// A Hostlo pod as the operator sees it.
pub fn hostlo_pod(p: &HostloPodInfo) -> pb::HostloPodInfo {
    pb::HostloPodInfo {
        pod: p.pod.clone(),
        bridge: p.bridge.clone(),
        network: p.network.clone(),
        members: p
            .members
            .iter()
            .map(|(part, vm)| format!("{part}:{vm}"))
            .collect(),
        view: protobuf::MessageField::some(hostlo_view(&p.view)),
        ..Default::default()
    }
}

/// The lease a record holds.
pub fn lease(rec: &NicRecord) -> pb::Lease {
    pb::Lease {
        network: match &rec.hostlo {
            Some(h) => format!("hostlo:{}", h.pod),
            None => rec.network.clone(),
        },
        address: rec.ipv4.to_string(),
        vm: rec.vm.clone(),
        nic_id: rec.id.to_string(),
        sandbox_id: rec.sandbox_id.clone(),
        scope: rec.scope.clone(),
        interface: rec.interface.clone(),
        ..Default::default()
    }
}

/// A registered VM's fields from a request: an empty string, 0 or an empty
/// list is a key left out. Nothing is checked here: the configuration's
/// checker takes the result as it takes a `[[vm]]` entry.
pub fn vm_spec(v: &pb::VmSpec) -> VmSpec {
    let text = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let path = |s: &str| (!s.is_empty()).then(|| std::path::PathBuf::from(s));
    VmSpec {
        name: v.name.clone(),
        backend: v.backend.clone(),
        network: text(&v.network),
        cid: (v.cid != 0).then_some(v.cid),
        vsock_uds: path(&v.vsock_uds),
        socket: path(&v.socket),
        max_nics: (v.max_nics != 0).then_some(v.max_nics),
        warm_pool: (v.warm_pool != 0).then_some(v.warm_pool),
        qmp_socket: path(&v.qmp_socket),
        hotplug_slots: (!v.hotplug_slots.is_empty()).then(|| v.hotplug_slots.clone()),
        netns: text(&v.netns),
        domain: text(&v.domain),
        libvirt_uri: text(&v.libvirt_uri),
        persist_nics: v.persist_nics.then_some(true),
        ..Default::default()
    }
}

/// A registered VM's fields as given, for a reply.
pub fn vm_spec_pb(v: &VmSpec) -> pb::VmSpec {
    let path = |p: &Option<std::path::PathBuf>| {
        p.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    };
    pb::VmSpec {
        name: v.name.clone(),
        backend: v.backend.clone(),
        network: v.network.clone().unwrap_or_default(),
        cid: v.cid.unwrap_or(0),
        vsock_uds: path(&v.vsock_uds),
        socket: path(&v.socket),
        max_nics: v.max_nics.unwrap_or(0),
        warm_pool: v.warm_pool.unwrap_or(0),
        qmp_socket: path(&v.qmp_socket),
        hotplug_slots: v.hotplug_slots.clone().unwrap_or_default(),
        netns: v.netns.clone().unwrap_or_default(),
        domain: v.domain.clone().unwrap_or_default(),
        libvirt_uri: v.libvirt_uri.clone().unwrap_or_default(),
        persist_nics: v.persist_nics.unwrap_or(false),
        ..Default::default()
    }
}

/// A served VM for a reply (`status`: whether its backend answers; `nics`:
/// how many it has; `spec`: its registered fields).
pub fn vm_info(
    vm: &VmConfig,
    max_nics: u32,
    warm_pool: u32,
    nics: usize,
    status: String,
    spec: Option<&VmSpec>,
) -> pb::VmInfo {
    pb::VmInfo {
        name: vm.name.clone(),
        backend: vm.backend.kind().into(),
        endpoint: vm.backend.endpoint().display().to_string(),
        network: vm.network.clone(),
        cid: vm.cid.unwrap_or(0),
        unix_socket: vm
            .unix_socket
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        nics: u32::try_from(nics).unwrap_or(u32::MAX),
        max_nics,
        status,
        registered: vm.registered,
        warm_pool,
        spec: spec.map(vm_spec_pb).into(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Config, lifecycle::NicState};
    use std::path::Path;

    #[test]
    fn a_libvirt_vm_spec_keeps_its_keys_both_ways() {
        let spec = VmSpec {
            name: "web".into(),
            backend: "libvirt".into(),
            domain: Some("web-dom".into()),
            libvirt_uri: Some("qemu:///session".into()),
            persist_nics: Some(true),
            cid: Some(9),
            ..Default::default()
        };
        assert_eq!(vm_spec(&vm_spec_pb(&spec)), spec);
        // persist_nics = false is its default: left out, as in the file.
        let off = pb::VmSpec {
            name: "web".into(),
            backend: "libvirt".into(),
            ..Default::default()
        };
        let back = vm_spec(&off);
        assert_eq!((back.domain, back.persist_nics), (None, None));
    }

    #[test]
    fn nic_carries_addresses_routes_and_mtu() {
        let cfg = Config::parse(
            Path::new("t"),
            r#"
            [[network]]
            name = "n"
            bridge = "b"
            subnet = "10.1.0.0/16"
            gateway = "10.1.0.1"
            mtu = 9000
            subnet6 = "fd00:1::/64"
            gateway6 = "fd00:1::1"
            routes = [{ destination = "172.16.0.0/12" }]
            "#,
        )
        .unwrap();
        let net = &cfg.networks["n"];
        let rec = NicRecord {
            id: "0000000001".parse().unwrap(),
            vm: "v".into(),
            sandbox_id: "s".into(),
            scope: "team-one".into(),
            interface: "net1".into(),
            network: "n".into(),
            mac: "52:54:00:00:00:01".parse().unwrap(),
            ipv4: "10.1.2.3".parse().unwrap(),
            ipv6: Some("fd00:1::203".parse().unwrap()),
            state: NicState::Attached,
            slot: None,
            labels: [("k".to_string(), "v".to_string())].into(),
            created_unix: 0,
            hostlo: None,
            pooled: false,
        };
        let n = nic(&rec, net);
        assert_eq!(n.mtu, 9000);
        assert_eq!(n.addresses[0].address, "10.1.2.3");
        assert_eq!(n.addresses[0].prefix_len, 16);
        assert_eq!(n.addresses[1].address, "fd00:1::203");
        let routes: Vec<(String, String)> = n
            .routes
            .iter()
            .map(|r| (r.destination.clone(), r.gateway.clone()))
            .collect();
        assert_eq!(
            routes,
            [
                ("0.0.0.0/0".to_string(), "10.1.0.1".to_string()),
                ("::/0".to_string(), "fd00:1::1".to_string()),
                ("172.16.0.0/12".to_string(), String::new())
            ]
        );
        assert_eq!(n.labels["k"], "v");
        assert_eq!(
            (n.scope.as_str(), n.interface.as_str()),
            ("team-one", "net1")
        );
        let l = lease(&rec);
        assert_eq!(
            (l.scope.as_str(), l.interface.as_str()),
            ("team-one", "net1")
        );
    }

    /// The field a request is refused for, and that the refusal is
    /// INVALID_ARGUMENT on the wire.
    fn refused<T: std::fmt::Debug>(r: Result<T, Invalid>) -> &'static str {
        let e = r.unwrap_err();
        let code = crate::error::AgentError::from(e.clone()).code();
        assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{e}");
        e.field
    }

    fn attach(sandbox_id: &str, network: &str, labels: &[(&str, &str)]) -> pb::AttachNicRequest {
        pb::AttachNicRequest {
            sandbox_id: sandbox_id.into(),
            network: network.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn attach_requests() {
        let r = AttachRequest::try_from(&attach("sb-1", "", &[("k", "v")])).unwrap();
        assert_eq!(r.attachment.sandbox_id.as_str(), "sb-1");
        assert_eq!(r.attachment.scope.as_str(), "", "no scope: CRI and CNI");
        assert_eq!(
            r.attachment.interface.as_str(),
            "eth0",
            "no interface: eth0"
        );
        assert!(r.network.is_none(), "empty network: the VM's own");
        assert_eq!(r.labels.as_map()["k"], "v");
        let r = AttachRequest::try_from(&attach("sb-1", "tenant", &[])).unwrap();
        assert_eq!(r.network.unwrap().as_str(), "tenant");
        let long = "x".repeat(129);
        let net65 = "n".repeat(65);
        let key254 = "k".repeat(254);
        let many: Vec<(String, String)> = (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        for (req, field) in [
            (attach("", "", &[]), "sandbox_id"),
            (attach("a/b", "", &[]), "sandbox_id"),
            (attach(&long, "", &[]), "sandbox_id"),
            (attach("sb", &net65, &[]), "network"),
            (attach("sb", "", &many), "labels"),
            (attach("sb", "", &[("", "v")]), "labels"),
            (attach("sb", "", &[(key254.as_str(), "v")]), "labels"),
            // The first bad field is the one named.
            (attach("", &net65, &many), "sandbox_id"),
            (attach("sb", &net65, &many), "network"),
        ] {
            assert_eq!(refused(AttachRequest::try_from(&req)), field, "{req:?}");
        }
        let scoped = |scope: &str, interface: &str| pb::AttachNicRequest {
            scope: scope.into(),
            interface: interface.into(),
            ..attach("app", "", &[])
        };
        let r = AttachRequest::try_from(&scoped("team-one", "net1")).unwrap();
        assert_eq!(
            (r.attachment.scope.as_str(), r.attachment.interface.as_str()),
            ("team-one", "net1")
        );
        assert_eq!(r.attachment.to_string(), "team-one/app net1");
        for (req, field) in [
            (scoped("team/one", ""), "scope"),
            (scoped(&"n".repeat(77), ""), "scope"),
            (scoped("", "a/b"), "interface"),
            (scoped("", "eth0:1"), "interface"),
            (scoped("", ".."), "interface"),
            (scoped("", &"i".repeat(16)), "interface"),
        ] {
            assert_eq!(refused(AttachRequest::try_from(&req)), field, "{req:?}");
        }
    }

    #[test]
    fn detach_requests_name_exactly_one_nic() {
        let by_id = pb::DetachNicRequest {
            nic_id: "0000000001".into(),
            ..Default::default()
        };
        assert_eq!(
            NicSelector::try_from(&by_id).unwrap(),
            NicSelector::Id("0000000001".parse().unwrap())
        );
        let by_sandbox = pb::DetachNicRequest {
            sandbox_id: "sb".into(),
            ..Default::default()
        };
        assert_eq!(
            NicSelector::try_from(&by_sandbox).unwrap(),
            NicSelector::Sandbox {
                scope: Scope::default(),
                sandbox_id: SandboxId::parse("sb").unwrap(),
                interface: None,
            },
            "no interface: every NIC of the sandbox"
        );
        let one = pb::DetachNicRequest {
            sandbox_id: "sb".into(),
            scope: "team-two".into(),
            interface: "net1".into(),
            ..Default::default()
        };
        assert_eq!(
            NicSelector::try_from(&one).unwrap(),
            NicSelector::Sandbox {
                scope: Scope::parse("team-two").unwrap(),
                sandbox_id: SandboxId::parse("sb").unwrap(),
                interface: Some(IfName::parse("net1").unwrap()),
            }
        );
        for (req, field) in [
            (
                pb::DetachNicRequest {
                    nic_id: "0000000001".into(),
                    scope: "team-two".into(),
                    ..Default::default()
                },
                "scope",
            ),
            (
                pb::DetachNicRequest {
                    nic_id: "0000000001".into(),
                    interface: "eth0".into(),
                    ..Default::default()
                },
                "interface",
            ),
            (
                pb::DetachNicRequest {
                    sandbox_id: "sb".into(),
                    scope: "a b".into(),
                    ..Default::default()
                },
                "scope",
            ),
            (
                pb::DetachNicRequest {
                    sandbox_id: "sb".into(),
                    interface: "a/b".into(),
                    ..Default::default()
                },
                "interface",
            ),
        ] {
            assert_eq!(refused(NicSelector::try_from(&req)), field, "{req:?}");
        }
        let both = pb::DetachNicRequest {
            nic_id: "0000000001".into(),
            sandbox_id: "s".into(),
            ..Default::default()
        };
        assert_eq!(refused(NicSelector::try_from(&both)), "nic_id");
        assert_eq!(
            refused(NicSelector::try_from(&pb::DetachNicRequest::default())),
            "nic_id"
        );
        let bad = pb::DetachNicRequest {
            nic_id: "xyz".into(),
            ..Default::default()
        };
        let e = NicSelector::try_from(&bad).unwrap_err();
        assert!(e.to_string().contains("nic_id"), "{e}");
        let bad_sandbox = pb::DetachNicRequest {
            sandbox_id: "../etc".into(),
            ..Default::default()
        };
        assert_eq!(refused(NicSelector::try_from(&bad_sandbox)), "sandbox_id");
    }

    #[test]
    fn hostlo_join_and_leave_requests() {
        let join = |pod: &str, part: u32, sb: &str| pb::HostloJoinRequest {
            pod: pod.into(),
            part,
            sandbox_id: sb.into(),
            ..Default::default()
        };
        let j = HostloJoin::try_from(&join("web", 1, "sb")).unwrap();
        assert_eq!(
            (j.pod.as_str(), j.part.get(), j.sandbox_id.as_str()),
            ("web", 1, "sb")
        );
        assert_eq!(refused(HostloJoin::try_from(&join("Web", 1, "sb"))), "pod");
        assert_eq!(refused(HostloJoin::try_from(&join("", 1, "sb"))), "pod");
        assert_eq!(
            refused(HostloJoin::try_from(&join("web", 253, "sb"))),
            "part"
        );
        assert_eq!(
            refused(HostloJoin::try_from(&join("web", 1, ""))),
            "sandbox_id"
        );
        let leave = |pod: &str, part: u32| pb::HostloLeaveRequest {
            pod: pod.into(),
            part,
            ..Default::default()
        };
        let l = HostloPart::try_from(&leave("web", 252)).unwrap();
        assert_eq!((l.pod.as_str(), l.part.get()), ("web", 252));
        assert_eq!(refused(HostloPart::try_from(&leave("a_b", 0))), "pod");
        assert_eq!(refused(HostloPart::try_from(&leave("web", 300))), "part");
    }

    #[test]
    fn hostlo_publish_requests() {
        let port = |port: u32, protocol: &str| pb::HostloPort {
            port,
            protocol: protocol.into(),
            ..Default::default()
        };
        let publish = |pod: &str, part: u32, ports: Vec<pb::HostloPort>| pb::HostloPublishRequest {
            pod: pod.into(),
            part,
            ports,
            ..Default::default()
        };
        let p = HostloPublish::try_from(&publish(
            "web",
            0,
            vec![port(80, "tcp"), port(53, "udp"), port(80, "tcp")],
        ))
        .unwrap();
        assert_eq!(
            p.ports.as_slice(),
            &[Port::udp(53), Port::tcp(80)],
            "sorted, each once"
        );
        assert_eq!(
            refused(HostloPublish::try_from(&publish(
                "web",
                0,
                vec![port(70000, "tcp")]
            ))),
            "ports.port"
        );
        assert_eq!(
            refused(HostloPublish::try_from(&publish(
                "web",
                0,
                vec![port(0, "tcp")]
            ))),
            "ports.port"
        );
        assert_eq!(
            refused(HostloPublish::try_from(&publish(
                "web",
                0,
                vec![port(80, "sctp")]
            ))),
            "ports.protocol"
        );
        assert_eq!(
            refused(HostloPublish::try_from(&publish(
                "web",
                0,
                (1..=1025).map(|p| port(p, "tcp")).collect()
            ))),
            "ports"
        );
        assert_eq!(
            refused(HostloPublish::try_from(&publish("WEB", 0, vec![]))),
            "pod"
        );
        assert_eq!(
            refused(HostloPublish::try_from(&publish("web", 999, vec![]))),
            "part"
        );
        // A port that does not parse is named before the pod.
        assert_eq!(
            refused(HostloPublish::try_from(&publish(
                "WEB",
                0,
                vec![port(80, "x")]
            ))),
            "ports.protocol"
        );
    }

    #[test]
    fn hostlo_watch_requests() {
        let w = HostloWatch::try_from(&pb::HostloWatchRequest {
            pod: "web".into(),
            since_version: 7,
            timeout_ms: 1500,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (w.pod.as_str(), w.since, w.timeout),
            ("web", 7, Duration::from_millis(1500))
        );
        assert_eq!(
            refused(HostloWatch::try_from(&pb::HostloWatchRequest {
                pod: "no/pod".into(),
                ..Default::default()
            })),
            "pod"
        );
    }

    /// Issue 11, item 4: a refusal's reply quotes at most a bounded part of
    /// any field: a 1 MiB value in each string field of each request gives
    /// a status text of a few hundred bytes, saying the value's length.
    #[test]
    fn refusals_quote_at_most_a_bounded_part_of_a_field() {
        let huge = "\u{1}".repeat(1 << 20);
        let huge_name = "X".repeat(1 << 20);
        let status = |e: Invalid| -> String {
            match crate::error::AgentError::from(e).to_ttrpc() {
                ttrpc::Error::RpcStatus(s) => s.message().to_string(),
                other => panic!("{other:?}"),
            }
        };
        let mut texts: Vec<(&str, String)> = Vec::new();
        for (name, value) in [("control", &huge), ("long", &huge_name)] {
            let v = value.clone();
            let attach = |f: &dyn Fn(&mut pb::AttachNicRequest)| {
                let mut r = pb::AttachNicRequest {
                    sandbox_id: "sb".into(),
                    ..Default::default()
                };
                f(&mut r);
                status(AttachRequest::try_from(&r).unwrap_err())
            };
            texts.push((name, attach(&|r| r.sandbox_id = v.clone())));
            texts.push((name, attach(&|r| r.scope = v.clone())));
            texts.push((name, attach(&|r| r.interface = v.clone())));
            texts.push((name, attach(&|r| r.network = v.clone())));
            texts.push((
                name,
                attach(&|r| {
                    r.labels.insert(v.clone(), "v".into());
                }),
            ));
            texts.push((
                name,
                attach(&|r| {
                    r.labels.insert("k".into(), v.clone());
                }),
            ));
            let detach = |r: pb::DetachNicRequest| status(NicSelector::try_from(&r).unwrap_err());
            texts.push((
                name,
                detach(pb::DetachNicRequest {
                    nic_id: v.clone(),
                    ..Default::default()
                }),
            ));
            texts.push((
                name,
                detach(pb::DetachNicRequest {
                    sandbox_id: "sb".into(),
                    scope: v.clone(),
                    ..Default::default()
                }),
            ));
            texts.push((
                name,
                detach(pb::DetachNicRequest {
                    sandbox_id: "sb".into(),
                    interface: v.clone(),
                    ..Default::default()
                }),
            ));
            let hostlo: [Invalid; 5] = [
                HostloJoin::try_from(&pb::HostloJoinRequest {
                    pod: v.clone(),
                    sandbox_id: "sb".into(),
                    ..Default::default()
                })
                .unwrap_err(),
                HostloJoin::try_from(&pb::HostloJoinRequest {
                    pod: "p".into(),
                    sandbox_id: v.clone(),
                    ..Default::default()
                })
                .unwrap_err(),
                HostloPart::try_from(&pb::HostloLeaveRequest {
                    pod: v.clone(),
                    ..Default::default()
                })
                .unwrap_err(),
                HostloWatch::try_from(&pb::HostloWatchRequest {
                    pod: v.clone(),
                    ..Default::default()
                })
                .unwrap_err(),
                HostloPublish::try_from(&pb::HostloPublishRequest {
                    pod: "p".into(),
                    ports: vec![pb::HostloPort {
                        port: 80,
                        protocol: v.clone(),
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .unwrap_err(),
            ];
            texts.extend(hostlo.into_iter().map(|e| (name, status(e))));
        }
        for (name, t) in &texts {
            assert!(
                t.len() < 400,
                "{name}: {} bytes: {}",
                t.len(),
                &t[..400.min(t.len())]
            );
        }
        // The values that are quoted say their length.
        assert!(
            texts.iter().any(|(_, t)| t.contains("…(1048576 bytes)")),
            "{texts:?}"
        );
        // An unknown VM named in a 1 MiB admin request: bounded too.
        let cut = crate::error::AgentError::UnknownVm(crate::names::Quoted(&huge_name).to_string());
        let t = match cut.to_ttrpc() {
            ttrpc::Error::RpcStatus(s) => s.message().to_string(),
            other => panic!("{other:?}"),
        };
        assert!(t.len() < 200, "{t}");
        // And the last bound: any status text is cut.
        let e = crate::error::AgentError::NicNotFound {
            vm: "vm".into(),
            what: huge_name.clone(),
        };
        match e.to_ttrpc() {
            ttrpc::Error::RpcStatus(s) => {
                assert!(s.message().len() < crate::error::MAX_STATUS_TEXT + 40);
                assert!(s.message().ends_with("bytes)"), "{}", &s.message()[..100]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn page_requests() {
        assert_eq!(
            PageRequest::parse(0, "").unwrap(),
            PageRequest {
                after: None,
                size: DEFAULT_PAGE_SIZE
            }
        );
        assert_eq!(PageRequest::parse(7, "").unwrap().size, 7);
        assert_eq!(
            PageRequest::parse(u32::MAX, "").unwrap().size,
            MAX_PAGE_SIZE
        );
        let p = PageRequest::parse(5, "00000000a1").unwrap();
        assert_eq!(p.after.unwrap().to_string(), "00000000a1");
        let huge = "z".repeat(1 << 20);
        for bad in ["x", "00000000A1", "00000000a1/", huge.as_str()] {
            let e = PageRequest::parse(0, bad).unwrap_err();
            assert_eq!(e.field, "page_token");
            let code = crate::error::AgentError::from(e.clone()).code();
            assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
            assert!(e.reason.len() < 300, "{}", e.reason.len());
            assert!(e.to_string().starts_with("page_token: "), "{e}");
        }
    }

    /// The largest page, of NICs with the largest labels and every field at
    /// its longest, fits in a ttrpc message (4 MiB) with room to spare.
    #[test]
    fn the_largest_page_fits_in_a_message() {
        use protobuf::Message;
        let net = crate::config::Config::parse(
            std::path::Path::new("t.toml"),
            &format!(
                "[[network]]\nname = \"{}\"\nbridge = \"br0\"\nsubnet = \"10.9.0.0/24\"\ngateway = \"10.9.0.1\"\nsubnet6 = \"fd00:9::/64\"\ngateway6 = \"fd00:9::1\"\n[[vm]]\nname = \"{}\"\nbackend = \"qemu\"\nqmp_socket = \"/q1\"\ncid = 3\n",
                "n".repeat(64),
                "v".repeat(64)
            ),
        )
        .unwrap()
        .networks
        .into_values()
        .next()
        .unwrap();
        let rec = |i: usize| crate::state::NicRecord {
            id: format!("{i:010x}").parse().unwrap(),
            vm: "v".repeat(64),
            sandbox_id: "s".repeat(crate::names::MAX_SANDBOX_ID),
            scope: "c".repeat(76),
            interface: "i".repeat(15),
            network: net.name.clone(),
            mac: nestless_model::MacAddr([0x52, 0x54, 0, 0, 0, 1]),
            ipv4: "10.9.0.200".parse().unwrap(),
            ipv6: Some("fd00:9::ffff:ffff:ffff:ffff".parse().unwrap()),
            state: crate::lifecycle::NicState::Detaching,
            slot: Some("pci.255".into()),
            labels: crate::labels::maximal(),
            created_unix: i64::MAX,
            hostlo: None,
            pooled: false,
        };
        let page: Vec<_> = (0..MAX_PAGE_SIZE).map(rec).collect();
        let admin = pb::ListAllNicsResponse {
            nics: page.iter().map(|r| nic_record(r, Some(&net))).collect(),
            next_page_token: "0".repeat(10),
            ..Default::default()
        };
        let vm = pb::ListNicsResponse {
            nics: page.iter().map(|r| nic(r, &net)).collect(),
            next_page_token: "0".repeat(10),
            ..Default::default()
        };
        for (what, size) in [
            ("ListAllNics", admin.compute_size()),
            ("ListNics", vm.compute_size()),
        ] {
            eprintln!("{what}: the largest page is {size} bytes");
            assert!(size < 3 << 20, "{what}: {size} bytes");
        }
    }
}
