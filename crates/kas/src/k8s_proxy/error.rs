//! Why the proxy refused or failed a request, rendered as a Kubernetes `Status` object with the right code,
//! so `kubectl` prints a sentence instead of a parse error.

use http::StatusCode;

/// A refusal or failure of one proxied request. Messages name the agent, the project or the limit involved
/// and never contain a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "no credential: send `Authorization: Bearer ci:<agent-id>:<token>` or `Bearer pat:<agent-id>:<token>`"
    )]
    MissingCredential,
    #[error("malformed credential: {0}")]
    MalformedCredential(String),
    #[error("the token is not valid")]
    InvalidToken,
    #[error("the token expired at {expired_at}")]
    ExpiredToken { expired_at: String },
    #[error("the token was revoked at {revoked_at}")]
    RevokedToken { revoked_at: String },
    #[error("agent {agent_id} does not exist")]
    UnknownAgent { agent_id: u64 },
    /// Authenticated, but the agent's current `config.yaml` (or the Git server) does not allow it.
    #[error("{0}")]
    Forbidden(String),
    /// The request itself is refused, e.g. a client's `Impersonate-*` header outside `access_as: agent`.
    #[error("{0}")]
    BadRequest(String),
    /// Only Kubernetes API paths are served.
    #[error("{path} is not a Kubernetes API path")]
    NotApiPath { path: String },
    #[error("agent {agent_name:?} (id {agent_id}) is not connected to kas{}", last_seen_suffix(.last_seen))]
    AgentNotConnected {
        agent_id: u64,
        agent_name: String,
        /// RFC 3339, when kas last had a connection from it.
        last_seen: Option<String>,
    },
    /// The Git server could not be asked about a personal access token.
    #[error("the Git server could not check the token: {0}")]
    GitServerUnavailable(String),
    #[error("{0}")]
    TooManyRequests(String),
    #[error("{0}")]
    Timeout(String),
    /// kas cannot decide now (e.g. it has not read the agent's `config.yaml` yet); worth retrying.
    #[error("{0}")]
    Unavailable(String),
    /// kas itself failed (its database).
    #[error("{0}")]
    Internal(String),
    /// The call down the agent's connection failed.
    #[error("agent {agent_id}: {message}")]
    Agent { agent_id: u64, message: String },
}

fn last_seen_suffix(last_seen: &Option<String>) -> String {
    match last_seen {
        Some(at) => format!("; last seen {at}"),
        None => "; it has never connected".to_owned(),
    }
}

impl ProxyError {
    pub fn status_code(&self) -> StatusCode {
        match self {
            Self::MissingCredential
            | Self::MalformedCredential(_)
            | Self::InvalidToken
            | Self::ExpiredToken { .. }
            | Self::RevokedToken { .. } => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::UnknownAgent { .. } | Self::NotApiPath { .. } => StatusCode::NOT_FOUND,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::AgentNotConnected { .. }
            | Self::GitServerUnavailable(_)
            | Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Agent { .. } => StatusCode::BAD_GATEWAY,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Kubernetes' `StatusReason` for the code.
    pub fn reason(&self) -> &'static str {
        match self.status_code() {
            StatusCode::UNAUTHORIZED => "Unauthorized",
            StatusCode::FORBIDDEN => "Forbidden",
            StatusCode::NOT_FOUND => "NotFound",
            StatusCode::BAD_REQUEST => "BadRequest",
            StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailable",
            StatusCode::TOO_MANY_REQUESTS => "TooManyRequests",
            StatusCode::GATEWAY_TIMEOUT => "Timeout",
            _ => "InternalError",
        }
    }

    /// The `Status` object's JSON (`kind: Status`, `status: Failure`, message, reason, code).
    pub fn to_status_json(&self) -> String {
        serde_json::json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": format!("kas: {self}"),
            "reason": self.reason(),
            "code": self.status_code().as_u16(),
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_kubernetes_status_objects_with_their_code() {
        let err = ProxyError::AgentNotConnected {
            agent_id: 7,
            agent_name: "prod".into(),
            last_seen: Some("2026-12-01T10:00:00Z".into()),
        };
        let status: serde_json::Value = serde_json::from_str(&err.to_status_json()).unwrap();
        assert_eq!(status["kind"], "Status");
        assert_eq!(status["status"], "Failure");
        assert_eq!(status["code"], 503);
        assert_eq!(status["reason"], "ServiceUnavailable");
        assert_eq!(
            status["message"],
            "kas: agent \"prod\" (id 7) is not connected to kas; last seen 2026-12-01T10:00:00Z"
        );
        assert_eq!(
            ProxyError::RevokedToken {
                revoked_at: "x".into()
            }
            .status_code(),
            401
        );
        assert_eq!(ProxyError::Forbidden("no".into()).reason(), "Forbidden");
        assert_eq!(ProxyError::Timeout("slow".into()).status_code(), 504);
    }
}
