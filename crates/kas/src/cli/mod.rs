//! The admin operations from the command line: `kas agent ...`, `kas token ...`, `kas get ...` and `kas
//! reconcile` send the same GraphQL documents as the explorer to a running kas, with the admin credential.
//! [`views`] turns the answers into records, [`output`] prints them as a table, JSON or YAML.

pub mod output;
pub mod views;

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

    // --- Kubernetes API proxy: CI tokens and kubeconfigs ---

    /// `ciTokenCreate`; the answer holds the secret (`token`) once.
    pub async fn create_ci_token(
        &self,
        project: &str,
        environment: Option<&str>,
        expires_in: Option<&str>,
        description: Option<&str>,
    ) -> Result<Value, CliError> {
        self.mutate(
            "ciTokenCreate",
            "mutation($p: String!, $e: String, $x: String, $d: String) { ciTokenCreate(input: {project: $p, environment: $e, expiresIn: $x, description: $d}) { token ciToken { id project environment description createdAt expiresAt } errors } }",
            json!({ "p": project, "e": environment, "x": expires_in, "d": description }),
        )
        .await
    }

    pub async fn list_ci_tokens(&self, project: Option<&str>) -> Result<Value, CliError> {
        let data = self
            .execute(
                "query($p: String) { ciTokens(project: $p) { id project environment description createdAt expiresAt expired revoked revokedAt } }",
                json!({ "p": project }),
            )
            .await?;
        Ok(data["ciTokens"].clone())
    }

    pub async fn revoke_ci_token(&self, id: &str) -> Result<Value, CliError> {
        self.mutate(
            "ciTokenRevoke",
            "mutation($t: ID!) { ciTokenRevoke(input: {id: $t}) { errors } }",
            json!({ "t": id }),
        )
        .await
    }

    /// A kubeconfig for `agents` with `token` in it. The secret stays here: kas gets only a CI token's
    /// SHA-256 (to find its project's namespaces) and answers with a placeholder, filled in here.
    pub async fn kubeconfig(&self, agents: &[String], token: &str) -> Result<String, CliError> {
        let sha256 = token
            .starts_with(crate::k8s_proxy::auth::ci::CI_TOKEN_PREFIX)
            .then(|| crate::tokens::hash(token));
        let payload = self
            .mutate(
                "k8sProxyKubeconfig",
                "query($a: [ID!]!, $h: String) { k8sProxyKubeconfig(agentIds: $a, ciTokenSha256: $h) { kubeconfig errors } }",
                json!({ "a": agents, "h": sha256 }),
            )
            .await?;
        let yaml = payload["kubeconfig"]
            .as_str()
            .ok_or_else(|| CliError::Failed("kas returned no kubeconfig".into()))?;
        let mut config =
            crate::k8s_proxy::kubeconfig::Kubeconfig::from_yaml(yaml).map_err(CliError::Failed)?;
        config.fill_token(token).map_err(CliError::Failed)?;
        Ok(config.to_yaml())
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

    /// What `kas get` shows, for every agent (or one): connections, configuration, manifest projects with
    /// their last sync, tokens; with `objects`, every object of the last syncs too (they can be many).
    pub async fn agents_detail(
        &self,
        agent_id: Option<&str>,
        objects: bool,
    ) -> Result<Vec<Value>, CliError> {
        let objects = if objects {
            "objects { resourceKey source result health message }"
        } else {
            ""
        };
        let fields = format!(
            "id name projectPath createdAt connected connections {{ connectedAt agentVersion podNamespace podName }} configStatus {{ commitId error updatedAt }} manifestProjects {{ projectId commitSeen commitSent error updatedAt reportsReceived lastSync {{ commitSeen commitApplied finishedAt outcome message {objects} }} }} tokens {{ id name description createdAt revoked revokedAt }}"
        );
        match agent_id {
            Some(id) => {
                let data = self
                    .execute(
                        &format!("query($a: ID!) {{ clusterAgent(id: $a) {{ {fields} }} }}"),
                        json!({ "a": id }),
                    )
                    .await?;
                match &data["clusterAgent"] {
                    Value::Null => Err(CliError::Failed(format!("agent {id} does not exist"))),
                    agent => Ok(vec![agent.clone()]),
                }
            }
            None => {
                let data = self
                    .execute(&format!("{{ clusterAgents {{ {fields} }} }}"), json!({}))
                    .await?;
                Ok(data["clusterAgents"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default())
            }
        }
    }

    /// `clusterAgentReconcile`: kas reads the agent's projects (or `project`) from Git now and the agent
    /// syncs them, even at the same commit.
    pub async fn reconcile(
        &self,
        agent_id: &str,
        project: Option<&str>,
    ) -> Result<Value, CliError> {
        self.mutate(
            "clusterAgentReconcile",
            "mutation($a: ID!, $p: String) { clusterAgentReconcile(input: {clusterAgentId: $a, projectPath: $p}) { errors } }",
            json!({ "a": agent_id, "p": project }),
        )
        .await
    }

    /// The agent's network alerts, newest last seen first (at most `first`).
    pub async fn network_alerts(&self, agent_id: &str, first: i32) -> Result<Vec<Value>, CliError> {
        let data = self
            .execute(
                "query($a: ID!, $n: Int!) { clusterAgent(id: $a) { networkAlerts(first: $n) { id policy policyKind source destination port protocol direction verdict dropReason count firstSeen lastSeen firingSince resolved resolvedAt sourceEndpoint { namespace podName ip workload } destinationEndpoint { namespace podName ip workload } } } }",
                json!({ "a": agent_id, "n": first }),
            )
            .await?;
        match &data["clusterAgent"] {
            Value::Null => Err(CliError::Failed(format!("agent {agent_id} does not exist"))),
            agent => Ok(agent["networkAlerts"]
                .as_array()
                .cloned()
                .unwrap_or_default()),
        }
    }
}
