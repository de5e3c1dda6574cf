//! Whether a server-side apply changed anything: configured or unchanged.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::FieldsV1;
use kube::api::DynamicObject;
use serde_json::Value;

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
