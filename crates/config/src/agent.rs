//! The agent's configuration file, `.gitlab/agents/<agent-name>/config.yaml` in its configuration project.
//!
//! The schema is GitLab's agent configuration: `gitops`, `ci_access`, `user_access` and `observability`.
//! Unknown keys are errors (a typo must not silently disable a feature). A missing file is an empty
//! configuration. Every default is written on the field that has it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{ConfigError, parse_yaml};

/// The largest configuration file kas accepts (GitLab's limit is the same order of magnitude).
pub const DEFAULT_MAX_CONFIG_SIZE: usize = 128 * 1024;

/// Where an agent's configuration file lives in its project.
pub fn config_file_path(agent_name: &str) -> String {
    format!(".gitlab/agents/{agent_name}/config.yaml")
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    pub gitops: GitopsConfig,
    pub ci_access: CiAccessConfig,
    pub user_access: UserAccessConfig,
    pub observability: ObservabilityConfig,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GitopsConfig {
    pub manifest_projects: Vec<ManifestProject>,
}

/// One project whose manifests the agent applies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestProject {
    /// The project's path on the Git server, e.g. `group/project`.
    pub id: String,
    /// Which commit to apply; the default branch when absent.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<GitRefConfig>,
    /// Namespace for namespaced objects that name none. Default `default`.
    #[serde(default = "default_namespace")]
    pub default_namespace: String,
    /// Which files are manifests. Default: none.
    #[serde(default)]
    pub paths: Vec<PathConfig>,
    /// How long to wait for applied objects to become ready. Default `3600s`.
    #[serde(default = "one_hour", with = "crate::duration")]
    pub reconcile_timeout: Duration,
    /// Default `none`.
    #[serde(default)]
    pub dry_run_strategy: DryRunStrategy,
    /// Delete objects that left Git. Default `true`.
    #[serde(default = "yes")]
    pub prune: bool,
    /// How long to wait for pruned objects to be gone. Default `3600s`.
    #[serde(default = "one_hour", with = "crate::duration")]
    pub prune_timeout: Duration,
    /// Default `foreground`.
    #[serde(default)]
    pub prune_propagation_policy: PrunePropagationPolicy,
    /// Default `must_match`.
    #[serde(default)]
    pub inventory_policy: InventoryPolicy,
    /// An extension of GitLab's schema (after Argo CD's `allowEmpty`): let a sync whose set of objects is
    /// empty prune everything this project applied. Default `false`: such a sync is refused with an error
    /// and nothing is pruned, so a glob that matches nothing or an emptied repository cannot wipe a cluster.
    #[serde(default)]
    pub allow_empty: bool,
}

/// Exactly one of `branch`, `tag` or `commit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum GitRefConfig {
    Branch(String),
    Tag(String),
    Commit(String),
}

/// Exactly one of `glob` or `file`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum PathConfig {
    /// GitLab's glob semantics: a leading `/` is ignored, `**` crosses directories, `{a,b}` sets.
    Glob(String),
    /// One file by its path.
    File(String),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DryRunStrategy {
    #[default]
    None,
    Client,
    Server,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrunePropagationPolicy {
    Orphan,
    Background,
    #[default]
    Foreground,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InventoryPolicy {
    #[default]
    MustMatch,
    AdoptIfNoInventory,
    AdoptAll,
}

/// Which CI jobs may use the agent's connection to reach the cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CiAccessConfig {
    pub projects: Vec<CiAccessEntry>,
    pub groups: Vec<CiAccessEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CiAccessEntry {
    /// Project or group path.
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_namespace: Option<String>,
    /// Only jobs of these environments (wildcards allowed); all when empty.
    #[serde(default)]
    pub environments: Vec<String>,
    /// Default: the agent's own service account.
    #[serde(default)]
    pub access_as: AccessAs,
}

/// Whose identity requests from the server side use in the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum AccessAs {
    Agent(Empty),
    CiJob(Empty),
    User(Empty),
    Impersonate(Impersonation),
}

impl Default for AccessAs {
    fn default() -> Self {
        Self::Agent(Empty {})
    }
}

/// `{}`: GitLab writes the identity choices as keys with empty maps, e.g. `access_as: { agent: {} }`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Impersonation {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: Vec<ImpersonationExtra>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImpersonationExtra {
    pub key: String,
    pub val: Vec<String>,
}

/// Which users may reach the cluster through kas.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UserAccessConfig {
    pub access_as: AccessAs,
    pub projects: Vec<UserAccessEntry>,
    pub groups: Vec<UserAccessEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserAccessEntry {
    pub id: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObservabilityConfig {
    pub logging: LoggingConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// Default `info`.
    pub level: LogLevel,
    /// Level for the agent's gRPC and HTTP/2 internals. Default `error`.
    pub grpc_level: LogLevel,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            level: LogLevel::Info,
            grpc_level: LogLevel::Error,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogLevel {
    Debug,
    #[default]
    Info,
    Warn,
    Error,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
        }
    }
}

fn default_namespace() -> String {
    "default".to_owned()
}
fn one_hour() -> Duration {
    Duration::from_secs(3600)
}
fn yes() -> bool {
    true
}

/// Most manifest projects one agent may list.
pub const MAX_MANIFEST_PROJECTS: usize = 100;

impl AgentConfig {
    /// Parses and validates `config.yaml`. `file` names it in errors. An empty or comment-only file is the
    /// default configuration.
    pub fn parse(file: &str, bytes: &[u8], max_size: usize) -> Result<Self, ConfigError> {
        if bytes.len() > max_size {
            return Err(ConfigError::TooLarge {
                file: file.to_owned(),
                size: bytes.len(),
                limit: max_size,
            });
        }
        let text = std::str::from_utf8(bytes).map_err(|e| ConfigError::SyntaxNoLocation {
            file: file.to_owned(),
            message: format!("not UTF-8: {e}"),
        })?;
        if text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            return Ok(Self::default());
        }
        let config: Self = parse_yaml(file, text)?;
        config.validate(file)?;
        Ok(config)
    }

    /// Checks what the types cannot express; errors name the field by its path in the file.
    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let invalid = |field: String, message: &str| ConfigError::Invalid {
            file: file.to_owned(),
            field,
            message: message.to_owned(),
        };
        let projects = &self.gitops.manifest_projects;
        if projects.len() > MAX_MANIFEST_PROJECTS {
            return Err(invalid(
                "gitops.manifest_projects".into(),
                &format!(
                    "at most {MAX_MANIFEST_PROJECTS} entries are allowed, found {}",
                    projects.len()
                ),
            ));
        }
        for (i, p) in projects.iter().enumerate() {
            let field = |name: &str| format!("gitops.manifest_projects[{i}].{name}");
            if p.id.trim().is_empty() {
                return Err(invalid(field("id"), "must not be empty"));
            }
            if p.default_namespace.is_empty() {
                return Err(invalid(field("default_namespace"), "must not be empty"));
            }
            if let Some(GitRefConfig::Branch(v) | GitRefConfig::Tag(v) | GitRefConfig::Commit(v)) =
                &p.reference
                && v.trim().is_empty()
            {
                return Err(invalid(field("ref"), "must not be empty"));
            }
            if let Some(GitRefConfig::Commit(c)) = &p.reference
                && !(c.len() == 40 && c.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(invalid(
                    field("ref.commit"),
                    "must be a full 40-character commit id",
                ));
            }
            for (j, path) in p.paths.iter().enumerate() {
                let (PathConfig::Glob(v) | PathConfig::File(v)) = path;
                if v.trim().is_empty() {
                    return Err(invalid(field(&format!("paths[{j}]")), "must not be empty"));
                }
            }
        }
        for (kind, entries) in [
            ("projects", &self.ci_access.projects),
            ("groups", &self.ci_access.groups),
        ] {
            for (i, e) in entries.iter().enumerate() {
                if e.id.trim().is_empty() {
                    return Err(invalid(
                        format!("ci_access.{kind}[{i}].id"),
                        "must not be empty",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The wire form kas sends to agentk.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("configuration serializes")
    }

    /// Reads the wire form kas sent.
    pub fn from_json(json: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = ".gitlab/agents/gitops/config.yaml";

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(FILE, text.as_bytes(), DEFAULT_MAX_CONFIG_SIZE)
    }

    #[test]
    fn seed_config_parses_with_defaults() {
        let config = parse(
            "gitops:\n  manifest_projects:\n  - id: \"path/of/the/project/that/holds/the/manifests\"\n    paths:\n    - glob: '/**/*.yaml'\nobservability:\n  logging:\n    level: debug\n",
        )
        .unwrap();
        let p = &config.gitops.manifest_projects[0];
        assert_eq!(p.id, "path/of/the/project/that/holds/the/manifests");
        assert_eq!(p.paths, vec![PathConfig::Glob("/**/*.yaml".into())]);
        assert_eq!(p.default_namespace, "default");
        assert_eq!(p.reconcile_timeout, Duration::from_secs(3600));
        assert!(p.prune);
        assert_eq!(p.inventory_policy, InventoryPolicy::MustMatch);
        assert_eq!(
            p.prune_propagation_policy,
            PrunePropagationPolicy::Foreground
        );
        assert_eq!(config.observability.logging.level, LogLevel::Debug);
        assert_eq!(config.observability.logging.grpc_level, LogLevel::Error);
    }

    #[test]
    fn full_schema_parses() {
        let config = parse(
            r#"
gitops:
  manifest_projects:
  - id: group/manifests
    ref:
      tag: v1.2.0
    default_namespace: apps
    paths:
    - glob: '/apps/**/*.{yaml,yml,json}'
    - file: crds/crd.yaml
    reconcile_timeout: 10m
    dry_run_strategy: server
    prune: false
    prune_timeout: 90s
    prune_propagation_policy: background
    inventory_policy: adopt_if_no_inventory
ci_access:
  projects:
  - id: group/app
    default_namespace: ci
    environments: [production, "review/*"]
    access_as:
      impersonate:
        username: ci-bot
        groups: [ci]
  groups:
  - id: group
    access_as:
      ci_job: {}
user_access:
  access_as:
    agent: {}
  projects:
  - id: group/app
observability:
  logging:
    level: warn
    grpc_level: info
"#,
        )
        .unwrap();
        let p = &config.gitops.manifest_projects[0];
        assert_eq!(p.reference, Some(GitRefConfig::Tag("v1.2.0".into())));
        assert_eq!(p.reconcile_timeout, Duration::from_secs(600));
        assert_eq!(p.prune_timeout, Duration::from_secs(90));
        assert_eq!(p.dry_run_strategy, DryRunStrategy::Server);
        assert!(!p.prune);
        assert_eq!(config.ci_access.projects[0].environments.len(), 2);
        assert!(
            matches!(config.ci_access.projects[0].access_as, AccessAs::Impersonate(ref i) if i.username == "ci-bot")
        );
        assert_eq!(
            config.ci_access.groups[0].access_as,
            AccessAs::CiJob(Empty {})
        );
        assert_eq!(config.user_access.projects[0].id, "group/app");
        // The wire form round-trips.
        assert_eq!(AgentConfig::from_json(&config.to_json()).unwrap(), config);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err =
            parse("gitops:\n  manifest_projects:\n  - id: a/b\n    pathz:\n    - glob: '*.yaml'\n")
                .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("pathz"), "{text}");
        assert!(text.starts_with(FILE), "{text}");
        assert_eq!(err.line(), Some(4), "{text}");
    }

    #[test]
    fn unknown_top_level_key_is_rejected() {
        let err =
            parse("observability:\n  logging:\n    level: info\nstarboardd: {}\n").unwrap_err();
        assert!(err.to_string().contains("starboardd"), "{err}");
        assert_eq!(err.line(), Some(4), "{err}");
    }

    #[test]
    fn malformed_yaml_names_the_line() {
        let err = parse("gitops:\n  manifest_projects:\n  - id: [unclosed\n").unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
    }

    #[test]
    fn empty_or_comment_only_file_is_default() {
        assert_eq!(parse("").unwrap(), AgentConfig::default());
        assert_eq!(parse("# nothing yet\n\n").unwrap(), AgentConfig::default());
    }

    #[test]
    fn oversized_file_is_refused() {
        let big = "#".repeat(DEFAULT_MAX_CONFIG_SIZE + 1);
        let err = parse(&big).unwrap_err();
        assert!(matches!(err, ConfigError::TooLarge { .. }), "{err}");
        assert!(err.to_string().contains("limit"));
    }

    #[test]
    fn invalid_values_name_the_field() {
        let err = parse("gitops:\n  manifest_projects:\n  - id: ''\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{FILE}: gitops.manifest_projects[0].id: must not be empty")
        );
        let err =
            parse("gitops:\n  manifest_projects:\n  - id: a/b\n    ref:\n      commit: abc\n")
                .unwrap_err();
        assert!(err.to_string().contains("ref.commit"), "{err}");
        let err =
            parse("gitops:\n  manifest_projects:\n  - id: a/b\n    reconcile_timeout: soon\n")
                .unwrap_err();
        assert!(err.to_string().contains("invalid duration"), "{err}");
        let err = parse("observability:\n  logging:\n    level: loud\n").unwrap_err();
        assert!(err.to_string().contains("loud"), "{err}");
    }

    #[test]
    fn two_refs_at_once_are_rejected() {
        let err = parse("gitops:\n  manifest_projects:\n  - id: a/b\n    ref:\n      branch: main\n      tag: v1\n").unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Syntax { .. } | ConfigError::SyntaxNoLocation { .. }
            ),
            "{err}"
        );
    }
}
