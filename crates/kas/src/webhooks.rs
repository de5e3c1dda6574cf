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

/// The signature Gitea and GitHub send for `body` (hex HMAC-SHA256), for tools and tests that post webhooks.
pub fn signature_hex(secret: &str, body: &[u8]) -> String {
    hmac_hex(secret, body)
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
    let matches = match forge {
        // Hex digests: their case carries no meaning.
        Forge::Gitea => hmac_matches(header(headers, "x-gitea-signature")?, secret, body),
        Forge::GitHub => {
            let value = header(headers, "x-hub-signature-256")?;
            hmac_matches(
                value.strip_prefix("sha256=").unwrap_or_default(),
                secret,
                body,
            )
        }
        // GitLab sends the secret itself: it must match exactly, case included.
        Forge::GitLab => constant_time_eq(
            header(headers, "x-gitlab-token")?.as_bytes(),
            secret.as_bytes(),
        ),
    };
    if matches {
        Ok(())
    } else {
        Err(WebhookError::BadSignature)
    }
}

/// `Mac::verify_slice` compares in constant time; a signature that is not hex cannot match.
fn hmac_matches(presented_hex: &str, secret: &str, body: &[u8]) -> bool {
    let Ok(presented) = hex::decode(presented_hex) else {
        return false;
    };
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(body);
    mac.verify_slice(&presented).is_ok()
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
    fn hex_case_is_ignored_but_truncated_or_non_hex_signatures_fail() {
        let sig = hmac_hex("s3cret", BODY);
        let gitea = |sig: &str| {
            verify(
                Forge::Gitea,
                Some("s3cret"),
                &headers(&[("x-gitea-signature", sig)]),
                BODY,
            )
        };
        assert_eq!(gitea(&sig.to_ascii_uppercase()), Ok(()));
        assert_eq!(gitea(&sig[..62]), Err(WebhookError::BadSignature));
        assert_eq!(gitea(""), Err(WebhookError::BadSignature));
        let not_hex = format!("zz{}", &sig[2..]);
        assert_eq!(gitea(&not_hex), Err(WebhookError::BadSignature));
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
    fn the_gitlab_token_must_match_exactly_and_hex_case_does_not_matter() {
        for presented in ["S3cret", "S3CRET", "s3cret ", " s3cret", "s3cre"] {
            assert_eq!(
                verify(
                    Forge::GitLab,
                    Some("s3cret"),
                    &headers(&[("x-gitlab-token", presented)]),
                    BODY
                ),
                Err(WebhookError::BadSignature),
                "{presented:?}"
            );
        }
        let upper = hmac_hex("s3cret", BODY).to_ascii_uppercase();
        assert_eq!(
            verify(
                Forge::Gitea,
                Some("s3cret"),
                &headers(&[("x-gitea-signature", &upper)]),
                BODY
            ),
            Ok(())
        );
    }

    #[test]
    fn payloads_without_a_name_or_with_bad_values_are_errors_not_panics() {
        for body in [
            &b"not json"[..],
            b"",
            b"[]",
            b"null",
            b"{\"repository\":{\"full_name\":12345678901234567890123456789}}",
            b"{\"repository\":{\"full_name\":null}}",
            b"{\"repository\":[1,2,3]}",
            b"{\"repository\":{\"full_name\":\"\xff\xfe\"}}",
            b"{\"repository\":{\"full_name\":\"\\ud800\"}}",
        ] {
            for forge in [Forge::Gitea, Forge::GitHub, Forge::GitLab] {
                assert!(
                    matches!(
                        pushed_project(forge, body),
                        Err(WebhookError::BadPayload(_))
                    ),
                    "{forge:?} {:?}",
                    String::from_utf8_lossy(body)
                );
            }
        }
        // Deep nesting is refused by serde_json's recursion limit, not a stack overflow.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(pushed_project(Forge::Gitea, deep.as_bytes()).is_err());
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
