//! The host agent's libvirt backend against a real libvirtd running TCG domains
//! (`type='qemu'`) with the project's guest image: discovery of a domain carrying the
//! nestless metadata element, NICs hot-plugged through libvirt (`virsh domiflist`, the
//! domain XML, the guest kernel), unplug, `virsh destroy`, kill -9 of the agent during
//! attach/detach loops. Needs root, libvirtd (tests/lib/setup.sh starts it), QEMU and
//! vhost-device-vsock; fails when one is missing.

use std::{
    collections::HashSet,
    path::PathBuf,
    time::{Duration, Instant},
};

use nestless_protos::agent as pb;
use nestless_tests::{
    agent::{ctx, vm_client, AgentProc},
    libvirt::{domain_dir, require_libvirtd, Domain},
    netenv::{host_links, random_subnet, Bridge},
};

const BOOT: Duration = Duration::from_secs(240);
const SETTLE: Duration = Duration::from_secs(60);
const VSOCK_PORT: u32 = nestless_protos::DEFAULT_VSOCK_PORT;

fn attach_req(sb: &str) -> pb::AttachNicRequest {
    pb::AttachNicRequest {
        sandbox_id: sb.into(),
        ..Default::default()
    }
}

fn detach_req(sb: &str) -> pb::DetachNicRequest {
    pb::DetachNicRequest {
        sandbox_id: sb.into(),
        ..Default::default()
    }
}

/// Polls `cond` until it holds; panics with `what` and the agent's log after `timeout`.
async fn wait_for(
    agent: &AgentProc,
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "{what}: not reached within {timeout:?}\n--- agent log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn network(bridge: &Bridge, net: &str) -> String {
    format!(
        "[[network]]\nname = \"n\"\nbridge = \"{}\"\nsubnet = \"{net}.0/24\"\ngateway = \"{net}.1\"\n",
        bridge.name
    )
}

fn served(agent: &AgentProc) -> HashSet<String> {
    agent
        .ctl_json("vms")
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v["name"].as_str().map(str::to_string))
        .collect()
}

/// Waits until the guest shows (or no longer shows) a link with `mac`.
async fn guest_has_mac(agent: &AgentProc, dom: &Domain, mac: &str, present: bool) {
    wait_for(
        agent,
        &format!("guest link {mac} present={present}"),
        SETTLE,
        || dom.exec_ok("ip -o link").contains(mac) == present,
    )
    .await;
}

fn tap_ids(bridge: &Bridge) -> HashSet<String> {
    bridge
        .ports()
        .into_iter()
        .filter_map(|p| p.strip_prefix("nlh").map(str::to_string))
        .collect()
}

/// Issue 13, item 2: a domain defined with the metadata element is registered when it
/// starts; a NIC attached through the agent is in `virsh domiflist` and the guest; the
/// detach takes it out of the domain XML; `virsh destroy` releases the domain's NICs and
/// leases and unregisters it; started again, it is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_with_metadata_is_served_and_its_nics_follow_libvirt() {
    require_libvirtd();
    let net = random_subnet();
    let bridge = Bridge::new(Some(&format!("{net}.1/24")));
    let agent = AgentProc::start(|dir| {
        AgentProc::agent_section(dir)
            + "libvirt_discover = true\nlibvirt_poll_ms = 200\n"
            + &network(&bridge, &net)
    });
    let dir = domain_dir();
    let uds = dir.path().join("vsock.sock");
    let mut dom = Domain::start(
        Domain::builder().metadata(format!(
            "<n:network>n</n:network><n:max-nics>3</n:max-nics><n:vsock-uds>{}</n:vsock-uds>",
            uds.display()
        )),
        dir,
    );
    let t = Instant::now();
    wait_for(&agent, "the domain registered", SETTLE, || {
        served(&agent).contains(&dom.name)
    })
    .await;
    eprintln!(
        "registered {} ms after `virsh start`",
        t.elapsed().as_millis()
    );
    let vm = agent
        .ctl_json("vms")
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == dom.name.as_str())
        .cloned()
        .unwrap();
    assert_eq!(vm["max_nics"], 3, "{vm}");
    // The guest reaches the agent at vhost-device-vsock's <uds>_<port>.
    let sock = PathBuf::from(format!("{}_{VSOCK_PORT}", uds.display()));
    assert!(sock.exists(), "{} not served", sock.display());
    dom.wait_ready(BOOT);

    let c = vm_client(&sock).await;
    let nic = c
        .attach_nic(ctx(), &attach_req("pod-1"))
        .await
        .unwrap()
        .nic
        .unwrap();
    let tap = format!("nlh{}", nic.id);
    assert!(
        dom.domiflist().contains(&(tap.clone(), nic.mac.clone())),
        "domiflist: {:?}",
        dom.domiflist()
    );
    assert_eq!(dom.agent_aliases(), vec![nic.id.clone()]);
    assert_eq!(bridge.ports(), vec![tap.clone()]);
    guest_has_mac(&agent, &dom, &nic.mac, true).await;
    // The persistent definition is left alone (persist_nics = false).
    assert!(
        !dom.config_xml().contains("ua-nl-"),
        "NIC in the definition"
    );

    c.detach_nic(ctx(), &detach_req("pod-1")).await.unwrap();
    assert!(dom.agent_aliases().is_empty(), "{}", dom.live_xml());
    assert!(dom.domiflist().is_empty(), "{:?}", dom.domiflist());
    assert!(host_links(&tap).is_empty(), "tap left");
    assert!(agent.leases().is_empty(), "lease kept");
    guest_has_mac(&agent, &dom, &nic.mac, false).await;

    // virsh destroy with a NIC: released, leases freed, the VM unregistered.
    let n2 = c
        .attach_nic(ctx(), &attach_req("pod-2"))
        .await
        .unwrap()
        .nic
        .unwrap();
    assert_eq!(dom.agent_aliases(), vec![n2.id.clone()]);
    dom.destroy();
    wait_for(&agent, "the destroyed domain unregistered", SETTLE, || {
        !served(&agent).contains(&dom.name)
    })
    .await;
    assert!(agent.leases().is_empty(), "leases: {:?}", agent.leases());
    assert!(agent.records().is_empty(), "records: {:?}", agent.records());
    assert!(host_links(&format!("nlh{}", n2.id)).is_empty(), "tap left");
    assert!(!sock.exists(), "socket of an unregistered VM left");

    // Started again: served again, and attaches work.
    dom.start_again();
    wait_for(&agent, "the restarted domain registered", SETTLE, || {
        served(&agent).contains(&dom.name)
    })
    .await;
    dom.wait_ready(BOOT);
    let c = vm_client(&sock).await;
    let n3 = c
        .attach_nic(ctx(), &attach_req("pod-3"))
        .await
        .unwrap()
        .nic
        .unwrap();
    guest_has_mac(&agent, &dom, &n3.mac, true).await;
    // The agent made the tap persistent: it is the agent's to delete.
    c.detach_nic(ctx(), &detach_req("pod-3")).await.unwrap();
    assert!(host_links(&format!("nlh{}", n3.id)).is_empty(), "tap left");
}

/// A domain without metadata, served as a `[[vm]]` of the file.
fn static_rig(max_nics: u32) -> (Bridge, Domain, AgentProc) {
    static_rig_with(max_nics, "")
}

fn static_rig_with(max_nics: u32, extra: &str) -> (Bridge, Domain, AgentProc) {
    require_libvirtd();
    let net = random_subnet();
    let bridge = Bridge::new(Some(&format!("{net}.1/24")));
    let dom = Domain::start(Domain::builder().root_ports(4), domain_dir());
    dom.wait_ready(BOOT);
    let agent = AgentProc::start(|dir| {
        AgentProc::agent_section(dir)
            + &network(&bridge, &net)
            + &format!(
                "[[vm]]\nname = \"lv\"\nbackend = \"libvirt\"\ndomain = \"{}\"\nsocket = \"{}/lv.sock\"\nmax_nics = {max_nics}\n{extra}",
                dom.name,
                dir.display()
            )
    });
    (bridge, dom, agent)
}

fn socket(agent: &AgentProc) -> PathBuf {
    agent.dir.path().join("lv.sock")
}

fn record_ids(agent: &AgentProc, round: usize) -> HashSet<String> {
    agent
        .records()
        .iter()
        .map(|n| {
            assert_eq!(n["state"], "attached", "round {round}: unrecovered {n}");
            n["id"].as_str().unwrap().to_string()
        })
        .collect()
}

/// Issue 13, item 3: the agent killed with -9 during attach/detach loops against a
/// libvirt domain leaks nothing: after each restart the domain's NICs (user aliases in
/// the live XML), the taps on the bridge and the leases are exactly the records. Then a
/// domain destroyed behind the agent's back has its NICs released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_attach_detach_loops_leaks_nothing() {
    let (bridge, dom, mut agent) = static_rig(8);
    let rounds = 8;
    let mut interrupted = 0;
    for round in 0..rounds {
        let sock = socket(&agent);
        let load = tokio::spawn(async move {
            let c = vm_client(&sock).await;
            for i in 0.. {
                let r = c
                    .attach_nic(ctx(), &attach_req(&format!("k{round}-{}", i % 3)))
                    .await;
                let d = c
                    .detach_nic(ctx(), &detach_req(&format!("k{round}-{}", (i + 1) % 3)))
                    .await;
                if r.is_err() && d.is_err() {
                    tokio::task::yield_now().await;
                }
            }
        });
        // A random point of the loop: the kill must be able to cut any step.
        tokio::time::sleep(Duration::from_millis(150 + rand::random::<u64>() % 600)).await;
        agent.kill9();
        load.abort();
        if agent.records().iter().any(|n| n["state"] != "attached") {
            interrupted += 1;
        }
        agent.restart();
        let ids = record_ids(&agent, round);
        let aliases: HashSet<String> = dom.agent_aliases().into_iter().collect();
        assert_eq!(aliases, ids, "round {round}: libvirt devices vs records");
        assert_eq!(tap_ids(&bridge), ids, "round {round}: taps vs records");
        let leases = agent.leases().len();
        assert_eq!(leases, ids.len(), "round {round}: leases vs records");
        let ifaces: HashSet<String> = dom
            .domiflist()
            .into_iter()
            .map(|(i, _)| i.trim_start_matches("nlh").to_string())
            .collect();
        assert_eq!(ifaces, ids, "round {round}: domiflist vs records");
        // Every NIC back, so that each round starts with free slots and quota.
        let c = vm_client(&socket(&agent)).await;
        for id in &ids {
            c.detach_nic(
                ctx(),
                &pb::DetachNicRequest {
                    nic_id: id.clone(),
                    ..Default::default()
                },
            )
            .await
            .unwrap_or_else(|e| panic!("round {round}: detach {id}: {e:?}"));
        }
        assert!(
            dom.agent_aliases().is_empty(),
            "round {round}: {}",
            dom.live_xml()
        );
    }
    eprintln!("{rounds} kills, {interrupted} cut an operation");

    // A reboot inside the same QEMU process (libvirt's reboot event): the pods are gone,
    // so are their NICs.
    let c = vm_client(&socket(&agent)).await;
    let r = c
        .attach_nic(ctx(), &attach_req("before-reset"))
        .await
        .unwrap()
        .nic
        .unwrap();
    nestless_tests::libvirt::virsh_ok(&["reset", &dom.name]);
    wait_for(&agent, "NICs of the reset guest released", SETTLE, || {
        agent.records().is_empty()
    })
    .await;
    assert!(
        agent.log().contains("the guest restarted"),
        "released, but not through the reboot event:\n{}",
        agent.log()
    );
    assert!(host_links(&format!("nlh{}", r.id)).is_empty(), "tap left");
    assert!(dom.agent_aliases().is_empty(), "{}", dom.live_xml());
    dom.wait_ready(BOOT);

    // Destroyed behind the agent's back: its NICs and leases go, its taps too.
    let c = vm_client(&socket(&agent)).await;
    c.attach_nic(ctx(), &attach_req("last")).await.unwrap();
    assert!(!agent.records().is_empty());
    dom.destroy();
    wait_for(
        &agent,
        "NICs of the destroyed domain released",
        SETTLE,
        || agent.records().is_empty(),
    )
    .await;
    assert!(agent.leases().is_empty(), "leases: {:?}", agent.leases());
    assert!(bridge.ports().is_empty(), "taps left: {:?}", bridge.ports());
    // Still configured, and refused clearly while the domain is down.
    let e = c.attach_nic(ctx(), &attach_req("down")).await.unwrap_err();
    let (code, msg) = nestless_tests::agent::status_of(&e);
    assert_eq!(code, ttrpc::Code::UNAVAILABLE, "{msg}");
    assert!(msg.contains("not running"), "{msg}");
}

/// `persist_nics = true`: a NIC goes into the domain's persistent definition as well as
/// the live domain, and out of both. Then crash reconcile against libvirt: an interface
/// with the agent's alias that no record accounts for (live and in the definition, on a
/// tap the agent did not make) is detached and its tap deleted at the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persist_nics_and_orphans_in_libvirt() {
    let (bridge, dom, mut agent) = static_rig_with(4, "persist_nics = true\n");
    let c = vm_client(&socket(&agent)).await;
    let nic = c
        .attach_nic(ctx(), &attach_req("p1"))
        .await
        .unwrap()
        .nic
        .unwrap();
    let alias = format!("ua-nl-{}", nic.id);
    assert!(dom.live_xml().contains(&alias), "{}", dom.live_xml());
    assert!(dom.config_xml().contains(&alias), "{}", dom.config_xml());
    c.detach_nic(ctx(), &detach_req("p1")).await.unwrap();
    assert!(!dom.live_xml().contains(&alias), "{}", dom.live_xml());
    assert!(!dom.config_xml().contains(&alias), "{}", dom.config_xml());
    assert!(bridge.ports().is_empty(), "{:?}", bridge.ports());

    // An orphan: plugged with the agent's alias behind its back.
    let id = format!("{:010x}", rand::random::<u64>() & 0xff_ffff_ffff);
    let tap = format!("nlh{id}");
    nestless_tests::netenv::check(&[
        "ip", "tuntap", "add", "dev", &tap, "mode", "tap", "vnet_hdr",
    ]);
    nestless_tests::netenv::check(&["ip", "link", "set", &tap, "master", &bridge.name, "up"]);
    let xml = dom.dir().join("orphan.xml");
    std::fs::write(
        &xml,
        format!(
            "<interface type='ethernet'><mac address='52:54:00:9a:00:01'/><target dev='{tap}' managed='no'/>\
             <model type='virtio'/><alias name='ua-nl-{id}'/></interface>"
        ),
    )
    .unwrap();
    nestless_tests::libvirt::virsh_ok(&[
        "attach-device",
        &dom.name,
        &xml.display().to_string(),
        "--live",
        "--config",
    ]);
    assert_eq!(dom.agent_aliases(), vec![id.clone()]);
    agent.kill9();
    agent.restart();
    assert!(dom.agent_aliases().is_empty(), "{}", dom.live_xml());
    assert!(!dom.config_xml().contains(&id), "{}", dom.config_xml());
    assert!(host_links(&tap).is_empty(), "orphan tap left");
    assert!(agent.records().is_empty());
}

/// `nestlessctl ARGS --socket <admin>`: (success, stdout + stderr).
fn ctl(agent: &AgentProc, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(nestless_tests::agent::bin_path("nestlessctl"))
        .args(args)
        .arg("--socket")
        .arg(&agent.admin)
        .output()
        .expect("run nestlessctl");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Issue 13, item 1 with item 2: a libvirt domain registered at run time with
/// `nestlessctl vm add --backend libvirt --domain D --persist-nics` is served at once,
/// through libvirt (the NIC in the live and the persistent XML); it survives a kill -9
/// of the agent with its NIC; a change of a serving field is refused while it has
/// NICs; `vm rm --force` takes the NIC out of both XMLs, deletes the tap and the
/// socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_libvirt_domain_registered_with_nestlessctl() {
    require_libvirtd();
    let net = random_subnet();
    let bridge = Bridge::new(Some(&format!("{net}.1/24")));
    let dom = Domain::start(Domain::builder().root_ports(4), domain_dir());
    dom.wait_ready(BOOT);
    let mut agent = AgentProc::start(|dir| AgentProc::agent_section(dir) + &network(&bridge, &net));
    let sock = agent.dir.path().join("reg.sock");
    let sock_s = sock.display().to_string();

    // A libvirt-only key on another backend: refused, naming the key.
    let (ok, out) = ctl(
        &agent,
        &[
            "vm",
            "add",
            "reg",
            "--backend",
            "qemu",
            "--qmp-socket",
            "/nonexistent.qmp",
            "--domain",
            &dom.name,
        ],
    );
    assert!(!ok && out.contains("domain"), "{out}");
    let (ok, out) = ctl(
        &agent,
        &[
            "vm",
            "add",
            "reg",
            "--backend",
            "libvirt",
            "--domain",
            &dom.name,
            "--vm-socket",
            &sock_s,
            "--max-nics",
            "3",
            "--persist-nics",
        ],
    );
    assert!(ok, "{out}");
    let vm = agent
        .ctl_json("vms")
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "reg")
        .cloned()
        .expect("reg listed");
    assert_eq!(
        (vm["backend"].as_str(), vm["source"].as_str()),
        (Some("libvirt"), Some("registered")),
        "{vm}"
    );
    let c = vm_client(&sock).await;
    let nic = c
        .attach_nic(ctx(), &attach_req("p1"))
        .await
        .unwrap()
        .nic
        .unwrap();
    let alias = format!("ua-nl-{}", nic.id);
    assert!(dom.live_xml().contains(&alias), "{}", dom.live_xml());
    assert!(dom.config_xml().contains(&alias), "{}", dom.config_xml());
    guest_has_mac(&agent, &dom, &nic.mac, true).await;

    let (ok, out) = ctl(&agent, &["vm", "set", "reg", "--persist-nics=false"]);
    assert!(!ok && out.contains("1 NIC(s)"), "{out}");

    // Durable: after kill -9 the registration and the NIC are back.
    agent.kill9();
    agent.restart();
    assert!(served(&agent).contains("reg"));
    let recs = agent.records();
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0]["state"], "attached", "{recs:?}");
    assert_eq!(dom.agent_aliases(), vec![nic.id.clone()]);

    let (ok, out) = ctl(&agent, &["vm", "rm", "reg"]);
    assert!(
        !ok && out.contains("1 NIC(s)") && out.contains("force"),
        "{out}"
    );
    let (ok, out) = ctl(&agent, &["vm", "rm", "reg", "--force"]);
    assert!(ok && out.contains("1 NIC(s) released"), "{out}");
    assert!(dom.agent_aliases().is_empty(), "{}", dom.live_xml());
    assert!(!dom.config_xml().contains(&alias), "{}", dom.config_xml());
    assert!(bridge.ports().is_empty(), "{:?}", bridge.ports());
    assert!(!sock.exists(), "{} left", sock.display());
    assert!(agent.records().is_empty());
}

/// Issue 13, end to end under libvirt: a CRI pod (RunPodSandbox through containerd's CRI
/// in the domain, nestless-cni asking the agent over vsock) gets the NIC the agent
/// hot-plugged through libvirt: the pod's `eth0` has the leased address, `virsh
/// domiflist` lists the tap; StopPodSandbox + RemovePodSandbox take it out of the
/// domain XML, and the tap, the record and the lease go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cri_pod_in_a_libvirt_domain_gets_its_nic_through_nestless_cni() {
    use nestless_tests::e2e::{guest_image, Guest, BOOT_TIMEOUT};
    require_libvirtd();
    let image = guest_image();
    let net = random_subnet();
    let bridge = Bridge::new(Some(&format!("{net}.1/24")));
    let dom = Domain::start(
        Domain::builder()
            .image(image)
            .memory_mib(1024)
            .root_ports(4),
        domain_dir(),
    );
    let agent = AgentProc::start(|dir| {
        // TCG guests under load take seconds to release a device.
        AgentProc::agent_section(dir).replacen(
            "unplug_timeout_ms = 5000",
            "unplug_timeout_ms = 20000",
            1,
        ) + &network(&bridge, &net)
            + &format!(
                "[[vm]]\nname = \"lv\"\nbackend = \"libvirt\"\ndomain = \"{}\"\nvsock_uds = \"{}\"\nmax_nics = 4\n",
                dom.name,
                dom.vsock_uds().display()
            )
    });
    dom.wait_ready(BOOT_TIMEOUT);
    dom.import_images();
    let (pod, ms) = dom.cri_pod(
        "web",
        nestless_tests::containerd::CRI_HANDLER,
        &[],
        "sleep 3600",
    );
    eprintln!("RunPodSandbox in the libvirt domain: {ms:.0} ms");
    let recs = agent.records();
    assert_eq!(recs.len(), 1, "{recs:?}");
    let rec = &recs[0];
    assert_eq!(rec["sandbox_id"], pod.id.as_str(), "{rec}");
    assert_eq!(rec["state"], "attached", "{rec}");
    assert_eq!(
        rec["ipv4"],
        pod.ip.as_str(),
        "the pod's eth0 has the leased address"
    );
    let id = rec["id"].as_str().unwrap().to_string();
    let iflist = nestless_tests::libvirt::virsh_ok(&["domiflist", &dom.name]);
    assert!(iflist.contains(&format!("nlh{id}")), "{iflist}");
    assert_eq!(dom.agent_aliases(), vec![id.clone()]);

    dom.cri_delete(&pod.id);
    assert!(dom.agent_aliases().is_empty(), "{}", dom.live_xml());
    assert!(host_links(&format!("nlh{id}")).is_empty(), "tap left");
    assert!(agent.records().is_empty());
    assert!(agent.leases().is_empty());
}
