//! The paper's headline, side by side in one run: TCP throughput and request/response
//! latency between the host and
//!
//! - (a) a process on the VM's own NIC (single layer: host bridge, tap, virtio-net);
//! - (b) a container behind the CNI bridge plugin with NAT inside the VM (nested: the same,
//!   then DNAT, the VM's bridge `cni0` and a veth), reached through a port mapping;
//! - (c) a container with its BrFusion NIC (host bridge, its own tap and virtio-net);
//! - (a') as a control, the own NIC of the VM that runs (b), whose root namespace has the
//!   NAT rules (conntrack and the nat table then see every packet of that NIC).
//!
//! (a) and (c) are in VM 0, which has no NAT rule; (b) and (a') in VM 1 (same image).
//! plus the pod network-ready time with nestless-cni + hot-plug against the CNI bridge plugin,
//! in the same guest and under the same shim: RunPodSandbox (which returns once CNI configured
//! eth0), and the CNI ADD alone (a fresh netns to eth0 configured, the plugin exec'd as CRI
//! does). The servers (iperf3 -s, nestless-rr serve) run in the VM's root network
//! namespace for (a) and in the pod's network namespace for (b) and (c) (entered with
//! nsenter: the pods' image is busybox); the clients run on the host. The three setups are
//! measured in turns within each round, the starting one rotating, so that load drifts
//! affect all alike.
//!
//! The `per-packet` section (issue 18) measures what nesting adds per packet rather than
//! per byte: with GSO/GRO a bulk stream pays the bridge, veth and NAT once per 64 KiB
//! segment, and the emulated vCPU's copy cost hides the rest. It turns TSO, GSO and GRO
//! off on every hop (the host bridge and its ports, every interface of both guests and of
//! both pods) and measures, per setup, in turns:
//!
//! - UDP with 64 B and 512 B datagrams, both directions, `iperf3 -u -b 0`: the datagrams
//!   the receiver got per second (and sent, lost);
//! - TCP bulk throughput without offloads, both directions (`iperf3`);
//! - TCP request/response with 32 connections at once (`nestless-rr tps`), transactions/s;
//!
//! each with the serving guest's kernel CPU time (system + irq + softirq from its
//! `/proc/stat`, 10 ms ticks) per datagram received or sent, per 1448 B segment, per
//! transaction, so that the figure explains itself.
//!
//! ```sh
//! CARGO_TARGET_DIR=... cargo bench -p nestless-tests --bench headline [-- SECTION...]
//! # SECTION: stream, per-packet, ready (default: all three)
//! # NESTLESS_BENCH_RUNS (default 5), NESTLESS_BENCH_SECONDS (iperf3 -t, default 5)
//! ```
//!
//! Needs root, QEMU, vhost-device-vsock, iperf3, ethtool and iptables (see tests/demo.sh).

use std::{
    collections::BTreeMap,
    process::Command,
    time::{Duration, Instant},
};

use nestless_tests::{
    containerd::{run, CRI_HANDLER},
    e2e::{step, Binaries, Cluster, ClusterOptions, Guest, Node, NESTED_HANDLER},
    vm::GuestCommand,
};
use serde_json::Value;

const IPERF_PORT: u16 = 5201;
const RR_PORT: u16 = 7000;
/// Host ports of the nested pod's mappings (DNAT in the VM).
const NESTED_IPERF_PORT: u16 = 15201;
const NESTED_RR_PORT: u16 = 17000;
const RR_COUNT: &str = "2000";
const RR_SIZE: &str = "64";
const RR_WARMUP: &str = "200";

fn env_or(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Where the host connects for one setup.
struct Target {
    label: &'static str,
    /// The VM that serves it: 0 for (a) and (c), 1 for (b) and (a').
    node: usize,
    /// A process of the pod whose namespace the servers run in (`None`: the VM's root).
    netns_pid: Option<u32>,
    ip: String,
    iperf_port: u16,
    rr_port: u16,
}

/// Starts iperf3 and nestless-rr servers in the guest, in the network namespace of `pid`
/// (`None`: the VM's root namespace).
fn start_servers(node: &Node, pid: Option<u32>) {
    let script = format!(
        "iperf3 -s -D -p {IPERF_PORT} --logfile /tmp/iperf3-{tag}.log && \
         (setsid nestless-rr serve {RR_PORT} </dev/null >/tmp/rr-{tag}.log 2>&1 &)",
        tag = pid.map_or("root".to_owned(), |p| p.to_string())
    );
    match pid {
        Some(pid) => node.in_netns(pid, &script),
        None => node.sh(&script),
    };
}

/// One iperf3 run from the host with `extra` arguments; its JSON report, or `None` when
/// four attempts failed. The iperf3 server re-opens its listening socket after each test,
/// which takes a while in a TCG guest: a refused or reset connection is retried. A run
/// that does not end (a saturated guest vCPU can starve iperf3's control connection,
/// seen with UDP from the guest at `-b 0`) is killed, and the target's server restarted.
fn iperf_json(
    t: &Target,
    node: &Node,
    seconds: u64,
    reverse: bool,
    extra: &[&str],
) -> Option<Value> {
    let mut last = String::new();
    for _ in 0..4 {
        let mut cmd = Command::new("timeout");
        cmd.args(["-k", "5", &(seconds + 40).to_string(), "iperf3"])
            .args(["-c", &t.ip, "-p", &t.iperf_port.to_string()])
            .args(["-t", &seconds.to_string(), "-O", "1", "-J"])
            .args(["--connect-timeout", "10000"])
            .args(extra);
        if reverse {
            cmd.arg("-R");
        }
        let r = run(cmd, None, Duration::from_secs(seconds + 60));
        if r.code == 124 || r.code == 137 {
            eprintln!(
                "[bench]   iperf3 to {} did not end: killed, its server restarted",
                t.label
            );
            last = format!("no end within {} s", seconds + 40);
            restart_iperf_server(node, t.netns_pid);
            continue;
        }
        match serde_json::from_str::<Value>(&r.stdout) {
            Ok(v) if v["end"]["sum_received"]["bytes"].is_number() => return Some(v),
            Ok(v) => last = v["error"].as_str().unwrap_or(&r.stdout).to_owned(),
            Err(e) => last = format!("{e}: {} {}", r.stdout, r.stderr),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    eprintln!(
        "[bench]   iperf3 to {} failed 4 times, last: {last}",
        t.label
    );
    None
}

/// Kills the iperf3 server of one namespace (`pid`'s, or the VM's root) and starts it
/// again; returns once it listens.
fn restart_iperf_server(node: &Node, pid: Option<u32>) {
    let tag = pid.map_or("root".to_owned(), |p| p.to_string());
    let script = format!(
        "pkill -f 'iperf3-{tag}.log' || true; \
         while pgrep -f 'iperf3-{tag}.log' >/dev/null; do sleep 0.2; done; \
         iperf3 -s -D -p {IPERF_PORT} --logfile /tmp/iperf3-{tag}.log"
    );
    match pid {
        Some(pid) => node.in_netns(pid, &script),
        None => node.sh(&script),
    };
}

/// One TCP iperf3 run from the host; Mbit/s received at the far end.
fn iperf(t: &Target, node: &Node, seconds: u64, reverse: bool) -> f64 {
    let v = iperf_json(t, node, seconds, reverse, &[])
        .unwrap_or_else(|| panic!("iperf3 to {} failed", t.label));
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("bits_per_second")
        / 1e6
}

/// One request/response run from the host; the p50 round trip in microseconds.
fn rr(t: &Target, rr_bin: &str) -> f64 {
    let mut cmd = Command::new(rr_bin);
    cmd.args([
        "ping",
        &format!("{}:{}", t.ip, t.rr_port),
        RR_COUNT,
        RR_SIZE,
        RR_WARMUP,
    ]);
    let r = run(cmd, None, Duration::from_secs(300));
    let v: Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("nestless-rr to {}: {e}: {}", t.label, r.stderr));
    v["p50_us"].as_f64().expect("p50_us")
}

#[derive(Debug, Clone, Copy)]
struct Stats {
    min: f64,
    median: f64,
    max: f64,
}

fn stats(v: &[f64]) -> Stats {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    Stats {
        min: s[0],
        median,
        max: s[n - 1],
    }
}

fn pct(x: f64) -> String {
    format!("{:+.0} %", (x - 1.0) * 100.0)
}

fn main() {
    // `cargo bench` passes --bench; the other arguments name sections.
    let sections = sections();
    let runs = env_or("NESTLESS_BENCH_RUNS", 5).max(1) as usize;
    let seconds = env_or("NESTLESS_BENCH_SECONDS", 5).max(2);
    let rr_bin = Binaries::get().path("nestless-rr");
    let rr_bin = rr_bin.to_str().expect("UTF-8 path");
    let t0 = Instant::now();

    // VM 0 runs pods with BrFusion only: (a) on its own NIC, (c) in a BrFusion pod; its root
    // namespace has no NAT rule. VM 1 runs pods the usual way: (b) behind its CNI bridge and
    // NAT; its own NIC, whose namespace now has the NAT rules, is measured too (a').
    let cluster = Cluster::start(ClusterOptions {
        vms: 2,
        warm_pools: vec![0, 2],
        ..Default::default()
    });
    let (plain, natted) = (cluster.node(0), cluster.node(1));
    step("servers on VM 0's own NIC", || start_servers(plain, None));
    let (fused, _) = step("BrFusion pod in VM 0", || {
        plain.cri_pod("bench-fused", CRI_HANDLER, &[], "exec sleep 1000000")
    });
    step("servers in the BrFusion pod", || {
        start_servers(plain, Some(fused.pid))
    });
    let (nested, _) = step("nested pod in VM 1 (CNI bridge + NAT)", || {
        natted.cri_pod(
            "bench-nested",
            NESTED_HANDLER,
            &[
                &format!("{IPERF_PORT}:{NESTED_IPERF_PORT}"),
                &format!("{IPERF_PORT}:{NESTED_IPERF_PORT}/udp"),
                &format!("{RR_PORT}:{NESTED_RR_PORT}"),
            ],
            "exec sleep 1000000",
        )
    });
    step("servers in the nested pod and on VM 1's own NIC", || {
        start_servers(natted, Some(nested.pid));
        start_servers(natted, None);
    });
    let nat_rules = |n: &Node| {
        n.sh("iptables -t nat -S | grep -c '^-A' || true")
            .trim()
            .to_owned()
    };
    let (nat0, nat1) = (nat_rules(plain), nat_rules(natted));
    assert_eq!(nat0, "0", "VM 0 must have no NAT rule");
    let targets = [
        Target {
            label: "(a) single layer (VM's own NIC)",
            node: 0,
            netns_pid: None,
            ip: plain.own_ip().to_owned(),
            iperf_port: IPERF_PORT,
            rr_port: RR_PORT,
        },
        Target {
            label: "(b) nested (CNI bridge + NAT)",
            node: 1,
            netns_pid: Some(nested.pid),
            ip: natted.own_ip().to_owned(),
            iperf_port: NESTED_IPERF_PORT,
            rr_port: NESTED_RR_PORT,
        },
        Target {
            label: "(c) BrFusion (host NIC in the pod)",
            node: 0,
            netns_pid: Some(fused.pid),
            ip: fused.ip.clone(),
            iperf_port: IPERF_PORT,
            rr_port: RR_PORT,
        },
        Target {
            label: "(a') own NIC of the VM with NAT",
            node: 1,
            netns_pid: None,
            ip: natted.own_ip().to_owned(),
            iperf_port: IPERF_PORT,
            rr_port: RR_PORT,
        },
    ];
    // Every path works before anything is measured.
    for t in &targets {
        rr_probe(t, rr_bin);
    }

    let fmt = |s: Stats, prec: usize| {
        format!("{:.p$} / {:.p$} / {:.p$}", s.min, s.median, s.max, p = prec)
    };
    if sections.contains(&Section::Stream) {
        let mut tx: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        let mut rx: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        let mut lat: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        for round in 0..runs {
            for k in 0..targets.len() {
                let i = (round + k) % targets.len();
                let t = &targets[i];
                let node = cluster.node(t.node);
                let a = iperf(t, node, seconds, false);
                let b = iperf(t, node, seconds, true);
                let l = rr(t, rr_bin);
                eprintln!(
                    "[bench] round {round} {}: host->guest {a:.1} Mbit/s, guest->host {b:.1} Mbit/s, \
                     RR p50 {l:.0} us",
                    t.label
                );
                tx.entry(i).or_default().push(a);
                rx.entry(i).or_default().push(b);
                lat.entry(i).or_default().push(l);
            }
        }

        println!();
        println!(
            "nestless headline: accel {:?}, 1 vCPU / 1 GiB guests, {runs} runs, iperf3 -t {seconds} -O 1, \
             RR {RR_COUNT} x {RR_SIZE} B (p50); NAT rules: VM 0 (a, c) {nat0}, VM 1 (b, a') {nat1}",
            plain.vm().accel(),
        );
        println!(
            "{:<36} {:>26} {:>26} {:>24}",
            "", "host->guest Mbit/s", "guest->host Mbit/s", "RR p50 us"
        );
        println!(
            "{:<36} {:>26} {:>26} {:>24}",
            "", "min / median / max", "min / median / max", "min / median / max"
        );
        for (i, t) in targets.iter().enumerate() {
            println!(
                "{:<36} {:>26} {:>26} {:>24}",
                t.label,
                fmt(stats(&tx[&i]), 1),
                fmt(stats(&rx[&i]), 1),
                fmt(stats(&lat[&i]), 0)
            );
        }
        let med = |m: &BTreeMap<usize, Vec<f64>>, i: usize| stats(&m[&i]).median;
        println!();
        println!(
            "{:<28} {:>14} {:>14} {:>12}   paper",
            "ratio of medians", "host->guest", "guest->host", "RR p50"
        );
        println!(
            "{:<28} {:>14} {:>14} {:>12}   -68 % throughput, +31 % latency",
            "(b) nested / (a)",
            pct(med(&tx, 1) / med(&tx, 0)),
            pct(med(&rx, 1) / med(&rx, 0)),
            pct(med(&lat, 1) / med(&lat, 0)),
        );
        println!(
            "{:<28} {:>14} {:>14} {:>12}   = single layer",
            "(c) BrFusion / (a)",
            pct(med(&tx, 2) / med(&tx, 0)),
            pct(med(&rx, 2) / med(&rx, 0)),
            pct(med(&lat, 2) / med(&lat, 0)),
        );
        println!(
            "{:<28} {:>14} {:>14} {:>12}   (control: the NAT rules' cost on the VM's own NIC)",
            "(a') / (a)",
            pct(med(&tx, 3) / med(&tx, 0)),
            pct(med(&rx, 3) / med(&rx, 0)),
            pct(med(&lat, 3) / med(&lat, 0)),
        );
    }
    if sections.contains(&Section::PerPacket) {
        per_packet(
            &cluster,
            &targets,
            &[fused.pid, nested.pid],
            runs,
            seconds,
            rr_bin,
        );
    }
    if sections.contains(&Section::Ready) {
        // Pod network-ready time: RunPodSandbox returns once CNI has configured eth0; and the
        // CNI ADD alone (a fresh netns -> eth0 configured), as CRI execs the plugin. Cold
        // hot-plug and the CNI bridge plugin in VM 0 (the datapath runs are over: its NAT rules
        // no longer matter), BrFusion from VM 1's warm pool.
        let ready_setups: [(&str, &Node, &str, &str, &str); 3] = [
            (
                "BrFusion, cold hot-plug (VM 0)",
                plain,
                CRI_HANDLER,
                "nestless-cni",
                NESTLESS_NET,
            ),
            (
                "BrFusion, warm pool (VM 1)",
                natted,
                CRI_HANDLER,
                "nestless-cni",
                NESTLESS_NET,
            ),
            (
                "CNI bridge + NAT (VM 0)",
                plain,
                NESTED_HANDLER,
                "bridge",
                NESTED_NET,
            ),
        ];
        let mut ready: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        let mut cni_add: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        for round in 0..runs {
            for (k, (_, node, handler, plugin, conf)) in ready_setups.iter().enumerate() {
                cni_add.entry(k).or_default().push(cni_add_ms(
                    node,
                    plugin,
                    conf,
                    &format!("{k}-{round}"),
                ));
                let r = node.cri(&[
                    "runp",
                    "--name",
                    &format!("ready-{k}-{round}"),
                    "--handler",
                    handler,
                ]);
                ready
                    .entry(k)
                    .or_default()
                    .push(r["ms"].as_f64().expect("ms"));
                node.cri_delete(r["id"].as_str().expect("id"));
            }
        }
        let warm_claims = cluster.agent().log().matches("gave warm NIC").count();

        println!();
        println!(
            "pod network-ready, ms (min / median / max):   RunPodSandbox          CNI ADD alone"
        );
        for (k, (label, ..)) in ready_setups.iter().enumerate() {
            println!(
                "  {label:<40} {:>22} {:>22}",
                fmt(stats(&ready[&k]), 0),
                fmt(stats(&cni_add[&k]), 0)
            );
        }
        println!(
            "  (warm NICs handed out: {warm_claims}, for {} warm-pool attaches)",
            2 * runs
        );
    }
    println!("\ntotal {:.0?}", t0.elapsed());
    drop(cluster);
}

/// The parts of a run (`cargo bench --bench headline -- SECTION...`).
#[derive(Debug, PartialEq)]
enum Section {
    /// TCP streams and one connection's request/response latency (offloads on).
    Stream,
    /// Per-packet workloads with offloads off (issue 18).
    PerPacket,
    /// Pod network-ready time.
    Ready,
}

/// The sections the command line names (all when it names none); exits with a usage
/// message on an unknown one.
fn sections() -> Vec<Section> {
    let mut out = Vec::new();
    for a in std::env::args().skip(1).filter(|a| !a.starts_with("--")) {
        out.push(match a.as_str() {
            "stream" => Section::Stream,
            "per-packet" => Section::PerPacket,
            "ready" => Section::Ready,
            _ => {
                eprintln!("headline: unknown section {a:?} (stream, per-packet, ready)");
                std::process::exit(2);
            }
        });
    }
    if out.is_empty() {
        out = vec![Section::Stream, Section::PerPacket, Section::Ready];
    }
    out
}

/// The per-packet workloads: label, unit of the rate, what the CPU time is divided by.
const WORKLOADS: [(&str, &str, &str); 7] = [
    ("UDP 64 B host->guest", "kpps", "datagram received"),
    ("UDP 64 B guest->host", "kpps", "datagram sent"),
    ("UDP 512 B host->guest", "kpps", "datagram received"),
    ("UDP 512 B guest->host", "kpps", "datagram sent"),
    ("TCP no offloads host->guest", "Mbit/s", "1448 B segment"),
    ("TCP no offloads guest->host", "Mbit/s", "1448 B segment"),
    ("TCP RR, 32 connections x 64 B", "ktps", "transaction"),
];
/// Connections of the transactions-per-second workload.
const TPS_CONNS: &str = "32";
/// TCP payload per segment on a 1500 B MTU path (timestamps on): 1500 - 20 - 20 - 12.
const MSS: f64 = 1448.0;

/// Runs workload `w` against `t` for `seconds`; returns the rate (in the workload's unit)
/// and the count of packets or transactions the serving guest handled; `None` when the
/// run failed (reported, and left out of the figures).
fn run_workload(
    w: usize,
    t: &Target,
    node: &Node,
    seconds: u64,
    rr_bin: &str,
) -> Option<(f64, f64)> {
    match w {
        0..=3 => {
            let len = if w < 2 { 64 } else { 512 };
            let reverse = w % 2 == 1;
            let v = iperf_json(
                t,
                node,
                seconds,
                reverse,
                &["-u", "-l", &len.to_string(), "-b", "0"],
            )?;
            let end = &v["end"];
            let sent = end["sum_sent"]["packets"].as_f64().unwrap_or(0.0);
            let received = end["sum_received"]["bytes"].as_f64().unwrap_or(0.0) / len as f64;
            let took = end["sum_received"]["seconds"]
                .as_f64()
                .filter(|s| *s > 0.0)
                .unwrap_or(seconds as f64);
            eprintln!(
                "[bench]   {}: sent {sent:.0}, received {received:.0}, lost {:.0} ({:.1} %)",
                t.label,
                (sent - received).max(0.0),
                100.0 * (sent - received).max(0.0) / sent.max(1.0)
            );
            // The guest handles what it receives (host->guest) or what it sends.
            let handled = if reverse { sent } else { received };
            Some((received / took / 1e3, handled))
        }
        4 | 5 => {
            let v = iperf_json(t, node, seconds, w == 5, &[])?;
            let end = &v["end"]["sum_received"];
            let bytes = end["bytes"].as_f64()?;
            let mbps = end["bits_per_second"].as_f64()? / 1e6;
            Some((mbps, bytes / MSS))
        }
        _ => {
            let mut cmd = Command::new(rr_bin);
            cmd.args([
                "tps",
                &format!("{}:{}", t.ip, t.rr_port),
                TPS_CONNS,
                &seconds.to_string(),
                RR_SIZE,
            ]);
            let r = run(cmd, None, Duration::from_secs(seconds + 120));
            let Ok(v) = serde_json::from_str::<Value>(&r.stdout) else {
                eprintln!(
                    "[bench]   nestless-rr tps to {} failed: {}",
                    t.label, r.stderr
                );
                return None;
            };
            let n = v["transactions"].as_f64()?;
            Some((v["tps"].as_f64()? / 1e3, n))
        }
    }
}

/// The guest's kernel CPU time so far (system + irq + softirq of `/proc/stat`'s `cpu`
/// line, in USER_HZ ticks of 10 ms).
fn guest_kernel_ticks(node: &Node) -> u64 {
    let line = node.sh("head -n 1 /proc/stat");
    // cpu user nice system idle iowait irq softirq steal ...
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    assert!(f.len() >= 7, "unexpected /proc/stat line: {line}");
    f[2] + f[5] + f[6]
}

/// Turns TSO, GSO and GRO off on every hop: the cluster bridge and its ports on the host,
/// every interface of both guests' root namespaces and of the pods' namespaces (`pods`:
/// a process of each pod, in VM 0 then VM 1). Prints what stayed on (`[fixed]` features).
fn offloads_off(cluster: &Cluster, pods: &[u32; 2]) {
    const OFF: &str = "tso off gso off gro off";
    const SHOW: &str =
        "grep -E '^(tcp-segmentation|generic-segmentation|generic-receive)-offload: on'";
    let bridge = &cluster.bridge().name;
    let ports: Vec<Value> = serde_json::from_str(
        &run(
            {
                let mut c = Command::new("ip");
                c.args(["-j", "link", "show", "master", bridge]);
                c
            },
            None,
            Duration::from_secs(10),
        )
        .ok(),
    )
    .expect("ip -j link");
    let mut still_on = Vec::new();
    for dev in
        std::iter::once(bridge.as_str()).chain(ports.iter().filter_map(|p| p["ifname"].as_str()))
    {
        let sh = |script: String| {
            let mut c = Command::new("sh");
            c.args(["-c", &script]);
            run(c, None, Duration::from_secs(10)).stdout
        };
        sh(format!("ethtool -K {dev} {OFF} 2>/dev/null"));
        let on = sh(format!("ethtool -k {dev} | {SHOW}"));
        if !on.trim().is_empty() {
            still_on.push(format!("host {dev}: {}", on.trim().replace('\n', ", ")));
        }
    }
    let script = format!(
        "for d in $(ls /sys/class/net); do [ $d = lo ] && continue; \
         ethtool -K $d {OFF} 2>/dev/null; ethtool -k $d | {SHOW} | sed \"s/^/$d /\"; done; true"
    );
    for (i, node) in cluster.nodes().iter().enumerate() {
        for (what, out) in [
            ("root", node.sh(&script)),
            ("pod", node.in_netns(pods[i], &script)),
        ] {
            if !out.trim().is_empty() {
                still_on.push(format!("VM {i} {what}: {}", out.trim().replace('\n', ", ")));
            }
        }
    }
    if still_on.is_empty() {
        eprintln!("[bench] offloads: tso, gso, gro off on every hop");
    } else {
        eprintln!("[bench] offloads that stayed on: {}", still_on.join("; "));
    }
}

/// The per-packet section: every workload against every setup, in turns within each
/// round (the first setup rotating), with the serving guest's kernel CPU time per
/// packet or transaction; prints a table of medians and the ratios to (a).
fn per_packet(
    cluster: &Cluster,
    targets: &[Target],
    pods: &[u32; 2],
    runs: usize,
    seconds: u64,
    rr_bin: &str,
) {
    offloads_off(cluster, pods);
    let mut rate: BTreeMap<(usize, usize), Vec<f64>> = BTreeMap::new();
    let mut cpu: BTreeMap<(usize, usize), Vec<f64>> = BTreeMap::new();
    let mut failed = Vec::new();
    for round in 0..runs {
        for (w, (label, unit, _)) in WORKLOADS.iter().enumerate() {
            for k in 0..targets.len() {
                let i = (round + k) % targets.len();
                let t = &targets[i];
                let node = cluster.node(t.node);
                let before = guest_kernel_ticks(node);
                let Some((r, handled)) = run_workload(w, t, node, seconds, rr_bin) else {
                    failed.push(format!("round {round} {label} {}", t.label));
                    continue;
                };
                let ticks = guest_kernel_ticks(node) - before;
                let us = ticks as f64 * 1e4 / handled.max(1.0);
                eprintln!(
                    "[bench] round {round} {label} {}: {r:.2} {unit}, guest kernel {:.2} us each \
                     ({ticks} ticks / {handled:.0})",
                    t.label, us
                );
                rate.entry((w, i)).or_default().push(r);
                cpu.entry((w, i)).or_default().push(us);
            }
        }
    }
    println!();
    println!(
        "per-packet workloads: offloads off on every hop, {runs} runs of {seconds} s; \
         rate median (min-max) and the serving guest's kernel CPU per unit (median, us)"
    );
    print!("{:<32}", "");
    for t in targets {
        print!(
            " {:>30}",
            &t.label[..t.label.find(')').map_or(t.label.len(), |p| p + 1)]
        );
    }
    println!(" {:>14} {:>14}", "(b)/(a)", "(c)/(a)");
    // Median of what was measured; NaN (printed "n/a") when every run failed.
    let get = |m: &BTreeMap<(usize, usize), Vec<f64>>, w: usize, i: usize| {
        m.get(&(w, i)).map(|v| stats(v)).unwrap_or(Stats {
            min: f64::NAN,
            median: f64::NAN,
            max: f64::NAN,
        })
    };
    let ratio = |x: f64| if x.is_nan() { "n/a".to_owned() } else { pct(x) };
    for (w, (label, unit, per)) in WORKLOADS.iter().enumerate() {
        print!("{:<32}", format!("{label} {unit}"));
        for i in 0..targets.len() {
            let s = get(&rate, w, i);
            print!(
                " {:>30}",
                format!("{:.2} ({:.2}-{:.2})", s.median, s.min, s.max)
            );
        }
        let med = |i: usize| get(&rate, w, i).median;
        println!(
            " {:>14} {:>14}",
            ratio(med(1) / med(0)),
            ratio(med(2) / med(0))
        );
        let cmed = |i: usize| get(&cpu, w, i).median;
        print!("{:<32}", format!("  guest us per {per}"));
        for i in 0..targets.len() {
            print!(" {:>30}", format!("{:.2}", cmed(i)));
        }
        println!(
            " {:>14} {:>14}",
            ratio(cmed(1) / cmed(0)),
            ratio(cmed(2) / cmed(0))
        );
    }
    if !failed.is_empty() {
        println!("runs that failed (left out): {}", failed.join("; "));
    }
    println!(
        "paper (KVM, 10 GbE): nested -68 % throughput and +31 % latency against a single layer"
    );
}

/// The network configs `cni_add_ms` runs: the first plugin of each runtime's conflist.
const NESTLESS_NET: &str = r#"{"cniVersion":"1.0.0","name":"nestless","type":"nestless-cni","shimConfig":"/etc/nestless/shim.toml"}"#;
const NESTED_NET: &str = r#"{"cniVersion":"1.0.0","name":"nested","type":"bridge","bridge":"cni0","isGateway":true,"ipMasq":true,"hairpinMode":true,"ipam":{"type":"host-local","ranges":[[{"subnet":"172.30.0.0/24"}]],"routes":[{"dst":"0.0.0.0/0"}]}}"#;

/// Runs CNI ADD of `plugin` with `conf` for a fresh network namespace in the guest, checks
/// that eth0 got the result's address, runs DEL; returns how long ADD ran in the guest (ms,
/// measured by the guest's exec server around the plugin's process).
fn cni_add_ms(node: &Node, plugin: &str, conf: &str, tag: &str) -> f64 {
    let ns = format!("nlbench-{tag}");
    node.sh(&format!("/usr/bin/ip netns add {ns}"));
    let cni = |command: &str| {
        GuestCommand::new(format!("/opt/cni/bin/{plugin}"))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", format!("{ns}-{plugin}"))
            .env("CNI_NETNS", format!("/run/netns/{ns}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/opt/cni/bin")
            .stdin(conf.as_bytes().to_vec())
            .timeout(Duration::from_secs(120))
    };
    let add = node.vm().run(&cni("ADD"));
    assert!(
        add.success(),
        "CNI ADD {plugin}: {}{}",
        add.stdout_str(),
        add.stderr_str()
    );
    let result: Value = serde_json::from_slice(&add.stdout).expect("a CNI result");
    let ip = result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .expect("an address in the CNI result")
        .to_owned();
    let eth0 = node.sh(&format!("/usr/bin/ip -n {ns} -o -4 addr show dev eth0"));
    assert!(eth0.contains(&ip), "{plugin}: eth0 lacks {ip}: {eth0}");
    let del = node.vm().run(&cni("DEL"));
    assert!(del.success(), "CNI DEL {plugin}: {}", del.stdout_str());
    node.sh(&format!("/usr/bin/ip netns del {ns}"));
    add.guest_duration.as_secs_f64() * 1e3
}

/// One short RR exchange, retried while the server starts (panics if it never answers).
fn rr_probe(t: &Target, rr_bin: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut cmd = Command::new(rr_bin);
        cmd.args(["ping", &format!("{}:{}", t.ip, t.rr_port), "5", "8", "0"]);
        let r = run(cmd, None, Duration::from_secs(60));
        if r.code == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} at {}:{} does not answer: {}",
            t.label,
            t.ip,
            t.rr_port,
            r.stderr
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
