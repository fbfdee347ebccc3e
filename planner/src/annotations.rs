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

/// FNV-1a, 32 bits: a short stable tag for names that are not DNS labels.
fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    })
}

/// A DNS-label Hostlo pod name for `(client, pod)`: `hl-<hash of client>-<pod>`, lower
/// case, other characters as `-`, at most 63 characters.
pub fn hostlo_pod_name(client: &str, pod: &str) -> String {
    let mut s = format!("hl-{:08x}-", fnv1a(client));
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
        assert!(n
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
        assert!(hostlo_pod_name("c", &"x".repeat(100)).len() == 63);
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
