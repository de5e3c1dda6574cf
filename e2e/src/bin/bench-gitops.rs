//! Apply benchmark: the engine against `kubectl apply --server-side`, same files, same apiserver, same run.
//! 1,000 ConfigMaps and 100 Deployments into empty namespaces; then the unchanged re-sync.
//!
//! Run: `cargo xtask bench gitops` (starts the local cluster, builds release, prints the figures last).

use std::{path::Path, process::Command, time::Instant};

use anyhow::Context;
use gitops_engine::{ApplyOptions, InventoryOptions, InventoryRef, ManifestFile, apply};
use test_support::{cluster::TestNamespace, env::test_env};

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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    test_support::cluster::install_crypto_provider();
    let files = manifests();
    let objects = 1100;

    let baseline_ns = TestNamespace::create("bench-kubectl").await?;
    let dir = tempfile::tempdir()?;
    for file in &files {
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
    let first = apply(&ns.client, &files, &options).await?;
    let engine_create = started.elapsed();
    anyhow::ensure!(
        first.count("created") == objects,
        "created {} of {objects}: {:?}",
        first.count("created"),
        first.results.iter().find(|r| !r.outcome.is_success())
    );
    let started = Instant::now();
    let second = apply(&ns.client, &files, &options).await?;
    let engine_resync = started.elapsed();
    let changed = second.count("created") + second.count("configured") + second.count("pruned");

    baseline_ns.delete().await?;
    ns.delete().await?;

    println!(
        "== bench-gitops: {objects} objects (1,000 ConfigMaps, 100 Deployments), same apiserver, same run =="
    );
    println!(
        "kubectl apply --server-side, create:  {:>7.2} s",
        kubectl_create.as_secs_f64()
    );
    println!(
        "engine (agentk), create:              {:>7.2} s",
        engine_create.as_secs_f64()
    );
    println!(
        "ratio engine/kubectl, create:         {:>7.2}x (target <= 0.5x)",
        engine_create.as_secs_f64() / kubectl_create.as_secs_f64()
    );
    println!(
        "kubectl apply --server-side, re-sync: {:>7.2} s",
        kubectl_resync.as_secs_f64()
    );
    println!(
        "engine (agentk), unchanged re-sync:   {:>7.2} s",
        engine_resync.as_secs_f64()
    );
    println!(
        "ratio engine/kubectl, re-sync:        {:>7.2}x",
        engine_resync.as_secs_f64() / kubectl_resync.as_secs_f64()
    );
    println!("objects changed by the unchanged re-sync: {changed} (target 0)");
    Ok(())
}
