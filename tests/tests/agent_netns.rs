//! The host agent with the netns backend, for real: namespaces, a bridge,
//! veth pairs, the agent binary over its unix sockets. Needs root.

use std::{collections::HashSet, path::Path, time::Duration};

use nestless_protos::agent as pb;
use nestless_tests::{
    agent::{admin_client, bin_path, ctx, status_of, vm_client, AgentProc, NetnsVms},
    netenv::{check, host_links, random_subnet, require_root, run, Bridge, Netns},
};

/// One agent serving `vms` netns VMs (namespaces `vm<i>`) on network `test`.
fn rig(vms: usize, max_nics: u32) -> NetnsVms {
    NetnsVms::start(vms, max_nics, "test", "vm")
}

fn attach_req(sb: &str) -> pb::AttachNicRequest {
    pb::AttachNicRequest {
        sandbox_id: sb.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_configure_ping_detach() {
    let rig = rig(1, 8);
    let c = vm_client(&rig.socket(0)).await;
    let health = c
        .health(ctx(), &pb::HealthRequest::default())
        .await
        .unwrap();
    assert_eq!(health.vm, "vm0");
    assert_eq!(health.protocol_version, "nestless.agent.v1");

    let mut req = attach_req("sandbox-1");
    req.labels
        .insert("io.kubernetes.pod.name".into(), "web".into());
    let resp = c.attach_nic(ctx(), &req).await.unwrap();
    assert!(resp.created);
    let nic = resp.nic.unwrap();
    let addr = &nic.addresses[0];
    assert!(
        addr.address.starts_with(&rig.net) && addr.prefix_len == 24,
        "{addr:?}"
    );
    assert_eq!(addr.gateway, format!("{}.1", rig.net));
    assert_eq!(nic.mtu, 1500);
    assert_eq!(nic.routes[0].destination, "0.0.0.0/0");

    // The NIC is in the VM's namespace with the returned MAC; its host end is on the bridge.
    let ns = &rig.vms[0];
    let guest = ns
        .links()
        .into_iter()
        .find(|l| l["address"].as_str() == Some(nic.mac.as_str()))
        .unwrap_or_else(|| {
            panic!(
                "no link with MAC {} in {}: {:?}",
                nic.mac,
                ns.name,
                ns.links()
            )
        });
    let guest_if = guest["ifname"].as_str().unwrap().to_string();
    let host_if = format!("nlh{}", nic.id);
    assert_eq!(rig.bridge.ports(), vec![host_if.clone()]);

    // Configure it as the shim would, then ping both ways across the bridge.
    let cidr = format!("{}/{}", addr.address, addr.prefix_len);
    check(&["ip", "-n", &ns.name, "addr", "add", &cidr, "dev", &guest_if]);
    check(&["ip", "-n", &ns.name, "link", "set", &guest_if, "up"]);
    check(&[
        "ip",
        "-n",
        &ns.name,
        "route",
        "add",
        "default",
        "via",
        &addr.gateway,
    ]);
    let out = ns.exec(&["busybox", "ping", "-c", "2", "-W", "3", &addr.gateway]);
    assert!(
        out.status.success(),
        "ping from the VM namespace to the bridge failed: {out:?}"
    );
    let out = run(&["busybox", "ping", "-c", "2", "-W", "3", &addr.address]);
    assert!(
        out.status.success(),
        "ping from the host to the NIC failed: {out:?}"
    );

    let admin = admin_client(&rig.agent.admin).await;
    let leases = admin
        .list_leases(ctx(), &pb::ListLeasesRequest::default())
        .await
        .unwrap();
    assert_eq!(leases.leases.len(), 1);
    assert_eq!(leases.leases[0].address, addr.address);
    assert_eq!(leases.leases[0].sandbox_id, "sandbox-1");

    c.detach_nic(
        ctx(),
        &pb::DetachNicRequest {
            nic_id: nic.id.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(
        ns.links()
            .iter()
            .all(|l| l["address"].as_str() != Some(nic.mac.as_str())),
        "guest end left"
    );
    assert!(host_links(&host_if).is_empty(), "host end left");
    assert!(rig.bridge.ports().is_empty());
    let leases = admin
        .list_leases(ctx(), &pb::ListLeasesRequest::default())
        .await
        .unwrap();
    assert!(leases.leases.is_empty(), "lease kept: {:?}", leases.leases);
    assert_eq!(rig.agent.state()["nics"].as_array().unwrap().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_bad_input_and_isolation() {
    let rig = rig(2, 2);
    let c0 = vm_client(&rig.socket(0)).await;
    let c1 = vm_client(&rig.socket(1)).await;

    // A retried attach (lost reply) returns the same NIC.
    let a = c0.attach_nic(ctx(), &attach_req("sb-a")).await.unwrap();
    let again = c0.attach_nic(ctx(), &attach_req("sb-a")).await.unwrap();
    assert!(a.created && !again.created);
    assert_eq!(a.nic.id, again.nic.id);
    assert_eq!(a.nic.addresses, again.nic.addresses);

    let state_before = rig.agent.state();
    // This rig's NICs only (its bridge's ports): other tests make and
    // delete NICs of their own beside it.
    let my_nics = || {
        let mut p = rig.bridge.ports();
        p.retain(|l| l.starts_with("nlh"));
        p.sort();
        p
    };
    let links_before = my_nics();
    let cases: Vec<(pb::AttachNicRequest, ttrpc::Code, &str)> = vec![
        (attach_req(""), ttrpc::Code::INVALID_ARGUMENT, "sandbox_id"),
        (
            attach_req("../etc"),
            ttrpc::Code::INVALID_ARGUMENT,
            "sandbox_id",
        ),
        (
            pb::AttachNicRequest {
                sandbox_id: "x".into(),
                network: "other".into(),
                ..Default::default()
            },
            ttrpc::Code::PERMISSION_DENIED,
            "may not use network",
        ),
        (
            pb::AttachNicRequest {
                sandbox_id: "x".into(),
                labels: (0..65)
                    .map(|i| (format!("k{i}"), "v".to_string()))
                    .collect(),
                ..Default::default()
            },
            ttrpc::Code::INVALID_ARGUMENT,
            "labels",
        ),
    ];
    for (req, code, text) in cases {
        let e = c0.attach_nic(ctx(), &req).await.unwrap_err();
        let (got, msg) = status_of(&e);
        assert_eq!(got, code, "{msg}");
        assert!(msg.contains(text), "{msg}");
    }
    // Oversized message: refused, and the agent carries on.
    let mut huge = attach_req("big");
    huge.labels.insert("k".into(), "v".repeat(5 << 20));
    assert!(c0.attach_nic(ctx(), &huge).await.is_err());
    // Garbage on the socket: the connection dies, the agent does not.
    {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(rig.socket(0)).unwrap();
        let _ = s.write_all(&[0xff; 64]);
        let _ = s.write_all(b"\x00\x00\x00\x10not a ttrpc frame");
    }
    let c0 = vm_client(&rig.socket(0)).await;
    c0.health(ctx(), &pb::HealthRequest::default())
        .await
        .expect("agent alive after bad input");
    assert_eq!(
        rig.agent.state(),
        state_before,
        "bad input changed the state"
    );
    assert_eq!(my_nics(), links_before, "bad input changed the host links");

    // VM1 cannot see or detach VM0's NIC.
    let listed = c1
        .list_nics(ctx(), &pb::ListNicsRequest::default())
        .await
        .unwrap();
    assert!(listed.nics.is_empty());
    let e = c1
        .detach_nic(
            ctx(),
            &pb::DetachNicRequest {
                nic_id: a.nic.id.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    let (code, msg) = status_of(&e);
    assert_eq!(code, ttrpc::Code::NOT_FOUND, "{msg}");
    assert!(msg.contains("VM vm1 has no NIC"), "{msg}");
    assert_eq!(
        c0.list_nics(ctx(), &pb::ListNicsRequest::default())
            .await
            .unwrap()
            .nics
            .len(),
        1
    );

    // Quota (2 per VM).
    c0.attach_nic(ctx(), &attach_req("sb-b")).await.unwrap();
    let e = c0.attach_nic(ctx(), &attach_req("sb-c")).await.unwrap_err();
    let (code, msg) = status_of(&e);
    assert_eq!(code, ttrpc::Code::RESOURCE_EXHAUSTED, "{msg}");
    assert!(msg.contains("quota"), "{msg}");

    // Detach by sandbox; unknown NIC id.
    c0.detach_nic(
        ctx(),
        &pb::DetachNicRequest {
            sandbox_id: "sb-b".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let e = c0
        .detach_nic(
            ctx(),
            &pb::DetachNicRequest {
                nic_id: "0123456789".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(status_of(&e).0, ttrpc::Code::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_cli_lists_vms_nics_and_leases() {
    let rig = rig(2, 4);
    let c1 = vm_client(&rig.socket(1)).await;
    let nic = c1
        .attach_nic(ctx(), &attach_req("pod-x"))
        .await
        .unwrap()
        .nic
        .unwrap();
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(bin_path("nestlessctl"))
            .args(args)
            .arg("--socket")
            .arg(&rig.agent.admin)
            .output()
            .unwrap();
        assert!(out.status.success(), "nestlessctl {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let vms = ctl(&["vms"]);
    assert!(
        vms.starts_with("NAME")
            && vms.contains("vm0")
            && vms.contains("vm1")
            && vms.contains("netns"),
        "{vms}"
    );
    let nics: serde_json::Value = serde_json::from_str(&ctl(&["nics", "--json"])).unwrap();
    assert_eq!(nics[0]["id"], nic.id.as_str());
    assert_eq!(nics[0]["vm"], "vm1");
    assert_eq!(nics[0]["state"], "attached");
    let leases = ctl(&["leases"]);
    assert!(
        leases.contains(&nic.addresses[0].address) && leases.contains("pod-x"),
        "{leases}"
    );
    let status = ctl(&["status"]);
    assert!(status.contains("nestless.agent.v1"), "{status}");
    // An unknown VM filter is a clear error.
    let out = std::process::Command::new(bin_path("nestlessctl"))
        .args(["nics", "--vm", "nope", "--socket"])
        .arg(&rig.agent.admin)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown VM: \"nope\""),
        "{out:?}"
    );
}

/// Everything the agent made must be accounted for by its state file, and
/// the state must be fully recovered (no half-done records).
fn assert_consistent(rig: &NetnsVms) -> HashSet<String> {
    let state = rig.agent.state();
    let nics = state["nics"].as_array().unwrap();
    let mut ids = HashSet::new();
    let mut addrs = HashSet::new();
    for n in nics {
        assert_eq!(n["state"], "attached", "unrecovered record {n}");
        assert!(
            addrs.insert(n["ipv4"].as_str().unwrap().to_string()),
            "address leased twice: {n}"
        );
        ids.insert(n["id"].as_str().unwrap().to_string());
    }
    let host: HashSet<String> = host_links("nlh")
        .into_iter()
        .map(|n| n[3..].to_string())
        .collect();
    // Only this rig's bridge ports count: other tests may run beside.
    let mine: HashSet<String> = rig
        .bridge
        .ports()
        .into_iter()
        .map(|n| n[3..].to_string())
        .collect();
    assert_eq!(mine, ids, "bridge ports vs records");
    for id in &ids {
        assert!(host.contains(id), "NIC {id} lost its host end");
    }
    let mut guests = HashSet::new();
    for ns in &rig.vms {
        for l in ns.links() {
            if let Some(n) = l["ifname"].as_str().and_then(|n| n.strip_prefix("nlg")) {
                guests.insert(n.to_string());
            }
        }
    }
    assert_eq!(guests, ids, "guest ends vs records");
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_attach_detach_loops_leaks_nothing() {
    let mut rig = rig(2, 6);
    let rounds = 40;
    let mut interrupted = 0;
    for round in 0..rounds {
        let sockets = [rig.socket(0), rig.socket(1)];
        let mut loops = Vec::new();
        for (v, sock) in sockets.iter().enumerate() {
            let sock = sock.clone();
            loops.push(tokio::spawn(async move {
                let c = vm_client(&sock).await;
                for i in 0.. {
                    let sb = format!("r{round}-v{v}-{}", i % 4);
                    if c.attach_nic(ctx(), &attach_req(&sb)).await.is_err() {
                        // The agent is down (killed): this round's load is over.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    if i % 2 == 1 {
                        let _ = c
                            .detach_nic(
                                ctx(),
                                &pb::DetachNicRequest {
                                    sandbox_id: format!("r{round}-v{v}-{}", (i + 2) % 4),
                                    ..Default::default()
                                },
                            )
                            .await;
                    }
                }
            }));
        }
        let delay = Duration::from_millis(20 + rand::random::<u64>() % 200);
        tokio::time::sleep(delay).await;
        rig.agent.kill9();
        for l in loops {
            l.abort();
        }
        // What the kill cut: records the dead agent left half done.
        interrupted += rig
            .agent
            .records()
            .iter()
            .filter(|n| n["state"] != "attached")
            .count();
        rig.agent.restart();
        let ids = assert_consistent(&rig);
        // The surviving NICs are known: a retried attach returns them.
        let state = rig.agent.state();
        for n in state["nics"].as_array().unwrap() {
            let vm: usize = n["vm"].as_str().unwrap()[2..].parse().unwrap();
            let c = vm_client(&rig.socket(vm)).await;
            let r = c
                .attach_nic(ctx(), &attach_req(n["sandbox_id"].as_str().unwrap()))
                .await
                .unwrap();
            assert!(
                !r.created && ids.contains(&r.nic.id),
                "round {round}: {n} not known after restart"
            );
        }
        // Take everything back: nothing is left anywhere, and the next
        // round starts with room under the quota (a full VM would refuse
        // every attach, and its kill would interrupt nothing).
        for n in state["nics"].as_array().unwrap() {
            let vm: usize = n["vm"].as_str().unwrap()[2..].parse().unwrap();
            let c = vm_client(&rig.socket(vm)).await;
            c.detach_nic(
                ctx(),
                &pb::DetachNicRequest {
                    nic_id: n["id"].as_str().unwrap().into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        }
        assert!(assert_consistent(&rig).is_empty(), "round {round}");
    }
    // The kills landed inside operations: some restarts had work to undo
    // or finish (and assert_consistent saw it done).
    eprintln!("{rounds} kills: {interrupted} interrupted operations recovered");
    assert!(
        interrupted > 0,
        "no kill interrupted an operation: the test did not test recovery"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_pool_nics_are_ready_before_the_request() {
    require_root();
    let net = random_subnet();
    let bridge = Bridge::new(Some(&format!("{net}.1/24")));
    let ns = Netns::new("warm");
    let agent = AgentProc::start(|dir| {
        format!(
            "{}[[network]]\nname = \"n\"\nbridge = \"{}\"\nsubnet = \"{net}.0/24\"\ngateway = \"{net}.1\"\n\
             [[vm]]\nname = \"vm0\"\nbackend = \"netns\"\nnetns = \"{}\"\nsocket = \"{}/vm0.sock\"\nmax_nics = 4\nwarm_pool = 2\n",
            AgentProc::agent_section(dir),
            bridge.name,
            ns.name,
            dir.display()
        )
    });
    let pooled = || {
        agent.state()["nics"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["pooled"] == true)
            .map(|n| n["mac"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while pooled().len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "pool not filled: {}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let warm = pooled();
    // The pooled NICs are already in the VM namespace, invisible to ListNics.
    let in_ns: Vec<String> = ns
        .links()
        .iter()
        .filter_map(|l| l["address"].as_str().map(str::to_string))
        .collect();
    assert!(
        warm.iter().all(|m| in_ns.contains(m)),
        "{warm:?} vs {in_ns:?}"
    );
    let c = vm_client(&agent.dir.path().join("vm0.sock")).await;
    assert!(c
        .list_nics(ctx(), &pb::ListNicsRequest::default())
        .await
        .unwrap()
        .nics
        .is_empty());
    let nic = c
        .attach_nic(ctx(), &attach_req("hot"))
        .await
        .unwrap()
        .nic
        .unwrap();
    assert!(warm.contains(&nic.mac), "attach did not take a warm NIC");
    assert_eq!(
        c.list_nics(ctx(), &pb::ListNicsRequest::default())
            .await
            .unwrap()
            .nics
            .len(),
        1
    );
    // The pool refills in the background, within the quota of 4.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while pooled().len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "pool not refilled: {}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(agent.state()["nics"].as_array().unwrap().len(), 3);
    let out = std::process::Command::new(bin_path("nestlessctl"))
        .args(["nics", "--socket"])
        .arg(&agent.admin)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("pooled")
            .count(),
        2
    );
}

#[test]
fn sigterm_keeps_nics_and_a_restart_finds_them() {
    let mut rig = rig(1, 4);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let id = rt.block_on(async {
        let c = vm_client(&rig.socket(0)).await;
        c.attach_nic(ctx(), &attach_req("keep"))
            .await
            .unwrap()
            .nic
            .unwrap()
            .id
    });
    assert!(rig.agent.stop().success());
    assert!(
        !Path::new(&rig.socket(0)).exists(),
        "socket removed at shutdown"
    );
    assert_eq!(
        rig.bridge.ports(),
        vec![format!("nlh{id}")],
        "NIC kept across a clean stop"
    );
    rig.agent.restart();
    let ids = assert_consistent(&rig);
    assert_eq!(ids, HashSet::from([id.clone()]), "the NIC was kept");
    assert_eq!(
        rig.bridge.ports(),
        vec![format!("nlh{id}")],
        "the same host end"
    );
}

/// Waits (bounded) until `cond` holds; the agent's log on failure.
async fn wait_state(agent: &AgentProc, what: &str, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within 30s\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn keyed(scope: &str, sandbox: &str, interface: &str) -> pb::AttachNicRequest {
    pb::AttachNicRequest {
        sandbox_id: sandbox.into(),
        scope: scope.into(),
        interface: interface.into(),
        ..Default::default()
    }
}

fn macs_in(ns: &Netns) -> HashSet<String> {
    ns.links()
        .iter()
        .filter_map(|l| l["address"].as_str().map(str::to_string))
        .collect()
}

/// Issue 9, items 1 and 2, on the real kernel: one container id in two
/// containerd namespaces gets two NICs, one sandbox gets a NIC per
/// interface name; each detach takes back exactly what it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachments_are_keyed_by_scope_sandbox_and_interface() {
    let rig = rig(1, 8);
    let c = vm_client(&rig.socket(0)).await;
    let ns = &rig.vms[0];
    let mut nics = Vec::new();
    for (scope, sb, iface) in [
        ("team-one", "app", ""),
        ("team-two", "app", ""),
        ("", "pod-x", "eth0"),
        ("", "pod-x", "net1"),
    ] {
        let r = c.attach_nic(ctx(), &keyed(scope, sb, iface)).await.unwrap();
        assert!(r.created, "{scope}/{sb} {iface}: a new NIC");
        let nic = r.nic.unwrap();
        assert_eq!(nic.scope, scope);
        assert_eq!(nic.interface, if iface.is_empty() { "eth0" } else { iface });
        // A retry is the same NIC.
        let again = c.attach_nic(ctx(), &keyed(scope, sb, iface)).await.unwrap();
        assert!(!again.created);
        assert_eq!(again.nic.id, nic.id);
        nics.push(nic);
    }
    let ids: HashSet<&str> = nics.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(ids.len(), 4, "four attachments, four NICs");
    let in_vm = macs_in(ns);
    assert!(nics.iter().all(|n| in_vm.contains(&n.mac)), "{in_vm:?}");
    // The operator sees who holds what.
    let mut leases: Vec<(String, String, String)> = rig
        .agent
        .leases()
        .iter()
        .map(|l| {
            let f = |k: &str| l[k].as_str().unwrap().to_string();
            (f("scope"), f("sandbox_id"), f("interface"))
        })
        .collect();
    leases.sort();
    let want = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
    assert_eq!(
        leases,
        [
            want("", "pod-x", "eth0"),
            want("", "pod-x", "net1"),
            want("team-one", "app", "eth0"),
            want("team-two", "app", "eth0"),
        ]
    );
    let listed = rig.agent.ctl_json("nics");
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["scope"] == "team-two" && n["interface"] == "eth0"),
        "{listed}"
    );
    let detach = |scope: &str, sb: &str, iface: &str| pb::DetachNicRequest {
        sandbox_id: sb.into(),
        scope: scope.into(),
        interface: iface.into(),
        ..Default::default()
    };
    // team-two's app goes; team-one's stays, in the VM and in the records.
    c.detach_nic(ctx(), &detach("team-two", "app", ""))
        .await
        .unwrap();
    let in_vm = macs_in(ns);
    assert!(!in_vm.contains(&nics[1].mac) && in_vm.contains(&nics[0].mac));
    // pod-x: net1 alone, then the rest of the sandbox.
    c.detach_nic(ctx(), &detach("", "pod-x", "net1"))
        .await
        .unwrap();
    let in_vm = macs_in(ns);
    assert!(!in_vm.contains(&nics[3].mac) && in_vm.contains(&nics[2].mac));
    c.detach_nic(ctx(), &detach("", "pod-x", "")).await.unwrap();
    assert!(!macs_in(ns).contains(&nics[2].mac));
    let e = c
        .detach_nic(ctx(), &detach("", "pod-x", ""))
        .await
        .unwrap_err();
    assert_eq!(status_of(&e).0, ttrpc::Code::NOT_FOUND);
    let e = c
        .detach_nic(
            ctx(),
            &pb::DetachNicRequest {
                nic_id: nics[0].id.clone(),
                scope: "team-one".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    let (code, msg) = status_of(&e);
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("scope"), "{msg}");
    let left = c
        .list_nics(ctx(), &pb::ListNicsRequest::default())
        .await
        .unwrap()
        .nics;
    assert_eq!(left.len(), 1);
    assert_eq!(
        (left[0].id.as_str(), left[0].scope.as_str()),
        (nics[0].id.as_str(), "team-one")
    );
    assert_consistent(&rig);
}

/// The host's neighbour entry for `addr` on `dev`: its MAC, if any.
fn neighbour(dev: &str, addr: &str) -> Option<String> {
    let v: Vec<serde_json::Value> = serde_json::from_str(&check(&[
        "ip", "-j", "neigh", "show", "to", addr, "dev", dev,
    ]))
    .expect("ip -j output");
    v.iter()
        .find(|n| n["dst"] == addr)
        .map(|n| n["lladdr"].as_str().unwrap_or("").to_string())
}

/// Issue 9, item 5 (host side): when an address is released and handed to
/// a new NIC, the host keeps no neighbour entry (ARP or NDP) pointing at the
/// old NIC's MAC: the new pod is reachable at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_address_keeps_no_stale_neighbour() {
    require_root();
    let net = random_subnet();
    let net6 = format!("fd00:{:x}::", rand::random::<u16>());
    let bridge = Bridge::new(Some(&format!("{net}.1/24")));
    check(&[
        "ip",
        "addr",
        "add",
        &format!("{net6}1/64"),
        "dev",
        &bridge.name,
        "nodad",
    ]);
    let ns = Netns::new("nb");
    // A range of one address: every NIC gets it.
    let agent = AgentProc::start(|dir| {
        format!(
            "{}[[network]]\nname = \"n\"\nbridge = \"{}\"\nsubnet = \"{net}.0/24\"\ngateway = \"{net}.1\"\n\
             range_start = \"{net}.7\"\nrange_end = \"{net}.7\"\nsubnet6 = \"{net6}/64\"\ngateway6 = \"{net6}1\"\n\
             [[vm]]\nname = \"vm0\"\nbackend = \"netns\"\nnetns = \"{}\"\nsocket = \"{}/vm0.sock\"\n",
            AgentProc::agent_section(dir),
            bridge.name,
            ns.name,
            dir.display()
        )
    });
    let c = vm_client(&agent.dir.path().join("vm0.sock")).await;
    let v4 = format!("{net}.7");
    let v6 = format!("{net6}7");
    // Configures the NIC in the VM namespace and pings it from the host
    // (both families): the host learns its MAC.
    let bring_up = |nic: &pb::Nic| {
        let ifname = ns
            .links()
            .into_iter()
            .find(|l| l["address"].as_str() == Some(nic.mac.as_str()))
            .and_then(|l| l["ifname"].as_str().map(str::to_string))
            .expect("the NIC in the VM namespace");
        for a in &nic.addresses {
            let cidr = format!("{}/{}", a.address, a.prefix_len);
            check(&[
                "ip", "-n", &ns.name, "addr", "add", &cidr, "dev", &ifname, "nodad",
            ]);
        }
        check(&["ip", "-n", &ns.name, "link", "set", &ifname, "up"]);
        for target in [&v4, &v6] {
            let out = run(&["busybox", "ping", "-c", "1", "-W", "2", target]);
            assert!(out.status.success(), "host -> {target}: {out:?}");
        }
    };
    let a = c
        .attach_nic(ctx(), &attach_req("a"))
        .await
        .unwrap()
        .nic
        .unwrap();
    assert_eq!(a.addresses[0].address, v4);
    assert_eq!(a.addresses[1].address, v6);
    bring_up(&a);
    assert_eq!(
        neighbour(&bridge.name, &v4).as_deref(),
        Some(a.mac.as_str())
    );
    assert_eq!(
        neighbour(&bridge.name, &v6).as_deref(),
        Some(a.mac.as_str())
    );
    c.detach_nic(
        ctx(),
        &pb::DetachNicRequest {
            sandbox_id: "a".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        neighbour(&bridge.name, &v4),
        None,
        "released: ARP entry kept"
    );
    assert_eq!(
        neighbour(&bridge.name, &v6),
        None,
        "released: NDP entry kept"
    );
    // An entry learnt meanwhile (a stale one, as a neighbour that kept
    // talking to the old NIC leaves) goes when the address is leased again.
    for addr in [&v4, &v6] {
        check(&[
            "ip",
            "neigh",
            "replace",
            addr,
            "lladdr",
            &a.mac,
            "dev",
            &bridge.name,
            "nud",
            "stale",
        ]);
    }
    let b = c
        .attach_nic(ctx(), &attach_req("b"))
        .await
        .unwrap()
        .nic
        .unwrap();
    assert_eq!(b.addresses[0].address, v4, "the one address again");
    assert_ne!(b.mac, a.mac);
    assert_eq!(
        neighbour(&bridge.name, &v4),
        None,
        "re-leased: ARP entry kept"
    );
    assert_eq!(
        neighbour(&bridge.name, &v6),
        None,
        "re-leased: NDP entry kept"
    );
    bring_up(&b);
    assert_eq!(
        neighbour(&bridge.name, &v4).as_deref(),
        Some(b.mac.as_str())
    );
    assert_eq!(
        neighbour(&bridge.name, &v6).as_deref(),
        Some(b.mac.as_str())
    );
}

/// A bridge the agent creates, deleted on drop.
struct Made(String);

impl Drop for Made {
    fn drop(&mut self) {
        let _ = run(&["ip", "link", "del", &self.0]);
    }
}

fn link_mac(name: &str) -> String {
    let v: Vec<serde_json::Value> =
        serde_json::from_str(&check(&["ip", "-j", "link", "show", "dev", name])).unwrap();
    v[0]["address"].as_str().unwrap().to_string()
}

/// Issue 9, item 5: a bridge the agent creates has a fixed MAC (derived
/// from its name), so that NICs leaving never change the gateway's MAC
/// under the other pods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_bridge_keeps_its_mac() {
    require_root();
    let net = random_subnet();
    let made = Made(format!("nltm{}", nestless_tests::netenv::suffix()));
    let ns = Netns::new("mb");
    let agent = AgentProc::start(|dir| {
        format!(
            "{}[[network]]\nname = \"n\"\nbridge = \"{}\"\nsubnet = \"{net}.0/24\"\ngateway = \"{net}.1\"\n\
             manage_bridge = true\n[[vm]]\nname = \"vm0\"\nbackend = \"netns\"\nnetns = \"{}\"\n\
             socket = \"{}/vm0.sock\"\n",
            AgentProc::agent_section(dir),
            made.0,
            ns.name,
            dir.display()
        )
    });
    let fixed = nestless_netagent::names::bridge_mac(&made.0).to_string();
    assert_eq!(link_mac(&made.0), fixed);
    let c = vm_client(&agent.dir.path().join("vm0.sock")).await;
    let mut ids = Vec::new();
    for i in 0..4 {
        let nic = c
            .attach_nic(ctx(), &attach_req(&format!("p{i}")))
            .await
            .unwrap()
            .nic
            .unwrap();
        ids.push(nic.id);
        assert_eq!(link_mac(&made.0), fixed, "a port joining changed it");
    }
    // Ports leave, the one with the lowest MAC first: the bridge's MAC stays.
    ids.sort_by_key(|id| link_mac(&format!("nlh{id}")));
    for id in ids {
        c.detach_nic(
            ctx(),
            &pb::DetachNicRequest {
                nic_id: id,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(link_mac(&made.0), fixed, "a port leaving changed it");
    }
}

/// Issue 9, item 8: a NIC whose host end someone else deletes is released
/// while the agent runs (record and lease), so the VM gets its quota back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nic_deleted_behind_the_agents_back_is_released() {
    let rig = rig(1, 1);
    let c = vm_client(&rig.socket(0)).await;
    let nic = c
        .attach_nic(ctx(), &attach_req("victim"))
        .await
        .unwrap()
        .nic
        .unwrap();
    let e = c.attach_nic(ctx(), &attach_req("next")).await.unwrap_err();
    assert_eq!(
        status_of(&e).0,
        ttrpc::Code::RESOURCE_EXHAUSTED,
        "quota of 1"
    );
    check(&["ip", "link", "del", &format!("nlh{}", nic.id)]);
    wait_state(&rig.agent, "the lost NIC released, durably", || {
        rig.agent.leases().is_empty() && rig.agent.records().is_empty()
    })
    .await;
    let next = c.attach_nic(ctx(), &attach_req("next")).await.unwrap();
    assert!(next.created);
    assert_consistent(&rig);
}

/// Issue 9, item 8: a VM namespace made again (a guest reboot) takes its
/// NICs with the old one; the agent releases them while it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_vm_namespace_releases_its_nics() {
    let rig = rig(1, 2);
    let c = vm_client(&rig.socket(0)).await;
    for sb in ["a", "b"] {
        c.attach_nic(ctx(), &attach_req(sb)).await.unwrap();
    }
    let ns = &rig.vms[0].name;
    check(&["ip", "netns", "del", ns]);
    check(&["ip", "netns", "add", ns]);
    wait_state(&rig.agent, "the lost NICs released, durably", || {
        rig.agent.leases().is_empty() && rig.agent.records().is_empty()
    })
    .await;
    assert!(rig.bridge.ports().is_empty(), "{:?}", rig.bridge.ports());
    // The quota is free again, and the new namespace gets the NICs.
    for sb in ["c", "d"] {
        let nic = c
            .attach_nic(ctx(), &attach_req(sb))
            .await
            .unwrap()
            .nic
            .unwrap();
        assert!(macs_in(&rig.vms[0]).contains(&nic.mac));
    }
    assert_consistent(&rig);
}
