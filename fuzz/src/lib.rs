//! What the fuzz targets share: a scratch directory, a runtime, and an
//! agent over fakes (`FakeQemu`, `FakeLinks`) so that a fuzzed request,
//! config or state file drives the real agent core and nothing outside the
//! process. Every target asserts nothing but "no panic": a panic (or an
//! abort, a hang past libFuzzer's timeout, an out-of-memory) is the finding.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
    time::Duration,
};

use nestless_netagent::{
    agent::{Agent, AttachRequest, HostloJoin},
    backend::{fake::FakeQemu, qemu::QemuBackend, VmBackend},
    config::Config,
    error::AgentError,
    hostlo::{Part, PodName},
    links::fake::FakeLinks,
    names::SandboxId,
    server::convert,
    stale::StalePolicy,
};

/// The config the request and state targets serve: two tenant networks
/// (one dual-stack, one with a range of 3 addresses so that it runs out),
/// three VMs, a warm pool.
pub const CONFIG: &str = r#"
[agent]
state_dir = "/nonexistent"
unplug_timeout_ms = 50
qmp_timeout_ms = 50

[[network]]
name = "a"
bridge = "nlfuzza"
subnet = "10.9.0.0/24"
gateway = "10.9.0.1"
range_end = "10.9.0.200"
subnet6 = "fd00:9::/64"
gateway6 = "fd00:9::1"
routes = [{ destination = "10.0.0.0/8", gateway = "10.9.0.254" }]

[[network]]
name = "b"
bridge = "nlfuzzb"
subnet = "10.10.0.0/24"
gateway = "10.10.0.1"
range_start = "10.10.0.2"
range_end = "10.10.0.4"

[[vm]]
name = "vm0"
backend = "qemu"
qmp_socket = "/nonexistent/q0"
cid = 3
network = "a"
max_nics = 6
warm_pool = 1

[[vm]]
name = "vm1"
backend = "qemu"
qmp_socket = "/nonexistent/q1"
cid = 4
network = "a"

[[vm]]
name = "vm2"
backend = "qemu"
qmp_socket = "/nonexistent/q2"
cid = 5
network = "b"
"#;

/// The served VMs of [`CONFIG`].
pub const VMS: [&str; 3] = ["vm0", "vm1", "vm2"];

/// A directory of this process for state files: on tmpfs when there is one
/// (every agent operation fsyncs its state file).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("nestless-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
    })
}

/// The path of the state file in [`scratch`]: a `state.json` as an agent
/// before the database wrote it, which the first open imports.
pub fn state_path() -> PathBuf {
    scratch().join("state.json")
}

/// Removes every state file of [`scratch`] (the database, its WAL, a
/// `state.json` and its imported copy): the next agent starts empty.
pub fn clear_state() {
    for name in [
        "state.db",
        "state.db-wal",
        "state.db-shm",
        "state.json",
        "state.json.migrated",
        "vms.json",
    ] {
        let _ = std::fs::remove_file(scratch().join(name));
    }
}

/// Writes `data` as the [`state_path`] file, with no database beside it:
/// every input goes through the import as well as the loader.
pub fn fresh_state(data: &[u8]) {
    clear_state();
    if std::fs::write(state_path(), data).is_err() {
        panic!("cannot write {}", state_path().display());
    }
}

/// One current-thread runtime for the whole run.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// [`CONFIG`], its state in [`scratch`].
pub fn config() -> Config {
    let mut c = Config::parse(Path::new("fuzz.toml"), CONFIG).expect("the fuzz config is valid");
    c.agent.state_dir = scratch().to_path_buf();
    c
}

/// An agent for `config` over fakes, every VM of it served. `config`'s
/// state dir must be [`scratch`]: the agent writes its state file there.
pub fn agent(config: Config, stale: StalePolicy) -> Result<Agent, AgentError> {
    assert_eq!(
        config.agent.state_dir,
        scratch(),
        "state files go to the scratch dir only"
    );
    let links = Arc::new(FakeLinks::default());
    let backends: HashMap<String, Arc<dyn VmBackend>> = config
        .vms
        .iter()
        .map(|vm| {
            let b: Arc<dyn VmBackend> = Arc::new(QemuBackend::new(
                &vm.name,
                Arc::new(FakeQemu::new(8)),
                links.clone(),
                vec![],
                Duration::from_millis(50),
            ));
            (vm.name.clone(), b)
        })
        .collect();
    Agent::build(config, links, backends, stale)
}

/// What a guest does first with a served agent: a NIC, a Hostlo part, the
/// lists; every reply converted as the server converts it.
pub async fn exercise(agent: &Agent, vm: &str) {
    let sandbox = SandboxId::parse("fuzz-sb").expect("a sandbox id");
    if let Ok(a) = agent
        .attach(vm, AttachRequest::for_sandbox(sandbox.clone()))
        .await
    {
        if let Some(net) = agent.network(&a.record.network) {
            convert::nic(&a.record, &net);
        }
    }
    let join = HostloJoin {
        pod: PodName::parse("fuzz-pod").expect("a pod name"),
        part: Part::parse(1).expect("a part"),
        sandbox_id: sandbox,
    };
    if let Ok((rec, view)) = agent.hostlo_join(vm, join).await {
        convert::hostlo_nic(&rec, "fuzz-pod", &agent.config().hostlo);
        convert::hostlo_view(&view);
    }
    replies(agent);
}

/// Every reply the admin and VM services build from the agent's records.
pub fn replies(agent: &Agent) {
    for r in agent.records(None) {
        let net = agent.network(&r.network);
        convert::nic_record(&r, net.as_ref());
        convert::lease(&r);
    }
    for p in agent.hostlo_pods() {
        convert::hostlo_pod(&p);
    }
}
