//! GitOps benchmark, everything in one run against one apiserver:
//! 1. the engine against `kubectl apply --server-side`: the same 1,000 ConfigMaps and 100 Deployments into
//!    empty namespaces, then the unchanged re-sync;
//! 2. the product end to end: Gitea → push webhook → kas (release) → agentk (release) → apiserver. The same
//!    1,100 objects pushed in one commit; agentk's peak RSS; the write requests the apiserver counted during
//!    a periodic re-check of the unchanged commit; push→applied latency over repeated one-object pushes.
//!
//! Run: `cargo xtask bench gitops` (starts the local cluster, builds release, prints the figures last).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, bail};
use e2e::process::{GitSource, KasProcess, Killed, peak_rss_kib};
use gitops_engine::{ApplyOptions, InventoryOptions, InventoryRef, ManifestFile, apply};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::ConfigMap};
use kube::Api;
use test_support::{
    cluster::TestNamespace,
    env::test_env,
    gitea::{Checkout, Gitea, push_files},
};

/// One-object pushes timed for the push→applied latency.
const LATENCY_PUSHES: usize = 15;
/// agentk's periodic re-check in part 2: short, so the benchmark sees one.
const DRIFT_CHECK: &str = "5s";

fn manifests() -> Vec<ManifestFile> {
    let mut files = Vec::new();
    for chunk in 0..10 {
        let docs: Vec<String> = (0..100)
            .map(|i| format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{chunk}-{i}\ndata:\n  key: value-{i}\n"))
            .collect();
        files.push(ManifestFile::new(
            format!("configmaps-{chunk}.yaml"),
            docs.join("---\n"),
        ));
    }
    let deployments: Vec<String> = (0..100)
        .map(|i| {
            format!(
                "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: app-{i}\nspec:\n  replicas: 1\n  selector:\n    matchLabels: {{app: app-{i}}}\n  template:\n    metadata:\n      labels: {{app: app-{i}}}\n    spec:\n      containers:\n      - name: c\n        image: nginx:1.14.2\n"
            )
        })
        .collect();
    files.push(ManifestFile::new(
        "deployments.yaml",
        deployments.join("---\n"),
    ));
    files
}

fn kubectl_apply(dir: &Path, namespace: &str) -> anyhow::Result<()> {
    let env = test_env();
    let mut command = Command::new(&env.tools.kubectl);
    command
        .args([
            "apply",
            "--server-side",
            "--field-manager=bench",
            "-n",
            namespace,
            "-f",
        ])
        .arg(dir);
    e2e::process::run_against_cluster(command, &env.kubernetes.kubeconfig, None).map(drop)
}

/// Part 1's figures.
struct EngineFigures {
    kubectl_create: Duration,
    kubectl_resync: Duration,
    engine_create: Duration,
    engine_resync: Duration,
    changed: usize,
}

async fn engine_vs_kubectl(
    files: &[ManifestFile],
    objects: usize,
) -> anyhow::Result<EngineFigures> {
    let baseline_ns = TestNamespace::create("bench-kubectl").await?;
    let dir = tempfile::tempdir()?;
    for file in files {
        std::fs::write(dir.path().join(&file.path), &file.data)?;
    }
    let started = Instant::now();
    kubectl_apply(dir.path(), &baseline_ns.name).context("kubectl create")?;
    let kubectl_create = started.elapsed();
    let started = Instant::now();
    kubectl_apply(dir.path(), &baseline_ns.name).context("kubectl re-apply")?;
    let kubectl_resync = started.elapsed();

    let ns = TestNamespace::create("bench-engine").await?;
    let options = ApplyOptions {
        default_namespace: ns.name.clone(),
        inventory: Some(InventoryOptions::new(InventoryRef {
            namespace: ns.name.clone(),
            name: "bench-inventory".into(),
        })),
        ..ApplyOptions::default()
    };
    let started = Instant::now();
    let first = apply(&ns.client, files, &options).await?;
    let engine_create = started.elapsed();
    anyhow::ensure!(
        first.count("created") == objects,
        "created {} of {objects}: {:?}",
        first.count("created"),
        first.results.iter().find(|r| !r.outcome.is_success())
    );
    let started = Instant::now();
    let second = apply(&ns.client, files, &options).await?;
    let engine_resync = started.elapsed();
    let changed = second.count("created") + second.count("configured") + second.count("pruned");

    baseline_ns.delete().await?;
    ns.delete().await?;
    Ok(EngineFigures {
        kubectl_create,
        kubectl_resync,
        engine_create,
        engine_resync,
        changed,
    })
}

/// Commits and pushes `files` from `checkout`; returns the commit and how long `git push` took.
fn push(
    checkout: &Checkout,
    files: &[ManifestFile],
    message: &str,
) -> anyhow::Result<(String, Duration)> {
    let files: Vec<(&str, &[u8])> = files
        .iter()
        .map(|f| (f.path.as_str(), f.data.as_slice()))
        .collect();
    Ok(checkout.commit_and_push(&files, message)?)
}

fn latency_file(value: usize) -> ManifestFile {
    ManifestFile::new(
        "latency.yaml",
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: latency\ndata:\n  value: \"{value}\"\n"
        ),
    )
}

/// Write requests (anything but GET, LIST and WATCH) to ConfigMaps and Deployments the apiserver has
/// served, from its own `apiserver_request_total`. Status subresource writes (controllers) are not counted;
/// nothing else writes these objects in this benchmark.
async fn apiserver_writes(client: &kube::Client) -> anyhow::Result<BTreeMap<String, u64>> {
    let metrics = client
        .request_text(http::Request::get("/metrics").body(Vec::new())?)
        .await?;
    let mut writes = BTreeMap::new();
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let Some((labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(&format!("{name}=\""))
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or_default()
        };
        if matches!(label("resource"), "configmaps" | "deployments")
            && label("subresource").is_empty()
            && matches!(
                label("verb"),
                "APPLY" | "PATCH" | "POST" | "PUT" | "DELETE" | "DELETECOLLECTION"
            )
        {
            let count = value.parse::<f64>().unwrap_or(0.0) as u64;
            *writes
                .entry(format!("{} {}", label("verb"), label("resource")))
                .or_default() += count;
        }
    }
    Ok(writes)
}

/// agentk's sync summary lines so far (JSON logs in `log`).
fn sync_summaries(log: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    Ok(std::fs::read_to_string(log)?
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["msg"] == "Cluster successfully synced")
        .collect())
}

async fn wait_until<F, Fut>(within: Duration, what: &str, mut check: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let started = Instant::now();
    loop {
        if check().await? {
            return Ok(started.elapsed());
        }
        if started.elapsed() > within {
            bail!("{what}: not within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Part 2's figures.
struct PipelineFigures {
    push_to_synced: Duration,
    push_duration: Duration,
    agentk_peak_kib: u64,
    kas_peak_kib: u64,
    /// "VERB resource" → count.
    recheck_writes: BTreeMap<String, u64>,
    recheck_took_ms: u64,
    latencies_from_push_start: Vec<Duration>,
    latencies_after_push: Vec<Duration>,
    stages: Stages,
    big_stages: Stages,
}

async fn pipeline(files: &[ManifestFile], objects: usize) -> anyhow::Result<PipelineFigures> {
    let env = test_env();
    let gitea = Gitea::from_env();
    let ns = TestNamespace::create("bench-agentk").await?;
    let config_repo = gitea.create_repository("bench-config").await?;
    let manifests_repo = gitea.create_repository("bench-manifests").await?;
    let config = format!(
        "gitops:\n  manifest_projects:\n  - id: {}\n    default_namespace: {}\n    paths:\n    - glob: '/**/*.yaml'\n",
        manifests_repo.full_name, ns.name
    );
    {
        let repo = config_repo.clone();
        tokio::task::spawn_blocking(move || {
            push_files(
                &repo,
                "main",
                &[(".gitlab/agents/bench/config.yaml", &config)],
                "config",
            )
        })
        .await??;
    }
    let work = Checkout::new(&manifests_repo, "main")?;
    push(&work, &[latency_file(0)], "start small")?;

    let dir = tempfile::tempdir()?;
    let secret = "bench-webhook-secret";
    let source = GitSource {
        base_url: env.gitea.url.clone(),
        username: env.gitea.admin_user.clone(),
        password: env.gitea.admin_password.clone(),
        // Only the webhook can make a push arrive quickly.
        poll_period: "1h".into(),
        webhook_secret: Some(secret.into()),
    };
    let kas_log: PathBuf = dir.path().join("kas.log");
    let kas = KasProcess::start_with(
        &source,
        dir.path(),
        "info",
        Stdio::from(std::fs::File::create(&kas_log)?),
    )
    .await?;
    gitea
        .add_push_webhook(
            &manifests_repo,
            &format!("http://127.0.0.1:{}/api/webhooks/gitea", kas.api_port),
            secret,
        )
        .await?;
    let agent = kas
        .admin
        .create_agent(&config_repo.full_name, "bench")
        .await?;
    let agent_id = agent["clusterAgent"]["id"]
        .as_str()
        .context("agent id")?
        .to_owned();
    let token = kas.admin.create_token(&agent_id, "bench", "").await?["secret"]
        .as_str()
        .context("token")?
        .to_owned();
    let log: PathBuf = dir.path().join("agentk.log");
    let mut command = kas.agentk_command("grpc", &token)?;
    command
        .arg(format!("--drift-check-interval={DRIFT_CHECK}"))
        .env("KUBECONFIG", &env.kubernetes.kubeconfig)
        .env("POD_NAMESPACE", &ns.name)
        .stderr(Stdio::from(std::fs::File::create(&log)?));
    let agentk = Killed(command.spawn().context("starting agentk")?);

    let configmaps: Api<ConfigMap> = ns.api();
    let value = |name: &'static str| {
        let configmaps = configmaps.clone();
        async move {
            Ok::<_, anyhow::Error>(
                configmaps
                    .get_opt(name)
                    .await?
                    .and_then(|c| c.data)
                    .and_then(|mut d| d.remove("value")),
            )
        }
    };
    wait_until(Duration::from_secs(60), "the first sync", || async {
        Ok(value("latency").await?.as_deref() == Some("0"))
    })
    .await?;

    // 1,100 objects in one push, until agentk reports the commit applied (readiness not included).
    let query = format!(
        r#"{{ clusterAgent(id: "{agent_id}") {{ manifestProjects {{ lastSync {{ commitApplied }} }} }} }}"#
    );
    let http = reqwest::Client::new();
    let graphql_url = format!("http://127.0.0.1:{}/api/graphql", kas.api_port);
    let started = Instant::now();
    let (commit, push_duration) = push(&work, files, "1,100 objects")?;
    let pushed_at = SystemTime::now();
    wait_until(
        Duration::from_secs(300),
        "1,100 objects applied",
        || async {
            let view: serde_json::Value = http
                .post(&graphql_url)
                .bearer_auth(&kas.admin_token)
                .json(&serde_json::json!({ "query": query }))
                .send()
                .await?
                .json()
                .await?;
            Ok(
                view["data"]["clusterAgent"]["manifestProjects"][0]["lastSync"]["commitApplied"]
                    == commit.as_str(),
            )
        },
    )
    .await?;
    let push_to_synced = started.elapsed();
    let big_push = Push {
        commit: commit.clone(),
        pushed_at,
        applied_at: SystemTime::now(),
    };
    let listed = configmaps.list(&Default::default()).await?.items.len();
    anyhow::ensure!(
        listed > objects - 100,
        "only {listed} ConfigMaps in the namespace after the sync"
    );

    // A periodic re-check of the unchanged commit: the apiserver counts the writes. First the
    // Deployments settle (their controller writes a revision annotation on each), then a re-check starts
    // and the writes are counted from one re-check's end to the next one's.
    let deployments: Api<Deployment> = ns.api();
    wait_until(
        Duration::from_secs(120),
        "100 Deployments available",
        || async {
            let list = deployments.list(&Default::default()).await?;
            Ok(list.items.len() == 100
                && list
                    .items
                    .iter()
                    .all(|d| d.status.as_ref().and_then(|s| s.available_replicas) == Some(1)))
        },
    )
    .await?;
    let summaries = sync_summaries(&log)?.len();
    wait_until(Duration::from_secs(60), "a periodic re-check", || async {
        Ok(sync_summaries(&log)?.len() > summaries)
    })
    .await?;
    let writes_before = apiserver_writes(&ns.client).await?;
    let summaries = sync_summaries(&log)?.len();
    wait_until(
        Duration::from_secs(60),
        "another periodic re-check",
        || async { Ok(sync_summaries(&log)?.len() > summaries) },
    )
    .await?;
    let recheck = sync_summaries(&log)?.pop().context("summary")?;
    let recheck_writes: BTreeMap<String, u64> = apiserver_writes(&ns.client)
        .await?
        .into_iter()
        .map(|(what, n)| {
            (
                what.clone(),
                n - writes_before.get(&what).copied().unwrap_or(0),
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    let recheck_took_ms = recheck["took_ms"].as_u64().unwrap_or_default();

    // One object changed per push, through the webhook.
    let mut latencies_from_push_start = Vec::new();
    let mut latencies_after_push = Vec::new();
    let mut pushes = Vec::new();
    for i in 1..=LATENCY_PUSHES {
        let started = Instant::now();
        let (commit, pushed) = push(&work, &[latency_file(i)], &format!("latency {i}"))?;
        let pushed_at = SystemTime::now();
        let expected = i.to_string();
        wait_until(
            Duration::from_secs(30),
            "the pushed value applied",
            || async { Ok(value("latency").await?.as_deref() == Some(expected.as_str())) },
        )
        .await?;
        let total = started.elapsed();
        pushes.push(Push {
            commit,
            pushed_at,
            applied_at: SystemTime::now(),
        });
        latencies_from_push_start.push(total);
        latencies_after_push.push(total.saturating_sub(pushed));
    }
    let agentk_peak_kib = peak_rss_kib(agentk.pid())?;
    let kas_peak_kib = peak_rss_kib(kas.process.pid())?;
    let big_stages = stages(std::slice::from_ref(&big_push), &kas_log, &log)?;
    let stages = stages(&pushes, &kas_log, &log)?;

    drop(agentk);
    drop(kas);
    gitea.delete_repository(&config_repo).await?;
    gitea.delete_repository(&manifests_repo).await?;
    ns.delete().await?;
    Ok(PipelineFigures {
        push_to_synced,
        push_duration,
        agentk_peak_kib,
        kas_peak_kib,
        recheck_writes,
        recheck_took_ms,
        latencies_from_push_start,
        latencies_after_push,
        stages,
        big_stages,
    })
}

/// One timed push.
struct Push {
    commit: String,
    pushed_at: SystemTime,
    applied_at: SystemTime,
}

/// Where the push→applied time goes (medians): push done → kas got the webhook → agentk got the
/// snapshot → the object changed in the cluster. From the wall-clock `time` of kas's and agentk's log lines.
struct Stages {
    to_webhook: Duration,
    to_agent: Duration,
    to_applied: Duration,
}

fn log_lines(path: &Path, msg: &str) -> anyhow::Result<Vec<(SystemTime, serde_json::Value)>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["msg"] == msg)
        .filter_map(|l| Some((humantime::parse_rfc3339(l["time"].as_str()?).ok()?, l)))
        .collect())
}

fn stages(pushes: &[Push], kas_log: &Path, agentk_log: &Path) -> anyhow::Result<Stages> {
    let webhooks = log_lines(kas_log, "push webhook: re-checking the project")?;
    let received = log_lines(agentk_log, "received manifests")?;
    let between = |a: SystemTime, b: SystemTime| b.duration_since(a).unwrap_or_default();
    let (mut to_webhook, mut to_agent, mut to_applied) = (Vec::new(), Vec::new(), Vec::new());
    for push in pushes {
        // The snapshot is matched by its commit; the webhook that brought it is the last one kas logged
        // before that (Gitea may deliver it before `git push` returns: then that stage counts as 0).
        let Some((got, _)) = received
            .iter()
            .find(|(_, l)| l["commit_id"] == push.commit.as_str())
        else {
            continue;
        };
        let Some((hook, _)) = webhooks.iter().rev().find(|(t, _)| t <= got) else {
            continue;
        };
        to_webhook.push(between(push.pushed_at, *hook));
        to_agent.push(between(*hook, *got));
        to_applied.push(between(*got, push.applied_at));
    }
    anyhow::ensure!(
        !to_webhook.is_empty(),
        "no push could be followed through the logs"
    );
    Ok(Stages {
        to_webhook: percentile(&to_webhook, 0.5),
        to_agent: percentile(&to_agent, 0.5),
        to_applied: percentile(&to_applied, 0.5),
    })
}

fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    test_support::cluster::install_crypto_provider();
    let files = manifests();
    let objects = 1100;
    let e = engine_vs_kubectl(&files, objects).await?;
    let p = pipeline(&files, objects).await?;

    let secs = |d: Duration| d.as_secs_f64();
    println!(
        "== bench-gitops: {objects} objects (1,000 ConfigMaps, 100 Deployments), same apiserver, same run =="
    );
    println!("-- the engine alone, against kubectl");
    println!(
        "kubectl apply --server-side, create:  {:>7.2} s",
        secs(e.kubectl_create)
    );
    println!(
        "engine (agentk), create:              {:>7.2} s",
        secs(e.engine_create)
    );
    println!(
        "ratio engine/kubectl, create:         {:>7.2}x (target <= 0.5x)",
        secs(e.engine_create) / secs(e.kubectl_create)
    );
    println!(
        "kubectl apply --server-side, re-sync: {:>7.2} s",
        secs(e.kubectl_resync)
    );
    println!(
        "engine (agentk), unchanged re-sync:   {:>7.2} s",
        secs(e.engine_resync)
    );
    println!(
        "ratio engine/kubectl, re-sync:        {:>7.2}x",
        secs(e.engine_resync) / secs(e.kubectl_resync)
    );
    println!("objects changed by the unchanged re-sync: {}", e.changed);
    println!(
        "-- the product: Gitea push -> webhook -> kas -> agentk -> apiserver (release builds)"
    );
    println!(
        "push of {objects} objects -> applied (reported to kas): {:>7.2} s (git push itself {:.2} s)",
        secs(p.push_to_synced),
        secs(p.push_duration)
    );
    let after_push = p.push_to_synced.saturating_sub(p.push_duration);
    println!(
        "ratio (git push returned -> applied)/kubectl create: {:>7.2}x (target <= 0.5x)",
        secs(after_push) / secs(e.kubectl_create)
    );
    println!(
        "  where it goes: push -> webhook at kas {:.0} ms, -> snapshot at agentk {:.0} ms, -> applied and reported {:.0} ms",
        p.big_stages.to_webhook.as_secs_f64() * 1000.0,
        p.big_stages.to_agent.as_secs_f64() * 1000.0,
        p.big_stages.to_applied.as_secs_f64() * 1000.0
    );
    println!(
        "ratio (snapshot at agentk -> applied)/kubectl create: {:>7.2}x",
        secs(p.big_stages.to_applied) / secs(e.kubectl_create)
    );
    println!(
        "periodic re-check of the unchanged commit: {} write requests at the apiserver {:?} (target 0), took {} ms",
        p.recheck_writes.values().sum::<u64>(),
        p.recheck_writes,
        p.recheck_took_ms
    );
    println!(
        "push -> applied, one object changed, {LATENCY_PUSHES} pushes: p50 {:.0} ms, p90 {:.0} ms, max {:.0} ms after git push returned (target p50 <= 1000 ms)",
        percentile(&p.latencies_after_push, 0.5).as_secs_f64() * 1000.0,
        percentile(&p.latencies_after_push, 0.9).as_secs_f64() * 1000.0,
        percentile(&p.latencies_after_push, 1.0).as_secs_f64() * 1000.0,
    );
    println!(
        "  the same including git push: p50 {:.0} ms, p90 {:.0} ms",
        percentile(&p.latencies_from_push_start, 0.5).as_secs_f64() * 1000.0,
        percentile(&p.latencies_from_push_start, 0.9).as_secs_f64() * 1000.0,
    );
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "  where it goes (medians): push -> webhook at kas {:.0} ms, -> snapshot at agentk {:.0} ms, -> applied {:.0} ms",
        ms(p.stages.to_webhook),
        ms(p.stages.to_agent),
        ms(p.stages.to_applied)
    );
    println!(
        "agentk peak RSS over the whole run: {:.1} MiB (target <= 64 MiB)",
        p.agentk_peak_kib as f64 / 1024.0
    );
    println!(
        "kas peak RSS over the whole run: {:.1} MiB",
        p.kas_peak_kib as f64 / 1024.0
    );
    Ok(())
}
