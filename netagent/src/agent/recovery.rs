//! Recovery: bringing records in line with what the backends really have.
//!
//! At start, before any socket listens ([`Agent::recover`]): bridges, then
//! every VM reconciled, records of VMs no longer configured dropped, host
//! links and Hostlo segments no record accounts for removed. While serving,
//! each VM's upkeep task ([`spawn_upkeep`]) reconciles a VM whose backend
//! reconnected (QEMU restarted) or that has a cleanup pending, and refills
//! its warm pool. At shutdown, [`Agent::drain`] waits for the operations in
//! flight.
//!
//! ```text
//! reconcile_vm(vm): lock VM; probe ─fail─▶ every record Deferred
//!   each record: lifecycle::recovery(state, presence) ─▶ Keep | Defer
//!                | RollBack | FinishDetach | Release ─▶ remove_nic
//!   orphans (agent's devices/netdevs with no record) ─▶ unplug
//! ```

use std::{
    collections::HashSet,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use tokio::task::JoinHandle;

use super::Agent;
use crate::{
    backend::{BackendError, BackendEvent},
    config::NetworkConfig,
    error::AgentError,
    hostlo,
    lifecycle::{self, Presence, Recovery},
    names::{NicId, NicNames, HOST_IF_PREFIX},
};

/// What a reconciliation did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Records kept.
    pub kept: usize,
    /// Half-done attaches undone.
    pub rolled_back: usize,
    /// Interrupted detaches finished.
    pub detached: usize,
    /// NICs the VM lost, released.
    pub released: usize,
    /// Records left for later (VM unreachable, or cleanup failed).
    pub deferred: usize,
    /// Objects found with no record, removed.
    pub orphans: usize,
}

impl Agent {
    /// Brings VM `vm_name`'s records in line with what its backend has.
    ///
    /// # Errors
    /// [`AgentError::UnknownVm`]; a record whose cleanup fails is deferred,
    /// not an error.
    pub async fn reconcile_vm(&self, vm_name: &str) -> Result<ReconcileReport, AgentError> {
        let vm = self.vm(vm_name)?.clone();
        let _op = vm.op.lock().await;
        let mut report = ReconcileReport::default();
        if vm.is_retired() {
            return Ok(report);
        }
        let generation = match vm.backend.probe().await {
            Ok(g) => Some(g),
            Err(e) => {
                log::warn!("VM {vm_name}: not reachable, reconciliation deferred: {e}");
                None
            }
        };
        let records = self.records.snapshot(Some(vm_name));
        let ids: Vec<NicId> = records.iter().map(|r| r.id.clone()).collect();
        let presence = if generation.is_some() {
            vm.backend.presence(&ids).await
        } else {
            ids.iter().map(|i| (i.clone(), Presence::Unknown)).collect()
        };
        // A guest restart is forgotten only once a reachable backend was
        // asked about every NIC.
        let restarted = generation.is_some() && vm.guest_restarted.swap(false, Ordering::AcqRel);
        for rec in &records {
            let mut p = presence.get(&rec.id).copied().unwrap_or(Presence::Unknown);
            if restarted && !rec.pooled && p == Presence::Present {
                p = Presence::Stale;
            }
            let action = lifecycle::recovery(rec.state, p);
            match action {
                Recovery::Keep => {
                    report.kept += 1;
                    continue;
                }
                Recovery::Defer => {
                    report.deferred += 1;
                    continue;
                }
                _ => {}
            }
            // A Hostlo part goes under its segment's lock, as a leave does.
            let segment = match &rec.hostlo {
                Some(h) => Some(self.segments.lock(&rec.network, &h.pod).await),
                None => None,
            };
            match self.remove_nic(&vm, &rec.id).await {
                Ok(()) => {
                    log::info!(
                        "VM {vm_name}: NIC {} ({:?}, {}) cleaned up: {action:?}",
                        rec.id,
                        rec.state,
                        rec.ipv4
                    );
                    if let (Some(h), Some(segment)) = (&rec.hostlo, &segment) {
                        self.mark_pod_changed(&rec.network, &h.pod);
                        self.remove_segment_if_empty(segment, &rec.network, &h.pod, &h.bridge())
                            .await;
                    }
                    match action {
                        Recovery::RollBack => report.rolled_back += 1,
                        Recovery::FinishDetach => report.detached += 1,
                        _ => report.released += 1,
                    }
                }
                Err(e) => {
                    log::warn!("VM {vm_name}: cleanup of NIC {} deferred: {e}", rec.id);
                    report.deferred += 1;
                }
            }
        }
        if generation.is_some() {
            let known = self.records.ids();
            match vm.backend.orphans(&known).await {
                Ok(orphans) => {
                    for id in orphans {
                        match vm.backend.unplug(&id).await {
                            Ok(()) => {
                                log::info!("VM {vm_name}: removed orphaned NIC objects of {id}");
                                report.orphans += 1;
                            }
                            Err(e) => {
                                log::warn!("VM {vm_name}: cannot remove orphaned NIC {id}: {e}")
                            }
                        }
                    }
                }
                Err(e) => log::warn!("VM {vm_name}: cannot list orphans: {e}"),
            }
        }
        if let Some(g) = generation {
            vm.seen_generation.store(g, Ordering::Release);
        }
        Ok(report)
    }

    /// Network `net`'s bridge: made (with the gateway address) when the
    /// agent manages it, else only looked for (a warning when missing).
    ///
    /// # Errors
    /// [`AgentError::Backend`] when a managed bridge cannot be made.
    pub async fn ensure_network(&self, net: &NetworkConfig) -> Result<(), AgentError> {
        if net.manage_bridge {
            self.links
                .ensure_bridge(
                    &net.bridge,
                    Some((net.gateway.into(), net.subnet.prefix_len())),
                    net.mtu,
                )
                .await
                .map_err(BackendError::from)?;
        } else if !self
            .links
            .exists(&net.bridge)
            .await
            .map_err(BackendError::from)?
        {
            log::warn!(
                "network {}: bridge {} does not exist (yet); attaches will fail until it does",
                net.name,
                net.bridge
            );
        }
        Ok(())
    }

    /// Releases every NIC of `vm` (an unregister with `force`; the caller
    /// holds the VM's operation lock): each is unplugged and its lease
    /// freed as a detach would, Hostlo parts leaving their segments.
    /// Returns how many went; the first failure stops it (the NICs left
    /// stay recorded).
    ///
    /// # Errors
    /// A NIC's cleanup.
    pub(super) async fn release_nics_locked(&self, vm: &super::Vm) -> Result<usize, AgentError> {
        let vm_name = vm.name();
        let mut released = 0;
        for rec in self.records.snapshot(Some(vm_name)) {
            let segment = match &rec.hostlo {
                Some(h) => Some(self.segments.lock(&rec.network, &h.pod).await),
                None => None,
            };
            self.remove_nic(vm, &rec.id).await?;
            log::info!(
                "VM {vm_name}: NIC {} ({}) released (VM unregistered)",
                rec.id,
                rec.ipv4
            );
            if let (Some(h), Some(segment)) = (&rec.hostlo, &segment) {
                self.mark_pod_changed(&rec.network, &h.pod);
                self.remove_segment_if_empty(segment, &rec.network, &h.pod, &h.bridge())
                    .await;
            }
            released += 1;
        }
        Ok(released)
    }

    /// Deletes host links the agent made that no record accounts for.
    /// Call only when no operation is in flight (at start).
    ///
    /// # Errors
    /// [`AgentError::Backend`] when the links cannot be listed or deleted.
    pub async fn sweep_host_links(&self) -> Result<usize, AgentError> {
        let names = self
            .links
            .list_owned(HOST_IF_PREFIX)
            .await
            .map_err(BackendError::from)?;
        let known: HashSet<NicId> = self.records.ids().into_iter().collect();
        let mut removed = 0;
        for name in names {
            match NicNames::id_from_name(&name) {
                Some(id) if known.contains(&id) => {}
                _ => {
                    if self.links.delete(&name).await.map_err(BackendError::from)? {
                        log::info!("removed orphaned host interface {name}");
                        removed += 1;
                    }
                }
            }
        }
        Ok(removed)
    }

    /// Everything the agent does at start before serving: bridges, then
    /// every VM reconciled, then the host links swept.
    ///
    /// # Errors
    /// [`AgentError::Backend`] (a bridge or the host links), [`AgentError::State`].
    pub async fn recover(&self) -> Result<ReconcileReport, AgentError> {
        for net in self.config().networks.values() {
            self.ensure_network(net).await?;
        }
        let mut total = ReconcileReport::default();
        for vm in self.vms() {
            let r = self.reconcile_vm(vm.name()).await?;
            total.kept += r.kept;
            total.rolled_back += r.rolled_back;
            total.detached += r.detached;
            total.released += r.released;
            total.deferred += r.deferred;
            total.orphans += r.orphans;
        }
        // Records of VMs no longer configured: nothing can unplug them; drop
        // them (their host links go with the sweep below).
        let stale: Vec<NicId> = self
            .records
            .snapshot(None)
            .into_iter()
            .filter(|r| !self.serves(&r.vm))
            .map(|r| r.id)
            .collect();
        for id in &stale {
            if let Some(r) = self.records.remove(id) {
                log::warn!(
                    "dropped NIC {} of VM {} which is no longer configured",
                    r.id,
                    r.vm
                );
                total.released += 1;
            }
        }
        // Records dropped at load (VM gone, or released misfits) leave the
        // file with this save.
        let dropped = self.records.dropped_at_load();
        total.released += dropped;
        if !stale.is_empty() || dropped > 0 {
            self.records.persist().await?;
        }
        total.orphans += self.sweep_host_links().await?;
        // Segments of Hostlo pods that no part holds any more.
        let live: HashSet<String> = self.hostlo_segments();
        for name in self
            .links
            .list_owned(hostlo::SEGMENT_PREFIX)
            .await
            .map_err(BackendError::from)?
        {
            if !live.contains(&name)
                && self.links.delete(&name).await.map_err(BackendError::from)?
            {
                log::info!("removed orphaned Hostlo segment {name}");
                total.orphans += 1;
            }
        }
        Ok(total)
    }

    /// One round of the background upkeep of VM `vm_name`: if its backend
    /// was restarted (a new QEMU, a new namespace at the VM's path), the
    /// guest restarted, a cleanup is pending or a NIC is gone (its device or
    /// host end removed behind the agent's back), reconcile; then refill its
    /// warm pool. `None` when nothing was reconciled.
    ///
    /// # Errors
    /// [`AgentError::UnknownVm`]; an unreachable backend is `Ok(None)`.
    pub async fn upkeep_vm(&self, vm_name: &str) -> Result<Option<ReconcileReport>, AgentError> {
        let vm = self.vm(vm_name)?.clone();
        let pending = self.records.pending(vm_name);
        let generation = match vm.backend.probe().await {
            Ok(g) => g,
            Err(_) => return Ok(None),
        };
        let seen = vm.seen_generation.load(Ordering::Acquire);
        let restarted = vm.guest_restarted.load(Ordering::Acquire);
        let report = if generation != seen || pending || restarted || self.lost_any(&vm).await {
            if generation != seen && seen != 0 {
                log::info!(
                    "VM {vm_name}: backend restarted (generation {seen} -> {generation}), reconciling"
                );
            }
            Some(self.reconcile_vm(vm_name).await?)
        } else {
            None
        };
        if vm.warm_pool() > 0 {
            if let Err(e) = self.refill_pool(vm_name).await {
                log::warn!("VM {vm_name}: cannot refill the warm pool: {e}");
            }
        }
        Ok(report)
    }

    /// Whether the backend lost an Attached NIC of `vm` (the presence check
    /// of the upkeep; under the VM's lock, so no plug is half done).
    async fn lost_any(&self, vm: &super::Vm) -> bool {
        let _op = vm.op.lock().await;
        let ids: Vec<NicId> = self
            .records
            .snapshot(Some(vm.name()))
            .into_iter()
            .filter(|r| r.state == lifecycle::NicState::Attached)
            .map(|r| r.id)
            .collect();
        if ids.is_empty() {
            return false;
        }
        vm.backend
            .presence(&ids)
            .await
            .values()
            .any(|p| *p == Presence::Gone)
    }

    /// The host link `ifname` was deleted (a netlink notification): when it
    /// was a NIC's host end, wake its VM's upkeep, which releases the NIC if
    /// the VM lost it (someone else deleted the link, or the namespace that
    /// held its other end went away).
    pub fn host_link_gone(&self, ifname: &str) {
        let Some(id) = NicNames::id_from_name(ifname) else {
            return;
        };
        let Some(rec) = self.records.get(&id) else {
            return;
        };
        if let Ok(vm) = self.vm(&rec.vm) {
            log::debug!("VM {}: host end {ifname} of NIC {id} deleted", rec.vm);
            vm.upkeep.notify_one();
        }
    }

    /// VM `vm_name`'s guest restarted: its next reconciliation releases the
    /// NICs given to sandboxes (the warm pool stays), and it runs now.
    pub fn guest_restarted(&self, vm_name: &str) {
        if let Ok(vm) = self.vm(vm_name) {
            log::info!("VM {vm_name}: the guest restarted; its sandboxes' NICs will be released");
            vm.guest_restarted.store(true, Ordering::Release);
            vm.upkeep.notify_one();
        }
    }

    /// Waits until no VM operation is in flight (each VM's lock is taken and
    /// held: nothing new starts). False when `timeout` passed first.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let all = async {
            let vms = self.vms();
            let mut guards = Vec::new();
            for vm in &vms {
                guards.push(vm.op.lock().await);
            }
            // Held until the process exits: no operation may start after the drain.
            std::mem::forget(guards);
        };
        tokio::time::timeout(timeout, all).await.is_ok()
    }
}

/// Spawns the per-VM upkeep: every `period`, or at once when an attach took
/// a warm NIC, a NIC's host end was deleted or the VM reported something
/// ([`crate::backend::BackendEvent`]), [`Agent::upkeep_vm`].
pub fn spawn_upkeep(agent: Arc<Agent>, period: Duration) -> Vec<JoinHandle<()>> {
    agent
        .vms()
        .into_iter()
        .map(|vm| spawn_vm_upkeep(agent.clone(), vm, period))
        .collect()
}

/// The upkeep task of one VM (see [`spawn_upkeep`]); it ends when the VM
/// is no longer served.
pub fn spawn_vm_upkeep(agent: Arc<Agent>, vm: Arc<super::Vm>, period: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        let name = vm.name();
        let mut events = vm.backend.events();
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if vm.is_retired() {
                return;
            }
            tokio::select! {
                _ = tick.tick() => {}
                _ = vm.upkeep.notified() => {}
                ev = events.next() => {
                    if ev == BackendEvent::GuestRestarted {
                        agent.guest_restarted(name);
                    }
                }
            }
            match agent.upkeep_vm(name).await {
                Ok(Some(report)) if report != Default::default() => {
                    log::info!("VM {name}: upkeep {report:?}")
                }
                Ok(_) => {}
                Err(e) => log::warn!("VM {name}: upkeep failed: {e}"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        agent::{
            rig::{req, rig, rig_with},
            NicSelector,
        },
        backend::fake::FakeQemu,
        lifecycle::NicState,
        links::fake::FakeLinks,
        state::{records_in, sqlite::SqliteStore, NicRecord, State},
    };

    #[tokio::test]
    async fn restart_recovers_every_interrupted_state() {
        let dir = tempfile::tempdir().unwrap();
        let links = Arc::new(FakeLinks::default());
        let q1 = Arc::new(FakeQemu::new(4));
        let q2 = Arc::new(FakeQemu::new(4));
        let keep;
        {
            let r = rig_with(
                dir.path(),
                "10.9.0.254",
                links.clone(),
                q1.clone(),
                q2.clone(),
            );
            keep = r.agent.attach("vm1", req("keep")).await.unwrap().record;
            r.agent.attach("vm1", req("detaching")).await.unwrap();
            r.agent.attach("vm2", req("lost")).await.unwrap();
        }
        // Simulate crashes mid-way by editing the durable state: one record
        // stuck in Detaching, one in Attaching whose device was half made.
        let mut recs = records_in(dir.path()).unwrap();
        for r in recs.iter_mut() {
            if r.sandbox_id == "detaching" {
                r.state = NicState::Detaching;
            }
        }
        let half = NicRecord {
            id: "00000000ee".parse().unwrap(),
            sandbox_id: "half".into(),
            state: NicState::Attaching,
            ipv4: "10.9.0.200".parse().unwrap(),
            // A MAC of its own, and not keep's IPv6 address: records
            // sharing either do not fit (see `crate::stale`).
            mac: "52:54:00:00:00:ee".parse().unwrap(),
            ipv6: None,
            ..keep.clone()
        };
        recs.push(half.clone());
        SqliteStore::open(dir.path())
            .unwrap()
            .replace(&State {
                nics: recs,
                last_leased: Default::default(),
            })
            .unwrap();
        q1.netdevs.lock().unwrap().insert(half.id.names().netdev);
        links.links.lock().unwrap().insert(half.id.names().host_if);
        // An orphan netdev no record knows, and VM2's QEMU lost its device (restart).
        q1.netdevs.lock().unwrap().insert("nln-00000000ff".into());
        links.links.lock().unwrap().insert("nlh00000000ff".into());
        q2.devices.lock().unwrap().clear();

        let r = rig_with(
            dir.path(),
            "10.9.0.254",
            links.clone(),
            q1.clone(),
            q2.clone(),
        );
        let report = r.agent.recover().await.unwrap();
        assert_eq!(
            report,
            ReconcileReport {
                kept: 1,
                rolled_back: 1,
                detached: 1,
                released: 1,
                deferred: 0,
                // ff's netdev (VM1's orphan sweep also removes its tap).
                orphans: 1,
            }
        );
        let left = r.agent.records(None);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].id, keep.id);
        assert_eq!(records_in(dir.path()).unwrap(), left);
        assert_eq!(r.agent.records.leased("n"), 1);
        assert_eq!(q1.devices.lock().unwrap().len(), 1);
        assert_eq!(q1.netdevs.lock().unwrap().len(), 1);
        assert_eq!(
            links
                .links
                .lock()
                .unwrap()
                .iter()
                .cloned()
                .collect::<Vec<_>>(),
            vec![keep.id.names().host_if]
        );
    }

    /// Issue 9, item 8: a NIC whose tap someone deleted, or whose device
    /// the guest dropped, is released by the upkeep while the agent runs
    /// (record, lease and what is left of it), and only that NIC.
    #[tokio::test]
    async fn nics_lost_behind_the_agents_back_are_released() {
        let dir = tempfile::tempdir().unwrap();
        let r = rig(dir.path(), "10.9.0.254");
        let a = r.agent.attach("vm1", req("a")).await.unwrap().record;
        let b = r.agent.attach("vm1", req("b")).await.unwrap().record;
        let c = r.agent.attach("vm1", req("c")).await.unwrap().record;
        r.agent.recover().await.unwrap();
        assert_eq!(r.agent.upkeep_vm("vm1").await.unwrap(), None, "all there");
        // Someone deletes a's tap; the netlink notification wakes the upkeep.
        let tap = a.id.names().host_if;
        r.links.links.lock().unwrap().remove(&tap);
        r.agent.host_link_gone(&tap);
        let rep = r.agent.upkeep_vm("vm1").await.unwrap().unwrap();
        assert_eq!((rep.released, rep.kept), (1, 2), "{rep:?}");
        assert!(!r
            .q1
            .devices
            .lock()
            .unwrap()
            .contains_key(&a.id.names().device));
        assert!(!r.agent.records.is_leased("n", a.ipv4));
        // The guest ejects b's device itself (QEMU reports DEVICE_DELETED).
        r.q1.devices.lock().unwrap().remove(&b.id.names().device);
        let mut events = r.agent.vm("vm1").unwrap().backend.events();
        r.q1.emit(
            "DEVICE_DELETED",
            serde_json::json!({"device": b.id.names().device}),
        );
        assert_eq!(events.next().await, BackendEvent::Changed);
        let rep = r.agent.upkeep_vm("vm1").await.unwrap().unwrap();
        assert_eq!((rep.released, rep.kept), (1, 1), "{rep:?}");
        assert!(!r.q1.netdevs.lock().unwrap().contains(&b.id.names().netdev));
        assert!(!r
            .links
            .links
            .lock()
            .unwrap()
            .contains(&b.id.names().host_if));
        let left: Vec<NicId> = r.agent.records(None).into_iter().map(|x| x.id).collect();
        assert_eq!(left, vec![c.id]);
        assert_eq!(r.agent.records.leased("n"), 1);
        // The quota is free again.
        r.agent.attach("vm1", req("d")).await.unwrap();
    }

    /// Issue 9, item 8: a guest reboot (QEMU's RESET) releases the NICs
    /// given to sandboxes, whose pods died with the guest; the warm pool,
    /// given to nobody, stays.
    #[tokio::test]
    async fn a_guest_restart_releases_the_sandboxes_nics() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = crate::agent::rig::config(dir.path(), "10.9.0.254");
        cfg.vms[0].warm_pool = 1;
        let links = Arc::new(FakeLinks::default());
        let q1 = Arc::new(FakeQemu::new(4));
        let agent = crate::agent::Agent::with_backends(
            cfg,
            links.clone(),
            crate::agent::rig::backends(&links, &[("vm1", q1.clone())]),
        )
        .unwrap();
        agent.refill_pool("vm1").await.unwrap();
        let a = agent.attach("vm1", req("a")).await.unwrap().record;
        agent.refill_pool("vm1").await.unwrap();
        let pooled: Vec<NicId> = agent
            .records(None)
            .into_iter()
            .filter(|r| r.pooled)
            .map(|r| r.id)
            .collect();
        assert_eq!(pooled.len(), 1);
        let mut events = agent.vm("vm1").unwrap().backend.events();
        q1.emit(
            "RESET",
            serde_json::json!({"guest": true, "reason": "guest-reset"}),
        );
        assert_eq!(events.next().await, BackendEvent::GuestRestarted);
        agent.guest_restarted("vm1");
        let rep = agent.upkeep_vm("vm1").await.unwrap().unwrap();
        assert_eq!((rep.released, rep.kept), (1, 1), "{rep:?}");
        let left: Vec<NicId> = agent.records(None).into_iter().map(|r| r.id).collect();
        assert_eq!(left, pooled, "the pool stays, a's NIC went");
        assert!(!q1
            .devices
            .lock()
            .unwrap()
            .contains_key(&a.id.names().device));
        assert_eq!(
            agent.upkeep_vm("vm1").await.unwrap(),
            None,
            "a restart is acted on once"
        );
    }

    #[tokio::test]
    async fn unreachable_vm_defers_and_stuck_unplug_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let r = rig(dir.path(), "10.9.0.254");
        let a = r.agent.attach("vm1", req("a")).await.unwrap().record;
        *r.q1.guest_releases.lock().unwrap() = false;
        let e = r
            .agent
            .detach("vm1", NicSelector::Id(a.id.clone()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::DEADLINE_EXCEEDED, "{e}");
        assert_eq!(
            r.agent.records(None)[0].state,
            NicState::Detaching,
            "lease held until the device is gone"
        );
        *r.q1.down.lock().unwrap() = true;
        assert_eq!(
            r.agent.upkeep_vm("vm1").await.unwrap(),
            None,
            "unreachable: nothing to do yet"
        );
        *r.q1.down.lock().unwrap() = false;
        *r.q1.guest_releases.lock().unwrap() = true;
        let rep = r.agent.upkeep_vm("vm1").await.unwrap().unwrap();
        assert_eq!(rep.detached, 1);
        assert!(r.agent.records(None).is_empty());
    }
}
