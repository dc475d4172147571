//! The earlier enrichment, on a fully parsed `serde_json::Map`: the reference the raw-text
//! enrichment is checked against (unit tests and the `message` fuzz target compare the two on
//! every input), never used on the ingest path.

use serde_json::{Map, Value};

use super::{
    EnrichedMessage, EnrichmentContext, MessageKind, MessageRejection, RejectCode,
    truncate_for_display,
};
use crate::timestamp::{format_rfc3339_ms, parse_timestamp_ms};

/// Validates one message and returns the document to store.
///
/// `implied_kind` is the type a single-message path implies (`/v1/track` implies `track`); batch
/// messages must name their own `type`.
pub fn enrich_message_reference(
    mut message: Map<String, Value>,
    implied_kind: Option<MessageKind>,
    context: &EnrichmentContext<'_>,
) -> Result<EnrichedMessage, MessageRejection> {
    let kind = resolve_kind(&message, implied_kind)?;
    message.insert("type".into(), Value::String(kind.as_str().into()));
    message.remove("writeKey");

    let user_id = normalize_identifier(&mut message, "userId")?;
    let mut anonymous_id = normalize_identifier(&mut message, "anonymousId")?;
    if anonymous_id.is_none()
        && let Some(default) = context.default_anonymous_id.filter(|text| !text.is_empty())
    {
        message.insert("anonymousId".into(), Value::String(default.to_string()));
        anonymous_id = Some(default.to_string());
    }
    match kind {
        MessageKind::Alias => {
            if user_id.is_none() {
                return Err(MessageRejection::new(
                    RejectCode::MissingUserId,
                    "an alias message needs a userId",
                ));
            }
            if normalize_identifier(&mut message, "previousId")?.is_none() {
                return Err(MessageRejection::new(
                    RejectCode::MissingPreviousId,
                    "an alias message needs a previousId",
                ));
            }
        }
        _ if user_id.is_none() && anonymous_id.is_none() => {
            return Err(MessageRejection::new(
                RejectCode::MissingUserId,
                "a message needs a userId or an anonymousId",
            ));
        }
        _ => {}
    }
    if kind == MessageKind::Track && non_empty_string(&message, "event").is_none() {
        return Err(MessageRejection::new(
            RejectCode::MissingEvent,
            "a track message needs an `event` name (a non-empty string)",
        ));
    }
    if kind == MessageKind::Group && normalize_identifier(&mut message, "groupId")?.is_none() {
        return Err(MessageRejection::new(
            RejectCode::MissingGroupId,
            "a group message needs a groupId",
        ));
    }
    for object_field in ["properties", "traits", "context", "integrations"] {
        require_object_or_absent(&message, object_field)?;
    }
    for string_field in ["event", "name", "category"] {
        require_string_or_absent(&message, string_field)?;
    }

    let message_id = match normalize_identifier(&mut message, "messageId")? {
        Some(client_message_id) => client_message_id,
        None => {
            let generated = uuid::Uuid::new_v4().to_string();
            message.insert("messageId".into(), Value::String(generated.clone()));
            generated
        }
    };

    merge_defaults(&mut message, "context", context.batch_context);
    merge_defaults(&mut message, "integrations", context.batch_integrations);
    apply_timestamps(&mut message, context)?;
    message.insert(
        "projectId".into(),
        Value::String(context.project_id.to_string()),
    );
    message.insert("region".into(), Value::String(context.region.to_string()));

    let json = serde_json::to_vec(&message).map_err(|error| {
        MessageRejection::new(
            RejectCode::InvalidMessage,
            format!("message cannot be stored: {error}"),
        )
    })?;
    Ok(EnrichedMessage {
        message_id,
        user_id,
        json,
    })
}

fn resolve_kind(
    message: &Map<String, Value>,
    implied_kind: Option<MessageKind>,
) -> Result<MessageKind, MessageRejection> {
    if let Some(kind) = implied_kind {
        return Ok(kind);
    }
    match message.get("type") {
        None | Some(Value::Null) => Err(MessageRejection::new(
            RejectCode::MissingType,
            "a batch message needs a `type` (track, identify, page, screen, group or alias)",
        )),
        Some(Value::String(type_name)) => MessageKind::parse(type_name).ok_or_else(|| {
            MessageRejection::new(
                RejectCode::InvalidType,
                format!(
                    "`{}` is not a message type: use track, identify, page, screen, group or alias",
                    truncate_for_display(type_name)
                ),
            )
        }),
        Some(_) => Err(MessageRejection::new(
            RejectCode::InvalidType,
            "`type` must be a string",
        )),
    }
}

/// Reads an identifier that may be a string or a number, stores it back as a string, and returns
/// it; `null`, absent and empty count as absent. Other JSON types are refused.
fn normalize_identifier(
    message: &mut Map<String, Value>,
    field: &str,
) -> Result<Option<String>, MessageRejection> {
    let normalized = match message.get(field) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(text)) if text.is_empty() => return Ok(None),
        Some(Value::String(text)) => return Ok(Some(text.clone())),
        Some(Value::Number(number)) => number.to_string(),
        Some(_) => {
            return Err(MessageRejection::new(
                RejectCode::InvalidField,
                format!("`{field}` must be a string or a number"),
            ));
        }
    };
    message.insert(field.to_string(), Value::String(normalized.clone()));
    Ok(Some(normalized))
}

fn non_empty_string<'m>(message: &'m Map<String, Value>, field: &str) -> Option<&'m str> {
    match message.get(field) {
        Some(Value::String(text)) if !text.is_empty() => Some(text),
        _ => None,
    }
}

fn require_object_or_absent(
    message: &Map<String, Value>,
    field: &str,
) -> Result<(), MessageRejection> {
    match message.get(field) {
        None | Some(Value::Null) | Some(Value::Object(_)) => Ok(()),
        Some(_) => Err(MessageRejection::new(
            RejectCode::InvalidField,
            format!("`{field}` must be a JSON object"),
        )),
    }
}

fn require_string_or_absent(
    message: &Map<String, Value>,
    field: &str,
) -> Result<(), MessageRejection> {
    match message.get(field) {
        None | Some(Value::Null) | Some(Value::String(_)) => Ok(()),
        Some(_) => Err(MessageRejection::new(
            RejectCode::InvalidField,
            format!("`{field}` must be a string"),
        )),
    }
}

/// Copies each key of `defaults` into `message[field]` unless the message already has it.
fn merge_defaults(
    message: &mut Map<String, Value>,
    field: &str,
    defaults: Option<&Map<String, Value>>,
) {
    let Some(defaults) = defaults else {
        return;
    };
    if defaults.is_empty() {
        return;
    }
    let slot = message
        .entry(field.to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    if slot.is_null() {
        *slot = Value::Object(Map::new());
    }
    // `require_object_or_absent` ran before, so the slot is an object here.
    debug_assert!(slot.is_object());
    if let Value::Object(target) = slot {
        for (key, value) in defaults {
            target.entry(key.clone()).or_insert_with(|| value.clone());
        }
    }
}

fn optional_timestamp(
    message: &Map<String, Value>,
    field: &str,
) -> Result<Option<(String, i64)>, MessageRejection> {
    match message.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => match parse_timestamp_ms(text) {
            Some(unix_ms) => Ok(Some((text.clone(), unix_ms))),
            None => Err(MessageRejection::new(
                RejectCode::InvalidTimestamp,
                format!(
                    "`{field}` is not an ISO 8601 timestamp: `{}`",
                    truncate_for_display(text)
                ),
            )),
        },
        Some(_) => Err(MessageRejection::new(
            RejectCode::InvalidTimestamp,
            format!("`{field}` must be an ISO 8601 timestamp string"),
        )),
    }
}

/// Sets `receivedAt`, `sentAt`, `originalTimestamp` and the skew-corrected `timestamp`:
/// `timestamp = receivedAt - (sentAt - originalTimestamp)` when the client sent both, else the
/// client's timestamp, else `receivedAt`. A corrected time later than `receivedAt` (an event
/// cannot happen after we received it) or before 1970 is replaced by `receivedAt`; the client's
/// own value stays in `originalTimestamp`.
fn apply_timestamps(
    message: &mut Map<String, Value>,
    context: &EnrichmentContext<'_>,
) -> Result<(), MessageRejection> {
    let client_timestamp = optional_timestamp(message, "timestamp")?;
    let mut sent_at = optional_timestamp(message, "sentAt")?;
    if sent_at.is_none()
        && let Some(batch_sent_at) = context.batch_sent_at
    {
        // The envelope's sentAt was validated by the caller; an unparseable one is ignored here.
        if let Some(unix_ms) = parse_timestamp_ms(batch_sent_at) {
            message.insert("sentAt".into(), Value::String(batch_sent_at.to_string()));
            sent_at = Some((batch_sent_at.to_string(), unix_ms));
        }
    }
    let received_at_ms = context.received_at_ms;
    let corrected_ms = match (&client_timestamp, &sent_at) {
        (Some((_, original_ms)), Some((_, sent_ms))) => {
            received_at_ms.saturating_sub(sent_ms.saturating_sub(*original_ms))
        }
        (Some((_, original_ms)), None) => *original_ms,
        (None, _) => received_at_ms,
    };
    let sane_timestamp_ms = if corrected_ms > received_at_ms || corrected_ms < 0 {
        received_at_ms
    } else {
        corrected_ms
    };
    if let Some((original_text, _)) = client_timestamp {
        message.insert("originalTimestamp".into(), Value::String(original_text));
    }
    message.insert(
        "timestamp".into(),
        Value::String(format_rfc3339_ms(sane_timestamp_ms)),
    );
    message.insert(
        "receivedAt".into(),
        Value::String(format_rfc3339_ms(received_at_ms)),
    );
    Ok(())
}
