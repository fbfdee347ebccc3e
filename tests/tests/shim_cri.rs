//! The CRI path on this machine, as kubelet drives it: a CRI client
//! (`nestless-cri`, gRPC over containerd's socket) against a real containerd
//! whose CRI plugin runs pods under runtime handler `nestless` (our shim) and
//! sets their network up with `nestless-cni`, from the shipped conflist.
//!
//! As in `shim_network.rs`, this machine plays the VM: the agent serves it as
//! VM "local" (netns backend in the host's own namespace) over a unix socket,
//! and a random bridge carries the gateway address.
//!
//! ```text
//!  nestless-cri runp --handler nestless ─▶ containerd CRI
//!     ├─ CNI ADD (nestless-cni) ─▶ AttachNic(sandbox id) ─▶ agent: veth, lease
//!     │     └ eth0 in the pod netns: lease address, default route via the bridge
//!     └─ shim (pause): finds the sandbox's NIC in place, attaches nothing more
//!  run ×2 (busybox: httpd on 127.0.0.1, a client) ─ ExecSync wget 127.0.0.1
//!  inspectp: the lease address      stopp: CNI DEL ─▶ DetachNic      rmp
//! ```
//!
//! Run as root; nothing skips.

use std::time::Duration;

use nestless_tests::{
    agent::AgentProc,
    containerd::{Containerd, Options, CRI_HANDLER},
    cri::{run_busybox, try_cri, use_nestless_cni, K8S_NS},
    e2e::{eventually, http_get},
    netenv::{random_subnet, require_root, run, Bridge},
};
use serde_json::Value;

/// containerd with CRI and the shipped conflist, the agent, its bridge.
/// (Fields drop in order: containerd and its pods first.)
struct Rig {
    c: Containerd,
    agent: AgentProc,
    bridge: Bridge,
    net: String,
}

impl Rig {
    fn start() -> Rig {
        require_root();
        let net = random_subnet();
        let bridge = Bridge::new(Some(&format!("{net}.1/24")));
        let agent = AgentProc::local_vm(&bridge.name, &net, "/proc/self/ns/net");
        let c = Containerd::start(Options {
            network_mode: "agent".into(),
            extra_shim_config: format!(
                "[agent]\naddress = \"unix://{}\"\nconnect_timeout_ms = 1500\n\
                 request_timeout_ms = 5000\n",
                agent.local_socket().display()
            ),
            pause_image: true,
            ..Options::default()
        });
        c.import_busybox(K8S_NS);
        use_nestless_cni(&c);
        Rig {
            c,
            agent,
            bridge,
            net,
        }
    }

    fn try_cri(&self, args: &[&str]) -> Result<Value, String> {
        try_cri(&self.c, args)
    }

    fn cri(&self, args: &[&str]) -> Value {
        nestless_tests::cri::cri(&self.c, args)
    }

    fn leases(&self) -> Vec<Value> {
        self.agent.leases()
    }

    fn records(&self) -> Vec<Value> {
        self.agent.records()
    }

    /// `ExecSync` in `container`; (exit code, stdout).
    fn exec(&self, container: &str, cmd: &[&str]) -> (i64, String) {
        let mut args = vec!["exec", container, "--"];
        args.extend_from_slice(cmd);
        let v = self.cri(&args);
        (
            v["exit_code"].as_i64().expect("exit_code"),
            v["stdout"].as_str().unwrap_or_default().to_owned(),
        )
    }
}

impl Drop for Rig {
    /// Stops and removes what a failed test left in CRI, while containerd and the agent
    /// still run, so that CNI DEL gives the NICs back and the pods' namespaces go.
    fn drop(&mut self) {
        if let Ok(pods) = try_cri(&self.c, &["pods"]) {
            for p in pods.as_array().into_iter().flatten() {
                if let Some(id) = p["id"].as_str() {
                    let _ = try_cri(&self.c, &["stopp", id]);
                    let _ = try_cri(&self.c, &["rmp", id]);
                }
            }
        }
    }
}

#[test]
fn cri_pod_gets_the_host_nic_and_releases_it() {
    let r = Rig::start();
    let gw = format!("{}.1", r.net);

    // RunPodSandbox, runtime handler nestless: CNI ADD attaches the NIC.
    let runp = r.cri(&[
        "runp",
        "--name",
        "web",
        "--namespace",
        "nestless-test",
        "--handler",
        CRI_HANDLER,
    ]);
    let pod = runp["id"].as_str().expect("runp prints the id").to_owned();
    let records = r.records();
    assert_eq!(records.len(), 1, "one NIC for the pod: {records:?}");
    let rec = &records[0];
    assert_eq!(rec["sandbox_id"], pod.as_str(), "{rec}");
    assert_eq!(rec["state"], "attached", "{rec}");
    let ip = rec["ipv4"].as_str().expect("a leased address").to_owned();
    let mac = rec["mac"].as_str().expect("a MAC").to_owned();
    assert!(ip.starts_with(&format!("{}.", r.net)), "{ip}");

    // PodSandboxStatus reports the host-provided address (what `crictl inspectp` shows).
    let status = r.cri(&["inspectp", &pod]);
    assert_eq!(status["ip"], ip.as_str(), "{status}");
    assert_eq!(status["state"], "ready", "{status}");
    assert_eq!(status["runtime_handler"], CRI_HANDLER, "{status}");

    // Two containers of the pod: a server bound to 127.0.0.1 only, and a client.
    let server = run_busybox(
        &r.c,
        &pod,
        "server",
        &[
            "sh",
            "-c",
            "mkdir -p /www && echo hello-over-localhost > /www/index.html && \
             exec httpd -f -p 127.0.0.1:8080 -h /www",
        ],
    );
    let client = run_busybox(&r.c, &pod, "client", &["sleep", "100000"]);
    let ps = r.cri(&["ps", "--pod", &pod]);
    assert_eq!(ps.as_array().map(Vec::len), Some(2), "{ps}");

    // ExecSync: the client reaches the server over localhost (one network namespace).
    let mut last = Value::Null;
    for _ in 0..50 {
        last = r.cri(&[
            "exec",
            &client,
            "--",
            "sh",
            "-c",
            // (busybox-static's wget needs glibc's NSS modules, which the image lacks)
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc 127.0.0.1 8080",
        ]);
        if last["exit_code"] == 0 {
            break;
        }
        // httpd may still be starting.
        std::thread::sleep(Duration::from_millis(200));
    }
    let page = last["stdout"].as_str().unwrap_or_default();
    assert!(page.starts_with("HTTP/1.1 200"), "{last}");
    assert!(page.ends_with("hello-over-localhost\n"), "{last}");

    // Both containers see eth0 with the host NIC's MAC, the lease, the route to the bridge.
    for ctr in [&server, &client] {
        let (code, out) = r.exec(ctr, &["ip", "addr", "show", "dev", "eth0"]);
        assert_eq!(code, 0, "{out}");
        assert!(out.contains(&format!("inet {ip}/24")), "{out}");
        assert!(out.contains(&mac), "{out}");
        let (code, routes) = r.exec(ctr, &["ip", "route"]);
        assert_eq!(code, 0);
        assert!(
            routes.contains(&format!("default via {gw} dev eth0")),
            "{routes}"
        );
    }
    // The pod and the bridge reach each other.
    let (code, out) = r.exec(&client, &["ping", "-c", "2", "-W", "5", &gw]);
    assert_eq!(code, 0, "pod -> gateway: {out}");
    let out = run(&["busybox", "ping", "-c", "2", "-W", "5", &ip]);
    assert!(out.status.success(), "host -> pod {ip}: {out:?}");
    // The shim found the NIC in place: one attach, one NIC, its host end on the bridge.
    assert_eq!(r.records().len(), 1);
    assert_eq!(
        r.bridge.ports(),
        vec![format!("nlh{}", rec["id"].as_str().unwrap())]
    );
    // One shim serves the pod.
    assert_eq!(r.c.shim_pids(Some(K8S_NS)).len(), 1, "one shim per pod");

    // StopPodSandbox: CNI DEL releases the NIC and the lease.
    r.cri(&["stopp", &pod]);
    assert_eq!(r.leases(), Vec::<Value>::new(), "lease left after stopp");
    assert_eq!(r.records(), Vec::<Value>::new(), "NIC left after stopp");
    assert!(r.bridge.ports().is_empty(), "{:?}", r.bridge.ports());
    // A second StopPodSandbox (kubelet retries) is fine.
    r.cri(&["stopp", &pod]);
    r.cri(&["rmp", &pod]);
    assert_eq!(r.cri(&["pods"]), serde_json::json!([]));
    r.c.assert_no_shim_left(K8S_NS, Duration::from_secs(10));
    assert!(
        !r.agent.log().contains("panicked"),
        "agent log:\n{}",
        r.agent.log()
    );
}

#[test]
fn cri_sandbox_fails_cleanly_when_the_agent_is_down() {
    let mut r = Rig::start();
    r.agent.kill9();
    let err = r
        .try_cri(&["runp", "--name", "down", "--handler", CRI_HANDLER])
        .expect_err("RunPodSandbox must fail without the agent");
    assert!(
        err.contains("nestless") || err.contains("agent") || err.contains("CNI"),
        "the error names the cause: {err}"
    );
    // Nothing was attached. containerd keeps the failed sandbox (NOTREADY) when the
    // network teardown failed too (CNI DEL cannot reach the agent either); kubelet
    // then stops and removes it, which goes through once the agent is back.
    r.agent.restart();
    for p in r.cri(&["pods"]).as_array().cloned().unwrap_or_default() {
        assert_eq!(p["state"], "notready", "{p}");
        let id = p["id"].as_str().expect("an id");
        r.cri(&["stopp", id]);
        r.cri(&["rmp", id]);
    }
    assert_eq!(r.cri(&["pods"]), serde_json::json!([]));
    assert_eq!(r.leases(), Vec::<Value>::new());
    assert_eq!(r.records(), Vec::<Value>::new());
    assert!(r.bridge.ports().is_empty());
    r.c.assert_no_shim_left(K8S_NS, Duration::from_secs(10));
}

/// The Hostlo annotations of a pod reach the shim through CRI (containerd's
/// `pod_annotations`, as the shipped drop-in lists them): the sandbox joins the
/// Hostlo pod, its namespace gets the segment NIC, and StopPodSandbox leaves.
#[test]
fn cri_hands_the_hostlo_annotations_to_the_shim() {
    let r = Rig::start();
    let runp = r.cri(&[
        "runp",
        "--name",
        "part0",
        "--handler",
        CRI_HANDLER,
        "--annotation",
        "io.nestless.hostlo/pod=shop",
        "--annotation",
        "io.nestless.hostlo/part=0",
    ]);
    let pod = runp["id"].as_str().expect("an id").to_owned();
    let hostlo = || r.agent.hostlo();
    let v = hostlo();
    assert_eq!(v[0]["pod"], "shop", "{v}");
    assert_eq!(v[0]["members"], serde_json::json!(["0:local"]), "{v}");
    let status = r.cri(&["inspectp", &pod]);
    assert_eq!(v[0]["pod_ip"], status["ip"], "{v} {status}");
    let app = run_busybox(&r.c, &pod, "app", &["sleep", "100000"]);
    let (code, out) = r.exec(&app, &["ip", "addr", "show", "dev", "hostlo0"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("169.254.77.1/24"), "{out}");
    r.cri(&["stopp", &pod]);
    assert_eq!(hostlo(), serde_json::json!([]));
    assert_eq!(r.leases(), Vec::<Value>::new());
    r.cri(&["rmp", &pod]);
}

/// A pod's `hostPort` works: the shipped conflist chains `portmap` after
/// nestless-cni (whose result is portmap's prevResult), so a connection to the
/// VM's address on the host port reaches the pod; StopPodSandbox removes the
/// mapping.
#[test]
fn cri_host_port_reaches_the_pod() {
    let r = Rig::start();
    let gw = format!("{}.1", r.net);
    let host_port = 20000 + rand::random::<u16>() % 10000;
    let runp = r.cri(&[
        "runp",
        "--name",
        "mapped",
        "--handler",
        CRI_HANDLER,
        "--port",
        &format!("80:{host_port}"),
    ]);
    let pod = runp["id"].as_str().expect("an id").to_owned();
    run_busybox(
        &r.c,
        &pod,
        "web",
        &[
            "sh",
            "-c",
            "mkdir -p /www && echo hello-through-hostport > /www/index.html && \
             exec httpd -f -p 80 -h /www",
        ],
    );
    // The VM's own address (here: the bridge's) on the host port.
    let page = eventually(
        &format!("GET http://{gw}:{host_port}/"),
        Duration::from_secs(30),
        || http_get(&gw, host_port).map_err(|e| e.to_string()),
    );
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.ends_with("hello-through-hostport\n"), "{page}");
    let ip = r.cri(&["inspectp", &pod])["ip"]
        .as_str()
        .expect("a pod IP")
        .to_owned();
    let nat = String::from_utf8_lossy(&run(&["iptables", "-t", "nat", "-S"]).stdout).into_owned();
    assert!(
        nat.contains(&format!("--dport {host_port}")) && nat.contains(&ip),
        "no DNAT rule for {host_port} -> {ip}:\n{nat}"
    );
    r.cri(&["stopp", &pod]);
    let nat = String::from_utf8_lossy(&run(&["iptables", "-t", "nat", "-S"]).stdout).into_owned();
    assert!(
        !nat.contains(&format!("--dport {host_port}")),
        "the mapping outlived the pod:\n{nat}"
    );
    assert_eq!(r.leases(), Vec::<Value>::new());
    r.cri(&["rmp", &pod]);
}
