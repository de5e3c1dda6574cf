//! What changed, for open dashboards. One watcher per kas, running only while a page listens: every
//! [`POLL_PERIOD`] it takes a fingerprint of each topic (an agent's connections, configuration status,
//! manifest projects and syncs, tokens, proxy audit; the agent list; the CI tokens) and sends the topics
//! whose fingerprint moved. The page then re-queries GraphQL for what it shows.
//!
//! Why a watcher over the store rather than hooks in every writer: everything the page shows is already in
//! the store or in [`crate::connections::Connections`], written by many modules; reading it back keeps the
//! writers untouched and makes "what changed" mean exactly "what a query would now answer differently".
//! The cost is one read of each agent's rows per look while a page is open, none otherwise; a look that takes
//! long (about 1 ms per agent with 100 objects, in a debug build) waits [`BUSY_FACTOR`] times its duration
//! before the next, so the watcher takes at most a fifth of a core however many agents there are.

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{DefaultHasher, Hasher},
    sync::{
        Arc, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use tokio::sync::broadcast;

use crate::{KasState, store::StoreError};

/// How often the watcher looks: the page shows a change within about this.
pub const POLL_PERIOD: Duration = Duration::from_millis(500);
/// A look that took `t` is followed by a pause of at least `BUSY_FACTOR × t`.
pub const BUSY_FACTOR: u32 = 4;

/// Topics whose answers changed since the last look. `*` means "everything may have".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Changed {
    pub topics: Vec<String>,
}

/// Topic → fingerprint of what a query about it would answer.
pub type Fingerprints = BTreeMap<String, u64>;

/// The change feed shared by every open event stream.
#[derive(Debug)]
pub struct ChangeFeed {
    kas: Weak<KasState>,
    sender: broadcast::Sender<Arc<Changed>>,
    watching: AtomicBool,
}

impl ChangeFeed {
    /// Holds kas's state weakly, so a stopped kas is dropped (and its database closed) with its listeners.
    pub fn new(kas: Weak<KasState>) -> Self {
        Self {
            kas,
            sender: broadcast::channel(64).0,
            watching: AtomicBool::new(false),
        }
    }

    /// Starts the watcher if none runs; it stops by itself when the last receiver is gone.
    pub fn subscribe(self: &Arc<Self>) -> broadcast::Receiver<Arc<Changed>> {
        let receiver = self.sender.subscribe();
        if !self.watching.swap(true, Ordering::SeqCst) {
            tokio::spawn(self.clone().watch());
        }
        receiver
    }

    async fn watch(self: Arc<Self>) {
        let mut previous: Option<Fingerprints> = None;
        let mut pause = Duration::ZERO;
        loop {
            tokio::time::sleep(pause).await;
            pause = POLL_PERIOD;
            if self.sender.receiver_count() == 0 {
                self.watching.store(false, Ordering::SeqCst);
                // A page that subscribed between the count and the store found `watching` still true.
                if self.sender.receiver_count() == 0 || self.watching.swap(true, Ordering::SeqCst) {
                    return;
                }
            }
            let Some(kas) = self.kas.upgrade() else {
                return;
            };
            let started = std::time::Instant::now();
            let looked = tokio::task::spawn_blocking(move || fingerprints(&kas)).await;
            pause = pause.max(started.elapsed() * BUSY_FACTOR);
            let current = match looked {
                Ok(Ok(current)) => current,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "dashboard change feed: reading the store failed");
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "dashboard change feed: fingerprinting panicked");
                    continue;
                }
            };
            if let Some(previous) = &previous {
                let topics = changed_topics(previous, &current);
                if !topics.is_empty() {
                    // No receiver left is not an error: the next tick ends the watcher.
                    let _ = self.sender.send(Arc::new(Changed { topics }));
                }
            }
            previous = Some(current);
        }
    }
}

/// Hashes a value's `Debug` text as it is written, without building the string.
fn hash_of(value: &impl std::fmt::Debug) -> u64 {
    struct Writer(DefaultHasher);
    impl std::fmt::Write for Writer {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0.write(s.as_bytes());
            Ok(())
        }
    }
    let mut writer = Writer(DefaultHasher::new());
    // Writing into a hasher cannot fail.
    let _ = std::fmt::Write::write_fmt(&mut writer, format_args!("{value:?}"));
    writer.0.finish()
}

/// Fingerprints of every topic, read from the store and the live connections.
pub fn fingerprints(kas: &KasState) -> Result<Fingerprints, StoreError> {
    let store = &kas.store;
    let agents = store.agents()?;
    let mut out = Fingerprints::new();
    out.insert("agents".into(), hash_of(&agents));
    for agent in &agents {
        let id = agent.id;
        let connection = (kas.connections.of_agent(id), kas.connections.last_seen(id));
        out.insert(format!("agent/{id}/connection"), hash_of(&connection));
        out.insert(
            format!("agent/{id}/config"),
            hash_of(&store.config_status(id)?),
        );
        let mut manifests = Vec::new();
        for (project, status) in store.manifest_statuses(id)? {
            let sync = store.sync_record(id, &project)?;
            manifests.push((project, status, sync));
        }
        out.insert(format!("agent/{id}/manifests"), hash_of(&manifests));
        out.insert(format!("agent/{id}/tokens"), hash_of(&store.tokens_of(id)?));
        // Audit records are only appended: the newest sequence number says whether there are new ones.
        let newest = store.proxy_audit(id, 1)?.first().map(|(seq, _)| *seq);
        out.insert(format!("agent/{id}/audit"), hash_of(&newest));
    }
    out.insert("ci-tokens".into(), hash_of(&store.ci_tokens(None)?));
    Ok(out)
}

/// Topics added, removed or with a new fingerprint, in order.
pub fn changed_topics(previous: &Fingerprints, current: &Fingerprints) -> Vec<String> {
    let keys: BTreeSet<&String> = previous.keys().chain(current.keys()).collect();
    keys.into_iter()
        .filter(|k| previous.get(*k) != current.get(*k))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_topics_are_the_new_the_gone_and_the_different() {
        let before: Fingerprints = [("a".into(), 1), ("b".into(), 2), ("c".into(), 3)].into();
        let after: Fingerprints = [("a".into(), 1), ("b".into(), 5), ("d".into(), 4)].into();
        assert_eq!(changed_topics(&before, &after), ["b", "c", "d"]);
        assert!(changed_topics(&after, &after).is_empty());
    }
}
