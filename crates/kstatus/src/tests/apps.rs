use serde_json::{Value, json};

use super::compute;
use super::{assert_result, reason};
use crate::Status;

/// A Deployment with 2 replicas whose rollout finished.
fn available_deployment() -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "default", "generation": 4},
        "spec": {"replicas": 2, "progressDeadlineSeconds": 600},
        "status": {
            "observedGeneration": 4, "replicas": 2, "updatedReplicas": 2,
            "readyReplicas": 2, "availableReplicas": 2,
            "conditions": [
                {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                 "message": "ReplicaSet \"web-5d7\" has successfully progressed."},
            ],
        },
    })
}

fn set(object: &mut Value, path: &[&str], value: Value) {
    let (last, parents) = path.split_last().expect("non-empty path");
    let parent = parents.iter().fold(object, |value, key| &mut value[*key]);
    parent[*last] = value;
}

#[test]
fn deployment_available() {
    assert_result(
        &compute(&available_deployment()),
        Status::Current,
        "Deployment is available. Replicas: 2",
    );
}

#[test]
fn deployment_in_progress_on_each_count() {
    let cases: [(&[&str], Value, &str, &str); 5] = [
        (
            &["status", "replicas"],
            json!(1),
            "LessReplicas",
            "Replicas: 1/2",
        ),
        (
            &["status", "updatedReplicas"],
            json!(1),
            "LessUpdated",
            "Updated: 1/2",
        ),
        (
            &["status", "replicas"],
            json!(3),
            "ExtraPods",
            "Pending termination: 1",
        ),
        (
            &["status", "availableReplicas"],
            json!(1),
            "LessAvailable",
            "Available: 1/2",
        ),
        (
            &["status", "readyReplicas"],
            json!(1),
            "LessReady",
            "Ready: 1/2",
        ),
    ];
    for (path, value, expected_reason, message) in cases {
        let mut deployment = available_deployment();
        set(&mut deployment, path, value);
        let result = compute(&deployment);
        assert_result(&result, Status::InProgress, message);
        assert_eq!(reason(&result), expected_reason);
    }
}

#[test]
fn deployment_defaults_to_one_replica() {
    let mut deployment = available_deployment();
    deployment["spec"]
        .as_object_mut()
        .unwrap()
        .remove("replicas");
    deployment["status"] =
        json!({"observedGeneration": 4, "conditions": deployment["status"]["conditions"].clone()});
    assert_result(&compute(&deployment), Status::InProgress, "Replicas: 0/1");
}

#[test]
fn deployment_progress_deadline_exceeded_is_failed() {
    let mut deployment = available_deployment();
    set(&mut deployment, &["status", "readyReplicas"], json!(1));
    set(
        &mut deployment,
        &["status", "conditions"],
        json!([{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                "message": "ReplicaSet \"web-6f8\" has timed out progressing."}]),
    );
    let result = compute(&deployment);
    assert_result(&result, Status::Failed, "Progress deadline exceeded");
    assert_eq!(reason(&result), "ProgressDeadlineExceeded");
    assert_eq!(
        result.conditions[0].message,
        "ReplicaSet \"web-6f8\" has timed out progressing."
    );
}

#[test]
fn deployment_waits_for_new_replica_set_when_progress_is_tracked() {
    let mut deployment = available_deployment();
    deployment["status"]["conditions"][1] =
        json!({"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"});
    assert_result(
        &compute(&deployment),
        Status::InProgress,
        "ReplicaSet not Available",
    );
}

#[test]
fn deployment_without_progress_deadline_needs_no_progressing_condition() {
    let mut deployment = available_deployment();
    deployment["spec"]
        .as_object_mut()
        .unwrap()
        .remove("progressDeadlineSeconds");
    set(
        &mut deployment,
        &["status", "conditions"],
        json!([{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}]),
    );
    assert_eq!(compute(&deployment).status, Status::Current);
}

#[test]
fn deployment_not_available_condition() {
    let mut deployment = available_deployment();
    deployment["status"]["conditions"][0]["status"] = json!("False");
    assert_result(
        &compute(&deployment),
        Status::InProgress,
        "Deployment not Available",
    );
}

#[test]
fn deployment_with_unobserved_generation() {
    let mut deployment = available_deployment();
    set(&mut deployment, &["metadata", "generation"], json!(5));
    assert_result(
        &compute(&deployment),
        Status::InProgress,
        "Deployment generation is 5, but latest observed generation is 4",
    );
}

#[test]
fn deployment_in_extensions_group_uses_the_same_rules() {
    let mut deployment = available_deployment();
    set(
        &mut deployment,
        &["apiVersion"],
        json!("extensions/v1beta1"),
    );
    set(&mut deployment, &["status", "readyReplicas"], json!(0));
    assert_result(&compute(&deployment), Status::InProgress, "Ready: 0/2");
}

fn stateful_set(spec: Value, status: Value) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "db", "generation": 2},
        "spec": spec,
        "status": status,
    })
}

fn rolled_out_status() -> Value {
    json!({
        "observedGeneration": 2, "replicas": 3, "readyReplicas": 3, "currentReplicas": 3,
        "updatedReplicas": 3, "currentRevision": "db-7c9", "updateRevision": "db-7c9",
    })
}

#[test]
fn stateful_set_rolled_out() {
    let sts = stateful_set(json!({"replicas": 3}), rolled_out_status());
    assert_result(
        &compute(&sts),
        Status::Current,
        "All replicas scheduled as expected. Replicas: 3",
    );
}

#[test]
fn stateful_set_in_progress_cases() {
    let cases = [
        ("replicas", json!(2), "Replicas: 2/3"),
        ("readyReplicas", json!(1), "Ready: 1/3"),
        ("replicas", json!(4), "Pending termination: 1"),
        ("currentReplicas", json!(2), "current: 2/3"),
        (
            "updateRevision",
            json!("db-8d0"),
            "Waiting for updated revision to match current",
        ),
    ];
    for (field, value, message) in cases {
        let mut status = rolled_out_status();
        status[field] = value;
        assert_result(
            &compute(&stateful_set(json!({"replicas": 3}), status)),
            Status::InProgress,
            message,
        );
    }
}

#[test]
fn stateful_set_partition_rollout() {
    let spec = json!({"replicas": 3, "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 1}}});
    let mut status = rolled_out_status();
    status["updatedReplicas"] = json!(1);
    status["updateRevision"] = json!("db-8d0");
    let result = compute(&stateful_set(spec.clone(), status.clone()));
    assert_result(&result, Status::InProgress, "updated: 1/2");
    assert_eq!(reason(&result), "PartitionRollout");

    // Pods below the partition keep the old revision: done once 2 are updated.
    status["updatedReplicas"] = json!(2);
    assert_result(
        &compute(&stateful_set(spec, status)),
        Status::Current,
        "Partition rollout complete. updated: 2",
    );
}

#[test]
fn stateful_set_on_delete_is_user_managed() {
    let spec = json!({"replicas": 3, "updateStrategy": {"type": "OnDelete"}});
    let status = json!({"observedGeneration": 2, "replicas": 1});
    assert_result(
        &compute(&stateful_set(spec, status)),
        Status::Current,
        "StatefulSet is using the ondelete update strategy",
    );
}

fn daemon_set(status: Value) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "node-exporter", "generation": 1},
        "spec": {"selector": {"matchLabels": {"app": "node-exporter"}}},
        "status": status,
    })
}

fn daemon_set_status_all(count: i64) -> Value {
    json!({
        "observedGeneration": 1, "desiredNumberScheduled": count, "currentNumberScheduled": count,
        "updatedNumberScheduled": count, "numberAvailable": count, "numberReady": count,
    })
}

#[test]
fn daemon_set_on_every_node() {
    assert_result(
        &compute(&daemon_set(daemon_set_status_all(3))),
        Status::Current,
        "All replicas scheduled as expected. Replicas: 3",
    );
}

#[test]
fn daemon_set_in_progress_cases() {
    let cases = [
        ("currentNumberScheduled", "Current: 2/3"),
        ("updatedNumberScheduled", "Updated: 2/3"),
        ("numberAvailable", "Available: 2/3"),
        ("numberReady", "Ready: 2/3"),
    ];
    for (field, message) in cases {
        let mut status = daemon_set_status_all(3);
        status[field] = json!(2);
        assert_result(&compute(&daemon_set(status)), Status::InProgress, message);
    }
}

#[test]
fn daemon_set_not_yet_seen_by_its_controller() {
    let result = compute(&daemon_set(json!({})));
    assert_result(
        &result,
        Status::InProgress,
        "DaemonSet status.observedGeneration not found",
    );
    assert_eq!(reason(&result), "NoObservedGeneration");

    let mut no_generation = daemon_set(daemon_set_status_all(1));
    no_generation["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("generation");
    assert_result(
        &compute(&no_generation),
        Status::InProgress,
        "DaemonSet metadata.generation not found",
    );

    let result = compute(&daemon_set(json!({"observedGeneration": 1})));
    assert_result(
        &result,
        Status::InProgress,
        "Missing .status.desiredNumberScheduled",
    );
}

fn replica_set(status: Value) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": "web-5d7", "generation": 1},
        "spec": {"replicas": 2},
        "status": status,
    })
}

fn replica_set_status_all(count: i64) -> Value {
    json!({
        "observedGeneration": 1, "replicas": count, "fullyLabeledReplicas": count,
        "readyReplicas": count, "availableReplicas": count,
    })
}

#[test]
fn replica_set_available() {
    assert_result(
        &compute(&replica_set(replica_set_status_all(2))),
        Status::Current,
        "ReplicaSet is available. Replicas: 2",
    );
}

#[test]
fn replica_set_in_progress_cases() {
    let cases = [
        ("fullyLabeledReplicas", json!(1), "Labelled: 1/2"),
        ("availableReplicas", json!(1), "Available: 1/2"),
        ("readyReplicas", json!(1), "Ready: 1/2"),
        ("replicas", json!(3), "Pending termination: 1"),
    ];
    for (field, value, message) in cases {
        let mut status = replica_set_status_all(2);
        status[field] = value;
        assert_result(&compute(&replica_set(status)), Status::InProgress, message);
    }
}

#[test]
fn replica_set_failure_keeps_retrying() {
    let mut status = replica_set_status_all(0);
    status["conditions"] = json!([{"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
                                   "message": "pods \"web-5d7-x\" is forbidden: exceeded quota"}]);
    let result = compute(&replica_set(status));
    assert_result(
        &result,
        Status::InProgress,
        "Replica Failure condition. Check Pods",
    );
    assert_eq!(reason(&result), "ReplicaFailure");
}
