//! The admin API, in GraphQL, accepting GitLab's documents as the article writes them:
//! `createClusterAgent`, `clusterAgentTokenCreate`, plus `clusterAgentTokenRevoke`, `clusterAgentDelete`
//! and queries over agents, tokens (never secrets), connections and configuration status.
//! User mistakes come back in `errors`; only broken requests are GraphQL errors.

use std::{sync::Arc, time::Duration};

use async_graphql::{Context, EmptySubscription, ID, InputObject, Object, Schema, SimpleObject};
use gitops_protocol::{GetInfoRequest, agent_info_client::AgentInfoClient};

use crate::{
    KasState,
    store::{AgentRecord, StoreError, TokenRecord},
    tokens,
};

mod network_alerts;

pub type KasSchema = Schema<QueryRoot, MutationRoot, EmptySubscription>;

/// How long `liveInfo` waits for the agent's answer.
const LIVE_INFO_DEADLINE: Duration = Duration::from_secs(5);

/// The id namespace in global ids: `gid://kas/Clusters::Agent/7`.
const GID_PREFIX: &str = "gid://kas/";

pub fn schema(state: Arc<KasState>) -> KasSchema {
    Schema::build(QueryRoot, MutationRoot, EmptySubscription)
        .data(state)
        .limit_depth(12)
        .limit_complexity(500)
        .limit_recursive_depth(32)
        .finish()
}

// --- The dashboard's viewer token: the same queries, no mutation at all ---

pub type ViewerSchema = Schema<QueryRoot, async_graphql::EmptyMutation, EmptySubscription>;

/// The schema the viewer token's requests run against: a mutation cannot even be named in it.
pub fn viewer_schema(state: Arc<KasState>) -> ViewerSchema {
    Schema::build(QueryRoot, async_graphql::EmptyMutation, EmptySubscription)
        .data(state)
        .limit_depth(12)
        .limit_complexity(500)
        .limit_recursive_depth(32)
        .finish()
}

fn agent_gid(id: u64) -> ID {
    ID(format!("{GID_PREFIX}Clusters::Agent/{id}"))
}

fn token_gid(id: u64) -> ID {
    ID(format!("{GID_PREFIX}Clusters::AgentToken/{id}"))
}

/// Accepts `gid://<any>/Clusters::<kind>/N` (so GitLab-shaped ids work) or a bare `N`.
fn parse_gid(id: &str, kind: &str) -> Result<u64, String> {
    let number = match id.rsplit_once('/') {
        Some((prefix, n))
            if prefix.starts_with("gid://") && prefix.ends_with(&format!("/Clusters::{kind}")) =>
        {
            n
        }
        Some(_) => return Err(format!("{id:?} is not a Clusters::{kind} id")),
        None => id,
    };
    number
        .parse()
        .map_err(|_| format!("{id:?} is not a Clusters::{kind} id"))
}

/// 9999-12-31T23:59:59Z, the last second RFC 3339 can write.
const LAST_RFC3339_SECOND: i64 = 253_402_300_799;

/// Total: any value formats (clamped to years 1970..=9999) rather than making the resolver panic.
fn rfc3339(unix: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(unix.clamp(0, LAST_RFC3339_SECOND) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn state<'a>(ctx: &Context<'a>) -> &'a Arc<KasState> {
    ctx.data_unchecked::<Arc<KasState>>()
}

/// Agent names are DNS labels, as the directory `.gitlab/agents/<name>/` and Kubernetes objects need.
pub fn validate_agent_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "name {name:?} is invalid: it must be a DNS label (1-63 characters: lowercase letters, digits and '-', starting and ending with a letter or digit)"
        ))
    }
}

fn validate_project_path(path: &str) -> Result<(), String> {
    let ok = !path.is_empty()
        && path.len() <= 255
        && path.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "projectPath {path:?} is not a valid project path such as \"group/project\""
        ))
    }
}

pub struct ClusterAgent(AgentRecord);

#[Object]
impl ClusterAgent {
    async fn id(&self) -> ID {
        agent_gid(self.0.id)
    }
    async fn name(&self) -> &str {
        &self.0.name
    }
    async fn project_path(&self) -> &str {
        &self.0.project_path
    }
    async fn created_at(&self) -> String {
        rfc3339(self.0.created_at)
    }
    /// All tokens, active and revoked; secrets are never stored, so never shown.
    async fn tokens(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<ClusterAgentToken>> {
        Ok(state(ctx)
            .store
            .tokens_of(self.0.id)?
            .into_iter()
            .map(ClusterAgentToken)
            .collect())
    }
    /// Whether agentk holds a connection to this kas now.
    async fn connected(&self, ctx: &Context<'_>) -> bool {
        !state(ctx).connections.of_agent(self.0.id).is_empty()
    }
    /// When the agent last had no connection left to this kas (null if connected since kas started, or
    /// never connected).
    async fn last_seen_at(&self, ctx: &Context<'_>) -> Option<String> {
        state(ctx).connections.last_seen(self.0.id).map(rfc3339)
    }
    async fn connections(&self, ctx: &Context<'_>) -> Vec<AgentConnection> {
        state(ctx)
            .connections
            .of_agent(self.0.id)
            .into_iter()
            .map(|c| AgentConnection {
                connected_at: rfc3339(c.connected_at),
                agent_version: c.agent_version,
                token_id: token_gid(c.token_id),
                pod_namespace: c.pod_namespace,
                pod_name: c.pod_name,
            })
            .collect()
    }
    /// The last configuration kas read from Git for this agent, and its error if it was invalid.
    async fn config_status(
        &self,
        ctx: &Context<'_>,
    ) -> async_graphql::Result<Option<AgentConfigStatus>> {
        Ok(state(ctx)
            .store
            .config_status(self.0.id)?
            .map(|s| AgentConfigStatus {
                commit_id: s.commit_id,
                error: s.error,
                updated_at: rfc3339(s.updated_at),
            }))
    }
    /// Projects outside its owner that an admin let this agent read.
    async fn granted_projects(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<String>> {
        Ok(state(ctx).store.granted_projects(self.0.id)?)
    }
    /// The Kubernetes API proxy's audit log of this agent: its last `last` requests (default 100), oldest
    /// first.
    async fn proxy_audit(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 100, validator(minimum = 0, maximum = 1000))] last: i32,
    ) -> async_graphql::Result<Vec<ProxyAuditEntry>> {
        proxy_audit(state(ctx), self.0.id, last)
    }
    /// Per manifest project: the newest commit kas saw, the last one sent, and why delivery failed, if it did.
    async fn manifest_projects(
        &self,
        ctx: &Context<'_>,
    ) -> async_graphql::Result<Vec<ManifestProjectStatus>> {
        let store = &state(ctx).store;
        let mut out = Vec::new();
        for (project, s) in store.manifest_statuses(self.0.id)? {
            let last_sync = store.sync_record(self.0.id, &project)?.map(|r| SyncStatus {
                commit_seen: r.commit_seen,
                commit_applied: r.commit_applied,
                finished_at: rfc3339(r.finished_at),
                outcome: r.outcome.into(),
                message: r.message,
                objects: r
                    .objects
                    .into_iter()
                    .map(|o| SyncedObject {
                        resource_key: o.resource_key,
                        source: o.source,
                        result: o.result.into(),
                        health: o.health.map(Into::into),
                        message: o.message,
                    })
                    .collect(),
            });
            let reports_received = state(ctx).reconciles.reports(self.0.id, &project);
            out.push(ManifestProjectStatus {
                reports_received,
                project_id: project,
                commit_seen: s.commit_seen,
                commit_sent: s.commit_sent,
                error: s.error,
                updated_at: rfc3339(s.updated_at),
                last_sync,
            });
        }
        Ok(out)
    }
    /// Flows network policies dropped, newest `lastSeen` first, at most `first` (default 100).
    async fn network_alerts(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 100, validator(minimum = 0, maximum = 100000))] first: i32,
    ) -> async_graphql::Result<Vec<network_alerts::NetworkAlert>> {
        network_alerts::network_alerts(state(ctx), self.0.id, first)
    }
    /// The agent's alerts module as it last reported, and kas's forwarding of its alerts (null before the
    /// agent reported any).
    async fn network_alerts_status(
        &self,
        ctx: &Context<'_>,
    ) -> async_graphql::Result<Option<network_alerts::NetworkAlertsStatus>> {
        network_alerts::network_alerts_status(state(ctx), self.0.id)
    }
    /// Asks the agent itself, through its reverse tunnel (null when it is not connected).
    async fn live_info(&self, ctx: &Context<'_>) -> async_graphql::Result<Option<AgentLiveInfo>> {
        let Some(channel) = state(ctx)
            .tunnels
            .find(&self.0.id, Duration::from_secs(2))
            .await
        else {
            return Ok(None);
        };
        // The tunnel can be alive (keepalives answered) while the agent never answers the call.
        let mut client = AgentInfoClient::new(channel);
        let info = tokio::time::timeout(LIVE_INFO_DEADLINE, client.get_info(GetInfoRequest {}))
            .await
            .map_err(|_| {
                format!(
                    "agent {} did not answer GetInfo within {LIVE_INFO_DEADLINE:?}",
                    self.0.id
                )
            })??
            .into_inner();
        Ok(Some(AgentLiveInfo {
            version: info.version,
            config_commit_id: info.config_commit_id,
            log_level: info.log_level,
        }))
    }
}

pub struct ClusterAgentToken(TokenRecord);

#[Object]
impl ClusterAgentToken {
    async fn id(&self) -> ID {
        token_gid(self.0.id)
    }
    async fn name(&self) -> &str {
        &self.0.name
    }
    async fn description(&self) -> &str {
        &self.0.description
    }
    async fn created_at(&self) -> String {
        rfc3339(self.0.created_at)
    }
    async fn revoked(&self) -> bool {
        self.0.revoked_at.is_some()
    }
    async fn revoked_at(&self) -> Option<String> {
        self.0.revoked_at.map(rfc3339)
    }
    async fn cluster_agent_id(&self) -> ID {
        agent_gid(self.0.agent_id)
    }
}

#[derive(SimpleObject)]
pub struct AgentConnection {
    connected_at: String,
    agent_version: String,
    token_id: ID,
    pod_namespace: String,
    pod_name: String,
}

#[derive(SimpleObject)]
pub struct AgentConfigStatus {
    commit_id: Option<String>,
    error: Option<String>,
    updated_at: String,
}

#[derive(SimpleObject)]
pub struct ManifestProjectStatus {
    project_id: String,
    commit_seen: Option<String>,
    commit_sent: Option<String>,
    error: Option<String>,
    updated_at: String,
    /// What agentk last reported applying from this project.
    last_sync: Option<SyncStatus>,
    /// Sync reports this kas received for the project since it started: a larger number than before a
    /// `clusterAgentReconcile` means a sync finished after it.
    reports_received: u64,
}

#[derive(SimpleObject)]
pub struct SyncStatus {
    commit_seen: String,
    commit_applied: String,
    finished_at: String,
    outcome: SyncOutcome,
    message: String,
    objects: Vec<SyncedObject>,
}

#[derive(SimpleObject)]
pub struct SyncedObject {
    resource_key: String,
    source: String,
    result: ObjectResult,
    /// Null until known.
    health: Option<ObjectHealth>,
    message: String,
}

// The enums keep the words the API returned when these were strings (`synced`, `created`, `InProgress`),
// so existing queries and clients read the same values.

/// How a sync ended.
#[derive(async_graphql::Enum, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "crate::store::SyncOutcome", rename_items = "snake_case")]
pub enum SyncOutcome {
    /// Every object applied.
    Synced,
    /// Some objects failed or were skipped; nothing was pruned.
    Partial,
    /// Nothing applied.
    Failed,
}

/// What a sync did to one object.
#[derive(async_graphql::Enum, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "crate::store::ObjectResult", rename_items = "snake_case")]
pub enum ObjectResult {
    Created,
    Configured,
    Unchanged,
    Pruned,
    Failed,
    Skipped,
    /// Left the set but still in use, so not pruned.
    Kept,
}

/// kstatus' verdict on an object.
#[derive(async_graphql::Enum, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "crate::store::Health", rename_items = "PascalCase")]
pub enum ObjectHealth {
    Current,
    InProgress,
    Failed,
    Terminating,
    NotFound,
    Unknown,
}

// The Kubernetes API proxy's audit log (`clusterAgent { proxyAudit(last: N) }`).

/// One proxied request, recorded when it ended.
#[derive(SimpleObject)]
pub struct ProxyAuditEntry {
    /// When the request arrived.
    at: String,
    caller: ProxyCaller,
    /// The CI token a CI job presented (`caller: CI_JOB`).
    token_id: Option<ID>,
    /// The CI token's project (`caller: CI_JOB`).
    project: Option<String>,
    /// The CI token's environment, if it names one.
    environment: Option<String>,
    /// The Git server user (`caller: USER`).
    username: Option<String>,
    verb: KubernetesVerb,
    /// Null for non-resource paths (`/version`, `/healthz`, …).
    resource: Option<String>,
    subresource: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    /// The status the client got, kas's own refusals included.
    status_code: i32,
    duration_ms: u64,
}

/// Who made a proxied request.
#[derive(async_graphql::Enum, Clone, Copy, PartialEq, Eq)]
pub enum ProxyCaller {
    /// A CI job, with a CI token.
    CiJob,
    /// A person, with a personal access token of the Git server.
    User,
}

/// A request's Kubernetes verb, as RBAC names it; `connect` for an upgraded connection (exec, attach,
/// port-forward).
#[derive(async_graphql::Enum, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "crate::store::audit::Verb")]
pub enum KubernetesVerb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
    DeleteCollection,
    Connect,
}

fn proxy_audit(
    state: &KasState,
    agent_id: u64,
    last: i32,
) -> async_graphql::Result<Vec<ProxyAuditEntry>> {
    use crate::store::audit::AuditCaller;
    let records = state.store.proxy_audit(agent_id, last.max(0) as usize)?;
    Ok(records
        .into_iter()
        .map(|(_, r)| {
            let (caller, token_id, project, environment, username) = match r.caller {
                AuditCaller::CiJob {
                    token_id,
                    project,
                    environment,
                } => (
                    ProxyCaller::CiJob,
                    // The CI token's global id, as the CI token API writes it.
                    Some(ID(format!("{GID_PREFIX}Clusters::CiToken/{token_id}"))),
                    Some(project),
                    environment,
                    None,
                ),
                AuditCaller::User { username } => {
                    (ProxyCaller::User, None, None, None, Some(username))
                }
            };
            ProxyAuditEntry {
                at: rfc3339(r.at),
                caller,
                token_id,
                project,
                environment,
                username,
                verb: r.verb.into(),
                resource: r.resource,
                subresource: r.subresource,
                namespace: r.namespace,
                name: r.name,
                status_code: i32::from(r.status_code),
                duration_ms: r.duration_ms,
            }
        })
        .collect())
}

#[derive(SimpleObject)]
pub struct AgentLiveInfo {
    version: String,
    config_commit_id: String,
    log_level: String,
}

pub struct QueryRoot;

#[Object]
impl QueryRoot {
    /// Every agent, or those of one project.
    async fn cluster_agents(
        &self,
        ctx: &Context<'_>,
        project_path: Option<String>,
    ) -> async_graphql::Result<Vec<ClusterAgent>> {
        let mut agents = state(ctx).store.agents()?;
        if let Some(project) = project_path {
            agents.retain(|a| a.project_path == project);
        }
        Ok(agents.into_iter().map(ClusterAgent).collect())
    }

    async fn cluster_agent(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> async_graphql::Result<Option<ClusterAgent>> {
        let id = parse_gid(&id, "Agent")?;
        Ok(state(ctx).store.agent(id)?.map(ClusterAgent))
    }

    // --- Kubernetes API proxy: CI tokens and kubeconfigs ---

    /// CI tokens of the Kubernetes API proxy (never their secrets), of one project or all.
    async fn ci_tokens(
        &self,
        ctx: &Context<'_>,
        project: Option<String>,
    ) -> async_graphql::Result<Vec<CiToken>> {
        let tokens = state(ctx).store.ci_tokens(project.as_deref())?;
        Ok(tokens.into_iter().map(CiToken).collect())
    }

    /// A kubeconfig with one context per agent, for the CI token `ciTokenId` (or the one whose SHA-256 is
    /// `ciTokenSha256`, as `kas kubeconfig` sends it), else for a Git server token. The secret is written
    /// as `<token>`: `kas kubeconfig` fills it in on the client.
    #[graphql(name = "k8sProxyKubeconfig")]
    async fn k8s_proxy_kubeconfig(
        &self,
        ctx: &Context<'_>,
        agent_ids: Vec<ID>,
        ci_token_id: Option<ID>,
        ci_token_sha256: Option<String>,
    ) -> async_graphql::Result<KubeconfigPayload> {
        Ok(kubeconfig_payload(state(ctx), &agent_ids, ci_token_id, ci_token_sha256).await?)
    }
}

#[derive(InputObject)]
pub struct CreateClusterAgentInput {
    project_path: String,
    name: String,
}

#[derive(SimpleObject)]
pub struct CreateClusterAgentPayload {
    cluster_agent: Option<ClusterAgent>,
    errors: Vec<String>,
}

#[derive(InputObject)]
pub struct ClusterAgentTokenCreateInput {
    cluster_agent_id: ID,
    name: String,
    #[graphql(default)]
    description: String,
}

#[derive(SimpleObject)]
pub struct ClusterAgentTokenCreatePayload {
    /// The token itself: shown here once, never again.
    secret: Option<String>,
    token: Option<ClusterAgentToken>,
    errors: Vec<String>,
}

#[derive(InputObject)]
pub struct ClusterAgentTokenRevokeInput {
    id: ID,
}

#[derive(InputObject)]
pub struct ClusterAgentDeleteInput {
    id: ID,
}

#[derive(InputObject)]
pub struct ClusterAgentProjectInput {
    cluster_agent_id: ID,
    project_path: String,
}

#[derive(InputObject)]
pub struct ClusterAgentReconcileInput {
    cluster_agent_id: ID,
    /// One manifest project of the agent; unset: every manifest project it syncs.
    project_path: Option<String>,
}

#[derive(SimpleObject)]
pub struct ErrorsPayload {
    errors: Vec<String>,
}

fn errors(list: Vec<String>) -> ErrorsPayload {
    ErrorsPayload { errors: list }
}

pub struct MutationRoot;

#[Object]
impl MutationRoot {
    /// Sets kas's log level until the next change or restart (`logging.level` in kas.yaml is re-read on
    /// SIGHUP). Admin only, like every mutation.
    async fn kas_log_level_set(
        &self,
        ctx: &Context<'_>,
        level: KasLogLevel,
    ) -> async_graphql::Result<KasLogLevelPayload> {
        let Some(logs) = &state(ctx).logs else {
            return Ok(KasLogLevelPayload {
                level: None,
                previous: None,
                errors: vec!["this kas runs without a logger it can change (embedded)".into()],
            });
        };
        let previous = logs.set(level.into(), crate::log_reload::Trigger::Admin)?;
        Ok(KasLogLevelPayload {
            level: Some(level),
            previous: Some(previous.into()),
            errors: vec![],
        })
    }

    async fn create_cluster_agent(
        &self,
        ctx: &Context<'_>,
        input: CreateClusterAgentInput,
    ) -> async_graphql::Result<CreateClusterAgentPayload> {
        let state = state(ctx);
        let failed = |e: String| {
            Ok(CreateClusterAgentPayload {
                cluster_agent: None,
                errors: vec![e],
            })
        };
        if let Err(e) = validate_agent_name(&input.name)
            .and_then(|()| validate_project_path(&input.project_path))
        {
            return failed(e);
        }
        match state.watchers.repos().exists(&input.project_path).await {
            Ok(true) => {}
            Ok(false) => {
                return failed(format!(
                    "project {:?} does not exist on the Git server",
                    input.project_path
                ));
            }
            Err(e) => {
                return failed(format!(
                    "could not check project {:?}: {e}",
                    input.project_path
                ));
            }
        }
        match state.store.create_agent(&input.project_path, &input.name) {
            Ok(agent) => {
                tracing::info!(agent_id = agent.id, project_id = %agent.project_path, name = %agent.name, "agent registered");
                Ok(CreateClusterAgentPayload {
                    cluster_agent: Some(ClusterAgent(agent)),
                    errors: vec![],
                })
            }
            Err(e @ StoreError::DuplicateAgent { .. }) => failed(e.to_string()),
            Err(e) => Err(e.into()),
        }
    }

    async fn cluster_agent_token_create(
        &self,
        ctx: &Context<'_>,
        input: ClusterAgentTokenCreateInput,
    ) -> async_graphql::Result<ClusterAgentTokenCreatePayload> {
        let state = state(ctx);
        let failed = |e: String| {
            Ok(ClusterAgentTokenCreatePayload {
                secret: None,
                token: None,
                errors: vec![e],
            })
        };
        let agent_id = match parse_gid(&input.cluster_agent_id, "Agent") {
            Ok(id) => id,
            Err(e) => return failed(e),
        };
        if input.name.trim().is_empty() || input.name.len() > 255 {
            return failed("token name must be 1-255 characters".into());
        }
        if input.description.len() > 1024 {
            return failed("token description must be at most 1024 characters".into());
        }
        let secret = tokens::generate();
        let max = state.limits.max_active_tokens;
        match state.store.create_token(
            agent_id,
            &input.name,
            &input.description,
            &tokens::hash(&secret),
            max,
        ) {
            Ok(token) => {
                tracing::info!(agent_id, token_id = token.id, "agent token created");
                Ok(ClusterAgentTokenCreatePayload {
                    secret: Some(secret),
                    token: Some(ClusterAgentToken(token)),
                    errors: vec![],
                })
            }
            Err(e @ (StoreError::NoSuchAgent(_) | StoreError::TooManyTokens { .. })) => {
                failed(e.to_string())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Revokes a token; connections using it close within a second.
    async fn cluster_agent_token_revoke(
        &self,
        ctx: &Context<'_>,
        input: ClusterAgentTokenRevokeInput,
    ) -> async_graphql::Result<ErrorsPayload> {
        let state = state(ctx);
        let id = match parse_gid(&input.id, "AgentToken") {
            Ok(id) => id,
            Err(e) => return Ok(errors(vec![e])),
        };
        match state.store.revoke_token(id)? {
            Some(token) => {
                state.connections.revoke(token.id);
                tracing::info!(
                    agent_id = token.agent_id,
                    token_id = token.id,
                    "agent token revoked"
                );
                Ok(errors(vec![]))
            }
            None => Ok(errors(vec![format!(
                "token {} does not exist",
                input.id.as_str()
            )])),
        }
    }

    /// Lets the agent read a project of another owner (for manifests).
    async fn cluster_agent_grant_project(
        &self,
        ctx: &Context<'_>,
        input: ClusterAgentProjectInput,
    ) -> async_graphql::Result<ErrorsPayload> {
        let state = state(ctx);
        let agent_id = match parse_gid(&input.cluster_agent_id, "Agent")
            .and_then(|id| validate_project_path(&input.project_path).map(|()| id))
        {
            Ok(id) => id,
            Err(e) => return Ok(errors(vec![e])),
        };
        match state.store.grant_project(agent_id, &input.project_path) {
            Ok(()) => {
                tracing::info!(agent_id, project_id = %input.project_path, "project granted to agent");
                Ok(errors(vec![]))
            }
            Err(e @ StoreError::NoSuchAgent(_)) => Ok(errors(vec![e.to_string()])),
            Err(e) => Err(e.into()),
        }
    }

    async fn cluster_agent_revoke_project(
        &self,
        ctx: &Context<'_>,
        input: ClusterAgentProjectInput,
    ) -> async_graphql::Result<ErrorsPayload> {
        let state = state(ctx);
        let agent_id = match parse_gid(&input.cluster_agent_id, "Agent") {
            Ok(id) => id,
            Err(e) => return Ok(errors(vec![e])),
        };
        if state.store.revoke_project(agent_id, &input.project_path)? {
            // Streams of that project check access again and end within a moment.
            state.connections.grants_changed(agent_id);
            tracing::info!(agent_id, project_id = %input.project_path, "project grant revoked");
            Ok(errors(vec![]))
        } else {
            Ok(errors(vec![format!(
                "project {:?} was not granted to this agent",
                input.project_path
            )]))
        }
    }

    /// Deletes an agent and its tokens, disconnecting it.
    async fn cluster_agent_delete(
        &self,
        ctx: &Context<'_>,
        input: ClusterAgentDeleteInput,
    ) -> async_graphql::Result<ErrorsPayload> {
        let state = state(ctx);
        let id = match parse_gid(&input.id, "Agent") {
            Ok(id) => id,
            Err(e) => return Ok(errors(vec![e])),
        };
        match state.store.delete_agent(id)? {
            Some((agent, tokens)) => {
                for token in tokens {
                    state.connections.revoke(token.id);
                }
                tracing::info!(agent_id = agent.id, project_id = %agent.project_path, "agent deleted");
                Ok(errors(vec![]))
            }
            None => Ok(errors(vec![format!(
                "agent {} does not exist",
                input.id.as_str()
            )])),
        }
    }

    /// Reconcile now: kas re-reads the agent's manifest projects (or `projectPath`) from Git at once, and
    /// the agent runs a full sync of each (apply and drift check) even if the commit did not change.
    /// Returns once Git has been read and the agent asked; the sync itself shows in `lastSync`.
    async fn cluster_agent_reconcile(
        &self,
        ctx: &Context<'_>,
        input: ClusterAgentReconcileInput,
    ) -> async_graphql::Result<ErrorsPayload> {
        let state = state(ctx);
        let agent_id = match parse_gid(&input.cluster_agent_id, "Agent") {
            Ok(id) => id,
            Err(e) => return Ok(errors(vec![e])),
        };
        if let Some(Err(e)) = input.project_path.as_deref().map(validate_project_path) {
            return Ok(errors(vec![e]));
        }
        let Some(agent) = state.store.agent(agent_id)? else {
            return Ok(errors(vec![format!(
                "agent {} does not exist",
                input.cluster_agent_id.as_str()
            )]));
        };
        let failures = crate::manifests::reconcile::reconcile(
            state,
            agent_id,
            &agent.project_path,
            input.project_path.as_deref(),
        )
        .await;
        Ok(errors(failures.iter().map(ToString::to_string).collect()))
    }

    /// Resolves network alerts of an agent (all its firing ones without `alertIds`) and posts them to
    /// Alertmanager with `endsAt` now. An alert that gets new drops fires again.
    async fn network_alerts_resolve(
        &self,
        ctx: &Context<'_>,
        input: network_alerts::NetworkAlertsResolveInput,
    ) -> async_graphql::Result<network_alerts::NetworkAlertsResolvePayload> {
        network_alerts::resolve(state(ctx), input)
    }

    // --- Kubernetes API proxy: CI tokens ---

    /// Issues a CI token for a project (and optionally one environment); the secret is in the answer once.
    async fn ci_token_create(
        &self,
        ctx: &Context<'_>,
        input: CiTokenCreateInput,
    ) -> async_graphql::Result<CiTokenCreatePayload> {
        Ok(create_ci_token(state(ctx), input).await?)
    }

    /// Revokes a CI token; requests made with it end within a second.
    async fn ci_token_revoke(
        &self,
        ctx: &Context<'_>,
        input: CiTokenRevokeInput,
    ) -> async_graphql::Result<ErrorsPayload> {
        let state = state(ctx);
        let id = match parse_gid(&input.id, "CiToken") {
            Ok(id) => id,
            Err(e) => return Ok(errors(vec![e])),
        };
        match state.store.revoke_ci_token(id)? {
            Some(token) => {
                state.k8s_proxy.credentials.revoke_ci_token(token.id);
                tracing::info!(token_id = token.id, project_id = %token.project_path, "CI token revoked");
                Ok(errors(vec![]))
            }
            None => Ok(errors(vec![format!(
                "CI token {} does not exist",
                input.id.as_str()
            )])),
        }
    }
}

// --- Kubernetes API proxy: CI tokens and kubeconfigs ---

fn ci_token_gid(id: u64) -> ID {
    ID(format!("{GID_PREFIX}Clusters::CiToken/{id}"))
}

/// A CI token of the Kubernetes API proxy, without its secret.
pub struct CiToken(crate::store::ci_tokens::CiTokenRecord);

#[Object]
impl CiToken {
    async fn id(&self) -> ID {
        ci_token_gid(self.0.id)
    }
    /// The project whose CI jobs present it.
    async fn project(&self) -> &str {
        &self.0.project_path
    }
    async fn environment(&self) -> Option<&str> {
        self.0.environment.as_deref()
    }
    async fn description(&self) -> Option<&str> {
        self.0.description.as_deref()
    }
    async fn created_at(&self) -> String {
        rfc3339(self.0.created_at)
    }
    async fn expires_at(&self) -> String {
        rfc3339(self.0.expires_at)
    }
    async fn expired(&self) -> bool {
        crate::store::now() >= self.0.expires_at
    }
    async fn revoked(&self) -> bool {
        self.0.revoked_at.is_some()
    }
    async fn revoked_at(&self) -> Option<String> {
        self.0.revoked_at.map(rfc3339)
    }
}

#[derive(InputObject)]
pub struct CiTokenCreateInput {
    /// `owner/name` on the Git server.
    project: String,
    /// Only jobs of this environment (what `ci_access` entries' `environments` match).
    environment: Option<String>,
    /// Lifetime, e.g. `30d`, `12h`; default `k8s_proxy.ci_token_default_ttl`, at most
    /// `k8s_proxy.ci_token_max_ttl`.
    expires_in: Option<String>,
    description: Option<String>,
    /// Agents to put in the answer's kubeconfig (with the secret in it).
    agent_ids: Option<Vec<ID>>,
}

#[derive(SimpleObject)]
pub struct CiTokenCreatePayload {
    /// The secret: shown here once, never again.
    token: Option<String>,
    ci_token: Option<CiToken>,
    /// For `agentIds`: a kubeconfig with the secret in it.
    kubeconfig: Option<String>,
    errors: Vec<String>,
}

#[derive(InputObject)]
pub struct CiTokenRevokeInput {
    id: ID,
}

#[derive(SimpleObject)]
pub struct KubeconfigPayload {
    /// YAML; the credential is `ci:<agent-id>:<token>` or `pat:<agent-id>:<token>`.
    kubeconfig: Option<String>,
    errors: Vec<String>,
}

/// Environments are names such as `production` or `review/feature-1`.
fn validate_environment(environment: &str) -> Result<(), String> {
    let ok = !environment.is_empty()
        && environment.len() <= 255
        && !environment.starts_with('/')
        && !environment.ends_with('/')
        && environment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "environment {environment:?} is invalid: 1-255 letters, digits, '-', '_', '.' and '/' (not first or last)"
        ))
    }
}

/// The lifetime `expires_in` asks for, within the configured maximum.
fn ci_token_lifetime(
    expires_in: Option<&str>,
    config: &gitops_config::server::K8sProxyConfig,
) -> Result<Duration, String> {
    let Some(text) = expires_in else {
        return Ok(config.ci_token_default_ttl);
    };
    let lifetime = humantime::parse_duration(text.trim())
        .map_err(|e| format!("expiresIn {text:?} is not a duration such as 30d or 12h: {e}"))?;
    if lifetime.is_zero() {
        return Err("expiresIn must be more than 0s: CI tokens always expire".into());
    }
    if lifetime > config.ci_token_max_ttl {
        return Err(format!(
            "expiresIn {text:?} is longer than k8s_proxy.ci_token_max_ttl ({})",
            humantime::format_duration(config.ci_token_max_ttl)
        ));
    }
    Ok(lifetime)
}

fn parse_agent_ids(ids: &[ID]) -> Result<Vec<u64>, String> {
    ids.iter().map(|id| parse_gid(id, "Agent")).collect()
}

async fn create_ci_token(
    state: &Arc<KasState>,
    input: CiTokenCreateInput,
) -> Result<CiTokenCreatePayload, StoreError> {
    let failed = |e: String| {
        Ok(CiTokenCreatePayload {
            token: None,
            ci_token: None,
            kubeconfig: None,
            errors: vec![e],
        })
    };
    let checked = validate_project_path(&input.project)
        .map_err(|e| e.replace("projectPath", "project"))
        .and_then(|()| {
            input
                .environment
                .as_deref()
                .map_or(Ok(()), validate_environment)
        })
        .and_then(|()| match input.description.as_deref() {
            Some(d) if d.len() > 1024 => {
                Err("description must be at most 1024 characters".to_owned())
            }
            _ => Ok(()),
        })
        .and_then(|()| ci_token_lifetime(input.expires_in.as_deref(), &state.k8s_proxy.config))
        .and_then(|lifetime| {
            Ok((
                lifetime,
                parse_agent_ids(input.agent_ids.as_deref().unwrap_or_default())?,
            ))
        });
    let (lifetime, agent_ids) = match checked {
        Ok(v) => v,
        Err(e) => return failed(e),
    };
    match state.watchers.repos().exists(&input.project).await {
        Ok(true) => {}
        Ok(false) => {
            return failed(format!(
                "project {:?} does not exist on the Git server",
                input.project
            ));
        }
        Err(e) => return failed(format!("could not check project {:?}: {e}", input.project)),
    }
    let secret = crate::k8s_proxy::auth::ci::generate_secret();
    let token = state
        .store
        .create_ci_token(crate::store::ci_tokens::NewCiToken {
            project_path: input.project,
            environment: input.environment,
            description: input.description.filter(|d| !d.is_empty()),
            expires_at: crate::store::now().saturating_add(lifetime.as_secs() as i64),
            token_hash: tokens::hash(&secret),
        })?;
    tracing::info!(token_id = token.id, project_id = %token.project_path, expires_at = %rfc3339(token.expires_at), "CI token created");
    let (kubeconfig, errors) = if agent_ids.is_empty() {
        (None, vec![])
    } else {
        match crate::k8s_proxy::kubeconfig::for_agents(state, &agent_ids, Some(&token), &secret)
            .await
        {
            Ok(config) => (Some(config.to_yaml()), vec![]),
            Err(errors) => (None, errors),
        }
    };
    Ok(CiTokenCreatePayload {
        token: Some(secret),
        ci_token: Some(CiToken(token)),
        kubeconfig,
        errors,
    })
}

async fn kubeconfig_payload(
    state: &Arc<KasState>,
    agent_ids: &[ID],
    ci_token_id: Option<ID>,
    ci_token_sha256: Option<String>,
) -> Result<KubeconfigPayload, StoreError> {
    let failed = |errors: Vec<String>| {
        Ok(KubeconfigPayload {
            kubeconfig: None,
            errors,
        })
    };
    let agent_ids = match parse_agent_ids(agent_ids) {
        Ok(ids) if ids.is_empty() => return failed(vec!["name at least one agent".into()]),
        Ok(ids) => ids,
        Err(e) => return failed(vec![e]),
    };
    let token = match (ci_token_id, ci_token_sha256) {
        (Some(id), _) => match parse_gid(&id, "CiToken") {
            Ok(id) => state
                .store
                .ci_token(id)?
                .ok_or_else(|| format!("CI token {id} does not exist")),
            Err(e) => Err(e),
        },
        (None, Some(hash)) => state
            .store
            .ci_token_by_hash(&hash.to_ascii_lowercase())?
            .ok_or_else(|| "kas issued no CI token with that SHA-256".to_owned()),
        (None, None) => Err(String::new()),
    };
    let token = match token {
        Ok(token) => Some(token),
        Err(e) if e.is_empty() => None,
        Err(e) => return failed(vec![e]),
    };
    let placeholder = crate::k8s_proxy::kubeconfig::TOKEN_PLACEHOLDER;
    match crate::k8s_proxy::kubeconfig::for_agents(state, &agent_ids, token.as_ref(), placeholder)
        .await
    {
        Ok(config) => Ok(KubeconfigPayload {
            kubeconfig: Some(config.to_yaml()),
            errors: vec![],
        }),
        Err(errors) => failed(errors),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_timestamp_formats() {
        assert_eq!(rfc3339(i64::MAX), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339(i64::MIN), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn gids_parse_in_any_namespace() {
        assert_eq!(parse_gid("gid://kas/Clusters::Agent/7", "Agent"), Ok(7));
        assert_eq!(
            parse_gid("gid://gitlab/Clusters::Agent/43", "Agent"),
            Ok(43)
        );
        assert_eq!(parse_gid("12", "AgentToken"), Ok(12));
        assert!(parse_gid("gid://kas/Clusters::AgentToken/7", "Agent").is_err());
        assert!(parse_gid("gid://kas/Clusters::Agent/x", "Agent").is_err());
    }

    #[test]
    fn agent_names_are_dns_labels() {
        assert!(validate_agent_name("gitops").is_ok());
        assert!(validate_agent_name(&"a".repeat(63)).is_ok());
        for bad in ["", "Gitops", "-a", "a-", "a_b", "a.b", &"a".repeat(64)] {
            assert!(validate_agent_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ci_token_lifetimes_default_and_are_capped() {
        let config = gitops_config::server::K8sProxyConfig::default();
        assert_eq!(
            ci_token_lifetime(None, &config),
            Ok(config.ci_token_default_ttl)
        );
        assert_eq!(
            ci_token_lifetime(Some("12h"), &config),
            Ok(Duration::from_secs(12 * 3600))
        );
        for (bad, says) in [
            ("0s", "more than 0s"),
            ("400d", "ci_token_max_ttl"),
            ("soon", "not a duration"),
        ] {
            let err = ci_token_lifetime(Some(bad), &config).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
        assert!(validate_environment("review/feature-1").is_ok());
        for bad in ["", "/prod", "prod/", "a b", "prod*"] {
            assert!(validate_environment(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn project_paths_are_checked() {
        assert!(validate_project_path("group/sub/project.x").is_ok());
        for bad in ["", "/abs", "a//b", "a/../b", "a b"] {
            assert!(validate_project_path(bad).is_err(), "{bad}");
        }
    }
}

/// kas's log levels, as `logging.level` in kas.yaml spells them (in capitals).
#[derive(async_graphql::Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum KasLogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

impl From<KasLogLevel> for gitops_config::agent::LogLevel {
    fn from(level: KasLogLevel) -> Self {
        match level {
            KasLogLevel::Debug => Self::Debug,
            KasLogLevel::Info => Self::Info,
            KasLogLevel::Warn => Self::Warn,
            KasLogLevel::Error => Self::Error,
        }
    }
}

impl From<gitops_config::agent::LogLevel> for KasLogLevel {
    fn from(level: gitops_config::agent::LogLevel) -> Self {
        use gitops_config::agent::LogLevel;
        match level {
            LogLevel::Debug => Self::Debug,
            LogLevel::Info => Self::Info,
            LogLevel::Warn => Self::Warn,
            LogLevel::Error => Self::Error,
        }
    }
}

#[derive(SimpleObject)]
pub struct KasLogLevelPayload {
    /// The level now in force.
    level: Option<KasLogLevel>,
    /// The level before.
    previous: Option<KasLogLevel>,
    errors: Vec<String>,
}
