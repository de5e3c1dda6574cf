//! kas's HTTP API listener: `POST /api/graphql` (the admin token may query and mutate, the viewer token only
//! query), the dashboard ([`crate::dashboard`], also behind `/`), whose query page replaced the GraphiQL
//! explorer at `GET /api/graphql` and `/-/graphql-explorer`, webhooks, and `/healthz`. Timeouts and the
//! connection cap are the listener's ([`gitops_tunnel::listener`]).

use std::sync::Arc;

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, FromRequest, Path, Request, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use tokio::sync::Semaphore;

use crate::{
    KasState,
    auth::{Role, role},
    graphql::{KasSchema, ViewerSchema},
    metrics::WebhookResult,
    webhooks::{self, Forge},
};

/// Largest GraphQL document accepted; an admin API needs nothing near this.
pub const MAX_GRAPHQL_BODY: usize = 64 * 1024;
/// Largest push payload accepted (pushes list their commits).
pub const MAX_WEBHOOK_BODY: usize = 5 * 1024 * 1024;
/// Webhook bodies read at once, before their signature can be checked: bounds the memory unsigned
/// requests can take (16 × 5 MiB). More are answered 503 at once; forges retry.
pub const MAX_CONCURRENT_WEBHOOKS: usize = 16;

#[derive(Clone)]
struct ApiState {
    kas: Arc<KasState>,
    schema: KasSchema,
    /// The same queries without mutations, for the viewer token: refused twice over.
    viewer_schema: ViewerSchema,
    webhooks: Arc<Semaphore>,
}

pub fn router(kas: Arc<KasState>, schema: KasSchema) -> Router {
    let viewer_schema = crate::graphql::viewer_schema(kas.clone());
    Router::new()
        .route(
            "/api/graphql",
            get(explorer)
                .post(graphql)
                .layer(DefaultBodyLimit::max(MAX_GRAPHQL_BODY)),
        )
        .route("/-/graphql-explorer", get(explorer))
        .route(
            "/api/webhooks/{forge}",
            post(webhook).layer(DefaultBodyLimit::max(MAX_WEBHOOK_BODY)),
        )
        .route("/healthz", get(healthz))
        .with_state(ApiState {
            kas: kas.clone(),
            schema,
            viewer_schema,
            webhooks: Arc::new(Semaphore::new(MAX_CONCURRENT_WEBHOOKS)),
        })
        .merge(crate::dashboard::router(kas))
}

/// Healthy while the database answers a real transaction: after a disk fault it is reopened on use, and
/// while it cannot be, the liveness probe restarts kas.
async fn healthz(State(api): State<ApiState>) -> Response {
    let store = api.kas.store.clone();
    match tokio::task::spawn_blocking(move || store.check()).await {
        Ok(Ok(())) => "ok\n".into_response(),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "health check failed");
            (StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy: {e}\n")).into_response()
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: health check panicked: {e}\n"),
        )
            .into_response(),
    }
}

/// GraphiQL loaded its scripts from a CDN (a blank page offline); the dashboard's query page runs documents
/// with nothing loaded from elsewhere.
async fn explorer() -> Redirect {
    Redirect::to("/dashboard#/query")
}

async fn graphql(State(api): State<ApiState>, headers: HeaderMap, body: Bytes) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(role) = role(
        api.kas.admin_token.as_deref(),
        api.kas.viewer_token.as_deref(),
        presented,
    ) else {
        let message = if api.kas.admin_token.is_none() && api.kas.viewer_token.is_none() {
            "the admin API is disabled: kas has no admin_token_file configured"
        } else {
            "a valid admin or viewer credential is required (Authorization: Bearer <token>)"
        };
        return json_error(StatusCode::UNAUTHORIZED, message);
    };
    // serde would read a JSON array positionally as a request (`["{ query }"]`); batches are refused.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return json_error(
            StatusCode::BAD_REQUEST,
            "not a GraphQL request: expected one JSON object (batches are not supported)",
        );
    }
    let request: async_graphql::Request = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("not a GraphQL request: {e}"),
            );
        }
    };
    let response = match role {
        Role::Admin => api.schema.execute(request).await,
        Role::Viewer => {
            if let Err(message) = read_only(&request) {
                return json_error(StatusCode::FORBIDDEN, &message);
            }
            api.viewer_schema.execute(request).await
        }
    };
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(&response).expect("GraphQL responses serialize"),
    )
        .into_response()
}

async fn webhook(
    State(api): State<ApiState>,
    Path(forge): Path<String>,
    headers: HeaderMap,
    request: Request,
) -> Response {
    let Some(forge) = Forge::from_path(&forge) else {
        return json_error(
            StatusCode::NOT_FOUND,
            "unknown forge: use /api/webhooks/gitea, /github or /gitlab",
        );
    };
    let metrics = &api.kas.metrics;
    // The body is read only with a permit, so unsigned requests cannot buffer more than the cap.
    let Ok(_permit) = api.webhooks.try_acquire() else {
        metrics.webhook(forge, WebhookResult::Throttled);
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("more than {MAX_CONCURRENT_WEBHOOKS} webhooks in flight; retry"),
        );
    };
    let body = match Bytes::from_request(request, &()).await {
        Ok(body) => body,
        // 413 over MAX_WEBHOOK_BODY, 400 for a body that broke off or timed out.
        Err(rejection) => {
            metrics.webhook(forge, WebhookResult::BadBody);
            return rejection.into_response();
        }
    };
    if let Err(e) = webhooks::verify(forge, api.kas.webhook_secret.as_deref(), &headers, &body) {
        metrics.webhook(forge, WebhookResult::Unauthorized);
        tracing::warn!(?forge, error = %e, "refused a webhook");
        return json_error(StatusCode::UNAUTHORIZED, &e.to_string());
    }
    // Other events (pings, issues...) are acknowledged and ignored.
    let is_push = ["x-gitea-event", "x-github-event", "x-gitlab-event"]
        .iter()
        .filter_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
        .any(|event| event == "push" || event == "Push Hook" || event == "Tag Push Hook");
    if !is_push {
        metrics.webhook(forge, WebhookResult::Ignored);
        return (StatusCode::ACCEPTED, "ignored: not a push event\n").into_response();
    }
    match webhooks::pushed_project(forge, &body) {
        Ok(project) => {
            metrics.webhook(forge, WebhookResult::Accepted);
            let watchers = api.kas.watchers.poke(&project);
            tracing::info!(?forge, project_id = %project, watchers, "push webhook: re-checking the project");
            (
                StatusCode::ACCEPTED,
                axum::Json(serde_json::json!({ "project": project, "watchers": watchers })),
            )
                .into_response()
        }
        Err(e) => {
            metrics.webhook(forge, WebhookResult::BadPayload);
            json_error(StatusCode::BAD_REQUEST, &e.to_string())
        }
    }
}

/// The viewer token may only query: a document with any mutation or subscription in it is refused whole,
/// whichever operation it names, with a message that says why.
fn read_only(request: &async_graphql::Request) -> Result<(), String> {
    use async_graphql::parser::types::OperationType;
    // A document that does not parse is left to the schema, which reports where it is wrong.
    let Ok(document) = async_graphql::parser::parse_query(&request.query) else {
        return Ok(());
    };
    match document
        .operations
        .iter()
        .find(|(_, op)| op.node.ty != OperationType::Query)
    {
        Some((name, op)) => Err(format!(
            "the viewer token may only read: {} {} needs the admin token",
            op.node.ty,
            name.map_or_else(|| "(anonymous)".to_owned(), |n| n.to_string()),
        )),
        None => Ok(()),
    }
}

fn json_error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "errors": [{ "message": message }] });
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}
