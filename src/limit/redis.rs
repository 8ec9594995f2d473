//! The Redis side of a check: one script call per algorithm per batch on one multiplexed
//! connection that every batch shares, and that re-establishes itself after a failure.
//!
//! Every check gets an answer of its own: a key that Redis cannot count (a counter someone
//! `SET` to text, a wrong type, a value out of range) fails only its own check.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use std::borrow::Cow;
use std::collections::HashMap;

use redis::cluster_routing::Slot;
use redis::{Cmd, Value};

use super::store::{Failure, Lua, Store};
use super::{
    Answer, Check, Decision, Reserved, Rule, Scope, companion_base, composed_seen_key, is_line_tag,
    notified_key, seen_key,
};
use crate::config::{Algorithm, ConfigError, RedisConfig};
use crate::telemetry::Metrics;

/// How long a check waits for its cluster slot to settle during a reshard.
const CLUSTER_BUSY_BUDGET: Duration = super::store::CLUSTER_CALL_BUDGET;
const CLUSTER_CALL_TRY: Duration = super::store::CLUSTER_CALL_TRY;
const CLUSTER_BUSY_WAIT_MIN: Duration = Duration::from_millis(5);
const CLUSTER_BUSY_WAIT_MAX: Duration = Duration::from_millis(200);

/// Why Redis could not decide a check.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CheckError {
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// The call failed as a whole on the way: the connection broke or was refused.
    #[error("redis failed: {0}")]
    Unanswered(Arc<str>),
    /// The call failed as a whole, answered: out of memory, a replica, a script error.
    #[error("redis failed: {0}")]
    Redis(Arc<str>),
    /// A Redis Cluster's client gave up on one try of a call (a node slow to answer, or the
    /// call held back while the client learned a new slot map).
    #[error("redis failed: {0}")]
    Slow(Arc<str>),
    /// A Redis Cluster answered that the call's slot is on the move (TRYAGAIN, ASK,
    /// MOVED, CLUSTERDOWN) for longer than the limiter waits.
    #[error("redis cluster busy: {0}")]
    Busy(Arc<str>),
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

    /// How the call failed, for its connection; `None` when only the key is at fault.
    pub fn failure(&self) -> Option<Failure> {
        match self {
            CheckError::Timeout(_) | CheckError::Slow(_) => Some(Failure::Unanswered),
            CheckError::Unanswered(_) => Some(Failure::Broken),
            CheckError::Redis(_) | CheckError::Busy(_) => Some(Failure::Refused),
            CheckError::Key { .. } => None,
        }
    }
}

impl From<redis::RedisError> for CheckError {
    fn from(e: redis::RedisError) -> Self {
        if e.is_cluster_error() {
            return CheckError::Busy(e.to_string().into());
        }
        if e.is_timeout() {
            return CheckError::Slow(e.to_string().into());
        }
        match Failure::of(&e) {
            Failure::Unanswered | Failure::Broken => CheckError::Unanswered(e.to_string().into()),
            Failure::Refused => CheckError::Redis(e.to_string().into()),
        }
    }
}

/// Failures of the client itself, outside the checks.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis failed: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("{0}")]
    Config(#[from] ConfigError),
}

/// The check scripts as Redis runs them, each with the notice functions it shares
/// (`notice.lua`) in front.
pub const FIXED_WINDOW: &str =
    concat!(include_str!("notice.lua"), include_str!("fixed_window.lua"));
pub const SLIDING_WINDOW: &str = concat!(
    include_str!("notice.lua"),
    include_str!("sliding_window.lua")
);
pub const TOKEN_BUCKET: &str =
    concat!(include_str!("notice.lua"), include_str!("token_bucket.lua"));
pub const COMPOSED: &str = concat!(include_str!("notice.lua"), include_str!("composed.lua"));
pub const REFUND: &str = include_str!("refund.lua");
const CLAIM_NOTICE: &str = concat!(include_str!("notice.lua"), include_str!("claim_notice.lua"));

/// The answer for each check of a batch, in order.
pub type Checked = Vec<Result<Answer, CheckError>>;

/// Runs rate-limit checks. Cheap to clone: clones share one connection.
#[derive(Clone)]
pub struct Limiter {
    store: Store,
    fixed_window: Lua,
    sliding_window: Lua,
    token_bucket: Lua,
    composed: Lua,
    refund: Lua,
    mark_forwarded: Lua,
    claim_notice: Lua,
    timeout: Duration,
    metrics: Metrics,
    /// Redis's clock minus this machine's, in milliseconds, from the last probe: every gate
    /// reads one clock for the times it writes into messages.
    clock_offset: Arc<AtomicI64>,
}

impl Limiter {
    /// Builds the client without connecting: the gate starts (and reports not ready) while
    /// Redis is down, and connects on first use.
    pub fn new(config: &RedisConfig, metrics: Metrics) -> Result<Self, LimitError> {
        Ok(Self {
            store: Store::new(config)?,
            fixed_window: Lua::new(FIXED_WINDOW),
            sliding_window: Lua::new(SLIDING_WINDOW),
            token_bucket: Lua::new(TOKEN_BUCKET),
            composed: Lua::new(COMPOSED),
            refund: Lua::new(REFUND),
            claim_notice: Lua::new(CLAIM_NOTICE),
            mark_forwarded: Lua::new(include_str!("mark_forwarded.lua")),
            timeout: Duration::from_millis(config.timeout_ms),
            metrics,
            clock_offset: Arc::default(),
        })
    }

    /// Now by Redis's clock, in milliseconds since the Unix epoch (this machine's clock
    /// until the first probe answered).
    pub fn now_ms(&self) -> u64 {
        unix_ms().saturating_add_signed(self.clock_offset.load(Ordering::Relaxed))
    }

    /// Claims the right to tell a sender about a rejection (`notify = "once_per_window"`):
    /// true when nobody told them within `ttl_ms` before. `key` is the state's senders told
    /// (`notified_key`), `tag` the sender's. Fails open (true) when Redis cannot answer: a
    /// second reply is better than none.
    pub async fn claim_notice(&self, key: &str, tag: &str, ttl_ms: u64, message_id: &str) -> bool {
        // The marker holds the id that claimed it: that message's redelivery (its notice
        // was not confirmed, or its ack was lost) is still the one to tell.
        let claim = async {
            let mut conn = self.store.conn().await?;
            self.claim_notice
                .run::<i64>(&mut conn, |cmd| {
                    cmd.arg(1)
                        .arg(key)
                        .arg(tag)
                        .arg(ttl_ms.max(1))
                        .arg(message_id);
                })
                .await
        };
        !matches!(tokio::time::timeout(self.budget(), claim).await, Ok(Ok(0)))
    }

    /// Counts each check and decides, in one round trip. One script call per algorithm
    /// present in the batch (in a Redis Cluster: per algorithm and slot), all sent at once
    /// (the connection pipelines them); a call that fails as a whole fails the checks it
    /// carried, and no other.
    pub async fn check_batch(&self, checks: &[&Check]) -> Checked {
        if self.store.is_cluster() && checks.iter().any(|c| budget_of(c).is_some()) {
            return self.check_reserving(checks).await;
        }
        self.check_plain(checks).await
    }

    /// A Redis Cluster and some tenant budgets: a budget cannot share a slot with every
    /// (tenant, channel) counter of its tenant (those keys stay the router's), so it is
    /// decided first, in its own slot: the message's cost is reserved when it fits. The
    /// message's other limits are then decided as usual, with the budget's answer as given,
    /// and a reservation whose message was not let through (rejected by another limit, a
    /// replay, a duplicate, a failed call) is given back (`refund.lua`, to the same window
    /// only). Never over a budget; until a refund lands, or when a gate dies between the
    /// two phases, a budget counts a unit it did not let through.
    async fn check_reserving(&self, checks: &[&Check]) -> Checked {
        let budgeted: Vec<(usize, usize)> = checks
            .iter()
            .enumerate()
            .filter_map(|(i, c)| budget_of(c).map(|j| (i, j)))
            .collect();
        let reserves: Vec<Check> = budgeted
            .iter()
            .map(|&(i, j)| {
                let (check, budget) = (checks[i], &checks[i].also[j]);
                // Reserved under the message's id (a retry or a redelivery gets the same
                // reservation back, never a second one), else under an id of its own; the
                // record says which window the units were taken from.
                let id = match check.message_id.as_str() {
                    "" => format!(
                        "~reserve-{:016x}-{}",
                        crate::amqp::process_nonce(),
                        RESERVATIONS.fetch_add(1, Ordering::Relaxed)
                    ),
                    id => id.to_owned(),
                };
                Check {
                    key: budget.key.clone(),
                    rule: budget.rule,
                    notify_tag: String::new(),
                    message_id: id,
                    redelivered: false,
                    done_key: String::new(),
                    wait_ms: 0,
                    cost: check.cost,
                    also: Vec::new(),
                }
            })
            .collect();
        let refs: Vec<&Check> = reserves.iter().collect();
        let groups = self.groups(refs.iter().map(|c| (3, c.key.as_str())));
        let answers = futures::future::join_all(
            groups
                .iter()
                .map(|indices| self.timed(|| self.composed_group(&refs, indices))),
        )
        .await;
        let mut reserved: Vec<Option<Result<Answer, CheckError>>> = vec![None; refs.len()];
        for (indices, answers) in groups.iter().zip(answers) {
            match answers {
                Ok(answers) => {
                    for (&r, answer) in indices.iter().zip(answers) {
                        reserved[r] = Some(answer);
                    }
                }
                Err(e) => {
                    for &r in indices {
                        reserved[r] = Some(Err(e.clone()));
                    }
                }
            }
        }
        // The second phase, each budget's answer in place of the budget.
        let mut out: Vec<Option<Result<Answer, CheckError>>> = vec![None; checks.len()];
        let mut second: Vec<Check> = Vec::with_capacity(checks.len());
        let mut second_of: Vec<usize> = Vec::with_capacity(checks.len());
        let mut taken: Vec<Option<usize>> = vec![None; checks.len()];
        let mut r = 0;
        for (i, check) in checks.iter().enumerate() {
            let mut check = (*check).clone();
            if let Some(&(_, j)) = budgeted.get(r).filter(|(at, _)| *at == i) {
                let answer = reserved[r].take().expect("every reservation answered");
                let answer = match answer {
                    Ok(answer) => answer,
                    Err(e) => {
                        out[i] = Some(Err(e));
                        r += 1;
                        continue;
                    }
                };
                let reservation = match answer.decision {
                    Decision::Allowed {
                        remaining,
                        reset_after,
                        ..
                    } => {
                        // Only units this call took are given back: a reservation replayed
                        // from an earlier delivery belongs to that one's outcome.
                        if !answer.replayed {
                            taken[i] = Some(r);
                        }
                        Reserved {
                            ok: true,
                            remaining,
                            reset_ms: reset_after.saturating_mul(1000),
                            wait_ms: 0,
                        }
                    }
                    Decision::Rejected { retry_after, .. } => Reserved {
                        ok: false,
                        remaining: 0,
                        reset_ms: retry_after.saturating_mul(1000),
                        wait_ms: retry_after.saturating_mul(1000),
                    },
                };
                check.also[j].reserved = Some(reservation);
                r += 1;
            }
            second.push(check);
            second_of.push(i);
        }
        let refs: Vec<&Check> = second.iter().collect();
        let decided = self.check_plain(&refs).await;
        let mut refunds = Vec::new();
        for ((answer, &i), check) in decided.into_iter().zip(&second_of).zip(&second) {
            // Given back when the message was surely not let through by this call: decided
            // otherwise, or refused before the script ran. A call that timed out or broke
            // may have run and let it through: its reservation stays (the budget then falls
            // short, never over).
            let give_back = match &answer {
                Ok(a) => {
                    a.replayed || a.duplicate || matches!(a.decision, Decision::Rejected { .. })
                }
                Err(CheckError::Key { .. } | CheckError::Busy(_) | CheckError::Redis(_)) => true,
                Err(_) => false,
            };
            if let Some(r) = taken[i]
                && give_back
                && check.cost > 0
            {
                let budget = &reserves[r];
                let base = companion_base(budget.rule.algorithm, &budget.key);
                refunds.push(Refund {
                    key: budget.key.clone(),
                    seen: composed_seen_key(&base),
                    rule: budget.rule,
                    cost: check.cost,
                    id: budget.message_id.clone(),
                });
            }
            out[i] = Some(answer);
        }
        self.refund(refunds);
        out.into_iter()
            .map(|a| a.expect("every check answered"))
            .collect()
    }

    /// Gives reserved units back to tenant budgets (`refund.lua`), in the background: a
    /// refund that does not land leaves the budget counting a unit it did not let
    /// through, never one over.
    fn refund(&self, refunds: Vec<Refund>) {
        if refunds.is_empty() {
            return;
        }
        let groups = self.groups(refunds.iter().map(|r| (0, r.key.as_str())));
        let limiter = self.clone();
        tokio::spawn(async move {
            let (limiter, refunds) = (&limiter, &refunds);
            let calls = groups.iter().map(|indices| async move {
                let mut conn = limiter.store.conn().await?;
                let fill = |cmd: &mut Cmd| {
                    cmd.arg(indices.len() * 2);
                    for &i in indices {
                        cmd.arg(&refunds[i].key).arg(&refunds[i].seen);
                    }
                    for &i in indices {
                        let r = &refunds[i];
                        cmd.arg(algorithm_code(r.rule.algorithm))
                            .arg(r.cost)
                            .arg(r.rule.requests)
                            .arg(r.rule.window_seconds.saturating_mul(1000))
                            .arg(&r.id);
                    }
                };
                limiter.refund.run::<i64>(&mut conn, fill).await
            });
            let done =
                tokio::time::timeout(limiter.budget(), futures::future::join_all(calls)).await;
            match done {
                Ok(results) => {
                    for result in results {
                        match result {
                            Ok(given) => limiter
                                .metrics
                                .budget_refunds
                                .increment(given.max(0) as u64),
                            Err(e) => {
                                tracing::debug!(error = %e, "could not give reserved units back to a tenant budget")
                            }
                        }
                    }
                }
                Err(_) => tracing::debug!("giving reserved units back to tenant budgets timed out"),
            }
        });
    }

    /// Counts each check and decides, one script call per algorithm (and slot).
    async fn check_plain(&self, checks: &[&Check]) -> Checked {
        let started = Instant::now();
        let groups = self.groups(checks.iter().map(|c| (script_index(c), c.key.as_str())));
        let answers = futures::future::join_all(
            groups
                .iter()
                .map(|indices| self.timed(|| self.group(checks, indices))),
        )
        .await;
        self.metrics.redis_check_seconds.record(started.elapsed());
        // Back into the order of `checks`: every index is in exactly one group.
        let mut out: Vec<Option<Result<Answer, CheckError>>> = vec![None; checks.len()];
        // The worst failure of the batch: an unanswered call outweighs a refused one.
        let mut failed: Option<Failure> = None;
        let mut note = |e: &CheckError| {
            // The worst: broken, then unanswered, then refused.
            let rank = |f: Option<Failure>| match f {
                Some(Failure::Broken) => 3,
                Some(Failure::Unanswered) => 2,
                Some(Failure::Refused) => 1,
                None => 0,
            };
            let now = e.failure();
            if rank(now) > rank(failed) {
                failed = now;
            }
        };
        for (indices, answers) in groups.iter().zip(answers) {
            match answers {
                Ok(answers) => {
                    for (&i, answer) in indices.iter().zip(answers) {
                        if let Err(e) = &answer {
                            note(e);
                        }
                        out[i] = Some(answer);
                    }
                }
                Err(e) => {
                    note(&e);
                    for &i in indices {
                        out[i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        match failed {
            Some(failure) => self.store.call_failed(failure, started),
            None => self.store.call_answered(),
        }
        out.into_iter()
            .map(|a| a.expect("every check is in one group"))
            .collect()
    }

    /// The indices of `items` (a kind and a key each) grouped into script calls: by kind,
    /// and in a cluster also by slot, since one call may only touch keys of one slot.
    fn groups<'a>(&self, items: impl Iterator<Item = (usize, &'a str)>) -> Vec<Vec<usize>> {
        let cluster = self.store.is_cluster();
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut index: HashMap<(usize, Option<Slot>), usize> = HashMap::new();
        for (i, (kind, key)) in items.enumerate() {
            let slot = cluster.then(|| Slot::for_key(key));
            let group = *index.entry((kind, slot)).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[group].push(i);
        }
        groups
    }

    /// Runs `call` within the check timeout. A cluster that answers that the call's slot
    /// is on the move (a reshard) is Redis answering, not failing: the call is made again
    /// (it ran nowhere) until the slot has settled, within [`CLUSTER_BUSY_BUDGET`] and
    /// each try within the timeout.
    async fn timed<F, Fut>(&self, call: F) -> Result<Checked, CheckError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Checked, CheckError>>,
    {
        let started = Instant::now();
        let mut wait = CLUSTER_BUSY_WAIT_MIN;
        // A try that timed out may have run: its retry's replays are its own.
        let mut slow_tries = 0;
        // A cluster's client bounds each node's answer by the timeout itself, and the
        // whole call (redirects, a new slot map) by its budget.
        let budget = self.budget();
        let cluster = self.store.is_cluster();
        loop {
            let tried = Instant::now();
            // Each try within what is left of the budget.
            let result = tokio::time::timeout(budget.saturating_sub(started.elapsed()), call())
                .await
                .map_err(|_| CheckError::Timeout(budget))
                .and_then(|answers| answers);
            match result {
                Err(CheckError::Busy(_))
                    if cluster && started.elapsed() + wait < CLUSTER_BUSY_BUDGET =>
                {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(CLUSTER_BUSY_WAIT_MAX);
                }
                // A try of a cluster call that timed out may have been held back behind a
                // new slot map: made again once at once. After that, only on a fresh
                // connection: the client can wedge while it learns a new slot map during a
                // reshard (a slot refresh waiting for a lock that an unpolled reconnect
                // holds; valkey-glide moved to a synchronous lock for it), and a node that
                // stops answering (half-open) must not hold every batch for the whole
                // budget. The second timeout replaces the connection (other calls that
                // are answered do not make it healthy). (If a timed-out try ran after
                // all, a message with an id gets its first decision back; one without may
                // be counted twice.)
                Err(CheckError::Slow(_)) if cluster => {
                    self.store.call_failed(Failure::Unanswered, tried);
                    if slow_tries > 0 {
                        self.store.replace_soon();
                    }
                    let deadline = started + CLUSTER_BUSY_BUDGET;
                    let again = slow_tries == 0
                        || self
                            .store
                            .replaced_after(tried, deadline - CLUSTER_CALL_TRY)
                            .await;
                    if !again || Instant::now() + CLUSTER_CALL_TRY > deadline {
                        return result;
                    }
                    slow_tries += 1;
                }
                Ok(mut answers) if slow_tries > 0 => {
                    for answer in answers.iter_mut().flatten() {
                        if !answer.forwarded_before {
                            answer.replayed = false;
                        }
                    }
                    return Ok(answers);
                }
                other => return other,
            }
        }
    }

    /// How long one call may take in all: the timeout, or in a cluster (whose client bounds
    /// each node's answer by the timeout itself) the time to follow a moved slot.
    fn budget(&self) -> Duration {
        if self.store.is_cluster() {
            CLUSTER_BUSY_BUDGET
        } else {
            self.timeout
        }
    }

    /// A client of one server, for subscriptions.
    pub async fn subscriber(&self) -> redis::RedisResult<redis::Client> {
        self.store.subscriber().await
    }

    /// True for a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.store.is_cluster()
    }

    /// One script call for the checks at `indices` (all of one algorithm, and one slot).
    async fn group(&self, checks: &[&Check], indices: &[usize]) -> Result<Checked, CheckError> {
        let Some(&first) = indices.first() else {
            return Ok(Vec::new());
        };
        if checks[first].is_composed() {
            return self.composed_group(checks, indices).await;
        }
        let algorithm = checks[first].rule.algorithm;
        let script = match algorithm {
            Algorithm::FixedWindow => &self.fixed_window,
            Algorithm::SlidingWindow => &self.sliding_window,
            Algorithm::TokenBucket => &self.token_bucket,
        };
        // Every key a check touches, declared: its state, its decisions by id, and its
        // sender's notification marker.
        let keys: Vec<[Cow<'_, str>; 4]> = indices
            .iter()
            .map(|&i| {
                // A companion the script will not touch (no id, no sender tag) is declared
                // as the counter again: while a slot migrates, Redis answers TRYAGAIN to a
                // call with some of its keys missing.
                let check = checks[i];
                let key = Cow::Borrowed(check.key.as_str());
                let base = companion_base(algorithm, &check.key);
                let seen = match check.message_id.as_str() {
                    "" => key.clone(),
                    id => Cow::Owned(seen_key(algorithm, &base, id)),
                };
                let notified = match check.notify_tag.as_str() {
                    "" => key.clone(),
                    tag => Cow::Owned(notified_key(&base, tag)),
                };
                let done = match check.done_key.as_str() {
                    "" => key.clone(),
                    done => Cow::Borrowed(done),
                };
                [key, seen, notified, done]
            })
            .collect();
        let fill = |cmd: &mut Cmd| {
            cmd.arg(keys.len() * 4);
            for key in keys.iter().flatten() {
                cmd.arg(key.as_ref());
            }
            if algorithm != Algorithm::FixedWindow {
                cmd.arg("");
            }
            for &i in indices {
                let Check {
                    rule,
                    notify_tag,
                    message_id,
                    ..
                } = checks[i];
                match algorithm {
                    Algorithm::FixedWindow => cmd.arg(rule.window_seconds).arg(rule.requests),
                    Algorithm::SlidingWindow => cmd
                        .arg(rule.requests)
                        .arg(rule.window_seconds.saturating_mul(1000)),
                    Algorithm::TokenBucket => cmd
                        .arg(rule.requests)
                        .arg(rule.window_seconds.saturating_mul(1000))
                        .arg(rule.burst),
                };
                cmd.arg(notify_tag).arg(message_id);
            }
        };
        let mut conn = self.store.conn().await?;
        let flat: Vec<Value> = script.run(&mut conn, fill).await?;
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

    /// One call of the composing script (`composed.lua`) for checks with other limits or a
    /// cost other than 1.
    async fn composed_group(
        &self,
        checks: &[&Check],
        indices: &[usize],
    ) -> Result<Checked, CheckError> {
        let fill = |cmd: &mut Cmd| {
            let keys: usize = indices.iter().map(|&i| 4 + checks[i].also.len()).sum();
            cmd.arg(keys);
            for &i in indices {
                let check = checks[i];
                let algorithm = check.rule.algorithm;
                let key = check.key.as_str();
                let base = companion_base(algorithm, key);
                cmd.arg(key);
                match check.message_id.as_str() {
                    "" => cmd.arg(key),
                    _ => cmd.arg(composed_seen_key(&base)),
                };
                match check.notify_tag.as_str() {
                    tag if tag.is_empty() || is_line_tag(tag) => cmd.arg(key),
                    tag => cmd.arg(notified_key(&base, tag)),
                };
                match check.done_key.as_str() {
                    "" => cmd.arg(key),
                    done => cmd.arg(done),
                };
                for also in &check.also {
                    match also.reserved {
                        // Decided in its own slot already: the first key stands in.
                        Some(_) => cmd.arg(key),
                        None => cmd.arg(&also.key),
                    };
                }
            }
            cmd.arg("").arg(indices.len());
            for &i in indices {
                let check = checks[i];
                cmd.arg(1 + check.also.len())
                    .arg(check.cost)
                    .arg(&check.notify_tag)
                    .arg(&check.message_id);
                let limits = std::iter::once((check.rule, None))
                    .chain(check.also.iter().map(|a| (a.rule, a.reserved)));
                for (rule, reserved) in limits {
                    let window_ms = rule.window_seconds.saturating_mul(1000);
                    match reserved {
                        Some(r) => cmd
                            .arg("r")
                            .arg(u8::from(r.ok))
                            .arg(window_ms)
                            .arg(format!("{}:{}:{}", r.remaining, r.reset_ms, r.wait_ms)),
                        None => cmd
                            .arg(algorithm_code(rule.algorithm))
                            .arg(rule.requests)
                            .arg(window_ms)
                            .arg(rule.burst),
                    };
                }
            }
        };
        let mut conn = self.store.conn().await?;
        let flat: Vec<Value> = self.composed.run(&mut conn, fill).await?;
        if flat.len() != indices.len() * 7 {
            return Err(CheckError::Redis(
                "the composing script returned an unexpected number of values".into(),
            ));
        }
        Ok(flat
            .chunks_exact(7)
            .zip(indices)
            .map(|(values, &i)| composed_answer(checks[i], values))
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
            .map(|check| {
                let algorithm = check.rule.algorithm;
                let base = companion_base(algorithm, &check.key);
                if check.is_composed() {
                    return (composed_seen_key(&base), check.message_id.clone());
                }
                let key = seen_key(algorithm, &base, &check.message_id);
                match algorithm {
                    Algorithm::FixedWindow => (key, check.message_id.clone()),
                    Algorithm::SlidingWindow | Algorithm::TokenBucket => (key, String::new()),
                }
            })
            .collect();
        let groups = self.groups(records.iter().map(|(key, _)| (0, key.as_str())));
        let limiter = self.clone();
        tokio::spawn(async move {
            let (limiter, records) = (&limiter, &records);
            let calls = groups.iter().map(|indices| async move {
                let mut conn = limiter.store.conn().await?;
                let fill = |cmd: &mut Cmd| {
                    cmd.arg(indices.len());
                    for &i in indices {
                        cmd.arg(&records[i].0);
                    }
                    for &i in indices {
                        cmd.arg(&records[i].1);
                    }
                };
                limiter.mark_forwarded.run::<i64>(&mut conn, fill).await
            });
            let marked =
                tokio::time::timeout(limiter.budget(), futures::future::join_all(calls)).await;
            if let Ok(results) = marked
                && let Some(Err(e)) = results.into_iter().find(Result::is_err)
            {
                tracing::debug!(error = %e, "could not mark forwarded decisions");
            }
        });
    }

    /// Marks confirmed outputs by message id (`duplicates = "drop"`), for `ttl_ms`: a later
    /// message with one of these ids gets no second output. Awaited before the acks, so a
    /// crash cannot forward a duplicate; a mark that fails is logged and the message acked
    /// (its duplicate would be forwarded, marked replayed).
    pub async fn mark_done(&self, keys: &[String], ttl_ms: u64) {
        if keys.is_empty() {
            return;
        }
        let marks = keys.iter().map(|key| async move {
            let mut conn = self.store.conn().await?;
            redis::cmd("SET")
                .arg(key)
                .arg("1")
                .arg("PX")
                .arg(ttl_ms.max(1))
                .query_async::<()>(&mut conn)
                .await
        });
        match tokio::time::timeout(self.budget(), futures::future::join_all(marks)).await {
            Ok(results) => {
                if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
                    tracing::warn!(error = %e, "could not mark confirmed outputs: a duplicate of one may be forwarded");
                }
            }
            Err(_) => tracing::warn!(
                "marking confirmed outputs timed out: a duplicate of one may be forwarded"
            ),
        }
    }

    /// Every field of a hash (the live overrides), within the check timeout.
    pub async fn hash(
        &self,
        key: &str,
    ) -> Result<std::collections::HashMap<String, String>, LimitError> {
        let started = Instant::now();
        let read = async {
            let mut conn = self.store.conn().await?;
            redis::cmd("HGETALL").arg(key).query_async(&mut conn).await
        };
        match tokio::time::timeout(self.budget(), read).await {
            Ok(Ok(hash)) => Ok(hash),
            Ok(Err(e)) => {
                self.store.call_failed(Failure::of(&e), started);
                Err(e.into())
            }
            Err(_) => {
                self.store.call_failed(Failure::Unanswered, started);
                Err(LimitError::Timeout(self.budget()))
            }
        }
    }

    /// Ok when Redis answers a PING within the check timeout, else why not.
    pub async fn ping(&self) -> Result<(), String> {
        let started = Instant::now();
        let local_before = unix_ms();
        let ping = self.store.time();
        let (failure, outcome) = match tokio::time::timeout(self.budget(), ping).await {
            Ok(Ok(redis_ms)) => {
                // Redis's clock as seen from here: half the round trip after it answered.
                let local = local_before + (unix_ms().saturating_sub(local_before)) / 2;
                self.clock_offset
                    .store(redis_ms as i64 - local as i64, Ordering::Relaxed);
                self.store.call_answered();
                self.store.forget_diagnosis();
                return Ok(());
            }
            Ok(Err(e)) => (Failure::of(&e), e.to_string()),
            Err(_) => {
                self.store.call_failed(Failure::Unanswered, started);
                let why = self.store.diagnosis();
                return Err(why.unwrap_or_else(|| format!("no answer within {:?}", self.budget())));
            }
        };
        self.store.call_failed(failure, started);
        Err(outcome)
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One key's values as a script returned them: `{"err", error text, …}` when the key
/// could not be counted, else the algorithm's numbers.
fn answer(check: &Check, values: &[Value]) -> Result<Answer, CheckError> {
    let v = numbers(check, values)?;
    let rule = check.rule;
    let (mut decision, replayed, notify) = match check.rule.algorithm {
        Algorithm::FixedWindow => (
            Decision::fixed_window(rule, v[0].max(0) as u64, v[1], v[2] == 1),
            v[3],
            v[2],
        ),
        Algorithm::SlidingWindow | Algorithm::TokenBucket => {
            (Decision::from_script(&v[..5], rule), v[5], v[4])
        }
    };
    // A deferring rule's line: the wait for the message's turn came back in place of notify.
    if is_line_tag(&check.notify_tag)
        && let Decision::Rejected {
            turn_ms,
            notify_user,
            ..
        } = &mut decision
    {
        *turn_ms = notify.max(0) as u64;
        *notify_user = true;
    }
    Ok(settle(decision, replayed))
}

/// One check's values as the composing script returned them: {allowed, the deciding
/// limit (1-based), remaining, reset_ms, retry_ms, notify, replayed}.
fn composed_answer(check: &Check, values: &[Value]) -> Result<Answer, CheckError> {
    let v = numbers(check, values)?;
    let (scope, rule) = check
        .limit_at((v[1].max(1) - 1) as usize)
        .unwrap_or((Scope::Channel, check.rule));
    let seconds = |ms: i64| (ms.max(1) as u64).div_ceil(1000);
    let decision = if v[0] == 1 {
        Decision::Allowed {
            limit: rule.requests,
            remaining: v[2].max(0) as u64,
            reset_after: seconds(v[3]),
        }
    } else {
        Decision::Rejected {
            limit: rule.requests,
            window_seconds: rule.window_seconds,
            retry_after: seconds(v[4]),
            notify_user: v[5] == 1,
            turn_ms: 0,
            scope,
        }
    };
    Ok(settle(decision, v[6]))
}

/// A script's numbers, or the error it returned for this check.
fn numbers(check: &Check, values: &[Value]) -> Result<Vec<i64>, CheckError> {
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
    values
        .iter()
        .map(|v| match v {
            Value::Int(n) => Some(*n),
            _ => None,
        })
        .collect::<Option<Vec<i64>>>()
        .ok_or_else(|| CheckError::Key {
            key: check.key.clone(),
            reason: "a rate-limit script returned a value that is not a number".into(),
        })
}

/// A decision with what the script said of its replay: 3 a duplicate (nothing decided,
/// nothing output), 2 replayed after its output was confirmed, 1 replayed, 0 fresh.
fn settle(mut decision: Decision, replayed: i64) -> Answer {
    if replayed == 3 {
        return Answer {
            replayed: true,
            forwarded_before: true,
            duplicate: true,
            ..Answer::fresh(decision)
        };
    }
    let forwarded_before = replayed == 2;
    // The user was told when the first rejection went out: no second reply.
    if let Decision::Rejected { notify_user, .. } = &mut decision {
        *notify_user &= !forwarded_before;
    }
    Answer {
        decision,
        replayed: replayed != 0,
        forwarded_before,
        duplicate: false,
    }
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

/// Reservations made by this process, for the ids of those of messages without one.
static RESERVATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Units reserved in a tenant budget to give back (`refund.lua`).
struct Refund {
    key: String,
    /// The budget's decisions by id, where the reservation's record is.
    seen: String,
    rule: Rule,
    cost: u64,
    /// The reservation's id.
    id: String,
}

/// Where `check`'s tenant budget is among its limits, when it has one not yet decided.
fn budget_of(check: &Check) -> Option<usize> {
    check
        .also
        .iter()
        .position(|a| a.scope == Scope::Tenant && a.reserved.is_none())
}

/// Which script decides `check`: its algorithm's, or the composing one.
fn script_index(check: &Check) -> usize {
    if check.is_composed() {
        return 3;
    }
    match check.rule.algorithm {
        Algorithm::FixedWindow => 0,
        Algorithm::SlidingWindow => 1,
        Algorithm::TokenBucket => 2,
    }
}

fn algorithm_code(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::FixedWindow => "f",
        Algorithm::SlidingWindow => "s",
        Algorithm::TokenBucket => "b",
    }
}
