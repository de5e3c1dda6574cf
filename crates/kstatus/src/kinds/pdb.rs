//! PodDisruptionBudget (`policy`).

use serde_json::Value;

use crate::fields::{Malformed, int_or};
use crate::{Result, generic};

/// PodDisruptionBudget: the disruption controller must have observed the
/// latest spec (the generic rules compare generations; here a missing
/// `status.observedGeneration` also means not yet observed), and
/// `status.currentHealthy` must reach `status.desiredHealthy`.
///
/// Difference from kstatus: kstatus calls a PDB `Current` as soon as its
/// generation is observed. Requiring enough healthy pods matches what a
/// GitOps sync waits for: a PDB that would block every eviction is not done.
pub fn pod_disruption_budget(object: &Value) -> std::result::Result<Result, Malformed> {
    if let Some(result) = generic::require_generation_set(object)? {
        return Ok(result);
    }
    let current_healthy = int_or(object, &["status", "currentHealthy"], 0);
    let desired_healthy = int_or(object, &["status", "desiredHealthy"], 0);
    if current_healthy < desired_healthy {
        return Ok(Result::in_progress(
            "LessHealthy",
            format!("Healthy: {current_healthy}/{desired_healthy}"),
        ));
    }
    Ok(Result::current(format!(
        "Budget is met. Healthy: {current_healthy}/{desired_healthy}"
    )))
}
