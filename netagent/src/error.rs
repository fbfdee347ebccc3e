//! The agent's errors and their one mapping onto ttrpc status codes.

use crate::{
    backend::BackendError, ipam::IpamError, names::Invalid, stale::StaleRecords, state::StateError,
};

/// Most bytes of the text of a status the agent replies with.
pub const MAX_STATUS_TEXT: usize = 1024;

/// What can go wrong serving a request.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A VM cannot stop being served while it has NICs.
    #[error("VM {vm} has {count} NIC(s): detach them first, or unregister with force")]
    VmHasNics {
        /// The VM.
        vm: String,
        /// How many NICs it has.
        count: usize,
    },
    /// The caller is not a VM this agent serves.
    #[error("unknown VM: {0}")]
    UnknownVm(String),
    /// A request field is malformed.
    #[error("invalid request: {0}")]
    Invalid(#[from] Invalid),
    /// The VM has no such NIC (it may be another VM's: that is not told).
    #[error("VM {vm} has no NIC {what}")]
    NicNotFound {
        /// The calling VM.
        vm: String,
        /// What was asked for ("id X", "for sandbox Y").
        what: String,
    },
    /// The VM may not use that network.
    #[error("VM {vm} may not use network {network:?} (its network is {allowed:?})")]
    NetworkNotAllowed {
        /// The calling VM.
        vm: String,
        /// The network asked for.
        network: String,
        /// The VM's network.
        allowed: String,
    },
    /// The VM has as many NICs as it may.
    #[error("VM {vm} already has {quota} NICs, its quota")]
    QuotaExceeded {
        /// The VM.
        vm: String,
        /// Its quota.
        quota: u32,
    },
    /// A Hostlo part is already held by another VM (of the caller's own
    /// tenant network: pods are named per network).
    #[error("part {part} of Hostlo pod {pod:?} is already in VM {vm}")]
    HostloPartTaken {
        /// The pod.
        pod: String,
        /// The part.
        part: u32,
        /// The VM holding it.
        vm: String,
    },
    /// Address allocation failed.
    #[error(transparent)]
    Ipam(#[from] IpamError),
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The state file could not be read or written.
    #[error(transparent)]
    State(#[from] StateError),
    /// An operation's task ended before the operation did (the runtime
    /// is shutting down, or a bug panicked it).
    #[error(
        "the {op} operation was interrupted (the agent is stopping?); the next start recovers it"
    )]
    Interrupted {
        /// The operation (`AttachNic`, `HostloJoin`, …).
        op: &'static str,
    },
    /// The state file has records the configuration does not account for
    /// (at start only).
    #[error(transparent)]
    Stale(#[from] StaleRecords),
    /// The caller made more requests than its budget allows (issue 11,
    /// item 1).
    #[error("{who} is over its request budget ({burst} at once, then {per_second}/s: keys agent.request_burst_per_vm, agent.requests_per_sec_per_vm); retry later")]
    RequestBudget {
        /// The caller (`VM a`, `the admin socket`).
        who: String,
        /// Requests at once.
        burst: u32,
        /// Requests per second.
        per_second: u32,
    },
    /// Every MAC under the configured prefix is taken.
    #[error("no free MAC address is left under the prefix {prefix} (agent.mac_prefix)")]
    NoFreeMac {
        /// The prefix, as configured.
        prefix: String,
    },
}

impl AgentError {
    /// The ttrpc status code for this error.
    pub fn code(&self) -> ttrpc::Code {
        use ttrpc::Code;
        match self {
            AgentError::UnknownVm(_) => Code::PERMISSION_DENIED,
            AgentError::VmHasNics { .. } => Code::FAILED_PRECONDITION,
            AgentError::Invalid(_) => Code::INVALID_ARGUMENT,
            AgentError::NicNotFound { .. } => Code::NOT_FOUND,
            AgentError::NetworkNotAllowed { .. } => Code::PERMISSION_DENIED,
            AgentError::QuotaExceeded { .. } => Code::RESOURCE_EXHAUSTED,
            AgentError::HostloPartTaken { .. } => Code::ALREADY_EXISTS,
            AgentError::Ipam(_) => Code::RESOURCE_EXHAUSTED,
            AgentError::Backend(BackendError::NoFreeSlot { .. }) => Code::RESOURCE_EXHAUSTED,
            AgentError::Backend(BackendError::BridgeFull { .. }) => Code::RESOURCE_EXHAUSTED,
            AgentError::Backend(BackendError::UnplugTimeout { .. }) => Code::DEADLINE_EXCEEDED,
            AgentError::Backend(e) if e.is_unavailable() => Code::UNAVAILABLE,
            AgentError::Backend(_) => Code::INTERNAL,
            AgentError::State(_) | AgentError::Stale(_) => Code::INTERNAL,
            AgentError::Interrupted { .. } => Code::UNAVAILABLE,
            AgentError::NoFreeMac { .. } => Code::RESOURCE_EXHAUSTED,
            AgentError::RequestBudget { .. } => Code::RESOURCE_EXHAUSTED,
        }
    }

    /// The error as a ttrpc error carrying a status; its text cut at
    /// [`MAX_STATUS_TEXT`] bytes (each value it quotes is already cut, see
    /// [`crate::names::Quoted`]: this is the last bound).
    pub fn to_ttrpc(&self) -> ttrpc::Error {
        let mut text = self.to_string();
        if text.len() > MAX_STATUS_TEXT {
            let mut end = MAX_STATUS_TEXT;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            let full = text.len();
            text.truncate(end);
            text += &format!("…({full} bytes)");
        }
        ttrpc::Error::RpcStatus(ttrpc::get_status(self.code(), text))
    }
}

impl From<AgentError> for ttrpc::Error {
    fn from(e: AgentError) -> ttrpc::Error {
        e.to_ttrpc()
    }
}

impl From<Invalid> for ttrpc::Error {
    fn from(e: Invalid) -> ttrpc::Error {
        AgentError::from(e).to_ttrpc()
    }
}
