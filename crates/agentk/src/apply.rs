//! The [`Applier`] agentk runs with: the apply engine against the cluster agentk runs in, with an inventory
//! per (agent, manifest project) in the agent's namespace, and kstatus readiness.

use std::collections::HashMap;
use std::sync::Arc;

use gitops_config::agent::{
    DryRunStrategy, InventoryPolicy, ManifestProject, PrunePropagationPolicy,
};
use gitops_engine::{
    AppliedForms, ApplyOptions, Health, InventoryOptions, InventoryRef, ObjectKey, Observed,
    PropagationPolicy, apply_decoded, decode_files, poll_live,
};
use gitops_kstatus::Status;
use sha2::{Digest, Sha256};
use tracing::{debug, info};

use crate::{
    events::EventRecorder,
    gitops::{Applier, BoxFuture, ObjectOutcome, SyncOutcome, SyncRequest},
};

/// Applies with the engine as `agentk`.
pub struct EngineApplier {
    client: kube::Client,
    /// Where inventories live: the agent's own namespace.
    inventory_namespace: String,
    /// For log lines: the API server URL.
    cluster_url: String,
    /// Per manifest project, what the apiserver made of our applies (see [`AppliedForms`]).
    applied_forms: std::sync::Mutex<HashMap<String, Arc<AppliedForms>>>,
    /// Kubernetes Events for failures, prunes and drift corrections; none when `None`.
    events: Option<EventRecorder>,
}

impl EngineApplier {
    /// Applies through `client`, keeping inventories in `inventory_namespace`; `cluster_url` is for logs.
    pub fn new(client: kube::Client, inventory_namespace: String, cluster_url: String) -> Self {
        Self {
            client,
            inventory_namespace,
            cluster_url,
            applied_forms: Default::default(),
            events: None,
        }
    }

    /// Records Kubernetes Events for what each sync did through `events`.
    pub fn with_events(mut self, events: EventRecorder) -> Self {
        self.events = Some(events);
        self
    }

    fn record_events(
        &self,
        project: &ManifestProject,
        snapshot: &crate::gitops::ManifestSnapshot,
        outcome: &SyncOutcome,
        drift_check: bool,
    ) {
        // A dry run changed nothing: nothing to tell.
        if project.dry_run_strategy != DryRunStrategy::None {
            return;
        }
        if let Some(events) = &self.events {
            events.sync(&project.id, &snapshot.commit_id, outcome, drift_check);
        }
    }

    fn applied_forms(&self, project: &str) -> Arc<AppliedForms> {
        let mut forms = self
            .applied_forms
            .lock()
            .expect("applied forms lock poisoned");
        forms.entry(project.to_owned()).or_default().clone()
    }
}

/// A ConfigMap name unique per (agent, project), readable, and within the 253-character limit. The agent
/// id keeps two agents syncing one project into one namespace from taking each other's objects.
pub fn inventory_name(agent_id: i64, project: &str) -> String {
    let readable: String = project
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
    let digest = hex::encode(&Sha256::digest(project.as_bytes())[..6]);
    format!(
        "agentk-inventory-{agent_id}-{}-{digest}",
        readable.trim_matches('-')
    )
}

fn options(applier: &EngineApplier, agent_id: i64, project: &ManifestProject) -> ApplyOptions {
    let mut inventory = InventoryOptions::new(InventoryRef {
        namespace: applier.inventory_namespace.clone(),
        name: inventory_name(agent_id, &project.id),
    });
    inventory.policy = match project.inventory_policy {
        InventoryPolicy::MustMatch => gitops_engine::InventoryPolicy::MustMatch,
        InventoryPolicy::AdoptIfNoInventory => gitops_engine::InventoryPolicy::AdoptIfNoInventory,
        InventoryPolicy::AdoptAll => gitops_engine::InventoryPolicy::AdoptAll,
    };
    inventory.prune = project.prune;
    inventory.allow_empty = project.allow_empty;
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
        dependency_timeout: project.reconcile_timeout,
        applied_forms: Some(applier.applied_forms(&project.id)),
    }
}

/// Records `health` on an object's outcome; the message explains anything but Current (a failure's own
/// message is kept).
fn set_health(outcome: &mut ObjectOutcome, health: &Health) {
    outcome.health = Some(health.status);
    if outcome.message.is_empty() || outcome.message.starts_with("health: ") {
        outcome.message = if health.status == gitops_kstatus::Status::Current {
            String::new()
        } else {
            format!("health: {}", health.message)
        };
    }
}

impl Applier for EngineApplier {
    fn apply<'a>(&'a self, request: SyncRequest<'a>) -> BoxFuture<'a, SyncOutcome> {
        Box::pin(async move {
            let SyncRequest {
                agent_id,
                project,
                snapshot,
                recheck,
                drift_check,
            } = request;
            let documents = decode_files(&snapshot.files);
            // The seed's log line per object, before it is applied; a periodic re-check of a commit
            // already applied logs it only at debug level (it usually writes nothing).
            for object in documents.iter().flatten() {
                let meta = &object.object.metadata;
                let kind = object.object.types.as_ref().map_or("", |t| t.kind.as_str());
                let name = meta.name.as_deref().unwrap_or("");
                let namespace = meta
                    .namespace
                    .as_deref()
                    .unwrap_or(&project.default_namespace);
                if recheck {
                    debug!(
                        "Applying resource {kind}/{name} in cluster: {}, namespace: {namespace}",
                        self.cluster_url
                    );
                } else {
                    info!(
                        "Applying resource {kind}/{name} in cluster: {}, namespace: {namespace}",
                        self.cluster_url
                    );
                }
            }
            let options = options(self, agent_id, project);
            let report = match apply_decoded(&self.client, documents, &options).await {
                Ok(report) => report,
                Err(e) => {
                    let outcome = SyncOutcome {
                        objects: Vec::new(),
                        error: Some(e.to_string()),
                    };
                    self.record_events(project, snapshot, &outcome, drift_check);
                    return outcome;
                }
            };
            let objects = report
                .results
                .into_iter()
                .map(|r| {
                    let mut outcome = ObjectOutcome {
                        resource_key: r.resource_key(),
                        source: r
                            .origin
                            .as_ref()
                            .map(ToString::to_string)
                            .unwrap_or_default(),
                        sync_result: r.sync_result(),
                        health: None,
                        message: r.message().unwrap_or_default().to_owned(),
                        resource: r.resource.clone(),
                        key: r.key,
                        result: r.outcome,
                    };
                    if let Some(health) = &r.health {
                        set_health(&mut outcome, health);
                    }
                    outcome
                })
                .collect();
            let outcome = SyncOutcome {
                objects,
                error: None,
            };
            self.record_events(project, snapshot, &outcome, drift_check);
            outcome
        })
    }

    fn wait_for_readiness<'a>(
        &'a self,
        project: &'a ManifestProject,
        outcome: &'a mut SyncOutcome,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if project.dry_run_strategy == DryRunStrategy::None {
                wait_for_readiness(&self.client, outcome, project.reconcile_timeout).await;
            }
        })
    }
}

/// How often readiness is checked while waiting.
const READINESS_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Waits (up to `timeout`) until every applied object is Current or Failed by kstatus' rules, recording each
/// object's health. Objects the apply already found settled (a ConfigMap is Current at once) are not read
/// again; the others are read in bulk ([`poll_live`]), first after one poll period. A sync whose objects
/// never become ready is still a sync: their health says why.
async fn wait_for_readiness(
    client: &kube::Client,
    outcome: &mut SyncOutcome,
    timeout: std::time::Duration,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    let pending: Vec<(usize, ObjectKey)> = outcome
        .objects
        .iter()
        .enumerate()
        .filter(|(_, o)| {
            o.resource.is_some()
                && o.result.is_success()
                && !matches!(o.health, Some(Status::Current | Status::Failed))
        })
        .filter_map(|(i, o)| Some((i, o.key.clone()?)))
        .collect();
    if pending.is_empty() {
        return;
    }
    let settled =
        |observed: &Observed| matches!(observed, Observed::Present(health) if health.is_settled());
    let now = tokio::time::Instant::now();
    let unsettled = if now < deadline {
        tokio::time::sleep(READINESS_POLL.min(deadline - now)).await;
        let wanted: Vec<_> = pending
            .iter()
            .filter_map(|(i, key)| Some((outcome.objects[*i].resource.as_ref()?, key)))
            .collect();
        let seen = poll_live(client, &wanted, READINESS_POLL, deadline, |_, o| settled(o)).await;
        for ((i, _), observed) in pending.iter().zip(&seen) {
            let object = &mut outcome.objects[*i];
            match observed {
                Observed::Present(health) => set_health(object, health),
                Observed::NotFound => object.health = Some(Status::NotFound),
                Observed::Unreadable(_) => object.health = Some(Status::Unknown),
            }
        }
        seen.iter().filter(|o| !settled(o)).count()
    } else {
        pending.len()
    };
    if unsettled > 0 {
        info!(
            pending = unsettled,
            "reconcile_timeout reached with objects not ready"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inventory_names_are_valid_and_distinct() {
        let a = inventory_name(7, "group/manifests");
        let b = inventory_name(7, "group-manifests");
        assert_ne!(a, b, "distinct projects that sanitize alike still differ");
        assert_ne!(a, inventory_name(8, "group/manifests"), "per agent");
        assert!(a.starts_with("agentk-inventory-7-group-manifests-"), "{a}");
        let long = inventory_name(i64::MAX, &"x/".repeat(300));
        assert!(
            long.len() <= 253
                && long
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        );
    }
}
