//! Inside the VM: find the hot-plugged NIC by its MAC, move it into the pod's
//! network namespace and configure it there, and return once it is usable.
//!
//! ```text
//! shim / nestless-cni (VM's namespace)        kernel
//!   subscribe to link events, list links ───▶  (the virtio-net probe may still be running)
//!   ...until a link has the MAC         ◀───── new link ethN (a link manager may bring it up)
//!   ethN: netns = pod, name = eth0  ────────▶  one request: the kernel takes it down,
//!                                              moves and names it (no rename of an up link)
//! pod's namespace:
//!   arp_notify, ndisc_notify; short DAD timer, keep_addr_on_down (IPv6)
//!   mtu, addresses, up; lo up
//!   wait (link and address events): link running, every IPv6 address past DAD
//!     (dadfailed: the attach fails)
//!   DAD timer back; routes
//!   announce each address: gratuitous ARP / unsolicited NA, three times
//! ```
//!
//! No polling: the waits are on netlink events, with deadlines.
//!
//! **Renames.** A kernel before 6.2 refuses to rename a link that is up
//! (`EBUSY`), and applies a request's new name before its "down": a NIC that
//! something in the VM brought up (a link manager does so with every new
//! link) cannot be taken down and renamed in one request. The NIC is
//! therefore moved and named in the request that moves it into the pod: the
//! kernel takes it down as part of the move, under its lock. A rename that
//! still has to happen in the pod (a NIC an older shim left there under a
//! transit name) takes the link down first, in a request of its own, and is
//! tried again if the link came back up in between.
//!
//! **IPv6 duplicate address detection.** An address is tentative (cannot be
//! bound) until DAD ends, and unusable for good when it fails. Waiting for the
//! default DAD (a random delay up to a second, then a second per probe) would
//! slow every attach, and skipping DAD would hide a duplicate: the pod's
//! interface gets a DAD of three probes ([`DAD_TRANSMITS`]: the first can
//! be lost before the other end forwards), no initial delay and a 100 ms
//! retransmission timer while it starts ([`DAD_RETRANS_MS`]; restored
//! afterwards, as it is the neighbour discovery timer too), and the plug
//! returns once every address has passed it. A failed DAD fails the plug.
//!
//! **Announcements.** The agent hands addresses out again; a neighbour may
//! still cache one with the MAC of the NIC that had it before. The kernel's
//! own gratuitous ARP when the link comes up (`arp_notify`) goes out before
//! the link is running (and before a veth's bridge port forwards), so it is
//! lost: once the link runs and the addresses are usable, each address is
//! announced explicitly, [`ANNOUNCE_GAPS`] apart (IPv4: gratuitous ARP; IPv6:
//! unsolicited neighbour advertisement with the override flag, which the
//! kernel also sends after DAD with `ndisc_notify`).
//!
//! [`plug_into_pod`] strings these steps together through the kernel; [`plug`]
//! is the same through any [`NsLinks`] (a fake kernel in the unit tests). A
//! NIC already in place and usable (a retry, or a NIC `nestless-cni`
//! plugged) is left as it is.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use nestless_model::MacAddr;
use tokio::time::Instant;

use crate::agent_client::Nic;

mod announce;
#[cfg(test)]
mod fake;
pub mod links;
mod netlink;

pub use links::{Addr, Link, NsLinks};
pub use netlink::Netlink;

/// The IPv6 retransmission timer of a pod interface while its addresses go
/// through duplicate address detection (no initial delay).
pub const DAD_RETRANS_MS: u32 = 100;

/// Neighbour solicitations each address sends in duplicate address
/// detection (`dad_transmits`; the kernel's default is 1). The first is
/// sent the moment the link runs, which can be before the NIC's other end
/// forwards: a veth's host end joins its bridge's forwarding state only when
/// the kernel's link watch has handled its carrier, so one probe was lost now
/// and then on a loaded host and a duplicate went unseen. Three probes,
/// [`DAD_RETRANS_MS`] apart, give 200 ms for that; DAD takes 300 ms.
pub const DAD_TRANSMITS: u32 = 3;

/// When each address is announced, after the link runs: three times, so
/// that a neighbour (or a bridge port) that was not ready for the first
/// hears a later one.
pub const ANNOUNCE_GAPS: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(30),
    Duration::from_millis(70),
];

/// How many times a rename in the pod is tried when something brings the
/// link up between the "down" and the rename.
const RENAME_ATTEMPTS: u32 = 5;

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

    fn has_ipv6(&self) -> bool {
        self.addresses.iter().any(|(ip, _)| ip.is_ipv6())
    }
}

/// A route as people write it: `default via 10.0.0.1`, `10.1.0.0/16 via
/// 10.0.0.1`, `10.0.0.0/24 on link`.
pub fn route_text(destination: IpAddr, prefix: u8, via: Option<IpAddr>) -> String {
    let dst = if prefix == 0 {
        "default".to_owned()
    } else {
        format!("{destination}/{prefix}")
    };
    match via {
        Some(g) => format!("{dst} via {g}"),
        None => format!("{dst} on link"),
    }
}

/// Guest-side failures. The kernel's answer (an `io::Error`) is part of each
/// message, and not a separate cause, so that a chain of causes does not say
/// it twice.
#[derive(Debug, thiserror::Error)]
pub enum GuestNetError {
    /// The NIC did not show up.
    #[error(
        "no NIC with MAC {mac} appeared within {} ms (hot-plug not seen by the guest kernel?)",
        after.as_millis()
    )]
    NicNotFound {
        /// The MAC.
        mac: String,
        /// How long the shim waited.
        after: Duration,
    },
    /// The NIC is in the pod already, under another interface name: it is
    /// another attachment's, and is left alone.
    #[error("the NIC with MAC {mac} is in the pod already as {name}, not {want}: left as it is")]
    InPodAs {
        /// The MAC.
        mac: String,
        /// Its name in the pod.
        name: String,
        /// The name asked for.
        want: String,
    },
    /// The pod's namespace holds a network interface that nestless did not put there.
    #[error(
        "network namespace {} already has {links}, which nestless did not put there: \
         nestless gives a container its own NIC and shares its network namespace with no \
         other network (with Docker: run with --network none)",
        netns.display()
    )]
    NotOurs {
        /// The namespace.
        netns: PathBuf,
        /// The interfaces found, e.g. `eth0 (veth)`.
        links: String,
    },
    /// A network namespace could not be used.
    #[error("cannot use network namespace {}: {error}", path.display())]
    Netns {
        /// The namespace.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A netlink request failed.
    #[error("cannot {op} {what}: {error}")]
    Netlink {
        /// What was being done.
        op: &'static str,
        /// On what.
        what: String,
        /// The kernel's answer.
        error: std::io::Error,
    },
    /// A route could not be added.
    #[error("cannot add route {route}: {error}")]
    Route {
        /// The route, as `ip route` writes it.
        route: String,
        /// The kernel's answer.
        error: std::io::Error,
    },
    /// A setting under `/proc/sys/net` could not be read or written.
    #[error("cannot use /proc/sys/net/{key}: {error}")]
    Sysctl {
        /// The key, e.g. `ipv4/conf/eth0/arp_notify`.
        key: String,
        /// Why.
        error: std::io::Error,
    },
    /// An address could not be announced to the neighbours.
    #[error("cannot announce {ip}: {error}")]
    Announce {
        /// The address.
        ip: IpAddr,
        /// Why.
        error: std::io::Error,
    },
    /// Duplicate address detection found the address in use on the link.
    #[error(
        "address {ip} of {ifname} is in use elsewhere on the network (IPv6 duplicate address detection failed)"
    )]
    DadFailed {
        /// The interface.
        ifname: String,
        /// The address.
        ip: IpAddr,
    },
    /// The NIC did not become usable in time.
    #[error("{ifname} was not usable within {} ms: {why}", after.as_millis())]
    NotUsable {
        /// The interface.
        ifname: String,
        /// How long the plug waited.
        after: Duration,
        /// What was still missing.
        why: String,
    },
}

impl GuestNetError {
    fn is_busy(&self) -> bool {
        matches!(self, Self::Netlink { error, .. } if error.raw_os_error() == Some(libc::EBUSY))
    }
}

/// Whether `name` is the transit name an older shim gave a NIC on its way
/// into the pod (`nlm` and eight hex digits).
fn is_transit_name(name: &str) -> bool {
    name.len() == 11 && name.starts_with("nlm") && name[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

async fn find(ns: &dyn NsLinks, mac: &[u8; 6]) -> Result<Option<Link>, GuestNetError> {
    Ok(ns
        .links()
        .await?
        .into_iter()
        .find(|l| l.mac.as_ref() == Some(mac)))
}

/// Waits (on link events, no polling) until a link with `mac` exists in
/// `ns`; returns it.
pub async fn wait_for_mac(
    ns: &dyn NsLinks,
    mac: &[u8; 6],
    timeout: Duration,
) -> Result<Link, GuestNetError> {
    let deadline = Instant::now() + timeout;
    // Subscribed first, listed second: a link appearing in between is seen.
    let mut changes = ns.watch().await?;
    loop {
        if let Some(l) = find(ns, mac).await? {
            return Ok(l);
        }
        match tokio::time::timeout_at(deadline, changes.next()).await {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                return Err(GuestNetError::NicNotFound {
                    mac: MacAddr(*mac).to_string(),
                    after: timeout,
                })
            }
        }
    }
}

/// How the NIC of a spec is in the pod's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicState {
    /// No link with the MAC.
    Missing,
    /// There, named, up, every address present and usable.
    Ready,
    /// There, but not as the spec says (what differs).
    Differs(String),
    /// An address failed duplicate address detection.
    DadFailed(IpAddr),
}

/// Inside the pod's namespace: is the NIC there, named, up and addressed as
/// `spec` says, every address usable?
pub async fn check_configured(ns: &dyn NsLinks, spec: &NicSpec) -> Result<NicState, GuestNetError> {
    let Some(link) = find(ns, &spec.mac).await? else {
        return Ok(NicState::Missing);
    };
    if link.name != spec.ifname {
        return Ok(NicState::Differs(format!("it is named {}", link.name)));
    }
    if !link.up {
        return Ok(NicState::Differs("it is down".into()));
    }
    let have = ns.addresses(link.index).await?;
    for (ip, prefix) in &spec.addresses {
        match have.iter().find(|a| a.ip == *ip) {
            None => return Ok(NicState::Differs(format!("{ip}/{prefix} is missing"))),
            Some(a) if a.dad_failed => return Ok(NicState::DadFailed(*ip)),
            Some(a) if a.tentative => {
                return Ok(NicState::Differs(format!("{ip} is still tentative")))
            }
            Some(_) => {}
        }
    }
    Ok(NicState::Ready)
}

/// Inside the pod's namespace: the interfaces of another network manager, as
/// `name (kind)`: every link but `lo`, the NIC of `spec` and a Hostlo segment
/// NIC (`hostlo0`) that is up or holds the name `spec` asks for. (A kernel
/// with tunnel modules loaded gives every namespace its fallback devices,
/// `tunl0`, `sit0`, ...: down, and named otherwise, they are nobody's.)
///
/// Docker's networks put their veth there before the task starts: during
/// `runc create` (Docker 26, the `libnetwork-setkey` hook) or between create
/// and start (Docker 28, `SetKey`).
pub async fn foreign_links(ns: &dyn NsLinks, spec: &NicSpec) -> Result<Vec<String>, GuestNetError> {
    Ok(ns
        .links()
        .await?
        .into_iter()
        .filter(|l| {
            l.name != "lo"
                && l.name != nestless_model::hostlo::SEGMENT_IFNAME
                && l.mac.as_ref() != Some(&spec.mac)
                && (l.up || l.name == spec.ifname)
        })
        .map(|l| match l.kind {
            Some(kind) => format!("{} ({kind})", l.name),
            None => l.name,
        })
        .collect())
}

/// Puts the NIC described by `spec` into the namespace at `netns`,
/// configured and usable, through the kernel. A NIC already in place and
/// usable is left as it is. With `exclusive` (a container's own namespace),
/// a namespace that holds another manager's interface ([`foreign_links`]) is
/// refused with [`GuestNetError::NotOurs`] before anything is moved.
pub async fn plug_into_pod(
    spec: &NicSpec,
    netns: &Path,
    wait: Duration,
    exclusive: bool,
) -> Result<(), GuestNetError> {
    let root = Netlink::current()?;
    let pod = Netlink::open(netns)?;
    plug(&root, &pod, netns, spec, wait, exclusive).await
}

/// [`plug_into_pod`] through `root` (the VM's namespace, where the NIC
/// appears) and `pod` (the namespace at `netns`).
pub async fn plug(
    root: &dyn NsLinks,
    pod: &dyn NsLinks,
    netns: &Path,
    spec: &NicSpec,
    wait: Duration,
    exclusive: bool,
) -> Result<(), GuestNetError> {
    if exclusive {
        let foreign = foreign_links(pod, spec).await?;
        if !foreign.is_empty() {
            return Err(GuestNetError::NotOurs {
                netns: netns.to_path_buf(),
                links: foreign.join(", "),
            });
        }
    }
    match find(pod, &spec.mac).await? {
        Some(link) if link.name == spec.ifname => {
            if check_configured(pod, spec).await? == NicState::Ready {
                return Ok(());
            }
        }
        // An earlier attempt stopped half-way (an older shim's transit name).
        Some(link) if is_transit_name(&link.name) => {}
        Some(link) => {
            return Err(GuestNetError::InPodAs {
                mac: MacAddr(spec.mac).to_string(),
                name: link.name,
                want: spec.ifname.clone(),
            })
        }
        None => {
            let link = wait_for_mac(root, &spec.mac, wait).await?;
            root.move_to(link.index, netns, &spec.ifname).await?;
        }
    }
    configure(pod, spec, wait).await
}

/// Renames link `index` of `ns` to `name`: down first (a request of its own),
/// then the rename; again if something brought the link up in between.
async fn rename_down(ns: &dyn NsLinks, index: u32, name: &str) -> Result<(), GuestNetError> {
    let mut attempt = 1;
    loop {
        ns.set_up(index, false).await?;
        match ns.rename(index, name).await {
            Err(e) if e.is_busy() && attempt < RENAME_ATTEMPTS => attempt += 1,
            other => return other,
        }
    }
}

/// Writes a setting that helps but is not essential (logged when refused).
async fn try_sysctl(ns: &dyn NsLinks, key: &str, value: &str, without: &str) {
    if let Err(e) = ns.set_sysctl(key, value).await {
        log::warn!("{e} ({without})");
    }
}

/// Inside the pod's namespace: names, sizes and addresses the NIC (found by
/// MAC), brings it and `lo` up, waits until it is usable, adds the routes and
/// announces the addresses. Idempotent. `wait` bounds the wait for usable.
pub async fn configure(
    ns: &dyn NsLinks,
    spec: &NicSpec,
    wait: Duration,
) -> Result<(), GuestNetError> {
    let link = find(ns, &spec.mac)
        .await?
        .ok_or_else(|| GuestNetError::NicNotFound {
            mac: MacAddr(spec.mac).to_string(),
            after: Duration::ZERO,
        })?;
    let idx = link.index;
    let ifname = spec.ifname.as_str();
    if link.name != ifname {
        rename_down(ns, idx, ifname).await?;
    }
    try_sysctl(
        ns,
        &format!("ipv4/conf/{ifname}/arp_notify"),
        "1",
        "no gratuitous ARP when it comes up",
    )
    .await;
    let mut retrans = None;
    if spec.has_ipv6() {
        try_sysctl(
            ns,
            &format!("ipv6/conf/{ifname}/ndisc_notify"),
            "1",
            "no neighbour advertisement from the kernel",
        )
        .await;
        try_sysctl(
            ns,
            &format!("ipv6/conf/{ifname}/router_solicitation_delay"),
            "0",
            "DAD starts after a random delay",
        )
        .await;
        // IPv6 addresses go when a link goes down, unless told to stay: a pod that
        // takes eth0 down and up again would keep IPv4 only.
        try_sysctl(
            ns,
            &format!("ipv6/conf/{ifname}/keep_addr_on_down"),
            "1",
            "IPv6 addresses are lost when the link goes down",
        )
        .await;
        try_sysctl(
            ns,
            &format!("ipv6/conf/{ifname}/dad_transmits"),
            &DAD_TRANSMITS.to_string(),
            "a duplicate address may go unseen",
        )
        .await;
        let key = format!("ipv6/neigh/{ifname}/retrans_time_ms");
        match ns.sysctl(&key).await {
            Ok(old) => {
                try_sysctl(ns, &key, &DAD_RETRANS_MS.to_string(), "DAD takes longer").await;
                retrans = Some((key, old));
            }
            Err(e) => log::warn!("{e} (DAD takes longer)"),
        }
    }
    ns.set_mtu(idx, spec.mtu).await?;
    for (ip, prefix) in &spec.addresses {
        ns.add_address(idx, *ip, *prefix).await?;
    }
    ns.set_up(idx, true).await?;
    if let Some(lo) = ns.links().await?.into_iter().find(|l| l.name == "lo") {
        ns.set_up(lo.index, true).await?;
    }
    let usable = wait_usable(ns, idx, spec, wait).await;
    if let Some((key, old)) = retrans {
        try_sysctl(ns, &key, &old, "neighbour discovery keeps the DAD timer").await;
    }
    usable?;
    for (dst, prefix, via) in &spec.routes {
        ns.add_route(idx, *dst, *prefix, *via).await?;
    }
    for gap in ANNOUNCE_GAPS {
        tokio::time::sleep(gap).await;
        for (ip, _) in &spec.addresses {
            if let Err(e) = ns.announce(idx, spec.mac, *ip).await {
                log::warn!("{ifname}: {e}");
            }
        }
    }
    Ok(())
}

/// Waits (on link and address events) until link `idx` runs and every
/// address of `spec` has passed duplicate address detection.
async fn wait_usable(
    ns: &dyn NsLinks,
    idx: u32,
    spec: &NicSpec,
    wait: Duration,
) -> Result<(), GuestNetError> {
    let deadline = Instant::now() + wait;
    let mut changes = ns.watch().await?;
    loop {
        let running = ns
            .links()
            .await?
            .into_iter()
            .find(|l| l.index == idx)
            .is_some_and(|l| l.running);
        let have = ns.addresses(idx).await?;
        let mut pending = Vec::new();
        for (ip, _) in &spec.addresses {
            match have.iter().find(|a| a.ip == *ip) {
                Some(a) if a.dad_failed => {
                    return Err(GuestNetError::DadFailed {
                        ifname: spec.ifname.clone(),
                        ip: *ip,
                    })
                }
                Some(a) if a.tentative => pending.push(format!("{ip} is still tentative")),
                Some(_) => {}
                None => pending.push(format!("{ip} is gone")),
            }
        }
        if running && pending.is_empty() {
            return Ok(());
        }
        let expired = !matches!(
            tokio::time::timeout_at(deadline, changes.next()).await,
            Ok(true)
        );
        if expired {
            if !running {
                pending.insert(0, "the link is not running (no carrier?)".into());
            }
            return Err(GuestNetError::NotUsable {
                ifname: spec.ifname.clone(),
                after: wait,
                why: pending.join(", "),
            });
        }
    }
}

#[cfg(test)]
mod tests;
