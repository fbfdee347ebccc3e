//! A small synchronous QMP client for tests (the agent has its own, asynchronous one).
//!
//! QMP is one JSON object per line. After the greeting the client sends
//! `qmp_capabilities`; then each command gets either `{"return": ...}` or
//! `{"error": {"class", "desc"}}`, and asynchronous `{"event": ...}` objects may arrive at
//! any time. Events read while waiting for a reply are kept for [`Qmp::wait_event`].

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::error::VmError;

/// How long a command may take before [`Qmp::execute`] gives up.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    stream: UnixStream,
    path: PathBuf,
    pending: Vec<u8>,
    events: VecDeque<Value>,
}

impl Qmp {
    /// Connects to the QMP socket at `path` (retrying until `timeout`, as QEMU may still be
    /// starting) and negotiates capabilities.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, VmError> {
        let started = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if started.elapsed() >= timeout => {
                    return Err(VmError::Connect {
                        path: path.to_owned(),
                        source: e,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let mut qmp = Qmp {
            stream,
            path: path.to_owned(),
            pending: Vec::new(),
            events: VecDeque::new(),
        };
        let greeting = qmp.read_message(timeout, Instant::now() + timeout, "the QMP greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(VmError::protocol(
                qmp.peer(),
                format!("not a greeting: {greeting}"),
            ));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments` (an object, or `null` for none) and returns the
    /// `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, VmError> {
        let mut request = json!({ "execute": command });
        if !arguments.is_null() {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.stream
            .write_all(line.as_bytes())
            .map_err(|e| VmError::io(format!("QMP {command} on {}", self.path.display()), e))?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let msg = self.read_message(
                COMMAND_TIMEOUT,
                deadline,
                &format!("the reply to {command}"),
            )?;
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
                return Err(VmError::Qmp {
                    command: command.into(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            if msg.get("event").is_some() {
                self.events.push_back(msg);
            }
        }
    }

    /// Waits for the event `name` for which `matches(data)` holds, where `data` is the
    /// event's `data` member (`null` if none), and returns the whole event. Events seen
    /// earlier, also during [`execute`](Self::execute), count; non-matching ones are kept.
    pub fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> Result<Value, VmError> {
        let is_it = |ev: &Value| ev["event"] == name && matches(&ev["data"]);
        if let Some(i) = self.events.iter().position(is_it) {
            return Ok(self.events.remove(i).expect("index from position"));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let msg = self.read_message(timeout, deadline, &format!("QMP event {name}"))?;
            if is_it(&msg) {
                return Ok(msg);
            }
            if msg.get("event").is_some() {
                self.events.push_back(msg);
            }
        }
    }

    /// Takes the events received so far and not yet returned by [`wait_event`](Self::wait_event).
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    fn peer(&self) -> String {
        format!("QMP {}", self.path.display())
    }

    /// Reads the next message; `budget` is the whole wait that `deadline` ends (for errors).
    fn read_message(
        &mut self,
        budget: Duration,
        deadline: Instant,
        what: &str,
    ) -> Result<Value, VmError> {
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return serde_json::from_slice(&line)
                    .map_err(|e| VmError::protocol(self.peer(), format!("bad JSON: {e}")));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(VmError::Timeout {
                    what: format!("{what} on {}", self.path.display()),
                    after: budget,
                });
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| VmError::io(self.peer(), e))?;
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(VmError::protocol(self.peer(), "QEMU closed the connection")),
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(VmError::io(self.peer(), e)),
            }
        }
    }
}
