//! The `Admin` service (`nestlessctl`, over the root-only admin socket):
//! views of the agent, converted by [`convert`], and the changes of the
//! served VMs, which the [`Registry`] makes.

use std::sync::Arc;

use nestless_protos::{agent as pb, agent_ttrpc, PROTOCOL_VERSION};
use ttrpc::r#async::TtrpcContext;

use super::{
    conns::{RateBudget, ADMIN_REQUESTS_PER_SEC, ADMIN_REQUEST_BURST},
    convert,
};
use crate::{agent::Agent, config::VmConfig, error::AgentError, registry::Registry};

/// The Admin service.
pub struct AdminService {
    registry: Arc<Registry>,
    /// The admin socket's own request budget: what the VMs do never
    /// spends it.
    rate: RateBudget,
}

impl AdminService {
    /// The Admin service of `registry`'s agent.
    pub fn new(registry: Arc<Registry>) -> AdminService {
        AdminService {
            registry,
            rate: RateBudget::new(ADMIN_REQUEST_BURST, ADMIN_REQUESTS_PER_SEC),
        }
    }

    fn admit(&self) -> Result<(), ttrpc::Error> {
        if self.rate.take(std::time::Instant::now()) {
            return Ok(());
        }
        Err(AgentError::RequestBudget {
            who: "the admin socket".into(),
            burst: self.rate.burst(),
            per_second: self.rate.per_second(),
        }
        .to_ttrpc())
    }

    fn agent(&self) -> &Arc<Agent> {
        self.registry.agent()
    }

    /// VM `vm` for a reply, without asking its backend.
    fn info(&self, vm: &VmConfig, status: String) -> pb::VmInfo {
        let (max, warm) = self
            .agent()
            .vm(&vm.name)
            .map_or((vm.max_nics, vm.warm_pool), |v| {
                (v.max_nics(), v.warm_pool())
            });
        let config = self.agent().config();
        let spec = config.registered().iter().find(|s| s.name == vm.name);
        convert::vm_info(
            vm,
            max,
            warm,
            self.agent().nic_count(&vm.name),
            status,
            spec,
        )
    }
}

#[async_trait::async_trait]
impl agent_ttrpc::Admin for AdminService {
    async fn status(
        &self,
        _: &TtrpcContext,
        _: pb::StatusRequest,
    ) -> ttrpc::Result<pb::StatusResponse> {
        self.admit()?;
        let agent = self.agent();
        let config = agent.config();
        Ok(pb::StatusResponse {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            protocol_version: PROTOCOL_VERSION.into(),
            uptime_seconds: agent.uptime().as_secs(),
            state_file: agent.state_path().display().to_string(),
            vms: agent.vms().len() as u32,
            nics: agent.records(None).len() as u32,
            config_file: config.path.display().to_string(),
            config_generation: self.registry.generation(),
            last_reload_error: self.registry.last_reload_error(),
            registered_vms: config.registered().len() as u32,
            ..Default::default()
        })
    }

    async fn list_vms(
        &self,
        _: &TtrpcContext,
        _: pb::ListVmsRequest,
    ) -> ttrpc::Result<pb::ListVmsResponse> {
        self.admit()?;
        let mut vms = Vec::new();
        for vm in self.agent().vms() {
            let status =
                match tokio::time::timeout(std::time::Duration::from_secs(1), vm.backend.probe())
                    .await
                {
                    Ok(Ok(_)) => "ok".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "no answer within 1s".to_string(),
                };
            vms.push(self.info(&vm.config, status));
        }
        Ok(pb::ListVmsResponse {
            vms,
            config_generation: self.registry.generation(),
            last_reload_error: self.registry.last_reload_error(),
            ..Default::default()
        })
    }

    async fn register_vm(
        &self,
        _: &TtrpcContext,
        req: pb::RegisterVmRequest,
    ) -> ttrpc::Result<pb::RegisterVmResponse> {
        self.admit()?;
        let spec = convert::vm_spec(&req.vm.into_option().unwrap_or_default());
        let registry = self.registry.clone();
        // Its own task: a cancelled request never stops it half-way.
        let vm = tokio::spawn(async move { registry.register(spec).await })
            .await
            .map_err(|_| interrupted("RegisterVm"))??;
        Ok(pb::RegisterVmResponse {
            vm: Some(self.info(&vm, "registered".into())).into(),
            ..Default::default()
        })
    }

    async fn update_vm(
        &self,
        _: &TtrpcContext,
        req: pb::UpdateVmRequest,
    ) -> ttrpc::Result<pb::UpdateVmResponse> {
        self.admit()?;
        let spec = convert::vm_spec(&req.vm.into_option().unwrap_or_default());
        let registry = self.registry.clone();
        let (vm, restarted) = tokio::spawn(async move { registry.update(spec).await })
            .await
            .map_err(|_| interrupted("UpdateVm"))??;
        Ok(pb::UpdateVmResponse {
            vm: Some(self.info(&vm, "updated".into())).into(),
            restarted,
            ..Default::default()
        })
    }

    async fn unregister_vm(
        &self,
        _: &TtrpcContext,
        req: pb::UnregisterVmRequest,
    ) -> ttrpc::Result<pb::UnregisterVmResponse> {
        self.admit()?;
        let registry = self.registry.clone();
        let released = tokio::spawn(async move { registry.unregister(&req.name, req.force).await })
            .await
            .map_err(|_| interrupted("UnregisterVm"))??;
        Ok(pb::UnregisterVmResponse {
            released_nics: u32::try_from(released).unwrap_or(u32::MAX),
            ..Default::default()
        })
    }

    async fn list_all_nics(
        &self,
        _: &TtrpcContext,
        req: pb::ListAllNicsRequest,
    ) -> ttrpc::Result<pb::ListAllNicsResponse> {
        self.admit()?;
        let vm = (!req.vm.is_empty()).then_some(req.vm.as_str());
        if let Some(v) = vm {
            self.agent().vm(v)?;
        }
        let page = convert::PageRequest::parse(req.page_size, &req.page_token)?;
        let (records, more) = self
            .agent()
            .records_page(vm, page.after.as_ref(), page.size, |_| true);
        Ok(pb::ListAllNicsResponse {
            nics: records
                .iter()
                .map(|r| convert::nic_record(r, self.agent().network(&r.network).as_ref()))
                .collect(),
            next_page_token: convert::next_page_token(&records, more),
            ..Default::default()
        })
    }

    async fn list_hostlo_pods(
        &self,
        _: &TtrpcContext,
        _: pb::ListHostloPodsRequest,
    ) -> ttrpc::Result<pb::ListHostloPodsResponse> {
        self.admit()?;
        Ok(pb::ListHostloPodsResponse {
            pods: self
                .agent()
                .hostlo_pods()
                .iter()
                .map(convert::hostlo_pod)
                .collect(),
            ..Default::default()
        })
    }

    async fn list_leases(
        &self,
        _: &TtrpcContext,
        _: pb::ListLeasesRequest,
    ) -> ttrpc::Result<pb::ListLeasesResponse> {
        self.admit()?;
        Ok(pb::ListLeasesResponse {
            leases: self
                .agent()
                .records(None)
                .iter()
                .map(convert::lease)
                .collect(),
            ..Default::default()
        })
    }
}

fn interrupted(op: &'static str) -> ttrpc::Error {
    crate::error::AgentError::Interrupted { op }.to_ttrpc()
}
