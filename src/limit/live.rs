//! Limits that change while the gate runs: the file's `[limits]` (reloaded on SIGHUP or
//! when the file changes) plus overrides an admin tool writes to a Redis hash (read every
//! few seconds by every instance). Readers take a snapshot per batch; a change swaps in a
//! whole new set of rules, so a batch never sees half of one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use super::Rules;
use crate::config::{
    Algorithm, AlsoLimit, LimitsConfig, OnLimit, Override, Scope, check_limit_numbers,
    check_override_scope,
};
use crate::message::{valid_channel, valid_tenant_id};

/// The Redis hash of live overrides, under the configured key prefix.
pub const OVERRIDES_KEY: &str = "konstruct-gate:overrides";

/// The Redis channel (under the key prefix) `limits reset` publishes the reset counter
/// key on, so that every gate forgets its cached rejections at once.
pub const RESETS_CHANNEL: &str = "konstruct-gate:resets";

pub struct LiveRules {
    current: ArcSwap<Rules>,
    sources: Mutex<Sources>,
}

struct Sources {
    file: LimitsConfig,
    redis: Vec<Override>,
}

impl LiveRules {
    pub fn new(limits: &LimitsConfig) -> Self {
        Self {
            current: ArcSwap::from_pointee(Rules::from_config(limits)),
            sources: Mutex::new(Sources {
                file: limits.clone(),
                redis: Vec::new(),
            }),
        }
    }

    pub fn snapshot(&self) -> Arc<Rules> {
        self.current.load_full()
    }

    /// The file's `[[limits.also]]`, which overrides of those scopes start from.
    pub fn file_also(&self) -> Vec<AlsoLimit> {
        self.sources
            .lock()
            .expect("never poisoned")
            .file
            .also
            .clone()
    }

    /// The overrides read from Redis last, in force now.
    pub fn redis_overrides(&self) -> Vec<Override> {
        self.sources.lock().expect("never poisoned").redis.clone()
    }

    /// New limits from the configuration file.
    pub fn set_file_limits(&self, limits: LimitsConfig) {
        let mut sources = self.sources.lock().expect("never poisoned");
        sources.file = limits;
        self.rebuild(&sources);
    }

    /// Makes every cache of decisions forget (an operator reset a window).
    pub fn forget_cached(&self) {
        let sources = self.sources.lock().expect("never poisoned");
        self.rebuild(&sources);
    }

    /// New overrides from Redis; returns whether anything changed.
    pub fn set_redis_overrides(&self, overrides: Vec<Override>) -> bool {
        let mut sources = self.sources.lock().expect("never poisoned");
        if sources.redis == overrides {
            return false;
        }
        sources.redis = overrides;
        self.rebuild(&sources);
        true
    }

    fn rebuild(&self, sources: &Sources) {
        // Redis overrides win over the file's for the same (tenant, channel).
        let mut limits = sources.file.clone();
        limits.overrides.retain(|o| {
            !sources
                .redis
                .iter()
                .any(|r| r.tenant == o.tenant && r.channel == o.channel && r.scope == o.scope)
        });
        limits.overrides.extend(sources.redis.iter().cloned());
        let mut rules = Rules::from_config(&limits);
        rules.generation = self.current.load().generation + 1;
        self.current.store(Arc::new(rules));
    }
}

/// One hash value: the fields an override may set.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisOverride {
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

/// The hash field of an override: `tenant` or `tenant:channel`, and `@tenant` or
/// `@sender` after it for an override of that `[[limits.also]]` scope.
pub fn override_field(tenant: &str, channel: Option<&str>, scope: Option<Scope>) -> String {
    let mut field = tenant.to_owned();
    if let Some(channel) = channel {
        field.push(':');
        field.push_str(channel);
    }
    if let Some(scope) = scope.filter(|s| *s != Scope::Channel) {
        field.push('@');
        field.push_str(scope.as_str());
    }
    field
}

/// The tenant, channel and scope a hash field names ([`override_field`]), if it is one.
pub fn parse_field(field: &str) -> Option<(String, Option<String>, Option<Scope>)> {
    let (target, scope) = match field.split_once('@') {
        Some((target, "tenant")) => (target, Some(Scope::Tenant)),
        Some((target, "sender")) => (target, Some(Scope::Sender)),
        Some(_) => return None,
        None => (field, None),
    };
    let (tenant, channel) = match target.split_once(':') {
        Some((t, c)) => (t, Some(c)),
        None => (target, None),
    };
    if !valid_tenant_id(tenant) || channel.is_some_and(|c| !valid_channel(c)) {
        return None;
    }
    Some((tenant.to_owned(), channel.map(str::to_owned), scope))
}

/// Fields of the hash that are markers of the gate's own, not overrides: `~reset:…`,
/// written by `konstruct-gate limits reset`, tells every gate to forget what it cached.
pub const MARKER_PREFIX: char = '~';

/// Reads the hash's entries (field `tenant` or `tenant:channel`, value a JSON object),
/// sorted so that equal contents compare equal. Invalid entries are returned as errors,
/// one sentence each, and skipped: the rule in force for that field (from `previous`, the
/// overrides applied until now) stays.
pub fn parse_overrides(
    entries: HashMap<String, String>,
    previous: &[Override],
    also: &[AlsoLimit],
) -> (Vec<Override>, Vec<String>) {
    let mut overrides = Vec::new();
    let mut errors = Vec::new();
    let mut entries: Vec<_> = entries.into_iter().collect();
    entries.sort();
    for (field, value) in entries {
        if field.starts_with(MARKER_PREFIX) {
            continue;
        }
        let Some((tenant, channel, scope)) = parse_field(&field) else {
            errors.push(format!(
                "override field {field:?} is not `tenant` or `tenant:channel`, with `@tenant` or `@sender` for those scopes"
            ));
            continue;
        };
        let keep_previous = |overrides: &mut Vec<Override>| {
            if let Some(p) = previous
                .iter()
                .find(|p| p.tenant == tenant && p.channel == channel && p.scope == scope)
            {
                overrides.push(p.clone());
            }
        };
        let parsed: RedisOverride = match serde_json::from_str(&value) {
            Ok(parsed) => parsed,
            Err(e) => {
                errors.push(format!("override {field:?} is not valid: {e}"));
                keep_previous(&mut overrides);
                continue;
            }
        };
        let key = format!("override {field:?}");
        let checked =
            check_limit_numbers(&key, parsed.requests, parsed.window_seconds, parsed.burst);
        if let Err(e) = checked {
            errors.push(e);
            keep_previous(&mut overrides);
            continue;
        }
        let candidate = Override {
            tenant: tenant.clone(),
            channel: channel.clone(),
            scope,
            requests: parsed.requests,
            window_seconds: parsed.window_seconds,
            algorithm: parsed.algorithm,
            burst: parsed.burst,
            shadow: parsed.shadow,
            on_limit: parsed.on_limit,
        };
        if let Err(e) = check_override_scope(&key, &candidate, also) {
            errors.push(e);
            keep_previous(&mut overrides);
            continue;
        }
        overrides.push(candidate);
    }
    (overrides, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_overrides_parse_and_win_over_the_file() {
        let file = LimitsConfig {
            requests: 30,
            overrides: vec![Override {
                tenant: "acme".into(),
                requests: Some(100),
                ..Override::default()
            }],
            ..LimitsConfig::default()
        };
        let live = LiveRules::new(&file);
        assert_eq!(live.snapshot().rule_for("acme", "slack").requests, 100);

        let entries = HashMap::from([
            ("acme".to_owned(), r#"{"requests": 7}"#.to_owned()),
            (
                "acme:whatsapp".to_owned(),
                r#"{"algorithm": "token_bucket", "burst": 3}"#.to_owned(),
            ),
            ("bad tenant".to_owned(), "{}".to_owned()),
            ("globex".to_owned(), r#"{"requests": 0}"#.to_owned()),
            ("initech".to_owned(), r#"{"limit": 5}"#.to_owned()),
        ]);
        let (overrides, errors) = parse_overrides(entries, &[], &[]);
        assert_eq!(overrides.len(), 2);
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(live.set_redis_overrides(overrides.clone()));
        assert!(!live.set_redis_overrides(overrides), "unchanged");
        let rules = live.snapshot();
        assert_eq!(rules.rule_for("acme", "slack").requests, 7);
        let wa = rules.rule_for("acme", "whatsapp");
        assert_eq!(
            (wa.algorithm, wa.requests, wa.burst),
            (Algorithm::TokenBucket, 7, 3)
        );

        // Removing the Redis entry brings the file's override back.
        assert!(live.set_redis_overrides(Vec::new()));
        assert_eq!(live.snapshot().rule_for("acme", "slack").requests, 100);
        live.set_file_limits(LimitsConfig {
            requests: 5,
            ..LimitsConfig::default()
        });
        assert_eq!(live.snapshot().rule_for("acme", "slack").requests, 5);
    }

    #[test]
    fn an_out_of_range_redis_override_is_skipped_and_the_previous_rule_stays() {
        let (first, errors) = parse_overrides(
            HashMap::from([("acme".to_owned(), r#"{"requests": 7}"#.to_owned())]),
            &[],
            &[],
        );
        assert!(errors.is_empty());
        let huge = HashMap::from([
            ("acme".to_owned(), r#"{"requests": 1e17}"#.to_owned()),
            (
                "globex".to_owned(),
                r#"{"requests": 100000000000000000}"#.to_owned(),
            ),
            (
                "initech".to_owned(),
                r#"{"window_seconds": 40000000}"#.to_owned(),
            ),
        ]);
        let (overrides, errors) = parse_overrides(huge, &first, &[]);
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(
            errors[1].contains("requests") && errors[1].contains("globex"),
            "{errors:?}"
        );
        assert!(errors[2].contains("window_seconds"), "{errors:?}");
        assert_eq!(
            overrides, first,
            "acme keeps its 7; the others stay without an override"
        );
    }
}
