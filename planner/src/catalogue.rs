//! VM price catalogue: a CSV with a header naming at least `name`, `vcpu`, `memory` (GiB)
//! and `price` (on-demand $/h); `class` gives the family when present, otherwise the
//! family is the part of the name before the first `.`. Other columns are ignored, so the
//! AWS us-east-1 list of `../shared/data/prices/` is read as it is.
//!
//! Rows whose `name` is empty are the list's blank separator and summary rows: they are
//! skipped and counted in [`CatalogueStats::separator_rows`]. Any other row that does not
//! parse is an error naming the file and line.
use std::io::Read;
use std::path::Path;

use super::error::{PlanError, Result, RowProblem};
use super::lines::{csv_reader, LineIndex};
use super::model::{round_up, Catalogue, Res, VmType, MAX_GIB, MAX_PRICE, MAX_VCPU};

/// Which families of the price list a plan may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FamilyFilter {
    /// Every family of the list.
    All,
    /// Only these families (`m5`, `c5`, ...).
    Only(Vec<String>),
}

impl FamilyFilter {
    /// Parses `all` or a comma-separated list of families.
    pub fn parse(s: &str) -> Result<Self> {
        if s.trim() == "all" {
            return Ok(Self::All);
        }
        let fams: Vec<String> = s
            .split(',')
            .map(|f| f.trim().to_string())
            .filter(|f| !f.is_empty())
            .collect();
        if fams.is_empty() {
            return Err(PlanError::InvalidArgument {
                name: "families",
                value: s.to_string(),
                reason: "expected `all` or a comma-separated list of families",
            });
        }
        Ok(Self::Only(fams))
    }

    fn admits(&self, family: &str) -> bool {
        match self {
            Self::All => true,
            Self::Only(f) => f.iter().any(|x| x == family),
        }
    }
}

/// Counts from reading a price list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CatalogueStats {
    /// Data rows with an instance name.
    pub instance_rows: usize,
    /// Rows with an empty name (separators, summaries), skipped.
    pub separator_rows: usize,
    /// Types kept after the family filter.
    pub kept: usize,
}

/// Reads a price list from a file.
pub fn load_catalogue(path: &Path, filter: &FamilyFilter) -> Result<(Catalogue, CatalogueStats)> {
    let file = std::fs::File::open(path).map_err(|source| PlanError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_catalogue(file, path, filter)
}

/// Reads a price list from any reader; `path` only names the source in errors.
pub fn parse_catalogue<R: Read>(
    reader: R,
    path: &Path,
    filter: &FamilyFilter,
) -> Result<(Catalogue, CatalogueStats)> {
    let (mut rdr, lines) = csv_reader(reader, true);
    let headers = rdr
        .headers()
        .map_err(|e| csv_error(path, &lines, 0, e))?
        .clone();
    let col = |name: &'static str| {
        headers
            .iter()
            .position(|h| h.trim() == name)
            .ok_or_else(|| PlanError::MissingColumn {
                path: path.to_path_buf(),
                column: name,
            })
    };
    let (c_name, c_vcpu, c_mem, c_price) =
        (col("name")?, col("vcpu")?, col("memory")?, col("price")?);
    let c_class = headers.iter().position(|h| h.trim() == "class");
    let mut stats = CatalogueStats::default();
    let mut types: Vec<VmType> = Vec::new();
    let mut first_line: std::collections::HashMap<String, u64> = Default::default();
    let mut rec = csv::StringRecord::new();
    let mut seen_families = std::collections::BTreeSet::new();
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
        if rec.len() != headers.len() {
            return Err(bad(RowProblem::WrongFieldCount {
                expected: headers.len(),
                found: rec.len(),
            }));
        }
        let name = rec[c_name].trim();
        if name.is_empty() {
            stats.separator_rows += 1;
            continue;
        }
        stats.instance_rows += 1;
        if let Some(&first) = first_line.get(name) {
            return Err(bad(RowProblem::Duplicate {
                what: format!("instance type {name}"),
                first_line: first,
            }));
        }
        first_line.insert(name.to_string(), line);
        let family = match c_class.map(|c| rec[c].trim()) {
            Some(f) if !f.is_empty() => f.to_string(),
            _ => name.split('.').next().unwrap_or(name).to_string(),
        };
        let num = |c: usize, column: &'static str, max: f64, unit| -> Result<f64> {
            let v = rec[c].trim();
            if v.is_empty() {
                return Err(bad(RowProblem::Empty { column }));
            }
            match v.parse::<f64>() {
                Ok(x) if x.is_finite() && x > 0.0 && x <= max => Ok(x),
                Ok(x) if x.is_finite() && x > max => Err(bad(RowProblem::TooLarge {
                    column,
                    value: v.to_string(),
                    max,
                    unit,
                })),
                _ => Err(bad(RowProblem::BadNumber {
                    column,
                    value: v.to_string(),
                    expected: "positive number",
                })),
            }
        };
        let vcpu = num(c_vcpu, "vcpu", MAX_VCPU, "vCPU")?;
        let mem = num(c_mem, "memory", MAX_GIB, "GiB")?;
        let price = num(c_price, "price", MAX_PRICE, "$/h")?;
        seen_families.insert(family.clone());
        if filter.admits(&family) {
            types.push(VmType {
                name: name.to_string(),
                family,
                cap: Res::from_vcpu_gib(vcpu, mem),
                price: round_up(price * 1e6),
            });
        }
    }
    if stats.instance_rows == 0 {
        return Err(PlanError::NoData {
            path: path.to_path_buf(),
        });
    }
    if let FamilyFilter::Only(wanted) = filter {
        let unknown: Vec<String> = wanted
            .iter()
            .filter(|f| !seen_families.contains(*f))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            let mut known: Vec<&String> = seen_families.iter().take(12).collect();
            known.sort();
            let more = seen_families.len().saturating_sub(known.len());
            let mut known = known
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            if more > 0 {
                known.push_str(&format!(" and {more} more"));
            }
            return Err(PlanError::UnknownFamilies {
                path: path.to_path_buf(),
                unknown,
                known,
            });
        }
    }
    stats.kept = types.len();
    if types.is_empty() {
        return Err(PlanError::EmptyCatalogue {
            families: match filter {
                FamilyFilter::All => vec!["all".into()],
                FamilyFilter::Only(f) => f.clone(),
            },
        });
    }
    Ok((Catalogue::new(types), stats))
}

/// Turns a CSV reader error into a typed error with its line.
pub(crate) fn csv_error(path: &Path, lines: &LineIndex, byte: u64, e: csv::Error) -> PlanError {
    let line = lines.line_of(e.position().map_or(byte, |p| p.byte()));
    let msg = match e.kind() {
        csv::ErrorKind::Utf8 { err, .. } => format!("invalid UTF-8: {err}"),
        _ => e.to_string(),
    };
    match e.into_kind() {
        csv::ErrorKind::Io(source) => PlanError::Io {
            path: path.to_path_buf(),
            source,
        },
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => PlanError::Malformed {
            path: path.to_path_buf(),
            line,
            problem: RowProblem::WrongFieldCount {
                expected: expected_len as usize,
                found: len as usize,
            },
        },
        _ => PlanError::Malformed {
            path: path.to_path_buf(),
            line,
            problem: RowProblem::Syntax(msg),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = "name,class,memory,vcpu,zone,price\n\
        ,,,,,\n\
        m5.large,m5,8,2,\"a, b\",0.096\n\
        m5.xlarge,m5,16,4,\"a, b\",0.192\n\
        c5.large,c5,4,2,x,0.085\n\
        ,,,,,0.5\n";

    fn p() -> &'static Path {
        Path::new("prices.csv")
    }

    #[test]
    fn reads_and_filters() {
        let (cat, st) =
            parse_catalogue(LIST.as_bytes(), p(), &FamilyFilter::parse("m5").unwrap()).unwrap();
        assert_eq!(st.instance_rows, 3);
        assert_eq!(st.separator_rows, 2);
        assert_eq!(st.kept, 2);
        assert_eq!(cat.types()[0].name, "m5.large");
        assert_eq!(cat.types()[0].cap, Res::new(2000, 8192));
        assert_eq!(cat.types()[0].price, 96_000);
        let (all, _) = parse_catalogue(LIST.as_bytes(), p(), &FamilyFilter::All).unwrap();
        assert_eq!(all.types()[0].name, "c5.large");
    }

    #[test]
    fn bad_rows_have_line_numbers() {
        let bad = LIST.replace("0.192", "cheap");
        let e = parse_catalogue(bad.as_bytes(), p(), &FamilyFilter::All).unwrap_err();
        assert_eq!(
            e.to_string(),
            "prices.csv:4: field `price` = \"cheap\" is not a valid positive number"
        );
        let short = LIST.replace("c5.large,c5,4,2,x,0.085", "c5.large,c5,4,2");
        let e = parse_catalogue(short.as_bytes(), p(), &FamilyFilter::All).unwrap_err();
        assert!(
            matches!(
                e,
                PlanError::Malformed {
                    line: 5,
                    problem: RowProblem::WrongFieldCount {
                        expected: 6,
                        found: 4
                    },
                    ..
                }
            ),
            "{e}"
        );
        let dup = format!("{LIST}m5.large,m5,8,2,x,0.096\n");
        let e = parse_catalogue(dup.as_bytes(), p(), &FamilyFilter::All).unwrap_err();
        assert!(
            matches!(
                e,
                PlanError::Malformed {
                    line: 7,
                    problem: RowProblem::Duplicate { first_line: 3, .. },
                    ..
                }
            ),
            "{e}"
        );
        let e = parse_catalogue("name,vcpu\n".as_bytes(), p(), &FamilyFilter::All).unwrap_err();
        assert!(matches!(
            e,
            PlanError::MissingColumn {
                column: "memory",
                ..
            }
        ));
        let e =
            parse_catalogue(LIST.as_bytes(), p(), &FamilyFilter::parse("z9").unwrap()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "prices.csv: no instance type of family [\"z9\"] (the list has c5, m5)"
        );
        let e = parse_catalogue(
            LIST.as_bytes(),
            p(),
            &FamilyFilter::parse("m5,x1,c5").unwrap(),
        )
        .unwrap_err();
        assert!(
            matches!(&e, PlanError::UnknownFamilies { unknown, .. } if unknown == &["x1"]),
            "{e}"
        );
        for (col, v) in [("price", "1e30"), ("vcpu", "2e6"), ("memory", "inf")] {
            let text = LIST.replace(
                "c5.large,c5,4,2,x,0.085",
                &match col {
                    "price" => format!("c5.large,c5,4,2,x,{v}"),
                    "vcpu" => format!("c5.large,c5,4,{v},x,0.085"),
                    _ => format!("c5.large,c5,{v},2,x,0.085"),
                },
            );
            let e = parse_catalogue(text.as_bytes(), p(), &FamilyFilter::All)
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&format!("prices.csv:5: field `{col}`")),
                "{e}"
            );
        }
    }
}
