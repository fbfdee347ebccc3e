//! The libvirt backend: a tap on the host bridge, handed to libvirt as an
//! unmanaged `<interface type='ethernet'>` and hot-plugged with
//! `virDomainAttachDeviceFlags`, so that libvirt's record of the domain
//! (`virsh domiflist`, `virsh dumpxml`, a migration) always shows exactly
//! the NICs nestless made.
//!
//! Plug, with each step undone if a later one fails:
//!
//! ```text
//! agent                          kernel                      libvirtd ─▶ QEMU
//!   │ open /dev/net/tun, TUNSETIFF ─▶ tap nlh<id> (lives while the fd does)
//!   │ set master=bridge, mtu, alias, up ─▶
//!   │ TUNSETPERSIST, close fd ─────▶ tap stays (owned by the agent's alias)
//!   │ AttachDeviceFlags(<interface type='ethernet'> target dev=nlh<id> managed='no'
//!   │     mac, virtio, mtu, alias ua-nl-<id>; LIVE [+ CONFIG]) ──▶ opens the tap,
//!   │                                                              device_add
//! ```
//!
//! Unplug: `DetachDeviceFlags` naming the alias, then the live XML is read
//! at libvirt's `device-removed` event for the alias (the guest released it)
//! and every 50 ms, until the interface is gone or the unplug timeout
//! passes; then the tap is deleted.
//!
//! Why the agent makes the tap (`managed='no'`) rather than letting libvirt
//! create one on the bridge: the tap is the NIC's host end for every
//! backend, so the sweep of unknown taps at start, the watch of deleted
//! taps, the bridge-full error and the reconcile work as they do for raw
//! QEMU; the agent sets its owner alias on it before it exists for
//! libvirt, so a crash at any step leaves nothing the next start cannot
//! find (the tap only becomes persistent once it carries the alias); and
//! libvirt needs no access to the tenant bridges.
//!
//! libvirt's calls block: each runs in `spawn_blocking`, on a connection
//! of the VM's own (opened at first use, opened again after a failure), so
//! that a slow libvirtd or domain holds no lock another VM needs.
//!
//! Lifecycle: [`VmBackend::probe`] returns a generation made of the
//! domain's UUID and id (a new id at each start), which the agent's upkeep
//! compares; a domain that stopped (or is no longer defined) is reachable
//! and has no NIC, so its records are released by the usual reconcile.
//! libvirt's domain events ([`super::libvirt_events`]: lifecycle, reboot,
//! device-removed) wake the upkeep at once ([`VmBackend::events`]); a reboot
//! inside the same QEMU process, which keeps the domain's id, is seen only
//! through them (`GuestRestarted`: the sandboxes' NICs are released). The
//! upkeep's period (2 s) and the unplug's poll of the live XML (50 ms) stay
//! as the fallback for events lost with a connection.
//!
//! Without the `libvirt` cargo feature (a static build: libvirt.so cannot be
//! linked statically) only the error types and pure helpers are here, and
//! the configuration refuses `backend = "libvirt"`.

#[cfg(feature = "libvirt")]
pub use imp::{Conn, LibvirtBackend};

/// The connection URI when none is configured.
pub const DEFAULT_URI: &str = "qemu:///system";
/// How often discovery asks libvirt which domains run.
pub const DEFAULT_POLL: std::time::Duration = std::time::Duration::from_millis(1000);
/// The generation of a domain that does not run (or is not defined).
pub const STOPPED_GENERATION: u64 = 1;

/// What went wrong, as far as the agent cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LibvirtErrorKind {
    /// libvirtd cannot be reached (or the connection broke).
    Unreachable,
    /// No domain of that name.
    NoDomain,
    /// The domain does not run.
    NotRunning,
    /// The domain has no free slot for a device.
    NoSlot,
    /// Anything else libvirt refused.
    Refused,
}

/// A libvirt call failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("libvirt {op} of domain {domain} ({uri}): {message}")]
pub struct LibvirtError {
    /// The call.
    pub op: &'static str,
    /// The domain.
    pub domain: String,
    /// The connection.
    pub uri: String,
    /// libvirt's message.
    pub message: String,
    /// Its class.
    pub kind: LibvirtErrorKind,
}

impl LibvirtError {
    /// True when libvirtd or the domain cannot be used right now.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self.kind,
            LibvirtErrorKind::Unreachable
                | LibvirtErrorKind::NoDomain
                | LibvirtErrorKind::NotRunning
        )
    }
}

/// The generation of a running domain: its UUID and id (libvirt gives a
/// new id at each start), never [`STOPPED_GENERATION`] or 0.
pub fn generation(uuid: &str, id: u32) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    uuid.hash(&mut h);
    id.hash(&mut h);
    h.finish().max(STOPPED_GENERATION + 1)
}

/// What a libvirt event tells the backend of domain `domain`: a reboot in place that
/// the guest restarted; a lifecycle change (started, stopped, ...) or the removal of
/// one of the agent's devices that its NICs may have changed. `None` for the rest
/// (other domains' events).
#[cfg(feature = "libvirt")]
pub(crate) fn event(
    ev: &crate::backend::libvirt_events::DomainEvent,
    domain: &str,
) -> Option<super::BackendEvent> {
    use crate::backend::libvirt_events::DomainEvent;
    if ev.domain() != domain {
        return None;
    }
    match ev {
        DomainEvent::Reboot { .. } => Some(super::BackendEvent::GuestRestarted),
        DomainEvent::Lifecycle { .. } => Some(super::BackendEvent::Changed),
        DomainEvent::DeviceRemoved { alias, .. }
            if super::domxml::id_from_alias(alias).is_some() =>
        {
            Some(super::BackendEvent::Changed)
        }
        DomainEvent::DeviceRemoved { .. } => None,
    }
}

#[cfg(feature = "libvirt")]
mod imp {
    use std::{
        collections::{HashMap, HashSet},
        sync::{Arc, Mutex},
        time::Duration,
    };

    use virt::{connect::Connect, domain::Domain, error::ErrorNumber, sys};

    use super::{generation, LibvirtError, LibvirtErrorKind, STOPPED_GENERATION};
    use crate::{
        backend::{
            domxml, libvirt_events, BackendError, BackendEvents, NicPlan, Plugged, VmBackend,
        },
        lifecycle::Presence,
        links::HostLinks,
        names::NicId,
    };

    /// How often an unplug reads the live XML while it waits for the guest.
    const UNPLUG_POLL: Duration = Duration::from_millis(50);

    fn kind_of(e: &virt::error::Error) -> LibvirtErrorKind {
        match e.code() {
            ErrorNumber::NoConnect
            | ErrorNumber::InvalidConn
            | ErrorNumber::SystemError
            | ErrorNumber::Rpc
            | ErrorNumber::AuthFailed => LibvirtErrorKind::Unreachable,
            ErrorNumber::NoDomain => LibvirtErrorKind::NoDomain,
            ErrorNumber::OperationInvalid if e.message().contains("not running") => {
                LibvirtErrorKind::NotRunning
            }
            _ if e.message().contains("No more available PCI slots") => LibvirtErrorKind::NoSlot,
            _ => LibvirtErrorKind::Refused,
        }
    }

    /// An open connection, closed when the last user drops it (the `virt`
    /// crate's `Connect` does not close itself).
    struct Owned(Connect);

    impl Drop for Owned {
        fn drop(&mut self) {
            let _ = self.0.close();
        }
    }

    /// One libvirt connection, shared by the blocking calls of one VM.
    #[derive(Clone)]
    pub struct Conn {
        uri: String,
        conn: Arc<Mutex<Option<Arc<Owned>>>>,
    }

    impl Conn {
        /// A connection to `uri`, opened at first use.
        pub fn new(uri: &str) -> Conn {
            Conn {
                uri: uri.to_string(),
                conn: Arc::new(Mutex::new(None)),
            }
        }

        /// The URI.
        pub fn uri(&self) -> &str {
            &self.uri
        }

        /// The open connection, or a new one (blocking).
        fn get(&self) -> Result<Arc<Owned>, virt::error::Error> {
            let mut slot = self.conn.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = slot.as_ref() {
                if c.0.is_alive().unwrap_or(false) {
                    return Ok(c.clone());
                }
            }
            // libvirt prints every error on stderr unless told otherwise.
            static QUIET: std::sync::Once = std::sync::Once::new();
            QUIET.call_once(virt::error::clear_error_callback);
            let c = Arc::new(Owned(Connect::open(Some(&self.uri))?));
            *slot = Some(c.clone());
            Ok(c)
        }

        /// Forgets the connection (it failed): the next call opens another.
        fn reset(&self) {
            *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }

        /// Runs `f` on the open connection in a blocking thread.
        pub async fn run<T: Send + 'static>(
            &self,
            op: &'static str,
            what: &str,
            f: impl FnOnce(&Connect) -> Result<T, virt::error::Error> + Send + 'static,
        ) -> Result<T, LibvirtError> {
            let this = self.clone();
            let result = tokio::task::spawn_blocking(move || {
                let c = this.get()?;
                f(&c.0)
            })
            .await;
            let err = |message: String, kind| LibvirtError {
                op,
                domain: what.to_string(),
                uri: self.uri.clone(),
                message,
                kind,
            };
            match result {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => {
                    let kind = kind_of(&e);
                    if kind == LibvirtErrorKind::Unreachable {
                        self.reset();
                    }
                    Err(err(e.message().to_string(), kind))
                }
                Err(join) => Err(err(
                    format!("the blocking call failed: {join}"),
                    LibvirtErrorKind::Refused,
                )),
            }
        }
    }

    /// What the backend learns of its domain in one call.
    #[derive(Debug, Clone)]
    enum DomainState {
        /// Not defined, or not running.
        Stopped,
        /// Running: its generation and live XML.
        Running { generation: u64, xml: String },
    }

    fn lookup(c: &Connect, domain: &str) -> Result<Option<Domain>, virt::error::Error> {
        match Domain::lookup_by_name(c, domain) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.code() == ErrorNumber::NoDomain => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The libvirt backend of one VM.
    pub struct LibvirtBackend {
        vm: String,
        domain: String,
        conn: Conn,
        links: Arc<dyn HostLinks>,
        persist_nics: bool,
        unplug_timeout: Duration,
    }

    impl LibvirtBackend {
        /// The backend of VM `vm`, domain `domain` on connection `uri`;
        /// `persist_nics` also adds its NICs to the domain's persistent
        /// definition.
        pub fn new(
            vm: &str,
            uri: &str,
            domain: &str,
            persist_nics: bool,
            links: Arc<dyn HostLinks>,
            unplug_timeout: Duration,
        ) -> LibvirtBackend {
            LibvirtBackend {
                vm: vm.to_string(),
                domain: domain.to_string(),
                conn: Conn::new(uri),
                links,
                persist_nics,
                unplug_timeout,
            }
        }

        fn err(&self, source: LibvirtError) -> BackendError {
            if source.kind == LibvirtErrorKind::NoSlot {
                return BackendError::NoFreeSlot {
                    vm: self.vm.clone(),
                    detail: source.to_string(),
                };
            }
            BackendError::Libvirt {
                vm: self.vm.clone(),
                source,
            }
        }

        fn not_running(&self, op: &'static str) -> BackendError {
            BackendError::Libvirt {
                vm: self.vm.clone(),
                source: LibvirtError {
                    op,
                    domain: self.domain.clone(),
                    uri: self.conn.uri.clone(),
                    message: "the domain is not running".into(),
                    kind: LibvirtErrorKind::NotRunning,
                },
            }
        }

        async fn state(&self) -> Result<DomainState, BackendError> {
            let domain = self.domain.clone();
            self.conn
                .run("lookup", &self.domain, move |c| {
                    let Some(d) = lookup(c, &domain)? else {
                        return Ok(DomainState::Stopped);
                    };
                    if !d.is_active()? {
                        return Ok(DomainState::Stopped);
                    }
                    let Some(id) = d.get_id() else {
                        return Ok(DomainState::Stopped);
                    };
                    let uuid = d.get_uuid_string()?;
                    let xml = d.get_xml_desc(0)?;
                    Ok(DomainState::Running {
                        generation: generation(&uuid, id),
                        xml,
                    })
                })
                .await
                .map_err(|e| self.err(e))
        }

        /// The agent's NICs in the live XML; empty when the domain does not run.
        async fn live_nics(&self) -> Result<HashSet<NicId>, BackendError> {
            match self.state().await? {
                DomainState::Stopped => Ok(HashSet::new()),
                DomainState::Running { xml, .. } => Ok(self.nics_of(&xml)?.into_iter().collect()),
            }
        }

        fn nics_of(&self, xml: &str) -> Result<Vec<NicId>, BackendError> {
            domxml::agent_nics(&self.domain, xml).map_err(|e| {
                self.err(LibvirtError {
                    op: "read the XML",
                    domain: self.domain.clone(),
                    uri: self.conn.uri.clone(),
                    message: e.to_string(),
                    kind: LibvirtErrorKind::Refused,
                })
            })
        }

        /// The agent's NICs in the persistent definition.
        async fn config_nics(&self) -> Result<HashSet<NicId>, BackendError> {
            let domain = self.domain.clone();
            let xml = self
                .conn
                .run(
                    "read the definition",
                    &self.domain,
                    move |c| match lookup(c, &domain)? {
                        Some(d) if d.is_persistent()? => {
                            d.get_xml_desc(sys::VIR_DOMAIN_XML_INACTIVE).map(Some)
                        }
                        _ => Ok(None),
                    },
                )
                .await
                .map_err(|e| self.err(e))?;
            match xml {
                Some(xml) => Ok(self.nics_of(&xml)?.into_iter().collect()),
                None => Ok(HashSet::new()),
            }
        }

        async fn device_call(
            &self,
            op: &'static str,
            xml: String,
            flags: u32,
            attach: bool,
        ) -> Result<(), BackendError> {
            let domain = self.domain.clone();
            self.conn
                .run(op, &self.domain, move |c| {
                    let d = Domain::lookup_by_name(c, &domain)?;
                    if attach {
                        d.attach_device_flags(&xml, flags)
                    } else {
                        d.detach_device_flags(&xml, flags)
                    }
                })
                .await
                .map(drop)
                .map_err(|e| self.err(e))
        }

        async fn plug_steps(&self, nic: &NicPlan) -> Result<(), BackendError> {
            let names = nic.id.names();
            if matches!(self.state().await?, DomainState::Stopped) {
                return Err(self.not_running("attach"));
            }
            let tap = self.links.open_tap(&names.host_if)?;
            self.links
                .join_bridge(&names.host_if, &nic.bridge, nic.mtu)
                .await
                .map_err(|e| BackendError::joining(&nic.bridge, e))?;
            // Only now, with the agent's alias on it, may the tap outlive us.
            self.links.persist_tap(tap, &names.host_if)?;
            let mut flags = sys::VIR_DOMAIN_AFFECT_LIVE;
            if self.persist_nics {
                flags |= sys::VIR_DOMAIN_AFFECT_CONFIG;
            }
            self.device_call("attach", domxml::interface_xml(nic), flags, true)
                .await
        }

        /// Waits until the live XML lacks NIC `id`: checked at libvirt's
        /// `device-removed` event for its alias (`events`, subscribed before the
        /// detach), and every [`UNPLUG_POLL`] in case an event is lost.
        async fn wait_removed(
            &self,
            id: &NicId,
            mut events: Option<tokio::sync::broadcast::Receiver<libvirt_events::DomainEvent>>,
        ) -> Result<bool, BackendError> {
            let deadline = tokio::time::Instant::now() + self.unplug_timeout;
            let alias = domxml::alias(id);
            loop {
                if !self.live_nics().await?.contains(id) {
                    return Ok(true);
                }
                if tokio::time::Instant::now() >= deadline {
                    return Ok(false);
                }
                let removed = async {
                    match events.as_mut() {
                        Some(rx) => loop {
                            match rx.recv().await {
                                Ok(libvirt_events::DomainEvent::DeviceRemoved {
                                    domain,
                                    alias: a,
                                }) if domain == self.domain && a == alias => return,
                                Ok(_) => {}
                                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
                                Err(_) => std::future::pending::<()>().await,
                            }
                        },
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = removed => {}
                    _ = tokio::time::sleep(UNPLUG_POLL) => {}
                }
            }
        }
    }

    #[async_trait::async_trait]
    impl VmBackend for LibvirtBackend {
        fn kind(&self) -> &'static str {
            "libvirt"
        }

        async fn plug(&self, nic: &NicPlan) -> Result<Plugged, BackendError> {
            if let Err(e) = self.plug_steps(nic).await {
                if let Err(undo) = self.unplug(&nic.id).await {
                    log::warn!("VM {}: rollback of NIC {} failed: {undo}", self.vm, nic.id);
                }
                return Err(e);
            }
            Ok(Plugged::default())
        }

        async fn unplug(&self, id: &NicId) -> Result<(), BackendError> {
            let names = id.names();
            if self.live_nics().await?.contains(id) {
                let events = libvirt_events::subscribe(self.conn.uri());
                match self
                    .device_call(
                        "detach",
                        domxml::detach_xml(id),
                        sys::VIR_DOMAIN_AFFECT_LIVE,
                        false,
                    )
                    .await
                {
                    Ok(()) => {}
                    // Gone meanwhile (the guest, or a domain that stopped): checked below.
                    Err(e) if e.is_unavailable() => {}
                    Err(BackendError::Libvirt { source, .. })
                        if source.kind == LibvirtErrorKind::Refused => {}
                    Err(e) => return Err(e),
                }
                if !self.wait_removed(id, events).await? {
                    return Err(BackendError::UnplugTimeout {
                        vm: self.vm.clone(),
                        device: domxml::alias(id),
                        after: self.unplug_timeout,
                    });
                }
            }
            if self.persist_nics && self.config_nics().await?.contains(id) {
                self.device_call(
                    "detach from the definition",
                    domxml::detach_xml(id),
                    sys::VIR_DOMAIN_AFFECT_CONFIG,
                    false,
                )
                .await?;
            }
            self.links.delete(&names.host_if).await?;
            Ok(())
        }

        /// A NIC is present when the running domain has its interface and the
        /// host has its tap ([`crate::backend::device_and_tap_presence`]); a
        /// domain that does not run has none.
        async fn presence(&self, ids: &[NicId]) -> HashMap<NicId, Presence> {
            let nics = self
                .live_nics()
                .await
                .map(|n| move |id: &NicId| n.contains(id));
            crate::backend::device_and_tap_presence(&self.vm, "the domain", ids, nics, &*self.links)
                .await
        }

        async fn orphans(&self, known: &[NicId]) -> Result<Vec<NicId>, BackendError> {
            let mut ids = self.live_nics().await?;
            if self.persist_nics {
                ids.extend(self.config_nics().await?);
            }
            let known: HashSet<&NicId> = known.iter().collect();
            let mut out: Vec<NicId> = ids.into_iter().filter(|id| !known.contains(id)).collect();
            out.sort();
            Ok(out)
        }

        fn events(&self) -> BackendEvents {
            match libvirt_events::subscribe(self.conn.uri()) {
                Some(rx) => BackendEvents::libvirt(rx, &self.domain),
                None => BackendEvents::none(),
            }
        }

        /// The domain's generation ([`generation`]) while it runs,
        /// [`STOPPED_GENERATION`] when it does not (or is not defined); an
        /// error only when libvirtd cannot be asked.
        async fn probe(&self) -> Result<u64, BackendError> {
            match self.state().await? {
                DomainState::Stopped => Ok(STOPPED_GENERATION),
                DomainState::Running { generation, .. } => Ok(generation),
            }
        }
    }
}

#[cfg(all(test, feature = "libvirt"))]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::*;
    use crate::{backend::VmBackend, lifecycle::Presence, links::HostLinks, names::NicId};

    #[test]
    fn generations_differ_by_uuid_and_id_and_never_look_stopped() {
        let u = "0b6a2f0e-3d55-4a6e-9a47-8e2ef0e1f001";
        assert_ne!(generation(u, 1), generation(u, 2));
        assert_ne!(
            generation(u, 1),
            generation("0b6a2f0e-3d55-4a6e-9a47-8e2ef0e1f002", 1)
        );
        assert_eq!(generation(u, 5), generation(u, 5));
        assert!(generation(u, 1) > STOPPED_GENERATION);
    }

    #[test]
    fn events_of_the_domain_map_to_backend_events() {
        use crate::backend::{libvirt_events::DomainEvent, BackendEvent};
        let d = |s: &str| s.to_string();
        let cases = [
            (
                DomainEvent::Reboot { domain: d("a") },
                Some(BackendEvent::GuestRestarted),
            ),
            (
                DomainEvent::Lifecycle {
                    domain: d("a"),
                    event: 5,
                },
                Some(BackendEvent::Changed),
            ),
            (
                DomainEvent::DeviceRemoved {
                    domain: d("a"),
                    alias: d("ua-nl-00000000a1"),
                },
                Some(BackendEvent::Changed),
            ),
            (
                DomainEvent::DeviceRemoved {
                    domain: d("a"),
                    alias: d("net0"),
                },
                None,
            ),
            (DomainEvent::Reboot { domain: d("b") }, None),
        ];
        for (ev, want) in cases {
            assert_eq!(event(&ev, "a"), want, "{ev:?}");
        }
    }

    #[tokio::test]
    async fn unreachable_libvirt_is_unavailable() {
        let links: Arc<dyn HostLinks> = Arc::new(crate::links::fake::FakeLinks::default());
        let b = LibvirtBackend::new(
            "vm1",
            "qemu+unix:///system?socket=/nonexistent/libvirt-sock",
            "dom1",
            false,
            links,
            Duration::from_millis(100),
        );
        let e = b.probe().await.unwrap_err();
        assert!(e.is_unavailable(), "{e}");
        assert!(e.to_string().contains("domain dom1"), "{e}");
        let id: NicId = "00000000a1".parse().unwrap();
        assert_eq!(
            b.presence(std::slice::from_ref(&id)).await[&id],
            Presence::Unknown
        );
    }
}
