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

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Connection, Event};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::amqp::{self, PublishError, Publisher};
use crate::config::{Config, OnRedisError};
use crate::limit::{Decision, LimitError, Limiter, Rules, counter_key};
use crate::message;
use crate::route;
use crate::telemetry::Metrics;

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
    rules: Rules,
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
        limiter: Limiter,
        metrics: Metrics,
        health: Arc<Health>,
    ) -> Self {
        let rules = Rules::from_config(&config.limits);
        Self {
            config,
            rules,
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

        let max_in_flight = usize::from(amqp.prefetch);
        let mut in_flight = FuturesUnordered::new();
        let mut stream_open = true;
        let mut cancelling = false;
        let mut result = Ok(());
        let grace = tokio::time::sleep(Duration::MAX);
        tokio::pin!(grace);

        loop {
            let may_take = stream_open && *flow.borrow() && in_flight.len() < max_in_flight;
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
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                _ = flow.changed() => {}
                next = consumer.next(), if may_take => match next {
                    Some(Ok(delivery)) => in_flight.push(self.handle(delivery, &publisher, &lost, shutdown)),
                    Some(Err(e)) => {
                        stream_open = false;
                        result = Err(e.into());
                    }
                    None => {
                        stream_open = false;
                        if !cancelling {
                            result = Err(SessionError::ConsumerCancelled);
                        }
                    }
                },
            }
            if !stream_open && in_flight.is_empty() {
                break;
            }
            if result.is_err() && !stream_open {
                // The consumer is gone; finish what is in flight (their acks will fail and
                // the broker redelivers them) only as long as the grace period allows.
                if !cancelling {
                    cancelling = true;
                    grace
                        .as_mut()
                        .reset(tokio::time::Instant::now() + HAND_BACK_DELAY);
                }
            }
        }
        // Whatever is still in flight is dropped unacked: closing the channel hands it back.
        drop(in_flight);
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

    /// Processes one delivery to its end: acked after its output is confirmed, or handed
    /// back (nack with requeue) when that could not be done.
    async fn handle(
        &self,
        delivery: Delivery,
        publisher: &Publisher,
        lost: &CancellationToken,
        shutdown: &CancellationToken,
    ) {
        self.metrics.in_flight.increment(1.0);
        match self.process(&delivery, publisher, shutdown).await {
            Ok(outcome) => {
                match delivery.acker.ack(BasicAckOptions::default()).await {
                    Ok(true) => {}
                    Ok(false) | Err(_) => {
                        debug!("ack not delivered (channel closed); the broker will redeliver")
                    }
                }
                match outcome {
                    Outcome::Allowed => self.metrics.allowed.increment(1),
                    Outcome::Rejected => self.metrics.rejected.increment(1),
                    Outcome::Invalid => self.metrics.invalid.increment(1),
                }
            }
            Err(hand_back) => {
                if let HandBack::Publish(e) = &hand_back {
                    self.metrics.publish_failures.increment(1);
                    if e.is_channel_lost() {
                        lost.cancel();
                    }
                }
                warn!(error = %hand_back, "message handed back for redelivery");
                tokio::time::sleep(HAND_BACK_DELAY).await;
                let requeue = BasicNackOptions {
                    requeue: true,
                    multiple: false,
                };
                if let Err(e) = delivery.acker.nack(requeue).await {
                    debug!(error = %e, "nack not delivered; the broker will redeliver");
                }
            }
        }
        self.metrics.in_flight.decrement(1.0);
    }

    async fn process(
        &self,
        delivery: &Delivery,
        publisher: &Publisher,
        shutdown: &CancellationToken,
    ) -> Result<Outcome, HandBack> {
        let amqp = &self.config.amqp;
        let envelope = match message::parse(&delivery.data, self.config.limits.max_message_bytes) {
            Ok(envelope) => envelope,
            Err(invalid) => {
                info!(
                    outcome = "invalid",
                    error_code = invalid.code.as_str(),
                    detail = %invalid.detail,
                    message_id = delivery.properties.message_id().as_ref().map(ShortString::as_str),
                    "message dead-lettered"
                );
                let properties = route::dead_letter_properties(&delivery.properties, &invalid);
                publisher
                    .publish(&amqp.dead_letter_queue, &delivery.data, properties)
                    .await?;
                return Ok(Outcome::Invalid);
            }
        };
        let rule = self.rules.rule_for(&envelope.tenant_id, &envelope.channel);
        let key = counter_key(
            &self.config.redis.key_prefix,
            &envelope.tenant_id,
            &envelope.channel,
        );
        let decision = self.decide(&key, rule, shutdown).await?;
        match decision {
            Some(Decision::Allowed {
                limit,
                remaining,
                reset_after,
            }) => {
                let properties =
                    route::allowed_properties(&delivery.properties, limit, remaining, reset_after);
                publisher
                    .publish(&amqp.orchestrator_queue, &delivery.data, properties)
                    .await?;
                Ok(Outcome::Allowed)
            }
            Some(Decision::Rejected {
                limit,
                window_seconds,
                retry_after,
            }) => {
                let message_id = route::message_id(&envelope, &delivery.properties);
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
                let (body, properties) =
                    route::rejection(&envelope, message_id, limit, window_seconds, retry_after);
                publisher
                    .publish(&amqp.notification_queue, &body, properties)
                    .await?;
                Ok(Outcome::Rejected)
            }
            None => {
                let properties = route::degraded_properties(&delivery.properties);
                publisher
                    .publish(&amqp.orchestrator_queue, &delivery.data, properties)
                    .await?;
                Ok(Outcome::Allowed)
            }
        }
    }

    /// Asks Redis; on failure applies `limits.on_redis_error`. `None` means "forward
    /// unchecked" (the `allow` policy).
    async fn decide(
        &self,
        key: &str,
        rule: crate::limit::Rule,
        shutdown: &CancellationToken,
    ) -> Result<Option<Decision>, HandBack> {
        let mut attempt: u32 = 0;
        loop {
            let error: LimitError = match self.limiter.check(key, rule).await {
                Ok(decision) => return Ok(Some(decision)),
                Err(e) => e,
            };
            self.metrics.redis_errors.increment(1);
            self.health.redis_ok.store(false, Ordering::Relaxed);
            match self.config.limits.on_redis_error {
                OnRedisError::Allow => {
                    self.metrics.degraded.increment(1);
                    warn!(error = %error, key, "rate limit unchecked: forwarding (on_redis_error = allow)");
                    return Ok(None);
                }
                OnRedisError::Hold => {
                    // The message stays unacked; with every prefetch slot held, the broker
                    // sends nothing new until Redis answers again.
                    attempt = attempt.saturating_add(1);
                    let delay = backoff(REDIS_RETRY_MIN, REDIS_RETRY_MAX, attempt);
                    if attempt == 1 {
                        warn!(error = %error, key, "rate limit unchecked: holding the message (on_redis_error = hold)");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => return Err(HandBack::Stopping),
                    }
                }
            }
        }
    }
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
