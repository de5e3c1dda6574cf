use serde_json::{Value, json};

use super::compute;
use super::{assert_result, reason};
use crate::Status;

fn pod(status: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-5d7-abcde", "namespace": "default", "creationTimestamp": "2026-11-27T01:00:00Z"},
        "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]},
        "status": status,
    })
}

#[test]
fn pod_running_and_ready() {
    let status = json!({"phase": "Running", "conditions": [
        {"type": "PodScheduled", "status": "True"},
        {"type": "ContainersReady", "status": "True"},
        {"type": "Ready", "status": "True"},
    ]});
    assert_result(&compute(&pod(status)), Status::Current, "Pod is Ready");
}

#[test]
fn pod_running_not_ready() {
    let status = json!({
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "False", "reason": "ContainersNotReady"}],
        "containerStatuses": [{"name": "web", "ready": false, "state": {"running": {"startedAt": "2026-11-27T01:00:05Z"}}}],
    });
    let result = compute(&pod(status));
    assert_result(
        &result,
        Status::InProgress,
        "Pod is running but is not Ready",
    );
    assert_eq!(reason(&result), "PodRunningNotReady");
}

#[test]
fn pod_crash_looping_is_failed() {
    let status = json!({
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "False"}],
        "containerStatuses": [
            {"name": "web", "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 5m0s"}}},
            {"name": "sidecar", "state": {"running": {}}},
            {"name": "init-like", "state": {"waiting": {"reason": "CrashLoopBackOff"}}},
            {"state": {"waiting": {"reason": "CrashLoopBackOff"}}},
            "not an object",
        ],
    });
    let result = compute(&pod(status));
    assert_result(
        &result,
        Status::Failed,
        "Containers in CrashLoop state: web,init-like",
    );
    assert_eq!(reason(&result), "ContainerCrashLooping");
}

#[test]
fn pod_finished_phases_are_current() {
    assert_result(
        &compute(&pod(json!({"phase": "Succeeded"}))),
        Status::Current,
        "Pod has completed successfully",
    );
    assert_result(
        &compute(&pod(json!({"phase": "Failed"}))),
        Status::Current,
        "Pod has completed, but not successfully",
    );
}

#[test]
fn pod_pending() {
    let status =
        json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}]});
    assert_result(
        &compute(&pod(status)),
        Status::InProgress,
        "Pod is in the Pending phase",
    );
}

#[test]
fn pod_unschedulable_is_in_progress_for_the_schedule_window() {
    let status = json!({"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"},
    ]});
    let object = pod(status);
    let created = crate::fields::timestamp(&object, &["metadata", "creationTimestamp"]).unwrap();
    let at =
        |seconds| crate::compute_at(&object, created + std::time::Duration::from_secs(seconds));
    let result = at(5);
    assert_result(&result, Status::InProgress, "Pod has not been scheduled");
    assert_eq!(reason(&result), "PodNotScheduled");
    assert_eq!(at(14).status, Status::InProgress);
    assert_eq!(at(15).status, Status::Failed);
    // No readable creation time: past the window, as kstatus' zero time is.
    let mut undated = object.clone();
    undated["metadata"]["creationTimestamp"] = json!("yesterday");
    assert_eq!(crate::compute_at(&undated, created).status, Status::Failed);
    // No clock: the window is over.
    assert_eq!(crate::compute(&object).status, Status::Failed);
}

#[test]
fn pod_unschedulable_is_failed() {
    let status = json!({"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/3 nodes are available: 3 Insufficient cpu."},
    ]});
    let result = compute(&pod(status));
    assert_result(&result, Status::Failed, "Pod could not be scheduled");
    assert_eq!(reason(&result), "PodUnschedulable");
}

#[test]
fn pod_without_phase_is_not_observed_yet() {
    assert_result(
        &compute(&pod(json!({}))),
        Status::InProgress,
        "Pod phase not available",
    );
    let mut no_status = pod(json!({}));
    no_status.as_object_mut().unwrap().remove("status");
    assert_eq!(compute(&no_status).status, Status::InProgress);
}

#[test]
fn pod_with_unknown_phase_is_unknown() {
    let result = compute(&pod(json!({"phase": "Exploded"})));
    assert_result(&result, Status::Unknown, "unknown phase Exploded");
}

fn service(spec: Value, status: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": spec, "status": status,
    })
}

#[test]
fn cluster_ip_service_is_current() {
    let svc = service(
        json!({"type": "ClusterIP", "clusterIP": "10.96.0.12", "ports": [{"port": 80}]}),
        json!({}),
    );
    assert_result(&compute(&svc), Status::Current, "Service is ready");
    let defaulted_type = service(json!({"ports": [{"port": 80}]}), json!({}));
    assert_eq!(compute(&defaulted_type).status, Status::Current);
}

#[test]
fn load_balancer_is_current_once_it_has_a_cluster_ip() {
    // As in kstatus: without a load-balancer controller (kind, bare metal) the ingress address never
    // comes, and waiting for it would hold every sync for reconcile_timeout.
    let spec = json!({"type": "LoadBalancer", "clusterIP": "10.96.0.12"});
    for status in [
        json!({}),
        json!({"loadBalancer": {}}),
        json!({"loadBalancer": {"ingress": [{"ports": []}]}}),
    ] {
        assert_result(
            &compute(&service(spec.clone(), status)),
            Status::Current,
            "Service is ready (its load balancer has no ingress address yet)",
        );
    }
    for ingress in [
        json!({"ip": "203.0.113.7"}),
        json!({"hostname": "a1b2.elb.example.com"}),
    ] {
        let status = json!({"loadBalancer": {"ingress": [ingress]}});
        assert_result(
            &compute(&service(spec.clone(), status)),
            Status::Current,
            "Service is ready",
        );
    }
    let result = compute(&service(json!({"type": "LoadBalancer"}), json!({})));
    assert_result(
        &result,
        Status::InProgress,
        "ClusterIP not set. Service type: LoadBalancer",
    );
    assert_eq!(reason(&result), "NoIPAssigned");
}

fn pvc(status: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        "status": status,
    })
}

#[test]
fn pvc_bound_is_current() {
    assert_result(
        &compute(&pvc(json!({"phase": "Bound"}))),
        Status::Current,
        "PVC is Bound",
    );
}

#[test]
fn pvc_pending_or_unreported_is_in_progress() {
    let result = compute(&pvc(json!({"phase": "Pending"})));
    assert_result(
        &result,
        Status::InProgress,
        "PVC is not Bound. phase: Pending",
    );
    assert_eq!(reason(&result), "NotBound");
    assert_result(
        &compute(&pvc(json!({}))),
        Status::InProgress,
        "PVC is not Bound. phase: unknown",
    );
}
