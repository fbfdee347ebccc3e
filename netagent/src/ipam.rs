//! Per-network address allocation.
//!
//! Each network hands out IPv4 addresses from its range (never the network,
//! broadcast or gateway address). Allocation is next-fit: it continues after
//! the last address handed out, so a released address is not reused at once
//! (stale ARP/neighbour entries in peers age out first). The IPv6 address of a
//! NIC, when the network has `subnet6`, mirrors the IPv4 host offset, so the
//! pair needs no second allocator.
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
    network: String,
    subnet_base: u32,
    first: u32,
    last: u32,
    gateway: u32,
    bits: Vec<u64>,
    used: u32,
    cursor: u32,
    subnet6: Option<ipnet::Ipv6Net>,
}

impl Ipam {
    /// An empty allocator for `net`.
    pub fn new(net: &NetworkConfig) -> Ipam {
        let first = u32::from(net.range.0);
        let last = u32::from(net.range.1);
        let len = (last - first + 1) as usize;
        let mut ipam = Ipam {
            network: net.name.clone(),
            subnet_base: u32::from(net.subnet.network()),
            first,
            last,
            gateway: u32::from(net.gateway),
            bits: vec![0; len.div_ceil(64)],
            used: 0,
            cursor: 0,
            subnet6: net.subnet6,
        };
        // The gateway is never handed out; mark it used if it lies in the range.
        if (first..=last).contains(&ipam.gateway) {
            ipam.set(ipam.gateway - first, true);
        }
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

    /// Number of addresses the range holds (the gateway excluded).
    pub fn capacity(&self) -> u32 {
        self.size() - u32::from((self.first..=self.last).contains(&self.gateway))
    }

    /// Number of leased addresses.
    pub fn leased(&self) -> u32 {
        self.used - u32::from((self.first..=self.last).contains(&self.gateway))
    }

    /// Leases the next free address.
    pub fn allocate(&mut self) -> Result<Ipv4Addr, IpamError> {
        let size = self.size();
        if self.used >= size {
            return Err(IpamError::Exhausted {
                network: self.network.clone(),
                size: self.capacity(),
            });
        }
        // Next-fit, skipping whole words that are full.
        let mut i = self.cursor % size;
        let mut scanned = 0u32;
        while scanned < size {
            if i.is_multiple_of(64) && self.bits[(i / 64) as usize] == u64::MAX && size - i >= 64 {
                i = (i + 64) % size;
                scanned += 64;
                continue;
            }
            if !self.get(i) {
                self.set(i, true);
                self.cursor = (i + 1) % size;
                return Ok(Ipv4Addr::from(self.first + i));
            }
            i = (i + 1) % size;
            scanned += 1;
        }
        Err(IpamError::Exhausted {
            network: self.network.clone(),
            size: self.capacity(),
        })
    }

    fn index(&self, addr: Ipv4Addr) -> Result<u32, IpamError> {
        let a = u32::from(addr);
        if a < self.first || a > self.last || a == self.gateway {
            return Err(IpamError::OutOfRange {
                network: self.network.clone(),
                addr,
            });
        }
        Ok(a - self.first)
    }

    /// Marks `addr` leased (restoring state).
    pub fn reserve(&mut self, addr: Ipv4Addr) -> Result<(), IpamError> {
        let i = self.index(addr)?;
        if self.get(i) {
            return Err(IpamError::InUse {
                network: self.network.clone(),
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
        let net6 = self.subnet6?;
        let offset = u32::from(v4).checked_sub(self.subnet_base)?;
        Some(Ipv6Addr::from(
            u128::from(net6.network()) + u128::from(offset),
        ))
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

    #[test]
    fn ipv6_mirrors_the_host_offset() {
        let ipam = Ipam::new(&net("10.0.0.0/24", "10.0.0.1", None));
        assert_eq!(
            ipam.ipv6_for("10.0.0.5".parse().unwrap()),
            Some("fd00::5".parse().unwrap())
        );
    }
}
