//! nestless host agent: gives VMs host-provided NICs on demand (BrFusion).
//!
//! A shim inside a VM asks, over vsock, for a NIC for a pod sandbox; the agent
//! leases an address, creates the host side (a tap or a veth on the network's
//! bridge) and hot-plugs the NIC into the VM; the shim moves it into the pod's
//! network namespace. Modules, from the outside in:
//!
//! * [`daemon`]: the daemon's life: recover, serve, upkeep, signals, drain.
//! * [`server`]: listeners (AF_VSOCK, per-VM unix sockets, admin socket) and
//!   the ttrpc services; the caller VM is fixed at accept time.
//! * [`server::convert`]: protobuf requests parsed (and so checked) into the
//!   agent's types, and its replies back; the one place requests are checked.
//! * [`agent`]: records, leases, per-VM locking, recovery after a crash.
//! * [`lifecycle`]: the NIC state machine and the recovery table.
//! * [`backend`]: the hot-plug seam; [`backend::qemu`] (QMP),
//!   [`backend::libvirt`] (libvirt, domain XML in [`backend::domxml`]) and
//!   [`backend::netns`]; [`discover`]: libvirt domains carrying the nestless
//!   metadata element, registered while they run.
//! * [`qmp`], [`links`]: the QMP client and the netlink link seam.
//! * [`config`], [`state`], [`ipam`], [`names`], [`labels`]: configuration,
//!   the durable state (SQLite), address allocation, names, label limits;
//!   [`stale`]: state records the configuration no longer accounts for;
//!   [`registry`]: VMs registered at run time (kept in `vms.json`) and the
//!   configuration reloaded on SIGHUP.
#![warn(missing_docs)]

pub mod agent;
pub mod backend;
pub mod config;
pub mod ctl;
pub mod daemon;
#[cfg(feature = "libvirt")]
pub mod discover;
pub mod error;
pub mod hostlo;
pub mod ipam;
pub mod labels;
pub mod lifecycle;
pub mod links;
pub mod names;
pub mod qmp;
pub mod registry;
pub mod server;
pub mod stale;
pub mod state;
