//! Benchmark of the Hostlo planner. Prints figures; asserts nothing about time.
//!
//! ```text
//! cargo bench -p nestless-planner --bench plan-bench               # everything
//! cargo bench -p nestless-planner --bench plan-bench -- trace      # the four Google shards
//! cargo bench -p nestless-planner --bench plan-bench -- variants   # other models on them
//! cargo bench -p nestless-planner --bench plan-bench -- exact      # brute force on small clients
//! cargo bench -p nestless-planner --bench plan-bench -- million    # 10^6 generated containers
//! ```
//!
//! The data is read from `../shared/data` beside the repository (or `NESTLESS_DATA_DIR`).
//! `NESTLESS_BENCH_LIMIT_MS` sets the exact part's time limit per client (default 1000;
//! 0: heuristic only), `NESTLESS_BENCH_BUDGET_S` the run-wide budget of the exact part
//! (default that of `nestlessctl plan`, 20 s; 0: none), `NESTLESS_BENCH_CONTAINERS` the size
//! of the generated set.
use std::path::PathBuf;
use std::time::Instant;

use nestless_planner::catalogue::{load_catalogue, FamilyFilter};
use nestless_planner::google::{load_google, GoogleOptions, Scale};
use nestless_planner::model::group_clients;
use nestless_planner::plan::plan_all_stats;
use nestless_planner::report::{client_row, summarise, summary_text, ClientRow, Summary};
use nestless_planner::{validate, Catalogue, Client, HostModel, Mode, PlanConfig, Res};
use rand::{Rng, SeedableRng};

/// `NESTLESS_DATA_DIR` (a relative one from the workspace root), or `../shared/data`
/// beside the workspace.
fn data() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    match std::env::var_os("NESTLESS_DATA_DIR").map(PathBuf::from) {
        Some(p) if p.is_absolute() => p,
        Some(p) => root.join(p),
        None => root.join("../shared/data"),
    }
}

fn catalogue(families: &str) -> anyhow::Result<Catalogue> {
    Ok(load_catalogue(
        &data().join("prices/aws_ec2_instances_us-east-1.csv"),
        &FamilyFilter::parse(families)?,
    )?
    .0)
}

struct Run {
    read_s: f64,
    plan_s: f64,
    rows: Vec<ClientRow>,
    summary: Summary,
}

fn plan(
    clients: &[Client],
    cat: &Catalogue,
    host: HostModel,
    threads: usize,
) -> anyhow::Result<(f64, Vec<ClientRow>)> {
    let mut cfg = PlanConfig {
        host,
        ..Default::default()
    };
    if let Some(ms) = std::env::var("NESTLESS_BENCH_LIMIT_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        cfg.exact =
            (ms > 0).then(|| nestless_planner::setcover::Limits::per_client(ms as f64 / 1e3));
    }
    if let Some(s) = std::env::var("NESTLESS_BENCH_BUDGET_S")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
    {
        cfg.exact_budget = (s > 0.0).then(|| std::time::Duration::from_secs_f64(s));
    }
    let t1 = Instant::now();
    let (plans, run) = plan_all_stats(clients, cat, &cfg, threads);
    let plan_s = t1.elapsed().as_secs_f64();
    eprintln!(
        "phases: heuristic {:.2} s, exact {:.2} s ({} clients, {} after the budget)",
        run.heuristic_s, run.exact_s, run.exact_clients, run.out_of_budget
    );
    for (c, p) in clients.iter().zip(&plans) {
        if let Some(a) = &p.whole {
            validate(c, cat, host, Mode::Whole, a)?;
        }
        if let Some(b) = &p.hostlo {
            validate(c, cat, host, Mode::Hostlo, b)?;
        }
    }
    let rows = clients
        .iter()
        .zip(&plans)
        .map(|(c, p)| client_row(c, p, cat))
        .collect();
    Ok((plan_s, rows))
}

fn run(families: &str, scale: Scale, host: HostModel, threads: usize) -> anyhow::Result<Run> {
    let t0 = Instant::now();
    let cat = catalogue(families)?;
    let (clients, _) = load_google(
        &[data().join("traces/google2011")],
        GoogleOptions { scale, at_us: None },
    )?;
    let read_s = t0.elapsed().as_secs_f64();
    let (plan_s, rows) = plan(&clients, &cat, host, threads)?;
    let summary = summarise(&rows);
    Ok(Run {
        read_s,
        plan_s,
        rows,
        summary,
    })
}

fn header() {
    println!("| model | proven savers / planned | share | largest | median | undecided | (a) optimal | (b) optimal | summed bill | read s | plan s |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
}

fn line(name: &str, r: &Run) {
    let s = &r.summary;
    println!(
        "| {name} | {}/{} | {:.1} % | {:.1} % | {:.1} % | {} (≤ {:.1} %) | {} | {} | −{:.2} % | {:.2} | {:.2} |",
        s.with_saving,
        s.planned,
        s.share_with_saving_pct,
        s.max_saving_pct,
        s.median_saving_among_savers_pct,
        s.undecided,
        s.undecided_max_pct,
        s.gap_whole.optimal,
        s.gap_hostlo.optimal,
        100.0 * (s.total_whole - s.total_hostlo) / s.total_whole.max(1e-9),
        r.read_s,
        r.plan_s,
    );
}

/// Peak resident set of this process, MiB (Linux).
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn trace(threads: usize) -> anyhow::Result<()> {
    println!("## Google 2011 shards 0-3, default model (m5,c5,r5; 1.0 = 32 vCPU / 128 GiB; per-family hosts)");
    println!();
    header();
    let mut last = None;
    for k in 0..3 {
        let r = run("m5,c5,r5", Scale::default(), HostModel::PerFamily, threads)?;
        line(&format!("default, {threads} threads, run {}", k + 1), &r);
        last = Some(r);
    }
    let r = run("m5,c5,r5", Scale::default(), HostModel::PerFamily, 1)?;
    line("default, 1 thread", &r);
    let r = last.expect("three runs");
    println!();
    print!("{}", summary_text(&r.summary));
    // The gaps of the clients that are not proven optimal, largest first.
    let mut open: Vec<&ClientRow> = r
        .rows
        .iter()
        .filter(|x| x.gap_whole_pct.unwrap_or(0.0) > 0.0 || x.gap_hostlo_pct.unwrap_or(0.0) > 0.0)
        .collect();
    open.sort_by(|a, b| {
        b.gap_hostlo_pct
            .unwrap_or(0.0)
            .total_cmp(&a.gap_hostlo_pct.unwrap_or(0.0))
    });
    println!(
        "clients not proven optimal in (a) or (b): {} (containers: {})",
        open.len(),
        open.iter()
            .map(|x| x.containers.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("peak RSS {:.0} MiB", peak_rss_mib());
    println!();
    Ok(())
}

fn variants(threads: usize) -> anyhow::Result<()> {
    println!("## Variants");
    println!();
    header();
    let d = Scale::default();
    for (name, fam, scale, host) in [
        (
            "scale 16 vCPU / 64 GiB",
            "m5,c5,r5",
            Scale {
                vcpu: 16.0,
                gib: 64.0,
            },
            HostModel::PerFamily,
        ),
        (
            "scale 64 vCPU / 256 GiB",
            "m5,c5,r5",
            Scale {
                vcpu: 64.0,
                gib: 256.0,
            },
            HostModel::PerFamily,
        ),
        (
            "scale 96 vCPU / 384 GiB",
            "m5,c5,r5",
            Scale {
                vcpu: 96.0,
                gib: 384.0,
            },
            HostModel::PerFamily,
        ),
        ("host unlimited", "m5,c5,r5", d, HostModel::Unlimited),
        (
            "host 96x384 (any family)",
            "m5,c5,r5",
            d,
            HostModel::Uniform(Res::from_vcpu_gib(96.0, 384.0)),
        ),
        ("families m5 only", "m5", d, HostModel::PerFamily),
    ] {
        line(name, &run(fam, scale, host, threads)?);
    }
    println!();
    Ok(())
}

/// The planner against brute force on the trace clients small enough for it.
fn exact_on_trace() -> anyhow::Result<()> {
    use nestless_planner::exact::{exact_hostlo, exact_whole};
    let cat = catalogue("m5,c5,r5")?;
    let (clients, _) = load_google(&[data().join("traces/google2011")], Default::default())?;
    let cfg = PlanConfig::default();
    let t0 = Instant::now();
    let (mut n, mut eq_a, mut eq_b, mut proven_a, mut proven_b) = (0, 0, 0, 0, 0);
    for c in clients
        .iter()
        .filter(|c| c.container_count() <= 8 && c.pods.len() <= 8)
    {
        let p = nestless_planner::plan_client(c, &cat, &cfg);
        let (ea, eb) = (
            exact_whole(c, &cat, cfg.host),
            exact_hostlo(c, &cat, cfg.host),
        );
        let (ha, hb) = (
            p.whole.as_ref().map(|x| x.cost(&cat)),
            p.hostlo.as_ref().map(|x| x.cost(&cat)),
        );
        n += 1;
        eq_a += usize::from(ha == ea);
        eq_b += usize::from(hb == eb);
        proven_a += usize::from(ha == Some(p.bound_whole));
        proven_b += usize::from(hb == Some(p.bound_hostlo));
        if let Some(ea) = ea {
            anyhow::ensure!(p.bound_whole <= ea, "(a) bound above brute force");
        }
        if let Some(eb) = eb {
            anyhow::ensure!(p.bound_hostlo <= eb, "(b) bound above brute force");
        }
    }
    println!(
        "brute force on the {n} trace clients with <= 8 containers: (a) optimal {eq_a}, proven {proven_a}; (b) optimal {eq_b}, proven {proven_b} ({:.1} s)",
        t0.elapsed().as_secs_f64()
    );
    println!();
    Ok(())
}

/// `count` containers in clients shaped like the planned clients of the Google trace
/// (median 2 pods and 3 containers, a heavy tail up to hundreds of pods): pods per client
/// and containers per pod from Pareto tails, half of the pods single-container, the tasks
/// of a job identical (as in the trace) with a second shape in one job of five; requests
/// from 0.1 to 4 vCPU at 0.5 to 8 GiB per vCPU. Every pod fits an m5 host. Fixed seed.
pub fn generate(count: usize, seed: u64) -> Vec<Client> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut rows = Vec::with_capacity(count);
    let mut client = 0;
    // Pareto tail: 1 + floor(u^(-1/alpha) - 1), capped.
    let pareto = |rng: &mut rand::rngs::StdRng, alpha: f64, cap: usize| {
        let u: f64 = rng.random_range(1e-9..1.0);
        ((u.powf(-1.0 / alpha)) as usize).clamp(1, cap)
    };
    while rows.len() < count {
        let pods = pareto(&mut rng, 0.9, 600);
        for p in 0..pods {
            let shapes = if rng.random_bool(0.2) { 2 } else { 1 };
            let shape: Vec<(f64, f64)> = (0..shapes)
                .map(|_| {
                    let vcpu = 0.1 * 40f64.powf(rng.random::<f64>());
                    let gib = vcpu * rng.random_range(0.5..8.0);
                    ((vcpu * 100.0).round() / 100.0, (gib * 10.0).round() / 10.0)
                })
                .collect();
            let per = shape.iter().map(|s| s.0).sum::<f64>().max(0.01);
            let most = ((40.0 / per) as usize).max(1);
            let tasks = if rng.random_bool(0.5) {
                1
            } else {
                pareto(&mut rng, 0.8, 400).min(most)
            };
            for t in 0..tasks {
                if rows.len() >= count {
                    break;
                }
                let (vcpu, gib) = shape[t % shapes];
                rows.push((
                    format!("client{client}"),
                    format!("job{p}"),
                    t.to_string(),
                    Res::from_vcpu_gib(vcpu, gib),
                ));
            }
        }
        client += 1;
    }
    group_clients(rows)
}

fn million(threads: usize) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let n: usize = std::env::var("NESTLESS_BENCH_CONTAINERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let clients = generate(n, 0x1e6);
    let gen_s = t0.elapsed().as_secs_f64();
    let cat = catalogue("m5,c5,r5")?;
    let n: usize = clients.iter().map(|c| c.container_count()).sum();
    let big = clients
        .iter()
        .map(|c| c.container_count())
        .max()
        .unwrap_or(0);
    let (plan_s, rows) = plan(&clients, &cat, HostModel::PerFamily, threads)?;
    let s = summarise(&rows);
    println!("## 10^6 generated containers");
    println!();
    println!(
        "{n} containers, {} clients (median {} containers, largest {big}), generated in {gen_s:.2} s; planned in {plan_s:.2} s on {threads} threads; peak RSS {:.0} MiB",
        clients.len(),
        {
            let mut v: Vec<usize> = clients.iter().map(|c| c.container_count()).collect();
            v.sort_unstable();
            v[v.len() / 2]
        },
        peak_rss_mib()
    );
    print!("{}", summary_text(&s));
    println!();
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let want = |w: &str| args.is_empty() || args.iter().any(|a| a == w);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if want("trace") {
        trace(threads)?;
    }
    if want("variants") {
        variants(threads)?;
    }
    if want("exact") {
        exact_on_trace()?;
    }
    if want("million") {
        million(threads)?;
    }
    Ok(())
}
