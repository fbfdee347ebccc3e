//! The host agent's qemu backend against real QEMU (TCG here, KVM where it
//! works) booting a real Linux guest: taps on a host bridge, virtio-net
//! hot-plug over QMP, the NIC seen by the guest kernel, unplug with
//! DEVICE_DELETED, QEMU restarts, kill -9 of the agent. Needs root and QEMU.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nestless_protos::agent as pb;
use nestless_tests::{
    agent::{ctx, status_of, vm_client, AgentProc},
    netenv::{host_links, random_subnet, require_root, Bridge},
    vm::{Machine, Vm},
};
use serde_json::{json, Value};

const BOOT: Duration = Duration::from_secs(240);

/// A VM whose agent-facing QMP socket is reached through a symlink the test
/// owns, so that a restarted QEMU can take the old one's place.
struct Guest {
    vm: Vm,
    link: PathBuf,
}

fn boot(machine: Machine, link: &Path) -> Guest {
    let vm = Vm::builder().machine(machine).root_ports(4).start();
    vm.wait_ready(BOOT);
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(vm.qmp_path(), link).unwrap();
    Guest {
        vm,
        link: link.to_path_buf(),
    }
}

struct Rig {
    agent: AgentProc,
    bridge: Bridge,
    guests: Vec<Guest>,
}

fn rig(machines: &[Machine]) -> Rig {
    require_root();
    let net = random_subnet();
    let bridge = Bridge::new(Some(&format!("{net}.1/24")));
    let links_dir = tempfile::Builder::new()
        .prefix("nestless-qmp-")
        .tempdir()
        .unwrap()
        .keep();
    let guests: Vec<Guest> = machines
        .iter()
        .enumerate()
        .map(|(i, m)| boot(*m, &links_dir.join(format!("vm{i}.qmp"))))
        .collect();
    let agent = AgentProc::start(|dir| {
        let mut s = AgentProc::agent_section(dir);
        s += &format!(
            "[[network]]\nname = \"n\"\nbridge = \"{}\"\nsubnet = \"{net}.0/24\"\ngateway = \"{net}.1\"\n",
            bridge.name
        );
        for (i, g) in guests.iter().enumerate() {
            s += &format!(
                "[[vm]]\nname = \"vm{i}\"\nbackend = \"qemu\"\nqmp_socket = \"{}\"\nsocket = \"{}/vm{i}.sock\"\nmax_nics = 8\n",
                g.link.display(),
                dir.display()
            );
        }
        s
    });
    Rig {
        agent,
        bridge,
        guests,
    }
}

impl Rig {
    fn socket(&self, i: usize) -> PathBuf {
        self.agent.dir.path().join(format!("vm{i}.sock"))
    }
}

fn attach_req(sb: &str) -> pb::AttachNicRequest {
    pb::AttachNicRequest {
        sandbox_id: sb.into(),
        ..Default::default()
    }
}

/// The ids of the devices QEMU has, from `query-pci` (all buses).
fn pci_device_ids(vm: &Vm) -> HashSet<String> {
    fn walk(devs: &[Value], out: &mut HashSet<String>) {
        for d in devs {
            if let Some(id) = d["qdev_id"].as_str().filter(|s| !s.is_empty()) {
                out.insert(id.to_string());
            }
            if let Some(children) = d["pci_bridge"]["devices"].as_array() {
                walk(children, out);
            }
        }
    }
    let v = vm.qmp().execute("query-pci", json!({})).unwrap();
    let mut out = HashSet::new();
    for bus in v.as_array().unwrap() {
        walk(bus["devices"].as_array().unwrap(), &mut out);
    }
    out
}

fn netdevs(vm: &Vm) -> String {
    vm.qmp()
        .execute(
            "human-monitor-command",
            json!({"command-line": "info network"}),
        )
        .unwrap()
        .as_str()
        .unwrap()
        .to_string()
}

/// Waits (bounded) until the guest shows a link with `mac`; returns its name.
fn guest_link_with_mac(vm: &Vm, mac: &str, present: bool) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = vm.exec_ok("ip -o link");
        let found = out
            .lines()
            .find(|l| l.contains(mac))
            .map(|l| l.split(':').nth(1).unwrap().trim().to_string());
        if found.is_some() == present {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "guest link with {mac} present={present} not reached:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hotplug_into_a_real_guest_and_unplug() {
    let rig = rig(&[Machine::Q35]);
    let vm = &rig.guests[0].vm;
    let c = vm_client(&rig.socket(0)).await;
    let t = Instant::now();
    let nic = c
        .attach_nic(ctx(), &attach_req("pod-1"))
        .await
        .unwrap()
        .nic
        .unwrap();
    let attach_ms = t.elapsed().as_millis();
    let names_id = nic.id.clone();

    // QEMU has the device on a root port; the tap is on the bridge.
    let ids = pci_device_ids(vm);
    assert!(
        ids.contains(&format!("nl-{names_id}")),
        "query-pci lacks nl-{names_id}: {ids:?}"
    );
    assert!(netdevs(vm).contains(&format!("nln-{names_id}")));
    assert_eq!(rig.bridge.ports(), vec![format!("nlh{names_id}")]);
    // The guest kernel sees a virtio NIC with the MAC.
    let ifname = guest_link_with_mac(vm, &nic.mac, true).unwrap();
    let visible_ms = t.elapsed().as_millis();
    eprintln!("attach reply {attach_ms} ms, NIC visible in the guest after {visible_ms} ms");

    // Configure it in the guest and reach the host bridge through it.
    let a = &nic.addresses[0];
    vm.exec_ok(&format!(
        "ip addr add {}/{} dev {ifname} && ip link set {ifname} up && ping -c 2 -W 5 {}",
        a.address, a.prefix_len, a.gateway
    ));
    let state = rig.agent.state();
    assert_eq!(state["nics"][0]["state"], "attached");
    assert!(state["nics"][0]["slot"].as_str().unwrap().starts_with("rp"));

    // Unplug: the agent returns once QEMU reported DEVICE_DELETED.
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
        !pci_device_ids(vm).contains(&format!("nl-{names_id}")),
        "device still plugged"
    );
    assert!(
        !netdevs(vm).contains(&format!("nln-{names_id}")),
        "netdev left"
    );
    assert!(host_links(&format!("nlh{names_id}")).is_empty(), "tap left");
    guest_link_with_mac(vm, &nic.mac, false);
    assert_eq!(
        rig.agent.state()["nics"].as_array().unwrap().len(),
        0,
        "lease kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_fill_up_then_free_and_i440fx_works() {
    let rig = rig(&[Machine::Q35, Machine::Pc]);
    let c = vm_client(&rig.socket(0)).await;
    let mut nics = Vec::new();
    for i in 0..4 {
        nics.push(
            c.attach_nic(ctx(), &attach_req(&format!("s{i}")))
                .await
                .unwrap()
                .nic
                .unwrap(),
        );
    }
    // Four root ports, four NICs: the fifth gets a clear error, nothing changes.
    let e = c.attach_nic(ctx(), &attach_req("s4")).await.unwrap_err();
    let (code, msg) = status_of(&e);
    assert_eq!(code, ttrpc::Code::RESOURCE_EXHAUSTED, "{msg}");
    assert!(msg.contains("no free hot-plug slot"), "{msg}");
    assert_eq!(rig.agent.state()["nics"].as_array().unwrap().len(), 4);
    assert_eq!(rig.bridge.ports().len(), 4);
    c.detach_nic(
        ctx(),
        &pb::DetachNicRequest {
            sandbox_id: "s2".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let again = c
        .attach_nic(ctx(), &attach_req("s4"))
        .await
        .unwrap()
        .nic
        .unwrap();
    guest_link_with_mac(&rig.guests[0].vm, &again.mac, true);

    // i440fx: straight onto pci.0.
    let c1 = vm_client(&rig.socket(1)).await;
    let nic = c1
        .attach_nic(ctx(), &attach_req("pc-1"))
        .await
        .unwrap()
        .nic
        .unwrap();
    guest_link_with_mac(&rig.guests[1].vm, &nic.mac, true);
    let st = rig.agent.state();
    let rec = st["nics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == nic.id.as_str())
        .unwrap();
    assert_eq!(rec["slot"], "pci.0");
    c1.detach_nic(
        ctx(),
        &pb::DetachNicRequest {
            nic_id: nic.id.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    guest_link_with_mac(&rig.guests[1].vm, &nic.mac, false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_restart_releases_the_lost_nics() {
    let mut rig = rig(&[Machine::Q35]);
    let c = vm_client(&rig.socket(0)).await;
    let nic = c
        .attach_nic(ctx(), &attach_req("doomed"))
        .await
        .unwrap()
        .nic
        .unwrap();
    // QEMU dies and a new one takes its QMP path (as a VM restart does).
    let link = rig.guests[0].link.clone();
    rig.guests.clear();
    let fresh = boot(Machine::Q35, &link);
    rig.guests.push(fresh);
    // The agent's upkeep reconnects, sees the device gone, releases the NIC.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !rig.agent.state()["nics"].as_array().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "lost NIC not released:\n{}",
            rig.agent.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(host_links(&format!("nlh{}", nic.id)).is_empty(), "tap left");
    // And the new QEMU serves attaches.
    let n2 = c
        .attach_nic(ctx(), &attach_req("reborn"))
        .await
        .unwrap()
        .nic
        .unwrap();
    guest_link_with_mac(&rig.guests[0].vm, &n2.mac, true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_agent_leaks_no_tap_device_or_lease() {
    let mut rig = rig(&[Machine::Q35]);
    let rounds = 8;
    for round in 0..rounds {
        let sock = rig.socket(0);
        let load = tokio::spawn(async move {
            let c = vm_client(&sock).await;
            for i in 0.. {
                let r = c
                    .attach_nic(ctx(), &attach_req(&format!("k{round}-{}", i % 3)))
                    .await;
                let d = c
                    .detach_nic(
                        ctx(),
                        &pb::DetachNicRequest {
                            sandbox_id: format!("k{round}-{}", (i + 1) % 3),
                            ..Default::default()
                        },
                    )
                    .await;
                if r.is_err() && d.is_err() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(100 + rand::random::<u64>() % 400)).await;
        rig.agent.kill9();
        load.abort();
        rig.agent.restart();
        let vm = &rig.guests[0].vm;
        let state = rig.agent.state();
        let ids: HashSet<String> = state["nics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                assert_eq!(n["state"], "attached", "round {round}: unrecovered {n}");
                n["id"].as_str().unwrap().to_string()
            })
            .collect();
        let devices: HashSet<String> = pci_device_ids(vm)
            .into_iter()
            .filter_map(|d| d.strip_prefix("nl-").map(str::to_string))
            .collect();
        assert_eq!(devices, ids, "round {round}: QEMU devices vs records");
        let nd = netdevs(vm);
        let netdev_ids: HashSet<String> = nd
            .split(|c: char| c.is_whitespace() || c == '\\')
            .filter_map(|w| {
                w.strip_suffix(':')
                    .and_then(|w| w.strip_prefix("nln-"))
                    .map(str::to_string)
            })
            .collect();
        assert_eq!(netdev_ids, ids, "round {round}: netdevs vs records:\n{nd}");
        let taps: HashSet<String> = rig
            .bridge
            .ports()
            .into_iter()
            .map(|p| p[3..].to_string())
            .collect();
        assert_eq!(taps, ids, "round {round}: taps vs records");
    }
}

/// Issue 9, item 8, on real QEMU: a NIC whose tap someone deletes carries
/// nothing any more; the agent notices while it runs, unplugs the device
/// from the guest and releases the record and lease (the VM's quota).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tap_deleted_behind_the_agents_back_is_released() {
    let rig = rig(&[Machine::Q35]);
    let vm = &rig.guests[0].vm;
    let c = vm_client(&rig.socket(0)).await;
    let nic = c
        .attach_nic(ctx(), &attach_req("victim"))
        .await
        .unwrap()
        .nic
        .unwrap();
    guest_link_with_mac(vm, &nic.mac, true);
    nestless_tests::netenv::check(&["ip", "link", "del", &format!("nlh{}", nic.id)]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(rig.agent.leases().is_empty() && rig.agent.records().is_empty()) {
        assert!(
            Instant::now() < deadline,
            "the NIC without its tap was not released:\n{}",
            rig.agent.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        !pci_device_ids(vm).contains(&format!("nl-{}", nic.id)),
        "device still plugged"
    );
    assert!(
        !netdevs(vm).contains(&format!("nln-{}", nic.id)),
        "netdev left"
    );
    guest_link_with_mac(vm, &nic.mac, false);
}
