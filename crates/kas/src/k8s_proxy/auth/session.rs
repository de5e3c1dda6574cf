//! What keeps an open request's `revoked` up to date while it runs (watches, exec sessions): the CI
//! token's expiry, the Git server's answer about a personal access token (asked again when the cached one
//! is older than the TTL), and the agent's `config.yaml`. When any of them no longer allows what the
//! request was allowed with, `revoked` is cancelled and the proxy ends the request. (CI token revocation
//! cancels it directly, through the token's switch.)

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::info;

use super::{
    access::{self, AgentRef, CiGrant, UserGrant},
    check_user,
};
use crate::{
    KasState,
    agent_config::ConfigTracker,
    store::{ci_tokens::CiTokenRecord, now},
};

pub(super) struct Watch {
    pub state: Arc<KasState>,
    pub agent: AgentRef,
    /// Held so the agent's configuration keeps being read while the request is open.
    pub tracker: Arc<ConfigTracker>,
    pub revoked: CancellationToken,
    pub kind: WatchKind,
}

pub(super) enum WatchKind {
    CiJob {
        token: CiTokenRecord,
        grant: CiGrant,
    },
    User {
        /// The personal access token, to ask the Git server again; never logged.
        secret: String,
        grant: UserGrant,
        /// When the Git server's answer stops being fresh.
        recheck_at: std::time::Instant,
    },
}

/// Starts watching; dropping the guard (the request ended) stops it.
pub(super) fn spawn(watch: Watch) -> DropGuard {
    let stop = CancellationToken::new();
    tokio::spawn(run(watch, stop.clone()));
    stop.drop_guard()
}

fn deadline(kind: &WatchKind) -> Instant {
    match kind {
        WatchKind::CiJob { token, .. } => {
            Instant::now() + Duration::from_secs((token.expires_at - now()).max(0) as u64)
        }
        WatchKind::User { recheck_at, .. } => Instant::from_std(*recheck_at),
    }
}

async fn run(mut watch: Watch, stop: CancellationToken) {
    let mut config = watch.tracker.subscribe();
    config.borrow_and_update();
    let mut config_open = true;
    loop {
        let at = deadline(&watch.kind);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = watch.revoked.cancelled() => return,
            changed = config.changed(), if config_open => {
                if changed.is_err() {
                    config_open = false;
                    continue;
                }
                if let Err(reason) = recheck(&mut watch, false).await {
                    return end(&watch, &reason);
                }
            }
            _ = tokio::time::sleep_until(at) => {
                if let Err(reason) = recheck(&mut watch, true).await {
                    return end(&watch, &reason);
                }
            }
        }
    }
}

fn end(watch: &Watch, reason: &str) {
    match &watch.kind {
        WatchKind::CiJob { token, .. } => info!(
            agent_id = watch.agent.id,
            token_id = token.id,
            project_id = %token.project_path,
            reason,
            "ending a proxied request: its CI token no longer allows it"
        ),
        WatchKind::User { .. } => info!(
            agent_id = watch.agent.id,
            reason, "ending a proxied request: its user no longer has access"
        ),
    }
    watch.revoked.cancel();
}

/// Whether the request is still allowed as it was; `deadline_passed`: the expiry or the TTL came.
async fn recheck(watch: &mut Watch, deadline_passed: bool) -> Result<(), String> {
    let valid = watch.tracker.subscribe().borrow().valid.clone();
    let agent = &watch.agent;
    match &mut watch.kind {
        WatchKind::CiJob { token, grant } => {
            if deadline_passed || now() >= token.expires_at {
                return Err(format!(
                    "the CI token expired at {}",
                    super::ci::rfc3339(token.expires_at)
                ));
            }
            let Some(config) = valid else {
                return Ok(());
            };
            let now_granted = access::decide_ci(
                &config,
                agent,
                &token.project_path,
                token.environment.as_deref(),
            )?;
            if now_granted.access_as != grant.access_as
                || now_granted.default_namespace != grant.default_namespace
            {
                return Err(format!(
                    "{agent}'s config.yaml now gives the project another identity"
                ));
            }
            Ok(())
        }
        WatchKind::User {
            secret,
            grant,
            recheck_at,
        } => {
            let Some(config) = valid else {
                return Ok(());
            };
            let (_, now_granted, fetched_at) = check_user(&watch.state, secret, &config, agent)
                .await
                .map_err(|e| e.to_string())?;
            if now_granted != *grant {
                return Err(format!(
                    "the user's access through {agent} changed (their roles or its config.yaml)"
                ));
            }
            // Never sooner than a moment from now, should the cache hand back the same answer.
            let soonest = std::time::Instant::now() + Duration::from_millis(100);
            *recheck_at = (fetched_at + watch.state.k8s_proxy.credentials.users.ttl()).max(soonest);
            Ok(())
        }
    }
}
