//! `ManifestDelivery.GetObjectsToSynchronize`.

use std::{pin::Pin, sync::Arc};

use futures::Stream;
use gitops_protocol::{
    ManifestFile, ObjectsToSynchronizeRequest, ObjectsToSynchronizeResponse, ReconcileRequest,
    SnapshotError, SnapshotHeader, SnapshotTrailer,
    manifest_delivery_server::{ManifestDelivery, ManifestDeliveryServer},
    objects_to_synchronize_response::Message,
};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, info, info_span, warn};

use super::{
    access::{self, AccessError},
    request::{self, ManifestRequest, Selection},
    select::select,
};
use crate::{
    KasState,
    agent_config::{ConfigTracker, TrackedConfig, first_valid},
    auth::AgentIdentity,
    connections::StreamGuard,
    store::{ManifestStatus, now},
    watch::ProjectState,
};

pub struct ManifestDeliveryService {
    state: Arc<KasState>,
}

impl ManifestDeliveryService {
    pub fn new(state: Arc<KasState>) -> Self {
        Self { state }
    }

    pub fn server(state: Arc<KasState>) -> ManifestDeliveryServer<Self> {
        ManifestDeliveryServer::new(Self::new(state))
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
        // Taken first: if the token was revoked since it was authenticated, the switch is already cancelled.
        let revoked = self.state.connections.token_switch(identity.token_id);
        if revoked.is_cancelled() {
            return Err(Status::unauthenticated("agent token revoked"));
        }
        // Validated before authorisation, Git and the store see any of it.
        let ManifestRequest { selection, have } =
            request::parse(request.into_inner(), self.state.manifest_limits.max_paths)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let span = info_span!("gitops", mod_name = "gitops", agent_id = identity.agent_id, project_id = %selection.project);
        let tracker = self.state.agent_configs.track(&self.state, &identity);
        let mut config = tracker.subscribe();
        // Subscribed before the first check, so a revocation right after it is not missed.
        let grants = self.state.connections.grant_changes(identity.agent_id);
        let access = first_access(&self.state, &identity, &mut config, &selection).await;
        if let Err(status) = access {
            let _entered = span.enter();
            warn!(error = status.message(), "refused a manifest project");
            return Err(status);
        }
        let guard = self
            .state
            .connections
            .open_manifest_stream(identity.agent_id, &selection.project, &selection.reference)
            .map_err(|e| Status::resource_exhausted(e.to_string()))?;
        let (tx, rx) = mpsc::channel(16);
        let state = self.state.clone();
        let reconcile = state
            .reconciles
            .subscribe(identity.agent_id, &selection.project);
        let stream = ManifestStream {
            identity,
            selection,
            revoked,
            config,
            grants,
            reconcile,
            _tracker: tracker,
            _guard: guard,
        };
        tokio::spawn(async move { stream.run(&state, have, tx).await }.instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The access decision for a new stream, once kas has read the agent's configuration. A denial of a
/// configured project is recorded in its status (GraphQL shows why); an unconfigured one leaves nothing.
async fn first_access(
    state: &KasState,
    identity: &AgentIdentity,
    config: &mut watch::Receiver<TrackedConfig>,
    selection: &Selection,
) -> Result<(), Status> {
    let valid = first_valid(config, &identity.agent_name).await?;
    match access::authorize_selection(&state.store, identity, &valid, selection) {
        Ok(()) => Ok(()),
        Err(denied @ AccessError::Denied { .. }) => {
            record(
                state,
                identity,
                selection,
                None,
                None,
                Some(denied.to_string()),
            );
            Err(Status::permission_denied(denied.to_string()))
        }
        Err(not_configured @ AccessError::NotConfigured(_)) => {
            Err(Status::permission_denied(not_configured.to_string()))
        }
        Err(e @ AccessError::Store { .. }) => Err(Status::unavailable(e.to_string())),
    }
}

fn record(
    state: &KasState,
    agent: &AgentIdentity,
    selection: &Selection,
    seen: Option<&str>,
    sent: Option<&str>,
    error: Option<String>,
) {
    let status = ManifestStatus {
        commit_seen: seen.map(str::to_owned),
        commit_sent: sent.map(str::to_owned),
        selection: sent.map(|_| selection.digest()),
        error,
        updated_at: now(),
    };
    if let Err(e) = state
        .store
        .set_manifest_status(agent.agent_id, &selection.project, &status)
    {
        warn!(error = %e, "could not record the manifest status");
    }
}

/// What a manifest stream remembers between wake-ups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct StreamState {
    /// The commit of the newest complete snapshot the agent has (sent, or its `have` when honoured).
    last_sent: String,
    /// The error last reported to the agent; the same error is not reported again.
    last_error: Option<String>,
}

/// What the stream does next.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// Nothing until something changes.
    Wait,
    /// Read and send the snapshot of `commit`. `force`: even if its files equal the last ones sent, because
    /// the agent holds an error that is over, and only a complete snapshot clears it.
    Deliver { commit: String, force: bool },
    /// Tell the agent (and the status) that the project cannot be read.
    Report { error: String },
    /// Access was withdrawn: end the stream with this reason.
    End(AccessError),
}

/// The pure decision: from what the stream knows, whether access still holds, and the project's state.
fn decide(state: &StreamState, access: Result<(), AccessError>, project: &ProjectState) -> Step {
    if let Err(denied) = access {
        return Step::End(denied);
    }
    match project {
        ProjectState::Pending => Step::Wait,
        ProjectState::Failed(error) if state.last_error.as_ref() != Some(error) => Step::Report {
            error: error.clone(),
        },
        ProjectState::Failed(_) => Step::Wait,
        ProjectState::Commit(commit) if *commit != state.last_sent => Step::Deliver {
            commit: commit.clone(),
            force: false,
        },
        // Git is back at the commit the agent has, after an error it was told about.
        ProjectState::Commit(commit) if state.last_error.is_some() => Step::Deliver {
            commit: commit.clone(),
            force: true,
        },
        ProjectState::Commit(_) => Step::Wait,
    }
}

/// Everything one stream holds while it runs; dropping it releases its cap slot and subscriptions.
struct ManifestStream {
    identity: AgentIdentity,
    selection: Selection,
    revoked: CancellationToken,
    config: watch::Receiver<TrackedConfig>,
    grants: watch::Receiver<u64>,
    /// Reconcile requests for this agent and project (see [`super::reconcile`]).
    reconcile: watch::Receiver<u64>,
    _tracker: Arc<ConfigTracker>,
    _guard: StreamGuard,
}

impl ManifestStream {
    /// Access now: the selection is in the agent's last valid configuration, and the owner or a grant
    /// allows it.
    fn access(&self, state: &KasState) -> Result<(), AccessError> {
        let config = self.config.borrow().valid.clone();
        match config {
            Some(config) => {
                access::authorize_selection(&state.store, &self.identity, &config, &self.selection)
            }
            // Unreachable: the stream started with a valid configuration and that is never taken away.
            None => Ok(()),
        }
    }

    /// `have` is honoured only when kas recorded sending that commit for this very selection, so a changed
    /// `paths` or `ref` gets a fresh snapshot even if the commit did not move.
    fn resume_from(&self, state: &KasState, have: String) -> String {
        if have.is_empty() {
            return have;
        }
        let recorded = state
            .store
            .manifest_status(self.identity.agent_id, &self.selection.project);
        match recorded {
            Ok(Some(status))
                if status.commit_sent.as_deref() == Some(have.as_str())
                    && status.selection.as_deref() == Some(self.selection.digest().as_str()) =>
            {
                have
            }
            _ => {
                debug!(commit_id = %have, "the agent's commit was not sent for this selection; sending a fresh snapshot");
                String::new()
            }
        }
    }

    async fn run(mut self, state: &KasState, have: String, tx: Sender) {
        let mut stream = StreamState {
            last_sent: self.resume_from(state, have),
            last_error: None,
        };
        let project = &self.selection.project;
        let watcher = state
            .watchers
            .watch_ref(project, self.selection.reference.clone());
        let mut updates = watcher.subscribe();
        // Digest of the files last sent: a push that changed nothing this agent selects does not wake it.
        let mut last_digest: Option<[u8; 32]> = None;
        // The reconcile requests served: those made before the stream opened count as served.
        let mut reconciled = *self.reconcile.borrow();
        loop {
            let current = updates.borrow_and_update().clone();
            self.config.borrow_and_update();
            self.grants.borrow_and_update();
            match decide(&stream, self.access(state), &current) {
                Step::Wait => {}
                Step::End(denied) => {
                    info!(error = %denied, "closing the manifest stream: access was withdrawn");
                    let _ = tx
                        .send(Err(Status::permission_denied(denied.to_string())))
                        .await;
                    return;
                }
                Step::Report { error } => {
                    if !self.report(state, &mut stream, None, error, &tx).await {
                        return;
                    }
                }
                Step::Deliver { commit, force } => {
                    let mut fresh = None;
                    let digest = if force { &mut fresh } else { &mut last_digest };
                    let sent = send_snapshot(state, &self.selection, &commit, digest, &tx).await;
                    if fresh.is_some() {
                        last_digest = fresh;
                    }
                    let sel = &self.selection;
                    match sent {
                        Ok(Delivery::Sent(files)) => {
                            info!(commit_id = %commit, files, "sent manifests");
                            record(
                                state,
                                &self.identity,
                                sel,
                                Some(&commit),
                                Some(&commit),
                                None,
                            );
                            stream.last_sent = commit;
                            stream.last_error = None;
                        }
                        Ok(Delivery::Unchanged) => {
                            debug!(commit_id = %commit, "the new commit changes none of this agent's files; not sent");
                            let sent = Some(stream.last_sent.as_str()).filter(|c| !c.is_empty());
                            record(state, &self.identity, sel, Some(&commit), sent, None);
                            stream.last_sent = commit;
                            stream.last_error = None;
                        }
                        Err(error) if stream.last_error.as_ref() != Some(&error) => {
                            if !self
                                .report(state, &mut stream, Some(commit), error, &tx)
                                .await
                            {
                                return;
                            }
                        }
                        Err(_) => {}
                    }
                }
            }
            // After any delivery above: a reconcile re-read Git first, so a newer snapshot goes out before it.
            let requested = *self.reconcile.borrow_and_update();
            if requested != reconciled {
                reconciled = requested;
                if !self.ask_to_reconcile(&stream, &tx).await {
                    return;
                }
            }
            if tx.is_closed() {
                return;
            }
            tokio::select! {
                changed = updates.changed() => if changed.is_err() { return },
                changed = self.reconcile.changed() => if changed.is_err() { return },
                changed = self.config.changed() => if changed.is_err() { return },
                changed = self.grants.changed() => if changed.is_err() { return },
                _ = tx.closed() => return,
                _ = self.revoked.cancelled() => {
                    let _ = tx.send(Err(Status::unauthenticated("agent token revoked"))).await;
                    return;
                }
            }
        }
    }

    /// Sends a `ReconcileRequest` when the agent has a snapshot to sync; false when the agent went away.
    async fn ask_to_reconcile(&self, stream: &StreamState, tx: &Sender) -> bool {
        if stream.last_sent.is_empty() {
            info!("reconcile requested, but the agent has no snapshot of this project yet");
            return true;
        }
        info!(commit_id = %stream.last_sent, "asking the agent to sync now");
        let request = Message::Reconcile(ReconcileRequest {
            commit_id: stream.last_sent.clone(),
        });
        tx.send(message(request)).await.is_ok()
    }

    /// Records and sends `error`; false when the agent went away.
    async fn report(
        &self,
        state: &KasState,
        stream: &mut StreamState,
        commit: Option<String>,
        error: String,
        tx: &Sender,
    ) -> bool {
        warn!(
            commit_id = commit.as_deref().unwrap_or(""),
            error, "cannot deliver manifests"
        );
        let sent = Some(stream.last_sent.as_str()).filter(|c| !c.is_empty());
        record(
            state,
            &self.identity,
            &self.selection,
            commit.as_deref().or(sent),
            sent,
            Some(error.clone()),
        );
        let report = Message::Error(SnapshotError {
            commit_id: commit.unwrap_or_default(),
            message: error.clone(),
        });
        stream.last_error = Some(error);
        tx.send(message(report)).await.is_ok()
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
    selection: &Selection,
    commit: &str,
    last_digest: &mut Option<[u8; 32]>,
    tx: &Sender,
) -> Result<Delivery, String> {
    let (project, selectors) = (selection.project.as_str(), &selection.paths);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(c: &str) -> ProjectState {
        ProjectState::Commit(c.into())
    }

    fn state(last_sent: &str, last_error: Option<&str>) -> StreamState {
        StreamState {
            last_sent: last_sent.into(),
            last_error: last_error.map(str::to_owned),
        }
    }

    fn deliver(c: &str, force: bool) -> Step {
        Step::Deliver {
            commit: c.into(),
            force,
        }
    }

    #[test]
    fn new_commits_are_delivered_and_the_agents_commit_is_not() {
        assert_eq!(
            decide(&state("", None), Ok(()), &commit("a")),
            deliver("a", false)
        );
        assert_eq!(
            decide(&state("a", None), Ok(()), &commit("b")),
            deliver("b", false)
        );
        assert_eq!(decide(&state("a", None), Ok(()), &commit("a")), Step::Wait);
        assert_eq!(
            decide(&state("a", None), Ok(()), &ProjectState::Pending),
            Step::Wait
        );
    }

    #[test]
    fn a_git_error_is_reported_once_and_cleared_at_the_same_commit() {
        let failed = ProjectState::Failed("project \"g/p\": gone".into());
        assert_eq!(
            decide(&state("a", None), Ok(()), &failed),
            Step::Report {
                error: "project \"g/p\": gone".into()
            }
        );
        let reported = state("a", Some("project \"g/p\": gone"));
        assert_eq!(decide(&reported, Ok(()), &failed), Step::Wait);
        // Back at the commit the agent has: re-sent, so the agent's error clears too.
        assert_eq!(decide(&reported, Ok(()), &commit("a")), deliver("a", true));
        assert_eq!(decide(&reported, Ok(()), &commit("b")), deliver("b", false));
    }

    #[test]
    fn withdrawn_access_ends_the_stream_whatever_the_project_does() {
        let denied = AccessError::NotConfigured(Box::new(super::super::access::NotConfigured {
            agent_name: "a".into(),
            agent_project: "g/c".into(),
            project: "g/p".into(),
            reference: "default branch".into(),
            paths: "[]".into(),
            detail: "gone".into(),
        }));
        for project in [
            commit("a"),
            commit("b"),
            ProjectState::Pending,
            ProjectState::Failed("x".into()),
        ] {
            assert_eq!(
                decide(&state("a", None), Err(denied.clone()), &project),
                Step::End(denied.clone())
            );
        }
    }
}
