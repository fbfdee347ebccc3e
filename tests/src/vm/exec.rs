//! Running commands in a guest: the wire protocol of `nestless-vm-exec` and its host client.
//!
//! The server listens on vsock port [`EXEC_PORT`] in the guest. Each connection carries one
//! command. Every message is a frame: a 4-byte big-endian length, then that many bytes.
//!
//! ```text
//! host (Vm::exec)                 vhost-device-vsock            guest (nestless-vm-exec)
//!   | connect <uds>                     |                                |
//!   | "CONNECT 1024\n" ---------------->| -- vsock connect port 1024 --> | accept
//!   | <--------------------- "OK <port>\n"                               |
//!   | frame(ExecRequest JSON), frame(stdin) ---------------------------> | spawn, wait
//!   | <------------ frame(ExecReply JSON), frame(stdout), frame(stderr)  | close
//! ```

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::error::VmError;

/// The vsock port the guest command server listens on.
pub const EXEC_PORT: u32 = 1024;

/// The largest frame either side accepts (64 MiB).
pub const MAX_FRAME: usize = 64 << 20;

/// How long a command may run when the caller does not say.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The request header sent to the server, followed by a frame holding the command's stdin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The program and its arguments; `argv[0]` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Variables added to the server's environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// The working directory (default `/`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// After this many milliseconds the command's process group is killed.
    pub timeout_ms: u64,
}

/// How a guest command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestExit {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
    /// It ran past its timeout and was killed.
    TimedOut,
    /// It could not be started (the reason is in stderr).
    NotStarted,
}

/// The reply header, followed by a frame of stdout and a frame of stderr.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecReply {
    /// How the command ended.
    pub exit: GuestExit,
    /// How long it ran in the guest, in microseconds.
    pub duration_us: u64,
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&n| n as usize <= MAX_FRAME)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    w.write_all(&len.to_be_bytes())?;
    w.write_all(payload)
}

/// Reads one frame.
pub fn read_frame(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds {MAX_FRAME}"),
        ));
    }
    let mut buf = vec![0; len];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// A command to run in the guest, built like [`std::process::Command`].
#[derive(Debug, Clone)]
pub struct GuestCommand {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<String>,
    stdin: Vec<u8>,
    timeout: Duration,
}

impl GuestCommand {
    /// Runs `program` (looked up in the guest's `PATH`).
    pub fn new(program: impl Into<String>) -> Self {
        GuestCommand {
            argv: vec![program.into()],
            env: Vec::new(),
            cwd: None,
            stdin: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Runs `script` with the guest's `/bin/sh -c` (busybox ash).
    pub fn shell(script: impl Into<String>) -> Self {
        GuestCommand::new("/bin/sh").arg("-c").arg(script)
    }

    /// Adds an argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.argv.push(arg.into());
        self
    }

    /// Adds arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.argv.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for the command.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets the working directory.
    pub fn current_dir(mut self, dir: impl Into<String>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Feeds these bytes to the command's stdin (default: empty).
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = data.into();
        self
    }

    /// Kills the command (its whole process group) after `timeout` (default 60 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The argument vector.
    pub fn argv(&self) -> &[String] {
        &self.argv
    }

    fn request(&self) -> ExecRequest {
        ExecRequest {
            argv: self.argv.clone(),
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            timeout_ms: u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// What a guest command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// How it ended.
    pub status: GuestExit,
    /// Its standard output.
    pub stdout: Vec<u8>,
    /// Its standard error.
    pub stderr: Vec<u8>,
    /// How long it ran in the guest.
    pub guest_duration: Duration,
    /// From connecting to the last byte of the reply, as seen by the host.
    pub round_trip: Duration,
}

impl ExecOutput {
    /// True when the command exited with code 0.
    pub fn success(&self) -> bool {
        self.status == GuestExit::Code(0)
    }

    /// Standard output as text (invalid UTF-8 replaced).
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Standard error as text (invalid UTF-8 replaced).
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Opens a stream to guest vsock `port` through vhost-device-vsock's host socket `uds`.
///
/// vhost-device-vsock answers `CONNECT <port>\n` with `OK <host port>\n` once the guest
/// accepted; anything else (or a closed connection) means nothing listens on that port.
pub fn connect_vsock(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream, VmError> {
    let mut stream = UnixStream::connect(uds).map_err(|source| VmError::Connect {
        path: uds.to_owned(),
        source,
    })?;
    let what = || format!("vsock handshake on {} port {port}", uds.display());
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| VmError::io(what(), e))?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| VmError::io(what(), e))?;
    // Read the reply byte by byte: what follows the newline belongs to the guest.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(VmError::protocol(
                    "vhost-device-vsock",
                    format!(
                        "connection closed after {line:?}: is the guest listening on port {port}?"
                    ),
                ))
            }
            Ok(_) if line.len() < 64 => line.push(byte[0]),
            Ok(_) => {
                return Err(VmError::protocol(
                    "vhost-device-vsock",
                    "reply line too long",
                ))
            }
            Err(e) => return Err(VmError::io(what(), e)),
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(VmError::protocol(
            "vhost-device-vsock",
            format!("expected OK, got {:?}", String::from_utf8_lossy(&line)),
        ));
    }
    Ok(stream)
}

/// Runs `cmd` through the exec server reachable at `uds`.
pub fn run(uds: &Path, cmd: &GuestCommand) -> Result<ExecOutput, VmError> {
    let started = Instant::now();
    // The exchange may take as long as the command, plus slack for a slow (TCG) guest.
    let budget = cmd.timeout + Duration::from_secs(30);
    let mut stream = connect_vsock(uds, EXEC_PORT, budget)?;
    let what = || format!("exec of {:?} via {}", cmd.argv, uds.display());
    let header = serde_json::to_vec(&cmd.request()).expect("an ExecRequest always serialises");
    write_frame(&mut stream, &header)
        .and_then(|()| write_frame(&mut stream, &cmd.stdin))
        .map_err(|e| VmError::io(what(), e))?;
    let reply = read_frame(&mut stream).map_err(|e| VmError::io(what(), e))?;
    let reply: ExecReply = serde_json::from_slice(&reply)
        .map_err(|e| VmError::protocol("nestless-vm-exec", format!("bad reply header: {e}")))?;
    let stdout = read_frame(&mut stream).map_err(|e| VmError::io(what(), e))?;
    let stderr = read_frame(&mut stream).map_err(|e| VmError::io(what(), e))?;
    Ok(ExecOutput {
        status: reply.exit,
        stdout,
        stderr,
        guest_duration: Duration::from_micros(reply.duration_us),
        round_trip: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"hello").unwrap();
        write_frame(&mut buf, b"").unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r).unwrap(), b"hello");
        assert_eq!(read_frame(&mut r).unwrap(), b"");
        assert!(read_frame(&mut r).is_err());
    }

    #[test]
    fn oversized_frame_is_refused() {
        let len = (MAX_FRAME as u32 + 1).to_be_bytes();
        let err = read_frame(&mut &len[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn request_and_reply_use_stable_json() {
        let req = GuestCommand::shell("ip -o link")
            .env("A", "b")
            .timeout(Duration::from_secs(2))
            .request();
        let json = serde_json::to_string(&req).unwrap();
        assert_eq!(
            json,
            r#"{"argv":["/bin/sh","-c","ip -o link"],"env":[["A","b"]],"cwd":null,"timeout_ms":2000}"#
        );
        let reply = ExecReply {
            exit: GuestExit::Signal(9),
            duration_us: 5,
        };
        let json = serde_json::to_string(&reply).unwrap();
        assert_eq!(json, r#"{"exit":{"signal":9},"duration_us":5}"#);
        assert_eq!(serde_json::from_str::<ExecReply>(&json).unwrap(), reply);
    }
}
