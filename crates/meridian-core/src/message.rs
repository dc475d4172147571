//! Validation and enrichment of Segment-spec messages.
//!
//! The ingress hands every message of a request to [`enrich_message`], which either refuses it with
//! a [`MessageRejection`] (a snake_case code plus a sentence) or returns the JSON document we store.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::timestamp::{format_rfc3339_ms, parse_timestamp_ms};

mod raw;
#[cfg(any(test, fuzzing))]
pub mod reference;

pub use raw::RawMessage;
use raw::{JsonType, StoredDocument, json_type};

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
    /// The batch's top-level `sentAt` (or, for a single message, the request's `SentAt` header),
    /// used when a message has none of its own.
    pub batch_sent_at: Option<&'a str>,
    /// The request's `AnonymousId` header (RudderStack's SDKs send it), used when a message has
    /// no `anonymousId` of its own.
    pub default_anonymous_id: Option<&'a str>,
}

/// A validated message as stored: its JSON text plus the fields the ingress and sinks look at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrichedMessage {
    pub message_id: String,
    pub user_id: Option<String>,
    pub json: Vec<u8>,
}

/// Parses one raw message of a batch, refusing it alone when it is too large or not an object.
pub fn parse_raw_message<'a>(
    raw_message: &'a RawValue,
    limits: &IngestLimits,
) -> Result<RawMessage<'a>, MessageRejection> {
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
    RawMessage::parse_str(text).map_err(|error| match error.classify() {
        serde_json::error::Category::Data => MessageRejection::new(
            RejectCode::InvalidMessage,
            "each message must be a JSON object",
        ),
        _ => MessageRejection::new(
            RejectCode::InvalidJson,
            format!("message is not valid JSON: {error}"),
        ),
    })
}

/// Validates one message and returns the document to store.
///
/// `implied_kind` is the type a single-message path implies (`/v1/track` implies `track`); batch
/// messages must name their own `type`. The stored document has the message's top-level fields in
/// key order, with `type`, the identifiers (numbers become strings), `messageId`, the merged batch
/// `context` and `integrations`, the timestamps, `projectId` and `region` set, and `writeKey`
/// removed; everything else is the client's JSON text.
pub fn enrich_message(
    message: RawMessage<'_>,
    implied_kind: Option<MessageKind>,
    context: &EnrichmentContext<'_>,
) -> Result<EnrichedMessage, MessageRejection> {
    let kind = resolve_kind(&message, implied_kind)?;
    let user_id = read_identifier(&message, "userId")?;
    let anonymous_id = read_identifier(&message, "anonymousId")?.or_else(|| {
        context
            .default_anonymous_id
            .filter(|text| !text.is_empty())
            .map(|text| Identifier {
                text: text.to_string(),
                must_be_written: true,
            })
    });
    let mut rewritten_identifiers = Vec::new();
    match kind {
        MessageKind::Alias => {
            if user_id.is_none() {
                return Err(MessageRejection::new(
                    RejectCode::MissingUserId,
                    "an alias message needs a userId",
                ));
            }
            let Some(previous_id) = read_identifier(&message, "previousId")? else {
                return Err(MessageRejection::new(
                    RejectCode::MissingPreviousId,
                    "an alias message needs a previousId",
                ));
            };
            rewritten_identifiers.push(("previousId", previous_id));
        }
        _ if user_id.is_none() && anonymous_id.is_none() => {
            return Err(MessageRejection::new(
                RejectCode::MissingUserId,
                "a message needs a userId or an anonymousId",
            ));
        }
        _ => {}
    }
    if kind == MessageKind::Track && !is_non_empty_string(message.get("event")) {
        return Err(MessageRejection::new(
            RejectCode::MissingEvent,
            "a track message needs an `event` name (a non-empty string)",
        ));
    }
    if kind == MessageKind::Group {
        let Some(group_id) = read_identifier(&message, "groupId")? else {
            return Err(MessageRejection::new(
                RejectCode::MissingGroupId,
                "a group message needs a groupId",
            ));
        };
        rewritten_identifiers.push(("groupId", group_id));
    }
    for object_field in ["properties", "traits", "context", "integrations"] {
        require_type_or_null(&message, object_field, JsonType::Object, "a JSON object")?;
    }
    for string_field in ["event", "name", "category"] {
        require_type_or_null(&message, string_field, JsonType::String, "a string")?;
    }
    let client_message_id = read_identifier(&message, "messageId")?;
    let merged_context = merge_defaults(&message, "context", context.batch_context)?;
    let merged_integrations = merge_defaults(&message, "integrations", context.batch_integrations)?;
    let timestamps = resolve_timestamps(&message, context)?;

    let mut document = StoredDocument::from_fields(message.into_fields());
    document.set_string("type", kind.as_str());
    document.remove("writeKey");
    for (field, identifier) in [("userId", &user_id), ("anonymousId", &anonymous_id)] {
        if let Some(identifier) = identifier {
            identifier.store_in(&mut document, field);
        }
    }
    for (field, identifier) in &rewritten_identifiers {
        identifier.store_in(&mut document, field);
    }
    let message_id = match client_message_id {
        Some(identifier) => {
            identifier.store_in(&mut document, "messageId");
            identifier.text
        }
        None => {
            let generated = uuid::Uuid::new_v4().to_string();
            document.set_string("messageId", &generated);
            generated
        }
    };
    if let Some(merged) = merged_context {
        document.set("context", merged.into());
    }
    if let Some(merged) = merged_integrations {
        document.set("integrations", merged.into());
    }
    timestamps.store_in(&mut document);
    document.set_string("projectId", context.project_id);
    document.set_string("region", context.region);
    Ok(EnrichedMessage {
        message_id,
        user_id: user_id.map(|identifier| identifier.text),
        json: document.into_json(),
    })
}

fn resolve_kind(
    message: &RawMessage<'_>,
    implied_kind: Option<MessageKind>,
) -> Result<MessageKind, MessageRejection> {
    if let Some(kind) = implied_kind {
        return Ok(kind);
    }
    let missing = || {
        MessageRejection::new(
            RejectCode::MissingType,
            "a batch message needs a `type` (track, identify, page, screen, group or alias)",
        )
    };
    let Some(value) = message.get("type") else {
        return Err(missing());
    };
    match json_type(value) {
        JsonType::Null => Err(missing()),
        JsonType::String => {
            let type_name = string_value(value)?;
            MessageKind::parse(&type_name).ok_or_else(|| {
                MessageRejection::new(
                    RejectCode::InvalidType,
                    format!(
                        "`{}` is not a message type: use track, identify, page, screen, group or alias",
                        truncate_for_display(&type_name)
                    ),
                )
            })
        }
        _ => Err(MessageRejection::new(
            RejectCode::InvalidType,
            "`type` must be a string",
        )),
    }
}

/// An identifier as stored: its text, and whether the message did not spell it so (a number,
/// stored as a string, or a value the request's headers supplied).
struct Identifier {
    text: String,
    must_be_written: bool,
}

impl Identifier {
    fn store_in(&self, document: &mut StoredDocument<'_>, field: &'static str) {
        if self.must_be_written {
            document.set_string(field, &self.text);
        }
    }
}

/// Reads an identifier that may be a string or a number; `null`, absent and empty count as
/// absent. Other JSON types are refused.
fn read_identifier(
    message: &RawMessage<'_>,
    field: &str,
) -> Result<Option<Identifier>, MessageRejection> {
    let Some(value) = non_null_field(message, field) else {
        return Ok(None);
    };
    match json_type(value) {
        JsonType::String => {
            let text = string_value(value)?;
            Ok((!text.is_empty()).then_some(Identifier {
                text,
                must_be_written: false,
            }))
        }
        JsonType::Number => {
            // The text of a number as serde_json writes it (1.50 becomes 1.5, as it always was).
            let number: serde_json::Number =
                serde_json::from_str(value.get()).map_err(|error| unstorable(&error))?;
            Ok(Some(Identifier {
                text: number.to_string(),
                must_be_written: true,
            }))
        }
        _ => Err(MessageRejection::new(
            RejectCode::InvalidField,
            format!("`{field}` must be a string or a number"),
        )),
    }
}

/// The field's value unless it is absent or `null` (both mean "not sent").
fn non_null_field<'a>(message: &RawMessage<'a>, field: &str) -> Option<&'a RawValue> {
    message
        .get(field)
        .filter(|value| json_type(value) != JsonType::Null)
}

fn string_value(value: &RawValue) -> Result<String, MessageRejection> {
    serde_json::from_str::<String>(value.get()).map_err(|error| unstorable(&error))
}

/// A value the validation pass accepted but that cannot be read back: cannot happen, and is
/// refused rather than stored wrong if it ever does.
fn unstorable(error: &serde_json::Error) -> MessageRejection {
    MessageRejection::new(
        RejectCode::InvalidMessage,
        format!("message cannot be stored: {error}"),
    )
}

fn is_non_empty_string(value: Option<&RawValue>) -> bool {
    // Every escape sequence stands for at least one character, so only `""` is empty.
    value.is_some_and(|value| json_type(value) == JsonType::String && value.get() != "\"\"")
}

fn require_type_or_null(
    message: &RawMessage<'_>,
    field: &str,
    wanted: JsonType,
    description: &str,
) -> Result<(), MessageRejection> {
    match message.get(field).map(json_type) {
        None | Some(JsonType::Null) => Ok(()),
        Some(found) if found == wanted => Ok(()),
        Some(_) => Err(MessageRejection::new(
            RejectCode::InvalidField,
            format!("`{field}` must be {description}"),
        )),
    }
}

/// The JSON text of `message[field]` with each key of `defaults` it lacks added, or `None` when
/// there is nothing to merge (the field is then stored as the client sent it).
fn merge_defaults(
    message: &RawMessage<'_>,
    field: &str,
    defaults: Option<&Map<String, Value>>,
) -> Result<Option<String>, MessageRejection> {
    let Some(defaults) = defaults.filter(|defaults| !defaults.is_empty()) else {
        return Ok(None);
    };
    let mut target = match message.get(field) {
        // `require_type_or_null` ran before: the value is an object or null.
        Some(value) if json_type(value) == JsonType::Object => {
            serde_json::from_str::<Map<String, Value>>(value.get())
                .map_err(|error| unstorable(&error))?
        }
        _ => Map::new(),
    };
    for (key, value) in defaults {
        target.entry(key.clone()).or_insert_with(|| value.clone());
    }
    serde_json::to_string(&target)
        .map(Some)
        .map_err(|error| unstorable(&error))
}

/// The timestamps to store: `receivedAt`, the skew-corrected `timestamp`, the client's own as
/// `originalTimestamp`, and the batch's `sentAt` when the message has none.
struct Timestamps<'a> {
    received_at_ms: i64,
    timestamp_ms: i64,
    original_timestamp: Option<&'a RawValue>,
    batch_sent_at: Option<&'a str>,
}

impl<'a> Timestamps<'a> {
    fn store_in(&self, document: &mut StoredDocument<'a>) {
        if let Some(batch_sent_at) = self.batch_sent_at {
            document.set_string("sentAt", batch_sent_at);
        }
        if let Some(original) = self.original_timestamp {
            document.set("originalTimestamp", original.get().into());
        }
        document.set_string("timestamp", &format_rfc3339_ms(self.timestamp_ms));
        document.set_string("receivedAt", &format_rfc3339_ms(self.received_at_ms));
    }
}

/// A timestamp field: its JSON text and its time; absent or null is `None`.
fn optional_timestamp<'a>(
    message: &RawMessage<'a>,
    field: &str,
) -> Result<Option<(&'a RawValue, i64)>, MessageRejection> {
    let Some(value) = non_null_field(message, field) else {
        return Ok(None);
    };
    match json_type(value) {
        JsonType::String => {
            let text = string_value(value)?;
            match parse_timestamp_ms(&text) {
                Some(unix_ms) => Ok(Some((value, unix_ms))),
                None => Err(MessageRejection::new(
                    RejectCode::InvalidTimestamp,
                    format!(
                        "`{field}` is not an ISO 8601 timestamp: `{}`",
                        truncate_for_display(&text)
                    ),
                )),
            }
        }
        _ => Err(MessageRejection::new(
            RejectCode::InvalidTimestamp,
            format!("`{field}` must be an ISO 8601 timestamp string"),
        )),
    }
}

/// `timestamp = receivedAt - (sentAt - originalTimestamp)` when the client sent both, else the
/// client's timestamp, else `receivedAt`. A corrected time later than `receivedAt` (an event
/// cannot happen after we received it) or before 1970 is replaced by `receivedAt`; the client's
/// own value stays in `originalTimestamp`.
fn resolve_timestamps<'a>(
    message: &RawMessage<'a>,
    context: &EnrichmentContext<'a>,
) -> Result<Timestamps<'a>, MessageRejection> {
    let client_timestamp = optional_timestamp(message, "timestamp")?;
    let mut sent_at_ms = optional_timestamp(message, "sentAt")?.map(|(_, unix_ms)| unix_ms);
    let mut batch_sent_at = None;
    if sent_at_ms.is_none()
        && let Some(batch_text) = context.batch_sent_at
    {
        // The envelope's sentAt was validated by the caller; an unparseable one is ignored here.
        if let Some(unix_ms) = parse_timestamp_ms(batch_text) {
            batch_sent_at = Some(batch_text);
            sent_at_ms = Some(unix_ms);
        }
    }
    let received_at_ms = context.received_at_ms;
    let corrected_ms = match (client_timestamp, sent_at_ms) {
        (Some((_, original_ms)), Some(sent_ms)) => {
            received_at_ms.saturating_sub(sent_ms.saturating_sub(original_ms))
        }
        (Some((_, original_ms)), None) => original_ms,
        (None, _) => received_at_ms,
    };
    let timestamp_ms = if corrected_ms > received_at_ms || corrected_ms < 0 {
        received_at_ms
    } else {
        corrected_ms
    };
    Ok(Timestamps {
        received_at_ms,
        timestamp_ms,
        original_timestamp: client_timestamp.map(|(value, _)| value),
        batch_sent_at,
    })
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
            default_anonymous_id: None,
        }
    }

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    /// Enriches `message` and checks the result against the reference enrichment on a parsed
    /// `Map`: the same rejection code, or the same stored document (read back as JSON).
    fn enrich(
        message: &Value,
        implied_kind: Option<MessageKind>,
        context: &EnrichmentContext<'_>,
    ) -> Result<EnrichedMessage, MessageRejection> {
        let text = serde_json::to_vec(message).unwrap();
        enrich_text(&text, implied_kind, context)
    }

    fn enrich_text(
        text: &[u8],
        implied_kind: Option<MessageKind>,
        context: &EnrichmentContext<'_>,
    ) -> Result<EnrichedMessage, MessageRejection> {
        let raw = RawMessage::parse(text).unwrap();
        let enriched = enrich_message(raw, implied_kind, context);
        let parsed: Map<String, Value> = serde_json::from_slice(text).unwrap();
        let reference = reference::enrich_message_reference(parsed, implied_kind, context);
        match (&enriched, reference) {
            (Ok(enriched), Ok(reference)) => {
                let mut expected = stored(&reference);
                if reference.message_id != enriched.message_id {
                    // Both generated one: the generated ids differ by design.
                    expected["messageId"] = Value::String(enriched.message_id.clone());
                }
                assert_eq!(stored(enriched), expected);
                assert_eq!(enriched.user_id, reference.user_id);
                assert!(
                    !enriched.json.contains(&b'\n'),
                    "a stored message is one line"
                );
            }
            (Err(rejection), Err(reference)) => assert_eq!(rejection.code, reference.code),
            (enriched, reference) => panic!("enriched {enriched:?}, reference {reference:?}"),
        }
        enriched
    }

    fn stored(enriched: &EnrichedMessage) -> Value {
        serde_json::from_slice(&enriched.json).unwrap()
    }

    #[test]
    fn enriches_a_track_message() {
        let message = json!({"userId": "u1", "event": "Signed Up", "writeKey": "secret"});
        let enriched = enrich(&message, Some(MessageKind::Track), &context()).unwrap();
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
        let message = json!({
            "anonymousId": "a1",
            "event": "Clicked",
            "timestamp": "2026-11-24T06:12:24.678Z",
            "sentAt": "2026-11-24T06:12:26.678Z",
        });
        let enriched = enrich(&message, Some(MessageKind::Track), &context()).unwrap();
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
        let message = json!({"userId": "u", "timestamp": "2026-11-24T05:12:25.678+00:00"});
        let stored_value =
            stored(&enrich(&message, Some(MessageKind::Identify), &with_batch_sent_at).unwrap());
        assert_eq!(stored_value["timestamp"], "2026-11-24T05:12:24.678Z");
        assert_eq!(stored_value["sentAt"], "2026-11-24T05:12:27.678+00:00");

        let stored_value =
            stored(&enrich(&message, Some(MessageKind::Identify), &context()).unwrap());
        assert_eq!(stored_value["timestamp"], "2026-11-24T05:12:25.678Z");
    }

    #[test]
    fn replaces_impossible_timestamps_with_received_at() {
        for far_off in ["2099-01-01T00:00:00Z", "1960-01-01T00:00:00Z"] {
            let message = json!({"userId": "u", "timestamp": far_off});
            let stored_value =
                stored(&enrich(&message, Some(MessageKind::Identify), &context()).unwrap());
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
        let message = json!({"type": "page", "userId": "u", "context": {"ip": "5.6.7.8"}});
        let stored_value = stored(&enrich(&message, None, &ctx).unwrap());
        assert_eq!(
            stored_value["context"],
            json!({"ip": "5.6.7.8", "locale": "en-US"})
        );
        assert_eq!(stored_value["integrations"], json!({"All": false}));

        let message = json!({"type": "page", "userId": "u", "context": null});
        let stored_value = stored(&enrich(&message, None, &ctx).unwrap());
        assert_eq!(
            stored_value["context"],
            json!({"ip": "1.2.3.4", "locale": "en-US"})
        );
    }

    #[test]
    fn keeps_client_message_id_and_stringifies_numeric_ids() {
        let message = json!({"type": "identify", "userId": 42, "messageId": "m-1"});
        let enriched = enrich(&message, None, &context()).unwrap();
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
            let rejection = enrich(&message, None, &context()).unwrap_err();
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
    fn raw_enrichment_stores_what_the_map_enrichment_stored() {
        let batch_context = object(json!({"ip": "1.2.3.4", "library": {"name": "batch"}}));
        let with_batch = EnrichmentContext {
            batch_context: Some(&batch_context),
            batch_sent_at: Some("2026-11-24T05:12:27.678Z"),
            ..context()
        };
        let texts: [&[u8]; 12] = [
            // Pretty-printed, as some clients send: stored on one line.
            b"{\n\t\"type\": \"track\",\r\n\t\"userId\": \"u\",\n\t\"event\": \"E\",\n\t\"properties\": {\n\t\t\"a\": [1,\n 2]\n\t}\n}",
            // Duplicate keys: the last one counts, at the top level and nested.
            br#"{"type":"identify","userId":"first","userId":"second","traits":{"a":1,"a":2}}"#,
            // Escapes in keys and values, unicode, a key that sorts before every other.
            br#"{"type":"track","userId":"\u00fcser \"q\"","event":"caf\u00e9 \ud83d\ude00","\u0041":"\n","!":1}"#,
            // Numbers as identifiers, a float spelled differently from how serde_json writes it.
            br#"{"type":"group","userId":1.50,"groupId":-0,"messageId":12345678901234567890,"properties":{"p":1.50e0}}"#,
            br#"{"type":"alias","userId":"u","previousId":7}"#,
            // Fields enrichment sets, sent by the client: overwritten.
            br#"{"type":"page","anonymousId":"a","projectId":"other","region":"us-east-1","receivedAt":"x","writeKey":"k"}"#,
            // A context to merge with the batch's, one missing, one null.
            br#"{"type":"screen","userId":"u","context":{"ip":"9.9.9.9","locale":"de"}}"#,
            br#"{"type":"screen","userId":"u"}"#,
            br#"{"type":"screen","userId":"u","context":null,"integrations":null}"#,
            // Timestamps with and without the client's sentAt.
            br#"{"type":"track","userId":"u","event":"E","timestamp":"2026-11-24T06:12:24.678+01:00","sentAt":"2026-11-24T06:12:26.678+01:00"}"#,
            br#"{"type":"track","userId":"u","event":"E","timestamp":"2026-11-24T05:12:20Z"}"#,
            // Rejected: both must refuse with the same code.
            br#"{"type":"track","userId":{"id":1},"event":""}"#,
        ];
        for text in texts {
            for context in [&context(), &with_batch] {
                let _ = enrich_text(text, None, context);
                let _ = enrich_text(text, Some(MessageKind::Track), context);
            }
        }
    }

    #[test]
    fn raw_enrichment_matches_the_map_enrichment_on_every_recorded_sdk_request() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/sdk-requests");
        let mut messages_checked = 0;
        for file in ["py.jsonl", "node.jsonl", "browser.jsonl", "posthog.jsonl"] {
            let lines = std::fs::read_to_string(fixtures.join(file)).unwrap();
            for line in lines.lines().filter(|line| !line.trim().is_empty()) {
                let request: Value = serde_json::from_str(line).unwrap();
                let Some(body) = request["body"].as_str() else {
                    continue;
                };
                let Ok(Value::Object(body_object)) = serde_json::from_str::<Value>(body) else {
                    continue;
                };
                if !body_object.contains_key("batch") {
                    let path = request["path"].as_str().unwrap_or("");
                    let implied_kind = MessageKind::ALL.into_iter().find(|kind| {
                        path == format!("/v1/{}", kind.as_str())
                            || path == format!("/v1/{}", &kind.as_str()[..1])
                    });
                    let _ = enrich_text(body.as_bytes(), implied_kind, &context());
                    messages_checked += 1;
                    continue;
                }
                let envelope: BatchEnvelope<'_> = serde_json::from_str(body).unwrap();
                let batch_context = envelope.context.as_ref().and_then(Value::as_object);
                let batch_sent_at = envelope.sent_at.as_ref().and_then(Value::as_str);
                let with_batch = EnrichmentContext {
                    batch_context,
                    batch_sent_at,
                    ..context()
                };
                for raw_message in &envelope.batch.kept {
                    let _ = enrich_text(raw_message.get().as_bytes(), None, &with_batch);
                    messages_checked += 1;
                }
            }
        }
        assert!(
            messages_checked >= 20,
            "only {messages_checked} messages in the fixtures"
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
