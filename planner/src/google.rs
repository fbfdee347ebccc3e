//! Adapter for the Google cluster-usage trace 2011 (`clusterdata-2011-2`), table
//! `task_events`: gzip (or plain) CSV without header, 13 columns
//! `timestamp, missing_info, job_id, task_index, machine_id, event_type, user,
//! scheduling_class, priority, cpu_request, memory_request, disk_request,
//! different_machine`.
//!
//! Mapping: client = `user`, pod = `job_id`, container = `(job_id, task_index)` with the
//! request of its latest SUBMIT (0) or UPDATE (7, 8) event that carries one. The trace
//! documents that requests may be missing (`missing_info`); a task whose SUBMIT/UPDATE
//! events carry none takes the request of its latest other event that carries one (for the
//! tasks already running when the trace starts, the SCHEDULE at time 0), and a task with no
//! request at all is left out. Both are counted in [`GoogleStats`], never silent.
//!
//! Requests are normalised (1.0 = the largest machine of the cell); [`Scale`] says what 1.0
//! means in vCPU and GiB.
//!
//! Malformed rows (wrong field count, an unparsable used field, an unknown event type, a
//! job attributed to two users) are errors naming the file and the line.
use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use super::catalogue::csv_error;
use super::error::{PlanError, Result, RowProblem};
use super::lines::csv_reader;
use super::model::{Client, Container, Pod, Res, MAX_GIB, MAX_VCPU};

/// What the normalised 1.0 of the trace means.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scale {
    /// vCPU of a normalised CPU request of 1.0.
    pub vcpu: f64,
    /// GiB of a normalised memory request of 1.0.
    pub gib: f64,
}

impl Default for Scale {
    /// 1.0 = 32 vCPU and 128 GiB (see `docs/planner.md`).
    fn default() -> Self {
        Self {
            vcpu: 32.0,
            gib: 128.0,
        }
    }
}

/// Options of the trace adapter.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GoogleOptions {
    /// Scale of normalised requests.
    pub scale: Scale,
    /// Snapshot time in microseconds of trace time: only events at or before it count,
    /// and a task whose last such event is FAIL, FINISH, KILL or LOST is left out.
    /// `None`: every task seen in the files, with its latest request.
    pub at_us: Option<u64>,
}

/// Counts from reading the trace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GoogleStats {
    /// Rows read.
    pub rows: u64,
    /// Distinct tasks seen.
    pub tasks: usize,
    /// Tasks kept (with a request, and live at the snapshot if one is asked for).
    pub kept_tasks: usize,
    /// Tasks whose request comes from a non-SUBMIT/UPDATE event.
    pub fallback_request: usize,
    /// Tasks with no request on any event, left out.
    pub no_request: usize,
    /// Tasks ended (FAIL/FINISH/KILL/LOST) at the snapshot time, left out.
    pub ended_at_snapshot: usize,
    /// Rows after the snapshot time, ignored.
    pub rows_after_snapshot: u64,
}

#[derive(Default)]
struct Task {
    user: u32,
    /// (timestamp, cpu, mem) of the latest SUBMIT/UPDATE with a request.
    req: Option<(u64, f64, f64)>,
    /// (timestamp, cpu, mem) of the latest other event with a request.
    fallback: Option<(u64, f64, f64)>,
    /// (timestamp, event type) of the latest event.
    last: (u64, u8),
}

/// Accumulates trace files; call [`GoogleTrace::finish`] for the clients.
pub struct GoogleTrace {
    opts: GoogleOptions,
    users: Vec<String>,
    user_ids: HashMap<String, u32>,
    tasks: HashMap<(u64, u32), Task>,
    jobs: HashMap<u64, (u32, PathBuf, u64)>,
    stats: GoogleStats,
}

/// Lists the trace files of `paths`: files as given, directories expanded to their
/// `*.csv` and `*.csv.gz` files in name order.
pub fn expand_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let rd = std::fs::read_dir(p).map_err(|source| PlanError::Io {
                path: p.clone(),
                source,
            })?;
            let mut files: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    let n = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    f.is_file() && (n.ends_with(".csv.gz") || n.ends_with(".csv"))
                })
                .collect();
            files.sort();
            out.extend(files);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// Reads trace files (gzip when the name ends in `.gz`) into clients.
pub fn load_google(paths: &[PathBuf], opts: GoogleOptions) -> Result<(Vec<Client>, GoogleStats)> {
    let mut trace = GoogleTrace::new(opts)?;
    for p in expand_paths(paths)? {
        let file = std::fs::File::open(&p).map_err(|source| PlanError::Io {
            path: p.clone(),
            source,
        })?;
        let is_gz = p.extension().is_some_and(|e| e == "gz");
        if is_gz {
            trace.read(flate2::read::MultiGzDecoder::new(BufReader::new(file)), &p)?;
        } else {
            trace.read(BufReader::new(file), &p)?;
        }
    }
    Ok(trace.finish())
}

fn parse_u64(v: &str, column: &'static str) -> std::result::Result<u64, RowProblem> {
    if v.is_empty() {
        return Err(RowProblem::Empty { column });
    }
    v.parse().map_err(|_| RowProblem::BadNumber {
        column,
        value: v.to_string(),
        expected: "non-negative integer",
    })
}

/// A normalised request; `max` is the largest accepted (the model's limit divided by the
/// scale).
fn parse_req(
    v: &str,
    column: &'static str,
    max: f64,
) -> std::result::Result<Option<f64>, RowProblem> {
    if v.is_empty() {
        return Ok(None);
    }
    match v.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 && x <= max => Ok(Some(x)),
        Ok(x) if x.is_finite() && x > max => Err(RowProblem::TooLarge {
            column,
            value: v.to_string(),
            max,
            unit: "(normalised; the scale makes it too large)",
        }),
        _ => Err(RowProblem::BadNumber {
            column,
            value: v.to_string(),
            expected: "non-negative number",
        }),
    }
}

impl GoogleTrace {
    /// A new, empty accumulator. Rejects a non-positive scale.
    pub fn new(opts: GoogleOptions) -> Result<Self> {
        for (name, v, max) in [
            ("cpu-scale", opts.scale.vcpu, MAX_VCPU),
            ("mem-scale", opts.scale.gib, MAX_GIB),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= max) {
                return Err(PlanError::InvalidArgument {
                    name,
                    value: v.to_string(),
                    reason: "must be a positive number of at most 1000000",
                });
            }
        }
        Ok(Self {
            opts,
            users: Vec::new(),
            user_ids: HashMap::new(),
            tasks: HashMap::new(),
            jobs: HashMap::new(),
            stats: GoogleStats::default(),
        })
    }

    /// Reads one CSV stream; `path` names it in errors. Files are read in time order.
    pub fn read<R: Read>(&mut self, reader: R, path: &Path) -> Result<()> {
        let (mut rdr, lines) = csv_reader(reader, false);
        let mut rec = csv::StringRecord::new();
        loop {
            let byte = rdr.position().byte();
            match rdr.read_record(&mut rec) {
                Ok(false) => break,
                Ok(true) => {}
                Err(e) => return Err(csv_error(path, &lines, byte, e)),
            }
            let line = lines.line_of(rec.position().map_or(byte, |p| p.byte()));
            self.row(&rec, path, line)
                .map_err(|problem| PlanError::Malformed {
                    path: path.to_path_buf(),
                    line,
                    problem,
                })?;
        }
        Ok(())
    }

    fn row(
        &mut self,
        rec: &csv::StringRecord,
        path: &Path,
        line: u64,
    ) -> std::result::Result<(), RowProblem> {
        if rec.len() != 13 {
            return Err(RowProblem::WrongFieldCount {
                expected: 13,
                found: rec.len(),
            });
        }
        self.stats.rows += 1;
        let ts = parse_u64(&rec[0], "timestamp")?;
        let job = parse_u64(&rec[2], "job_id")?;
        let task = parse_u64(&rec[3], "task_index")?;
        let task = u32::try_from(task).map_err(|_| RowProblem::BadNumber {
            column: "task_index",
            value: rec[3].to_string(),
            expected: "32-bit task index",
        })?;
        let ev = parse_u64(&rec[5], "event_type")?;
        if ev > 8 {
            return Err(RowProblem::UnknownEventType(ev));
        }
        let user = &rec[6];
        if user.is_empty() {
            return Err(RowProblem::Empty { column: "user" });
        }
        let cpu = parse_req(&rec[9], "cpu_request", MAX_VCPU / self.opts.scale.vcpu)?;
        let mem = parse_req(&rec[10], "memory_request", MAX_GIB / self.opts.scale.gib)?;
        if self.opts.at_us.is_some_and(|at| ts > at) {
            self.stats.rows_after_snapshot += 1;
            return Ok(());
        }
        let uid = match self.user_ids.get(user) {
            Some(&u) => u,
            None => {
                let u = self.users.len() as u32;
                self.users.push(user.to_string());
                self.user_ids.insert(user.to_string(), u);
                u
            }
        };
        match self.jobs.get(&job) {
            Some((u, first_path, first_line)) if *u != uid => {
                return Err(RowProblem::JobUserConflict {
                    job,
                    first_user: format!("{} ({})", self.users[*u as usize], first_path.display()),
                    first_line: *first_line,
                    user: user.to_string(),
                })
            }
            Some(_) => {}
            None => {
                self.jobs.insert(job, (uid, path.to_path_buf(), line));
            }
        }
        let t = self.tasks.entry((job, task)).or_default();
        t.user = uid;
        let ev = ev as u8;
        if ts >= t.last.0 {
            t.last = (ts, ev);
        }
        if let (Some(c), Some(m)) = (cpu, mem) {
            let slot = if matches!(ev, 0 | 7 | 8) {
                &mut t.req
            } else {
                &mut t.fallback
            };
            if slot.is_none_or(|(t0, _, _)| ts >= t0) {
                *slot = Some((ts, c, m));
            }
        }
        Ok(())
    }

    /// The clients, sorted by user name, with pods sorted by job id and containers by
    /// task index; and the counts.
    pub fn finish(self) -> (Vec<Client>, GoogleStats) {
        let mut stats = self.stats;
        stats.tasks = self.tasks.len();
        let scale = self.opts.scale;
        let mut rows: Vec<(u32, u64, u32, Res)> = Vec::with_capacity(self.tasks.len());
        for ((job, idx), t) in self.tasks {
            if self.opts.at_us.is_some() && matches!(t.last.1, 3..=6) {
                stats.ended_at_snapshot += 1;
                continue;
            }
            let (c, m) = match (t.req, t.fallback) {
                (Some((_, c, m)), _) => (c, m),
                (None, Some((_, c, m))) => {
                    stats.fallback_request += 1;
                    (c, m)
                }
                (None, None) => {
                    stats.no_request += 1;
                    continue;
                }
            };
            rows.push((
                t.user,
                job,
                idx,
                Res::from_vcpu_gib(c * scale.vcpu, m * scale.gib),
            ));
        }
        stats.kept_tasks = rows.len();
        let users = self.users;
        rows.sort_by(|a, b| {
            (&users[a.0 as usize], a.1, a.2).cmp(&(&users[b.0 as usize], b.1, b.2))
        });
        let mut clients: Vec<Client> = Vec::new();
        for (u, job, idx, req) in rows {
            if clients.last().is_none_or(|c| c.name != users[u as usize]) {
                clients.push(Client {
                    name: users[u as usize].clone(),
                    pods: Vec::new(),
                });
            }
            let c = clients.last_mut().expect("pushed");
            let job_name = job.to_string();
            if c.pods.last().is_none_or(|p| p.name != job_name) {
                c.pods.push(Pod {
                    name: job_name,
                    containers: Vec::new(),
                });
            }
            c.pods
                .last_mut()
                .expect("pushed")
                .containers
                .push(Container {
                    name: idx.to_string(),
                    req,
                });
        }
        (clients, stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str, opts: GoogleOptions) -> Result<(Vec<Client>, GoogleStats)> {
        let mut t = GoogleTrace::new(opts)?;
        t.read(text.as_bytes(), Path::new("t.csv"))?;
        Ok(t.finish())
    }

    const T: &str = "\
0,2,10,0,1,1,alice,3,9,0.5,0.25,0,0
0,,11,0,,0,bob,3,9,0.125,0.0625,0,0
0,,11,1,,0,bob,3,9,0.125,0.0625,0,0
5,,11,1,,8,bob,3,9,0.25,0.125,0,0
7,,11,0,,4,bob,3,9,0.125,0.0625,0,0
8,2,12,0,,0,bob,3,9,,,,
";

    #[test]
    fn maps_users_jobs_tasks() {
        let (c, st) = read(T, GoogleOptions::default()).unwrap();
        assert_eq!(st.rows, 6);
        assert_eq!(st.tasks, 4);
        assert_eq!(st.kept_tasks, 3);
        assert_eq!(st.fallback_request, 1);
        assert_eq!(st.no_request, 1);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].name, "alice");
        // SCHEDULE fallback, 0.5 * 32 vCPU, 0.25 * 128 GiB.
        assert_eq!(c[0].pods[0].containers[0].req, Res::new(16_000, 32 * 1024));
        let bob = &c[1];
        assert_eq!(bob.pods.len(), 1);
        assert_eq!(bob.pods[0].name, "11");
        // Task 1 takes its UPDATE_RUNNING request.
        assert_eq!(bob.pods[0].containers[1].req, Res::new(8000, 16 * 1024));
    }

    #[test]
    fn snapshot_drops_ended_and_later() {
        let opts = GoogleOptions {
            at_us: Some(7),
            ..Default::default()
        };
        let (c, st) = read(T, opts).unwrap();
        assert_eq!(st.rows_after_snapshot, 1);
        assert_eq!(st.ended_at_snapshot, 1);
        assert_eq!(c[1].pods[0].containers.len(), 1);
        assert_eq!(c[1].pods[0].containers[0].name, "1");
    }

    #[test]
    fn malformed_rows_name_the_line() {
        let cases = [
            (
                "0,,1,0,,0,u,3,9,0.1,0.1,0\n",
                "t.csv:1: expected 13 fields, found 12",
            ),
            (
                "0,,1,0,,0,u,3,9,0.1,0.1,0,0\n0,,1,0,,9,u,3,9,0.1,0.1,0,0\n",
                "t.csv:2: event_type 9 is not one of 0..=8",
            ),
            (
                "0,,x,0,,0,u,3,9,0.1,0.1,0,0\n",
                "t.csv:1: field `job_id` = \"x\" is not a valid non-negative integer",
            ),
            (
                "0,,1,0,,0,u,3,9,-0.1,0.1,0,0\n",
                "t.csv:1: field `cpu_request` = \"-0.1\" is not a valid non-negative number",
            ),
            (
                "0,,1,0,,0,,3,9,0.1,0.1,0,0\n",
                "t.csv:1: field `user` is empty",
            ),
            (
                "0,,1,0,,0,u,3,9,0.1,0.1,0,0\r\n0,,1,1,,0,u,3,9,1e30,0.1,0,0\r\n",
                "t.csv:2: field `cpu_request` = \"1e30\" is above the limit of 31250",
            ),
            (
                "0,,1,0,,0,u,3,9,0.1,0.1,0,0\r0,,1,1,,0,u,3,9,0.1,inf,0,0\r",
                "t.csv:2: field `memory_request` = \"inf\" is not a valid non-negative number",
            ),
            (
                "\n0,,1,0,,0,u,3,9,0.1,0.1,0,0\n\n0,,1,1,,0,u,3,9,0.1,0.1,0\n",
                "t.csv:4: expected 13 fields, found 12",
            ),
            (
                "0,,1,0,,0,u,3,9,0.1,0.1,0,0\n1,,1,1,,0,v,3,9,0.1,0.1,0,0\n",
                "t.csv:2: job 1 belongs to user",
            ),
        ];
        for (text, msg) in cases {
            let e = read(text, GoogleOptions::default())
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(msg), "{e} vs {msg}");
        }
    }

    #[test]
    fn rejects_bad_scale() {
        let opts = GoogleOptions {
            scale: Scale {
                vcpu: 0.0,
                gib: 1.0,
            },
            at_us: None,
        };
        assert!(matches!(
            GoogleTrace::new(opts),
            Err(PlanError::InvalidArgument { .. })
        ));
    }
}
