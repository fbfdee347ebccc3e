//! The link seam: what the plug needs of one network namespace's links,
//! addresses, routes and settings. [`super::netlink::Netlink`] is the kernel
//! (rtnetlink, `/proc/sys/net`, raw sockets); unit tests put a fake kernel
//! here, so that kernel behaviours that differ between versions (a rename of
//! an up link is `EBUSY` before Linux 6.2) and software that touches links
//! behind our back (a link manager bringing new links up) are tested without
//! root.
//!
//! Each call is one netlink request (or one sysctl write, one packet): the
//! kernel applies a request's attributes in an order of its own, so a step
//! that must come before another is its own call.

use std::{net::IpAddr, path::Path};

use super::GuestNetError;

/// A link, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// MAC, when the link has a six-byte one.
    pub mac: Option<[u8; 6]>,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// Operationally up (`IFF_RUNNING`): carrier, and the kernel's link
    /// watch has activated it; what goes out now reaches the wire.
    pub running: bool,
    /// The kind of a virtual link (`veth`, `bridge`, ...); `None` for a
    /// device's own (a virtio-net NIC, `lo`).
    pub kind: Option<String>,
}

/// An address of a link, as listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addr {
    /// The address.
    pub ip: IpAddr,
    /// Its prefix length.
    pub prefix: u8,
    /// Duplicate address detection has not finished (IPv6): not usable yet.
    pub tentative: bool,
    /// Duplicate address detection found the address in use elsewhere.
    pub dad_failed: bool,
}

/// Wakes up when links or addresses of the namespace change.
#[async_trait::async_trait]
pub trait Changes: Send {
    /// Waits for the next change; `false` once the source has ended.
    async fn next(&mut self) -> bool;
}

/// One network namespace's links, addresses, routes and settings.
#[async_trait::async_trait]
pub trait NsLinks: Send + Sync {
    /// Every link.
    async fn links(&self) -> Result<Vec<Link>, GuestNetError>;
    /// Subscribes to changes of links and addresses (subscribe first, then
    /// list: a change in between is not missed).
    async fn watch(&self) -> Result<Box<dyn Changes>, GuestNetError>;
    /// Sets the link administratively up or down.
    async fn set_up(&self, index: u32, up: bool) -> Result<(), GuestNetError>;
    /// Renames the link (`EBUSY` while it is up, on kernels before 6.2).
    async fn rename(&self, index: u32, name: &str) -> Result<(), GuestNetError>;
    /// Moves the link into the namespace at `target`, named `name` there, in
    /// one request: the kernel takes it down and names it as part of the
    /// move, so nothing can bring it up in between.
    async fn move_to(&self, index: u32, target: &Path, name: &str) -> Result<(), GuestNetError>;
    /// Sets the MTU.
    async fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), GuestNetError>;
    /// The link's addresses.
    async fn addresses(&self, index: u32) -> Result<Vec<Addr>, GuestNetError>;
    /// Adds an address; one already there is fine.
    async fn add_address(&self, index: u32, ip: IpAddr, prefix: u8) -> Result<(), GuestNetError>;
    /// Adds a route through the link; one already there is fine.
    async fn add_route(
        &self,
        index: u32,
        destination: IpAddr,
        prefix: u8,
        via: Option<IpAddr>,
    ) -> Result<(), GuestNetError>;
    /// Reads `/proc/sys/net/<key>` of the namespace.
    async fn sysctl(&self, key: &str) -> Result<String, GuestNetError>;
    /// Writes `/proc/sys/net/<key>` of the namespace.
    async fn set_sysctl(&self, key: &str, value: &str) -> Result<(), GuestNetError>;
    /// Announces that `ip` is at `mac` on the link: one gratuitous ARP
    /// (IPv4) or one unsolicited neighbour advertisement with the override
    /// flag (IPv6), to every neighbour on the link.
    async fn announce(&self, index: u32, mac: [u8; 6], ip: IpAddr) -> Result<(), GuestNetError>;
}
