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

/// One client's result.
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
    /// Cost of plan (a), $/h.
    pub cost_whole: Option<f64>,
    /// Cost of plan (b), $/h.
    pub cost_hostlo: Option<f64>,
    /// `(a - b) / a` in percent.
    pub saving_pct: Option<f64>,
    /// LP lower bound, $/h.
    pub lower_bound: f64,
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

/// Builds the row of a client from its plans.
pub fn client_row(client: &Client, plan: &ClientPlan, cat: &Catalogue) -> ClientRow {
    let a = plan.whole.as_ref().map(|p| p.cost(cat));
    let b = plan.hostlo.as_ref().map(|p| p.cost(cat));
    let status = match (a, b) {
        (Some(_), Some(_)) => Status::Ok,
        (None, Some(_)) => Status::HostloOnly,
        _ => Status::Infeasible,
    };
    let saving_pct = match (a, b) {
        (Some(a), Some(b)) if a > 0 => Some(100.0 * (a as f64 - b as f64) / a as f64),
        (Some(_), Some(_)) => Some(0.0),
        _ => None,
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
        saving_pct,
        lower_bound: plan.lower_bound / 1e6,
        vms_whole: plan.whole.as_ref().map_or(0, |p| p.vms.len()),
        vms_hostlo: plan.hostlo.as_ref().map_or(0, |p| p.vms.len()),
        spanning_pods: plan.hostlo.as_ref().map_or(0, |p| p.spanning_pods().len()),
        types_whole: type_mix(plan.whole.as_ref(), cat),
        types_hostlo: type_mix(plan.hostlo.as_ref(), cat),
    }
}

/// The paper-style summary over clients with both plans.
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
    /// Clients whose cost falls with Hostlo.
    pub with_saving: usize,
    /// `with_saving / planned`, percent.
    pub share_with_saving_pct: f64,
    /// Share of planned clients with a saving of at least 1, 5, 10, 20, 30, 40 %.
    pub share_at_least_pct: Vec<(f64, f64)>,
    /// Largest saving, percent.
    pub max_saving_pct: f64,
    /// Client with the largest saving.
    pub max_saving_client: Option<String>,
    /// Mean saving among clients with a saving, percent.
    pub mean_saving_among_savers_pct: f64,
    /// Median saving among clients with a saving, percent.
    pub median_saving_among_savers_pct: f64,
    /// Summed cost of plans (a), $/h.
    pub total_whole: f64,
    /// Summed cost of plans (b), $/h.
    pub total_hostlo: f64,
    /// Mean of (a − LB)/a, percent: how far plan (a) can be from optimal at most.
    pub mean_gap_whole_pct: f64,
    /// Mean of (b − LB)/b, percent.
    pub mean_gap_hostlo_pct: f64,
}

fn pct(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        100.0 * a as f64 / b as f64
    }
}

/// Summarises rows.
pub fn summarise(rows: &[ClientRow]) -> Summary {
    let planned: Vec<&ClientRow> = rows.iter().filter(|r| r.status == Status::Ok).collect();
    let savings: Vec<f64> = planned
        .iter()
        .map(|r| r.saving_pct.unwrap_or(0.0))
        .collect();
    let mut savers: Vec<f64> = savings.iter().copied().filter(|&s| s > 1e-9).collect();
    savers.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let max = planned
        .iter()
        .filter(|r| r.saving_pct.unwrap_or(0.0) > 1e-9)
        .max_by(|a, b| a.saving_pct.partial_cmp(&b.saving_pct).expect("finite"));
    let gap = |c: Option<f64>, lb: f64| {
        c.map_or(0.0, |c| if c > 0.0 { 100.0 * (c - lb) / c } else { 0.0 })
    };
    let n = planned.len().max(1) as f64;
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
        share_at_least_pct: [1.0, 5.0, 10.0, 20.0, 30.0, 40.0]
            .iter()
            .map(|&t| {
                (
                    t,
                    pct(
                        savings.iter().filter(|&&s| s >= t - 1e-9).count(),
                        planned.len(),
                    ),
                )
            })
            .collect(),
        max_saving_pct: max.and_then(|r| r.saving_pct).unwrap_or(0.0),
        max_saving_client: max.map(|r| r.client.clone()),
        mean_saving_among_savers_pct: if savers.is_empty() {
            0.0
        } else {
            savers.iter().fold(0.0, |a, x| a + x) / savers.len() as f64
        },
        median_saving_among_savers_pct: if savers.is_empty() {
            0.0
        } else if savers.len() % 2 == 1 {
            savers[savers.len() / 2]
        } else {
            (savers[savers.len() / 2 - 1] + savers[savers.len() / 2]) / 2.0
        },
        // `fold(0.0, ..)`, not `sum()`: the float sum of nothing is -0.0, printed "-0.00".
        total_whole: planned
            .iter()
            .filter_map(|r| r.cost_whole)
            .fold(0.0, |a, x| a + x),
        total_hostlo: planned
            .iter()
            .filter_map(|r| r.cost_hostlo)
            .fold(0.0, |a, x| a + x),
        mean_gap_whole_pct: planned
            .iter()
            .map(|r| gap(r.cost_whole, r.lower_bound))
            .fold(0.0, |a, x| a + x)
            / n,
        mean_gap_hostlo_pct: planned
            .iter()
            .map(|r| gap(r.cost_hostlo, r.lower_bound))
            .fold(0.0, |a, x| a + x)
            / n,
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
        "clients with a saving: {} of {} = {:.1} % (paper: > 11 %)",
        s.with_saving, s.planned, s.share_with_saving_pct
    );
    let _ = writeln!(
        o,
        "largest saving: {:.1} % ({}) (paper: up to 40 %)",
        s.max_saving_pct,
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
    let _ = writeln!(o, "share of clients with saving {dist}");
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
    let _ = writeln!(
        o,
        "mean distance to the LP lower bound: (a) {:.1} %, (b) {:.1} %",
        s.mean_gap_whole_pct, s.mean_gap_hostlo_pct
    );
    o
}

fn opt(x: Option<f64>, prec: usize) -> String {
    x.map_or_else(|| "-".to_string(), |v| format!("{v:.prec$}"))
}

/// Rows as an aligned text table, clients with the largest saving first.
pub fn table_text(rows: &[ClientRow]) -> String {
    let mut sorted: Vec<&ClientRow> = rows.iter().collect();
    sorted.sort_by(|a, b| {
        b.saving_pct
            .unwrap_or(-1.0)
            .partial_cmp(&a.saving_pct.unwrap_or(-1.0))
            .expect("finite")
            .then(a.client.cmp(&b.client))
    });
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<46} {:>5} {:>6} {:>9} {:>9} {:>11} {:>10} {:>10} {:>8} {:>5} {:>5} {:>5}",
        "client",
        "pods",
        "ctrs",
        "vCPU",
        "GiB",
        "status",
        "(a) $/h",
        "(b) $/h",
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
            "{:<46} {:>5} {:>6} {:>9.2} {:>9.2} {:>11} {:>10} {:>10} {:>8} {:>5} {:>5} {:>5}",
            r.client,
            r.pods,
            r.containers,
            r.vcpu,
            r.gib,
            status,
            opt(r.cost_whole, 4),
            opt(r.cost_hostlo, 4),
            opt(r.saving_pct, 2),
            r.vms_whole,
            r.vms_hostlo,
            r.spanning_pods
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
        "saving_pct",
        "lower_bound",
        "vms_whole",
        "vms_hostlo",
        "spanning_pods",
        "types_whole",
        "types_hostlo",
    ])?;
    for r in rows {
        let status = serde_json::to_value(r.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        w.write_record([
            r.client.clone(),
            r.pods.to_string(),
            r.containers.to_string(),
            format!("{:.3}", r.vcpu),
            format!("{:.3}", r.gib),
            status,
            r.cost_whole.map_or(String::new(), |v| format!("{v:.6}")),
            r.cost_hostlo.map_or(String::new(), |v| format!("{v:.6}")),
            r.saving_pct.map_or(String::new(), |v| format!("{v:.4}")),
            format!("{:.6}", r.lower_bound),
            r.vms_whole.to_string(),
            r.vms_hostlo.to_string(),
            r.spanning_pods.to_string(),
            r.types_whole.clone(),
            r.types_hostlo.clone(),
        ])?;
    }
    let bytes = w.into_inner().map_err(|e| e.into_error())?;
    Ok(String::from_utf8(bytes).expect("CSV of UTF-8 strings"))
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
        .map(|r| r.saving_pct.unwrap_or(0.0).max(0.0))
        .collect();
    s.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
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

    fn row(name: &str, status: Status, a: Option<f64>, b: Option<f64>) -> ClientRow {
        ClientRow {
            client: name.into(),
            pods: 1,
            containers: 1,
            vcpu: 1.0,
            gib: 1.0,
            status,
            cost_whole: a,
            cost_hostlo: b,
            saving_pct: match (a, b) {
                (Some(a), Some(b)) => Some(100.0 * (a - b) / a),
                _ => None,
            },
            lower_bound: 0.5,
            vms_whole: 1,
            vms_hostlo: 1,
            spanning_pods: 0,
            types_whole: String::new(),
            types_hostlo: String::new(),
        }
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
