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
    #[error("redis failed: {0}")]
    Shared(String),
}

impl LimitError {
    /// A copy for each check of a failed pipeline.
    fn shared(&self) -> LimitError {
        LimitError::Shared(self.to_string())
    }
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

    /// Counts each (key, rule) and decides, all in one script call and one round trip.
    /// A result per check; when the call fails, every check fails.
    pub async fn check_batch(
        &self,
        checks: &[(String, Rule)],
    ) -> Vec<Result<Decision, LimitError>> {
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, self.run_pipeline(checks)).await;
        self.metrics.redis_check_seconds.record(started.elapsed());
        match result {
            Err(_) => (0..checks.len())
                .map(|_| Err(LimitError::Timeout(self.timeout)))
                .collect(),
            Ok(Err(e)) => {
                let e = LimitError::from(e);
                (0..checks.len()).map(|_| Err(e.shared())).collect()
            }
            Ok(Ok(results)) => results,
        }
    }

    async fn run_pipeline(
        &self,
        checks: &[(String, Rule)],
    ) -> redis::RedisResult<Vec<Result<Decision, LimitError>>> {
        let mut conn = self.conn.clone();
        let mut invocation = self.fixed_window.prepare_invoke();
        for (key, rule) in checks {
            invocation.key(key).arg(rule.window_seconds);
        }
        // EVALSHA, and after a Redis restart (empty script cache) SCRIPT LOAD and EVALSHA
        // again: NOSCRIPT means nothing ran, so nothing is counted twice.
        let flat: Vec<i64> = invocation.invoke_async(&mut conn).await?;
        if flat.len() != checks.len() * 2 {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Parse,
                "the rate-limit script returned an unexpected number of values",
            )));
        }
        Ok(flat
            .chunks_exact(2)
            .zip(checks)
            .map(|(pair, (_, rule))| {
                Ok(Decision::fixed_window(
                    *rule,
                    pair[0].max(0) as u64,
                    pair[1],
                ))
            })
            .collect())
    }

    /// True when Redis answers a PING within the check timeout.
    pub async fn ping(&self) -> bool {
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        matches!(tokio::time::timeout(self.timeout, ping).await, Ok(Ok(_)))
    }
}
