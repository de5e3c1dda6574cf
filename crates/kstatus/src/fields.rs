//! Lenient field access into objects given as JSON, mirroring kstatus' helpers:
//! optional counts fall back to a default, while fields whose shape the rules
//! depend on (generation, conditions) report a [`Malformed`] error.

use std::fmt;

use serde_json::Value;

use crate::Condition;

/// The object has a field of the wrong shape, e.g. `status.conditions` is a string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The value at a dotted path (`["status", "replicas"]`), if every step is an object key.
pub fn at<'a>(object: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(object, |value, key| value.get(key))
}

/// An integer field, or `default` when absent or not an integer (kstatus' `GetIntField`).
pub fn int_or(object: &Value, path: &[&str], default: i64) -> i64 {
    at(object, path).and_then(Value::as_i64).unwrap_or(default)
}

/// A string field, or `default` when absent or not a string (kstatus' `GetStringField`).
pub fn str_or<'a>(object: &'a Value, path: &[&str], default: &'a str) -> &'a str {
    at(object, path).and_then(Value::as_str).unwrap_or(default)
}

/// An optional integer field that, when present, must be an integer.
pub fn optional_int(object: &Value, path: &[&str]) -> Result<Option<i64>, Malformed> {
    match at(object, path) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value
            .as_i64()
            .map(Some)
            .ok_or_else(|| Malformed(format!("{} is not an integer", path.join(".")))),
    }
}

/// The object's `kind`, or an empty string.
pub fn kind(object: &Value) -> &str {
    str_or(object, &["kind"], "")
}

/// The API group from `apiVersion` (`"apps/v1"` → `"apps"`, `"v1"` → `""`).
pub fn group(object: &Value) -> &str {
    let api_version = str_or(object, &["apiVersion"], "");
    api_version
        .rsplit_once('/')
        .map_or("", |(group, _version)| group)
}

/// `status.conditions`, parsed. Absent or null means none; a list entry that is
/// not an object, or a list that is not a list, is malformed. Missing string
/// fields inside a condition read as empty, as Go's unstructured conversion does.
pub fn conditions(object: &Value) -> Result<Vec<Condition>, Malformed> {
    let list = match at(object, &["status", "conditions"]) {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(Malformed("status.conditions is not a list".to_owned())),
    };
    list.iter()
        .map(|entry| {
            if !entry.is_object() {
                return Err(Malformed(
                    "status.conditions has an entry that is not an object".to_owned(),
                ));
            }
            let text = |key: &str| str_or(entry, &[key], "").to_owned();
            Ok(Condition {
                condition_type: text("type"),
                status: text("status"),
                reason: text("reason"),
                message: text("message"),
            })
        })
        .collect()
}
