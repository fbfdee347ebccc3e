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
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use futures::{StreamExt, TryStreamExt};
use rtnetlink::{
    packet_core::NetlinkPayload,
    packet_route::{
        link::{
            InfoData, InfoKind, InfoVeth, LinkAttribute, LinkExtentMask, LinkInfo, LinkMessage,
        },
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
    names: Arc<SharedNameDump>,
    deletes: tokio::sync::mpsc::UnboundedSender<DeleteRequest>,
}

/// One link to delete, and where its caller waits for the outcome.
type DeleteRequest = (
    String,
    tokio::sync::oneshot::Sender<Result<bool, LinkError>>,
);

/// The most links one batched deletion takes ([`delete_batches`]).
const MAX_DELETE_BATCH: usize = 256;

/// The one link-name dump that concurrent [`HostLinks::names`] callers
/// share. Every VM's upkeep asks for the names of every NIC host end; on a
/// host with thousands of NICs a dump is megabytes, and twenty VMs asking
/// every two seconds each took their own. A caller reuses a dump only if that
/// dump was *started* after the caller asked, so a reused answer is never
/// older than the question (a NIC made just before the call is in it).
#[derive(Default)]
struct SharedNameDump {
    /// Sequence number of the last dump started (the first is 1).
    started: AtomicU64,
    /// The last dump finished: its sequence number and every link's name.
    /// Held while a dump runs, so callers wait for it rather than start
    /// their own.
    last: tokio::sync::Mutex<Option<(u64, Arc<Vec<String>>)>>,
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
        let (deletes, queue) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(delete_batches(handle.clone(), queue));
        Ok(Netlink {
            handle,
            owner: owner.to_string(),
            names: Arc::default(),
            deletes,
        })
    }

    /// How many link-name dumps [`HostLinks::names`] has taken so far (the
    /// rest of its calls shared one): a diagnostic for tests and benchmarks.
    pub fn name_dumps_taken(&self) -> u64 {
        self.names.started.load(Ordering::Acquire)
    }

    async fn get(&self, ifname: &str) -> Result<Option<LinkMessage>, LinkError> {
        get_link(&self.handle, ifname).await
    }

    /// Every link of the namespace.
    /// Every link of the agent's namespace. A dump that the kernel
    /// interrupts because the link table changed under it (the reply carries
    /// `NLM_F_DUMP_INTR`, which the netlink crates report as `EBUSY`) is
    /// inconsistent and is taken again, as iproute2 does; links come and go
    /// all the time on a busy host.
    ///
    /// The dump asks the kernel to leave out each link's statistics
    /// (`RTEXT_FILTER_SKIP_STATS`, Linux 4.6 and later; older kernels ignore
    /// the bit): nothing here reads them, and they are most of each message.
    async fn dump(&self) -> Result<Vec<LinkMessage>, LinkError> {
        const ATTEMPTS: usize = 10;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let request = self
                .handle
                .link()
                .get()
                .set_filter_mask(AddressFamily::Unspec, vec![LinkExtentMask::SkipStats]);
            match request.execute().try_collect().await {
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

    /// Every link's name, from a dump started after this call began: the
    /// one running when a caller arrives is not used, the next one is shared
    /// by everyone who waited for it ([`SharedNameDump`]).
    async fn shared_names(&self) -> Result<Arc<Vec<String>>, LinkError> {
        let wanted = self.names.started.load(Ordering::Acquire) + 1;
        let mut last = self.names.last.lock().await;
        if let Some((seq, names)) = last.as_ref() {
            if *seq >= wanted {
                return Ok(names.clone());
            }
        }
        let seq = self.names.started.fetch_add(1, Ordering::AcqRel) + 1;
        let names: Arc<Vec<String>> = Arc::new(
            self.dump()
                .await?
                .iter()
                .filter_map(link_name)
                .map(str::to_string)
                .collect(),
        );
        *last = Some((seq, names.clone()));
        Ok(names)
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

    /// Queued for the next batched deletion ([`delete_batches`]): the
    /// deletions asked for while one batch runs go together in the next.
    async fn delete(&self, ifname: &str) -> Result<bool, LinkError> {
        let gone = || {
            LinkError::new(
                "delete",
                ifname,
                std::io::Error::other("the agent's netlink connection is closed"),
            )
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.deletes
            .send((ifname.to_string(), tx))
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    async fn names(&self, prefix: &str) -> Result<HashSet<String>, LinkError> {
        let all = self.shared_names().await?;
        Ok(all
            .iter()
            .filter(|n| n.starts_with(prefix))
            .cloned()
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

/// Link `ifname`, if it exists.
async fn get_link(handle: &Handle, ifname: &str) -> Result<Option<LinkMessage>, LinkError> {
    match handle
        .link()
        .get()
        .match_name(ifname.to_string())
        .execute()
        .try_next()
        .await
    {
        Ok(m) => Ok(m),
        Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code().abs() == libc::ENODEV => Ok(None),
        Err(e) => Err(LinkError::new("look up", ifname, nl_io(e))),
    }
}

/// Deletes link `ifname` on its own; `Ok(false)` when it did not exist.
async fn delete_one(handle: &Handle, ifname: &str) -> Result<bool, LinkError> {
    let Some(m) = get_link(handle, ifname).await? else {
        return Ok(false);
    };
    match handle.link().del(m.header.index).execute().await {
        Ok(()) => Ok(true),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == libc::ENODEV => Ok(false),
        Err(e) => Err(LinkError::new("delete", ifname, nl_io(e))),
    }
}

/// Serves [`HostLinks::delete`] for one [`Netlink`]: takes every deletion
/// queued (up to [`MAX_DELETE_BATCH`]) and deletes them in one kernel
/// operation.
///
/// Deleting a link costs the kernel RCU grace periods under the RTNL lock
/// (`unregister_netdevice_many`), whatever the number of links it deletes:
/// one at a time, veth pairs go at about 25–45 a second host-wide, while
/// one `RTM_DELLINK` of a link *group* deletes a whole batch for about the
/// price of one (`ip link del group G` does the same). So a batch of more
/// than one link first puts each link in a group of its own, random and
/// with the top bit set (links stay in group 0 unless an operator says
/// otherwise), then deletes that group. A link that cannot be put in the
/// group gets its own error (`Ok(false)` when it is gone); a group that
/// cannot be deleted whole (a kind without `dellink` answers `EOPNOTSUPP`)
/// falls back to one deletion per link. The queue ends when every
/// [`Netlink`] that feeds it is dropped.
async fn delete_batches(
    handle: Handle,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<DeleteRequest>,
) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_DELETE_BATCH {
            match queue.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        delete_batch(&handle, batch).await;
    }
}

/// One batch of [`delete_batches`].
async fn delete_batch(handle: &Handle, mut batch: Vec<DeleteRequest>) {
    if batch.len() == 1 {
        if let Some((name, reply)) = batch.pop() {
            let _ = reply.send(delete_one(handle, &name).await);
        }
        return;
    }
    let group = rand::random::<u32>() | 0x8000_0000;
    let mut marked = Vec::with_capacity(batch.len());
    for (name, reply) in batch {
        let mark = LinkUnspec::new_with_name(&name).link_group(group).build();
        match handle.link().set(mark).execute().await {
            Ok(()) => marked.push((name, reply)),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == libc::ENODEV => {
                let _ = reply.send(Ok(false));
            }
            Err(e) => {
                let _ = reply.send(Err(LinkError::new("mark for deletion", &name, nl_io(e))));
            }
        }
    }
    if marked.is_empty() {
        return;
    }
    let mut del = handle.link().del(0);
    del.message_mut()
        .attributes
        .push(LinkAttribute::Group(group));
    match del.execute().await {
        Ok(()) => {
            for (_, reply) in marked {
                let _ = reply.send(Ok(true));
            }
        }
        Err(e) => {
            log::debug!(
                "deleting link group {group:#x} ({} links) failed ({}); deleting them one by one",
                marked.len(),
                nl_io(e)
            );
            for (name, reply) in marked {
                let _ = reply.send(delete_one(handle, &name).await);
            }
        }
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
