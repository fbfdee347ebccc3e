//! The planner's own input format: a CSV with the header `client,pod,container,cpu,memory`
//! and one row per container; `cpu` in vCPU and `memory` in GiB (non-negative decimals).
//! Every row must parse; a duplicate `(client, pod, container)` is an error. Errors name
//! the file and the 1-based line.
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use super::catalogue::csv_error;
use super::error::{PlanError, Result, RowProblem};
use super::lines::csv_reader;
use super::model::{group_clients, Client, Res, MAX_GIB, MAX_VCPU};

/// The required header of the pods CSV.
pub const PODS_HEADER: &str = "client,pod,container,cpu,memory";

/// Reads a pods CSV file.
pub fn load_pods(path: &Path) -> Result<Vec<Client>> {
    let file = std::fs::File::open(path).map_err(|source| PlanError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_pods(file, path)
}

/// Reads a pods CSV from any reader; `path` only names the source in errors.
pub fn parse_pods<R: Read>(reader: R, path: &Path) -> Result<Vec<Client>> {
    let (mut rdr, lines) = csv_reader(reader, false);
    let mut rec = csv::StringRecord::new();
    let mut rows = Vec::new();
    let mut seen: HashMap<(String, String, String), u64> = HashMap::new();
    let mut header_seen = false;
    loop {
        let byte = rdr.position().byte();
        match rdr.read_record(&mut rec) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => return Err(csv_error(path, &lines, byte, e)),
        }
        let line = lines.line_of(rec.position().map_or(byte, |p| p.byte()));
        let bad = |problem| PlanError::Malformed {
            path: path.to_path_buf(),
            line,
            problem,
        };
        if !header_seen {
            let found = rec.iter().map(str::trim).collect::<Vec<_>>().join(",");
            if found != PODS_HEADER {
                return Err(bad(RowProblem::BadHeader {
                    expected: PODS_HEADER.into(),
                    found,
                }));
            }
            header_seen = true;
            continue;
        }
        if rec.len() != 5 {
            return Err(bad(RowProblem::WrongFieldCount {
                expected: 5,
                found: rec.len(),
            }));
        }
        let field = |i: usize, column: &'static str| -> Result<String> {
            let v = rec[i].trim();
            if v.is_empty() {
                Err(bad(RowProblem::Empty { column }))
            } else {
                Ok(v.to_string())
            }
        };
        let (client, pod, container) = (
            field(0, "client")?,
            field(1, "pod")?,
            field(2, "container")?,
        );
        let num = |i: usize, column: &'static str, max: f64, unit| -> Result<f64> {
            let v = field(i, column)?;
            match v.parse::<f64>() {
                Ok(x) if x.is_finite() && x >= 0.0 && x <= max => Ok(x),
                Ok(x) if x.is_finite() && x > max => Err(bad(RowProblem::TooLarge {
                    column,
                    value: v,
                    max,
                    unit,
                })),
                _ => Err(bad(RowProblem::BadNumber {
                    column,
                    value: v,
                    expected: "non-negative number",
                })),
            }
        };
        let req = Res::from_vcpu_gib(
            num(3, "cpu", MAX_VCPU, "vCPU")?,
            num(4, "memory", MAX_GIB, "GiB")?,
        );
        let key = (client.clone(), pod.clone(), container.clone());
        if let Some(&first_line) = seen.get(&key) {
            return Err(bad(RowProblem::Duplicate {
                what: format!("container {client}/{pod}/{container}"),
                first_line,
            }));
        }
        seen.insert(key, line);
        rows.push((client, pod, container, req));
    }
    if rows.is_empty() {
        return Err(PlanError::NoData {
            path: path.to_path_buf(),
        });
    }
    Ok(group_clients(rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Vec<Client>> {
        parse_pods(s.as_bytes(), Path::new("pods.csv"))
    }

    #[test]
    fn groups_rows() {
        let c = parse("client,pod,container,cpu,memory\nalice,web,nginx,1.5,2\nalice,web,php,0.5,1\nbob,db,pg,4,16\nalice,cache,redis,0.25,0.5\n").unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].name, "alice");
        assert_eq!(c[0].pods.len(), 2);
        assert_eq!(c[0].pods[0].containers.len(), 2);
        assert_eq!(c[0].pods[0].demand(), Res::new(2000, 3072));
        assert_eq!(c[1].pods[0].containers[0].req, Res::new(4000, 16384));
    }

    #[test]
    fn bad_rows_are_errors_with_lines() {
        let h = "client,pod,container,cpu,memory\n";
        let cases = [
            (
                format!("{h}a,p,c,1,1\na,p,d,1\n"),
                3,
                "expected 5 fields, found 4",
            ),
            (
                format!("{h}a,p,c,1,1\na,p,d,-1,1\n"),
                3,
                "field `cpu` = \"-1\" is not a valid non-negative number",
            ),
            (
                format!("{h}a,p,c,1,x\n"),
                2,
                "field `memory` = \"x\" is not a valid non-negative number",
            ),
            (
                format!("{h}a,p,c,NaN,1\n"),
                2,
                "field `cpu` = \"NaN\" is not a valid non-negative number",
            ),
            (format!("{h}a,,c,1,1\n"), 2, "field `pod` is empty"),
            (
                format!("{h}a,p,c,1,1\na,p,c,2,2\n"),
                3,
                "duplicate container a/p/c (first seen on line 2)",
            ),
            ("client,pod,cpu,memory\n".to_string(), 1, "header must be"),
            (
                format!("{h}a,p,c,1,1\n\"a,p,c,1,1\n"),
                3,
                "expected 5 fields",
            ),
        ];
        for (text, line, msg) in cases {
            let e = parse(&text).unwrap_err();
            let s = e.to_string();
            assert!(s.starts_with(&format!("pods.csv:{line}: ")), "{s}");
            assert!(s.contains(msg), "{s} should contain {msg}");
        }
        assert!(matches!(parse(h).unwrap_err(), PlanError::NoData { .. }));
    }

    /// Issue 14, case 3: a finite but absurd request is an error naming its line, not a
    /// sum that wraps.
    #[test]
    fn absurd_requests_are_errors() {
        let e = parse("client,pod,container,cpu,memory\na,p,c,0.002,1\na,p,d,1e30,1\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "pods.csv:3: field `cpu` = \"1e30\" is above the limit of 1000000 vCPU"
        );
        let e = parse("client,pod,container,cpu,memory\na,p,c,1,1e7\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("pods.csv:2: field `memory` = \"1e7\" is above"),
            "{e}"
        );
        // The limits themselves are accepted.
        let c = parse("client,pod,container,cpu,memory\na,p,c,1000000,1000000\n").unwrap();
        assert_eq!(
            c[0].pods[0].demand(),
            Res::new(1_000_000_000, 1_024_000_000)
        );
    }

    /// Issue 14, case 4: line numbers with CRLF, CR-only and blank lines.
    #[test]
    fn line_numbers_with_any_line_ending() {
        let rows = ["client,pod,container,cpu,memory", "a,p,c,1,1", "a,p,d,x,1"];
        for sep in ["\n", "\r\n", "\r"] {
            let text = rows.join(sep) + sep;
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.starts_with("pods.csv:3: field `cpu`"), "{sep:?}: {e}");
            // Blank lines count.
            let text = format!("{}{sep}{sep}{}{sep}{sep}{sep}{}", rows[0], rows[1], rows[2]);
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.starts_with("pods.csv:6: field `cpu`"), "{sep:?}: {e}");
            // A duplicate names both lines.
            let text = format!("{}{sep}{}{sep}{sep}{}{sep}", rows[0], rows[1], rows[1]);
            let e = parse(&text).unwrap_err().to_string();
            assert_eq!(
                e, "pods.csv:4: duplicate container a/p/c (first seen on line 2)",
                "{sep:?}"
            );
        }
    }
}
