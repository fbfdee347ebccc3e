//! The shim's benchmark (issue 3), in one run on this machine playing the VM:
//!
//! - **pod network-ready time**: CRI RunPodSandbox (which returns once CNI has
//!   configured the pod's eth0 and the sandbox runs) with nestless-cni (the
//!   agent's NIC: veth from the host agent, moved and configured) against the
//!   CNI bridge plugin with host-local IPAM and NAT (what a nested setup runs
//!   in the VM). Both under the same runtime handler (our shim), so only the
//!   network differs; the two alternate pod by pod, so that load drifts touch
//!   both alike. Also the CNI ADD alone, each plugin exec'd as CRI execs it on
//!   a fresh namespace.
//! - **shim memory per pod**: the same pod (pause + one busybox container)
//!   under containerd-shim-nestless-v2 and under Debian's
//!   containerd-shim-runc-v2: RSS and PSS of the pod's shim process, after the
//!   idle threads have gone.
//!
//! ```sh
//! cargo bench -p nestless-tests --bench shim_pod      # as root
//! # NESTLESS_BENCH_PODS (default 20): pods per network; NESTLESS_BENCH_RSS_PODS (default 3)
//! ```
//! The shim's RSS depends on how it is linked: `RUSTFLAGS="-C target-feature=+crt-static"`
//! (static glibc) saves the shared libraries' pages; see docs/benchmarks.md.

use std::{
    fs,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use nestless_tests::{
    agent::AgentProc,
    containerd::{random_name, Containerd, Options, CRI_HANDLER},
    cri::{cri, run_busybox, use_bridge_cni, use_nestless_cni, K8S_NS},
    netenv::{random_subnet, require_root, Bridge, Netns},
};
use serde_json::{json, Value};

fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn row(name: &str, v: &[f64]) -> f64 {
    let p50 = pct(v, 0.5);
    println!(
        "  {name:<34} n={:<3} min {:>7.1}  p50 {:>7.1}  p90 {:>7.1}  max {:>7.1} ms",
        v.len(),
        pct(v, 0.0),
        p50,
        pct(v, 0.9),
        pct(v, 1.0)
    );
    p50
}

/// A CRI pod: RunPodSandbox's duration, then StopPodSandbox + RemovePodSandbox.
fn pod_cycle(c: &Containerd, name: &str) -> f64 {
    let r = cri(c, &["runp", "--name", name, "--handler", CRI_HANDLER]);
    let id = r["id"].as_str().expect("an id").to_owned();
    let ms = r["ms"].as_f64().expect("ms");
    cri(c, &["stopp", &id]);
    cri(c, &["rmp", &id]);
    ms
}

/// Runs a CNI plugin as CRI does: `CNI_COMMAND` on namespace `ns`, the network
/// configuration (one plugin of `conflist`) on stdin; returns its duration.
fn cni_exec(c: &Containerd, conflist: &Value, command: &str, id: &str, ns: &Netns) -> f64 {
    let mut conf = conflist["plugins"][0].clone();
    conf["cniVersion"] = conflist["cniVersion"].clone();
    conf["name"] = conflist["name"].clone();
    let plugin = c
        .dir()
        .join("cni/bin")
        .join(conf["type"].as_str().expect("a plugin type"));
    let t = Instant::now();
    let mut child = Command::new(plugin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", format!("/run/netns/{}", ns.name))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", c.dir().join("cni/bin"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the CNI plugin");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.to_string().as_bytes())
        .expect("write the config");
    let out = child.wait_with_output().expect("the plugin ends");
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    assert!(
        out.status.success(),
        "{} {command}: {}{}",
        conf["type"],
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ms
}

fn conflist_of(c: &Containerd) -> Value {
    let dir = c.dir().join("cni/net.d");
    let file = fs::read_dir(&dir)
        .expect("cni/net.d")
        .flatten()
        .next()
        .expect("a conflist")
        .path();
    serde_json::from_str(&fs::read_to_string(file).expect("read")).expect("JSON")
}

/// kB figures of `pid`'s memory: (RSS, PSS).
fn memory_kb(pid: u32) -> (u64, u64) {
    let field = |file: &str, key: &str| -> u64 {
        fs::read_to_string(format!("/proc/{pid}/{file}"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/{file}"))
    };
    (field("status", "VmRSS:"), field("smaps_rollup", "Pss:"))
}

fn main() {
    require_root();
    let pods = env_or("NESTLESS_BENCH_PODS", 20);
    let rss_pods = env_or("NESTLESS_BENCH_RSS_PODS", 3);
    let shim = nestless_tests::containerd::shim_binary();
    println!(
        "shim {} ({} bytes)",
        shim.display(),
        fs::metadata(&shim).expect("the shim").len()
    );

    // This machine plays the VM: the agent's NICs come into its own namespace.
    let net = random_subnet();
    let bridge = Bridge::new(Some(&format!("{net}.1/24")));
    let agent = AgentProc::local_vm(&bridge.name, &net, "/proc/self/ns/net");
    let with_agent = Containerd::start(Options {
        network_mode: "agent".into(),
        extra_shim_config: format!(
            "[agent]\naddress = \"unix://{}\"\n",
            agent.local_socket().display()
        ),
        pause_image: true,
        ..Options::default()
    });
    use_nestless_cni(&with_agent);
    // The nested network: the bridge plugin's own bridge, NAT, the shim without host NICs.
    let nested_bridge = random_name("nlcni")[..15].to_owned();
    let nested = Containerd::start(Options {
        pause_image: true,
        ..Options::default()
    });
    use_bridge_cni(&nested, &nested_bridge, &random_subnet());
    for c in [&with_agent, &nested] {
        c.import_busybox(K8S_NS);
    }

    println!("\npod network-ready: RunPodSandbox (CNI ADD + sandbox start), alternating, {pods} pods each");
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for i in 0..pods {
        let mut turn = [(&with_agent, &mut ours), (&nested, &mut theirs)];
        if i % 2 == 1 {
            turn.reverse();
        }
        for (c, v) in turn {
            v.push(pod_cycle(c, &format!("bench-{i}")));
        }
    }
    assert!(
        agent.leases().is_empty(),
        "leases left: {:?}",
        agent.leases()
    );
    let a = row("nestless-cni (host NIC)", &ours);
    let b = row("bridge + host-local + NAT", &theirs);
    println!("  p50 ratio nestless / bridge: {:.2}", a / b);

    println!(
        "\nCNI ADD alone (plugin exec'd on a fresh namespace to eth0 configured), {pods} each"
    );
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let (ours_conf, theirs_conf) = (conflist_of(&with_agent), conflist_of(&nested));
    for i in 0..pods {
        for (c, conf, v) in [
            (&with_agent, &ours_conf, &mut ours),
            (&nested, &theirs_conf, &mut theirs),
        ] {
            let ns = Netns::new("b");
            let id = format!("cni-bench-{i}-{}", ns.name);
            v.push(cni_exec(c, conf, "ADD", &id, &ns));
            cni_exec(c, conf, "DEL", &id, &ns);
        }
    }
    assert!(
        agent.leases().is_empty(),
        "leases left: {:?}",
        agent.leases()
    );
    let a = row("nestless-cni ADD", &ours);
    let b = row("bridge ADD", &theirs);
    println!("  p50 ratio nestless / bridge: {:.2}", a / b);

    println!("\nshim memory per pod (pause + busybox sleep), {rss_pods} pods each");
    let mut ids = Vec::new();
    for (c, handler) in [(&with_agent, CRI_HANDLER), (&nested, "runc")] {
        for i in 0..rss_pods {
            let r = cri(
                c,
                &["runp", "--name", &format!("rss-{i}"), "--handler", handler],
            );
            let pod = r["id"].as_str().expect("an id").to_owned();
            run_busybox(c, &pod, "app", &["sleep", "100000"]);
            ids.push((c, pod));
        }
    }
    // tokio's blocking pool keeps idle threads for 10 s.
    thread::sleep(Duration::from_secs(12));
    let mut results = Vec::new();
    for (label, c, binary) in [
        (
            "containerd-shim-nestless-v2",
            &with_agent,
            "containerd-shim-nestless-v2",
        ),
        (
            "containerd-shim-runc-v2 (Debian)",
            &nested,
            "containerd-shim-runc-v2",
        ),
    ] {
        let pids = c.shim_pids_of(binary, Some(K8S_NS));
        assert_eq!(
            pids.len(),
            rss_pods,
            "{label}: one shim per pod, got {pids:?}"
        );
        let mem: Vec<(u64, u64)> = pids.iter().map(|p| memory_kb(*p)).collect();
        let rss = mem.iter().map(|m| m.0).sum::<u64>() as f64 / mem.len() as f64;
        let pss = mem.iter().map(|m| m.1).sum::<u64>() as f64 / mem.len() as f64;
        println!(
            "  {label:<34} RSS {rss:>8.0} kB   PSS {pss:>8.0} kB   per pod (mean of {rss_pods})"
        );
        results.push(json!({"shim": label, "rss_kb": rss, "pss_kb": pss}));
    }
    println!(
        "  RSS ratio nestless / runc-v2: {:.2}   PSS ratio: {:.2}",
        results[0]["rss_kb"].as_f64().unwrap() / results[1]["rss_kb"].as_f64().unwrap(),
        results[0]["pss_kb"].as_f64().unwrap() / results[1]["pss_kb"].as_f64().unwrap()
    );
    for (c, pod) in ids {
        cri(c, &["stopp", &pod]);
        cri(c, &["rmp", &pod]);
    }
    assert!(
        agent.leases().is_empty(),
        "leases left: {:?}",
        agent.leases()
    );
    drop(nested);
    drop(with_agent);
    let _ = Command::new("ip")
        .args(["link", "del", &nested_bridge])
        .status();
}
