//! The test Gitea: repositories of one's own per test, created through its API, pushed to over HTTP with the
//! `git` command line, and push webhooks.

use std::path::Path;
use std::process::Command;

use serde::Deserialize;
use serde_json::json;

use crate::env::{GiteaState, test_env, unique_name};

/// Why a Gitea operation failed.
#[derive(Debug, thiserror::Error)]
pub enum GiteaError {
    #[error("Gitea request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("Gitea answered {status} to {what}: {body}")]
    Status {
        what: String,
        status: reqwest::StatusCode,
        body: String,
    },
    #[error("git {args} failed: {detail}")]
    Git { args: String, detail: String },
    #[error("cannot prepare the work tree: {0}")]
    Io(#[from] std::io::Error),
}

/// A client for the test Gitea, authenticated as its admin user.
#[derive(Debug, Clone)]
pub struct Gitea {
    pub state: GiteaState,
    http: reqwest::Client,
}

/// A repository created for one test.
#[derive(Debug, Clone, Deserialize)]
pub struct Repository {
    /// `owner/name`.
    pub full_name: String,
    pub name: String,
    /// The HTTP clone URL without credentials, as Gitea reports it.
    pub clone_url: String,
    #[serde(skip)]
    authenticated_url: String,
}

impl Repository {
    /// The clone URL with the admin credentials in it, for `git push` and for clients under test.
    pub fn authenticated_url(&self) -> &str {
        &self.authenticated_url
    }
}

impl Gitea {
    /// The Gitea of the running test environment (fails the test when there is none).
    pub fn from_env() -> Self {
        crate::cluster::install_crypto_provider();
        Self {
            state: test_env().gitea.clone(),
            http: reqwest::Client::new(),
        }
    }

    fn api(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.state.url.trim_end_matches('/'))
    }

    async fn send(
        &self,
        what: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, GiteaError> {
        let response = request
            .basic_auth(&self.state.admin_user, Some(&self.state.admin_password))
            .send()
            .await?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        Err(GiteaError::Status {
            what: what.to_owned(),
            status,
            body,
        })
    }

    /// Creates an empty repository `<prefix>-<random>` owned by the admin user.
    pub async fn create_repository(&self, prefix: &str) -> Result<Repository, GiteaError> {
        let name = unique_name(prefix);
        let body =
            json!({ "name": name, "private": false, "auto_init": false, "default_branch": "main" });
        let request = self.http.post(self.api("/user/repos")).json(&body);
        let mut repo: Repository = self
            .send("create repository", request)
            .await?
            .json()
            .await?;
        repo.authenticated_url = self.with_credentials(&repo.clone_url);
        Ok(repo)
    }

    /// Adds a push webhook that posts JSON to `url`, signed with `secret`.
    pub async fn add_push_webhook(
        &self,
        repo: &Repository,
        url: &str,
        secret: &str,
    ) -> Result<(), GiteaError> {
        let body = json!({
            "type": "gitea",
            "active": true,
            "events": ["push"],
            "config": { "url": url, "content_type": "json", "secret": secret },
        });
        let request = self
            .http
            .post(self.api(&format!("/repos/{}/hooks", repo.full_name)))
            .json(&body);
        self.send("create webhook", request).await?;
        Ok(())
    }

    /// Deletes a repository (call at the end of a passing test).
    pub async fn delete_repository(&self, repo: &Repository) -> Result<(), GiteaError> {
        let request = self
            .http
            .delete(self.api(&format!("/repos/{}", repo.full_name)));
        self.send("delete repository", request).await?;
        Ok(())
    }

    /// Creates user `<prefix>-<random>` (password `password`, no forced change); returns its name.
    pub async fn create_user(&self, prefix: &str, password: &str) -> Result<String, GiteaError> {
        let name = unique_name(prefix);
        let body = json!({
            "username": name,
            "email": format!("{name}@example.invalid"),
            "password": password,
            "must_change_password": false,
        });
        let request = self.http.post(self.api("/admin/users")).json(&body);
        self.send("create user", request).await?;
        Ok(name)
    }

    /// Creates a personal access token of `user` (authenticating as them with `password`); returns the
    /// token's name and secret.
    pub async fn create_access_token(
        &self,
        user: &str,
        password: &str,
    ) -> Result<(String, String), GiteaError> {
        #[derive(Deserialize)]
        struct Created {
            name: String,
            sha1: String,
        }
        let body = json!({
            "name": unique_name("kas"),
            "scopes": ["read:user", "read:repository", "read:organization"],
        });
        let response = self
            .http
            .post(self.api(&format!("/users/{user}/tokens")))
            .basic_auth(user, Some(password))
            .json(&body)
            .send()
            .await?;
        let status = response.status();
        if !status.is_success() {
            return Err(GiteaError::Status {
                what: format!("create a token of {user}"),
                status,
                body: response.text().await.unwrap_or_default(),
            });
        }
        let created: Created = response.json().await?;
        Ok((created.name, created.sha1))
    }

    /// Deletes personal access token `name` of `user`.
    pub async fn delete_access_token(
        &self,
        user: &str,
        password: &str,
        name: &str,
    ) -> Result<(), GiteaError> {
        let response = self
            .http
            .delete(self.api(&format!("/users/{user}/tokens/{name}")))
            .basic_auth(user, Some(password))
            .send()
            .await?;
        let status = response.status();
        if !status.is_success() {
            return Err(GiteaError::Status {
                what: format!("delete token {name} of {user}"),
                status,
                body: response.text().await.unwrap_or_default(),
            });
        }
        Ok(())
    }

    /// Makes `user` a collaborator of `repo` with `permission` (`read`, `write`, `admin`).
    pub async fn add_collaborator(
        &self,
        repo: &Repository,
        user: &str,
        permission: &str,
    ) -> Result<(), GiteaError> {
        let request = self
            .http
            .put(self.api(&format!("/repos/{}/collaborators/{user}", repo.full_name)))
            .json(&json!({ "permission": permission }));
        self.send("add collaborator", request).await?;
        Ok(())
    }

    /// Creates a private repository `<prefix>-<random>` owned by the admin user.
    pub async fn create_private_repository(&self, prefix: &str) -> Result<Repository, GiteaError> {
        let name = unique_name(prefix);
        let body =
            json!({ "name": name, "private": true, "auto_init": false, "default_branch": "main" });
        let request = self.http.post(self.api("/user/repos")).json(&body);
        let mut repo: Repository = self
            .send("create repository", request)
            .await?
            .json()
            .await?;
        repo.authenticated_url = self.with_credentials(&repo.clone_url);
        Ok(repo)
    }

    /// `http://user:password@host/...` for an `http://host/...` URL.
    fn with_credentials(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
        format!(
            "{scheme}://{}:{}@{rest}",
            self.state.admin_user, self.state.admin_password
        )
    }
}

/// Commits `files` (path, content) on top of the branch's current state in a fresh clone and pushes it over
/// HTTP; returns the new commit id. Works on an empty repository too (the first push creates the branch).
pub fn push_files(
    repo: &Repository,
    branch: &str,
    files: &[(&str, &str)],
    message: &str,
) -> Result<String, GiteaError> {
    let files: Vec<(&str, &[u8])> = files.iter().map(|(p, c)| (*p, c.as_bytes())).collect();
    Ok(Checkout::new(repo, branch)?
        .commit_and_push(&files, message)?
        .0)
}

/// A local clone of one branch of a repository, to commit and push from again and again (benchmarks time
/// the pushes).
pub struct Checkout {
    dir: tempfile::TempDir,
    branch: String,
}

impl Checkout {
    /// Clones `branch` of `repo`; of an empty repository, an empty checkout (the first push creates it).
    pub fn new(repo: &Repository, branch: &str) -> Result<Self, GiteaError> {
        let work = tempfile::tempdir()?;
        let dir = work.path();
        git(dir, &["init", "--quiet", "--initial-branch", branch])?;
        git(dir, &["remote", "add", "origin", repo.authenticated_url()])?;
        // An empty repository has no branch to fetch; then the first commit starts it.
        if git(dir, &["fetch", "--quiet", "origin", branch]).is_ok() {
            git(dir, &["reset", "--quiet", "--hard", "FETCH_HEAD"])?;
        }
        Ok(Self {
            dir: work,
            branch: branch.to_owned(),
        })
    }

    /// Writes `files` (path, content), commits and pushes; returns the new commit id and how long
    /// `git push` took.
    pub fn commit_and_push(
        &self,
        files: &[(&str, &[u8])],
        message: &str,
    ) -> Result<(String, std::time::Duration), GiteaError> {
        let dir = self.dir.path();
        for (path, content) in files {
            let file = dir.join(path);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(file, content)?;
        }
        git(dir, &["add", "--all"])?;
        git(
            dir,
            &[
                "-c",
                "user.name=test",
                "-c",
                "user.email=test@example.invalid",
                "commit",
                "--quiet",
                "-m",
                message,
            ],
        )?;
        let started = std::time::Instant::now();
        let target = format!("HEAD:refs/heads/{}", self.branch);
        git(dir, &["push", "--quiet", "origin", &target])?;
        let pushed = started.elapsed();
        Ok((git(dir, &["rev-parse", "HEAD"])?, pushed))
    }
}

fn git(dir: &Path, args: &[&str]) -> Result<String, GiteaError> {
    let output = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .map_err(|err| GiteaError::Git {
            args: args.join(" "),
            detail: err.to_string(),
        })?;
    if !output.status.success() {
        return Err(GiteaError::Git {
            args: args.join(" "),
            detail: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}
