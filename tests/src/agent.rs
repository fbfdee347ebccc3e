//! Running the real `nestless-netagent` binary in tests, and talking to it.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use nestless_protos::agent_ttrpc::{AdminClient, NetAgentClient};

/// Path of a binary built from this workspace (`cargo build --workspace`),
/// next to the test executable's directory, or in `$NESTLESS_BIN_DIR`.
pub fn bin_path(name: &str) -> PathBuf {
    let dir = match std::env::var_os("NESTLESS_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().expect("current_exe");
            // target/<profile>/deps/<test> -> target/<profile>
            exe.parent()
                .and_then(Path::parent)
                .expect("target dir")
                .to_path_buf()
        }
    };
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo build --workspace) or set NESTLESS_BIN_DIR",
        p.display()
    );
    p
}

/// A running agent with its own directory (config, state, sockets, log).
pub struct AgentProc {
    /// The private directory.
    pub dir: tempfile::TempDir,
    /// The config file.
    pub config: PathBuf,
    /// The admin socket.
    pub admin: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl AgentProc {
    /// Writes `config(dir)` as the config and starts the agent; `config`
    /// gets the private directory to place state and sockets in. The config
    /// must set `state_dir = "<dir>/state"` and `admin_socket = "<dir>/admin.sock"`
    /// (see [`AgentProc::agent_section`]).
    pub fn start(config: impl FnOnce(&Path) -> String) -> AgentProc {
        let mut a = AgentProc::start_unready(config);
        a.wait_ready(Duration::from_secs(30));
        a
    }

    /// [`AgentProc::start`] without waiting until it serves: to act on it
    /// during its start-up.
    pub fn start_unready(config: impl FnOnce(&Path) -> String) -> AgentProc {
        let dir = tempfile::Builder::new()
            .prefix("nestless-agent-")
            .tempdir()
            .expect("tempdir");
        let cfg = dir.path().join("netagent.toml");
        std::fs::write(&cfg, config(dir.path())).expect("write config");
        let mut a = AgentProc {
            admin: dir.path().join("admin.sock"),
            log: dir.path().join("agent.log"),
            config: cfg,
            dir,
            child: None,
        };
        a.spawn_child();
        a
    }

    /// The `[agent]` section for a private directory.
    pub fn agent_section(dir: &Path) -> String {
        format!(
            "[agent]\nstate_dir = \"{0}/state\"\nadmin_socket = \"{0}/admin.sock\"\nlisten_vsock = false\nunplug_timeout_ms = 5000\n",
            dir.display()
        )
    }

    fn spawn(&mut self, ready_within: Duration) {
        self.spawn_child();
        self.wait_ready(ready_within);
    }

    fn spawn_child(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open agent log");
        let child = Command::new(bin_path("nestless-netagent"))
            .arg("--config")
            .arg(&self.config)
            .arg("--log-level")
            .arg("debug")
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn nestless-netagent");
        self.child = Some(child);
    }

    /// Waits until the admin socket accepts connections: the agent binds it
    /// last, after recovering and binding every VM's socket, so the agent
    /// serves from then on. Panics (with the agent's log) if the agent exits
    /// or the deadline passes.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let start = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait().expect("try_wait") {
                    panic!(
                        "nestless-netagent exited ({status}) during start:\n{}",
                        self.log()
                    );
                }
            }
            if std::os::unix::net::UnixStream::connect(&self.admin).is_ok() {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "agent not ready within {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until the agent exits by itself (or by a signal the test sent).
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        self.child
            .take()
            .expect("agent running")
            .wait()
            .expect("wait agent")
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("agent running");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        c.wait().expect("wait agent")
    }

    /// Starts the agent again (after [`AgentProc::kill9`] or [`AgentProc::stop`]).
    pub fn restart(&mut self) {
        self.restart_within(Duration::from_secs(30));
    }

    /// [`AgentProc::restart`], ready within `timeout` (recovery of many NICs).
    pub fn restart_within(&mut self, timeout: Duration) {
        assert!(self.child.is_none(), "agent still running");
        self.spawn(timeout);
    }

    /// Runs the agent binary on this config with `args` until it exits
    /// (at most `timeout`; killed then): its exit status and its output.
    pub fn run_once(&self, args: &[&str], timeout: Duration) -> (std::process::ExitStatus, String) {
        assert!(self.child.is_none(), "agent still running");
        let out = self.dir.path().join("run-once.log");
        let f = std::fs::File::create(&out).expect("create run-once log");
        let mut c = Command::new(bin_path("nestless-netagent"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdout(f.try_clone().expect("dup log"))
            .stderr(f)
            .spawn()
            .expect("spawn nestless-netagent");
        let start = Instant::now();
        let status = loop {
            if let Some(s) = c.try_wait().expect("try_wait") {
                break s;
            }
            if start.elapsed() > timeout {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "nestless-netagent {args:?} still running after {timeout:?}:\n{}",
                    std::fs::read_to_string(&out).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (status, std::fs::read_to_string(&out).unwrap_or_default())
    }

    /// The agent's state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Replaces the stored state with `state` (the shape [`AgentProc::state`]
    /// returns; the agent must be down).
    pub fn write_state(&self, state: &serde_json::Value) {
        use nestless_netagent::state::{sqlite::SqliteStore, NicRecord, State};
        assert!(self.child.is_none(), "agent still running");
        let nics: Vec<NicRecord> =
            serde_json::from_value(state["nics"].clone()).expect("records in the state given");
        let last_leased = serde_json::from_value(state["last_leased"].clone()).unwrap_or_default();
        SqliteStore::open(&self.state_dir())
            .and_then(|mut db| db.replace(&State { nics, last_leased }))
            .expect("write the state database");
    }

    /// Writes `state.json` as an agent before the database wrote it (the
    /// agent must be down; its next start imports it).
    pub fn write_legacy_state(&self, state: &serde_json::Value) {
        assert!(self.child.is_none(), "agent still running");
        std::fs::create_dir_all(self.state_dir()).expect("state dir");
        std::fs::write(
            self.state_dir().join("state.json"),
            serde_json::to_vec_pretty(state).expect("JSON"),
        )
        .expect("write state.json");
    }

    /// The stored state, read as another process reads it while the agent
    /// runs, in the shape of the old `state.json`:
    /// `{"version": 1, "nics": [record...], "last_leased": {network: address}}`.
    pub fn state(&self) -> serde_json::Value {
        let (_, state) = nestless_netagent::state::read_dir(
            &self.state_dir(),
            nestless_netagent::state::StoreKind::Sqlite,
        )
        .expect("the agent's state is readable");
        serde_json::json!({
            "version": nestless_netagent::state::STATE_VERSION,
            "nics": state.nics,
            "last_leased": state.last_leased,
        })
    }

    /// An agent serving this machine as VM "local" (netns backend, NICs put into
    /// `vm_netns`, e.g. `/proc/self/ns/net`) on `<dir>/local.sock`, network "n" on
    /// `bridge` with subnet `<net>.0/24` and gateway `<net>.1`.
    pub fn local_vm(bridge: &str, net: &str, vm_netns: &str) -> AgentProc {
        AgentProc::start(|dir| {
            format!(
                "{}[[network]]\nname = \"n\"\nbridge = \"{bridge}\"\nsubnet = \"{net}.0/24\"\n\
                 gateway = \"{net}.1\"\n[[vm]]\nname = \"local\"\nbackend = \"netns\"\n\
                 netns = \"{vm_netns}\"\nsocket = \"{}/local.sock\"\n",
                AgentProc::agent_section(dir),
                dir.display()
            )
        })
    }

    /// The socket of VM "local" of [`AgentProc::local_vm`].
    pub fn local_socket(&self) -> PathBuf {
        self.dir.path().join("local.sock")
    }

    /// The NIC records of the state file (readable with the agent down).
    pub fn records(&self) -> Vec<serde_json::Value> {
        self.state()["nics"].as_array().cloned().unwrap_or_default()
    }

    /// `nestlessctl COMMAND --json` on the admin socket, parsed.
    pub fn ctl_json(&self, command: &str) -> serde_json::Value {
        let out = Command::new(bin_path("nestlessctl"))
            .args([command, "--json", "--socket"])
            .arg(&self.admin)
            .output()
            .expect("run nestlessctl");
        assert!(
            out.status.success(),
            "nestlessctl {command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("nestlessctl {command} --json: {e}"))
    }

    /// The leases the agent reports (`nestlessctl leases --json`).
    pub fn leases(&self) -> Vec<serde_json::Value> {
        self.ctl_json("leases")
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The agent's view of the Hostlo pods (`nestlessctl hostlo --json`).
    pub fn hostlo(&self) -> serde_json::Value {
        self.ctl_json("hostlo")
    }
}

impl AgentProc {
    /// Deletes the host links this agent made and a SIGKILL left behind:
    /// those marked with its owner alias, and Hostlo segments (`nls*`) with
    /// the MAC the agent gives its own segments (a segment made but not yet
    /// marked). A VM's veths go with its namespace and taps with QEMU;
    /// segments would stay on the host for good. Best effort: a test's
    /// cleanup must not hide its outcome.
    fn delete_owned_links(&self) {
        let owner = nestless_netagent::links::owner_alias(&self.state_dir());
        let Ok(out) = Command::new("ip")
            .args(["-j", "-d", "link", "show"])
            .output()
        else {
            return;
        };
        let links: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        for l in &links {
            let Some(name) = l["ifname"].as_str() else {
                continue;
            };
            let mine = l["ifalias"].as_str() == Some(owner.as_str())
                || (name.starts_with(nestless_netagent::names::SEGMENT_PREFIX)
                    && l["address"].as_str()
                        == Some(
                            nestless_netagent::names::owned_bridge_mac(name, &owner)
                                .to_string()
                                .as_str(),
                        ));
            if mine {
                let _ = Command::new("ip").args(["link", "del", name]).output();
            }
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill9();
        self.delete_owned_links();
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.log());
        }
    }
}

/// A NetAgent client over a VM's unix socket.
pub async fn vm_client(socket: &Path) -> NetAgentClient {
    let c = ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display()))
        .await
        .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    NetAgentClient::new(c)
}

/// An Admin client.
pub async fn admin_client(socket: &Path) -> AdminClient {
    let c = ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display()))
        .await
        .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    AdminClient::new(c)
}

/// A request context with a deadline.
pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(30_000_000_000)
}

/// The status code and message of a failed call.
pub fn status_of(e: &ttrpc::Error) -> (ttrpc::Code, String) {
    match e {
        ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
        other => (ttrpc::Code::UNKNOWN, other.to_string()),
    }
}

/// Netns "VMs" served by one agent with the netns backend. With
/// [`NetnsVms::start`], all on network `net_name` on one test bridge and a
/// random /24 (`<net>.1` the gateway on the bridge); with
/// [`NetnsVms::start_tenants`], one network per group of VMs. VM `vm<i>` is in
/// namespace `ns_tag<i>` with socket `<dir>/vm<i>.sock` and quota `max_nics`.
/// Needs root (fails loudly without it).
pub struct NetnsVms {
    pub agent: AgentProc,
    /// The first network's bridge.
    pub bridge: crate::netenv::Bridge,
    /// The other networks' bridges (`start_tenants`).
    pub more_bridges: Vec<crate::netenv::Bridge>,
    pub vms: Vec<crate::netenv::Netns>,
    /// The first network's /24 prefix, e.g. `10.77.3`.
    pub net: String,
}

impl NetnsVms {
    pub fn start(vms: usize, max_nics: u32, net_name: &str, ns_tag: &str) -> NetnsVms {
        NetnsVms::start_with(&vec![net_name.to_string(); vms], max_nics, ns_tag, "")
    }

    /// `networks` tenant networks `t0`, `t1`, ... (each its own bridge and
    /// /24) of `per_network` VMs each: VM `vm<i>` is on `t<i / per_network>`.
    /// `agent_keys` go into the `[agent]` section.
    pub fn start_tenants(
        networks: usize,
        per_network: usize,
        max_nics: u32,
        ns_tag: &str,
        agent_keys: &str,
    ) -> NetnsVms {
        let nets: Vec<String> = (0..networks * per_network)
            .map(|i| format!("t{}", i / per_network))
            .collect();
        NetnsVms::start_with(&nets, max_nics, ns_tag, agent_keys)
    }

    /// VM `vm<i>` on network `vm_nets[i]`, each distinct network on a bridge
    /// and /24 of its own.
    fn start_with(vm_nets: &[String], max_nics: u32, ns_tag: &str, agent_keys: &str) -> NetnsVms {
        use crate::netenv::{random_subnet, require_root, Bridge, Netns};
        require_root();
        let mut names: Vec<&String> = Vec::new();
        for n in vm_nets {
            if !names.contains(&n) {
                names.push(n);
            }
        }
        let mut subnets: Vec<String> = Vec::new();
        while subnets.len() < names.len().max(1) {
            let s = random_subnet();
            if !subnets.contains(&s) {
                subnets.push(s);
            }
        }
        let mut bridges: Vec<Bridge> = subnets
            .iter()
            .map(|net| Bridge::new(Some(&format!("{net}.1/24"))))
            .collect();
        let vms: Vec<Netns> = (0..vm_nets.len())
            .map(|i| Netns::new(&format!("{ns_tag}{i}")))
            .collect();
        let agent = AgentProc::start(|dir| {
            let mut s = AgentProc::agent_section(dir);
            s += agent_keys;
            for ((name, net), bridge) in names.iter().zip(&subnets).zip(&bridges) {
                s += &format!(
                    "[[network]]\nname = \"{name}\"\nbridge = \"{}\"\nsubnet = \"{net}.0/24\"\ngateway = \"{net}.1\"\n",
                    bridge.name
                );
            }
            for (i, (ns, net)) in vms.iter().zip(vm_nets).enumerate() {
                s += &format!(
                    "[[vm]]\nname = \"vm{i}\"\nbackend = \"netns\"\nnetns = \"{}\"\nnetwork = \"{net}\"\nsocket = \"{}/vm{i}.sock\"\nmax_nics = {max_nics}\n",
                    ns.name,
                    dir.display()
                );
            }
            s
        });
        let bridge = bridges.remove(0);
        NetnsVms {
            agent,
            bridge,
            more_bridges: bridges,
            vms,
            net: subnets.swap_remove(0),
        }
    }

    /// VM `i`'s socket.
    pub fn socket(&self, i: usize) -> PathBuf {
        self.agent.dir.path().join(format!("vm{i}.sock"))
    }
}
