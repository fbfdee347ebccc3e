//! Choosing the pod network backend from the shim configuration.
//!
//! The task service asks for a backend only when a container owns a pod
//! network (see [`crate::policy::network_role`]); the backend it gets is kept
//! with the container, so that the same one releases the network on delete.

use std::sync::Arc;

use crate::{
    config::{NetworkMode, ShimConfig},
    error::Result,
    podnet::{self, PodNetwork},
};

/// Builds the pod network backend `config` asks for.
pub fn backend_for(config: &ShimConfig) -> Result<Arc<dyn PodNetwork>> {
    match config.network.mode {
        NetworkMode::None => Ok(Arc::new(podnet::Disabled)),
        NetworkMode::Agent => Ok(Arc::new(podnet::agent::AgentNetwork::new(
            config.agent.clone(),
            config.network.clone(),
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_has_a_backend() {
        let mut c = ShimConfig::default();
        assert!(backend_for(&c).is_ok());
        c.network.mode = NetworkMode::None;
        assert!(backend_for(&c).is_ok());
    }
}
