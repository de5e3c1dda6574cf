//! Watches the three policy kinds and keeps the annotated ones, as a [`PolicySet`] every matcher reads.

use std::{collections::BTreeMap, sync::Arc};

use futures::StreamExt;
use gitops_protocol::NetworkPolicyKind;
use kube::{
    Api,
    api::{ApiResource, DynamicObject},
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{
    matcher::PolicySet,
    policy::{self, WatchedPolicy},
    status::{PolicyCounts, StatusBoard},
};

fn resource(kind: NetworkPolicyKind) -> ApiResource {
    let (group, version, kind_name, plural) = match kind {
        NetworkPolicyKind::NetworkPolicy => (
            "networking.k8s.io",
            "v1",
            "NetworkPolicy",
            "networkpolicies",
        ),
        NetworkPolicyKind::CiliumNetworkPolicy => (
            "cilium.io",
            "v2",
            "CiliumNetworkPolicy",
            "ciliumnetworkpolicies",
        ),
        _ => (
            "cilium.io",
            "v2",
            "CiliumClusterwideNetworkPolicy",
            "ciliumclusterwidenetworkpolicies",
        ),
    };
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: format!("{group}/{version}"),
        kind: kind_name.into(),
        plural: plural.into(),
    }
}

const KINDS: [NetworkPolicyKind; 3] = [
    NetworkPolicyKind::NetworkPolicy,
    NetworkPolicyKind::CiliumNetworkPolicy,
    NetworkPolicyKind::CiliumClusterwideNetworkPolicy,
];

/// One kind's annotated policies by (namespace, name), and whether its API exists.
#[derive(Default)]
struct KindState {
    policies: BTreeMap<(String, String), WatchedPolicy>,
    absent: bool,
    /// The last watch error other than a missing API, until the watch works again.
    error: Option<String>,
}

/// Runs until `stop`, publishing the annotated policies to `out` after every change.
pub async fn run(
    client: kube::Client,
    out: watch::Sender<Arc<PolicySet>>,
    status: Arc<StatusBoard>,
    stop: CancellationToken,
) {
    let (changes_tx, mut changes) = tokio::sync::mpsc::channel(64);
    for kind in KINDS {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource(kind));
        let changes = changes_tx.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut events = watcher(api, watcher::Config::default())
                .default_backoff()
                .boxed();
            loop {
                let event = tokio::select! {
                    () = stop.cancelled() => return,
                    event = events.next() => event,
                };
                let Some(event) = event else { return };
                if changes.send((kind, event)).await.is_err() {
                    return;
                }
            }
        });
    }
    drop(changes_tx);
    let mut kinds: BTreeMap<i32, KindState> = BTreeMap::new();
    let mut initial: BTreeMap<i32, BTreeMap<(String, String), WatchedPolicy>> = BTreeMap::new();
    while let Some((kind, event)) = changes.recv().await {
        let state = kinds.entry(kind as i32).or_default();
        let mut changed = true;
        if event.is_ok() && state.error.take().is_some() {
            tracing::info!(kind = kind.as_str_name(), "watching policies again");
        }
        match event {
            Ok(watcher::Event::Apply(object)) => {
                state.absent = false;
                upsert(&mut state.policies, kind, &object);
            }
            Ok(watcher::Event::Delete(object)) => {
                state.policies.remove(&key(&object));
            }
            Ok(watcher::Event::Init) => {
                initial.insert(kind as i32, BTreeMap::new());
                changed = false;
            }
            Ok(watcher::Event::InitApply(object)) => {
                upsert(initial.entry(kind as i32).or_default(), kind, &object);
                changed = false;
            }
            Ok(watcher::Event::InitDone) => {
                state.absent = false;
                state.policies = initial.remove(&(kind as i32)).unwrap_or_default();
            }
            Err(e) => {
                changed = note_error(kind, state, &e);
            }
        }
        if changed {
            publish(&kinds, &out, &status);
        }
    }
}

/// A 404 on the first list means the kind's API is not installed (Cilium's CRDs absent): matched without
/// it, and picked up when it appears (the watcher retries with backoff). Returns whether anything changed.
fn note_error(kind: NetworkPolicyKind, state: &mut KindState, e: &watcher::Error) -> bool {
    let status = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s)) => Some(s.code),
        _ => None,
    };
    if status == Some(404) {
        let was = std::mem::replace(&mut state.absent, true);
        let cleared = !state.policies.is_empty();
        state.policies.clear();
        if !was {
            tracing::info!(
                kind = kind.as_str_name(),
                "policy API not installed: not watched until it is"
            );
        }
        return !was || cleared;
    }
    let message = if status == Some(403) {
        format!(
            "{}: no permission to watch them: grant get, list and watch (ClusterRole gitlab-agent-alert-reader): {e}",
            resource(kind).plural
        )
    } else {
        format!("{}: {e}", resource(kind).plural)
    };
    if state.error.as_ref() == Some(&message) {
        return false;
    }
    tracing::warn!(kind = kind.as_str_name(), error = %message, "watching policies");
    state.error = Some(message);
    true
}

fn key(object: &DynamicObject) -> (String, String) {
    (
        object.metadata.namespace.clone().unwrap_or_default(),
        object.metadata.name.clone().unwrap_or_default(),
    )
}

/// Keeps `object` if it is annotated and readable; an annotation removed drops it.
fn upsert(
    policies: &mut BTreeMap<(String, String), WatchedPolicy>,
    kind: NetworkPolicyKind,
    object: &DynamicObject,
) {
    let key = key(object);
    let json = match serde_json::to_value(object) {
        Ok(json) => json,
        Err(_) => return,
    };
    if !policy::is_annotated(&json) {
        policies.remove(&key);
        return;
    }
    match policy::parse(kind, &json) {
        Ok(p) => {
            policies.insert(key, p);
        }
        Err(e) => {
            tracing::warn!(
                kind = kind.as_str_name(),
                namespace = %key.0,
                name = %key.1,
                error = %e,
                "annotated policy cannot be matched: left out"
            );
            policies.remove(&key);
        }
    }
}

fn publish(
    kinds: &BTreeMap<i32, KindState>,
    out: &watch::Sender<Arc<PolicySet>>,
    status: &StatusBoard,
) {
    let count = |kind: NetworkPolicyKind| {
        kinds
            .get(&(kind as i32))
            .map_or(0, |k| k.policies.len() as u32)
    };
    let absent = |kind: NetworkPolicyKind| kinds.get(&(kind as i32)).is_some_and(|k| k.absent);
    let watch_error = kinds
        .values()
        .filter_map(|k| k.error.clone())
        .collect::<Vec<_>>()
        .join("; ");
    status.set_policies(PolicyCounts {
        network_policies: count(NetworkPolicyKind::NetworkPolicy),
        cilium_network_policies: count(NetworkPolicyKind::CiliumNetworkPolicy),
        cilium_clusterwide_network_policies: count(
            NetworkPolicyKind::CiliumClusterwideNetworkPolicy,
        ),
        cilium_crds_absent: absent(NetworkPolicyKind::CiliumNetworkPolicy)
            || absent(NetworkPolicyKind::CiliumClusterwideNetworkPolicy),
        watch_error,
    });
    let policies = kinds
        .values()
        .flat_map(|k| k.policies.values().cloned())
        .collect();
    out.send_replace(Arc::new(PolicySet { policies }));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> watcher::Error {
        watcher::Error::InitialListFailed(kube::Error::Api(Box::new(kube::core::Status {
            code,
            message: format!("code {code}"),
            ..Default::default()
        })))
    }

    #[test]
    fn a_missing_api_is_absent_and_a_forbidden_one_is_an_error_saying_what_to_grant() {
        let mut state = KindState::default();
        assert!(note_error(
            NetworkPolicyKind::CiliumNetworkPolicy,
            &mut state,
            &api_error(404)
        ));
        assert!(state.absent && state.error.is_none());
        // The same again changes nothing (no republish, no log flood).
        assert!(!note_error(
            NetworkPolicyKind::CiliumNetworkPolicy,
            &mut state,
            &api_error(404)
        ));

        let mut state = KindState::default();
        assert!(note_error(
            NetworkPolicyKind::NetworkPolicy,
            &mut state,
            &api_error(403)
        ));
        let error = state.error.clone().unwrap();
        assert!(
            error.contains("networkpolicies") && error.contains("gitlab-agent-alert-reader"),
            "{error}"
        );
        assert!(!note_error(
            NetworkPolicyKind::NetworkPolicy,
            &mut state,
            &api_error(403)
        ));
        assert!(!state.absent);
    }
}
