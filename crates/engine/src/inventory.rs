//! The inventory: which objects a (agent, manifest project) applied, kept in the cluster so objects that
//! leave Git can be pruned even after a restart.
//!
//! Stored as ConfigMaps in the agent's namespace, so the number of objects is not bounded by one
//! ConfigMap's 1 MiB: the head `<name>` holds the first shard, the shard count and a generation; shards
//! 1.. of generation `g` are `<name>-g<g>-<i>`, labelled as this inventory's. Each shard's `objects` is
//! the sorted resource keys, one a line.
//!
//! Writes are crash-safe: a new generation's shards are written first and the head naming it last (one
//! atomic write), then the other generations' shards are deleted. A write interrupted at any point (a
//! newer commit drops the sync, `kill -9`, an apiserver error) leaves the previous generation whole, and
//! the next write removes what an unfinished one left. The older layout (`<name>-<i>`, no generation) is
//! still read and is replaced by the next write. A shard that is missing all the same (deleted by hand,
//! or the older layout interrupted) does not wedge the project: the read then takes the union of every
//! shard left for this inventory, a superset of what it owns, which is safe because prune deletes only
//! objects annotated as owned by this inventory.

use std::collections::BTreeSet;

use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::ApiResource;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::error::EngineError;
use crate::key::ObjectKey;

/// Annotation on every applied object naming the inventory that owns it (as cli-utils does).
pub const OWNING_INVENTORY_ANNOTATION: &str = "config.k8s.io/owning-inventory";
/// Annotation on every applied object: a digest of the manifest as last applied (see `change.rs`).
pub const MANIFEST_DIGEST_ANNOTATION: &str = "agentk/manifest-digest";
/// `keep` on an object means: when it leaves Git, leave it in the cluster.
pub const ON_REMOVE_ANNOTATION: &str = "cli-utils.sigs.k8s.io/on-remove";
/// Keeps each shard well under the apiserver's 1 MiB object limit.
const SHARD_BYTES: usize = 512 * 1024;
/// Label on every shard but the head, with [`InventoryRef::label`]: how the shards of unfinished or old
/// generations are found again.
const SHARD_LABEL: &str = "agentk.gitlab.com/inventory-shard-of";
/// On the head only: cli-utils' label naming an inventory, so `kubectl get cm -l` and cli-utils tooling find
/// it (shards carry only [`SHARD_LABEL`], or cli-utils would see several inventories with one id).
pub const INVENTORY_ID_LABEL: &str = "cli-utils.sigs.k8s.io/inventory-id";
/// The standard label saying who writes these ConfigMaps.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Longest ConfigMap name kept whole in shard names (ConfigMap names end at 253 characters).
const SHARD_PREFIX_MAX: usize = 220;
/// Page size when listing shards.
const SHARD_PAGE: u32 = 100;

/// `inventory_policy`: what to do with an existing object not owned by this inventory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum InventoryPolicy {
    /// Only objects already owned by this inventory (or new ones) are applied.
    #[default]
    MustMatch,
    /// Also take over objects no inventory owns.
    AdoptIfNoInventory,
    /// Take over any object.
    AdoptAll,
}

impl InventoryPolicy {
    /// `Err(reason)` when an existing object with this owner may not be applied.
    pub fn check(self, ours: &str, owner: Option<&str>) -> Result<(), String> {
        match (self, owner) {
            (_, Some(owner)) if owner == ours => Ok(()),
            (InventoryPolicy::AdoptAll, _) | (InventoryPolicy::AdoptIfNoInventory, None) => Ok(()),
            (_, Some(owner)) => Err(format!(
                "the object belongs to inventory {owner:?} (inventory_policy does not allow taking it over)"
            )),
            (_, None) => Err(
                "the object exists and belongs to no inventory (inventory_policy must_match)"
                    .into(),
            ),
        }
    }
}

/// Where one (agent, manifest project)'s inventory lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InventoryRef {
    pub namespace: String,
    /// A ConfigMap name (the caller makes it unique per agent and manifest project).
    pub name: String,
}

impl InventoryRef {
    /// The value of [`OWNING_INVENTORY_ANNOTATION`] on owned objects.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The name of shard `index` of `generation`; `None`: the older layout, `<name>-<index>`.
    fn shard_name(&self, generation: Option<u64>, index: usize) -> String {
        if index == 0 {
            return self.name.clone();
        }
        let Some(generation) = generation else {
            return format!("{}-{index}", self.name);
        };
        let prefix = if self.name.len() <= SHARD_PREFIX_MAX {
            self.name.clone()
        } else {
            let cut = self.name.get(..200).unwrap_or(&self.name);
            format!("{cut}-{}", self.label())
        };
        format!("{prefix}-g{generation}-{index}")
    }

    /// The value of [`SHARD_LABEL`] on this inventory's shards (a label value is at most 63 characters,
    /// a name up to 253, so a digest of the name).
    fn label(&self) -> String {
        hex::encode(&Sha256::digest(self.name.as_bytes())[..12])
    }

    fn api(&self, client: &Client) -> Api<DynamicObject> {
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk("", "v1", "ConfigMap"));
        Api::namespaced_with(client.clone(), &self.namespace, &resource)
    }

    /// The keys last written; empty when there is no inventory yet.
    pub async fn read(&self, client: &Client) -> Result<BTreeSet<ObjectKey>, EngineError> {
        let api = self.api(client);
        let mut keys = BTreeSet::new();
        let Some(head) = api
            .get_opt(&self.name)
            .await
            .map_err(EngineError::Inventory)?
        else {
            return Ok(keys);
        };
        parse_into(&head, &mut keys);
        let generation = generation_of(&head);
        for index in 1..shard_count(&head) {
            let name = self.shard_name(generation, index);
            match api.get_opt(&name).await.map_err(EngineError::Inventory)? {
                Some(shard) => parse_into(&shard, &mut keys),
                None => {
                    tracing::warn!(inventory = %self.id(), shard = %name, "an inventory shard is missing: reading every shard left for this inventory instead");
                    self.read_every_shard(&api, &mut keys).await?;
                    return Ok(keys);
                }
            }
        }
        Ok(keys)
    }

    /// Adds the keys of every shard left for this inventory, of any generation or layout.
    async fn read_every_shard(
        &self,
        api: &Api<DynamicObject>,
        keys: &mut BTreeSet<ObjectKey>,
    ) -> Result<(), EngineError> {
        let older_layout = format!("{}-", self.name);
        for shard in list_all(api, &ListParams::default()).await? {
            let name = shard.metadata.name.as_deref().unwrap_or_default();
            let labelled = shard
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SHARD_LABEL))
                .is_some_and(|l| *l == self.label());
            let older = name.strip_prefix(&older_layout).is_some_and(|index| {
                !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit())
            });
            if labelled || older {
                parse_into(&shard, keys);
            }
        }
        Ok(())
    }

    /// Replaces the inventory with `keys`: a new generation's shards first, the head naming it last, then
    /// the shards no generation in use needs any more are deleted.
    pub async fn write(
        &self,
        client: &Client,
        keys: &BTreeSet<ObjectKey>,
        field_manager: &str,
    ) -> Result<(), EngineError> {
        let api = self.api(client);
        let head = api
            .get_opt(&self.name)
            .await
            .map_err(EngineError::Inventory)?;
        let previous_generation = head.as_ref().and_then(generation_of);
        // Shards of the older layout, to delete once the head no longer names them.
        let older_layout_shards = match &head {
            Some(head) if previous_generation.is_none() => shard_count(head),
            _ => 1,
        };
        let generation = previous_generation.map_or(1, |g| g + 1);
        let shards = split_into_shards(keys);
        let params = PatchParams::apply(field_manager).force();
        for (index, objects) in shards.iter().enumerate().skip(1) {
            let name = self.shard_name(Some(generation), index);
            let configmap = json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": name,
                    "namespace": self.namespace,
                    "labels": {SHARD_LABEL: self.label(), MANAGED_BY_LABEL: "agentk"},
                },
                "data": {"objects": objects, "generation": generation.to_string()},
            });
            api.patch(&name, &params, &Patch::Apply(&configmap))
                .await
                .map_err(EngineError::Inventory)?;
        }
        let head = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {INVENTORY_ID_LABEL: self.label(), MANAGED_BY_LABEL: "agentk"},
            },
            "data": {
                "objects": shards[0],
                "shards": shards.len().to_string(),
                "generation": generation.to_string(),
            },
        });
        api.patch(&self.name, &params, &Patch::Apply(&head))
            .await
            .map_err(EngineError::Inventory)?;
        self.delete_unused_shards(&api, generation, shards.len(), older_layout_shards)
            .await
    }

    /// Deletes the shards of other generations (an unfinished write's, or the one just replaced) and of
    /// the older layout.
    async fn delete_unused_shards(
        &self,
        api: &Api<DynamicObject>,
        generation: u64,
        shards: usize,
        older_layout_shards: usize,
    ) -> Result<(), EngineError> {
        let in_use: BTreeSet<String> = (1..shards)
            .map(|index| self.shard_name(Some(generation), index))
            .collect();
        let selector = ListParams::default().labels(&format!("{SHARD_LABEL}={}", self.label()));
        let mut unused: Vec<String> = list_all(api, &selector)
            .await?
            .into_iter()
            .filter_map(|shard| shard.metadata.name)
            .filter(|name| !in_use.contains(name))
            .collect();
        unused.extend((1..older_layout_shards).map(|index| self.shard_name(None, index)));
        for name in unused {
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => return Err(EngineError::Inventory(e)),
            }
        }
        Ok(())
    }
}

/// Every ConfigMap `params` selects, page by page.
async fn list_all(
    api: &Api<DynamicObject>,
    params: &ListParams,
) -> Result<Vec<DynamicObject>, EngineError> {
    let mut params = params.clone().limit(SHARD_PAGE);
    let mut all = Vec::new();
    loop {
        let page = api.list(&params).await.map_err(EngineError::Inventory)?;
        all.extend(page.items);
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(all),
        }
    }
}

/// The generation the head names; `None` for the older layout.
fn generation_of(head: &DynamicObject) -> Option<u64> {
    head.data["data"]["generation"]
        .as_str()
        .and_then(|s| s.parse().ok())
}

fn shard_count(first: &DynamicObject) -> usize {
    first.data["data"]["shards"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

fn parse_into(shard: &DynamicObject, keys: &mut BTreeSet<ObjectKey>) {
    let objects = shard.data["data"]["objects"].as_str().unwrap_or_default();
    keys.extend(objects.lines().filter_map(ObjectKey::from_resource_key));
}

/// Newline-separated keys, at most [`SHARD_BYTES`] a shard; always at least one (possibly empty) shard.
fn split_into_shards(keys: &BTreeSet<ObjectKey>) -> Vec<String> {
    let mut shards = vec![String::new()];
    for key in keys {
        let line = key.resource_key();
        let current = shards.last_mut().expect("never empty");
        if !current.is_empty() && current.len() + line.len() + 1 > SHARD_BYTES {
            shards.push(String::new());
        }
        let current = shards.last_mut().expect("never empty");
        current.push_str(&line);
        current.push('\n');
    }
    shards
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies() {
        use InventoryPolicy::*;
        assert!(MustMatch.check("a", Some("a")).is_ok());
        assert!(MustMatch.check("a", None).is_err());
        assert!(MustMatch.check("a", Some("b")).is_err());
        assert!(AdoptIfNoInventory.check("a", None).is_ok());
        assert!(AdoptIfNoInventory.check("a", Some("b")).is_err());
        assert!(AdoptAll.check("a", Some("b")).is_ok());
    }

    #[test]
    fn shards_split_large_inventories() {
        let keys: BTreeSet<ObjectKey> = (0..20_000)
            .map(|i| ObjectKey {
                group: String::new(),
                kind: "ConfigMap".into(),
                namespace: Some("some-namespace".into()),
                name: format!("configmap-with-a-long-name-{i:05}"),
            })
            .collect();
        let shards = split_into_shards(&keys);
        assert!(shards.len() > 1);
        assert!(shards.iter().all(|s| s.len() <= SHARD_BYTES));
        let back: BTreeSet<ObjectKey> = shards
            .iter()
            .flat_map(|s| s.lines())
            .filter_map(ObjectKey::from_resource_key)
            .collect();
        assert_eq!(back, keys);
        assert_eq!(split_into_shards(&BTreeSet::new()), [""]);
    }
}
