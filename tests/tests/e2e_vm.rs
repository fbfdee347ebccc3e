//! BrFusion end to end in real nested VMs: containerd, our shim and CNI plugin in QEMU
//! guests; the agent on the host hot-plugging the pods' NICs over QMP; vsock in between
//! (see `nestless_tests::e2e`). Needs root, QEMU, vhost-device-vsock, iperf3 and iptables
//! on the host (the guest image takes them from there); it fails, never skips, without them.
//!
//! - `brfusion_pods_across_two_vms`: a CRI pod (VM 0) and a ctr pod (VM 1) get hot-plugged
//!   NICs; the host pings them and fetches a page from each; PodSandboxStatus reports the
//!   host-provided IP; the pods reach each other over the host bridge with no bridge and no
//!   NAT in either VM; deleting them unplugs the devices (DEVICE_DELETED) and frees the leases.
//! - `agent_kill9_during_pod_creation_leaks_nothing`: the agent is killed (SIGKILL) while a pod
//!   is being created, at several points, and restarted; the pod comes up or fails, and the
//!   host (taps, leases, QEMU devices) and the guest (NICs, namespaces) keep nothing else.
//! - `dual_stack_host_port_and_a_link_manager_in_the_6_1_guest`: a dual-stack network;
//!   software in the VM brings every new link up (the Debian 6.1 guest kernel refuses to
//!   rename an up link); CRI pods get their NICs all the same, IPv6 usable when
//!   RunPodSandbox returns, reported by CRI and reached from the host over IPv6; a
//!   `hostPort` reaches its pod from the host through the VM's own address.
//! - `shipped_configs_name_our_runtime_and_plugin`: the containerd drop-in and the CNI
//!   conflist in `config/` parse and name our runtime and plugin (no VM).

use std::{
    collections::BTreeSet,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use nestless_tests::{
    containerd::{random_name, CRI_HANDLER, RUNTIME},
    e2e::{
        eventually, http_get, httpd_script, records, step, Cluster, ClusterOptions, Guest, Node,
        Pod, K8S_NS,
    },
    netenv::{check, run},
};
use serde_json::{json, Value};

/// The harness monitor of `node`'s QEMU, opened before an unplug to see its event.
fn expect_device_deleted(node: &Node, device: &str, act: impl FnOnce()) {
    let mut qmp = node.vm().qmp();
    act();
    let ev = qmp
        .wait_event("DEVICE_DELETED", Duration::from_secs(120), |d| {
            d["device"] == device
        })
        .unwrap_or_else(|e| panic!("no DEVICE_DELETED for {device}: {e}"));
    eprintln!("[e2e] {}: {ev}", node.vm().name());
}

/// The pod's eth0 is the host's NIC: its MAC, a virtio device (no veth), default route via
/// the host's bridge address.
fn assert_pod_nic(node: &Node, pod: &Pod, mac: &str, gateway: &str) {
    let link = node.in_netns(pod.pid, "/usr/bin/ip -d link show dev eth0");
    assert!(
        link.contains(mac),
        "pod {} eth0 lacks MAC {mac}:\n{link}",
        pod.id
    );
    assert!(
        link.contains("parentbus virtio") && !link.contains("veth"),
        "pod {} eth0 is not the hot-plugged virtio NIC:\n{link}",
        pod.id
    );
    let routes = node.in_netns(pod.pid, "/usr/bin/ip route");
    assert!(
        routes.contains(&format!("default via {gateway} dev eth0")),
        "pod {} routes:\n{routes}",
        pod.id
    );
}

/// No bridge device in the VM's root namespace, no NAT rule, no forwarding.
fn assert_no_nested_network(node: &Node) {
    let bridges = node.sh("/usr/bin/ip -o link show type bridge");
    assert!(
        bridges.trim().is_empty(),
        "VM {} has a bridge:\n{bridges}",
        node.vm().name()
    );
    let nat = node.sh("iptables -t nat -S");
    assert!(
        !nat.lines()
            .any(|l| l.starts_with("-A") || l.starts_with("-N")),
        "VM {} has NAT rules:\n{nat}",
        node.vm().name()
    );
    let veths = node.sh("/usr/bin/ip -o link show type veth");
    assert!(
        veths.trim().is_empty(),
        "VM {} has veths:\n{veths}",
        node.vm().name()
    );
}

fn get_page(ip: &str) -> String {
    eventually(
        &format!("HTTP GET http://{ip}/"),
        Duration::from_secs(60),
        || http_get(ip, 80).map_err(|e| e.to_string()),
    )
}

#[test]
fn brfusion_pods_across_two_vms() {
    let c = Cluster::start(ClusterOptions {
        vms: 2,
        ..Default::default()
    });
    let (n0, n1) = (c.node(0), c.node(1));
    let gw = c.gateway();

    // A pod through CRI, as kubelet creates it: runtime handler "nestless".
    let (cri_pod, runp_ms) = step("CRI pod in VM 0 (RunPodSandbox + container)", || {
        n0.cri_pod(
            "web",
            CRI_HANDLER,
            &[],
            &httpd_script("hello from the CRI pod"),
        )
    });
    eprintln!("[e2e] RunPodSandbox took {runp_ms} ms in the guest");
    let rec0 = c
        .record_of(&cri_pod.id)
        .unwrap_or_else(|| panic!("no agent record for sandbox {}", cri_pod.id));
    assert_eq!(rec0.state, "attached");
    assert_eq!(rec0.vm, n0.agent_name());
    assert_eq!(rec0.ipv4, cri_pod.ip, "the pod's eth0 has the leased IP");
    // What `crictl inspectp` shows: the host-provided IP.
    let status = n0.cri(&["inspectp", &cri_pod.id]);
    assert_eq!(status["ip"], json!(cri_pod.ip), "{status}");
    assert_eq!(status["state"], "ready", "{status}");
    assert_eq!(status["runtime_handler"], CRI_HANDLER, "{status}");
    assert_pod_nic(n0, &cri_pod, &rec0.mac, &gw);
    // CRI ExecSync in the pod's container sees the same address.
    let container = cri_pod.container.clone().expect("a CRI container");
    let exec = n0.cri(&[
        "exec", &container, "--", "ip", "addr", "show", "dev", "eth0",
    ]);
    assert_eq!(exec["exit_code"], 0, "{exec}");
    assert!(
        exec["stdout"].as_str().unwrap().contains(&cri_pod.ip),
        "{exec}"
    );

    // A pod through ctr: a container with its own network namespace under our runtime.
    let ctr_id = random_name("ctr-web");
    let ctr_pod = step("ctr pod in VM 1", || {
        n1.ctr_pod(&ctr_id, &httpd_script("hello from the ctr pod"))
    });
    let rec1 = c
        .record_of(&ctr_id)
        .unwrap_or_else(|| panic!("no agent record for ctr container {ctr_id}"));
    assert_eq!(rec1.state, "attached");
    assert_eq!(rec1.vm, n1.agent_name());
    assert_eq!(rec1.ipv4, ctr_pod.ip);
    assert_pod_nic(n1, &ctr_pod, &rec1.mac, &gw);

    // QEMU has the devices, the host bridge the taps.
    for (node, rec) in [(n0, &rec0), (n1, &rec1)] {
        let ids = node.pci_device_ids();
        assert!(
            ids.contains(&format!("nl-{}", rec.id)),
            "{}: query-pci lacks nl-{}: {ids:?}",
            node.vm().name(),
            rec.id
        );
        assert!(c.bridge().ports().contains(&format!("nlh{}", rec.id)));
    }

    // The host reaches both pods: ping and a TCP request to busybox httpd.
    step("host -> pods: ping + HTTP", || {
        for (pod, body) in [
            (&cri_pod, "hello from the CRI pod"),
            (&ctr_pod, "hello from the ctr pod"),
        ] {
            c.host_ping(&pod.ip);
            let page = get_page(&pod.ip);
            assert!(page.contains(body), "http://{}/ gave:\n{page}", pod.ip);
        }
    });

    // Pod to pod across the VMs, over the host bridge only.
    step("pod <-> pod across VMs", || {
        for (node, pod, other, body) in [
            (n0, &cri_pod, &ctr_pod, "hello from the ctr pod"),
            (n1, &ctr_pod, &cri_pod, "hello from the CRI pod"),
        ] {
            node.in_netns(pod.pid, &format!("ping -c 2 -W 10 {}", other.ip));
            let page = node.in_netns(pod.pid, &format!("wget -q -O - http://{}/", other.ip));
            assert!(page.contains(body), "{} -> {}: {page}", pod.ip, other.ip);
            // Straight out of the pod's own NIC, on-link: no gateway, no VM on the way.
            let route = node.in_netns(pod.pid, &format!("/usr/bin/ip route get {}", other.ip));
            assert!(
                route.contains("dev eth0") && !route.contains(" via "),
                "{} -> {}: {route}",
                pod.ip,
                other.ip
            );
            assert_no_nested_network(node);
        }
        // The host bridge learnt each pod's MAC on that pod's own tap, not on a VM's NIC.
        let fdb = check(&["bridge", "fdb", "show", "br", &c.bridge().name]);
        for rec in [&rec0, &rec1] {
            let line = fdb
                .lines()
                .find(|l| l.starts_with(&rec.mac))
                .unwrap_or_else(|| panic!("the bridge never saw {}:\n{fdb}", rec.mac));
            assert!(
                line.contains(&format!("dev nlh{}", rec.id)),
                "{} learnt elsewhere: {line}",
                rec.mac
            );
        }
    });

    // Deleting the pods unplugs the devices and frees the leases.
    step("delete the CRI pod", || {
        expect_device_deleted(n0, &format!("nl-{}", rec0.id), || {
            n0.cri_delete(&cri_pod.id)
        });
    });
    step("delete the ctr pod", || {
        expect_device_deleted(n1, &format!("nl-{}", rec1.id), || n1.ctr_delete(&ctr_id));
    });
    for (node, rec) in [(n0, &rec0), (n1, &rec1)] {
        let ids = node.pci_device_ids();
        assert!(!ids.contains(&format!("nl-{}", rec.id)), "{ids:?}");
        assert!(!c.bridge().ports().contains(&format!("nlh{}", rec.id)));
        assert_eq!(
            node.stray_links(),
            Vec::<String>::new(),
            "NICs left in the VM"
        );
    }
    assert_eq!(c.records(), vec![], "agent records left");
    assert_eq!(c.leases(), Vec::<Value>::new(), "leases left");
    assert_eq!(n0.cri(&["pods"]), json!([]));
}

#[test]
fn dual_stack_host_port_and_a_link_manager_in_the_6_1_guest() {
    let c = Cluster::start(ClusterOptions {
        vms: 1,
        ipv6: true,
        ..Default::default()
    });
    let n = c.node(0);
    let gw6 = c.gateway6().expect("a dual-stack cluster");
    let kernel = n.sh("uname -r");
    assert!(kernel.starts_with("6.1."), "the guest kernel is {kernel}");
    // A link manager, as systemd-networkd or NetworkManager run in VMs: every link that
    // appears is brought up at once.
    n.sh(
        "setsid sh -c '/usr/bin/ip -o monitor link | while read -r _ name _; do \
         n=${name%:}; /usr/bin/ip link set \"${n%@*}\" up; done' </dev/null >/dev/null 2>&1 &",
    );
    // hostPort: the VM forwards and masquerades what it DNATs (docs/install.md; the
    // guest's portmap is Debian's 1.1, without masqAll).
    n.sh("sysctl -w net.ipv4.ip_forward=1 && \
         iptables -t nat -A POSTROUTING -m conntrack --ctstate DNAT -j MASQUERADE");

    let mut pods = Vec::new();
    for i in 0..3 {
        let ports: &[&str] = if i == 0 { &["80:8080"] } else { &[] };
        let (pod, ms) = step(&format!("CRI pod {i} with a link manager at work"), || {
            n.cri_pod(
                &format!("dual{i}"),
                CRI_HANDLER,
                ports,
                &httpd_script(&format!("hello from dual{i}")),
            )
        });
        eprintln!("[e2e] RunPodSandbox took {ms} ms");
        // Usable when RunPodSandbox returned: past DAD.
        let (v6, line) = n.eth0_ipv6(pod.pid);
        assert!(
            !line.contains("tentative") && !line.contains("dadfailed"),
            "pod {} eth0: {line}",
            pod.id
        );
        let routes = n.in_netns(pod.pid, "/usr/bin/ip -6 route");
        assert!(
            routes.contains(&format!("default via {gw6} dev eth0")),
            "{routes}"
        );
        // CRI reports both addresses (what `crictl inspectp` shows).
        let status = n.cri(&["inspectp", &pod.id]);
        assert_eq!(status["ip"], json!(pod.ip), "{status}");
        assert!(
            status["additional_ips"]
                .as_array()
                .is_some_and(|a| a.contains(&json!(v6))),
            "{status}"
        );
        pods.push((pod, v6));
    }
    step("host -> pods over IPv6: ping + HTTP", || {
        for (i, (_, v6)) in pods.iter().enumerate() {
            let out = run(&["busybox", "ping", "-6", "-c", "3", "-W", "10", v6]);
            assert!(out.status.success(), "host -> {v6}: {out:?}");
            let page = eventually(
                &format!("HTTP GET http://[{v6}]/"),
                Duration::from_secs(60),
                || http_get(v6, 80).map_err(|e| e.to_string()),
            );
            assert!(page.contains(&format!("hello from dual{i}")), "{page}");
        }
    });
    step(
        "host -> the VM's own address, hostPort 8080 -> pod 0",
        || {
            let page = eventually(
                &format!("HTTP GET http://{}:8080/", n.own_ip()),
                Duration::from_secs(60),
                || http_get(n.own_ip(), 8080).map_err(|e| e.to_string()),
            );
            assert!(page.contains("hello from dual0"), "{page}");
        },
    );
    step("delete the pods", || {
        for (pod, _) in &pods {
            n.cri_delete(&pod.id);
        }
    });
    let nat = n.sh("iptables -t nat -S");
    assert!(
        !nat.contains("--dport 8080"),
        "the mapping outlived its pod:\n{nat}"
    );
    assert_eq!(c.records(), vec![], "agent records left");
    assert_eq!(n.stray_links(), Vec::<String>::new(), "NICs left in the VM");
}

/// When, during a pod's creation, the agent is killed.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// Once the NIC's record says `attaching` (tap/hot-plug under way).
    Attaching,
    /// Once the record says `attached` (reply sent or about to be).
    Attached,
    /// Right after the creation command starts (before the request, most likely).
    Early,
}

/// How the pod is created.
#[derive(Debug, Clone, Copy)]
enum Via {
    Ctr,
    Cri,
}

/// Everything nestless holds for the VM, host and guest side, matches the agent's records,
/// which are exactly `expect` (sandbox ids).
fn assert_consistent(c: &Cluster, expect: &[&str], round: &str) {
    let node = c.node(0);
    eventually(
        &format!("{round}: records settle"),
        Duration::from_secs(90),
        || {
            let recs = c.records();
            let sandboxes: BTreeSet<&str> = recs.iter().map(|r| r.sandbox_id.as_str()).collect();
            let want: BTreeSet<&str> = expect.iter().copied().collect();
            if sandboxes != want || recs.iter().any(|r| r.state != "attached") {
                return Err(format!(
                    "records {recs:?}, want attached records for {want:?}"
                ));
            }
            let ids: BTreeSet<String> = recs.iter().map(|r| r.id.clone()).collect();
            let devices: BTreeSet<String> = node
                .pci_device_ids()
                .into_iter()
                .filter_map(|d| d.strip_prefix("nl-").map(str::to_owned))
                .collect();
            if devices != ids {
                return Err(format!("QEMU devices {devices:?} vs records {ids:?}"));
            }
            let taps: BTreeSet<String> = c
                .bridge()
                .ports()
                .into_iter()
                .filter_map(|p| p.strip_prefix("nlh").map(str::to_owned))
                .collect();
            if taps != ids {
                return Err(format!("host taps {taps:?} vs records {ids:?}"));
            }
            let leases: BTreeSet<String> = c
                .leases()
                .iter()
                .map(|l| l["sandbox_id"].as_str().unwrap_or_default().to_owned())
                .collect();
            let want_leases: BTreeSet<String> = expect.iter().map(|s| s.to_string()).collect();
            if leases != want_leases {
                return Err(format!("leases {leases:?} vs {want_leases:?}"));
            }
            // Guest: every hot-plugged NIC is in a live pod, none in the VM's root namespace.
            let stray = node.stray_links();
            if !stray.is_empty() {
                return Err(format!("NICs left in the VM's root namespace: {stray:?}"));
            }
            Ok(())
        },
    );
}

fn create(node: &Node, via: Via, name: &str) -> Result<String, String> {
    match via {
        Via::Ctr => {
            let out = node.vm().exec(&format!(
                "ctr -n {K8S_NS} run -d --runtime {RUNTIME} localhost/nestless/busybox:test {name} \
                 sleep 100000"
            ));
            if out.success() {
                Ok(name.to_owned())
            } else {
                Err(out.stderr_str())
            }
        }
        Via::Cri => node
            .try_cri(&["runp", "--name", name, "--handler", CRI_HANDLER])
            .map(|v| v["id"].as_str().unwrap_or_default().to_owned()),
    }
}

/// Removes whatever a (failed or successful) creation left in containerd.
fn remove(node: &Node, via: Via, name: &str, id: Option<&str>) {
    match via {
        Via::Ctr => {
            let _ = node.vm().exec(&format!(
                "ctr -n {K8S_NS} task rm -f {name} >/dev/null 2>&1; \
                 ctr -n {K8S_NS} container rm {name} >/dev/null 2>&1; true"
            ));
        }
        Via::Cri => {
            // A failed RunPodSandbox leaves nothing; a successful one is removed.
            let pods = node.cri(&["pods"]);
            for p in pods.as_array().into_iter().flatten() {
                let pid = p["id"].as_str().unwrap_or_default();
                if Some(pid) == id || p["name"] == name {
                    node.cri_delete(pid);
                }
            }
        }
    }
}

#[test]
fn agent_kill9_during_pod_creation_leaks_nothing() {
    let mut c = Cluster::start(ClusterOptions::default());
    let gw = c.gateway();
    let rounds = [
        (KillAt::Attaching, Via::Ctr),
        (KillAt::Attaching, Via::Cri),
        (KillAt::Attached, Via::Ctr),
        (KillAt::Early, Via::Cri),
    ];
    let mut outcomes = Vec::new();
    for (i, (at, via)) in rounds.into_iter().enumerate() {
        let round = format!("round {i} ({at:?}, {via:?})");
        let name = random_name("k9");
        let t = Instant::now();
        let (agent, nodes) = c.parts_mut();
        let (created, killed_at) = thread::scope(|s| {
            let node = &nodes[0];
            let name = name.clone();
            let creating = s.spawn(move || create(node, via, &name));
            // Kill the agent at the chosen point of the creation.
            let deadline = Instant::now() + Duration::from_secs(120);
            let killed_at = loop {
                let hit = match at {
                    KillAt::Early => t.elapsed() > Duration::from_millis(300),
                    KillAt::Attaching | KillAt::Attached => {
                        let want = if matches!(at, KillAt::Attaching) {
                            "attaching"
                        } else {
                            "attached"
                        };
                        // CRI sandbox ids are unknown until RunPodSandbox returns: any
                        // record of this VM is this creation's (the VM has no other pod).
                        records(agent).iter().any(|r| r.state == want)
                    }
                };
                if hit {
                    break Some(t.elapsed());
                }
                if creating.is_finished() || Instant::now() > deadline {
                    break None;
                }
                thread::sleep(Duration::from_millis(2));
            };
            if killed_at.is_some() {
                agent.kill9();
                agent.restart();
            }
            (creating.join().expect("creation thread"), killed_at)
        });
        let killed_at = killed_at.unwrap_or_else(|| {
            panic!(
                "{round}: the kill point never came (created: {created:?})\nagent log:\n{}",
                c.agent().log()
            )
        });
        eprintln!(
            "[e2e] {round}: agent killed {killed_at:?} after the start; creation {}",
            match &created {
                Ok(id) => format!("succeeded ({id})"),
                Err(e) => format!("failed: {}", e.trim()),
            }
        );
        match &created {
            Ok(id) => {
                // It came up: with its NIC configured, reachable from the host, and the
                // restarted agent kept its record.
                let node = c.node(0);
                let pid = node.init_pid(id);
                let pod = Pod {
                    id: id.clone(),
                    pid,
                    ip: node.eth0_ipv4(pid),
                    container: None,
                };
                let rec = c
                    .record_of(id)
                    .unwrap_or_else(|| panic!("{round}: pod {id} up without a record"));
                assert_eq!(rec.ipv4, pod.ip, "{round}");
                assert_pod_nic(node, &pod, &rec.mac, &gw);
                c.host_ping(&pod.ip);
                assert_consistent(&c, &[id.as_str()], &round);
                remove(node, via, &name, Some(id));
            }
            Err(_) => remove(c.node(0), via, &name, None),
        }
        assert_consistent(&c, &[], &round);
        let ns = c.node(0).sh("ls /run/netns");
        assert!(ns.trim().is_empty(), "{round}: pod namespaces left: {ns}");
        outcomes.push((round, created.is_ok()));
    }
    eprintln!("[e2e] outcomes: {outcomes:?}");
}

#[test]
fn shipped_configs_name_our_runtime_and_plugin() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dropin: toml::Table = std::fs::read_to_string(root.join("config/containerd-nestless.toml"))
        .unwrap()
        .parse()
        .expect("config/containerd-nestless.toml is TOML");
    assert_eq!(dropin["version"].as_integer(), Some(2));
    let cri = &dropin["plugins"]["io.containerd.grpc.v1.cri"];
    let rt = &cri["containerd"]["runtimes"][CRI_HANDLER];
    assert_eq!(rt["runtime_type"].as_str(), Some(RUNTIME));
    assert_eq!(
        rt["pod_annotations"].as_array().unwrap(),
        &vec![toml::Value::from("io.nestless.hostlo/*")]
    );
    assert_eq!(
        rt["options"]["ConfigPath"].as_str(),
        Some("/etc/nestless/shim.toml")
    );
    assert_eq!(cri["cni"]["conf_dir"].as_str(), Some("/etc/cni/net.d"));

    let conflist: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("config/10-nestless.conflist")).unwrap(),
    )
    .expect("config/10-nestless.conflist is JSON");
    assert_eq!(conflist["name"], "nestless");
    let version = conflist["cniVersion"].as_str().unwrap();
    assert!(
        nestless_shim::cni::SUPPORTED_VERSIONS.contains(&version),
        "cniVersion {version}"
    );
    let plugins = conflist["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 2);
    assert_eq!(plugins[0]["type"], "nestless-cni");
    assert_eq!(plugins[0]["shimConfig"], "/etc/nestless/shim.toml");
    // hostPort mappings: the portmap plugin, chained after ours (its prevResult).
    assert_eq!(plugins[1]["type"], "portmap");
    assert_eq!(plugins[1]["capabilities"]["portMappings"], true);
    // The pod's reply comes back through the VM (the NIC is not behind it).
    assert_eq!(plugins[1]["masqAll"], true);
    // The shim config it names is the shipped example's location, and the example parses.
    let shim = nestless_shim::config::ShimConfig::load(&root.join("config/shim.toml"));
    assert!(shim.is_ok(), "{:?}", shim.err());
}
