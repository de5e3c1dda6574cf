//! Resolve kinds by discovery, order, and server-side apply each object.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::FieldsV1;
use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PropagationPolicy};
use kube::core::GroupVersionKind;
use kube::discovery::{ApiResource, Discovery, Scope};
use serde_json::Value;

use crate::decode::{DecodedObject, ManifestFile, ObjectOrigin, decode_files};
use crate::error::{EngineError, kube_error_message};
use crate::inventory::{InventoryPolicy, InventoryRef, OWNING_INVENTORY_ANNOTATION};
use crate::key::{ObjectKey, split_api_version};
use crate::order::order;
use crate::prune::prune;
use crate::result::{ObjectResult, Outcome, SyncReport};

const CRD_GROUP: &str = "apiextensions.k8s.io";
const CRD_KIND: &str = "CustomResourceDefinition";
/// How long a CRD applied in this sync may take to be established before its custom resources fail.
const CRD_ESTABLISH_TIMEOUT: Duration = Duration::from_secs(30);
/// Applies in flight at once within a batch: enough to hide the round trip, few enough for the
/// apiserver's default max-in-flight and the client's connection pool.
const APPLY_CONCURRENCY: usize = 16;
/// Objects in one batch, so a huge batch's results are not all held back by its slowest apply.
const MAX_BATCH: usize = 500;

/// `dry_run_strategy` of the agent configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DryRunStrategy {
    /// Apply for real.
    #[default]
    None,
    /// Write nothing and ask the apiserver nothing but reads: an object is "created" when it does not
    /// exist and "configured" when it does.
    Client,
    /// Server-side apply with `dryRun=All`: the apiserver validates and admits but stores nothing.
    Server,
}

#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Set on namespaced objects that have no namespace.
    pub default_namespace: String,
    /// The server-side apply field manager.
    pub field_manager: String,
    pub dry_run: DryRunStrategy,
    /// Where to record what was applied, and whether to prune. `None`: no inventory, no pruning, no
    /// ownership checks.
    pub inventory: Option<InventoryOptions>,
}

/// The inventory of one (agent, manifest project) and what it allows.
#[derive(Debug, Clone)]
pub struct InventoryOptions {
    pub location: InventoryRef,
    /// `inventory_policy`.
    pub policy: InventoryPolicy,
    /// `prune`: delete objects that left the set. Never done when any object failed or was skipped.
    pub prune: bool,
    /// `prune_propagation_policy`.
    pub prune_propagation_policy: PropagationPolicy,
    /// `prune_timeout`: how long to wait for pruned objects to be gone (`None`: do not wait).
    pub prune_timeout: Option<Duration>,
}

impl InventoryOptions {
    /// Pruning on, `must_match`, foreground propagation: GitLab agent's defaults.
    pub fn new(location: InventoryRef) -> Self {
        Self {
            location,
            policy: InventoryPolicy::MustMatch,
            prune: true,
            prune_propagation_policy: PropagationPolicy::Foreground,
            prune_timeout: None,
        }
    }
}

impl Default for ApplyOptions {
    fn default() -> Self {
        Self {
            default_namespace: "default".into(),
            field_manager: "agentk".into(),
            dry_run: DryRunStrategy::None,
            inventory: None,
        }
    }
}

/// How an object's kind was resolved.
#[derive(Debug, Clone)]
enum Resolution {
    Served(ApiResource),
    /// Defined by a CRD in this set that the cluster does not serve yet: discovered after it is applied.
    Pending(GroupVersionKind),
    /// Neither served nor defined in the set: fails (with this message) when its turn comes.
    Unknown(String),
}

struct Resolved {
    key: ObjectKey,
    origin: ObjectOrigin,
    object: DynamicObject,
    resolution: Resolution,
}

/// Decodes, resolves, orders and applies `files` (the manifest project at one commit), then prunes and
/// records the inventory when `options.inventory` is set. Only failing to discover the cluster's API or
/// to read or write the inventory is an error; everything else is in the per-object results.
///
/// Dropping the future (to start over with a newer commit) is safe: the inventory already lists every
/// object of the set before the first apply.
pub async fn apply(
    client: &Client,
    files: &[ManifestFile],
    options: &ApplyOptions,
) -> Result<SyncReport, EngineError> {
    let mut report = SyncReport::default();
    let dry_run = options.dry_run != DryRunStrategy::None;
    let fail = |key: Option<ObjectKey>, origin: ObjectOrigin, message: String| ObjectResult {
        key,
        origin: Some(origin),
        outcome: Outcome::Failed(message),
        dry_run,
    };

    let mut decoded = Vec::new();
    for item in decode_files(files) {
        match item {
            Ok(object) => decoded.push(object),
            Err(e) => {
                let origin = e.origin().cloned().unwrap_or_else(|| ObjectOrigin {
                    path: String::new(),
                    document_index: 0,
                    list_item_index: None,
                });
                report.results.push(fail(None, origin, e.to_string()));
            }
        }
    }

    let previous_inventory = match &options.inventory {
        Some(inventory) => inventory.location.read(client).await?,
        None => BTreeSet::new(),
    };
    let mut groups: BTreeSet<String> = decoded
        .iter()
        .filter_map(|o| o.object.types.as_ref())
        .map(|t| split_api_version(&t.api_version).0.to_string())
        .chain(previous_inventory.iter().map(|k| k.group.clone()))
        .collect();
    groups.insert(CRD_GROUP.into());
    let mut discovery = discover(client, &groups).await?;
    let crd_scopes = crd_scopes(&decoded);

    // Resolve kinds, default namespaces, compute keys, drop duplicates.
    let mut resolved: Vec<Resolved> = Vec::new();
    let mut first_origin: HashMap<ObjectKey, ObjectOrigin> = HashMap::new();
    for DecodedObject { origin, mut object } in decoded {
        let types = object.types.clone().unwrap_or_default();
        let (group, version) = split_api_version(&types.api_version);
        let gvk = GroupVersionKind::gvk(group, version, &types.kind);
        let (resolution, namespaced) = match discovery.resolve_gvk(&gvk) {
            Some((resource, caps)) => (
                Resolution::Served(resource),
                caps.scope == Scope::Namespaced,
            ),
            None => {
                match crd_scopes.get(&(group.to_string(), version.to_string(), types.kind.clone()))
                {
                    Some(namespaced) => (Resolution::Pending(gvk.clone()), *namespaced),
                    // Kept in the set (not reported here) so objects depending on it are skipped.
                    None => {
                        let e = EngineError::UnknownKind {
                            origin: origin.clone(),
                            api_version: types.api_version.clone(),
                            kind: types.kind.clone(),
                        };
                        (Resolution::Unknown(e.to_string()), false)
                    }
                }
            }
        };
        let unknown = matches!(resolution, Resolution::Unknown(_));
        if unknown {
            // Scope unknown: keep the namespace as written.
        } else if namespaced {
            if object
                .metadata
                .namespace
                .as_deref()
                .is_none_or(str::is_empty)
            {
                object.metadata.namespace = Some(options.default_namespace.clone());
            }
        } else {
            // kubectl ignores a namespace on cluster-scoped objects too; keeping it would make the key wrong.
            object.metadata.namespace = None;
        }
        let key = key_of(&object, &gvk, object.metadata.namespace.clone());
        if let Some(first) = first_origin.get(&key) {
            let e = EngineError::DuplicateObject {
                origin: origin.clone(),
                first: first.clone(),
            };
            report.results.push(fail(Some(key), origin, e.to_string()));
            continue;
        }
        first_origin.insert(key.clone(), origin.clone());
        resolved.push(Resolved {
            key,
            origin,
            object,
            resolution,
        });
    }

    // Record everything this sync may create before creating it (as cli-utils does): a sync cancelled
    // half-way (a newer commit arrived) then leaves no object the inventory does not know, so nothing can
    // escape a later prune. Objects this sync fails to take over are dropped again at the end, and
    // prune never deletes an object another inventory owns.
    if let Some(inventory) = &options.inventory
        && !dry_run
    {
        let upcoming: BTreeSet<ObjectKey> = previous_inventory
            .iter()
            .cloned()
            .chain(resolved.iter().map(|r| r.key.clone()))
            .collect();
        inventory
            .location
            .write(client, &upcoming, &options.field_manager)
            .await?;
    }

    let plan = {
        let items: Vec<(ObjectKey, &DynamicObject)> = resolved
            .iter()
            .map(|r| (r.key.clone(), &r.object))
            .collect();
        order(&items)
    };
    // Final outcome per object, for skipping dependents.
    let mut outcome_of: Vec<Option<Outcome>> = vec![None; resolved.len()];
    for (i, e) in plan.failed {
        let r = &resolved[i];
        outcome_of[i] = Some(Outcome::Failed(e.to_string()));
        report
            .results
            .push(fail(Some(r.key.clone()), r.origin.clone(), e.to_string()));
    }

    // CRDs applied (for real) since the last discovery: their kinds are looked up again before use.
    let mut crds_applied: Vec<String> = Vec::new();
    let mut start = 0;
    while start < plan.sequence.len() {
        let batch =
            &plan.sequence[start..batch_end(&plan.sequence, start, &resolved, &plan.dependencies)];
        start += batch.len();
        let needs_refresh = batch
            .iter()
            .any(|&i| matches!(resolved[i].resolution, Resolution::Pending(_)));
        let refreshed = if needs_refresh && !crds_applied.is_empty() {
            refresh_after_crds(client, &mut discovery, &groups, &mut crds_applied).await
        } else {
            Ok(())
        };
        // What each object of the batch gets: an API resource to apply to, or its outcome already.
        let prepared: Vec<(usize, Result<ApiResource, Outcome>)> = batch
            .iter()
            .map(|&i| {
                let blocked = plan.dependencies[i]
                    .iter()
                    .find(|&&d| outcome_of[d].as_ref().is_some_and(|o| !o.is_success()));
                if let Some(&d) = blocked {
                    let verb = outcome_of[d]
                        .as_ref()
                        .map(Outcome::verb)
                        .unwrap_or_default();
                    let reason =
                        format!("depends on {} which {verb}", resolved[d].key.resource_key());
                    return (i, Err(Outcome::Skipped(reason)));
                }
                let resource = match &resolved[i].resolution {
                    Resolution::Served(resource) => Ok(resource.clone()),
                    Resolution::Unknown(message) => Err(message.clone()),
                    Resolution::Pending(gvk) => refreshed
                        .clone()
                        .and_then(|()| served_after_crds(&discovery, gvk, dry_run)),
                };
                (i, resource.map_err(Outcome::Failed))
            })
            .collect();
        let outcomes: Vec<(usize, Outcome)> = futures::stream::iter(prepared)
            .map(|(i, prepared)| {
                let r = &resolved[i];
                async move {
                    match prepared {
                        Ok(resource) => (i, apply_object(client, &resource, r, options).await),
                        Err(outcome) => (i, outcome),
                    }
                }
            })
            .buffered(APPLY_CONCURRENCY)
            .collect()
            .await;
        for (i, outcome) in outcomes {
            let r = &resolved[i];
            tracing::debug!(resource_key = %r.key, origin = %r.origin, outcome = outcome.verb(), "applied object");
            if outcome.is_success()
                && !dry_run
                && r.key.group == CRD_GROUP
                && r.key.kind == CRD_KIND
            {
                crds_applied.push(r.key.name.clone());
            }
            outcome_of[i] = Some(outcome.clone());
            report.results.push(ObjectResult {
                key: Some(r.key.clone()),
                origin: Some(r.origin.clone()),
                outcome,
                dry_run,
            });
        }
    }

    if let Some(inventory) = &options.inventory {
        update_inventory(
            client,
            &discovery,
            inventory,
            previous_inventory,
            &mut report,
            options,
        )
        .await?;
    }
    Ok(report)
}

/// Prunes what left the set (only when everything else succeeded) and records what this inventory
/// owns now: the objects applied, plus earlier ones still in the cluster that were not pruned.
async fn update_inventory(
    client: &Client,
    discovery: &Discovery,
    inventory: &InventoryOptions,
    previous: BTreeSet<ObjectKey>,
    report: &mut SyncReport,
    options: &ApplyOptions,
) -> Result<(), EngineError> {
    let dry_run = options.dry_run != DryRunStrategy::None;
    let in_set: BTreeSet<ObjectKey> = report
        .results
        .iter()
        .filter_map(|r| r.key.clone())
        .collect();
    // A failed object is recorded only if it was ours before: it may still be in the cluster.
    let mut owned: BTreeSet<ObjectKey> = report
        .results
        .iter()
        .filter(|r| r.outcome.is_success())
        .filter_map(|r| r.key.clone())
        .collect();
    owned.extend(in_set.iter().filter(|k| previous.contains(*k)).cloned());
    let gone: Vec<ObjectKey> = previous.difference(&in_set).cloned().collect();
    if inventory.prune && report.all_succeeded() {
        let pruned = prune(
            client,
            discovery,
            gone,
            &inventory.location.id(),
            inventory.prune_propagation_policy.clone(),
            inventory.prune_timeout,
            dry_run,
        )
        .await;
        owned.extend(pruned.still_owned);
        report.results.extend(pruned.results);
    } else {
        owned.extend(gone);
    }
    if !dry_run {
        inventory
            .location
            .write(client, &owned, &options.field_manager)
            .await?;
    }
    Ok(())
}

fn key_of(object: &DynamicObject, gvk: &GroupVersionKind, namespace: Option<String>) -> ObjectKey {
    ObjectKey {
        group: gvk.group.clone(),
        kind: gvk.kind.clone(),
        namespace,
        name: object.metadata.name.clone().unwrap_or_default(),
    }
}

/// Discovery of only the groups the set and the inventory use, with aggregated discovery (two
/// requests) and the per-group walk as fallback for apiservers without it.
async fn discover(client: &Client, groups: &BTreeSet<String>) -> Result<Discovery, EngineError> {
    let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
    match Discovery::new(client.clone())
        .filter(&groups)
        .run_aggregated()
        .await
    {
        Ok(discovery) => Ok(discovery),
        Err(e) => {
            tracing::debug!(error = %e, "aggregated discovery failed; discovering group by group");
            Discovery::new(client.clone())
                .filter(&groups)
                .run()
                .await
                .map_err(EngineError::Discovery)
        }
    }
}

/// (group, version, kind) → namespaced, for every version served by a CRD in the set.
fn crd_scopes(objects: &[DecodedObject]) -> HashMap<(String, String, String), bool> {
    let mut scopes = HashMap::new();
    for o in objects {
        let Some(types) = &o.object.types else {
            continue;
        };
        if split_api_version(&types.api_version).0 != CRD_GROUP || types.kind != CRD_KIND {
            continue;
        }
        let spec = &o.object.data["spec"];
        let (Some(group), Some(kind)) = (spec["group"].as_str(), spec["names"]["kind"].as_str())
        else {
            continue;
        };
        let namespaced = spec["scope"].as_str() != Some("Cluster");
        for version in spec["versions"].as_array().into_iter().flatten() {
            if let Some(version) = version["name"].as_str() {
                scopes.insert(
                    (group.to_string(), version.to_string(), kind.to_string()),
                    namespaced,
                );
            }
        }
    }
    scopes
}

/// The end of the batch starting at `sequence[start]`: following objects of the same kind that do not
/// depend on each other. A batch is applied concurrently; batches one after another, so the kind order
/// and every dependency still hold.
fn batch_end(
    sequence: &[usize],
    start: usize,
    resolved: &[Resolved],
    dependencies: &[Vec<usize>],
) -> usize {
    let kind = &resolved[sequence[start]].key.kind;
    let mut members = HashSet::from([sequence[start]]);
    let mut end = start + 1;
    while end < sequence.len() && members.len() < MAX_BATCH {
        let next = sequence[end];
        if &resolved[next].key.kind != kind
            || dependencies[next].iter().any(|d| members.contains(d))
        {
            break;
        }
        members.insert(next);
        end += 1;
    }
    end
}

/// The resource of a kind defined by a CRD of this set, once that CRD was applied.
fn served_after_crds(
    discovery: &Discovery,
    gvk: &GroupVersionKind,
    dry_run: bool,
) -> Result<ApiResource, String> {
    match discovery.resolve_gvk(gvk) {
        Some((resource, _)) => Ok(resource),
        None if dry_run => Err("its CustomResourceDefinition was only applied in a dry run".into()),
        None => Err(format!(
            "kind {} is still not served after applying its CustomResourceDefinition",
            gvk.kind
        )),
    }
}

/// Waits until the CRDs applied since the last discovery are established, then discovers again.
async fn refresh_after_crds(
    client: &Client,
    discovery: &mut Discovery,
    groups: &BTreeSet<String>,
    crds_applied: &mut Vec<String>,
) -> Result<(), String> {
    let crd_resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(CRD_GROUP, "v1", CRD_KIND),
        "customresourcedefinitions",
    );
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &crd_resource);
    for name in crds_applied.drain(..) {
        wait_established(&api, &name)
            .await
            .map_err(|e| e.to_string())?;
    }
    *discovery = discover(client, groups).await.map_err(|e| e.to_string())?;
    Ok(())
}

async fn wait_established(api: &Api<DynamicObject>, name: &str) -> Result<(), EngineError> {
    let deadline = tokio::time::Instant::now() + CRD_ESTABLISH_TIMEOUT;
    loop {
        let crd = api.get(name).await.map_err(EngineError::Kube)?;
        let established = crd.data["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Established" && c["status"] == "True");
        if established {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(EngineError::CrdNotEstablished {
                name: name.to_string(),
                reason: format!("not Established after {CRD_ESTABLISH_TIMEOUT:?}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One server-side apply. Created / configured / unchanged come from comparing with the object as it
/// was just before.
async fn apply_object(
    client: &Client,
    resource: &ApiResource,
    r: &Resolved,
    options: &ApplyOptions,
) -> Outcome {
    let api: Api<DynamicObject> = match &r.key.namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, resource),
        None => Api::all_with(client.clone(), resource),
    };
    tracing::info!(
        resource = %format!("{}/{}", r.key.kind, r.key.name),
        namespace = r.key.namespace.as_deref().unwrap_or_default(),
        "Applying resource"
    );
    let before = match api.get_opt(&r.key.name).await {
        Ok(before) => before,
        Err(e) => return Outcome::Failed(kube_error_message(&e)),
    };
    let mut desired = r.object.clone();
    if let Some(inventory) = &options.inventory {
        let ours = inventory.location.id();
        if let Some(before) = &before {
            let owner = before
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(OWNING_INVENTORY_ANNOTATION));
            if let Err(reason) = inventory.policy.check(&ours, owner.map(String::as_str)) {
                return Outcome::Failed(reason);
            }
        }
        desired
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(OWNING_INVENTORY_ANNOTATION.to_string(), ours);
    }
    if options.dry_run == DryRunStrategy::Client {
        return if before.is_some() {
            Outcome::Configured
        } else {
            Outcome::Created
        };
    }
    let mut params = PatchParams::apply(&options.field_manager).force();
    params.dry_run = options.dry_run == DryRunStrategy::Server;
    let after = match api
        .patch(&r.key.name, &params, &Patch::Apply(&desired))
        .await
    {
        Ok(after) => after,
        Err(e) => return Outcome::Failed(kube_error_message(&e)),
    };
    let Some(before) = before else {
        return Outcome::Created;
    };
    let moved =
        params.dry_run || before.metadata.resource_version != after.metadata.resource_version;
    if moved && apply_changed(&before, &after, &desired, &options.field_manager) {
        Outcome::Configured
    } else {
        Outcome::Unchanged
    }
}

/// Whether an apply that moved the resourceVersion (or was a dry run, which never moves it) changed what
/// we manage. The resourceVersion alone over-reports: between our read and our apply, controllers write
/// status and annotations (a Deployment's `deployment.kubernetes.io/revision`). So compare, before and
/// after, the fields the manifest sets (both sides in the server's normalized form) and the set of
/// fields our field manager owns (which catches fields the manifest stopped setting and SSA removed).
fn apply_changed(
    before: &DynamicObject,
    after: &DynamicObject,
    desired: &DynamicObject,
    field_manager: &str,
) -> bool {
    let shape = serde_json::to_value(desired).unwrap_or_default();
    let value = |o: &DynamicObject| serde_json::to_value(o).unwrap_or_default();
    project(&value(before), &shape) != project(&value(after), &shape)
        || owned_fields(before, field_manager) != owned_fields(after, field_manager)
}

/// `actual` cut down to the keys present in `shape` (lists element by element, keeping their length).
fn project(actual: &Value, shape: &Value) -> Value {
    match (actual, shape) {
        (Value::Object(actual), Value::Object(shape)) => Value::Object(
            shape
                .iter()
                .map(|(k, s)| {
                    (
                        k.clone(),
                        actual.get(k).map_or(Value::Null, |a| project(a, s)),
                    )
                })
                .collect(),
        ),
        (Value::Array(actual), Value::Array(shape)) => Value::Array(
            actual
                .iter()
                .enumerate()
                .map(|(i, a)| shape.get(i).map_or_else(|| a.clone(), |s| project(a, s)))
                .collect(),
        ),
        _ => actual.clone(),
    }
}

/// The fields our manager owns through apply (`managedFields[].fieldsV1`).
fn owned_fields<'a>(object: &'a DynamicObject, field_manager: &str) -> Option<&'a FieldsV1> {
    object
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .find(|m| {
            m.manager.as_deref() == Some(field_manager) && m.operation.as_deref() == Some("Apply")
        })
        .and_then(|m| m.fields_v1.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn projection_keeps_only_what_the_manifest_sets() {
        let shape = json!({"metadata": {"name": "x"}, "spec": {"containers": [{"name": "web"}]}});
        let actual = json!({
            "metadata": {"name": "x", "annotations": {"by-controller": "1"}},
            "spec": {"containers": [{"name": "web", "imagePullPolicy": "Always"}, {"name": "extra"}]},
            "status": {"ready": true}
        });
        assert_eq!(
            project(&actual, &shape),
            json!({"metadata": {"name": "x"}, "spec": {"containers": [{"name": "web"}, {"name": "extra"}]}})
        );
    }
}
