//! Observability of the real binaries: kas and agentk run as processes against the real Gitea and the real
//! kube-apiserver; after real activity (a push webhook, Git ls-refs and fetches, syncs that create, correct
//! drift, prune and fail, a Kubernetes API proxy request) their `/metrics` are fed to the real
//! `promtool check metrics` and the counters must have moved; `/livez` and `/readyz` answer; the Kubernetes
//! Events exist on the objects concerned; each binary logs its start line; and kas changes its log level on
//! SIGHUP.

use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use e2e::process::{Killed, free_port, sibling_binary, spawn_logged};
use e2e::push_main as push;
use k8s_openapi::api::{core::v1::ConfigMap, events::v1::Event};
use kas::cli::AdminClient;
use kube::api::{ListParams, Patch, PatchParams};
use test_support::{cluster::TestNamespace, env::test_env, gitea::Gitea};

fn configmap(name: &str, value: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  key: {value}\n")
}

/// A Service the apiserver refuses (port out of range): a failure on an object whose API is known.
const BAD_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: bad-port\nspec:\n  ports:\n  - port: 99999\n";

/// kas's `kas.yaml` for this test: every listener on a free loopback port.
struct KasPorts {
    agent: u16,
    api: u16,
    proxy: u16,
    observability: u16,
}

fn write_kas_config(dir: &Path, ports: &KasPorts, level: &str) -> anyhow::Result<()> {
    let env = test_env();
    let d = dir.display();
    std::fs::write(dir.join("admin"), "admin-token")?;
    std::fs::write(dir.join("git-password"), &env.gitea.admin_password)?;
    std::fs::write(dir.join("webhook-secret"), "hook-secret")?;
    let yaml = format!(
        "listen:\n  agent: 127.0.0.1:{}\n  api: 127.0.0.1:{}\n  k8s_proxy: 127.0.0.1:{}\n  observability: 127.0.0.1:{}\n\
         data_dir: {d}/data\nadmin_token_file: {d}/admin\n\
         git:\n  base_url: {}\n  username: {}\n  password_file: {d}/git-password\n  poll_period: 1s\n\
         webhooks:\n  secret_file: {d}/webhook-secret\nlogging:\n  level: {level}\n",
        ports.agent,
        ports.api,
        ports.proxy,
        ports.observability,
        env.gitea.url,
        env.gitea.admin_user,
    );
    std::fs::write(dir.join("kas.yaml"), yaml)?;
    Ok(())
}

fn start_kas(dir: &Path) -> anyhow::Result<Killed> {
    let mut command = Command::new(sibling_binary("kas")?);
    command
        .args(["serve", "--config"])
        .arg(dir.join("kas.yaml"));
    spawn_logged(command, &dir.join("kas.log"))
}

async fn get(url: &str) -> anyhow::Result<(u16, String)> {
    let response = reqwest::get(url).await?;
    let status = response.status().as_u16();
    Ok((status, response.text().await?))
}

async fn wait_for<F, Fut>(within: Duration, what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await.unwrap_or(false) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{what} did not happen within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The value of the sample whose name and labels are exactly `series` (`name{a="b"}`), if present.
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

fn at_least(exposition: &str, series: &str, min: f64) -> anyhow::Result<()> {
    match sample(exposition, series) {
        Some(value) if value >= min => Ok(()),
        other => bail!("{series} is {other:?}, expected at least {min}; exposition:\n{exposition}"),
    }
}

/// `promtool check metrics` on `exposition`: it must find nothing to complain about.
fn promtool_check(what: &str, exposition: &str) -> anyhow::Result<()> {
    let promtool = &test_env().tools.promtool;
    ensure!(
        !promtool.as_os_str().is_empty() && promtool.exists(),
        "promtool is missing ({}): `cargo xtask tools build` builds it into the tools cache, and `cargo xtask \
         cluster up` writes its path into the state file",
        promtool.display()
    );
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", promtool.display()))?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(exposition.as_bytes())?;
    let output = child.wait_with_output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        output.status.success() && said.trim().is_empty(),
        "promtool check metrics on {what}'s exposition ({}): {said}",
        output.status
    );
    eprintln!(
        "promtool check metrics: {what}'s exposition is clean ({} lines)",
        exposition.lines().count()
    );
    Ok(())
}

/// The Events in `namespace` with `reason`, about an object of `kind` named `name`.
async fn events_about(
    ns: &TestNamespace,
    reason: &str,
    kind: &str,
    name: &str,
) -> anyhow::Result<Vec<Event>> {
    let events = ns.api::<Event>().list(&ListParams::default()).await?;
    Ok(events
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .filter(|e| {
            e.regarding.as_ref().is_some_and(|r| {
                r.kind.as_deref() == Some(kind)
                    && r.name.as_deref() == Some(name)
                    && r.namespace.as_deref() == Some(ns.name.as_str())
            })
        })
        .collect())
}

async fn wait_for_event(
    ns: &TestNamespace,
    reason: &str,
    kind: &str,
    name: &str,
) -> anyhow::Result<Event> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(event) = events_about(ns, reason, kind, name).await?.pop() {
            return Ok(event);
        }
        if Instant::now() > deadline {
            let all = ns.api::<Event>().list(&ListParams::default()).await?;
            let seen: Vec<_> = all
                .items
                .iter()
                .map(|e| {
                    (
                        e.reason.clone(),
                        e.regarding.as_ref().and_then(|r| r.name.clone()),
                    )
                })
                .collect();
            bail!("no {reason} Event about {kind}/{name} within 30 s; Events: {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn both_binaries_expose_clean_metrics_probes_and_events_after_real_activity()
-> anyhow::Result<()> {
    test_support::cluster::install_crypto_provider();
    let env = test_env();
    let gitea = Gitea::from_env();
    let ns = TestNamespace::create("observe").await?;
    let config_repo = gitea.create_repository("observe-config").await?;
    let manifests_repo = gitea.create_repository("observe-manifests").await?;
    let project = manifests_repo.full_name.clone();
    let config_yaml = format!(
        "gitops:\n  manifest_projects:\n  - id: {project}\n    default_namespace: {}\n    paths:\n    - glob: '/**/*.yaml'\n",
        ns.name
    );
    push(
        &config_repo,
        &[(".gitlab/agents/gitops/config.yaml", &config_yaml)],
        "agent config",
    )
    .await?;
    push(
        &manifests_repo,
        &[
            ("a.yaml", &configmap("cm-a", "one")),
            ("b.yaml", &configmap("cm-b", "one")),
        ],
        "two ConfigMaps",
    )
    .await?;

    let dir = tempfile::tempdir()?;
    let ports = KasPorts {
        agent: free_port()?,
        api: free_port()?,
        proxy: free_port()?,
        observability: free_port()?,
    };
    write_kas_config(dir.path(), &ports, "info")?;
    let _kas = start_kas(dir.path())?;
    let kas_obs = format!("http://127.0.0.1:{}", ports.observability);
    wait_for(
        Duration::from_secs(20),
        "kas's /readyz answering 200",
        || async { Ok(get(&format!("{kas_obs}/readyz")).await?.0 == 200) },
    )
    .await?;
    for path in ["/livez", "/liveness", "/readiness"] {
        assert_eq!(get(&format!("{kas_obs}{path}")).await?.0, 200, "kas {path}");
    }
    let api = format!("http://127.0.0.1:{}", ports.api);
    gitea
        .add_push_webhook(
            &manifests_repo,
            &format!("{api}/api/webhooks/gitea"),
            "hook-secret",
        )
        .await?;
    let admin = AdminClient::new(&api, "admin-token".into());
    let (agent_gid, _, token) = e2e::register_agent(&admin, &config_repo.full_name).await?;
    let agent_id: i64 = agent_gid.rsplit('/').next().context("agent id")?.parse()?;

    let agentk_obs_port = free_port()?;
    let mut agentk = Command::new(sibling_binary("agentk")?);
    agentk
        .arg(format!("--kas-address=grpc://127.0.0.1:{}", ports.agent))
        .arg(format!(
            "--observability-listen=127.0.0.1:{agentk_obs_port}"
        ))
        .arg("--drift-check-interval=2s")
        .env("AGENTK_TOKEN", &token)
        .env("KUBECONFIG", &env.kubernetes.kubeconfig)
        .env("POD_NAMESPACE", &ns.name)
        .env("POD_NAME", "agentk-observe-0");
    let agentk_log = dir.path().join("agentk.log");
    let _agentk = spawn_logged(agentk, &agentk_log)?;
    let agentk_obs = format!("http://127.0.0.1:{agentk_obs_port}");
    wait_for(
        Duration::from_secs(20),
        "agentk's /livez answering",
        || async { Ok(get(&format!("{agentk_obs}/livez")).await?.0 == 200) },
    )
    .await?;

    // Ready once connected, configured, leading, and the first commit synced.
    let cms = ns.api::<ConfigMap>();
    wait_for(
        Duration::from_secs(60),
        "agentk ready after its first sync",
        || async {
            let (status, body) = get(&format!("{agentk_obs}/readyz")).await?;
            Ok(status == 200 && body == "ok\n")
        },
    )
    .await?;
    assert!(cms.get_opt("cm-b").await?.is_some(), "synced before ready");
    assert_eq!(get(&format!("{agentk_obs}/readiness")).await?.0, 200);

    // Drift: change what the manifest sets; the drift check (every 2 s) puts it back.
    cms.patch(
        "cm-a",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "data": { "key": "drifted" } })),
    )
    .await?;
    wait_for(Duration::from_secs(30), "the drift corrected", || async {
        let cm = cms.get("cm-a").await?;
        Ok(cm.data.and_then(|d| d.get("key").cloned()).as_deref() == Some("one"))
    })
    .await?;

    // Prune: cm-b leaves Git (the push webhook brings it at once).
    push(&manifests_repo, &[("b.yaml", "")], "cm-b removed").await?;
    wait_for(Duration::from_secs(30), "cm-b pruned", || async {
        Ok(cms.get_opt("cm-b").await?.is_none())
    })
    .await?;

    // A failure on an object: the apiserver refuses the Service.
    push(
        &manifests_repo,
        &[("svc.yaml", BAD_SERVICE)],
        "a bad Service",
    )
    .await?;
    let failed = wait_for_event(&ns, "SyncFailed", "Service", "bad-port").await?;
    assert_eq!(failed.type_.as_deref(), Some("Warning"));
    assert!(
        failed.note.as_deref().unwrap_or_default().contains("99999"),
        "{failed:?}"
    );

    // A Kubernetes API proxy request without a credential: refused, and counted.
    let (status, _) = get(&format!(
        "http://127.0.0.1:{}/api/v1/namespaces",
        ports.proxy
    ))
    .await?;
    assert_eq!(status, 401);

    // The Events, on the objects concerned.
    let drift = wait_for_event(&ns, "DriftCorrected", "ConfigMap", "cm-a").await?;
    assert_eq!(drift.type_.as_deref(), Some("Normal"));
    assert_eq!(drift.reporting_controller.as_deref(), Some("agentk"));
    assert_eq!(
        drift.reporting_instance.as_deref(),
        Some("agentk-observe-0")
    );
    let pruned = wait_for_event(&ns, "Pruned", "ConfigMap", "cm-b").await?;
    assert!(
        pruned
            .note
            .as_deref()
            .unwrap_or_default()
            .contains(&project),
        "{pruned:?}"
    );
    let lease = agentk::leader::lease_name(agent_id);
    let leader = wait_for_event(&ns, "LeaderElection", "Lease", &lease).await?;
    assert!(
        leader
            .note
            .as_deref()
            .unwrap_or_default()
            .contains("agentk-observe-0 became leader"),
        "{leader:?}"
    );
    eprintln!(
        "Events recorded: SyncFailed on Service/bad-port, DriftCorrected on ConfigMap/cm-a, Pruned on ConfigMap/cm-b, LeaderElection on Lease/{lease}"
    );

    // Gitea delivers webhooks from a queue, maybe after kas's poll found the commit: wait for one.
    let accepted = "kas_webhook_deliveries_total{forge=\"gitea\",result=\"accepted\"}";
    wait_for(
        Duration::from_secs(30),
        "a webhook delivery counted",
        || async {
            let (_, text) = get(&format!("{kas_obs}/metrics")).await?;
            Ok(sample(&text, accepted).is_some_and(|n| n >= 1.0))
        },
    )
    .await?;

    // The expositions: clean by promtool, and the counters moved.
    let (status, kas_metrics) = get(&format!("{kas_obs}/metrics")).await?;
    assert_eq!(status, 200);
    promtool_check("kas", &kas_metrics)?;
    for (series, min) in [
        ("kas_agents_connected", 1.0),
        ("kas_agent_connections{transport=\"grpc\"}", 1.0),
        ("kas_configuration_streams", 1.0),
        ("kas_manifest_streams", 1.0),
        (
            "kas_git_operations_total{operation=\"ls_refs\",result=\"ok\"}",
            3.0,
        ),
        (
            "kas_git_operations_total{operation=\"fetch\",result=\"ok\"}",
            2.0,
        ),
        (
            "kas_git_operation_duration_seconds_count{operation=\"fetch\"}",
            2.0,
        ),
        (
            "kas_webhook_deliveries_total{forge=\"gitea\",result=\"accepted\"}",
            1.0,
        ),
        ("kas_sync_reports_total{outcome=\"synced\"}", 1.0),
        ("kas_sync_reports_total{outcome=\"partial\"}", 1.0),
        ("kas_proxy_requests_total{verb=\"list\",code=\"401\"}", 1.0),
    ] {
        at_least(&kas_metrics, series, min)?;
    }
    let version = env!("CARGO_PKG_VERSION");
    at_least(
        &kas_metrics,
        &format!("kas_build_info{{version=\"{version}\"}}"),
        1.0,
    )?;
    let (status, agentk_metrics) = get(&format!("{agentk_obs}/metrics")).await?;
    assert_eq!(status, 200);
    promtool_check("agentk", &agentk_metrics)?;
    let p = &project;
    for (series, min) in [
        ("agentk_kas_connected".to_owned(), 1.0),
        ("agentk_leader".to_owned(), 1.0),
        ("agentk_configurations_received_total".to_owned(), 1.0),
        (
            format!("agentk_syncs_total{{project=\"{p}\",outcome=\"synced\"}}"),
            2.0,
        ),
        (
            format!("agentk_syncs_total{{project=\"{p}\",outcome=\"partial\"}}"),
            1.0,
        ),
        ("agentk_sync_duration_seconds_count".to_owned(), 3.0),
        (
            "agentk_sync_objects_total{result=\"created\"}".to_owned(),
            2.0,
        ),
        (
            "agentk_sync_objects_total{result=\"pruned\"}".to_owned(),
            1.0,
        ),
        (
            "agentk_sync_objects_total{result=\"failed\"}".to_owned(),
            1.0,
        ),
        ("agentk_drift_corrections_total".to_owned(), 1.0),
        (format!("agentk_inventory_objects{{project=\"{p}\"}}"), 1.0),
        (
            "agentk_events_total{reason=\"Pruned\",result=\"published\"}".to_owned(),
            1.0,
        ),
    ] {
        at_least(&agentk_metrics, &series, min)?;
    }
    eprintln!(
        "kas: {} git fetches, {} ls-refs; agentk: {} drift corrections, {} syncs synced",
        sample(
            &kas_metrics,
            "kas_git_operations_total{operation=\"fetch\",result=\"ok\"}"
        )
        .unwrap_or_default(),
        sample(
            &kas_metrics,
            "kas_git_operations_total{operation=\"ls_refs\",result=\"ok\"}"
        )
        .unwrap_or_default(),
        sample(&agentk_metrics, "agentk_drift_corrections_total").unwrap_or_default(),
        sample(
            &agentk_metrics,
            &format!("agentk_syncs_total{{project=\"{p}\",outcome=\"synced\"}}")
        )
        .unwrap_or_default(),
    );
    // OpenMetrics for scrapers that ask for it.
    let openmetrics = reqwest::Client::new()
        .get(format!("{agentk_obs}/metrics"))
        .header("accept", "application/openmetrics-text;version=1.0.0")
        .send()
        .await?
        .text()
        .await?;
    assert!(openmetrics.ends_with("# EOF\n"));

    // Each binary's start line: version, configuration summary, listen addresses.
    let kas_log = std::fs::read_to_string(dir.path().join("kas.log"))?;
    let kas_start = start_line(&kas_log, "kas is serving")?;
    assert_eq!(kas_start["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        kas_start["observability_addr"],
        format!("127.0.0.1:{}", ports.observability)
    );
    assert_eq!(kas_start["webhooks"], true);
    let agentk_log = std::fs::read_to_string(&agentk_log)?;
    let agentk_start = start_line(&agentk_log, "agentk is starting")?;
    assert_eq!(agentk_start["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        agentk_start["observability_listen"],
        format!("127.0.0.1:{agentk_obs_port}")
    );
    assert_eq!(agentk_start["token_source"], "AGENTK_TOKEN");
    assert!(!agentk_log.contains(&token), "the token is never logged");

    ns.delete().await?;
    gitea.delete_repository(&config_repo).await?;
    gitea.delete_repository(&manifests_repo).await?;
    Ok(())
}

/// The JSON log line whose `msg` is `msg`.
fn start_line(log: &str, msg: &str) -> anyhow::Result<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["msg"] == msg)
        .with_context(|| format!("no {msg:?} line in:\n{log}"))
}

/// Asks kas's agent port a plain HTTP/1 request, which kas refuses with a debug-level log line.
async fn poke_agent_port(port: u16) -> anyhow::Result<()> {
    let (status, _) = get(&format!("http://127.0.0.1:{port}/probe")).await?;
    ensure!(status == 400, "the agent port answered {status}");
    Ok(())
}

const REFUSED_LINE: &str = "refused a plain HTTP/1 request on the agent port";

#[tokio::test]
async fn kas_rereads_its_log_level_on_sighup() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ports = KasPorts {
        agent: free_port()?,
        api: free_port()?,
        proxy: free_port()?,
        observability: free_port()?,
    };
    write_kas_config(dir.path(), &ports, "info")?;
    let kas = start_kas(dir.path())?;
    let obs = format!("http://127.0.0.1:{}", ports.observability);
    wait_for(Duration::from_secs(20), "kas up", || async {
        Ok(get(&format!("{obs}/livez")).await?.0 == 200)
    })
    .await?;
    let log = || std::fs::read_to_string(dir.path().join("kas.log")).unwrap_or_default();
    let hangup = |level: &str| -> anyhow::Result<()> {
        write_kas_config(dir.path(), &ports, level)?;
        let status = Command::new("kill")
            .args(["-HUP", &kas.pid().to_string()])
            .status()?;
        ensure!(status.success(), "kill -HUP failed");
        Ok(())
    };

    poke_agent_port(ports.agent).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!log().contains(REFUSED_LINE), "a debug line at info level");

    hangup("debug")?;
    wait_for(Duration::from_secs(10), "the SIGHUP line", || async {
        Ok(log().contains("\"to\":\"debug\""))
    })
    .await?;
    poke_agent_port(ports.agent).await?;
    wait_for(
        Duration::from_secs(10),
        "a debug line after SIGHUP",
        || async { Ok(log().contains(REFUSED_LINE)) },
    )
    .await?;

    hangup("info")?;
    wait_for(Duration::from_secs(10), "back to info", || async {
        Ok(log().contains("\"to\":\"info\""))
    })
    .await?;
    let before = log().matches(REFUSED_LINE).count();
    poke_agent_port(ports.agent).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        log().matches(REFUSED_LINE).count(),
        before,
        "debug is off again"
    );

    // A broken kas.yaml leaves the level as it is, and says why.
    std::fs::write(dir.path().join("kas.yaml"), "listen: [not, a, map]\n")?;
    let status = Command::new("kill")
        .args(["-HUP", &kas.pid().to_string()])
        .status()?;
    ensure!(status.success());
    wait_for(Duration::from_secs(10), "the refusal", || async {
        Ok(log().contains("SIGHUP: cannot read kas.yaml; the log level stays"))
    })
    .await?;
    assert_eq!(get(&format!("{obs}/livez")).await?.0, 200, "kas still runs");

    // The admin API sets it too (a container has no shell to send signals from).
    let admin = AdminClient::new(
        &format!("http://127.0.0.1:{}", ports.api),
        "admin-token".into(),
    );
    let set = |level: &'static str| {
        let admin = admin.clone();
        async move {
            admin
                .mutate(
                    "kasLogLevelSet",
                    "mutation($l: KasLogLevel!) { kasLogLevelSet(level: $l) { level previous errors } }",
                    serde_json::json!({ "l": level }),
                )
                .await
        }
    };
    let payload = set("DEBUG").await?;
    assert_eq!(payload["level"], "DEBUG");
    assert_eq!(payload["previous"], "INFO");
    let before = log().matches(REFUSED_LINE).count();
    poke_agent_port(ports.agent).await?;
    wait_for(
        Duration::from_secs(10),
        "a debug line after the mutation",
        || async { Ok(log().matches(REFUSED_LINE).count() > before) },
    )
    .await?;
    assert!(log().contains("\"trigger\":\"admin API\""));
    let refused = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/api/graphql", ports.api))
        .json(
            &serde_json::json!({ "query": "mutation { kasLogLevelSet(level: ERROR) { level } }" }),
        )
        .send()
        .await?;
    assert_eq!(refused.status(), 401, "only the admin may change it");
    assert_eq!(set("INFO").await?["previous"], "DEBUG");
    Ok(())
}

/// The transport label comes from how each connection really reached kas: two agents over TLS, one inside
/// a WebSocket and one over HTTP/2, are counted apart, and a disconnect counts down.
#[tokio::test]
async fn connections_are_counted_by_their_transport() -> anyhow::Result<()> {
    use gitops_telemetry::observability::Exposition;
    let harness = e2e::Harness::start(true).await?;
    let (_, _, secret) = harness.register_agent().await?;
    let wss = harness.agent(harness.client_config("wss", &secret))?;
    let grpcs = harness.agent(harness.client_config("grpcs", &secret))?;
    let state = harness.kas().state.clone();
    let exposition =
        || kas::observability::endpoints(state.clone()).encode(Exposition::PrometheusText);
    wait_for(Duration::from_secs(20), "both agents counted", || async {
        let text = exposition();
        Ok(
            sample(&text, "kas_agent_connections{transport=\"wss\"}") == Some(1.0)
                && sample(&text, "kas_agent_connections{transport=\"grpcs\"}") == Some(1.0),
        )
    })
    .await?;
    let text = exposition();
    assert_eq!(
        sample(&text, "kas_agents_connected"),
        Some(1.0),
        "one agent, two replicas"
    );
    assert_eq!(sample(&text, "kas_configuration_streams"), Some(2.0));
    assert_eq!(
        sample(&text, "kas_agent_connections{transport=\"ws\"}"),
        Some(0.0)
    );
    wss.shutdown().await;
    wait_for(
        Duration::from_secs(20),
        "the WebSocket agent counted down",
        || async {
            Ok(sample(&exposition(), "kas_agent_connections{transport=\"wss\"}") == Some(0.0))
        },
    )
    .await?;
    assert_eq!(
        sample(&exposition(), "kas_configuration_streams"),
        Some(1.0)
    );
    grpcs.shutdown().await;
    Ok(())
}
