//! The GitOps module. Receiving: one worker per `gitops.manifest_projects[]` entry holds a
//! `GetObjectsToSynchronize` stream, assembles complete snapshots (header, files, trailer), and publishes
//! them. Workers start and stop as the configuration changes. A failed snapshot (permission, limits, Git)
//! is logged and published as an error; the last complete snapshot stays, so nothing gets pruned by it.
//!
//! Applying: one [`sync_loop`] per entry applies that entry's newest snapshot while this replica leads,
//! retries a sync that did not succeed with exponential backoff, re-checks drift periodically, and reports
//! every sync to kas through a [`Reporter`].

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use gitops_config::agent::{GitRefConfig, ManifestProject, PathConfig};
use gitops_engine::{ManifestFile, ObjectKey, Outcome};
/// kstatus' verdict on an object, as [`ObjectOutcome::health`] holds it.
pub use gitops_kstatus::Status as Health;
use gitops_protocol::{
    MAX_MESSAGE_BYTES, ObjectHealth, ObjectResult, ObjectStatus, ObjectsToSynchronizeRequest,
    PathSelector, SyncReport, gitops_status_client::GitopsStatusClient,
    manifest_delivery_client::ManifestDeliveryClient, objects_to_synchronize_request::Ref,
    objects_to_synchronize_response::Message, path_selector::Selector,
};
use gitops_tunnel::backoff::Backoff;
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::{
    AgentState, KasChannel,
    metrics::{AgentMetrics, FinishedSync},
};

/// The most bytes of manifest files one snapshot may hold by default: twice kas's default
/// `manifests.max_total_size`. agentk checks it itself: over plaintext transport, kas is not the only one
/// who can send.
pub const DEFAULT_MAX_SNAPSHOT_BYTES: usize = 100 * 1024 * 1024;

/// One complete set of manifest files at one commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestSnapshot {
    pub project_id: String,
    pub commit_id: String,
    /// Sorted by path.
    pub files: Vec<ManifestFile>,
}

/// A snapshot agentk refused to take (it breaks an agent-side limit); the last snapshot stays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedSnapshot {
    pub commit_id: String,
    /// Names the project, the commit and the limit.
    pub message: String,
}

/// What the agent has received for one manifest project entry.
#[derive(Debug, Clone, Default)]
pub struct ProjectSync {
    /// The last complete snapshot.
    pub snapshot: Option<Arc<ManifestSnapshot>>,
    /// Why the newest commit could not be delivered, if it could not.
    pub error: Option<String>,
    /// The newest snapshot agentk refused itself, if it is newer than `snapshot`.
    pub refused: Option<Arc<RefusedSnapshot>>,
    /// How many times kas asked to sync now (`ReconcileRequest`); the sync loop syncs when it grows.
    pub reconcile_requests: u64,
}

/// One `gitops.manifest_projects[]` entry as configured. Snapshots are kept per entry, not per project id:
/// a snapshot is made for one selection (ref and paths), and a changed entry must never be sent, or apply,
/// what was selected for the old one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryKey {
    pub project_id: String,
    /// The whole entry, serialized: any change makes a new key.
    entry: String,
}

impl EntryKey {
    pub fn of(project: &ManifestProject) -> Self {
        Self {
            project_id: project.id.clone(),
            entry: serde_json::to_string(project).expect("configuration serializes"),
        }
    }
}

/// What the agent has received, per configured entry.
#[derive(Debug, Clone, Default)]
pub struct GitopsState {
    entries: BTreeMap<EntryKey, ProjectSync>,
}

impl GitopsState {
    /// The first configured entry of `project_id`.
    pub fn get(&self, project_id: &str) -> Option<&ProjectSync> {
        self.entries
            .iter()
            .find(|(key, _)| key.project_id == project_id)
            .map(|(_, sync)| sync)
    }

    pub fn entry(&self, key: &EntryKey) -> Option<&ProjectSync> {
        self.entries.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&EntryKey, &ProjectSync)> {
        self.entries.iter()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Updates `key`'s slot if the entry is still configured (a stopping worker must not bring it back).
    fn update(&mut self, key: &EntryKey, update: impl FnOnce(&mut ProjectSync)) -> bool {
        self.entries.get_mut(key).map(update).is_some()
    }
}

/// How received snapshots get applied; without these the agent only receives.
#[derive(Clone)]
pub struct ApplySettings {
    pub applier: Arc<dyn Applier>,
    /// Whether this replica leads (leader election); only the leader applies.
    pub leading: watch::Receiver<bool>,
    /// Re-check the current snapshot against the cluster this often, writing only what drifted; zero
    /// turns the periodic check off.
    pub resync: Duration,
}

impl std::fmt::Debug for ApplySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApplySettings")
            .field("resync", &self.resync)
            .finish_non_exhaustive()
    }
}

/// Runs a worker (and, with `apply`, a sync loop) per configured entry until `stop`.
pub async fn run(
    service: KasChannel,
    mut config: watch::Receiver<AgentState>,
    state: Arc<watch::Sender<GitopsState>>,
    apply: Option<ApplySettings>,
    max_snapshot_bytes: usize,
    metrics: Arc<AgentMetrics>,
    stop: CancellationToken,
) {
    let reporter: Arc<dyn Reporter> = Arc::new(KasReporter(service.clone()));
    let mut workers: BTreeMap<EntryKey, CancellationToken> = BTreeMap::new();
    loop {
        let desired: BTreeMap<EntryKey, ManifestProject> = config
            .borrow_and_update()
            .config
            .as_ref()
            .map(|c| c.gitops.manifest_projects.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|p| (EntryKey::of(&p), p))
            .collect();
        workers.retain(|key, cancel| {
            let keep = desired.contains_key(key);
            if !keep {
                cancel.cancel();
                metrics.forget(key);
            }
            keep
        });
        // A new or changed entry starts from an empty slot: its worker asks kas with an empty `have`.
        state.send_if_modified(|s| {
            let before = s.entries.len();
            s.entries.retain(|key, _| desired.contains_key(key));
            let removed = s.entries.len() != before;
            let mut added = false;
            for key in desired.keys() {
                if !s.entries.contains_key(key) {
                    s.entries.insert(key.clone(), ProjectSync::default());
                    added = true;
                }
            }
            removed || added
        });
        for (key, project) in desired {
            if workers.contains_key(&key) {
                continue;
            }
            let cancel = stop.child_token();
            let span = info_span!("gitops", mod_name = "gitops", project_id = %project.id);
            if let Some(apply) = &apply {
                let context = SyncContext {
                    agent_id: config.borrow().agent_id,
                    project: project.clone(),
                    entry: key.clone(),
                    applier: apply.applier.clone(),
                    reporter: reporter.clone(),
                    resync: apply.resync,
                    metrics: metrics.clone(),
                };
                let sync = sync_loop(
                    context,
                    state.subscribe(),
                    apply.leading.clone(),
                    cancel.clone(),
                );
                tokio::spawn(sync.instrument(span.clone()));
            }
            let receiver = Worker {
                service: service.clone(),
                project,
                key: key.clone(),
                state: state.clone(),
                max_snapshot_bytes,
            };
            tokio::spawn(receiver.run(cancel.clone()).instrument(span));
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

/// What one message of the stream means for the entry.
#[derive(Debug, PartialEq, Eq)]
enum Received {
    /// Nothing to publish yet (a header or a file of a snapshot in progress).
    Nothing,
    Snapshot(ManifestSnapshot),
    Refused(RefusedSnapshot),
    /// kas could not make the snapshot (permission, limits, Git).
    KasError {
        commit_id: String,
        message: String,
    },
    /// kas asks for a full sync now (`kas reconcile`).
    Reconcile {
        commit_id: String,
    },
}

/// Assembles snapshots from a stream's messages, refusing one whose files exceed `max_bytes` (its files
/// are dropped as they arrive, so memory stays bounded).
#[derive(Debug)]
struct Assembler {
    project_id: String,
    max_bytes: usize,
    pending: Option<ManifestSnapshot>,
    bytes: usize,
    /// The commit being dropped since it broke the limit.
    over_limit: Option<String>,
}

impl Assembler {
    fn new(project_id: &str, max_bytes: usize) -> Self {
        Self {
            project_id: project_id.to_owned(),
            max_bytes,
            pending: None,
            bytes: 0,
            over_limit: None,
        }
    }

    fn receive(&mut self, message: Message) -> Received {
        match message {
            Message::Header(h) => {
                self.over_limit = None;
                self.bytes = 0;
                self.pending = Some(ManifestSnapshot {
                    project_id: h.project_id,
                    commit_id: h.commit_id,
                    files: Vec::new(),
                });
                Received::Nothing
            }
            Message::File(f) => {
                let Some(pending) = self.pending.as_mut() else {
                    return Received::Nothing;
                };
                self.bytes = self.bytes.saturating_add(f.data.len());
                if self.bytes > self.max_bytes {
                    let commit_id = pending.commit_id.clone();
                    self.pending = None;
                    self.over_limit = Some(commit_id.clone());
                    return Received::Refused(RefusedSnapshot {
                        message: format!(
                            "the manifests of project {} at commit {commit_id} exceed agentk's limit of {} bytes \
                             (at file {}); keeping the last snapshot",
                            self.project_id, self.max_bytes, f.path
                        ),
                        commit_id,
                    });
                }
                pending.files.push(ManifestFile::new(f.path, f.data));
                Received::Nothing
            }
            Message::Trailer(_) => match self.pending.take() {
                Some(snapshot) => Received::Snapshot(snapshot),
                None => Received::Nothing,
            },
            Message::Error(e) => {
                self.pending = None;
                Received::KasError {
                    commit_id: e.commit_id,
                    message: e.message,
                }
            }
            Message::Reconcile(r) => Received::Reconcile {
                commit_id: r.commit_id,
            },
        }
    }
}

/// Receives one entry's snapshots and publishes them into its slot.
struct Worker {
    service: KasChannel,
    project: ManifestProject,
    key: EntryKey,
    state: Arc<watch::Sender<GitopsState>>,
    max_snapshot_bytes: usize,
}

impl Worker {
    fn publish(&self, update: impl FnOnce(&mut ProjectSync)) {
        self.state.send_if_modified(|s| s.update(&self.key, update));
    }

    /// The commit of this entry's last snapshot, empty before the first: kas skips what the agent has.
    fn have(&self) -> String {
        self.state
            .borrow()
            .entry(&self.key)
            .and_then(|p| p.snapshot.as_ref().map(|s| s.commit_id.clone()))
            .unwrap_or_default()
    }

    async fn receive(&self, backoff: &mut Backoff) -> Result<(), tonic::Status> {
        let mut client = ManifestDeliveryClient::new(self.service.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let mut stream = client
            .get_objects_to_synchronize(request(&self.project, self.have()))
            .await?
            .into_inner();
        backoff.reset();
        let mut assembler = Assembler::new(&self.project.id, self.max_snapshot_bytes);
        while let Some(response) = stream.message().await? {
            let Some(message) = response.message else {
                continue;
            };
            match assembler.receive(message) {
                Received::Nothing => {}
                Received::Snapshot(snapshot) => {
                    info!(commit_id = %snapshot.commit_id, files = snapshot.files.len(), "received manifests");
                    let snapshot = Arc::new(snapshot);
                    self.publish(|p| {
                        p.snapshot = Some(snapshot);
                        p.error = None;
                        p.refused = None;
                    });
                }
                Received::Refused(refused) => {
                    error!(commit_id = %refused.commit_id, error = %refused.message, "refused a snapshot");
                    self.publish(|p| {
                        p.error = Some(refused.message.clone());
                        p.refused = Some(Arc::new(refused));
                    });
                }
                Received::KasError { commit_id, message } => {
                    warn!(commit_id = %commit_id, error = %message, "kas cannot deliver this project's manifests; keeping what is applied");
                    self.publish(|p| p.error = Some(message));
                }
                Received::Reconcile { commit_id } => {
                    info!(commit_id = %commit_id, "kas asked to sync now");
                    self.publish(|p| p.reconcile_requests += 1);
                }
            }
        }
        Ok(())
    }

    async fn run(self, cancel: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        while !cancel.is_cancelled() {
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                result = self.receive(&mut backoff) => result,
            };
            if let Err(status) = result {
                warn!(code = ?status.code(), error = status.message(), "manifest stream failed");
                if status.code() == tonic::Code::PermissionDenied {
                    self.publish(|p| p.error = Some(status.message().to_owned()));
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }
}

/// The result of applying one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectOutcome {
    /// e.g. `apps/Deployment/gitlab-kubernetes-agent/nginx-deployment`.
    pub resource_key: String,
    /// The object, when the document named one.
    pub key: Option<ObjectKey>,
    /// `file#document`.
    pub source: String,
    pub result: Outcome,
    /// kubectl's words, e.g. `deployment.apps/nginx-deployment configured`.
    pub sync_result: String,
    /// kstatus' verdict; `None` until known.
    pub health: Option<Health>,
    pub message: String,
    /// The API the object was applied through, to read it back (readiness); not reported.
    pub resource: Option<kube::discovery::ApiResource>,
}

impl ObjectOutcome {
    /// Failed, or not attempted because of a failure.
    pub fn is_failure(&self) -> bool {
        matches!(self.result, Outcome::Failed(_) | Outcome::Skipped(_))
    }
}

/// How one sync ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncResult {
    /// Every object applied.
    Synced,
    /// Some objects failed or were skipped (or the sync stopped half-way); nothing was pruned.
    Partial,
    /// Nothing applied.
    Failed,
}

/// The result of one sync of one manifest project.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncOutcome {
    pub objects: Vec<ObjectOutcome>,
    /// Errors not tied to one object (e.g. the cluster was unreachable).
    pub error: Option<String>,
}

impl SyncOutcome {
    pub fn result(&self) -> SyncResult {
        let failed = self.objects.iter().filter(|o| o.is_failure()).count();
        let nothing_applied = failed == self.objects.len();
        match (self.error.is_some(), failed) {
            (false, 0) => SyncResult::Synced,
            _ if nothing_applied => SyncResult::Failed,
            _ => SyncResult::Partial,
        }
    }

    fn count(&self, verb: &str) -> usize {
        self.objects
            .iter()
            .filter(|o| o.result.verb() == verb)
            .count()
    }

    fn health_count(&self, health: Health) -> usize {
        self.objects
            .iter()
            .filter(|o| o.health == Some(health))
            .count()
    }

    /// The first `n` errors, `resource_key: message`, for a log line.
    fn first_errors(&self, n: usize) -> String {
        self.error
            .iter()
            .cloned()
            .chain(
                self.objects
                    .iter()
                    .filter(|o| o.is_failure())
                    .map(|o| format!("{}: {}", o.resource_key, o.message)),
            )
            .take(n)
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// One sync to run.
#[derive(Debug, Clone, Copy)]
pub struct SyncRequest<'a> {
    /// The agent's id at kas (inventories are per agent).
    pub agent_id: i64,
    pub project: &'a ManifestProject,
    pub snapshot: &'a ManifestSnapshot,
    /// A periodic drift check (or a retry) of a commit already synced, not a new commit.
    pub recheck: bool,
    /// The commit was applied successfully before: whatever this sync writes had drifted.
    pub drift_check: bool,
}

/// What [`Applier`]'s and [`Reporter`]'s methods return.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Applies snapshots to the cluster. The engine implements it; agentk owns when it runs (only on the leader,
/// the newest snapshot only, cancelled when a newer commit arrives or leadership is lost) and the reporting.
pub trait Applier: Send + Sync + 'static {
    /// Applies the snapshot; each object's health is as the apply left it.
    fn apply<'a>(&'a self, request: SyncRequest<'a>) -> BoxFuture<'a, SyncOutcome>;

    /// Waits (up to the project's `reconcile_timeout`) for the applied objects to be ready, updating
    /// their health. Runs after the sync was reported, so kas knows what was applied without waiting.
    fn wait_for_readiness<'a>(
        &'a self,
        _project: &'a ManifestProject,
        _outcome: &'a mut SyncOutcome,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// Tells kas about syncs. A report that cannot be delivered is logged and dropped: the next sync reports
/// again.
pub trait Reporter: Send + Sync + 'static {
    fn report<'a>(&'a self, report: SyncReport) -> BoxFuture<'a, ()>;
}

/// Reports with `GitopsStatus.ReportSync`.
pub struct KasReporter(pub KasChannel);

impl Reporter for KasReporter {
    fn report<'a>(&'a self, report: SyncReport) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let mut client = GitopsStatusClient::new(self.0.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            if let Err(status) = client.report_sync(report).await {
                warn!(code = ?status.code(), error = status.message(), "could not report the sync to kas");
            }
        })
    }
}

/// The first retry of a sync that did not succeed comes after this long, doubling up to [`RETRY_MAX`].
pub const RETRY_INITIAL: Duration = Duration::from_secs(5);
pub const RETRY_MAX: Duration = Duration::from_secs(300);

/// When to retry a sync that did not succeed: exponential, without jitter (one agent, one schedule; the
/// cap keeps a broken project from being retried more than every five minutes).
#[derive(Debug, Clone)]
struct Retry {
    delay: Duration,
    at: Option<Instant>,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            delay: RETRY_INITIAL,
            at: None,
        }
    }
}

impl Retry {
    fn failed(&mut self, now: Instant) -> Duration {
        let delay = self.delay;
        self.at = Some(now + delay);
        self.delay = (self.delay * 2).min(RETRY_MAX);
        delay
    }

    fn reset(&mut self) {
        *self = Self::default();
    }
}

/// What one [`sync_loop`] needs.
pub struct SyncContext {
    /// The agent's id at kas (inventories are per agent).
    pub agent_id: i64,
    pub project: ManifestProject,
    /// The slot of the state this loop applies from.
    pub entry: EntryKey,
    pub applier: Arc<dyn Applier>,
    pub reporter: Arc<dyn Reporter>,
    /// See [`ApplySettings::resync`].
    pub resync: Duration,
    /// Counts finished syncs and remembers their commits for `/readyz`.
    pub metrics: Arc<AgentMetrics>,
}

/// What a sync loop remembers between syncs.
#[derive(Debug, Default)]
struct Progress {
    /// The commit of the last sync that succeeded, reported as `commit_applied`.
    commit_applied: String,
    /// The commit last synced (successfully or not): syncing it again is a re-check.
    commit_synced: String,
    /// The last refusal reported, so it is reported once.
    refusal_reported: Option<Arc<RefusedSnapshot>>,
    /// [`ProjectSync::reconcile_requests`] as of the last sync's start: requests up to it are served.
    reconcile_handled: u64,
    retry: Retry,
}

/// Why a sync did not run to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interrupted {
    Stopped,
    NewerSnapshot,
    LostLeadership,
}

/// Why the loop wakes up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Stop,
    Changed,
    Retry,
    Resync,
    /// kas asked to sync now.
    Reconcile,
}

fn slot(
    state: &GitopsState,
    entry: &EntryKey,
) -> (Option<Arc<ManifestSnapshot>>, Option<Arc<RefusedSnapshot>>) {
    state
        .entry(entry)
        .map(|p| (p.snapshot.clone(), p.refused.clone()))
        .unwrap_or_default()
}

/// How many reconcile requests the entry has received.
fn reconcile_requests(state: &GitopsState, entry: &EntryKey) -> u64 {
    state.entry(entry).map_or(0, |p| p.reconcile_requests)
}

/// Resolves when the entry's snapshot is no longer `commit`.
async fn newer_snapshot(mut rx: watch::Receiver<GitopsState>, entry: &EntryKey, commit: &str) {
    if rx
        .wait_for(|s| {
            slot(s, entry)
                .0
                .is_some_and(|snap| snap.commit_id != commit)
        })
        .await
        .is_err()
    {
        std::future::pending::<()>().await;
    }
}

/// Resolves when this replica stops leading. Without an election (one replica) nobody sends: a closed
/// channel keeps its last value, so it never resolves.
async fn lost_leadership(mut leading: watch::Receiver<bool>) {
    if leading.wait_for(|l| !*l).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Runs `work` unless it is interrupted first: by `cancel`, a newer snapshot of the entry, or the loss of
/// leadership (two replicas must never apply and prune at once).
async fn unless_interrupted<T>(
    work: impl std::future::Future<Output = T>,
    context: &SyncContext,
    commit: &str,
    state: &watch::Receiver<GitopsState>,
    leading: &watch::Receiver<bool>,
    cancel: &CancellationToken,
) -> Result<T, Interrupted> {
    tokio::select! {
        _ = cancel.cancelled() => Err(Interrupted::Stopped),
        _ = newer_snapshot(state.clone(), &context.entry, commit) => Err(Interrupted::NewerSnapshot),
        _ = lost_leadership(leading.clone()) => Err(Interrupted::LostLeadership),
        value = work => Ok(value),
    }
}

/// Applies each new snapshot of the entry while this replica leads, retries a sync that did not succeed
/// (5 s doubling to 5 min), re-checks the applied commit every `resync` to correct drift, and reports every
/// sync to kas: once applied, and again when readiness is known.
pub async fn sync_loop(
    context: SyncContext,
    mut state: watch::Receiver<GitopsState>,
    mut leading: watch::Receiver<bool>,
    cancel: CancellationToken,
) {
    let mut progress = Progress::default();
    loop {
        let (snapshot, refused) = slot(&state.borrow_and_update(), &context.entry);
        let is_leading = *leading.borrow_and_update();
        if !is_leading || snapshot.is_none() {
            // Nothing to sync here: a request now is served (a new leader or a first snapshot syncs anyway).
            progress.reconcile_handled = reconcile_requests(&state.borrow(), &context.entry);
        }
        if is_leading {
            if let Some(refused) = refused.filter(|r| progress.refusal_reported.as_ref() != Some(r))
            {
                report_refusal(&context, &progress, &refused).await;
                progress.refusal_reported = Some(refused);
            }
            if let Some(snapshot) = snapshot {
                match sync_once(
                    &context,
                    &snapshot,
                    &mut progress,
                    &state,
                    &leading,
                    &cancel,
                )
                .await
                {
                    Err(Interrupted::Stopped) => return,
                    Err(Interrupted::NewerSnapshot) => {
                        info!(commit_id = %snapshot.commit_id, "a newer commit arrived: cancelled the sync in flight");
                        continue;
                    }
                    Err(Interrupted::LostLeadership) => {
                        warn!(commit_id = %snapshot.commit_id, "lost the leadership: cancelled the sync in flight");
                    }
                    Ok(()) => {}
                }
            }
        }
        if wait_for_trigger(&context, &mut progress, &mut state, &mut leading, &cancel).await
            == Trigger::Stop
        {
            return;
        }
    }
}

/// One sync of `snapshot`: apply, log, report, wait for readiness, report again if health changed.
/// Schedules a retry when it did not succeed.
async fn sync_once(
    context: &SyncContext,
    snapshot: &ManifestSnapshot,
    progress: &mut Progress,
    state: &watch::Receiver<GitopsState>,
    leading: &watch::Receiver<bool>,
    cancel: &CancellationToken,
) -> Result<(), Interrupted> {
    let started = Instant::now();
    let new_commit = snapshot.commit_id != progress.commit_synced;
    if new_commit {
        progress.retry.reset();
    }
    let drift_check = snapshot.commit_id == progress.commit_applied;
    // Any sync from here on serves the requests received so far: it applies and checks every object.
    let requests = reconcile_requests(&state.borrow(), &context.entry);
    let reconcile = requests != progress.reconcile_handled;
    progress.reconcile_handled = requests;
    if reconcile {
        info!(commit_id = %snapshot.commit_id, "reconcile requested: syncing now");
    }
    let request = SyncRequest {
        agent_id: context.agent_id,
        project: &context.project,
        snapshot,
        // A sync somebody asked for is logged like a new commit's.
        recheck: !new_commit && !reconcile,
        drift_check,
    };
    let commit = snapshot.commit_id.as_str();
    let mut outcome = unless_interrupted(
        context.applier.apply(request),
        context,
        commit,
        state,
        leading,
        cancel,
    )
    .await?;
    progress.commit_synced = snapshot.commit_id.clone();
    context.metrics.sync_finished(FinishedSync {
        project: &context.project.id,
        outcome: &outcome,
        took: started.elapsed(),
        drift_check,
    });
    let result = outcome.result();
    if result == SyncResult::Synced {
        progress.commit_applied = snapshot.commit_id.clone();
        progress.retry.reset();
    } else {
        let delay = progress.retry.failed(Instant::now());
        info!(commit_id = %snapshot.commit_id, retry_in_ms = delay.as_millis() as u64, "the sync will be retried");
    }
    log_outcome(snapshot, &outcome, started);
    context
        .reporter
        .report(sync_report(context, snapshot, progress, &outcome))
        .await;
    context.metrics.sync_done(&context.entry, commit);
    let health_before: Vec<Option<Health>> = outcome.objects.iter().map(|o| o.health).collect();
    unless_interrupted(
        context
            .applier
            .wait_for_readiness(&context.project, &mut outcome),
        context,
        commit,
        state,
        leading,
        cancel,
    )
    .await?;
    if outcome.objects.iter().map(|o| o.health).ne(health_before) {
        info!(
            commit_id = %snapshot.commit_id,
            current = outcome.health_count(Health::Current),
            in_progress = outcome.health_count(Health::InProgress),
            failed = outcome.health_count(Health::Failed),
            took_ms = started.elapsed().as_millis() as u64,
            "Readiness"
        );
        context
            .reporter
            .report(sync_report(context, snapshot, progress, &outcome))
            .await;
    }
    Ok(())
}

/// The seed's log lines: one per object, then a summary that says how the sync ended. Only a sync in
/// which everything applied says `Cluster successfully synced`.
fn log_outcome(snapshot: &ManifestSnapshot, outcome: &SyncOutcome, started: Instant) {
    for object in &outcome.objects {
        match &object.result {
            Outcome::Failed(_) | Outcome::Skipped(_) => {
                warn!(resource_key = %object.resource_key, sync_result = %object.sync_result, source = %object.source, error = %object.message, "Sync failed")
            }
            Outcome::Kept(_) => {
                warn!(resource_key = %object.resource_key, sync_result = %object.sync_result, error = %object.message, "Not pruned")
            }
            // A periodic re-check repeats these for every object: not worth a line each at info.
            Outcome::Unchanged => {
                debug!(resource_key = %object.resource_key, sync_result = %object.sync_result, "Synced")
            }
            Outcome::Created | Outcome::Configured | Outcome::Pruned => {
                info!(resource_key = %object.resource_key, sync_result = %object.sync_result, "Synced")
            }
        }
    }
    macro_rules! summary {
        ($level:ident, $message:literal) => {
            tracing::$level!(
                commit_id = %snapshot.commit_id,
                outcome = ?outcome.result(),
                created = outcome.count("created"),
                configured = outcome.count("configured"),
                unchanged = outcome.count("unchanged"),
                pruned = outcome.count("pruned"),
                kept = outcome.count("kept"),
                failed = outcome.count("failed"),
                skipped = outcome.count("skipped"),
                errors = %outcome.first_errors(3),
                took_ms = started.elapsed().as_millis() as u64,
                $message
            )
        };
    }
    match outcome.result() {
        SyncResult::Synced => summary!(info, "Cluster successfully synced"),
        SyncResult::Partial => summary!(
            warn,
            "Cluster partially synced: some objects failed, nothing was pruned"
        ),
        SyncResult::Failed => summary!(error, "Cluster sync failed: nothing was applied"),
    }
}

/// Waits for a reason to sync again: a new snapshot (or refusal) of the entry, a leadership change, the
/// retry of a sync that did not succeed, or the drift-check period.
async fn wait_for_trigger(
    context: &SyncContext,
    progress: &mut Progress,
    state: &mut watch::Receiver<GitopsState>,
    leading: &mut watch::Receiver<bool>,
    cancel: &CancellationToken,
) -> Trigger {
    let seen = slot(&state.borrow(), &context.entry);
    let seen_commit = seen.0.as_ref().map(|s| s.commit_id.clone());
    // Zero: no periodic re-check (a year is as good as never, and cannot overflow).
    let period = if context.resync.is_zero() {
        Duration::from_secs(365 * 24 * 3600)
    } else {
        context.resync
    };
    let resync_at = Instant::now() + period;
    let retry_at = progress.retry.at;
    let mut leading_open = true;
    // A request that arrived while the last sync ran, after its start.
    if reconcile_requests(&state.borrow(), &context.entry) != progress.reconcile_handled {
        return Trigger::Reconcile;
    }
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Trigger::Stop,
            changed = state.changed() => {
                if changed.is_err() {
                    return Trigger::Stop;
                }
                // Other entries' updates and error reports are not a reason to apply again.
                let now = slot(&state.borrow(), &context.entry);
                if now.0.as_ref().map(|s| s.commit_id.clone()) != seen_commit || now.1 != seen.1 {
                    return Trigger::Changed;
                }
                if reconcile_requests(&state.borrow(), &context.entry) != progress.reconcile_handled {
                    return Trigger::Reconcile;
                }
            }
            changed = leading.changed(), if leading_open => match changed {
                Ok(()) => return Trigger::Changed,
                Err(_) => leading_open = false,
            },
            _ = tokio::time::sleep_until(retry_at.unwrap_or(resync_at)), if retry_at.is_some_and(|at| at < resync_at) => {
                progress.retry.at = None;
                return Trigger::Retry;
            }
            _ = tokio::time::sleep_until(resync_at) => return Trigger::Resync,
        }
    }
}

fn wire_result(outcome: &Outcome) -> ObjectResult {
    match outcome {
        Outcome::Created => ObjectResult::Created,
        Outcome::Configured => ObjectResult::Configured,
        Outcome::Unchanged => ObjectResult::Unchanged,
        Outcome::Pruned => ObjectResult::Pruned,
        Outcome::Failed(_) => ObjectResult::Failed,
        Outcome::Skipped(_) => ObjectResult::Skipped,
        Outcome::Kept(_) => ObjectResult::Kept,
    }
}

fn wire_health(health: Option<Health>) -> ObjectHealth {
    match health {
        None => ObjectHealth::Unspecified,
        Some(Health::Current) => ObjectHealth::Current,
        Some(Health::InProgress) => ObjectHealth::InProgress,
        Some(Health::Failed) => ObjectHealth::Failed,
        Some(Health::Terminating) => ObjectHealth::Terminating,
        Some(Health::NotFound) => ObjectHealth::NotFound,
        Some(Health::Unknown) => ObjectHealth::Unknown,
    }
}

fn wire_outcome(result: SyncResult) -> gitops_protocol::SyncOutcome {
    match result {
        SyncResult::Synced => gitops_protocol::SyncOutcome::Synced,
        SyncResult::Partial => gitops_protocol::SyncOutcome::Partial,
        SyncResult::Failed => gitops_protocol::SyncOutcome::Failed,
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// What kas is told about a sync of `snapshot`.
fn sync_report(
    context: &SyncContext,
    snapshot: &ManifestSnapshot,
    progress: &Progress,
    outcome: &SyncOutcome,
) -> SyncReport {
    SyncReport {
        project_id: context.project.id.clone(),
        commit_seen: snapshot.commit_id.clone(),
        commit_applied: progress.commit_applied.clone(),
        finished_at_unix: unix_now(),
        outcome: wire_outcome(outcome.result()).into(),
        message: outcome.error.clone().unwrap_or_default(),
        objects: outcome
            .objects
            .iter()
            .map(|o| ObjectStatus {
                resource_key: o.resource_key.clone(),
                source: o.source.clone(),
                result: wire_result(&o.result).into(),
                health: wire_health(o.health).into(),
                message: o.message.clone(),
            })
            .collect(),
    }
}

/// Tells kas that agentk refused the newest snapshot: nothing was applied from it.
async fn report_refusal(context: &SyncContext, progress: &Progress, refused: &RefusedSnapshot) {
    let report = SyncReport {
        project_id: context.project.id.clone(),
        commit_seen: refused.commit_id.clone(),
        commit_applied: progress.commit_applied.clone(),
        finished_at_unix: unix_now(),
        outcome: gitops_protocol::SyncOutcome::Failed.into(),
        message: refused.message.clone(),
        objects: Vec::new(),
    };
    context.reporter.report(report).await;
}

#[cfg(test)]
mod tests {
    use std::{
        collections::VecDeque,
        sync::{
            Mutex,
            atomic::{AtomicBool, Ordering},
        },
    };

    use gitops_protocol::{ManifestFile as WireFile, SnapshotHeader, SnapshotTrailer};

    use super::*;

    /// What the scripted applier does on each call, in order; after the script, it succeeds.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Step {
        Succeed,
        FailAnObject,
        FailWhole,
        /// Never finishes (a depends-on wait), until dropped.
        Hang,
    }

    #[derive(Default)]
    struct Scripted {
        steps: Mutex<VecDeque<Step>>,
        /// When each apply started (since the test's start) and for which commit.
        calls: Mutex<Vec<(Duration, String)>>,
        dropped: Arc<AtomicBool>,
        start: Mutex<Option<Instant>>,
    }

    struct SetOnDrop(Arc<AtomicBool>);
    impl Drop for SetOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    fn object(result: Outcome) -> ObjectOutcome {
        ObjectOutcome {
            resource_key: "/ConfigMap/default/a".into(),
            key: ObjectKey::from_resource_key("/ConfigMap/default/a"),
            source: "a.yaml#0".into(),
            sync_result: format!("configmap/a {}", result.verb()),
            result,
            health: None,
            message: String::new(),
            resource: None,
        }
    }

    impl Applier for Scripted {
        fn apply<'a>(&'a self, request: SyncRequest<'a>) -> BoxFuture<'a, SyncOutcome> {
            let start = self.start.lock().unwrap().expect("started");
            self.calls
                .lock()
                .unwrap()
                .push((start.elapsed(), request.snapshot.commit_id.clone()));
            let step = self
                .steps
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(Step::Succeed);
            let dropped = self.dropped.clone();
            Box::pin(async move {
                let _guard = SetOnDrop(dropped);
                match step {
                    Step::Succeed => SyncOutcome {
                        objects: vec![object(Outcome::Created)],
                        error: None,
                    },
                    Step::FailAnObject => SyncOutcome {
                        objects: vec![
                            object(Outcome::Created),
                            object(Outcome::Failed("refused".into())),
                        ],
                        error: None,
                    },
                    Step::FailWhole => SyncOutcome {
                        objects: Vec::new(),
                        error: Some("the apiserver is unreachable".into()),
                    },
                    Step::Hang => std::future::pending().await,
                }
            })
        }
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<SyncReport>>);

    impl Reporter for Recorder {
        fn report<'a>(&'a self, report: SyncReport) -> BoxFuture<'a, ()> {
            self.0.lock().unwrap().push(report);
            Box::pin(async {})
        }
    }

    fn project(paths: &[&str]) -> ManifestProject {
        let paths: Vec<_> = paths
            .iter()
            .map(|p| serde_json::json!({ "glob": p }))
            .collect();
        serde_json::from_value(serde_json::json!({ "id": "group/apps", "paths": paths })).unwrap()
    }

    fn snapshot(commit: &str) -> Arc<ManifestSnapshot> {
        Arc::new(ManifestSnapshot {
            project_id: "group/apps".into(),
            commit_id: commit.into(),
            files: vec![ManifestFile::new(
                "a.yaml".to_owned(),
                b"kind: ConfigMap\n".to_vec(),
            )],
        })
    }

    struct Loop {
        applier: Arc<Scripted>,
        reporter: Arc<Recorder>,
        state: watch::Sender<GitopsState>,
        leading: watch::Sender<bool>,
        entry: EntryKey,
        cancel: CancellationToken,
    }

    impl Loop {
        /// A sync loop for `group/apps` that leads, with `steps` scripted and the drift check every `resync`.
        fn start(steps: &[Step], resync: Duration) -> Self {
            let applier = Arc::new(Scripted::default());
            applier.steps.lock().unwrap().extend(steps);
            *applier.start.lock().unwrap() = Some(Instant::now());
            let reporter = Arc::new(Recorder::default());
            let project = project(&["*.yaml"]);
            let entry = EntryKey::of(&project);
            let mut initial = GitopsState::default();
            initial
                .entries
                .insert(entry.clone(), ProjectSync::default());
            let (state, state_rx) = watch::channel(initial);
            let (leading, leading_rx) = watch::channel(true);
            let cancel = CancellationToken::new();
            let context = SyncContext {
                agent_id: 1,
                project,
                entry: entry.clone(),
                applier: applier.clone(),
                reporter: reporter.clone(),
                resync,
                metrics: Arc::default(),
            };
            tokio::spawn(sync_loop(context, state_rx, leading_rx, cancel.clone()));
            Self {
                applier,
                reporter,
                state,
                leading,
                entry,
                cancel,
            }
        }

        fn publish(&self, commit: &str) {
            let snapshot = snapshot(commit);
            self.state.send_modify(|s| {
                s.update(&self.entry, |p| p.snapshot = Some(snapshot));
            });
        }

        fn call_times(&self) -> Vec<u64> {
            let calls = self.applier.calls.lock().unwrap();
            calls.iter().map(|(at, _)| at.as_secs()).collect()
        }

        fn outcomes(&self) -> Vec<gitops_protocol::SyncOutcome> {
            let reports = self.reporter.0.lock().unwrap();
            reports.iter().map(|r| r.outcome()).collect()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_sync_is_retried_with_backoff_from_5_s_to_5_min() {
        // Drift checks off: the retries are all there is.
        let steps = [Step::FailAnObject; 10];
        let l = Loop::start(&steps, Duration::ZERO);
        l.publish("c1");
        tokio::time::sleep(Duration::from_secs(30 * 60)).await;
        // 0, +5, +10, +20, +40, +80, +160, +300, +300, ...
        assert_eq!(
            l.call_times(),
            [0, 5, 15, 35, 75, 155, 315, 615, 915, 1215, 1515],
            "the 11th call succeeds; nothing after it"
        );
        let outcomes = l.outcomes();
        assert_eq!(outcomes.len(), 11);
        assert!(
            outcomes[..10]
                .iter()
                .all(|o| *o == gitops_protocol::SyncOutcome::Partial)
        );
        assert_eq!(outcomes[10], gitops_protocol::SyncOutcome::Synced);
        l.cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconcile_request_syncs_the_same_commit_at_once_and_restarts_the_drift_period() {
        let l = Loop::start(&[], Duration::from_secs(300));
        l.publish("c1");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(l.call_times(), [0]);
        l.state.send_modify(|s| {
            s.update(&l.entry, |p| p.reconcile_requests += 1);
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(l.call_times(), [0, 10], "synced at once, same commit");
        // The drift check comes a whole period after the reconcile, not after the first sync.
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert_eq!(l.call_times(), [0, 10, 310]);
        // A follower (or an entry without a snapshot) serves a request by doing nothing, and does not spin.
        l.leading.send_replace(false);
        tokio::time::sleep(Duration::from_secs(1)).await;
        l.state.send_modify(|s| {
            s.update(&l.entry, |p| p.reconcile_requests += 1);
        });
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert_eq!(l.call_times(), [0, 10, 310]);
        l.cancel.cancel();
    }

    #[test]
    fn a_reconcile_message_is_passed_on_between_snapshots() {
        let mut assembler = Assembler::new("group/apps", 1024);
        let reconcile = Message::Reconcile(gitops_protocol::ReconcileRequest {
            commit_id: "c1".into(),
        });
        assert_eq!(
            assembler.receive(reconcile),
            Received::Reconcile {
                commit_id: "c1".into()
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_whole_sync_error_is_retried_and_a_success_or_a_new_commit_resets_the_backoff() {
        use Step::*;
        let l = Loop::start(
            &[
                FailWhole,
                FailWhole,
                Succeed,
                FailAnObject,
                FailAnObject,
                FailWhole,
                FailWhole,
            ],
            Duration::from_secs(100),
        );
        l.publish("c1");
        tokio::time::sleep(Duration::from_secs(140)).await;
        // Fails at 0 and 5, succeeds at 15, drift check at 115 fails, retried at 120 (5 s again: reset) and 130.
        assert_eq!(l.call_times(), [0, 5, 15, 115, 120, 130]);
        // The next retry would be at 150; a new commit (at 140) is synced at once instead, and its failure
        // is retried after 5 s, not 40.
        l.publish("c2");
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(l.call_times(), [0, 5, 15, 115, 120, 130, 140, 145]);
        let reports = l.reporter.0.lock().unwrap().clone();
        assert_eq!(reports[0].outcome(), gitops_protocol::SyncOutcome::Failed);
        assert_eq!(reports[0].message, "the apiserver is unreachable");
        assert_eq!(reports[2].outcome(), gitops_protocol::SyncOutcome::Synced);
        // The failed sync of c2 reports c1 as the commit applied; the retry that succeeds, c2.
        assert_eq!(
            (
                reports[6].commit_seen.as_str(),
                reports[6].commit_applied.as_str()
            ),
            ("c2", "c1")
        );
        assert_eq!(reports[7].commit_applied, "c2");
        l.cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn losing_the_leadership_cancels_the_sync_in_flight() {
        let l = Loop::start(&[Step::Hang], Duration::from_secs(3600));
        l.publish("c1");
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(l.call_times(), [0]);
        assert!(!l.applier.dropped.load(Ordering::SeqCst), "still applying");
        l.leading.send_replace(false);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            l.applier.dropped.load(Ordering::SeqCst),
            "the apply kept running"
        );
        assert!(
            l.reporter.0.lock().unwrap().is_empty(),
            "a cancelled sync is not reported"
        );
        // A follower does not apply, retries included.
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(l.call_times(), [0]);
        // Leading again: synced at once.
        l.leading.send_replace(true);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(l.call_times(), [0, 660]);
        assert_eq!(l.outcomes(), [gitops_protocol::SyncOutcome::Synced]);
        l.cancel.cancel();
    }

    /// Readiness waits take up to `reconcile_timeout`; they stop with the leadership too.
    struct SlowReadiness(Arc<AtomicBool>);

    impl Applier for SlowReadiness {
        fn apply<'a>(&'a self, _: SyncRequest<'a>) -> BoxFuture<'a, SyncOutcome> {
            Box::pin(async {
                SyncOutcome {
                    objects: vec![object(Outcome::Created)],
                    error: None,
                }
            })
        }

        fn wait_for_readiness<'a>(
            &'a self,
            _: &'a ManifestProject,
            _: &'a mut SyncOutcome,
        ) -> BoxFuture<'a, ()> {
            let dropped = self.0.clone();
            Box::pin(async move {
                let _guard = SetOnDrop(dropped);
                std::future::pending().await
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn losing_the_leadership_stops_the_readiness_wait() {
        let dropped = Arc::new(AtomicBool::new(false));
        let project = project(&["*.yaml"]);
        let entry = EntryKey::of(&project);
        let mut initial = GitopsState::default();
        initial.entries.insert(
            entry.clone(),
            ProjectSync {
                snapshot: Some(snapshot("c1")),
                ..Default::default()
            },
        );
        let (_state, state_rx) = watch::channel(initial);
        let (leading, leading_rx) = watch::channel(true);
        let reporter = Arc::new(Recorder::default());
        let context = SyncContext {
            agent_id: 1,
            project,
            entry,
            applier: Arc::new(SlowReadiness(dropped.clone())),
            reporter: reporter.clone(),
            resync: Duration::ZERO,
            metrics: Arc::default(),
        };
        let cancel = CancellationToken::new();
        tokio::spawn(sync_loop(context, state_rx, leading_rx, cancel.clone()));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(reporter.0.lock().unwrap().len(), 1, "reported once applied");
        assert!(!dropped.load(Ordering::SeqCst));
        leading.send_replace(false);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            dropped.load(Ordering::SeqCst),
            "still waiting for readiness"
        );
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_sync_loop_applies_only_its_own_entrys_snapshots() {
        let l = Loop::start(&[], Duration::ZERO);
        // The same project with other paths: another entry (first in the map, as a lookup by project id
        // would find it), whose snapshot this loop must not apply.
        let other = EntryKey::of(&project(&["*"]));
        assert!(other < l.entry);
        l.state.send_modify(|s| {
            s.entries.insert(
                other.clone(),
                ProjectSync {
                    snapshot: Some(snapshot("c-other")),
                    ..Default::default()
                },
            );
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(
            l.call_times().is_empty(),
            "applied another entry's snapshot"
        );
        l.publish("c1");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let calls = l.applier.calls.lock().unwrap().clone();
        assert_eq!(
            calls,
            [(Duration::ZERO + Duration::from_secs(60), "c1".to_owned())]
        );
        l.cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_snapshot_is_reported_once_and_nothing_is_applied() {
        let l = Loop::start(&[], Duration::ZERO);
        let refused = Arc::new(RefusedSnapshot {
            commit_id: "c9".into(),
            message: "too big".into(),
        });
        l.state.send_modify(|s| {
            s.update(&l.entry, |p| p.refused = Some(refused.clone()));
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        l.state.send_modify(|s| {
            s.update(&l.entry, |p| p.error = Some("unrelated".into()));
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(l.call_times().is_empty());
        let reports = l.reporter.0.lock().unwrap().clone();
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert_eq!(reports[0].outcome(), gitops_protocol::SyncOutcome::Failed);
        assert_eq!(
            (reports[0].commit_seen.as_str(), reports[0].message.as_str()),
            ("c9", "too big")
        );
        l.cancel.cancel();
    }

    fn header(commit: &str) -> Message {
        Message::Header(SnapshotHeader {
            commit_id: commit.into(),
            project_id: "group/apps".into(),
        })
    }

    fn file(path: &str, bytes: usize) -> Message {
        Message::File(WireFile {
            path: path.into(),
            data: vec![b'x'; bytes],
        })
    }

    #[test]
    fn a_snapshot_over_the_size_limit_is_refused_by_name_and_the_next_one_taken() {
        let mut a = Assembler::new("group/apps", 100);
        assert_eq!(a.receive(header("c1")), Received::Nothing);
        assert_eq!(a.receive(file("a.yaml", 60)), Received::Nothing);
        let Received::Refused(refused) = a.receive(file("b.yaml", 41)) else {
            panic!("not refused")
        };
        assert_eq!(refused.commit_id, "c1");
        for part in ["group/apps", "c1", "limit of 100 bytes", "b.yaml"] {
            assert!(
                refused.message.contains(part),
                "{part}: {}",
                refused.message
            );
        }
        // The rest of the refused snapshot is dropped, the trailer publishes nothing.
        assert_eq!(a.receive(file("c.yaml", 10)), Received::Nothing);
        assert_eq!(
            a.receive(Message::Trailer(SnapshotTrailer {})),
            Received::Nothing
        );
        // The next commit fits.
        a.receive(header("c2"));
        a.receive(file("a.yaml", 100));
        let Received::Snapshot(snapshot) = a.receive(Message::Trailer(SnapshotTrailer {})) else {
            panic!("not published")
        };
        assert_eq!(
            (snapshot.commit_id.as_str(), snapshot.files.len()),
            ("c2", 1)
        );
    }

    #[test]
    fn sync_results_come_from_the_object_outcomes() {
        let outcome = |objects: Vec<Outcome>, error: Option<&str>| {
            SyncOutcome {
                objects: objects.into_iter().map(object).collect(),
                error: error.map(Into::into),
            }
            .result()
        };
        let failed = || Outcome::Failed("x".into());
        assert_eq!(outcome(vec![], None), SyncResult::Synced);
        assert_eq!(
            outcome(vec![Outcome::Created, Outcome::Kept("in use".into())], None),
            SyncResult::Synced
        );
        assert_eq!(
            outcome(vec![Outcome::Created, failed()], None),
            SyncResult::Partial
        );
        assert_eq!(
            outcome(vec![failed(), Outcome::Skipped("x".into())], None),
            SyncResult::Failed
        );
        assert_eq!(outcome(vec![], Some("unreachable")), SyncResult::Failed);
        assert_eq!(
            outcome(vec![Outcome::Pruned], Some("inventory write failed")),
            SyncResult::Partial
        );
    }

    #[test]
    fn a_changed_entry_is_a_new_key() {
        assert_eq!(
            EntryKey::of(&project(&["*.yaml"])),
            EntryKey::of(&project(&["*.yaml"]))
        );
        assert_ne!(
            EntryKey::of(&project(&["*.yaml"])),
            EntryKey::of(&project(&["b/*.yaml"]))
        );
        let mut tagged = project(&["*.yaml"]);
        tagged.reference = Some(GitRefConfig::Tag("v1".into()));
        assert_ne!(EntryKey::of(&project(&["*.yaml"])), EntryKey::of(&tagged));
    }
}
