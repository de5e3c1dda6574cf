//! `ManifestDelivery.GetObjectsToSynchronize`.

use std::{pin::Pin, sync::Arc};

use futures::Stream;
use gitops_git::GitRef;
use gitops_protocol::{
    ManifestFile, ObjectsToSynchronizeRequest, ObjectsToSynchronizeResponse, SnapshotError,
    SnapshotHeader, SnapshotTrailer,
    manifest_delivery_server::{ManifestDelivery, ManifestDeliveryServer},
    objects_to_synchronize_request::Ref,
    objects_to_synchronize_response::Message,
    path_selector::Selector,
};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, info, info_span, warn};

use super::{PathSelector, access::authorize, select::select};
use crate::{
    KasState,
    auth::AgentIdentity,
    store::{ManifestStatus, now},
    watch::ProjectState,
};

pub struct ManifestDeliveryService {
    state: Arc<KasState>,
}

impl ManifestDeliveryService {
    pub fn server(state: Arc<KasState>) -> ManifestDeliveryServer<Self> {
        ManifestDeliveryServer::new(Self { state })
    }
}

type Sender = mpsc::Sender<Result<ObjectsToSynchronizeResponse, Status>>;

fn message(m: Message) -> Result<ObjectsToSynchronizeResponse, Status> {
    Ok(ObjectsToSynchronizeResponse { message: Some(m) })
}

#[tonic::async_trait]
impl ManifestDelivery for ManifestDeliveryService {
    type GetObjectsToSynchronizeStream =
        Pin<Box<dyn Stream<Item = Result<ObjectsToSynchronizeResponse, Status>> + Send>>;

    async fn get_objects_to_synchronize(
        &self,
        request: Request<ObjectsToSynchronizeRequest>,
    ) -> Result<Response<Self::GetObjectsToSynchronizeStream>, Status> {
        let identity = request
            .extensions()
            .get::<AgentIdentity>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("no agent identity"))?;
        let request = request.into_inner();
        let project = request.project_id.clone();
        let selectors: Vec<PathSelector> = request
            .paths
            .iter()
            .filter_map(|p| match &p.selector {
                Some(Selector::Glob(g)) => Some(PathSelector::Glob(g.clone())),
                Some(Selector::File(f)) => Some(PathSelector::File(f.clone())),
                None => None,
            })
            .collect();
        let reference = match request.r#ref {
            Some(Ref::Branch(b)) => GitRef::Branch(b),
            Some(Ref::Tag(t)) => GitRef::Tag(t),
            Some(Ref::Commit(c)) => GitRef::Commit(c),
            None => GitRef::DefaultBranch,
        };
        let span = info_span!("gitops", mod_name = "gitops", agent_id = identity.agent_id, project_id = %project);
        if let Err(denied) = authorize(&self.state.store, &identity, &project) {
            let _entered = span.enter();
            warn!(error = %denied, "refused a manifest project");
            record(
                &self.state,
                &identity,
                &project,
                None,
                None,
                Some(denied.to_string()),
            );
            return Err(Status::permission_denied(denied.to_string()));
        }
        let (tx, rx) = mpsc::channel(16);
        let state = self.state.clone();
        tokio::spawn(
            async move {
                stream_snapshots(
                    &state,
                    &identity,
                    &project,
                    reference,
                    selectors,
                    request.commit_id,
                    tx,
                )
                .await
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn record(
    state: &KasState,
    agent: &AgentIdentity,
    project: &str,
    seen: Option<&str>,
    sent: Option<&str>,
    error: Option<String>,
) {
    let status = ManifestStatus {
        commit_seen: seen.map(str::to_owned),
        commit_sent: sent.map(str::to_owned),
        error,
        updated_at: now(),
    };
    if let Err(e) = state
        .store
        .set_manifest_status(agent.agent_id, project, &status)
    {
        warn!(error = %e, "could not record the manifest status");
    }
}

async fn stream_snapshots(
    state: &KasState,
    agent: &AgentIdentity,
    project: &str,
    reference: GitRef,
    selectors: Vec<PathSelector>,
    mut last_sent: String,
    tx: Sender,
) {
    let revoked = state.connections.token_switch(agent.token_id);
    let watcher = state.watchers.watch_ref(project, reference);
    let mut updates = watcher.subscribe();
    let mut last_error: Option<String> = None;
    // Digest of the files last sent: a push that changed nothing this agent selects does not wake it.
    let mut last_digest: Option<[u8; 32]> = None;
    loop {
        let current = updates.borrow_and_update().clone();
        let outcome = match current {
            ProjectState::Pending => None,
            ProjectState::Failed(error) => Some((None, Err(error))),
            ProjectState::Commit(commit) if commit != last_sent => {
                let sent =
                    send_snapshot(state, project, &commit, &selectors, &mut last_digest, &tx).await;
                Some((Some(commit.clone()), sent))
            }
            ProjectState::Commit(_) => None,
        };
        match outcome {
            Some((commit, Ok(Delivery::Sent(files)))) => {
                let commit = commit.unwrap_or_default();
                info!(commit_id = %commit, files, "sent manifests");
                record(state, agent, project, Some(&commit), Some(&commit), None);
                last_sent = commit;
                last_error = None;
            }
            Some((commit, Ok(Delivery::Unchanged))) => {
                let commit = commit.unwrap_or_default();
                debug!(commit_id = %commit, "the new commit changes none of this agent's files; not sent");
                let sent = Some(last_sent.as_str()).filter(|c| !c.is_empty());
                record(state, agent, project, Some(&commit), sent, None);
                last_sent = commit;
                last_error = None;
            }
            Some((commit, Err(error))) if last_error.as_ref() != Some(&error) => {
                warn!(
                    commit_id = commit.as_deref().unwrap_or(""),
                    error, "cannot deliver manifests"
                );
                let sent = Some(last_sent.as_str()).filter(|c| !c.is_empty());
                record(
                    state,
                    agent,
                    project,
                    commit.as_deref().or(sent),
                    sent,
                    Some(error.clone()),
                );
                let report = Message::Error(SnapshotError {
                    commit_id: commit.unwrap_or_default(),
                    message: error.clone(),
                });
                if tx.send(message(report)).await.is_err() {
                    return;
                }
                last_error = Some(error);
            }
            _ => {}
        }
        if tx.is_closed() {
            return;
        }
        tokio::select! {
            changed = updates.changed() => if changed.is_err() { return },
            _ = tx.closed() => return,
            _ = revoked.cancelled() => {
                let _ = tx.send(Err(Status::unauthenticated("agent token revoked"))).await;
                return;
            }
        }
    }
}

/// What happened to a new commit.
enum Delivery {
    /// A snapshot with this many files went out.
    Sent(usize),
    /// The selected files are byte for byte what the agent already has.
    Unchanged,
}

/// Sends header, files and trailer for `commit`, unless they equal what was sent last (`last_digest`);
/// on error nothing was sent (no header either), so the agent never sees half a snapshot.
async fn send_snapshot(
    state: &KasState,
    project: &str,
    commit: &str,
    selectors: &[PathSelector],
    last_digest: &mut Option<[u8; 32]>,
    tx: &Sender,
) -> Result<Delivery, String> {
    let repos = state.watchers.repos();
    let limits = &state.manifest_limits;
    let listing = repos
        .list_files(project, commit)
        .await
        .map_err(|e| e.to_string())?;
    let selected =
        select(&listing, selectors, limits).map_err(|e| format!("project {project:?}: {e}"))?;
    // Read everything before sending anything: a read failure must not leave a partial snapshot.
    let mut files = Vec::with_capacity(selected.len());
    for path in &selected {
        match repos
            .read_file(project, commit, path, limits.max_file_size)
            .await
        {
            Ok(Some(data)) => files.push(ManifestFile {
                path: path.clone(),
                data,
            }),
            Ok(None) => {
                return Err(format!(
                    "project {project:?}: {path:?} vanished while reading commit {commit}"
                ));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    let mut hasher = Sha256::new();
    for file in &files {
        hasher.update((file.path.len() as u64).to_le_bytes());
        hasher.update(file.path.as_bytes());
        hasher.update((file.data.len() as u64).to_le_bytes());
        hasher.update(&file.data);
    }
    let digest: [u8; 32] = hasher.finalize().into();
    if *last_digest == Some(digest) {
        return Ok(Delivery::Unchanged);
    }
    let count = files.len();
    let header = Message::Header(SnapshotHeader {
        commit_id: commit.to_owned(),
        project_id: project.to_owned(),
    });
    let sends = std::iter::once(header)
        .chain(files.into_iter().map(Message::File))
        .chain(std::iter::once(Message::Trailer(SnapshotTrailer {})));
    for m in sends {
        if tx.send(message(m)).await.is_err() {
            return Err("agent went away".into());
        }
    }
    *last_digest = Some(digest);
    Ok(Delivery::Sent(count))
}
