//! Kubernetes API proxy benchmark: the same apiserver in the same run, straight and through kas and agentk
//! (release builds, processes, loopback, `grpc://`, `access_as: agent`). Both sides use the same kube-rs
//! client, built from the admin kubeconfig (direct) or from the one `kas kubeconfig` prints (proxied).
//! 1. p50/p99 of a small GET (one ConfigMap), sequential;
//! 2. LIST of 1,000 ConfigMaps;
//! 3. 100 concurrent watches through one agent: kas's and agentk's RSS per watch, and one event reaching
//!    all of them;
//! 4. a 100 MiB `kubectl logs`-like stream of a kwok pod, MB/s.
//!
//! Run: `cargo xtask bench proxy` (starts the local cluster, builds release, prints the figures last).

use std::time::{Duration, Instant};

use anyhow::Context;
use e2e::k8s_proxy::{ProxyEnv, Tls, ci_access};
use e2e::process::rss_kib;
use futures::{AsyncBufReadExt, AsyncReadExt, StreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::PostParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use test_support::cluster::TestNamespace;
use test_support::kwok::{PodLogFile, create_running_pod, cri_line, set_pod_logs};

const GETS: usize = 1000;
const LISTS: usize = 20;
const LIST_SIZE: usize = 1000;
const WATCHES: usize = 100;
const STREAM_BYTES: usize = 100 * 1024 * 1024;

async fn client_from(path: &std::path::Path) -> anyhow::Result<Client> {
    let kubeconfig = Kubeconfig::read_from(path)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

fn get(path: &str) -> anyhow::Result<http::Request<Vec<u8>>> {
    Ok(http::Request::get(path).body(Vec::new())?)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

/// Sequential GETs of `path`: (p50, p99).
async fn latencies(client: &Client, path: &str) -> anyhow::Result<(Duration, Duration)> {
    for _ in 0..50 {
        client.request_text(get(path)?).await?;
    }
    let mut samples = Vec::with_capacity(GETS);
    for _ in 0..GETS {
        let started = Instant::now();
        client.request_text(get(path)?).await?;
        samples.push(started.elapsed());
    }
    samples.sort();
    Ok((percentile(&samples, 0.5), percentile(&samples, 0.99)))
}

/// Median time of a LIST of `path` and the body size.
async fn list_median(client: &Client, path: &str) -> anyhow::Result<(Duration, usize)> {
    let mut samples = Vec::with_capacity(LISTS);
    let mut size = 0;
    client.request_text(get(path)?).await?;
    for _ in 0..LISTS {
        let started = Instant::now();
        size = client.request_text(get(path)?).await?.len();
        samples.push(started.elapsed());
    }
    samples.sort();
    Ok((percentile(&samples, 0.5), size))
}

/// Reads the whole log stream of `path`; bytes per second.
async fn stream_rate(client: &Client, path: &str) -> anyhow::Result<(f64, usize)> {
    let started = Instant::now();
    let mut body = client.request_stream(get(path)?).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0usize;
    loop {
        let n = body.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n;
    }
    Ok((total as f64 / started.elapsed().as_secs_f64(), total))
}

async fn create_config_maps(ns: &TestNamespace, count: usize) -> anyhow::Result<()> {
    let api: Api<ConfigMap> = ns.api();
    futures::stream::iter(0..count)
        .map(|i| {
            let api = api.clone();
            async move {
                let cm: ConfigMap = serde_json::from_value(e2e::k8s_proxy::config_map(
                    &format!("cm-{i:04}"),
                    &[("key", &format!("value-{i}-{}", "x".repeat(200)))],
                ))?;
                api.create(&PostParams::default(), &cm).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(())
}

struct Watches {
    kas_kib_per_watch: f64,
    agentk_kib_per_watch: f64,
    event_to_all: Duration,
}

/// Opens [`WATCHES`] watches through the proxy, measures kas's and agentk's RSS growth, then times one
/// event reaching all of them.
async fn watches(
    proxied: &Client,
    ns: &TestNamespace,
    kas_pid: u32,
    agentk_pid: u32,
) -> anyhow::Result<Watches> {
    let (kas_before, agentk_before) = (rss_kib(kas_pid)?, rss_kib(agentk_pid)?);
    let path = format!(
        "/api/v1/namespaces/{}/configmaps?watch=true&fieldSelector=metadata.name%3Dwatched",
        ns.name
    );
    let mut streams = Vec::with_capacity(WATCHES);
    for _ in 0..WATCHES {
        streams.push(proxied.request_stream(get(&path)?).await?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (kas_after, agentk_after) = (rss_kib(kas_pid)?, rss_kib(agentk_pid)?);
    let created = Instant::now();
    ns.api::<ConfigMap>()
        .create(
            &PostParams::default(),
            &serde_json::from_value(e2e::k8s_proxy::config_map("watched", &[("k", "v")]))?,
        )
        .await?;
    let reads = streams.into_iter().map(|mut stream| async move {
        let mut line = String::new();
        stream.read_line(&mut line).await?;
        anyhow::ensure!(line.contains("\"ADDED\""), "unexpected watch line {line:?}");
        anyhow::Ok(())
    });
    tokio::time::timeout(
        Duration::from_secs(30),
        futures::future::try_join_all(reads),
    )
    .await
    .context("the event did not reach every watch within 30 s")??;
    Ok(Watches {
        kas_kib_per_watch: (kas_after as f64 - kas_before as f64) / WATCHES as f64,
        agentk_kib_per_watch: (agentk_after as f64 - agentk_before as f64) / WATCHES as f64,
        event_to_all: created.elapsed(),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    test_support::cluster::install_crypto_provider();
    let ns = TestNamespace::create("bench-proxy").await?;
    let gitea = test_support::gitea::Gitea::from_env();
    let project = gitea.create_repository("bench-ci").await?;
    let env = ProxyEnv::start(Tls::Off, &ci_access(&project.full_name, &ns.name, "agent")).await?;
    let agentk = env.agentk("grpc").await?;
    let token = env.ci_token(&project.full_name, None, None).await?;
    let proxied = client_from(&env.kubeconfig(&token.secret).await?).await?;
    let direct = test_support::cluster::kube_client().await?;

    eprintln!("small GET …");
    let small = format!("/api/v1/namespaces/{}/configmaps/small", ns.name);
    ns.api::<ConfigMap>()
        .create(
            &PostParams::default(),
            &serde_json::from_value(e2e::k8s_proxy::config_map("small", &[("k", "v")]))?,
        )
        .await?;
    let (direct_p50, direct_p99) = latencies(&direct, &small).await?;
    let (proxy_p50, proxy_p99) = latencies(&proxied, &small).await?;

    eprintln!("LIST of {LIST_SIZE} ConfigMaps …");
    let list_ns = TestNamespace::create("bench-proxy-list").await?;
    create_config_maps(&list_ns, LIST_SIZE).await?;
    let list_path = format!("/api/v1/namespaces/{}/configmaps", list_ns.name);
    // The CI token's `default_namespace` does not restrict access_as agent; the same agent reads both.
    let (direct_list, list_bytes) = list_median(&direct, &list_path).await?;
    let (proxy_list, _) = list_median(&proxied, &list_path).await?;

    eprintln!("{WATCHES} watches …");
    let w = watches(&proxied, &ns, env.kas.pid(), agentk.pid()).await?;

    eprintln!("100 MiB log stream …");
    create_running_pod(&ns.client, &ns.name, "big-log").await?;
    let dir = tempfile::tempdir()?;
    let log = PodLogFile::create(&dir.path().join("big.log"))?;
    let payload = "y".repeat(1000);
    let per_line = cri_line(&payload).len();
    let lines: Vec<&str> = std::iter::repeat_n(payload.as_str(), STREAM_BYTES / per_line).collect();
    for chunk in lines.chunks(10_000) {
        log.append_all(chunk.iter().copied())?;
    }
    set_pod_logs(&ns.client, &ns.name, "big-log", &log.path).await?;
    let log_path = format!("/api/v1/namespaces/{}/pods/big-log/log", ns.name);
    // kwok learns of the Logs object through an informer.
    let started = Instant::now();
    while direct
        .request_text(get(&format!("{log_path}?limitBytes=10"))?)
        .await
        .is_err()
    {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(20),
            "kwok never served the log"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (direct_rate, direct_bytes) = stream_rate(&direct, &log_path).await?;
    let (proxy_rate, proxy_bytes) = stream_rate(&proxied, &log_path).await?;
    anyhow::ensure!(
        direct_bytes == proxy_bytes,
        "the proxied stream had {proxy_bytes} bytes, the direct one {direct_bytes}"
    );

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mb = |rate: f64| rate / 1_000_000.0;
    println!(
        "== bench-proxy: same apiserver, same run; proxied = kas + agentk (release, grpc://, loopback) =="
    );
    println!(
        "small GET p50: direct {:>7.3} ms, proxied {:>7.3} ms, added {:>7.3} ms (target <= 2 ms)",
        ms(direct_p50),
        ms(proxy_p50),
        ms(proxy_p50) - ms(direct_p50)
    );
    println!(
        "small GET p99: direct {:>7.3} ms, proxied {:>7.3} ms, added {:>7.3} ms",
        ms(direct_p99),
        ms(proxy_p99),
        ms(proxy_p99) - ms(direct_p99)
    );
    println!(
        "LIST of {LIST_SIZE} ConfigMaps ({:.1} MB) median: direct {:>7.2} ms, proxied {:>7.2} ms, ratio {:.2}x (target <= 1.3x)",
        list_bytes as f64 / 1e6,
        ms(direct_list),
        ms(proxy_list),
        proxy_list.as_secs_f64() / direct_list.as_secs_f64()
    );
    println!(
        "{WATCHES} concurrent watches through one agent: kas {:.1} KiB/watch, agentk {:.1} KiB/watch (RSS growth); one event reached all in {:.0} ms",
        w.kas_kib_per_watch,
        w.agentk_kib_per_watch,
        ms(w.event_to_all)
    );
    println!(
        "log stream of {:.0} MiB: direct {:>7.1} MB/s, proxied {:>7.1} MB/s, ratio {:.2}",
        direct_bytes as f64 / (1024.0 * 1024.0),
        mb(direct_rate),
        mb(proxy_rate),
        proxy_rate / direct_rate
    );
    drop(agentk);
    list_ns.delete().await?;
    ns.delete().await?;
    gitea.delete_repository(&project).await?;
    env.cleanup().await?;
    Ok(())
}
