//! Real network fixtures for tests: namespaces and bridges with random names,
//! removed on drop. Tests shell out to `ip` here (the product uses netlink).

use std::{
    path::PathBuf,
    process::{Command, Output},
};

/// Panics unless the test runs as root: such tests must fail, not skip.
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root (network namespaces, bridges, taps); run the suite as root"
    );
}

/// A short random suffix for names (6 hex digits).
pub fn suffix() -> String {
    format!("{:06x}", rand::random::<u32>() & 0xff_ffff)
}

/// Runs a command, returning its output whatever the status.
pub fn run(argv: &[&str]) -> Output {
    Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"))
}

/// Runs a command that must succeed; returns its stdout.
pub fn check(argv: &[&str]) -> String {
    let out = run(argv);
    assert!(
        out.status.success(),
        "{argv:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace `nlt-<suffix>` (in /run/netns), deleted on drop.
pub struct Netns {
    /// Its name.
    pub name: String,
}

impl Netns {
    /// Creates one, with `lo` up.
    pub fn new(tag: &str) -> Netns {
        let name = format!("nlt{tag}-{}", suffix());
        check(&["ip", "netns", "add", &name]);
        check(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    /// Its path.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs a command inside it.
    pub fn exec(&self, argv: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(argv);
        run(&full)
    }

    /// `ip -j link show` inside it, as JSON.
    pub fn links(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&check(&["ip", "-j", "-n", &self.name, "link", "show"]))
            .expect("ip -j output")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

/// A bridge `nltb<suffix>` with an address, deleted on drop.
pub struct Bridge {
    /// Its name.
    pub name: String,
}

impl Bridge {
    /// Creates one with `addr_cidr` (e.g. `10.77.3.1/24`) and sets it up. It gets a
    /// fixed MAC, as a host's bridge has (its uplink's) and as the agent gives the
    /// bridges it makes: a bridge without one takes the lowest MAC of its ports, and
    /// changes it when that port goes, which leaves every pod with a stale neighbour
    /// entry for its gateway (a test then fails depending on random MACs).
    pub fn new(addr_cidr: Option<&str>) -> Bridge {
        let name = format!("nltb{}", suffix());
        let r = rand::random::<[u8; 3]>();
        let mac = format!("02:4e:54:{:02x}:{:02x}:{:02x}", r[0], r[1], r[2]);
        check(&[
            "ip", "link", "add", &name, "address", &mac, "type", "bridge",
        ]);
        if let Some(a) = addr_cidr {
            check(&["ip", "addr", "add", a, "dev", &name]);
        }
        check(&["ip", "link", "set", &name, "up"]);
        Bridge { name }
    }

    /// Names of the links enslaved to it.
    pub fn ports(&self) -> Vec<String> {
        Bridge::ports_of(&self.name)
    }

    /// Names of the links enslaved to bridge `name` (one this test did not make).
    pub fn ports_of(name: &str) -> Vec<String> {
        let v: Vec<serde_json::Value> =
            serde_json::from_str(&check(&["ip", "-j", "link", "show", "master", name]))
                .expect("ip -j output");
        v.iter()
            .filter_map(|l| l["ifname"].as_str().map(str::to_string))
            .collect()
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = run(&["ip", "link", "del", &self.name]);
    }
}

/// A random private /24 in 10.64.0.0/10 as (prefix "10.a.b", e.g. for `.1`).
pub fn random_subnet() -> String {
    let r = rand::random::<u16>();
    format!("10.{}.{}", 64 + (r >> 8) % 64, r & 0xff)
}

/// Host links whose name starts with `prefix`.
pub fn host_links(prefix: &str) -> Vec<String> {
    let v: Vec<serde_json::Value> =
        serde_json::from_str(&check(&["ip", "-j", "link", "show"])).expect("ip -j output");
    v.iter()
        .filter_map(|l| l["ifname"].as_str())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}
