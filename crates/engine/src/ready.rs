//! `config.kubernetes.io/depends-on` as cli-utils means it: an object is applied only once each object it
//! names is ready (kstatus Current), not merely applied. A target outside the set must already exist in the
//! cluster. Waiting is bounded by [`crate::ApplyOptions::dependency_timeout`]; a dependent whose target
//! never gets ready is skipped with the target's status as the reason.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use kube::Client;
use kube::discovery::ApiResource;

use crate::key::ObjectKey;
use crate::live::{Observed, poll_live};

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
    let wanted: Vec<(&ApiResource, &ObjectKey)> = pending
        .iter()
        .map(|(key, resource, _)| (resource, key))
        .collect();
    let seen = poll_live(client, &wanted, POLL, deadline, |i, observed| {
        match observed {
            Observed::Present(_) if existence_only => true,
            Observed::Present(health) => health.is_settled(),
            // Nobody is going to create a target outside the set.
            Observed::NotFound => pending[i].2,
            Observed::Unreadable(_) => false,
        }
    })
    .await;
    for ((key, _, external), observed) in pending.iter().zip(seen) {
        let verdict = match observed {
            Observed::Present(_) if existence_only => Ok(()),
            Observed::Present(health) if health.status == gitops_kstatus::Status::Current => Ok(()),
            Observed::Present(health) if health.status == gitops_kstatus::Status::Failed => {
                Err(format!(
                    "depends on {key} which is not ready (Failed: {})",
                    health.message
                ))
            }
            Observed::NotFound if *external => Err(format!(
                "depends on {key}, which is neither in this set nor in the cluster"
            )),
            last => {
                let seen = match last {
                    Observed::Present(health) => format!("{}: {}", health.status, health.message),
                    Observed::NotFound => "NotFound".into(),
                    Observed::Unreadable(message) => message,
                };
                Err(format!(
                    "depends on {key} which did not become ready within {} ({seen})",
                    humanize(timeout)
                ))
            }
        };
        verdicts.insert(key.clone(), verdict);
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
