//! Reconcile now (GraphQL `clusterAgentReconcile`, `kas reconcile`): kas re-reads an agent's manifest
//! projects from Git at once, then asks each of the agent's manifest streams of those projects to send a
//! `ReconcileRequest`, on which agentk runs a full sync (apply and drift check) even if the commit did not
//! change.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Mutex,
    time::Duration,
};

use tokio::sync::watch;
use tracing::info;

use crate::{KasState, watch::ProjectState};

/// How long a reconcile waits for Git to answer before it gives up on a project.
pub const REFRESH_DEADLINE: Duration = Duration::from_secs(60);

/// Reconcile requests per (agent, manifest project): a generation each open stream of that pair watches.
/// Also how many sync reports arrived per pair since kas started, so a caller can tell that a sync
/// finished after its request (`kas reconcile --wait`) without comparing clocks.
#[derive(Debug, Default)]
pub struct Reconciles {
    requests: Mutex<HashMap<(u64, String), watch::Sender<u64>>>,
    reports: Mutex<HashMap<(u64, String), u64>>,
}

impl Reconciles {
    /// What a manifest stream of `project` for `agent_id` watches; the current generation counts as handled.
    pub fn subscribe(&self, agent_id: u64, project: &str) -> watch::Receiver<u64> {
        let mut requests = self.requests.lock().expect("reconciles lock");
        requests.retain(|_, sender| sender.receiver_count() > 0);
        let mut receiver = requests
            .entry((agent_id, project.to_owned()))
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        receiver.mark_unchanged();
        receiver
    }

    /// The projects `agent_id` has a manifest stream of now, sorted.
    pub fn projects_of(&self, agent_id: u64) -> BTreeSet<String> {
        self.requests
            .lock()
            .expect("reconciles lock")
            .iter()
            .filter(|((agent, _), sender)| *agent == agent_id && sender.receiver_count() > 0)
            .map(|((_, project), _)| project.clone())
            .collect()
    }

    /// A sync report of `project` arrived from `agent_id`.
    pub fn reported(&self, agent_id: u64, project: &str) {
        let mut reports = self.reports.lock().expect("reports lock");
        *reports.entry((agent_id, project.to_owned())).or_default() += 1;
    }

    /// How many sync reports of `project` arrived from `agent_id` since kas started.
    pub fn reports(&self, agent_id: u64, project: &str) -> u64 {
        let reports = self.reports.lock().expect("reports lock");
        reports
            .get(&(agent_id, project.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// Wakes the streams of (`agent_id`, `project`); false when none is open.
    fn request(&self, agent_id: u64, project: &str) -> bool {
        let requests = self.requests.lock().expect("reconciles lock");
        match requests.get(&(agent_id, project.to_owned())) {
            Some(sender) if sender.receiver_count() > 0 => {
                sender.send_modify(|generation| *generation += 1);
                true
            }
            _ => false,
        }
    }
}

/// Why a reconcile could not be asked for, or what went wrong on the way (each names the agent or project).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReconcileError {
    #[error(
        "agent {agent_id} has no manifest stream open: it is not connected, or its configuration lists no \
         gitops.manifest_projects"
    )]
    NotConnected { agent_id: u64 },
    #[error(
        "agent {agent_id} has no manifest stream of project {project:?} open: the project is not in its \
         gitops.manifest_projects, or the agent is not connected"
    )]
    NotSynced { agent_id: u64, project: String },
    #[error(
        "project {project:?}: Git did not answer within {}s; the agent was asked to sync what it has",
        REFRESH_DEADLINE.as_secs()
    )]
    Timeout { project: String },
    #[error("project {project:?}: {error}; the agent was asked to sync what it has")]
    Git { project: String, error: String },
}

/// Re-reads `project` (or every manifest project the agent streams) from Git now, then asks the agent to
/// sync each one. Errors of one project do not stop the others; the agent's own configuration project is
/// re-read too, without waiting.
pub async fn reconcile(
    state: &KasState,
    agent_id: u64,
    config_project: &str,
    project: Option<&str>,
) -> Vec<ReconcileError> {
    let streamed = state.reconciles.projects_of(agent_id);
    let projects: Vec<String> = match project {
        Some(p) if streamed.contains(p) => vec![p.to_owned()],
        Some(p) => {
            return vec![ReconcileError::NotSynced {
                agent_id,
                project: p.to_owned(),
            }];
        }
        None if streamed.is_empty() => return vec![ReconcileError::NotConnected { agent_id }],
        None => streamed.into_iter().collect(),
    };
    state.watchers.poke(config_project);
    let refreshed = projects.iter().map(|project| refresh(state, project));
    let errors: Vec<ReconcileError> = futures::future::join_all(refreshed)
        .await
        .into_iter()
        .flatten()
        .collect();
    for project in &projects {
        if state.reconciles.request(agent_id, project) {
            info!(agent_id, project_id = %project, "reconcile requested");
        }
    }
    errors
}

/// Checks every watched ref of `project` now; the first failure, if any.
async fn refresh(state: &KasState, project: &str) -> Option<ReconcileError> {
    let watchers = state.watchers.of_project(project);
    let checks = watchers.iter().map(|w| w.refresh());
    let states = tokio::time::timeout(REFRESH_DEADLINE, futures::future::join_all(checks)).await;
    match states {
        Err(_) => Some(ReconcileError::Timeout {
            project: project.to_owned(),
        }),
        Ok(states) => states.into_iter().find_map(|s| match s {
            ProjectState::Failed(error) => Some(ReconcileError::Git {
                project: project.to_owned(),
                error,
            }),
            ProjectState::Commit(_) | ProjectState::Pending => None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_wakes_only_the_streams_of_that_agent_and_project() {
        let reconciles = Reconciles::default();
        let mut one = reconciles.subscribe(1, "g/a");
        let mut other_project = reconciles.subscribe(1, "g/b");
        let other_agent = reconciles.subscribe(2, "g/a");
        assert_eq!(
            reconciles.projects_of(1).into_iter().collect::<Vec<_>>(),
            ["g/a", "g/b"]
        );
        assert!(reconciles.request(1, "g/a"));
        assert!(one.has_changed().unwrap());
        assert!(!other_project.has_changed().unwrap());
        assert!(!other_agent.has_changed().unwrap());
        one.mark_unchanged();
        other_project.mark_unchanged();
        assert!(!reconciles.request(3, "g/a"), "nobody streams it");
    }

    #[test]
    fn reports_are_counted_per_agent_and_project() {
        let reconciles = Reconciles::default();
        reconciles.reported(1, "g/a");
        reconciles.reported(1, "g/a");
        reconciles.reported(2, "g/a");
        assert_eq!(reconciles.reports(1, "g/a"), 2);
        assert_eq!(reconciles.reports(2, "g/a"), 1);
        assert_eq!(reconciles.reports(1, "g/b"), 0);
    }

    #[test]
    fn a_closed_stream_no_longer_counts() {
        let reconciles = Reconciles::default();
        let stream = reconciles.subscribe(1, "g/a");
        drop(stream);
        assert!(reconciles.projects_of(1).is_empty());
        assert!(!reconciles.request(1, "g/a"));
    }
}
