//! `GitopsStatus.ReportSync`: agentk tells kas what each sync applied; kas keeps the latest per
//! (agent, manifest project) and shows it in GraphQL.

use std::sync::Arc;

use gitops_protocol::{
    MAX_MESSAGE_BYTES, ObjectHealth, ObjectResult as WireResult, SyncOutcome as WireOutcome,
    SyncReport, SyncReportAck,
    gitops_status_server::{GitopsStatus, GitopsStatusServer},
};
use tonic::{Request, Response, Status};
use tracing::info;

use super::access::authorize;
use crate::{
    KasState,
    auth::AgentIdentity,
    store::{self, Health, ObjectRecord, ObjectResult, SyncOutcome, SyncRecord},
};

/// Most objects one report may carry; a larger manifest set is reported truncated, with a note.
pub const MAX_REPORTED_OBJECTS: usize = 20_000;

/// A report may be dated at most this far past kas's clock (clock skew); later dates are clamped, so a bad
/// value cannot reach the formatters (a year past 9999 has no RFC 3339 form).
const MAX_FUTURE_SECONDS: i64 = 24 * 3600;

pub struct GitopsStatusService {
    state: Arc<KasState>,
}

impl GitopsStatusService {
    /// The service, accepting reports up to [`MAX_MESSAGE_BYTES`]: tonic's 4 MiB default refuses a report of
    /// a few thousand objects with error messages before [`MAX_REPORTED_OBJECTS`] could truncate it.
    pub fn server(state: Arc<KasState>) -> GitopsStatusServer<Self> {
        GitopsStatusServer::new(Self { state })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

fn outcome(wire: i32) -> Result<SyncOutcome, Status> {
    match WireOutcome::try_from(wire) {
        Ok(WireOutcome::Synced) => Ok(SyncOutcome::Synced),
        Ok(WireOutcome::Partial) => Ok(SyncOutcome::Partial),
        Ok(WireOutcome::Failed) => Ok(SyncOutcome::Failed),
        Ok(WireOutcome::Unspecified) | Err(_) => Err(Status::invalid_argument(format!(
            "SyncReport.outcome: {wire} is not a sync outcome (synced, partial or failed)"
        ))),
    }
}

fn object_result(wire: i32, resource_key: &str) -> Result<ObjectResult, Status> {
    Ok(match WireResult::try_from(wire) {
        Ok(WireResult::Created) => ObjectResult::Created,
        Ok(WireResult::Configured) => ObjectResult::Configured,
        Ok(WireResult::Unchanged) => ObjectResult::Unchanged,
        Ok(WireResult::Pruned) => ObjectResult::Pruned,
        Ok(WireResult::Failed) => ObjectResult::Failed,
        Ok(WireResult::Skipped) => ObjectResult::Skipped,
        Ok(WireResult::Kept) => ObjectResult::Kept,
        Ok(WireResult::Unspecified) | Err(_) => {
            return Err(Status::invalid_argument(format!(
                "SyncReport.objects[{resource_key}].result: {wire} is not an object result"
            )));
        }
    })
}

/// A health value this kas does not know (a newer agent) is recorded as Unknown rather than refused.
fn health(wire: i32) -> Option<Health> {
    match ObjectHealth::try_from(wire) {
        Ok(ObjectHealth::Unspecified) => None,
        Ok(ObjectHealth::Current) => Some(Health::Current),
        Ok(ObjectHealth::InProgress) => Some(Health::InProgress),
        Ok(ObjectHealth::Failed) => Some(Health::Failed),
        Ok(ObjectHealth::Terminating) => Some(Health::Terminating),
        Ok(ObjectHealth::NotFound) => Some(Health::NotFound),
        Ok(ObjectHealth::Unknown) | Err(_) => Some(Health::Unknown),
    }
}

/// The record kas keeps for `report`, received at `now` (Unix seconds).
fn record(report: SyncReport, now: i64) -> Result<SyncRecord, Status> {
    let truncated = report.objects.len() > MAX_REPORTED_OBJECTS;
    let mut message = report.message;
    if truncated {
        message.push_str(&format!(
            " (only the first {MAX_REPORTED_OBJECTS} of {} objects are kept)",
            report.objects.len()
        ));
    }
    let objects = report
        .objects
        .into_iter()
        .take(MAX_REPORTED_OBJECTS)
        .map(|o| {
            Ok(ObjectRecord {
                result: object_result(o.result, &o.resource_key)?,
                health: health(o.health),
                resource_key: o.resource_key,
                source: o.source,
                message: o.message,
            })
        })
        .collect::<Result<_, Status>>()?;
    Ok(SyncRecord {
        commit_seen: report.commit_seen,
        commit_applied: report.commit_applied,
        finished_at: report
            .finished_at_unix
            .clamp(0, now.saturating_add(MAX_FUTURE_SECONDS)),
        outcome: outcome(report.outcome)?,
        message,
        objects,
    })
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
        let project_id = report.project_id.clone();
        let record = record(report, store::now())?;
        info!(
            mod_name = "gitops",
            agent_id = identity.agent_id,
            project_id = %project_id,
            commit_applied = %record.commit_applied,
            outcome = ?record.outcome,
            objects = record.objects.len(),
            "sync reported"
        );
        self.state.metrics.sync_reported(record.outcome);
        self.state
            .store
            .set_sync_record(identity.agent_id, &project_id, &record)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        self.state
            .reconciles
            .reported(identity.agent_id, &project_id);
        Ok(Response::new(SyncReportAck {}))
    }
}

#[cfg(test)]
mod tests {
    use gitops_protocol::ObjectStatus;

    use super::*;

    fn report(outcome: WireOutcome, finished_at_unix: i64) -> SyncReport {
        SyncReport {
            project_id: "g/p".into(),
            finished_at_unix,
            outcome: outcome.into(),
            objects: vec![ObjectStatus {
                resource_key: "/ConfigMap/default/a".into(),
                result: WireResult::Kept.into(),
                health: ObjectHealth::InProgress.into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn dates_far_in_the_future_are_clamped_to_a_day_ahead() {
        let now = 1_700_000_000;
        let r = record(report(WireOutcome::Synced, i64::MAX), now).unwrap();
        assert_eq!(r.finished_at, now + MAX_FUTURE_SECONDS);
        assert_eq!(
            record(report(WireOutcome::Synced, i64::MIN), now)
                .unwrap()
                .finished_at,
            0
        );
        assert_eq!(
            record(report(WireOutcome::Synced, now - 5), now)
                .unwrap()
                .finished_at,
            now - 5
        );
    }

    #[test]
    fn typed_values_are_kept_and_unset_ones_refused_by_name() {
        let r = record(report(WireOutcome::Partial, 0), 0).unwrap();
        assert_eq!(r.outcome, SyncOutcome::Partial);
        assert_eq!(r.objects[0].result, ObjectResult::Kept);
        assert_eq!(r.objects[0].health, Some(Health::InProgress));
        let unset = record(report(WireOutcome::Unspecified, 0), 0).unwrap_err();
        assert!(unset.message().contains("SyncReport.outcome"), "{unset:?}");
        let mut bad = report(WireOutcome::Synced, 0);
        bad.objects[0].result = 99;
        let refused = record(bad, 0).unwrap_err();
        assert!(
            refused.message().contains("/ConfigMap/default/a"),
            "{refused:?}"
        );
        let mut newer = report(WireOutcome::Synced, 0);
        newer.objects[0].health = 99;
        assert_eq!(
            record(newer, 0).unwrap().objects[0].health,
            Some(Health::Unknown)
        );
    }
}
