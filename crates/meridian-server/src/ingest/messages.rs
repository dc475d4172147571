//! What becomes of a request's messages: each validated and enriched (batch context merged, the
//! SDK's headers used where the body lacks a field), checked against suppressions, and added to
//! the region's record batch; rejections listed and counted.

use std::sync::Arc;

use meridian_catalog::ResolvedKey;
use meridian_core::message::{RawMessage, parse_raw_message};
use meridian_core::{
    BatchEnvelope, EnrichmentContext, MessageKind, MessageRejection, RejectCode, enrich_message,
};
use meridian_queue::RecordBatch;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::state::AppState;

/// At most this many rejected messages are listed in an answer; the rest are only counted
/// (`rejected_omitted`), so a batch of many bad elements gets a small answer.
pub(super) const MAX_LISTED_REJECTIONS: usize = 100;
/// A batch of more than this many times `max_batch_messages` elements is refused whole (413)
/// before any element is looked at: no SDK sends one, and each element would cost work.
pub(super) const FAR_PAST_BATCH_LIMIT_FACTOR: usize = 4;

pub(super) struct Outcome {
    pub(super) accepted: u64,
    pub(super) suppressed: u64,
    pub(super) rejections: Rejections,
    /// Batch-level fields that were unusable and left out (the messages were stored anyway).
    pub(super) envelope_problems: Vec<EnvelopeProblem>,
    pub(super) records: RecordBatch,
    /// When somebody watches the project live: its feed, and the accepted and suppressed
    /// messages to show once they are durable.
    pub(super) live: Option<(Arc<crate::live::ProjectFeed>, Vec<crate::live::LiveEvent>)>,
}

pub(super) struct EnvelopeProblem {
    pub(super) field: &'static str,
    pub(super) message: &'static str,
}

/// The rejected messages of a request: the first few listed, all counted by code, and the
/// elements past `max_batch_messages` as one range.
#[derive(Default)]
pub(super) struct Rejections {
    pub(super) listed: Vec<(usize, MessageRejection)>,
    pub(super) omitted: u64,
    pub(super) by_code: std::collections::BTreeMap<&'static str, u64>,
    /// `(first index, last index, rejection)` of the elements past the batch limit.
    pub(super) past_limit: Option<(usize, usize, MessageRejection)>,
}

impl Rejections {
    pub(super) fn push(&mut self, index: usize, rejection: MessageRejection) {
        *self.by_code.entry(rejection.code.as_str()).or_default() += 1;
        if self.listed.len() < MAX_LISTED_REJECTIONS {
            self.listed.push((index, rejection));
        } else {
            self.omitted += 1;
        }
    }

    pub(super) fn reject_past_limit(&mut self, first: usize, last: usize, limit: usize) {
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

    pub(super) fn is_empty(&self) -> bool {
        self.by_code.is_empty()
    }

    pub(super) fn first(&self) -> Option<&MessageRejection> {
        self.listed
            .first()
            .map(|(_, rejection)| rejection)
            .or(self.past_limit.as_ref().map(|(_, _, rejection)| rejection))
    }

    pub(super) fn to_json(&self) -> Value {
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

pub(super) enum MessagesToProcess<'a> {
    Single(MessageKind, RawMessage<'a>),
    Batch,
}

/// What a request's headers say about its messages, used where the body does not.
#[derive(Clone, Copy)]
pub(super) struct HeaderHints<'a> {
    pub(super) sent_at: Option<&'a str>,
    pub(super) anonymous_id: Option<&'a str>,
}

pub(super) fn process_messages(
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
