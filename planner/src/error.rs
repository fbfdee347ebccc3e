//! Typed errors of the planner library.
use std::path::PathBuf;

/// What is wrong with one input row (the file and line are carried by [`PlanError::Malformed`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RowProblem {
    /// The row has the wrong number of fields.
    #[error("expected {expected} fields, found {found}")]
    WrongFieldCount {
        /// Fields the format has.
        expected: usize,
        /// Fields the row has.
        found: usize,
    },
    /// A field that must be present is empty.
    #[error("field `{column}` is empty")]
    Empty {
        /// Name of the column.
        column: &'static str,
    },
    /// A field does not parse as the number it must be.
    #[error("field `{column}` = {value:?} is not a valid {expected}")]
    BadNumber {
        /// Name of the column.
        column: &'static str,
        /// The text found.
        value: String,
        /// What was expected ("non-negative number", "integer", ...).
        expected: &'static str,
    },
    /// A finite number so large that no VM comes near it (and sums of it would overflow).
    #[error("field `{column}` = {value:?} is above the limit of {max} {unit}")]
    TooLarge {
        /// Name of the column.
        column: &'static str,
        /// The text found.
        value: String,
        /// The largest value accepted.
        max: f64,
        /// Unit of `max` ("vCPU", "GiB", "$/h").
        unit: &'static str,
    },
    /// `event_type` outside 0..=8.
    #[error("event_type {0} is not one of 0..=8")]
    UnknownEventType(u64),
    /// The same key appears twice.
    #[error("duplicate {what} (first seen on line {first_line})")]
    Duplicate {
        /// What is duplicated ("container client/pod/container").
        what: String,
        /// Line where it was first seen.
        first_line: u64,
    },
    /// The same job is attributed to two users.
    #[error("job {job} belongs to user {first_user:?} on line {first_line} but to {user:?} here")]
    JobUserConflict {
        /// The job id.
        job: u64,
        /// The user seen first.
        first_user: String,
        /// Line of the first sighting.
        first_line: u64,
        /// The user on this row.
        user: String,
    },
    /// The header row is not the one the format requires.
    #[error("header must be {expected:?}, found {found:?}")]
    BadHeader {
        /// The required header.
        expected: String,
        /// The header found.
        found: String,
    },
    /// The CSV reader could not split the row (bad quoting, invalid UTF-8).
    #[error("cannot parse the row as CSV: {0}")]
    Syntax(String),
}

/// Errors of the planner library.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// An input file could not be opened or read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A row of an input file is malformed.
    #[error("{path}:{line}: {problem}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong.
        problem: RowProblem,
    },
    /// A column the format needs is absent from the header.
    #[error("{path}: the header has no column `{column}`")]
    MissingColumn {
        /// The file.
        path: PathBuf,
        /// The missing column.
        column: &'static str,
    },
    /// An input file holds no usable row.
    #[error("{path}: no data row")]
    NoData {
        /// The file.
        path: PathBuf,
    },
    /// A command-line or library argument is out of range.
    #[error("invalid argument `{name}` = {value:?}: {reason}")]
    InvalidArgument {
        /// Argument name.
        name: &'static str,
        /// Value given.
        value: String,
        /// Why it is rejected.
        reason: &'static str,
    },
    /// Families asked for with `--families` that the price list does not have.
    #[error("{path}: no instance type of family {unknown:?} (the list has {known})")]
    UnknownFamilies {
        /// The price list.
        path: PathBuf,
        /// The families not found.
        unknown: Vec<String>,
        /// A few families of the list, for the message.
        known: String,
    },
    /// No VM type is left after filtering the catalogue by family.
    #[error("no VM type of families {families:?} in the catalogue")]
    EmptyCatalogue {
        /// The requested families.
        families: Vec<String>,
    },
    /// A placement breaks a constraint (returned by [`crate::validate`]).
    #[error("invalid placement: {0}")]
    InvalidPlacement(#[from] Violation),
}

/// A constraint that a placement breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// A container is placed zero or several times.
    #[error("container {pod}/{container} is placed {times} times")]
    PlacedTimes {
        /// Pod index.
        pod: usize,
        /// Container index.
        container: usize,
        /// How often it is placed.
        times: usize,
    },
    /// A VM holds more than its capacity.
    #[error("VM {vm} ({ty}) is over capacity")]
    OverCapacity {
        /// VM index.
        vm: usize,
        /// Its type name.
        ty: String,
    },
    /// Without Hostlo a pod spans several VMs.
    #[error("pod {pod} spans {vms} VMs without Hostlo")]
    PodSpans {
        /// Pod index.
        pod: usize,
        /// Number of VMs.
        vms: usize,
    },
    /// VMs linked by a spanning pod are of several families on a per-family host.
    #[error("VMs linked by spanning pods mix families {0:?} on one host")]
    MixedFamilies(Vec<String>),
    /// VMs linked by a spanning pod exceed the host.
    #[error(
        "VMs linked by spanning pods need {cpu_milli} mvCPU / {mem_mib} MiB, more than the host"
    )]
    HostOverflow {
        /// Summed milli-vCPU of the VMs.
        cpu_milli: u64,
        /// Summed MiB of the VMs.
        mem_mib: u64,
    },
}

/// Result alias of the planner library.
pub type Result<T, E = PlanError> = std::result::Result<T, E>;
