//! `nestless_shim`, the library of containerd-shim-nestless-v2: a containerd runtime v2 shim (task API v2,
//! runc underneath) that gives each pod sandbox a NIC provided by the host
//! agent.
//!
//! How the pieces fit:
//!
//! ```text
//! containerd ──ttrpc (task API v2)──> task::TaskService ──> runc::Runc ──> runc binary
//!      ^                                   │   │   │
//!      └──── events::ContainerdEvents ─────┘   │   └──> stdio (FIFOs, pty, logging binary)
//!                                              ├──> podnet::PodNetwork (sandbox NIC, chosen by podnet::from_config)
//!                                              └──> cgroup (stats, OOM)
//! reaper::Reaper: the one waitpid(-1) of the process (runc commands, container processes)
//! shim::NestlessShim: start (one shim per pod, policy::grouping_id) / delete / serve
//! ```
//!
//! - [`config`]: `/etc/nestless/shim.toml` (or the runtime options' `config_path`).
//! - [`options`]: the runtime options containerd sends.
//! - [`policy`]: pure decisions from the OCI spec (grouping, network owner).
//! - [`task`]: the Task API; [`events`]: task events to containerd.
//! - [`runc`]: the runc binary; [`reaper`]: the one reaper of the process.
//! - [`stdio`]: FIFOs, ptys, `file://` and `binary://` logs; [`cgroup`]: stats and OOM.
//! - [`podnet`]: the pod network seam, and the backend a configuration asks for.
//! - [`agent_client`]: the host agent's client, the shim's one protobuf edge.
//! - [`bundle`]: what the shim records in a bundle for `delete` after a crash.
//! - [`shim`]: containerd's `start` and `delete` subcommands, and serving.

#![warn(missing_docs)]

pub mod agent_client;
pub mod bundle;
pub mod cgroup;
pub mod cni;
pub mod config;
pub mod error;
pub mod events;
#[cfg(test)]
mod fake_agent;
pub mod hostlo;
pub mod options;
pub mod podnet;
pub mod policy;
pub mod reaper;
pub mod runc;
pub mod shim;
pub mod stdio;
pub mod task;
