//! The life of one process (a container's init, or one of its exec
//! processes), as a pure table: what each Task API operation may do in each
//! state, and the state it leads to.
//!
//! ```text
//!            start             pause
//!  Created ────────▶ Running ────────▶ Paused      (pause/resume: a container's init only;
//!     │                 │   ◀────────    │         runc freezes the whole container)
//!     │                 │     resume     │
//!     └──── exit ───────┴───── exit ─────┴──▶ Stopped
//! ```
//!
//! Operations that leave the state as it is (signal, delete, update, adding
//! or starting an exec process) are in the table too, so that every "may I?"
//! of the task service is asked here, once.

use containerd_shim::api::Status;

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProcState {
    /// `runc create` (or an exec not yet started): it exists, it does not run.
    Created,
    /// It runs.
    Running,
    /// Frozen by `runc pause` (a container's init only).
    Paused,
    /// It has exited.
    Stopped,
}

impl ProcState {
    /// Every state, for tables and tests.
    pub const ALL: [ProcState; 4] = [Self::Created, Self::Running, Self::Paused, Self::Stopped];

    /// Lower-case name, as error messages show it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
        }
    }

    /// The task API status containerd sees.
    pub fn status(self) -> Status {
        match self {
            Self::Created => Status::CREATED,
            Self::Running => Status::RUNNING,
            Self::Paused => Status::PAUSED,
            Self::Stopped => Status::STOPPED,
        }
    }
}

/// Which process of a container an operation is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The container's init process: the container itself.
    Init,
    /// One of its exec processes.
    Exec,
}

impl Kind {
    /// The kind of the process `exec_id` names (empty: the init process).
    pub fn of(exec_id: &str) -> Kind {
        if exec_id.is_empty() {
            Kind::Init
        } else {
            Kind::Exec
        }
    }
}

/// What is asked of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Start it (`runc start`, or `runc exec` of an added exec process).
    Start,
    /// Add an exec process to the container (asked of its init).
    AddExec,
    /// Start one of the container's exec processes (asked of its init).
    StartExec,
    /// Send it a signal.
    Signal,
    /// Freeze the container.
    Pause,
    /// Thaw the container.
    Resume,
    /// Give the container new resources.
    Update,
    /// Delete it.
    Delete,
    /// It exited (the reaper saw it).
    Exit,
}

impl Op {
    /// Every operation, for tables and tests.
    pub const ALL: [Op; 9] = [
        Self::Start,
        Self::AddExec,
        Self::StartExec,
        Self::Signal,
        Self::Pause,
        Self::Resume,
        Self::Update,
        Self::Delete,
        Self::Exit,
    ];

    /// The verb error messages use: "cannot {action} process {id}".
    pub fn action(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::AddExec | Self::StartExec => "exec in",
            Self::Signal => "signal",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Update => "update",
            Self::Delete => "delete",
            Self::Exit => "exit",
        }
    }
}

/// An operation the state of the process does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot {} a process that is {}", .op.action(), .state.name())]
pub struct Refused {
    /// What was asked.
    pub op: Op,
    /// The state it was asked in.
    pub state: ProcState,
}

/// The state `op` takes a process of `kind` in state `from` to; refused
/// where the table has no entry.
pub fn transition(kind: Kind, from: ProcState, op: Op) -> Result<ProcState, Refused> {
    use Kind::*;
    use Op::*;
    use ProcState::*;
    match (kind, from, op) {
        (_, Created, Start) => Ok(Running),
        (Init, Running, Pause) => Ok(Paused),
        (Init, Paused, Resume) => Ok(Running),
        (Init, Created | Running | Paused, Exit) | (Exec, Created | Running, Exit) => Ok(Stopped),
        // runc signals a created container too; an exec process has no pid before it starts.
        (Init, Created | Running | Paused, Signal) | (Exec, Running, Signal) => Ok(from),
        (_, Created | Stopped, Delete) => Ok(from),
        // A paused container takes exec processes; runc runs them once it is thawed.
        (Init, Created | Running | Paused, AddExec | Update) => Ok(from),
        (Init, Running | Paused, StartExec) => Ok(from),
        _ => Err(Refused { op, state: from }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table, written out: every (kind, state, operation) that is accepted,
    /// with the state it leads to. Everything else is refused.
    const ACCEPTED: &[(Kind, ProcState, Op, ProcState)] = {
        use Kind::*;
        use Op::*;
        use ProcState::*;
        &[
            (Init, Created, Start, Running),
            (Init, Created, AddExec, Created),
            (Init, Created, Signal, Created),
            (Init, Created, Update, Created),
            (Init, Created, Delete, Created),
            (Init, Created, Exit, Stopped),
            (Init, Running, AddExec, Running),
            (Init, Running, StartExec, Running),
            (Init, Running, Signal, Running),
            (Init, Running, Pause, Paused),
            (Init, Running, Update, Running),
            (Init, Running, Exit, Stopped),
            (Init, Paused, AddExec, Paused),
            (Init, Paused, StartExec, Paused),
            (Init, Paused, Signal, Paused),
            (Init, Paused, Resume, Running),
            (Init, Paused, Update, Paused),
            (Init, Paused, Exit, Stopped),
            (Init, Stopped, Delete, Stopped),
            (Exec, Created, Start, Running),
            (Exec, Created, Delete, Created),
            (Exec, Created, Exit, Stopped),
            (Exec, Running, Signal, Running),
            (Exec, Running, Exit, Stopped),
            (Exec, Stopped, Delete, Stopped),
        ]
    };

    #[test]
    fn every_operation_in_every_state() {
        for kind in [Kind::Init, Kind::Exec] {
            for state in ProcState::ALL {
                for op in Op::ALL {
                    let want = ACCEPTED
                        .iter()
                        .find(|(k, s, o, _)| (*k, *s, *o) == (kind, state, op))
                        .map(|(_, _, _, to)| *to);
                    let got = transition(kind, state, op);
                    match want {
                        Some(to) => assert_eq!(got, Ok(to), "{kind:?} {state:?} {op:?}"),
                        None => assert_eq!(
                            got,
                            Err(Refused { op, state }),
                            "{kind:?} {state:?} {op:?} must be refused"
                        ),
                    }
                }
            }
        }
    }

    #[test]
    fn a_stopped_process_takes_nothing_but_delete() {
        for kind in [Kind::Init, Kind::Exec] {
            for op in Op::ALL {
                assert_eq!(
                    transition(kind, ProcState::Stopped, op).is_ok(),
                    op == Op::Delete,
                    "{kind:?} {op:?}"
                );
            }
        }
    }

    #[test]
    fn only_a_container_pauses() {
        for state in ProcState::ALL {
            assert!(transition(Kind::Exec, state, Op::Pause).is_err());
            assert!(transition(Kind::Exec, state, Op::Resume).is_err());
        }
        assert_eq!(ProcState::Paused.status(), Status::PAUSED);
        assert_eq!(
            Refused {
                op: Op::Pause,
                state: ProcState::Paused
            }
            .to_string(),
            "cannot pause a process that is paused"
        );
    }

    #[test]
    fn names_and_statuses() {
        let names: Vec<_> = ProcState::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(names, ["created", "running", "paused", "stopped"]);
        assert_eq!(ProcState::Created.status(), Status::CREATED);
        assert_eq!(ProcState::Running.status(), Status::RUNNING);
        assert_eq!(ProcState::Stopped.status(), Status::STOPPED);
        assert_eq!(Kind::of(""), Kind::Init);
        assert_eq!(Kind::of("e1"), Kind::Exec);
    }
}
