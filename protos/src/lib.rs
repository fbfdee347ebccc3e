//! The nestless host agent protocol, `nestless.agent.v1`.
//!
//! The `.proto` lives in `proto/nestless/agent/v1/agent.proto`; the Rust is
//! generated at build time by ttrpc-codegen. This crate holds nothing else:
//! conversion into domain types happens in the crates that use it.

#![allow(
    missing_docs,
    clippy::all,
    unused_qualifications,
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    unused_imports,
    unused_mut,
    dead_code
)]

/// Protocol identifier reported by `Health` and `Status`.
pub const PROTOCOL_VERSION: &str = "nestless.agent.v1";

/// Default AF_VSOCK port the agent listens on (and the shim dials on CID 2).
pub const DEFAULT_VSOCK_PORT: u32 = 7070;

/// Messages of `nestless.agent.v1`.
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent/agent.rs"));
}

/// ttrpc services and clients (async) of `nestless.agent.v1`.
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent/agent_ttrpc.rs"));
}

pub use protobuf;
pub use ttrpc;
