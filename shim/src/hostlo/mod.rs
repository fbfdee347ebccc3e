//! Hostlo, guest side: one part of a pod that spans several VMs.
//!
//! A pod sandbox whose annotations name a Hostlo pod and part
//! (`io.nestless.hostlo/pod`, `io.nestless.hostlo/part`, optionally
//! `io.nestless.hostlo/ports = "80/tcp,53/udp"`) joins the pod through the
//! host agent: its VM gets a NIC on the pod's host-loopback segment, moved
//! into the pod's netns as `hostlo0` (address `.<part + 1>`). Then the part
//! keeps the pod's localhost whole, in user space:
//!
//! ```text
//!  part 0 netns (VM1)                                    part 1 netns (VM2)
//!  client ─▶ 127.0.0.1:8080 ─┐                       ┌─▶ mux 169.254.77.2:7071
//!            (egress relay)  └─ hostlo0 ── segment ──┘     reads "port 8080"
//!                                                          connects 127.0.0.1:8080 ─▶ server
//! ```
//!
//! * **Ports**: each part publishes the ports it serves: the declared ones and
//!   those its sockets listen on (read from `/proc/thread-self/net/{tcp,udp}*`
//!   in the pod netns, every second), to the agent (`HostloPublish`).
//! * **Egress**: for every port another part serves, a relay listens on
//!   127.0.0.1:P, and in part 0 also on the pod IP:P, and carries each TCP
//!   connection / UDP flow to that part's mux. The pod IP is part 0's eth0:
//!   the outside and the other parts reach it over the tenant network, and
//!   part 0's relays take them on to whichever part serves the port.
//! * **Ingress (mux)**: one TCP and one UDP socket on the segment address,
//!   port 7071; a connection or datagram names its target port, and the mux
//!   delivers it to 127.0.0.1:P (so services bound to loopback only are
//!   reached), falling back to the pod's other local addresses.
//! * **Watch**: `HostloWatch` long-polls the pod's view; every change re-plans
//!   the egress relays. A port two parts serve is a conflict: reported, not
//!   relayed.
//!
//! Why user-space relays rather than NAT rules: they reach services bound to
//! 127.0.0.1 without `route_localnet` tricks, need no iptables/nftables in the
//! guest, keep UDP flows apart by session, and follow port changes at once;
//! the cost is a copy through the relay (see `docs/benchmarks.md`).

pub mod discover;
pub mod part;
pub mod relay;
pub mod sockets;

use std::collections::HashMap;

pub use nestless_model::hostlo::{
    MUX_PORT, PART_ANNOTATION, POD_ANNOTATION, PORTS_ANNOTATION, SEGMENT_IFNAME,
};
pub use nestless_model::{Port, Proto};

/// Hostlo errors.
#[derive(Debug, thiserror::Error)]
pub enum HostloError {
    /// An annotation is malformed.
    #[error("annotation {key}: {reason}")]
    Annotation {
        /// The annotation.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The agent side failed.
    #[error(transparent)]
    Agent(#[from] crate::agent_client::ClientError),
    /// The segment NIC could not be plugged into the pod.
    #[error(transparent)]
    Guest(#[from] crate::podnet::guest::GuestNetError),
    /// A socket in the pod netns could not be made.
    #[error("cannot {op} in the pod network namespace")]
    Socket {
        /// What.
        op: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A sandbox's Hostlo membership, from its annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostloSpec {
    /// The Hostlo pod.
    pub pod: String,
    /// The part.
    pub part: u32,
    /// Declared ports.
    pub declared: Vec<Port>,
}

/// The Hostlo membership the annotations ask for; `None` without the pod annotation.
pub fn spec_from_annotations(
    a: &HashMap<String, String>,
) -> Result<Option<HostloSpec>, HostloError> {
    let Some(pod) = a.get(POD_ANNOTATION) else {
        return Ok(None);
    };
    let part = match a.get(PART_ANNOTATION) {
        None => {
            return Err(HostloError::Annotation {
                key: PART_ANNOTATION,
                reason: format!("required with {POD_ANNOTATION}"),
            })
        }
        Some(p) => p
            .trim()
            .parse::<u32>()
            .map_err(|_| HostloError::Annotation {
                key: PART_ANNOTATION,
                reason: format!("{p:?} is not a part number"),
            })?,
    };
    let declared = match a.get(PORTS_ANNOTATION) {
        None => Vec::new(),
        Some(s) => nestless_model::parse_port_list(s).map_err(|e| HostloError::Annotation {
            key: PORTS_ANNOTATION,
            reason: e.to_string(),
        })?,
    };
    Ok(Some(HostloSpec {
        pod: pod.clone(),
        part,
        declared,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotations() {
        let mut a = HashMap::new();
        assert_eq!(spec_from_annotations(&a).unwrap(), None);
        a.insert(POD_ANNOTATION.to_string(), "web".to_string());
        assert!(spec_from_annotations(&a)
            .unwrap_err()
            .to_string()
            .contains(PART_ANNOTATION));
        a.insert(PART_ANNOTATION.to_string(), "1".to_string());
        a.insert(
            PORTS_ANNOTATION.to_string(),
            "8080, 53/udp,8080/tcp".to_string(),
        );
        let s = spec_from_annotations(&a).unwrap().unwrap();
        assert_eq!(s.part, 1);
        assert_eq!(
            s.declared,
            vec![
                Port {
                    port: 53,
                    proto: Proto::Udp
                },
                Port {
                    port: 8080,
                    proto: Proto::Tcp
                }
            ]
        );
        a.insert(PORTS_ANNOTATION.to_string(), "99999".to_string());
        assert!(spec_from_annotations(&a).is_err());
        a.insert(PORTS_ANNOTATION.to_string(), "80/sctp".to_string());
        assert!(spec_from_annotations(&a).is_err());
    }
}
