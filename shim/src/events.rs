//! Where the shim's task events go.
//!
//! In production, to containerd's ttrpc `Events.Forward` (the `TTRPC_ADDRESS`
//! containerd gives its shims), through a bounded queue drained by one task
//! that reconnects and retries, so that a handler never waits for containerd.
//! Before the shim exits, [`EventSink::flush`] waits (bounded) until the queue
//! is empty: the last events (TaskExit, TaskDelete) are not lost with the
//! process.
//!
//! The shim does not use the containerd-shim crate's `RemotePublisher` for
//! this: it names an event's type through protobuf reflection, and the
//! reflection of `containerd.events` drags in `google/protobuf/descriptor.proto`
//! (through `fieldpath.proto`), whose descriptors cost the shim a few hundred
//! kilobytes of heap. Here every event type carries its name as a constant
//! ([`TaskEvent::TYPE_URL`]); encoding needs no reflection.
//!
//! The [`EventSink`] seam lets component tests run the task service without
//! a containerd and look at what it published ([`RecordedEvents`]).

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use async_trait::async_trait;
use containerd_shim_protos::{
    events::task::{
        TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskPaused,
        TaskResumed, TaskStart,
    },
    protobuf::{well_known_types::any::Any, Message, MessageField},
    shim::{event::Envelope, events::ForwardRequest},
    shim_async::EventsClient,
    ttrpc::{asynchronous::Client, context},
};
use log::{debug, warn};
use tokio::sync::{mpsc, Notify};

/// How many events may wait for containerd.
const QUEUE: usize = 1024;
/// How many times one event is tried.
const ATTEMPTS: u32 = 5;
/// Deadline of one Forward call.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// A task event type and the name containerd knows it by.
pub trait TaskEvent: Message {
    /// The protobuf full name (`containerd.events.TaskExit`), used as the Any type URL.
    const TYPE_URL: &'static str;
}

macro_rules! task_events {
    ($($t:ident),*) => {
        $(impl TaskEvent for $t {
            const TYPE_URL: &'static str = concat!("containerd.events.", stringify!($t));
        })*
    };
}
task_events!(
    TaskCreate,
    TaskStart,
    TaskDelete,
    TaskExit,
    TaskOOM,
    TaskExecAdded,
    TaskExecStarted,
    TaskPaused,
    TaskResumed
);

/// Packs an event into the `Any` an envelope carries.
pub fn event_any<E: TaskEvent>(event: &E) -> Any {
    Any {
        type_url: E::TYPE_URL.to_owned(),
        value: event.write_to_bytes().unwrap_or_default(),
        ..Default::default()
    }
}

/// Publishes task events (`/tasks/create`, `/tasks/exit`, ...).
#[async_trait]
pub trait EventSink: Send + Sync {
    /// Publishes `event` under `topic`; failures are the sink's to log.
    async fn publish(&self, topic: &str, event: Any);

    /// Waits until every event published so far has been delivered (or given
    /// up on), at most `limit`; `false` when some were still queued.
    async fn flush(&self, _limit: Duration) -> bool {
        true
    }
}

/// Events waiting to be forwarded, and the wake-up when there are none.
#[derive(Default)]
struct Pending {
    count: AtomicUsize,
    idle: Notify,
}

impl Pending {
    fn done(&self) {
        if self.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }
}

/// Events to containerd, in one containerd namespace.
pub struct ContainerdEvents {
    tx: mpsc::Sender<Envelope>,
    namespace: String,
    pending: Arc<Pending>,
}

impl ContainerdEvents {
    /// Starts forwarding events to containerd's ttrpc socket `address`
    /// (a path or `unix://path`), in `namespace`.
    pub fn start(address: String, namespace: String) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let pending = Arc::new(Pending::default());
        tokio::spawn(forward_loop(address, rx, pending.clone()));
        Self {
            tx,
            namespace,
            pending,
        }
    }
}

async fn connect(address: &str) -> Option<EventsClient> {
    let addr = if address.contains("://") {
        address.to_owned()
    } else {
        format!("unix://{address}")
    };
    match Client::connect(&addr).await {
        Ok(c) => Some(EventsClient::new(c)),
        Err(e) => {
            warn!("cannot connect to containerd at {addr} for events: {e}");
            None
        }
    }
}

async fn forward_loop(address: String, mut rx: mpsc::Receiver<Envelope>, pending: Arc<Pending>) {
    let mut client: Option<EventsClient> = None;
    while let Some(envelope) = rx.recv().await {
        let req = ForwardRequest {
            envelope: MessageField::some(envelope),
            ..Default::default()
        };
        let mut sent = false;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
            if client.is_none() {
                client = connect(&address).await;
            }
            let Some(c) = client.as_ref() else {
                continue;
            };
            match c
                .forward(
                    context::with_timeout(FORWARD_TIMEOUT.as_nanos() as i64),
                    &req,
                )
                .await
            {
                Ok(_) => {
                    sent = true;
                    break;
                }
                Err(e) => {
                    debug!("forwarding {} failed: {e}", req.envelope.topic);
                    client = None;
                }
            }
        }
        if !sent {
            warn!(
                "event {} dropped after {ATTEMPTS} attempts",
                req.envelope.topic
            );
        }
        pending.done();
    }
}

fn now() -> containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

#[async_trait]
impl EventSink for ContainerdEvents {
    async fn publish(&self, topic: &str, event: Any) {
        let envelope = Envelope {
            timestamp: MessageField::some(now()),
            namespace: self.namespace.clone(),
            topic: topic.to_owned(),
            event: MessageField::some(event),
            ..Default::default()
        };
        self.pending.count.fetch_add(1, Ordering::SeqCst);
        if self.tx.try_send(envelope).is_err() {
            self.pending.done();
            warn!("event queue full: {topic} dropped");
        }
    }

    async fn flush(&self, limit: Duration) -> bool {
        let drained = async {
            loop {
                let idle = self.pending.idle.notified();
                tokio::pin!(idle);
                // Registered before the check: a wake-up in between is not missed.
                idle.as_mut().enable();
                if self.pending.count.load(Ordering::SeqCst) == 0 {
                    return;
                }
                idle.await;
            }
        };
        tokio::time::timeout(limit, drained).await.is_ok()
    }
}

/// Keeps the topics it is given, in order (for tests).
#[derive(Default)]
pub struct RecordedEvents {
    events: Mutex<Vec<(String, Any)>>,
}

impl RecordedEvents {
    /// The topics published so far.
    pub fn topics(&self) -> Vec<String> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// The events published so far, with their topics.
    pub fn events(&self) -> Vec<(String, Any)> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[async_trait]
impl EventSink for RecordedEvents {
    async fn publish(&self, topic: &str, event: Any) {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((topic.to_owned(), event));
    }
}

#[cfg(test)]
mod tests {
    use containerd_shim_protos::{
        protobuf::MessageFull,
        shim_async::{create_events, Events},
        ttrpc::r#async::TtrpcContext,
        types::empty::Empty,
    };

    use super::*;

    /// containerd's Events service, holding each Forward until let go.
    struct SlowContainerd {
        gate: tokio::sync::Semaphore,
        got: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl Events for SlowContainerd {
        async fn forward(
            &self,
            _: &TtrpcContext,
            req: ForwardRequest,
        ) -> containerd_shim_protos::ttrpc::Result<Empty> {
            self.gate.acquire().await.expect("gate").forget();
            self.got.lock().unwrap().push(req.envelope.topic.clone());
            Ok(Empty::new())
        }
    }

    #[tokio::test]
    async fn queued_events_are_flushed_before_the_shim_exits() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("containerd.ttrpc");
        let containerd = Arc::new(SlowContainerd {
            gate: tokio::sync::Semaphore::new(0),
            got: Mutex::default(),
        });
        let mut server = containerd_shim_protos::ttrpc::r#async::Server::new()
            .bind(&format!("unix://{}", socket.display()))
            .unwrap()
            .register_service(create_events(containerd.clone()));
        server.start().await.unwrap();
        let events = ContainerdEvents::start(socket.display().to_string(), "ns".into());
        for topic in ["/tasks/exit", "/tasks/delete"] {
            events.publish(topic, event_any(&TaskExit::default())).await;
        }
        // containerd holds the first Forward: the queue is not empty.
        assert!(!events.flush(Duration::from_millis(50)).await);
        containerd.gate.add_permits(2);
        assert!(events.flush(Duration::from_secs(10)).await);
        assert_eq!(
            *containerd.got.lock().unwrap(),
            ["/tasks/exit", "/tasks/delete"]
        );
        // Nothing queued: at once.
        assert!(events.flush(Duration::ZERO).await);
        std::mem::forget(server);
    }

    #[test]
    fn type_urls_are_the_protobuf_names() {
        // Reflection is fine in a test: it checks the constants.
        assert_eq!(TaskExit::TYPE_URL, TaskExit::descriptor().full_name());
        assert_eq!(TaskOOM::TYPE_URL, TaskOOM::descriptor().full_name());
        assert_eq!(
            TaskExecStarted::TYPE_URL,
            TaskExecStarted::descriptor().full_name()
        );
        let any = event_any(&TaskStart {
            container_id: "c".into(),
            pid: 7,
            ..Default::default()
        });
        assert_eq!(any.type_url, "containerd.events.TaskStart");
        let back = TaskStart::parse_from_bytes(&any.value).unwrap();
        assert_eq!(back.pid, 7);
    }
}
