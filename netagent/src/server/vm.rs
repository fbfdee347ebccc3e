//! The `NetAgent` service of one VM: each call parses its request
//! ([`convert`]), asks the agent, and converts the reply; nothing else.
//!
//! The caller is fixed when the connection is accepted (see [`super`]): a
//! service is made per VM, and one for callers no VM matches, which refuses
//! every call with `PERMISSION_DENIED`.
//!
//! **Cancellation.** ttrpc drops a handler whose request's deadline
//! (`timeout_nano`) passes or whose client goes away. Every operation that
//! changes something (attach, detach, Hostlo join, leave, publish) runs as
//! a task of its own that the handler awaits ([`to_end`]): dropping the
//! handler drops only the wait, and the operation runs to its end, as if
//! the reply had been lost (the caller's retry finds its result: attach
//! and join are idempotent). Reads and `HostloWatch` (a wait) are not
//! spawned.

use std::sync::Arc;

use nestless_protos::{agent as pb, agent_ttrpc, PROTOCOL_VERSION};
use ttrpc::r#async::TtrpcContext;

use super::{
    conns::RateBudget,
    convert,
    refusals::{Bounded, RefusalLog},
};
use crate::{
    agent::{
        Agent, AttachRequest, HostloJoin, HostloPart, HostloPublish, HostloWatch, NicSelector,
    },
    error::AgentError,
    lifecycle::NicState,
};

/// Runs `op` on `agent` as a task of its own and waits for its result: a
/// cancelled request drops the wait, never the operation.
async fn to_end<T, Fut>(
    agent: &Arc<Agent>,
    name: &'static str,
    op: impl FnOnce(Arc<Agent>) -> Fut,
) -> Result<T, AgentError>
where
    Fut: std::future::Future<Output = Result<T, AgentError>> + Send + 'static,
    T: Send + 'static,
{
    tokio::spawn(op(agent.clone()))
        .await
        .map_err(|_| AgentError::Interrupted { op: name })?
}

/// The NetAgent service bound to one caller.
pub struct VmService {
    agent: Arc<Agent>,
    /// `None`: a caller no VM matches.
    vm: Option<String>,
    /// The caller's failed requests, logged within bounds.
    refusals: RefusalLog,
    /// The caller's request budget.
    rate: RateBudget,
}

impl VmService {
    /// The service of VM `vm` (`None`: of callers no VM matches), with
    /// request budget `rate`.
    pub fn new(agent: Arc<Agent>, vm: Option<String>, rate: RateBudget) -> VmService {
        VmService {
            agent,
            vm,
            refusals: RefusalLog::default(),
            rate,
        }
    }

    /// Takes a request from the caller's budget, or refuses it
    /// (`RESOURCE_EXHAUSTED`, logged within bounds).
    fn admit(&self) -> Result<(), ttrpc::Error> {
        if self.rate.take(std::time::Instant::now()) {
            return Ok(());
        }
        let who = match &self.vm {
            Some(vm) => format!("VM {vm}"),
            None => "an unknown caller".to_string(),
        };
        self.refusals.warn(
            &who,
            format_args!("{who}: request refused: over its request budget (RESOURCE_EXHAUSTED)"),
        );
        Err(AgentError::RequestBudget {
            who,
            burst: self.rate.burst(),
            per_second: self.rate.per_second(),
        }
        .to_ttrpc())
    }

    fn caller(&self) -> Result<&str, ttrpc::Error> {
        self.vm.as_deref().ok_or_else(|| {
            AgentError::UnknownVm("no VM with the caller's vsock CID is configured on this host (the agent logs the CID)".into())
                .to_ttrpc()
        })
    }
}

#[async_trait::async_trait]
impl agent_ttrpc::NetAgent for VmService {
    async fn health(
        &self,
        _: &TtrpcContext,
        _: pb::HealthRequest,
    ) -> ttrpc::Result<pb::HealthResponse> {
        self.admit()?;
        let vm_name = self.caller()?;
        let vm = self.agent.vm(vm_name)?;
        Ok(pb::HealthResponse {
            protocol_version: PROTOCOL_VERSION.into(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            vm: vm_name.into(),
            nics_in_use: self.agent.nic_count(vm_name) as u32,
            nic_quota: vm.max_nics(),
            ..Default::default()
        })
    }

    async fn attach_nic(
        &self,
        _: &TtrpcContext,
        req: pb::AttachNicRequest,
    ) -> ttrpc::Result<pb::AttachNicResponse> {
        self.admit()?;
        let vm_name = self.caller()?;
        let attached = async {
            let checked = AttachRequest::try_from(&req)?;
            let vm = vm_name.to_string();
            let done = to_end(&self.agent, "AttachNic", move |a| async move {
                a.attach(&vm, checked).await
            })
            .await?;
            // A record kept from an older configuration may name a network
            // that is gone: the VM may not use it.
            let net = self.agent.network(&done.record.network).ok_or_else(|| {
                AgentError::NetworkNotAllowed {
                    vm: vm_name.to_string(),
                    network: done.record.network.clone(),
                    allowed: self
                        .agent
                        .vm(vm_name)
                        .map(|v| v.config.network.clone())
                        .unwrap_or_default(),
                }
            })?;
            Ok::<_, AgentError>(pb::AttachNicResponse {
                nic: protobuf::MessageField::some(convert::nic(&done.record, &net)),
                created: done.created,
                ..Default::default()
            })
        }
        .await;
        attached.map_err(|e| {
            self.refusals.warn(
                &format!("VM {vm_name}"),
                format_args!(
                    "VM {vm_name}: AttachNic for sandbox {} (scope {}, interface {}) failed: {}",
                    Bounded(&req.sandbox_id),
                    Bounded(&req.scope),
                    Bounded(&req.interface),
                    Bounded(&e.to_string())
                ),
            );
            e.into()
        })
    }

    async fn detach_nic(
        &self,
        _: &TtrpcContext,
        req: pb::DetachNicRequest,
    ) -> ttrpc::Result<pb::DetachNicResponse> {
        self.admit()?;
        let vm_name = self.caller()?;
        let detached = async {
            let which = NicSelector::try_from(&req)?;
            let vm = vm_name.to_string();
            to_end(&self.agent, "DetachNic", move |a| async move {
                a.detach(&vm, which).await
            })
            .await
        }
        .await;
        detached.inspect_err(|e| {
            self.refusals.warn(
                &format!("VM {vm_name}"),
                format_args!(
                    "VM {vm_name}: DetachNic failed: {}",
                    Bounded(&e.to_string())
                ),
            );
        })?;
        Ok(pb::DetachNicResponse::default())
    }

    async fn hostlo_join(
        &self,
        _: &TtrpcContext,
        req: pb::HostloJoinRequest,
    ) -> ttrpc::Result<pb::HostloJoinResponse> {
        self.admit()?;
        let vm_name = self.caller()?;
        let joined = async {
            let checked = HostloJoin::try_from(&req)?;
            let vm = vm_name.to_string();
            to_end(&self.agent, "HostloJoin", move |a| async move {
                a.hostlo_join(&vm, checked).await
            })
            .await
        }
        .await;
        let (rec, view) = joined.inspect_err(|e| {
            self.refusals.warn(
                &format!("VM {vm_name}"),
                format_args!(
                    "VM {vm_name}: HostloJoin {}/{} failed: {}",
                    Bounded(&req.pod),
                    req.part,
                    Bounded(&e.to_string())
                ),
            );
        })?;
        Ok(pb::HostloJoinResponse {
            nic: protobuf::MessageField::some(convert::hostlo_nic(
                &rec,
                &req.pod,
                &self.agent.config().hostlo,
            )),
            pod: protobuf::MessageField::some(convert::hostlo_view(&view)),
            ..Default::default()
        })
    }

    async fn hostlo_leave(
        &self,
        _: &TtrpcContext,
        req: pb::HostloLeaveRequest,
    ) -> ttrpc::Result<pb::HostloLeaveResponse> {
        self.admit()?;
        let vm_name = self.caller()?;
        let part = HostloPart::try_from(&req)?;
        let vm = vm_name.to_string();
        to_end(&self.agent, "HostloLeave", move |a| async move {
            a.hostlo_leave(&vm, part).await
        })
        .await?;
        Ok(pb::HostloLeaveResponse::default())
    }

    async fn hostlo_publish(
        &self,
        _: &TtrpcContext,
        req: pb::HostloPublishRequest,
    ) -> ttrpc::Result<pb::HostloPublishResponse> {
        self.admit()?;
        let vm_name = self.caller()?;
        let publish = HostloPublish::try_from(&req)?;
        let vm = vm_name.to_string();
        let conflicts = to_end(&self.agent, "HostloPublish", move |a| async move {
            a.hostlo_publish(&vm, publish).await
        })
        .await?;
        Ok(pb::HostloPublishResponse {
            conflicts: conflicts.iter().map(convert::hostlo_conflict).collect(),
            ..Default::default()
        })
    }

    async fn hostlo_watch(
        &self,
        _: &TtrpcContext,
        req: pb::HostloWatchRequest,
    ) -> ttrpc::Result<pb::HostloWatchResponse> {
        self.admit()?;
        let vm_name = self.caller()?;
        let watch = HostloWatch::try_from(&req)?;
        let view = self.agent.hostlo_watch(vm_name, watch).await?;
        Ok(convert::hostlo_view(&view))
    }

    async fn list_nics(
        &self,
        _: &TtrpcContext,
        req: pb::ListNicsRequest,
    ) -> ttrpc::Result<pb::ListNicsResponse> {
        self.admit()?;
        let vm_name = self.caller()?;
        let page = convert::PageRequest::parse(req.page_size, &req.page_token)?;
        let (records, more) =
            self.agent
                .records_page(Some(vm_name), page.after.as_ref(), page.size, |r| {
                    r.state == NicState::Attached && !r.pooled && r.hostlo.is_none()
                });
        Ok(pb::ListNicsResponse {
            nics: records
                .iter()
                .filter_map(|r| self.agent.network(&r.network).map(|n| convert::nic(r, &n)))
                .collect(),
            next_page_token: convert::next_page_token(&records, more),
            ..Default::default()
        })
    }
}
