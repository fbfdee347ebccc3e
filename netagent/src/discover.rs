//! Discovery: libvirt domains that carry the nestless metadata element
//! (see [`crate::backend::domxml`]) are registered when they run and
//! unregistered when they stop, through the [`Registry`] like any VM
//! registered at run time (`nestlessctl vm add`): the same checks, the same
//! store (`vms.json`, so a discovered VM's NICs are recovered after a
//! crash of the agent), the same serving.
//!
//! ```text
//! every libvirt_poll_ms (1 s):
//!   ListAllDomains(ACTIVE) ─▶ name, UUID, id of each running domain
//!   a (UUID, id) not seen before ─▶ its live XML ─▶ domxml::domain_spec
//!   running with metadata, not registered ─▶ Registry::register (discovered)
//!   registered as discovered, not running (or metadata gone) ─▶ Registry::unregister(force):
//!       its NICs released (taps deleted, leases freed), its socket removed
//!   libvirtd unreachable ─▶ nothing changes until it answers again
//! ```
//!
//! A lifecycle event of libvirt ([`crate::backend::libvirt_events`]) runs a
//! round at once; the poll is the fallback (events lost with a connection).
//! A domain that stops and starts again within one round keeps its
//! registration, and its NICs are released by its backend's generation (a
//! new domain id) at the next upkeep.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use tokio::task::JoinHandle;

use crate::{
    backend::{domxml, libvirt::Conn, libvirt_events::DomainEvent},
    config::VmSpec,
    registry::Registry,
};

/// One running domain, as listed.
#[derive(Debug, Clone)]
struct Running {
    name: String,
    uuid: String,
    id: u32,
    /// Its live XML, when its (UUID, id) was not seen before.
    xml: Option<String>,
}

/// What one domain start (a UUID and id) stands for.
#[derive(Debug, Clone)]
struct Seen {
    id: u32,
    spec: Option<VmSpec>,
    /// The last refusal logged for it (logged once).
    refused: Option<String>,
}

/// The discovery of one libvirt connection.
pub struct Discovery {
    registry: Arc<Registry>,
    conn: Conn,
    seen: HashMap<String, Seen>,
    unreachable: bool,
}

impl Discovery {
    /// Discovery on connection `uri` for `registry`.
    pub fn new(registry: Arc<Registry>, uri: &str) -> Discovery {
        Discovery {
            registry,
            conn: Conn::new(uri),
            seen: HashMap::new(),
            unreachable: false,
        }
    }

    async fn list(&self) -> Result<Vec<Running>, crate::backend::libvirt::LibvirtError> {
        let known: HashMap<String, u32> = self
            .seen
            .iter()
            .map(|(uuid, s)| (uuid.clone(), s.id))
            .collect();
        self.conn
            .run("list the running domains", "*", move |c| {
                let mut out = Vec::new();
                for d in c.list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)? {
                    // A domain that stops while it is listed is skipped.
                    let (Ok(name), Ok(uuid), Some(id)) =
                        (d.get_name(), d.get_uuid_string(), d.get_id())
                    else {
                        continue;
                    };
                    let xml = if known.get(&uuid) == Some(&id) {
                        None
                    } else {
                        match d.get_xml_desc(0) {
                            Ok(x) => Some(x),
                            Err(_) => continue,
                        }
                    };
                    out.push(Running {
                        name,
                        uuid,
                        id,
                        xml,
                    });
                }
                Ok(out)
            })
            .await
    }

    /// One round: the running domains against the discovered VMs.
    pub async fn round(&mut self) {
        let running = match self.list().await {
            Ok(r) => {
                if self.unreachable {
                    log::info!("libvirt {}: reachable again", self.conn.uri());
                    self.unreachable = false;
                }
                r
            }
            Err(e) => {
                if !self.unreachable {
                    log::warn!("discovery paused: {e}");
                    self.unreachable = true;
                }
                return;
            }
        };
        let live: HashSet<&str> = running.iter().map(|r| r.uuid.as_str()).collect();
        self.seen.retain(|uuid, _| live.contains(uuid.as_str()));
        for r in &running {
            let Some(xml) = &r.xml else { continue };
            let (spec, refused) = match domxml::domain_spec(&r.name, xml, self.conn.uri()) {
                Ok(spec) => (spec, None),
                Err(e) => {
                    log::warn!("libvirt {}: {e}; the domain is not served", self.conn.uri());
                    (None, Some(e.to_string()))
                }
            };
            self.seen.insert(
                r.uuid.clone(),
                Seen {
                    id: r.id,
                    spec,
                    refused,
                },
            );
        }
        let wanted: HashMap<String, (String, VmSpec)> = self
            .seen
            .iter()
            .filter_map(|(uuid, s)| Some((s.spec.clone()?.name, (uuid.clone(), s.spec.clone()?))))
            .collect();
        let config = self.registry.agent().config();
        let uri = self.conn.uri().to_string();
        let mine: Vec<VmSpec> = config
            .registered()
            .iter()
            .filter(|s| s.discovered && s.libvirt_uri.as_deref() == Some(uri.as_str()))
            .cloned()
            .collect();
        for old in &mine {
            let keep = wanted.get(&old.name).is_some_and(|(_, new)| new == old);
            if keep {
                continue;
            }
            match self.registry.unregister(&old.name, true).await {
                Ok(n) => log::info!(
                    "VM {}: domain {} stopped (or its metadata changed): unregistered, {n} NIC(s) released",
                    old.name,
                    old.domain.as_deref().unwrap_or("?")
                ),
                Err(e) => log::warn!("VM {}: cannot unregister: {e}", old.name),
            }
        }
        let registered: HashSet<String> = self
            .registry
            .agent()
            .config()
            .registered()
            .iter()
            .map(|s| s.name.clone())
            .collect();
        for (name, (uuid, spec)) in wanted {
            if registered.contains(&name) {
                continue;
            }
            match self.registry.register(spec.clone()).await {
                Ok(vm) => {
                    log::info!(
                        "VM {name}: domain {} runs with nestless metadata: registered (network {})",
                        spec.domain.as_deref().unwrap_or("?"),
                        vm.network
                    );
                    if let Some(s) = self.seen.get_mut(&uuid) {
                        s.refused = None;
                    }
                }
                Err(e) => {
                    let text = e.to_string();
                    let s = self.seen.get_mut(&uuid);
                    let first = s
                        .as_ref()
                        .is_none_or(|s| s.refused.as_deref() != Some(&text));
                    if first {
                        log::warn!(
                            "VM {name}: domain {} not served: {text}",
                            spec.domain.as_deref().unwrap_or("?")
                        );
                    }
                    if let Some(s) = s {
                        s.refused = Some(text);
                    }
                }
            }
        }
    }
}

/// Runs discovery on `uri` every `period` until aborted.
pub fn spawn(registry: Arc<Registry>, uri: &str, period: Duration) -> JoinHandle<()> {
    let mut d = Discovery::new(registry, uri);
    let mut events = crate::backend::libvirt_events::subscribe(uri);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // A domain that starts or stops is looked at now, not at the next tick.
            let lifecycle = async {
                match events.as_mut() {
                    Some(rx) => loop {
                        match rx.recv().await {
                            Ok(DomainEvent::Lifecycle { .. }) => return,
                            Ok(_) => {}
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
                            Err(_) => std::future::pending::<()>().await,
                        }
                    },
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tick.tick() => {}
                _ = lifecycle => {}
            }
            d.round().await;
        }
    })
}
