//! The agent's durable state: its NIC records and, per network, the address
//! handed out last. Leases are not stored on their own; they are the
//! addresses of the records.
//!
//! Two stores hold it, behind [`StateStore`]:
//!
//! * [`sqlite::SqliteStore`], `state.db` (the default since issue 11): one
//!   row per record in an SQLite database in WAL mode with
//!   `synchronous = FULL`. A commit writes the rows that changed, so its
//!   cost does not grow with the number of NICs; SQLite makes it atomic and
//!   durable (a crash at any point keeps the last committed transaction
//!   whole), and other processes can read it while the agent runs
//!   (`sqlite3 state.db`, [`read_dir`]).
//! * [`json::JsonFile`], `state.json`: the whole state in one file, rewritten
//!   on every commit (tmp + fsync + rename + directory fsync). The format of
//!   the agent before issue 11; [`sqlite::SqliteStore::open`] imports it once
//!   and renames it `state.json.migrated`. Kept to read old files and, for
//!   comparison, as a store of its own (`[agent] state_store = "json"`).
//!
//! What the records must be to be loaded (no two share an address, a MAC,
//! an id, ...; each fits the configuration) is checked by [`crate::stale`],
//! on what the store returns: a store never drops or merges records itself.

pub mod json;
pub mod sqlite;

use std::{
    collections::BTreeMap,
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    str::FromStr,
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

/// State store errors.
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
    /// The database refused an operation (SQLite's own error text).
    #[error("cannot {op} state database {path}: {message}")]
    Db {
        /// What was being done.
        op: &'static str,
        /// The database file.
        path: PathBuf,
        /// SQLite's message.
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
            StateError::Db { op, path, message } => StateError::Db {
                op,
                path: path.clone(),
                message: message.clone(),
            },
        }
    }
}

/// Which store holds the state (`[agent] state_store`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreKind {
    /// `state.db` ([`sqlite::SqliteStore`]).
    #[default]
    Sqlite,
    /// `state.json` ([`json::JsonFile`]).
    Json,
}

impl FromStr for StoreKind {
    type Err = String;

    fn from_str(s: &str) -> Result<StoreKind, String> {
        match s {
            "sqlite" => Ok(StoreKind::Sqlite),
            "json" => Ok(StoreKind::Json),
            other => Err(format!(
                "unknown state store {other:?} (expected \"sqlite\" or \"json\")"
            )),
        }
    }
}

impl fmt::Display for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StoreKind::Sqlite => "sqlite",
            StoreKind::Json => "json",
        })
    }
}

/// One commit: what changed since the last one.
#[derive(Debug, Default)]
pub struct Batch {
    /// Each record id touched, with the record as it now is (`None`: gone).
    /// Every stored record of a listed id is replaced, duplicates included.
    pub changed: Vec<(NicId, Option<NicRecord>)>,
    /// Per network, the address handed out last (all networks, every time:
    /// there are few).
    pub cursors: BTreeMap<String, Ipv4Addr>,
    /// Every record, for a store that rewrites everything
    /// ([`StateStore::needs_all`]); `None` otherwise.
    pub all: Option<Vec<NicRecord>>,
}

/// A durable home for [`State`]. One owner at a time (the agent's state
/// writer); commits are atomic and durable when they return `Ok`.
pub trait StateStore: Send {
    /// Where it lives (named in errors and by `nestlessctl status`).
    fn path(&self) -> &Path;

    /// Everything stored, records in a stable order (oldest write first for
    /// the database, file order for JSON).
    ///
    /// # Errors
    /// [`StateError`] when unreadable.
    fn read(&mut self) -> Result<State, StateError>;

    /// Whether [`StateStore::commit`] needs [`Batch::all`].
    fn needs_all(&self) -> bool;

    /// Makes `batch` durable, all of it or (on error) none of it.
    ///
    /// # Errors
    /// [`StateError`]; the stored state is then the one before.
    fn commit(&mut self, batch: Batch) -> Result<(), StateError>;
}

/// The store of `kind` in `dir`, created when missing; the database
/// imports a `state.json` it finds beside it on first open.
///
/// # Errors
/// [`StateError`] when it cannot be opened or created.
pub fn open(dir: &Path, kind: StoreKind) -> Result<Box<dyn StateStore>, StateError> {
    Ok(match kind {
        StoreKind::Sqlite => Box::new(sqlite::SqliteStore::open(dir)?),
        StoreKind::Json => Box::new(json::JsonFile::in_dir(dir)),
    })
}

/// The state in `dir` as the store of `kind` would load it, read without
/// changing anything (no import, no file created): for `--check-config` and
/// for other processes while the agent runs. The database falls back to a
/// `state.json` it has not imported yet. Returns the path read (or the one
/// that would be created).
///
/// # Errors
/// [`StateError`] when unreadable.
pub fn read_dir(dir: &Path, kind: StoreKind) -> Result<(PathBuf, State), StateError> {
    let json = json::JsonFile::in_dir(dir);
    match kind {
        StoreKind::Json => Ok((json.path().to_path_buf(), json.read()?)),
        StoreKind::Sqlite => {
            let db = sqlite::SqliteStore::path_in(dir);
            if db.exists() {
                Ok((db.clone(), sqlite::SqliteStore::read_only(&db)?))
            } else if json.path().exists() {
                Ok((json.path().to_path_buf(), json.read()?))
            } else {
                Ok((db, State::default()))
            }
        }
    }
}

/// The records stored in `dir` (the database, or a `state.json` not yet
/// imported), read without changing anything.
///
/// # Errors
/// [`StateError`] when unreadable.
pub fn records_in(dir: &Path) -> Result<Vec<NicRecord>, StateError> {
    Ok(read_dir(dir, StoreKind::Sqlite)?.1.nics)
}
