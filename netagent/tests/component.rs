//! Component test, without root or QEMU: the agent's own listeners and ttrpc
//! services ([`server::serve`]) on unix sockets, over an agent whose VMs are
//! [`QemuBackend`]s on [`FakeQemu`] with [`FakeLinks`], called by a plain
//! ttrpc client of `nestless-protos` as a shim would call it.
//!
//! ```text
//! NetAgentClient ──unix socket (vm1.sock)──▶ server (VmService: convert ─▶ Agent)
//!                                              ─▶ QemuBackend ─▶ FakeQemu (QMP) + FakeLinks
//! ```

use std::{collections::HashMap, path::Path, sync::Arc, time::Duration};

use nestless_netagent::{
    agent::Agent,
    backend::{fake::FakeQemu, qemu::QemuBackend, VmBackend},
    config::Config,
    links::fake::FakeLinks,
    server,
};
use nestless_protos::{agent as pb, agent_ttrpc::NetAgentClient};

fn config(dir: &Path) -> Config {
    let d = dir.display();
    Config::parse(
        &dir.join("netagent.toml"),
        &format!(
            r#"
            [agent]
            state_dir = "{d}/state"
            admin_socket = "{d}/admin.sock"
            listen_vsock = false
            unplug_timeout_ms = 500
            [[network]]
            name = "a"
            bridge = "bra"
            subnet = "10.9.0.0/24"
            gateway = "10.9.0.1"
            [[network]]
            name = "b"
            bridge = "brb"
            subnet = "10.10.0.0/24"
            gateway = "10.10.0.1"
            [[vm]]
            name = "vm1"
            backend = "qemu"
            qmp_socket = "/fake/vm1.qmp"
            socket = "{d}/vm1.sock"
            network = "a"
            max_nics = 2
            [[vm]]
            name = "vm2"
            backend = "qemu"
            qmp_socket = "/fake/vm2.qmp"
            socket = "{d}/vm2.sock"
            network = "a"
            "#
        ),
    )
    .expect("test config")
}

async fn client(socket: &Path) -> NetAgentClient {
    let c = ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display()))
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", socket.display()));
    NetAgentClient::new(c)
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(10).as_nanos() as i64)
}

fn attach(sandbox_id: &str) -> pb::AttachNicRequest {
    pb::AttachNicRequest {
        sandbox_id: sandbox_id.into(),
        ..Default::default()
    }
}

/// The status code and message of a failed call.
fn status(e: ttrpc::Error) -> (ttrpc::Code, String) {
    match e {
        ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
        other => panic!("expected a status, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_service_over_unix_sockets_with_fake_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let links = Arc::new(FakeLinks::default());
    let q1 = Arc::new(FakeQemu::new(4));
    // vm2's machine has a single hot-plug port.
    let q2 = Arc::new(FakeQemu::new(1));
    let mut backends: HashMap<String, Arc<dyn VmBackend>> = HashMap::new();
    for (name, q) in [("vm1", &q1), ("vm2", &q2)] {
        backends.insert(
            name.into(),
            Arc::new(QemuBackend::new(
                name,
                q.clone(),
                links.clone(),
                vec![],
                Duration::from_millis(500),
            )),
        );
    }
    let agent =
        Arc::new(Agent::with_backends(config(dir.path()), links.clone(), backends).unwrap());
    let registry = Arc::new(nestless_netagent::registry::Registry::new(
        agent.clone(),
        Arc::new(server::VmListeners::new(agent.clone())),
        Duration::from_secs(2),
    ));
    let running = server::serve(registry).await.expect("serve");
    let vm1 = client(&dir.path().join("vm1.sock")).await;
    let vm2 = client(&dir.path().join("vm2.sock")).await;

    // The caller is the socket's VM.
    let h = vm1
        .health(ctx(), &pb::HealthRequest::default())
        .await
        .unwrap();
    assert_eq!((h.vm.as_str(), h.nic_quota), ("vm1", 2));

    // Attach: a hot-plugged NIC on the VM's network.
    let a = vm1.attach_nic(ctx(), &attach("sb-a")).await.unwrap();
    assert!(a.created);
    let nic = a.nic.as_ref().unwrap();
    assert_eq!(nic.network, "a");
    assert_eq!(nic.addresses[0].gateway, "10.9.0.1");
    assert!(
        q1.devices
            .lock()
            .unwrap()
            .contains_key(&format!("nl-{}", nic.id)),
        "no device for NIC {}",
        nic.id
    );
    assert!(links
        .links
        .lock()
        .unwrap()
        .contains(&format!("nlh{}", nic.id)));

    // A retry (lost reply) is the same NIC, not a second one.
    let again = vm1.attach_nic(ctx(), &attach("sb-a")).await.unwrap();
    assert!(!again.created);
    assert_eq!(again.nic.id, nic.id);
    assert_eq!(again.nic.addresses, nic.addresses);
    assert_eq!(q1.devices.lock().unwrap().len(), 1);
    let listed = vm1
        .list_nics(ctx(), &pb::ListNicsRequest::default())
        .await
        .unwrap();
    assert_eq!(
        listed
            .nics
            .iter()
            .map(|n| n.id.as_str())
            .collect::<Vec<_>>(),
        [nic.id.as_str()]
    );

    // Refusals carry their codes, and change nothing.
    let bad_sandbox = vm1.attach_nic(ctx(), &attach("../x")).await.unwrap_err();
    let (code, msg) = status(bad_sandbox);
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("sandbox_id"), "{msg}");
    let both = pb::DetachNicRequest {
        nic_id: nic.id.clone(),
        sandbox_id: "sb-a".into(),
        ..Default::default()
    };
    let (code, msg) = status(vm1.detach_nic(ctx(), &both).await.unwrap_err());
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    let foreign = pb::AttachNicRequest {
        network: "b".into(),
        ..attach("sb-b")
    };
    let (code, msg) = status(vm1.attach_nic(ctx(), &foreign).await.unwrap_err());
    assert_eq!(code, ttrpc::Code::PERMISSION_DENIED, "{msg}");
    assert!(msg.contains("may not use network"), "{msg}");
    // Another VM cannot see or take vm1's NIC.
    let theirs = pb::DetachNicRequest {
        nic_id: nic.id.clone(),
        ..Default::default()
    };
    let (code, msg) = status(vm2.detach_nic(ctx(), &theirs).await.unwrap_err());
    assert_eq!(code, ttrpc::Code::NOT_FOUND, "{msg}");
    assert!(vm2
        .list_nics(ctx(), &pb::ListNicsRequest::default())
        .await
        .unwrap()
        .nics
        .is_empty());
    assert_eq!(q1.devices.lock().unwrap().len(), 1);
    // Quota (2 NICs for vm1), and no free hot-plug slot (vm2 has one port).
    vm1.attach_nic(ctx(), &attach("sb-b")).await.unwrap();
    let (code, msg) = status(vm1.attach_nic(ctx(), &attach("sb-c")).await.unwrap_err());
    assert_eq!(code, ttrpc::Code::RESOURCE_EXHAUSTED, "{msg}");
    assert!(msg.contains("quota"), "{msg}");
    vm2.attach_nic(ctx(), &attach("sb-x")).await.unwrap();
    let (code, msg) = status(vm2.attach_nic(ctx(), &attach("sb-y")).await.unwrap_err());
    assert_eq!(code, ttrpc::Code::RESOURCE_EXHAUSTED, "{msg}");
    assert!(msg.contains("no free hot-plug slot"), "{msg}");
    assert_eq!(
        agent.records(Some("vm2")).len(),
        1,
        "the failed attach left a record"
    );

    // Detach by sandbox, then by id: the device, netdev, fd and tap are gone.
    let by_sandbox = pb::DetachNicRequest {
        sandbox_id: "sb-a".into(),
        ..Default::default()
    };
    vm1.detach_nic(ctx(), &by_sandbox).await.unwrap();
    let (code, msg) = status(vm1.detach_nic(ctx(), &by_sandbox).await.unwrap_err());
    assert_eq!(code, ttrpc::Code::NOT_FOUND, "{msg}");
    let b_id = agent.records(Some("vm1"))[0].id.to_string();
    vm1.detach_nic(
        ctx(),
        &pb::DetachNicRequest {
            nic_id: b_id,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(vm1
        .list_nics(ctx(), &pb::ListNicsRequest::default())
        .await
        .unwrap()
        .nics
        .is_empty());
    assert!(q1.devices.lock().unwrap().is_empty());
    assert!(q1.netdevs.lock().unwrap().is_empty());
    assert!(q1.fds.lock().unwrap().is_empty());
    assert!(!links.links.lock().unwrap().iter().any(
        |l| l.starts_with("nlh") && !l.contains(&agent.records(Some("vm2"))[0].id.to_string())
    ));
    // The state file holds exactly what is left.
    let mut stored = nestless_netagent::state::records_in(&dir.path().join("state")).unwrap();
    stored.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(
        stored,
        agent.records(None),
        "state store and records differ"
    );
    running.stop_accepting();
}
