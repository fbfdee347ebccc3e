//! The lifecycle of a NIC record, and what a restarted agent does with each
//! record it finds.
//!
//! ```text
//!             begin                plugged
//!   (none) ───────────▶ Attaching ─────────▶ Attached
//!     ▲                    │ failed             │ detach
//!     │ rolled back        ▼                    ▼
//!     └────────────────────┴──────────────── Detaching
//!                                               │ unplugged
//!                                               ▼
//!                                            (none)
//! ```
//!
//! A record is written *before* the side effects of each step (write-ahead),
//! so after a crash at any point the record says which names may exist and the
//! agent can finish or undo the step. An `Attaching` record is always rolled
//! back: the caller never got a reply, and a retried request starts afresh.

use serde::{Deserialize, Serialize};

/// Where a NIC is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NicState {
    /// Leased and named; host side and device may be partly created.
    Attaching,
    /// Plugged and handed to the VM.
    Attached,
    /// Being unplugged; the lease is still held.
    Detaching,
}

impl NicState {
    /// Lower-case name, as shown by `nestlessctl`.
    pub fn as_str(&self) -> &'static str {
        match self {
            NicState::Attaching => "attaching",
            NicState::Attached => "attached",
            NicState::Detaching => "detaching",
        }
    }
}

/// What happens to a NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// An attach request starts.
    Begin,
    /// The backend plugged it.
    Plugged,
    /// Plugging failed and was undone.
    Failed,
    /// A detach starts (request, or the agent cleaning up).
    Detach,
    /// The backend removed it.
    Unplugged,
}

/// A transition the state machine does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("state {from:?} does not take event {event:?}")]
pub struct InvalidTransition {
    /// The state before.
    pub from: Option<NicState>,
    /// The event.
    pub event: Event,
}

/// The next state (`None`: the record is gone).
pub fn transition(
    from: Option<NicState>,
    event: Event,
) -> Result<Option<NicState>, InvalidTransition> {
    use NicState::*;
    match (from, event) {
        (None, Event::Begin) => Ok(Some(Attaching)),
        (Some(Attaching), Event::Plugged) => Ok(Some(Attached)),
        (Some(Attaching), Event::Failed) => Ok(None),
        (Some(Attaching | Attached | Detaching), Event::Detach) => Ok(Some(Detaching)),
        (Some(Detaching), Event::Unplugged) => Ok(None),
        _ => Err(InvalidTransition { from, event }),
    }
}

/// Whether the backend still has a NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// The NIC is there (device plugged / veth pair alive).
    Present,
    /// Nothing of it is left in the VM (the VM or its namespace was
    /// restarted, or someone deleted its host end).
    Gone,
    /// It is there, but the guest restarted since it was given to a sandbox
    /// (QEMU's `RESET`): no pod in the guest uses it any more.
    Stale,
    /// The backend cannot be asked now (QMP down): decide later.
    Unknown,
}

/// What a restarted agent (or a reconnected VM monitor) does with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Keep it as it is.
    Keep,
    /// Undo a half-done attach: remove whatever exists, free the lease.
    RollBack,
    /// Finish an interrupted detach.
    FinishDetach,
    /// The VM lost the NIC: remove the remains (tap), free the lease.
    Release,
    /// Ask again when the backend is reachable.
    Defer,
}

/// The recovery for a record in `state` whose NIC is `presence`.
pub fn recovery(state: NicState, presence: Presence) -> Recovery {
    match (state, presence) {
        (_, Presence::Unknown) => Recovery::Defer,
        (NicState::Attaching, _) => Recovery::RollBack,
        (NicState::Detaching, _) => Recovery::FinishDetach,
        (NicState::Attached, Presence::Present) => Recovery::Keep,
        (NicState::Attached, Presence::Gone | Presence::Stale) => Recovery::Release,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use NicState::*;

    #[test]
    fn happy_paths() {
        let s = transition(None, Event::Begin).unwrap();
        assert_eq!(s, Some(Attaching));
        let s = transition(s, Event::Plugged).unwrap();
        assert_eq!(s, Some(Attached));
        let s = transition(s, Event::Detach).unwrap();
        assert_eq!(s, Some(Detaching));
        assert_eq!(transition(s, Event::Unplugged).unwrap(), None);
        assert_eq!(transition(Some(Attaching), Event::Failed).unwrap(), None);
    }

    #[test]
    fn forbidden_transitions() {
        let all = [None, Some(Attaching), Some(Attached), Some(Detaching)];
        let events = [
            Event::Begin,
            Event::Plugged,
            Event::Failed,
            Event::Detach,
            Event::Unplugged,
        ];
        let mut allowed = 0;
        for from in all {
            for ev in events {
                if transition(from, ev).is_ok() {
                    allowed += 1;
                }
            }
        }
        // Begin, Plugged, Failed, 3 x Detach, Unplugged.
        assert_eq!(allowed, 7);
        assert!(
            transition(Some(Attached), Event::Begin).is_err(),
            "no second attach over a live record"
        );
        assert!(
            transition(Some(Attached), Event::Unplugged).is_err(),
            "unplug only after detach was recorded"
        );
        assert!(transition(None, Event::Detach).is_err());
    }

    #[test]
    fn recovery_table() {
        assert_eq!(recovery(Attaching, Presence::Present), Recovery::RollBack);
        assert_eq!(recovery(Attaching, Presence::Gone), Recovery::RollBack);
        assert_eq!(recovery(Attached, Presence::Present), Recovery::Keep);
        assert_eq!(recovery(Attached, Presence::Gone), Recovery::Release);
        assert_eq!(recovery(Attached, Presence::Stale), Recovery::Release);
        assert_eq!(recovery(Attaching, Presence::Stale), Recovery::RollBack);
        assert_eq!(recovery(Detaching, Presence::Stale), Recovery::FinishDetach);
        assert_eq!(
            recovery(Detaching, Presence::Present),
            Recovery::FinishDetach
        );
        assert_eq!(recovery(Detaching, Presence::Gone), Recovery::FinishDetach);
        for s in [Attaching, Attached, Detaching] {
            assert_eq!(recovery(s, Presence::Unknown), Recovery::Defer);
        }
    }
}
