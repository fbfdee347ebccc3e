//! Where the shim's task events go.
//!
//! In production, to containerd's ttrpc `Events.Forward` (the `TTRPC_ADDRESS`
//! containerd gives its shims), through a bounded queue drained by one task
//! that reconnects and retries, so that a handler never waits for containerd.
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

use std::{sync::Mutex, time::Duration};

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
use tokio::sync::mpsc;

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
}

/// Events to containerd, in one containerd namespace.
pub struct ContainerdEvents {
    tx: mpsc::Sender<Envelope>,
    namespace: String,
}

impl ContainerdEvents {
    /// Starts forwarding events to containerd's ttrpc socket `address`
    /// (a path or `unix://path`), in `namespace`.
    pub fn start(address: String, namespace: String) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(forward_loop(address, rx));
        Self { tx, namespace }
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

async fn forward_loop(address: String, mut rx: mpsc::Receiver<Envelope>) {
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
        if self.tx.try_send(envelope).is_err() {
            warn!("event queue full: {topic} dropped");
        }
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
    use containerd_shim_protos::protobuf::MessageFull;

    use super::*;

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
