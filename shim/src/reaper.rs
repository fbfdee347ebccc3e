//! The shim's only reaper of child processes.
//!
//! The shim is a child subreaper (set by the containerd-shim crate), so it is
//! the parent of three kinds of processes: the runc commands it runs, the
//! container init processes (reparented when `runc create` exits) and the exec
//! processes (reparented when `runc exec --detach` exits). One task listens for
//! `SIGCHLD`, reaps every exited child with `waitpid(-1, WNOHANG)` and hands the
//! exit to whoever [watches](Reaper::watch) that pid.
//!
//! An exit can be reaped before anyone watches its pid: a container process
//! that dies before the `runc exec` that started it has returned and its pid
//! file has been read. Such exits are kept ("unclaimed") for a while, and a
//! later `watch` of the pid gets the kept exit at once. Unclaimed exits older
//! than [`UNCLAIMED_TTL`] are dropped, so that pids orphaned to the shim by
//! nobody's process do not pile up, and a reused pid is not mistaken for an
//! old one.
//!
//! This is why the shim never uses `tokio::process` (or `std`'s `wait`) while
//! serving: their own `waitpid(pid)` would race with this one.
//!
//! ```text
//!   kernel --SIGCHLD--> reaper task --waitpid(-1)--> Exit{pid,code,at}
//!                                         |-- watched pid   --> oneshot to the watcher
//!                                         `-- unwatched pid --> kept for UNCLAIMED_TTL
//! ```

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use log::{debug, warn};
use nix::{
    errno::Errno,
    sys::wait::{waitpid, WaitPidFlag, WaitStatus},
    unistd::Pid,
};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::oneshot,
};

/// How long an exit nobody watched is kept.
pub const UNCLAIMED_TTL: Duration = Duration::from_secs(60);

/// How a child process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The pid it had.
    pub pid: u32,
    /// Its exit status; `128 + signal` when killed by a signal.
    pub status: u32,
    /// When the shim reaped it.
    pub at: SystemTime,
}

#[derive(Default)]
struct Table {
    watchers: HashMap<u32, oneshot::Sender<Exit>>,
    unclaimed: HashMap<u32, (Exit, Instant)>,
}

/// Hands out the exits of the shim's children; cheap to clone.
#[derive(Clone, Default)]
pub struct Reaper {
    table: Arc<Mutex<Table>>,
}

impl Reaper {
    /// Creates the reaper and starts its task on the current tokio runtime.
    pub fn start() -> std::io::Result<Self> {
        let reaper = Self::default();
        let mut sigchld = signal(SignalKind::child())?;
        let r = reaper.clone();
        tokio::spawn(async move {
            // Children may have exited before the handler was installed.
            r.reap_all();
            while sigchld.recv().await.is_some() {
                r.reap_all();
            }
        });
        Ok(reaper)
    }

    /// Returns a receiver that gets the exit of `pid` (at once if it has
    /// already been reaped). The receiver errs only if the reaper is gone.
    pub fn watch(&self, pid: u32) -> oneshot::Receiver<Exit> {
        let (tx, rx) = oneshot::channel();
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((exit, _)) = t.unclaimed.remove(&pid) {
            let _ = tx.send(exit);
        } else {
            t.watchers.insert(pid, tx);
        }
        rx
    }

    /// Stops watching `pid`; its exit, when it comes, is kept as unclaimed.
    pub fn unwatch(&self, pid: u32) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        t.watchers.remove(&pid);
    }

    /// Reaps every exited child without blocking.
    fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.deliver(pid, code as u32),
                Ok(WaitStatus::Signaled(pid, sig, _)) => self.deliver(pid, 128 + sig as u32),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(_) => {} // stopped/continued: not an exit
                Err(Errno::EINTR) => {}
                Err(e) => {
                    warn!("waitpid failed: {e}");
                    break;
                }
            }
        }
    }

    /// Hands one exit to its watcher, or keeps it.
    pub(crate) fn deliver(&self, pid: Pid, status: u32) {
        let pid = pid.as_raw() as u32;
        let exit = Exit {
            pid,
            status,
            at: SystemTime::now(),
        };
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        match t.watchers.remove(&pid) {
            Some(tx) => {
                if tx.send(exit).is_err() {
                    debug!("exit of pid {pid} ({status}) reaped; its watcher is gone");
                }
            }
            None => {
                let now = Instant::now();
                t.unclaimed
                    .retain(|_, (_, since)| now.duration_since(*since) < UNCLAIMED_TTL);
                t.unclaimed.insert(pid, (exit, now));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn watch_before_and_after_the_exit() {
        let r = Reaper::default();
        // Watched first.
        let rx = r.watch(100);
        r.deliver(Pid::from_raw(100), 3);
        let e = rx.await.unwrap();
        assert_eq!((e.pid, e.status), (100, 3));
        // Reaped first: kept until watched.
        r.deliver(Pid::from_raw(101), 137);
        let e = r.watch(101).await.unwrap();
        assert_eq!((e.pid, e.status), (101, 137));
        // Claimed once only.
        let mut rx = r.watch(101);
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    #[allow(clippy::zombie_processes)] // the reaper under test waits for them
    async fn reaps_real_children() {
        let r = Reaper::start().unwrap();
        let child = std::process::Command::new("sh")
            .args(["-c", "exit 7"])
            .spawn()
            .unwrap();
        let e = r.watch(child.id()).await.unwrap();
        assert_eq!(e.status, 7);
        let child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let rx = r.watch(child.id());
        nix::sys::signal::kill(
            Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        assert_eq!(rx.await.unwrap().status, 128 + 9);
    }
}
