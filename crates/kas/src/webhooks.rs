//! Push webhooks from Gitea, GitHub and GitLab: verified (HMAC-SHA256 signature, or GitLab's token), then the
//! pushed repository is re-checked at once, for configuration and manifests alike, instead of at the next poll.

use hmac::{Hmac, Mac};
use http::HeaderMap;
use serde_json::Value;
use sha2::Sha256;

use crate::tokens::constant_time_eq;

/// The Git server that sent a webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forge {
    Gitea,
    GitHub,
    GitLab,
}

impl Forge {
    pub fn from_path(name: &str) -> Option<Self> {
        match name {
            "gitea" => Some(Self::Gitea),
            "github" => Some(Self::GitHub),
            "gitlab" => Some(Self::GitLab),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("webhooks are disabled: kas has no webhooks.secret_file configured")]
    Disabled,
    #[error("missing {0} header: unsigned webhooks are refused")]
    Unsigned(&'static str),
    #[error("the webhook signature does not match")]
    BadSignature,
    #[error("not a push event payload: {0}")]
    BadPayload(String),
}

fn header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a str, WebhookError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .ok_or(WebhookError::Unsigned(name))
}

fn hmac_hex(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Checks the request came from the Git server.
pub fn verify(
    forge: Forge,
    secret: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), WebhookError> {
    let secret = secret.ok_or(WebhookError::Disabled)?;
    let (presented, expected) = match forge {
        Forge::Gitea => (
            header(headers, "x-gitea-signature")?.to_owned(),
            hmac_hex(secret, body),
        ),
        Forge::GitHub => {
            let value = header(headers, "x-hub-signature-256")?;
            (
                value.strip_prefix("sha256=").unwrap_or_default().to_owned(),
                hmac_hex(secret, body),
            )
        }
        Forge::GitLab => (
            header(headers, "x-gitlab-token")?.to_owned(),
            secret.to_owned(),
        ),
    };
    if constant_time_eq(
        presented.to_ascii_lowercase().as_bytes(),
        expected.as_bytes(),
    ) || (forge == Forge::GitLab && constant_time_eq(presented.as_bytes(), expected.as_bytes()))
    {
        Ok(())
    } else {
        Err(WebhookError::BadSignature)
    }
}

/// The pushed project's path (`owner/repo`, `group/sub/project`).
pub fn pushed_project(forge: Forge, body: &[u8]) -> Result<String, WebhookError> {
    let payload: Value =
        serde_json::from_slice(body).map_err(|e| WebhookError::BadPayload(e.to_string()))?;
    let path = match forge {
        Forge::Gitea | Forge::GitHub => &payload["repository"]["full_name"],
        Forge::GitLab => &payload["project"]["path_with_namespace"],
    };
    path.as_str()
        .map(str::to_owned)
        .ok_or_else(|| WebhookError::BadPayload("no repository name in the payload".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, v.parse().unwrap());
        }
        map
    }

    const BODY: &[u8] = br#"{"repository":{"full_name":"acme/manifests"},"project":{"path_with_namespace":"acme/sub/manifests"}}"#;

    #[test]
    fn signatures_of_each_forge_are_checked() {
        let sig = hmac_hex("s3cret", BODY);
        assert_eq!(
            verify(
                Forge::Gitea,
                Some("s3cret"),
                &headers(&[("x-gitea-signature", &sig)]),
                BODY
            ),
            Ok(())
        );
        assert_eq!(
            verify(
                Forge::GitHub,
                Some("s3cret"),
                &headers(&[("x-hub-signature-256", &format!("sha256={sig}"))]),
                BODY
            ),
            Ok(())
        );
        assert_eq!(
            verify(
                Forge::GitLab,
                Some("s3cret"),
                &headers(&[("x-gitlab-token", "s3cret")]),
                BODY
            ),
            Ok(())
        );
    }

    #[test]
    fn forged_unsigned_and_unconfigured_are_refused() {
        let forged = hmac_hex("guess", BODY);
        assert_eq!(
            verify(
                Forge::Gitea,
                Some("s3cret"),
                &headers(&[("x-gitea-signature", &forged)]),
                BODY
            ),
            Err(WebhookError::BadSignature)
        );
        let tampered = hmac_hex("s3cret", b"{}");
        assert_eq!(
            verify(
                Forge::GitHub,
                Some("s3cret"),
                &headers(&[("x-hub-signature-256", &format!("sha256={tampered}"))]),
                BODY
            ),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            verify(
                Forge::GitLab,
                Some("s3cret"),
                &headers(&[("x-gitlab-token", "nope")]),
                BODY
            ),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            verify(Forge::Gitea, Some("s3cret"), &HeaderMap::new(), BODY),
            Err(WebhookError::Unsigned("x-gitea-signature"))
        );
        assert_eq!(
            verify(Forge::Gitea, None, &HeaderMap::new(), BODY),
            Err(WebhookError::Disabled)
        );
    }

    #[test]
    fn the_pushed_project_is_read_from_each_payload() {
        assert_eq!(
            pushed_project(Forge::Gitea, BODY).unwrap(),
            "acme/manifests"
        );
        assert_eq!(
            pushed_project(Forge::GitHub, BODY).unwrap(),
            "acme/manifests"
        );
        assert_eq!(
            pushed_project(Forge::GitLab, BODY).unwrap(),
            "acme/sub/manifests"
        );
        assert!(pushed_project(Forge::Gitea, b"not json").is_err());
    }
}
