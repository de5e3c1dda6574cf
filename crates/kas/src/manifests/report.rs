//! `GitopsStatus.ReportSync`: agentk tells kas what each sync applied; kas keeps the latest per
//! (agent, manifest project) and shows it in GraphQL.

use std::sync::Arc;

use gitops_protocol::{
    SyncReport, SyncReportAck,
    gitops_status_server::{GitopsStatus, GitopsStatusServer},
};
use tonic::{Request, Response, Status};
use tracing::info;

use super::access::authorize;
use crate::{
    KasState,
    auth::AgentIdentity,
    store::{ObjectRecord, SyncRecord},
};

/// Most objects one report may carry; a larger manifest set is reported truncated, with a note.
pub const MAX_REPORTED_OBJECTS: usize = 20_000;

pub struct GitopsStatusService {
    state: Arc<KasState>,
}

impl GitopsStatusService {
    pub fn server(state: Arc<KasState>) -> GitopsStatusServer<Self> {
        GitopsStatusServer::new(Self { state })
    }
}

#[tonic::async_trait]
impl GitopsStatus for GitopsStatusService {
    async fn report_sync(
        &self,
        request: Request<SyncReport>,
    ) -> Result<Response<SyncReportAck>, Status> {
        let identity = request
            .extensions()
            .get::<AgentIdentity>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("no agent identity"))?;
        let report = request.into_inner();
        // An agent reports only on projects its config.yaml names and it may read: no rows for others.
        self.state
            .agent_configs
            .require_project(&self.state, &identity, &report.project_id)
            .await?;
        authorize(&self.state.store, &identity, &report.project_id)
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        let truncated = report.objects.len() > MAX_REPORTED_OBJECTS;
        let mut message = report.message;
        if truncated {
            message.push_str(&format!(
                " (only the first {MAX_REPORTED_OBJECTS} of {} objects are kept)",
                report.objects.len()
            ));
        }
        let record = SyncRecord {
            commit_seen: report.commit_seen,
            commit_applied: report.commit_applied,
            finished_at: report.finished_at_unix,
            outcome: report.outcome,
            message,
            objects: report
                .objects
                .into_iter()
                .take(MAX_REPORTED_OBJECTS)
                .map(|o| ObjectRecord {
                    resource_key: o.resource_key,
                    source: o.source,
                    result: o.result,
                    health: o.health,
                    message: o.message,
                })
                .collect(),
        };
        info!(
            mod_name = "gitops",
            agent_id = identity.agent_id,
            project_id = %report.project_id,
            commit_applied = %record.commit_applied,
            outcome = %record.outcome,
            objects = record.objects.len(),
            "sync reported"
        );
        self.state
            .store
            .set_sync_record(identity.agent_id, &report.project_id, &record)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(SyncReportAck {}))
    }
}
