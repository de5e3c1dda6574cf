//! Job (`batch`).

use serde_json::Value;

use crate::Result;
use crate::fields::{self, Malformed, int_or};

/// Job: `InProgress` until it has started; from then on `Current` (a running
/// job is doing what its spec asks), `Failed` once `Failed=True`. A suspended
/// job is `Current`: nothing will happen until someone resumes it.
pub fn job(object: &Value) -> std::result::Result<Result, Malformed> {
    let parallelism = int_or(object, &["spec", "parallelism"], 1);
    let completions = int_or(object, &["spec", "completions"], parallelism);
    let succeeded = int_or(object, &["status", "succeeded"], 0);
    let active = int_or(object, &["status", "active"], 0);
    let failed = int_or(object, &["status", "failed"], 0);

    for condition in fields::conditions(object)? {
        if !condition.is_true() {
            continue;
        }
        match condition.condition_type.as_str() {
            "Complete" => {
                return Ok(Result::current(format!(
                    "Job Completed. succeeded: {succeeded}/{completions}"
                )));
            }
            "Failed" => {
                return Ok(Result::failed(
                    "JobFailed",
                    format!("Job Failed. failed: {failed}/{completions}"),
                ));
            }
            "Suspended" => return Ok(Result::current("Job is suspended")),
            _ => {}
        }
    }

    if fields::str_or(object, &["status", "startTime"], "").is_empty() {
        return Ok(Result::in_progress("JobNotStarted", "Job not started"));
    }
    Ok(Result::current(format!(
        "Job in progress. success:{succeeded}, active: {active}, failed: {failed}"
    )))
}
