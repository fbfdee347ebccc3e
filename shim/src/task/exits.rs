//! The watchers that turn what happens to a container's processes into
//! events: exits (from the [`crate::reaper::Reaper`]) and OOM kills (from
//! the cgroup).
//!
//! ```text
//! reaper: Exit{pid, status} ─▶ the process's output copied out (lock not held;
//!                              bounded: stdio::OUTPUT_STALL without progress)
//!                              ─▶ lock the container ─▶ still its pid, not stopped?
//!                              ─▶ Stopped, Wait() returns ─▶ event TaskExit
//! cgroup: OOM kill ───────────────────────────────────────▶ event TaskOOM
//! ```
//!
//! The exit is reported only once the process's output is out: a client that
//! reads the output when it hears of the exit (and a log that is complete
//! when the container is seen stopped) gets all of it.
//!
//! Exits are handled under the container's lock, which the handler that
//! starts a process holds until its start event is out: an exit event never
//! overtakes the start event of its process.

use containerd_shim_protos::{
    events::task::{TaskExit, TaskOOM},
    protobuf::MessageField,
    topics,
};
use log::{debug, info, warn};
use tokio::task::JoinHandle;

use super::{container::timestamp, state::Op, TaskService};
use crate::{
    cgroup::Cgroup,
    reaper::Exit,
    stdio::{Drained, OUTPUT_DRAIN_CAP, OUTPUT_STALL},
};

impl TaskService {
    /// Hands the exit of `pid` (a process of container `id`) to [`Self::on_exit`].
    pub(super) fn watch_exit(&self, id: &str, exec_id: &str, pid: u32) {
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
        let Ok(c) = self.container(id) else {
            return;
        };
        // The output first, without the lock (Kill, State and the other
        // processes go on meanwhile).
        let drain = {
            let c = c.lock().await;
            c.process(exec_id)
                .ok()
                .filter(|p| p.pid == exit.pid)
                .and_then(|p| p.io.as_ref().map(|io| io.drain()))
        };
        if let Some(mut drain) = drain {
            let label = if exec_id.is_empty() {
                id.to_owned()
            } else {
                format!("{id}/{exec_id}")
            };
            match drain.wait(OUTPUT_STALL, OUTPUT_DRAIN_CAP).await {
                Drained::Done => {}
                Drained::Stalled => warn!(
                    "process {label}: nobody reads its output: exit reported with output unread"
                ),
                Drained::Capped => warn!(
                    "process {label}: its output still flows {} ms after its exit \
                     (a process that outlived it?): exit reported",
                    OUTPUT_DRAIN_CAP.as_millis()
                ),
            }
        }
        let mut c = c.lock().await;
        if c.gone {
            return;
        }
        // An exit of a process already stopped, or of a pid it no longer has, is not news.
        let Ok(to) = c.next(exec_id, Op::Exit) else {
            return;
        };
        let Ok(p) = c.process_mut(exec_id) else {
            return;
        };
        if p.pid != exit.pid {
            return;
        }
        p.state = to;
        p.exit.send_replace(Some(exit));
        let init = exec_id.is_empty();
        if init {
            info!("container {id} exited with status {}", exit.status);
        } else {
            debug!("process {id}/{exec_id} exited with status {}", exit.status);
        }
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            TaskExit {
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
            },
        )
        .await;
    }

    /// Publishes a TaskOOM event for each OOM kill in `cgroup`, until the
    /// returned task is aborted; `None` when OOM kills cannot be watched.
    pub(super) fn watch_oom(&self, id: &str, cgroup: &Cgroup) -> Option<JoinHandle<()>> {
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
                    TaskOOM {
                        container_id: id.clone(),
                        ..Default::default()
                    },
                )
                .await;
            }
        }))
    }
}
