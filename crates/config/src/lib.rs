//! Configuration: the agent's `config.yaml` from Git ([`agent`]) and kas's own server configuration
//! ([`server`]). Both halves link this crate, so the schema, defaults and validation exist once.
//!
//! YAML goes through `serde-saphyr`: `serde_yaml` is deprecated and unmaintained, `serde_yml` is unsound, and
//! kube-rs chose serde-saphyr too. It reports errors with line and column, which the user sees.

pub mod agent;
mod duration;
pub mod server;

pub use agent::AgentConfig;
pub use server::ServerConfig;

/// A configuration file that could not be used, with where the problem is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {size} bytes is over the {limit}-byte limit for configuration files")]
    TooLarge {
        file: String,
        size: usize,
        limit: usize,
    },
    #[error("{file}:{line}:{column}: {message}")]
    Syntax {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{file}: {message}")]
    SyntaxNoLocation { file: String, message: String },
    #[error("{file}: {field}: {message}")]
    Invalid {
        file: String,
        field: String,
        message: String,
    },
    #[error("{file}: {message}")]
    Io { file: String, message: String },
}

impl ConfigError {
    /// The line the problem is on, when known (1-based).
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::Syntax { line, .. } => Some(*line),
            _ => None,
        }
    }
}

/// Parses YAML into `T`, turning serde-saphyr's error into one that names the file, line and column.
pub(crate) fn parse_yaml<T: serde::de::DeserializeOwned>(
    file: &str,
    text: &str,
) -> Result<T, ConfigError> {
    serde_saphyr::from_str::<T>(text).map_err(|err| {
        // The error's own Display renders a source snippet; keep just the first line of the message.
        let message = strip_location_prefix(err.to_string().lines().next().unwrap_or_default());
        match err.location() {
            Some(loc) => ConfigError::Syntax {
                file: file.to_owned(),
                line: loc.line() as usize,
                column: loc.column() as usize,
                message,
            },
            None => ConfigError::SyntaxNoLocation {
                file: file.to_owned(),
                message,
            },
        }
    })
}

/// serde-saphyr starts its messages with `error: line L column C: `; we report the location ourselves.
fn strip_location_prefix(line: &str) -> String {
    let rest = line.trim().trim_start_matches("error: ");
    match rest.strip_prefix("line ").and_then(|r| r.split_once(": ")) {
        Some((_, message)) => message.to_owned(),
        None => rest.to_owned(),
    }
}
