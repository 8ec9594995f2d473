//! The Redis side of a check: one script call per message on one multiplexed connection
//! that every in-flight message shares, and that re-establishes itself after a failure.

use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};

use super::{Check, Decision};
use crate::config::{Algorithm, RedisConfig};
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
    sliding_window: Script,
    token_bucket: Script,
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
            sliding_window: Script::new(include_str!("sliding_window.lua")),
            token_bucket: Script::new(include_str!("token_bucket.lua")),
            timeout,
            metrics,
        })
    }

    /// Counts each check and decides, in one round trip; the batch fails as a whole.
    pub async fn check_batch(&self, checks: &[Check]) -> Result<Vec<Decision>, LimitError> {
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, self.run_pipeline(checks)).await;
        self.metrics.redis_check_seconds.record(started.elapsed());
        Ok(result.map_err(|_| LimitError::Timeout(self.timeout))??)
    }

    /// One script call per algorithm present in the batch, sent together (the connection
    /// pipelines them), so a batch still costs one round trip.
    async fn run_pipeline(&self, checks: &[Check]) -> redis::RedisResult<Vec<Decision>> {
        let mut groups: [Vec<usize>; 3] = Default::default();
        for (i, check) in checks.iter().enumerate() {
            groups[algorithm_index(check.rule.algorithm)].push(i);
        }
        let (fixed, sliding, bucket) = futures::try_join!(
            self.fixed_window_group(checks, &groups[0]),
            self.timed_group(&self.sliding_window, checks, &groups[1]),
            self.timed_group(&self.token_bucket, checks, &groups[2]),
        )?;
        // Back into the order of `checks`: every index is in exactly one group.
        let mut out: Vec<Option<Decision>> = vec![None; checks.len()];
        for (indices, decisions) in [
            (&groups[0], fixed),
            (&groups[1], sliding),
            (&groups[2], bucket),
        ] {
            for (&i, decision) in indices.iter().zip(decisions) {
                out[i] = Some(decision);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    async fn fixed_window_group(
        &self,
        checks: &[Check],
        indices: &[usize],
    ) -> redis::RedisResult<Vec<Decision>> {
        if indices.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.fixed_window.prepare_invoke();
        for &i in indices {
            let check = &checks[i];
            invocation
                .key(&check.key)
                .arg(check.rule.window_seconds)
                .arg(check.rule.requests)
                .arg(&check.notify_tag)
                .arg(&check.message_id);
        }
        // EVALSHA, and after a Redis restart (empty script cache) SCRIPT LOAD and EVALSHA
        // again: NOSCRIPT means nothing ran, so nothing is counted twice.
        let mut conn = self.conn.clone();
        let flat: Vec<i64> = invocation.invoke_async(&mut conn).await?;
        expect_len(&flat, indices.len() * 3)?;
        Ok(flat
            .chunks_exact(3)
            .zip(indices)
            .map(|(v, &i)| {
                Decision::fixed_window(checks[i].rule, v[0].max(0) as u64, v[1], v[2] == 1)
            })
            .collect())
    }

    /// The sliding-window and token-bucket scripts, with Redis's own clock.
    async fn timed_group(
        &self,
        script: &Script,
        checks: &[Check],
        indices: &[usize],
    ) -> redis::RedisResult<Vec<Decision>> {
        if indices.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = script.prepare_invoke();
        invocation.arg("");
        for &i in indices {
            let Check {
                key,
                rule,
                notify_tag,
                message_id,
                ..
            } = &checks[i];
            invocation
                .key(key)
                .arg(rule.requests)
                .arg(rule.window_seconds * 1000);
            if rule.algorithm == Algorithm::TokenBucket {
                invocation.arg(rule.burst);
            }
            invocation.arg(notify_tag).arg(message_id);
        }
        let mut conn = self.conn.clone();
        let flat: Vec<i64> = invocation.invoke_async(&mut conn).await?;
        expect_len(&flat, indices.len() * 5)?;
        Ok(flat
            .chunks_exact(5)
            .zip(indices)
            .map(|(v, &i)| Decision::from_script(v, checks[i].rule))
            .collect())
    }

    /// Every field of a hash (the live overrides), within the check timeout.
    pub async fn hash(
        &self,
        key: &str,
    ) -> Result<std::collections::HashMap<String, String>, LimitError> {
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("HGETALL").arg(key).to_owned();
        match tokio::time::timeout(self.timeout, cmd.query_async(&mut conn)).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(LimitError::Timeout(self.timeout)),
        }
    }

    /// True when Redis answers a PING within the check timeout.
    pub async fn ping(&self) -> bool {
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        matches!(tokio::time::timeout(self.timeout, ping).await, Ok(Ok(_)))
    }
}

fn algorithm_index(algorithm: Algorithm) -> usize {
    match algorithm {
        Algorithm::FixedWindow => 0,
        Algorithm::SlidingWindow => 1,
        Algorithm::TokenBucket => 2,
    }
}

fn expect_len(values: &[i64], len: usize) -> redis::RedisResult<()> {
    if values.len() == len {
        Ok(())
    } else {
        Err(redis::RedisError::from((
            redis::ErrorKind::Parse,
            "a rate-limit script returned an unexpected number of values",
        )))
    }
}
