//! The agent-backed pod network: the sandbox's NIC from the host agent
//! (through [`super::attach`]), and the lifetime of its Hostlo part.
//!
//! ```text
//! setup:    annotations name a Hostlo part? (checked first)
//!           attach_and_plug: AttachNic(scope, sandbox, interface) ─▶ NIC found by MAC
//!                            ─▶ pod netns, configured
//!           Hostlo part? hostlo::part::join (HostloJoin, hostlo0, relays);
//!                        a failed join detaches the NIC again if setup made it
//! teardown: the Hostlo part stops (HostloLeave), then DetachNic(scope, sandbox):
//!           every NIC of the sandbox
//! ```
//!
//! A failed setup leaves nothing it made leased: see [`super::attach`].

use std::collections::HashMap;

use super::{
    attach::{attach_and_plug, AttachRequest},
    PodNetError, PodNetInfo, PodNetRequest, PodNetwork, SandboxRef,
};
use crate::{
    agent_client::{AgentClient, DetachTarget},
    config::{AgentEndpoint, PodNetConfig},
    hostlo,
};

/// [`PodNetwork`] through the host agent.
///
/// A sandbox annotated as part of a Hostlo pod (see [`crate::hostlo`]) also
/// joins that pod after its own NIC is configured, and leaves it first on
/// teardown.
pub struct AgentNetwork {
    agent: AgentEndpoint,
    network: PodNetConfig,
    parts: tokio::sync::Mutex<HashMap<SandboxRef, hostlo::part::Part>>,
}

impl AgentNetwork {
    /// A pod network using the agent at `agent` and the guest settings `network`.
    pub fn new(agent: AgentEndpoint, network: PodNetConfig) -> AgentNetwork {
        AgentNetwork {
            agent,
            network,
            parts: Default::default(),
        }
    }
}

#[async_trait::async_trait]
impl PodNetwork for AgentNetwork {
    async fn setup(&self, req: &PodNetRequest) -> Result<PodNetInfo, PodNetError> {
        let hostlo = hostlo::spec_from_annotations(&req.labels)?;
        let client = AgentClient::connect(&self.agent).await?;
        // The agent keeps short labels; the Hostlo port list is for the part.
        let labels: HashMap<String, String> = req
            .labels
            .iter()
            .filter(|(k, _)| k.as_str() != hostlo::PORTS_ANNOTATION)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let ifname = self.network.interface.as_str();
        let attached = attach_and_plug(
            &client,
            &AttachRequest {
                sandbox: &req.sandbox,
                labels: &labels,
                ifname,
                netns: &req.netns,
                nic_wait: self.network.nic_wait,
                exclusive: req.exclusive,
            },
        )
        .await?;
        let nic = &attached.nic;
        if let Some(spec) = hostlo {
            let pod_ips: Vec<_> = nic.addresses.iter().map(|a| a.ip).collect();
            match hostlo::part::join(
                &self.agent,
                self.network.nic_wait,
                &spec,
                &req.sandbox.id,
                &req.netns,
                &pod_ips,
            )
            .await
            {
                Ok(part) => {
                    self.parts.lock().await.insert(req.sandbox.clone(), part);
                }
                Err(e) => {
                    if attached.created {
                        if let Err(undo) = client.detach(DetachTarget::Nic(&nic.id)).await {
                            log::error!(
                                "sandbox {}: releasing NIC {} after a failed Hostlo join failed: {undo}",
                                req.sandbox,
                                nic.id
                            );
                        }
                    }
                    return Err(e.into());
                }
            }
        }
        let addresses = nic.cidrs();
        log::info!(
            "sandbox {}: NIC {} ({}) configured as {ifname} in {}",
            req.sandbox,
            nic.mac,
            addresses.join(","),
            req.netns.display()
        );
        Ok(PodNetInfo {
            interface: ifname.to_string(),
            mac: nic.mac.to_string(),
            addresses,
        })
    }

    async fn teardown(&self, sandbox: &SandboxRef) -> Result<(), PodNetError> {
        if let Some(part) = self.parts.lock().await.remove(sandbox) {
            part.stop().await;
        }
        let client = AgentClient::connect(&self.agent).await?;
        client.detach(DetachTarget::Sandbox(sandbox)).await?;
        log::info!("sandbox {sandbox}: NICs released");
        Ok(())
    }
}
