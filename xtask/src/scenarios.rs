//! `cargo xtask e2e` and `cargo xtask bench ...`: build the binaries, then run the scenario programs of the
//! `e2e` crate, which start kas and agentk as real processes.

use std::process::{Command, ExitCode};

use anyhow::Context;

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(mut command: Command) -> anyhow::Result<ExitCode> {
    let status = command
        .status()
        .with_context(|| format!("running {command:?}"))?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Builds kas, agentk and the scenario binary with `profile` flags, then runs the scenario.
fn build_and_run(release: bool, scenario: &str, args: &[String]) -> anyhow::Result<ExitCode> {
    let mut build = cargo();
    build.args([
        "build", "--locked", "-p", "kas", "-p", "agentk", "-p", "e2e", "--bin", "kas", "--bin",
        "agentk", "--bin", scenario,
    ]);
    if release {
        build.arg("--release");
    }
    if run(build)? != ExitCode::SUCCESS {
        return Ok(ExitCode::FAILURE);
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var("CARGO_TARGET_DIR").map_or_else(|_| root.join("target"), Into::into);
    let binary = target
        .join(if release { "release" } else { "debug" })
        .join(scenario);
    let mut command = Command::new(binary);
    command.args(args);
    run(command)
}

pub fn seed() -> anyhow::Result<ExitCode> {
    build_and_run(false, "seed", &[])
}

pub fn bench_agents(agents: usize) -> anyhow::Result<ExitCode> {
    build_and_run(true, "bench-agents", &[agents.to_string()])
}
