//! The Task service (containerd's task API v2) over runc.
//!
//! One shim process serves every container of a pod (see [`crate::shim`]);
//! this service keeps them in a map, each behind its own async lock. A call
//! locks the one container it is about; calls on different containers do not
//! wait for one another.
//!
//! The [`Task`] face below only looks a container up, delegates one call and
//! publishes the event. The work lives beside it:
//!
//! | file | what |
//! |---|---|
//! | `container.rs` | [`Container`] and its processes |
//! | [`state`] | the process state table (`Created`, `Running`, `Paused`, `Stopped`) |
//! | `create.rs` | the create pipeline and its rollback |
//! | `delete.rs` | delete (an exec process, or the container and all it holds) |
//! | `process.rs` | start, exec, kill, wait, state, pause/resume, pids, stats, update, I/O |
//! | `exits.rs` | exit and OOM watchers, which publish their events |
//! | [`rootfs`] | mounting and unmounting the rootfs |
//!
//! Outside systems are reached through seams: runc through
//! [`crate::runc::Runtime`], mounts through [`rootfs::Rootfs`], the pod
//! network through [`crate::podnet::PodNetwork`]; unit tests put fakes there.
//!
//! A container's life, with the pod network hook:
//!
//! ```text
//! containerd          shim (this service)                    runc / PodNetwork
//!   | Create(id,bundle,rootfs,stdio,options)
//!   |------------------>| options -> config (config_path | /etc/nestless/shim.toml)
//!   |                   | spec -> network role, mount rootfs, open stdio
//!   |                   |------------ runc create --------------->| init exists, stopped
//!   |                   | record in bundle, watch init's exit
//!   |                   |   on failure: runc delete -f, unmount: nothing left
//!   |                   | cgroup + OOM watch, event TaskCreate
//!   |<------ pid -------|
//!   | Start(id)         |---- setup(sandbox, netns) (owner only) ->| NIC in the netns
//!   |                   |   on failure: (setup gave back what it made) kill init (Stopped, TaskExit)
//!   |                   |------------ runc start ---------------->|
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
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use async_trait::async_trait;
use containerd_shim::{api, asynchronous::ExitSignal, TtrpcResult};
use containerd_shim_protos::{
    events::task::{
        TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskIO, TaskPaused, TaskResumed,
        TaskStart,
    },
    protobuf::MessageField,
    shim_async::Task,
    topics,
    ttrpc::r#async::TtrpcContext,
};
use log::{debug, info, warn};
use tokio::sync::Mutex;

use crate::{
    config::ShimConfig,
    error::{Result, ShimError},
    events::{event_any, EventSink, TaskEvent},
    podnet::{self, PodNetwork},
    reaper::Reaper,
    runc::{Runc, RuncSettings, Runtime},
};

mod container;
mod create;
mod delete;
mod exits;
mod process;
pub mod rootfs;
pub mod state;
#[cfg(test)]
mod tests;

use container::{timestamp, Container};
use rootfs::{HostRootfs, Rootfs};

/// Builds the pod network backend a container's shim configuration asks for
/// ([`podnet::from_config`] in the shim; a fake in component tests).
pub type NetworkFactory = Arc<dyn Fn(&ShimConfig) -> Arc<dyn PodNetwork> + Send + Sync>;

/// Builds the runc driver for a container ([`Runc`] in the shim; a fake in unit tests).
type RuntimeFactory = Arc<dyn Fn(&RuncSettings) -> Arc<dyn Runtime> + Send + Sync>;

/// The outside systems the service works through.
struct Seams {
    network: NetworkFactory,
    runtime: RuntimeFactory,
    rootfs: Arc<dyn Rootfs>,
}

/// Shared state of the service.
struct Inner {
    namespace: String,
    events: Arc<dyn EventSink>,
    seams: Seams,
    reaper: Reaper,
    exit: Arc<ExitSignal>,
    containers: std::sync::Mutex<HashMap<String, Arc<Mutex<Container>>>>,
    /// Creates in flight (Shutdown does not end the shim under them).
    creating: Arc<AtomicUsize>,
}

/// The Task service; cheap to clone.
#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
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
        let runc_reaper = reaper.clone();
        let seams = Seams {
            network: network_backend,
            runtime: Arc::new(move |s: &RuncSettings| -> Arc<dyn Runtime> {
                Arc::new(Runc::new(
                    s.binary.clone(),
                    s.root.clone(),
                    s.systemd_cgroup,
                    runc_reaper.clone(),
                ))
            }),
            rootfs: Arc::new(HostRootfs),
        };
        Self::with_seams(namespace, events, reaper, exit, seams)
    }

    fn with_seams(
        namespace: String,
        events: Arc<dyn EventSink>,
        reaper: Reaper,
        exit: Arc<ExitSignal>,
        seams: Seams,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                namespace,
                events,
                seams,
                reaper,
                exit,
                containers: Default::default(),
                creating: Arc::new(AtomicUsize::new(0)),
            }),
        }
    }

    fn container(&self, id: &str) -> Result<Arc<Mutex<Container>>> {
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

    async fn publish<E: TaskEvent>(&self, topic: &str, event: E) {
        self.inner.events.publish(topic, event_any(&event)).await;
    }

    /// Ends the shim if asked to now, or once no container is left and none is being created.
    fn shutdown_when_idle(&self, req: &api::ShutdownRequest) {
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

#[async_trait]
impl Task for TaskService {
    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let c = self.container(&req.id)?;
        let c = c.lock().await;
        Ok(c.state(&req.exec_id)?)
    }

    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let created = self.create_container(&req).await.inspect_err(|e| {
            warn!("create {} failed: {}", req.id, e.chain());
        })?;
        let pid = created.pid;
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            TaskCreate {
                container_id: req.id.clone(),
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
            },
        )
        .await;
        info!("container {} created, init pid {pid}", req.id);
        drop(created);
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let c = self.container(&req.id)?;
        let mut c = c.lock().await;
        if req.exec_id.is_empty() {
            c.next("", state::Op::Start)?;
            self.start_network(&mut c).await?;
        }
        let pid = c.start(&req.exec_id).await?;
        if req.exec_id.is_empty() {
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                TaskStart {
                    container_id: c.id.clone(),
                    pid,
                    ..Default::default()
                },
            )
            .await;
            info!("container {} started", c.id);
        } else {
            self.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                TaskExecStarted {
                    container_id: c.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid,
                    ..Default::default()
                },
            )
            .await;
            self.watch_exit(&c.id, &req.exec_id, pid);
            debug!("process {} started, pid {pid}", c.label(&req.exec_id));
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let c = self.container(&req.id)?;
        let deleted = self.delete_process(&c, &req.exec_id).await?;
        let exited_at = MessageField::some(timestamp(deleted.at));
        if req.exec_id.is_empty() {
            self.publish(
                topics::TASK_DELETE_EVENT_TOPIC,
                TaskDelete {
                    container_id: req.id.clone(),
                    id: req.id.clone(),
                    pid: deleted.pid,
                    exit_status: deleted.status,
                    exited_at: exited_at.clone(),
                    ..Default::default()
                },
            )
            .await;
            info!("container {} deleted", req.id);
        }
        Ok(api::DeleteResponse {
            pid: deleted.pid,
            exit_status: deleted.status,
            exited_at,
            ..Default::default()
        })
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let c = self.container(&req.id)?;
        Ok(process::pids(&c).await?)
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        let mut c = c.lock().await;
        c.pause().await?;
        self.publish(
            topics::TASK_PAUSED_EVENT_TOPIC,
            TaskPaused {
                container_id: c.id.clone(),
                ..Default::default()
            },
        )
        .await;
        info!("container {} paused", c.id);
        Ok(api::Empty::new())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        let mut c = c.lock().await;
        c.resume().await?;
        self.publish(
            topics::TASK_RESUMED_EVENT_TOPIC,
            TaskResumed {
                container_id: c.id.clone(),
                ..Default::default()
            },
        )
        .await;
        info!("container {} resumed", c.id);
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
        let c = self.container(&req.id)?;
        process::kill(&c, &req.exec_id, req.signal, req.all).await?;
        Ok(api::Empty::new())
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        c.lock().await.add_exec(&req)?;
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            TaskExecAdded {
                container_id: req.id,
                exec_id: req.exec_id,
                ..Default::default()
            },
        )
        .await;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        c.lock()
            .await
            .resize_pty(&req.exec_id, req.width, req.height)?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        c.lock().await.close_io(&req.exec_id, req.stdin)?;
        Ok(api::Empty::new())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        c.lock().await.update(&req).await?;
        Ok(api::Empty::new())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let c = self.container(&req.id)?;
        Ok(process::wait(&c, &req.exec_id).await?)
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let c = self.container(&req.id)?;
        let c = c.lock().await;
        Ok(c.stats()?)
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let c = self.container(&req.id)?;
        let task_pid = c.lock().await.init.pid;
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        self.shutdown_when_idle(&req);
        Ok(api::Empty::new())
    }
}
