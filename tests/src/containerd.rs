//! A private containerd for tests, with `containerd-shim-nestless-v2` registered.
//!
//! [`Containerd::start`] runs the containerd under test ([`build`]: the folder
//! `NESTLESS_CONTAINERD` names, one of `tests/lib/versions.sh`'s 1.6, 1.7 and 2.x, else
//! the system's) on a fresh directory of its own (root, state, sockets, config, the
//! shim's config and runc root), with the shim's directory first on its `PATH`, then
//! that version's own programs, so that the runtime name `io.containerd.nestless.v2`
//! resolves to the shim under test and `io.containerd.runc.v2` to that version's:
//!
//! ```text
//!   test ──ctr --address <dir>/containerd.sock -n NS──> containerd ──start──> containerd-shim-nestless-v2
//!                                                            │                    │ ttrpc
//!                                                            └── <dir>/root, <dir>/state     └── runc --root <dir>/runc/NS
//! ```
//!
//! The CRI plugin is configured by the shipped drop-in of the version's configuration
//! generation ([`crate::dropin`]), with the test's paths: `restrict_oom_score_adj`,
//! the sandbox image = a locally imported static pause image, the `nestless`
//! runtime handler's options carrying the shim's config path.
//!
//! Images come from scripts, without a registry: `tests/vm/build-busybox-image.sh`
//! ([`BUSYBOX_IMAGE`]) and `tests/containerd/build-pause-image.sh`
//! ([`PAUSE_IMAGE`]). Dropping the [`Containerd`] kills it and its shims,
//! force-deletes leftover runc containers, unmounts and removes its directory.
//! Nothing here skips: a missing containerd, ctr or runc is a panic saying
//! what to install or fetch.

use crate::dropin::{self, Adapt, Generation};

use std::{
    fs,
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

/// The runtime name the shim is registered under.
pub const RUNTIME: &str = "io.containerd.nestless.v2";
/// The shim binary's name.
pub const SHIM_BINARY: &str = "containerd-shim-nestless-v2";
/// The busybox image built by `tests/vm/build-busybox-image.sh`.
pub const BUSYBOX_IMAGE: &str = "localhost/nestless/busybox:test";
/// The pause image built by `tests/containerd/build-pause-image.sh`.
pub const PAUSE_IMAGE: &str = "localhost/nestless/pause:test";
/// The CRI runtime handler name of the shim.
pub const CRI_HANDLER: &str = "nestless";

/// How long one `ctr` command may take.
pub const CTR_TIMEOUT: Duration = Duration::from_secs(60);

/// The containerd under test: the folder `NESTLESS_CONTAINERD` names (made by
/// `tests/lib/versions.sh`: `bin/` with containerd, ctr, containerd-shim-runc-v2 and runc,
/// and `VERSION`), else the system's containerd on `PATH`.
#[derive(Debug, Clone)]
pub struct Build {
    /// The folder's name (`containerd-1.7`), or `system`.
    pub name: String,
    /// The version containerd reports (`2.1.9+unknown`).
    pub version: String,
    /// Its major version.
    pub major: u32,
    /// Its programs, or `None` for the system's.
    pub bin: Option<PathBuf>,
}

impl Build {
    /// One of its programs (`containerd`, `ctr`, `containerd-shim-runc-v2`, `runc`).
    pub fn tool(&self, name: &str) -> PathBuf {
        match &self.bin {
            Some(b) => {
                let p = b.join(name);
                assert!(
                    p.exists(),
                    "{} is missing: run `. tests/lib/versions.sh && fetch_versions`",
                    p.display()
                );
                p
            }
            None => require_tool(name, if name == "runc" { "runc" } else { "containerd" }),
        }
    }

    /// The configuration generation it reads natively.
    pub fn generation(&self) -> Generation {
        Generation::for_major(self.major)
    }
}

impl std::fmt::Display for Build {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "containerd {} ({}, config version {})",
            self.version,
            self.name,
            self.generation().number()
        )
    }
}

/// The containerd under test (see [`Build`]); panics naming what is missing.
pub fn build() -> &'static Build {
    static B: OnceLock<Build> = OnceLock::new();
    B.get_or_init(|| {
        let (name, bin) = match std::env::var_os("NESTLESS_CONTAINERD") {
            Some(d) => {
                let d = PathBuf::from(d);
                assert!(
                    d.join("bin").is_dir(),
                    "NESTLESS_CONTAINERD={} has no bin/: run `. tests/lib/versions.sh && fetch_versions`",
                    d.display()
                );
                let name = d
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                (name, Some(d.join("bin")))
            }
            None => ("system".to_owned(), None),
        };
        let mut b = Build {
            name,
            version: String::new(),
            major: 0,
            bin,
        };
        let out = run(
            {
                let mut c = Command::new(b.tool("containerd"));
                c.arg("--version");
                c
            },
            None,
            Duration::from_secs(20),
        )
        .ok();
        // "containerd github.com/containerd/containerd/v2 2.1.9+unknown <commit>"
        b.version = out
            .split_whitespace()
            .nth(2)
            .unwrap_or_else(|| panic!("containerd --version printed {out:?}"))
            .trim_start_matches('v')
            .to_owned();
        b.major = b
            .version
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| panic!("containerd version {:?} has no major", b.version));
        b
    })
}

/// Options of [`Containerd::start`].
#[derive(Debug, Clone)]
pub struct Options {
    /// The `[network] mode` of the shim's config (`none` until the agent is there).
    pub network_mode: String,
    /// Extra TOML appended to the shim's config.
    pub extra_shim_config: String,
    /// The shim binary (default: [`shim_binary`]).
    pub shim: Option<PathBuf>,
    /// Import the pause image into `k8s.io` at start (what the CRI plugin needs).
    pub pause_image: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            network_mode: "none".into(),
            extra_shim_config: String::new(),
            shim: None,
            pause_image: false,
        }
    }
}

/// A running private containerd; killed and cleaned on drop.
pub struct Containerd {
    dir: PathBuf,
    child: Option<Child>,
    address: PathBuf,
    shim_config: PathBuf,
    shim: PathBuf,
}

/// Panics unless `tool` is on `PATH`, naming the package to install.
pub fn require_tool(tool: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in
        std::env::split_paths(&path).chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
    {
        let p = dir.join(tool);
        if p.is_file() {
            return p;
        }
    }
    panic!("{tool} is not installed: apt-get install -y {package} (this test needs it and does not skip)");
}

fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// The shim binary: `NESTLESS_SHIM_BIN`, or the workspace's build, which this
/// builds (with the test's own profile and target directory) once per test process.
pub fn shim_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("NESTLESS_SHIM_BIN") {
            let p = PathBuf::from(p);
            assert!(
                p.is_file(),
                "NESTLESS_SHIM_BIN={} is not a file",
                p.display()
            );
            return p;
        }
        // target/<profile>/deps/<test> -> target/<profile>
        let exe = std::env::current_exe().expect("the test's own path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test binary lives in target/<profile>/deps")
            .to_path_buf();
        let target_dir = profile_dir
            .parent()
            .expect("target/<profile>")
            .to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_dir())
            .env("CARGO_TARGET_DIR", &target_dir)
            .args([
                "build",
                "--quiet",
                "-p",
                "containerd-shim-nestless-v2",
                "--bin",
                SHIM_BINARY,
            ]);
        if release {
            cmd.arg("--release");
        }
        let out = cmd.output().expect("cannot run cargo to build the shim");
        assert!(
            out.status.success(),
            "building {SHIM_BINARY} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = profile_dir.join(SHIM_BINARY);
        assert!(bin.is_file(), "{} was not built", bin.display());
        bin
    })
    .clone()
}

/// Runs an image build script and returns the archive path it prints.
fn build_image(script: &Path) -> PathBuf {
    let out = Command::new("bash")
        .arg(script)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(path.is_file(), "{} printed {:?}", script.display(), path);
    path
}

/// The busybox OCI archive (built once, then cached on disk).
pub fn busybox_archive() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| build_image(&workspace_dir().join("tests/vm/build-busybox-image.sh")))
        .clone()
}

/// The pause OCI archive (built once, then cached on disk).
pub fn pause_archive() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| build_image(&workspace_dir().join("tests/containerd/build-pause-image.sh")))
        .clone()
}

/// A random name with a prefix, for namespaces, containers, pods.
pub fn random_name(prefix: &str) -> String {
    let n: u64 = rand::random();
    format!("{prefix}-{:012x}", n & 0xffff_ffff_ffff)
}

/// What a command did.
#[derive(Debug, Clone)]
pub struct CmdResult {
    /// The command line, for messages.
    pub command: String,
    /// Exit code (`-1` if killed by a signal or timed out).
    pub code: i32,
    /// stdout.
    pub stdout: String,
    /// stderr.
    pub stderr: String,
}

impl CmdResult {
    /// Panics (with everything) unless the command succeeded; returns stdout.
    pub fn ok(self) -> String {
        assert_eq!(
            self.code, 0,
            "`{}` failed with {}:\nstdout: {}\nstderr: {}",
            self.command, self.code, self.stdout, self.stderr
        );
        self.stdout
    }
}

/// Runs `cmd` with optional stdin data and a deadline.
pub fn run(mut cmd: Command, stdin: Option<&[u8]>, timeout: Duration) -> CmdResult {
    let command = format!("{cmd:?}");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command}: {e}"));
    if let Some(data) = stdin {
        let mut w = child.stdin.take().expect("piped");
        let data = data.to_vec();
        thread::spawn(move || {
            let _ = w.write_all(&data);
        });
    }
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let t_out = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let t_err = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let code = loop {
        match child.try_wait().expect("wait for a child") {
            Some(status) => break status.code().unwrap_or(-1),
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("`{command}` did not finish within {timeout:?}");
            }
            None => thread::sleep(Duration::from_millis(20)),
        }
    };
    CmdResult {
        command,
        code,
        stdout: String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned(),
        stderr: String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned(),
    }
}

impl Containerd {
    /// Starts a private containerd; panics with its log if it does not come up.
    pub fn start(opts: Options) -> Containerd {
        let build = build();
        eprintln!("[containerd] {build}");
        let shim = opts.shim.clone().unwrap_or_else(shim_binary);
        let shim_dir = shim.parent().expect("shim dir").to_path_buf();

        let dir = PathBuf::from(format!("/tmp/{}", random_name("nl-ctd")));
        fs::create_dir_all(&dir).expect("create the containerd test directory");
        let address = dir.join("containerd.sock");
        let shim_config = dir.join("shim.toml");
        fs::write(
            &shim_config,
            format!(
                "log_level = \"debug\"\n[network]\nmode = \"{}\"\n[runc]\nroot = \"{}\"\n{}\n",
                opts.network_mode,
                dir.join("runc").display(),
                opts.extra_shim_config
            ),
        )
        .expect("write the shim config");
        fs::create_dir_all(dir.join("cni/net.d")).expect("cni dir");
        // CRI's CNI plugins: the standard ones (loopback) and whatever a test adds.
        fs::create_dir_all(dir.join("cni/bin")).expect("cni bin dir");
        if let Ok(entries) = fs::read_dir("/usr/lib/cni") {
            for p in entries.flatten().map(|e| e.path()) {
                let name = p.file_name().expect("a plugin name").to_owned();
                std::os::unix::fs::symlink(&p, dir.join("cni/bin").join(name))
                    .expect("link a CNI plugin");
            }
        }
        let generation = build.generation();
        let conf_d = dir.join("conf.d");
        fs::create_dir_all(&conf_d).expect("conf.d dir");
        let dropin = conf_d.join("nestless.toml");
        fs::write(
            &dropin,
            dropin::adapted(
                generation,
                &Adapt {
                    sandbox_image: PAUSE_IMAGE.into(),
                    shim_config: Some(shim_config.clone()),
                    cni_bin_dir: Some(dir.join("cni/bin")),
                    cni_conf_dir: Some(dir.join("cni/net.d")),
                    restrict_oom_score_adj: true,
                },
            ),
        )
        .expect("write the drop-in");
        // The main config holds what is this containerd's own (root, state, sockets); the
        // CRI and the runtimes come from the shipped drop-in of its generation.
        let config = format!(
            r#"version = {version}
root = "{root}"
state = "{state}"
imports = ["{dropin}"]

[grpc]
  address = "{address}"

[ttrpc]
  address = "{address}.ttrpc"

[debug]
  level = "debug"

[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/opt"
{nri}"#,
            version = generation.number(),
            // containerd 2.x starts NRI by default on one host-wide socket
            // (/var/run/nri/nri.sock): a second containerd running beside it
            // (the tests run two at once) fails "address already in use".
            // Each gets its own, as it gets its own gRPC socket. 1.x has NRI
            // off by default.
            nri = match generation {
                Generation::V3 => format!(
                    "\n[plugins.\"io.containerd.nri.v1.nri\"]\n  socket_path = \"{}/nri.sock\"\n",
                    dir.display()
                ),
                Generation::V2 => String::new(),
            },
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            dropin = dropin.display(),
            address = address.display(),
            dir = dir.display(),
        );
        let config_path = dir.join("config.toml");
        fs::write(&config_path, config).expect("write the containerd config");

        // The shim first, then this containerd's own programs (runc, containerd-shim-runc-v2).
        let path = format!(
            "{}:{}{}",
            shim_dir.display(),
            build
                .bin
                .as_ref()
                .map(|b| format!("{}:", b.display()))
                .unwrap_or_default(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        );
        let log = fs::File::create(dir.join("containerd.log")).expect("containerd log");
        let child = Command::new(build.tool("containerd"))
            .arg("--config")
            .arg(&config_path)
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let mut c = Containerd {
            dir,
            child: Some(child),
            address,
            shim_config,
            shim,
        };
        c.wait_ready(Duration::from_secs(30));
        if opts.pause_image {
            c.import_pause("k8s.io");
        }
        c
    }

    fn wait_ready(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "containerd exited ({status}) at start:\n{}",
                        self.log_tail(60)
                    );
                }
            }
            if self.address.exists() {
                let r = run(
                    self.ctr_command("default", &["version"]),
                    None,
                    Duration::from_secs(10),
                );
                if r.code == 0 {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "containerd did not come up within {limit:?}:\n{}",
                    self.log_tail(60)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last `lines` lines of containerd's log (which holds the shims' logs too).
    pub fn log_tail(&self, lines: usize) -> String {
        let log = fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// containerd's whole log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// The gRPC socket.
    pub fn address(&self) -> &Path {
        &self.address
    }

    /// The private directory (root, state, runc root, configs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The shim configuration file (pass it with `--runtime-config-path`).
    pub fn shim_config(&self) -> &Path {
        &self.shim_config
    }

    /// The shim binary in use.
    pub fn shim(&self) -> &Path {
        &self.shim
    }

    /// The runc root the shim uses for namespace `ns`.
    pub fn runc_root(&self, ns: &str) -> PathBuf {
        self.dir.join("runc").join(ns)
    }

    /// The bundle directory containerd gives container `id` of namespace `ns`.
    pub fn bundle(&self, ns: &str, id: &str) -> PathBuf {
        self.dir
            .join("state/io.containerd.runtime.v2.task")
            .join(ns)
            .join(id)
    }

    /// A `ctr --address ... -n NS ARGS...` command.
    pub fn ctr_command(&self, ns: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(build().tool("ctr"));
        cmd.arg("--address")
            .arg(&self.address)
            .args(["-n", ns])
            .args(args);
        cmd
    }

    /// Runs `ctr`, without judging the result.
    pub fn ctr(&self, ns: &str, args: &[&str]) -> CmdResult {
        run(self.ctr_command(ns, args), None, CTR_TIMEOUT)
    }

    /// Runs `ctr` with `stdin` data.
    pub fn ctr_stdin(&self, ns: &str, args: &[&str], stdin: &[u8]) -> CmdResult {
        run(self.ctr_command(ns, args), Some(stdin), CTR_TIMEOUT)
    }

    /// Runs `ctr` and panics unless it succeeds; returns stdout.
    pub fn ctr_ok(&self, ns: &str, args: &[&str]) -> String {
        let r = self.ctr(ns, args);
        if r.code != 0 {
            panic!(
                "`{}` failed with {}:\nstdout: {}\nstderr: {}\ncontainerd log:\n{}",
                r.command,
                r.code,
                r.stdout,
                r.stderr,
                self.log_tail(40)
            );
        }
        r.stdout
    }

    /// Runs `ctr` inside a pseudo-terminal (`script`), for `-t`; returns what the terminal showed.
    pub fn ctr_tty(&self, ns: &str, args: &[&str]) -> CmdResult {
        require_tool("script", "bsdutils");
        let mut line = format!(
            "{} --address {} -n {}",
            shell_quote(&build().tool("ctr").to_string_lossy()),
            shell_quote(&self.address.to_string_lossy()),
            shell_quote(ns)
        );
        for a in args {
            line.push(' ');
            line.push_str(&shell_quote(a));
        }
        let mut cmd = Command::new("script");
        cmd.args(["-q", "-e", "-c", &line, "/dev/null"]);
        run(cmd, None, CTR_TIMEOUT)
    }

    /// Imports an OCI archive into namespace `ns`.
    pub fn import(&self, ns: &str, archive: &Path) {
        self.ctr_ok(ns, &["images", "import", &archive.to_string_lossy()]);
    }

    /// Imports the busybox image into `ns` (see [`BUSYBOX_IMAGE`]).
    pub fn import_busybox(&self, ns: &str) {
        self.import(ns, &busybox_archive());
    }

    /// Imports the pause image into `ns` (CRI uses `k8s.io`; see [`PAUSE_IMAGE`]).
    pub fn import_pause(&self, ns: &str) {
        self.import(ns, &pause_archive());
    }

    /// `ctr run` arguments that select the shim: `--runtime R --runtime-config-path C`.
    pub fn runtime_args(&self) -> Vec<String> {
        vec![
            "--runtime".into(),
            RUNTIME.into(),
            "--runtime-config-path".into(),
            self.shim_config.to_string_lossy().into_owned(),
        ]
    }

    /// Pids of the shim processes serving this containerd (in namespace `ns` if given).
    pub fn shim_pids(&self, ns: Option<&str>) -> Vec<u32> {
        self.shim_pids_of(SHIM_BINARY, ns)
    }

    /// Pids of the serving processes of shim `binary` (a file name, e.g.
    /// `containerd-shim-runc-v2`) for this containerd (in namespace `ns` if given).
    pub fn shim_pids_of(&self, binary: &str, ns: Option<&str>) -> Vec<u32> {
        let mut pids = Vec::new();
        let Ok(dir) = fs::read_dir("/proc") else {
            return pids;
        };
        let address = self.address.to_string_lossy().into_owned();
        for entry in dir.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let is_shim = args.first().is_some_and(|a| a.ends_with(binary));
            let ours = args
                .windows(2)
                .any(|w| w[0] == "-address" && w[1] == address);
            let in_ns = match ns {
                None => true,
                Some(ns) => args.windows(2).any(|w| w[0] == "-namespace" && w[1] == ns),
            };
            // Only serving shims (start/delete are short-lived helpers).
            let serving = !args.iter().any(|a| a == "start" || a == "delete");
            if is_shim && ours && in_ns && serving {
                pids.push(pid);
            }
        }
        pids.sort_unstable();
        pids
    }

    /// Waits until no shim serves namespace `ns`; panics with the survivors otherwise.
    pub fn assert_no_shim_left(&self, ns: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let pids = self.shim_pids(Some(ns));
            if pids.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "shim processes {pids:?} still serve namespace {ns} after {limit:?}\ncontainerd log:\n{}",
                    self.log_tail(40)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Panics if runc still has container state for namespace `ns`.
    pub fn assert_no_runc_state(&self, ns: &str) {
        let root = self.runc_root(ns);
        let left: Vec<String> = fs::read_dir(&root)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "runc state left in {}: {left:?}",
            root.display()
        );
    }

    /// Resident set size (KiB) of a process.
    pub fn rss_kib(pid: u32) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    }

    fn cleanup(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: plain kill(2) on the pid of our own child.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Shims outlive containerd by design: stop ours, and remove their sockets.
        for pid in self.shim_pids(None) {
            let socket = fs::read(format!("/proc/{pid}/cmdline")).ok().and_then(|c| {
                let args: Vec<String> = c
                    .split(|b| *b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                args.windows(2)
                    .find(|w| w[0] == "-socket")
                    .map(|w| w[1].clone())
            });
            // SAFETY: plain kill(2).
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
            if let Some(s) = socket {
                let _ = fs::remove_file(s.trim_start_matches("unix://"));
            }
        }
        // Containers the tests left behind.
        if let Ok(namespaces) = fs::read_dir(self.dir.join("runc")) {
            for ns in namespaces.flatten() {
                if let Ok(containers) = fs::read_dir(ns.path()) {
                    for c in containers.flatten() {
                        let _ = Command::new(build().tool("runc"))
                            .arg("--root")
                            .arg(ns.path())
                            .args(["delete", "--force"])
                            .arg(c.file_name())
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .status();
                    }
                }
            }
        }
        unmount_under(&self.dir);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- containerd log (last 80 lines) ---\n{}",
                self.log_tail(80)
            );
        }
        self.cleanup();
    }
}

/// Unmounts (lazily) everything mounted under `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.to_string_lossy().into_owned();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| p.replace("\\040", " "))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        if let Ok(c) = std::ffi::CString::new(p) {
            // SAFETY: umount2 with a valid NUL-terminated path.
            unsafe {
                libc::umount2(c.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}

/// Quotes `s` for sh.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@,+".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Subscribes to containerd's events (`ctr events`) until dropped.
pub struct Events {
    child: Child,
    reader: Option<thread::JoinHandle<String>>,
}

impl Events {
    /// Starts `ctr events` against `c`.
    pub fn subscribe(c: &Containerd) -> Events {
        let mut cmd = Command::new(build().tool("ctr"));
        cmd.arg("--address").arg(c.address()).arg("events");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("start ctr events");
        let mut out = child.stdout.take().expect("piped");
        let reader = thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        // Let the subscription settle before the test acts.
        thread::sleep(Duration::from_millis(300));
        Events {
            child,
            reader: Some(reader),
        }
    }

    /// Stops the subscription and returns the lines seen (`time ns topic event`).
    pub fn stop(mut self) -> Vec<String> {
        thread::sleep(Duration::from_millis(300));
        let _ = self.child.kill();
        let _ = self.child.wait();
        let s = self
            .reader
            .take()
            .and_then(|r| r.join().ok())
            .unwrap_or_default();
        s.lines().map(str::to_owned).collect()
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
