//! Whether a server-side apply changed anything (configured or unchanged), and whether one is needed at all.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::FieldsV1;
use kube::api::DynamicObject;
use serde_json::Value;

use crate::inventory::MANIFEST_DIGEST_ANNOTATION;

/// Whether an apply that moved the resourceVersion (or was a dry run, which never moves it) changed what
/// we manage. The resourceVersion alone over-reports: between our read and our apply, controllers write
/// status and annotations (a Deployment's `deployment.kubernetes.io/revision`). So compare, before and
/// after, the fields the manifest sets (both sides in the server's normalized form) and the set of
/// fields our field manager owns (which catches fields the manifest stopped setting and SSA removed).
pub(crate) fn apply_changed(
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

/// Whether `live` already holds everything `desired` sets, so a server-side apply would change nothing
/// and need not be sent. Conservative: `desired` must have been applied before in exactly this form
/// (`digest` equals the [`MANIFEST_DIGEST_ANNOTATION`] the last apply stored, which catches fields the
/// manifest stopped setting), and every value it sets must be in the live object as written. Manifests
/// the apiserver normalizes (`cpu: 0.5` stored as `500m`, `stringData`) never match and are simply
/// applied every time, which is correct, only not free.
pub(crate) fn live_matches(live: &DynamicObject, desired: &DynamicObject, digest: &str) -> bool {
    let recorded = live
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(MANIFEST_DIGEST_ANNOTATION));
    if recorded.map(String::as_str) != Some(digest) {
        return false;
    }
    let Ok(mut shape) = serde_json::to_value(desired) else {
        return false;
    };
    // List items from the apiserver carry no apiVersion and kind; they are not ours to compare anyway.
    if let Some(shape) = shape.as_object_mut() {
        shape.remove("apiVersion");
        shape.remove("kind");
    }
    serde_json::to_value(live).is_ok_and(|live| project(&live, &shape) == shape)
}

/// A digest of the manifest as applied (without the digest annotation itself), stored on the object in
/// [`MANIFEST_DIGEST_ANNOTATION`] so a later sync can tell, without writing, that it was applied as is.
pub(crate) fn manifest_digest(desired: &DynamicObject) -> String {
    use sha2::{Digest, Sha256};
    let bytes = serde_json::to_vec(desired).unwrap_or_default();
    hex::encode(&Sha256::digest(&bytes)[..16])
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

    fn object(value: serde_json::Value) -> DynamicObject {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn live_object_matches_only_with_the_same_digest_and_values() {
        let desired = object(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "x", "namespace": "ns", "annotations": {"a": "1"}},
            "data": {"k": "v"}
        }));
        let digest = manifest_digest(&desired);
        let live = |digest: &str, value: &str| {
            object(json!({
                "metadata": {"name": "x", "namespace": "ns", "resourceVersion": "7",
                             "annotations": {"a": "1", MANIFEST_DIGEST_ANNOTATION: digest}},
                "data": {"k": value}
            }))
        };
        assert!(live_matches(&live(&digest, "v"), &desired, &digest));
        assert!(
            !live_matches(&live(&digest, "edited"), &desired, &digest),
            "drift"
        );
        assert!(
            !live_matches(&live("other", "v"), &desired, &digest),
            "manifest changed"
        );
        let mut without = live(&digest, "v");
        without.metadata.annotations = None;
        assert!(
            !live_matches(&without, &desired, &digest),
            "never applied by us"
        );
    }
}
