//! Which projects an agent may read: its configuration project, projects under the same owner (user or
//! group: the first path segment), and projects an admin granted it. Private projects work, because kas reads
//! them with its own Git credentials; this rule is what keeps agents apart.

use crate::{auth::AgentIdentity, store::Store};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error(
        "agent {agent_name:?} (project {agent_project}) may not read project {project:?}: it is not under owner {owner:?} and was not granted; grant it with clusterAgentGrantProject or `kas agent grant`"
    )]
    Denied {
        agent_name: String,
        agent_project: String,
        project: String,
        owner: String,
    },
    #[error("checking access to {project:?}: {message}")]
    Store { project: String, message: String },
}

fn owner(project: &str) -> &str {
    project.split('/').next().unwrap_or(project)
}

pub fn authorize(store: &Store, agent: &AgentIdentity, project: &str) -> Result<(), AccessError> {
    if project == agent.project_path || owner(project) == owner(&agent.project_path) {
        return Ok(());
    }
    match store.is_granted(agent.agent_id, project) {
        Ok(true) => Ok(()),
        Ok(false) => Err(AccessError::Denied {
            agent_name: agent.agent_name.clone(),
            agent_project: agent.project_path.clone(),
            project: project.to_owned(),
            owner: owner(&agent.project_path).to_owned(),
        }),
        Err(e) => Err(AccessError::Store {
            project: project.to_owned(),
            message: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_owner_or_granted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let record = store.create_agent("acme/config", "gitops").unwrap();
        let agent = AgentIdentity {
            agent_id: record.id,
            token_id: 1,
            project_path: record.project_path,
            agent_name: record.name,
        };
        assert!(authorize(&store, &agent, "acme/config").is_ok());
        assert!(authorize(&store, &agent, "acme/sub/manifests").is_ok());
        let err = authorize(&store, &agent, "other/manifests").unwrap_err();
        assert!(err.to_string().contains("\"other/manifests\""), "{err}");
        assert!(
            authorize(&store, &agent, "acme-evil/manifests").is_err(),
            "owner is a whole path segment"
        );
        store
            .grant_project(agent.agent_id, "other/manifests")
            .unwrap();
        assert!(authorize(&store, &agent, "other/manifests").is_ok());
    }
}
