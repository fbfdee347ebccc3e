//! The test rig of the agent's unit tests: a two-VM configuration whose
//! backends are [`QemuBackend`]s over [`FakeQemu`], with [`FakeLinks`], and
//! builders of checked requests.

use std::{collections::HashMap, path::Path, sync::Arc, time::Duration};

use super::{Agent, AttachRequest, Attachment, HostloJoin, HostloPart, HostloPublish, HostloWatch};
use crate::{
    backend::{fake::FakeQemu, qemu::QemuBackend, VmBackend},
    config::Config,
    hostlo::{Part, PodName, Port, PortList},
    links::fake::FakeLinks,
    names::{IfName, SandboxId, Scope},
};

pub fn config(dir: &Path, range_end: &str) -> Config {
    Config::parse(
        Path::new("t.toml"),
        &format!(
            r#"
            [agent]
            state_dir = "{}"
            unplug_timeout_ms = 200
            [[network]]
            name = "n"
            bridge = "br0"
            subnet = "10.9.0.0/24"
            gateway = "10.9.0.1"
            range_end = "{range_end}"
            [[vm]]
            name = "vm1"
            backend = "qemu"
            qmp_socket = "/q1"
            cid = 3
            max_nics = 3
            [[vm]]
            name = "vm2"
            backend = "qemu"
            qmp_socket = "/q2"
            cid = 4
            "#,
            dir.display()
        ),
    )
    .unwrap()
}

pub struct Rig {
    pub agent: Agent,
    pub q1: Arc<FakeQemu>,
    pub q2: Arc<FakeQemu>,
    pub links: Arc<FakeLinks>,
}

pub fn rig(dir: &Path, range_end: &str) -> Rig {
    let links = Arc::new(FakeLinks::default());
    let q1 = Arc::new(FakeQemu::new(4));
    let q2 = Arc::new(FakeQemu::new(4));
    rig_with(dir, range_end, links, q1, q2)
}

/// QEMU backends over the fakes, by VM name.
pub fn backends(
    links: &Arc<FakeLinks>,
    qemus: &[(&str, Arc<FakeQemu>)],
) -> HashMap<String, Arc<dyn VmBackend>> {
    qemus
        .iter()
        .map(|(name, q)| {
            let b: Arc<dyn VmBackend> = Arc::new(QemuBackend::new(
                name,
                q.clone(),
                links.clone(),
                vec![],
                Duration::from_millis(200),
            ));
            (name.to_string(), b)
        })
        .collect()
}

pub fn rig_with(
    dir: &Path,
    range_end: &str,
    links: Arc<FakeLinks>,
    q1: Arc<FakeQemu>,
    q2: Arc<FakeQemu>,
) -> Rig {
    let cfg = config(dir, range_end);
    let b = backends(&links, &[("vm1", q1.clone()), ("vm2", q2.clone())]);
    Rig {
        agent: Agent::with_backends(cfg, links.clone(), b).unwrap(),
        q1,
        q2,
        links,
    }
}

pub fn sb(id: &str) -> SandboxId {
    SandboxId::parse(id).unwrap()
}

pub fn req(id: &str) -> AttachRequest {
    AttachRequest::for_sandbox(sb(id))
}

/// A request for sandbox `sandbox`'s `interface` in `scope`.
pub fn keyed(scope: &str, sandbox: &str, interface: &str) -> AttachRequest {
    AttachRequest {
        attachment: Attachment {
            scope: Scope::parse(scope).unwrap(),
            sandbox_id: sb(sandbox),
            interface: IfName::parse(interface).unwrap(),
        },
        ..req(sandbox)
    }
}

pub fn join(pod: &str, part: u32, sandbox: &str) -> HostloJoin {
    HostloJoin {
        pod: PodName::parse(pod).unwrap(),
        part: Part::parse(part).unwrap(),
        sandbox_id: sb(sandbox),
    }
}

pub fn part(pod: &str, part: u32) -> HostloPart {
    HostloPart {
        pod: PodName::parse(pod).unwrap(),
        part: Part::parse(part).unwrap(),
    }
}

pub fn publish(pod: &str, part: u32, ports: &[Port]) -> HostloPublish {
    HostloPublish {
        pod: PodName::parse(pod).unwrap(),
        part: Part::parse(part).unwrap(),
        ports: PortList::new(ports.to_vec()).unwrap(),
    }
}

pub fn watch(pod: &str, since: u64, timeout: Duration) -> HostloWatch {
    HostloWatch {
        pod: PodName::parse(pod).unwrap(),
        since,
        timeout,
    }
}

thread_local! {
    static ERRORS: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Keeps the ERROR records logged on the thread that logged them.
struct ErrorCapture;

impl log::Log for ErrorCapture {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Error
    }
    fn log(&self, r: &log::Record<'_>) {
        if r.level() == log::Level::Error {
            ERRORS.with(|e| e.borrow_mut().push(r.args().to_string()));
        }
    }
    fn flush(&self) {}
}

/// The errors this thread logged since the last call (the first call
/// installs the capture). A `#[tokio::test]` runs the agent on its own
/// thread, so tests running beside it do not mix in.
pub fn errors_logged() -> Vec<String> {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        if log::set_logger(&ErrorCapture).is_ok() {
            log::set_max_level(log::LevelFilter::Error);
        }
    });
    ERRORS.with(|e| std::mem::take(&mut *e.borrow_mut()))
}
