//! The quickstart's world (`cargo xtask up` runs this after starting the cluster and Gitea): the
//! `demo/gitops` repository with its webhook, kas and agentk, left running in sessions of their own. Writes
//! `kas.pid`, `agentk.pid`, `logs/` and `summary.txt` into the state directory and prints the summary.
//!
//! Usage: `quickstart <state-dir>`, with `GITOPS_TEST_ENV` naming the environment's state file.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context;
use e2e::{
    process::sibling_binary,
    world::{
        self, AGENT, CONFIG_PATH, CONFIGMAP, CONFIGMAP_PATH, DEPLOYMENT, DEPLOYMENT_PATH,
        GiteaAdmin, Kas, NAMESPACE, OWNER, PROJECT, REPO, WorkTree,
    },
};
use test_support::env::TestEnvState;

/// Prints one line of progress with the time since `cargo xtask up` started (it passes its elapsed time in
/// `QUICKSTART_ELAPSED_MS`, so the lines continue its own).
struct Progress {
    started: Instant,
    before: Duration,
}

impl Progress {
    fn new() -> Self {
        let before = std::env::var("QUICKSTART_ELAPSED_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .map_or(Duration::ZERO, Duration::from_millis);
        Self {
            started: Instant::now(),
            before,
        }
    }

    fn say(&self, what: &str) {
        let at = self.before + self.started.elapsed();
        eprintln!("[{:>5.1}s] {what}", at.as_secs_f64());
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut args = std::env::args_os().skip(1);
    let dir: PathBuf = args
        .next()
        .context("usage: quickstart <state-dir> [<the command that ends it>]")?
        .into();
    let down = args.next().map_or_else(
        || "cargo xtask down".to_owned(),
        |a| a.to_string_lossy().into_owned(),
    );
    let env = test_support::env::load()?;
    let progress = Progress::new();
    let summary = build(&env, &dir, &down, &progress).await?;
    std::fs::write(dir.join("summary.txt"), &summary)?;
    println!("{summary}");
    Ok(())
}

async fn build(
    env: &TestEnvState,
    dir: &Path,
    down: &str,
    progress: &Progress,
) -> anyhow::Result<String> {
    let gitea = GiteaAdmin::new(env);
    progress.say(&format!(
        "Gitea: repository {PROJECT} with the seed's layout"
    ));
    gitea.create_repository(OWNER, REPO).await?;
    let tree = WorkTree::init(&dir.join("seed-clone"), &gitea.clone_url(PROJECT))?;
    let first = tree.commit_and_push(
        &[
            ("README.md", Some("# GitOps demo\n")),
            (CONFIG_PATH, Some(&world::config_yaml(PROJECT))),
            (DEPLOYMENT_PATH, Some(DEPLOYMENT)),
            (CONFIGMAP_PATH, Some(CONFIGMAP)),
        ],
        "the seed's repository layout",
    )?;

    progress.say("kas: API, agent listener, Kubernetes API proxy on TLS");
    let kas = Kas::start(env, dir, "20s", true).await?;
    gitea
        .add_push_webhook(PROJECT, &kas.gitea_webhook_url(), &kas.webhook_secret)
        .await?;

    progress.say("kas: register agent gitops and create its token");
    let agent = kas.admin.create_agent(PROJECT, AGENT).await?;
    let agent_id = agent["clusterAgent"]["id"]
        .as_str()
        .context("no agent id")?
        .to_owned();
    let token = kas
        .admin
        .create_token(&agent_id, "quickstart", "cargo xtask up")
        .await?["secret"]
        .as_str()
        .context("no token secret")?
        .to_owned();

    progress.say("agentk generate | kubectl apply -f -");
    let manifests = world::generate_install(&token, &kas.endpoints.agent_url())?;
    world::kubectl(env, &["apply", "-f", "-"], Some(&manifests))?;

    progress.say("agentk: started as the installed pod, under its ServiceAccount's token");
    let installed = world::installed_agent(env, dir).await?;
    let mut agentk = world::start_agentk(&installed, dir, true)?;
    world::wait_synced(
        &kas,
        &mut agentk,
        world::SyncOf {
            agent_id: &agent_id,
            project: PROJECT,
            commit: &first,
        },
        Duration::from_secs(90),
    )
    .await?;
    progress.say("agentk applied deployment/ (nginx-deployment, demo-settings)");

    let proxy_kubeconfig = dir.join("kubeconfig-kas-proxy");
    kas.proxy_kubeconfig(&agent_id, PROJECT, &proxy_kubeconfig)?;
    let mut through_proxy = std::process::Command::new(&env.tools.kubectl);
    through_proxy
        .args(["--kubeconfig"])
        .arg(&proxy_kubeconfig)
        .args(["-n", NAMESPACE, "get", "deployment", "nginx-deployment"]);
    world::run(through_proxy).context("kubectl through kas's Kubernetes API proxy")?;
    progress.say("kubectl through kas's proxy works");

    Summary {
        env,
        dir,
        kas: &kas,
        gitea: &gitea,
        agent_id: &agent_id,
        installed: &installed,
        down,
        took: progress.started.elapsed(),
    }
    .render()
    .await
}

/// What a person needs to use the world.
struct Summary<'a> {
    env: &'a TestEnvState,
    dir: &'a Path,
    kas: &'a Kas,
    gitea: &'a GiteaAdmin,
    agent_id: &'a str,
    installed: &'a world::InstalledAgent,
    /// The command that ends it.
    down: &'a str,
    took: Duration,
}

impl Summary<'_> {
    async fn render(&self) -> anyhow::Result<String> {
        let Self {
            env,
            dir,
            kas,
            gitea,
            agent_id,
            installed,
            down,
            took,
        } = self;
        let api = kas.endpoints.api_url();
        ensure_served(&format!("{api}/dashboard")).await?;
        let kas_health = kas.endpoints.observability_url();
        ensure_served(&format!("{kas_health}/readyz")).await?;
        let kubectl = env.tools.kubectl.display();
        let kas_cli = sibling_binary("kas")?;
        let kas_cli = kas_cli.display();
        let d = dir.display();
        let observability = installed
            .observability
            .as_ref()
            .map(|url| format!("agentk health     {url}/readyz   {url}/metrics\n"))
            .unwrap_or_default();
        Ok(format!(
        "\
The seed's world is up (agent {agent_id}, project {PROJECT}; set up in {took:.1?}).

Dashboard         {api}/dashboard   (log in with the viewer token to look, the admin token to act)
GraphQL           {api}/dashboard#/query   (POST {api}/api/graphql with  Authorization: Bearer <token>)
Admin token       {admin_token}
                  (also in {admin_token_file})
Viewer token      {viewer_token}   (read-only)
Gitea             {gitea_url}   login {gitea_user} / {gitea_password}
Clone             git clone {clone_url}

Cluster           export KUBECONFIG={cluster_kubeconfig}
                  {kubectl} -n {NAMESPACE} get deployments,pods,configmaps
Through kas       {kubectl} --kubeconfig {d}/kubeconfig-kas-proxy -n {NAMESPACE} get pods
                  (kubectl -> kas's proxy on TLS -> agentk's connection -> the cluster), made by
                  `kas ci-token create --project {PROJECT}` and `kas kubeconfig --agent {agent_id} --token …`
kas CLI           KAS_API_URL={api} KAS_ADMIN_TOKEN_FILE={admin_token_file} {kas_cli} get agents
agentk log        tail -f {d}/logs/agentk.log
{observability}kas log           tail -f {d}/logs/kas.log
kas health        {kas_health}/readyz   {kas_health}/metrics

Try it: clone, set `replicas: 2` in {DEPLOYMENT_PATH}, commit and `git push`. Gitea's webhook tells kas at
once; agentk logs `Applying resource Deployment/nginx-deployment ...` and `Cluster successfully synced`, and
`kubectl get pods` shows two nginx pods.

agentk runs as a process beside the cluster, not inside its pod: the cluster's nodes are kwok's, which
fake pods' containers (pod {pod} exists, nothing runs in it). The process has what
the pod would have: the Deployment's arguments, the token from Secret gitlab-agent-token, and a token of
ServiceAccount gitlab-agent (7 days; `up` after `down` renews everything).

State, pid files and logs: {d}
Stop everything:          {down}
",
        admin_token = kas.admin_token()?,
        viewer_token = kas.viewer_token()?,
        admin_token_file = kas.admin_token_file.display(),
        gitea_url = gitea.url,
        gitea_user = gitea.user,
        gitea_password = gitea.password,
        clone_url = gitea.clone_url(PROJECT),
        cluster_kubeconfig = env.kubernetes.kubeconfig.display(),
        pod = installed.pod_name,
    ))
    }
}

/// The summary prints only URLs that answer.
async fn ensure_served(url: &str) -> anyhow::Result<()> {
    let status = reqwest::get(url).await?.status();
    anyhow::ensure!(status.is_success(), "{url} answered {status}");
    Ok(())
}
