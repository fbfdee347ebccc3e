//! The Task service (containerd's task API v2) over runc.
//!
//! One shim process serves every container of a pod (see [`crate::shim`]);
//! this service keeps them in a map, each behind its own async lock. A call
//! locks the one container it is about; calls on different containers do not
//! wait for one another.
//!
//! Create, with the pod network hook:
//!
//! ```text
//! containerd          shim (this service)                    runc / PodNetwork
//!   | Create(id,bundle,rootfs,stdio,options)
//!   |------------------>| options -> config (config_path | /etc/nestless/shim.toml)
//!   |                   | spec -> network role, mount rootfs, open stdio
//!   |                   |------------ runc create --------------->| init exists, stopped
//!   |                   | record in bundle, watch init's exit
//!   |                   |---- setup(sandbox, netns) (owner only) ->| NIC in the netns
//!   |                   |   on failure: runc delete -f, teardown, unmount: nothing left
//!   |                   | cgroup + OOM watch, event TaskCreate
//!   |<------ pid -------|
//!   | Start(id)         |------------ runc start ---------------->|
//!   |<------ pid -------| event TaskStart
//!   |        ...        | reaper: init exits -> event TaskExit, Wait() returns
//!   | Delete(id)        |------------ runc delete --------------->|
//!   |                   |---- teardown(sandbox) (owner only, errors logged) ->|
//!   |<-- exit status ---| unmount rootfs, event TaskDelete
//!   | Shutdown          | exits when no container is left
//! ```
//!
//! Event order: the handler that starts a process holds the container lock
//! until it has published the start event, and exits are handled under the
//! same lock, so a process's exit event never overtakes its start event.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use containerd_shim::{
    api::{self, Status},
    asynchronous::ExitSignal,
    TtrpcResult,
};
use containerd_shim_protos::{
    events::task::{
        TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM,
        TaskPaused, TaskResumed, TaskStart,
    },
    protobuf::{
        well_known_types::{any::Any, timestamp::Timestamp},
        Message, MessageField,
    },
    shim::oci::ProcessDetails,
    shim_async::Task,
    topics,
    ttrpc::r#async::TtrpcContext,
    types::task::ProcessInfo,
};
use log::{debug, info, warn};
use tokio::{
    sync::{watch, Mutex},
    task::JoinHandle,
};

use crate::{
    bundle::Record,
    cgroup::Cgroup,
    config::ShimConfig,
    error::{Result, ShimError},
    events::{event_any, EventSink, TaskEvent},
    options::{RuncOptions, RuntimeOptions},
    podnet::{self, PodNetRequest, PodNetwork},
    policy::{self, NetworkRole, SpecView},
    reaper::{Exit, Reaper},
    runc::{self, CreateOpts, ExecOpts, Runc},
    stdio::{IoContext, PreparedIo, ProcessIo, StdioSpec},
};

/// How long Delete waits for a process's output to drain.
const IO_DRAIN_LIMIT: Duration = Duration::from_secs(5);
/// Exit status reported for a process the shim had to kill (SIGKILL).
const KILLED_STATUS: u32 = 128 + 9;
/// Type URL of the per-pid details in Pids.
const PROCESS_DETAILS_TYPE: &str = "containerd.runc.v1.ProcessDetails";

/// Lifecycle state of one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProcState {
    Created,
    Running,
    Stopped,
}

impl ProcState {
    fn name(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Stopped => "stopped",
        }
    }
}

/// A container's init process or one of its exec processes.
struct Process {
    pid: u32,
    state: ProcState,
    exit: watch::Sender<Option<Exit>>,
    stdio: StdioSpec,
    io: Option<ProcessIo>,
    /// The process spec (JSON) of an exec process not yet started.
    exec_spec: Option<Vec<u8>>,
}

impl Process {
    fn new(stdio: StdioSpec) -> Self {
        Self {
            pid: 0,
            state: ProcState::Created,
            exit: watch::channel(None).0,
            stdio,
            io: None,
            exec_spec: None,
        }
    }

    fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }
}

/// A pod network the container owns.
struct OwnedNetwork {
    sandbox_id: String,
    backend: Arc<dyn PodNetwork>,
}

/// One container.
struct Container {
    id: String,
    bundle: PathBuf,
    runc: Runc,
    init: Process,
    execs: HashMap<String, Process>,
    paused: bool,
    cgroup: Option<Cgroup>,
    oom: Option<JoinHandle<()>>,
    network: Option<OwnedNetwork>,
    rootfs_mounted: bool,
    /// Set once the container is deleted (or its creation rolled back).
    gone: bool,
}

impl Container {
    fn process(&self, exec_id: &str) -> Result<&Process> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs
            .get(exec_id)
            .ok_or_else(|| ShimError::ProcessNotFound {
                id: self.id.clone(),
                exec_id: exec_id.to_owned(),
            })
    }

    fn process_mut(&mut self, exec_id: &str) -> Result<&mut Process> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        let id = &self.id;
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| ShimError::ProcessNotFound {
                id: id.clone(),
                exec_id: exec_id.to_owned(),
            })
    }

    fn status(&self, exec_id: &str) -> Result<Status> {
        let p = self.process(exec_id)?;
        Ok(match p.state {
            ProcState::Created => Status::CREATED,
            ProcState::Stopped => Status::STOPPED,
            ProcState::Running if exec_id.is_empty() && self.paused => Status::PAUSED,
            ProcState::Running => Status::RUNNING,
        })
    }

    fn label(&self, exec_id: &str) -> String {
        if exec_id.is_empty() {
            self.id.clone()
        } else {
            format!("{}/{exec_id}", self.id)
        }
    }
}

/// Shared state of the service.
struct Inner {
    namespace: String,
    events: Arc<dyn EventSink>,
    network_backend: NetworkFactory,
    reaper: Reaper,
    exit: Arc<ExitSignal>,
    containers: std::sync::Mutex<HashMap<String, Arc<Mutex<Container>>>>,
    /// Creates in flight (Shutdown does not end the shim under them).
    creating: AtomicUsize,
}

/// Builds the pod network backend a container's shim configuration asks for
/// ([`podnet::from_config`] in the shim; a fake in component tests).
pub type NetworkFactory = Arc<dyn Fn(&ShimConfig) -> Arc<dyn PodNetwork> + Send + Sync>;

/// The Task service; cheap to clone.
#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

struct CreatingGuard<'a>(&'a AtomicUsize);

impl<'a> CreatingGuard<'a> {
    fn new(c: &'a AtomicUsize) -> Self {
        c.fetch_add(1, Ordering::SeqCst);
        Self(c)
    }
}

impl Drop for CreatingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl TaskService {
    /// A service for containerd namespace `namespace`, publishing events
    /// to `events`, reaping children with `reaper`, and signalling `exit`
    /// when the shim should end. Pod networks come from [`podnet::from_config`].
    pub fn new(
        namespace: String,
        events: Arc<dyn EventSink>,
        reaper: Reaper,
        exit: Arc<ExitSignal>,
    ) -> Self {
        Self::with_network(
            namespace,
            events,
            reaper,
            exit,
            Arc::new(podnet::from_config),
        )
    }

    /// Like [`Self::new`], with the pod network backends built by `network_backend`.
    pub fn with_network(
        namespace: String,
        events: Arc<dyn EventSink>,
        reaper: Reaper,
        exit: Arc<ExitSignal>,
        network_backend: NetworkFactory,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                namespace,
                events,
                network_backend,
                reaper,
                exit,
                containers: Default::default(),
                creating: AtomicUsize::new(0),
            }),
        }
    }

    fn get(&self, id: &str) -> Result<Arc<Mutex<Container>>> {
        self.inner
            .containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| ShimError::ContainerNotFound(id.to_owned()))
    }

    fn remove(&self, id: &str) {
        self.inner
            .containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    async fn publish<E: TaskEvent>(&self, topic: &str, event: Box<E>) {
        self.inner.events.publish(topic, event_any(&*event)).await;
    }

    fn io_context(&self, id: &str) -> IoContext {
        IoContext {
            container_id: id.to_owned(),
            namespace: self.inner.namespace.clone(),
        }
    }

    /// The runc driver for a container: `[runc]` of the config, overridden by runc options.
    fn runc_for(&self, config: &ShimConfig, opts: Option<&RuncOptions>) -> Runc {
        let binary = opts
            .and_then(|o| o.binary_name.clone())
            .unwrap_or_else(|| config.runc.binary.clone());
        let root = opts
            .and_then(|o| o.root.clone())
            .unwrap_or_else(|| config.runc.root.clone());
        let systemd = config.runc.systemd_cgroup || opts.is_some_and(|o| o.systemd_cgroup);
        Runc::new(
            binary,
            runc::namespaced_root(&root, &self.inner.namespace),
            systemd,
            self.inner.reaper.clone(),
        )
    }

    /// Hands the exit of `pid` (a process of container `id`) to [`Self::on_exit`].
    fn watch_exit(&self, id: &str, exec_id: &str, pid: u32) {
        let rx = self.inner.reaper.watch(pid);
        let svc = self.clone();
        let (id, exec_id) = (id.to_owned(), exec_id.to_owned());
        tokio::spawn(async move {
            if let Ok(exit) = rx.await {
                svc.on_exit(&id, &exec_id, exit).await;
            }
        });
    }

    async fn on_exit(&self, id: &str, exec_id: &str, exit: Exit) {
        let Ok(c) = self.get(id) else {
            return;
        };
        let mut c = c.lock().await;
        if c.gone {
            return;
        }
        let init = exec_id.is_empty();
        let Ok(p) = c.process_mut(exec_id) else {
            return;
        };
        if p.pid != exit.pid || p.state == ProcState::Stopped {
            return;
        }
        p.state = ProcState::Stopped;
        p.exit.send_replace(Some(exit));
        if init {
            c.paused = false;
            info!("container {id} exited with status {}", exit.status);
        } else {
            debug!("process {id}/{exec_id} exited with status {}", exit.status);
        }
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: id.to_owned(),
                id: if init {
                    id.to_owned()
                } else {
                    exec_id.to_owned()
                },
                pid: exit.pid,
                exit_status: exit.status,
                exited_at: MessageField::some(timestamp(exit.at)),
                ..Default::default()
            }),
        )
        .await;
    }

    fn watch_oom(&self, id: &str, cgroup: &Cgroup) -> Option<JoinHandle<()>> {
        let mut watcher = match cgroup.oom_watcher() {
            Ok(Some(w)) => w,
            Ok(None) => return None,
            Err(e) => {
                warn!("container {id}: cannot watch for OOM kills: {e}");
                return None;
            }
        };
        let svc = self.clone();
        let id = id.to_owned();
        Some(tokio::spawn(async move {
            while watcher.next().await.is_some() {
                info!("container {id}: OOM kill");
                svc.publish(
                    topics::TASK_OOM_EVENT_TOPIC,
                    Box::new(TaskOOM {
                        container_id: id.clone(),
                        ..Default::default()
                    }),
                )
                .await;
            }
        }))
    }

    // ------------------------------------------------------------ Create

    async fn do_create(&self, req: api::CreateTaskRequest) -> Result<api::CreateTaskResponse> {
        let _creating = CreatingGuard::new(&self.inner.creating);
        let id = req.id.clone();
        if id.is_empty() || id.contains('/') {
            return Err(ShimError::invalid(
                "id",
                format!("{id:?} is not a container id"),
            ));
        }
        if self.get(&id).is_ok() {
            return Err(ShimError::ContainerExists(id));
        }
        if !req.checkpoint.is_empty() {
            return Err(ShimError::Unsupported("restoring from a checkpoint"));
        }
        let bundle = PathBuf::from(&req.bundle);
        if !bundle.is_absolute() {
            return Err(ShimError::invalid(
                "bundle",
                format!("{:?} is not an absolute path", req.bundle),
            ));
        }

        let options = RuntimeOptions::from_any(req.options.as_ref())?;
        let config = ShimConfig::resolve(options.config_path.as_deref())?;
        if config.source.is_some() {
            log::set_max_level(config.log_level);
        }
        let spec_path = bundle.join("config.json");
        let spec_data = tokio::fs::read(&spec_path)
            .await
            .map_err(|e| ShimError::io(format!("cannot read {}", spec_path.display()), e))?;
        let spec = SpecView::from_json(&spec_data)
            .map_err(|e| ShimError::invalid("bundle", format!("{}: {e}", spec_path.display())))?;
        let role = policy::network_role(&id, &spec);
        let backend = match &role {
            NetworkRole::Owner { .. } => Some((self.inner.network_backend)(&config)),
            NetworkRole::Nothing => None,
        };
        let runc = self.runc_for(&config, options.runc.as_ref());
        let runc_opts = options.runc.clone().unwrap_or_default();

        let stdio = StdioSpec {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };

        // Rootfs, then runc create; undo the mount if create fails.
        let rootfs_mounted = mount_rootfs(&bundle, &req.rootfs).await?;
        let created = self
            .runc_create(&id, &bundle, &runc, &runc_opts, &stdio)
            .await;
        let (pid, io) = match created {
            Ok(x) => x,
            Err(e) => {
                if rootfs_mounted {
                    unmount_rootfs(&bundle).await;
                }
                return Err(e);
            }
        };

        let network_sandbox = match &role {
            NetworkRole::Owner { sandbox_id, .. } => Some(sandbox_id.clone()),
            NetworkRole::Nothing => None,
        };
        let record = Record {
            runc_binary: runc.binary.clone(),
            runc_root: runc.root.clone(),
            systemd_cgroup: runc.systemd_cgroup,
            config_path: config.source.clone(),
            network_sandbox: network_sandbox.clone(),
            rootfs_mounted,
        };
        if let Err(e) = record.store(&bundle) {
            self.undo_create(&id, &bundle, &runc, None, rootfs_mounted)
                .await;
            return Err(e);
        }

        let mut init = Process::new(stdio.clone());
        init.pid = pid;
        init.io = Some(io);
        let container = Arc::new(Mutex::new(Container {
            id: id.clone(),
            bundle: bundle.clone(),
            runc: runc.clone(),
            init,
            execs: HashMap::new(),
            paused: false,
            cgroup: None,
            oom: None,
            network: None,
            rootfs_mounted,
            gone: false,
        }));
        // Visible (and locked) from here, so that an early exit of init is
        // handled after this create has finished.
        let mut c = container.clone().lock_owned().await;
        self.inner
            .containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), container);
        self.watch_exit(&id, "", pid);

        if let (NetworkRole::Owner { sandbox_id, netns }, Some(backend)) = (&role, backend) {
            let req_net = PodNetRequest {
                sandbox_id: sandbox_id.clone(),
                netns: netns.path(pid),
                labels: policy::network_labels(&spec, &self.inner.namespace),
            };
            match backend.setup(&req_net).await {
                Ok(info) => {
                    if !info.interface.is_empty() {
                        info!(
                            "sandbox {sandbox_id}: {} {} {:?} in {}",
                            info.interface,
                            info.mac,
                            info.addresses,
                            req_net.netns.display()
                        );
                    }
                    c.network = Some(OwnedNetwork {
                        sandbox_id: sandbox_id.clone(),
                        backend,
                    });
                }
                Err(source) => {
                    c.gone = true;
                    let io = c.init.io.take();
                    drop(c);
                    self.remove(&id);
                    self.undo_create(
                        &id,
                        &bundle,
                        &runc,
                        Some((sandbox_id, &backend)),
                        rootfs_mounted,
                    )
                    .await;
                    drop(io);
                    let e = ShimError::Network {
                        sandbox_id: sandbox_id.clone(),
                        source,
                    };
                    warn!("create {id}: {}", e.chain());
                    return Err(e);
                }
            }
        }

        match Cgroup::of_pid(pid) {
            Ok(cg) => {
                c.oom = self.watch_oom(&id, &cg);
                c.cgroup = Some(cg);
            }
            Err(e) => warn!("container {id}: cannot find its cgroup: {e}"),
        }

        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            }),
        )
        .await;
        info!("container {id} created, init pid {pid}");
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    /// Opens the stdio, runs `runc create`, reads the pid and starts the copies.
    async fn runc_create(
        &self,
        id: &str,
        bundle: &Path,
        runc: &Runc,
        opts: &RuncOptions,
        stdio: &StdioSpec,
    ) -> Result<(u32, ProcessIo)> {
        let mut prepared =
            PreparedIo::prepare(stdio, &self.io_context(id), &self.inner.reaper).await?;
        let pid_file = bundle.join("init.pid");
        let log = bundle.join("log.json");
        let _ = tokio::fs::remove_file(&pid_file).await;
        let _ = tokio::fs::remove_file(&log).await;
        let console = prepared.console.take();
        runc.create(
            id,
            &CreateOpts {
                bundle,
                pid_file: &pid_file,
                console_socket: console.as_ref().map(|c| c.path()),
                no_pivot: opts.no_pivot_root,
                no_new_keyring: opts.no_new_keyring,
                log: &log,
            },
            std::mem::take(&mut prepared.child),
        )
        .await?;
        let started = async {
            let pid = read_pid(&pid_file).await?;
            let master = match console {
                Some(c) => Some(c.receive().await?),
                None => None,
            };
            Ok((pid, prepared.start(master)?))
        }
        .await;
        if started.is_err() {
            if let Err(e) = runc.delete(id, true).await {
                warn!("cannot remove half-created container {id}: {e}");
            }
        }
        started
    }

    /// Undoes a create whose runc container exists: network, runc, record, rootfs.
    async fn undo_create(
        &self,
        id: &str,
        bundle: &Path,
        runc: &Runc,
        network: Option<(&String, &Arc<dyn PodNetwork>)>,
        rootfs_mounted: bool,
    ) {
        if let Err(e) = runc.delete(id, true).await {
            warn!("rollback of {id}: {}", e.chain());
        }
        if let Some((sandbox_id, backend)) = network {
            if let Err(e) = backend.teardown(sandbox_id).await {
                warn!("rollback of {id}: pod network of sandbox {sandbox_id}: {e}");
            }
        }
        Record::remove(bundle);
        if rootfs_mounted {
            unmount_rootfs(bundle).await;
        }
    }

    // ------------------------------------------------------------ Start

    async fn do_start(&self, req: api::StartRequest) -> Result<api::StartResponse> {
        let c = self.get(&req.id)?;
        let mut c = c.lock().await;
        if req.exec_id.is_empty() {
            if c.init.state != ProcState::Created {
                return Err(ShimError::FailedPrecondition {
                    action: "start",
                    id: c.id.clone(),
                    state: c.init.state.name(),
                });
            }
            c.runc.start(&c.id).await?;
            c.init.state = ProcState::Running;
            let pid = c.init.pid;
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: c.id.clone(),
                    pid,
                    ..Default::default()
                }),
            )
            .await;
            info!("container {} started", c.id);
            return Ok(api::StartResponse {
                pid,
                ..Default::default()
            });
        }

        let exec_id = req.exec_id.as_str();
        let label = c.label(exec_id);
        if c.init.state != ProcState::Running {
            return Err(ShimError::FailedPrecondition {
                action: "exec in",
                id: c.id.clone(),
                state: c.init.state.name(),
            });
        }
        let p = c.process(exec_id)?;
        if p.state != ProcState::Created {
            return Err(ShimError::FailedPrecondition {
                action: "start",
                id: label,
                state: p.state.name(),
            });
        }
        let stdio = p.stdio.clone();
        let spec = p.exec_spec.clone().unwrap_or_default();

        let (pid, io) = self
            .runc_exec(&c.id, &c.bundle, &c.runc, exec_id, &spec, &stdio)
            .await?;
        let id = c.id.clone();
        let p = c.process_mut(exec_id)?;
        p.pid = pid;
        p.state = ProcState::Running;
        p.io = Some(io);
        p.exec_spec = None;
        self.publish(
            topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            Box::new(TaskExecStarted {
                container_id: id.clone(),
                exec_id: exec_id.to_owned(),
                pid,
                ..Default::default()
            }),
        )
        .await;
        self.watch_exit(&id, exec_id, pid);
        debug!("process {label} started, pid {pid}");
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn runc_exec(
        &self,
        id: &str,
        bundle: &Path,
        runc: &Runc,
        exec_id: &str,
        spec: &[u8],
        stdio: &StdioSpec,
    ) -> Result<(u32, ProcessIo)> {
        let base = bundle.join(format!("exec-{exec_id}"));
        let process = base.with_extension("process.json");
        let pid_file = base.with_extension("pid");
        let log = base.with_extension("log.json");
        let cleanup = || async {
            for f in [&process, &pid_file, &log] {
                let _ = tokio::fs::remove_file(f).await;
            }
        };
        cleanup().await;
        tokio::fs::write(&process, spec)
            .await
            .map_err(|e| ShimError::io(format!("cannot write {}", process.display()), e))?;
        let result = async {
            let mut prepared =
                PreparedIo::prepare(stdio, &self.io_context(id), &self.inner.reaper).await?;
            let console = prepared.console.take();
            runc.exec(
                id,
                &ExecOpts {
                    process: &process,
                    pid_file: &pid_file,
                    console_socket: console.as_ref().map(|c| c.path()),
                    log: &log,
                },
                std::mem::take(&mut prepared.child),
            )
            .await?;
            let pid = read_pid(&pid_file).await?;
            let master = match console {
                Some(c) => Some(c.receive().await?),
                None => None,
            };
            Ok((pid, prepared.start(master)?))
        }
        .await;
        cleanup().await;
        result
    }

    // ------------------------------------------------------------ Delete

    async fn do_delete(&self, req: api::DeleteRequest) -> Result<api::DeleteResponse> {
        let c = self.get(&req.id)?;
        if !req.exec_id.is_empty() {
            let mut c = c.lock().await;
            let label = c.label(&req.exec_id);
            let p = c.process(&req.exec_id)?;
            if p.state == ProcState::Running {
                return Err(ShimError::FailedPrecondition {
                    action: "delete",
                    id: label,
                    state: "running",
                });
            }
            let mut p = c.execs.remove(&req.exec_id).expect("looked up above");
            drop(c);
            if let Some(io) = p.io.take() {
                io.finish(IO_DRAIN_LIMIT).await;
            }
            let exit = p.exited();
            return Ok(api::DeleteResponse {
                pid: p.pid,
                exit_status: exit.map(|e| e.status).unwrap_or(0),
                exited_at: MessageField::some(timestamp(
                    exit.map(|e| e.at).unwrap_or_else(SystemTime::now),
                )),
                ..Default::default()
            });
        }

        let mut c = c.lock().await;
        if c.init.state == ProcState::Running {
            return Err(ShimError::FailedPrecondition {
                action: "delete",
                id: c.id.clone(),
                state: if c.paused { "paused" } else { "running" },
            });
        }
        let force = c.init.state == ProcState::Created;
        match c.runc.delete(&c.id, force).await {
            Ok(()) => {}
            Err(ShimError::Runc {
                not_found: true, ..
            }) => {}
            Err(e) => return Err(e),
        }
        c.gone = true;
        let id = c.id.clone();
        let bundle = c.bundle.clone();
        let pid = c.init.pid;
        let exit = c.init.exited();
        let io = c.init.io.take();
        let execs: Vec<_> = c
            .execs
            .drain()
            .filter_map(|(_, mut p)| p.io.take())
            .collect();
        let oom = c.oom.take();
        let network = c.network.take();
        let rootfs_mounted = c.rootfs_mounted;
        drop(c);
        self.remove(&id);

        if let Some(io) = io {
            io.finish(IO_DRAIN_LIMIT).await;
        }
        for io in execs {
            io.finish(Duration::ZERO).await;
        }
        if let Some(oom) = oom {
            oom.abort();
        }
        if let Some(net) = network {
            if let Err(e) = net.backend.teardown(&net.sandbox_id).await {
                warn!(
                    "container {id}: releasing the pod network of sandbox {} failed (deleting anyway): {e}",
                    net.sandbox_id
                );
            }
        }
        if rootfs_mounted {
            unmount_rootfs(&bundle).await;
        }
        Record::remove(&bundle);

        let (status, at) = match exit {
            Some(e) => (e.status, e.at),
            None => (KILLED_STATUS, SystemTime::now()),
        };
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: id.clone(),
                id: id.clone(),
                pid,
                exit_status: status,
                exited_at: MessageField::some(timestamp(at)),
                ..Default::default()
            }),
        )
        .await;
        info!("container {id} deleted");
        Ok(api::DeleteResponse {
            pid,
            exit_status: status,
            exited_at: MessageField::some(timestamp(at)),
            ..Default::default()
        })
    }

    // ------------------------------------------------------------ Exec

    async fn do_exec(&self, req: api::ExecProcessRequest) -> Result<()> {
        let c = self.get(&req.id)?;
        let mut c = c.lock().await;
        if req.exec_id.is_empty() {
            return Err(ShimError::invalid("exec_id", "must not be empty"));
        }
        if c.execs.contains_key(&req.exec_id) {
            return Err(ShimError::ProcessExists {
                id: c.id.clone(),
                exec_id: req.exec_id,
            });
        }
        if c.init.state == ProcState::Stopped {
            return Err(ShimError::FailedPrecondition {
                action: "exec in",
                id: c.id.clone(),
                state: "stopped",
            });
        }
        let spec = req
            .spec
            .as_ref()
            .map(|s| s.value.clone())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| ShimError::invalid("spec", "the exec process has no spec"))?;
        serde_json::from_slice::<serde_json::Value>(&spec)
            .map_err(|e| ShimError::invalid("spec", format!("not a JSON process spec: {e}")))?;
        let mut p = Process::new(StdioSpec {
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            terminal: req.terminal,
        });
        p.exec_spec = Some(spec);
        c.execs.insert(req.exec_id.clone(), p);
        let id = c.id.clone();
        drop(c);
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: id,
                exec_id: req.exec_id,
                ..Default::default()
            }),
        )
        .await;
        Ok(())
    }

    // ------------------------------------------------------------ Kill, Wait, State

    async fn do_kill(&self, req: api::KillRequest) -> Result<()> {
        let c = self.get(&req.id)?;
        let c = c.lock().await;
        let label = c.label(&req.exec_id);
        let p = c.process(&req.exec_id)?;
        match p.state {
            ProcState::Stopped => return Err(ShimError::ProcessExited(label)),
            ProcState::Created if !req.exec_id.is_empty() => {
                return Err(ShimError::FailedPrecondition {
                    action: "signal",
                    id: label,
                    state: "created",
                })
            }
            _ => {}
        }
        if req.exec_id.is_empty() {
            let runc = c.runc.clone();
            let id = c.id.clone();
            drop(c);
            return match runc.kill(&id, req.signal, req.all).await {
                // runc says "not running" once init is gone: the exit is on its way.
                Err(ShimError::Runc { message, .. }) if message.contains("not running") => {
                    Err(ShimError::ProcessExited(id))
                }
                r => r,
            };
        }
        let sig = nix::sys::signal::Signal::try_from(req.signal as i32)
            .map_err(|_| ShimError::invalid("signal", format!("{} is not a signal", req.signal)))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid as i32), sig).map_err(|e| {
            if e == nix::errno::Errno::ESRCH {
                ShimError::ProcessExited(label.clone())
            } else {
                ShimError::io(
                    format!("cannot signal process {label} (pid {})", p.pid),
                    e.into(),
                )
            }
        })
    }

    async fn do_wait(&self, req: api::WaitRequest) -> Result<api::WaitResponse> {
        let mut rx = {
            let c = self.get(&req.id)?;
            let c = c.lock().await;
            c.process(&req.exec_id)?.exit.subscribe()
        };
        let exit = match rx.wait_for(Option::is_some).await {
            Ok(e) => e.expect("waited for Some"),
            // The process was deleted without an exit (created, then deleted).
            Err(_) => Exit {
                pid: 0,
                status: KILLED_STATUS,
                at: SystemTime::now(),
            },
        };
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn do_state(&self, req: api::StateRequest) -> Result<api::StateResponse> {
        let c = self.get(&req.id)?;
        let c = c.lock().await;
        let status = c.status(&req.exec_id)?;
        let p = c.process(&req.exec_id)?;
        let exit = p.exited();
        Ok(api::StateResponse {
            id: if req.exec_id.is_empty() {
                c.id.clone()
            } else {
                req.exec_id.clone()
            },
            bundle: c.bundle.to_string_lossy().into_owned(),
            pid: p.pid,
            status: status.into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.map(|e| e.status).unwrap_or(0),
            exited_at: match exit {
                Some(e) => MessageField::some(timestamp(e.at)),
                None => MessageField::none(),
            },
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    // ------------------------------------------------------------ Pause, Resume, Pids, Stats, Update

    async fn do_pause(&self, req: api::PauseRequest) -> Result<()> {
        let c = self.get(&req.id)?;
        let mut c = c.lock().await;
        if c.init.state != ProcState::Running || c.paused {
            return Err(ShimError::FailedPrecondition {
                action: "pause",
                id: c.id.clone(),
                state: if c.paused {
                    "paused"
                } else {
                    c.init.state.name()
                },
            });
        }
        c.runc.pause(&c.id).await?;
        c.paused = true;
        self.publish(
            topics::TASK_PAUSED_EVENT_TOPIC,
            Box::new(TaskPaused {
                container_id: c.id.clone(),
                ..Default::default()
            }),
        )
        .await;
        info!("container {} paused", c.id);
        Ok(())
    }

    async fn do_resume(&self, req: api::ResumeRequest) -> Result<()> {
        let c = self.get(&req.id)?;
        let mut c = c.lock().await;
        if !c.paused {
            return Err(ShimError::FailedPrecondition {
                action: "resume",
                id: c.id.clone(),
                state: c.init.state.name(),
            });
        }
        c.runc.resume(&c.id).await?;
        c.paused = false;
        self.publish(
            topics::TASK_RESUMED_EVENT_TOPIC,
            Box::new(TaskResumed {
                container_id: c.id.clone(),
                ..Default::default()
            }),
        )
        .await;
        info!("container {} resumed", c.id);
        Ok(())
    }

    async fn do_pids(&self, req: api::PidsRequest) -> Result<api::PidsResponse> {
        let (runc, execs) = {
            let c = self.get(&req.id)?;
            let c = c.lock().await;
            let execs: HashMap<u32, String> = c
                .execs
                .iter()
                .filter(|(_, p)| p.pid != 0)
                .map(|(id, p)| (p.pid, id.clone()))
                .collect();
            (c.runc.clone(), execs)
        };
        let pids = runc.ps(&req.id).await?;
        let processes = pids
            .into_iter()
            .map(|pid| {
                let info = execs.get(&pid).and_then(|exec_id| {
                    let details = ProcessDetails {
                        exec_id: exec_id.clone(),
                        ..Default::default()
                    };
                    Some(Any {
                        type_url: PROCESS_DETAILS_TYPE.to_owned(),
                        value: details.write_to_bytes().ok()?,
                        ..Default::default()
                    })
                });
                ProcessInfo {
                    pid,
                    info: info.into(),
                    ..Default::default()
                }
            })
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn do_stats(&self, req: api::StatsRequest) -> Result<api::StatsResponse> {
        let c = self.get(&req.id)?;
        let c = c.lock().await;
        let cgroup = c
            .cgroup
            .as_ref()
            .ok_or_else(|| ShimError::FailedPrecondition {
                action: "read statistics of",
                id: c.id.clone(),
                state: "without a known cgroup",
            })?;
        let stats = cgroup
            .metrics()
            .map_err(|e| ShimError::io(format!("cannot read the cgroup of {}", c.id), e))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(stats),
            ..Default::default()
        })
    }

    async fn do_update(&self, req: api::UpdateTaskRequest) -> Result<()> {
        let c = self.get(&req.id)?;
        let c = c.lock().await;
        if c.init.state == ProcState::Stopped {
            return Err(ShimError::FailedPrecondition {
                action: "update",
                id: c.id.clone(),
                state: "stopped",
            });
        }
        let resources = req
            .resources
            .as_ref()
            .map(|r| r.value.clone())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| ShimError::invalid("resources", "missing"))?;
        serde_json::from_slice::<serde_json::Value>(&resources).map_err(|e| {
            ShimError::invalid("resources", format!("not JSON Linux resources: {e}"))
        })?;
        let file = c.bundle.join("update-resources.json");
        tokio::fs::write(&file, &resources)
            .await
            .map_err(|e| ShimError::io(format!("cannot write {}", file.display()), e))?;
        let r = c.runc.update(&c.id, &file).await;
        let _ = tokio::fs::remove_file(&file).await;
        r
    }

    async fn do_close_io(&self, req: api::CloseIORequest) -> Result<()> {
        let c = self.get(&req.id)?;
        let mut c = c.lock().await;
        let p = c.process_mut(&req.exec_id)?;
        if req.stdin {
            if let Some(io) = p.io.as_mut() {
                io.close_stdin();
            }
        }
        Ok(())
    }

    async fn do_resize_pty(&self, req: api::ResizePtyRequest) -> Result<()> {
        let c = self.get(&req.id)?;
        let c = c.lock().await;
        let label = c.label(&req.exec_id);
        let p = c.process(&req.exec_id)?;
        match &p.io {
            Some(io) => match io.resize(req.width, req.height) {
                Ok(true) => Ok(()),
                Ok(false) => Err(ShimError::FailedPrecondition {
                    action: "resize the terminal of",
                    id: label,
                    state: "without a terminal",
                }),
                Err(e) => Err(ShimError::io(
                    format!("cannot resize the terminal of {label}"),
                    e,
                )),
            },
            None => Err(ShimError::FailedPrecondition {
                action: "resize the terminal of",
                id: label,
                state: p.state.name(),
            }),
        }
    }

    async fn do_connect(&self, req: api::ConnectRequest) -> Result<api::ConnectResponse> {
        let c = self.get(&req.id)?;
        let pid = c.lock().await.init.pid;
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: pid,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        })
    }

    fn do_shutdown(&self, req: api::ShutdownRequest) {
        let empty = self
            .inner
            .containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        if req.now || (empty && self.inner.creating.load(Ordering::SeqCst) == 0) {
            info!("no container left: shim exits");
            self.inner.exit.signal();
        } else {
            debug!("shutdown for {}: containers remain, shim stays", req.id);
        }
    }
}

async fn read_pid(path: &Path) -> Result<u32> {
    let s = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| ShimError::io(format!("cannot read pid file {}", path.display()), e))?;
    s.trim().parse().map_err(|_| {
        ShimError::io(
            format!("pid file {} holds {:?}", path.display(), s.trim()),
            std::io::ErrorKind::InvalidData.into(),
        )
    })
}

/// Mounts containerd's rootfs mounts on `BUNDLE/rootfs`; `false` when there are none.
async fn mount_rootfs(
    bundle: &Path,
    mounts: &[containerd_shim_protos::types::mount::Mount],
) -> Result<bool> {
    if mounts.is_empty() {
        return Ok(false);
    }
    let target = bundle.join("rootfs");
    if let Err(e) = tokio::fs::create_dir(&target).await {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(ShimError::io(
                format!("cannot create {}", target.display()),
                e,
            ));
        }
    }
    for (i, m) in mounts.iter().enumerate() {
        if let Err(source) = containerd_shim::asynchronous::util::mount_rootfs(m, &target).await {
            if i > 0 {
                unmount_rootfs(bundle).await;
            }
            return Err(ShimError::Shim {
                context: format!(
                    "cannot mount {} {} on {}",
                    m.type_,
                    m.source,
                    target.display()
                ),
                source,
            });
        }
    }
    Ok(true)
}

/// Unmounts everything under `BUNDLE/rootfs` (lazily, so that deletion completes).
pub(crate) async fn unmount_rootfs(bundle: &Path) {
    let target = bundle.join("rootfs");
    let t = target.to_string_lossy().into_owned();
    let r = tokio::task::spawn_blocking(move || {
        containerd_shim::mount::umount_recursive(Some(&t), libc::MNT_DETACH)
    })
    .await;
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!("cannot unmount {}: {e}", target.display()),
        Err(e) => warn!("cannot unmount {}: {e}", target.display()),
    }
}

#[async_trait]
impl Task for TaskService {
    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        Ok(self.do_state(req).await?)
    }

    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let id = req.id.clone();
        self.do_create(req).await.map_err(|e| {
            warn!("create {id} failed: {}", e.chain());
            e.into()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        Ok(self.do_start(req).await?)
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        Ok(self.do_delete(req).await?)
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        Ok(self.do_pids(req).await?)
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.do_pause(req).await?;
        Ok(api::Empty::new())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        self.do_resume(req).await?;
        Ok(api::Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(ShimError::Unsupported("checkpoint").into())
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        self.do_kill(req).await?;
        Ok(api::Empty::new())
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        self.do_exec(req).await?;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        self.do_resize_pty(req).await?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        self.do_close_io(req).await?;
        Ok(api::Empty::new())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        self.do_update(req).await?;
        Ok(api::Empty::new())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        Ok(self.do_wait(req).await?)
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        Ok(self.do_stats(req).await?)
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        Ok(self.do_connect(req).await?)
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        self.do_shutdown(req);
        Ok(api::Empty::new())
    }
}
