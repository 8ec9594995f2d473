//! Typed configuration, loaded in layers: built-in defaults, then a TOML file, then
//! `KONSTRUCT_GATE__SECTION__KEY` environment variables. Every struct denies unknown keys,
//! so a typo stops start-up instead of being silently ignored.
//!
//! # Layout
//!
//! - this file: [`Config`], its loading and the checks that span sections, `[http]`,
//!   `[log]`, and the bounds of every number.
//! - `amqp.rs`: `[amqp]`, the brokers and the four queues.
//! - `redis.rs`: `[redis]`, one server, a Redis Cluster or a Sentinel group.
//! - `limits.rs`: `[limits]` and its overrides.
//! - `tls.rs`: the files of `[amqp.tls]` and `[redis.tls]`.
//! - `secret.rs`: connection URLs, and keeping their passwords out of everything printed.

mod amqp;
mod limits;
mod redis;
mod secret;
mod tls;

use std::net::SocketAddr;
use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Serialize};

use self::secret::with_password;

pub use self::amqp::{AmqpConfig, QueueType};
pub use self::limits::{
    Algorithm, AlsoLimit, Duplicates, LimitsConfig, Notify, OnLimit, OnRedisError, Override,
    QuietRejections, Scope, check_limit_numbers, check_override_scope,
};
pub use self::redis::{RedisConfig, RedisMode};
pub use self::secret::{SecretUrl, redact_url, redact_urls_in, scrub};
pub use self::tls::{TlsFiles, TlsPem};

/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "KONSTRUCT_GATE__";

/// Most requests (and burst) a limit may allow per window.
pub const MAX_REQUESTS: u64 = 1_000_000_000;
/// Longest window: 366 days.
pub const MAX_WINDOW_SECONDS: u64 = 366 * 24 * 60 * 60;
/// RabbitMQ's own ceiling on a message body: 128 MiB.
pub const MAX_MESSAGE_BYTES: usize = 128 * 1024 * 1024;
pub const MAX_SHUTDOWN_GRACE_SECONDS: u64 = 3_600;
pub const MAX_REDIS_TIMEOUT_MS: u64 = 60_000;
/// The overrides hash is read at least once an hour.
pub const MAX_OVERRIDES_REFRESH_MS: u64 = 3_600_000;
pub const MAX_DELIVERY_LIMIT: u32 = 1_000_000;
pub const MAX_DEFER_SECONDS: u64 = 24 * 60 * 60;
/// The longest `limits.duplicate_window_seconds`: a week.
pub const MAX_DUPLICATE_WINDOW_SECONDS: u64 = 7 * 24 * 60 * 60;
pub const MAX_CONFIRM_TIMEOUT_MS: u64 = 600_000;
/// RabbitMQ's own upper bound for a negotiated heartbeat is far higher; past ten minutes a
/// dead connection is found too late to matter.
pub const MAX_HEARTBEAT_SECONDS: u16 = 600;
pub const MAX_STALL_SECONDS: u64 = 86_400;

/// A configuration that cannot be used, described in one sentence naming the key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    pub fn new(sentence: impl Into<String>) -> Self {
        Self(sentence.into())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub amqp: AmqpConfig,
    pub redis: RedisConfig,
    pub limits: LimitsConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// `/healthz` fails when messages are in flight and none was settled for this long:
    /// the pipeline is stuck, and a restart is the cure.
    pub stall_seconds: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            stall_seconds: 120,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Json,
    Text,
}

impl Config {
    /// Loads defaults, then `path` (which must exist when given), then the environment,
    /// and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(path, Env::prefixed(ENV_PREFIX).split("__"))
    }

    fn load_with_env(path: Option<&Path>, env: Env) -> Result<Self, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = path {
            if !path.is_file() {
                return Err(ConfigError(format!(
                    "configuration file {} does not exist or is not a file",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        let mut config: Config = figment
            .merge(env)
            .extract()
            .map_err(|error| ConfigError(redact_urls_in(&describe_figment_error(error))))?;
        config.read_password_files()?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a TOML document on its own (no environment), for tests and reloads.
    pub fn from_toml_str(toml: &str) -> Result<Self, ConfigError> {
        let config: Config = Figment::new()
            .merge(Toml::string(toml))
            .extract()
            .map_err(|error| ConfigError(redact_urls_in(&describe_figment_error(error))))?;
        config.validate()?;
        Ok(config)
    }

    /// Puts the password of each `password_file` into its URLs.
    fn read_password_files(&mut self) -> Result<(), ConfigError> {
        let amqp = &mut self.amqp;
        let redis = &mut self.redis;
        for (key, file, urls) in [
            (
                "amqp.password_file",
                &amqp.password_file,
                std::iter::once(&mut amqp.url)
                    .chain(&mut amqp.urls)
                    .collect::<Vec<_>>(),
            ),
            (
                "redis.password_file",
                &redis.password_file,
                std::iter::once(&mut redis.url)
                    .chain(&mut redis.nodes)
                    .collect(),
            ),
        ] {
            let Some(path) = file else { continue };
            let password = std::fs::read_to_string(path).map_err(|e| {
                ConfigError(format!("{key} {} cannot be read: {e}", path.display()))
            })?;
            // A mounted secret often ends with a newline that is not part of it.
            let password = password.trim_end_matches(['\n', '\r']);
            for url in urls {
                let with = with_password(url.expose(), password).ok_or_else(|| {
                    ConfigError(format!(
                        "{key} is set, but a URL it belongs to ({url}) has no `scheme://host` to take the password"
                    ))
                })?;
                *url = SecretUrl::new(with);
            }
        }
        Ok(())
    }

    /// Every URL of the configuration, for scrubbing what a client library wrote.
    pub fn urls(&self) -> Vec<&SecretUrl> {
        let (amqp, redis) = (&self.amqp, &self.redis);
        std::iter::once(&amqp.url)
            .chain(&amqp.urls)
            .chain(std::iter::once(&redis.url))
            .chain(&redis.nodes)
            .chain(&redis.sentinels)
            .collect()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.amqp.validate()?;
        self.redis.validate()?;
        self.check_liveness()?;
        self.limits.validate().map_err(ConfigError)?;
        if let Err(e) = self.log.level.parse::<tracing_subscriber::EnvFilter>() {
            return Err(ConfigError(format!(
                "log.level {:?} is not a valid filter: {e}",
                self.log.level
            )));
        }
        Ok(())
    }

    /// `http.stall_seconds` is in range, and longer than a slow but working pipeline takes
    /// to settle a message: a confirm timeout, a Redis timeout and a hand-back pause.
    fn check_liveness(&self) -> Result<(), ConfigError> {
        let stall_seconds = self.http.stall_seconds;
        if !(1..=MAX_STALL_SECONDS).contains(&stall_seconds) {
            return Err(ConfigError(format!(
                "http.stall_seconds = {stall_seconds} is out of range (1 to {MAX_STALL_SECONDS})"
            )));
        }
        let slowest_ms = self
            .amqp
            .confirm_timeout_ms
            .saturating_add(self.redis.timeout_ms)
            .saturating_add(2_000);
        if stall_seconds.saturating_mul(1000) <= slowest_ms {
            return Err(ConfigError(format!(
                "http.stall_seconds = {stall_seconds} must exceed amqp.confirm_timeout_ms + redis.timeout_ms + 2 s ({slowest_ms} ms), or a slow but working gate would be restarted"
            )));
        }
        Ok(())
    }

    /// The effective configuration as TOML, with secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the configuration always serializes")
    }

    /// The keys (`section.key`) whose values differ between `self` and `other`.
    pub fn changed_keys(&self, other: &Config) -> Vec<String> {
        let table = |c: &Config| match toml::Value::try_from(c) {
            Ok(toml::Value::Table(t)) => t,
            _ => toml::Table::new(),
        };
        let (old, new) = (table(self), table(other));
        let mut changed = Vec::new();
        for (section, old_section) in &old {
            let empty = toml::Table::new();
            let old_keys = old_section.as_table().unwrap_or(&empty);
            let new_keys = new
                .get(section)
                .and_then(|v| v.as_table())
                .unwrap_or(&empty);
            let mut names: Vec<&String> = old_keys.keys().chain(new_keys.keys()).collect();
            names.sort();
            names.dedup();
            for name in names {
                if old_keys.get(name) != new_keys.get(name) {
                    changed.push(format!("{section}.{name}"));
                }
            }
        }
        // URLs print redacted: a new password alone must still count as a change.
        for (key, a, b) in [
            ("amqp.url", &self.amqp.url, &other.amqp.url),
            ("redis.url", &self.redis.url, &other.redis.url),
        ] {
            if a != b && !changed.iter().any(|c| c == key) {
                changed.push(key.to_owned());
            }
        }
        for (key, a, b) in [
            ("amqp.urls", &self.amqp.urls, &other.amqp.urls),
            ("redis.nodes", &self.redis.nodes, &other.redis.nodes),
            (
                "redis.sentinels",
                &self.redis.sentinels,
                &other.redis.sentinels,
            ),
        ] {
            if a != b && !changed.iter().any(|c| c == key) {
                changed.push(key.to_owned());
            }
        }
        changed
    }

    /// `text` with every password of the configured URLs removed.
    pub fn scrub(&self, text: &str) -> String {
        scrub(text, &self.urls())
    }
}

/// `text` without the quoted source lines of a parser's error (`12 | url = "…"` and the
/// `|   ^` markers below them).
fn without_source_lines(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|line| {
            let digits = line.trim_start_matches(|c: char| c.is_ascii_digit());
            !line.is_empty() && !digits.trim_start().starts_with('|')
        })
        .collect::<Vec<_>>()
        .join(": ")
}

fn describe_figment_error(error: figment::Error) -> String {
    // figment chains one error per failing key; the first is the one to fix first.
    let first = error.into_iter().next();
    match first {
        Some(e) => {
            let key = e.path.join(".");
            let mut text = match &e.kind {
                figment::error::Kind::UnknownField(field, expected) => format!(
                    "unknown key `{field}`; this section accepts {}",
                    expected.join(", ")
                ),
                figment::error::Kind::UnknownVariant(found, expected) => {
                    format!("`{found}` is not one of {}", expected.join(", "))
                }
                // A parse error quotes the offending line of the file, which may hold a
                // password no URL parser can delimit (a stray quote in it): keep only
                // where the error is and what it is.
                kind => without_source_lines(&kind.to_string()),
            };
            if !key.is_empty() {
                text = format!("configuration key `{key}`: {text}");
            }
            let from_env = e
                .metadata
                .as_ref()
                .is_some_and(|m| m.name.contains("environment"));
            if from_env {
                let var: Vec<String> = e.path.iter().map(|p| p.to_uppercase()).collect();
                text.push_str(&format!(
                    " (from environment variable {ENV_PREFIX}{})",
                    var.join("__")
                ));
            } else if let Some(source) = e.metadata.as_ref().and_then(|m| m.source.as_ref()) {
                text.push_str(&format!(" (from {source})"));
            }
            text
        }
        None => "the configuration is invalid".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> Env {
        Env::prefixed("KONSTRUCT_GATE_TEST_UNSET_PREFIX__").split("__")
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::load_with_env(None, no_env()).unwrap();
        assert_eq!(c.amqp.inbound_queue, "konstruct.inbound");
        assert_eq!(c.amqp.orchestrator_queue, "konstruct.orchestrator");
        assert_eq!(c.amqp.notification_queue, "konstruct.notifications");
        assert_eq!(c.amqp.dead_letter_queue, "konstruct.dead-letter");
        assert_eq!(c.amqp.prefetch, 256);
        assert!(c.amqp.declare_queues);
        assert_eq!(c.redis.key_prefix, "");
        assert_eq!(c.limits.requests, 30);
        assert_eq!(c.limits.window_seconds, 60);
        assert_eq!(c.limits.max_message_bytes, 1_048_576);
        assert_eq!(c.http.listen.to_string(), "127.0.0.1:9464");
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn the_shipped_default_file_equals_the_built_in_defaults() {
        let shipped = Config::from_toml_str(include_str!("../../config/default.toml")).unwrap();
        assert_eq!(
            shipped.to_redacted_toml(),
            Config::default().to_redacted_toml()
        );
    }

    #[test]
    fn the_example_file_is_valid() {
        let example = Config::from_toml_str(include_str!("../../config/example.toml")).unwrap();
        assert!(!example.limits.overrides.is_empty());
    }

    #[test]
    fn unknown_key_is_refused_by_name() {
        let err = Config::from_toml_str("[amqp]\nprefech = 10\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("prefech"), "{text}");
    }

    #[test]
    fn bad_value_is_refused_by_name() {
        let err = Config::from_toml_str("[limits]\nrequests = \"many\"\n").unwrap_err();
        assert!(err.to_string().contains("limits.requests"), "{err}");
        let err = Config::from_toml_str("[limits]\nrequests = 0\n").unwrap_err();
        assert!(err.to_string().contains("limits.requests"), "{err}");
        let err = Config::from_toml_str("[log]\nformat = \"xml\"\n").unwrap_err();
        assert!(err.to_string().contains("log.format"), "{err}");
        let err = Config::from_toml_str("[[limits.overrides]]\ntenant = \"-bad\"\n").unwrap_err();
        assert!(
            err.to_string().contains("limits.overrides[0].tenant"),
            "{err}"
        );
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure returns figment::Error
    fn environment_overrides_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("gate.toml", "[limits]\nrequests = 5\nwindow_seconds = 7\n")?;
            jail.set_env("KONSTRUCT_GATE__LIMITS__REQUESTS", "9");
            jail.set_env(
                "KONSTRUCT_GATE__AMQP__URL",
                "amqp://u:hunter2@rabbit:5672/%2f",
            );
            let c = Config::load(Some(Path::new("gate.toml"))).unwrap();
            assert_eq!(c.limits.requests, 9);
            assert_eq!(c.limits.window_seconds, 7);
            assert_eq!(c.amqp.url.expose(), "amqp://u:hunter2@rabbit:5672/%2f");
            let printed = c.to_redacted_toml();
            assert!(!printed.contains("hunter2"), "{printed}");
            assert!(
                printed.contains("amqp://u:***@rabbit:5672/%2f"),
                "{printed}"
            );
            Ok(())
        });
    }

    #[test]
    fn changed_keys_name_each_difference() {
        let a = Config::default();
        let mut b = a.clone();
        b.limits.max_message_bytes = 10;
        b.limits.notify = Notify::Every;
        b.amqp.prefetch = 10;
        b.redis.url = SecretUrl::new("redis://:other@127.0.0.1:6379/0");
        assert_eq!(
            a.changed_keys(&b),
            vec![
                "amqp.prefetch",
                "limits.max_message_bytes",
                "limits.notify",
                "redis.url"
            ]
        );
        assert!(a.changed_keys(&a.clone()).is_empty());
    }

    #[test]
    fn a_missing_file_is_an_error() {
        let err =
            Config::load_with_env(Some(Path::new("/nonexistent/gate.toml")), no_env()).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/gate.toml"));
    }

    #[test]
    fn no_password_shows_from_a_url_without_scheme_slashes_a_query_or_a_toml_error() {
        for (toml, secret) in [
            (
                "[amqp]\nurl = \"amqp:/gate:Pq9secret@rabbit/\"\n",
                "Pq9secret",
            ),
            (
                "[amqp]\nurl = \"amqp:gate:Pq9secret@rabbit\"\n",
                "Pq9secret",
            ),
            (
                "[redis]\nurl = \"redis+unix:///run/redis.sock?pass=Pq9secret\"\n",
                "Pq9secret",
            ),
            (
                "[amqp]\nurl = \"amqp://gate:ab\\qPq9secret@rabbit\"\n",
                "Pq9secret",
            ),
            (
                "[amqp]\nurl = [\"amqp://gate:Pq9secret@rabbit\"]\n",
                "Pq9secret",
            ),
            (
                "[amqp]\nurl = \"amqp://gate:Pq9\"secret@rabbit\"\n",
                "secret",
            ),
            (
                "[redis]\nurl = \"redis://h/0?PASS=Pq9secret\"\n",
                "Pq9secret",
            ),
            (
                "[redis]\nurl = \"redis://h/0?p%61ss=Pq9secret\"\n",
                "Pq9secret",
            ),
        ] {
            let shown = match Config::from_toml_str(toml) {
                Ok(c) => c.to_redacted_toml(),
                Err(e) => e.to_string(),
            };
            assert!(!shown.contains(secret), "{toml} shows: {shown}");
        }
        assert_eq!(
            redact_url("redis://h:6379/0?protocol=resp3&password=hunter2"),
            "redis://h:6379/0?protocol=resp3&password=***"
        );
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure returns figment::Error
    fn a_password_file_replaces_the_urls_password_and_never_prints() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("amqp-password", "s3cr@t/pw\n")?;
            jail.create_file("redis-password", "r3dis-pw")?;
            jail.create_file(
                "gate.toml",
                "[amqp]\nurl = \"amqp://gate@rabbit:5672/%2f\"\npassword_file = \"amqp-password\"\n\
                 [redis]\nurl = \"redis://:old@cache:6379/0\"\npassword_file = \"redis-password\"\n",
            )?;
            let c = Config::load(Some(Path::new("gate.toml"))).unwrap();
            assert_eq!(
                c.amqp.url.expose(),
                "amqp://gate:s3cr%40t%2Fpw@rabbit:5672/%2f"
            );
            assert_eq!(c.redis.url.expose(), "redis://:r3dis-pw@cache:6379/0");
            let printed = c.to_redacted_toml();
            assert!(
                !printed.contains("s3cr") && !printed.contains("r3dis"),
                "{printed}"
            );
            jail.set_env("KONSTRUCT_GATE__REDIS__PASSWORD_FILE", "/no/such/secret");
            let err = Config::load(Some(Path::new("gate.toml")))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("redis.password_file") && err.contains("/no/such/secret"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure returns figment::Error
    fn lists_come_comma_separated_from_the_environment_and_take_the_password_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("redis-password", "n0des-pw\n")?;
            jail.create_file(
                "gate.toml",
                "[redis]\nmode = \"cluster\"\npassword_file = \"redis-password\"\n",
            )?;
            jail.set_env(
                "KONSTRUCT_GATE__REDIS__NODES",
                "redis://10.0.0.1:6379, redis://10.0.0.2:6379",
            );
            jail.set_env(
                "KONSTRUCT_GATE__AMQP__URLS",
                "amqp://u:pw1@a:5672/%2f,amqp://u:pw2@b:5672/%2f",
            );
            let c = Config::load(Some(Path::new("gate.toml"))).unwrap();
            let nodes: Vec<&str> = c.redis.nodes.iter().map(SecretUrl::expose).collect();
            assert_eq!(
                nodes,
                [
                    "redis://:n0des-pw@10.0.0.1:6379",
                    "redis://:n0des-pw@10.0.0.2:6379"
                ]
            );
            assert_eq!(c.amqp.addresses().len(), 2);
            assert_eq!(c.amqp.addresses()[1].0, "amqp.urls[1]");
            let printed = c.to_redacted_toml();
            for secret in ["n0des", "pw1", "pw2"] {
                assert!(!printed.contains(secret), "{printed}");
            }
            Ok(())
        });
    }

    #[test]
    fn numbers_out_of_range_are_refused_by_name() {
        for (toml, key) in [
            (
                "[limits]\nrequests = 100000000000000000\n",
                "limits.requests",
            ),
            (
                "[limits]\nwindow_seconds = 31622401\n",
                "limits.window_seconds",
            ),
            ("[limits]\nburst = 1000000001\n", "limits.burst"),
            (
                "[limits]\nmax_message_bytes = 134217729\n",
                "limits.max_message_bytes",
            ),
            (
                "[amqp]\nshutdown_grace_seconds = 9223372036854775807\n",
                "amqp.shutdown_grace_seconds",
            ),
            ("[amqp]\nprefetch = 65536\n", "amqp.prefetch"),
            ("[redis]\ntimeout_ms = 60001\n", "redis.timeout_ms"),
            (
                "[[limits.overrides]]\ntenant = \"acme\"\nrequests = 1000000001\n",
                "limits.overrides[0].requests",
            ),
        ] {
            let err = Config::from_toml_str(toml).unwrap_err().to_string();
            assert!(err.contains(key), "{toml}: {err}");
        }
        let edge = "[limits]\nrequests = 1000000000\nwindow_seconds = 31622400\n\
                    max_message_bytes = 134217728\n[amqp]\nshutdown_grace_seconds = 3600\n";
        Config::from_toml_str(edge).expect("the bounds themselves are accepted");
    }
}
