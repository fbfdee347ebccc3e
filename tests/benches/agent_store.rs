//! The agent's durable state under load (issue 11, item 4): the database
//! (`state.db`, the default) and the whole-file store it replaced
//! (`state.json`, `[agent] state_store = "json"`) side by side in one run.
//! A benchmark program (prints figures), not a test.
//!
//! `cargo bench -p nestless-tests --bench agent_store` (as root, after
//! `cargo build --release -p nestless-netagent`, or with `NESTLESS_BIN_DIR`
//! naming the binaries to run). `NESTLESS_BENCH_LEVELS` (default
//! `100,1000,4000`) sets the NIC counts measured at, `NESTLESS_BENCH_STORES`
//! (default `json,sqlite`) the stores.
//!
//! Rig: one real agent, 20 netns VMs on 5 tenant networks (a /22 and a
//! bridge each: a bridge holds at most 1,023 ports), every NIC a real veth
//! on its bridge. Figures, per store:
//! * at each level L (NICs held host-wide): 200 attaches, one at a time per
//!   VM, the 20 VMs at once: attaches/s host-wide and p50/p99 of one attach;
//!   then the 200 detached the same way (detaches/s);
//! * at the top level: a burst of 120 pod starts (a connection and an
//!   attach each, all at once, 6 per VM) with the shim's 5 s deadline:
//!   failures and the slowest;
//! * a restart with every NIC held: SIGTERM to the agent serving again
//!   (state loaded, every NIC recovered and checked, sockets bound).

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use nestless_protos::agent as pb;
use nestless_tests::{
    agent::{status_of, vm_client, AgentProc},
    netenv::{require_root, Bridge, Netns},
};

const VMS: usize = 20;
const NETWORKS: usize = 5;
const WINDOW_PER_VM: usize = 10;
const BURST: usize = 120;

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn deadline(secs: u64) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(secs as i64 * 1_000_000_000)
}

struct Rig {
    agent: AgentProc,
    _bridges: Vec<Bridge>,
    _vms: Vec<Netns>,
}

impl Rig {
    fn start(store: &str, per_vm: usize) -> Rig {
        let bridges: Vec<Bridge> = (0..NETWORKS).map(|_| Bridge::new(None)).collect();
        let vms: Vec<Netns> = (0..VMS).map(|i| Netns::new(&format!("st{i}"))).collect();
        let second = 64 + rand::random::<u8>() % 64;
        let agent = AgentProc::start(|dir| {
            let mut s = AgentProc::agent_section(dir).replacen(
                "[agent]\n",
                &format!("[agent]\nstate_store = \"{store}\"\n"),
                1,
            );
            for (n, b) in bridges.iter().enumerate() {
                s += &format!(
                    "[[network]]\nname = \"n{n}\"\nbridge = \"{}\"\nsubnet = \"10.{second}.{q}.0/22\"\ngateway = \"10.{second}.{q}.1\"\n",
                    b.name,
                    q = n * 4
                );
            }
            for (i, ns) in vms.iter().enumerate() {
                s += &format!(
                    "[[vm]]\nname = \"vm{i}\"\nbackend = \"netns\"\nnetns = \"{}\"\nnetwork = \"n{}\"\nsocket = \"{}/vm{i}.sock\"\nmax_nics = {per_vm}\n",
                    ns.name,
                    i % NETWORKS,
                    dir.display()
                );
            }
            s
        });
        Rig {
            agent,
            _bridges: bridges,
            _vms: vms,
        }
    }

    fn socket(&self, vm: usize) -> PathBuf {
        self.agent.dir.path().join(format!("vm{vm}.sock"))
    }
}

/// Per VM, `names[vm]` attached (or detached) one after the other, all VMs
/// at once: (wall time, each call's latency in ms, failures).
async fn run(rig: &Rig, names: Vec<Vec<String>>, attach: bool) -> (Duration, Vec<f64>, usize) {
    let t = Instant::now();
    let mut tasks = Vec::new();
    for (vm, list) in names.into_iter().enumerate() {
        let sock = rig.socket(vm);
        tasks.push(tokio::spawn(async move {
            let c = vm_client(&sock).await;
            let mut lat = Vec::new();
            let mut failed = 0;
            for sb in list {
                let t = Instant::now();
                let r = if attach {
                    c.attach_nic(
                        deadline(60),
                        &pb::AttachNicRequest {
                            sandbox_id: sb,
                            ..Default::default()
                        },
                    )
                    .await
                    .map(drop)
                } else {
                    c.detach_nic(
                        deadline(60),
                        &pb::DetachNicRequest {
                            sandbox_id: sb,
                            ..Default::default()
                        },
                    )
                    .await
                    .map(drop)
                };
                match r {
                    Ok(()) => lat.push(t.elapsed().as_secs_f64() * 1000.0),
                    Err(e) => {
                        if failed == 0 {
                            eprintln!("  call failed: {:?}", status_of(&e));
                        }
                        failed += 1;
                    }
                }
            }
            (lat, failed)
        }));
    }
    let mut lat = Vec::new();
    let mut failed = 0;
    for task in tasks {
        let (l, f) = task.await.expect("client task");
        lat.extend(l);
        failed += f;
    }
    (t.elapsed(), lat, failed)
}

fn names(tag: &str, from: usize, count: usize) -> Vec<Vec<String>> {
    (0..VMS)
        .map(|vm| {
            (from..from + count)
                .map(|k| format!("{tag}-{vm}-{k}"))
                .collect()
        })
        .collect()
}

async fn bench(store: &str, levels: &[usize]) {
    let top = *levels.iter().max().unwrap_or(&100);
    let per_vm = top / VMS + WINDOW_PER_VM + BURST / VMS + 1;
    let mut rig = Rig::start(store, per_vm);
    println!("store {store}:");
    let mut held = 0;
    for &level in levels {
        let fill = level.saturating_sub(held) / VMS;
        let (took, _, failed) = run(&rig, names("fill", held / VMS, fill), true).await;
        assert_eq!(failed, 0, "fill to {level} failed");
        held += fill * VMS;
        println!(
            "  fill to {held:>5} NICs: {:>6.0} attaches/s",
            (fill * VMS) as f64 / took.as_secs_f64()
        );
        let window = names(&format!("w{level}"), 0, WINDOW_PER_VM);
        let (took, mut lat, failed) = run(&rig, window.clone(), true).await;
        let n = WINDOW_PER_VM * VMS;
        println!(
            "  at {held:>5} NICs: {:>6.0} attaches/s host-wide  one attach p50 {:>7.2} ms  p99 {:>7.2} ms  failed {failed}",
            n as f64 / took.as_secs_f64(),
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99),
        );
        let (took, mut lat, failed) = run(&rig, window, false).await;
        println!(
            "  at {held:>5} NICs: {:>6.0} detaches/s host-wide  one detach p50 {:>7.2} ms  p99 {:>7.2} ms  failed {failed}",
            n as f64 / took.as_secs_f64(),
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99),
        );
    }
    // A burst of pod starts: each a connection and an attach, all at once.
    let t = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..BURST {
        let sock = rig.socket(k % VMS);
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let c = vm_client(&sock).await;
            let r = c
                .attach_nic(
                    deadline(5),
                    &pb::AttachNicRequest {
                        sandbox_id: format!("burst-{k}"),
                        ..Default::default()
                    },
                )
                .await;
            (r.map(drop).map_err(|e| status_of(&e)), t.elapsed())
        }));
    }
    let mut failed = 0;
    let mut slowest = Duration::ZERO;
    for task in tasks {
        let (r, took) = task.await.expect("burst task");
        slowest = slowest.max(took);
        if let Err(e) = r {
            if failed == 0 {
                eprintln!("  burst call failed: {e:?}");
            }
            failed += 1;
        }
    }
    println!(
        "  burst of {BURST} pod starts at {held} NICs (5 s deadline): {failed} failed, slowest {:.0} ms, all done in {:.0} ms",
        slowest.as_secs_f64() * 1000.0,
        t.elapsed().as_secs_f64() * 1000.0
    );
    held += BURST - failed;
    assert!(rig.agent.stop().success(), "agent did not stop cleanly");
    let t = Instant::now();
    rig.agent.restart_within(Duration::from_secs(600));
    println!(
        "  restart with {held} NICs: serving again after {:.0} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );
    let size: u64 = ["state.db", "state.db-wal", "state.json"]
        .iter()
        .filter_map(|f| std::fs::metadata(rig.agent.state_dir().join(f)).ok())
        .map(|m| m.len())
        .sum();
    println!("  state on disk: {:.1} MiB", size as f64 / (1 << 20) as f64);
    rig.agent.kill9();
}

fn main() {
    require_root();
    let levels: Vec<usize> = std::env::var("NESTLESS_BENCH_LEVELS")
        .unwrap_or_else(|_| "100,1000,4000".into())
        .split(',')
        .map(|l| l.trim().parse().expect("NESTLESS_BENCH_LEVELS: numbers"))
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let stores = std::env::var("NESTLESS_BENCH_STORES").unwrap_or_else(|_| "json,sqlite".into());
    rt.block_on(async {
        for store in stores.split(',') {
            bench(store.trim(), &levels).await;
        }
    });
}
