//! The one attach routine of the guest side, shared by the shim's pod network
//! ([`super::agent::AgentNetwork`]) and `nestless-cni` ADD.
//!
//! ```text
//! caller                    host agent                      VM kernel
//!  AttachNic(sandbox) ─────▶ lease, tap, device_add ───────▶ ACPI hot-plug
//!  ◀──── Nic{mac, addresses, routes, mtu}
//!  wait for the link with the MAC ◀───────────────────────────── new ethN
//!  move into the pod netns, name, addresses, routes, up   (guest::plug_into_pod)
//!  any failure once the NIC is leased: DetachNic(sandbox) ──▶ unplug, lease freed
//! ```
//!
//! Attach is idempotent on the agent's side (same sandbox, same NIC): a
//! retry, or the shim's setup after `nestless-cni` ADD, gets the same NIC and
//! finds it already in place.

use std::{collections::HashMap, path::Path, time::Duration};

use super::{
    guest::{self, NicSpec},
    PodNetError,
};
use crate::agent_client::{AgentClient, ClientError, Nic};

/// What to attach, and where.
#[derive(Debug, Clone, Copy)]
pub struct AttachRequest<'a> {
    /// The pod sandbox the NIC is for.
    pub sandbox_id: &'a str,
    /// Labels the agent keeps with the NIC.
    pub labels: &'a HashMap<String, String>,
    /// Name of the NIC inside the pod netns.
    pub ifname: &'a str,
    /// The pod's network namespace.
    pub netns: &'a Path,
    /// How long to wait for the hot-plugged NIC to appear.
    pub nic_wait: Duration,
}

/// Asks the agent for the sandbox's NIC and plugs it into the pod netns,
/// configured. On failure nothing stays leased: a NIC the agent handed out is
/// detached again before the error is returned.
///
/// # Errors
/// [`PodNetError::Client`] when the agent refuses, cannot be reached or
/// replies with an unusable NIC; [`PodNetError::Guest`] when the NIC does not
/// appear or cannot be moved or configured.
pub async fn attach_and_plug(
    client: &AgentClient,
    req: &AttachRequest<'_>,
) -> Result<Nic, PodNetError> {
    let failed: PodNetError = match client.attach(req.sandbox_id, req.labels).await {
        Ok(nic) => {
            let spec = NicSpec::for_nic(&nic, req.ifname);
            match guest::plug_into_pod(&spec, req.netns, req.nic_wait, true).await {
                Ok(()) => return Ok(nic),
                Err(e) => e.into(),
            }
        }
        // Leased, but described so that it cannot be used: give it back too.
        Err(e @ ClientError::BadNic { .. }) => e.into(),
        Err(e) => return Err(e.into()),
    };
    if let Err(undo) = client.detach(req.sandbox_id).await {
        log::error!(
            "sandbox {}: releasing its NIC after a failed attach failed: {undo}",
            req.sandbox_id
        );
    }
    Err(failed)
}
