//! VMs registered at run time and the configuration reloaded on SIGHUP
//! (issue 13, item 1), for real: the agent binary, netns-backed VMs on a
//! test bridge, `nestlessctl vm ...`, the Admin API. Needs root. Every wait
//! polls the agent's API (the config generation, the last reload error,
//! the VMs it lists), never a sleep.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use nestless_protos::agent as pb;
use nestless_tests::{
    agent::{admin_client, bin_path, ctx, status_of, vm_client, AgentProc, NetnsVms},
    netenv::{host_links, Netns},
};

fn rig(vms: usize) -> NetnsVms {
    NetnsVms::start(vms, 8, "test", "vv")
}

fn attach_req(sb: &str) -> pb::AttachNicRequest {
    pb::AttachNicRequest {
        sandbox_id: sb.into(),
        ..Default::default()
    }
}

/// `nestlessctl ARGS --socket <admin>`.
fn ctl(agent: &AgentProc, args: &[&str]) -> Output {
    Command::new(bin_path("nestlessctl"))
        .args(args)
        .arg("--socket")
        .arg(&agent.admin)
        .output()
        .expect("run nestlessctl")
}

/// `nestlessctl vm add NAME --backend netns --netns NS --vm-socket SOCKET EXTRA...`.
fn add(agent: &AgentProc, name: &str, ns: &str, socket: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "vm",
        "add",
        name,
        "--backend",
        "netns",
        "--netns",
        ns,
        "--vm-socket",
        socket,
    ];
    args.extend_from_slice(extra);
    ctl(agent, &args)
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "nestlessctl failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn failed(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "nestlessctl should have failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `nestlessctl vm ls --json`, by name.
fn vms(agent: &AgentProc) -> Vec<serde_json::Value> {
    let out = ok(&ctl(agent, &["vm", "ls", "--json"]));
    serde_json::from_str::<serde_json::Value>(&out)
        .expect("vm ls --json")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn vm<'a>(list: &'a [serde_json::Value], name: &str) -> Option<&'a serde_json::Value> {
    list.iter().find(|v| v["name"] == name)
}

async fn status(agent: &AgentProc) -> pb::StatusResponse {
    admin_client(&agent.admin)
        .await
        .status(ctx(), &pb::StatusRequest::default())
        .await
        .expect("Status")
}

/// Polls Status until `done` holds (20 s at most).
async fn wait_status(
    agent: &AgentProc,
    what: &str,
    done: impl Fn(&pb::StatusResponse) -> bool,
) -> pb::StatusResponse {
    let start = Instant::now();
    loop {
        let s = status(agent).await;
        if done(&s) {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what}: not within 20s; last status {s:?}\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sighup(agent: &AgentProc) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
}

/// A `[[vm]]` entry as the rig writes them.
fn vm_entry(name: &str, ns: &str, dir: &Path) -> String {
    format!(
        "[[vm]]\nname = \"{name}\"\nbackend = \"netns\"\nnetns = \"{ns}\"\nsocket = \"{}/{name}.sock\"\nmax_nics = 8\n",
        dir.display()
    )
}

/// The rig's config with other networks and VMs.
fn config_text(rig: &NetnsVms, networks: &[(&str, &str, &str)], vms: &str) -> String {
    let dir = rig.agent.dir.path();
    let mut s = AgentProc::agent_section(dir);
    for (name, bridge, net) in networks {
        s += &format!(
            "[[network]]\nname = \"{name}\"\nbridge = \"{bridge}\"\nsubnet = \"{net}.0/24\"\ngateway = \"{net}.1\"\n"
        );
    }
    s + vms
}

/// The NIC with `mac` is in namespace `ns`.
fn has_mac(ns: &Netns, mac: &str) -> bool {
    ns.links()
        .iter()
        .any(|l| l["address"].as_str() == Some(mac))
}

fn sock(rig: &NetnsVms, name: &str) -> PathBuf {
    rig.agent.dir.path().join(format!("{name}.sock"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_add_serves_at_once_and_rm_needs_force_with_nics() {
    let rig = rig(1);
    let ns = Netns::new("dyn");
    let dyn_sock = sock(&rig, "dyn");
    let dyn_sock_s = dyn_sock.display().to_string();

    // Bad arguments: said clearly, nothing registered.
    let e = failed(&ctl(&rig.agent, &["vm", "add", "dyn", "--netns", &ns.name]));
    assert!(e.contains("--backend is required"), "{e}");
    let e = failed(&ctl(
        &rig.agent,
        &[
            "vm",
            "add",
            "dyn",
            "--backend",
            "netns",
            "--max-nics",
            "many",
        ],
    ));
    assert!(e.contains("--max-nics") && e.contains("many"), "{e}");
    let e = failed(&ctl(&rig.agent, &["vm", "add", "dyn", "--backend", "xen"]));
    assert!(e.contains("xen"), "{e}");
    // The agent's checks, naming the field: a name the file has, the file
    // VM's namespace and socket, an unknown network, the admin socket.
    let e = failed(&add(&rig.agent, "vm0", &ns.name, &dyn_sock_s, &[]));
    assert!(e.contains("\"vm0\" exists already"), "{e}");
    let e = failed(&add(&rig.agent, "dyn", &rig.vms[0].name, &dyn_sock_s, &[]));
    assert!(
        e.contains("registered vm (\"dyn\").netns") && e.contains("already VM \"vm0\"'s"),
        "{e}"
    );
    let vm0_sock = rig.socket(0).display().to_string();
    let e = failed(&add(&rig.agent, "dyn", &ns.name, &vm0_sock, &[]));
    assert!(e.contains("registered vm (\"dyn\").socket"), "{e}");
    let admin = rig.agent.admin.display().to_string();
    let e = failed(&add(&rig.agent, "dyn", &ns.name, &admin, &[]));
    assert!(e.contains("admin socket"), "{e}");
    let e = failed(&add(
        &rig.agent,
        "dyn",
        &ns.name,
        &dyn_sock_s,
        &["--network", "nope"],
    ));
    assert!(e.contains("registered vm (\"dyn\").network"), "{e}");
    assert!(vm(&vms(&rig.agent), "dyn").is_none());
    assert!(!dyn_sock.exists());

    // Registered: served at once.
    let generation = status(&rig.agent).await.config_generation;
    ok(&add(
        &rig.agent,
        "dyn",
        &ns.name,
        &dyn_sock_s,
        &["--max-nics", "4"],
    ));
    assert_eq!(status(&rig.agent).await.config_generation, generation + 1);
    let c = vm_client(&dyn_sock).await;
    let health = c
        .health(ctx(), &pb::HealthRequest::default())
        .await
        .unwrap();
    assert_eq!(health.vm, "dyn");
    assert_eq!(health.nic_quota, 4);
    let nic = c
        .attach_nic(ctx(), &attach_req("sb-dyn"))
        .await
        .unwrap()
        .nic
        .unwrap();
    assert!(has_mac(&ns, &nic.mac), "NIC {} not in {}", nic.mac, ns.name);
    let list = vms(&rig.agent);
    let d = vm(&list, "dyn").expect("dyn listed");
    assert_eq!(d["source"], "registered");
    assert_eq!(d["nics"], 1);
    assert_eq!(vm(&list, "vm0").unwrap()["source"], "file");
    let table = ok(&ctl(&rig.agent, &["vm", "ls"]));
    assert!(
        table.starts_with("NAME") && table.contains("registered"),
        "{table}"
    );

    // A live quota change; a socket change refused while it has NICs.
    ok(&ctl(
        &rig.agent,
        &["vm", "set", "dyn", "--max-nics", "6", "--warm-pool", "0"],
    ));
    let health = c
        .health(ctx(), &pb::HealthRequest::default())
        .await
        .unwrap();
    assert_eq!(health.nic_quota, 6);
    let other = sock(&rig, "dyn2").display().to_string();
    let e = failed(&ctl(
        &rig.agent,
        &["vm", "set", "dyn", "--vm-socket", &other],
    ));
    assert!(e.contains("1 NIC(s)") && e.contains("socket"), "{e}");
    let e = failed(&ctl(&rig.agent, &["vm", "set", "vm0", "--max-nics", "2"]));
    assert!(e.contains("[[vm]]"), "{e}");

    // rm without --force: refused, naming the count; nothing changed.
    let e = failed(&ctl(&rig.agent, &["vm", "rm", "dyn"]));
    assert!(e.contains("1 NIC(s)") && e.contains("force"), "{e}");
    assert!(dyn_sock.exists());
    assert!(has_mac(&ns, &nic.mac));
    // The file's VMs are not removed this way.
    let e = failed(&ctl(&rig.agent, &["vm", "rm", "vm0"]));
    assert!(e.contains("[[vm]]"), "{e}");

    // rm --force: its NIC released, its socket gone, nothing left.
    let out = ok(&ctl(&rig.agent, &["vm", "rm", "dyn", "--force", "--json"]));
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["released_nics"], 1);
    assert!(!dyn_sock.exists(), "socket left");
    assert!(!has_mac(&ns, &nic.mac), "NIC left in the namespace");
    assert!(
        host_links(&format!("nlh{}", nic.id)).is_empty(),
        "host end left"
    );
    assert!(rig.agent.leases().is_empty());
    assert!(vm(&vms(&rig.agent), "dyn").is_none());
    // Its open connection is refused now (the VM is no longer served).
    if let Err(e) = c.health(ctx(), &pb::HealthRequest::default()).await {
        let (code, _) = status_of(&e);
        assert_ne!(code, ttrpc::Code::OK, "{e:?}");
    } else {
        panic!("a call on an unregistered VM's connection succeeded");
    }
    let e = failed(&ctl(&rig.agent, &["vm", "rm", "dyn"]));
    assert!(e.contains("no registered VM"), "{e}");

    // Without NICs, rm needs no force; the name can be used again.
    ok(&add(&rig.agent, "dyn", &ns.name, &dyn_sock_s, &[]));
    assert!(dyn_sock.exists());
    ok(&ctl(&rig.agent, &["vm", "rm", "dyn"]));
    assert!(!dyn_sock.exists());
    let stored = std::fs::read_to_string(rig.agent.dir.path().join("state/vms.json")).unwrap();
    assert!(!stored.contains("dyn"), "{stored}");
}

async fn register(agent: &AgentProc, name: &str, ns: &Netns, socket: &Path) {
    admin_client(&agent.admin)
        .await
        .register_vm(
            ctx(),
            &pb::RegisterVmRequest {
                vm: Some(pb::VmSpec {
                    name: name.into(),
                    backend: "netns".into(),
                    netns: ns.name.clone(),
                    socket: socket.display().to_string(),
                    ..Default::default()
                })
                .into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("RegisterVm {name}: {e:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_vm_and_its_nics_survive_restart_and_kill9() {
    let mut rig = rig(1);
    let ns = Netns::new("dur");
    let dsock = sock(&rig, "dur");
    register(&rig.agent, "dur", &ns, &dsock).await;
    let nic = vm_client(&dsock)
        .await
        .attach_nic(ctx(), &attach_req("sb-dur"))
        .await
        .unwrap()
        .nic
        .unwrap();
    for how in ["stop", "kill -9"] {
        if how == "stop" {
            assert!(rig.agent.stop().success());
        } else {
            rig.agent.kill9();
        }
        rig.agent.restart();
        let list = vms(&rig.agent);
        let d = vm(&list, "dur").unwrap_or_else(|| panic!("after {how}: {list:?}"));
        assert_eq!(d["source"], "registered", "after {how}");
        assert_eq!(d["nics"], 1, "after {how}: its NIC kept");
        assert!(has_mac(&ns, &nic.mac), "after {how}");
        // Served again: the same attach finds its NIC.
        let again = vm_client(&dsock)
            .await
            .attach_nic(ctx(), &attach_req("sb-dur"))
            .await
            .unwrap();
        assert!(!again.created, "after {how}");
        assert_eq!(again.nic.unwrap().id, nic.id);
        assert!(
            !rig.agent.log().contains("no longer configured"),
            "after {how}:\n{}",
            rig.agent.log()
        );
    }
    // A [[vm]] added to the file with the registered VM's name: the agent
    // refuses to start (and --check-config says why), naming both.
    assert!(rig.agent.stop().success());
    let original = std::fs::read_to_string(&rig.agent.config).unwrap();
    let other = Netns::new("dur2");
    let clash = original.clone()
        + &vm_entry("dur", &other.name, rig.agent.dir.path()).replace("dur.sock", "dur-file.sock");
    std::fs::write(&rig.agent.config, clash).unwrap();
    for args in [&["--check-config"][..], &[][..]] {
        let (status, out) = rig.agent.run_once(args, Duration::from_secs(20));
        assert_eq!(status.code(), Some(2), "{args:?}: {out}");
        assert!(
            out.contains("vms.json: registered vm (\"dur\").name")
                && out.contains("vm[1] (\"dur\") has it too"),
            "{args:?}: {out}"
        );
    }
    std::fs::write(&rig.agent.config, original).unwrap();
    rig.agent.restart();
    assert_eq!(vm(&vms(&rig.agent), "dur").unwrap()["nics"], 1);
    ok(&ctl(&rig.agent, &["vm", "rm", "dur", "--force"]));
    assert!(!has_mac(&ns, &nic.mac));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_good_change() {
    let rig = rig(2);
    let extra = Netns::new("new");
    let c0 = vm_client(&rig.socket(0)).await;
    let nic = c0
        .attach_nic(ctx(), &attach_req("sb-keep"))
        .await
        .unwrap()
        .nic
        .unwrap();
    let before = status(&rig.agent).await;
    assert_eq!(before.last_reload_error, "");
    // vm1 removed, vm2 added, a network added (its bridge is not there:
    // a warning, attaches to it would fail until it is).
    let dir = rig.agent.dir.path();
    let bridge = rig.bridge.name.clone();
    let text = config_text(
        &rig,
        &[
            ("test", &bridge, &rig.net),
            ("more", "nltmissing0", "10.254.254"),
        ],
        &(vm_entry("vm0", &rig.vms[0].name, dir)
            + "network = \"test\"\n"
            + &vm_entry("vm2", &extra.name, dir)
            + "network = \"test\"\n"),
    );
    std::fs::write(&rig.agent.config, text).unwrap();
    sighup(&rig.agent);
    let after = wait_status(&rig.agent, "reload applied", |s| {
        s.config_generation > before.config_generation
    })
    .await;
    assert_eq!(after.last_reload_error, "", "{after:?}");
    assert!(!rig.socket(1).exists(), "vm1's socket left");
    let list = vms(&rig.agent);
    assert!(vm(&list, "vm1").is_none());
    assert_eq!(vm(&list, "vm0").unwrap()["nics"], 1);
    let c2 = vm_client(&sock(&rig, "vm2")).await;
    let n2 = c2
        .attach_nic(ctx(), &attach_req("sb-new"))
        .await
        .unwrap()
        .nic
        .unwrap();
    assert!(has_mac(&extra, &n2.mac));
    assert!(has_mac(&rig.vms[0], &nic.mac), "vm0's NIC kept");
    let health = c0
        .health(ctx(), &pb::HealthRequest::default())
        .await
        .unwrap();
    assert_eq!(health.nics_in_use, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_refuses_a_bad_change_and_survives_garbage() {
    let rig = rig(1);
    let c0 = vm_client(&rig.socket(0)).await;
    let nic = c0
        .attach_nic(ctx(), &attach_req("sb-live"))
        .await
        .unwrap()
        .nic
        .unwrap();
    let before = status(&rig.agent).await;
    let original = std::fs::read_to_string(&rig.agent.config).unwrap();
    let dir = rig.agent.dir.path();
    // The network renamed under a live NIC: refused whole.
    let bridge = rig.bridge.name.clone();
    let renamed = config_text(
        &rig,
        &[("test2", &bridge, &rig.net)],
        &vm_entry("vm0", &rig.vms[0].name, dir),
    );
    std::fs::write(&rig.agent.config, renamed).unwrap();
    sighup(&rig.agent);
    let s = wait_status(&rig.agent, "reload refused", |s| {
        !s.last_reload_error.is_empty()
    })
    .await;
    let cfg = rig.agent.config.display().to_string();
    assert!(
        s.last_reload_error.starts_with(&cfg)
            && s.last_reload_error.contains("network[0] (\"test\")")
            && s.last_reload_error.contains("1 NIC(s)"),
        "{}",
        s.last_reload_error
    );
    assert_eq!(s.config_generation, before.config_generation);
    let health = c0
        .health(ctx(), &pb::HealthRequest::default())
        .await
        .unwrap();
    assert_eq!(health.nics_in_use, 1);
    assert!(has_mac(&rig.vms[0], &nic.mac));
    assert_eq!(rig.agent.leases().len(), 1);

    // The subnet shrunk under the live lease, the VM with the NIC removed:
    // each refused, naming its key.
    let shrunk = AgentProc::agent_section(dir)
        + &format!(
            "[[network]]\nname = \"test\"\nbridge = \"{bridge}\"\nsubnet = \"{0}.0/25\"\ngateway = \"{0}.1\"\n",
            rig.net
        )
        + &vm_entry("vm0", &rig.vms[0].name, dir);
    let no_vm = config_text(&rig, &[("test", &bridge, &rig.net)], "");
    let mut last = s.last_reload_error.clone();
    for (text, key) in [
        (shrunk, "network[0] (\"test\").subnet"),
        (no_vm, "vm[0] (\"vm0\")"),
    ] {
        std::fs::write(&rig.agent.config, text).unwrap();
        sighup(&rig.agent);
        let s = wait_status(&rig.agent, key, |s| s.last_reload_error != last).await;
        assert!(
            s.last_reload_error.starts_with(&cfg)
                && s.last_reload_error.contains(key)
                && s.last_reload_error.contains("1 NIC(s)"),
            "{key}: {}",
            s.last_reload_error
        );
        assert_eq!(s.config_generation, before.config_generation);
        last = s.last_reload_error;
    }
    assert!(rig.socket(0).exists());
    assert_eq!(
        c0.health(ctx(), &pb::HealthRequest::default())
            .await
            .unwrap()
            .nics_in_use,
        1
    );

    // A [[vm]] of the file taking a registered VM's name: refused, both named.
    let ns = Netns::new("clash");
    register(&rig.agent, "dyn", &ns, &sock(&rig, "dyn")).await;
    let generation = status(&rig.agent).await.config_generation;
    let clash =
        original.clone() + &vm_entry("dyn", &ns.name, dir).replace("dyn.sock", "dyn-file.sock");
    std::fs::write(&rig.agent.config, clash).unwrap();
    sighup(&rig.agent);
    let s = wait_status(&rig.agent, "clash refused", |s| s.last_reload_error != last).await;
    assert!(
        s.last_reload_error.contains("registered vm (\"dyn\").name")
            && s.last_reload_error.contains("vm[1] (\"dyn\")"),
        "{}",
        s.last_reload_error
    );
    assert_eq!(s.config_generation, generation);

    // Garbage: logged, kept running.
    std::fs::write(&rig.agent.config, "[[[ not toml\n").unwrap();
    let last = s.last_reload_error.clone();
    sighup(&rig.agent);
    let s = wait_status(&rig.agent, "garbage refused", |s| {
        s.last_reload_error != last
    })
    .await;
    assert!(
        s.last_reload_error.starts_with(&cfg) && s.last_reload_error.contains("line 1"),
        "{}",
        s.last_reload_error
    );
    assert_eq!(s.config_generation, generation);
    let health = c0
        .health(ctx(), &pb::HealthRequest::default())
        .await
        .unwrap();
    assert_eq!(health.vm, "vm0");

    // The original file again: applied (nothing changes), error cleared.
    std::fs::write(&rig.agent.config, original).unwrap();
    sighup(&rig.agent);
    let s = wait_status(&rig.agent, "reload applied", |s| {
        s.last_reload_error.is_empty()
    })
    .await;
    assert_eq!(s.config_generation, generation + 1);
    ok(&ctl(&rig.agent, &["vm", "rm", "dyn"]));
}

/// `UnregisterVm` with force while the VM attaches in a loop: every NIC it
/// got is released (in its namespace, on the host, in the leases), and the
/// attaches after it are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_unregister_during_attaches_leaks_nothing() {
    let rig = rig(1);
    let ns = Netns::new("race");
    let rsock = sock(&rig, "race");
    register(&rig.agent, "race", &ns, &rsock).await;
    let c = vm_client(&rsock).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let looping = {
        let stop = stop.clone();
        let refused = refused.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                i += 1;
                match c.attach_nic(ctx(), &attach_req(&format!("sb-{i}"))).await {
                    Ok(r) => ids.push(r.nic.unwrap().id),
                    Err(_) => {
                        refused.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                    }
                }
                let _ = c
                    .detach_nic(
                        ctx(),
                        &pb::DetachNicRequest {
                            sandbox_id: format!("sb-{}", i - 1),
                            ..Default::default()
                        },
                    )
                    .await;
            }
            ids
        })
    };
    let start = Instant::now();
    while rig.agent.leases().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(20), "no attach");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = admin_client(&rig.agent.admin)
        .await
        .unregister_vm(
            ctx(),
            &pb::UnregisterVmRequest {
                name: "race".into(),
                force: true,
                ..Default::default()
            },
        )
        .await
        .expect("UnregisterVm force");
    assert!(r.released_nics >= 1, "{r:?}");
    // Attaches after it are refused: wait for a few.
    let after = refused.load(std::sync::atomic::Ordering::Acquire);
    let start = Instant::now();
    while refused.load(std::sync::atomic::Ordering::Acquire) < after + 3 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "attaches not refused"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    let ids = looping.await.unwrap();
    assert!(!ids.is_empty());
    assert!(rig.agent.leases().is_empty(), "{:?}", rig.agent.leases());
    assert!(vm(&vms(&rig.agent), "race").is_none());
    for id in &ids {
        assert!(
            host_links(&format!("nlh{id}")).is_empty(),
            "host end of {id} left"
        );
    }
    let left: Vec<_> = ns
        .links()
        .into_iter()
        .filter(|l| l["ifname"] != "lo")
        .collect();
    assert!(left.is_empty(), "links left in the VM namespace: {left:?}");
    assert!(!rsock.exists());
}

/// A VM's connection budget follows its quota when the quota changes live
/// (`nestlessctl vm set --max-nics`): one connection per NIC and 16 more
/// (`vm_budget`). At 100 NICs the 117th connection is refused; after the
/// quota goes to 200 it is served, with the first 116 still open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_quota_change_resizes_the_connection_budget() {
    use nestless_netagent::server::conns::vm_budget;
    let rig = rig(1);
    let ns = Netns::new("qb");
    let s = sock(&rig, "qb");
    ok(&add(
        &rig.agent,
        "qb",
        &ns.name,
        &s.display().to_string(),
        &["--max-nics", "100"],
    ));
    let budget = vm_budget(100);
    assert_eq!(budget, 116);
    async fn health(
        c: nestless_protos::agent_ttrpc::NetAgentClient,
    ) -> ttrpc::Result<pb::HealthResponse> {
        c.health(ctx(), &pb::HealthRequest::default()).await
    }
    let mut held = Vec::new();
    for _ in 0..budget - 1 {
        held.push(tokio::net::UnixStream::connect(&s).await.expect("connect"));
    }
    // The last place of the budget: served (so every earlier one was taken).
    let last = vm_client(&s).await;
    health(last.clone())
        .await
        .expect("the 116th connection is served");
    // One past the budget: closed by the agent.
    assert!(
        health(vm_client(&s).await).await.is_err(),
        "the 117th connection was served with a budget of 116"
    );
    ok(&ctl(&rig.agent, &["vm", "set", "qb", "--max-nics", "200"]));
    let more = vm_client(&s).await;
    let h = health(more).await.expect("served once the quota grew");
    assert_eq!(h.nic_quota, 200);
    // The first connections were kept all along.
    health(last)
        .await
        .expect("the 116th connection is still served");
    drop(held);
}

/// A reload that passes its checks but cannot serve one VM (a file that is
/// not a socket is in the way of its socket) applies the rest, says which
/// VM and why in `last_reload_error`, and leaves that VM unserved; the next
/// reload tries it again (once the path is free it is served), and a VM
/// left unserved can be removed from the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partly_applied_reload_names_the_vm_and_the_next_one_retries_it() {
    let rig = rig(1);
    let (good, blocked) = (Netns::new("pg"), Netns::new("pb"));
    let dir = rig.agent.dir.path();
    let bridge = rig.bridge.name.clone();
    let text = |vms: &[(&str, &Netns)]| {
        let mut entries = vm_entry("vm0", &rig.vms[0].name, dir) + "network = \"test\"\n";
        for (name, ns) in vms {
            entries += &(vm_entry(name, &ns.name, dir) + "network = \"test\"\n");
        }
        config_text(&rig, &[("test", &bridge, &rig.net)], &entries)
    };
    let in_the_way = sock(&rig, "blocked");
    std::fs::write(&in_the_way, "not a socket").unwrap();

    let before = status(&rig.agent).await;
    std::fs::write(
        &rig.agent.config,
        text(&[("good", &good), ("blocked", &blocked)]),
    )
    .unwrap();
    sighup(&rig.agent);
    let partial = wait_status(&rig.agent, "partial reload", |s| {
        s.config_generation > before.config_generation
    })
    .await;
    let e = &partial.last_reload_error;
    assert!(
        e.contains(&in_the_way.display().to_string()) && e.contains("not a socket"),
        "{e}"
    );
    let c = vm_client(&sock(&rig, "good")).await;
    let n = c
        .attach_nic(ctx(), &attach_req("sb-good"))
        .await
        .expect("the VM that could be served is")
        .nic
        .unwrap();
    assert!(has_mac(&good, &n.mac));

    // The path is freed: the next reload (same file) serves the VM.
    std::fs::remove_file(&in_the_way).unwrap();
    sighup(&rig.agent);
    let retried = wait_status(&rig.agent, "retrying reload", |s| {
        s.config_generation > partial.config_generation
    })
    .await;
    assert_eq!(retried.last_reload_error, "", "{retried:?}");
    let b = vm_client(&in_the_way).await;
    b.health(ctx(), &pb::HealthRequest::default())
        .await
        .expect("served once its socket could be bound");
    drop(b);

    // Blocked again and reloaded unserved; then removed from the file.
    std::fs::write(&rig.agent.config, text(&[("good", &good)])).unwrap();
    sighup(&rig.agent);
    let removed = wait_status(&rig.agent, "removing reload", |s| {
        s.config_generation > retried.config_generation
    })
    .await;
    assert_eq!(removed.last_reload_error, "", "{removed:?}");
    std::fs::write(&in_the_way, "not a socket").unwrap();
    std::fs::write(
        &rig.agent.config,
        text(&[("good", &good), ("blocked", &blocked)]),
    )
    .unwrap();
    sighup(&rig.agent);
    let again = wait_status(&rig.agent, "partial reload again", |s| {
        s.config_generation > removed.config_generation
    })
    .await;
    assert!(
        again.last_reload_error.contains("not a socket"),
        "{again:?}"
    );
    std::fs::write(&rig.agent.config, text(&[("good", &good)])).unwrap();
    sighup(&rig.agent);
    let gone = wait_status(&rig.agent, "removing the unserved VM", |s| {
        s.config_generation > again.config_generation
    })
    .await;
    assert_eq!(
        gone.last_reload_error, "",
        "an unserved VM could not be removed: {gone:?}"
    );
    assert!(vm(&vms(&rig.agent), "blocked").is_none());
    assert!(
        in_the_way.exists(),
        "the file in the way is not the agent's to remove"
    );
}
