//! Limits that requests and the config can reach together, each an error
//! of the request that meets it, never a hang or a panic of the agent.

use std::{path::Path, sync::Arc};

use super::{
    rig::{backends, req},
    Agent,
};
use crate::{backend::fake::FakeQemu, config::Config, error::AgentError, links::fake::FakeLinks};

/// `mac_prefix` of 5 bytes leaves 256 MACs: the 257th NIC is refused with
/// RESOURCE_EXHAUSTED, without a lease or a device left behind (the MAC
/// search used to loop for ever, holding the record store's lock).
#[tokio::test]
async fn a_full_mac_prefix_is_refused_not_searched_for_ever() {
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .unwrap();
    let cfg = Config::parse(
        Path::new("t.toml"),
        &format!(
            r#"
            [agent]
            state_dir = "{}"
            mac_prefix = "52:54:00:12:34"
            [[network]]
            name = "n"
            bridge = "br0"
            subnet = "10.9.0.0/16"
            gateway = "10.9.0.1"
            [[vm]]
            name = "vm1"
            backend = "qemu"
            qmp_socket = "/q1"
            cid = 3
            max_nics = 300
            "#,
            dir.path().display()
        ),
    )
    .unwrap();
    let links = Arc::new(FakeLinks::default());
    let q = Arc::new(FakeQemu::new(300));
    let agent =
        Agent::with_backends(cfg, links.clone(), backends(&links, &[("vm1", q.clone())])).unwrap();
    for i in 0..256 {
        agent.attach("vm1", req(&format!("sb{i}"))).await.unwrap();
    }
    let e = agent.attach("vm1", req("one-more")).await.unwrap_err();
    assert!(matches!(e, AgentError::NoFreeMac { .. }), "{e}");
    assert_eq!(e.code(), ttrpc::Code::RESOURCE_EXHAUSTED);
    assert!(e.to_string().contains("52:54:00:12:34"), "{e}");
    assert_eq!(agent.records.leased("n"), 256, "no lease taken for it");
    assert_eq!(q.devices.lock().unwrap().len(), 256);
}
