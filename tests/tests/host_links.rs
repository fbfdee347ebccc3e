//! The agent's link seam ([`Netlink`]) against the real kernel, in a network
//! namespace of the test's own (root).

use std::{collections::HashSet, sync::Arc};

use nestless_netagent::links::{HostLinks, Netlink};

/// Runs `f` on a thread of its own inside a new network namespace, with a
/// tokio runtime of that thread: every link the test makes dies with the
/// namespace when the thread ends.
fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("unshare(CLONE_NEWNET) needs root: run the root suites as root");
        f()
    })
    .join()
    .expect("the test thread panicked")
}

/// Concurrent name lookups share dumps, yet each caller sees every link made
/// before it asked: the shared dump is never older than the question (a
/// NIC made just before an upkeep's presence check must not look gone).
#[test]
fn concurrent_name_lookups_share_dumps_and_see_every_earlier_link() {
    const CALLERS: usize = 40;
    let taken = in_new_netns(|| {
        with_links(async |links: Arc<Netlink>| {
            let mut tasks = Vec::new();
            for i in 0..CALLERS {
                let links = links.clone();
                tasks.push(tokio::spawn(async move {
                    let name = format!("nlstest{i}");
                    links.ensure_segment(&name, 1500).await.unwrap();
                    let seen: HashSet<String> = links.names("nlstest").await.unwrap();
                    assert!(
                        seen.contains(&name),
                        "{name} was made before its lookup, which did not see it: {seen:?}"
                    );
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            // All at once, polled together: the first starts a dump, the
            // rest arrived during it and share the next one.
            let before = links.name_dumps_taken();
            let answers =
                futures::future::join_all((0..CALLERS).map(|_| links.names("nlstest"))).await;
            for all in answers {
                assert_eq!(all.unwrap().len(), CALLERS);
            }
            links.name_dumps_taken() - before
        })
    });
    assert!(
        (1..=2).contains(&taken),
        "{CALLERS} lookups made at once took {taken} dumps (1 or 2 expected: one running, one shared)"
    );
}

/// Builds a current-thread runtime and a [`Netlink`] in the calling thread's
/// namespace, and runs `f` with it.
fn with_links<T>(f: impl AsyncFnOnce(Arc<Netlink>) -> T) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let links = Arc::new(Netlink::new("nestless-tests host_links").unwrap());
        f(links).await
    })
}

/// Veth pairs `a<i>` / `b<i>` in the test's namespace.
async fn veths(links: &Netlink, n: usize) {
    for i in 0..n {
        links
            .create_veth(
                &format!("a{i}"),
                &format!("b{i}"),
                nestless_model::MacAddr([0x02, 0, 0, 0, 0, i as u8]),
                1500,
                std::path::Path::new("/proc/thread-self/ns/net"),
            )
            .await
            .unwrap();
    }
}

/// Deletions asked for together are done together (one link group per
/// batch), and each caller gets its own answer: `true` for a link deleted,
/// `false` for one that did not exist; the veth peers go with them.
#[test]
fn concurrent_deletions_are_batched_and_each_gets_its_own_answer() {
    in_new_netns(|| {
        with_links(async |links: Arc<Netlink>| {
            veths(&links, 30).await;
            let mut names: Vec<String> = (0..30).map(|i| format!("a{i}")).collect();
            names.push("missing0".into());
            names.push("missing1".into());
            let answers = futures::future::join_all(names.iter().map(|n| links.delete(n))).await;
            for (n, a) in names.iter().zip(answers) {
                assert_eq!(a.unwrap(), !n.starts_with("missing"), "{n}");
            }
            let left = links.names("").await.unwrap();
            assert_eq!(left, HashSet::from(["lo".to_string()]), "peers go too");
            // One alone, then nothing left to delete.
            veths(&links, 1).await;
            assert!(links.delete("a0").await.unwrap());
            assert!(!links.delete("a0").await.unwrap());
        })
    });
}

/// A batch holding a link that cannot be deleted (the loopback device has
/// no `dellink`, so its group cannot be deleted whole) falls back to one
/// deletion per link: the others are deleted, only that one fails, and
/// its error names it.
#[test]
fn a_batch_with_an_undeletable_link_still_deletes_the_others() {
    in_new_netns(|| {
        with_links(async |links: Arc<Netlink>| {
            veths(&links, 5).await;
            let names = ["a0", "a1", "lo", "a2", "a3", "a4"];
            let answers = futures::future::join_all(names.iter().map(|n| links.delete(n))).await;
            for (n, a) in names.iter().zip(answers) {
                match (*n, a) {
                    ("lo", Err(e)) => assert!(e.to_string().contains("lo"), "{e}"),
                    ("lo", Ok(v)) => panic!("lo was deleted? {v}"),
                    (n, a) => assert!(a.unwrap(), "{n}"),
                }
            }
            let left = links.names("").await.unwrap();
            assert_eq!(left, HashSet::from(["lo".to_string()]));
        })
    });
}
