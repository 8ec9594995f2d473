//! Rate limiting: which rule applies to a (tenant, channel), and the decision Redis makes.
//!
//! - `rules`: override resolution, most specific first.
//! - `redis`: the atomic scripts and the client that runs them.
//! - `store`: the way to Redis: one server, a cluster, or the primary Sentinel names.

pub mod cache;
pub mod live;
pub mod redis;
mod rules;
pub mod store;

use crate::config::Algorithm;

pub use self::cache::RejectionCache;
pub use self::live::LiveRules;
pub use self::redis::{CheckError, Checked, LimitError, Limiter};
pub use self::rules::{Rule, Rules};

/// The outcome of one check against a (tenant, channel) window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed {
        limit: u64,
        remaining: u64,
        /// Whole seconds until the window frees capacity.
        reset_after: u64,
    },
    Rejected {
        limit: u64,
        window_seconds: u64,
        /// Whole seconds (at least 1) until a message of this tenant and channel would be
        /// allowed again.
        retry_after: u64,
        /// False when this sender was already told during this window (`notify =
        /// "once_per_window"`), so the notifier stays quiet.
        notify_user: bool,
        /// Milliseconds until this message's turn in its deferring rule's line (Redis
        /// gives turns at the pace of the limit; 0 where there is none): it is parked
        /// until then instead of coming back with all the others.
        turn_ms: u64,
        /// The limit that rejected it (with several, the one with the longest wait);
        /// `limit`, `window_seconds` and `retry_after` are that limit's.
        scope: Scope,
    },
}

/// Which limit a rule is: the (tenant, channel) window, or one `[[limits.also]]` adds.
pub use crate::config::Scope;

/// One limit `[[limits.also]]` adds to a message's check: its scope, the key of its state
/// (`also_key`) and its rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Also {
    pub scope: Scope,
    pub key: String,
    pub rule: Rule,
    /// In a Redis Cluster, a tenant's budget is decided first in its own slot (the
    /// message's cost reserved there); the composing call then takes this answer as given.
    pub reserved: Option<Reserved>,
}

/// A tenant's budget's answer to a reservation (see [`Also::reserved`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reserved {
    pub ok: bool,
    pub remaining: u64,
    pub reset_ms: u64,
    pub wait_ms: u64,
}

/// One message to count: its key, its rule, and who is told when it is rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub key: String,
    pub rule: Rule,
    /// Identifies the sender for quiet rejections; empty to notify every rejection.
    pub notify_tag: String,
    /// The message id, so a redelivery is counted once; empty when there is none.
    pub message_id: String,
    /// The broker delivered this message before: its first decision may have been
    /// "allowed", so only Redis may answer it.
    pub redelivered: bool,
    /// `duplicates = "drop"`: the marker of a confirmed output of this message's id
    /// ([`done_key`]); empty otherwise.
    pub done_key: String,
    /// A parked message back before its turn (the longest step is shorter than its wait):
    /// milliseconds until then. It is parked again without asking Redis.
    pub wait_ms: u64,
    /// Units the message counts (`x-gate-cost`, 1 when absent) against every limit.
    pub cost: u64,
    /// The other limits it must pass too, all or none with `rule` (`[[limits.also]]`).
    pub also: Vec<Also>,
}

impl Check {
    /// Checked by the composing script (`composed.lua`): other limits apply, or the cost
    /// is not 1. A message of cost 1 under its (tenant, channel) limit alone keeps the
    /// algorithm's own script, with its line of turns.
    pub fn is_composed(&self) -> bool {
        self.cost != 1 || !self.also.is_empty()
    }

    /// The rule of limit `index` as the composing script numbers them (0: the (tenant,
    /// channel) one, then `also` in order), and its scope.
    pub fn limit_at(&self, index: usize) -> Option<(Scope, Rule)> {
        match index {
            0 => Some((Scope::Channel, self.rule)),
            i => self.also.get(i - 1).map(|a| (a.scope, a.rule)),
        }
    }
}

/// A decision and whether Redis replayed it: the message's id was already decided in this
/// window (a redelivery, counted once), so the decision is the first one again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub decision: Decision,
    pub replayed: bool,
    /// Replayed, and the output of the first decision was confirmed: downstream already
    /// has this message (or the user was already told).
    pub forwarded_before: bool,
    /// `duplicates = "drop"`: an output of this id was confirmed within the duplicate
    /// window; the message gets no second one.
    pub duplicate: bool,
}

impl Answer {
    pub fn fresh(decision: Decision) -> Self {
        Self {
            decision,
            replayed: false,
            forwarded_before: false,
            duplicate: false,
        }
    }
}

/// A short, stable tag for a sender, the same on every instance: the FNV-1a hash of
/// `sender.user_id` when it is a string or a number (other sender fields, such as a display
/// name, may change between one user's messages), else of the whole `sender` JSON.
pub fn sender_tag(sender_json: Option<&str>) -> String {
    let Some(json) = sender_json else {
        return "anyone".to_owned();
    };
    #[derive(serde::Deserialize)]
    struct Sender<'a> {
        #[serde(borrow)]
        user_id: Option<&'a serde_json::value::RawValue>,
    }
    // Numbers by their text, so that large ids are exact and 42 and "42" are one user.
    let user_id = serde_json::from_str::<Sender>(json)
        .ok()
        .and_then(|s| s.user_id)
        .and_then(|raw| {
            let text = raw.get();
            if text.starts_with('"') {
                serde_json::from_str::<String>(text).ok()
            } else if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
                Some(text.to_owned())
            } else {
                None
            }
        });
    // Kept apart, so a user id can never equal a whole sender's JSON.
    let (domain, identity) = match &user_id {
        Some(id) => (b"user_id:".as_slice(), id.as_bytes()),
        None => (b"sender:".as_slice(), json.as_bytes()),
    };
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in domain.iter().chain(identity) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

impl Decision {
    /// The fixed-window decision for a counter that reached `count` with `pttl_ms` left.
    pub fn fixed_window(rule: Rule, count: u64, pttl_ms: i64, notify_user: bool) -> Self {
        // A window always lasts at least a second from the client's point of view: a
        // reset of 0 would invite a retry that is still inside the window.
        let reset_after = (pttl_ms.max(1) as u64).div_ceil(1000);
        if count <= rule.requests {
            Decision::Allowed {
                limit: rule.requests,
                remaining: rule.requests - count,
                reset_after,
            }
        } else {
            Decision::Rejected {
                limit: rule.requests,
                window_seconds: rule.window_seconds,
                retry_after: reset_after,
                notify_user,
                turn_ms: 0,
                scope: Scope::Channel,
            }
        }
    }
}

impl Decision {
    /// The decision of a sliding-window or token-bucket script from its five values:
    /// allowed, remaining, the milliseconds until the window resets and until a message
    /// would be allowed, and whether to notify the sender.
    pub fn from_script(values: &[i64], rule: Rule) -> Self {
        let [allowed, remaining, reset_ms, retry_ms, notify] = [0, 1, 2, 3, 4].map(|i| values[i]);
        let seconds = |ms: i64| (ms.max(1) as u64).div_ceil(1000);
        if allowed == 1 {
            Decision::Allowed {
                limit: rule.requests,
                remaining: remaining.max(0) as u64,
                reset_after: seconds(reset_ms),
            }
        } else {
            Decision::Rejected {
                limit: rule.requests,
                window_seconds: rule.window_seconds,
                retry_after: seconds(retry_ms),
                notify_user: notify == 1,
                turn_ms: 0,
                scope: Scope::Channel,
            }
        }
    }
}

/// The counter's Redis key, by default exactly the Python router's.
pub fn counter_key(prefix: &str, tenant_id: &str, channel: &str) -> String {
    let mut key = String::with_capacity(
        prefix.len() + tenant_id.len() + channel.len() + ":ratelimit:".len() + 8,
    );
    key.push_str(prefix);
    key.push_str(tenant_id);
    key.push_str(":ratelimit:");
    key.push_str(channel);
    key
}

/// The key of `algorithm`'s state: the router's key for the fixed window; for the others a
/// key of their own (so switching algorithms never misreads another's state), tagged with
/// the whole counter key so that it shares the counter's Redis Cluster slot.
pub fn key_for(algorithm: Algorithm, prefix: &str, tenant_id: &str, channel: &str) -> String {
    let counter = counter_key(prefix, tenant_id, channel);
    match algorithm {
        Algorithm::FixedWindow => counter,
        Algorithm::SlidingWindow => format!("{{{counter}}}:sliding"),
        Algorithm::TokenBucket => format!("{{{counter}}}:bucket"),
    }
}

/// The key of a `[[limits.also]]` limit's state. A tenant's budget is
/// `{key_prefix}{tenant_id}:budget` (no channel key can take that name: a channel key has
/// `:ratelimit:` in it), a sender's is named after its (tenant, channel) counter and lives in
/// its cluster slot; each algorithm other than the fixed window keeps a key of its own.
pub fn also_key(
    scope: Scope,
    algorithm: Algorithm,
    prefix: &str,
    tenant_id: &str,
    channel: &str,
    sender: &str,
) -> String {
    let base = match scope {
        Scope::Channel => return key_for(algorithm, prefix, tenant_id, channel),
        Scope::Tenant => format!("{prefix}{tenant_id}:budget"),
        Scope::Sender => format!(
            "{{{}}}:sender:{sender}",
            counter_key(prefix, tenant_id, channel)
        ),
    };
    match (algorithm, scope) {
        (Algorithm::FixedWindow, _) => base,
        (Algorithm::SlidingWindow, Scope::Tenant) => format!("{{{base}}}:sliding"),
        (Algorithm::TokenBucket, Scope::Tenant) => format!("{{{base}}}:bucket"),
        (Algorithm::SlidingWindow, _) => format!("{base}:sliding"),
        (Algorithm::TokenBucket, _) => format!("{base}:bucket"),
    }
}

/// Where the composing script keeps its decisions by message id: one hash beside the
/// (tenant, channel) state, in its slot (field: the id).
pub fn composed_seen_key(base: &str) -> String {
    format!("{base}:all:seen")
}

/// What the companion keys of a state key (`key_for`) start with: `{counter}` for the fixed
/// window, the state key itself for the others. Every companion is named
/// `{counter}:…`, so a script's keys all live in one cluster slot.
pub fn companion_base(algorithm: Algorithm, state_key: &str) -> String {
    match algorithm {
        Algorithm::FixedWindow => format!("{{{state_key}}}"),
        Algorithm::SlidingWindow | Algorithm::TokenBucket => state_key.to_owned(),
    }
}

/// Where a decision is kept for a message id: a field `id` of the fixed window's hash
/// `{counter}:seen`, or the other algorithms' string `{counter}:<alg>:seen-at:<id>`.
pub fn seen_key(algorithm: Algorithm, base: &str, message_id: &str) -> String {
    match algorithm {
        Algorithm::FixedWindow => format!("{base}:seen"),
        // `seen-at`: decisions kept as moments (earlier versions kept waits under `seen`).
        Algorithm::SlidingWindow | Algorithm::TokenBucket => {
            format!("{base}:seen-at:{message_id}")
        }
    }
}

/// The marker that an output of message `id` was confirmed (`duplicates = "drop"`), one
/// per (tenant, channel) and id, in the counter's slot, whatever the algorithm.
pub fn done_key(prefix: &str, tenant_id: &str, channel: &str, id: &str) -> String {
    format!("{{{}}}:done:{id}", counter_key(prefix, tenant_id, channel))
}

/// The notification tag that asks a check script for a fresh over-limit message's turn in
/// its deferring rule's line instead (`take_turn` in `notice.lua`): a turn further than
/// `longest_ms` away is not given.
pub fn line_tag(longest_ms: u64) -> String {
    format!("~line:{longest_ms}")
}

/// The tag of a message back from the defer ladder at its turn: checked, not put behind
/// the line, and when over the limit again it takes a new turn (none further than
/// `longest_ms` away).
pub fn back_tag(longest_ms: u64) -> String {
    format!("~back:{longest_ms}")
}

/// True for [`line_tag`] and [`back_tag`].
pub fn is_line_tag(notify_tag: &str) -> bool {
    notify_tag.starts_with('~')
}

/// The hash of the senders told about a rejection (`notice.lua`; the tag is the field);
/// for a [`line_tag`], a deferring rule's line.
pub fn notified_key(base: &str, notify_tag: &str) -> String {
    if is_line_tag(notify_tag) {
        return format!("{base}:turn");
    }
    format!("{base}:notified")
}

/// Every key that holds a window of (tenant, channel) for some algorithm, besides the
/// decisions kept by message id: what an operator's reset deletes to start it afresh.
pub fn window_keys(prefix: &str, tenant_id: &str, channel: &str) -> Vec<String> {
    let mut keys = Vec::with_capacity(9);
    for algorithm in [
        Algorithm::FixedWindow,
        Algorithm::SlidingWindow,
        Algorithm::TokenBucket,
    ] {
        let state = key_for(algorithm, prefix, tenant_id, channel);
        let base = companion_base(algorithm, &state);
        keys.push(notified_key(&base, ""));
        keys.push(notified_key(&base, &line_tag(0)));
        keys.push(state);
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_is_its_user_id_when_it_has_one() {
        let tag = |s| sender_tag(Some(s));
        assert_eq!(
            tag(r#"{"user_id":"U1","name":"Ann"}"#),
            tag(r#"{"name":"Ann B.","avatar":"x","user_id":"U1"}"#),
            "a new display name is the same sender"
        );
        assert_ne!(tag(r#"{"user_id":"U1"}"#), tag(r#"{"user_id":"U2"}"#));
        assert_eq!(
            tag(r#"{"user_id":4917612345}"#),
            tag(r#"{"user_id":"4917612345"}"#)
        );
        assert_eq!(tag(r#"{"user_id":"U\u0031"}"#), tag(r#"{"user_id":"U1"}"#));
        // Without a usable user_id, the whole sender JSON identifies the sender.
        assert_ne!(tag(r#"{"name":"Ann"}"#), tag(r#"{"name":"Bob"}"#));
        assert_ne!(tag(r#"{"user_id":{"a":1}}"#), tag(r#"{"user_id":{"a":2}}"#));
        assert_ne!(tag(r#"["U1"]"#), tag(r#"["U2"]"#));
        assert_ne!(
            tag(r#"{"user_id":123456789012345678901234567890}"#),
            tag(r#"{"user_id":123456789012345678901234567891}"#),
            "large numeric ids stay exact"
        );
        assert_eq!(sender_tag(Some("")), sender_tag(Some("")));
        assert_eq!(sender_tag(None), "anyone");
    }

    const RULE: Rule = Rule {
        algorithm: Algorithm::FixedWindow,
        requests: 3,
        window_seconds: 60,
        burst: 3,
        shadow: false,
        defer: false,
    };

    #[test]
    fn other_algorithms_have_keys_of_their_own() {
        assert_eq!(
            key_for(Algorithm::FixedWindow, "", "a", "b"),
            "a:ratelimit:b"
        );
        assert_eq!(
            key_for(Algorithm::SlidingWindow, "p:", "a", "b"),
            "{p:a:ratelimit:b}:sliding"
        );
        assert_eq!(
            key_for(Algorithm::TokenBucket, "", "a", "b"),
            "{a:ratelimit:b}:bucket"
        );
    }

    #[test]
    fn every_key_of_a_check_lives_in_its_counters_cluster_slot() {
        use ::redis::cluster_routing::Slot;
        for algorithm in [
            Algorithm::FixedWindow,
            Algorithm::SlidingWindow,
            Algorithm::TokenBucket,
        ] {
            for (prefix, tenant, channel) in [("", "acme", "slack"), ("gate:", "a.b-c_9", "sms")] {
                let counter = counter_key(prefix, tenant, channel);
                let state = key_for(algorithm, prefix, tenant, channel);
                let base = companion_base(algorithm, &state);
                for key in [
                    state.clone(),
                    seen_key(algorithm, &base, "m-1"),
                    notified_key(&base, "0123abcd"),
                    notified_key(&base, &line_tag(0)),
                    done_key(prefix, tenant, channel, "m-1"),
                ] {
                    assert!(key.contains(&counter), "{key} is named after {counter}");
                    assert_eq!(Slot::for_key(&key), Slot::for_key(&counter), "{key}");
                }
            }
        }
        assert_eq!(counter_key("", "acme", "slack"), "acme:ratelimit:slack");
    }

    #[test]
    fn key_is_the_python_routers() {
        assert_eq!(counter_key("", "acme", "slack"), "acme:ratelimit:slack");
        assert_eq!(
            counter_key("t1:", "acme", "slack"),
            "t1:acme:ratelimit:slack"
        );
    }

    #[test]
    fn allowed_up_to_the_limit_then_rejected() {
        assert_eq!(
            Decision::fixed_window(RULE, 1, 60_000, true),
            Decision::Allowed {
                limit: 3,
                remaining: 2,
                reset_after: 60
            }
        );
        assert_eq!(
            Decision::fixed_window(RULE, 3, 59_001, true),
            Decision::Allowed {
                limit: 3,
                remaining: 0,
                reset_after: 60
            }
        );
        assert_eq!(
            Decision::fixed_window(RULE, 4, 41_500, false),
            Decision::Rejected {
                limit: 3,
                window_seconds: 60,
                retry_after: 42,
                notify_user: false,
                turn_ms: 0,
                scope: Scope::Channel,
            }
        );
    }

    #[test]
    fn retry_after_is_at_least_one_second() {
        for pttl in [-1, 0, 1, 999] {
            match Decision::fixed_window(RULE, 10, pttl, true) {
                Decision::Rejected { retry_after, .. } => assert_eq!(retry_after, 1),
                other => panic!("expected a rejection, got {other:?}"),
            }
        }
    }
}
