//! What the shim records in a container's bundle directory.
//!
//! When a shim dies, containerd runs `containerd-shim-nestless-v2 delete` in
//! the container's bundle to clean up. That process knows nothing but the
//! container id and the bundle, so the serving shim writes, right after
//! `runc create`, how runc was run and whether the container owns a pod
//! network; `delete` reads it to remove the runc container, unmount the
//! rootfs and release the network.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, ShimError};

/// File name of the record, in the bundle.
pub const RECORD_FILE: &str = "nestless-shim.json";

/// The record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// runc binary.
    pub runc_binary: PathBuf,
    /// runc root (namespace included).
    pub runc_root: PathBuf,
    /// runc's systemd cgroup driver.
    pub systemd_cgroup: bool,
    /// The shim configuration file used, if any.
    pub config_path: Option<PathBuf>,
    /// The sandbox id of the pod network the container owns, if it owns one.
    pub network_sandbox: Option<String>,
    /// The scope that sandbox id lives in (its containerd namespace outside
    /// CRI; empty for a CRI sandbox, and in records older than scopes).
    #[serde(default)]
    pub network_scope: String,
    /// Whether the shim mounted the rootfs (`BUNDLE/rootfs`).
    pub rootfs_mounted: bool,
}

impl Record {
    /// Writes the record into `bundle` (atomically: temp file, then rename).
    pub fn store(&self, bundle: &Path) -> Result<()> {
        let path = bundle.join(RECORD_FILE);
        let tmp = bundle.join(format!(".{RECORD_FILE}.tmp"));
        let data = serde_json::to_vec(self)
            .map_err(|e| ShimError::io(format!("cannot encode {}", path.display()), e.into()))?;
        std::fs::write(&tmp, data)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| ShimError::io(format!("cannot write {}", path.display()), e))
    }

    /// Reads the record of `bundle`; `None` if there is none.
    pub fn load(bundle: &Path) -> Result<Option<Self>> {
        let path = bundle.join(RECORD_FILE);
        match std::fs::read(&path) {
            Ok(data) => serde_json::from_slice(&data)
                .map(Some)
                .map_err(|e| ShimError::io(format!("cannot decode {}", path.display()), e.into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ShimError::io(format!("cannot read {}", path.display()), e)),
        }
    }

    /// Removes the record of `bundle`, if any.
    pub fn remove(bundle: &Path) {
        let _ = std::fs::remove_file(bundle.join(RECORD_FILE));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(Record::load(d.path()).unwrap(), None);
        let r = Record {
            runc_binary: "runc".into(),
            runc_root: "/run/containerd/runc/default".into(),
            systemd_cgroup: false,
            config_path: Some("/etc/nestless/shim.toml".into()),
            network_sandbox: Some("sb".into()),
            network_scope: "team-one".into(),
            rootfs_mounted: true,
        };
        r.store(d.path()).unwrap();
        assert_eq!(Record::load(d.path()).unwrap(), Some(r));
        Record::remove(d.path());
        assert_eq!(Record::load(d.path()).unwrap(), None);
    }

    #[test]
    fn a_record_from_before_scopes_reads_as_the_empty_scope() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join(RECORD_FILE),
            r#"{"runc_binary":"runc","runc_root":"/r","systemd_cgroup":false,"config_path":null,"network_sandbox":"sb","rootfs_mounted":false}"#,
        )
        .unwrap();
        let r = Record::load(d.path()).unwrap().unwrap();
        assert_eq!(
            (r.network_sandbox.as_deref(), r.network_scope.as_str()),
            (Some("sb"), "")
        );
    }
}
