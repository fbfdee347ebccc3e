//! The exact part's work is bounded whatever the input (issue 14, point 4: 10^6 containers
//! in under a minute). Before these limits, every client with many item classes ran the
//! column generation to its wall-clock limit (a dual LP of `classes × types` rows per
//! round), and a run of 27,000 generated clients spent about 2,000 thread-seconds there.
//! The assertions are on work counts, never on elapsed time.
use std::time::Duration;

use nestless_planner::bound::lp_bound;
use nestless_planner::model::group_clients;
use nestless_planner::plan::{plan_all_stats, undominated, usable_types};
use nestless_planner::setcover::{self, Instance, IntSolution, Limits, Pattern};
use nestless_planner::{validate, Catalogue, Client, HostModel, Mode, PlanConfig, Res, VmType};

/// m, c and r shapes (4, 2 and 8 GiB per vCPU), 2 to 32 vCPU, us-east-1 prices.
fn catalogue() -> Catalogue {
    let mut types = Vec::new();
    for (fam, gib_per_vcpu, usd_per_large) in [("m", 4, 0.096), ("c", 2, 0.085), ("r", 8, 0.126)] {
        for (k, size) in ["large", "xlarge", "2xlarge", "4xlarge", "8xlarge"]
            .iter()
            .enumerate()
        {
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

/// `n` containers of `n` different sizes (so `n` classes), deterministic.
fn distinct_sizes(n: usize) -> Vec<Res> {
    (0..n)
        .map(|i| Res::new(100 + 37 * i as u64 % 1900, 256 + 211 * i as u64 % 7000))
        .collect()
}

/// A client with one pod of 600 containers of distinct sizes, as the generated set of the
/// benchmark has: with an hour per plan, the exact part must not even start (before, its
/// column generation ran up to 200 rounds of an LP of ~9,000 rows: tens of minutes).
#[test]
fn an_instance_with_more_classes_than_the_limit_is_not_searched() {
    let cat = catalogue();
    let sizes = distinct_sizes(600);
    let types = undominated(&cat, &usable_types(&cat, HostModel::PerFamily));
    let inst = Instance {
        sizes: sizes.clone(),
        options: vec![types.clone()],
        free: vec![1; sizes.len()],
        linked: Vec::new(),
    };
    // The start: one VM per item, each of the cheapest type that holds it.
    let vms: Vec<(Pattern, u64)> = sizes
        .iter()
        .enumerate()
        .map(|(k, &s)| {
            let ty = cat.cheapest_fitting(s, &types).expect("fits");
            (
                Pattern {
                    opt: 0,
                    ty,
                    counts: vec![(k, 1)],
                },
                1,
            )
        })
        .collect();
    let cost = vms.iter().map(|(p, _)| cat.types()[p.ty].price).sum();
    let start = IntSolution {
        vms,
        members: Vec::new(),
        cost,
    };
    let limits = Limits::per_client(7200.0);
    assert!(sizes.len() > limits.max_classes);
    let out = setcover::solve(&inst, &cat, Some(&start), limits);
    assert_eq!(out.rounds, 0, "no column generation round");
    assert!(out.solution.is_none());
    assert_eq!(
        out.lower_bound, 0,
        "no bound claimed: the demand bound stands"
    );

    // At the limit, the same kind of instance is searched.
    let small = Instance {
        sizes: sizes[..limits.max_classes].to_vec(),
        options: vec![types],
        free: vec![1; limits.max_classes],
        linked: Vec::new(),
    };
    let out = setcover::solve(&small, &cat, None, Limits::default());
    assert!(out.rounds > 0);
}

/// Clients of the benchmark's shape: pods of identical containers, some with two shapes.
fn clients(n: usize) -> Vec<Client> {
    let mut rows = Vec::new();
    for c in 0..n {
        for p in 0..(1 + c % 4) {
            let vcpu = 0.25 * (1 + (c * 7 + p * 3) % 11) as f64;
            let gib = vcpu * (1 + (c + p) % 7) as f64;
            for t in 0..(1 + (c * 5 + p) % 6) {
                let (v, g) = if t % 3 == 2 {
                    (vcpu / 2.0, gib)
                } else {
                    (vcpu, gib)
                };
                rows.push((
                    format!("client{c}"),
                    format!("job{p}"),
                    t.to_string(),
                    Res::from_vcpu_gib(v, g),
                ));
            }
        }
    }
    group_clients(rows)
}

/// With a run-wide budget of zero, `plan_all` runs no exact part at all, however long
/// the per-client limit (an hour here: before the budget, 40 clients could take 40 hours):
/// every client keeps the heuristic's plans and the demand bound, and the plans are valid.
/// Without a budget (and a second per client) every client gets the exact part, and its
/// bounds are never lower.
#[test]
fn the_run_budget_bounds_the_exact_part() {
    let cat = catalogue();
    let cl = clients(40);
    let mut cfg = PlanConfig {
        exact: Some(Limits::per_client(7200.0)),
        exact_budget: Some(Duration::ZERO),
        ..Default::default()
    };
    let (spent, stats) = plan_all_stats(&cl, &cat, &cfg, 2);
    assert_eq!(stats.exact_clients, 0);
    assert_eq!(stats.out_of_budget, cl.len());
    for (c, p) in cl.iter().zip(&spent) {
        let a = p.whole.as_ref().expect("every pod fits");
        let b = p.hostlo.as_ref().expect("every pod fits");
        validate(c, &cat, cfg.host, Mode::Whole, a).expect("valid (a)");
        validate(c, &cat, cfg.host, Mode::Hostlo, b).expect("valid (b)");
        // Only the demand bound (capped by the plan).
        let lb = lp_bound(c.demand(), &cat);
        let demand = (lb * (1.0 - 1e-9) - 1e-6).ceil().max(0.0) as u64;
        assert_eq!(p.bound_whole, demand.min(a.cost(&cat)).max(p.bound_hostlo));
        assert_eq!(p.bound_hostlo, demand.min(b.cost(&cat)));
        assert!(
            b.cost(&cat) <= a.cost(&cat),
            "(b) never costs more than (a)"
        );
    }

    cfg.exact = Some(Limits::per_client(1.0));
    cfg.exact_budget = None;
    let (full, stats) = plan_all_stats(&cl, &cat, &cfg, 2);
    assert_eq!(stats.exact_clients, cl.len());
    assert_eq!(stats.out_of_budget, 0);
    for ((c, p), q) in cl.iter().zip(&full).zip(&spent) {
        let a = p.whole.as_ref().expect("every pod fits");
        let b = p.hostlo.as_ref().expect("every pod fits");
        validate(c, &cat, cfg.host, Mode::Whole, a).expect("valid (a)");
        validate(c, &cat, cfg.host, Mode::Hostlo, b).expect("valid (b)");
        assert!(p.bound_whole >= q.bound_whole && p.bound_hostlo >= q.bound_hostlo);
        assert!(p.bound_whole <= a.cost(&cat) && p.bound_hostlo <= b.cost(&cat));
        assert!(a.cost(&cat) <= q.whole.as_ref().expect("fits").cost(&cat));
        assert!(b.cost(&cat) <= a.cost(&cat));
    }
}
