//! `AgentConfiguration.GetConfiguration`: the agent's `config.yaml` from its project's default branch,
//! streamed whenever the commit changes. Invalid configuration is reported (to agentk, the log, and the
//! agent's status in GraphQL) and never replaces the last good one on the agent.

use std::{pin::Pin, sync::Arc};

use futures::Stream;
use gitops_config::{AgentConfig, agent::config_file_path};
use gitops_protocol::{
    AGENT_VERSION_HEADER, ConfigurationRequest, ConfigurationResponse,
    agent_configuration_server::{AgentConfiguration, AgentConfigurationServer},
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info, info_span, warn};

use crate::{
    KasState,
    auth::AgentIdentity,
    connections::ConnectionInfo,
    store::{ConfigStatus, now},
    watch::ProjectState,
};

pub struct AgentConfigurationService {
    state: Arc<KasState>,
}

impl AgentConfigurationService {
    pub fn server(state: Arc<KasState>) -> AgentConfigurationServer<Self> {
        AgentConfigurationServer::new(Self { state })
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
        let (tx, rx) = mpsc::channel(4);
        let span = info_span!("agent_config", mod_name = "agent_configuration", agent_id = identity.agent_id, project_id = %identity.project_path);
        let state = self.state.clone();
        tokio::spawn(
            async move {
                info!(agent_version = %info.agent_version, "agent connected");
                let _connected = state.connections.register(identity.agent_id, info);
                stream_configuration(&state, &identity, request.commit_id, tx).await;
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
    tx: mpsc::Sender<Result<ConfigurationResponse, Status>>,
) {
    let revoked = state.connections.token_switch(identity.token_id);
    let watcher = state.watchers.watch(&identity.project_path);
    let mut project = watcher.subscribe();
    let mut last_error = None;
    let mut project_failed = false;
    // The configuration error of the commit last sent, if it was invalid.
    let mut sent_error: Option<String> = None;
    loop {
        let current = project.borrow_and_update().clone();
        match current {
            ProjectState::Pending => {}
            ProjectState::Failed(error) => {
                if last_error.as_ref() != Some(&error) {
                    let commit = Some(last_sent.clone()).filter(|c| !c.is_empty());
                    record_status(state, identity.agent_id, commit, Some(error.clone()));
                    last_error = Some(error);
                }
                project_failed = true;
            }
            ProjectState::Commit(commit) if commit != last_sent => {
                project_failed = false;
                let response = read_configuration(state, identity, &commit).await;
                match &response.error[..] {
                    "" => {
                        info!(commit_id = %commit, "sending configuration");
                        record_status(state, identity.agent_id, Some(commit.clone()), None);
                        last_error = None;
                    }
                    error => {
                        warn!(commit_id = %commit, error, "invalid agent configuration");
                        record_status(
                            state,
                            identity.agent_id,
                            Some(commit.clone()),
                            Some(error.to_owned()),
                        );
                        last_error = Some(error.to_owned());
                    }
                }
                sent_error = Some(response.error.clone()).filter(|e| !e.is_empty());
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
                last_sent = commit;
            }
            ProjectState::Commit(commit) => {
                // Git is reachable again at the commit the agent already has: clear a fetch error.
                if project_failed {
                    record_status(state, identity.agent_id, Some(commit), sent_error.clone());
                    last_error = sent_error.clone();
                    project_failed = false;
                }
            }
        }
        tokio::select! {
            changed = project.changed() => if changed.is_err() { return },
            _ = tx.closed() => return,
            _ = revoked.cancelled() => {
                info!("closing the configuration stream: its token was revoked");
                let _ = tx.send(Err(Status::unauthenticated("agent token revoked"))).await;
                return;
            }
        }
    }
}

/// Reads and validates the configuration at `commit`; errors go into the response's `error`.
async fn read_configuration(
    state: &KasState,
    identity: &AgentIdentity,
    commit: &str,
) -> ConfigurationResponse {
    let file = config_file_path(&identity.agent_name);
    let limit = state.limits.max_config_size;
    let result = match state
        .watchers
        .repos()
        .read_file(&identity.project_path, commit, &file, limit as u64)
        .await
    {
        Ok(None) => Ok(AgentConfig::default()),
        Ok(Some(bytes)) => AgentConfig::parse(&file, &bytes, limit).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let (config_json, error) = match result {
        Ok(config) => (config.to_json(), String::new()),
        Err(error) => (String::new(), error),
    };
    ConfigurationResponse {
        commit_id: commit.to_owned(),
        config_json,
        error,
        agent_id: identity.agent_id as i64,
        project_path: identity.project_path.clone(),
        agent_name: identity.agent_name.clone(),
    }
}

fn record_status(
    state: &KasState,
    agent_id: u64,
    commit_id: Option<String>,
    error: Option<String>,
) {
    let status = ConfigStatus {
        commit_id,
        error,
        updated_at: now(),
    };
    if let Err(e) = state.store.set_config_status(agent_id, &status) {
        warn!(error = %e, "could not record the configuration status");
    }
}
