//! Per-VM connection and request budgets (issue 11, item 1).
//!
//! One VM must not be able to take the agent's file descriptors from the
//! others: each VM may hold at most [`vm_budget`] connections at once (64,
//! or its `max_nics` + 16 when more: a shim per pod may keep one open, and
//! a Hostlo part's watch keeps its busy), and a connection that carries nothing for [`IDLE_TIMEOUT`] is
//! closed. A connection over the budget is closed at once, with a log line
//! (rate-limited with the VM's other refusals); the admin socket has a
//! budget of its own ([`MAX_ADMIN_CONNS`]), so that an operator gets in
//! whatever the VMs do.
//!
//! Requests are budgeted too: each VM has a token bucket of requests
//! ([`RateBudget`]: `request_burst_per_vm` at once, then
//! `requests_per_sec_per_vm`, defaults [`REQUEST_BURST_PER_VM`] and
//! [`REQUESTS_PER_SEC_PER_VM`]); a request past it is refused with
//! `RESOURCE_EXHAUSTED` before it is parsed, and costs no other VM
//! anything. The admin socket has a bucket of its own
//! ([`ADMIN_REQUEST_BURST`], [`ADMIN_REQUESTS_PER_SEC`]). The `[agent]` keys
//! `max_connections_per_vm` and `idle_timeout_secs` set the other two
//! bounds.
//!
//! ```text
//! accept ─▶ Budget::admit ─full─▶ close (log, rate-limited)
//!              │ ok
//!              ▼
//!           Tracked(stream, permit, idle timer) ─▶ ttrpc server of the VM
//!              drop (closed by either side, or idle) ─▶ permit back
//! ```

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

/// Least budget of connections of one VM.
pub const MIN_CONNS_PER_VM: usize = 64;

/// The connection budget of a VM with quota `max_nics`: one per NIC (a
/// shim per pod may hold one open) and 16 more (CNI calls, retries), at
/// least [`MIN_CONNS_PER_VM`]. The agent's fd limit (`LimitNOFILE=65536`
/// in the unit) must cover the sum over its VMs.
pub fn vm_budget(max_nics: u32) -> usize {
    (max_nics as usize + 16).max(MIN_CONNS_PER_VM)
}
/// Most connections the admin socket holds at once.
pub const MAX_ADMIN_CONNS: usize = 16;
/// A connection that carries nothing this long is closed. Longer than a
/// `HostloWatch` long poll (60 s), which is silent while it waits.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(180);

/// Requests a VM may make per second past its burst, by default.
pub const REQUESTS_PER_SEC_PER_VM: u32 = 200;
/// Requests a VM may make at once, by default.
pub const REQUEST_BURST_PER_VM: u32 = 400;
/// Requests per second on the admin socket, past its burst.
pub const ADMIN_REQUESTS_PER_SEC: u32 = 50;
/// Requests at once on the admin socket.
pub const ADMIN_REQUEST_BURST: u32 = 200;

/// A token bucket: `burst` tokens, refilled at `per_second`; each request
/// (or log line) takes one.
#[derive(Debug)]
pub struct RateBudget {
    bucket: std::sync::Mutex<(f64, std::time::Instant)>,
    burst: u32,
    per_second: u32,
}

impl RateBudget {
    /// A full bucket of `burst`, refilled at `per_second`.
    pub fn new(burst: u32, per_second: u32) -> RateBudget {
        RateBudget {
            bucket: std::sync::Mutex::new((f64::from(burst), std::time::Instant::now())),
            burst,
            per_second,
        }
    }

    /// Takes a token at `now`, if there is one.
    pub fn take(&self, now: std::time::Instant) -> bool {
        // Nothing panics while holding it.
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, last) = &mut *b;
        let elapsed = now.saturating_duration_since(*last);
        *last = (*last).max(now);
        *tokens = (*tokens + elapsed.as_secs_f64() * f64::from(self.per_second))
            .min(f64::from(self.burst));
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Tokens at once.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// Tokens per second.
    pub fn per_second(&self) -> u32 {
        self.per_second
    }
}

/// The connection budget of one VM (or of the admin socket). Clones share
/// one count and one limit.
#[derive(Debug, Clone)]
pub struct Budget {
    open: Arc<AtomicUsize>,
    max: Arc<AtomicUsize>,
    idle: Duration,
}

impl Budget {
    /// A budget of `max` connections, each closed after [`IDLE_TIMEOUT`]
    /// without traffic.
    pub fn new(max: usize) -> Budget {
        Budget {
            open: Arc::new(AtomicUsize::new(0)),
            max: Arc::new(AtomicUsize::new(max)),
            idle: IDLE_TIMEOUT,
        }
    }

    /// The budget with connections closed after `idle` without traffic.
    pub fn with_idle(self, idle: Duration) -> Budget {
        Budget { idle, ..self }
    }

    /// How long a connection may carry nothing.
    pub fn idle(&self) -> Duration {
        self.idle
    }

    /// A permit for one more connection, or `None` when `max` are open.
    pub fn admit(&self) -> Option<Permit> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max()).then_some(n + 1)
            })
            .ok()
            .map(|_| Permit(self.open.clone()))
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// The budget.
    pub fn max(&self) -> usize {
        self.max.load(Ordering::Acquire)
    }

    /// Changes the budget (a VM's quota changed while it is served). A
    /// smaller budget closes nothing: connections open past it stay, and
    /// new ones are refused until fewer than `max` are open.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Release);
    }
}

/// One admitted connection; gives its place back when dropped.
#[derive(Debug)]
pub struct Permit(Arc<AtomicUsize>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A stream holding a [`Permit`], that reads as closed (EOF) once it has
/// carried nothing for its idle timeout.
pub struct Tracked<S> {
    inner: S,
    _permit: Permit,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
}

impl<S> Tracked<S> {
    /// `inner`, holding `permit`, closed after `idle` without traffic.
    pub fn new(inner: S, permit: Permit, idle: Duration) -> Tracked<S> {
        Tracked {
            inner,
            _permit: permit,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
        }
    }

    fn touch(&mut self) {
        self.timer.as_mut().reset(Instant::now() + self.idle);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(r)
            }
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                // Idle: end of stream, the server closes the connection.
                Poll::Ready(()) => Poll::Ready(Ok(())),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn a_vm_budget_covers_a_connection_per_nic() {
        assert_eq!(vm_budget(1), MIN_CONNS_PER_VM);
        assert_eq!(vm_budget(48), 64);
        assert_eq!(vm_budget(1023), 1039);
    }

    #[test]
    fn a_changed_budget_applies_to_every_clone_and_closes_nothing() {
        let b = Budget::new(2);
        let served = b.clone();
        let p1 = served.admit().unwrap();
        let p2 = served.admit().unwrap();
        assert!(served.admit().is_none());
        b.set_max(3);
        let p3 = served.admit().expect("the grown budget admits one more");
        assert!(served.admit().is_none());
        // Shrunk below what is open: nothing closes, nothing new until below.
        b.set_max(1);
        assert_eq!(served.open(), 3);
        drop((p1, p2));
        assert!(served.admit().is_none(), "1 open of a budget of 1");
        drop(p3);
        assert!(served.admit().is_some());
    }

    #[test]
    fn a_budget_admits_up_to_its_max_and_takes_back_dropped_permits() {
        let b = Budget::new(2);
        let p1 = b.admit().unwrap();
        let _p2 = b.admit().unwrap();
        assert!(b.admit().is_none());
        assert_eq!(b.open(), 2);
        drop(p1);
        assert_eq!(b.open(), 1);
        assert!(b.admit().is_some());
    }

    #[test]
    fn a_rate_budget_allows_a_burst_then_its_rate() {
        let t0 = std::time::Instant::now();
        let b = RateBudget::new(5, 10);
        assert!((0..5).all(|_| b.take(t0)), "the burst");
        assert!(!b.take(t0), "then nothing at once");
        // 10/s: 0.35 s gives 3 tokens, no more.
        let t1 = t0 + Duration::from_millis(350);
        assert_eq!((0..10).filter(|_| b.take(t1)).count(), 3);
        // A long pause fills the bucket to its burst only.
        let t2 = t1 + Duration::from_secs(3600);
        assert_eq!((0..100).filter(|_| b.take(t2)).count(), 5);
        // An older `now` (another thread's) takes nothing and gives nothing.
        assert!(!b.take(t0));
        // Two buckets are apart: one spent leaves the other whole.
        let other = RateBudget::new(5, 10);
        assert!((0..5).all(|_| other.take(t2)));
    }

    #[tokio::test]
    async fn an_idle_connection_reads_as_closed() {
        let b = Budget::new(1);
        let (a, mut peer) = tokio::io::duplex(64);
        let mut t = Tracked::new(a, b.admit().unwrap(), Duration::from_millis(20));
        peer.write_all(b"x").await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(t.read(&mut buf).await.unwrap(), 1, "data is read");
        // Then silence, the peer still there: the stream reads as closed.
        assert_eq!(t.read(&mut buf).await.unwrap(), 0);
        drop(t);
        assert_eq!(b.open(), 0, "the permit went back");
        drop(peer);
    }
}
