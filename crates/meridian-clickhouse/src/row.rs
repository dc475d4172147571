//! Stored messages as ClickHouse rows.

use clickhouse::Row;
use meridian_core::timestamp::parse_timestamp_ms;
use serde::Serialize;
use serde_json::{Map, Value};

/// The columns of one stored message, independent of the server's types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventFields {
    pub project_id: String,
    pub message_id: String,
    pub kind: String,
    pub event: String,
    pub user_id: String,
    pub anonymous_id: String,
    pub group_id: String,
    pub previous_id: String,
    pub name: String,
    pub timestamp_ms: i64,
    pub original_timestamp_ms: Option<i64>,
    pub sent_at_ms: Option<i64>,
    pub received_at_ms: i64,
    pub region: String,
    pub context: String,
    pub properties: String,
    pub traits: String,
    pub library_name: String,
    pub library_version: String,
    pub raw: String,
    pub queue_offset: u64,
}

fn text(message: &Map<String, Value>, field: &str) -> String {
    match message.get(field) {
        Some(Value::String(value)) => value.clone(),
        Some(Value::Number(number)) => number.to_string(),
        _ => String::new(),
    }
}

fn json_object(message: &Map<String, Value>, field: &str) -> String {
    match message.get(field) {
        Some(value @ Value::Object(_)) => value.to_string(),
        _ => "{}".to_string(),
    }
}

fn time(message: &Map<String, Value>, field: &str) -> Option<i64> {
    message
        .get(field)
        .and_then(Value::as_str)
        .and_then(parse_timestamp_ms)
}

/// Why a stored message cannot become a row (it is dead-lettered with this reason).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoredMessageError {
    #[error("stored message is not UTF-8")]
    NotUtf8,
    #[error("stored message is not a JSON object: {0}")]
    NotAnObject(String),
    #[error("stored message lacks receivedAt")]
    NoReceivedAt,
}

impl EventFields {
    /// Reads a stored message (the JSON the ingress enriched). Fails only for text that is not
    /// a JSON object or lacks the fields enrichment always sets.
    pub fn from_stored(
        payload: &[u8],
        queue_offset: u64,
    ) -> Result<EventFields, StoredMessageError> {
        let raw = std::str::from_utf8(payload).map_err(|_| StoredMessageError::NotUtf8)?;
        let message: Map<String, Value> = serde_json::from_str(raw)
            .map_err(|error| StoredMessageError::NotAnObject(error.to_string()))?;
        let received_at_ms =
            time(&message, "receivedAt").ok_or(StoredMessageError::NoReceivedAt)?;
        let timestamp_ms = time(&message, "timestamp").unwrap_or(received_at_ms);
        let library = message
            .get("context")
            .and_then(|context| context.get("library"));
        let library_field = |field: &str| {
            library
                .and_then(|library| library.get(field))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        Ok(EventFields {
            project_id: text(&message, "projectId"),
            message_id: text(&message, "messageId"),
            kind: text(&message, "type"),
            event: text(&message, "event"),
            user_id: text(&message, "userId"),
            anonymous_id: text(&message, "anonymousId"),
            group_id: text(&message, "groupId"),
            previous_id: text(&message, "previousId"),
            name: text(&message, "name"),
            timestamp_ms,
            original_timestamp_ms: time(&message, "originalTimestamp"),
            sent_at_ms: time(&message, "sentAt"),
            received_at_ms,
            region: text(&message, "region"),
            context: json_object(&message, "context"),
            properties: json_object(&message, "properties"),
            traits: json_object(&message, "traits"),
            library_name: library_field("name"),
            library_version: library_field("version"),
            raw: raw.to_string(),
            queue_offset,
        })
    }
}

/// Seconds for a `DateTime` column (u32 from 1970 to 2106); `None` when out of range.
fn datetime_seconds(unix_ms: i64) -> Option<u32> {
    u32::try_from(unix_ms.div_euclid(1000)).ok()
}

/// What the sink reads and sets of a row of either flavor: its identity and its times.
pub trait EventRow {
    fn project_id(&self) -> &str;
    fn message_id(&self) -> &str;
    fn timestamp_ms(&self) -> i64;
    fn received_at_ms(&self) -> i64;
    /// Sets `timestamp` (and `timestamp_ms`) to the time a copy of the message was stored with.
    fn set_timestamp_ms(&mut self, timestamp_ms: i64);
}

macro_rules! event_row {
    ($name:ident, $time:ty, $convert:expr, $to_ms:expr, $doc:literal) => {
        #[doc = $doc]
        #[derive(Clone, Debug, Row, Serialize)]
        pub struct $name {
            pub project_id: String,
            pub message_id: String,
            #[serde(rename = "type")]
            pub kind: String,
            pub event: String,
            pub user_id: String,
            pub anonymous_id: String,
            pub group_id: String,
            pub previous_id: String,
            pub name: String,
            pub timestamp: $time,
            pub timestamp_ms: i64,
            pub original_timestamp: Option<$time>,
            pub sent_at: Option<$time>,
            pub received_at: $time,
            pub region: String,
            pub context: String,
            pub properties: String,
            pub traits: String,
            pub library_name: String,
            pub library_version: String,
            pub raw: String,
            pub queue_offset: u64,
        }

        impl $name {
            pub fn from_fields(fields: EventFields) -> $name {
                let convert: fn(i64) -> Option<$time> = $convert;
                $name {
                    timestamp: convert(fields.timestamp_ms).unwrap_or_default(),
                    timestamp_ms: fields.timestamp_ms,
                    original_timestamp: fields.original_timestamp_ms.and_then(convert),
                    sent_at: fields.sent_at_ms.and_then(convert),
                    received_at: convert(fields.received_at_ms).unwrap_or_default(),
                    project_id: fields.project_id,
                    message_id: fields.message_id,
                    kind: fields.kind,
                    event: fields.event,
                    user_id: fields.user_id,
                    anonymous_id: fields.anonymous_id,
                    group_id: fields.group_id,
                    previous_id: fields.previous_id,
                    name: fields.name,
                    region: fields.region,
                    context: fields.context,
                    properties: fields.properties,
                    traits: fields.traits,
                    library_name: fields.library_name,
                    library_version: fields.library_version,
                    raw: fields.raw,
                    queue_offset: fields.queue_offset,
                }
            }
        }

        impl EventRow for $name {
            fn project_id(&self) -> &str {
                &self.project_id
            }

            fn message_id(&self) -> &str {
                &self.message_id
            }

            fn timestamp_ms(&self) -> i64 {
                self.timestamp_ms
            }

            fn received_at_ms(&self) -> i64 {
                let to_ms: fn($time) -> i64 = $to_ms;
                to_ms(self.received_at)
            }

            fn set_timestamp_ms(&mut self, timestamp_ms: i64) {
                let convert: fn(i64) -> Option<$time> = $convert;
                self.timestamp = convert(timestamp_ms).unwrap_or_default();
                self.timestamp_ms = timestamp_ms;
            }
        }
    };
}

event_row!(
    LegacyEventRow,
    u32,
    datetime_seconds,
    |seconds| i64::from(seconds) * 1000,
    "A row for servers before 22.2: `DateTime` columns in seconds."
);
event_row!(
    ModernEventRow,
    i64,
    Some,
    |milliseconds| milliseconds,
    "A row for current servers: `DateTime64(3)` columns in milliseconds."
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_column_from_a_stored_message() {
        let stored = br#"{"type":"identify","userId":"u-\u00e9","anonymousId":null,"messageId":"m1","projectId":"prj_1","region":"eu-west-1",
            "receivedAt":"2026-11-24T05:12:26.678Z","timestamp":"2026-11-24T05:12:24.001Z","originalTimestamp":"2026-11-24T06:12:24.001+01:00",
            "sentAt":"2026-11-24T06:12:26.001+01:00","traits":{"plan":"pro","nested":{"a":[1,null]}},
            "context":{"library":{"name":"analytics-python","version":"2.4.0"}}}"#;
        let fields = EventFields::from_stored(stored, 42).unwrap();
        assert_eq!(fields.kind, "identify");
        assert_eq!(fields.user_id, "u-é");
        assert_eq!(fields.anonymous_id, "");
        assert_eq!(fields.timestamp_ms, 1_795_497_144_001);
        assert_eq!(fields.received_at_ms, 1_795_497_146_678);
        assert_eq!(fields.original_timestamp_ms, Some(1_795_497_144_001));
        assert_eq!(fields.sent_at_ms, Some(1_795_497_146_001));
        assert_eq!(fields.library_name, "analytics-python");
        assert_eq!(fields.properties, "{}");
        assert_eq!(
            serde_json::from_str::<Value>(&fields.traits).unwrap()["nested"]["a"][1],
            Value::Null
        );
        assert_eq!(fields.queue_offset, 42);

        let mut legacy = LegacyEventRow::from_fields(fields.clone());
        assert_eq!(legacy.timestamp, 1_795_497_144);
        assert_eq!(legacy.received_at_ms(), 1_795_497_146_000);
        legacy.set_timestamp_ms(1_000_500);
        assert_eq!((legacy.timestamp, legacy.timestamp_ms), (1_000, 1_000_500));
        let modern = ModernEventRow::from_fields(fields);
        assert_eq!(modern.timestamp, 1_795_497_144_001);
    }

    #[test]
    fn out_of_range_times_become_null_on_legacy_servers() {
        assert_eq!(datetime_seconds(-1), None);
        assert_eq!(datetime_seconds(5_000_000_000_000), None);
        assert_eq!(datetime_seconds(1_000), Some(1));
        assert!(EventFields::from_stored(b"[1]", 0).is_err());
        assert!(EventFields::from_stored(br#"{"type":"track"}"#, 0).is_err());
    }
}
