//! `nestless-rr`: TCP and UDP request/response latency, netperf TCP_RR/UDP_RR style, with
//! the standard library only (it runs in test guests and on the host).
//!
//! ```text
//! nestless-rr serve [ADDR:]PORT          TCP echo server: every connection gets back what it
//!                                        sends (ADDR defaults to 0.0.0.0)
//! nestless-rr serve-udp [ADDR:]PORT      UDP echo server: every datagram goes back to its sender
//! nestless-rr ping ADDR:PORT [COUNT] [SIZE] [WARMUP]
//!     one connection, TCP_NODELAY; COUNT round trips of SIZE bytes (default 2000, 64),
//!     after WARMUP unmeasured ones (default 100); prints one JSON line:
//!     {"count":..,"size":..,"min_us":..,"p50_us":..,"p90_us":..,"p99_us":..,"max_us":..,"mean_us":..}
//! nestless-rr ping-udp ADDR:PORT [COUNT] [SIZE] [WARMUP]
//!     the same with datagrams (a request unanswered within 2 s is sent again; the JSON
//!     line then also has "lost")
//! nestless-rr tps ADDR:PORT [CONNS] [SECONDS] [SIZE]
//!     transactions per second, netperf TCP_RR with many streams: CONNS connections
//!     (default 32), each on its own thread, TCP_NODELAY, doing round trips of SIZE bytes
//!     (default 64) back to back for SECONDS (default 5); prints one JSON line:
//!     {"conns":..,"size":..,"seconds":..,"transactions":..,"tps":..}
//! ```
//!
//! The server serves each connection on its own thread until the peer closes it.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

const USAGE: &str = "usage: nestless-rr serve|serve-udp [ADDR:]PORT | \
    nestless-rr ping|ping-udp ADDR:PORT [COUNT] [SIZE] [WARMUP] | \
    nestless-rr tps ADDR:PORT [CONNS] [SECONDS] [SIZE]";

/// `[ADDR:]PORT` as a socket address (ADDR defaults to 0.0.0.0).
fn listen_addr(s: &str) -> Result<String, String> {
    let full = if s.contains(':') {
        s.to_owned()
    } else {
        format!("0.0.0.0:{s}")
    };
    full.parse::<std::net::SocketAddr>()
        .map(|a| a.to_string())
        .map_err(|_| format!("bad address {s:?}\n{USAGE}"))
}

fn serve(addr: &str) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        thread::spawn(move || {
            let _ = conn.set_nodelay(true);
            let mut buf = [0u8; 65536];
            loop {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if conn.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
    Ok(())
}

fn serve_udp(addr: &str) -> std::io::Result<()> {
    let socket = UdpSocket::bind(addr)?;
    let mut buf = [0u8; 65536];
    loop {
        let (n, peer) = socket.recv_from(&mut buf)?;
        let _ = socket.send_to(&buf[..n], peer);
    }
}

/// Latency figures of one run, in microseconds.
#[derive(Debug, PartialEq)]
struct Summary {
    count: usize,
    min: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

/// Nearest-rank percentiles of `samples` (microseconds); `None` when empty.
fn summarize(mut samples: Vec<f64>) -> Option<Summary> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    let rank = |p: f64| samples[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
    Some(Summary {
        count: n,
        min: samples[0],
        p50: rank(0.50),
        p90: rank(0.90),
        p99: rank(0.99),
        max: samples[n - 1],
        mean: samples.iter().sum::<f64>() / n as f64,
    })
}

fn ping(addr: &str, count: usize, size: usize, warmup: usize) -> std::io::Result<Summary> {
    let mut conn = TcpStream::connect(addr)?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let request = vec![0x5au8; size];
    let mut reply = vec![0u8; size];
    let mut samples = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let t = Instant::now();
        conn.write_all(&request)?;
        conn.read_exact(&mut reply)?;
        if i >= warmup {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    summarize(samples).ok_or_else(|| std::io::Error::other("no samples (COUNT is 0)"))
}

/// UDP round trips; also returns how many requests went unanswered (and were sent again).
fn ping_udp(
    addr: &str,
    count: usize,
    size: usize,
    warmup: usize,
) -> std::io::Result<(Summary, usize)> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(addr)?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut samples = Vec::with_capacity(count);
    let mut reply = vec![0u8; size.max(8) + 1];
    let mut lost = 0;
    for i in 0..warmup + count {
        // Each request carries its sequence number, so that a late reply is not counted.
        let mut request = vec![0x5au8; size.max(8)];
        request[..8].copy_from_slice(&(i as u64).to_be_bytes());
        let t = Instant::now();
        loop {
            socket.send(&request)?;
            match socket.recv(&mut reply) {
                Ok(n) if n == request.len() && reply[..8] == request[..8] => break,
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    lost += 1;
                    if e.kind() == std::io::ErrorKind::ConnectionRefused {
                        // Nothing listens (yet): do not spin.
                        thread::sleep(Duration::from_millis(100));
                    }
                    if lost > 10 + (warmup + count) / 10 {
                        return Err(std::io::Error::other(format!(
                            "{lost} requests unanswered: is a UDP echo server at {addr}?"
                        )));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        if i >= warmup {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let s = summarize(samples).ok_or_else(|| std::io::Error::other("no samples (COUNT is 0)"))?;
    Ok((s, lost))
}

/// Round trips completed by `conns` connections, each on its own thread, in `seconds`
/// (all connections are opened before the clock starts); returns (transactions, seconds
/// measured).
fn tps(addr: &str, conns: usize, seconds: f64, size: usize) -> std::io::Result<(u64, f64)> {
    let streams = (0..conns)
        .map(|_| {
            let c = TcpStream::connect(addr)?;
            c.set_nodelay(true)?;
            c.set_read_timeout(Some(Duration::from_secs(30)))?;
            Ok(c)
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(seconds);
    let workers: Vec<_> = streams
        .into_iter()
        .map(|mut conn| {
            thread::spawn(move || -> std::io::Result<u64> {
                let request = vec![0x5au8; size];
                let mut reply = vec![0u8; size];
                let mut done = 0u64;
                while Instant::now() < until {
                    conn.write_all(&request)?;
                    conn.read_exact(&mut reply)?;
                    done += 1;
                }
                Ok(done)
            })
        })
        .collect();
    let mut total = 0;
    for w in workers {
        total += w
            .join()
            .map_err(|_| std::io::Error::other("a connection's thread panicked"))??;
    }
    Ok((total, start.elapsed().as_secs_f64()))
}

fn print_summary(s: &Summary, size: usize, extra: &str) {
    println!(
        "{{\"count\":{},\"size\":{size},\"min_us\":{:.1},\"p50_us\":{:.1},\"p90_us\":{:.1},\"p99_us\":{:.1},\"max_us\":{:.1},\"mean_us\":{:.1}{extra}}}",
        s.count, s.min, s.p50, s.p90, s.p99, s.max, s.mean
    );
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> Result<T, String> {
    match args.get(i) {
        None => Ok(default),
        Some(s) => s
            .parse()
            .map_err(|_| format!("bad argument {s:?}\n{USAGE}")),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") if args.len() == 2 => {
            listen_addr(&args[1]).and_then(|a| serve(&a).map_err(|e| format!("serve on {a}: {e}")))
        }
        Some("serve-udp") if args.len() == 2 => listen_addr(&args[1])
            .and_then(|a| serve_udp(&a).map_err(|e| format!("serve-udp on {a}: {e}"))),
        Some(cmd @ ("ping" | "ping-udp")) if (2..=5).contains(&args.len()) => (|| {
            let count = arg(&args, 2, 2000usize)?;
            let size = arg(&args, 3, 64usize)?;
            let warmup = arg(&args, 4, 100usize)?;
            if cmd == "ping" {
                let s = ping(&args[1], count, size, warmup)
                    .map_err(|e| format!("ping {}: {e}", args[1]))?;
                print_summary(&s, size, "");
            } else {
                let (s, lost) = ping_udp(&args[1], count, size, warmup)
                    .map_err(|e| format!("ping-udp {}: {e}", args[1]))?;
                print_summary(&s, size.max(8), &format!(",\"lost\":{lost}"));
            }
            Ok(())
        })(),
        Some("tps") if (2..=5).contains(&args.len()) => (|| {
            let conns = arg(&args, 2, 32usize)?.max(1);
            let seconds = arg(&args, 3, 5f64)?;
            let size = arg(&args, 4, 64usize)?.max(1);
            if !(seconds.is_finite() && seconds > 0.0) {
                return Err(format!("SECONDS must be positive\n{USAGE}"));
            }
            let (n, took) =
                tps(&args[1], conns, seconds, size).map_err(|e| format!("tps {}: {e}", args[1]))?;
            println!(
                "{{\"conns\":{conns},\"size\":{size},\"seconds\":{took:.3},\"transactions\":{n},\"tps\":{:.1}}}",
                n as f64 / took
            );
            Ok(())
        })(),
        _ => Err(USAGE.to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nestless-rr: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let s = summarize((1..=100).map(f64::from).collect()).unwrap();
        assert_eq!(
            (s.min, s.p50, s.p90, s.p99, s.max),
            (1.0, 50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(s.mean, 50.5);
        assert!(summarize(Vec::new()).is_none());
        let one = summarize(vec![7.0]).unwrap();
        assert_eq!((one.p50, one.p99), (7.0, 7.0));
    }

    #[test]
    fn ping_pong_over_loopback() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        thread::spawn(move || serve(&addr.to_string()));
        let mut tries = 0;
        let s = loop {
            match ping(&addr.to_string(), 50, 100, 5) {
                Ok(s) => break s,
                Err(e) if tries < 100 => {
                    tries += 1;
                    let _ = e;
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(s.count, 50);
        assert!(s.min > 0.0 && s.min <= s.p50 && s.p50 <= s.max);
    }

    #[test]
    fn udp_ping_pong_over_loopback() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        drop(socket);
        thread::spawn(move || serve_udp(&addr.to_string()));
        let (s, _lost) = ping_udp(&addr.to_string(), 50, 100, 5).unwrap();
        assert_eq!(s.count, 50);
        assert!(s.min > 0.0 && s.min <= s.p50 && s.p50 <= s.max);
    }

    #[test]
    fn many_connections_count_their_transactions() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        thread::spawn(move || serve(&addr.to_string()));
        let mut tries = 0;
        let (n, took) = loop {
            match tps(&addr.to_string(), 4, 0.2, 32) {
                Ok(r) => break r,
                Err(_) if tries < 100 => {
                    tries += 1;
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert!(n >= 4, "every connection did at least one round trip: {n}");
        assert!(took >= 0.2, "{took}");
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(listen_addr("80").unwrap(), "0.0.0.0:80");
        assert_eq!(listen_addr("127.0.0.1:80").unwrap(), "127.0.0.1:80");
        assert!(listen_addr("x").unwrap_err().contains("bad address"));
    }
}
