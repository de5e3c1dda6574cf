//! The GitOps module's receiving half: one worker per `gitops.manifest_projects[]` entry holds a
//! `GetObjectsToSynchronize` stream, assembles complete snapshots (header, files, trailer), and publishes
//! them. Workers start and stop as the configuration changes. A failed snapshot (permission, limits, Git)
//! is logged and published as an error; the last complete snapshot stays, so nothing gets pruned by it.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use gitops_config::agent::{GitRefConfig, ManifestProject, PathConfig};
use gitops_protocol::{
    ObjectsToSynchronizeRequest, PathSelector, manifest_delivery_client::ManifestDeliveryClient,
    objects_to_synchronize_request::Ref, objects_to_synchronize_response::Message,
    path_selector::Selector,
};
use gitops_tunnel::backoff::Backoff;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::{AgentState, KasChannel};

/// One complete set of manifest files at one commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestSnapshot {
    pub project_id: String,
    pub commit_id: String,
    /// (path, contents), sorted by path.
    pub files: Vec<(String, Vec<u8>)>,
}

/// What the agent has received for one manifest project.
#[derive(Debug, Clone, Default)]
pub struct ProjectSync {
    /// The last complete snapshot.
    pub snapshot: Option<Arc<ManifestSnapshot>>,
    /// Why the newest commit could not be delivered, if it could not.
    pub error: Option<String>,
}

pub type GitopsState = BTreeMap<String, ProjectSync>;

pub async fn run(
    service: KasChannel,
    mut config: watch::Receiver<AgentState>,
    state: Arc<watch::Sender<GitopsState>>,
    stop: CancellationToken,
) {
    // Keyed by the entry as configured: any change to an entry restarts its worker.
    let mut workers: HashMap<String, CancellationToken> = HashMap::new();
    loop {
        let desired: Vec<ManifestProject> = config
            .borrow_and_update()
            .config
            .as_ref()
            .map(|c| c.gitops.manifest_projects.clone())
            .unwrap_or_default();
        let keyed: HashMap<String, ManifestProject> = desired
            .into_iter()
            .map(|p| (serde_json::to_string(&p).expect("config serializes"), p))
            .collect();
        workers.retain(|key, cancel| {
            let keep = keyed.contains_key(key);
            if !keep {
                cancel.cancel();
            }
            keep
        });
        let ids: Vec<&str> = keyed.values().map(|p| p.id.as_str()).collect();
        state.send_modify(|s| s.retain(|id, _| ids.contains(&id.as_str())));
        for (key, project) in keyed {
            if workers.contains_key(&key) {
                continue;
            }
            let cancel = stop.child_token();
            let span = info_span!("gitops", mod_name = "gitops", project_id = %project.id);
            tokio::spawn(
                worker(service.clone(), project, state.clone(), cancel.clone()).instrument(span),
            );
            workers.insert(key, cancel);
        }
        tokio::select! {
            changed = config.changed() => if changed.is_err() { return },
            _ = stop.cancelled() => return,
        }
    }
}

fn request(project: &ManifestProject, commit_id: String) -> ObjectsToSynchronizeRequest {
    ObjectsToSynchronizeRequest {
        project_id: project.id.clone(),
        commit_id,
        r#ref: project.reference.as_ref().map(|r| match r {
            GitRefConfig::Branch(b) => Ref::Branch(b.clone()),
            GitRefConfig::Tag(t) => Ref::Tag(t.clone()),
            GitRefConfig::Commit(c) => Ref::Commit(c.clone()),
        }),
        paths: project
            .paths
            .iter()
            .map(|p| PathSelector {
                selector: Some(match p {
                    PathConfig::Glob(g) => Selector::Glob(g.clone()),
                    PathConfig::File(f) => Selector::File(f.clone()),
                }),
            })
            .collect(),
    }
}

async fn worker(
    service: KasChannel,
    project: ManifestProject,
    state: Arc<watch::Sender<GitopsState>>,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let publish = |update: &dyn Fn(&mut ProjectSync)| {
        state.send_modify(|s| update(s.entry(project.id.clone()).or_default()))
    };
    while !cancel.is_cancelled() {
        let have = state
            .borrow()
            .get(&project.id)
            .and_then(|p| p.snapshot.as_ref().map(|s| s.commit_id.clone()))
            .unwrap_or_default();
        let mut client = ManifestDeliveryClient::new(service.clone());
        let receive = async {
            let mut stream = client
                .get_objects_to_synchronize(request(&project, have))
                .await?
                .into_inner();
            backoff.reset();
            let mut pending: Option<ManifestSnapshot> = None;
            while let Some(response) = stream.message().await? {
                match response.message {
                    Some(Message::Header(h)) => {
                        pending = Some(ManifestSnapshot {
                            project_id: h.project_id,
                            commit_id: h.commit_id,
                            files: Vec::new(),
                        })
                    }
                    Some(Message::File(f)) => {
                        if let Some(p) = pending.as_mut() {
                            p.files.push((f.path, f.data));
                        }
                    }
                    Some(Message::Trailer(_)) => {
                        if let Some(snapshot) = pending.take() {
                            info!(commit_id = %snapshot.commit_id, files = snapshot.files.len(), "received manifests");
                            let snapshot = Arc::new(snapshot);
                            publish(&|p| {
                                p.snapshot = Some(snapshot.clone());
                                p.error = None;
                            });
                        }
                    }
                    Some(Message::Error(e)) => {
                        warn!(commit_id = %e.commit_id, error = %e.message, "kas cannot deliver this project's manifests; keeping what is applied");
                        publish(&|p| p.error = Some(e.message.clone()));
                    }
                    None => {}
                }
            }
            Ok::<(), tonic::Status>(())
        };
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            result = receive => result,
        };
        if let Err(status) = result {
            warn!(code = ?status.code(), error = status.message(), "manifest stream failed");
            if status.code() == tonic::Code::PermissionDenied {
                publish(&|p| p.error = Some(status.message().to_owned()));
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}
