//! Hostlo placement planner (`nestlessctl plan`).
//!
//! Hostlo lets a pod span several VMs of one host. The planner measures what that is
//! worth to a cloud client: for each client it computes the cheapest set of VMs and the
//! placement of its containers
//!
//! - (a) when every pod must fit inside one VM, and
//! - (b) when a pod may span VMs on one host (Hostlo),
//!
//! and reports the saving of (b) over (a), as the paper "Nested virtualization without the
//! nest" (ICPP 2019) does: more than 11 % of clients save, by up to 40 %.
//!
//! Flow:
//!
//! ```text
//! pods CSV ──input──┐
//! Google shards ─google─┼─> Vec<Client> ──plan::plan_all──> ClientPlan ──report──> table/CSV/JSON,
//! price list ─catalogue─┘        (pack: heuristic, bound: LP bound)        summary, CDF SVG
//!                                                        └──annotations──> Hostlo pod annotations
//! ```
//!
//! The heuristic ([`pack`]) is a multi-start variable-sized bin-packing construction with a
//! local search; the exact part ([`setcover`]) bounds every plan from below (column
//! generation over a set-cover formulation) and replaces it by the MILP solver's plan when
//! cheaper, so that each plan carries a certified gap and most are proven optimal;
//! [`report`] turns the bounds into verdicts (a saving counts only where proven). [`exact`]
//! computes true optima of small clients by brute force for the tests, and [`bound`] the
//! capacity bound. `docs/planner.md` explains the model.
#![warn(missing_docs)]

pub mod annotations;
pub mod bound;
pub mod catalogue;
pub mod cli;
pub mod error;
pub mod exact;
pub mod google;
pub mod input;
pub mod lines;
pub mod model;
pub mod pack;
pub mod plan;
pub mod report;
pub mod setcover;

pub use error::{PlanError, Result, RowProblem, Violation};
pub use model::{
    validate, Catalogue, Client, Container, HostModel, ItemRef, Mode, Placement, Pod, Res, Vm,
    VmType,
};
pub use plan::{plan_all, plan_client, ClientPlan, PlanConfig};
