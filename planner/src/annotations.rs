//! The Hostlo placement as pod annotations: one JSON document per spanning pod.
//!
//! Each part of a pod (its containers on one VM) becomes one pod object in Kubernetes,
//! annotated with [`POD_ANNOTATION`] = the Hostlo pod name (shared by all parts) and
//! [`PART_ANNOTATION`] = the part index. Pods that lie within one VM need no Hostlo and
//! are not written.
use serde::Serialize;

use super::model::{Catalogue, Client, Placement};

pub use nestless_model::hostlo::{PART_ANNOTATION, POD_ANNOTATION};

/// One part of a spanning pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Part {
    /// Index of the part.
    pub part: usize,
    /// The VM that runs it (`vm-<index>` within the client's plan).
    pub vm: String,
    /// The VM's type.
    pub vm_type: String,
    /// The annotations of the part's pod object.
    pub annotations: std::collections::BTreeMap<String, String>,
    /// Names of its containers.
    pub containers: Vec<String>,
}

/// One spanning pod of a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodAnnotations {
    /// The client.
    pub client: String,
    /// The pod's name in the input.
    pub pod: String,
    /// The Hostlo pod name (a DNS label).
    pub hostlo_pod: String,
    /// Its parts.
    pub parts: Vec<Part>,
}

/// FNV-1a, 64 bits, over `bytes`, continuing from `h`.
fn fnv1a64(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A DNS-label Hostlo pod name for `(client, pod)`:
/// `hl-<16 hex digits>-<readable part of the pod name>`, at most 63 characters.
///
/// The hex digits are a 64-bit FNV-1a hash of the exact client and pod names (each
/// preceded by its length, so no two pairs hash the same bytes), so two pods whose names
/// differ only in characters that are not DNS-label characters (`/` against `_`), in case,
/// or after the part that fits get different names. The readable part is the pod name in
/// lower case, other characters as `-`, cut to fit. [`pod_annotations`] users that gather
/// names from many clients still check them for (astronomically unlikely) collisions.
pub fn hostlo_pod_name(client: &str, pod: &str) -> String {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for part in [client, pod] {
        h = fnv1a64(h, &(part.len() as u64).to_le_bytes());
        h = fnv1a64(h, part.as_bytes());
    }
    let mut s = format!("hl-{h:016x}-");
    for ch in pod.chars() {
        let c = ch.to_ascii_lowercase();
        s.push(if c.is_ascii_alphanumeric() { c } else { '-' });
    }
    s.truncate(63);
    while s.ends_with('-') {
        s.pop();
    }
    s
}

/// The documents of one client's Hostlo placement.
pub fn pod_annotations(
    client: &Client,
    placement: &Placement,
    cat: &Catalogue,
) -> Vec<PodAnnotations> {
    let mut out = Vec::new();
    for (pod, vms) in placement.spanning_pods() {
        let p = &client.pods[pod as usize];
        let name = hostlo_pod_name(&client.name, &p.name);
        let parts = vms
            .iter()
            .enumerate()
            .map(|(k, &v)| {
                let vm = &placement.vms[v];
                let mut annotations = std::collections::BTreeMap::new();
                annotations.insert(POD_ANNOTATION.to_string(), name.clone());
                annotations.insert(PART_ANNOTATION.to_string(), k.to_string());
                Part {
                    part: k,
                    vm: format!("vm-{v}"),
                    vm_type: cat.types()[vm.ty].name.clone(),
                    annotations,
                    containers: vm
                        .items
                        .iter()
                        .filter(|it| it.pod == pod)
                        .map(|it| p.containers[it.container as usize].name.clone())
                        .collect(),
                }
            })
            .collect();
        out.push(PodAnnotations {
            client: client.name.clone(),
            pod: p.name.clone(),
            hostlo_pod: name,
            parts,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{group_clients, ItemRef, Res, Vm, VmType};

    #[test]
    fn names_are_dns_labels() {
        let n = hostlo_pod_name("70s3v5qRyCO/1PCdI6fVXnrW8FU/w+5CKRSa72xgcIo=", "Web_Front");
        assert!(n.starts_with("hl-") && n.ends_with("-web-front"), "{n}");
        assert!(n.len() <= 63);
        let label = |n: &str| {
            n.len() <= 63
                && !n.ends_with('-')
                && n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        };
        assert!(label(&n));
        assert_eq!(hostlo_pod_name("c", &"x".repeat(100)).len(), 63);
        assert!(label(&hostlo_pod_name("c", "x-")));
        assert!(label(&hostlo_pod_name("", "")));
    }

    /// Issue 14, case 5: pod names that differ only in `/` against `_`, in case, or after
    /// the characters that fit in a label get different Hostlo names; so do the same pod
    /// names under two clients, and splits of one string between client and pod.
    #[test]
    fn names_do_not_collide() {
        let long = "p".repeat(51);
        let pairs = [
            ("c", "web/front", "c", "web_front"),
            ("c", "Web", "c", "web"),
            ("c", &format!("{long}a") as &str, "c", &format!("{long}b")),
            ("c", &"q".repeat(200), "c", &"q".repeat(201)),
            ("c1", "web", "c2", "web"),
            ("ab", "c", "a", "bc"),
        ];
        for (c1, p1, c2, p2) in pairs {
            assert_ne!(
                hostlo_pod_name(c1, p1),
                hostlo_pod_name(c2, p2),
                "{p1} {p2}"
            );
        }
    }

    #[test]
    fn spanning_pod_parts() {
        let client = group_clients(vec![
            ("u".into(), "p".into(), "a".into(), Res::new(1, 1)),
            ("u".into(), "p".into(), "b".into(), Res::new(1, 1)),
            ("u".into(), "q".into(), "c".into(), Res::new(1, 1)),
        ])
        .remove(0);
        let cat = Catalogue::new(vec![VmType {
            name: "t".into(),
            family: "t".into(),
            cap: Res::new(10, 10),
            price: 1,
        }]);
        let r = |pod, container| ItemRef { pod, container };
        let placement = Placement {
            vms: vec![
                Vm {
                    ty: 0,
                    items: vec![r(0, 0), r(1, 0)],
                },
                Vm {
                    ty: 0,
                    items: vec![r(0, 1)],
                },
            ],
        };
        let docs = pod_annotations(&client, &placement, &cat);
        assert_eq!(docs.len(), 1);
        let d = &docs[0];
        assert_eq!(d.pod, "p");
        assert_eq!(d.parts.len(), 2);
        assert_eq!(d.parts[0].containers, ["a"]);
        assert_eq!(d.parts[1].containers, ["b"]);
        assert_eq!(d.parts[1].annotations[PART_ANNOTATION], "1");
        assert_eq!(d.parts[1].annotations[POD_ANNOTATION], d.hostlo_pod);
        let json = serde_json::to_string(d).unwrap();
        assert!(json.contains("\"io.nestless.hostlo/pod\""));
    }
}
