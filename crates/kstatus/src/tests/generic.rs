use serde_json::json;

use super::compute;
use super::{assert_result, reason};
use crate::Status;

#[test]
fn deletion_timestamp_is_terminating_whatever_the_status_says() {
    let object = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "generation": 3, "deletionTimestamp": "2026-01-01T00:00:00Z"},
        "status": {"observedGeneration": 1},
    });
    assert_result(
        &compute(&object),
        Status::Terminating,
        "Resource scheduled for deletion",
    );
}

#[test]
fn empty_deletion_timestamp_is_ignored() {
    let object =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"deletionTimestamp": ""}});
    assert_eq!(compute(&object).status, Status::Current);
}

#[test]
fn unobserved_generation_is_in_progress() {
    let object = json!({
        "apiVersion": "example.com/v1", "kind": "Widget",
        "metadata": {"name": "w", "generation": 3},
        "status": {"observedGeneration": 2},
    });
    let result = compute(&object);
    assert_result(
        &result,
        Status::InProgress,
        "Widget generation is 3, but latest observed generation is 2",
    );
    assert_eq!(reason(&result), "LatestGenerationNotObserved");
}

#[test]
fn observed_generation_and_no_conditions_is_current() {
    let object = json!({
        "apiVersion": "example.com/v1", "kind": "Widget",
        "metadata": {"generation": 3}, "status": {"observedGeneration": 3},
    });
    assert_result(&compute(&object), Status::Current, "Resource is current");
}

#[test]
fn missing_observed_generation_is_not_checked_for_unknown_kinds() {
    let object =
        json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"generation": 7}});
    assert_eq!(compute(&object).status, Status::Current);
}

#[test]
fn reconciling_true_is_in_progress_with_its_message() {
    let object = json!({
        "apiVersion": "example.com/v1", "kind": "Widget", "metadata": {},
        "status": {"conditions": [
            {"type": "Ready", "status": "False"},
            {"type": "Reconciling", "status": "True", "reason": "Provisioning", "message": "creating bucket"},
        ]},
    });
    let result = compute(&object);
    assert_result(&result, Status::InProgress, "creating bucket");
    assert_eq!(reason(&result), "Provisioning");
}

#[test]
fn stalled_true_is_failed_even_for_builtin_kinds() {
    let object = json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {},
        "spec": {"replicas": 2},
        "status": {"replicas": 0, "conditions": [
            {"type": "Stalled", "status": "True", "reason": "QuotaExceeded", "message": "quota exceeded"},
        ]},
    });
    let result = compute(&object);
    assert_result(&result, Status::Failed, "quota exceeded");
    assert_eq!(reason(&result), "QuotaExceeded");
}

#[test]
fn false_standard_conditions_do_not_decide() {
    let object = json!({
        "apiVersion": "example.com/v1", "kind": "Widget", "metadata": {},
        "status": {"conditions": [
            {"type": "Reconciling", "status": "False"},
            {"type": "Stalled", "status": "False"},
        ]},
    });
    assert_result(&compute(&object), Status::Current, "Resource is current");
}

#[test]
fn a_custom_resource_not_ready_is_in_progress() {
    // Without a kind-specific rule, `Ready=False` (or `Unknown`) means the controller is not done: a
    // dependent must not be applied yet.
    for status in ["False", "Unknown"] {
        let object = json!({
            "apiVersion": "example.com/v1", "kind": "Widget", "metadata": {},
            "status": {"conditions": [{"type": "Ready", "status": status, "reason": "Pending",
                                       "message": "waiting for the database"}]},
        });
        let result = compute(&object);
        assert_result(
            &result,
            Status::InProgress,
            "Ready condition is not True (Pending): waiting for the database",
        );
        assert_eq!(reason(&result), "Pending");
    }
    let ready = json!({
        "apiVersion": "example.com/v1", "kind": "Widget", "metadata": {},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    });
    assert_result(&compute(&ready), Status::Current, "Resource is current");
    // Stalled still wins: the controller gave up.
    let stalled = json!({
        "apiVersion": "example.com/v1", "kind": "Widget", "metadata": {},
        "status": {"conditions": [{"type": "Ready", "status": "False"},
                                  {"type": "Stalled", "status": "True", "message": "bad spec"}]},
    });
    assert_eq!(compute(&stalled).status, Status::Failed);
    // Kinds with their own rule keep it: a Pod's Ready is read by the Pod rule.
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {},
        "status": {"phase": "Succeeded", "conditions": [{"type": "Ready", "status": "False"}]},
    });
    assert_eq!(compute(&pod).status, Status::Current);
}

#[test]
fn always_ready_kinds_are_current() {
    for (api_version, kind) in [
        ("v1", "ConfigMap"),
        ("v1", "Secret"),
        ("batch/v1", "CronJob"),
    ] {
        let object = json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": "x"}});
        assert_result(
            &compute(&object),
            Status::Current,
            "Resource is always ready",
        );
    }
}

#[test]
fn kind_in_another_group_gets_no_builtin_rule() {
    // A CRD's "Deployment" is not apps/Deployment.
    let object = json!({"apiVersion": "example.com/v1", "kind": "Deployment", "metadata": {}, "spec": {"replicas": 3}});
    assert_result(&compute(&object), Status::Current, "Resource is current");
}

#[test]
fn status_displays_as_kstatus_spells_it() {
    let spelled: Vec<String> = [
        Status::InProgress,
        Status::Failed,
        Status::Current,
        Status::Terminating,
        Status::NotFound,
        Status::Unknown,
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    assert_eq!(
        spelled,
        [
            "InProgress",
            "Failed",
            "Current",
            "Terminating",
            "NotFound",
            "Unknown"
        ]
    );
}
