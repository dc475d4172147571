//! The ingest parser and validator on arbitrary bodies: never panics, whatever it accepts is a
//! JSON object carrying the enrichment fields, and it decides and stores exactly what the
//! reference enrichment on a parsed `serde_json::Map` decides and stores.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meridian_core::message::reference::enrich_message_reference;
use meridian_core::message::{RawMessage, parse_raw_message};
use meridian_core::{
    BatchEnvelope, EnrichedMessage, EnrichmentContext, IngestLimits, MessageKind,
    MessageRejection, enrich_message,
};
use serde_json::{Map, Value};

fn check(enriched: &EnrichedMessage) {
    let stored: Value = serde_json::from_slice(&enriched.json).expect("stored messages are JSON");
    let object = stored.as_object().expect("stored messages are objects");
    for field in ["projectId", "region", "messageId", "receivedAt", "timestamp", "type"] {
        assert!(object.get(field).is_some_and(Value::is_string), "{field} missing");
    }
    assert!(object.get("writeKey").is_none());
    assert!(!enriched.json.contains(&b'\n'), "a stored message is one line");
    assert_eq!(object["messageId"].as_str(), Some(enriched.message_id.as_str()));
}

/// Enriches `text` both ways and asserts the same outcome.
fn enrich_both(text: &[u8], implied_kind: Option<MessageKind>, context: &EnrichmentContext<'_>) {
    let parsed_by_map = serde_json::from_slice::<Map<String, Value>>(text);
    let parsed_raw = RawMessage::parse(text);
    assert_eq!(parsed_by_map.is_ok(), parsed_raw.is_ok(), "the two parsers disagree");
    let (Ok(by_map), Ok(raw)) = (parsed_by_map, parsed_raw) else {
        return;
    };
    let enriched = enrich_message(raw, implied_kind, context);
    let reference = enrich_message_reference(by_map, implied_kind, context);
    compare(&enriched, &reference);
}

fn compare(
    enriched: &Result<EnrichedMessage, MessageRejection>,
    reference: &Result<EnrichedMessage, MessageRejection>,
) {
    match (enriched, reference) {
        (Ok(enriched), Ok(reference)) => {
            check(enriched);
            let stored: Value = serde_json::from_slice(&enriched.json).expect("stored is JSON");
            let mut expected: Value = serde_json::from_slice(&reference.json).expect("JSON");
            if enriched.message_id != reference.message_id {
                expected["messageId"] = Value::String(enriched.message_id.clone());
            }
            assert_eq!(stored, expected);
            assert_eq!(enriched.user_id, reference.user_id);
        }
        (Err(rejection), Err(reference)) => assert_eq!(rejection.code, reference.code),
        (enriched, reference) => panic!("enriched {enriched:?}, reference {reference:?}"),
    }
}

fuzz_target!(|body: &[u8]| {
    let limits = IngestLimits::default();
    let context = EnrichmentContext {
        project_id: "prj_fuzz",
        region: "eu-west-1",
        received_at_ms: 1_795_497_146_678,
        batch_context: None,
        batch_integrations: None,
        batch_sent_at: None,
        default_anonymous_id: None,
    };
    if let Ok(envelope) = serde_json::from_slice::<BatchEnvelope<'_>>(body) {
        let batch_context = match &envelope.context {
            Some(Value::Object(object)) => Some(object),
            _ => None,
        };
        let batch_sent_at = match &envelope.sent_at {
            Some(Value::String(text)) => Some(text.as_str()),
            _ => None,
        };
        let context = EnrichmentContext { batch_context, batch_sent_at, ..context };
        for raw in &envelope.batch.kept {
            if parse_raw_message(raw, &limits).is_ok() {
                enrich_both(raw.get().as_bytes(), None, &context);
            }
        }
    }
    for kind in [MessageKind::Track, MessageKind::Alias] {
        enrich_both(body, Some(kind), &context);
    }
});
