//! libvirt domains for tests: the project's guest image booted by libvirtd (TCG,
//! `type='qemu'`), with the user-space vsock the other VM tests use.
//!
//! ```text
//!   test process                      <dir>/ (one per domain)            libvirtd ─▶ QEMU
//!   Domain::start
//!     spawn vhost-device-vsock ─────▶ vhost.sock ◀──── <qemu:commandline> vhost-user-vsock-pci
//!                                     vsock.sock (host end), vsock.sock_<port> ◀── guest connect
//!     virsh define + start (or create) domain.xml ─▶ console.log (serial, a file)
//!   Domain::wait_ready: polls console.log for the ready marker
//!   Domain::exec ───────────────────▶ vsock.sock "CONNECT 1024" ──▶ nestless-vm-exec
//!   drop: virsh destroy + undefine, SIGKILL vhost-device-vsock, remove <dir>
//! ```
//!
//! These machines have no `vhost_vsock` module, so a `<vsock>` device cannot start: the
//! guest's vsock is vhost-device-vsock's, given to QEMU through libvirt's QEMU command-line
//! passthrough with shared (memfd) guest memory, as vhost-user needs. QEMU runs as root
//! without relabelling (`<seclabel>`), so that it may open the cached image and the sockets.
//! Tests shell out to `virsh` (the product uses the libvirt API).
//!
//! Nothing here skips: without libvirtd, [`require_libvirtd`] panics and says how to start it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::vm::{
    chain, exec, find_vhost_device_vsock, ExecOutput, GuestCommand, GuestImage, READY_MARKER,
};

/// The connection the tests use.
pub const URI: &str = "qemu:///system";

/// Runs `virsh -c URI ARGS`, returning its output whatever the status.
pub fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run virsh {args:?}: {e} (apt-get install libvirt-clients)")
        })
}

/// Runs `virsh ARGS`, which must succeed; returns its stdout.
pub fn virsh_ok(args: &[&str]) -> String {
    let out = virsh(args);
    assert!(
        out.status.success(),
        "virsh {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Panics unless libvirtd answers on [`URI`]: a libvirt test must fail, not skip.
pub fn require_libvirtd() {
    crate::netenv::require_root();
    let out = Command::new("virsh").args(["-c", URI, "version"]).output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "libvirtd does not answer on {URI}: {}\nstart it (tests/lib/setup.sh start_libvirtd: `libvirtd -d`)",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!(
            "virsh cannot run ({e}): apt-get install libvirt-daemon-system libvirt-clients, then start libvirtd"
        ),
    }
}

/// How a test domain is made.
#[derive(Debug, Clone)]
pub struct DomainBuilder {
    root_ports: u32,
    metadata: Option<String>,
    persistent: bool,
    memory_mib: u32,
    image: Option<GuestImage>,
}

impl Default for DomainBuilder {
    fn default() -> Self {
        DomainBuilder {
            root_ports: 4,
            metadata: None,
            persistent: true,
            memory_mib: 512,
            image: None,
        }
    }
}

impl DomainBuilder {
    /// Hot-plug `pcie-root-port`s (default 4).
    pub fn root_ports(mut self, n: u32) -> Self {
        self.root_ports = n;
        self
    }

    /// The inside of the nestless metadata element (e.g.
    /// `<n:network>n</n:network><n:vsock-uds>DIR/vsock.sock</n:vsock-uds>`, prefix `n`
    /// bound to the nestless namespace).
    pub fn metadata(mut self, inner: impl Into<String>) -> Self {
        self.metadata = Some(inner.into());
        self
    }

    /// Boots `image` (default: the minimal image), e.g. the end-to-end one
    /// with containerd ([`crate::e2e::guest_image`]).
    pub fn image(mut self, image: GuestImage) -> Self {
        self.image = Some(image);
        self
    }

    /// Guest memory in MiB (default 512; containerd and a pod want 1024).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Defined then started (default), or created transient.
    pub fn persistent(mut self, yes: bool) -> Self {
        self.persistent = yes;
        self
    }
}

/// A libvirt domain running a guest image (the minimal one unless told).
pub struct Domain {
    /// The domain's name (random).
    pub name: String,
    dir: Option<tempfile::TempDir>,
    vhost: Child,
    started: Instant,
}

/// A private directory for a domain about to be made (its sockets and console).
pub fn domain_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("nllv-")
        .tempdir()
        .expect("tempdir")
}

impl Domain {
    /// A builder.
    pub fn builder() -> DomainBuilder {
        DomainBuilder::default()
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("dir").path()
    }

    /// vhost-device-vsock's host end: a guest's connection to (CID 2, port P) arrives on
    /// `<this>_P`.
    pub fn vsock_uds(&self) -> PathBuf {
        self.dir().join("vsock.sock")
    }

    /// The serial console so far.
    pub fn console(&self) -> String {
        fs::read(self.dir().join("console.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Starts a domain in `dir` (from [`domain_dir`]).
    pub fn start(b: DomainBuilder, dir: tempfile::TempDir) -> Domain {
        require_libvirtd();
        let image = b.image.clone().unwrap_or_else(GuestImage::minimal);
        let name = format!("nltest-{}", crate::netenv::suffix());
        let vhost_bin = find_vhost_device_vsock().unwrap_or_else(|e| panic!("{}", chain(&e)));
        let d = dir.path().to_path_buf();
        let vhost = Command::new(vhost_bin)
            .arg("--vm")
            .arg(format!(
                "guest-cid=3,socket={},uds-path={}",
                d.join("vhost.sock").display(),
                d.join("vsock.sock").display()
            ))
            .stdout(Stdio::null())
            .stderr(fs::File::create(d.join("vhost.log")).expect("vhost log"))
            .spawn()
            .expect("spawn vhost-device-vsock");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !d.join("vhost.sock").exists() {
            assert!(
                Instant::now() < deadline,
                "vhost-device-vsock did not listen"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let xml = domain_xml(&name, &d, &image, &b);
        fs::write(d.join("domain.xml"), &xml).expect("write domain.xml");
        let path = d.join("domain.xml").display().to_string();
        let dom = Domain {
            name,
            dir: Some(dir),
            vhost,
            started: Instant::now(),
        };
        if b.persistent {
            virsh_ok(&["define", &path]);
            virsh_ok(&["start", &dom.name]);
        } else {
            virsh_ok(&["create", &path]);
        }
        dom
    }

    /// Waits until the guest prints the ready marker.
    pub fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let console = self.console();
            if console.contains(READY_MARKER) {
                return;
            }
            assert!(
                !console.contains("Kernel panic"),
                "domain {} panicked:\n{console}",
                self.name
            );
            assert!(
                Instant::now() < deadline,
                "domain {} not ready after {:?}:\n{console}",
                self.name,
                self.started.elapsed()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `script` in the guest.
    pub fn exec(&self, script: &str) -> ExecOutput {
        self.run(&GuestCommand::shell(script))
    }

    /// Runs `cmd` in the guest.
    pub fn run(&self, cmd: &GuestCommand) -> ExecOutput {
        exec::run(&self.vsock_uds(), cmd)
            .unwrap_or_else(|e| panic!("exec in domain {}: {}", self.name, chain(&e)))
    }

    /// Runs `script`, which must succeed; returns its stdout.
    pub fn exec_ok(&self, script: &str) -> String {
        let out = self.exec(script);
        assert!(
            out.success(),
            "`{script}` in domain {}: {}{}",
            self.name,
            out.stdout_str(),
            out.stderr_str()
        );
        out.stdout_str()
    }

    /// The live domain XML.
    pub fn live_xml(&self) -> String {
        virsh_ok(&["dumpxml", &self.name])
    }

    /// The persistent definition's XML.
    pub fn config_xml(&self) -> String {
        virsh_ok(&["dumpxml", "--inactive", &self.name])
    }

    /// `virsh domiflist`: (interface, MAC) of each row.
    pub fn domiflist(&self) -> Vec<(String, String)> {
        virsh_ok(&["domiflist", &self.name])
            .lines()
            .skip(2)
            .filter_map(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                (cols.len() >= 5).then(|| (cols[0].to_string(), cols[4].to_string()))
            })
            .collect()
    }

    /// The agent's NIC ids in the live XML (user aliases `ua-nl-<id>`).
    pub fn agent_aliases(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .live_xml()
            .split("alias name='ua-nl-")
            .skip(1)
            .filter_map(|s| s.get(..10).map(str::to_string))
            .collect();
        v.sort();
        v
    }

    /// `virsh destroy` (the domain stays defined).
    pub fn destroy(&self) {
        virsh_ok(&["destroy", &self.name]);
    }

    /// `virsh start` again.
    pub fn start_again(&mut self) {
        let _ = fs::remove_file(self.dir().join("console.log"));
        self.started = Instant::now();
        virsh_ok(&["start", &self.name]);
    }

    /// Whether the domain runs.
    pub fn is_running(&self) -> bool {
        virsh_ok(&["domstate", &self.name]).trim() == "running"
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
        let _ = virsh(&["undefine", &self.name]);
        let _ = self.vhost.kill();
        let _ = self.vhost.wait();
        if std::thread::panicking() {
            eprintln!("--- domain {} console:\n{}", self.name, self.console());
            if std::env::var_os("NESTLESS_VM_KEEP").is_some() {
                if let Some(d) = self.dir.take() {
                    eprintln!("kept {}", d.keep().display());
                }
            }
        }
    }
}

fn domain_xml(name: &str, dir: &Path, image: &GuestImage, b: &DomainBuilder) -> String {
    let ports: String = (0..b.root_ports)
        .map(|_| "<controller type='pci' model='pcie-root-port'/>".to_string())
        .collect();
    let metadata = b
        .metadata
        .as_ref()
        .map(|inner| {
            format!(
                "<metadata><n:vm xmlns:n='{}'>{inner}</n:vm></metadata>",
                nestless_netagent::backend::domxml::METADATA_NS
            )
        })
        .unwrap_or_default();
    format!(
        "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  {metadata}
  <memory unit='MiB'>{mem}</memory>
  <vcpu>1</vcpu>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 cryptomgr.notests mitigations=off audit=0 apparmor=0 nestless.name={name}</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='custom' match='exact'><model>qemu64</model></cpu>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='pci' model='pcie-root'/>
    {ports}
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
  <qemu:commandline>
    <qemu:arg value='-chardev'/><qemu:arg value='socket,id=nlvsock,path={vhost}'/>
    <qemu:arg value='-device'/><qemu:arg value='vhost-user-vsock-pci,chardev=nlvsock,bus=pcie.0,addr=0x10'/>
  </qemu:commandline>
</domain>
",
        mem = b.memory_mib,
        kernel = image.kernel().display(),
        initrd = image.initrd().display(),
        console = dir.join("console.log").display(),
        vhost = dir.join("vhost.sock").display(),
    )
}
