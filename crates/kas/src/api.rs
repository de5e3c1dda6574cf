//! kas's HTTP API listener: `POST /api/graphql` (admin credential required), the GraphQL explorer at
//! `GET /api/graphql` and `/-/graphql-explorer`, and `/healthz`.

use std::sync::Arc;

use async_graphql::http::GraphiQLSource;
use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{HeaderMap, StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};

use crate::{KasState, auth::is_admin, graphql::KasSchema};

/// Largest GraphQL document accepted; an admin API needs nothing near this.
pub const MAX_GRAPHQL_BODY: usize = 64 * 1024;

#[derive(Clone)]
struct ApiState {
    kas: Arc<KasState>,
    schema: KasSchema,
}

pub fn router(kas: Arc<KasState>, schema: KasSchema) -> Router {
    Router::new()
        .route(
            "/api/graphql",
            get(explorer)
                .post(graphql)
                .layer(DefaultBodyLimit::max(MAX_GRAPHQL_BODY)),
        )
        .route("/-/graphql-explorer", get(explorer))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(ApiState { kas, schema })
}

async fn explorer() -> Html<String> {
    Html(
        GraphiQLSource::build()
            .endpoint("/api/graphql")
            .title("kas GraphQL explorer")
            .finish(),
    )
}

async fn graphql(State(api): State<ApiState>, headers: HeaderMap, body: Bytes) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !is_admin(api.kas.admin_token.as_deref(), presented) {
        let message = if api.kas.admin_token.is_none() {
            "the admin API is disabled: kas has no admin_token_file configured"
        } else {
            "a valid admin credential is required (Authorization: Bearer <admin token>)"
        };
        return json_error(StatusCode::UNAUTHORIZED, message);
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
    let response = api.schema.execute(request).await;
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(&response).expect("GraphQL responses serialize"),
    )
        .into_response()
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
