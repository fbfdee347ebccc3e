//! The packets that tell neighbours where an address now is: a gratuitous
//! ARP request (IPv4) and an unsolicited neighbour advertisement (IPv6,
//! RFC 4861 section 7.2.6), built here and sent on raw sockets of the pod's
//! namespace.
//!
//! A neighbour that caches the address with the MAC of the NIC that had it
//! before (the agent hands addresses out again) takes the new MAC from
//! either: Linux treats an ARP request whose sender and target addresses are
//! equal as gratuitous and overrides its entry, and an advertisement with the
//! override flag replaces the cached link-layer address.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV6},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// ARP request whose sender and target are `ip` (gratuitous), from `mac`.
pub fn garp(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 28] {
    let mut p = [0u8; 28];
    p[0..2].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    p[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    p[4] = 6; // hardware address length
    p[5] = 4; // protocol address length
    p[6..8].copy_from_slice(&1u16.to_be_bytes()); // request
    p[8..14].copy_from_slice(&mac);
    p[14..18].copy_from_slice(&ip.octets());
    // target hardware address: zero (unknown), as the kernel's own
    p[24..28].copy_from_slice(&ip.octets());
    p
}

/// ICMPv6 neighbour advertisement for `target` at `mac`: override set,
/// solicited and router clear, with the target link-layer address option.
/// The checksum is left zero: the kernel fills it in on a raw ICMPv6 socket.
pub fn unsolicited_na(mac: [u8; 6], target: Ipv6Addr) -> [u8; 32] {
    let mut p = [0u8; 32];
    p[0] = 136; // neighbour advertisement
    p[1] = 0; // code
    p[4] = 0x20; // flags: R=0 S=0 O=1
    p[8..24].copy_from_slice(&target.octets());
    p[24] = 2; // option: target link-layer address
    p[25] = 1; // length, in units of 8 bytes
    p[26..32].copy_from_slice(&mac);
    p
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn socket(domain: libc::c_int, kind: libc::c_int, protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the new fd is owned here.
    let fd = check(unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) })?;
    // SAFETY: the kernel just returned this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends a gratuitous ARP for `ip` out of link `index` (broadcast), from the
/// calling thread's network namespace.
pub fn send_garp(index: u32, mac: [u8; 6], ip: Ipv4Addr) -> io::Result<()> {
    let eth_p_arp = (libc::ETH_P_ARP as u16).to_be();
    let fd = socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(eth_p_arp))?;
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid starting value.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = eth_p_arp;
    to.sll_ifindex = index as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    let packet = garp(mac, ip);
    // SAFETY: the buffer and the address live across the call, with their lengths.
    check(unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&to as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    } as libc::c_int)?;
    Ok(())
}

/// Sends an unsolicited neighbour advertisement for `ip` out of link
/// `index` to all nodes (ff02::1), from `ip` itself, hop limit 255, from the
/// calling thread's network namespace. `ip` must be usable (not tentative).
pub fn send_na(index: u32, mac: [u8; 6], ip: Ipv6Addr) -> io::Result<()> {
    let fd = socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6)?;
    let set = |opt: libc::c_int, value: libc::c_int| -> io::Result<()> {
        // SAFETY: setsockopt(2) reads one c_int from the pointer.
        check(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_IPV6,
                opt,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        })
        .map(drop)
    };
    set(libc::IPV6_MULTICAST_HOPS, 255)?;
    set(libc::IPV6_MULTICAST_IF, index as libc::c_int)?;
    let from = socket2::SockAddr::from(SocketAddrV6::new(ip, 0, 0, 0));
    // SAFETY: bind(2) with a valid sockaddr_in6 and its length.
    check(unsafe { libc::bind(fd.as_raw_fd(), from.as_ptr().cast(), from.len()) })?;
    let to = socket2::SockAddr::from(SocketAddrV6::new(
        Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
        0,
        0,
        index,
    ));
    let packet = unsolicited_na(mac, ip);
    // SAFETY: the buffer and the address live across the call, with their lengths.
    check(unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            to.as_ptr().cast(),
            to.len(),
        )
    } as libc::c_int)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gratuitous_arp_names_the_address_twice() {
        let p = garp([2, 0, 0, 0, 0, 9], Ipv4Addr::new(10, 0, 0, 5));
        assert_eq!(&p[0..8], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&p[8..14], &[2, 0, 0, 0, 0, 9]);
        assert_eq!(&p[14..18], &[10, 0, 0, 5], "sender");
        assert_eq!(&p[18..24], &[0; 6]);
        assert_eq!(&p[24..28], &[10, 0, 0, 5], "target");
    }

    #[test]
    fn an_unsolicited_advertisement_overrides() {
        let ip: Ipv6Addr = "fd00::5".parse().unwrap();
        let p = unsolicited_na([2, 0, 0, 0, 0, 9], ip);
        assert_eq!((p[0], p[1]), (136, 0));
        assert_eq!(p[4], 0x20, "override, not solicited, not a router");
        assert_eq!(&p[8..24], &ip.octets());
        assert_eq!(&p[24..32], &[2, 1, 2, 0, 0, 0, 0, 9]);
    }
}
