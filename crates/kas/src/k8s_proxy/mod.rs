//! The Kubernetes API proxy: CI jobs and people reach a cluster's apiserver through kas, over the connection
//! its agentk opened (the CI/CD tunnel and user access of GitLab's agent).
//!
//! ```text
//! kubectl ──HTTPS, Bearer ci:<agent>:<token> | pat:<agent>:<token>──► kas listen.k8s_proxy  (server)
//!   authenticate + authorise against the agent's current config.yaml                     (auth)
//!   ──KubernetesApi.MakeRequest over a reverse tunnel──► agentk ──► apiserver, impersonating (agentk)
//! ```
//!
//! [`auth`] decides who a request is and what it may do; [`server`] carries it, streaming both ways and
//! passing connection upgrades (exec, attach, port-forward) through; every request leaves an audit record.

pub mod auth;
pub mod error;
pub mod gitea;
pub mod identity;
pub mod kubeconfig;
pub mod server;

pub use error::ProxyError;

/// What the proxy's parts share, one field per part (each owned by its module).
#[derive(Debug, Default)]
pub struct ProxyState {
    pub config: gitops_config::server::K8sProxyConfig,
    pub credentials: auth::CredentialState,
    pub sessions: server::SessionState,
}
