//! Lenient field access into objects given as JSON, mirroring kstatus' helpers:
//! optional counts fall back to a default, while fields whose shape the rules
//! depend on (generation, conditions) report a [`Malformed`] error.

use std::fmt;
use std::time::{Duration, SystemTime};

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

/// A timestamp field in RFC 3339 (`2026-11-27T01:00:00Z`, as the apiserver writes
/// `metav1.Time`; fractions and offsets accepted). `None` when absent or unreadable.
pub fn timestamp(object: &Value, path: &[&str]) -> Option<SystemTime> {
    let seconds = parse_rfc3339(at(object, path)?.as_str()?)?;
    let magnitude = Duration::from_secs(seconds.unsigned_abs());
    if seconds >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(magnitude)
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(magnitude)
    }
}

/// Seconds since the Unix epoch (whole seconds; a fraction is dropped).
fn parse_rfc3339(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        part.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    if bytes.len() < 20
        || bytes[4] != b'-'
        || bytes[7] != b'-'
        || !matches!(bytes[10], b'T' | b't')
        || bytes[13] != b':'
        || bytes[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    if second > 60 {
        return None;
    }
    let mut rest = &text[19..];
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &fraction[digits..];
    }
    let offset = match rest.as_bytes() {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (h, m): (i64, i64) = (rest[1..3].parse().ok()?, rest[4..6].parse().ok()?);
            let offset = h * 3600 + m * 60;
            if *sign == b'+' { offset } else { -offset }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    Some(days * 86_400 + hour * 3600 + minute * 60 + second - offset)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_timestamps() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2026-11-27T01:00:00Z"), Some(1_795_741_200));
        assert_eq!(
            parse_rfc3339("2026-11-27T01:00:00.123456Z"),
            Some(1_795_741_200)
        );
        assert_eq!(
            parse_rfc3339("2026-11-27T03:00:00+02:00"),
            Some(1_795_741_200)
        );
        assert_eq!(parse_rfc3339("2000-02-29T00:00:00Z"), Some(951_782_400));
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59Z"), Some(-1));
        for bad in [
            "",
            "2026-11-27",
            "2026-13-01T00:00:00Z",
            "2026-11-27T01:00:00",
            "20x6-11-27T01:00:00Z",
            "2026-11-27T01:00:00.Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
