//! The qemu backend: a tap on the host bridge, hot-plugged over QMP.
//!
//! Plug, with each step undone if a later one fails:
//!
//! ```text
//! agent                          kernel                      QEMU (QMP)
//!   │ open /dev/net/tun, TUNSETIFF ─▶ tap nlh<id> (lives while an fd does)
//!   │ set master=bridge, mtu, up ───▶
//!   │ getfd fdname=nlf-<id> + SCM_RIGHTS(tap fd) ──────────────▶ holds a dup
//!   │ close own fd
//!   │ netdev_add type=tap id=nln-<id> fd=nlf-<id> ─────────────▶ takes the named fd
//!   │ device_add virtio-net-pci id=nl-<id> netdev mac bus=<slot> ▶ ACPI hot-plug
//! ```
//!
//! The tap is *not* persistent: QEMU's fd keeps it alive, so a crash of the
//! agent before `getfd` leaves no tap, and `netdev_del` (or QEMU exiting)
//! removes it. Unplug is `device_del`, waiting for `DEVICE_DELETED` (the guest
//! must release the device), then `netdev_del`, `closefd`, and a last delete
//! of the tap link in case something still held it.
//!
//! Slots: on q35 each `pcie-root-port` takes one device; a `pci-bridge` takes
//! 31; on i440fx the root bus `pci.0` takes the free slots of 32. Buses are
//! discovered with `query-pci` unless the configuration lists them.

use std::{
    collections::{HashMap, HashSet},
    os::fd::AsFd,
    sync::Arc,
    time::Duration,
};

use serde_json::Value;

use super::{BackendError, BackendEvent, BackendEvents, NicPlan, Plugged, VmBackend};
use crate::{
    lifecycle::Presence,
    links::HostLinks,
    names::{NicId, NicNames, QEMU_DEVICE_PREFIX, QEMU_NETDEV_PREFIX},
    qmp::{
        commands::{
            self, CloseFd, Command, DeviceAddVirtioNet, DeviceDel, GetFd, HumanMonitorCommand,
            NetdevAddTap, NetdevDel, QomList, QueryPci,
        },
        Qmp, QmpError, QmpEvent, DISCONNECTED_EVENT,
    },
};

pub(crate) const VENDOR_REDHAT: u64 = 0x1b36;
pub(crate) const VENDOR_INTEL: u64 = 0x8086;
pub(crate) const DEV_PCIE_ROOT_PORT: u64 = 0x000c;
const DEV_PCI_BRIDGE: u64 = 0x0001;
const DEV_IOH3420: u64 = 0x3420;
pub(crate) const DEV_Q35_HOST: u64 = 0x29c0;
pub(crate) const CLASS_PCI_BRIDGE: u64 = 0x0604;

/// A bus a NIC can be hot-plugged on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HotplugBus {
    /// The id `device_add bus=` takes.
    pub id: String,
    /// How many devices it takes.
    pub capacity: u32,
    /// How many it has.
    pub used: u32,
}

/// The hot-pluggable buses described by a `query-pci` reply.
pub fn hotplug_buses(query_pci: &Value) -> Vec<HotplugBus> {
    let mut out = Vec::new();
    let Some(buses) = query_pci.as_array() else {
        return out;
    };
    let root = buses.iter().find(|b| b["bus"].as_u64() == Some(0));
    let root_devices = root
        .and_then(|b| b["devices"].as_array())
        .cloned()
        .unwrap_or_default();
    let is_q35 = root_devices.iter().any(|d| {
        d["id"]["vendor"].as_u64() == Some(VENDOR_INTEL)
            && d["id"]["device"].as_u64() == Some(DEV_Q35_HOST)
    });
    if !is_q35 && root.is_some() {
        out.push(HotplugBus {
            id: "pci.0".into(),
            capacity: 32,
            used: slots_used(&root_devices),
        });
    }
    fn walk(devices: &[Value], out: &mut Vec<HotplugBus>) {
        for d in devices {
            let Some(bridge) = d.get("pci_bridge") else {
                continue;
            };
            let children = bridge["devices"].as_array().cloned().unwrap_or_default();
            let id = d["qdev_id"].as_str().unwrap_or("");
            let vendor = d["id"]["vendor"].as_u64();
            let device = d["id"]["device"].as_u64();
            let class = d["class_info"]["class"].as_u64();
            let capacity = match (vendor, device) {
                (Some(VENDOR_REDHAT), Some(DEV_PCIE_ROOT_PORT))
                | (Some(VENDOR_INTEL), Some(DEV_IOH3420)) => Some(1),
                (Some(VENDOR_REDHAT), Some(DEV_PCI_BRIDGE)) => Some(31),
                _ if class == Some(CLASS_PCI_BRIDGE) => None,
                _ => None,
            };
            if let (Some(capacity), false) = (capacity, id.is_empty()) {
                out.push(HotplugBus {
                    id: id.to_string(),
                    capacity,
                    used: slots_used(&children),
                });
            }
            walk(&children, out);
        }
    }
    for b in buses {
        walk(
            b["devices"].as_array().map(Vec::as_slice).unwrap_or(&[]),
            &mut out,
        );
    }
    out
}

fn slots_used(devices: &[Value]) -> u32 {
    devices
        .iter()
        .filter_map(|d| d["slot"].as_u64())
        .collect::<HashSet<_>>()
        .len() as u32
}

/// Natural order of bus ids, so that `rp2` comes before `rp10`.
fn natural_key(id: &str) -> (String, u64) {
    let digits = id.len() - id.chars().rev().take_while(|c| c.is_ascii_digit()).count();
    (id[..digits].to_string(), id[digits..].parse().unwrap_or(0))
}

/// Picks the bus for the next NIC: the first single-device port that is
/// free, else the bridge or root bus with a free slot. `configured` restricts
/// the choice when not empty.
pub fn choose_slot(buses: &[HotplugBus], configured: &[String]) -> Result<String, String> {
    let mut candidates: Vec<&HotplugBus> = if configured.is_empty() {
        buses.iter().collect()
    } else {
        let mut v = Vec::new();
        for c in configured {
            match buses.iter().find(|b| &b.id == c) {
                Some(b) => v.push(b),
                None => {
                    return Err(format!(
                        "configured hot-plug slot {c:?} is not a hot-pluggable bus of this VM"
                    ))
                }
            }
        }
        v
    };
    if candidates.is_empty() {
        return Err(
            "the VM has no pcie-root-port, pci-bridge or i440fx root bus with an id".into(),
        );
    }
    candidates.sort_by_key(|b| (b.capacity != 1, natural_key(&b.id)));
    candidates
        .iter()
        .find(|b| b.used < b.capacity)
        .map(|b| b.id.clone())
        .ok_or_else(|| format!("all {} hot-plug buses are full", candidates.len()))
}

/// The qemu backend of one VM.
pub struct QemuBackend {
    vm: String,
    qmp: Arc<dyn Qmp>,
    links: Arc<dyn HostLinks>,
    slots: Vec<String>,
    unplug_timeout: Duration,
}

impl QemuBackend {
    /// The backend of VM `vm`.
    pub fn new(
        vm: &str,
        qmp: Arc<dyn Qmp>,
        links: Arc<dyn HostLinks>,
        slots: Vec<String>,
        unplug_timeout: Duration,
    ) -> QemuBackend {
        QemuBackend {
            vm: vm.to_string(),
            qmp,
            links,
            slots,
            unplug_timeout,
        }
    }

    fn qmp_err(&self, source: QmpError) -> BackendError {
        BackendError::Qmp {
            vm: self.vm.clone(),
            source,
        }
    }

    async fn run<C: Command>(&self, cmd: &C) -> Result<C::Reply, BackendError> {
        commands::run(self.qmp.as_ref(), cmd)
            .await
            .map_err(|e| self.qmp_err(e))
    }

    /// Runs a removal command; "not found" counts as done.
    async fn remove<C: Command>(&self, cmd: &C) -> Result<(), BackendError> {
        match commands::run(self.qmp.as_ref(), cmd).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(self.qmp_err(e)),
        }
    }

    /// Ids of the user-created devices (`/machine/peripheral`).
    async fn devices(&self) -> Result<HashSet<String>, BackendError> {
        let list = self
            .run(&QomList {
                path: "/machine/peripheral",
            })
            .await?;
        Ok(list
            .into_iter()
            .filter(|p| p.kind.starts_with("child<") && !p.name.is_empty())
            .map(|p| p.name)
            .collect())
    }

    /// Ids of the netdevs (QMP has no query for them in QEMU 7.2: read HMP).
    async fn netdevs(&self) -> Result<HashSet<String>, BackendError> {
        let text = self
            .run(&HumanMonitorCommand {
                command_line: "info network",
            })
            .await?;
        Ok(text
            .split(|c: char| c.is_whitespace() || c == '\\')
            .filter_map(|w| w.strip_suffix(':'))
            .map(str::to_string)
            .collect())
    }

    async fn choose(&self) -> Result<String, BackendError> {
        let pci = self.run(&QueryPci).await?;
        choose_slot(&hotplug_buses(&pci), &self.slots).map_err(|detail| BackendError::NoFreeSlot {
            vm: self.vm.clone(),
            detail,
        })
    }

    async fn plug_steps(
        &self,
        nic: &NicPlan,
        names: &NicNames,
        slot: &str,
    ) -> Result<(), BackendError> {
        let tap = self.links.open_tap(&names.host_if)?;
        self.links
            .join_bridge(&names.host_if, &nic.bridge, nic.mtu)
            .await
            .map_err(|e| BackendError::joining(&nic.bridge, e))?;
        let getfd = GetFd {
            fdname: &names.fd_name,
        };
        commands::run_with_fd(self.qmp.as_ref(), &getfd, tap.as_fd())
            .await
            .map_err(|e| self.qmp_err(e))?;
        // QEMU holds its own copy now; ours must not keep the tap alive.
        drop(tap);
        self.run(&NetdevAddTap::new(&names.netdev, &names.fd_name))
            .await?;
        self.run(&DeviceAddVirtioNet::new(
            &names.device,
            &names.netdev,
            nic.mac,
            slot,
            nic.mtu,
        ))
        .await?;
        Ok(())
    }

    async fn wait_deleted(
        &self,
        device: &str,
        events: &mut tokio::sync::broadcast::Receiver<crate::qmp::QmpEvent>,
    ) -> Result<bool, BackendError> {
        let deadline = tokio::time::Instant::now() + self.unplug_timeout;
        loop {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Err(_) => return Ok(false),
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {
                    // Missed events: ask QEMU directly.
                    if !self.devices().await?.contains(device) {
                        return Ok(true);
                    }
                }
                Ok(Err(_)) => return Ok(false),
                Ok(Ok(ev))
                    if ev.name == "DEVICE_DELETED"
                        && ev.data["device"].as_str() == Some(device) =>
                {
                    return Ok(true)
                }
                Ok(Ok(ev)) if ev.name == DISCONNECTED_EVENT => {
                    return Err(self.qmp_err(QmpError::Disconnected {
                        path: Default::default(),
                        command: format!("device_del {device}"),
                    }))
                }
                Ok(Ok(_)) => {}
            }
        }
    }
}

#[async_trait::async_trait]
impl VmBackend for QemuBackend {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    async fn plug(&self, nic: &NicPlan) -> Result<Plugged, BackendError> {
        let slot = self.choose().await?;
        let names = nic.id.names();
        if let Err(e) = self.plug_steps(nic, &names, &slot).await {
            if let Err(undo) = self.unplug(&nic.id).await {
                log::warn!("VM {}: rollback of NIC {} failed: {undo}", self.vm, nic.id);
            }
            return Err(e);
        }
        Ok(Plugged { slot: Some(slot) })
    }

    async fn unplug(&self, id: &NicId) -> Result<(), BackendError> {
        let names = id.names();
        if self.devices().await?.contains(&names.device) {
            let mut events = self.qmp.subscribe();
            let del = DeviceDel { id: &names.device };
            match commands::run(self.qmp.as_ref(), &del).await {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                // A second device_del while the first is pending is refused: keep waiting.
                Err(QmpError::Command { ref desc, .. })
                    if desc.contains("in progress") || desc.contains("already") => {}
                Err(e) => return Err(self.qmp_err(e)),
            }
            if !self.wait_deleted(&names.device, &mut events).await?
                && self.devices().await?.contains(&names.device)
            {
                return Err(BackendError::UnplugTimeout {
                    vm: self.vm.clone(),
                    device: names.device,
                    after: self.unplug_timeout,
                });
            }
        }
        self.remove(&NetdevDel { id: &names.netdev }).await?;
        self.remove(&CloseFd {
            fdname: &names.fd_name,
        })
        .await?;
        self.links.delete(&names.host_if).await?;
        Ok(())
    }

    /// A NIC is present when QEMU has its device and the host has its tap
    /// ([`super::device_and_tap_presence`]).
    async fn presence(&self, ids: &[NicId]) -> HashMap<NicId, Presence> {
        let devices = self
            .devices()
            .await
            .map(|d| move |id: &NicId| d.contains(&id.names().device));
        super::device_and_tap_presence(&self.vm, "its devices", ids, devices, &*self.links).await
    }

    async fn orphans(&self, known: &[NicId]) -> Result<Vec<NicId>, BackendError> {
        let mut ids: HashSet<NicId> = HashSet::new();
        for name in self
            .devices()
            .await?
            .iter()
            .chain(self.netdevs().await?.iter())
        {
            if name.starts_with(QEMU_DEVICE_PREFIX) || name.starts_with(QEMU_NETDEV_PREFIX) {
                if let Some(id) = NicNames::id_from_name(name) {
                    ids.insert(id);
                }
            }
        }
        let known: HashSet<&NicId> = known.iter().collect();
        let mut out: Vec<NicId> = ids.into_iter().filter(|id| !known.contains(id)).collect();
        out.sort();
        Ok(out)
    }

    async fn probe(&self) -> Result<u64, BackendError> {
        self.qmp.connect().await.map_err(|e| self.qmp_err(e))
    }

    fn events(&self) -> BackendEvents {
        BackendEvents::qmp(self.qmp.subscribe())
    }
}

/// What a QMP event tells the agent: `RESET` (a guest reboot, or
/// `system_reset`) that the guest restarted; the deletion of one of the
/// agent's devices (the guest may eject one itself) or a lost connection
/// that the NICs may have changed. `None` for the rest.
pub(crate) fn event(ev: &QmpEvent) -> Option<BackendEvent> {
    match ev.name.as_str() {
        "RESET" => Some(BackendEvent::GuestRestarted),
        "DEVICE_DELETED"
            if ev.data["device"]
                .as_str()
                .is_some_and(|d| d.starts_with(QEMU_DEVICE_PREFIX)) =>
        {
            Some(BackendEvent::Changed)
        }
        DISCONNECTED_EVENT => Some(BackendEvent::Changed),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fake::FakeQemu;
    use crate::links::fake::FakeLinks;
    use serde_json::json;

    fn plan(id: &str) -> NicPlan {
        NicPlan {
            id: id.parse().unwrap(),
            mac: "52:54:00:00:00:01".parse().unwrap(),
            bridge: "br0".into(),
            mtu: 1500,
        }
    }

    fn backend(ports: u32) -> (Arc<FakeQemu>, Arc<FakeLinks>, QemuBackend) {
        let q = Arc::new(FakeQemu::new(ports));
        let l = Arc::new(FakeLinks::default());
        let b = QemuBackend::new(
            "vm1",
            q.clone(),
            l.clone(),
            vec![],
            Duration::from_millis(200),
        );
        (q, l, b)
    }

    #[test]
    fn slot_choice() {
        let bus = |id: &str, capacity, used| HotplugBus {
            id: id.into(),
            capacity,
            used,
        };
        let buses = vec![
            bus("rp10", 1, 0),
            bus("rp2", 1, 1),
            bus("rp3", 1, 0),
            bus("br1", 31, 30),
        ];
        assert_eq!(
            choose_slot(&buses, &[]).unwrap(),
            "rp3",
            "natural order, free ports first"
        );
        assert_eq!(choose_slot(&buses, &["rp10".into()]).unwrap(), "rp10");
        assert!(choose_slot(&buses, &["rp2".into()])
            .unwrap_err()
            .contains("full"));
        assert!(choose_slot(&buses, &["nope".into()])
            .unwrap_err()
            .contains("\"nope\""));
        let full = vec![bus("rp1", 1, 1), bus("br1", 31, 30)];
        assert_eq!(choose_slot(&full, &[]).unwrap(), "br1");
        assert!(choose_slot(&[], &[]).is_err());
    }

    #[test]
    fn parses_query_pci_of_q35_and_i440fx() {
        let q = FakeQemu::new(3);
        let buses = hotplug_buses(&q.query_pci());
        assert_eq!(
            buses.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(),
            ["rp1", "rp2", "rp3"]
        );
        assert!(buses.iter().all(|b| b.capacity == 1 && b.used == 0));
        let pc = json!([{ "bus": 0, "devices": [
            {"slot": 0, "id": {"vendor": VENDOR_INTEL, "device": 0x1237}},
            {"slot": 1, "function": 0, "id": {"vendor": VENDOR_INTEL, "device": 0x7000}},
            {"slot": 1, "function": 1, "id": {"vendor": VENDOR_INTEL, "device": 0x7010}},
            {"slot": 2, "id": {"vendor": 0x1234, "device": 0x1111}}
        ]}]);
        assert_eq!(
            hotplug_buses(&pc),
            vec![HotplugBus {
                id: "pci.0".into(),
                capacity: 32,
                used: 3
            }]
        );
    }

    #[tokio::test]
    async fn plug_and_unplug_leave_nothing() {
        let (q, l, b) = backend(2);
        let p = b.plug(&plan("00000000a1")).await.unwrap();
        assert_eq!(p.slot.as_deref(), Some("rp1"));
        let p2 = b.plug(&plan("00000000a2")).await.unwrap();
        assert_eq!(p2.slot.as_deref(), Some("rp2"));
        let e = b.plug(&plan("00000000a3")).await.unwrap_err();
        assert!(matches!(e, BackendError::NoFreeSlot { .. }), "{e}");
        let ids: Vec<NicId> = ["00000000a1", "00000000a2"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert!(b
            .presence(&ids)
            .await
            .values()
            .all(|p| *p == Presence::Present));
        for id in &ids {
            b.unplug(id).await.unwrap();
            b.unplug(id).await.unwrap(); // idempotent
        }
        assert!(q.devices.lock().unwrap().is_empty());
        assert!(q.netdevs.lock().unwrap().is_empty());
        assert!(q.fds.lock().unwrap().is_empty());
        assert!(l.links.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn every_failing_step_is_rolled_back() {
        for step in ["getfd", "netdev_add", "device_add"] {
            let (q, l, b) = backend(1);
            *q.fail.lock().unwrap() = Some(step);
            let e = b.plug(&plan("00000000b1")).await.unwrap_err();
            assert!(e.to_string().contains(step), "{step}: {e}");
            assert!(q.devices.lock().unwrap().is_empty(), "{step}: device left");
            assert!(q.netdevs.lock().unwrap().is_empty(), "{step}: netdev left");
            assert!(q.fds.lock().unwrap().is_empty(), "{step}: fd left");
            assert!(l.links.lock().unwrap().is_empty(), "{step}: tap left");
        }
        let (_q, l, b) = backend(1);
        *l.fail.lock().unwrap() = Some("join_bridge");
        assert!(b.plug(&plan("00000000b2")).await.is_err());
        assert!(l.links.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn unplug_times_out_when_the_guest_keeps_the_device() {
        let (q, _l, b) = backend(1);
        b.plug(&plan("00000000c1")).await.unwrap();
        *q.guest_releases.lock().unwrap() = false;
        let e = b.unplug(&"00000000c1".parse().unwrap()).await.unwrap_err();
        assert!(matches!(e, BackendError::UnplugTimeout { .. }), "{e}");
        assert_eq!(
            q.netdevs.lock().unwrap().len(),
            1,
            "netdev kept while the device is"
        );
    }

    #[tokio::test]
    async fn orphans_and_unreachable_qemu() {
        let (q, _l, b) = backend(2);
        b.plug(&plan("00000000d1")).await.unwrap();
        b.plug(&plan("00000000d2")).await.unwrap();
        let known: Vec<NicId> = vec!["00000000d1".parse().unwrap()];
        assert_eq!(
            b.orphans(&known).await.unwrap(),
            vec!["00000000d2".parse::<NicId>().unwrap()]
        );
        *q.down.lock().unwrap() = true;
        assert!(b
            .presence(&known)
            .await
            .values()
            .all(|p| *p == Presence::Unknown));
        assert!(b.probe().await.unwrap_err().is_unavailable());
    }
}
