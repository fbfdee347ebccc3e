//! The pod-network seam: what the task service needs to give a sandbox its
//! host-provided NIC and to release it, and [`from_config`], which picks the
//! implementation a shim configuration asks for.
//!
//! - [`agent`]: the implementation through the host agent (a NIC per
//!   sandbox, and the sandbox's Hostlo part);
//! - [`attach`]: attach, find by MAC, move into the netns, detach on failure:
//!   the one routine the shim and `nestless-cni` share;
//! - [`guest`]: netlink inside the VM; [`Disabled`]: `mode = "none"`.
//!
//! The task service asks for a backend only when a container owns a pod
//! network (see [`crate::policy::network_role`]); the backend it gets is kept
//! with the container, so that the same one releases the network on delete.

use std::{collections::HashMap, path::PathBuf, sync::Arc};

pub use crate::agent_client::SandboxRef;
use crate::{
    agent_client::ClientError,
    config::{NetworkMode, ShimConfig},
    hostlo::HostloError,
};

pub mod agent;
pub mod attach;
mod disabled;
pub mod guest;
pub use disabled::Disabled;

/// What the task service knows about a sandbox when it asks for its network.
#[derive(Debug, Clone)]
pub struct PodNetRequest {
    /// The pod sandbox (the CRI sandbox id in the empty scope, or the
    /// container id in its containerd namespace outside CRI).
    pub sandbox: SandboxRef,
    /// Path of the sandbox's network namespace (a bind mount from CRI, or
    /// `/proc/<pid>/ns/net` of the created init process).
    pub netns: PathBuf,
    /// Labels worth keeping with the NIC (pod name and namespace).
    pub labels: HashMap<String, String>,
    /// The namespace is the container's alone (outside CRI: ctr, Docker): one
    /// that holds another network manager's interface (Docker's veth on one of
    /// its networks) is refused ([`guest::GuestNetError::NotOurs`]) instead of
    /// two NICs fighting over the interface name and the default route. In the
    /// CRI path the namespace is CRI's and its CNI chain's, which may add other
    /// interfaces (a second network): `false`.
    pub exclusive: bool,
}

/// What the sandbox got.
#[derive(Debug, Clone)]
pub struct PodNetInfo {
    /// Interface name inside the pod netns (normally `eth0`).
    pub interface: String,
    /// MAC address of the host-provided NIC.
    pub mac: String,
    /// Addresses in CIDR form.
    pub addresses: Vec<String>,
}

/// Errors of the pod-network seam.
#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    /// The host agent refused, could not be reached, or replied unusably.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Joining the sandbox's Hostlo pod failed (or its annotations are wrong).
    #[error("cannot join the Hostlo pod")]
    Hostlo(#[from] HostloError),
    /// Plugging the NIC into the pod failed.
    #[error(transparent)]
    Guest(#[from] guest::GuestNetError),
}

impl PodNetError {
    /// The ttrpc status code containerd should see: the host agent's own
    /// code when it refused (also a Hostlo join), `UNAVAILABLE` when it could
    /// not be reached, `INTERNAL` for anything else.
    pub fn code(&self) -> ttrpc::Code {
        match self {
            Self::Client(e) | Self::Hostlo(HostloError::Agent(e)) => e.code(),
            Self::Guest(guest::GuestNetError::NotOurs { .. }) => ttrpc::Code::FAILED_PRECONDITION,
            Self::Hostlo(_) | Self::Guest(_) => ttrpc::Code::INTERNAL,
        }
    }
}

/// Builds the pod network backend `config` asks for.
pub fn from_config(config: &ShimConfig) -> Arc<dyn PodNetwork> {
    match config.network.mode {
        NetworkMode::None => Arc::new(Disabled),
        NetworkMode::Agent => Arc::new(agent::AgentNetwork::new(
            config.agent.clone(),
            config.network.clone(),
        )),
    }
}

/// The pod-network seam.
#[async_trait::async_trait]
pub trait PodNetwork: Send + Sync {
    /// Gives the sandbox its NIC, configured inside `req.netns`. Idempotent.
    /// A setup that fails gives back what it made, and only that: a NIC the
    /// sandbox already had (nestless-cni's, or an earlier call's) stays.
    async fn setup(&self, req: &PodNetRequest) -> Result<PodNetInfo, PodNetError>;
    /// Releases every NIC of the sandbox. Idempotent; succeeds when there is
    /// nothing to release.
    async fn teardown(&self, sandbox: &SandboxRef) -> Result<(), PodNetError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_codes_pass_through() {
        let refused = |code| ClientError::AgentRefused {
            op: "AttachNic",
            code,
            message: "no".into(),
        };
        for code in [
            ttrpc::Code::RESOURCE_EXHAUSTED,
            ttrpc::Code::PERMISSION_DENIED,
            ttrpc::Code::INVALID_ARGUMENT,
            ttrpc::Code::DEADLINE_EXCEEDED,
        ] {
            assert_eq!(PodNetError::from(refused(code)).code(), code);
            assert_eq!(
                PodNetError::from(HostloError::Agent(refused(code))).code(),
                code
            );
        }
        let unreachable = ClientError::AgentUnavailable {
            address: "vsock://2:7070".into(),
            reason: "refused".into(),
        };
        assert_eq!(
            PodNetError::from(unreachable).code(),
            ttrpc::Code::UNAVAILABLE
        );
        let bad_annotation = HostloError::Annotation {
            key: crate::hostlo::PART_ANNOTATION,
            reason: "x".into(),
        };
        assert_eq!(
            PodNetError::from(bad_annotation).code(),
            ttrpc::Code::INTERNAL
        );
        let guest = guest::GuestNetError::NicNotFound {
            mac: "02:00:00:00:00:01".into(),
            after: std::time::Duration::from_secs(3),
        };
        assert_eq!(PodNetError::from(guest).code(), ttrpc::Code::INTERNAL);
    }

    #[tokio::test]
    async fn every_mode_has_a_backend() {
        // `mode = "none"` gets the backend that does nothing; `agent` one that
        // needs the agent (its teardown fails without one).
        let mut c = ShimConfig::default();
        c.agent.address = crate::config::AgentAddress::Unix("/nonexistent/agent.sock".into());
        c.agent.connect_timeout = std::time::Duration::from_millis(10);
        let sb = SandboxRef::new("default", "s");
        assert!(from_config(&c).teardown(&sb).await.is_err());
        c.network.mode = NetworkMode::None;
        from_config(&c).teardown(&sb).await.unwrap();
    }
}
