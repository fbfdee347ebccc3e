//! The shim's errors, and their one mapping to ttrpc status codes.
//!
//! Every failure of a Task API call is a [`ShimError`]; [`ShimError::code`]
//! chooses the gRPC code containerd sees (containerd turns `NotFound`,
//! `AlreadyExists` and `FailedPrecondition` into its own errdefs, which e.g.
//! CRI relies on when it stops a container that already exited; a pod
//! network failure carries the host agent's own code, so that its
//! `RESOURCE_EXHAUSTED` reaches containerd as such), and
//! `From<ShimError> for ttrpc::Error` renders the message with its chain of
//! causes.

use std::{error::Error as _, fmt::Write as _, path::PathBuf};

use containerd_shim_protos::ttrpc::{self, Code};

use crate::{config::ConfigError, podnet::PodNetError};

/// A failure of a Task API call (or of the shim's bootstrap commands).
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// No container with this id is served by this shim.
    #[error("container {0} not found")]
    ContainerNotFound(String),
    /// The container has no process with this exec id.
    #[error("process {exec_id} of container {id} not found")]
    ProcessNotFound {
        /// Container id.
        id: String,
        /// Exec id.
        exec_id: String,
    },
    /// A container with this id already exists.
    #[error("container {0} already exists")]
    ContainerExists(String),
    /// An exec process with this id already exists.
    #[error("process {exec_id} of container {id} already exists")]
    ProcessExists {
        /// Container id.
        id: String,
        /// Exec id.
        exec_id: String,
    },
    /// The process has exited already (e.g. on Kill).
    #[error("process {0} has already exited")]
    ProcessExited(String),
    /// A request field is wrong.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The request field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The operation does not fit the process's state.
    #[error("cannot {action} process {id}: it is {state}")]
    FailedPrecondition {
        /// What was asked.
        action: &'static str,
        /// The process (container id, or container id/exec id).
        id: String,
        /// Its state.
        state: &'static str,
    },
    /// The shim configuration is wrong.
    #[error("shim configuration")]
    Config(#[from] ConfigError),
    /// A runc command failed.
    #[error("runc {command} {id} failed: {message}")]
    Runc {
        /// The runc subcommand.
        command: &'static str,
        /// The container id.
        id: String,
        /// runc's own account (its last error line).
        message: String,
        /// Whether runc said that the container does not exist.
        not_found: bool,
    },
    /// runc could not be run at all.
    #[error("cannot run {binary} {command}")]
    RuncSpawn {
        /// The binary.
        binary: PathBuf,
        /// The runc subcommand.
        command: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A system call or file operation failed.
    #[error("{context}")]
    Io {
        /// What was being done, with which input.
        context: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// Pod network setup failed.
    #[error("pod network of sandbox {sandbox_id}")]
    Network {
        /// The sandbox.
        sandbox_id: String,
        /// Why (boxed: the pod network's errors carry several names).
        #[source]
        source: Box<PodNetError>,
    },
    /// A helper of the containerd-shim crate failed (mounts, sockets).
    #[error("{context}")]
    Shim {
        /// What was being done.
        context: String,
        /// Why.
        #[source]
        source: containerd_shim::Error,
    },
    /// The API call is not supported by this shim.
    #[error("{0} is not supported by containerd-shim-nestless-v2")]
    Unsupported(&'static str),
}

/// Result of the shim's operations.
pub type Result<T, E = ShimError> = std::result::Result<T, E>;

impl ShimError {
    /// Shorthand for [`ShimError::Io`].
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// Shorthand for [`ShimError::InvalidArgument`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    /// The ttrpc (gRPC) status code containerd sees.
    pub fn code(&self) -> Code {
        match self {
            Self::ContainerNotFound(_) | Self::ProcessNotFound { .. } | Self::ProcessExited(_) => {
                Code::NOT_FOUND
            }
            Self::Runc {
                not_found: true, ..
            } => Code::NOT_FOUND,
            Self::ContainerExists(_) | Self::ProcessExists { .. } => Code::ALREADY_EXISTS,
            Self::InvalidArgument { .. } | Self::Config(_) => Code::INVALID_ARGUMENT,
            Self::FailedPrecondition { .. } => Code::FAILED_PRECONDITION,
            // The host agent's code: RESOURCE_EXHAUSTED stays RESOURCE_EXHAUSTED.
            Self::Network { source, .. } => source.code(),
            Self::Unsupported(_) => Code::UNIMPLEMENTED,
            Self::Runc { .. } | Self::RuncSpawn { .. } | Self::Io { .. } | Self::Shim { .. } => {
                Code::INTERNAL
            }
        }
    }

    /// The message with its causes, `outer: inner: innermost`.
    pub fn chain(&self) -> String {
        let mut s = self.to_string();
        let mut cause = self.source();
        while let Some(c) = cause {
            let _ = write!(s, ": {c}");
            cause = c.source();
        }
        s
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(e: ShimError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.chain()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent_client::ClientError;

    #[test]
    fn codes() {
        assert_eq!(
            ShimError::ContainerNotFound("c".into()).code(),
            Code::NOT_FOUND
        );
        assert_eq!(
            ShimError::ContainerExists("c".into()).code(),
            Code::ALREADY_EXISTS
        );
        assert_eq!(
            ShimError::invalid("id", "empty").code(),
            Code::INVALID_ARGUMENT
        );
        assert_eq!(
            ShimError::Runc {
                command: "kill",
                id: "c".into(),
                message: "container does not exist".into(),
                not_found: true
            }
            .code(),
            Code::NOT_FOUND
        );
        assert_eq!(
            ShimError::Unsupported("checkpoint").code(),
            Code::UNIMPLEMENTED
        );
        let e = ShimError::Network {
            sandbox_id: "s".into(),
            source: Box::new(PodNetError::Client(ClientError::AgentUnavailable {
                address: "vsock://2:7070".into(),
                reason: "refused".into(),
            })),
        };
        assert_eq!(e.code(), Code::UNAVAILABLE);
        let e = ShimError::Network {
            sandbox_id: "s".into(),
            source: Box::new(PodNetError::Client(ClientError::AgentRefused {
                op: "AttachNic",
                code: Code::RESOURCE_EXHAUSTED,
                message: "VM vm1 has 4 NICs (max_nics = 4)".into(),
            })),
        };
        assert_eq!(e.code(), Code::RESOURCE_EXHAUSTED);
        // The guest's failure reads once, without Debug noise.
        let guest = ShimError::Network {
            sandbox_id: "team-one/app".into(),
            source: Box::new(PodNetError::Guest(
                crate::podnet::guest::GuestNetError::Route {
                    route: "fd00:20::/64 via fd00:20::1".into(),
                    error: std::io::Error::from_raw_os_error(libc::EHOSTUNREACH),
                },
            )),
        };
        assert_eq!(
            guest.chain(),
            "pod network of sandbox team-one/app: cannot add route fd00:20::/64 via fd00:20::1: \
             No route to host (os error 113)"
        );
        match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), Code::RESOURCE_EXHAUSTED);
                assert!(s.message().contains("max_nics"), "{}", s.message());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn message_carries_the_chain() {
        let e = ShimError::io(
            "cannot open /x",
            std::io::Error::from_raw_os_error(libc::ENOENT),
        );
        let t: ttrpc::Error = e.into();
        match t {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), Code::INTERNAL);
                assert!(
                    s.message().starts_with("cannot open /x: No such file"),
                    "{}",
                    s.message()
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
