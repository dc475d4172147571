//! Per-project rate limits: a token bucket per project, shared by every connection of the node,
//! sharded so that one noisy project never contends with the others.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Messages per second and the burst a project may send.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limit {
    pub per_second: f64,
    pub burst: f64,
}

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

    /// Takes `cost` messages from the project's bucket. A request larger than the burst passes
    /// when the bucket is full and leaves it in debt, so large batches are slowed, never refused
    /// for good.
    pub fn check(&self, project_id: &Arc<str>, cost: u64) -> Decision {
        let Some(limit) = self
            .overrides
            .get(&**project_id)
            .copied()
            .or(self.default_limit)
        else {
            return Decision::Allowed;
        };
        let now = Instant::now();
        let mut shard = self.shards[shard_of(project_id)]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let bucket = shard.entry(Arc::clone(project_id)).or_insert(Bucket {
            tokens: limit.burst,
            updated: now,
        });
        let elapsed = now.duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * limit.per_second).min(limit.burst);
        bucket.updated = now;
        let needed = (cost as f64).min(limit.burst);
        if bucket.tokens >= needed {
            bucket.tokens -= cost as f64;
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refill_per_project_and_big_batches_pass_when_full() {
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
        assert_eq!(limiter.check(&noisy, 20), Decision::Allowed);
        assert!(matches!(
            limiter.check(&noisy, 5),
            Decision::Limited {
                retry_after_secs: 1,
                ..
            }
        ));
        assert_eq!(
            limiter.check(&quiet, 20),
            Decision::Allowed,
            "one project's debt never touches another's"
        );
        assert_eq!(
            limiter.check(&Arc::from("vip"), 900),
            Decision::Allowed,
            "override"
        );
        let fresh: Arc<str> = Arc::from("fresh");
        assert_eq!(
            limiter.check(&fresh, 500),
            Decision::Allowed,
            "a batch above the burst passes on a full bucket"
        );
        match limiter.check(&fresh, 1) {
            Decision::Limited {
                retry_after_secs,
                reset_secs,
            } => {
                assert!(retry_after_secs >= 48, "in debt: {retry_after_secs}");
                assert!(reset_secs >= retry_after_secs);
            }
            Decision::Allowed => panic!("the debt must be paid first"),
        }
        let unlimited = RateLimiter::new(None, HashMap::new());
        assert!(!unlimited.is_enabled());
        assert_eq!(unlimited.check(&noisy, 1_000_000), Decision::Allowed);
    }
}
