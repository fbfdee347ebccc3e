//! The exact part: variable-sized vector bin packing as a set cover over *patterns*, a
//! certified lower bound by column generation, and an integer solution by a MILP solver
//! (`microlp`) over the generated columns, started from the heuristic.
//!
//! # Formulation
//!
//! Items of equal size form a *class* `k` (size `s_k`, demand `D_k`). A *pattern* `p` is a
//! VM type `t(p)` and a count `a_kp` of items of each class that fits in it together
//! (`Σ_k a_kp s_k ≤ cap_t`); it costs `c_p = price(t)`. With `λ_p` the number of VMs
//! packed as `p`:
//!
//! ```text
//! min Σ_p c_p λ_p   s.t.   Σ_p a_kp λ_p ≥ D_k  (every class k),   λ_p ∈ ℕ
//! ```
//!
//! Any packing is such a `λ` (each VM is a pattern) and any such `λ` gives a packing of the
//! same or lower cost (drop the surplus items), so the optimum of this integer programme
//! is the optimum packing (Gilmore and Gomory's cutting-stock model, here with several VM
//! types and two dimensions).
//!
//! **Families that a pod must keep** (plan (b) on per-family hosts: the VMs of a spanning
//! pod share a host of one family). The types are split into *options* `o` (one per
//! family; a single option otherwise). Containers of single-container pods are *free*
//! (`F_k` of class `k`); identical multi-container pods form a *linked group* `g` of `m_g`
//! pods with `n_gk` containers of class `k`, and each pod of the group picks one option:
//!
//! ```text
//! Σ_{p ∈ o} a_kp λ_p − w_ko − Σ_g n_gk z_go ≥ 0     (k, o)
//! Σ_o w_ko = F_k     (k)          Σ_o z_go = m_g     (g)
//! λ, z integer ≥ 0,  w ≥ 0
//! ```
//!
//! This drops only the bound on a host's size, so its optimum is a lower bound on plan (b)
//! (and is plan (b) itself when the chosen VMs of each family fit one host, which the
//! caller checks by building the placement and validating it).
//!
//! # Certified lower bound
//!
//! The linear relaxation is solved by column generation: a dual of the restricted problem
//! (prices `π_ko ≥ 0` of the class rows) is computed with the LP solver, and the *pricing*
//! problem, for every type, is a bounded two-dimensional knapsack
//! `max Σ_k π_ko a_k  s.t.  Σ_k a_k s_k ≤ cap_t,  0 ≤ a_k ≤ D_k` solved by branch and bound
//! ([`knapsack`]). Patterns whose value exceeds their price are added; the loop stops when
//! none does. At every round, whatever the LP solver's accuracy, the bound is recomputed by
//! us from the dual prices alone: with `μ_k = min_o π_ko`, `ν_g = min_o Σ_k n_gk π_ko` and
//! `θ = max(1, max_t knapsack_t(π) / price_t)` (an upper bound of the knapsack when its
//! search is cut short), `(π, μ, ν) / θ` is feasible for the dual of the full problem, so
//!
//! ```text
//! LB = (Σ_k F_k μ_k + Σ_g m_g ν_g) / θ
//! ```
//!
//! is a lower bound of the linear relaxation, hence of the integer optimum (Farley's bound;
//! at convergence `θ = 1` and it is the LP optimum). It is rounded up to the greatest
//! common divisor of the prices (every cost is a multiple of it).
//!
//! # Integer solution
//!
//! The columns generated, the single-class columns and the heuristic's VMs form a MILP
//! (restricted master) solved by `microlp` under a time limit, from the heuristic's
//! solution as its warm start. Its solution is feasible for the full problem; it is optimal
//! when its cost meets the lower bound (the usual outcome: the set-cover relaxation of bin
//! packing is very tight), otherwise the gap is reported.
// Classes, options and groups are indices into several parallel tables.
#![allow(clippy::needless_range_loop)]
use std::time::{Duration, Instant};

use microlp::{ComparisonOp, LinearExpr, OptimizationDirection, Problem, SolveOptions, Variable};

use super::model::{Catalogue, Res};

/// A packing instance over item classes.
#[derive(Clone, Debug)]
pub struct Instance {
    /// Size of each class (none is zero in both dimensions).
    pub sizes: Vec<Res>,
    /// Options: the types (indices into the catalogue) of each.
    pub options: Vec<Vec<usize>>,
    /// Items of each class that may go to any option.
    pub free: Vec<u64>,
    /// Linked groups: `(counts per class, sparse; number of identical members)`.
    pub linked: Vec<(Vec<(usize, u64)>, u64)>,
}

/// One pattern: a VM type of an option and the items of each class it holds.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Pattern {
    /// Option index.
    pub opt: usize,
    /// Type index in the catalogue.
    pub ty: usize,
    /// `(class, count)` with count > 0, sorted by class.
    pub counts: Vec<(usize, u64)>,
}

/// A solution of an [`Instance`]: patterns with multiplicities, and for each linked group
/// how many members go to each option.
#[derive(Clone, Debug, Default)]
pub struct IntSolution {
    /// `(pattern, number of VMs)`.
    pub vms: Vec<(Pattern, u64)>,
    /// Per linked group, members per option.
    pub members: Vec<Vec<u64>>,
    /// Summed price.
    pub cost: u64,
}

/// What the exact part found.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Certified lower bound on the optimum (micro-dollars per hour).
    pub lower_bound: u64,
    /// The MILP's solution, if it found one.
    pub solution: Option<IntSolution>,
    /// Column-generation rounds and columns generated.
    pub rounds: usize,
    /// Whether column generation converged (the bound is the LP optimum).
    pub converged: bool,
}

/// Limits of the exact part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock budget for the whole instance.
    pub time: Duration,
    /// Branch-and-bound nodes per knapsack.
    pub knapsack_nodes: u64,
    /// Column-generation rounds.
    pub rounds: usize,
    /// Largest number of maximal patterns enumerated to make the MILP exact.
    pub enumerate: usize,
    /// Wall-clock budget of the MILP (within `time`).
    pub milp_time: Duration,
    /// Branch-and-bound nodes of the MILP (work, not time: the same on a loaded machine).
    pub milp_nodes: u64,
    /// Largest number of item classes for which the exact part runs at all; above it the
    /// caller keeps its plan and the demand bound. Column generation solves one dual LP
    /// per round over about `classes × types` columns: beyond ~50 classes `microlp` needs
    /// most of a second for one round and the bound it reaches stays far below the demand
    /// bound (measured: `docs/benchmarks.md`), so the time buys nothing.
    pub max_classes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            time: Duration::from_millis(500),
            knapsack_nodes: 50_000,
            rounds: 200,
            enumerate: 5000,
            milp_time: Duration::from_millis(150),
            milp_nodes: DEFAULT_MILP_NODES,
            max_classes: DEFAULT_MAX_CLASSES,
        }
    }
}

/// Default of [`Limits::milp_nodes`].
pub const DEFAULT_MILP_NODES: u64 = 500;

/// Default of [`Limits::max_classes`].
pub const DEFAULT_MAX_CLASSES: usize = 50;

impl Limits {
    /// Limits for a client's budget of `seconds`: half for each plan, 30 % of that for the
    /// MILP, and [`DEFAULT_MILP_NODES`] branch-and-bound nodes per second of the client's
    /// budget (at least that many).
    pub fn per_client(seconds: f64) -> Self {
        let plan = Duration::from_secs_f64((seconds / 2.0).clamp(0.0, 43_200.0));
        Self {
            time: plan,
            milp_time: plan.mul_f64(0.3),
            milp_nodes: (DEFAULT_MILP_NODES as f64 * seconds.clamp(1.0, 86_400.0)) as u64,
            ..Default::default()
        }
    }

    /// These limits for a client that may use at most `client` seconds in all (both
    /// plans): each plan's time at most half of it, the MILP's share kept.
    pub fn within(self, client: Duration) -> Self {
        let plan = self.time.min(client / 2);
        let ratio = if self.time.is_zero() {
            0.0
        } else {
            self.milp_time.as_secs_f64() / self.time.as_secs_f64()
        };
        Self {
            time: plan,
            milp_time: plan.mul_f64(ratio.clamp(0.0, 1.0)),
            ..self
        }
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Price unit of the objective in the solver: dollars (keeps coefficients near 1).
const SCALE: f64 = 1e-6;

impl Instance {
    /// Demand of each class over free items and linked groups.
    pub fn demand(&self) -> Vec<u64> {
        let mut d = self.free.clone();
        for (counts, m) in &self.linked {
            for &(k, n) in counts {
                d[k] = d[k].saturating_add(n.saturating_mul(*m));
            }
        }
        d
    }

    /// Largest count of class `k` that fits in type `t`, capped by `cap`.
    fn max_fit(&self, cat: &Catalogue, k: usize, t: usize, cap: u64) -> u64 {
        let s = self.sizes[k];
        let c = cat.types()[t].cap;
        let by = |need: u64, have: u64| have.checked_div(need).unwrap_or(u64::MAX);
        by(s.cpu, c.cpu).min(by(s.mem, c.mem)).min(cap)
    }

    /// `fits[k][o]`: class `k` fits some type of option `o`.
    fn fits(&self, cat: &Catalogue) -> Vec<Vec<bool>> {
        self.sizes
            .iter()
            .map(|&s| {
                self.options
                    .iter()
                    .map(|types| types.iter().any(|&t| s.fits_in(cat.types()[t].cap)))
                    .collect()
            })
            .collect()
    }

    /// Options a linked group may take (all its classes fit).
    fn allowed(&self, fits: &[Vec<bool>], g: usize) -> Vec<usize> {
        (0..self.options.len())
            .filter(|&o| self.linked[g].0.iter().all(|&(k, _)| fits[k][o]))
            .collect()
    }
}

/// Items of a knapsack over one VM type: `(class, value, size, most)`, with the two
/// one-dimensional fractional relaxations as an upper bound of what items `from..` can add
/// within a room.
struct Items {
    it: Vec<(usize, f64, Res, u64)>,
    /// Weightings `(w_cpu, w_mem)` of the two constraints whose sum is a valid single
    /// constraint, and for each the items by decreasing value per weighted size.
    dims: Vec<((f64, f64), Vec<usize>)>,
}

impl Items {
    /// `items` that fit `cap` at least once, ordered by decreasing value per normalised
    /// size.
    fn new(items: &[(usize, f64, Res, u64)], cap: Res) -> Self {
        let norm =
            |s: Res| s.cpu as f64 / cap.cpu.max(1) as f64 + s.mem as f64 / cap.mem.max(1) as f64;
        let mut it: Vec<(usize, f64, Res, u64)> = items
            .iter()
            .copied()
            .filter(|&(_, v, s, u)| v >= 0.0 && u > 0 && s.fits_in(cap))
            .collect();
        it.sort_by(|a, b| {
            let (ra, rb) = (a.1 / norm(a.2).max(1e-12), b.1 / norm(b.2).max(1e-12));
            rb.total_cmp(&ra).then(a.0.cmp(&b.0))
        });
        // The two constraints alone, and three mixes of them (surrogate relaxations).
        let (c, m) = (1.0 / cap.cpu.max(1) as f64, 1.0 / cap.mem.max(1) as f64);
        let weights = [
            (1.0, 0.0),
            (0.0, 1.0),
            (0.25 * c, 0.75 * m),
            (0.5 * c, 0.5 * m),
            (0.75 * c, 0.25 * m),
        ];
        let dims = weights
            .iter()
            .map(|&w| {
                let r = |i: usize| {
                    let s = Self::weighted(w, it[i].2);
                    if s == 0.0 {
                        f64::INFINITY
                    } else {
                        it[i].1 / s
                    }
                };
                let mut o: Vec<usize> = (0..it.len()).collect();
                o.sort_by(|&a, &b| r(b).total_cmp(&r(a)));
                (w, o)
            })
            .collect();
        Self { it, dims }
    }

    fn weighted(w: (f64, f64), s: Res) -> f64 {
        w.0 * s.cpu as f64 + w.1 * s.mem as f64
    }

    /// Upper bound of the value items `from..` can add within `room`: the smallest of the
    /// fractional relaxations of each weighted constraint.
    fn frac(&self, from: usize, room: Res) -> f64 {
        let mut best = f64::INFINITY;
        for (w, ord) in &self.dims {
            let mut left = Self::weighted(*w, room);
            let mut val = 0.0;
            for &j in ord {
                if j < from {
                    continue;
                }
                let (_, v, s, u) = self.it[j];
                let sz = Self::weighted(*w, s);
                let u = u as f64;
                if sz == 0.0 || sz * u <= left {
                    val += v * u;
                    left -= sz * u;
                } else {
                    val += v * left / sz;
                    break;
                }
            }
            best = best.min(val);
        }
        best
    }

    /// Greedy fill in density order: `(counts, value)`.
    fn greedy(&self, cap: Res) -> (Vec<(usize, u64)>, f64) {
        let mut room = cap;
        let mut val = 0.0;
        let mut counts = Vec::new();
        for i in 0..self.it.len() {
            let a = self.most(i, room);
            if a > 0 && self.it[i].1 > 0.0 {
                let (k, v, s, _) = self.it[i];
                room = room.saturating_sub(Res::new(s.cpu * a, s.mem * a));
                val += v * a as f64;
                counts.push((k, a));
            }
        }
        counts.sort();
        (counts, val)
    }

    /// Most copies of item `i` within `room`.
    fn most(&self, i: usize, room: Res) -> u64 {
        let (_, _, s, u) = self.it[i];
        let by = |need: u64, have: u64| have.checked_div(need).unwrap_or(u64::MAX);
        u.min(by(s.cpu, room.cpu)).min(by(s.mem, room.mem))
    }
}

/// The pricing problem: `max Σ v_k a_k` over `a` with `Σ a_k s_k ≤ cap`, `0 ≤ a_k ≤ u_k`.
/// Returns the best counts found, their value, and an upper bound on the maximum (equal to
/// the value when the search finished within `node_limit` nodes).
pub fn knapsack(
    items: &[(usize, f64, Res, u64)],
    cap: Res,
    node_limit: u64,
    deadline: Instant,
) -> (Vec<(usize, u64)>, f64, f64) {
    let positive: Vec<(usize, f64, Res, u64)> =
        items.iter().copied().filter(|x| x.1 > 0.0).collect();
    let its = Items::new(&positive, cap);
    let n = its.it.len();
    struct St {
        cur: Vec<u64>,
        best: Vec<u64>,
        best_val: f64,
        nodes: u64,
        limit: u64,
        cut: bool,
        deadline: Instant,
    }
    fn dfs(its: &Items, st: &mut St, i: usize, room: Res, val: f64) {
        st.nodes += 1;
        if val > st.best_val {
            st.best_val = val;
            st.best.clone_from(&st.cur);
        }
        if i == its.it.len() {
            return;
        }
        if st.nodes > st.limit || (st.nodes & 1023 == 0 && Instant::now() >= st.deadline) {
            st.cut = true;
            return;
        }
        if val + its.frac(i, room) <= st.best_val * (1.0 + 1e-12) + 1e-12 {
            return;
        }
        let (_, v, s, _) = its.it[i];
        for a in (0..=its.most(i, room)).rev() {
            st.cur[i] = a;
            let used = Res::new(s.cpu * a, s.mem * a);
            dfs(
                its,
                st,
                i + 1,
                room.saturating_sub(used),
                val + v * a as f64,
            );
            if st.cut {
                break;
            }
        }
        st.cur[i] = 0;
    }
    let root = its.frac(0, cap);
    let mut st = St {
        cur: vec![0; n],
        best: vec![0; n],
        best_val: 0.0,
        nodes: 0,
        limit: node_limit,
        cut: false,
        deadline,
    };
    dfs(&its, &mut st, 0, cap, 0.0);
    let mut counts: Vec<(usize, u64)> = (0..n)
        .filter(|&i| st.best[i] > 0)
        .map(|i| (its.it[i].0, st.best[i]))
        .collect();
    counts.sort();
    let ub = if st.cut {
        root.max(st.best_val)
    } else {
        st.best_val
    };
    (counts, st.best_val, ub)
}

/// Solves an instance: column generation for the bound, then the MILP over the columns.
/// `start` is a feasible solution (the heuristic's), used as warm start and as columns.
pub fn solve(
    inst: &Instance,
    cat: &Catalogue,
    start: Option<&IntSolution>,
    limits: Limits,
) -> Outcome {
    let t0 = Instant::now();
    let deadline = t0 + limits.time;
    let demand = inst.demand();
    let nk = inst.sizes.len();
    if nk > limits.max_classes {
        // Too many classes for the time: no bound from here (the caller's demand bound
        // stands), no search.
        return Outcome {
            lower_bound: 0,
            solution: None,
            rounds: 0,
            converged: false,
        };
    }
    let no = inst.options.len();
    let fits = inst.fits(cat);
    let allowed: Vec<Vec<usize>> = (0..inst.linked.len())
        .map(|g| inst.allowed(&fits, g))
        .collect();
    let price = |t: usize| cat.types()[t].price;
    let unit = inst
        .options
        .iter()
        .flatten()
        .fold(0, |g, &t| gcd(g, price(t)))
        .max(1);

    // Column pool: single-class columns, then the start's.
    let mut pool: Vec<Pattern> = Vec::new();
    let mut seen: std::collections::HashSet<Pattern> = Default::default();
    let mut push = |p: Pattern, pool: &mut Vec<Pattern>| {
        if !p.counts.is_empty() && seen.insert(p.clone()) {
            pool.push(p);
        }
    };
    for k in 0..nk {
        for (o, types) in inst.options.iter().enumerate() {
            for &t in types {
                let a = inst.max_fit(cat, k, t, demand[k]);
                if a > 0 {
                    push(
                        Pattern {
                            opt: o,
                            ty: t,
                            counts: vec![(k, a)],
                        },
                        &mut pool,
                    );
                }
            }
        }
    }
    if let Some(s) = start {
        for (p, _) in &s.vms {
            push(p.clone(), &mut pool);
        }
    }

    // Column generation on the dual.
    let mut best_lb = 0.0f64;
    // The dual prices of the best bound, scaled by 1/θ (feasible for the full dual).
    let mut best_pi: Vec<Vec<f64>> = vec![vec![0.0; no]; nk];
    let mut rounds = 0;
    let mut converged = false;
    let mut proven_by_bound = false;
    let mut history: Vec<f64> = Vec::new();
    let ub = start.map(|s| s.cost);
    let round_up = |x: f64| {
        let units = (x / SCALE / unit as f64 - 1e-6).ceil().max(0.0);
        (units as u64).saturating_mul(unit)
    };
    let mut lp_time = Duration::ZERO;
    let cg_deadline = deadline
        .checked_sub(limits.milp_time)
        .unwrap_or(deadline)
        .max(t0);
    while rounds < limits.rounds && Instant::now() < cg_deadline {
        rounds += 1;
        let t_lp = Instant::now();
        let Some(pi) = dual_prices(inst, cat, &pool, &fits, &allowed, cg_deadline) else {
            break;
        };
        lp_time += t_lp.elapsed();
        // Bound from these prices, and new columns: a greedy pricing first (θ from the
        // relaxation's bound), the exact knapsack only when the greedy finds nothing.
        let mut theta = 1.0f64;
        let mut added = 0;
        for exact in [false, true] {
            for (o, types) in inst.options.iter().enumerate() {
                let items: Vec<(usize, f64, Res, u64)> = (0..nk)
                    .filter(|&k| fits[k][o])
                    .map(|k| (k, pi[k][o], inst.sizes[k], demand[k]))
                    .collect();
                for &t in types {
                    let c = price(t) as f64 * SCALE;
                    let cap = cat.types()[t].cap;
                    let (counts, val, ub) = if exact {
                        // The relaxation's bound first: most types need no search.
                        let positive: Vec<(usize, f64, Res, u64)> =
                            items.iter().copied().filter(|x| x.1 > 0.0).collect();
                        let root = Items::new(&positive, cap).frac(0, cap);
                        if root <= c * (1.0 + 1e-9) {
                            (Vec::new(), 0.0, root)
                        } else {
                            knapsack(&items, cap, limits.knapsack_nodes, cg_deadline)
                        }
                    } else {
                        let positive: Vec<(usize, f64, Res, u64)> =
                            items.iter().copied().filter(|x| x.1 > 0.0).collect();
                        let its = Items::new(&positive, cap);
                        let (counts, val) = its.greedy(cap);
                        (counts, val, its.frac(0, cap).max(val))
                    };
                    theta = theta.max(ub / c);
                    if val > c * (1.0 + 1e-9) {
                        let p = Pattern {
                            opt: o,
                            ty: t,
                            counts,
                        };
                        let before = pool.len();
                        push(p, &mut pool);
                        added += pool.len() - before;
                    }
                }
            }
            if added > 0 || Instant::now() >= cg_deadline {
                break;
            }
            // The greedy found nothing: the exact pass recomputes θ.
            theta = 1.0;
        }
        let mu: Vec<f64> = (0..nk)
            .map(|k| {
                (0..no)
                    .filter(|&o| fits[k][o])
                    .map(|o| pi[k][o])
                    .fold(f64::INFINITY, f64::min)
            })
            .collect();
        let mut obj = 0.0;
        for k in 0..nk {
            if inst.free[k] > 0 && mu[k].is_finite() {
                obj += inst.free[k] as f64 * mu[k];
            }
        }
        for (g, (counts, m)) in inst.linked.iter().enumerate() {
            let nu = allowed[g]
                .iter()
                .map(|&o| {
                    counts
                        .iter()
                        .map(|&(k, n)| n as f64 * pi[k][o])
                        .sum::<f64>()
                })
                .fold(f64::INFINITY, f64::min);
            if nu.is_finite() {
                obj += *m as f64 * nu;
            }
        }
        if obj / theta > best_lb {
            best_lb = obj / theta;
            best_pi = pi
                .iter()
                .map(|row| row.iter().map(|x| x / theta).collect())
                .collect();
        }
        // Proven by the bound alone: the incumbent is optimal.
        if ub.is_some_and(|u| round_up(best_lb) >= u) {
            proven_by_bound = true;
            break;
        }
        // Tailing off: stop when ten rounds gained less than 0.1 % of the gap.
        history.push(best_lb);
        if history.len() > 10 {
            let old = history[history.len() - 11];
            let gap = ub.map_or(f64::INFINITY, |u| u as f64 * SCALE - old);
            if best_lb - old < 1e-3 * gap {
                break;
            }
        }
        if added == 0 {
            converged = theta <= 1.0 + 1e-9;
            break;
        }
    }
    // Rounded to the price unit, with a margin for float error (never rounds a true bound
    // up past it).
    let mut lower_bound = round_up(best_lb);
    if proven_by_bound {
        return Outcome {
            lower_bound: lower_bound.min(ub.unwrap_or(lower_bound)),
            solution: None,
            rounds,
            converged,
        };
    }

    // Reduced-cost enumeration: a solution cheaper than the incumbent `ub` uses only
    // patterns whose reduced cost (under the scaled prices) is below `ub − LB`, since
    // cost ≥ LB + Σ_p (reduced cost of p) λ_p. With all of them in the pool, the MILP
    // decides: its bound, or `ub` if it finds nothing cheaper, is a global bound.
    let gap = ub.map_or(f64::INFINITY, |u| u as f64 * SCALE - best_lb) * (1.0 + 1e-9) + 1e-9;
    let complete = match enumerate(
        inst,
        cat,
        &demand,
        &fits,
        &best_pi,
        gap,
        limits.enumerate,
        cg_deadline.max(Instant::now() + limits.milp_time / 2),
    ) {
        Some(all) => {
            for p in all {
                push(p, &mut pool);
            }
            true
        }
        None => false,
    };
    let t_cg = t0.elapsed();
    let milp_deadline = deadline.min(Instant::now() + limits.milp_time);
    let (solution, milp_bound, milp_nodes) = milp(
        inst,
        cat,
        &pool,
        &fits,
        &allowed,
        start,
        milp_deadline,
        limits.milp_nodes,
    );
    if std::env::var_os("NESTLESS_SETCOVER_DEBUG").is_some() {
        eprintln!(
            "setcover: classes {nk} options {no} linked {} rounds {rounds} converged {converged} pool {} complete {complete} lb {:.6} ub {:?} milp {:?} bound {:?} nodes {milp_nodes} cg {:.3}s (lp {:.3}s) total {:.3}s",
            inst.linked.len(),
            pool.len(),
            best_lb,
            ub,
            solution.as_ref().map(|s| s.cost),
            milp_bound,
            t_cg.as_secs_f64(),
            lp_time.as_secs_f64(),
            t0.elapsed().as_secs_f64()
        );
    }
    if complete {
        if let Some(b) = milp_bound {
            let b = round_up(b - 1e-6 * b.abs().max(1.0));
            lower_bound = lower_bound.max(ub.map_or(b, |u| b.min(u)));
        }
    }
    if let Some(s) = &solution {
        // A solution below the bound would mean a wrong bound: never report that.
        lower_bound = lower_bound.min(s.cost);
    }
    if let Some(s) = start {
        lower_bound = lower_bound.min(s.cost);
    }
    Outcome {
        lower_bound,
        solution,
        rounds,
        converged,
    }
}

/// Dual prices `π[k][o]` of the restricted problem over `pool`, from its dual LP.
fn dual_prices(
    inst: &Instance,
    cat: &Catalogue,
    pool: &[Pattern],
    fits: &[Vec<bool>],
    allowed: &[Vec<usize>],
    deadline: Instant,
) -> Option<Vec<Vec<f64>>> {
    let nk = inst.sizes.len();
    let no = inst.options.len();
    let mut lp = Problem::new(OptimizationDirection::Maximize);
    // π_ko ≥ 0 (objective 0), μ_k ≥ 0 (objective F_k), ν_g ≥ 0 (objective m_g).
    let pi: Vec<Vec<Option<Variable>>> = (0..nk)
        .map(|k| {
            (0..no)
                .map(|o| fits[k][o].then(|| lp.add_var(0.0, (0.0, f64::INFINITY))))
                .collect()
        })
        .collect();
    for k in 0..nk {
        if inst.free[k] > 0 {
            let mu = lp.add_var(inst.free[k] as f64, (0.0, f64::INFINITY));
            for o in 0..no {
                if let Some(p) = pi[k][o] {
                    lp.add_constraint([(mu, 1.0), (p, -1.0)], ComparisonOp::Le, 0.0);
                }
            }
        }
    }
    for (g, (counts, m)) in inst.linked.iter().enumerate() {
        let nu = lp.add_var(*m as f64, (0.0, f64::INFINITY));
        for &o in &allowed[g] {
            let mut e = LinearExpr::empty();
            e.add(nu, 1.0);
            for &(k, n) in counts {
                if let Some(p) = pi[k][o] {
                    e.add(p, -(n as f64));
                }
            }
            lp.add_constraint(e, ComparisonOp::Le, 0.0);
        }
    }
    for p in pool {
        let mut e = LinearExpr::empty();
        for &(k, a) in &p.counts {
            if let Some(v) = pi[k][p.opt] {
                e.add(v, a as f64);
            }
        }
        lp.add_constraint(e, ComparisonOp::Le, cat.types()[p.ty].price as f64 * SCALE);
    }
    let left = deadline.saturating_duration_since(Instant::now());
    let mut opts = SolveOptions::default();
    opts.time_limit = Some(left.max(Duration::from_millis(1)));
    let sol = lp.solve_with(opts).ok()?;
    let sol = sol.solution()?;
    Some(
        pi.iter()
            .map(|row| {
                row.iter()
                    .map(|v| v.map_or(0.0, |v| sol.var_value(v).max(0.0)))
                    .collect()
            })
            .collect(),
    )
}

/// The MILP over `pool`, from `start` if given, within `deadline` and `nodes`
/// branch-and-bound nodes: its solution, its bound, and the nodes it used.
#[allow(clippy::too_many_arguments)]
fn milp(
    inst: &Instance,
    cat: &Catalogue,
    pool: &[Pattern],
    fits: &[Vec<bool>],
    allowed: &[Vec<usize>],
    start: Option<&IntSolution>,
    deadline: Instant,
    nodes: u64,
) -> (Option<IntSolution>, Option<f64>, u64) {
    let nk = inst.sizes.len();
    let no = inst.options.len();
    let demand = inst.demand();
    let mut mp = Problem::new(OptimizationDirection::Minimize);
    let clamp = |x: u64| i32::try_from(x).unwrap_or(i32::MAX);
    let lam: Vec<Variable> = pool
        .iter()
        .map(|p| {
            // No more VMs of a pattern than its scarcest class needs.
            let most = p
                .counts
                .iter()
                .map(|&(k, a)| demand[k].div_ceil(a))
                .max()
                .unwrap_or(0);
            mp.add_integer_var(cat.types()[p.ty].price as f64 * SCALE, (0, clamp(most)))
        })
        .collect();
    // With one option, linking is void: plain covering rows.
    let single = no == 1;
    let mut w: Vec<Vec<Option<Variable>>> = vec![vec![None; no]; nk];
    let mut z: Vec<Vec<Option<Variable>>> = vec![vec![None; no]; inst.linked.len()];
    if !single {
        for k in 0..nk {
            if inst.free[k] > 0 {
                let mut e = LinearExpr::empty();
                for o in 0..no {
                    if fits[k][o] {
                        let v = mp.add_var(0.0, (0.0, f64::INFINITY));
                        w[k][o] = Some(v);
                        e.add(v, 1.0);
                    }
                }
                mp.add_constraint(e, ComparisonOp::Eq, inst.free[k] as f64);
            }
        }
        for (g, (_, m)) in inst.linked.iter().enumerate() {
            let mut e = LinearExpr::empty();
            for &o in &allowed[g] {
                let v = mp.add_integer_var(0.0, (0, clamp(*m)));
                z[g][o] = Some(v);
                e.add(v, 1.0);
            }
            if allowed[g].is_empty() {
                return (None, None, 0);
            }
            mp.add_constraint(e, ComparisonOp::Eq, *m as f64);
        }
    }
    for k in 0..nk {
        for o in 0..if single { 1 } else { no } {
            let mut e = LinearExpr::empty();
            for (p, &v) in pool.iter().zip(&lam) {
                if single || p.opt == o {
                    if let Some(&(_, a)) = p.counts.iter().find(|x| x.0 == k) {
                        e.add(v, a as f64);
                    }
                }
            }
            if single {
                mp.add_constraint(e, ComparisonOp::Ge, demand[k] as f64);
                continue;
            }
            if let Some(v) = w[k][o] {
                e.add(v, -1.0);
            }
            for (g, (counts, _)) in inst.linked.iter().enumerate() {
                if let (Some(v), Some(&(_, n))) = (z[g][o], counts.iter().find(|x| x.0 == k)) {
                    e.add(v, -(n as f64));
                }
            }
            if fits[k][o] {
                mp.add_constraint(e, ComparisonOp::Ge, 0.0);
            }
        }
    }
    let warm = start.map(|s| {
        let mut hint: Vec<(Variable, f64)> = Vec::new();
        for (p, &v) in pool.iter().zip(&lam) {
            let n = s
                .vms
                .iter()
                .filter(|(q, _)| q == p)
                .map(|(_, n)| *n)
                .sum::<u64>();
            hint.push((v, n as f64));
        }
        for (g, row) in z.iter().enumerate() {
            for (o, v) in row.iter().enumerate() {
                if let Some(v) = v {
                    let n = s
                        .members
                        .get(g)
                        .and_then(|m| m.get(o))
                        .copied()
                        .unwrap_or(0);
                    hint.push((*v, n as f64));
                }
            }
        }
        hint
    });
    let left = deadline.saturating_duration_since(Instant::now());
    let mut opts = SolveOptions::default();
    if left.is_zero() {
        return (None, None, 0);
    }
    opts.time_limit = Some(left);
    opts.node_limit = Some(nodes);
    opts.warm_start = warm;
    let Ok(out) = mp.solve_with(opts) else {
        return (None, None, 0);
    };
    let used = out.stats().nodes_solved;
    // The solver's bound on this MILP: its optimum when proven, else its best bound.
    let bound = if out.is_optimal() {
        out.solution().map(|s| s.objective())
    } else {
        out.stats().best_bound
    };
    let Some(sol) = out.solution() else {
        return (None, bound, used);
    };
    let round = |v: Variable| sol.var_value(v).round().max(0.0) as u64;
    let vms: Vec<(Pattern, u64)> = pool
        .iter()
        .zip(&lam)
        .map(|(p, &v)| (p.clone(), round(v)))
        .filter(|x| x.1 > 0)
        .collect();
    let members: Vec<Vec<u64>> = if single {
        inst.linked.iter().map(|(_, m)| vec![*m]).collect()
    } else {
        z.iter()
            .map(|row| row.iter().map(|v| v.map_or(0, round)).collect())
            .collect()
    };
    let cost = vms
        .iter()
        .map(|(p, n)| cat.types()[p.ty].price.saturating_mul(*n))
        .fold(0u64, u64::saturating_add);
    let s = IntSolution { vms, members, cost };
    (check(inst, &s).then_some(s), bound, used)
}

/// Every maximal pattern (no class below its demand can be added) whose reduced cost
/// `c_p − Σ_k π_ko a_kp` is below `gap` (in solver units), or `None` if there are more
/// than `limit` or the search visits more than `20 × limit` patterns.
#[allow(clippy::too_many_arguments)]
fn enumerate(
    inst: &Instance,
    cat: &Catalogue,
    demand: &[u64],
    fits: &[Vec<bool>],
    pi: &[Vec<f64>],
    gap: f64,
    limit: usize,
    deadline: Instant,
) -> Option<Vec<Pattern>> {
    struct Ctx<'a> {
        its: Items,
        sizes: &'a [Res],
        demand: &'a [u64],
        ks: &'a [usize],
        cost: f64,
        gap: f64,
        cur: Vec<u64>,
        out: Vec<Vec<(usize, u64)>>,
        visited: usize,
        limit: usize,
        deadline: Instant,
    }
    fn rec(c: &mut Ctx<'_>, i: usize, room: Res, val: f64) -> bool {
        c.visited += 1;
        if c.visited > c.limit.saturating_mul(20)
            || (c.visited & 1023 == 0 && Instant::now() >= c.deadline)
        {
            return false;
        }
        // Even the best completion keeps the reduced cost at or above the gap.
        if c.cost - (val + c.its.frac(i, room)) >= c.gap {
            return true;
        }
        if i == c.its.it.len() {
            let maximal = c.ks.iter().all(|&k| {
                let a = c
                    .its
                    .it
                    .iter()
                    .position(|x| x.0 == k)
                    .map_or(0, |j| c.cur[j]);
                a >= c.demand[k] || !c.sizes[k].fits_in(room)
            });
            if maximal && c.cur.iter().any(|&a| a > 0) {
                let counts = c
                    .its
                    .it
                    .iter()
                    .zip(&c.cur)
                    .filter(|x| *x.1 > 0)
                    .map(|(x, &a)| (x.0, a))
                    .collect();
                c.out.push(counts);
                return c.out.len() <= c.limit;
            }
            return true;
        }
        let (_, v, s, _) = c.its.it[i];
        for a in (0..=c.its.most(i, room)).rev() {
            c.cur[i] = a;
            let used = Res::new(s.cpu * a, s.mem * a);
            if !rec(c, i + 1, room.saturating_sub(used), val + v * a as f64) {
                return false;
            }
        }
        c.cur[i] = 0;
        true
    }
    let mut out: Vec<Pattern> = Vec::new();
    let mut visited = 0;
    for (o, types) in inst.options.iter().enumerate() {
        let ks: Vec<usize> = (0..inst.sizes.len()).filter(|&k| fits[k][o]).collect();
        let items: Vec<(usize, f64, Res, u64)> = ks
            .iter()
            .map(|&k| (k, pi[k][o].max(0.0), inst.sizes[k], demand[k]))
            .collect();
        for &t in types {
            let cap = cat.types()[t].cap;
            let its = Items::new(&items, cap);
            let n = its.it.len();
            let mut c = Ctx {
                its,
                sizes: &inst.sizes,
                demand,
                ks: &ks,
                cost: cat.types()[t].price as f64 * SCALE,
                gap,
                cur: vec![0; n],
                out: Vec::new(),
                visited,
                limit: limit.saturating_sub(out.len()),
                deadline,
            };
            if !rec(&mut c, 0, cap, 0.0) {
                return None;
            }
            visited = c.visited;
            out.extend(c.out.into_iter().map(|counts| Pattern {
                opt: o,
                ty: t,
                counts: {
                    let mut v: Vec<(usize, u64)> = counts;
                    v.sort();
                    v
                },
            }));
        }
    }
    Some(out)
}

/// Whether `s` covers the instance (checked in integers, whatever the solver's tolerance).
pub fn check(inst: &Instance, s: &IntSolution) -> bool {
    let no = inst.options.len();
    let nk = inst.sizes.len();
    let mut supply = vec![vec![0u64; no]; nk];
    for (p, n) in &s.vms {
        if p.opt >= no {
            return false;
        }
        for &(k, a) in &p.counts {
            if k >= nk {
                return false;
            }
            supply[k][p.opt] = supply[k][p.opt].saturating_add(a.saturating_mul(*n));
        }
    }
    for (g, (counts, m)) in inst.linked.iter().enumerate() {
        let per = s.members.get(g);
        let total: u64 = per.map_or(0, |v| v.iter().sum());
        if total != *m {
            return false;
        }
        for o in 0..no {
            let cnt = per.and_then(|v| v.get(o)).copied().unwrap_or(0);
            for &(k, n) in counts {
                let want = n.saturating_mul(cnt);
                if supply[k][o] < want {
                    return false;
                }
                supply[k][o] -= want;
            }
        }
    }
    (0..nk).all(|k| supply[k].iter().sum::<u64>() >= inst.free[k])
}
