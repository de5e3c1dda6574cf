//! The sync: decode, resolve, order, server-side apply in batches, then prune and record the inventory.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use kube::Client;
use kube::api::{DynamicObject, Patch, PatchParams, PropagationPolicy};
use kube::discovery::{ApiResource, Discovery};

use crate::change::{
    AppliedForms, apply_changed, live_form, live_matches, manifest_digest, shape_of,
};
use crate::decode::{DecodedObject, ManifestFile, ObjectOrigin, decode_files};
use crate::error::{EngineError, kube_error_message};
use crate::guard::{InventoryPlan, is_crd, plan_inventory, refuse_empty_set};
use crate::inventory::{
    InventoryPolicy, InventoryRef, MANIFEST_DIGEST_ANNOTATION, OWNING_INVENTORY_ANNOTATION,
};
use crate::key::{ObjectKey, split_api_version};
use crate::live::read_live;
use crate::order::{OrderPlan, order};
use crate::prune::prune;
use crate::ready::{Target, await_ready};
use crate::resolve::{
    CRD_GROUP, Resolution, Resolved, discover, refresh_after_crds, resolve_objects,
    served_after_crds,
};
use crate::result::{Health, ObjectResult, Outcome, SyncReport};

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
    /// How long an object waits for its `config.kubernetes.io/depends-on` targets to be ready before
    /// it is skipped (agentk: the project's `reconcile_timeout`).
    pub dependency_timeout: Duration,
    /// What the apiserver made of earlier applies of this set (kept across syncs by the caller), so
    /// objects whose manifests it normalises are not written again on every re-check either.
    pub applied_forms: Option<std::sync::Arc<AppliedForms>>,
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
    /// `allow_empty`: a set with no objects may prune a non-empty inventory. Off by default: such a sync is
    /// refused and nothing is pruned.
    pub allow_empty: bool,
    /// A Namespace that left the set is not pruned while it holds objects this prune does not delete
    /// (made by others, or kept). On by default; off, only the set's own objects keep it.
    pub keep_namespaces_with_other_objects: bool,
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
            allow_empty: false,
            keep_namespaces_with_other_objects: true,
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
            dependency_timeout: Duration::from_secs(300),
            applied_forms: None,
        }
    }
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
    apply_decoded(client, decode_files(files), options).await
}

/// [`apply()`] for files the caller has already decoded with [`decode_files`] (agentk logs each object
/// before applying; decoding once keeps a large set from being held twice).
pub async fn apply_decoded(
    client: &Client,
    documents: Vec<Result<DecodedObject, EngineError>>,
    options: &ApplyOptions,
) -> Result<SyncReport, EngineError> {
    let dry_run = options.dry_run != DryRunStrategy::None;
    let documents_in_set = documents.len();
    let (decoded, mut report) = split_documents(documents, dry_run);
    let previous = match &options.inventory {
        Some(inventory) => {
            let previous = inventory.location.read(client).await?;
            refuse_empty_set(
                documents_in_set,
                &previous,
                &inventory.location.id(),
                inventory.allow_empty,
            )?;
            previous
        }
        None => BTreeSet::new(),
    };
    let groups = groups_of(&decoded, &previous);
    let discovery = discover(client, &groups).await?;
    let (resolved, duplicates) = resolve_objects(decoded, &discovery, &options.default_namespace);
    for (key, origin, e) in duplicates {
        report
            .results
            .push(failed(Some(key), origin, e.to_string(), dry_run));
    }
    let mut slots: Vec<Slot> = resolved.into_iter().map(Slot::new).collect();
    let recorded = pre_record(client, options, &previous, &slots).await?;
    let plan = plan(&mut slots, &mut report, dry_run);

    let mut run = Run {
        client,
        options,
        dry_run,
        discovery,
        groups,
        crds_applied: Vec::new(),
    };
    let mut start = 0;
    while start < plan.sequence.len() {
        let end = batch_end(&plan.sequence, start, &slots, &plan.dependencies);
        let batch = &plan.sequence[start..end];
        start = end;
        run.batch(batch, &plan, &mut slots, &mut report).await;
    }

    if let Some(forms) = &options.applied_forms {
        let in_set: HashSet<&ObjectKey> = slots.iter().map(|s| &s.resolved.key).collect();
        forms.retain(|key| in_set.contains(key));
    }
    if let Some(inventory) = &options.inventory {
        update_inventory(&run, inventory, &previous, recorded, &mut report).await?;
    }
    Ok(report)
}

/// One object of the set through the sync: what it is, and what has happened to it so far.
struct Slot {
    resolved: Resolved,
    /// Final outcome, once decided: for skipping dependents.
    outcome: Option<Outcome>,
    /// kstatus' verdict as the apply left it (or once seen Current): for depends-on, which waits for it.
    health: Option<Health>,
    /// The API it was applied through: for reading it again while waiting for it.
    resource: Option<ApiResource>,
}

impl Slot {
    fn new(resolved: Resolved) -> Self {
        Self {
            resolved,
            outcome: None,
            health: None,
            resource: None,
        }
    }

    fn key(&self) -> &ObjectKey {
        &self.resolved.key
    }

    fn succeeded(&self) -> bool {
        self.outcome.as_ref().is_some_and(Outcome::is_success)
    }

    fn is_current(&self) -> bool {
        self.health
            .as_ref()
            .is_some_and(|h| h.status == gitops_kstatus::Status::Current)
    }
}

fn failed(
    key: Option<ObjectKey>,
    origin: ObjectOrigin,
    message: String,
    dry_run: bool,
) -> ObjectResult {
    ObjectResult {
        key,
        origin: Some(origin),
        outcome: Outcome::Failed(message),
        dry_run,
        resource: None,
        health: None,
    }
}

/// Valid objects to go on with, and a failed result for each document that is not one.
fn split_documents(
    documents: Vec<Result<DecodedObject, EngineError>>,
    dry_run: bool,
) -> (Vec<DecodedObject>, SyncReport) {
    let mut report = SyncReport::default();
    let mut decoded = Vec::new();
    for item in documents {
        match item {
            Ok(object) => decoded.push(object),
            Err(e) => {
                let origin = e.origin().cloned().unwrap_or_else(|| ObjectOrigin {
                    path: String::new(),
                    document_index: 0,
                    list_item_index: None,
                });
                report
                    .results
                    .push(failed(None, origin, e.to_string(), dry_run));
            }
        }
    }
    (decoded, report)
}

/// The API groups to discover: those of the set, of the inventory (to prune), and CRDs'.
fn groups_of(decoded: &[DecodedObject], previous: &BTreeSet<ObjectKey>) -> BTreeSet<String> {
    let mut groups: BTreeSet<String> = decoded
        .iter()
        .filter_map(|o| o.object.types.as_ref())
        .map(|t| split_api_version(&t.api_version).0.to_string())
        .chain(previous.iter().map(|k| k.group.clone()))
        .collect();
    groups.insert(CRD_GROUP.into());
    groups
}

/// Records everything this sync may create before creating it (as cli-utils does): a sync cancelled
/// half-way (a newer commit arrived) then leaves no object the inventory does not know, so nothing can
/// escape a later prune. Objects this sync fails to take over are dropped again at the end, and prune
/// never deletes an object another inventory owns. Returns what the inventory in the cluster holds now:
/// it is written only when that changes, so a re-sync of an unchanged set writes nothing.
async fn pre_record(
    client: &Client,
    options: &ApplyOptions,
    previous: &BTreeSet<ObjectKey>,
    slots: &[Slot],
) -> Result<BTreeSet<ObjectKey>, EngineError> {
    let Some(inventory) = options
        .inventory
        .as_ref()
        .filter(|_| options.dry_run == DryRunStrategy::None)
    else {
        return Ok(previous.clone());
    };
    let upcoming: BTreeSet<ObjectKey> = previous
        .iter()
        .cloned()
        .chain(slots.iter().map(|s| s.key().clone()))
        .collect();
    if &upcoming != previous {
        inventory
            .location
            .write(client, &upcoming, &options.field_manager)
            .await?;
    }
    Ok(upcoming)
}

/// Orders the set; objects that cannot be ordered (invalid depends-on, cycles) fail here.
fn plan(slots: &mut [Slot], report: &mut SyncReport, dry_run: bool) -> OrderPlan {
    let plan = {
        let items: Vec<(ObjectKey, &DynamicObject)> = slots
            .iter()
            .map(|s| (s.key().clone(), &s.resolved.object))
            .collect();
        order(&items)
    };
    for (i, e) in &plan.failed {
        let slot = &mut slots[*i];
        slot.outcome = Some(Outcome::Failed(e.to_string()));
        report.results.push(failed(
            Some(slot.key().clone()),
            slot.resolved.origin.clone(),
            e.to_string(),
            dry_run,
        ));
    }
    plan
}

/// The state of the sync shared by its batches.
struct Run<'a> {
    client: &'a Client,
    options: &'a ApplyOptions,
    dry_run: bool,
    discovery: Discovery,
    groups: BTreeSet<String>,
    /// CRDs applied (for real) since the last discovery: their kinds are looked up again before use.
    crds_applied: Vec<String>,
}

/// What an object of a batch gets: an API resource to apply to, or its outcome already.
type Prepared = (usize, Result<ApiResource, Outcome>);
/// An object's outcome, the API it went through and its health.
type Applied = (usize, Outcome, Option<ApiResource>, Option<Health>);

impl Run<'_> {
    /// One batch: its kinds discovered if a CRD of the set defines them, its depends-on targets waited
    /// for, then each object skipped, failed or applied, and the results recorded.
    async fn batch(
        &mut self,
        batch: &[usize],
        plan: &OrderPlan,
        slots: &mut [Slot],
        report: &mut SyncReport,
    ) {
        let refreshed = self.refresh_discovery(batch, slots).await;
        let (targets, awaited) = self.dependency_targets(batch, plan, slots).await;
        let readiness = if targets.is_empty() {
            HashMap::new()
        } else {
            let timeout = self.options.dependency_timeout;
            await_ready(self.client, targets, timeout, self.dry_run).await
        };
        // Seen Current now: later batches' dependents need not wait for them again.
        for d in awaited {
            if readiness.get(slots[d].key()).is_some_and(Result::is_ok) {
                slots[d].health = Some(Health {
                    status: gitops_kstatus::Status::Current,
                    message: String::new(),
                });
            }
        }
        let prepared: Vec<Prepared> = batch
            .iter()
            .map(|&i| (i, prepare(i, plan, slots, &readiness, &refreshed, self)))
            .collect();
        let applied = self.apply_prepared(prepared, slots).await;
        self.record(applied, slots, report);
    }

    /// Discovery again before a batch of kinds defined by CRDs applied since the last one.
    async fn refresh_discovery(&mut self, batch: &[usize], slots: &[Slot]) -> Result<(), String> {
        let needs_refresh = batch
            .iter()
            .any(|&i| matches!(slots[i].resolved.resolution, Resolution::Pending(_)));
        if !needs_refresh || self.crds_applied.is_empty() {
            return Ok(());
        }
        refresh_after_crds(
            self.client,
            &mut self.discovery,
            &self.groups,
            &mut self.crds_applied,
        )
        .await
    }

    /// depends-on targets to be ready first: those of the set applied but not yet seen Current, and
    /// those outside it. Also returns the targets of the set waited for, to record them Current once
    /// they are.
    async fn dependency_targets(
        &self,
        batch: &[usize],
        plan: &OrderPlan,
        slots: &[Slot],
    ) -> (BTreeMap<ObjectKey, Target>, Vec<usize>) {
        let mut targets: BTreeMap<ObjectKey, Target> = BTreeMap::new();
        let mut awaited: Vec<usize> = Vec::new();
        for &i in batch {
            for &d in &plan.awaits[i] {
                if slots[d].succeeded() && !slots[d].is_current() && !self.dry_run {
                    let target = Target {
                        resource: slots[d].resource.clone(),
                        external: false,
                    };
                    targets.insert(slots[d].key().clone(), target);
                    awaited.push(d);
                }
            }
            for key in &plan.external[i] {
                // Several dependents may name one target: discover its kind once.
                if targets.contains_key(key) {
                    continue;
                }
                let target = Target {
                    resource: served_resource(self.client, &self.discovery, key).await,
                    external: true,
                };
                targets.insert(key.clone(), target);
            }
        }
        (targets, awaited)
    }

    /// Reads the batch's live objects in bulk, then applies those that got an API resource (16 in
    /// flight), in batch order.
    async fn apply_prepared(&self, prepared: Vec<Prepared>, slots: &[Slot]) -> Vec<Applied> {
        let mut live = read_batch(self.client, &prepared, slots).await;
        futures::stream::iter(prepared)
            .map(|(i, prepared)| {
                let r = &slots[i].resolved;
                let before = live.remove(&i).unwrap_or(Ok(None));
                async move {
                    match prepared {
                        Ok(resource) => {
                            let (outcome, health) =
                                apply_object(self.client, &resource, r, before, self.options).await;
                            (i, outcome, Some(resource), health)
                        }
                        Err(outcome) => (i, outcome, None, None),
                    }
                }
            })
            .buffered(APPLY_CONCURRENCY)
            .collect()
            .await
    }

    /// Keeps each outcome on its slot (for dependents) and in the report; notes CRDs applied.
    fn record(&mut self, applied: Vec<Applied>, slots: &mut [Slot], report: &mut SyncReport) {
        for (i, outcome, resource, health) in applied {
            let slot = &mut slots[i];
            let key = &slot.resolved.key;
            tracing::debug!(resource_key = %key, origin = %slot.resolved.origin, outcome = outcome.verb(), "applied object");
            if outcome.is_success() && !self.dry_run && is_crd(key) {
                self.crds_applied.push(key.name.clone());
            }
            slot.outcome = Some(outcome.clone());
            slot.health = health.clone();
            slot.resource = resource.clone();
            report.results.push(ObjectResult {
                key: Some(key.clone()),
                origin: Some(slot.resolved.origin.clone()),
                outcome,
                dry_run: self.dry_run,
                resource,
                health,
            });
        }
    }
}

/// What object `i` of a batch gets: skipped when a dependency failed or was skipped or a depends-on
/// target is not ready, failed when its kind is not served, else the API resource to apply it to.
fn prepare(
    i: usize,
    plan: &OrderPlan,
    slots: &[Slot],
    readiness: &HashMap<ObjectKey, Result<(), String>>,
    refreshed: &Result<(), String>,
    run: &Run<'_>,
) -> Result<ApiResource, Outcome> {
    let blocked = plan.dependencies[i]
        .iter()
        .find(|&&d| slots[d].outcome.as_ref().is_some_and(|o| !o.is_success()));
    if let Some(&d) = blocked {
        let verb = slots[d]
            .outcome
            .as_ref()
            .map(Outcome::verb)
            .unwrap_or_default();
        let reason = format!("depends on {} which {verb}", slots[d].key().resource_key());
        return Err(Outcome::Skipped(reason));
    }
    let not_ready = plan.awaits[i]
        .iter()
        .map(|&d| slots[d].key())
        .chain(&plan.external[i])
        .find_map(|key| readiness.get(key).and_then(|r| r.clone().err()));
    if let Some(reason) = not_ready {
        return Err(Outcome::Skipped(reason));
    }
    let resource = match &slots[i].resolved.resolution {
        Resolution::Served(resource) => Ok(resource.clone()),
        Resolution::Unknown(message) => Err(message.clone()),
        Resolution::Pending(gvk) => refreshed
            .clone()
            .and_then(|()| served_after_crds(&run.discovery, gvk, run.dry_run)),
    };
    resource.map_err(Outcome::Failed)
}

/// Prunes what left the set (only when everything else succeeded; Namespaces and CRDs still in use are
/// kept) and records what this inventory owns now: the objects applied, plus earlier ones still in the
/// cluster that were not pruned.
async fn update_inventory(
    run: &Run<'_>,
    inventory: &InventoryOptions,
    previous: &BTreeSet<ObjectKey>,
    recorded: BTreeSet<ObjectKey>,
    report: &mut SyncReport,
) -> Result<(), EngineError> {
    let InventoryPlan {
        in_set,
        mut owned,
        gone,
        may_prune,
    } = plan_inventory(previous, report);
    if inventory.prune && may_prune {
        let pruned = prune(
            run.client,
            &run.discovery,
            gone,
            &in_set,
            inventory,
            run.dry_run,
        )
        .await;
        owned.extend(pruned.still_owned);
        report.results.extend(pruned.results);
    } else {
        owned.extend(gone);
    }
    if !run.dry_run && owned != recorded {
        inventory
            .location
            .write(run.client, &owned, &run.options.field_manager)
            .await?;
    }
    Ok(())
}

/// The end of the batch starting at `sequence[start]`: following objects of the same kind that do not
/// depend on each other. A batch is applied concurrently; batches one after another, so the kind order
/// and every dependency still hold.
fn batch_end(
    sequence: &[usize],
    start: usize,
    slots: &[Slot],
    dependencies: &[Vec<usize>],
) -> usize {
    let kind = &slots[sequence[start]].key().kind;
    let mut members = HashSet::from([sequence[start]]);
    let mut end = start + 1;
    while end < sequence.len() && members.len() < MAX_BATCH {
        let next = sequence[end];
        if &slots[next].key().kind != kind || dependencies[next].iter().any(|d| members.contains(d))
        {
            break;
        }
        members.insert(next);
        end += 1;
    }
    end
}

/// The API of an object outside the set (a depends-on target), by discovery of its group.
async fn served_resource(
    client: &Client,
    discovery: &Discovery,
    key: &ObjectKey,
) -> Option<ApiResource> {
    if let Some(group) = discovery.get(&key.group) {
        return group
            .recommended_kind(&key.kind)
            .map(|(resource, _)| resource);
    }
    let group = kube::discovery::group(client, &key.group).await.ok()?;
    group
        .recommended_kind(&key.kind)
        .map(|(resource, _)| resource)
}

/// The live state of a batch's objects (those with an API to apply to), read in bulk.
async fn read_batch(
    client: &Client,
    batch: &[Prepared],
    slots: &[Slot],
) -> HashMap<usize, Result<Option<DynamicObject>, String>> {
    let members: Vec<(usize, &ApiResource)> = batch
        .iter()
        .filter_map(|(i, resource)| Some((*i, resource.as_ref().ok()?)))
        .collect();
    let wanted: Vec<(&ApiResource, &ObjectKey)> = members
        .iter()
        .map(|&(i, resource)| (resource, slots[i].key()))
        .collect();
    let live = read_live(client, &wanted).await;
    members.iter().map(|&(i, _)| i).zip(live).collect()
}

/// One server-side apply, unless the live object (`before`) shows it would change
/// nothing. Created / configured / unchanged come from comparing with the object as it was just before;
/// the health is the object's as the apply left it.
async fn apply_object(
    client: &Client,
    resource: &ApiResource,
    r: &Resolved,
    before: Result<Option<DynamicObject>, String>,
    options: &ApplyOptions,
) -> (Outcome, Option<Health>) {
    match apply_one(client, resource, r, before, options).await {
        Ok((outcome, object)) => (outcome, object.as_ref().and_then(Health::of)),
        Err(message) => (Outcome::Failed(message), None),
    }
}

/// [`apply_object`]'s work: the outcome and the object as it is now in the cluster (`None` in dry runs).
async fn apply_one(
    client: &Client,
    resource: &ApiResource,
    r: &Resolved,
    before: Result<Option<DynamicObject>, String>,
    options: &ApplyOptions,
) -> Result<(Outcome, Option<DynamicObject>), String> {
    let api = crate::live::api(client, resource, r.key.namespace.as_deref());
    // agentk logs the seed's "Applying resource ... in cluster: ..." line; this is the engine's own detail.
    tracing::debug!(
        resource = %format!("{}/{}", r.key.kind, r.key.name),
        namespace = r.key.namespace.as_deref().unwrap_or_default(),
        "Applying resource"
    );
    let before = before?;
    let mut desired = r.object.clone();
    if let Some(inventory) = &options.inventory {
        let ours = inventory.location.id();
        if let Some(before) = &before {
            let owner = before
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(OWNING_INVENTORY_ANNOTATION));
            inventory.policy.check(&ours, owner.map(String::as_str))?;
        }
        desired
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(OWNING_INVENTORY_ANNOTATION.to_string(), ours);
    }
    let digest = manifest_digest(&desired);
    let shape = shape_of(&desired);
    let forms = options.applied_forms.as_deref();
    if let Some(before) = before
        .as_ref()
        .filter(|before| live_matches(before, &r.key, &shape, &digest, forms))
    {
        let live = (options.dry_run == DryRunStrategy::None).then(|| before.clone());
        return Ok((Outcome::Unchanged, live));
    }
    desired
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(MANIFEST_DIGEST_ANNOTATION.to_string(), digest.clone());
    if options.dry_run == DryRunStrategy::Client {
        let outcome = if before.is_some() {
            Outcome::Configured
        } else {
            Outcome::Created
        };
        return Ok((outcome, None));
    }
    let mut params = PatchParams::apply(&options.field_manager).force();
    params.dry_run = options.dry_run == DryRunStrategy::Server;
    let after = api
        .patch(&r.key.name, &params, &Patch::Apply(&desired))
        .await
        .map_err(|e| kube_error_message(&e))?;
    // A Secret's `stringData` is written into `data` and never shows: its form would hide drift in
    // `data`, so such Secrets are compared as written only (and applied on every check).
    let form_reveals_drift = shape.get("stringData").is_none();
    if let Some(forms) = forms.filter(|_| !params.dry_run && form_reveals_drift) {
        forms.remember(&r.key, &digest, &live_form(&after, &shape));
    }
    let outcome = match before {
        None => Outcome::Created,
        Some(before) => {
            let moved = params.dry_run
                || before.metadata.resource_version != after.metadata.resource_version;
            if moved && apply_changed(&before, &after, &desired, &options.field_manager) {
                Outcome::Configured
            } else {
                Outcome::Unchanged
            }
        }
    };
    Ok((outcome, (!params.dry_run).then_some(after)))
}
