//! Which manifests an agent may read. Two rules, both required:
//!
//! 1. **Configured:** the project, with that ref and those paths, is an entry of the agent's current
//!    `config.yaml` (the last valid one kas read, which is the one agentk runs). A token alone therefore
//!    reads nothing its agent's configuration does not name.
//! 2. **Owner or grant:** the project is the agent's configuration project, shares its owner, or an admin
//!    granted it. Private projects work, because kas reads them with its own Git credentials; this rule is
//!    what keeps tenants apart.
//!
//! The owner is the top-level namespace because that is the model of the Git server kas targets: Gitea
//! (like GitHub) has users and organisations, and every repository is `owner/name`, so `acme/team-a` and
//! `acme/team-b` are two repositories of owner `acme`. Paths with more segments are not Gitea's model (on
//! GitLab they are subgroups, and `acme/team-a/x` must not read `acme/team-b/y`), so for them the owner
//! rule grants nothing: only the agent's own project or an explicit grant does.

use gitops_config::AgentConfig;

use super::request::Selection;
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
    /// Boxed: the largest variant, and errors travel by value through every stream step.
    #[error("{0}")]
    NotConfigured(Box<NotConfigured>),
    #[error("checking access to {project:?}: {message}")]
    Store { project: String, message: String },
}

/// Rule 1 refused: the request is not an entry of the agent's current `config.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "agent {agent_name:?} may not read project {project:?} ({reference}, paths {paths}): {detail} in its config.yaml (project {agent_project})"
)]
pub struct NotConfigured {
    pub agent_name: String,
    pub agent_project: String,
    pub project: String,
    pub reference: String,
    pub paths: String,
    pub detail: String,
}

/// The owner of a Gitea-style `owner/name` path; `None` for any other shape (see the module docs).
fn owner(project: &str) -> Option<&str> {
    match project.split_once('/') {
        Some((owner, name)) if !name.contains('/') => Some(owner),
        _ => None,
    }
}

/// Whether `project` shares the owner of the agent's configuration project `agent_project`.
pub fn same_owner(agent_project: &str, project: &str) -> bool {
    matches!((owner(agent_project), owner(project)), (Some(a), Some(b)) if a == b)
}

/// Rule 2: the agent's own project, the same owner, or a grant.
pub fn authorize(store: &Store, agent: &AgentIdentity, project: &str) -> Result<(), AccessError> {
    if project == agent.project_path || same_owner(&agent.project_path, project) {
        return Ok(());
    }
    match store.is_granted(agent.agent_id, project) {
        Ok(true) => Ok(()),
        Ok(false) => Err(AccessError::Denied {
            agent_name: agent.agent_name.clone(),
            agent_project: agent.project_path.clone(),
            project: project.to_owned(),
            owner: owner(&agent.project_path)
                .unwrap_or(&agent.project_path)
                .to_owned(),
        }),
        Err(e) => Err(AccessError::Store {
            project: project.to_owned(),
            message: e.to_string(),
        }),
    }
}

/// Rule 1, pure: `Ok` when some entry of `config` is exactly `wanted`, else why not (for the error).
pub fn configured(config: &AgentConfig, wanted: &Selection) -> Result<(), String> {
    let same_id: Vec<Selection> = config
        .gitops
        .manifest_projects
        .iter()
        .filter(|entry| entry.id == wanted.project)
        .map(Selection::of_entry)
        .collect();
    if same_id.iter().any(|s| s == wanted) {
        Ok(())
    } else if same_id.is_empty() {
        Err("no gitops.manifest_projects entry has this id".to_owned())
    } else if same_id.iter().any(|s| s.reference == wanted.reference) {
        Err("the entries with this id select other paths".to_owned())
    } else {
        Err("the entries with this id name another ref".to_owned())
    }
}

/// Both rules, configuration first: a project the configuration does not name is refused without a store
/// read, so unconfigured requests cost nothing and leave nothing behind.
pub fn authorize_selection(
    store: &Store,
    agent: &AgentIdentity,
    config: &AgentConfig,
    wanted: &Selection,
) -> Result<(), AccessError> {
    configured(config, wanted).map_err(|detail| {
        AccessError::NotConfigured(Box::new(NotConfigured {
            agent_name: agent.agent_name.clone(),
            agent_project: agent.project_path.clone(),
            project: wanted.project.clone(),
            reference: wanted.reference.to_string(),
            paths: describe_paths(wanted),
            detail,
        }))
    })?;
    authorize(store, agent, &wanted.project)
}

fn describe_paths(selection: &Selection) -> String {
    use super::PathSelector;
    let list: Vec<String> = selection
        .paths
        .iter()
        .map(|p| match p {
            PathSelector::Glob(g) => format!("glob {g:?}"),
            PathSelector::File(f) => format!("file {f:?}"),
        })
        .collect();
    format!("[{}]", list.join(", "))
}

#[cfg(test)]
mod tests {
    use gitops_git::GitRef;

    use super::{super::PathSelector, *};

    fn store_and_agent() -> (tempfile::TempDir, Store, AgentIdentity) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let record = store.create_agent("acme/config", "gitops").unwrap();
        let agent = AgentIdentity {
            agent_id: record.id,
            token_id: 1,
            project_path: record.project_path,
            agent_name: record.name,
        };
        (dir, store, agent)
    }

    #[test]
    fn same_owner_or_granted() {
        let (_dir, store, agent) = store_and_agent();
        assert!(authorize(&store, &agent, "acme/config").is_ok());
        assert!(authorize(&store, &agent, "acme/manifests").is_ok());
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

    #[test]
    fn subgroups_share_no_owner() {
        assert!(
            same_owner("acme/team-a", "acme/team-b"),
            "Gitea: owner acme"
        );
        assert!(!same_owner("acme/team-a/config", "acme/team-b/manifests"));
        assert!(!same_owner("acme/team-a/config", "acme/team-a/manifests"));
        assert!(!same_owner("acme/config", "acme/sub/manifests"));
        let (_dir, store, agent) = store_and_agent();
        assert!(authorize(&store, &agent, "acme/sub/manifests").is_err());
        store
            .grant_project(agent.agent_id, "acme/sub/manifests")
            .unwrap();
        assert!(authorize(&store, &agent, "acme/sub/manifests").is_ok());
    }

    fn config(yaml: &str) -> AgentConfig {
        AgentConfig::parse("config.yaml", yaml.as_bytes(), 1 << 20).unwrap()
    }

    fn selection(project: &str, reference: GitRef, glob: &str) -> Selection {
        Selection {
            project: project.into(),
            reference,
            paths: vec![PathSelector::Glob(glob.into())],
        }
    }

    #[test]
    fn only_configured_entries_with_their_ref_and_paths() {
        let config = config(
            "gitops:\n  manifest_projects:\n  - id: acme/manifests\n    paths:\n    - glob: '*.yaml'\n  - id: acme/pinned\n    ref:\n      branch: prod\n    paths:\n    - glob: '**/*.yaml'\n",
        );
        let ok = selection("acme/manifests", GitRef::DefaultBranch, "*.yaml");
        assert_eq!(configured(&config, &ok), Ok(()));
        assert_eq!(
            configured(
                &config,
                &selection("acme/pinned", GitRef::Branch("prod".into()), "**/*.yaml")
            ),
            Ok(())
        );
        let missing = configured(
            &config,
            &selection("acme/secrets", GitRef::DefaultBranch, "*.yaml"),
        );
        assert!(
            missing
                .unwrap_err()
                .contains("no gitops.manifest_projects entry")
        );
        let other_ref = configured(
            &config,
            &selection("acme/manifests", GitRef::Branch("main".into()), "*.yaml"),
        );
        assert!(other_ref.unwrap_err().contains("another ref"));
        let other_paths = configured(
            &config,
            &selection("acme/manifests", GitRef::DefaultBranch, "**"),
        );
        assert!(other_paths.unwrap_err().contains("other paths"));
        assert!(configured(&AgentConfig::default(), &ok).is_err());
    }

    #[test]
    fn an_unconfigured_project_is_refused_before_the_owner_rule() {
        let (_dir, store, agent) = store_and_agent();
        let config = config(
            "gitops:\n  manifest_projects:\n  - id: acme/manifests\n    paths:\n    - glob: '*.yaml'\n",
        );
        let same_owner = selection("acme/secrets", GitRef::DefaultBranch, "*.yaml");
        let err = authorize_selection(&store, &agent, &config, &same_owner).unwrap_err();
        assert!(matches!(err, AccessError::NotConfigured(_)), "{err}");
        assert!(err.to_string().contains("\"acme/secrets\""), "{err}");
        let ok = selection("acme/manifests", GitRef::DefaultBranch, "*.yaml");
        assert_eq!(authorize_selection(&store, &agent, &config, &ok), Ok(()));
    }
}
