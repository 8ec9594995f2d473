//! `[limits]`: the global limit, its overrides, and what happens to a message over its
//! limit.

use serde::{Deserialize, Serialize};

use super::{
    MAX_DEFER_SECONDS, MAX_DUPLICATE_WINDOW_SECONDS, MAX_MESSAGE_BYTES, MAX_OVERRIDES_REFRESH_MS,
    MAX_REQUESTS, MAX_WINDOW_SECONDS,
};
use crate::message::{valid_channel, valid_tenant_id};

/// Checks the numbers one limit sets (the file's global limit, a file override, a Redis
/// override, the admin command line), so every source accepts exactly the same values.
/// `key` names where the values come from, e.g. `limits.overrides[2]`.
pub fn check_limit_numbers(
    key: &str,
    requests: Option<u64>,
    window_seconds: Option<u64>,
    burst: Option<u64>,
) -> Result<(), String> {
    for (field, value, max) in [
        ("requests", requests, MAX_REQUESTS),
        ("window_seconds", window_seconds, MAX_WINDOW_SECONDS),
        ("burst", burst, MAX_REQUESTS),
    ] {
        match value {
            Some(0) => return Err(format!("{key}.{field} must be at least 1")),
            Some(v) if v > max => {
                return Err(format!(
                    "{key}.{field} = {v} is out of range (at most {max})"
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub algorithm: Algorithm,
    pub requests: u64,
    pub window_seconds: u64,
    /// `token_bucket` only: messages allowed at once; `requests` when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
    /// Decide and report, but forward what would be rejected (header
    /// `x-ratelimit-shadow: rejected`): the safe way to roll out a new limit.
    pub shadow: bool,
    /// Which rejections ask the notifier to tell the user (`notify_user` in the body).
    pub notify: Notify,
    /// How often every instance reads the live overrides hash in Redis; 0 turns it off.
    pub redis_overrides_refresh_ms: u64,
    /// Count a message once: a redelivery (same message id) within the window gets the
    /// first decision back instead of using up another unit of the limit.
    pub count_once: bool,
    pub max_message_bytes: usize,
    /// What to do with a message whose check failed because Redis did not answer in time.
    pub on_redis_error: OnRedisError,
    /// What happens to a message over its limit.
    pub on_limit: OnLimit,
    /// With `on_limit = "defer"`: the longest a message may wait, from its first arrival,
    /// before it is rejected after all.
    pub max_defer_seconds: u64,
    /// What happens to a message whose id already had a confirmed output.
    pub duplicates: Duplicates,
    /// What becomes of a rejection whose `notify_user` is false (the sender was told).
    pub quiet_rejections: QuietRejections,
    /// With `duplicates = "drop"`: how long an id's confirmed output is remembered.
    pub duplicate_window_seconds: u64,
    /// Limits every message must pass besides its (tenant, channel) one, all or none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub also: Vec<AlsoLimit>,
    pub overrides: Vec<Override>,
}

/// Which limit a rule or an override is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// One (tenant, channel): the Python router's key.
    #[default]
    Channel,
    /// All channels of one tenant together.
    Tenant,
    /// One sender in one (tenant, channel), as for quiet rejections.
    Sender,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Channel => "channel",
            Scope::Tenant => "tenant",
            Scope::Sender => "sender",
        }
    }
}

/// `[[limits.also]]`: a limit every message must pass too.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlsoLimit {
    pub scope: Scope,
    pub requests: u64,
    pub window_seconds: u64,
    /// Defaults to `limits.algorithm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<Algorithm>,
    /// `token_bucket` only; `requests` when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QuietRejections {
    /// Published to the notification queue like every rejection.
    Publish,
    /// Acked without a notice (outcome `rejected_quiet`): the notifier would not reply.
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Duplicates {
    /// Forwarded again, marked `x-ratelimit-replayed: true`.
    Forward,
    /// Acked with no second output (outcome `duplicate`).
    Drop,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::FixedWindow,
            requests: 30,
            window_seconds: 60,
            burst: None,
            shadow: false,
            notify: Notify::OncePerWindow,
            redis_overrides_refresh_ms: 2000,
            count_once: true,
            max_message_bytes: 1024 * 1024,
            on_redis_error: OnRedisError::Allow,
            on_limit: OnLimit::Reject,
            max_defer_seconds: 3600,
            duplicates: Duplicates::Forward,
            quiet_rejections: QuietRejections::Publish,
            duplicate_window_seconds: 600,
            also: Vec::new(),
            overrides: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// The Python router's window: INCR + EXPIRE on its key; up to twice the limit can
    /// pass across a window boundary.
    FixedWindow,
    /// The rolling two-window weighted counter: no boundary burst, O(1) memory.
    SlidingWindow,
    /// GCRA: `requests` per window on average, up to `burst` at once.
    TokenBucket,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Notify {
    /// Every rejection carries `notify_user: true`.
    Every,
    /// Only the first rejection per (tenant, channel, sender) until the sender may write
    /// again carries `notify_user: true`; the rest carry `false`.
    OncePerWindow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnLimit {
    /// Publish a `rate_limited` notification.
    Reject,
    /// Park the message in the broker until its window can allow it.
    Defer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnRedisError {
    /// Forward unchecked, marked with `x-ratelimit-degraded: true`.
    Allow,
    /// Keep the message unacknowledged and retry until Redis answers.
    Hold,
}

/// A limit for one tenant, or for one (tenant, channel). Fields left out fall back to the
/// tenant-wide override, then to the global limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    pub tenant: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Which limit it changes: the (tenant, channel) one when left out, else the tenant's
    /// budget or the sender limit of `[[limits.also]]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<Algorithm>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_limit: Option<OnLimit>,
}

impl LimitsConfig {
    /// Checks `[limits]` alone (what a reload applies), naming the first bad key.
    pub fn validate(&self) -> Result<(), String> {
        let limits = self;
        let fail = |msg: String| Err(msg);
        check_limit_numbers(
            "limits",
            Some(limits.requests),
            Some(limits.window_seconds),
            limits.burst,
        )?;
        if !(1..=MAX_MESSAGE_BYTES).contains(&limits.max_message_bytes) {
            return fail(format!(
                "limits.max_message_bytes = {} is out of range (1 to {MAX_MESSAGE_BYTES})",
                limits.max_message_bytes
            ));
        }
        if !(1..=MAX_DEFER_SECONDS).contains(&limits.max_defer_seconds) {
            return fail(format!(
                "limits.max_defer_seconds = {} is out of range (1 to {MAX_DEFER_SECONDS})",
                limits.max_defer_seconds
            ));
        }
        if !(1..=MAX_DUPLICATE_WINDOW_SECONDS).contains(&limits.duplicate_window_seconds) {
            return fail(format!(
                "limits.duplicate_window_seconds = {} is out of range (1 to {MAX_DUPLICATE_WINDOW_SECONDS})",
                limits.duplicate_window_seconds
            ));
        }
        if limits.redis_overrides_refresh_ms > MAX_OVERRIDES_REFRESH_MS {
            return fail(format!(
                "limits.redis_overrides_refresh_ms = {} is out of range (at most {MAX_OVERRIDES_REFRESH_MS})",
                limits.redis_overrides_refresh_ms
            ));
        }
        for (i, also) in limits.also.iter().enumerate() {
            let key = format!("limits.also[{i}]");
            if also.scope == Scope::Channel {
                return fail(format!(
                    "{key}.scope = \"channel\" is the limit [limits] itself sets; use \"tenant\" or \"sender\""
                ));
            }
            check_limit_numbers(
                &key,
                Some(also.requests),
                Some(also.window_seconds),
                also.burst,
            )?;
            if limits.also[..i].iter().any(|a| a.scope == also.scope) {
                return fail(format!(
                    "{key} repeats scope \"{}\": one limit per scope",
                    also.scope.as_str()
                ));
            }
        }
        for (i, o) in limits.overrides.iter().enumerate() {
            let key = format!("limits.overrides[{i}]");
            check_override_scope(&key, o, &limits.also)?;
            if !valid_tenant_id(&o.tenant) {
                return fail(format!(
                    "{key}.tenant {:?} is not a valid tenant_id (1-128 of A-Z a-z 0-9 . _ -, first alphanumeric)",
                    o.tenant
                ));
            }
            if let Some(channel) = &o.channel
                && !valid_channel(channel)
            {
                return fail(format!(
                    "{key}.channel {channel:?} is not a valid channel (1-32 of a-z 0-9 _ -)"
                ));
            }
            check_limit_numbers(&key, o.requests, o.window_seconds, o.burst)?;
            let duplicate = limits.overrides[..i].iter().any(|p| {
                p.tenant == o.tenant
                    && p.channel == o.channel
                    && p.scope.unwrap_or_default() == o.scope.unwrap_or_default()
            });
            if duplicate {
                return fail(format!(
                    "{key} repeats an earlier override for the same tenant, channel and scope"
                ));
            }
        }
        Ok(())
    }
}

/// What an override of a `[[limits.also]]` scope may say: a tenant's budget has no channel,
/// neither takes `shadow` or `on_limit` (those are the message's, from its (tenant,
/// channel) rule), and a scope `[[limits.also]]` leaves out needs its whole limit.
pub fn check_override_scope(key: &str, o: &Override, also: &[AlsoLimit]) -> Result<(), String> {
    let scope = o.scope.unwrap_or_default();
    if scope == Scope::Channel {
        return Ok(());
    }
    if scope == Scope::Tenant && o.channel.is_some() {
        return Err(format!(
            "{key} sets scope \"tenant\" for a channel; a tenant's budget covers all its channels"
        ));
    }
    if o.shadow.is_some() || o.on_limit.is_some() {
        return Err(format!(
            "{key}: shadow and on_limit belong to the (tenant, channel) limit, not to scope \"{}\"",
            scope.as_str()
        ));
    }
    let configured = also.iter().any(|a| a.scope == scope);
    if !configured && (o.requests.is_none() || o.window_seconds.is_none()) {
        return Err(format!(
            "{key} overrides scope \"{}\", which [[limits.also]] does not set: give both requests and window_seconds",
            scope.as_str()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_numbers_are_refused_by_field_and_bound() {
        assert_eq!(
            check_limit_numbers("limits.overrides[2]", Some(0), None, None),
            Err("limits.overrides[2].requests must be at least 1".to_owned())
        );
        let too_long = MAX_WINDOW_SECONDS + 1;
        assert_eq!(
            check_limit_numbers("limits", None, Some(too_long), None),
            Err(format!(
                "limits.window_seconds = {too_long} is out of range (at most {MAX_WINDOW_SECONDS})"
            ))
        );
        assert_eq!(
            check_limit_numbers("limits", Some(MAX_REQUESTS), Some(1), Some(MAX_REQUESTS)),
            Ok(())
        );
    }
}
