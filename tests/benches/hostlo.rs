//! Hostlo's cost, side by side in one run: localhost request/response latency (TCP and UDP)
//! and TCP throughput between two containers of one pod,
//!
//! - **one VM**: both in one pod in VM 0 (the kernel's loopback), against
//! - **two VMs (Hostlo)**: the client in part 0 (VM 0), the server in part 1 (VM 1), both
//!   on `127.0.0.1`: part 0's relay, the pod's host-loopback segment (a virtio-net NIC
//!   in each VM on one host bridge), part 1's relay.
//!
//! The servers (`nestless-rr serve`/`serve-udp`, `iperf3 -s`) bind 127.0.0.1 in the
//! server's network namespace; the clients run in the client's. The two setups alternate
//! within each round, the first one rotating. Real QEMU guests with containerd and our shim
//! (the e2e harness); under TCG both sides are slowed down, see docs/benchmarks.md.
//!
//! ```sh
//! cargo bench -p nestless-tests --bench hostlo      # as root
//! # NESTLESS_BENCH_RUNS (default 5), NESTLESS_BENCH_SECONDS (iperf3 -t, default 5)
//! ```

use std::time::Duration;

use nestless_tests::{
    containerd::CRI_HANDLER,
    e2e::{eventually, step, Cluster, ClusterOptions, Guest, Node, Pod},
    hostlo::{has_port, in_pod, rr, start_in_pod, start_part, wait_view},
};
use serde_json::Value;

const RR_TCP: u16 = 7000;
const RR_UDP: u16 = 7001;
const IPERF: u16 = 5201;
const RR_COUNT: u32 = 2000;
const RR_WARMUP: u32 = 200;

fn env_or(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn min_med_max(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:>9.1} {:>9.1} {max:>9.1}", median(v))
}

/// Starts the three servers in `pod`, bound to 127.0.0.1.
fn servers(node: &Node, pod: &Pod, tag: &str) {
    start_in_pod(
        node,
        pod,
        &format!("{tag}-rr"),
        &format!("nestless-rr serve 127.0.0.1:{RR_TCP}"),
    );
    start_in_pod(
        node,
        pod,
        &format!("{tag}-rru"),
        &format!("nestless-rr serve-udp 127.0.0.1:{RR_UDP}"),
    );
    start_in_pod(
        node,
        pod,
        &format!("{tag}-iperf"),
        &format!("iperf3 -s -B 127.0.0.1 -p {IPERF}"),
    );
}

struct Figures {
    tcp_us: Vec<f64>,
    udp_us: Vec<f64>,
    mbps: Vec<f64>,
}

fn measure(node: &Node, pod: &Pod, seconds: u64, f: &mut Figures) {
    let tcp = rr(
        node,
        pod,
        "ping",
        &format!("127.0.0.1:{RR_TCP}"),
        RR_COUNT,
        RR_WARMUP,
    )
    .expect("TCP request/response");
    f.tcp_us.push(tcp["p50_us"].as_f64().expect("p50_us"));
    let udp = rr(
        node,
        pod,
        "ping-udp",
        &format!("127.0.0.1:{RR_UDP}"),
        RR_COUNT,
        RR_WARMUP,
    )
    .expect("UDP request/response");
    f.udp_us.push(udp["p50_us"].as_f64().expect("p50_us"));
    let out = in_pod(
        node,
        pod,
        &format!("iperf3 -c 127.0.0.1 -p {IPERF} -t {seconds} -J"),
    )
    .expect("iperf3");
    let v: Value = serde_json::from_str(&out).expect("iperf3 -J prints JSON");
    f.mbps.push(
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .expect("bits_per_second")
            / 1e6,
    );
}

fn main() {
    let runs = env_or("NESTLESS_BENCH_RUNS", 5);
    let seconds = env_or("NESTLESS_BENCH_SECONDS", 5);
    let c = Cluster::start(ClusterOptions {
        vms: 2,
        ..Default::default()
    });
    let (n0, n1) = (c.node(0), c.node(1));
    println!("VMs: {:?} accel", n0.vm().accel());

    let (single, _) = step("one-VM pod in VM 0", || {
        n0.cri_pod("single", CRI_HANDLER, &[], "exec sleep 100000")
    });
    let p0 = step("Hostlo part 0 in VM 0", || {
        start_part(n0, "bench", 0, "exec sleep 100000")
    });
    let p1 = step("Hostlo part 1 in VM 1", || {
        start_part(n1, "bench", 1, "exec sleep 100000")
    });
    servers(n0, &single, "single");
    servers(n1, &p1, "part1");
    wait_view(
        &c,
        Duration::from_secs(120),
        "part 1's servers published",
        |v| {
            [
                format!("1:{RR_TCP}/tcp"),
                format!("1:{RR_UDP}/udp"),
                format!("1:{IPERF}/tcp"),
            ]
            .iter()
            .all(|p| has_port(v, p))
        },
    );
    for (node, pod) in [(n0, &single), (n0, &p0)] {
        eventually("servers answer", Duration::from_secs(120), || {
            rr(node, pod, "ping", &format!("127.0.0.1:{RR_TCP}"), 5, 0)?;
            rr(node, pod, "ping-udp", &format!("127.0.0.1:{RR_UDP}"), 5, 0)
        });
    }

    let mut one = Figures {
        tcp_us: vec![],
        udp_us: vec![],
        mbps: vec![],
    };
    let mut two = Figures {
        tcp_us: vec![],
        udp_us: vec![],
        mbps: vec![],
    };
    for round in 0..runs {
        eprintln!("[bench] round {}/{runs}", round + 1);
        if round % 2 == 0 {
            measure(n0, &single, seconds, &mut one);
            measure(n0, &p0, seconds, &mut two);
        } else {
            measure(n0, &p0, seconds, &mut two);
            measure(n0, &single, seconds, &mut one);
        }
    }

    println!(
        "\nHostlo: localhost between two containers of a pod, {runs} runs each \
         (RR: p50 of {RR_COUNT} round trips of 64 B; iperf3 -t {seconds})"
    );
    println!("  {:<34} {:>9} {:>9} {:>9}", "", "min", "median", "max");
    for (label, f) in [("one VM (loopback)", &one), ("two VMs (Hostlo)", &two)] {
        println!("  {label}");
        println!("    {:<32} {}", "TCP RR p50 (us)", min_med_max(&f.tcp_us));
        println!("    {:<32} {}", "UDP RR p50 (us)", min_med_max(&f.udp_us));
        println!(
            "    {:<32} {}",
            "TCP throughput (Mbit/s)",
            min_med_max(&f.mbps)
        );
    }
    println!(
        "  ratios of medians, two VMs / one VM: TCP RR {:.2}x, UDP RR {:.2}x, throughput {:.2}x",
        median(&two.tcp_us) / median(&one.tcp_us),
        median(&two.udp_us) / median(&one.udp_us),
        median(&two.mbps) / median(&one.mbps)
    );
    for (node, pod) in [(n1, &p1), (n0, &p0), (n0, &single)] {
        node.cri_delete(&pod.id);
    }
}
