//! A simulated QEMU behind the [`Qmp`] seam, for tests without QEMU: q35
//! root ports, devices, netdevs and named fds, with `DEVICE_DELETED` events
//! and injectable failures. Paired with [`crate::links::fake::FakeLinks`] it
//! lets [`crate::backend::qemu::QemuBackend`] (and the whole agent) run
//! without root. Compiled for unit tests and with the `testing` feature,
//! never into a release binary.

use std::{
    collections::{HashMap, HashSet},
    os::fd::BorrowedFd,
    sync::Mutex,
};

use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::qemu::{
    CLASS_PCI_BRIDGE, DEV_PCIE_ROOT_PORT, DEV_Q35_HOST, VENDOR_INTEL, VENDOR_REDHAT,
};
use crate::qmp::{Qmp, QmpError, QmpEvent};

/// The simulated machine.
pub struct FakeQemu {
    /// Root ports `rp1..rpN`.
    pub ports: u32,
    /// device id -> (driver, bus).
    pub devices: Mutex<HashMap<String, (String, String)>>,
    /// netdev ids.
    pub netdevs: Mutex<HashSet<String>>,
    /// named fds.
    pub fds: Mutex<HashSet<String>>,
    /// Commands run.
    pub log: Mutex<Vec<String>>,
    /// A command that fails once.
    pub fail: Mutex<Option<&'static str>>,
    /// Whether the guest answers device_del.
    pub guest_releases: Mutex<bool>,
    /// QMP down.
    pub down: Mutex<bool>,
    events: broadcast::Sender<QmpEvent>,
}

impl FakeQemu {
    /// A q35 machine with `ports` root ports.
    pub fn new(ports: u32) -> FakeQemu {
        FakeQemu {
            ports,
            devices: Mutex::default(),
            netdevs: Mutex::default(),
            fds: Mutex::default(),
            log: Mutex::default(),
            fail: Mutex::default(),
            guest_releases: Mutex::new(true),
            down: Mutex::new(false),
            events: broadcast::channel(64).0,
        }
    }

    fn err(cmd: &str, desc: &str) -> QmpError {
        QmpError::Command {
            command: cmd.into(),
            class: "GenericError".into(),
            desc: desc.into(),
        }
    }

    /// Sends an event as QEMU would (`RESET` for a guest reboot).
    pub fn emit(&self, name: &str, data: Value) {
        let _ = self.events.send(QmpEvent {
            name: name.into(),
            data,
        });
    }

    pub(crate) fn query_pci(&self) -> Value {
        let devices = self.devices.lock().unwrap();
        let mut root = vec![
            json!({"slot": 0, "id": {"vendor": VENDOR_INTEL, "device": DEV_Q35_HOST}, "class_info": {"class": 0x0600}}),
        ];
        for i in 1..=self.ports {
            let id = format!("rp{i}");
            let children: Vec<Value> = devices
                .values()
                .filter(|(_, bus)| *bus == id)
                .map(|_| json!({"slot": 0, "id": {"vendor": 0x1af4, "device": 0x1000}}))
                .collect();
            root.push(json!({
                "slot": 2 + i, "qdev_id": id,
                "id": {"vendor": VENDOR_REDHAT, "device": DEV_PCIE_ROOT_PORT},
                "class_info": {"class": CLASS_PCI_BRIDGE},
                "pci_bridge": {"devices": children}
            }));
        }
        json!([{ "bus": 0, "devices": root }])
    }
}

#[async_trait::async_trait]
impl Qmp for FakeQemu {
    async fn execute(&self, cmd: &str, args: Value) -> Result<Value, QmpError> {
        // A real QMP command suspends the caller until QEMU answers.
        tokio::task::yield_now().await;
        if *self.down.lock().unwrap() {
            return Err(QmpError::Connect {
                path: "/fake".into(),
                source: std::io::Error::from_raw_os_error(libc::ECONNREFUSED),
            });
        }
        self.log.lock().unwrap().push(cmd.to_string());
        if *self.fail.lock().unwrap() == Some(cmd_static(cmd)) {
            *self.fail.lock().unwrap() = None;
            return Err(Self::err(cmd, "injected failure"));
        }
        let s = |k: &str| args[k].as_str().unwrap_or("").to_string();
        match cmd {
            "query-pci" => Ok(self.query_pci()),
            "qom-list" => Ok(Value::Array(
                self.devices
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|(id, (drv, _))| json!({"name": id, "type": format!("child<{drv}>")}))
                    .collect(),
            )),
            "human-monitor-command" => {
                let nd = self.netdevs.lock().unwrap();
                Ok(json!(nd
                    .iter()
                    .map(|n| format!("{n}: index=0,type=tap\r\n"))
                    .collect::<String>()))
            }
            "netdev_add" => {
                if !self.fds.lock().unwrap().remove(&s("fd")) {
                    return Err(Self::err(cmd, "No file descriptor named x found"));
                }
                self.netdevs.lock().unwrap().insert(s("id"));
                Ok(json!({}))
            }
            "device_add" => {
                let bus = s("bus");
                if self
                    .devices
                    .lock()
                    .unwrap()
                    .values()
                    .any(|(_, b)| *b == bus)
                {
                    return Err(Self::err(cmd, "Bus has no free slot"));
                }
                if !self.netdevs.lock().unwrap().contains(&s("netdev")) {
                    return Err(Self::err(cmd, "netdev not found"));
                }
                self.devices
                    .lock()
                    .unwrap()
                    .insert(s("id"), (s("driver"), bus));
                Ok(json!({}))
            }
            "device_del" => {
                let id = s("id");
                if !self.devices.lock().unwrap().contains_key(&id) {
                    return Err(Self::err(cmd, &format!("Device '{id}' not found")));
                }
                if *self.guest_releases.lock().unwrap() {
                    self.devices.lock().unwrap().remove(&id);
                    let _ = self.events.send(QmpEvent {
                        name: "DEVICE_DELETED".into(),
                        data: json!({"device": id}),
                    });
                }
                Ok(json!({}))
            }
            "netdev_del" => {
                if self.netdevs.lock().unwrap().remove(&s("id")) {
                    Ok(json!({}))
                } else {
                    Err(Self::err(cmd, "Device 'x' not found"))
                }
            }
            "closefd" => {
                if self.fds.lock().unwrap().remove(&s("fdname")) {
                    Ok(json!({}))
                } else {
                    Err(Self::err(cmd, "File descriptor named 'x' not found"))
                }
            }
            other => Err(QmpError::Command {
                command: other.into(),
                class: "CommandNotFound".into(),
                desc: "unknown".into(),
            }),
        }
    }

    async fn execute_with_fd(
        &self,
        cmd: &str,
        args: Value,
        _fd: BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        self.log.lock().unwrap().push(cmd.to_string());
        if *self.fail.lock().unwrap() == Some(cmd_static(cmd)) {
            *self.fail.lock().unwrap() = None;
            return Err(Self::err(cmd, "injected failure"));
        }
        self.fds
            .lock()
            .unwrap()
            .insert(args["fdname"].as_str().unwrap().to_string());
        Ok(json!({}))
    }

    fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    async fn connect(&self) -> Result<u64, QmpError> {
        if *self.down.lock().unwrap() {
            return Err(QmpError::Connect {
                path: "/fake".into(),
                source: std::io::Error::from_raw_os_error(libc::ECONNREFUSED),
            });
        }
        Ok(1)
    }

    fn generation(&self) -> u64 {
        1
    }
}

fn cmd_static(cmd: &str) -> &'static str {
    match cmd {
        "getfd" => "getfd",
        "netdev_add" => "netdev_add",
        "device_add" => "device_add",
        "device_del" => "device_del",
        "query-pci" => "query-pci",
        _ => "",
    }
}
