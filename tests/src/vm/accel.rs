//! Choosing QEMU's accelerator: KVM when it really runs a guest, TCG otherwise.
//!
//! `/dev/kvm` may exist and still be unusable (QEMU aborts on an MSR it cannot set, or the
//! guest crawls), so the probe boots the guest kernel without an initramfs under KVM and
//! expects the "cannot mount root" panic within a few seconds. The answer is kept for the
//! process and, per host boot, in the cache directory. `NESTLESS_VM_ACCEL=kvm|tcg` skips it.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::image::cache_dir;
use super::process;

/// How long a KVM guest may take to reach the panic before KVM counts as unusable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// QEMU's accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation (`-accel kvm -cpu host`).
    Kvm,
    /// Emulation (`-accel tcg -cpu max`), slow but always there.
    Tcg,
}

impl Accel {
    /// QEMU's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// The `-cpu` model that goes with it.
    pub fn cpu(self) -> &'static str {
        match self {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        }
    }

    /// The accelerator to use on this host, probing with `kernel` the first time.
    pub fn detect(kernel: &Path) -> Accel {
        static CHOICE: OnceLock<Accel> = OnceLock::new();
        *CHOICE.get_or_init(|| {
            match std::env::var("NESTLESS_VM_ACCEL").as_deref() {
                Ok("kvm") => return Accel::Kvm,
                Ok("tcg") => return Accel::Tcg,
                Ok(other) => panic!("NESTLESS_VM_ACCEL must be kvm or tcg, not {other:?}"),
                Err(_) => {}
            }
            let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
            let memo = cache_dir().join(format!("accel-{}", boot_id.trim()));
            match fs::read_to_string(&memo).as_deref() {
                Ok("kvm") => return Accel::Kvm,
                Ok("tcg") => return Accel::Tcg,
                _ => {}
            }
            let accel = if probe_kvm(kernel) {
                Accel::Kvm
            } else {
                Accel::Tcg
            };
            let _ = fs::write(&memo, accel.as_str());
            accel
        })
    }
}

fn probe_kvm(kernel: &Path) -> bool {
    if fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return false;
    }
    let Ok(dir) = tempfile::Builder::new().prefix("nlvm-kvm-").tempdir() else {
        return false;
    };
    let console = dir.path().join("console.log");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel", "kvm", "-cpu", "host", "-machine", "q35", "-m", "256M",
    ])
    .args([
        "-display",
        "none",
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
    ])
    .arg("-serial")
    .arg(format!("file:{}", console.display()))
    .arg("-kernel")
    .arg(kernel)
    .args(["-append", "console=ttyS0 panic=-1"])
    .current_dir(dir.path())
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let Ok(mut child) = process::spawn_tied(cmd) else {
        return false;
    };
    let started = Instant::now();
    let reached_panic =
        || fs::read_to_string(&console).is_ok_and(|log| log.contains("Kernel panic"));
    while started.elapsed() < PROBE_TIMEOUT {
        if reached_panic() {
            let _ = child.kill();
            let _ = child.wait();
            return true;
        }
        if let Ok(Some(_)) = child.try_wait() {
            return reached_panic();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}
