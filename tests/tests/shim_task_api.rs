//! Task API calls that `ctr` does not make, sent straight to the shim's ttrpc
//! socket of a container that a private containerd started: Connect, State,
//! Update (cgroup limit changes), Exec + Start + CloseIO with our own FIFOs,
//! ResizePty, Wait, Kill and Delete of an exec process. Run as root; nothing skips.

use std::{
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use containerd_shim_protos::{
    api::{
        CloseIORequest, ConnectRequest, DeleteRequest, ExecProcessRequest, KillRequest,
        ResizePtyRequest, StartRequest, StateRequest, UpdateTaskRequest, WaitRequest,
    },
    protobuf::well_known_types::any::Any,
    shim_async::TaskClient,
    ttrpc::{asynchronous::Client, context},
    types::task::Status,
};
use nestless_tests::containerd::{random_name, Containerd, Options, BUSYBOX_IMAGE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECOND: i64 = 1_000_000_000;

fn ctx() -> context::Context {
    context::with_timeout(20 * SECOND)
}

fn run_detached(c: &Containerd, ns: &str, id: &str, tty: bool, cmd: &[&str]) {
    let mut args: Vec<String> = vec!["run".into(), "-d".into()];
    if tty {
        args.push("-t".into());
    }
    args.extend(c.runtime_args());
    args.push(BUSYBOX_IMAGE.into());
    args.push(id.into());
    args.extend(cmd.iter().map(|s| s.to_string()));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    c.ctr_ok(ns, &a);
}

async fn client(c: &Containerd, ns: &str, id: &str) -> TaskClient {
    let address = std::fs::read_to_string(c.bundle(ns, id).join("address"))
        .expect("the bundle holds the shim's address");
    let conn = Client::connect(address.trim())
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the shim at {address}: {e:?}"));
    TaskClient::new(conn)
}

fn mkfifo(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    p
}

fn process_spec(args: &[&str], terminal: bool) -> Any {
    let spec = serde_json::json!({
        "terminal": terminal,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/bin", "TERM=xterm"],
        "cwd": "/",
    });
    Any {
        type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
        value: serde_json::to_vec(&spec).unwrap(),
        ..Default::default()
    }
}

fn memory_limit_of(pid: u32) -> u64 {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    if let Some(rel) = cg
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .filter(|_| Path::new("/sys/fs/cgroup/cgroup.controllers").exists())
    {
        let v = std::fs::read_to_string(format!("/sys/fs/cgroup{rel}/memory.max")).unwrap();
        return v.trim().parse().unwrap_or(u64::MAX);
    }
    let rel = cg
        .lines()
        .find_map(|l| {
            let mut it = l.splitn(3, ':');
            let _ = it.next();
            let ctl = it.next()?;
            let path = it.next()?;
            ctl.split(',')
                .any(|c| c == "memory")
                .then(|| path.to_owned())
        })
        .expect("a memory cgroup");
    let v = std::fs::read_to_string(format!("/sys/fs/cgroup/memory{rel}/memory.limit_in_bytes"))
        .unwrap();
    v.trim().parse().unwrap()
}

#[test]
fn direct_task_api_calls() {
    let c = Containerd::start(Options::default());
    let ns = random_name("nl");
    c.import_busybox(&ns);
    let id = "api";
    run_detached(&c, &ns, id, false, &["sleep", "1000"]);
    let fifo_dir = tempfile::tempdir().unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let task = client(&c, &ns, id).await;

        // Connect and State.
        let conn = task
            .connect(
                ctx(),
                &ConnectRequest {
                    id: id.into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert!(conn.shim_pid > 0 && conn.task_pid > 0);
        assert_eq!(c.shim_pids(Some(&ns)), vec![conn.shim_pid]);
        let st = task
            .state(
                ctx(),
                &StateRequest {
                    id: id.into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(st.pid, conn.task_pid);
        assert_eq!(st.status.enum_value(), Ok(Status::RUNNING));
        assert_eq!(st.bundle, c.bundle(&ns, id).to_string_lossy());

        // Update: a memory limit lands in the container's cgroup.
        let resources = serde_json::json!({"memory": {"limit": 48 * 1024 * 1024}});
        task.update(
            ctx(),
            &UpdateTaskRequest {
                id: id.into(),
                resources: Some(Any {
                    type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
                        .into(),
                    value: serde_json::to_vec(&resources).unwrap(),
                    ..Default::default()
                })
                .into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(memory_limit_of(conn.task_pid), 48 * 1024 * 1024);

        // Exec with our own FIFOs; CloseIO ends its stdin while we still hold the FIFO open.
        let stdin = mkfifo(fifo_dir.path(), "in");
        let stdout = mkfifo(fifo_dir.path(), "out");
        let mut out_r = tokio::net::unix::pipe::OpenOptions::new()
            .open_receiver(&stdout)
            .unwrap();
        task.exec(
            ctx(),
            &ExecProcessRequest {
                id: id.into(),
                exec_id: "cat".into(),
                stdin: stdin.to_string_lossy().into(),
                stdout: stdout.to_string_lossy().into(),
                spec: Some(process_spec(&["sh", "-c", "cat; echo eof-seen"], false)).into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let mut in_w = tokio::net::unix::pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(&stdin)
            .unwrap();
        let started = task
            .start(
                ctx(),
                &StartRequest {
                    id: id.into(),
                    exec_id: "cat".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert!(started.pid > 0);
        in_w.write_all(b"through the shim\n").await.unwrap();
        task.close_io(
            ctx(),
            &CloseIORequest {
                id: id.into(),
                exec_id: "cat".into(),
                stdin: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let waited = task
            .wait(
                ctx(),
                &WaitRequest {
                    id: id.into(),
                    exec_id: "cat".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(waited.exit_status, 0);
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), out_r.read_to_end(&mut out))
            .await
            .expect("stdout closed after the exit")
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out),
            "through the shim\neof-seen\n"
        );
        let st = task
            .state(
                ctx(),
                &StateRequest {
                    id: id.into(),
                    exec_id: "cat".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(st.status.enum_value(), Ok(Status::STOPPED));
        let del = task
            .delete(
                ctx(),
                &DeleteRequest {
                    id: id.into(),
                    exec_id: "cat".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(del.pid, started.pid);
        drop(in_w);

        // A TTY exec: ResizePty sets the window size the process sees.
        let tout = mkfifo(fifo_dir.path(), "tout");
        let mut tout_r = tokio::net::unix::pipe::OpenOptions::new()
            .open_receiver(&tout)
            .unwrap();
        task.exec(
            ctx(),
            &ExecProcessRequest {
                id: id.into(),
                exec_id: "tty".into(),
                terminal: true,
                stdout: tout.to_string_lossy().into(),
                spec: Some(process_spec(&["sh", "-c", "sleep 1; stty size"], true)).into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        task.start(
            ctx(),
            &StartRequest {
                id: id.into(),
                exec_id: "tty".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        task.resize_pty(
            ctx(),
            &ResizePtyRequest {
                id: id.into(),
                exec_id: "tty".into(),
                width: 97,
                height: 31,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        task.wait(
            ctx(),
            &WaitRequest {
                id: id.into(),
                exec_id: "tty".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tout_r.read_to_end(&mut out))
            .await
            .expect("tty output closed after the exit")
            .unwrap();
        assert!(
            String::from_utf8_lossy(&out).contains("31 97"),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
        task.delete(
            ctx(),
            &DeleteRequest {
                id: id.into(),
                exec_id: "tty".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();

        // Errors containerd relies on: unknown exec, signal to a finished process.
        let e = task
            .state(
                ctx(),
                &StateRequest {
                    id: id.into(),
                    exec_id: "nope".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert!(format!("{e:?}").contains("NOT_FOUND"), "{e:?}");

        // Kill the init (SIGKILL) and wait for it.
        task.kill(
            ctx(),
            &KillRequest {
                id: id.into(),
                signal: 9,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let waited = task
            .wait(
                ctx(),
                &WaitRequest {
                    id: id.into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(waited.exit_status, 137);
        let e = task
            .kill(
                ctx(),
                &KillRequest {
                    id: id.into(),
                    signal: 9,
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert!(format!("{e:?}").contains("NOT_FOUND"), "{e:?}");
    });
    // containerd saw the exit too: clean up through it.
    for _ in 0..50 {
        if c.ctr_ok(&ns, &["task", "ls"]).contains("STOPPED") {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    c.ctr_ok(&ns, &["task", "delete", id]);
    c.ctr_ok(&ns, &["container", "rm", id]);
    c.assert_no_shim_left(&ns, Duration::from_secs(10));
    c.assert_no_runc_state(&ns);
}
