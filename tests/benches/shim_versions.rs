//! The shim side by side on one containerd version (issue 12): RunPodSandbox p50 and
//! shim RSS per pod under `containerd-shim-nestless-v2` against that version's own
//! `containerd-shim-runc-v2`. Both handlers run the same pod network (nestless-cni, the
//! agent's NIC), so only the shim differs; the two alternate pod by pod.
//! `tests/containerd/bench-versions.sh` runs it on every containerd version in one run.
//!
//! ```sh
//! NESTLESS_CONTAINERD=/var/cache/nestless/versions/containerd-2 \
//!     cargo bench -p nestless-tests --bench shim_versions     # as root
//! # NESTLESS_BENCH_PODS (default 10): pods per shim; NESTLESS_BENCH_RSS_PODS (default 3)
//! ```

use std::{fs, thread, time::Duration};

use nestless_tests::{
    agent::AgentProc,
    containerd::{build, Containerd, Options, CRI_HANDLER},
    cri::{cri, run_busybox, use_nestless_cni, K8S_NS},
    netenv::{random_subnet, require_root, Bridge},
};

fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn p50(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[(v.len() - 1) / 2]
}

fn rss_kb(pid: u32) -> f64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS for pid {pid}"))
}

fn main() {
    require_root();
    let pods = env_or("NESTLESS_BENCH_PODS", 10);
    let rss_pods = env_or("NESTLESS_BENCH_RSS_PODS", 3);
    let b = build();
    let net = random_subnet();
    let bridge = Bridge::new(Some(&format!("{net}.1/24")));
    let agent = AgentProc::local_vm(&bridge.name, &net, "/proc/self/ns/net");
    let c = Containerd::start(Options {
        network_mode: "agent".into(),
        extra_shim_config: format!(
            "[agent]\naddress = \"unix://{}\"\n",
            agent.local_socket().display()
        ),
        pause_image: true,
        ..Options::default()
    });
    use_nestless_cni(&c);
    c.import_busybox(K8S_NS);
    let handlers = [
        (CRI_HANDLER, "containerd-shim-nestless-v2"),
        ("runc", "containerd-shim-runc-v2"),
    ];

    let mut ms: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for i in 0..pods {
        for k in if i % 2 == 0 { [0, 1] } else { [1, 0] } {
            let r = cri(
                &c,
                &[
                    "runp",
                    "--name",
                    &format!("b{i}-{k}"),
                    "--handler",
                    handlers[k].0,
                ],
            );
            let id = r["id"].as_str().expect("an id").to_owned();
            ms[k].push(r["ms"].as_f64().expect("ms"));
            cri(&c, &["stopp", &id]);
            cri(&c, &["rmp", &id]);
        }
    }
    assert!(
        agent.leases().is_empty(),
        "leases left: {:?}",
        agent.leases()
    );

    let mut ids = Vec::new();
    for (handler, _) in handlers {
        for i in 0..rss_pods {
            let r = cri(
                &c,
                &[
                    "runp",
                    "--name",
                    &format!("rss-{handler}-{i}"),
                    "--handler",
                    handler,
                ],
            );
            let pod = r["id"].as_str().expect("an id").to_owned();
            run_busybox(&c, &pod, "app", &["sleep", "100000"]);
            ids.push(pod);
        }
    }
    // tokio's blocking pool keeps idle threads for 10 s.
    thread::sleep(Duration::from_secs(12));
    let rss: Vec<f64> = handlers
        .iter()
        .map(|(_, binary)| {
            let pids = c.shim_pids_of(binary, Some(K8S_NS));
            assert_eq!(
                pids.len(),
                rss_pods,
                "{binary}: one shim per pod, got {pids:?}"
            );
            pids.iter().map(|p| rss_kb(*p)).sum::<f64>() / pids.len() as f64
        })
        .collect();
    for pod in ids {
        cri(&c, &["stopp", &pod]);
        cri(&c, &["rmp", &pod]);
    }
    println!(
        "| {} | {:.0} ms | {:.0} ms | {:.2} | {:.1} MB | {:.1} MB | {:.2} |",
        b.version,
        p50(&ms[0]),
        p50(&ms[1]),
        p50(&ms[0]) / p50(&ms[1]),
        rss[0] / 1024.0,
        rss[1] / 1024.0,
        rss[0] / rss[1]
    );
}
