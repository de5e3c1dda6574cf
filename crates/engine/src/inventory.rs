//! The inventory: which objects a (agent, manifest project) applied, kept in the cluster so objects that
//! leave Git can be pruned even after a restart.
//!
//! Stored as ConfigMaps in the agent's namespace: `<name>` holds the first shard and the shard count,
//! `<name>-1`, `<name>-2`, ... the rest, so the number of objects is not bounded by one ConfigMap's 1 MiB.
//! Each shard's `objects` is the sorted resource keys, one a line.

use std::collections::BTreeSet;

use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::ApiResource;
use serde_json::json;

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

    fn shard_name(&self, index: usize) -> String {
        if index == 0 {
            self.name.clone()
        } else {
            format!("{}-{index}", self.name)
        }
    }

    fn api(&self, client: &Client) -> Api<DynamicObject> {
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk("", "v1", "ConfigMap"));
        Api::namespaced_with(client.clone(), &self.namespace, &resource)
    }

    /// The keys last written; empty when there is no inventory yet.
    pub async fn read(&self, client: &Client) -> Result<BTreeSet<ObjectKey>, EngineError> {
        let api = self.api(client);
        let mut keys = BTreeSet::new();
        let Some(first) = api
            .get_opt(&self.name)
            .await
            .map_err(EngineError::Inventory)?
        else {
            return Ok(keys);
        };
        let shards = shard_count(&first);
        parse_into(&first, &mut keys);
        for index in 1..shards {
            let shard = api
                .get(&self.shard_name(index))
                .await
                .map_err(EngineError::Inventory)?;
            parse_into(&shard, &mut keys);
        }
        Ok(keys)
    }

    /// Replaces the inventory with `keys`, then deletes shards no longer needed.
    pub async fn write(
        &self,
        client: &Client,
        keys: &BTreeSet<ObjectKey>,
        field_manager: &str,
    ) -> Result<(), EngineError> {
        let api = self.api(client);
        let previous_shards = match api
            .get_opt(&self.name)
            .await
            .map_err(EngineError::Inventory)?
        {
            Some(first) => shard_count(&first),
            None => 0,
        };
        let shards = split_into_shards(keys);
        let params = PatchParams::apply(field_manager).force();
        for (index, objects) in shards.iter().enumerate() {
            let mut data = json!({ "objects": objects });
            if index == 0 {
                data["shards"] = json!(shards.len().to_string());
            }
            let configmap = json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": self.shard_name(index), "namespace": self.namespace},
                "data": data,
            });
            api.patch(&self.shard_name(index), &params, &Patch::Apply(&configmap))
                .await
                .map_err(EngineError::Inventory)?;
        }
        for index in shards.len()..previous_shards {
            match api
                .delete(&self.shard_name(index), &DeleteParams::default())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => return Err(EngineError::Inventory(e)),
            }
        }
        Ok(())
    }
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
