//! Core (`v1`) kinds: Pod, Service, PersistentVolumeClaim.

use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::Result;
use crate::fields::{self, Malformed};

type RuleResult = std::result::Result<Result, Malformed>;

/// How long a pod may be unschedulable before it is reported `Failed` (kstatus'
/// `ScheduleWindow`): the scheduler often needs a moment, or a cluster autoscaler
/// a node.
pub const SCHEDULE_WINDOW: Duration = Duration::from_secs(15);

/// Pod: finished pods (`Succeeded` or `Failed`) are `Current` — there is nothing
/// left to wait for, and a failed pod is its owner's business (a Job reports
/// it). A `Running` pod is `Current` once `Ready=True`, `Failed` if a container
/// is in `CrashLoopBackOff`, else `InProgress`. A `Pending` pod whose
/// `PodScheduled=False` has reason `Unschedulable` is `InProgress` for
/// [`SCHEDULE_WINDOW`] after its `creationTimestamp` (as of `now`, passed in so the
/// crate reads no clock; `None`: the window is over), then `Failed`. A pod without
/// a readable creation time is past the window, as in kstatus (its zero time).
pub fn pod(object: &Value, now: Option<SystemTime>) -> RuleResult {
    let conditions = fields::conditions(object)?;
    match fields::str_or(object, &["status", "phase"], "") {
        "Succeeded" => Ok(Result::current("Pod has completed successfully")),
        "Failed" => Ok(Result::current("Pod has completed, but not successfully")),
        "Running" => {
            if conditions
                .iter()
                .any(|c| c.condition_type == "Ready" && c.is_true())
            {
                return Ok(Result::current("Pod is Ready"));
            }
            let crash_looping = crash_looping_containers(object);
            if !crash_looping.is_empty() {
                let names = crash_looping.join(",");
                return Ok(Result::failed(
                    "ContainerCrashLooping",
                    format!("Containers in CrashLoop state: {names}"),
                ));
            }
            Ok(Result::in_progress(
                "PodRunningNotReady",
                "Pod is running but is not Ready",
            ))
        }
        "Pending" => {
            let unschedulable = conditions.iter().any(|c| {
                c.condition_type == "PodScheduled" && c.is_false() && c.reason == "Unschedulable"
            });
            let created = fields::timestamp(object, &["metadata", "creationTimestamp"]);
            let within_window = created
                .and_then(|created| created.checked_add(SCHEDULE_WINDOW))
                .zip(now)
                .is_some_and(|(window_end, now)| now < window_end);
            if unschedulable && within_window {
                return Ok(Result::in_progress(
                    "PodNotScheduled",
                    "Pod has not been scheduled",
                ));
            }
            if unschedulable {
                return Ok(Result::failed(
                    "PodUnschedulable",
                    "Pod could not be scheduled",
                ));
            }
            Ok(Result::in_progress(
                "PodPending",
                "Pod is in the Pending phase",
            ))
        }
        // The kubelet has not reported the pod yet.
        "" => Ok(Result::in_progress(
            "PodNotObserved",
            "Pod phase not available",
        )),
        unknown => Err(Malformed(format!("unknown phase {unknown}"))),
    }
}

/// Names of the containers waiting with reason `CrashLoopBackOff`. Entries of
/// an unexpected shape are skipped: they cannot be crash looping.
fn crash_looping_containers(object: &Value) -> Vec<&str> {
    let Some(statuses) =
        fields::at(object, &["status", "containerStatuses"]).and_then(Value::as_array)
    else {
        return Vec::new();
    };
    statuses
        .iter()
        .filter(|status| {
            fields::str_or(status, &["state", "waiting", "reason"], "") == "CrashLoopBackOff"
        })
        .filter_map(|status| status.get("name").and_then(Value::as_str))
        .collect()
}

/// Service: `Current` once stored, as in kstatus; a `LoadBalancer` service only
/// needs its `spec.clusterIP` (assigned by the apiserver at once).
///
/// Deliberately not waiting for `status.loadBalancer.ingress`: readiness decides
/// when `depends-on` dependents are applied and how long agentk waits after a
/// sync, so on a cluster without a load-balancer controller (kind, bare metal,
/// many CI clusters) the address never comes and every sync would wait
/// `reconcile_timeout` (1 h by default) and then skip the dependents. The service
/// already routes in-cluster traffic, and kstatus (GitLab's agent, Flux,
/// cli-utils) calls it Current too, so this port agrees. The message says when the
/// address is still missing.
pub fn service(object: &Value) -> RuleResult {
    if fields::str_or(object, &["spec", "type"], "ClusterIP") != "LoadBalancer" {
        return Ok(Result::current("Service is ready"));
    }
    if fields::str_or(object, &["spec", "clusterIP"], "").is_empty() {
        return Ok(Result::in_progress(
            "NoIPAssigned",
            "ClusterIP not set. Service type: LoadBalancer",
        ));
    }
    let ingress =
        fields::at(object, &["status", "loadBalancer", "ingress"]).and_then(Value::as_array);
    let has_address = ingress.is_some_and(|entries| {
        entries.iter().any(|entry| {
            ["ip", "hostname"]
                .iter()
                .any(|key| !fields::str_or(entry, &[key], "").is_empty())
        })
    });
    if !has_address {
        return Ok(Result::current(
            "Service is ready (its load balancer has no ingress address yet)",
        ));
    }
    Ok(Result::current("Service is ready"))
}

/// PersistentVolumeClaim: `Current` once bound to a volume.
pub fn persistent_volume_claim(object: &Value) -> RuleResult {
    let phase = fields::str_or(object, &["status", "phase"], "unknown");
    if phase != "Bound" {
        return Ok(Result::in_progress(
            "NotBound",
            format!("PVC is not Bound. phase: {phase}"),
        ));
    }
    Ok(Result::current("PVC is Bound"))
}
