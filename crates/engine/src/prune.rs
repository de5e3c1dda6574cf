//! Deleting objects that left the set, in reverse apply order, only when this inventory still owns them.

use std::time::Duration;

use kube::Client;
use kube::api::{DeleteParams, PropagationPolicy};
use kube::discovery::{ApiResource, Discovery};

use crate::error::kube_error_message;
use crate::inventory::{ON_REMOVE_ANNOTATION, OWNING_INVENTORY_ANNOTATION};
use crate::key::ObjectKey;
use crate::live::{Observed, poll_live};
use crate::order::kind_rank;
use crate::result::{ObjectResult, Outcome};

/// How often pruned objects are read while waiting for them to be gone.
const POLL: Duration = Duration::from_millis(200);

pub(crate) struct Pruned {
    /// One result per object deleted (or, in a dry run, that would be) or that failed to delete.
    pub results: Vec<ObjectResult>,
    /// Objects still in the cluster and still ours (deletion failed, or dry run): kept in the inventory.
    pub still_owned: Vec<ObjectKey>,
}

/// Deletes `gone` (objects in the inventory but no longer in the set). Objects another inventory took
/// over, objects annotated `cli-utils.sigs.k8s.io/on-remove: keep`, objects already deleted and kinds no
/// longer served are dropped from the inventory without a delete.
pub(crate) async fn prune(
    client: &Client,
    discovery: &Discovery,
    mut gone: Vec<ObjectKey>,
    inventory_id: &str,
    propagation: PropagationPolicy,
    timeout: Option<Duration>,
    dry_run: bool,
) -> Pruned {
    // Reverse of the apply order: custom resources before their CRD, a Namespace after its objects.
    gone.sort_by(|a, b| {
        kind_rank(&b.kind)
            .cmp(&kind_rank(&a.kind))
            .then_with(|| a.cmp(b))
    });
    let mut pruned = Pruned {
        results: Vec::new(),
        still_owned: Vec::new(),
    };
    // Deleted objects (their result's index) and their APIs, to wait for when there is a timeout.
    let mut deleted: Vec<(usize, ApiResource)> = Vec::new();
    for key in gone {
        let Some((resource, _)) = discovery
            .get(&key.group)
            .and_then(|g| g.recommended_kind(&key.kind))
        else {
            tracing::debug!(resource_key = %key, "not pruning: kind no longer served");
            continue;
        };
        let api = crate::live::api(client, &resource, key.namespace.as_deref());
        let result = |outcome| ObjectResult {
            key: Some(key.clone()),
            origin: None,
            outcome,
            dry_run,
            resource: Some(resource.clone()),
            health: None,
        };
        let current = match api.get_opt(&key.name).await {
            Ok(Some(current)) => current,
            Ok(None) => continue,
            Err(e) => {
                pruned
                    .results
                    .push(result(Outcome::Failed(kube_error_message(&e))));
                pruned.still_owned.push(key.clone());
                continue;
            }
        };
        let annotations = current.metadata.annotations.unwrap_or_default();
        if annotations
            .get(OWNING_INVENTORY_ANNOTATION)
            .map(String::as_str)
            != Some(inventory_id)
        {
            tracing::info!(resource_key = %key, "not pruning: owned by another inventory now");
            continue;
        }
        if annotations.get(ON_REMOVE_ANNOTATION).map(String::as_str) == Some("keep") {
            tracing::info!(resource_key = %key, "not pruning: annotated {ON_REMOVE_ANNOTATION}: keep");
            continue;
        }
        let params = DeleteParams {
            dry_run,
            propagation_policy: Some(propagation.clone()),
            ..Default::default()
        };
        match api.delete(&key.name, &params).await {
            Ok(_) => {
                if dry_run {
                    pruned.still_owned.push(key.clone());
                } else {
                    deleted.push((pruned.results.len(), resource.clone()));
                }
                pruned.results.push(result(Outcome::Pruned));
            }
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => {
                pruned.results.push(result(Outcome::Failed(format!(
                    "prune: {}",
                    kube_error_message(&e)
                ))));
                pruned.still_owned.push(key.clone());
            }
        }
    }
    if let Some(timeout) = timeout {
        wait_until_gone(client, &mut pruned, deleted, timeout).await;
    }
    pruned
}

/// `prune_timeout`: waits for deleted objects (finalizers, foreground propagation) to be gone. One still
/// there at the deadline becomes a failure and stays in the inventory, so the next sync looks again.
async fn wait_until_gone(
    client: &Client,
    pruned: &mut Pruned,
    deleted: Vec<(usize, ApiResource)>,
    timeout: Duration,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    let objects: Vec<(&ApiResource, &ObjectKey)> = deleted
        .iter()
        .map(|(index, resource)| {
            let key = pruned.results[*index].key.as_ref();
            (resource, key.expect("pruned results have keys"))
        })
        .collect();
    // A failed read is treated as not gone yet; the deadline bounds it.
    let seen = poll_live(client, &objects, POLL, deadline, |_, observed| {
        *observed == Observed::NotFound
    })
    .await;
    for ((index, _), observed) in deleted.iter().zip(seen) {
        if observed != Observed::NotFound {
            let result = &mut pruned.results[*index];
            result.outcome = Outcome::Failed(format!(
                "prune: still present after prune_timeout ({timeout:?})"
            ));
            pruned.still_owned.extend(result.key.clone());
        }
    }
}
