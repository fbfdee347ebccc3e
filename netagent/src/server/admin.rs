//! The `Admin` service (`nestlessctl`, over the root-only admin socket):
//! read-only views of the agent, converted by [`convert`].

use std::sync::Arc;

use nestless_protos::{agent as pb, agent_ttrpc, PROTOCOL_VERSION};
use ttrpc::r#async::TtrpcContext;

use super::{
    conns::{RateBudget, ADMIN_REQUESTS_PER_SEC, ADMIN_REQUEST_BURST},
    convert,
};
use crate::{agent::Agent, error::AgentError};

/// The Admin service.
pub struct AdminService {
    agent: Arc<Agent>,
    /// The admin socket's own request budget: what the VMs do never
    /// spends it.
    rate: RateBudget,
}

impl AdminService {
    /// The Admin service of `agent`.
    pub fn new(agent: Arc<Agent>) -> AdminService {
        AdminService {
            agent,
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
}

#[async_trait::async_trait]
impl agent_ttrpc::Admin for AdminService {
    async fn status(
        &self,
        _: &TtrpcContext,
        _: pb::StatusRequest,
    ) -> ttrpc::Result<pb::StatusResponse> {
        self.admit()?;
        Ok(pb::StatusResponse {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            protocol_version: PROTOCOL_VERSION.into(),
            uptime_seconds: self.agent.uptime().as_secs(),
            state_file: self.agent.state_file().path().display().to_string(),
            vms: self.agent.vms().count() as u32,
            nics: self.agent.records(None).len() as u32,
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
        for vm in self.agent.vms() {
            let status =
                match tokio::time::timeout(std::time::Duration::from_secs(1), vm.backend.probe())
                    .await
                {
                    Ok(Ok(_)) => "ok".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "no answer within 1s".to_string(),
                };
            vms.push(pb::VmInfo {
                name: vm.config.name.clone(),
                backend: vm.backend.kind().into(),
                endpoint: vm.config.backend.endpoint().display().to_string(),
                network: vm.config.network.clone(),
                cid: vm.config.cid.unwrap_or(0),
                unix_socket: vm
                    .config
                    .unix_socket
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                nics: self.agent.nic_count(&vm.config.name) as u32,
                max_nics: vm.config.max_nics,
                status,
                ..Default::default()
            });
        }
        Ok(pb::ListVmsResponse {
            vms,
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
            self.agent.vm(v)?;
        }
        let page = convert::PageRequest::parse(req.page_size, &req.page_token)?;
        let (records, more) = self
            .agent
            .records_page(vm, page.after.as_ref(), page.size, |_| true);
        Ok(pb::ListAllNicsResponse {
            nics: records
                .iter()
                .map(|r| convert::nic_record(r, self.agent.network(&r.network)))
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
                .agent
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
                .agent
                .records(None)
                .iter()
                .map(convert::lease)
                .collect(),
            ..Default::default()
        })
    }
}
