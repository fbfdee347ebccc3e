//! `nestless-vm-exec`: the command server of nestless's test guests.
//!
//! Listens on a vsock port (default 1024) and runs one command per connection, as described
//! in [`nestless_tests::vm::exec`]. Each command gets its own process group, killed when its
//! timeout passes. Test support only: it runs anything it is sent, as root.
//!
//! Usage: `nestless-vm-exec [--port N] [--ready-file PATH]` (the ready file is created once
//! the socket listens; the guest's init prints the readiness marker after that).
//!
//! `nestless-vm-exec --connect CID:PORT` is a client instead, for tests that talk to a host
//! service from the guest (`socat - VSOCK-CONNECT:CID:PORT`): it sends its stdin to the
//! stream and copies what comes back to stdout until the peer closes. It does not
//! half-close the stream at the end of stdin: vhost-device-vsock 0.3 turns a guest's
//! half-close into a full close of the host's unix stream, so the host could not answer.

use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nestless_tests::vm::exec::{
    read_frame, write_frame, ExecReply, ExecRequest, GuestExit, EXEC_PORT,
};
use vsock::{VsockListener, VsockStream, VMADDR_CID_ANY};

/// How long to wait for stdout/stderr to close after the command exited: background
/// processes it started may hold the pipes open forever.
const PIPE_GRACE: Duration = Duration::from_millis(300);

fn main() -> ExitCode {
    let mut port = EXEC_PORT;
    let mut ready_file = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--port", Some(p)) if p.parse::<u32>().is_ok() => port = p.parse().unwrap(),
            ("--ready-file", Some(f)) => ready_file = Some(f),
            ("--connect", Some(addr)) => return connect(&addr),
            _ => {
                eprintln!(
                    "usage: nestless-vm-exec [--port N] [--ready-file PATH] | --connect CID:PORT"
                );
                return ExitCode::from(2);
            }
        }
    }
    let listener = match VsockListener::bind_with_cid_port(VMADDR_CID_ANY, port) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("nestless-vm-exec: cannot listen on vsock port {port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Before the ready file: init prints the readiness marker once the file exists, and
    // the two lines must not interleave on the console.
    eprintln!("nestless-vm-exec: listening on vsock port {port}");
    if let Some(f) = ready_file {
        if let Err(e) = std::fs::write(&f, b"") {
            eprintln!("nestless-vm-exec: cannot create {f}: {e}");
            return ExitCode::FAILURE;
        }
    }
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                thread::spawn(move || serve(stream));
            }
            Err(e) => eprintln!("nestless-vm-exec: accept failed: {e}"),
        }
    }
    ExitCode::FAILURE
}

/// The `--connect CID:PORT` client: stdin to the stream, the stream to stdout.
fn connect(addr: &str) -> ExitCode {
    let parsed = addr
        .split_once(':')
        .and_then(|(cid, port)| Some((cid.parse::<u32>().ok()?, port.parse::<u32>().ok()?)));
    let Some((cid, port)) = parsed else {
        eprintln!("nestless-vm-exec: --connect wants CID:PORT, not {addr}");
        return ExitCode::from(2);
    };
    let result = VsockStream::connect_with_cid_port(cid, port).and_then(|mut stream| {
        let mut sender = stream.try_clone()?;
        // Detached: when the peer closes, whatever stdin has left has nowhere to go.
        thread::spawn(move || io::copy(&mut io::stdin().lock(), &mut sender));
        io::copy(&mut stream, &mut io::stdout().lock()).map(drop)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nestless-vm-exec: vsock {cid}:{port}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(mut stream: VsockStream) {
    if let Err(e) = handle(&mut stream) {
        eprintln!("nestless-vm-exec: connection failed: {e}");
    }
}

fn handle(stream: &mut VsockStream) -> io::Result<()> {
    let header = read_frame(stream)?;
    let stdin = read_frame(stream)?;
    let request: ExecRequest = serde_json::from_slice(&header)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad request: {e}")))?;
    let (reply, stdout, stderr) = execute(&request, stdin);
    let reply = serde_json::to_vec(&reply).expect("an ExecReply always serialises");
    write_frame(stream, &reply)?;
    write_frame(stream, &stdout)?;
    write_frame(stream, &stderr)?;
    stream.flush()
}

fn execute(req: &ExecRequest, stdin: Vec<u8>) -> (ExecReply, Vec<u8>, Vec<u8>) {
    let started = Instant::now();
    let not_started = |why: String| {
        let reply = ExecReply {
            exit: GuestExit::NotStarted,
            duration_us: 0,
        };
        (reply, Vec::new(), why.into_bytes())
    };
    let Some((program, args)) = req.argv.split_first() else {
        return not_started("empty argv".into());
    };
    let mut child = match Command::new(program)
        .args(args)
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .current_dir(req.cwd.as_deref().unwrap_or("/"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => return not_started(format!("cannot run {program}: {e}")),
    };
    let mut child_stdin = child.stdin.take().expect("stdin is piped");
    thread::spawn(move || {
        // A command that does not read its stdin makes this fail with EPIPE: fine.
        let _ = child_stdin.write_all(&stdin);
    });
    let (done_tx, done_rx) = mpsc::channel();
    let stdout = collect(
        child.stdout.take().expect("stdout is piped"),
        done_tx.clone(),
    );
    let stderr = collect(child.stderr.take().expect("stderr is piped"), done_tx);

    let pid = child.id() as libc::pid_t;
    let (exit_tx, exit_rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = exit_tx.send(child.wait());
    });
    let timeout = Duration::from_millis(req.timeout_ms);
    let exit = match exit_rx.recv_timeout(timeout) {
        Ok(Ok(status)) => match (status.code(), status.signal()) {
            (Some(code), _) => GuestExit::Code(code),
            (None, Some(signal)) => GuestExit::Signal(signal),
            (None, None) => GuestExit::NotStarted,
        },
        Ok(Err(e)) => return not_started(format!("cannot wait for {program}: {e}")),
        Err(_) => {
            // SAFETY: kill(2) on the process group we created; no memory is involved.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let _ = exit_rx.recv();
            GuestExit::TimedOut
        }
    };
    let duration_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    let deadline = Instant::now() + PIPE_GRACE;
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    let take = |buf: Arc<Mutex<Vec<u8>>>| std::mem::take(&mut *buf.lock().unwrap());
    let reply = ExecReply { exit, duration_us };
    (reply, take(stdout), take(stderr))
}

/// Reads `pipe` to its end in a thread into a shared buffer; signals `done` at the end.
fn collect(mut pipe: impl Read + Send + 'static, done: mpsc::Sender<()>) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let shared = Arc::clone(&buf);
    thread::spawn(move || {
        let mut chunk = [0u8; 16384];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => shared.lock().unwrap().extend_from_slice(&chunk[..n]),
            }
        }
        let _ = done.send(());
    });
    buf
}
