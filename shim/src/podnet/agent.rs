//! The agent-backed pod network: the sandbox's NIC from the host agent
//! (through [`super::attach`]), and the lifetime of its Hostlo part.
//!
//! ```text
//! setup:    annotations name a Hostlo part? (checked first)
//!           attach_and_plug: AttachNic ─▶ NIC found by MAC ─▶ pod netns, configured
//!           Hostlo part? hostlo::part::join (HostloJoin, hostlo0, relays);
//!                        a failed join detaches the NIC again
//! teardown: the Hostlo part stops (HostloLeave), then DetachNic(sandbox)
//! ```
//!
//! A failed setup leaves nothing leased: see [`super::attach`].

use std::collections::HashMap;

use super::{
    attach::{attach_and_plug, AttachRequest},
    PodNetError, PodNetInfo, PodNetRequest, PodNetwork,
};
use crate::{
    agent_client::AgentClient,
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
    parts: tokio::sync::Mutex<HashMap<String, hostlo::part::Part>>,
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
        let nic = attach_and_plug(
            &client,
            &AttachRequest {
                sandbox_id: &req.sandbox_id,
                labels: &labels,
                ifname,
                netns: &req.netns,
                nic_wait: self.network.nic_wait,
            },
        )
        .await?;
        if let Some(spec) = hostlo {
            match hostlo::part::join(
                &self.agent,
                self.network.nic_wait,
                &spec,
                &req.sandbox_id,
                &req.netns,
            )
            .await
            {
                Ok(part) => {
                    self.parts.lock().await.insert(req.sandbox_id.clone(), part);
                }
                Err(e) => {
                    if let Err(undo) = client.detach(&req.sandbox_id).await {
                        log::error!("sandbox {}: releasing NIC {} after a failed Hostlo join failed: {undo}", req.sandbox_id, nic.id);
                    }
                    return Err(e.into());
                }
            }
        }
        let addresses = nic.cidrs();
        log::info!(
            "sandbox {}: NIC {} ({}) configured as {ifname} in {}",
            req.sandbox_id,
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

    async fn teardown(&self, sandbox_id: &str) -> Result<(), PodNetError> {
        if let Some(part) = self.parts.lock().await.remove(sandbox_id) {
            part.stop().await;
        }
        let client = AgentClient::connect(&self.agent).await?;
        client.detach(sandbox_id).await?;
        log::info!("sandbox {sandbox_id}: NIC released");
        Ok(())
    }
}
