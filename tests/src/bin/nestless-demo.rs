//! The README's demo (run by `tests/demo.sh`): the host agent and a real VM with containerd
//! and our shim; a pod created through CRI gets its own NIC from the host, which then reaches
//! it (ping, HTTP) with no bridge or NAT inside the VM; the pod is deleted and its NIC
//! unplugged. Prints each step with its duration; cleans up at the end (also on failure).
//!
//! Needs root, QEMU, vhost-device-vsock, containerd's Debian packages (see tests/demo.sh).

use std::time::{Duration, Instant};

use nestless_tests::{
    containerd::CRI_HANDLER,
    e2e::{eventually, http_get, httpd_script, step, Cluster, ClusterOptions, Guest},
};

const BODY: &str = "hello from a pod with its own host-provided NIC";

fn main() {
    // The agent's launcher finds the workspace's binaries through NESTLESS_BIN_DIR when it
    // is not run as a test; they are beside this program.
    if std::env::var_os("NESTLESS_BIN_DIR").is_none() {
        let exe = std::env::current_exe().expect("this program's path");
        let dir = exe.parent().expect("a directory").to_path_buf();
        std::env::set_var("NESTLESS_BIN_DIR", dir);
    }
    let t0 = Instant::now();
    println!("nestless demo: BrFusion (a host-provided NIC per pod) in a real VM");
    println!("(times per step; under TCG, without KVM, the VM runs 10-50x slower than on KVM)\n");

    let cluster = Cluster::start(ClusterOptions::default());
    let node = cluster.node(0);
    println!(
        "\n  host bridge {} ({}), VM {} ({:?}) with its own NIC {}, agent {}",
        cluster.bridge().name,
        cluster.gateway(),
        node.vm().name(),
        node.vm().accel(),
        node.own_ip(),
        cluster.agent().config.display()
    );

    let (pod, runp_ms) = step(
        "CRI RunPodSandbox (handler nestless) + busybox httpd container",
        || node.cri_pod("demo-web", CRI_HANDLER, &[], &httpd_script(BODY)),
    );
    let rec = cluster
        .record_of(&pod.id)
        .expect("the agent has a record of the pod's NIC");
    println!(
        "  RunPodSandbox took {runp_ms:.0} ms in the guest: nestless-cni asked the agent over vsock,\n  \
         the agent created tap nlh{id} on {br} and hot-plugged virtio-net nl-{id} (MAC {mac}) on {slot},\n  \
         the plugin moved it into the pod's namespace as eth0 {ip}/24",
        id = rec.id,
        br = cluster.bridge().name,
        mac = rec.mac,
        slot = rec.slot.as_deref().unwrap_or("?"),
        ip = rec.ipv4,
    );
    let status = step("CRI PodSandboxStatus", || node.cri(&["inspectp", &pod.id]));
    println!(
        "  pod {} is {}, IP {} (what crictl inspectp shows)",
        &pod.id[..12],
        status["state"].as_str().unwrap_or("?"),
        status["ip"].as_str().unwrap_or("?")
    );
    let route = node.in_netns(
        pod.pid,
        "/usr/bin/ip route; /usr/bin/ip -d link show eth0 | grep -o 'parentbus [a-z]*'",
    );
    let route: Vec<&str> = route.lines().map(str::trim).collect();
    println!("  inside the pod: {}", route.join("; "));
    let nat = node.sh(
        "/usr/bin/ip -o link show type bridge | wc -l; iptables -t nat -S | grep -c '^-A' || true",
    );
    let mut nat = nat.lines();
    println!(
        "  inside the VM: {} bridge(s), {} NAT rule(s)",
        nat.next().unwrap_or("?").trim(),
        nat.next().unwrap_or("?").trim()
    );

    let ping = step("host -> pod: ping", || cluster.host_ping(&pod.ip));
    if let Some(summary) = ping.lines().find(|l| l.contains("round-trip")) {
        println!("  {}", summary.trim());
    }
    let page = step("host -> pod: HTTP GET (TCP to busybox httpd)", || {
        eventually("the pod's httpd", Duration::from_secs(60), || {
            http_get(&pod.ip, 80).map_err(|e| e.to_string())
        })
    });
    assert!(page.contains(BODY), "unexpected page:\n{page}");
    println!("  http://{}/ -> {:?}", pod.ip, BODY);

    let mut qmp = node.vm().qmp();
    step("CRI StopPodSandbox + RemovePodSandbox", || {
        node.cri_delete(&pod.id)
    });
    let device = format!("nl-{}", rec.id);
    qmp.wait_event("DEVICE_DELETED", Duration::from_secs(60), |d| {
        d["device"] == device.as_str()
    })
    .expect("QEMU reports the NIC unplugged");
    assert!(cluster.record_of(&pod.id).is_none(), "lease kept");
    println!(
        "  QEMU: DEVICE_DELETED {device}; agent: lease of {} freed, {} NIC(s) left",
        rec.ipv4,
        cluster.records().len()
    );

    step("cleanup (agent, VM, taps, bridge)", || drop(cluster));
    println!("\ndemo done in {:.1?}", t0.elapsed());
}
