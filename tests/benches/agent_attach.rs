//! Attach latency of the host agent, per backend, and concurrent attaches
//! across VMs. A benchmark program (prints figures), not a test.
//!
//! `cargo bench -p nestless-tests --bench agent_attach` (as root; QEMU, the
//! guest image and vhost-device-vsock as for the VM tests).
//! `NESTLESS_BENCH_CYCLES` sets the cycles per backend (default 50).
//!
//! Figures:
//! * reply: AttachNic request to reply, seen by the client.
//! * usable: request to the NIC being there for the guest: at reply for the
//!   netns backend (the veth exists in the VM namespace before the reply);
//!   for qemu, until a watcher in the guest sees the new link in
//!   /sys/class/net (the watcher's exec reply delay, half the exec round trip
//!   minus the guest run time, is subtracted).
//! * concurrent: K attaches spread over V VMs, one after the other vs all at
//!   once (per-VM locks serialise a VM's own operations only).

use std::time::{Duration, Instant};

use nestless_protos::agent as pb;
use nestless_tests::{
    agent::{ctx, vm_client, AgentProc},
    netenv::{random_subnet, require_root, Bridge, Netns},
    vm::{Machine, Vm},
};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let idx = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[idx]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn row(name: &str, v: &mut [f64]) {
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    println!(
        "  {name:<28} n={:<4} min {:>7.2}  p50 {:>7.2}  p99 {:>7.2}  max {:>7.2} ms",
        v.len(),
        min,
        pct(v, 0.5),
        pct(v, 0.99),
        pct(v, 1.0)
    );
}

fn req(sb: &str) -> pb::AttachNicRequest {
    pb::AttachNicRequest {
        sandbox_id: sb.into(),
        ..Default::default()
    }
}

fn det(sb: &str) -> pb::DetachNicRequest {
    pb::DetachNicRequest {
        sandbox_id: sb.into(),
        ..Default::default()
    }
}

fn agent_for(bridge: &Bridge, net: &str, vms: &[String]) -> AgentProc {
    AgentProc::start(|dir| {
        let mut s = AgentProc::agent_section(dir);
        s += &format!(
            "[[network]]\nname = \"n\"\nbridge = \"{}\"\nsubnet = \"{net}.0/24\"\ngateway = \"{net}.1\"\n",
            bridge.name
        );
        for (i, backend) in vms.iter().enumerate() {
            s += &format!(
                "[[vm]]\nname = \"vm{i}\"\n{backend}\nsocket = \"{}/vm{i}.sock\"\nmax_nics = 32\n",
                dir.display()
            );
        }
        s
    })
}

async fn concurrent(agent: &AgentProc, vms: usize, per_vm: usize, tag: &str) -> (f64, f64) {
    let sock = |i: usize| agent.dir.path().join(format!("vm{i}.sock"));
    let mut clients = Vec::new();
    for i in 0..vms {
        clients.push(vm_client(&sock(i)).await);
    }
    // One after the other.
    let t = Instant::now();
    for (i, c) in clients.iter().enumerate() {
        for k in 0..per_vm {
            c.attach_nic(ctx(), &req(&format!("{tag}s{i}-{k}")))
                .await
                .unwrap();
        }
    }
    let serial = ms(t.elapsed());
    for (i, c) in clients.iter().enumerate() {
        for k in 0..per_vm {
            c.detach_nic(ctx(), &det(&format!("{tag}s{i}-{k}")))
                .await
                .unwrap();
        }
    }
    // All at once.
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..vms {
        for k in 0..per_vm {
            let s = sock(i);
            let tag = tag.to_string();
            tasks.push(tokio::spawn(async move {
                let c = vm_client(&s).await;
                c.attach_nic(ctx(), &req(&format!("{tag}p{i}-{k}")))
                    .await
                    .unwrap();
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let parallel = ms(t.elapsed());
    for (i, c) in clients.iter().enumerate() {
        for k in 0..per_vm {
            c.detach_nic(ctx(), &det(&format!("{tag}p{i}-{k}")))
                .await
                .unwrap();
        }
    }
    (serial, parallel)
}

const WATCH: &str = "while :; do for d in /sys/class/net/*; do [ \"$d\" = /sys/class/net/lo ] || { echo ${d##*/}; exit 0; }; done; usleep 500; done";

fn main() {
    require_root();
    let cycles: usize = std::env::var("NESTLESS_BENCH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("nestless-netagent attach benchmark ({cycles} cycles per backend)");

    // ---------------------------------------------------------------- netns
    let net = random_subnet();
    let bridge = Bridge::new(Some(&format!("{net}.1/24")));
    let nss: Vec<Netns> = (0..4).map(|i| Netns::new(&format!("b{i}"))).collect();
    let backends: Vec<String> = nss
        .iter()
        .map(|n| format!("backend = \"netns\"\nnetns = \"{}\"", n.name))
        .collect();
    let agent = agent_for(&bridge, &net, &backends);
    rt.block_on(async {
        let c = vm_client(&agent.dir.path().join("vm0.sock")).await;
        let (mut reply, mut detach) = (Vec::new(), Vec::new());
        for i in 0..cycles {
            let sb = format!("n{i}");
            let t = Instant::now();
            c.attach_nic(ctx(), &req(&sb)).await.unwrap();
            reply.push(ms(t.elapsed()));
            let t = Instant::now();
            c.detach_nic(ctx(), &det(&sb)).await.unwrap();
            detach.push(ms(t.elapsed()));
        }
        println!("netns backend (veth pair into a namespace, host end on a bridge):");
        row("attach = usable", &mut reply);
        row("detach", &mut detach);
        let (s, p) = concurrent(&agent, 4, 8, "n").await;
        println!("  concurrent: 4 VMs x 8 attaches: one by one {s:.1} ms, all at once {p:.1} ms ({:.2}x)", s / p);
    });
    drop(agent);

    // ---------------------------------------------------------------- qemu
    let vms: Vec<Vm> = (0..2)
        .map(|_| Vm::builder().machine(Machine::Q35).root_ports(12).start())
        .collect();
    for vm in &vms {
        vm.wait_ready(Duration::from_secs(240));
    }
    let backends: Vec<String> = vms
        .iter()
        .map(|v| {
            format!(
                "backend = \"qemu\"\nqmp_socket = \"{}\"",
                v.qmp_path().display()
            )
        })
        .collect();
    let agent = agent_for(&bridge, &net, &backends);
    let vm = &vms[0];
    let mut exec_rt = Vec::new();
    for _ in 0..10 {
        let o = vm.exec("true");
        exec_rt.push(ms(o.round_trip));
    }
    rt.block_on(async {
        let c = vm_client(&agent.dir.path().join("vm0.sock")).await;
        let (mut reply, mut usable, mut detach) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..cycles {
            let sb = format!("q{i}");
            let (t0, t_reply, seen) = std::thread::scope(|s| {
                let watcher = s.spawn(|| {
                    let o = vm.exec(WATCH);
                    let back = Instant::now();
                    let reply_delay = o.round_trip.saturating_sub(o.guest_duration) / 2;
                    (back - reply_delay, o.stdout_str())
                });
                // Let the watcher start looking before the request goes out.
                std::thread::sleep(Duration::from_millis(300));
                let t0 = Instant::now();
                tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current().block_on(c.attach_nic(ctx(), &req(&sb))).unwrap()
                });
                let t_reply = Instant::now();
                let (seen, name) = watcher.join().unwrap();
                assert!(!name.trim().is_empty());
                (t0, t_reply, seen)
            });
            reply.push(ms(t_reply - t0));
            usable.push(ms(seen.saturating_duration_since(t0)));
            let t = Instant::now();
            c.detach_nic(ctx(), &det(&sb)).await.unwrap();
            detach.push(ms(t.elapsed()));
        }
        println!("qemu backend (tap + virtio-net-pci hot-plug on q35 pcie-root-port, {} guest):", vm.accel().as_str());
        row("attach reply", &mut reply);
        row("attach -> NIC in guest", &mut usable);
        row("detach (DEVICE_DELETED)", &mut detach);
        row("(exec round trip, for ref)", &mut exec_rt);
        let (s, p) = concurrent(&agent, 2, 6, "q").await;
        println!("  concurrent: 2 VMs x 6 attaches: one by one {s:.1} ms, all at once {p:.1} ms ({:.2}x)", s / p);
    });
    drop(agent);

    // ------------------------------------------------------- qemu, warm pool
    let mut backends = backends;
    backends[0] += "\nwarm_pool = 2";
    let agent = agent_for(&bridge, &net, &backends);
    let pooled = |a: &AgentProc| {
        a.state()["nics"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["pooled"] == true)
            .count()
    };
    let wait_pool = |a: &AgentProc| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while pooled(a) < 2 {
            assert!(
                Instant::now() < deadline,
                "warm pool not refilled:\n{}",
                a.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    rt.block_on(async {
        let c = vm_client(&agent.dir.path().join("vm0.sock")).await;
        let (mut reply, mut detach) = (Vec::new(), Vec::new());
        for i in 0..cycles {
            wait_pool(&agent);
            let sb = format!("w{i}");
            let t = Instant::now();
            let nic = c.attach_nic(ctx(), &req(&sb)).await.unwrap().nic.unwrap();
            reply.push(ms(t.elapsed()));
            // Usable at the reply: the NIC was plugged before the request.
            let links = vm.exec_ok("cat /sys/class/net/*/address");
            assert!(
                links.contains(&nic.mac),
                "warm NIC {} not in the guest: {links}",
                nic.mac
            );
            let t = Instant::now();
            c.detach_nic(ctx(), &det(&sb)).await.unwrap();
            detach.push(ms(t.elapsed()));
        }
        println!("qemu backend with a warm pool of 2 (NICs plugged ahead, assigned on request):");
        row("attach = usable", &mut reply);
        row("detach (DEVICE_DELETED)", &mut detach);
    });
    drop(agent);
}
