//! Support code shared by nestless's integration and end-to-end tests.

pub mod agent;
pub mod containerd;
pub mod cri;
pub mod docker;
pub mod dropin;
pub mod e2e;
pub mod hostlo;
pub mod libvirt;
pub mod netenv;
pub mod vm;
