//! Fewer Redis calls under a flood: once a key is over its limit, the answer stays
//! "rejected" until the earliest moment the key could allow again, so an instance can give
//! it from memory until then.
//!
//! An entry only answers what Redis would answer: it is learnt only from fresh decisions
//! (a replayed one carries the wait of its first decision, long past), dropped when the
//! rules change (a reload or an override), it answers only for senders Redis has already
//! marked as told (so `notify_user` is the same), and redelivered messages always go to
//! Redis (their first decision may have been "allowed").
//!
//! Memory is bounded: expired entries are swept as new ones come, a full cache evicts the
//! entry that expires first, and each entry remembers a bounded number of told senders
//! (the others are simply asked of Redis).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Answer, Check, Decision, Scope, is_line_tag};

/// Keys remembered at most (about 30 MiB, see the memory test); beyond this the entry that
/// expires first is evicted.
pub const MAX_ENTRIES: usize = 100_000;
/// Told senders remembered per key.
pub const MAX_TOLD: usize = 16;

#[derive(Default)]
pub struct RejectionCache {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The rules generation the entries were decided under.
    generation: u64,
    entries: HashMap<Arc<str>, Entry>,
    /// The same keys by expiry, for sweeping and eviction; the number breaks ties.
    by_expiry: BTreeMap<(Instant, u64), Arc<str>>,
    next_seq: u64,
}

struct Entry {
    /// When the key could allow a message again.
    until: Instant,
    seq: u64,
    limit: u64,
    window_seconds: u64,
    /// Which limit the key is (a tenant's budget is shared by all its channels).
    scope: Scope,
    /// Senders Redis has already marked as told in this window, by [`told_id`].
    told: HashSet<u64>,
}

impl Inner {
    fn forget_all_unless(&mut self, generation: u64) {
        if self.generation != generation {
            self.entries.clear();
            self.by_expiry.clear();
            self.generation = generation;
        }
    }

    fn remove(&mut self, key: &str) {
        if let Some(entry) = self.entries.remove(key) {
            self.by_expiry.remove(&(entry.until, entry.seq));
        }
    }

    /// Drops every entry that expired by `now`, oldest first.
    fn sweep(&mut self, now: Instant) {
        while let Some(first) = self.by_expiry.first_entry() {
            if first.key().0 > now {
                break;
            }
            let key = first.remove();
            self.entries.remove(&key);
        }
    }
}

/// A sender's notification tag as a number: the tag is already a 64-bit hash in hex, so
/// this is that hash (eight bytes instead of a string).
fn sender_id(tag: &str) -> u64 {
    u64::from_str_radix(tag, 16).unwrap_or_else(|_| {
        tag.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    })
}

/// A sender told about a (tenant, channel)'s rejections: senders are told per (tenant,
/// channel), whichever limit rejected.
fn told_id(check: &Check) -> u64 {
    check
        .key
        .bytes()
        .fold(sender_id(&check.notify_tag), |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

/// The key of `check`'s limit of `scope`.
fn key_of(check: &Check, scope: Scope) -> Option<&str> {
    match scope {
        Scope::Channel => Some(check.key.as_str()),
        _ => check
            .also
            .iter()
            .find(|a| a.scope == scope)
            .map(|a| a.key.as_str()),
    }
}

impl RejectionCache {
    /// The answer for `check` without Redis, when the cache has one: some limit of the
    /// message has no unit left (with several, the one that frees last answers).
    pub fn answer(&self, check: &Check, generation: u64, now: Instant) -> Option<Decision> {
        // A redelivery may have been allowed the first time; with `duplicates = "drop"`,
        // only Redis knows whether the id had its output already; a deferring rule's place
        // in line is kept in Redis; a cost of 0 always passes.
        if check.redelivered
            || !check.done_key.is_empty()
            || is_line_tag(&check.notify_tag)
            || check.cost == 0
        {
            return None;
        }
        let mut inner = self.inner.lock().expect("never poisoned");
        inner.forget_all_unless(generation);
        let keys =
            std::iter::once(check.key.as_str()).chain(check.also.iter().map(|a| a.key.as_str()));
        let mut found: Option<(&str, Instant)> = None;
        for key in keys {
            let Some(until) = inner.entries.get(key).map(|e| e.until) else {
                continue;
            };
            if now >= until {
                inner.remove(key);
            } else if found.is_none_or(|(_, later)| until > later) {
                found = Some((key, until));
            }
        }
        let entry = inner.entries.get(found?.0)?;
        let once_per_window = !check.notify_tag.is_empty();
        if once_per_window && !entry.told.contains(&told_id(check)) {
            return None;
        }
        // Redis reported whole seconds, so the true wait is at most a second longer than
        // what is left here: answer with that upper bound, never an early retry.
        let left = entry.until - now;
        Some(Decision::Rejected {
            limit: entry.limit,
            window_seconds: entry.window_seconds,
            retry_after: (left.as_millis().div_ceil(1000) as u64).saturating_add(1),
            notify_user: !once_per_window,
            turn_ms: 0,
            scope: entry.scope,
        })
    }

    /// Learns from an answer Redis gave for `check` at `decided_at`.
    pub fn learn(&self, check: &Check, answer: &Answer, generation: u64, decided_at: Instant) {
        let Decision::Rejected {
            limit,
            window_seconds,
            retry_after,
            scope,
            ..
        } = answer.decision
        else {
            return;
        };
        // A line's answer is this message's turn, not the key's. A rejection of a cost
        // above 1 says nothing of a smaller one.
        if is_line_tag(&check.notify_tag) || check.cost != 1 {
            return;
        }
        let Some(limit_key) = key_of(check, scope) else {
            return;
        };
        // `retry_after` is rounded up to whole seconds: the key surely cannot allow before
        // one second less than that. Nothing to remember below that, nor from a replayed
        // decision, whose wait was measured when it was first made.
        if retry_after <= 1 || answer.replayed {
            return;
        }
        let Some(until) = decided_at.checked_add(Duration::from_secs(retry_after - 1)) else {
            return;
        };
        let mut inner = self.inner.lock().expect("never poisoned");
        inner.forget_all_unless(generation);
        inner.sweep(decided_at);
        let seq = inner.next_seq;
        inner.next_seq += 1;
        let key: Arc<str> = match inner.entries.get_key_value(limit_key) {
            Some((key, entry)) => {
                let (key, old) = (key.clone(), (entry.until, entry.seq));
                inner.by_expiry.remove(&old);
                key
            }
            None => {
                if inner.entries.len() >= MAX_ENTRIES
                    && let Some((_, evicted)) = inner.by_expiry.pop_first()
                {
                    inner.entries.remove(&evicted);
                }
                Arc::from(limit_key)
            }
        };
        inner.by_expiry.insert((until, seq), key.clone());
        let entry = inner.entries.entry(key).or_insert(Entry {
            until,
            seq,
            limit,
            window_seconds,
            scope,
            told: HashSet::new(),
        });
        (entry.until, entry.seq) = (until, seq);
        (entry.limit, entry.window_seconds, entry.scope) = (limit, window_seconds, scope);
        // Several limits may have told a sender for different lengths of time: a composed
        // check's sender counts as told here only when this answer told them.
        let told = !check.is_composed()
            || matches!(
                answer.decision,
                Decision::Rejected {
                    notify_user: true,
                    ..
                }
            );
        if !check.notify_tag.is_empty() && told && entry.told.len() < MAX_TOLD {
            entry.told.insert(told_id(check));
        }
    }

    /// Keys remembered now.
    pub fn len(&self) -> usize {
        self.inner.lock().expect("never poisoned").entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
                defer: false,
            },
            notify_tag: tag.into(),
            message_id: String::new(),
            redelivered: false,
            done_key: String::new(),
            wait_ms: 0,
            cost: 1,
            also: Vec::new(),
        }
    }

    fn fresh(decision: Decision) -> Answer {
        Answer::fresh(decision)
    }

    fn rejected() -> Decision {
        Decision::Rejected {
            limit: 3,
            window_seconds: 60,
            retry_after: 42,
            notify_user: true,
            turn_ms: 0,
            scope: Scope::Channel,
        }
    }

    #[test]
    fn answers_until_the_key_can_allow_again_then_asks_redis() {
        let cache = RejectionCache::default();
        let t0 = Instant::now();
        assert!(cache.answer(&check("U1"), 1, t0).is_none());
        cache.learn(&check("U1"), &fresh(rejected()), 1, t0);
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
        cache.learn(&check(""), &fresh(rejected()), 1, t0);
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
        cache.learn(&check(""), &fresh(rejected()), 1, t0);
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
        cache.learn(&check(""), &fresh(allowed), 1, t0);
        assert!(cache.answer(&check(""), 1, t0).is_none());
    }

    #[test]
    fn a_replayed_rejection_teaches_nothing() {
        let cache = RejectionCache::default();
        let t0 = Instant::now();
        let replayed = Answer {
            replayed: true,
            ..Answer::fresh(rejected())
        };
        cache.learn(&check(""), &replayed, 1, t0);
        assert!(cache.answer(&check(""), 1, t0).is_none());
    }

    #[test]
    fn expired_entries_are_swept_and_a_full_cache_evicts_the_soonest_to_expire() {
        let cache = RejectionCache::default();
        let t0 = Instant::now();
        let keyed = |key: String| Check { key, ..check("") };
        let short = Decision::Rejected {
            limit: 3,
            window_seconds: 60,
            retry_after: 2,
            notify_user: true,
            turn_ms: 0,
            scope: Scope::Channel,
        };
        cache.learn(&keyed("short".into()), &fresh(short), 1, t0);
        // Learning after the short entry expired sweeps it.
        cache.learn(
            &keyed("long".into()),
            &fresh(rejected()),
            1,
            t0 + Duration::from_secs(5),
        );
        assert_eq!(cache.len(), 1);

        for i in 0..MAX_ENTRIES + 10 {
            cache.learn(&keyed(format!("k{i}")), &fresh(rejected()), 1, t0);
        }
        assert_eq!(cache.len(), MAX_ENTRIES, "bounded, and still learning");
        let newest = keyed(format!("k{}", MAX_ENTRIES + 9));
        assert!(
            cache.answer(&newest, 1, t0).is_some(),
            "the newest key was added"
        );
        assert!(
            cache.answer(&keyed("k0".into()), 1, t0).is_none(),
            "k0 expired first, evicted"
        );
    }

    #[test]
    fn told_senders_are_bounded_per_key() {
        let cache = RejectionCache::default();
        let t0 = Instant::now();
        for i in 0..MAX_TOLD + 5 {
            cache.learn(&check(&format!("U{i}")), &fresh(rejected()), 1, t0);
        }
        assert!(cache.answer(&check("U0"), 1, t0).is_some());
        let late = format!("U{}", MAX_TOLD + 1);
        assert!(
            cache.answer(&check(&late), 1, t0).is_none(),
            "a sender beyond the bound is asked of Redis"
        );
    }
}
