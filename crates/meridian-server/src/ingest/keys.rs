//! Who a request is from: its write key (from the headers, a beacon's query string, or the body),
//! resolved to its project, its region checked and its project's rate consulted.

use axum::http::{HeaderMap, StatusCode, header};
use base64::Engine;
use meridian_catalog::ResolvedKey;
use serde_json::Value;

use crate::error::ApiError;
use crate::state::AppState;

/// Where a request's write key may come from before its body is read.
pub(super) enum KeySource {
    /// `Authorization: Basic` or `Bearer` (else `writeKey` in the body).
    Headers,
    /// The query string's `writeKey` (beacons cannot set headers); else `writeKey` in the body.
    Query(Option<String>),
}

/// `writeKey` of a query string, percent-decoded. Never logged: it is a credential in a URL.
pub(super) fn write_key_from_query(query: &str) -> Option<String> {
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

/// The write key from `Authorization: Basic base64(key:)` or `Authorization: Bearer key`.
pub(super) fn write_key_from_headers(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
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

pub(super) fn write_key_from_value(value: Option<&Value>) -> Option<String> {
    match value {
        Some(Value::String(key)) if !key.is_empty() => Some(key.clone()),
        _ => None,
    }
}

/// Resolves the key and checks that this node serves the project's region.
pub(super) async fn authorize(
    state: &AppState,
    write_key: Option<String>,
) -> Result<ResolvedKey, ApiError> {
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

pub(super) fn rate_limit_error(
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
pub(super) async fn admit(
    state: &AppState,
    write_key: Option<String>,
) -> Result<ResolvedKey, ApiError> {
    let resolved = authorize(state, write_key).await?;
    rate_limit_error(
        state.http.rate_limiter.admit(&resolved.project_id),
        &resolved,
    )?;
    Ok(resolved)
}

/// The request's `SentAt` header, when it is a timestamp (RudderStack's SDKs send it).
pub(super) fn sent_at_header(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("sentat")
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|text| meridian_core::timestamp::parse_timestamp_ms(text).is_some())
}

/// The request's `AnonymousId` header (RudderStack's SDKs send it), when it is plain text.
pub(super) fn anonymous_id_header(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("anonymousid")
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|text| !text.is_empty() && text.len() <= 256)
}
