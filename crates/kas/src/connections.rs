//! Which agents are connected right now (since when, which version), and the switch that cuts every stream
//! opened with a given token the moment it is revoked.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use gitops_git::GitRef;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// One live configuration stream: agentk holds exactly one while it is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    pub token_id: u64,
    /// Unix seconds.
    pub connected_at: i64,
    pub agent_version: String,
    pub pod_namespace: String,
    pub pod_name: String,
}

/// Caps per agent, so that a token holder cannot grow kas's state without bound. An agent lists at most
/// [`gitops_config::agent::MAX_MANIFEST_PROJECTS`] manifest projects; the caps leave room for a few replicas
/// and for streams of an old configuration still closing while the new one's open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamLimits {
    /// Manifest streams open at once, over all of the agent's connections.
    pub max_manifest_streams: usize,
    /// Distinct (project, ref) pairs those streams watch (each is a poller on the Git server).
    pub max_watched_refs: usize,
    /// Reverse tunnels open at once.
    pub max_reverse_tunnels: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        let projects = gitops_config::agent::MAX_MANIFEST_PROJECTS;
        Self {
            max_manifest_streams: 3 * projects,
            max_watched_refs: 2 * projects,
            max_reverse_tunnels: 32,
        }
    }
}

/// A per-agent cap was reached; the message names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error(
        "agent {agent_id} already has {limit} manifest streams open (max_manifest_streams per agent)"
    )]
    TooManyStreams { agent_id: u64, limit: usize },
    #[error(
        "agent {agent_id} already watches {limit} distinct (project, ref) pairs (max_watched_refs per agent); {project:?} at {reference} would be one more"
    )]
    TooManyRefs {
        agent_id: u64,
        limit: usize,
        project: String,
        reference: String,
    },
    #[error(
        "agent {agent_id} already has {limit} reverse tunnels open (max_reverse_tunnels per agent)"
    )]
    TooManyTunnels { agent_id: u64, limit: usize },
}

/// The open manifest streams of one agent, by what they watch.
#[derive(Debug, Default)]
struct AgentStreams {
    count: usize,
    refs: HashMap<(String, GitRef), usize>,
}

#[derive(Debug, Default)]
struct Switches {
    /// One parent token per agent token id; every stream opened with it runs under a child.
    live: HashMap<u64, CancellationToken>,
    /// Token ids revoked while kas runs (ids are never reused). A call authenticated just before a
    /// revocation asks for its switch just after it, and must get one that is already cancelled.
    revoked: HashSet<u64>,
}

#[derive(Debug, Default)]
pub struct Connections {
    by_agent: Mutex<HashMap<u64, HashMap<u64, ConnectionInfo>>>,
    switches: Mutex<Switches>,
    next_id: AtomicU64,
    streams: Mutex<HashMap<u64, AgentStreams>>,
    /// Per agent: bumped when an admin revokes one of its grants, so its streams check access again.
    grants: Mutex<HashMap<u64, watch::Sender<u64>>>,
    /// Per agent: reverse tunnels admitted in the last [`TUNNEL_HANDSHAKE_GRACE`], which the registry may
    /// not list yet (it adds a tunnel after its HTTP/2 handshake).
    tunnel_admissions: Arc<Mutex<HashMap<u64, usize>>>,
    /// Per agent: when its last connection ended (Unix seconds), for "not connected, last seen …". Kept in
    /// memory only, so unknown after a kas restart.
    last_seen: Mutex<HashMap<u64, i64>>,
    pub limits: StreamLimits,
    /// Kept current here, exported by [`crate::metrics::KasMetrics`].
    pub gauges: crate::metrics::ConnectionGauges,
}

/// How long an admitted reverse tunnel counts as in flight; its handshake takes milliseconds.
const TUNNEL_HANDSHAKE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Removes its connection from the table when the stream ends.
#[derive(Debug)]
pub struct ConnectionGuard {
    connections: Arc<Connections>,
    agent_id: u64,
    id: u64,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut by_agent = self.connections.by_agent.lock().expect("connections lock");
        if let Some(conns) = by_agent.get_mut(&self.agent_id) {
            if conns.remove(&self.id).is_some() {
                self.connections.gauges.configuration_streams.dec();
            }
            if conns.is_empty() {
                by_agent.remove(&self.agent_id);
                self.connections
                    .last_seen
                    .lock()
                    .expect("last seen lock")
                    .insert(self.agent_id, crate::store::now());
            }
        }
        self.connections
            .gauges
            .agents_connected
            .set(by_agent.len() as i64);
    }
}

/// Counts one manifest stream against its agent's caps while it lives.
#[derive(Debug)]
pub struct StreamGuard {
    connections: Arc<Connections>,
    agent_id: u64,
    key: (String, GitRef),
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut streams = self.connections.streams.lock().expect("streams lock");
        if let Some(agent) = streams.get_mut(&self.agent_id) {
            agent.count -= 1;
            self.connections.gauges.manifest_streams.dec();
            if let Some(n) = agent.refs.get_mut(&self.key) {
                *n -= 1;
                if *n == 0 {
                    agent.refs.remove(&self.key);
                }
            }
            if agent.count == 0 {
                streams.remove(&self.agent_id);
            }
        }
    }
}

impl Connections {
    pub fn new(limits: StreamLimits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    pub fn register(self: &Arc<Self>, agent_id: u64, info: ConnectionInfo) -> ConnectionGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut by_agent = self.by_agent.lock().expect("connections lock");
        by_agent.entry(agent_id).or_default().insert(id, info);
        self.gauges.configuration_streams.inc();
        self.gauges.agents_connected.set(by_agent.len() as i64);
        drop(by_agent);
        ConnectionGuard {
            connections: self.clone(),
            agent_id,
            id,
        }
    }

    /// The agent's live connections, oldest first.
    pub fn of_agent(&self, agent_id: u64) -> Vec<ConnectionInfo> {
        let by_agent = self.by_agent.lock().expect("connections lock");
        let mut list: Vec<_> = by_agent
            .get(&agent_id)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        list.sort_by_key(|c| c.connected_at);
        list
    }

    /// When the agent last had no connection left to this kas (Unix seconds); `None` when that has not
    /// happened since kas started. Ask [`Self::of_agent`] whether it is connected now.
    pub fn last_seen(&self, agent_id: u64) -> Option<i64> {
        self.last_seen
            .lock()
            .expect("last seen lock")
            .get(&agent_id)
            .copied()
    }

    /// A cancellation token that fires when `token_id` is revoked; already cancelled if it was.
    pub fn token_switch(&self, token_id: u64) -> CancellationToken {
        let mut switches = self.switches.lock().expect("switch lock");
        if switches.revoked.contains(&token_id) {
            let cancelled = CancellationToken::new();
            cancelled.cancel();
            return cancelled;
        }
        switches.live.entry(token_id).or_default().child_token()
    }

    /// Ends every stream opened with `token_id`, and every one that asks for its switch later.
    pub fn revoke(&self, token_id: u64) {
        let mut switches = self.switches.lock().expect("switch lock");
        switches.revoked.insert(token_id);
        if let Some(switch) = switches.live.remove(&token_id) {
            switch.cancel();
        }
    }

    /// Counts a manifest stream of `agent_id` watching `project` at `reference`, unless a cap is reached.
    pub fn open_manifest_stream(
        self: &Arc<Self>,
        agent_id: u64,
        project: &str,
        reference: &GitRef,
    ) -> Result<StreamGuard, LimitError> {
        let mut streams = self.streams.lock().expect("streams lock");
        let agent = streams.entry(agent_id).or_default();
        let limits = &self.limits;
        if agent.count >= limits.max_manifest_streams {
            return Err(LimitError::TooManyStreams {
                agent_id,
                limit: limits.max_manifest_streams,
            });
        }
        let key = (project.to_owned(), reference.clone());
        if !agent.refs.contains_key(&key) && agent.refs.len() >= limits.max_watched_refs {
            return Err(LimitError::TooManyRefs {
                agent_id,
                limit: limits.max_watched_refs,
                project: project.to_owned(),
                reference: reference.to_string(),
            });
        }
        agent.count += 1;
        *agent.refs.entry(key.clone()).or_default() += 1;
        self.gauges.manifest_streams.inc();
        Ok(StreamGuard {
            connections: self.clone(),
            agent_id,
            key,
        })
    }

    /// How many manifest streams `agent_id` has open, and how many distinct (project, ref) they watch.
    pub fn manifest_streams(&self, agent_id: u64) -> (usize, usize) {
        self.streams
            .lock()
            .expect("streams lock")
            .get(&agent_id)
            .map_or((0, 0), |a| (a.count, a.refs.len()))
    }

    /// Admits one more reverse tunnel for `agent_id`, which has `registered` open, unless that reaches the
    /// cap. Tunnels admitted moments ago count too, so a burst of opens cannot pass the cap. Needs a tokio
    /// runtime.
    pub fn admit_tunnel(&self, agent_id: u64, registered: usize) -> Result<(), LimitError> {
        let limit = self.limits.max_reverse_tunnels;
        let mut admissions = self.tunnel_admissions.lock().expect("admissions lock");
        let in_flight = admissions.entry(agent_id).or_default();
        if registered + *in_flight >= limit {
            return Err(LimitError::TooManyTunnels { agent_id, limit });
        }
        *in_flight += 1;
        let admissions = self.tunnel_admissions.clone();
        tokio::spawn(async move {
            tokio::time::sleep(TUNNEL_HANDSHAKE_GRACE).await;
            let mut admissions = admissions.lock().expect("admissions lock");
            if let Some(n) = admissions.get_mut(&agent_id) {
                *n -= 1;
                if *n == 0 {
                    admissions.remove(&agent_id);
                }
            }
        });
        Ok(())
    }

    /// Changes whenever a grant of `agent_id` is revoked. Subscribe before checking access, so a revocation
    /// between the check and the subscription is not missed.
    pub fn grant_changes(&self, agent_id: u64) -> watch::Receiver<u64> {
        let mut grants = self.grants.lock().expect("grants lock");
        grants.retain(|_, sender| sender.receiver_count() > 0);
        grants
            .entry(agent_id)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Tells `agent_id`'s streams that its grants changed.
    pub fn grants_changed(&self, agent_id: u64) {
        if let Some(sender) = self.grants.lock().expect("grants lock").get(&agent_id) {
            sender.send_modify(|generation| *generation += 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(token_id: u64) -> ConnectionInfo {
        ConnectionInfo {
            token_id,
            connected_at: 1,
            agent_version: "0.1.0".into(),
            pod_namespace: String::new(),
            pod_name: String::new(),
        }
    }

    #[test]
    fn guards_unregister_and_revoke_cancels_only_that_token() {
        let connections = Arc::new(Connections::default());
        {
            let _a = connections.register(7, info(1));
            let _b = connections.register(7, info(2));
            assert_eq!(connections.of_agent(7).len(), 2);
            assert_eq!(connections.last_seen(7), None);
        }
        assert!(connections.of_agent(7).is_empty());
        let seen = connections
            .last_seen(7)
            .expect("last seen when its last connection ended");
        assert!((crate::store::now() - seen).abs() <= 1);
        assert_eq!(connections.last_seen(8), None);

        let (one, two) = (connections.token_switch(1), connections.token_switch(2));
        connections.revoke(1);
        assert!(one.is_cancelled());
        assert!(!two.is_cancelled());
        assert!(!connections.token_switch(2).is_cancelled());
    }

    #[test]
    fn a_switch_asked_for_after_the_revocation_is_already_cancelled() {
        // The window: a call authenticated before `revoke` reaches `token_switch` after it.
        let connections = Connections::default();
        connections.revoke(3);
        assert!(
            connections.token_switch(3).is_cancelled(),
            "a stream opened after its token was revoked must end at once"
        );
        assert!(!connections.token_switch(4).is_cancelled());
    }

    #[test]
    fn manifest_streams_and_watched_refs_are_capped_per_agent() {
        let connections = Arc::new(Connections::new(StreamLimits {
            max_manifest_streams: 3,
            max_watched_refs: 2,
            max_reverse_tunnels: 1,
        }));
        let main = GitRef::Branch("main".into());
        let a = connections.open_manifest_stream(1, "g/a", &main).unwrap();
        let _a2 = connections.open_manifest_stream(1, "g/a", &main).unwrap();
        let _b = connections
            .open_manifest_stream(1, "g/b", &GitRef::DefaultBranch)
            .unwrap();
        assert!(matches!(
            connections.open_manifest_stream(1, "g/a", &main),
            Err(LimitError::TooManyStreams { limit: 3, .. })
        ));
        let _other_agent = connections.open_manifest_stream(2, "g/a", &main).unwrap();
        drop(a);
        let err = connections
            .open_manifest_stream(1, "g/c", &main)
            .unwrap_err();
        assert!(
            err.to_string().contains("max_watched_refs") && err.to_string().contains("\"g/c\""),
            "{err}"
        );
        assert_eq!(connections.manifest_streams(1), (2, 2));
    }

    #[tokio::test]
    async fn a_burst_of_tunnels_cannot_pass_the_cap_before_they_register() {
        let connections = Connections::new(StreamLimits {
            max_reverse_tunnels: 2,
            ..StreamLimits::default()
        });
        assert!(connections.admit_tunnel(1, 0).is_ok());
        assert!(connections.admit_tunnel(1, 0).is_ok());
        let err = connections.admit_tunnel(1, 0).unwrap_err();
        assert!(err.to_string().contains("max_reverse_tunnels"), "{err}");
        assert!(
            connections.admit_tunnel(2, 2).is_err(),
            "registered ones count"
        );
        assert!(connections.admit_tunnel(3, 1).is_ok(), "per agent");
    }

    #[test]
    fn grant_changes_reach_only_that_agents_subscribers() {
        let connections = Connections::default();
        let mut one = connections.grant_changes(1);
        let two = connections.grant_changes(2);
        connections.grants_changed(1);
        assert!(one.has_changed().unwrap());
        assert!(!two.has_changed().unwrap());
        one.mark_unchanged();
        connections.grants_changed(3);
        assert!(!one.has_changed().unwrap());
    }
}
