//! Delete: an exec process (its record and output), or the container and
//! everything it holds.
//!
//! ```text
//! container: state allows it? ─▶ runc delete (--force while created; "not found" = done)
//!            out of the map ─▶ the output: let go of the FIFOs' read ends, copy what
//!            is still moving (stdio::ProcessIo::finish) ─▶ stop the OOM watch
//!            ─▶ pod network teardown (owner; a failure is logged, deletion goes on)
//!            ─▶ unmount the rootfs ─▶ remove the bundle record
//! ```

use std::{sync::Arc, time::SystemTime};

use log::warn;
use tokio::sync::Mutex;

use super::{
    container::{Container, KILLED_STATUS},
    state::{Op, ProcState},
    TaskService,
};
use crate::{
    bundle::Record,
    error::{Result, ShimError},
    stdio::OUTPUT_STALL,
};

/// What a deleted process left: its pid and how it ended.
pub(super) struct Deleted {
    pub(super) pid: u32,
    pub(super) status: u32,
    pub(super) at: SystemTime,
}

impl TaskService {
    /// Deletes process `exec_id` of container `c` (empty: the container).
    pub(super) async fn delete_process(
        &self,
        c: &Arc<Mutex<Container>>,
        exec_id: &str,
    ) -> Result<Deleted> {
        if !exec_id.is_empty() {
            return delete_exec(c, exec_id).await;
        }
        let mut c = c.lock().await;
        let from = c.next("", Op::Delete)?;
        let force = from == ProcState::Created;
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

        futures::future::join_all(
            io.into_iter()
                .chain(execs)
                .map(|io| io.finish(OUTPUT_STALL)),
        )
        .await;
        if let Some(oom) = oom {
            oom.abort();
        }
        if let Some(net) = network {
            if let Err(e) = net.backend.teardown(&net.sandbox).await {
                warn!(
                    "container {id}: releasing the pod network of sandbox {} failed (deleting anyway): {e}",
                    net.sandbox
                );
            }
        }
        if rootfs_mounted {
            self.inner.seams.rootfs.unmount(&bundle).await;
        }
        Record::remove(&bundle);
        let (status, at) = match exit {
            Some(e) => (e.status, e.at),
            None => (KILLED_STATUS, SystemTime::now()),
        };
        Ok(Deleted { pid, status, at })
    }
}

/// Deletes an exec process that is not running, once its output has drained.
async fn delete_exec(c: &Mutex<Container>, exec_id: &str) -> Result<Deleted> {
    let mut c = c.lock().await;
    c.next(exec_id, Op::Delete)?;
    let Some(mut p) = c.execs.remove(exec_id) else {
        return Err(ShimError::ProcessNotFound {
            id: c.id.clone(),
            exec_id: exec_id.to_owned(),
        });
    };
    drop(c);
    if let Some(io) = p.io.take() {
        io.finish(OUTPUT_STALL).await;
    }
    let exit = p.exited();
    Ok(Deleted {
        pid: p.pid,
        status: exit.map(|e| e.status).unwrap_or(0),
        at: exit.map(|e| e.at).unwrap_or_else(SystemTime::now),
    })
}
