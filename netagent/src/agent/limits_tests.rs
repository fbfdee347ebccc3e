//! Limits that requests and the config can reach together, each an error
//! of the request that meets it, never a hang or a panic of the agent.

use std::{path::Path, sync::Arc};

use super::{
    rig::{backends, req},
    Agent,
};
use crate::{backend::fake::FakeQemu, config::Config, error::AgentError, links::fake::FakeLinks};

/// `mac_prefix` of 5 bytes leaves 256 MACs: the 257th NIC is refused with
/// RESOURCE_EXHAUSTED, without a lease or a device left behind (the MAC
/// search used to loop for ever, holding the record store's lock).
#[tokio::test]
async fn a_full_mac_prefix_is_refused_not_searched_for_ever() {
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .unwrap();
    let cfg = Config::parse(
        Path::new("t.toml"),
        &format!(
            r#"
            [agent]
            state_dir = "{}"
            mac_prefix = "52:54:00:12:34"
            [[network]]
            name = "n"
            bridge = "br0"
            subnet = "10.9.0.0/16"
            gateway = "10.9.0.1"
            [[vm]]
            name = "vm1"
            backend = "qemu"
            qmp_socket = "/q1"
            cid = 3
            max_nics = 300
            "#,
            dir.path().display()
        ),
    )
    .unwrap();
    let links = Arc::new(FakeLinks::default());
    let q = Arc::new(FakeQemu::new(300));
    let agent =
        Agent::with_backends(cfg, links.clone(), backends(&links, &[("vm1", q.clone())])).unwrap();
    for i in 0..256 {
        agent.attach("vm1", req(&format!("sb{i}"))).await.unwrap();
    }
    let e = agent.attach("vm1", req("one-more")).await.unwrap_err();
    assert!(matches!(e, AgentError::NoFreeMac { .. }), "{e}");
    assert_eq!(e.code(), ttrpc::Code::RESOURCE_EXHAUSTED);
    assert!(e.to_string().contains("52:54:00:12:34"), "{e}");
    assert_eq!(agent.records.leased("n"), 256, "no lease taken for it");
    assert_eq!(q.devices.lock().unwrap().len(), 256);
}

/// Issue 11, item 7: a listing pages by NIC id. Removals between pages
/// (of NICs already listed, and of NICs not yet listed) and additions make
/// no remaining NIC skipped or repeated; the last page says so.
#[tokio::test]
async fn pages_skip_and_repeat_nothing_across_removals() {
    use std::collections::BTreeSet;

    use crate::agent::NicSelector;
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::parse(
        Path::new("t.toml"),
        &format!(
            "[agent]\nstate_dir = \"{}\"\n[[network]]\nname = \"n\"\nbridge = \"br0\"\nsubnet = \"10.9.0.0/24\"\ngateway = \"10.9.0.1\"\n[[vm]]\nname = \"vm1\"\nbackend = \"qemu\"\nqmp_socket = \"/q1\"\ncid = 3\nmax_nics = 64\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let links = Arc::new(FakeLinks::default());
    let q = Arc::new(FakeQemu::new(64));
    let agent = Agent::with_backends(cfg, links.clone(), backends(&links, &[("vm1", q)])).unwrap();
    for i in 0..40 {
        agent.attach("vm1", req(&format!("sb{i}"))).await.unwrap();
    }
    let all: Vec<_> = agent.records(None).into_iter().map(|r| r.id).collect();
    let (first, more) = agent.records_page(Some("vm1"), None, 10, |_| true);
    assert!(more);
    assert_eq!(
        first.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
        all[..10]
    );
    // Between pages: one listed NIC and one not yet listed go, one comes.
    let gone_listed = first[3].id.clone();
    let gone_later = all[25].clone();
    for id in [&gone_listed, &gone_later] {
        agent
            .detach("vm1", NicSelector::Id(id.clone()))
            .await
            .unwrap();
    }
    let added = agent.attach("vm1", req("late")).await.unwrap().record.id;
    let mut seen: Vec<_> = first.iter().map(|r| r.id.clone()).collect();
    let mut after = first.last().map(|r| r.id.clone());
    let mut pages = 1;
    loop {
        let (page, more) = agent.records_page(Some("vm1"), after.as_ref(), 10, |_| true);
        pages += 1;
        seen.extend(page.iter().map(|r| r.id.clone()));
        if !more {
            break;
        }
        after = page.last().map(|r| r.id.clone());
    }
    let unique: BTreeSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "a NIC listed twice");
    let want: BTreeSet<_> = all
        .iter()
        .filter(|id| **id != gone_later)
        .cloned()
        .collect();
    let missing: Vec<_> = want.difference(&unique).collect();
    assert!(missing.is_empty(), "skipped: {missing:?}");
    assert!(!unique.contains(&gone_later));
    // The added NIC is listed if its id sorts after the page it came during.
    assert_eq!(
        unique.contains(&added),
        Some(&added) > first.last().map(|r| &r.id)
    );
    assert!((4..=6).contains(&pages), "{pages} pages");
    // A page of exactly the rest says there is no more.
    let (rest, more) = agent.records_page(Some("vm1"), None, 100, |_| true);
    assert!(!more && rest.len() == 39, "{}", rest.len());
    // Another VM's NICs: none.
    assert!(agent
        .records_page(Some("vm2"), None, 10, |_| true)
        .0
        .is_empty());
}
