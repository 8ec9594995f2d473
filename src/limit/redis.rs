//! The Redis side of a check: one script call per message on one multiplexed connection
//! that every in-flight message shares, and that re-establishes itself after a failure.

use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};

use super::{Decision, Rule};
use crate::config::RedisConfig;
use crate::telemetry::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis failed: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Runs rate-limit checks. Cheap to clone: clones share one connection.
#[derive(Clone)]
pub struct Limiter {
    conn: ConnectionManager,
    fixed_window: Script,
    timeout: Duration,
    metrics: Metrics,
}

impl Limiter {
    /// Builds the client without connecting: the gate starts (and reports not ready) while
    /// Redis is down, and connects on first use.
    pub fn new(config: &RedisConfig, metrics: Metrics) -> Result<Self, LimitError> {
        let client = Client::open(config.url.expose())?;
        let timeout = Duration::from_millis(config.timeout_ms);
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout.max(Duration::from_secs(1))))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config)?;
        Ok(Self {
            conn,
            fixed_window: Script::new(include_str!("fixed_window.lua")),
            timeout,
            metrics,
        })
    }

    /// Counts one message against `key` and decides, in one round trip.
    pub async fn check(&self, key: &str, rule: Rule) -> Result<Decision, LimitError> {
        let started = Instant::now();
        let mut conn = self.conn.clone();
        let mut invocation = self.fixed_window.key(key);
        invocation.arg(rule.window_seconds);
        let call = invocation.invoke_async::<(u64, i64)>(&mut conn);
        let result = tokio::time::timeout(self.timeout, call).await;
        self.metrics.redis_check_seconds.record(started.elapsed());
        let (count, pttl_ms) = result.map_err(|_| LimitError::Timeout(self.timeout))??;
        Ok(Decision::fixed_window(rule, count, pttl_ms))
    }

    /// True when Redis answers a PING within the check timeout.
    pub async fn ping(&self) -> bool {
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        matches!(tokio::time::timeout(self.timeout, ping).await, Ok(Ok(_)))
    }
}
