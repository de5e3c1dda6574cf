//! Keeps the agent's configuration current: holds `GetConfiguration` open, resumes by commit after a
//! reconnect, keeps the last good configuration when kas reports an invalid one, and applies the log level.

use std::{sync::Arc, time::Duration};

use gitops_config::AgentConfig;
use gitops_protocol::{
    AgentMeta, ConfigurationRequest, MAX_MESSAGE_BYTES,
    agent_configuration_client::AgentConfigurationClient,
};
use gitops_telemetry::LogHandle;
use gitops_tunnel::backoff::Backoff;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tracing::{info, warn};

use crate::{AgentOptions, KasChannel, VERSION};

/// The configuration the agent runs with.
#[derive(Debug, Clone, Default)]
pub struct AgentState {
    /// The configuration project's commit `config` came from; empty before the first configuration.
    pub commit_id: String,
    pub config: Option<Arc<AgentConfig>>,
    pub agent_id: i64,
    pub project_path: String,
    /// The last invalid configuration kas reported, if the newest commit is invalid.
    pub config_error: Option<String>,
    /// Whether the configuration stream is up now.
    pub connected: bool,
}

pub async fn run(
    service: KasChannel,
    options: AgentOptions,
    state: Arc<watch::Sender<AgentState>>,
    logs: Option<LogHandle>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    while !stop.is_cancelled() {
        let mut client = AgentConfigurationClient::new(service.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let request = ConfigurationRequest {
            commit_id: state.borrow().commit_id.clone(),
            agent_meta: Some(AgentMeta {
                version: VERSION.to_owned(),
                pod_namespace: options.pod_namespace.clone(),
                pod_name: options.pod_name.clone(),
            }),
        };
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            result = receive(&mut client, request, &state, logs.as_ref(), &mut backoff) => result,
        };
        state.send_modify(|s| s.connected = false);
        let delay = backoff.next_delay();
        match result {
            Err(status) if status.code() == Code::Unauthenticated => warn!(
                error = status.message(),
                retry_in_ms = delay.as_millis() as u64,
                "unauthenticated: kas refused the agent token"
            ),
            Err(status) => warn!(
                code = ?status.code(),
                error = status.message(),
                retry_in_ms = delay.as_millis() as u64,
                "configuration stream failed"
            ),
            Ok(()) => info!(
                retry_in_ms = delay.as_millis() as u64,
                "configuration stream closed by kas"
            ),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

async fn receive(
    client: &mut AgentConfigurationClient<KasChannel>,
    request: ConfigurationRequest,
    state: &watch::Sender<AgentState>,
    logs: Option<&LogHandle>,
    backoff: &mut Backoff,
) -> Result<(), tonic::Status> {
    let mut stream = client.get_configuration(request).await?.into_inner();
    state.send_modify(|s| s.connected = true);
    info!("connected to kas");
    backoff.reset();
    while let Some(message) = stream.message().await? {
        if !message.error.is_empty() {
            warn!(
                commit_id = %message.commit_id,
                project_id = %message.project_path,
                error = %message.error,
                "kas reports an invalid configuration; keeping the last good one"
            );
            state.send_modify(|s| s.config_error = Some(message.error.clone()));
            continue;
        }
        let config = match AgentConfig::from_json(&message.config_json) {
            Ok(config) => config,
            Err(e) => {
                // Only a kas newer than this agent could cause this; keep running on the last good one.
                warn!(commit_id = %message.commit_id, error = %e, "cannot read the configuration kas sent; keeping the last good one");
                continue;
            }
        };
        let logging = &config.observability.logging;
        if let Some(logs) = logs
            && let Err(e) = logs.set_levels(logging.level.as_str(), logging.grpc_level.as_str())
        {
            warn!(error = %e, "could not apply the log level");
        }
        info!(
            commit_id = %message.commit_id,
            project_id = %message.project_path,
            agent_id = message.agent_id,
            log_level = logging.level.as_str(),
            manifest_projects = config.gitops.manifest_projects.len(),
            "configuration updated"
        );
        state.send_modify(|s| {
            s.commit_id = message.commit_id.clone();
            s.config = Some(Arc::new(config));
            s.agent_id = message.agent_id;
            s.project_path = message.project_path.clone();
            s.config_error = None;
        });
    }
    Ok(())
}
