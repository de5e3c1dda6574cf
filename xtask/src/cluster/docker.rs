//! The Docker backend, used when a Docker engine is reachable: a kind cluster and a Gitea container
//! (through testcontainers) in place of the processes the local backend builds. Everything the tests see (the
//! state file, kubeconfig, Gitea URL and admin user) is the same; only provisioning differs.
//!
//! The Gitea container lives as long as the returned [`DockerEnv`], so this backend runs inside one xtask
//! process: `cargo xtask test`, or `cargo xtask cluster up --backend docker`, which waits for Ctrl-C.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use testcontainers::core::{CmdWaitFor, ExecCommand, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

use super::gitea::{ADMIN_USER, random_token};
use crate::state::{ClusterState, GiteaState};
use crate::tools::{GITEA_VERSION, KIND, KUBERNETES_VERSION};

/// kind's node image for the Kubernetes version the local backend builds.
const KIND_NODE_IMAGE: &str = "kindest/node:v1.34.0";

pub fn engine_reachable() -> bool {
    Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// What the Docker backend started; [`DockerEnv::stop`] removes it.
pub struct DockerEnv {
    pub kind_cluster: String,
    gitea: Option<ContainerAsync<GenericImage>>,
}

pub async fn start(dir: &Path) -> Result<(DockerEnv, ClusterState, GiteaState)> {
    KIND.ensure()?;
    let mut env = DockerEnv {
        kind_cluster: format!("gitops-test-{}", std::process::id()),
        gitea: None,
    };
    // On any failure, remove what was made so far: kind may leave a half-made cluster behind.
    let cluster = match start_kind(dir, &env.kind_cluster) {
        Ok(cluster) => cluster,
        Err(err) => {
            env.stop().await;
            return Err(err);
        }
    };
    match start_gitea().await {
        Ok((container, gitea)) => {
            env.gitea = Some(container);
            Ok((env, cluster, gitea))
        }
        Err(err) => {
            env.stop().await;
            Err(err)
        }
    }
}

fn start_kind(dir: &Path, name: &str) -> Result<ClusterState> {
    let kubeconfig = dir.join("kubeconfig");
    run(Command::new(KIND.bin("kind")).args([
        "create",
        "cluster",
        "--name",
        name,
        "--image",
        KIND_NODE_IMAGE,
        "--wait",
        "180s",
        "--kubeconfig",
        &kubeconfig.display().to_string(),
    ]))?;
    // kind writes the server URL into the kubeconfig; read it back rather than need a kubectl here.
    let server = std::fs::read_to_string(&kubeconfig)?
        .lines()
        .find_map(|line| {
            line.trim()
                .strip_prefix("server:")
                .map(|url| url.trim().to_owned())
        })
        .context("kind's kubeconfig names no server")?;
    Ok(ClusterState {
        kubeconfig,
        server,
        version: KUBERNETES_VERSION.to_owned(),
        nodes: vec![format!("{name}-control-plane")],
    })
}

/// The container is removed when the returned handle is dropped (testcontainers does that).
async fn start_gitea() -> Result<(ContainerAsync<GenericImage>, GiteaState)> {
    // Host networking: webhook receivers in the tests listen on the host's 127.0.0.1, which a container on a
    // bridge network cannot reach.
    let port = crate::process::free_port()?;
    let password = random_token();
    let tag = format!("{}-rootless", GITEA_VERSION.trim_start_matches('v'));
    let container = GenericImage::new("gitea/gitea", tag.as_str())
        .with_wait_for(WaitFor::seconds(2))
        .with_network("host")
        .with_env_var("GITEA__server__HTTP_ADDR", "127.0.0.1")
        .with_env_var("GITEA__server__HTTP_PORT", port.to_string())
        .with_env_var(
            "GITEA__server__ROOT_URL",
            format!("http://127.0.0.1:{port}/"),
        )
        .with_env_var("GITEA__server__DISABLE_SSH", "true")
        .with_env_var("GITEA__database__DB_TYPE", "sqlite3")
        .with_env_var("GITEA__security__INSTALL_LOCK", "true")
        .with_env_var("GITEA__webhook__ALLOWED_HOST_LIST", "loopback")
        // `[queue.webhook_sender] TYPE = channel`, as the local backend (see gitea.rs): `.` is `_0X2E_`.
        .with_env_var("GITEA__queue_0X2E_webhook_sender__TYPE", "channel")
        .with_env_var("GITEA__repository__DEFAULT_BRANCH", "main")
        .start()
        .await
        .context("start the Gitea container")?;
    if !wait_http_ok(port, Duration::from_secs(90)).await {
        bail!("the Gitea container did not answer /api/healthz on port {port}");
    }
    let create_admin = ExecCommand::new(
        std::iter::once("gitea".to_owned()).chain(super::gitea::admin_user_create_args(&password)),
    )
    // Waits for the command to finish and fails unless it exits 0.
    .with_cmd_ready_condition(CmdWaitFor::exit_code(0));
    container
        .exec(create_admin)
        .await
        .context("create the Gitea admin user in the container")?;
    let gitea = GiteaState {
        url: format!("http://127.0.0.1:{port}"),
        admin_user: ADMIN_USER.to_owned(),
        admin_password: password,
        version: GITEA_VERSION.to_owned(),
    };
    Ok((container, gitea))
}

impl DockerEnv {
    pub async fn stop(mut self) {
        if let Some(container) = self.gitea.take() {
            let _ = container.rm().await;
        }
        let _ = run(Command::new(KIND.bin("kind")).args([
            "delete",
            "cluster",
            "--name",
            &self.kind_cluster,
        ]));
    }
}

async fn wait_http_ok(port: u16, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if tokio::task::spawn_blocking(move || super::gitea::http_get_ok(port, "/api/healthz"))
            .await
            .unwrap_or(false)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    false
}

fn run(command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("run {:?}", command.get_program()))?;
    if !output.status.success() {
        bail!(
            "{:?} failed: {}",
            command.get_program(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
