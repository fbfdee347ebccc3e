//! containerd-shim-nestless-v2: a containerd runtime v2 shim (runc underneath)
//! that gives each pod sandbox a NIC provided by the host agent.
pub mod podnet;
