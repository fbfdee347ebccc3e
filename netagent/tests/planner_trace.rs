//! The Google 2011 shards of `../shared/data` read whole: the counts the data README gives,
//! and no malformed row.
use std::path::PathBuf;

use nestless_netagent::planner::google::{load_google, GoogleOptions};

#[test]
fn four_shards_match_the_data_readme() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/traces/google2011");
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
