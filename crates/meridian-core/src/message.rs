//! Validation and enrichment of Segment-spec messages.
//!
//! The ingress hands every message of a request to [`enrich_message`], which either refuses it with
//! a [`MessageRejection`] (a snake_case code plus a sentence) or returns the JSON document we store.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::timestamp::{format_rfc3339_ms, parse_timestamp_ms};

/// Size and count limits of the ingest API (configurable; defaults from API.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestLimits {
    /// Largest accepted message, in bytes of its JSON text.
    pub max_message_bytes: usize,
    /// Largest accepted request body, in bytes after decompression.
    pub max_request_bytes: usize,
    /// Messages of a batch past this count are rejected with `batch_too_large`.
    pub max_batch_messages: usize,
}

impl Default for IngestLimits {
    fn default() -> Self {
        IngestLimits {
            max_message_bytes: 32 * 1024,
            max_request_bytes: 4 * 1024 * 1024,
            max_batch_messages: 2_500,
        }
    }
}

/// The six Segment message types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageKind {
    Track,
    Identify,
    Page,
    Screen,
    Group,
    Alias,
}

impl MessageKind {
    pub const ALL: [MessageKind; 6] = [
        MessageKind::Track,
        MessageKind::Identify,
        MessageKind::Page,
        MessageKind::Screen,
        MessageKind::Group,
        MessageKind::Alias,
    ];

    pub fn parse(type_name: &str) -> Option<MessageKind> {
        MessageKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == type_name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Track => "track",
            MessageKind::Identify => "identify",
            MessageKind::Page => "page",
            MessageKind::Screen => "screen",
            MessageKind::Group => "group",
            MessageKind::Alias => "alias",
        }
    }
}

/// Why a message or request was refused. Serialized as the snake_case `code` of API errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    InvalidJson,
    InvalidBatch,
    InvalidMessage,
    MissingType,
    InvalidType,
    MissingUserId,
    MissingPreviousId,
    MissingEvent,
    MissingGroupId,
    InvalidField,
    InvalidTimestamp,
    MessageTooLarge,
    BatchTooLarge,
}

impl RejectCode {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::InvalidJson => "invalid_json",
            RejectCode::InvalidBatch => "invalid_batch",
            RejectCode::InvalidMessage => "invalid_message",
            RejectCode::MissingType => "missing_type",
            RejectCode::InvalidType => "invalid_type",
            RejectCode::MissingUserId => "missing_user_id",
            RejectCode::MissingPreviousId => "missing_previous_id",
            RejectCode::MissingEvent => "missing_event",
            RejectCode::MissingGroupId => "missing_group_id",
            RejectCode::InvalidField => "invalid_field",
            RejectCode::InvalidTimestamp => "invalid_timestamp",
            RejectCode::MessageTooLarge => "message_too_large",
            RejectCode::BatchTooLarge => "batch_too_large",
        }
    }
}

/// A refused message: the rule it broke and a sentence saying what to fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageRejection {
    pub code: RejectCode,
    pub message: String,
}

impl MessageRejection {
    pub fn new(code: RejectCode, message: impl Into<String>) -> MessageRejection {
        MessageRejection {
            code,
            message: message.into(),
        }
    }
}

/// The body of `/v1/batch`, `/v1/import` and `/v1/b`. Messages stay raw so that each one is
/// size-checked and parsed on its own: one bad message never spoils its neighbours.
#[derive(Debug, Deserialize)]
pub struct BatchEnvelope<'a> {
    #[serde(borrow)]
    pub batch: BatchElements<'a>,
    #[serde(default)]
    pub context: Option<Value>,
    #[serde(default)]
    pub integrations: Option<Value>,
    #[serde(default, rename = "sentAt")]
    pub sent_at: Option<Value>,
    #[serde(default, rename = "writeKey")]
    pub write_key: Option<Value>,
}

/// At most this many elements of a batch are kept while parsing; the rest are only counted, so a
/// body of a million tiny elements costs no more memory than this many pointers. The configurable
/// `max_batch_messages` must stay at or below a quarter of it (see [`MAX_BATCH_MESSAGES_LIMIT`]).
pub const KEPT_BATCH_ELEMENTS: usize = 65_536;
/// The highest `max_batch_messages` a config may set: a batch of up to four times the limit is
/// still answered element by element, and all of those must have been kept.
pub const MAX_BATCH_MESSAGES_LIMIT: usize = KEPT_BATCH_ELEMENTS / 4;

/// The `batch` array: its first [`KEPT_BATCH_ELEMENTS`] elements, raw, and how many it had.
#[derive(Debug, Default)]
pub struct BatchElements<'a> {
    pub kept: Vec<&'a RawValue>,
    /// Every element of the array, kept or not.
    pub total: usize,
}

impl<'de: 'a, 'a> Deserialize<'de> for BatchElements<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ElementsVisitor<'a>(std::marker::PhantomData<&'a ()>);

        impl<'de: 'a, 'a> serde::de::Visitor<'de> for ElementsVisitor<'a> {
            type Value = BatchElements<'a>;

            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("an array of messages")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut sequence: A,
            ) -> Result<Self::Value, A::Error> {
                let mut elements = BatchElements::default();
                loop {
                    if elements.kept.len() < KEPT_BATCH_ELEMENTS {
                        let Some(element) = sequence.next_element::<&'de RawValue>()? else {
                            break;
                        };
                        elements.kept.push(element);
                    } else if sequence.next_element::<serde::de::IgnoredAny>()?.is_none() {
                        break;
                    }
                    elements.total += 1;
                }
                Ok(elements)
            }
        }

        deserializer.deserialize_seq(ElementsVisitor(std::marker::PhantomData))
    }
}

/// What the ingress knows about a request when it enriches its messages.
#[derive(Clone, Copy, Debug)]
pub struct EnrichmentContext<'a> {
    pub project_id: &'a str,
    pub region: &'a str,
    pub received_at_ms: i64,
    /// The batch's top-level `context`, merged into each message (message fields win).
    pub batch_context: Option<&'a Map<String, Value>>,
    /// The batch's top-level `integrations`, merged the same way.
    pub batch_integrations: Option<&'a Map<String, Value>>,
    /// The batch's top-level `sentAt`, used when a message has none of its own.
    pub batch_sent_at: Option<&'a str>,
}

/// A validated message as stored: its JSON text plus the fields the ingress and sinks look at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrichedMessage {
    pub message_id: String,
    pub user_id: Option<String>,
    pub json: Vec<u8>,
}

/// Parses one raw message of a batch, refusing it alone when it is too large or not an object.
pub fn parse_raw_message(
    raw_message: &RawValue,
    limits: &IngestLimits,
) -> Result<Map<String, Value>, MessageRejection> {
    let text = raw_message.get();
    if text.len() > limits.max_message_bytes {
        return Err(MessageRejection::new(
            RejectCode::MessageTooLarge,
            format!(
                "message is {} bytes; the limit is {} bytes",
                text.len(),
                limits.max_message_bytes
            ),
        ));
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(MessageRejection::new(
            RejectCode::InvalidMessage,
            "each message must be a JSON object",
        )),
        Err(error) => Err(MessageRejection::new(
            RejectCode::InvalidJson,
            format!("message is not valid JSON: {error}"),
        )),
    }
}

/// Validates one message and returns the document to store.
///
/// `implied_kind` is the type a single-message path implies (`/v1/track` implies `track`); batch
/// messages must name their own `type`.
pub fn enrich_message(
    mut message: Map<String, Value>,
    implied_kind: Option<MessageKind>,
    context: &EnrichmentContext<'_>,
) -> Result<EnrichedMessage, MessageRejection> {
    let kind = resolve_kind(&message, implied_kind)?;
    message.insert("type".into(), Value::String(kind.as_str().into()));
    message.remove("writeKey");

    let user_id = normalize_identifier(&mut message, "userId")?;
    let anonymous_id = normalize_identifier(&mut message, "anonymousId")?;
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

fn truncate_for_display(text: &str) -> String {
    const MAX_CHARS: usize = 64;
    if text.chars().count() <= MAX_CHARS {
        return text.to_string();
    }
    let mut shortened: String = text.chars().take(MAX_CHARS).collect();
    shortened.push('…');
    shortened
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_batch_keeps_a_bounded_number_of_elements_and_counts_them_all() {
        let count = KEPT_BATCH_ELEMENTS + 5_000;
        let body = format!(r#"{{"batch":[{}]}}"#, vec!["{}"; count].join(","));
        let envelope: BatchEnvelope<'_> = serde_json::from_str(&body).unwrap();
        assert_eq!(envelope.batch.total, count);
        assert_eq!(envelope.batch.kept.len(), KEPT_BATCH_ELEMENTS);
        let small: BatchEnvelope<'_> = serde_json::from_str(r#"{"batch":[1,{"a":2}]}"#).unwrap();
        assert_eq!(small.batch.total, 2);
        assert_eq!(small.batch.kept[1].get(), r#"{"a":2}"#);
        assert!(serde_json::from_str::<BatchEnvelope<'_>>(r#"{"batch":{}}"#).is_err());
        assert!(serde_json::from_str::<BatchEnvelope<'_>>(r#"{"batch":[1,]}"#).is_err());
    }
    use serde_json::json;

    const RECEIVED_AT_MS: i64 = 1_795_497_146_678; // 2026-11-24T05:12:26.678Z

    fn context() -> EnrichmentContext<'static> {
        EnrichmentContext {
            project_id: "prj_1",
            region: "eu-west-1",
            received_at_ms: RECEIVED_AT_MS,
            batch_context: None,
            batch_integrations: None,
            batch_sent_at: None,
        }
    }

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    fn stored(enriched: &EnrichedMessage) -> Value {
        serde_json::from_slice(&enriched.json).unwrap()
    }

    #[test]
    fn enriches_a_track_message() {
        let message = object(json!({"userId": "u1", "event": "Signed Up", "writeKey": "secret"}));
        let enriched = enrich_message(message, Some(MessageKind::Track), &context()).unwrap();
        let stored = stored(&enriched);
        assert_eq!(stored["type"], "track");
        assert_eq!(stored["projectId"], "prj_1");
        assert_eq!(stored["region"], "eu-west-1");
        assert_eq!(stored["receivedAt"], "2026-11-24T05:12:26.678Z");
        assert_eq!(stored["timestamp"], "2026-11-24T05:12:26.678Z");
        assert!(
            stored.get("writeKey").is_none(),
            "the write key must never be stored"
        );
        assert!(stored.get("originalTimestamp").is_none());
        assert_eq!(stored["messageId"], enriched.message_id.as_str());
        assert_eq!(enriched.message_id.len(), 36);
        assert_eq!(enriched.user_id.as_deref(), Some("u1"));
    }

    #[test]
    fn corrects_client_clock_skew_with_sent_at() {
        // The client clock is 1 hour ahead; the event happened 2 s before the client sent it.
        let message = object(json!({
            "anonymousId": "a1",
            "event": "Clicked",
            "timestamp": "2026-11-24T06:12:24.678Z",
            "sentAt": "2026-11-24T06:12:26.678Z",
        }));
        let enriched = enrich_message(message, Some(MessageKind::Track), &context()).unwrap();
        let stored = stored(&enriched);
        assert_eq!(stored["timestamp"], "2026-11-24T05:12:24.678Z");
        assert_eq!(stored["originalTimestamp"], "2026-11-24T06:12:24.678Z");
        assert_eq!(stored["sentAt"], "2026-11-24T06:12:26.678Z");
    }

    #[test]
    fn uses_batch_sent_at_and_keeps_client_timestamp_without_it() {
        let with_batch_sent_at = EnrichmentContext {
            batch_sent_at: Some("2026-11-24T05:12:27.678+00:00"),
            ..context()
        };
        let message = object(json!({"userId": "u", "timestamp": "2026-11-24T05:12:25.678+00:00"}));
        let stored_value = stored(
            &enrich_message(
                message.clone(),
                Some(MessageKind::Identify),
                &with_batch_sent_at,
            )
            .unwrap(),
        );
        assert_eq!(stored_value["timestamp"], "2026-11-24T05:12:24.678Z");
        assert_eq!(stored_value["sentAt"], "2026-11-24T05:12:27.678+00:00");

        let stored_value =
            stored(&enrich_message(message, Some(MessageKind::Identify), &context()).unwrap());
        assert_eq!(stored_value["timestamp"], "2026-11-24T05:12:25.678Z");
    }

    #[test]
    fn replaces_impossible_timestamps_with_received_at() {
        for far_off in ["2099-01-01T00:00:00Z", "1960-01-01T00:00:00Z"] {
            let message = object(json!({"userId": "u", "timestamp": far_off}));
            let stored_value =
                stored(&enrich_message(message, Some(MessageKind::Identify), &context()).unwrap());
            assert_eq!(stored_value["timestamp"], "2026-11-24T05:12:26.678Z");
            assert_eq!(stored_value["originalTimestamp"], far_off);
        }
    }

    #[test]
    fn merges_batch_context_with_message_fields_winning() {
        let batch_context = object(json!({"ip": "1.2.3.4", "locale": "en-US"}));
        let batch_integrations = object(json!({"All": false}));
        let ctx = EnrichmentContext {
            batch_context: Some(&batch_context),
            batch_integrations: Some(&batch_integrations),
            ..context()
        };
        let message = object(json!({"type": "page", "userId": "u", "context": {"ip": "5.6.7.8"}}));
        let stored_value = stored(&enrich_message(message, None, &ctx).unwrap());
        assert_eq!(
            stored_value["context"],
            json!({"ip": "5.6.7.8", "locale": "en-US"})
        );
        assert_eq!(stored_value["integrations"], json!({"All": false}));

        let message = object(json!({"type": "page", "userId": "u", "context": null}));
        let stored_value = stored(&enrich_message(message, None, &ctx).unwrap());
        assert_eq!(
            stored_value["context"],
            json!({"ip": "1.2.3.4", "locale": "en-US"})
        );
    }

    #[test]
    fn keeps_client_message_id_and_stringifies_numeric_ids() {
        let message = object(json!({"type": "identify", "userId": 42, "messageId": "m-1"}));
        let enriched = enrich_message(message, None, &context()).unwrap();
        assert_eq!(enriched.message_id, "m-1");
        assert_eq!(enriched.user_id.as_deref(), Some("42"));
        assert_eq!(stored(&enriched)["userId"], "42");
    }

    #[test]
    fn refuses_each_broken_rule_with_its_own_code() {
        let cases = [
            (
                json!({"userId": "u", "event": "x"}),
                RejectCode::MissingType,
            ),
            (
                json!({"type": "click", "userId": "u"}),
                RejectCode::InvalidType,
            ),
            (json!({"type": 7, "userId": "u"}), RejectCode::InvalidType),
            (json!({"type": "identify"}), RejectCode::MissingUserId),
            (
                json!({"type": "identify", "userId": ""}),
                RejectCode::MissingUserId,
            ),
            (
                json!({"type": "identify", "userId": {"a": 1}}),
                RejectCode::InvalidField,
            ),
            (
                json!({"type": "alias", "previousId": "p"}),
                RejectCode::MissingUserId,
            ),
            (
                json!({"type": "alias", "userId": "u"}),
                RejectCode::MissingPreviousId,
            ),
            (
                json!({"type": "track", "userId": "u"}),
                RejectCode::MissingEvent,
            ),
            (
                json!({"type": "track", "userId": "u", "event": 5}),
                RejectCode::MissingEvent,
            ),
            (
                json!({"type": "group", "userId": "u"}),
                RejectCode::MissingGroupId,
            ),
            (
                json!({"type": "identify", "userId": "u", "traits": [1]}),
                RejectCode::InvalidField,
            ),
            (
                json!({"type": "page", "userId": "u", "name": 3}),
                RejectCode::InvalidField,
            ),
            (
                json!({"type": "identify", "userId": "u", "timestamp": "soon"}),
                RejectCode::InvalidTimestamp,
            ),
            (
                json!({"type": "identify", "userId": "u", "sentAt": 12}),
                RejectCode::InvalidTimestamp,
            ),
        ];
        for (message, expected_code) in cases {
            let description = message.to_string();
            let rejection = enrich_message(object(message), None, &context()).unwrap_err();
            assert_eq!(rejection.code, expected_code, "{description}");
            assert!(!rejection.message.is_empty());
        }
    }

    #[test]
    fn raw_messages_over_the_limit_are_refused_alone() {
        let limits = IngestLimits {
            max_message_bytes: 40,
            ..IngestLimits::default()
        };
        let body = format!(
            r#"{{"batch": [{{"type":"identify","userId":"u"}}, {{"type":"identify","userId":"{}"}}, 3]}}"#,
            "x".repeat(64)
        );
        let envelope: BatchEnvelope<'_> = serde_json::from_str(&body).unwrap();
        assert!(parse_raw_message(envelope.batch.kept[0], &limits).is_ok());
        assert_eq!(
            parse_raw_message(envelope.batch.kept[1], &limits)
                .unwrap_err()
                .code,
            RejectCode::MessageTooLarge
        );
        assert_eq!(
            parse_raw_message(envelope.batch.kept[2], &limits)
                .unwrap_err()
                .code,
            RejectCode::InvalidMessage
        );
    }

    #[test]
    fn every_kind_round_trips_through_its_name() {
        for kind in MessageKind::ALL {
            assert_eq!(MessageKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(MessageKind::parse("Track"), None);
    }
}
