//! Which ports a pod serves: its listening TCP sockets and bound UDP sockets,
//! read from the kernel's socket tables of the pod's namespace.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{Port, Proto};

/// A socket serving a port: its local address and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listening {
    /// Protocol.
    pub proto: Proto,
    /// Local address (0.0.0.0 / :: for any).
    pub addr: IpAddr,
    /// Port.
    pub port: u16,
}

const TCP_LISTEN: &str = "0A";
const UDP_UNCONNECTED: &str = "07";

fn hex_v4(h: &str) -> Option<Ipv4Addr> {
    let n = u32::from_str_radix(h, 16).ok()?;
    // /proc prints the address as the host-order (little-endian here) u32.
    Some(Ipv4Addr::from(n.to_le_bytes()))
}

fn hex_v6(h: &str) -> Option<Ipv6Addr> {
    if h.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for w in 0..4 {
        let n = u32::from_str_radix(&h[w * 8..w * 8 + 8], 16).ok()?;
        bytes[w * 4..w * 4 + 4].copy_from_slice(&n.to_le_bytes());
    }
    Some(Ipv6Addr::from(bytes))
}

/// Parses one `/proc/net/{tcp,tcp6,udp,udp6}` table.
pub fn parse_table(text: &str, proto: Proto) -> Vec<Listening> {
    let want = match proto {
        Proto::Tcp => TCP_LISTEN,
        Proto::Udp => UDP_UNCONNECTED,
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let _slot = f.next()?;
            let local = f.next()?;
            let remote = f.next()?;
            let state = f.next()?;
            if state != want {
                return None;
            }
            // A UDP socket that connect()ed is a client, not a service.
            if proto == Proto::Udp && !remote.ends_with(":0000") {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let addr = if addr.len() == 8 {
                IpAddr::V4(hex_v4(addr)?)
            } else {
                IpAddr::V6(hex_v6(addr)?)
            };
            Some(Listening { proto, addr, port })
        })
        .collect()
}

/// The ports the pod serves: every listening socket but those on the segment
/// address `segment` (the mux) and the ports in `exclude` (the relays').
pub fn served(found: &[Listening], segment: IpAddr, exclude: &[Port]) -> Vec<Port> {
    let mut out: Vec<Port> = found
        .iter()
        .filter(|l| l.addr != segment)
        .map(|l| Port {
            port: l.port,
            proto: l.proto,
        })
        .filter(|p| !exclude.contains(p))
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1
   3: 014DFEA9:1BAF 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1 0 100 0 0 10 0
";
    const TCP6: &str =
        "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A 0
";
    const UDP: &str = "   sl  local_address rem_address   st
  1: 00000000:0035 00000000:0000 07 0
  2: 0100007F:A000 0100007F:0035 01 0
  3: 0100007F:D431 0100007F:0035 07 0
";

    #[test]
    fn parses_tables() {
        let t = parse_table(TCP, Proto::Tcp);
        assert_eq!(t.len(), 3, "{t:?}");
        assert_eq!(
            t[0],
            Listening {
                proto: Proto::Tcp,
                addr: "127.0.0.1".parse().unwrap(),
                port: 8080
            }
        );
        assert_eq!(t[1].port, 80);
        assert_eq!(t[2].addr, "169.254.77.1".parse::<IpAddr>().unwrap());
        let t6 = parse_table(TCP6, Proto::Tcp);
        assert_eq!(t6[0].addr, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(t6[0].port, 22);
        let u = parse_table(UDP, Proto::Udp);
        assert_eq!(u.len(), 1, "connected UDP sockets are clients: {u:?}");
        assert_eq!(u[0].port, 53);
    }

    #[test]
    fn served_ports_skip_the_segment_and_relays() {
        let mut found = parse_table(TCP, Proto::Tcp);
        found.extend(parse_table(UDP, Proto::Udp));
        let relay = Port {
            port: 80,
            proto: Proto::Tcp,
        };
        let s = served(&found, "169.254.77.1".parse().unwrap(), &[relay]);
        assert_eq!(
            s,
            vec![
                Port {
                    port: 53,
                    proto: Proto::Udp
                },
                Port {
                    port: 8080,
                    proto: Proto::Tcp
                }
            ],
            "the mux on 169.254.77.1 and the relay on 80 are not services"
        );
    }
}
