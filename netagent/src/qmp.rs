//! A small typed QMP client (QEMU Machine Protocol) over a unix socket.
//!
//! QMP is line-delimited JSON: a greeting, `qmp_capabilities`, then commands
//! carrying an `id` that their reply echoes, interleaved with asynchronous
//! events. One reader task routes replies to their waiting callers by id and
//! broadcasts events; writers serialise on a mutex. `getfd` needs the tap's
//! file descriptor passed as SCM_RIGHTS ancillary data with the command bytes,
//! which is why this is not a generic JSON-lines client.
//!
//! The connection is made lazily and re-made after QEMU goes away (restart,
//! crash): callers see [`QmpError::Disconnected`] for commands in flight and a
//! fresh connection on the next command. [`Qmp::generation`] increases with
//! every new connection so that the agent can tell a restarted QEMU.
//!
//! [`Qmp`] is the transport seam (a command name and JSON arguments); the
//! commands themselves are typed in [`commands`], and callers use those.

pub mod commands;

use std::{
    collections::HashMap,
    os::fd::{AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex as StdMutex,
    },
    time::Duration,
};

use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{
        unix::{OwnedReadHalf, OwnedWriteHalf},
        UnixStream,
    },
    sync::{broadcast, oneshot, Mutex},
};

/// QMP failures.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be opened.
    #[error("cannot connect to QMP socket {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// QEMU did not greet as QMP does.
    #[error("QMP handshake on {path} failed: {message}")]
    Handshake {
        /// The socket.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The connection dropped (QEMU exited or restarted).
    #[error("QMP connection {path} closed while running {command}")]
    Disconnected {
        /// The socket.
        path: PathBuf,
        /// The command in flight.
        command: String,
    },
    /// QEMU answered with an error.
    #[error("QMP {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QMP error class, e.g. `GenericError`, `DeviceNotFound`.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// The reply did not have the shape the command's reply type has.
    #[error("unexpected reply to QMP {command}: {detail}")]
    BadReply {
        /// The command.
        command: &'static str,
        /// What was wrong, with the reply.
        detail: String,
    },
    /// A command's arguments could not be encoded as JSON.
    #[error("cannot encode the arguments of QMP {command}: {detail}")]
    Encode {
        /// The command.
        command: &'static str,
        /// Why.
        detail: String,
    },
    /// No reply in time.
    #[error("QMP {command} on {path} got no reply within {after:?}")]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// The command.
        command: String,
        /// The deadline.
        after: Duration,
    },
    /// Writing to the socket failed.
    #[error("cannot send QMP {command} to {path}: {source}")]
    Send {
        /// The socket.
        path: PathBuf,
        /// The command.
        command: String,
        /// Why.
        source: std::io::Error,
    },
}

impl QmpError {
    /// True when QEMU said the named object does not exist.
    pub fn is_not_found(&self) -> bool {
        match self {
            QmpError::Command { class, desc, .. } => {
                class == "DeviceNotFound"
                    || desc.contains("not found")
                    || desc.contains("No file descriptor")
            }
            _ => false,
        }
    }

    /// True when QEMU (or its socket) is unreachable, rather than refusing.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            QmpError::Connect { .. }
                | QmpError::Disconnected { .. }
                | QmpError::Handshake { .. }
                | QmpError::Send { .. }
        )
    }
}

/// An asynchronous QMP event.
#[derive(Debug, Clone)]
pub struct QmpEvent {
    /// Event name, e.g. `DEVICE_DELETED`.
    pub name: String,
    /// Its `data`.
    pub data: Value,
}

/// Name of the synthetic event sent when the connection drops.
pub const DISCONNECTED_EVENT: &str = "NESTLESS_QMP_DISCONNECTED";

/// The QMP operations the qemu backend needs (a seam for tests).
#[async_trait::async_trait]
pub trait Qmp: Send + Sync {
    /// Runs a command and returns its `return` value.
    async fn execute(&self, command: &str, args: Value) -> Result<Value, QmpError>;
    /// Runs a command with a file descriptor attached (for `getfd`).
    async fn execute_with_fd(
        &self,
        command: &str,
        args: Value,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, QmpError>;
    /// Subscribes to events (and [`DISCONNECTED_EVENT`]).
    fn subscribe(&self) -> broadcast::Receiver<QmpEvent>;
    /// Connects if needed; returns the connection generation.
    async fn connect(&self) -> Result<u64, QmpError>;
    /// Number of connections made so far (0: never connected).
    fn generation(&self) -> u64;
}

type Waiters = HashMap<u64, oneshot::Sender<Result<Value, (String, String)>>>;
type Pending = Arc<StdMutex<Waiters>>;

/// The waiters of a connection. Nothing panics while holding the lock, so a
/// poisoned one still holds a consistent map: take it rather than panic.
fn waiters(pending: &StdMutex<Waiters>) -> std::sync::MutexGuard<'_, Waiters> {
    pending.lock().unwrap_or_else(|e| e.into_inner())
}

struct Conn {
    writer: Mutex<OwnedWriteHalf>,
    pending: Pending,
    alive: Arc<AtomicBool>,
}

/// The real QMP client.
pub struct QmpClient {
    path: PathBuf,
    timeout: Duration,
    conn: Mutex<Option<Arc<Conn>>>,
    events: broadcast::Sender<QmpEvent>,
    next_id: AtomicU64,
    generation: AtomicU64,
}

impl QmpClient {
    /// A client for the socket at `path`; nothing is opened until first use.
    pub fn new(path: &Path, timeout: Duration) -> QmpClient {
        QmpClient {
            path: path.to_path_buf(),
            timeout,
            conn: Mutex::new(None),
            events: broadcast::channel(256).0,
            next_id: AtomicU64::new(1),
            generation: AtomicU64::new(0),
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn conn(&self) -> Result<Arc<Conn>, QmpError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            if c.alive.load(Ordering::Acquire) {
                return Ok(c.clone());
            }
        }
        let c = tokio::time::timeout(self.timeout, self.open())
            .await
            .map_err(|_| QmpError::Handshake {
                path: self.path.clone(),
                message: format!(
                    "no greeting within {:?} (is another client holding the socket?)",
                    self.timeout
                ),
            })??;
        self.generation.fetch_add(1, Ordering::AcqRel);
        *guard = Some(c.clone());
        Ok(c)
    }

    async fn open(&self) -> Result<Arc<Conn>, QmpError> {
        let stream = UnixStream::connect(&self.path)
            .await
            .map_err(|source| QmpError::Connect {
                path: self.path.clone(),
                source,
            })?;
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read);
        let hs = |message: String| QmpError::Handshake {
            path: self.path.clone(),
            message,
        };
        let greeting = read_json(&mut lines).await.map_err(hs)?;
        if greeting.get("QMP").is_none() {
            return Err(hs(format!("expected a QMP greeting, got {greeting}")));
        }
        write
            .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
            .await
            .map_err(|e| hs(e.to_string()))?;
        loop {
            let v = read_json(&mut lines).await.map_err(hs)?;
            if v.get("return").is_some() {
                break;
            }
            if let Some(e) = v.get("error") {
                return Err(hs(format!("qmp_capabilities refused: {e}")));
            }
            // An event before the reply: ignore.
        }
        let pending: Pending = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        tokio::spawn(reader(
            lines,
            pending.clone(),
            alive.clone(),
            self.events.clone(),
        ));
        Ok(Arc::new(Conn {
            writer: Mutex::new(write),
            pending,
            alive,
        }))
    }

    async fn run(
        &self,
        command: &str,
        args: Value,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, QmpError> {
        let conn = self.conn().await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "execute": command, "id": id });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(b'\n');
        let (tx, rx) = oneshot::channel();
        waiters(&conn.pending).insert(id, tx);
        let send_err = |source| QmpError::Send {
            path: self.path.clone(),
            command: command.to_string(),
            source,
        };
        {
            let mut w = conn.writer.lock().await;
            let sent = match fd {
                None => w.write_all(&bytes).await,
                Some(fd) => send_with_fd(&w, &bytes, fd).await,
            };
            if let Err(e) = sent {
                waiters(&conn.pending).remove(&id);
                conn.alive.store(false, Ordering::Release);
                let _ = w.shutdown().await;
                return Err(send_err(e));
            }
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err((class, desc)))) => Err(QmpError::Command {
                command: command.to_string(),
                class,
                desc,
            }),
            Ok(Err(_)) => Err(QmpError::Disconnected {
                path: self.path.clone(),
                command: command.to_string(),
            }),
            Err(_) => {
                waiters(&conn.pending).remove(&id);
                Err(QmpError::Timeout {
                    path: self.path.clone(),
                    command: command.to_string(),
                    after: self.timeout,
                })
            }
        }
    }
}

#[async_trait::async_trait]
impl Qmp for QmpClient {
    async fn execute(&self, command: &str, args: Value) -> Result<Value, QmpError> {
        self.run(command, args, None).await
    }

    async fn execute_with_fd(
        &self,
        command: &str,
        args: Value,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        self.run(command, args, Some(fd)).await
    }

    fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    async fn connect(&self) -> Result<u64, QmpError> {
        self.conn().await?;
        Ok(self.generation())
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

async fn read_json(lines: &mut BufReader<OwnedReadHalf>) -> Result<Value, String> {
    let mut line = String::new();
    loop {
        line.clear();
        let n = lines
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed".into());
        }
        if !line.trim().is_empty() {
            return serde_json::from_str(&line)
                .map_err(|e| format!("bad JSON from QEMU ({e}): {}", line.trim()));
        }
    }
}

async fn reader(
    mut lines: BufReader<OwnedReadHalf>,
    pending: Pending,
    alive: Arc<AtomicBool>,
    events: broadcast::Sender<QmpEvent>,
) {
    while let Ok(v) = read_json(&mut lines).await {
        if let Some(name) = v.get("event").and_then(Value::as_str) {
            let _ = events.send(QmpEvent {
                name: name.to_string(),
                data: v.get("data").cloned().unwrap_or(Value::Null),
            });
            continue;
        }
        let Some(id) = v.get("id").and_then(Value::as_u64) else {
            log::debug!("QMP message without id ignored: {v}");
            continue;
        };
        let Some(tx) = waiters(&pending).remove(&id) else {
            continue;
        };
        let reply = match (v.get("return"), v.get("error")) {
            (Some(r), _) => Ok(r.clone()),
            (None, Some(e)) => Err((
                e.get("class")
                    .and_then(Value::as_str)
                    .unwrap_or("GenericError")
                    .to_string(),
                e.get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            )),
            (None, None) => Err((
                "ProtocolError".into(),
                format!("reply without return or error: {v}"),
            )),
        };
        let _ = tx.send(reply);
    }
    alive.store(false, Ordering::Release);
    // Dropping the senders wakes every waiter with Disconnected.
    waiters(&pending).clear();
    let _ = events.send(QmpEvent {
        name: DISCONNECTED_EVENT.to_string(),
        data: Value::Null,
    });
}

/// Writes `bytes` with `fd` as SCM_RIGHTS on the first chunk.
async fn send_with_fd(w: &OwnedWriteHalf, bytes: &[u8], fd: BorrowedFd<'_>) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let stream: &UnixStream = w.as_ref();
    let mut off = 0;
    let mut fd_sent = false;
    while off < bytes.len() {
        stream.writable().await?;
        let fds = [fd.as_raw_fd()];
        let res = stream.try_io(tokio::io::Interest::WRITABLE, || {
            let iov = [std::io::IoSlice::new(&bytes[off..])];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            let cmsgs: &[ControlMessage] = if fd_sent { &[] } else { &cmsg };
            sendmsg::<()>(
                stream.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        });
        match res {
            Ok(n) => {
                off += n;
                fd_sent = true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A scripted QMP server: greets, accepts capabilities, then answers
    /// each command with `reply(command, args)`, emitting events in between.
    async fn serve_once(listener: UnixListener, reply: fn(&str, &Value) -> (Value, Option<Value>)) {
        let (s, _) = listener.accept().await.unwrap();
        let (r, mut w) = s.into_split();
        let mut lines = BufReader::new(r).lines();
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .unwrap();
        while let Some(line) = lines.next_line().await.unwrap() {
            let v: Value = serde_json::from_str(&line).unwrap();
            let cmd = v["execute"].as_str().unwrap().to_string();
            let id = v.get("id").cloned().unwrap_or(Value::Null);
            if cmd == "qmp_capabilities" {
                w.write_all(b"{\"return\": {}}\n").await.unwrap();
                continue;
            }
            if cmd == "quit" {
                return;
            }
            let (ret, event) = reply(&cmd, &v["arguments"]);
            if let Some(ev) = event {
                w.write_all(format!("{ev}\n").as_bytes()).await.unwrap();
            }
            let mut out = ret;
            out["id"] = id;
            w.write_all(format!("{out}\n").as_bytes()).await.unwrap();
        }
    }

    fn script(cmd: &str, args: &Value) -> (Value, Option<Value>) {
        match cmd {
            "device_del" => (
                json!({"return": {}}),
                Some(json!({"event": "DEVICE_DELETED", "data": {"device": args["id"]}})),
            ),
            "netdev_del" => (
                json!({"error": {"class": "GenericError", "desc": "Device 'x' not found"}}),
                None,
            ),
            _ => (json!({"return": {"echo": cmd}}), None),
        }
    }

    #[tokio::test]
    async fn commands_errors_events_and_reconnect() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(serve_once(listener, script));
        let qmp = QmpClient::new(&path, Duration::from_secs(5));
        assert_eq!(qmp.generation(), 0);
        let mut events = qmp.subscribe();
        assert_eq!(
            qmp.execute("query-status", Value::Null).await.unwrap()["echo"],
            "query-status"
        );
        assert_eq!(qmp.generation(), 1);
        qmp.execute("device_del", json!({"id": "nl-1"}))
            .await
            .unwrap();
        let ev = events.recv().await.unwrap();
        assert_eq!(
            (ev.name.as_str(), ev.data["device"].as_str()),
            ("DEVICE_DELETED", Some("nl-1"))
        );
        let err = qmp
            .execute("netdev_del", json!({"id": "x"}))
            .await
            .unwrap_err();
        assert!(err.is_not_found(), "{err}");
        // The server goes away: the next command fails as unavailable...
        let _ = qmp.execute("quit", Value::Null).await;
        server.await.unwrap();
        let ev = events.recv().await.unwrap();
        assert_eq!(ev.name, DISCONNECTED_EVENT);
        std::fs::remove_file(&path).unwrap();
        let err = qmp.execute("query-status", Value::Null).await.unwrap_err();
        assert!(err.is_unavailable(), "{err}");
        // ...and a restarted QEMU is picked up on the next command.
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(serve_once(listener, script));
        qmp.execute("query-status", Value::Null).await.unwrap();
        assert_eq!(qmp.generation(), 2);
    }

    #[tokio::test]
    async fn fd_is_passed_with_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
            use std::io::Write;
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"{\"QMP\": {}}\n").unwrap();
            let mut got_fd = None;
            let mut text = Vec::new();
            while !String::from_utf8_lossy(&text).contains("getfd") {
                let mut buf = [0u8; 4096];
                let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
                let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                let msg =
                    recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty())
                        .unwrap();
                for c in msg.cmsgs().unwrap() {
                    if let ControlMessageOwned::ScmRights(fds) = c {
                        got_fd = fds.first().copied();
                    }
                }
                let n = msg.bytes;
                text.extend_from_slice(&buf[..n]);
                if text.ends_with(b"qmp_capabilities\"}\n") {
                    s.write_all(b"{\"return\": {}}\n").unwrap();
                    text.clear();
                }
            }
            let v: Value = serde_json::from_slice(text.trim_ascii()).unwrap();
            s.write_all(format!("{}\n", json!({"return": {}, "id": v["id"]})).as_bytes())
                .unwrap();
            got_fd.is_some()
        });
        let qmp = QmpClient::new(&path, Duration::from_secs(5));
        let file = std::fs::File::open("/dev/null").unwrap();
        use std::os::fd::AsFd;
        qmp.execute_with_fd("getfd", json!({"fdname": "nlf-x"}), file.as_fd())
            .await
            .unwrap();
        assert!(
            server.join().unwrap(),
            "no SCM_RIGHTS fd arrived with getfd"
        );
    }
}
