//! The agent's durable state: one JSON file of NIC records.
//!
//! Writes are crash-safe: the new content goes to a temporary file in the same
//! directory, is fsynced, renamed over `state.json`, and the directory is
//! fsynced. A reader therefore sees either the old or the new file, whole.
//! Leases are not stored on their own; they are the addresses of the records.
//!
//! The records' invariants are checked at load ([`State::check`]): no two
//! share an id (and so a host link name), a MAC, an IPv4 address of a
//! network, an IPv6 address, an attachment of a VM or a Hostlo part. A file
//! that breaks one is refused with the records named, rather than loaded
//! into two live leases of one address; the way out is
//! `nestless-netagent --drop-conflicting-records` ([`StateFile::drop_conflicting`]),
//! which keeps the oldest record of each group and backs the file up first.

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

/// Records of a state file that share what only one NIC may have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// What they share, e.g. `IPv4 address 10.0.0.5 on network "n"`.
    pub what: String,
    /// The records, in file order.
    pub ids: Vec<NicId>,
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.ids.iter().map(NicId::as_str).collect();
        write!(f, "NICs {} share {}", ids.join(", "), self.what)
    }
}

/// What only one record may have: its keys under the invariants.
fn unique_keys(r: &NicRecord) -> Vec<String> {
    let mut keys = vec![
        format!("id {0} (host link nlh{0})", r.id),
        format!("MAC {}", r.mac),
    ];
    match &r.hostlo {
        None => {
            keys.push(format!(
                "IPv4 address {} on network {:?}",
                r.ipv4, r.network
            ));
            keys.extend(r.ipv6.map(|v6| format!("IPv6 address {v6}")));
            if !r.pooled {
                let scope = if r.scope.is_empty() {
                    String::new()
                } else {
                    format!("{}/", r.scope)
                };
                keys.push(format!(
                    "attachment {scope}{} {} of VM {:?}",
                    r.sandbox_id, r.interface, r.vm
                ));
            }
        }
        Some(h) => keys.push(format!("part {} of Hostlo pod {:?}", h.part, h.pod)),
    }
    keys
}

impl State {
    /// The groups of records that break an invariant: two records with one
    /// id (one host link name), MAC, IPv4 address on a network, IPv6
    /// address, attachment (VM, scope, sandbox, interface) or Hostlo part.
    pub fn conflicts(&self) -> Vec<Conflict> {
        let mut by_key: BTreeMap<String, Vec<NicId>> = BTreeMap::new();
        for r in &self.nics {
            for k in unique_keys(r) {
                by_key.entry(k).or_default().push(r.id.clone());
            }
        }
        by_key
            .into_iter()
            .filter(|(_, ids)| ids.len() > 1)
            .map(|(what, ids)| Conflict { what, ids })
            .collect()
    }

    /// `Ok` when no records conflict ([`State::conflicts`]).
    ///
    /// # Errors
    /// [`StateError::Conflicts`], naming `path` and every group.
    pub fn check(&self, path: &Path) -> Result<(), StateError> {
        let conflicts = self.conflicts();
        if conflicts.is_empty() {
            Ok(())
        } else {
            Err(StateError::Conflicts {
                path: path.to_path_buf(),
                conflicts,
            })
        }
    }

    /// Drops every record that conflicts with an older one (by creation
    /// time, then file order) and returns the dropped ones: the oldest
    /// holder of an address, MAC, id or attachment keeps it.
    pub fn drop_conflicting(&mut self) -> Vec<NicRecord> {
        let mut order: Vec<usize> = (0..self.nics.len()).collect();
        order.sort_by_key(|&i| (self.nics[i].created_unix, i));
        let mut taken: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut keep = vec![false; self.nics.len()];
        for i in order {
            let keys = unique_keys(&self.nics[i]);
            if keys.iter().all(|k| !taken.contains(k)) {
                taken.extend(keys);
                keep[i] = true;
            }
        }
        let mut dropped = Vec::new();
        let mut kept = Vec::new();
        for (rec, k) in std::mem::take(&mut self.nics).into_iter().zip(keep) {
            if k {
                kept.push(rec);
            } else {
                dropped.push(rec);
            }
        }
        self.nics = kept;
        dropped
    }
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
    /// Records break the file's invariants (see [`State::check`]).
    #[error(
        "state file {path} breaks its invariants: {}; start once with --drop-conflicting-records to keep the oldest record of each group (the file is backed up first)",
        conflicts.iter().map(Conflict::to_string).collect::<Vec<_>>().join("; ")
    )]
    Conflicts {
        /// The file.
        path: PathBuf,
        /// The records in conflict.
        conflicts: Vec<Conflict>,
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
            StateError::Conflicts { path, conflicts } => StateError::Conflicts {
                path: path.clone(),
                conflicts: conflicts.clone(),
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

    /// The operator's way out of [`StateError::Conflicts`]: copies the file
    /// to `state.json.bak-<unix seconds>`, then drops every record that
    /// conflicts with an older one ([`State::drop_conflicting`]) and writes
    /// the rest back. Returns the records dropped (none: the file is left
    /// alone). What the dropped NICs left on the host (links, devices) has
    /// no record any more, and the next start removes it as an orphan.
    ///
    /// # Errors
    /// [`StateError`] when the file cannot be read, backed up or written.
    pub fn drop_conflicting(&self) -> Result<Vec<NicRecord>, StateError> {
        let mut state = self.read()?;
        let dropped = state.drop_conflicting();
        if dropped.is_empty() {
            return Ok(dropped);
        }
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let backup = self.path.with_extension(format!("json.bak-{secs}"));
        fs::copy(&self.path, &backup).map_err(self.io("back up"))?;
        self.write(state)?;
        Ok(dropped)
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

    /// Issue 11, item 5: records that share an id, a MAC, an address of
    /// either family, an attachment or a Hostlo part are named; the
    /// oldest of each group is kept by the way out.
    #[test]
    fn conflicting_records_are_named_and_the_oldest_kept() {
        let mut a = rec("00000000aa");
        a.created_unix = 10;
        a.ipv6 = Some("fd00::2".parse().unwrap());
        let mut b = rec("00000000bb"); // a's IPv4 and MAC, older
        b.created_unix = 5;
        b.sandbox_id = "other".into();
        let mut c = rec("00000000cc"); // a's IPv6 and attachment
        c.created_unix = 20;
        c.ipv4 = "10.0.0.3".parse().unwrap();
        c.mac = "52:54:00:00:00:03".parse().unwrap();
        c.ipv6 = a.ipv6;
        let mut d = rec("00000000aa"); // a's id
        d.created_unix = 30;
        d.sandbox_id = "d".into();
        d.ipv4 = "10.0.0.4".parse().unwrap();
        d.mac = "52:54:00:00:00:04".parse().unwrap();
        let mut e = rec("00000000ee"); // same IPv4 on another network: fine
        e.network = "other".into();
        e.sandbox_id = "e".into();
        e.mac = "52:54:00:00:00:05".parse().unwrap();
        let state = State {
            nics: vec![a.clone(), b.clone(), c.clone(), d, e.clone()],
            last_leased: BTreeMap::new(),
        };
        let found: Vec<String> = state.conflicts().iter().map(|c| c.to_string()).collect();
        for want in [
            "NICs 00000000aa, 00000000bb share IPv4 address 10.0.0.2 on network \"default\"",
            "NICs 00000000aa, 00000000bb share MAC 52:54:00:00:00:01",
            "NICs 00000000aa, 00000000cc share IPv6 address fd00::2",
            "NICs 00000000aa, 00000000cc share attachment sb eth0 of VM \"vm1\"",
            "NICs 00000000aa, 00000000aa share id 00000000aa (host link nlh00000000aa)",
        ] {
            assert!(found.iter().any(|f| f == want), "{want} not in {found:#?}");
        }
        assert_eq!(found.len(), 5, "{found:#?}");
        let e_text = state
            .check(Path::new("/s/state.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e_text.contains("/s/state.json") && e_text.contains("--drop-conflicting-records"),
            "{e_text}"
        );
        // b is the oldest holder of 10.0.0.2 and the MAC: a goes, and
        // with it the conflicts of c and d, which stay.
        let mut fixed = state.clone();
        let dropped: Vec<String> = fixed
            .drop_conflicting()
            .iter()
            .map(|r| format!("{} {}", r.id, r.created_unix))
            .collect();
        assert_eq!(dropped, ["00000000aa 10"]);
        assert!(fixed.conflicts().is_empty());
        assert_eq!(fixed.nics.len(), 4);
        // Hostlo parts: one (pod, part) twice.
        let part = |id: &str, mac: &str| {
            let mut r = rec(id);
            r.mac = mac.parse().unwrap();
            r.hostlo = Some(crate::hostlo::HostloRef {
                pod: "db".into(),
                part: 1,
                ports: Vec::new(),
            });
            r
        };
        let s = State {
            nics: vec![
                part("00000000a1", "52:54:00:00:01:01"),
                part("00000000a2", "52:54:00:00:01:02"),
            ],
            last_leased: BTreeMap::new(),
        };
        assert_eq!(s.conflicts().len(), 1);
        assert!(s.conflicts()[0]
            .what
            .contains("part 1 of Hostlo pod \"db\""));
        // The file: refused by name, then fixed with a backup.
        let dir = tempfile::tempdir().unwrap();
        let sf = StateFile::in_dir(dir.path());
        sf.write(state.clone()).unwrap();
        let before = fs::read_to_string(sf.path()).unwrap();
        let gone = sf.drop_conflicting().unwrap();
        assert_eq!(gone.len(), 1);
        assert!(sf.read().unwrap().conflicts().is_empty());
        let backups: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("state.json.bak-")
            })
            .collect();
        assert_eq!(backups.len(), 1);
        assert_eq!(fs::read_to_string(backups[0].path()).unwrap(), before);
        assert!(
            sf.drop_conflicting().unwrap().is_empty(),
            "nothing more to drop"
        );
        let _ = (b, c, e);
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
