//! Project automation: `cargo xtask <command>`. Everything that is not `cargo build` lives here, in Rust.

mod cluster;
mod codegen;
mod dist;
mod fuzz;
mod kubernetes_gomod;
mod lint;
mod process;
mod quickstart;
mod scenarios;
#[path = "../../crates/test-support/src/state.rs"]
mod state;
mod test_cmd;
mod tools;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cluster::BackendChoice;

#[derive(Parser)]
#[command(
    name = "xtask",
    about = "Project automation for the GitOps agent and server"
)]
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
    /// The lint gate: `cargo fmt --check`, clippy with `-D warnings`, `codegen --check`. `test` runs it first.
    Lint,
    /// Release builds of kas and agentk in `target/dist/` with `SHA256SUMS`.
    Dist {
        /// Build for this target triple (installed with `rustup target add`) instead of the host.
        #[arg(long)]
        target: Option<String>,
    },
    /// The kas and agentk images from `docker/Dockerfile` (needs a running Docker engine).
    Image {
        /// The container engine's command (`docker`, `podman`).
        #[arg(long, default_value = "docker")]
        engine: String,
        /// Registry and owner of the image names: `<prefix>/kas:<version>`.
        #[arg(long, default_value = dist::IMAGE_PREFIX)]
        prefix: String,
        /// Push the images after building them.
        #[arg(long)]
        push: bool,
    },
    /// Runs each fuzz target of `fuzz/` (cargo-fuzz) for the given time; a failure found fails the command.
    Fuzz {
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
    },
    /// The test environment: a Kubernetes cluster and Gitea.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// The pinned tools the test environment runs (built from Go modules into a cache).
    Tools {
        #[command(subcommand)]
        action: ToolsAction,
    },
    /// The seed's world, left running: the cluster, Gitea with `demo/gitops` and its webhook, kas and
    /// agentk. Prints the URLs, credentials and commands to use it; a second `up` prints them again.
    Up {
        /// The state directory (pid files, logs, credentials); default `~/.local/state/gitops-quickstart`.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Ends what `up` started.
    Down {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// The seed's scenario through Gitea and its webhook: register, install with `agentk generate`, apply,
    /// scale to 2 replicas, prune; each step timed.
    E2e,
    /// Benchmarks; each prints its figures last.
    Bench {
        #[command(subcommand)]
        which: BenchWhich,
    },
    /// The project's tests: the lint gate, then starts the test environment, runs `cargo test --workspace`,
    /// tears it down.
    Test {
        /// Skip the lint gate (for quick local runs of a subset; CI never passes this).
        #[arg(long)]
        no_lint: bool,
        #[arg(long, value_enum, default_value = "auto")]
        backend: BackendChoice,
        /// Passed on to `cargo test` (after `--`).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum BenchWhich {
    /// The apply engine against `kubectl apply --server-side` on the local cluster.
    Gitops,
    /// Memory of kas and agentk, idle and with many agents connected over real sockets.
    Agents {
        #[arg(long, default_value_t = 1000)]
        agents: usize,
    },
    /// The Kubernetes API proxy against the apiserver directly: GET latency, LIST, watches, log streams.
    Proxy,
    /// Network alerts per second kas accepts (`ReportAlerts`), against empty batches in the same run.
    Alerts,
    /// agentk following 10,000 Hubble flows a second (network alerts): CPU and memory, against a bare
    /// decoder of the same stream in the same run, on the local cluster.
    Flows,
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Build what is missing, start the cluster and Gitea, and print the exports for tests.
    Up {
        #[arg(long, value_enum, default_value = "auto")]
        backend: BackendChoice,
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Stop what `up` started.
    Down {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Show the tools cache and the running processes.
    Status {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ToolsAction {
    /// Build every missing tool of the local backend.
    Build,
    /// Show which tools are built.
    Status,
    /// Regenerate tools/kubernetes/go.mod from the upstream go.mod of the pinned Kubernetes version.
    GenKubernetes,
}

/// The repository root (xtask lives one level below it). Taken from the environment `cargo run` sets,
/// not from compile time: an xtask binary built from another checkout into a shared `CARGO_TARGET_DIR`
/// would otherwise work on that checkout.
pub fn repo_root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    let root = manifest_dir.join("..");
    root.canonicalize().unwrap_or(root)
}

/// Where cargo puts build output: `CARGO_TARGET_DIR`, else `<repo>/target`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo_root().join("target"), PathBuf::from)
}

fn main() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Command::Codegen { check } => codegen::run(check)?,
        Command::Lint => lint::run()?,
        Command::Dist { target } => dist::dist(target.as_deref())?,
        Command::Image {
            engine,
            prefix,
            push,
        } => dist::image(&engine, &prefix, push)?,
        Command::Fuzz { seconds, target } => fuzz::run(seconds, target.as_deref())?,
        Command::Cluster { action } => match action {
            ClusterAction::Up { backend, dir } => {
                cluster::up_command(backend, &dir.unwrap_or_else(cluster::default_dir))?
            }
            ClusterAction::Down { dir } => {
                cluster::down(&dir.unwrap_or_else(cluster::default_dir))?
            }
            ClusterAction::Status { dir } => {
                cluster::status(&dir.unwrap_or_else(cluster::default_dir))?
            }
        },
        Command::Tools { action } => match action {
            ToolsAction::Build => tools::ensure_local_backend()?,
            ToolsAction::Status => tools::print_status(),
            ToolsAction::GenKubernetes => kubernetes_gomod::generate()?,
        },
        Command::Up { dir } => {
            return quickstart::up(&dir.unwrap_or_else(quickstart::default_dir));
        }
        Command::Down { dir } => quickstart::down(&dir.unwrap_or_else(quickstart::default_dir))?,
        Command::E2e => return scenarios::seed(),
        Command::Bench {
            which: BenchWhich::Agents { agents },
        } => return scenarios::bench_agents(agents),
        Command::Bench {
            which: BenchWhich::Gitops,
        } => return scenarios::bench_gitops(),
        Command::Bench {
            which: BenchWhich::Proxy,
        } => return scenarios::bench_proxy(),
        Command::Bench {
            which: BenchWhich::Alerts,
        } => return scenarios::bench_alerts(),
        Command::Bench {
            which: BenchWhich::Flows,
        } => return scenarios::bench_flows(),
        Command::Test {
            backend,
            no_lint,
            cargo_args,
        } => {
            if !no_lint {
                lint::run()?;
            }
            return test_cmd::run(backend, &cargo_args);
        }
    }
    Ok(ExitCode::SUCCESS)
}
