//! The record store: every NIC record and the leases they hold, behind one
//! lock, with the named queries the agent asks and the persistence of it all.
//!
//! A change returns the record as it now is, so a caller never looks it up
//! again. Leases are not kept apart from the records: each network's
//! allocator is rebuilt from the records at load ([`Records::load`]), and a
//! record's lease is freed when the record goes ([`Records::remove`]). A
//! Hostlo record's address is fixed by its part and holds no lease.
//!
//! [`Records::persist`] asks the one writer of the state store for a save
//! and waits for it. The writer is a thread of its own that owns the store
//! (issue 11, items 3 and 4):
//!
//! ```text
//! persist() ──request──▶ writer thread: wait for a request, take every
//!   (await the reply)      request queued behind it, take the ids changed
//!                          since the last commit (and, for a whole-file
//!                          store, every record), commit once, answer all
//! ```
//!
//! Every change marks its record's id dirty under the store's lock; the
//! writer takes the dirty ids and clones those records only, so neither the
//! lock's hold time nor a commit grows with the number of NICs (the
//! database writes the changed rows). The lock is never held across the
//! commit. A commit that fails puts its ids back, so the next one retries
//! them.
//!
//! A caller that stops waiting (its request was cancelled) cancels
//! nothing: the save it asked for happens whole, and no two commits ever
//! overlap. Concurrent changes share one commit and fsync (group commit),
//! and the dirty ids are taken after the changes of the requests it
//! answers, so an answered save holds the caller's change and the store
//! never goes back in time.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{mpsc, Arc, Mutex as StdMutex, MutexGuard},
    time::{SystemTime, UNIX_EPOCH},
};

use nestless_model::MacAddr;
use tokio::sync::oneshot;

use crate::{
    config::{Config, NetworkConfig, VmConfig},
    error::AgentError,
    hostlo::HostloRef,
    ipam::Ipam,
    lifecycle::{self, Event, NicState},
    names::{free_mac, NicId, DEFAULT_IFNAME},
    stale::{self, LoadError, StalePolicy},
    state::{self, Batch, NicRecord, StateError, StateStore},
};

/// The records and leases, persisted to the state file.
pub(super) struct Records {
    /// Where the store lives.
    path: PathBuf,
    store: Arc<StdMutex<Store>>,
    /// Requests to the writer thread ([`Writer`]).
    saves: Option<mpsc::Sender<SaveRequest>>,
    /// The writer thread, joined when the records go: the store is closed
    /// (and its files left alone) once an agent is dropped.
    writer: Option<std::thread::JoinHandle<()>>,
    /// Snapshots written (tests: group commit).
    #[cfg(test)]
    writes: Arc<std::sync::atomic::AtomicU64>,
    /// Records of the state store dropped at load.
    dropped: usize,
}

/// A save request: the writer answers on it once a snapshot taken after
/// the request is on disk.
type SaveRequest = oneshot::Sender<Result<(), StateError>>;

/// The one writer of the state file: a thread that takes the queued save
/// requests, writes one snapshot for them all, and answers each.
struct Writer {
    state: Box<dyn StateStore>,
    store: Arc<StdMutex<Store>>,
    requests: mpsc::Receiver<SaveRequest>,
    #[cfg(test)]
    writes: Arc<std::sync::atomic::AtomicU64>,
}

impl Writer {
    /// Starts the writer; it ends when the last sender is gone.
    fn spawn(self) -> Result<std::thread::JoinHandle<()>, StateError> {
        let path = StateStore::path(&*self.state).to_path_buf();
        std::thread::Builder::new()
            .name("state-writer".into())
            .spawn(move || self.run())
            .map_err(|source| StateError::Io {
                op: "start the writer of",
                path,
                source,
            })
    }

    fn run(mut self) {
        while let Ok(first) = self.requests.recv() {
            let mut waiting = vec![first];
            waiting.extend(self.requests.try_iter());
            let (batch, ids) = {
                let mut store = self.store.lock().unwrap_or_else(|e| e.into_inner());
                let ids = std::mem::take(&mut store.dirty);
                let batch = Batch {
                    changed: ids
                        .iter()
                        .map(|id| (id.clone(), store.records.get(id).cloned()))
                        .collect(),
                    cursors: store
                        .ipam
                        .iter()
                        .filter_map(|(n, i)| Some((n.clone(), i.last_given()?)))
                        .collect(),
                    all: self
                        .state
                        .needs_all()
                        .then(|| store.records.values().cloned().collect()),
                };
                (batch, ids)
            };
            let result = self.state.commit(batch);
            if result.is_err() {
                // Not stored: the next commit takes these ids again.
                let mut store = self.store.lock().unwrap_or_else(|e| e.into_inner());
                store.dirty.extend(ids);
            }
            #[cfg(test)]
            self.writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            for reply in waiting {
                // A caller that stopped waiting gets nothing; its save is done.
                let _ = reply.send(match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(e.duplicate()),
                });
            }
        }
    }
}

struct Store {
    records: BTreeMap<NicId, NicRecord>,
    ipam: HashMap<String, Ipam>,
    /// Ids changed since the last commit (see the module doc).
    dirty: BTreeSet<NicId>,
}

/// What a new record holds besides its id, MAC and state.
pub(super) struct NewRecord<'a> {
    /// The VM's tenant network (see [`NicRecord::network`]).
    pub network: &'a NetworkConfig,
    /// A fixed address (Hostlo segment) instead of a lease from the network.
    pub fixed_ipv4: Option<Ipv4Addr>,
    /// A preferred MAC (Hostlo: stable per pod and part, so that a restarted
    /// part's neighbours need not relearn it); random when taken or absent.
    pub mac: Option<MacAddr>,
    /// The scope of the sandbox (see [`NicRecord::scope`]).
    pub scope: &'a str,
    /// The sandbox; empty for a pooled NIC.
    pub sandbox_id: &'a str,
    /// The interface name in the pod (see [`NicRecord::interface`]).
    pub interface: &'a str,
    /// Labels from the request.
    pub labels: BTreeMap<String, String>,
    /// A warm-pool NIC.
    pub pooled: bool,
    /// The Hostlo part it serves.
    pub hostlo: Option<HostloRef>,
}

/// The parts of a Hostlo pod, read under one lock.
pub(super) struct PodRecords {
    /// The segment NIC records of the pod's parts.
    pub parts: Vec<NicRecord>,
    /// The BrFusion address of part 0's sandbox (the pod IP).
    pub pod_ip: Option<Ipv4Addr>,
}

impl Records {
    /// The records of the state file, their leases taken again. Records of
    /// VMs that are not configured are dropped; records that do not fit the
    /// configuration are refused or dropped, as `policy` says (see
    /// [`crate::stale`]). Either way, every BrFusion record kept holds its
    /// lease, and only its own.
    ///
    /// # Errors
    /// [`AgentError::State`] (unreadable file), [`AgentError::Stale`].
    pub fn load(config: &Config, policy: StalePolicy) -> Result<Records, AgentError> {
        let mut state = state::open(&config.agent.state_dir, config.agent.state_store)?;
        let path = state.path().to_path_buf();
        let saved = state.read()?;
        let sorted = stale::sort_saved(config, saved, &path, policy).map_err(|e| match e {
            LoadError::State(e) => AgentError::State(e),
            LoadError::Stale(e) => AgentError::Stale(e),
        })?;
        for s in &sorted.misfits {
            log::warn!("released (--release-stale): {s}");
        }
        for r in &sorted.vm_gone {
            log::warn!(
                "dropped NIC {} of VM {}, which is no longer configured",
                r.id,
                r.vm
            );
        }
        // What was dropped leaves the store at the next commit.
        let dirty = sorted
            .misfits
            .iter()
            .map(|m| m.record.id.clone())
            .chain(sorted.vm_gone.iter().map(|r| r.id.clone()))
            .collect();
        let store = Store {
            records: sorted.fits.into_iter().map(|r| (r.id.clone(), r)).collect(),
            ipam: sorted.ipam,
            dirty,
        };
        let dropped = sorted.misfits.len() + sorted.vm_gone.len();
        let store = Arc::new(StdMutex::new(store));
        let (saves, requests) = mpsc::channel();
        #[cfg(test)]
        let writes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let writer = Writer {
            state,
            store: store.clone(),
            requests,
            #[cfg(test)]
            writes: writes.clone(),
        }
        .spawn()?;
        let writer = Some(writer);
        Ok(Records {
            path,
            store,
            saves: Some(saves),
            writer,
            #[cfg(test)]
            writes,
            dropped,
        })
    }

    /// How many records of the state store [`Records::load`] dropped (the
    /// store still has them until the next save).
    pub fn dropped_at_load(&self) -> usize {
        self.dropped
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        // No code panics while holding the lock (and a release build aborts
        // on panic), so a poisoned lock still guards consistent records.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the state store lives.
    pub fn state_path(&self) -> &Path {
        &self.path
    }

    /// Marks `id` changed: the next commit writes it (or its removal).
    fn touch(store: &mut Store, id: &NicId) {
        store.dirty.insert(id.clone());
    }

    /// All records (a snapshot), optionally of one VM.
    /// A page of a listing (issue 11, item 7): at most `limit` records of VM
    /// `vm` (every VM: `None`) that `keep` keeps, in id order, with ids
    /// after `after`; and whether more follow. Clones only what it returns.
    pub fn page(
        &self,
        vm: Option<&str>,
        after: Option<&NicId>,
        limit: usize,
        keep: impl Fn(&NicRecord) -> bool,
    ) -> (Vec<NicRecord>, bool) {
        use std::ops::Bound;
        let store = self.lock();
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut found = store
            .records
            .range((from, Bound::Unbounded))
            .map(|(_, r)| r)
            .filter(|r| vm.is_none_or(|v| r.vm == v) && keep(r));
        let page: Vec<NicRecord> = found.by_ref().take(limit).cloned().collect();
        let more = found.next().is_some();
        (page, more)
    }

    /// Every record (of VM `vm`).
    pub fn snapshot(&self, vm: Option<&str>) -> Vec<NicRecord> {
        self.lock()
            .records
            .values()
            .filter(|r| vm.is_none_or(|v| r.vm == v))
            .cloned()
            .collect()
    }

    /// Record `id`, if any.
    pub fn get(&self, id: &NicId) -> Option<NicRecord> {
        self.lock().records.get(id).cloned()
    }

    /// The ids of every record.
    pub fn ids(&self) -> Vec<NicId> {
        self.lock().records.keys().cloned().collect()
    }

    /// Number of NICs VM `vm` has (pooled ones included).
    pub fn count(&self, vm: &str) -> usize {
        self.lock().records.values().filter(|r| r.vm == vm).count()
    }

    /// (pooled, all) NICs of VM `vm`.
    pub fn pool_counts(&self, vm: &str) -> (usize, usize) {
        let store = self.lock();
        let mine = store.records.values().filter(|r| r.vm == vm);
        (mine.clone().filter(|r| r.pooled).count(), mine.count())
    }

    /// Whether a record of VM `vm` waits for a cleanup (not Attached).
    pub fn pending(&self, vm: &str) -> bool {
        self.lock()
            .records
            .values()
            .any(|r| r.vm == vm && r.state != NicState::Attached)
    }

    /// VM `vm`'s BrFusion NIC (pooled or not) that `matches`.
    pub fn find_brfusion(
        &self,
        vm: &str,
        matches: impl Fn(&NicRecord) -> bool,
    ) -> Option<NicRecord> {
        self.lock()
            .records
            .values()
            .find(|r| r.vm == vm && r.hostlo.is_none() && matches(r))
            .cloned()
    }

    /// A warm NIC of VM `vm` on `network`: plugged, leased, unassigned.
    pub fn warm(&self, vm: &str, network: &str) -> Option<NicRecord> {
        self.lock()
            .records
            .values()
            .find(|r| {
                r.vm == vm
                    && r.pooled
                    && r.hostlo.is_none()
                    && r.state == NicState::Attached
                    && r.network == network
            })
            .cloned()
    }

    /// The segment NIC of part `part` of Hostlo pod `pod` of tenant network
    /// `network`, in whichever VM.
    pub fn hostlo_part(&self, network: &str, pod: &str, part: u32) -> Option<NicRecord> {
        self.lock()
            .records
            .values()
            .find(|r| {
                r.network == network
                    && r.hostlo
                        .as_ref()
                        .is_some_and(|h| h.pod == pod && h.part == part)
            })
            .cloned()
    }

    /// Whether VM `vm` holds a part of Hostlo pod `pod` of tenant network
    /// `network`.
    pub fn holds_hostlo(&self, vm: &str, network: &str, pod: &str) -> bool {
        self.lock().records.values().any(|r| {
            r.vm == vm && r.network == network && r.hostlo.as_ref().is_some_and(|h| h.pod == pod)
        })
    }

    /// Every Hostlo segment NIC record.
    pub fn hostlo_all(&self) -> Vec<NicRecord> {
        self.lock()
            .records
            .values()
            .filter(|r| r.hostlo.is_some())
            .cloned()
            .collect()
    }

    /// The parts of Hostlo pod `pod` of tenant network `network` and the pod
    /// IP: the address of the `eth0` NIC of part 0's sandbox in the empty
    /// scope (CRI's pod NIC), in part 0's VM.
    pub fn hostlo_pod(&self, network: &str, pod: &str) -> PodRecords {
        let store = self.lock();
        let parts: Vec<NicRecord> = store
            .records
            .values()
            .filter(|r| r.network == network && r.hostlo.as_ref().is_some_and(|h| h.pod == pod))
            .cloned()
            .collect();
        let pod_ip = parts
            .iter()
            .find(|r| r.hostlo.as_ref().is_some_and(|h| h.part == 0))
            .and_then(|p0| {
                store
                    .records
                    .values()
                    .find(|r| {
                        r.vm == p0.vm
                            && r.hostlo.is_none()
                            && !r.pooled
                            && r.scope.is_empty()
                            && r.sandbox_id == p0.sandbox_id
                            && r.interface == DEFAULT_IFNAME
                    })
                    .map(|r| r.ipv4)
            });
        PodRecords { parts, pod_ip }
    }

    /// Writes a new record for VM `vm` in state Attaching (in memory: the
    /// caller persists it): checks the quota, leases an address (or takes
    /// the fixed one), picks a MAC no other record has and a fresh id.
    ///
    /// # Errors
    /// [`AgentError::QuotaExceeded`], [`AgentError::Ipam`] when the network
    /// has no free address, [`AgentError::NoFreeMac`] when the MAC prefix
    /// has none.
    pub fn begin(
        &self,
        vm: &VmConfig,
        new: NewRecord<'_>,
        mac_prefix: &[u8],
    ) -> Result<NicRecord, AgentError> {
        let mut store = self.lock();
        let count = store.records.values().filter(|r| r.vm == vm.name).count() as u32;
        if count >= vm.max_nics {
            return Err(AgentError::QuotaExceeded {
                vm: vm.name.clone(),
                quota: vm.max_nics,
            });
        }
        // The MAC first: a failure after the lease would leak it.
        let used_macs: HashSet<MacAddr> = store.records.values().map(|r| r.mac).collect();
        let mac = match new.mac.filter(|m| !used_macs.contains(m)) {
            Some(m) => m,
            None => free_mac(mac_prefix, |m| used_macs.contains(m)).ok_or_else(|| {
                AgentError::NoFreeMac {
                    prefix: mac_prefix
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":"),
                }
            })?,
        };
        let (ipv4, ipv6) = match new.fixed_ipv4 {
            Some(a) => (a, None),
            None => {
                let ipam = store
                    .ipam
                    .entry(new.network.name.clone())
                    .or_insert_with(|| Ipam::new(new.network));
                let ipv4 = ipam.allocate()?;
                (ipv4, ipam.ipv6_for(ipv4))
            }
        };
        let id = loop {
            let id = NicId::random();
            if !store.records.contains_key(&id) {
                break id;
            }
        };
        let rec = NicRecord {
            id: id.clone(),
            vm: vm.name.clone(),
            sandbox_id: new.sandbox_id.to_string(),
            scope: new.scope.to_string(),
            interface: new.interface.to_string(),
            network: new.network.name.clone(),
            mac,
            ipv4,
            ipv6,
            state: NicState::Attaching,
            slot: None,
            labels: new.labels,
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
            hostlo: new.hostlo,
            pooled: new.pooled,
        };
        Records::touch(&mut store, &id);
        store.records.insert(id, rec.clone());
        Ok(rec)
    }

    /// Changes record `id` with `change`; returns it as it now is.
    pub fn update(&self, id: &NicId, change: impl FnOnce(&mut NicRecord)) -> Option<NicRecord> {
        let mut store = self.lock();
        let rec = store.records.get_mut(id)?;
        change(rec);
        let rec = rec.clone();
        Records::touch(&mut store, id);
        Some(rec)
    }

    /// Puts `rec` back as it was (undo of an [`Records::update`] that could
    /// not be persisted).
    pub fn restore(&self, rec: NicRecord) {
        let mut store = self.lock();
        Records::touch(&mut store, &rec.id);
        store.records.insert(rec.id.clone(), rec);
    }

    /// Moves record `id` along the lifecycle ([`lifecycle::transition`]).
    /// An event that ends the record's life (`Failed`, `Unplugged`) drops it
    /// and frees its lease. Returns the record as it now is (or was, when
    /// dropped); `None` when it is gone, or when the table refuses the event:
    /// that one is a bug, and the only case logged as an error.
    pub fn apply(&self, id: &NicId, event: Event) -> Option<NicRecord> {
        let mut store = self.lock();
        let rec = store.records.get_mut(id)?;
        match lifecycle::transition(Some(rec.state), event) {
            Ok(Some(next)) => {
                rec.state = next;
                let rec = rec.clone();
                Records::touch(&mut store, id);
                Some(rec)
            }
            Ok(None) => {
                drop(store);
                self.remove(id)
            }
            Err(refused) => {
                log::error!("NIC {id}: {refused}; ignored");
                None
            }
        }
    }

    /// Drops record `id` and frees its lease; returns it.
    pub fn remove(&self, id: &NicId) -> Option<NicRecord> {
        let mut store = self.lock();
        let rec = store.records.remove(id)?;
        Records::touch(&mut store, id);
        if rec.hostlo.is_none() {
            if let Some(ipam) = store.ipam.get_mut(&rec.network) {
                ipam.release(rec.ipv4);
            }
        }
        Some(rec)
    }

    /// Writes every record to the state file (atomically, durably),
    /// through the one writer: returns once a snapshot taken after this
    /// call began is on disk. Dropping the future cancels only the wait.
    ///
    /// # Errors
    /// [`AgentError::State`] when the file cannot be written.
    pub async fn persist(&self) -> Result<(), AgentError> {
        let (reply, done) = oneshot::channel();
        let stopped = || StateError::Io {
            op: "write (its writer stopped)",
            path: self.path.clone(),
            source: std::io::Error::from(std::io::ErrorKind::BrokenPipe),
        };
        self.saves
            .as_ref()
            .ok_or_else(stopped)?
            .send(reply)
            .map_err(|_| stopped())?;
        done.await.map_err(|_| stopped())??;
        Ok(())
    }

    /// Drops `network`'s allocator (the network changed, nothing leased).
    pub fn forget_network(&self, network: &str) {
        self.lock().ipam.remove(network);
    }

    /// Addresses leased on `network` (tests).
    #[cfg(test)]
    pub fn leased(&self, network: &str) -> u32 {
        self.lock().ipam.get(network).map_or(0, Ipam::leased)
    }

    /// Whether `addr` is leased on `network` (tests).
    #[cfg(test)]
    pub fn is_leased(&self, network: &str, addr: Ipv4Addr) -> bool {
        self.lock()
            .ipam
            .get(network)
            .is_some_and(|i| i.is_leased(addr))
    }
}

impl Drop for Records {
    /// Closes the writer's queue and waits for it to end: the saves asked
    /// for are made, and the store is closed when this returns.
    fn drop(&mut self) {
        drop(self.saves.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::agent::rig::{join, keyed, rig};

    /// Issue 9, item 1: the pod IP of a Hostlo pod is the `eth0` NIC of
    /// part 0's sandbox in the empty scope (CRI's), not a NIC of the same
    /// sandbox id in a containerd namespace, nor its second interface.
    #[tokio::test]
    async fn hostlo_pod_ip_is_the_cri_eth0_of_part_0() {
        let dir = tempfile::tempdir().unwrap();
        let r = rig(dir.path(), "10.9.0.254");
        r.agent
            .attach("vm2", keyed("team-one", "sb0", "eth0"))
            .await
            .unwrap();
        r.agent
            .attach("vm2", keyed("", "sb0", "net1"))
            .await
            .unwrap();
        let eth0 = r
            .agent
            .attach("vm2", keyed("", "sb0", ""))
            .await
            .unwrap()
            .record;
        let (_, view) = r
            .agent
            .hostlo_join("vm2", join("web", 0, "sb0"))
            .await
            .unwrap();
        assert_eq!(view.pod_ip, Some(eth0.ipv4));
    }

    /// Issue 11, item 3: saves go through one writer. Concurrent saves
    /// share writes (group commit), each answered save holds its change,
    /// and a save whose caller stopped waiting is still written whole.
    #[tokio::test]
    async fn saves_are_grouped_and_survive_their_callers() {
        use std::sync::atomic::Ordering;

        use crate::{agent::rig::rig, state::records_in};
        let dir = tempfile::tempdir().unwrap();
        let r = rig(dir.path(), "10.9.0.254");
        let vm = r.agent.vm("vm1").unwrap().clone();
        let before = r.agent.records.writes.load(Ordering::Relaxed);
        let saves = (0..50).map(|_| {
            let rec = r
                .agent
                .records
                .begin(
                    &vm.config,
                    crate::agent::attach::brfusion_nic(&vm, None, &Default::default()).record,
                    &[0x52, 0x54, 0x00],
                )
                .map(|rec| rec.id);
            let records = &r.agent.records;
            async move {
                let id = rec.ok();
                records.persist().await.unwrap();
                id
            }
        });
        let ids: Vec<_> = futures::future::join_all(saves).await;
        let written = r.agent.records.writes.load(Ordering::Relaxed) - before;
        assert!(written < 50, "{written} writes for 50 concurrent saves");
        let on_disk: Vec<_> = records_in(dir.path())
            .unwrap()
            .into_iter()
            .map(|rec| rec.id)
            .collect();
        for id in ids.iter().flatten() {
            assert!(on_disk.contains(id), "{id} not saved");
            // Room under the VM's quota for the next one.
            r.agent.records.remove(id);
        }
        // A save whose caller goes away once it is asked is still made, with
        // no further save: wait for the store to hold it.
        let a = r
            .agent
            .records
            .begin(
                &vm.config,
                crate::agent::attach::brfusion_nic(&vm, None, &Default::default()).record,
                &[0x52, 0x54, 0x00],
            )
            .unwrap();
        {
            let mut save = Box::pin(r.agent.records.persist());
            let _ = futures::poll!(save.as_mut());
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !records_in(dir.path())
            .unwrap()
            .iter()
            .any(|rec| rec.id == a.id)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the abandoned save was never made"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Next-fit goes on after the last address across a restart: the
    /// state file keeps it.
    #[tokio::test]
    async fn a_restart_does_not_reuse_the_address_released_last() {
        let dir = tempfile::tempdir().unwrap();
        let a = {
            let r = rig(dir.path(), "10.9.0.254");
            let a = r
                .agent
                .attach("vm2", keyed("", "a", ""))
                .await
                .unwrap()
                .record;
            r.agent
                .detach("vm2", crate::agent::NicSelector::Id(a.id.clone()))
                .await
                .unwrap();
            a
        };
        let r = rig(dir.path(), "10.9.0.254");
        let b = r
            .agent
            .attach("vm2", keyed("", "b", ""))
            .await
            .unwrap()
            .record;
        assert_ne!(b.ipv4, a.ipv4, "handed out again at once");
        assert_eq!(u32::from(b.ipv4), u32::from(a.ipv4) + 1);
    }
}
