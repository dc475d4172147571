//! Reading a stream by sequence: ephemeral pull consumers without acks (the position is kept by
//! the caller: a sink's cursor, or nothing for a residency scan).

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use futures_util::StreamExt;

use super::{FETCH_MAX_MESSAGES, JetStreamSettings, bounded, connect, unavailable};
use crate::error::QueueError;

pub(super) type StreamReader = consumer::Consumer<consumer::pull::Config>;

/// An ephemeral consumer that delivers the stream's messages from sequence `from` on, without
/// acks; it goes away by itself once left inactive.
pub(super) async fn create_reader(
    context: &jetstream::Context,
    stream_name: &str,
    from: u64,
    timeout: Duration,
) -> Result<StreamReader, QueueError> {
    let stream = bounded(
        timeout,
        "opening the stream",
        context.get_stream_no_info(stream_name),
    )
    .await?;
    bounded(
        timeout,
        "creating a reader",
        stream.create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from.max(1),
            },
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(120),
            ..Default::default()
        }),
    )
    .await
}

/// The next messages the reader has (at most `wanted`, without waiting for more): each one's
/// stream sequence and payload as stored.
pub(super) async fn fetch(
    reader: &StreamReader,
    wanted: usize,
    timeout: Duration,
) -> Result<Vec<(u64, Bytes)>, QueueError> {
    let fetched = async {
        let mut batch = reader
            .fetch()
            .max_messages(wanted.clamp(1, FETCH_MAX_MESSAGES))
            .messages()
            .await
            .map_err(|error| unavailable("reading the stream", error))?;
        let mut messages = Vec::new();
        while let Some(message) = batch.next().await {
            let message = message.map_err(|error| unavailable("reading the stream", error))?;
            let sequence = message
                .info()
                .map_err(|error| unavailable("reading a message's sequence", error))?
                .stream_sequence;
            messages.push((sequence, message.payload.clone()));
        }
        Ok::<_, QueueError>(messages)
    };
    tokio::time::timeout(timeout, fetched)
        .await
        .map_err(|_| unavailable("reading the stream", "timed out"))?
}

/// How many records of each project the region's streams hold (records whose project cannot be
/// read are counted under `""`), for residency reports: it creates no stream and moves no cursor.
pub async fn project_record_counts(
    settings: &JetStreamSettings,
) -> Result<BTreeMap<String, u64>, QueueError> {
    #[derive(serde::Deserialize)]
    struct ProjectOf<'a> {
        #[serde(rename = "projectId", borrow)]
        project_id: Option<std::borrow::Cow<'a, str>>,
    }
    let timeout = settings.request_timeout;
    let context = jetstream::ContextBuilder::new()
        .timeout(timeout)
        .build(connect(settings).await?);
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for index in 0..settings.partitions.max(1) {
        let stream_name = settings.stream_name(index);
        let Ok(Ok(stream)) = tokio::time::timeout(timeout, context.get_stream(&stream_name)).await
        else {
            // No such stream (never created, or unreachable): it holds nothing of anyone here.
            continue;
        };
        let state = stream.cached_info().state.clone();
        if state.messages == 0 {
            continue;
        }
        let reader = create_reader(&context, &stream_name, state.first_sequence, timeout).await?;
        let mut next_sequence = state.first_sequence.max(1);
        while next_sequence <= state.last_sequence {
            let messages = fetch(&reader, FETCH_MAX_MESSAGES, timeout).await?;
            let Some((last, _)) = messages.last() else {
                // Purged meanwhile (delivered): what is left was read.
                break;
            };
            next_sequence = last + 1;
            for (_, payload) in &messages {
                let opened = match &settings.encryption {
                    Some(encryption) => encryption.open(payload).ok(),
                    None => Some(payload.to_vec()),
                };
                let project = opened
                    .as_deref()
                    .and_then(|plain| serde_json::from_slice::<ProjectOf<'_>>(plain).ok())
                    .and_then(|message| message.project_id.map(|id| id.into_owned()))
                    .unwrap_or_default();
                *counts.entry(project).or_default() += 1;
            }
        }
    }
    Ok(counts)
}
