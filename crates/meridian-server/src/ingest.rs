//! The Segment-compatible ingest API: decode (limits, gzip) → auth (key cache) → region check →
//! validate + enrich → suppression → append to the region's queue, durably → answer.

use std::io::Read;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use flate2::read::MultiGzDecoder;
use http_body_util::BodyExt;
use meridian_catalog::ResolvedKey;
use meridian_core::message::{RawMessage, parse_raw_message};
use meridian_core::timestamp::now_unix_ms;
use meridian_core::{
    BatchEnvelope, EnrichmentContext, MessageKind, MessageRejection, RejectCode, enrich_message,
};
use meridian_queue::{QueueError, RecordBatch};
use serde_json::{Value, json};
use tracing::warn;

use crate::edge::{BodyCharge, BodyOwner, BudgetRefusal};
use crate::error::{ApiError, ApiPath};
use crate::headers::X_REGION;
use crate::routes::ApiRoutes;
use crate::state::AppState;

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

/// Where a request's write key may come from before its body is read.
enum KeySource {
    /// `Authorization: Basic` or `Bearer` (else `writeKey` in the body).
    Headers,
    /// The query string's `writeKey` (beacons cannot set headers); else `writeKey` in the body.
    Query(Option<String>),
}

/// `writeKey` of a query string, percent-decoded. Never logged: it is a credential in a URL.
fn write_key_from_query(query: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(name, _)| *name == "writeKey")
        .and_then(|(_, value)| percent_decode(value))
        .filter(|key| !key.is_empty())
}

/// `%XX` and `+` of a query value decoded; `None` for malformed escapes or text that is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'%' => {
                let hex = text.get(index + 1..index + 3)?;
                decoded.push(u8::from_str_radix(hex, 16).ok()?);
                index += 3;
            }
            b'+' => {
                decoded.push(b' ');
                index += 1;
            }
            byte => {
                decoded.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8(decoded).ok()
}

/// A request body, with its charge on the node's body budget (released when dropped).
struct ReadBody {
    bytes: Bytes,
    _charge: BodyCharge,
}

impl std::ops::Deref for ReadBody {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

fn body_budget_refusal(state: &AppState, refusal: BudgetRefusal, owner: &BodyOwner) -> ApiError {
    state.node.metrics.body_budget_refused();
    let (reason, message) = match (refusal, owner) {
        (BudgetRefusal::Node, _) => (
            "body_node",
            "the node holds as many request bodies as its memory budget allows; retry shortly",
        ),
        (BudgetRefusal::Share, BodyOwner::Project(_)) => (
            "body_project",
            "this project's requests hold as much of the node's memory as one project may; retry shortly",
        ),
        (BudgetRefusal::Share, BodyOwner::Anonymous) => (
            "body_anonymous",
            "requests without a key in their headers hold as much of the node's memory as they may; send the write key in the Authorization header, or retry shortly",
        ),
    };
    state.node.metrics.edge_refused(reason);
    ApiError::unavailable("overloaded", message, 1)
}

/// Reads the body within the size limit and time limit, inflating gzip without ever inflating
/// past the limit, charging it to `owner`'s share of the node's body budget: a body of declared
/// length before its first byte is read, any other as its bytes arrive (so a slow upload holds
/// what it sent, never the request limit). Over budget: 503 + Retry-After, so that requests
/// together never exceed the memory the budget was sized for and no sender can take all of it.
async fn read_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    owner: &BodyOwner,
) -> Result<ReadBody, ApiError> {
    let limit = state.node.settings.limits.max_request_bytes;
    let too_large = || {
        ApiError::payload_too_large(
            "request_too_large",
            format!("the request body exceeds the limit of {limit} bytes (after decompression)"),
        )
    };
    let declared_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.parse::<usize>().ok());
    if declared_length.is_some_and(|length| length > limit) {
        return Err(too_large());
    }
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .map(|value| value.to_str().unwrap_or("").trim().to_ascii_lowercase());
    let is_gzip = match encoding.as_deref() {
        None | Some("") | Some("identity") => false,
        Some("gzip") | Some("x-gzip") => true,
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_encoding",
                format!("Content-Encoding `{other}` is not supported; send gzip or no encoding"),
            ));
        }
    };
    let mut charge = state.http.body_budgets.charge_for(owner);
    if let Some(length) = declared_length {
        charge
            .add(length)
            .map_err(|refusal| body_budget_refusal(state, refusal, owner))?;
    }
    let read = async {
        let mut collected = bytes::BytesMut::with_capacity(declared_length.unwrap_or(0));
        let mut body = body;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|failure| {
                ApiError::bad_request(
                    "unreadable_body",
                    format!("the request body could not be read: {failure}"),
                )
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if collected.len() + data.len() > limit {
                return Err(too_large());
            }
            let uncharged = (collected.len() + data.len()).saturating_sub(charge.bytes());
            charge
                .add(uncharged)
                .map_err(|refusal| body_budget_refusal(state, refusal, owner))?;
            collected.extend_from_slice(&data);
        }
        Ok(collected.freeze())
    };
    let raw = tokio::time::timeout(state.node.settings.body_read_timeout, read)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "the request body did not arrive in time",
            )
        })??;
    if !is_gzip {
        return Ok(ReadBody {
            bytes: raw,
            _charge: charge,
        });
    }
    // The inflated body is charged as it grows; the compressed bytes stay charged until the end.
    let raw_length = raw.len();
    let inflate = move |mut charge: BodyCharge| -> Result<(Vec<u8>, BodyCharge), InflateFailure> {
        let mut inflated = Vec::new();
        let mut decoder = MultiGzDecoder::new(&raw[..]).take(limit as u64 + 1);
        let mut chunk = vec![0u8; INFLATE_CHUNK_BYTES];
        loop {
            let read = decoder.read(&mut chunk).map_err(InflateFailure::Gzip)?;
            if read == 0 {
                return Ok((inflated, charge));
            }
            charge.add(read).map_err(InflateFailure::Budget)?;
            inflated.extend_from_slice(&chunk[..read]);
        }
    };
    // Inflating up to the 4 MiB limit takes milliseconds of CPU: small bodies inline, larger
    // ones on a blocking thread so the runtime's threads keep serving.
    let inflated = if raw_length <= INLINE_INFLATE_MAX_BYTES {
        inflate(charge)
    } else {
        tokio::task::spawn_blocking(move || inflate(charge))
            .await
            .unwrap_or_else(|error| {
                Err(InflateFailure::Gzip(std::io::Error::other(
                    error.to_string(),
                )))
            })
    };
    let (inflated, charge) = inflated.map_err(|failure| match failure {
        InflateFailure::Gzip(error) => ApiError::bad_request(
            "invalid_gzip",
            format!("the body is not valid gzip: {error}"),
        ),
        InflateFailure::Budget(refusal) => body_budget_refusal(state, refusal, owner),
    })?;
    if inflated.len() > limit {
        return Err(too_large());
    }
    Ok(ReadBody {
        bytes: Bytes::from(inflated),
        _charge: charge,
    })
}

enum InflateFailure {
    Gzip(std::io::Error),
    Budget(BudgetRefusal),
}

/// Gzip bodies are inflated (and charged) this much at a time.
const INFLATE_CHUNK_BYTES: usize = 64 * 1024;

/// Compressed bodies up to this size are inflated on the request's task; larger ones on a
/// blocking thread.
const INLINE_INFLATE_MAX_BYTES: usize = 64 * 1024;

/// The write key from `Authorization: Basic base64(key:)` or `Authorization: Bearer key`.
fn write_key_from_headers(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let malformed = || {
        ApiError::invalid_api_key(
            "the Authorization header is malformed: use Basic base64(<writeKey>:) or Bearer <writeKey>",
        )
    };
    let text = value.to_str().map_err(|_| malformed())?.trim();
    let (scheme, credentials) = text.split_once(' ').ok_or_else(malformed)?;
    let credentials = credentials.trim();
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(credentials)
            .map_err(|_| malformed())?;
        let decoded = String::from_utf8(decoded).map_err(|_| malformed())?;
        let key = decoded
            .split_once(':')
            .map(|(user, _)| user)
            .unwrap_or(&decoded);
        return Ok((!key.is_empty()).then(|| key.to_string()));
    }
    if scheme.eq_ignore_ascii_case("bearer") {
        return Ok((!credentials.is_empty()).then(|| credentials.to_string()));
    }
    Err(malformed())
}

fn write_key_from_value(value: Option<&Value>) -> Option<String> {
    match value {
        Some(Value::String(key)) if !key.is_empty() => Some(key.clone()),
        _ => None,
    }
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

/// Resolves the key and checks that this node serves the project's region.
async fn authorize(state: &AppState, write_key: Option<String>) -> Result<ResolvedKey, ApiError> {
    let write_key = write_key.ok_or_else(|| {
        ApiError::invalid_api_key(
            "no write key: send Authorization: Basic base64(<writeKey>:) or `writeKey` in the body",
        )
    })?;
    let resolved = state
        .node
        .keys
        .resolve_or_refresh(&write_key)
        .await
        .ok_or_else(|| ApiError::invalid_api_key("unknown or revoked write key"))?;
    if !state.node.settings.serves(&resolved.region) {
        let home = &state.node.settings.home_region;
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "wrong_region",
            format!(
                "this write key's project is pinned to region {}, which this node ({home}) does not serve; send its events to a {} endpoint",
                resolved.region, resolved.region
            ),
        )
        .in_region(home.clone()));
    }
    if let Some(target) = &resolved.migrated_to {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "project_migrated",
            format!(
                "project {} was migrated to project {target}: send its events with that project's write key",
                resolved.project_id
            ),
        )
        .in_region(resolved.region.clone()));
    }
    Ok(resolved)
}

fn rate_limit_error(
    decision: crate::rate_limit::Decision,
    resolved: &ResolvedKey,
) -> Result<(), ApiError> {
    match decision {
        crate::rate_limit::Decision::Allowed => Ok(()),
        crate::rate_limit::Decision::Limited {
            retry_after_secs,
            reset_secs,
        } => {
            Err(ApiError::rate_limited(retry_after_secs, reset_secs)
                .in_region(resolved.region.clone()))
        }
    }
}

/// Authorizes a key and checks, before anything of the body is read, that its project may send.
async fn admit(state: &AppState, write_key: Option<String>) -> Result<ResolvedKey, ApiError> {
    let resolved = authorize(state, write_key).await?;
    rate_limit_error(
        state.http.rate_limiter.admit(&resolved.project_id),
        &resolved,
    )?;
    Ok(resolved)
}

/// The request's `SentAt` header, when it is a timestamp (RudderStack's SDKs send it).
fn sent_at_header(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("sentat")
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|text| meridian_core::timestamp::parse_timestamp_ms(text).is_some())
}

/// The request's `AnonymousId` header (RudderStack's SDKs send it), when it is plain text.
fn anonymous_id_header(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("anonymousid")
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|text| !text.is_empty() && text.len() <= 256)
}

/// At most this many rejected messages are listed in an answer; the rest are only counted
/// (`rejected_omitted`), so a batch of many bad elements gets a small answer.
const MAX_LISTED_REJECTIONS: usize = 100;
/// A batch of more than this many times `max_batch_messages` elements is refused whole (413)
/// before any element is looked at: no SDK sends one, and each element would cost work.
const FAR_PAST_BATCH_LIMIT_FACTOR: usize = 4;

struct Outcome {
    accepted: u64,
    suppressed: u64,
    rejections: Rejections,
    /// Batch-level fields that were unusable and left out (the messages were stored anyway).
    envelope_problems: Vec<EnvelopeProblem>,
    records: RecordBatch,
    /// When somebody watches the project live: its feed, and the accepted and suppressed
    /// messages to show once they are durable.
    live: Option<(Arc<crate::live::ProjectFeed>, Vec<crate::live::LiveEvent>)>,
}

struct EnvelopeProblem {
    field: &'static str,
    message: &'static str,
}

/// The rejected messages of a request: the first few listed, all counted by code, and the
/// elements past `max_batch_messages` as one range.
#[derive(Default)]
struct Rejections {
    listed: Vec<(usize, MessageRejection)>,
    omitted: u64,
    by_code: std::collections::BTreeMap<&'static str, u64>,
    /// `(first index, last index, rejection)` of the elements past the batch limit.
    past_limit: Option<(usize, usize, MessageRejection)>,
}

impl Rejections {
    fn push(&mut self, index: usize, rejection: MessageRejection) {
        *self.by_code.entry(rejection.code.as_str()).or_default() += 1;
        if self.listed.len() < MAX_LISTED_REJECTIONS {
            self.listed.push((index, rejection));
        } else {
            self.omitted += 1;
        }
    }

    fn reject_past_limit(&mut self, first: usize, last: usize, limit: usize) {
        debug_assert!(first <= last);
        let count = (last - first + 1) as u64;
        *self
            .by_code
            .entry(RejectCode::BatchTooLarge.as_str())
            .or_default() += count;
        let rejection = MessageRejection::new(
            RejectCode::BatchTooLarge,
            format!(
                "a batch holds at most {limit} messages: messages {first} to {last} ({count}) were not read; send them in another request"
            ),
        );
        self.past_limit = Some((first, last, rejection));
    }

    fn is_empty(&self) -> bool {
        self.by_code.is_empty()
    }

    fn first(&self) -> Option<&MessageRejection> {
        self.listed
            .first()
            .map(|(_, rejection)| rejection)
            .or(self.past_limit.as_ref().map(|(_, _, rejection)| rejection))
    }

    fn to_json(&self) -> Value {
        let mut entries: Vec<Value> = self
            .listed
            .iter()
            .map(|(index, rejection)| json!({"index": index, "code": rejection.code.as_str(), "message": rejection.message}))
            .collect();
        if let Some((first, last, rejection)) = &self.past_limit {
            entries.push(json!({"index": first, "last_index": last, "code": rejection.code.as_str(), "message": rejection.message}));
        }
        Value::Array(entries)
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

enum MessagesToProcess<'a> {
    Single(MessageKind, RawMessage<'a>),
    Batch,
}

/// What a request's headers say about its messages, used where the body does not.
#[derive(Clone, Copy)]
struct HeaderHints<'a> {
    sent_at: Option<&'a str>,
    anonymous_id: Option<&'a str>,
}

fn process_messages(
    state: &AppState,
    resolved: &ResolvedKey,
    received_at_ms: i64,
    messages: MessagesToProcess<'_>,
    envelope: Option<&BatchEnvelope<'_>>,
    header_hints: HeaderHints<'_>,
) -> Result<Outcome, ApiError> {
    let queue = state.node.queue(&resolved.region).ok_or_else(|| {
        ApiError::unavailable(
            "region_unavailable",
            format!("region {} has no queue on this node", resolved.region),
            5,
        )
    })?;
    let limits = state.node.settings.limits;
    // A bad envelope field never costs the messages (SDKs drop a batch answered 400): they are
    // stored without it and the answer names the problem.
    let mut envelope_problems: Vec<EnvelopeProblem> = Vec::new();
    let batch_context = match envelope.and_then(|envelope| envelope.context.as_ref()) {
        None | Some(Value::Null) => None,
        Some(Value::Object(object)) => Some(object),
        Some(_) => {
            envelope_problems.push(EnvelopeProblem {
                field: "context",
                message: "the batch's `context` is not an object: it was not merged into the messages",
            });
            None
        }
    };
    let batch_integrations = match envelope.and_then(|envelope| envelope.integrations.as_ref()) {
        None | Some(Value::Null) => None,
        Some(Value::Object(object)) => Some(object),
        Some(_) => {
            envelope_problems.push(EnvelopeProblem {
                field: "integrations",
                message: "the batch's `integrations` is not an object: it was not merged into the messages",
            });
            None
        }
    };
    let batch_sent_at = match envelope.and_then(|envelope| envelope.sent_at.as_ref()) {
        None | Some(Value::Null) => header_hints.sent_at,
        Some(Value::String(text))
            if meridian_core::timestamp::parse_timestamp_ms(text).is_some() =>
        {
            Some(text.as_str())
        }
        Some(_) => {
            envelope_problems.push(EnvelopeProblem {
                field: "sentAt",
                message: "the batch's `sentAt` is not an ISO 8601 timestamp: the messages' timestamps were not corrected for clock skew",
            });
            None
        }
    };
    let context = EnrichmentContext {
        project_id: &resolved.project_id,
        region: resolved.region.as_str(),
        received_at_ms,
        batch_context,
        batch_integrations,
        batch_sent_at,
        default_anonymous_id: header_hints.anonymous_id,
    };
    let check_suppressions = state.node.keys.has_suppressions(&resolved.project_id);
    let mut outcome = Outcome {
        accepted: 0,
        suppressed: 0,
        rejections: Rejections::default(),
        envelope_problems,
        records: queue.new_batch(),
        live: state
            .http
            .live
            .feed_of(&resolved.project_id)
            .map(|feed| (feed, Vec::new())),
    };
    let mut handle = |index: usize,
                      parsed: Result<RawMessage<'_>, MessageRejection>,
                      implied: Option<MessageKind>| {
        let enriched = parsed.and_then(|message| enrich_message(message, implied, &context));
        match enriched {
            Ok(enriched) => {
                let is_suppressed = check_suppressions
                    && enriched.user_id.as_deref().is_some_and(|user_id| {
                        state.node.keys.is_suppressed(&resolved.project_id, user_id)
                    });
                // Copied for the live debugger only when its feed has room this second.
                let watched = outcome
                    .live
                    .as_mut()
                    .filter(|(feed, _)| feed.admit())
                    .map(|(_, events)| events);
                if is_suppressed {
                    outcome.suppressed += 1;
                    if let Some(events) = watched {
                        events.push(crate::live::LiveEvent::Suppressed(Arc::from(
                            enriched.json.as_slice(),
                        )));
                    }
                } else if let Err(failure) = outcome.records.push_identified(
                    &enriched.json,
                    &resolved.project_id,
                    &enriched.message_id,
                ) {
                    outcome.rejections.push(
                        index,
                        MessageRejection::new(RejectCode::MessageTooLarge, failure.to_string()),
                    );
                } else {
                    outcome.accepted += 1;
                    if let Some(events) = watched {
                        events.push(crate::live::LiveEvent::Accepted(Arc::from(
                            enriched.json.as_slice(),
                        )));
                    }
                }
            }
            Err(rejection) => outcome.rejections.push(index, rejection),
        }
    };
    match messages {
        MessagesToProcess::Single(kind, message) => handle(0, Ok(message), Some(kind)),
        MessagesToProcess::Batch => {
            let (raw_messages, total) = envelope
                .map(|envelope| (envelope.batch.kept.as_slice(), envelope.batch.total))
                .unwrap_or_default();
            let within_limit = total.min(limits.max_batch_messages);
            // The config keeps max_batch_messages far below what parsing keeps.
            debug_assert!(within_limit <= raw_messages.len());
            for (index, raw_message) in raw_messages.iter().take(within_limit).enumerate() {
                handle(index, parse_raw_message(raw_message, &limits), None);
            }
            if total > within_limit {
                outcome.rejections.reject_past_limit(
                    within_limit,
                    total - 1,
                    limits.max_batch_messages,
                );
            }
        }
    }
    Ok(outcome)
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
