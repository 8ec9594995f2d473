//! `[redis]`: where the counters live, one server, a Redis Cluster or the primary a
//! Sentinel group names.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::secret::{SecretUrl, check_url_shape, list_or_commas, scrub};
use super::tls::{TlsFiles, same_scheme};
use super::{ConfigError, MAX_REDIS_TIMEOUT_MS};

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    pub mode: RedisMode,
    /// `standalone`: the server. `sentinel`: the primary's user, password, database and
    /// scheme (`rediss://` for TLS); its host is ignored.
    pub url: SecretUrl,
    /// `cluster`: seed nodes; the gate learns the rest of the cluster from them.
    #[serde(
        default,
        deserialize_with = "list_or_commas",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub nodes: Vec<SecretUrl>,
    /// `sentinel`: the sentinels that know the primary.
    #[serde(
        default,
        deserialize_with = "list_or_commas",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub sentinels: Vec<SecretUrl>,
    /// `sentinel`: the name the sentinels monitor the primary under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_name: Option<String>,
    /// A private CA and a client certificate for `rediss://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFiles>,
    /// A file holding the password (a mounted Kubernetes secret): it replaces the URL's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Prepended to every key, so several deployments (or tests) can share one Redis.
    pub key_prefix: String,
    /// Upper bound on one rate-limit check, so a slow Redis cannot stall the pipeline.
    pub timeout_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            mode: RedisMode::Standalone,
            url: SecretUrl::new("redis://127.0.0.1:6379/0"),
            nodes: Vec::new(),
            sentinels: Vec::new(),
            master_name: None,
            tls: None,
            password_file: None,
            key_prefix: String::new(),
            timeout_ms: 250,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisMode {
    /// One server at `url`.
    Standalone,
    /// A Redis Cluster reached through `nodes`.
    Cluster,
    /// The primary the `sentinels` name `master_name`, followed across failovers.
    Sentinel,
}

impl RedisConfig {
    /// Checks `[redis]` on its own, naming the first bad key.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(ConfigError(msg));
        check_url("redis.url", &self.url)?;
        let mode = match self.mode {
            RedisMode::Standalone => "standalone",
            RedisMode::Cluster => "cluster",
            RedisMode::Sentinel => "sentinel",
        };
        for (key, set, wants) in [
            ("redis.nodes", !self.nodes.is_empty(), RedisMode::Cluster),
            (
                "redis.sentinels",
                !self.sentinels.is_empty(),
                RedisMode::Sentinel,
            ),
            (
                "redis.master_name",
                self.master_name.is_some(),
                RedisMode::Sentinel,
            ),
        ] {
            if set && self.mode != wants {
                return fail(format!(
                    "{key} is set, but redis.mode is \"{mode}\", which does not use it"
                ));
            }
        }
        for (key, list) in [
            ("redis.nodes", &self.nodes),
            ("redis.sentinels", &self.sentinels),
        ] {
            same_scheme(key, list)?;
        }
        match self.mode {
            RedisMode::Standalone => {}
            RedisMode::Cluster => {
                if self.nodes.is_empty() {
                    return fail(
                        "redis.mode = \"cluster\" needs redis.nodes, the URLs of one or more seed nodes".into(),
                    );
                }
                for (i, url) in self.nodes.iter().enumerate() {
                    check_url(&format!("redis.nodes[{i}]"), url)?;
                }
                // Companion keys are tagged with their whole counter key: a brace in the
                // prefix would move one of them into another slot.
                if self.key_prefix.contains(['{', '}']) {
                    return fail(
                        "redis.key_prefix must not contain { or } in cluster mode: the gate tags each key itself so that a counter and its companions share a slot".into(),
                    );
                }
            }
            RedisMode::Sentinel => {
                if self.sentinels.is_empty() {
                    return fail(
                        "redis.mode = \"sentinel\" needs redis.sentinels, the URLs of the sentinels".into(),
                    );
                }
                for (i, url) in self.sentinels.iter().enumerate() {
                    check_url(&format!("redis.sentinels[{i}]"), url)?;
                }
                if self.master_name.as_deref().is_none_or(str::is_empty) {
                    return fail(
                        "redis.mode = \"sentinel\" needs redis.master_name, the name the sentinels monitor the primary under".into(),
                    );
                }
            }
        }
        self.check_tls()?;
        if !(1..=MAX_REDIS_TIMEOUT_MS).contains(&self.timeout_ms) {
            return fail(format!(
                "redis.timeout_ms = {} is out of range (1 to {MAX_REDIS_TIMEOUT_MS})",
                self.timeout_ms
            ));
        }
        Ok(())
    }

    /// A `[redis.tls]` table is readable, and the URLs in use are `rediss://`.
    fn check_tls(&self) -> Result<(), ConfigError> {
        let Some(tls) = &self.tls else { return Ok(()) };
        tls.validate("redis.tls")?;
        let in_use: Vec<&SecretUrl> = match self.mode {
            RedisMode::Standalone | RedisMode::Sentinel => vec![&self.url],
            RedisMode::Cluster => self.nodes.iter().collect(),
        };
        if !in_use
            .iter()
            .any(|url| url.expose().starts_with("rediss://"))
        {
            return Err(ConfigError(
                "redis.tls is set, but the Redis URL is not rediss://; use rediss:// for TLS"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// Refuses a URL the Redis client cannot read, naming it by `key`.
fn check_url(key: &str, url: &SecretUrl) -> Result<(), ConfigError> {
    check_url_shape(key, url)?;
    match redis::Client::open(url.expose()) {
        Ok(_) => Ok(()),
        Err(e) => Err(ConfigError(format!(
            "{key} is not a valid Redis URL ({url}): {}",
            scrub(&e.to_string(), &[url])
        ))),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn each_redis_mode_names_what_it_is_missing() {
        let err = |toml: &str| Config::from_toml_str(toml).unwrap_err().to_string();
        assert!(
            err("[redis]\nnodes = [\"redis://n:6379\"]\n")
                .contains("redis.nodes is set, but redis.mode is \"standalone\""),
            "nodes without mode = cluster"
        );
        assert!(
            err("[redis]\nmode = \"cluster\"\nnodes = [\"rediss://a:6379\", \"redis://b:6379\"]\n")
                .contains("redis.nodes mixes TLS and plaintext"),
        );
        assert!(
            err("[amqp]\nurls = [\"amqps://a:5671\", \"amqp://b:5672\"]\n")
                .contains("amqp.urls mixes TLS and plaintext"),
        );
        assert!(err("[redis]\nmode = \"cluster\"\n").contains("redis.nodes"));
        assert!(err("[redis]\nmode = \"sentinel\"\n").contains("redis.sentinels"));
        assert!(
            err("[redis]\nmode = \"sentinel\"\nsentinels = [\"redis://s:26379\"]\n")
                .contains("redis.master_name")
        );
        assert!(
            err("[redis]\nmode = \"cluster\"\nnodes = [\"redis://n:6379\"]\nkey_prefix = \"{gate}:\"\n")
                .contains("redis.key_prefix")
        );
        assert!(
            err("[redis]\nmode = \"cluster\"\nnodes = [\"redis//n:6379\"]\n")
                .contains("redis.nodes[0]")
        );
        assert!(err("[redis]\nmode = \"ring\"\n").contains("redis.mode"));
        Config::from_toml_str(
            "[redis]\nmode = \"sentinel\"\nsentinels = [\"redis://s:26379\"]\nmaster_name = \"mymaster\"\n",
        )
        .unwrap();
    }
}
