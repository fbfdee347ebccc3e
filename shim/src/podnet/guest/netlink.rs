//! [`NsLinks`] through the kernel: rtnetlink for links, addresses and routes,
//! `/proc/sys/net` for settings, raw sockets for announcements.
//!
//! A netlink socket, a `/proc/sys/net` file and a raw socket belong to the
//! network namespace of the thread that opened them. [`Netlink::open`] opens
//! its netlink sockets on a short-lived thread that entered the pod's
//! namespace (`setns` changes only the calling thread), then drives them on
//! the caller's runtime; sysctls and announcements go through such a thread
//! too. Nothing runs on a runtime thread that has left the shim's namespace.

use std::{
    fs::File,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use futures::{channel::mpsc::UnboundedReceiver, StreamExt, TryStreamExt};
use rtnetlink::{
    packet_core::{NetlinkMessage, NetlinkPayload},
    packet_route::{
        address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage},
        link::{LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
        RouteNetlinkMessage,
    },
    Handle, LinkUnspec, MulticastGroup, RouteMessageBuilder,
};
use tokio::task::JoinHandle;

use super::{
    announce,
    links::{Addr, Changes, Link, NsLinks},
    GuestNetError,
};

/// The kernel's `EEXIST` from a netlink request: the thing is there already.
fn exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code().abs() == libc::EEXIST)
}

/// The kernel's answer as an I/O error (its errno), or the library's failure.
fn io_of(e: rtnetlink::Error) -> std::io::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io(),
        other => std::io::Error::other(other.to_string()),
    }
}

fn nl(op: &'static str, what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> GuestNetError {
    let what = what.into();
    move |e| GuestNetError::Netlink {
        op,
        what,
        error: io_of(e),
    }
}

fn open_failed(error: std::io::Error) -> GuestNetError {
    GuestNetError::Netlink {
        op: "open",
        what: "a netlink socket".into(),
        error,
    }
}

/// The namespace a [`Netlink`] works in.
#[derive(Clone)]
struct Namespace {
    /// `None`: the shim's own.
    file: Option<Arc<File>>,
    path: PathBuf,
}

impl Namespace {
    fn open(path: &Path) -> Result<Namespace, GuestNetError> {
        let file = File::open(path).map_err(|error| GuestNetError::Netns {
            path: path.to_path_buf(),
            error,
        })?;
        Ok(Namespace {
            file: Some(Arc::new(file)),
            path: path.to_path_buf(),
        })
    }

    /// Runs `f` on a thread of its own inside the namespace (the calling
    /// thread itself for the shim's own), off the async runtime.
    async fn run<T, F>(&self, f: F) -> Result<T, GuestNetError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, GuestNetError> + Send + 'static,
    {
        let ns = self.clone();
        tokio::task::spawn_blocking(move || ns.run_blocking(f))
            .await
            .map_err(|e| GuestNetError::Netns {
                path: self.path.clone(),
                error: std::io::Error::other(format!("namespace worker failed: {e}")),
            })?
    }

    fn run_blocking<T, F>(&self, f: F) -> Result<T, GuestNetError>
    where
        T: Send,
        F: FnOnce() -> Result<T, GuestNetError> + Send,
    {
        let Some(file) = self.file.as_deref() else {
            return f();
        };
        let path = &self.path;
        std::thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(
                    |e| GuestNetError::Netns {
                        path: path.clone(),
                        error: e.into(),
                    },
                )?;
                f()
            })
            .join()
            .unwrap_or_else(|_| {
                Err(GuestNetError::Netns {
                    path: path.clone(),
                    error: std::io::Error::other("namespace worker thread panicked"),
                })
            })
        })
    }
}

type Messages = UnboundedReceiver<(
    NetlinkMessage<RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
)>;

/// Opens a netlink connection (subscribed to `groups`) inside `ns`, and
/// drives it on the current runtime.
fn connect_in(
    ns: &Namespace,
    groups: &[MulticastGroup],
) -> Result<(JoinHandle<()>, Handle, Messages), GuestNetError> {
    let rt = tokio::runtime::Handle::current();
    let groups = groups.to_vec();
    let (conn, handle, messages) = ns.run_blocking(move || {
        // The socket registers with the runtime's reactor from this thread.
        let _entered = rt.enter();
        if groups.is_empty() {
            rtnetlink::new_connection().map_err(open_failed)
        } else {
            rtnetlink::new_multicast_connection(&groups).map_err(open_failed)
        }
    })?;
    Ok((tokio::spawn(conn), handle, messages))
}

/// [`NsLinks`] of one namespace, through the kernel.
pub struct Netlink {
    ns: Namespace,
    handle: Handle,
    conn: JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

impl Netlink {
    /// The shim's own namespace (where hot-plugged NICs appear).
    pub fn current() -> Result<Netlink, GuestNetError> {
        let ns = Namespace {
            file: None,
            path: PathBuf::from("/proc/self/ns/net"),
        };
        let (conn, handle, _) = connect_in(&ns, &[])?;
        Ok(Netlink { ns, handle, conn })
    }

    /// The namespace at `path` (a pod's).
    pub fn open(path: &Path) -> Result<Netlink, GuestNetError> {
        let ns = Namespace::open(path)?;
        let (conn, handle, _) = connect_in(&ns, &[])?;
        Ok(Netlink { ns, handle, conn })
    }

    async fn link_name(&self, index: u32) -> String {
        match self.links().await {
            Ok(l) => l
                .into_iter()
                .find(|l| l.index == index)
                .map(|l| l.name)
                .unwrap_or_else(|| format!("link {index}")),
            Err(_) => format!("link {index}"),
        }
    }

    fn sysctl_path(key: &str) -> Result<PathBuf, GuestNetError> {
        if key
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return Err(GuestNetError::Sysctl {
                key: key.to_owned(),
                error: std::io::ErrorKind::InvalidInput.into(),
            });
        }
        Ok(Path::new("/proc/sys/net").join(key))
    }
}

fn link_of(m: &LinkMessage) -> Link {
    let mut name = String::new();
    let mut mac = None;
    let mut kind = None;
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => name = n.clone(),
            LinkAttribute::Address(a) => mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
            LinkAttribute::LinkInfo(infos) => {
                kind = infos.iter().find_map(|i| match i {
                    LinkInfo::Kind(k) => Some(k.to_string()),
                    _ => None,
                })
            }
            _ => {}
        }
    }
    Link {
        index: m.header.index,
        name,
        mac,
        up: m.header.flags.contains(LinkFlags::Up),
        running: m.header.flags.contains(LinkFlags::Running),
        kind,
    }
}

fn addr_of(m: &AddressMessage) -> Option<Addr> {
    let mut ip = None;
    let mut flags = None;
    for a in &m.attributes {
        match a {
            // IFA_ADDRESS is the local address on a link without a peer.
            AddressAttribute::Address(a) => ip = Some(*a),
            AddressAttribute::Flags(f) => flags = Some(*f),
            _ => {}
        }
    }
    let header = m.header.flags;
    let (tentative, dad_failed) = match flags {
        Some(f) => (
            f.contains(AddressFlags::Tentative),
            f.contains(AddressFlags::Dadfailed),
        ),
        None => (
            header.contains(AddressHeaderFlags::Tentative),
            header.contains(AddressHeaderFlags::Dadfailed),
        ),
    };
    Some(Addr {
        ip: ip?,
        prefix: m.header.prefix_len,
        tentative,
        dad_failed,
    })
}

struct Events {
    messages: Messages,
    conn: JoinHandle<()>,
}

impl Drop for Events {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

#[async_trait::async_trait]
impl Changes for Events {
    async fn next(&mut self) -> bool {
        while let Some((msg, _)) = self.messages.next().await {
            if let NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::NewLink(_)
                | RouteNetlinkMessage::DelLink(_)
                | RouteNetlinkMessage::NewAddress(_)
                | RouteNetlinkMessage::DelAddress(_),
            ) = msg.payload
            {
                return true;
            }
        }
        false
    }
}

#[async_trait::async_trait]
impl NsLinks for Netlink {
    async fn links(&self) -> Result<Vec<Link>, GuestNetError> {
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("list", "links"))?;
        Ok(links.iter().map(link_of).collect())
    }

    async fn watch(&self) -> Result<Box<dyn Changes>, GuestNetError> {
        let (conn, _, messages) = connect_in(
            &self.ns,
            &[
                MulticastGroup::Link,
                MulticastGroup::Ipv4Ifaddr,
                MulticastGroup::Ipv6Ifaddr,
            ],
        )?;
        Ok(Box::new(Events { messages, conn }))
    }

    async fn set_up(&self, index: u32, up: bool) -> Result<(), GuestNetError> {
        let msg = if up {
            LinkUnspec::new_with_index(index).up().build()
        } else {
            LinkUnspec::new_with_index(index).down().build()
        };
        let op = if up { "set up" } else { "set down" };
        match self.handle.link().set(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) => Err(nl(op, self.link_name(index).await)(e)),
        }
    }

    async fn rename(&self, index: u32, name: &str) -> Result<(), GuestNetError> {
        let msg = LinkUnspec::new_with_index(index)
            .name(name.to_owned())
            .build();
        match self.handle.link().set(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let from = self.link_name(index).await;
                Err(nl("rename", format!("{from} to {name}"))(e))
            }
        }
    }

    async fn move_to(&self, index: u32, target: &Path, name: &str) -> Result<(), GuestNetError> {
        let ns = File::open(target).map_err(|error| GuestNetError::Netns {
            path: target.to_path_buf(),
            error,
        })?;
        let msg = LinkUnspec::new_with_index(index)
            .setns_by_fd(ns.as_raw_fd())
            .name(name.to_owned())
            .build();
        match self.handle.link().set(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let from = self.link_name(index).await;
                Err(nl(
                    "move into the pod namespace",
                    format!("{from} (as {name}, into {})", target.display()),
                )(e))
            }
        }
    }

    async fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), GuestNetError> {
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).build();
        match self.handle.link().set(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) => Err(nl(
                "set the MTU of",
                format!("{} to {mtu}", self.link_name(index).await),
            )(e)),
        }
    }

    async fn addresses(&self, index: u32) -> Result<Vec<Addr>, GuestNetError> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl("list addresses of", format!("link {index}")))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.index == index)
            .filter_map(addr_of)
            .collect())
    }

    async fn add_address(&self, index: u32, ip: IpAddr, prefix: u8) -> Result<(), GuestNetError> {
        match self.handle.address().add(index, ip, prefix).execute().await {
            Ok(()) => Ok(()),
            Err(e) if exists(&e) => Ok(()),
            Err(e) => Err(nl(
                "add address to",
                format!("{} ({ip}/{prefix})", self.link_name(index).await),
            )(e)),
        }
    }

    async fn add_route(
        &self,
        index: u32,
        destination: IpAddr,
        prefix: u8,
        via: Option<IpAddr>,
    ) -> Result<(), GuestNetError> {
        let msg = match (destination, via) {
            (IpAddr::V4(d), Some(IpAddr::V4(g))) => {
                RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                    .destination_prefix(d, prefix)
                    .gateway(g)
                    .output_interface(index)
                    .build()
            }
            (IpAddr::V4(d), None) => RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .destination_prefix(d, prefix)
                .output_interface(index)
                .build(),
            (IpAddr::V6(d), Some(IpAddr::V6(g))) => {
                RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                    .destination_prefix(d, prefix)
                    .gateway(g)
                    .output_interface(index)
                    .build()
            }
            (IpAddr::V6(d), None) => RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .destination_prefix(d, prefix)
                .output_interface(index)
                .build(),
            (_, Some(g)) => {
                return Err(GuestNetError::Route {
                    route: super::route_text(destination, prefix, via),
                    error: std::io::Error::other(format!(
                        "the gateway {g} is not of the destination's family"
                    )),
                })
            }
        };
        match self.handle.route().add(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if exists(&e) => Ok(()),
            Err(e) => Err(GuestNetError::Route {
                route: super::route_text(destination, prefix, via),
                error: io_of(e),
            }),
        }
    }

    async fn sysctl(&self, key: &str) -> Result<String, GuestNetError> {
        let path = Self::sysctl_path(key)?;
        let key = key.to_owned();
        self.ns
            .run(move || {
                std::fs::read_to_string(&path)
                    .map(|s| s.trim().to_owned())
                    .map_err(|error| GuestNetError::Sysctl { key, error })
            })
            .await
    }

    async fn set_sysctl(&self, key: &str, value: &str) -> Result<(), GuestNetError> {
        let path = Self::sysctl_path(key)?;
        let (key, value) = (key.to_owned(), value.to_owned());
        self.ns
            .run(move || {
                std::fs::write(&path, value).map_err(|error| GuestNetError::Sysctl { key, error })
            })
            .await
    }

    async fn announce(&self, index: u32, mac: [u8; 6], ip: IpAddr) -> Result<(), GuestNetError> {
        self.ns
            .run(move || {
                match ip {
                    IpAddr::V4(v4) => announce::send_garp(index, mac, v4),
                    IpAddr::V6(v6) => announce::send_na(index, mac, v6),
                }
                .map_err(|error| GuestNetError::Announce { ip, error })
            })
            .await
    }
}
