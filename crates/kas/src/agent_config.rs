//! `AgentConfiguration.GetConfiguration`: the agent's `config.yaml` from its project's default branch,
//! streamed whenever the commit changes. Invalid configuration is reported (to agentk, the log, and the
//! agent's status in GraphQL) and never replaces the last good one on the agent.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex, Weak},
};

use futures::Stream;
use gitops_config::{AgentConfig, agent::config_file_path};
use gitops_git::RepoCache;
use gitops_protocol::{
    AGENT_VERSION_HEADER, ConfigurationRequest, ConfigurationResponse,
    agent_configuration_server::{AgentConfiguration, AgentConfigurationServer},
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info, info_span, warn};

use crate::{
    KasState,
    auth::AgentIdentity,
    connections::ConnectionInfo,
    store::{ConfigStatus, Store, now},
    watch::{ProjectState, ProjectWatcher},
};

pub struct AgentConfigurationService {
    state: Arc<KasState>,
}

impl AgentConfigurationService {
    pub fn new(state: Arc<KasState>) -> Self {
        Self { state }
    }

    pub fn server(state: Arc<KasState>) -> AgentConfigurationServer<Self> {
        AgentConfigurationServer::new(Self::new(state))
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ConfigurationResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AgentConfiguration for AgentConfigurationService {
    type GetConfigurationStream = ResponseStream;

    async fn get_configuration(
        &self,
        request: Request<ConfigurationRequest>,
    ) -> Result<Response<Self::GetConfigurationStream>, Status> {
        let identity = request
            .extensions()
            .get::<AgentIdentity>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("no agent identity"))?;
        let transport = request.extensions().get::<gitops_tunnel::Scheme>().copied();
        let header_version = request
            .metadata()
            .get(AGENT_VERSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let request = request.into_inner();
        let meta = request.agent_meta.unwrap_or_default();
        let info = ConnectionInfo {
            token_id: identity.token_id,
            connected_at: now(),
            agent_version: if meta.version.is_empty() {
                header_version
            } else {
                meta.version
            },
            pod_namespace: meta.pod_namespace,
            pod_name: meta.pod_name,
        };
        // Taken before anything is sent: a token revoked since it was authenticated gets a cancelled switch.
        let revoked = self.state.connections.token_switch(identity.token_id);
        if revoked.is_cancelled() {
            return Err(Status::unauthenticated("agent token revoked"));
        }
        let (tx, rx) = mpsc::channel(4);
        let span = info_span!("agent_config", mod_name = "agent_configuration", agent_id = identity.agent_id, project_id = %identity.project_path);
        let state = self.state.clone();
        tokio::spawn(
            async move {
                info!(agent_version = %info.agent_version, "agent connected");
                let _connected = state.connections.register(identity.agent_id, info);
                let _transport = state.metrics.agent_connection(transport);
                stream_configuration(&state, &identity, request.commit_id, revoked, tx).await;
                info!("agent disconnected");
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

async fn stream_configuration(
    state: &KasState,
    identity: &AgentIdentity,
    mut last_sent: String,
    revoked: CancellationToken,
    tx: mpsc::Sender<Result<ConfigurationResponse, Status>>,
) {
    // The agent's configuration as kas tracks it: manifest authorisation reads the same one, and it is
    // updated before it is sent, so kas never refuses a project the agent was already told about.
    let tracker = state.agent_configs.track(state, identity);
    let mut config = tracker.subscribe();
    loop {
        let response = config.borrow_and_update().response.clone();
        if let Some(response) = response.filter(|r| r.commit_id != last_sent) {
            if response.error.is_empty() {
                info!(commit_id = %response.commit_id, "sending configuration");
            }
            last_sent = response.commit_id.clone();
            if tx.send(Ok(response)).await.is_err() {
                return;
            }
        }
        tokio::select! {
            changed = config.changed() => if changed.is_err() { return },
            _ = tx.closed() => return,
            _ = revoked.cancelled() => {
                info!("closing the configuration stream: its token was revoked");
                let _ = tx.send(Err(Status::unauthenticated("agent token revoked"))).await;
                return;
            }
        }
    }
}

/// What kas knows about one agent's configuration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrackedConfig {
    /// False until the first read of the configuration project finished, successfully or not.
    pub checked: bool,
    /// What the configuration stream sends for the newest commit read (valid or not).
    pub response: Option<ConfigurationResponse>,
    /// The last valid configuration: what agentk runs with, since it keeps its last good one.
    pub valid: Option<Arc<AgentConfig>>,
    /// Why the configuration cannot be read right now, or why the newest one is invalid.
    pub problem: Option<String>,
}

/// One task per agent reading its `config.yaml` whenever the configuration project moves; shared by the
/// agent's configuration stream(s) and its manifest streams. It stops when the last subscriber is gone.
#[derive(Debug)]
pub struct ConfigTracker {
    state: watch::Receiver<TrackedConfig>,
    stop: CancellationToken,
}

impl ConfigTracker {
    pub fn subscribe(&self) -> watch::Receiver<TrackedConfig> {
        self.state.clone()
    }
}

impl Drop for ConfigTracker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The [`ConfigTracker`] of each agent that has a stream open.
#[derive(Debug, Default)]
pub struct AgentConfigs {
    trackers: Mutex<HashMap<u64, Weak<ConfigTracker>>>,
}

impl AgentConfigs {
    /// The agent's tracker, started if nobody tracks it yet.
    pub fn track(&self, state: &KasState, identity: &AgentIdentity) -> Arc<ConfigTracker> {
        let mut trackers = self.trackers.lock().expect("trackers lock");
        if let Some(existing) = trackers.get(&identity.agent_id).and_then(Weak::upgrade) {
            return existing;
        }
        let (tx, rx) = watch::channel(TrackedConfig::default());
        let tracker = Arc::new(ConfigTracker {
            state: rx,
            stop: CancellationToken::new(),
        });
        let reader = ConfigReader {
            store: state.store.clone(),
            repos: state.watchers.repos().clone(),
            max_config_size: state.limits.max_config_size,
            identity: identity.clone(),
        };
        let watcher = state.watchers.watch(&identity.project_path);
        let span = info_span!("agent_config", mod_name = "agent_configuration", agent_id = identity.agent_id, project_id = %identity.project_path);
        tokio::spawn(track(reader, watcher, tx, tracker.stop.clone()).instrument(span));
        trackers.retain(|_, t| t.strong_count() > 0);
        trackers.insert(identity.agent_id, Arc::downgrade(&tracker));
        tracker
    }
}

/// How long a call waits for kas's first read of an agent's configuration.
pub const CONFIG_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl AgentConfigs {
    /// The agent's last valid configuration, waiting up to [`CONFIG_WAIT`] for the first read. Errors:
    /// `UNAVAILABLE` while Git cannot be read, `PERMISSION_DENIED` when there is no valid configuration.
    pub async fn current(
        &self,
        state: &KasState,
        identity: &AgentIdentity,
    ) -> Result<Arc<AgentConfig>, Status> {
        let tracker = self.track(state, identity);
        first_valid(&mut tracker.subscribe(), &identity.agent_name).await
    }

    /// `PERMISSION_DENIED` unless `project` is a `gitops.manifest_projects[].id` of the agent's current
    /// configuration: what agentk may report on or be served.
    pub async fn require_project(
        &self,
        state: &KasState,
        identity: &AgentIdentity,
        project: &str,
    ) -> Result<(), Status> {
        let config = self.current(state, identity).await?;
        if config
            .gitops
            .manifest_projects
            .iter()
            .any(|p| p.id == project)
        {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "project {project:?} is not a gitops.manifest_projects entry of agent {:?}'s config.yaml",
                identity.agent_name
            )))
        }
    }
}

/// Waits up to [`CONFIG_WAIT`] for kas's first read of the configuration `config` tracks, and returns the
/// last valid one.
pub async fn first_valid(
    config: &mut watch::Receiver<TrackedConfig>,
    agent_name: &str,
) -> Result<Arc<AgentConfig>, Status> {
    let read = tokio::time::timeout(CONFIG_WAIT, config.wait_for(|c| c.checked)).await;
    match read {
        Ok(Ok(tracked)) => tracked
            .valid
            .clone()
            .ok_or_else(|| no_configuration(&tracked)),
        _ => Err(Status::unavailable(format!(
            "kas has not read the configuration of agent {agent_name:?} yet; try again"
        ))),
    }
}

/// Neither a valid configuration nor one read yet: a Git failure is worth retrying, an invalid file is not
/// until it changes (agentk retries with backoff either way).
pub fn no_configuration(tracked: &TrackedConfig) -> Status {
    let problem = tracked.problem.clone().unwrap_or_default();
    if tracked.response.is_some() {
        Status::permission_denied(format!(
            "kas has no valid configuration for this agent, so it serves no manifests: {problem}"
        ))
    } else {
        Status::unavailable(format!(
            "kas cannot read this agent's configuration: {problem}"
        ))
    }
}

/// What reading one agent's configuration needs.
struct ConfigReader {
    store: Store,
    repos: RepoCache,
    max_config_size: usize,
    identity: AgentIdentity,
}

async fn track(
    reader: ConfigReader,
    watcher: Arc<ProjectWatcher>,
    tx: watch::Sender<TrackedConfig>,
    stop: CancellationToken,
) {
    let mut project = watcher.subscribe();
    let agent_id = reader.identity.agent_id;
    let mut last_read: Option<String> = None;
    let mut last_error = None;
    let mut project_failed = false;
    // The configuration error of the commit last read, if it was invalid.
    let mut read_error: Option<String> = None;
    loop {
        let current = project.borrow_and_update().clone();
        match current {
            ProjectState::Pending => {}
            ProjectState::Failed(error) => {
                if last_error.as_ref() != Some(&error) {
                    record_status(
                        &reader.store,
                        agent_id,
                        last_read.clone(),
                        Some(error.clone()),
                    );
                    last_error = Some(error.clone());
                }
                project_failed = true;
                tx.send_modify(|t| {
                    t.checked = true;
                    t.problem = Some(error);
                });
            }
            ProjectState::Commit(commit) if last_read.as_ref() != Some(&commit) => {
                project_failed = false;
                let (response, config) = read_configuration(&reader, &commit).await;
                if let Some(error) = Some(&response.error).filter(|e| !e.is_empty()) {
                    warn!(commit_id = %commit, error, "invalid agent configuration");
                }
                read_error = Some(response.error.clone()).filter(|e| !e.is_empty());
                record_status(
                    &reader.store,
                    agent_id,
                    Some(commit.clone()),
                    read_error.clone(),
                );
                last_error = read_error.clone();
                last_read = Some(commit);
                tx.send_modify(|t| {
                    t.checked = true;
                    t.response = Some(response);
                    t.problem = read_error.clone();
                    if let Some(config) = config {
                        t.valid = Some(Arc::new(config));
                    }
                });
            }
            ProjectState::Commit(commit) => {
                // Git is reachable again at the commit already read: clear a fetch error.
                if project_failed {
                    record_status(&reader.store, agent_id, Some(commit), read_error.clone());
                    last_error = read_error.clone();
                    project_failed = false;
                    tx.send_modify(|t| t.problem = read_error.clone());
                }
            }
        }
        tokio::select! {
            changed = project.changed() => if changed.is_err() { return },
            _ = stop.cancelled() => return,
        }
    }
}

/// Reads and validates the configuration at `commit`; errors go into the response's `error`.
async fn read_configuration(
    reader: &ConfigReader,
    commit: &str,
) -> (ConfigurationResponse, Option<AgentConfig>) {
    let identity = &reader.identity;
    let file = config_file_path(&identity.agent_name);
    let limit = reader.max_config_size;
    let result = match reader
        .repos
        .read_file(&identity.project_path, commit, &file, limit as u64)
        .await
    {
        Ok(None) => Ok(AgentConfig::default()),
        Ok(Some(bytes)) => AgentConfig::parse(&file, &bytes, limit).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let (config_json, error, config) = match result {
        Ok(config) => (config.to_json(), String::new(), Some(config)),
        Err(error) => (String::new(), error, None),
    };
    let response = ConfigurationResponse {
        commit_id: commit.to_owned(),
        config_json,
        error,
        agent_id: identity.agent_id as i64,
        project_path: identity.project_path.clone(),
        agent_name: identity.agent_name.clone(),
    };
    (response, config)
}

fn record_status(store: &Store, agent_id: u64, commit_id: Option<String>, error: Option<String>) {
    let status = ConfigStatus {
        commit_id,
        error,
        updated_at: now(),
    };
    if let Err(e) = store.set_config_status(agent_id, &status) {
        warn!(error = %e, "could not record the configuration status");
    }
}
