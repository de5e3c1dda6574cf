//! Network-policy alerts benchmark: agentk (release build, a process) following 10,000 flows a second from
//! the replay server (`gitops_hubble::testing::ReplayServer`, the stand-in for Cilium's datapath), against
//! a baseline measured in the same run: a bare Observer client, in its own process, following the very
//! same stream at the same time and doing nothing but decode it. Prints agentk's CPU and memory, the
//! ratio to the baseline, whether any flow was lost, and the alerts kas took.
//!
//! Phases, each `PHASE` long: idle (following, no flows); 10k/s of drops that match annotated policies
//! (100 distinct sources: the dedupe path); 10k/s of drops that match none; 10k/s of drops each from a new
//! address (the worst case for memory: every flow a new alert key, bounded by the pending cap).
//!
//! Run: `cargo xtask bench flows`.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use e2e::network_alerts::{AlertsOptions, AlertsWorld, pod, policy_drop};
use e2e::process::{Killed, rss_kib};
use gitops_hubble::flow::{Flow, TrafficDirection};

const RATE: u64 = 10_000;

/// Makes the i-th flow of a phase.
type MakeFlow = Box<dyn Fn(u64) -> Flow + Send>;
const PHASE: Duration = Duration::from_secs(15);

/// User + system CPU seconds a process has used.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th of the line.
    let rest = stat.rsplit_once(')').context("stat format")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / clock_ticks())
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The baseline: follows the relay with agentk's request and only decodes (run as `--raw-follow ADDR`).
async fn raw_follow(address: &str) -> anyhow::Result<()> {
    let channel = gitops_hubble::channel(&gitops_hubble::RelayConfig {
        address: address.into(),
        tls: None,
        connect_timeout: Duration::from_secs(5),
    })?;
    let mut client = gitops_hubble::observer::observer_client::ObserverClient::new(channel);
    let request = gitops_hubble::dropped_flows_request(&[gitops_hubble::flow::Verdict::Dropped]);
    let mut stream = client.get_flows(request).await?.into_inner();
    let mut n = 0u64;
    while let Some(message) = stream.message().await? {
        n += u64::from(message.response_types.is_some());
    }
    eprintln!("raw follower: {n} messages");
    Ok(())
}

struct Sample {
    cpu: f64,
    rss_kib: u64,
}

fn sample(pid: u32) -> anyhow::Result<Sample> {
    Ok(Sample {
        cpu: cpu_seconds(pid)?,
        rss_kib: rss_kib(pid)?,
    })
}

/// CPU share of one core used over `PHASE`, and RSS at its end, for each pid.
async fn measure(pids: &[u32]) -> anyhow::Result<Vec<(f64, u64)>> {
    let before: Vec<Sample> = pids.iter().map(|p| sample(*p)).collect::<Result<_, _>>()?;
    let started = Instant::now();
    tokio::time::sleep(PHASE).await;
    let elapsed = started.elapsed().as_secs_f64();
    pids.iter()
        .zip(before)
        .map(|(p, b)| {
            let a = sample(*p)?;
            Ok(((a.cpu - b.cpu) / elapsed, a.rss_kib))
        })
        .collect()
}

fn network_policy(name: &str, app: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  annotations:\n    \
         app.gitlab.com/alert: \"true\"\nspec:\n  podSelector:\n    matchLabels:\n      app: {app}\n  \
         policyTypes: [Ingress]\n"
    )
}

async fn status_flows(world: &AlertsWorld) -> anyhow::Result<(u64, u64, u64)> {
    let s = world.status().await?;
    let n = |k: &str| s[k].as_u64().unwrap_or_default();
    Ok((n("flowsSeen"), n("flowsMatched"), n("lostEvents")))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--raw-follow") {
        return raw_follow(args.get(2).context("--raw-follow ADDR")?).await;
    }
    test_support::cluster::install_crypto_provider();
    let world = AlertsWorld::start(AlertsOptions {
        name: "bench-netalerts",
        cilium_extra: "",
        manifests: vec![
            ("db.yaml".into(), network_policy("db-ingress", "db")),
            ("api.yaml".into(), network_policy("api-ingress", "api")),
        ],
        kas_alerts: None,
        agentk_log_level: "info",
    })
    .await?;
    world
        .wait_status(Duration::from_secs(60), "following", |s| {
            s["state"] == "FOLLOWING" && s["networkPolicies"].as_u64() >= Some(2)
        })
        .await?;
    let raw = Killed(
        std::process::Command::new(std::env::current_exe()?)
            .args(["--raw-follow", &world.replay.address()])
            .spawn()?,
    );
    ensure!(
        world
            .replay
            .wait_for_followers(2, Duration::from_secs(10))
            .await,
        "the baseline follower did not connect"
    );
    let ns = world.ns.name.clone();
    let pids = [world.agentk.pid(), raw.pid()];
    println!(
        "network alerts benchmark: {RATE} flows/s for {PHASE:?} per phase, agentk vs a bare decoder of the same stream"
    );

    let idle = measure(&pids).await?;
    println!(
        "idle (following, no flows): agentk {:.1}% CPU, {} KiB RSS",
        idle[0].0 * 100.0,
        idle[0].1
    );

    let phases: Vec<(&str, MakeFlow)> = vec![
        ("matched, 100 sources", {
            let ns = ns.clone();
            Box::new(move |i| {
                policy_drop(
                    pod(&ns, &format!("web-{}", i % 100), "web"),
                    pod(&ns, "db-0", "db"),
                    TrafficDirection::Ingress,
                    5432,
                )
            })
        }),
        ("unmatched", {
            let ns = ns.clone();
            Box::new(move |i| {
                policy_drop(
                    pod(&ns, &format!("web-{}", i % 100), "web"),
                    pod(&ns, "cache-0", "cache"),
                    TrafficDirection::Ingress,
                    6379,
                )
            })
        }),
        ("matched, every flow a new source", {
            let ns = ns.clone();
            Box::new(move |i| {
                let mut flow = policy_drop(
                    gitops_hubble::flow::Endpoint::default(),
                    pod(&ns, "api-0", "api"),
                    TrafficDirection::Ingress,
                    8443,
                );
                if let Some(ip) = flow.ip.as_mut() {
                    ip.source = format!("198.18.{}.{}", (i / 256) % 256, i % 256);
                }
                flow
            })
        }),
    ];
    let mut worst_ratio: f64 = 0.0;
    for (name, make) in phases {
        let (seen0, matched0, lost0) = status_flows(&world).await?;
        let sender = world.replay.send_at_rate(RATE, make);
        let loaded = measure(&pids).await?;
        sender.abort();
        // Let the counters reach kas (re-sent every 5 s when they moved).
        tokio::time::sleep(Duration::from_secs(6)).await;
        let ratio = loaded[0].0 / loaded[1].0.max(1e-6);
        worst_ratio = worst_ratio.max(ratio);
        println!(
            "{name}: agentk {:.1}% CPU ({:.2} µs/flow), {} KiB RSS ({:.2}× idle) | baseline decoder {:.1}% CPU | agentk/baseline CPU {ratio:.2}×",
            loaded[0].0 * 100.0,
            loaded[0].0 * 1e6 / RATE as f64,
            loaded[0].1,
            loaded[0].1 as f64 / idle[0].1.max(1) as f64,
            loaded[1].0 * 100.0,
        );
        let (seen1, matched1, lost1) = status_flows(&world).await?;
        println!(
            "  agentk status: +{} flows seen, +{} matched, +{} lost",
            seen1 - seen0,
            matched1 - matched0,
            lost1 - lost0
        );
    }
    let alerts = world.alerts().await?;
    let total: u64 = alerts.iter().filter_map(|a| a["count"].as_u64()).sum();
    println!(
        "kas holds {} alerts (first 100 shown by GraphQL) counting {total} drops; peak agentk RSS {} KiB",
        alerts.len(),
        e2e::process::peak_rss_kib(world.agentk.pid())?
    );
    println!("worst agentk/baseline CPU ratio: {worst_ratio:.2}×");
    Ok(())
}
