//! Forwarding to Alertmanager and the webhook, from one background task.
//!
//! The RPC only marks alerts pending ([`Pending`], a set bounded by the alerts stored) and returns. The task
//! reads each pending alert from the store and posts it to every sink when it is new, re-fired or resolved
//! by an admin, and again when its count moved, at most every `alerts.resend_interval`. A failed post keeps
//! the alerts pending and is retried with doubling backoff (1 s to 60 s); the error goes to the log,
//! `kas_network_alerts_forwarded_total{result="error"}` and the agent's GraphQL status. After a restart
//! every firing alert is posted once again: Alertmanager merges it with what it has by labels.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{now_ms, payload};
use crate::{
    KasState,
    store::{AgentRecord, network_alerts::NetworkAlertRecord},
};

/// Alerts to look at, as (agent id, alert id).
#[derive(Debug, Default)]
pub struct Pending {
    set: Mutex<BTreeSet<(u64, u64)>>,
    notify: Notify,
}

impl Pending {
    pub fn add(&self, agent_id: u64, ids: &[u64]) {
        if ids.is_empty() {
            return;
        }
        self.set
            .lock()
            .expect("pending lock")
            .extend(ids.iter().map(|id| (agent_id, *id)));
        self.notify.notify_one();
    }

    fn take(&self) -> BTreeSet<(u64, u64)> {
        std::mem::take(&mut *self.set.lock().expect("pending lock"))
    }
}

/// The latest forwarding outcome for one agent's alerts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwardingStatus {
    /// The last failure, naming the receiver; cleared by the next success of that receiver.
    pub last_error: Option<String>,
    pub last_success_at_ms: Option<i64>,
}

#[derive(Debug, Default)]
pub struct ForwardStatuses(Mutex<HashMap<u64, ForwardingStatus>>);

impl ForwardStatuses {
    pub fn get(&self, agent_id: u64) -> Option<ForwardingStatus> {
        self.0.lock().expect("status lock").get(&agent_id).cloned()
    }

    fn record(&self, agents: &BTreeSet<u64>, result: &Result<(), String>) {
        let mut map = self.0.lock().expect("status lock");
        for agent in agents {
            let status = map.entry(*agent).or_default();
            match result {
                Ok(()) => {
                    status.last_error = None;
                    status.last_success_at_ms = Some(now_ms());
                }
                Err(e) => status.last_error = Some(e.clone()),
            }
        }
    }
}

/// Where alerts go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SinkKind {
    Alertmanager,
    Webhook,
}

impl SinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Alertmanager => "alertmanager",
            Self::Webhook => "webhook",
        }
    }
}

/// What a sink last accepted for an alert.
#[derive(Debug, Clone, Copy)]
struct Posted {
    count: u64,
    episode_started_ms: i64,
    resolved_at_ms: Option<i64>,
    at: Instant,
}

/// What to do with a pending alert now.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    Post,
    /// Its count moved, but it was posted less than `resend_interval` ago.
    Later(Instant),
    /// The receiver has it as it is.
    Nothing,
}

fn decide(
    posted: Option<&Posted>,
    record: &NetworkAlertRecord,
    resend_interval: Duration,
    now: Instant,
) -> Decision {
    let Some(posted) = posted else {
        return Decision::Post;
    };
    if posted.episode_started_ms != record.episode_started_ms
        || posted.resolved_at_ms != record.resolved_at_ms
    {
        return Decision::Post;
    }
    if posted.count == record.count {
        return Decision::Nothing;
    }
    let due = posted.at + resend_interval;
    if due <= now {
        Decision::Post
    } else {
        Decision::Later(due)
    }
}

/// Most alerts in one POST.
const CHUNK: usize = 500;
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

struct Sink {
    kind: SinkKind,
    url: String,
    secret: Option<String>,
    posted: HashMap<u64, Posted>,
    /// Alerts to look at again.
    dirty: BTreeSet<(u64, u64)>,
    retry_at: Option<Instant>,
    backoff: Duration,
    /// The earliest deferred re-post.
    next_due: Option<Instant>,
}

impl Sink {
    fn new(kind: SinkKind, url: String, secret: Option<String>) -> Self {
        Self {
            kind,
            url,
            secret,
            posted: HashMap::new(),
            dirty: BTreeSet::new(),
            retry_at: None,
            backoff: FIRST_BACKOFF,
            next_due: None,
        }
    }

    fn wake_at(&self) -> Option<Instant> {
        if self.dirty.is_empty() {
            return None;
        }
        match (self.retry_at, self.next_due) {
            (Some(retry), _) => Some(retry),
            (None, due) => due,
        }
    }
}

/// Runs until `stop`: forwards what [`Pending`] receives (idle when no receiver is configured: it must not
/// end early, [`crate::RunningKas::wait`] takes any task's end for shutdown).
pub async fn run(state: Arc<KasState>, stop: CancellationToken) {
    let alerts = &state.network_alerts;
    let mut sinks = Vec::new();
    if let Some(url) = &alerts.config.alertmanager_url {
        let url = format!("{}/api/v2/alerts", url.trim_end_matches('/'));
        sinks.push(Sink::new(SinkKind::Alertmanager, url, None));
    }
    if let Some(webhook) = &alerts.config.webhook {
        sinks.push(Sink::new(
            SinkKind::Webhook,
            webhook.url.clone(),
            alerts.webhook_secret.clone(),
        ));
    }
    if sinks.is_empty() {
        stop.cancelled().await;
        return;
    }
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(client) => client,
        Err(e) => {
            warn!(mod_name = "network_alerts", error = %e, "no HTTP client: alerts are not forwarded");
            stop.cancelled().await;
            return;
        }
    };
    // After a restart: whatever is firing is posted once more (the receivers' state is unknown).
    match state
        .store
        .firing_network_alerts(now_ms(), alerts.resolve_after_ms())
    {
        Ok(firing) => {
            for sink in &mut sinks {
                sink.dirty.extend(firing.iter().copied());
            }
        }
        Err(e) => warn!(mod_name = "network_alerts", error = %e, "reading firing alerts"),
    }
    loop {
        for key in alerts.pending.take() {
            for sink in &mut sinks {
                sink.dirty.insert(key);
            }
        }
        let now = Instant::now();
        for sink in &mut sinks {
            if sink.retry_at.is_none_or(|at| at <= now) && !sink.dirty.is_empty() {
                flush(&state, &client, sink).await;
            }
        }
        let pending: usize = sinks.iter().map(|s| s.dirty.len()).sum();
        state.metrics.network_alerts.forward_pending(pending);
        let wake = sinks.iter().filter_map(Sink::wake_at).min();
        tokio::select! {
            () = stop.cancelled() => return,
            () = alerts.pending.notify.notified() => {}
            () = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

/// Posts what is due of `sink.dirty`.
async fn flush(state: &KasState, client: &reqwest::Client, sink: &mut Sink) {
    let config = &state.network_alerts;
    let resolve_after_ms = config.resolve_after_ms();
    let now = Instant::now();
    let mut to_post = Vec::new();
    let mut done = Vec::new();
    let mut agents: HashMap<u64, Option<AgentRecord>> = HashMap::new();
    sink.next_due = None;
    for &(agent_id, id) in &sink.dirty {
        let record = match state.store.network_alert(agent_id, id) {
            Ok(Some(record)) => record,
            // Dropped by the bound, or its agent deleted: nothing to send.
            Ok(None) => {
                done.push(((agent_id, id), true));
                continue;
            }
            Err(e) => {
                // Looked at again shortly (the store reopens itself after an I/O error).
                warn!(mod_name = "network_alerts", agent_id, error = %e, "reading an alert to forward");
                let at = now + FIRST_BACKOFF;
                sink.next_due = Some(sink.next_due.map_or(at, |d| d.min(at)));
                continue;
            }
        };
        match decide(
            sink.posted.get(&id),
            &record,
            config.config.resend_interval,
            now,
        ) {
            Decision::Post => to_post.push(record),
            Decision::Later(at) => sink.next_due = Some(sink.next_due.map_or(at, |d| d.min(at))),
            Decision::Nothing => done.push(((agent_id, id), false)),
        }
    }
    for (key, gone) in done {
        sink.dirty.remove(&key);
        if gone {
            sink.posted.remove(&key.1);
        }
    }
    for chunk in to_post.chunks(CHUNK) {
        let mut involved = BTreeSet::new();
        let mut with_agents = Vec::new();
        for record in chunk {
            let agent = agents
                .entry(record.agent_id)
                .or_insert_with(|| state.store.agent(record.agent_id).ok().flatten());
            if let Some(agent) = agent {
                involved.insert(record.agent_id);
                with_agents.push((record, agent.clone()));
            } else {
                sink.dirty.remove(&(record.agent_id, record.id));
            }
        }
        if with_agents.is_empty() {
            continue;
        }
        let result = post(
            client,
            sink,
            &with_agents,
            resolve_after_ms,
            config.config.dashboard_url.as_deref(),
        )
        .await;
        state
            .metrics
            .network_alerts
            .forwarded(sink.kind, result.is_ok(), with_agents.len());
        config.forwarding.record(&involved, &result);
        match result {
            Ok(()) => {
                debug!(
                    mod_name = "network_alerts",
                    sink = sink.kind.as_str(),
                    alerts = with_agents.len(),
                    "alerts forwarded"
                );
                let at = Instant::now();
                for (record, _) in &with_agents {
                    sink.dirty.remove(&(record.agent_id, record.id));
                    sink.posted.insert(
                        record.id,
                        Posted {
                            count: record.count,
                            episode_started_ms: record.episode_started_ms,
                            resolved_at_ms: record.resolved_at_ms,
                            at,
                        },
                    );
                }
                sink.retry_at = None;
                sink.backoff = FIRST_BACKOFF;
            }
            Err(e) => {
                warn!(
                    mod_name = "network_alerts",
                    sink = sink.kind.as_str(),
                    alerts = with_agents.len(),
                    retry_in = ?sink.backoff,
                    error = %e,
                    "forwarding alerts failed; retrying"
                );
                sink.retry_at = Some(Instant::now() + sink.backoff);
                sink.backoff = (sink.backoff * 2).min(MAX_BACKOFF);
                return;
            }
        }
    }
}

/// One POST of `alerts` to `sink`; the error names the receiver and what went wrong (never the secret).
async fn post(
    client: &reqwest::Client,
    sink: &Sink,
    alerts: &[(&NetworkAlertRecord, AgentRecord)],
    resolve_after_ms: i64,
    dashboard_url: Option<&str>,
) -> Result<(), String> {
    let body = match sink.kind {
        SinkKind::Alertmanager => {
            let list: Vec<_> = alerts
                .iter()
                .map(|(record, agent)| {
                    payload::alertmanager_alert(record, agent, resolve_after_ms, dashboard_url)
                })
                .collect();
            serde_json::to_vec(&list)
        }
        SinkKind::Webhook => {
            let now = now_ms();
            serde_json::to_vec(&payload::WebhookBody {
                version: 1,
                alerts: alerts
                    .iter()
                    .map(|(record, agent)| {
                        payload::webhook_alert(record, agent, resolve_after_ms, dashboard_url, now)
                    })
                    .collect(),
            })
        }
    }
    .map_err(|e| format!("{}: encoding: {e}", sink.kind.as_str()))?;
    let mut request = client
        .post(&sink.url)
        .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(secret) = &sink.secret {
        let timestamp = (now_ms() / 1000).to_string();
        request = request
            .header(
                "X-Gitops-Signature",
                payload::signature(secret, &timestamp, &body),
            )
            .header("X-Gitops-Timestamp", timestamp);
    }
    let name = sink.kind.as_str();
    // `without_url`: a URL may carry credentials (user:password@host).
    let response = request
        .body(body)
        .send()
        .await
        .map_err(|e| format!("{name}: {}", e.without_url()))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let text = response.text().await.unwrap_or_default();
    let text: String = text.chars().take(300).collect();
    Err(format!("{name}: HTTP {status}: {}", text.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::network_alerts::tests_support::record;

    #[test]
    fn new_refired_and_resolved_alerts_go_at_once_and_counts_at_most_every_interval() {
        let now = Instant::now();
        let interval = Duration::from_secs(60);
        let mut r = record();
        assert_eq!(decide(None, &r, interval, now), Decision::Post);
        let posted = Posted {
            count: r.count,
            episode_started_ms: r.episode_started_ms,
            resolved_at_ms: None,
            at: now,
        };
        assert_eq!(decide(Some(&posted), &r, interval, now), Decision::Nothing);
        r.count += 1;
        assert_eq!(
            decide(Some(&posted), &r, interval, now),
            Decision::Later(now + interval)
        );
        assert_eq!(
            decide(Some(&posted), &r, interval, now + interval),
            Decision::Post
        );
        let mut resolved = r.clone();
        resolved.resolved_at_ms = Some(5);
        assert_eq!(
            decide(Some(&posted), &resolved, interval, now),
            Decision::Post
        );
        let mut refired = r;
        refired.episode_started_ms += 1;
        assert_eq!(
            decide(Some(&posted), &refired, interval, now),
            Decision::Post
        );
    }
}
