//! Pure decisions taken from a container's OCI spec: which shim process serves
//! it (the grouping id) and whether it gets a pod network.
//!
//! Only the few spec fields these decisions need are read ([`SpecView`]),
//! not the whole spec: a full parse (e.g. `oci_spec::runtime::Spec`) would
//! reject specs that carry values newer than the crate (a capability or
//! namespace kind it does not know), and runc, not the shim, is the judge of
//! the spec.
//!
//! Network rules:
//!
//! | container                                                    | network |
//! |--------------------------------------------------------------|---------|
//! | CRI sandbox (`io.kubernetes.cri.container-type = sandbox`) with a network namespace | yes |
//! | CRI sandbox without a network namespace (host network pod)  | no      |
//! | CRI app container (`container-type = container`), or any container with `io.kubernetes.cri.*` annotations but no sandbox type | no |
//! | no CRI annotations, a `network` namespace without `path` (runc creates it) | yes |
//! | no CRI annotations, `path` = a named netns (e.g. `/var/run/netns/x`) | yes |
//! | no CRI annotations, `path` = `/proc/<pid>/ns/net` (joins another container) | no |
//! | no `network` namespace at all (host network)                 | no      |
//!
//! The sandbox is known to the agent by its id within a scope
//! ([`SandboxRef`]): a CRI sandbox by its id in the empty scope (the id CNI
//! attaches it under too; CRI makes sandbox ids unique across containerd
//! namespaces), any other container by its id in its containerd namespace
//! (`ctr -n a run … app` and `ctr -n b run … app` are two sandboxes).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::agent_client::SandboxRef;

/// Annotation carrying the CRI container type (`sandbox` or `container`).
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// Annotation carrying the CRI sandbox id (on the sandbox and its containers).
pub const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// Annotation carrying the pod name.
pub const CRI_SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
/// Annotation carrying the pod namespace.
pub const CRI_SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
/// Annotation carrying the pod uid.
pub const CRI_SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";
/// Prefix of all CRI annotations.
pub const CRI_PREFIX: &str = "io.kubernetes.cri.";

/// Label under which the containerd namespace is passed to the pod network.
pub const LABEL_CONTAINERD_NAMESPACE: &str = "io.containerd.namespace";

/// The parts of an OCI runtime spec (`config.json`) the shim reads.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct SpecView {
    /// `annotations`.
    #[serde(default)]
    pub annotations: HashMap<String, String>,
    /// `linux`.
    #[serde(default)]
    pub linux: Option<LinuxView>,
}

/// The parts of `linux` the shim reads.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct LinuxView {
    /// `linux.namespaces`.
    #[serde(default)]
    pub namespaces: Vec<NamespaceView>,
}

/// One `linux.namespaces` entry.
#[derive(Debug, Clone, Deserialize)]
pub struct NamespaceView {
    /// `type`: `network`, `pid`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// `path`: join this namespace instead of creating one.
    #[serde(default)]
    pub path: Option<PathBuf>,
}

impl SpecView {
    /// Parses the JSON of a spec.
    pub fn from_json(data: &[u8]) -> serde_json::Result<Self> {
        serde_json::from_slice(data)
    }

    /// The `network` namespace entry, if any.
    pub fn network_namespace(&self) -> Option<&NamespaceView> {
        self.linux
            .as_ref()?
            .namespaces
            .iter()
            .find(|ns| ns.kind == "network")
    }
}

/// The id that decides which shim process serves a container: the CRI sandbox
/// id when the container carries one, else the container's own id. All
/// containers of a pod thus share the sandbox's shim.
pub fn grouping_id<'a>(container_id: &'a str, spec: &'a SpecView) -> &'a str {
    match spec.annotations.get(CRI_SANDBOX_ID) {
        Some(s) if !s.is_empty() => s,
        _ => container_id,
    }
}

/// Where a networked container's network namespace is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetnsSource {
    /// An existing namespace, bind-mounted at this path (CRI's pod netns).
    Path(PathBuf),
    /// runc creates it: `/proc/<init pid>/ns/net` once the container is created.
    CreatedByRunc,
}

impl NetnsSource {
    /// The path of the namespace, given the container's init pid.
    pub fn path(&self, init_pid: u32) -> PathBuf {
        match self {
            Self::Path(p) => p.clone(),
            Self::CreatedByRunc => PathBuf::from(format!("/proc/{init_pid}/ns/net")),
        }
    }
}

/// What the shim does for a container's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkRole {
    /// The container owns a pod network: set it up at start, tear it down on delete.
    Owner {
        /// The sandbox the network is known by: the CRI sandbox id (empty
        /// scope), or the container id in its containerd namespace.
        sandbox: SandboxRef,
        /// Where its network namespace is.
        netns: NetnsSource,
    },
    /// Nothing to do (app container of a pod, shared or host network).
    Nothing,
}

/// Decides whether `container_id` of containerd namespace `namespace`, with
/// `spec`, owns a pod network.
pub fn network_role(container_id: &str, spec: &SpecView, namespace: &str) -> NetworkRole {
    let Some(ns) = spec.network_namespace() else {
        // Host network: never touch it.
        return NetworkRole::Nothing;
    };
    let cri = spec.annotations.keys().any(|k| k.starts_with(CRI_PREFIX));
    let sandbox = if cri {
        if spec.annotations.get(CRI_CONTAINER_TYPE).map(String::as_str) != Some("sandbox") {
            return NetworkRole::Nothing;
        }
        SandboxRef::unscoped(grouping_id(container_id, spec))
    } else {
        SandboxRef::new(namespace, container_id)
    };
    let netns = match &ns.path {
        None => NetnsSource::CreatedByRunc,
        Some(p) if p.as_os_str().is_empty() => NetnsSource::CreatedByRunc,
        // Outside CRI, joining a process's namespace means sharing another
        // container's network: that container owns it.
        Some(p) if !cri && is_process_netns(p) => return NetworkRole::Nothing,
        Some(p) => NetnsSource::Path(p.clone()),
    };
    NetworkRole::Owner { sandbox, netns }
}

/// Whether `path` is `/proc/<pid>/ns/net` or `/proc/<pid>/task/<tid>/ns/net`.
fn is_process_netns(path: &Path) -> bool {
    let s = match path.to_str() {
        Some(s) => s,
        None => return false,
    };
    let Some(rest) = s.strip_prefix("/proc/") else {
        return false;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let numeric = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    match parts.as_slice() {
        [pid, "ns", "net"] => numeric(pid) || *pid == "self" || *pid == "thread-self",
        [pid, "task", tid, "ns", "net"] => numeric(pid) && numeric(tid),
        _ => false,
    }
}

/// Labels passed to the pod network: the CRI pod identity when present, and
/// the containerd namespace.
pub fn network_labels(spec: &SpecView, containerd_namespace: &str) -> HashMap<String, String> {
    let mut labels: HashMap<String, String> =
        [CRI_SANDBOX_NAME, CRI_SANDBOX_NAMESPACE, CRI_SANDBOX_UID]
            .into_iter()
            .filter_map(|k| spec.annotations.get(k).map(|v| (k.to_owned(), v.clone())))
            .chain(
                spec.annotations
                    .iter()
                    .filter(|(k, _)| k.starts_with("io.nestless.hostlo/"))
                    .map(|(k, v)| (k.clone(), v.clone())),
            )
            .collect();
    if !containerd_namespace.is_empty() {
        labels.insert(
            LABEL_CONTAINERD_NAMESPACE.to_owned(),
            containerd_namespace.to_owned(),
        );
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(annotations: &[(&str, &str)], netns: Option<Option<&str>>) -> SpecView {
        let namespaces = match netns {
            None => vec![NamespaceView {
                kind: "pid".into(),
                path: None,
            }],
            Some(path) => vec![
                NamespaceView {
                    kind: "pid".into(),
                    path: None,
                },
                NamespaceView {
                    kind: "network".into(),
                    path: path.map(PathBuf::from),
                },
            ],
        };
        SpecView {
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            linux: Some(LinuxView { namespaces }),
        }
    }

    #[test]
    fn grouping_by_sandbox_id() {
        let s = spec(&[(CRI_SANDBOX_ID, "pod1")], None);
        assert_eq!(grouping_id("c1", &s), "pod1");
        let s = spec(&[(CRI_SANDBOX_ID, "")], None);
        assert_eq!(grouping_id("c1", &s), "c1");
        let s = spec(&[], None);
        assert_eq!(grouping_id("c1", &s), "c1");
    }

    #[test]
    fn cri_sandbox_owns_its_network() {
        let s = spec(
            &[(CRI_CONTAINER_TYPE, "sandbox"), (CRI_SANDBOX_ID, "sb1")],
            Some(Some("/var/run/netns/cni-1234")),
        );
        assert_eq!(
            network_role("sb1", &s, "k8s.io"),
            NetworkRole::Owner {
                sandbox: SandboxRef::unscoped("sb1"),
                netns: NetnsSource::Path("/var/run/netns/cni-1234".into())
            }
        );
    }

    #[test]
    fn cri_host_network_sandbox_gets_nothing() {
        let s = spec(
            &[(CRI_CONTAINER_TYPE, "sandbox"), (CRI_SANDBOX_ID, "sb1")],
            None,
        );
        assert_eq!(network_role("sb1", &s, "default"), NetworkRole::Nothing);
    }

    #[test]
    fn cri_app_container_gets_nothing() {
        let s = spec(
            &[(CRI_CONTAINER_TYPE, "container"), (CRI_SANDBOX_ID, "sb1")],
            Some(Some("/proc/42/ns/net")),
        );
        assert_eq!(network_role("c1", &s, "default"), NetworkRole::Nothing);
        // CRI annotations without a type: not a sandbox.
        let s = spec(&[(CRI_SANDBOX_ID, "sb1")], Some(None));
        assert_eq!(network_role("c1", &s, "default"), NetworkRole::Nothing);
    }

    #[test]
    fn plain_container_with_new_netns() {
        let s = spec(&[("org.example", "x")], Some(None));
        assert_eq!(
            network_role("c1", &s, "team-one"),
            NetworkRole::Owner {
                sandbox: SandboxRef::new("team-one", "c1"),
                netns: NetnsSource::CreatedByRunc
            }
        );
        // The same id in another containerd namespace is another sandbox.
        assert_ne!(
            network_role("c1", &s, "team-one"),
            network_role("c1", &s, "team-two")
        );
        assert_eq!(
            NetnsSource::CreatedByRunc.path(77),
            PathBuf::from("/proc/77/ns/net")
        );
    }

    #[test]
    fn plain_container_with_named_netns() {
        let s = spec(&[], Some(Some("/run/netns/blue")));
        assert_eq!(
            network_role("c1", &s, "default"),
            NetworkRole::Owner {
                sandbox: SandboxRef::new("default", "c1"),
                netns: NetnsSource::Path("/run/netns/blue".into())
            }
        );
    }

    #[test]
    fn plain_container_joining_another_gets_nothing() {
        for p in [
            "/proc/42/ns/net",
            "/proc/42/task/43/ns/net",
            "/proc/self/ns/net",
        ] {
            let s = spec(&[], Some(Some(p)));
            assert_eq!(
                network_role("c2", &s, "default"),
                NetworkRole::Nothing,
                "{p}"
            );
        }
        assert!(!is_process_netns(Path::new("/proc/x1/ns/net")));
        assert!(!is_process_netns(Path::new("/proc/42/ns/pid")));
    }

    #[test]
    fn host_network_gets_nothing() {
        let s = spec(&[], None);
        assert_eq!(network_role("c1", &s, "default"), NetworkRole::Nothing);
        let s = SpecView::default();
        assert_eq!(network_role("c1", &s, "default"), NetworkRole::Nothing);
    }

    #[test]
    fn parses_a_real_spec_fragment() {
        let json = br#"{
            "ociVersion": "1.0.2-dev",
            "process": {"terminal": false, "args": ["sh"]},
            "annotations": {"io.kubernetes.cri.container-type": "sandbox",
                            "io.kubernetes.cri.sandbox-id": "abc",
                            "io.kubernetes.cri.sandbox-name": "web",
                            "io.kubernetes.cri.sandbox-namespace": "default"},
            "linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"},
                      {"type": "network", "path": "/var/run/netns/cni-1"}],
                      "someFutureField": {"x": 1}}
        }"#;
        let s = SpecView::from_json(json).unwrap();
        assert_eq!(grouping_id("abc", &s), "abc");
        assert!(matches!(
            network_role("abc", &s, "default"),
            NetworkRole::Owner { .. }
        ));
        let labels = network_labels(&s, "k8s.io");
        assert_eq!(labels.get(CRI_SANDBOX_NAME).unwrap(), "web");
        assert_eq!(labels.get(CRI_SANDBOX_NAMESPACE).unwrap(), "default");
        assert_eq!(labels.get(LABEL_CONTAINERD_NAMESPACE).unwrap(), "k8s.io");
        assert!(!labels.contains_key(CRI_SANDBOX_UID));
    }
}
