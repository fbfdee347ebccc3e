//! The QMP commands the qemu backend sends, typed: each is a struct that
//! serialises to exactly the `arguments` object QEMU expects, with the type
//! of its `return` value. [`run`] sends one over any [`Qmp`] and decodes the
//! reply, so no caller builds JSON by hand.
//!
//! ```text
//! plug:    getfd(nlf-<id>) + SCM_RIGHTS ─▶ netdev_add(tap, nln-<id>, fd=nlf-<id>)
//!          ─▶ device_add(virtio-net-pci, nl-<id>, mac, bus)
//! unplug:  device_del(nl-<id>) … DEVICE_DELETED ─▶ netdev_del(nln-<id>) ─▶ closefd(nlf-<id>)
//! look:    query-pci (slots), qom-list /machine/peripheral (devices),
//!          human-monitor-command "info network" (netdevs)
//! ```

use std::os::fd::BorrowedFd;

use serde::{de::DeserializeOwned, de::IgnoredAny, Deserialize, Serialize};
use serde_json::Value;

use super::{Qmp, QmpError};

/// A QMP command: its name, its arguments (the struct itself) and its reply.
pub trait Command: Serialize + Sync {
    /// The command's name (`execute`).
    const NAME: &'static str;
    /// What its `return` decodes into ([`IgnoredAny`] when nothing is read).
    type Reply: DeserializeOwned;
}

/// Sends `cmd` and decodes its reply.
pub async fn run<C: Command>(qmp: &dyn Qmp, cmd: &C) -> Result<C::Reply, QmpError> {
    let reply = qmp.execute(C::NAME, arguments(cmd)?).await?;
    decode::<C>(reply)
}

/// Sends `cmd` with `fd` attached as SCM_RIGHTS (for [`GetFd`]).
pub async fn run_with_fd<C: Command>(
    qmp: &dyn Qmp,
    cmd: &C,
    fd: BorrowedFd<'_>,
) -> Result<C::Reply, QmpError> {
    let reply = qmp.execute_with_fd(C::NAME, arguments(cmd)?, fd).await?;
    decode::<C>(reply)
}

fn arguments<C: Command>(cmd: &C) -> Result<Value, QmpError> {
    serde_json::to_value(cmd).map_err(|e| QmpError::Encode {
        command: C::NAME,
        detail: e.to_string(),
    })
}

fn decode<C: Command>(reply: Value) -> Result<C::Reply, QmpError> {
    serde_json::from_value(reply.clone()).map_err(|e| QmpError::BadReply {
        command: C::NAME,
        detail: format!("{e}, got {reply}"),
    })
}

/// `getfd`: QEMU keeps the fd sent with the command under `fdname`.
#[derive(Debug, Serialize)]
pub struct GetFd<'a> {
    /// The name later commands use (`nlf-<id>`).
    pub fdname: &'a str,
}

impl Command for GetFd<'_> {
    const NAME: &'static str = "getfd";
    type Reply = IgnoredAny;
}

/// `closefd`: QEMU closes a named fd it still holds.
#[derive(Debug, Serialize)]
pub struct CloseFd<'a> {
    /// The fd's name.
    pub fdname: &'a str,
}

impl Command for CloseFd<'_> {
    const NAME: &'static str = "closefd";
    type Reply = IgnoredAny;
}

/// `netdev_add` of a tap netdev over a named fd (no vhost).
#[derive(Debug, Serialize)]
pub struct NetdevAddTap<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    /// The netdev id (`nln-<id>`).
    pub id: &'a str,
    /// The name of the tap's fd, given with [`GetFd`].
    pub fd: &'a str,
    vhost: bool,
}

impl<'a> NetdevAddTap<'a> {
    /// A tap netdev `id` on the fd named `fd`.
    pub fn new(id: &'a str, fd: &'a str) -> NetdevAddTap<'a> {
        NetdevAddTap {
            kind: "tap",
            id,
            fd,
            vhost: false,
        }
    }
}

impl Command for NetdevAddTap<'_> {
    const NAME: &'static str = "netdev_add";
    type Reply = IgnoredAny;
}

/// `netdev_del`.
#[derive(Debug, Serialize)]
pub struct NetdevDel<'a> {
    /// The netdev id.
    pub id: &'a str,
}

impl Command for NetdevDel<'_> {
    const NAME: &'static str = "netdev_del";
    type Reply = IgnoredAny;
}

/// `device_add` of a virtio-net-pci NIC on a hot-plug bus.
#[derive(Debug, Serialize)]
pub struct DeviceAddVirtioNet<'a> {
    driver: &'static str,
    /// The device id (`nl-<id>`).
    pub id: &'a str,
    /// Its netdev.
    pub netdev: &'a str,
    /// The MAC the guest sees (`52:54:00:…`).
    pub mac: String,
    /// The bus (a pcie-root-port id, a pci-bridge, or `pci.0`).
    pub bus: &'a str,
    /// No option ROM (no PXE boot from a hot-plugged NIC).
    romfile: &'static str,
    /// The MTU the device advertises; absent for the default 1500.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_mtu: Option<u32>,
}

impl<'a> DeviceAddVirtioNet<'a> {
    /// Device `id` on `netdev` with `mac` on `bus`; `mtu` is advertised to
    /// the guest unless it is 1500.
    pub fn new(
        id: &'a str,
        netdev: &'a str,
        mac: nestless_model::MacAddr,
        bus: &'a str,
        mtu: u32,
    ) -> DeviceAddVirtioNet<'a> {
        DeviceAddVirtioNet {
            driver: "virtio-net-pci",
            id,
            netdev,
            mac: mac.to_string(),
            bus,
            romfile: "",
            host_mtu: (mtu != 1500).then_some(mtu),
        }
    }
}

impl Command for DeviceAddVirtioNet<'_> {
    const NAME: &'static str = "device_add";
    type Reply = IgnoredAny;
}

/// `device_del`: asks the guest to release a device (ACPI hot-unplug); the
/// device is gone at `DEVICE_DELETED`.
#[derive(Debug, Serialize)]
pub struct DeviceDel<'a> {
    /// The device id.
    pub id: &'a str,
}

impl Command for DeviceDel<'_> {
    const NAME: &'static str = "device_del";
    type Reply = IgnoredAny;
}

/// `query-pci`: the PCI buses and their devices, read by
/// [`crate::backend::qemu::hotplug_buses`].
#[derive(Debug, Serialize)]
pub struct QueryPci;

impl Command for QueryPci {
    const NAME: &'static str = "query-pci";
    type Reply = Value;
}

/// `qom-list`: the properties (children among them) of a QOM path.
#[derive(Debug, Serialize)]
pub struct QomList<'a> {
    /// The path, e.g. `/machine/peripheral` (user-created devices).
    pub path: &'a str,
}

impl Command for QomList<'_> {
    const NAME: &'static str = "qom-list";
    type Reply = Vec<ObjectProperty>;
}

/// One entry of a `qom-list` reply.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ObjectProperty {
    /// The property's name (a device id under `/machine/peripheral`).
    #[serde(default)]
    pub name: String,
    /// Its type; `child<virtio-net-pci>` for a device.
    #[serde(default, rename = "type")]
    pub kind: String,
}

/// `human-monitor-command`: an HMP command line (QEMU 7.2 has no QMP query
/// for netdevs; `info network` lists them).
#[derive(Debug, Serialize)]
pub struct HumanMonitorCommand<'a> {
    /// The HMP command.
    #[serde(rename = "command-line")]
    pub command_line: &'a str,
}

impl Command for HumanMonitorCommand<'_> {
    const NAME: &'static str = "human-monitor-command";
    type Reply = String;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args<C: Command>(c: &C) -> Value {
        arguments(c).unwrap()
    }

    #[test]
    fn commands_serialise_to_what_qemu_takes() {
        assert_eq!(args(&GetFd { fdname: "nlf-1" }), json!({"fdname": "nlf-1"}));
        assert_eq!(
            args(&NetdevAddTap::new("nln-1", "nlf-1")),
            json!({"type": "tap", "id": "nln-1", "fd": "nlf-1", "vhost": false})
        );
        let mac = "52:54:00:00:00:01".parse().unwrap();
        assert_eq!(
            args(&DeviceAddVirtioNet::new("nl-1", "nln-1", mac, "rp1", 1500)),
            json!({"driver": "virtio-net-pci", "id": "nl-1", "netdev": "nln-1",
                   "mac": "52:54:00:00:00:01", "bus": "rp1", "romfile": ""})
        );
        assert_eq!(
            args(&DeviceAddVirtioNet::new("nl-1", "nln-1", mac, "rp1", 9000))["host_mtu"],
            json!(9000)
        );
        assert_eq!(args(&DeviceDel { id: "nl-1" }), json!({"id": "nl-1"}));
        assert_eq!(args(&NetdevDel { id: "nln-1" }), json!({"id": "nln-1"}));
        assert_eq!(
            args(&CloseFd { fdname: "nlf-1" }),
            json!({"fdname": "nlf-1"})
        );
        assert_eq!(args(&QueryPci), Value::Null, "no arguments");
        assert_eq!(
            args(&QomList {
                path: "/machine/peripheral"
            }),
            json!({"path": "/machine/peripheral"})
        );
        assert_eq!(
            args(&HumanMonitorCommand {
                command_line: "info network"
            }),
            json!({"command-line": "info network"})
        );
    }

    #[test]
    fn replies_decode_or_name_the_command() {
        let list =
            decode::<QomList>(json!([{"name": "nl-1", "type": "child<virtio-net-pci>"}])).unwrap();
        assert_eq!(list[0].kind, "child<virtio-net-pci>");
        let e = decode::<QomList>(json!({"not": "a list"})).unwrap_err();
        assert!(
            e.to_string().contains("unexpected reply to QMP qom-list"),
            "{e}"
        );
        assert!(decode::<DeviceDel>(json!({})).is_ok());
    }
}
