//! Durations written the way GitLab's agent configuration writes them: `3600s`, `1h`, `90m`.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// The longest duration a configuration file may set. Far beyond any sensible timeout or period, and far
/// below what deadline arithmetic (`Instant::now() + timeout`) can hold: `500000000000y` parses as a
/// `Duration` but would panic the first time it is added to a clock reading.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}s", d.as_secs()))
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    let duration = humantime::parse_duration(text.trim())
        .map_err(|e| serde::de::Error::custom(format!("invalid duration {text:?}: {e}")))?;
    if duration > MAX_DURATION {
        return Err(serde::de::Error::custom(format!(
            "duration {text:?} is over the limit of {} (30 days)",
            humantime::format_duration(MAX_DURATION)
        )));
    }
    Ok(duration)
}

/// Lifetimes (of tokens, say) rather than timeouts: up to ten years, which deadline arithmetic still holds.
pub mod long {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub use super::serialize;

    pub const MAX: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        let duration = humantime::parse_duration(text.trim())
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {text:?}: {e}")))?;
        if duration > MAX {
            return Err(serde::de::Error::custom(format!(
                "duration {text:?} is over the limit of 10 years"
            )));
        }
        Ok(duration)
    }
}
