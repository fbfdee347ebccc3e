//! Driving the runc binary.
//!
//! The shim runs runc itself rather than through the `runc` crate: every
//! child of the shim must be reaped by the shim's one [`Reaper`] (the shim is
//! a subreaper, and container processes are its children too), and the crate
//! waits for its commands with `tokio::process`, whose own `waitpid(pid)`
//! races with the reaper's `waitpid(-1)`. The crate's answer is a custom
//! executor hooked to a global monitor; a dozen small functions over
//! `std::process::Command` plus [`Reaper::watch`] are simpler, and keep the
//! shim smaller. Commands are spawned (never waited for by std), their pid is
//! watched, and their output pipes are read on the tokio reactor.
//!
//! Errors: runc prints its error on stderr, and also to the `--log` file as
//! JSON lines. Commands whose stdio belong to the container (create, exec)
//! are run with `--log` and the last error line of that file is reported;
//! the others have their stderr captured.
//!
//! The task service sees runc through the [`Runtime`] seam (the commands it
//! needs, nothing of how they are run), so that a fake can stand in for it
//! in unit tests.

use std::{
    ffi::{OsStr, OsString},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use async_trait::async_trait;
use log::debug;
use tokio::{io::AsyncReadExt, net::unix::pipe::Receiver};

use crate::{
    error::{Result, ShimError},
    reaper::Reaper,
    stdio::ChildStdio,
};

/// The runc commands the task service needs, for one container.
///
/// Implemented by [`Runc`]; unit tests put a fake in its place.
#[async_trait]
pub trait Runtime: Send + Sync {
    /// `runc create`: the container's init process exists (blocked before
    /// exec) when this returns.
    async fn create(&self, id: &str, opts: &CreateOpts<'_>, stdio: ChildStdio) -> Result<()>;
    /// `runc exec --detach`: the process runs when this returns.
    async fn exec(&self, id: &str, opts: &ExecOpts<'_>, stdio: ChildStdio) -> Result<()>;
    /// `runc start`.
    async fn start(&self, id: &str) -> Result<()>;
    /// `runc kill [--all] id signal`.
    async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<()>;
    /// `runc delete [--force] id`.
    async fn delete(&self, id: &str, force: bool) -> Result<()>;
    /// `runc pause`.
    async fn pause(&self, id: &str) -> Result<()>;
    /// `runc resume`.
    async fn resume(&self, id: &str) -> Result<()>;
    /// `runc ps --format json id`: the pids of the container's processes.
    async fn ps(&self, id: &str) -> Result<Vec<u32>>;
    /// `runc update --resources FILE id`.
    async fn update(&self, id: &str, resources: &Path) -> Result<()>;
}

/// How runc is run for one container (recorded in its bundle, so that
/// `delete` after a crash runs it the same way).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuncSettings {
    /// The binary (a path, or a name looked up in `PATH`).
    pub binary: PathBuf,
    /// `--root`.
    pub root: PathBuf,
    /// `--systemd-cgroup`.
    pub systemd_cgroup: bool,
}

/// How to run runc for one container.
#[derive(Clone)]
pub struct Runc {
    /// The binary (a path, or a name looked up in `PATH`).
    pub binary: PathBuf,
    /// `--root`.
    pub root: PathBuf,
    /// `--systemd-cgroup`.
    pub systemd_cgroup: bool,
    reaper: Reaper,
}

/// Options of `runc create`.
pub struct CreateOpts<'a> {
    /// `--bundle`.
    pub bundle: &'a Path,
    /// `--pid-file`.
    pub pid_file: &'a Path,
    /// `--console-socket`.
    pub console_socket: Option<&'a Path>,
    /// `--no-pivot`.
    pub no_pivot: bool,
    /// `--no-new-keyring`.
    pub no_new_keyring: bool,
    /// `--log` (runc's JSON error log).
    pub log: &'a Path,
}

/// Options of `runc exec --detach`.
pub struct ExecOpts<'a> {
    /// `--process`: the process spec JSON.
    pub process: &'a Path,
    /// `--pid-file`.
    pub pid_file: &'a Path,
    /// `--console-socket`.
    pub console_socket: Option<&'a Path>,
    /// `--log`.
    pub log: &'a Path,
}

impl Runc {
    /// A runc driver; exits of its commands are taken from `reaper`.
    pub fn new(binary: PathBuf, root: PathBuf, systemd_cgroup: bool, reaper: Reaper) -> Self {
        Self {
            binary,
            root,
            systemd_cgroup,
            reaper,
        }
    }

    fn command(&self, log: Option<&Path>) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root").arg(&self.root);
        if self.systemd_cgroup {
            cmd.arg("--systemd-cgroup");
        }
        if let Some(log) = log {
            cmd.arg("--log").arg(log).args(["--log-format", "json"]);
        }
        cmd
    }

    async fn run_captured(
        &self,
        command: &'static str,
        id: &str,
        extra: &[&OsStr],
    ) -> Result<Vec<u8>> {
        let mut args: Vec<&OsStr> = extra.to_vec();
        args.push(OsStr::new(id));
        self.run_args(command, id, &args).await
    }

    /// Runs `runc COMMAND ARGS...` with stdout and stderr captured.
    async fn run_args(&self, command: &'static str, id: &str, args: &[&OsStr]) -> Result<Vec<u8>> {
        let mut cmd = self.command(None);
        cmd.arg(command)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| ShimError::RuncSpawn {
            binary: self.binary.clone(),
            command,
            source,
        })?;
        drop(cmd);
        let exit = self.reaper.watch(child.id());
        let out = child.stdout.take().map(OwnedFd::from);
        let err = child.stderr.take().map(OwnedFd::from);
        let (out, err, exit) = tokio::join!(read_all(out), read_all(err), exit);
        let status = exit.map(|e| e.status).unwrap_or(255);
        debug!("runc {command} {id}: exit {status}");
        if status == 0 {
            return Ok(out);
        }
        let message = last_line(&String::from_utf8_lossy(&err))
            .unwrap_or_else(|| format!("exit status {status}"));
        Err(runc_error(command, id, message))
    }

    /// Runs a prepared command whose stdio belong to the container; the error
    /// comes from runc's JSON log.
    async fn run_logged(
        &self,
        command: &'static str,
        id: &str,
        mut cmd: Command,
        log: &Path,
    ) -> Result<()> {
        let child = cmd.spawn().map_err(|source| ShimError::RuncSpawn {
            binary: self.binary.clone(),
            command,
            source,
        })?;
        // Close our copies of the process's stdio now.
        drop(cmd);
        let status = self
            .reaper
            .watch(child.id())
            .await
            .map(|e| e.status)
            .unwrap_or(255);
        debug!("runc {command} {id}: exit {status}");
        if status == 0 {
            return Ok(());
        }
        let message = tokio::fs::read(log)
            .await
            .ok()
            .and_then(|data| last_error_in_log(&data))
            .unwrap_or_else(|| format!("exit status {status}"));
        Err(runc_error(command, id, message))
    }
}

#[async_trait]
impl Runtime for Runc {
    async fn create(&self, id: &str, opts: &CreateOpts<'_>, stdio: ChildStdio) -> Result<()> {
        let mut cmd = self.command(Some(opts.log));
        cmd.arg("create")
            .arg("--bundle")
            .arg(opts.bundle)
            .arg("--pid-file")
            .arg(opts.pid_file);
        if let Some(s) = opts.console_socket {
            cmd.arg("--console-socket").arg(s);
        }
        if opts.no_pivot {
            cmd.arg("--no-pivot");
        }
        if opts.no_new_keyring {
            cmd.arg("--no-new-keyring");
        }
        cmd.arg(id);
        stdio.apply(&mut cmd);
        self.run_logged("create", id, cmd, opts.log).await
    }

    async fn exec(&self, id: &str, opts: &ExecOpts<'_>, stdio: ChildStdio) -> Result<()> {
        let mut cmd = self.command(Some(opts.log));
        cmd.arg("exec")
            .arg("--detach")
            .arg("--process")
            .arg(opts.process)
            .arg("--pid-file")
            .arg(opts.pid_file);
        if let Some(s) = opts.console_socket {
            cmd.arg("--console-socket").arg(s);
        }
        cmd.arg(id);
        stdio.apply(&mut cmd);
        self.run_logged("exec", id, cmd, opts.log).await
    }

    async fn start(&self, id: &str) -> Result<()> {
        self.run_captured("start", id, &[]).await.map(drop)
    }

    async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<()> {
        let sig = signal.to_string();
        let mut args: Vec<&OsStr> = Vec::new();
        if all {
            args.push(OsStr::new("--all"));
        }
        args.push(OsStr::new(id));
        args.push(OsStr::new(&sig));
        self.run_args("kill", id, &args).await.map(drop)
    }

    async fn delete(&self, id: &str, force: bool) -> Result<()> {
        let mut args: Vec<&OsStr> = Vec::new();
        if force {
            args.push(OsStr::new("--force"));
        }
        args.push(OsStr::new(id));
        self.run_args("delete", id, &args).await.map(drop)
    }

    async fn pause(&self, id: &str) -> Result<()> {
        self.run_captured("pause", id, &[]).await.map(drop)
    }

    async fn resume(&self, id: &str) -> Result<()> {
        self.run_captured("resume", id, &[]).await.map(drop)
    }

    async fn update(&self, id: &str, resources: &Path) -> Result<()> {
        let args = [
            OsStr::new("--resources"),
            resources.as_os_str(),
            OsStr::new(id),
        ];
        self.run_args("update", id, &args).await.map(drop)
    }

    async fn ps(&self, id: &str) -> Result<Vec<u32>> {
        let args = [OsStr::new("--format"), OsStr::new("json"), OsStr::new(id)];
        let out = self.run_args("ps", id, &args).await?;
        parse_ps(&out).map_err(|e| ShimError::Runc {
            command: "ps",
            id: id.to_owned(),
            message: format!("unexpected output: {e}"),
            not_found: false,
        })
    }
}

fn runc_error(command: &'static str, id: &str, message: String) -> ShimError {
    let not_found = message.contains("does not exist") || message.contains("not found");
    ShimError::Runc {
        command,
        id: id.to_owned(),
        message,
        not_found,
    }
}

async fn read_all(fd: Option<OwnedFd>) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Some(fd) = fd {
        match Receiver::from_owned_fd(fd) {
            Ok(mut r) => {
                let _ = r.read_to_end(&mut buf).await;
            }
            Err(e) => debug!("cannot read runc output: {e}"),
        }
    }
    buf
}

fn last_line(s: &str) -> Option<String> {
    s.lines()
        .map(str::trim)
        .rev()
        .find(|l| !l.is_empty())
        .map(str::to_owned)
}

/// The message of the last `error`/`fatal` entry of runc's JSON log (or its
/// last line if none parses).
pub fn last_error_in_log(data: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    let mut last_error = None;
    for line in text.lines() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            let level = v.get("level").and_then(|l| l.as_str()).unwrap_or_default();
            if level == "error" || level == "fatal" {
                if let Some(msg) = v.get("msg").and_then(|m| m.as_str()) {
                    last_error = Some(msg.to_owned());
                }
            }
        }
    }
    last_error.or_else(|| last_line(&text))
}

/// Parses `runc ps --format json` (a JSON array of pids, or `null`).
pub fn parse_ps(out: &[u8]) -> serde_json::Result<Vec<u32>> {
    let pids: Option<Vec<u32>> = serde_json::from_slice(out)?;
    Ok(pids.unwrap_or_default())
}

/// runc's root for a containerd namespace: `ROOT/NAMESPACE`.
pub fn namespaced_root(root: &Path, namespace: &str) -> PathBuf {
    let mut p = root.to_path_buf();
    if !namespace.is_empty() {
        p.push(OsString::from(namespace));
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_errors() {
        let log = br#"{"level":"warning","msg":"a warning","time":"t"}
{"level":"error","msg":"container_linux.go:380: starting container process caused: exec: \"nope\": executable file not found in $PATH","time":"t"}
{"level":"info","msg":"later","time":"t"}
"#;
        assert!(last_error_in_log(log)
            .unwrap()
            .contains("executable file not found"));
        assert_eq!(last_error_in_log(b"plain text\n\n").unwrap(), "plain text");
        assert_eq!(last_error_in_log(b""), None);
    }

    #[test]
    fn ps_output() {
        assert_eq!(parse_ps(b"[1,22,333]\n").unwrap(), vec![1, 22, 333]);
        assert_eq!(parse_ps(b"null").unwrap(), Vec::<u32>::new());
        assert!(parse_ps(b"oops").is_err());
    }

    #[test]
    fn errors_know_not_found() {
        let e = runc_error("kill", "c1", "container \"c1\" does not exist".into());
        assert!(matches!(
            e,
            ShimError::Runc {
                not_found: true,
                ..
            }
        ));
        let e = runc_error("kill", "c1", "permission denied".into());
        assert!(matches!(
            e,
            ShimError::Runc {
                not_found: false,
                ..
            }
        ));
    }

    #[test]
    fn roots() {
        assert_eq!(
            namespaced_root(Path::new("/run/containerd/runc"), "k8s.io"),
            PathBuf::from("/run/containerd/runc/k8s.io")
        );
        assert_eq!(namespaced_root(Path::new("/r"), ""), PathBuf::from("/r"));
    }
}
