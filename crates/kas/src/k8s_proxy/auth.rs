//! Who a proxied request is and what it may do: the bearer credential (`ci:<agent-id>:<token>` for a CI
//! token kas issued, `pat:<agent-id>:<token>` for a personal access token of the Git server), checked against
//! the agent's *current* `config.yaml` (`ci_access`, `user_access`) on every request, and the identity
//! agentk impersonates for it.

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::ProxyError;
use crate::KasState;

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

/// The credentials' shared state in [`super::ProxyState`] (CI token switches, the Git server's answers
/// cache, …).
#[derive(Debug, Default)]
pub struct CredentialState {}

/// kas's authoriser: CI tokens from the store, personal access tokens asked of the Git server.
pub fn authorizer(state: Arc<KasState>) -> Arc<dyn ProxyAuthorizer> {
    Arc::new(KasAuthorizer { _state: state })
}

struct KasAuthorizer {
    _state: Arc<KasState>,
}

impl ProxyAuthorizer for KasAuthorizer {
    fn authorize<'a>(
        &'a self,
        _credential: &'a Credential,
    ) -> BoxFuture<'a, Result<Authorized, ProxyError>> {
        // Replaced by the CI token and Git server checks; until then nothing is allowed.
        Box::pin(async { Err(ProxyError::InvalidToken) })
    }
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
