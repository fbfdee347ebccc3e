//! Per-network address allocation.
//!
//! Each network hands out IPv4 addresses from its range (never the network,
//! broadcast or gateway address). The IPv6 address of a NIC, when the network
//! has `subnet6`, mirrors the IPv4 host offset, so the pair needs no second
//! allocator; an IPv4 address whose mirror is the IPv6 gateway or a reserved
//! IPv6 address (subnet-router or RFC 2526 anycast) is never handed out
//! either ([`NetworkConfig::unleasable`]), so no lease of either family is a
//! gateway, network, broadcast or anycast address. Allocation is next-fit:
//! it continues after the last address handed out (kept in the state file
//! across restarts), so a released address is not reused at once (stale
//! ARP/neighbour entries in peers age out first).
//!
//! Leases are not stored separately: they are rebuilt from the NIC records at
//! start ([`Ipam::reserve`]), so the two can never disagree.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::config::NetworkConfig;

/// Allocation errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    /// Every address of the range is leased.
    #[error("network {network:?} has no free address left ({size} addresses, all leased)")]
    Exhausted {
        /// The network.
        network: String,
        /// Size of its range.
        size: u32,
    },
    /// The address is not in the range.
    #[error("{addr} is outside the range of network {network:?}")]
    OutOfRange {
        /// The network.
        network: String,
        /// The address.
        addr: Ipv4Addr,
    },
    /// The address is never leased (a gateway, or its IPv6 mirror is one).
    #[error("{addr} is never leased on network {network:?}: {why}")]
    Reserved {
        /// The network.
        network: String,
        /// The address.
        addr: Ipv4Addr,
        /// Why.
        why: String,
    },
    /// The address is leased already.
    #[error("{addr} is already leased on network {network:?}")]
    InUse {
        /// The network.
        network: String,
        /// The address.
        addr: Ipv4Addr,
    },
}

/// The address allocator of one network.
#[derive(Debug, Clone)]
pub struct Ipam {
    net: NetworkConfig,
    first: u32,
    last: u32,
    /// Leased or reserved, by index from `first`.
    bits: Vec<u64>,
    /// Bits set (leases and reserved addresses).
    used: u32,
    /// Indices never leased (see [`NetworkConfig::unleasable`]), sorted.
    reserved: Vec<u32>,
    /// Index of the address handed out last.
    last_given: Option<u32>,
}

impl Ipam {
    /// An empty allocator for `net`.
    pub fn new(net: &NetworkConfig) -> Ipam {
        let first = u32::from(net.range.0);
        let last = u32::from(net.range.1);
        let len = (last - first + 1) as usize;
        let mut ipam = Ipam {
            net: net.clone(),
            first,
            last,
            bits: vec![0; len.div_ceil(64)],
            used: 0,
            reserved: Vec::new(),
            last_given: None,
        };
        // The addresses that may be unleasable: the gateway, the mirror of
        // the IPv6 gateway, and (when subnet6 is small) the range's end,
        // whose mirrors reach subnet6's reserved anycast block.
        let mut candidates = vec![net.gateway];
        if let Some(net6) = net.subnet6 {
            let base6 = u128::from(net6.network());
            if let Some(g6) = net.gateway6 {
                let v4 = u128::from(g6)
                    .checked_sub(base6)
                    .and_then(|o| u32::try_from(o).ok())
                    .and_then(|o| u32::from(net.subnet.network()).checked_add(o));
                candidates.extend(v4.map(Ipv4Addr::from));
            }
            let host_bits6 = 128 - u32::from(net6.prefix_len());
            if host_bits6 <= 32 {
                let size6 = 1u64 << host_bits6;
                let limit = u64::from(u32::from(net.subnet.network())) + size6.saturating_sub(128);
                let from = u32::try_from(limit.max(u64::from(first))).unwrap_or(u32::MAX);
                candidates.extend((from..=last).map(Ipv4Addr::from));
            }
        }
        for a in candidates {
            let a32 = u32::from(a);
            if (first..=last).contains(&a32) && net.unleasable(a).is_some() {
                let i = a32 - first;
                if !ipam.get(i) {
                    ipam.set(i, true);
                    ipam.reserved.push(i);
                }
            }
        }
        ipam.reserved.sort_unstable();
        ipam
    }

    fn get(&self, i: u32) -> bool {
        self.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, i: u32, on: bool) {
        let word = &mut self.bits[(i / 64) as usize];
        let mask = 1u64 << (i % 64);
        if on && *word & mask == 0 {
            *word |= mask;
            self.used += 1;
        } else if !on && *word & mask != 0 {
            *word &= !mask;
            self.used -= 1;
        }
    }

    fn size(&self) -> u32 {
        self.last - self.first + 1
    }

    /// Number of addresses the range leases (reserved ones excluded).
    pub fn capacity(&self) -> u32 {
        self.size() - self.reserved.len() as u32
    }

    /// Number of leased addresses.
    pub fn leased(&self) -> u32 {
        self.used - self.reserved.len() as u32
    }

    /// Leases the next free address after the one handed out last
    /// (next-fit, as CNI's host-local does): an address just released is
    /// not handed out again before the others have been.
    pub fn allocate(&mut self) -> Result<Ipv4Addr, IpamError> {
        let size = self.size();
        if self.used >= size {
            return Err(IpamError::Exhausted {
                network: self.net.name.clone(),
                size: self.capacity(),
            });
        }
        // Next-fit, skipping whole words that are full.
        let mut i = self.last_given.map_or(0, |l| (l + 1) % size);
        let mut scanned = 0u32;
        while scanned < size {
            if i.is_multiple_of(64) && self.bits[(i / 64) as usize] == u64::MAX && size - i >= 64 {
                i = (i + 64) % size;
                scanned += 64;
                continue;
            }
            if !self.get(i) {
                self.set(i, true);
                self.last_given = Some(i);
                return Ok(Ipv4Addr::from(self.first + i));
            }
            i = (i + 1) % size;
            scanned += 1;
        }
        Err(IpamError::Exhausted {
            network: self.net.name.clone(),
            size: self.capacity(),
        })
    }

    /// The address handed out last, if any.
    pub fn last_given(&self) -> Option<Ipv4Addr> {
        self.last_given.map(|i| Ipv4Addr::from(self.first + i))
    }

    /// Goes on after `addr` (the last address a previous run handed out,
    /// from the state file); ignored when it is not in the range.
    pub fn resume_after(&mut self, addr: Ipv4Addr) {
        let a = u32::from(addr);
        if (self.first..=self.last).contains(&a) {
            self.last_given = Some(a - self.first);
        }
    }

    fn index(&self, addr: Ipv4Addr) -> Result<u32, IpamError> {
        let a = u32::from(addr);
        if a < self.first || a > self.last {
            return Err(IpamError::OutOfRange {
                network: self.net.name.clone(),
                addr,
            });
        }
        let i = a - self.first;
        if self.reserved.binary_search(&i).is_ok() {
            return Err(IpamError::Reserved {
                network: self.net.name.clone(),
                addr,
                why: self.net.unleasable(addr).unwrap_or_default(),
            });
        }
        Ok(i)
    }

    /// Marks `addr` leased (restoring state).
    pub fn reserve(&mut self, addr: Ipv4Addr) -> Result<(), IpamError> {
        let i = self.index(addr)?;
        if self.get(i) {
            return Err(IpamError::InUse {
                network: self.net.name.clone(),
                addr,
            });
        }
        self.set(i, true);
        Ok(())
    }

    /// Frees `addr`; false when it was not leased.
    pub fn release(&mut self, addr: Ipv4Addr) -> bool {
        match self.index(addr) {
            Ok(i) if self.get(i) => {
                self.set(i, false);
                true
            }
            _ => false,
        }
    }

    /// True when `addr` is leased.
    pub fn is_leased(&self, addr: Ipv4Addr) -> bool {
        self.index(addr).map(|i| self.get(i)).unwrap_or(false)
    }

    /// The IPv6 address paired with `v4`, when the network has `subnet6`.
    pub fn ipv6_for(&self, v4: Ipv4Addr) -> Option<Ipv6Addr> {
        self.net.ipv6_for(v4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn net(subnet: &str, gw: &str, range: Option<(&str, &str)>) -> NetworkConfig {
        let subnet: ipnet::Ipv4Net = subnet.parse().unwrap();
        let range = range
            .map(|(a, b)| (a.parse().unwrap(), b.parse().unwrap()))
            .unwrap_or((
                Ipv4Addr::from(u32::from(subnet.network()) + 1),
                Ipv4Addr::from(u32::from(subnet.broadcast()) - 1),
            ));
        NetworkConfig {
            name: "t".into(),
            bridge: "br".into(),
            subnet,
            gateway: gw.parse().unwrap(),
            range,
            mtu: 1500,
            manage_bridge: false,
            subnet6: Some("fd00::/64".parse().unwrap()),
            gateway6: None,
            routes: vec![],
        }
    }

    #[test]
    fn never_hands_out_an_address_twice_and_skips_gateway() {
        let mut ipam = Ipam::new(&net("10.0.0.0/24", "10.0.0.1", None));
        assert_eq!(ipam.capacity(), 253);
        let mut seen = HashSet::new();
        for _ in 0..253 {
            let a = ipam.allocate().unwrap();
            assert_ne!(a, "10.0.0.1".parse::<Ipv4Addr>().unwrap());
            assert!(seen.insert(a), "{a} twice");
        }
        assert!(matches!(
            ipam.allocate(),
            Err(IpamError::Exhausted { size: 253, .. })
        ));
        assert_eq!(ipam.leased(), 253);
        assert!(ipam.release("10.0.0.77".parse().unwrap()));
        assert!(
            !ipam.release("10.0.0.77".parse().unwrap()),
            "double release"
        );
        assert_eq!(
            ipam.allocate().unwrap(),
            "10.0.0.77".parse::<Ipv4Addr>().unwrap()
        );
    }

    #[test]
    fn next_fit_does_not_reuse_at_once() {
        let mut ipam = Ipam::new(&net(
            "10.0.0.0/24",
            "10.0.0.1",
            Some(("10.0.0.10", "10.0.0.20")),
        ));
        let a = ipam.allocate().unwrap();
        assert_eq!(a, "10.0.0.10".parse::<Ipv4Addr>().unwrap());
        ipam.release(a);
        assert_eq!(
            ipam.allocate().unwrap(),
            "10.0.0.11".parse::<Ipv4Addr>().unwrap()
        );
    }

    #[test]
    fn reserve_restores_and_rejects_bad_addresses() {
        let mut ipam = Ipam::new(&net(
            "10.0.0.0/24",
            "10.0.0.1",
            Some(("10.0.0.10", "10.0.0.12")),
        ));
        ipam.reserve("10.0.0.11".parse().unwrap()).unwrap();
        assert!(matches!(
            ipam.reserve("10.0.0.11".parse().unwrap()),
            Err(IpamError::InUse { .. })
        ));
        assert!(matches!(
            ipam.reserve("10.0.0.13".parse().unwrap()),
            Err(IpamError::OutOfRange { .. })
        ));
        assert!(matches!(
            ipam.reserve("10.0.0.1".parse().unwrap()),
            Err(IpamError::OutOfRange { .. })
        ));
        assert!(!ipam.is_leased("10.0.0.1".parse().unwrap()));
        let got: HashSet<_> = (0..2).map(|_| ipam.allocate().unwrap()).collect();
        assert!(!got.contains(&"10.0.0.11".parse().unwrap()));
        assert!(ipam.allocate().is_err());
    }

    #[test]
    fn large_network_exhausts_exactly() {
        let mut ipam = Ipam::new(&net("10.0.0.0/20", "10.0.0.1", None));
        let cap = ipam.capacity();
        assert_eq!(cap, 4093);
        for _ in 0..cap {
            ipam.allocate().unwrap();
        }
        assert!(ipam.allocate().is_err());
        ipam.release("10.0.9.9".parse().unwrap());
        assert_eq!(
            ipam.allocate().unwrap(),
            "10.0.9.9".parse::<Ipv4Addr>().unwrap()
        );
    }

    /// Issue 9, item 3: with the IPv6 gateway at `::1`, the IPv4 address
    /// whose mirror it is (`.1`) is never leased, nor the IPv4 gateway: no
    /// lease of either family is a gateway, across the whole range.
    #[test]
    fn no_lease_mirrors_a_gateway() {
        let mut n = net("10.20.30.0/24", "10.20.30.254", None);
        n.subnet6 = Some("fd00:20::/64".parse().unwrap());
        n.gateway6 = Some("fd00:20::1".parse().unwrap());
        let mut ipam = Ipam::new(&n);
        assert_eq!(ipam.capacity(), 252, "254 less both gateways");
        let first = ipam.allocate().unwrap();
        assert_eq!(first, "10.20.30.2".parse::<Ipv4Addr>().unwrap());
        assert_eq!(ipam.ipv6_for(first), Some("fd00:20::2".parse().unwrap()));
        let mut all = vec![first];
        while let Ok(a) = ipam.allocate() {
            all.push(a);
        }
        assert_eq!(all.len(), 252);
        for a in all {
            assert_ne!(a, n.gateway);
            assert_ne!(ipam.ipv6_for(a), n.gateway6, "{a}");
        }
        assert!(matches!(
            ipam.reserve("10.20.30.1".parse().unwrap()),
            Err(IpamError::Reserved { .. })
        ));
        assert_eq!(ipam.leased(), 252);
    }

    /// A subnet6 so small that the range's mirror reaches its reserved
    /// anycast block (the top 128, RFC 2526): those addresses are never
    /// leased (the config check refuses such a network; the allocator
    /// holds the rule on its own).
    #[test]
    fn no_lease_mirrors_an_anycast_address() {
        let mut n = net("10.0.0.0/24", "10.0.0.1", None);
        n.subnet6 = Some("fd00::/120".parse().unwrap());
        let mut ipam = Ipam::new(&n);
        let mut got = Vec::new();
        while let Ok(a) = ipam.allocate() {
            got.push(a);
        }
        // .2 to .127: .1 is the gateway, .128 up mirror fd00::80 and above.
        assert_eq!(got.len(), 126);
        assert_eq!(got.last(), Some(&"10.0.0.127".parse::<Ipv4Addr>().unwrap()));
    }

    /// Next-fit goes on after the last address across a restart (the
    /// state file keeps it): a released address is not handed out again
    /// at once.
    #[test]
    fn next_fit_resumes_after_a_restart() {
        let n = net("10.0.0.0/24", "10.0.0.1", Some(("10.0.0.10", "10.0.0.20")));
        let mut ipam = Ipam::new(&n);
        let a = ipam.allocate().unwrap();
        let b = ipam.allocate().unwrap();
        ipam.release(a);
        ipam.release(b);
        let last = ipam.last_given().unwrap();
        assert_eq!(last, b);
        let mut again = Ipam::new(&n);
        again.resume_after(last);
        assert_eq!(
            again.allocate().unwrap(),
            "10.0.0.12".parse::<Ipv4Addr>().unwrap()
        );
        // Wrapping round, the freed ones come back last.
        let mut rest = Vec::new();
        while let Ok(x) = again.allocate() {
            rest.push(x);
        }
        assert_eq!(&rest[rest.len() - 2..], &[a, b]);
    }

    #[test]
    fn ipv6_mirrors_the_host_offset() {
        let ipam = Ipam::new(&net("10.0.0.0/24", "10.0.0.1", None));
        assert_eq!(
            ipam.ipv6_for("10.0.0.5".parse().unwrap()),
            Some("fd00::5".parse().unwrap())
        );
    }
}
