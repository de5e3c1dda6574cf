//! The dashboard: one self-contained page served by kas at `/dashboard` (its script and style are compiled
//! into the binary; nothing is fetched from anywhere else, and the Content-Security-Policy forbids it), the
//! session check that tells the page which role its token has, and the live event stream
//! (`/dashboard/api/events`) that tells an open page what changed so it re-queries GraphQL.
//!
//! The page reads everything through `POST /api/graphql` with the token it was given: the viewer token
//! (`viewer_token_file`) may only query, the admin token may also act (revoke, reconcile now).

mod assets;
pub mod events;

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{
        IntoResponse, Redirect, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::get,
};

use crate::{
    KasState,
    auth::{self, Role},
};

pub use assets::{ASSETS, Asset, CONTENT_SECURITY_POLICY, INDEX_HTML};

/// How often an idle event stream sends a comment, so proxies keep it open and the page notices a dead one.
const KEEPALIVE: Duration = Duration::from_secs(15);

#[derive(Clone)]
struct DashboardState {
    kas: Arc<KasState>,
    feed: Arc<events::ChangeFeed>,
}

/// `/` (a redirect), `/dashboard`, its assets, `/dashboard/api/session` and `/dashboard/api/events`.
pub fn router(kas: Arc<KasState>) -> Router {
    let feed = Arc::new(events::ChangeFeed::new(Arc::downgrade(&kas)));
    Router::new()
        .route("/", get(|| async { Redirect::to("/dashboard") }))
        .route("/dashboard", get(index))
        .route("/dashboard/", get(index))
        .route("/dashboard/assets/{name}", get(asset))
        .route("/dashboard/api/session", get(session))
        .route("/dashboard/api/events", get(event_stream))
        .with_state(DashboardState { kas, feed })
}

/// Headers every dashboard response carries: only kas's own origin may be loaded from or connected to.
fn locked_down(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
            // The page is small and changes with kas's version: always revalidate.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    locked_down("text/html; charset=utf-8", INDEX_HTML)
}

async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|a| a.name == name) {
        Some(a) => locked_down(a.content_type, a.body),
        None => (StatusCode::NOT_FOUND, "no such dashboard asset\n").into_response(),
    }
}

fn caller(kas: &KasState, headers: &HeaderMap) -> Option<Role> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    auth::role(
        kas.admin_token.as_deref(),
        kas.viewer_token.as_deref(),
        presented,
    )
}

fn unauthorized() -> Response {
    let body = serde_json::json!({ "errors": [{ "message":
        "a valid viewer or admin token is required (Authorization: Bearer <token>)" }] });
    (StatusCode::UNAUTHORIZED, Json(body)).into_response()
}

/// Which role the presented token has, and kas's version, for the page's header.
async fn session(State(d): State<DashboardState>, headers: HeaderMap) -> Response {
    match caller(&d.kas, &headers) {
        Some(role) => Json(serde_json::json!({
            "role": role,
            "kasVersion": env!("CARGO_PKG_VERSION"),
        }))
        .into_response(),
        None => unauthorized(),
    }
}

/// Server-sent events: `ready` once the feed watches, then `changed` with the topics that changed
/// (`agents`, `agent/<id>/connection|config|manifests|tokens|audit`, `ci-tokens`).
async fn event_stream(State(d): State<DashboardState>, headers: HeaderMap) -> Response {
    if caller(&d.kas, &headers).is_none() {
        return unauthorized();
    }
    let receiver = d.feed.subscribe();
    let ready = futures::stream::once(async {
        Ok::<_, Infallible>(Event::default().event("ready").data("{}"))
    });
    let changes = futures::stream::unfold(receiver, |mut receiver| async move {
        let event = match receiver.recv().await {
            Ok(changed) => Event::default()
                .event("changed")
                .data(serde_json::to_string(&*changed).expect("topics serialize")),
            // Too slow a reader missed some: tell it everything may have changed.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => Event::default()
                .event("changed")
                .data(r#"{"topics":["*"]}"#),
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok::<_, Infallible>(event), receiver))
    });
    use futures::StreamExt as _;
    let mut response = Sse::new(ready.chain(changes))
        .keep_alive(KeepAlive::new().interval(KEEPALIVE))
        .into_response();
    // Reverse proxies (nginx) buffer responses unless told not to, which would hold the events back.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}
