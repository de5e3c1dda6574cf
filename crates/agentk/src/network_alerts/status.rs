//! The module's own health, as kas shows it: a state with what happened, and counters.

use std::sync::Mutex;

use gitops_protocol::{NetworkModuleState, NetworkModuleStatus};
use tokio::sync::watch;

use crate::metrics::NetworkAlertMetrics;

/// Shared by the module's tasks. State changes wake the status reporter; counters (agentk's metrics, so
/// totals since agentk started) ride along with the next report: they change thousands of times a second.
#[derive(Debug)]
pub struct StatusBoard {
    state: watch::Sender<(NetworkModuleState, String, i64)>,
    policies: Mutex<PolicyCounts>,
    pub counters: NetworkAlertMetrics,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PolicyCounts {
    pub network_policies: u32,
    pub cilium_network_policies: u32,
    pub cilium_clusterwide_network_policies: u32,
    pub cilium_crds_absent: bool,
    /// Why a kind cannot be watched now (RBAC, say), if one cannot.
    pub watch_error: String,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl StatusBoard {
    pub fn new(counters: NetworkAlertMetrics) -> Self {
        Self {
            state: watch::channel((NetworkModuleState::Connecting, String::new(), now_ms())).0,
            policies: Mutex::default(),
            counters,
        }
    }

    /// Records a state (and why); logs and wakes the reporter only when it differs from the current one.
    pub fn set(&self, state: NetworkModuleState, message: impl Into<String>) {
        let message = message.into();
        self.state.send_if_modified(|current| {
            if current.0 == state && current.1 == message {
                return false;
            }
            match state {
                NetworkModuleState::RelayUnreachable | NetworkModuleState::Misconfigured => {
                    tracing::warn!(state = state.as_str_name(), %message, "network alerts");
                }
                _ => tracing::info!(state = state.as_str_name(), %message, "network alerts"),
            }
            *current = (state, message, now_ms());
            self.counters
                .following
                .set(i64::from(state == NetworkModuleState::Following));
            true
        });
    }

    pub fn state(&self) -> NetworkModuleState {
        self.state.borrow().0
    }

    pub fn set_policies(&self, counts: PolicyCounts) {
        let changed = {
            let mut current = self.policies.lock().expect("lock");
            let changed = *current != counts;
            *current = counts;
            changed
        };
        if changed {
            // Wake the reporter: a CRD appearing or a policy annotated is news.
            self.state.send_modify(|_| {});
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<(NetworkModuleState, String, i64)> {
        self.state.subscribe()
    }

    pub fn snapshot(&self) -> NetworkModuleStatus {
        let (state, message, since) = self.state.borrow().clone();
        let policies = self.policies.lock().expect("lock").clone();
        let c = &self.counters;
        NetworkModuleStatus {
            state: state as i32,
            message,
            since_unix_ms: since,
            flows_seen: c.flows_seen.get(),
            flows_matched: c.flows_matched.get(),
            lost_events: c.lost_events.get(),
            network_policies: policies.network_policies,
            cilium_network_policies: policies.cilium_network_policies,
            cilium_clusterwide_network_policies: policies.cilium_clusterwide_network_policies,
            cilium_crds_absent: policies.cilium_crds_absent,
            policy_watch_error: policies.watch_error,
            connects: c.relay_connects.get(),
        }
    }
}
