//! Faults at the worst moments, with kas and agentk as real processes against the real apiserver and a real
//! Git smart-HTTP server: `kill -9` of agentk and kas, and the apiserver answering 503, resetting connections or
//! stalling in the middle of a sync (through `test_support::fault_proxy`). Afterwards everything converges, and
//! the objects are counted — none lost (in Git, missing from the cluster), none orphaned (ours in the cluster,
//! unknown to the inventory, so never pruned), none deleted in between.

use std::{
    collections::BTreeSet,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use e2e::process::{KasProcess, Killed};
use gitops_engine::{InventoryRef, ObjectKey};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::ListParams;
use test_support::{
    cluster::{TestNamespace, install_crypto_provider},
    env::test_env,
    fault_proxy::{Fault, FaultProxy, UpstreamIdentity},
    git_http::GitHttpServer,
};

const CONFIG_PROJECT: &str = "group/config";
const MANIFESTS: &str = "group/manifests";
const INVENTORY_ANNOTATION: &str = "config.k8s.io/owning-inventory";

/// `count` ConfigMaps `cm-00000`… in files of 100 each, so a sync takes long enough to be interrupted.
fn manifests(count: usize, value: &str) -> Vec<(String, String)> {
    (0..count)
        .collect::<Vec<_>>()
        .chunks(100)
        .map(|chunk| {
            let docs: Vec<String> = chunk
                .iter()
                .map(|i| {
                    format!(
                        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{i:05}\ndata:\n  value: {value}\n"
                    )
                })
                .collect();
            (format!("cms-{:03}.yaml", chunk[0] / 100), docs.join("---\n"))
        })
        .collect()
}

/// Everything one test needs: a Git server with the configuration and manifests, kas as a process, the
/// registered agent, and the namespace agentk applies into and keeps its inventory in.
struct World {
    ns: TestNamespace,
    git: GitHttpServer,
    kas: KasProcess,
    agent_id: i64,
    secret: String,
    dir: tempfile::TempDir,
}

impl World {
    async fn start(prefix: &str, objects: usize) -> anyhow::Result<Self> {
        install_crypto_provider();
        let ns = TestNamespace::create(prefix).await?;
        let git = GitHttpServer::start().await?;
        git.create_repo(CONFIG_PROJECT, false)?;
        git.create_repo(MANIFESTS, false)?;
        let config = format!(
            "gitops:\n  manifest_projects:\n  - id: {MANIFESTS}\n    default_namespace: {}\n    paths:\n    - glob: '*.yaml'\n",
            ns.name
        );
        git.commit_files(
            CONFIG_PROJECT,
            &[(".gitlab/agents/gitops/config.yaml", Some(&config))],
            "config",
        )?;
        commit_set(&git, &manifests(objects, "one"), &[], "the set")?;
        let dir = tempfile::tempdir()?;
        let kas = KasProcess::start(&git, dir.path(), "info", true).await?;
        let (agent_gid, _, secret) = e2e::register_agent(&kas.admin, CONFIG_PROJECT).await?;
        let agent_id = agent_gid
            .rsplit('/')
            .next()
            .and_then(|id| id.parse().ok())
            .context("numeric agent id")?;
        Ok(Self {
            ns,
            git,
            kas,
            agent_id,
            secret,
            dir,
        })
    }

    /// An agentk process applying into the namespace, its log in the test's directory.
    fn agentk(&self, run: usize) -> anyhow::Result<Killed> {
        self.agentk_with(run, &test_env().kubernetes.kubeconfig)
    }

    /// [`Self::agentk`] reaching the apiserver through `kubeconfig`.
    fn agentk_with(&self, run: usize, kubeconfig: &std::path::Path) -> anyhow::Result<Killed> {
        let log = std::fs::File::create(self.dir.path().join(format!("agentk-{run}.log")))?;
        let mut command = self.kas.agentk_command("grpc", &self.secret)?;
        command
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAMESPACE", &self.ns.name)
            .stderr(Stdio::from(log));
        Ok(Killed(command.spawn().context("starting agentk")?))
    }

    fn inventory(&self) -> InventoryRef {
        InventoryRef {
            namespace: self.ns.name.clone(),
            name: agentk::apply::inventory_name(self.agent_id, MANIFESTS),
        }
    }

    /// The set's ConfigMaps in the cluster that name our inventory as their owner.
    async fn ours(&self) -> anyhow::Result<BTreeSet<String>> {
        let id = self.inventory().id();
        let list = self
            .ns
            .api::<ConfigMap>()
            .list(&ListParams::default())
            .await?;
        Ok(list
            .items
            .into_iter()
            .filter(|c| {
                c.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(INVENTORY_ANNOTATION))
                    == Some(&id)
            })
            .filter_map(|c| c.metadata.name)
            .collect())
    }

    /// Waits until ours and the inventory are exactly `expected`; then returns (lost, orphaned) = (0, 0).
    async fn converged(&self, expected: &BTreeSet<String>, within: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let ours = self.ours().await?;
            let recorded: BTreeSet<String> = self
                .inventory()
                .read(&self.ns.client)
                .await?
                .into_iter()
                .filter(|k: &ObjectKey| k.kind == "ConfigMap")
                .map(|k| k.name)
                .collect();
            let lost = expected.difference(&ours).count();
            let extra = ours.difference(expected).count();
            let orphaned = ours.difference(&recorded).count();
            if lost == 0 && extra == 0 && orphaned == 0 && recorded == *expected {
                return Ok(());
            }
            if started.elapsed() > within {
                bail!(
                    "not converged within {within:?}: {lost} lost, {extra} not pruned, {orphaned} orphaned, inventory {} of {}",
                    recorded.len(),
                    expected.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Polls our objects until `partial` says the moment has come; fails if the process got past it first.
    async fn wait_for_moment(
        &self,
        what: &str,
        partial: impl Fn(usize) -> bool,
        done: impl Fn(usize) -> bool,
    ) -> anyhow::Result<usize> {
        let started = Instant::now();
        loop {
            let count = self.ours().await?.len();
            if partial(count) {
                return Ok(count);
            }
            if done(count) {
                bail!(
                    "{what}: agentk finished ({count} objects) before it could be killed half-way"
                );
            }
            if started.elapsed() > Duration::from_secs(120) {
                bail!("{what}: never reached ({count} objects)");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn names(range: std::ops::Range<usize>) -> BTreeSet<String> {
    range.map(|i| format!("cm-{i:05}")).collect()
}

fn commit_set(
    git: &GitHttpServer,
    files: &[(String, String)],
    removed: &[String],
    message: &str,
) -> anyhow::Result<String> {
    let changes: Vec<(&str, Option<&str>)> = files
        .iter()
        .map(|(p, c)| (p.as_str(), Some(c.as_str())))
        .chain(removed.iter().map(|p| (p.as_str(), None)))
        .collect();
    git.commit_files(MANIFESTS, &changes, message)
}

/// P1: agentk killed while it creates 1,000 objects; the restarted agentk creates the rest, and every object
/// created before the kill is in the inventory (it is written, with the whole set, before the first apply).
#[tokio::test]
async fn agentk_killed_mid_apply_converges_with_nothing_lost_or_orphaned() -> anyhow::Result<()> {
    let world = World::start("kill-apply", 1000).await?;
    let agentk = world.agentk(1)?;
    let at = world
        .wait_for_moment("mid-apply", |n| (100..900).contains(&n), |n| n >= 1000)
        .await?;
    drop(agentk); // SIGKILL
    let after_kill = world.ours().await?.len();
    assert!(after_kill < 1000, "the kill came too late ({after_kill})");
    let _agentk = world.agentk(2)?;
    world
        .converged(&names(0..1000), Duration::from_secs(120))
        .await
        .with_context(|| format!("after a kill at {at} objects"))?;
    Ok(())
}

/// P2: agentk killed while it prunes 700 of 1,000 objects; the restarted agentk prunes the rest and the
/// inventory shrinks to the 300 that stay. Nothing that stays in Git is deleted.
#[tokio::test]
async fn agentk_killed_mid_prune_converges_with_nothing_lost_or_orphaned() -> anyhow::Result<()> {
    let world = World::start("kill-prune", 1000).await?;
    let agentk = world.agentk(1)?;
    world
        .converged(&names(0..1000), Duration::from_secs(120))
        .await?;
    // Files cms-003 … cms-009 leave Git: cm-00300 … cm-00999.
    let removed: Vec<String> = (3..10).map(|i| format!("cms-{i:03}.yaml")).collect();
    commit_set(&world.git, &[], &removed, "700 objects leave")?;
    let at = world
        .wait_for_moment("mid-prune", |n| (401..900).contains(&n), |n| n <= 300)
        .await?;
    drop(agentk);
    let left = world.ours().await?;
    assert!(
        names(0..300).is_subset(&left),
        "an object still in Git was deleted"
    );
    let _agentk = world.agentk(2)?;
    world
        .converged(&names(0..300), Duration::from_secs(120))
        .await
        .with_context(|| format!("after a kill at {at} objects"))?;
    Ok(())
}

/// P4: kas killed (SIGKILL) while agents report syncs and it writes their status; it restarts on the same
/// database, which opens, keeps the agent and its token, and the agent reconnects and syncs the next commit.
#[tokio::test]
async fn kas_killed_during_status_writes_restarts_with_agents_and_tokens_intact()
-> anyhow::Result<()> {
    let mut world = World::start("kill-kas", 300).await?;
    let _agentk = world.agentk(1)?;
    // Kill kas while the first sync's reports are being written.
    world
        .wait_for_moment("first sync under way", |n| n >= 50, |_| false)
        .await?;
    world.kas.kill()?;
    world.kas.restart().await?;
    let agents = world.kas.admin.list_agents(None).await?;
    assert_eq!(
        agents.as_array().map(Vec::len),
        Some(1),
        "the agent survived: {agents}"
    );
    world
        .kas
        .wait_connected(1, Duration::from_secs(60))
        .await
        .context("the agent reconnects with its token")?;
    commit_set(&world.git, &manifests(400, "two"), &[], "a new commit")?;
    world
        .converged(&names(0..400), Duration::from_secs(120))
        .await?;
    let value = world
        .ns
        .api::<ConfigMap>()
        .get("cm-00000")
        .await?
        .data
        .and_then(|mut d| d.remove("value"));
    assert_eq!(value.as_deref(), Some("two"));
    Ok(())
}

/// Records every ConfigMap deleted in `ns` from now on (by anyone), through a watch of the real apiserver.
fn record_deletions(ns: &TestNamespace) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use futures::StreamExt;
    use kube::runtime::watcher;
    let deleted = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = deleted.clone();
    let api = ns.api::<ConfigMap>();
    tokio::spawn(async move {
        let mut events = watcher(api, watcher::Config::default()).boxed();
        while let Some(event) = events.next().await {
            if let Ok(watcher::Event::Delete(cm)) = event {
                let name = cm.metadata.name.unwrap_or_default();
                sink.lock().expect("lock").push(name);
            }
        }
    });
    deleted
}

/// K1 and friends: the apiserver fails (`fault`) for `outage` while agentk is half-way through creating 1,000
/// objects. The sync in flight fails those objects (nothing is pruned: nothing may be while anything failed),
/// the failed sync is retried with backoff without waiting for the 5-minute drift check, and it converges
/// once the apiserver is back. No object is deleted at any point.
async fn apiserver_outage_mid_sync(
    prefix: &str,
    fault: Fault,
    outage: Duration,
) -> anyhow::Result<()> {
    let world = World::start(prefix, 1000).await?;
    let proxy =
        FaultProxy::in_front_of_apiserver(UpstreamIdentity::KubeconfigClientCertificate).await?;
    let kubeconfig = world.dir.path().join("kubeconfig-through-proxy");
    std::fs::write(&kubeconfig, proxy.kubeconfig(None)?)?;
    let deleted = record_deletions(&world.ns);
    let _agentk = world.agentk_with(1, &kubeconfig)?;
    world
        .wait_for_moment("mid-sync", |n| (100..900).contains(&n), |n| n >= 1000)
        .await?;
    proxy.set(fault);
    tokio::time::sleep(outage).await;
    let during = world.ours().await?.len();
    proxy.set(Fault::PassThrough);
    assert!(
        during < 1000,
        "the outage came too late: {during} objects already applied"
    );
    world
        .converged(&names(0..1000), Duration::from_secs(90))
        .await
        .with_context(|| format!("after a {fault:?} outage of {outage:?} at {during} objects"))?;
    let deleted = deleted.lock().expect("lock").clone();
    assert!(deleted.is_empty(), "objects were deleted: {deleted:?}");
    Ok(())
}

#[tokio::test]
async fn apiserver_503s_mid_sync_are_retried_and_converge_without_deleting_anything()
-> anyhow::Result<()> {
    apiserver_outage_mid_sync(
        "fault-503",
        Fault::ServiceUnavailable,
        Duration::from_secs(8),
    )
    .await
}

#[tokio::test]
async fn apiserver_resets_mid_sync_are_retried_and_converge_without_deleting_anything()
-> anyhow::Result<()> {
    apiserver_outage_mid_sync("fault-reset", Fault::Reset, Duration::from_secs(5)).await
}

#[tokio::test]
async fn apiserver_stalls_mid_sync_resume_and_converge_without_deleting_anything()
-> anyhow::Result<()> {
    apiserver_outage_mid_sync("fault-stall", Fault::Stall, Duration::from_secs(10)).await
}
