//! The task service with fakes in its seams (runc, rootfs, pod network):
//! the create rollback step by step, and the state table as the Task API
//! applies it. No root, no runc, no containerd.
//!
//! Every fake writes what it is asked into one shared log, so a test sees
//! the side effects of a call, and their undoing, in the order they happened.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use containerd_shim::{api, asynchronous::ExitSignal};
use containerd_shim_protos::{
    protobuf::{well_known_types::any::Any, CodedOutputStream},
    shim_async::Task,
    ttrpc::{self, r#async::TtrpcContext, Code},
    types::mount::Mount,
};
use nix::unistd::Pid;

use super::{rootfs::Rootfs, Seams, TaskService};
use crate::{
    agent_client::ClientError,
    bundle::RECORD_FILE,
    error::{Result, ShimError},
    events::{EventSink, RecordedEvents},
    options::RUNTIME_OPTIONS_TYPE,
    podnet::{PodNetError, PodNetInfo, PodNetRequest, PodNetwork, SandboxRef},
    reaper::Reaper,
    runc::{CreateOpts, ExecOpts, Runtime},
    stdio::ChildStdio,
};

/// A pid no process has (above any `pid_max`), so that signals reach nobody.
const INIT_PID: u32 = 2_000_000_000;
const EXEC_PID: u32 = 2_000_000_001;

/// The shared log of side effects, and the failures to inject.
#[derive(Clone, Default)]
struct World {
    log: Arc<Mutex<Vec<String>>>,
    fail: Arc<Mutex<HashSet<&'static str>>>,
    /// The init process's stdout, kept for the test to write to (the
    /// fake runc has no process).
    stdout: Arc<Mutex<Option<std::os::fd::OwnedFd>>>,
}

impl World {
    fn note(&self, what: impl Into<String>) {
        self.log.lock().unwrap().push(what.into());
    }

    fn failing(&self, step: &'static str) -> bool {
        self.fail.lock().unwrap().contains(step)
    }

    fn fail(&self, step: &'static str) {
        self.fail.lock().unwrap().insert(step);
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    fn injected(&self, command: &'static str, id: &str) -> ShimError {
        ShimError::Runc {
            command,
            id: id.to_owned(),
            message: "injected failure".into(),
            not_found: false,
        }
    }
}

struct FakeRunc(World);

#[async_trait]
impl Runtime for FakeRunc {
    async fn create(&self, id: &str, opts: &CreateOpts<'_>, mut stdio: ChildStdio) -> Result<()> {
        self.0.note("runc create");
        *self.0.stdout.lock().unwrap() = stdio.stdout.take();
        if self.0.failing("runc create") {
            return Err(self.0.injected("create", id));
        }
        if !self.0.failing("pid file") {
            std::fs::write(opts.pid_file, INIT_PID.to_string()).unwrap();
        }
        Ok(())
    }

    async fn exec(&self, _id: &str, opts: &ExecOpts<'_>, _stdio: ChildStdio) -> Result<()> {
        self.0.note("runc exec");
        std::fs::write(opts.pid_file, EXEC_PID.to_string()).unwrap();
        Ok(())
    }

    async fn start(&self, _id: &str) -> Result<()> {
        self.0.note("runc start");
        Ok(())
    }

    async fn kill(&self, _id: &str, signal: u32, _all: bool) -> Result<()> {
        self.0.note(format!("runc kill {signal}"));
        Ok(())
    }

    async fn delete(&self, _id: &str, force: bool) -> Result<()> {
        self.0.note(if force {
            "runc delete --force"
        } else {
            "runc delete"
        });
        Ok(())
    }

    async fn pause(&self, _id: &str) -> Result<()> {
        self.0.note("runc pause");
        Ok(())
    }

    async fn resume(&self, _id: &str) -> Result<()> {
        self.0.note("runc resume");
        Ok(())
    }

    async fn ps(&self, _id: &str) -> Result<Vec<u32>> {
        self.0.note("runc ps");
        Ok(vec![INIT_PID, EXEC_PID])
    }

    async fn update(&self, _id: &str, _resources: &Path) -> Result<()> {
        self.0.note("runc update");
        Ok(())
    }
}

struct FakeRootfs(World);

#[async_trait]
impl Rootfs for FakeRootfs {
    async fn mount(&self, _bundle: &Path, mounts: &[Mount]) -> Result<bool> {
        if mounts.is_empty() {
            return Ok(false);
        }
        self.0.note("mount");
        if self.0.failing("mount") {
            return Err(ShimError::io(
                "injected mount failure",
                std::io::ErrorKind::PermissionDenied.into(),
            ));
        }
        Ok(true)
    }

    async fn unmount(&self, _bundle: &Path) {
        self.0.note("unmount");
    }
}

struct FakeNet(World);

#[async_trait]
impl PodNetwork for FakeNet {
    async fn setup(&self, req: &PodNetRequest) -> std::result::Result<PodNetInfo, PodNetError> {
        self.0.note(format!("setup {}", req.sandbox));
        if self.0.failing("setup") {
            return Err(PodNetError::Client(ClientError::AgentUnavailable {
                address: "vsock://2:7070".into(),
                reason: "injected failure".into(),
            }));
        }
        if self.0.failing("setup: no NIC left") {
            return Err(PodNetError::Client(ClientError::AgentRefused {
                op: "AttachNic",
                code: Code::RESOURCE_EXHAUSTED,
                message: "VM vm1 has 16 NICs (max_nics = 16)".into(),
            }));
        }
        Ok(PodNetInfo {
            interface: "eth0".into(),
            mac: "02:00:00:00:00:01".into(),
            addresses: vec!["10.88.0.2/16".into()],
        })
    }

    async fn teardown(&self, sandbox: &SandboxRef) -> std::result::Result<(), PodNetError> {
        self.0.note(format!("teardown {sandbox}"));
        Ok(())
    }
}

struct Harness {
    world: World,
    svc: TaskService,
    events: Arc<RecordedEvents>,
    reaper: Reaper,
    dir: tempfile::TempDir,
    config: PathBuf,
}

/// Events as [`RecordedEvents`] keeps them, with a look at the world when
/// one is published.
struct HookedEvents {
    recorded: Arc<RecordedEvents>,
    hook: Box<dyn Fn(&str) + Send + Sync>,
}

#[async_trait]
impl EventSink for HookedEvents {
    async fn publish(&self, topic: &str, event: Any) {
        (self.hook)(topic);
        self.recorded.publish(topic, event).await;
    }
}

impl Harness {
    fn new() -> Harness {
        Self::with_hook(Box::new(|_| {}))
    }

    /// A harness whose event sink runs `hook` with each topic as it is published.
    fn with_hook(hook: Box<dyn Fn(&str) + Send + Sync>) -> Harness {
        let world = World::default();
        let events = Arc::new(RecordedEvents::default());
        let sink = Arc::new(HookedEvents {
            recorded: events.clone(),
            hook,
        });
        let reaper = Reaper::default();
        let (w1, w2, w3) = (world.clone(), world.clone(), world.clone());
        let seams = Seams {
            network: Arc::new(move |_| -> Arc<dyn PodNetwork> { Arc::new(FakeNet(w1.clone())) }),
            runtime: Arc::new(move |_| -> Arc<dyn Runtime> { Arc::new(FakeRunc(w2.clone())) }),
            rootfs: Arc::new(FakeRootfs(w3)),
        };
        let svc = TaskService::with_seams(
            "test".into(),
            sink,
            reaper.clone(),
            Arc::new(ExitSignal::default()),
            seams,
        );
        let dir = tempfile::tempdir().unwrap();
        // The defaults, from a file of the test's own (not /etc/nestless/shim.toml).
        let config = dir.path().join("shim.toml");
        std::fs::write(&config, "").unwrap();
        Harness {
            world,
            svc,
            events,
            reaper,
            dir,
            config,
        }
    }

    /// A bundle whose container gets a network namespace of its own (it owns
    /// a pod network), or joins the host's (`owner = false`).
    fn bundle(&self, id: &str, owner: bool) -> PathBuf {
        let b = self.dir.path().join(id);
        std::fs::create_dir_all(&b).unwrap();
        let namespaces = if owner {
            r#"[{"type":"pid"},{"type":"network"}]"#
        } else {
            r#"[{"type":"pid"}]"#
        };
        std::fs::write(
            b.join("config.json"),
            format!(r#"{{"linux":{{"namespaces":{namespaces}}}}}"#),
        )
        .unwrap();
        b
    }

    fn create_req(&self, id: &str, bundle: &Path) -> api::CreateTaskRequest {
        let mut value = Vec::new();
        {
            let mut out = CodedOutputStream::vec(&mut value);
            out.write_string(2, &self.config.to_string_lossy()).unwrap();
            out.flush().unwrap();
        }
        api::CreateTaskRequest {
            id: id.into(),
            bundle: bundle.to_string_lossy().into(),
            rootfs: vec![Mount {
                type_: "bind".into(),
                source: "/nonexistent".into(),
                ..Default::default()
            }],
            options: Some(Any {
                type_url: RUNTIME_OPTIONS_TYPE.into(),
                value,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        }
    }

    async fn create(&self, id: &str, owner: bool) -> ttrpc::Result<api::CreateTaskResponse> {
        let b = self.bundle(id, owner);
        self.svc.create(&ctx(), self.create_req(id, &b)).await
    }

    async fn start(&self, id: &str, exec_id: &str) -> ttrpc::Result<u32> {
        let req = api::StartRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        Ok(self.svc.start(&ctx(), req).await?.pid)
    }

    async fn pause(&self, id: &str) -> ttrpc::Result<api::Empty> {
        let req = api::PauseRequest {
            id: id.into(),
            ..Default::default()
        };
        self.svc.pause(&ctx(), req).await
    }

    async fn resume(&self, id: &str) -> ttrpc::Result<api::Empty> {
        let req = api::ResumeRequest {
            id: id.into(),
            ..Default::default()
        };
        self.svc.resume(&ctx(), req).await
    }

    async fn kill(&self, id: &str, exec_id: &str) -> ttrpc::Result<api::Empty> {
        let req = api::KillRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            signal: 9,
            ..Default::default()
        };
        self.svc.kill(&ctx(), req).await
    }

    async fn wait(&self, id: &str, exec_id: &str) -> u32 {
        let req = api::WaitRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.svc.wait(&ctx(), req).await.unwrap().exit_status
    }

    async fn delete(&self, id: &str, exec_id: &str) -> ttrpc::Result<api::DeleteResponse> {
        let req = api::DeleteRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.svc.delete(&ctx(), req).await
    }

    async fn status(&self, id: &str, exec_id: &str) -> api::Status {
        let s = self
            .svc
            .state(
                &ctx(),
                api::StateRequest {
                    id: id.into(),
                    exec_id: exec_id.into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        s.status.enum_value().unwrap()
    }
}

fn ctx() -> TtrpcContext {
    TtrpcContext {
        mh: Default::default(),
        metadata: HashMap::new(),
        timeout_nano: 0,
    }
}

fn code(e: ttrpc::Error) -> Code {
    match e {
        ttrpc::Error::RpcStatus(s) => s.code(),
        other => panic!("not a status: {other:?}"),
    }
}

fn message(e: &ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(s) => s.message().to_owned(),
        other => panic!("not a status: {other:?}"),
    }
}

// ------------------------------------------------------------ create and its rollback

#[tokio::test]
async fn a_created_owner_has_its_rootfs_runc_container_and_record_and_its_network_at_start() {
    let h = Harness::new();
    let pid = h.create("c1", true).await.unwrap().pid;
    assert_eq!(pid, INIT_PID);
    // The network waits for the start: others (Docker) may still configure the namespace.
    assert_eq!(h.world.take(), ["mount", "runc create"]);
    assert!(h.dir.path().join("c1").join(RECORD_FILE).is_file());
    assert_eq!(h.events.topics(), ["/tasks/create"]);
    assert_eq!(h.status("c1", "").await, api::Status::CREATED);
    // Same id again: refused, nothing done.
    let e = h.create("c1", true).await.unwrap_err();
    assert_eq!(code(e), Code::ALREADY_EXISTS);
    assert!(h.world.take().is_empty());
}

#[tokio::test]
async fn a_container_without_a_netns_of_its_own_gets_no_network() {
    let h = Harness::new();
    h.create("app", false).await.unwrap();
    assert_eq!(h.world.take(), ["mount", "runc create"]);
}

/// Asserts that a failed create did exactly `steps` and left nothing: no
/// container, no record, no event.
async fn assert_rolled_back(h: &Harness, id: &str, steps: &[&str]) {
    assert_eq!(h.world.take(), steps);
    assert!(!h.dir.path().join(id).join(RECORD_FILE).is_file());
    assert!(h.events.topics().is_empty(), "{:?}", h.events.topics());
    let e = h
        .svc
        .state(
            &ctx(),
            api::StateRequest {
                id: id.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(e), Code::NOT_FOUND);
}

#[tokio::test]
async fn a_failed_mount_undoes_nothing() {
    let h = Harness::new();
    h.world.fail("mount");
    assert_eq!(
        code(h.create("c1", true).await.unwrap_err()),
        Code::INTERNAL
    );
    assert_rolled_back(&h, "c1", &["mount"]).await;
}

#[tokio::test]
async fn failed_stdio_unmounts() {
    let h = Harness::new();
    let b = h.bundle("c1", true);
    let mut req = h.create_req("c1", &b);
    req.stdout = "bogus://relative".into();
    let e = h.svc.create(&ctx(), req).await.unwrap_err();
    assert_eq!(code(e), Code::INVALID_ARGUMENT);
    assert_rolled_back(&h, "c1", &["mount", "unmount"]).await;
}

#[tokio::test]
async fn a_failed_runc_create_unmounts() {
    let h = Harness::new();
    h.world.fail("runc create");
    let e = h.create("c1", true).await.unwrap_err();
    assert!(message(&e).contains("injected failure"), "{e:?}");
    assert_rolled_back(&h, "c1", &["mount", "runc create", "unmount"]).await;
}

#[tokio::test]
async fn no_pid_deletes_the_runc_container_and_unmounts() {
    let h = Harness::new();
    h.world.fail("pid file");
    h.create("c1", true).await.unwrap_err();
    assert_rolled_back(
        &h,
        "c1",
        &["mount", "runc create", "runc delete --force", "unmount"],
    )
    .await;
}

#[tokio::test]
async fn a_failed_record_deletes_the_runc_container_and_unmounts() {
    let h = Harness::new();
    let b = h.bundle("c1", true);
    // The record cannot take the place of a directory.
    std::fs::create_dir(b.join(RECORD_FILE)).unwrap();
    h.svc
        .create(&ctx(), h.create_req("c1", &b))
        .await
        .unwrap_err();
    std::fs::remove_dir(b.join(RECORD_FILE)).unwrap();
    assert_rolled_back(
        &h,
        "c1",
        &["mount", "runc create", "runc delete --force", "unmount"],
    )
    .await;
}

/// What a start whose pod network setup fails does: the init killed, never
/// started; no teardown, since a failed setup gives back what it made itself,
/// and a NIC the sandbox already had (CNI's) is not the start's to release.
const AFTER_A_FAILED_SETUP: &[&str] = &["setup test/c1", "runc kill 9"];

/// A start whose network fails leaves a Stopped task (one TaskExit, 137) that deletes
/// as usual and releases nothing.
async fn assert_failed_start_then_deleted(h: &Harness) {
    assert_eq!(h.world.take(), AFTER_A_FAILED_SETUP);
    assert_eq!(h.status("c1", "").await, api::Status::STOPPED);
    assert_eq!(h.events.topics(), ["/tasks/create", "/tasks/exit"]);
    let d = h.delete("c1", "").await.unwrap();
    assert_eq!(d.exit_status, 137);
    assert_eq!(h.world.take(), ["runc delete", "unmount"]);
    assert!(!h.dir.path().join("c1").join(RECORD_FILE).is_file());
}

#[tokio::test]
async fn a_failed_network_stops_the_task_at_start() {
    let h = Harness::new();
    h.world.fail("setup");
    h.create("c1", true).await.unwrap();
    h.world.take();
    let e = h.start("c1", "").await.unwrap_err();
    let msg = message(&e);
    assert!(
        msg.contains("pod network of sandbox test/c1") && msg.contains("injected failure"),
        "{msg}"
    );
    assert_eq!(code(e), Code::UNAVAILABLE);
    assert_failed_start_then_deleted(&h).await;
    // The id is free again.
    h.world.fail.lock().unwrap().clear();
    h.create("c1", true).await.unwrap();
}

#[tokio::test]
async fn the_agents_refusal_reaches_containerd_with_its_code() {
    let h = Harness::new();
    h.world.fail("setup: no NIC left");
    h.create("c1", true).await.unwrap();
    h.world.take();
    let e = h.start("c1", "").await.unwrap_err();
    assert!(message(&e).contains("max_nics"), "{e:?}");
    assert_eq!(code(e), Code::RESOURCE_EXHAUSTED);
    assert_failed_start_then_deleted(&h).await;
}

#[tokio::test]
async fn bad_requests_do_nothing() {
    let h = Harness::new();
    let b = h.bundle("c1", true);
    let mut req = h.create_req("a/b", &b);
    assert_eq!(
        code(h.svc.create(&ctx(), req.clone()).await.unwrap_err()),
        Code::INVALID_ARGUMENT
    );
    req.id = "c1".into();
    req.bundle = "relative".into();
    assert_eq!(
        code(h.svc.create(&ctx(), req).await.unwrap_err()),
        Code::INVALID_ARGUMENT
    );
    assert!(h.world.take().is_empty());
}

// ------------------------------------------------------------ the state table, applied

#[tokio::test]
async fn a_container_lives_by_the_state_table() {
    let h = Harness::new();
    h.create("c1", true).await.unwrap();
    h.world.take();

    // Created: no pause, no resume.
    let e = h.pause("c1").await.unwrap_err();
    assert!(
        message(&e).contains("cannot pause process c1: it is created"),
        "{e:?}"
    );
    assert_eq!(code(e), Code::FAILED_PRECONDITION);
    assert_eq!(
        code(h.resume("c1").await.unwrap_err()),
        Code::FAILED_PRECONDITION
    );
    assert!(h.world.take().is_empty(), "a refused call reaches runc");

    // Start; a second start is refused.
    assert_eq!(h.start("c1", "").await.unwrap(), INIT_PID);
    assert_eq!(h.status("c1", "").await, api::Status::RUNNING);
    assert_eq!(
        code(h.start("c1", "").await.unwrap_err()),
        Code::FAILED_PRECONDITION
    );

    // Pause: PAUSED; a second pause is refused; delete is refused.
    h.pause("c1").await.unwrap();
    assert_eq!(h.status("c1", "").await, api::Status::PAUSED);
    let e = h.pause("c1").await.unwrap_err();
    assert!(message(&e).contains("it is paused"), "{e:?}");
    let e = h.delete("c1", "").await.unwrap_err();
    assert!(
        message(&e).contains("cannot delete process c1: it is paused"),
        "{e:?}"
    );

    // A paused container takes an exec process; it keeps its own state.
    let spec = Any {
        value: br#"{"args":["true"]}"#.to_vec(),
        ..Default::default()
    };
    let exec = api::ExecProcessRequest {
        id: "c1".into(),
        exec_id: "e1".into(),
        spec: Some(spec).into(),
        ..Default::default()
    };
    h.svc.exec(&ctx(), exec).await.unwrap();
    assert_eq!(h.status("c1", "e1").await, api::Status::CREATED);
    // Not started: it cannot be signalled.
    assert_eq!(
        code(h.kill("c1", "e1").await.unwrap_err()),
        Code::FAILED_PRECONDITION
    );

    // Resume, start the exec process; running, it cannot be deleted.
    h.resume("c1").await.unwrap();
    assert_eq!(h.status("c1", "").await, api::Status::RUNNING);
    assert_eq!(h.start("c1", "e1").await.unwrap(), EXEC_PID);
    assert_eq!(h.status("c1", "e1").await, api::Status::RUNNING);
    assert_eq!(
        code(h.delete("c1", "e1").await.unwrap_err()),
        Code::FAILED_PRECONDITION
    );
    let pids = api::PidsRequest {
        id: "c1".into(),
        ..Default::default()
    };
    let pids = h.svc.pids(&ctx(), pids).await.unwrap();
    assert_eq!(pids.processes.len(), 2);
    assert!(pids.processes[1].info.is_some(), "the exec's details");

    // Kill, and the reaper sees both exit: STOPPED, Wait returns the statuses.
    h.kill("c1", "").await.unwrap();
    h.reaper.deliver(Pid::from_raw(EXEC_PID as i32), 0);
    h.reaper.deliver(Pid::from_raw(INIT_PID as i32), 137);
    assert_eq!(h.wait("c1", "").await, 137);
    assert_eq!(h.wait("c1", "e1").await, 0);
    assert_eq!(h.status("c1", "").await, api::Status::STOPPED);
    assert_eq!(h.status("c1", "e1").await, api::Status::STOPPED);

    // Stopped: a signal finds nobody (NOT_FOUND), no update.
    assert_eq!(code(h.kill("c1", "").await.unwrap_err()), Code::NOT_FOUND);
    let update = api::UpdateTaskRequest {
        id: "c1".into(),
        resources: Some(Any {
            value: b"{}".to_vec(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    let e = h.svc.update(&ctx(), update).await.unwrap_err();
    assert_eq!(code(e), Code::FAILED_PRECONDITION);

    // Delete the exec process, then the container: runc delete without
    // --force, the network released, the rootfs unmounted.
    h.delete("c1", "e1").await.unwrap();
    let d = h.delete("c1", "").await.unwrap();
    assert_eq!((d.pid, d.exit_status), (INIT_PID, 137));
    assert_eq!(
        h.world.take(),
        [
            "setup test/c1",
            "runc start",
            "runc pause",
            "runc resume",
            "runc exec",
            "runc ps",
            "runc kill 9",
            "runc delete",
            "teardown test/c1",
            "unmount",
        ]
    );
    assert_eq!(
        h.events.topics(),
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/paused",
            "/tasks/exec-added",
            "/tasks/resumed",
            "/tasks/exec-started",
            "/tasks/exit",
            "/tasks/exit",
            "/tasks/delete",
        ]
    );
    assert!(!h.dir.path().join("c1").join(RECORD_FILE).is_file());
}

#[tokio::test]
async fn a_created_container_is_deleted_with_force() {
    let h = Harness::new();
    h.create("c1", false).await.unwrap();
    h.world.take();
    let d = h.delete("c1", "").await.unwrap();
    assert_eq!(d.exit_status, 128 + 9);
    assert_eq!(h.world.take(), ["runc delete --force", "unmount"]);
}

// ------------------------------------------------------------ output at exit

#[tokio::test]
async fn the_exit_is_reported_once_the_output_is_out() {
    // The client's end of the stdout FIFO, opened first, as containerd does.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("stdout");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let client = std::fs::File::from(
        nix::fcntl::open(
            &fifo,
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_NONBLOCK,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap(),
    );
    // When TaskExit is published, the client reads what the FIFO holds: all
    // of the output, then EOF (the shim's copy has ended), never "try again".
    let seen: Arc<Mutex<Option<(usize, bool)>>> = Arc::default();
    let (client, seen_by_hook) = (Mutex::new(client), seen.clone());
    let h = Harness::with_hook(Box::new(move |topic| {
        if topic != "/tasks/exit" {
            return;
        }
        let mut f = client.lock().unwrap();
        let (mut n, mut buf) = (0, [0u8; 8192]);
        let eof = loop {
            match std::io::Read::read(&mut *f, &mut buf) {
                Ok(0) => break true,
                Ok(k) => n += k,
                Err(_) => break false,
            }
        };
        *seen_by_hook.lock().unwrap() = Some((n, eof));
    }));
    let b = h.bundle("c1", false);
    let mut req = h.create_req("c1", &b);
    req.stdout = fifo.to_string_lossy().into_owned();
    h.svc.create(&ctx(), req).await.unwrap();
    h.start("c1", "").await.unwrap();
    // The process writes its last 60,000 bytes (what a pipe holds) and exits:
    // they are still in the pipe when the reaper sees the exit.
    let mut out = std::fs::File::from(h.world.stdout.lock().unwrap().take().unwrap());
    std::io::Write::write_all(&mut out, &vec![b'x'; 60_000]).unwrap();
    drop(out);
    h.reaper.deliver(Pid::from_raw(INIT_PID as i32), 0);
    assert_eq!(h.wait("c1", "").await, 0);
    assert_eq!(
        *seen.lock().unwrap(),
        Some((60_000, true)),
        "(bytes the client could read, EOF) when the exit was reported"
    );
    h.delete("c1", "").await.unwrap();
}
