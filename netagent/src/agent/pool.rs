//! The warm pool: NICs kept plugged, leased and unassigned, so that an
//! attach only assigns one.
//!
//! ```text
//! attach(sb) ─▶ a warm NIC of the VM's network? ─▶ record: sandbox, labels, not pooled
//!                                                  persist, reply (no hot-plug)
//!                                                  upkeep_signal ─▶ the VM's upkeep task
//! upkeep task ─▶ refill_pool: one plug_new(pooled) per VM-lock hold,
//!                until warm_pool are pooled or the VM is at max_nics
//! ```
//!
//! Pooled NICs count against `max_nics`, are invisible to `ListNics` and
//! survive restarts like any record. A detached NIC is unplugged, never
//! returned to the pool.

use std::collections::BTreeMap;

use super::{attach::brfusion_nic, Agent, AttachRequest, Vm};
use crate::{error::AgentError, state::NicRecord};

impl Agent {
    /// Gives a warm NIC of `vm` to `req`'s sandbox, if there is one. Caller
    /// holds the VM lock.
    pub(super) async fn claim_warm(
        &self,
        vm: &Vm,
        req: &AttachRequest,
    ) -> Result<Option<NicRecord>, AgentError> {
        let Some(before) = self.records.warm(vm.name(), &vm.config.network) else {
            return Ok(None);
        };
        let key = &req.attachment;
        let claimed = self.records.update(&before.id, |r| {
            r.pooled = false;
            r.scope = key.scope.as_str().to_string();
            r.sandbox_id = key.sandbox_id.as_str().to_string();
            r.interface = key.interface.as_str().to_string();
            r.labels = req.labels.as_map().clone();
        });
        if let Err(e) = self.records.persist().await {
            self.records.restore(before);
            return Err(e);
        }
        vm.upkeep.notify_one();
        let Some(record) = claimed else {
            return Ok(None);
        };
        log::info!(
            "VM {}: gave warm NIC {} ({}, {}) to sandbox {key}",
            vm.name(),
            record.id,
            record.mac,
            record.ipv4,
        );
        Ok(Some(record))
    }

    /// Tops VM `vm_name`'s warm pool up to its configured size, one NIC per
    /// lock hold (an attach waiting for the lock goes between two). Returns
    /// how many NICs it plugged.
    ///
    /// # Errors
    /// As [`Agent::attach`] for a new NIC; the NICs plugged before stay.
    pub async fn refill_pool(&self, vm_name: &str) -> Result<usize, AgentError> {
        let vm = self.vm(vm_name)?.clone();
        let mut plugged = 0;
        loop {
            let _op = vm.op.lock().await;
            vm.check_live()?;
            let (pooled, total) = self.records.pool_counts(vm_name);
            if pooled as u32 >= vm.warm_pool() || total as u32 >= vm.max_nics() {
                return Ok(plugged);
            }
            let rec = self
                .plug_new(&vm, brfusion_nic(&vm, None, &BTreeMap::new()))
                .await?;
            log::debug!("VM {vm_name}: warm NIC {} ({}) plugged", rec.id, rec.mac);
            plugged += 1;
        }
    }

    /// Wakes VM `vm_name`'s upkeep task before its next tick (an attach
    /// took a warm NIC).
    pub fn upkeep_signal(&self, vm_name: &str) {
        if let Ok(vm) = self.vm(vm_name) {
            vm.upkeep.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, sync::Arc, time::Duration};

    use crate::{
        agent::{
            rig::{config, req},
            Agent,
        },
        backend::{fake::FakeQemu, qemu::QemuBackend, VmBackend},
        links::fake::FakeLinks,
    };

    #[tokio::test]
    async fn warm_pool_is_claimed_without_a_hot_plug_and_refilled() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), "10.9.0.254");
        cfg.vms[0].warm_pool = 2;
        let links = Arc::new(FakeLinks::default());
        let q1 = Arc::new(FakeQemu::new(4));
        let t = Duration::from_millis(200);
        let mut b: HashMap<String, Arc<dyn VmBackend>> = HashMap::new();
        b.insert(
            "vm1".into(),
            Arc::new(QemuBackend::new(
                "vm1",
                q1.clone(),
                links.clone(),
                vec![],
                t,
            )),
        );
        b.insert(
            "vm2".into(),
            Arc::new(QemuBackend::new(
                "vm2",
                Arc::new(FakeQemu::new(1)),
                links.clone(),
                vec![],
                t,
            )),
        );
        let agent = Agent::with_backends(cfg.clone(), links.clone(), b).unwrap();
        assert_eq!(agent.refill_pool("vm1").await.unwrap(), 2);
        assert_eq!(q1.devices.lock().unwrap().len(), 2);
        let adds = |q: &FakeQemu| {
            q.log
                .lock()
                .unwrap()
                .iter()
                .filter(|c| *c == "device_add")
                .count()
        };
        let before = adds(&q1);
        let a = agent.attach("vm1", req("sb")).await.unwrap();
        assert!(a.created && !a.record.pooled && a.record.sandbox_id == "sb");
        assert_eq!(adds(&q1), before, "a warm attach plugs nothing");
        assert_eq!(
            agent
                .records(Some("vm1"))
                .iter()
                .filter(|r| r.pooled)
                .count(),
            1
        );
        // The pool is topped up; the quota (3) caps it: 1 assigned + 2 pooled.
        assert_eq!(agent.refill_pool("vm1").await.unwrap(), 1);
        assert_eq!(agent.nic_count("vm1"), 3);
        // Pooled NICs survive a restart like any other.
        drop(agent);
        let mut b: HashMap<String, Arc<dyn VmBackend>> = HashMap::new();
        b.insert(
            "vm1".into(),
            Arc::new(QemuBackend::new(
                "vm1",
                q1.clone(),
                links.clone(),
                vec![],
                t,
            )),
        );
        let agent = Agent::with_backends(cfg, links, b).unwrap();
        let rep = agent.recover().await.unwrap();
        assert_eq!(rep.kept, 3);
        assert_eq!(
            agent
                .records(Some("vm1"))
                .iter()
                .filter(|r| r.pooled)
                .count(),
            2
        );
        let again = agent.attach("vm1", req("sb")).await.unwrap();
        assert!(!again.created && again.record.id == a.record.id);
    }
}
