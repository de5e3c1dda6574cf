use serde_json::{Value, json};

use super::compute;
use super::{assert_result, reason};
use crate::Status;

fn job(spec: Value, status: Value) -> Value {
    json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "migrate", "generation": 1},
        "spec": spec, "status": status,
    })
}

#[test]
fn job_not_started() {
    let result = compute(&job(json!({"completions": 1}), json!({})));
    assert_result(&result, Status::InProgress, "Job not started");
    assert_eq!(reason(&result), "JobNotStarted");
}

#[test]
fn job_running_is_current() {
    let status = json!({"startTime": "2026-11-27T01:00:00Z", "active": 2, "succeeded": 1});
    assert_result(
        &compute(&job(json!({"parallelism": 2, "completions": 4}), status)),
        Status::Current,
        "Job in progress. success:1, active: 2, failed: 0",
    );
}

#[test]
fn job_complete() {
    let status = json!({
        "startTime": "2026-11-27T01:00:00Z", "completionTime": "2026-11-27T01:00:30Z", "succeeded": 3,
        "conditions": [{"type": "Complete", "status": "True"}],
    });
    // completions defaults to parallelism.
    assert_result(
        &compute(&job(json!({"parallelism": 3}), status)),
        Status::Current,
        "Job Completed. succeeded: 3/3",
    );
}

#[test]
fn job_failed() {
    let status = json!({
        "startTime": "2026-11-27T01:00:00Z", "failed": 7,
        "conditions": [
            {"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded"},
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"},
        ],
    });
    let result = compute(&job(json!({"backoffLimit": 6}), status));
    assert_result(&result, Status::Failed, "Job Failed. failed: 7/1");
    assert_eq!(reason(&result), "JobFailed");
}

#[test]
fn job_suspended_is_current() {
    let status =
        json!({"conditions": [{"type": "Suspended", "status": "True", "reason": "JobSuspended"}]});
    assert_result(
        &compute(&job(json!({"suspend": true}), status)),
        Status::Current,
        "Job is suspended",
    );
}

fn crd(conditions: Value) -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com", "generation": 1},
        "spec": {"group": "example.com", "names": {"kind": "Widget", "plural": "widgets"}, "scope": "Namespaced"},
        "status": {"conditions": conditions},
    })
}

#[test]
fn crd_established() {
    let conditions = json!([
        {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts"},
        {"type": "Established", "status": "True", "reason": "InitialNamesAccepted"},
    ]);
    assert_result(
        &compute(&crd(conditions)),
        Status::Current,
        "CRD is established",
    );
}

#[test]
fn crd_installing() {
    let installing = json!([
        {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts"},
        {"type": "Established", "status": "False", "reason": "Installing"},
    ]);
    let result = compute(&crd(installing));
    assert_result(&result, Status::InProgress, "Install in progress");
    assert_eq!(reason(&result), "Installing");
    assert_eq!(compute(&crd(json!([]))).status, Status::InProgress);
}

#[test]
fn crd_name_conflict_is_failed() {
    let conditions = json!([
        {"type": "NamesAccepted", "status": "False", "reason": "ListKindConflict",
         "message": "\"WidgetList\" is already in use"},
        {"type": "Established", "status": "False", "reason": "NotAccepted"},
    ]);
    let result = compute(&crd(conditions));
    assert_result(&result, Status::Failed, "\"WidgetList\" is already in use");
    assert_eq!(reason(&result), "ListKindConflict");
}

#[test]
fn crd_not_established_for_another_reason_is_failed() {
    let conditions = json!([{"type": "Established", "status": "False", "reason": "NotAccepted", "message": "not accepted"}]);
    assert_result(&compute(&crd(conditions)), Status::Failed, "not accepted");
}

fn pdb(status: Value) -> Value {
    json!({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "web", "generation": 2},
        "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": "web"}}},
        "status": status,
    })
}

#[test]
fn pdb_budget_met() {
    let status = json!({"observedGeneration": 2, "currentHealthy": 3, "desiredHealthy": 2, "disruptionsAllowed": 1, "expectedPods": 3});
    assert_result(
        &compute(&pdb(status)),
        Status::Current,
        "Budget is met. Healthy: 3/2",
    );
}

#[test]
fn pdb_too_few_healthy() {
    let status = json!({"observedGeneration": 2, "currentHealthy": 1, "desiredHealthy": 2, "disruptionsAllowed": 0});
    let result = compute(&pdb(status));
    assert_result(&result, Status::InProgress, "Healthy: 1/2");
    assert_eq!(reason(&result), "LessHealthy");
}

#[test]
fn pdb_not_yet_observed() {
    let result = compute(&pdb(json!({})));
    assert_result(
        &result,
        Status::InProgress,
        "PodDisruptionBudget status.observedGeneration not found",
    );
    let stale = compute(&pdb(
        json!({"observedGeneration": 1, "currentHealthy": 3, "desiredHealthy": 2}),
    ));
    assert_eq!(reason(&stale), "LatestGenerationNotObserved");
}
