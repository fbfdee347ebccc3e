//! Smoke test of the real-VM harness: two guests at once, exec over vsock, and a NIC
//! hot-plugged and unplugged over raw QMP. Needs root, QEMU and vhost-device-vsock; it
//! fails (never skips) without them. Prints per-phase timings.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::thread;
use std::time::{Duration, Instant};

use nestless_tests::vm::{GuestCommand, GuestExit, GuestImage, HostTap, Machine, Vm};
use serde_json::json;

const READY_TIMEOUT: Duration = Duration::from_secs(180);

#[test]
fn two_vms_exec_and_hotplug() {
    let t = Instant::now();
    let image = GuestImage::minimal();
    println!("image {} ready in {:?}", image.dir().display(), t.elapsed());

    // Two machines at once: q35 with many root ports (multifunction slots) and i440fx.
    let vms = [
        Vm::builder().image(image.clone()).root_ports(64).start(),
        Vm::builder()
            .image(image.clone())
            .machine(Machine::Pc)
            .start(),
    ];
    assert_ne!(vms[0].cid(), vms[1].cid());
    assert_ne!(vms[0].vsock_uds(), vms[1].vsock_uds());
    thread::scope(|s| {
        for vm in &vms {
            s.spawn(move || {
                let ready = vm.wait_ready(READY_TIMEOUT);
                println!(
                    "{} ({:?}, cid {}): boot to ready {:?} (guest uptime {:?})",
                    vm.name(),
                    vm.accel(),
                    vm.cid(),
                    ready.boot,
                    ready.guest_uptime
                );
            });
        }
    });

    for vm in &vms {
        let uname = vm.exec_ok("uname -r");
        assert!(uname.trim().ends_with("-amd64"), "uname -r: {uname}");
        let hostname = vm.exec_ok("hostname");
        assert_eq!(hostname.trim(), vm.name());
        let links = vm.exec_ok("ip -o link");
        assert!(links.contains(": lo:"), "ip -o link: {links}");

        let runs: Vec<_> = (0..10)
            .map(|_| vm.run(&GuestCommand::new("true")))
            .collect();
        let median = |mut d: Vec<Duration>| {
            d.sort();
            d[d.len() / 2]
        };
        println!(
            "{}: exec of `true`: round trip median {:?} (of which running it in the guest {:?})",
            vm.name(),
            median(runs.iter().map(|o| o.round_trip).collect()),
            median(runs.iter().map(|o| o.guest_duration).collect()),
        );
    }

    exec_edge_cases(&vms[0]);
    guest_to_host_vsock(&vms[1]);
    hotplug_cycle(&vms[0], 1);
    hotplug_cycle(&vms[0], 64);
    hotplug_cycle(&vms[1], 1);
}

/// Exit codes, stdin, stderr, timeouts and a missing program come back as such.
fn exec_edge_cases(vm: &Vm) {
    let out = vm.exec("echo out; echo err >&2; exit 3");
    assert_eq!(out.status, GuestExit::Code(3));
    assert_eq!(out.stdout_str(), "out\n");
    assert_eq!(out.stderr_str(), "err\n");

    let out = vm.run(&GuestCommand::new("cat").stdin(b"to stdin".to_vec()));
    assert!(out.success());
    assert_eq!(out.stdout, b"to stdin");

    let t = Instant::now();
    let out = vm.run(&GuestCommand::shell("sleep 30").timeout(Duration::from_millis(500)));
    assert_eq!(out.status, GuestExit::TimedOut);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "timeout took {:?}",
        t.elapsed()
    );

    let out = vm.run(&GuestCommand::new("/no/such/program"));
    assert_eq!(out.status, GuestExit::NotStarted);
    assert!(
        out.stderr_str().contains("/no/such/program"),
        "{}",
        out.stderr_str()
    );

    // A background job that keeps stdout open does not hang the reply.
    let t = Instant::now();
    let out = vm.exec("sleep 20 & echo $!");
    assert!(out.success());
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    vm.exec_ok(&format!("kill {}", out.stdout_str().trim()));
}

/// A guest connection to host CID 2 port P reaches a unix listener on `<uds>_P` (how the
/// shim will reach the agent). The request is a line: a half-close would not get through.
fn guest_to_host_vsock(vm: &Vm) {
    let listener = UnixListener::bind(vm.vsock_listen_path(5000)).unwrap();
    let server = thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let mut request = String::new();
        BufReader::new(&conn).read_line(&mut request).unwrap();
        let reply = format!("pong to {request}");
        (&conn).write_all(reply.as_bytes()).unwrap();
    });
    let t = Instant::now();
    let out = vm.run(
        &GuestCommand::new("nestless-vm-exec")
            .args(["--connect", "2:5000"])
            .stdin("ping\n"),
    );
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout_str(), "pong to ping\n");
    server.join().unwrap();
    println!(
        "{}: guest-to-host vsock request and reply {:?}",
        vm.name(),
        t.elapsed()
    );
}

/// netdev_add (tap) + device_add virtio-net-pci on hot-plug slot `slot` (root port
/// `rp<slot>` on q35, `pci.0` on pc), see the NIC in the guest, then
/// device_del, DEVICE_DELETED, netdev_del, and see it gone.
///
/// The guest polls /sys/class/net with shell builtins only (a fork costs ~10 ms under TCG)
/// and is already polling when the QMP command goes out, so "visible" is measured from the
/// command to the poller's reply.
fn hotplug_cycle(vm: &Vm, slot: u32) {
    let tap = HostTap::create();
    let mac = format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        vm.cid() & 0xff,
        rand_byte(),
        rand_byte()
    );
    let (netdev, device) = ("smoke-net", "smoke-nic");
    let mut qmp = vm.qmp();

    let (added, visible) = while_polling(vm, "until", &mac, || {
        qmp.execute(
            "netdev_add",
            json!({"type": "tap", "id": netdev, "ifname": tap.name(), "script": "no", "downscript": "no"}),
        )
        .unwrap();
        qmp.execute(
            "device_add",
            json!({"driver": "virtio-net-pci", "id": device, "netdev": netdev, "mac": mac,
                   "bus": vm.hotplug_bus(slot)}),
        )
        .unwrap();
    });
    let link = vm.exec_ok(&format!("ip -o link | grep {mac}"));
    assert!(link.contains("link/ether"), "{link}");
    println!(
        "{} ({:?}, bus {}): netdev_add+device_add returned in {added:?}; NIC visible in the \
         guest after {visible:?}",
        vm.name(),
        vm.machine(),
        vm.hotplug_bus(slot)
    );

    let mut deleted = Duration::ZERO;
    let (_, gone) = while_polling(vm, "while", &mac, || {
        let t = Instant::now();
        qmp.execute("device_del", json!({ "id": device })).unwrap();
        qmp.wait_event("DEVICE_DELETED", Duration::from_secs(30), |data| {
            data["device"] == device
        })
        .unwrap();
        deleted = t.elapsed();
        qmp.execute("netdev_del", json!({ "id": netdev })).unwrap();
    });
    println!(
        "{}: device_del to DEVICE_DELETED {deleted:?}; NIC gone from the guest after {gone:?}",
        vm.name()
    );
}

/// Starts a guest poller that loops `keyword` ("until"/"while") a NIC with `mac` exists,
/// runs `act` once the poller is running, and returns how long `act` took and how long
/// from its start until the poller finished.
fn while_polling(vm: &Vm, keyword: &str, mac: &str, act: impl FnOnce()) -> (Duration, Duration) {
    let script = format!(
        "has() {{ for f in /sys/class/net/*/address; do read -r a <$f; [ \"$a\" = {mac} ] && return 0; done; return 1; }}; \
         touch /tmp/polling; i=0; {keyword} has; do i=$((i+1)); [ $i -gt 10000 ] && exit 1; usleep 1000; done; rm /tmp/polling"
    );
    thread::scope(|s| {
        let poller = s.spawn(|| {
            let out = vm.run(&GuestCommand::shell(script).timeout(Duration::from_secs(60)));
            (out, Instant::now())
        });
        vm.exec_ok("until [ -e /tmp/polling ]; do usleep 1000; done");
        let t = Instant::now();
        act();
        let acted = t.elapsed();
        let (out, done) = poller.join().unwrap();
        assert!(out.success(), "poller: {out:?}");
        (acted, done - t)
    })
}

fn rand_byte() -> u8 {
    rand::random()
}

/// The full image with an extra tree: containerd is up when the guest is ready and runs a
/// container from the bundled busybox image; the extra program runs (its libraries came
/// along) and the extra file is in place.
#[test]
fn full_guest_runs_a_container() {
    let extra = tempfile::tempdir().unwrap();
    fs::create_dir_all(extra.path().join("usr/bin")).unwrap();
    fs::create_dir_all(extra.path().join("etc/nestless")).unwrap();
    let exec_bin = nestless_tests::vm::exec_server_binary().unwrap();
    fs::copy(exec_bin, extra.path().join("usr/bin/extra-probe")).unwrap();
    fs::write(
        extra.path().join("etc/nestless/extra.conf"),
        "from the extra tree\n",
    )
    .unwrap();

    let t = Instant::now();
    let image = GuestImage::full_with_extra(extra.path());
    println!(
        "full image {} ready in {:?}",
        image.dir().display(),
        t.elapsed()
    );

    let vm = Vm::builder().image(image).start();
    let ready = vm.wait_ready(READY_TIMEOUT);
    println!(
        "{}: boot to ready {:?}; guest: {}",
        vm.name(),
        ready.boot,
        ready.line
    );
    let start: f64 = ready
        .field("containerd-start")
        .expect("containerd-start")
        .parse()
        .unwrap();
    let up: f64 = ready
        .field("containerd-ready")
        .expect("containerd-ready")
        .parse()
        .unwrap();
    println!(
        "{}: containerd socket up {:.2}s after its start",
        vm.name(),
        up - start
    );

    let t = Instant::now();
    vm.exec_ok("ctr version");
    println!("{}: ctr version {:?}", vm.name(), t.elapsed());
    let t = Instant::now();
    vm.exec_ok("ctr -n smoke images import /usr/share/nestless/images/busybox.tar");
    println!("{}: ctr images import {:?}", vm.name(), t.elapsed());
    let t = Instant::now();
    let out = vm.exec_ok(
        "ctr -n smoke run --rm localhost/nestless/busybox:test smoke1 \
         sh -c '[ ! -e /usr/bin/containerd ] && echo hello from the container'",
    );
    println!("{}: ctr run --rm {:?}", vm.name(), t.elapsed());
    assert_eq!(out.trim(), "hello from the container");
    assert!(vm
        .exec_ok("cat /proc/mounts")
        .contains("cgroup2 /sys/fs/cgroup"));

    let probe = vm.exec("extra-probe --no-such-flag");
    assert_eq!(probe.status, GuestExit::Code(2), "{probe:?}");
    assert!(
        probe.stderr_str().contains("usage: nestless-vm-exec"),
        "{probe:?}"
    );
    assert_eq!(
        vm.exec_ok("cat /etc/nestless/extra.conf"),
        "from the extra tree\n"
    );
}
