//! `AgentInfo`, served to kas through the reverse tunnel: what this agent runs with right now.

use gitops_protocol::{GetInfoRequest, GetInfoResponse, agent_info_server::AgentInfo};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::{AgentState, VERSION};

pub struct AgentInfoService {
    pub state: watch::Receiver<AgentState>,
}

#[tonic::async_trait]
impl AgentInfo for AgentInfoService {
    async fn get_info(
        &self,
        _: Request<GetInfoRequest>,
    ) -> Result<Response<GetInfoResponse>, Status> {
        let state = self.state.borrow().clone();
        Ok(Response::new(GetInfoResponse {
            version: VERSION.to_owned(),
            config_commit_id: state.commit_id.clone(),
            log_level: state
                .config
                .as_ref()
                .map(|c| c.observability.logging.level.as_str())
                .unwrap_or("info")
                .to_owned(),
            agent_id: state.agent_id,
        }))
    }
}
