//! Results: one row per client, the paper-style summary, text/CSV/JSON writers and the
//! CDF of savings as SVG.
use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::model::{usd, Catalogue, Client, Placement};
use super::plan::ClientPlan;

/// Whether a client could be planned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Both plans exist.
    Ok,
    /// Only the Hostlo plan exists (a pod fits no VM but fits a host).
    HostloOnly,
    /// Neither plan exists (a pod fits no host).
    Infeasible,
}

/// What can be said of a client's saving, given both plans and their bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Hostlo saves, proven: the bound of (a) exceeds the cost of plan (b), so the optimum
    /// of (a) exceeds the optimum of (b).
    Saves,
    /// No saving, proven: the bound of (b) reaches the cost of plan (a), so both optima are
    /// equal.
    NoSaving,
    /// Every pod has one container: nothing can span, (b) is (a); never a saving.
    SingleContainer,
    /// The bounds do not decide; the saving lies between 0 and `saving_max_pct`.
    Undecided,
    /// Plan (a) or (b) does not exist.
    NotPlanned,
}

/// One client's result. Costs and bounds in $/h.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClientRow {
    /// Client name.
    pub client: String,
    /// Pods.
    pub pods: usize,
    /// Containers.
    pub containers: usize,
    /// Summed CPU request, vCPU.
    pub vcpu: f64,
    /// Summed memory request, GiB.
    pub gib: f64,
    /// Whether it could be planned.
    pub status: Status,
    /// Cost of plan (a).
    pub cost_whole: Option<f64>,
    /// Cost of plan (b).
    pub cost_hostlo: Option<f64>,
    /// Certified lower bound of the optimum of (a).
    pub bound_whole: Option<f64>,
    /// Certified lower bound of the optimum of (b).
    pub bound_hostlo: Option<f64>,
    /// `(cost − bound) / cost` of (a), percent: 0 when proven optimal.
    pub gap_whole_pct: Option<f64>,
    /// The same for (b).
    pub gap_hostlo_pct: Option<f64>,
    /// The verdict on the saving.
    pub verdict: Verdict,
    /// The saving of plan (b) over plan (a), `(a − b) / a`, percent, when it is proven
    /// positive (verdict `saves`); 0 for `no-saving` and `single-container`; `None`
    /// otherwise.
    pub saving_pct: Option<f64>,
    /// Smallest saving the bounds allow, `1 − cost_b / bound_a` (at least 0), percent.
    pub saving_min_pct: Option<f64>,
    /// Largest saving the bounds allow, `1 − bound_b / cost_a`, percent.
    pub saving_max_pct: Option<f64>,
    /// VMs of plan (a).
    pub vms_whole: usize,
    /// VMs of plan (b).
    pub vms_hostlo: usize,
    /// Pods that span VMs in plan (b).
    pub spanning_pods: usize,
    /// VM types of plan (a), `type:count` separated by spaces.
    pub types_whole: String,
    /// VM types of plan (b).
    pub types_hostlo: String,
}

fn type_mix(p: Option<&Placement>, cat: &Catalogue) -> String {
    let Some(p) = p else { return String::new() };
    let mut m: BTreeMap<&str, usize> = BTreeMap::new();
    for vm in &p.vms {
        *m.entry(cat.types()[vm.ty].name.as_str()).or_default() += 1;
    }
    m.iter()
        .map(|(k, v)| format!("{k}:{v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The verdict and the saving interval `(point, min, max)` in percent, from the costs and
/// bounds of both plans (micro-dollars).
pub fn verdict(
    single_container: bool,
    costs: Option<(u64, u64)>,
    bounds: (u64, u64),
) -> (Verdict, Option<f64>, Option<f64>, Option<f64>) {
    let Some((a, b)) = costs else {
        return (Verdict::NotPlanned, None, None, None);
    };
    let (lb_a, lb_b) = bounds;
    let pct = |x: f64| 100.0 * x;
    let smin = if lb_a > 0 && lb_a > b {
        pct(1.0 - b as f64 / lb_a as f64)
    } else {
        0.0
    };
    let smax = if a > 0 && a > lb_b {
        pct(1.0 - lb_b as f64 / a as f64)
    } else {
        0.0
    };
    let point = if a > 0 && a > b {
        pct((a - b) as f64 / a as f64)
    } else {
        0.0
    };
    if single_container {
        (Verdict::SingleContainer, Some(0.0), Some(0.0), Some(0.0))
    } else if lb_a > b {
        (Verdict::Saves, Some(point), Some(smin), Some(smax))
    } else if lb_b >= a {
        (Verdict::NoSaving, Some(0.0), Some(0.0), Some(0.0))
    } else {
        (Verdict::Undecided, None, Some(0.0), Some(smax))
    }
}

/// Builds the row of a client from its plans.
pub fn client_row(client: &Client, plan: &ClientPlan, cat: &Catalogue) -> ClientRow {
    let a = plan.whole.as_ref().map(|p| p.cost(cat));
    let b = plan.hostlo.as_ref().map(|p| p.cost(cat));
    let status = match (a, b) {
        (Some(_), Some(_)) => Status::Ok,
        (None, Some(_)) => Status::HostloOnly,
        _ => Status::Infeasible,
    };
    let costs = a.zip(b);
    let (verdict, saving_pct, saving_min_pct, saving_max_pct) = verdict(
        plan.single_container,
        costs,
        (plan.bound_whole, plan.bound_hostlo),
    );
    let gap = |c: Option<u64>, lb: u64| {
        c.map(|c| {
            if c > 0 {
                100.0 * c.saturating_sub(lb) as f64 / c as f64
            } else {
                0.0
            }
        })
    };
    let d = client.demand();
    ClientRow {
        client: client.name.clone(),
        pods: client.pods.len(),
        containers: client.container_count(),
        vcpu: d.vcpu(),
        gib: d.gib(),
        status,
        cost_whole: a.map(usd),
        cost_hostlo: b.map(usd),
        bound_whole: a.map(|_| usd(plan.bound_whole)),
        bound_hostlo: b.map(|_| usd(plan.bound_hostlo)),
        gap_whole_pct: gap(a, plan.bound_whole),
        gap_hostlo_pct: gap(b, plan.bound_hostlo),
        verdict,
        saving_pct,
        saving_min_pct,
        saving_max_pct,
        vms_whole: plan.whole.as_ref().map_or(0, |p| p.vms.len()),
        vms_hostlo: plan.hostlo.as_ref().map_or(0, |p| p.vms.len()),
        spanning_pods: plan.hostlo.as_ref().map_or(0, |p| p.spanning_pods().len()),
        types_whole: type_mix(plan.whole.as_ref(), cat),
        types_hostlo: type_mix(plan.hostlo.as_ref(), cat),
    }
}

/// Distribution of the certified gaps of one plan over the planned clients.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GapStats {
    /// Clients whose plan is proven optimal (gap 0).
    pub optimal: usize,
    /// Clients with a gap above 0 and at most 1 %.
    pub up_to_1_pct: usize,
    /// Above 1 % and at most 5 %.
    pub up_to_5_pct: usize,
    /// Above 5 %.
    pub above_5_pct: usize,
    /// Mean gap, percent.
    pub mean_pct: f64,
    /// Largest gap, percent.
    pub max_pct: f64,
    /// Gap of the summed bill: `(Σ cost − Σ bound) / Σ cost`, percent.
    pub total_pct: f64,
}

fn gap_stats(rows: &[&ClientRow], gap: impl Fn(&ClientRow) -> Option<f64>) -> GapStats {
    let mut g = GapStats::default();
    let gaps: Vec<f64> = rows.iter().filter_map(|r| gap(r)).collect();
    for &x in &gaps {
        if x <= 0.0 {
            g.optimal += 1;
        } else if x <= 1.0 {
            g.up_to_1_pct += 1;
        } else if x <= 5.0 {
            g.up_to_5_pct += 1;
        } else {
            g.above_5_pct += 1;
        }
        g.max_pct = g.max_pct.max(x);
    }
    if !gaps.is_empty() {
        g.mean_pct = gaps.iter().fold(0.0, |a, x| a + x) / gaps.len() as f64;
    }
    g
}

/// The paper-style summary over clients with both plans. Savings count only where they
/// are proven (verdict `saves`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    /// Clients read.
    pub clients: usize,
    /// Clients with both plans (the population of the figures below).
    pub planned: usize,
    /// Clients with a Hostlo plan only.
    pub hostlo_only: usize,
    /// Clients with neither plan.
    pub infeasible: usize,
    /// Clients whose saving is proven.
    pub with_saving: usize,
    /// `with_saving / planned`, percent.
    pub share_with_saving_pct: f64,
    /// Clients with no saving, proven (multi-container pods).
    pub no_saving: usize,
    /// Clients whose pods all have one container (no saving possible).
    pub single_container: usize,
    /// Clients the bounds do not decide.
    pub undecided: usize,
    /// Largest saving an undecided client may have, percent.
    pub undecided_max_pct: f64,
    /// Share of planned clients with a proven saving of at least 1, 5, 10, 20, 30, 40 %
    /// (by the lower end of the saving's interval).
    pub share_at_least_pct: Vec<(f64, f64)>,
    /// Largest proven saving (plan costs), percent.
    pub max_saving_pct: f64,
    /// Its certified interval, percent.
    pub max_saving_interval_pct: (f64, f64),
    /// Client with the largest saving.
    pub max_saving_client: Option<String>,
    /// Mean saving among clients with a proven saving, percent.
    pub mean_saving_among_savers_pct: f64,
    /// Median saving among them, percent.
    pub median_saving_among_savers_pct: f64,
    /// Summed cost of plans (a), $/h.
    pub total_whole: f64,
    /// Summed cost of plans (b), $/h.
    pub total_hostlo: f64,
    /// Gaps of plan (a).
    pub gap_whole: GapStats,
    /// Gaps of plan (b).
    pub gap_hostlo: GapStats,
}

fn pct(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        100.0 * a as f64 / b as f64
    }
}

fn fsum(it: impl Iterator<Item = f64>) -> f64 {
    // `fold(0.0, ..)`, not `sum()`: the float sum of nothing is -0.0, printed "-0.00".
    it.fold(0.0, |a, x| a + x)
}

/// Summarises rows.
pub fn summarise(rows: &[ClientRow]) -> Summary {
    let planned: Vec<&ClientRow> = rows.iter().filter(|r| r.status == Status::Ok).collect();
    let count = |v: Verdict| planned.iter().filter(|r| r.verdict == v).count();
    let savers_rows: Vec<&&ClientRow> = planned
        .iter()
        .filter(|r| r.verdict == Verdict::Saves)
        .collect();
    let mut savers: Vec<f64> = savers_rows.iter().filter_map(|r| r.saving_pct).collect();
    savers.sort_by(f64::total_cmp);
    let max = savers_rows
        .iter()
        .max_by(|a, b| {
            a.saving_pct
                .unwrap_or(0.0)
                .total_cmp(&b.saving_pct.unwrap_or(0.0))
                .then(b.client.cmp(&a.client))
        })
        .copied();
    let mut gap_whole = gap_stats(&planned, |r| r.gap_whole_pct);
    let mut gap_hostlo = gap_stats(&planned, |r| r.gap_hostlo_pct);
    let total_whole = fsum(planned.iter().filter_map(|r| r.cost_whole));
    let total_hostlo = fsum(planned.iter().filter_map(|r| r.cost_hostlo));
    let total_gap = |cost: f64, bound: f64| {
        if cost > 0.0 {
            100.0 * (cost - bound).max(0.0) / cost
        } else {
            0.0
        }
    };
    gap_whole.total_pct = total_gap(
        total_whole,
        fsum(planned.iter().filter_map(|r| r.bound_whole)),
    );
    gap_hostlo.total_pct = total_gap(
        total_hostlo,
        fsum(planned.iter().filter_map(|r| r.bound_hostlo)),
    );
    Summary {
        clients: rows.len(),
        planned: planned.len(),
        hostlo_only: rows
            .iter()
            .filter(|r| r.status == Status::HostloOnly)
            .count(),
        infeasible: rows
            .iter()
            .filter(|r| r.status == Status::Infeasible)
            .count(),
        with_saving: savers.len(),
        share_with_saving_pct: pct(savers.len(), planned.len()),
        no_saving: count(Verdict::NoSaving),
        single_container: count(Verdict::SingleContainer),
        undecided: count(Verdict::Undecided),
        undecided_max_pct: planned
            .iter()
            .filter(|r| r.verdict == Verdict::Undecided)
            .filter_map(|r| r.saving_max_pct)
            .fold(0.0, f64::max),
        share_at_least_pct: [1.0, 5.0, 10.0, 20.0, 30.0, 40.0]
            .iter()
            .map(|&t| {
                let n = savers_rows
                    .iter()
                    .filter(|r| r.saving_min_pct.unwrap_or(0.0) >= t - 1e-9)
                    .count();
                (t, pct(n, planned.len()))
            })
            .collect(),
        max_saving_pct: max.and_then(|r| r.saving_pct).unwrap_or(0.0),
        max_saving_interval_pct: max.map_or((0.0, 0.0), |r| {
            (
                r.saving_min_pct.unwrap_or(0.0),
                r.saving_max_pct.unwrap_or(0.0),
            )
        }),
        max_saving_client: max.map(|r| r.client.clone()),
        mean_saving_among_savers_pct: if savers.is_empty() {
            0.0
        } else {
            fsum(savers.iter().copied()) / savers.len() as f64
        },
        median_saving_among_savers_pct: if savers.is_empty() {
            0.0
        } else if savers.len() % 2 == 1 {
            savers[savers.len() / 2]
        } else {
            (savers[savers.len() / 2 - 1] + savers[savers.len() / 2]) / 2.0
        },
        total_whole,
        total_hostlo,
        gap_whole,
        gap_hostlo,
    }
}

/// The summary as text.
pub fn summary_text(s: &Summary) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "clients: {} read, {} planned, {} Hostlo-only, {} infeasible",
        s.clients, s.planned, s.hostlo_only, s.infeasible
    );
    let _ = writeln!(
        o,
        "clients with a proven saving: {} of {} = {:.1} % (paper: > 11 %)",
        s.with_saving, s.planned, s.share_with_saving_pct
    );
    let _ = writeln!(
        o,
        "no saving: {} proven, {} with single-container pods only; undecided: {} (each saves between 0 and at most {:.1} %)",
        s.no_saving, s.single_container, s.undecided, s.undecided_max_pct
    );
    let _ = writeln!(
        o,
        "largest saving: {:.1} % (proven between {:.1} and {:.1} %) ({}) (paper: up to 40 %)",
        s.max_saving_pct,
        s.max_saving_interval_pct.0,
        s.max_saving_interval_pct.1,
        s.max_saving_client.as_deref().unwrap_or("-")
    );
    let _ = writeln!(
        o,
        "saving among savers: mean {:.1} %, median {:.1} %",
        s.mean_saving_among_savers_pct, s.median_saving_among_savers_pct
    );
    let dist = s
        .share_at_least_pct
        .iter()
        .map(|(t, v)| format!(">={t:.0}%: {v:.1}%"))
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(o, "share of clients with a proven saving {dist}");
    let tot = if s.total_whole > 0.0 {
        100.0 * (s.total_whole - s.total_hostlo) / s.total_whole
    } else {
        0.0
    };
    let _ = writeln!(
        o,
        "total cost: {:.2} $/h without Hostlo, {:.2} $/h with Hostlo ({tot:.2} % less)",
        s.total_whole, s.total_hostlo
    );
    for (name, g) in [("(a)", &s.gap_whole), ("(b)", &s.gap_hostlo)] {
        let _ = writeln!(
            o,
            "gap to the lower bound {name}: {} proven optimal, {} within 1 %, {} within 5 %, {} above; mean {:.2} %, max {:.2} %, summed bill {:.2} %",
            g.optimal, g.up_to_1_pct, g.up_to_5_pct, g.above_5_pct, g.mean_pct, g.max_pct, g.total_pct
        );
    }
    o
}

fn opt(x: Option<f64>, prec: usize) -> String {
    x.map_or_else(|| "-".to_string(), |v| format!("{v:.prec$}"))
}

fn verdict_text(r: &ClientRow) -> String {
    match r.verdict {
        Verdict::Saves => "saves".into(),
        Verdict::NoSaving => "none".into(),
        Verdict::SingleContainer => "none (1-ctr)".into(),
        Verdict::Undecided => format!("undecided within {:.1} %", r.saving_max_pct.unwrap_or(0.0)),
        Verdict::NotPlanned => "-".into(),
    }
}

/// Rows as an aligned text table, clients with the largest saving first.
pub fn table_text(rows: &[ClientRow]) -> String {
    let mut sorted: Vec<&ClientRow> = rows.iter().collect();
    let key = |r: &ClientRow| {
        r.saving_pct
            .or(r.saving_max_pct.map(|x| x / 1e3))
            .unwrap_or(-1.0)
    };
    sorted.sort_by(|a, b| key(b).total_cmp(&key(a)).then(a.client.cmp(&b.client)));
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<46} {:>5} {:>6} {:>9} {:>9} {:>11} {:>10} {:>7} {:>10} {:>7} {:>8} {:>5} {:>5} {:>5}  verdict",
        "client",
        "pods",
        "ctrs",
        "vCPU",
        "GiB",
        "status",
        "(a) $/h",
        "gap%",
        "(b) $/h",
        "gap%",
        "saving%",
        "VMa",
        "VMb",
        "span"
    );
    for r in sorted {
        let status = match r.status {
            Status::Ok => "ok",
            Status::HostloOnly => "hostlo-only",
            Status::Infeasible => "infeasible",
        };
        let _ = writeln!(
            o,
            "{:<46} {:>5} {:>6} {:>9.2} {:>9.2} {:>11} {:>10} {:>7} {:>10} {:>7} {:>8} {:>5} {:>5} {:>5}  {}",
            r.client,
            r.pods,
            r.containers,
            r.vcpu,
            r.gib,
            status,
            opt(r.cost_whole, 4),
            opt(r.gap_whole_pct, 2),
            opt(r.cost_hostlo, 4),
            opt(r.gap_hostlo_pct, 2),
            opt(r.saving_pct, 2),
            r.vms_whole,
            r.vms_hostlo,
            r.spanning_pods,
            verdict_text(r)
        );
    }
    o
}

/// Rows as CSV with a header.
pub fn table_csv(rows: &[ClientRow]) -> Result<String, csv::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "client",
        "pods",
        "containers",
        "vcpu",
        "gib",
        "status",
        "cost_whole",
        "cost_hostlo",
        "bound_whole",
        "bound_hostlo",
        "gap_whole_pct",
        "gap_hostlo_pct",
        "verdict",
        "saving_pct",
        "saving_min_pct",
        "saving_max_pct",
        "vms_whole",
        "vms_hostlo",
        "spanning_pods",
        "types_whole",
        "types_hostlo",
    ])?;
    let word = |v: &dyn erased::Ser| v.word();
    for r in rows {
        let f = |x: Option<f64>, p: usize| x.map_or(String::new(), |v| format!("{v:.p$}"));
        w.write_record([
            r.client.clone(),
            r.pods.to_string(),
            r.containers.to_string(),
            format!("{:.3}", r.vcpu),
            format!("{:.3}", r.gib),
            word(&r.status),
            f(r.cost_whole, 6),
            f(r.cost_hostlo, 6),
            f(r.bound_whole, 6),
            f(r.bound_hostlo, 6),
            f(r.gap_whole_pct, 4),
            f(r.gap_hostlo_pct, 4),
            word(&r.verdict),
            f(r.saving_pct, 4),
            f(r.saving_min_pct, 4),
            f(r.saving_max_pct, 4),
            r.vms_whole.to_string(),
            r.vms_hostlo.to_string(),
            r.spanning_pods.to_string(),
            r.types_whole.clone(),
            r.types_hostlo.clone(),
        ])?;
    }
    let bytes = w.into_inner().map_err(|e| e.into_error())?;
    Ok(String::from_utf8(bytes).unwrap_or_default())
}

mod erased {
    /// The serde name of a unit enum value (`ok`, `saves`, ...).
    pub trait Ser {
        fn word(&self) -> String;
    }
    impl<T: serde::Serialize> Ser for T {
        fn word(&self) -> String {
            serde_json::to_value(self)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        }
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The empirical CDF of savings over planned clients as a standalone SVG document.
pub fn cdf_svg(rows: &[ClientRow], title: &str) -> String {
    let mut s: Vec<f64> = rows
        .iter()
        .filter(|r| r.status == Status::Ok)
        .map(|r| {
            if r.verdict == Verdict::Saves {
                r.saving_pct.unwrap_or(0.0).max(0.0)
            } else {
                0.0
            }
        })
        .collect();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let (w, h) = (720.0, 440.0);
    let (l, r, t, b) = (70.0, 20.0, 50.0, 60.0);
    let xmax = (s.last().copied().unwrap_or(0.0) / 10.0).ceil().max(4.0) * 10.0;
    let ymin = if n == 0 {
        0.0
    } else {
        ((s.iter().filter(|&&v| v <= 1e-9).count() as f64 / n as f64) * 10.0).floor() / 10.0
    };
    let ymin = ymin.min(0.8);
    let px = |x: f64| l + (w - l - r) * x / xmax;
    let py = |y: f64| t + (h - t - b) * (1.0 - (y - ymin) / (1.0 - ymin));
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
        w / 2.0,
        esc(title)
    );
    // Grid and ticks.
    let mut x = 0.0;
    while x <= xmax + 1e-9 {
        let _ = writeln!(
            o,
            r##"<line x1="{0:.1}" y1="{1:.1}" x2="{0:.1}" y2="{2:.1}" stroke="#ddd"/><text x="{0:.1}" y="{3:.1}" text-anchor="middle">{4:.0}</text>"##,
            px(x),
            t,
            h - b,
            h - b + 16.0,
            x
        );
        x += if xmax > 50.0 { 10.0 } else { 5.0 };
    }
    let steps = ((1.0 - ymin) / 0.05).round() as usize;
    for k in 0..=steps {
        let y = ymin + k as f64 * 0.05;
        let _ = writeln!(
            o,
            r##"<line x1="{0:.1}" y1="{1:.1}" x2="{2:.1}" y2="{1:.1}" stroke="#ddd"/><text x="{3:.1}" y="{4:.1}" text-anchor="end">{5:.2}</text>"##,
            l,
            py(y),
            w - r,
            l - 6.0,
            py(y) + 4.0,
            y
        );
    }
    let _ = writeln!(
        o,
        r#"<rect x="{l}" y="{t}" width="{}" height="{}" fill="none" stroke="black"/>"#,
        w - l - r,
        h - t - b
    );
    let _ = writeln!(
        o,
        r#"<text x="{}" y="{}" text-anchor="middle">saving with Hostlo (% of the cost without)</text>"#,
        (l + w - r) / 2.0,
        h - 18.0
    );
    let _ = writeln!(
        o,
        r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">fraction of clients with saving ≤ x</text>"#,
        (t + h - b) / 2.0,
        (t + h - b) / 2.0
    );
    // Step curve.
    if n > 0 {
        let mut d = String::new();
        let mut k = 0;
        let _ = write!(d, "M{:.2},{:.2}", px(0.0), py(ymin.max(0.0)));
        while k < n {
            let v = s[k];
            let mut j = k;
            while j < n && (s[j] - v).abs() < 1e-12 {
                j += 1;
            }
            let _ = write!(
                d,
                " L{:.2},{:.2} L{:.2},{:.2}",
                px(v),
                py(((k as f64) / n as f64).max(ymin)),
                px(v),
                py(j as f64 / n as f64)
            );
            k = j;
        }
        let _ = write!(d, " L{:.2},{:.2}", px(xmax), py(1.0));
        let _ = writeln!(
            o,
            r##"<path d="{d}" fill="none" stroke="#1f5fbf" stroke-width="2"/>"##
        );
    }
    let savers = s.iter().filter(|&&v| v > 1e-9).count();
    let _ = writeln!(
        o,
        r#"<text x="{}" y="{}" text-anchor="end">{} clients planned; {:.1} % save; largest saving {:.1} %</text>"#,
        w - r - 8.0,
        h - b - 10.0,
        n,
        pct(savers, n),
        s.last().copied().unwrap_or(0.0)
    );
    o.push_str("</svg>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row whose plans cost `a` and `b` (micro-dollars) with bounds `la` and `lb`.
    fn row_b(name: &str, costs: Option<(u64, u64)>, la: u64, lb: u64, single: bool) -> ClientRow {
        let (verdict, saving_pct, saving_min_pct, saving_max_pct) =
            verdict(single, costs, (la, lb));
        let gap = |c: u64, l: u64| 100.0 * (c - l) as f64 / c as f64;
        ClientRow {
            client: name.into(),
            pods: 1,
            containers: 1,
            vcpu: 1.0,
            gib: 1.0,
            status: if costs.is_some() {
                Status::Ok
            } else {
                Status::Infeasible
            },
            cost_whole: costs.map(|c| usd(c.0)),
            cost_hostlo: costs.map(|c| usd(c.1)),
            bound_whole: costs.map(|_| usd(la)),
            bound_hostlo: costs.map(|_| usd(lb)),
            gap_whole_pct: costs.map(|c| gap(c.0, la)),
            gap_hostlo_pct: costs.map(|c| gap(c.1, lb)),
            verdict,
            saving_pct,
            saving_min_pct,
            saving_max_pct,
            vms_whole: 1,
            vms_hostlo: 1,
            spanning_pods: 0,
            types_whole: String::new(),
            types_hostlo: String::new(),
        }
    }

    /// Proven optimal plans of `a` and `b` $/h (`None`: not planned).
    fn row(name: &str, _status: Status, a: Option<f64>, b: Option<f64>) -> ClientRow {
        let costs = a.zip(b).map(|(a, b)| ((a * 1e6) as u64, (b * 1e6) as u64));
        let (la, lb) = costs.unwrap_or((0, 0));
        row_b(name, costs, la, lb, false)
    }

    /// Issue 14, item 2: the verdicts from costs and bounds.
    #[test]
    fn verdicts() {
        // Both optimal and different: a saving of 25 %, exact.
        let r = row_b("x", Some((400, 300)), 400, 300, false);
        assert_eq!(r.verdict, Verdict::Saves);
        assert_eq!(r.saving_pct, Some(25.0));
        assert_eq!(
            (r.saving_min_pct, r.saving_max_pct),
            (Some(25.0), Some(25.0))
        );
        // Not optimal, but the bound of (a) is above the cost of (b): proven.
        let r = row_b("x", Some((400, 300)), 360, 280, false);
        assert_eq!(r.verdict, Verdict::Saves);
        assert!((r.saving_min_pct.unwrap() - 100.0 / 6.0).abs() < 1e-9);
        assert!((r.saving_max_pct.unwrap() - 30.0).abs() < 1e-9);
        // The bound of (a) below the cost of (b): undecided, at most 1 - 280/400 = 30 %.
        let r = row_b("x", Some((400, 300)), 290, 280, false);
        assert_eq!(r.verdict, Verdict::Undecided);
        assert_eq!(r.saving_pct, None);
        assert!((r.saving_max_pct.unwrap() - 30.0).abs() < 1e-9);
        assert!(table_text(&[r]).contains("undecided within 30.0 %"));
        // Equal and proven: none. The bound of (b) reaching (a)'s cost proves it too.
        assert_eq!(
            row_b("x", Some((400, 400)), 400, 400, false).verdict,
            Verdict::NoSaving
        );
        assert_eq!(
            row_b("x", Some((400, 400)), 350, 400, false).verdict,
            Verdict::NoSaving
        );
        // Single-container pods: never a saving, even with plans that differ (which the
        // planner does not produce) or loose bounds.
        let r = row_b("x", Some((400, 400)), 300, 300, true);
        assert_eq!(r.verdict, Verdict::SingleContainer);
        assert_eq!(r.saving_pct, Some(0.0));
        assert_eq!(row_b("x", None, 0, 0, false).verdict, Verdict::NotPlanned);
    }

    /// Issue 14, case 6: nothing planned prints 0.00, not -0.00.
    #[test]
    fn nothing_planned_prints_no_negative_zero() {
        let rows = vec![row("e", Status::Infeasible, None, None)];
        let text = summary_text(&summarise(&rows));
        assert!(!text.contains("-0."), "{text}");
        assert!(text.contains("total cost: 0.00 $/h"), "{text}");
        assert!(!summary_text(&summarise(&[])).contains("-0."));
    }

    #[test]
    fn summary_counts() {
        let rows = vec![
            row("a", Status::Ok, Some(1.0), Some(1.0)),
            row("b", Status::Ok, Some(1.0), Some(0.75)),
            row("c", Status::Ok, Some(2.0), Some(1.2)),
            row("d", Status::Ok, Some(1.0), Some(1.0)),
            row("e", Status::Infeasible, None, None),
        ];
        let s = summarise(&rows);
        assert_eq!(s.planned, 4);
        assert_eq!(s.infeasible, 1);
        assert_eq!(s.with_saving, 2);
        assert!((s.share_with_saving_pct - 50.0).abs() < 1e-9);
        assert!((s.max_saving_pct - 40.0).abs() < 1e-9);
        assert_eq!(s.max_saving_client.as_deref(), Some("c"));
        assert!((s.median_saving_among_savers_pct - 32.5).abs() < 1e-9);
        assert!((s.share_at_least_pct[3].1 - 50.0).abs() < 1e-9);
        assert!((s.share_at_least_pct[5].1 - 25.0).abs() < 1e-9);
        let svg = cdf_svg(&rows, "t <&>");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("t &lt;&amp;&gt;"));
        let csv = table_csv(&rows).unwrap();
        assert_eq!(csv.lines().count(), 6);
        assert!(csv
            .lines()
            .nth(5)
            .unwrap()
            .starts_with("e,1,1,1.000,1.000,infeasible,,,"));
        assert!(table_text(&rows).lines().nth(1).unwrap().starts_with("c "));
    }
}
