//! `[network] mode = "none"`: the pod network backend that does nothing.
//!
//! The sandbox keeps whatever network runc or CNI gave it; no NIC is asked
//! for and none is released.

use super::{PodNetError, PodNetInfo, PodNetRequest, PodNetwork, SandboxRef};

/// A [`PodNetwork`] that attaches nothing and releases nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Disabled;

#[async_trait::async_trait]
impl PodNetwork for Disabled {
    async fn setup(&self, _req: &PodNetRequest) -> Result<PodNetInfo, PodNetError> {
        Ok(PodNetInfo {
            interface: String::new(),
            mac: String::new(),
            addresses: Vec::new(),
        })
    }

    async fn teardown(&self, _sandbox: &SandboxRef) -> Result<(), PodNetError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[tokio::test]
    async fn does_nothing() {
        let req = PodNetRequest {
            sandbox: SandboxRef::new("default", "s"),
            netns: "/proc/1/ns/net".into(),
            labels: HashMap::new(),
            exclusive: true,
        };
        let info = Disabled.setup(&req).await.unwrap();
        assert!(info.addresses.is_empty());
        Disabled.teardown(&req.sandbox).await.unwrap();
    }
}
