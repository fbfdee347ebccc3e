//! One container as the task service keeps it: its init process, its exec
//! processes, and what it holds (runc, cgroup, OOM watcher, pod network,
//! mounted rootfs). Each process's state follows [`super::state`]; every
//! "may this process do that now?" goes through [`Container::next`].

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use tokio::{sync::watch, task::JoinHandle};

use super::state::{self, Kind, Op, ProcState, Refused};
use crate::{
    cgroup::Cgroup,
    error::{Result, ShimError},
    podnet::PodNetwork,
    reaper::{Exit, Reaper},
    runc::Runtime,
    stdio::{ConsoleSocket, IoContext, PreparedIo, ProcessIo, StdioSpec},
};

/// Exit status reported for a process the shim had to kill (SIGKILL).
pub(super) const KILLED_STATUS: u32 = 128 + 9;

/// A point in time as the task API carries it.
pub(super) fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

/// A container's init process or one of its exec processes.
pub(super) struct Process {
    pub(super) pid: u32,
    pub(super) state: ProcState,
    pub(super) exit: watch::Sender<Option<Exit>>,
    pub(super) stdio: StdioSpec,
    pub(super) io: Option<ProcessIo>,
    /// The process spec (JSON) of an exec process not yet started.
    pub(super) exec_spec: Option<Vec<u8>>,
}

impl Process {
    pub(super) fn new(stdio: StdioSpec) -> Self {
        Self {
            pid: 0,
            state: ProcState::Created,
            exit: watch::channel(None).0,
            stdio,
            io: None,
            exec_spec: None,
        }
    }

    pub(super) fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }
}

/// A pod network the container owns.
pub(super) struct OwnedNetwork {
    pub(super) sandbox: crate::podnet::SandboxRef,
    pub(super) backend: Arc<dyn PodNetwork>,
}

/// The pod network a network owner gets when it starts.
pub(super) struct PendingNetwork {
    pub(super) req: crate::podnet::PodNetRequest,
    pub(super) backend: Arc<dyn PodNetwork>,
}

/// One container.
pub(super) struct Container {
    pub(super) id: String,
    pub(super) bundle: PathBuf,
    pub(super) runc: Arc<dyn Runtime>,
    pub(super) init: Process,
    pub(super) execs: HashMap<String, Process>,
    pub(super) cgroup: Option<Cgroup>,
    pub(super) oom: Option<JoinHandle<()>>,
    pub(super) network: Option<OwnedNetwork>,
    /// The pod network still to set up at start (a network owner, created, not started).
    pub(super) pending_network: Option<PendingNetwork>,
    pub(super) rootfs_mounted: bool,
    /// Set once the container is deleted (or its creation rolled back).
    pub(super) gone: bool,
    /// What the stdio of its processes is opened with.
    pub(super) io_context: IoContext,
    pub(super) reaper: Reaper,
}

impl Container {
    pub(super) fn process(&self, exec_id: &str) -> Result<&Process> {
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

    pub(super) fn process_mut(&mut self, exec_id: &str) -> Result<&mut Process> {
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

    /// The container id, or `container/exec` for an exec process.
    pub(super) fn label(&self, exec_id: &str) -> String {
        if exec_id.is_empty() {
            self.id.clone()
        } else {
            format!("{}/{exec_id}", self.id)
        }
    }

    /// The state `op` takes process `exec_id` to (see [`state::transition`]);
    /// the refusal as containerd should see it.
    pub(super) fn next(&self, exec_id: &str, op: Op) -> Result<ProcState> {
        let p = self.process(exec_id)?;
        state::transition(Kind::of(exec_id), p.state, op)
            .map_err(|r| refusal(r, self.label(exec_id)))
    }
}

/// A refused operation as a [`ShimError`]: signalling a process that exited
/// is `NOT_FOUND` (containerd counts it as done), anything else a failed
/// precondition.
pub(super) fn refusal(r: Refused, label: String) -> ShimError {
    match r {
        Refused {
            op: Op::Signal,
            state: ProcState::Stopped,
        } => ShimError::ProcessExited(label),
        Refused { op, state } => ShimError::FailedPrecondition {
            action: op.action(),
            id: label,
            state: state.name(),
        },
    }
}

/// After `runc create` or `runc exec`: the pid runc wrote into `pid_file`,
/// the terminal's master (with a terminal), and the stdio copies started.
pub(super) async fn started(
    pid_file: &Path,
    console: Option<ConsoleSocket>,
    prepared: PreparedIo,
) -> Result<(u32, ProcessIo)> {
    let pid = read_pid(pid_file).await?;
    let master = match console {
        Some(c) => Some(c.receive().await?),
        None => None,
    };
    Ok((pid, prepared.start(master)?))
}

/// Reads the pid runc wrote into `path`.
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
