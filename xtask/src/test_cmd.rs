//! `cargo xtask test`, the project's test command: builds missing tools, starts the cluster and Gitea, runs
//! `cargo test --workspace --locked --no-fail-fast` against them, and tears them down again, also when the
//! tests fail or the run is interrupted. Nothing is skipped: a missing prerequisite fails the run.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::cluster::{self, BackendChoice};
use crate::state::STATE_ENV_VAR;

pub fn run(backend: BackendChoice, cargo_args: &[String]) -> Result<ExitCode> {
    check_prerequisites()?;
    ensure_browser()?;
    let backend = backend.resolve();
    // Its own run directory, so a `cluster up` environment of a developer is neither reused nor disturbed.
    let dir = crate::target_dir().join(format!("test-env-run-{}", std::process::id()));
    let runtime = tokio::runtime::Runtime::new()?;
    let setup = Instant::now();
    let result = match backend {
        BackendChoice::Docker => runtime.block_on(async {
            std::fs::create_dir_all(&dir)?;
            let (env, _) = cluster::start_docker(&dir).await?;
            eprintln!(
                "==> test environment (docker) up in {:.1?}",
                setup.elapsed()
            );
            let result = run_cargo_test(&dir, cargo_args).await;
            env.stop().await;
            result
        }),
        _ => {
            eprintln!(
                "==> starting the test environment (local backend) in {}",
                dir.display()
            );
            let state = cluster::up_local(&dir)?;
            eprintln!(
                "==> test environment up in {:.1?}: kubernetes {} at {}, gitea {} at {}",
                setup.elapsed(),
                state.kubernetes.version,
                state.kubernetes.server,
                state.gitea.version,
                state.gitea.url
            );
            let result = runtime.block_on(run_cargo_test(&dir, cargo_args));
            let teardown = Instant::now();
            let down = cluster::down(&dir);
            eprintln!(
                "==> test environment torn down in {:.1?}",
                teardown.elapsed()
            );
            // The run directory (with the logs) is kept only when something failed.
            if down.is_ok() && matches!(result, Ok(true)) {
                let _ = std::fs::remove_dir_all(&dir);
            }
            down.and(result)
        }
    };
    match result {
        Ok(true) => Ok(ExitCode::SUCCESS),
        Ok(false) => {
            eprintln!(
                "==> tests failed; infrastructure logs are in {}/logs",
                dir.display()
            );
            Ok(ExitCode::FAILURE)
        }
        Err(err) => Err(err),
    }
}

/// Runs the workspace's tests with the state file exported; true when they passed. A Ctrl-C stops the tests
/// and still lets the caller tear the environment down.
async fn run_cargo_test(dir: &Path, cargo_args: &[String]) -> Result<bool> {
    if !build_process_binaries(cargo_args).await? {
        return Ok(false);
    }
    let state = cluster::state_file(dir);
    let mut command =
        tokio::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    command
        .args(["test", "--workspace", "--locked", "--no-fail-fast"])
        .args(cargo_args)
        .env(STATE_ENV_VAR, &state)
        .current_dir(crate::repo_root())
        .kill_on_drop(true);
    eprintln!(
        "==> cargo test --workspace --locked --no-fail-fast {} ({STATE_ENV_VAR}={})",
        cargo_args.join(" "),
        state.display()
    );
    let mut child = command.spawn().context("run cargo test")?;
    tokio::select! {
        status = child.wait() => Ok(status?.success()),
        _ = tokio::signal::ctrl_c() => {
            eprintln!("==> interrupted; stopping the tests and tearing down");
            let _ = child.kill().await;
            Ok(false)
        }
    }
}

/// The process tests (`e2e`) start the `kas` and `agentk` binaries beside their own test binary, and
/// `cargo test` builds a package's binaries only for that package's own integration tests: `kas` would be
/// missing on a clean checkout. They are built first, with the profile the tests use.
async fn build_process_binaries(cargo_args: &[String]) -> Result<bool> {
    let profile = profile_args(cargo_args);
    eprintln!(
        "==> cargo build --locked -p kas -p agentk {}",
        profile.join(" ")
    );
    let status =
        tokio::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
            .args(["build", "--locked", "-p", "kas", "-p", "agentk"])
            .args(&profile)
            .current_dir(crate::repo_root())
            .kill_on_drop(true)
            .status()
            .await
            .context("run cargo build")?;
    Ok(status.success())
}

/// The profile flags among the arguments passed on to `cargo test` (`--release`, `--profile <name>`).
fn profile_args(cargo_args: &[String]) -> Vec<String> {
    let mut profile = Vec::new();
    let mut args = cargo_args.iter();
    while let Some(arg) = args.next() {
        if arg == "--release" || arg.starts_with("--profile=") {
            profile.push(arg.clone());
        } else if arg == "--profile" {
            profile.push(arg.clone());
            profile.extend(args.next().cloned());
        }
    }
    profile
}

/// What the local backend needs from the machine besides the Go modules; said up front, by name.
fn check_prerequisites() -> Result<()> {
    for (program, why) in [
        (
            "go",
            "builds the cluster tools and Gitea from their Go modules (install Go 1.26)",
        ),
        ("git", "Gitea and the tests push over HTTP with it"),
        ("gcc", "Gitea's SQLite driver is cgo"),
    ] {
        let found = std::process::Command::new(program)
            .arg("--version")
            .output()
            .is_ok()
            || std::process::Command::new(program)
                .arg("version")
                .output()
                .is_ok();
        if !found {
            anyhow::bail!("`{program}` is not installed or not on PATH; it {why}");
        }
    }
    Ok(())
}

// --- The dashboard's browser test (e2e/tests/dashboard.rs): Debian's Chromium and a pinned playwright-core ---

const CHROMIUM: &str = "/usr/bin/chromium";

/// Installs what the dashboard's browser test needs when it is missing: Chromium from Debian's packages (as
/// root), and playwright-core at the version `e2e/dashboard/package.json` pins into
/// `<tools cache>/playwright-core-<version>`, outside the clone. Fails, naming what to do, when it can't.
fn ensure_browser() -> Result<()> {
    if !Path::new(CHROMIUM).exists() {
        install_chromium()?;
    }
    let version = pinned_playwright_core()?;
    let dir = crate::tools::cache_root().join(format!("playwright-core-{version}"));
    if dir
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        return Ok(());
    }
    eprintln!(
        "==> npm install playwright-core@{version} into {}",
        dir.display()
    );
    std::fs::create_dir_all(&dir)?;
    // Its own package.json, so npm installs here and does not look for one further up.
    std::fs::write(dir.join("package.json"), "{\"private\":true}\n")?;
    let status = std::process::Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--save-exact"])
        .arg(format!("playwright-core@{version}"))
        .current_dir(&dir)
        .status()
        .context("run npm (the dashboard test needs Node.js and npm)")?;
    anyhow::ensure!(
        status.success(),
        "npm install playwright-core@{version} failed ({status}); the dashboard test needs it"
    );
    Ok(())
}

fn install_chromium() -> Result<()> {
    let uid = std::process::Command::new("id").arg("-u").output()?;
    anyhow::ensure!(
        String::from_utf8_lossy(&uid.stdout).trim() == "0",
        "{CHROMIUM} is missing and this is not root: install Debian's Chromium (`sudo apt-get install -y \
         chromium`) for the dashboard's browser test"
    );
    let apt = |args: &[&str]| {
        eprintln!("==> apt-get {}", args.join(" "));
        std::process::Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("run apt-get")
    };
    // A fresh machine's package lists may be empty or stale: update once if the first try fails.
    if !apt(&["install", "-y", "-q", "chromium"])?.success() {
        anyhow::ensure!(apt(&["update", "-q"])?.success(), "apt-get update failed");
        anyhow::ensure!(
            apt(&["install", "-y", "-q", "chromium"])?.success(),
            "apt-get install -y chromium failed; the dashboard's browser test needs {CHROMIUM}"
        );
    }
    anyhow::ensure!(
        Path::new(CHROMIUM).exists(),
        "apt-get installed chromium but {CHROMIUM} is not there"
    );
    Ok(())
}

/// The playwright-core version `e2e/dashboard/package.json` pins (the test reads the same file).
fn pinned_playwright_core() -> Result<String> {
    let manifest = crate::repo_root().join("e2e/dashboard/package.json");
    let text = std::fs::read_to_string(&manifest)
        .with_context(|| format!("read {}", manifest.display()))?;
    let package: serde_json::Value = serde_json::from_str(&text)?;
    package["dependencies"]["playwright-core"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("{} pins no playwright-core", manifest.display()))
}

#[cfg(test)]
mod tests {
    use super::profile_args;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|arg| (*arg).to_owned()).collect()
    }

    #[test]
    fn playwright_core_is_pinned_to_an_exact_version() {
        let version = super::pinned_playwright_core().unwrap();
        assert!(
            version.split('.').count() == 3 && version.split('.').all(|p| p.parse::<u32>().is_ok()),
            "e2e/dashboard/package.json must pin an exact version, not {version:?}"
        );
    }

    #[test]
    fn only_the_profile_flags_reach_the_binaries_build() {
        assert_eq!(
            profile_args(&strings(&["-p", "e2e", "--release", "--test", "faults"])),
            strings(&["--release"])
        );
        assert_eq!(
            profile_args(&strings(&["--profile", "ci", "-p", "kas"])),
            strings(&["--profile", "ci"])
        );
        assert!(profile_args(&strings(&["-p", "e2e"])).is_empty());
    }
}
