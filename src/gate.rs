//! What happens to one message, top to bottom: parse → decide → publish → confirm → ack.
//!
//! Deliveries are processed concurrently (up to `amqp.prefetch` at once) in one task; each
//! waits only for its own Redis answer and its own publisher confirm. The inbound message
//! is acked only after its one output was confirmed; any failure hands it back to the
//! broker instead.
//!
//! A *session* is one pair of broker connections (consuming and publishing apart, so that
//! flow control on publishing never delays acks). When either fails, the session ends and
//! [`Gate::run`] opens a new one after a capped, jittered backoff.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::join_all;
use futures::stream::{FuturesUnordered, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Connection, Event};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::acks::{AckTracker, Settlement};
use crate::amqp::{self, PublishError, Publisher};
use crate::config::{Config, Notify, OnRedisError};
use crate::limit::{Check, Decision, Limiter, LiveRules, RejectionCache, key_for, sender_tag};
use crate::message;
use crate::route;
use crate::telemetry::Metrics;

/// Most deliveries taken into one batch (one Redis round trip).
const MAX_BATCH: usize = 512;
/// How long a batch may wait for more deliveries after its first one.
const BATCH_GATHER: Duration = Duration::from_micros(500);
/// Batches waiting for Redis at once. While they wait, deliveries queue up and the next
/// batch takes them all: under load batches grow, when idle a message goes alone.
const REDIS_BATCHES_IN_FLIGHT: usize = 2;
/// Wait before handing a message back after a failed publish, so a broken route does not
/// become a hot redelivery loop.
const HAND_BACK_DELAY: Duration = Duration::from_millis(200);
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(10);
const REDIS_RETRY_MIN: Duration = Duration::from_millis(50);
const REDIS_RETRY_MAX: Duration = Duration::from_secs(2);

/// What `/readyz` reports, shared between the pipeline and the HTTP server.
#[derive(Debug, Default)]
pub struct Health {
    pub consuming: AtomicBool,
    pub redis_ok: AtomicBool,
}

impl Health {
    pub fn ready(&self) -> bool {
        self.consuming.load(Ordering::Relaxed) && self.redis_ok.load(Ordering::Relaxed)
    }
}

/// The gate: configuration, rules and the Redis client, shared by every session.
pub struct Gate {
    config: Arc<Config>,
    rules: Arc<LiveRules>,
    /// Rejections answered without Redis while a key cannot allow anyway.
    cache: RejectionCache,
    limiter: Limiter,
    metrics: Metrics,
    health: Arc<Health>,
}

/// Where a message went, counted once its output is confirmed.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Allowed,
    Rejected,
    Invalid,
}

/// Why a message is handed back to the broker instead of acked.
#[derive(Debug, thiserror::Error)]
enum HandBack {
    #[error("publishing failed: {0}")]
    Publish(#[from] PublishError),
    #[error("the gate is stopping while Redis is unavailable")]
    Stopping,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("broker connection failed: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker cancelled the consumer")]
    ConsumerCancelled,
    #[error("a connection reported an error: {0}")]
    ConnectionLost(String),
}

impl Gate {
    pub fn new(
        config: Arc<Config>,
        rules: Arc<LiveRules>,
        limiter: Limiter,
        metrics: Metrics,
        health: Arc<Health>,
    ) -> Self {
        Self {
            config,
            rules,
            cache: RejectionCache::default(),
            limiter,
            metrics,
            health,
        }
    }

    /// Consumes until `shutdown` is cancelled, reconnecting after every failure. Never
    /// returns because of a transient outage.
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut failures: u32 = 0;
        loop {
            let mut consumed = false;
            match self.session(&shutdown, &mut consumed).await {
                Ok(()) => return,
                Err(e) => {
                    self.health.consuming.store(false, Ordering::Relaxed);
                    if shutdown.is_cancelled() {
                        return;
                    }
                    // A session that got as far as consuming was healthy: start the
                    // backoff from the bottom again.
                    failures = if consumed {
                        1
                    } else {
                        failures.saturating_add(1)
                    };
                    let delay = backoff(RECONNECT_MIN, RECONNECT_MAX, failures);
                    self.metrics.amqp_reconnects.increment(1);
                    warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "session ended; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }

    /// One pair of connections, from connect to the end of its consumer.
    async fn session(
        &self,
        shutdown: &CancellationToken,
        consumed: &mut bool,
    ) -> Result<(), SessionError> {
        let amqp = &self.config.amqp;
        let consume_conn = amqp::connect(&amqp.url, "consume").await?;
        let publish_conn = match amqp::connect(&amqp.url, "publish").await {
            Ok(conn) => conn,
            Err(e) => {
                close(&consume_conn).await;
                return Err(e.into());
            }
        };
        // Watchers stop before the connections close, so a deliberate close is not
        // reported as a connection error.
        let watching = CancellationToken::new();
        let result = self
            .consume(&consume_conn, &publish_conn, shutdown, &watching, consumed)
            .await;
        self.health.consuming.store(false, Ordering::Relaxed);
        watching.cancel();
        close(&consume_conn).await;
        close(&publish_conn).await;
        result
    }

    async fn consume(
        &self,
        consume_conn: &Connection,
        publish_conn: &Connection,
        shutdown: &CancellationToken,
        watching: &CancellationToken,
        consumed: &mut bool,
    ) -> Result<(), SessionError> {
        let amqp = &self.config.amqp;
        let lost = watching.child_token();
        let (flow_tx, mut flow) = watch::channel(true);
        watch_connection(consume_conn, lost.clone(), None, self.metrics.clone());
        watch_connection(
            publish_conn,
            lost.clone(),
            Some(flow_tx),
            self.metrics.clone(),
        );

        let publisher =
            Publisher::new(publish_conn.create_channel().await?, self.metrics.clone()).await?;
        if amqp.declare_queues {
            amqp::declare_queues(publisher.channel(), amqp).await?;
        }
        let channel = consume_conn.create_channel().await?;
        channel
            .basic_qos(amqp.prefetch, BasicQosOptions::default())
            .await?;
        let tag = ShortString::from(format!("konstruct-gate-{}", std::process::id()));
        let mut consumer = channel
            .basic_consume(
                ShortString::from(amqp.inbound_queue.as_str()),
                tag.clone(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.health.consuming.store(true, Ordering::Relaxed);
        *consumed = true;
        info!(queue = %amqp.inbound_queue, prefetch = amqp.prefetch, "consuming");

        let tracker = Mutex::new(AckTracker::default());
        let (settle_tx, settle_rx) = mpsc::unbounded_channel();
        let acks = send_settlements(channel.clone(), settle_rx);
        tokio::pin!(acks);
        let redis_slots = Arc::new(Semaphore::new(REDIS_BATCHES_IN_FLIGHT));
        let mut slot: Option<OwnedSemaphorePermit> = None;
        let mut in_flight = FuturesUnordered::new();
        let mut stream_open = true;
        let mut cancelling = false;
        let mut result = Ok(());
        let grace = tokio::time::sleep(Duration::MAX);
        tokio::pin!(grace);

        loop {
            let may_take = stream_open && *flow.borrow();
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if !cancelling => {
                    cancelling = true;
                    self.health.consuming.store(false, Ordering::Relaxed);
                    info!(in_flight = in_flight.len(), "stopping: cancelling the consumer and draining");
                    grace.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(amqp.shutdown_grace_seconds));
                    if let Err(e) = channel.basic_cancel(tag.clone(), BasicCancelOptions::default()).await {
                        warn!(error = %e, "basic.cancel failed");
                        stream_open = false;
                    }
                }
                _ = &mut grace => {
                    warn!(in_flight = in_flight.len(), "grace period over: handing back unfinished messages");
                    break;
                }
                _ = lost.cancelled() => {
                    result = Err(SessionError::ConnectionLost("see the previous log line".into()));
                    break;
                }
                ended = &mut acks => {
                    let reason = ended.err().map_or_else(|| "the acknowledgement channel closed".to_owned(), |e| e.to_string());
                    result = Err(SessionError::ConnectionLost(reason));
                    break;
                }
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                _ = flow.changed() => {}
                permit = redis_slots.clone().acquire_owned(), if may_take && slot.is_none() => {
                    slot = permit.ok();
                }
                next = consumer.next(), if may_take && slot.is_some() => {
                    // Take everything the broker has already sent, up to a batch: one Redis
                    // round trip then serves all of it.
                    let mut batch = Vec::new();
                    let mut end = None;
                    match next {
                        Some(Ok(delivery)) => batch.push(delivery),
                        other => end = Some(other),
                    }
                    if end.is_none() && !cancelling {
                        // Let a short burst gather: fewer, larger batches cost far fewer
                        // thread wake-ups than many single messages.
                        tokio::time::sleep(BATCH_GATHER).await;
                    }
                    while end.is_none() && batch.len() < MAX_BATCH {
                        match consumer.next().now_or_never() {
                            None => break,
                            Some(Some(Ok(delivery))) => batch.push(delivery),
                            Some(other) => end = Some(other),
                        }
                    }
                    if !batch.is_empty() {
                        let mut t = tracker.lock().expect("the ack tracker is never poisoned");
                        for delivery in &batch {
                            t.received(delivery.delivery_tag);
                        }
                        drop(t);
                        let permit = slot.take().expect("a batch is only formed with a Redis slot");
                        in_flight.push(self.handle_batch(batch, permit, &publisher, &lost, shutdown, &tracker, &settle_tx));
                    }
                    match end {
                        Some(Some(Err(e))) => {
                            stream_open = false;
                            result = Err(e.into());
                        }
                        Some(None) => {
                            stream_open = false;
                            if !cancelling {
                                result = Err(SessionError::ConsumerCancelled);
                            }
                        }
                        Some(Some(Ok(_))) | None => {}
                    }
                }
            }
            if !stream_open && in_flight.is_empty() {
                break;
            }
            if result.is_err() && !stream_open && !cancelling {
                // The consumer is gone; what is in flight gets a moment to finish (its acks
                // may fail, and the broker redelivers those messages).
                cancelling = true;
                grace
                    .as_mut()
                    .reset(tokio::time::Instant::now() + HAND_BACK_DELAY);
            }
        }
        // Whatever is still in flight is dropped unsettled: closing the channel hands it
        // back. What was settled is sent first.
        drop(in_flight);
        drop(settle_tx);
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut acks).await;
        for ch in [&channel, publisher.channel()] {
            if ch.status().connected() {
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    ch.close(200, ShortString::from("bye")),
                )
                .await;
            }
        }
        if !shutdown.is_cancelled() && result.is_ok() {
            result = Err(SessionError::ConsumerCancelled);
        }
        result
    }

    /// Processes a batch to its end: each message is settled as done once its output is
    /// confirmed, or handed back (nack with requeue) when that could not be done.
    #[allow(clippy::too_many_arguments)]
    async fn handle_batch(
        &self,
        batch: Vec<Delivery>,
        redis_slot: OwnedSemaphorePermit,
        publisher: &Publisher,
        lost: &CancellationToken,
        shutdown: &CancellationToken,
        tracker: &Mutex<AckTracker>,
        settle: &mpsc::UnboundedSender<Settlement>,
    ) {
        let n = batch.len() as f64;
        self.metrics.in_flight.increment(n);
        self.metrics.batch_size.record(n);
        debug!(size = batch.len(), "batch");
        let outcomes = self
            .process_batch(&batch, redis_slot, publisher, shutdown)
            .await;
        let failures: Vec<&HandBack> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
        if let Some(first) = failures.first() {
            for failure in &failures {
                if let HandBack::Publish(e) = failure {
                    self.metrics.publish_failures.increment(1);
                    if e.is_channel_lost() {
                        lost.cancel();
                    }
                }
            }
            warn!(count = failures.len(), error = %first, "messages handed back for redelivery");
            tokio::time::sleep(HAND_BACK_DELAY).await;
        }
        let mut settlements = Vec::new();
        let mut t = tracker.lock().expect("the ack tracker is never poisoned");
        for (delivery, outcome) in batch.iter().zip(&outcomes) {
            t.settle(delivery.delivery_tag, outcome.is_ok(), &mut settlements);
            match outcome {
                Ok(Outcome::Allowed) => self.metrics.allowed.increment(1),
                Ok(Outcome::Rejected) => self.metrics.rejected.increment(1),
                Ok(Outcome::Invalid) => self.metrics.invalid.increment(1),
                Err(_) => {}
            }
        }
        // Sent while holding the lock, so settlements reach the broker in tag order.
        for s in settlements {
            let _ = settle.send(s);
        }
        drop(t);
        self.metrics.in_flight.decrement(n);
    }

    /// Parse every message, check the valid ones in one Redis round trip, publish every
    /// output, and wait for the confirms.
    async fn process_batch(
        &self,
        batch: &[Delivery],
        redis_slot: OwnedSemaphorePermit,
        publisher: &Publisher,
        shutdown: &CancellationToken,
    ) -> Vec<Result<Outcome, HandBack>> {
        let amqp = &self.config.amqp;
        let max_bytes = self.config.limits.max_message_bytes;
        let rules = self.rules.snapshot();
        let parsed: Vec<_> = batch
            .iter()
            .map(|d| message::parse(&d.data, max_bytes))
            .collect();
        let checks: Vec<Check> = batch
            .iter()
            .zip(&parsed)
            .filter_map(|(delivery, parsed)| Some((delivery, parsed.as_ref().ok()?)))
            .map(|(delivery, env)| {
                let rule = rules.rule_for(&env.tenant_id, &env.channel);
                let key = key_for(
                    rule.algorithm,
                    &self.config.redis.key_prefix,
                    &env.tenant_id,
                    &env.channel,
                );
                let notify_tag = match self.config.limits.notify {
                    Notify::Every => String::new(),
                    Notify::OncePerWindow => sender_tag(env.sender.map(|s| s.get())),
                };
                let message_id = if self.config.limits.count_once {
                    route::message_id(env, &delivery.properties)
                        .unwrap_or_default()
                        .to_owned()
                } else {
                    String::new()
                };
                Check {
                    key,
                    rule,
                    notify_tag,
                    message_id,
                    redelivered: delivery.redelivered,
                }
            })
            .collect();
        let decided = self
            .decide_with_cache(&checks, rules.generation, shutdown)
            .await;
        drop(redis_slot);
        let mut verdicts = match decided {
            Ok(verdicts) => verdicts
                .into_iter()
                .zip(checks.iter().map(|check| check.rule)),
            Err(Stopping) => return batch.iter().map(|_| Err(HandBack::Stopping)).collect(),
        };

        let mut outputs = Vec::with_capacity(batch.len());
        for (delivery, parsed) in batch.iter().zip(&parsed) {
            let forward = |properties| {
                (
                    Outcome::Allowed,
                    amqp.orchestrator_queue.as_str(),
                    Cow::Borrowed(&delivery.data[..]),
                    properties,
                )
            };
            let output = match parsed {
                Err(invalid) => {
                    info!(
                        outcome = "invalid",
                        error_code = invalid.code.as_str(),
                        detail = %invalid.detail,
                        message_id = delivery.properties.message_id().as_ref().map(ShortString::as_str),
                        "message dead-lettered"
                    );
                    let properties = route::dead_letter_properties(&delivery.properties, invalid);
                    (
                        Outcome::Invalid,
                        amqp.dead_letter_queue.as_str(),
                        Cow::Borrowed(&delivery.data[..]),
                        properties,
                    )
                }
                Ok(envelope) => match verdicts.next().expect("one verdict per valid message") {
                    (
                        Verdict::Checked(Decision::Allowed {
                            limit,
                            remaining,
                            reset_after,
                        }),
                        _,
                    ) => {
                        if route::near_limit(limit, remaining) {
                            self.metrics.near_limit.increment(1);
                        }
                        let properties = route::allowed_properties(
                            &delivery.properties,
                            limit,
                            remaining,
                            reset_after,
                        );
                        forward(properties)
                    }
                    (
                        Verdict::Checked(Decision::Rejected {
                            limit,
                            window_seconds,
                            retry_after,
                            ..
                        }),
                        rule,
                    ) if rule.shadow => {
                        self.metrics.shadow_rejections.increment(1);
                        info!(
                            outcome = "shadow_rejected",
                            tenant_id = %envelope.tenant_id,
                            channel = %envelope.channel,
                            message_id = route::message_id(envelope, &delivery.properties),
                            limit,
                            window_seconds,
                            retry_after_seconds = retry_after,
                            "message over its limit forwarded (shadow mode)"
                        );
                        let properties =
                            route::shadow_properties(&delivery.properties, limit, retry_after);
                        forward(properties)
                    }
                    (
                        Verdict::Checked(Decision::Rejected {
                            limit,
                            window_seconds,
                            retry_after,
                            notify_user,
                        }),
                        _,
                    ) => {
                        let message_id = route::message_id(envelope, &delivery.properties);
                        info!(
                            outcome = "rejected",
                            tenant_id = %envelope.tenant_id,
                            channel = %envelope.channel,
                            message_id,
                            limit,
                            window_seconds,
                            retry_after_seconds = retry_after,
                            "message rejected: rate limit exceeded"
                        );
                        let (body, properties) = route::rejection(
                            envelope,
                            message_id,
                            limit,
                            window_seconds,
                            retry_after,
                            notify_user,
                        );
                        (
                            Outcome::Rejected,
                            amqp.notification_queue.as_str(),
                            Cow::Owned(body),
                            properties,
                        )
                    }
                    (Verdict::Unchecked, _) => {
                        let properties = route::degraded_properties(&delivery.properties);
                        forward(properties)
                    }
                },
            };
            outputs.push(output);
        }
        // Every publish is sent before any confirm is awaited.
        join_all(
            outputs
                .into_iter()
                .map(|(outcome, queue, body, properties)| async move {
                    publisher.publish(queue, &body, properties).await?;
                    Ok(outcome)
                }),
        )
        .await
    }

    /// Answers what the rejection cache can, asks Redis for the rest, and learns from
    /// Redis's rejections.
    async fn decide_with_cache(
        &self,
        checks: &[Check],
        generation: u64,
        shutdown: &CancellationToken,
    ) -> Result<Vec<Verdict>, Stopping> {
        let asked_at = Instant::now();
        let cached: Vec<Option<Decision>> = checks
            .iter()
            .map(|check| self.cache.answer(check, generation, asked_at))
            .collect();
        let hits = cached.iter().filter(|c| c.is_some()).count();
        self.metrics.local_rejections.increment(hits as u64);
        let asked: Vec<usize> = (0..checks.len()).filter(|&i| cached[i].is_none()).collect();
        let answers = if hits == 0 {
            self.decide_batch(checks, shutdown).await?
        } else if asked.is_empty() {
            Vec::new()
        } else {
            let subset: Vec<Check> = asked.iter().map(|&i| checks[i].clone()).collect();
            self.decide_batch(&subset, shutdown).await?
        };
        let mut verdicts: Vec<Verdict> = cached
            .into_iter()
            .map(|c| c.map_or(Verdict::Unchecked, Verdict::Checked))
            .collect();
        for (&i, answer) in asked.iter().zip(answers) {
            if let Verdict::Checked(decision) = &answer {
                self.cache.learn(&checks[i], decision, generation, asked_at);
            }
            verdicts[i] = answer;
        }
        Ok(verdicts)
    }

    /// Asks Redis for every check at once; on failure applies `limits.on_redis_error` to
    /// the checks that failed.
    async fn decide_batch(
        &self,
        checks: &[Check],
        shutdown: &CancellationToken,
    ) -> Result<Vec<Verdict>, Stopping> {
        if checks.is_empty() {
            return Ok(Vec::new());
        }
        let mut attempt: u32 = 0;
        loop {
            let error = match self.limiter.check_batch(checks).await {
                Ok(decisions) => return Ok(decisions.into_iter().map(Verdict::Checked).collect()),
                Err(error) => error,
            };
            let count = checks.len();
            self.metrics.redis_errors.increment(count as u64);
            self.health.redis_ok.store(false, Ordering::Relaxed);
            match self.config.limits.on_redis_error {
                OnRedisError::Allow => {
                    self.metrics.degraded.increment(count as u64);
                    warn!(error = %error, count, "rate limit unchecked: forwarding (on_redis_error = allow)");
                    return Ok(vec![Verdict::Unchecked; count]);
                }
                OnRedisError::Hold => {
                    // The messages stay unacked; with every prefetch slot held, the broker
                    // sends nothing new until Redis answers again.
                    attempt = attempt.saturating_add(1);
                    if attempt == 1 {
                        warn!(error = %error, count, "rate limit unchecked: holding the messages (on_redis_error = hold)");
                    }
                    let delay = backoff(REDIS_RETRY_MIN, REDIS_RETRY_MAX, attempt);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => return Err(Stopping),
                    }
                }
            }
        }
    }
}

/// The gate is stopping while the checks of a batch wait for Redis.
struct Stopping;

/// The answer for one valid message.
#[derive(Debug, Clone, Copy)]
enum Verdict {
    Checked(Decision),
    /// Redis could not be asked and `on_redis_error = allow`: forward, marked degraded.
    Unchecked,
}

/// Sends settlements to the broker in the order they were made, collapsing a run of
/// cumulative acks into its last one. Ends when every sender is gone, or with the
/// channel's error.
async fn send_settlements(
    channel: lapin::Channel,
    mut rx: mpsc::UnboundedReceiver<Settlement>,
) -> Result<(), lapin::Error> {
    let mut batch = Vec::with_capacity(256);
    while rx.recv_many(&mut batch, 1024).await > 0 {
        let mut pending_ack: Option<u64> = None;
        for settlement in batch.drain(..) {
            match settlement {
                Settlement::AckUpTo(tag) => pending_ack = Some(tag),
                Settlement::Requeue(tag) => {
                    if let Some(up_to) = pending_ack.take() {
                        channel
                            .basic_ack(up_to, BasicAckOptions { multiple: true })
                            .await?;
                    }
                    let requeue = BasicNackOptions {
                        requeue: true,
                        multiple: false,
                    };
                    channel.basic_nack(tag, requeue).await?;
                }
            }
        }
        if let Some(up_to) = pending_ack {
            channel
                .basic_ack(up_to, BasicAckOptions { multiple: true })
                .await?;
        }
    }
    Ok(())
}

/// Follows one connection's events: an error ends the session; `connection.blocked` on the
/// publishing connection closes the flow gate so no new deliveries are taken.
fn watch_connection(
    conn: &Connection,
    lost: CancellationToken,
    flow: Option<watch::Sender<bool>>,
    metrics: Metrics,
) {
    let mut events = Box::pin(conn.events_listener());
    tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                biased;
                _ = lost.cancelled() => None,
                event = events.next() => event,
            };
            let Some(event) = event else { break };
            match event {
                Event::Error(e) => {
                    error!(error = %e, "broker connection error");
                    lost.cancel();
                    break;
                }
                Event::ConnectionBlocked(reason) => {
                    if let Some(flow) = &flow {
                        warn!(%reason, "broker blocked publishing; pausing new deliveries");
                        metrics.publish_blocked.set(1.0);
                        let _ = flow.send(false);
                    }
                }
                Event::ConnectionUnblocked => {
                    if let Some(flow) = &flow {
                        info!("broker unblocked publishing; resuming");
                        metrics.publish_blocked.set(0.0);
                        let _ = flow.send(true);
                    }
                }
                _ => {}
            }
        }
        metrics.publish_blocked.set(0.0);
    });
}

async fn close(conn: &Connection) {
    if conn.status().connected() {
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            conn.close(200, ShortString::from("bye")),
        )
        .await;
    }
}

/// Capped exponential backoff with full jitter: a random delay in [min, min·2^attempt],
/// at most `max`, so instances that failed together do not retry together.
pub fn backoff(min: Duration, max: Duration, attempt: u32) -> Duration {
    let ceiling = min
        .saturating_mul(1u32 << attempt.min(16))
        .min(max)
        .max(min);
    let span = ceiling.saturating_sub(min).as_millis() as u64;
    min + Duration::from_millis(fastrand::u64(0..=span))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_within_its_bounds_and_grows() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(10);
        for attempt in 0..40 {
            let d = backoff(min, max, attempt);
            assert!(d >= min && d <= max, "attempt {attempt}: {d:?}");
        }
        let late: Vec<_> = (0..50).map(|_| backoff(min, max, 20)).collect();
        assert!(late.iter().any(|d| *d > Duration::from_secs(1)));
    }
}
