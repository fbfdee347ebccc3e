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
use std::collections::HashMap;

use super::bound::lp_bound;
use super::model::{validate, Catalogue, Client, HostModel, ItemRef, Mode, Placement, Res, Vm};
use super::pack::{Bin, Packer, SearchOptions};
use super::setcover::{self, Instance, IntSolution, Limits, Pattern};

/// Configuration of a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanConfig {
    /// Where the VMs of a spanning pod must live.
    pub host: HostModel,
    /// Search tunables.
    pub search: SearchOptions,
    /// Limits of the exact part (set cover, column generation, MILP), per plan of a
    /// client; `None` keeps the heuristic alone (and the demand bound).
    pub exact: Option<Limits>,
    /// Run-wide budget of the exact part in [`plan_all`] (wall clock from the start of
    /// the exact phase): the exact part takes clients with the fewest item classes first,
    /// each within `exact` and the end of the budget; a client reached after the budget
    /// keeps its heuristic plans and the demand bound. `None`: no budget (each client gets
    /// `exact`).
    pub exact_budget: Option<std::time::Duration>,
}

impl Default for PlanConfig {
    fn default() -> Self {
        Self {
            host: HostModel::PerFamily,
            search: SearchOptions::default(),
            exact: Some(Limits::default()),
            exact_budget: Some(std::time::Duration::from_secs(DEFAULT_EXACT_BUDGET_S)),
        }
    }
}

/// The two plans of one client and their certified lower bounds.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientPlan {
    /// Plan (a); `None` when a pod fits no VM type.
    pub whole: Option<Placement>,
    /// Plan (b); `None` when a pod fits no host.
    pub hostlo: Option<Placement>,
    /// Lower bound on the optimum of plan (a), micro-dollars per hour (0 when infeasible).
    pub bound_whole: u64,
    /// Lower bound on the optimum of plan (b), micro-dollars per hour (0 when infeasible).
    pub bound_hostlo: u64,
    /// Every pod has at most one container: Hostlo cannot change anything, and plan (b)
    /// is plan (a).
    pub single_container: bool,
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

/// Default of [`PlanConfig::exact_budget`], seconds.
pub const DEFAULT_EXACT_BUDGET_S: u64 = 20;

/// Plans one client: (a), (b) and their bounds. The heuristic gives both plans; the exact
/// part (see [`setcover`]) then bounds each from below and replaces it by its own solution
/// when that is cheaper. (No run-wide budget: the client gets `cfg.exact`.)
pub fn plan_client(client: &Client, cat: &Catalogue, cfg: &PlanConfig) -> ClientPlan {
    let h = heuristic(client, cat, cfg);
    finish(client, cat, cfg, h, cfg.exact)
}

/// The heuristic's plans of one client and its demand bound, before the exact part.
struct Heuristic {
    flat: Flat,
    single_container: bool,
    demand_lb: u64,
    whole: Option<Groups>,
    hostlo: Option<Groups>,
}

/// The search options for a client of `items` containers: above
/// [`LIGHT_SEARCH_ITEMS`], a lighter local search (no pair re-packing, one pass); the
/// exact part, which works on classes of equal containers, does the rest. (The full
/// search costs minutes per 10^5 containers of trace-like clients.)
fn search_for(items: usize, cfg: &PlanConfig) -> PlanConfig {
    if items > LIGHT_SEARCH_ITEMS {
        PlanConfig {
            search: SearchOptions {
                pair_candidates: 0,
                max_passes: 1,
                move_sources: cfg.search.move_sources.min(16),
                ..cfg.search
            },
            ..*cfg
        }
    } else {
        *cfg
    }
}

/// Both heuristic plans (S1 of (b) is the heuristic (a)) and the demand bound.
fn heuristic(client: &Client, cat: &Catalogue, cfg: &PlanConfig) -> Heuristic {
    let flat = Flat::new(client);
    let cfg = &search_for(flat.items.len(), cfg);
    let single_container = client.pods.iter().all(|p| p.containers.len() <= 1);
    // The demand bound (LP relaxation over capacity), valid for both plans.
    let demand_lb = {
        let lb = lp_bound(client.demand(), cat);
        if lb.is_finite() {
            (lb * (1.0 - 1e-9) - 1e-6).ceil().max(0.0) as u64
        } else {
            0
        }
    };
    let whole = plan_whole_flat(&flat, cat, cfg);
    let hostlo = if single_container {
        None
    } else {
        plan_hostlo_flat(&flat, cat, cfg, whole.as_ref())
    };
    Heuristic {
        flat,
        single_container,
        demand_lb,
        whole,
        hostlo,
    }
}

/// The exact part on the heuristic's plans, within `limits` (`None`: none, the demand
/// bound only). A plan the demand bound already proves is not searched further.
fn finish(
    client: &Client,
    cat: &Catalogue,
    cfg: &PlanConfig,
    h: Heuristic,
    limits: Option<Limits>,
) -> ClientPlan {
    let Heuristic {
        flat,
        single_container,
        demand_lb,
        mut whole,
        mut hostlo,
    } = h;
    let cfg = &search_for(flat.items.len(), cfg);
    let mut bound_whole = 0;
    if let Some(w) = whole.as_mut() {
        bound_whole = demand_lb.min(w.cost);
        if let Some(limits) = limits.filter(|_| bound_whole < w.cost) {
            let (better, lb) = exact_whole(&flat, cat, cfg, w, limits);
            bound_whole = bound_whole.max(lb);
            if let Some(b) = better {
                *w = b;
            }
        }
    }
    let whole_placement = whole.as_ref().map(|p| to_placement(p, &flat));
    if single_container {
        return ClientPlan {
            hostlo: whole_placement.clone(),
            whole: whole_placement,
            bound_whole,
            bound_hostlo: bound_whole,
            single_container,
        };
    }
    // (a), each VM its own group, is a (b) plan: (b) never costs more.
    if let Some(w) = whole.as_ref() {
        if hostlo.as_ref().is_none_or(|h| w.cost < h.cost) {
            hostlo = Some(w.clone());
        }
    }
    let mut bound_hostlo = 0;
    if let Some(h) = hostlo.as_mut() {
        bound_hostlo = demand_lb.min(h.cost);
        if let Some(limits) = limits.filter(|_| bound_hostlo < h.cost) {
            let (better, lb) = exact_hostlo(client, &flat, cat, cfg, h, limits);
            bound_hostlo = bound_hostlo.max(lb);
            if let Some(b) = better {
                *h = b;
            }
        }
        // (a) is a (b) plan, so its bound only rises with (b)'s.
        if whole.is_some() {
            bound_whole = bound_whole.max(bound_hostlo);
        }
    }
    ClientPlan {
        whole: whole_placement,
        hostlo: hostlo.map(|g| to_placement(&g, &flat)),
        bound_whole,
        bound_hostlo,
        single_container,
    }
}

/// Above this many containers, [`plan_client`] runs a lighter local search.
pub const LIGHT_SEARCH_ITEMS: usize = 64;

/// Items grouped into classes of equal size; zero-size items get no class.
struct Classes {
    sizes: Vec<Res>,
    of: Vec<Option<usize>>,
}

fn classes(items: &[Res]) -> Classes {
    let mut index: HashMap<Res, usize> = HashMap::new();
    let mut sizes = Vec::new();
    let of = items
        .iter()
        .map(|&r| {
            (r != Res::default()).then(|| {
                *index.entry(r).or_insert_with(|| {
                    sizes.push(r);
                    sizes.len() - 1
                })
            })
        })
        .collect();
    Classes { sizes, of }
}

/// The class counts of a bin's items.
fn counts_of(items: &[usize], cls: &Classes) -> Vec<(usize, u64)> {
    let mut m: std::collections::BTreeMap<usize, u64> = Default::default();
    for &i in items {
        if let Some(k) = cls.of[i] {
            *m.entry(k).or_default() += 1;
        }
    }
    m.into_iter().collect()
}

/// Plan (a) by the exact part: pods are the items. Returns a cheaper plan if found, and
/// the certified bound.
fn exact_whole(
    flat: &Flat,
    cat: &Catalogue,
    cfg: &PlanConfig,
    heur: &Groups,
    limits: Limits,
) -> (Option<Groups>, u64) {
    let cls = classes(&flat.pod_demand);
    if cls.sizes.is_empty() {
        // Only empty pods: one VM of the cheapest usable type, which the heuristic found.
        return (None, heur.cost);
    }
    let types = undominated(cat, &usable_types(cat, cfg.host));
    let mut free = vec![0u64; cls.sizes.len()];
    for k in cls.of.iter().flatten() {
        free[*k] += 1;
    }
    let inst = Instance {
        sizes: cls.sizes.clone(),
        options: vec![types.clone()],
        free,
        linked: Vec::new(),
    };
    let start = IntSolution {
        vms: heur
            .groups
            .iter()
            .flatten()
            .map(|b| {
                let pods: Vec<usize> = pods_of_bin(b, flat);
                (
                    Pattern {
                        opt: 0,
                        ty: b.ty,
                        counts: counts_of(&pods, &cls),
                    },
                    1,
                )
            })
            .collect(),
        members: Vec::new(),
        cost: heur.cost,
    };
    let out = setcover::solve(&inst, cat, Some(&start), limits);
    let better = out.solution.filter(|s| s.cost < heur.cost).and_then(|s| {
        // Pods into the slots of their class.
        let mut todo: Vec<Vec<usize>> = vec![Vec::new(); cls.sizes.len()];
        let mut empty: Vec<usize> = Vec::new();
        for (p, k) in cls.of.iter().enumerate() {
            match k {
                Some(k) => todo[*k].push(p),
                None => empty.push(p),
            }
        }
        let mut bins: Vec<(usize, Vec<usize>)> = Vec::new();
        for (pat, n) in &s.vms {
            for _ in 0..*n {
                let mut pods = Vec::new();
                for &(k, a) in &pat.counts {
                    for _ in 0..a {
                        if let Some(p) = todo[k].pop() {
                            pods.push(p);
                        }
                    }
                }
                if !pods.is_empty() {
                    bins.push((pat.ty, pods));
                }
            }
        }
        if let Some(first) = bins.first_mut() {
            first.1.append(&mut empty);
        }
        let mut g = Groups {
            cost: 0,
            groups: Vec::new(),
        };
        for (_, pods) in bins {
            let load = pods
                .iter()
                .fold(Res::default(), |a, &p| a.plus(flat.pod_demand[p]));
            let ty = cat.cheapest_fitting(load, &types)?;
            g.cost += cat.types()[ty].price;
            g.groups.push(vec![Bin {
                ty,
                load,
                items: pods
                    .iter()
                    .flat_map(|&p| flat.pod_items[p].iter().copied())
                    .collect(),
            }]);
        }
        (g.cost < heur.cost).then_some(g)
    });
    (better, out.lower_bound)
}

/// The pods whose containers a bin holds.
fn pods_of_bin(b: &Bin, flat: &Flat) -> Vec<usize> {
    let mut pods: Vec<usize> = b.items.iter().map(|&i| flat.refs[i].pod as usize).collect();
    pods.sort();
    pods.dedup();
    pods
}

/// Plan (b) by the exact part: containers are the items; multi-container pods keep one
/// family on per-family hosts. Returns a cheaper valid plan if found, and the certified
/// bound (of the relaxation without the host-size bound, so valid for (b)).
fn exact_hostlo(
    client: &Client,
    flat: &Flat,
    cat: &Catalogue,
    cfg: &PlanConfig,
    heur: &Groups,
    limits: Limits,
) -> (Option<Groups>, u64) {
    let cls = classes(&flat.items);
    if cls.sizes.is_empty() {
        return (None, heur.cost);
    }
    let options: Vec<Vec<usize>> = match cfg.host {
        HostModel::PerFamily => (0..cat.families().len())
            .map(|f| undominated(cat, &cat.of_family(f)))
            .collect(),
        host => vec![undominated(cat, &usable_types(cat, host))],
    };
    let option_of = |t: usize| match cfg.host {
        HostModel::PerFamily => cat.family_of(t),
        _ => 0,
    };
    let nk = cls.sizes.len();
    // Pods with two or more non-empty containers keep one option; the others are free.
    let mut free = vec![0u64; nk];
    let mut linked: Vec<(Vec<(usize, u64)>, u64)> = Vec::new();
    let mut group_of: Vec<Option<usize>> = vec![None; flat.pod_items.len()];
    let mut index: HashMap<Vec<(usize, u64)>, usize> = HashMap::new();
    for (p, ids) in flat.pod_items.iter().enumerate() {
        let counts = counts_of(ids, &cls);
        let nonempty: u64 = counts.iter().map(|x| x.1).sum();
        if nonempty <= 1 || options.len() == 1 {
            for (k, n) in counts {
                free[k] += n;
            }
        } else {
            let g = *index.entry(counts.clone()).or_insert_with(|| {
                linked.push((counts, 0));
                linked.len() - 1
            });
            linked[g].1 += 1;
            group_of[p] = Some(g);
        }
    }
    let inst = Instance {
        sizes: cls.sizes.clone(),
        options: options.clone(),
        free,
        linked,
    };
    let mut members = vec![vec![0u64; options.len()]; inst.linked.len()];
    let mut vms = Vec::new();
    for b in heur.groups.iter().flatten() {
        vms.push((
            Pattern {
                opt: option_of(b.ty),
                ty: b.ty,
                counts: counts_of(&b.items, &cls),
            },
            1,
        ));
    }
    for (p, g) in group_of.iter().enumerate() {
        if let Some(g) = g {
            // The option of the pod: that of the VM holding its first container.
            let first = flat.pod_items[p][0];
            if let Some(b) = heur
                .groups
                .iter()
                .flatten()
                .find(|b| b.items.contains(&first))
            {
                members[*g][option_of(b.ty)] += 1;
            }
        }
    }
    let start = IntSolution {
        vms,
        members,
        cost: heur.cost,
    };
    let out = setcover::solve(&inst, cat, Some(&start), limits);
    let better = out
        .solution
        .filter(|s| s.cost < heur.cost)
        .and_then(|s| realise_hostlo(client, flat, cat, cfg, &cls, &inst, &group_of, &s))
        .filter(|g| g.cost < heur.cost);
    (better, out.lower_bound)
}

/// Turns a set-cover solution of plan (b) into VMs holding containers: linked pods first,
/// each on as few VMs of its option as possible, then free containers into the slots
/// left, then empty containers beside their pod. `None` if the result breaks a host
/// bound.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
fn realise_hostlo(
    client: &Client,
    flat: &Flat,
    cat: &Catalogue,
    cfg: &PlanConfig,
    cls: &Classes,
    inst: &Instance,
    group_of: &[Option<usize>],
    s: &IntSolution,
) -> Option<Groups> {
    let nk = cls.sizes.len();
    // Bins: option, type, free slots per class, items.
    struct B {
        opt: usize,
        slots: Vec<u64>,
        items: Vec<usize>,
    }
    let mut bins: Vec<B> = Vec::new();
    for (p, n) in &s.vms {
        for _ in 0..*n {
            let mut slots = vec![0u64; nk];
            for &(k, a) in &p.counts {
                slots[k] = a;
            }
            bins.push(B {
                opt: p.opt,
                slots,
                items: Vec::new(),
            });
        }
    }
    // Linked pods: members per option, largest pods first.
    let mut left = s.members.clone();
    let mut pods: Vec<usize> = (0..flat.pod_items.len())
        .filter(|&p| group_of[p].is_some())
        .collect();
    pods.sort_by_key(|&p| std::cmp::Reverse(flat.pod_items[p].len()));
    let mut placed = vec![false; flat.items.len()];
    for p in pods {
        let g = group_of[p]?;
        let o = (0..inst.options.len()).find(|&o| left[g][o] > 0)?;
        left[g][o] -= 1;
        let mut need: Vec<(usize, u64)> = counts_of(&flat.pod_items[p], cls);
        let mut ids: Vec<usize> = flat.pod_items[p]
            .iter()
            .copied()
            .filter(|&i| cls.of[i].is_some())
            .collect();
        // One bin holding it all, else the bins with the most of its slots first.
        let whole = bins
            .iter()
            .position(|b| b.opt == o && need.iter().all(|&(k, n)| b.slots[k] >= n));
        let order: Vec<usize> = match whole {
            Some(b) => vec![b],
            None => {
                let mut v: Vec<usize> = (0..bins.len()).filter(|&b| bins[b].opt == o).collect();
                v.sort_by_key(|&b| {
                    std::cmp::Reverse(
                        need.iter()
                            .map(|&(k, n)| bins[b].slots[k].min(n))
                            .sum::<u64>(),
                    )
                });
                v
            }
        };
        for b in order {
            ids.retain(|&i| {
                let k = cls.of[i].expect("non-empty");
                if bins[b].slots[k] > 0 {
                    bins[b].slots[k] -= 1;
                    bins[b].items.push(i);
                    placed[i] = true;
                    false
                } else {
                    true
                }
            });
            if ids.is_empty() {
                break;
            }
        }
        if !ids.is_empty() {
            return None;
        }
        need.clear();
    }
    // Free containers, then empty ones beside their pod.
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); nk];
    for (b, bin) in bins.iter().enumerate() {
        for (k, &n) in bin.slots.iter().enumerate() {
            for _ in 0..n {
                by_class[k].push(b);
            }
        }
    }
    for i in 0..flat.items.len() {
        if placed[i] {
            continue;
        }
        if let Some(k) = cls.of[i] {
            let b = by_class[k].pop()?;
            bins[b].items.push(i);
            placed[i] = true;
        }
    }
    let mut home: HashMap<u32, usize> = HashMap::new();
    for (b, bin) in bins.iter().enumerate() {
        for &i in &bin.items {
            home.entry(flat.refs[i].pod).or_insert(b);
        }
    }
    let mut extra: Vec<usize> = Vec::new();
    for i in 0..flat.items.len() {
        if !placed[i] {
            match home.get(&flat.refs[i].pod) {
                Some(&b) => bins[b].items.push(i),
                None => match bins.iter().position(|b| !b.items.is_empty()) {
                    Some(b) => bins[b].items.push(i),
                    None => extra.push(i),
                },
            }
        }
    }
    let mut groups: Vec<Vec<Bin>> = Vec::new();
    let mut cost = 0u64;
    for bin in bins.into_iter().filter(|b| !b.items.is_empty()) {
        let load = bin
            .items
            .iter()
            .fold(Res::default(), |a, &i| a.plus(flat.items[i]));
        let ty = cat.cheapest_fitting(load, &inst.options[bin.opt])?;
        cost += cat.types()[ty].price;
        groups.push(vec![Bin {
            ty,
            load,
            items: bin.items,
        }]);
    }
    if !extra.is_empty() {
        let all = usable_types(cat, cfg.host);
        let ty = cat.cheapest_fitting(Res::default(), &all)?;
        cost += cat.types()[ty].price;
        groups.push(vec![Bin {
            ty,
            load: Res::default(),
            items: extra,
        }]);
    }
    let g = Groups { cost, groups };
    let placement = to_placement(&g, flat);
    validate(client, cat, cfg.host, Mode::Hostlo, &placement).ok()?;
    Some(g)
}

/// Plan (a) alone.
pub fn plan_whole(client: &Client, cat: &Catalogue, cfg: &PlanConfig) -> Option<Placement> {
    let flat = Flat::new(client);
    plan_whole_flat(&flat, cat, cfg).map(|p| to_placement(&p, &flat))
}

/// What [`plan_all_stats`] did: the time of each phase and how many clients the exact
/// part reached.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RunStats {
    /// Heuristic phase (both plans of every client, largest clients first), seconds.
    pub heuristic_s: f64,
    /// Exact phase (fewest classes first, under the budget), seconds.
    pub exact_s: f64,
    /// Clients whose exact part ran (within their share of the budget).
    pub exact_clients: usize,
    /// Clients reached after the budget was spent: heuristic plans, demand bound.
    pub out_of_budget: usize,
}

/// Plans clients on `threads` threads; results in input order. See [`plan_all_stats`].
pub fn plan_all(
    clients: &[Client],
    cat: &Catalogue,
    cfg: &PlanConfig,
    threads: usize,
) -> Vec<ClientPlan> {
    plan_all_stats(clients, cat, cfg, threads).0
}

/// `f(k, order[k])` for every `k` on `threads` threads, which take the next `k` as they
/// become free; results by `order[k]` (the client index).
fn par_map<T: Send>(
    n: usize,
    order: &[usize],
    threads: usize,
    f: impl Fn(usize, usize) -> T + Sync,
) -> Vec<Option<T>> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: std::sync::Mutex<Vec<Option<T>>> =
        std::sync::Mutex::new((0..n).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&i) = order.get(k) else { break };
                let out = f(k, i);
                results.lock().expect("no panic while holding the lock")[i] = Some(out);
            });
        }
    });
    results.into_inner().expect("threads joined")
}

/// Plans clients on `threads` threads in two phases; results in input order.
///
/// 1. The heuristic's plans and the demand bound of every client, largest clients first
///    (so that the longest come first and the threads end together).
/// 2. The exact part, clients with the fewest item classes first (its work grows with
///    them; most clients have few), then the fewest containers, under
///    `cfg.exact_budget`: a client gets `cfg.exact`, cut at the end of the budget; a
///    client reached after the budget keeps its heuristic plans and the demand bound, and
///    its gap says so.
pub fn plan_all_stats(
    clients: &[Client],
    cat: &Catalogue,
    cfg: &PlanConfig,
    threads: usize,
) -> (Vec<ClientPlan>, RunStats) {
    let n = clients.len();
    let threads = threads.max(1);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(clients[i].container_count()));
    let t0 = std::time::Instant::now();
    let heur: Vec<std::sync::Mutex<Option<Heuristic>>> =
        par_map(n, &order, threads, |_, i| heuristic(&clients[i], cat, cfg))
            .into_iter()
            .map(std::sync::Mutex::new)
            .collect();
    let heuristic_s = t0.elapsed().as_secs_f64();
    // Exact phase: fewest classes first (the cost of the exact part grows with them),
    // then fewest containers.
    let key: Vec<(usize, usize)> = heur
        .iter()
        .zip(clients)
        .map(|(h, c)| {
            let h = h.lock().expect("no panic while holding the lock");
            let classes = h.as_ref().map_or(0, |h| {
                h.flat
                    .items
                    .iter()
                    .collect::<std::collections::HashSet<_>>()
                    .len()
            });
            (classes, c.container_count())
        })
        .collect();
    order.sort_by_key(|&i| (key[i], i));
    let t1 = std::time::Instant::now();
    let end = cfg.exact_budget.map(|b| t1 + b);
    let ran = std::sync::atomic::AtomicUsize::new(0);
    let late = std::sync::atomic::AtomicUsize::new(0);
    let plans = par_map(n, &order, threads, |_, i| {
        let h = heur[i]
            .lock()
            .expect("no panic while holding the lock")
            .take()
            .expect("each client once");
        let limits = match (cfg.exact, end) {
            (None, _) => None,
            (Some(l), None) => Some(l),
            (Some(l), Some(end)) => {
                let left = end.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    late.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    None
                } else {
                    Some(l.within(left * 2))
                }
            }
        };
        if limits.is_some() {
            ran.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        finish(&clients[i], cat, cfg, h, limits)
    });
    let stats = RunStats {
        heuristic_s,
        exact_s: t1.elapsed().as_secs_f64(),
        exact_clients: ran.into_inner(),
        out_of_budget: late.into_inner(),
    };
    let plans = plans
        .into_iter()
        .map(|p| p.expect("every client planned"))
        .collect();
    (plans, stats)
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
    // Every partition of the pods re-packs each subset: only for few containers.
    const MAX_PARTITION_ITEMS: usize = 48;
    if k < 2 || k > exact_pods || ids.len() > MAX_PARTITION_ITEMS {
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
    // Pooling two groups and re-packing them: for groups of moderate size.
    const MAX_PAIR_ITEMS: usize = 192;
    let waste = |g: &[Bin]| -> f64 {
        g.iter()
            .map(|b| {
                let t = &cat.types()[b.ty];
                t.price as f64 * (1.0 - b.load.dominant_share(t.cap)).max(0.0)
            })
            .sum()
    };
    // Item sets already re-packed without gain: the same search would find the same.
    let mut tried: std::collections::HashSet<Vec<usize>> = Default::default();
    let key = |ids: &[usize]| {
        let mut k = ids.to_vec();
        k.sort_unstable();
        k
    };
    for _ in 0..cfg.search.max_passes {
        let before = sol.cost;
        // Split: re-pack each group on its own (or split it into several groups).
        let mut gi = 0;
        while gi < sol.groups.len() {
            let g = &sol.groups[gi];
            let ids: Vec<usize> = g.iter().flat_map(|b| b.items.iter().copied()).collect();
            gi += 1;
            if ids.len() < 2 || ids.len() > MAX_GROUP_ITEMS || !tried.insert(key(&ids)) {
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
                if ids.len() > MAX_PAIR_ITEMS || !tried.insert(key(&ids)) {
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
        assert_eq!((plan.bound_whole, plan.bound_hostlo), (384, 288));
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
