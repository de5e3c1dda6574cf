//! Kind-specific rules, for the built-in kinds kstatus knows (its `legacyTypes`).
//! They run only when the generic rules could not decide.

mod apps;
mod batch;
mod core;
mod crd;
mod pdb;

use std::time::SystemTime;

use serde_json::Value;

use crate::Result;
use crate::fields::{self, Malformed};

/// A kind-specific rule: the object's status, or why its shape is unusable.
pub type Rule = fn(&Value) -> std::result::Result<Result, Malformed>;

/// The verdict of the rule for the object's group and kind, if kstatus has one. `now` is for the rules
/// that have a grace period (Pod scheduling); `None`: every grace period is over.
pub fn evaluate(
    object: &Value,
    now: Option<SystemTime>,
) -> Option<std::result::Result<Result, Malformed>> {
    let rule: Rule = match (fields::group(object), fields::kind(object)) {
        ("", "Pod") => return Some(core::pod(object, now)),
        ("", "Service") => core::service,
        ("", "PersistentVolumeClaim") => core::persistent_volume_claim,
        ("", "ConfigMap" | "Secret") | ("batch", "CronJob") => always_ready,
        ("apps" | "extensions", "Deployment") => apps::deployment,
        ("apps" | "extensions", "ReplicaSet") => apps::replica_set,
        ("apps" | "extensions", "DaemonSet") => apps::daemon_set,
        ("apps", "StatefulSet") => apps::stateful_set,
        ("batch", "Job") => batch::job,
        ("policy", "PodDisruptionBudget") => pdb::pod_disruption_budget,
        ("apiextensions.k8s.io", "CustomResourceDefinition") => crd::custom_resource_definition,
        _ => return None,
    };
    Some(rule(object))
}

/// Kinds that have no status to wait for: they take effect once stored.
fn always_ready(_object: &Value) -> std::result::Result<Result, Malformed> {
    Ok(Result::current("Resource is always ready"))
}
