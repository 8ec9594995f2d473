//! `[amqp]`: the brokers, the four queues, and how long the gate waits on the broker.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::secret::{SecretUrl, check_url_shape, list_or_commas, scrub};
use super::tls::{TlsFiles, same_scheme};
use super::{
    ConfigError, MAX_CONFIRM_TIMEOUT_MS, MAX_DELIVERY_LIMIT, MAX_HEARTBEAT_SECONDS,
    MAX_SHUTDOWN_GRACE_SECONDS,
};

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    pub url: SecretUrl,
    /// The nodes of a RabbitMQ cluster, used instead of `url` when set: each session
    /// connects to the next one that answers, starting from a random one so that
    /// instances spread over the nodes.
    #[serde(
        default,
        deserialize_with = "list_or_commas",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub urls: Vec<SecretUrl>,
    /// A private CA and a client certificate for `amqps://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFiles>,
    /// A file holding the password (a mounted Kubernetes secret): it replaces the URL's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    pub inbound_queue: String,
    pub orchestrator_queue: String,
    pub notification_queue: String,
    pub dead_letter_queue: String,
    /// Unacknowledged deliveries the broker may push to one consumer; also the number of
    /// messages processed concurrently.
    pub prefetch: u16,
    /// Declare all four queues as durable at start-up (and after every reconnect), so a
    /// fresh broker works without a separate provisioning step.
    pub declare_queues: bool,
    /// Queue type used when declaring queues.
    pub queue_type: QueueType,
    /// With quorum queues: deliveries after which a message that keeps failing is
    /// dead-lettered by the broker instead of looping forever.
    pub delivery_limit: u32,
    /// Seconds in-flight messages get to finish after SIGTERM before they are handed back.
    pub shutdown_grace_seconds: u64,
    /// How long a publish may wait for the broker's confirm; then the message is handed
    /// back and the session starts over.
    pub confirm_timeout_ms: u64,
    /// The AMQP heartbeat offered to the broker (it may negotiate lower). A connection
    /// silent for two intervals is given up and the session starts over, so a silently
    /// dead connection (a half-open TCP path) costs about twice this. 0 takes the
    /// broker's value.
    pub heartbeat_seconds: u16,
    /// 0: the one inbound queue. N (1 to 1024): also an `x-consistent-hash` exchange named
    /// like the inbound queue and N shard queues `{inbound_queue}.{k}` behind it, all
    /// consumed (see `crate::shards`).
    pub inbound_shards: u16,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: SecretUrl::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            urls: Vec::new(),
            tls: None,
            password_file: None,
            inbound_queue: "konstruct.inbound".into(),
            orchestrator_queue: "konstruct.orchestrator".into(),
            notification_queue: "konstruct.notifications".into(),
            dead_letter_queue: "konstruct.dead-letter".into(),
            prefetch: 256,
            declare_queues: true,
            queue_type: QueueType::Classic,
            delivery_limit: 20,
            shutdown_grace_seconds: 15,
            confirm_timeout_ms: 30_000,
            heartbeat_seconds: 5,
            inbound_shards: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueType {
    Classic,
    Quorum,
}

impl AmqpConfig {
    /// The brokers to connect to, each with the key that names it: `urls`, else `url`.
    pub fn addresses(&self) -> Vec<(String, &SecretUrl)> {
        if self.urls.is_empty() {
            vec![("amqp.url".to_owned(), &self.url)]
        } else {
            self.urls
                .iter()
                .enumerate()
                .map(|(i, url)| (format!("amqp.urls[{i}]"), url))
                .collect()
        }
    }

    /// Checks `[amqp]` on its own, naming the first bad key.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.check_brokers()?;
        self.check_queues()?;
        self.check_numbers()
    }

    /// Every broker URL parses, and TLS is asked for only where a URL uses it.
    fn check_brokers(&self) -> Result<(), ConfigError> {
        for (key, url) in self.addresses() {
            check_url_shape(&key, url)?;
            if let Err(e) = url.expose().parse::<lapin::uri::AMQPUri>() {
                return Err(ConfigError(format!(
                    "{key} is not a valid AMQP URL ({url}): {}",
                    scrub(&e.to_string(), &[url])
                )));
            }
        }
        same_scheme("amqp.urls", &self.urls)?;
        if let Some(tls) = &self.tls {
            tls.validate("amqp.tls")?;
            if !self
                .addresses()
                .iter()
                .any(|(_, url)| url.expose().starts_with("amqps://"))
            {
                return Err(ConfigError(
                    "amqp.tls is set, but no broker URL is amqps://; use amqps:// for TLS".into(),
                ));
            }
        }
        Ok(())
    }

    fn check_queues(&self) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(ConfigError(msg));
        for (key, name) in [
            ("amqp.inbound_queue", &self.inbound_queue),
            ("amqp.orchestrator_queue", &self.orchestrator_queue),
            ("amqp.notification_queue", &self.notification_queue),
            ("amqp.dead_letter_queue", &self.dead_letter_queue),
        ] {
            if name.is_empty() || name.len() > 255 {
                return fail(format!("{key} must be a queue name of 1 to 255 bytes"));
            }
        }
        // The defer ladder's queues are named after the inbound queue.
        let longest = crate::ladder::DEFER_STEPS[crate::ladder::DEFER_STEPS.len() - 1];
        let longest_step = crate::ladder::step_queue("", self.inbound_shards > 0, longest);
        if self.inbound_queue.len() > 255 - longest_step.len() {
            return fail(format!(
                "amqp.inbound_queue must be at most {} bytes, so that its defer queues (<inbound_queue>{longest_step}) stay within 255",
                255 - longest_step.len()
            ));
        }
        if self.inbound_shards > crate::shards::MAX_SHARDS {
            return fail(format!(
                "amqp.inbound_shards = {} is out of range (0 for one queue, or 1 to {})",
                self.inbound_shards,
                crate::shards::MAX_SHARDS
            ));
        }
        // A shard named like an output queue would loop its messages.
        let shard_of_inbound = |name: &str| {
            name.strip_prefix(self.inbound_queue.as_str())
                .and_then(|rest| rest.strip_prefix('.'))
                .is_some_and(|k| k.parse::<u16>().is_ok())
        };
        for (key, name) in [
            ("amqp.orchestrator_queue", &self.orchestrator_queue),
            ("amqp.notification_queue", &self.notification_queue),
            ("amqp.dead_letter_queue", &self.dead_letter_queue),
        ] {
            if shard_of_inbound(name) {
                return fail(format!(
                    "{key} ({name}) is named like a shard of amqp.inbound_queue (<inbound_queue>.<k>), so messages could loop"
                ));
            }
        }
        if [
            &self.orchestrator_queue,
            &self.notification_queue,
            &self.dead_letter_queue,
        ]
        .contains(&&self.inbound_queue)
        {
            return fail(
                "amqp.inbound_queue must differ from the output queues, or messages would loop"
                    .into(),
            );
        }
        Ok(())
    }

    fn check_numbers(&self) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(ConfigError(msg));
        if self.prefetch == 0 {
            return fail("amqp.prefetch must be at least 1".into());
        }
        if self.delivery_limit == 0 {
            return fail("amqp.delivery_limit must be at least 1".into());
        }
        if self.delivery_limit > MAX_DELIVERY_LIMIT {
            return fail(format!(
                "amqp.delivery_limit = {} is out of range (at most {MAX_DELIVERY_LIMIT})",
                self.delivery_limit
            ));
        }
        if self.shutdown_grace_seconds > MAX_SHUTDOWN_GRACE_SECONDS {
            return fail(format!(
                "amqp.shutdown_grace_seconds = {} is out of range (at most {MAX_SHUTDOWN_GRACE_SECONDS})",
                self.shutdown_grace_seconds
            ));
        }
        if !(100..=MAX_CONFIRM_TIMEOUT_MS).contains(&self.confirm_timeout_ms) {
            return fail(format!(
                "amqp.confirm_timeout_ms = {} is out of range (100 to {MAX_CONFIRM_TIMEOUT_MS})",
                self.confirm_timeout_ms
            ));
        }
        if self.heartbeat_seconds > MAX_HEARTBEAT_SECONDS {
            return fail(format!(
                "amqp.heartbeat_seconds = {} is out of range (0 to {MAX_HEARTBEAT_SECONDS})",
                self.heartbeat_seconds
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn an_inbound_queue_leaves_room_for_its_defer_queues() {
        let toml = |n: usize| format!("[amqp]\ninbound_queue = \"{}\"\n", "q".repeat(n));
        Config::from_toml_str(&toml(244)).unwrap();
        let err = Config::from_toml_str(&toml(245)).unwrap_err().to_string();
        assert!(
            err.contains("amqp.inbound_queue must be at most 244 bytes"),
            "{err}"
        );
    }
}
