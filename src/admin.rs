//! `konstruct-gate limits …`: what operators do with limits, against the same Redis and
//! key prefix as the running gates (same configuration file and environment).
//!
//! Overrides written here go to the Redis hash every gate reads each
//! `limits.redis_overrides_refresh_ms`, validated by the very code the gates and the
//! configuration file use. `usage` only reads. `reset` deletes a window's keys and bumps a
//! counter in the hash (`~resets`) that tells every gate to forget its cached rejections.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;

use crate::config::{Algorithm, Config, LimitsConfig, OnLimit, Override, Scope};
use crate::limit::live::{
    MARKER_PREFIX, OVERRIDES_KEY, RESETS_CHANNEL, RedisOverride, override_field, parse_overrides,
};
use crate::limit::store::Store;
use crate::limit::{Rules, also_key, counter_key, key_for, window_keys};
use crate::message::{valid_channel, valid_tenant_id};

const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// A bad argument or value: nothing was written.
    #[error("{0}")]
    Invalid(String),
    #[error("Redis cannot be reached: {0}")]
    Redis(String),
}

impl AdminError {
    /// 2 for an invalid argument or value, 1 when Redis cannot be reached.
    pub fn exit_code(&self) -> u8 {
        match self {
            AdminError::Invalid(_) => 2,
            AdminError::Redis(_) => 1,
        }
    }
}

/// `TENANT` or `TENANT:CHANNEL`, with `@tenant` or `@sender` after it for the limit of
/// that `[[limits.also]]` scope (`acme@tenant`: acme's budget over all its channels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub tenant: String,
    pub channel: Option<String>,
    /// `None`: the (tenant, channel) limit.
    pub scope: Option<Scope>,
}

impl Target {
    pub fn parse(text: &str, channel_required: bool) -> Result<Self, AdminError> {
        let (text, scope) = match text.split_once('@') {
            Some((target, "tenant")) => (target, Some(Scope::Tenant)),
            Some((target, "sender")) => (target, Some(Scope::Sender)),
            Some((_, other)) => {
                return Err(AdminError::Invalid(format!(
                    "@{other} is not a scope: give @tenant or @sender"
                )));
            }
            None => (text, None),
        };
        if scope == Some(Scope::Tenant) && text.contains(':') {
            return Err(AdminError::Invalid(format!(
                "{text:?}@tenant names a channel; a tenant's budget covers all its channels: give TENANT@tenant"
            )));
        }
        let channel_required = channel_required && scope != Some(Scope::Tenant);
        let (tenant, channel) = match text.split_once(':') {
            Some((t, c)) => (t, Some(c)),
            None => (text, None),
        };
        if !valid_tenant_id(tenant) {
            return Err(AdminError::Invalid(format!(
                "{tenant:?} is not a valid tenant_id (1-128 of A-Z a-z 0-9 . _ -, first alphanumeric)"
            )));
        }
        if let Some(c) = channel
            && !valid_channel(c)
        {
            return Err(AdminError::Invalid(format!(
                "{c:?} is not a valid channel (1-32 of a-z 0-9 _ -)"
            )));
        }
        if channel_required && channel.is_none() {
            return Err(AdminError::Invalid(format!(
                "{text:?} names no channel: give TENANT:CHANNEL"
            )));
        }
        Ok(Self {
            tenant: tenant.to_owned(),
            channel: channel.map(str::to_owned),
            scope,
        })
    }

    /// The target of an override.
    pub fn of(o: &Override) -> Self {
        Self {
            tenant: o.tenant.clone(),
            channel: o.channel.clone(),
            scope: o.scope.filter(|s| *s != Scope::Channel),
        }
    }

    /// The field of the overrides hash.
    pub fn field(&self) -> String {
        override_field(&self.tenant, self.channel.as_deref(), self.scope)
    }

    fn names(&self, o: &Override) -> bool {
        o.tenant == self.tenant
            && o.channel == self.channel
            && o.scope.filter(|s| *s != Scope::Channel) == self.scope
    }
}

/// One override and where it comes from.
#[derive(Debug, Serialize)]
pub struct Listed {
    pub target: String,
    /// `file` or `redis`; a Redis entry replaces the file's for the same target.
    pub source: &'static str,
    #[serde(flatten)]
    pub values: RedisOverride,
    /// For a Redis entry the gates skip: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invalid: Option<String>,
}

/// A field of the rule in force and where its value comes from.
#[derive(Debug, Serialize, PartialEq)]
pub struct Sourced<T> {
    pub value: T,
    /// `global`, `file acme`, `redis acme:slack`, … or `requests` (a burst that follows
    /// `requests`).
    pub source: String,
}

#[derive(Debug, Serialize)]
pub struct Resolved {
    pub target: String,
    pub requests: Sourced<u64>,
    pub window_seconds: Sourced<u64>,
    pub algorithm: Sourced<Algorithm>,
    pub burst: Sourced<u64>,
    pub shadow: Sourced<bool>,
    pub on_limit: Sourced<OnLimit>,
}

#[derive(Debug, Serialize)]
pub struct Usage {
    pub target: String,
    pub algorithm: Algorithm,
    pub limit: u64,
    pub remaining: u64,
    /// Seconds until the window frees capacity again (0: nothing is used).
    pub reset_seconds: u64,
}

/// A connection to the gates' Redis, with their configuration.
pub struct Admin {
    config: Config,
    store: Store,
    hash: String,
}

impl Admin {
    /// Checks what a command would write against the configuration, before Redis is asked
    /// anything: gates that never read the overrides hash would never apply it.
    pub fn check_writable(config: &Config) -> Result<(), AdminError> {
        if config.limits.redis_overrides_refresh_ms == 0 {
            return Err(AdminError::Invalid(
                "limits.redis_overrides_refresh_ms is 0: the gates never read the overrides hash, so nothing written here would apply".into(),
            ));
        }
        Ok(())
    }

    /// Checks the values of `change` alone, as the configuration file would, before
    /// connecting (an invalid value is exit 2 even when Redis is down).
    pub fn check_change(
        config: &Config,
        target: &Target,
        change: &RedisOverride,
    ) -> Result<(), AdminError> {
        if *change == RedisOverride::default() {
            return Err(AdminError::Invalid(
                "nothing to set: give at least one of --requests, --window-seconds, --algorithm, --burst, --shadow, --on-limit".into(),
            ));
        }
        let json = serde_json::to_string(change).expect("an override serializes");
        let (_, errors) = parse_overrides(
            HashMap::from([(target.field(), json)]),
            &[],
            &config.limits.also,
        );
        match errors.into_iter().next() {
            Some(error) => Err(AdminError::Invalid(error)),
            None => Ok(()),
        }
    }

    pub async fn connect(config: Config) -> Result<Self, AdminError> {
        let store = Store::new(&config.redis).map_err(|e| AdminError::Invalid(e.to_string()))?;
        let hash = format!("{}{OVERRIDES_KEY}", config.redis.key_prefix);
        let mut admin = Self {
            config,
            store,
            hash,
        };
        // PING where the overrides live: in a cluster, a PING without a key would need
        // every primary to answer.
        let hash = admin.hash.clone();
        let _: String = admin.query_at(&hash, redis::cmd("PING")).await?;
        Ok(admin)
    }

    async fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> Result<T, AdminError> {
        let call = async {
            let mut conn = self.store.conn().await?;
            cmd.query_async(&mut conn).await
        };
        self.answer(call).await
    }

    /// `cmd` on the primary that owns `key`'s slot: SCAN in a cluster sees one node only.
    async fn query_at<T: redis::FromRedisValue>(
        &mut self,
        key: &str,
        cmd: redis::Cmd,
    ) -> Result<T, AdminError> {
        let call = async {
            let value = self.store.query_at_key(key, cmd).await?;
            Ok(redis::from_redis_value(value)?)
        };
        self.answer(call).await
    }

    async fn answer<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, AdminError> {
        match tokio::time::timeout(REDIS_TIMEOUT, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(AdminError::Redis(self.config.scrub(&e.to_string()))),
            Err(_) => Err(AdminError::Redis("no answer within 5 s".into())),
        }
    }

    async fn redis_entries(&mut self) -> Result<HashMap<String, String>, AdminError> {
        let cmd = redis::cmd("HGETALL").arg(&self.hash).to_owned();
        let mut entries: HashMap<String, String> = self.query(&cmd).await?;
        entries.retain(|field, _| !field.starts_with(MARKER_PREFIX));
        Ok(entries)
    }

    /// The limits as the gates build them: the file's, with the Redis overrides in.
    async fn effective_limits(&mut self) -> Result<(LimitsConfig, Vec<Override>), AdminError> {
        let also = self.config.limits.also.clone();
        let (redis, _) = parse_overrides(self.redis_entries().await?, &[], &also);
        let mut limits = self.config.limits.clone();
        limits
            .overrides
            .retain(|o| !redis.iter().any(|r| Target::of(r).names(o)));
        limits.overrides.extend(redis.iter().cloned());
        Ok((limits, redis))
    }

    /// Every override, from the file and from Redis.
    pub async fn list(&mut self) -> Result<Vec<Listed>, AdminError> {
        let mut listed: Vec<Listed> = self
            .config
            .limits
            .overrides
            .iter()
            .map(|o| Listed {
                target: Target::of(o).field(),
                source: "file",
                values: values_of(o),
                invalid: None,
            })
            .collect();
        let mut entries: Vec<(String, String)> = self.redis_entries().await?.into_iter().collect();
        entries.sort();
        for (field, json) in entries {
            let (parsed, errors) = parse_overrides(
                HashMap::from([(field.clone(), json.clone())]),
                &[],
                &self.config.limits.also,
            );
            listed.push(Listed {
                target: field,
                source: "redis",
                values: parsed.first().map(values_of).unwrap_or_default(),
                invalid: errors.into_iter().next(),
            });
        }
        Ok(listed)
    }

    /// The rule in force for `target`, field by field, with where each value comes from.
    pub async fn get(&mut self, target: &Target) -> Result<Resolved, AdminError> {
        let (limits, redis) = self.effective_limits().await?;
        resolve(&limits, &redis, target)
    }

    /// Writes the fields of `change` into the Redis override of `target` (other fields of
    /// an existing entry stay). Validated exactly as the gates validate the hash; nothing is
    /// written when invalid. Read, merge and write are one compare-and-set: an operator
    /// who changed the entry meanwhile is never overwritten, the change is merged into
    /// theirs and written again.
    pub async fn set(
        &mut self,
        target: &Target,
        change: RedisOverride,
    ) -> Result<RedisOverride, AdminError> {
        Self::check_change(&self.config, target, &change)?;
        let field = target.field();
        for _ in 0..SET_ATTEMPTS {
            let cmd = redis::cmd("HGET").arg(&self.hash).arg(&field).to_owned();
            let existing: Option<String> = self.query(&cmd).await?;
            let value = self.merged(target, existing.as_deref(), &change)?;
            let json = serde_json::to_string(&value).expect("an override serializes");
            let (_, errors) = parse_overrides(
                HashMap::from([(field.clone(), json.clone())]),
                &[],
                &self.config.limits.also,
            );
            if let Some(error) = errors.into_iter().next() {
                return Err(AdminError::Invalid(error));
            }
            // Written only if the entry is still what was read (absent: "").
            let cas = redis::cmd("EVAL")
                .arg(COMPARE_AND_SET)
                .arg(1)
                .arg(&self.hash)
                .arg(&field)
                .arg(existing.as_deref().unwrap_or(""))
                .arg(&json)
                .to_owned();
            let written: i64 = self.query(&cas).await?;
            if written == 1 {
                return Ok(value);
            }
        }
        Err(AdminError::Redis(format!(
            "the override of {field} kept changing while it was being set; try again"
        )))
    }

    /// `change` merged into the entry read from Redis (or, for a first entry, the file's
    /// override for the same target, so the fields not given keep their values).
    fn merged(
        &self,
        target: &Target,
        existing: Option<&str>,
        change: &RedisOverride,
    ) -> Result<RedisOverride, AdminError> {
        let from_file = self
            .config
            .limits
            .overrides
            .iter()
            .find(|o| target.names(o))
            .map(values_of);
        let mut value: RedisOverride = match existing {
            Some(json) => serde_json::from_str(json).map_err(|e| {
                AdminError::Invalid(format!(
                    "the Redis override of {} is not valid ({e}); `limits unset {}` first",
                    target.field(),
                    target.field()
                ))
            })?,
            None => from_file.unwrap_or_default(),
        };
        value.requests = change.requests.or(value.requests);
        value.window_seconds = change.window_seconds.or(value.window_seconds);
        value.algorithm = change.algorithm.or(value.algorithm);
        value.burst = change.burst.or(value.burst);
        value.shadow = change.shadow.or(value.shadow);
        value.on_limit = change.on_limit.or(value.on_limit);
        Ok(value)
    }

    /// Removes the Redis override of `target`; returns whether there was one.
    pub async fn unset(&mut self, target: &Target) -> Result<bool, AdminError> {
        let cmd = redis::cmd("HDEL")
            .arg(&self.hash)
            .arg(target.field())
            .to_owned();
        let removed: i64 = self.query(&cmd).await?;
        Ok(removed > 0)
    }

    /// The state of `target`'s window now, for the algorithm in force. Reads only.
    pub async fn usage(&mut self, target: &Target) -> Result<Usage, AdminError> {
        let channel = target.channel.as_deref().unwrap_or_default();
        let (limits, _) = self.effective_limits().await?;
        let rules = Rules::from_config(&limits);
        let prefix = &self.config.redis.key_prefix;
        let (rule, key) = match target.scope {
            None => {
                let rule = rules.rule_for(&target.tenant, channel);
                let key = key_for(rule.algorithm, prefix, &target.tenant, channel);
                (rule, key)
            }
            Some(Scope::Sender) => {
                return Err(AdminError::Invalid(
                    "a sender limit is kept per sender: its usage is not shown by target".into(),
                ));
            }
            Some(scope) => {
                let Some((_, rule)) = rules
                    .also_for(&target.tenant, channel)
                    .into_iter()
                    .find(|(s, _)| *s == scope)
                else {
                    return Err(AdminError::Invalid(format!(
                        "no limit of scope {} applies to {}",
                        scope.as_str(),
                        target.field()
                    )));
                };
                let key = also_key(scope, rule.algorithm, prefix, &target.tenant, "", "");
                (rule, key)
            }
        };
        let (secs, micros): (u64, u64) = self.query(&redis::cmd("TIME")).await?;
        let now_us = secs as f64 * 1e6 + micros as f64;
        let (remaining, reset_us) = match rule.algorithm {
            Algorithm::FixedWindow => {
                let count: Option<i64> = self.query(redis::cmd("GET").arg(&key)).await?;
                let pttl: i64 = self.query(redis::cmd("PTTL").arg(&key)).await?;
                let used = count.unwrap_or(0).max(0) as u64;
                (
                    rule.requests.saturating_sub(used),
                    pttl.max(0) as f64 * 1000.0,
                )
            }
            Algorithm::SlidingWindow => {
                let stored: (Option<f64>, Option<f64>, Option<f64>) = self
                    .query(
                        redis::cmd("HMGET")
                            .arg(&key)
                            .arg("index")
                            .arg("current")
                            .arg("previous"),
                    )
                    .await?;
                let window = rule.window_seconds as f64 * 1000.0;
                let now = now_us / 1000.0;
                let index = (now / window).floor();
                let (current, previous) = match stored {
                    (Some(was), Some(c), Some(p)) if was == index => (c, p),
                    (Some(was), Some(c), _) if was == index - 1.0 => (0.0, c),
                    _ => (0.0, 0.0),
                };
                let elapsed = now - index * window;
                let estimate = previous * (window - elapsed) / window + current;
                let remaining = (rule.requests as f64 - estimate).floor().max(0.0) as u64;
                let reset = if estimate > 0.0 {
                    (window - elapsed) * 1000.0
                } else {
                    0.0
                };
                (remaining, reset)
            }
            Algorithm::TokenBucket => {
                let tat: Option<f64> = self.query(redis::cmd("GET").arg(&key)).await?;
                let interval = (rule.window_seconds as f64 * 1e6 / rule.requests as f64).max(1.0);
                let tat = tat.unwrap_or(now_us).max(now_us);
                let free = ((now_us - (tat - rule.burst as f64 * interval)) / interval).floor();
                (free.clamp(0.0, rule.burst as f64) as u64, tat - now_us)
            }
        };
        Ok(Usage {
            target: target.field(),
            algorithm: rule.algorithm,
            limit: rule.requests,
            remaining,
            reset_seconds: (reset_us / 1e6).ceil().max(0.0) as u64,
        })
    }

    /// Starts `target`'s window afresh: deletes its state, its line and its senders told (of
    /// every algorithm, each key by name) and its senders' limits, then tells every gate to forget its cached
    /// rejections. Decisions kept by message id stay: a redelivery is still counted once,
    /// and a duplicate still dropped. Returns how many keys were deleted.
    pub async fn reset(&mut self, target: &Target) -> Result<u64, AdminError> {
        let channel = target.channel.as_deref().unwrap_or_default();
        let prefix = &self.config.redis.key_prefix;
        let counter = counter_key(prefix, &target.tenant, channel);
        let senders = also_key(
            Scope::Sender,
            Algorithm::FixedWindow,
            prefix,
            &target.tenant,
            channel,
            "",
        );
        let pattern = format!("{}*", glob_escape(&senders));
        let mut deleted = 0;
        let keys = match target.scope {
            None => window_keys(prefix, &target.tenant, channel),
            Some(Scope::Tenant) => [
                Algorithm::FixedWindow,
                Algorithm::SlidingWindow,
                Algorithm::TokenBucket,
            ]
            .map(|a| also_key(Scope::Tenant, a, prefix, &target.tenant, "", ""))
            .to_vec(),
            Some(_) => {
                return Err(AdminError::Invalid(
                    "a sender limit is kept per sender: reset TENANT:CHANNEL instead".into(),
                ));
            }
        };
        // One key per DEL: in a cluster a tenant id with braces can put the counter in
        // another slot than its companions.
        for key in keys {
            let n: u64 = self.query(redis::cmd("DEL").arg(key)).await?;
            deleted += n;
        }
        // The (tenant, channel)'s senders' limits, one key per sender (and algorithm), all
        // in the counter's slot: found there by a SCAN of their common name.
        if target.scope.is_none() {
            let mut cursor = "0".to_owned();
            loop {
                let cmd = redis::cmd("SCAN")
                    .arg(&cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .to_owned();
                let (next, found): (String, Vec<String>) = self.query_at(&counter, cmd).await?;
                for key in found {
                    let n: u64 = self
                        .query_at(&counter, redis::cmd("DEL").arg(key).to_owned())
                        .await?;
                    deleted += n;
                }
                if next == "0" {
                    break;
                }
                cursor = next;
            }
        }
        // One counter for every reset, so the hash does not grow with them.
        let marker = format!("{MARKER_PREFIX}resets");
        let _: i64 = self
            .query(redis::cmd("HINCRBY").arg(&self.hash).arg(marker).arg(1))
            .await?;
        // Heard by every running gate at once (a classic PUBLISH reaches every node of a
        // cluster); the counter above is for a gate that was not listening just then.
        let channel = format!("{}{RESETS_CHANNEL}", self.config.redis.key_prefix);
        let _: i64 = self
            .query(redis::cmd("PUBLISH").arg(channel).arg(&counter))
            .await?;
        Ok(deleted)
    }
}

/// `text` with the characters a SCAN pattern reads (`* ? [ ] \\`) escaped.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// How often `set` reads and merges again when another operator's write came between.
const SET_ATTEMPTS: usize = 10;

/// HSET only if the field still holds ARGV[2] ("" for absent): 1 when written, else 0.
const COMPARE_AND_SET: &str = "local now = redis.call('HGET', KEYS[1], ARGV[1]) or ''\n\
if now ~= ARGV[2] then return 0 end\n\
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])\n\
return 1";

fn values_of(o: &Override) -> RedisOverride {
    RedisOverride {
        requests: o.requests,
        window_seconds: o.window_seconds,
        algorithm: o.algorithm,
        burst: o.burst,
        shadow: o.shadow,
        on_limit: o.on_limit,
    }
}

/// The rule for `target` under `limits` (overrides already merged), with the source of
/// each field: the (tenant, channel) override, else the tenant's, else the global limit.
///
/// For a `[[limits.also]]` scope (`acme@tenant`, `acme:slack@sender`) the chain is that
/// scope's overrides, then `[[limits.also]]` (source `global`); `shadow` and `on_limit` are
/// the (tenant, channel) rule's, which decides them for the whole message.
pub fn resolve(
    limits: &LimitsConfig,
    redis: &[Override],
    target: &Target,
) -> Result<Resolved, AdminError> {
    let source = |o: &Override| {
        let from_redis = redis.iter().any(|r| Target::of(r).names(o));
        let name = Target::of(o).field();
        format!("{} {name}", if from_redis { "redis" } else { "file" })
    };
    let find = |channel: Option<&String>, scope: Option<Scope>| {
        let wanted = Target {
            tenant: target.tenant.clone(),
            channel: channel.cloned(),
            scope,
        };
        limits.overrides.iter().find(|o| wanted.names(o))
    };
    let chain_of = |scope: Option<Scope>| -> Vec<&Override> {
        [
            find(target.channel.as_ref(), scope).filter(|_| target.channel.is_some()),
            find(None, scope),
        ]
        .into_iter()
        .flatten()
        .collect()
    };
    let chain = chain_of(target.scope);
    let message_chain = chain_of(None);
    // The global values: `[limits]`, or for another scope its `[[limits.also]]` entry.
    let (requests_0, window_0, algorithm_0, burst_0) = match target.scope {
        None => (
            limits.requests,
            limits.window_seconds,
            limits.algorithm,
            limits.burst,
        ),
        Some(scope) => match limits.also.iter().find(|a| a.scope == scope) {
            Some(a) => (
                a.requests,
                a.window_seconds,
                a.algorithm.unwrap_or(limits.algorithm),
                a.burst,
            ),
            None if chain.iter().any(|o| o.requests.is_some()) => (0, 0, limits.algorithm, None),
            None => {
                return Err(AdminError::Invalid(format!(
                    "no limit of scope {} applies to {}: [[limits.also]] sets none and no override does",
                    scope.as_str(),
                    target.field()
                )));
            }
        },
    };
    fn pick<T: Copy>(
        chain: &[&Override],
        get: impl Fn(&Override) -> Option<T>,
        source: &impl Fn(&Override) -> String,
        global: T,
    ) -> Sourced<T> {
        chain
            .iter()
            .find_map(|o| {
                get(o).map(|v| Sourced {
                    value: v,
                    source: source(o),
                })
            })
            .unwrap_or(Sourced {
                value: global,
                source: "global".into(),
            })
    }
    let requests = pick(&chain, |o| o.requests, &source, requests_0);
    let burst = match burst_0 {
        Some(b) => pick(&chain, |o| o.burst, &source, b),
        None => chain
            .iter()
            .find_map(|o| {
                o.burst.map(|v| Sourced {
                    value: v,
                    source: source(o),
                })
            })
            .unwrap_or(Sourced {
                value: requests.value,
                source: "requests".into(),
            }),
    };
    Ok(Resolved {
        target: target.field(),
        window_seconds: pick(&chain, |o| o.window_seconds, &source, window_0),
        algorithm: pick(&chain, |o| o.algorithm, &source, algorithm_0),
        shadow: pick(&message_chain, |o| o.shadow, &source, limits.shadow),
        on_limit: pick(&message_chain, |o| o.on_limit, &source, limits.on_limit),
        requests,
        burst,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(tenant: &str, channel: Option<&str>) -> Override {
        Override {
            tenant: tenant.into(),
            channel: channel.map(Into::into),
            ..Override::default()
        }
    }

    #[test]
    fn targets_are_validated_like_messages() {
        assert_eq!(
            Target::parse("acme:slack", true).unwrap().field(),
            "acme:slack"
        );
        assert_eq!(Target::parse("acme", false).unwrap().channel, None);
        for bad in ["-acme", "acme:Slack", "acme:", ""] {
            assert_eq!(
                Target::parse(bad, false).unwrap_err().exit_code(),
                2,
                "{bad}"
            );
        }
        assert!(
            Target::parse("acme", true).is_err(),
            "usage and reset need a channel"
        );
    }

    /// The sources `get` reports lead to exactly the rule the gates apply.
    #[test]
    fn resolution_names_each_source_and_agrees_with_the_gates() {
        let limits = LimitsConfig {
            requests: 30,
            window_seconds: 60,
            overrides: vec![
                Override {
                    requests: Some(100),
                    algorithm: Some(Algorithm::TokenBucket),
                    ..o("acme", None)
                },
                Override {
                    burst: Some(7),
                    ..o("acme", Some("slack"))
                },
            ],
            ..LimitsConfig::default()
        };
        let redis = vec![limits.overrides[1].clone()];
        for (target, channel) in [("acme:slack", "slack"), ("acme", ""), ("globex:sms", "sms")] {
            let target = Target::parse(target, false).unwrap();
            let r = resolve(&limits, &redis, &target).unwrap();
            let rule = Rules::from_config(&limits).rule_for(&target.tenant, channel);
            assert_eq!(
                (
                    r.requests.value,
                    r.window_seconds.value,
                    r.algorithm.value,
                    r.burst.value,
                    r.shadow.value
                ),
                (
                    rule.requests,
                    rule.window_seconds,
                    rule.algorithm,
                    rule.burst,
                    rule.shadow
                ),
                "{target:?}"
            );
        }
        let r = resolve(
            &limits,
            &redis,
            &Target::parse("acme:slack", false).unwrap(),
        )
        .unwrap();
        assert_eq!(r.requests.source, "file acme");
        assert_eq!(r.burst.source, "redis acme:slack");
        assert_eq!(r.window_seconds.source, "global");
        let r = resolve(&limits, &redis, &Target::parse("acme", false).unwrap()).unwrap();
        assert_eq!((r.burst.value, r.burst.source.as_str()), (100, "requests"));
    }
}
