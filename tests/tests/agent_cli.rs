//! The agent binary's command line and packaging: `--check-config` on the
//! shipped examples and on broken files, a state file that no longer fits the
//! config (refused, then `--release-stale`), the systemd unit's commands,
//! sd_notify readiness, and the admin socket refusing non-root callers.

use std::{
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use nestless_protos::agent as pb;
use nestless_tests::{
    agent::{bin_path, ctx, vm_client, AgentProc},
    netenv::{host_links, random_subnet, require_root, run, Bridge, Netns},
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn check_config(path: &Path) -> (i32, String) {
    let out = Command::new(bin_path("nestless-netagent"))
        .arg("--config")
        .arg(path)
        .arg("--check-config")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn shipped_examples_are_valid() {
    for f in ["config/netagent.toml", "config/netagent-single-host.toml"] {
        let (code, text) = check_config(&repo().join(f));
        assert_eq!(code, 0, "{f}: {text}");
        assert!(text.contains("valid"), "{text}");
    }
}

#[test]
fn broken_files_name_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[agent]\nstat_dir = \"/x\"\n", "stat_dir"),
        (
            "[[network]]\nname = \"n\"\nbridge = \"br0\"\nsubnet = \"10.0.0.0/33\"\ngateway = \"10.0.0.1\"\n",
            "network[0] (\"n\").subnet",
        ),
        (
            "[[network]]\nname = \"n\"\nbridge = \"br0\"\nsubnet = \"10.0.0.0/24\"\ngateway = \"10.1.0.1\"\n",
            "network[0] (\"n\").gateway",
        ),
        ("[agent]\nmac_prefix = \"zz:00\"\n", "agent.mac_prefix"),
        (
            "[[network]]\nname = \"n\"\nbridge = \"br0\"\nsubnet = \"10.0.0.0/24\"\ngateway = \"10.0.0.1\"\n\
             [[vm]]\nname = \"a\"\nbackend = \"netns\"\nnetns = \"x\"\ncid = 7\n\
             [[vm]]\nname = \"b\"\nbackend = \"netns\"\nnetns = \"y\"\ncid = 7\n",
            "vm[1] (\"b\").cid",
        ),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let p = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&p, text).unwrap();
        let (code, out) = check_config(&p);
        assert_eq!(code, 2, "{out}");
        assert!(
            out.contains(&p.display().to_string()) && out.contains(key),
            "expected file and {key:?} in: {out}"
        );
    }
    let (code, out) = check_config(&dir.path().join("missing.toml"));
    assert_eq!(code, 2);
    assert!(out.contains("missing.toml"), "{out}");
}

#[test]
fn systemd_unit_runs_the_binary_with_flags_it_accepts() {
    let unit = std::fs::read_to_string(repo().join("config/nestless-netagent.service")).unwrap();
    let get = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(get("Type"), ["notify"]);
    // systemctl reload is a SIGHUP: the agent reads its file again.
    assert_eq!(get("ExecReload"), ["/bin/kill -HUP $MAINPID"]);
    let exec = get("ExecStart");
    assert_eq!(exec.len(), 1);
    let argv: Vec<&str> = exec[0].split_whitespace().collect();
    assert!(argv[0].ends_with("/nestless-netagent"));
    // The same flags, with the shipped example as the file, must be accepted.
    let pre = get("ExecStartPre");
    let pre_argv: Vec<&str> = pre[0].split_whitespace().collect();
    assert!(pre_argv.contains(&"--check-config"));
    let example = repo().join("config/netagent.toml");
    let args: Vec<String> = pre_argv[1..]
        .iter()
        .map(|a| {
            if a.ends_with(".toml") {
                example.display().to_string()
            } else {
                a.to_string()
            }
        })
        .collect();
    let out = Command::new(bin_path("nestless-netagent"))
        .args(&args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    if Path::new("/usr/bin/systemd-analyze").exists() {
        // Syntax check of the unit (systemd-analyze warns about the absent binary; that is fine).
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(repo().join("config/nestless-netagent.service"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        for line in err.lines() {
            assert!(
                line.contains("nestless-netagent")
                    && (line.contains("No such file")
                        || line.contains("is not executable")
                        || line.contains("Command")),
                "systemd-analyze: {line}"
            );
        }
    }
}

#[test]
fn notifies_systemd_when_ready_and_refuses_non_root_admins() {
    require_root();
    let net = random_subnet();
    let bridge = Bridge::new(Some(&format!("{net}.1/24")));
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let cfg = dir.path().join("a.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}[[network]]\nname = \"n\"\nbridge = \"{}\"\nsubnet = \"{net}.0/24\"\ngateway = \"{net}.1\"\n",
            AgentProc::agent_section(dir.path()),
            bridge.name
        ),
    )
    .unwrap();
    let mut child = KillOnDrop(
        Command::new(bin_path("nestless-netagent"))
            .arg("--config")
            .arg(&cfg)
            .env("NOTIFY_SOCKET", &notify)
            .spawn()
            .unwrap(),
    );
    let mut buf = [0u8; 256];
    // A signal may interrupt the wait (EINTR): wait again.
    let recv = |buf: &mut [u8]| loop {
        match sock.recv(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => break other,
        }
    };
    let n = recv(&mut buf).expect("no sd_notify message");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    // A non-root caller is dropped at accept; root gets an answer.
    let admin = dir.path().join("admin.sock");
    let as_nobody = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin_path("nestlessctl"))
        .args(["status", "--socket"])
        .arg(&admin)
        .output()
        .unwrap();
    assert!(
        !as_nobody.status.success(),
        "a non-root caller got an answer: {as_nobody:?}"
    );
    let as_root = Command::new(bin_path("nestlessctl"))
        .args(["status", "--socket"])
        .arg(&admin)
        .output()
        .unwrap();
    assert!(as_root.status.success(), "{as_root:?}");
    // A reload (SIGHUP, systemctl reload): RELOADING=1 with the
    // MONOTONIC_USEC systemd 253+ demands with it, then READY=1 again.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let n = recv(&mut buf).expect("no RELOADING message");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(
        msg.contains("RELOADING=1") && msg.contains("MONOTONIC_USEC="),
        "{msg}"
    );
    let n = recv(&mut buf).expect("no READY message after the reload");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let n = recv(&mut buf).expect("no STOPPING message");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    assert!(child.0.wait().unwrap().success());
}

/// A child process killed if the test fails before it exits (a leftover
/// agent would hold the harness's output open).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// With `listen_vsock = true` the agent listens on AF_VSOCK (any CID, the
/// configured port) beside the VMs' unix sockets. (A VM's connection over it
/// needs a guest; this machine has AF_VSOCK but no loopback transport.)
#[test]
fn listens_on_af_vsock_when_asked() {
    require_root();
    assert!(
        Path::new("/dev/vsock").exists(),
        "/dev/vsock is missing: this host has no AF_VSOCK (load vhost_vsock)"
    );
    let net = random_subnet();
    let bridge = Bridge::new(Some(&format!("{net}.1/24")));
    let port = 20000 + rand::random::<u32>() % 20000;
    let agent = AgentProc::start(|dir| {
        format!(
            "{}vsock_port = {port}\n[[network]]\nname = \"n\"\nbridge = \"{}\"\n\
             subnet = \"{net}.0/24\"\ngateway = \"{net}.1\"\n[[vm]]\nname = \"vm3\"\n\
             backend = \"netns\"\nnetns = \"/proc/self/ns/net\"\ncid = 3\n",
            AgentProc::agent_section(dir).replace("listen_vsock = false", "listen_vsock = true"),
            bridge.name
        )
    });
    // The agent holds the port: binding it again fails (ss cannot list AF_VSOCK
    // sockets without the vsock_diag module, which this kernel lacks).
    let err = vsock::VsockListener::bind_with_cid_port(vsock::VMADDR_CID_ANY, port)
        .expect_err("the agent listens on the port");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::AddrInUse,
        "{err}\nagent log:\n{}",
        agent.log()
    );
    // Once the agent is gone, the port is free.
    drop(agent);
    vsock::VsockListener::bind_with_cid_port(vsock::VMADDR_CID_ANY, port)
        .expect("the port is free after the agent");
}

/// Runs the agent binary with `args` until it exits by itself (it must: it
/// refuses to start, or does a one-shot job); (exit code, stdout + stderr).
fn run_to_exit(config: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(bin_path("nestless-netagent"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// Network `blue` renamed `green` while sandbox `old` has 10.x.y.2: the
/// agent refuses to start (and `--check-config` says so), naming the state
/// file, the config file and the key; `--release-stale` unplugs the old NIC
/// and exits; the agent then starts, and a new sandbox and a retried `old`
/// each get a NIC of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_network_is_refused_until_released() {
    require_root();
    let net = random_subnet();
    let bridge = Bridge::new(Some(&format!("{net}.1/24")));
    let vm = Netns::new("ren");
    let config = |name: &str, dir: &Path| {
        format!(
            "{}[[network]]\nname = \"{name}\"\nbridge = \"{}\"\nsubnet = \"{net}.0/24\"\n\
             gateway = \"{net}.1\"\n[[vm]]\nname = \"vm0\"\nbackend = \"netns\"\n\
             netns = \"{}\"\nsocket = \"{}/vm0.sock\"\n",
            AgentProc::agent_section(dir),
            bridge.name,
            vm.name,
            dir.display()
        )
    };
    let mut agent = AgentProc::start(|dir| config("blue", dir));
    let sock = agent.dir.path().join("vm0.sock");
    let attach = |sb: &str| pb::AttachNicRequest {
        sandbox_id: sb.into(),
        ..Default::default()
    };
    let old = vm_client(&sock)
        .await
        .attach_nic(ctx(), &attach("old"))
        .await
        .unwrap()
        .nic
        .unwrap();
    assert_eq!(old.addresses[0].address, format!("{net}.2"));
    let old_host_if = format!("nlh{}", old.id);
    assert!(!host_links(&old_host_if).is_empty());
    assert!(agent.stop().success());
    std::fs::write(&agent.config, config("green", agent.dir.path())).unwrap();

    let state = agent.dir.path().join("state/state.db");
    let names_it = |text: &str| {
        for want in [
            format!("state file {}", state.display()),
            format!("config {}", agent.config.display()),
            format!(
                "NIC {} (VM vm0, sandbox \"old\", {net}.2 on \"blue\")",
                old.id
            ),
            "network \"blue\" is not in the config (key [[network]] name)".to_string(),
            "nestless-netagent --release-stale".to_string(),
        ] {
            assert!(text.contains(&want), "{text}\nlacks {want:?}");
        }
    };
    let (code, text) = run_to_exit(&agent.config, &["--check-config"]);
    assert_eq!(code, 2, "{text}");
    names_it(&text);
    let (code, text) = run_to_exit(&agent.config, &[]);
    assert_eq!(
        code, 1,
        "the agent started with a record of a network it lacks: {text}"
    );
    names_it(&text);
    assert!(
        !host_links(&old_host_if).is_empty(),
        "a refusal changes nothing"
    );

    let (code, text) = run_to_exit(&agent.config, &["--release-stale"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("released 1 NIC(s)"), "{text}");
    assert!(
        host_links(&old_host_if).is_empty(),
        "the old NIC is unplugged"
    );
    assert!(agent.records().is_empty(), "{:?}", agent.records());
    let (code, text) = run_to_exit(&agent.config, &["--check-config"]);
    assert_eq!(code, 0, "{text}");

    agent.restart();
    let c = vm_client(&sock).await;
    let new = c.attach_nic(ctx(), &attach("new")).await.unwrap();
    let again = c.attach_nic(ctx(), &attach("old")).await.unwrap();
    assert!(again.created, "the retried sandbox gets a NIC of its own");
    let (a, b) = (new.nic.unwrap(), again.nic.unwrap());
    assert_eq!(a.addresses[0].address, format!("{net}.2"));
    assert_ne!(a.addresses[0].address, b.addresses[0].address);
    assert_eq!(b.network, "green");
}

/// A network's NIC as the guest configures it (MTU, both addresses, both
/// default routes, the extra routes), on a veth in a fresh namespace: the
/// first command the kernel refuses, if any.
fn kernel_refuses(mtu: u32, routes: &[(&str, Option<&str>)]) -> Option<String> {
    let ns = Netns::new("kc");
    let ip = |args: &str| -> Result<(), String> {
        let argv: Vec<&str> = ["ip", "-n", ns.name.as_str()]
            .into_iter()
            .chain(args.split_whitespace())
            .collect();
        let out = run(&argv);
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip {args}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    let setup = [
        "link add d0 type veth peer name d1".to_string(),
        "link set d1 up".to_string(),
        format!("link set d0 mtu {mtu} up"),
        "addr add 10.20.30.2/24 dev d0".to_string(),
        "-6 addr add fd00:20::2/64 dev d0 nodad".to_string(),
        "route add 0.0.0.0/0 via 10.20.30.254 dev d0".to_string(),
        "-6 route add ::/0 via fd00:20::1 dev d0".to_string(),
    ];
    let extra = routes.iter().map(|(dest, gw)| {
        let family = if dest.contains(':') { "-6 " } else { "" };
        match gw {
            Some(g) => format!("{family}route add {dest} via {g} dev d0"),
            None => format!("{family}route add {dest} dev d0"),
        }
    });
    setup
        .into_iter()
        .chain(extra)
        .find_map(|cmd| ip(&cmd).err())
}

/// Issue 9, item 7: `--check-config` refuses a network exactly when the
/// kernel would refuse its NICs (this machine's kernel, on a veth): an MTU
/// IPv6 cannot use, a route whose gateway is off the link or is the NIC's
/// own or the broadcast address, a destination with host bits, a route
/// given twice, the default or the subnet's route again, an MTU out of the
/// link's range; and the edges it accepts, the kernel takes. (The rules
/// that go beyond the kernel, such as a gateway at the network address or
/// in the lease range, are policy: see the config's unit tests.)
#[test]
fn check_config_refuses_what_the_kernel_refuses() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    type Route = (&'static str, Option<&'static str>);
    let cases: &[(u32, &[Route], Option<&str>)] = &[
        (
            1280,
            &[
                ("10.50.0.0/16", Some("10.20.30.250")),
                ("fd50::/48", Some("fd00:20::fa")),
            ],
            None,
        ),
        (1279, &[], Some(".mtu")),
        (67, &[], Some(".mtu")),
        (65536, &[], Some(".mtu")),
        (
            1500,
            &[("10.50.0.0/16", Some("10.99.0.1"))],
            Some(".routes[0].gateway"),
        ),
        (
            1500,
            &[("fd50::/48", Some("fd99::1"))],
            Some(".routes[0].gateway"),
        ),
        (
            1500,
            &[("10.50.0.0/16", Some("10.20.30.255"))],
            Some(".routes[0].gateway"),
        ),
        (
            1500,
            &[("fd50::/48", Some("fd00:20::2"))],
            Some(".routes[0].gateway"),
        ),
        (
            1500,
            &[("10.50.0.1/16", Some("10.20.30.254"))],
            Some(".routes[0].destination"),
        ),
        (
            1500,
            &[
                ("10.50.0.0/16", Some("10.20.30.254")),
                ("10.50.0.0/16", Some("10.20.30.250")),
            ],
            Some(".routes[1].destination"),
        ),
        (
            1500,
            &[("0.0.0.0/0", Some("10.20.30.250"))],
            Some(".routes[0].destination"),
        ),
        (
            1500,
            &[("::/0", Some("fd00:20::fa"))],
            Some(".routes[0].destination"),
        ),
        (
            1500,
            &[("10.20.30.0/24", None)],
            Some(".routes[0].destination"),
        ),
    ];
    for (i, (mtu, routes, key)) in cases.iter().enumerate() {
        let toml_routes: Vec<String> = routes
            .iter()
            .map(|(d, g)| match g {
                Some(g) => format!("{{ destination = \"{d}\", gateway = \"{g}\" }}"),
                None => format!("{{ destination = \"{d}\" }}"),
            })
            .collect();
        let p = dir.path().join(format!("k{i}.toml"));
        std::fs::write(
            &p,
            format!(
                "[[network]]\nname = \"n\"\nbridge = \"br0\"\nsubnet = \"10.20.30.0/24\"\n\
                 gateway = \"10.20.30.254\"\nrange_end = \"10.20.30.200\"\nsubnet6 = \"fd00:20::/64\"\n\
                 gateway6 = \"fd00:20::1\"\nmtu = {mtu}\nroutes = [{}]\n",
                toml_routes.join(", ")
            ),
        )
        .unwrap();
        let (code, out) = check_config(&p);
        let kernel = kernel_refuses(*mtu, routes);
        match key {
            None => {
                assert_eq!(code, 0, "case {i}: {out}");
                assert_eq!(
                    kernel, None,
                    "case {i}: the check accepts what the kernel refuses"
                );
            }
            Some(key) => {
                assert_eq!(
                    code, 2,
                    "case {i}: accepted, but the kernel says {kernel:?}"
                );
                assert!(out.contains(key), "case {i}: {key} not named: {out}");
                assert!(
                    kernel.is_some(),
                    "case {i}: the check refuses ({out}) what the kernel takes"
                );
            }
        }
    }
}

/// A SIGTERM (or SIGINT) during start-up is a clean exit (status 0, said in
/// the log), never the signal's default action: the handlers are installed
/// before anything else. The agent is held in recovery by a VM whose QMP
/// socket accepts and never greets; the test signals it once that socket
/// has the agent's connection. (Found as a flake: a SIGTERM sent as soon as
/// the admin socket answered killed the agent, whose handler came later.)
#[test]
fn a_signal_during_start_up_is_a_clean_exit() {
    require_root();
    for sig in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
    ] {
        let net = random_subnet();
        let bridge = Bridge::new(Some(&format!("{net}.1/24")));
        let qmp_dir = tempfile::tempdir().unwrap();
        let qmp = qmp_dir.path().join("stuck.qmp");
        let listener = std::os::unix::net::UnixListener::bind(&qmp).unwrap();
        let mut agent = AgentProc::start_unready(|dir| {
            AgentProc::agent_section(dir)
                + "qmp_timeout_ms = 60000\n"
                + &format!(
                    "[[network]]\nname = \"n\"\nbridge = \"{}\"\nsubnet = \"{net}.0/24\"\ngateway = \"{net}.1\"\n\
                     [[vm]]\nname = \"vm0\"\nbackend = \"qemu\"\nqmp_socket = \"{}\"\nsocket = \"{}/vm0.sock\"\n",
                    bridge.name,
                    qmp.display(),
                    dir.display()
                )
        });
        // The agent is in recovery, waiting for the QMP greeting.
        let (_conn, _) = listener.accept().unwrap();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent.pid() as i32), sig).unwrap();
        let status = agent.wait_exit();
        let log = agent.log();
        assert!(status.success(), "{sig}: exited {status}:\n{log}");
        assert!(
            log.contains(&format!("{} during start-up", sig.as_str())),
            "{log}"
        );
        assert!(!agent.dir.path().join("vm0.sock").exists(), "{log}");
    }
}
