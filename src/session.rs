//! One broker session after another: connect, declare, consume, settle; after any failure,
//! reconnect with a capped, jittered backoff. What a message *means* is the pipeline's
//! business; this module only moves deliveries in and settlements out.
//!
//! A session is one pair of broker connections (consuming and publishing apart, so that
//! flow control on publishing never delays acks). Deliveries are taken in batches (one
//! Redis round trip each), up to two batches wait for Redis at once, and the inbound
//! messages are settled in delivery-tag order by the [`AckTracker`]. A message whose check
//! is held (`on_redis_error = hold`) is retried on its own with a backoff while the others
//! go on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures::FutureExt;
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

use crate::acks::{AckTracker, Settlement, TagGap};
use crate::amqp::{self, Brokers, PublishError, Publisher};
use crate::config::Config;
use crate::health::Health;
use crate::ladder::LadderKeeper;
use crate::pipeline::{Fate, Pipeline};
use crate::route::Outcome;
use crate::shards;
use crate::telemetry::Metrics;

/// The deliveries of every inbound queue's consumer, taken in turn; an item `None` is the
/// end of one consumer.
type Inbound = futures::stream::SelectAll<futures::stream::BoxStream<'static, Taken>>;

/// One item of the merged consumers. Not boxed: nearly every item is a delivery, moved
/// once into its batch.
#[allow(clippy::large_enum_variant)]
enum Taken {
    /// A delivery from queue `k`, or the error of its consumer.
    Delivery(usize, Result<Delivery, lapin::Error>),
    /// The consumer of queue `k` (in the session's list) ended.
    Ended(usize),
}

/// Why taking deliveries stopped.
enum Stop {
    Failed(SessionError),
    /// The consumer of queue `k` ended: our own cancel, or the broker's.
    Ended(usize),
}

/// The longest a session waits before it tries again to set up a sharded inbound's
/// exchange the broker refused (no plugin, no permission, no answer).
const EXCHANGE_RETRY: Duration = Duration::from_secs(30);
/// Most deliveries taken into one batch (one Redis round trip).
const MAX_BATCH: usize = 512;
/// Most deliveries one queue of several (the shards of a sharded inbound) puts in a batch.
const MAX_BATCH_PER_QUEUE: usize = 64;
/// How long a batch may wait for more deliveries after its first one.
const BATCH_GATHER: Duration = Duration::from_micros(500);
/// Batches in the pipeline at once (from their Redis check to their confirms). While they
/// run, deliveries queue up and the next batch takes them all: under load batches grow,
/// when idle a message goes alone.
const BATCHES_IN_FLIGHT: usize = 2;
/// Wait before handing a message back after a failed publish, so a broken route does not
/// become a hot redelivery loop.
const HAND_BACK_DELAY: Duration = Duration::from_millis(200);
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(10);
const HOLD_RETRY_MIN: Duration = Duration::from_millis(50);
const HOLD_RETRY_MAX: Duration = Duration::from_secs(2);
/// Longest a message is held before it is handed back to the broker anyway: well under
/// RabbitMQ's consumer timeout (30 minutes by default), which would close the channel.
const MAX_HOLD: Duration = Duration::from_secs(10 * 60);
/// Each step of closing a session (final acks, channel, connections) is bounded, so a
/// stop fits in the shutdown grace plus a few seconds.
const CLOSE_STEP: Duration = Duration::from_secs(2);

fn backoff(min: Duration, max: Duration) -> ExponentialBackoff {
    ExponentialBuilder::new()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("broker connection failed: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker cancelled the consumer")]
    ConsumerCancelled,
    #[error("a connection reported an error: {0}")]
    ConnectionLost(String),
    #[error("{0}: ending the session so no ack can cover an unseen delivery")]
    TagGap(#[from] TagGap),
}

/// Where a session's consume loop stands.
enum Phase {
    /// Taking deliveries.
    Consuming,
    /// Stopping: the consumer is cancelled, and what the broker had already sent is
    /// still taken and processed, until the consumer's stream ends.
    Stopping,
    /// Taking no more: the stream ended or the consumer is gone. What is in flight
    /// finishes until the deadline, then the rest is handed back by closing the channel.
    Draining,
}

/// The gate: the pipeline every session feeds, and the reconnect loop.
pub struct Gate {
    config: Arc<Config>,
    pipeline: Pipeline,
    metrics: Metrics,
    health: Arc<Health>,
    brokers: Arc<Brokers>,
    /// Numbers the sessions, so that delivery tags of different sessions never meet.
    sessions: AtomicU64,
    /// The broker's `max_message_size`, once a refusal told it in this session.
    max_body: Arc<AtomicU64>,
}

/// What every batch of one session shares.
struct Session<'a> {
    id: u64,
    /// Most deliveries held at once for keys Redis cannot count: past it, such a message
    /// is handed back (after a pause) instead, so one bad key never fills the prefetch
    /// window and stops the others.
    max_held: usize,
    publisher: &'a Publisher,
    /// Cancelled when a connection is lost: the session ends.
    lost: &'a CancellationToken,
    shutdown: &'a CancellationToken,
    tracker: &'a Mutex<AckTracker>,
    settle: &'a mpsc::UnboundedSender<Settlement>,
}

/// Deliveries held for Redis: the number of tries so far, and since when.
struct Held {
    deliveries: Vec<Delivery>,
    tries: u32,
    since: Instant,
}

impl Gate {
    pub fn new(
        config: Arc<Config>,
        pipeline: Pipeline,
        metrics: Metrics,
        health: Arc<Health>,
        brokers: Brokers,
    ) -> Self {
        Self {
            config,
            pipeline,
            metrics,
            health,
            brokers: Arc::new(brokers),
            sessions: AtomicU64::new(0),
            max_body: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }

    /// Consumes until `shutdown` is cancelled, reconnecting after every failure. Never
    /// returns because of a transient outage.
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut delays = backoff(RECONNECT_MIN, RECONNECT_MAX);
        loop {
            let mut consumed = false;
            let result = self.session(&shutdown, &mut consumed).await;
            self.health.set_consuming(false);
            self.metrics.in_flight.set(0.0);
            self.metrics.held.set(0.0);
            self.health.progress(false, 0);
            let Err(e) = result else { return };
            if shutdown.is_cancelled() {
                return;
            }
            // A session that got as far as consuming was healthy: start the backoff from
            // the bottom again.
            if consumed {
                delays = backoff(RECONNECT_MIN, RECONNECT_MAX);
            }
            let delay = delays.next().unwrap_or(RECONNECT_MAX);
            self.metrics.amqp_reconnects.increment(1);
            let error = self.config.scrub(&e.to_string());
            warn!(%error, retry_in_ms = delay.as_millis() as u64, "session ended; reconnecting");
            self.health.set_broker_error(Some(error));
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// One pair of connections, from connect to the end of its consumer.
    async fn session(
        &self,
        shutdown: &CancellationToken,
        consumed: &mut bool,
    ) -> Result<(), SessionError> {
        let brokers = &self.brokers;
        let Some(consume_conn) = until_stopped(shutdown, brokers.connect_next("consume")).await
        else {
            return Ok(());
        };
        let (consume_conn, broker) = consume_conn?;
        // Learned afresh per session: the limit may have been raised, or this node's differ.
        self.max_body.store(u64::MAX, Ordering::Relaxed);
        // Both connections on one node: a node that fails takes the whole session with it,
        // not half of it.
        let publish_conn =
            match until_stopped(shutdown, brokers.connect_to(broker, "publish")).await {
                Some(Ok(conn)) => Arc::new(conn),
                other => {
                    close(&consume_conn).await;
                    return match other {
                        Some(Err(e)) => Err(e.into()),
                        _ => Ok(()),
                    };
                }
            };
        // Watchers stop before the connections close, so a deliberate close is not
        // reported as a connection error.
        let watching = CancellationToken::new();
        let result = self
            .consume(
                &consume_conn,
                &publish_conn,
                broker,
                shutdown,
                &watching,
                consumed,
            )
            .await;
        self.health.set_consuming(false);
        watching.cancel();
        if result.is_ok() {
            close(&consume_conn).await;
            close(&publish_conn).await;
        } else {
            // A lost session must not wait for a goodbye from a connection that may be
            // silently dead (its close would time out): the next session starts now.
            tokio::spawn(async move {
                close(&consume_conn).await;
                close(&publish_conn).await;
            });
        }
        result
    }

    async fn consume(
        &self,
        consume_conn: &Connection,
        publish_conn: &Arc<Connection>,
        broker: usize,
        shutdown: &CancellationToken,
        watching: &CancellationToken,
        consumed: &mut bool,
    ) -> Result<(), SessionError> {
        let amqp = &self.config.amqp;
        // Declared before the watchers start: a queue that exists with other arguments
        // closes its declaring channel, which the connection reports as an error event,
        // and that is not a lost connection.
        if amqp.declare_queues {
            match until_stopped(shutdown, amqp::declare_queues(publish_conn, amqp)).await {
                Some(declared) => declared?,
                None => return Ok(()),
            }
        }
        // The defer ladder, when a rule defers, before the first message: a refusal makes
        // the gate not ready (deferrals become rejections), never ends the session.
        let mut keeper = LadderKeeper::new(
            publish_conn.clone(),
            self.config.clone(),
            self.pipeline.rules(),
            self.pipeline.parking(),
            self.health.clone(),
        );
        if until_stopped(shutdown, keeper.look()).await.is_none() {
            return Ok(());
        }
        // Shards a larger `inbound_shards` left behind are consumed until an operator
        // deletes them, so nothing is stranded in them.
        let Some(retired) =
            until_stopped(shutdown, shards::retired_shards(publish_conn, amqp)).await
        else {
            return Ok(());
        };
        let mut queues = vec![amqp.inbound_queue.clone()];
        queues
            .extend((0..amqp.inbound_shards).map(|k| shards::shard_queue(&amqp.inbound_queue, k)));
        queues.extend(retired.iter().cloned());
        let lost = watching.child_token();
        let (flow_tx, mut flow) = watch::channel(true);
        watch_connection(
            consume_conn,
            lost.clone(),
            None,
            self.metrics.clone(),
            self.config.clone(),
            self.health.clone(),
        );
        watch_connection(
            publish_conn,
            lost.clone(),
            Some(flow_tx),
            self.metrics.clone(),
            self.config.clone(),
            self.health.clone(),
        );
        let tag = format!("konstruct-gate-{}", amqp::instance_name());
        // Consumers of retired shards come last: such a consumer may end (an operator
        // deleted the emptied shard) without ending the session.
        let first_retired = queues.len() - retired.len();
        // One consumer per queue, on one channel (so one sequence of delivery tags), each
        // with its own prefetch window: one shard's backlog never takes another's slots.
        let tags: Vec<ShortString> = (0..queues.len())
            .map(|k| match queues.len() {
                1 => ShortString::from(tag.clone()),
                // The index, not the queue's name: a tag is at most 255 bytes.
                _ => ShortString::from(format!("{tag}/{k}")),
            })
            .collect();
        let setup = async {
            let publisher = Publisher::new(
                publish_conn.clone(),
                self.max_body.clone(),
                self.metrics.clone(),
                Duration::from_millis(amqp.confirm_timeout_ms),
                flow.clone(),
            )
            .await?;
            let channel = consume_conn.create_channel().await?;
            channel
                .basic_qos(amqp.prefetch, BasicQosOptions::default())
                .await?;
            let mut consumers = Vec::with_capacity(queues.len());
            for (k, (queue, tag)) in queues.iter().zip(&tags).enumerate() {
                let consumer = channel
                    .basic_consume(
                        ShortString::from(queue.as_str()),
                        tag.clone(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                // Each consumer's end is an item of its own, so the merged stream says
                // which consumer ended instead of silently going on without it.
                let consumer = consumer.map(move |d| Taken::Delivery(k, d));
                // A shard's deliveries are counted by routing key (the tenant) for
                // `/shards/top`; the plain queue's routing key is its own name.
                let consumer = if k == 0 {
                    consumer.boxed()
                } else {
                    let (health, queue) = (self.health.clone(), queue.clone());
                    consumer
                        .inspect(move |delivery| {
                            if let Taken::Delivery(_, Ok(d)) = delivery {
                                health.top.record(&queue, [d.routing_key.as_str()]);
                            }
                        })
                        .boxed()
                };
                let end = futures::stream::once(async move { Taken::Ended(k) });
                consumers.push(consumer.chain(end).boxed());
            }
            Ok::<_, lapin::Error>((publisher, channel, futures::stream::select_all(consumers)))
        };
        let Some(setup) = until_stopped(shutdown, setup).await else {
            return Ok(());
        };
        let (publisher, channel, mut consumer) = setup?;
        self.health.set_consuming(true);
        self.health.set_broker_error(None);
        *consumed = true;
        info!(queue = %amqp.inbound_queue, queues = queues.len(), prefetch = amqp.prefetch, "consuming");
        tokio::spawn(keeper.run(lost.clone()));
        if amqp.inbound_shards > 0 && amqp.declare_queues {
            // Not ready until the exchange is there: a gateway publishing to it meanwhile
            // would have its messages refused.
            self.health.set_shard_error(
                Some("the sharded inbound's exchange is being set up".into()),
                self.health.no_hash_exchange(),
            );
            tokio::spawn(keep_exchange(
                self.brokers.clone(),
                broker,
                self.config.clone(),
                self.health.clone(),
                lost.clone(),
            ));
        }

        let tracker = Mutex::new(AckTracker::default());
        let (settle_tx, settle_rx) = mpsc::unbounded_channel();
        let acks = send_settlements(channel.clone(), settle_rx);
        tokio::pin!(acks);
        let session = Session {
            id: self.sessions.fetch_add(1, Ordering::Relaxed),
            max_held: usize::from(amqp.prefetch / 2).max(1),
            publisher: &publisher,
            lost: &lost,
            shutdown,
            tracker: &tracker,
            settle: &settle_tx,
        };
        let batch_slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
        let mut slot: Option<OwnedSemaphorePermit> = None;
        let mut in_flight = FuturesUnordered::new();
        let mut phase = Phase::Consuming;
        let mut acks_ended = false;
        let mut result = Ok(());
        let deadline = tokio::time::sleep(Duration::MAX);
        tokio::pin!(deadline);
        // With several queues, a batch takes at most this many deliveries from one of them.
        let per_queue = if tags.len() > 1 {
            MAX_BATCH_PER_QUEUE
        } else {
            MAX_BATCH
        };
        let mut from = vec![0; tags.len()];
        // Consumers ended (after our own cancel, or a retired shard's before it).
        let mut ended = 0;

        loop {
            let taking = matches!(phase, Phase::Consuming | Phase::Stopping) && *flow.borrow();
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if matches!(phase, Phase::Consuming) => {
                    self.health.set_consuming(false);
                    info!(in_flight = in_flight.len(), "stopping: cancelling the consumer and draining");
                    deadline.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(amqp.shutdown_grace_seconds));
                    let cancel = async {
                        for tag in &tags {
                            channel.basic_cancel(tag.clone(), BasicCancelOptions::default()).await?;
                        }
                        Ok::<_, lapin::Error>(())
                    };
                    phase = match tokio::time::timeout(CLOSE_STEP, cancel).await {
                        Ok(Ok(())) => Phase::Stopping,
                        Ok(Err(e)) => {
                            warn!(error = %self.config.scrub(&e.to_string()), "basic.cancel failed");
                            Phase::Draining
                        }
                        Err(_) => {
                            warn!("basic.cancel got no answer; closing the channel hands back the rest");
                            Phase::Draining
                        }
                    };
                }
                _ = &mut deadline => {
                    warn!(in_flight = in_flight.len(), "grace period over: handing back unfinished messages");
                    break;
                }
                _ = lost.cancelled() => {
                    result = Err(SessionError::ConnectionLost("see the previous log line".into()));
                    break;
                }
                ended = &mut acks => {
                    acks_ended = true;
                    let reason = ended.err().map_or_else(|| "the acknowledgement channel closed".to_owned(), |e| e.to_string());
                    result = Err(SessionError::ConnectionLost(reason));
                    break;
                }
                Some(held) = in_flight.next(), if !in_flight.is_empty() => {
                    if let Some(held) = held as Option<Held> {
                        in_flight.push(self.handle(held.deliveries, Some((held.tries, held.since)), None, &session));
                    }
                }
                changed = flow.changed() => {
                    if changed.is_err() {
                        result = Err(SessionError::ConnectionLost("the publishing connection's events ended".into()));
                        break;
                    }
                }
                permit = batch_slots.clone().acquire_owned(), if taking && slot.is_none() => {
                    slot = permit.ok();
                }
                next = consumer.next(), if taking && slot.is_some() => {
                    let (batch, end) = gather(&mut consumer, next, per_queue, &mut from).await;
                    if !batch.is_empty() {
                        let received = {
                            let mut t = tracker.lock().expect("the ack tracker is never poisoned");
                            let received = batch.iter().try_for_each(|d| t.received(d.delivery_tag));
                            self.metrics.in_flight.set(t.unsettled() as f64);
                            self.health.progress(false, t.unsettled() - t.held());
                            received
                        };
                        if let Err(gap) = received {
                            result = Err(gap.into());
                            break;
                        }
                        in_flight.push(self.handle(batch, None, slot.take(), &session));
                    }
                    if let Some(Stop::Ended(_)) = end {
                        ended += 1;
                    }
                    match (end, &phase) {
                        (None, _) => {}
                        // Our own cancel: everything the broker sent was taken; the rest of
                        // the grace period is for what is in flight.
                        (Some(Stop::Ended(_)), Phase::Stopping) => {
                            if ended == tags.len() {
                                phase = Phase::Draining;
                            }
                        }
                        (Some(Stop::Failed(_)), Phase::Stopping) => phase = Phase::Draining,
                        // A retired shard deleted once empty: the others go on. (One whose
                        // consumer the broker cancelled for another reason still exists,
                        // and ends the session below, to be consumed again.)
                        (Some(Stop::Ended(k)), Phase::Consuming)
                            if k >= first_retired
                                && ended < tags.len()
                                && !shards::exists(publish_conn, &queues[k]).await =>
                        {
                            info!(queue = %queues[k], "a retired shard is gone; consuming the others");
                        }
                        (Some(end), _) => {
                            // The consumer is gone; what is in flight gets a moment to
                            // finish (its acks may fail, and the broker redelivers those).
                            result = Err(match end {
                                Stop::Failed(e) => e,
                                Stop::Ended(_) => SessionError::ConsumerCancelled,
                            });
                            phase = Phase::Draining;
                            deadline.as_mut().reset(tokio::time::Instant::now() + HAND_BACK_DELAY);
                        }
                    }
                }
            }
            if matches!(phase, Phase::Draining) && in_flight.is_empty() {
                break;
            }
        }
        // Whatever is still in flight is dropped unsettled: closing the channel hands it
        // back. What was settled is sent first, also what waits behind a tag never seen.
        drop(in_flight);
        self.update_tracker(&session, |t, out| t.flush(out));
        drop(settle_tx);
        // The settlement sender may have ended already (that ended the loop): a finished
        // future must not be polled again.
        if !acks_ended {
            let _ = tokio::time::timeout(CLOSE_STEP, &mut acks).await;
        }
        let _ =
            tokio::time::timeout(CLOSE_STEP, channel.close(200, ShortString::from("bye"))).await;
        result
    }

    /// Runs one batch through the pipeline and settles what it can. `held`: the batch
    /// was held (tries so far, since when), and waits its backoff first. Returns what is
    /// (still) held.
    async fn handle(
        &self,
        batch: Vec<Delivery>,
        held: Option<(u32, Instant)>,
        batch_slot: Option<OwnedSemaphorePermit>,
        session: &Session<'_>,
    ) -> Option<Held> {
        let (tries, since) = held.unwrap_or((0, Instant::now()));
        if tries > 0 {
            let delay = backoff(HOLD_RETRY_MIN, HOLD_RETRY_MAX)
                .nth(tries.min(16) as usize - 1)
                .unwrap_or(HOLD_RETRY_MAX);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                // Stopping: whatever waits for Redis goes back to the broker now.
                _ = session.shutdown.cancelled() => {
                    self.hand_back(batch.iter().map(|d| d.delivery_tag), session);
                    return None;
                }
            }
            if since.elapsed() >= MAX_HOLD {
                warn!(
                    count = batch.len(),
                    "messages held for Redis too long: handed back to the broker"
                );
                self.hand_back(batch.iter().map(|d| d.delivery_tag), session);
                return None;
            }
        }
        self.metrics.batch_size.record(batch.len() as f64);
        debug!(size = batch.len(), tries, "batch");
        let fates = self
            .pipeline
            .run(&batch, session.publisher, tries > 0, session.id)
            .await;
        // Measured: holding the slot until the batch is published (not only until Redis
        // answered) makes batches larger under load, which costs less CPU per message.
        drop(batch_slot);

        // Held messages of other batches, and room for more.
        let held_elsewhere = {
            let t = session
                .tracker
                .lock()
                .expect("the ack tracker is never poisoned");
            t.held()
                .saturating_sub(if tries > 0 { batch.len() } else { 0 })
        };
        let mut room = session.max_held.saturating_sub(held_elsewhere);
        let mut settle_now = Vec::with_capacity(batch.len());
        let mut hand_back_later = Vec::new();
        let mut failure = None;
        let mut still_held = Vec::new();
        for (delivery, fate) in batch.into_iter().zip(fates) {
            let tag = delivery.delivery_tag;
            match fate {
                Fate::HandBack(e) => {
                    // A channel the broker closed was opened again (and the publish tried
                    // again) unless its connection is gone too.
                    let lost = match &e {
                        PublishError::ConfirmTimeout(_) => true,
                        PublishError::Channel(_) => {
                            !session.publisher.channel().status().connected()
                        }
                        _ => false,
                    };
                    if lost {
                        session.lost.cancel();
                    }
                    self.metrics.publish_failures.increment(1);
                    failure.get_or_insert(e);
                    hand_back_later.push(tag);
                }
                // A key that Redis cannot count stays so until an operator repairs it:
                // its messages may not take the whole prefetch window.
                Fate::Held { key_fault: true } if room == 0 => hand_back_later.push(tag),
                // Redis itself failing: every message waits, and the prefetch window
                // bounds how many (the broker sends no more until they settle).
                Fate::Held { key_fault } => {
                    room = room.saturating_sub(1);
                    settle_now.push((tag, Fate::Held { key_fault }));
                    still_held.push(delivery);
                }
                done => settle_now.push((tag, done)),
            }
        }
        // What was confirmed is acked now; what failed goes back after a pause, so a broken
        // route (or a key that keeps failing) does not become a hot redelivery loop.
        self.settle(settle_now, session);
        if !hand_back_later.is_empty() {
            let pause = match failure {
                Some(e) => {
                    warn!(count = hand_back_later.len(), error = %self.config.scrub(&e.to_string()), "messages handed back for redelivery");
                    HAND_BACK_DELAY
                }
                None => {
                    warn!(
                        count = hand_back_later.len(),
                        max_held = session.max_held,
                        "too many messages held for keys Redis cannot count: handing these back"
                    );
                    HOLD_RETRY_MAX
                }
            };
            tokio::time::sleep(pause).await;
            self.hand_back(hand_back_later, session);
        }
        (!still_held.is_empty()).then(|| Held {
            deliveries: still_held,
            tries: tries.saturating_add(1),
            since,
        })
    }

    /// Hands deliveries back to the broker.
    fn hand_back(&self, tags: impl IntoIterator<Item = u64>, session: &Session<'_>) {
        self.update_tracker(session, |t, out| {
            for tag in tags {
                t.settle(tag, false, out);
            }
        });
    }

    /// Tells the tracker each delivery's fate and sends what can be settled.
    fn settle(&self, fates: Vec<(u64, Fate)>, session: &Session<'_>) {
        self.update_tracker(session, |t, out| {
            for (tag, fate) in fates {
                match fate {
                    Fate::Held { .. } => t.hold(tag, out),
                    Fate::HandBack(_) => t.settle(tag, false, out),
                    Fate::Done(outcome) => {
                        t.settle(tag, true, out);
                        match outcome {
                            Outcome::Allowed | Outcome::Shadowed | Outcome::Unchecked => {
                                self.metrics.allowed.increment(1)
                            }
                            Outcome::Rejected => self.metrics.rejected.increment(1),
                            Outcome::RejectedQuiet => self.metrics.rejected_quiet.increment(1),
                            Outcome::Deferred => self.metrics.deferred.increment(1),
                            Outcome::Duplicate => self.metrics.duplicate.increment(1),
                            Outcome::Invalid => self.metrics.invalid.increment(1),
                        }
                    }
                }
            }
        });
    }

    /// Changes the tracker, keeps the gauges exact, and sends the settlements that
    /// follow, all under the lock, so they reach the broker in tag order.
    fn update_tracker(
        &self,
        session: &Session<'_>,
        change: impl FnOnce(&mut AckTracker, &mut Vec<Settlement>),
    ) {
        let mut settlements = Vec::new();
        let mut t = session
            .tracker
            .lock()
            .expect("the ack tracker is never poisoned");
        change(&mut t, &mut settlements);
        self.metrics.in_flight.set(t.unsettled() as f64);
        self.metrics.held.set(t.held() as f64);
        self.health
            .progress(!settlements.is_empty(), t.unsettled() - t.held());
        for s in settlements {
            let _ = session.settle.send(s);
        }
    }
}

/// Takes everything the broker has already sent after `first`, up to a batch: one Redis
/// round trip then serves all of it. Returns the batch, and why taking stopped if it did
/// (one consumer's end, our own cancel or the broker's, is told to the caller, whose phase
/// decides what it means).
async fn gather(
    consumer: &mut Inbound,
    first: Option<Taken>,
    per_queue: usize,
    from: &mut [usize],
) -> (Vec<Delivery>, Option<Stop>) {
    let mut batch = Vec::new();
    let stop_of = |taken: Option<Taken>| match taken {
        Some(Taken::Delivery(_, Err(e))) => Some(Stop::Failed(e.into())),
        Some(Taken::Ended(k)) => Some(Stop::Ended(k)),
        // Every consumer's end comes first as its own item.
        None => Some(Stop::Failed(SessionError::ConsumerCancelled)),
        Some(Taken::Delivery(_, Ok(_))) => None,
    };
    // How many deliveries of the batch came from each queue.
    from.fill(0);
    let mut count = |k: usize| {
        let n = &mut from[k];
        *n += 1;
        *n
    };
    match first {
        Some(Taken::Delivery(k, Ok(delivery))) => {
            count(k);
            batch.push(delivery);
        }
        other => return (batch, stop_of(other)),
    }
    // Let a short burst gather: fewer, larger batches cost far fewer thread wake-ups than
    // many single messages.
    tokio::time::sleep(BATCH_GATHER).await;
    while batch.len() < MAX_BATCH {
        match consumer.next().now_or_never() {
            None => break,
            Some(Some(Taken::Delivery(k, Ok(delivery)))) => {
                batch.push(delivery);
                // One queue's backlog (a flooded shard) fills a batch only so far: the
                // batch ends, so that a delivery of another queue waits for one short
                // batch at most, not for two full ones.
                if count(k) >= per_queue {
                    break;
                }
            }
            Some(other) => return (batch, stop_of(other)),
        }
    }
    (batch, None)
}

/// Sets up the sharded inbound's exchange and bindings, on a connection of its own (a broker
/// without the plugin closes the connection that asks), until it works or the session ends.
/// Meanwhile the gate consumes every shard but is not ready, and says why once in the log
/// and in `/readyz`; whatever the broker answers, the session goes on.
async fn keep_exchange(
    brokers: Arc<Brokers>,
    broker: usize,
    config: Arc<Config>,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    let amqp = &config.amqp;
    // One bind per shard, one after the other.
    let budget = CLOSE_STEP * 5 + Duration::from_millis(20) * u32::from(amqp.inbound_shards);
    let mut delays = backoff(Duration::from_secs(1), EXCHANGE_RETRY);
    loop {
        let attempt = async {
            let conn = brokers.connect_to(broker, "declare").await?;
            let declared = shards::declare_exchange(&conn, amqp).await;
            close(&conn).await;
            declared
        };
        // An attempt of a session that ended says nothing about the next one's broker.
        let outcome = tokio::select! {
            outcome = tokio::time::timeout(budget, attempt) => outcome,
            _ = stop.cancelled() => return,
        };
        let (reason, no_plugin) = match outcome {
            Ok(Ok(())) => {
                health.set_shard_error(None, false);
                return;
            }
            Ok(Err(e)) => (
                config.scrub(&e.to_string()),
                matches!(e, shards::ShardError::NoPlugin),
            ),
            Err(_) => (
                format!(
                    "the sharded inbound cannot be set up: the broker did not answer within {} s",
                    budget.as_secs()
                ),
                false,
            ),
        };
        if health.set_shard_error(Some(reason.clone()), no_plugin) {
            error!("{reason}");
        }
        let delay = delays.next().unwrap_or(EXCHANGE_RETRY);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Sends settlements to the broker in the order they were made, collapsing a run of
/// cumulative acks into its last one. Ends when every sender is gone, or with the
/// channel's error.
async fn send_settlements(
    channel: lapin::Channel,
    mut rx: mpsc::UnboundedReceiver<Settlement>,
) -> Result<(), lapin::Error> {
    let mut batch = Vec::with_capacity(256);
    let alone = BasicAckOptions { multiple: false };
    let requeue = BasicNackOptions {
        requeue: true,
        multiple: false,
    };
    while rx.recv_many(&mut batch, 1024).await > 0 {
        let mut pending_ack: Option<u64> = None;
        for settlement in batch.drain(..) {
            if let Settlement::AckUpTo(tag) = settlement {
                pending_ack = Some(tag);
                continue;
            }
            if let Some(up_to) = pending_ack.take() {
                channel
                    .basic_ack(up_to, BasicAckOptions { multiple: true })
                    .await?;
            }
            match settlement {
                Settlement::Ack(tag) => channel.basic_ack(tag, alone).await?,
                Settlement::Requeue(tag) => channel.basic_nack(tag, requeue).await?,
                Settlement::AckUpTo(_) => unreachable!("handled above"),
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
    config: Arc<Config>,
    health: Arc<Health>,
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
                // One channel closed, not the connection: its owner sees it (a consumer's
                // stream ends, a publisher opens a new channel).
                Event::Error(e) if amqp::is_channel_error(&e) => {
                    debug!(error = %config.scrub(&e.to_string()), "the broker closed a channel");
                }
                Event::Error(e) => {
                    error!(error = %config.scrub(&e.to_string()), "broker connection error");
                    lost.cancel();
                    break;
                }
                Event::ConnectionBlocked(reason) => {
                    if let Some(flow) = &flow {
                        warn!(%reason, "broker blocked publishing; pausing new deliveries");
                        metrics.publish_blocked.set(1.0);
                        health.set_publish_blocked(true);
                        let _ = flow.send(false);
                    }
                }
                Event::ConnectionUnblocked => {
                    if let Some(flow) = &flow {
                        info!("broker unblocked publishing; resuming");
                        metrics.publish_blocked.set(0.0);
                        health.set_publish_blocked(false);
                        let _ = flow.send(true);
                    }
                }
                _ => {}
            }
        }
        metrics.publish_blocked.set(0.0);
        health.set_publish_blocked(false);
    });
}

async fn close(conn: &Connection) {
    if conn.status().connected() {
        let _ = tokio::time::timeout(CLOSE_STEP, conn.close(200, ShortString::from("bye"))).await;
    }
}

/// Runs `work` unless the gate is asked to stop first (then `None`): setting up a session
/// against an unresponsive broker must not delay a stop.
async fn until_stopped<T>(
    shutdown: &CancellationToken,
    work: impl Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        out = work => Some(out),
        _ = shutdown.cancelled() => None,
    }
}
