//! End-to-end harness: real QEMU guests running containerd with our shim and CNI plugin,
//! the real agent on the host hot-plugging their pods' NICs, one host bridge for all.
//!
//! ```text
//!  host (the test)                                  VM i (full guest image + our tree)
//!  ───────────────                                  ──────────────────────────────────
//!  bridge nltbXXXX  10.a.b.1/24 ◀──┬── tap nlt-… ─── eth0 (the VM's own NIC, 10.a.b.(2+i),
//!                                  │                  cold-plugged like any cloud VM's)
//!                                  └── tap nlh<id> ── hot-plugged virtio-net ─▶ pod netns eth0
//!  nestless-netagent (qemu backend)                   ▲
//!    QMP ───────────────────────────────────────────▶ QEMU device_add / device_del
//!    <vsock.sock>_7070 ◀── vhost-device-vsock ◀────── containerd-shim-nestless-v2 / nestless-cni
//!                                                      (AttachNic over vsock, CID 2 port 7070)
//!  nestless-cri (in the guest) ──▶ containerd CRI ──▶ nestless-cni (CNI ADD) + the shim
//! ```
//!
//! [`Cluster::start`] creates the bridge with the gateway address, one tap per VM for its own
//! NIC (a `-netdev tap` + `virtio-net-pci` on the QEMU command line: the VM's network is the
//! cloud's, not nestless's; the "single layer" baseline and the nested baseline's uplink use
//! it), boots the VMs from [`guest_image`], starts the agent with one `[[vm]]` per VM
//! (`qmp_socket`, `vsock_uds`), configures the VMs' own addresses and imports the busybox and
//! pause images into containerd's `k8s.io` namespace. Addresses: `.1` host, `.2..` the VMs'
//! own NICs, `.32..=.250` the agent's leases. Dropping the cluster kills the agent, the VMs,
//! then removes the taps and the bridge.
//!
//! The guest image is the full one plus the tree [`guest_tree`] writes: our shim, CNI plugin,
//! `nestless-cri` and `nestless-rr` (from this workspace's build, see [`Binaries`]), the shipped
//! `config/10-nestless.conflist` and `config/containerd-nestless.toml` (imported from the
//! guest's `config.toml`, with the local pause image and a `nested` runtime added), a shim
//! config pointing at `vsock://2:7070`, and for the benchmark's nested baseline the CNI bridge
//! plugin with NAT (`/etc/cni/nested.d`), `iptables` (legacy) and `iperf3` with their
//! libraries and kernel modules.

use std::{
    fs,
    io::{Read, Write},
    net::{Shutdown, TcpStream},
    os::unix::fs::{symlink, PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, OnceLock},
    thread,
    time::{Duration, Instant},
};

use serde::Deserialize;
use serde_json::Value;

use crate::{
    agent::AgentProc,
    containerd::{shell_quote, BUSYBOX_IMAGE, RUNTIME},
    netenv::{check, random_subnet, require_root, run, Bridge},
    vm::{ExecOutput, GuestCommand, GuestImage, HostTap, Vm},
};

/// The vsock port the agent serves (guests dial CID 2 on it).
pub const AGENT_PORT: u32 = 7070;
/// containerd's namespace for CRI (ctr pods in the tests use it too: one image import).
pub const K8S_NS: &str = "k8s.io";
/// The CRI runtime handler of the nested baseline: the shim without host NICs, and the CNI
/// bridge plugin with NAT (`/etc/cni/nested.d`).
pub const NESTED_HANDLER: &str = "nested";
/// The nested baseline's pod subnet, inside each VM (behind NAT).
pub const NESTED_SUBNET: &str = "172.30.0.0/24";
/// The host's address on the cluster bridge is `<net>.1`; VM `i`'s own NIC is `<net>.(2+i)`.
const OWN_NIC_BASE: u8 = 2;
/// How long a guest may take to boot (TCG, other VMs booting, builds running).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// Extra Debian packages for the guest: the libraries of iperf3 and iptables.
const GUEST_PACKAGES: &str = "libiperf0 libsctp1 libssl3 libxtables12 libip4tc2 libip6tc2";
/// Extra kernel modules for the nested baseline's NAT and port mappings, IPv4 and IPv6
/// (libcrc32c, which conntrack needs, fails to load unless a crc32c implementation is
/// there first).
const GUEST_MODULES: &str =
    "crc32c_generic ip_tables iptable_nat iptable_filter xt_MASQUERADE xt_nat \
    xt_comment xt_addrtype xt_multiport xt_mark xt_tcpudp xt_conntrack \
    ip6_tables ip6table_nat ip6table_filter";
/// The xtables extensions iptables loads for the bridge and portmap plugins' rules.
const XTABLES_EXTENSIONS: &[&str] = &[
    "libxt_standard.so",
    "libxt_MASQUERADE.so",
    "libipt_MASQUERADE.so",
    "libxt_comment.so",
    "libxt_addrtype.so",
    "libxt_multiport.so",
    "libxt_mark.so",
    "libxt_MARK.so",
    "libxt_tcp.so",
    "libxt_udp.so",
    "libxt_conntrack.so",
    "libxt_NAT.so",
    "libxt_DNAT.so",
    "libipt_DNAT.so",
    "libxt_SNAT.so",
    "libipt_SNAT.so",
    "libxt_RETURN.so",
];

fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// This workspace's binaries that the end-to-end tests run (on the host and in guests).
#[derive(Debug, Clone)]
pub struct Binaries {
    dir: PathBuf,
}

/// The binaries [`Binaries::get`] makes sure of.
pub const E2E_BINARIES: &[&str] = &[
    "nestless-netagent",
    "nestlessctl",
    "containerd-shim-nestless-v2",
    "nestless-cni",
    "nestless-cri",
    "nestless-rr",
];

impl Binaries {
    /// `NESTLESS_BIN_DIR` if set; else the profile directory of the running test or bench
    /// (`target/<profile>`), where this builds the binaries with cargo once per process
    /// (a no-op when they are fresh); else the directory of the running program.
    ///
    /// # Panics
    /// When the build fails or a binary is missing.
    pub fn get() -> Binaries {
        static BINS: OnceLock<Binaries> = OnceLock::new();
        BINS.get_or_init(|| {
            let dir = match std::env::var_os("NESTLESS_BIN_DIR") {
                Some(d) => PathBuf::from(d),
                None => Self::build_beside_current_exe(),
            };
            for name in E2E_BINARIES {
                let p = dir.join(name);
                assert!(
                    p.is_file(),
                    "{} is missing: cargo build --workspace --bins (same profile), or set \
                     NESTLESS_BIN_DIR",
                    p.display()
                );
            }
            Binaries { dir }
        })
        .clone()
    }

    fn build_beside_current_exe() -> PathBuf {
        let exe = std::env::current_exe().expect("the running program's path");
        let parent = exe.parent().expect("a directory").to_path_buf();
        // target/<profile>/deps/<test> (tests, benches) or target/<profile>/<bin>.
        let in_deps = parent.file_name().is_some_and(|n| n == "deps");
        let profile_dir = if in_deps {
            parent.parent().expect("target/<profile>").to_path_buf()
        } else {
            parent
        };
        let Some(cargo) = std::env::var_os("CARGO") else {
            return profile_dir; // not run by cargo: the binaries must be there already
        };
        let target_dir = profile_dir
            .parent()
            .expect("target/<profile>")
            .to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_dir())
            .env("CARGO_TARGET_DIR", &target_dir)
            .args([
                "build",
                "--quiet",
                "-p",
                "nestless-netagent",
                "-p",
                "containerd-shim-nestless-v2",
                "-p",
                "nestless-tests",
                "--bins",
            ]);
        if release {
            cmd.arg("--release");
        }
        let out = cmd
            .output()
            .expect("cannot run cargo to build the binaries");
        assert!(
            out.status.success(),
            "building the e2e binaries failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        profile_dir
    }

    /// The directory holding them.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// One of them.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// The guest's containerd configuration: `config.toml` (imports `conf.d/*.toml`) and the
/// shipped drop-in `config/containerd-nestless.toml` with the test's pause image and the
/// nested baseline's runtime added.
pub fn guest_containerd_config() -> (String, String) {
    let shipped = workspace_dir().join("config/containerd-nestless.toml");
    let text = fs::read_to_string(&shipped)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", shipped.display()));
    let mut doc: toml::Table = text
        .parse()
        .unwrap_or_else(|e| panic!("{} is not TOML: {e}", shipped.display()));
    let cri = doc
        .get_mut("plugins")
        .and_then(|p| p.get_mut("io.containerd.grpc.v1.cri"))
        .and_then(toml::Value::as_table_mut)
        .unwrap_or_else(|| panic!("{} has no CRI plugin section", shipped.display()));
    cri.insert(
        "sandbox_image".into(),
        crate::containerd::PAUSE_IMAGE.into(),
    );
    // The guest's root has every capability; this keeps the test independent of it.
    cri.insert("restrict_oom_score_adj".into(), true.into());
    let runtimes = cri
        .get_mut("containerd")
        .and_then(|c| c.get_mut("runtimes"))
        .and_then(toml::Value::as_table_mut)
        .unwrap_or_else(|| panic!("{} has no CRI runtimes", shipped.display()));
    let nested: toml::Table = toml::toml! {
        runtime_type = "io.containerd.nestless.v2"
        cni_conf_dir = "/etc/cni/nested.d"
        cni_max_conf_num = 1
        [options]
        ConfigPath = "/etc/nestless/shim-nested.toml"
    };
    runtimes.insert(NESTED_HANDLER.into(), nested.into());
    let dropin = format!(
        "# Generated by nestless_tests::e2e from config/containerd-nestless.toml.\n{}",
        toml::to_string(&doc).expect("TOML serializes")
    );
    let main = "version = 2\nroot = \"/var/lib/containerd\"\nstate = \"/run/containerd\"\n\
                imports = [\"/etc/containerd/conf.d/*.toml\"]\n"
        .to_owned();
    (main, dropin)
}

/// The nested baseline's CNI network: the bridge plugin (VM bridge `cni0`, NAT to the VM's
/// own NIC) and portmap (DNAT from the VM's address), as a tenant's VM runs pods today.
pub fn nested_conflist() -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "nested",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": NESTED_SUBNET }]],
                    "routes": [{ "dst": "0.0.0.0/0" }]
                }
            },
            { "type": "portmap", "capabilities": { "portMappings": true } }
        ]
    })
    .to_string()
}

fn copy_exec(from: &Path, to: &Path) {
    fs::create_dir_all(to.parent().expect("a parent")).expect("mkdir in the guest tree");
    fs::copy(from, to)
        .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", from.display(), to.display()));
    fs::set_permissions(to, fs::Permissions::from_mode(0o755)).expect("chmod");
}

fn write_file(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().expect("a parent")).expect("mkdir in the guest tree");
    fs::write(&p, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", p.display()));
}

/// Finds a host program that is copied into guests, naming its package when it is missing.
fn host_program(paths: &[&str], package: &str) -> PathBuf {
    paths
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{} is missing on the host: apt-get install -y {package} (the guest image takes it \
                 from there; this test does not skip)",
                paths[0]
            )
        })
}

/// Writes the tree copied over the full guest image (see the module documentation).
pub fn guest_tree(root: &Path, bins: &Binaries) {
    for name in ["containerd-shim-nestless-v2", "nestless-cri", "nestless-rr"] {
        copy_exec(&bins.path(name), &root.join("usr/bin").join(name));
    }
    copy_exec(
        &bins.path("nestless-cni"),
        &root.join("opt/cni/bin/nestless-cni"),
    );
    // Host programs for the benchmark (their libraries come from GUEST_PACKAGES).
    copy_exec(
        &host_program(&["/usr/bin/iperf3"], "iperf3"),
        &root.join("usr/bin/iperf3"),
    );
    copy_exec(
        &host_program(&["/usr/sbin/ethtool", "/sbin/ethtool"], "ethtool"),
        &root.join("usr/bin/ethtool"),
    );
    copy_exec(
        &host_program(
            &[
                "/usr/sbin/xtables-legacy-multi",
                "/sbin/xtables-legacy-multi",
            ],
            "iptables",
        ),
        &root.join("usr/bin/xtables-legacy-multi"),
    );
    for name in [
        "iptables",
        "iptables-save",
        "iptables-restore",
        "ip6tables",
        "ip6tables-save",
        "ip6tables-restore",
    ] {
        symlink("xtables-legacy-multi", root.join("usr/bin").join(name)).expect("symlink");
    }
    let xt = root.join("usr/lib/x86_64-linux-gnu/xtables");
    fs::create_dir_all(&xt).expect("mkdir xtables");
    for ext in XTABLES_EXTENSIONS {
        let from = Path::new("/usr/lib/x86_64-linux-gnu/xtables").join(ext);
        if from.is_file() {
            fs::copy(&from, xt.join(ext)).expect("copy an xtables extension");
        }
    }
    assert!(
        xt.join("libxt_standard.so").is_file(),
        "/usr/lib/x86_64-linux-gnu/xtables is missing: apt-get install -y iptables"
    );

    write_file(
        root,
        "etc/nestless/shim.toml",
        &format!(
            "# Test guests: the host agent over vsock; TCG hot-plug can be slow under load.\n\
             log_level = \"debug\"\n[agent]\naddress = \"vsock://2:{AGENT_PORT}\"\n\
             connect_timeout_ms = 2000\nrequest_timeout_ms = 30000\n\
             [network]\nmode = \"agent\"\nnic_wait_ms = 20000\n"
        ),
    );
    write_file(
        root,
        "etc/nestless/shim-nested.toml",
        "# The nested baseline: the same shim, no host NIC (CNI bridge + NAT instead).\n\
         log_level = \"debug\"\n[network]\nmode = \"none\"\n",
    );
    // CRI copies the node's resolv.conf into each pod; the test network has no DNS.
    write_file(root, "etc/resolv.conf", "# no DNS on the test network\n");
    let (main, dropin) = guest_containerd_config();
    write_file(root, "etc/containerd/config.toml", &main);
    write_file(root, "etc/containerd/conf.d/nestless.toml", &dropin);
    let conflist = workspace_dir().join("config/10-nestless.conflist");
    write_file(
        root,
        "etc/cni/net.d/10-nestless.conflist",
        &fs::read_to_string(&conflist)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", conflist.display())),
    );
    write_file(
        root,
        "etc/cni/nested.d/10-nested.conflist",
        &nested_conflist(),
    );
}

/// The full guest image with [`guest_tree`], built once per process (cached on disk).
///
/// The extra Debian packages and kernel modules reach `tests/vm/build-guest.sh` through
/// `NESTLESS_VM_EXTRA_PACKAGES` / `NESTLESS_VM_EXTRA_MODULES`, set here in this process's
/// environment (under the lock, before any VM of this harness starts).
///
/// # Panics
/// When a binary, a host program or the image build fails.
pub fn guest_image() -> GuestImage {
    static IMAGE: Mutex<Option<GuestImage>> = Mutex::new(None);
    let mut image = IMAGE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(i) = image.as_ref().filter(|i| i.initrd().is_file()) {
        return i.clone();
    }
    let bins = Binaries::get();
    let tree = tempfile::Builder::new()
        .prefix("nestless-e2e-tree-")
        .tempdir()
        .expect("a temporary directory");
    guest_tree(tree.path(), &bins);
    for (key, value) in [
        ("NESTLESS_VM_EXTRA_PACKAGES", GUEST_PACKAGES),
        ("NESTLESS_VM_EXTRA_MODULES", GUEST_MODULES),
    ] {
        let merged = match std::env::var(key) {
            Ok(v) if v.contains(value) => v,
            Ok(v) if !v.trim().is_empty() => format!("{v} {value}"),
            _ => value.to_owned(),
        };
        std::env::set_var(key, merged);
    }
    let built = GuestImage::full_with_extra(tree.path());
    *image = Some(built.clone());
    built
}

/// Prints a harness step with its duration (to stderr, shown with `--nocapture`).
pub fn step<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    eprintln!("[e2e] {what}: {:.2?}", t.elapsed());
    r
}

/// A VM of a [`Cluster`].
#[derive(Debug)]
pub struct Node {
    vm: Vm,
    agent_name: String,
    own_ip: String,
    own_mac: String,
    // After the VM: QEMU holds the tap open until it dies.
    _tap: HostTap,
}

/// One of the agent's NIC records (from its state store).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct NicRecord {
    /// The NIC id (`nl-<id>` in QEMU, `nlh<id>` on the host).
    pub id: String,
    /// The agent's VM name.
    pub vm: String,
    /// The sandbox it serves.
    pub sandbox_id: String,
    /// Its MAC.
    pub mac: String,
    /// Its leased address.
    pub ipv4: String,
    /// `attaching`, `attached`, `detaching`.
    pub state: String,
    /// The hot-plug bus.
    #[serde(default)]
    pub slot: Option<String>,
}

/// A running pod as the tests see it.
#[derive(Debug, Clone)]
pub struct Pod {
    /// The sandbox id (CRI) or container id (ctr).
    pub id: String,
    /// The pid of its init (pause for CRI), whose netns is the pod's.
    pub pid: u32,
    /// Its `eth0` address.
    pub ip: String,
    /// The CRI container running in it (CRI pods only).
    pub container: Option<String>,
}

impl Node {
    /// The VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The VM's name in the agent's config.
    pub fn agent_name(&self) -> &str {
        &self.agent_name
    }

    /// The VM's own address (its cloud NIC, on the cluster bridge).
    pub fn own_ip(&self) -> &str {
        &self.own_ip
    }

    /// The MAC of the VM's own NIC.
    pub fn own_mac(&self) -> &str {
        &self.own_mac
    }

    /// The guest links in the VM's root namespace that are neither `lo` nor its own NIC
    /// (`name mac` per line): hot-plugged NICs that no pod holds.
    pub fn stray_links(&self) -> Vec<String> {
        let out = self.sh(
            "for d in /sys/class/net/*; do n=${d##*/}; [ $n = lo ] || echo $n $(cat $d/address); done",
        );
        out.lines()
            .filter(|l| !l.ends_with(&self.own_mac))
            .map(str::to_owned)
            .collect()
    }

    /// The ids of the devices QEMU has (`query-pci`, all buses), through the harness monitor.
    pub fn pci_device_ids(&self) -> Vec<String> {
        fn walk(devs: &[Value], out: &mut Vec<String>) {
            for d in devs {
                if let Some(id) = d["qdev_id"].as_str().filter(|s| !s.is_empty()) {
                    out.push(id.to_owned());
                }
                if let Some(children) = d["pci_bridge"]["devices"].as_array() {
                    walk(children, out);
                }
            }
        }
        let v = self
            .vm
            .qmp()
            .execute("query-pci", serde_json::json!({}))
            .expect("query-pci");
        let mut out = Vec::new();
        for bus in v.as_array().expect("query-pci returns buses") {
            walk(bus["devices"].as_array().expect("devices"), &mut out);
        }
        out
    }
}

/// A guest that runs commands over the harness's vsock exec channel, with
/// containerd, our shim, CNI plugin and `nestless-cri` in it (a [`Node`] of a
/// [`Cluster`], a libvirt [`crate::libvirt::Domain`] booted from
/// [`guest_image`]): what the tests do in it, as a user of the guest would.
pub trait Guest {
    /// Runs `cmd` in the guest.
    fn run(&self, cmd: &GuestCommand) -> ExecOutput;

    /// The guest's name, for messages.
    fn guest_name(&self) -> &str;

    /// Runs a guest shell script that must succeed; on failure the panic carries the
    /// containerd log's tail.
    fn sh(&self, script: &str) -> String {
        let out = self.run(&GuestCommand::shell(script).timeout(Duration::from_secs(180)));
        if !out.success() {
            panic!(
                "`{script}` in VM {} ended with {:?}\nstdout:\n{}\nstderr:\n{}\ncontainerd log:\n{}",
                self.guest_name(),
                out.status,
                out.stdout_str(),
                out.stderr_str(),
                self.containerd_log(40)
            );
        }
        out.stdout_str()
    }

    /// The last lines of the guest's containerd log (which carries the shims' logs).
    fn containerd_log(&self, lines: usize) -> String {
        self.run(&GuestCommand::shell(format!(
            "tail -n {lines} /var/log/containerd.log"
        )))
        .stdout_str()
    }

    /// Runs `nestless-cri ARGS` in the guest and parses its JSON.
    ///
    /// # Panics
    /// When it fails (with its stderr and the containerd log's tail).
    fn cri(&self, args: &[&str]) -> Value {
        let out = self.try_cri(args);
        out.unwrap_or_else(|e| {
            panic!(
                "nestless-cri {} in VM {}: {e}\ncontainerd log:\n{}",
                args.join(" "),
                self.guest_name(),
                self.containerd_log(60)
            )
        })
    }

    /// Runs `nestless-cri ARGS` in the guest; its JSON, or its error text.
    fn try_cri(&self, args: &[&str]) -> Result<Value, String> {
        let out = self.run(
            &GuestCommand::new("nestless-cri")
                .args(args.iter().copied())
                .timeout(Duration::from_secs(240)),
        );
        if !out.success() {
            return Err(format!("{:?}: {}", out.status, out.stderr_str().trim()));
        }
        serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("output is not JSON ({e}): {}", out.stdout_str()))
    }

    /// Imports the busybox and pause images into containerd's `k8s.io` namespace.
    fn import_images(&self) {
        self.sh(&format!(
            "ctr -n {K8S_NS} images import /usr/share/nestless/images/pause.tar >/tmp/i1 2>&1 & \
             ctr -n {K8S_NS} images import /usr/share/nestless/images/busybox.tar >/tmp/i2 2>&1; \
             r=$?; wait $! || r=1; cat /tmp/i1 /tmp/i2; exit $r"
        ));
    }

    /// The pid of a runc container's init (a ctr container or a CRI sandbox).
    fn init_pid(&self, id: &str) -> u32 {
        let state = self.sh(&format!(
            "runc --root /run/containerd/runc/{K8S_NS} state {id}"
        ));
        let v: Value = serde_json::from_str(&state)
            .unwrap_or_else(|e| panic!("runc state {id}: {e}: {state}"));
        v["pid"]
            .as_u64()
            .unwrap_or_else(|| panic!("runc state {id} has no pid: {state}")) as u32
    }

    /// Runs a shell script in the network namespace of process `pid` (from the VM's root:
    /// the VM's programs, the pod's network).
    fn in_netns(&self, pid: u32, script: &str) -> String {
        self.sh(&format!(
            "nsenter -t {pid} -n sh -c {}",
            shell_quote(script)
        ))
    }

    /// The global IPv6 address of `eth0` in the network namespace of `pid`, and the
    /// flags `ip` shows for it (`tentative`, `dadfailed` when DAD has not passed).
    fn eth0_ipv6(&self, pid: u32) -> (String, String) {
        let out = self.in_netns(pid, "/usr/bin/ip -o -6 addr show dev eth0 scope global");
        let line = out
            .lines()
            .next()
            .unwrap_or_else(|| panic!("no global IPv6 address on eth0 of pid {pid}: {out}"));
        let addr = line
            .split_whitespace()
            .skip_while(|w| *w != "inet6")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .unwrap_or_else(|| panic!("cannot read {line}"))
            .to_owned();
        (addr, line.to_owned())
    }

    /// The IPv4 address of `eth0` in the network namespace of `pid`.
    fn eth0_ipv4(&self, pid: u32) -> String {
        let out = self.in_netns(pid, "/usr/bin/ip -o -4 addr show dev eth0");
        out.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .unwrap_or_else(|| panic!("no IPv4 address on eth0 of pid {pid}: {out}"))
            .to_owned()
    }

    /// Starts a pod with `ctr run -d --runtime io.containerd.nestless.v2` (its own netns:
    /// the shim asks the agent for its NIC) running `script` in busybox.
    fn ctr_pod(&self, id: &str, script: &str) -> Pod {
        self.sh(&format!(
            "ctr -n {K8S_NS} run -d --runtime {RUNTIME} {BUSYBOX_IMAGE} {id} sh -c {}",
            shell_quote(script)
        ));
        let pid = self.init_pid(id);
        Pod {
            id: id.to_owned(),
            pid,
            ip: self.eth0_ipv4(pid),
            container: None,
        }
    }

    /// Kills and deletes a ctr pod (the shim releases its NIC on delete).
    fn ctr_delete(&self, id: &str) {
        self.sh(&format!(
            "ctr -n {K8S_NS} task kill -s SIGKILL {id}; \
             ctr -n {K8S_NS} task rm -f {id} >/dev/null 2>&1; ctr -n {K8S_NS} container rm {id}"
        ));
    }

    /// Creates a pod through CRI with runtime `handler` (port mappings for the nested
    /// baseline, as `nestless-cri runp --port` takes them: `C:H`, `C:H/udp`), starts a busybox container in it running `script`; returns the
    /// pod and RunPodSandbox's duration in ms as the client in the guest measured it.
    fn cri_pod(&self, name: &str, handler: &str, ports: &[&str], script: &str) -> (Pod, f64) {
        self.cri_pod_annotated(name, handler, ports, &[], script)
    }

    /// [`Node::cri_pod`] with pod annotations (`K=V`), as Kubernetes passes a pod's.
    fn cri_pod_annotated(
        &self,
        name: &str,
        handler: &str,
        ports: &[&str],
        annotations: &[String],
        script: &str,
    ) -> (Pod, f64) {
        let mut args = vec![
            "runp".to_owned(),
            "--name".into(),
            name.into(),
            "--handler".into(),
            handler.into(),
        ];
        for p in ports {
            args.push("--port".into());
            args.push((*p).to_owned());
        }
        for a in annotations {
            args.push("--annotation".into());
            args.push(a.clone());
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = self.cri(&argv);
        let id = r["id"].as_str().expect("runp prints the id").to_owned();
        let ms = r["ms"].as_f64().expect("runp prints ms");
        let started = self.cri(&[
            "run",
            "--pod",
            &id,
            "--name",
            "main",
            "--image",
            BUSYBOX_IMAGE,
            "--",
            "sh",
            "-c",
            script,
        ]);
        let container = started["id"].as_str().map(str::to_owned);
        let pid = self.init_pid(&id);
        let ip = self.eth0_ipv4(pid);
        (
            Pod {
                id,
                pid,
                ip,
                container,
            },
            ms,
        )
    }

    /// StopPodSandbox then RemovePodSandbox (CNI DEL releases the NIC, then the shim).
    fn cri_delete(&self, pod: &str) {
        self.cri(&["stopp", pod]);
        self.cri(&["rmp", pod]);
    }
}

impl Guest for Node {
    fn run(&self, cmd: &GuestCommand) -> ExecOutput {
        self.vm.run(cmd)
    }

    fn guest_name(&self) -> &str {
        self.vm.name()
    }
}

impl Guest for crate::libvirt::Domain {
    fn run(&self, cmd: &GuestCommand) -> ExecOutput {
        crate::libvirt::Domain::run(self, cmd)
    }

    fn guest_name(&self) -> &str {
        &self.name
    }
}

/// Host bridge + VMs + agent; see the module documentation.
pub struct Cluster {
    // Dropped in this order: the agent, the VMs (and their taps), the bridge.
    agent: AgentProc,
    nodes: Vec<Node>,
    net: String,
    ipv6: bool,
    bridge: Bridge,
}

/// The IPv6 /64 prefix a cluster on IPv4 `<net>.0/24` uses ("10.a.b" -> "fd4e:a:b::").
pub fn net6_of(net: &str) -> String {
    let p: Vec<&str> = net.split('.').collect();
    format!("fd4e:{}:{}::", p[1], p[2])
}

/// Options of [`Cluster::start`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// How many VMs.
    pub vms: usize,
    /// Hot-plug root ports per VM.
    pub root_ports: u32,
    /// Guest memory (MiB).
    pub memory_mib: u32,
    /// Import the busybox and pause images into each VM's containerd.
    pub import_images: bool,
    /// The agent's `warm_pool` for VM `i` (missing entries: none).
    pub warm_pools: Vec<u32>,
    /// Dual stack: the network also has `subnet6` (see [`Cluster::net6`]), the host's
    /// bridge the IPv6 gateway address.
    pub ipv6: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            vms: 1,
            root_ports: 8,
            memory_mib: 1024,
            import_images: true,
            warm_pools: Vec::new(),
            ipv6: false,
        }
    }
}

impl Cluster {
    /// Starts a cluster (see the module documentation).
    ///
    /// # Panics
    /// When not root, or anything fails (with the logs).
    pub fn start(opts: ClusterOptions) -> Cluster {
        require_root();
        let image = step("guest image (built or found in the cache)", guest_image);
        let net = random_subnet();
        let bridge = Bridge::new(Some(&format!("{net}.1/24")));
        if opts.ipv6 {
            // The host's own address is the gateway: no DAD for it.
            let gw6 = format!("{}1/64", net6_of(&net));
            check(&["ip", "addr", "add", &gw6, "dev", &bridge.name, "nodad"]);
        }
        let mut nodes = Vec::new();
        step(&format!("start {} VM(s)", opts.vms), || {
            for i in 0..opts.vms {
                let tap = HostTap::create();
                check(&["ip", "link", "set", tap.name(), "master", &bridge.name]);
                let own_mac = format!(
                    "02:4e:4c:{:02x}:{:02x}:{:02x}",
                    rand::random::<u8>(),
                    rand::random::<u8>(),
                    i as u8
                );
                let vm = Vm::builder()
                    .image(image.clone())
                    .root_ports(opts.root_ports)
                    .memory_mib(opts.memory_mib)
                    .qemu_arg("-netdev")
                    .qemu_arg(format!(
                        "tap,id=own,ifname={},script=no,downscript=no",
                        tap.name()
                    ))
                    .qemu_arg("-device")
                    .qemu_arg(format!("virtio-net-pci,netdev=own,mac={own_mac},addr=0x4"))
                    .start();
                nodes.push(Node {
                    agent_name: format!("vm{i}"),
                    own_ip: format!("{net}.{}", OWN_NIC_BASE + i as u8),
                    own_mac,
                    vm,
                    _tap: tap,
                });
            }
        });
        let agent = step("start the agent", || {
            AgentProc::start(|dir| {
                agent_config(dir, &bridge.name, &net, opts.ipv6, &nodes, &opts.warm_pools)
            })
        });
        let cluster = Cluster {
            agent,
            nodes,
            net,
            ipv6: opts.ipv6,
            bridge,
        };
        step("VMs ready (containerd up)", || {
            thread::scope(|s| {
                for n in &cluster.nodes {
                    s.spawn(move || n.vm.wait_ready(BOOT_TIMEOUT));
                }
            })
        });
        step("own NICs configured, images imported", || {
            thread::scope(|s| {
                for n in &cluster.nodes {
                    let gw = cluster.gateway();
                    s.spawn(move || {
                        n.sh(&format!(
                            "for d in /sys/class/net/*; do [ \"$(cat $d/address)\" = {mac} ] && dev=${{d##*/}}; done; \
                             [ -n \"$dev\" ] && /usr/bin/ip addr add {ip}/24 dev $dev && /usr/bin/ip link set $dev up && \
                             /usr/bin/ip route add default via {gw}",
                            mac = n.own_mac,
                            ip = n.own_ip,
                        ));
                        if opts.import_images {
                            n.import_images();
                        }
                    });
                }
            })
        });
        cluster
    }

    /// The VMs.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// VM `i`.
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// The agent.
    pub fn agent(&self) -> &AgentProc {
        &self.agent
    }

    /// The agent, to kill and restart it.
    pub fn agent_mut(&mut self) -> &mut AgentProc {
        &mut self.agent
    }

    /// The agent (mutable) and the VMs at once: to kill the agent while a VM works.
    pub fn parts_mut(&mut self) -> (&mut AgentProc, &[Node]) {
        (&mut self.agent, &self.nodes)
    }

    /// The host bridge.
    pub fn bridge(&self) -> &Bridge {
        &self.bridge
    }

    /// The host's address on the bridge (the pods' gateway).
    pub fn gateway(&self) -> String {
        format!("{}.1", self.net)
    }

    /// The host's IPv6 address on the bridge (the pods' IPv6 gateway), in a dual-stack
    /// cluster.
    pub fn gateway6(&self) -> Option<String> {
        self.ipv6.then(|| format!("{}1", net6_of(&self.net)))
    }

    /// The agent's NIC records (its state store).
    pub fn records(&self) -> Vec<NicRecord> {
        records(&self.agent)
    }

    /// The record of `sandbox`, if any.
    pub fn record_of(&self, sandbox: &str) -> Option<NicRecord> {
        self.records().into_iter().find(|r| r.sandbox_id == sandbox)
    }

    /// `nestlessctl leases --json` against the agent's admin socket.
    pub fn leases(&self) -> Vec<Value> {
        self.agent.leases()
    }

    /// Pings `ip` from the host (busybox ping: the host has no ping package).
    ///
    /// # Panics
    /// When no reply comes.
    pub fn host_ping(&self, ip: &str) -> String {
        let out = run(&["busybox", "ping", "-c", "3", "-W", "10", ip]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "the host cannot ping {ip}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }
}

/// An agent's NIC records (its state store).
pub fn records(agent: &AgentProc) -> Vec<NicRecord> {
    serde_json::from_value(agent.state()["nics"].clone()).expect("stored records")
}

fn agent_config(
    dir: &Path,
    bridge: &str,
    net: &str,
    ipv6: bool,
    nodes: &[Node],
    warm_pools: &[u32],
) -> String {
    let mut s = format!(
        "[agent]\nstate_dir = \"{0}/state\"\nadmin_socket = \"{0}/admin.sock\"\n\
         listen_vsock = false\nvsock_port = {AGENT_PORT}\nunplug_timeout_ms = 20000\n\
         qmp_timeout_ms = 20000\n\n\
         [[network]]\nname = \"tenant\"\nbridge = \"{bridge}\"\nsubnet = \"{net}.0/24\"\n\
         gateway = \"{net}.1\"\nrange_start = \"{net}.32\"\nrange_end = \"{net}.250\"\n",
        dir.display()
    );
    if ipv6 {
        let net6 = net6_of(net);
        s += &format!("subnet6 = \"{net6}/64\"\ngateway6 = \"{net6}1\"\n");
    }
    for (i, n) in nodes.iter().enumerate() {
        s += &format!(
            "\n[[vm]]\nname = \"{}\"\nbackend = \"qemu\"\nqmp_socket = \"{}\"\nvsock_uds = \"{}\"\n\
             network = \"tenant\"\nmax_nics = 16\nwarm_pool = {}\n",
            n.agent_name,
            n.vm.qmp_path().display(),
            n.vm.vsock_uds().display(),
            warm_pools.get(i).copied().unwrap_or(0)
        );
    }
    s
}

/// An HTTP/1.0 GET of `/` from the host (`ip` IPv4 or IPv6); returns the whole response.
pub fn http_get(ip: &str, port: u16) -> std::io::Result<String> {
    let addr = std::net::SocketAddr::new(ip.parse().expect("an IP address"), port);
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(format!("GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let _ = s.shutdown(Shutdown::Write);
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Retries `f` until it returns `Ok` or `limit` passes (for effects that settle, e.g. a
/// server starting in the guest); the last error in the panic.
pub fn eventually<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => panic!("{what}: not within {limit:?}: {e}"),
            Err(_) => thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The busybox script of a pod serving `body` over HTTP on port 80 (busybox httpd).
pub fn httpd_script(body: &str) -> String {
    format!(
        "mkdir -p /tmp/www && echo {} > /tmp/www/index.html && exec httpd -f -p 80 -h /tmp/www",
        shell_quote(body)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_containerd_config_keeps_the_shipped_runtime() {
        let (main, dropin) = guest_containerd_config();
        assert!(main.contains("imports = [\"/etc/containerd/conf.d/*.toml\"]"));
        let doc: toml::Table = dropin.parse().unwrap();
        let cri = &doc["plugins"]["io.containerd.grpc.v1.cri"];
        assert_eq!(
            cri["sandbox_image"].as_str(),
            Some(crate::containerd::PAUSE_IMAGE)
        );
        let rt = &cri["containerd"]["runtimes"];
        let h = crate::containerd::CRI_HANDLER;
        assert_eq!(rt[h]["runtime_type"].as_str(), Some(RUNTIME));
        assert_eq!(
            rt[h]["pod_annotations"].as_array().unwrap()[0].as_str(),
            Some("io.nestless.hostlo/*")
        );
        assert_eq!(
            rt[NESTED_HANDLER]["cni_conf_dir"].as_str(),
            Some("/etc/cni/nested.d")
        );
    }

    #[test]
    fn nested_conflist_has_nat_and_port_mappings() {
        let v: Value = serde_json::from_str(&nested_conflist()).unwrap();
        assert_eq!(v["plugins"][0]["type"], "bridge");
        assert_eq!(v["plugins"][0]["ipMasq"], true);
        assert_eq!(v["plugins"][1]["capabilities"]["portMappings"], true);
    }
}
