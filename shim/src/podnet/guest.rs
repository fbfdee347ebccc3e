//! Inside the VM: find the hot-plugged NIC by its MAC, move it into the pod's
//! network namespace and configure it there (name, MTU, addresses, routes).
//!
//! ```text
//! shim (VM root netns)                     kernel
//!   subscribe to RTNLGRP_LINK  ───────────▶
//!   list links: MAC there yet? ──────────▶  (the virtio-net probe may still be running)
//!   ...wait for RTM_NEWLINK with the MAC ◀── new link ethN
//!   ethN down, rename nlm-xxxx, netns=pod ─▶
//! thread in the pod netns:
//!   rename to eth0, mtu, addresses, up, routes; lo up
//! ```
//!
//! No polling: the wait is on netlink events, with a deadline. The temporary
//! name avoids a clash with a name the pod namespace already has.
//!
//! [`plug_into_pod`] strings these steps together, and finds a NIC already
//! in place (a retry, or a NIC `nestless-cni` plugged) without moving it again.

use std::{
    net::IpAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
    time::Duration,
};

use futures::{StreamExt, TryStreamExt};
use nestless_model::MacAddr;

use crate::agent_client::Nic;
use rtnetlink::{
    packet_core::NetlinkPayload,
    packet_route::{
        address::AddressAttribute,
        link::{LinkAttribute, LinkInfo, LinkMessage},
        RouteNetlinkMessage,
    },
    Handle, LinkUnspec, MulticastGroup, RouteMessageBuilder,
};

/// What the NIC must look like in the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicSpec {
    /// MAC, six bytes.
    pub mac: [u8; 6],
    /// Name inside the pod (e.g. `eth0`).
    pub ifname: String,
    /// MTU.
    pub mtu: u32,
    /// Addresses with prefix length.
    pub addresses: Vec<(IpAddr, u8)>,
    /// Routes: destination, prefix, next hop (`None`: on-link).
    pub routes: Vec<(IpAddr, u8, Option<IpAddr>)>,
}

impl NicSpec {
    /// What the guest must configure for `nic`, named `ifname`.
    pub fn for_nic(nic: &Nic, ifname: &str) -> NicSpec {
        NicSpec {
            mac: nic.mac.octets(),
            ifname: ifname.to_string(),
            mtu: nic.mtu,
            addresses: nic.addresses.iter().map(|a| (a.ip, a.prefix_len)).collect(),
            routes: nic
                .routes
                .iter()
                .map(|r| (r.destination, r.prefix_len, r.gateway))
                .collect(),
        }
    }
}

/// Guest-side failures.
#[derive(Debug, thiserror::Error)]
pub enum GuestNetError {
    /// The NIC did not show up.
    #[error(
        "no NIC with MAC {mac} appeared within {after:?} (hot-plug not seen by the guest kernel?)"
    )]
    NicNotFound {
        /// The MAC.
        mac: String,
        /// How long the shim waited.
        after: Duration,
    },
    /// A network namespace could not be used.
    #[error("cannot use network namespace {path}: {source}")]
    Netns {
        /// The namespace.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The pod's namespace holds a network interface that nestless did not put there.
    #[error(
        "network namespace {netns} already has {links}, which nestless did not put there: \
         nestless gives a pod its own NIC and shares its network namespace with no other \
         network (with Docker: run with --network none)"
    )]
    NotOurs {
        /// The namespace.
        netns: PathBuf,
        /// The interfaces found, e.g. `eth0 (veth)`.
        links: String,
    },
    /// A netlink request failed.
    #[error("cannot {op} {what}: {source}")]
    Netlink {
        /// What was being done.
        op: &'static str,
        /// On what.
        what: String,
        /// The kernel's answer.
        source: std::io::Error,
    },
}

fn nl(op: &'static str, what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> GuestNetError {
    let what = what.into();
    move |e| GuestNetError::Netlink {
        op,
        what,
        source: match e {
            rtnetlink::Error::NetlinkError(m) => m.to_io(),
            other => std::io::Error::other(other.to_string()),
        },
    }
}

fn link_mac(m: &LinkMessage) -> Option<&[u8]> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(a) => Some(a.as_slice()),
        _ => None,
    })
}

fn link_name(m: &LinkMessage) -> String {
    m.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

async fn find_by_mac(handle: &Handle, mac: &[u8; 6]) -> Result<Option<LinkMessage>, GuestNetError> {
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("list", "links"))?;
    Ok(links.into_iter().find(|l| link_mac(l) == Some(&mac[..])))
}

/// The link with `mac` in the namespace of `handle`, if any: (index, name).
pub async fn wait_for_mac_in(
    handle: &Handle,
    mac: &[u8; 6],
) -> Result<Option<(u32, String)>, GuestNetError> {
    Ok(find_by_mac(handle, mac)
        .await?
        .map(|l| (l.header.index, link_name(&l))))
}

/// Waits (on netlink events, no polling) until a link with `mac` exists in
/// the current network namespace; returns its index and name.
pub async fn wait_for_mac(
    mac: &[u8; 6],
    timeout: Duration,
) -> Result<(u32, String), GuestNetError> {
    let (conn, handle, mut events) = rtnetlink::new_multicast_connection(&[MulticastGroup::Link])
        .map_err(|source| GuestNetError::Netlink {
        op: "open",
        what: "a netlink socket".into(),
        source,
    })?;
    let task = tokio::spawn(conn);
    let result = async {
        // Subscribed first, listed second: a link appearing in between is seen.
        if let Some(l) = find_by_mac(&handle, mac).await? {
            return Ok((l.header.index, link_name(&l)));
        }
        let wait = async {
            while let Some((msg, _)) = events.next().await {
                if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) = msg.payload {
                    if link_mac(&l) == Some(&mac[..]) {
                        return Some((l.header.index, link_name(&l)));
                    }
                }
            }
            None
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(Some(found)) => Ok(found),
            _ => Err(GuestNetError::NicNotFound {
                mac: MacAddr(*mac).to_string(),
                after: timeout,
            }),
        }
    }
    .await;
    task.abort();
    result
}

/// Moves link `index` of the current namespace into the namespace at
/// `netns`, under a temporary name.
pub async fn move_to_netns(index: u32, name: &str, netns: &Path) -> Result<String, GuestNetError> {
    let ns = std::fs::File::open(netns).map_err(|source| GuestNetError::Netns {
        path: netns.to_path_buf(),
        source,
    })?;
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|source| GuestNetError::Netlink {
            op: "open",
            what: "a netlink socket".into(),
            source,
        })?;
    let task = tokio::spawn(conn);
    let tmp = format!("nlm{:08x}", rand_u32());
    let r = async {
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .down()
                    .name(tmp.clone())
                    .build(),
            )
            .execute()
            .await
            .map_err(nl("rename", name.to_string()))?;
        use std::os::fd::AsRawFd;
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .setns_by_fd(ns.as_fd().as_raw_fd())
                    .build(),
            )
            .execute()
            .await
            .map_err(nl("move into the pod namespace", name.to_string()))
    }
    .await;
    task.abort();
    r.map(|()| tmp)
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    let _ = getrandom(&mut b);
    u32::from_ne_bytes(b)
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    // SAFETY: getrandom(2) writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Runs `f` with a netlink handle inside the namespace at `netns`, on a
/// thread of its own (setns(2) changes only the calling thread).
pub fn in_netns<T, F, Fut>(netns: &Path, f: F) -> Result<T, GuestNetError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, GuestNetError>>,
{
    let ns = std::fs::File::open(netns).map_err(|source| GuestNetError::Netns {
        path: netns.to_path_buf(),
        source,
    })?;
    let path = netns.to_path_buf();
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                GuestNetError::Netns {
                    path: path.clone(),
                    source: e.into(),
                }
            })?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| GuestNetError::Netns {
                    path: path.clone(),
                    source,
                })?;
            rt.block_on(async move {
                let (conn, handle, _) =
                    rtnetlink::new_connection().map_err(|source| GuestNetError::Netlink {
                        op: "open",
                        what: "a netlink socket in the pod namespace".into(),
                        source,
                    })?;
                let task = tokio::spawn(conn);
                let r = f(handle).await;
                task.abort();
                r
            })
        })
        .join()
        .unwrap_or_else(|_| {
            Err(GuestNetError::Netns {
                path: netns.to_path_buf(),
                source: std::io::Error::other("netns worker thread panicked"),
            })
        })
    })
}

fn link_kind(m: &LinkMessage) -> Option<String> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k.to_string()),
            _ => None,
        }),
        _ => None,
    })
}

/// Inside the pod namespace: the interfaces that are neither loopback, nor the NIC of
/// `spec`, nor a Hostlo segment NIC (`hostlo0`): another network manager's, as
/// `name (kind)`. Docker's bridge networks put their veth there before the task starts:
/// during `runc create` (Docker 26, the `libnetwork-setkey` hook) or between create and
/// start (Docker 28); another CNI plugin before the sandbox is created.
pub async fn foreign_links(handle: &Handle, spec: &NicSpec) -> Result<Vec<String>, GuestNetError> {
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("list", "links"))?;
    Ok(links
        .iter()
        .filter(|l| {
            let name = link_name(l);
            name != "lo"
                && name != nestless_model::hostlo::SEGMENT_IFNAME
                && link_mac(l) != Some(&spec.mac[..])
        })
        .map(|l| match link_kind(l) {
            Some(kind) => format!("{} ({kind})", link_name(l)),
            None => link_name(l),
        })
        .collect())
}

/// Inside the pod namespace: is the NIC there, named and addressed as `spec` says?
pub async fn check_configured(handle: &Handle, spec: &NicSpec) -> Result<bool, GuestNetError> {
    let Some(link) = find_by_mac(handle, &spec.mac).await? else {
        return Ok(false);
    };
    if link_name(&link) != spec.ifname {
        return Ok(false);
    }
    let addrs: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(link.header.index)
        .execute()
        .try_collect()
        .await
        .map_err(nl("list addresses of", spec.ifname.clone()))?;
    let have: Vec<IpAddr> = addrs
        .iter()
        .flat_map(|m| m.attributes.iter())
        .filter_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
        .collect();
    Ok(spec.addresses.iter().all(|(ip, _)| have.contains(ip)))
}

/// Inside a namespace: adds `ip/prefix` to the link `ifname` (present: fine).
pub async fn add_address(
    handle: &Handle,
    ifname: &str,
    ip: IpAddr,
    prefix: u8,
) -> Result<(), GuestNetError> {
    let link = handle
        .link()
        .get()
        .match_name(ifname.to_string())
        .execute()
        .try_next()
        .await
        .map_err(nl("find", ifname.to_string()))?
        .ok_or_else(|| GuestNetError::Netlink {
            op: "find",
            what: ifname.to_string(),
            source: std::io::Error::from_raw_os_error(libc::ENODEV),
        })?;
    match handle
        .address()
        .add(link.header.index, ip, prefix)
        .execute()
        .await
    {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == libc::EEXIST => Ok(()),
        Err(e) => Err(nl("add address to", format!("{ifname} ({ip}/{prefix})"))(e)),
    }
}

/// Inside the pod namespace: names, sizes, addresses and routes the NIC
/// (found by MAC), brings it and `lo` up. Idempotent.
pub async fn configure(handle: &Handle, spec: &NicSpec) -> Result<(), GuestNetError> {
    let link = find_by_mac(handle, &spec.mac)
        .await?
        .ok_or_else(|| GuestNetError::NicNotFound {
            mac: MacAddr(spec.mac).to_string(),
            after: Duration::ZERO,
        })?;
    let idx = link.header.index;
    if link_name(&link) != spec.ifname {
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(idx)
                    .down()
                    .name(spec.ifname.clone())
                    .build(),
            )
            .execute()
            .await
            .map_err(nl("rename to", spec.ifname.clone()))?;
    }
    handle
        .link()
        .set(LinkUnspec::new_with_index(idx).mtu(spec.mtu).build())
        .execute()
        .await
        .map_err(nl("set the MTU of", spec.ifname.clone()))?;
    for (ip, prefix) in &spec.addresses {
        match handle.address().add(idx, *ip, *prefix).execute().await {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == libc::EEXIST => {}
            Err(e) => {
                return Err(nl(
                    "add address to",
                    format!("{} ({ip}/{prefix})", spec.ifname),
                )(e))
            }
        }
    }
    // Announce the address when the link comes up (a gratuitous ARP): an address the
    // agent hands out again may still sit in the neighbours' caches with the MAC of its
    // previous NIC. This thread is in the pod's namespace, which /proc/sys/net follows.
    let notify = format!("/proc/sys/net/ipv4/conf/{}/arp_notify", spec.ifname);
    if let Err(e) = std::fs::write(&notify, "1") {
        log::warn!("{notify}: {e} (no gratuitous ARP)");
    }
    handle
        .link()
        .set(LinkUnspec::new_with_index(idx).up().build())
        .execute()
        .await
        .map_err(nl("set up", spec.ifname.clone()))?;
    if let Some(lo) = handle
        .link()
        .get()
        .match_name("lo".to_string())
        .execute()
        .try_next()
        .await
        .map_err(nl("find", "lo"))?
    {
        handle
            .link()
            .set(LinkUnspec::new_with_index(lo.header.index).up().build())
            .execute()
            .await
            .map_err(nl("set up", "lo"))?;
    }
    for (dst, prefix, via) in &spec.routes {
        let msg = match (dst, via) {
            (IpAddr::V4(d), Some(IpAddr::V4(g))) => {
                RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                    .destination_prefix(*d, *prefix)
                    .gateway(*g)
                    .output_interface(idx)
                    .build()
            }
            (IpAddr::V4(d), None) => RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .destination_prefix(*d, *prefix)
                .output_interface(idx)
                .build(),
            (IpAddr::V6(d), Some(IpAddr::V6(g))) => {
                RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                    .destination_prefix(*d, *prefix)
                    .gateway(*g)
                    .output_interface(idx)
                    .build()
            }
            (IpAddr::V6(d), None) => RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .destination_prefix(*d, *prefix)
                .output_interface(idx)
                .build(),
            _ => continue,
        };
        match handle.route().add(msg).execute().await {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == libc::EEXIST => {}
            Err(e) => return Err(nl("add route", format!("{dst}/{prefix} via {via:?}"))(e)),
        }
    }
    Ok(())
}

/// Puts the NIC described by `spec` into the namespace at `netns`,
/// configured. If it is already there and configured, does nothing.
///
/// With `exclusive` (the pod's own NIC), a namespace that holds an interface of another
/// network manager ([`foreign_links`]) is refused with [`GuestNetError::NotOurs`]
/// (a Hostlo segment NIC joins a namespace that has the pod's NIC: not exclusive).
pub async fn plug_into_pod(
    spec: &NicSpec,
    netns: &Path,
    wait: Duration,
    exclusive: bool,
) -> Result<(), GuestNetError> {
    let s = spec.clone();
    let (already, foreign) = {
        let netns = netns.to_path_buf();
        tokio::task::spawn_blocking(move || {
            in_netns(&netns, move |h| async move {
                let foreign = if exclusive {
                    foreign_links(&h, &s).await?
                } else {
                    Vec::new()
                };
                Ok((check_configured(&h, &s).await?, foreign))
            })
        })
        .await
        .expect("netns worker")?
    };
    if !foreign.is_empty() {
        return Err(GuestNetError::NotOurs {
            netns: netns.to_path_buf(),
            links: foreign.join(", "),
        });
    }
    if already {
        return Ok(());
    }
    // In the pod namespace already (an earlier attempt stopped half-way)?
    let s = spec.clone();
    let in_pod = {
        let netns = netns.to_path_buf();
        tokio::task::spawn_blocking(move || {
            in_netns(&netns, move |h| async move {
                Ok(wait_for_mac_in(&h, &s.mac).await?.is_some())
            })
        })
        .await
        .expect("netns worker")?
    };
    if !in_pod {
        let (index, name) = wait_for_mac(&spec.mac, wait).await?;
        move_to_netns(index, &name, netns).await?;
    }
    let s = spec.clone();
    let netns = netns.to_path_buf();
    tokio::task::spawn_blocking(move || {
        in_netns(&netns, move |h| async move { configure(&h, &s).await })
    })
    .await
    .expect("netns worker")
}
