//! Reading a request's body: within the size and time limits, gzip inflated never past the limit,
//! every byte charged to its sender's share of the node's body budget.

use std::io::Read;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use bytes::Bytes;
use flate2::read::MultiGzDecoder;
use http_body_util::BodyExt;

use crate::edge::{BodyCharge, BodyOwner, BudgetRefusal};
use crate::error::ApiError;
use crate::state::AppState;

/// A request body, with its charge on the node's body budget (released when dropped).
pub(super) struct ReadBody {
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
pub(super) async fn read_body(
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
