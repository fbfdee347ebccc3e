//! Exact optima by exhaustive search, for small clients. They check the heuristic in
//! tests; they are exponential and refuse larger inputs.
//!
//! - (a): dynamic programme over subsets of pods; a block of pods costs the cheapest type
//!   that holds it; `best[S] = min over blocks T ⊆ S holding S's first pod of
//!   cost(T) + best[S \ T]`.
//! - (b): the same programme over subsets of pods, where a block is a host group and costs
//!   the cheapest way to put its containers on VMs of one host: every partition of the
//!   containers into VMs and every type choice per VM, under the host bound (depth-first
//!   search with cost pruning), for each host option.
use super::model::{Catalogue, Client, HostModel, Res};

/// Largest number of pods the exact search accepts.
pub const MAX_PODS: usize = 12;
/// Largest number of containers the exact (b) search accepts.
pub const MAX_CONTAINERS: usize = 10;

/// Exact cost of plan (a), or `None` if a pod fits no type that fits a host. Panics
/// above [`MAX_PODS`].
pub fn exact_whole(client: &Client, cat: &Catalogue, host: HostModel) -> Option<u64> {
    let n = client.pods.len();
    assert!(n <= MAX_PODS, "exact search is for at most {MAX_PODS} pods");
    let all = super::plan::usable_types(cat, host);
    let demands: Vec<Res> = client.pods.iter().map(|p| p.demand()).collect();
    let block = |mask: usize| {
        let load = (0..n)
            .filter(|i| mask & (1 << i) != 0)
            .fold(Res::default(), |a, i| a.plus(demands[i]));
        cat.cheapest_fitting(load, &all)
            .map(|t| cat.types()[t].price)
    };
    partition_dp(n, block)
}

/// Exact cost of plan (b) under `host`, or `None` if a pod fits no host. Panics above
/// [`MAX_PODS`] pods or [`MAX_CONTAINERS`] containers.
pub fn exact_hostlo(client: &Client, cat: &Catalogue, host: HostModel) -> Option<u64> {
    let n = client.pods.len();
    assert!(n <= MAX_PODS, "exact search is for at most {MAX_PODS} pods");
    assert!(
        client.container_count() <= MAX_CONTAINERS,
        "exact search is for at most {MAX_CONTAINERS} containers"
    );
    let options: Vec<(Vec<usize>, Option<Res>)> = match host {
        HostModel::PerFamily => (0..cat.families().len())
            .map(|f| (cat.of_family(f), Some(cat.family_host(f))))
            .collect(),
        HostModel::Uniform(h) => vec![(super::plan::usable_types(cat, host), Some(h))],
        HostModel::Unlimited => vec![(cat.all(), None)],
    };
    let block = |mask: usize| {
        let items: Vec<Res> = (0..n)
            .filter(|i| mask & (1 << i) != 0)
            .flat_map(|i| client.pods[i].containers.iter().map(|c| c.req))
            .collect();
        options
            .iter()
            .filter_map(|(types, bound)| one_host(&items, types, *bound, cat))
            .min()
    };
    partition_dp(n, block)
}

/// `min over set partitions of {0..n} of Σ block(B)`, `None` if no partition is finite.
fn partition_dp(n: usize, block: impl Fn(usize) -> Option<u64>) -> Option<u64> {
    let full = (1usize << n) - 1;
    let costs: Vec<Option<u64>> = (0..=full)
        .map(|m| if m == 0 { Some(0) } else { block(m) })
        .collect();
    let mut best: Vec<Option<u64>> = vec![None; full + 1];
    best[0] = Some(0);
    for s in 1..=full {
        let low = s & s.wrapping_neg();
        let rest = s & !low;
        // Enumerate sub-masks t of `rest`; the block is t | low.
        let mut t = rest;
        let mut acc: Option<u64> = None;
        loop {
            let blockm = t | low;
            if let (Some(c), Some(b)) = (costs[blockm], best[s & !blockm]) {
                acc = Some(acc.map_or(c + b, |a| a.min(c + b)));
            }
            if t == 0 {
                break;
            }
            t = (t - 1) & rest;
        }
        best[s] = acc;
    }
    best[full]
}

/// Cheapest way to put `items` on VMs of `types` whose summed capacity is within `bound`.
fn one_host(items: &[Res], types: &[usize], bound: Option<Res>, cat: &Catalogue) -> Option<u64> {
    let n = items.len();
    if n == 0 {
        return Some(0);
    }
    let full = (1usize << n) - 1;
    let loads: Vec<Res> = (0..=full)
        .map(|m| {
            (0..n)
                .filter(|i| m & (1 << i) != 0)
                .fold(Res::default(), |a, i| a.plus(items[i]))
        })
        .collect();
    match bound {
        None => partition_dp(n, |m| {
            cat.cheapest_fitting(loads[m], types)
                .map(|t| cat.types()[t].price)
        }),
        Some(b) => {
            let fitting: Vec<Vec<usize>> = loads
                .iter()
                .map(|&l| {
                    types
                        .iter()
                        .copied()
                        .filter(|&t| l.fits_in(cat.types()[t].cap))
                        .collect()
                })
                .collect();
            let mut best: Option<u64> = None;
            dfs(full, b, 0, &fitting, cat, &mut best);
            best
        }
    }
}

fn dfs(
    rem: usize,
    room: Res,
    cost: u64,
    fitting: &[Vec<usize>],
    cat: &Catalogue,
    best: &mut Option<u64>,
) {
    if best.is_some_and(|b| cost >= b) {
        return;
    }
    if rem == 0 {
        *best = Some(cost);
        return;
    }
    let low = rem & rem.wrapping_neg();
    let rest = rem & !low;
    let mut t = rest;
    loop {
        let blockm = t | low;
        for &ty in &fitting[blockm] {
            let cap = cat.types()[ty].cap;
            if cap.fits_in(room) {
                dfs(
                    rem & !blockm,
                    room.saturating_sub(cap),
                    cost + cat.types()[ty].price,
                    fitting,
                    cat,
                    best,
                );
            }
        }
        if t == 0 {
            break;
        }
        t = (t - 1) & rest;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{group_clients, VmType};

    fn cat() -> Catalogue {
        let t = |n: &str, f: &str, c: u64, m: u64, p: u64| VmType {
            name: n.into(),
            family: f.into(),
            cap: Res::new(c, m),
            price: p,
        };
        Catalogue::new(vec![
            t("m1", "m", 2, 8, 10),
            t("m2", "m", 4, 16, 20),
            t("m4", "m", 8, 32, 40),
        ])
    }

    fn client(pods: &[&[(u64, u64)]]) -> Client {
        let mut rows = Vec::new();
        for (p, cs) in pods.iter().enumerate() {
            for (c, &(cpu, mem)) in cs.iter().enumerate() {
                rows.push((
                    "u".to_string(),
                    p.to_string(),
                    c.to_string(),
                    Res::new(cpu, mem),
                ));
            }
        }
        group_clients(rows).remove(0)
    }

    #[test]
    fn hand_made_cases() {
        let c = cat();
        // One pod of five 1-CPU containers: (a) m4 = 40; (b) m2 + m1 = 30.
        let cl = client(&[&[(1, 1); 5]]);
        assert_eq!(exact_whole(&cl, &c, HostModel::PerFamily), Some(40));
        assert_eq!(exact_hostlo(&cl, &c, HostModel::PerFamily), Some(30));
        // Two pods of 3 CPUs: (a) two m2 or one m4 = 40; (b) the same (each part rounds up).
        let cl = client(&[&[(3, 1)], &[(3, 1)]]);
        assert_eq!(exact_whole(&cl, &c, HostModel::PerFamily), Some(40));
        assert_eq!(exact_hostlo(&cl, &c, HostModel::PerFamily), Some(40));
        // A pod of 9 CPUs in three containers fits no VM but fits an 12-CPU uniform host.
        let cl = client(&[&[(3, 1), (3, 1), (3, 1)]]);
        assert_eq!(exact_whole(&cl, &c, HostModel::PerFamily), None);
        assert_eq!(exact_hostlo(&cl, &c, HostModel::PerFamily), None);
        assert_eq!(
            exact_hostlo(&cl, &c, HostModel::Uniform(Res::new(12, 48))),
            Some(60)
        );
        assert_eq!(
            exact_hostlo(&cl, &c, HostModel::Uniform(Res::new(11, 48))),
            None
        );
    }
}
