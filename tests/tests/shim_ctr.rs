//! containerd-shim-nestless-v2 under a real containerd and runc, driven with `ctr`.
//!
//! Each test starts a private containerd ([`Containerd`]) with the shim
//! registered as `io.containerd.nestless.v2` and `[network] mode = "none"`,
//! imports the locally built busybox image, and checks what a user sees:
//! output, exit codes, stdin, TTYs, exec, signals, pause/resume, ps,
//! metrics, log URIs, events, pod grouping; and that nothing is left behind
//! (no shim process, no runc state). Run as root; nothing skips.

use std::{path::Path, thread, time::Duration};

use nestless_tests::containerd::{random_name, Containerd, Events, Options, BUSYBOX_IMAGE};

const SHIM_GONE: Duration = Duration::from_secs(10);

fn setup() -> (Containerd, String) {
    let c = Containerd::start(Options::default());
    let ns = random_name("nl");
    c.import_busybox(&ns);
    (c, ns)
}

/// `ctr run [flags] --runtime ... IMAGE ID CMD...` as an argument vector.
fn run_args<'a>(c: &'a Containerd, flags: &[&'a str], id: &'a str, cmd: &[&'a str]) -> Vec<String> {
    let mut v: Vec<String> = vec!["run".into()];
    v.extend(flags.iter().map(|s| s.to_string()));
    v.extend(c.runtime_args());
    v.push(BUSYBOX_IMAGE.into());
    v.push(id.into());
    v.extend(cmd.iter().map(|s| s.to_string()));
    v
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn task_status(c: &Containerd, ns: &str, id: &str) -> String {
    let out = c.ctr_ok(ns, &["task", "ls"]);
    out.lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("")
        .to_owned()
}

fn wait_status(c: &Containerd, ns: &str, id: &str, want: &str) {
    for _ in 0..100 {
        if task_status(c, ns, id) == want {
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "task {id} never reached {want} (now {:?})\n{}",
        task_status(c, ns, id),
        c.log_tail(40)
    );
}

fn topics(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .map(str::to_owned)
        .collect()
}

fn assert_clean(c: &Containerd, ns: &str) {
    c.assert_no_shim_left(ns, SHIM_GONE);
    c.assert_no_runc_state(ns);
}

#[test]
fn run_output_exit_codes_stdin_tty() {
    let (c, ns) = setup();
    let events = Events::subscribe(&c);

    // stdout and a zero exit.
    let args = run_args(&c, &["--rm"], "out", &["echo", "hello from nestless"]);
    let out = c.ctr_ok(&ns, &strs(&args));
    assert_eq!(out.trim(), "hello from nestless");

    // stderr, and an exit code propagated to ctr.
    let args = run_args(
        &c,
        &["--rm"],
        "code",
        &["sh", "-c", "echo to-stderr >&2; exit 3"],
    );
    let r = c.ctr(&ns, &strs(&args));
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains("to-stderr"), "{r:?}");

    // stdin, piped, closed at its end.
    let args = run_args(
        &c,
        &["--rm"],
        "stdin",
        &["sh", "-c", "read first; echo got:$first; cat; echo end"],
    );
    let r = c.ctr_stdin(&ns, &strs(&args), b"line one\nline two\nline three\n");
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, "got:line one\nline two\nline three\nend\n");

    // A terminal.
    let args = run_args(
        &c,
        &["--rm", "-t"],
        "tty",
        &["sh", "-c", "tty; echo $((6*7)); exit 4"],
    );
    let r = c.ctr_tty(&ns, &strs(&args));
    assert!(r.stdout.contains("/dev/pts/"), "{r:?}");
    assert!(r.stdout.contains("42"), "{r:?}");
    assert_eq!(r.code, 4, "{r:?}");

    let seen = topics(&events.stop());
    for t in [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exit",
        "/tasks/delete",
    ] {
        assert!(seen.iter().any(|s| s == t), "no {t} event in {seen:?}");
    }
    assert_clean(&c, &ns);
}

#[test]
fn detached_exec_signals_pause_ps_metrics_delete() {
    let (c, ns) = setup();
    let events = Events::subscribe(&c);
    let id = "long";
    let args = run_args(&c, &["-d"], id, &["sleep", "1000"]);
    c.ctr_ok(&ns, &strs(&args));
    wait_status(&c, &ns, id, "RUNNING");

    // exec without a TTY: output and exit code.
    let r = c.ctr(
        &ns,
        &[
            "task",
            "exec",
            "--exec-id",
            "e1",
            id,
            "sh",
            "-c",
            "echo exec-out; exit 5",
        ],
    );
    assert_eq!(r.code, 5, "{r:?}");
    assert_eq!(r.stdout.trim(), "exec-out");

    // exec with stdin.
    let r = c.ctr_stdin(
        &ns,
        &[
            "task",
            "exec",
            "--exec-id",
            "e2",
            id,
            "sh",
            "-c",
            "tr a-z A-Z",
        ],
        b"shout\n",
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout.trim(), "SHOUT");

    // exec with a TTY.
    let r = c.ctr_tty(
        &ns,
        &[
            "task",
            "exec",
            "-t",
            "--exec-id",
            "e3",
            id,
            "sh",
            "-c",
            "tty; echo $((7*6))",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("/dev/pts/"), "{r:?}");
    assert!(r.stdout.contains("42"), "{r:?}");

    // ps: the init process is listed.
    let ps = c.ctr_ok(&ns, &["task", "ps", id]);
    let pid_line = c.ctr_ok(&ns, &["task", "ls"]);
    let init_pid = pid_line
        .lines()
        .find(|l| l.starts_with(id))
        .and_then(|l| l.split_whitespace().nth(1))
        .expect("task ls lists the task")
        .to_owned();
    assert!(
        ps.lines()
            .skip(1)
            .any(|l| l.split_whitespace().next() == Some(init_pid.as_str())),
        "pid {init_pid} not in ps:\n{ps}"
    );

    // A detached exec shows in ps with its exec id.
    c.ctr_ok(
        &ns,
        &["task", "exec", "-d", "--exec-id", "bg", id, "sleep", "1000"],
    );
    let ps = c.ctr_ok(&ns, &["task", "ps", id]);
    assert!(ps.contains("bg"), "exec id not in ps:\n{ps}");
    c.ctr_ok(
        &ns,
        &["task", "kill", "--exec-id", "bg", "-s", "SIGKILL", id],
    );

    // pause / resume.
    c.ctr_ok(&ns, &["task", "pause", id]);
    assert_eq!(task_status(&c, &ns, id), "PAUSED");
    c.ctr_ok(&ns, &["task", "resume", id]);
    assert_eq!(task_status(&c, &ns, id), "RUNNING");

    // metrics (cgroup statistics).
    let m = c.ctr_ok(&ns, &["task", "metrics", id]);
    assert!(m.to_lowercase().contains("memory"), "metrics:\n{m}");

    // kill, then the task is stopped with SIGKILL's status, and deleted.
    c.ctr_ok(&ns, &["task", "kill", "-s", "SIGKILL", id]);
    wait_status(&c, &ns, id, "STOPPED");
    let r = c.ctr(&ns, &["task", "delete", id]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stderr.contains("137") || r.stdout.contains("137"),
        "{r:?}"
    );
    c.ctr_ok(&ns, &["container", "rm", id]);

    let seen = topics(&events.stop());
    for t in [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/paused",
        "/tasks/resumed",
        "/tasks/exit",
        "/tasks/delete",
    ] {
        assert!(seen.iter().any(|s| s == t), "no {t} event in {seen:?}");
    }
    assert_clean(&c, &ns);
}

#[test]
fn create_then_start_attached() {
    let (c, ns) = setup();
    // `ctr container create` + `ctr task start` (attached: uses Wait).
    let mut args = vec!["container".to_string(), "create".into()];
    args.extend(c.runtime_args());
    // (`ctr container create` takes no dashed arguments after the id.)
    args.extend([
        BUSYBOX_IMAGE.to_string(),
        "att".into(),
        "expr".into(),
        "0".into(),
        "+".into(),
        "0".into(),
    ]);
    c.ctr_ok(&ns, &strs(&args));
    let r = c.ctr(&ns, &["task", "start", "att"]);
    assert_eq!(r.code, 1, "expr exits 1 when it prints 0: {r:?}");
    assert_eq!(r.stdout.trim(), "0");
    // (`ctr task start` deletes the task once it has exited.)
    c.ctr_ok(&ns, &["container", "rm", "att"]);
    assert_clean(&c, &ns);
}

#[test]
fn log_uris() {
    let (c, ns) = setup();
    let dir = c.dir().join("logs");
    std::fs::create_dir_all(&dir).unwrap();

    // file://: stdout and stderr appended to a file.
    let file = dir.join("c.log");
    let uri = format!("file://{}", file.display());
    let args = run_args(
        &c,
        &["--rm", "--log-uri", &uri],
        "tofile",
        &["sh", "-c", "echo to-file-out; echo to-file-err >&2"],
    );
    c.ctr_ok(&ns, &strs(&args));
    let logged = std::fs::read_to_string(&file).unwrap();
    assert!(
        logged.contains("to-file-out") && logged.contains("to-file-err"),
        "{logged:?}"
    );

    // binary://: a logging program gets stdout on fd 3 and stderr on fd 4.
    let logger = dir.join("logger.sh");
    let out = dir.join("bin.out");
    let err = dir.join("bin.err");
    std::fs::write(
        &logger,
        format!(
            "#!/bin/sh\nexec 5>&-\necho \"$CONTAINER_NAMESPACE/$CONTAINER_ID $*\" > {d}/bin.env\ncat <&3 > {o} &\ncat <&4 > {e} &\nwait\n",
            d = dir.display(),
            o = out.display(),
            e = err.display()
        ),
    )
    .unwrap();
    set_executable(&logger);
    let uri = format!("binary://{}?tag=t1", logger.display());
    let args = run_args(
        &c,
        &["--rm", "--log-uri", &uri],
        "tobin",
        &["sh", "-c", "echo to-bin-out; echo to-bin-err >&2"],
    );
    c.ctr_ok(&ns, &strs(&args));
    let mut ok = false;
    for _ in 0..50 {
        let o = std::fs::read_to_string(&out).unwrap_or_default();
        let e = std::fs::read_to_string(&err).unwrap_or_default();
        if o.contains("to-bin-out") && e.contains("to-bin-err") {
            ok = true;
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert!(ok, "the logging binary did not get the output");
    let env = std::fs::read_to_string(dir.join("bin.env")).unwrap();
    assert_eq!(env.trim(), format!("{ns}/tobin --tag t1"));
    assert_clean(&c, &ns);
}

/// What `seq 1 n` prints.
fn seq(n: u32) -> String {
    (1..=n).map(|i| format!("{i}\n")).collect()
}

/// How much of `want` arrived, and where `got` first differs from it.
fn first_difference(got: &str, want: &str) -> String {
    let at = got
        .bytes()
        .zip(want.bytes())
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    format!(
        "{} of {} bytes, first difference at byte {at}",
        got.len(),
        want.len()
    )
}

#[test]
fn output_is_complete_when_a_container_exits() {
    // A container that prints 20,000 lines and exits: its output arrives whole,
    // every byte, run after run, through ctr's FIFOs and into a file:// log;
    // four at a time, so that the shims, ctr and containerd compete for the CPU.
    let (c, ns) = setup();
    let want = seq(20_000);
    let lost = std::sync::Mutex::new(Vec::new());
    let logs = c.dir().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    thread::scope(|s| {
        for t in 0..4 {
            let (c, ns, want, lost, logs) = (&c, &ns, &want, &lost, &logs);
            s.spawn(move || {
                for round in 0..6 {
                    let id = format!("loud{t}-{round}");
                    let args = run_args(c, &["--rm"], &id, &["seq", "1", "20000"]);
                    let r = c.ctr(ns, &strs(&args));
                    assert_eq!(r.code, 0, "{r:?}");
                    if r.stdout != *want {
                        let d = first_difference(&r.stdout, want);
                        lost.lock().unwrap().push(format!("{id} (FIFO): {d}"));
                    }
                    let file = logs.join(format!("{id}.log"));
                    let uri = format!("file://{}", file.display());
                    let id = format!("logged{t}-{round}");
                    let args =
                        run_args(c, &["--rm", "--log-uri", &uri], &id, &["seq", "1", "20000"]);
                    c.ctr_ok(ns, &strs(&args));
                    let logged = std::fs::read_to_string(&file).unwrap_or_default();
                    if logged != *want {
                        let d = first_difference(&logged, want);
                        lost.lock().unwrap().push(format!("{id} (file): {d}"));
                    }
                }
            });
        }
    });
    let lost = lost.into_inner().unwrap();
    assert!(lost.is_empty(), "output lost at exit:\n{}", lost.join("\n"));
    assert_clean(&c, &ns);
}

fn set_executable(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn pod_containers_share_one_shim() {
    let (c, ns) = setup();
    let pod = random_name("pod");
    let ann = format!("io.kubernetes.cri.sandbox-id={pod}");
    for id in ["pod-a", "pod-b"] {
        let args = run_args(&c, &["-d", "--annotation", &ann], id, &["sleep", "1000"]);
        c.ctr_ok(&ns, &strs(&args));
    }
    let args = run_args(&c, &["-d"], "alone", &["sleep", "1000"]);
    c.ctr_ok(&ns, &strs(&args));
    for id in ["pod-a", "pod-b", "alone"] {
        wait_status(&c, &ns, id, "RUNNING");
    }
    let shims = c.shim_pids(Some(&ns));
    assert_eq!(
        shims.len(),
        2,
        "one shim for the pod, one for the lone container: {shims:?}"
    );
    let addr = |id: &str| std::fs::read_to_string(c.bundle(&ns, id).join("address")).unwrap();
    assert_eq!(addr("pod-a"), addr("pod-b"));
    assert_ne!(addr("pod-a"), addr("alone"));

    // Deleting one container of the pod keeps the pod's shim for the other.
    for id in ["pod-a", "alone"] {
        c.ctr_ok(&ns, &["task", "kill", "-s", "SIGKILL", id]);
        wait_status(&c, &ns, id, "STOPPED");
        c.ctr_ok(&ns, &["task", "delete", id]);
        c.ctr_ok(&ns, &["container", "rm", id]);
    }
    thread::sleep(Duration::from_millis(500));
    let left = c.shim_pids(Some(&ns));
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(shims.contains(&left[0]));
    let out = c.ctr_ok(
        &ns,
        &[
            "task",
            "exec",
            "--exec-id",
            "x",
            "pod-b",
            "echo",
            "still-served",
        ],
    );
    assert_eq!(out.trim(), "still-served");

    c.ctr_ok(&ns, &["task", "kill", "-s", "SIGKILL", "pod-b"]);
    wait_status(&c, &ns, "pod-b", "STOPPED");
    c.ctr_ok(&ns, &["task", "delete", "pod-b"]);
    c.ctr_ok(&ns, &["container", "rm", "pod-b"]);
    assert_clean(&c, &ns);
}

#[test]
fn oom_kill_is_reported() {
    let (c, ns) = setup();
    let events = Events::subscribe(&c);
    // Doubles a string until the 16 MiB limit kills it.
    let args = run_args(
        &c,
        &["--rm", "--memory-limit", "16777216"],
        "hog",
        &["sh", "-c", "a=xxxxxxxxxxxxxxxx; while :; do a=$a$a; done"],
    );
    let r = c.ctr(&ns, &strs(&args));
    assert_eq!(r.code, 137, "{r:?}");
    let seen = topics(&events.stop());
    assert!(
        seen.iter().any(|s| s == "/tasks/oom"),
        "no /tasks/oom in {seen:?}"
    );
    assert_clean(&c, &ns);
}

#[test]
fn failed_create_leaves_nothing() {
    let (c, ns) = setup();
    // runc create fails: no such executable.
    let args = run_args(&c, &["--rm"], "bad", &["/no/such/program"]);
    let r = c.ctr(&ns, &strs(&args));
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("no/such/program"),
        "the error names the program: {r:?}"
    );
    let _ = c.ctr(&ns, &["container", "rm", "bad"]);

    // A broken shim config: the error names the file and the key.
    let bad = c.dir().join("bad-shim.toml");
    std::fs::write(&bad, "[network]\nmode = \"bridge\"\n").unwrap();
    let bad_s = bad.to_string_lossy().into_owned();
    let args: Vec<String> = vec![
        "run".into(),
        "--rm".into(),
        "--runtime".into(),
        nestless_tests::containerd::RUNTIME.into(),
        "--runtime-config-path".into(),
        bad_s.clone(),
        BUSYBOX_IMAGE.into(),
        "badcfg".into(),
        "true".into(),
    ];
    let r = c.ctr(&ns, &strs(&args));
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains(&bad_s) && r.stderr.contains("mode"),
        "{r:?}"
    );
    let _ = c.ctr(&ns, &["container", "rm", "badcfg"]);

    assert_clean(&c, &ns);
    // No rootfs of ours stays mounted.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let state = c.dir().join("state").to_string_lossy().into_owned();
    assert!(!mounts.contains(&state), "mounts left under {state}");
}

#[test]
fn a_killed_shim_is_cleaned_up_by_delete() {
    let (c, ns) = setup();
    let args = run_args(&c, &["-d"], "orphan", &["sleep", "1000"]);
    c.ctr_ok(&ns, &strs(&args));
    wait_status(&c, &ns, "orphan", "RUNNING");
    let shims = c.shim_pids(Some(&ns));
    assert_eq!(shims.len(), 1, "{shims:?}");
    let bundle = c.bundle(&ns, "orphan");
    let address = std::fs::read_to_string(bundle.join("address")).unwrap();
    let socket = address.trim().trim_start_matches("unix://").to_owned();
    assert!(
        bundle.join("nestless-shim.json").is_file(),
        "the shim records the container in its bundle"
    );

    // SAFETY: plain kill(2) of the shim process found above.
    assert_eq!(unsafe { libc::kill(shims[0] as i32, libc::SIGKILL) }, 0);
    // containerd notices, runs `containerd-shim-nestless-v2 delete`, which
    // removes the runc container (killing its processes) and the record.
    for _ in 0..100 {
        if !c.runc_root(&ns).join("orphan").exists() {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    c.assert_no_runc_state(&ns);
    // containerd logs what `delete` said once it has returned.
    let said = (0..100).any(|_| {
        let found = c
            .log()
            .contains("container orphan removed after its shim died");
        if !found {
            thread::sleep(Duration::from_millis(100));
        }
        found
    });
    assert!(said, "{}", c.log_tail(40));
    assert!(
        !Path::new(&socket).exists(),
        "the dead shim's socket {socket} is left"
    );
    let _ = c.ctr(&ns, &["task", "delete", "orphan"]);
    c.ctr_ok(&ns, &["container", "rm", "orphan"]);
    assert_clean(&c, &ns);
}

/// Two containerds side by side (the suites run two tests at once) each
/// serve on sockets of their own. On 2.x that includes NRI's: its default is
/// one host-wide socket (`/var/run/nri/nri.sock`), and a second containerd
/// starting beside the first could fail "bind: address already in use" (a
/// CRI test of CI run B, 2026-11-30). Both must answer.
#[test]
fn two_containerds_side_by_side_each_serve_on_sockets_of_their_own() {
    let (a, b) = thread::scope(|s| {
        let a = s.spawn(|| Containerd::start(Options::default()));
        let b = s.spawn(|| Containerd::start(Options::default()));
        (a.join().unwrap(), b.join().unwrap())
    });
    for c in [&a, &b] {
        c.ctr("default", &["version"]).ok();
        let config = std::fs::read_to_string(c.dir().join("config.toml")).unwrap();
        if config.starts_with("version = 3") {
            // NRI starts with the CRI plugin, just after the gRPC socket answers.
            let nri = c.dir().join("nri.sock");
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while !nri.exists() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{} has no NRI socket of its own",
                    c.dir().display()
                );
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
    assert_ne!(a.dir(), b.dir());
}
