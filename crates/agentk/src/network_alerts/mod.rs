//! Alerts from container network policy: with `cilium` in config.yaml, the leader replica follows Hubble's
//! dropped flows, matches them to the policies annotated `app.gitlab.com/alert: "true"`
//! (`NetworkPolicy`, `CiliumNetworkPolicy`, `CiliumClusterwideNetworkPolicy`), and reports deduplicated,
//! rate-limited alerts and its own health to kas.

pub mod aggregate;
pub mod follow;
pub mod matcher;
pub mod policy;
mod report;
pub mod status;
mod watch;

use std::{sync::Arc, time::Duration};

use gitops_config::{AlertVerdict, CiliumConfig};
use gitops_hubble::{RelayConfig, RelayTls, flow::Verdict};
use gitops_protocol::{NetworkModuleState, network_alerts_client::NetworkAlertsClient};
use tokio::sync::{mpsc, watch as tokio_watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{AgentState, KasChannel, metrics::NetworkAlertMetrics};
use status::StatusBoard;

/// What the module needs from the cluster: a client to watch policies with, and whether this replica leads.
#[derive(Clone)]
pub struct ClusterAccess {
    pub client: kube::Client,
    pub leading: tokio_watch::Receiver<bool>,
}

impl std::fmt::Debug for ClusterAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterAccess").finish_non_exhaustive()
    }
}

/// Runs the module while the configuration asks for it and this replica leads; restarts it when `cilium`
/// changes; stops with `stop`.
pub async fn run(
    service: KasChannel,
    mut config: tokio_watch::Receiver<AgentState>,
    access: Option<ClusterAccess>,
    metrics: NetworkAlertMetrics,
    stop: CancellationToken,
) {
    let mut leading = access.as_ref().map(|a| a.leading.clone());
    // (the configuration it runs with, its stop switch)
    let mut running: Option<(CiliumConfig, CancellationToken)> = None;
    let mut reported_disabled = false;
    loop {
        let wanted = config
            .borrow_and_update()
            .config
            .as_ref()
            .and_then(|c| c.cilium.clone());
        let leads = leading.as_mut().is_none_or(|l| *l.borrow_and_update());
        let desired = wanted.clone().filter(|_| leads);
        if running.as_ref().map(|(c, _)| c) != desired.as_ref() {
            if let Some((_, instance)) = running.take() {
                instance.cancel();
            }
            if let Some(cilium) = desired {
                let instance = stop.child_token();
                start(
                    service.clone(),
                    &cilium,
                    access.clone(),
                    metrics.clone(),
                    instance.clone(),
                );
                running = Some((cilium, instance));
                reported_disabled = false;
            }
        }
        if wanted.is_none() && leads && config.borrow().config.is_some() && !reported_disabled {
            reported_disabled = report_disabled(service.clone()).await;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            changed = config.changed() => if changed.is_err() { return },
            () = leadership_changed(&mut leading) => {}
        }
    }
}

async fn leadership_changed(leading: &mut Option<tokio_watch::Receiver<bool>>) {
    match leading {
        Some(l) => {
            if l.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// Tells kas the module is off, so its status does not show an old state forever.
async fn report_disabled(service: KasChannel) -> bool {
    let status = gitops_protocol::NetworkModuleStatus {
        state: NetworkModuleState::Disabled as i32,
        message: "cilium is not configured in config.yaml".into(),
        since_unix_ms: status::now_ms(),
        ..Default::default()
    };
    // Bounded: this runs in the supervisor's loop, which must keep following configuration changes.
    let mut client = NetworkAlertsClient::new(service);
    let call = client.report_status(status);
    matches!(
        tokio::time::timeout(Duration::from_secs(10), call).await,
        Ok(Ok(_))
    )
}

fn relay_config(cilium: &CiliumConfig) -> Result<RelayConfig, String> {
    let tls = match &cilium.tls {
        None => None,
        Some(t) => Some(
            RelayTls::from_files(
                t.ca_file.as_deref(),
                t.cert_file.as_deref().zip(t.key_file.as_deref()),
                t.server_name.clone(),
            )
            .map_err(|e| format!("cilium.tls: {e}"))?,
        ),
    };
    Ok(RelayConfig {
        address: cilium.hubble_relay_address.trim().to_owned(),
        tls,
        connect_timeout: Duration::from_secs(5),
    })
}

fn start(
    service: KasChannel,
    cilium: &CiliumConfig,
    access: Option<ClusterAccess>,
    metrics: NetworkAlertMetrics,
    stop: CancellationToken,
) {
    let board = Arc::new(StatusBoard::new(metrics.clone()));
    let span = tracing::info_span!("network_alerts", mod_name = "cilium_alert");
    tokio::spawn(
        report::status(service.clone(), board.clone(), stop.clone()).instrument(span.clone()),
    );
    let Some(access) = access else {
        board.set(
            NetworkModuleState::Misconfigured,
            "agentk runs without a Kubernetes client (--no-apply), so it cannot read the policies",
        );
        return;
    };
    let relay = match relay_config(cilium) {
        Ok(relay) => relay,
        Err(e) => {
            board.set(NetworkModuleState::Misconfigured, e);
            return;
        }
    };
    let (policies_tx, policies) = tokio_watch::channel(Arc::default());
    tokio::spawn(
        watch::run(access.client, policies_tx, board.clone(), stop.clone())
            .instrument(span.clone()),
    );
    let (batches_tx, batches) = mpsc::channel(1);
    tokio::spawn(
        report::batches(service, batches, metrics.alerts_reported, stop.clone())
            .instrument(span.clone()),
    );
    let follower = follow::Follower {
        relay,
        verdicts: cilium
            .alert_verdicts
            .iter()
            .map(|v| match v {
                AlertVerdict::Dropped => Verdict::Dropped,
                AlertVerdict::Audit => Verdict::Audit,
            })
            .collect(),
        policies,
        status: board,
        batches: batches_tx,
        aggregator: aggregate::Aggregator::new(cilium.max_alerts_per_policy_per_minute),
        batch_epoch: (status::now_ms() as u64) << 20,
        batch_seq: 0,
    };
    tokio::spawn(follower.run(stop).instrument(span));
}

#[cfg(test)]
mod tests;
