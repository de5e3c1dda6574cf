//! The agent's configuration file, `.gitlab/agents/<agent-name>/config.yaml` in its configuration project.
//!
//! The schema is GitLab's agent configuration: `gitops`, `ci_access`, `user_access`, `observability` and
//! `cilium` (network-policy alerts).
//! Unknown keys are errors (a typo must not silently disable a feature). A missing file is an empty
//! configuration. Every default is written on the field that has it.

use std::{collections::HashMap, time::Duration};

use serde::{Deserialize, Serialize, de::IgnoredAny};
use serde_saphyr::{Location, Spanned};

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
    /// Alerts from container network policy, read from Cilium's Hubble: off when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cilium: Option<CiliumConfig>,
}

/// GitLab's `cilium` key: agentk follows Hubble's flows and reports the ones a network policy annotated
/// `app.gitlab.com/alert: "true"` dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CiliumConfig {
    /// `host:port` of hubble-relay (or of one Cilium agent's Hubble server), e.g.
    /// `hubble-relay.kube-system.svc:80`. Required.
    pub hubble_relay_address: String,
    /// TLS to the relay; plaintext when absent (hubble-relay's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<HubbleTlsConfig>,
    /// Which flows raise alerts. Default `[dropped]`: flows a policy dropped. `audit` adds flows a policy in
    /// audit mode would have dropped.
    #[serde(default = "default_alert_verdicts")]
    pub alert_verdicts: Vec<AlertVerdict>,
    /// New alerts (distinct source, destination, port, protocol, direction) one policy may raise per
    /// minute; further ones wait for the next minute, their drops still counted. Default 60.
    #[serde(default = "default_alerts_per_policy_per_minute")]
    pub max_alerts_per_policy_per_minute: u32,
}

/// Files on agentk's own filesystem (a mounted Secret), not in the repository.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubbleTlsConfig {
    /// PEM CA bundle the relay's certificate must chain to; the system's roots when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Client certificate and key, for a relay that requires mutual TLS (Cilium's default when TLS is on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<std::path::PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<std::path::PathBuf>,
    /// The name the relay's certificate must carry, e.g. `ui.hubble-relay.cilium.io`; the address's host
    /// when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

/// Hubble's verdicts that can raise an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertVerdict {
    /// Dropped by a policy.
    Dropped,
    /// Would have been dropped by a policy in audit mode.
    Audit,
}

fn default_alert_verdicts() -> Vec<AlertVerdict> {
    vec![AlertVerdict::Dropped]
}

fn default_alerts_per_policy_per_minute() -> u32 {
    60
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
    /// The project's path on the Git server, e.g. `group/project`. At most one entry per project
    /// (compared ignoring case, as Git servers do): a second entry with the same `id` is a validation
    /// error naming both lines. The agent keys a project's inventory, sync state and worker by `id`, so
    /// two entries would share one inventory and each sync would prune the other's objects; GitLab's schema
    /// gives one entry per project too, with all its files in that entry's `paths`.
    pub id: String,
    /// Which commit to apply; the default branch when absent.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<GitRefConfig>,
    /// Namespace for namespaced objects that name none. Default `default`. Changing it moves those
    /// objects: the next sync creates them in the new namespace and prunes them from the old one (they
    /// left the set), as a rename does.
    #[serde(default = "default_namespace")]
    pub default_namespace: String,
    /// Which files are manifests. Required, with at least one entry: an omitted or empty `paths` is a
    /// validation error with its line, not an empty selection (which would ask to prune everything).
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
    /// An extension of GitLab's schema (after Argo CD's `syncPolicy.automated.allowEmpty`): let a sync whose
    /// set of objects is empty prune everything this project applied. Default `false`: a sync whose set is
    /// empty while its inventory is not is refused with an error and nothing is pruned, so a glob that
    /// matches nothing, an emptied repository or emptied files cannot wipe a cluster. Set it to remove
    /// everything a project applied by emptying the project.
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

impl CiliumConfig {
    /// What the types cannot express: (field under `cilium`, message).
    fn validate(&self) -> Result<(), (String, String)> {
        let address = self.hubble_relay_address.trim();
        let port = address
            .rsplit_once(':')
            .filter(|(host, _)| !host.is_empty())
            .and_then(|(_, port)| port.parse::<u16>().ok())
            .filter(|&port| port > 0);
        if address.is_empty() || address.contains("://") || port.is_none() {
            return Err((
                "hubble_relay_address".into(),
                format!(
                    "{:?} is not host:port (e.g. hubble-relay.kube-system.svc:80)",
                    self.hubble_relay_address
                ),
            ));
        }
        if self.alert_verdicts.is_empty() {
            return Err((
                "alert_verdicts".into(),
                "at least one verdict is required (dropped, audit); remove `cilium` to turn alerts off".into(),
            ));
        }
        if self.max_alerts_per_policy_per_minute == 0 {
            return Err((
                "max_alerts_per_policy_per_minute".into(),
                "must be at least 1".into(),
            ));
        }
        if let Some(tls) = &self.tls
            && tls.cert_file.is_some() != tls.key_file.is_some()
        {
            return Err((
                "tls".into(),
                "cert_file and key_file go together (mutual TLS needs both)".into(),
            ));
        }
        Ok(())
    }
}

/// Most manifest projects one agent may list.
pub const MAX_MANIFEST_PROJECTS: usize = 100;

/// Where the manifest projects are in the file, for validation errors: a second, lenient pass (unknown
/// keys ignored) over text that already parsed strictly.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Located {
    gitops: LocatedGitops,
    cilium: Option<Spanned<IgnoredAny>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct LocatedGitops {
    manifest_projects: Vec<Spanned<LocatedProject>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct LocatedProject {
    id: Option<Spanned<IgnoredAny>>,
    paths: Option<Spanned<IgnoredAny>>,
}

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
        // Text that parsed strictly parses leniently too; should it not, errors just carry no line.
        let located: Located = parse_yaml(file, text).unwrap_or_default();
        config.validate(file, &located)?;
        Ok(config)
    }

    /// Checks what the types cannot express; errors name the field by its path in the file, and its line
    /// when `located` knows it.
    fn validate(&self, file: &str, located: &Located) -> Result<(), ConfigError> {
        let invalid = |field: String, at: Option<Location>, message: &str| match at {
            Some(at) if at.line() > 0 => ConfigError::InvalidAt {
                file: file.to_owned(),
                line: at.line() as usize,
                column: at.column() as usize,
                field,
                message: message.to_owned(),
            },
            _ => ConfigError::Invalid {
                file: file.to_owned(),
                field,
                message: message.to_owned(),
            },
        };
        let projects = &self.gitops.manifest_projects;
        let entries = &located.gitops.manifest_projects;
        let entry = |i: usize| entries.get(i).map(|e| e.referenced);
        let id_at = |i: usize| {
            entries
                .get(i)
                .and_then(|e| e.value.id.as_ref().map(|id| id.referenced))
                .or(entry(i))
        };
        if projects.len() > MAX_MANIFEST_PROJECTS {
            return Err(invalid(
                "gitops.manifest_projects".into(),
                entry(MAX_MANIFEST_PROJECTS),
                &format!(
                    "at most {MAX_MANIFEST_PROJECTS} entries are allowed, found {}",
                    projects.len()
                ),
            ));
        }
        // Normalised id → index of its first entry.
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, p) in projects.iter().enumerate() {
            let field = |name: &str| format!("gitops.manifest_projects[{i}].{name}");
            if p.id.trim().is_empty() {
                return Err(invalid(field("id"), id_at(i), "must not be empty"));
            }
            let key = p.id.trim().trim_matches('/').to_lowercase();
            if let Some(&first) = seen.get(&key) {
                let first_line = id_at(first).map_or(0, |l| l.line());
                return Err(invalid(
                    field("id"),
                    id_at(i),
                    &format!(
                        "project {:?} is already listed by gitops.manifest_projects[{first}] (line {first_line}): \
                         two entries of one project would share its inventory and prune each other's objects; \
                         list all its files in one entry's paths",
                        p.id
                    ),
                ));
            }
            seen.insert(key, i);
            if p.default_namespace.is_empty() {
                return Err(invalid(
                    field("default_namespace"),
                    entry(i),
                    "must not be empty",
                ));
            }
            if let Some(GitRefConfig::Branch(v) | GitRefConfig::Tag(v) | GitRefConfig::Commit(v)) =
                &p.reference
                && v.trim().is_empty()
            {
                return Err(invalid(field("ref"), entry(i), "must not be empty"));
            }
            if let Some(GitRefConfig::Commit(c)) = &p.reference
                && !(c.len() == 40 && c.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(invalid(
                    field("ref.commit"),
                    entry(i),
                    "must be a full 40-character commit id",
                ));
            }
            if p.paths.is_empty() {
                let at = entries
                    .get(i)
                    .and_then(|e| e.value.paths.as_ref().map(|p| p.referenced))
                    .or(entry(i));
                return Err(invalid(
                    field("paths"),
                    at,
                    "at least one glob or file is required (an empty selection would ask to prune \
                     everything the project applied)",
                ));
            }
            for (j, path) in p.paths.iter().enumerate() {
                let (PathConfig::Glob(v) | PathConfig::File(v)) = path;
                if v.trim().is_empty() {
                    return Err(invalid(
                        field(&format!("paths[{j}]")),
                        entry(i),
                        "must not be empty",
                    ));
                }
            }
        }
        if let Some(cilium) = &self.cilium {
            let at = located.cilium.as_ref().map(|c| c.referenced);
            cilium
                .validate()
                .map_err(|(field, message)| invalid(format!("cilium.{field}"), at, &message))?;
        }
        for (kind, entries) in [
            ("projects", &self.ci_access.projects),
            ("groups", &self.ci_access.groups),
        ] {
            for (i, e) in entries.iter().enumerate() {
                if e.id.trim().is_empty() {
                    return Err(invalid(
                        format!("ci_access.{kind}[{i}].id"),
                        None,
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
    use crate::MAX_YAML_ALIASES;

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
            format!("{FILE}:3:9: gitops.manifest_projects[0].id: must not be empty")
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

    fn projects(entries: &str) -> String {
        format!("gitops:\n  manifest_projects:\n{entries}")
    }

    #[test]
    fn paths_omitted_empty_or_null_is_refused_with_its_line() {
        for (text, line) in [
            (projects("  - id: a/b\n    default_namespace: apps\n"), 3),
            (projects("  - id: a/b\n    paths: []\n"), 4),
            (
                projects(
                    "  - id: a/b\n    paths:\n    - glob: '*.yaml'\n  - id: c/d\n    prune: true\n    paths: []\n",
                ),
                8,
            ),
        ] {
            let err = parse(&text).unwrap_err();
            let message = err.to_string();
            assert!(
                matches!(err, ConfigError::InvalidAt { ref field, .. } if field.ends_with("].paths")),
                "{message}"
            );
            assert_eq!(err.line(), Some(line), "{message}\n{text}");
            assert!(message.starts_with(&format!("{FILE}:{line}:")), "{message}");
            assert!(message.contains("at least one glob or file"), "{message}");
        }
        // `paths:` with no value is null, which the types refuse, also with its line.
        let err = parse(&projects("  - id: a/b\n    paths:\n")).unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { line: 4, .. }), "{err}");
    }

    #[test]
    fn allow_empty_is_an_extension_that_defaults_to_false() {
        let text = projects("  - id: a/b\n    paths: [{glob: '*.yaml'}]\n");
        assert!(!parse(&text).unwrap().gitops.manifest_projects[0].allow_empty);
        let text = projects("  - id: a/b\n    paths: [{glob: '*.yaml'}]\n    allow_empty: true\n");
        let config = parse(&text).unwrap();
        assert!(config.gitops.manifest_projects[0].allow_empty);
        assert_eq!(AgentConfig::from_json(&config.to_json()).unwrap(), config);
    }

    #[test]
    fn duplicate_project_ids_are_refused_with_both_lines() {
        for second in ["group/app", "Group/App", "/group/app/"] {
            let text = projects(&format!(
                "  - id: group/app\n    paths: [{{glob: 'base/*.yaml'}}]\n  - id: {second}\n    ref:\n      branch: staging\n    paths: [{{glob: 'staging/*.yaml'}}]\n"
            ));
            let err = parse(&text).unwrap_err();
            let message = err.to_string();
            assert_eq!(err.line(), Some(5), "{message}");
            assert!(
                message.starts_with(&format!(
                    "{FILE}:5:9: gitops.manifest_projects[1].id: project \"{second}\" is already listed by gitops.manifest_projects[0] (line 3)"
                )),
                "{message}"
            );
            assert!(message.contains("prune each other"), "{message}");
        }
        // Different projects are fine.
        parse(&projects(
            "  - id: group/app\n    paths: [{glob: '*'}]\n  - id: group/app2\n    paths: [{glob: '*'}]\n",
        ))
        .unwrap();
    }

    #[test]
    fn too_many_manifest_projects_are_refused_at_the_first_extra_entry() {
        let entries: String = (0..=MAX_MANIFEST_PROJECTS)
            .map(|i| format!("  - id: group/p{i}\n    paths: [{{glob: '*'}}]\n"))
            .collect();
        let err = parse(&projects(&entries)).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("at most 100 entries are allowed, found 101"),
            "{message}"
        );
        // Entry 101 starts on line 3 + 2 * 100.
        assert_eq!(err.line(), Some(203), "{message}");
    }

    #[test]
    fn non_utf8_bytes_are_refused() {
        let err = AgentConfig::parse(
            FILE,
            b"gitops:\n  manifest_projects:\n  - id: \xff\xfe\n",
            DEFAULT_MAX_CONFIG_SIZE,
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::SyntaxNoLocation { .. }), "{err}");
        assert!(err.to_string().contains("not UTF-8"), "{err}");
    }

    /// Within the size limit: one 60 KiB string aliased 4,000 times would be 250 MiB once deserialized;
    /// the budget counts the text aliases copy and stops at 4 MiB (serde-saphyr's default: 64 MiB).
    #[test]
    fn an_alias_bomb_within_the_size_limit_is_refused_by_the_yaml_budget() {
        let text = alias_bomb();
        assert!(text.len() <= DEFAULT_MAX_CONFIG_SIZE, "{}", text.len());
        let err = parse(&text).unwrap_err();
        assert!(
            matches!(err, ConfigError::TooComplex { ref limit, .. } if limit.contains("4 MiB of text")),
            "{err}"
        );
        // Long before the last alias: the 4 MiB are reached at about the 68th copy of 60 KiB.
        assert!(
            err.line()
                .is_some_and(|l| (6..=5 + MAX_YAML_ALIASES).contains(&l)),
            "{err}"
        );
    }

    /// A 60 KiB string, then as many aliases of it as fit in the size limit, then enough anchors that the
    /// alias/anchor ratio heuristic alone would not catch it.
    fn alias_bomb() -> String {
        let head = format!(
            "gitops:\n  manifest_projects:\n  - id: a/b\n    paths:\n    - glob: &s {}\n",
            "x".repeat(60 * 1024)
        );
        let tail: String = std::iter::once("ci_access:\n  projects:\n".to_owned())
            .chain((0..500).map(|i| format!("  - id: &a{i} p{i}\n")))
            .collect();
        let alias = "    - glob: *s\n";
        let n = (DEFAULT_MAX_CONFIG_SIZE - head.len() - tail.len()) / alias.len();
        assert!(n < 10 * 500 && n > 4_000, "{n} aliases");
        format!("{head}{}{tail}", alias.repeat(n))
    }

    /// The classic billion laughs: nine levels of nine aliases. Refused (unknown key at its line, before
    /// any alias is expanded) and, inside a known field, by the budget or the types.
    #[test]
    fn billion_laughs_are_refused() {
        let mut laughs = String::from("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for (prev, next) in ["a", "b", "c", "d", "e", "f", "g", "h"]
            .iter()
            .zip(["b", "c", "d", "e", "f", "g", "h", "i"])
        {
            let refs = vec![format!("*{prev}"); 9].join(", ");
            laughs.push_str(&format!("{next}: &{next} [{refs}]\n"));
        }
        let err = parse(&laughs).unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { line: 1, .. }), "{err}");
        // The same inside `ci_access.projects[0].environments` (a list of strings).
        let mut inside = String::from(
            "ci_access:\n  projects:\n  - id: x\n    environments: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n",
        );
        for (i, (prev, next)) in ["a", "b", "c", "d", "e", "f", "g", "h"]
            .iter()
            .zip(["b", "c", "d", "e", "f", "g", "h", "i"])
            .enumerate()
        {
            let refs = vec![format!("*{prev}"); 9].join(", ");
            inside.push_str(&format!(
                "  - id: x{i}\n    environments: &{next} [{refs}]\n"
            ));
        }
        let err = parse(&inside).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Syntax { .. } | ConfigError::TooComplex { .. }
            ),
            "{err}"
        );
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack() {
        // Flow collections, 60,000 deep, in a field that takes any sequence.
        let flow = format!(
            "ci_access:\n  projects:\n  - id: x\n    environments: {}{}\n",
            "[".repeat(60_000),
            "]".repeat(60_000)
        );
        let err = parse(&flow).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Syntax { .. } | ConfigError::TooComplex { .. }
            ),
            "{err}"
        );
        // Block mappings nested by indentation, as deep as 128 KiB allows (about 500 levels), under a
        // key the lenient location pass would read.
        let mut block = String::from("user_access:\n  access_as:\n");
        for depth in 2..500 {
            block.push_str(&format!("{}k{depth}:\n", " ".repeat(depth)));
        }
        let err = parse(&block).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Syntax { .. } | ConfigError::TooComplex { .. }
            ),
            "{err}"
        );
        // Sequences nested by indentation where a project is expected: the types refuse the first one
        // (the depth budget itself is tested in `lib.rs`, with a type that takes any nesting).
        let mut seqs = String::from("gitops:\n  manifest_projects:\n");
        for depth in 1..100 {
            seqs.push_str(&format!("{}-\n", " ".repeat(2 * depth)));
        }
        let err = parse(&seqs).unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { line: 4, .. }), "{err}");
    }

    #[test]
    fn huge_durations_are_refused_with_the_limit() {
        for huge in ["500000000000y", "99999999999999999999999s", "31days"] {
            let text = projects(&format!(
                "  - id: a/b\n    paths: [{{glob: '*'}}]\n    prune_timeout: {huge}\n"
            ));
            let err = parse(&text).unwrap_err();
            assert!(
                matches!(err, ConfigError::Syntax { line: 5, .. }),
                "{huge}: {err}"
            );
            assert!(err.to_string().contains(huge), "{err}");
        }
        let err = parse(&projects(
            "  - id: a/b\n    paths: [{glob: '*'}]\n    reconcile_timeout: 500000000000y\n",
        ))
        .unwrap_err();
        assert!(
            err.to_string().contains("over the limit of 30days"),
            "{err}"
        );
        let ok = parse(&projects(
            "  - id: a/b\n    paths: [{glob: '*'}]\n    reconcile_timeout: 30days\n",
        ))
        .unwrap();
        assert_eq!(
            ok.gitops.manifest_projects[0].reconcile_timeout,
            crate::duration::MAX_DURATION
        );
    }

    #[test]
    fn cilium_defaults_and_gitlab_key() {
        let config =
            parse("cilium:\n  hubble_relay_address: \"hubble-relay.kube-system.svc:80\"\n")
                .unwrap();
        let cilium = config.cilium.as_ref().unwrap();
        assert_eq!(
            cilium.hubble_relay_address,
            "hubble-relay.kube-system.svc:80"
        );
        assert_eq!(cilium.alert_verdicts, vec![AlertVerdict::Dropped]);
        assert_eq!(cilium.max_alerts_per_policy_per_minute, 60);
        assert!(cilium.tls.is_none());
        // The wire form round-trips; absent `cilium` stays absent.
        assert_eq!(AgentConfig::from_json(&config.to_json()).unwrap(), config);
        assert!(!AgentConfig::default().to_json().contains("cilium"));
    }

    #[test]
    fn cilium_tls_and_verdicts() {
        let config = parse(
            "cilium:\n  hubble_relay_address: relay:443\n  alert_verdicts: [dropped, audit]\n  tls:\n    ca_file: /etc/hubble/ca.crt\n    cert_file: /etc/hubble/tls.crt\n    key_file: /etc/hubble/tls.key\n    server_name: ui.hubble-relay.cilium.io\n",
        )
        .unwrap();
        let cilium = config.cilium.unwrap();
        assert_eq!(
            cilium.alert_verdicts,
            vec![AlertVerdict::Dropped, AlertVerdict::Audit]
        );
        let tls = cilium.tls.unwrap();
        assert_eq!(
            tls.server_name.as_deref(),
            Some("ui.hubble-relay.cilium.io")
        );
        assert!(tls.key_file.is_some());
    }

    #[test]
    fn cilium_mistakes_name_the_field_and_line() {
        for (body, field) in [
            (
                "  hubble_relay_address: \"\"\n",
                "cilium.hubble_relay_address",
            ),
            (
                "  hubble_relay_address: http://relay:80\n",
                "cilium.hubble_relay_address",
            ),
            (
                "  hubble_relay_address: relay\n",
                "cilium.hubble_relay_address",
            ),
            (
                "  hubble_relay_address: relay:0\n",
                "cilium.hubble_relay_address",
            ),
            (
                "  hubble_relay_address: relay:80\n  alert_verdicts: []\n",
                "cilium.alert_verdicts",
            ),
            (
                "  hubble_relay_address: relay:80\n  max_alerts_per_policy_per_minute: 0\n",
                "cilium.max_alerts_per_policy_per_minute",
            ),
            (
                "  hubble_relay_address: relay:80\n  tls:\n    cert_file: /c\n",
                "cilium.tls",
            ),
        ] {
            let err = parse(&format!("# alerts\ncilium:\n{body}")).unwrap_err();
            match &err {
                ConfigError::InvalidAt { line, field: f, .. } => {
                    assert_eq!((f.as_str(), *line), (field, 3), "{body}: {err}");
                }
                other => panic!("{body}: expected a located error, got {other}"),
            }
        }
        // Unknown keys and verdicts are syntax errors with their line.
        for body in [
            "  hubble_relay_address: relay:80\n  hubble_relay_adress: x\n",
            "  hubble_relay_address: relay:80\n  alert_verdicts: [forwarded]\n",
            "  relay: x\n",
        ] {
            let err = parse(&format!("cilium:\n{body}")).unwrap_err();
            assert!(matches!(err, ConfigError::Syntax { .. }), "{body}: {err}");
        }
    }
}
