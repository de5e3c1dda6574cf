use serde_json::{Value, json};

use super::compute;
use crate::Status;

#[test]
fn non_objects_are_unknown() {
    for value in [
        Value::Null,
        json!(1),
        json!("Deployment"),
        json!([{"kind": "Pod"}]),
        json!(true),
    ] {
        let result = compute(&value);
        assert_eq!(result.status, Status::Unknown);
        assert_eq!(result.message, "Object is not a JSON object");
    }
}

#[test]
fn empty_object_is_current() {
    // Nothing says otherwise, as kstatus decides for an unknown kind.
    assert_eq!(compute(&json!({})).status, Status::Current);
}

#[test]
fn conditions_that_are_not_a_list_are_unknown() {
    let object = json!({"apiVersion": "v1", "kind": "Widget", "status": {"conditions": "Ready"}});
    let result = compute(&object);
    assert_eq!(result.status, Status::Unknown);
    assert_eq!(result.message, "status.conditions is not a list");
}

#[test]
fn condition_entries_that_are_not_objects_are_unknown() {
    let object =
        json!({"apiVersion": "v1", "kind": "Widget", "status": {"conditions": ["Ready", 1]}});
    assert_eq!(compute(&object).status, Status::Unknown);
}

#[test]
fn non_integer_generation_is_unknown() {
    let object =
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"generation": "two"}});
    let result = compute(&object);
    assert_eq!(result.status, Status::Unknown);
    assert_eq!(result.message, "metadata.generation is not an integer");
}

#[test]
fn non_integer_observed_generation_is_unknown() {
    let object = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"generation": 2}, "status": {"observedGeneration": 1.5},
    });
    assert_eq!(compute(&object).status, Status::Unknown);
}

#[test]
fn odd_field_types_fall_back_to_defaults_without_panicking() {
    let odd_values = [
        json!(null),
        json!("x"),
        json!([]),
        json!({}),
        json!(-1),
        json!(1e300),
        json!(i64::MAX),
    ];
    let kinds = [
        ("apps/v1", "Deployment"),
        ("apps/v1", "StatefulSet"),
        ("apps/v1", "DaemonSet"),
        ("apps/v1", "ReplicaSet"),
        ("v1", "Pod"),
        ("v1", "Service"),
        ("v1", "PersistentVolumeClaim"),
        ("batch/v1", "Job"),
        ("policy/v1", "PodDisruptionBudget"),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition"),
    ];
    for (api_version, kind) in kinds {
        for odd in &odd_values {
            let object = json!({
                "apiVersion": api_version, "kind": kind, "metadata": odd,
                "spec": {"replicas": odd, "type": odd, "updateStrategy": odd, "progressDeadlineSeconds": odd},
                "status": {"replicas": odd, "phase": odd, "containerStatuses": odd,
                           "loadBalancer": {"ingress": odd}, "desiredNumberScheduled": odd},
            });
            let _ = compute(&object);
            let whole_status_odd =
                json!({"apiVersion": api_version, "kind": kind, "spec": odd, "status": odd});
            let _ = compute(&whole_status_odd);
        }
    }
}

#[test]
fn non_string_kind_and_api_version_are_treated_as_unknown_kind() {
    let object = json!({"apiVersion": 1, "kind": ["Pod"], "status": {"phase": "Running"}});
    assert_eq!(compute(&object).status, Status::Current);
}
