//! `nestlessctl plan`: reads pods (the planner CSV or Google trace shards) and a price
//! list, plans every client with and without Hostlo, and prints the per-client table and
//! the summary; optionally writes the CDF of savings as SVG and the Hostlo annotations.
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};

use super::annotations::pod_annotations;
use super::catalogue::{load_catalogue, FamilyFilter};
use super::google::{load_google, GoogleOptions, Scale};
use super::input::load_pods;
use super::model::{validate, Catalogue, Client, HostModel, Mode, Res};
use super::plan::{plan_all_stats, PlanConfig};
use super::report::{cdf_svg, client_row, summarise, summary_text, table_csv, table_text};
use super::setcover::Limits;

/// Output format of the per-client results.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned table, then the summary.
    Table,
    /// CSV rows on stdout, the summary on stderr.
    Csv,
    /// One JSON object `{summary, clients}`.
    Json,
    /// The summary only.
    Summary,
}

/// What to do with a pod that fits no VM type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Oversized {
    /// Keep it: its client is reported as infeasible (or Hostlo-only) and left out of the
    /// summary figures.
    ExcludeClient,
    /// Drop the pod (counted on stderr) and plan the rest of its client.
    DropPod,
}

/// Arguments of `nestlessctl plan`.
#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// Pods CSV with header `client,pod,container,cpu,memory` (vCPU, GiB).
    #[arg(long, conflicts_with = "google", required_unless_present = "google")]
    pub pods: Option<PathBuf>,
    /// Google 2011 `task_events` shards (.csv.gz or .csv) or directories holding them.
    #[arg(long, num_args = 1..)]
    pub google: Vec<PathBuf>,
    /// Price list CSV (header with name, vcpu, memory, price; optional class).
    #[arg(
        long,
        default_value = "../shared/data/prices/aws_ec2_instances_us-east-1.csv"
    )]
    pub prices: PathBuf,
    /// Instance families to use, comma-separated, or `all`.
    #[arg(long, default_value = "m5,c5,r5")]
    pub families: String,
    /// vCPU that a normalised trace CPU request of 1.0 means (trace input only; default 32).
    #[arg(long)]
    pub cpu_scale: Option<f64>,
    /// GiB that a normalised trace memory request of 1.0 means (trace input only; default
    /// 128).
    #[arg(long)]
    pub mem_scale: Option<f64>,
    /// Snapshot at this trace time (seconds): only tasks live then (trace input only).
    #[arg(long)]
    pub at: Option<f64>,
    /// Host model for Hostlo: `per-family` (a host holds one family, up to its largest
    /// type), `unlimited`, or `<vCPU>x<GiB>` (hosts of that size, any family).
    #[arg(long, default_value = "per-family")]
    pub host: String,
    /// Pods that fit no VM type.
    #[arg(long, value_enum, default_value_t = Oversized::ExcludeClient)]
    pub oversized: Oversized,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Write the CDF of savings as SVG to this file.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Write the Hostlo placement as pod annotations (JSON lines, one per spanning pod).
    #[arg(long)]
    pub emit_annotations: Option<PathBuf>,
    /// Time limit of the exact part per client, in seconds (half for each plan); 0 keeps
    /// the heuristic alone, with the demand bound only.
    #[arg(long, default_value_t = 1.0)]
    pub time_limit: f64,
    /// Budget of the exact part for the whole run, in seconds (all threads together):
    /// clients are taken smallest first, each within `--time-limit` and its share of what
    /// is left; clients reached after it keep the heuristic and the demand bound. 0: no
    /// budget.
    #[arg(long, default_value_t = crate::plan::DEFAULT_EXACT_BUDGET_S as f64)]
    pub time_budget: f64,
    /// Worker threads (default: available parallelism).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Parses `--host`.
pub fn parse_host(s: &str) -> anyhow::Result<HostModel> {
    match s {
        "per-family" => Ok(HostModel::PerFamily),
        "unlimited" => Ok(HostModel::Unlimited),
        _ => {
            let Some((c, m)) = s.split_once('x') else {
                bail!("--host must be per-family, unlimited or <vCPU>x<GiB>, not {s:?}");
            };
            let (c, m): (f64, f64) = (
                c.parse()
                    .with_context(|| format!("--host {s:?}: bad vCPU"))?,
                m.parse()
                    .with_context(|| format!("--host {s:?}: bad GiB"))?,
            );
            if !(c > 0.0 && m > 0.0 && c.is_finite() && m.is_finite()) {
                bail!("--host {s:?}: sizes must be positive");
            }
            Ok(HostModel::Uniform(Res::from_vcpu_gib(c, m)))
        }
    }
}

/// Counts of [`drop_oversized`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Pods dropped.
    pub pods: usize,
    /// Their containers.
    pub containers: usize,
    /// Clients left with no pod, removed.
    pub clients: usize,
}

/// Removes pods that fit no VM type of `cat` usable on `host`, and clients left empty.
pub fn drop_oversized(
    clients: Vec<Client>,
    cat: &Catalogue,
    host: HostModel,
) -> (Vec<Client>, Dropped) {
    let all = super::plan::usable_types(cat, host);
    let mut d = Dropped::default();
    let mut out = Vec::with_capacity(clients.len());
    for mut c in clients {
        c.pods.retain(|p| {
            let keep = cat.cheapest_fitting(p.demand(), &all).is_some();
            if !keep {
                d.pods += 1;
                d.containers += p.containers.len();
            }
            keep
        });
        if c.pods.is_empty() {
            d.clients += 1;
        } else {
            out.push(c);
        }
    }
    (out, d)
}

/// Runs `nestlessctl plan`.
pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let host = parse_host(&args.host)?;
    let filter = FamilyFilter::parse(&args.families)?;
    let (cat, cstats) = load_catalogue(&args.prices, &filter)?;
    eprintln!(
        "catalogue {}: {} instance rows ({} separator rows skipped), {} types kept for {}",
        args.prices.display(),
        cstats.instance_rows,
        cstats.separator_rows,
        cstats.kept,
        args.families
    );
    let clients = if let Some(p) = &args.pods {
        for (given, name) in [
            (args.at.is_some(), "--at"),
            (args.cpu_scale.is_some(), "--cpu-scale"),
            (args.mem_scale.is_some(), "--mem-scale"),
        ] {
            if given {
                bail!("{name} applies to --google input only (the pods CSV is in vCPU and GiB)");
            }
        }
        load_pods(p)?
    } else {
        let at_us = match args.at {
            Some(s) if s.is_finite() && s >= 0.0 => Some((s * 1e6) as u64),
            Some(s) => bail!("--at {s}: must be a non-negative number of seconds"),
            None => None,
        };
        let scale = Scale {
            vcpu: args.cpu_scale.unwrap_or(Scale::default().vcpu),
            gib: args.mem_scale.unwrap_or(Scale::default().gib),
        };
        let opts = GoogleOptions { scale, at_us };
        let (clients, st) = load_google(&args.google, opts)?;
        eprintln!(
            "trace: {} rows, {} tasks, {} kept; {} with the request of a non-SUBMIT event, {} without any request (left out), {} ended at the snapshot, {} rows after it; scale 1.0 = {} vCPU / {} GiB",
            st.rows, st.tasks, st.kept_tasks, st.fallback_request, st.no_request, st.ended_at_snapshot, st.rows_after_snapshot, scale.vcpu, scale.gib
        );
        clients
    };
    let clients = match args.oversized {
        Oversized::ExcludeClient => clients,
        Oversized::DropPod => {
            let (c, d) = drop_oversized(clients, &cat, host);
            eprintln!(
                "dropped {} pods ({} containers) that fit no VM type; {} clients left empty",
                d.pods, d.containers, d.clients
            );
            c
        }
    };
    let t_read = t0.elapsed();
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if !(args.time_limit.is_finite() && args.time_limit >= 0.0 && args.time_limit <= 86_400.0) {
        bail!(
            "--time-limit {}: must be a number of seconds from 0 to 86400",
            args.time_limit
        );
    }
    if !(args.time_budget.is_finite() && args.time_budget >= 0.0 && args.time_budget <= 864_000.0) {
        bail!(
            "--time-budget {}: must be a number of seconds from 0 to 864000",
            args.time_budget
        );
    }
    let cfg = PlanConfig {
        host,
        exact: (args.time_limit > 0.0).then(|| Limits::per_client(args.time_limit)),
        exact_budget: (args.time_budget > 0.0)
            .then(|| std::time::Duration::from_secs_f64(args.time_budget)),
        ..Default::default()
    };
    let t1 = Instant::now();
    let (plans, run) = plan_all_stats(&clients, &cat, &cfg, threads);
    let t_plan = t1.elapsed();
    eprintln!(
        "plan phases: heuristic {:.2} s, exact part {:.2} s ({} clients; {} after the budget, with the demand bound only)",
        run.heuristic_s, run.exact_s, run.exact_clients, run.out_of_budget
    );
    for (c, p) in clients.iter().zip(&plans) {
        if let Some(a) = &p.whole {
            validate(c, &cat, host, Mode::Whole, a)
                .with_context(|| format!("plan (a) of client {}", c.name))?;
        }
        if let Some(b) = &p.hostlo {
            validate(c, &cat, host, Mode::Hostlo, b)
                .with_context(|| format!("plan (b) of client {}", c.name))?;
        }
    }
    let rows: Vec<_> = clients
        .iter()
        .zip(&plans)
        .map(|(c, p)| client_row(c, p, &cat))
        .collect();
    let summary = summarise(&rows);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match args.format {
        Format::Table => {
            write!(out, "{}", table_text(&rows))?;
            writeln!(out)?;
            write!(out, "{}", summary_text(&summary))?;
        }
        Format::Summary => write!(out, "{}", summary_text(&summary))?,
        Format::Csv => {
            write!(out, "{}", table_csv(&rows)?)?;
            eprint!("{}", summary_text(&summary));
        }
        Format::Json => {
            let v = serde_json::json!({ "summary": summary, "clients": rows });
            serde_json::to_writer_pretty(&mut out, &v)?;
            writeln!(out)?;
        }
    }
    if let Some(path) = &args.svg {
        let title = format!(
            "Hostlo saving per client ({} clients, families {}, host {})",
            summary.planned, args.families, args.host
        );
        std::fs::write(path, cdf_svg(&rows, &title))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.emit_annotations {
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        );
        let mut n = 0;
        let mut names: std::collections::HashMap<String, (String, String)> = Default::default();
        for (c, p) in clients.iter().zip(&plans) {
            if let Some(b) = &p.hostlo {
                for doc in pod_annotations(c, b, &cat) {
                    let key = (doc.client.clone(), doc.pod.clone());
                    if let Some(first) = names.insert(doc.hostlo_pod.clone(), key) {
                        bail!(
                            "Hostlo pod name {} would be given to pod {:?} of client {:?} and to pod {:?} of client {:?} (a hash collision); rename one of them",
                            doc.hostlo_pod, first.1, first.0, doc.pod, doc.client
                        );
                    }
                    serde_json::to_writer(&mut f, &doc)?;
                    writeln!(f)?;
                    n += 1;
                }
            }
        }
        f.flush()?;
        eprintln!("wrote {n} Hostlo pod documents to {}", path.display());
    }
    eprintln!(
        "timing: read {:.2} s, plan {:.2} s on {threads} threads, total {:.2} s",
        t_read.as_secs_f64(),
        t_plan.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_argument() {
        assert_eq!(parse_host("per-family").unwrap(), HostModel::PerFamily);
        assert_eq!(parse_host("unlimited").unwrap(), HostModel::Unlimited);
        assert_eq!(
            parse_host("96x384").unwrap(),
            HostModel::Uniform(Res::new(96_000, 384 * 1024))
        );
        assert!(parse_host("96").is_err());
        assert!(parse_host("0x1").is_err());
    }
}
