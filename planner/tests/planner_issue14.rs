//! The cases of issue 14 that concern the plans, with the right values: AWS us-east-1
//! prices of m5, c5 and r5 (the rows of `../shared/data/prices/`, copied here as numbers so
//! that the test needs no data directory).
use std::path::Path;

use nestless_planner::catalogue::{parse_catalogue, FamilyFilter};
use nestless_planner::model::group_clients;
use nestless_planner::report::{client_row, Verdict};
use nestless_planner::setcover::Limits;
use nestless_planner::{
    plan_client, validate, Catalogue, Client, HostModel, Mode, PlanConfig, Res,
};

const PRICES: &str = "name,class,vcpu,memory,price
c5.large,c5,2,4,0.085
c5.xlarge,c5,4,8,0.17
c5.2xlarge,c5,8,16,0.34
c5.4xlarge,c5,16,32,0.68
c5.9xlarge,c5,36,72,1.53
c5.12xlarge,c5,48,96,2.04
c5.18xlarge,c5,72,144,3.06
c5.24xlarge,c5,96,192,4.08
c5.metal,c5,96,192,4.08
m5.large,m5,2,8,0.096
m5.xlarge,m5,4,16,0.192
m5.2xlarge,m5,8,32,0.384
m5.4xlarge,m5,16,64,0.768
m5.8xlarge,m5,32,128,1.536
m5.12xlarge,m5,48,192,2.304
m5.16xlarge,m5,64,256,3.072
m5.24xlarge,m5,96,384,4.608
m5.metal,m5,96,384,4.608
r5.large,r5,2,16,0.126
r5.xlarge,r5,4,32,0.252
r5.2xlarge,r5,8,64,0.504
r5.4xlarge,r5,16,128,1.008
r5.8xlarge,r5,32,256,2.016
r5.12xlarge,r5,48,384,3.024
r5.16xlarge,r5,64,512,4.032
r5.24xlarge,r5,96,768,6.048
r5.metal,r5,96,768,6.048
";

fn catalogue(families: &str) -> Catalogue {
    parse_catalogue(
        PRICES.as_bytes(),
        Path::new("prices.csv"),
        &FamilyFilter::parse(families).unwrap(),
    )
    .unwrap()
    .0
}

/// The default model with a generous time limit: a debug build runs the MILP solver far
/// slower than a release build, and these values must be proven, not just found.
fn config() -> PlanConfig {
    PlanConfig {
        exact: Some(Limits::per_client(20.0)),
        ..Default::default()
    }
}

/// A client from pods of (vCPU, GiB) containers.
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

/// Case 1: nine single-container pods. The optimum is $0.96/h for both plans
/// (m5.4xlarge + m5.xlarge, exactly full): no saving exists, and none is reported.
#[test]
fn nine_single_container_pods_have_no_saving() {
    let cat = catalogue("m5,c5,r5");
    let cl = client(&[
        vec![(1.0, 7.0)],
        vec![(6.0, 2.0)],
        vec![(4.0, 16.0)],
        vec![(2.0, 8.2)],
        vec![(0.5, 12.0)],
        vec![(0.5, 12.0)],
        vec![(0.5, 12.0)],
        vec![(4.0, 2.0)],
        vec![(1.0, 7.0)],
    ]);
    let cfg = config();
    let plan = plan_client(&cl, &cat, &cfg);
    let (a, b) = (plan.whole.clone().unwrap(), plan.hostlo.clone().unwrap());
    validate(&cl, &cat, cfg.host, Mode::Whole, &a).unwrap();
    validate(&cl, &cat, cfg.host, Mode::Hostlo, &b).unwrap();
    assert_eq!(a.cost(&cat), 960_000);
    assert_eq!(b.cost(&cat), 960_000);
    // Proven optimal: the bounds meet the costs.
    assert_eq!((plan.bound_whole, plan.bound_hostlo), (960_000, 960_000));
    let row = client_row(&cl, &plan, &cat);
    assert_eq!(row.verdict, Verdict::SingleContainer);
    assert_eq!(row.saving_pct, Some(0.0));
    assert_eq!(row.gap_whole_pct, Some(0.0));
}

/// Case 2: one pod of 11 containers of (0.5 vCPU, 8.2 GiB) on r5 only: (a) r5.4xlarge
/// $1.008/h, (b) r5.2xlarge + r5.xlarge + r5.large $0.882/h, a proven 12.5 % saving.
#[test]
fn eleven_memory_containers_save_twelve_and_a_half_percent() {
    let cat = catalogue("r5");
    let cl = client(&[vec![(0.5, 8.2); 11]]);
    let cfg = config();
    let plan = plan_client(&cl, &cat, &cfg);
    let (a, b) = (plan.whole.clone().unwrap(), plan.hostlo.clone().unwrap());
    validate(&cl, &cat, cfg.host, Mode::Whole, &a).unwrap();
    validate(&cl, &cat, cfg.host, Mode::Hostlo, &b).unwrap();
    assert_eq!(a.cost(&cat), 1_008_000);
    assert_eq!(b.cost(&cat), 882_000);
    assert_eq!((plan.bound_whole, plan.bound_hostlo), (1_008_000, 882_000));
    let row = client_row(&cl, &plan, &cat);
    assert_eq!(row.verdict, Verdict::Saves);
    assert!((row.saving_pct.unwrap() - 12.5).abs() < 1e-9);
    let mut types: Vec<&str> = b
        .vms
        .iter()
        .map(|v| cat.types()[v.ty].name.as_str())
        .collect();
    types.sort();
    assert_eq!(types, ["r5.2xlarge", "r5.large", "r5.xlarge"]);
    // The same with all three families: c5/m5 cannot beat r5 on memory.
    let plan = plan_client(&cl, &catalogue("m5,c5,r5"), &cfg);
    assert_eq!(plan.hostlo.unwrap().cost(&catalogue("m5,c5,r5")), 882_000);
    // And with unlimited hosts.
    let plan = plan_client(
        &cl,
        &cat,
        &PlanConfig {
            host: HostModel::Unlimited,
            ..cfg
        },
    );
    assert_eq!(plan.hostlo.unwrap().cost(&cat), 882_000);
    assert_eq!(plan.bound_hostlo, 882_000);
}

/// Issue 14, item 5: no fixed ceiling below 50 % on a saving. c5 jumps from 16 to 36
/// vCPU: a pod of 17 containers of (1 vCPU, 1 GiB) needs c5.9xlarge ($1.53/h) in one VM,
/// but c5.4xlarge + c5.large ($0.765/h) with Hostlo: exactly 50 %, proven.
#[test]
fn a_missing_size_makes_the_saving_reach_fifty_percent() {
    let cat = catalogue("m5,c5,r5");
    let cl = client(&[vec![(1.0, 1.0); 17]]);
    let plan = plan_client(&cl, &cat, &config());
    let (a, b) = (plan.whole.clone().unwrap(), plan.hostlo.clone().unwrap());
    assert_eq!(a.cost(&cat), 1_530_000);
    assert_eq!(b.cost(&cat), 765_000);
    assert_eq!((plan.bound_whole, plan.bound_hostlo), (1_530_000, 765_000));
    let row = client_row(&cl, &plan, &cat);
    assert_eq!(row.verdict, Verdict::Saves);
    assert!((row.saving_pct.unwrap() - 50.0).abs() < 1e-9);
}
