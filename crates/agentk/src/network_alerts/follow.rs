//! Follows Hubble's flows: reconnects with backoff, matches each dropped flow, aggregates, and hands a
//! batch to the reporter whenever it is free.

use std::{sync::Arc, time::Duration};

use gitops_hubble::{
    RelayConfig, dropped_flows_request,
    flow::Verdict,
    observer::{
        GetFlowsResponse, get_flows_response::ResponseTypes, observer_client::ObserverClient,
    },
};
use gitops_protocol::{NetworkAlertBatch, NetworkModuleState};
use gitops_tunnel::backoff::Backoff;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{
    aggregate::Aggregator,
    matcher::{self, PolicySet},
    status::{StatusBoard, now_ms},
};

/// How often pending alerts are handed to the reporter.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

pub struct Follower {
    pub relay: RelayConfig,
    pub verdicts: Vec<Verdict>,
    pub policies: watch::Receiver<Arc<PolicySet>>,
    pub status: Arc<StatusBoard>,
    pub batches: mpsc::Sender<NetworkAlertBatch>,
    pub aggregator: Aggregator,
    /// High bits of every batch id: this process's start, so ids never repeat across restarts.
    pub batch_epoch: u64,
    pub batch_seq: u64,
}

impl Follower {
    pub async fn run(mut self, stop: CancellationToken) {
        let channel = match gitops_hubble::channel(&self.relay) {
            Ok(channel) => channel,
            Err(e) => {
                self.status
                    .set(NetworkModuleState::Misconfigured, e.to_string());
                return;
            }
        };
        let mut client = ObserverClient::new(channel).max_decoding_message_size(16 * 1024 * 1024);
        let request = dropped_flows_request(&self.verdicts);
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut flush = tokio::time::interval(FLUSH_EVERY);
        let address = self.relay.address.clone();
        loop {
            self.status.counters.relay_connects.inc();
            if self.status.state() != NetworkModuleState::RelayUnreachable {
                self.status.set(
                    NetworkModuleState::Connecting,
                    format!("dialling hubble relay {address}"),
                );
            }
            let opened = tokio::select! {
                () = stop.cancelled() => return,
                opened = client.get_flows(request.clone()) => opened,
            };
            let why = match opened {
                Err(status) => describe(&status),
                Ok(stream) => {
                    backoff.reset();
                    self.status.set(
                        NetworkModuleState::Following,
                        format!("following dropped flows from hubble relay {address}"),
                    );
                    let mut stream = stream.into_inner();
                    loop {
                        tokio::select! {
                            () = stop.cancelled() => return,
                            _ = flush.tick() => self.flush(),
                            message = stream.message() => match message {
                                Ok(Some(message)) => self.handle(message),
                                Ok(None) => break "the relay ended the flow stream".to_owned(),
                                Err(status) => break describe(&status),
                            },
                        }
                    }
                }
            };
            self.status.set(
                NetworkModuleState::RelayUnreachable,
                format!("hubble relay {address} unreachable: {why}; retrying"),
            );
            // Keep reporting what was counted while waiting to redial.
            let wait = tokio::time::sleep(backoff.next_delay());
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = &mut wait => break,
                    _ = flush.tick() => self.flush(),
                }
            }
        }
    }

    fn handle(&mut self, message: GetFlowsResponse) {
        match message.response_types {
            Some(ResponseTypes::Flow(flow)) => {
                self.status.counters.flows_seen.inc();
                if !matcher::is_policy_verdict(&flow) {
                    return;
                }
                let policies = self.policies.borrow();
                let mut matched = false;
                for policy in policies.matching(&flow) {
                    matched = true;
                    self.aggregator.add(matcher::alert_for(policy, &flow));
                }
                if matched {
                    self.status.counters.flows_matched.inc();
                }
            }
            Some(ResponseTypes::LostEvents(lost)) => {
                self.status
                    .counters
                    .lost_events
                    .inc_by(lost.num_events_lost);
            }
            Some(ResponseTypes::NodeStatus(node)) => {
                tracing::debug!(nodes = ?node.node_names, message = %node.message, "hubble relay node status");
            }
            None => {}
        }
    }

    /// Hands the due alerts to the reporter if it is free; otherwise they keep counting here.
    fn flush(&mut self) {
        if self.aggregator.pending() == 0 {
            return;
        }
        let Ok(permit) = self.batches.try_reserve() else {
            return;
        };
        let (alerts, suppressed) = self.aggregator.take_batch(now_ms());
        if alerts.is_empty() && suppressed == 0 {
            return;
        }
        self.batch_seq += 1;
        permit.send(NetworkAlertBatch {
            batch_id: self.batch_epoch | (self.batch_seq & 0xF_FFFF),
            alerts,
            suppressed,
        });
    }
}

/// A gRPC status as people read it: "connection refused" rather than "transport error".
fn describe(status: &tonic::Status) -> String {
    use std::error::Error;
    let mut text = status.message().to_owned();
    let mut source = status.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    if text.is_empty() {
        format!("{:?}", status.code())
    } else {
        text
    }
}
