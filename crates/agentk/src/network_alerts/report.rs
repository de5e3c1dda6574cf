//! Sends batches and the module's status to kas (`NetworkAlerts`), retrying a batch with its own id until
//! kas acknowledges it, so a lost answer never counts drops twice.

use std::{sync::Arc, time::Duration};

use gitops_protocol::{NetworkAlertBatch, network_alerts_client::NetworkAlertsClient};
use gitops_tunnel::backoff::Backoff;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::status::StatusBoard;
use crate::KasChannel;

/// Counters are re-sent this often when they moved; state changes go at once.
const COUNTERS_EVERY: Duration = Duration::from_secs(5);
/// The status is re-sent this often even when nothing changed (kas may have restarted).
const STATUS_EVERY: Duration = Duration::from_secs(60);

pub async fn batches(
    service: KasChannel,
    mut batches: mpsc::Receiver<NetworkAlertBatch>,
    reported: gitops_telemetry::prometheus_client::metrics::counter::Counter,
    stop: CancellationToken,
) {
    let mut client = NetworkAlertsClient::new(service);
    while let Some(batch) = tokio::select! {
        () = stop.cancelled() => None,
        batch = batches.recv() => batch,
    } {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        loop {
            let sent = tokio::select! {
                () = stop.cancelled() => return,
                sent = client.report_alerts(batch.clone()) => sent,
            };
            match sent {
                Ok(_) => {
                    reported.inc_by(batch.alerts.len() as u64);
                    tracing::debug!(
                        alerts = batch.alerts.len(),
                        batch_id = batch.batch_id,
                        "alerts reported"
                    );
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, alerts = batch.alerts.len(), "reporting network alerts to kas; retrying");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
    }
}

pub async fn status(service: KasChannel, board: Arc<StatusBoard>, stop: CancellationToken) {
    let mut client = NetworkAlertsClient::new(service);
    let mut changes = board.subscribe();
    let mut tick = tokio::time::interval(COUNTERS_EVERY);
    let mut last: Option<(gitops_protocol::NetworkModuleStatus, tokio::time::Instant)> = None;
    loop {
        // Coalesce bursts of changes (a watcher's first list, a reconnect) into one report.
        tokio::time::sleep(Duration::from_millis(100)).await;
        changes.borrow_and_update();
        let now = board.snapshot();
        let due = last
            .as_ref()
            .is_none_or(|(sent, at)| *sent != now || at.elapsed() >= STATUS_EVERY);
        if due {
            match client.report_status(now.clone()).await {
                Ok(_) => last = Some((now, tokio::time::Instant::now())),
                Err(e) => tracing::debug!(error = %e, "reporting the network alerts status to kas"),
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            _ = changes.changed() => {}
            _ = tick.tick() => {}
        }
    }
}
