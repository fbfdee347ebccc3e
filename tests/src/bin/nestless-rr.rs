//! `nestless-rr`: TCP request/response latency, netperf TCP_RR style, with the standard
//! library only (it runs in test guests and on the host).
//!
//! ```text
//! nestless-rr serve PORT                 echo server: every connection gets back what it sends
//! nestless-rr ping ADDR:PORT [COUNT] [SIZE] [WARMUP]
//!     one connection, TCP_NODELAY; COUNT round trips of SIZE bytes (default 2000, 64),
//!     after WARMUP unmeasured ones (default 100); prints one JSON line:
//!     {"count":..,"size":..,"min_us":..,"p50_us":..,"p90_us":..,"p99_us":..,"max_us":..,"mean_us":..}
//! ```
//!
//! The server serves each connection on its own thread until the peer closes it.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

const USAGE: &str =
    "usage: nestless-rr serve PORT | nestless-rr ping ADDR:PORT [COUNT] [SIZE] [WARMUP]";

fn serve(port: u16) -> std::io::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port))?;
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
        Some("serve") if args.len() == 2 => arg(&args, 1, 0u16)
            .and_then(|port| serve(port).map_err(|e| format!("serve on port {port}: {e}"))),
        Some("ping") if (2..=5).contains(&args.len()) => (|| {
            let count = arg(&args, 2, 2000usize)?;
            let size = arg(&args, 3, 64usize)?;
            let warmup = arg(&args, 4, 100usize)?;
            let s = ping(&args[1], count, size, warmup)
                .map_err(|e| format!("ping {}: {e}", args[1]))?;
            println!(
                "{{\"count\":{},\"size\":{size},\"min_us\":{:.1},\"p50_us\":{:.1},\"p90_us\":{:.1},\"p99_us\":{:.1},\"max_us\":{:.1},\"mean_us\":{:.1}}}",
                s.count, s.min, s.p50, s.p90, s.p99, s.max, s.mean
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
        thread::spawn(move || serve(addr.port()));
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
}
