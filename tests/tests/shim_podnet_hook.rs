//! The pod network hook of the task service, with real runc and a fake
//! `PodNetwork` (no containerd): `setup` runs at Start, before `runc start`, with
//! the container's own netns; a failing `setup` fails the Start, tears the network
//! down and kills the init (Stopped, one TaskExit), after which Delete leaves
//! nothing; `teardown` runs on Delete and a failing `teardown` does not stop the
//! deletion, and app containers of a pod get no network. Run as root; nothing skips.
//!
//! One test function: the service's reaper waits for any child of this
//! process, so two services must not run side by side in one test binary.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim_protos::{
    api::{CreateTaskRequest, DeleteRequest, KillRequest, StartRequest, StateRequest, WaitRequest},
    protobuf::{well_known_types::any::Any, CodedOutputStream},
    shim_async::Task,
    ttrpc::{asynchronous::TtrpcContext, Code},
};
use nestless_shim::{
    agent_client::ClientError,
    config::ShimConfig,
    events::RecordedEvents,
    podnet::{PodNetError, PodNetInfo, PodNetRequest, PodNetwork, SandboxRef},
    reaper::Reaper,
    task::{NetworkFactory, TaskService},
};
use nestless_tests::containerd::{random_name, require_tool};

/// What the fake saw, and how it should behave.
#[derive(Default)]
struct FakeState {
    fail_setup: bool,
    fail_teardown: bool,
    /// (scope/sandbox id, netns, whether the netns existed and differed from ours at setup)
    setups: Vec<(String, PathBuf, bool)>,
    teardowns: Vec<String>,
}

#[derive(Clone, Default)]
struct FakeNet(Arc<Mutex<FakeState>>);

#[async_trait]
impl PodNetwork for FakeNet {
    async fn setup(&self, req: &PodNetRequest) -> Result<PodNetInfo, PodNetError> {
        let own = std::fs::metadata(&req.netns)
            .ok()
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        let ours = std::fs::metadata("/proc/self/ns/net")
            .ok()
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        let fresh = own.is_some() && own != ours;
        let mut s = self.0.lock().unwrap();
        s.setups
            .push((req.sandbox.to_string(), req.netns.clone(), fresh));
        if s.fail_setup {
            return Err(PodNetError::Client(ClientError::AgentUnavailable {
                address: "vsock://2:7070".into(),
                reason: "injected failure".into(),
            }));
        }
        Ok(PodNetInfo {
            interface: "eth0".into(),
            mac: "02:00:00:00:00:01".into(),
            addresses: vec!["10.88.0.2/16".into()],
        })
    }

    async fn teardown(&self, sandbox: &SandboxRef) -> Result<(), PodNetError> {
        let mut s = self.0.lock().unwrap();
        s.teardowns.push(sandbox.to_string());
        if s.fail_teardown {
            return Err(PodNetError::Client(ClientError::AgentUnavailable {
                address: "vsock://2:7070".into(),
                reason: "injected failure".into(),
            }));
        }
        Ok(())
    }
}

fn ctx() -> TtrpcContext {
    TtrpcContext {
        mh: Default::default(),
        metadata: HashMap::new(),
        timeout_nano: 0,
    }
}

/// A bundle with a busybox rootfs and a `runc spec` config running `args`.
fn bundle(dir: &Path, id: &str, args: &[&str], annotations: &[(&str, &str)]) -> PathBuf {
    let b = dir.join(id);
    let bin = b.join("rootfs/bin");
    std::fs::create_dir_all(&bin).unwrap();
    let busybox = require_tool("busybox", "busybox-static");
    std::fs::copy(&busybox, bin.join("busybox")).unwrap();
    for applet in ["sh", "sleep", "true"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    let out = std::process::Command::new("runc")
        .args(["spec", "--bundle"])
        .arg(&b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "runc spec: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = b.join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    spec["process"]["terminal"] = false.into();
    spec["process"]["args"] = serde_json::json!(args);
    spec["root"]["readonly"] = false.into();
    let ann: serde_json::Map<String, serde_json::Value> = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .collect();
    spec["annotations"] = ann.into();
    std::fs::write(&path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    b
}

fn runtime_options(config: &Path) -> Any {
    let mut value = Vec::new();
    {
        let mut out = CodedOutputStream::vec(&mut value);
        out.write_string(2, &config.to_string_lossy()).unwrap();
        out.flush().unwrap();
    }
    Any {
        type_url: "runtimeoptions.v1.Options".into(),
        value,
        ..Default::default()
    }
}

fn create_req(id: &str, bundle: &Path, config: &Path) -> CreateTaskRequest {
    CreateTaskRequest {
        id: id.into(),
        bundle: bundle.to_string_lossy().into(),
        options: Some(runtime_options(config)).into(),
        ..Default::default()
    }
}

fn runc_containers(root: &Path) -> Vec<String> {
    std::fs::read_dir(root)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn pod_network_hook() {
    require_tool("runc", "runc");
    let dir = tempfile::Builder::new()
        .prefix("nl-hook-")
        .tempdir_in("/tmp")
        .unwrap();
    let ns = random_name("nl");
    let runc_root = dir.path().join("runc");
    let config = dir.path().join("shim.toml");
    std::fs::write(
        &config,
        format!(
            "[network]\nmode = \"agent\"\n[runc]\nroot = \"{}\"\n",
            runc_root.display()
        ),
    )
    .unwrap();
    let ns_root = runc_root.join(&ns);

    // Container processes are reparented to the shim: to this process here.
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes plain integers.
    assert_eq!(
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) },
        0
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let net = FakeNet::default();
        let events = Arc::new(RecordedEvents::default());
        let factory_net = net.clone();
        let factory: NetworkFactory = Arc::new(move |c: &ShimConfig| -> Arc<dyn PodNetwork> {
            assert_eq!(c.runc.root, runc_root);
            Arc::new(factory_net.clone())
        });
        let svc = TaskService::with_network(
            ns.clone(),
            events.clone(),
            Reaper::start().unwrap(),
            Arc::new(ExitSignal::default()),
            factory,
        );

        // 1. A container with a netns of its own: setup at start, teardown on delete.
        let b = bundle(dir.path(), "owner", &["sleep", "1000"], &[]);
        let created = svc.create(&ctx(), create_req("owner", &b, &config)).await.unwrap();
        assert!(net.0.lock().unwrap().setups.is_empty(), "setup before the start");
        assert_eq!(events.topics(), vec!["/tasks/create"]);
        svc.start(&ctx(), StartRequest { id: "owner".into(), ..Default::default() }).await.unwrap();
        {
            let s = net.0.lock().unwrap();
            assert_eq!(s.setups.len(), 1);
            let (sandbox, netns, fresh) = &s.setups[0];
            // Outside CRI, the container id in its containerd namespace.
            assert_eq!(sandbox, &format!("{ns}/owner"));
            assert_eq!(netns, &PathBuf::from(format!("/proc/{}/ns/net", created.pid)));
            assert!(fresh, "setup ran before the container's own netns existed");
        }
        svc.kill(&ctx(), KillRequest { id: "owner".into(), signal: 9, ..Default::default() })
            .await
            .unwrap();
        let w = svc.wait(&ctx(), WaitRequest { id: "owner".into(), ..Default::default() }).await.unwrap();
        assert_eq!(w.exit_status, 137);
        svc.delete(&ctx(), DeleteRequest { id: "owner".into(), ..Default::default() }).await.unwrap();
        assert_eq!(net.0.lock().unwrap().teardowns, vec![format!("{ns}/owner")]);
        assert!(runc_containers(&ns_root).is_empty());
        assert_eq!(
            events.topics(),
            vec!["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
        );

        // 2. setup fails: Start fails clearly, the task is Stopped (killed, never run), and
        //    Delete leaves nothing (a failed setup gives back what it made itself: no
        //    teardown).
        net.0.lock().unwrap().fail_setup = true;
        let b = bundle(dir.path(), "failing", &["sleep", "1000"], &[]);
        svc.create(&ctx(), create_req("failing", &b, &config)).await.unwrap();
        let e = svc.start(&ctx(), StartRequest { id: "failing".into(), ..Default::default() }).await.unwrap_err();
        let msg = format!("{e:?}");
        assert!(msg.contains("UNAVAILABLE") && msg.contains("failing") && msg.contains("injected failure"), "{msg}");
        assert_eq!(net.0.lock().unwrap().teardowns, vec![format!("{ns}/owner")]);
        let st = svc.state(&ctx(), StateRequest { id: "failing".into(), ..Default::default() }).await.unwrap();
        assert_eq!(st.status(), containerd_shim_protos::types::task::Status::STOPPED);
        assert_eq!(st.exit_status, 137);
        let d = svc.delete(&ctx(), DeleteRequest { id: "failing".into(), ..Default::default() }).await.unwrap();
        assert_eq!(d.exit_status, 137);
        assert!(runc_containers(&ns_root).is_empty(), "runc container left: {:?}", runc_containers(&ns_root));
        let e = svc.state(&ctx(), StateRequest { id: "failing".into(), ..Default::default() }).await.unwrap_err();
        assert!(matches!(e, containerd_shim_protos::ttrpc::Error::RpcStatus(ref s) if s.code() == Code::NOT_FOUND), "{e:?}");
        assert_eq!(
            events.topics().iter().skip(4).map(String::as_str).collect::<Vec<_>>(),
            vec!["/tasks/create", "/tasks/exit", "/tasks/delete"],
            "one exit event for the killed init"
        );
        net.0.lock().unwrap().fail_setup = false;

        // 3. teardown fails: Delete still completes.
        net.0.lock().unwrap().fail_teardown = true;
        let b = bundle(dir.path(), "stubborn", &["true"], &[]);
        svc.create(&ctx(), create_req("stubborn", &b, &config)).await.unwrap();
        svc.start(&ctx(), StartRequest { id: "stubborn".into(), ..Default::default() }).await.unwrap();
        let w = svc.wait(&ctx(), WaitRequest { id: "stubborn".into(), ..Default::default() }).await.unwrap();
        assert_eq!(w.exit_status, 0);
        svc.delete(&ctx(), DeleteRequest { id: "stubborn".into(), ..Default::default() }).await.unwrap();
        assert_eq!(net.0.lock().unwrap().teardowns.last().unwrap(), &format!("{ns}/stubborn"));
        assert!(runc_containers(&ns_root).is_empty());
        net.0.lock().unwrap().fail_teardown = false;

        // 4. An app container of a CRI pod gets no network; a CRI sandbox does, under its
        //    sandbox id in the empty scope (where CNI attached it).
        let setups_before = net.0.lock().unwrap().setups.len();
        let b = bundle(
            dir.path(),
            "app",
            &["true"],
            &[("io.kubernetes.cri.container-type", "container"), ("io.kubernetes.cri.sandbox-id", "pod1")],
        );
        svc.create(&ctx(), create_req("app", &b, &config)).await.unwrap();
        assert_eq!(net.0.lock().unwrap().setups.len(), setups_before);
        svc.delete(&ctx(), DeleteRequest { id: "app".into(), ..Default::default() }).await.unwrap();
        let b = bundle(
            dir.path(),
            "sandbox",
            &["sleep", "1000"],
            &[("io.kubernetes.cri.container-type", "sandbox"), ("io.kubernetes.cri.sandbox-id", "pod1")],
        );
        svc.create(&ctx(), create_req("sandbox", &b, &config)).await.unwrap();
        svc.start(&ctx(), StartRequest { id: "sandbox".into(), ..Default::default() }).await.unwrap();
        assert_eq!(net.0.lock().unwrap().setups.last().unwrap().0, "pod1");
        svc.kill(&ctx(), KillRequest { id: "sandbox".into(), signal: 9, ..Default::default() })
            .await
            .unwrap();
        svc.wait(&ctx(), WaitRequest { id: "sandbox".into(), ..Default::default() }).await.unwrap();
        svc.delete(&ctx(), DeleteRequest { id: "sandbox".into(), ..Default::default() }).await.unwrap();
        assert_eq!(net.0.lock().unwrap().teardowns.last().unwrap(), "pod1");
        assert!(runc_containers(&ns_root).is_empty());
    });
}
