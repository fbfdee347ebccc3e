//! libvirtd restarted under a running agent, as a package upgrade or an
//! operator's `systemctl restart libvirtd` does: the agent's libvirt
//! connections die with it. The agent must reopen both, by itself: its event
//! connection (a reboot in place, which only libvirt's REBOOT event shows,
//! still releases the guest's NICs) and the connection its hot-plugs use (the
//! next attach succeeds). Its own test binary: restarting libvirtd would
//! break the libvirt tests running beside it, and cargo runs test binaries
//! one at a time. Needs root, libvirtd, QEMU and vhost-device-vsock; fails
//! when one is missing. Every wait polls the state it means (libvirtd's
//! client list, the agent's records), never a sleep of a guessed length.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use nestless_protos::agent as pb;
use nestless_tests::{
    agent::{ctx, vm_client, AgentProc},
    libvirt::{domain_dir, require_libvirtd, virsh, virsh_ok, Domain},
    netenv::{check, random_subnet, Bridge},
    vm::READY_MARKER,
};

const BOOT: Duration = Duration::from_secs(240);
const SETTLE: Duration = Duration::from_secs(60);

/// Polls `cond` every 50 ms until it holds; panics with `what` and the
/// agent's log after `timeout`.
fn wait_for(agent: &AgentProc, what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "{what}: not reached within {timeout:?}\n--- agent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn libvirtd_pid() -> Option<i32> {
    let out = Command::new("pgrep")
        .args(["-x", "libvirtd"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
}

/// How many of libvirtd's clients are process `pid` (`virt-admin
/// client-list` / `client-info`, `unix_process_id`).
fn clients_of(pid: u32) -> usize {
    let admin = |args: &[&str]| {
        let out = Command::new("virt-admin")
            .args(["-c", "libvirtd:///system"])
            .args(args)
            .output()
            .expect("run virt-admin (apt-get install libvirt-clients)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    admin(&["client-list", "libvirtd"])
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .filter(|id| {
            admin(&["client-info", "libvirtd", &id.to_string()])
                .lines()
                .any(|l| {
                    l.split_once(':').is_some_and(|(k, v)| {
                        k.trim() == "unix_process_id" && v.trim() == pid.to_string()
                    })
                })
        })
        .count()
}

/// Restarts libvirtd the way this host runs it (systemd, or `libvirtd -d`
/// as `tests/lib/setup.sh` starts it without systemd), and waits until the
/// new one answers.
fn restart_libvirtd() {
    if Path::new("/run/systemd/system").exists() {
        check(&["systemctl", "restart", "libvirtd.service"]);
    } else {
        let pid = libvirtd_pid().expect("libvirtd is running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + SETTLE;
        while Path::new(&format!("/proc/{pid}")).exists() {
            assert!(Instant::now() < deadline, "libvirtd {pid} did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
        check(&["libvirtd", "-d"]);
    }
    let deadline = Instant::now() + SETTLE;
    while !virsh(&["version"]).status.success() {
        assert!(Instant::now() < deadline, "libvirtd does not answer again");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn attach(sb: &str) -> pb::AttachNicRequest {
    pb::AttachNicRequest {
        sandbox_id: sb.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reconnects_after_libvirtd_restarts() {
    require_libvirtd();
    let net = random_subnet();
    let bridge = Bridge::new(Some(&format!("{net}.1/24")));
    let dom = Domain::start(Domain::builder().root_ports(4), domain_dir());
    dom.wait_ready(BOOT);
    let agent = AgentProc::start(|dir| {
        AgentProc::agent_section(dir)
            + &format!(
                "[[network]]\nname = \"n\"\nbridge = \"{}\"\nsubnet = \"{net}.0/24\"\ngateway = \"{net}.1\"\n\
                 [[vm]]\nname = \"lv\"\nbackend = \"libvirt\"\ndomain = \"{}\"\nsocket = \"{}/lv.sock\"\nmax_nics = 4\n",
                bridge.name,
                dom.name,
                dir.display()
            )
    });
    let c = vm_client(&agent.dir.path().join("lv.sock")).await;
    let first = c
        .attach_nic(ctx(), &attach("p1"))
        .await
        .unwrap()
        .nic
        .unwrap();
    assert_eq!(dom.agent_aliases(), vec![first.id.clone()]);
    let pid = agent.pid();
    let before = clients_of(pid);
    eprintln!("the agent holds {before} connection(s) to libvirtd");

    restart_libvirtd();
    // The domain outlived libvirtd, and the new libvirtd sees its NIC.
    assert_eq!(dom.agent_aliases(), vec![first.id.clone()]);
    // The event connection comes back by itself (nothing else of the agent
    // talks to libvirtd before the next attach).
    wait_for(&agent, "the agent's connections reopened", SETTLE, || {
        clients_of(pid) >= before
    });
    // A reboot in place: only the REBOOT event tells the agent.
    virsh_ok(&["reset", &dom.name]);
    wait_for(&agent, "the reset guest's NIC released", SETTLE, || {
        agent.records().is_empty()
    });
    assert!(agent.leases().is_empty());
    // The guest booted again (its console, kept across the reset, shows
    // the ready marker twice): it handles hot-plug and unplug again.
    wait_for(&agent, "the reset guest up again", BOOT, || {
        dom.console().matches(READY_MARKER).count() >= 2
    });
    // Hot-plugs go through a connection opened again.
    let second = c
        .attach_nic(ctx(), &attach("p2"))
        .await
        .unwrap()
        .nic
        .unwrap();
    assert_eq!(dom.agent_aliases(), vec![second.id.clone()]);
    c.detach_nic(
        ctx(),
        &pb::DetachNicRequest {
            sandbox_id: "p2".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(dom.agent_aliases().is_empty(), "{}", dom.live_xml());
}
