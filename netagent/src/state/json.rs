//! `state.json`: the whole state in one file (the format before issue 11).
//!
//! A write is crash-safe: the new content goes to a temporary file in the
//! same directory, is fsynced, renamed over `state.json`, and the directory
//! is fsynced; a reader sees the old or the new file, whole. Every commit
//! rewrites every record, so its cost grows with the number of NICs: the
//! database ([`super::sqlite`]) replaced it, and imports it.

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{Batch, NicRecord, State, StateError, StateStore, STATE_VERSION};

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateDoc {
    version: u32,
    nics: Vec<NicRecord>,
    /// Absent in files written before it existed: empty.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    last_leased: BTreeMap<String, Ipv4Addr>,
}

/// The state file.
#[derive(Debug, Clone)]
pub struct JsonFile {
    path: PathBuf,
}

impl JsonFile {
    /// `state.json` in `dir`.
    pub fn in_dir(dir: &Path) -> JsonFile {
        JsonFile {
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

    /// Everything the file holds; nothing when it does not exist.
    ///
    /// # Errors
    /// [`StateError::Io`], [`StateError::Corrupt`] (not JSON of this
    /// format, or another version).
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

    /// Replaces the file's content with `state`, atomically and durably.
    ///
    /// # Errors
    /// [`StateError::Io`]; the file is then as before.
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
        write_atomic(&self.path, &body).map_err(|(op, e)| self.io(op)(e))
    }
}

/// Replaces the file at `path` with `body`, atomically and durably: a
/// temporary file beside it (`<path>.tmp`) is written and fsynced, renamed
/// over `path`, and the directory is fsynced (a crash leaves the old file
/// or the new one, whole). The directory must exist.
///
/// # Errors
/// The step that failed (`"write"`, `"rename into"`, ...) and why.
pub(crate) fn write_atomic(path: &Path, body: &[u8]) -> Result<(), (&'static str, std::io::Error)> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = fs::File::create(&tmp).map_err(|e| ("create a temporary for", e))?;
    f.write_all(body).map_err(|e| ("write", e))?;
    f.sync_all().map_err(|e| ("fsync", e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| ("rename into", e))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ("fsync the directory of", e))
}

impl StateStore for JsonFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn read(&mut self) -> Result<State, StateError> {
        JsonFile::read(self)
    }

    fn needs_all(&self) -> bool {
        true
    }

    fn commit(&mut self, batch: Batch) -> Result<(), StateError> {
        // Writing a partial batch would lose every record not in it.
        let nics = batch.all.ok_or_else(|| StateError::Corrupt {
            path: self.path.clone(),
            message: "a commit without every record (a bug: nothing written)".into(),
        })?;
        self.write(State {
            nics,
            last_leased: batch.cursors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{lifecycle::NicState, state::NicRecord};
    use std::collections::BTreeMap;

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

    fn state(recs: &[NicRecord]) -> State {
        State {
            nics: recs.to_vec(),
            last_leased: BTreeMap::new(),
        }
    }

    #[test]
    fn missing_file_is_empty_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let sf = JsonFile::in_dir(&dir.path().join("sub"));
        assert!(sf.read().unwrap().nics.is_empty());
        let recs = vec![rec("00000000aa"), rec("00000000bb")];
        sf.write(state(&recs)).unwrap();
        assert_eq!(sf.read().unwrap().nics, recs);
        sf.write(state(&recs[..1])).unwrap();
        assert_eq!(sf.read().unwrap().nics, recs[..1]);
        assert!(!sf.path().with_extension("json.tmp").exists());
    }

    /// A file written before records had a scope and an interface loads
    /// unchanged: empty scope, `eth0`; a record with both round-trips.
    #[test]
    fn files_before_scope_and_interface_load() {
        let dir = tempfile::tempdir().unwrap();
        let sf = JsonFile::in_dir(dir.path());
        fs::write(
            sf.path(),
            r#"{"version": 1, "nics": [{"id": "00000000aa", "vm": "vm1",
                "sandbox_id": "sb", "network": "default", "mac": "52:54:00:00:00:01",
                "ipv4": "10.0.0.2", "state": "attached", "slot": "rp1", "created_unix": 1}]}"#,
        )
        .unwrap();
        assert_eq!(sf.read().unwrap().nics, vec![rec("00000000aa")]);
        let mut r = rec("00000000bb");
        r.scope = "team-one".into();
        r.interface = "net1".into();
        sf.write(state(std::slice::from_ref(&r))).unwrap();
        assert_eq!(sf.read().unwrap().nics, vec![r]);
        // The defaults are not written out: an unchanged record reads as before.
        sf.write(state(&[rec("00000000aa")])).unwrap();
        let text = fs::read_to_string(sf.path()).unwrap();
        assert!(
            !text.contains("scope") && !text.contains("interface"),
            "{text}"
        );
    }

    #[test]
    fn corrupt_or_future_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let sf = JsonFile::in_dir(dir.path());
        fs::write(sf.path(), "{not json").unwrap();
        let e = sf.read().unwrap_err().to_string();
        assert!(e.contains("state.json"), "{e}");
        fs::write(sf.path(), r#"{"version": 9, "nics": []}"#).unwrap();
        assert!(sf.read().unwrap_err().to_string().contains("version 9"));
    }
}
