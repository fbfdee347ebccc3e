//! A recording [`HostLinks`] for tests without root: links that "exist" are
//! names in a set, every call is logged, and one operation can be made to
//! fail. Compiled for unit tests and with the `testing` feature, never into a
//! release binary.

use std::{
    collections::{BTreeSet, HashSet},
    net::IpAddr,
    os::fd::OwnedFd,
    path::Path,
    sync::Mutex,
};

use nestless_model::MacAddr;

use super::{HostLinks, LinkError};

/// Links that "exist", and calls made.
#[derive(Default)]
pub struct FakeLinks {
    /// Existing link names.
    pub links: Mutex<BTreeSet<String>>,
    /// Calls, in order.
    pub calls: Mutex<Vec<String>>,
    /// Operation name that fails next (`create_veth`, `join_bridge`...).
    pub fail: Mutex<Option<&'static str>>,
    /// The errno of that failure (`EIO` when unset).
    pub fail_errno: Mutex<Option<i32>>,
}

/// A real netlink call suspends the caller; so does this, so that
/// concurrent callers interleave as they do on a real host.
async fn round_trip() {
    tokio::task::yield_now().await;
}

impl FakeLinks {
    fn call(&self, op: &'static str, what: &str) -> Result<(), LinkError> {
        self.calls.lock().unwrap().push(format!("{op} {what}"));
        if *self.fail.lock().unwrap() == Some(op) {
            *self.fail.lock().unwrap() = None;
            return Err(LinkError::new(
                op,
                what,
                std::io::Error::from_raw_os_error(
                    self.fail_errno.lock().unwrap().take().unwrap_or(libc::EIO),
                ),
            ));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl HostLinks for FakeLinks {
    async fn exists(&self, ifname: &str) -> Result<bool, LinkError> {
        Ok(self.links.lock().unwrap().contains(ifname))
    }
    async fn ensure_bridge(
        &self,
        bridge: &str,
        _: Option<(IpAddr, u8)>,
        _: u32,
    ) -> Result<(), LinkError> {
        self.call("ensure_bridge", bridge)?;
        self.links.lock().unwrap().insert(bridge.to_string());
        Ok(())
    }
    async fn ensure_segment(&self, name: &str, _: u32) -> Result<(), LinkError> {
        round_trip().await;
        self.call("ensure_segment", name)?;
        self.links.lock().unwrap().insert(name.to_string());
        Ok(())
    }
    async fn create_veth(
        &self,
        host: &str,
        guest: &str,
        _: MacAddr,
        _: u32,
        _: &Path,
    ) -> Result<(), LinkError> {
        round_trip().await;
        self.call("create_veth", host)?;
        self.links.lock().unwrap().insert(host.to_string());
        let _ = guest;
        Ok(())
    }
    fn open_tap(&self, name: &str) -> Result<OwnedFd, LinkError> {
        self.call("open_tap", name)?;
        self.links.lock().unwrap().insert(name.to_string());
        Ok(std::fs::File::open("/dev/null").unwrap().into())
    }
    fn persist_tap(&self, _fd: OwnedFd, name: &str) -> Result<(), LinkError> {
        self.call("persist_tap", name)
    }
    async fn join_bridge(&self, ifname: &str, bridge: &str, _: u32) -> Result<(), LinkError> {
        round_trip().await;
        self.call("join_bridge", &format!("{ifname} {bridge}"))
    }
    async fn delete(&self, ifname: &str) -> Result<bool, LinkError> {
        round_trip().await;
        self.call("delete", ifname)?;
        Ok(self.links.lock().unwrap().remove(ifname))
    }
    async fn names(&self, prefix: &str) -> Result<HashSet<String>, LinkError> {
        Ok(self
            .links
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with(prefix))
            .cloned()
            .collect())
    }
    async fn forget_neighbours(&self, bridge: &str, addrs: &[IpAddr]) -> Result<(), LinkError> {
        let addrs: Vec<String> = addrs.iter().map(IpAddr::to_string).collect();
        self.call(
            "forget_neighbours",
            &format!("{bridge} {}", addrs.join(",")),
        )
    }
    async fn list_owned(&self, prefix: &str) -> Result<Vec<String>, LinkError> {
        Ok(self
            .links
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with(prefix))
            .cloned()
            .collect())
    }
}
