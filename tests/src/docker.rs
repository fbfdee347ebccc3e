//! A private Docker daemon for tests, on a private [`Containerd`], with the shim as a
//! named runtime.
//!
//! [`Docker::start`] runs the `dockerd` of the folder `NESTLESS_DOCKER` names (made by
//! `tests/lib/versions.sh`: Debian's docker.io and docker-cli, unpacked) on a directory
//! of its own: data root, exec root, socket, pid file, `daemon.json`, the CLI's config.
//! Its default bridge network is a random bridge of the test; it touches no iptables
//! (`--iptables=false`), so that two daemons, and the machine's own, do not meet.
//!
//! ```text
//!  test ──docker -H unix://<dir>/docker.sock──▶ dockerd ──▶ containerd (namespace moby)
//!                                                  │ daemon.json: runtimes.nestless =
//!                                                  │   {runtimeType: io.containerd.nestless.v2,
//!                                                  │    options: {ConfigPath: shim.toml}}
//!                                                  └──▶ containerd-shim-nestless-v2 ──▶ runc
//! ```
//!
//! Dropping it removes every container, stops the daemon, unmounts and removes its
//! directory. Nothing here skips: a missing `NESTLESS_DOCKER` is a panic saying how to
//! get it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{
    containerd::{busybox_archive, random_name, run, CmdResult, Containerd},
    netenv::{random_subnet, Bridge},
};

/// The name of the shim's runtime in `daemon.json`.
pub const DOCKER_RUNTIME: &str = "nestless";
/// The busybox image, imported from the same layer as the containerd tests' image.
pub const DOCKER_BUSYBOX: &str = "nestless/busybox:test";

/// How long one `docker` command may take.
pub const DOCKER_TIMEOUT: Duration = Duration::from_secs(120);

/// The Docker under test: the folder `NESTLESS_DOCKER` names (`bin/` with dockerd and
/// docker, `VERSION`).
pub fn docker_dir() -> PathBuf {
    let d = std::env::var_os("NESTLESS_DOCKER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
            "NESTLESS_DOCKER is not set: run `. tests/lib/versions.sh && fetch_versions` and set \
             it to a docker-NN folder (tests/run.sh does both); this test does not skip"
        )
        });
    assert!(
        d.join("bin/dockerd").exists() && d.join("bin/docker").exists(),
        "NESTLESS_DOCKER={} has no bin/dockerd and bin/docker",
        d.display()
    );
    d
}

/// A running private Docker daemon; stopped and cleaned on drop (before its containerd).
pub struct Docker {
    dir: PathBuf,
    bin: PathBuf,
    child: Option<Child>,
    socket: PathBuf,
    /// The version `dockerd --version` printed.
    pub version: String,
    /// Docker's default bridge.
    pub bridge: Bridge,
    /// The containerd it runs on (dropped after the daemon).
    pub containerd: Containerd,
}

impl Docker {
    /// Starts dockerd on `containerd`, with runtime `nestless` reading `shim_config`;
    /// imports [`DOCKER_BUSYBOX`]. Panics with the daemon's log if it does not come up.
    pub fn start(containerd: Containerd, shim_config: &Path) -> Docker {
        let folder = docker_dir();
        let bin = folder.join("bin");
        let dir = PathBuf::from(format!("/tmp/{}", random_name("nl-dkd")));
        fs::create_dir_all(&dir).expect("create the docker test directory");
        let socket = dir.join("docker.sock");
        let daemon_json = serde_json::json!({
            "runtimes": {
                DOCKER_RUNTIME: {
                    "runtimeType": crate::containerd::RUNTIME,
                    "options": { "ConfigPath": shim_config.to_string_lossy() }
                }
            }
        });
        fs::write(dir.join("daemon.json"), daemon_json.to_string()).expect("daemon.json");
        let bridge = Bridge::new(Some(&format!("{}.1/24", random_subnet())));
        let version = run(
            {
                let mut c = Command::new(bin.join("dockerd"));
                c.arg("--version");
                c
            },
            None,
            Duration::from_secs(20),
        )
        .ok()
        .trim()
        .to_owned();
        eprintln!("[docker] {version} ({})", folder.display());
        let log = fs::File::create(dir.join("dockerd.log")).expect("dockerd log");
        let path = format!(
            "{}:{}:{}",
            containerd.shim().parent().expect("shim dir").display(),
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let child = Command::new(bin.join("dockerd"))
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("docker.pid"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .arg("--containerd")
            .arg(containerd.address())
            .arg("--config-file")
            .arg(dir.join("daemon.json"))
            .args([
                "--iptables=false",
                "--ip6tables=false",
                "--userland-proxy=false",
            ])
            .arg("--bridge")
            .arg(&bridge.name)
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        let mut d = Docker {
            dir,
            bin,
            child: Some(child),
            socket,
            version,
            bridge,
            containerd,
        };
        d.wait_ready(Duration::from_secs(60));
        d.import_busybox();
        d
    }

    fn wait_ready(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("dockerd exited ({status}) at start:\n{}", self.log_tail(40));
            }
            if self.socket.exists() && self.docker(&["version"]).code == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "dockerd did not come up within {limit:?}:\n{}",
                self.log_tail(40)
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// The last `lines` lines of dockerd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The private directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A `docker -H <socket> ARGS` command.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(self.bin.join("docker"));
        c.env("DOCKER_CONFIG", self.dir.join("cli"))
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args);
        c
    }

    /// Runs `docker ARGS`, without judging the result.
    pub fn docker(&self, args: &[&str]) -> CmdResult {
        run(self.command(args), None, DOCKER_TIMEOUT)
    }

    /// Runs `docker ARGS` and panics (with both daemons' logs) unless it succeeds.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        let r = self.docker(args);
        if r.code != 0 {
            panic!(
                "`{}` failed with {}:\nstdout: {}\nstderr: {}\ndockerd log:\n{}\ncontainerd log:\n{}",
                r.command,
                r.code,
                r.stdout,
                r.stderr,
                self.log_tail(30),
                self.containerd.log_tail(30)
            );
        }
        r.stdout
    }

    /// Imports the busybox layer of the containerd tests' OCI archive as [`DOCKER_BUSYBOX`]
    /// (`docker import`: the classic image store of Docker 26 and 28 loads no OCI archive).
    fn import_busybox(&self) {
        let oci = self.dir.join("oci");
        fs::create_dir_all(&oci).expect("oci dir");
        let out = Command::new("tar")
            .arg("-xf")
            .arg(busybox_archive())
            .arg("-C")
            .arg(&oci)
            .output()
            .expect("run tar");
        assert!(
            out.status.success(),
            "cannot unpack the busybox archive: {out:?}"
        );
        let blob = |digest: &str| {
            oci.join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:"))
        };
        let json = |p: PathBuf| -> serde_json::Value {
            serde_json::from_slice(&fs::read(&p).expect("an OCI blob")).expect("OCI JSON")
        };
        let index = json(oci.join("index.json"));
        let manifest = json(blob(
            index["manifests"][0]["digest"]
                .as_str()
                .expect("a manifest"),
        ));
        let layer = blob(manifest["layers"][0]["digest"].as_str().expect("a layer"));
        self.docker_ok(&[
            "import",
            "-c",
            "CMD [\"sh\"]",
            &layer.to_string_lossy(),
            DOCKER_BUSYBOX,
        ]);
        let _ = fs::remove_dir_all(&oci);
    }

    /// `docker run --runtime nestless FLAGS busybox CMD...` as arguments.
    pub fn run_args<'a>(flags: &[&'a str], cmd: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["run", "--runtime", DOCKER_RUNTIME];
        v.extend_from_slice(flags);
        v.push(DOCKER_BUSYBOX);
        v.extend_from_slice(cmd);
        v
    }

    /// `docker inspect -f FORMAT NAME`, trimmed.
    pub fn inspect(&self, name: &str, format: &str) -> String {
        self.docker_ok(&["inspect", "-f", format, name])
            .trim()
            .to_owned()
    }

    /// Waits until `docker inspect -f FORMAT NAME` prints `want`.
    pub fn wait_inspect(&self, name: &str, format: &str, want: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let r = self.docker(&["inspect", "-f", format, name]);
            if r.code == 0 && r.stdout.trim() == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: `{format}` is {:?}, not {want:?}, after {limit:?}\n{}",
                r.stdout.trim(),
                self.log_tail(20)
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn cleanup(&mut self) {
        let ids = self.docker(&["ps", "-aq"]).stdout;
        for id in ids.split_whitespace() {
            let _ = self.docker(&["rm", "-f", id]);
        }
        if let Some(mut child) = self.child.take() {
            // SAFETY: plain kill(2) on the pid of our own child.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        crate::containerd::unmount_under(&self.dir);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("--- dockerd log (last 60 lines) ---\n{}", self.log_tail(60));
        }
        self.cleanup();
    }
}
