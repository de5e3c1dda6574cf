//! One audit record per proxied request, written when the request ends (a watch's or an exec session's
//! when its stream closes): a structured log line at once, and the same record in the store, written in
//! batches by one task so that requests never wait for the disk.

use std::{sync::Arc, time::Instant};

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::request::RequestInfo;
use crate::{
    k8s_proxy::auth::Caller,
    metrics::ProxyMetrics,
    store::{
        Store,
        audit::{AuditCaller, AuditRecord},
    },
};

/// Records waiting for the store; beyond this they are only logged (and the drop is warned about).
const QUEUE: usize = 4096;
/// Records per write transaction at most.
const BATCH: usize = 256;

/// Hands records to the store writer.
#[derive(Debug, Clone)]
pub struct AuditLog {
    queue: mpsc::Sender<AuditRecord>,
    /// Every request ends in a ticket's drop: the request metrics are counted there too.
    metrics: ProxyMetrics,
}

impl AuditLog {
    /// Starts the writer, which keeps `keep` records per agent and stops once every sender is gone.
    pub fn start(store: Store, keep: usize, metrics: ProxyMetrics) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_batches(store, keep, rx));
        Self { queue, metrics }
    }

    fn submit(&self, record: AuditRecord) {
        if let Err(e) = self.queue.try_send(record) {
            warn!(
                agent_id = e.into_inner().agent_id,
                "the proxy's audit queue is full: a record was logged but not stored"
            );
        }
    }
}

async fn write_batches(store: Store, keep: usize, mut rx: mpsc::Receiver<AuditRecord>) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let records = std::mem::take(&mut batch);
        let store = store.clone();
        let written =
            tokio::task::spawn_blocking(move || store.append_proxy_audit(&records, keep)).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "could not store the proxy's audit records"),
            Err(e) => warn!(error = %e, "storing the proxy's audit records failed"),
        }
    }
}

/// Who the record is about, known once the request is authorised.
#[derive(Debug, Clone)]
pub struct Subject {
    pub agent_id: u64,
    pub caller: Caller,
}

/// One request's record in the making; logged and stored when dropped, so every way a request ends (an
/// answer, a refusal, the client leaving, a revocation) leaves exactly one.
#[derive(Debug)]
pub struct AuditTicket {
    log: AuditLog,
    started: Instant,
    at: i64,
    info: Arc<RequestInfo>,
    subject: Option<Subject>,
    status: u16,
    /// How the request ended, for the log line (`complete`, `revoked`, `agent closed`, …).
    pub ended: &'static str,
}

impl AuditTicket {
    pub fn new(log: AuditLog, info: Arc<RequestInfo>) -> Self {
        log.metrics.started();
        Self {
            log,
            started: Instant::now(),
            at: crate::store::now(),
            info,
            subject: None,
            status: 0,
            ended: "complete",
        }
    }

    pub fn subject(&mut self, subject: Subject) {
        self.subject = Some(subject);
    }

    pub fn status(&mut self, status: u16) {
        self.status = status;
    }
}

impl Drop for AuditTicket {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        let duration_ms = elapsed.as_millis() as u64;
        let info = &self.info;
        self.log
            .metrics
            .ended(info.verb.as_str(), self.status, elapsed);
        let Some(subject) = self.subject.take() else {
            // Refused before kas knew who it was: no agent to file it under; the log line is the record.
            info!(
                verb = info.verb.as_str(),
                resource = info.resource.as_deref(),
                status = self.status,
                duration_ms,
                "k8s proxy request refused before authentication"
            );
            return;
        };
        let caller = match subject.caller {
            Caller::CiJob {
                token_id,
                project,
                environment,
            } => AuditCaller::CiJob {
                token_id,
                project,
                environment,
            },
            Caller::User { username } => AuditCaller::User { username },
        };
        let (caller_kind, token_id, project, environment, username) = match &caller {
            AuditCaller::CiJob {
                token_id,
                project,
                environment,
            } => (
                "ci_job",
                Some(*token_id),
                Some(project.as_str()),
                environment.as_deref(),
                None,
            ),
            AuditCaller::User { username } => ("user", None, None, None, Some(username.as_str())),
        };
        info!(
            target: "kas::k8s_proxy::audit",
            agent_id = subject.agent_id,
            caller = caller_kind,
            token_id,
            project,
            environment,
            username,
            verb = info.verb.as_str(),
            resource = info.resource.as_deref(),
            subresource = info.subresource.as_deref(),
            namespace = info.namespace.as_deref(),
            name = info.name.as_deref(),
            status = self.status,
            duration_ms,
            ended = self.ended,
            "k8s proxy request"
        );
        self.log.submit(AuditRecord {
            agent_id: subject.agent_id,
            at: self.at,
            caller,
            verb: info.verb,
            resource: info.resource.clone(),
            subresource: info.subresource.clone(),
            namespace: info.namespace.clone(),
            name: info.name.clone(),
            status_code: self.status,
            duration_ms,
        });
    }
}
