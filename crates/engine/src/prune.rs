//! Deleting objects that left the set, in reverse apply order, only when this inventory still owns them.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use futures::StreamExt;
use kube::Client;
use kube::api::{DeleteParams, DynamicObject, ListParams};
use kube::discovery::{ApiResource, Discovery, verbs};

use crate::apply::InventoryOptions;
use crate::error::kube_error_message;
use crate::guard::{LiveObject, blockers, is_crd, is_namespace, kept_reason, set_members_in};
use crate::inventory::{ON_REMOVE_ANNOTATION, OWNING_INVENTORY_ANNOTATION};
use crate::key::ObjectKey;
use crate::live::{Observed, poll_live};
use crate::order::kind_rank;
use crate::result::{ObjectResult, Outcome};

/// How often pruned objects are read while waiting for them to be gone.
const POLL: Duration = Duration::from_millis(200);
/// Page size when listing what still uses a Namespace or CRD.
const IN_USE_PAGE: u32 = 250;
/// Kinds listed at once when looking into a Namespace.
const LIST_CONCURRENCY: usize = 8;

pub(crate) struct Pruned {
    /// One result per object deleted (or, in a dry run, that would be) or that failed to delete.
    pub results: Vec<ObjectResult>,
    /// Objects still in the cluster and still ours (deletion failed, or dry run): kept in the inventory.
    pub still_owned: Vec<ObjectKey>,
}

/// Deletes `gone` (objects in the inventory but no longer in the set). Objects another inventory took
/// over, objects annotated `cli-utils.sigs.k8s.io/on-remove: keep`, objects already deleted and kinds no
/// longer served are dropped from the inventory without a delete. A Namespace or CRD still in use (see
/// [`still_in_use`]) is kept: reported as such and left in the inventory, so a later sync prunes it once
/// it is unused.
pub(crate) async fn prune(
    client: &Client,
    discovery: &Discovery,
    mut gone: Vec<ObjectKey>,
    in_set: &BTreeSet<ObjectKey>,
    inventory: &InventoryOptions,
    dry_run: bool,
) -> Pruned {
    let inventory_id = inventory.location.id();
    let inventory_id = inventory_id.as_str();
    let propagation = inventory.prune_propagation_policy.clone();
    let timeout = inventory.prune_timeout;
    // Deleted (or, in a dry run, to be deleted) by this prune: they do not keep anything in use.
    let mut going: HashSet<ObjectKey> = HashSet::new();
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
        let annotations = current.metadata.annotations.clone().unwrap_or_default();
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
        if let Some(reason) = still_in_use(client, &key, &current, in_set, &going, inventory).await
        {
            tracing::info!(resource_key = %key, %reason, "not pruning");
            pruned.results.push(result(Outcome::Kept(reason)));
            pruned.still_owned.push(key.clone());
            continue;
        }
        let params = DeleteParams {
            dry_run,
            propagation_policy: Some(propagation.clone()),
            ..Default::default()
        };
        match api.delete(&key.name, &params).await {
            Ok(_) => {
                going.insert(key.clone());
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

/// Why deleting `key` would destroy what is still in use, or `None`. A Namespace is in use while objects
/// of the set live in it, and (unless `keep_namespaces_with_other_objects` is off) while it holds objects
/// this prune does not delete; a CRD while custom resources of it exist that this prune does not delete
/// (deleting a CRD deletes every one of them, whoever manages it). What cannot be checked is kept too.
async fn still_in_use(
    client: &Client,
    key: &ObjectKey,
    current: &DynamicObject,
    in_set: &BTreeSet<ObjectKey>,
    going: &HashSet<ObjectKey>,
    inventory: &InventoryOptions,
) -> Option<String> {
    let live = if is_namespace(key) {
        if let Some(reason) = kept_reason(&set_members_in(&key.name, in_set)) {
            return Some(reason);
        }
        if !inventory.keep_namespaces_with_other_objects {
            return None;
        }
        namespace_contents(client, &key.name).await
    } else if is_crd(key) {
        custom_resources(client, current).await
    } else {
        return None;
    };
    match live {
        Ok(live) => kept_reason(&blockers(&live, going)),
        Err(reason) => Some(format!(
            "kept: cannot tell whether it is still in use: {reason}"
        )),
    }
}

/// Every object in `namespace`, of every namespaced kind the cluster lists.
async fn namespace_contents(client: &Client, namespace: &str) -> Result<Vec<LiveObject>, String> {
    let discovery = match Discovery::new(client.clone()).run_aggregated().await {
        Ok(discovery) => discovery,
        Err(_) => Discovery::new(client.clone())
            .run()
            .await
            .map_err(|e| format!("discovery failed: {e}"))?,
    };
    let resources: Vec<ApiResource> = discovery
        .groups()
        .flat_map(|group| group.recommended_resources())
        .filter(|(_, caps)| {
            caps.scope == kube::discovery::Scope::Namespaced && caps.supports_operation(verbs::LIST)
        })
        .map(|(resource, _)| resource)
        .collect();
    // Owned items and an `async move` block: a closure over `&ApiResource` makes the future's type
    // higher-ranked, which callers holding it in a `Send` box (agentk) cannot name.
    let listed: Vec<Result<Vec<LiveObject>, String>> = futures::stream::iter(resources)
        .map(|resource| async move { list_all(client, &resource, Some(namespace)).await })
        .buffer_unordered(LIST_CONCURRENCY)
        .collect()
        .await;
    let mut live = Vec::new();
    for objects in listed {
        live.extend(objects?);
    }
    Ok(live)
}

/// Every custom resource of the CRD `crd`, in all namespaces.
async fn custom_resources(client: &Client, crd: &DynamicObject) -> Result<Vec<LiveObject>, String> {
    let spec = &crd.data["spec"];
    let served = spec["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["served"] == true)
        .and_then(|v| v["name"].as_str());
    let (Some(group), Some(kind), Some(plural), Some(version)) = (
        spec["group"].as_str(),
        spec["names"]["kind"].as_str(),
        spec["names"]["plural"].as_str(),
        served,
    ) else {
        // Serves nothing: there can be no custom resources to lose.
        return Ok(Vec::new());
    };
    let resource = ApiResource {
        group: group.to_string(),
        version: version.to_string(),
        api_version: format!("{group}/{version}"),
        kind: kind.to_string(),
        plural: plural.to_string(),
    };
    list_all(client, &resource, None).await
}

/// All objects of `resource` (in `namespace`, or everywhere), as the prune guards see them.
async fn list_all(
    client: &Client,
    resource: &ApiResource,
    namespace: Option<&str>,
) -> Result<Vec<LiveObject>, String> {
    let api = match namespace {
        Some(ns) => kube::Api::<DynamicObject>::namespaced_with(client.clone(), ns, resource),
        None => kube::Api::<DynamicObject>::all_with(client.clone(), resource),
    };
    let mut params = ListParams::default().limit(IN_USE_PAGE);
    let mut live = Vec::new();
    loop {
        let page = match api.list(&params).await {
            // A kind that discovery listed but the apiserver no longer serves (another CRD deleted in the
            // meantime) holds nothing here; anything else leaves the question open, and the caller keeps.
            Err(kube::Error::Api(status)) if status.code == 404 && live.is_empty() => {
                return Ok(live);
            }
            page => page,
        };
        let page = page.map_err(|e| {
            format!(
                "listing {} failed: {}",
                resource.plural,
                kube_error_message(&e)
            )
        })?;
        for object in page.items {
            let meta = object.metadata;
            live.push(LiveObject {
                key: ObjectKey {
                    group: resource.group.clone(),
                    kind: resource.kind.clone(),
                    namespace: meta.namespace,
                    name: meta.name.unwrap_or_default(),
                },
                terminating: meta.deletion_timestamp.is_some(),
                owned_by_object: meta.owner_references.is_some_and(|o| !o.is_empty()),
            });
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(live),
        }
    }
}
