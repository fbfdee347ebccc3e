//! A container's root filesystem: containerd's rootfs mounts on
//! `BUNDLE/rootfs` at create, unmounted at delete (and by `delete` after a
//! shim died). [`Rootfs`] is the seam the task service mounts through; unit
//! tests put a fake in its place.

use std::path::Path;

use async_trait::async_trait;
use containerd_shim_protos::types::mount::Mount;
use log::warn;

use crate::error::{Result, ShimError};

/// Mounting and unmounting a container's rootfs.
#[async_trait]
pub trait Rootfs: Send + Sync {
    /// Mounts `mounts` on `BUNDLE/rootfs`; `false` when there are none
    /// (nothing was mounted). A failure leaves nothing mounted.
    async fn mount(&self, bundle: &Path, mounts: &[Mount]) -> Result<bool>;
    /// Unmounts everything under `BUNDLE/rootfs` (lazily, so that deletion
    /// completes); failures are logged.
    async fn unmount(&self, bundle: &Path);
}

/// The host's mount table.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostRootfs;

#[async_trait]
impl Rootfs for HostRootfs {
    async fn mount(&self, bundle: &Path, mounts: &[Mount]) -> Result<bool> {
        mount(bundle, mounts).await
    }

    async fn unmount(&self, bundle: &Path) {
        unmount(bundle).await
    }
}

/// Mounts containerd's rootfs mounts on `BUNDLE/rootfs`; `false` when there are none.
async fn mount(bundle: &Path, mounts: &[Mount]) -> Result<bool> {
    if mounts.is_empty() {
        return Ok(false);
    }
    let target = bundle.join("rootfs");
    if let Err(e) = tokio::fs::create_dir(&target).await {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(ShimError::io(
                format!("cannot create {}", target.display()),
                e,
            ));
        }
    }
    for (i, m) in mounts.iter().enumerate() {
        if let Err(source) = containerd_shim::asynchronous::util::mount_rootfs(m, &target).await {
            if i > 0 {
                unmount(bundle).await;
            }
            return Err(ShimError::Shim {
                context: format!(
                    "cannot mount {} {} on {}",
                    m.type_,
                    m.source,
                    target.display()
                ),
                source,
            });
        }
    }
    Ok(true)
}

/// Unmounts everything under `BUNDLE/rootfs` (lazily, so that deletion completes).
pub(crate) async fn unmount(bundle: &Path) {
    let target = bundle.join("rootfs");
    let t = target.to_string_lossy().into_owned();
    let r = tokio::task::spawn_blocking(move || {
        containerd_shim::mount::umount_recursive(Some(&t), libc::MNT_DETACH)
    })
    .await;
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!("cannot unmount {}: {e}", target.display()),
        Err(e) => warn!("cannot unmount {}: {e}", target.display()),
    }
}
