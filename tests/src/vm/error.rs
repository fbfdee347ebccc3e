//! The error type of the VM harness.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// What can go wrong while building, starting or talking to a test VM.
///
/// The text names what failed and with which input; the cause, if any, is the
/// [`source`](std::error::Error::source). [`chain`] renders both, for panic messages.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A program or file the harness needs is not there.
    #[error("{what} is missing; {hint}")]
    Missing {
        /// What is missing.
        what: String,
        /// How to provide it.
        hint: String,
    },
    /// The VM asked for cannot be built as configured.
    #[error("invalid VM configuration: {0}")]
    Invalid(String),
    /// A program could not be started.
    #[error("cannot start {program}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `tests/vm/build-guest.sh` failed.
    #[error("building the {variant} guest image failed ({status}); its output:\n{output}")]
    ImageBuild {
        /// The image variant.
        variant: String,
        /// The script's exit status.
        status: String,
        /// The script's standard error.
        output: String,
    },
    /// Connecting to a unix socket failed.
    #[error("cannot connect to {}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading or writing failed.
    #[error("I/O error on {what}")]
    Io {
        /// The file or connection.
        what: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A peer sent something the harness does not understand.
    #[error("malformed message from {peer}: {reason}")]
    Protocol {
        /// The peer (exec server, QMP, vhost-device-vsock).
        peer: String,
        /// What was wrong.
        reason: String,
    },
    /// A QMP command returned an error.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Qmp {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's error text.
        desc: String,
    },
    /// Something did not happen in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What the harness waited for.
        what: String,
        /// How long it waited.
        after: Duration,
    },
    /// The guest reported a failure, or QEMU exited, before it was ready.
    #[error("VM {vm} failed before {what}: {reason}")]
    Failed {
        /// The VM's name.
        vm: String,
        /// What the harness waited for.
        what: String,
        /// What happened.
        reason: String,
    },
}

impl VmError {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        VmError::Io {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn protocol(peer: impl Into<String>, reason: impl Into<String>) -> Self {
        VmError::Protocol {
            peer: peer.into(),
            reason: reason.into(),
        }
    }
}

/// Renders an error with all its causes, `outer: inner: innermost`.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
