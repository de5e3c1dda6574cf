//! The admin operations from the command line: `kas agent ...` and `kas token ...` send the same GraphQL
//! documents as the explorer to a running kas, with the admin credential.

use serde_json::{Value, json};

/// Why a CLI call failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("calling {url}: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("kas refused the request ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("{0}")]
    Failed(String),
}

/// A client for kas's admin API.
#[derive(Clone)]
pub struct AdminClient {
    url: String,
    admin_token: String,
    http: reqwest::Client,
}

/// Leaves the admin token out.
impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient")
            .field("url", &self.url)
            .field("admin_token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl AdminClient {
    /// `api_url` is kas's API listener, e.g. `http://127.0.0.1:8080`.
    pub fn new(api_url: &str, admin_token: String) -> Self {
        Self {
            url: format!("{}/api/graphql", api_url.trim_end_matches('/')),
            admin_token,
            http: reqwest::Client::new(),
        }
    }

    /// Runs one document; returns `data`, or the GraphQL errors as [`CliError::Failed`].
    pub async fn execute(&self, query: &str, variables: Value) -> Result<Value, CliError> {
        let response = self
            .http
            .post(&self.url)
            .bearer_auth(&self.admin_token)
            .json(&json!({ "query": query, "variables": variables }))
            .send()
            .await
            .map_err(|source| CliError::Http {
                url: self.url.clone(),
                source,
            })?;
        let status = response.status();
        let body: Value = response.json().await.map_err(|source| CliError::Http {
            url: self.url.clone(),
            source,
        })?;
        let messages = body["errors"].as_array().map(|errors| {
            errors
                .iter()
                .filter_map(|e| e["message"].as_str())
                .collect::<Vec<_>>()
                .join("; ")
        });
        if !status.is_success() {
            return Err(CliError::Refused {
                status: status.as_u16(),
                message: messages.unwrap_or_default(),
            });
        }
        if let Some(messages) = messages {
            return Err(CliError::Failed(messages));
        }
        Ok(body["data"].clone())
    }

    /// Runs a mutation whose payload has `errors: [String]`, turning user errors into [`CliError::Failed`].
    pub async fn mutate(
        &self,
        field: &str,
        query: &str,
        variables: Value,
    ) -> Result<Value, CliError> {
        let data = self.execute(query, variables).await?;
        let payload = data[field].clone();
        let errors: Vec<&str> = payload["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if !errors.is_empty() {
            return Err(CliError::Failed(errors.join("; ")));
        }
        Ok(payload)
    }

    pub async fn create_agent(&self, project_path: &str, name: &str) -> Result<Value, CliError> {
        self.mutate(
            "createClusterAgent",
            "mutation($p: String!, $n: String!) { createClusterAgent(input: {projectPath: $p, name: $n}) { clusterAgent { id name projectPath } errors } }",
            json!({ "p": project_path, "n": name }),
        )
        .await
    }

    pub async fn create_token(
        &self,
        agent_id: &str,
        name: &str,
        description: &str,
    ) -> Result<Value, CliError> {
        self.mutate(
            "clusterAgentTokenCreate",
            "mutation($a: ID!, $n: String!, $d: String!) { clusterAgentTokenCreate(input: {clusterAgentId: $a, name: $n, description: $d}) { secret token { id createdAt } errors } }",
            json!({ "a": agent_id, "n": name, "d": description }),
        )
        .await
    }

    pub async fn revoke_token(&self, token_id: &str) -> Result<Value, CliError> {
        self.mutate(
            "clusterAgentTokenRevoke",
            "mutation($t: ID!) { clusterAgentTokenRevoke(input: {id: $t}) { errors } }",
            json!({ "t": token_id }),
        )
        .await
    }

    pub async fn delete_agent(&self, agent_id: &str) -> Result<Value, CliError> {
        self.mutate(
            "clusterAgentDelete",
            "mutation($a: ID!) { clusterAgentDelete(input: {id: $a}) { errors } }",
            json!({ "a": agent_id }),
        )
        .await
    }

    pub async fn grant_project(
        &self,
        agent_id: &str,
        project_path: &str,
    ) -> Result<Value, CliError> {
        self.mutate(
            "clusterAgentGrantProject",
            "mutation($a: ID!, $p: String!) { clusterAgentGrantProject(input: {clusterAgentId: $a, projectPath: $p}) { errors } }",
            json!({ "a": agent_id, "p": project_path }),
        )
        .await
    }

    pub async fn revoke_project(
        &self,
        agent_id: &str,
        project_path: &str,
    ) -> Result<Value, CliError> {
        self.mutate(
            "clusterAgentRevokeProject",
            "mutation($a: ID!, $p: String!) { clusterAgentRevokeProject(input: {clusterAgentId: $a, projectPath: $p}) { errors } }",
            json!({ "a": agent_id, "p": project_path }),
        )
        .await
    }

    pub async fn list_agents(&self, project_path: Option<&str>) -> Result<Value, CliError> {
        let data = self
            .execute(
                "query($p: String) { clusterAgents(projectPath: $p) { id name projectPath createdAt connected connections { connectedAt agentVersion } configStatus { commitId error updatedAt } grantedProjects manifestProjects { projectId commitSeen commitSent error updatedAt } tokens { id name description createdAt revoked } } }",
                json!({ "p": project_path }),
            )
            .await?;
        Ok(data["clusterAgents"].clone())
    }
}
