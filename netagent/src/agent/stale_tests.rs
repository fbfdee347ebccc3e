//! A restart under a changed configuration: the records of the state file
//! that no longer fit it are refused, or released on the operator's word,
//! and never served next to a new NIC with the same address.

// Compiled for tests only (also gated where `agent/mod.rs` declares it).
#![cfg(test)]

use std::{path::Path, sync::Arc};

use super::{
    rig::{backends, join, req},
    Agent,
};
use crate::{
    backend::fake::FakeQemu,
    config::Config,
    error::AgentError,
    hostlo,
    links::fake::FakeLinks,
    stale::StalePolicy,
    state::{records_in, sqlite::SqliteStore},
};

fn config(dir: &Path, network: &str) -> Config {
    Config::parse(
        Path::new("/etc/nestless/netagent.toml"),
        &format!(
            r#"
            [agent]
            state_dir = "{}"
            unplug_timeout_ms = 200
            [[network]]
            name = "{network}"
            bridge = "br0"
            subnet = "10.40.0.0/24"
            gateway = "10.40.0.1"
            [[vm]]
            name = "vm1"
            backend = "qemu"
            qmp_socket = "/q1"
            cid = 3
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

/// Network `blue` renamed `green` between two runs, with sandbox `old` on
/// 10.40.0.2 and a Hostlo part: the agent refuses to start, naming the state
/// file, the config file and the key; released, the old NICs are unplugged
/// and a new sandbox and a retried `old` each get a NIC of their own.
#[tokio::test]
async fn a_renamed_network_is_refused_or_released_never_served_twice() {
    let dir = tempfile::tempdir().unwrap();
    let links = Arc::new(FakeLinks::default());
    let q1 = Arc::new(FakeQemu::new(4));
    let q2 = Arc::new(FakeQemu::new(4));
    let fakes = [("vm1", q1.clone()), ("vm2", q2.clone())];
    let old = {
        let blue = Agent::with_backends(
            config(dir.path(), "blue"),
            links.clone(),
            backends(&links, &fakes),
        )
        .unwrap();
        let old = blue.attach("vm1", req("old")).await.unwrap().record;
        blue.hostlo_join("vm1", join("web", 0, "old"))
            .await
            .unwrap();
        old
    };
    assert_eq!(old.ipv4.to_string(), "10.40.0.2");
    let state = SqliteStore::path_in(dir.path());
    let before = records_in(dir.path()).unwrap();

    let e = match Agent::with_backends(
        config(dir.path(), "green"),
        links.clone(),
        backends(&links, &fakes),
    ) {
        Err(e) => e,
        Ok(_) => panic!("an agent started with records of a network it does not have"),
    };
    assert!(
        matches!(e, AgentError::Stale(ref s) if s.records.len() == 2),
        "{e}"
    );
    let text = e.to_string();
    for want in [
        &state.display().to_string(),
        "config /etc/nestless/netagent.toml",
        &format!(
            "NIC {} (VM vm1, sandbox \"old\", 10.40.0.2 on \"blue\")",
            old.id
        ),
        "Hostlo pod \"web\" part 0",
        "network \"blue\" is not in the config (key [[network]] name)",
        "--release-stale",
    ] {
        assert!(text.contains(want), "{text}\nlacks {want:?}");
    }
    assert_eq!(
        records_in(dir.path()).unwrap(),
        before,
        "a refusal changes nothing"
    );

    let green = Agent::build(
        config(dir.path(), "green"),
        links.clone(),
        backends(&links, &fakes),
        StalePolicy::Release,
    )
    .unwrap();
    let report = green.recover().await.unwrap();
    assert_eq!(report.released, 2, "{report:?}");
    assert!(
        q1.devices.lock().unwrap().is_empty(),
        "the old NICs are unplugged"
    );
    assert!(
        !links
            .links
            .lock()
            .unwrap()
            .iter()
            .any(|l| *l == old.id.names().host_if || *l == hostlo::segment_bridge("blue", "web")),
        "their tap and the segment are gone"
    );
    assert!(
        records_in(dir.path()).unwrap().is_empty(),
        "the state file forgot them"
    );

    let new = green.attach("vm2", req("new")).await.unwrap().record;
    let again = green.attach("vm1", req("old")).await.unwrap();
    assert!(again.created, "a new NIC for the retried sandbox");
    assert_ne!(new.ipv4, again.record.ipv4);
    assert_eq!(again.record.network, "green");
    let records = green.records(None);
    assert_eq!(records.len(), 2);
}
