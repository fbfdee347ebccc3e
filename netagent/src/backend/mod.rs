//! The hot-plug seam: how a VM gets a NIC.
//!
//! A [`VmBackend`] plugs and unplugs one NIC at a time for one VM and can say
//! which of the agent's NICs it still has. The agent calls it with the VM's
//! operation lock held, so a backend never sees two operations on one VM at once.
//!
//! * [`qemu::QemuBackend`]: a tap on the host bridge, hot-plugged as a
//!   virtio-net-pci device over QMP.
//! * [`netns::NetnsBackend`]: the "VM" is a network namespace; the NIC is the
//!   guest end of a veth pair whose host end is on the bridge.
//! * [`libvirt::LibvirtBackend`]: a tap on the host bridge, hot-plugged
//!   through libvirt as an unmanaged ethernet interface (XML in [`domxml`]).
//! * [`fake`] (tests and the `testing` feature): `FakeQemu`, a simulated QEMU
//!   behind the QMP seam.

pub mod domxml;
#[cfg(any(test, feature = "testing"))]
pub mod fake;
pub mod libvirt;
#[cfg(feature = "libvirt")]
pub mod libvirt_events;
pub mod netns;
pub mod qemu;

use std::{collections::HashMap, path::PathBuf, time::Duration};

use nestless_model::MacAddr;

use crate::{lifecycle::Presence, links::LinkError, names::NicId, qmp::QmpError};

/// What a backend needs to plug one NIC.
#[derive(Debug, Clone)]
pub struct NicPlan {
    /// The NIC's id (all names derive from it).
    pub id: NicId,
    /// The MAC the guest will see.
    pub mac: MacAddr,
    /// The host bridge.
    pub bridge: String,
    /// MTU.
    pub mtu: u32,
}

/// What plugging produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plugged {
    /// Hot-plug bus used (qemu).
    pub slot: Option<String>,
}

/// Backend failures.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A host link operation failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// QMP failed.
    #[error("VM {vm}: {source}")]
    Qmp {
        /// The VM.
        vm: String,
        /// The QMP failure.
        source: QmpError,
    },
    /// libvirt failed.
    #[error("VM {vm}: {source}")]
    Libvirt {
        /// The VM.
        vm: String,
        /// The libvirt failure.
        source: libvirt::LibvirtError,
    },
    /// The backend is not built in (a cargo feature left out).
    #[error("VM {vm}: backend {kind:?} is not built into this nestless-netagent")]
    Unsupported {
        /// The VM.
        vm: String,
        /// The backend.
        kind: &'static str,
    },
    /// No hot-plug slot is free.
    #[error("VM {vm} has no free hot-plug slot ({detail})")]
    NoFreeSlot {
        /// The VM.
        vm: String,
        /// What was considered.
        detail: String,
    },
    /// The guest did not give the device back.
    #[error("VM {vm} did not release device {device} within {after:?} (does the guest handle ACPI hot-unplug?)")]
    UnplugTimeout {
        /// The VM.
        vm: String,
        /// The device id.
        device: String,
        /// How long the agent waited.
        after: Duration,
    },
    /// The bridge has as many ports as the kernel allows
    /// ([`crate::config::BRIDGE_MAX_PORTS`]; `EXFULL`).
    #[error("bridge {bridge} is full: a Linux bridge holds at most {max} ports; no NIC can join it until one leaves (spread the network's VMs over more networks, or lower their max_nics)", max = crate::config::BRIDGE_MAX_PORTS)]
    BridgeFull {
        /// The bridge.
        bridge: String,
    },
    /// The VM's network namespace cannot be used.
    #[error("network namespace {path} of VM {vm} is unusable: {source}")]
    Netns {
        /// The VM.
        vm: String,
        /// The namespace path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl BackendError {
    /// The error of joining a NIC's host end to `bridge`: the kernel's
    /// `EXFULL` (every port taken) is [`BackendError::BridgeFull`].
    pub fn joining(bridge: &str, e: LinkError) -> BackendError {
        if e.source.raw_os_error() == Some(libc::EXFULL) {
            BackendError::BridgeFull {
                bridge: bridge.to_string(),
            }
        } else {
            BackendError::Link(e)
        }
    }

    /// True when the VM (QEMU, its namespace) cannot be reached right now.
    pub fn is_unavailable(&self) -> bool {
        match self {
            BackendError::Qmp { source, .. } => source.is_unavailable(),
            BackendError::Netns { .. } => true,
            BackendError::Libvirt { source, .. } => source.is_unavailable(),
            _ => false,
        }
    }
}

/// The presence of each of `ids` in a VM that has a device per NIC and a
/// tap per NIC on the host: `Present` when the VM's own view (`in_vm`, what
/// the backend read from QEMU or libvirt, or why it could not) has the NIC
/// and the host has its tap; `Gone` when either lacks it (a device whose
/// tap someone deleted carries nothing any more); `Unknown` for every NIC
/// when either could not be read (logged, naming `vm` and `what` was read).
pub(crate) async fn device_and_tap_presence<E: std::fmt::Display>(
    vm: &str,
    what: &str,
    ids: &[NicId],
    in_vm: Result<impl Fn(&NicId) -> bool, E>,
    links: &dyn crate::links::HostLinks,
) -> HashMap<NicId, Presence> {
    let unknown = || {
        ids.iter()
            .map(|id| (id.clone(), Presence::Unknown))
            .collect()
    };
    let in_vm = match in_vm {
        Ok(f) => f,
        Err(e) => {
            log::warn!("VM {vm}: cannot read {what}: {e}");
            return unknown();
        }
    };
    let taps = match links.names(crate::names::HOST_IF_PREFIX).await {
        Ok(t) => t,
        Err(e) => {
            log::warn!("VM {vm}: cannot list taps: {e}");
            return unknown();
        }
    };
    ids.iter()
        .map(|id| {
            let p = if in_vm(id) && taps.contains(&id.names().host_if) {
                Presence::Present
            } else {
                Presence::Gone
            };
            (id.clone(), p)
        })
        .collect()
}

/// What a VM reports by itself, without being asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendEvent {
    /// The guest restarted (QEMU's `RESET`): its pods are gone, and with
    /// them every use of the NICs given to sandboxes.
    GuestRestarted,
    /// Something about the VM's NICs may have changed (a device the guest
    /// dropped, a lost connection): check them.
    Changed,
}

/// A VM's own reports ([`VmBackend::events`]).
pub struct BackendEvents(Source);

enum Source {
    None,
    Qmp(tokio::sync::broadcast::Receiver<crate::qmp::QmpEvent>),
    #[cfg(feature = "libvirt")]
    Libvirt {
        rx: tokio::sync::broadcast::Receiver<libvirt_events::DomainEvent>,
        domain: String,
    },
}

impl BackendEvents {
    /// A backend that reports nothing: [`BackendEvents::next`] never returns.
    pub fn none() -> BackendEvents {
        BackendEvents(Source::None)
    }

    /// The reports of a QMP connection.
    pub fn qmp(rx: tokio::sync::broadcast::Receiver<crate::qmp::QmpEvent>) -> BackendEvents {
        BackendEvents(Source::Qmp(rx))
    }

    /// The reports libvirt makes about domain `domain`.
    #[cfg(feature = "libvirt")]
    pub fn libvirt(
        rx: tokio::sync::broadcast::Receiver<libvirt_events::DomainEvent>,
        domain: &str,
    ) -> BackendEvents {
        BackendEvents(Source::Libvirt {
            rx,
            domain: domain.to_string(),
        })
    }

    /// The next report.
    pub async fn next(&mut self) -> BackendEvent {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match &mut self.0 {
                Source::None => return std::future::pending().await,
                Source::Qmp(rx) => match rx.recv().await {
                    Ok(ev) => {
                        if let Some(e) = qemu::event(&ev) {
                            return e;
                        }
                    }
                    Err(RecvError::Lagged(_)) => return BackendEvent::Changed,
                    Err(RecvError::Closed) => self.0 = Source::None,
                },
                #[cfg(feature = "libvirt")]
                Source::Libvirt { rx, domain } => match rx.recv().await {
                    Ok(ev) => {
                        if let Some(e) = libvirt::event(&ev, domain) {
                            return e;
                        }
                    }
                    Err(RecvError::Lagged(_)) => return BackendEvent::Changed,
                    Err(RecvError::Closed) => self.0 = Source::None,
                },
            }
        }
    }
}

/// One VM's way of getting NICs.
#[async_trait::async_trait]
pub trait VmBackend: Send + Sync {
    /// `qemu`, `netns` or `libvirt`.
    fn kind(&self) -> &'static str;
    /// Creates the host side and plugs the NIC into the VM. On failure it
    /// undoes its own steps before returning.
    async fn plug(&self, nic: &NicPlan) -> Result<Plugged, BackendError>;
    /// Removes whatever exists of the NIC (device, netdev, tap, veth).
    /// Idempotent: removing a NIC that is gone succeeds.
    async fn unplug(&self, id: &NicId) -> Result<(), BackendError>;
    /// Whether each NIC is still in the VM.
    async fn presence(&self, ids: &[NicId]) -> HashMap<NicId, Presence>;
    /// Ids of the agent's objects the VM holds that are not in `known`
    /// (left by a crash between steps); the host's links are swept by the agent.
    async fn orphans(&self, known: &[NicId]) -> Result<Vec<NicId>, BackendError>;
    /// Checks that the VM can be reached; returns its generation, which
    /// changes when the VM was restarted (a new QEMU connection, a new
    /// namespace at the VM's path).
    async fn probe(&self) -> Result<u64, BackendError>;
    /// What the VM reports by itself from now on.
    fn events(&self) -> BackendEvents {
        BackendEvents::none()
    }
}

/// The backend of a VM whose backend this build lacks (see
/// [`BackendError::Unsupported`]): every call fails.
pub struct Unsupported {
    /// The VM.
    pub vm: String,
    /// The backend it asked for.
    pub kind: &'static str,
}

impl Unsupported {
    fn err(&self) -> BackendError {
        BackendError::Unsupported {
            vm: self.vm.clone(),
            kind: self.kind,
        }
    }
}

#[async_trait::async_trait]
impl VmBackend for Unsupported {
    fn kind(&self) -> &'static str {
        self.kind
    }
    async fn plug(&self, _: &NicPlan) -> Result<Plugged, BackendError> {
        Err(self.err())
    }
    async fn unplug(&self, _: &NicId) -> Result<(), BackendError> {
        Err(self.err())
    }
    async fn presence(&self, ids: &[NicId]) -> HashMap<NicId, Presence> {
        ids.iter().map(|i| (i.clone(), Presence::Unknown)).collect()
    }
    async fn orphans(&self, _: &[NicId]) -> Result<Vec<NicId>, BackendError> {
        Err(self.err())
    }
    async fn probe(&self) -> Result<u64, BackendError> {
        Err(self.err())
    }
}
