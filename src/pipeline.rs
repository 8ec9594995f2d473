//! What happens to one batch of deliveries, top to bottom: parse → decide → route →
//! publish → confirm. Each delivery ends with a [`Fate`]; the session turns fates into
//! acks, requeues, or holds.
//!
//! A batch shares one Redis round trip, but every message gets its own answer: a key that
//! Redis cannot count fails only its own messages, and `limits.on_redis_error` applies to
//! them alone.

use std::sync::Arc;
use std::time::Instant;

use futures::future::join_all;
use lapin::message::Delivery;
use lapin::types::ShortString;
use tracing::{info, warn};

use crate::amqp::{PublishError, Publisher};
use crate::config::{Config, Notify, OnRedisError};
use crate::health::Health;
use crate::limit::{Answer, Check, Limiter, LiveRules, RejectionCache, Rules, key_for, sender_tag};
use crate::message::{self, Envelope, Invalid};
use crate::route::{self, Destination, Outcome, Verdict};
use crate::telemetry::Metrics;

/// What became of one delivery after a pass through the pipeline.
#[derive(Debug)]
pub enum Fate {
    /// Its one output was confirmed: ack it.
    Done(Outcome),
    /// Its output could not be delivered: hand it back to the broker.
    HandBack(PublishError),
    /// Redis could not decide its check and `on_redis_error = hold`: keep it unacked and
    /// try again later.
    Held,
}

/// The answer for one valid message, before routing.
#[derive(Debug, Clone, Copy)]
enum Decided {
    Verdict(Verdict),
    Held,
}

/// Everything a batch needs, shared by every session.
pub struct Pipeline {
    config: Arc<Config>,
    rules: Arc<LiveRules>,
    /// Rejections answered without Redis while a key cannot allow anyway.
    cache: RejectionCache,
    limiter: Limiter,
    metrics: Metrics,
    health: Arc<Health>,
}

impl Pipeline {
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

    /// Runs one batch through; one fate per delivery, in order. `retry`: the batch was
    /// held before, and its Redis failure was already logged.
    pub async fn run(&self, batch: &[Delivery], publisher: &Publisher, retry: bool) -> Vec<Fate> {
        // One snapshot per batch: a reload never changes the rules halfway through.
        let rules = self.rules.snapshot();
        let settings = rules.settings;
        let parsed: Vec<Result<Envelope<'_>, Invalid>> = batch
            .iter()
            .map(|d| message::parse(&d.data, settings.max_message_bytes))
            .collect();
        let checks: Vec<Check> = batch
            .iter()
            .zip(&parsed)
            .filter_map(|(delivery, parsed)| {
                Some(self.check(delivery, parsed.as_ref().ok()?, &rules))
            })
            .collect();
        let decided = self.decide(&checks, &rules, retry).await;

        let mut decided = decided.into_iter().zip(checks.iter().map(|c| c.rule));
        let mut fates: Vec<Option<Fate>> = Vec::with_capacity(batch.len());
        let mut outputs = Vec::with_capacity(batch.len());
        for (i, (delivery, parsed)) in batch.iter().zip(&parsed).enumerate() {
            let verdict = match parsed {
                Err(_) => None,
                Ok(_) => match decided.next().expect("one answer per valid message") {
                    (Decided::Held, _) => {
                        fates.push(Some(Fate::Held));
                        continue;
                    }
                    (Decided::Verdict(verdict), rule) => Some((verdict, rule)),
                },
            };
            let output = route::output(&delivery.data, &delivery.properties, parsed, verdict);
            log_output(delivery, parsed, verdict, output.outcome);
            fates.push(None);
            outputs.push((i, output));
        }
        // Every publish is sent before any confirm is awaited.
        let amqp = &self.config.amqp;
        let published = join_all(outputs.into_iter().map(|(i, output)| async move {
            let queue = match output.to {
                Destination::Orchestrator => &amqp.orchestrator_queue,
                Destination::Notifications => &amqp.notification_queue,
                Destination::DeadLetter => &amqp.dead_letter_queue,
            };
            let result = publisher
                .publish(queue, &output.body, output.properties)
                .await;
            (i, result.map(|()| output.outcome))
        }))
        .await;
        for (i, result) in published {
            fates[i] = Some(match result {
                Ok(outcome) => Fate::Done(outcome),
                Err(e) => Fate::HandBack(e),
            });
        }
        fates
            .into_iter()
            .map(|f| f.expect("every delivery has a fate"))
            .collect()
    }

    /// The check for one valid message under `rules`.
    fn check(&self, delivery: &Delivery, envelope: &Envelope<'_>, rules: &Rules) -> Check {
        let settings = rules.settings;
        let rule = rules.rule_for(&envelope.tenant_id, &envelope.channel);
        let key = key_for(
            rule.algorithm,
            &self.config.redis.key_prefix,
            &envelope.tenant_id,
            &envelope.channel,
        );
        let notify_tag = match settings.notify {
            Notify::Every => String::new(),
            Notify::OncePerWindow => sender_tag(envelope.sender.map(|s| s.get())),
        };
        let message_id = if settings.count_once {
            route::message_id(envelope, &delivery.properties)
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
    }

    /// Answers what the rejection cache can, asks Redis for the rest (one round trip),
    /// learns from Redis's fresh rejections, and applies `on_redis_error` to each check
    /// Redis could not decide.
    async fn decide(&self, checks: &[Check], rules: &Rules, retry: bool) -> Vec<Decided> {
        let asked_at = Instant::now();
        let mut decided: Vec<Option<Decided>> = checks
            .iter()
            .map(|check| {
                self.cache
                    .answer(check, rules.generation, asked_at)
                    .map(|decision| {
                        Decided::Verdict(Verdict::Checked(Answer {
                            decision,
                            replayed: false,
                        }))
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
        let answers = if asked.len() == checks.len() {
            self.limiter.check_batch(checks).await
        } else {
            let subset: Vec<Check> = asked.iter().map(|&i| checks[i].clone()).collect();
            self.limiter.check_batch(&subset).await
        };
        let policy = rules.settings.on_redis_error;
        let mut failed = 0u64;
        let mut first_error = None;
        for (&i, answer) in asked.iter().zip(answers) {
            decided[i] = Some(match answer {
                Ok(answer) => {
                    self.cache
                        .learn(&checks[i], &answer, rules.generation, asked_at);
                    Decided::Verdict(Verdict::Checked(answer))
                }
                Err(error) => {
                    failed += 1;
                    if !error.is_key_error() {
                        self.health.check_failed();
                    }
                    first_error.get_or_insert(error);
                    match policy {
                        OnRedisError::Allow => Decided::Verdict(Verdict::Unchecked),
                        OnRedisError::Hold => Decided::Held,
                    }
                }
            });
        }
        if let Some(error) = first_error {
            self.metrics.redis_errors.increment(failed);
            let error = self.config.scrub(&error.to_string());
            match policy {
                OnRedisError::Allow => {
                    self.metrics.degraded.increment(failed);
                    warn!(%error, count = failed, "rate limit unchecked: forwarding (on_redis_error = allow)");
                }
                OnRedisError::Hold if !retry => {
                    warn!(%error, count = failed, "rate limit unchecked: holding the messages (on_redis_error = hold)");
                }
                OnRedisError::Hold => {}
            }
        }
        decided
            .into_iter()
            .map(|d| d.expect("every check was answered"))
            .collect()
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
                        crate::limit::Decision::Rejected {
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
