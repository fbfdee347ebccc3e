//! `nestlessctl`: the operator's command line.
//!
//! `nestlessctl status|vms|nics|leases [--json]` ask the host agent's admin
//! socket; `nestlessctl vm add|set|rm|ls` change the VMs registered at run
//! time; `nestlessctl plan` runs the Hostlo placement planner.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use nestless_netagent::ctl::{self, View, VmCommand};
use nestless_planner as planner;

#[derive(Parser)]
#[command(
    name = "nestlessctl",
    version,
    about = "Inspect a nestless host agent; plan Hostlo placements"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct AgentArgs {
    /// The agent's admin socket.
    #[arg(long, default_value = ctl::DEFAULT_ADMIN_SOCKET)]
    socket: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct VmArgs {
    #[command(subcommand)]
    command: VmCommand,
    /// The agent's admin socket.
    #[arg(long, global = true, default_value = ctl::DEFAULT_ADMIN_SOCKET)]
    socket: PathBuf,
    /// Print JSON instead of a table or a line.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Register, change, unregister and list VMs at run time.
    Vm(VmArgs),
    /// The agent's version, uptime and counts.
    Status(AgentArgs),
    /// The VMs the agent serves and whether their backends answer.
    Vms(AgentArgs),
    /// The NICs the agent handed out.
    Nics {
        #[command(flatten)]
        args: AgentArgs,
        /// Only this VM's NICs.
        #[arg(long)]
        vm: Option<String>,
    },
    /// The address leases.
    Leases(AgentArgs),
    /// Hostlo pods: their parts, segments, ports and conflicts.
    Hostlo(AgentArgs),
    /// Plan VM placements with and without Hostlo and report the saving.
    Plan(planner::cli::PlanArgs),
}

fn vm(args: VmArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (value, text) = rt.block_on(async {
        let client = ctl::connect(&args.socket).await?;
        ctl::vm_command(&client, &args.command).await
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{text}");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (view, args, vm) = match cli.command {
        Command::Plan(args) => return planner::cli::run(args),
        Command::Vm(args) => return vm(args),
        Command::Status(a) => (View::Status, a, None),
        Command::Vms(a) => (View::Vms, a, None),
        Command::Nics { args, vm } => (View::Nics, args, vm),
        Command::Leases(a) => (View::Leases, a, None),
        Command::Hostlo(a) => (View::Hostlo, a, None),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let value = rt.block_on(async {
        let client = ctl::connect(&args.socket).await?;
        ctl::fetch(&client, view, vm.as_deref()).await
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{}", ctl::table(view, &value));
    }
    Ok(())
}
