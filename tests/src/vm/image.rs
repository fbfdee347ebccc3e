//! Guest images: built by `tests/vm/build-guest.sh`, cached on disk, found here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

use super::error::{chain, VmError};

/// The directory of the guest image scripts (`tests/vm` in the source tree).
pub fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vm")
}

/// The cache directory of guest images (`NESTLESS_VM_CACHE`, default `/var/cache/nestless/vm`).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("NESTLESS_VM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/nestless/vm"))
}

/// Which guest image to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GuestVariant {
    /// busybox, iproute2, the network and vsock modules, the exec server. Boots fastest.
    Minimal,
    /// Minimal plus containerd, ctr, runc and the CNI plugins, in a tmpfs root with cgroup2;
    /// busybox and pause OCI archives in `/usr/share/nestless/images`.
    Full,
}

impl GuestVariant {
    fn as_str(self) -> &'static str {
        match self {
            GuestVariant::Minimal => "minimal",
            GuestVariant::Full => "full",
        }
    }
}

/// A built guest image: a kernel and an initramfs in a cache directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    variant: GuestVariant,
    dir: PathBuf,
}

impl GuestImage {
    /// The minimal image, built on first use (then cached on disk and in this process).
    ///
    /// # Panics
    /// When the image cannot be built; the message carries the script's output.
    pub fn minimal() -> GuestImage {
        Self::cached(GuestVariant::Minimal).unwrap_or_else(|e| panic!("{}", chain(&e)))
    }

    /// The full image (containerd, runc, CNI plugins), built on first use.
    ///
    /// # Panics
    /// When the image cannot be built.
    pub fn full() -> GuestImage {
        Self::cached(GuestVariant::Full).unwrap_or_else(|e| panic!("{}", chain(&e)))
    }

    /// The full image with the tree under `extra` copied over its root (e.g. our shim in
    /// `usr/bin/`, a CNI plugin in `opt/cni/bin/`, configs in `etc/`). Rebuilt whenever a
    /// file under `extra` changes.
    ///
    /// # Panics
    /// When the image cannot be built.
    pub fn full_with_extra(extra: &Path) -> GuestImage {
        Self::build(GuestVariant::Full, Some(extra)).unwrap_or_else(|e| panic!("{}", chain(&e)))
    }

    /// Builds (or finds in the cache) an image, returning errors instead of panicking.
    pub fn build(variant: GuestVariant, extra: Option<&Path>) -> Result<GuestImage, VmError> {
        let exec_bin = exec_server_binary()?;
        let script = scripts_dir().join("build-guest.sh");
        let mut cmd = Command::new("bash");
        cmd.arg(&script)
            .args(["--variant", variant.as_str()])
            .arg("--exec-bin")
            .arg(&exec_bin)
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(extra) = extra {
            cmd.arg("--extra").arg(extra);
        }
        let out = cmd.output().map_err(|source| VmError::Spawn {
            program: script.display().to_string(),
            source,
        })?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            return Err(VmError::ImageBuild {
                variant: variant.as_str().into(),
                status: out.status.to_string(),
                output: stderr,
            });
        }
        if stderr.contains("built ") {
            eprint!("{stderr}");
        }
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let image = GuestImage {
            variant,
            dir: PathBuf::from(dir),
        };
        for file in [image.kernel(), image.initrd()] {
            if !file.is_file() {
                return Err(VmError::Missing {
                    what: format!("{} (from {})", file.display(), script.display()),
                    hint: format!("remove {} and build again", image.dir.display()),
                });
            }
        }
        Ok(image)
    }

    /// The image of `variant` without extras, built once per process (the lock also keeps
    /// concurrent tests from waiting on the script's own cache lock one by one).
    pub(crate) fn cached(variant: GuestVariant) -> Result<GuestImage, VmError> {
        static IMAGES: OnceLock<Mutex<HashMap<GuestVariant, GuestImage>>> = OnceLock::new();
        let mut images = IMAGES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Still on disk? (The cache may be pruned or wiped while a test process runs.)
        if let Some(image) = images.get(&variant).filter(|i| i.initrd().is_file()) {
            return Ok(image.clone());
        }
        let image = Self::build(variant, None)?;
        images.insert(variant, image.clone());
        Ok(image)
    }

    /// The variant.
    pub fn variant(&self) -> GuestVariant {
        self.variant
    }

    /// The image's directory (also holds `manifest`, what went into it).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The uncompressed kernel, booted through PVH.
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinux")
    }

    /// The initramfs (an uncompressed cpio archive).
    pub fn initrd(&self) -> PathBuf {
        self.dir.join("initramfs.cpio")
    }
}

/// Finds the `nestless-vm-exec` binary to ship into guests.
///
/// `NESTLESS_VM_EXEC_BIN` wins; otherwise the binary cargo built beside the running test
/// (`target/<profile>/nestless-vm-exec`, present for this crate's tests; other crates'
/// tests need `cargo build -p nestless-tests --bin nestless-vm-exec` first).
pub fn exec_server_binary() -> Result<PathBuf, VmError> {
    const NAME: &str = "nestless-vm-exec";
    if let Some(path) = std::env::var_os("NESTLESS_VM_EXEC_BIN") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(VmError::Missing {
                what: format!("{} (NESTLESS_VM_EXEC_BIN)", path.display()),
                hint: "point NESTLESS_VM_EXEC_BIN at a built nestless-vm-exec".into(),
            })
        };
    }
    let exe = std::env::current_exe().map_err(|e| VmError::io("the test's own path", e))?;
    exe.ancestors()
        .skip(1)
        .take(3)
        .map(|dir| dir.join(NAME))
        .find(|p| p.is_file())
        .ok_or_else(|| VmError::Missing {
            what: format!("{NAME} (looked beside {})", exe.display()),
            hint: format!(
                "run `cargo build -p nestless-tests --bin {NAME}` with the same profile and \
                 target directory, or set NESTLESS_VM_EXEC_BIN"
            ),
        })
}
