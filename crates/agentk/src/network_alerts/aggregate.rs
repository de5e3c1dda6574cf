//! Deduplication and per-policy rate limits: matched flows become one pending alert per key with a count
//! and first/last seen; a batch takes what is due.

use std::collections::{HashMap, HashSet, VecDeque};

use gitops_protocol::NetworkAlert;

use super::matcher::{AlertKey, Matched};

/// Keys waiting to be sent at most (each holds one alert's worth of memory); drops for a new key beyond it
/// are counted as suppressed. With the per-policy rate this bounds memory under a flood of distinct flows
/// (a port scan, say).
pub const MAX_PENDING: usize = 10_000;
/// Keys remembered as already announced (so their further drops are counts, not new alerts).
pub const MAX_KNOWN: usize = 50_000;
/// The rate window for new alerts per policy.
const WINDOW_MS: i64 = 60_000;

#[derive(Debug)]
pub struct Aggregator {
    per_policy_per_minute: u32,
    pending: HashMap<AlertKey, NetworkAlert>,
    /// Announced keys, oldest first for eviction.
    known: HashSet<AlertKey>,
    known_order: VecDeque<AlertKey>,
    /// Per policy: (window start, new alerts sent in it).
    windows: HashMap<(i32, String, String), (i64, u32)>,
    suppressed: u64,
}

impl Aggregator {
    pub fn new(per_policy_per_minute: u32) -> Self {
        Self {
            per_policy_per_minute: per_policy_per_minute.max(1),
            pending: HashMap::new(),
            known: HashSet::new(),
            known_order: VecDeque::new(),
            windows: HashMap::new(),
            suppressed: 0,
        }
    }

    /// Counts one matched flow.
    pub fn add(&mut self, matched: Matched) {
        if let Some(alert) = self.pending.get_mut(&matched.key) {
            alert.count += 1;
            alert.first_seen_unix_ms = alert.first_seen_unix_ms.min(matched.time_ms);
            alert.last_seen_unix_ms = alert.last_seen_unix_ms.max(matched.time_ms);
            return;
        }
        if self.pending.len() >= MAX_PENDING {
            self.suppressed += 1;
            return;
        }
        let mut alert = matched.alert;
        alert.count = 1;
        self.pending.insert(matched.key, alert);
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// What is due now (`now_ms`): every pending count of an announced key, and new keys while their
    /// policy's window has room; new keys over it stay pending (still counting) for a later window.
    /// Returns the alerts and the drops suppressed since the previous call.
    pub fn take_batch(&mut self, now_ms: i64) -> (Vec<NetworkAlert>, u64) {
        let mut batch = Vec::new();
        let mut due = Vec::new();
        // New keys oldest first, so a rate-limited policy reports its earliest; ties by key, so the choice
        // never depends on the map's order.
        let mut new: Vec<(&AlertKey, &NetworkAlert)> = Vec::new();
        for (key, alert) in &self.pending {
            if self.known.contains(key) {
                due.push(key.clone());
            } else {
                new.push((key, alert));
            }
        }
        new.sort_by(|(ka, a), (kb, b)| {
            (a.first_seen_unix_ms, *ka).cmp(&(b.first_seen_unix_ms, *kb))
        });
        for (key, _) in new {
            let window = self
                .windows
                .entry(key.policy.clone())
                .or_insert((now_ms, 0));
            if now_ms - window.0 >= WINDOW_MS {
                *window = (now_ms, 0);
            }
            if window.1 < self.per_policy_per_minute {
                window.1 += 1;
                due.push(key.clone());
            }
        }
        for key in due {
            if let Some(alert) = self.pending.remove(&key) {
                batch.push(alert);
            }
            self.remember(key);
        }
        (batch, std::mem::take(&mut self.suppressed))
    }

    fn remember(&mut self, key: AlertKey) {
        if self.known.insert(key.clone()) {
            self.known_order.push_back(key);
            while self.known_order.len() > MAX_KNOWN {
                if let Some(old) = self.known_order.pop_front() {
                    self.known.remove(&old);
                }
            }
        }
    }
}
