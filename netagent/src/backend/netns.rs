//! The netns backend: the "VM" is a network namespace on this host.
//!
//! Plugging a NIC creates a veth pair in one netlink request: the host end
//! (`nlh<id>`) in the agent's namespace, the guest end (`nlg<id>`, with the
//! NIC's MAC) directly in the VM's namespace; the host end then joins the
//! bridge. Unplugging deletes the host end, which takes the pair with it
//! wherever the guest end has been moved (the pod's namespace). When the
//! namespace the guest end lives in is destroyed, the kernel deletes the pair
//! too, so a NIC is present exactly when its host end exists.
//!
//! This is the single-machine mode (the namespace may be the host's own,
//! `/proc/self/ns/net`, when containerd on this host plays the VM) and what the
//! fast tests use.

use std::{collections::HashMap, path::PathBuf, sync::Arc};

use super::{BackendError, NicPlan, Plugged, VmBackend};
use crate::{
    lifecycle::Presence,
    links::HostLinks,
    names::{NicId, HOST_IF_PREFIX},
};

/// NICs as veth pairs into a network namespace.
pub struct NetnsBackend {
    vm: String,
    netns: PathBuf,
    links: Arc<dyn HostLinks>,
}

impl NetnsBackend {
    /// The backend of VM `vm`, whose namespace is at `netns`.
    pub fn new(vm: &str, netns: PathBuf, links: Arc<dyn HostLinks>) -> NetnsBackend {
        NetnsBackend {
            vm: vm.to_string(),
            netns,
            links,
        }
    }

    fn check_netns(&self) -> Result<(), BackendError> {
        std::fs::metadata(&self.netns)
            .map(|_| ())
            .map_err(|source| BackendError::Netns {
                vm: self.vm.clone(),
                path: self.netns.clone(),
                source,
            })
    }
}

#[async_trait::async_trait]
impl VmBackend for NetnsBackend {
    fn kind(&self) -> &'static str {
        "netns"
    }

    async fn plug(&self, nic: &NicPlan) -> Result<Plugged, BackendError> {
        self.check_netns()?;
        let names = nic.id.names();
        self.links
            .create_veth(
                &names.host_if,
                &names.guest_if,
                nic.mac,
                nic.mtu,
                &self.netns,
            )
            .await
            .map_err(|e| match e.source.raw_os_error() {
                Some(libc::ENOENT | libc::EBADF | libc::EINVAL)
                    if std::fs::metadata(&self.netns).is_err() =>
                {
                    BackendError::Netns {
                        vm: self.vm.clone(),
                        path: self.netns.clone(),
                        source: e.source,
                    }
                }
                _ => BackendError::Link(e),
            })?;
        if let Err(e) = self
            .links
            .join_bridge(&names.host_if, &nic.bridge, nic.mtu)
            .await
        {
            if let Err(undo) = self.links.delete(&names.host_if).await {
                log::warn!(
                    "VM {}: rollback of {} failed: {undo}",
                    self.vm,
                    names.host_if
                );
            }
            return Err(BackendError::joining(&nic.bridge, e));
        }
        Ok(Plugged::default())
    }

    async fn unplug(&self, id: &NicId) -> Result<(), BackendError> {
        self.links.delete(&id.names().host_if).await?;
        Ok(())
    }

    async fn presence(&self, ids: &[NicId]) -> HashMap<NicId, Presence> {
        let host_ends = match self.links.names(HOST_IF_PREFIX).await {
            Ok(n) => Some(n),
            Err(e) => {
                log::warn!("VM {}: cannot list the NICs' host ends: {e}", self.vm);
                None
            }
        };
        ids.iter()
            .map(|id| {
                let p = match &host_ends {
                    Some(n) if n.contains(&id.names().host_if) => Presence::Present,
                    Some(_) => Presence::Gone,
                    None => Presence::Unknown,
                };
                (id.clone(), p)
            })
            .collect()
    }

    async fn orphans(&self, _known: &[NicId]) -> Result<Vec<NicId>, BackendError> {
        // Everything this backend creates is a host link: the agent's sweep covers it.
        Ok(Vec::new())
    }

    /// The generation is the namespace's inode: a namespace deleted and
    /// made again at the same path (the "VM" restarted) has a new one.
    async fn probe(&self) -> Result<u64, BackendError> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.netns)
            .map(|m| m.ino())
            .map_err(|source| BackendError::Netns {
                vm: self.vm.clone(),
                path: self.netns.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::links::fake::FakeLinks;

    fn plan() -> NicPlan {
        NicPlan {
            id: "00000000aa".parse().unwrap(),
            mac: "52:54:00:00:00:aa".parse().unwrap(),
            bridge: "br0".into(),
            mtu: 1500,
        }
    }

    #[tokio::test]
    async fn plug_failure_on_bridge_rolls_back_the_veth() {
        let links = Arc::new(FakeLinks::default());
        let b = NetnsBackend::new("vm", "/proc/self/ns/net".into(), links.clone());
        *links.fail.lock().unwrap() = Some("join_bridge");
        assert!(b.plug(&plan()).await.is_err());
        assert!(links.links.lock().unwrap().is_empty(), "veth left behind");
        b.plug(&plan()).await.unwrap();
        let id = plan().id;
        assert_eq!(
            b.presence(std::slice::from_ref(&id)).await[&id],
            Presence::Present
        );
        b.unplug(&id).await.unwrap();
        b.unplug(&id).await.unwrap();
        assert_eq!(
            b.presence(std::slice::from_ref(&id)).await[&id],
            Presence::Gone
        );
    }

    /// The generation is the namespace's identity: a namespace made again
    /// at the VM's path (a reboot) is a new generation.
    #[tokio::test]
    async fn a_namespace_made_again_is_a_new_generation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmns");
        std::fs::write(&path, "").unwrap();
        let b = NetnsBackend::new("vm", path.clone(), Arc::new(FakeLinks::default()));
        let first = b.probe().await.unwrap();
        assert_eq!(b.probe().await.unwrap(), first, "stable");
        let keep = dir.path().join("old");
        std::fs::rename(&path, &keep).unwrap();
        assert!(b.probe().await.unwrap_err().is_unavailable());
        std::fs::write(&path, "").unwrap();
        assert_ne!(b.probe().await.unwrap(), first);
    }

    #[tokio::test]
    async fn missing_namespace_is_a_clear_error() {
        let b = NetnsBackend::new(
            "vm",
            "/run/netns/does-not-exist-xyz".into(),
            Arc::new(FakeLinks::default()),
        );
        let e = b.plug(&plan()).await.unwrap_err();
        assert!(e.is_unavailable());
        assert!(
            e.to_string().contains("/run/netns/does-not-exist-xyz"),
            "{e}"
        );
    }
}
