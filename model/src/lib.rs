//! What the host agent, the shim and the planner share: the network
//! vocabulary both sides of the vsock speak, defined once.
//!
//! * [`MacAddr`]: a 48-bit MAC, written `52:54:00:12:34:56` (how the guest
//!   finds a host-provided NIC).
//! * [`Proto`] and [`Port`]: a port a Hostlo part serves, written `80/tcp`.
//! * [`hostlo`]: the Hostlo contract between the planner (which writes pod
//!   annotations), the shim (which reads them) and the agent (which builds
//!   the segment): annotation keys, the segment's interface name, mux port and
//!   default subnet.
//!
//! No I/O and no randomness here: this crate only parses, formats and names.
#![warn(missing_docs)]

pub mod hostlo;
pub mod mac;
mod port;

pub use mac::{MacAddr, MacParseError};
pub use port::{parse_port_list, Port, PortParseError, Proto};
