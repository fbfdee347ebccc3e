//! The agent's durable state: one JSON file of NIC records.
//!
//! Writes are crash-safe: the new content goes to a temporary file in the same
//! directory, is fsynced, renamed over `state.json`, and the directory is
//! fsynced. A reader therefore sees either the old or the new file, whole.
//! Leases are not stored on their own; they are the addresses of the records.
//!
//! What the records must be to be loaded (no two share an address, a MAC,
//! an id, ...; each fits the configuration) is checked by [`crate::stale`].

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use nestless_model::MacAddr;
use serde::{Deserialize, Serialize};

use crate::{
    lifecycle::NicState,
    names::{NicId, DEFAULT_IFNAME},
};

/// Version of the file format.
pub const STATE_VERSION: u32 = 1;

/// One NIC the agent handed out (or is handing out, or taking back).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicRecord {
    /// The NIC's id; every external name derives from it.
    pub id: NicId,
    /// The VM it belongs to.
    pub vm: String,
    /// The sandbox it was attached for. With `scope` and `interface`, the
    /// idempotency key of an attach within the VM.
    pub sandbox_id: String,
    /// The namespace `sandbox_id` is unique in (the containerd namespace of
    /// a container attached outside CRI); empty for CRI and CNI. Absent in
    /// files written before it existed: empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub scope: String,
    /// The interface name the NIC takes in the pod (CNI_IFNAME). Absent in
    /// files written before it existed: `eth0`.
    #[serde(
        default = "default_interface",
        skip_serializing_if = "is_default_interface"
    )]
    pub interface: String,
    /// The VM's tenant network (`[[network]]` name). A BrFusion NIC's
    /// addresses are leased from it; a Hostlo segment NIC's address comes from
    /// `[hostlo] subnet` instead, and this names the tenant the pod belongs to
    /// (only VMs of that network may join it).
    pub network: String,
    /// Its MAC.
    pub mac: MacAddr,
    /// Its IPv4 lease.
    pub ipv4: Ipv4Addr,
    /// Its IPv6 address, when the network has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Ipv6Addr>,
    /// Where it is in its life.
    pub state: NicState,
    /// The hot-plug bus it was plugged on (qemu).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    /// Labels from the request.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Creation time, seconds since the epoch.
    pub created_unix: i64,
    /// For a Hostlo segment NIC: the pod and part it serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostlo: Option<crate::hostlo::HostloRef>,
    /// In the VM's warm pool: plugged, leased, not yet given to a sandbox.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pooled: bool,
}

fn default_interface() -> String {
    DEFAULT_IFNAME.to_string()
}

fn is_default_interface(name: &String) -> bool {
    name == DEFAULT_IFNAME
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateDoc {
    version: u32,
    nics: Vec<NicRecord>,
    /// Absent in files written before it existed: empty.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    last_leased: BTreeMap<String, Ipv4Addr>,
}

/// Everything the state file holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    /// The NIC records.
    pub nics: Vec<NicRecord>,
    /// Per network, the address handed out last: allocation goes on after
    /// it across restarts (next-fit), so a released address is not reused
    /// at once.
    pub last_leased: BTreeMap<String, Ipv4Addr>,
}

/// State file errors.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing failed.
    #[error("cannot {op} state file {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a state file this agent understands.
    #[error("state file {path} is unreadable: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl StateError {
    /// The same error again (an `io::Error` cannot be cloned: its kind and
    /// text are kept), for the writer that answers many saves at once.
    pub fn duplicate(&self) -> StateError {
        match self {
            StateError::Io { op, path, source } => StateError::Io {
                op,
                path: path.clone(),
                source: match source.raw_os_error() {
                    Some(errno) => std::io::Error::from_raw_os_error(errno),
                    None => std::io::Error::new(source.kind(), source.to_string()),
                },
            },
            StateError::Corrupt { path, message } => StateError::Corrupt {
                path: path.clone(),
                message: message.clone(),
            },
        }
    }
}

/// The state file.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// `state.json` in `dir`.
    pub fn in_dir(dir: &Path) -> StateFile {
        StateFile {
            path: dir.join("state.json"),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, op: &'static str) -> impl FnOnce(std::io::Error) -> StateError + '_ {
        move |source| StateError::Io {
            op,
            path: self.path.clone(),
            source,
        }
    }

    /// The records; none when the file does not exist yet.
    pub fn load(&self) -> Result<Vec<NicRecord>, StateError> {
        Ok(self.read()?.nics)
    }

    /// Everything the file holds; nothing when it does not exist yet.
    pub fn read(&self) -> Result<State, StateError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
            Err(e) => return Err(self.io("read")(e)),
        };
        let doc: StateDoc = serde_json::from_str(&text).map_err(|e| StateError::Corrupt {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        if doc.version != STATE_VERSION {
            return Err(StateError::Corrupt {
                path: self.path.clone(),
                message: format!("version {} (this agent reads {STATE_VERSION})", doc.version),
            });
        }
        Ok(State {
            nics: doc.nics,
            last_leased: doc.last_leased,
        })
    }

    /// Replaces the file's content with `records` (and no allocation
    /// cursors), atomically and durably.
    pub fn save<'a>(
        &self,
        records: impl IntoIterator<Item = &'a NicRecord>,
    ) -> Result<(), StateError> {
        self.write(State {
            nics: records.into_iter().cloned().collect(),
            last_leased: BTreeMap::new(),
        })
    }

    /// Replaces the file's content with `state`, atomically and durably.
    pub fn write(&self, state: State) -> Result<(), StateError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(self.io("create the directory of"))?;
        let doc = StateDoc {
            version: STATE_VERSION,
            nics: state.nics,
            last_leased: state.last_leased,
        };
        let body = serde_json::to_vec_pretty(&doc).map_err(|e| StateError::Corrupt {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        let tmp = self.path.with_extension("json.tmp");
        let mut f = fs::File::create(&tmp).map_err(self.io("create a temporary for"))?;
        f.write_all(&body).map_err(self.io("write"))?;
        f.sync_all().map_err(self.io("fsync"))?;
        drop(f);
        fs::rename(&tmp, &self.path).map_err(self.io("rename into"))?;
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(self.io("fsync the directory of"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str) -> NicRecord {
        NicRecord {
            id: id.parse().unwrap(),
            vm: "vm1".into(),
            sandbox_id: "sb".into(),
            scope: String::new(),
            interface: "eth0".into(),
            network: "default".into(),
            mac: "52:54:00:00:00:01".parse().unwrap(),
            ipv4: "10.0.0.2".parse().unwrap(),
            ipv6: None,
            state: NicState::Attached,
            slot: Some("rp1".into()),
            labels: BTreeMap::new(),
            created_unix: 1,
            hostlo: None,
            pooled: false,
        }
    }

    #[test]
    fn missing_file_is_empty_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let sf = StateFile::in_dir(&dir.path().join("sub"));
        assert!(sf.load().unwrap().is_empty());
        let recs = vec![rec("00000000aa"), rec("00000000bb")];
        sf.save(&recs).unwrap();
        assert_eq!(sf.load().unwrap(), recs);
        sf.save(&recs[..1]).unwrap();
        assert_eq!(sf.load().unwrap(), recs[..1]);
        assert!(!sf.path().with_extension("json.tmp").exists());
    }

    /// A file written before records had a scope and an interface loads
    /// unchanged: empty scope, `eth0`; a record with both round-trips.
    #[test]
    fn files_before_scope_and_interface_load() {
        let dir = tempfile::tempdir().unwrap();
        let sf = StateFile::in_dir(dir.path());
        fs::write(
            sf.path(),
            r#"{"version": 1, "nics": [{"id": "00000000aa", "vm": "vm1",
                "sandbox_id": "sb", "network": "default", "mac": "52:54:00:00:00:01",
                "ipv4": "10.0.0.2", "state": "attached", "slot": "rp1", "created_unix": 1}]}"#,
        )
        .unwrap();
        assert_eq!(sf.load().unwrap(), vec![rec("00000000aa")]);
        let mut r = rec("00000000bb");
        r.scope = "team-one".into();
        r.interface = "net1".into();
        sf.save([&r]).unwrap();
        assert_eq!(sf.load().unwrap(), vec![r]);
        // The defaults are not written out: an unchanged record reads as before.
        sf.save(&[rec("00000000aa")]).unwrap();
        let text = fs::read_to_string(sf.path()).unwrap();
        assert!(
            !text.contains("scope") && !text.contains("interface"),
            "{text}"
        );
    }

    #[test]
    fn corrupt_or_future_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let sf = StateFile::in_dir(dir.path());
        fs::write(sf.path(), "{not json").unwrap();
        let e = sf.load().unwrap_err().to_string();
        assert!(e.contains("state.json"), "{e}");
        fs::write(sf.path(), r#"{"version": 9, "nics": []}"#).unwrap();
        assert!(sf.load().unwrap_err().to_string().contains("version 9"));
    }
}
