//! What happens to one batch of deliveries, top to bottom: parse → decide → route →
//! publish → confirm. Each delivery ends with a [`Fate`]; the session turns fates into
//! acks, requeues, or holds.
//!
//! A batch shares one Redis round trip, but every message gets its own answer: a key that
//! Redis cannot count fails only its own messages, and `limits.on_redis_error` applies to
//! them alone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use lapin::message::Delivery;
use lapin::types::ShortString;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::amqp::{PublishError, Publisher};
use crate::config::{Config, Notify, OnRedisError};
use crate::health::Health;
use crate::ladder::Parking;
use crate::limit::{
    Also, Answer, Check, Decision, Limiter, LiveRules, RejectionCache, Rules, Scope, also_key,
    back_tag, companion_base, done_key, key_for, line_tag, notified_key, sender_tag,
};
use crate::message::{self, Envelope, Invalid};
use crate::route::{self, DeferClock, Destination, Outcome, Verdict};
use crate::telemetry::Metrics;

/// Longest a batch with a deferral waits for the ladder to be known (declared, or refused).
const LADDER_WAIT: Duration = Duration::from_secs(10);

/// What became of one delivery after a pass through the pipeline.
#[derive(Debug)]
pub enum Fate {
    /// Its one output was confirmed: ack it.
    Done(Outcome),
    /// Its output could not be delivered: hand it back to the broker.
    HandBack(PublishError),
    /// Redis could not decide its check and `on_redis_error = hold`: keep it unacked and
    /// try again later. `key_fault`: the trouble is this message's alone (Redis answered, but
    /// cannot count its key; or, in a cluster, only its node fails), so such messages are
    /// capped; else Redis itself failed.
    Held { key_fault: bool },
}

/// The answer for one valid message, before routing.
#[derive(Debug, Clone, Copy)]
enum Decided {
    /// The verdict, and whether Redis gave it now (not the rejection cache).
    Verdict(Verdict, bool),
    Held {
        key_fault: bool,
    },
}

/// How early a message may come back from the ladder and still be checked: earlier, it
/// is parked again (a second) rather than ask Redis before its turn.
const EARLY_MS: u64 = 100;

/// Everything a batch needs, shared by every session.
pub struct Pipeline {
    config: Arc<Config>,
    rules: Arc<LiveRules>,
    /// Rejections answered without Redis while a key cannot allow anyway.
    cache: RejectionCache,
    limiter: Limiter,
    metrics: Metrics,
    health: Arc<Health>,
    /// The defer ladder's queues, by their seconds.
    ladder: Vec<(u64, String)>,
    /// The ladder can take parked messages now (see [`crate::ladder::LadderKeeper`]).
    parking: Arc<watch::Sender<Parking>>,
}

impl Pipeline {
    pub fn new(
        config: Arc<Config>,
        rules: Arc<LiveRules>,
        limiter: Limiter,
        metrics: Metrics,
        health: Arc<Health>,
    ) -> Self {
        let ladder = crate::amqp::DEFER_STEPS
            .iter()
            .map(|&seconds| {
                let queue = crate::amqp::defer_queue(&config.amqp, seconds);
                (seconds, queue)
            })
            .collect();
        Self {
            ladder,
            parking: Arc::new(watch::Sender::new(Parking::Unknown)),
            config,
            rules,
            cache: RejectionCache::default(),
            limiter,
            metrics,
            health,
        }
    }

    /// The live rules, shared.
    pub fn rules(&self) -> Arc<LiveRules> {
        self.rules.clone()
    }

    /// Whether the ladder can take parked messages, shared with its keeper.
    pub fn parking(&self) -> Arc<watch::Sender<Parking>> {
        self.parking.clone()
    }

    /// Runs one batch through; one fate per delivery, in order. `retry`: the batch was
    /// held before (its Redis failure was already logged, and a timed-out call may have
    /// counted it, so only Redis may answer it). `session` tells this session's delivery
    /// tags apart from another's.
    pub async fn run(
        &self,
        batch: &[Delivery],
        publisher: &Publisher,
        retry: bool,
        session: u64,
    ) -> Vec<Fate> {
        // One snapshot per batch: a reload never changes the rules halfway through.
        let rules = self.rules.snapshot();
        let now_ms = self.limiter.now_ms();
        let settings = rules.settings;
        let parsed: Vec<Result<Envelope<'_>, Invalid>> = batch
            .iter()
            .map(|d| {
                message::parse(&d.data, settings.max_message_bytes)
                    .and_then(|envelope| route::cost(&d.properties).map(|_| envelope))
            })
            .collect();
        // Each check, and whether its id is a token of the gate's (not the message's own).
        let (checks, tokens): (Vec<Check>, Vec<bool>) = batch
            .iter()
            .zip(&parsed)
            .filter_map(|(delivery, parsed)| {
                let envelope = parsed.as_ref().ok()?;
                Some(self.check(delivery, envelope, &rules, retry, session, now_ms))
            })
            .unzip();
        let mut decided = self.decide(&checks, &rules, retry).await;
        let clock = DeferClock {
            // Redis's clock: every gate writes the same first arrival for the same moment.
            now_ms,
            max_defer_seconds: settings.max_defer_seconds,
            can_park: self.can_park(&checks, &decided).await,
        };
        if settings.notify == Notify::OncePerWindow {
            self.tell_final_rejections_once(batch, &parsed, &checks, &mut decided, clock)
                .await;
        }

        let mut decided = decided.into_iter().zip(checks.iter().zip(&tokens));
        let mut fates: Vec<Option<Fate>> = Vec::with_capacity(batch.len());
        let mut outputs = Vec::with_capacity(batch.len());
        for (i, (delivery, parsed)) in batch.iter().zip(&parsed).enumerate() {
            let (verdict, check, done) = match parsed {
                Err(_) => (None, None, None),
                Ok(_) => match decided.next().expect("one answer per valid message") {
                    (Decided::Held { key_fault }, _) => {
                        fates.push(Some(Fate::Held { key_fault }));
                        continue;
                    }
                    (Decided::Verdict(verdict, from_redis), (check, &token)) => (
                        Some((as_routed(verdict, delivery.redelivered, retry), check.rule)),
                        // Only a fresh decision Redis keeps by the message's own id can be
                        // marked forwarded: a token is never seen again once settled.
                        match verdict {
                            Verdict::Checked(a)
                                if from_redis
                                    && !a.replayed
                                    && !token
                                    && !check.message_id.is_empty() =>
                            {
                                Some(check)
                            }
                            _ => None,
                        },
                        Some(check.done_key.as_str()).filter(|key| !key.is_empty()),
                    ),
                },
            };
            let mut output = route::output(
                &delivery.data,
                &delivery.properties,
                parsed,
                verdict,
                clock,
                publisher.max_body(),
            );
            // A rejection nobody is told about: during a flood most of them, and with
            // `quiet_rejections = "drop"` they cost the broker no publish at all.
            if output.outcome == Outcome::Rejected
                && settings.drop_quiet
                && matches!(
                    verdict,
                    Some((
                        Verdict::Checked(Answer {
                            decision: Decision::Rejected {
                                notify_user: false,
                                ..
                            },
                            ..
                        }),
                        _
                    ))
                )
            {
                output.outcome = Outcome::RejectedQuiet;
                output.to = Destination::Done;
            }
            self.observe(delivery, parsed, verdict, output.outcome);
            fates.push(None);
            outputs.push((i, output, check, verdict, done));
        }
        // Every publish is sent before any confirm is awaited.
        let parsed = &parsed;
        let published = join_all(outputs.into_iter().map(
            |(i, mut output, check, mut verdict, done)| async move {
                let delivery = &batch[i];
                let (mut renewed, mut clock) = (false, clock);
                // Routed again after a failed publish, with what it taught.
                let reroute = |verdict, clock| {
                    route::output(
                        &delivery.data,
                        &delivery.properties,
                        &parsed[i],
                        verdict,
                        clock,
                        publisher.max_body(),
                    )
                };
                loop {
                    let outcome = output.outcome;
                    let Some(queue) = self.queue(output.to) else {
                        return (i, Ok(outcome), None, None);
                    };
                    // Only a final output marks the id done: a parked message comes back.
                    let done = done.filter(|_| !matches!(output.to, Destination::Defer(_)));
                    // A sharded inbound's ladder is published to through a fanout
                    // exchange per step, keyed by the tenant the copy returns to.
                    let (exchange, routing_key) = match (&output.to, &parsed[i]) {
                        (Destination::Defer(_), Ok(envelope))
                            if self.config.amqp.inbound_shards > 0 =>
                        {
                            (queue, envelope.tenant_id.as_ref())
                        }
                        _ => ("", queue),
                    };
                    match publisher
                        .publish_via(exchange, routing_key, &output.body, output.properties)
                        .await
                    {
                        // A step of the ladder is missing: its queue (the copy is returned)
                        // or, sharded, its exchange (the channel closed; opened again here,
                        // before any other retry). Rejected instead, and no more parking
                        // until the ladder is back.
                        Err(ref e)
                            if matches!(output.to, Destination::Defer(_))
                                && clock.can_park
                                && match e {
                                    PublishError::Returned { .. } | PublishError::Nacked => true,
                                    PublishError::Channel(e) => {
                                        crate::amqp::is_not_found(e) && publisher.renew().await
                                    }
                                    _ => false,
                                } =>
                        {
                            self.parking.send_replace(Parking::Unusable);
                            let reason = format!(
                                "the defer ladder's step {queue} is missing or refuses messages, so messages over a deferring limit are rejected"
                            );
                            if self.health.set_ladder_error(Some(reason.clone())) {
                                warn!("{reason}");
                            }
                            clock.can_park = false;
                            output = reroute(verdict, clock);
                        }
                        // The broker closed the channel (this message too large for it, or
                        // another one in flight on it): once on a new channel, routed again
                        // with what the refusal taught.
                        Err(ref e @ (PublishError::Channel(_) | PublishError::TooLarge { .. }))
                            if !renewed && publisher.renew().await =>
                        {
                            renewed = true;
                            // Closed by another message's refusal: the broker may have
                            // routed this one before, so a second forward is marked.
                            if matches!(e, PublishError::Channel(_)) {
                                verdict = verdict.map(|(v, rule)| (maybe_sent(v), rule));
                            }
                            output = reroute(verdict, clock);
                        }
                        result => return (i, result.map(|()| outcome), check, done),
                    }
                }
            },
        ))
        .await;
        let mut confirmed = Vec::new();
        let mut done_keys = Vec::new();
        for (i, result, check, done) in published {
            if result.is_ok()
                && let Some(check) = check
            {
                confirmed.push(check);
            }
            if result.is_ok()
                && let Some(done) = done
            {
                done_keys.push(done.to_owned());
            }
            fates[i] = Some(match result {
                Ok(outcome) => Fate::Done(outcome),
                Err(e) => Fate::HandBack(e),
            });
        }
        self.limiter.mark_forwarded(&confirmed);
        // `duplicates = "drop"`: the marks land before the acks.
        if let Some(window) = settings.drop_duplicates {
            self.limiter
                .mark_done(&done_keys, window.saturating_mul(1000))
                .await;
        }
        fates
            .into_iter()
            .map(|f| f.expect("every delivery has a fate"))
            .collect()
    }

    /// Whether this batch's deferrals may park. Only asked when one of its messages is over
    /// a deferring limit; while the ladder is not known yet (a session just began, or a
    /// rule was just switched to defer) the batch waits for its keeper, so that no
    /// deferral becomes a rejection only because it came first.
    async fn can_park(&self, checks: &[Check], decided: &[Decided]) -> bool {
        let deferring = checks.iter().zip(decided).any(|(check, decided)| {
            check.rule.defer
                && matches!(
                    decided,
                    Decided::Verdict(
                        Verdict::Checked(Answer {
                            decision: Decision::Rejected { .. },
                            ..
                        }),
                        _
                    )
                )
        });
        if !deferring {
            return false;
        }
        let mut state = self.parking.subscribe();
        let known =
            tokio::time::timeout(LADDER_WAIT, state.wait_for(|s| *s != Parking::Unknown)).await;
        matches!(known, Ok(Ok(s)) if *s == Parking::Ready)
    }

    /// A deferring rule sets no quiet-rejection marker while it parks (the sender is told
    /// nothing then), so its final rejection (past `max_defer_seconds`, or with no ladder)
    /// claims the marker now: told once per window like any other rejection.
    async fn tell_final_rejections_once(
        &self,
        batch: &[Delivery],
        parsed: &[Result<Envelope<'_>, Invalid>],
        checks: &[Check],
        decided: &mut [Decided],
        clock: DeferClock,
    ) {
        let valid = batch
            .iter()
            .zip(parsed)
            .filter_map(|(delivery, parsed)| Some((delivery, parsed.as_ref().ok()?)));
        let mut claims = Vec::new();
        for (j, ((delivery, envelope), (check, decided))) in
            valid.zip(checks.iter().zip(decided.iter())).enumerate()
        {
            let Decided::Verdict(
                Verdict::Checked(Answer {
                    decision:
                        Decision::Rejected {
                            retry_after,
                            notify_user: true,
                            turn_ms,
                            ..
                        },
                    ..
                }),
                _,
            ) = *decided
            else {
                continue;
            };
            if !check.rule.defer || check.rule.shadow {
                continue;
            }
            let turn = route::turn_in(retry_after, turn_ms);
            if clock.can_park && route::deferral(&delivery.properties, turn, clock).is_some() {
                continue;
            }
            let algorithm = check.rule.algorithm;
            let tag = sender_tag(envelope.sender.map(|s| s.get()));
            let key = notified_key(&companion_base(algorithm, &check.key), &tag);
            claims.push(async move {
                let told = self
                    .limiter
                    .claim_notice(
                        &key,
                        &tag,
                        retry_after.saturating_mul(1000),
                        &check.message_id,
                    )
                    .await;
                (j, told)
            });
        }
        for (j, told) in join_all(claims).await {
            if let Decided::Verdict(
                Verdict::Checked(Answer {
                    decision: Decision::Rejected { notify_user, .. },
                    ..
                }),
                _,
            ) = &mut decided[j]
            {
                *notify_user = told;
            }
        }
    }

    /// The queue an output goes to; `None` when it is only acknowledged.
    fn queue(&self, to: Destination) -> Option<&str> {
        let amqp = &self.config.amqp;
        Some(match to {
            Destination::Orchestrator => &amqp.orchestrator_queue,
            Destination::Notifications => &amqp.notification_queue,
            Destination::DeadLetter => &amqp.dead_letter_queue,
            Destination::Defer(seconds) => self
                .ladder
                .iter()
                .find(|(step, _)| *step == seconds)
                .map(|(_, queue)| queue)
                .expect("every step of the ladder has a queue"),
            Destination::Done => return None,
        })
    }

    /// The check for one valid message under `rules`.
    fn check(
        &self,
        delivery: &Delivery,
        envelope: &Envelope<'_>,
        rules: &Rules,
        retry: bool,
        session: u64,
        now_ms: u64,
    ) -> (Check, bool) {
        let settings = rules.settings;
        let rule = rules.rule_for(&envelope.tenant_id, &envelope.channel);
        let key = key_for(
            rule.algorithm,
            &self.config.redis.key_prefix,
            &envelope.tenant_id,
            &envelope.channel,
        );
        // A rule that defers tells no sender while it parks: a quiet-rejection marker set
        // then would silence the notification of a message finally rejected.
        let notify_tag = match settings.notify {
            // A deferring rule keeps a line: a fresh message takes a turn in it (none
            // beyond `max_defer_seconds`), one back at its turn is checked, and takes a
            // new turn when over the limit again.
            // (No turn while the ladder is unusable: the message would be rejected, and
            // hold a turn nobody takes.) The longest wait is in whole seconds, as turns
            // are.
            _ if rule.defer && !rule.shadow && *self.parking.borrow() != Parking::Unusable => {
                let longest = settings.max_defer_seconds.saturating_mul(1000);
                match route::first_arrival(&delivery.properties) {
                    Some(first) => {
                        let left = longest.saturating_sub(now_ms.saturating_sub(first));
                        back_tag(left / 1000 * 1000)
                    }
                    None => line_tag(longest),
                }
            }
            _ if rule.defer => String::new(),
            Notify::Every => String::new(),
            Notify::OncePerWindow => sender_tag(envelope.sender.map(|s| s.get())),
        };
        let id = route::message_id(envelope, &delivery.properties).filter(|_| settings.count_once);
        let (message_id, token) = match (id, settings.on_redis_error) {
            // Back from the defer ladder, a message is decided afresh, not handed its
            // earlier "over the limit": each return counts under an id of its own.
            (Some(id), _) => match route::times_deferred(&delivery.properties) {
                0 => (id.to_owned(), false),
                n => (format!("{id}#deferred-{n}"), false),
            },
            // A held check is tried again, and a call that timed out may have counted it:
            // a token of this delivery (unique to this process, session and tag) lets the
            // retry get that decision back.
            (None, OnRedisError::Hold) => (
                format!(
                    "~{:016x}-{session}-{}",
                    crate::amqp::process_nonce(),
                    delivery.delivery_tag
                ),
                true,
            ),
            (None, OnRedisError::Allow) => (String::new(), false),
        };
        // `duplicates = "drop"`: by the message's own id (a message back from the ladder too).
        let done_key = match (
            settings.drop_duplicates,
            route::message_id(envelope, &delivery.properties),
        ) {
            (Some(_), Some(id)) => done_key(
                &self.config.redis.key_prefix,
                &envelope.tenant_id,
                &envelope.channel,
                id,
            ),
            _ => String::new(),
        };
        // The limits `[[limits.also]]` adds, each under its own key.
        let prefix = &self.config.redis.key_prefix;
        let also = rules
            .also_for(&envelope.tenant_id, &envelope.channel)
            .into_iter()
            .map(|(scope, rule)| {
                let sender = match scope {
                    Scope::Sender => sender_tag(envelope.sender.map(|s| s.get())),
                    _ => String::new(),
                };
                Also {
                    scope,
                    key: also_key(
                        scope,
                        rule.algorithm,
                        prefix,
                        &envelope.tenant_id,
                        &envelope.channel,
                        &sender,
                    ),
                    rule,
                    reserved: None,
                }
            })
            .collect();
        let check = Check {
            key,
            rule,
            // Read when the message was parsed: an invalid cost never gets this far.
            cost: route::cost(&delivery.properties).unwrap_or(1),
            also,
            notify_tag,
            message_id,
            redelivered: delivery.redelivered || retry,
            done_key,
            // Only a rule that still defers parks it again unasked; a second is no wait.
            // Back early by more than a moment (the rest of a wait parked in whole-second
            // steps): parked again, rather than asking Redis before its turn.
            wait_ms: match route::wait_for_turn(&delivery.properties, now_ms) {
                wait if rule.defer && !rule.shadow && wait >= EARLY_MS => wait,
                _ => 0,
            },
        };
        (check, token)
    }

    /// Counts what the metrics count per output, and logs the messages that did not
    /// simply pass.
    fn observe(
        &self,
        delivery: &Delivery,
        parsed: &Result<Envelope<'_>, Invalid>,
        verdict: Option<(Verdict, crate::limit::Rule)>,
        outcome: Outcome,
    ) {
        match (outcome, verdict) {
            (Outcome::Shadowed, _) => self.metrics.shadow_rejections.increment(1),
            (
                Outcome::Allowed,
                Some((
                    Verdict::Checked(Answer {
                        decision:
                            Decision::Allowed {
                                limit, remaining, ..
                            },
                        ..
                    }),
                    _,
                )),
            ) if route::near_limit(limit, remaining) => self.metrics.near_limit.increment(1),
            _ => {}
        }
        log_output(delivery, parsed, verdict, outcome);
    }

    /// Answers what the rejection cache can, asks Redis for the rest (one round trip),
    /// learns from Redis's fresh rejections, and applies `on_redis_error` to each check
    /// Redis could not decide.
    async fn decide(&self, checks: &[Check], rules: &Rules, retry: bool) -> Vec<Decided> {
        let asked_at = Instant::now();
        let mut decided: Vec<Option<Decided>> = checks
            .iter()
            .map(|check| {
                // Back before its turn: parked again for the rest, Redis not asked.
                let early = (check.wait_ms > 0).then(|| Decision::Rejected {
                    limit: check.rule.requests,
                    window_seconds: check.rule.window_seconds,
                    retry_after: check.wait_ms.div_ceil(1000),
                    notify_user: true,
                    turn_ms: 0,
                    scope: Scope::Channel,
                });
                early
                    .or_else(|| self.cache.answer(check, rules.generation, asked_at))
                    .map(|decision| {
                        Decided::Verdict(Verdict::Checked(Answer::fresh(decision)), false)
                    })
            })
            .collect();
        let asked: Vec<usize> = (0..checks.len())
            .filter(|&i| decided[i].is_none())
            .collect();
        self.metrics
            .local_rejections
            .increment((checks.len() - asked.len()) as u64);
        if asked.is_empty() {
            return decided.into_iter().flatten().collect();
        }
        let subset: Vec<&Check> = asked.iter().map(|&i| &checks[i]).collect();
        let answers = self.limiter.check_batch(&subset).await;
        let policy = rules.settings.on_redis_error;
        // In a cluster, calls that fail while others of the batch are answered are one
        // node's trouble (a dead primary): its messages are held like a key fault, capped,
        // so they never fill the window the healthy slots need.
        let one_node = self.limiter.is_cluster() && answers.iter().any(Result::is_ok);
        let mut failed = 0u64;
        let mut first_error = None;
        // Redis itself failing outweighs a key it cannot count, in what is told.
        let mut redis_error = None;
        let mut outage_begins = false;
        for (&i, answer) in asked.iter().zip(answers) {
            decided[i] = Some(match answer {
                Ok(answer) => {
                    // In a cluster a tenant budget may reject only because of reservations
                    // on their way back (given back within moments): not remembered.
                    let reserved = budget_rejected_in_a_cluster(self.limiter.is_cluster(), &answer);
                    if !reserved {
                        self.cache
                            .learn(&checks[i], &answer, rules.generation, asked_at);
                    }
                    Decided::Verdict(Verdict::Checked(answer), true)
                }
                Err(error) => {
                    failed += 1;
                    if !error.is_key_error() {
                        outage_begins |= self.health.check_failed();
                        redis_error.get_or_insert_with(|| error.clone());
                    }
                    let held = match policy {
                        OnRedisError::Allow => Decided::Verdict(Verdict::Unchecked, false),
                        OnRedisError::Hold => Decided::Held {
                            key_fault: error.is_key_error() || one_node,
                        },
                    };
                    first_error.get_or_insert(error);
                    held
                }
            });
        }
        if let Some(e) = redis_error.take() {
            first_error = Some(e);
        }
        let redis_failed = first_error.as_ref().is_some_and(|e| !e.is_key_error());
        if let Some(error) = first_error {
            self.metrics.redis_errors.increment(failed);
            if policy == OnRedisError::Allow {
                self.metrics.degraded.increment(failed);
            }
            let error = self.config.scrub(&error.to_string());
            let action = match policy {
                OnRedisError::Allow => "forwarding (on_redis_error = allow)",
                OnRedisError::Hold => "holding the messages (on_redis_error = hold)",
            };
            // Redis failing is told once, when it starts (and /readyz says why meanwhile);
            // a key Redis cannot count is told with each batch that meets it.
            if redis_failed && !outage_begins {
                debug!(%error, count = failed, "rate limit unchecked: {action}");
            } else if !retry || redis_failed {
                warn!(%error, count = failed, "rate limit unchecked: {action}");
            }
        }
        if !redis_failed && self.health.checks_answered() {
            info!("redis answers again: rate limit checks resumed");
        }
        decided
            .into_iter()
            .map(|d| d.expect("every check was answered"))
            .collect()
    }
}

/// A verdict as routing reads it. `replayed`: an output of this message's id may exist
/// already, so a forward carries `x-ratelimit-replayed` (every replay but the gate's own
/// retry of a check it held, whose first call may have counted the message but never
/// published it). `forwarded_before`: this delivery is the broker's redelivery of a
/// message whose output was confirmed, so a parked copy exists and it is only acked; a
/// fresh publish that reuses the id is routed like any other.
fn as_routed(verdict: Verdict, redelivered: bool, retry: bool) -> Verdict {
    match verdict {
        Verdict::Checked(a) => Verdict::Checked(Answer {
            replayed: a.forwarded_before || (a.replayed && !retry),
            forwarded_before: a.forwarded_before && redelivered,
            ..a
        }),
        unchecked => unchecked,
    }
}

/// The verdict of a message that may have been published already: a forward is marked.
/// A Redis Cluster's tenant budget rejected: decided against its reservations, which may
/// be given back at once.
fn budget_rejected_in_a_cluster(cluster: bool, answer: &Answer) -> bool {
    cluster
        && matches!(
            answer.decision,
            Decision::Rejected {
                scope: Scope::Tenant,
                ..
            }
        )
}

fn maybe_sent(verdict: Verdict) -> Verdict {
    match verdict {
        Verdict::Checked(a) => Verdict::Checked(Answer {
            replayed: true,
            ..a
        }),
        unchecked => unchecked,
    }
}

/// One log line per message that did not simply pass: rejected, shadowed or invalid.
fn log_output(
    delivery: &Delivery,
    parsed: &Result<Envelope<'_>, Invalid>,
    verdict: Option<(Verdict, crate::limit::Rule)>,
    outcome: Outcome,
) {
    let amqp_id = || {
        delivery
            .properties
            .message_id()
            .as_ref()
            .map(ShortString::as_str)
    };
    match (parsed, verdict) {
        (Err(invalid), _) => info!(
            outcome = "invalid",
            error_code = invalid.code.as_str(),
            detail = %invalid.detail,
            message_id = amqp_id(),
            "message dead-lettered"
        ),
        (
            Ok(envelope),
            Some((
                Verdict::Checked(Answer {
                    decision:
                        Decision::Rejected {
                            limit,
                            window_seconds,
                            retry_after,
                            ..
                        },
                    ..
                }),
                _,
            )),
        ) => {
            let (name, text) = match outcome {
                Outcome::Shadowed => (
                    "shadow_rejected",
                    "message over its limit forwarded (shadow mode)",
                ),
                Outcome::Deferred => (
                    "deferred",
                    "message deferred: rate limit exceeded, parked until its window frees",
                ),
                Outcome::Duplicate => (
                    "duplicate",
                    "message acked without a second output: its output was already confirmed",
                ),
                Outcome::RejectedQuiet => (
                    "rejected_quiet",
                    "message rejected without a notice: its sender was already told",
                ),
                _ => ("rejected", "message rejected: rate limit exceeded"),
            };
            info!(
                outcome = name,
                tenant_id = %envelope.tenant_id,
                channel = %envelope.channel,
                message_id = route::message_id(envelope, &delivery.properties),
                limit,
                window_seconds,
                retry_after_seconds = retry_after,
                "{text}"
            );
        }
        _ => {}
    }
}
