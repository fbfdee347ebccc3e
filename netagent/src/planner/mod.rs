//! Hostlo placement planner (issue 6). Placeholder: filled in by the planner work.

/// Command-line entry of `nestlessctl plan`.
pub mod cli {
    /// Arguments of `nestlessctl plan`.
    #[derive(Debug, clap::Args)]
    pub struct PlanArgs {}

    /// Runs `nestlessctl plan`.
    pub fn run(_args: PlanArgs) -> anyhow::Result<()> {
        anyhow::bail!("nestlessctl plan is not implemented yet")
    }
}
