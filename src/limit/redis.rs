//! The Redis side of a check: one script call per algorithm per batch on one multiplexed
//! connection that every batch shares, and that re-establishes itself after a failure.
//!
//! Every check gets an answer of its own: a key that Redis cannot count (a counter someone
//! `SET` to text, a wrong type, a value out of range) fails only its own check.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script, Value};

use super::{Answer, Check, Decision};
use crate::config::{Algorithm, RedisConfig};
use crate::telemetry::Metrics;

/// Why Redis could not decide a check.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CheckError {
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// The call failed as a whole: connection, script or protocol.
    #[error("redis failed: {0}")]
    Redis(Arc<str>),
    /// Redis answered, but could not count this one key.
    #[error("key {key} cannot be counted: {reason}")]
    Key { key: String, reason: String },
}

impl CheckError {
    /// True when Redis itself answered and only this key is at fault: says nothing about
    /// whether Redis is healthy.
    pub fn is_key_error(&self) -> bool {
        matches!(self, CheckError::Key { .. })
    }
}

impl From<redis::RedisError> for CheckError {
    fn from(e: redis::RedisError) -> Self {
        CheckError::Redis(e.to_string().into())
    }
}

/// Failures of the client itself, outside the checks.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis failed: {0}")]
    Redis(#[from] redis::RedisError),
}

/// The answer for each check of a batch, in order.
pub type Checked = Vec<Result<Answer, CheckError>>;

/// Runs rate-limit checks. Cheap to clone: clones share one connection.
#[derive(Clone)]
pub struct Limiter {
    conn: ConnectionManager,
    fixed_window: Script,
    sliding_window: Script,
    token_bucket: Script,
    mark_forwarded: Script,
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
            mark_forwarded: Script::new(include_str!("mark_forwarded.lua")),
            timeout,
            metrics,
        })
    }

    /// Counts each check and decides, in one round trip. One script call per algorithm
    /// present in the batch, sent together (the connection pipelines them); a call that
    /// fails as a whole fails the checks it carried, and no other.
    pub async fn check_batch(&self, checks: &[&Check]) -> Checked {
        let started = Instant::now();
        let mut groups: [Vec<usize>; 3] = Default::default();
        for (i, check) in checks.iter().enumerate() {
            groups[algorithm_index(check.rule.algorithm)].push(i);
        }
        let answers = futures::join!(
            self.timed(self.group(&self.fixed_window, checks, &groups[0])),
            self.timed(self.group(&self.sliding_window, checks, &groups[1])),
            self.timed(self.group(&self.token_bucket, checks, &groups[2])),
        );
        self.metrics.redis_check_seconds.record(started.elapsed());
        // Back into the order of `checks`: every index is in exactly one group.
        let mut out: Vec<Option<Result<Answer, CheckError>>> = vec![None; checks.len()];
        for (indices, answers) in groups.iter().zip([answers.0, answers.1, answers.2]) {
            match answers {
                Ok(answers) => {
                    for (&i, answer) in indices.iter().zip(answers) {
                        out[i] = Some(answer);
                    }
                }
                Err(e) => {
                    for &i in indices {
                        out[i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        out.into_iter()
            .map(|a| a.expect("every check is in one group"))
            .collect()
    }

    async fn timed<F>(&self, call: F) -> Result<Checked, CheckError>
    where
        F: Future<Output = Result<Checked, CheckError>>,
    {
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| CheckError::Timeout(self.timeout))?
    }

    /// One script call for the checks at `indices` (all of one algorithm).
    async fn group(
        &self,
        script: &Script,
        checks: &[&Check],
        indices: &[usize],
    ) -> Result<Checked, CheckError> {
        let Some(&first) = indices.first() else {
            return Ok(Vec::new());
        };
        let algorithm = checks[first].rule.algorithm;
        let mut invocation = script.prepare_invoke();
        if algorithm != Algorithm::FixedWindow {
            invocation.arg("");
        }
        for &i in indices {
            let Check {
                key,
                rule,
                notify_tag,
                message_id,
                ..
            } = checks[i];
            invocation.key(key);
            match algorithm {
                Algorithm::FixedWindow => invocation.arg(rule.window_seconds).arg(rule.requests),
                Algorithm::SlidingWindow => invocation
                    .arg(rule.requests)
                    .arg(rule.window_seconds.saturating_mul(1000)),
                Algorithm::TokenBucket => invocation
                    .arg(rule.requests)
                    .arg(rule.window_seconds.saturating_mul(1000))
                    .arg(rule.burst),
            };
            invocation.arg(notify_tag).arg(message_id);
        }
        // EVALSHA, and after a Redis restart (empty script cache) SCRIPT LOAD and EVALSHA
        // again: NOSCRIPT means nothing ran, so nothing is counted twice.
        let mut conn = self.conn.clone();
        let flat: Vec<Value> = invocation.invoke_async(&mut conn).await?;
        let width = if algorithm == Algorithm::FixedWindow {
            4
        } else {
            6
        };
        if flat.len() != indices.len() * width {
            return Err(CheckError::Redis(
                "a rate-limit script returned an unexpected number of values".into(),
            ));
        }
        Ok(flat
            .chunks_exact(width)
            .zip(indices)
            .map(|(values, &i)| answer(checks[i], values))
            .collect())
    }

    /// Notes, in the background, that the outputs of these checks' decisions were
    /// confirmed, so that a replay of one is known to be a duplicate. Best effort: a replay
    /// without the note is only less precise (no `x-ratelimit-replayed`), never wrong about
    /// the limit, so the batch does not wait for it (a redelivery comes after a reconnect,
    /// long after the note).
    pub fn mark_forwarded(&self, checks: &[&Check]) {
        if checks.is_empty() {
            return;
        }
        // Where each decision is kept: the fixed window's hash (field: the id), or the
        // other algorithms' string per id.
        let records: Vec<(String, String)> = checks
            .iter()
            .map(|check| match check.rule.algorithm {
                Algorithm::FixedWindow => (format!("{}:seen", check.key), check.message_id.clone()),
                Algorithm::SlidingWindow | Algorithm::TokenBucket => (
                    format!("{}:seen:{}", check.key, check.message_id),
                    String::new(),
                ),
            })
            .collect();
        let script = self.mark_forwarded.clone();
        let mut conn = self.conn.clone();
        let timeout = self.timeout;
        tokio::spawn(async move {
            let mut invocation = script.prepare_invoke();
            for (key, id) in &records {
                invocation.key(key).arg(id);
            }
            let call = invocation.invoke_async::<i64>(&mut conn);
            if let Ok(Err(e)) = tokio::time::timeout(timeout, call).await {
                tracing::debug!(error = %e, "could not mark forwarded decisions");
            }
        });
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

/// One key's values as a script returned them: `{"err", error text, …}` when the key
/// could not be counted, else the algorithm's numbers.
fn answer(check: &Check, values: &[Value]) -> Result<Answer, CheckError> {
    let text = |v: &Value| match v {
        Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Value::SimpleString(text) => text.clone(),
        other => format!("{other:?}"),
    };
    if matches!(&values[0], Value::BulkString(b) if b == b"err") {
        let reason = text(&values[1]);
        // Redis refuses a script's writes as a whole when it is out of memory, a replica
        // (READONLY) or cannot persist (MISCONF): that is Redis failing, not this key.
        if !is_key_fault(&reason) {
            return Err(CheckError::Redis(reason.into()));
        }
        return Err(CheckError::Key {
            key: check.key.clone(),
            reason,
        });
    }
    let numbers: Option<Vec<i64>> = values
        .iter()
        .map(|v| match v {
            Value::Int(n) => Some(*n),
            _ => None,
        })
        .collect();
    let Some(v) = numbers else {
        return Err(CheckError::Key {
            key: check.key.clone(),
            reason: "a rate-limit script returned a value that is not a number".into(),
        });
    };
    let rule = check.rule;
    let (decision, replayed) = match check.rule.algorithm {
        Algorithm::FixedWindow => (
            Decision::fixed_window(rule, v[0].max(0) as u64, v[1], v[2] == 1),
            v[3],
        ),
        Algorithm::SlidingWindow | Algorithm::TokenBucket => {
            (Decision::from_script(&v[..5], rule), v[5])
        }
    };
    let forwarded_before = replayed == 2;
    let mut decision = decision;
    // The user was told when the first rejection went out: no second reply.
    if let Decision::Rejected { notify_user, .. } = &mut decision {
        *notify_user &= !forwarded_before;
    }
    Ok(Answer {
        decision,
        replayed: replayed != 0,
        forwarded_before,
    })
}

/// Errors a script meets on one key's own data; anything else is Redis failing.
fn is_key_fault(reason: &str) -> bool {
    [
        "WRONGTYPE",
        "not an integer",
        "out of range",
        "overflow",
        "does not hold",
    ]
    .iter()
    .any(|fault| reason.contains(fault))
}

fn algorithm_index(algorithm: Algorithm) -> usize {
    match algorithm {
        Algorithm::FixedWindow => 0,
        Algorithm::SlidingWindow => 1,
        Algorithm::TokenBucket => 2,
    }
}
