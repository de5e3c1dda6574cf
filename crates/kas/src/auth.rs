//! Who is calling: agent tokens on the agent port, the admin credential on the API port.

use std::sync::Arc;

use gitops_tunnel::{
    reverse::{TunnelAuthority, TunnelRegistry},
    server::{AuthError, Authenticator},
};
use tokio_util::sync::CancellationToken;

use crate::{connections::Connections, store::Store, tokens};

/// The agent behind a call, put into the request's extensions by the agent listener.
#[derive(Debug, Clone)]
pub struct AgentIdentity {
    pub agent_id: u64,
    pub token_id: u64,
    pub project_path: String,
    pub agent_name: String,
}

/// Looks agent tokens up by hash.
#[derive(Clone, Debug)]
pub struct TokenAuthenticator {
    pub store: Store,
}

impl Authenticator for TokenAuthenticator {
    type Identity = AgentIdentity;

    async fn authenticate(&self, token: &str) -> Result<AgentIdentity, AuthError> {
        if !token.starts_with(tokens::TOKEN_PREFIX) {
            return Err(AuthError::Invalid);
        }
        match self.store.active_token(&tokens::hash(token)) {
            Ok(Some((token, agent))) => Ok(AgentIdentity {
                agent_id: agent.id,
                token_id: token.id,
                project_path: agent.project_path,
                agent_name: agent.name,
            }),
            Ok(None) => Err(AuthError::Invalid),
            Err(e) => Err(AuthError::Unavailable(e.to_string())),
        }
    }
}

/// Admits reverse tunnels for authenticated agents, up to the per-agent cap, and ties them to their token's
/// revocation switch.
#[derive(Debug)]
pub struct AgentTunnelAuthority {
    pub connections: Arc<Connections>,
    pub tunnels: Arc<TunnelRegistry<u64>>,
}

impl TunnelAuthority<u64> for AgentTunnelAuthority {
    fn admit(
        &self,
        extensions: &http::Extensions,
    ) -> Result<(u64, CancellationToken), tonic::Status> {
        let identity = extensions
            .get::<AgentIdentity>()
            .ok_or_else(|| tonic::Status::unauthenticated("no agent identity"))?;
        let switch = self.connections.token_switch(identity.token_id);
        if switch.is_cancelled() {
            return Err(tonic::Status::unauthenticated("agent token revoked"));
        }
        self.connections
            .admit_tunnel(identity.agent_id, self.tunnels.count(&identity.agent_id))
            .map_err(|e| tonic::Status::resource_exhausted(e.to_string()))?;
        Ok((identity.agent_id, switch))
    }
}

/// Whether `presented` (an `Authorization` header value) carries the configured admin credential.
pub fn is_admin(configured: Option<&str>, presented: Option<&str>) -> bool {
    let (Some(configured), Some(presented)) = (configured, presented) else {
        return false;
    };
    let Some(presented) = presented.strip_prefix("Bearer ") else {
        return false;
    };
    tokens::constant_time_eq(configured.as_bytes(), presented.trim().as_bytes())
}

/// What a caller of the API port may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The admin token: queries and mutations.
    Admin,
    /// The viewer token: queries and the dashboard's event stream only.
    Viewer,
}

/// The role `presented` (an `Authorization` header value) carries, if any. Both comparisons always run, so
/// the time taken does not tell which secret a guess was near.
pub fn role(admin: Option<&str>, viewer: Option<&str>, presented: Option<&str>) -> Option<Role> {
    let admin = is_admin(admin, presented);
    let viewer = is_admin(viewer, presented);
    if admin {
        Some(Role::Admin)
    } else if viewer {
        Some(Role::Viewer)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_viewer_token_is_a_viewer_and_only_the_admin_token_an_admin() {
        let role = |presented| role(Some("adm"), Some("view"), presented);
        assert_eq!(role(Some("Bearer adm")), Some(Role::Admin));
        assert_eq!(role(Some("Bearer view")), Some(Role::Viewer));
        assert_eq!(role(Some("Bearer other")), None);
        assert_eq!(role(None), None);
        assert_eq!(
            super::role(Some("adm"), None, Some("Bearer view")),
            None,
            "no viewer token configured"
        );
    }

    #[test]
    fn admin_requires_a_configured_and_matching_bearer() {
        assert!(is_admin(Some("s3cret"), Some("Bearer s3cret")));
        assert!(!is_admin(Some("s3cret"), Some("Bearer wrong")));
        assert!(!is_admin(Some("s3cret"), Some("s3cret")));
        assert!(!is_admin(Some("s3cret"), None));
        assert!(
            !is_admin(None, Some("Bearer anything")),
            "no admin credential configured: refuse all"
        );
    }

    #[tokio::test]
    async fn tokens_authenticate_until_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let agent = store.create_agent("g/p", "gitops").unwrap();
        let secret = tokens::generate();
        let record = store
            .create_token(agent.id, "t", "", &tokens::hash(&secret), 2)
            .unwrap();
        let auth = TokenAuthenticator {
            store: store.clone(),
        };
        let identity = auth.authenticate(&secret).await.unwrap();
        assert_eq!(
            (identity.agent_id, identity.token_id),
            (agent.id, record.id)
        );
        assert_eq!(
            auth.authenticate("kasagent_nope").await.unwrap_err(),
            AuthError::Invalid
        );
        assert_eq!(
            auth.authenticate("Bearer-garbage").await.unwrap_err(),
            AuthError::Invalid
        );
        store.revoke_token(record.id).unwrap();
        assert_eq!(
            auth.authenticate(&secret).await.unwrap_err(),
            AuthError::Invalid
        );
    }
}
