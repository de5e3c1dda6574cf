//! kas's own configuration file (`kas.yaml`). Secrets are never inline: they are read from files whose paths
//! the configuration names, so the file itself can live in a ConfigMap.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{ConfigError, parse_yaml};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default)]
    pub listen: ListenConfig,
    /// Where kas keeps its database and Git cache. Default `./kas-data`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// File holding the admin credential for the GraphQL API and the CLI. Without one, the admin API refuses
    /// every request.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    pub git: GitServerConfig,
    #[serde(default)]
    pub agent: AgentLimits,
    /// What one manifest project may deliver to an agent.
    #[serde(default)]
    pub manifests: ManifestLimits,
    /// Push webhooks from the Git server make kas re-check a repository at once.
    #[serde(default)]
    pub webhooks: WebhookConfig,
    #[serde(default)]
    pub logging: ServerLogging,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// agentk connects here: gRPC over HTTP/2, or gRPC inside WebSocket (`/agentk`). Default `0.0.0.0:8150`.
    pub agent: SocketAddr,
    /// GraphQL (`/api/graphql`), its explorer, webhooks, health. Default `0.0.0.0:8080`.
    pub api: SocketAddr,
    /// TLS for the agent listener (`grpcs://`, `wss://`). Plain text when absent.
    pub agent_tls: Option<TlsFiles>,
    /// HTTP/2 keepalive pings to agents; below a load balancer's idle timeout. Default `20s`.
    #[serde(with = "crate::duration")]
    pub keepalive: Duration,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            agent: ([0, 0, 0, 0], 8150).into(),
            api: ([0, 0, 0, 0], 8080).into(),
            agent_tls: None,
            keepalive: Duration::from_secs(20),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// The Git server whose repositories are the projects: `project_path` `group/project` is
/// `<base_url>/group/project.git`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitServerConfig {
    pub base_url: String,
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the password or access token for `username`.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// How often watched repositories are checked (only the ref; objects are fetched only on change).
    /// Default `20s`; webhooks make changes instant anyway.
    #[serde(default = "default_poll_period", with = "crate::duration")]
    pub poll_period: Duration,
    /// CA certificates (PEM) to trust for an `https://` Git server besides the system's, e.g. a private CA.
    /// A proxy comes from `HTTPS_PROXY` / `NO_PROXY`.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentLimits {
    /// Largest `config.yaml` accepted. Default 128 KiB.
    pub max_config_size: usize,
    /// Most active tokens one agent may have. Default 2.
    pub max_active_tokens: usize,
}

impl Default for AgentLimits {
    fn default() -> Self {
        Self {
            max_config_size: crate::agent::DEFAULT_MAX_CONFIG_SIZE,
            max_active_tokens: 2,
        }
    }
}

/// How much of a repository one manifest project may deliver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ManifestLimits {
    /// Largest single manifest file. Default 1 MiB.
    pub max_file_size: u64,
    /// All matched files together. Default 50 MiB.
    pub max_total_size: u64,
    /// Matched files. Default 5000.
    pub max_files: usize,
    /// `paths[]` entries per manifest project. Default 20.
    pub max_paths: usize,
}

impl Default for ManifestLimits {
    fn default() -> Self {
        Self {
            max_file_size: 1024 * 1024,
            max_total_size: 50 * 1024 * 1024,
            max_files: 5000,
            max_paths: 20,
        }
    }
}

/// `POST /api/webhooks/{gitea,github,gitlab}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// File holding the shared secret: the HMAC key for Gitea and GitHub signatures, the token GitLab sends.
    /// Without it the webhook endpoints refuse every request.
    pub secret_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerLogging {
    pub level: crate::agent::LogLevel,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One JSON object per line, as the seed shows.
    #[default]
    Json,
    /// For people at a terminal.
    Text,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("kas-data")
}
fn default_poll_period() -> Duration {
    Duration::from_secs(20)
}

impl ServerConfig {
    /// Reads and validates `path`.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io {
            file: file.clone(),
            message: e.to_string(),
        })?;
        Self::parse(&file, &text)
    }

    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let config: Self = parse_yaml(file, text)?;
        if !(config.git.base_url.starts_with("http://")
            || config.git.base_url.starts_with("https://"))
        {
            return Err(ConfigError::Invalid {
                file: file.to_owned(),
                field: "git.base_url".into(),
                message: "must be an http:// or https:// URL".into(),
            });
        }
        if config.git.poll_period < Duration::from_secs(1) {
            return Err(ConfigError::Invalid {
                file: file.to_owned(),
                field: "git.poll_period".into(),
                message: "must be at least 1s".into(),
            });
        }
        Ok(config)
    }

    /// The admin credential, if configured. Read at start so a missing file is a start-up error.
    pub fn read_admin_token(&self) -> Result<Option<String>, ConfigError> {
        read_secret(self.admin_token_file.as_deref())
    }

    /// The webhook secret, if configured.
    pub fn read_webhook_secret(&self) -> Result<Option<String>, ConfigError> {
        read_secret(self.webhooks.secret_file.as_deref())
    }

    /// The Git password, if configured.
    pub fn read_git_password(&self) -> Result<Option<String>, ConfigError> {
        read_secret(self.git.password_file.as_deref())
    }
}

fn read_secret(path: Option<&std::path::Path>) -> Result<Option<String>, ConfigError> {
    let Some(path) = path else { return Ok(None) };
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io {
        file: path.display().to_string(),
        message: e.to_string(),
    })?;
    let secret = text.trim().to_owned();
    if secret.is_empty() {
        return Err(ConfigError::Io {
            file: path.display().to_string(),
            message: "file is empty".into(),
        });
    }
    Ok(Some(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_has_defaults() {
        let c = ServerConfig::parse("kas.yaml", "git:\n  base_url: http://gitea:3000\n").unwrap();
        assert_eq!(c.listen.agent.port(), 8150);
        assert_eq!(c.git.poll_period, Duration::from_secs(20));
        assert_eq!(c.agent.max_active_tokens, 2);
        assert_eq!(c.logging.format, LogFormat::Json);
    }

    #[test]
    fn bad_values_are_named() {
        let err = ServerConfig::parse("kas.yaml", "git:\n  base_url: gitea:3000\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "kas.yaml: git.base_url: must be an http:// or https:// URL"
        );
        let err = ServerConfig::parse("kas.yaml", "git:\n  base_url: http://g\n  pol_period: 1s\n")
            .unwrap_err();
        assert!(err.to_string().contains("pol_period"), "{err}");
    }
}
