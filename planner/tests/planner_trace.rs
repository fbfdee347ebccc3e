//! The Google 2011 shards of `../shared/data` read whole: the counts the data README gives,
//! and no malformed row. The data lives beside the repository, not in it, so the test is
//! opt-in (`--ignored`); `tests/run.sh` runs it whenever the data is there, and says so when
//! it is not. `NESTLESS_DATA_DIR` names another copy of `shared/data`.
use std::path::PathBuf;

use nestless_planner::google::{load_google, GoogleOptions};

/// `NESTLESS_DATA_DIR`, a relative one taken from the workspace root (where
/// `tests/run.sh` and CI run cargo; the tests themselves run in `planner/`), or
/// `../shared/data` beside the workspace.
fn data_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    match std::env::var_os("NESTLESS_DATA_DIR").map(PathBuf::from) {
        Some(p) if p.is_absolute() => p,
        Some(p) => root.join(p),
        None => root.join("../shared/data"),
    }
}

#[test]
#[ignore = "needs ../shared/data (the Google 2011 shards); tests/run.sh runs it when present"]
fn four_shards_match_the_data_readme() {
    let data = data_dir();
    let dir = data.join("traces/google2011");
    assert!(dir.is_dir(), "{} is missing", dir.display());
    let (clients, st) = load_google(&[dir], GoogleOptions::default()).expect("the shards parse");
    assert_eq!(st.rows, 803_964);
    assert_eq!(st.tasks, 274_536);
    assert_eq!(st.kept_tasks, 274_536);
    assert_eq!(st.no_request, 0);
    // Tasks running before the trace starts have no request on their SUBMIT row.
    assert_eq!(st.fallback_request, 268);
    assert_eq!(clients.len(), 530);
    let jobs: usize = clients.iter().map(|c| c.pods.len()).sum();
    assert_eq!(jobs, 8_464);
}

/// The four shards planned with the default model and certified bounds: every plan valid,
/// every bound at most its plan's cost, single-container clients never saving, and most
/// plans proven optimal. The exact part runs under a time limit (1 s per client here), so
/// the proven counts depend on the machine: the thresholds are far below what a release
/// build reaches (`docs/hostlo-cost.md`).
#[test]
#[ignore = "needs ../shared/data (the Google 2011 shards); tests/run.sh runs it when present"]
fn four_shards_planned_with_certified_bounds() {
    use nestless_planner::catalogue::{load_catalogue, FamilyFilter};
    use nestless_planner::report::{client_row, summarise, Verdict};
    use nestless_planner::setcover::Limits;
    use nestless_planner::{plan_all, validate, Mode, PlanConfig};
    let data = data_dir();
    let (cat, _) = load_catalogue(
        &data.join("prices/aws_ec2_instances_us-east-1.csv"),
        &FamilyFilter::parse("m5,c5,r5").unwrap(),
    )
    .unwrap();
    let (clients, _) =
        load_google(&[data.join("traces/google2011")], GoogleOptions::default()).unwrap();
    // No run-wide budget: how many clients the exact part reaches must not
    // depend on how loaded the machine is (the floors below count them).
    let cfg = PlanConfig {
        exact: Some(Limits::per_client(1.0)),
        exact_budget: None,
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    let plans = plan_all(&clients, &cat, &cfg, 2);
    let secs = t0.elapsed().as_secs_f64();
    let mut rows = Vec::new();
    for (c, p) in clients.iter().zip(&plans) {
        if let Some(a) = &p.whole {
            validate(c, &cat, cfg.host, Mode::Whole, a).unwrap();
            assert!(p.bound_whole <= a.cost(&cat), "{}", c.name);
        }
        if let Some(b) = &p.hostlo {
            validate(c, &cat, cfg.host, Mode::Hostlo, b).unwrap();
            assert!(p.bound_hostlo <= b.cost(&cat), "{}", c.name);
        }
        if let (Some(a), Some(b)) = (&p.whole, &p.hostlo) {
            assert!(b.cost(&cat) <= a.cost(&cat), "{}", c.name);
        }
        let row = client_row(c, p, &cat);
        if c.pods.iter().all(|p| p.containers.len() == 1) {
            assert_eq!(row.verdict, Verdict::SingleContainer);
            assert_eq!(row.cost_whole, row.cost_hostlo);
        }
        rows.push(row);
    }
    let s = summarise(&rows);
    eprintln!(
        "planned in {secs:.1} s: {} planned, {} save, {} undecided; (a) proven {}, (b) proven {}",
        s.planned, s.with_saving, s.undecided, s.gap_whole.optimal, s.gap_hostlo.optimal
    );
    assert_eq!((s.clients, s.planned, s.infeasible), (530, 424, 106));
    assert_eq!(s.single_container, 234);
    assert!(
        s.gap_whole.optimal >= 350,
        "(a) proven for {}",
        s.gap_whole.optimal
    );
    assert!(
        s.gap_hostlo.optimal >= 300,
        "(b) proven for {}",
        s.gap_hostlo.optimal
    );
    assert!(s.with_saving >= 50 && s.with_saving <= 100);
}
