//! kubeconfigs for the proxy: one context per agent, named `<config-project-path>:<agent-name>` as GitLab
//! names them, the proxy's URL, its CA when it serves TLS, the credential `ci:<agent-id>:<token>` (a kas CI
//! token) or `pat:<agent-id>:<token>` (a Git server token), and the `default_namespace` of the
//! `ci_access` entry that admits the CI token's project.
//!
//! GraphQL returns them with [`TOKEN_PLACEHOLDER`] in place of the secret unless it just created the token;
//! `kas kubeconfig` fills in the secret on the client, so it never travels to kas for this.

use std::{net::SocketAddr, path::PathBuf, sync::Mutex};

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::{
    ProxyError,
    auth::{self, access, ci::CI_TOKEN_PREFIX},
};
use crate::{KasState, store::ci_tokens::CiTokenRecord};

/// Where the secret goes in a kubeconfig GraphQL returns.
pub const TOKEN_PLACEHOLDER: &str = "<token>";

/// The name of the one cluster entry (the proxy).
const CLUSTER_NAME: &str = "kas";

/// How clients reach the proxy, from kas's configuration.
#[derive(Debug, Default)]
pub struct ProxyEndpoint {
    url: Option<String>,
    ca_file: Option<PathBuf>,
    tls_cert_file: Option<PathBuf>,
    listen: Mutex<Option<SocketAddr>>,
}

impl ProxyEndpoint {
    pub fn new(config: &gitops_config::ServerConfig) -> Self {
        Self {
            url: config.k8s_proxy.url.clone(),
            ca_file: config.k8s_proxy.ca_file.clone(),
            tls_cert_file: config
                .listen
                .k8s_proxy_tls
                .as_ref()
                .map(|t| t.cert_file.clone()),
            listen: Mutex::new(config.listen.k8s_proxy),
        }
    }

    pub fn set_listen_addr(&self, addr: SocketAddr) {
        *self.listen.lock().expect("endpoint lock") = Some(addr);
    }

    /// `k8s_proxy.url`, else `http(s)://127.0.0.1:<port of listen.k8s_proxy>`.
    pub fn server_url(&self) -> Result<String, String> {
        if let Some(url) = &self.url {
            return Ok(url.trim_end_matches('/').to_owned());
        }
        let listen = *self.listen.lock().expect("endpoint lock");
        let addr = listen.ok_or_else(|| {
            "the Kubernetes API proxy is off: set listen.k8s_proxy (and k8s_proxy.url for clients elsewhere)"
                .to_owned()
        })?;
        let scheme = if self.tls_cert_file.is_some() {
            "https"
        } else {
            "http"
        };
        Ok(format!("{scheme}://127.0.0.1:{}", addr.port()))
    }

    /// The CA clients should trust: `k8s_proxy.ca_file`, else the `listen.k8s_proxy_tls` certificate;
    /// none without TLS. Errors name the file.
    pub fn ca_pem(&self) -> Result<Option<Vec<u8>>, String> {
        let file = match (&self.ca_file, &self.tls_cert_file) {
            (Some(ca), _) => ca,
            (None, Some(cert)) => cert,
            (None, None) => return Ok(None),
        };
        std::fs::read(file)
            .map(Some)
            .map_err(|e| format!("reading {}: {e}", file.display()))
    }
}

/// One context of a kubeconfig.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextSpec {
    pub agent_id: u64,
    pub config_project: String,
    pub agent_name: String,
    pub namespace: Option<String>,
}

/// The bearer credential for `agent_id`: `ci:` for a kas CI token, `pat:` for anything else.
pub fn bearer(agent_id: u64, secret: &str) -> String {
    let kind = if secret.starts_with(CI_TOKEN_PREFIX) {
        "ci"
    } else {
        "pat"
    };
    format!("{kind}:{agent_id}:{secret}")
}

/// A kubeconfig, as much of it as kas writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kubeconfig {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub kind: String,
    pub clusters: Vec<NamedCluster>,
    pub users: Vec<NamedUser>,
    pub contexts: Vec<NamedContext>,
    #[serde(rename = "current-context")]
    pub current_context: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedCluster {
    pub name: String,
    pub cluster: Cluster,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    pub server: String,
    #[serde(
        rename = "certificate-authority-data",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub certificate_authority_data: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedUser {
    pub name: String,
    pub user: User,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub token: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedContext {
    pub name: String,
    pub context: Context,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Context {
    pub cluster: String,
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

impl Kubeconfig {
    /// One context per agent, all through the proxy at `server`; `secret` is the token (or
    /// [`TOKEN_PLACEHOLDER`], with `ci_token` saying which prefix it stands for).
    pub fn build(
        server: &str,
        ca_pem: Option<&[u8]>,
        contexts: &[ContextSpec],
        secret: &str,
        ci_token: bool,
    ) -> Self {
        let credential = |agent_id: u64| {
            if secret == TOKEN_PLACEHOLDER {
                let kind = if ci_token { "ci" } else { "pat" };
                format!("{kind}:{agent_id}:{TOKEN_PLACEHOLDER}")
            } else {
                bearer(agent_id, secret)
            }
        };
        Self {
            api_version: "v1".into(),
            kind: "Config".into(),
            clusters: vec![NamedCluster {
                name: CLUSTER_NAME.into(),
                cluster: Cluster {
                    server: server.to_owned(),
                    certificate_authority_data: ca_pem
                        .map(|pem| base64::engine::general_purpose::STANDARD.encode(pem)),
                },
            }],
            users: contexts
                .iter()
                .map(|c| NamedUser {
                    name: user_name(c.agent_id),
                    user: User {
                        token: credential(c.agent_id),
                    },
                })
                .collect(),
            contexts: contexts
                .iter()
                .map(|c| NamedContext {
                    name: format!("{}:{}", c.config_project, c.agent_name),
                    context: Context {
                        cluster: CLUSTER_NAME.into(),
                        user: user_name(c.agent_id),
                        namespace: c.namespace.clone(),
                    },
                })
                .collect(),
            current_context: contexts
                .first()
                .map(|c| format!("{}:{}", c.config_project, c.agent_name))
                .unwrap_or_default(),
        }
    }

    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(self).expect("a kubeconfig serializes")
    }

    pub fn from_yaml(text: &str) -> Result<Self, String> {
        serde_saphyr::from_str(text).map_err(|e| format!("not a kubeconfig kas wrote: {e}"))
    }

    /// Puts `secret` where GraphQL left [`TOKEN_PLACEHOLDER`], with the prefix its kind needs.
    pub fn fill_token(&mut self, secret: &str) -> Result<(), String> {
        for user in &mut self.users {
            let agent_id = user
                .user
                .token
                .strip_suffix(TOKEN_PLACEHOLDER)
                .and_then(|rest| rest.strip_suffix(':'))
                .and_then(|rest| rest.split_once(':'))
                .and_then(|(_, id)| id.parse::<u64>().ok())
                .ok_or_else(|| format!("user {:?} has no token placeholder", user.name))?;
            user.user.token = bearer(agent_id, secret);
        }
        Ok(())
    }
}

/// The kubeconfig for `agent_ids` through this kas: for `ci_token` (its namespace per agent from the agent's
/// current `ci_access`, refused when the agent does not admit its project) or, without one, for a Git server
/// token. `secret` is the token or [`TOKEN_PLACEHOLDER`]. Errors name each agent that failed.
pub async fn for_agents(
    state: &KasState,
    agent_ids: &[u64],
    ci_token: Option<&CiTokenRecord>,
    secret: &str,
) -> Result<Kubeconfig, Vec<String>> {
    let endpoint = &state.k8s_proxy.credentials.endpoint;
    let server = endpoint.server_url().map_err(|e| vec![e])?;
    let ca = endpoint.ca_pem().map_err(|e| vec![e])?;
    if let Some(token) = ci_token {
        auth::ci::check_usable(token, crate::store::now()).map_err(|e| vec![e.to_string()])?;
    }
    let mut contexts = Vec::new();
    let mut errors = Vec::new();
    for &agent_id in agent_ids {
        match context_for(state, agent_id, ci_token).await {
            Ok(context) => contexts.push(context),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Kubeconfig::build(
        &server,
        ca.as_deref(),
        &contexts,
        secret,
        ci_token.is_some(),
    ))
}

async fn context_for(
    state: &KasState,
    agent_id: u64,
    ci_token: Option<&CiTokenRecord>,
) -> Result<ContextSpec, ProxyError> {
    let agent = auth::agent_of(state, agent_id)?;
    let namespace = match ci_token {
        Some(token) => {
            let (_tracker, config) = auth::current_config(state, &agent).await?;
            access::decide_ci(
                &config,
                &auth::agent_ref(&agent),
                &token.project_path,
                token.environment.as_deref(),
            )
            .map_err(ProxyError::Forbidden)?
            .default_namespace
        }
        None => None,
    };
    Ok(ContextSpec {
        agent_id,
        config_project: agent.project_path,
        agent_name: agent.name,
        namespace,
    })
}

fn user_name(agent_id: u64) -> String {
    format!("agent:{agent_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contexts() -> Vec<ContextSpec> {
        vec![
            ContextSpec {
                agent_id: 7,
                config_project: "ops/clusters".into(),
                agent_name: "prod".into(),
                namespace: Some("apps".into()),
            },
            ContextSpec {
                agent_id: 9,
                config_project: "ops/clusters".into(),
                agent_name: "staging".into(),
                namespace: None,
            },
        ]
    }

    #[test]
    fn a_kubeconfig_parses_back_with_one_context_per_agent() {
        let pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let config = Kubeconfig::build(
            "https://kas.example.com:8154",
            Some(pem),
            &contexts(),
            "kasci_secret",
            true,
        );
        let yaml = config.to_yaml();
        let parsed = Kubeconfig::from_yaml(&yaml).unwrap();
        assert_eq!(parsed, config);
        // And as plain YAML, in kubectl's field names.
        let value: serde_json::Value = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(value["kind"], "Config");
        assert_eq!(value["current-context"], "ops/clusters:prod");
        assert_eq!(
            value["clusters"][0]["cluster"]["server"],
            "https://kas.example.com:8154"
        );
        let ca = value["clusters"][0]["cluster"]["certificate-authority-data"]
            .as_str()
            .unwrap();
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(ca)
                .unwrap(),
            pem
        );
        assert_eq!(value["users"][0]["name"], "agent:7");
        assert_eq!(value["users"][0]["user"]["token"], "ci:7:kasci_secret");
        assert_eq!(value["users"][1]["user"]["token"], "ci:9:kasci_secret");
        let names: Vec<_> = value["contexts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["ops/clusters:prod", "ops/clusters:staging"]);
        assert_eq!(value["contexts"][0]["context"]["namespace"], "apps");
        assert_eq!(value["contexts"][0]["context"]["user"], "agent:7");
        assert!(value["contexts"][1]["context"].get("namespace").is_none());
    }

    #[test]
    fn plain_http_has_no_ca_and_a_pat_is_written_as_pat() {
        let config = Kubeconfig::build(
            "http://127.0.0.1:8154",
            None,
            &contexts(),
            "gitea-pat",
            false,
        );
        let value: serde_json::Value = serde_saphyr::from_str(&config.to_yaml()).unwrap();
        assert!(
            value["clusters"][0]["cluster"]
                .get("certificate-authority-data")
                .is_none()
        );
        assert_eq!(value["users"][0]["user"]["token"], "pat:7:gitea-pat");
    }

    #[test]
    fn the_placeholder_is_filled_on_the_client() {
        let mut config = Kubeconfig::build("http://h", None, &contexts(), TOKEN_PLACEHOLDER, true);
        assert_eq!(config.users[1].user.token, "ci:9:<token>");
        let mut again = Kubeconfig::from_yaml(&config.to_yaml()).unwrap();
        again.fill_token("kasci_abc").unwrap();
        assert_eq!(again.users[1].user.token, "ci:9:kasci_abc");
        config.fill_token("glpat-x").unwrap();
        assert_eq!(config.users[0].user.token, "pat:7:glpat-x");
        assert!(config.fill_token("again").is_err(), "no placeholder left");
    }

    #[test]
    fn the_endpoint_defaults_to_loopback_at_the_listener_port() {
        let mut endpoint = ProxyEndpoint::default();
        assert!(
            endpoint
                .server_url()
                .unwrap_err()
                .contains("listen.k8s_proxy")
        );
        endpoint.set_listen_addr("0.0.0.0:8154".parse().unwrap());
        assert_eq!(endpoint.server_url().unwrap(), "http://127.0.0.1:8154");
        assert_eq!(endpoint.ca_pem().unwrap(), None);
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("tls.crt");
        std::fs::write(&cert, "PEM").unwrap();
        endpoint.tls_cert_file = Some(cert);
        assert_eq!(endpoint.server_url().unwrap(), "https://127.0.0.1:8154");
        assert_eq!(endpoint.ca_pem().unwrap().as_deref(), Some(&b"PEM"[..]));
        endpoint.ca_file = Some(dir.path().join("missing.pem"));
        assert!(endpoint.ca_pem().unwrap_err().contains("missing.pem"));
        endpoint.url = Some("https://kas.example.com/k8s-proxy/".into());
        assert_eq!(
            endpoint.server_url().unwrap(),
            "https://kas.example.com/k8s-proxy"
        );
    }
}
