//! Variable-sized two-dimensional bin packing with costs: the heuristic behind both plans.
//!
//! [`pack`] places items (CPU, memory) into VMs whose types come from an allowed list,
//! minimising the summed price, optionally under a bound on the summed VM capacity (a
//! host). It is a multi-start construction followed by local search:
//!
//! 1. **Construction.** One VM per item (of the cheapest type holding it) is the first
//!    candidate. Items are sorted by decreasing dominant share. For each allowed
//!    type `o` (the *opening type*) and each of first-fit and best-fit, items are packed
//!    into bins of `o`'s capacity (an item larger than `o` opens a bin of the cheapest type
//!    that holds it); every bin is then right-sized to the cheapest type that holds its
//!    load. The cheapest of these packings is kept.
//! 2. **Improvement**, repeated while it gains:
//!    - *split*: the items of one VM are re-packed into strictly cheaper types;
//!    - *empty/shrink*: the items of a wasteful VM move to other VMs, upgrading them when
//!      the total price falls;
//!    - *pair re-pack*: the items of two wasteful VMs are pooled and re-packed.
//!
//! Construction and each move keep every VM within its type and the total within the
//! bound, so the result is always feasible.
use super::model::{Catalogue, Res};

/// Tunables of the search. The defaults are the ones of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SearchOptions {
    /// Open bins kept during construction (bounded-space first fit); older bins close.
    pub window: usize,
    /// Above this many items, only the largest type of each family opens bins.
    pub many_items: usize,
    /// Most wasteful VMs tried as sources of the empty/shrink move, per pass.
    pub move_sources: usize,
    /// Most wasteful VMs (or host groups) whose pairs are re-packed, per pass.
    pub pair_candidates: usize,
    /// Passes of the improvement loop.
    pub max_passes: usize,
    /// Item sets up to this size are packed exactly (subset dynamic programme) when the
    /// optimum meets the bound; 0 turns the exact step off (pure heuristic).
    pub exact_items: usize,
    /// Host groups of up to this many pods are re-split by trying every partition of their
    /// pods into groups (Hostlo plan only); 0 turns it off.
    pub exact_pods: usize,
}

impl Default for SearchOptions {
    fn default() -> Self {
        Self {
            window: 256,
            many_items: 4000,
            move_sources: 64,
            pair_candidates: 12,
            max_passes: 4,
            exact_items: 8,
            exact_pods: 5,
        }
    }
}

/// A VM during packing: its type, its load and the indices of its items.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bin {
    /// Index in the catalogue.
    pub ty: usize,
    /// Summed request of its items.
    pub load: Res,
    /// Indices into the item slice given to [`pack`].
    pub items: Vec<usize>,
}

/// A packing: its VMs and their summed price.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packing {
    /// Summed price in micro-dollars per hour.
    pub cost: u64,
    /// The VMs.
    pub bins: Vec<Bin>,
}

impl Packing {
    /// Summed capacity of the VMs.
    pub fn total_cap(&self, cat: &Catalogue) -> Res {
        self.bins
            .iter()
            .fold(Res::default(), |a, b| a.plus(cat.types()[b.ty].cap))
    }
}

#[derive(Clone, Copy)]
enum Rule {
    FirstFit,
    BestFit,
}

/// The packing engine over one item set.
pub struct Packer<'a> {
    cat: &'a Catalogue,
    items: &'a [Res],
    opts: SearchOptions,
}

fn price(cat: &Catalogue, t: usize) -> u64 {
    cat.types()[t].price
}

impl<'a> Packer<'a> {
    /// An engine over `items` (requests) and the catalogue.
    pub fn new(cat: &'a Catalogue, items: &'a [Res], opts: SearchOptions) -> Self {
        Self { cat, items, opts }
    }

    /// The catalogue.
    pub fn catalogue(&self) -> &'a Catalogue {
        self.cat
    }

    /// Packs the items `ids` on types `allowed` (cheapest first) with the summed capacity
    /// within `bound`. `None` when an item fits no allowed type or no packing found meets
    /// the bound.
    pub fn pack(&self, ids: &[usize], allowed: &[usize], bound: Option<Res>) -> Option<Packing> {
        if !ids.is_empty() && ids.len() <= self.opts.exact_items {
            let exact = self.exact(ids, allowed)?;
            if bound.is_none_or(|b| exact.total_cap(self.cat).fits_in(b)) {
                return Some(exact);
            }
        }
        let mut best = self.construct_all(ids, allowed, bound)?;
        self.improve(&mut best, allowed, bound);
        Some(best)
    }

    /// Exact optimum without bound for a few items: `best[S] = min over blocks T ⊆ S that
    /// hold S's first item of cheapest(T) + best[S \ T]`, O(3^n).
    pub fn exact(&self, ids: &[usize], allowed: &[usize]) -> Option<Packing> {
        let cat = self.cat;
        let n = ids.len();
        assert!(n < 16, "exact packing is for few items");
        let full = (1usize << n) - 1;
        let mut load = vec![Res::default(); full + 1];
        for m in 1..=full {
            let low = m.trailing_zeros() as usize;
            load[m] = load[m & (m - 1)].plus(self.items[ids[low]]);
        }
        let block: Vec<Option<usize>> = load
            .iter()
            .map(|&l| cat.cheapest_fitting(l, allowed))
            .collect();
        let mut best: Vec<Option<(u64, usize)>> = vec![None; full + 1];
        best[0] = Some((0, 0));
        for s in 1..=full {
            let low = s & s.wrapping_neg();
            let rest = s & !low;
            let mut t = rest;
            loop {
                let b = t | low;
                if let (Some(ty), Some((c, _))) = (block[b], best[s & !b]) {
                    let c = c + price(cat, ty);
                    if best[s].is_none_or(|x| c < x.0) {
                        best[s] = Some((c, b));
                    }
                }
                if t == 0 {
                    break;
                }
                t = (t - 1) & rest;
            }
        }
        let (cost, _) = best[full]?;
        let mut bins = Vec::new();
        let mut s = full;
        while s != 0 {
            let (_, b) = best[s].expect("reachable");
            bins.push(Bin {
                ty: block[b].expect("chosen block fits"),
                load: load[b],
                items: (0..n)
                    .filter(|i| b & (1 << i) != 0)
                    .map(|i| ids[i])
                    .collect(),
            });
            s &= !b;
        }
        Some(Packing { cost, bins })
    }

    /// Construction only (step 1).
    pub fn construct_all(
        &self,
        ids: &[usize],
        allowed: &[usize],
        bound: Option<Res>,
    ) -> Option<Packing> {
        if ids.is_empty() {
            return Some(Packing {
                cost: 0,
                bins: Vec::new(),
            });
        }
        let cat = self.cat;
        let maxcap = allowed
            .iter()
            .fold(Res::default(), |a, &t| a.max(cat.types()[t].cap));
        if ids
            .iter()
            .any(|&i| cat.cheapest_fitting(self.items[i], allowed).is_none())
        {
            return None;
        }
        let mut order: Vec<(u64, u64, usize)> = ids
            .iter()
            .map(|&i| {
                let r = self.items[i];
                let share = (r.dominant_share(maxcap) * 1e12) as u64;
                (
                    share,
                    r.cpu
                        .saturating_mul(maxcap.mem)
                        .saturating_add(r.mem.saturating_mul(maxcap.cpu)),
                    i,
                )
            })
            .collect();
        order.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
        let order: Vec<usize> = order.into_iter().map(|x| x.2).collect();
        let openers = self.openers(allowed, ids.len());
        // One VM per item, each of the cheapest type that holds it: the plan every other
        // start must beat, so the result never costs more than it.
        let best: Option<Packing> = {
            let bins: Vec<Bin> = ids
                .iter()
                .map(|&i| Bin {
                    ty: cat
                        .cheapest_fitting(self.items[i], allowed)
                        .expect("checked above"),
                    load: self.items[i],
                    items: vec![i],
                })
                .collect();
            let p = Packing {
                cost: bins.iter().map(|b| price(cat, b.ty)).sum(),
                bins,
            };
            bound
                .is_none_or(|b| p.total_cap(cat).fits_in(b))
                .then_some(p)
        };
        // The candidates are built without their items (the decisions depend on loads
        // only); the winner is built again with them.
        let mut winner: Option<(u64, usize, Rule)> = None;
        for &o in &openers {
            for rule in [Rule::FirstFit, Rule::BestFit] {
                let p = self.construct(&order, o, rule, allowed, false);
                let fits = bound.is_none_or(|b| p.total_cap(cat).fits_in(b));
                let to_beat = winner.map_or(best.as_ref().map(|b| b.cost), |w| Some(w.0));
                if fits && to_beat.is_none_or(|c| p.cost < c) {
                    winner = Some((p.cost, o, rule));
                }
            }
        }
        match winner {
            Some((_, o, rule)) => Some(self.construct(&order, o, rule, allowed, true)),
            None => best,
        }
    }

    /// Opening types: all distinct capacities, or the largest type of each family when
    /// there are many items.
    fn openers(&self, allowed: &[usize], n: usize) -> Vec<usize> {
        let cat = self.cat;
        let mut out: Vec<usize> = Vec::new();
        if n > self.opts.many_items {
            let mut fams: Vec<usize> = allowed.iter().map(|&t| cat.family_of(t)).collect();
            fams.sort();
            fams.dedup();
            for f in fams {
                // Largest capacity (by CPU then memory), cheapest among equals.
                let t = allowed
                    .iter()
                    .copied()
                    .filter(|&t| cat.family_of(t) == f)
                    .max_by(|&a, &b| {
                        let (ca, cb) = (cat.types()[a].cap, cat.types()[b].cap);
                        (ca.cpu, ca.mem, std::cmp::Reverse(price(cat, a))).cmp(&(
                            cb.cpu,
                            cb.mem,
                            std::cmp::Reverse(price(cat, b)),
                        ))
                    });
                out.extend(t);
            }
        } else {
            for &t in allowed {
                if !out
                    .iter()
                    .any(|&u| cat.types()[u].cap == cat.types()[t].cap)
                {
                    out.push(t);
                }
            }
        }
        out
    }

    /// `items`: record the items of each bin (otherwise only loads, types and the cost).
    fn construct(
        &self,
        order: &[usize],
        o: usize,
        rule: Rule,
        allowed: &[usize],
        items: bool,
    ) -> Packing {
        let cat = self.cat;
        let cap_o = cat.types()[o].cap;
        let mut bins: Vec<(Res, Bin)> = Vec::new();
        let mut open: Vec<usize> = Vec::new();
        for &i in order {
            let r = self.items[i];
            let mut chosen: Option<usize> = None;
            match rule {
                Rule::FirstFit => {
                    chosen = open
                        .iter()
                        .copied()
                        .find(|&b| bins[b].1.load.plus(r).fits_in(bins[b].0));
                }
                Rule::BestFit => {
                    let mut best_slack = f64::INFINITY;
                    for &b in &open {
                        let (cap, bin) = &bins[b];
                        let nl = bin.load.plus(r);
                        if nl.fits_in(*cap) {
                            let slack = (cap.cpu - nl.cpu) as f64 / cap.cpu.max(1) as f64
                                + (cap.mem - nl.mem) as f64 / cap.mem.max(1) as f64;
                            if slack < best_slack {
                                best_slack = slack;
                                chosen = Some(b);
                            }
                        }
                    }
                }
            }
            let b = match chosen {
                Some(b) => b,
                None => {
                    let cap = if r.fits_in(cap_o) {
                        cap_o
                    } else {
                        let t = cat.cheapest_fitting(r, allowed).expect("checked by caller");
                        cat.types()[t].cap
                    };
                    bins.push((
                        cap,
                        Bin {
                            ty: o,
                            load: Res::default(),
                            items: Vec::new(),
                        },
                    ));
                    open.push(bins.len() - 1);
                    if open.len() > self.opts.window {
                        open.remove(0);
                    }
                    bins.len() - 1
                }
            };
            let bin = &mut bins[b].1;
            bin.load = bin.load.plus(r);
            if items {
                bin.items.push(i);
            }
        }
        let mut cost = 0;
        let bins: Vec<Bin> = bins
            .into_iter()
            .map(|(_, mut bin)| {
                bin.ty = cat
                    .cheapest_fitting(bin.load, allowed)
                    .expect("load within an allowed capacity");
                cost += price(cat, bin.ty);
                bin
            })
            .collect();
        Packing { cost, bins }
    }

    /// Waste of a bin: its price times its unused dominant share.
    fn waste(&self, b: &Bin) -> f64 {
        let t = &self.cat.types()[b.ty];
        t.price as f64 * (1.0 - b.load.dominant_share(t.cap)).max(0.0)
    }

    /// Step 2: local search, in place.
    pub fn improve(&self, p: &mut Packing, allowed: &[usize], bound: Option<Res>) {
        for _ in 0..self.opts.max_passes {
            let before = p.cost;
            self.split_pass(p, allowed, bound);
            self.move_pass(p, allowed, bound);
            self.pair_pass(p, allowed, bound);
            if p.cost >= before {
                break;
            }
        }
    }

    fn within(&self, cap: Res, bound: Option<Res>) -> bool {
        bound.is_none_or(|b| cap.fits_in(b))
    }

    fn split_pass(&self, p: &mut Packing, allowed: &[usize], bound: Option<Res>) {
        let cat = self.cat;
        let mut i = 0;
        while i < p.bins.len() {
            let bin = &p.bins[i];
            let pr = price(cat, bin.ty);
            let cheaper: Vec<usize> = allowed
                .iter()
                .copied()
                .filter(|&t| price(cat, t) < pr)
                .collect();
            if bin.items.len() >= 2 && !cheaper.is_empty() {
                if let Some(sub) = self.construct_all(&bin.items, &cheaper, None) {
                    let new_cap = p
                        .total_cap(cat)
                        .saturating_sub(cat.types()[bin.ty].cap)
                        .plus(sub.total_cap(cat));
                    if sub.cost < pr && self.within(new_cap, bound) {
                        p.cost = p.cost - pr + sub.cost;
                        p.bins.swap_remove(i);
                        p.bins.extend(sub.bins);
                        continue;
                    }
                }
            }
            i += 1;
        }
    }

    fn move_pass(&self, p: &mut Packing, allowed: &[usize], bound: Option<Res>) {
        let cat = self.cat;
        let mut order: Vec<usize> = (0..p.bins.len()).collect();
        order.sort_by(|&a, &b| {
            self.waste(&p.bins[b])
                .partial_cmp(&self.waste(&p.bins[a]))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        order.truncate(self.opts.move_sources);
        let mut removed = vec![false; p.bins.len()];
        for &src in &order {
            if removed[src] || p.bins[src].items.len() > 64 {
                continue;
            }
            // Tentative state of destinations: (bin, new load, new type).
            let mut tent: Vec<(usize, Res, usize)> = Vec::new();
            let mut delta: i64 = 0;
            let mut kept: Vec<usize> = Vec::new();
            let mut items = p.bins[src].items.clone();
            items.sort_by_key(|&i| std::cmp::Reverse(self.items[i].cpu + self.items[i].mem));
            for &it in &items {
                let r = self.items[it];
                let mut best: Option<(i64, usize, Res, usize)> = None;
                for (d, bin) in p.bins.iter().enumerate() {
                    if d == src || removed[d] {
                        continue;
                    }
                    let (load, ty) = tent
                        .iter()
                        .find(|x| x.0 == d)
                        .map_or((bin.load, bin.ty), |x| (x.1, x.2));
                    let nl = load.plus(r);
                    let (nt, dd) = if nl.fits_in(cat.types()[ty].cap) {
                        (ty, 0i64)
                    } else {
                        match cat.cheapest_fitting(nl, allowed) {
                            Some(nt) => (nt, price(cat, nt) as i64 - price(cat, ty) as i64),
                            None => continue,
                        }
                    };
                    if best.is_none_or(|b| dd < b.0) {
                        best = Some((dd, d, nl, nt));
                        if dd == 0 {
                            break;
                        }
                    }
                }
                match best {
                    Some((dd, d, nl, nt)) => {
                        delta += dd;
                        match tent.iter_mut().find(|x| x.0 == d) {
                            Some(x) => {
                                x.1 = nl;
                                x.2 = nt;
                            }
                            None => tent.push((d, nl, nt)),
                        }
                    }
                    None => kept.push(it),
                }
            }
            let old_src = price(cat, p.bins[src].ty);
            let kept_load = kept
                .iter()
                .fold(Res::default(), |a, &i| a.plus(self.items[i]));
            let new_src_ty = if kept.is_empty() {
                None
            } else {
                match cat.cheapest_fitting(kept_load, allowed) {
                    Some(t) => Some(t),
                    None => continue,
                }
            };
            delta += new_src_ty.map_or(0, |t| price(cat, t) as i64) - old_src as i64;
            if delta >= 0 {
                continue;
            }
            // Check the bound with the new capacities.
            let live_cap = p
                .bins
                .iter()
                .zip(&removed)
                .filter(|(_, &r)| !r)
                .fold(Res::default(), |a, (b, _)| a.plus(cat.types()[b.ty].cap));
            let mut cap = live_cap.saturating_sub(cat.types()[p.bins[src].ty].cap);
            if let Some(t) = new_src_ty {
                cap = cap.plus(cat.types()[t].cap);
            }
            for &(d, _, nt) in &tent {
                cap = cap
                    .saturating_sub(cat.types()[p.bins[d].ty].cap)
                    .plus(cat.types()[nt].cap);
            }
            if !self.within(cap, bound) {
                continue;
            }
            // Commit: re-run the assignment to know which item went where.
            let moved: Vec<usize> = items
                .iter()
                .copied()
                .filter(|i| !kept.contains(i))
                .collect();
            self.commit_moves(p, src, &moved, allowed);
            match new_src_ty {
                None => removed[src] = true,
                Some(t) => {
                    p.bins[src].items = kept.clone();
                    p.bins[src].load = kept_load;
                    p.bins[src].ty = t;
                }
            }
            if new_src_ty.is_none() {
                p.bins[src].items.clear();
                p.bins[src].load = Res::default();
            }
        }
        if removed.iter().any(|&r| r) {
            let mut k = 0;
            p.bins.retain(|_| {
                let keep = !removed[k];
                k += 1;
                keep
            });
        }
        p.cost = p.bins.iter().map(|b| price(cat, b.ty)).sum();
    }

    /// Replays the greedy destination choice of [`Self::move_pass`] for `moved` items and
    /// applies it.
    fn commit_moves(&self, p: &mut Packing, src: usize, moved: &[usize], allowed: &[usize]) {
        let cat = self.cat;
        for &it in moved {
            let r = self.items[it];
            let mut best: Option<(i64, usize, usize)> = None;
            for (d, bin) in p.bins.iter().enumerate() {
                if d == src || (bin.items.is_empty() && bin.load == Res::default()) {
                    continue;
                }
                let nl = bin.load.plus(r);
                let (nt, dd) = if nl.fits_in(cat.types()[bin.ty].cap) {
                    (bin.ty, 0i64)
                } else {
                    match cat.cheapest_fitting(nl, allowed) {
                        Some(nt) => (nt, price(cat, nt) as i64 - price(cat, bin.ty) as i64),
                        None => continue,
                    }
                };
                if best.is_none_or(|b| dd < b.0) {
                    best = Some((dd, d, nt));
                    if dd == 0 {
                        break;
                    }
                }
            }
            let (_, d, nt) = best.expect("a destination was found in the trial");
            let bin = &mut p.bins[d];
            bin.load = bin.load.plus(r);
            bin.items.push(it);
            bin.ty = nt;
        }
    }

    fn pair_pass(&self, p: &mut Packing, allowed: &[usize], bound: Option<Res>) {
        let cat = self.cat;
        if p.bins.len() < 2 {
            return;
        }
        let mut order: Vec<usize> = (0..p.bins.len()).collect();
        order.sort_by(|&a, &b| {
            self.waste(&p.bins[b])
                .partial_cmp(&self.waste(&p.bins[a]))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        order.truncate(self.opts.pair_candidates);
        let mut dead = vec![false; p.bins.len()];
        let mut added: Vec<Bin> = Vec::new();
        for x in 0..order.len() {
            for y in x + 1..order.len() {
                let (a, b) = (order[x], order[y]);
                if dead[a] || dead[b] {
                    continue;
                }
                let old = price(cat, p.bins[a].ty) + price(cat, p.bins[b].ty);
                let pool: Vec<usize> = p.bins[a]
                    .items
                    .iter()
                    .chain(&p.bins[b].items)
                    .copied()
                    .collect();
                if pool.len() > 256 {
                    continue;
                }
                let Some(sub) = self.construct_all(&pool, allowed, None) else {
                    continue;
                };
                if sub.cost >= old {
                    continue;
                }
                let cap = p
                    .bins
                    .iter()
                    .zip(&dead)
                    .filter(|(_, &d)| !d)
                    .fold(Res::default(), |acc, (b, _)| {
                        acc.plus(cat.types()[b.ty].cap)
                    })
                    .saturating_sub(cat.types()[p.bins[a].ty].cap)
                    .saturating_sub(cat.types()[p.bins[b].ty].cap)
                    .plus(sub.total_cap(cat))
                    .plus(
                        added
                            .iter()
                            .fold(Res::default(), |acc, b| acc.plus(cat.types()[b.ty].cap)),
                    );
                if !self.within(cap, bound) {
                    continue;
                }
                dead[a] = true;
                dead[b] = true;
                // Keep the old bins in place (zero-price marker comes from `dead`).
                added.extend(sub.bins);
            }
        }
        if dead.iter().any(|&d| d) {
            let mut k = 0;
            p.bins.retain(|_| {
                let keep = !dead[k];
                k += 1;
                keep
            });
            p.bins.extend(added);
            p.cost = p.bins.iter().map(|b| price(cat, b.ty)).sum();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::VmType;

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
            t("c.l", "c", 2, 4, 85),
            t("c.xl", "c", 4, 8, 170),
        ])
    }

    fn check(p: &Packing, items: &[Res], cat: &Catalogue, n: usize) {
        let mut seen = vec![0; n];
        let mut cost = 0;
        for b in &p.bins {
            let load = b
                .items
                .iter()
                .fold(Res::default(), |a, &i| a.plus(items[i]));
            assert_eq!(load, b.load);
            assert!(load.fits_in(cat.types()[b.ty].cap));
            for &i in &b.items {
                seen[i] += 1;
            }
            cost += cat.types()[b.ty].price;
        }
        assert_eq!(cost, p.cost);
        assert!(seen.iter().all(|&s| s == 1));
    }

    #[test]
    fn five_vcpu_splits_into_four_plus_two() {
        let c = cat();
        let items = vec![Res::new(1000, 4096); 5];
        let ids: Vec<usize> = (0..5).collect();
        let p = Packer::new(&c, &items, SearchOptions::default())
            .pack(&ids, &c.all(), None)
            .unwrap();
        check(&p, &items, &c, 5);
        // m.xl (4 vCPU, 16 GiB) + c.l (2 vCPU, 4 GiB) = 277 < m.2xl 384.
        assert_eq!(p.cost, 277);
    }

    #[test]
    fn bound_is_respected() {
        let c = cat();
        let items = vec![Res::new(1000, 4096); 5];
        let ids: Vec<usize> = (0..5).collect();
        let pk = Packer::new(&c, &items, SearchOptions::default());
        let p = pk
            .pack(&ids, &c.all(), Some(Res::new(6000, 24 * 1024)))
            .unwrap();
        check(&p, &items, &c, 5);
        assert!(p.total_cap(&c).fits_in(Res::new(6000, 24 * 1024)));
        assert!(pk
            .pack(&ids, &c.all(), Some(Res::new(4000, 100_000)))
            .is_none());
    }

    #[test]
    fn oversized_item_is_none() {
        let c = cat();
        let items = vec![Res::new(9000, 1)];
        assert!(Packer::new(&c, &items, SearchOptions::default())
            .pack(&[0], &c.all(), None)
            .is_none());
    }

    #[test]
    fn many_small_items_fill_big_vms() {
        let c = cat();
        let items = vec![Res::new(250, 1024); 100];
        let ids: Vec<usize> = (0..100).collect();
        let p = Packer::new(&c, &items, SearchOptions::default())
            .pack(&ids, &c.all(), None)
            .unwrap();
        check(&p, &items, &c, 100);
        // 25 vCPU, 100 GiB: the LP bound is 25/2 * 96 = 1200 (memory ratio of m).
        assert!(p.cost <= 1248, "{}", p.cost);
    }
}
