//! The heuristic against exact optima on small clients: randomised instances with a fixed
//! seed, and hand-made ones.
use nestless_planner::exact::{exact_hostlo, exact_whole};
use nestless_planner::model::group_clients;
use nestless_planner::pack::SearchOptions;
use nestless_planner::{
    plan_client, validate, Catalogue, Client, HostModel, Mode, PlanConfig, Res, VmType,
};
use rand::{Rng, SeedableRng};

/// m, c and r shapes of AWS (4, 2 and 8 GiB per vCPU) in three sizes, us-east-1 prices.
fn catalogue() -> Catalogue {
    let mut types = Vec::new();
    for (fam, gib_per_vcpu, usd_per_large) in [("m", 4, 0.096), ("c", 2, 0.085), ("r", 8, 0.126)] {
        for (k, size) in ["large", "xlarge", "2xlarge"].iter().enumerate() {
            let vcpu = 2u64 << k;
            types.push(VmType {
                name: format!("{fam}.{size}"),
                family: fam.into(),
                cap: Res::new(vcpu * 1000, vcpu * gib_per_vcpu * 1024),
                price: (usd_per_large * 1e6) as u64 * (1 << k),
            });
        }
    }
    Catalogue::new(types)
}

fn client(pods: &[Vec<(f64, f64)>]) -> Client {
    let mut rows = Vec::new();
    for (p, cs) in pods.iter().enumerate() {
        for (c, &(vcpu, gib)) in cs.iter().enumerate() {
            rows.push((
                "u".to_string(),
                format!("p{p}"),
                format!("c{c}"),
                Res::from_vcpu_gib(vcpu, gib),
            ));
        }
    }
    group_clients(rows).remove(0)
}

fn random_client(rng: &mut rand::rngs::StdRng) -> Client {
    let pods = rng.random_range(1..=4);
    let mut left = 8;
    let mut out = Vec::new();
    for p in 0..pods {
        let max = (left - (pods - p - 1)).clamp(1, 3);
        let n = rng.random_range(1..=max);
        left -= n;
        let cs = (0..n)
            .map(|_| {
                // Mostly small containers, some large; memory-heavy or CPU-heavy shapes.
                let vcpu = if rng.random_bool(0.7) {
                    rng.random_range(0.1..2.0)
                } else {
                    rng.random_range(2.0..5.0)
                };
                let gib = vcpu * rng.random_range(0.5..8.0);
                (
                    (vcpu * 10.0_f64).round() / 10.0,
                    (gib * 4.0_f64).round() / 4.0,
                )
            })
            .collect();
        out.push(cs);
    }
    client(&out)
}

struct Tally {
    n: usize,
    /// Plans whose certified bound meets their cost (proven optimal).
    proven: usize,
    equal: usize,
    max_gap: f64,
    sum_gap: f64,
}

impl Tally {
    fn new() -> Self {
        Self {
            n: 0,
            proven: 0,
            equal: 0,
            max_gap: 0.0,
            sum_gap: 0.0,
        }
    }
    fn plus(&mut self, heur: u64, exact: u64) {
        assert!(
            heur >= exact,
            "heuristic {heur} below the optimum {exact}: the exact search is wrong"
        );
        self.n += 1;
        if heur == exact {
            self.equal += 1;
        }
        let gap = (heur - exact) as f64 / exact.max(1) as f64;
        self.max_gap = self.max_gap.max(gap);
        self.sum_gap += gap;
    }
    fn report(&self, what: &str) {
        eprintln!(
            "{what}: {} instances, proven optimal {}, optimal in {} ({:.1} %), mean gap {:.3} %, max gap {:.2} %",
            self.n,
            self.proven,
            self.equal,
            100.0 * self.equal as f64 / self.n.max(1) as f64,
            100.0 * self.sum_gap / self.n.max(1) as f64,
            100.0 * self.max_gap
        );
    }
}

/// The search without its exact neighbourhoods (small packings solved exactly, small
/// groups re-split over every pod partition): the bare heuristic.
fn heuristic_only() -> SearchOptions {
    SearchOptions {
        exact_items: 0,
        exact_pods: 0,
        ..Default::default()
    }
}

/// The configuration of a run: with the exact part, or the bare heuristic.
fn config(host: HostModel, search: SearchOptions, exact: bool) -> PlanConfig {
    PlanConfig {
        host,
        search,
        exact: if exact {
            PlanConfig::default().exact
        } else {
            None
        },
        ..Default::default()
    }
}

fn check_against_exact(
    host: HostModel,
    search: SearchOptions,
    exact: bool,
    seed: u64,
    count: usize,
) -> (Tally, Tally) {
    let cat = catalogue();
    let cfg = config(host, search, exact);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut ta, mut tb) = (Tally::new(), Tally::new());
    for _ in 0..count {
        let cl = random_client(&mut rng);
        let plan = plan_client(&cl, &cat, &cfg);
        let (ea, eb) = (exact_whole(&cl, &cat, host), exact_hostlo(&cl, &cat, host));
        assert_eq!(
            plan.whole.is_some(),
            ea.is_some(),
            "(a) feasibility differs for {cl:?}"
        );
        assert_eq!(
            plan.hostlo.is_some(),
            eb.is_some(),
            "(b) feasibility differs for {cl:?}"
        );
        if let (Some(a), Some(ea)) = (&plan.whole, ea) {
            validate(&cl, &cat, host, Mode::Whole, a).unwrap();
            assert!(
                plan.bound_whole <= ea,
                "(a) bound above the optimum: {cl:?}"
            );
            if plan.bound_whole == a.cost(&cat) {
                ta.proven += 1;
            }
            ta.plus(a.cost(&cat), ea);
        }
        if let (Some(b), Some(eb)) = (&plan.hostlo, eb) {
            validate(&cl, &cat, host, Mode::Hostlo, b).unwrap();
            assert!(
                plan.bound_hostlo <= eb,
                "(b) bound above the optimum: {cl:?}"
            );
            if plan.bound_hostlo == b.cost(&cat) {
                tb.proven += 1;
            }
            if let Some(a) = &plan.whole {
                assert!(b.cost(&cat) <= a.cost(&cat), "(b) dearer than (a)");
            }
            if let Some(ea) = ea {
                assert!(eb <= ea, "exact (b) above exact (a)");
            }
            tb.plus(b.cost(&cat), eb);
        }
    }
    (ta, tb)
}

/// Bounds documented in docs/planner.md ("Checked against the optimum").
fn assert_quality(ta: &Tally, tb: &Tally, min_optimal: f64, max_gap: f64) {
    assert!(ta.n >= 300 && tb.n >= 300, "too few feasible instances");
    assert!(ta.proven <= ta.n && tb.proven <= tb.n);
    assert!(
        ta.sum_gap / (ta.n as f64) < 0.01 && tb.sum_gap / (tb.n as f64) < 0.01,
        "mean gap of 1 % or more"
    );
    assert!(
        ta.equal as f64 >= min_optimal * ta.n as f64,
        "(a) optimal too rarely"
    );
    assert!(
        tb.equal as f64 >= min_optimal * tb.n as f64,
        "(b) optimal too rarely"
    );
    assert!(
        ta.max_gap <= max_gap && tb.max_gap <= max_gap,
        "gap too large"
    );
}

/// `min_proven_b`: the share of (b) plans proven optimal. The bound of (b) drops the size
/// of a host, and this catalogue's hosts are small (8 vCPU on per-family hosts, 12 on the
/// uniform ones), so where the host binds (b) is optimal but not always proven. The exact
/// part runs under a wall-clock limit, so the shares drop on a loaded machine (measured
/// at load 11 in a debug build: 70 %, 81 %, 98 %; every (a)); the floors leave room for
/// that.
fn run(name: &str, host: HostModel, seed: u64, min_proven_b: f64) {
    let (ta, tb) = check_against_exact(host, SearchOptions::default(), true, seed, 400);
    ta.report(&format!("{name} (a)"));
    tb.report(&format!("{name} (b)"));
    assert_quality(&ta, &tb, 0.99, 0.10);
    // A bound never exceeds the brute-force optimum (asserted per instance above), so a
    // plan whose bound meets its cost is optimal.
    // All (a) plans are proven on a quiet machine; under load a few may hit the limit.
    assert!(
        ta.proven as f64 >= 0.97 * ta.n as f64,
        "(a) proven too rarely"
    );
    assert!(
        tb.proven as f64 >= min_proven_b * tb.n as f64,
        "(b) proven too rarely"
    );
    let (ta, tb) = check_against_exact(host, heuristic_only(), false, seed, 400);
    ta.report(&format!("{name} (a), heuristic only"));
    tb.report(&format!("{name} (b), heuristic only"));
    assert_quality(&ta, &tb, 0.85, 0.35);
}

#[test]
fn random_instances_per_family_hosts() {
    run("per-family", HostModel::PerFamily, 0x5eed_0001, 0.5);
}

#[test]
fn random_instances_unlimited_hosts() {
    run("unlimited", HostModel::Unlimited, 0x5eed_0002, 0.85);
}

#[test]
fn random_instances_uniform_hosts() {
    run(
        "uniform 12x48",
        HostModel::Uniform(Res::from_vcpu_gib(12.0, 48.0)),
        0x5eed_0003,
        0.6,
    );
}

#[test]
fn hand_made_instances() {
    let cat = catalogue();
    let cfg = PlanConfig::default();
    let cost = |p: &Option<nestless_planner::Placement>| p.as_ref().map(|p| p.cost(&cat));
    let _ = config;
    // One pod, five containers of 1 vCPU / 4 GiB (5 vCPU, 20 GiB): (a) m.2xlarge 0.384.
    let cl = client(&[vec![(1.0, 4.0); 5]]);
    let p = plan_client(&cl, &cat, &cfg);
    assert_eq!(cost(&p.whole), Some(384_000));
    // (b) on per-family hosts: the parts share one family, m.xlarge + m.large = 0.288;
    // with hosts that mix families, m.xlarge (4 x 1/4) + c.large (1/4) = 0.277.
    assert_eq!(cost(&p.hostlo), Some(288_000));
    assert_eq!(exact_hostlo(&cl, &cat, HostModel::PerFamily), Some(288_000));
    let p = plan_client(
        &cl,
        &cat,
        &PlanConfig {
            host: HostModel::Unlimited,
            ..cfg
        },
    );
    assert_eq!(cost(&p.hostlo), Some(277_000));
    assert_eq!(exact_hostlo(&cl, &cat, HostModel::Unlimited), Some(277_000));
    // A single-container pod: Hostlo cannot help.
    let cl = client(&[vec![(3.0, 3.0)]]);
    let p = plan_client(&cl, &cat, &cfg);
    assert_eq!(cost(&p.whole), cost(&p.hostlo));
    assert_eq!(cost(&p.whole), Some(170_000));
    // Two pods that fill one VM together: no saving.
    let cl = client(&[vec![(1.0, 4.0), (1.0, 4.0)], vec![(2.0, 8.0)]]);
    let p = plan_client(&cl, &cat, &cfg);
    assert_eq!(cost(&p.whole), Some(192_000));
    assert_eq!(cost(&p.hostlo), Some(192_000));
    // A pod larger than any VM: infeasible on per-family hosts of the largest type.
    let cl = client(&[vec![(6.0, 4.0), (6.0, 4.0)]]);
    let p = plan_client(&cl, &cat, &cfg);
    assert!(p.whole.is_none() && p.hostlo.is_none());
    // ... but Hostlo places it on a 16-vCPU uniform host: two c.2xlarge.
    let cfg_u = PlanConfig {
        host: HostModel::Uniform(Res::from_vcpu_gib(16.0, 64.0)),
        ..cfg
    };
    let p = plan_client(&cl, &cat, &cfg_u);
    assert!(p.whole.is_none());
    assert_eq!(cost(&p.hostlo), Some(680_000));
    assert_eq!(exact_hostlo(&cl, &cat, cfg_u.host), Some(680_000));
}
