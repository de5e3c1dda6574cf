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

/// Builds kas, agentk and the `e2e` binaries `scenarios` (release or debug), showing cargo's progress.
pub fn build(release: bool, scenarios: &[&str]) -> anyhow::Result<ExitCode> {
    let mut build = cargo();
    build.args([
        "build", "--locked", "-p", "kas", "-p", "agentk", "-p", "e2e", "--bin", "kas", "--bin",
        "agentk",
    ]);
    for scenario in scenarios {
        build.args(["--bin", scenario]);
    }
    if release {
        build.arg("--release");
    }
    run(build)
}

/// Builds kas, agentk and the scenario binary with `profile` flags, then runs the scenario.
fn build_and_run(
    release: bool,
    scenario: &str,
    args: &[String],
    env: &[(&str, &std::ffi::OsStr)],
) -> anyhow::Result<ExitCode> {
    if build(release, &[scenario])? != ExitCode::SUCCESS {
        return Ok(ExitCode::FAILURE);
    }
    let binary = crate::target_dir()
        .join(if release { "release" } else { "debug" })
        .join(scenario);
    let mut command = Command::new(binary);
    command.args(args).envs(env.iter().copied());
    run(command)
}

/// The seed's scenario through Gitea and its webhook: builds first (cargo's progress shows), starts the
/// local cluster and Gitea (tools from the cache, built when missing), runs the seed's steps and the prune,
/// and tears the environment down again.
pub fn seed() -> anyhow::Result<ExitCode> {
    let started = std::time::Instant::now();
    eprintln!("[  0.0s] building kas, agentk and the seed scenario");
    if build(false, &["seed"])? != ExitCode::SUCCESS {
        return Ok(ExitCode::FAILURE);
    }
    eprintln!(
        "[{:>5.1}s] starting the cluster and Gitea",
        started.elapsed().as_secs_f64()
    );
    let dir = crate::target_dir().join("seed-env");
    let state = crate::cluster::up_local(&dir)?;
    let state_file = crate::cluster::state_file(&dir.canonicalize()?);
    let result = build_and_run(
        false,
        "seed",
        &[],
        &[
            ("GITOPS_TEST_ENV", state_file.as_os_str()),
            ("KUBECONFIG", state.kubernetes.kubeconfig.as_os_str()),
        ],
    );
    crate::cluster::down(&dir)?;
    eprintln!(
        "[{:>5.1}s] `cargo xtask e2e` done (build, cluster and Gitea included)",
        started.elapsed().as_secs_f64()
    );
    result
}

/// The apply benchmark needs the cluster: started here, torn down after.
pub fn bench_gitops() -> anyhow::Result<ExitCode> {
    bench_on_cluster("bench-gitops", "bench-env")
}

/// The Kubernetes API proxy benchmark: the cluster and Gitea started here, torn down after.
pub fn bench_proxy() -> anyhow::Result<ExitCode> {
    bench_on_cluster("bench-proxy", "bench-proxy-env")
}

/// Runs the release scenario binary `scenario` against a local test environment of its own in `env_dir`
/// (under the target directory).
fn bench_on_cluster(scenario: &str, env_dir: &str) -> anyhow::Result<ExitCode> {
    let dir = crate::target_dir().join(env_dir);
    let state = crate::cluster::up_local(&dir)?;
    let state_file = crate::cluster::state_file(&dir.canonicalize()?);
    let result = build_and_run(
        true,
        scenario,
        &[],
        &[
            ("GITOPS_TEST_ENV", state_file.as_os_str()),
            ("KUBECONFIG", state.kubernetes.kubeconfig.as_os_str()),
        ],
    );
    crate::cluster::down(&dir)?;
    result
}

pub fn bench_agents(agents: usize) -> anyhow::Result<ExitCode> {
    build_and_run(true, "bench-agents", &[agents.to_string()], &[])
}

/// agentk's network-policy alerts module at 10,000 flows/s, as processes against the local cluster.
pub fn bench_flows() -> anyhow::Result<ExitCode> {
    bench_on_cluster("bench-network-alerts", "bench-flows-env")
}

/// kas's `NetworkAlerts.ReportAlerts` throughput against empty batches, in one run (no cluster needed).
pub fn bench_alerts() -> anyhow::Result<ExitCode> {
    build_and_run(true, "bench-alerts", &[], &[])
}
