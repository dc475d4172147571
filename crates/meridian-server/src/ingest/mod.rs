//! The Segment-compatible ingest API: decode (limits, gzip) → auth (key cache) → region check →
//! validate + enrich → suppression → append to the region's queue, durably → answer.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use meridian_catalog::ResolvedKey;
use meridian_core::message::RawMessage;
use meridian_core::timestamp::now_unix_ms;
use meridian_core::{BatchEnvelope, MessageKind};
use meridian_queue::{QueueError, RecordBatch};
use serde_json::json;
use tracing::warn;

mod body;
mod keys;
mod messages;

use crate::edge::BodyOwner;
use crate::error::{ApiError, ApiPath};
use crate::headers::X_REGION;
use crate::routes::ApiRoutes;
use crate::state::AppState;
use body::read_body;
use keys::{
    KeySource, admit, anonymous_id_header, authorize, rate_limit_error, sent_at_header,
    write_key_from_headers, write_key_from_query, write_key_from_value,
};
use messages::{
    FAR_PAST_BATCH_LIMIT_FACTOR, HeaderHints, MAX_LISTED_REJECTIONS, MessagesToProcess,
    process_messages,
};

pub fn routes() -> ApiRoutes {
    let single = |kind: MessageKind| {
        move |State(state): State<AppState>, headers: HeaderMap, body: Body| async move {
            ingest(state, Some(kind), KeySource::Headers, headers, body).await
        }
    };
    let batch = |State(state): State<AppState>, headers: HeaderMap, body: Body| async move {
        ingest(state, None, KeySource::Headers, headers, body).await
    };
    let beacon = |State(state): State<AppState>,
                  RawQuery(query): RawQuery,
                  headers: HeaderMap,
                  body: Body| async move {
        let key = query.as_deref().and_then(write_key_from_query);
        ingest(state, None, KeySource::Query(key), headers, body).await
    };
    let mut routes = ApiRoutes::new();
    for (path, short_path, kind) in [
        ("/v1/track", "/v1/t", MessageKind::Track),
        ("/v1/identify", "/v1/i", MessageKind::Identify),
        ("/v1/page", "/v1/p", MessageKind::Page),
        ("/v1/screen", "/v1/s", MessageKind::Screen),
        ("/v1/group", "/v1/g", MessageKind::Group),
        ("/v1/alias", "/v1/a", MessageKind::Alias),
    ] {
        routes = routes.add(Method::POST, path, single(kind)).add(
            Method::POST,
            short_path,
            single(kind),
        );
    }
    routes
        .add(Method::POST, "/v1/batch", batch)
        .add(Method::POST, "/v1/import", batch)
        .add(Method::POST, "/v1/b", batch)
        .add(Method::POST, "/beacon/v1/batch", beacon)
        .add(Method::POST, "/v1/m", client_metrics)
        .add(
            Method::GET,
            "/v1/projects/{write_key}/settings",
            browser_settings,
        )
}

fn json_error_to_api_error(error: &serde_json::Error, is_batch: bool) -> ApiError {
    match error.classify() {
        serde_json::error::Category::Data if is_batch => ApiError::bad_request(
            "invalid_batch",
            format!("the body must be an object with a `batch` array of messages: {error}"),
        ),
        serde_json::error::Category::Data => ApiError::bad_request(
            "invalid_message",
            format!("the body must be one JSON message object: {error}"),
        ),
        _ => ApiError::bad_request(
            "invalid_json",
            format!("the body is not valid JSON: {error}"),
        ),
    }
}

async fn ingest(
    state: AppState,
    kind: Option<MessageKind>,
    key_source: KeySource,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let received_at_ms = now_unix_ms();
    // Admission before a byte of the body is read: a key the request carries outside its body is
    // resolved, its region checked and its project's rate consulted; a request without one reads
    // its body on the small keyless budget.
    let outside_key = match key_source {
        KeySource::Headers => write_key_from_headers(&headers)?,
        KeySource::Query(key) => key,
    };
    let admitted = match outside_key {
        Some(key) => Some(admit(&state, Some(key)).await?),
        None => None,
    };
    let owner = match &admitted {
        Some(resolved) => BodyOwner::Project(Arc::clone(&resolved.project_id)),
        None => BodyOwner::Anonymous,
    };
    // Errors after admission carry the project's region.
    let admitted_region = admitted.as_ref().map(|resolved| resolved.region.clone());
    let in_admitted_region = |failure: ApiError| match &admitted_region {
        Some(region) => failure.in_region(region.clone()),
        None => failure,
    };
    let body = read_body(&state, &headers, body, &owner)
        .await
        .map_err(in_admitted_region)?;
    let limits = state.node.settings.limits;
    let header_hints = HeaderHints {
        sent_at: sent_at_header(&headers),
        anonymous_id: anonymous_id_header(&headers),
    };

    let (resolved, outcome) = match kind {
        Some(kind) => {
            if body.len() > limits.max_message_bytes {
                return Err(in_admitted_region(ApiError::payload_too_large(
                    "message_too_large",
                    format!(
                        "the message is {} bytes; the limit is {} bytes",
                        body.len(),
                        limits.max_message_bytes
                    ),
                )));
            }
            let message = RawMessage::parse(&body)
                .map_err(|error| in_admitted_region(json_error_to_api_error(&error, false)))?;
            let resolved = match admitted {
                Some(resolved) => resolved,
                None => admit(&state, message.non_empty_string("writeKey")).await?,
            };
            let outcome = process_messages(
                &state,
                &resolved,
                received_at_ms,
                MessagesToProcess::Single(kind, message),
                None,
                header_hints,
            );
            (resolved, outcome)
        }
        None => {
            let envelope: BatchEnvelope<'_> = serde_json::from_slice(&body)
                .map_err(|error| in_admitted_region(json_error_to_api_error(&error, true)))?;
            let far_past_limit = limits
                .max_batch_messages
                .saturating_mul(FAR_PAST_BATCH_LIMIT_FACTOR);
            if envelope.batch.total > far_past_limit {
                return Err(in_admitted_region(ApiError::payload_too_large(
                    "batch_too_large",
                    format!(
                        "the batch has {} elements; a batch holds at most {} messages: split it into requests of at most that many",
                        envelope.batch.total, limits.max_batch_messages
                    ),
                )));
            }
            let resolved = match admitted {
                Some(resolved) => resolved,
                None => admit(&state, write_key_from_value(envelope.write_key.as_ref())).await?,
            };
            let outcome = process_messages(
                &state,
                &resolved,
                received_at_ms,
                MessagesToProcess::Batch,
                Some(&envelope),
                header_hints,
            );
            (resolved, outcome)
        }
    };
    let region = resolved.region.clone();
    let mut outcome = outcome.map_err(|failure| failure.in_region(region.clone()))?;
    // The rate limit charges what was accepted, never what was refused or never read.
    rate_limit_error(
        state
            .http
            .rate_limiter
            .charge(&resolved.project_id, outcome.accepted + outcome.suppressed),
        &resolved,
    )?;
    // Rejections are final whatever happens next: the live debugger shows them now.
    if let Some((feed, _)) = &outcome.live {
        for (index, rejection) in &outcome.rejections.listed {
            feed.publish(crate::live::LiveEvent::Rejected {
                index: *index,
                code: rejection.code.as_str(),
                reason: rejection.message.clone(),
            });
        }
    }
    let live = outcome.live.take();
    for (code, count) in &outcome.rejections.by_code {
        state
            .node
            .metrics
            .messages_rejected(region.as_str(), code, *count);
    }
    if kind.is_some()
        && let Some(rejection) = outcome.rejections.first()
    {
        return Err(ApiError::from_rejection(rejection.clone()).in_region(region));
    }
    if outcome.accepted == 0 && outcome.suppressed == 0 && !outcome.rejections.is_empty() {
        let message = if outcome.rejections.omitted > 0 {
            format!(
                "no message of the batch could be accepted; `rejected` lists the first {MAX_LISTED_REJECTIONS} of them and {} more were rejected",
                outcome.rejections.omitted
            )
        } else {
            "no message of the batch could be accepted; see `rejected`".to_string()
        };
        return Err(ApiError::bad_request("invalid_batch", message)
            .with_extra("rejected", outcome.rejections.to_json())
            .in_region(region));
    }
    // Suppressed messages never enter the queue: the delivery ledger counts them before the
    // answer (and before the others are queued: a failure here leaves nothing half done).
    if outcome.suppressed > 0 {
        record_suppressed(&state, &resolved, received_at_ms, outcome.suppressed).await?;
    }
    if !outcome.records.is_empty() {
        append_durably(&state, &resolved, outcome.records).await?;
    }
    if let Some((feed, events)) = live {
        for event in events {
            feed.send_admitted(event);
        }
    }
    state
        .node
        .metrics
        .messages_accepted(region.as_str(), outcome.accepted);
    if outcome.suppressed > 0 {
        state
            .node
            .metrics
            .messages_suppressed(region.as_str(), outcome.suppressed);
    }
    let mut response = if outcome.rejections.is_empty() && outcome.envelope_problems.is_empty() {
        ok_response()
    } else {
        let mut body = json!({
            "success": true,
            "accepted": outcome.accepted + outcome.suppressed,
            "rejected": outcome.rejections.to_json(),
        });
        if outcome.rejections.omitted > 0 {
            body["rejected_omitted"] = json!(outcome.rejections.omitted);
        }
        if !outcome.envelope_problems.is_empty() {
            body["envelope_problems"] = outcome
                .envelope_problems
                .iter()
                .map(|problem| json!({"field": problem.field, "message": problem.message}))
                .collect();
        }
        (StatusCode::OK, axum::Json(body)).into_response()
    };
    if let Ok(value) = HeaderValue::from_str(region.as_str()) {
        response.headers_mut().insert(X_REGION, value);
    }
    Ok(response)
}

/// Adds suppressed messages to the delivery ledger in the region's store.
async fn record_suppressed(
    state: &AppState,
    resolved: &ResolvedKey,
    received_at_ms: i64,
    suppressed: u64,
) -> Result<(), ApiError> {
    let region = &resolved.region;
    let unavailable = |reason: String| {
        tracing::warn!(region = %region, project_id = %resolved.project_id, %reason, "the delivery ledger could not count suppressed messages; the request is refused");
        ApiError::unavailable(
            "ledger_unavailable",
            format!("the delivery ledger of region {region} could not count this request's suppressed messages; retry later"),
            5,
        )
        .in_region(region.clone())
    };
    let store = state
        .node
        .stores
        .of_region(region.as_str())
        .map_err(|error| unavailable(error.to_string()))?;
    let recorded = tokio::time::timeout(
        state.node.settings.append_timeout,
        store.record_suppressed(
            &resolved.project_id,
            meridian_core::timestamp::utc_day_start_ms(received_at_ms),
            suppressed,
        ),
    )
    .await;
    match recorded {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(unavailable(error.to_string())),
        Err(_) => Err(unavailable("timed out".to_string())),
    }
}

async fn append_durably(
    state: &AppState,
    resolved: &ResolvedKey,
    records: RecordBatch,
) -> Result<(), ApiError> {
    let region = &resolved.region;
    let Some(queue) = state.node.queue(region) else {
        return Err(ApiError::unavailable(
            "region_unavailable",
            format!("region {region} has no queue on this node"),
            5,
        )
        .in_region(region.clone()));
    };
    let appended = tokio::time::timeout(
        state.node.settings.append_timeout,
        queue.append_batch(records),
    )
    .await;
    match appended {
        Ok(Ok(())) => Ok(()),
        Ok(Err(QueueError::Full {
            used_bytes,
            budget_bytes,
        })) => {
            state.node.metrics.queue_full(region.as_str());
            Err(ApiError::unavailable(
                "queue_full",
                format!("region {region} is at its disk budget ({used_bytes} of {budget_bytes} bytes) while its sinks catch up; retry later"),
                5,
            )
            .in_region(region.clone()))
        }
        Ok(Err(QueueError::DiskFull {
            free_bytes,
            reserve_bytes,
        })) => {
            state.node.metrics.queue_full(region.as_str());
            Err(ApiError::unavailable(
                "disk_full",
                format!("region {region} is out of disk space on this node ({free_bytes} bytes free, {reserve_bytes} kept for its sinks); retry later"),
                5,
            )
            .in_region(region.clone()))
        }
        Ok(Err(QueueError::RecordTooLarge { size, limit })) => {
            // Only a replicated queue's message size limit can be below the ingest limits.
            warn!(region = %region, size, limit, "a message is larger than the region's queue takes (raise max_payload of its NATS servers above limits.max_request_bytes)");
            Err(ApiError::payload_too_large(
                "message_too_large",
                format!("a message of {size} bytes exceeds the {limit} bytes region {region}'s queue takes; nothing of this request was acknowledged"),
            )
            .in_region(region.clone()))
        }
        Ok(Err(failure)) => {
            warn!(region = %region, error = %failure, "queue append failed");
            Err(ApiError::unavailable(
                "region_unavailable",
                format!("region {region} cannot store messages right now; retry later"),
                5,
            )
            .in_region(region.clone()))
        }
        Err(_) => {
            warn!(region = %region, timeout_ms = state.node.settings.append_timeout.as_millis() as u64, "queue append timed out");
            Err(ApiError::unavailable(
                "region_unavailable",
                format!("region {region} is slow to store messages; retry later"),
                2,
            )
            .in_region(region.clone()))
        }
    }
}

fn ok_response() -> Response {
    static SUCCESS: &[u8] = br#"{"success":true}"#;
    let mut response = Response::new(Body::from(Bytes::from_static(SUCCESS)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// analytics.js client metrics: counted, never stored, no auth.
async fn client_metrics(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    read_body(&state, &headers, body, &BodyOwner::Anonymous).await?;
    state.node.metrics.client_metrics_report();
    Ok(ok_response())
}

/// analytics.js boot settings.
async fn browser_settings(
    State(state): State<AppState>,
    ApiPath(write_key): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let resolved = authorize(&state, Some(write_key.clone())).await?;
    let (scheme, host) = match &state.node.settings.public_url {
        Some(url) => {
            let (scheme, host) = url.split_once("://").unwrap_or(("https", url.as_str()));
            (scheme.to_string(), host.to_string())
        }
        None => {
            // Only the two schemes SDKs can use; anything else a client sends is not reflected.
            let scheme = match headers
                .get("x-forwarded-proto")
                .and_then(|value| value.to_str().ok())
            {
                Some("https") => "https",
                _ => "http",
            }
            .to_string();
            let host = headers
                .get(header::HOST)
                .and_then(|value| value.to_str().ok())
                .unwrap_or("localhost")
                .to_string();
            (scheme, host)
        }
    };
    let body = json!({
        "integrations": {
            "Segment.io": {"apiKey": write_key, "apiHost": format!("{host}/v1"), "protocol": scheme}
        },
        "metrics": {"host": format!("{host}/v1")},
        "plan": {"track": {"__default": {"enabled": true}}, "identify": {"__default": {"enabled": true}}, "group": {"__default": {"enabled": true}}},
    });
    let mut response = (StatusCode::OK, axum::Json(body)).into_response();
    if let Ok(value) = HeaderValue::from_str(resolved.region.as_str()) {
        response.headers_mut().insert(X_REGION, value);
    }
    // With a configured public URL every client gets the same answer: shared caches may keep it.
    // Without one the answer reflects the request's Host and X-Forwarded-Proto, so a shared cache
    // must not serve one client's answer to another (cache poisoning).
    let cache_control = if state.node.settings.public_url.is_some() {
        "public, max-age=60"
    } else {
        response.headers_mut().insert(
            header::VARY,
            HeaderValue::from_static("Host, X-Forwarded-Proto"),
        );
        "private, max-age=60"
    };
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(cache_control),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers_with(authorization: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(authorization).unwrap(),
        );
        headers
    }

    #[test]
    fn reads_the_three_auth_forms() {
        // "wk_py:" in base64, as segment-analytics-python sends it.
        assert_eq!(
            write_key_from_headers(&headers_with("Basic d2tfcHk6"))
                .unwrap()
                .as_deref(),
            Some("wk_py")
        );
        assert_eq!(
            write_key_from_headers(&headers_with("Bearer wk_abc"))
                .unwrap()
                .as_deref(),
            Some("wk_abc")
        );
        assert_eq!(write_key_from_headers(&HeaderMap::new()).unwrap(), None);
        assert!(write_key_from_headers(&headers_with("Basic !!!")).is_err());
        assert!(write_key_from_headers(&headers_with("Digest x")).is_err());
        assert_eq!(
            write_key_from_value(Some(&json!("wk_body"))).as_deref(),
            Some("wk_body")
        );
        assert_eq!(write_key_from_value(Some(&json!(5))), None);
    }
}
