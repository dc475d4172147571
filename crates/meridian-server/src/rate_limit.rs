//! Per-project rate limits: a token bucket per project, shared by every connection of the node,
//! sharded so that one noisy project never contends with the others.
//!
//! A request is charged what was accepted of it, never what was refused or never read: before its
//! body is read a request only needs the bucket to hold one message ([`RateLimiter::admit`]);
//! once its messages are validated it takes as many tokens as it has accepted messages
//! ([`RateLimiter::charge`]), so a request answered 400 costs the project nothing. A request of
//! more messages than the burst is charged the burst (it passes on a full bucket), so the bucket
//! never goes into debt and a Retry-After is never more than the time one request's worth of
//! tokens takes to refill.
//!
//! Why not `governor`: limits differ per project (overrides) and the charge is known only after
//! the body is validated; a bucket here is two numbers behind a sharded mutex, measured at well
//! under a microsecond per request, and idle buckets are evicted by [`RateLimiter::check`]'s
//! sweep.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub use meridian_node::config::RateLimit as Limit;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// Retry after this many seconds; the bucket is full again after `reset_secs`.
    Limited {
        retry_after_secs: u64,
        reset_secs: u64,
    },
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

const SHARDS: usize = 16;
/// A shard is swept of full (idle) buckets once it holds this many.
const BUCKETS_SWEPT_ABOVE: usize = 1024;

pub struct RateLimiter {
    default_limit: Option<Limit>,
    overrides: HashMap<String, Limit>,
    shards: Vec<Mutex<HashMap<Arc<str>, Bucket>>>,
}

fn shard_of(project_id: &str) -> usize {
    project_id.bytes().fold(0usize, |hash, byte| {
        hash.wrapping_mul(31).wrapping_add(byte as usize)
    }) % SHARDS
}

impl RateLimiter {
    pub fn new(default_limit: Option<Limit>, overrides: HashMap<String, Limit>) -> RateLimiter {
        RateLimiter {
            default_limit,
            overrides,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.default_limit.is_some() || !self.overrides.is_empty()
    }

    fn limit_of(&self, project_id: &str) -> Option<Limit> {
        self.overrides
            .get(project_id)
            .copied()
            .or(self.default_limit)
    }

    /// Before a request's body is read: whether the project's bucket holds a message's worth.
    /// Takes nothing.
    pub fn admit(&self, project_id: &Arc<str>) -> Decision {
        self.check(project_id, 1, false)
    }

    /// Takes `accepted` messages (at most the burst) from the project's bucket, or nothing when
    /// it does not hold that many (then the request is refused whole).
    pub fn charge(&self, project_id: &Arc<str>, accepted: u64) -> Decision {
        if accepted == 0 {
            return Decision::Allowed;
        }
        self.check(project_id, accepted, true)
    }

    fn check(&self, project_id: &Arc<str>, cost: u64, take: bool) -> Decision {
        let Some(limit) = self.limit_of(project_id) else {
            return Decision::Allowed;
        };
        let now = Instant::now();
        let mut shard = self.shards[shard_of(project_id)]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !shard.contains_key(&**project_id) && shard.len() >= BUCKETS_SWEPT_ABOVE {
            // A full bucket is the same as none.
            shard.retain(|_, bucket| {
                bucket.tokens + now.duration_since(bucket.updated).as_secs_f64() * limit.per_second
                    < limit.burst
            });
        }
        let bucket = shard.entry(Arc::clone(project_id)).or_insert(Bucket {
            tokens: limit.burst,
            updated: now,
        });
        let elapsed = now.duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * limit.per_second).min(limit.burst);
        bucket.updated = now;
        let needed = (cost as f64).min(limit.burst);
        debug_assert!(bucket.tokens >= 0.0, "a bucket never goes into debt");
        if bucket.tokens >= needed {
            if take {
                bucket.tokens -= needed;
            }
            return Decision::Allowed;
        }
        let retry_after_secs = ((needed - bucket.tokens) / limit.per_second)
            .ceil()
            .max(1.0) as u64;
        let reset_secs = ((limit.burst - bucket.tokens) / limit.per_second)
            .ceil()
            .max(1.0) as u64;
        Decision::Limited {
            retry_after_secs,
            reset_secs,
        }
    }

    /// Buckets held now (for tests and metrics).
    pub fn buckets(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.lock().map(|shard| shard.len()).unwrap_or(0))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_second: f64, burst: f64) -> RateLimiter {
        RateLimiter::new(Some(Limit { per_second, burst }), HashMap::new())
    }

    #[test]
    fn buckets_refill_per_project_and_overrides_win() {
        let limiter = RateLimiter::new(
            Some(Limit {
                per_second: 10.0,
                burst: 20.0,
            }),
            [(
                "vip".to_string(),
                Limit {
                    per_second: 1000.0,
                    burst: 1000.0,
                },
            )]
            .into(),
        );
        let noisy: Arc<str> = Arc::from("noisy");
        let quiet: Arc<str> = Arc::from("quiet");
        assert_eq!(limiter.charge(&noisy, 20), Decision::Allowed);
        assert!(matches!(
            limiter.admit(&noisy),
            Decision::Limited {
                retry_after_secs: 1,
                ..
            }
        ));
        assert_eq!(
            limiter.charge(&quiet, 20),
            Decision::Allowed,
            "one project's use never touches another's"
        );
        assert_eq!(limiter.charge(&Arc::from("vip"), 900), Decision::Allowed);
        let unlimited = RateLimiter::new(None, HashMap::new());
        assert!(!unlimited.is_enabled());
        assert_eq!(unlimited.charge(&noisy, 1_000_000), Decision::Allowed);
    }

    #[test]
    fn admission_takes_nothing_and_a_refused_charge_takes_nothing() {
        let limiter = limiter(5.0, 10.0);
        let project: Arc<str> = Arc::from("prj");
        for _ in 0..100 {
            assert_eq!(limiter.admit(&project), Decision::Allowed);
        }
        assert_eq!(
            limiter.charge(&project, 0),
            Decision::Allowed,
            "a 400 costs nothing"
        );
        assert_eq!(limiter.charge(&project, 8), Decision::Allowed);
        match limiter.charge(&project, 5) {
            Decision::Limited {
                retry_after_secs, ..
            } => assert_eq!(retry_after_secs, 1, "3 tokens missing at 5/s"),
            Decision::Allowed => panic!("only 2 tokens were left"),
        }
        assert_eq!(
            limiter.charge(&project, 2),
            Decision::Allowed,
            "the refused charge took nothing"
        );
    }

    #[test]
    fn a_request_larger_than_the_burst_costs_the_burst_and_the_wait_is_one_requests_worth() {
        let limiter = limiter(5.0, 10.0);
        let project: Arc<str> = Arc::from("prj");
        assert_eq!(limiter.charge(&project, 10_000), Decision::Allowed);
        match limiter.admit(&project) {
            Decision::Limited {
                retry_after_secs,
                reset_secs,
            } => {
                assert_eq!(retry_after_secs, 1, "one message's worth at 5/s");
                assert_eq!(reset_secs, 2, "the burst of 10 at 5/s");
            }
            Decision::Allowed => panic!("the bucket is empty"),
        }
        match limiter.charge(&project, 2_500) {
            Decision::Limited {
                retry_after_secs, ..
            } => assert!(retry_after_secs <= 2, "never more than the burst's refill"),
            Decision::Allowed => panic!("the bucket is empty"),
        }
    }

    #[test]
    fn full_buckets_are_evicted() {
        let limiter = limiter(1_000_000.0, 1.0);
        for index in 0..(BUCKETS_SWEPT_ABOVE * SHARDS * 2) {
            let project: Arc<str> = Arc::from(format!("prj-{index}"));
            assert_eq!(limiter.charge(&project, 1), Decision::Allowed);
        }
        assert!(
            limiter.buckets() <= BUCKETS_SWEPT_ABOVE * SHARDS + SHARDS,
            "{} buckets kept",
            limiter.buckets()
        );
    }
}
