//! Kinds to API resources by discovery: scope, default namespace, keys; kinds defined by a CRD of the
//! same set are discovered again once that CRD is applied and established.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use kube::Client;
use kube::api::{Api, DynamicObject};
use kube::core::GroupVersionKind;
use kube::discovery::{ApiResource, Discovery, Scope};

use crate::decode::{DecodedObject, ObjectOrigin};
use crate::error::EngineError;
use crate::key::{ObjectKey, split_api_version};

pub(crate) const CRD_GROUP: &str = "apiextensions.k8s.io";
pub(crate) const CRD_KIND: &str = "CustomResourceDefinition";
/// How long a CRD applied in this sync may take to be established before its custom resources fail.
const CRD_ESTABLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// How an object's kind was resolved.
#[derive(Debug, Clone)]
pub(crate) enum Resolution {
    Served(ApiResource),
    /// Defined by a CRD in this set that the cluster does not serve yet: discovered after it is applied.
    Pending(GroupVersionKind),
    /// Neither served nor defined in the set: fails (with this message) when its turn comes.
    Unknown(String),
}

pub(crate) struct Resolved {
    pub key: ObjectKey,
    pub origin: ObjectOrigin,
    pub object: DynamicObject,
    pub resolution: Resolution,
}

/// Resolves each object's kind, defaults namespaces and computes keys. Returns the objects to order and
/// the duplicates (an object defined twice: the first definition wins).
pub(crate) fn resolve_objects(
    decoded: Vec<DecodedObject>,
    discovery: &Discovery,
    default_namespace: &str,
) -> (Vec<Resolved>, Vec<(ObjectKey, ObjectOrigin, EngineError)>) {
    let crd_scopes = crd_scopes(&decoded);
    let mut duplicates = Vec::new();
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
                object.metadata.namespace = Some(default_namespace.to_string());
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
            duplicates.push((key, origin, e));
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
    (resolved, duplicates)
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
pub(crate) async fn discover(
    client: &Client,
    groups: &BTreeSet<String>,
) -> Result<Discovery, EngineError> {
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

/// The resource of a kind defined by a CRD of this set, once that CRD was applied.
pub(crate) fn served_after_crds(
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
pub(crate) async fn refresh_after_crds(
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
    let deadline = tokio::time::Instant::now() + CRD_ESTABLISH_TIMEOUT;
    let mut served: Vec<GroupVersionKind> = Vec::new();
    for name in crds_applied.drain(..) {
        let crd = wait_established(&api, &name)
            .await
            .map_err(|e| e.to_string())?;
        served.extend(served_kinds(&crd));
    }
    // Discovery catches up with an Established CRD a moment later, more so on a busy apiserver: look
    // again until its kinds show (or the same deadline passes; then they fail as not served).
    loop {
        *discovery = discover(client, groups).await.map_err(|e| e.to_string())?;
        let all_served = served
            .iter()
            .all(|gvk| discovery.resolve_gvk(gvk).is_some());
        if all_served || tokio::time::Instant::now() >= deadline {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The kinds a CRD serves: its group and kind in each served version.
fn served_kinds(crd: &DynamicObject) -> Vec<GroupVersionKind> {
    let spec = &crd.data["spec"];
    let (Some(group), Some(kind)) = (spec["group"].as_str(), spec["names"]["kind"].as_str()) else {
        return Vec::new();
    };
    spec["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["served"] == true)
        .filter_map(|v| Some(GroupVersionKind::gvk(group, v["name"].as_str()?, kind)))
        .collect()
}

/// Waits until the CRD `name` is Established; returns it.
async fn wait_established(
    api: &Api<DynamicObject>,
    name: &str,
) -> Result<DynamicObject, EngineError> {
    let deadline = tokio::time::Instant::now() + CRD_ESTABLISH_TIMEOUT;
    loop {
        let crd = api.get(name).await.map_err(EngineError::Kube)?;
        let established = crd.data["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Established" && c["status"] == "True");
        if established {
            return Ok(crd);
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
