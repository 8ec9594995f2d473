//! The defer ladder: the delay queues a deferred message waits in, declared only when some
//! rule can defer, and kept usable while the gate runs. Until it is usable (the broker
//! refused to declare it, or a step went missing), a message over its limit is rejected
//! instead of parked, and `/readyz` says why.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::amqp::declare_or_use;
use crate::config::AmqpConfig;
use crate::health::Health;
use crate::limit::LiveRules;

/// The steps of the defer ladder, in seconds: a deferred message waits in the smallest
/// step at least as long as its turn (the longest, and then again, beyond it).
pub const DEFER_STEPS: [u64; 9] = [1, 2, 5, 10, 30, 60, 120, 300, 600];

/// The delay queue of one step of the ladder, named after the inbound queue. A sharded
/// inbound has a ladder of its own (`….defer.shards.{seconds}s`), whose steps return each
/// message to its tenant's shard: a step is published to through a fanout exchange of the
/// same name, with the tenant as routing key, and dead-letters to the inbound exchange,
/// which hashes that key again.
pub fn defer_queue(config: &AmqpConfig, seconds: u64) -> String {
    step_queue(&config.inbound_queue, config.inbound_shards > 0, seconds)
}

/// The step of `seconds` of the ladder of `inbound`, sharded or not.
pub fn step_queue(inbound: &str, sharded: bool, seconds: u64) -> String {
    if sharded {
        format!("{inbound}.defer.shards.{seconds}s")
    } else {
        format!("{inbound}.defer.{seconds}s")
    }
}

/// How often the keeper looks whether a rule defers now (a `limits set --on-limit defer`).
const LOOK_INTERVAL: Duration = Duration::from_millis(200);
/// How often the steps are counted for the parked-messages gauge.
const COUNT_INTERVAL: Duration = Duration::from_secs(5);
/// How long one declare, search or count of the ladder may wait for the broker.
const LOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after a refusal the ladder is tried again.
const RETRY_AFTER_REFUSAL: Duration = Duration::from_secs(30);

/// Declares the defer ladder: each step holds its messages for its own TTL (the same for
/// every message of the queue, so they expire in order at its head), then dead-letters them
/// back to the inbound queue.
///
/// The steps are quorum queues whatever `amqp.queue_type` says: only quorum queues
/// dead-letter at least once (`x-dead-letter-strategy = "at-least-once"`, with
/// `x-overflow = "reject-publish"`), so a parked message whose return the inbound queue
/// refuses (full, or without a leader) stays parked and is retried instead of dropped.
pub async fn declare_ladder(conn: &Connection, config: &AmqpConfig) -> Result<(), lapin::Error> {
    let sharded = config.inbound_shards > 0;
    for seconds in DEFER_STEPS {
        let mut args = FieldTable::default();
        for (name, value) in [
            ("x-queue-type", AMQPValue::LongString("quorum".into())),
            (
                "x-message-ttl",
                AMQPValue::LongLongInt(seconds as i64 * 1000),
            ),
            (
                "x-dead-letter-strategy",
                AMQPValue::LongString("at-least-once".into()),
            ),
            ("x-overflow", AMQPValue::LongString("reject-publish".into())),
        ] {
            args.insert(name.into(), value);
        }
        if sharded {
            // Back through the inbound exchange, by the routing key the copy was parked
            // with: its tenant.
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(config.inbound_queue.as_str().into()),
            );
        } else {
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString("".into()),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(config.inbound_queue.as_str().into()),
            );
        }
        let queue = defer_queue(config, seconds);
        declare_or_use(conn, &queue, &args).await?;
        if sharded {
            bind_step(conn, &queue).await?;
        }
    }
    Ok(())
}

/// The fanout exchange a sharded ladder's step is published to, named like the step and
/// bound to it: a fanout keeps the copy's routing key (its tenant) for its return.
async fn bind_step(conn: &Connection, queue: &str) -> Result<(), lapin::Error> {
    let channel = conn.create_channel().await?;
    let bound = async {
        channel
            .exchange_declare(
                ShortString::from(queue),
                lapin::ExchangeKind::Fanout,
                lapin::options::ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                ShortString::from(queue),
                ShortString::from(queue),
                ShortString::from(""),
                lapin::options::QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
    }
    .await;
    if channel.status().connected() {
        let _ = channel.close(200, ShortString::from("declared")).await;
    }
    bound
}

/// Whether a deferral may park now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parking {
    /// Not known yet in this session: a deferral waits (briefly) until it is.
    Unknown,
    Ready,
    /// The broker refused the ladder or a step is missing: deferrals become rejections.
    Unusable,
}

/// Keeps the ladder usable for one broker session: declares it (or, when the gate declares
/// no queues, finds it) once some rule can defer, counts what waits in each step, and
/// tells `parking` whether a deferral may park.
pub struct LadderKeeper {
    conn: Arc<Connection>,
    config: Arc<crate::config::Config>,
    rules: Arc<LiveRules>,
    parking: Arc<tokio::sync::watch::Sender<Parking>>,
    health: Arc<Health>,
    /// The channel the steps are counted on (a passive declare of a missing step closes it).
    counting: Option<Channel>,
    next_try: Instant,
    next_count: Instant,
}

impl LadderKeeper {
    pub fn new(
        conn: Arc<Connection>,
        config: Arc<crate::config::Config>,
        rules: Arc<LiveRules>,
        parking: Arc<tokio::sync::watch::Sender<Parking>>,
        health: Arc<Health>,
    ) -> Self {
        // A new session finds the ladder afresh.
        parking.send_replace(Parking::Unknown);
        let now = Instant::now();
        Self {
            conn,
            config,
            rules,
            parking,
            health,
            counting: None,
            next_try: now,
            next_count: now,
        }
    }

    /// One look: declare or find the ladder when a rule defers and it is not usable, and
    /// count the steps when it is due.
    pub async fn look(&mut self) {
        if !self.rules.snapshot().can_defer {
            // Nothing defers: nothing to declare, poll or report.
            if self.health.set_ladder_error(None) {
                tracing::debug!("no rule defers any more");
            }
            return;
        }
        let now = Instant::now();
        // A sharded ladder returns its messages through the inbound exchange: without it
        // they could not come back.
        if self.config.amqp.inbound_shards > 0 && self.health.no_hash_exchange() {
            self.parking.send_replace(Parking::Unusable);
            self.next_try = now;
            return;
        }
        let state = *self.parking.borrow();
        if state == Parking::Unknown || (state == Parking::Unusable && now >= self.next_try) {
            self.make_usable().await;
        }
        if *self.parking.borrow() == Parking::Ready && now >= self.next_count {
            self.next_count = now + COUNT_INTERVAL;
            self.count().await;
        }
    }

    async fn make_usable(&mut self) {
        let look = async {
            let amqp = &self.config.amqp;
            if amqp.declare_queues {
                declare_ladder(&self.conn, amqp).await
            } else {
                self.find().await
            }
        };
        // A broker that never answers (a half-open connection, a blocked channel) makes the
        // ladder unusable for now, like a refusal: the look loop is never stuck on it.
        let found = match tokio::time::timeout(LOOK_TIMEOUT, look).await {
            Ok(found) => found.map_err(|e| self.config.scrub(&e.to_string())),
            Err(_) => Err(format!(
                "the broker did not answer within {} s",
                LOOK_TIMEOUT.as_secs()
            )),
        };
        match found {
            Ok(()) => {
                self.parking.send_replace(Parking::Ready);
                self.health.set_ladder_error(None);
                tracing::info!("the defer ladder is ready");
            }
            Err(e) => {
                self.parking.send_replace(Parking::Unusable);
                self.next_try = Instant::now() + RETRY_AFTER_REFUSAL;
                let reason = format!(
                    "the defer ladder cannot be used, so messages over a deferring limit are rejected: {e}"
                );
                if self.health.set_ladder_error(Some(reason.clone())) {
                    tracing::warn!("{reason}");
                }
            }
        }
    }

    /// Every step exists (the gate declares no queues: an operator did).
    async fn find(&mut self) -> Result<(), lapin::Error> {
        let channel = self.channel().await?;
        for seconds in DEFER_STEPS {
            let step = defer_queue(&self.config.amqp, seconds);
            passive(&channel, &step).await?;
            if self.config.amqp.inbound_shards > 0 {
                passive_exchange(&channel, &step).await?;
            }
        }
        Ok(())
    }

    /// Sets the parked-messages gauge of each step; a step gone missing makes the ladder
    /// unusable until it is declared (or found) again.
    async fn count(&mut self) {
        let Ok(Ok(channel)) = tokio::time::timeout(LOOK_TIMEOUT, self.channel()).await else {
            return;
        };
        for seconds in DEFER_STEPS {
            let queue = defer_queue(&self.config.amqp, seconds);
            let look = async {
                let waiting = passive(&channel, &queue).await?;
                // A sharded step is published to through its exchange: it must be there too.
                if self.config.amqp.inbound_shards > 0 {
                    passive_exchange(&channel, &queue).await?;
                }
                Ok::<_, lapin::Error>(waiting)
            };
            let Ok(counted) = tokio::time::timeout(LOOK_TIMEOUT, look).await else {
                // No answer: counted again at the next look.
                return;
            };
            match counted {
                Ok(waiting) => {
                    metrics::gauge!(crate::telemetry::PARKED, "step" => format!("{seconds}s"))
                        .set(f64::from(waiting));
                }
                Err(_) => {
                    // Declared (or found) again at the next look.
                    self.parking.send_replace(Parking::Unknown);
                    return;
                }
            }
        }
    }

    async fn channel(&mut self) -> Result<Channel, lapin::Error> {
        if let Some(channel) = &self.counting
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        let channel = self.conn.create_channel().await?;
        self.counting = Some(channel.clone());
        Ok(channel)
    }

    /// Looks every second until `stop` (the session's end).
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(LOOK_INTERVAL) => self.look().await,
                _ = stop.cancelled() => break,
            }
        }
        if let Some(channel) = self.counting.take()
            && channel.status().connected()
        {
            let _ = channel.close(200, ShortString::from("done")).await;
        }
    }
}

/// The exchange exists (a missing one closes the channel).
async fn passive_exchange(channel: &Channel, exchange: &str) -> Result<(), lapin::Error> {
    let options = lapin::options::ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            ShortString::from(exchange),
            lapin::ExchangeKind::Fanout,
            options,
            FieldTable::default(),
        )
        .await
}

/// The number of messages in `queue`; an error (which closes the channel) when it is missing.
async fn passive(channel: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    let options = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare(ShortString::from(queue), options, FieldTable::default())
        .await?;
    Ok(declared.message_count())
}
