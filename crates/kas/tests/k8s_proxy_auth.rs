//! Who may use the Kubernetes API proxy, against the real Gitea of the test environment and a kas started
//! in-process: CI tokens issued over the admin API and decided against the agent's `config.yaml` in Gitea,
//! and personal access tokens of Gitea users, organisations and collaborators created through Gitea's API.
//!
//! Run: `cargo xtask cluster up --dir …`, export what it prints, then
//! `cargo test -p kas --test k8s_proxy_auth`.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use base64::Engine;
use kas::{
    RunningKas,
    cli::AdminClient,
    k8s_proxy::{
        ProxyError,
        auth::{Authorized, Caller, Credential, CredentialKind, ProxyAuthorizer, authorizer},
        kubeconfig::Kubeconfig,
    },
};
use serde_json::{Value, json};
use test_support::env::{test_env, unique_name};

const ADMIN_TOKEN: &str = "test-admin-token";

/// Gitea's API as its admin, and as users by their passwords.
struct GiteaApi {
    url: String,
    admin: (String, String),
    http: reqwest::Client,
}

impl GiteaApi {
    fn new() -> Self {
        let gitea = &test_env().gitea;
        Self {
            url: format!("{}/api/v1", gitea.url.trim_end_matches('/')),
            admin: (gitea.admin_user.clone(), gitea.admin_password.clone()),
            http: reqwest::Client::new(),
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        auth: (&str, &str),
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.url))
            .basic_auth(auth.0, Some(auth.1));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            bail!("Gitea answered {status} to {method} {path}: {text}");
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> anyhow::Result<Value> {
        let (user, password) = (self.admin.0.clone(), self.admin.1.clone());
        self.call(method, path, (&user, &password), Some(body))
            .await
    }

    /// A new user; returns its name (its password is the name reversed plus a suffix).
    async fn user(&self, prefix: &str) -> anyhow::Result<String> {
        let name = unique_name(prefix);
        self.admin(
            reqwest::Method::POST,
            "/admin/users",
            json!({ "username": name, "email": format!("{name}@example.invalid"),
                    "password": password(&name), "must_change_password": false }),
        )
        .await?;
        Ok(name)
    }

    async fn org(&self, prefix: &str) -> anyhow::Result<String> {
        let name = unique_name(prefix);
        self.admin(
            reqwest::Method::POST,
            "/orgs",
            json!({ "username": name, "visibility": "private" }),
        )
        .await?;
        Ok(name)
    }

    /// A private repository of `org` with one commit.
    async fn repo(&self, org: &str, name: &str) -> anyhow::Result<String> {
        self.admin(
            reqwest::Method::POST,
            &format!("/orgs/{org}/repos"),
            json!({ "name": name, "private": true, "auto_init": true, "default_branch": "main" }),
        )
        .await?;
        Ok(format!("{org}/{name}"))
    }

    async fn collaborator(
        &self,
        project: &str,
        user: &str,
        permission: &str,
    ) -> anyhow::Result<()> {
        self.admin(
            reqwest::Method::PUT,
            &format!("/repos/{project}/collaborators/{user}"),
            json!({ "permission": permission }),
        )
        .await?;
        Ok(())
    }

    /// Makes `user` a member of `org` through a team with `permission` (`read`, `write`) on the code.
    async fn team_member(&self, org: &str, user: &str, permission: &str) -> anyhow::Result<()> {
        let team = self
            .admin(
                reqwest::Method::POST,
                &format!("/orgs/{org}/teams"),
                // Per-unit access, as Gitea's UI creates teams.
                json!({ "name": unique_name(permission), "units_map": { "repo.code": permission },
                        "includes_all_repositories": true }),
            )
            .await?;
        let id = team["id"].as_u64().context("team id")?;
        self.admin(
            reqwest::Method::PUT,
            &format!("/teams/{id}/members/{user}"),
            json!({}),
        )
        .await?;
        Ok(())
    }

    /// A personal access token of `user` with the scopes kas needs; returns (id, secret).
    async fn token(&self, user: &str) -> anyhow::Result<(u64, String)> {
        let created = self
            .call(
                reqwest::Method::POST,
                &format!("/users/{user}/tokens"),
                (user, &password(user)),
                Some(json!({ "name": unique_name("kas"),
                             "scopes": ["read:user", "read:repository", "read:organization"] })),
            )
            .await?;
        Ok((
            created["id"].as_u64().context("token id")?,
            created["sha1"].as_str().context("token secret")?.to_owned(),
        ))
    }

    async fn delete_token(&self, user: &str, id: u64) -> anyhow::Result<()> {
        self.call(
            reqwest::Method::DELETE,
            &format!("/users/{user}/tokens/{id}"),
            (user, &password(user)),
            None,
        )
        .await?;
        Ok(())
    }

    /// Writes (creates or replaces) one file on `main`.
    async fn write_file(&self, project: &str, path: &str, content: &str) -> anyhow::Result<()> {
        let url = format!("/repos/{project}/contents/{path}");
        let existing = self
            .call(
                reqwest::Method::GET,
                &url,
                (&self.admin.0, &self.admin.1),
                None,
            )
            .await
            .ok();
        let mut body = json!({
            "content": base64::engine::general_purpose::STANDARD.encode(content),
            "message": format!("write {path}"),
            "branch": "main",
        });
        let method = match existing.as_ref().and_then(|e| e["sha"].as_str()) {
            Some(sha) => {
                body["sha"] = json!(sha);
                reqwest::Method::PUT
            }
            None => reqwest::Method::POST,
        };
        self.admin(method, &url, body).await?;
        Ok(())
    }
}

fn password(user: &str) -> String {
    format!("pw-{}-X9!", user.chars().rev().collect::<String>())
}

/// kas in-process, reading projects from the test Gitea as its admin.
async fn start_kas(user_cache_ttl: &str) -> anyhow::Result<(RunningKas, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let gitea = &test_env().gitea;
    std::fs::write(dir.path().join("admin-token"), ADMIN_TOKEN)?;
    std::fs::write(dir.path().join("git-password"), &gitea.admin_password)?;
    let yaml = format!(
        "listen:\n  agent: 127.0.0.1:0\n  api: 127.0.0.1:0\n\
         data_dir: {data}\nadmin_token_file: {dir}/admin-token\n\
         git:\n  base_url: {url}\n  username: {user}\n  password_file: {dir}/git-password\n  poll_period: 1s\n\
         k8s_proxy:\n  url: https://proxy.example:8154/\n  user_cache_ttl: {user_cache_ttl}\n",
        data = dir.path().join("data").display(),
        dir = dir.path().display(),
        url = gitea.url,
        user = gitea.admin_user,
    );
    let config = gitops_config::ServerConfig::parse("kas.yaml", &yaml)?;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    Ok((kas::start(config).await?, dir))
}

fn credential(kind: CredentialKind, agent_id: u64, secret: &str) -> Credential {
    Credential {
        kind,
        agent_id,
        secret: secret.to_owned(),
    }
}

async fn authorize(
    authorizer: &dyn ProxyAuthorizer,
    kind: CredentialKind,
    agent_id: u64,
    secret: &str,
) -> Result<Authorized, ProxyError> {
    authorizer
        .authorize(&credential(kind, agent_id, secret))
        .await
}

/// Waits until `revoked` fires; returns how long that took, or fails after `limit`.
async fn cancelled_within(authorized: &Authorized, limit: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    tokio::time::timeout(limit, authorized.revoked.cancelled())
        .await
        .with_context(|| format!("the open request was not ended within {limit:?}"))?;
    Ok(started.elapsed())
}

fn agent_id(created: &Value) -> anyhow::Result<u64> {
    let gid = created["clusterAgent"]["id"].as_str().context("agent id")?;
    Ok(gid.rsplit('/').next().context("gid")?.parse()?)
}

const CI_CONFIG: &str = "\
ci_access:
  projects:
  - id: {app}
    default_namespace: apps
    environments: [production, review/*]
    access_as:
      ci_job: {}
  groups:
  - id: {org}
    access_as:
      impersonate:
        username: deployer
        groups: [ops]
";

#[tokio::test]
async fn ci_tokens_are_issued_shown_once_and_decided_by_the_agents_config() -> anyhow::Result<()> {
    let gitea = GiteaApi::new();
    let org = gitea.org("ci").await?;
    let config_project = gitea.repo(&org, "clusters").await?;
    let app = gitea.repo(&org, "app").await?;
    let other_org = gitea.org("elsewhere").await?;
    let outsider = gitea.repo(&other_org, "tool").await?;
    let config = CI_CONFIG.replace("{app}", &app).replace("{org}", &org);
    gitea
        .write_file(&config_project, ".gitlab/agents/prod/config.yaml", &config)
        .await?;

    let (kas, dir) = start_kas("10s").await?;
    let admin = AdminClient::new(&format!("http://{}", kas.api_addr), ADMIN_TOKEN.into());
    let agent = agent_id(&admin.create_agent(&config_project, "prod").await?)?;
    let authorizer = authorizer(kas.state.clone());
    let ci = CredentialKind::CiToken;

    // Issued over the admin API: the secret once, never in the list.
    let created = admin
        .create_ci_token(&app, Some("production"), Some("1h"), Some("deploys"))
        .await?;
    let secret = created["token"].as_str().context("secret")?.to_owned();
    assert!(secret.starts_with("kasci_"), "{secret}");
    let listed = admin.list_ci_tokens(Some(&app)).await?.to_string();
    assert!(
        listed.contains("\"deploys\"") && !listed.contains(&secret),
        "{listed}"
    );

    // Allowed by the project entry, as the CI job, with its namespace.
    let allowed = authorize(&*authorizer, ci, agent, &secret).await?;
    let token_id = match &allowed.caller {
        Caller::CiJob {
            token_id,
            project,
            environment,
        } => {
            assert_eq!(
                (project.as_str(), environment.as_deref()),
                (app.as_str(), Some("production"))
            );
            *token_id
        }
        other => bail!("unexpected caller {other:?}"),
    };
    let identity = allowed
        .impersonation
        .clone()
        .context("ci_job impersonates")?;
    assert_eq!(identity.username, format!("gitlab:ci_job:{token_id}"));
    assert!(
        identity
            .groups
            .contains(&format!("gitlab:project_env:{app}:production")),
        "{identity:?}"
    );
    assert_eq!(allowed.default_namespace.as_deref(), Some("apps"));
    assert!(!allowed.revoked.is_cancelled());

    // The kubeconfig for it: the context name, the token, the namespace; the secret stays on the client.
    let yaml = admin.kubeconfig(&[agent.to_string()], &secret).await?;
    let parsed = Kubeconfig::from_yaml(&yaml).map_err(anyhow::Error::msg)?;
    assert_eq!(parsed.contexts[0].name, format!("{config_project}:prod"));
    assert_eq!(
        parsed.contexts[0].context.namespace.as_deref(),
        Some("apps")
    );
    assert_eq!(parsed.users[0].user.token, format!("ci:{agent}:{secret}"));
    assert_eq!(
        parsed.clusters[0].cluster.server,
        "https://proxy.example:8154"
    );
    // kubectl reads it as is: the context, its namespace and the credential it would send.
    let file = dir.path().join("kubeconfig");
    std::fs::write(&file, &yaml)?;
    let view = std::process::Command::new(&test_env().tools.kubectl)
        .args([
            "config",
            "view",
            "--raw",
            "--minify",
            "-o",
            "json",
            "--kubeconfig",
        ])
        .arg(&file)
        .output()?;
    assert!(
        view.status.success(),
        "{}",
        String::from_utf8_lossy(&view.stderr)
    );
    let view: Value = serde_json::from_slice(&view.stdout)?;
    assert_eq!(view["current-context"], format!("{config_project}:prod"));
    assert_eq!(view["contexts"][0]["context"]["namespace"], "apps");
    assert_eq!(
        view["users"][0]["user"]["token"],
        format!("ci:{agent}:{secret}")
    );
    assert_eq!(
        view["clusters"][0]["cluster"]["server"],
        "https://proxy.example:8154"
    );

    // Another environment of the project: the project entry decides, the group entry does not widen it.
    let staging = admin
        .create_ci_token(&app, Some("staging"), None, None)
        .await?;
    let err = authorize(&*authorizer, ci, agent, staging["token"].as_str().unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.status_code(), 403, "{err}");
    assert!(
        err.to_string().contains("\"staging\"") && err.to_string().contains("\"prod\""),
        "{err}"
    );

    // Another project of the owner: the group entry, as the static identity.
    let config_token = admin
        .create_ci_token(&config_project, None, None, None)
        .await?;
    let as_agent = authorize(
        &*authorizer,
        ci,
        agent,
        config_token["token"].as_str().unwrap(),
    )
    .await?;
    assert_eq!(
        as_agent.impersonation, None,
        "the configuration project is allowed as the agent"
    );
    let tool = gitea.repo(&org, "tool").await?;
    let group_token = admin.create_ci_token(&tool, None, None, None).await?;
    let by_group = authorize(
        &*authorizer,
        ci,
        agent,
        group_token["token"].as_str().unwrap(),
    )
    .await?;
    assert_eq!(
        by_group
            .impersonation
            .as_ref()
            .context("impersonate")?
            .username,
        "deployer"
    );

    // A project of another owner is refused, naming the project and the agent.
    let foreign = admin.create_ci_token(&outsider, None, None, None).await?;
    let err = authorize(&*authorizer, ci, agent, foreign["token"].as_str().unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ProxyError::Forbidden(_)) && err.to_string().contains(&outsider),
        "{err}"
    );

    // Forged, unknown agent, expired.
    let forged = format!("kasci_{}", "A".repeat(43));
    assert_eq!(
        authorize(&*authorizer, ci, agent, &forged)
            .await
            .unwrap_err(),
        ProxyError::InvalidToken
    );
    assert_eq!(
        authorize(&*authorizer, ci, 999_999, &secret)
            .await
            .unwrap_err(),
        ProxyError::UnknownAgent { agent_id: 999_999 }
    );
    let short = admin
        .create_ci_token(&app, Some("production"), Some("3s"), None)
        .await?;
    let short_lived = authorize(&*authorizer, ci, agent, short["token"].as_str().unwrap()).await?;
    let took = cancelled_within(&short_lived, Duration::from_secs(5)).await?;
    println!("an open request of an expiring CI token ended {took:?} after it was checked");
    let err = authorize(&*authorizer, ci, agent, short["token"].as_str().unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, ProxyError::ExpiredToken { .. }), "{err}");
    for bad in [Some("0s"), Some("400d")] {
        assert!(
            admin.create_ci_token(&app, None, bad, None).await.is_err(),
            "{bad:?}"
        );
    }
    assert!(
        admin
            .create_ci_token(&format!("{org}/missing"), None, None, None)
            .await
            .is_err()
    );

    // Revoking ends the open request within a second, and the token is refused saying so.
    let revoked_at = Instant::now();
    admin.revoke_ci_token(&token_id.to_string()).await?;
    let took = cancelled_within(&allowed, Duration::from_secs(1)).await?;
    println!(
        "revoking a CI token ended its open request in {:?}",
        revoked_at.elapsed().max(took)
    );
    let err = authorize(&*authorizer, ci, agent, &secret)
        .await
        .unwrap_err();
    assert!(matches!(err, ProxyError::RevokedToken { .. }), "{err}");

    // The agent's config stops allowing the group: the open request of the group's token ends.
    gitea
        .write_file(
            &config_project,
            ".gitlab/agents/prod/config.yaml",
            &CI_CONFIG
                .replace("{app}", &app)
                .replace("  groups:\n  - id: {org}", "  groups:\n  - id: nobody"),
        )
        .await?;
    // The group's request, open since before the change, ends once kas reads the new file (it polls
    // every second here); the configuration project's request, still allowed as before, stays open.
    let took = cancelled_within(&by_group, Duration::from_secs(15)).await?;
    println!("a config.yaml change ended an open request it no longer allows in {took:?}");
    assert!(!as_agent.revoked.is_cancelled());
    let err = authorize(
        &*authorizer,
        ci,
        agent,
        group_token["token"].as_str().unwrap(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.status_code(), 403, "{err}");

    kas.shutdown().await;
    Ok(())
}

const USER_CONFIG: &str = "\
user_access:
  access_as:
    user: {}
  projects:
  - id: {app}
  groups:
  - id: {team_org}
";

#[tokio::test]
async fn gitea_tokens_of_developers_are_allowed_and_revocation_ends_them_within_the_ttl()
-> anyhow::Result<()> {
    let gitea = GiteaApi::new();
    let org = gitea.org("users").await?;
    let config_project = gitea.repo(&org, "clusters").await?;
    let app = gitea.repo(&org, "app").await?;
    let team_org = gitea.org("team").await?;
    gitea
        .write_file(
            &config_project,
            ".gitlab/agents/dev/config.yaml",
            &USER_CONFIG
                .replace("{app}", &app)
                .replace("{team_org}", &team_org),
        )
        .await?;
    let (developer, reader, outsider, member, team_reader) = (
        gitea.user("dev").await?,
        gitea.user("reader").await?,
        gitea.user("outsider").await?,
        gitea.user("member").await?,
        gitea.user("teamread").await?,
    );
    gitea.collaborator(&app, &developer, "write").await?;
    gitea.collaborator(&app, &reader, "read").await?;
    gitea.team_member(&team_org, &member, "write").await?;
    gitea.team_member(&team_org, &team_reader, "read").await?;

    let ttl = Duration::from_secs(2);
    let (kas, _dir) = start_kas("2s").await?;
    let admin = AdminClient::new(&format!("http://{}", kas.api_addr), ADMIN_TOKEN.into());
    let agent = agent_id(&admin.create_agent(&config_project, "dev").await?)?;
    let authorizer = authorizer(kas.state.clone());
    let pat = CredentialKind::PersonalAccessToken;

    // A write collaborator is a Developer of the project.
    let (developer_token_id, developer_token) = gitea.token(&developer).await?;
    let allowed = authorize(&*authorizer, pat, agent, &developer_token).await?;
    assert_eq!(
        allowed.caller,
        Caller::User {
            username: developer.clone()
        }
    );
    let identity = allowed.impersonation.clone().context("user impersonates")?;
    assert_eq!(identity.username, format!("gitlab:user:{developer}"));
    assert!(
        identity
            .groups
            .contains(&format!("gitlab:project_role:{app}:developer")),
        "{identity:?}"
    );
    assert!(
        !identity.groups.iter().any(|g| g.ends_with(":maintainer")),
        "{identity:?}"
    );

    // A write team member of the organisation is a Developer of the group.
    let (_, member_token) = gitea.token(&member).await?;
    let by_group = authorize(&*authorizer, pat, agent, &member_token).await?;
    let groups = by_group.impersonation.context("user impersonates")?.groups;
    assert!(
        groups.contains(&format!("gitlab:group_role:{team_org}:developer")),
        "{groups:?}"
    );
    assert!(
        !groups.iter().any(|g| g.starts_with("gitlab:project_role:")),
        "{groups:?}"
    );

    // Read-only collaborators and team members, and strangers, are refused, naming agent and entries.
    for user in [&reader, &team_reader, &outsider] {
        let (_, token) = gitea.token(user).await?;
        let err = authorize(&*authorizer, pat, agent, &token)
            .await
            .unwrap_err();
        assert!(matches!(err, ProxyError::Forbidden(_)), "{user}: {err}");
        assert!(
            err.to_string().contains(&app) && err.to_string().contains("\"dev\""),
            "{err}"
        );
    }
    assert_eq!(
        authorize(&*authorizer, pat, agent, "not-a-gitea-token")
            .await
            .unwrap_err(),
        ProxyError::InvalidToken
    );

    // Revoked in Gitea: the open request ends and the token is refused, both within the cache TTL.
    let revoked_at = Instant::now();
    gitea.delete_token(&developer, developer_token_id).await?;
    let took = cancelled_within(&allowed, ttl + Duration::from_secs(2)).await?;
    println!("revoking a Gitea token ended its open request in {took:?} (TTL {ttl:?})");
    let err = authorize(&*authorizer, pat, agent, &developer_token).await;
    assert!(revoked_at.elapsed() <= ttl + Duration::from_secs(2));
    assert_eq!(err.unwrap_err(), ProxyError::InvalidToken);

    // Losing the membership ends a member's open request too.
    let (_, developer_token) = gitea.token(&developer).await?;
    let open = authorize(&*authorizer, pat, agent, &developer_token).await?;
    gitea.collaborator(&app, &developer, "read").await?;
    cancelled_within(&open, ttl + Duration::from_secs(2)).await?;

    kas.shutdown().await;
    Ok(())
}

/// Runs the `kas` binary against the in-process kas (without blocking it); returns stdout, failing on a
/// non-zero exit.
async fn kas_cli(kas: &RunningKas, args: &[&str]) -> anyhow::Result<String> {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_kas"))
        .args(args)
        .env("KAS_API_URL", format!("http://{}", kas.api_addr))
        .env("KAS_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .await?;
    if !output.status.success() {
        bail!(
            "kas {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}

#[tokio::test]
async fn the_cli_issues_lists_and_revokes_ci_tokens_and_prints_kubeconfigs() -> anyhow::Result<()> {
    let gitea = GiteaApi::new();
    let org = gitea.org("cli").await?;
    let config_project = gitea.repo(&org, "clusters").await?;
    let app = gitea.repo(&org, "app").await?;
    let config = format!(
        "ci_access:\n  projects:\n  - id: {app}\n    default_namespace: team-a\n    environments: [staging]\n"
    );
    gitea
        .write_file(&config_project, ".gitlab/agents/edge/config.yaml", &config)
        .await?;
    let (kas, _dir) = start_kas("10s").await?;
    let admin = AdminClient::new(&format!("http://{}", kas.api_addr), ADMIN_TOKEN.into());
    let agent = agent_id(&admin.create_agent(&config_project, "edge").await?)?.to_string();

    let created: Value = serde_json::from_str(
        &kas_cli(
            &kas,
            &[
                "ci-token",
                "create",
                "--project",
                &app,
                "--environment",
                "staging",
                "--expires-in",
                "2d",
            ],
        )
        .await?,
    )?;
    let secret = created["token"].as_str().context("the secret")?;
    let id = created["ciToken"]["id"].as_str().context("the id")?;
    let expires = humantime::parse_rfc3339(created["ciToken"]["expiresAt"].as_str().unwrap())?;
    let lifetime = expires.duration_since(std::time::SystemTime::now())?;
    assert!(
        lifetime > Duration::from_secs(47 * 3600) && lifetime <= Duration::from_secs(48 * 3600)
    );

    let listed = kas_cli(&kas, &["ci-token", "list", "--project", &app]).await?;
    assert!(listed.contains(id) && !listed.contains(secret), "{listed}");

    let yaml = kas_cli(&kas, &["kubeconfig", "--agent", &agent, "--token", secret]).await?;
    let parsed = Kubeconfig::from_yaml(&yaml).map_err(anyhow::Error::msg)?;
    assert_eq!(parsed.current_context, format!("{config_project}:edge"));
    assert_eq!(
        parsed.contexts[0].context.namespace.as_deref(),
        Some("team-a")
    );
    assert_eq!(parsed.users[0].user.token, format!("ci:{agent}:{secret}"));
    let pat_yaml = kas_cli(
        &kas,
        &["kubeconfig", "--agent", &agent, "--token", "gitea-pat"],
    )
    .await?;
    let pat = Kubeconfig::from_yaml(&pat_yaml).map_err(anyhow::Error::msg)?;
    assert_eq!(pat.users[0].user.token, format!("pat:{agent}:gitea-pat"));
    assert_eq!(pat.contexts[0].context.namespace, None);

    kas_cli(&kas, &["ci-token", "revoke", id]).await?;
    let listed: Value = serde_json::from_str(&kas_cli(&kas, &["ci-token", "list"]).await?)?;
    let revoked = listed
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["id"] == id)
        .context("listed")?;
    assert_eq!(revoked["revoked"], true);
    let err = kas_cli(&kas, &["kubeconfig", "--agent", &agent, "--token", secret])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("revoked"), "{err}");
    let err = kas_cli(
        &kas,
        &[
            "ci-token",
            "create",
            "--project",
            &app,
            "--expires-in",
            "0s",
        ],
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("expire"), "{err}");

    kas.shutdown().await;
    Ok(())
}
