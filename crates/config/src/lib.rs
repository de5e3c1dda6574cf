//! Configuration: the agent's `config.yaml` from Git ([`agent`]) and kas's own server configuration
//! ([`server`]). Both halves link this crate, so the schema, defaults and validation exist once.
//!
//! YAML goes through `serde-saphyr`: `serde_yaml` is deprecated and unmaintained, `serde_yml` is unsound, and
//! kube-rs chose serde-saphyr too. It reports errors with line and column, which the user sees.

pub mod agent;
mod duration;
pub mod server;

pub use agent::{AgentConfig, AlertVerdict, CiliumConfig};
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
    /// A value that parsed but is not allowed, where it is in the file.
    #[error("{file}:{line}:{column}: {field}: {message}")]
    InvalidAt {
        file: String,
        line: usize,
        column: usize,
        field: String,
        message: String,
    },
    /// The YAML breached a limit of [`yaml_budget`] (aliases, nesting, size): refused before it can use
    /// much memory or time, e.g. a "billion laughs" alias bomb.
    #[error("{file}:{line}:{column}: too large or too complex for a configuration file: {limit}")]
    TooComplex {
        file: String,
        line: usize,
        column: usize,
        /// Which limit, e.g. `more than 100 aliases`.
        limit: String,
    },
    #[error("{file}: {message}")]
    Io { file: String, message: String },
}

impl ConfigError {
    /// The line the problem is on, when known (1-based).
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::Syntax { line, .. }
            | Self::InvalidAt { line, .. }
            | Self::TooComplex { line, .. } => Some(*line),
            _ => None,
        }
    }
}

/// Most aliases (`*name`) a configuration file may use. Each alias copies its anchor's value, so without a
/// low cap a 128 KiB file could expand to gigabytes (a 60 KiB string aliased 5,000 times); 100 aliases of
/// at most the whole file bound it to about 13 MiB.
pub const MAX_YAML_ALIASES: usize = 100;
/// Deepest nesting of mappings and sequences; the schemas need fewer than ten levels.
pub const MAX_YAML_DEPTH: usize = 32;
/// Most text (scalars, counted again for every alias that copies them) one configuration file may hold.
pub const MAX_YAML_TEXT_BYTES: usize = 4 * 1024 * 1024;

/// serde-saphyr's budget, tightened for configuration files (its defaults are sized for data files:
/// 50,000 aliases, depth 64, a million events). It is enforced while parsing, so a breach stops the parse
/// at the offending event.
pub fn yaml_budget() -> Option<serde_saphyr::Budget> {
    serde_saphyr::budget! {
        max_aliases: MAX_YAML_ALIASES,
        max_anchors: 1_000,
        max_depth: MAX_YAML_DEPTH,
        max_events: 200_000,
        max_nodes: 100_000,
        max_documents: 1,
        max_recorded_anchor_events: 100_000,
        max_total_scalar_bytes: MAX_YAML_TEXT_BYTES,
        max_merge_keys: 100,
    }
}

/// Parses YAML into `T` within [`yaml_budget`], turning serde-saphyr's error into one that names the file,
/// line and column.
pub(crate) fn parse_yaml<T: serde::de::DeserializeOwned>(
    file: &str,
    text: &str,
) -> Result<T, ConfigError> {
    let options = serde_saphyr::options! {
        budget: yaml_budget(),
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: 100_000,
        },
    };
    serde_saphyr::from_str_with_options::<T>(text, options).map_err(|err| {
        let (line, column) = err
            .location()
            .map_or((0, 0), |l| (l.line() as usize, l.column() as usize));
        if let Some(limit) = budget_breach(&err) {
            return ConfigError::TooComplex {
                file: file.to_owned(),
                line,
                column,
                limit,
            };
        }
        // The error's own Display renders a source snippet; keep just the first line of the message.
        let message = strip_location_prefix(err.to_string().lines().next().unwrap_or_default());
        match err.location() {
            Some(_) => ConfigError::Syntax {
                file: file.to_owned(),
                line,
                column,
                message,
            },
            None => ConfigError::SyntaxNoLocation {
                file: file.to_owned(),
                message,
            },
        }
    })
}

/// The limit a budget or alias-replay error breached, in words; `None` for other errors.
fn budget_breach(err: &serde_saphyr::Error) -> Option<String> {
    use serde_saphyr::{Error, budget::BudgetBreach};
    let mut err = err.without_snippet();
    while let Error::AliasError { error, .. } = err {
        err = error.without_snippet();
    }
    Some(match err {
        Error::Budget { breach, .. } => match breach {
            BudgetBreach::Aliases { .. } => format!("more than {MAX_YAML_ALIASES} aliases"),
            BudgetBreach::Depth { .. } => format!("nested deeper than {MAX_YAML_DEPTH} levels"),
            BudgetBreach::ScalarBytes { .. } => format!(
                "more than {} MiB of text, aliases included",
                MAX_YAML_TEXT_BYTES / (1024 * 1024)
            ),
            BudgetBreach::AliasAnchorRatio { aliases, anchors } => {
                format!("{aliases} aliases of {anchors} anchors")
            }
            other => format!("{other:?}"),
        },
        Error::AliasReplayLimitExceeded { .. } => "aliases expand to too much".to_owned(),
        Error::AliasReplayStackDepthExceeded { .. } => "aliases nested too deeply".to_owned(),
        Error::AliasExpansionLimitExceeded { .. } => "one anchor expanded too often".to_owned(),
        _ => return None,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The budget itself, with a type that takes any YAML, so that only the budget can refuse it (the
    /// schemas' own types refuse most such input at its first unexpected node).
    #[test]
    fn the_yaml_budget_refuses_deep_nesting_and_many_aliases() {
        let deep = format!("{}1{}", "[".repeat(40), "]".repeat(40));
        let err = parse_yaml::<serde_json::Value>("f.yaml", &deep).unwrap_err();
        assert!(
            matches!(err, ConfigError::TooComplex { ref limit, line: 1, .. } if limit == "nested deeper than 32 levels"),
            "{err}"
        );
        let mut block = String::new();
        for depth in 0..40 {
            block.push_str(&format!("{}k{depth}:\n", " ".repeat(depth)));
        }
        let err = parse_yaml::<serde_json::Value>("f.yaml", &block).unwrap_err();
        assert!(matches!(err, ConfigError::TooComplex { .. }), "{err}");
        // 101 aliases of 101 anchors (so no ratio heuristic): the 101st alias breaches.
        let mut aliases = String::new();
        for i in 0..=MAX_YAML_ALIASES {
            aliases.push_str(&format!("a{i}: &x{i} v\nb{i}: *x{i}\n"));
        }
        let err = parse_yaml::<serde_json::Value>("f.yaml", &aliases).unwrap_err();
        assert!(
            matches!(err, ConfigError::TooComplex { ref limit, .. } if limit == "more than 100 aliases"),
            "{err}"
        );
        assert_eq!(err.line(), Some(2 * MAX_YAML_ALIASES + 2), "{err}");
        // Within the limits all of it parses.
        let ok = format!("{}1{}", "[".repeat(30), "]".repeat(30));
        parse_yaml::<serde_json::Value>("f.yaml", &ok).unwrap();
    }
}
