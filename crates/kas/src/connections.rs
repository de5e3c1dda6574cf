//! Which agents are connected right now (since when, which version), and the switch that cuts every stream
//! opened with a given token the moment it is revoked.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

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

#[derive(Debug, Default)]
pub struct Connections {
    by_agent: Mutex<HashMap<u64, HashMap<u64, ConnectionInfo>>>,
    /// One parent token per agent token id; every stream opened with it runs under a child.
    token_switches: Mutex<HashMap<u64, CancellationToken>>,
    next_id: AtomicU64,
}

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
            conns.remove(&self.id);
            if conns.is_empty() {
                by_agent.remove(&self.agent_id);
            }
        }
    }
}

impl Connections {
    pub fn register(self: &Arc<Self>, agent_id: u64, info: ConnectionInfo) -> ConnectionGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.by_agent
            .lock()
            .expect("connections lock")
            .entry(agent_id)
            .or_default()
            .insert(id, info);
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

    /// A cancellation token that fires when `token_id` is revoked.
    pub fn token_switch(&self, token_id: u64) -> CancellationToken {
        self.token_switches
            .lock()
            .expect("switch lock")
            .entry(token_id)
            .or_default()
            .child_token()
    }

    /// Ends every stream opened with `token_id`.
    pub fn revoke(&self, token_id: u64) {
        if let Some(switch) = self
            .token_switches
            .lock()
            .expect("switch lock")
            .remove(&token_id)
        {
            switch.cancel();
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
        }
        assert!(connections.of_agent(7).is_empty());

        let (one, two) = (connections.token_switch(1), connections.token_switch(2));
        connections.revoke(1);
        assert!(one.is_cancelled());
        assert!(!two.is_cancelled());
        assert!(
            !connections.token_switch(1).is_cancelled(),
            "a new switch for a fresh start"
        );
    }
}
