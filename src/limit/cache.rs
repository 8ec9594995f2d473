//! Fewer Redis calls under a flood: once a key is over its limit, the answer stays
//! "rejected" until the earliest moment the key could allow again, so an instance can give
//! it from memory until then.
//!
//! An entry only answers what Redis would answer: it is dropped when the rules change (a
//! reload or an override), it answers only for senders Redis has already marked as told
//! (so `notify_user` is the same), and redelivered messages always go to Redis (their
//! first decision may have been "allowed").

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Check, Decision};

/// Keys remembered at most; beyond this the cache stops adding (a flood of distinct keys
/// is not what it is for).
const MAX_ENTRIES: usize = 100_000;

#[derive(Default)]
pub struct RejectionCache {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The rules generation the entries were decided under.
    generation: u64,
    entries: HashMap<String, Entry>,
}

struct Entry {
    /// When the key could allow a message again.
    until: Instant,
    limit: u64,
    window_seconds: u64,
    /// Senders Redis has already marked as told in this window.
    told: HashSet<String>,
}

impl RejectionCache {
    /// The answer for `check` without Redis, when the cache has one.
    pub fn answer(&self, check: &Check, generation: u64, now: Instant) -> Option<Decision> {
        if check.redelivered {
            return None;
        }
        let mut inner = self.inner.lock().expect("never poisoned");
        if inner.generation != generation {
            inner.entries.clear();
            inner.generation = generation;
            return None;
        }
        let entry = inner.entries.get(&check.key)?;
        if now >= entry.until {
            inner.entries.remove(&check.key);
            return None;
        }
        let once_per_window = !check.notify_tag.is_empty();
        if once_per_window && !entry.told.contains(&check.notify_tag) {
            return None;
        }
        // Redis reported whole seconds, so the true wait is at most a second longer than
        // what is left here: answer with that upper bound, never an early retry.
        let left = entry.until - now;
        Some(Decision::Rejected {
            limit: entry.limit,
            window_seconds: entry.window_seconds,
            retry_after: left.as_millis().div_ceil(1000) as u64 + 1,
            notify_user: !once_per_window,
        })
    }

    /// Learns from a decision Redis made for `check` at `decided_at`.
    pub fn learn(&self, check: &Check, decision: &Decision, generation: u64, decided_at: Instant) {
        let Decision::Rejected {
            limit,
            window_seconds,
            retry_after,
            ..
        } = *decision
        else {
            return;
        };
        // `retry_after` is rounded up to whole seconds: the key surely cannot allow before
        // one second less than that. Nothing to remember below that.
        if retry_after <= 1 {
            return;
        }
        let mut inner = self.inner.lock().expect("never poisoned");
        if inner.generation != generation {
            inner.entries.clear();
            inner.generation = generation;
        }
        if inner.entries.len() >= MAX_ENTRIES && !inner.entries.contains_key(&check.key) {
            return;
        }
        let until = decided_at + Duration::from_secs(retry_after - 1);
        let entry = inner.entries.entry(check.key.clone()).or_insert(Entry {
            until,
            limit,
            window_seconds,
            told: HashSet::new(),
        });
        entry.until = until;
        if !check.notify_tag.is_empty() {
            entry.told.insert(check.notify_tag.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Algorithm;
    use crate::limit::Rule;

    fn check(tag: &str) -> Check {
        Check {
            key: "acme:ratelimit:slack".into(),
            rule: Rule {
                algorithm: Algorithm::FixedWindow,
                requests: 3,
                window_seconds: 60,
                burst: 3,
                shadow: false,
            },
            notify_tag: tag.into(),
            message_id: String::new(),
            redelivered: false,
        }
    }

    fn rejected() -> Decision {
        Decision::Rejected {
            limit: 3,
            window_seconds: 60,
            retry_after: 42,
            notify_user: true,
        }
    }

    #[test]
    fn answers_until_the_key_can_allow_again_then_asks_redis() {
        let cache = RejectionCache::default();
        let t0 = Instant::now();
        assert!(cache.answer(&check("U1"), 1, t0).is_none());
        cache.learn(&check("U1"), &rejected(), 1, t0);
        match cache.answer(&check("U1"), 1, t0 + Duration::from_millis(500)) {
            Some(Decision::Rejected {
                retry_after,
                notify_user,
                limit,
                ..
            }) => {
                // 41 s - 0.5 s left, reported as the upper bound 42 s.
                assert_eq!((retry_after, notify_user, limit), (42, false, 3));
            }
            other => panic!("expected a cached rejection, got {other:?}"),
        }
        assert!(
            cache.answer(&check("U2"), 1, t0).is_none(),
            "U2 was not told yet"
        );
        assert!(
            cache
                .answer(&check("U1"), 1, t0 + Duration::from_secs(41))
                .is_none()
        );
    }

    #[test]
    fn a_redelivered_message_always_goes_to_redis() {
        let cache = RejectionCache::default();
        let t0 = Instant::now();
        cache.learn(&check(""), &rejected(), 1, t0);
        let again = Check {
            redelivered: true,
            ..check("")
        };
        assert!(cache.answer(&again, 1, t0).is_none());
        assert!(cache.answer(&check(""), 1, t0).is_some());
    }

    #[test]
    fn a_rules_change_forgets_everything() {
        let cache = RejectionCache::default();
        let t0 = Instant::now();
        cache.learn(&check(""), &rejected(), 1, t0);
        assert!(matches!(
            cache.answer(&check(""), 1, t0),
            Some(Decision::Rejected {
                notify_user: true,
                ..
            })
        ));
        assert!(cache.answer(&check(""), 2, t0).is_none());
        assert!(
            cache.answer(&check(""), 2, t0).is_none(),
            "and stays forgotten"
        );
    }

    #[test]
    fn allowed_decisions_are_not_cached() {
        let cache = RejectionCache::default();
        let t0 = Instant::now();
        let allowed = Decision::Allowed {
            limit: 3,
            remaining: 0,
            reset_after: 10,
        };
        cache.learn(&check(""), &allowed, 1, t0);
        assert!(cache.answer(&check(""), 1, t0).is_none());
    }
}
