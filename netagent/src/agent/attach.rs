//! BrFusion: a sandbox's own NICs, attached and detached. An attachment is
//! (scope, sandbox, interface) within the calling VM ([`Attachment`]): one
//! sandbox id in two containerd namespaces is two sandboxes, and a sandbox
//! holds one NIC per interface name.
//!
//! ```text
//! attach(vm, attachment)                        detach(vm, nic id | scope, sandbox[, interface])
//!   network = the VM's? else NetworkNotAllowed    lock VM
//!   lock VM                                        the VM's BrFusion records? else NicNotFound
//!   same attachment Attached? ─▶ it (created=false)  each, remove_nic:
//!   same attachment half-done? ─▶ remove_nic first     record Detaching, persist
//!   a warm NIC? ─▶ give it (pool)                      backend.unplug (idempotent)
//!   plug_new:                                          drop record, free lease,
//!     quota, lease, MAC, id; record Attaching, persist forget host neighbours, persist
//!     forget the host's neighbours of the addresses
//!     backend.plug ──fail──▶ drop record, free lease, persist
//!     record Attached (+ slot), persist ──fail──▶ remove_nic
//! ```
//!
//! Every undo releases only what its own call made: a failed plug drops the
//! record it began (the backend undoes its own steps, by the new NIC's
//! names), and a failed save removes the NIC it just plugged.

use std::{collections::BTreeMap, net::IpAddr};

use super::{records::NewRecord, Agent, Vm};
use crate::{
    backend::NicPlan,
    error::AgentError,
    lifecycle::{Event, NicState},
    names::{IfName, Invalid, NicId, SandboxId, Scope, DEFAULT_IFNAME},
    state::NicRecord,
};

/// A network name from a request, checked: 1 to 64 characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkName(String);

impl NetworkName {
    /// Checks `name` (field `network`).
    pub fn parse(name: &str) -> Result<NetworkName, Invalid> {
        if name.is_empty() || name.len() > 64 {
            return Err(Invalid::new("network", "must be 1 to 64 characters"));
        }
        Ok(NetworkName(name.to_string()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

pub use crate::labels::Labels;

/// Which attachment of a VM: the idempotency key of an attach within the
/// calling VM. One sandbox may hold several NICs, one per interface name,
/// and one sandbox id names different sandboxes in different scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// The containerd namespace for the shim outside CRI; empty otherwise.
    pub scope: Scope,
    /// The sandbox.
    pub sandbox_id: SandboxId,
    /// The interface name in the pod (CNI_IFNAME).
    pub interface: IfName,
}

impl Attachment {
    /// Sandbox `sandbox_id` in the empty scope, on `eth0` (CRI's pod NIC).
    pub fn eth0(sandbox_id: SandboxId) -> Attachment {
        Attachment {
            scope: Scope::default(),
            sandbox_id,
            interface: IfName::default(),
        }
    }

    /// Whether `rec` is this attachment's NIC.
    pub fn is(&self, rec: &NicRecord) -> bool {
        !rec.pooled
            && rec.hostlo.is_none()
            && rec.scope == self.scope.as_str()
            && rec.sandbox_id == self.sandbox_id.as_str()
            && rec.interface == self.interface.as_str()
    }
}

impl std::fmt::Display for Attachment {
    /// `team-one/app eth0`, or `app eth0` in the empty scope.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.scope.as_str().is_empty() {
            write!(f, "{}/", self.scope.as_str())?;
        }
        write!(f, "{} {}", self.sandbox_id, self.interface)
    }
}

/// An attach request, checked.
#[derive(Debug, Clone)]
pub struct AttachRequest {
    /// The attachment (idempotency key within the VM).
    pub attachment: Attachment,
    /// Network; `None` for the VM's own.
    pub network: Option<NetworkName>,
    /// Labels.
    pub labels: Labels,
}

impl AttachRequest {
    /// A request for `sandbox_id`'s `eth0` in the empty scope on the VM's
    /// own network, without labels.
    pub fn for_sandbox(sandbox_id: SandboxId) -> AttachRequest {
        AttachRequest {
            attachment: Attachment::eth0(sandbox_id),
            network: None,
            labels: Labels::default(),
        }
    }
}

/// Which NICs a detach names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicSelector {
    /// By NIC id.
    Id(NicId),
    /// By the sandbox it was attached for, in a scope: the NIC of one
    /// interface name, or (`None`) every NIC of the sandbox.
    Sandbox {
        /// The scope the sandbox was attached in.
        scope: Scope,
        /// The sandbox.
        sandbox_id: SandboxId,
        /// One interface, or all of them.
        interface: Option<IfName>,
    },
}

impl NicSelector {
    /// Whether `rec` is one of the NICs this selects (a BrFusion NIC).
    fn selects(&self, rec: &NicRecord) -> bool {
        match self {
            NicSelector::Id(id) => &rec.id == id,
            NicSelector::Sandbox {
                scope,
                sandbox_id,
                interface,
            } => {
                !rec.pooled
                    && rec.scope == scope.as_str()
                    && rec.sandbox_id == sandbox_id.as_str()
                    && interface
                        .as_ref()
                        .is_none_or(|i| rec.interface == i.as_str())
            }
        }
    }
}

impl std::fmt::Display for NicSelector {
    /// What a detach asked for, as `NicNotFound` tells it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NicSelector::Id(id) => write!(f, "with id {id}"),
            NicSelector::Sandbox {
                scope,
                sandbox_id,
                interface,
            } => {
                f.write_str("for sandbox ")?;
                if !scope.as_str().is_empty() {
                    write!(f, "{}/", scope.as_str())?;
                }
                write!(f, "{sandbox_id}")?;
                match interface {
                    Some(i) => write!(f, " {i}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// Result of an attach.
#[derive(Debug, Clone)]
pub struct Attached {
    /// The record.
    pub record: NicRecord,
    /// False when the sandbox already had it.
    pub created: bool,
}

/// How a new NIC is addressed and where it is plugged.
pub(super) struct NewNic<'a> {
    /// The record to write.
    pub record: NewRecord<'a>,
    /// The host bridge its host end joins.
    pub bridge: String,
    /// Its MTU.
    pub mtu: u32,
}

impl Agent {
    /// Gives VM `vm_name` a NIC for `req.sandbox_id` (or returns the one it has).
    ///
    /// # Errors
    /// [`AgentError::UnknownVm`], [`AgentError::NetworkNotAllowed`] (another
    /// tenant's network), [`AgentError::QuotaExceeded`], [`AgentError::Ipam`]
    /// (no free address), [`AgentError::Backend`] (hot-plug failed; nothing
    /// is left of the NIC), [`AgentError::State`].
    pub async fn attach(&self, vm_name: &str, req: AttachRequest) -> Result<Attached, AgentError> {
        let vm = self.vm(vm_name)?.clone();
        let network = req
            .network
            .as_ref()
            .map_or(vm.config.network.as_str(), NetworkName::as_str);
        if network != vm.config.network {
            return Err(AgentError::NetworkNotAllowed {
                vm: vm_name.to_string(),
                network: network.to_string(),
                allowed: vm.config.network.clone(),
            });
        }
        let _op = vm.op.lock().await;
        vm.check_live()?;
        let key = &req.attachment;
        if let Some(rec) = self.records.find_brfusion(vm_name, |r| key.is(r)) {
            if rec.state == NicState::Attached {
                return Ok(Attached {
                    record: rec,
                    created: false,
                });
            }
            // A failed rollback or detach left it: finish that first.
            self.remove_nic(&vm, &rec.id).await?;
        }
        if let Some(record) = self.claim_warm(&vm, &req).await? {
            return Ok(Attached {
                record,
                created: true,
            });
        }
        let record = self
            .plug_new(&vm, brfusion_nic(&vm, Some(key), req.labels.as_map()))
            .await?;
        if vm.warm_pool() > 0 {
            vm.upkeep.notify_one();
        }
        log::info!(
            "VM {vm_name}: attached NIC {} ({}, {}) for sandbox {key}{}",
            record.id,
            record.mac,
            record.ipv4,
            record
                .slot
                .as_deref()
                .map(|s| format!(" on {s}"))
                .unwrap_or_default()
        );
        Ok(Attached {
            record,
            created: true,
        })
    }

    /// Leases, names, records (write-ahead) and plugs a new NIC. Caller holds
    /// the VM lock. On failure nothing is left: no record, lease or device.
    pub(super) async fn plug_new(&self, vm: &Vm, new: NewNic<'_>) -> Result<NicRecord, AgentError> {
        let record = self.records.begin(
            &vm.live_config(),
            new.record,
            &self.config().agent.mac_prefix,
        )?;
        if let Err(e) = self.records.persist().await {
            self.records.apply(&record.id, Event::Failed);
            return Err(e);
        }
        // The address may have been someone else's a moment ago.
        self.forget_neighbours(&record).await;
        let plan = NicPlan {
            id: record.id.clone(),
            mac: record.mac,
            bridge: new.bridge,
            mtu: new.mtu,
        };
        match vm.backend.plug(&plan).await {
            Ok(plugged) => {
                self.records.update(&record.id, |r| r.slot = plugged.slot);
                let plugged = self.records.apply(&record.id, Event::Plugged);
                match (self.records.persist().await, plugged) {
                    (Ok(()), Some(rec)) => Ok(rec),
                    (Ok(()), None) => Err(gone(vm, &record.id)),
                    (Err(e), _) => {
                        // Not durable: undo, so that a restart cannot find a NIC the caller never got.
                        if let Err(undo) = self.remove_nic(vm, &record.id).await {
                            log::error!(
                                "NIC {}: undo after a failed save failed: {undo}",
                                record.id
                            );
                        }
                        Err(e)
                    }
                }
            }
            Err(e) => {
                // The backend undid its own steps; forget the record.
                self.records.apply(&record.id, Event::Failed);
                if let Err(pe) = self.records.persist().await {
                    log::error!("NIC {}: cannot persist the rollback: {pe}", record.id);
                }
                Err(e.into())
            }
        }
    }

    /// Takes back the NICs of VM `vm_name` that `which` selects: one by id
    /// or by (scope, sandbox, interface), or every NIC of a sandbox in a
    /// scope. Returns the records taken back.
    ///
    /// # Errors
    /// [`AgentError::NicNotFound`] when the VM has no such BrFusion NIC
    /// (another VM's is not told apart), [`AgentError::Backend`] (the record
    /// stays Detaching and the upkeep retries; the other NICs of the sandbox
    /// are still taken back), [`AgentError::State`].
    pub async fn detach(
        &self,
        vm_name: &str,
        which: NicSelector,
    ) -> Result<Vec<NicRecord>, AgentError> {
        let vm = self.vm(vm_name)?.clone();
        let _op = vm.op.lock().await;
        vm.check_live()?;
        let found: Vec<NicRecord> = self
            .records
            .snapshot(Some(vm_name))
            .into_iter()
            .filter(|r| r.hostlo.is_none() && which.selects(r))
            .collect();
        if found.is_empty() {
            return Err(AgentError::NicNotFound {
                vm: vm_name.to_string(),
                what: which.to_string(),
            });
        }
        let mut first_error = None;
        for rec in &found {
            match self.remove_nic(&vm, &rec.id).await {
                Ok(()) => log::info!(
                    "VM {vm_name}: detached NIC {} ({}) of sandbox {}{} {}",
                    rec.id,
                    rec.ipv4,
                    if rec.scope.is_empty() {
                        String::new()
                    } else {
                        format!("{}/", rec.scope)
                    },
                    rec.sandbox_id,
                    rec.interface
                ),
                Err(e) => {
                    log::warn!("VM {vm_name}: detach of NIC {} failed: {e}", rec.id);
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(found),
        }
    }

    /// Records Detaching, unplugs, drops the record. Caller holds the VM lock.
    pub(super) async fn remove_nic(&self, vm: &Vm, id: &NicId) -> Result<(), AgentError> {
        if self.records.apply(id, Event::Detach).is_some() {
            self.records.persist().await?;
        }
        vm.backend.unplug(id).await?;
        let gone = self.records.apply(id, Event::Unplugged);
        self.records.persist().await?;
        if let Some(gone) = gone {
            self.forget_neighbours(&gone).await;
        }
        Ok(())
    }

    /// Removes the host's neighbour entries for a BrFusion NIC's addresses
    /// on its network's bridge, when the address is released or leased
    /// again: the next NIC to hold it has another MAC, and the host must
    /// not keep sending it to the old one until the entry ages out (tens of
    /// seconds). A Hostlo NIC's address keeps its MAC (per pod and part).
    /// A failure is logged: the entry then ages out as it would have.
    async fn forget_neighbours(&self, rec: &NicRecord) {
        if rec.hostlo.is_some() {
            return;
        }
        let Some(net) = self.network(&rec.network) else {
            return;
        };
        let mut addrs = vec![IpAddr::V4(rec.ipv4)];
        addrs.extend(rec.ipv6.map(IpAddr::V6));
        if let Err(e) = self.links.forget_neighbours(&net.bridge, &addrs).await {
            log::warn!("NIC {}: {e}", rec.id);
        }
    }
}

/// A BrFusion NIC of `vm` on its network, for `attachment` (`None`: a
/// warm-pool NIC, given to an attachment later).
pub(super) fn brfusion_nic<'a>(
    vm: &'a Vm,
    attachment: Option<&'a Attachment>,
    labels: &BTreeMap<String, String>,
) -> NewNic<'a> {
    let net = vm.network();
    NewNic {
        record: NewRecord {
            network: net,
            fixed_ipv4: None,
            mac: None,
            scope: attachment.map_or("", |a| a.scope.as_str()),
            sandbox_id: attachment.map_or("", |a| a.sandbox_id.as_str()),
            interface: attachment.map_or(DEFAULT_IFNAME, |a| a.interface.as_str()),
            labels: labels.clone(),
            pooled: attachment.is_none(),
            hostlo: None,
        },
        bridge: net.bridge.clone(),
        mtu: net.mtu,
    }
}

/// The record of a NIC being plugged went away under the VM lock: only a
/// bug can do that; the caller gets an error instead of a reply.
fn gone(vm: &Vm, id: &NicId) -> AgentError {
    log::error!("VM {}: NIC {id} vanished while it was plugged", vm.name());
    AgentError::NicNotFound {
        vm: vm.name().to_string(),
        what: format!("with id {id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        agent::rig::{errors_logged, keyed, req, rig, sb},
        state::records_in,
    };

    #[tokio::test]
    async fn attach_is_idempotent_per_sandbox() {
        let dir = tempfile::tempdir().unwrap();
        let r = rig(dir.path(), "10.9.0.254");
        let a = r.agent.attach("vm1", req("sb1")).await.unwrap();
        assert!(a.created);
        let b = r.agent.attach("vm1", req("sb1")).await.unwrap();
        assert!(!b.created);
        assert_eq!(a.record.id, b.record.id);
        assert_eq!(r.q1.devices.lock().unwrap().len(), 1);
        // Same sandbox id from another VM is another NIC.
        let c = r.agent.attach("vm2", req("sb1")).await.unwrap();
        assert_ne!(c.record.id, a.record.id);
        assert_ne!(c.record.ipv4, a.record.ipv4);
    }

    #[tokio::test]
    async fn bad_input_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let r = rig(dir.path(), "10.9.0.3");
        let before = r.agent.records(None);
        for (vm, rq, code) in [
            ("nope", req("sb"), ttrpc::Code::PERMISSION_DENIED),
            (
                "vm1",
                AttachRequest {
                    network: Some(NetworkName::parse("other").unwrap()),
                    ..req("s")
                },
                ttrpc::Code::PERMISSION_DENIED,
            ),
        ] {
            let e = r.agent.attach(vm, rq).await.unwrap_err();
            assert_eq!(e.code(), code, "{e}");
        }
        assert_eq!(r.agent.records(None), before);
        // Subnet of two addresses (10.9.0.2, .3): the third attach fails cleanly.
        r.agent.attach("vm1", req("a")).await.unwrap();
        r.agent.attach("vm2", req("b")).await.unwrap();
        let e = r.agent.attach("vm2", req("c")).await.unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::RESOURCE_EXHAUSTED, "{e}");
        assert!(e.to_string().contains("no free address"), "{e}");
        assert_eq!(r.agent.records(None).len(), 2);
        assert_eq!(r.q2.devices.lock().unwrap().len(), 1);
        // A VM naming another's NIC: not found, nothing changes.
        let theirs = r.agent.records(Some("vm1"))[0].id.clone();
        let e = r
            .agent
            .detach("vm2", NicSelector::Id(theirs))
            .await
            .unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::NOT_FOUND);
        assert_eq!(r.q1.devices.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn quota_and_detach_free_leases() {
        let dir = tempfile::tempdir().unwrap();
        let r = rig(dir.path(), "10.9.0.254");
        for s in ["a", "b", "c"] {
            r.agent.attach("vm1", req(s)).await.unwrap();
        }
        let e = r.agent.attach("vm1", req("d")).await.unwrap_err();
        assert!(
            matches!(e, AgentError::QuotaExceeded { quota: 3, .. }),
            "{e}"
        );
        let rec = r
            .agent
            .detach("vm1", by_sandbox("", "b", None))
            .await
            .unwrap();
        assert_eq!(rec.len(), 1);
        assert!(!r.agent.records.is_leased("n", rec[0].ipv4));
        r.agent.attach("vm1", req("d")).await.unwrap();
        let e = r
            .agent
            .detach("vm1", by_sandbox("", "b", None))
            .await
            .unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::NOT_FOUND);
    }

    fn by_sandbox(scope: &str, sandbox: &str, interface: Option<&str>) -> NicSelector {
        NicSelector::Sandbox {
            scope: Scope::parse(scope).unwrap(),
            sandbox_id: sb(sandbox),
            interface: interface.map(|i| IfName::parse(i).unwrap()),
        }
    }

    /// Issue 9, items 1 and 2: one id in two containerd namespaces is two
    /// sandboxes, and one sandbox holds one NIC per interface name; each
    /// retry returns its own NIC, and a detach takes back only what it names.
    #[tokio::test]
    async fn attachments_are_keyed_by_scope_sandbox_and_interface() {
        let dir = tempfile::tempdir().unwrap();
        let r = rig(dir.path(), "10.9.0.254");
        let one = r
            .agent
            .attach("vm2", keyed("team-one", "app", ""))
            .await
            .unwrap();
        let two = r
            .agent
            .attach("vm2", keyed("team-two", "app", ""))
            .await
            .unwrap();
        assert!(one.created && two.created, "two sandboxes, two NICs");
        assert_ne!(one.record.id, two.record.id);
        assert_ne!(one.record.ipv4, two.record.ipv4);
        assert_eq!(
            (one.record.scope.as_str(), one.record.interface.as_str()),
            ("team-one", "eth0")
        );
        let cni_eth0 = r
            .agent
            .attach("vm2", keyed("", "pod-x", "eth0"))
            .await
            .unwrap();
        let cni_net1 = r
            .agent
            .attach("vm2", keyed("", "pod-x", "net1"))
            .await
            .unwrap();
        assert!(cni_eth0.created && cni_net1.created);
        assert_ne!(cni_eth0.record.id, cni_net1.record.id);
        assert_eq!(cni_net1.record.interface, "net1");
        // Retries return each its own NIC; "" is eth0.
        for (rq, want) in [
            (keyed("team-one", "app", "eth0"), &one),
            (keyed("team-two", "app", ""), &two),
            (keyed("", "pod-x", ""), &cni_eth0),
            (keyed("", "pod-x", "net1"), &cni_net1),
        ] {
            let again = r.agent.attach("vm2", rq).await.unwrap();
            assert!(!again.created);
            assert_eq!(again.record.id, want.record.id);
        }
        assert_eq!(r.q2.devices.lock().unwrap().len(), 4);
        // A detach in one scope leaves the other scope's sandbox alone.
        let gone = r
            .agent
            .detach("vm2", by_sandbox("team-two", "app", None))
            .await
            .unwrap();
        assert_eq!(
            gone.iter().map(|g| &g.id).collect::<Vec<_>>(),
            [&two.record.id]
        );
        let e = r
            .agent
            .detach("vm2", by_sandbox("team-two", "app", None))
            .await
            .unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::NOT_FOUND, "{e}");
        assert!(e.to_string().contains("team-two/app"), "{e}");
        // The empty scope is a scope of its own: "app" there is nobody.
        let e = r
            .agent
            .detach("vm2", by_sandbox("", "app", None))
            .await
            .unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::NOT_FOUND, "{e}");
        // One interface, then every NIC of the sandbox.
        let e = r
            .agent
            .detach("vm2", by_sandbox("", "pod-x", Some("net2")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::NOT_FOUND, "{e}");
        let gone = r
            .agent
            .detach("vm2", by_sandbox("", "pod-x", Some("net1")))
            .await
            .unwrap();
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].id, cni_net1.record.id);
        let again = r
            .agent
            .attach("vm2", keyed("", "pod-x", "net1"))
            .await
            .unwrap();
        assert!(again.created, "net1 was released, eth0 was not touched");
        let mut gone: Vec<NicId> = r
            .agent
            .detach("vm2", by_sandbox("", "pod-x", None))
            .await
            .unwrap()
            .into_iter()
            .map(|g| g.id)
            .collect();
        gone.sort();
        let mut want = vec![cni_eth0.record.id.clone(), again.record.id.clone()];
        want.sort();
        assert_eq!(
            gone, want,
            "an empty interface takes every NIC of the sandbox"
        );
        let left: Vec<NicId> = r.agent.records(None).into_iter().map(|r| r.id).collect();
        assert_eq!(left, vec![one.record.id.clone()]);
        assert_eq!(r.agent.records.leased("n"), 1);
        assert_eq!(r.q2.devices.lock().unwrap().len(), 1);
    }

    /// Issue 9, item 14: attach, detach, a failed plug and a rolled back
    /// save are the lifecycle working, not anomalies: none logs an error.
    /// An event the table refuses is one, and is logged.
    #[tokio::test]
    async fn only_anomalies_log_errors() {
        let dir = tempfile::tempdir().unwrap();
        let r = rig(dir.path(), "10.9.0.254");
        errors_logged();
        let a = r.agent.attach("vm1", req("a")).await.unwrap().record;
        r.agent.detach("vm1", NicSelector::Id(a.id)).await.unwrap();
        *r.q1.fail.lock().unwrap() = Some("device_add");
        r.agent.attach("vm1", req("b")).await.unwrap_err();
        assert_eq!(errors_logged(), Vec::<String>::new());
        let b = r.agent.attach("vm1", req("b")).await.unwrap().record;
        assert!(r.agent.records.apply(&b.id, Event::Unplugged).is_none());
        let errors = errors_logged();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("does not take event Unplugged"),
            "{errors:?}"
        );
        assert_eq!(
            r.agent.records(None)[0].state,
            NicState::Attached,
            "untouched"
        );
    }

    /// Issue 9, item 5: the host forgets its neighbour entries for an
    /// address on the network's bridge when it is leased (it may have been
    /// another NIC's) and when it is released (the root test
    /// `a_reused_address_keeps_no_stale_neighbour` shows both families on
    /// the kernel).
    #[tokio::test]
    async fn leased_and_released_addresses_are_forgotten_by_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let r = rig(dir.path(), "10.9.0.254");
        let forgets = || -> Vec<String> {
            r.links
                .calls
                .lock()
                .unwrap()
                .iter()
                .filter(|c| c.starts_with("forget_neighbours"))
                .cloned()
                .collect()
        };
        let a = r.agent.attach("vm1", req("a")).await.unwrap().record;
        let line = format!("forget_neighbours br0 {}", a.ipv4);
        assert_eq!(forgets(), std::slice::from_ref(&line), "leased");
        r.agent.detach("vm1", NicSelector::Id(a.id)).await.unwrap();
        assert_eq!(forgets(), [line.clone(), line], "released");
    }

    /// Issue 11, item 8: a bridge with every port taken (`EXFULL`) is a
    /// clear `RESOURCE_EXHAUSTED`, not `INTERNAL: Exchange full`, and the
    /// attach leaves nothing behind.
    #[tokio::test]
    async fn a_full_bridge_is_resource_exhausted() {
        let dir = tempfile::tempdir().unwrap();
        let r = rig(dir.path(), "10.9.0.254");
        *r.links.fail.lock().unwrap() = Some("join_bridge");
        *r.links.fail_errno.lock().unwrap() = Some(libc::EXFULL);
        let e = r.agent.attach("vm1", req("a")).await.unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::RESOURCE_EXHAUSTED, "{e}");
        let text = e.to_string();
        assert!(
            text.contains("bridge br0 is full") && text.contains("at most 1023 ports"),
            "{text}"
        );
        assert!(r.agent.records(None).is_empty());
        assert_eq!(r.agent.records.leased("n"), 0);
        // Another errno of the same step stays what it was.
        *r.links.fail.lock().unwrap() = Some("join_bridge");
        let e = r.agent.attach("vm1", req("a")).await.unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::INTERNAL, "{e}");
        r.agent.attach("vm1", req("a")).await.unwrap();
    }

    #[tokio::test]
    async fn failed_plug_leaves_no_record_or_lease() {
        let dir = tempfile::tempdir().unwrap();
        let r = rig(dir.path(), "10.9.0.254");
        *r.q1.fail.lock().unwrap() = Some("device_add");
        assert!(r.agent.attach("vm1", req("a")).await.is_err());
        assert!(r.agent.records(None).is_empty());
        assert_eq!(r.agent.records.leased("n"), 0);
        assert!(records_in(dir.path()).unwrap().is_empty());
        assert!(r.links.links.lock().unwrap().is_empty());
    }
}
