//! `nestlessctl`: the operator's command line.
use clap::{Parser, Subcommand};
use nestless_netagent::planner;

#[derive(Parser)]
#[command(name = "nestlessctl", version, about = "Inspect a nestless host agent; plan Hostlo placements")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Plan VM placements with and without Hostlo and report the saving.
    Plan(planner::cli::PlanArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Plan(args) => planner::cli::run(args),
    }
}
