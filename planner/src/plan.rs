//! Per-client plans: (a) every pod within one VM, (b) Hostlo, a pod may span VMs of one
//! host.
//!
//! (a) packs pods (their summed request) with [`Packer`] over every type of the catalogue.
//!
//! (b) packs containers. VMs are kept in *host groups*, each of which must fit one host
//! (on a per-family host: one family, summed capacity at most the family's largest type);
//! a pod lies within one group and may span its VMs. Starts:
//! - S1, the plan (a), each VM its own group (always feasible for (b), so (b) never costs
//!   more than (a));
//! - S2, for each host option: pods first-fit into hosts, then each host's containers
//!   packed with [`Packer`] under the host bound (or its pods packed whole, if cheaper).
//!
//! The cheapest start is improved by re-packing each group's containers (*split*: this is
//! where a pod stops forcing a bigger VM) and by re-packing pairs of wasteful groups
//! together (*merge*), for every host option, keeping a change only if it is cheaper.
use super::bound::lp_bound;
use super::model::{Catalogue, Client, HostModel, ItemRef, Placement, Res, Vm};
use super::pack::{Bin, Packer, SearchOptions};

/// Configuration of a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanConfig {
    /// Where the VMs of a spanning pod must live.
    pub host: HostModel,
    /// Search tunables.
    pub search: SearchOptions,
}

impl Default for PlanConfig {
    fn default() -> Self {
        Self {
            host: HostModel::PerFamily,
            search: SearchOptions::default(),
        }
    }
}

/// The two plans of one client and the lower bound.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientPlan {
    /// Plan (a); `None` when a pod fits no VM type.
    pub whole: Option<Placement>,
    /// Plan (b); `None` when a pod fits no host.
    pub hostlo: Option<Placement>,
    /// LP lower bound on either plan, micro-dollars per hour.
    pub lower_bound: f64,
}

/// Containers of a client flattened into items.
struct Flat {
    items: Vec<Res>,
    refs: Vec<ItemRef>,
    pod_items: Vec<Vec<usize>>,
    pod_demand: Vec<Res>,
}

impl Flat {
    fn new(client: &Client) -> Self {
        let mut f = Flat {
            items: Vec::new(),
            refs: Vec::new(),
            pod_items: Vec::new(),
            pod_demand: Vec::new(),
        };
        for (p, pod) in client.pods.iter().enumerate() {
            let mut ids = Vec::new();
            for (c, ct) in pod.containers.iter().enumerate() {
                ids.push(f.items.len());
                f.items.push(ct.req);
                f.refs.push(ItemRef {
                    pod: p as u32,
                    container: c as u32,
                });
            }
            f.pod_items.push(ids);
            f.pod_demand.push(pod.demand());
        }
        f
    }
}

/// Plans one client: (a), (b) and the bound.
pub fn plan_client(client: &Client, cat: &Catalogue, cfg: &PlanConfig) -> ClientPlan {
    let flat = Flat::new(client);
    let whole = plan_whole_flat(&flat, cat, cfg);
    let hostlo = plan_hostlo_flat(&flat, cat, cfg, whole.as_ref());
    ClientPlan {
        whole: whole.map(|p| to_placement(&p, &flat)),
        hostlo: hostlo.map(|g| to_placement(&g, &flat)),
        lower_bound: lp_bound(client.demand(), cat),
    }
}

/// Plan (a) alone.
pub fn plan_whole(client: &Client, cat: &Catalogue, cfg: &PlanConfig) -> Option<Placement> {
    let flat = Flat::new(client);
    plan_whole_flat(&flat, cat, cfg).map(|p| to_placement(&p, &flat))
}

/// Plans clients on `threads` threads, largest clients first; results in input order.
pub fn plan_all(
    clients: &[Client],
    cat: &Catalogue,
    cfg: &PlanConfig,
    threads: usize,
) -> Vec<ClientPlan> {
    let mut order: Vec<usize> = (0..clients.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(clients[i].container_count()));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: std::sync::Mutex<Vec<Option<ClientPlan>>> =
        std::sync::Mutex::new(vec![None; clients.len()]);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&i) = order.get(k) else { break };
                let plan = plan_client(&clients[i], cat, cfg);
                results.lock().expect("no panic while holding the lock")[i] = Some(plan);
            });
        }
    });
    results
        .into_inner()
        .expect("threads joined")
        .into_iter()
        .map(|p| p.expect("every client planned"))
        .collect()
}

/// A plan as host groups of bins whose items are container indices.
#[derive(Clone, Debug)]
struct Groups {
    cost: u64,
    groups: Vec<Vec<Bin>>,
}

fn group_cost(cat: &Catalogue, g: &[Bin]) -> u64 {
    g.iter().map(|b| cat.types()[b.ty].price).sum()
}

fn to_placement(g: &Groups, flat: &Flat) -> Placement {
    let mut vms: Vec<Vm> = g
        .groups
        .iter()
        .flatten()
        .map(|b| {
            let mut items: Vec<ItemRef> = b.items.iter().map(|&i| flat.refs[i]).collect();
            items.sort();
            Vm { ty: b.ty, items }
        })
        .collect();
    vms.sort_by(|a, b| a.items.first().cmp(&b.items.first()));
    Placement { vms }
}

fn plan_whole_flat(flat: &Flat, cat: &Catalogue, cfg: &PlanConfig) -> Option<Groups> {
    let packer = Packer::new(cat, &flat.pod_demand, cfg.search);
    let pods: Vec<usize> = (0..flat.pod_demand.len()).collect();
    let p = packer.pack(&pods, &undominated(cat, &usable_types(cat, cfg.host)), None)?;
    Some(Groups {
        cost: p.cost,
        groups: p
            .bins
            .into_iter()
            .map(|b| {
                vec![Bin {
                    ty: b.ty,
                    load: b.load,
                    items: b
                        .items
                        .iter()
                        .flat_map(|&p| flat.pod_items[p].iter().copied())
                        .collect(),
                }]
            })
            .collect(),
    })
}

/// Types that fit on a host at all: on uniform hosts, those no larger than the host;
/// otherwise every type.
pub fn usable_types(cat: &Catalogue, host: HostModel) -> Vec<usize> {
    match host {
        HostModel::Uniform(h) => (0..cat.types().len())
            .filter(|&t| cat.types()[t].cap.fits_in(h))
            .collect(),
        _ => cat.all(),
    }
}

/// `types` without those dominated by another: no smaller in either dimension and no
/// dearer (ties kept once). Safe wherever VMs are chosen freely (plan (a), hosts without a
/// bound); not inside a bounded host, where a larger VM may not fit.
pub fn undominated(cat: &Catalogue, types: &[usize]) -> Vec<usize> {
    let ty = cat.types();
    types
        .iter()
        .copied()
        .filter(|&t| {
            !types.iter().any(|&u| {
                u != t
                    && ty[t].cap.fits_in(ty[u].cap)
                    && ty[u].price <= ty[t].price
                    && (ty[u].price < ty[t].price || ty[u].cap != ty[t].cap || u < t)
            })
        })
        .collect()
}

/// Host options: allowed types and the bound on a group's summed capacity.
pub fn host_options(cat: &Catalogue, host: HostModel) -> Vec<(Vec<usize>, Option<Res>)> {
    match host {
        HostModel::PerFamily => (0..cat.families().len())
            .map(|f| (cat.of_family(f), Some(cat.family_host(f))))
            .collect(),
        HostModel::Uniform(h) => vec![(usable_types(cat, host), Some(h))],
        HostModel::Unlimited => vec![(undominated(cat, &cat.all()), None)],
    }
}

fn plan_hostlo_flat(
    flat: &Flat,
    cat: &Catalogue,
    cfg: &PlanConfig,
    whole: Option<&Groups>,
) -> Option<Groups> {
    let options = host_options(cat, cfg.host);
    let packer = Packer::new(cat, &flat.items, cfg.search);
    let pod_packer = Packer::new(cat, &flat.pod_demand, cfg.search);
    let all = undominated(cat, &usable_types(cat, cfg.host));
    let mut best: Option<Groups> = whole.cloned();
    // S2: pods into hosts, then containers into VMs per host.
    for (types, bound) in &options {
        let maxcap = bound.unwrap_or_else(|| cat.max_cap());
        let mut pods: Vec<usize> = (0..flat.pod_demand.len()).collect();
        pods.sort_by(|&a, &b| {
            flat.pod_demand[b]
                .dominant_share(maxcap)
                .partial_cmp(&flat.pod_demand[a].dominant_share(maxcap))
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.cmp(&b))
        });
        let mut hosts: Vec<(Res, Vec<usize>)> = Vec::new();
        let mut feasible = true;
        for &p in &pods {
            let d = flat.pod_demand[p];
            match bound {
                None => {
                    if hosts.is_empty() {
                        hosts.push((Res::default(), Vec::new()));
                    }
                    hosts[0].0 = hosts[0].0.plus(d);
                    hosts[0].1.push(p);
                }
                Some(b) => {
                    if !d.fits_in(*b) {
                        feasible = false;
                        break;
                    }
                    let start = hosts.len().saturating_sub(cfg.search.window);
                    match hosts[start..].iter().position(|h| h.0.plus(d).fits_in(*b)) {
                        Some(k) => {
                            let h = &mut hosts[start + k];
                            h.0 = h.0.plus(d);
                            h.1.push(p);
                        }
                        None => hosts.push((d, vec![p])),
                    }
                }
            }
        }
        if !feasible {
            continue;
        }
        let mut sol = Groups {
            cost: 0,
            groups: Vec::new(),
        };
        // A host whose pods cannot be placed together is retried one pod per host.
        let mut queue: Vec<Vec<usize>> = hosts.into_iter().map(|h| h.1).collect();
        while let Some(hp) = queue.pop() {
            let hp = &hp;
            let ids: Vec<usize> = hp
                .iter()
                .flat_map(|&p| flat.pod_items[p].iter().copied())
                .collect();
            let split = packer.pack(&ids, types, *bound);
            let whole_h = pod_packer.pack(hp, &all, None);
            let use_split = match (&split, &whole_h) {
                (Some(s), Some(w)) => s.cost <= w.cost,
                (Some(_), None) => true,
                _ => false,
            };
            match (split, whole_h) {
                (Some(s), _) if use_split => {
                    sol.cost += s.cost;
                    sol.groups.push(s.bins);
                }
                (_, Some(w)) => {
                    sol.cost += w.cost;
                    for b in w.bins {
                        sol.groups.push(vec![Bin {
                            ty: b.ty,
                            load: b.load,
                            items: b
                                .items
                                .iter()
                                .flat_map(|&p| flat.pod_items[p].iter().copied())
                                .collect(),
                        }]);
                    }
                }
                _ if hp.len() > 1 => queue.extend(hp.iter().map(|&p| vec![p])),
                _ => {
                    feasible = false;
                    break;
                }
            }
        }
        if feasible && best.as_ref().is_none_or(|b| sol.cost < b.cost) {
            best = Some(sol);
        }
    }
    let mut best = best?;
    improve_groups(&mut best, flat, cat, cfg, &packer, &options);
    Some(best)
}

/// Cheapest re-packing of `ids` over all host options whose bound holds their demand.
fn repack(
    ids: &[usize],
    flat: &Flat,
    packer: &Packer<'_>,
    options: &[(Vec<usize>, Option<Res>)],
) -> Option<super::pack::Packing> {
    /// With many host options (many families), only the most promising are tried.
    const MAX_OPTIONS: usize = 6;
    let demand = ids
        .iter()
        .fold(Res::default(), |a, &i| a.plus(flat.items[i]));
    let mut best: Option<super::pack::Packing> = None;
    let mut cands: Vec<&(Vec<usize>, Option<Res>)> = options
        .iter()
        .filter(|(_, bound)| bound.is_none_or(|b| demand.fits_in(b)))
        .collect();
    if cands.len() > MAX_OPTIONS {
        // Rank by the cheapest single type scaled to the demand (a per-option LP bound).
        let cat = packer.catalogue();
        let score = |types: &[usize]| {
            types
                .iter()
                .map(|&t| {
                    let ty = &cat.types()[t];
                    let need = (demand.cpu as f64 / ty.cap.cpu.max(1) as f64)
                        .max(demand.mem as f64 / ty.cap.mem.max(1) as f64);
                    need * ty.price as f64
                })
                .fold(f64::INFINITY, f64::min)
        };
        cands.sort_by(|a, b| {
            score(&a.0)
                .partial_cmp(&score(&b.0))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        cands.truncate(MAX_OPTIONS);
    }
    for (types, bound) in cands {
        if let Some(p) = packer.pack(ids, types, *bound) {
            if best.as_ref().is_none_or(|b| p.cost < b.cost) {
                best = Some(p);
            }
        }
    }
    best
}

/// Cheapest re-grouping of the containers `ids` (whole pods): with at most `exact_pods`
/// pods, every partition of the pods into host groups, each re-packed by [`repack`];
/// otherwise one group.
fn best_regroup(
    ids: &[usize],
    flat: &Flat,
    packer: &Packer<'_>,
    options: &[(Vec<usize>, Option<Res>)],
    exact_pods: usize,
) -> Option<(u64, Vec<Vec<Bin>>)> {
    let mut pods: Vec<u32> = ids.iter().map(|&i| flat.refs[i].pod).collect();
    pods.sort();
    pods.dedup();
    let k = pods.len();
    if k < 2 || k > exact_pods {
        return repack(ids, flat, packer, options).map(|p| (p.cost, vec![p.bins]));
    }
    let full = (1usize << k) - 1;
    let mut block: Vec<Option<super::pack::Packing>> = vec![None; full + 1];
    for (m, slot) in block.iter_mut().enumerate().skip(1) {
        let sub: Vec<usize> = (0..k)
            .filter(|j| m & (1 << j) != 0)
            .flat_map(|j| flat.pod_items[pods[j] as usize].iter().copied())
            .collect();
        *slot = repack(&sub, flat, packer, options);
    }
    let mut best: Vec<Option<(u64, usize)>> = vec![None; full + 1];
    best[0] = Some((0, 0));
    for s in 1..=full {
        let low = s & s.wrapping_neg();
        let rest = s & !low;
        let mut t = rest;
        loop {
            let b = t | low;
            if let (Some(p), Some((c, _))) = (&block[b], best[s & !b]) {
                if best[s].is_none_or(|x| c + p.cost < x.0) {
                    best[s] = Some((c + p.cost, b));
                }
            }
            if t == 0 {
                break;
            }
            t = (t - 1) & rest;
        }
    }
    let (cost, _) = best[full]?;
    let mut parts = Vec::new();
    let mut s = full;
    while s != 0 {
        let (_, b) = best[s].expect("reachable");
        parts.push(block[b].take().expect("chosen block packed").bins);
        s &= !b;
    }
    Some((cost, parts))
}

fn improve_groups(
    sol: &mut Groups,
    flat: &Flat,
    cat: &Catalogue,
    cfg: &PlanConfig,
    packer: &Packer<'_>,
    options: &[(Vec<usize>, Option<Res>)],
) {
    const MAX_GROUP_ITEMS: usize = 512;
    let waste = |g: &[Bin]| -> f64 {
        g.iter()
            .map(|b| {
                let t = &cat.types()[b.ty];
                t.price as f64 * (1.0 - b.load.dominant_share(t.cap)).max(0.0)
            })
            .sum()
    };
    for _ in 0..cfg.search.max_passes {
        let before = sol.cost;
        // Split: re-pack each group on its own (or split it into several groups).
        let mut gi = 0;
        while gi < sol.groups.len() {
            let g = &sol.groups[gi];
            let ids: Vec<usize> = g.iter().flat_map(|b| b.items.iter().copied()).collect();
            gi += 1;
            if ids.len() < 2 || ids.len() > MAX_GROUP_ITEMS {
                continue;
            }
            let old = group_cost(cat, g);
            if let Some((cost, parts)) =
                best_regroup(&ids, flat, packer, options, cfg.search.exact_pods)
            {
                if cost < old {
                    sol.cost = sol.cost - old + cost;
                    let mut parts = parts.into_iter();
                    sol.groups[gi - 1] = parts.next().unwrap_or_default();
                    sol.groups.extend(parts);
                }
            }
        }
        sol.groups.retain(|g| !g.is_empty());
        // Merge: re-pack pairs of the most wasteful groups together.
        let mut order: Vec<usize> = (0..sol.groups.len()).collect();
        order.sort_by(|&a, &b| {
            waste(&sol.groups[b])
                .partial_cmp(&waste(&sol.groups[a]))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        order.truncate(cfg.search.pair_candidates);
        let mut dead = vec![false; sol.groups.len()];
        let mut added: Vec<Vec<Bin>> = Vec::new();
        for x in 0..order.len() {
            for y in x + 1..order.len() {
                let (a, b) = (order[x], order[y]);
                if dead[a] || dead[b] {
                    continue;
                }
                let ids: Vec<usize> = sol.groups[a]
                    .iter()
                    .chain(&sol.groups[b])
                    .flat_map(|bin| bin.items.iter().copied())
                    .collect();
                if ids.len() > MAX_GROUP_ITEMS {
                    continue;
                }
                let old = group_cost(cat, &sol.groups[a]) + group_cost(cat, &sol.groups[b]);
                if let Some((cost, parts)) =
                    best_regroup(&ids, flat, packer, options, cfg.search.exact_pods)
                {
                    if cost < old {
                        dead[a] = true;
                        dead[b] = true;
                        sol.cost = sol.cost - old + cost;
                        added.extend(parts);
                    }
                }
            }
        }
        if !added.is_empty() {
            let mut k = 0;
            sol.groups.retain(|_| {
                let keep = !dead[k];
                k += 1;
                keep
            });
            sol.groups.extend(added);
        }
        if sol.cost >= before {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{group_clients, validate, Mode, VmType};

    fn cat() -> Catalogue {
        let t = |n: &str, f: &str, c: u64, m: u64, p: u64| VmType {
            name: n.into(),
            family: f.into(),
            cap: Res::new(c * 1000, m * 1024),
            price: p,
        };
        Catalogue::new(vec![
            t("m.l", "m", 2, 8, 96),
            t("m.xl", "m", 4, 16, 192),
            t("m.2xl", "m", 8, 32, 384),
        ])
    }

    #[test]
    fn a_five_container_pod_is_cheaper_with_hostlo() {
        let rows = (0..5).map(|i| {
            (
                "u".to_string(),
                "p".to_string(),
                i.to_string(),
                Res::new(1000, 4096),
            )
        });
        let client = group_clients(rows).remove(0);
        let c = cat();
        let plan = plan_client(&client, &c, &PlanConfig::default());
        let (a, b) = (plan.whole.unwrap(), plan.hostlo.unwrap());
        assert_eq!(a.cost(&c), 384);
        assert_eq!(b.cost(&c), 288);
        assert!(plan.lower_bound <= 288.0 && plan.lower_bound >= 240.0 - 1e-9);
        validate(&client, &c, HostModel::PerFamily, Mode::Whole, &a).unwrap();
        validate(&client, &c, HostModel::PerFamily, Mode::Hostlo, &b).unwrap();
        assert_eq!(b.spanning_pods().len(), 1);
    }

    #[test]
    fn oversized_pod_is_infeasible_in_both() {
        let rows = (0..3).map(|i| {
            (
                "u".to_string(),
                "p".to_string(),
                i.to_string(),
                Res::new(3000, 1),
            )
        });
        let client = group_clients(rows).remove(0);
        let plan = plan_client(&client, &cat(), &PlanConfig::default());
        assert!(plan.whole.is_none());
        assert!(plan.hostlo.is_none());
        // With unlimited hosts, Hostlo places it: 3 x m.xl.
        let cfg = PlanConfig {
            host: HostModel::Unlimited,
            ..Default::default()
        };
        let plan = plan_client(&client, &cat(), &cfg);
        assert!(plan.whole.is_none());
        assert_eq!(plan.hostlo.unwrap().cost(&cat()), 3 * 192);
    }
}
