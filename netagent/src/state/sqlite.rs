//! `state.db`: the state in SQLite, one row per record.
//!
//! Schema (`PRAGMA user_version` = [`SCHEMA_VERSION`], `application_id` =
//! [`APPLICATION_ID`]):
//!
//! ```text
//! nics(seq INTEGER PRIMARY KEY, id TEXT NOT NULL, record TEXT NOT NULL)   index on id
//! cursors(network TEXT PRIMARY KEY, address TEXT NOT NULL)
//! ```
//!
//! A record is stored as the JSON of [`NicRecord`] (one schema for both
//! stores; the database adds no second truth). `id` is not unique on
//! purpose: a store never merges records, and two records with one id (a
//! restored or imported file) must reach [`crate::stale`], which names them.
//! A commit deletes every row of each changed id and inserts the record as
//! it now is, in one transaction, so its cost is that of the rows changed.
//!
//! Durability: WAL journal with `synchronous = FULL` (SQLite's documented
//! setting for a commit that survives power loss: the WAL is fsynced at each
//! commit); a crash leaves the last committed transaction whole.
//!
//! Import: on first open (`user_version` 0) a `state.json` beside it is read
//! and stored in the same transaction that creates the schema, then renamed
//! `state.json.migrated`. A crash before the rename leaves both; the next
//! open sees the database initialised and only renames the file.

use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use rusqlite::{params, Connection, OpenFlags};

use super::{json::JsonFile, Batch, NicRecord, State, StateError, StateStore};

/// The schema this agent writes and reads.
pub const SCHEMA_VERSION: i64 = 1;

/// `PRAGMA application_id` of a nestless state database ("nlss").
pub const APPLICATION_ID: i64 = 0x6e6c_7373;

/// The database in the state directory.
pub struct SqliteStore {
    path: PathBuf,
    conn: Connection,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

fn db_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(rusqlite::Error) -> StateError + 'a {
    move |e| StateError::Db {
        op,
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn corrupt(path: &Path, message: String) -> StateError {
    StateError::Corrupt {
        path: path.to_path_buf(),
        message,
    }
}

/// Checks that `conn` is a nestless database of a schema this agent reads;
/// returns its `user_version` (0: not initialised).
fn schema_of(conn: &Connection, path: &Path) -> Result<i64, StateError> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| corrupt(path, e.to_string()))?;
    let app: i64 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(|e| corrupt(path, e.to_string()))?;
    if version == 0 && app == 0 {
        return Ok(0);
    }
    if app != APPLICATION_ID {
        return Err(corrupt(
            path,
            format!("application_id {app:#x} is not a nestless state database's"),
        ));
    }
    if version != SCHEMA_VERSION {
        return Err(corrupt(
            path,
            format!("schema version {version} (this agent reads {SCHEMA_VERSION})"),
        ));
    }
    Ok(version)
}

fn read_conn(conn: &Connection, path: &Path) -> Result<State, StateError> {
    let mut state = State::default();
    let mut rows = conn
        .prepare("SELECT seq, record FROM nics ORDER BY seq")
        .map_err(db_err("read", path))?;
    let mut it = rows.query([]).map_err(db_err("read", path))?;
    while let Some(row) = it.next().map_err(db_err("read", path))? {
        let seq: i64 = row.get(0).map_err(db_err("read", path))?;
        let text: String = row.get(1).map_err(db_err("read", path))?;
        let rec: NicRecord = serde_json::from_str(&text)
            .map_err(|e| corrupt(path, format!("nics row {seq}: {e}")))?;
        state.nics.push(rec);
    }
    let mut rows = conn
        .prepare("SELECT network, address FROM cursors")
        .map_err(db_err("read", path))?;
    let mut it = rows.query([]).map_err(db_err("read", path))?;
    while let Some(row) = it.next().map_err(db_err("read", path))? {
        let network: String = row.get(0).map_err(db_err("read", path))?;
        let address: String = row.get(1).map_err(db_err("read", path))?;
        let address: Ipv4Addr = address.parse().map_err(|_| {
            corrupt(
                path,
                format!("cursors row {network:?}: {address:?} is not an IPv4 address"),
            )
        })?;
        state.last_leased.insert(network, address);
    }
    Ok(state)
}

fn insert(tx: &rusqlite::Transaction<'_>, path: &Path, rec: &NicRecord) -> Result<(), StateError> {
    let text = serde_json::to_string(rec).map_err(|e| corrupt(path, e.to_string()))?;
    tx.prepare_cached("INSERT INTO nics (id, record) VALUES (?1, ?2)")
        .and_then(|mut s| s.execute(params![rec.id.as_str(), text]))
        .map_err(db_err("write", path))?;
    Ok(())
}

fn set_cursors(
    tx: &rusqlite::Transaction<'_>,
    path: &Path,
    cursors: &BTreeMap<String, Ipv4Addr>,
) -> Result<(), StateError> {
    for (network, address) in cursors {
        tx.prepare_cached(
            "INSERT INTO cursors (network, address) VALUES (?1, ?2) \
             ON CONFLICT (network) DO UPDATE SET address = excluded.address",
        )
        .and_then(|mut s| s.execute(params![network, address.to_string()]))
        .map_err(db_err("write", path))?;
    }
    Ok(())
}

impl SqliteStore {
    /// `state.db` in `dir`.
    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join("state.db")
    }

    /// Opens (creates) `state.db` in `dir`; on first open, imports
    /// `state.json` from `dir` if there is one (see the module doc).
    ///
    /// # Errors
    /// [`StateError`]: the directory or database cannot be created, the
    /// file is not a nestless database of this schema, or the `state.json`
    /// to import is unreadable (nothing is imported then).
    pub fn open(dir: &Path) -> Result<SqliteStore, StateError> {
        let path = SqliteStore::path_in(dir);
        fs::create_dir_all(dir).map_err(|source| StateError::Io {
            op: "create the directory of",
            path: path.clone(),
            source,
        })?;
        let mut conn = Connection::open(&path).map_err(db_err("open", &path))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db_err("open", &path))?;
        let version = schema_of(&conn, &path)?;
        // WAL: readers in other processes never block the writer; FULL:
        // each commit fsyncs the WAL (durable against power loss).
        conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0))
            .map_err(db_err("open", &path))?;
        conn.execute_batch("PRAGMA synchronous = FULL")
            .map_err(db_err("open", &path))?;
        let legacy = JsonFile::in_dir(dir);
        if version == 0 {
            let imported = legacy.read()?;
            let tx = conn.transaction().map_err(db_err("initialise", &path))?;
            tx.execute_batch(&format!(
                "CREATE TABLE IF NOT EXISTS nics (seq INTEGER PRIMARY KEY, id TEXT NOT NULL, \
                 record TEXT NOT NULL);
                 CREATE INDEX IF NOT EXISTS nics_id ON nics (id);
                 CREATE TABLE IF NOT EXISTS cursors (network TEXT PRIMARY KEY, \
                 address TEXT NOT NULL);
                 PRAGMA application_id = {APPLICATION_ID};
                 PRAGMA user_version = {SCHEMA_VERSION};"
            ))
            .map_err(db_err("initialise", &path))?;
            for rec in &imported.nics {
                insert(&tx, &path, rec)?;
            }
            set_cursors(&tx, &path, &imported.last_leased)?;
            tx.commit().map_err(db_err("initialise", &path))?;
            if legacy.path().exists() {
                log::info!(
                    "imported {} NIC record(s) from {} into {}",
                    imported.nics.len(),
                    legacy.path().display(),
                    path.display()
                );
            }
        }
        if legacy.path().exists() {
            // Imported now or by a run that crashed before this rename.
            let done = legacy.path().with_extension("json.migrated");
            fs::rename(legacy.path(), &done).map_err(|source| StateError::Io {
                op: "rename the imported",
                path: legacy.path().to_path_buf(),
                source,
            })?;
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|source| StateError::Io {
                    op: "fsync the directory of",
                    path: path.clone(),
                    source,
                })?;
        }
        Ok(SqliteStore { path, conn })
    }

    /// Reads the database at `path` without writing to it (another process
    /// may be its writer).
    ///
    /// # Errors
    /// [`StateError`].
    pub fn read_only(path: &Path) -> Result<State, StateError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(db_err("open", path))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db_err("open", path))?;
        if schema_of(&conn, path)? == 0 {
            return Ok(State::default());
        }
        read_conn(&conn, path)
    }

    /// Replaces everything stored with `state` in one transaction (tests,
    /// and whoever must rewrite a database by hand).
    ///
    /// # Errors
    /// [`StateError`]; nothing changed then.
    pub fn replace(&mut self, state: &State) -> Result<(), StateError> {
        let path = &self.path;
        let tx = self.conn.transaction().map_err(db_err("write", path))?;
        tx.execute_batch("DELETE FROM nics; DELETE FROM cursors;")
            .map_err(db_err("write", path))?;
        for rec in &state.nics {
            insert(&tx, path, rec)?;
        }
        set_cursors(&tx, path, &state.last_leased)?;
        tx.commit().map_err(db_err("commit", path))
    }

    /// Number of rows in `nics` (tests).
    pub fn rows(&self) -> Result<i64, StateError> {
        self.conn
            .query_row("SELECT count(*) FROM nics", [], |r| r.get(0))
            .map_err(db_err("read", &self.path))
    }
}

impl StateStore for SqliteStore {
    fn path(&self) -> &Path {
        &self.path
    }

    fn read(&mut self) -> Result<State, StateError> {
        read_conn(&self.conn, &self.path)
    }

    fn needs_all(&self) -> bool {
        false
    }

    fn commit(&mut self, batch: Batch) -> Result<(), StateError> {
        let path = &self.path;
        let tx = self.conn.transaction().map_err(db_err("write", path))?;
        for (id, now) in &batch.changed {
            tx.prepare_cached("DELETE FROM nics WHERE id = ?1")
                .and_then(|mut s| s.execute(params![id.as_str()]))
                .map_err(db_err("write", path))?;
            if let Some(rec) = now {
                insert(&tx, path, rec)?;
            }
        }
        set_cursors(&tx, path, &batch.cursors)?;
        tx.commit().map_err(db_err("commit", path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{lifecycle::NicState, names::NicId};

    fn rec(id: &str, ip: &str) -> NicRecord {
        NicRecord {
            id: id.parse().unwrap(),
            vm: "vm1".into(),
            sandbox_id: format!("sb-{id}"),
            scope: String::new(),
            interface: "eth0".into(),
            network: "default".into(),
            mac: "52:54:00:00:00:01".parse().unwrap(),
            ipv4: ip.parse().unwrap(),
            ipv6: None,
            state: NicState::Attached,
            slot: None,
            labels: Default::default(),
            created_unix: 1,
            hostlo: None,
            pooled: false,
        }
    }

    fn state(nics: Vec<NicRecord>, cursor: Option<&str>) -> State {
        State {
            nics,
            last_leased: cursor
                .map(|c| [("default".to_string(), c.parse().unwrap())].into())
                .unwrap_or_default(),
        }
    }

    /// Issue 11, item 4: the first open imports `state.json` whole (two
    /// records with one id included: merging is the loader's call, not the
    /// store's), renames it, and a second open imports nothing again.
    #[test]
    fn the_first_open_imports_state_json_once() {
        let dir = tempfile::tempdir().unwrap();
        let old = state(
            vec![
                rec("00000000aa", "10.0.0.2"),
                rec("00000000bb", "10.0.0.3"),
                rec("00000000bb", "10.0.0.4"),
            ],
            Some("10.0.0.4"),
        );
        JsonFile::in_dir(dir.path()).write(old.clone()).unwrap();
        // Before the import, a reader sees the JSON file's content.
        let (path, seen) =
            crate::state::read_dir(dir.path(), crate::state::StoreKind::Sqlite).unwrap();
        assert!(path.ends_with("state.json"), "{}", path.display());
        assert_eq!(seen, old);
        let mut db = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(db.read().unwrap(), old);
        assert!(!dir.path().join("state.json").exists());
        assert!(dir.path().join("state.json.migrated").exists());
        drop(db);
        // A state.json that shows up again (a restored backup) is not
        // imported over the database: it is set aside.
        JsonFile::in_dir(dir.path())
            .write(state(vec![rec("00000000cc", "10.0.0.9")], None))
            .unwrap();
        let mut db = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(db.read().unwrap(), old);
        assert!(!dir.path().join("state.json").exists());
        assert_eq!(
            SqliteStore::read_only(&SqliteStore::path_in(dir.path())).unwrap(),
            old
        );
    }

    /// An unreadable `state.json` stops the import and initialises
    /// nothing: once fixed, it is imported.
    #[test]
    fn a_bad_state_json_is_an_error_and_imports_nothing() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("state.json"), "{not json").unwrap();
        let e = SqliteStore::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("state.json"), "{e}");
        let good = state(vec![rec("00000000aa", "10.0.0.2")], None);
        JsonFile::in_dir(dir.path()).write(good.clone()).unwrap();
        assert_eq!(SqliteStore::open(dir.path()).unwrap().read().unwrap(), good);
    }

    /// A commit replaces every row of each changed id (duplicates too) and
    /// leaves the others alone; cursors are upserted.
    #[test]
    fn commits_write_the_changed_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = SqliteStore::open(dir.path()).unwrap();
        db.replace(&state(
            vec![
                rec("00000000aa", "10.0.0.2"),
                rec("00000000bb", "10.0.0.3"),
                rec("00000000bb", "10.0.0.4"),
                rec("00000000cc", "10.0.0.5"),
            ],
            None,
        ))
        .unwrap();
        let mut bb = rec("00000000bb", "10.0.0.3");
        bb.state = NicState::Detaching;
        let aa: NicId = "00000000aa".parse().unwrap();
        db.commit(Batch {
            changed: vec![(aa, None), (bb.id.clone(), Some(bb.clone()))],
            cursors: [("default".to_string(), "10.0.0.5".parse().unwrap())].into(),
            all: None,
        })
        .unwrap();
        let now = db.read().unwrap();
        assert_eq!(
            now,
            state(vec![rec("00000000cc", "10.0.0.5"), bb], Some("10.0.0.5"))
        );
        assert_eq!(db.rows().unwrap(), 2);
    }

    /// Files that are not this agent's database are errors naming the file
    /// and what is wrong, never an empty state.
    #[test]
    fn foreign_newer_or_damaged_databases_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = SqliteStore::path_in(dir.path());
        fs::write(&path, vec![0x42u8; 8192]).unwrap();
        let e = SqliteStore::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        fs::remove_file(&path).unwrap();

        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE t (x); PRAGMA application_id = 7;")
            .unwrap();
        drop(conn);
        let e = SqliteStore::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("application_id 0x7"), "{e}");
        fs::remove_file(&path).unwrap();

        drop(SqliteStore::open(dir.path()).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("PRAGMA user_version = 9;").unwrap();
        drop(conn);
        let e = SqliteStore::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("schema version 9"), "{e}");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA user_version = 1; INSERT INTO nics (id, record) VALUES ('x', '{\"id\": 1}');",
        )
        .unwrap();
        drop(conn);
        let e = SqliteStore::open(dir.path())
            .unwrap()
            .read()
            .unwrap_err()
            .to_string();
        assert!(e.contains("nics row 1"), "{e}");
    }

    /// Another process (here: another connection) reads the database while
    /// its writer has it open, and sees every committed change.
    #[test]
    fn readers_see_commits_while_the_writer_runs() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = SqliteStore::open(dir.path()).unwrap();
        let path = SqliteStore::path_in(dir.path());
        assert!(SqliteStore::read_only(&path).unwrap().nics.is_empty());
        let a = rec("00000000aa", "10.0.0.2");
        db.commit(Batch {
            changed: vec![(a.id.clone(), Some(a.clone()))],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(SqliteStore::read_only(&path).unwrap().nics, vec![a]);
    }
}
