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
    /// File holding the dashboard's read-only credential: GraphQL queries and the live event stream,
    /// never mutations. Optional; it must differ from the admin token.
    #[serde(default)]
    pub viewer_token_file: Option<PathBuf>,
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
    /// The Kubernetes API proxy (CI/CD tunnel, user access); served when `listen.k8s_proxy` is set.
    #[serde(default)]
    pub k8s_proxy: K8sProxyConfig,
    /// Network-policy alerts agents report: how many kas keeps and where it forwards them.
    #[serde(default)]
    pub alerts: AlertsConfig,
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
    /// TLS for the API listener (`https://`): the admin token and new agent secrets cross it. Plain text
    /// (with a warning at start) when absent.
    pub api_tls: Option<TlsFiles>,
    /// HTTP/2 keepalive pings to agents; below a load balancer's idle timeout. Default `20s`.
    #[serde(with = "crate::duration")]
    pub keepalive: Duration,
    /// An agent connection is closed unless it makes an authenticated call (TLS handshake and protocol
    /// detection included) within this. Default `10s`.
    #[serde(with = "crate::duration")]
    pub auth_timeout: Duration,
    /// Both listeners: a request's headers must arrive within this, and an idle HTTP/1 connection is
    /// closed after it. Default `10s`.
    #[serde(with = "crate::duration")]
    pub header_read_timeout: Duration,
    /// API listener: a request's whole body must arrive within this (a webhook is at most 5 MiB).
    /// Default `30s`.
    #[serde(with = "crate::duration")]
    pub body_read_timeout: Duration,
    /// Open agent connections; more are closed at once. Default 10000.
    pub max_agent_connections: usize,
    /// Agent connections that have not authenticated yet; more are closed at once. Default 1000.
    pub max_unauthenticated_connections: usize,
    /// Calls (streams and reverse tunnels) in flight per agent token; more are refused with
    /// `RESOURCE_EXHAUSTED`. Default 500 (agentk needs one per manifest project, at most 100, plus a few).
    pub max_calls_per_token: usize,
    /// Open API connections; more are closed at once. Default 1000.
    pub max_api_connections: usize,
    /// The Kubernetes API proxy for CI jobs and people (`kubectl` through the agent's connection), like
    /// GitLab's `:8154/k8s-proxy/`. Off when absent; the chart and `cargo xtask up` set `0.0.0.0:8154`.
    pub k8s_proxy: Option<SocketAddr>,
    /// TLS for the proxy listener (`https://`); bearer credentials cross it. Plain text (with a warning at
    /// start when not on loopback) when absent.
    pub k8s_proxy_tls: Option<TlsFiles>,
    /// `/metrics` (Prometheus), `/livez` and `/readyz`, plain HTTP. Off when absent; the chart sets
    /// `0.0.0.0:8151`.
    pub observability: Option<SocketAddr>,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            agent: ([0, 0, 0, 0], 8150).into(),
            api: ([0, 0, 0, 0], 8080).into(),
            agent_tls: None,
            api_tls: None,
            keepalive: Duration::from_secs(20),
            auth_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_agent_connections: 10_000,
            max_unauthenticated_connections: 1_000,
            max_calls_per_token: 500,
            max_api_connections: 1_000,
            k8s_proxy: None,
            k8s_proxy_tls: None,
            observability: None,
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
/// Largest `manifests.max_file_size`: a file and its path must fit in one gRPC message
/// ([`gitops_protocol::MAX_MESSAGE_BYTES`]); 64 KiB are left for the path and the framing.
pub const MAX_MANIFEST_FILE_SIZE: u64 = gitops_protocol::MAX_MESSAGE_BYTES as u64 - 64 * 1024;

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

/// Longest a Git server's answer about a personal access token (who it is, which projects and groups it
/// may reach) is reused: a token revoked in the Git server stops working within this.
pub const MAX_USER_CACHE_TTL: Duration = Duration::from_secs(10);

/// Highest `alerts.max_per_agent`.
pub const MAX_ALERTS_PER_AGENT: usize = 100_000;

/// The Kubernetes API proxy's settings besides its listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct K8sProxyConfig {
    /// The proxy's URL as clients reach it, written into kubeconfigs (`kas kubeconfig`, GraphQL). Default:
    /// `http(s)://127.0.0.1:<port>` of `listen.k8s_proxy`.
    pub url: Option<String>,
    /// CA certificate (PEM) that clients should trust for `url`, written into kubeconfigs. Default: the
    /// certificate of `listen.k8s_proxy_tls` when it is self-signed or a chain ending in its CA.
    pub ca_file: Option<PathBuf>,
    /// How long the Git server's answer about a personal access token is reused. Default and maximum `10s`.
    #[serde(with = "crate::duration")]
    pub user_cache_ttl: Duration,
    /// Lifetime of a CI token when its creator names none. Default `30d` (720h).
    #[serde(with = "crate::duration::long")]
    pub ci_token_default_ttl: Duration,
    /// Longest lifetime a CI token may be given. Default `365d` (8760h).
    #[serde(with = "crate::duration::long")]
    pub ci_token_max_ttl: Duration,
    /// Audit entries kept per agent (oldest dropped first). Default 1000.
    pub audit_entries_per_agent: usize,
    /// Proxied requests in flight per agent (watches and exec sessions included); more are answered 429.
    /// Default 500.
    pub max_requests_per_agent: usize,
}

impl Default for K8sProxyConfig {
    fn default() -> Self {
        Self {
            url: None,
            ca_file: None,
            user_cache_ttl: MAX_USER_CACHE_TTL,
            ci_token_default_ttl: Duration::from_secs(30 * 24 * 3600),
            ci_token_max_ttl: Duration::from_secs(365 * 24 * 3600),
            audit_entries_per_agent: 1000,
            max_requests_per_agent: 500,
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

/// `alerts:`: network-policy alerts from agents (docs/network-alerts.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Prometheus Alertmanager's base URL, e.g. `http://127.0.0.1:9093`; alerts go to `<url>/api/v2/alerts`.
    /// Not forwarded when absent (still stored and shown in GraphQL).
    pub alertmanager_url: Option<String>,
    /// A generic JSON webhook, signed with HMAC-SHA256.
    pub webhook: Option<AlertWebhookConfig>,
    /// kas's API address as people reach it, e.g. `https://kas.example.com`: alerts then link to the
    /// agent's dashboard page (Alertmanager's `generatorURL`). Omitted when absent.
    pub dashboard_url: Option<String>,
    /// Alerts kept per agent; over it, the one seen longest ago is dropped first. Default 1000.
    pub max_per_agent: usize,
    /// An alert with no new drops for this long is resolved (Alertmanager gets `endsAt = last seen + this`).
    /// Default `15m`.
    #[serde(with = "crate::duration")]
    pub resolve_after: Duration,
    /// An active alert whose count moved is posted again at most this often. Default `1m`.
    #[serde(with = "crate::duration")]
    pub resend_interval: Duration,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            alertmanager_url: None,
            webhook: None,
            dashboard_url: None,
            max_per_agent: 1000,
            resolve_after: Duration::from_secs(15 * 60),
            resend_interval: Duration::from_secs(60),
        }
    }
}

/// `alerts.webhook`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertWebhookConfig {
    /// Where kas POSTs the alerts as JSON.
    pub url: String,
    /// File holding the HMAC key of the `X-Gitops-Signature` header.
    pub secret_file: PathBuf,
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
        config.check_limits(file)?;
        Ok(config)
    }

    /// Limits that would make kas send what the receiver drops, or hang up on everyone.
    fn check_limits(&self, file: &str) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            file: file.to_owned(),
            field: field.into(),
            message,
        };
        // One manifest file travels in one gRPC message, next to its path.
        if self.manifests.max_file_size > MAX_MANIFEST_FILE_SIZE {
            return Err(invalid(
                "manifests.max_file_size",
                format!(
                    "{} bytes does not fit in one {}-byte message; at most {MAX_MANIFEST_FILE_SIZE}",
                    self.manifests.max_file_size,
                    gitops_protocol::MAX_MESSAGE_BYTES
                ),
            ));
        }
        let listen = &self.listen;
        for (field, value) in [
            ("listen.auth_timeout", listen.auth_timeout),
            ("listen.header_read_timeout", listen.header_read_timeout),
            ("listen.body_read_timeout", listen.body_read_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(field, "must be more than 0s".into()));
            }
        }
        for (field, value) in [
            ("listen.max_agent_connections", listen.max_agent_connections),
            (
                "listen.max_unauthenticated_connections",
                listen.max_unauthenticated_connections,
            ),
            ("listen.max_calls_per_token", listen.max_calls_per_token),
            ("listen.max_api_connections", listen.max_api_connections),
            (
                "k8s_proxy.audit_entries_per_agent",
                self.k8s_proxy.audit_entries_per_agent,
            ),
            (
                "k8s_proxy.max_requests_per_agent",
                self.k8s_proxy.max_requests_per_agent,
            ),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be at least 1".into()));
            }
        }
        self.check_k8s_proxy(file)?;
        self.check_alerts(file)
    }

    fn check_alerts(&self, file: &str) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: &str| ConfigError::Invalid {
            file: file.to_owned(),
            field: field.into(),
            message: message.into(),
        };
        let alerts = &self.alerts;
        let is_http = |url: &str| url.starts_with("http://") || url.starts_with("https://");
        if let Some(url) = &alerts.alertmanager_url
            && !is_http(url)
        {
            return Err(invalid(
                "alerts.alertmanager_url",
                "must be an http:// or https:// URL",
            ));
        }
        if let Some(webhook) = &alerts.webhook
            && !is_http(&webhook.url)
        {
            return Err(invalid(
                "alerts.webhook.url",
                "must be an http:// or https:// URL",
            ));
        }
        if let Some(url) = &alerts.dashboard_url
            && !is_http(url)
        {
            return Err(invalid(
                "alerts.dashboard_url",
                "must be an http:// or https:// URL",
            ));
        }
        if alerts.max_per_agent == 0 {
            return Err(invalid("alerts.max_per_agent", "must be at least 1"));
        }
        if alerts.max_per_agent > MAX_ALERTS_PER_AGENT {
            return Err(invalid(
                "alerts.max_per_agent",
                "at most 100000: every alert of an agent is held to answer GraphQL",
            ));
        }
        for (field, value) in [
            ("alerts.resolve_after", alerts.resolve_after),
            ("alerts.resend_interval", alerts.resend_interval),
        ] {
            if value < Duration::from_secs(1) {
                return Err(invalid(field, "must be at least 1s"));
            }
        }
        Ok(())
    }

    fn check_k8s_proxy(&self, file: &str) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            file: file.to_owned(),
            field: field.into(),
            message,
        };
        let proxy = &self.k8s_proxy;
        if proxy.user_cache_ttl > MAX_USER_CACHE_TTL {
            return Err(invalid(
                "k8s_proxy.user_cache_ttl",
                "at most 10s: a token revoked in the Git server must stop working within 10s"
                    .into(),
            ));
        }
        if proxy.ci_token_default_ttl.is_zero() || proxy.ci_token_max_ttl.is_zero() {
            return Err(invalid(
                "k8s_proxy.ci_token_default_ttl",
                "CI tokens always expire; lifetimes must be more than 0s".into(),
            ));
        }
        if proxy.ci_token_default_ttl > proxy.ci_token_max_ttl {
            return Err(invalid(
                "k8s_proxy.ci_token_default_ttl",
                "must not exceed k8s_proxy.ci_token_max_ttl".into(),
            ));
        }
        if let Some(url) = &proxy.url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(invalid(
                "k8s_proxy.url",
                "must be an http:// or https:// URL".into(),
            ));
        }
        Ok(())
    }

    /// The admin credential, if configured. Read at start so a missing file is a start-up error.
    pub fn read_admin_token(&self) -> Result<Option<String>, ConfigError> {
        read_secret(self.admin_token_file.as_deref())
    }

    /// The viewer credential, if configured; refused when it equals the admin credential, which would make
    /// the read-only token an admin one.
    pub fn read_viewer_token(&self) -> Result<Option<String>, ConfigError> {
        let viewer = read_secret(self.viewer_token_file.as_deref())?;
        if viewer.is_some() && viewer == self.read_admin_token()? {
            return Err(ConfigError::Invalid {
                file: self
                    .viewer_token_file
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                field: "viewer_token_file".into(),
                message: "holds the admin token; the viewer token must be a different secret"
                    .into(),
            });
        }
        Ok(viewer)
    }

    /// The webhook secret, if configured.
    pub fn read_webhook_secret(&self) -> Result<Option<String>, ConfigError> {
        read_secret(self.webhooks.secret_file.as_deref())
    }

    /// The alerts webhook's HMAC key, if a webhook is configured.
    pub fn read_alerts_webhook_secret(&self) -> Result<Option<String>, ConfigError> {
        read_secret(
            self.alerts
                .webhook
                .as_ref()
                .map(|w| w.secret_file.as_path()),
        )
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

    fn scratch_dir(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kas-config-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    const GIT: &str = "git:\n  base_url: http://gitea:3000\n";

    #[test]
    fn a_file_size_that_does_not_fit_a_message_is_refused_at_load() {
        let ok = format!("{GIT}manifests:\n  max_file_size: 8388608\n");
        assert_eq!(
            ServerConfig::parse("kas.yaml", &ok)
                .unwrap()
                .manifests
                .max_file_size,
            8 * 1024 * 1024
        );
        let too_big = format!("{GIT}manifests:\n  max_file_size: 67108864\n");
        let err = ServerConfig::parse("kas.yaml", &too_big).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("kas.yaml: manifests.max_file_size: 67108864 bytes does not fit"),
            "{err}"
        );
    }

    #[test]
    fn listener_limits_have_defaults_and_refuse_zero() {
        let c = ServerConfig::parse("kas.yaml", GIT).unwrap();
        assert_eq!(c.listen.auth_timeout, Duration::from_secs(10));
        assert_eq!(c.listen.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.listen.body_read_timeout, Duration::from_secs(30));
        assert!(c.listen.api_tls.is_none());
        let c = ServerConfig::parse(
            "kas.yaml",
            &format!("listen:\n  auth_timeout: 500ms\n  max_calls_per_token: 3\n{GIT}"),
        )
        .unwrap();
        assert_eq!(c.listen.auth_timeout, Duration::from_millis(500));
        assert_eq!(c.listen.max_calls_per_token, 3);
        for (yaml, field) in [
            (
                "listen:\n  header_read_timeout: 0s\n",
                "listen.header_read_timeout",
            ),
            (
                "listen:\n  max_api_connections: 0\n",
                "listen.max_api_connections",
            ),
        ] {
            let err = ServerConfig::parse("kas.yaml", &format!("{yaml}{GIT}")).unwrap_err();
            assert!(err.to_string().contains(field), "{err}");
        }
    }

    #[test]
    fn the_proxy_is_off_by_default_and_its_limits_are_checked() {
        let c = ServerConfig::parse("kas.yaml", GIT).unwrap();
        assert!(c.listen.k8s_proxy.is_none());
        assert_eq!(c.k8s_proxy.user_cache_ttl, Duration::from_secs(10));
        assert_eq!(
            c.k8s_proxy.ci_token_default_ttl,
            Duration::from_secs(30 * 24 * 3600)
        );
        let c = ServerConfig::parse(
            "kas.yaml",
            &format!(
                "listen:\n  k8s_proxy: 127.0.0.1:8154\nk8s_proxy:\n  user_cache_ttl: 2s\n{GIT}"
            ),
        )
        .unwrap();
        assert_eq!(c.listen.k8s_proxy.unwrap().port(), 8154);
        assert_eq!(c.k8s_proxy.user_cache_ttl, Duration::from_secs(2));
        for (yaml, field) in [
            (
                "k8s_proxy:\n  user_cache_ttl: 11s\n",
                "k8s_proxy.user_cache_ttl",
            ),
            (
                "k8s_proxy:\n  ci_token_default_ttl: 0s\n",
                "k8s_proxy.ci_token_default_ttl",
            ),
            (
                "k8s_proxy:\n  ci_token_default_ttl: 9000h\n",
                "k8s_proxy.ci_token_default_ttl",
            ),
            ("k8s_proxy:\n  url: kas:8154\n", "k8s_proxy.url"),
            (
                "k8s_proxy:\n  max_requests_per_agent: 0\n",
                "k8s_proxy.max_requests_per_agent",
            ),
        ] {
            let err = ServerConfig::parse("kas.yaml", &format!("{yaml}{GIT}")).unwrap_err();
            assert!(err.to_string().contains(field), "{yaml}: {err}");
        }
    }

    #[test]
    fn huge_numbers_and_bad_durations_are_errors_not_panics() {
        for yaml in [
            "manifests:\n  max_file_size: 99999999999999999999999999\n",
            "manifests:\n  max_files: -1\n",
            "listen:\n  keepalive: 99999999999999999999999h\n",
            "listen:\n  agent: 999.0.0.1:99999\n",
            "git:\n  base_url: http://g\n  poll_period: 1e400s\n",
        ] {
            let text = if yaml.starts_with("git:") {
                yaml.to_owned()
            } else {
                format!("{yaml}{GIT}")
            };
            let err = ServerConfig::parse("kas.yaml", &text).unwrap_err();
            assert!(err.to_string().starts_with("kas.yaml:"), "{yaml}: {err}");
        }
    }

    #[test]
    fn a_yaml_alias_bomb_is_refused_fast() {
        // Billion laughs: nine levels of ten aliases each would expand to 10^9 strings.
        let mut yaml = String::from("a0: &a0 [lol]\n");
        for level in 1..10 {
            let refs = vec![format!("*a{}", level - 1); 10].join(", ");
            yaml.push_str(&format!("a{level}: &a{level} [{refs}]\n"));
        }
        yaml.push_str(GIT);
        let started = std::time::Instant::now();
        let err = ServerConfig::parse("kas.yaml", &yaml).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
        assert!(err.to_string().starts_with("kas.yaml:"), "{err}");
    }

    #[test]
    fn invalid_utf8_names_the_file() {
        let dir = scratch_dir("utf8");
        let path = dir.join("kas.yaml");
        std::fs::write(&path, b"git:\n  base_url: http://g\xff\xfe\n").unwrap();
        let err = ServerConfig::load(&path).unwrap_err();
        assert!(
            err.to_string().starts_with(&path.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn an_empty_or_blank_secret_file_is_a_start_up_error() {
        let dir = scratch_dir("secrets");
        for (name, text) in [("empty", ""), ("blank", " \n\t\n")] {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            let c = ServerConfig::parse(
                "kas.yaml",
                &format!("admin_token_file: {}\n{GIT}", path.display()),
            )
            .unwrap();
            let err = c.read_admin_token().unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("{}: file is empty", path.display())
            );
        }
    }

    #[test]
    fn the_viewer_token_is_read_and_must_differ_from_the_admin_token() {
        let dir = scratch_dir("viewer");
        let (admin, viewer) = (dir.join("admin"), dir.join("viewer"));
        std::fs::write(&admin, "admin-secret\n").unwrap();
        std::fs::write(&viewer, "viewer-secret\n").unwrap();
        let yaml = |viewer: &std::path::Path| {
            format!(
                "admin_token_file: {}\nviewer_token_file: {}\n{GIT}",
                admin.display(),
                viewer.display()
            )
        };
        let c = ServerConfig::parse("kas.yaml", &yaml(&viewer)).unwrap();
        assert_eq!(
            c.read_viewer_token().unwrap().as_deref(),
            Some("viewer-secret")
        );
        let c = ServerConfig::parse("kas.yaml", &yaml(&admin)).unwrap();
        let err = c.read_viewer_token().unwrap_err().to_string();
        assert!(
            err.contains("viewer_token_file") && err.contains("admin token"),
            "{err}"
        );
        let c = ServerConfig::parse("kas.yaml", GIT).unwrap();
        assert_eq!(c.read_viewer_token().unwrap(), None);
    }

    #[test]
    fn alerts_have_defaults_and_bad_values_name_the_field() {
        let c = ServerConfig::parse("kas.yaml", GIT).unwrap();
        assert_eq!(c.alerts.max_per_agent, 1000);
        assert_eq!(c.alerts.resolve_after, Duration::from_secs(900));
        assert_eq!(c.alerts.resend_interval, Duration::from_secs(60));
        assert_eq!(c.alerts.alertmanager_url, None);
        let dir = scratch_dir("alerts");
        let secret = dir.join("hook");
        std::fs::write(&secret, "hook-secret\n").unwrap();
        let c = ServerConfig::parse(
            "kas.yaml",
            &format!(
                "alerts:\n  alertmanager_url: http://127.0.0.1:9093\n  webhook:\n    url: https://hooks.example/x\n    \
                 secret_file: {}\n  max_per_agent: 5\n  resolve_after: 2m\n  resend_interval: 10s\n{GIT}",
                secret.display()
            ),
        )
        .unwrap();
        assert_eq!(
            c.alerts.alertmanager_url.as_deref(),
            Some("http://127.0.0.1:9093")
        );
        assert_eq!(c.alerts.max_per_agent, 5);
        assert_eq!(c.alerts.resolve_after, Duration::from_secs(120));
        assert_eq!(
            c.read_alerts_webhook_secret().unwrap().as_deref(),
            Some("hook-secret")
        );
        for (yaml, field) in [
            (
                "alerts:\n  alertmanager_url: am:9093\n",
                "alerts.alertmanager_url",
            ),
            (
                "alerts:\n  webhook:\n    url: ftp://x\n    secret_file: /s\n",
                "alerts.webhook.url",
            ),
            ("alerts:\n  max_per_agent: 0\n", "alerts.max_per_agent"),
            (
                "alerts:\n  dashboard_url: kas.example\n",
                "alerts.dashboard_url",
            ),
            ("alerts:\n  max_per_agent: 100001\n", "alerts.max_per_agent"),
            ("alerts:\n  resolve_after: 0s\n", "alerts.resolve_after"),
            (
                "alerts:\n  resend_interval: 10ms\n",
                "alerts.resend_interval",
            ),
            // Unknown and missing fields are named by the parser.
            ("alerts:\n  alertmanager: http://am\n", "alertmanager"),
            ("alerts:\n  webhook:\n    url: http://x\n", "secret_file"),
            (
                "alerts:\n  webhook:\n    url: http://x\n    secret: s\n",
                "secret",
            ),
            ("alerts:\n  resolve_after: soon\n", "soon"),
        ] {
            let err = ServerConfig::parse("kas.yaml", &format!("{yaml}{GIT}")).unwrap_err();
            assert!(err.to_string().contains(field), "{yaml}: {err}");
        }
        let missing = ServerConfig::parse(
            "kas.yaml",
            &format!(
                "alerts:\n  webhook:\n    url: http://x\n    secret_file: {}\n{GIT}",
                dir.join("absent").display()
            ),
        )
        .unwrap();
        let err = missing
            .read_alerts_webhook_secret()
            .unwrap_err()
            .to_string();
        assert!(err.contains("absent"), "{err}");
    }
}
