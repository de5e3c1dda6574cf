//! Tests with realistic objects, one module per area. Each asserts the status
//! and the message, and where it matters the reason of the standard condition.

mod apps;
mod core;
mod garbage;
mod generic;
mod others;

use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::{CONDITION_RECONCILING, CONDITION_STALLED, Result, Status};

/// The time the tests judge objects at: 2026-11-27T02:00:00Z, an hour after the test pods were created.
const NOW_UNIX: u64 = 1_795_744_800;

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(NOW_UNIX)
}

/// [`crate::compute`] at [`now`].
fn compute(object: &Value) -> Result {
    crate::compute_at(object, now())
}

/// Asserts status and message, and that the standard condition matches the status.
#[track_caller]
fn assert_result(result: &Result, status: Status, message: &str) {
    assert_eq!(result.status, status, "message was {:?}", result.message);
    assert_eq!(result.message, message);
    let expected_condition = match status {
        Status::InProgress => Some(CONDITION_RECONCILING),
        Status::Failed => Some(CONDITION_STALLED),
        _ => None,
    };
    let actual_condition = result.conditions.first().map(|c| c.condition_type.as_str());
    assert_eq!(actual_condition, expected_condition);
}

/// The reason of the single standard condition.
#[track_caller]
fn reason(result: &Result) -> &str {
    assert_eq!(result.conditions.len(), 1, "{result:?}");
    &result.conditions[0].reason
}
