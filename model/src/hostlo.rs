//! The Hostlo contract shared by the planner, the shim and the agent.
//!
//! The planner writes the annotations; containerd passes them to the shim
//! (where its runtime config lists them in `pod_annotations`); the shim joins
//! the pod through the agent, which builds the segment.

/// Annotation naming the Hostlo pod that a part belongs to (shared by all parts).
pub const POD_ANNOTATION: &str = "io.nestless.hostlo/pod";
/// Annotation giving the index of the part: `0`, `1`, …; part 0 holds the pod IP.
pub const PART_ANNOTATION: &str = "io.nestless.hostlo/part";
/// Annotation declaring ports the part serves, e.g. `80/tcp,53/udp`
/// (see [`crate::parse_port_list`]).
pub const PORTS_ANNOTATION: &str = "io.nestless.hostlo/ports";
/// The port of each part's mux on its segment address (TCP and UDP).
pub const MUX_PORT: u16 = 7071;
/// Interface name of the segment NIC inside the pod's network namespace.
pub const SEGMENT_IFNAME: &str = "hostlo0";
/// The segment subnet when the agent's `[hostlo] subnet` is not set: link
/// local, so that it never meets a tenant's addresses (segments never meet
/// each other either, so all share it).
pub const DEFAULT_SEGMENT_SUBNET: &str = "169.254.77.0/24";
/// The segment MTU when `[hostlo] mtu` is not set: it carries loopback traffic.
pub const DEFAULT_SEGMENT_MTU: u32 = 65520;
