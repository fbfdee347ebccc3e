//! The shim's bootstrap: containerd's `start` and `delete` subcommands, and
//! the serving process (built on the containerd-shim crate's `run`).
//!
//! `start` (run by containerd in a container's bundle, once per container):
//!
//! ```text
//! containerd --start -id C--> shim(start) : options from stdin, spec from ./config.json
//!                                           group = io.kubernetes.cri.sandbox-id, else C
//!                                           socket = hash(containerd address, namespace, group)
//!               socket already served? ----> yes: print its address (one shim per pod)
//!                                        `-> no: spawn shim(serve -socket ...) in its own process
//!                                                group, wait until it listens, move it to
//!                                                shim_cgroup, raise its oom_score_adj, print
//!                                                the address
//! containerd <-- address (stdout) ---------
//! ```
//!
//! `delete` (run by containerd when a shim died, in the bundle): reads the
//! record the serving shim wrote ([`crate::bundle::Record`]), force-deletes
//! the runc container, unmounts the rootfs and releases the pod network.
//!
//! Serving: the crate binds the socket, connects the event publisher and
//! serves [`TaskService`] until [`ExitSignal`] is signalled (Shutdown with no
//! container left). The crate's own reaper is turned off: [`Reaper`] reaps.

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use containerd_shim::{
    asynchronous::{ExitSignal, Shim},
    publisher::RemotePublisher,
    Config, DeleteResponse, Error, Flags, StartOpts,
};
use containerd_shim_protos::protobuf::{well_known_types::timestamp::Timestamp, MessageField};
use log::{info, warn};
use tokio::io::AsyncReadExt;

use crate::{
    bundle::Record,
    config::ShimConfig,
    events::{ContainerdEvents, EventSink},
    options::RuntimeOptions,
    podnet,
    policy::{self, SpecView},
    reaper::Reaper,
    runc::{self, Runc, Runtime},
    task::{rootfs, TaskService},
};

/// The runtime name containerd knows this shim by.
pub const RUNTIME_NAME: &str = "io.containerd.nestless.v2";

/// How long `start` waits for the serving shim to listen.
const SERVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an ending shim waits for its queued events to reach containerd.
const EVENTS_FLUSH: Duration = Duration::from_secs(5);

/// The containerd-shim crate configuration for this shim: no crate reaper
/// (ours reaps), the log level of `/etc/nestless/shim.toml` if it is readable.
pub fn crate_config() -> Config {
    let level = ShimConfig::resolve(None)
        .map(|c| c.log_level)
        .unwrap_or(log::LevelFilter::Info);
    Config {
        no_reaper: true,
        default_log_level: level.to_string().to_lowercase(),
        ..Default::default()
    }
}

/// The shim, as the containerd-shim crate drives it.
pub struct NestlessShim {
    exit: Arc<ExitSignal>,
    id: String,
    namespace: String,
    bundle: String,
    /// The serving socket (`-socket`), removed on exit.
    socket: String,
    /// The events to containerd, flushed before the shim exits.
    events: std::sync::OnceLock<Arc<ContainerdEvents>>,
}

fn other(msg: String) -> Error {
    Error::Other(msg)
}

#[async_trait]
impl Shim for NestlessShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        if args.action == "delete" {
            // stdout carries the response; logs go to stderr, which containerd logs.
            let _ = log::set_boxed_logger(Box::new(StderrLogger));
            log::set_max_level(log::LevelFilter::Info);
        }
        Self {
            exit: Arc::new(ExitSignal::default()),
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            bundle: args.bundle.clone(),
            socket: args.socket.clone(),
            events: std::sync::OnceLock::new(),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let mut stdin = Vec::new();
        let _ = tokio::io::stdin().read_to_end(&mut stdin).await;
        let options = RuntimeOptions::from_any_bytes(&stdin).map_err(|e| other(e.chain()))?;

        let spec = match tokio::fs::read("config.json").await {
            Ok(data) => SpecView::from_json(&data)
                .map_err(|e| other(format!("cannot parse config.json of {}: {e}", opts.id)))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => SpecView::default(),
            Err(e) => {
                return Err(other(format!(
                    "cannot read config.json of {}: {e}",
                    opts.id
                )))
            }
        };
        let group = policy::grouping_id(&opts.id, &spec);
        let address = containerd_shim::socket_address(&opts.address, &opts.namespace, group);
        let path = socket_path(&address).to_owned();

        if socket_serves(&path) {
            write_address(&address).await?;
            return Ok(address);
        }

        let exe = std::env::current_exe()
            .map_err(|e| other(format!("cannot find the shim binary: {e}")))?;
        let mut cmd = std::process::Command::new(exe);
        cmd.args([
            "-namespace",
            &opts.namespace,
            "-id",
            &opts.id,
            "-address",
            &opts.address,
            "-socket",
            &address,
        ]);
        if opts.debug {
            cmd.arg("-debug");
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            // Signals to containerd's process group must not reach the shim.
            .process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(|e| other(format!("cannot start the serving shim: {e}")))?;
        let pid = child.id();
        // The serving shim closes its stdout once it listens (or dies).
        let stdout = child.stdout.take().expect("piped");
        let mut out = tokio::net::unix::pipe::Receiver::from_owned_fd(stdout.into())
            .map_err(|e| other(format!("cannot read the serving shim's stdout: {e}")))?;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(SERVE_TIMEOUT, out.read_to_end(&mut sink)).await;
        if !socket_serves(&path) {
            let _ = child.kill();
            let ended = match child.wait() {
                Ok(status) => status.to_string(),
                Err(e) => format!("cannot wait for it: {e}"),
            };
            return Err(other(format!(
                "the serving shim (pid {pid}) does not listen on {address} ({ended})"
            )));
        }

        if let Some(cg) = options.runc.as_ref().and_then(|r| r.shim_cgroup.as_deref()) {
            containerd_shim::cgroup::add_task_to_cgroup(cg, pid)?;
        }
        // Best effort: containerd reads this process's stdout and stderr as
        // the address, so there is nowhere to report a failure here.
        let _ = containerd_shim::cgroup::adjust_oom_score(pid);
        write_address(&address).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        let bundle = if self.bundle.is_empty() {
            std::env::current_dir().map_err(|e| other(format!("no bundle directory: {e}")))?
        } else {
            PathBuf::from(&self.bundle)
        };
        cleanup_dead_shim(&self.id, &self.namespace, &bundle).await;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Ok(DeleteResponse {
            pid: 0,
            exit_status: 128 + 9,
            exited_at: MessageField::some(Timestamp {
                seconds: now.as_secs() as i64,
                nanos: now.subsec_nanos() as i32,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
        // The last events (TaskExit, TaskDelete) must not go with the process.
        if let Some(events) = self.events.get() {
            if !events.flush(EVENTS_FLUSH).await {
                warn!(
                    "events still queued {} ms after shutdown: exiting without them",
                    EVENTS_FLUSH.as_millis()
                );
            }
        }
        // The crate removes the socket named in ./address, but the shim's
        // working directory is the first container's bundle, which may be
        // gone by now: remove it here, so that the next shim of the same
        // pod does not find a dead socket.
        if !self.socket.is_empty() {
            let _ = std::fs::remove_file(socket_path(&self.socket));
        }
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        let reaper = Reaper::start().expect("SIGCHLD handler on the shim's runtime");
        // Events go through our own forwarder (see `events`); the crate's
        // publisher connection is let go.
        let events = Arc::new(ContainerdEvents::start(
            publisher.address.clone(),
            self.namespace.clone(),
        ));
        let _ = self.events.set(events.clone());
        drop(publisher);
        TaskService::new(self.namespace.clone(), events, reaper, self.exit.clone())
    }
}

/// `delete` after a shim died: runc container, rootfs, pod network. Best effort, logged.
async fn cleanup_dead_shim(id: &str, namespace: &str, bundle: &Path) {
    let record = match Record::load(bundle) {
        Ok(r) => r,
        Err(e) => {
            warn!("{}", e.chain());
            None
        }
    };
    let config = match ShimConfig::resolve(record.as_ref().and_then(|r| r.config_path.as_deref())) {
        Ok(c) => c,
        Err(e) => {
            warn!(
                "{}; using the defaults",
                crate::error::ShimError::from(e).chain()
            );
            ShimConfig::default()
        }
    };
    let reaper = match Reaper::start() {
        Ok(r) => r,
        Err(e) => {
            warn!("cannot handle SIGCHLD: {e}");
            return;
        }
    };
    let runc = match &record {
        Some(r) => Runc::new(
            r.runc_binary.clone(),
            r.runc_root.clone(),
            r.systemd_cgroup,
            reaper,
        ),
        None => Runc::new(
            config.runc.binary.clone(),
            runc::namespaced_root(&config.runc.root, namespace),
            config.runc.systemd_cgroup,
            reaper,
        ),
    };
    // containerd runs `delete` whenever a shim disconnects, after clean
    // deletions too: only a container runc still knows needs removing.
    if runc.root.join(id).exists() {
        match runc.delete(id, true).await {
            Ok(()) => info!("container {id} removed after its shim died"),
            Err(crate::error::ShimError::Runc {
                not_found: true, ..
            }) => {}
            Err(e) => warn!("{}", e.chain()),
        }
    }
    rootfs::unmount(bundle).await;
    if let Some(r) = record.as_ref() {
        if let Some(sandbox_id) = r.network_sandbox.as_deref() {
            let sandbox = podnet::SandboxRef::new(r.network_scope.clone(), sandbox_id);
            match podnet::from_config(&config).teardown(&sandbox).await {
                Ok(()) => info!("pod network of sandbox {sandbox} released"),
                Err(e) => warn!("cannot release the pod network of sandbox {sandbox}: {e}"),
            }
        }
    }
    Record::remove(bundle);
    // The dead shim's socket, unless a shim (of the same pod) still serves it.
    if let Ok(address) = std::fs::read_to_string(bundle.join("address")) {
        let path = socket_path(address.trim());
        if !path.is_empty() && !socket_serves(path) && std::fs::remove_file(path).is_ok() {
            info!("removed the dead shim's socket {path}");
        }
    }
}

fn socket_path(address: &str) -> &str {
    address.strip_prefix("unix://").unwrap_or(address)
}

/// Whether a shim answers on the unix socket at `path`.
fn socket_serves(path: &str) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// Writes `address` into `./address` (the bundle), as containerd's shims do.
async fn write_address(address: &str) -> Result<(), Error> {
    tokio::fs::write("address", address)
        .await
        .map_err(|e| other(format!("cannot write the address file: {e}")))
}

/// Logs to stderr (the `delete` subcommand).
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            eprintln!(
                "level={} msg=\"{}\"",
                r.level().as_str().to_lowercase(),
                r.args()
            );
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths() {
        assert_eq!(
            socket_path("unix:///run/containerd/s/abc"),
            "/run/containerd/s/abc"
        );
        assert_eq!(socket_path("/x"), "/x");
        assert!(!socket_serves("/nonexistent/socket"));
    }

    #[test]
    fn one_socket_per_pod() {
        let a = containerd_shim::socket_address(
            "/run/containerd/containerd.sock",
            "k8s.io",
            "sandbox1",
        );
        let b = containerd_shim::socket_address(
            "/run/containerd/containerd.sock",
            "k8s.io",
            "sandbox1",
        );
        let c = containerd_shim::socket_address(
            "/run/containerd/containerd.sock",
            "k8s.io",
            "sandbox2",
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
