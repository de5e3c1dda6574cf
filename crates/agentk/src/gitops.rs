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
use gitops_engine::ManifestFile;
use gitops_protocol::{
    ObjectsToSynchronizeRequest, PathSelector, manifest_delivery_client::ManifestDeliveryClient,
    objects_to_synchronize_request::Ref, objects_to_synchronize_response::Message,
    path_selector::Selector,
};
use gitops_tunnel::backoff::Backoff;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{AgentState, KasChannel};

/// One complete set of manifest files at one commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestSnapshot {
    pub project_id: String,
    pub commit_id: String,
    /// Sorted by path.
    pub files: Vec<ManifestFile>,
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

pub async fn run(
    service: KasChannel,
    mut config: watch::Receiver<AgentState>,
    state: Arc<watch::Sender<GitopsState>>,
    apply: Option<ApplySettings>,
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
        state.send_if_modified(|s| {
            let before = s.len();
            s.retain(|id, _| ids.contains(&id.as_str()));
            s.len() != before
        });
        for (key, project) in keyed {
            if workers.contains_key(&key) {
                continue;
            }
            let cancel = stop.child_token();
            let span = info_span!("gitops", mod_name = "gitops", project_id = %project.id);
            if let Some(apply) = &apply {
                let agent_id = config.borrow().agent_id;
                let sync = sync_loop(
                    service.clone(),
                    agent_id,
                    project.clone(),
                    state.subscribe(),
                    apply.clone(),
                    cancel.clone(),
                );
                tokio::spawn(sync.instrument(span.clone()));
            }
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
                            p.files.push(ManifestFile::new(f.path, f.data));
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

/// The result of applying one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectOutcome {
    /// e.g. `apps/Deployment/gitlab-kubernetes-agent/nginx-deployment`.
    pub resource_key: String,
    /// `file#document`.
    pub source: String,
    /// created, configured, unchanged, pruned, failed, skipped.
    pub result: String,
    /// kubectl's words, e.g. `deployment.apps/nginx-deployment configured`.
    pub sync_result: String,
    /// kstatus' status name; empty until known.
    pub health: String,
    pub message: String,
    /// The API the object was applied through, to read it back (readiness); not reported.
    pub resource: Option<kube::discovery::ApiResource>,
}

/// The result of one sync of one manifest project.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncOutcome {
    pub objects: Vec<ObjectOutcome>,
    /// Errors not tied to one object (e.g. the cluster was unreachable).
    pub error: Option<String>,
}

impl SyncOutcome {
    fn failed_objects(&self) -> usize {
        self.objects
            .iter()
            .filter(|o| o.result == "failed" || o.result == "skipped")
            .count()
    }

    /// `synced`, `partial` or `failed`.
    pub fn outcome(&self) -> &'static str {
        match (self.error.is_some(), self.failed_objects()) {
            (false, 0) => "synced",
            (true, _)
                if self
                    .objects
                    .iter()
                    .all(|o| o.result == "failed" || o.result == "skipped") =>
            {
                "failed"
            }
            _ => "partial",
        }
    }
}

/// One sync to run.
#[derive(Debug, Clone, Copy)]
pub struct SyncRequest<'a> {
    /// The agent's id at kas (inventories are per agent).
    pub agent_id: i64,
    pub project: &'a ManifestProject,
    pub snapshot: &'a ManifestSnapshot,
    /// A periodic drift check of a commit already applied, not a new commit.
    pub recheck: bool,
}

/// What [`Applier`]'s methods return.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Applies snapshots to the cluster. The engine implements it; agentk owns when it runs (only on the leader,
/// the newest snapshot only, cancelled when a newer commit arrives) and the reporting to kas.
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

fn snapshot_of(state: &GitopsState, project: &str) -> Option<Arc<ManifestSnapshot>> {
    state.get(project)?.snapshot.clone()
}

/// Resolves when `project`'s snapshot is no longer `commit`.
async fn newer_snapshot(rx: &mut watch::Receiver<GitopsState>, project: &str, commit: &str) {
    let _ = rx
        .wait_for(|s| snapshot_of(s, project).is_some_and(|snap| snap.commit_id != commit))
        .await;
}

/// Applies each new snapshot of `project` while this replica leads, re-checks it every `resync` to correct
/// drift, and reports every sync to kas: once applied, and again when readiness is known.
pub async fn sync_loop(
    service: KasChannel,
    agent_id: i64,
    project: ManifestProject,
    mut state: watch::Receiver<GitopsState>,
    settings: ApplySettings,
    cancel: CancellationToken,
) {
    let mut commit_applied = String::new();
    // The commit last synced (successfully or not): syncing it again is a periodic re-check.
    let mut commit_synced = String::new();
    let ApplySettings {
        applier,
        mut leading,
        resync,
    } = settings;
    let mut leading_open = true;
    loop {
        let snapshot = snapshot_of(&state.borrow_and_update(), &project.id);
        if let Some(snapshot) = snapshot.filter(|_| *leading.borrow()) {
            let started = std::time::Instant::now();
            let mut watch_newer = state.clone();
            let outcome = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = newer_snapshot(&mut watch_newer, &project.id, &snapshot.commit_id) => {
                    info!(commit_id = %snapshot.commit_id, "a newer commit arrived: cancelled the sync in flight");
                    continue;
                }
                outcome = applier.apply(SyncRequest {
                    agent_id,
                    project: &project,
                    snapshot: &snapshot,
                    recheck: snapshot.commit_id == commit_synced,
                }) => outcome,
            };
            commit_synced = snapshot.commit_id.clone();
            for object in &outcome.objects {
                if object.result == "failed" || object.result == "skipped" {
                    warn!(resource_key = %object.resource_key, sync_result = %object.sync_result, source = %object.source, error = %object.message, "Sync failed");
                } else if object.result == "unchanged" {
                    // A periodic re-check repeats these for every object: not worth a line each at info.
                    debug!(resource_key = %object.resource_key, sync_result = %object.sync_result, "Synced");
                } else {
                    info!(resource_key = %object.resource_key, sync_result = %object.sync_result, "Synced");
                }
            }
            if outcome.outcome() == "synced" {
                commit_applied = snapshot.commit_id.clone();
            }
            let counts = |r: &str| outcome.objects.iter().filter(|o| o.result == r).count();
            info!(
                commit_id = %snapshot.commit_id,
                outcome = outcome.outcome(),
                created = counts("created"),
                configured = counts("configured"),
                unchanged = counts("unchanged"),
                pruned = counts("pruned"),
                failed = counts("failed"),
                skipped = counts("skipped"),
                took_ms = started.elapsed().as_millis() as u64,
                "Cluster successfully synced"
            );
            report(&service, &project, &snapshot, &commit_applied, &outcome).await;
            let mut outcome = outcome;
            let health_before: Vec<String> =
                outcome.objects.iter().map(|o| o.health.clone()).collect();
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = newer_snapshot(&mut watch_newer, &project.id, &snapshot.commit_id) => {
                    info!(commit_id = %snapshot.commit_id, "a newer commit arrived: stopped waiting for readiness");
                    continue;
                }
                () = applier.wait_for_readiness(&project, &mut outcome) => {}
            }
            if outcome
                .objects
                .iter()
                .map(|o| &o.health)
                .ne(health_before.iter())
            {
                let health = |h: &str| outcome.objects.iter().filter(|o| o.health == h).count();
                info!(
                    commit_id = %snapshot.commit_id,
                    current = health("Current"),
                    in_progress = health("InProgress"),
                    failed = health("Failed"),
                    took_ms = started.elapsed().as_millis() as u64,
                    "Readiness"
                );
                report(&service, &project, &snapshot, &commit_applied, &outcome).await;
            }
        }
        // Wait for a reason to sync: a new snapshot of this project, a leadership change, or the resync period.
        let synced = snapshot_of(&state.borrow(), &project.id).map(|s| s.commit_id.clone());
        // Zero: no periodic re-check (a year is as good as never, and cannot overflow).
        let period = if resync.is_zero() {
            Duration::from_secs(365 * 24 * 3600)
        } else {
            resync
        };
        let resync_at = tokio::time::Instant::now() + period;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = state.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // Other projects' updates and error reports are not a reason to apply again.
                    if snapshot_of(&state.borrow(), &project.id).map(|s| s.commit_id.clone()) != synced {
                        break;
                    }
                }
                // Without an election (one replica) nobody sends: a closed channel keeps its last value.
                changed = leading.changed(), if leading_open => match changed {
                    Ok(()) => break,
                    Err(_) => leading_open = false,
                },
                _ = tokio::time::sleep_until(resync_at) => break,
            }
        }
    }
}

async fn report(
    service: &KasChannel,
    project: &ManifestProject,
    snapshot: &ManifestSnapshot,
    commit_applied: &str,
    outcome: &SyncOutcome,
) {
    use gitops_protocol::{ObjectStatus, SyncReport, gitops_status_client::GitopsStatusClient};
    let finished = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let report = SyncReport {
        project_id: project.id.clone(),
        commit_seen: snapshot.commit_id.clone(),
        commit_applied: commit_applied.to_owned(),
        finished_at_unix: finished,
        outcome: outcome.outcome().to_owned(),
        message: outcome.error.clone().unwrap_or_default(),
        objects: outcome
            .objects
            .iter()
            .map(|o| ObjectStatus {
                resource_key: o.resource_key.clone(),
                source: o.source.clone(),
                result: o.result.clone(),
                health: o.health.clone(),
                message: o.message.clone(),
            })
            .collect(),
    };
    if let Err(status) = GitopsStatusClient::new(service.clone())
        .report_sync(report)
        .await
    {
        warn!(code = ?status.code(), error = status.message(), "could not report the sync to kas");
    }
}
