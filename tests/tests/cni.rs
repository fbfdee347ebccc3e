//! `nestless-cni` against the real agent, with this machine playing the VM:
//! the agent's netns backend puts the NIC in the host namespace, and the
//! plugin moves it into a pod namespace, as containerd's CRI would run it.
//! Needs root.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use nestless_tests::{
    agent::{bin_path, AgentProc},
    netenv::{check, host_links, random_subnet, require_root, run, suffix, Bridge, Netns},
};
use serde_json::{json, Value};

struct Rig {
    agent: AgentProc,
    bridge: Bridge,
    net: String,
    shim_toml: PathBuf,
}

/// An agent serving this host as VM "local" (its NICs land in `vm_netns`,
/// the host's own namespace unless a test says otherwise).
fn rig_with(vm_netns: &str, nic_wait_ms: u64) -> Rig {
    rig_with_vm(vm_netns, nic_wait_ms, "")
}

/// [`rig_with`], with more keys for the VM (`vm_extra`, TOML lines).
fn rig_with_vm(vm_netns: &str, nic_wait_ms: u64, vm_extra: &str) -> Rig {
    require_root();
    let net = random_subnet();
    let bridge = Bridge::new(Some(&format!("{net}.1/24")));
    let agent = AgentProc::start(|dir| {
        format!(
            "{}[[network]]\nname = \"n\"\nbridge = \"{}\"\nsubnet = \"{net}.0/24\"\ngateway = \"{net}.1\"\n\
             [[vm]]\nname = \"local\"\nbackend = \"netns\"\nnetns = \"{vm_netns}\"\nsocket = \"{}/local.sock\"\n{vm_extra}",
            AgentProc::agent_section(dir),
            bridge.name,
            dir.display()
        )
    });
    let shim_toml = agent.dir.path().join("shim.toml");
    std::fs::write(
        &shim_toml,
        format!(
            "[agent]\naddress = \"unix://{}/local.sock\"\nconnect_timeout_ms = 2000\n[network]\nnic_wait_ms = {nic_wait_ms}\n",
            agent.dir.path().display()
        ),
    )
    .unwrap();
    Rig {
        agent,
        bridge,
        net,
        shim_toml,
    }
}

fn rig() -> Rig {
    rig_with("/proc/self/ns/net", 3000)
}

struct Out {
    ok: bool,
    stdout: Value,
    stderr: String,
}

fn cni(rig: &Rig, command: &str, sandbox: &str, netns: &Path, extra: Value) -> Out {
    let mut conf = json!({
        "cniVersion": "1.0.0",
        "name": "nestless",
        "type": "nestless-cni",
        "shimConfig": rig.shim_toml,
    });
    if let (Some(c), Some(e)) = (conf.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    let mut child = Command::new(bin_path("nestless-cni"))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", sandbox)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nestless-cni");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    Out {
        ok: out.status.success(),
        stdout: if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("stdout not JSON ({e}): {text}"))
        },
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}

fn leases(rig: &Rig) -> usize {
    rig.agent.state()["nics"].as_array().unwrap().len()
}

#[test]
fn add_check_del_in_a_pod_namespace() {
    let rig = rig();
    let pod = Netns::new("pod");
    let sb = format!("sb{}", suffix());
    let out = cni(&rig, "ADD", &sb, &pod.path(), json!({}));
    assert!(out.ok, "ADD failed: {} {}", out.stdout, out.stderr);
    let r = &out.stdout;
    assert_eq!(r["cniVersion"], "1.0.0");
    let ip = r["ips"][0]["address"].as_str().unwrap().to_string();
    assert!(ip.starts_with(&rig.net) && ip.ends_with("/24"), "{r}");
    assert_eq!(r["ips"][0]["gateway"], format!("{}.1", rig.net));
    assert_eq!(r["interfaces"][0]["name"], "eth0");
    let mac = r["interfaces"][0]["mac"].as_str().unwrap().to_string();

    // eth0 in the pod namespace: the MAC, the address, up, the default route.
    let eth0 = pod
        .links()
        .into_iter()
        .find(|l| l["ifname"] == "eth0")
        .expect("eth0 in the pod netns");
    assert_eq!(eth0["address"], mac.as_str());
    let addrs = check(&["ip", "-n", &pod.name, "-o", "addr", "show", "dev", "eth0"]);
    assert!(addrs.contains(&ip), "{addrs}");
    // The address is announced (gratuitous ARP) when eth0 comes up.
    let notify = check(&[
        "ip",
        "netns",
        "exec",
        &pod.name,
        "cat",
        "/proc/sys/net/ipv4/conf/eth0/arp_notify",
    ]);
    assert_eq!(notify.trim(), "1");
    let routes = check(&["ip", "-n", &pod.name, "route"]);
    assert!(
        routes.contains(&format!("default via {}.1 dev eth0", rig.net)),
        "{routes}"
    );
    // It left the VM (host) namespace, and reaches the bridge both ways.
    assert!(
        run(&[
            "ip",
            "link",
            "show",
            "dev",
            &format!(
                "nlg{}",
                rig.agent.state()["nics"][0]["id"].as_str().unwrap()
            )
        ])
        .status
        .code()
            != Some(0)
    );
    let out = pod.exec(&[
        "busybox",
        "ping",
        "-c",
        "2",
        "-W",
        "3",
        &format!("{}.1", rig.net),
    ]);
    assert!(out.status.success(), "pod -> gateway: {out:?}");
    let bare = ip.split('/').next().unwrap();
    assert!(
        run(&["busybox", "ping", "-c", "2", "-W", "3", bare])
            .status
            .success(),
        "host -> pod"
    );

    assert!(cni(&rig, "CHECK", &sb, &pod.path(), json!({})).ok);
    // A repeated ADD (kubelet retry) gives the same NIC and address, no second NIC.
    let again = cni(&rig, "ADD", &sb, &pod.path(), json!({}));
    assert!(again.ok, "{}", again.stderr);
    assert_eq!(again.stdout["ips"], r["ips"]);
    assert_eq!(leases(&rig), 1);
    assert_eq!(rig.bridge.ports().len(), 1);

    let del = cni(&rig, "DEL", &sb, &pod.path(), json!({}));
    assert!(del.ok, "DEL: {}", del.stderr);
    assert_eq!(leases(&rig), 0);
    assert!(rig.bridge.ports().is_empty());
    assert!(
        pod.links().iter().all(|l| l["ifname"] != "eth0"),
        "eth0 left in the pod"
    );
    // DEL is idempotent; CHECK now fails.
    assert!(cni(&rig, "DEL", &sb, &pod.path(), json!({})).ok);
    let chk = cni(&rig, "CHECK", &sb, &pod.path(), json!({}));
    assert!(
        !chk.ok
            && chk.stdout["msg"]
                .as_str()
                .unwrap()
                .contains("no host-provided NIC"),
        "{}",
        chk.stdout
    );
}

#[test]
fn del_after_the_namespace_is_gone_releases_the_lease() {
    let rig = rig();
    let sb = format!("sb{}", suffix());
    let path;
    {
        let pod = Netns::new("gone");
        path = pod.path();
        assert!(cni(&rig, "ADD", &sb, &path, json!({})).ok);
        assert_eq!(leases(&rig), 1);
    }
    // The namespace was deleted: the veth went with it; DEL still releases.
    let del = cni(&rig, "DEL", &sb, &path, json!({}));
    assert!(del.ok, "{}", del.stderr);
    assert_eq!(leases(&rig), 0);
    assert!(host_links("nlh")
        .iter()
        .all(|l| !rig.bridge.ports().contains(l)));
}

#[test]
fn status_gc_and_old_versions() {
    let mut rig = rig();
    let pods: Vec<Netns> = (0..2).map(|_| Netns::new("gc")).collect();
    let ids: Vec<String> = (0..2).map(|_| format!("sb{}", suffix())).collect();
    let old = cni(
        &rig,
        "ADD",
        &ids[0],
        &pods[0].path(),
        json!({"cniVersion": "0.3.1"}),
    );
    assert!(old.ok, "{}", old.stderr);
    assert_eq!(old.stdout["ips"][0]["version"], "4");
    assert!(cni(&rig, "ADD", &ids[1], &pods[1].path(), json!({})).ok);
    // GC with only the first attachment valid releases the second.
    let gc = cni(
        &rig,
        "GC",
        "",
        Path::new(""),
        json!({"cniVersion": "1.1.0", "cni.dev/valid-attachments": [{"containerID": ids[0], "ifname": "eth0"}]}),
    );
    assert!(gc.ok, "{}", gc.stderr);
    let nics = rig.agent.state()["nics"].as_array().unwrap().clone();
    assert_eq!(nics.len(), 1);
    assert_eq!(nics[0]["sandbox_id"], ids[0].as_str());
    assert!(
        cni(
            &rig,
            "STATUS",
            "",
            Path::new(""),
            json!({"cniVersion": "1.1.0"})
        )
        .ok
    );
    rig.agent.stop();
    let st = cni(
        &rig,
        "STATUS",
        "",
        Path::new(""),
        json!({"cniVersion": "1.1.0"}),
    );
    assert!(!st.ok);
    assert_eq!(st.stdout["code"], 50);
    // Agent down: ADD fails with "try again later" and changes nothing.
    let add = cni(
        &rig,
        "ADD",
        &format!("sb{}", suffix()),
        &pods[1].path(),
        json!({}),
    );
    assert!(!add.ok);
    assert_eq!(add.stdout["code"], 11, "{}", add.stdout);
    rig.agent.restart();
    assert_eq!(leases(&rig), 1);
}

#[test]
fn nic_that_never_appears_fails_cleanly() {
    // The agent plugs NICs into a namespace the plugin does not look in: the
    // wait times out, and the failed ADD releases the NIC and its lease.
    let elsewhere = Netns::new("else");
    let rig = rig_with(elsewhere.path().to_str().unwrap(), 700);
    let pod = Netns::new("pod");
    let out = cni(
        &rig,
        "ADD",
        &format!("sb{}", suffix()),
        &pod.path(),
        json!({}),
    );
    assert!(!out.ok);
    let msg = out.stdout["msg"].as_str().unwrap();
    assert!(msg.contains("appeared within"), "{msg}");
    assert_eq!(leases(&rig), 0, "lease left behind a failed ADD");
    assert!(rig.bridge.ports().is_empty());
    assert!(elsewhere
        .links()
        .iter()
        .all(|l| !l["ifname"].as_str().unwrap().starts_with("nlg")));
}

#[test]
fn a_full_vm_is_refused_with_a_named_code() {
    // The agent's RESOURCE_EXHAUSTED (the VM's max_nics) is CNI code 101, not
    // a bare "plugin error"; the refused ADD changes nothing.
    let rig = rig_with_vm("/proc/self/ns/net", 3000, "max_nics = 1\n");
    let pods: Vec<Netns> = (0..2).map(|_| Netns::new("full")).collect();
    let first = cni(
        &rig,
        "ADD",
        &format!("sb{}", suffix()),
        &pods[0].path(),
        json!({}),
    );
    assert!(first.ok, "{}", first.stderr);
    let second = cni(
        &rig,
        "ADD",
        &format!("sb{}", suffix()),
        &pods[1].path(),
        json!({}),
    );
    assert!(!second.ok);
    assert_eq!(second.stdout["code"], 101, "{}", second.stdout);
    let msg = second.stdout["msg"].as_str().unwrap();
    assert!(msg.contains("RESOURCE_EXHAUSTED"), "{msg}");
    assert_eq!(leases(&rig), 1);
    assert!(pods[1]
        .links()
        .iter()
        .all(|l| l["ifname"].as_str() != Some("eth0")));
}

#[test]
fn bad_configuration_and_environment() {
    let rig = rig();
    let pod = Netns::new("bad");
    let out = cni(&rig, "ADD", "", &pod.path(), json!({}));
    assert!(!out.ok);
    assert_eq!(out.stdout["code"], 4);
    let out = cni(
        &rig,
        "ADD",
        "sb",
        &pod.path(),
        json!({"cniVersion": "2.0.0"}),
    );
    assert_eq!(out.stdout["code"], 1);
    let out = cni(
        &rig,
        "ADD",
        "sb",
        &pod.path(),
        json!({"shimConfig": "/nonexistent/shim.toml"}),
    );
    assert_eq!(out.stdout["code"], 7);
    assert!(out.stdout["msg"]
        .as_str()
        .unwrap()
        .contains("/nonexistent/shim.toml"));
    assert_eq!(leases(&rig), 0);
}

/// A unix socket in front of the agent's that loses the reply of the first
/// connection's first request (the agent handles it, the caller never hears
/// back: an agent restarting under the request looks the same to the caller).
/// Later connections pass through. Counts the connections.
fn lossy_proxy(upstream: PathBuf, listen: &Path) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    use std::{
        io::Read,
        os::unix::net::{UnixListener, UnixStream},
        sync::{atomic::Ordering, Arc},
        thread,
    };
    let listener = UnixListener::bind(listen).expect("bind the proxy socket");
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let n = seen.fetch_add(1, Ordering::SeqCst);
            let Ok(agent) = UnixStream::connect(&upstream) else {
                return;
            };
            let (mut c_in, mut a_out) = (client.try_clone().unwrap(), agent.try_clone().unwrap());
            thread::spawn(move || {
                let _ = std::io::copy(&mut c_in, &mut a_out);
            });
            let (mut a_in, mut c_out) = (agent, client);
            thread::spawn(move || {
                if n == 0 {
                    // Wait for the reply, drop it, hang up on the caller.
                    let mut buf = [0u8; 4096];
                    let _ = a_in.read(&mut buf);
                    let _ = c_out.shutdown(std::net::Shutdown::Both);
                } else {
                    let _ = std::io::copy(&mut a_in, &mut c_out);
                }
            });
        }
    });
    count
}

#[test]
fn a_lost_reply_is_asked_again_and_gets_the_same_nic() {
    let mut rig = rig();
    let proxy = rig.agent.dir.path().join("proxy.sock");
    let connections = lossy_proxy(rig.agent.local_socket(), &proxy);
    rig.shim_toml = rig.agent.dir.path().join("shim-proxy.toml");
    std::fs::write(
        &rig.shim_toml,
        format!(
            "[agent]\naddress = \"unix://{}\"\nconnect_timeout_ms = 2000\n[network]\nnic_wait_ms = 3000\n",
            proxy.display()
        ),
    )
    .unwrap();
    let pod = Netns::new("pod");
    let sb = format!("sb{}", suffix());
    let out = cni(&rig, "ADD", &sb, &pod.path(), json!({}));
    assert!(out.ok, "ADD failed: {} {}", out.stdout, out.stderr);
    assert_eq!(
        connections.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "the plugin asked again on a second connection"
    );
    // One NIC, attached once: the retry got the same NIC.
    assert_eq!(leases(&rig), 1, "{}", rig.agent.state());
    let ip = out.stdout["ips"][0]["address"].as_str().unwrap().to_owned();
    assert_eq!(
        out.stdout["interfaces"][0]["mac"],
        rig.agent.state()["nics"][0]["mac"],
        "the pod has the one NIC the agent attached"
    );
    let addr = check(&[
        "ip", "-n", &pod.name, "-o", "-4", "addr", "show", "dev", "eth0",
    ]);
    assert!(addr.contains(&ip), "{addr} lacks {ip}");
    let out = cni(&rig, "DEL", &sb, &pod.path(), json!({}));
    assert!(out.ok, "DEL failed: {}", out.stderr);
    assert_eq!(leases(&rig), 0);
}
