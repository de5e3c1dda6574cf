//! The identity agentk impersonates for a request, in GitLab's naming scheme with Gitea paths in place of
//! GitLab's numeric ids (so RBAC written for GitLab's agent keeps its shape). Paths and usernames are
//! lowercased: Gitea compares them ignoring case, so one project has exactly one name in RBAC.
//! `docs/k8s-proxy.md` lists every name.

use gitops_config::agent::{AccessAs, Impersonation as StaticIdentity};
use gitops_protocol::{Impersonation, ImpersonationExtra};

use super::auth::access::{AgentRef, UserGrant, owner_of};
use crate::store::ci_tokens::CiTokenRecord;

/// Extra keys, as GitLab's agent sets them.
pub const EXTRA_AGENT_ID: &str = "agent.gitlab.com/id";
pub const EXTRA_CONFIG_PROJECT: &str = "agent.gitlab.com/config_project_id";
pub const EXTRA_PROJECT: &str = "agent.gitlab.com/project_id";
pub const EXTRA_ENVIRONMENT: &str = "agent.gitlab.com/environment_slug";
pub const EXTRA_USERNAME: &str = "agent.gitlab.com/username";
pub const EXTRA_ACCESS_TYPE: &str = "agent.gitlab.com/access_type";
/// A kas extension: GitLab identifies the job (`ci_job_id`, `ci_pipeline_id`); kas knows the CI token.
pub const EXTRA_CI_TOKEN_ID: &str = "agent.gitlab.com/ci_token_id";

fn extra(key: &str, value: impl Into<String>) -> ImpersonationExtra {
    ImpersonationExtra {
        key: key.to_owned(),
        values: vec![value.into()],
    }
}

fn lower(path: &str) -> String {
    path.trim_matches('/').to_lowercase()
}

/// `access_as: impersonate`: the configured identity as written.
pub fn static_identity(identity: &StaticIdentity) -> Impersonation {
    Impersonation {
        username: identity.username.clone(),
        uid: identity.uid.clone(),
        groups: identity.groups.clone(),
        extra: identity
            .extra
            .iter()
            .map(|e| ImpersonationExtra {
                key: e.key.clone(),
                values: e.val.clone(),
            })
            .collect(),
    }
}

/// `access_as: ci_job`: user `gitlab:ci_job:<token id>`; groups `gitlab:ci_job`, `gitlab:group:<owner>`,
/// `gitlab:project:<project>` and, with an environment, `gitlab:project_env:<project>:<environment>`.
pub fn ci_job_identity(agent: &AgentRef, token: &CiTokenRecord) -> Impersonation {
    let project = lower(&token.project_path);
    let mut groups = vec![
        "gitlab:ci_job".to_owned(),
        format!("gitlab:group:{}", owner_of(&project)),
        format!("gitlab:project:{project}"),
    ];
    let mut extras = vec![
        extra(EXTRA_AGENT_ID, agent.id.to_string()),
        extra(EXTRA_CONFIG_PROJECT, lower(&agent.config_project)),
        extra(EXTRA_PROJECT, project.clone()),
        extra(EXTRA_CI_TOKEN_ID, token.id.to_string()),
    ];
    if let Some(environment) = &token.environment {
        groups.push(format!("gitlab:project_env:{project}:{environment}"));
        extras.push(extra(EXTRA_ENVIRONMENT, environment.clone()));
    }
    Impersonation {
        username: format!("gitlab:ci_job:{}", token.id),
        uid: String::new(),
        groups,
        extra: extras,
    }
}

/// `access_as: user`: user `gitlab:user:<username>`; groups `gitlab:user`, then
/// `gitlab:project_role:<project>:<role>` and `gitlab:group_role:<group>:<role>` for the user's role and
/// every lower one in each allowed project and group.
pub fn user_identity(agent: &AgentRef, username: &str, grant: &UserGrant) -> Impersonation {
    let username = username.to_lowercase();
    let mut groups = vec!["gitlab:user".to_owned()];
    for (project, role) in &grant.projects {
        groups.extend(
            role.and_below()
                .map(|r| format!("gitlab:project_role:{}:{}", lower(project), r.as_str())),
        );
    }
    for (group, role) in &grant.groups {
        groups.extend(
            role.and_below()
                .map(|r| format!("gitlab:group_role:{}:{}", lower(group), r.as_str())),
        );
    }
    Impersonation {
        username: format!("gitlab:user:{username}"),
        uid: String::new(),
        groups,
        extra: vec![
            extra(EXTRA_AGENT_ID, agent.id.to_string()),
            extra(EXTRA_USERNAME, username),
            extra(EXTRA_ACCESS_TYPE, "personal_access_token"),
            extra(EXTRA_CONFIG_PROJECT, lower(&agent.config_project)),
        ],
    }
}

/// The impersonation for a CI job allowed with `access_as` (`None`: as the agent itself).
pub fn for_ci_job(
    access_as: &AccessAs,
    agent: &AgentRef,
    token: &CiTokenRecord,
) -> Option<Impersonation> {
    match access_as {
        AccessAs::Agent(_) => None,
        AccessAs::Impersonate(identity) => Some(static_identity(identity)),
        AccessAs::CiJob(_) => Some(ci_job_identity(agent, token)),
        // Refused by the decision (only user_access has users); never reached.
        AccessAs::User(_) => Some(ci_job_identity(agent, token)),
    }
}

/// The impersonation for a user allowed by `grant` (`None`: as the agent itself).
pub fn for_user(agent: &AgentRef, username: &str, grant: &UserGrant) -> Option<Impersonation> {
    match &grant.access_as {
        AccessAs::Agent(_) => None,
        AccessAs::User(_) => Some(user_identity(agent, username, grant)),
        // Refused by the decision (user_access supports agent and user); never reached, and the user's
        // identity is the least privileged stand-in should it ever be.
        AccessAs::Impersonate(_) | AccessAs::CiJob(_) => {
            Some(user_identity(agent, username, grant))
        }
    }
}

#[cfg(test)]
mod tests {
    use gitops_config::agent::{Empty, ImpersonationExtra as StaticExtra};

    use super::*;
    use crate::k8s_proxy::auth::access::Role;

    fn agent() -> AgentRef {
        AgentRef {
            id: 7,
            name: "prod".into(),
            config_project: "Ops/Clusters".into(),
        }
    }

    fn token(environment: Option<&str>) -> CiTokenRecord {
        CiTokenRecord {
            id: 42,
            project_path: "Group/App".into(),
            environment: environment.map(Into::into),
            description: None,
            created_at: 0,
            expires_at: 1,
            revoked_at: None,
            token_hash: String::new(),
        }
    }

    fn extras(i: &Impersonation) -> Vec<(String, Vec<String>)> {
        i.extra
            .iter()
            .map(|e| (e.key.clone(), e.values.clone()))
            .collect()
    }

    #[test]
    fn ci_job_identity_follows_gitlab_with_paths() {
        let id = ci_job_identity(&agent(), &token(Some("review/x")));
        assert_eq!(id.username, "gitlab:ci_job:42");
        assert_eq!(
            id.groups,
            [
                "gitlab:ci_job",
                "gitlab:group:group",
                "gitlab:project:group/app",
                "gitlab:project_env:group/app:review/x"
            ]
        );
        let kv = |k: &str, v: &str| (k.to_owned(), vec![v.to_owned()]);
        assert_eq!(
            extras(&id),
            [
                kv("agent.gitlab.com/id", "7"),
                kv("agent.gitlab.com/config_project_id", "ops/clusters"),
                kv("agent.gitlab.com/project_id", "group/app"),
                kv("agent.gitlab.com/ci_token_id", "42"),
                kv("agent.gitlab.com/environment_slug", "review/x"),
            ]
        );
        let without = ci_job_identity(&agent(), &token(None));
        assert_eq!(without.groups.len(), 3);
        assert!(without.extra.iter().all(|e| e.key != EXTRA_ENVIRONMENT));
    }

    #[test]
    fn user_identity_lists_each_role_up_to_the_users() {
        let grant = UserGrant {
            access_as: AccessAs::User(Empty {}),
            projects: vec![("g/app".into(), Role::Developer)],
            groups: vec![("Team".into(), Role::Maintainer)],
        };
        let id = user_identity(&agent(), "Alice", &grant);
        assert_eq!(id.username, "gitlab:user:alice");
        assert_eq!(
            id.groups,
            [
                "gitlab:user",
                "gitlab:project_role:g/app:guest",
                "gitlab:project_role:g/app:planner",
                "gitlab:project_role:g/app:reporter",
                "gitlab:project_role:g/app:developer",
                "gitlab:group_role:team:guest",
                "gitlab:group_role:team:planner",
                "gitlab:group_role:team:reporter",
                "gitlab:group_role:team:developer",
                "gitlab:group_role:team:maintainer",
            ]
        );
        let keys: Vec<_> = id.extra.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                EXTRA_AGENT_ID,
                EXTRA_USERNAME,
                EXTRA_ACCESS_TYPE,
                EXTRA_CONFIG_PROJECT
            ]
        );
        assert_eq!(
            for_user(
                &agent(),
                "alice",
                &UserGrant {
                    access_as: AccessAs::default(),
                    ..grant
                }
            ),
            None
        );
    }

    #[test]
    fn static_and_agent_modes() {
        let identity = StaticIdentity {
            username: "deployer".into(),
            uid: "u-1".into(),
            groups: vec!["ops".into()],
            extra: vec![StaticExtra {
                key: "team".into(),
                val: vec!["a".into(), "b".into()],
            }],
        };
        let id = for_ci_job(&AccessAs::Impersonate(identity), &agent(), &token(None)).unwrap();
        assert_eq!((id.username.as_str(), id.uid.as_str()), ("deployer", "u-1"));
        assert_eq!(id.groups, ["ops"]);
        assert_eq!(
            extras(&id),
            [("team".to_owned(), vec!["a".to_owned(), "b".to_owned()])]
        );
        assert_eq!(
            for_ci_job(&AccessAs::default(), &agent(), &token(None)),
            None
        );
    }
}
