//! The decisions themselves, as pure functions over an agent's `config.yaml` and the facts about a caller:
//! which `ci_access` rule lets a CI token's project in, and which `user_access` projects and groups a Git
//! server user belongs to with a role high enough.
//!
//! Paths compare case-insensitively (Gitea resolves `Org/Repo` and `org/repo` to the same repository), and
//! a group is a Gitea owner (organisation or user): Gitea has no subgroups, so a group id containing `/`
//! matches nothing.

use gitops_config::agent::{AccessAs, AgentConfig, CiAccessEntry};

/// The agent a decision is about, for messages and identities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRef {
    pub id: u64,
    pub name: String,
    /// `owner/name` of its configuration project.
    pub config_project: String,
}

impl std::fmt::Display for AgentRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "agent {:?} (id {}, configured in {})",
            self.name, self.id, self.config_project
        )
    }
}

/// GitLab's member roles, lowest first. Gitea permissions map onto them (see `gitea.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Guest,
    Planner,
    Reporter,
    Developer,
    Maintainer,
    Owner,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Role::Guest,
        Role::Planner,
        Role::Reporter,
        Role::Developer,
        Role::Maintainer,
        Role::Owner,
    ];

    /// GitLab's spelling, as in `gitlab:project_role:<project>:developer`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Guest => "guest",
            Role::Planner => "planner",
            Role::Reporter => "reporter",
            Role::Developer => "developer",
            Role::Maintainer => "maintainer",
            Role::Owner => "owner",
        }
    }

    /// This role and every lower one: GitLab puts all of them in the impersonated groups, so RBAC bound
    /// to `…:developer` also admits maintainers and owners.
    pub fn and_below(self) -> impl Iterator<Item = Role> {
        Role::ALL.into_iter().filter(move |r| *r <= self)
    }
}

/// GitLab's rule for `user_access`: members with at least the Developer role (its `use_k8s_proxies`
/// permission).
pub const USER_ACCESS_MIN_ROLE: Role = Role::Developer;

/// Whether two Git server paths name the same thing.
pub fn same_path(a: &str, b: &str) -> bool {
    a.trim_matches('/')
        .eq_ignore_ascii_case(b.trim_matches('/'))
}

/// The owner (organisation or user) of `owner/name`.
pub fn owner_of(project: &str) -> &str {
    project
        .trim_matches('/')
        .split_once('/')
        .map_or(project, |(owner, _)| owner)
}

/// GitLab's environment patterns: `*` stands for any run of characters (`/` included), everything else is
/// literal.
pub fn environment_matches(pattern: &str, environment: &str) -> bool {
    let (p, e) = (pattern.as_bytes(), environment.as_bytes());
    // Iterative wildcard matching with backtracking to the last `*`.
    let (mut pi, mut ei) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ei < e.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ei));
            pi += 1;
        } else if pi < p.len() && p[pi] == e[ei] {
            pi += 1;
            ei += 1;
        } else if let Some((sp, se)) = star {
            pi = sp + 1;
            ei = se + 1;
            star = Some((sp, se + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// An entry without `environments` admits every job; one with them admits only jobs of a matching
/// environment (a token without an environment matches none).
fn admits_environment(entry: &CiAccessEntry, environment: Option<&str>) -> bool {
    entry.environments.is_empty()
        || environment.is_some_and(|env| {
            entry
                .environments
                .iter()
                .any(|pattern| environment_matches(pattern, env))
        })
}

/// Which rule let a CI job in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CiRule {
    /// `ci_access.projects[i]`.
    Project(usize),
    /// The agent's own configuration project, which GitLab authorises implicitly, as the agent.
    ConfigProject,
    /// `ci_access.groups[i]`.
    Group(usize),
}

/// What a CI job of an allowed project may do.
#[derive(Debug, Clone, PartialEq)]
pub struct CiGrant {
    pub rule: CiRule,
    pub access_as: AccessAs,
    pub default_namespace: Option<String>,
}

/// Decides whether a CI token of `project` (and `environment`) may use `agent`, GitLab's way: the most
/// specific level that names the project decides — its `ci_access.projects` entries, else the implicit
/// authorisation of the agent's configuration project (as the agent, no default namespace), else the
/// `ci_access.groups` entries of the project's owner. Within a level the first entry whose `environments`
/// admit the job wins; when a level names the project but none admits its environment, the job is refused
/// (a project entry restricting environments is not widened by a group entry). `Err` is the reason, naming
/// the agent and the project.
pub fn decide_ci(
    config: &AgentConfig,
    agent: &AgentRef,
    project: &str,
    environment: Option<&str>,
) -> Result<CiGrant, String> {
    let ci = &config.ci_access;
    let projects: Vec<usize> = (0..ci.projects.len())
        .filter(|&i| same_path(&ci.projects[i].id, project))
        .collect();
    let grant = if !projects.is_empty() {
        pick(&ci.projects, &projects, environment, CiRule::Project)
            .ok_or_else(|| environment_refusal("ci_access.projects", agent, project, environment))?
    } else if same_path(project, &agent.config_project) {
        CiGrant {
            rule: CiRule::ConfigProject,
            access_as: AccessAs::default(),
            default_namespace: None,
        }
    } else {
        let owner = owner_of(project);
        let groups: Vec<usize> = (0..ci.groups.len())
            .filter(|&i| !ci.groups[i].id.trim_matches('/').contains('/'))
            .filter(|&i| same_path(&ci.groups[i].id, owner))
            .collect();
        if groups.is_empty() {
            return Err(format!(
                "project {project:?} may not use {agent}: it is neither in its ci_access.projects nor in a \
                 ci_access.groups entry of its owner {owner:?}"
            ));
        }
        pick(&ci.groups, &groups, environment, CiRule::Group)
            .ok_or_else(|| environment_refusal("ci_access.groups", agent, project, environment))?
    };
    if let AccessAs::User(_) = grant.access_as {
        return Err(format!(
            "{agent} lets project {project:?} in with access_as user, which only user_access supports; \
             use agent, ci_job or impersonate in ci_access"
        ));
    }
    Ok(grant)
}

fn pick(
    entries: &[CiAccessEntry],
    candidates: &[usize],
    environment: Option<&str>,
    rule: fn(usize) -> CiRule,
) -> Option<CiGrant> {
    candidates
        .iter()
        .find(|&&i| admits_environment(&entries[i], environment))
        .map(|&i| CiGrant {
            rule: rule(i),
            access_as: entries[i].access_as.clone(),
            default_namespace: entries[i].default_namespace.clone(),
        })
}

fn environment_refusal(
    level: &str,
    agent: &AgentRef,
    project: &str,
    environment: Option<&str>,
) -> String {
    match environment {
        Some(env) => format!(
            "project {project:?} may not use {agent} from environment {env:?}: its {level} entries list other \
             environments"
        ),
        None => format!(
            "project {project:?} may not use {agent} without an environment: its {level} entries list \
             environments, and the token names none"
        ),
    }
}

/// The `user_access` projects and groups to ask the Git server about, as written (at most one of each
/// path); group ids with `/` are left out (Gitea has no subgroups).
pub fn user_access_targets(config: &AgentConfig) -> (Vec<String>, Vec<String>) {
    let mut projects: Vec<String> = Vec::new();
    for entry in &config.user_access.projects {
        if !projects.iter().any(|p| same_path(p, &entry.id)) {
            projects.push(entry.id.trim_matches('/').to_owned());
        }
    }
    let mut groups: Vec<String> = Vec::new();
    for entry in &config.user_access.groups {
        let id = entry.id.trim_matches('/');
        if !id.contains('/') && !groups.iter().any(|g| same_path(g, id)) {
            groups.push(id.to_owned());
        }
    }
    (projects, groups)
}

/// What the Git server says about one user: their role in each project and group asked about (`None`: no
/// membership, or nothing the server would tell).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserFacts {
    pub username: String,
    pub projects: Vec<(String, Option<Role>)>,
    pub groups: Vec<(String, Option<Role>)>,
}

/// What a user may do through the agent: the identity mode and the projects and groups (with the user's
/// role) that admit them.
#[derive(Debug, Clone, PartialEq)]
pub struct UserGrant {
    pub access_as: AccessAs,
    pub projects: Vec<(String, Role)>,
    pub groups: Vec<(String, Role)>,
}

/// Decides whether the user `facts` describe may use `agent`: they must have at least
/// [`USER_ACCESS_MIN_ROLE`] in one of its `user_access` projects or groups. `Err` is the reason.
pub fn decide_user(
    config: &AgentConfig,
    agent: &AgentRef,
    facts: &UserFacts,
) -> Result<UserGrant, String> {
    let user = &facts.username;
    let (projects, groups) = user_access_targets(config);
    if projects.is_empty() && groups.is_empty() {
        return Err(format!(
            "user {user:?} may not use {agent}: its config.yaml has no user_access projects or groups"
        ));
    }
    let access_as = config.user_access.access_as.clone();
    if matches!(access_as, AccessAs::CiJob(_) | AccessAs::Impersonate(_)) {
        return Err(format!(
            "{agent} has user_access.access_as {}, which user_access does not support; use agent or user",
            if matches!(access_as, AccessAs::CiJob(_)) {
                "ci_job"
            } else {
                "impersonate"
            }
        ));
    }
    let allowed = |targets: &[String], roles: &[(String, Option<Role>)]| -> Vec<(String, Role)> {
        targets
            .iter()
            .filter_map(|target| {
                roles
                    .iter()
                    .find(|(path, _)| same_path(path, target))
                    .and_then(|(_, role)| *role)
                    .filter(|role| *role >= USER_ACCESS_MIN_ROLE)
                    .map(|role| (target.to_lowercase(), role))
            })
            .collect()
    };
    let grant = UserGrant {
        access_as,
        projects: allowed(&projects, &facts.projects),
        groups: allowed(&groups, &facts.groups),
    };
    if grant.projects.is_empty() && grant.groups.is_empty() {
        let listed: Vec<String> = projects
            .iter()
            .map(|p| format!("project {p:?}"))
            .chain(groups.iter().map(|g| format!("group {g:?}")))
            .collect();
        return Err(format!(
            "user {user:?} may not use {agent}: they are not a Developer (write access) or higher in any of its \
             user_access entries ({})",
            listed.join(", ")
        ));
    }
    Ok(grant)
}

#[cfg(test)]
mod tests {
    use gitops_config::agent::{
        CiAccessConfig, Empty, Impersonation, UserAccessConfig, UserAccessEntry,
    };

    use super::*;

    fn agent() -> AgentRef {
        AgentRef {
            id: 7,
            name: "prod".into(),
            config_project: "ops/clusters".into(),
        }
    }

    fn entry(
        id: &str,
        environments: &[&str],
        access_as: AccessAs,
        ns: Option<&str>,
    ) -> CiAccessEntry {
        CiAccessEntry {
            id: id.into(),
            default_namespace: ns.map(Into::into),
            environments: environments.iter().map(|e| (*e).into()).collect(),
            access_as,
        }
    }

    fn ci(projects: Vec<CiAccessEntry>, groups: Vec<CiAccessEntry>) -> AgentConfig {
        AgentConfig {
            ci_access: CiAccessConfig { projects, groups },
            ..AgentConfig::default()
        }
    }

    fn ci_job() -> AccessAs {
        AccessAs::CiJob(Empty {})
    }

    #[test]
    fn wildcards_match_any_run_of_characters() {
        for (pattern, env, expected) in [
            ("production", "production", true),
            ("production", "prod", false),
            ("review/*", "review/feature-1", true),
            ("review/*", "review/a/b", true),
            ("review/*", "review", false),
            ("*", "anything", true),
            ("*-eu", "prod-eu", true),
            ("*-eu", "prod-us", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("**", "", true),
            ("", "", true),
        ] {
            assert_eq!(
                environment_matches(pattern, env),
                expected,
                "{pattern} vs {env}"
            );
        }
    }

    #[test]
    fn a_project_entry_allows_its_project_with_its_identity_and_namespace() {
        let config = ci(
            vec![
                entry("other/app", &[], AccessAs::default(), None),
                entry("Group/App", &[], ci_job(), Some("apps")),
            ],
            vec![],
        );
        let grant = decide_ci(&config, &agent(), "group/app", None).unwrap();
        assert_eq!(
            grant.rule,
            CiRule::Project(1),
            "paths compare ignoring case"
        );
        assert_eq!(grant.access_as, ci_job());
        assert_eq!(grant.default_namespace.as_deref(), Some("apps"));
        let err = decide_ci(&config, &agent(), "group/else", None).unwrap_err();
        assert!(
            err.contains("\"group/else\"") && err.contains("agent \"prod\" (id 7"),
            "{err}"
        );
    }

    #[test]
    fn environments_restrict_and_the_first_admitting_entry_wins() {
        let config = ci(
            vec![
                entry("g/app", &["production"], ci_job(), Some("prod")),
                entry("g/app", &["review/*"], AccessAs::default(), Some("review")),
            ],
            vec![entry("g", &[], AccessAs::default(), Some("group-wide"))],
        );
        let at = |env| decide_ci(&config, &agent(), "g/app", env);
        assert_eq!(at(Some("production")).unwrap().rule, CiRule::Project(0));
        assert_eq!(
            at(Some("review/x")).unwrap().default_namespace.as_deref(),
            Some("review")
        );
        // The project level names the project, so the group entry does not widen it.
        let err = at(Some("staging")).unwrap_err();
        assert!(err.contains("\"staging\""), "{err}");
        let err = at(None).unwrap_err();
        assert!(err.contains("without an environment"), "{err}");
        // Another project of the owner falls to the group entry.
        let grant = decide_ci(&config, &agent(), "g/other", None).unwrap();
        assert_eq!(grant.rule, CiRule::Group(0));
    }

    #[test]
    fn groups_are_owners_and_subgroup_ids_match_nothing() {
        let config = ci(
            vec![],
            vec![
                entry("g/sub", &[], ci_job(), None),
                entry("G", &["prod*"], ci_job(), Some("ns")),
            ],
        );
        assert!(decide_ci(&config, &agent(), "g/sub", None).is_err());
        let grant = decide_ci(&config, &agent(), "g/app", Some("prod-eu")).unwrap();
        assert_eq!(grant.rule, CiRule::Group(1));
        assert!(decide_ci(&config, &agent(), "g/app", Some("dev")).is_err());
        assert!(decide_ci(&config, &agent(), "gx/app", Some("prod")).is_err());
        // `g/sub/project` is not a Gitea path, and the `g/sub` entry still matches nothing.
        assert!(decide_ci(&config, &agent(), "g/sub/project", Some("prod")).is_ok());
    }

    #[test]
    fn the_config_project_is_allowed_as_the_agent_unless_an_entry_names_it() {
        let group_wide = entry("ops", &[], ci_job(), Some("ns"));
        let config = ci(vec![], vec![group_wide.clone()]);
        let grant = decide_ci(&config, &agent(), "ops/clusters", Some("x")).unwrap();
        assert_eq!(grant.rule, CiRule::ConfigProject);
        assert_eq!(grant.access_as, AccessAs::default());
        assert_eq!(grant.default_namespace, None);
        let config = ci(
            vec![entry("ops/clusters", &["prod"], ci_job(), Some("p"))],
            vec![group_wide],
        );
        assert_eq!(
            decide_ci(&config, &agent(), "ops/clusters", Some("prod"))
                .unwrap()
                .rule,
            CiRule::Project(0)
        );
        assert!(decide_ci(&config, &agent(), "ops/clusters", Some("dev")).is_err());
    }

    #[test]
    fn access_as_user_is_refused_in_ci_access() {
        let config = ci(
            vec![entry("g/app", &[], AccessAs::User(Empty {}), None)],
            vec![],
        );
        let err = decide_ci(&config, &agent(), "g/app", None).unwrap_err();
        assert!(err.contains("only user_access"), "{err}");
    }

    fn users(access_as: AccessAs, projects: &[&str], groups: &[&str]) -> AgentConfig {
        let entries = |ids: &[&str]| {
            ids.iter()
                .map(|id| UserAccessEntry { id: (*id).into() })
                .collect()
        };
        AgentConfig {
            user_access: UserAccessConfig {
                access_as,
                projects: entries(projects),
                groups: entries(groups),
            },
            ..AgentConfig::default()
        }
    }

    fn facts(projects: &[(&str, Option<Role>)], groups: &[(&str, Option<Role>)]) -> UserFacts {
        let own = |v: &[(&str, Option<Role>)]| v.iter().map(|(p, r)| ((*p).into(), *r)).collect();
        UserFacts {
            username: "alice".into(),
            projects: own(projects),
            groups: own(groups),
        }
    }

    #[test]
    fn users_need_developer_in_a_listed_project_or_group() {
        let config = users(
            AccessAs::User(Empty {}),
            &["g/app", "g/lib"],
            &["team", "x/y"],
        );
        let (projects, groups) = user_access_targets(&config);
        assert_eq!(projects, ["g/app", "g/lib"]);
        assert_eq!(groups, ["team"], "subgroup ids are never asked about");

        let grant = decide_user(
            &config,
            &agent(),
            &facts(
                &[
                    ("G/App", Some(Role::Developer)),
                    ("g/lib", Some(Role::Reporter)),
                ],
                &[("team", Some(Role::Owner))],
            ),
        )
        .unwrap();
        assert_eq!(grant.projects, [("g/app".to_owned(), Role::Developer)]);
        assert_eq!(grant.groups, [("team".to_owned(), Role::Owner)]);

        for refused in [
            facts(&[("g/app", Some(Role::Reporter))], &[("team", None)]),
            facts(&[("g/app", None), ("g/lib", Some(Role::Guest))], &[]),
            facts(&[], &[]),
        ] {
            let err = decide_user(&config, &agent(), &refused).unwrap_err();
            assert!(
                err.contains("\"alice\"")
                    && err.contains("project \"g/app\"")
                    && err.contains("agent \"prod\""),
                "{err}"
            );
        }
    }

    #[test]
    fn user_access_needs_entries_and_a_user_mode() {
        let err = decide_user(
            &users(AccessAs::default(), &[], &[]),
            &agent(),
            &facts(&[], &[]),
        )
        .unwrap_err();
        assert!(err.contains("no user_access"), "{err}");
        let config = users(
            AccessAs::Impersonate(Impersonation::default()),
            &["g/app"],
            &[],
        );
        let developer = facts(&[("g/app", Some(Role::Maintainer))], &[]);
        assert!(decide_user(&config, &agent(), &developer).is_err());
        let config = users(AccessAs::default(), &["g/app"], &[]);
        let grant = decide_user(&config, &agent(), &developer).unwrap();
        assert_eq!(grant.access_as, AccessAs::default());
    }

    #[test]
    fn roles_include_every_lower_one() {
        let names: Vec<_> = Role::Developer.and_below().map(Role::as_str).collect();
        assert_eq!(names, ["guest", "planner", "reporter", "developer"]);
        assert!(Role::Maintainer >= USER_ACCESS_MIN_ROLE && Role::Reporter < USER_ACCESS_MIN_ROLE);
    }
}
