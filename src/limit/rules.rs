//! Which limit applies to a (tenant, channel): (tenant, channel) override, else tenant
//! override, else the global limit. Fields an override leaves out fall back the same way.

use std::collections::HashMap;

use crate::config::{Algorithm, LimitsConfig, Notify, OnLimit, OnRedisError, Override, Scope};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub algorithm: Algorithm,
    pub requests: u64,
    pub window_seconds: u64,
    /// `token_bucket` only: messages allowed at once.
    pub burst: u64,
    /// Forward what this rule would reject, marked, instead of rejecting it.
    pub shadow: bool,
    /// Park what this rule would reject in the broker until its window can allow it
    /// (`on_limit = "defer"`), instead of rejecting it.
    pub defer: bool,
}

impl Rule {
    /// `base` with the fields `o` sets. A burst left out follows `requests`, unless the
    /// base had one of its own.
    fn overridden(base: Rule, base_has_burst: bool, o: &Override) -> (Rule, bool) {
        let requests = o.requests.unwrap_or(base.requests);
        let burst = o
            .burst
            .or(base_has_burst.then_some(base.burst))
            .unwrap_or(requests);
        let rule = Rule {
            algorithm: o.algorithm.unwrap_or(base.algorithm),
            requests,
            window_seconds: o.window_seconds.unwrap_or(base.window_seconds),
            burst,
            shadow: o.shadow.unwrap_or(base.shadow),
            defer: o.on_limit.map_or(base.defer, |l| l == OnLimit::Defer),
        };
        (rule, o.burst.is_some() || base_has_burst)
    }
}

/// The keys of `[limits]` that shape how every message is handled, taken with the rules
/// so that a reload changes them all at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub max_message_bytes: usize,
    pub notify: Notify,
    pub count_once: bool,
    pub on_redis_error: OnRedisError,
    /// `on_limit = "defer"`: how long after its first arrival a message may still be parked.
    pub max_defer_seconds: u64,
    /// `duplicates = "drop"`: how long a confirmed output is remembered by message id, in
    /// seconds; `None` forwards duplicates again (marked).
    pub drop_duplicates: Option<u64>,
    /// `quiet_rejections = "drop"`: a rejection whose sender was told already is acked
    /// without a notice.
    pub drop_quiet: bool,
}

#[derive(Debug, Clone)]
pub struct Rules {
    /// Changes whenever the rules do, so caches of decisions know to forget.
    pub generation: u64,
    pub settings: Settings,
    /// Some rule that is not shadow (the global one or an override) says
    /// `on_limit = "defer"`.
    pub can_defer: bool,
    global: Rule,
    /// `[[limits.also]]`: the tenant's budget and the sender limit, where set.
    global_also: AlsoRules,
    /// Keyed by tenant, so a lookup borrows the message's strings instead of building a key.
    tenants: HashMap<String, TenantRules>,
}

/// The limits of scope tenant and sender (in that order), each with whether it set a burst.
type AlsoRules = [Option<(Rule, bool)>; 2];

fn also_index(scope: Scope) -> Option<usize> {
    match scope {
        Scope::Channel => None,
        Scope::Tenant => Some(0),
        Scope::Sender => Some(1),
    }
}

#[derive(Debug, Clone)]
struct TenantRules {
    tenant: Rule,
    tenant_has_burst: bool,
    channels: HashMap<String, Rule>,
    /// The tenant's own budget and sender limit (overrides of those scopes).
    also: AlsoRules,
    /// Sender limits overridden for one of its channels.
    channel_senders: HashMap<String, Rule>,
}

impl Rules {
    pub fn from_config(limits: &LimitsConfig) -> Self {
        let global = Rule {
            algorithm: limits.algorithm,
            requests: limits.requests,
            window_seconds: limits.window_seconds,
            burst: limits.burst.unwrap_or(limits.requests),
            shadow: limits.shadow,
            defer: limits.on_limit == OnLimit::Defer,
        };
        let global_has_burst = limits.burst.is_some();
        let mut global_also: AlsoRules = [None, None];
        for also in &limits.also {
            if let Some(i) = also_index(also.scope) {
                let rule = Rule {
                    algorithm: also.algorithm.unwrap_or(limits.algorithm),
                    requests: also.requests,
                    window_seconds: also.window_seconds,
                    burst: also.burst.unwrap_or(also.requests),
                    shadow: false,
                    defer: false,
                };
                global_also[i] = Some((rule, also.burst.is_some()));
            }
        }
        // An override of a scope `[[limits.also]]` leaves out starts from the override
        // alone (validation asked it for requests and window_seconds).
        let also_base = |base: Option<(Rule, bool)>| {
            base.unwrap_or((
                Rule {
                    algorithm: limits.algorithm,
                    requests: 1,
                    window_seconds: 1,
                    burst: 1,
                    shadow: false,
                    defer: false,
                },
                false,
            ))
        };
        let fresh = |global_also: AlsoRules| TenantRules {
            tenant: global,
            tenant_has_burst: global_has_burst,
            channels: HashMap::new(),
            also: global_also,
            channel_senders: HashMap::new(),
        };
        let mut tenants: HashMap<String, TenantRules> = HashMap::new();
        let scoped = |o: &&Override| o.scope.unwrap_or_default() == Scope::Channel;
        // Tenant-wide overrides first, so channel overrides can inherit from them.
        for o in limits
            .overrides
            .iter()
            .filter(scoped)
            .filter(|o| o.channel.is_none())
        {
            let (rule, has_burst) = Rule::overridden(global, global_has_burst, o);
            let entry = tenants
                .entry(o.tenant.clone())
                .or_insert_with(|| fresh(global_also));
            entry.tenant = rule;
            entry.tenant_has_burst = has_burst;
        }
        for o in limits.overrides.iter().filter(scoped) {
            let Some(channel) = &o.channel else { continue };
            let entry = tenants
                .entry(o.tenant.clone())
                .or_insert_with(|| fresh(global_also));
            let (rule, _) = Rule::overridden(entry.tenant, entry.tenant_has_burst, o);
            entry.channels.insert(channel.clone(), rule);
        }
        // Then the other scopes: a tenant's own first, so its channels' sender limits
        // inherit from it.
        for o in limits.overrides.iter().filter(|o| o.channel.is_none()) {
            let Some(i) = o.scope.and_then(also_index) else {
                continue;
            };
            let entry = tenants
                .entry(o.tenant.clone())
                .or_insert_with(|| fresh(global_also));
            let (base, has_burst) = also_base(entry.also[i]);
            let (mut rule, has_burst) = Rule::overridden(base, has_burst, o);
            (rule.shadow, rule.defer) = (false, false);
            entry.also[i] = Some((rule, has_burst));
        }
        for o in limits.overrides.iter() {
            let (Some(channel), Some(Scope::Sender)) = (&o.channel, o.scope) else {
                continue;
            };
            let entry = tenants
                .entry(o.tenant.clone())
                .or_insert_with(|| fresh(global_also));
            let (base, has_burst) = also_base(entry.also[1]);
            let (mut rule, _) = Rule::overridden(base, has_burst, o);
            (rule.shadow, rule.defer) = (false, false);
            entry.channel_senders.insert(channel.clone(), rule);
        }
        // A shadow rule only reports what it would do: it never parks anything.
        let defers = |r: &Rule| r.defer && !r.shadow;
        let can_defer = defers(&global)
            || tenants
                .values()
                .any(|t| defers(&t.tenant) || t.channels.values().any(defers));
        Rules {
            generation: 0,
            can_defer,
            settings: Settings {
                max_message_bytes: limits.max_message_bytes,
                notify: limits.notify,
                count_once: limits.count_once,
                on_redis_error: limits.on_redis_error,
                max_defer_seconds: limits.max_defer_seconds,
                drop_duplicates: (limits.duplicates == crate::config::Duplicates::Drop)
                    .then_some(limits.duplicate_window_seconds),
                drop_quiet: limits.quiet_rejections == crate::config::QuietRejections::Drop,
            },
            global,
            global_also,
            tenants,
        }
    }

    /// The limits besides the (tenant, channel) one that a message of `tenant_id` on
    /// `channel` must pass: the tenant's budget, then its sender's limit, where set.
    pub fn also_for(&self, tenant_id: &str, channel: &str) -> Vec<(Scope, Rule)> {
        let (also, sender) = match self.tenants.get(tenant_id) {
            None => (&self.global_also, None),
            Some(t) => (&t.also, t.channel_senders.get(channel).copied()),
        };
        let mut out = Vec::new();
        if let Some((rule, _)) = also[0] {
            out.push((Scope::Tenant, rule));
        }
        if let Some(rule) = sender.or(also[1].map(|(rule, _)| rule)) {
            out.push((Scope::Sender, rule));
        }
        out
    }

    /// Whether some limit of scope tenant or sender is set anywhere.
    pub fn composes(&self) -> bool {
        self.global_also.iter().any(Option::is_some)
            || self
                .tenants
                .values()
                .any(|t| t.also.iter().any(Option::is_some) || !t.channel_senders.is_empty())
    }

    pub fn rule_for(&self, tenant_id: &str, channel: &str) -> Rule {
        match self.tenants.get(tenant_id) {
            None => self.global,
            Some(t) => t.channels.get(channel).copied().unwrap_or(t.tenant),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(
        tenant: &str,
        channel: Option<&str>,
        requests: Option<u64>,
        window: Option<u64>,
    ) -> Override {
        Override {
            tenant: tenant.into(),
            channel: channel.map(Into::into),
            requests,
            window_seconds: window,
            ..Override::default()
        }
    }

    fn rule(requests: u64, window_seconds: u64) -> Rule {
        Rule {
            algorithm: Algorithm::FixedWindow,
            requests,
            window_seconds,
            burst: requests,
            shadow: false,
            defer: false,
        }
    }

    #[test]
    fn most_specific_wins_and_gaps_inherit() {
        let limits = LimitsConfig {
            requests: 30,
            window_seconds: 60,
            overrides: vec![
                // Channel first in the file: order must not matter.
                o("acme", Some("slack"), Some(300), None),
                o("acme", None, Some(100), Some(10)),
                o("solo", Some("whatsapp"), None, Some(5)),
            ],
            ..LimitsConfig::default()
        };
        let rules = Rules::from_config(&limits);
        let r = |t, c| rules.rule_for(t, c);
        assert_eq!(r("other", "slack"), rule(30, 60));
        assert_eq!(r("acme", "slack"), rule(300, 10));
        assert_eq!(r("acme", "whatsapp"), rule(100, 10));
        assert_eq!(r("solo", "whatsapp"), rule(30, 5));
        assert_eq!(r("solo", "slack"), rule(30, 60));
    }

    #[test]
    fn algorithm_and_burst_inherit_like_the_rest() {
        let limits = LimitsConfig {
            requests: 30,
            window_seconds: 60,
            overrides: vec![
                Override {
                    algorithm: Some(Algorithm::TokenBucket),
                    burst: Some(5),
                    ..o("acme", None, Some(100), None)
                },
                o("acme", Some("slack"), Some(300), None),
                Override {
                    algorithm: Some(Algorithm::SlidingWindow),
                    ..o("solo", Some("sms"), None, None)
                },
            ],
            ..LimitsConfig::default()
        };
        let rules = Rules::from_config(&limits);
        let acme_slack = rules.rule_for("acme", "slack");
        assert_eq!(acme_slack.algorithm, Algorithm::TokenBucket);
        assert_eq!((acme_slack.requests, acme_slack.burst), (300, 5));
        let acme_other = rules.rule_for("acme", "teams");
        assert_eq!((acme_other.requests, acme_other.burst), (100, 5));
        let solo = rules.rule_for("solo", "sms");
        assert_eq!(solo.algorithm, Algorithm::SlidingWindow);
        assert_eq!(
            solo.burst, 30,
            "without a burst anywhere, burst follows requests"
        );
        assert_eq!(rules.rule_for("x", "y").algorithm, Algorithm::FixedWindow);
    }

    #[test]
    fn extra_limits_come_from_also_then_the_tenants_overrides_then_its_channels() {
        use crate::config::AlsoLimit;
        let scoped = |tenant: &str, channel: Option<&str>, scope, requests| Override {
            scope: Some(scope),
            ..o(tenant, channel, Some(requests), None)
        };
        let limits = LimitsConfig {
            also: vec![AlsoLimit {
                scope: Scope::Sender,
                requests: 10,
                window_seconds: 60,
                algorithm: None,
                burst: None,
            }],
            overrides: vec![
                // A budget only acme has, whole (requests and window).
                Override {
                    window_seconds: Some(3600),
                    ..scoped("acme", None, Scope::Tenant, 500)
                },
                scoped("acme", Some("slack"), Scope::Sender, 3),
                // A channel override of the (tenant, channel) limit changes no other.
                o("acme", Some("teams"), Some(7), None),
            ],
            ..LimitsConfig::default()
        };
        assert_eq!(limits.validate(), Ok(()));
        let rules = Rules::from_config(&limits);
        assert!(rules.composes());
        assert_eq!(
            rules.also_for("other", "slack"),
            [(Scope::Sender, rule(10, 60))]
        );
        assert_eq!(
            rules.also_for("acme", "whatsapp"),
            [
                (Scope::Tenant, rule(500, 3600)),
                (Scope::Sender, rule(10, 60))
            ]
        );
        assert_eq!(
            rules.also_for("acme", "slack"),
            [
                (Scope::Tenant, rule(500, 3600)),
                (Scope::Sender, rule(3, 60))
            ]
        );
        assert_eq!(rules.rule_for("acme", "teams").requests, 7);
        assert_eq!(rules.rule_for("acme", "slack").requests, 30);
        assert!(!Rules::from_config(&LimitsConfig::default()).composes());
    }

    #[test]
    fn an_extra_scope_is_refused_where_it_cannot_apply() {
        let refused = |o: Override| {
            let limits = LimitsConfig {
                overrides: vec![o],
                ..LimitsConfig::default()
            };
            limits.validate().unwrap_err()
        };
        let budget = |channel| Override {
            scope: Some(Scope::Tenant),
            ..o("acme", channel, Some(5), Some(60))
        };
        assert!(refused(budget(Some("slack"))).contains("covers all its channels"));
        assert!(
            refused(Override {
                window_seconds: None,
                ..budget(None)
            })
            .contains("give both requests and window_seconds")
        );
        assert!(
            refused(Override {
                shadow: Some(true),
                ..budget(None)
            })
            .contains("shadow and on_limit")
        );
    }
}
