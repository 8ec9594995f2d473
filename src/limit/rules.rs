//! Which limit applies to a (tenant, channel): (tenant, channel) override, else tenant
//! override, else the global limit. Fields an override leaves out fall back the same way.

use std::collections::HashMap;

use crate::config::LimitsConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub requests: u64,
    pub window_seconds: u64,
}

#[derive(Debug, Clone)]
pub struct Rules {
    global: Rule,
    /// Keyed by tenant, so a lookup borrows the message's strings instead of building a key.
    tenants: HashMap<String, TenantRules>,
}

#[derive(Debug, Clone)]
struct TenantRules {
    tenant: Rule,
    channels: HashMap<String, Rule>,
}

impl Rules {
    pub fn from_config(limits: &LimitsConfig) -> Self {
        let global = Rule {
            requests: limits.requests,
            window_seconds: limits.window_seconds,
        };
        let mut tenants: HashMap<String, TenantRules> = HashMap::new();
        // Tenant-wide overrides first, so channel overrides can inherit from them.
        for o in limits.overrides.iter().filter(|o| o.channel.is_none()) {
            let rule = Rule {
                requests: o.requests.unwrap_or(global.requests),
                window_seconds: o.window_seconds.unwrap_or(global.window_seconds),
            };
            tenants.entry(o.tenant.clone()).or_insert(TenantRules {
                tenant: rule,
                channels: HashMap::new(),
            });
        }
        for o in limits.overrides.iter() {
            let Some(channel) = &o.channel else { continue };
            let entry = tenants.entry(o.tenant.clone()).or_insert(TenantRules {
                tenant: global,
                channels: HashMap::new(),
            });
            let base = entry.tenant;
            entry.channels.insert(
                channel.clone(),
                Rule {
                    requests: o.requests.unwrap_or(base.requests),
                    window_seconds: o.window_seconds.unwrap_or(base.window_seconds),
                },
            );
        }
        Rules { global, tenants }
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
    use crate::config::Override;

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
        assert_eq!(
            r("other", "slack"),
            Rule {
                requests: 30,
                window_seconds: 60
            }
        );
        assert_eq!(
            r("acme", "slack"),
            Rule {
                requests: 300,
                window_seconds: 10
            }
        );
        assert_eq!(
            r("acme", "whatsapp"),
            Rule {
                requests: 100,
                window_seconds: 10
            }
        );
        assert_eq!(
            r("solo", "whatsapp"),
            Rule {
                requests: 30,
                window_seconds: 5
            }
        );
        assert_eq!(
            r("solo", "slack"),
            Rule {
                requests: 30,
                window_seconds: 60
            }
        );
    }
}
