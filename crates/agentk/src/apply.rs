//! The [`Applier`] agentk runs with: the apply engine against the cluster agentk runs in, with an inventory
//! per (agent, manifest project) in the agent's namespace.

use std::pin::Pin;

use gitops_config::agent::{
    DryRunStrategy, InventoryPolicy, ManifestProject, PrunePropagationPolicy,
};
use gitops_engine::{
    ApplyOptions, InventoryOptions, InventoryRef, ManifestFile, PropagationPolicy, decode_files,
};
use sha2::{Digest, Sha256};
use tracing::info;

use crate::gitops::{Applier, ManifestSnapshot, ObjectOutcome, SyncOutcome};

/// Applies with the engine as `agentk`.
pub struct EngineApplier {
    pub client: kube::Client,
    /// Where inventories live: the agent's own namespace.
    pub inventory_namespace: String,
    /// Distinguishes the inventories of agents sharing a cluster (the agent's name or id).
    pub agent: String,
    /// For log lines: the API server URL.
    pub cluster_url: String,
}

/// A ConfigMap name unique per (agent, project), readable, and within the 253-character limit.
pub fn inventory_name(agent: &str, project: &str) -> String {
    let readable: String = format!("{agent}-{project}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(200)
        .collect();
    let digest = hex::encode(&Sha256::digest(format!("{agent}\n{project}").as_bytes())[..6]);
    format!("agentk-inventory-{}-{digest}", readable.trim_matches('-'))
}

fn options(applier: &EngineApplier, project: &ManifestProject) -> ApplyOptions {
    let mut inventory = InventoryOptions::new(InventoryRef {
        namespace: applier.inventory_namespace.clone(),
        name: inventory_name(&applier.agent, &project.id),
    });
    inventory.policy = match project.inventory_policy {
        InventoryPolicy::MustMatch => gitops_engine::InventoryPolicy::MustMatch,
        InventoryPolicy::AdoptIfNoInventory => gitops_engine::InventoryPolicy::AdoptIfNoInventory,
        InventoryPolicy::AdoptAll => gitops_engine::InventoryPolicy::AdoptAll,
    };
    inventory.prune = project.prune;
    inventory.prune_timeout = Some(project.prune_timeout);
    inventory.prune_propagation_policy = match project.prune_propagation_policy {
        PrunePropagationPolicy::Orphan => PropagationPolicy::Orphan,
        PrunePropagationPolicy::Background => PropagationPolicy::Background,
        PrunePropagationPolicy::Foreground => PropagationPolicy::Foreground,
    };
    ApplyOptions {
        default_namespace: project.default_namespace.clone(),
        field_manager: "agentk".into(),
        dry_run: match project.dry_run_strategy {
            DryRunStrategy::None => gitops_engine::DryRunStrategy::None,
            DryRunStrategy::Client => gitops_engine::DryRunStrategy::Client,
            DryRunStrategy::Server => gitops_engine::DryRunStrategy::Server,
        },
        inventory: Some(inventory),
    }
}

impl Applier for EngineApplier {
    fn apply<'a>(
        &'a self,
        project: &'a ManifestProject,
        snapshot: &'a ManifestSnapshot,
    ) -> Pin<Box<dyn std::future::Future<Output = SyncOutcome> + Send + 'a>> {
        Box::pin(async move {
            let files: Vec<ManifestFile> = snapshot
                .files
                .iter()
                .map(|(p, d)| ManifestFile::new(p.clone(), d.clone()))
                .collect();
            // The seed's log line per object, before it is applied.
            for object in decode_files(&files).into_iter().flatten() {
                let meta = &object.object.metadata;
                let kind = object.object.types.as_ref().map_or("", |t| t.kind.as_str());
                info!(
                    "Applying resource {kind}/{} in cluster: {}, namespace: {}",
                    meta.name.as_deref().unwrap_or(""),
                    self.cluster_url,
                    meta.namespace
                        .as_deref()
                        .unwrap_or(&project.default_namespace)
                );
            }
            let report =
                match gitops_engine::apply(&self.client, &files, &options(self, project)).await {
                    Ok(report) => report,
                    Err(e) => {
                        return SyncOutcome {
                            objects: Vec::new(),
                            error: Some(e.to_string()),
                        };
                    }
                };
            let mut objects: Vec<ObjectOutcome> = report
                .results
                .iter()
                .map(|r| ObjectOutcome {
                    resource_key: r.resource_key(),
                    source: r
                        .origin
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                    result: r.outcome.verb().to_owned(),
                    sync_result: r.sync_result(),
                    health: String::new(),
                    message: r.message().unwrap_or_default().to_owned(),
                })
                .collect();
            if project.dry_run_strategy == DryRunStrategy::None {
                wait_for_readiness(
                    &self.client,
                    &files,
                    &report,
                    &mut objects,
                    project.reconcile_timeout,
                )
                .await;
            }
            SyncOutcome {
                objects,
                error: None,
            }
        })
    }
}

/// How often readiness is checked while waiting.
const READINESS_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// The API of each successfully applied object (by the manifests' apiVersion and discovery), in result order.
async fn object_apis(
    client: &kube::Client,
    files: &[ManifestFile],
    report: &gitops_engine::SyncReport,
) -> Vec<Option<kube::Api<kube::api::DynamicObject>>> {
    use kube::{
        api::{Api, ApiResource},
        core::GroupVersionKind,
    };
    // The engine's keys carry group and kind only; the version comes from the manifests.
    let versions: std::collections::HashMap<(String, String, String), String> = decode_files(files)
        .into_iter()
        .flatten()
        .filter_map(|d| {
            let types = d.object.types.as_ref()?;
            let (group, version) = types
                .api_version
                .rsplit_once('/')
                .unwrap_or(("", types.api_version.as_str()));
            Some((
                (
                    group.to_owned(),
                    types.kind.clone(),
                    d.object.metadata.name.clone()?,
                ),
                version.to_owned(),
            ))
        })
        .collect();
    let mut resources: std::collections::HashMap<GroupVersionKind, Option<ApiResource>> =
        Default::default();
    let mut apis = Vec::with_capacity(report.results.len());
    for result in &report.results {
        let Some(key) = result.key.as_ref().filter(|_| result.outcome.is_success()) else {
            apis.push(None);
            continue;
        };
        let Some(version) = versions.get(&(key.group.clone(), key.kind.clone(), key.name.clone()))
        else {
            apis.push(None);
            continue;
        };
        let gvk = GroupVersionKind::gvk(&key.group, version, &key.kind);
        if !resources.contains_key(&gvk) {
            let found = kube::discovery::pinned_kind(client, &gvk)
                .await
                .ok()
                .map(|(resource, _)| resource);
            resources.insert(gvk.clone(), found);
        }
        apis.push(
            resources[&gvk]
                .as_ref()
                .map(|resource| match &key.namespace {
                    Some(ns) => Api::namespaced_with(client.clone(), ns, resource),
                    None => Api::all_with(client.clone(), resource),
                }),
        );
    }
    apis
}

/// Waits (up to `timeout`) until every applied object is Current or Failed by kstatus' rules, recording each
/// object's health. A sync whose objects never become ready is still a sync: their health says why.
async fn wait_for_readiness(
    client: &kube::Client,
    files: &[ManifestFile],
    report: &gitops_engine::SyncReport,
    objects: &mut [ObjectOutcome],
    timeout: std::time::Duration,
) {
    let apis = object_apis(client, files, report).await;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut pending = 0;
        for ((result, outcome), api) in report.results.iter().zip(objects.iter_mut()).zip(&apis) {
            let (Some(api), Some(key)) = (api, &result.key) else {
                continue;
            };
            if matches!(outcome.health.as_str(), "Current" | "Failed") {
                continue;
            }
            let status = match api.get_opt(&key.name).await {
                Ok(Some(object)) => match serde_json::to_value(&object) {
                    Ok(value) => gitops_kstatus::compute(&value),
                    Err(_) => continue,
                },
                Ok(None) => {
                    outcome.health = "NotFound".into();
                    pending += 1;
                    continue;
                }
                Err(_) => {
                    outcome.health = "Unknown".into();
                    pending += 1;
                    continue;
                }
            };
            outcome.health = status.status.as_str().to_owned();
            let settled = matches!(
                status.status,
                gitops_kstatus::Status::Current | gitops_kstatus::Status::Failed
            );
            if !settled {
                pending += 1;
            }
            if outcome.message.is_empty() || outcome.message.starts_with("health: ") {
                outcome.message = if status.status == gitops_kstatus::Status::Current {
                    String::new()
                } else {
                    format!("health: {}", status.message)
                };
            }
        }
        if pending == 0 {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            info!(pending, "reconcile_timeout reached with objects not ready");
            return;
        }
        tokio::time::sleep(READINESS_POLL.min(deadline - tokio::time::Instant::now())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inventory_names_are_valid_and_distinct() {
        let a = inventory_name("gitops", "group/manifests");
        let b = inventory_name("gitops", "group-manifests");
        assert_ne!(a, b, "distinct projects that sanitize alike still differ");
        assert!(
            a.starts_with("agentk-inventory-gitops-group-manifests-"),
            "{a}"
        );
        let long = inventory_name("gitops", &"x/".repeat(300));
        assert!(
            long.len() <= 253
                && long
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        );
    }
}
