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

    /// Counts each (key, rule) and decides, all in one pipelined round trip. A result per
    /// check: a failed pipeline fails every check; a failed script fails only its own.
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
        let mut values = self.eval_all(&mut conn, checks.iter()).await?;
        // After a Redis restart the script cache is empty: load it once and rerun the
        // checks that were refused. NOSCRIPT means the script did not run, so nothing was
        // counted twice.
        let missing: Vec<usize> = (0..values.len())
            .filter(
                |&i| matches!(&values[i], redis::Value::ServerError(e) if e.code() == "NOSCRIPT"),
            )
            .collect();
        if !missing.is_empty() {
            self.fixed_window.load_async(&mut conn).await?;
            let again = self
                .eval_all(&mut conn, missing.iter().map(|&i| &checks[i]))
                .await?;
            for (i, value) in missing.into_iter().zip(again) {
                values[i] = value;
            }
        }
        Ok(values
            .into_iter()
            .zip(checks)
            .map(|(value, (_, rule))| match value {
                redis::Value::ServerError(e) => Err(LimitError::Redis(e.into())),
                value => redis::from_redis_value::<(u64, i64)>(value)
                    .map(|(count, pttl_ms)| Decision::fixed_window(*rule, count, pttl_ms))
                    .map_err(|e| LimitError::Shared(e.to_string())),
            })
            .collect())
    }

    async fn eval_all<'a>(
        &self,
        conn: &mut ConnectionManager,
        checks: impl Iterator<Item = &'a (String, Rule)>,
    ) -> redis::RedisResult<Vec<redis::Value>> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for (key, rule) in checks {
            pipe.cmd("EVALSHA")
                .arg(self.fixed_window.get_hash())
                .arg(1)
                .arg(key)
                .arg(rule.window_seconds);
        }
        pipe.query_async(conn).await
    }

    /// True when Redis answers a PING within the check timeout.
    pub async fn ping(&self) -> bool {
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        matches!(tokio::time::timeout(self.timeout, ping).await, Ok(Ok(_)))
    }
}
