//! libvirt's domain events, delivered to the agent's tasks.
//!
//! The `virt` crate (0.4) wraps libvirt's default event loop but not the domain event
//! callbacks; they are registered here through its raw bindings (`virt::sys`):
//!
//! ```text
//! thread "libvirt-events"          (one per process)  virEventRunDefaultImpl, forever
//! thread "libvirt-events <uri>"    (one per URI)      open; RegisterAny(LIFECYCLE, REBOOT,
//!                                                     DEVICE_REMOVED); keepalive; every 1 s
//!                                                     is the connection alive? else reopen
//! callbacks (on the event loop's thread) ─▶ broadcast::Sender<DomainEvent> ─▶ subscribers:
//!     each libvirt backend (its domain's events ─▶ BackendEvent), discovery (a round now)
//! ```
//!
//! Events only hasten what the polls do anyway (the upkeep's generation check, discovery's
//! list), except a reboot inside one QEMU process, which only the `REBOOT` event shows. A
//! lost connection loses the events in between; the polls cover them.

use std::{
    collections::HashMap,
    ffi::{c_char, c_int, c_void, CStr},
    sync::{Mutex, OnceLock},
    time::Duration,
};

use tokio::sync::broadcast;
use virt::{connect::Connect, sys};

/// What libvirt reported about a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainEvent {
    /// A lifecycle change (`virDomainEventType`: started 2, stopped 5, ...).
    Lifecycle {
        /// The domain's name.
        domain: String,
        /// libvirt's event type.
        event: i32,
    },
    /// The guest reset, the QEMU process staying (a reboot in place).
    Reboot {
        /// The domain's name.
        domain: String,
    },
    /// A device left the domain (the guest released it).
    DeviceRemoved {
        /// The domain's name.
        domain: String,
        /// The device's alias.
        alias: String,
    },
}

impl DomainEvent {
    /// The domain it is about.
    pub fn domain(&self) -> &str {
        match self {
            DomainEvent::Lifecycle { domain, .. }
            | DomainEvent::Reboot { domain }
            | DomainEvent::DeviceRemoved { domain, .. } => domain,
        }
    }
}

/// How often the per-URI thread checks its connection.
const CHECK: Duration = Duration::from_secs(1);

fn event_loop() -> Result<(), String> {
    static LOOP: OnceLock<Result<(), String>> = OnceLock::new();
    LOOP.get_or_init(|| {
        // libvirt prints every error on stderr unless told otherwise.
        virt::error::clear_error_callback();
        virt::event::event_register_default_impl().map_err(|e| e.message().to_string())?;
        std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| loop {
                if let Err(e) = virt::event::event_run_default_impl() {
                    log::warn!("libvirt event loop: {}", e.message());
                    std::thread::sleep(CHECK);
                }
            })
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .clone()
}

/// The events of connection `uri`: a receiver, or `None` when libvirt's event loop
/// cannot run (logged; the polls do the work then).
pub fn subscribe(uri: &str) -> Option<broadcast::Receiver<DomainEvent>> {
    static SOURCES: OnceLock<Mutex<HashMap<String, broadcast::Sender<DomainEvent>>>> =
        OnceLock::new();
    let mut sources = SOURCES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(tx) = sources.get(uri) {
        return Some(tx.subscribe());
    }
    if let Err(e) = event_loop() {
        log::warn!("libvirt events unavailable ({e}): domains are polled only");
        return None;
    }
    let (tx, rx) = broadcast::channel(256);
    let thread_tx = tx.clone();
    let thread_uri = uri.to_string();
    let spawned = std::thread::Builder::new()
        .name(format!("libvirt-events {uri}"))
        .spawn(move || watch(&thread_uri, thread_tx));
    if let Err(e) = spawned {
        log::warn!("libvirt events of {uri} unavailable ({e}): domains are polled only");
        return None;
    }
    sources.insert(uri.to_string(), tx);
    Some(rx)
}

/// Keeps a connection with the three callbacks registered, reopening it when it dies.
fn watch(uri: &str, tx: broadcast::Sender<DomainEvent>) {
    let mut failing = false;
    loop {
        match register(uri, &tx) {
            Ok((mut conn, ids)) => {
                if failing {
                    log::info!("libvirt events of {uri}: connected again");
                    failing = false;
                }
                while conn.is_alive().unwrap_or(false) {
                    std::thread::sleep(CHECK);
                }
                for id in ids {
                    // SAFETY: `id` was returned by virConnectDomainEventRegisterAny on `conn`,
                    // which is still open.
                    unsafe { sys::virConnectDomainEventDeregisterAny(conn.as_ptr(), id) };
                }
                let _ = conn.close();
            }
            Err(e) => {
                if !failing {
                    log::warn!("libvirt events of {uri}: {e}; retrying every {CHECK:?}");
                    failing = true;
                }
            }
        }
        std::thread::sleep(CHECK);
    }
}

type Callback = unsafe extern "C" fn();

fn register(
    uri: &str,
    tx: &broadcast::Sender<DomainEvent>,
) -> Result<(Connect, Vec<c_int>), String> {
    let mut conn = Connect::open(Some(uri)).map_err(|e| e.message().to_string())?;
    // SAFETY: conn is open; keepalive needs the event loop, which runs.
    unsafe { sys::virConnectSetKeepAlive(conn.as_ptr(), 5, 3) };
    // SAFETY (the transmutes): libvirt calls each callback with the signature of its event
    // id, and the generic type is only how the C API takes them all.
    let callbacks: [(c_int, Callback); 3] = unsafe {
        [
            (
                sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
                std::mem::transmute::<
                    unsafe extern "C" fn(
                        sys::virConnectPtr,
                        sys::virDomainPtr,
                        c_int,
                        c_int,
                        *mut c_void,
                    ) -> c_int,
                    Callback,
                >(on_lifecycle),
            ),
            (
                sys::VIR_DOMAIN_EVENT_ID_REBOOT as c_int,
                std::mem::transmute::<
                    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
                    Callback,
                >(on_reboot),
            ),
            (
                sys::VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED as c_int,
                std::mem::transmute::<
                    unsafe extern "C" fn(
                        sys::virConnectPtr,
                        sys::virDomainPtr,
                        *const c_char,
                        *mut c_void,
                    ),
                    Callback,
                >(on_device_removed),
            ),
        ]
    };
    let mut ids = Vec::new();
    for (event, cb) in callbacks {
        let opaque = Box::into_raw(Box::new(tx.clone())) as *mut c_void;
        // SAFETY: conn is open; `cb` has the signature of `event` (above); libvirt owns
        // `opaque` from now on and hands it to `free_sender` exactly once (also when the
        // registration fails).
        let id = unsafe {
            sys::virConnectDomainEventRegisterAny(
                conn.as_ptr(),
                std::ptr::null_mut(),
                event,
                std::mem::transmute::<Option<Callback>, sys::virConnectDomainEventGenericCallback>(
                    Some(cb),
                ),
                opaque,
                Some(free_sender),
            )
        };
        if id < 0 {
            let e = virt::error::Error::last_error();
            for id in ids {
                // SAFETY: registered on this open connection above.
                unsafe { sys::virConnectDomainEventDeregisterAny(conn.as_ptr(), id) };
            }
            let _ = conn.close();
            return Err(format!(
                "cannot register for domain events: {}",
                e.message()
            ));
        }
        ids.push(id);
    }
    Ok((conn, ids))
}

/// The sender behind an `opaque` pointer of [`register`].
///
/// # Safety
/// `opaque` must be a pointer [`register`] made and [`free_sender`] has not freed.
unsafe fn sender<'a>(opaque: *mut c_void) -> &'a broadcast::Sender<DomainEvent> {
    &*(opaque as *const broadcast::Sender<DomainEvent>)
}

/// # Safety
/// `dom` is a domain libvirt passes to a callback.
unsafe fn name_of(dom: sys::virDomainPtr) -> Option<String> {
    let p = sys::virDomainGetName(dom);
    (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
}

unsafe extern "C" fn on_lifecycle(
    _: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    _detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    if let Some(domain) = name_of(dom) {
        // No receiver is fine.
        let _ = sender(opaque).send(DomainEvent::Lifecycle { domain, event });
    }
    0
}

unsafe extern "C" fn on_reboot(_: sys::virConnectPtr, dom: sys::virDomainPtr, opaque: *mut c_void) {
    if let Some(domain) = name_of(dom) {
        let _ = sender(opaque).send(DomainEvent::Reboot { domain });
    }
}

unsafe extern "C" fn on_device_removed(
    _: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    alias: *const c_char,
    opaque: *mut c_void,
) {
    if let (Some(domain), false) = (name_of(dom), alias.is_null()) {
        let alias = CStr::from_ptr(alias).to_string_lossy().into_owned();
        let _ = sender(opaque).send(DomainEvent::DeviceRemoved { domain, alias });
    }
}

unsafe extern "C" fn free_sender(opaque: *mut c_void) {
    if !opaque.is_null() {
        drop(Box::from_raw(opaque as *mut broadcast::Sender<DomainEvent>));
    }
}
