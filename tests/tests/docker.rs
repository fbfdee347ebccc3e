//! Docker (the daemon of `NESTLESS_DOCKER`: Debian's 26.1.5 or 28.5.2) running
//! containers under `containerd-shim-nestless-v2`, a named runtime of `daemon.json`,
//! against the real host agent. This machine plays the VM, as in `shim_network.rs`.
//!
//! What Docker's network modes mean with nestless (docs/design.md, "Docker"):
//!
//! | `docker run --network` | what the container gets |
//! |---|---|
//! | `none` | the host's NIC, from the shim: address, gateway, reachable from the host |
//! | `container:X` | X's namespace, so X's NIC; no NIC of its own |
//! | `host` | the VM's own network; no NIC |
//! | default, a user bridge | refused at `docker run` with one message: Docker's veth and the host's NIC do not share a namespace |
//!
//! Plus the container's life as Docker drives it: exec, logs, stop / start / restart (a
//! NIC per start, released at each stop), `rm -f`, `--rm`, a restart policy, stats.
//! Run as root, by tests/run.sh's Docker matrix; nothing skips.

use std::time::{Duration, Instant};

use nestless_tests::{
    agent::AgentProc,
    containerd::{Containerd, Options},
    docker::Docker,
    netenv::{random_subnet, require_root, run, Bridge},
};
use serde_json::Value;

/// The agent serving this machine as VM "local", its bridge, Docker on a containerd.
/// (Fields drop in order: Docker and its containers first.)
struct Rig {
    d: Docker,
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
        let c = Containerd::start(Options::default());
        let shim = c.dir().join("shim-agent.toml");
        std::fs::write(
            &shim,
            format!(
                "log_level = \"debug\"\n[agent]\naddress = \"unix://{}\"\nconnect_timeout_ms = 1500\n\
                 request_timeout_ms = 5000\n[network]\nmode = \"agent\"\n",
                agent.local_socket().display()
            ),
        )
        .expect("write the shim config");
        let d = Docker::start(c, &shim);
        Rig {
            d,
            agent,
            bridge,
            net,
        }
    }

    fn records(&self) -> Vec<Value> {
        self.agent.records()
    }

    /// The one NIC the agent has: its address.
    fn one_nic(&self) -> String {
        let r = self.records();
        assert_eq!(r.len(), 1, "one NIC: {r:?}");
        assert_eq!(r[0]["state"], "attached", "{r:?}");
        r[0]["ipv4"].as_str().expect("a leased address").to_owned()
    }

    fn assert_released(&self) {
        assert_eq!(self.records(), Vec::<Value>::new(), "NIC records left");
        assert_eq!(self.agent.leases(), Vec::<Value>::new(), "leases left");
        assert!(self.bridge.ports().is_empty(), "{:?}", self.bridge.ports());
    }

    /// Waits until the agent has `n` NICs (a start or stop Docker does asynchronously).
    fn wait_nics(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.records().len() != n {
            assert!(
                Instant::now() < deadline,
                "{} NICs, not {n}: {:?}",
                self.records().len(),
                self.records()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn exec(&self, name: &str, cmd: &[&str]) -> String {
        let mut a = vec!["exec", name];
        a.extend_from_slice(cmd);
        self.d.docker_ok(&a)
    }

    /// The container has `ip` on eth0, a default route via the bridge, and the host reaches it.
    fn assert_has_nic(&self, name: &str, ip: &str) {
        let addr = self.exec(name, &["ip", "-o", "-4", "addr", "show", "dev", "eth0"]);
        assert!(addr.contains(&format!("inet {ip}/24")), "{addr}");
        let routes = self.exec(name, &["ip", "route"]);
        assert!(
            routes.contains(&format!("default via {}.1 dev eth0", self.net)),
            "{routes}"
        );
        let ping = run(&["busybox", "ping", "-c", "1", "-W", "5", ip]);
        assert!(ping.status.success(), "host -> {name} {ip}: {ping:?}");
    }
}

#[test]
fn network_none_container_lifecycle() {
    let r = Rig::start();
    eprintln!("[docker] {}", r.d.version);
    let a = Docker::run_args(
        &["-d", "--network", "none", "--name", "web"],
        &[
            "sh",
            "-c",
            "echo started; ip -o -4 addr show dev eth0; trap 'exit 0' TERM; while :; do sleep 1; done",
        ],
    );
    r.d.docker_ok(&a);
    let ip = r.one_nic();
    r.assert_has_nic("web", &ip);
    // exec with an exit code, logs.
    let e = r.d.docker(&["exec", "web", "sh", "-c", "echo out; exit 3"]);
    assert_eq!((e.code, e.stdout.trim()), (3, "out"), "{e:?}");
    let logs = r.d.docker_ok(&["logs", "web"]);
    assert!(logs.contains("started") && logs.contains(&ip), "{logs}");

    // stop releases the NIC; start attaches a new one; restart likewise.
    r.d.docker_ok(&["stop", "-t", "5", "web"]);
    r.wait_nics(0);
    r.assert_released();
    r.d.docker_ok(&["start", "web"]);
    let ip2 = r.one_nic();
    r.assert_has_nic("web", &ip2);
    r.d.docker_ok(&["restart", "-t", "5", "web"]);
    r.wait_nics(1);
    let ip3 = r.one_nic();
    r.assert_has_nic("web", &ip3);

    // stats: CPU and memory from the shim's cgroup (network I/O: see docs/design.md).
    let stats = r.d.docker_ok(&[
        "stats",
        "--no-stream",
        "--format",
        "{{.Name}} {{.MemUsage}} {{.NetIO}}",
        "web",
    ]);
    eprintln!("[docker] stats: {}", stats.trim());
    assert!(stats.starts_with("web ") && stats.contains("iB"), "{stats}");

    // container:X shares X's namespace, so its NIC; it gets none of its own.
    let a = Docker::run_args(
        &["--rm", "--network", "container:web"],
        &["ip", "-o", "-4", "addr", "show", "dev", "eth0"],
    );
    let out = r.d.docker_ok(&a);
    assert!(out.contains(&format!("inet {ip3}/24")), "{out}");
    assert_eq!(r.records().len(), 1);

    // rm -f releases it.
    r.d.docker_ok(&["rm", "-f", "web"]);
    r.wait_nics(0);
    r.assert_released();
    r.d.containerd
        .assert_no_shim_left("moby", Duration::from_secs(10));
}

#[test]
fn run_rm_and_a_restart_policy() {
    let r = Rig::start();
    // --rm: the NIC for the run, nothing after it.
    let a = Docker::run_args(
        &["--rm", "--network", "none"],
        &["ip", "-o", "-4", "addr", "show", "dev", "eth0"],
    );
    let out = r.d.docker_ok(&a);
    assert!(out.contains(&format!("inet {}.", r.net)), "{out}");
    assert_eq!(r.d.docker_ok(&["ps", "-aq"]).trim(), "");
    r.wait_nics(0);
    r.assert_released();

    // A restart policy: each run gets a NIC, each exit gives it back.
    let a = Docker::run_args(
        &[
            "-d",
            "--network",
            "none",
            "--restart",
            "on-failure:2",
            "--name",
            "flaky",
        ],
        &["sh", "-c", "ip -o -4 addr show dev eth0; exit 1"],
    );
    r.d.docker_ok(&a);
    r.d.wait_inspect(
        "flaky",
        "{{.State.Status}} {{.RestartCount}}",
        "exited 2",
        Duration::from_secs(60),
    );
    let logs = r.d.docker_ok(&["logs", "flaky"]);
    assert_eq!(
        logs.matches(&format!("inet {}.", r.net)).count(),
        3,
        "a NIC in each of the 3 runs: {logs}"
    );
    r.wait_nics(0);
    r.assert_released();
    r.d.docker_ok(&["rm", "flaky"]);
}

/// Docker's bridge networks and the host's NIC in one namespace: refused at `docker run`
/// with one message, whatever the order Docker sets its veth up in (26: during the create,
/// 28: after it); `--network host` runs on the VM's own network.
#[test]
fn docker_networks_are_refused_host_runs() {
    let r = Rig::start();
    r.d.docker_ok(&["network", "create", "nluser"]);
    for net in ["default", "nluser"] {
        let mut flags = vec!["--rm"];
        if net != "default" {
            flags.extend(["--network", net]);
        }
        let a = Docker::run_args(&flags, &["true"]);
        let res = r.d.docker(&a);
        eprintln!(
            "[docker] {} --network {net}: {}",
            r.d.version,
            res.stderr.trim()
        );
        assert_ne!(res.code, 0, "{net}: {res:?}");
        let said = "which nestless did not put there";
        assert_eq!(res.stderr.matches(said).count(), 1, "{net}: {}", res.stderr);
        assert!(
            res.stderr.contains("--network none"),
            "{net}: {}",
            res.stderr
        );
        assert!(
            !res.stderr.to_lowercase().contains("file exists"),
            "{net}: two NICs fought over a name: {}",
            res.stderr
        );
        r.wait_nics(0);
        r.assert_released();
    }
    assert_eq!(r.d.docker_ok(&["ps", "-aq"]).trim(), "");
    r.d.docker_ok(&["network", "rm", "nluser"]);

    // host: the VM's interfaces, no NIC from the agent.
    let a = Docker::run_args(&["--rm", "--network", "host"], &["ls", "/sys/class/net"]);
    let out = r.d.docker_ok(&a);
    assert!(out.contains(&r.bridge.name), "{out}");
    assert!(r.records().is_empty());
}
