//! Who a proxied request is and what it may do: the bearer credential (`ci:<agent-id>:<token>` for a CI
//! token kas issued, `pat:<agent-id>:<token>` for a personal access token of the Git server), checked against
//! the agent's *current* `config.yaml` (`ci_access`, `user_access`) on every request, and the identity
//! agentk impersonates for it.

pub mod access;
pub mod ci;
mod session;

use std::{sync::Arc, time::Instant};

use futures::future::BoxFuture;
use gitops_config::AgentConfig;
use tokio_util::sync::{CancellationToken, DropGuard};

use self::access::{AgentRef, UserGrant};
use super::{
    ProxyError,
    gitea::{GitServerApi, UserCache},
    identity, kubeconfig,
};
use crate::{
    KasState,
    agent_config::{ConfigTracker, first_valid},
    auth::AgentIdentity,
    store::{AgentRecord, ci_tokens::CiTokenRecord, now},
    tokens,
};

/// Which kind of secret a request presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    /// A CI token kas issued (`ci:`).
    CiToken,
    /// A personal access token of the Git server (`pat:`).
    PersonalAccessToken,
}

/// A parsed `Authorization: Bearer <kind>:<agent-id>:<secret>`. Its `Debug` leaves the secret out.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub kind: CredentialKind,
    pub agent_id: u64,
    pub secret: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("kind", &self.kind)
            .field("agent_id", &self.agent_id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Parses the `Authorization` header's value; the messages never repeat the secret.
pub fn parse_authorization(value: Option<&http::HeaderValue>) -> Result<Credential, ProxyError> {
    let value = value.ok_or(ProxyError::MissingCredential)?;
    let value = value
        .to_str()
        .map_err(|_| ProxyError::MalformedCredential("the header is not ASCII".into()))?;
    let bearer = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| ProxyError::MalformedCredential("expected `Bearer …`".into()))?
        .trim();
    let mut parts = bearer.splitn(3, ':');
    let (kind, agent, secret) = match (parts.next(), parts.next(), parts.next()) {
        (Some(kind), Some(agent), Some(secret)) => (kind, agent, secret),
        _ => {
            return Err(ProxyError::MalformedCredential(
                "expected `ci:<agent-id>:<token>` or `pat:<agent-id>:<token>`".into(),
            ));
        }
    };
    let kind = match kind {
        "ci" => CredentialKind::CiToken,
        "pat" => CredentialKind::PersonalAccessToken,
        _ => {
            return Err(ProxyError::MalformedCredential(
                "the credential must start with `ci:` or `pat:`".into(),
            ));
        }
    };
    let agent_id = agent.parse::<u64>().map_err(|_| {
        ProxyError::MalformedCredential(format!("{agent:?} is not an agent id (a number)"))
    })?;
    if secret.is_empty() {
        return Err(ProxyError::MalformedCredential("the token is empty".into()));
    }
    Ok(Credential {
        kind,
        agent_id,
        secret: secret.to_owned(),
    })
}

/// Who made a request, for the audit log and GraphQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A CI job, by the CI token it presented.
    CiJob {
        token_id: u64,
        project: String,
        environment: Option<String>,
    },
    /// A person, by their Git server username.
    User { username: String },
}

/// A request kas may carry: to which agent, on whose behalf, acting as whom.
#[derive(Debug)]
pub struct Authorized {
    pub agent_id: u64,
    pub agent_name: String,
    /// The agent's configuration project (`owner/name`).
    pub config_project: String,
    pub caller: Caller,
    /// `None`: `access_as: agent`, the only mode in which the client's own `Impersonate-*` headers pass.
    pub impersonation: Option<gitops_protocol::Impersonation>,
    /// The `default_namespace` of the `ci_access` entry that allowed the request, for kubeconfigs.
    pub default_namespace: Option<String>,
    /// Cancelled when the credential stops being valid or allowed (CI token revoked or expired: within
    /// 1 s; personal access token revoked or membership lost: within the user cache TTL; `config.yaml` no
    /// longer allowing it: within 1 s of kas reading it). The proxy ends the request then, watches and exec
    /// sessions included.
    pub revoked: CancellationToken,
    /// Stops whatever keeps `revoked` up to date once the request is over.
    pub session: Option<DropGuard>,
}

/// Decides on every request; the proxy server holds one.
pub trait ProxyAuthorizer: Send + Sync + 'static {
    fn authorize<'a>(
        &'a self,
        credential: &'a Credential,
    ) -> BoxFuture<'a, Result<Authorized, ProxyError>>;
}

/// The credentials' shared state in [`super::ProxyState`]: CI token switches, the Git server's API and its
/// answers cache, and what kubeconfigs need to know about the proxy's listener.
#[derive(Debug)]
pub struct CredentialState {
    pub ci_switches: ci::CiSwitches,
    /// `None` when kas was built without a Git server (unit tests): personal access tokens are refused.
    git: Option<GitServerApi>,
    users: UserCache,
    pub(crate) endpoint: kubeconfig::ProxyEndpoint,
}

impl Default for CredentialState {
    fn default() -> Self {
        Self {
            ci_switches: ci::CiSwitches::default(),
            git: None,
            users: UserCache::new(gitops_config::server::MAX_USER_CACHE_TTL),
            endpoint: kubeconfig::ProxyEndpoint::default(),
        }
    }
}

impl CredentialState {
    /// From kas's configuration; `git_ca_pem` is the content of `git.ca_file`.
    pub fn new(config: &gitops_config::ServerConfig, git_ca_pem: Option<Vec<u8>>) -> Self {
        Self {
            ci_switches: ci::CiSwitches::default(),
            git: Some(GitServerApi::new(&config.git.base_url, git_ca_pem)),
            users: UserCache::new(config.k8s_proxy.user_cache_ttl),
            endpoint: kubeconfig::ProxyEndpoint::new(config),
        }
    }

    /// The address the proxy listener really bound (for `listen.k8s_proxy` with port 0), written into
    /// kubeconfigs when `k8s_proxy.url` is not set.
    pub fn set_listen_addr(&self, addr: std::net::SocketAddr) {
        self.endpoint.set_listen_addr(addr);
    }

    /// Ends every open request of CI token `token_id` (call after revoking it in the store).
    pub fn revoke_ci_token(&self, token_id: u64) {
        self.ci_switches.revoke(token_id);
    }
}

/// kas's authoriser: CI tokens from the store, personal access tokens asked of the Git server.
pub fn authorizer(state: Arc<KasState>) -> Arc<dyn ProxyAuthorizer> {
    Arc::new(KasAuthorizer { state })
}

struct KasAuthorizer {
    state: Arc<KasState>,
}

impl ProxyAuthorizer for KasAuthorizer {
    fn authorize<'a>(
        &'a self,
        credential: &'a Credential,
    ) -> BoxFuture<'a, Result<Authorized, ProxyError>> {
        Box::pin(async move {
            match credential.kind {
                CredentialKind::CiToken => authorize_ci_job(&self.state, credential).await,
                CredentialKind::PersonalAccessToken => {
                    authorize_user(&self.state, credential).await
                }
            }
        })
    }
}

fn store_error(e: crate::store::StoreError) -> ProxyError {
    ProxyError::Internal(format!("kas could not read its database: {e}"))
}

/// The agent a credential names; [`ProxyError::UnknownAgent`] when there is none.
pub(crate) fn agent_of(state: &KasState, agent_id: u64) -> Result<AgentRecord, ProxyError> {
    state
        .store
        .agent(agent_id)
        .map_err(store_error)?
        .ok_or(ProxyError::UnknownAgent { agent_id })
}

pub(crate) fn agent_ref(agent: &AgentRecord) -> AgentRef {
    AgentRef {
        id: agent.id,
        name: agent.name.clone(),
        config_project: agent.project_path.clone(),
    }
}

/// The agent's current configuration, and the tracker that keeps it current while held.
pub(crate) async fn current_config(
    state: &KasState,
    agent: &AgentRecord,
) -> Result<(Arc<ConfigTracker>, Arc<AgentConfig>), ProxyError> {
    let identity = AgentIdentity {
        agent_id: agent.id,
        token_id: 0,
        project_path: agent.project_path.clone(),
        agent_name: agent.name.clone(),
    };
    let tracker = state.agent_configs.track(state, &identity);
    let config = first_valid(&mut tracker.subscribe(), &agent.name)
        .await
        .map_err(|status| {
            let message = format!("{}: {}", agent_ref(agent), status.message());
            match status.code() {
                tonic::Code::PermissionDenied => ProxyError::Forbidden(message),
                _ => ProxyError::Unavailable(message),
            }
        })?;
    Ok((tracker, config))
}

/// The CI token's record, if it is usable now.
pub(crate) fn usable_ci_token(state: &KasState, secret: &str) -> Result<CiTokenRecord, ProxyError> {
    if !secret.starts_with(ci::CI_TOKEN_PREFIX) {
        return Err(ProxyError::InvalidToken);
    }
    let token = state
        .store
        .ci_token_by_hash(&tokens::hash(secret))
        .map_err(store_error)?
        .ok_or(ProxyError::InvalidToken)?;
    ci::check_usable(&token, now())?;
    Ok(token)
}

async fn authorize_ci_job(
    state: &Arc<KasState>,
    credential: &Credential,
) -> Result<Authorized, ProxyError> {
    let token = usable_ci_token(state, &credential.secret)?;
    let agent = agent_of(state, credential.agent_id)?;
    let (tracker, config) = current_config(state, &agent).await?;
    let target = agent_ref(&agent);
    let grant = access::decide_ci(
        &config,
        &target,
        &token.project_path,
        token.environment.as_deref(),
    )
    .map_err(ProxyError::Forbidden)?;
    // Taken after the store said the token is active: a revocation in between leaves it cancelled.
    let revoked = state.k8s_proxy.credentials.ci_switches.switch(token.id);
    if revoked.is_cancelled() {
        return Err(ProxyError::RevokedToken {
            revoked_at: ci::rfc3339(now()),
        });
    }
    let session = session::spawn(session::Watch {
        state: state.clone(),
        agent: target.clone(),
        tracker,
        revoked: revoked.clone(),
        kind: session::WatchKind::CiJob {
            token: token.clone(),
            grant: grant.clone(),
        },
    });
    Ok(Authorized {
        agent_id: agent.id,
        agent_name: agent.name,
        config_project: agent.project_path,
        impersonation: identity::for_ci_job(&grant.access_as, &target, &token),
        caller: Caller::CiJob {
            token_id: token.id,
            project: token.project_path,
            environment: token.environment,
        },
        default_namespace: grant.default_namespace,
        revoked,
        session: Some(session),
    })
}

/// The Git server's facts about the token's user, decided against `config`; and when they were fetched.
pub(crate) async fn check_user(
    state: &KasState,
    secret: &str,
    config: &AgentConfig,
    agent: &AgentRef,
) -> Result<(String, UserGrant, Instant), ProxyError> {
    let credentials = &state.k8s_proxy.credentials;
    let api = credentials.git.as_ref().ok_or_else(|| {
        ProxyError::GitServerUnavailable("kas has no Git server API configured".into())
    })?;
    let (projects, groups) = access::user_access_targets(config);
    let (facts, at) = credentials
        .users
        .facts(api, secret, &projects, &groups)
        .await?;
    let grant = access::decide_user(config, agent, &facts).map_err(ProxyError::Forbidden)?;
    Ok((facts.username, grant, at))
}

async fn authorize_user(
    state: &Arc<KasState>,
    credential: &Credential,
) -> Result<Authorized, ProxyError> {
    // A CI token sent as `pat:` is never sent to the Git server.
    if credential.secret.starts_with(ci::CI_TOKEN_PREFIX) {
        return Err(ProxyError::MalformedCredential(
            "a kas CI token (kasci_…) goes after `ci:`, not `pat:`".into(),
        ));
    }
    let agent = agent_of(state, credential.agent_id)?;
    let (tracker, config) = current_config(state, &agent).await?;
    let target = agent_ref(&agent);
    let (username, grant, fetched_at) =
        check_user(state, &credential.secret, &config, &target).await?;
    let revoked = CancellationToken::new();
    let ttl = state.k8s_proxy.credentials.users.ttl();
    let session = session::spawn(session::Watch {
        state: state.clone(),
        agent: target.clone(),
        tracker,
        revoked: revoked.clone(),
        kind: session::WatchKind::User {
            secret: credential.secret.clone(),
            grant: grant.clone(),
            recheck_at: fetched_at + ttl,
        },
    });
    Ok(Authorized {
        agent_id: agent.id,
        agent_name: agent.name,
        config_project: agent.project_path,
        impersonation: identity::for_user(&target, &username, &grant),
        caller: Caller::User { username },
        default_namespace: None,
        revoked,
        session: Some(session),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(value: &str) -> http::HeaderValue {
        http::HeaderValue::from_str(value).unwrap()
    }

    #[test]
    fn bearer_credentials_parse_gitlab_style() {
        let c = parse_authorization(Some(&header("Bearer ci:12:kasci_abc:def"))).unwrap();
        assert_eq!(c.kind, CredentialKind::CiToken);
        assert_eq!(c.agent_id, 12);
        assert_eq!(c.secret, "kasci_abc:def");
        let c = parse_authorization(Some(&header("Bearer pat:3:gitea-token"))).unwrap();
        assert_eq!(c.kind, CredentialKind::PersonalAccessToken);
        assert!(!format!("{c:?}").contains("gitea-token"));
    }

    #[test]
    fn malformed_credentials_are_refused_without_echoing_the_secret() {
        assert_eq!(
            parse_authorization(None),
            Err(ProxyError::MissingCredential)
        );
        for value in [
            "Basic dXNlcjpwYXNz",
            "Bearer s3cret",
            "Bearer ci:x:s3cret",
            "Bearer job:1:s3cret",
            "Bearer ci:1:",
            "Bearer ci:-1:s3cret",
        ] {
            let err = parse_authorization(Some(&header(value))).unwrap_err();
            assert_eq!(err.status_code(), 401, "{value}");
            assert!(!err.to_string().contains("s3cret"), "{value}: {err}");
        }
    }
}
