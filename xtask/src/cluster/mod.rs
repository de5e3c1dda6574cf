//! `cargo xtask cluster up | down | status`: the test environment (a Kubernetes cluster and Gitea) that
//! integration tests reach through the state file named by `GITOPS_TEST_ENV`.
//!
//! A run directory holds everything of one environment: certificates, etcd and Gitea data, logs,
//! `processes.json` (what to stop) and `state.json` (what tests read).

pub mod docker;
mod gitea;
mod local;
mod pki;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::process::{self, Started};
use crate::state::{STATE_ENV_VAR, TestEnvState, ToolPaths};
use crate::tools::{self, ALERTMANAGER, HELM, KUBERNETES, PROMTOOL};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// Docker when an engine is reachable, local otherwise.
    Auto,
    /// Processes built from Go modules (no Docker needed).
    Local,
    /// kind and a Gitea container.
    Docker,
}

impl BackendChoice {
    pub fn resolve(self) -> BackendChoice {
        match self {
            BackendChoice::Auto if docker::engine_reachable() => BackendChoice::Docker,
            BackendChoice::Auto => BackendChoice::Local,
            other => other,
        }
    }
}

/// The default run directory of `cluster up`.
pub fn default_dir() -> PathBuf {
    crate::target_dir().join("test-env")
}

pub fn state_file(dir: &Path) -> PathBuf {
    dir.join("state.json")
}

/// The processes a local `up` started, so `down` can stop them from another xtask process.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    processes: Vec<Started>,
}

fn record_file(dir: &Path) -> PathBuf {
    dir.join("processes.json")
}

fn read_record(dir: &Path) -> Result<Record> {
    match std::fs::read_to_string(record_file(dir)) {
        Ok(text) => Ok(serde_json::from_str(&text)?),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Record::default()),
        Err(err) => Err(err.into()),
    }
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)?)?;
    Ok(())
}

/// Builds what is missing and starts the local backend's cluster and Gitea in `dir`. On failure everything
/// started so far is stopped again.
pub fn up_local(dir: &Path) -> Result<TestEnvState> {
    if read_record(dir)?
        .processes
        .iter()
        .any(|p| process::is_alive(p.pid))
    {
        bail!(
            "a test environment is already running in {}; `cargo xtask cluster down` first",
            dir.display()
        );
    }
    tools::ensure_local_backend()?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    let mut started = Vec::new();
    let result = start_local(&dir, &mut started);
    // Recorded whatever happened, so that `down` finds anything left running.
    write_json(&record_file(&dir), &Record { processes: started })?;
    match result {
        Ok(state) => {
            write_json(&state_file(&dir), &state)?;
            Ok(state)
        }
        Err(err) => {
            down(&dir)?;
            Err(err)
        }
    }
}

fn start_local(dir: &Path, started: &mut Vec<Started>) -> Result<TestEnvState> {
    let kubernetes = local::start(dir, started)?;
    let gitea = gitea::start(dir, started)?;
    Ok(TestEnvState {
        backend: "local".to_owned(),
        kubernetes,
        gitea,
        tools: ToolPaths {
            kubectl: KUBERNETES.bin("kubectl"),
            helm: HELM.bin("helm"),
            promtool: PROMTOOL.bin("promtool"),
            alertmanager: ALERTMANAGER.bin("alertmanager"),
        },
    })
}

/// Stops what a local `up` in `dir` started, newest first. Leaves the logs.
pub fn down(dir: &Path) -> Result<()> {
    let record = read_record(dir)?;
    for process in record.processes.iter().rev() {
        process::stop(process, Duration::from_secs(10));
    }
    let _ = std::fs::remove_file(record_file(dir));
    let _ = std::fs::remove_file(state_file(dir));
    Ok(())
}

pub fn status(dir: &Path) -> Result<()> {
    tools::print_status();
    let record = read_record(dir)?;
    if record.processes.is_empty() {
        eprintln!("no test environment recorded in {}", dir.display());
        return Ok(());
    }
    for process in &record.processes {
        let alive = if process::is_alive(process.pid) {
            "running"
        } else {
            "EXITED"
        };
        eprintln!(
            "  {:<24} pid {:<8} {alive:<8} log {}",
            process.name, process.pid, process.log
        );
    }
    if let Ok(text) = std::fs::read_to_string(state_file(dir)) {
        eprintln!(
            "state ({STATE_ENV_VAR}={}):\n{text}",
            state_file(dir).display()
        );
    }
    Ok(())
}

/// `cargo xtask cluster up`.
pub fn up_command(backend: BackendChoice, dir: &Path) -> Result<()> {
    match backend.resolve() {
        BackendChoice::Docker => up_docker_foreground(dir),
        _ => {
            let started = std::time::Instant::now();
            process::detach_started_processes();
            let state = up_local(dir)?;
            eprintln!("test environment up in {:.1?}", started.elapsed());
            eprintln!(
                "  kubernetes {} at {}",
                state.kubernetes.version, state.kubernetes.server
            );
            eprintln!(
                "  gitea {} at {} (admin {})",
                state.gitea.version, state.gitea.url, state.gitea.admin_user
            );
            println!(
                "export {STATE_ENV_VAR}={}",
                state_file(&dir.canonicalize()?).display()
            );
            println!(
                "export KUBECONFIG={}",
                state.kubernetes.kubeconfig.display()
            );
            Ok(())
        }
    }
}

fn up_docker_foreground(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let (env, state) = start_docker(&dir).await?;
        println!("export {STATE_ENV_VAR}={}", state_file(&dir).display());
        eprintln!("Docker backend up; it lives as long as this process: Ctrl-C tears it down");
        let _ = tokio::signal::ctrl_c().await;
        let _ = state;
        env.stop().await;
        Ok(())
    })
}

/// Starts the Docker backend and writes its state file.
pub async fn start_docker(dir: &Path) -> Result<(docker::DockerEnv, TestEnvState)> {
    // Tests get helm and kubectl from the tools cache with either backend; building the Kubernetes tools
    // for kubectl alone would cost minutes, so a cached one is used when there, else the one on PATH.
    HELM.ensure()?;
    PROMTOOL.ensure()?;
    ALERTMANAGER.ensure()?;
    let (env, kubernetes, gitea) = docker::start(dir).await?;
    let kubectl = if KUBERNETES.is_built() {
        KUBERNETES.bin("kubectl")
    } else {
        PathBuf::from("kubectl")
    };
    let state = TestEnvState {
        backend: "docker".to_owned(),
        kubernetes,
        gitea,
        tools: ToolPaths {
            kubectl,
            helm: HELM.bin("helm"),
            promtool: PROMTOOL.bin("promtool"),
            alertmanager: ALERTMANAGER.bin("alertmanager"),
        },
    };
    write_json(&state_file(dir), &state)?;
    Ok((env, state))
}
