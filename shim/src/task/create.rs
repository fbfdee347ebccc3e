//! The create pipeline, and its rollback.
//!
//! ```text
//! step                                     undone, when a later step fails, by
//! check the request                        -
//! options → config → spec → network role   -
//! mount the rootfs                         unmount
//! open stdio, runc create                  runc delete -f   (stdio closes with the error)
//! read the pid, start the stdio copies     -
//! record in the bundle                     remove the record
//! in the map, init's exit watched          out of the map
//! cgroup + OOM watch                       -                (a failure is logged)
//! ```
//!
//! A failing step undoes exactly what the steps before it did ([`Undo`]), so
//! a failed Create leaves no runc container, no record and no mount behind.
//! The undo order: the runc container first, then the record, the rootfs.
//!
//! The pod network of a network owner is set up when its task **starts**
//! ([`TaskService::start_network`]), not here: containerd's CRI runs CNI before
//! the create, but Docker configures the namespace of a container on one of its
//! networks during `runc create` (Docker 26: the `libnetwork-setkey` prestart
//! hook) or after the create returns (Docker 28: `SetKey` from the daemon, before
//! the start). At start every party has had its turn, so the setup sees a namespace
//! that is final, and refuses one that holds another's interface instead of
//! fighting over `eth0` with it.
//!
//! ```text
//! Start(init) of a network owner
//! pod network setup                        (a failed setup gives back what it made),
//!                                          SIGKILL init: Stopped (TaskExit), so that
//!                                          the caller deletes the task as usual
//! runc start                               -
//! ```
//!
//! A setup that fails gives back the NIC it made itself, and only that one: a
//! NIC the sandbox already had (nestless-cni's, in the CRI path) is not the
//! start's to release; CNI DEL releases it.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use containerd_shim::api;
use containerd_shim_protos::{events::task::TaskExit, protobuf::MessageField, topics};
use log::{info, warn};
use tokio::sync::{Mutex, MutexGuard, OwnedMutexGuard};

use super::{
    container::{
        started, timestamp, Container, OwnedNetwork, PendingNetwork, Process, KILLED_STATUS,
    },
    state::ProcState,
    TaskService,
};
use crate::{
    bundle::Record,
    cgroup::Cgroup,
    config::ShimConfig,
    error::{Result, ShimError},
    options::{RuncOptions, RuntimeOptions},
    podnet::PodNetRequest,
    policy::{self, NetnsSource, NetworkRole, SpecView},
    reaper::Exit,
    runc::{self, CreateOpts, RuncSettings, Runtime},
    stdio::{IoContext, PreparedIo, ProcessIo, StdioSpec},
};

/// Counts a create in flight for as long as it lives.
pub(super) struct CreatingGuard(Arc<AtomicUsize>);

impl CreatingGuard {
    fn new(c: &Arc<AtomicUsize>) -> Self {
        c.fetch_add(1, Ordering::SeqCst);
        Self(c.clone())
    }
}

impl Drop for CreatingGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A created container, still locked (an early exit of its init is handled
/// once the create event is out), and counted as being created.
pub(super) struct Created {
    pub(super) pid: u32,
    _container: OwnedMutexGuard<Container>,
    _creating: CreatingGuard,
}

/// What a create has done so far; [`Undo::run`] undoes it (runc container,
/// record, rootfs).
struct Undo<'a> {
    id: &'a str,
    bundle: &'a Path,
    rootfs_mounted: bool,
    runc: Option<&'a Arc<dyn Runtime>>,
    record: bool,
}

impl Undo<'_> {
    async fn run(self, svc: &TaskService) {
        let id = self.id;
        if let Some(runc) = self.runc {
            if let Err(e) = runc.delete(id, true).await {
                warn!("rollback of {id}: {}", e.chain());
            }
        }
        if self.record {
            Record::remove(self.bundle);
        }
        if self.rootfs_mounted {
            svc.inner.seams.rootfs.unmount(self.bundle).await;
        }
    }
}

impl TaskService {
    /// Creates container `req.id`: the pipeline of this module's table.
    pub(super) async fn create_container(&self, req: &api::CreateTaskRequest) -> Result<Created> {
        let creating = CreatingGuard::new(&self.inner.creating);
        let id = req.id.clone();
        if id.is_empty() || id.contains('/') {
            return Err(ShimError::invalid(
                "id",
                format!("{id:?} is not a container id"),
            ));
        }
        if self.container(&id).is_ok() {
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
        let role = policy::network_role(&id, &spec, &self.inner.namespace);
        let network = match &role {
            NetworkRole::Owner { sandbox, netns } => Some((
                sandbox.clone(),
                netns.clone(),
                (self.inner.seams.network)(&config),
            )),
            NetworkRole::Nothing => None,
        };
        let settings = self.runc_settings(&config, options.runc.as_ref());
        let runc = (self.inner.seams.runtime)(&settings);
        let runc_opts = options.runc.clone().unwrap_or_default();
        let stdio = StdioSpec {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let io_context = IoContext {
            container_id: id.clone(),
            namespace: self.inner.namespace.clone(),
        };

        let mut undo = Undo {
            id: &id,
            bundle: &bundle,
            rootfs_mounted: false,
            runc: None,
            record: false,
        };
        let rootfs_mounted = self.inner.seams.rootfs.mount(&bundle, &req.rootfs).await?;
        undo.rootfs_mounted = rootfs_mounted;

        let (pid, io) = match self
            .runc_create(&id, &bundle, &runc, &runc_opts, &stdio, &io_context)
            .await
        {
            Ok(created) => created,
            Err(e) => {
                undo.run(self).await;
                return Err(e);
            }
        };
        undo.runc = Some(&runc);

        let record = Record {
            runc_binary: settings.binary.clone(),
            runc_root: settings.root.clone(),
            systemd_cgroup: settings.systemd_cgroup,
            config_path: config.source.clone(),
            network_sandbox: network.as_ref().map(|(sandbox, ..)| sandbox.id.clone()),
            network_scope: network
                .as_ref()
                .map(|(sandbox, ..)| sandbox.scope.clone())
                .unwrap_or_default(),
            rootfs_mounted,
        };
        undo.record = true;
        if let Err(e) = record.store(&bundle) {
            undo.run(self).await;
            return Err(e);
        }

        let mut init = Process::new(stdio);
        init.pid = pid;
        init.io = Some(io);
        let container = Arc::new(Mutex::new(Container {
            id: id.clone(),
            bundle: bundle.clone(),
            runc: runc.clone(),
            init,
            execs: HashMap::new(),
            cgroup: None,
            oom: None,
            network: None,
            pending_network: None,
            rootfs_mounted,
            gone: false,
            io_context,
            reaper: self.inner.reaper.clone(),
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

        // The pod network is set up when the task starts (see `start_network`): by then
        // every other party that configures the namespace has had its turn.
        if let Some((sandbox, netns, backend)) = network {
            c.pending_network = Some(PendingNetwork {
                req: PodNetRequest {
                    exclusive: !matches!(netns, NetnsSource::Path(_)),
                    sandbox,
                    netns: netns.path(pid),
                    labels: policy::network_labels(&spec, &self.inner.namespace),
                },
                backend,
            });
        }

        match Cgroup::of_pid(pid) {
            Ok(cg) => {
                c.oom = self.watch_oom(&id, &cg);
                c.cgroup = Some(cg);
            }
            Err(e) => warn!("container {id}: cannot find its cgroup: {e}"),
        }
        Ok(Created {
            pid,
            _container: c,
            _creating: creating,
        })
    }

    /// The pod network step of a network owner, run by Start before `runc start`.
    /// On failure (the setup has given back what it made) the init is killed and marked Stopped
    /// (one TaskExit, status 137), so that containerd, ctr, Docker or CRI delete the
    /// task as after any failed start; the error names the sandbox and the cause.
    pub(super) async fn start_network(&self, c: &mut MutexGuard<'_, Container>) -> Result<()> {
        let Some(PendingNetwork { req, backend }) = c.pending_network.take() else {
            return Ok(());
        };
        let id = c.id.clone();
        match backend.setup(&req).await {
            Ok(info) => {
                if !info.interface.is_empty() {
                    info!(
                        "sandbox {}: {} {} {} in {}",
                        req.sandbox,
                        info.interface,
                        info.mac,
                        info.addresses.join(","),
                        req.netns.display()
                    );
                }
                c.network = Some(OwnedNetwork {
                    sandbox: req.sandbox,
                    backend,
                });
                Ok(())
            }
            Err(source) => {
                let pid = c.init.pid;
                if let Err(e) = c.runc.kill(&id, libc::SIGKILL as u32, false).await {
                    warn!("start {id}: cannot kill the init process: {}", e.chain());
                }
                // Stopped now, whatever the reaper says later (an exit of a stopped
                // process is not news); then gone from the kernel, so that `runc delete`
                // finds the container stopped.
                let exit = Exit {
                    pid,
                    status: KILLED_STATUS,
                    at: std::time::SystemTime::now(),
                };
                c.init.state = ProcState::Stopped;
                c.init.exit.send_replace(Some(exit));
                self.publish(
                    topics::TASK_EXIT_EVENT_TOPIC,
                    TaskExit {
                        container_id: id.clone(),
                        id: id.clone(),
                        pid,
                        exit_status: KILLED_STATUS,
                        exited_at: MessageField::some(timestamp(exit.at)),
                        ..Default::default()
                    },
                )
                .await;
                wait_gone(pid).await;
                let e = ShimError::Network {
                    sandbox_id: req.sandbox.to_string(),
                    source: Box::new(source),
                };
                warn!("start {id}: {}", e.chain());
                Err(e)
            }
        }
    }

    /// How runc runs for a container: `[runc]` of the config, overridden by runc options.
    fn runc_settings(&self, config: &ShimConfig, opts: Option<&RuncOptions>) -> RuncSettings {
        let binary = opts
            .and_then(|o| o.binary_name.clone())
            .unwrap_or_else(|| config.runc.binary.clone());
        let root = opts
            .and_then(|o| o.root.clone())
            .unwrap_or_else(|| config.runc.root.clone());
        let systemd_cgroup = config.runc.systemd_cgroup || opts.is_some_and(|o| o.systemd_cgroup);
        RuncSettings {
            binary,
            root: runc::namespaced_root(&root, &self.inner.namespace),
            systemd_cgroup,
        }
    }

    /// Opens the stdio, runs `runc create`, reads the pid and starts the
    /// copies; removes the runc container again if a step after `runc
    /// create` fails.
    async fn runc_create(
        &self,
        id: &str,
        bundle: &Path,
        runc: &Arc<dyn Runtime>,
        opts: &RuncOptions,
        stdio: &StdioSpec,
        io_context: &IoContext,
    ) -> Result<(u32, ProcessIo)> {
        let mut prepared = PreparedIo::prepare(stdio, io_context, &self.inner.reaper).await?;
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
        let started = started(&pid_file, console, prepared).await;
        if started.is_err() {
            if let Err(e) = runc.delete(id, true).await {
                warn!("cannot remove half-created container {id}: {e}");
            }
        }
        started
    }
}

/// Waits (up to 5 s) until `pid` is gone: killed and reaped by the shim's reaper.
async fn wait_gone(pid: u32) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    // SAFETY: kill(2) with signal 0 only checks for the process.
    while unsafe { libc::kill(pid as i32, 0) } == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
