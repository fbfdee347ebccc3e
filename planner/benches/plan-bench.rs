//! Benchmark of the Hostlo planner on the four Google 2011 `task_events` shards: prints the
//! time to read them and to plan every client, and the saving figures, for the default
//! model and a few variants. Run with
//! `cargo bench -p nestless-netagent --bench plan-bench`.
use std::path::PathBuf;
use std::time::Instant;

use nestless_planner::catalogue::{load_catalogue, FamilyFilter};
use nestless_planner::google::{load_google, GoogleOptions, Scale};
use nestless_planner::report::{client_row, summarise, Summary};
use nestless_planner::{plan_all, validate, HostModel, Mode, PlanConfig, Res};

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data")
}

struct Run {
    read_s: f64,
    plan_s: f64,
    summary: Summary,
}

fn run(families: &str, scale: Scale, host: HostModel, threads: usize) -> anyhow::Result<Run> {
    let t0 = Instant::now();
    let (cat, _) = load_catalogue(
        &data().join("prices/aws_ec2_instances_us-east-1.csv"),
        &FamilyFilter::parse(families)?,
    )?;
    let shards: Vec<PathBuf> = (0..4)
        .map(|i| {
            data().join(format!(
                "traces/google2011/task_events_part-0000{i}-of-00500.csv.gz"
            ))
        })
        .collect();
    let (clients, _) = load_google(&shards, GoogleOptions { scale, at_us: None })?;
    let read_s = t0.elapsed().as_secs_f64();
    let cfg = PlanConfig {
        host,
        ..Default::default()
    };
    let t1 = Instant::now();
    let plans = plan_all(&clients, &cat, &cfg, threads);
    let plan_s = t1.elapsed().as_secs_f64();
    for (c, p) in clients.iter().zip(&plans) {
        if let Some(a) = &p.whole {
            validate(c, &cat, host, Mode::Whole, a)?;
        }
        if let Some(b) = &p.hostlo {
            validate(c, &cat, host, Mode::Hostlo, b)?;
        }
    }
    let rows: Vec<_> = clients
        .iter()
        .zip(&plans)
        .map(|(c, p)| client_row(c, p, &cat))
        .collect();
    Ok(Run {
        read_s,
        plan_s,
        summary: summarise(&rows),
    })
}

fn line(name: &str, r: &Run) {
    let s = &r.summary;
    println!(
        "| {name:<38} | {:>4}/{:<4} | {:>5.1} % | {:>5.1} % | {:>5.1} % | {:>5.2} % | {:>6.2} | {:>6.2} | {:>6.2} |",
        s.with_saving,
        s.planned,
        s.share_with_saving_pct,
        s.max_saving_pct,
        s.median_saving_among_savers_pct,
        100.0 * (s.total_whole - s.total_hostlo) / s.total_whole.max(1e-9),
        r.read_s,
        r.plan_s,
        r.read_s + r.plan_s
    );
}

/// The heuristic against the exact optimum on the trace clients small enough for it.
fn exact_on_trace() -> anyhow::Result<()> {
    use nestless_planner::exact::{exact_hostlo, exact_whole};
    let (cat, _) = load_catalogue(
        &data().join("prices/aws_ec2_instances_us-east-1.csv"),
        &FamilyFilter::parse("m5,c5,r5")?,
    )?;
    let (clients, _) = load_google(
        &[data().join("traces/google2011")],
        GoogleOptions {
            scale: Scale::default(),
            at_us: None,
        },
    )?;
    let cfg = PlanConfig::default();
    let t0 = Instant::now();
    let (mut n, mut eq_a, mut eq_b, mut gap_max) = (0, 0, 0, 0.0f64);
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
            p.whole.map(|x| x.cost(&cat)),
            p.hostlo.map(|x| x.cost(&cat)),
        );
        n += 1;
        eq_a += usize::from(ha == ea);
        eq_b += usize::from(hb == eb);
        if let (Some(h), Some(e)) = (hb, eb) {
            gap_max = gap_max.max((h - e) as f64 / e.max(1) as f64);
        }
    }
    println!(
        "exact check on the {n} trace clients with <= 8 containers: (a) optimal for {eq_a}, (b) optimal for {eq_b}, largest (b) gap {:.2} % ({:.1} s)",
        100.0 * gap_max,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; nothing to parse.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("Hostlo planner on Google 2011 task_events shards 0-3 (274,536 tasks, 530 users), {threads} threads");
    println!();
    println!("| model                                  | savers/planned | share | max | median | total | read s | plan s | total s |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let default_scale = Scale::default();
    let mut best_total = f64::INFINITY;
    for k in 0..3 {
        let r = run("m5,c5,r5", default_scale, HostModel::PerFamily, threads)?;
        best_total = best_total.min(r.read_s + r.plan_s);
        line(&format!("default (run {})", k + 1), &r);
    }
    let r = run("m5,c5,r5", default_scale, HostModel::PerFamily, 1)?;
    line("default, 1 thread", &r);
    for (name, scale) in [
        (
            "scale 16 vCPU / 64 GiB",
            Scale {
                vcpu: 16.0,
                gib: 64.0,
            },
        ),
        (
            "scale 64 vCPU / 256 GiB",
            Scale {
                vcpu: 64.0,
                gib: 256.0,
            },
        ),
        (
            "scale 96 vCPU / 384 GiB",
            Scale {
                vcpu: 96.0,
                gib: 384.0,
            },
        ),
    ] {
        line(
            name,
            &run("m5,c5,r5", scale, HostModel::PerFamily, threads)?,
        );
    }
    line(
        "host unlimited",
        &run("m5,c5,r5", default_scale, HostModel::Unlimited, threads)?,
    );
    line(
        "host 96x384 (any family)",
        &run(
            "m5,c5,r5",
            default_scale,
            HostModel::Uniform(Res::from_vcpu_gib(96.0, 384.0)),
            threads,
        )?,
    );
    line(
        "families m5 only",
        &run("m5", default_scale, HostModel::PerFamily, threads)?,
    );
    println!();
    println!("best default run: {best_total:.2} s (target: under 30 s)");
    exact_on_trace()?;
    Ok(())
}
