//! kas and agentk as real processes, for the seed scenario and the benchmarks.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use kas::cli::AdminClient;
use test_support::git_http::GitHttpServer;

/// A child process killed when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Killed {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A binary built into the same target directory as the running one (a test runs from `deps/`, one level
/// below the binaries).
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("binary directory")?;
    if dir.file_name().is_some_and(|d| d == "deps") {
        dir = dir.parent().context("target directory")?;
    }
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build it with `cargo build -p kas -p agentk` (same profile)",
            path.display()
        );
    }
    Ok(path)
}

/// Spawns `command` with its stderr (where the binaries log) in `log` and its stdout discarded.
pub fn spawn_logged(mut command: Command, log: &Path) -> anyhow::Result<Killed> {
    let file = std::fs::File::create(log)?;
    command.stderr(file).stdout(Stdio::null());
    Ok(Killed(
        command
            .spawn()
            .with_context(|| format!("starting {command:?}"))?,
    ))
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    proc_status_kib(pid, "VmRSS:")
}

/// The most resident memory a process has had so far (its high-water mark), in KiB.
pub fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    proc_status_kib(pid, "VmHWM:")
}

fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("{field} value"))?
        .parse()?)
}

/// The Git server kas reads from.
pub struct GitSource {
    pub base_url: String,
    pub username: String,
    pub password: String,
    /// kas's `git.poll_period`, e.g. `2s`.
    pub poll_period: String,
    /// Enables kas's push webhooks with this secret.
    pub webhook_secret: Option<String>,
}

/// A kas process serving `git`'s repositories, with its admin client.
pub struct KasProcess {
    pub process: Killed,
    pub admin: AdminClient,
    pub agent_port: u16,
    pub api_port: u16,
    pub admin_token: String,
    /// Its `kas.yaml`, to restart it as it was.
    config: PathBuf,
}

impl KasProcess {
    /// Starts kas with its data in `dir`, reading `git`'s repositories (polled every 2 s); `quiet`
    /// discards its logs.
    pub async fn start(
        git: &GitHttpServer,
        dir: &Path,
        log_level: &str,
        quiet: bool,
    ) -> anyhow::Result<Self> {
        let (username, password) = git.credentials();
        let source = GitSource {
            base_url: git.base_url(),
            username: username.to_owned(),
            password: password.to_owned(),
            poll_period: "2s".into(),
            webhook_secret: None,
        };
        let logs = if quiet {
            Stdio::null()
        } else {
            Stdio::inherit()
        };
        Self::start_with(&source, dir, log_level, logs).await
    }

    /// Starts kas against any Git server (e.g. the test environment's Gitea), its logs going to `logs`.
    pub async fn start_with(
        git: &GitSource,
        dir: &Path,
        log_level: &str,
        logs: Stdio,
    ) -> anyhow::Result<Self> {
        Self::start_with_extra(git, dir, log_level, logs, "").await
    }

    /// [`Self::start_with`], with `extra_yaml` (whole top-level sections, e.g. `alerts:`) added to kas.yaml.
    pub async fn start_with_extra(
        git: &GitSource,
        dir: &Path,
        log_level: &str,
        logs: Stdio,
        extra_yaml: &str,
    ) -> anyhow::Result<Self> {
        let admin_token = "local-admin-token".to_owned();
        std::fs::write(dir.join("admin-token"), &admin_token)?;
        std::fs::write(dir.join("git-password"), &git.password)?;
        let (agent_port, api_port) = (free_port()?, free_port()?);
        let webhooks = match &git.webhook_secret {
            Some(secret) => {
                std::fs::write(dir.join("webhook-secret"), secret)?;
                format!(
                    "webhooks:\n  secret_file: {}/webhook-secret\n",
                    dir.display()
                )
            }
            None => String::new(),
        };
        let config = dir.join("kas.yaml");
        std::fs::write(
            &config,
            format!(
                "listen:\n  agent: 127.0.0.1:{agent_port}\n  api: 127.0.0.1:{api_port}\ndata_dir: {0}/data\nadmin_token_file: {0}/admin-token\ngit:\n  base_url: {1}\n  username: {2}\n  password_file: {0}/git-password\n  poll_period: {3}\nlogging:\n  level: {log_level}\n{webhooks}{extra_yaml}",
                dir.display(),
                git.base_url,
                git.username,
                git.poll_period,
            ),
        )?;
        let process = spawn_kas(&config, logs)?;
        let admin = AdminClient::new(&format!("http://127.0.0.1:{api_port}"), admin_token.clone());
        wait_for_api(&admin).await?;
        Ok(Self {
            process,
            admin,
            agent_port,
            api_port,
            admin_token,
            config,
        })
    }

    /// SIGKILL: no shutdown of any kind.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.process.0.kill()?;
        self.process.0.wait()?;
        Ok(())
    }

    /// Starts kas again with the same configuration, ports and data (after [`Self::kill`]); its logs are
    /// discarded.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.process = spawn_kas(&self.config, Stdio::null())?;
        wait_for_api(&self.admin).await
    }

    /// Starts an agentk process connecting with `token` over `scheme`.
    pub fn agentk(&self, scheme: &str, token: &str, quiet: bool) -> anyhow::Result<Killed> {
        self.agentk_applying(scheme, token, quiet, None)
    }

    /// The agentk command line connecting with `token` over `scheme`, to add to and spawn.
    pub fn agentk_command(&self, scheme: &str, token: &str) -> anyhow::Result<Command> {
        let mut command = Command::new(sibling_binary("agentk")?);
        command
            .arg(format!(
                "--kas-address={scheme}://127.0.0.1:{}",
                self.agent_port
            ))
            .env("AGENTK_TOKEN", token);
        Ok(command)
    }

    /// Like [`Self::agentk`]; with a kubeconfig it applies manifests to that cluster as if it ran in
    /// `gitlab-kubernetes-agent` (its inventories live there).
    pub fn agentk_applying(
        &self,
        scheme: &str,
        token: &str,
        quiet: bool,
        kubeconfig: Option<&Path>,
    ) -> anyhow::Result<Killed> {
        let mut command = self.agentk_command(scheme, token)?;
        match kubeconfig {
            Some(kubeconfig) => {
                command
                    .env("KUBECONFIG", kubeconfig)
                    .env("POD_NAMESPACE", "gitlab-kubernetes-agent");
            }
            // No cluster: agentk receives and reports, but does not apply.
            None => {
                command.arg("--no-apply").env_remove("KUBECONFIG");
            }
        }
        if quiet {
            command.stderr(Stdio::null());
        }
        Ok(Killed(command.spawn().context("starting agentk")?))
    }

    /// How many agents GraphQL shows as connected.
    pub async fn connected(&self) -> anyhow::Result<usize> {
        let agents = self.admin.list_agents(None).await?;
        Ok(agents
            .as_array()
            .map_or(0, |a| a.iter().filter(|a| a["connected"] == true).count()))
    }

    /// Waits until at least `n` agents are connected; returns how long it took.
    pub async fn wait_connected(&self, n: usize, within: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            let connected = self.connected().await?;
            if connected >= n {
                return Ok(started.elapsed());
            }
            if started.elapsed() > within {
                bail!("only {connected} of {n} agents connected within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

fn spawn_kas(config: &Path, logs: Stdio) -> anyhow::Result<Killed> {
    let mut command = Command::new(sibling_binary("kas")?);
    command.args(["serve", "--config"]).arg(config).stderr(logs);
    Ok(Killed(command.spawn().context("starting kas")?))
}

/// Waits until kas's admin API answers.
async fn wait_for_api(admin: &AdminClient) -> anyhow::Result<()> {
    let started = Instant::now();
    while admin.list_agents(None).await.is_err() {
        if started.elapsed() > Duration::from_secs(20) {
            bail!("kas did not start within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Runs `command` against the test cluster (its kubeconfig in `KUBECONFIG`), feeding `stdin`; its stdout, or an
/// error with everything it printed.
pub fn run_against_cluster(
    mut command: Command,
    kubeconfig: &Path,
    stdin: Option<&str>,
) -> anyhow::Result<String> {
    use std::io::Write;
    command
        .env("KUBECONFIG", kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(input.as_bytes())?;
    }
    let output = child.wait_with_output()?;
    anyhow::ensure!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}
