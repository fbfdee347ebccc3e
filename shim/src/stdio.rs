//! Standard I/O of container processes.
//!
//! containerd names, per process, where stdin, stdout and stderr go: FIFO
//! paths it created (and reads/writes at the other end), `file:///path` (append
//! to a file), `binary:///path?arg=v` (hand the output to a logging program),
//! or nothing (`/dev/null`).
//!
//! Without a terminal, the process gets pipes; the shim holds the other ends
//! and copies between them and the FIFOs:
//!
//! ```text
//!   client --stdin fifo--> shim --pipe--> process --pipe--> shim --stdout fifo--> client
//! ```
//!
//! so that the process never sees the FIFOs themselves: closing stdin is the
//! shim's decision (the client closed its end, or containerd sent `CloseIO`),
//! and a client that goes away does not kill the process with `SIGPIPE` (the
//! shim keeps a read end of each output FIFO open, as containerd expects, so
//! that the output waits in the FIFO for a client that comes back; it closes
//! its write end when the process's output ends, so the client's copy then
//! sees EOF).
//!
//! **Output at exit.** The exit of a process is reported (TaskExit, Wait)
//! only once its output has been copied out ([`OutputDrain`]): a client that
//! reads the output once it hears of the exit gets all of it. A copy that
//! makes no progress for [`OUTPUT_STALL`] (no client reads the FIFO) does not
//! hold the exit back any longer. At Delete, the shim lets go of its read ends
//! first: a copy into a FIFO whose client has closed its end then fails at
//! once (`EPIPE`) instead of waiting for a reader, and Delete does not block
//! on it.
//!
//! With a terminal, runc creates a pty and sends its master over the
//! `--console-socket` unix socket (SCM_RIGHTS); the shim copies stdin to the
//! master and the master to stdout, and `ResizePty` sets the master's window
//! size.
//!
//! For `binary://`, the logging program gets the read ends of the stdout and
//! stderr pipes as fds 3 and 4 and a "ready" pipe as fd 5, with
//! `CONTAINER_ID` and `CONTAINER_NAMESPACE` in its environment; the shim waits
//! until it closes fd 5 before it runs the process.

use std::{
    ffi::OsString,
    io,
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use log::{debug, warn};
use nix::{
    fcntl::OFlag,
    sys::socket::{recvmsg, ControlMessageOwned, MsgFlags},
};
use tokio::{
    io::{unix::AsyncFd, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{
        unix::pipe::{self, Receiver, Sender},
        UnixListener,
    },
    sync::{oneshot, watch},
    task::JoinHandle,
};

use crate::{
    error::{Result, ShimError},
    reaper::Reaper,
};

/// Buffer size of one copy loop.
const COPY_BUF: usize = 32 * 1024;
/// How long an output copy may make no progress (nobody reads its FIFO)
/// before an exit is reported, or a Delete completes, without it.
pub const OUTPUT_STALL: Duration = Duration::from_secs(2);
/// The longest an exit waits for output that keeps coming (a child that
/// outlived the process and still writes to its stdout).
pub const OUTPUT_DRAIN_CAP: Duration = Duration::from_secs(10);
/// How long runc gets to connect to the console socket once it has exited successfully.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where containerd wants a process's stdio, as given in Create and Exec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioSpec {
    /// stdin FIFO path, or empty.
    pub stdin: String,
    /// stdout FIFO path or URI, or empty.
    pub stdout: String,
    /// stderr FIFO path or URI, or empty.
    pub stderr: String,
    /// Whether the process has a terminal.
    pub terminal: bool,
}

/// One output destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Nowhere (`/dev/null`).
    Null,
    /// A FIFO containerd created.
    Fifo(PathBuf),
    /// `file:///path`: appended to a regular file.
    File(PathBuf),
    /// `binary:///path?k=v`: a logging program, with `--k v` arguments.
    Binary {
        /// The program.
        path: PathBuf,
        /// Its arguments.
        args: Vec<String>,
    },
}

impl Output {
    /// Parses what containerd sent for stdout or stderr.
    pub fn parse(s: &str) -> Result<Self> {
        if s.is_empty() {
            return Ok(Self::Null);
        }
        let Some((scheme, rest)) = s.split_once("://") else {
            return Ok(Self::Fifo(PathBuf::from(s)));
        };
        let bad = |why: &str| ShimError::invalid("stdio URI", format!("{s:?}: {why}"));
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let path = percent_decode(path).map_err(|_| bad("bad percent-encoding"))?;
        if !path.starts_with('/') {
            return Err(bad("the path must be absolute"));
        }
        match scheme {
            "fifo" => Ok(Self::Fifo(PathBuf::from(path))),
            "file" => Ok(Self::File(PathBuf::from(path))),
            "binary" => {
                let mut args = Vec::new();
                for pair in query
                    .unwrap_or_default()
                    .split('&')
                    .filter(|p| !p.is_empty())
                {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    let k = percent_decode(k).map_err(|_| bad("bad percent-encoding"))?;
                    let v = percent_decode(v).map_err(|_| bad("bad percent-encoding"))?;
                    args.push(format!("--{k}"));
                    if !v.is_empty() {
                        args.push(v);
                    }
                }
                Ok(Self::Binary {
                    path: PathBuf::from(path),
                    args,
                })
            }
            other => Err(bad(&format!(
                "scheme {other:?} is not fifo, file or binary"
            ))),
        }
    }
}

fn percent_decode(s: &str) -> std::result::Result<String, ()> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).ok_or(())?;
            let hex = std::str::from_utf8(hex).map_err(|_| ())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ())
}

/// The fds runc hands to the process as stdin, stdout, stderr (`None`: `/dev/null`).
#[derive(Debug, Default)]
pub struct ChildStdio {
    /// stdin.
    pub stdin: Option<OwnedFd>,
    /// stdout.
    pub stdout: Option<OwnedFd>,
    /// stderr.
    pub stderr: Option<OwnedFd>,
}

impl ChildStdio {
    /// Sets them on a command.
    pub fn apply(self, cmd: &mut Command) {
        let s = |fd: Option<OwnedFd>| fd.map(Stdio::from).unwrap_or_else(Stdio::null);
        cmd.stdin(s(self.stdin))
            .stdout(s(self.stdout))
            .stderr(s(self.stderr));
    }
}

/// A unix socket runc sends a pty master to (`--console-socket`).
pub struct ConsoleSocket {
    listener: UnixListener,
    dir: PathBuf,
    path: PathBuf,
}

impl ConsoleSocket {
    /// Creates the socket in a fresh private directory under the temp dir.
    pub fn new() -> Result<Self> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "nestless-pty-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir)
            .map_err(|e| ShimError::io(format!("cannot create {}", dir.display()), e))?;
        let path = dir.join("pty.sock");
        let listener = UnixListener::bind(&path).map_err(|e| {
            let _ = std::fs::remove_dir_all(&dir);
            ShimError::io(format!("cannot listen on {}", path.display()), e)
        })?;
        Ok(Self {
            listener,
            dir,
            path,
        })
    }

    /// The socket's path, for `--console-socket`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the pty master runc sent (call once runc has exited successfully).
    pub async fn receive(self) -> Result<OwnedFd> {
        let path = self.path.clone();
        let fail = |e: io::Error| ShimError::io(format!("no pty master on {}", path.display()), e);
        let (stream, _) = tokio::time::timeout(CONSOLE_TIMEOUT, self.listener.accept())
            .await
            .map_err(|_| fail(io::ErrorKind::TimedOut.into()))?
            .map_err(fail)?;
        loop {
            stream.readable().await.map_err(fail)?;
            let got = stream.try_io(tokio::io::Interest::READABLE, || {
                recv_fd(stream.as_raw_fd()).map_err(io::Error::from)
            });
            match got {
                Ok(Some(fd)) => return Ok(fd),
                Ok(None) => return Err(fail(io::Error::other("runc sent no file descriptor"))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(fail(e)),
            }
        }
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn recv_fd(sock: RawFd) -> nix::Result<Option<OwnedFd>> {
    let mut name = [0u8; 4096];
    let mut iov = [io::IoSliceMut::new(&mut name)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut found = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: the kernel just installed this descriptor for us.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                if found.is_none() {
                    found = Some(owned);
                }
            }
        }
    }
    Ok(found)
}

/// A pty master, non-blocking, driven by the tokio reactor.
pub struct PtyMaster {
    fd: AsyncFd<OwnedFd>,
}

impl PtyMaster {
    fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(&fd)?;
        Ok(Self { fd: register(fd)? })
    }

    /// Reads; `Ok(0)` once the slave side is closed (the kernel says `EIO`).
    async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), buf).map_err(io::Error::from)) {
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), buf).map_err(io::Error::from))
            {
                Ok(Ok(n)) => buf = &buf[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    /// Sets the terminal's window size.
    pub fn resize(&self, width: u32, height: u32) -> io::Result<()> {
        let ws = libc::winsize {
            ws_row: height.min(u16::MAX as u32) as u16,
            ws_col: width.min(u16::MAX as u32) as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which lives across the call.
        let r = unsafe { libc::ioctl(self.fd.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Registers a descriptor the caller owns (and hands over) with the tokio reactor.
pub(crate) fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open and
    // pointing at the same file description until the AsyncFd is dropped.
    Ok(unsafe { AsyncFd::register(fd) }?)
}

fn set_nonblocking(fd: &impl AsFd) -> io::Result<()> {
    let flags = nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
    let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
    Ok(())
}

/// A pipe with both ends blocking and close-on-exec: (read, write).
fn os_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(OFlag::O_CLOEXEC)?)
}

/// Who the process's output goes to, on the shim's side.
enum Sink {
    /// A FIFO: the write end, and a read end the shim keeps open (so that the
    /// open never waits for a client and writes do not fail while the client
    /// is away) until Delete.
    Fifo {
        tx: Sender,
        keeper: OwnedFd,
    },
    File(tokio::fs::File),
}

impl Sink {
    async fn open(out: &Output) -> Result<Option<Self>> {
        match out {
            Output::Null | Output::Binary { .. } => Ok(None),
            Output::Fifo(path) => {
                let fail = |e| ShimError::io(format!("cannot open {}", path.display()), e);
                // The read end first: with a reader there, the write end opens at once.
                let keeper = nix::fcntl::open(
                    path,
                    OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
                    nix::sys::stat::Mode::empty(),
                )
                .map_err(|e| fail(e.into()))?;
                let tx = pipe::OpenOptions::new().open_sender(path).map_err(fail)?;
                Ok(Some(Self::Fifo { tx, keeper }))
            }
            Output::File(path) => tokio::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(path)
                .await
                .map(|f| Some(Self::File(f)))
                .map_err(|e| ShimError::io(format!("cannot open log file {}", path.display()), e)),
        }
    }

    /// Splits off the read end a FIFO sink keeps, for [`ProcessIo`] to hold.
    fn take_keeper(self) -> (Writer, Option<OwnedFd>) {
        match self {
            Self::Fifo { tx, keeper } => (Writer::Fifo(tx), Some(keeper)),
            Self::File(f) => (Writer::File(f), None),
        }
    }
}

/// The writing side of a [`Sink`], owned by its copy task.
enum Writer {
    Fifo(Sender),
    File(tokio::fs::File),
}

impl Writer {
    fn get(&mut self) -> &mut (dyn AsyncWrite + Unpin + Send) {
        match self {
            Self::Fifo(s) => s,
            Self::File(f) => f,
        }
    }
}

/// How the output copies of a process are doing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Progress {
    /// Copies still running.
    open: usize,
    /// Bytes copied so far, all copies together.
    copied: u64,
}

/// How waiting for a process's output ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every copy has ended: all the output is out.
    Done,
    /// A copy made no progress for the stall time (nobody reads it).
    Stalled,
    /// The output kept coming past the cap.
    Capped,
}

/// Watches a process's output copies (see [`ProcessIo::drain`]).
#[derive(Clone)]
pub struct OutputDrain(watch::Receiver<Progress>);

impl OutputDrain {
    /// Waits until every output copy has ended, as long as they make progress:
    /// gives up after `stall` without any, or after `cap` in all.
    pub async fn wait(&mut self, stall: Duration, cap: Duration) -> Drained {
        let deadline = tokio::time::Instant::now() + cap;
        loop {
            if self.0.borrow_and_update().open == 0 {
                return Drained::Done;
            }
            let next = tokio::time::Instant::now() + stall;
            match tokio::time::timeout_at(next.min(deadline), self.0.changed()).await {
                Ok(Ok(())) => {}
                // The copies are gone (aborted): nothing more will come out.
                Ok(Err(_)) => return Drained::Done,
                Err(_) if next >= deadline => return Drained::Capped,
                Err(_) => return Drained::Stalled,
            }
        }
    }
}

/// Copies `from` to `to` until EOF or an error, counting into `progress`.
async fn copy_counted<R: AsyncRead + Unpin>(
    from: &mut R,
    to: &mut (dyn AsyncWrite + Unpin + Send),
    progress: &watch::Sender<Progress>,
) {
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                debug!("output read: {e}");
                break;
            }
        };
        if let Err(e) = to.write_all(&buf[..n]).await {
            debug!("output copy: {e}");
            break;
        }
        progress.send_modify(|p| p.copied += n as u64);
    }
    let _ = to.flush().await;
}

/// Context the logging binary gets.
#[derive(Debug, Clone)]
pub struct IoContext {
    /// Container id (`CONTAINER_ID`).
    pub container_id: String,
    /// containerd namespace (`CONTAINER_NAMESPACE`).
    pub namespace: String,
}

/// A process's stdio, prepared before runc runs it.
pub struct PreparedIo {
    /// What runc hands to the process (empty with a terminal).
    pub child: ChildStdio,
    /// The console socket, with a terminal.
    pub console: Option<ConsoleSocket>,
    stdin: Option<Receiver>,
    stdin_pipe: Option<Sender>,
    stdout: Option<(Receiver, Sink)>,
    stderr: Option<(Receiver, Sink)>,
    /// The terminal's output sink.
    tty_out: Option<Sink>,
}

impl PreparedIo {
    /// Opens the FIFOs/files, creates the pipes (or the console socket), and
    /// starts the logging binary if asked for.
    pub async fn prepare(spec: &StdioSpec, ctx: &IoContext, reaper: &Reaper) -> Result<Self> {
        let stdin = if spec.stdin.is_empty() {
            None
        } else {
            // Non-blocking read side: the open does not wait for the writer,
            // and EOF comes only after a writer has come and gone.
            Some(
                pipe::OpenOptions::new()
                    .open_receiver(&spec.stdin)
                    .map_err(|e| ShimError::io(format!("cannot open stdin {}", spec.stdin), e))?,
            )
        };
        let out = Output::parse(&spec.stdout)?;
        let err = Output::parse(&spec.stderr)?;

        if spec.terminal {
            if !matches!(out, Output::Null | Output::Fifo(_) | Output::File(_)) {
                return Err(ShimError::invalid(
                    "stdout",
                    "a terminal's output can only go to a FIFO or a file",
                ));
            }
            return Ok(Self {
                child: ChildStdio::default(),
                console: Some(ConsoleSocket::new()?),
                stdin,
                stdin_pipe: None,
                stdout: None,
                stderr: None,
                tty_out: Sink::open(&out).await?,
            });
        }

        let mut child = ChildStdio::default();
        let mut stdin_pipe = None;
        if stdin.is_some() {
            let (r, w) = os_pipe().map_err(|e| ShimError::io("cannot create a stdin pipe", e))?;
            child.stdin = Some(r);
            stdin_pipe = Some(
                Sender::from_owned_fd(w).map_err(|e| ShimError::io("cannot register a pipe", e))?,
            );
        }

        // Output pipes; `binary://` hands their read ends to the logger.
        let mut readers: [Option<OwnedFd>; 2] = [None, None];
        for (i, o) in [&out, &err].into_iter().enumerate() {
            if *o == Output::Null {
                continue;
            }
            let (r, w) = os_pipe().map_err(|e| ShimError::io("cannot create an output pipe", e))?;
            if i == 0 {
                child.stdout = Some(w);
            } else {
                child.stderr = Some(w);
            }
            readers[i] = Some(r);
        }
        let [out_r, err_r] = readers;

        if let Output::Binary { path, args } = &out {
            start_logging_binary(path, args, out_r, err_r, ctx, reaper).await?;
            return Ok(Self {
                child,
                console: None,
                stdin,
                stdin_pipe,
                stdout: None,
                stderr: None,
                tty_out: None,
            });
        }

        let attach = |r: Option<OwnedFd>, sink: Option<Sink>| -> Result<Option<(Receiver, Sink)>> {
            match (r, sink) {
                (Some(r), Some(sink)) => Ok(Some((
                    Receiver::from_owned_fd(r)
                        .map_err(|e| ShimError::io("cannot register a pipe", e))?,
                    sink,
                ))),
                _ => Ok(None),
            }
        };
        let stdout = attach(out_r, Sink::open(&out).await?)?;
        let stderr = attach(err_r, Sink::open(&err).await?)?;
        Ok(Self {
            child,
            console: None,
            stdin,
            stdin_pipe,
            stdout,
            stderr,
            tty_out: None,
        })
    }

    /// Starts copying; `master` is the pty master (with a terminal).
    pub fn start(self, master: Option<OwnedFd>) -> Result<ProcessIo> {
        let mut tasks = Vec::new();
        let mut outputs = Vec::new();
        let (close_tx, close_rx) = oneshot::channel();
        let mut console = None;
        let mut keepers = Vec::new();
        let (progress, drain) = watch::channel(Progress::default());

        if let Some(master) = master {
            let m = Arc::new(
                PtyMaster::new(master)
                    .map_err(|e| ShimError::io("cannot register the pty master", e))?,
            );
            if let Some(sink) = self.tty_out {
                let (mut w, keeper) = sink.take_keeper();
                keepers.extend(keeper);
                let m = m.clone();
                let progress = progress.clone();
                progress.send_modify(|p| p.open += 1);
                outputs.push(tokio::spawn(async move {
                    let mut buf = vec![0u8; COPY_BUF];
                    loop {
                        match m.read(&mut buf).await {
                            Ok(0) => break,
                            Ok(n) => {
                                if let Err(e) = w.get().write_all(&buf[..n]).await {
                                    debug!("terminal output: {e}");
                                    break;
                                }
                                progress.send_modify(|p| p.copied += n as u64);
                            }
                            Err(e) => {
                                debug!("terminal read: {e}");
                                break;
                            }
                        }
                    }
                    let _ = w.get().flush().await;
                    // Closed before it counts as done: a client then sees EOF.
                    drop(w);
                    progress.send_modify(|p| p.open -= 1);
                }));
            }
            if let Some(stdin) = self.stdin {
                let m = m.clone();
                tasks.push(tokio::spawn(copy_stdin(
                    stdin,
                    StdinTarget::Pty(m),
                    close_rx,
                )));
            }
            console = Some(m);
        } else {
            if let (Some(stdin), Some(pipe)) = (self.stdin, self.stdin_pipe) {
                tasks.push(tokio::spawn(copy_stdin(
                    stdin,
                    StdinTarget::Pipe(pipe),
                    close_rx,
                )));
            }
            for (mut r, sink) in [self.stdout, self.stderr].into_iter().flatten() {
                let (mut w, keeper) = sink.take_keeper();
                keepers.extend(keeper);
                let progress = progress.clone();
                progress.send_modify(|p| p.open += 1);
                outputs.push(tokio::spawn(async move {
                    copy_counted(&mut r, w.get(), &progress).await;
                    // Closed before it counts as done: a client then sees EOF.
                    drop(w);
                    progress.send_modify(|p| p.open -= 1);
                }));
            }
        }
        Ok(ProcessIo {
            close_stdin: Some(close_tx),
            console,
            tasks,
            outputs,
            keepers,
            drain: OutputDrain(drain),
        })
    }
}

enum StdinTarget {
    Pipe(Sender),
    Pty(Arc<PtyMaster>),
}

impl StdinTarget {
    async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Self::Pipe(p) => p.write_all(buf).await,
            Self::Pty(m) => m.write_all(buf).await,
        }
    }
}

/// Copies the stdin FIFO to the process until the client closes it or
/// `CloseIO` arrives; then drains what the FIFO still holds and closes the
/// process's stdin (dropping the pipe's write end).
async fn copy_stdin(mut fifo: Receiver, mut to: StdinTarget, mut close: oneshot::Receiver<()>) {
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = tokio::select! {
            r = fifo.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = &mut close => {
                // Read the FIFO directly: tokio's try_read would report
                // WouldBlock for data the reactor has not seen yet.
                while let Ok(n) = nix::unistd::read(fifo.as_fd(), &mut buf) {
                    if n == 0 || to.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                break;
            }
        };
        if let Err(e) = to.write_all(&buf[..n]).await {
            debug!("stdin copy: {e}");
            break;
        }
    }
}

/// A running process's stdio plumbing.
pub struct ProcessIo {
    close_stdin: Option<oneshot::Sender<()>>,
    console: Option<Arc<PtyMaster>>,
    /// The stdin copy.
    tasks: Vec<JoinHandle<()>>,
    /// The output copies.
    outputs: Vec<JoinHandle<()>>,
    /// The read ends of the output FIFOs the shim keeps open until Delete.
    keepers: Vec<OwnedFd>,
    drain: OutputDrain,
}

impl ProcessIo {
    /// Closes the process's stdin once what the client wrote has been passed on.
    pub fn close_stdin(&mut self) {
        if let Some(tx) = self.close_stdin.take() {
            let _ = tx.send(());
        }
    }

    /// Resizes the terminal; `Ok(false)` when the process has none.
    pub fn resize(&self, width: u32, height: u32) -> io::Result<bool> {
        match &self.console {
            Some(m) => m.resize(width, height).map(|()| true),
            None => Ok(false),
        }
    }

    /// A watch on the output copies, to wait until the output is out.
    pub fn drain(&self) -> OutputDrain {
        self.drain.clone()
    }

    /// Delete: lets go of the FIFOs' read ends (a copy into a FIFO its client
    /// closed then fails at once), waits for the output copies as long as they
    /// make progress (at most `stall` without), then stops everything.
    pub async fn finish(mut self, stall: Duration) {
        self.close_stdin();
        self.keepers.clear();
        let mut drain = self.drain.clone();
        match drain.wait(stall, OUTPUT_DRAIN_CAP).await {
            Drained::Done => {}
            Drained::Stalled | Drained::Capped => {
                warn!("process output still unread at delete; closing it")
            }
        }
        for t in self.tasks.drain(..).chain(self.outputs.drain(..)) {
            t.abort();
        }
    }
}

impl Drop for ProcessIo {
    fn drop(&mut self) {
        for t in self.tasks.iter().chain(&self.outputs) {
            t.abort();
        }
    }
}

/// Starts a `binary://` logger and waits until it is ready (closes fd 5).
async fn start_logging_binary(
    path: &Path,
    args: &[String],
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    ctx: &IoContext,
    reaper: &Reaper,
) -> Result<()> {
    let fail =
        |e: io::Error| ShimError::io(format!("cannot start logging binary {}", path.display()), e);
    let (ready_r, ready_w) = os_pipe().map_err(fail)?;
    let null = || std::fs::File::open("/dev/null").map(OwnedFd::from);
    let stdout = match stdout {
        Some(fd) => fd,
        None => null().map_err(fail)?,
    };
    let stderr = match stderr {
        Some(fd) => fd,
        None => null().map_err(fail)?,
    };
    // Move the three descriptors out of the way of 3, 4, 5 (close-on-exec
    // copies), so that the child's dup2 calls cannot overwrite one another.
    let high = |fd: &OwnedFd| -> io::Result<OwnedFd> {
        let raw = nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))?;
        // SAFETY: fcntl returned a new descriptor that nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    };
    let fds = [
        high(&stdout).map_err(fail)?,
        high(&stderr).map_err(fail)?,
        high(&ready_w).map_err(fail)?,
    ];
    drop((stdout, stderr, ready_w));
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();

    let mut cmd = Command::new(path);
    cmd.args(args.iter().map(OsString::from))
        .env("CONTAINER_ID", &ctx.container_id)
        .env("CONTAINER_NAMESPACE", &ctx.namespace)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only async-signal-safe calls (dup2) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for (i, fd) in raw.iter().enumerate() {
                if libc::dup2(*fd, 3 + i as RawFd) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(fail)?;
    drop(cmd);
    drop(fds);
    let pid = child.id();
    let exit = reaper.watch(pid);
    let logger = path.display().to_string();
    tokio::spawn(async move {
        if let Ok(e) = exit.await {
            debug!(
                "logging binary {logger} (pid {pid}) exited with {}",
                e.status
            );
        }
    });

    let mut ready = Receiver::from_owned_fd(ready_r).map_err(fail)?;
    let mut b = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(30), ready.read(&mut b)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(fail(e)),
        Err(_) => Err(fail(io::ErrorKind::TimedOut.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs() {
        assert_eq!(Output::parse("").unwrap(), Output::Null);
        assert_eq!(
            Output::parse("/run/containerd/fifo/1/c-stdout").unwrap(),
            Output::Fifo("/run/containerd/fifo/1/c-stdout".into())
        );
        assert_eq!(
            Output::parse("file:///var/log/c%201.log").unwrap(),
            Output::File("/var/log/c 1.log".into())
        );
        assert_eq!(
            Output::parse("binary:///usr/bin/logger?id=a%2Fb&verbose").unwrap(),
            Output::Binary {
                path: "/usr/bin/logger".into(),
                args: vec!["--id".into(), "a/b".into(), "--verbose".into()]
            }
        );
        assert!(Output::parse("http://x/y").is_err());
        assert!(Output::parse("file://relative").is_err());
        assert!(Output::parse("file:///bad%zz").is_err());
    }

    #[tokio::test]
    async fn fifo_round_trip_and_close_stdin() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = |n: &str| {
            let p = dir.path().join(n);
            nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
            p.to_str().unwrap().to_owned()
        };
        let spec = StdioSpec {
            stdin: fifo("in"),
            stdout: fifo("out"),
            stderr: String::new(),
            terminal: false,
        };
        // The client's ends, as containerd opens them.
        let client_out = pipe::OpenOptions::new()
            .open_receiver(&spec.stdout)
            .unwrap();
        let ctx = IoContext {
            container_id: "c".into(),
            namespace: "ns".into(),
        };
        let mut io = PreparedIo::prepare(&spec, &ctx, &Reaper::default())
            .await
            .unwrap();
        let child = std::mem::take(&mut io.child);
        let mut client_in = pipe::OpenOptions::new().open_sender(&spec.stdin).unwrap();
        let mut pio = io.start(None).unwrap();

        // "Process" side: echo stdin to stdout through the pipes.
        let mut p_in = Receiver::from_owned_fd(child.stdin.unwrap()).unwrap();
        let mut p_out = Sender::from_owned_fd(child.stdout.unwrap()).unwrap();
        assert!(child.stderr.is_none());

        client_in.write_all(b"hello").await.unwrap();
        pio.close_stdin();
        let mut got = Vec::new();
        p_in.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");

        p_out.write_all(b"world").await.unwrap();
        drop(p_out);
        let mut client_out = client_out;
        let mut out = Vec::new();
        client_out.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"world");
        pio.finish(Duration::from_secs(1)).await;
    }

    /// A process's stdout as a FIFO the test reads (as containerd's client),
    /// and the process's end of the pipe.
    async fn output_to_fifo(dir: &Path) -> (Receiver, Sender, ProcessIo) {
        let path = dir.join("out");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let client = pipe::OpenOptions::new().open_receiver(&path).unwrap();
        let spec = StdioSpec {
            stdout: path.to_str().unwrap().to_owned(),
            ..Default::default()
        };
        let ctx = IoContext {
            container_id: "c".into(),
            namespace: "ns".into(),
        };
        let mut io = PreparedIo::prepare(&spec, &ctx, &Reaper::default())
            .await
            .unwrap();
        let child = std::mem::take(&mut io.child);
        let process = Sender::from_owned_fd(child.stdout.unwrap()).unwrap();
        (client, process, io.start(None).unwrap())
    }

    #[tokio::test]
    async fn the_drain_ends_when_every_byte_is_in_the_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let (mut client, mut process, pio) = output_to_fifo(dir.path()).await;
        // More than a pipe and a FIFO hold: the copy ends only as the client reads.
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let want = data.clone();
        let writer = tokio::spawn(async move {
            process.write_all(&data).await.unwrap();
        });
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        writer.await.unwrap();
        let mut drain = pio.drain();
        assert_eq!(
            drain
                .wait(Duration::from_secs(30), Duration::from_secs(60))
                .await,
            Drained::Done
        );
        // Done means the shim closed its end: the client reads to EOF, every byte.
        assert_eq!(reader.await.unwrap(), want);
        pio.finish(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn a_copy_nobody_reads_stalls_and_delete_does_not_wait_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let (client, mut process, pio) = output_to_fifo(dir.path()).await;
        let data = vec![b'x'; 300_000];
        let writer = tokio::spawn(async move {
            let _ = process.write_all(&data).await;
        });
        // Nobody reads: no progress once the FIFO and the pipe are full.
        let mut drain = pio.drain();
        assert_eq!(
            drain
                .wait(Duration::from_millis(200), Duration::from_secs(60))
                .await,
            Drained::Stalled
        );
        // The client closes its end (containerd is done with it): Delete lets go
        // of the shim's read end, the copy fails at once, nothing waits on it.
        drop(client);
        tokio::time::timeout(
            Duration::from_secs(20),
            pio.finish(Duration::from_secs(3600)),
        )
        .await
        .expect("Delete waited on a FIFO nobody reads");
        writer.abort();
    }
}
