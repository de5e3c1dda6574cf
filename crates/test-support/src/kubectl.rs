//! Real `kubectl` and `helm` (the test environment's own builds) as child processes: one-shot runs with
//! stdin, and long-running ones (`get -w`, `logs -f`, `port-forward`) whose output lines a test waits for.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

use crate::env::test_env;

/// Why a kubectl run failed.
#[derive(Debug, thiserror::Error)]
pub enum KubectlError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} {args} exited with {status}: {stderr}")]
    Failed {
        program: String,
        args: String,
        status: std::process::ExitStatus,
        stdout: String,
        stderr: String,
    },
    #[error("{what}: nothing matching within {within:?}; output so far: {seen:?}")]
    Timeout {
        what: String,
        within: Duration,
        seen: Vec<String>,
    },
    #[error("{what}: the output ended before a matching line; output: {seen:?}")]
    Ended { what: String, seen: Vec<String> },
    #[error("I/O with the child process: {0}")]
    Io(#[from] std::io::Error),
}

impl KubectlError {
    /// What the process printed on stderr, for tests that assert on the refusal.
    pub fn stderr(&self) -> &str {
        match self {
            KubectlError::Failed { stderr, .. } => stderr,
            _ => "",
        }
    }
}

/// The output of a finished run.
#[derive(Debug)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
}

/// `kubectl` or `helm` with one kubeconfig.
#[derive(Debug, Clone)]
pub struct Tool {
    pub program: PathBuf,
    pub kubeconfig: PathBuf,
    /// Extra leading arguments on every run (e.g. `--context`, `--request-timeout`).
    pub leading: Vec<String>,
}

impl Tool {
    /// The environment's kubectl with `kubeconfig`.
    pub fn kubectl(kubeconfig: &Path) -> Self {
        Self {
            program: test_env().tools.kubectl.clone(),
            kubeconfig: kubeconfig.to_owned(),
            leading: Vec::new(),
        }
    }

    /// The environment's helm with `kubeconfig`.
    pub fn helm(kubeconfig: &Path) -> Self {
        Self {
            program: test_env().tools.helm.clone(),
            kubeconfig: kubeconfig.to_owned(),
            leading: Vec::new(),
        }
    }

    /// kubectl with the cluster-admin kubeconfig, straight to the apiserver.
    pub fn admin_kubectl() -> Self {
        Self::kubectl(&test_env().kubernetes.kubeconfig)
    }

    /// The same tool with `args` before every command's own.
    pub fn with_args(mut self, args: &[&str]) -> Self {
        self.leading.extend(args.iter().map(|a| a.to_string()));
        self
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.program);
        command
            .env("KUBECONFIG", &self.kubeconfig)
            // helm keeps caches and repositories under HOME; a test's own are in a temporary place.
            .env(
                "HELM_CACHE_HOME",
                std::env::temp_dir().join("gitops-test-helm-cache"),
            )
            .args(&self.leading)
            .args(args)
            .kill_on_drop(true);
        command
    }

    fn program_name(&self) -> String {
        self.program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Runs to completion, feeding `stdin`; fails unless it exits 0.
    pub async fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<Output, KubectlError> {
        let mut command = self.command(args);
        command
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|source| KubectlError::Spawn {
            program: self.program.display().to_string(),
            source,
        })?;
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("piped stdin");
            let input = input.to_vec();
            // Written concurrently with reading the output, so a big input cannot deadlock on full pipes.
            tokio::spawn(async move {
                let _ = pipe.write_all(&input).await;
                let _ = pipe.shutdown().await;
            });
        }
        let output = child.wait_with_output().await?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        if !output.status.success() {
            return Err(KubectlError::Failed {
                program: self.program_name(),
                args: self
                    .leading
                    .iter()
                    .map(String::as_str)
                    .chain(args.iter().copied())
                    .collect::<Vec<_>>()
                    .join(" "),
                status: output.status,
                stdout,
                stderr,
            });
        }
        Ok(Output { stdout, stderr })
    }

    /// Starts a long-running command whose stdout lines the test reads with [`Streaming::wait_for_line`].
    pub fn stream(&self, args: &[&str]) -> Result<Streaming, KubectlError> {
        let mut command = self.command(args);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|source| KubectlError::Spawn {
            program: self.program.display().to_string(),
            source,
        })?;
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let stderr = child.stderr.take().expect("piped stderr");
        let stderr_text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = stderr_text.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut text = sink.lock().expect("stderr lock");
                text.push_str(&line);
                text.push('\n');
            }
        });
        Ok(Streaming {
            child,
            lines: stdout.lines(),
            seen: Vec::new(),
            stderr: stderr_text,
        })
    }
}

/// A running command and the stdout lines read so far.
pub struct Streaming {
    pub child: Child,
    lines: tokio::io::Lines<BufReader<ChildStdout>>,
    pub seen: Vec<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Streaming {
    /// Reads lines until one satisfies `matches`; returns it.
    pub async fn wait_for_line(
        &mut self,
        what: &str,
        within: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> Result<String, KubectlError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.next_line()).await {
                Err(_) => {
                    return Err(KubectlError::Timeout {
                        what: format!("{what} (stderr: {})", self.stderr()),
                        within,
                        seen: self.seen.clone(),
                    });
                }
                Ok(Ok(Some(line))) => {
                    self.seen.push(line.clone());
                    if matches(&line) {
                        return Ok(line);
                    }
                }
                Ok(Ok(None)) | Ok(Err(_)) => {
                    return Err(KubectlError::Ended {
                        what: format!("{what} (stderr: {})", self.stderr()),
                        seen: self.seen.clone(),
                    });
                }
            }
        }
    }

    /// Waits for the process to exit on its own; its status, or a timeout error.
    pub async fn wait_exit(
        &mut self,
        within: Duration,
    ) -> Result<std::process::ExitStatus, KubectlError> {
        // Drain stdout so the child cannot block on a full pipe while exiting.
        let drain = async {
            while let Ok(Some(line)) = self.lines.next_line().await {
                self.seen.push(line);
            }
        };
        match tokio::time::timeout(within, drain).await {
            Ok(()) => {}
            Err(_) => {
                return Err(KubectlError::Timeout {
                    what: "the process to end its output".into(),
                    within,
                    seen: self.seen.clone(),
                });
            }
        }
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => Err(KubectlError::Timeout {
                what: "the process to exit".into(),
                within,
                seen: self.seen.clone(),
            }),
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr lock").clone()
    }
}

/// Starts `kubectl port-forward <target> :<pod_port>` and waits for it to listen; returns the process and the
/// local port it chose.
pub async fn port_forward(
    kubectl: &Tool,
    namespace: &str,
    target: &str,
    pod_port: u16,
) -> Result<(Streaming, u16), KubectlError> {
    let mut process = kubectl.stream(&[
        "--namespace",
        namespace,
        "port-forward",
        "--address=127.0.0.1",
        target,
        &format!(":{pod_port}"),
    ])?;
    // "Forwarding from 127.0.0.1:41234 -> 8080"
    let line = process
        .wait_for_line("port-forward listening", Duration::from_secs(30), |l| {
            l.starts_with("Forwarding from 127.0.0.1:")
        })
        .await?;
    let port = line
        .trim_start_matches("Forwarding from 127.0.0.1:")
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| KubectlError::Ended {
            what: format!("a port in {line:?}"),
            seen: vec![line.clone()],
        })?;
    Ok((process, port))
}
