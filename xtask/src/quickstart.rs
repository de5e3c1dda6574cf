//! `cargo xtask up` / `cargo xtask down`: the seed's world left running for a person to use — the local
//! cluster and Gitea (as `cluster up` starts them), then the `quickstart` program of the `e2e` crate, which
//! creates `demo/gitops` with its webhook and starts kas and agentk in sessions of their own.
//!
//! Everything lives in one state directory (default `~/.local/state/gitops-quickstart`, or `--dir`):
//! `cluster/` (the environment, its `processes.json` and logs), `kas.pid`, `agentk.pid`, `logs/`, `kas/`,
//! `agentk/` and `summary.txt`, which a second `up` prints again instead of starting anything.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::process::{self, Started};

/// The processes the quickstart program starts, newest last; `down` stops them newest first.
const WORLD_PROCESSES: &[&str] = &["kas", "agentk"];

/// `$XDG_STATE_HOME/gitops-quickstart`, else `~/.local/state/gitops-quickstart`.
pub fn default_dir() -> PathBuf {
    let state_home = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/state")))
        .unwrap_or_else(|| crate::target_dir().join("state"));
    state_home.join("gitops-quickstart")
}

fn cluster_dir(dir: &Path) -> PathBuf {
    dir.join("cluster")
}

/// A world process from its pid file, if that pid is still this program (not a reused pid).
fn recorded(dir: &Path, name: &str) -> Option<Started> {
    let pid: u32 = std::fs::read_to_string(dir.join(format!("{name}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let program = cmdline.split(|b| *b == 0).next()?;
    let is_it = Path::new(std::str::from_utf8(program).ok()?)
        .file_name()
        .is_some_and(|f| f == name);
    (is_it && process::is_alive(pid)).then(|| Started {
        name: name.to_owned(),
        pid,
        log: dir
            .join("logs")
            .join(format!("{name}.log"))
            .display()
            .to_string(),
    })
}

fn running(dir: &Path) -> Vec<Started> {
    WORLD_PROCESSES
        .iter()
        .filter_map(|name| recorded(dir, name))
        .collect()
}

fn step(started: Instant, what: &str) {
    eprintln!("[{:>5.1}s] {what}", started.elapsed().as_secs_f64());
}

pub fn up(dir: &Path) -> Result<ExitCode> {
    let started = Instant::now();
    if let Some(code) = already_up(dir) {
        return Ok(code);
    }
    step(
        started,
        "building kas, agentk and the quickstart program (the first build takes several minutes)",
    );
    if crate::scenarios::build(false, &["quickstart"])? != ExitCode::SUCCESS {
        return Ok(ExitCode::FAILURE);
    }
    let interrupted = on_ctrl_c();
    // Whatever a failed `up` left behind goes first.
    down_quietly(dir)?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    let result = start_world(&dir, started, &interrupted);
    if let Ok(true) = result {
        step(started, "`cargo xtask up` done");
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "\nThe quickstart did not come up; stopping what it started. Logs stay in {}/logs and {}/logs.",
        dir.display(),
        cluster_dir(&dir).display()
    );
    down_quietly(&dir)?;
    result.map(|_| ExitCode::FAILURE)
}

/// When kas and agentk of an earlier `up` still run: says so (and prints its summary again), or that only
/// one of them does; the exit code.
fn already_up(dir: &Path) -> Option<ExitCode> {
    let alive = running(dir);
    if alive.is_empty() {
        return None;
    }
    if alive.len() < WORLD_PROCESSES.len() {
        let missing: Vec<&str> = WORLD_PROCESSES
            .iter()
            .copied()
            .filter(|name| !alive.iter().any(|p| p.name == *name))
            .collect();
        eprintln!(
            "The quickstart in {} is only partly up: {} exited (its log: {}/logs/). \
             `cargo xtask down`, then `cargo xtask up` again.",
            dir.display(),
            missing.join(", "),
            dir.display()
        );
        return Some(ExitCode::FAILURE);
    }
    let names: Vec<String> = alive
        .iter()
        .map(|p| format!("{} (pid {})", p.name, p.pid))
        .collect();
    eprintln!(
        "The quickstart is already up in {}: {}. Its summary again:\n",
        dir.display(),
        names.join(", ")
    );
    match std::fs::read_to_string(dir.join("summary.txt")) {
        Ok(summary) => println!("{summary}"),
        Err(_) => eprintln!("(no summary.txt there: it is still starting, or its start failed)"),
    }
    Some(ExitCode::SUCCESS)
}

/// The processes `up` starts run in sessions of their own, so a Ctrl-C reaches only xtask and its
/// foreground children: caught here, it makes `up` stop what it started once the current step returns
/// (the cluster's start gives up within a minute) instead of leaving it unrecorded.
fn on_ctrl_c() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let set = flag.clone();
    std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                set.store(true, Ordering::SeqCst);
                eprintln!(
                    "\ninterrupted: stopping what `cargo xtask up` started once this step returns"
                );
            }
        });
    });
    flag
}

/// Starts the cluster and Gitea, then the quickstart program; `false` when interrupted or it failed.
fn start_world(dir: &Path, started: Instant, interrupted: &AtomicBool) -> Result<bool> {
    let missing: Vec<&str> = crate::tools::LOCAL_BACKEND
        .iter()
        .filter(|tool| !tool.is_built())
        .map(|tool| tool.name)
        .collect();
    if !missing.is_empty() {
        step(
            started,
            &format!(
                "building the cluster's tools from their Go modules first: {} (once; about 20 minutes on 2 cores)",
                missing.join(", ")
            ),
        );
    }
    step(
        started,
        "starting the cluster (etcd, kube-apiserver, controller-manager, scheduler, kwok) and Gitea",
    );
    process::detach_started_processes();
    let env = crate::cluster::up_local(&cluster_dir(dir))?;
    if interrupted.load(Ordering::SeqCst) {
        return Ok(false);
    }
    step(
        started,
        &format!(
            "cluster {} at {}, Gitea at {}",
            env.kubernetes.version, env.kubernetes.server, env.gitea.url
        ),
    );
    let down_command = if default_dir().canonicalize().ok().as_deref() == Some(dir) {
        "cargo xtask down".to_owned()
    } else {
        format!("cargo xtask down --dir {}", dir.display())
    };
    let mut program = Command::new(crate::target_dir().join("debug").join("quickstart"));
    program
        .arg(dir)
        .arg(&down_command)
        .env(
            "QUICKSTART_ELAPSED_MS",
            started.elapsed().as_millis().to_string(),
        )
        .env(
            crate::state::STATE_ENV_VAR,
            crate::cluster::state_file(&cluster_dir(dir)),
        )
        .env("KUBECONFIG", &env.kubernetes.kubeconfig);
    let status = program.status().context("run the quickstart program")?;
    Ok(status.success() && !interrupted.load(Ordering::SeqCst))
}

/// Stops kas and agentk by their pid files, then the cluster and Gitea; leaves the logs.
fn down_quietly(dir: &Path) -> Result<Vec<String>> {
    let mut stopped = Vec::new();
    for name in WORLD_PROCESSES.iter().rev() {
        if let Some(process) = recorded(dir, name) {
            process::stop(&process, Duration::from_secs(10));
            stopped.push(format!("{name} (pid {})", process.pid));
        }
        let _ = std::fs::remove_file(dir.join(format!("{name}.pid")));
    }
    let cluster = cluster_dir(dir);
    if cluster.join("processes.json").exists() {
        crate::cluster::down(&cluster)?;
        stopped.push("the cluster and Gitea".to_owned());
    }
    Ok(stopped)
}

pub fn down(dir: &Path) -> Result<()> {
    let stopped = down_quietly(dir)?;
    let _ = std::fs::remove_file(dir.join("summary.txt"));
    if stopped.is_empty() {
        eprintln!("nothing of the quickstart is running in {}", dir.display());
    } else {
        eprintln!(
            "stopped {}; logs stay in {}",
            stopped.join(", "),
            dir.display()
        );
    }
    Ok(())
}
