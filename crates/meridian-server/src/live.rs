//! The live event debugger: `GET /admin/projects/{id}/events/live` streams a project's messages as
//! they are accepted (Server-Sent Events), with the ones suppressed and rejected and why.
//!
//! Ingest never waits for a subscriber: it looks the project up in the hub only when somebody
//! watches some project (one atomic load otherwise), and publishes into a bounded broadcast
//! channel that drops what a slow subscriber has not read (the subscriber is told how many it
//! missed). Each project's feed carries at most `console.live_events_per_second`; beyond, events
//! are counted as skipped (sampled). At most `console.live_subscribers_per_project` watch one
//! project at once (429 beyond). A project is watched only on nodes of its region.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::Method;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::sync::broadcast;

use crate::admin::access::authorized_project;
use crate::auth::{AdminAuth, Role};
use crate::error::{ApiError, ApiPath};
use crate::routes::ApiRoutes;
use crate::state::AppState;

/// Events a subscriber may fall behind by before it misses some.
const FEED_CAPACITY: usize = 256;

pub fn routes() -> ApiRoutes {
    ApiRoutes::new().add(
        Method::GET,
        "/admin/projects/{project_id}/events/live",
        live_events,
    )
}

/// What the debugger shows of one message.
#[derive(Clone, Debug)]
pub enum LiveEvent {
    /// Stored (the stored JSON, with `receivedAt`, `messageId`, ...).
    Accepted(Arc<[u8]>),
    /// Dropped because its user is suppressed.
    Suppressed(Arc<[u8]>),
    /// Refused: the batch index, the reject code and the reason.
    Rejected {
        index: usize,
        code: &'static str,
        reason: String,
    },
    /// This many events were not sent (the feed's rate was exceeded).
    Skipped(u64),
}

/// One watched project's feed.
pub struct ProjectFeed {
    sender: broadcast::Sender<LiveEvent>,
    subscribers: AtomicUsize,
    /// `(start of the current second, events sent in it, events skipped since the last report)`.
    rate: Mutex<(Instant, u32, u64)>,
    max_per_second: u32,
}

impl ProjectFeed {
    /// Whether one more event fits in this second's rate; an event that does not is counted as
    /// skipped (the count is sent with the next event that fits). Ingest asks before it copies a
    /// message for the feed, so a busy watched project copies at most the rate.
    pub fn admit(&self) -> bool {
        let Ok(mut rate) = self.rate.lock() else {
            return false;
        };
        let (started, sent, skipped) = &mut *rate;
        if started.elapsed() >= Duration::from_secs(1) {
            *started = Instant::now();
            *sent = 0;
        }
        if *sent >= self.max_per_second {
            *skipped += 1;
            return false;
        }
        *sent += 1;
        true
    }

    /// Sends an event [`ProjectFeed::admit`] let in, after the count of those skipped since the
    /// last one. Never waits.
    pub fn send_admitted(&self, event: LiveEvent) {
        let skipped_report = match self.rate.lock() {
            Ok(mut rate) => std::mem::take(&mut rate.2),
            Err(_) => 0,
        };
        if skipped_report > 0 {
            let _ = self.sender.send(LiveEvent::Skipped(skipped_report));
        }
        // No receiver left (it is leaving): nothing to do.
        let _ = self.sender.send(event);
    }

    /// [`ProjectFeed::admit`], then [`ProjectFeed::send_admitted`].
    pub fn publish(&self, event: LiveEvent) {
        if self.admit() {
            self.send_admitted(event);
        }
    }
}

/// The feeds of the projects somebody watches on this node.
pub struct LiveHub {
    feeds: RwLock<HashMap<Arc<str>, Arc<ProjectFeed>>>,
    watching: AtomicUsize,
    max_subscribers_per_project: usize,
    max_events_per_second: u32,
}

/// A subscriber's place in a feed; leaving (drop) frees it.
pub struct Subscription {
    hub: Arc<LiveHub>,
    project_id: Arc<str>,
    feed: Arc<ProjectFeed>,
    receiver: broadcast::Receiver<LiveEvent>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.watching.fetch_sub(1, Ordering::Relaxed);
        if self.feed.subscribers.fetch_sub(1, Ordering::AcqRel) == 1
            && let Ok(mut feeds) = self.hub.feeds.write()
            && self.feed.subscribers.load(Ordering::Acquire) == 0
        {
            feeds.remove(&self.project_id);
        }
    }
}

impl LiveHub {
    pub fn new(max_subscribers_per_project: usize, max_events_per_second: u32) -> LiveHub {
        LiveHub {
            feeds: RwLock::new(HashMap::new()),
            watching: AtomicUsize::new(0),
            max_subscribers_per_project: max_subscribers_per_project.max(1),
            max_events_per_second: max_events_per_second.max(1),
        }
    }

    /// The project's feed if somebody watches it (the ingest hot path: one atomic load when
    /// nobody watches anything).
    pub fn feed_of(&self, project_id: &str) -> Option<Arc<ProjectFeed>> {
        if self.watching.load(Ordering::Relaxed) == 0 {
            return None;
        }
        self.feeds.read().ok()?.get(project_id).cloned()
    }

    /// A new subscriber of the project's feed; `None` when it has its maximum already.
    pub fn subscribe(self: &Arc<Self>, project_id: &str) -> Option<Subscription> {
        let mut feeds = self.feeds.write().ok()?;
        let feed = feeds
            .entry(Arc::from(project_id))
            .or_insert_with(|| {
                Arc::new(ProjectFeed {
                    sender: broadcast::channel(FEED_CAPACITY).0,
                    subscribers: AtomicUsize::new(0),
                    rate: Mutex::new((Instant::now(), 0, 0)),
                    max_per_second: self.max_events_per_second,
                })
            })
            .clone();
        if feed.subscribers.load(Ordering::Acquire) >= self.max_subscribers_per_project {
            return None;
        }
        feed.subscribers.fetch_add(1, Ordering::AcqRel);
        self.watching.fetch_add(1, Ordering::Relaxed);
        Some(Subscription {
            hub: Arc::clone(self),
            project_id: Arc::from(project_id),
            receiver: feed.sender.subscribe(),
            feed,
        })
    }
}

/// The stored message as JSON text: it is spliced into the event as it is (the queue holds
/// valid JSON objects), not parsed and written again.
fn stored_json(stored: &[u8]) -> &str {
    match std::str::from_utf8(stored) {
        Ok(text) if text.starts_with('{') => text,
        _ => "null",
    }
}

/// An event's SSE name and data.
fn event_data(event: LiveEvent) -> (&'static str, String) {
    match event {
        LiveEvent::Accepted(stored) => (
            "accepted",
            format!("{{\"message\":{}}}", stored_json(&stored)),
        ),
        LiveEvent::Suppressed(stored) => (
            "suppressed",
            format!(
                "{{\"message\":{},\"reason\":\"the user is suppressed: the message was answered 200 and dropped\"}}",
                stored_json(&stored)
            ),
        ),
        LiveEvent::Rejected {
            index,
            code,
            reason,
        } => (
            "rejected",
            json!({"index": index, "code": code, "reason": reason, "message": null}).to_string(),
        ),
        LiveEvent::Skipped(count) => ("skipped", json!({"count": count}).to_string()),
    }
}

fn sse_event(event: LiveEvent) -> Event {
    let (name, data) = event_data(event);
    Event::default().event(name).data(data)
}

async fn live_events(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    ApiPath(project_id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let project = authorized_project(&state, &claims, &project_id, Role::Member).await?;
    crate::admin::access::served_region(&state, &project)?;
    // Node-wide cap on open streams; the permit lives as long as the stream.
    let Ok(stream_permit) = Arc::clone(&state.http.live_streams).try_acquire_owned() else {
        state.node.metrics.edge_refused("live_streams_node");
        return Err(ApiError::unavailable(
            "too_many_streams",
            "this node has as many live streams open as it may; retry shortly",
            5,
        ));
    };
    let Some(subscription) = state.http.live.subscribe(&project_id) else {
        return Err(ApiError::too_many_requests(
            "too_many_subscribers",
            format!(
                "project {project_id} already has {} live subscribers on this node; close one",
                state.node.settings.live_subscribers_per_project
            ),
            5,
        ));
    };
    let authorization = StreamAuthorization {
        state: state.clone(),
        claims,
    };
    let watch = Watch {
        subscription,
        authorization,
        _stream_permit: stream_permit,
        recheck: tokio::time::interval_at(
            tokio::time::Instant::now() + AUTHORIZATION_RECHECK,
            AUTHORIZATION_RECHECK,
        ),
    };
    let stream = futures_util::stream::unfold(watch, |mut watch| async move {
        let expires = tokio::time::sleep_until(watch.authorization.expiry());
        tokio::pin!(expires);
        let event = loop {
            tokio::select! {
                received = watch.subscription.receiver.recv() => match received {
                    Ok(event) => break event,
                    // Too slow: what it missed is counted, never waited for.
                    Err(broadcast::error::RecvError::Lagged(missed)) => break LiveEvent::Skipped(missed),
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                // Authorization ends when the token does: the stream closes at its expiry.
                _ = &mut expires => return None,
                // ... or when the token is revoked.
                _ = watch.recheck.tick() => {
                    if !watch.authorization.still_holds() {
                        return None;
                    }
                }
            }
        };
        Some((Ok::<Event, Infallible>(sse_event(event)), watch))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// How often an open stream checks that its token still holds (revocations, role changes).
const AUTHORIZATION_RECHECK: Duration = Duration::from_secs(5);

/// What an open stream holds: its place in the feed, its place among the node's streams, and the
/// authorization it must keep.
struct Watch {
    subscription: Subscription,
    authorization: StreamAuthorization,
    _stream_permit: tokio::sync::OwnedSemaphorePermit,
    recheck: tokio::time::Interval,
}

/// The token a stream was opened with.
struct StreamAuthorization {
    state: AppState,
    claims: crate::auth::Claims,
}

impl StreamAuthorization {
    /// When the token expires (its `exp`; the leeway is not extended to open streams).
    fn expiry(&self) -> tokio::time::Instant {
        let now_secs = (meridian_core::timestamp::system_now_unix_ms() / 1000).max(0) as u64;
        let remaining = self.claims.exp.saturating_sub(now_secs);
        tokio::time::Instant::now() + Duration::from_secs(remaining)
    }

    /// Whether the token is still valid: not expired, not revoked.
    fn still_holds(&self) -> bool {
        let now_secs = (meridian_core::timestamp::system_now_unix_ms() / 1000).max(0) as u64;
        self.claims.exp > now_secs
            && !self
                .state
                .http
                .jwt
                .is_revoked(&self.claims, &self.state.node.keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_feed_sends_at_most_its_rate_and_reports_what_it_skipped() {
        let hub = Arc::new(LiveHub::new(2, 3));
        assert!(hub.feed_of("prj_1").is_none(), "nobody watches");
        let mut subscription = hub.subscribe("prj_1").expect("first subscriber");
        let feed = hub.feed_of("prj_1").expect("watched");
        for _ in 0..5 {
            feed.publish(LiveEvent::Accepted(Arc::from(&b"{}"[..])));
        }
        let mut received = Vec::new();
        while let Ok(event) = subscription.receiver.try_recv() {
            received.push(event);
        }
        assert_eq!(received.len(), 3, "three a second");
        // A new second: the two skipped are reported before the next event.
        if let Ok(mut rate) = feed.rate.lock() {
            rate.0 -= Duration::from_secs(1);
        }
        feed.publish(LiveEvent::Accepted(Arc::from(&b"{}"[..])));
        assert!(matches!(
            subscription.receiver.try_recv(),
            Ok(LiveEvent::Skipped(2))
        ));
        assert!(matches!(
            subscription.receiver.try_recv(),
            Ok(LiveEvent::Accepted(_))
        ));
    }

    #[test]
    fn events_carry_the_stored_message_as_it_is() {
        let stored: Arc<[u8]> = Arc::from(&br#"{"messageId":"m-1","event":"E\u00e9"}"#[..]);
        let (name, data) = event_data(LiveEvent::Accepted(stored));
        assert_eq!(name, "accepted");
        let parsed: serde_json::Value = serde_json::from_str(&data).unwrap();
        assert_eq!(parsed["message"]["event"], "E\u{e9}");
        let (_, broken) = event_data(LiveEvent::Accepted(Arc::from(&[0xff, 0xfe][..])));
        assert_eq!(broken, r#"{"message":null}"#);
        let (name, data) = event_data(LiveEvent::Suppressed(Arc::from(&br#"{"userId":"m"}"#[..])));
        assert_eq!(name, "suppressed");
        let parsed: serde_json::Value = serde_json::from_str(&data).unwrap();
        assert_eq!(parsed["message"]["userId"], "m");
    }

    #[test]
    fn subscribers_are_limited_per_project_and_leaving_frees_the_place() {
        let hub = Arc::new(LiveHub::new(2, 100));
        let first = hub.subscribe("prj_1").expect("first");
        let second = hub.subscribe("prj_1").expect("second");
        assert!(hub.subscribe("prj_1").is_none(), "a third is refused");
        assert!(hub.subscribe("prj_2").is_some(), "other projects are apart");
        drop(first);
        let third = hub.subscribe("prj_1").expect("a place is free again");
        drop(second);
        drop(third);
        assert!(hub.feed_of("prj_1").is_none(), "nobody watches it any more");
    }

    #[test]
    fn a_subscriber_that_never_reads_costs_a_bounded_buffer() {
        let hub = Arc::new(LiveHub::new(1, u32::MAX));
        let mut subscription = hub.subscribe("prj_1").expect("subscriber");
        let feed = hub.feed_of("prj_1").expect("watched");
        for _ in 0..(FEED_CAPACITY * 10) {
            feed.publish(LiveEvent::Accepted(Arc::from(&b"{}"[..])));
        }
        assert!(matches!(
            subscription.receiver.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(missed)) if missed as usize == FEED_CAPACITY * 9
        ));
    }
}
