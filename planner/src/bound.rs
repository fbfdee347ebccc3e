//! Lower bound on a client's cost: the LP (fractional) relaxation.
//!
//! Any placement, with or without Hostlo, rents VMs whose summed capacity covers the
//! summed request `D`. Relaxing "whole VMs" to "fractions of VMs" gives the linear
//! programme `min Σ p_t x_t` subject to `Σ x_t cap_t ≥ D`, `x ≥ 0`. With two constraints
//! (CPU and memory) an optimal basic solution uses at most two types, so the optimum is the
//! cheapest of: one type scaled to cover both dimensions, or two types mixed so that both
//! constraints are tight.
use super::model::{Catalogue, Res};

/// The LP lower bound in micro-dollars per hour (0 for a zero demand).
pub fn lp_bound(demand: Res, cat: &Catalogue) -> f64 {
    if demand == Res::default() {
        return 0.0;
    }
    let (dc, dm) = (demand.cpu as f64, demand.mem as f64);
    let mut best = f64::INFINITY;
    let types = cat.types();
    for t in types {
        let need = ratio(dc, t.cap.cpu).max(ratio(dm, t.cap.mem));
        best = best.min(need * t.price as f64);
    }
    for (i, a) in types.iter().enumerate() {
        for b in &types[i + 1..] {
            let (ac, am, bc, bm) = (
                a.cap.cpu as f64,
                a.cap.mem as f64,
                b.cap.cpu as f64,
                b.cap.mem as f64,
            );
            let det = ac * bm - bc * am;
            if det.abs() < 1e-9 {
                continue;
            }
            let xa = (dc * bm - bc * dm) / det;
            let xb = (ac * dm - dc * am) / det;
            if xa >= 0.0 && xb >= 0.0 {
                best = best.min(xa * a.price as f64 + xb * b.price as f64);
            }
        }
    }
    best
}

fn ratio(d: f64, c: u64) -> f64 {
    if d == 0.0 {
        0.0
    } else if c == 0 {
        f64::INFINITY
    } else {
        d / c as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::VmType;

    #[test]
    fn mixes_two_shapes() {
        let t = |n: &str, c: u64, m: u64, p: u64| VmType {
            name: n.into(),
            family: n.into(),
            cap: Res::new(c, m),
            price: p,
        };
        let cat = Catalogue::new(vec![t("cpu", 2, 1, 10), t("mem", 1, 2, 10)]);
        // (3, 3): 1 of each = 20; either alone needs 3 = 30.
        assert!((lp_bound(Res::new(3, 3), &cat) - 20.0).abs() < 1e-9);
        assert!((lp_bound(Res::new(4, 0), &cat) - 20.0).abs() < 1e-9);
        assert_eq!(lp_bound(Res::default(), &cat), 0.0);
    }
}
