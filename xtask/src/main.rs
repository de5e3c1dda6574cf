//! Project automation: `cargo xtask <command>`. Everything that is not `cargo build` lives here, in Rust.

mod codegen;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Project automation for the GitOps agent and server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Regenerate the protocol crate's Rust code from `proto/`; `--check` fails when it is stale.
    Codegen {
        #[arg(long)]
        check: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Codegen { check } => codegen::run(check),
    }
}
