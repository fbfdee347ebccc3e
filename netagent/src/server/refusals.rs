//! Bounded logs about refused input (issue 11, item 2).
//!
//! A refused request is the caller's mistake, or its attack: its log line
//! must cost the agent a bounded amount whatever the request held. Two
//! bounds:
//!
//! * every request field, and the error text (which may quote a field), is
//!   cut to [`MAX_LOGGED`] bytes, with an ellipsis and the full length
//!   ([`Bounded`]): `"aaaa"…(1048576 bytes)`;
//! * each VM has a token bucket of log lines ([`RefusalLog`]): a burst of
//!   [`BURST`], then [`PER_SECOND`] a second. Lines past it are counted,
//!   not written, and the next line written first says how many were
//!   dropped.
//!
//! The reply to the caller is bounded too (issue 11, item 4): an error
//! text quotes a request's value through [`crate::names::Quoted`] (at most
//! [`crate::names::MAX_QUOTED`] bytes of it), and a status message is cut
//! at [`crate::error::MAX_STATUS_TEXT`] bytes whatever it holds.

use std::{
    fmt,
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

use super::conns::RateBudget;

/// Most bytes of one field (or error text) written to the log.
pub const MAX_LOGGED: usize = 96;
/// Refusal lines a VM may log at once.
pub const BURST: u32 = 20;
/// Refusal lines a VM may log per second, past the burst.
pub const PER_SECOND: u32 = 2;

/// A string as a log line may show it: quoted and escaped (no control
/// character reaches the log), cut to [`MAX_LOGGED`] bytes on a character
/// boundary, with `…` and the full length when cut.
pub struct Bounded<'a>(pub &'a str);

impl fmt::Display for Bounded<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::names::write_bounded(f, self.0, MAX_LOGGED)
    }
}

/// What the bucket says about one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write it; `suppressed` lines were dropped since the last one written.
    Write {
        /// Lines dropped before this one.
        suppressed: u64,
    },
    /// Drop it (counted).
    Drop,
}

/// The refusal lines of one VM, rate-limited.
#[derive(Debug)]
pub struct RefusalLog {
    bucket: RateBudget,
    suppressed: AtomicU64,
}

impl Default for RefusalLog {
    fn default() -> RefusalLog {
        RefusalLog::new(BURST, PER_SECOND)
    }
}

impl RefusalLog {
    /// A bucket of `burst` lines, refilled at `per_second`.
    pub fn new(burst: u32, per_second: u32) -> RefusalLog {
        RefusalLog {
            bucket: RateBudget::new(burst, per_second),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a line may be written at `now`.
    pub fn verdict(&self, now: Instant) -> Verdict {
        if self.bucket.take(now) {
            Verdict::Write {
                suppressed: self.suppressed.swap(0, Ordering::AcqRel),
            }
        } else {
            self.suppressed.fetch_add(1, Ordering::AcqRel);
            Verdict::Drop
        }
    }

    /// Logs `line` (a warning about `who`'s refused request, e.g. `VM a`)
    /// if the bucket allows, first saying how many lines it dropped.
    pub fn warn(&self, who: &str, line: fmt::Arguments<'_>) {
        if let Verdict::Write { suppressed } = self.verdict(Instant::now()) {
            if suppressed > 0 {
                log::warn!(
                    "{who}: {suppressed} refusal(s) not logged (at most {BURST} at once, then {PER_SECOND}/s)"
                );
            }
            log::warn!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn fields_are_cut_with_their_length() {
        assert_eq!(Bounded("sb-1").to_string(), "\"sb-1\"");
        let long = "x".repeat(1 << 20);
        let shown = Bounded(&long).to_string();
        assert!(shown.len() < MAX_LOGGED + 40, "{}", shown.len());
        assert!(shown.ends_with("…(1048576 bytes)"), "{shown}");
        // A multi-byte character across the cut is not split.
        let wide = "é".repeat(MAX_LOGGED);
        let shown = Bounded(&wide).to_string();
        assert!(
            shown.contains(&format!("({} bytes)", wide.len())),
            "{shown}"
        );
        // Control characters are escaped, never written raw.
        let shown = Bounded("a\nb\u{1b}[2J").to_string();
        assert!(
            !shown.contains('\n') && !shown.contains('\u{1b}'),
            "{shown}"
        );
    }

    #[test]
    fn the_bucket_allows_a_burst_then_a_rate_and_counts_the_rest() {
        let log = RefusalLog::new(3, 2);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(log.verdict(t0), Verdict::Write { suppressed: 0 });
        }
        for _ in 0..100 {
            assert_eq!(log.verdict(t0), Verdict::Drop);
        }
        // Half a second is one token at 2/s: the next line reports the 100.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(log.verdict(t1), Verdict::Write { suppressed: 100 });
        assert_eq!(log.verdict(t1), Verdict::Drop);
        // A long quiet spell refills the burst, no more.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(matches!(log.verdict(t2), Verdict::Write { .. }));
        }
        assert_eq!(log.verdict(t2), Verdict::Drop);
        // Time going backwards (another thread's older `now`) takes nothing.
        assert_eq!(log.verdict(t0), Verdict::Drop);
    }
}
