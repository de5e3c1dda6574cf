//! CI tokens on the proxy's side: their secrets, the checks on the stored record, and the switch per token
//! that ends its open requests the moment it is revoked.

use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
};

use base64::Engine;
use rand::RngCore;
use tokio_util::sync::CancellationToken;

use super::super::ProxyError;
use crate::store::ci_tokens::CiTokenRecord;

/// Every CI token starts with this, so clients (and `kas kubeconfig`) tell it from a Git server token.
pub const CI_TOKEN_PREFIX: &str = "kasci_";

/// A new CI token: 32 random bytes behind the prefix.
pub fn generate_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!(
        "{CI_TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// RFC 3339 for unix seconds, for messages.
pub fn rfc3339(unix: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Whether `token` may be used at `now` (unix seconds): revoked and expired tokens are refused, saying
/// since when.
pub fn check_usable(token: &CiTokenRecord, now: i64) -> Result<(), ProxyError> {
    if let Some(at) = token.revoked_at {
        return Err(ProxyError::RevokedToken {
            revoked_at: rfc3339(at),
        });
    }
    if now >= token.expires_at {
        return Err(ProxyError::ExpiredToken {
            expired_at: rfc3339(token.expires_at),
        });
    }
    Ok(())
}

/// One parent cancellation token per CI token id; every request made with it runs under a child.
#[derive(Debug, Default)]
pub struct CiSwitches {
    inner: Mutex<Switches>,
}

#[derive(Debug, Default)]
struct Switches {
    live: HashMap<u64, CancellationToken>,
    /// Ids revoked while kas runs (ids are never reused): a request that read the token just before the
    /// revocation asks for its switch just after it, and must get one already cancelled.
    revoked: HashSet<u64>,
}

impl CiSwitches {
    /// A token cancelled when `token_id` is revoked; already cancelled if it was.
    pub fn switch(&self, token_id: u64) -> CancellationToken {
        let mut switches = self.inner.lock().expect("CI switch lock");
        if switches.revoked.contains(&token_id) {
            let cancelled = CancellationToken::new();
            cancelled.cancel();
            return cancelled;
        }
        switches.live.entry(token_id).or_default().child_token()
    }

    /// Ends every request made with `token_id`, and every one that asks for its switch later.
    pub fn revoke(&self, token_id: u64) {
        let mut switches = self.inner.lock().expect("CI switch lock");
        switches.revoked.insert(token_id);
        if let Some(parent) = switches.live.remove(&token_id) {
            parent.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(expires_at: i64, revoked_at: Option<i64>) -> CiTokenRecord {
        CiTokenRecord {
            id: 1,
            project_path: "g/p".into(),
            environment: None,
            description: None,
            created_at: 0,
            expires_at,
            revoked_at,
            token_hash: String::new(),
        }
    }

    #[test]
    fn secrets_are_random_prefixed_and_long() {
        let (a, b) = (generate_secret(), generate_secret());
        assert_ne!(a, b);
        assert!(a.starts_with(CI_TOKEN_PREFIX));
        assert_eq!(a.len(), CI_TOKEN_PREFIX.len() + 43);
    }

    #[test]
    fn revoked_and_expired_tokens_say_since_when() {
        assert_eq!(check_usable(&token(100, None), 99), Ok(()));
        assert_eq!(
            check_usable(&token(100, None), 100),
            Err(ProxyError::ExpiredToken {
                expired_at: "1970-01-01T00:01:40Z".into()
            })
        );
        let err = check_usable(&token(100, Some(50)), 10).unwrap_err();
        assert_eq!(err.status_code(), 401);
        assert_eq!(
            err.to_string(),
            "the token was revoked at 1970-01-01T00:00:50Z"
        );
    }

    #[test]
    fn revoking_cancels_that_tokens_switches_now_and_later() {
        let switches = CiSwitches::default();
        let (one, two) = (switches.switch(1), switches.switch(2));
        switches.revoke(1);
        assert!(one.is_cancelled());
        assert!(!two.is_cancelled());
        assert!(
            switches.switch(1).is_cancelled(),
            "a request that read the token before the revocation ends too"
        );
        assert!(!switches.switch(2).is_cancelled());
    }
}
