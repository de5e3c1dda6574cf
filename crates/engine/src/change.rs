//! Whether a server-side apply changed anything (configured or unchanged), and whether one is needed at all.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::FieldsV1;
use kube::api::DynamicObject;
use serde_json::Value;

use std::collections::HashMap;
use std::sync::Mutex;

use crate::inventory::MANIFEST_DIGEST_ANNOTATION;
use crate::key::ObjectKey;

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

/// `desired` as the shape to compare live objects with: the fields the manifest sets, without apiVersion
/// and kind (list items from the apiserver carry neither; they are not ours to compare anyway).
pub(crate) fn shape_of(desired: &DynamicObject) -> Value {
    let mut shape = serde_json::to_value(desired).unwrap_or_default();
    if let Some(shape) = shape.as_object_mut() {
        shape.remove("apiVersion");
        shape.remove("kind");
    }
    shape
}

/// The live object's values at the manifest's fields.
pub(crate) fn live_form(live: &DynamicObject, shape: &Value) -> Value {
    project(&serde_json::to_value(live).unwrap_or_default(), shape)
}

/// The manifest digest the last apply stored on the object.
pub(crate) fn recorded_digest(live: &DynamicObject) -> Option<&str> {
    live.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(MANIFEST_DIGEST_ANNOTATION))
        .map(String::as_str)
}

/// Whether `live` already holds everything `desired` (as `shape`) sets, so a server-side apply would
/// change nothing and need not be sent. Conservative: the manifest must have been applied before in exactly
/// this form (`digest` equals the [`MANIFEST_DIGEST_ANNOTATION`] the last apply stored, which catches fields
/// the manifest stopped setting), and every value it sets must be in the live object — as written, or as
/// `forms` recorded the apiserver's normalised form right after this process applied it (`cpu: 1` is
/// stored as "1", `cpu: 0.5` as "500m").
pub(crate) fn live_matches(
    live: &DynamicObject,
    key: &ObjectKey,
    shape: &Value,
    digest: &str,
    forms: Option<&AppliedForms>,
) -> bool {
    if recorded_digest(live) != Some(digest) {
        return false;
    }
    let form = live_form(live, shape);
    &form == shape || forms.is_some_and(|forms| forms.matches(key, digest, &form))
}

/// What the apiserver made of the manifests this process applied: per object, the manifest digest and a
/// hash of the object's values at the manifest's fields right after the apply. Until someone changes the
/// object, a later check finds the same values, even where the apiserver normalised what the manifest
/// says, and nothing needs writing. Kept in memory (after a restart, such objects are applied once more).
#[derive(Debug, Default)]
pub struct AppliedForms(Mutex<HashMap<ObjectKey, (String, u64)>>);

impl AppliedForms {
    fn matches(&self, key: &ObjectKey, digest: &str, form: &Value) -> bool {
        let forms = self.0.lock().expect("applied forms lock poisoned");
        forms
            .get(key)
            .is_some_and(|(d, hash)| d == digest && *hash == form_hash(form))
    }

    pub(crate) fn remember(&self, key: &ObjectKey, digest: &str, form: &Value) {
        let mut forms = self.0.lock().expect("applied forms lock poisoned");
        forms.insert(key.clone(), (digest.to_owned(), form_hash(form)));
    }

    /// Forgets objects no longer in the set.
    pub(crate) fn retain(&self, keep: impl Fn(&ObjectKey) -> bool) {
        let mut forms = self.0.lock().expect("applied forms lock poisoned");
        forms.retain(|key, _| keep(key));
    }
}

fn form_hash(form: &Value) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_vec(form)
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
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
        let key = ObjectKey::from_resource_key("/ConfigMap/ns/x").unwrap();
        let (digest, shape) = (manifest_digest(&desired), shape_of(&desired));
        let live = |digest: &str, value: &str| {
            object(json!({
                "metadata": {"name": "x", "namespace": "ns", "resourceVersion": "7",
                             "annotations": {"a": "1", MANIFEST_DIGEST_ANNOTATION: digest}},
                "data": {"k": value}
            }))
        };
        let matches =
            |live: &DynamicObject, forms| live_matches(live, &key, &shape, &digest, forms);
        assert!(matches(&live(&digest, "v"), None));
        assert!(!matches(&live(&digest, "edited"), None), "drift");
        assert!(!matches(&live("other", "v"), None), "manifest changed");
        let mut without = live(&digest, "v");
        without.metadata.annotations = None;
        assert!(!matches(&without, None), "never applied by us");

        // The apiserver stored "V" for "v" (as it normalises quantities): recorded right after the apply,
        // that form matches until the object changes.
        let forms = AppliedForms::default();
        let normalised = live(&digest, "V");
        assert!(!matches(&normalised, Some(&forms)));
        forms.remember(&key, &digest, &live_form(&normalised, &shape));
        assert!(matches(&normalised, Some(&forms)));
        assert!(!matches(&live(&digest, "edited"), Some(&forms)), "drift");
    }
}
