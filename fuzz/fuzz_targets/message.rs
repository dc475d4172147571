//! The ingest parser and validator on arbitrary bodies: never panics, and whatever it accepts is a
//! JSON object carrying the enrichment fields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meridian_core::message::parse_raw_message;
use meridian_core::{BatchEnvelope, EnrichmentContext, IngestLimits, MessageKind, enrich_message};
use serde_json::{Map, Value};

fn check(enriched: &meridian_core::EnrichedMessage) {
    let stored: Value = serde_json::from_slice(&enriched.json).expect("stored messages are JSON");
    let object = stored.as_object().expect("stored messages are objects");
    for field in ["projectId", "region", "messageId", "receivedAt", "timestamp", "type"] {
        assert!(object.get(field).is_some_and(Value::is_string), "{field} missing");
    }
    assert!(object.get("writeKey").is_none());
    assert_eq!(object["messageId"].as_str(), Some(enriched.message_id.as_str()));
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
            if let Ok(message) = parse_raw_message(raw, &limits)
                && let Ok(enriched) = enrich_message(message, None, &context)
            {
                check(&enriched);
            }
        }
    }
    if let Ok(message) = serde_json::from_slice::<Map<String, Value>>(body) {
        for kind in [MessageKind::Track, MessageKind::Alias] {
            if let Ok(enriched) = enrich_message(message.clone(), Some(kind), &context) {
                check(&enriched);
            }
        }
    }
});
