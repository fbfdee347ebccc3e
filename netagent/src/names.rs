//! Names and small checked values of the agent: NIC ids, the names derived
//! from them on the host and in QEMU, and [`Invalid`], the error of a value
//! that breaks a rule. (MAC addresses are `nestless_model::MacAddr`, shared
//! with the shim.)
//!
//! This module sits at the bottom of the agent: it imports nothing of it, so
//! the pure rule modules ([`crate::hostlo`]) and the request parsers
//! ([`crate::server::convert`]) can return [`Invalid`] without depending on
//! [`crate::error::AgentError`], which wraps it.

use std::{fmt, str::FromStr};

use nestless_model::MacAddr;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// A request field that breaks a rule: which field, and why. Becomes
/// [`crate::error::AgentError::Invalid`] (ttrpc `INVALID_ARGUMENT`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Invalid {
    /// The field, as the protocol names it (`sandbox_id`, `ports.port`).
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl Invalid {
    /// `field` is wrong because of `reason`.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Invalid {
        Invalid {
            field,
            reason: reason.into(),
        }
    }
}

/// Most bytes of an input value an error text quotes (issue 11, item 4).
pub const MAX_QUOTED: usize = 64;

/// A value from a request as an error text quotes it: escaped (`{:?}`), and
/// when longer than [`MAX_QUOTED`] bytes cut on a character boundary, with
/// `…` and the full length: `"aaaa"…(1048576 bytes)`. A refusal so costs a
/// bounded reply (and log line) whatever the request held.
pub struct Quoted<'a>(pub &'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_bounded(f, self.0, MAX_QUOTED)
    }
}

/// Writes `s` quoted and escaped (no control character is written raw),
/// at most `max` bytes of it as escaped, then `…` and the full length when
/// cut.
pub fn write_bounded(f: &mut fmt::Formatter<'_>, s: &str, max: usize) -> fmt::Result {
    let mut shown = String::with_capacity(max.min(s.len() * 2) + 8);
    for c in s.chars() {
        let before = shown.len();
        shown.extend(c.escape_debug());
        if shown.len() > max {
            shown.truncate(before);
            return write!(f, "\"{shown}\"…({} bytes)", s.len());
        }
    }
    write!(f, "\"{shown}\"")
}

/// Longest sandbox id accepted.
pub const MAX_SANDBOX_ID: usize = 128;

/// A sandbox id from a request, checked: 1 to 128 characters of
/// `[A-Za-z0-9_.-]`. The idempotency key of an attach within a VM.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SandboxId(String);

impl SandboxId {
    /// Checks `id` (field `sandbox_id`).
    pub fn parse(id: &str) -> Result<SandboxId, Invalid> {
        if id.is_empty() || id.len() > MAX_SANDBOX_ID {
            return Err(Invalid::new(
                "sandbox_id",
                format!("must be 1 to {MAX_SANDBOX_ID} characters"),
            ));
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            return Err(Invalid::new(
                "sandbox_id",
                format!("{} has characters outside [A-Za-z0-9_.-]", Quoted(id)),
            ));
        }
        Ok(SandboxId(id.to_string()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Longest scope accepted (containerd's limit on namespace names).
pub const MAX_SCOPE: usize = 76;

/// The namespace a sandbox id is unique in, checked: 0 to [`MAX_SCOPE`]
/// characters of `[A-Za-z0-9_.-]`. The containerd namespace of a container
/// the shim attaches outside CRI; empty for CRI sandboxes and CNI
/// attachments, whose ids containerd makes unique across namespaces.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope(String);

impl Scope {
    /// Checks `scope` (field `scope`).
    pub fn parse(scope: &str) -> Result<Scope, Invalid> {
        if scope.len() > MAX_SCOPE {
            return Err(Invalid::new(
                "scope",
                format!("must be at most {MAX_SCOPE} characters"),
            ));
        }
        if !scope
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            return Err(Invalid::new(
                "scope",
                format!("{} has characters outside [A-Za-z0-9_.-]", Quoted(scope)),
            ));
        }
        Ok(Scope(scope.to_string()))
    }

    /// The scope as text (empty for CRI and CNI).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The interface name a NIC takes in the pod when the request names none.
pub const DEFAULT_IFNAME: &str = "eth0";

/// Longest Linux interface name (IFNAMSIZ less its NUL).
pub const MAX_IFNAME: usize = 15;

/// Checks a Linux interface name as the kernel does (`dev_valid_name`):
/// 1 to 15 bytes, not `.` or `..`, no `/`, `:`, whitespace or NUL; and,
/// stricter than the kernel, no control character (a name that would
/// garble every log line and `ip link` listing it appears in).
pub fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_IFNAME {
        return Err(format!(
            "{} is not 1 to {MAX_IFNAME} bytes (IFNAMSIZ)",
            Quoted(name)
        ));
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b.is_ascii_control())
        || name == "."
        || name == ".."
    {
        return Err(format!("{} is not a valid interface name", Quoted(name)));
    }
    Ok(())
}

/// The interface name a NIC takes in the pod (CNI_IFNAME), checked; an
/// empty request field means [`DEFAULT_IFNAME`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IfName(String);

impl IfName {
    /// Checks `name` (field `interface`); empty is [`DEFAULT_IFNAME`].
    pub fn parse(name: &str) -> Result<IfName, Invalid> {
        if name.is_empty() {
            return Ok(IfName::default());
        }
        check_ifname(name).map_err(|reason| Invalid::new("interface", reason))?;
        Ok(IfName(name.to_string()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for IfName {
    /// [`DEFAULT_IFNAME`].
    fn default() -> IfName {
        IfName(DEFAULT_IFNAME.to_string())
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A random unicast MAC under `prefix` (the first bytes of the address; at
/// most 6). Without a prefix the address is locally administered.
pub fn random_mac(prefix: &[u8]) -> MacAddr {
    let mut bytes = [0u8; 6];
    rand::rng().fill(&mut bytes[..]);
    let n = prefix.len().min(6);
    bytes[..n].copy_from_slice(&prefix[..n]);
    if prefix.is_empty() {
        // Locally administered, unicast.
        bytes[0] = (bytes[0] | 0x02) & 0xfe;
    }
    MacAddr(bytes)
}

/// A unicast MAC under `prefix` that `taken` does not hold: random first
/// (a few draws), then a scan from a random point of what the prefix leaves
/// (at most 65,536 addresses). `None` when none is free, so that a full
/// prefix is an error rather than an endless search.
pub fn free_mac(prefix: &[u8], taken: impl Fn(&MacAddr) -> bool) -> Option<MacAddr> {
    const DRAWS: usize = 64;
    const SCAN: u64 = 1 << 16;
    let usable = |m: &MacAddr| !m.is_multicast() && !taken(m);
    if let Some(m) = (0..DRAWS).map(|_| random_mac(prefix)).find(usable) {
        return Some(m);
    }
    let n = prefix.len().min(6);
    let free_bits = 8 * (6 - n as u32);
    let space = 1u64 << free_bits;
    let start = rand::rng().random::<u64>() % space;
    (0..space.min(SCAN))
        .map(|k| {
            let v = ((start + k) % space).to_be_bytes();
            let mut bytes = [0u8; 6];
            bytes[..n].copy_from_slice(&prefix[..n]);
            bytes[n..].copy_from_slice(&v[8 - (6 - n)..]);
            if n == 0 {
                bytes[0] = (bytes[0] | 0x02) & 0xfe;
            }
            MacAddr(bytes)
        })
        .find(usable)
}

/// The MAC of a bridge the agent creates (a network's bridge with
/// `manage_bridge`, a Hostlo segment): derived from its name (64-bit FNV-1a),
/// locally administered and unicast. A bridge without a MAC of its own takes
/// the lowest MAC of its ports, so removing one pod's port could change the
/// gateway's MAC under every other pod; a MAC set once never changes.
pub fn bridge_mac(name: &str) -> MacAddr {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes().chain(*b"/bridge") {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut m = [0u8; 6];
    m.copy_from_slice(&h.to_be_bytes()[2..]);
    m[0] = (m[0] | 0x02) & 0xfe;
    MacAddr(m)
}

/// The MAC of a Hostlo segment bridge made by the agent whose owner alias is
/// `owner` ([`crate::links::owner_alias`]): fixed as [`bridge_mac`]'s, and
/// also the agent's mark from the moment the bridge exists. The kernel
/// applies a MAC given in the creating request but ignores an alias
/// (IFLA_IFALIAS is applied to existing links only), so a crash between
/// creating a segment and marking it would otherwise leave a bridge that no
/// sweep can tell from another agent's.
pub fn owned_bridge_mac(name: &str, owner: &str) -> MacAddr {
    bridge_mac(&format!("{name}\0{owner}"))
}

/// The agent's id for a NIC: 10 lower-case hex digits.
///
/// Every name the NIC has on the host and in QEMU is derived from it, so that
/// a restarted agent can find what a NIC left behind (see [`NicNames`]).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NicId(String);

impl NicId {
    /// Length of the hex id.
    pub const LEN: usize = 10;

    /// A fresh random id.
    pub fn random() -> NicId {
        let n: u64 = rand::rng().random::<u64>() & 0xff_ffff_ffff;
        NicId(format!("{n:010x}"))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The names derived from this id.
    pub fn names(&self) -> NicNames {
        NicNames::for_id(self)
    }
}

impl TryFrom<String> for NicId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        if s.len() == Self::LEN
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(NicId(s))
        } else {
            Err(format!(
                "{} is not a NIC id (10 lower-case hex digits)",
                Quoted(&s)
            ))
        }
    }
}

impl FromStr for NicId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NicId::try_from(s.to_string())
    }
}

impl From<NicId> for String {
    fn from(id: NicId) -> String {
        id.0
    }
}

impl fmt::Display for NicId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NicId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Prefix of every host interface the agent creates (taps, veth host ends).
pub const HOST_IF_PREFIX: &str = "nlh";
/// Prefix of the guest end of a veth (netns backend) before the guest renames it.
pub const GUEST_IF_PREFIX: &str = "nlg";
/// Prefix of the Hostlo segment bridges (`crate::hostlo::SEGMENT_PREFIX`;
/// a test keeps the two equal).
pub const SEGMENT_PREFIX: &str = "nls";
/// The prefixes of the host links the agent makes and sweeps: no link of
/// the operator's (a network's bridge) may start with one.
pub const AGENT_LINK_PREFIXES: [&str; 3] = [HOST_IF_PREFIX, GUEST_IF_PREFIX, SEGMENT_PREFIX];
/// Prefix of QEMU device ids the agent creates.
pub const QEMU_DEVICE_PREFIX: &str = "nl-";
/// Prefix of QEMU netdev ids the agent creates.
pub const QEMU_NETDEV_PREFIX: &str = "nln-";
/// Prefix of file descriptor names the agent passes to QEMU.
pub const QEMU_FD_PREFIX: &str = "nlf-";

/// Every name a NIC has outside the agent, derived from its [`NicId`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicNames {
    /// Host interface: the tap (qemu) or the host end of the veth (netns).
    pub host_if: String,
    /// Guest end of the veth (netns backend).
    pub guest_if: String,
    /// QEMU device id (`device_add id=`).
    pub device: String,
    /// QEMU netdev id (`netdev_add id=`).
    pub netdev: String,
    /// Name of the tap fd passed to QEMU with `getfd`.
    pub fd_name: String,
}

impl NicNames {
    fn for_id(id: &NicId) -> NicNames {
        NicNames {
            host_if: format!("{HOST_IF_PREFIX}{id}"),
            guest_if: format!("{GUEST_IF_PREFIX}{id}"),
            device: format!("{QEMU_DEVICE_PREFIX}{id}"),
            netdev: format!("{QEMU_NETDEV_PREFIX}{id}"),
            fd_name: format!("{QEMU_FD_PREFIX}{id}"),
        }
    }

    /// The NIC id a host interface, device or netdev name was derived from.
    pub fn id_from_name(name: &str) -> Option<NicId> {
        [
            HOST_IF_PREFIX,
            GUEST_IF_PREFIX,
            QEMU_NETDEV_PREFIX,
            QEMU_DEVICE_PREFIX,
            QEMU_FD_PREFIX,
        ]
        .iter()
        .find_map(|p| name.strip_prefix(p))
        .and_then(|rest| rest.parse().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip_and_errors() {
        let m: MacAddr = "52:54:00:AB:cd:01".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:01");
        assert_eq!("52-54-00-ab-cd-01".parse::<MacAddr>().unwrap(), m);
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:01:02",
            "5:54:00:ab:cd:01",
            "zz:54:00:ab:cd:01",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn random_macs_keep_prefix_and_are_unicast() {
        for _ in 0..100 {
            let m = random_mac(&[0x52, 0x54, 0x00]);
            assert_eq!(&m.0[..3], &[0x52, 0x54, 0x00]);
            let m = random_mac(&[]);
            assert!(!m.is_multicast());
            assert_eq!(m.0[0] & 0x02, 0x02, "locally administered");
        }
    }

    /// A prefix leaves a finite space: its last free MAC is found, and a
    /// full space is `None`, not an endless search.
    #[test]
    fn free_mac_finds_the_last_one_and_ends_when_none_is_left() {
        let prefix = [0x52, 0x54, 0x00, 0x12, 0x34];
        let last = MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x7f]);
        assert_eq!(free_mac(&prefix, |m| *m != last), Some(last));
        assert_eq!(free_mac(&prefix, |_| true), None);
        let m = free_mac(&[], |_| false).unwrap();
        assert!(!m.is_multicast() && m.is_local());
        assert_eq!(free_mac(&[], |_| true), None);
    }

    #[test]
    fn names_fit_in_ifnamsiz_and_map_back() {
        let id = NicId::random();
        let names = id.names();
        assert!(names.host_if.len() <= 15 && names.guest_if.len() <= 15);
        for n in [
            &names.host_if,
            &names.guest_if,
            &names.device,
            &names.netdev,
            &names.fd_name,
        ] {
            assert_eq!(NicNames::id_from_name(n), Some(id.clone()), "{n}");
        }
        assert_eq!(NicNames::id_from_name("nlhxyz"), None);
        assert_eq!(NicNames::id_from_name("eth0"), None);
    }

    #[test]
    fn sandbox_id_rules() {
        assert_eq!(SandboxId::parse("pod-1_a.b").unwrap().as_str(), "pod-1_a.b");
        for bad in ["", "a/b", "../etc", &"x".repeat(129)] {
            let e = SandboxId::parse(bad).unwrap_err();
            assert_eq!(e.field, "sandbox_id", "{bad}");
        }
        assert!(SandboxId::parse(&"x".repeat(128)).is_ok());
    }

    #[test]
    fn owned_bridge_macs_differ_per_owner() {
        let a = owned_bridge_mac("nls0123abcd", "nestless-netagent /var/lib/a");
        assert_eq!(
            a,
            owned_bridge_mac("nls0123abcd", "nestless-netagent /var/lib/a")
        );
        assert_ne!(
            a,
            owned_bridge_mac("nls0123abcd", "nestless-netagent /var/lib/b")
        );
        assert_ne!(a, bridge_mac("nls0123abcd"));
        assert_eq!(a.0[0] & 0x03, 0x02, "locally administered unicast: {a}");
    }

    #[test]
    fn bridge_macs_are_fixed_local_and_unicast() {
        let m = bridge_mac("nlbr0");
        assert_eq!(m, bridge_mac("nlbr0"), "stable");
        assert_ne!(m, bridge_mac("nlbr1"));
        for name in ["nlbr0", "nls0badf00d", "b", ""] {
            let m = bridge_mac(name);
            assert!(m.is_local() && !m.is_multicast(), "{name}: {m}");
        }
    }

    #[test]
    fn scope_rules() {
        assert_eq!(Scope::parse("").unwrap().as_str(), "");
        assert_eq!(Scope::parse("team-one").unwrap().as_str(), "team-one");
        assert!(Scope::parse(&"n".repeat(76)).is_ok());
        for bad in ["a/b", "team one", "k8s:io", &"n".repeat(77)] {
            assert_eq!(Scope::parse(bad).unwrap_err().field, "scope", "{bad}");
        }
    }

    #[test]
    fn interface_rules() {
        assert_eq!(IfName::parse("").unwrap().as_str(), "eth0", "empty is eth0");
        assert_eq!(IfName::parse("net1").unwrap().as_str(), "net1");
        assert!(IfName::parse(&"n".repeat(15)).is_ok());
        for bad in [
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "a\u{1}b",
            "a\u{7f}",
            "a\nb",
            &"n".repeat(16),
        ] {
            assert_eq!(IfName::parse(bad).unwrap_err().field, "interface", "{bad}");
        }
    }

    #[test]
    fn agent_link_prefixes_are_the_agents_own() {
        assert_eq!(SEGMENT_PREFIX, crate::hostlo::SEGMENT_PREFIX);
        let id = NicId::random();
        for name in [
            id.names().host_if,
            id.names().guest_if,
            crate::hostlo::segment_bridge("net", "db"),
        ] {
            assert!(
                AGENT_LINK_PREFIXES.iter().any(|p| name.starts_with(p)),
                "{name}"
            );
        }
    }

    #[test]
    fn nic_id_validation() {
        assert!("0123456789".parse::<NicId>().is_ok());
        assert!("0123456789a".parse::<NicId>().is_err());
        assert!("ABCDEF0123".parse::<NicId>().is_err());
    }
}
