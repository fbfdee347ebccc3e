//! Host tap devices for hot-plug tests (created with `ip`, removed on drop).

use std::process::Command;

/// A tap device on the host with a random name, deleted when dropped.
#[derive(Debug)]
pub struct HostTap {
    name: String,
}

impl HostTap {
    /// Creates a tap named `nlt-<random>` and sets it up.
    ///
    /// # Panics
    /// When `ip tuntap add` fails (not root, no `/dev/net/tun`).
    pub fn create() -> HostTap {
        let name = format!("nlt-{:08x}", rand::random::<u32>());
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"]);
        let tap = HostTap { name };
        ip(&["link", "set", "dev", &tap.name, "up"]);
        tap
    }

    /// The interface name (at most 12 characters).
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for HostTap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", "dev", &self.name])
            .output();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip {}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}
