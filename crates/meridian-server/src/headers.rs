//! Header names and the middleware every response passes through: `X-Request-Id`, `X-Region`,
//! CORS on ingest routes, JSON 404/405, and per-route metrics.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::state::AppState;

pub const X_REGION: HeaderName = HeaderName::from_static("x-region");

/// Request ids: a random per-process prefix and a counter. Unique across nodes and restarts
/// without a random draw per request.
fn next_request_id() -> String {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static PREFIX: OnceLock<String> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| uuid::Uuid::new_v4().simple().to_string()[..16].to_string());
    format!("{prefix}-{:08x}", COUNTER.fetch_add(1, Ordering::Relaxed))
}
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request id of a request, available to handlers as an extension.
#[derive(Clone, Debug)]
pub struct RequestId(pub Arc<str>);

fn acceptable_request_id(value: &HeaderValue) -> Option<&str> {
    let text = value.to_str().ok()?;
    let is_acceptable =
        !text.is_empty() && text.len() <= 128 && text.bytes().all(|byte| byte.is_ascii_graphic());
    is_acceptable.then_some(text)
}

pub fn add_cors_headers(response: &mut Response) {
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Authorization, Content-Type, X-Retry-Count"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, GET, OPTIONS"),
    );
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Retry-After, X-Region"),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
}

/// Stamps every response; answers CORS preflights of ingest routes.
pub async fn stamp_responses(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let request_id: Arc<str> = match request
        .headers()
        .get(X_REQUEST_ID)
        .and_then(acceptable_request_id)
    {
        Some(client_id) => Arc::from(client_id),
        None => Arc::from(next_request_id().as_str()),
    };
    request
        .extensions_mut()
        .insert(RequestId(Arc::clone(&request_id)));
    let is_ingest_route = request.uri().path().starts_with("/v1/");
    let is_preflight = request.method() == Method::OPTIONS && is_ingest_route;

    let mut response = if is_preflight {
        axum::http::StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(request).await
    };

    if is_ingest_route {
        add_cors_headers(&mut response);
    }
    let headers = response.headers_mut();
    if !headers.contains_key(X_REGION)
        && let Ok(value) = HeaderValue::from_str(state.settings.home_region.as_str())
    {
        headers.insert(X_REGION, value);
    }
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        headers.insert(X_REQUEST_ID, value);
    }
    let route = response
        .extensions()
        .get::<RouteLabel>()
        .map(|label| label.0.as_str())
        .unwrap_or("unmatched");
    state
        .metrics
        .observe_request(route, response.status().as_u16(), started.elapsed());
    response
}

/// The matched route template of a response, for metric labels (bounded cardinality).
#[derive(Clone, Debug)]
pub struct RouteLabel(pub String);

/// Runs inside routing (as a route layer), where the matched template is known.
pub async fn label_route(request: Request, next: Next) -> Response {
    let label = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_string());
    let mut response = next.run(request).await;
    if let Some(label) = label {
        response.extensions_mut().insert(RouteLabel(label));
    }
    response
}

pub async fn not_found_fallback() -> ApiError {
    ApiError::not_found("no such route; see API.md for the ingest, admin and operations routes")
}

pub async fn method_not_allowed_fallback() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method",
    )
}

/// Caps the requests handled at once (503 + Retry-After beyond; health, readiness and metrics are
/// exempt so operators can still see the node) and bounds every request's time (408).
pub async fn limit_requests(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let is_exempt = matches!(request.uri().path(), "/healthz" | "/readyz" | "/metrics");
    let _slot = if is_exempt {
        None
    } else {
        match Arc::clone(&state.request_slots).try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) => {
                return ApiError::unavailable(
                    "overloaded",
                    "this node is handling as many requests as it may; retry shortly",
                    1,
                )
                .into_response();
            }
        }
    };
    match tokio::time::timeout(state.settings.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request took too long and was abandoned",
        )
        .into_response(),
    }
}
