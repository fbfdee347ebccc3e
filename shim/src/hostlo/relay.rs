//! The relays that carry a pod's localhost traffic between its parts.
//!
//! TCP: a connection to an egress relay is carried over one TCP connection to
//! the serving part's mux, which starts with `NLH1` and the target port (big
//! endian); the mux then connects to the service and copies both ways.
//!
//! UDP: each datagram to an egress relay goes to the serving part's mux as
//! `NLU1`, the target port, a session id (both big endian), then the payload.
//! The mux keeps one socket per (peer, session) connected to the service and
//! sends replies back with the same header; the egress relay hands them to the
//! client the session belongs to. Idle sessions end after [`UDP_IDLE`].

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, UdpSocket},
};

use super::{sockets::NetnsSockets, Port, Proto};

/// First bytes of a relayed TCP connection.
pub const TCP_MAGIC: &[u8; 4] = b"NLH1";
/// First bytes of a relayed UDP datagram.
pub const UDP_MAGIC: &[u8; 4] = b"NLU1";
/// A UDP session without traffic for this long ends.
pub const UDP_IDLE: Duration = Duration::from_secs(120);
const UDP_HEADER: usize = 10;
const MAX_DATAGRAM: usize = 65_535;

/// Where the mux delivers each port: the address the local service listens
/// on (loopback when it listens on any or on loopback).
pub type Targets = Arc<Mutex<HashMap<Port, IpAddr>>>;

fn target(targets: &Targets, port: Port) -> IpAddr {
    targets
        .lock()
        .expect("targets lock")
        .get(&port)
        .copied()
        .filter(|a| !a.is_unspecified())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// Carries every connection accepted on `listener` to `port` at the mux `mux`.
pub async fn tcp_egress(
    listener: TcpListener,
    port: u16,
    mux: SocketAddr,
    sockets: Arc<NetnsSockets>,
) {
    loop {
        let mut client = match listener.accept().await {
            Ok((c, _)) => c,
            Err(e) => {
                log::warn!("hostlo: accept on relay for {port}/tcp failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let sockets = sockets.clone();
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            let mut up = match sockets.tcp_connect(mux).await {
                Ok(u) => u,
                Err(e) => {
                    log::debug!("hostlo: {port}/tcp: cannot reach the serving part at {mux}: {e}");
                    return;
                }
            };
            let mut head = [0u8; 6];
            head[..4].copy_from_slice(TCP_MAGIC);
            head[4..].copy_from_slice(&port.to_be_bytes());
            if up.write_all(&head).await.is_ok() {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
            }
        });
    }
}

/// Accepts relayed connections on the segment and delivers them locally.
pub async fn tcp_mux(listener: TcpListener, targets: Targets, sockets: Arc<NetnsSockets>) {
    loop {
        let mut peer = match listener.accept().await {
            Ok((p, _)) => p,
            Err(e) => {
                log::warn!("hostlo: mux accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let sockets = sockets.clone();
        let targets = targets.clone();
        tokio::spawn(async move {
            let _ = peer.set_nodelay(true);
            let mut head = [0u8; 6];
            match tokio::time::timeout(Duration::from_secs(10), peer.read_exact(&mut head)).await {
                Ok(Ok(_)) if &head[..4] == TCP_MAGIC => {}
                _ => return,
            }
            let port = u16::from_be_bytes([head[4], head[5]]);
            let addr = SocketAddr::new(
                target(
                    &targets,
                    Port {
                        port,
                        proto: Proto::Tcp,
                    },
                ),
                port,
            );
            match sockets.tcp_connect(addr).await {
                Ok(mut local) => {
                    let _ = tokio::io::copy_bidirectional(&mut peer, &mut local).await;
                }
                Err(e) => log::debug!("hostlo: mux: {addr} refused: {e}"),
            }
        });
    }
}

fn udp_header(port: u16, session: u32) -> [u8; UDP_HEADER] {
    let mut h = [0u8; UDP_HEADER];
    h[..4].copy_from_slice(UDP_MAGIC);
    h[4..6].copy_from_slice(&port.to_be_bytes());
    h[6..].copy_from_slice(&session.to_be_bytes());
    h
}

fn parse_udp_header(b: &[u8]) -> Option<(u16, u32)> {
    if b.len() < UDP_HEADER || &b[..4] != UDP_MAGIC {
        return None;
    }
    Some((
        u16::from_be_bytes([b[4], b[5]]),
        u32::from_be_bytes([b[6], b[7], b[8], b[9]]),
    ))
}

/// Carries datagrams sent to `front` to `port` at the mux `mux`, and replies back.
pub async fn udp_egress(front: UdpSocket, port: u16, mux: SocketAddr, sockets: Arc<NetnsSockets>) {
    let any = SocketAddr::new(
        if mux.is_ipv4() {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            "::".parse().expect("::")
        },
        0,
    );
    // Connected to the mux: replies come only from there, and the socket is
    // a client in the pod's socket table, not a service to publish.
    let back = match sockets.udp_bind(any).await {
        Ok(b) => b,
        Err(e) => {
            log::warn!("hostlo: {port}/udp: cannot open the segment socket: {e}");
            return;
        }
    };
    if let Err(e) = back.connect(mux).await {
        log::warn!("hostlo: {port}/udp: cannot reach the mux at {mux}: {e}");
        return;
    }
    let mut by_client: HashMap<SocketAddr, (u32, Instant)> = HashMap::new();
    let mut by_id: HashMap<u32, SocketAddr> = HashMap::new();
    let mut next = 1u32;
    let mut buf = vec![0u8; MAX_DATAGRAM + UDP_HEADER];
    let mut reply = vec![0u8; MAX_DATAGRAM + UDP_HEADER];
    let mut sweep = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            r = front.recv_from(&mut buf[UDP_HEADER..]) => {
                let Ok((n, client)) = r else { continue };
                let id = match by_client.get_mut(&client) {
                    Some((id, seen)) => { *seen = Instant::now(); *id }
                    None => {
                        let id = next;
                        next = next.wrapping_add(1).max(1);
                        by_client.insert(client, (id, Instant::now()));
                        by_id.insert(id, client);
                        id
                    }
                };
                buf[..UDP_HEADER].copy_from_slice(&udp_header(port, id));
                let _ = back.send(&buf[..UDP_HEADER + n]).await;
            }
            r = back.recv(&mut reply) => {
                let Ok(n) = r else { continue };
                let Some((_, id)) = parse_udp_header(&reply[..n]) else { continue };
                if let Some(client) = by_id.get(&id) {
                    let _ = front.send_to(&reply[UDP_HEADER..n], *client).await;
                }
            }
            _ = sweep.tick() => {
                let now = Instant::now();
                by_client.retain(|_, (id, seen)| {
                    let keep = now.duration_since(*seen) < UDP_IDLE;
                    if !keep { by_id.remove(id); }
                    keep
                });
            }
        }
    }
}

/// The mux's UDP sessions: (peer, session id) -> the local socket.
type Sessions = Arc<Mutex<HashMap<(SocketAddr, u32), Arc<UdpSocket>>>>;

/// Receives relayed datagrams on the segment and delivers them locally, one
/// local socket per (peer, session), replies going back the same way.
pub async fn udp_mux(sock: UdpSocket, targets: Targets, sockets: Arc<NetnsSockets>) {
    let sock = Arc::new(sock);
    let sessions: Sessions = Arc::default();
    let mut buf = vec![0u8; MAX_DATAGRAM + UDP_HEADER];
    loop {
        let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        let Some((port, id)) = parse_udp_header(&buf[..n]) else {
            continue;
        };
        let existing = sessions
            .lock()
            .expect("sessions lock")
            .get(&(peer, id))
            .cloned();
        let local = match existing {
            Some(l) => l,
            None => {
                let dst = SocketAddr::new(
                    target(
                        &targets,
                        Port {
                            port,
                            proto: Proto::Udp,
                        },
                    ),
                    port,
                );
                let any = SocketAddr::new(
                    if dst.is_ipv4() {
                        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                    } else {
                        "::".parse().expect("::")
                    },
                    0,
                );
                let l = match sockets.udp_bind(any).await {
                    Ok(l) => Arc::new(l),
                    Err(e) => {
                        log::warn!("hostlo: mux: cannot open a UDP socket: {e}");
                        continue;
                    }
                };
                if l.connect(dst).await.is_err() {
                    continue;
                }
                sessions
                    .lock()
                    .expect("sessions lock")
                    .insert((peer, id), l.clone());
                let (l2, sock2, sessions2) = (l.clone(), sock.clone(), sessions.clone());
                tokio::spawn(async move {
                    let mut rbuf = vec![0u8; MAX_DATAGRAM + UDP_HEADER];
                    loop {
                        match tokio::time::timeout(UDP_IDLE, l2.recv(&mut rbuf[UDP_HEADER..])).await
                        {
                            Ok(Ok(m)) => {
                                rbuf[..UDP_HEADER].copy_from_slice(&udp_header(port, id));
                                let _ = sock2.send_to(&rbuf[..UDP_HEADER + m], peer).await;
                            }
                            Ok(Err(_)) => {}
                            Err(_) => break,
                        }
                    }
                    sessions2.lock().expect("sessions lock").remove(&(peer, id));
                });
                l
            }
        };
        let _ = local.send(&buf[UDP_HEADER..n]).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_header_round_trip() {
        let h = udp_header(5353, 0xdead_beef);
        assert_eq!(parse_udp_header(&h), Some((5353, 0xdead_beef)));
        assert_eq!(parse_udp_header(b"NLU1\x00"), None);
        assert_eq!(parse_udp_header(b"XXXX\x00\x01\x00\x00\x00\x01"), None);
    }
}
