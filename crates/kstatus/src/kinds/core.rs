//! Core (`v1`) kinds: Pod, Service, PersistentVolumeClaim.

use serde_json::Value;

use crate::Result;
use crate::fields::{self, Malformed};

type RuleResult = std::result::Result<Result, Malformed>;

/// Pod: finished pods (`Succeeded` or `Failed`) are `Current` — there is nothing
/// left to wait for, and a failed pod is its owner's business (a Job reports
/// it). A `Running` pod is `Current` once `Ready=True`, `Failed` if a container
/// is in `CrashLoopBackOff`, else `InProgress`. A `Pending` pod whose
/// `PodScheduled=False` has reason `Unschedulable` is `Failed`.
///
/// Difference from kstatus: kstatus waits 15 seconds after the pod's creation
/// before reporting it unschedulable. This port reads no clock, so it reports
/// `Failed` at once; callers that poll should allow their own grace period.
pub fn pod(object: &Value) -> RuleResult {
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

/// Service: `LoadBalancer` services are `InProgress` until the cloud provider
/// has published an ingress IP or hostname; other types work once stored.
///
/// Difference from kstatus: kstatus only checks `spec.clusterIP` for load
/// balancers, which the apiserver assigns immediately, so it never waits for
/// the load balancer itself. Waiting for `status.loadBalancer.ingress` is what
/// "ready" means to a user of the service.
pub fn service(object: &Value) -> RuleResult {
    if fields::str_or(object, &["spec", "type"], "ClusterIP") != "LoadBalancer" {
        return Ok(Result::current("Service is ready"));
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
        return Ok(Result::in_progress(
            "NoIPAssigned",
            "No ingress IP or hostname assigned. Service type: LoadBalancer",
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
