//! Hostlo with two "VMs" that are network namespaces (the agent's netns
//! backend), each running one part of a pod through the shim's own pod-network
//! code (`nestless-podnet`), and "containers" that are processes in the pods'
//! namespaces. Needs root and socat.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use nestless_netagent::hostlo::segment_bridge;
use nestless_protos::agent as pb;
use nestless_tests::{
    agent::{bin_path, ctx, status_of, vm_client, AgentProc},
    netenv::{check, host_links, random_subnet, require_root, run, suffix, Bridge, Netns},
};
use serde_json::Value;

struct Part {
    child: Child,
    ready: Value,
}

impl Part {
    fn start(
        agent: &AgentProc,
        vm: &Netns,
        vm_idx: usize,
        pod: &Netns,
        hostlo_pod: &str,
        part: u32,
        extra: &[&str],
    ) -> Part {
        let sock = agent.dir.path().join(format!("vm{vm_idx}.sock"));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &vm.name])
            .arg(bin_path("nestless-podnet"))
            .args(["--agent", &format!("unix://{}", sock.display())])
            .args(["--sandbox", &format!("sb{part}-{}", suffix())])
            .arg("--netns")
            .arg(pod.path())
            .args(["--label", &format!("io.nestless.hostlo/pod={hostlo_pod}")])
            .args(["--label", &format!("io.nestless.hostlo/part={part}")]);
        for e in extra {
            cmd.args(["--label", e]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn nestless-podnet");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let json = line
            .strip_prefix("READY ")
            .unwrap_or_else(|| panic!("part {part} failed: {line}"));
        Part {
            ready: serde_json::from_str(json).unwrap(),
            child,
        }
    }

    fn stop(mut self) -> String {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let mut rest = String::new();
        use std::io::Read;
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut rest)
            .unwrap();
        assert!(self.child.wait().unwrap().success(), "{rest}");
        rest
    }
}

impl Drop for Part {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process in a pod namespace (a "container"), killed on drop.
struct Service(Child);

impl Service {
    fn start(pod: &Netns, args: &[&str]) -> Service {
        let c = Command::new("ip")
            .args(["netns", "exec", &pod.name, "socat"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat (apt install socat)");
        Service(c)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn view(agent: &AgentProc) -> Value {
    agent.hostlo()
}

fn wait_for(agent: &AgentProc, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = view(agent);
        if f(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not reached: {v}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn has_port(v: &Value, entry: &str) -> bool {
    v[0]["ports"]
        .as_array()
        .is_some_and(|a| a.iter().any(|p| p == entry))
}

/// `echo MSG | socat` from inside `pod` to `target` ("TCP:127.0.0.1:8080").
fn talk(pod: &Netns, target: &str, msg: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo {msg} | ip netns exec {} socat -t 3 - {target}",
            pod.name
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn two_parts_share_localhost_over_the_segment() {
    require_root();
    assert!(
        run(&["socat", "-V"]).status.success(),
        "socat is required (apt install socat)"
    );
    let net = random_subnet();
    let bridge = Bridge::new(Some(&format!("{net}.1/24")));
    let vms = [Netns::new("hva"), Netns::new("hvb")];
    let pods = [Netns::new("hpa"), Netns::new("hpb")];
    let agent = AgentProc::start(|dir| {
        let mut s = AgentProc::agent_section(dir);
        s += &format!("[[network]]\nname = \"t\"\nbridge = \"{}\"\nsubnet = \"{net}.0/24\"\ngateway = \"{net}.1\"\n", bridge.name);
        for (i, vm) in vms.iter().enumerate() {
            s += &format!("[[vm]]\nname = \"vm{i}\"\nbackend = \"netns\"\nnetns = \"{}\"\nsocket = \"{}/vm{i}.sock\"\n", vm.name, dir.display());
        }
        s
    });
    let pod_name = format!("web-{}", suffix());
    let p0 = Part::start(&agent, &vms[0], 0, &pods[0], &pod_name, 0, &[]);
    let mut p1 = Part::start(
        &agent,
        &vms[1],
        1,
        &pods[1],
        &pod_name,
        1,
        &["io.nestless.hostlo/ports=9999/tcp"],
    );
    let pod_ip = p0.ready["addresses"][0]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    // Each part has hostlo0 with its segment address.
    let seg = check(&[
        "ip",
        "-n",
        &pods[1].name,
        "-o",
        "addr",
        "show",
        "dev",
        "hostlo0",
    ]);
    assert!(seg.contains("169.254.77.2/24"), "{seg}");

    // Part 1 serves TCP 8080 on loopback only, and UDP 5353 on loopback.
    let _tcp = Service::start(
        &pods[1],
        &["TCP-LISTEN:8080,bind=127.0.0.1,reuseaddr,fork", "EXEC:cat"],
    );
    let _udp = Service::start(
        &pods[1],
        &["UDP-RECVFROM:5353,bind=127.0.0.1,fork", "EXEC:cat"],
    );
    let v = wait_for(&agent, "part 1's ports published", |v| {
        has_port(v, "1:8080/tcp") && has_port(v, "1:5353/udp")
    });
    assert!(has_port(&v, "1:9999/tcp"), "declared port: {v}");
    assert_eq!(v[0]["pod_ip"], pod_ip.as_str());
    assert_eq!(v[0]["members"].as_array().unwrap().len(), 2);

    // From part 0: localhost and the pod IP reach part 1's services.
    let deadline = Instant::now() + Duration::from_secs(20);
    while talk(&pods[0], "TCP:127.0.0.1:8080", "x") != "x" {
        assert!(
            Instant::now() < deadline,
            "relay for 8080 never came up:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        talk(&pods[0], "TCP:127.0.0.1:8080", "hello-tcp"),
        "hello-tcp"
    );
    assert_eq!(
        talk(&pods[0], &format!("TCP:{pod_ip}:8080"), "via-pod-ip"),
        "via-pod-ip"
    );
    assert_eq!(
        talk(&pods[0], "UDP:127.0.0.1:5353", "hello-udp"),
        "hello-udp"
    );
    // From outside (the host, over the bridge) to the pod IP: part 1 answers.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("echo outside | socat -t 3 - TCP:{pod_ip}:8080"))
        .output()
        .unwrap();
    if String::from_utf8_lossy(&out.stdout).trim() != "outside" {
        let ss = run(&["ip", "netns", "exec", &pods[0].name, "ss", "-ltnp"]);
        let ping = run(&["busybox", "ping", "-c", "1", "-W", "2", &pod_ip]);
        let route = run(&["ip", "route", "get", &pod_ip]);
        let addrs = run(&["ip", "-n", &pods[0].name, "-o", "addr"]);
        let routes = run(&["ip", "-n", &pods[0].name, "route"]);
        panic!(
            "outside -> pod IP failed: {out:?}\nss: {}\nping: {:?}\nroute: {}\naddrs: {}\nroutes: {}",
            String::from_utf8_lossy(&ss.stdout),
            ping,
            String::from_utf8_lossy(&route.stdout),
            String::from_utf8_lossy(&addrs.stdout),
            String::from_utf8_lossy(&routes.stdout)
        );
    }

    // A conflict: a third part (here in VM 0 too) declares 8080/tcp, which
    // part 1 serves. It is reported, and 8080 is no longer relayed anywhere.
    {
        let pod2 = Netns::new("hpc");
        let p2 = Part::start(
            &agent,
            &vms[0],
            0,
            &pod2,
            &pod_name,
            2,
            &["io.nestless.hostlo/ports=8080/tcp"],
        );
        let v = wait_for(&agent, "the conflict reported", |v| {
            v[0]["conflicts"]
                .as_array()
                .is_some_and(|c| c.iter().any(|x| x == "8080/tcp"))
        });
        assert_eq!(v[0]["conflicts"].as_array().unwrap().len(), 1, "{v}");
        assert_eq!(
            v[0]["conflicting_parts"]["8080/tcp"],
            serde_json::json!([1, 2]),
            "{v}"
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while talk(&pods[0], "TCP:127.0.0.1:8080", "x") == "x" {
            assert!(
                Instant::now() < deadline,
                "a conflicting port is still relayed"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        p2.stop();
    }
    wait_for(&agent, "the conflict cleared", |v| {
        v[0]["conflicts"].as_array().is_some_and(|c| c.is_empty())
    });

    // Part 1 restarts (its sandbox comes back): part 0 reaches it again.
    let out = p1.stop();
    assert!(out.contains("DONE"), "{out}");
    wait_for(&agent, "part 1 gone", |v| {
        v[0]["members"].as_array().is_some_and(|m| m.len() == 1)
    });
    p1 = Part::start(&agent, &vms[1], 1, &pods[1], &pod_name, 1, &[]);
    wait_for(&agent, "part 1 back", |v| has_port(v, "1:8080/tcp"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while talk(&pods[0], "TCP:127.0.0.1:8080", "again") != "again" {
        assert!(
            Instant::now() < deadline,
            "no relay after the part's restart:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The last part leaving removes everything: segment, NICs, leases.
    let segment = v[0]["bridge"].as_str().unwrap().to_string();
    assert!(!host_links(&segment).is_empty());
    p0.stop();
    p1.stop();
    assert_eq!(view(&agent), Value::Array(vec![]));
    assert!(host_links(&segment).is_empty(), "segment bridge left");
    assert!(
        agent.state()["nics"].as_array().unwrap().is_empty(),
        "{}",
        agent.state()
    );
    assert!(bridge.ports().is_empty());
}

/// Many HostloJoin and HostloLeave at once, from four VMs of two tenants,
/// on three pods of four parts, round after round, over the agent's real
/// sockets with real namespaces, veths and bridges. After every round:
/// one tenant per pod, one VM per (pod, part), a segment bridge exactly for
/// the pods with a part, and each segment's ports exactly its parts' host
/// ends. At the end every part leaves and no bridge is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_joins_and_leaves_keep_the_hostlo_rules() {
    use rand::{Rng, SeedableRng};
    require_root();
    let nets = {
        let a = random_subnet();
        let mut b = random_subnet();
        while b == a {
            b = random_subnet();
        }
        [a, b]
    };
    let bridges: Vec<Bridge> = nets
        .iter()
        .map(|n| Bridge::new(Some(&format!("{n}.1/24"))))
        .collect();
    // VM i is on tenant network i / 2.
    let vms: Vec<Netns> = (0..4).map(|i| Netns::new(&format!("hc{i}"))).collect();
    let agent = AgentProc::start(|dir| {
        let mut s = AgentProc::agent_section(dir);
        for (t, (net, br)) in nets.iter().zip(&bridges).enumerate() {
            s += &format!(
                "[[network]]\nname = \"t{t}\"\nbridge = \"{}\"\nsubnet = \"{net}.0/24\"\ngateway = \"{net}.1\"\n",
                br.name
            );
        }
        for (i, vm) in vms.iter().enumerate() {
            s += &format!(
                "[[vm]]\nname = \"vm{i}\"\nbackend = \"netns\"\nnetns = \"{}\"\nsocket = \"{}/vm{i}.sock\"\nnetwork = \"t{}\"\nmax_nics = 32\n",
                vm.name,
                dir.display(),
                i / 2
            );
        }
        s
    });
    let mut clients = Vec::new();
    for i in 0..vms.len() {
        clients.push(vm_client(&agent.dir.path().join(format!("vm{i}.sock"))).await);
    }
    let tag = suffix();
    let pods: Vec<String> = (0..3).map(|k| format!("cj{k}-{tag}")).collect();
    let seed: u64 = rand::random();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut joined, mut refused) = (0, 0);
    for round in 0..25 {
        let mut calls = Vec::new();
        for _ in 0..32 {
            let vm = rng.random_range(0..vms.len());
            let pod = pods[rng.random_range(0..pods.len())].clone();
            let part = rng.random_range(0..4u32);
            let leave = rng.random_bool(0.4);
            let sandbox = format!("sb{vm}-{part}-{}", rng.random_range(0..2));
            let c = clients[vm].clone();
            calls.push(tokio::spawn(async move {
                let r = if leave {
                    let req = pb::HostloLeaveRequest {
                        pod,
                        part,
                        ..Default::default()
                    };
                    c.hostlo_leave(ctx(), &req).await.map(drop)
                } else {
                    let req = pb::HostloJoinRequest {
                        pod,
                        part,
                        sandbox_id: sandbox,
                        ..Default::default()
                    };
                    c.hostlo_join(ctx(), &req).await.map(drop)
                };
                (leave, r)
            }));
        }
        for call in calls {
            match call.await.unwrap() {
                (false, Ok(())) => joined += 1,
                (_, Ok(())) => {}
                (_, Err(e)) => {
                    let (code, msg) = status_of(&e);
                    assert!(
                        matches!(
                            code,
                            ttrpc::Code::ALREADY_EXISTS
                                | ttrpc::Code::PERMISSION_DENIED
                                | ttrpc::Code::NOT_FOUND
                        ),
                        "seed {seed}, round {round}: {code:?} {msg}"
                    );
                    refused += 1;
                }
            }
        }
        check_hostlo_rules(&agent, &pods, &format!("seed {seed}, round {round}"));
    }
    assert!(
        joined > 20 && refused > 20,
        "{joined} joins, {refused} refusals"
    );
    for r in agent.records() {
        let vm: usize = r["vm"].as_str().unwrap()[2..].parse().unwrap();
        let req = pb::HostloLeaveRequest {
            pod: r["hostlo"]["pod"].as_str().unwrap().into(),
            part: r["hostlo"]["part"].as_u64().unwrap() as u32,
            ..Default::default()
        };
        clients[vm].hostlo_leave(ctx(), &req).await.unwrap();
    }
    check_hostlo_rules(&agent, &pods, "after every part left");
    assert!(agent.records().is_empty());
}

/// The rules, read from the state file and the host's links. A pod is
/// named within its tenant network (`t0`, `t1`): each (network, pod) has its
/// own parts and segment.
fn check_hostlo_rules(agent: &AgentProc, pods: &[String], when: &str) {
    let mut held = BTreeSet::new();
    let mut ends: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for r in agent.records() {
        let pod = r["hostlo"]["pod"].as_str().expect("only Hostlo parts here");
        let part = r["hostlo"]["part"].as_u64().unwrap();
        let network = r["network"].as_str().unwrap();
        assert_eq!(r["state"], "attached", "{when}: {r}");
        assert!(
            held.insert((network.to_string(), pod.to_string(), part)),
            "{when}: part {part} of {network}/{pod} held twice"
        );
        let vm: usize = r["vm"].as_str().unwrap()[2..].parse().unwrap();
        assert_eq!(network, format!("t{}", vm / 2), "{when}: {r}");
        ends.entry((network.to_string(), pod.to_string()))
            .or_default()
            .insert(format!("nlh{}", r["id"].as_str().unwrap()));
    }
    for (network, pod) in ["t0", "t1"]
        .iter()
        .flat_map(|n| pods.iter().map(move |p| (n.to_string(), p.clone())))
    {
        let bridge = segment_bridge(&network, &pod);
        let exists = !host_links(&bridge).is_empty();
        match ends.get(&(network.clone(), pod.clone())) {
            None => assert!(
                !exists,
                "{when}: segment {bridge} of {pod} left with no part"
            ),
            Some(want) => {
                assert!(
                    exists,
                    "{when}: pod {pod} has parts but no segment {bridge}"
                );
                let ports: BTreeSet<String> = Bridge::ports_of(&bridge).into_iter().collect();
                assert_eq!(&ports, want, "{when}: the ports of {bridge}");
            }
        }
    }
}

/// The agent's owner mark of a host link (its alias), if any.
fn alias_of(link: &str) -> Option<String> {
    let v: Vec<Value> =
        serde_json::from_str(&check(&["ip", "-d", "-j", "link", "show", "dev", link])).ok()?;
    v.first()?["ifalias"].as_str().map(str::to_string)
}

/// Issue 9, item 14: Hostlo segment bridges carry the agent's owner mark,
/// so that an agent killed between creating a segment and recording its
/// first part finds the segment at restart and removes it. kill -9 lands
/// at random points of concurrent joins and leaves; after each restart the
/// segments on the host are exactly those of the pods the agent has parts
/// of, each marked as the agent's, with its fixed MAC; at the end none is
/// left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_hostlo_joins_leaves_no_segment() {
    use nestless_netagent::{hostlo::segment_bridge, links::owner_alias, names::owned_bridge_mac};
    use nestless_protos::agent as pb;
    use nestless_tests::agent::{ctx, vm_client};

    require_root();
    let net = random_subnet();
    let bridge = Bridge::new(Some(&format!("{net}.1/24")));
    let vms = [Netns::new("hka"), Netns::new("hkb")];
    let mut agent = AgentProc::start(|dir| {
        let mut s = AgentProc::agent_section(dir);
        s += &format!("[[network]]\nname = \"t\"\nbridge = \"{}\"\nsubnet = \"{net}.0/24\"\ngateway = \"{net}.1\"\n", bridge.name);
        for (i, vm) in vms.iter().enumerate() {
            s += &format!("[[vm]]\nname = \"vm{i}\"\nbackend = \"netns\"\nnetns = \"{}\"\nsocket = \"{}/vm{i}.sock\"\nmax_nics = 8\n", vm.name, dir.display());
        }
        s
    });
    let owner = owner_alias(&agent.dir.path().join("state"));
    let tag = suffix();
    // Each VM joins and leaves pods of its own (as part 0): the crash
    // window is what is tested here, not joins of one pod from two VMs.
    let pods_of = |v: u32| -> Vec<String> { (0..2).map(|j| format!("k{tag}-{v}-{j}")).collect() };
    let pods: Vec<String> = (0..2).flat_map(pods_of).collect();
    let rounds = 12;
    let mut segments_seen = 0;
    for round in 0..rounds {
        let mut loops = Vec::new();
        for v in 0..2u32 {
            let sock = agent.dir.path().join(format!("vm{v}.sock"));
            let pods = pods_of(v);
            loops.push(tokio::spawn(async move {
                let c = vm_client(&sock).await;
                for i in 0usize.. {
                    let pod = pods[i % pods.len()].clone();
                    let join = pb::HostloJoinRequest {
                        pod,
                        part: 0,
                        sandbox_id: format!("sb{v}-{round}-{i}"),
                        ..Default::default()
                    };
                    if c.hostlo_join(ctx(), &join).await.is_err() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    if i % 2 == 1 {
                        let gone = pods[(i + 1) % pods.len()].clone();
                        let _ = c
                            .hostlo_leave(
                                ctx(),
                                &pb::HostloLeaveRequest {
                                    pod: gone,
                                    part: 0,
                                    ..Default::default()
                                },
                            )
                            .await;
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(30 + rand::random::<u64>() % 250)).await;
        agent.kill9();
        for l in loops {
            l.abort();
        }
        agent.restart();
        let held: std::collections::HashSet<String> = view(&agent)
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["pod"].as_str().unwrap().to_string())
            .collect();
        for pod in &pods {
            let seg = segment_bridge("t", pod);
            let exists = !host_links(&seg).is_empty();
            assert_eq!(
                exists,
                held.contains(pod),
                "round {round}: segment {seg} of pod {pod} (parts held: {held:?})\n{}",
                agent.log()
            );
            if exists {
                segments_seen += 1;
                assert_eq!(alias_of(&seg).as_deref(), Some(owner.as_str()), "{seg}");
                let mac: Vec<Value> =
                    serde_json::from_str(&check(&["ip", "-j", "link", "show", "dev", &seg]))
                        .unwrap();
                assert_eq!(
                    mac[0]["address"],
                    owned_bridge_mac(&seg, &owner).to_string(),
                    "{seg}"
                );
            }
        }
    }
    assert!(
        segments_seen > 0,
        "no round left a segment: the test tested nothing"
    );
    // Every part leaves: no segment is left.
    for v in 0..2u32 {
        let c = vm_client(&agent.dir.path().join(format!("vm{v}.sock"))).await;
        for pod in pods_of(v) {
            let _ = c
                .hostlo_leave(
                    ctx(),
                    &pb::HostloLeaveRequest {
                        pod,
                        part: 0,
                        ..Default::default()
                    },
                )
                .await;
        }
    }
    // A segment a crash left before its first part was recorded (made here
    // as the agent makes one: the owner mark, no port) goes at restart.
    // So does one a crash left between creating it (with the agent's MAC)
    // and marking it; one with another MAC and no mark (another agent's, in
    // that same window) stays.
    let ghost = segment_bridge("t", &format!("ghost-{tag}"));
    let unmarked = segment_bridge("t", &format!("unmarked-{tag}"));
    let foreign = segment_bridge("t", &format!("foreign-{tag}"));
    agent.kill9();
    check(&["ip", "link", "add", &ghost, "type", "bridge"]);
    check(&["ip", "link", "set", &ghost, "alias", &owner]);
    let mac = owned_bridge_mac(&unmarked, &owner).to_string();
    check(&[
        "ip", "link", "add", &unmarked, "address", &mac, "type", "bridge",
    ]);
    let mac = owned_bridge_mac(&foreign, "nestless-netagent /elsewhere").to_string();
    check(&[
        "ip", "link", "add", &foreign, "address", &mac, "type", "bridge",
    ]);
    agent.restart();
    let foreign_left = !host_links(&foreign).is_empty();
    let _ = run(&["ip", "link", "del", &foreign]);
    assert!(host_links(&ghost).is_empty(), "the sweep left {ghost}");
    assert!(
        host_links(&unmarked).is_empty(),
        "the sweep left {unmarked}"
    );
    assert!(foreign_left, "the sweep removed another agent's {foreign}");
    assert_eq!(view(&agent), Value::Array(vec![]));
    for pod in &pods {
        assert!(host_links(&segment_bridge("t", pod)).is_empty(), "{pod}");
    }
}

/// Hostlo over IPv6 on a dual-stack network: localhost is ::1 as well as
/// 127.0.0.1 in every part, a service bound to ::1 only is reached from the
/// other part over both, and part 0's IPv6 pod address reaches it from outside.
#[test]
fn hostlo_over_ipv6() {
    require_root();
    assert!(
        run(&["socat", "-V"]).status.success(),
        "socat is required (apt install socat)"
    );
    let net = random_subnet();
    let octets: Vec<&str> = net.split('.').collect();
    let net6 = format!("fd4e:{}:{}::", octets[1], octets[2]);
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
    let vms = [Netns::new("h6a"), Netns::new("h6b")];
    let pods = [Netns::new("p6a"), Netns::new("p6b")];
    let agent = AgentProc::start(|dir| {
        let mut s = AgentProc::agent_section(dir);
        s += &format!(
            "[[network]]\nname = \"t\"\nbridge = \"{}\"\nsubnet = \"{net}.0/24\"\ngateway = \"{net}.1\"\n\
             subnet6 = \"{net6}/64\"\ngateway6 = \"{net6}1\"\n",
            bridge.name
        );
        for (i, vm) in vms.iter().enumerate() {
            s += &format!("[[vm]]\nname = \"vm{i}\"\nbackend = \"netns\"\nnetns = \"{}\"\nsocket = \"{}/vm{i}.sock\"\n", vm.name, dir.display());
        }
        s
    });
    let pod_name = format!("v6-{}", suffix());
    let p0 = Part::start(&agent, &vms[0], 0, &pods[0], &pod_name, 0, &[]);
    let p1 = Part::start(&agent, &vms[1], 1, &pods[1], &pod_name, 1, &[]);
    let pod_ip6 = p0.ready["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .find(|a| a.contains(':'))
        .expect("part 0 has an IPv6 address")
        .split('/')
        .next()
        .unwrap()
        .to_string();

    // Part 1 serves TCP 8081 on ::1 only.
    let _svc = Service::start(
        &pods[1],
        &["TCP6-LISTEN:8081,bind=[::1],reuseaddr,fork", "EXEC:cat"],
    );
    wait_for(&agent, "part 1's port published", |v| {
        has_port(v, "1:8081/tcp")
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while talk(&pods[0], "TCP6:[::1]:8081", "x") != "x" {
        assert!(
            Instant::now() < deadline,
            "no relay for 8081 on ::1:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(talk(&pods[0], "TCP6:[::1]:8081", "over-v6"), "over-v6");
    // An IPv4 client reaches the IPv6-only service too (the mux delivers to ::1).
    assert_eq!(talk(&pods[0], "TCP:127.0.0.1:8081", "from-v4"), "from-v4");
    // From outside, over IPv6, to part 0's pod address.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo outside6 | socat -t 3 - TCP6:[{pod_ip6}]:8081"
        ))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "outside6",
        "outside -> [{pod_ip6}]:8081: {out:?}"
    );
    p0.stop();
    p1.stop();
    assert_eq!(view(&agent), Value::Array(vec![]));
}
