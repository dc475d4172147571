//! Header names and the middleware every response passes through: `X-Request-Id`, `X-Region`,
//! CORS on ingest routes, JSON 404/405, and per-route metrics.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, header};
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

/// The request headers every browser SDK we know sends (a preflight that asks for none is
/// answered with these): Segment's analytics.js, RudderStack's JavaScript SDK v3.
const DEFAULT_ALLOWED_HEADERS: &str = "Authorization, Content-Type, X-Retry-Count, AnonymousId, SentAt, Rsa-Retry-Attempt, Rsa-Retry-Reason, Rsa-Since-First-Attempt, Rsa-Since-Last-Attempt, Rsa-Recovered";
/// A preflight may ask for at most this many bytes of header names; a longer list is answered
/// with the default list.
const MAX_REQUESTED_HEADERS_BYTES: usize = 2048;

/// The headers a preflight asked for (`Access-Control-Request-Headers`), when every one is a
/// valid header name: any browser SDK may send the headers it needs. Unknown headers never change
/// what a request means, so allowing them costs nothing.
fn requested_headers(request_headers: &HeaderMap) -> Option<HeaderValue> {
    let requested = request_headers
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)?
        .to_str()
        .ok()?;
    if requested.len() > MAX_REQUESTED_HEADERS_BYTES {
        return None;
    }
    let names: Vec<&str> = requested
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .collect();
    let all_valid = !names.is_empty()
        && names
            .iter()
            .all(|name| HeaderName::from_bytes(name.as_bytes()).is_ok());
    if !all_valid {
        return None;
    }
    HeaderValue::from_str(&names.join(", ")).ok()
}

/// CORS on ingest routes: any origin, the headers a preflight asks for (or every browser SDK's),
/// and `Retry-After` and `X-Region` readable by the page (without them a browser SDK cannot
/// honour Retry-After).
pub fn add_cors_headers(response: &mut Response, allowed_headers: Option<HeaderValue>) {
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        allowed_headers.unwrap_or(HeaderValue::from_static(DEFAULT_ALLOWED_HEADERS)),
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
    headers.append(
        header::VARY,
        HeaderValue::from_static("Access-Control-Request-Headers"),
    );
}

/// Routes browsers call from other origins: the ingest API and RudderStack's beacon.
fn is_ingest_path(path: &str) -> bool {
    path.starts_with("/v1/") || path.starts_with("/beacon/")
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
    let is_ingest_route = is_ingest_path(request.uri().path());
    let is_preflight = request.method() == Method::OPTIONS && is_ingest_route;

    let mut response = if is_preflight {
        let allowed_headers = requested_headers(request.headers());
        let mut response = axum::http::StatusCode::NO_CONTENT.into_response();
        add_cors_headers(&mut response, allowed_headers);
        response
    } else {
        let mut response = next.run(request).await;
        if is_ingest_route {
            add_cors_headers(&mut response, None);
        }
        response
    };

    let headers = response.headers_mut();
    if !headers.contains_key(X_REGION)
        && let Ok(value) = HeaderValue::from_str(state.node.settings.home_region.as_str())
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
        .node
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

/// The client a request comes from (its TCP peer, or the client a trusted proxy names), put on
/// each request by [`limit_requests`].
#[derive(Clone, Copy, Debug)]
pub struct ClientAddress(pub std::net::IpAddr);

/// Caps the requests handled at once, on the node and per client address (HTTP/2 streams are
/// requests): 503 or 429 + Retry-After beyond; health, readiness and metrics are exempt so
/// operators can still see the node. A request holds its places until its response body is
/// finished, so streams (the live feed) count for as long as they last. Bounds every request's
/// time to its response head (408).
pub async fn limit_requests(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let is_exempt = matches!(request.uri().path(), "/healthz" | "/readyz" | "/metrics");
    if is_exempt {
        return next.run(request).await;
    }
    let client = request
        .extensions()
        .get::<crate::edge::PeerAddress>()
        .map(|peer| {
            crate::edge::client_address(
                peer.0,
                request.headers(),
                &state.node.settings.trusted_proxies,
            )
        });
    let address_slot = match client {
        Some(client) => {
            request.extensions_mut().insert(ClientAddress(client));
            match state.http.requests_per_address.try_acquire(client) {
                Some(slot) => Some(slot),
                None => {
                    state.node.metrics.edge_refused("requests_address");
                    return ApiError::too_many_requests(
                        "too_many_concurrent_requests",
                        "this client has as many requests in flight on this node as one client may; wait for their answers or retry shortly",
                        1,
                    )
                    .into_response();
                }
            }
        }
        None => None,
    };
    let node_slot = match Arc::clone(&state.http.request_slots).try_acquire_owned() {
        Ok(slot) => slot,
        Err(_) => {
            state.node.metrics.edge_refused("requests_node");
            return ApiError::unavailable(
                "overloaded",
                "this node is handling as many requests as it may; retry shortly",
                1,
            )
            .into_response();
        }
    };
    match tokio::time::timeout(state.node.settings.request_timeout, next.run(request)).await {
        Ok(response) => {
            let held = (node_slot, address_slot);
            response.map(move |body| {
                axum::body::Body::new(http_body_util::BodyExt::map_frame(body, move |frame| {
                    let _held_until_the_body_ends = &held;
                    frame
                }))
            })
        }
        Err(_) => ApiError::new(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request took too long and was abandoned",
        )
        .into_response(),
    }
}
