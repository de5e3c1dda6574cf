//! The rules kstatus applies to every object before any kind-specific rule
//! (`checkGenericProperties`): deletion, observed generation, and the standard
//! `Reconciling`/`Stalled` conditions.
//!
//! kstatus does not interpret `Ready` at all, so a custom resource whose
//! controller reports `Ready=False` is Current to it. This port reads `Ready`
//! only for kinds without a rule of their own ([`not_ready`], after the
//! kind-specific rules were not found): `False` or `Unknown` there means the
//! controller is not done, which is `InProgress` (it is normal while a resource
//! starts; a controller that gives up says `Stalled`).

use serde_json::Value;

use crate::fields::{self, Malformed};
use crate::{CONDITION_RECONCILING, CONDITION_STALLED, Result};

/// Applies the generic rules. `Ok(None)` means they cannot decide and the
/// kind-specific rules (or the `Current` default) apply.
pub fn check(object: &Value) -> std::result::Result<Option<Result>, Malformed> {
    let deletion = fields::at(object, &["metadata", "deletionTimestamp"]).and_then(Value::as_str);
    if deletion.is_some_and(|timestamp| !timestamp.is_empty()) {
        return Ok(Some(Result {
            status: crate::Status::Terminating,
            message: "Resource scheduled for deletion".to_owned(),
            conditions: Vec::new(),
        }));
    }

    if let Some(result) = check_generation_observed(object)? {
        return Ok(Some(result));
    }

    for condition in fields::conditions(object)? {
        if !condition.is_true() {
            continue;
        }
        if condition.condition_type == CONDITION_RECONCILING {
            let message = condition.message.clone();
            return Ok(Some(Result {
                status: crate::Status::InProgress,
                message,
                conditions: vec![condition],
            }));
        }
        if condition.condition_type == CONDITION_STALLED {
            let message = condition.message.clone();
            return Ok(Some(Result {
                status: crate::Status::Failed,
                message,
                conditions: vec![condition],
            }));
        }
    }
    Ok(None)
}

/// `InProgress` when the controller has not yet seen the latest spec. Objects
/// without `metadata.generation` or `status.observedGeneration` pass: many kinds
/// (ConfigMap, most Pods' status) never have them.
fn check_generation_observed(object: &Value) -> std::result::Result<Option<Result>, Malformed> {
    let Some(generation) = fields::optional_int(object, &["metadata", "generation"])? else {
        return Ok(None);
    };
    let Some(observed) = fields::optional_int(object, &["status", "observedGeneration"])? else {
        return Ok(None);
    };
    if observed == generation {
        return Ok(None);
    }
    let message = format!(
        "{} generation is {generation}, but latest observed generation is {observed}",
        fields::kind(object)
    );
    Ok(Some(Result::in_progress(
        "LatestGenerationNotObserved",
        message,
    )))
}

/// For kinds whose controller always records `status.observedGeneration`
/// (DaemonSet, PodDisruptionBudget): its absence means the controller has not
/// acted on the object yet, so the object is `InProgress` rather than judged on
/// an empty status.
pub(crate) fn require_generation_set(
    object: &Value,
) -> std::result::Result<Option<Result>, Malformed> {
    let kind = fields::kind(object);
    if fields::optional_int(object, &["metadata", "generation"])?.is_none() {
        return Ok(Some(Result::in_progress(
            "NoGeneration",
            format!("{kind} metadata.generation not found"),
        )));
    }
    if fields::optional_int(object, &["status", "observedGeneration"])?.is_none() {
        return Ok(Some(Result::in_progress(
            "NoObservedGeneration",
            format!("{kind} status.observedGeneration not found"),
        )));
    }
    Ok(None)
}

/// For kinds without a specific rule: `InProgress` when the `Ready` condition is
/// `False` or `Unknown`. `Ok(None)` when there is no such condition or it is `True`.
pub fn not_ready(object: &Value) -> std::result::Result<Option<Result>, Malformed> {
    let ready = fields::conditions(object)?
        .into_iter()
        .find(|c| c.condition_type == "Ready");
    let Some(ready) = ready.filter(|c| !c.is_true()) else {
        return Ok(None);
    };
    let reason = if ready.reason.is_empty() {
        "NotReady"
    } else {
        ready.reason.as_str()
    };
    let mut message = format!("Ready condition is not True ({reason})");
    if !ready.message.is_empty() {
        message = format!("{message}: {}", ready.message);
    }
    Ok(Some(Result::in_progress(reason, message)))
}
