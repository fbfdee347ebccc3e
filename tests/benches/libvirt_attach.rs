//! Attach and detach latency through libvirt against raw QMP, in one run, on the same
//! kind of guest: the minimal guest image, q35 with 4 pcie-root-ports, TCG, one vCPU; one
//! booted by libvirtd (`backend = "libvirt"`), one by the test harness with a QMP socket
//! for the agent (`backend = "qemu"`). One agent serves both; the client times each
//! request to its reply. A benchmark program (prints figures), not a test.
//!
//! `cargo bench -p nestless-tests --bench libvirt_attach` (as root; libvirtd running, QEMU,
//! the guest image and vhost-device-vsock as for the VM tests).
//! `NESTLESS_BENCH_CYCLES` sets the cycles per backend (default 20).

use std::time::{Duration, Instant};

use nestless_protos::agent as pb;
use nestless_tests::{
    agent::{ctx, vm_client, AgentProc},
    libvirt::{domain_dir, require_libvirtd, Domain},
    netenv::{random_subnet, Bridge},
    vm::{Accel, Machine, Vm},
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
        "  {name:<24} n={:<4} min {:>7.2}  p50 {:>7.2}  p90 {:>7.2}  max {:>7.2} ms",
        v.len(),
        min,
        pct(v, 0.5),
        pct(v, 0.9),
        pct(v, 1.0)
    );
}

fn main() {
    require_libvirtd();
    let cycles: usize = std::env::var("NESTLESS_BENCH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("attach through libvirt vs raw QMP ({cycles} cycles per backend, TCG guests)");

    let net = random_subnet();
    let bridge = Bridge::new(Some(&format!("{net}.1/24")));
    let dom = Domain::start(Domain::builder().root_ports(4), domain_dir());
    let vm = Vm::builder()
        .machine(Machine::Q35)
        .root_ports(4)
        .accel(Accel::Tcg)
        .start();
    dom.wait_ready(Duration::from_secs(240));
    vm.wait_ready(Duration::from_secs(240));
    let agent = AgentProc::start(|dir| {
        AgentProc::agent_section(dir)
            + &format!(
                "[[network]]\nname = \"n\"\nbridge = \"{}\"\nsubnet = \"{net}.0/24\"\ngateway = \"{net}.1\"\n\
                 [[vm]]\nname = \"lv\"\nbackend = \"libvirt\"\ndomain = \"{}\"\nsocket = \"{d}/lv.sock\"\nmax_nics = 4\n\
                 [[vm]]\nname = \"q\"\nbackend = \"qemu\"\nqmp_socket = \"{}\"\nsocket = \"{d}/q.sock\"\nmax_nics = 4\n",
                bridge.name,
                dom.name,
                vm.qmp_path().display(),
                d = dir.display()
            )
    });
    rt.block_on(async {
        for (name, label) in [
            ("lv", "libvirt (virDomainAttachDeviceFlags, unmanaged tap)"),
            ("q", "raw QMP (getfd, netdev_add, device_add)"),
        ] {
            let c = vm_client(&agent.dir.path().join(format!("{name}.sock"))).await;
            let (mut attach, mut detach) = (Vec::new(), Vec::new());
            // One warm-up cycle, not counted.
            for i in 0..=cycles {
                let sb = format!("{name}{i}");
                let t = Instant::now();
                c.attach_nic(
                    ctx(),
                    &pb::AttachNicRequest {
                        sandbox_id: sb.clone(),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
                let a = ms(t.elapsed());
                let t = Instant::now();
                c.detach_nic(
                    ctx(),
                    &pb::DetachNicRequest {
                        sandbox_id: sb,
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
                if i > 0 {
                    attach.push(a);
                    detach.push(ms(t.elapsed()));
                }
            }
            println!("{label}:");
            row("attach (request to reply)", &mut attach);
            row("detach (guest released it)", &mut detach);
        }
    });
}
