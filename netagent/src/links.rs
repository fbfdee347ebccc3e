//! The link seam: host-side interfaces (taps, veth pairs, bridges).
//!
//! [`HostLinks`] is what the backends need from the host's network stack;
//! [`Netlink`] implements it with `rtnetlink` (and the tun ioctl, since the
//! kernel does not create taps over netlink). Tests of backend logic use a
//! recording fake instead ([`fake::FakeLinks`], under tests and the `testing`
//! feature).

#[cfg(any(test, feature = "testing"))]
pub mod fake;

use std::{
    collections::HashSet,
    net::IpAddr,
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
};

use futures::{StreamExt, TryStreamExt};
use rtnetlink::{
    packet_core::NetlinkPayload,
    packet_route::{
        link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkInfo, LinkMessage},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage},
        AddressFamily, RouteNetlinkMessage,
    },
    sys::{AsyncSocket, SocketAddr},
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth,
};
use tokio::sync::mpsc::UnboundedReceiver;

use nestless_model::MacAddr;

use crate::names::{bridge_mac, owned_bridge_mac};

/// A failed link operation: what was being done, to which interface, and why.
#[derive(Debug, thiserror::Error)]
#[error("cannot {op} {ifname}: {source}")]
pub struct LinkError {
    /// The operation, e.g. "create veth".
    pub op: &'static str,
    /// The interface (or namespace) concerned.
    pub ifname: String,
    /// The kernel's answer.
    pub source: std::io::Error,
}

impl LinkError {
    pub(crate) fn new(op: &'static str, ifname: &str, source: std::io::Error) -> LinkError {
        LinkError {
            op,
            ifname: ifname.to_string(),
            source,
        }
    }

    /// True when the interface does not exist.
    pub fn is_not_found(&self) -> bool {
        self.source.raw_os_error() == Some(libc::ENODEV)
    }
}

/// What the backends need from the host's links.
#[async_trait::async_trait]
pub trait HostLinks: Send + Sync {
    /// True when a link of this name exists in the agent's namespace.
    async fn exists(&self, ifname: &str) -> Result<bool, LinkError>;
    /// Creates the bridge if missing (with the fixed MAC of its name,
    /// [`crate::names::bridge_mac`], so that ports coming and going never
    /// change it), gives it `address` if it lacks it, sets it up.
    async fn ensure_bridge(
        &self,
        bridge: &str,
        address: Option<(IpAddr, u8)>,
        mtu: u32,
    ) -> Result<(), LinkError>;
    /// Creates a veth pair: `host` in the agent's namespace, `guest` (with
    /// `guest_mac`) directly in the namespace at `netns`.
    async fn create_veth(
        &self,
        host: &str,
        guest: &str,
        guest_mac: MacAddr,
        mtu: u32,
        netns: &Path,
    ) -> Result<(), LinkError>;
    /// Opens a tap (non-persistent: it disappears with the last fd) with a
    /// virtio-net header, returning its fd.
    fn open_tap(&self, name: &str) -> Result<OwnedFd, LinkError>;
    /// Makes the tap of `fd` (opened by [`HostLinks::open_tap`]) persistent
    /// and closes `fd`: the tap outlives the agent's fd, so that another
    /// process (libvirt) can open it by name.
    fn persist_tap(&self, fd: OwnedFd, name: &str) -> Result<(), LinkError>;
    /// Creates the bridge `name` if missing, with no address and no uplink
    /// and the fixed MAC of its name, marks it as the agent's (its owner
    /// alias, so that a sweep finds it after a crash) and sets it up: a
    /// Hostlo segment.
    async fn ensure_segment(&self, name: &str, mtu: u32) -> Result<(), LinkError>;
    /// Sets the MTU, joins `ifname` to `bridge` and sets it up.
    async fn join_bridge(&self, ifname: &str, bridge: &str, mtu: u32) -> Result<(), LinkError>;
    /// Deletes a link; `Ok(false)` when it did not exist.
    async fn delete(&self, ifname: &str) -> Result<bool, LinkError>;
    /// Names of the links this agent made (marked with its owner alias)
    /// whose name starts with `prefix`.
    async fn list_owned(&self, prefix: &str) -> Result<Vec<String>, LinkError>;
    /// Names of every link whose name starts with `prefix`, whoever made it
    /// (one dump: the presence check of many NICs at once).
    async fn names(&self, prefix: &str) -> Result<HashSet<String>, LinkError>;
    /// Removes the host's neighbour entries (ARP, NDP) for `addrs` on
    /// `bridge`: an address released or leased again must not keep the MAC
    /// of the NIC that had it before. Entries that do not exist are fine.
    async fn forget_neighbours(&self, bridge: &str, addrs: &[IpAddr]) -> Result<(), LinkError>;
}

fn nl_io(e: rtnetlink::Error) -> std::io::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io(),
        other => std::io::Error::other(other.to_string()),
    }
}

/// [`HostLinks`] over rtnetlink.
///
/// Every host link it creates carries `owner` as its alias (`ip link show`
/// prints it), so that an agent sweeping orphans never touches the links of
/// another agent (tests run several on one host).
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
    owner: String,
}

/// The owner alias for an agent whose state lives in `state_dir`.
pub fn owner_alias(state_dir: &Path) -> String {
    let mut s = format!("nestless-netagent {}", state_dir.display());
    s.truncate(200);
    s
}

impl Netlink {
    /// Opens a netlink connection (its task runs on the current tokio runtime);
    /// links created get the alias `owner`.
    pub fn new(owner: &str) -> std::io::Result<Netlink> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Netlink {
            handle,
            owner: owner.to_string(),
        })
    }

    async fn get(&self, ifname: &str) -> Result<Option<LinkMessage>, LinkError> {
        match self
            .handle
            .link()
            .get()
            .match_name(ifname.to_string())
            .execute()
            .try_next()
            .await
        {
            Ok(m) => Ok(m),
            Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code().abs() == libc::ENODEV => {
                Ok(None)
            }
            Err(e) => Err(LinkError::new("look up", ifname, nl_io(e))),
        }
    }

    /// Every link of the namespace.
    /// Every link of the agent's namespace. A dump that the kernel
    /// interrupts because the link table changed under it (the reply carries
    /// `NLM_F_DUMP_INTR`, which the netlink crates report as `EBUSY`) is
    /// inconsistent and is taken again, as iproute2 does; links come and go
    /// all the time on a busy host.
    async fn dump(&self) -> Result<Vec<LinkMessage>, LinkError> {
        const ATTEMPTS: usize = 10;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.handle.link().get().execute().try_collect().await {
                Ok(links) => return Ok(links),
                Err(e) => {
                    let e = nl_io(e);
                    if e.raw_os_error() != Some(libc::EBUSY) || attempt == ATTEMPTS {
                        return Err(LinkError::new("list", "links", e));
                    }
                }
            }
        }
    }

    async fn index(&self, op: &'static str, ifname: &str) -> Result<u32, LinkError> {
        self.get(ifname)
            .await?
            .map(|m| m.header.index)
            .ok_or_else(|| {
                LinkError::new(op, ifname, std::io::Error::from_raw_os_error(libc::ENODEV))
            })
    }
}

fn same_netns(path: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let a = std::fs::metadata(path)?;
    let b = std::fs::metadata("/proc/self/ns/net")?;
    Ok(a.dev() == b.dev() && a.ino() == b.ino())
}

#[async_trait::async_trait]
impl HostLinks for Netlink {
    async fn exists(&self, ifname: &str) -> Result<bool, LinkError> {
        Ok(self.get(ifname).await?.is_some())
    }

    async fn ensure_bridge(
        &self,
        bridge: &str,
        address: Option<(IpAddr, u8)>,
        mtu: u32,
    ) -> Result<(), LinkError> {
        let index = match self.get(bridge).await? {
            Some(m) => m.header.index,
            None => {
                self.handle
                    .link()
                    .add(
                        LinkBridge::new(bridge)
                            .mtu(mtu)
                            .address(bridge_mac(bridge).0.to_vec())
                            .build(),
                    )
                    .execute()
                    .await
                    .map_err(|e| LinkError::new("create bridge", bridge, nl_io(e)))?;
                self.index("create bridge", bridge).await?
            }
        };
        if let Some((addr, prefix)) = address {
            let has = self
                .handle
                .address()
                .get()
                .set_link_index_filter(index)
                .execute()
                .try_collect::<Vec<_>>()
                .await
                .map_err(|e| LinkError::new("list addresses of", bridge, nl_io(e)))?
                .iter()
                .any(|m| {
                    m.attributes.iter().any(|a| {
                        matches!(a, rtnetlink::packet_route::address::AddressAttribute::Address(x) if *x == addr)
                    })
                });
            if !has {
                self.handle
                    .address()
                    .add(index, addr, prefix)
                    .execute()
                    .await
                    .map_err(|e| LinkError::new("add the gateway address to", bridge, nl_io(e)))?;
            }
        }
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| LinkError::new("set up", bridge, nl_io(e)))
    }

    async fn ensure_segment(&self, name: &str, mtu: u32) -> Result<(), LinkError> {
        let index = match self.get(name).await? {
            Some(m) => m.header.index,
            None => {
                self.handle
                    .link()
                    .add(
                        LinkBridge::new(name)
                            .mtu(mtu)
                            .address(owned_bridge_mac(name, &self.owner).0.to_vec())
                            .build(),
                    )
                    .execute()
                    .await
                    .map_err(|e| LinkError::new("create segment bridge", name, nl_io(e)))?;
                self.index("create segment bridge", name).await?
            }
        };
        // The kernel ignores an alias given at creation (IFLA_IFALIAS is
        // only applied to an existing link): mark it here, with `up`. Until
        // then its MAC, given at creation, marks it as this agent's
        // (`list_owned`), so that a crash between the two leaves nothing
        // the sweep cannot find.
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .alias(self.owner.clone())
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| LinkError::new("mark and set up", name, nl_io(e)))
    }

    async fn create_veth(
        &self,
        host: &str,
        guest: &str,
        guest_mac: MacAddr,
        mtu: u32,
        netns: &Path,
    ) -> Result<(), LinkError> {
        let ns_file = std::fs::File::open(netns).map_err(|e| {
            LinkError::new("open network namespace", &netns.display().to_string(), e)
        })?;
        let same = same_netns(netns).map_err(|e| {
            LinkError::new("inspect network namespace", &netns.display().to_string(), e)
        })?;
        let mut peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(guest.to_string())
            .address(guest_mac.0.to_vec())
            .mtu(mtu);
        if !same {
            peer = peer.setns_by_fd(ns_file.as_raw_fd());
        }
        let msg = LinkVeth::new(host, guest)
            .mtu(mtu)
            .alias(self.owner.clone())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())))
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| LinkError::new("create veth", host, nl_io(e)))
    }

    fn open_tap(&self, name: &str) -> Result<OwnedFd, LinkError> {
        tap::open(name).map_err(|e| LinkError::new("create tap", name, e))
    }

    fn persist_tap(&self, fd: OwnedFd, name: &str) -> Result<(), LinkError> {
        tap::persist(&fd).map_err(|e| LinkError::new("make persistent the tap", name, e))
    }

    async fn join_bridge(&self, ifname: &str, bridge: &str, mtu: u32) -> Result<(), LinkError> {
        let br = self.index("find bridge", bridge).await?;
        let idx = self.index("attach to bridge", ifname).await?;
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(idx)
                    .mtu(mtu)
                    .controller(br)
                    .alias(self.owner.clone())
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| LinkError::new("attach to bridge", ifname, nl_io(e)))
    }

    async fn delete(&self, ifname: &str) -> Result<bool, LinkError> {
        let Some(m) = self.get(ifname).await? else {
            return Ok(false);
        };
        match self.handle.link().del(m.header.index).execute().await {
            Ok(()) => Ok(true),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == libc::ENODEV => {
                Ok(false)
            }
            Err(e) => Err(LinkError::new("delete", ifname, nl_io(e))),
        }
    }

    async fn names(&self, prefix: &str) -> Result<HashSet<String>, LinkError> {
        Ok(self
            .dump()
            .await?
            .iter()
            .filter_map(|m| link_name(m).filter(|n| n.starts_with(prefix)))
            .map(str::to_string)
            .collect())
    }

    async fn forget_neighbours(&self, bridge: &str, addrs: &[IpAddr]) -> Result<(), LinkError> {
        let Some(index) = self.get(bridge).await?.map(|m| m.header.index) else {
            // No bridge, no neighbours on it.
            return Ok(());
        };
        for addr in addrs {
            let mut msg = NeighbourMessage::default();
            msg.header.ifindex = index;
            let (family, dest) = match addr {
                IpAddr::V4(a) => (AddressFamily::Inet, NeighbourAddress::Inet(*a)),
                IpAddr::V6(a) => (AddressFamily::Inet6, NeighbourAddress::Inet6(*a)),
            };
            msg.header.family = family;
            msg.attributes.push(NeighbourAttribute::Destination(dest));
            match self.handle.neighbours().del(msg).execute().await {
                Ok(()) => {}
                Err(rtnetlink::Error::NetlinkError(e))
                    if matches!(e.raw_code().abs(), libc::ENOENT | libc::ESRCH) => {}
                Err(e) => {
                    return Err(LinkError::new(
                        "forget the neighbour entry on",
                        bridge,
                        nl_io(e),
                    ))
                }
            }
        }
        Ok(())
    }

    async fn list_owned(&self, prefix: &str) -> Result<Vec<String>, LinkError> {
        let links = self.dump().await?;
        Ok(links
            .iter()
            .filter(|m| {
                let alias = m.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfAlias(x) => Some(x),
                    _ => None,
                });
                match alias {
                    Some(x) => *x == self.owner,
                    // A segment bridge a crash left before its alias was set.
                    None => m.attributes.iter().any(|a| match a {
                        LinkAttribute::Address(mac) => m.attributes.iter().any(|n| {
                            matches!(n, LinkAttribute::IfName(name)
                                if owned_bridge_mac(name, &self.owner).0[..] == mac[..])
                        }),
                        _ => false,
                    }),
                }
            })
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) if n.starts_with(prefix) => Some(n.clone()),
                    _ => None,
                })
            })
            .collect())
    }
}

/// The name of a link message.
fn link_name(m: &LinkMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// The names of the links deleted from now on whose name starts with
/// `prefix`, as the kernel announces them (RTM_DELLINK to the link
/// multicast group): how the agent learns that someone else deleted a
/// NIC's host end, or that a namespace holding its other end went away.
/// The channel closes if the netlink socket fails.
pub fn deleted_links(prefix: &'static str) -> std::io::Result<UnboundedReceiver<String>> {
    let (mut conn, _handle, mut messages) = rtnetlink::new_connection()?;
    conn.socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, rtnetlink::constants::RTMGRP_LINK))?;
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) = msg.payload {
                if let Some(name) = link_name(&link).filter(|n| n.starts_with(prefix)) {
                    if tx.send(name.to_string()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    Ok(rx)
}

/// The kind of a link message (`veth`, `tun`, `bridge`...), for diagnostics.
pub fn link_kind(m: &LinkMessage) -> Option<&InfoKind> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k),
            _ => None,
        }),
        _ => None,
    })
}

/// The tun/tap ioctl, which netlink does not offer.
mod tap {
    use std::os::fd::{FromRawFd, OwnedFd};

    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    const IFF_VNET_HDR: libc::c_short = 0x4000;

    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }

    nix::ioctl_write_int!(tunsetiff, b'T', 202);
    nix::ioctl_write_int!(tunsetpersist, b'T', 203);

    /// Makes the tap of `fd` persistent (TUNSETPERSIST): it stays when the
    /// last fd closes, until deleted.
    pub fn persist(fd: &OwnedFd) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: TUNSETPERSIST takes an integer argument; fd is a tap fd we own.
        unsafe { tunsetpersist(fd.as_raw_fd(), 1) }
            .map(drop)
            .map_err(std::io::Error::from)
    }

    /// Opens (creating if needed) the tap `name`; it lives while the fd does.
    pub fn open(name: &str) -> std::io::Result<OwnedFd> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a plain open(2) of a fixed path; the fd is owned below.
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by open(2) and is not owned elsewhere.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads an ifreq, which `req` is laid out as; it outlives the call.
        unsafe { tunsetiff(fd, &mut req as *mut IfReq as u64) }.map_err(std::io::Error::from)?;
        Ok(owned)
    }
}
