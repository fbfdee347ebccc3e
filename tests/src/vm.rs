//! Real QEMU guests for tests: vsock through vhost-device-vsock, QMP, hot-plug ports, and a
//! command server in the guest.
//!
//! A [`Vm`] is two processes and a private temporary directory:
//!
//! ```text
//!   test process                     <dir>/ (one per VM)               guest
//!   ------------                     -------------------               -----
//!   VmBuilder::start
//!     spawn vhost-device-vsock ----> vhost.sock (QEMU's vhost-user end)
//!                                    vsock.sock (host end: CONNECT <port>)
//!                                    vsock.sock_<port> <-------------- connect(CID 2, port)
//!     spawn qemu-system-x86_64 ----> qmp.sock (for the code under test, e.g. the agent)
//!                                    qmp-harness.sock (for Vm::qmp)
//!                                    console.log (serial) <----------- init, kernel
//!   Vm::wait_ready: polls console.log for "NESTLESS-VM-READY"
//!   Vm::exec ----------------------> vsock.sock "CONNECT 1024" ------> nestless-vm-exec
//!   drop(Vm): SIGKILL both, remove <dir>
//! ```
//!
//! The guest image comes from `tests/vm/build-guest.sh` through [`GuestImage`], cached on
//! disk. The accelerator is KVM when a probe boot works, else TCG ([`Accel::detect`]).
//! Nothing here skips: a missing QEMU, vhost-device-vsock, kernel or image is a panic that
//! says what to install.
//!
//! ```no_run
//! use nestless_tests::vm::Vm;
//! use std::time::Duration;
//!
//! let vm = Vm::builder().root_ports(2).start();
//! vm.wait_ready(Duration::from_secs(120));
//! let links = vm.exec_ok("ip -o link");
//! assert!(links.contains("lo"));
//! // Hand vm.qmp_path() and vm.vsock_uds() to the agent under test.
//! ```

#![warn(missing_docs)]

mod accel;
mod error;
pub mod exec;
mod image;
mod process;
pub mod qmp;
mod tap;

use std::collections::HashSet;
use std::fs::{self, File};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

pub use accel::Accel;
pub use error::{chain, VmError};
pub use exec::{ExecOutput, GuestCommand, GuestExit};
pub use image::{cache_dir, exec_server_binary, scripts_dir, GuestImage, GuestVariant};
pub use qmp::Qmp;
pub use tap::HostTap;

/// The line prefix the guest prints on its console once it is ready.
pub const READY_MARKER: &str = "NESTLESS-VM-READY";

/// The line prefix the guest prints when its init fails.
pub const FAILED_MARKER: &str = "NESTLESS-VM-FAILED";

/// The most root ports [`VmBuilder::root_ports`] lays out (slots 0x08-0x1e, 8 functions each).
pub const MAX_ROOT_PORTS: u32 = 23 * 8;

/// How long [`VmBuilder::boot`] waits for the guest.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(180);

/// The longest unix socket path (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The file in a VM's directory that names the process that owns it.
const OWNER_FILE: &str = "owner.pid";

/// The emulated machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    /// `q35` with `pcie-root-port`s `rp1..rpN` for hot-plug (one device per port).
    Q35,
    /// `pc` (i440fx): hot-plug straight onto `pci.0` (about 30 slots); no root ports.
    Pc,
}

impl Machine {
    fn as_str(self) -> &'static str {
        match self {
            Machine::Q35 => "q35",
            Machine::Pc => "pc",
        }
    }
}

/// Configures and starts a [`Vm`].
#[derive(Debug, Clone)]
pub struct VmBuilder {
    image: Option<GuestImage>,
    machine: Machine,
    root_ports: u32,
    memory_mib: Option<u32>,
    cpus: u32,
    cid: Option<u32>,
    accel: Option<Accel>,
    kernel_args: Vec<String>,
    qemu_args: Vec<String>,
}

impl Default for VmBuilder {
    fn default() -> Self {
        VmBuilder {
            image: None,
            machine: Machine::Q35,
            root_ports: 4,
            memory_mib: None,
            cpus: 1,
            cid: None,
            accel: None,
            kernel_args: Vec::new(),
            qemu_args: Vec::new(),
        }
    }
}

impl VmBuilder {
    /// A q35 VM with 4 root ports, 1 CPU, the minimal image.
    pub fn new() -> Self {
        Self::default()
    }

    /// The guest image (default [`GuestImage::minimal`]).
    pub fn image(mut self, image: GuestImage) -> Self {
        self.image = Some(image);
        self
    }

    /// The machine type (default [`Machine::Q35`]).
    pub fn machine(mut self, machine: Machine) -> Self {
        self.machine = machine;
        self
    }

    /// How many `pcie-root-port`s (ids `rp1..rpN`) a q35 VM gets (default 4, at most
    /// [`MAX_ROOT_PORTS`]); ignored for [`Machine::Pc`].
    pub fn root_ports(mut self, n: u32) -> Self {
        self.root_ports = n;
        self
    }

    /// Guest memory in MiB (default 512 for the minimal image, 1024 for the full one).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = Some(mib);
        self
    }

    /// Virtual CPUs (default 1).
    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }

    /// The guest's vsock CID (default: random, unique in this process, at least 3).
    pub fn cid(mut self, cid: u32) -> Self {
        self.cid = Some(cid);
        self
    }

    /// Forces an accelerator instead of [`Accel::detect`].
    pub fn accel(mut self, accel: Accel) -> Self {
        self.accel = Some(accel);
        self
    }

    /// Appends to the kernel command line (e.g. `loglevel=7` to see the kernel's messages).
    pub fn kernel_arg(mut self, arg: impl Into<String>) -> Self {
        self.kernel_args.push(arg.into());
        self
    }

    /// Appends a raw QEMU argument.
    pub fn qemu_arg(mut self, arg: impl Into<String>) -> Self {
        self.qemu_args.push(arg.into());
        self
    }

    /// Starts the VM without waiting for the guest; see [`Vm::wait_ready`].
    ///
    /// # Panics
    /// When QEMU, vhost-device-vsock or the image is missing, or a process cannot start.
    pub fn start(self) -> Vm {
        self.try_start()
            .unwrap_or_else(|e| panic!("cannot start a test VM: {}", chain(&e)))
    }

    /// Starts the VM and waits up to [`DEFAULT_READY_TIMEOUT`] for the guest.
    ///
    /// # Panics
    /// As [`start`](Self::start) and [`Vm::wait_ready`].
    pub fn boot(self) -> Vm {
        let vm = self.start();
        vm.wait_ready(DEFAULT_READY_TIMEOUT);
        vm
    }

    /// Starts the VM, returning errors instead of panicking.
    pub fn try_start(self) -> Result<Vm, VmError> {
        if self.machine == Machine::Q35 && self.root_ports > MAX_ROOT_PORTS {
            return Err(VmError::Invalid(format!(
                "{} root ports asked, at most {MAX_ROOT_PORTS} fit",
                self.root_ports
            )));
        }
        let qemu_bin = find_program("qemu-system-x86_64", &[]).ok_or_else(|| VmError::Missing {
            what: "qemu-system-x86_64".into(),
            hint: "apt-get install qemu-system-x86".into(),
        })?;
        let vhost_bin = find_vhost_device_vsock()?;
        let image = match self.image {
            Some(image) => image,
            None => GuestImage::cached(GuestVariant::Minimal)?,
        };
        let accel = self.accel.unwrap_or_else(|| Accel::detect(&image.kernel()));
        let memory_mib = self.memory_mib.unwrap_or(match image.variant() {
            GuestVariant::Minimal => 512,
            GuestVariant::Full => 1024,
        });
        let cid = Cid::claim(self.cid);
        let name = format!("nlvm-{:06x}", rand::random::<u32>() & 0xff_ffff);
        sweep_dead_vm_dirs();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir()
            .map_err(|e| VmError::io("a temporary directory for the VM", e))?;
        let owner = dir.path().join(OWNER_FILE);
        fs::write(&owner, std::process::id().to_string())
            .map_err(|e| VmError::io(owner.display().to_string(), e))?;
        let paths = VmPaths::new(dir.path());
        let longest = format!("{}_{}", paths.vsock_uds.display(), u32::MAX);
        if longest.len() > MAX_SOCKET_PATH {
            return Err(VmError::Invalid(format!(
                "socket paths like {longest} exceed {MAX_SOCKET_PATH} bytes: set TMPDIR to a \
                 shorter directory"
            )));
        }

        let mut vhost = Command::new(&vhost_bin);
        vhost
            .arg("--vm")
            .arg(format!(
                "guest-cid={},socket={},uds-path={}",
                cid.0,
                paths.vhost_socket.display(),
                paths.vsock_uds.display()
            ))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log_file(&paths.vhost_log)?)
            .stderr(log_file(&paths.vhost_log)?);
        let vhost = process::spawn_tied(vhost).map_err(|source| VmError::Spawn {
            program: vhost_bin.display().to_string(),
            source,
        })?;
        let mut vm = Vm {
            name,
            cid,
            machine: self.machine,
            accel,
            root_ports: if self.machine == Machine::Q35 {
                self.root_ports
            } else {
                0
            },
            image,
            paths,
            qemu: None,
            vhost: Mutex::new(vhost),
            started: Instant::now(),
            dir: Some(dir),
        };
        vm.wait_for_vhost_socket()?;

        let mut qemu = Command::new(&qemu_bin);
        qemu.args(vm.qemu_args(memory_mib, self.cpus, &self.kernel_args))
            .args(&self.qemu_args)
            .current_dir(vm.dir())
            .stdin(Stdio::null())
            .stdout(log_file(&vm.paths.qemu_log)?)
            .stderr(log_file(&vm.paths.qemu_log)?);
        vm.started = Instant::now();
        let qemu = process::spawn_tied(qemu).map_err(|source| VmError::Spawn {
            program: qemu_bin.display().to_string(),
            source,
        })?;
        vm.qemu = Some(Mutex::new(qemu));
        Ok(vm)
    }
}

/// Where a VM's sockets and logs are, inside its private directory.
#[derive(Debug)]
struct VmPaths {
    qmp: PathBuf,
    qmp_harness: PathBuf,
    vhost_socket: PathBuf,
    vsock_uds: PathBuf,
    console: PathBuf,
    qemu_log: PathBuf,
    vhost_log: PathBuf,
}

impl VmPaths {
    fn new(dir: &Path) -> Self {
        VmPaths {
            qmp: dir.join("qmp.sock"),
            qmp_harness: dir.join("qmp-harness.sock"),
            vhost_socket: dir.join("vhost.sock"),
            vsock_uds: dir.join("vsock.sock"),
            console: dir.join("console.log"),
            qemu_log: dir.join("qemu.log"),
            vhost_log: dir.join("vhost-device-vsock.log"),
        }
    }
}

/// A guest CID, unique among this process's live VMs.
#[derive(Debug)]
struct Cid(u32);

static CIDS: Mutex<Option<HashSet<u32>>> = Mutex::new(None);

fn live_cids() -> MutexGuard<'static, Option<HashSet<u32>>> {
    CIDS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Cid {
    fn claim(wanted: Option<u32>) -> Cid {
        let mut guard = live_cids();
        let live = guard.get_or_insert_with(HashSet::new);
        let cid = match wanted {
            Some(cid) => cid,
            None => loop {
                let cid = 3 + rand::random::<u32>() % 0x7fff_0000;
                if !live.contains(&cid) {
                    break cid;
                }
            },
        };
        live.insert(cid);
        Cid(cid)
    }
}

impl Drop for Cid {
    fn drop(&mut self) {
        if let Some(live) = live_cids().as_mut() {
            live.remove(&self.0);
        }
    }
}

/// What [`Vm::wait_ready`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// From starting QEMU to seeing the marker, on the host.
    pub boot: Duration,
    /// The guest's uptime when it printed the marker.
    pub guest_uptime: Option<Duration>,
    /// The whole marker line, e.g. `NESTLESS-VM-READY uptime=3.41 containerd-ready=6.02`.
    pub line: String,
}

impl Ready {
    /// A `key=value` field of the marker line, e.g. `containerd-ready`.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.line
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    }
}

/// A running QEMU guest; dropping it kills QEMU and vhost-device-vsock and removes its
/// directory (set `NESTLESS_VM_KEEP=1` to keep the directory and its logs).
///
/// `Vm` is `Send + Sync`: share it between threads by reference or `Arc`. Its methods
/// block; from async code call them in `spawn_blocking`.
#[derive(Debug)]
pub struct Vm {
    name: String,
    cid: Cid,
    machine: Machine,
    accel: Accel,
    root_ports: u32,
    image: GuestImage,
    paths: VmPaths,
    qemu: Option<Mutex<Child>>,
    vhost: Mutex<Child>,
    started: Instant,
    // Last field: dropped after the processes are dead.
    dir: Option<tempfile::TempDir>,
}

impl Vm {
    /// A builder with the defaults (q35, 4 root ports, minimal image).
    pub fn builder() -> VmBuilder {
        VmBuilder::new()
    }

    /// The VM's unique name (`nlvm-xxxxxx`), also the guest's hostname.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The guest's vsock CID.
    pub fn cid(&self) -> u32 {
        self.cid.0
    }

    /// The machine type.
    pub fn machine(&self) -> Machine {
        self.machine
    }

    /// The accelerator QEMU runs with.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The image the VM booted.
    pub fn image(&self) -> &GuestImage {
        &self.image
    }

    /// The VM's private directory (sockets and logs).
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("the directory lives as long as the VM")
            .path()
    }

    /// QEMU's QMP socket, for the code under test (QEMU serves one client at a time on it;
    /// the harness's own [`qmp`](Self::qmp) uses a second monitor).
    pub fn qmp_path(&self) -> &Path {
        &self.paths.qmp
    }

    /// vhost-device-vsock's host socket: connect and write `CONNECT <port>\n` to reach a
    /// guest port; a host service for guest port P listens on `<this path>_P`.
    pub fn vsock_uds(&self) -> &Path {
        &self.paths.vsock_uds
    }

    /// The socket path on which a host service must listen for guest connections to `port`.
    pub fn vsock_listen_path(&self, port: u32) -> PathBuf {
        PathBuf::from(format!("{}_{port}", self.paths.vsock_uds.display()))
    }

    /// The serial console's log file.
    pub fn console_log(&self) -> &Path {
        &self.paths.console
    }

    /// The ids of the hot-plug root ports, `rp1..rpN` (empty for [`Machine::Pc`]).
    pub fn root_port_ids(&self) -> Vec<String> {
        (1..=self.root_ports).map(|i| format!("rp{i}")).collect()
    }

    /// The bus to give `device_add` for hot-plug slot `i` (1-based): `rp<i>` on q35, `pci.0`
    /// on pc.
    pub fn hotplug_bus(&self, i: u32) -> String {
        match self.machine {
            Machine::Q35 => {
                assert!(
                    (1..=self.root_ports).contains(&i),
                    "VM {} has root ports 1..={}, not {i}",
                    self.name,
                    self.root_ports
                );
                format!("rp{i}")
            }
            Machine::Pc => "pci.0".into(),
        }
    }

    /// Waits until the guest prints [`READY_MARKER`] (exec server listening; containerd up
    /// in the full image).
    ///
    /// # Panics
    /// When the guest fails, QEMU exits, or `timeout` passes; the message carries the
    /// console and QEMU logs.
    pub fn wait_ready(&self, timeout: Duration) -> Ready {
        self.try_wait_ready(timeout)
            .unwrap_or_else(|e| self.fail(&format!("VM not ready: {}", chain(&e))))
    }

    /// Like [`wait_ready`](Self::wait_ready), returning errors instead of panicking.
    pub fn try_wait_ready(&self, timeout: Duration) -> Result<Ready, VmError> {
        let deadline = Instant::now() + timeout;
        let failed = |reason: String| VmError::Failed {
            vm: self.name.clone(),
            what: "the ready marker".into(),
            reason,
        };
        loop {
            let console = self.console();
            // Anywhere in a line: other console output may run into it.
            if let Some(line) = console
                .lines()
                .find_map(|l| l.find(READY_MARKER).map(|i| &l[i..]))
            {
                let line = line.trim().to_owned();
                let guest_uptime = line
                    .split_whitespace()
                    .find_map(|kv| kv.strip_prefix("uptime="))
                    .and_then(|s| s.parse::<f64>().ok())
                    .map(Duration::from_secs_f64);
                return Ok(Ready {
                    boot: self.started.elapsed(),
                    guest_uptime,
                    line,
                });
            }
            if let Some(line) = console.lines().find(|l| l.contains(FAILED_MARKER)) {
                return Err(failed(line.to_owned()));
            }
            if console.contains("Kernel panic") {
                return Err(failed("kernel panic".into()));
            }
            if let Some(status) = self.qemu_exit_status() {
                return Err(failed(format!("QEMU exited ({status})")));
            }
            if Instant::now() >= deadline {
                return Err(VmError::Timeout {
                    what: format!("{READY_MARKER} on the console of VM {}", self.name),
                    after: timeout,
                });
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs `script` with the guest's `/bin/sh -c` and returns what it produced, whatever its
    /// exit status.
    ///
    /// # Panics
    /// When the command cannot be delivered or its reply read.
    pub fn exec(&self, script: &str) -> ExecOutput {
        self.run(&GuestCommand::shell(script))
    }

    /// Runs `script` like [`exec`](Self::exec) and returns its stdout.
    ///
    /// # Panics
    /// Also when the script does not exit with 0; the message shows its output.
    pub fn exec_ok(&self, script: &str) -> String {
        let out = self.exec(script);
        if !out.success() {
            self.fail(&format!(
                "`{script}` in VM {} ended with {:?}\nstdout:\n{}\nstderr:\n{}",
                self.name,
                out.status,
                out.stdout_str(),
                out.stderr_str()
            ));
        }
        out.stdout_str()
    }

    /// Runs `cmd` in the guest.
    ///
    /// # Panics
    /// When the command cannot be delivered or its reply read.
    pub fn run(&self, cmd: &GuestCommand) -> ExecOutput {
        self.try_run(cmd).unwrap_or_else(|e| {
            self.fail(&format!(
                "cannot run {:?} in VM {}: {}",
                cmd.argv(),
                self.name,
                chain(&e)
            ))
        })
    }

    /// Runs `cmd` in the guest, returning errors instead of panicking.
    pub fn try_run(&self, cmd: &GuestCommand) -> Result<ExecOutput, VmError> {
        exec::run(&self.paths.vsock_uds, cmd)
    }

    /// Opens a stream to guest vsock `port` (something in the guest must listen on it).
    pub fn connect_vsock(&self, port: u32, timeout: Duration) -> Result<UnixStream, VmError> {
        exec::connect_vsock(&self.paths.vsock_uds, port, timeout)
    }

    /// A QMP session on the harness's own monitor (one at a time).
    ///
    /// # Panics
    /// When QEMU's monitor does not answer within 10 s.
    pub fn qmp(&self) -> Qmp {
        Qmp::connect(&self.paths.qmp_harness, Duration::from_secs(10))
            .unwrap_or_else(|e| self.fail(&format!("no QMP: {}", chain(&e))))
    }

    /// The serial console so far.
    pub fn console(&self) -> String {
        fs::read(&self.paths.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last lines of the console, QEMU's and vhost-device-vsock's logs, for messages.
    pub fn diagnostics(&self) -> String {
        let tail = |path: &Path, n: usize| {
            let text = fs::read(path)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()));
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        };
        format!(
            "--- VM {} (cid {}, {}, {}, dir {}) console:\n{}\n--- qemu log:\n{}\n--- vhost-device-vsock:\n{}\n---",
            self.name,
            self.cid.0,
            self.machine.as_str(),
            self.accel.as_str(),
            self.dir().display(),
            tail(&self.paths.console, 60),
            tail(&self.paths.qemu_log, 20),
            tail(&self.paths.vhost_log, 20),
        )
    }

    fn fail(&self, what: &str) -> ! {
        panic!("{what}\n{}", self.diagnostics())
    }

    fn qemu_exit_status(&self) -> Option<std::process::ExitStatus> {
        let qemu = self.qemu.as_ref()?;
        let mut child = qemu.lock().unwrap_or_else(|p| p.into_inner());
        child.try_wait().ok().flatten()
    }

    fn wait_for_vhost_socket(&self) -> Result<(), VmError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.paths.vhost_socket.exists() {
            let exited = self.vhost.lock().unwrap().try_wait().ok().flatten();
            if let Some(status) = exited {
                return Err(VmError::Failed {
                    vm: self.name.clone(),
                    what: "vhost-device-vsock's socket".into(),
                    reason: format!(
                        "vhost-device-vsock exited ({status}): {}",
                        fs::read_to_string(&self.paths.vhost_log).unwrap_or_default()
                    ),
                });
            }
            if Instant::now() >= deadline {
                return Err(VmError::Timeout {
                    what: format!("{}", self.paths.vhost_socket.display()),
                    after: Duration::from_secs(10),
                });
            }
            thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    fn qemu_args(&self, memory_mib: u32, cpus: u32, kernel_args: &[String]) -> Vec<String> {
        let p = &self.paths;
        // Self-tests, speculation mitigations, audit and AppArmor cost seconds under TCG and
        // buy a test guest nothing.
        let mut append = format!(
            "console=ttyS0 quiet panic=-1 cryptomgr.notests mitigations=off audit=0 apparmor=0 \
             nestless.name={}",
            self.name
        );
        for arg in kernel_args {
            append.push(' ');
            append.push_str(arg);
        }
        let mut args: Vec<String> = vec![
            "-name".into(),
            self.name.clone(),
            "-machine".into(),
            self.machine.as_str().into(),
            "-accel".into(),
            self.accel.as_str().into(),
            "-cpu".into(),
            self.accel.cpu().into(),
            "-smp".into(),
            cpus.to_string(),
            "-m".into(),
            format!("{memory_mib}M"),
            "-display".into(),
            "none".into(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-no-reboot".into(),
            "-nic".into(),
            "none".into(),
            "-serial".into(),
            format!("file:{}", p.console.display()),
            "-kernel".into(),
            self.image.kernel().display().to_string(),
            "-initrd".into(),
            self.image.initrd().display().to_string(),
            "-append".into(),
            append,
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", p.qmp.display()),
            "-chardev".into(),
            format!(
                "socket,id=harness-qmp,path={},server=on,wait=off",
                p.qmp_harness.display()
            ),
            "-mon".into(),
            "chardev=harness-qmp,mode=control".into(),
            // vhost-user needs guest memory that another process can map.
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={memory_mib}M,share=on"),
            "-numa".into(),
            "node,memdev=mem".into(),
            "-chardev".into(),
            format!("socket,id=vsock,path={}", p.vhost_socket.display()),
            "-device".into(),
            "vhost-user-vsock-pci,chardev=vsock,addr=0x3".into(),
        ];
        for i in 0..self.root_ports {
            // Eight ports per slot from 0x08 on; function 0 makes the slot multifunction.
            let (slot, func) = (0x08 + i / 8, i % 8);
            let multifunction = if func == 0 { ",multifunction=on" } else { "" };
            args.push("-device".into());
            args.push(format!(
                "pcie-root-port,id=rp{n},bus=pcie.0,chassis={n},addr={slot:#x}.{func}{multifunction},io-reserve=0",
                n = i + 1
            ));
        }
        args
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(qemu) = self.qemu.take() {
            let mut qemu = qemu.into_inner().unwrap_or_else(|p| p.into_inner());
            let _ = qemu.kill();
            let _ = qemu.wait();
        }
        let vhost = self.vhost.get_mut().unwrap_or_else(|p| p.into_inner());
        let _ = vhost.kill();
        let _ = vhost.wait();
        if thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
        if std::env::var_os("NESTLESS_VM_KEEP").is_some() {
            if let Some(dir) = self.dir.as_mut() {
                dir.disable_cleanup(true);
                let _ = fs::remove_file(dir.path().join(OWNER_FILE));
                eprintln!(
                    "kept the directory of VM {}: {}",
                    self.name,
                    dir.path().display()
                );
            }
        }
    }
}

/// Removes the directories of VMs whose test process died without dropping them (their
/// QEMU and vhost-device-vsock died with it, see `process`). Once per process.
fn sweep_dead_vm_dirs() {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(|| {
        let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let is_vm_dir = entry.file_name().to_string_lossy().starts_with("nlvm-");
            let Ok(owner) = fs::read_to_string(path.join(OWNER_FILE)) else {
                continue; // not ours, or kept on purpose (NESTLESS_VM_KEEP)
            };
            let alive = Path::new("/proc").join(owner.trim()).exists();
            if is_vm_dir && !alive {
                let _ = fs::remove_dir_all(&path);
            }
        }
    });
}

fn log_file(path: &Path) -> Result<File, VmError> {
    File::options()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| VmError::io(path.display().to_string(), e))
}

/// Finds `name` in `PATH`, then in `extra` directories.
fn find_program(name: &str, extra: &[PathBuf]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra.iter().cloned())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// vhost-device-vsock: `NESTLESS_VHOST_DEVICE_VSOCK`, `PATH`, then cargo's bin directory.
pub(crate) fn find_vhost_device_vsock() -> Result<PathBuf, VmError> {
    if let Some(path) = std::env::var_os("NESTLESS_VHOST_DEVICE_VSOCK") {
        return Ok(PathBuf::from(path));
    }
    let mut extra = Vec::new();
    if let Some(cargo_home) = std::env::var_os("CARGO_HOME") {
        extra.push(PathBuf::from(cargo_home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        extra.push(PathBuf::from(home).join(".cargo/bin"));
    }
    find_program("vhost-device-vsock", &extra).ok_or_else(|| VmError::Missing {
        what: "vhost-device-vsock (not in PATH, $CARGO_HOME/bin or ~/.cargo/bin)".into(),
        hint: "cargo install --locked vhost-device-vsock@0.3.0".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_fields_parse() {
        let ready = Ready {
            boot: Duration::ZERO,
            guest_uptime: None,
            line: "NESTLESS-VM-READY uptime=3.41 containerd-ready=6.02".into(),
        };
        assert_eq!(ready.field("uptime"), Some("3.41"));
        assert_eq!(ready.field("containerd-ready"), Some("6.02"));
        assert_eq!(ready.field("containerd"), None);
    }

    #[test]
    fn vm_can_be_shared_between_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Vm>();
        shareable::<GuestImage>();
    }

    #[test]
    fn cids_are_unique_while_alive() {
        let a = Cid::claim(None);
        let b = Cid::claim(None);
        assert_ne!(a.0, b.0);
        assert!(a.0 >= 3 && b.0 >= 3);
    }
}
