//! Personal access tokens of the Git server (Gitea): who a token belongs to and the user's role in the
//! agent's `user_access` projects and groups, asked of Gitea's REST API (`<git.base_url>/api/v1`) with the
//! token itself, and cached per token for at most `k8s_proxy.user_cache_ttl` (≤ 10 s) so that a token
//! revoked in Gitea stops working within that time.
//!
//! What Gitea is asked (checked against Gitea 1.26):
//! - `GET /user`: who the token is (401: unknown or revoked token);
//! - `GET /repos/{owner}/{repo}`: its `permissions` (`admin`, `push`, `pull`) are the user's *effective*
//!   access, teams and their per-unit permissions included. (`…/collaborators/{user}/permission`, which a
//!   user may ask about themself, leaves out teams whose access is per unit, so it is not used.)
//! - `GET /user/teams`: the user's teams in every organisation, with their permission (`owner`, `admin`,
//!   `write`, `read`, or `none` plus per-unit `units_map`). (`/users/{user}/orgs/{org}/permissions`
//!   likewise says "no access" for per-unit teams.)
//!
//! Gitea's permissions map to GitLab's roles:
//!
//! | Gitea repository `permissions` | Gitea team (the highest of the user's in the organisation) | GitLab role |
//! |---|---|---|
//! | `admin`, and the repository is the user's own or they own its organisation | `owner` (the Owners team) | Owner |
//! | `admin` | `admin` | Maintainer |
//! | `push` | `write`, or `repo.code: write` | Developer |
//! | `pull` | `read`, or `repo.code: read` | Reporter |
//! | not visible | not a member | — |
//!
//! A `user_access.groups` id that is the user's own username counts as Owner (a user owns their namespace).
//! The token is sent only to Gitea, and never logged: its cache key is its SHA-256.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use futures::future::try_join_all;
use serde::Deserialize;

use super::{
    ProxyError,
    auth::access::{Role, UserFacts, same_path},
};

/// How long one call to Gitea may take before the Git server counts as unavailable.
const GITEA_TIMEOUT: Duration = Duration::from_secs(5);
/// Calls to Gitea at once for one token's projects and groups.
const CONCURRENT_CALLS: usize = 8;
/// Cache entries kept before stale ones are swept (each is one token's answer).
const SWEEP_AT: usize = 4096;

/// Gitea's REST API, asked with a user's token.
pub struct GitServerApi {
    /// `<git.base_url>/api/v1`, without credentials.
    api_url: String,
    extra_ca_pem: Option<Vec<u8>>,
    client: OnceLock<Result<reqwest::Client, String>>,
}

impl std::fmt::Debug for GitServerApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitServerApi")
            .field("api_url", &self.api_url)
            .finish_non_exhaustive()
    }
}

/// A user or organisation as Gitea writes it (`login` for users and repository owners; organisations in
/// teams carry `username` and `name`).
#[derive(Debug, Deserialize)]
struct GiteaUser {
    #[serde(default)]
    login: String,
    #[serde(default)]
    username: String,
}

impl GiteaUser {
    fn login_or_name(&self) -> &str {
        if self.login.is_empty() {
            &self.username
        } else {
            &self.login
        }
    }
}

#[derive(Debug, Deserialize)]
struct Repository {
    owner: GiteaUser,
    #[serde(default)]
    permissions: RepoPermissions,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RepoPermissions {
    admin: bool,
    push: bool,
    pull: bool,
}

#[derive(Debug, Deserialize)]
struct Team {
    #[serde(default)]
    permission: String,
    #[serde(default)]
    units_map: HashMap<String, String>,
    organization: Option<GiteaUser>,
}

/// GitLab's role for a Gitea access mode (`owner`, `admin`, `write`, `read`; `None`: no access).
pub fn role_of_access_mode(mode: &str) -> Option<Role> {
    match mode {
        "owner" => Some(Role::Owner),
        "admin" => Some(Role::Maintainer),
        "write" => Some(Role::Developer),
        "read" => Some(Role::Reporter),
        _ => None,
    }
}

fn role_of_repo_permissions(p: &RepoPermissions) -> Option<Role> {
    if p.admin {
        Some(Role::Maintainer)
    } else if p.push {
        Some(Role::Developer)
    } else if p.pull {
        Some(Role::Reporter)
    } else {
        None
    }
}

/// A team's role: its permission, or for a per-unit team (`none`) its access to the code.
fn role_of_team(team: &Team) -> Option<Role> {
    let code = team.units_map.get("repo.code").map(String::as_str);
    role_of_access_mode(&team.permission).max(code.and_then(role_of_access_mode))
}

/// A path segment Gitea accepts for owners and repositories; anything else is never put into a URL.
fn is_plain_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

impl GitServerApi {
    /// `base_url` is kas's `git.base_url` (credentials in it are dropped); `extra_ca_pem` its `git.ca_file`.
    pub fn new(base_url: &str, extra_ca_pem: Option<Vec<u8>>) -> Self {
        let base = match base_url.split_once("://") {
            Some((scheme, rest)) => {
                let rest = rest.split_once('@').map_or(rest, |(_, host)| host);
                format!("{scheme}://{rest}")
            }
            None => base_url.to_owned(),
        };
        Self {
            api_url: format!("{}/api/v1", base.trim_end_matches('/')),
            extra_ca_pem,
            client: OnceLock::new(),
        }
    }

    fn client(&self) -> Result<&reqwest::Client, ProxyError> {
        self.client
            .get_or_init(|| {
                let mut builder = reqwest::Client::builder().timeout(GITEA_TIMEOUT);
                if let Some(pem) = &self.extra_ca_pem {
                    let certificates =
                        reqwest::Certificate::from_pem_bundle(pem).map_err(|e| e.to_string())?;
                    builder = builder.tls_certs_merge(certificates);
                }
                builder.build().map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| ProxyError::GitServerUnavailable(format!("no HTTP client: {e}")))
    }

    /// GETs `path` with the token; `Ok(None)` for 404 and 403 (not visible, or not allowed to ask).
    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        token: &str,
        path: &str,
    ) -> Result<Option<T>, ProxyError> {
        let url = format!("{}{path}", self.api_url);
        let unavailable = |e: String| ProxyError::GitServerUnavailable(format!("GET {url}: {e}"));
        let response = self
            .client()?
            .get(&url)
            .header(http::header::AUTHORIZATION, format!("token {token}"))
            .header(http::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| unavailable(e.without_url().to_string()))?;
        match response.status() {
            s if s.is_success() => response
                .json()
                .await
                .map(Some)
                .map_err(|e| unavailable(format!("unreadable answer: {}", e.without_url()))),
            reqwest::StatusCode::UNAUTHORIZED => Err(ProxyError::InvalidToken),
            reqwest::StatusCode::NOT_FOUND | reqwest::StatusCode::FORBIDDEN => Ok(None),
            status => Err(unavailable(format!("answered {status}"))),
        }
    }

    /// The token's user; [`ProxyError::InvalidToken`] when Gitea does not know the token.
    pub async fn username(&self, token: &str) -> Result<String, ProxyError> {
        let user: GiteaUser = self
            .get(token, "/user")
            .await?
            .ok_or(ProxyError::InvalidToken)?;
        if !is_plain_segment(&user.login) {
            return Err(ProxyError::GitServerUnavailable(format!(
                "Gitea named the user {:?}, which is not a username",
                user.login
            )));
        }
        Ok(user.login)
    }

    /// The user's role in `owner/name`, from their effective permissions on it.
    pub async fn project_role(
        &self,
        token: &str,
        username: &str,
        project: &str,
    ) -> Result<Option<Role>, ProxyError> {
        let Some((owner, name)) = project.split_once('/') else {
            return Ok(None);
        };
        if !(is_plain_segment(owner) && is_plain_segment(name)) {
            return Ok(None);
        }
        let repo: Option<Repository> = self.get(token, &format!("/repos/{owner}/{name}")).await?;
        let Some(repo) = repo else {
            return Ok(None);
        };
        let role = role_of_repo_permissions(&repo.permissions);
        if role == Some(Role::Maintainer) {
            let owns = same_path(&repo.owner.login, username)
                || self
                    .organization_roles(token)
                    .await?
                    .get(&repo.owner.login.to_lowercase())
                    == Some(&Role::Owner);
            if owns {
                return Ok(Some(Role::Owner));
            }
        }
        Ok(role)
    }

    /// The user's highest team role in each organisation they belong to (lowercased names).
    pub async fn organization_roles(
        &self,
        token: &str,
    ) -> Result<HashMap<String, Role>, ProxyError> {
        const PAGE: usize = 50;
        let mut roles: HashMap<String, Role> = HashMap::new();
        for page in 1.. {
            let teams: Vec<Team> = self
                .get(token, &format!("/user/teams?limit={PAGE}&page={page}"))
                .await?
                .unwrap_or_default();
            for team in &teams {
                if let (Some(org), Some(role)) = (&team.organization, role_of_team(team)) {
                    let entry = roles
                        .entry(org.login_or_name().to_lowercase())
                        .or_insert(role);
                    *entry = (*entry).max(role);
                }
            }
            if teams.len() < PAGE || page >= 100 {
                break;
            }
        }
        Ok(roles)
    }

    /// Everything [`super::auth::access::decide_user`] needs about the token's user.
    pub async fn user_facts(
        &self,
        token: &str,
        projects: &[String],
        groups: &[String],
    ) -> Result<UserFacts, ProxyError> {
        let username = self.username(token).await?;
        let user = username.as_str();
        let mut project_roles = Vec::with_capacity(projects.len());
        for chunk in projects.chunks(CONCURRENT_CALLS) {
            let roles =
                try_join_all(chunk.iter().map(|p| self.project_role(token, user, p))).await?;
            project_roles.extend(chunk.iter().cloned().zip(roles));
        }
        let organizations = if groups.iter().any(|g| !same_path(g, user)) {
            self.organization_roles(token).await?
        } else {
            HashMap::new()
        };
        let group_roles = groups
            .iter()
            .map(|g| {
                let role = if same_path(g, user) {
                    Some(Role::Owner)
                } else {
                    organizations.get(&g.to_lowercase()).copied()
                };
                (g.clone(), role)
            })
            .collect();
        Ok(UserFacts {
            username,
            projects: project_roles,
            groups: group_roles,
        })
    }
}

/// One token's last answer.
#[derive(Debug, Clone)]
struct Cached {
    at: Instant,
    /// `Err` only for [`ProxyError::InvalidToken`]: an unknown token stays unknown for the TTL too, so a
    /// flood of bad tokens costs Gitea one call each per TTL.
    facts: Result<UserFacts, ProxyError>,
}

impl Cached {
    fn covers(&self, projects: &[String], groups: &[String]) -> bool {
        match &self.facts {
            Err(_) => true,
            Ok(facts) => {
                projects
                    .iter()
                    .all(|p| facts.projects.iter().any(|(q, _)| q == p))
                    && groups
                        .iter()
                        .all(|g| facts.groups.iter().any(|(h, _)| h == g))
            }
        }
    }
}

/// The Git server's answers per token (by SHA-256), each reused for at most `ttl`. Concurrent requests of
/// one token wait for a single round of calls.
#[derive(Debug)]
pub struct UserCache {
    ttl: Duration,
    entries: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Cached>>>>>,
}

impl UserCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::default(),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The facts about the token's user for these projects and groups, and when Gitea gave them (they are
    /// good until that instant plus the TTL).
    pub async fn facts(
        &self,
        api: &GitServerApi,
        token: &str,
        projects: &[String],
        groups: &[String],
    ) -> Result<(UserFacts, Instant), ProxyError> {
        let key = crate::tokens::hash(token);
        let slot = {
            let mut entries = self.entries.lock().expect("user cache lock");
            if entries.len() >= SWEEP_AT {
                entries.retain(|_, slot| {
                    Arc::strong_count(slot) > 1
                        || slot
                            .try_lock()
                            .is_ok_and(|c| c.as_ref().is_some_and(|c| c.at.elapsed() < self.ttl))
                });
            }
            entries.entry(key).or_default().clone()
        };
        let mut cached = slot.lock().await;
        if let Some(c) = cached.as_ref()
            && c.at.elapsed() < self.ttl
            && c.covers(projects, groups)
        {
            return c.facts.clone().map(|f| (f, c.at));
        }
        let at = Instant::now();
        let facts = api.user_facts(token, projects, groups).await;
        match &facts {
            Ok(_) | Err(ProxyError::InvalidToken) => {
                *cached = Some(Cached {
                    at,
                    facts: facts.clone(),
                });
            }
            // Not remembered: the next request asks again.
            Err(_) => *cached = None,
        }
        facts.map(|f| (f, at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gitea_permissions_map_to_gitlab_roles() {
        assert_eq!(role_of_access_mode("owner"), Some(Role::Owner));
        assert_eq!(role_of_access_mode("admin"), Some(Role::Maintainer));
        assert_eq!(role_of_access_mode("write"), Some(Role::Developer));
        assert_eq!(role_of_access_mode("read"), Some(Role::Reporter));
        assert_eq!(role_of_access_mode("none"), None);
        let repo =
            |admin, push, pull| role_of_repo_permissions(&RepoPermissions { admin, push, pull });
        assert_eq!(repo(true, true, true), Some(Role::Maintainer));
        assert_eq!(repo(false, true, true), Some(Role::Developer));
        assert_eq!(repo(false, false, true), Some(Role::Reporter));
        assert_eq!(repo(false, false, false), None);
        // Teams as Gitea 1.26 answers `/user/teams`: per-unit teams say `none` and list their units.
        let team = |json: &str| role_of_team(&serde_json::from_str::<Team>(json).unwrap());
        assert_eq!(
            team(
                r#"{"permission":"none","units_map":{"repo.code":"write","repo.issues":"read"},"organization":{"username":"o"}}"#
            ),
            Some(Role::Developer)
        );
        assert_eq!(
            team(
                r#"{"permission":"none","units_map":{"repo.issues":"write"},"organization":null}"#
            ),
            None,
            "no access to the code"
        );
        assert_eq!(
            team(r#"{"permission":"owner","units_map":{}}"#),
            Some(Role::Owner)
        );
        assert_eq!(team(r#"{"permission":"admin"}"#), Some(Role::Maintainer));
    }

    #[test]
    fn credentials_in_the_base_url_are_dropped_and_odd_paths_never_reach_a_url() {
        let api = GitServerApi::new("https://kas:secret@git.example.com/", None);
        assert_eq!(api.api_url, "https://git.example.com/api/v1");
        assert!(!format!("{api:?}").contains("secret"));
        for bad in ["", "..", "a/b", "a?b", "a%2fb", "a b"] {
            assert!(!is_plain_segment(bad), "{bad}");
        }
        assert!(is_plain_segment("my-org.io_1"));
    }

    #[tokio::test]
    async fn an_unreachable_git_server_is_unavailable_and_not_cached() {
        // A port nothing listens on: connecting fails at once.
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", socket.local_addr().unwrap());
        drop(socket);
        let api = GitServerApi::new(&url, None);
        let cache = UserCache::new(Duration::from_secs(10));
        let err = cache.facts(&api, "t", &[], &[]).await.unwrap_err();
        assert!(matches!(err, ProxyError::GitServerUnavailable(_)), "{err}");
        assert_eq!(err.status_code(), 503);
        assert!(!err.to_string().contains("token t"), "{err}");
        let slot = cache
            .entries
            .lock()
            .unwrap()
            .values()
            .next()
            .unwrap()
            .clone();
        assert!(slot.lock().await.is_none(), "failures are asked again");
    }
}
