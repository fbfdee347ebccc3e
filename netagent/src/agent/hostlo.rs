//! Hostlo, the agent's side: parts joining and leaving a pod's segment, the
//! ports they publish, and the pod views their watchers wait for. The pure
//! rules (names, addresses, MACs, conflicts) are in [`crate::hostlo`].
//!
//! ```text
//! HostloJoin(pod, part, sb) ─▶ the pod is (the VM's network, pod)
//!                              lock VM, then the pod's segment
//!                              part held by another VM? ─▶ ALREADY_EXISTS
//!                              same part, same sandbox, Attached? ─▶ it
//!                              segment bridge nls<hash(network, pod)> (first part)
//!                              plug_new(.part+1, MAC of (network, pod, part)) ─▶ mark_pod_changed
//! HostloPublish(ports) ──────▶ record's ports, persist ─▶ mark_pod_changed ─▶ conflicts
//! HostloWatch(since) ────────▶ the view once its version passes `since` (or at the timeout)
//! HostloLeave ───────────────▶ lock VM, then the segment; remove_nic ─▶ mark_pod_changed;
//!                              last part: segment removed
//! ```
//!
//! A pod is named within its tenant network (the calling VM's): two
//! tenants may each have a pod `db`, with two segments, and nothing a VM is
//! told (a view, a refusal) names another tenant's pod, VM or network. The
//! rules of a pod span VMs: one VM per
//! part, a segment bridge exactly while a part is in (and no two pods on one
//! bridge name). A VM's lock alone cannot keep them, since the parts of a
//! pod are in several VMs; so whatever checks or changes them (join, leave,
//! and the reconciliation releasing a part) holds the segment's lock
//! ([`SegmentLocks`], one per pod) from the check to the change.
//! Lock order: a VM's lock, then one segment's; never a VM's lock while
//! holding a segment's, never two segments at once, so no two operations
//! wait for each other in a circle. Joins and leaves of different pods
//! still run in parallel; those of one pod take turns.
//!
//! A pod's version changes with every join, leave and publish; versions are
//! microseconds since the epoch, counted on from the agent's start, so that
//! they keep growing across restarts.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex as StdMutex, MutexGuard},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use super::{attach::NewNic, records::NewRecord, Agent};
use crate::{
    backend::BackendError,
    error::AgentError,
    hostlo::{self, Conflict, HostloRef, Part, PodName, PodView, Port, PortList},
    lifecycle::NicState,
    names::{Invalid, SandboxId},
    state::NicRecord,
};

/// Longest wait of one [`Agent::hostlo_watch`].
pub const MAX_WATCH: Duration = Duration::from_secs(60);

/// A join request, checked: part `part` of `pod` for sandbox `sandbox_id`.
#[derive(Debug, Clone)]
pub struct HostloJoin {
    /// The pod.
    pub pod: PodName,
    /// The part.
    pub part: Part,
    /// The sandbox of the part (its BrFusion NIC's sandbox for part 0).
    pub sandbox_id: SandboxId,
}

/// A part of a pod, checked (a leave request).
#[derive(Debug, Clone)]
pub struct HostloPart {
    /// The pod.
    pub pod: PodName,
    /// The part.
    pub part: Part,
}

/// A publish request, checked: the ports part `part` serves.
#[derive(Debug, Clone)]
pub struct HostloPublish {
    /// The pod.
    pub pod: PodName,
    /// The part.
    pub part: Part,
    /// Its ports (sorted, unique).
    pub ports: PortList,
}

/// A watch request, checked.
#[derive(Debug, Clone)]
pub struct HostloWatch {
    /// The pod.
    pub pod: PodName,
    /// The version the watcher has seen.
    pub since: u64,
    /// How long to wait for a newer one (at most [`MAX_WATCH`]).
    pub timeout: Duration,
}

/// A Hostlo pod as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostloPodInfo {
    /// The pod (within its network).
    pub pod: String,
    /// Its segment bridge.
    pub bridge: String,
    /// Its tenant network.
    pub network: String,
    /// (part, VM), by part.
    pub members: Vec<(u32, String)>,
    /// The view its parts get.
    pub view: PodView,
}

/// The versions of the Hostlo pods, and the signal their watchers wait on.
pub(super) struct Versions {
    inner: StdMutex<VersionsInner>,
    changed: tokio::sync::watch::Sender<u64>,
    /// The version of a pod loaded from the state file: the agent's start
    /// time, newer than anything a previous run handed out.
    boot: u64,
}

/// A pod: (tenant network, pod name).
type PodKey = (String, String);

fn pod_key(network: &str, pod: &str) -> PodKey {
    (network.to_string(), pod.to_string())
}

struct VersionsInner {
    by_pod: HashMap<PodKey, u64>,
    /// The last version handed out.
    last: u64,
}

impl Versions {
    /// Versions counted from now.
    pub fn starting_now() -> Versions {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        Versions {
            inner: StdMutex::new(VersionsInner {
                by_pod: HashMap::new(),
                last: now,
            }),
            changed: tokio::sync::watch::channel(0).0,
            boot: now,
        }
    }

    fn lock(&self) -> MutexGuard<'_, VersionsInner> {
        // Nothing panics while holding it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn of(&self, network: &str, pod: &str) -> u64 {
        self.lock()
            .by_pod
            .get(&pod_key(network, pod))
            .copied()
            .unwrap_or(self.boot)
    }

    fn forget(&self, network: &str, pod: &str) {
        self.lock().by_pod.remove(&pod_key(network, pod));
    }
}

/// The locks of the Hostlo segments, one per pod (tenant network, pod
/// name); entries go once no one holds or waits for them.
#[derive(Default)]
pub(super) struct SegmentLocks {
    by_pod: StdMutex<HashMap<PodKey, Arc<tokio::sync::Mutex<()>>>>,
}

/// A segment's lock, held: the proof that a caller may check and change
/// the parts of the pod and its bridge.
pub(super) struct SegmentGuard {
    _held: tokio::sync::OwnedMutexGuard<()>,
}

impl SegmentLocks {
    /// Waits for the lock of pod `pod` of network `network`. Caller may hold
    /// a VM's lock, and no segment's.
    pub async fn lock(&self, network: &str, pod: &str) -> SegmentGuard {
        let lock = {
            // Nothing panics while holding it.
            let mut map = self.by_pod.lock().unwrap_or_else(|e| e.into_inner());
            map.retain(|_, l| Arc::strong_count(l) > 1);
            map.entry(pod_key(network, pod)).or_default().clone()
        };
        SegmentGuard {
            _held: lock.lock_owned().await,
        }
    }
}

impl Agent {
    /// Gives pod `pod` of network `network` a new version and wakes its
    /// watchers.
    pub(super) fn mark_pod_changed(&self, network: &str, pod: &str) {
        let v = {
            let mut inner = self.hostlo.lock();
            inner.last += 1;
            let v = inner.last;
            inner.by_pod.insert(pod_key(network, pod), v);
            v
        };
        self.hostlo.changed.send_replace(v);
    }

    /// The Hostlo pods the agent knows, (network, pod), sorted.
    fn hostlo_pod_keys(&self) -> Vec<PodKey> {
        let mut pods: Vec<PodKey> = self
            .records
            .hostlo_all()
            .into_iter()
            .filter_map(|r| Some((r.network, r.hostlo?.pod)))
            .collect();
        pods.sort();
        pods.dedup();
        pods
    }

    /// The segment bridges of the Hostlo pods the agent knows.
    pub(super) fn hostlo_segments(&self) -> std::collections::HashSet<String> {
        self.records
            .hostlo_all()
            .into_iter()
            .filter_map(|r| Some(r.hostlo?.bridge()))
            .collect()
    }

    /// The segment bridge of pod `pod` of network `network`: the one its
    /// parts are on (a pod of before the scoping keeps its old name), else
    /// [`hostlo::segment_bridge`].
    fn pod_bridge(&self, network: &str, pod: &str) -> String {
        self.records
            .hostlo_pod(network, pod)
            .parts
            .iter()
            .find_map(|r| Some(r.hostlo.as_ref()?.bridge()))
            .unwrap_or_else(|| hostlo::segment_bridge(network, pod))
    }

    /// The Hostlo pods the agent knows, by network and name: members,
    /// bridge, view.
    pub fn hostlo_pods(&self) -> Vec<HostloPodInfo> {
        let records = self.records.hostlo_all();
        self.hostlo_pod_keys()
            .into_iter()
            .filter_map(|(network, pod)| {
                let view = self.hostlo_view(&network, &pod)?;
                let mut members: Vec<(u32, String)> = records
                    .iter()
                    .filter(|r| r.network == network)
                    .filter_map(|r| Some((r, r.hostlo.as_ref()?)))
                    .filter(|(_, h)| h.pod == pod)
                    .map(|(r, h)| (h.part, r.vm.clone()))
                    .collect();
                members.sort();
                Some(HostloPodInfo {
                    bridge: self.pod_bridge(&network, &pod),
                    pod,
                    network,
                    members,
                    view,
                })
            })
            .collect()
    }

    /// Pod `pod` of network `network` as its parts see it; `None` when no
    /// part is in.
    pub fn hostlo_view(&self, network: &str, pod: &str) -> Option<PodView> {
        let found = self.records.hostlo_pod(network, pod);
        if found.parts.is_empty() {
            return None;
        }
        let parts: BTreeMap<u32, (std::net::Ipv4Addr, Vec<Port>)> = found
            .parts
            .iter()
            .filter_map(|r| {
                let h = r.hostlo.as_ref()?;
                Some((h.part, (r.ipv4, h.ports.clone())))
            })
            .collect();
        let ports: BTreeMap<u32, Vec<Port>> =
            parts.iter().map(|(k, (_, p))| (*k, p.clone())).collect();
        Some(PodView {
            version: self.hostlo.of(network, pod),
            conflicts: hostlo::conflicts(&ports),
            parts,
            pod_ip: found.pod_ip,
            prefix_len: self.config().hostlo.subnet.prefix_len(),
        })
    }

    /// The view of a pod VM `vm_name` (of network `network`) is in (it
    /// holds `part`), or NotFound.
    fn view_of_part(
        &self,
        vm_name: &str,
        network: &str,
        pod: &PodName,
        part: Part,
    ) -> Result<PodView, AgentError> {
        self.hostlo_view(network, pod.as_str())
            .ok_or_else(|| part_not_found(vm_name, pod, part))
    }

    /// Puts part `req.part` of Hostlo pod `req.pod` of VM `vm_name`'s
    /// network in the VM: a NIC on the pod's segment.
    ///
    /// # Errors
    /// [`AgentError::HostloPartTaken`] (another VM of the network has the
    /// part), [`AgentError::Invalid`] (the pod's segment name is another
    /// pod's, which the refusal does not name), and those of
    /// [`Agent::attach`].
    pub async fn hostlo_join(
        &self,
        vm_name: &str,
        req: HostloJoin,
    ) -> Result<(NicRecord, PodView), AgentError> {
        let HostloJoin {
            pod,
            part,
            sandbox_id,
        } = req;
        let vm = self.vm(vm_name)?.clone();
        let network = vm.config.network.clone();
        let _op = vm.op.lock().await;
        vm.check_live()?;
        let segment = self.segments.lock(&network, pod.as_str()).await;
        if let Some(r) = self.records.hostlo_part(&network, pod.as_str(), part.get()) {
            if r.vm != vm_name {
                return Err(AgentError::HostloPartTaken {
                    pod: pod.to_string(),
                    part: part.get(),
                    vm: r.vm,
                });
            }
            if r.state == NicState::Attached && r.sandbox_id == sandbox_id.as_str() {
                let view = self.view_of_part(vm_name, &network, &pod, part)?;
                return Ok((r, view));
            }
            // A restarted part (new sandbox) or a half-done one: start afresh.
            self.remove_nic(&vm, &r.id).await?;
            self.mark_pod_changed(&network, pod.as_str());
        }
        let bridge = self.pod_bridge(&network, pod.as_str());
        // Another pod (of any tenant) on the bridge name: a hash collision
        // (48 bits), refused without a word about that pod.
        let taken = self.records.hostlo_all().into_iter().any(|r| {
            r.hostlo.as_ref().is_some_and(|h| {
                (r.network != network || h.pod != pod.as_str()) && h.bridge() == bridge
            })
        });
        if taken {
            return Err(Invalid::new(
                "pod",
                format!(
                    "{:?}: its segment name {bridge} is in use by another pod; rename it",
                    pod.as_str()
                ),
            )
            .into());
        }
        if let Err(e) = self
            .links
            .ensure_segment(&bridge, self.config().hostlo.mtu)
            .await
        {
            // It may be half made (created, not up).
            self.remove_segment_if_empty(&segment, &network, pod.as_str(), &bridge)
                .await;
            return Err(BackendError::from(e).into());
        }
        let new = NewNic {
            record: NewRecord {
                network: vm.network(),
                fixed_ipv4: Some(hostlo::part_address(self.config().hostlo.subnet, part)),
                mac: Some(hostlo::part_mac(
                    &self.config().agent.mac_prefix,
                    &network,
                    pod.as_str(),
                    part.get(),
                )),
                scope: "",
                sandbox_id: sandbox_id.as_str(),
                interface: nestless_model::hostlo::SEGMENT_IFNAME,
                labels: BTreeMap::new(),
                pooled: false,
                hostlo: Some(HostloRef {
                    pod: pod.to_string(),
                    part: part.get(),
                    ports: Vec::new(),
                    segment: Some(bridge.clone()),
                }),
            },
            bridge: bridge.clone(),
            mtu: self.config().hostlo.mtu,
        };
        let rec = match self.plug_new(&vm, new).await {
            Ok(r) => r,
            Err(e) => {
                self.remove_segment_if_empty(&segment, &network, pod.as_str(), &bridge)
                    .await;
                return Err(e);
            }
        };
        self.mark_pod_changed(&network, pod.as_str());
        log::info!(
            "Hostlo pod {pod}: part {} joined from VM {vm_name} ({} on {bridge})",
            part.get(),
            rec.ipv4
        );
        let view = self.view_of_part(vm_name, &network, &pod, part)?;
        Ok((rec, view))
    }

    /// Removes `bridge`, the segment of pod `pod` of network `network`, when
    /// no part holds it any more (a record in any state holds it). The
    /// caller holds the segment's lock.
    pub(super) async fn remove_segment_if_empty(
        &self,
        _segment: &SegmentGuard,
        network: &str,
        pod: &str,
        bridge: &str,
    ) {
        if self.hostlo_view(network, pod).is_some() {
            return;
        }
        match self.links.delete(bridge).await {
            Ok(true) => log::info!("Hostlo pod {pod}: last part gone, segment {bridge} removed"),
            Ok(false) => {}
            Err(e) => log::warn!("Hostlo pod {pod}: cannot remove segment {bridge}: {e}"),
        }
        self.hostlo.forget(network, pod);
    }

    /// VM `vm_name`'s (of network `network`) segment NIC of the part, or
    /// NotFound.
    fn own_part(
        &self,
        vm_name: &str,
        network: &str,
        pod: &PodName,
        part: Part,
    ) -> Result<NicRecord, AgentError> {
        self.records
            .hostlo_part(network, pod.as_str(), part.get())
            .filter(|r| r.vm == vm_name)
            .ok_or_else(|| part_not_found(vm_name, pod, part))
    }

    /// Takes part `req.part` of Hostlo pod `req.pod` out of VM `vm_name`.
    ///
    /// # Errors
    /// [`AgentError::NicNotFound`] when the VM does not hold the part; those
    /// of [`Agent::detach`].
    pub async fn hostlo_leave(&self, vm_name: &str, req: HostloPart) -> Result<(), AgentError> {
        let HostloPart { pod, part } = req;
        let vm = self.vm(vm_name)?.clone();
        let network = vm.config.network.clone();
        let _op = vm.op.lock().await;
        vm.check_live()?;
        let segment = self.segments.lock(&network, pod.as_str()).await;
        let rec = self.own_part(vm_name, &network, &pod, part)?;
        let bridge = self.pod_bridge(&network, pod.as_str());
        self.remove_nic(&vm, &rec.id).await?;
        log::info!("Hostlo pod {pod}: part {} left VM {vm_name}", part.get());
        self.mark_pod_changed(&network, pod.as_str());
        self.remove_segment_if_empty(&segment, &network, pod.as_str(), &bridge)
            .await;
        Ok(())
    }

    /// Sets the ports part `req.part` serves; returns the conflicts it is in.
    ///
    /// # Errors
    /// [`AgentError::NicNotFound`] when the VM does not hold the part;
    /// [`AgentError::State`].
    pub async fn hostlo_publish(
        &self,
        vm_name: &str,
        req: HostloPublish,
    ) -> Result<Vec<Conflict>, AgentError> {
        let HostloPublish { pod, part, ports } = req;
        let ports = ports.into_vec();
        let vm = self.vm(vm_name)?.clone();
        let network = vm.config.network.clone();
        let _op = vm.op.lock().await;
        vm.check_live()?;
        let before = self.own_part(vm_name, &network, &pod, part)?;
        let old = before
            .hostlo
            .as_ref()
            .map(|h| h.ports.clone())
            .unwrap_or_default();
        if old != ports {
            self.records.update(&before.id, |r| {
                if let Some(h) = r.hostlo.as_mut() {
                    h.ports = ports.clone();
                }
            });
            if let Err(e) = self.records.persist().await {
                self.records.restore(before);
                return Err(e);
            }
            self.mark_pod_changed(&network, pod.as_str());
        }
        let view = self.view_of_part(vm_name, &network, &pod, part)?;
        let mine: Vec<Conflict> = view
            .conflicts
            .into_iter()
            .filter(|c| c.parts.contains(&part.get()))
            .collect();
        for c in &mine {
            log::warn!(
                "Hostlo pod {pod}: port {}/{} is served by parts {:?}: not forwarded",
                c.port.port,
                c.port.proto.as_str(),
                c.parts
            );
        }
        Ok(mine)
    }

    /// The pod's view once its version passes `req.since` (or at
    /// `req.timeout`, at most [`MAX_WATCH`]). Only a VM holding a part of the
    /// pod may watch it.
    ///
    /// # Errors
    /// [`AgentError::NicNotFound`] when the VM holds no part of the pod, or
    /// the pod's last part left while waiting.
    pub async fn hostlo_watch(
        &self,
        vm_name: &str,
        req: HostloWatch,
    ) -> Result<PodView, AgentError> {
        let pod = req.pod.as_str();
        let network = self.vm(vm_name)?.config.network.clone();
        if !self.records.holds_hostlo(vm_name, &network, pod) {
            return Err(AgentError::NicNotFound {
                vm: vm_name.to_string(),
                what: format!("in Hostlo pod {pod:?} (join it first)"),
            });
        }
        let mut changes = self.hostlo.changed.subscribe();
        let deadline = tokio::time::Instant::now() + req.timeout.min(MAX_WATCH);
        loop {
            let view = self
                .hostlo_view(&network, pod)
                .ok_or_else(|| AgentError::NicNotFound {
                    vm: vm_name.to_string(),
                    what: format!("in Hostlo pod {pod:?} (it has no part left)"),
                })?;
            if view.version > req.since {
                return Ok(view);
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Ok(view);
            }
        }
    }
}

fn part_not_found(vm_name: &str, pod: &PodName, part: Part) -> AgentError {
    AgentError::NicNotFound {
        vm: vm_name.to_string(),
        what: format!("for part {} of Hostlo pod {:?}", part.get(), pod.as_str()),
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, path::Path, sync::Arc, time::Duration};

    use super::*;
    use crate::{
        agent::{
            rig::{join, part, publish, req, watch},
            NicSelector,
        },
        backend::{fake::FakeQemu, qemu::QemuBackend, VmBackend},
        config::Config,
        links::fake::FakeLinks,
    };

    #[tokio::test]
    async fn hostlo_pod_spans_vms_of_one_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::parse(
            Path::new("t.toml"),
            &format!(
                r#"
                [agent]
                state_dir = "{}"
                [[network]]
                name = "a"
                bridge = "bra"
                subnet = "10.9.0.0/24"
                gateway = "10.9.0.1"
                [[network]]
                name = "b"
                bridge = "brb"
                subnet = "10.10.0.0/24"
                gateway = "10.10.0.1"
                [[vm]]
                name = "vm1"
                backend = "qemu"
                qmp_socket = "/q1"
                cid = 3
                network = "a"
                [[vm]]
                name = "vm2"
                backend = "qemu"
                qmp_socket = "/q2"
                cid = 4
                network = "a"
                [[vm]]
                name = "other"
                backend = "qemu"
                qmp_socket = "/q3"
                cid = 5
                network = "b"
                "#,
                dir.path().display()
            ),
        )
        .unwrap();
        let links = Arc::new(FakeLinks::default());
        let t = Duration::from_millis(200);
        let qs: Vec<Arc<FakeQemu>> = (0..3).map(|_| Arc::new(FakeQemu::new(4))).collect();
        let mut b: HashMap<String, Arc<dyn VmBackend>> = HashMap::new();
        for (name, q) in ["vm1", "vm2", "other"].iter().zip(&qs) {
            b.insert(
                name.to_string(),
                Arc::new(QemuBackend::new(name, q.clone(), links.clone(), vec![], t)),
            );
        }
        let agent = Arc::new(Agent::with_backends(cfg.clone(), links.clone(), b).unwrap());
        // Part 0 has a BrFusion NIC: it becomes the pod IP.
        let main = agent.attach("vm1", req("sb0")).await.unwrap().record;
        let (n0, v0) = agent
            .hostlo_join("vm1", join("web", 0, "sb0"))
            .await
            .unwrap();
        assert_eq!(
            n0.ipv4,
            "169.254.77.1".parse::<std::net::Ipv4Addr>().unwrap()
        );
        assert_eq!(v0.pod_ip, Some(main.ipv4));
        let bridge = hostlo::segment_bridge("a", "web");
        assert!(links.links.lock().unwrap().contains(&bridge));
        // The same join again is the same NIC.
        assert_eq!(
            agent
                .hostlo_join("vm1", join("web", 0, "sb0"))
                .await
                .unwrap()
                .0
                .id,
            n0.id
        );
        // Another tenant's pod "web" is another pod, on its own segment,
        // and neither sees the other.
        let (o1, ov) = agent
            .hostlo_join("other", join("web", 1, "x"))
            .await
            .unwrap();
        let other_bridge = hostlo::segment_bridge("b", "web");
        assert_ne!(other_bridge, bridge);
        assert!(links.links.lock().unwrap().contains(&other_bridge));
        assert_eq!(ov.parts.keys().copied().collect::<Vec<_>>(), vec![1]);
        assert_eq!(ov.pod_ip, None, "not tenant a's part 0");
        assert_ne!(o1.mac, n0.mac);
        assert_eq!(
            agent.hostlo_view("a", "web").unwrap().parts.len(),
            1,
            "tenant a's pod is untouched"
        );
        let pods = agent.hostlo_pods();
        assert_eq!(
            pods.iter()
                .map(|p| (p.network.as_str(), p.pod.as_str(), p.bridge.clone()))
                .collect::<Vec<_>>(),
            vec![
                ("a", "web", bridge.clone()),
                ("b", "web", other_bridge.clone())
            ]
        );
        agent.hostlo_leave("other", part("web", 1)).await.unwrap();
        assert!(!links.links.lock().unwrap().contains(&other_bridge));
        assert!(links.links.lock().unwrap().contains(&bridge));
        // A taken part is refused, naming only the tenant's own VM.
        let e = agent
            .hostlo_join("vm2", join("web", 0, "x"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::ALREADY_EXISTS, "{e}");
        // A watcher of part 0 wakes when part 1 joins and publishes.
        let since = v0.version;
        let w = {
            let agent = agent.clone();
            tokio::spawn(async move {
                agent
                    .hostlo_watch("vm1", watch("web", since, Duration::from_secs(10)))
                    .await
            })
        };
        let (n1, _) = agent
            .hostlo_join("vm2", join("web", 1, "sb1"))
            .await
            .unwrap();
        assert_eq!(
            n1.ipv4,
            "169.254.77.2".parse::<std::net::Ipv4Addr>().unwrap()
        );
        let seen = w.await.unwrap().unwrap();
        assert!(seen.version > since && seen.parts.len() == 2);
        let tcp = |port| Port {
            port,
            proto: hostlo::Proto::Tcp,
        };
        assert!(agent
            .hostlo_publish("vm2", publish("web", 1, &[tcp(8080)]))
            .await
            .unwrap()
            .is_empty());
        let c = agent
            .hostlo_publish("vm1", publish("web", 0, &[tcp(80), tcp(8080)]))
            .await
            .unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].parts, vec![0, 1]);
        // Publishing, watching or leaving a part the VM does not hold: not found.
        assert_eq!(
            agent
                .hostlo_publish("vm1", publish("web", 1, &[]))
                .await
                .unwrap_err()
                .code(),
            ttrpc::Code::NOT_FOUND
        );
        assert_eq!(
            agent
                .hostlo_watch("other", watch("web", 0, t))
                .await
                .unwrap_err()
                .code(),
            ttrpc::Code::NOT_FOUND
        );
        assert_eq!(
            agent
                .hostlo_leave("vm1", part("web", 1))
                .await
                .unwrap_err()
                .code(),
            ttrpc::Code::NOT_FOUND
        );
        // Hostlo NICs are not BrFusion NICs: DetachNic cannot take them.
        assert_eq!(
            agent
                .detach("vm1", NicSelector::Id(n0.id.clone()))
                .await
                .unwrap_err()
                .code(),
            ttrpc::Code::NOT_FOUND
        );
        // A restart keeps the pod with its ports.
        drop(agent);
        let mut b: HashMap<String, Arc<dyn VmBackend>> = HashMap::new();
        for (name, q) in ["vm1", "vm2", "other"].iter().zip(&qs) {
            b.insert(
                name.to_string(),
                Arc::new(QemuBackend::new(name, q.clone(), links.clone(), vec![], t)),
            );
        }
        let agent = Agent::with_backends(cfg, links.clone(), b).unwrap();
        agent.recover().await.unwrap();
        let v = agent.hostlo_view("a", "web").unwrap();
        assert_eq!(v.parts[&0].1, vec![tcp(80), tcp(8080)]);
        assert!(
            v.version > seen.version,
            "versions keep growing across restarts"
        );
        // The last part leaving removes the segment.
        agent.hostlo_leave("vm1", part("web", 0)).await.unwrap();
        assert!(links.links.lock().unwrap().contains(&bridge));
        agent.hostlo_leave("vm2", part("web", 1)).await.unwrap();
        assert!(!links.links.lock().unwrap().contains(&bridge));
        assert!(agent.hostlo_view("a", "web").is_none());
        assert_eq!(
            agent.records(None).len(),
            1,
            "only the BrFusion NIC is left"
        );
    }

    /// A state file of before the scoping (Hostlo parts without a
    /// `segment`) loads; its pod runs on in its old segment: a part joining
    /// later goes there too, and the last part leaving removes it.
    #[tokio::test]
    async fn a_pod_of_before_the_scoping_keeps_its_segment() {
        use crate::agent::rig::rig_with;
        let dir = tempfile::tempdir().unwrap();
        let links = Arc::new(FakeLinks::default());
        let (q1, q2) = (Arc::new(FakeQemu::new(4)), Arc::new(FakeQemu::new(4)));
        let r = rig_with(
            dir.path(),
            "10.9.0.254",
            links.clone(),
            q1.clone(),
            q2.clone(),
        );
        r.agent
            .hostlo_join("vm1", join("web", 0, "sb0"))
            .await
            .unwrap();
        drop(r);
        // Made old: the record names no segment, the bridge has the old name.
        let mut nics = crate::state::records_in(dir.path()).unwrap();
        for nic in &mut nics {
            nic.hostlo.as_mut().unwrap().segment = None;
        }
        crate::state::sqlite::SqliteStore::open(dir.path())
            .unwrap()
            .replace(&crate::state::State {
                nics,
                last_leased: Default::default(),
            })
            .unwrap();
        let (new, old) = (
            hostlo::segment_bridge("n", "web"),
            hostlo::legacy_segment_bridge("web"),
        );
        {
            let mut l = links.links.lock().unwrap();
            assert!(l.remove(&new), "{l:?}");
            l.insert(old.clone());
        }
        let r = rig_with(dir.path(), "10.9.0.254", links.clone(), q1, q2);
        r.agent.recover().await.unwrap();
        assert!(links.links.lock().unwrap().contains(&old), "kept at start");
        assert_eq!(r.agent.hostlo_pods()[0].bridge, old);
        let (n1, v) = r
            .agent
            .hostlo_join("vm2", join("web", 1, "sb1"))
            .await
            .unwrap();
        assert_eq!(v.parts.len(), 2);
        assert_eq!(
            n1.hostlo.unwrap().bridge(),
            old,
            "the new part joins the old segment"
        );
        assert!(!links.links.lock().unwrap().contains(&new));
        r.agent.hostlo_leave("vm1", part("web", 0)).await.unwrap();
        r.agent.hostlo_leave("vm2", part("web", 1)).await.unwrap();
        assert!(
            !links.links.lock().unwrap().contains(&old),
            "removed with its last part"
        );
    }

    /// Joins and leaves from several VMs of two tenants, all at once, on a
    /// few pods and parts, round after round on a multi-threaded runtime
    /// (the fakes suspend at each QMP or netlink call, as real ones do).
    /// After every round: one tenant per pod, one VM per (pod, part), a
    /// segment bridge exactly for the pods with a part, and every VM's
    /// devices and host links exactly those of its records.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn hostlo_rules_hold_under_concurrent_joins_and_leaves() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        const VMS: [(&str, &str); 5] = [
            ("a1", "a"),
            ("a2", "a"),
            ("a3", "a"),
            ("b1", "b"),
            ("b2", "b"),
        ];
        const PODS: [&str; 3] = ["p0", "p1", "p2"];
        // Every operation fsyncs the state file: on tmpfs where there is one.
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        }
        .unwrap();
        let mut toml = format!("[agent]\nstate_dir = \"{}\"\n", dir.path().display());
        for (net, third) in [("a", 9), ("b", 10)] {
            toml += &format!(
                "[[network]]\nname = \"{net}\"\nbridge = \"br{net}\"\nsubnet = \"10.{third}.0.0/24\"\ngateway = \"10.{third}.0.1\"\n"
            );
        }
        for (i, (vm, net)) in VMS.iter().enumerate() {
            toml += &format!(
                "[[vm]]\nname = \"{vm}\"\nbackend = \"qemu\"\nqmp_socket = \"/q{i}\"\ncid = {}\nnetwork = \"{net}\"\nmax_nics = 64\n",
                i + 3
            );
        }
        let cfg = Config::parse(Path::new("t.toml"), &toml).unwrap();
        let links = Arc::new(FakeLinks::default());
        let qemus: Vec<(&str, Arc<FakeQemu>)> = VMS
            .iter()
            .map(|(vm, _)| (*vm, Arc::new(FakeQemu::new(32))))
            .collect();
        let agent = Arc::new(
            Agent::with_backends(
                cfg,
                links.clone(),
                crate::agent::rig::backends(&links, &qemus),
            )
            .unwrap(),
        );
        let seed: u64 = rand::random();
        let mut rng = StdRng::seed_from_u64(seed);
        let (mut joined, mut refused) = (0, 0);
        for round in 0..100 {
            let mut tasks = Vec::new();
            for _ in 0..48 {
                let (vm, _) = VMS[rng.random_range(0..VMS.len())];
                let pod = PODS[rng.random_range(0..PODS.len())];
                let p = rng.random_range(0..4);
                let leave = rng.random_bool(0.4);
                let sandbox = format!("{vm}-{pod}-{p}-{}", rng.random_range(0..2));
                let agent = agent.clone();
                tasks.push(tokio::spawn(async move {
                    let r = if leave {
                        agent.hostlo_leave(vm, part(pod, p)).await
                    } else {
                        agent
                            .hostlo_join(vm, join(pod, p, &sandbox))
                            .await
                            .map(drop)
                    };
                    (leave, r)
                }));
            }
            for t in tasks {
                match t.await.unwrap() {
                    (false, Ok(())) => joined += 1,
                    (_, Ok(())) => {}
                    (_, Err(e)) => {
                        assert!(
                            matches!(
                                e.code(),
                                ttrpc::Code::ALREADY_EXISTS
                                    | ttrpc::Code::PERMISSION_DENIED
                                    | ttrpc::Code::NOT_FOUND
                            ),
                            "seed {seed}, round {round}: {e}"
                        );
                        refused += 1;
                    }
                }
            }
            check_hostlo_rules(
                &agent,
                &links,
                &qemus,
                &format!("seed {seed}, round {round}"),
            );
        }
        assert!(
            joined > 100 && refused > 100,
            "{joined} joins, {refused} refusals"
        );
        // Everyone leaves: nothing is left.
        for r in agent.records(None) {
            let h = r.hostlo.unwrap();
            agent
                .hostlo_leave(&r.vm, part(&h.pod, h.part))
                .await
                .unwrap();
        }
        check_hostlo_rules(&agent, &links, &qemus, "after all left");
        assert!(links.links.lock().unwrap().is_empty());
    }

    fn check_hostlo_rules(
        agent: &Agent,
        links: &FakeLinks,
        qemus: &[(&str, Arc<FakeQemu>)],
        when: &str,
    ) {
        let records = agent.records(None);
        let mut pods = std::collections::BTreeSet::new();
        let mut held = std::collections::HashSet::new();
        for r in &records {
            assert_eq!(r.state, NicState::Attached, "{when}: {r:?}");
            let h = r.hostlo.as_ref().expect("only Hostlo parts here");
            assert!(
                held.insert((r.network.clone(), h.pod.clone(), h.part)),
                "{when}: part {} of {}/{} held twice",
                h.part,
                r.network,
                h.pod
            );
            assert_eq!(
                h.bridge(),
                hostlo::segment_bridge(&r.network, &h.pod),
                "{when}: {r:?}"
            );
            pods.insert((r.network.clone(), h.pod.clone()));
            let vm_net = agent.vm(&r.vm).unwrap().config.network.clone();
            assert_eq!(&vm_net, &r.network, "{when}: {r:?}");
        }
        let live: std::collections::BTreeSet<String> = pods
            .iter()
            .map(|(n, p)| hostlo::segment_bridge(n, p))
            .collect();
        let bridges: std::collections::BTreeSet<String> = links
            .links
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with(hostlo::SEGMENT_PREFIX))
            .cloned()
            .collect();
        assert_eq!(bridges, live, "{when}: segment bridges");
        let host_ifs: std::collections::BTreeSet<String> = links
            .links
            .lock()
            .unwrap()
            .iter()
            .filter(|l| !l.starts_with(hostlo::SEGMENT_PREFIX))
            .cloned()
            .collect();
        let want: std::collections::BTreeSet<String> =
            records.iter().map(|r| r.id.names().host_if).collect();
        assert_eq!(host_ifs, want, "{when}: host links");
        for (vm, q) in qemus {
            let mut devices: Vec<String> = q.devices.lock().unwrap().keys().cloned().collect();
            let mut want: Vec<String> = records
                .iter()
                .filter(|r| r.vm == *vm)
                .map(|r| r.id.names().device)
                .collect();
            devices.sort();
            want.sort();
            assert_eq!(devices, want, "{when}: devices of {vm}");
        }
    }
}
