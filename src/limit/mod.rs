//! Rate limiting: which rule applies to a (tenant, channel), and the decision Redis makes.
//!
//! - `rules`: override resolution, most specific first.
//! - `redis`: the atomic scripts and the client that runs them.

mod redis;
mod rules;

pub use self::redis::{LimitError, Limiter};
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
    },
}

impl Decision {
    /// The fixed-window decision for a counter that reached `count` with `pttl_ms` left.
    pub fn fixed_window(rule: Rule, count: u64, pttl_ms: i64) -> Self {
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
            }
        }
    }
}

/// The counter's Redis key, by default exactly the Python router's.
pub fn counter_key(prefix: &str, tenant_id: &str, channel: &str) -> String {
    let mut key =
        String::with_capacity(prefix.len() + tenant_id.len() + channel.len() + ":ratelimit:".len());
    key.push_str(prefix);
    key.push_str(tenant_id);
    key.push_str(":ratelimit:");
    key.push_str(channel);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: Rule = Rule {
        requests: 3,
        window_seconds: 60,
    };

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
            Decision::fixed_window(RULE, 1, 60_000),
            Decision::Allowed {
                limit: 3,
                remaining: 2,
                reset_after: 60
            }
        );
        assert_eq!(
            Decision::fixed_window(RULE, 3, 59_001),
            Decision::Allowed {
                limit: 3,
                remaining: 0,
                reset_after: 60
            }
        );
        assert_eq!(
            Decision::fixed_window(RULE, 4, 41_500),
            Decision::Rejected {
                limit: 3,
                window_seconds: 60,
                retry_after: 42
            }
        );
    }

    #[test]
    fn retry_after_is_at_least_one_second() {
        for pttl in [-1, 0, 1, 999] {
            match Decision::fixed_window(RULE, 10, pttl) {
                Decision::Rejected { retry_after, .. } => assert_eq!(retry_after, 1),
                other => panic!("expected a rejection, got {other:?}"),
            }
        }
    }
}
