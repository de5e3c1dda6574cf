//! The module's own health, as kas shows it: a state with what happened, and counters.

use std::sync::{
    Mutex,
    atomic::{AtomicU64, Ordering},
};

use gitops_protocol::{NetworkModuleState, NetworkModuleStatus};
use tokio::sync::watch;

/// Shared by the module's tasks. State changes wake the status reporter; counters ride along with the next
/// report (they change thousands of times a second).
#[derive(Debug)]
pub struct StatusBoard {
    state: watch::Sender<(NetworkModuleState, String, i64)>,
    policies: Mutex<PolicyCounts>,
    pub flows_seen: AtomicU64,
    pub flows_matched: AtomicU64,
    pub lost_events: AtomicU64,
    pub connects: AtomicU64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PolicyCounts {
    pub network_policies: u32,
    pub cilium_network_policies: u32,
    pub cilium_clusterwide_network_policies: u32,
    pub cilium_crds_absent: bool,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Default for StatusBoard {
    fn default() -> Self {
        Self {
            state: watch::channel((NetworkModuleState::Connecting, String::new(), now_ms())).0,
            policies: Mutex::default(),
            flows_seen: AtomicU64::new(0),
            flows_matched: AtomicU64::new(0),
            lost_events: AtomicU64::new(0),
            connects: AtomicU64::new(0),
        }
    }
}

impl StatusBoard {
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
            true
        });
    }

    pub fn state(&self) -> NetworkModuleState {
        self.state.borrow().0
    }

    pub fn set_policies(&self, counts: PolicyCounts) {
        let changed = {
            let mut current = self.policies.lock().expect("lock");
            std::mem::replace(&mut *current, counts) != counts
        };
        if changed {
            // Wake the reporter: a CRD appearing or a policy annotated is news.
            self.state.send_modify(|_| {});
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<(NetworkModuleState, String, i64)> {
        self.state.subscribe()
    }

    pub fn count(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> NetworkModuleStatus {
        let (state, message, since) = self.state.borrow().clone();
        let policies = *self.policies.lock().expect("lock");
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetworkModuleStatus {
            state: state as i32,
            message,
            since_unix_ms: since,
            flows_seen: load(&self.flows_seen),
            flows_matched: load(&self.flows_matched),
            lost_events: load(&self.lost_events),
            network_policies: policies.network_policies,
            cilium_network_policies: policies.cilium_network_policies,
            cilium_clusterwide_network_policies: policies.cilium_clusterwide_network_policies,
            cilium_crds_absent: policies.cilium_crds_absent,
            connects: load(&self.connects),
        }
    }
}
