//! Conversions between the protocol's generated types and the agent's own.
//! Nothing else in the agent sees a protobuf struct.

use nestless_protos::agent as pb;

use crate::{
    agent::{AttachRequest, NicSelector},
    config::NetworkConfig,
    error::AgentError,
    names::{Invalid, NicId},
    state::NicRecord,
};

/// An attach request from its protobuf form (checked by the agent).
pub fn attach_request(req: &pb::AttachNicRequest) -> AttachRequest {
    AttachRequest {
        sandbox_id: req.sandbox_id.clone(),
        network: (!req.network.is_empty()).then(|| req.network.clone()),
        labels: req
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// Which NIC a detach request names: exactly one of its fields.
pub fn detach_selector(req: &pb::DetachNicRequest) -> Result<NicSelector, AgentError> {
    match (req.nic_id.is_empty(), req.sandbox_id.is_empty()) {
        (false, true) => req
            .nic_id
            .parse::<NicId>()
            .map(NicSelector::Id)
            .map_err(|reason| Invalid::new("nic_id", reason).into()),
        (true, false) => Ok(NicSelector::Sandbox(req.sandbox_id.clone())),
        _ => Err(Invalid::new("nic_id", "give exactly one of nic_id and sandbox_id").into()),
    }
}

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
pub fn hostlo_view(v: &crate::hostlo::PodView) -> pb::HostloWatchResponse {
    let port = |p: &crate::hostlo::Port| pb::HostloPort {
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
pub fn hostlo_conflict(c: &crate::hostlo::Conflict) -> pb::HostloConflict {
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

/// Published ports from their protobuf form.
pub fn hostlo_ports(ports: &[pb::HostloPort]) -> Result<Vec<crate::hostlo::Port>, AgentError> {
    ports
        .iter()
        .map(|p| {
            let port = u16::try_from(p.port).map_err(|_| {
                Invalid::new("ports.port", format!("{} is not a port number", p.port))
            })?;
            Ok(crate::hostlo::Port {
                port,
                proto: p
                    .protocol
                    .parse()
                    .map_err(|e: nestless_model::PortParseError| {
                        Invalid::new("ports.protocol", e.to_string())
                    })?,
            })
        })
        .collect()
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
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Config, lifecycle::NicState};
    use std::path::Path;

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
    }

    #[test]
    fn detach_needs_exactly_one_selector() {
        let both = pb::DetachNicRequest {
            nic_id: "0000000001".into(),
            sandbox_id: "s".into(),
            ..Default::default()
        };
        assert!(detach_selector(&both).is_err());
        assert!(detach_selector(&pb::DetachNicRequest::default()).is_err());
        let bad = pb::DetachNicRequest {
            nic_id: "xyz".into(),
            ..Default::default()
        };
        assert!(detach_selector(&bad)
            .unwrap_err()
            .to_string()
            .contains("nic_id"));
    }
}
