//! The operations on a created container and its processes: start, exec,
//! kill, wait, state, pause/resume, pids, stats, update, close_io,
//! resize_pty. Each asks [`Container::next`] first, so the state table of
//! [`super::state`] decides what is allowed.
//!
//! ```text
//! Exec(id, exec, spec)  ─▶ an exec process in Created (spec kept)
//! Start(id, exec)       ─▶ process.json ─▶ runc exec --detach ─▶ pid file ─▶ Running
//! Start(id)             ─▶ runc start ─▶ Running
//! Kill(id)              ─▶ runc kill (init) / kill(2) (exec)
//! Pause / Resume        ─▶ runc pause / resume ─▶ Paused / Running
//! ```

use std::{collections::HashMap, sync::Arc, time::SystemTime};

use containerd_shim::api;
use containerd_shim_protos::{
    protobuf::{well_known_types::any::Any, Message, MessageField},
    shim::oci::ProcessDetails,
    types::task::ProcessInfo,
};
use tokio::sync::Mutex;

use super::{
    container::{started, timestamp, Container, Process, KILLED_STATUS},
    state::Op,
};
use crate::{
    error::{Result, ShimError},
    reaper::Exit,
    runc::{ExecOpts, Runtime},
    stdio::{PreparedIo, ProcessIo, StdioSpec},
};

/// Type URL of the per-pid details in Pids.
const PROCESS_DETAILS_TYPE: &str = "containerd.runc.v1.ProcessDetails";

impl Container {
    /// Starts the init process (`runc start`) or an added exec process
    /// (`runc exec`); returns its pid.
    pub(super) async fn start(&mut self, exec_id: &str) -> Result<u32> {
        if exec_id.is_empty() {
            let to = self.next("", Op::Start)?;
            self.runc.start(&self.id).await?;
            self.init.state = to;
            return Ok(self.init.pid);
        }
        self.next("", Op::StartExec)?;
        let to = self.next(exec_id, Op::Start)?;
        let p = self.process(exec_id)?;
        let stdio = p.stdio.clone();
        let spec = p.exec_spec.clone().unwrap_or_default();
        let (pid, io) = self.runc_exec(exec_id, &spec, &stdio).await?;
        let p = self.process_mut(exec_id)?;
        p.pid = pid;
        p.state = to;
        p.io = Some(io);
        p.exec_spec = None;
        Ok(pid)
    }

    /// Writes the process spec, runs `runc exec --detach`, reads the pid and
    /// starts the copies; the files go again either way.
    async fn runc_exec(
        &self,
        exec_id: &str,
        spec: &[u8],
        stdio: &StdioSpec,
    ) -> Result<(u32, ProcessIo)> {
        let base = self.bundle.join(format!("exec-{exec_id}"));
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
            let mut prepared = PreparedIo::prepare(stdio, &self.io_context, &self.reaper).await?;
            let console = prepared.console.take();
            self.runc
                .exec(
                    &self.id,
                    &ExecOpts {
                        process: &process,
                        pid_file: &pid_file,
                        console_socket: console.as_ref().map(|c| c.path()),
                        log: &log,
                    },
                    std::mem::take(&mut prepared.child),
                )
                .await?;
            started(&pid_file, console, prepared).await
        }
        .await;
        cleanup().await;
        result
    }

    /// Adds exec process `req.exec_id`, not started yet.
    pub(super) fn add_exec(&mut self, req: &api::ExecProcessRequest) -> Result<()> {
        if req.exec_id.is_empty() {
            return Err(ShimError::invalid("exec_id", "must not be empty"));
        }
        if self.execs.contains_key(&req.exec_id) {
            return Err(ShimError::ProcessExists {
                id: self.id.clone(),
                exec_id: req.exec_id.clone(),
            });
        }
        self.next("", Op::AddExec)?;
        let spec = req
            .spec
            .as_ref()
            .map(|s| s.value.clone())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| ShimError::invalid("spec", "the exec process has no spec"))?;
        serde_json::from_slice::<serde_json::Value>(&spec)
            .map_err(|e| ShimError::invalid("spec", format!("not a JSON process spec: {e}")))?;
        let mut p = Process::new(StdioSpec {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        });
        p.exec_spec = Some(spec);
        self.execs.insert(req.exec_id.clone(), p);
        Ok(())
    }

    /// The task API's view of process `exec_id`.
    pub(super) fn state(&self, exec_id: &str) -> Result<api::StateResponse> {
        let p = self.process(exec_id)?;
        let exit = p.exited();
        Ok(api::StateResponse {
            id: if exec_id.is_empty() {
                self.id.clone()
            } else {
                exec_id.to_owned()
            },
            bundle: self.bundle.to_string_lossy().into_owned(),
            pid: p.pid,
            status: p.state.status().into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.map(|e| e.status).unwrap_or(0),
            exited_at: match exit {
                Some(e) => MessageField::some(timestamp(e.at)),
                None => MessageField::none(),
            },
            exec_id: exec_id.to_owned(),
            ..Default::default()
        })
    }

    /// Freezes the container (`runc pause`).
    pub(super) async fn pause(&mut self) -> Result<()> {
        let to = self.next("", Op::Pause)?;
        self.runc.pause(&self.id).await?;
        self.init.state = to;
        Ok(())
    }

    /// Thaws the container (`runc resume`).
    pub(super) async fn resume(&mut self) -> Result<()> {
        let to = self.next("", Op::Resume)?;
        self.runc.resume(&self.id).await?;
        self.init.state = to;
        Ok(())
    }

    /// The container's cgroup statistics.
    pub(super) fn stats(&self) -> Result<api::StatsResponse> {
        let cgroup = self
            .cgroup
            .as_ref()
            .ok_or_else(|| ShimError::FailedPrecondition {
                action: "read statistics of",
                id: self.id.clone(),
                state: "without a known cgroup",
            })?;
        let stats = cgroup
            .metrics()
            .map_err(|e| ShimError::io(format!("cannot read the cgroup of {}", self.id), e))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(stats),
            ..Default::default()
        })
    }

    /// New resources for the container (`runc update`).
    pub(super) async fn update(&self, req: &api::UpdateTaskRequest) -> Result<()> {
        self.next("", Op::Update)?;
        let resources = req
            .resources
            .as_ref()
            .map(|r| r.value.clone())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| ShimError::invalid("resources", "missing"))?;
        serde_json::from_slice::<serde_json::Value>(&resources).map_err(|e| {
            ShimError::invalid("resources", format!("not JSON Linux resources: {e}"))
        })?;
        let file = self.bundle.join("update-resources.json");
        tokio::fs::write(&file, &resources)
            .await
            .map_err(|e| ShimError::io(format!("cannot write {}", file.display()), e))?;
        let r = self.runc.update(&self.id, &file).await;
        let _ = tokio::fs::remove_file(&file).await;
        r
    }

    /// Closes the stdin of process `exec_id` (when asked to).
    pub(super) fn close_io(&mut self, exec_id: &str, stdin: bool) -> Result<()> {
        let p = self.process_mut(exec_id)?;
        if stdin {
            if let Some(io) = p.io.as_mut() {
                io.close_stdin();
            }
        }
        Ok(())
    }

    /// Resizes the terminal of process `exec_id`.
    pub(super) fn resize_pty(&self, exec_id: &str, width: u32, height: u32) -> Result<()> {
        let label = self.label(exec_id);
        let p = self.process(exec_id)?;
        match &p.io {
            Some(io) => match io.resize(width, height) {
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
}

/// Signals process `exec_id` of `c`: the container through `runc kill`
/// (outside the lock), an exec process with kill(2).
pub(super) async fn kill(
    c: &Mutex<Container>,
    exec_id: &str,
    signal: u32,
    all: bool,
) -> Result<()> {
    let c = c.lock().await;
    c.next(exec_id, Op::Signal)?;
    if exec_id.is_empty() {
        let runc = c.runc.clone();
        let id = c.id.clone();
        drop(c);
        return kill_container(runc.as_ref(), &id, signal, all).await;
    }
    let label = c.label(exec_id);
    let pid = c.process(exec_id)?.pid;
    signal_process(&label, pid, signal)
}

async fn kill_container(runc: &dyn Runtime, id: &str, signal: u32, all: bool) -> Result<()> {
    match runc.kill(id, signal, all).await {
        // runc says "not running" once init is gone: the exit is on its way.
        Err(ShimError::Runc { message, .. }) if message.contains("not running") => {
            Err(ShimError::ProcessExited(id.to_owned()))
        }
        r => r,
    }
}

fn signal_process(label: &str, pid: u32, signal: u32) -> Result<()> {
    let sig = nix::sys::signal::Signal::try_from(signal as i32)
        .map_err(|_| ShimError::invalid("signal", format!("{signal} is not a signal")))?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).map_err(|e| {
        if e == nix::errno::Errno::ESRCH {
            ShimError::ProcessExited(label.to_owned())
        } else {
            ShimError::io(
                format!("cannot signal process {label} (pid {pid})"),
                e.into(),
            )
        }
    })
}

/// Waits, outside the lock, until process `exec_id` of `c` has exited.
pub(super) async fn wait(c: &Mutex<Container>, exec_id: &str) -> Result<api::WaitResponse> {
    let mut rx = c.lock().await.process(exec_id)?.exit.subscribe();
    let exit = match rx.wait_for(Option::is_some).await.map(|e| *e) {
        Ok(Some(e)) => e,
        // The process was deleted without an exit (created, then deleted).
        Ok(None) | Err(_) => Exit {
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

/// The container's processes (`runc ps`, outside the lock), with the exec id
/// of those the shim started.
pub(super) async fn pids(c: &Arc<Mutex<Container>>) -> Result<api::PidsResponse> {
    let (runc, id, execs) = {
        let c = c.lock().await;
        let execs: HashMap<u32, String> = c
            .execs
            .iter()
            .filter(|(_, p)| p.pid != 0)
            .map(|(id, p)| (p.pid, id.clone()))
            .collect();
        (c.runc.clone(), c.id.clone(), execs)
    };
    let processes = runc
        .ps(&id)
        .await?
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
