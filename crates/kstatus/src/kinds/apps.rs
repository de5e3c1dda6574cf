//! Workload controllers of the `apps` group. Their readiness is read from the
//! replica counts in `status`, compared with `spec.replicas` (which the
//! controllers default to 1).

use serde_json::Value;

use crate::Result;
use crate::fields::{self, Malformed, int_or};
use crate::generic;

type RuleResult = std::result::Result<Result, Malformed>;

/// Deployment: all replicas updated, available and ready, no surplus from the
/// old ReplicaSet, and the controller reports `Available=True` and (when it
/// tracks progress) `Progressing=True` with `NewReplicaSetAvailable`.
/// `Progressing` with reason `ProgressDeadlineExceeded` is `Failed`.
pub fn deployment(object: &Value) -> RuleResult {
    // Without spec.progressDeadlineSeconds the controller never sets
    // Progressing, so its absence must not hold the rollout back. Go's
    // math.MaxInt32 is the controller's own "no deadline" spelling.
    let mut progressing = int_or(
        object,
        &["spec", "progressDeadlineSeconds"],
        i64::from(i32::MAX),
    ) == i64::from(i32::MAX);
    let mut available = false;
    for condition in fields::conditions(object)? {
        match condition.condition_type.as_str() {
            "Progressing" => {
                if condition.reason == "ProgressDeadlineExceeded" {
                    let mut result =
                        Result::failed(&condition.reason, "Progress deadline exceeded");
                    // Like kstatus, the Stalled condition carries the controller's
                    // own explanation (which ReplicaSet timed out).
                    result.conditions[0].message = condition.message;
                    return Ok(result);
                }
                if condition.is_true() && condition.reason == "NewReplicaSetAvailable" {
                    progressing = true;
                }
            }
            "Available" if condition.is_true() => available = true,
            _ => {}
        }
    }

    let spec_replicas = int_or(object, &["spec", "replicas"], 1);
    let replicas = int_or(object, &["status", "replicas"], 0);
    let updated = int_or(object, &["status", "updatedReplicas"], 0);
    let ready = int_or(object, &["status", "readyReplicas"], 0);
    let available_replicas = int_or(object, &["status", "availableReplicas"], 0);

    if spec_replicas > replicas {
        return Ok(Result::in_progress(
            "LessReplicas",
            format!("Replicas: {replicas}/{spec_replicas}"),
        ));
    }
    if spec_replicas > updated {
        return Ok(Result::in_progress(
            "LessUpdated",
            format!("Updated: {updated}/{spec_replicas}"),
        ));
    }
    if replicas > spec_replicas {
        let surplus = replicas - spec_replicas;
        return Ok(Result::in_progress(
            "ExtraPods",
            format!("Pending termination: {surplus}"),
        ));
    }
    if updated > available_replicas {
        return Ok(Result::in_progress(
            "LessAvailable",
            format!("Available: {available_replicas}/{updated}"),
        ));
    }
    if spec_replicas > ready {
        return Ok(Result::in_progress(
            "LessReady",
            format!("Ready: {ready}/{spec_replicas}"),
        ));
    }
    if !progressing {
        return Ok(Result::in_progress(
            "ReplicaSetNotAvailable",
            "ReplicaSet not Available",
        ));
    }
    if !available {
        return Ok(Result::in_progress(
            "DeploymentNotAvailable",
            "Deployment not Available",
        ));
    }
    Ok(Result::current(format!(
        "Deployment is available. Replicas: {replicas}"
    )))
}

/// The first count, in order, that falls short of `want`, reported as kstatus does: `reason` and
/// "`label`: have/want".
fn first_shortfall(want: i64, counts: &[(&str, &str, i64)]) -> Option<Result> {
    counts
        .iter()
        .find(|(_, _, have)| want > *have)
        .map(|(reason, label, have)| Result::in_progress(reason, format!("{label}: {have}/{want}")))
}

/// ReplicaSet: all replicas labelled, available and ready, none surplus.
/// `ReplicaFailure=True` (e.g. quota exceeded) is `InProgress`, as in kstatus:
/// the controller keeps retrying.
pub fn replica_set(object: &Value) -> RuleResult {
    if fields::conditions(object)?
        .iter()
        .any(|c| c.condition_type == "ReplicaFailure" && c.is_true())
    {
        return Ok(Result::in_progress(
            "ReplicaFailure",
            "Replica Failure condition. Check Pods",
        ));
    }
    let spec_replicas = int_or(object, &["spec", "replicas"], 1);
    let replicas = int_or(object, &["status", "replicas"], 0);
    let ready = int_or(object, &["status", "readyReplicas"], 0);
    let available = int_or(object, &["status", "availableReplicas"], 0);
    let labelled = int_or(object, &["status", "fullyLabeledReplicas"], 0);

    if let Some(result) = first_shortfall(
        spec_replicas,
        &[
            ("LessLabelled", "Labelled", labelled),
            ("LessAvailable", "Available", available),
            ("LessReady", "Ready", ready),
        ],
    ) {
        return Ok(result);
    }
    if replicas > spec_replicas {
        let surplus = replicas - spec_replicas;
        return Ok(Result::in_progress(
            "ExtraPods",
            format!("Pending termination: {surplus}"),
        ));
    }
    Ok(Result::current(format!(
        "ReplicaSet is available. Replicas: {replicas}"
    )))
}

/// DaemonSet: every node that should run a pod runs an updated, available and
/// ready one. The controller always records observedGeneration, so its absence
/// means it has not looked at the object yet.
pub fn daemon_set(object: &Value) -> RuleResult {
    if let Some(result) = generic::require_generation_set(object)? {
        return Ok(result);
    }
    let Some(desired) =
        fields::at(object, &["status", "desiredNumberScheduled"]).and_then(Value::as_i64)
    else {
        return Ok(Result::in_progress(
            "NoDesiredNumber",
            "Missing .status.desiredNumberScheduled",
        ));
    };
    let current = int_or(object, &["status", "currentNumberScheduled"], 0);
    let updated = int_or(object, &["status", "updatedNumberScheduled"], 0);
    let available = int_or(object, &["status", "numberAvailable"], 0);
    let ready = int_or(object, &["status", "numberReady"], 0);

    if let Some(result) = first_shortfall(
        desired,
        &[
            ("LessCurrent", "Current", current),
            ("LessUpdated", "Updated", updated),
            ("LessAvailable", "Available", available),
            ("LessReady", "Ready", ready),
        ],
    ) {
        return Ok(result);
    }
    Ok(Result::current(format!(
        "All replicas scheduled as expected. Replicas: {desired}"
    )))
}

/// StatefulSet: the controller sets no conditions, so only counts and revisions
/// tell. `OnDelete` sets are user-managed and always `Current`. With a
/// `rollingUpdate.partition`, only the pods at or above the partition are
/// expected to be updated, and the revisions legitimately differ.
pub fn stateful_set(object: &Value) -> RuleResult {
    if fields::str_or(object, &["spec", "updateStrategy", "type"], "") == "OnDelete" {
        return Ok(Result::current(
            "StatefulSet is using the ondelete update strategy",
        ));
    }
    let spec_replicas = int_or(object, &["spec", "replicas"], 1);
    let ready = int_or(object, &["status", "readyReplicas"], 0);
    let current = int_or(object, &["status", "currentReplicas"], 0);
    let updated = int_or(object, &["status", "updatedReplicas"], 0);
    let replicas = int_or(object, &["status", "replicas"], 0);
    let partition = fields::at(
        object,
        &["spec", "updateStrategy", "rollingUpdate", "partition"],
    )
    .and_then(Value::as_i64);

    if spec_replicas > replicas {
        return Ok(Result::in_progress(
            "LessReplicas",
            format!("Replicas: {replicas}/{spec_replicas}"),
        ));
    }
    if spec_replicas > ready {
        return Ok(Result::in_progress(
            "LessReady",
            format!("Ready: {ready}/{spec_replicas}"),
        ));
    }
    if replicas > spec_replicas {
        let surplus = replicas - spec_replicas;
        return Ok(Result::in_progress(
            "ExtraPods",
            format!("Pending termination: {surplus}"),
        ));
    }
    if let Some(partition) = partition {
        let expected_updated = spec_replicas - partition;
        if updated < expected_updated {
            return Ok(Result::in_progress(
                "PartitionRollout",
                format!("updated: {updated}/{expected_updated}"),
            ));
        }
        return Ok(Result::current(format!(
            "Partition rollout complete. updated: {updated}"
        )));
    }
    if spec_replicas > current {
        return Ok(Result::in_progress(
            "LessCurrent",
            format!("current: {current}/{spec_replicas}"),
        ));
    }
    let current_revision = fields::str_or(object, &["status", "currentRevision"], "");
    let update_revision = fields::str_or(object, &["status", "updateRevision"], "");
    if current_revision != update_revision {
        return Ok(Result::in_progress(
            "RevisionMismatch",
            "Waiting for updated revision to match current",
        ));
    }
    Ok(Result::current(format!(
        "All replicas scheduled as expected. Replicas: {replicas}"
    )))
}
