//! `config.kubernetes.io/depends-on` as cli-utils means it: an object is applied only once each object it
//! names is ready (kstatus Current), not merely applied. A target outside the set must already exist in the
//! cluster. Waiting is bounded by [`crate::ApplyOptions::dependency_timeout`]; a dependent whose target
//! never gets ready is skipped with the target's status as the reason.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use kube::Client;
use kube::discovery::ApiResource;

use crate::key::ObjectKey;
use crate::live::read_live;
use crate::result::Health;

/// How often targets are read again while waiting.
const POLL: Duration = Duration::from_millis(500);

/// One object some dependent waits for.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// Where to read it; `None` when the cluster does not serve its kind.
    pub resource: Option<ApiResource>,
    /// Outside the set: it must exist already (nobody is going to create it in this sync).
    pub external: bool,
}

/// Waits until every target is ready, or fails, or `timeout` passes. Returns, per target, `Ok` when it is
/// ready and otherwise the reason a dependent is skipped. With `existence_only` (dry runs, where nothing
/// was applied to get ready) an existing target is enough.
pub(crate) async fn await_ready(
    client: &Client,
    targets: BTreeMap<ObjectKey, Target>,
    timeout: Duration,
    existence_only: bool,
) -> HashMap<ObjectKey, Result<(), String>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut verdicts = HashMap::new();
    let mut pending: Vec<(ObjectKey, ApiResource, bool)> = Vec::new();
    for (key, target) in targets {
        match target.resource {
            Some(resource) => pending.push((key, resource, target.external)),
            None => {
                let reason = format!("depends on {key}, whose kind the cluster does not serve");
                verdicts.insert(key, Err(reason));
            }
        }
    }
    // The last thing seen of each pending target, for the reason if time runs out.
    let mut last_seen: HashMap<ObjectKey, String> = HashMap::new();
    while !pending.is_empty() {
        let wanted: Vec<(&ApiResource, &ObjectKey)> = pending
            .iter()
            .map(|(key, resource, _)| (resource, key))
            .collect();
        let live = read_live(client, &wanted).await;
        let mut still = Vec::new();
        for ((key, resource, external), live) in pending.into_iter().zip(live) {
            let verdict = match live {
                Ok(Some(_)) if existence_only => Some(Ok(())),
                Ok(Some(object)) => match Health::of(&object) {
                    Some(health) if health.status == gitops_kstatus::Status::Current => {
                        Some(Ok(()))
                    }
                    Some(health) if health.status == gitops_kstatus::Status::Failed => {
                        Some(Err(format!(
                            "depends on {key} which is not ready (Failed: {})",
                            health.message
                        )))
                    }
                    Some(health) => {
                        last_seen.insert(
                            key.clone(),
                            format!("{}: {}", health.status, health.message),
                        );
                        None
                    }
                    None => None,
                },
                Ok(None) if external => Some(Err(format!(
                    "depends on {key}, which is neither in this set nor in the cluster"
                ))),
                Ok(None) => {
                    last_seen.insert(key.clone(), "NotFound".into());
                    None
                }
                Err(message) => {
                    last_seen.insert(key.clone(), message);
                    None
                }
            };
            match verdict {
                Some(verdict) => {
                    verdicts.insert(key, verdict);
                }
                None => still.push((key, resource, external)),
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            for (key, _, _) in pending {
                let seen = last_seen.remove(&key).unwrap_or_default();
                let reason = format!(
                    "depends on {key} which did not become ready within {} ({seen})",
                    humanize(timeout)
                );
                verdicts.insert(key, Err(reason));
            }
            break;
        }
        tokio::time::sleep(POLL.min(deadline - tokio::time::Instant::now())).await;
    }
    verdicts
}

fn humanize(duration: Duration) -> String {
    let secs = duration.as_secs();
    if secs >= 60 && secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{}s", duration.as_secs_f64())
    }
}
