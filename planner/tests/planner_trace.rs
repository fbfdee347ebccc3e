//! The Google 2011 shards of `../shared/data` read whole: the counts the data README gives,
//! and no malformed row. The data lives beside the repository, not in it, so the test is
//! opt-in (`--ignored`); `tests/run.sh` runs it whenever the data is there, and says so when
//! it is not. `NESTLESS_DATA_DIR` names another copy of `shared/data`.
use std::path::PathBuf;

use nestless_planner::google::{load_google, GoogleOptions};

#[test]
#[ignore = "needs ../shared/data (the Google 2011 shards); tests/run.sh runs it when present"]
fn four_shards_match_the_data_readme() {
    let data = std::env::var_os("NESTLESS_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"));
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
