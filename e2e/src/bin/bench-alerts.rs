//! Throughput benchmark of kas's `NetworkAlerts.ReportAlerts`: how many alerts per second a release kas
//! process accepts over real gRPC connections, against a baseline measured in the same run: as many calls
//! with empty batches (the same authentication, decoding and one store transaction, no alerts). The ratio
//! is the cost the alerts add. Alerts cycle over a fixed set of keys, as agentk's aggregation makes them:
//! most entries update an existing alert (dedupe), a few create one.
//!
//! Run: `cargo xtask bench alerts` (builds release binaries, then runs this).

use std::time::{Duration, Instant};

use anyhow::Context;
use e2e::{CONFIG_FILE, CONFIG_PROJECT, process::KasProcess};
use gitops_protocol::{
    FlowEndpoint, FlowVerdict, NetworkAlert, NetworkAlertBatch, NetworkPolicyKind,
    NetworkPolicyRef, NetworkProtocol, TrafficDirection,
    network_alerts_client::NetworkAlertsClient,
};
use gitops_tunnel::{KasAddress, client::ClientConfig};
use test_support::git_http::GitHttpServer;

/// Concurrent callers (agentk sends one batch at a time; several agents report at once).
const CALLERS: usize = 8;
/// Calls per caller, per phase.
const CALLS: usize = 250;
/// Entries per batch in the alerts phase.
const BATCH: usize = 50;
/// Distinct keys the entries cycle over (below `alerts.max_per_agent`'s default 1000).
const KEYS: usize = 400;

fn alert(key: usize, now_ms: i64) -> NetworkAlert {
    NetworkAlert {
        policy: Some(NetworkPolicyRef {
            kind: NetworkPolicyKind::CiliumNetworkPolicy.into(),
            namespace: "shop".into(),
            name: format!("policy-{}", key % 20),
        }),
        source: Some(FlowEndpoint {
            namespace: "shop".into(),
            pod_name: format!("web-{key}"),
            ip: "10.0.0.7".into(),
            identity: 4242,
            workload: "Deployment/web".into(),
        }),
        destination: Some(FlowEndpoint {
            ip: "203.0.113.7".into(),
            identity: 2,
            ..Default::default()
        }),
        port: 5432,
        protocol: NetworkProtocol::Tcp.into(),
        direction: TrafficDirection::Egress.into(),
        count: 3,
        first_seen_unix_ms: now_ms,
        last_seen_unix_ms: now_ms,
        verdict: FlowVerdict::Dropped.into(),
        drop_reason: "POLICY_DENIED".into(),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Runs `CALLERS` × `CALLS` calls, batch ids from `first_id`; each batch has `entries` alerts, and with
/// `resend` is sent a second time at once (as after a lost acknowledgement: kas must count it once).
/// Returns the wall time.
async fn phase(
    config: &ClientConfig,
    first_id: u64,
    entries: usize,
    resend: bool,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for caller in 0..CALLERS {
        // One connection per caller, as one per agent.
        let mut client =
            NetworkAlertsClient::with_interceptor(config.channel()?, config.interceptor()?);
        tasks.push(tokio::spawn(async move {
            for call in 0..CALLS {
                let n = caller * CALLS + call;
                let alerts = (0..entries)
                    .map(|e| alert((n * entries + e) % KEYS, now_ms()))
                    .collect();
                let batch = NetworkAlertBatch {
                    batch_id: first_id + n as u64,
                    alerts,
                    suppressed: 0,
                };
                if resend {
                    client.report_alerts(batch.clone()).await?;
                }
                client.report_alerts(batch).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(started.elapsed())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let git = GitHttpServer::start().await?;
    git.create_repo(CONFIG_PROJECT, true)?;
    git.commit_files(CONFIG_PROJECT, &[(CONFIG_FILE, Some("{}\n"))], "config")?;
    let dir = tempfile::tempdir()?;
    let kas = KasProcess::start(&git, dir.path(), "warn", true).await?;
    let agent = kas.admin.create_agent(CONFIG_PROJECT, "bench").await?;
    let id = agent["clusterAgent"]["id"]
        .as_str()
        .context("agent id")?
        .to_owned();
    let token = kas.admin.create_token(&id, "bench", "").await?;
    let secret = token["secret"].as_str().context("secret")?.to_owned();
    let config = ClientConfig::new(
        KasAddress::parse(&format!("grpc://127.0.0.1:{}", kas.agent_port))?,
        secret,
    );

    // Warm up connections, the database file and the keys.
    phase(&config, 1_000_000, BATCH, false).await?;
    let calls = (CALLERS * CALLS) as f64;
    let empty = phase(&config, 2_000_000, 0, false).await?;
    let full = phase(&config, 3_000_000, BATCH, false).await?;
    // Every batch sent twice: the repeat is acknowledged without counting (kas remembers an agent's last
    // 64 batch ids, and agentk re-sends only its newest).
    let repeated = phase(&config, 4_000_000, BATCH, true).await?;

    let alerts = kas
        .admin
        .execute(
            "query($a: ID!) { clusterAgent(id: $a) { networkAlerts(first: 1000) { count } } }",
            serde_json::json!({ "a": id }),
        )
        .await?;
    let list = alerts["clusterAgent"]["networkAlerts"]
        .as_array()
        .context("alerts")?;
    let total: u64 = list.iter().filter_map(|a| a["count"].as_u64()).sum();
    // Three phases with alerts (warm-up, alerts, re-sent), each counted once; 3 flows per entry.
    let expected = (3 * CALLERS * CALLS * BATCH * 3) as u64;
    anyhow::ensure!(
        list.len() == KEYS && total == expected,
        "kas holds {} alerts counting {total}; expected {KEYS} counting {expected} (re-sent batches must \
         count once)",
        list.len()
    );

    let per_s = |n: f64, d: Duration| n / d.as_secs_f64();
    let baseline_calls = per_s(calls, empty);
    let alert_calls = per_s(calls, full);
    println!(
        "kas NetworkAlerts.ReportAlerts, {CALLERS} callers × {CALLS} calls per phase, {BATCH} alerts per \
         batch over {KEYS} keys"
    );
    println!("  baseline (empty batches): {baseline_calls:>8.0} calls/s  ({empty:.2?})");
    println!(
        "  with alerts:              {alert_calls:>8.0} calls/s  ({full:.2?}) = {:.0} alerts/s",
        alert_calls * BATCH as f64
    );
    println!(
        "  every batch sent twice:   {:>8.0} calls/s  ({repeated:.2?}), the repeats counted once (checked)",
        per_s(2.0 * calls, repeated)
    );
    println!(
        "  ratio calls/s with alerts / baseline: {:.2}",
        alert_calls / baseline_calls
    );
    Ok(())
}
