//! Kubernetes Events, so that `kubectl describe` and `kubectl get events` tell what agentk did: a failed
//! object (`SyncFailed`), a pruned one (`Pruned`), one a drift check put back (`DriftCorrected`), on the
//! object concerned; a sync that failed as a whole on agentk's own Pod; and `LeaderElection` on the agent's
//! Lease when this replica starts leading. Published by kube's [`Recorder`] (`events.k8s.io/v1`, repeats
//! folded into a series) from one task behind a bounded queue, so a sync never waits for the apiserver and a
//! sync of thousands of failing objects cannot flood it: at most [`PER_REASON`] Events per reason per sync.

use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::{
    gitops::{ObjectOutcome, SyncOutcome},
    metrics::AgentMetrics,
};
use gitops_engine::Outcome;

/// Why an Event was recorded; its `reason` in the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    SyncFailed,
    Pruned,
    DriftCorrected,
    LeaderElection,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SyncFailed => "SyncFailed",
            Self::Pruned => "Pruned",
            Self::DriftCorrected => "DriftCorrected",
            Self::LeaderElection => "LeaderElection",
        }
    }

    fn event_type(self) -> EventType {
        match self {
            Self::SyncFailed => EventType::Warning,
            Self::Pruned | Self::DriftCorrected | Self::LeaderElection => EventType::Normal,
        }
    }

    /// What agentk was doing (the Event's `action`).
    fn action(self) -> &'static str {
        match self {
            Self::SyncFailed | Self::DriftCorrected => "Apply",
            Self::Pruned => "Prune",
            Self::LeaderElection => "Lead",
        }
    }
}

/// Events per reason and sync at most; the rest are only counted in a log line.
pub const PER_REASON: usize = 20;
/// Events waiting to be published; more are dropped (and counted).
const QUEUE: usize = 256;
/// The Event API limits `note` to 1 kB.
const MAX_NOTE: usize = 1000;

struct Pending {
    reason: Reason,
    regarding: ObjectReference,
    note: String,
}

/// Records agentk's Events. Cheap to clone.
#[derive(Clone)]
pub struct EventRecorder {
    queue: mpsc::Sender<Pending>,
    /// agentk's own Pod, for what concerns no single object; `None` outside a Pod.
    pod: Option<ObjectReference>,
    metrics: Arc<AgentMetrics>,
}

impl std::fmt::Debug for EventRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventRecorder")
            .field("pod", &self.pod)
            .finish_non_exhaustive()
    }
}

impl EventRecorder {
    /// Starts the publishing task (needs a tokio runtime). Events name `agentk` as the reporting
    /// controller and the pod (when there is one) as its instance.
    pub fn start(
        client: kube::Client,
        pod_namespace: &str,
        pod_name: &str,
        metrics: Arc<AgentMetrics>,
    ) -> Self {
        let reporter = Reporter {
            controller: "agentk".into(),
            instance: (!pod_name.is_empty()).then(|| pod_name.to_owned()),
        };
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(publish(
            Recorder::new(client, reporter),
            rx,
            metrics.clone(),
        ));
        let pod = (!pod_name.is_empty()).then(|| ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod_name.to_owned()),
            namespace: Some(if pod_namespace.is_empty() {
                "default".to_owned()
            } else {
                pod_namespace.to_owned()
            }),
            ..Default::default()
        });
        Self {
            queue,
            pod,
            metrics,
        }
    }

    fn record(&self, reason: Reason, regarding: ObjectReference, mut note: String) {
        if note.len() > MAX_NOTE {
            let mut end = MAX_NOTE - 3;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
            note.push_str("...");
        }
        let pending = Pending {
            reason,
            regarding,
            note,
        };
        if self.queue.try_send(pending).is_err() {
            self.metrics.event(reason.as_str(), "dropped");
        }
    }

    /// The Events of one finished sync of `project` at `commit`.
    pub fn sync(&self, project: &str, commit: &str, outcome: &SyncOutcome, drift_check: bool) {
        if let Some(error) = &outcome.error {
            match &self.pod {
                Some(pod) => self.record(
                    Reason::SyncFailed,
                    pod.clone(),
                    format!("manifest project {project} at commit {commit}: {error}"),
                ),
                None => debug!(
                    project,
                    "not in a Pod: a whole-sync failure has no object for an Event"
                ),
            }
        }
        let mut counts = [0usize; 3];
        let mut over = 0usize;
        for object in &outcome.objects {
            let (reason, slot, note) = match &object.result {
                Outcome::Failed(message) => (
                    Reason::SyncFailed,
                    0,
                    format!("{project} at {commit}: {message}"),
                ),
                Outcome::Pruned => (
                    Reason::Pruned,
                    1,
                    format!("deleted: it left manifest project {project} at commit {commit}"),
                ),
                Outcome::Created | Outcome::Configured if drift_check => (
                    Reason::DriftCorrected,
                    2,
                    format!(
                        "{}: the live object no longer matched manifest project {project} at commit {commit}",
                        object.sync_result
                    ),
                ),
                _ => continue,
            };
            if counts[slot] >= PER_REASON {
                over += 1;
                continue;
            }
            counts[slot] += 1;
            match (reference(object), &self.pod) {
                (Some(regarding), _) => self.record(reason, regarding, note),
                // Unknown kind, invalid document: no object to attach it to but agentk's own Pod.
                (None, Some(pod)) => self.record(
                    reason,
                    pod.clone(),
                    format!("{}: {note}", object.resource_key),
                ),
                (None, None) => {}
            }
        }
        if over > 0 {
            info!(
                project,
                commit,
                events_not_recorded = over,
                per_reason = PER_REASON,
                "more objects than Events recorded per sync"
            );
        }
    }

    /// This replica now holds `lease` in `namespace`.
    pub fn leader_acquired(&self, namespace: &str, lease: &str, identity: &str) {
        let regarding = ObjectReference {
            api_version: Some("coordination.k8s.io/v1".into()),
            kind: Some("Lease".into()),
            name: Some(lease.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        };
        self.record(
            Reason::LeaderElection,
            regarding,
            format!("{identity} became leader: this replica applies manifests"),
        );
    }
}

/// The object an outcome is about, when it is known well enough to name it (its API too).
fn reference(object: &ObjectOutcome) -> Option<ObjectReference> {
    let key = object.key.as_ref()?;
    let resource = object.resource.as_ref()?;
    Some(ObjectReference {
        api_version: Some(resource.api_version.clone()),
        kind: Some(key.kind.clone()),
        name: Some(key.name.clone()),
        namespace: key.namespace.clone(),
        ..Default::default()
    })
}

async fn publish(recorder: Recorder, mut rx: mpsc::Receiver<Pending>, metrics: Arc<AgentMetrics>) {
    while let Some(pending) = rx.recv().await {
        let event = Event {
            type_: pending.reason.event_type(),
            reason: pending.reason.as_str().into(),
            note: Some(pending.note),
            action: pending.reason.action().into(),
            secondary: None,
        };
        let reason = pending.reason.as_str();
        match recorder.publish(&event, &pending.regarding).await {
            Ok(()) => metrics.event(reason, "published"),
            Err(e) => {
                metrics.event(reason, "failed");
                warn!(reason, object = ?pending.regarding.name, error = %e, "could not record a Kubernetes Event (RBAC: events.k8s.io events create, patch)");
            }
        }
    }
}

/// Follows this replica's leadership: the `agentk_leader` gauge, and a `LeaderElection` Event each time it
/// starts leading. Ends when the election ends.
pub async fn follow_leadership(
    mut leading: watch::Receiver<bool>,
    agent: watch::Receiver<crate::AgentState>,
    namespace: String,
    identity: String,
    events: Option<EventRecorder>,
    metrics: Arc<AgentMetrics>,
) {
    let mut was_leading = false;
    loop {
        let now = *leading.borrow_and_update();
        metrics.leader.set(i64::from(now));
        if now && !was_leading {
            let agent_id = agent.borrow().agent_id;
            if let Some(events) = &events {
                events.leader_acquired(&namespace, &crate::leader::lease_name(agent_id), &identity);
            }
        }
        was_leading = now;
        if leading.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use gitops_engine::ObjectKey;

    use super::*;

    fn failed(name: &str) -> ObjectOutcome {
        ObjectOutcome {
            resource_key: format!("/ConfigMap/apps/{name}"),
            key: Some(ObjectKey {
                group: String::new(),
                kind: "ConfigMap".into(),
                namespace: Some("apps".into()),
                name: name.into(),
            }),
            source: "cm.yaml#0".into(),
            result: Outcome::Failed("refused".into()),
            sync_result: String::new(),
            health: None,
            message: "refused".into(),
            resource: Some(kube::discovery::ApiResource::erase::<
                k8s_openapi::api::core::v1::ConfigMap,
            >(&())),
        }
    }

    /// No apiserver listens on port 1: every publish fails at once, and the metric counts each attempt.
    #[tokio::test]
    async fn at_most_per_reason_events_are_attempted_per_sync() {
        let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let metrics = Arc::new(AgentMetrics::new());
        let events = EventRecorder::start(client, "agents", "agentk-0", metrics.clone());
        let outcome = SyncOutcome {
            objects: (0..PER_REASON + 15)
                .map(|i| failed(&format!("cm-{i}")))
                .collect(),
            error: Some("and the sync failed as a whole".into()),
        };
        events.sync("group/apps", "abc123", &outcome, false);
        let line = format!(
            "agentk_events_total{{reason=\"SyncFailed\",result=\"failed\"}} {}\n",
            PER_REASON + 1
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let mut text = String::new();
            gitops_telemetry::prometheus_client::encoding::prometheus_text::encode(
                &mut text,
                &metrics.registry(),
            )
            .unwrap();
            if text.contains(&line) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "expected {line} (the objects' {PER_REASON} and the Pod's one) in\n{text}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    #[test]
    fn only_objects_with_a_known_api_have_a_reference() {
        let mut object = failed("a");
        let regarding = reference(&object).unwrap();
        assert_eq!(regarding.api_version.as_deref(), Some("v1"));
        assert_eq!(regarding.kind.as_deref(), Some("ConfigMap"));
        assert_eq!(regarding.namespace.as_deref(), Some("apps"));
        object.resource = None;
        assert!(reference(&object).is_none(), "goes to the Pod instead");
    }
}
