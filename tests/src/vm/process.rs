//! Child processes (QEMU, vhost-device-vsock) that cannot outlive the test process.
//!
//! `Drop` kills them in the normal case. If the test process dies without unwinding
//! (SIGKILL, abort, a `static` VM), the kernel kills them through `PR_SET_PDEATHSIG`. That
//! signal fires when the *thread* that forked exits, so all forks happen on one thread that
//! lives as long as the process.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::thread;

type Job = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` so that it gets SIGKILL when this process dies; no core dumps either.
pub(crate) fn spawn_tied(mut cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name("nestless-vm-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("cannot start the VM process spawner thread");
        tx
    });
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // system calls (prctl, getppid, setrlimit) on the child itself.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                // The test process died before prctl took effect.
                return Err(io::Error::from(io::ErrorKind::BrokenPipe));
            }
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &no_core);
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    spawner
        .send((cmd, tx))
        .map_err(|_| io::Error::other("the VM process spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| io::Error::other("the VM process spawner thread is gone"))?
}
