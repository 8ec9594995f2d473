//! From a decision to the one outgoing message: forward to the orchestrator, a rejection
//! to the notifier, or the unread body to the dead-letter queue. [`output`] decides which,
//! as a pure function of what the pipeline knows about one message.

use std::borrow::Cow;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::limit::{Answer, Decision, Rule, Scope};
use crate::message::{Envelope, ErrorCode, Invalid};

/// What the limit said about one valid message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Checked(Answer),
    /// Redis could not decide and `on_redis_error = allow`: forward, marked degraded.
    Unchecked,
}

/// Where a message went, counted once its output is confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    /// Over its limit, forwarded because its rule is in shadow mode.
    Shadowed,
    /// Forwarded without a check (Redis could not decide).
    Unchecked,
    Rejected,
    /// Rejected with `notify_user: false` and acknowledged without a notice
    /// (`limits.quiet_rejections = "drop"`).
    RejectedQuiet,
    /// Over its limit, parked in the defer ladder (`on_limit = "defer"`).
    Deferred,
    /// A redelivery whose output was already confirmed: acked without a second one.
    Duplicate,
    Invalid,
}

/// The queue an output goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Orchestrator,
    Notifications,
    DeadLetter,
    /// The step of the defer ladder that holds a message this many seconds.
    Defer(u64),
    /// Nowhere: the output of this message's decision was already confirmed (a
    /// redelivery of a deferred message), so it is only acknowledged.
    Done,
}

/// Header: how many times a message was deferred.
pub const DEFERRED: &str = "x-gate-deferred";
/// Header: when a deferred message first arrived, in milliseconds since the Unix epoch; it
/// travels with the message, so `limits.max_defer_seconds` counts from there.
pub const FIRST_ARRIVAL: &str = "x-gate-first-arrival";

/// Header: when a parked message's turn comes, in milliseconds since the Unix epoch by
/// Redis's clock. Back earlier (its wait is longer than the longest step), it is parked
/// again for the rest without a check.
pub const DUE: &str = "x-gate-due";

/// Header: a parked message's own `expiration`, kept aside while it waits (a per-message
/// TTL would break the order of a delay queue) and restored when it moves on.
pub const PARKED_EXPIRATION: &str = "x-gate-expiration";

/// What deciding to defer needs besides the message: the time, and how long a message may
/// wait from its first arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeferClock {
    pub now_ms: u64,
    pub max_defer_seconds: u64,
    /// The ladder can take a message now; else a deferral falls back to a rejection.
    pub can_park: bool,
}

/// The largest body the broker accepts (its `max_message_size`, once the gate has learned
/// it; `u64::MAX` until then). An output larger than that would close the publishing channel.
pub type MaxBody = u64;

/// The one message published for an inbound one.
#[derive(Debug)]
pub struct Output<'a> {
    pub outcome: Outcome,
    pub to: Destination,
    pub body: Cow<'a, [u8]>,
    pub properties: BasicProperties,
}

/// The output for one message: its body and properties, its parse, and (for a valid
/// message) the limit's verdict under `rule`. An output the broker would refuse for its
/// size ends with this one message: a notice drops its copy of the message
/// (`"message_omitted": true`); anything else still too large is dead-lettered as
/// `output_refused`.
pub fn output<'a>(
    body: &'a [u8],
    properties: &BasicProperties,
    parsed: &Result<Envelope<'_>, Invalid>,
    verdict: Option<(Verdict, Rule)>,
    clock: DeferClock,
    max_body: MaxBody,
) -> Output<'a> {
    let output = routed(body, properties, parsed, verdict, clock, max_body);
    if output.body.len() as u64 <= max_body {
        return output;
    }
    let refused = Invalid {
        code: crate::message::ErrorCode::OutputRefused,
        detail: format!(
            "its output ({} bytes) is larger than the broker's max_message_size ({max_body} bytes)",
            output.body.len()
        ),
    };
    Output {
        outcome: Outcome::Invalid,
        to: Destination::DeadLetter,
        body: Cow::Borrowed(body),
        properties: dead_letter_properties(properties, &refused),
    }
}

fn routed<'a>(
    body: &'a [u8],
    properties: &BasicProperties,
    parsed: &Result<Envelope<'_>, Invalid>,
    verdict: Option<(Verdict, Rule)>,
    clock: DeferClock,
    max_body: MaxBody,
) -> Output<'a> {
    let forward = |outcome, properties| Output {
        outcome,
        to: Destination::Orchestrator,
        body: Cow::Borrowed(body),
        properties,
    };
    let (envelope, verdict, rule) = match (parsed, verdict) {
        (Err(invalid), _) => {
            return Output {
                outcome: Outcome::Invalid,
                to: Destination::DeadLetter,
                body: Cow::Borrowed(body),
                properties: dead_letter_properties(properties, invalid),
            };
        }
        (Ok(_), None) => unreachable!("every valid message has a verdict"),
        (Ok(envelope), Some((verdict, rule))) => (envelope, verdict, rule),
    };
    // `replayed`: an earlier output of this id may exist (every such forward is marked);
    // `forwarded_before`: a redelivery whose first output was confirmed.
    let Verdict::Checked(Answer {
        decision,
        replayed,
        forwarded_before,
        duplicate,
    }) = verdict
    else {
        return forward(Outcome::Unchecked, degraded_properties(properties));
    };
    // `duplicates = "drop"`: this id's output was confirmed already.
    if duplicate {
        return Output {
            outcome: Outcome::Duplicate,
            to: Destination::Done,
            body: Cow::Borrowed(body),
            properties: BasicProperties::default(),
        };
    }
    match decision {
        Decision::Allowed {
            limit,
            remaining,
            reset_after,
        } => forward(
            Outcome::Allowed,
            allowed_properties(properties, limit, remaining, reset_after, replayed),
        ),
        Decision::Rejected {
            limit, retry_after, ..
        } if rule.shadow => forward(
            Outcome::Shadowed,
            shadow_properties(properties, limit, retry_after, replayed),
        ),
        // Parked (or finally rejected) before its ack was lost: parking it again would
        // make a second copy.
        Decision::Rejected { .. } if rule.defer && forwarded_before => Output {
            outcome: Outcome::Duplicate,
            to: Destination::Done,
            body: Cow::Borrowed(body),
            properties: BasicProperties::default(),
        },
        Decision::Rejected {
            retry_after,
            turn_ms,
            ..
        } if rule.defer
            && clock.can_park
            && let Some((step, properties)) =
                deferral(properties, turn_in(retry_after, turn_ms), clock) =>
        {
            Output {
                outcome: Outcome::Deferred,
                to: Destination::Defer(step),
                body: Cow::Borrowed(body),
                properties,
            }
        }
        Decision::Rejected {
            limit,
            window_seconds,
            retry_after,
            notify_user,
            scope,
            ..
        } => {
            let limited = Limited {
                limit,
                window_seconds,
                retry_after,
                notify_user,
                scope,
            };
            let notice =
                |omit| rejection(envelope, message_id(envelope, properties), limited, omit);
            let (mut body, mut properties) = notice(false);
            if body.len() as u64 > max_body {
                (body, properties) = notice(true);
            }
            Output {
                outcome: Outcome::Rejected,
                to: Destination::Notifications,
                body: Cow::Owned(body),
                properties,
            }
        }
    }
}

/// Where an over-limit message under `on_limit = "defer"` waits: the step of the ladder
/// (see [`defer_step`]; `retry_after` is its turn, see [`turn_in`]), and its
/// properties, counting the deferral and carrying its first arrival. `None` when the
/// message could not be allowed within `max_defer_seconds` of its first arrival: it is
/// rejected instead.
pub fn deferral(
    inbound: &BasicProperties,
    retry_after: u64,
    clock: DeferClock,
) -> Option<(u64, BasicProperties)> {
    let headers = inbound.headers();
    // A first arrival in the future (a forged or skewed header) counts as now.
    let first = header_int(headers, FIRST_ARRIVAL)
        .unwrap_or(clock.now_ms)
        .min(clock.now_ms);
    // Its turn must come within `max_defer_seconds` of its first arrival, and so must its
    // step end: a step that overshoots the turn may not overshoot the bound. The turn is
    // in whole seconds, rounded up: up to a second past the bound is the rounding (a
    // message back a moment before a turn right at the bound is parked for a second).
    let deadline = first.saturating_add(clock.max_defer_seconds.saturating_mul(1000));
    let turn_at = clock
        .now_ms
        .saturating_add(retry_after.saturating_mul(1000));
    if turn_at > deadline.saturating_add(ROUNDING_MS) {
        return None;
    }
    let step = defer_step(retry_after, deadline.saturating_sub(clock.now_ms) / 1000);
    let times = header_int(headers, DEFERRED).unwrap_or(0).saturating_add(1);
    // No per-message TTL in a delay queue: the queue's own TTL keeps them in order. The
    // message's own travels aside, and is restored when it moves on.
    let due_at = clock
        .now_ms
        .saturating_add(retry_after.saturating_mul(1000));
    let mut extra = vec![
        (DEFERRED, int(times)),
        (FIRST_ARRIVAL, int(first)),
        (DUE, int(due_at)),
    ];
    if let Some(expiration) = own_expiration(inbound) {
        extra.push((PARKED_EXPIRATION, text(&expiration)));
    }
    let properties = copy_properties_except_expiration(inbound, &extra);
    Some((step, properties))
}

/// What rounding a wait up to whole seconds may add to it.
const ROUNDING_MS: u64 = 999;

/// Whole seconds until an over-limit message's turn: when its window frees
/// (`retry_after`), or later when its deferring rule's line gave it a later turn
/// (`turn_ms`, see `take_turn` in `notice.lua`). Parking each for its turn brings a
/// flood back at the pace its limit lets through, instead of all at once, every step,
/// until it passes.
pub fn turn_in(retry_after: u64, turn_ms: u64) -> u64 {
    retry_after.max(turn_ms.div_ceil(1000))
}

/// The step of the ladder for a message due back in `wait` seconds, with at most `room`
/// seconds to spare: the longest step that overshoots the wait by at most a quarter (and
/// not past `room`), so the message comes back close to its turn, in a few steps (a longer
/// wait is parked again for the rest); the shortest step for a wait under a second.
pub fn defer_step(wait: u64, room: u64) -> u64 {
    let steps = crate::amqp::DEFER_STEPS;
    let latest = wait.saturating_add(wait / 4).min(room.max(wait));
    steps
        .iter()
        .rev()
        .copied()
        .find(|&step| step <= latest)
        .unwrap_or(steps[0])
}

/// Milliseconds until a parked message's turn, by `now_ms`; 0 for a fresh message or one
/// whose turn has come.
pub fn wait_for_turn(inbound: &BasicProperties, now_ms: u64) -> u64 {
    if times_deferred(inbound) == 0 {
        return 0;
    }
    header_int(inbound.headers(), DUE).map_or(0, |due| due.saturating_sub(now_ms))
}

/// When a parked message first arrived (`x-gate-first-arrival`, Redis's clock); `None`
/// for a fresh one.
pub fn first_arrival(inbound: &BasicProperties) -> Option<u64> {
    header_int(inbound.headers(), FIRST_ARRIVAL)
}

/// How many times a message was deferred before (0 for a fresh one).
pub fn times_deferred(inbound: &BasicProperties) -> u64 {
    header_int(inbound.headers(), DEFERRED).unwrap_or(0)
}

/// A header holding a non-negative integer, of whichever AMQP integer type.
fn header_int(headers: &Option<FieldTable>, name: &str) -> Option<u64> {
    match header(headers, name)? {
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortUInt(v) => Some(u64::from(*v)),
        _ => None,
    }
}

/// The header a message's cost comes in.
pub const COST: &str = "x-gate-cost";
/// The largest cost a message may say.
pub const MAX_COST: u64 = 1_000_000;

/// The units a message counts against every limit (`x-gate-cost`): 1 when absent; an
/// integer 0–1,000,000, as any AMQP integer type or as decimal digits in a string. Any
/// other value makes the message invalid (`invalid_cost`).
pub fn cost(inbound: &BasicProperties) -> Result<u64, Invalid> {
    let Some(value) = header(inbound.headers(), COST) else {
        return Ok(1);
    };
    let number = match value {
        AMQPValue::LongString(text) => digits(&String::from_utf8_lossy(text.as_bytes())),
        AMQPValue::ShortString(text) => digits(text.as_str()),
        AMQPValue::ShortShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortShortUInt(v) => Some(u64::from(*v)),
        _ => header_int(inbound.headers(), COST),
    };
    match number {
        Some(cost) if cost <= MAX_COST => Ok(cost),
        _ => Err(Invalid {
            code: ErrorCode::InvalidCost,
            detail: format!(
                "header {COST} must be an integer from 0 to {MAX_COST}, not {}",
                describe(value)
            ),
        }),
    }
}

/// A number written as decimal digits alone (no sign, no spaces).
fn digits(text: &str) -> Option<u64> {
    text.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| text.parse().ok())
        .flatten()
}

/// A header value as an operator would write it, cut short.
fn describe(value: &AMQPValue) -> String {
    let text = match value {
        AMQPValue::LongString(text) => format!("{:?}", String::from_utf8_lossy(text.as_bytes())),
        AMQPValue::ShortString(text) => format!("{:?}", text.as_str()),
        other => format!("{other:?}"),
    };
    match text.char_indices().nth(64) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}

/// AMQP delivery mode for messages that survive a broker restart.
pub const PERSISTENT: u8 = 2;

/// Headers the broker adds when the defer ladder dead-letters a message back: they
/// describe the gate's own parking, not a failure, so they do not travel on.
const LADDER_HEADERS: [&str; 7] = [
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
];

/// The inbound properties minus `user_id` (the broker refuses a `user_id` that is not the
/// publishing user), with persistent delivery and `extra` headers added.
pub fn copy_properties(inbound: &BasicProperties, extra: &[(&str, AMQPValue)]) -> BasicProperties {
    let out = copy_properties_except_expiration(inbound, extra);
    match own_expiration(inbound).and_then(|v| ShortString::try_new(v).ok()) {
        Some(v) => out.with_expiration(v),
        None => out,
    }
}

/// The message's own `expiration`: its property, or, for a message back from the ladder,
/// the one kept aside while it was parked.
fn own_expiration(inbound: &BasicProperties) -> Option<String> {
    if let Some(v) = inbound.expiration() {
        return Some(v.as_str().to_owned());
    }
    // Only on a parked copy, and only what the broker accepts as an expiration (a
    // decimal of milliseconds): a forged or broken value is dropped, never published.
    if times_deferred(inbound) == 0 {
        return None;
    }
    let text = match header(inbound.headers(), PARKED_EXPIRATION)? {
        AMQPValue::LongString(v) => String::from_utf8_lossy(v.as_bytes()).into_owned(),
        AMQPValue::ShortString(v) => v.as_str().to_owned(),
        _ => return None,
    };
    text.parse::<u32>().ok().map(|ms| ms.to_string())
}

/// `copy_properties` without `expiration`: a parked copy must not carry a TTL of its own.
fn copy_properties_except_expiration(
    inbound: &BasicProperties,
    extra: &[(&str, AMQPValue)],
) -> BasicProperties {
    let mut out = BasicProperties::default().with_delivery_mode(PERSISTENT);
    if let Some(v) = inbound.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = inbound.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = inbound.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = inbound.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = inbound.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = inbound.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = inbound.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = inbound.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = inbound.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(v) = inbound.cluster_id() {
        out = out.with_cluster_id(v.clone());
    }
    let mut headers = inbound.headers().clone().unwrap_or_default();
    if header(inbound.headers(), DEFERRED).is_some() {
        let mut kept = FieldTable::default();
        for (name, value) in headers.inner() {
            if !LADDER_HEADERS.contains(&name.as_str())
                && name.as_str() != PARKED_EXPIRATION
                && name.as_str() != DUE
            {
                kept.insert(name.clone(), value.clone());
            }
        }
        headers = kept;
    }
    for (name, value) in extra {
        headers.insert(ShortString::from(*name), value.clone());
    }
    if !headers.inner().is_empty() {
        out = out.with_headers(headers);
    }
    out
}

fn int(v: u64) -> AMQPValue {
    AMQPValue::LongLongInt(i64::try_from(v).unwrap_or(i64::MAX))
}

fn text(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

/// Properties of an allowed message on its way to the orchestrator.
/// `replayed`: the decision was replayed for the message's id (counted once), so this may
/// be a duplicate of an earlier forward.
pub fn allowed_properties(
    inbound: &BasicProperties,
    limit: u64,
    remaining: u64,
    reset_after: u64,
    replayed: bool,
) -> BasicProperties {
    let mut headers = vec![
        ("x-ratelimit-limit", int(limit)),
        ("x-ratelimit-remaining", int(remaining)),
        ("x-ratelimit-reset", int(reset_after)),
    ];
    // The near-limit signal only when at most a fifth of the limit is left.
    if near_limit(limit, remaining) {
        headers.push(("x-ratelimit-near-limit", text("true")));
    }
    if replayed {
        headers.push(("x-ratelimit-replayed", text("true")));
    }
    copy_properties(inbound, &headers)
}

/// True when at most 20 % of the limit remains.
pub fn near_limit(limit: u64, remaining: u64) -> bool {
    remaining.saturating_mul(5) <= limit
}

/// Properties of a message the limit would have rejected, forwarded because its rule is
/// in shadow mode.
pub fn shadow_properties(
    inbound: &BasicProperties,
    limit: u64,
    retry_after: u64,
    replayed: bool,
) -> BasicProperties {
    let mut headers = vec![
        ("x-ratelimit-limit", int(limit)),
        ("x-ratelimit-remaining", int(0)),
        ("x-ratelimit-reset", int(retry_after)),
        ("x-ratelimit-shadow", text("rejected")),
    ];
    if replayed {
        headers.push(("x-ratelimit-replayed", text("true")));
    }
    copy_properties(inbound, &headers)
}

/// Properties of a message forwarded unchecked because Redis could not be asked.
pub fn degraded_properties(inbound: &BasicProperties) -> BasicProperties {
    copy_properties(inbound, &[("x-ratelimit-degraded", text("true"))])
}

/// Properties of a message on its way to the dead-letter queue.
pub fn dead_letter_properties(inbound: &BasicProperties, invalid: &Invalid) -> BasicProperties {
    copy_properties(
        inbound,
        &[
            ("x-gate-error", text(invalid.code.as_str())),
            ("x-gate-error-detail", text(&invalid.detail)),
        ],
    )
}

/// What a rejection notice says of the limit that rejected.
#[derive(Debug, Clone, Copy)]
pub struct Limited {
    pub limit: u64,
    pub window_seconds: u64,
    pub retry_after: u64,
    pub notify_user: bool,
    pub scope: Scope,
}

/// The notification body, field for field as the contract gives it.
#[derive(Serialize)]
struct Rejection<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message_id: Option<&'a str>,
    tenant_id: &'a str,
    channel: &'a str,
    /// The limit that decided: `channel`, `tenant` or `sender`.
    scope: &'static str,
    limit: u64,
    window_seconds: u64,
    retry_after_seconds: u64,
    /// False for the repeats of one sender's rejections within a window, so the notifier
    /// replies once.
    notify_user: bool,
    channel_metadata: Option<&'a RawValue>,
    sender: Option<&'a RawValue>,
    thread_id: Option<&'a RawValue>,
    /// `None` (JSON null) when the whole notice would be too large for the broker.
    message: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    message_omitted: bool,
}

/// The body and properties of a `rate_limited` notification; `omit`: without its copy of
/// the message (`"message": null, "message_omitted": true`).
pub fn rejection(
    envelope: &Envelope<'_>,
    message_id: Option<&str>,
    limited: Limited,
    omit: bool,
) -> (Vec<u8>, BasicProperties) {
    let Limited {
        limit,
        window_seconds,
        retry_after,
        notify_user,
        scope,
    } = limited;
    let message: &RawValue =
        serde_json::from_slice(envelope.raw).expect("the envelope's body was parsed as JSON");
    let body = Rejection {
        kind: "rate_limited",
        message_id,
        tenant_id: &envelope.tenant_id,
        channel: &envelope.channel,
        scope: scope.as_str(),
        limit,
        window_seconds,
        retry_after_seconds: retry_after,
        notify_user,
        channel_metadata: envelope.channel_metadata,
        sender: envelope.sender,
        thread_id: envelope.thread_id,
        message: (!omit).then_some(message),
        message_omitted: omit,
    };
    let bytes = serde_json::to_vec(&body).expect("a struct of strings and numbers serializes");
    let mut properties = BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_delivery_mode(PERSISTENT)
        .with_type(ShortString::from("rate_limited"));
    // A correlation id is a short string (255 bytes): a longer message id stays in the body.
    if let Some(id) = message_id.and_then(|id| ShortString::try_new(id).ok()) {
        properties = properties.with_correlation_id(id);
    }
    (bytes, properties)
}

/// The message id: the body's `id`, else the AMQP `message_id` property.
pub fn message_id<'a>(
    envelope: &'a Envelope<'_>,
    properties: &'a BasicProperties,
) -> Option<&'a str> {
    envelope
        .id
        .as_deref()
        .or_else(|| properties.message_id().as_ref().map(ShortString::as_str))
}

/// Looks up a header, for tests and the bench tool.
pub fn header<'a>(headers: &'a Option<FieldTable>, name: &str) -> Option<&'a AMQPValue> {
    headers.as_ref()?.inner().get(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{ErrorCode, parse};

    const LIMITED: Limited = Limited {
        limit: 30,
        window_seconds: 60,
        retry_after: 42,
        notify_user: true,
        scope: Scope::Channel,
    };

    fn full_properties() -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert("x-trace".into(), text("abc"));
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_message_id("amqp-id".into())
            .with_correlation_id("corr".into())
            .with_timestamp(1_700_000_000)
            .with_app_id("gateway".into())
            .with_reply_to("replies".into())
            .with_priority(3)
            .with_type("slack.message".into())
            .with_expiration("60000".into())
            .with_user_id("guest".into())
            .with_delivery_mode(1)
            .with_headers(headers)
    }

    #[test]
    fn allowed_keeps_properties_but_user_id_and_adds_headers() {
        let p = allowed_properties(&full_properties(), 30, 29, 60, false);
        assert_eq!(p.user_id(), &None);
        assert_eq!(p.delivery_mode(), &Some(2));
        assert_eq!(p.message_id().as_ref().unwrap().as_str(), "amqp-id");
        assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), "corr");
        assert_eq!(p.timestamp(), &Some(1_700_000_000));
        assert_eq!(p.priority(), &Some(3));
        assert_eq!(p.expiration().as_ref().unwrap().as_str(), "60000");
        assert_eq!(header(p.headers(), "x-trace"), Some(&text("abc")));
        assert_eq!(header(p.headers(), "x-ratelimit-limit"), Some(&int(30)));
        assert_eq!(header(p.headers(), "x-ratelimit-remaining"), Some(&int(29)));
        assert_eq!(header(p.headers(), "x-ratelimit-reset"), Some(&int(60)));
        assert_eq!(header(p.headers(), "x-ratelimit-near-limit"), None);
    }

    #[test]
    fn near_limit_is_flagged_at_a_fifth_of_the_limit_or_less() {
        let p = allowed_properties(&BasicProperties::default(), 30, 6, 60, false);
        assert_eq!(
            header(p.headers(), "x-ratelimit-near-limit"),
            Some(&text("true"))
        );
        let p = allowed_properties(&BasicProperties::default(), 30, 7, 60, false);
        assert_eq!(header(p.headers(), "x-ratelimit-near-limit"), None);
        assert!(near_limit(1, 0) && !near_limit(10, 3) && near_limit(10, 2));
    }

    #[test]
    fn shadow_rejections_are_marked() {
        let p = shadow_properties(&full_properties(), 30, 42, false);
        assert_eq!(
            header(p.headers(), "x-ratelimit-shadow"),
            Some(&text("rejected"))
        );
        assert_eq!(header(p.headers(), "x-ratelimit-remaining"), Some(&int(0)));
        assert_eq!(header(p.headers(), "x-ratelimit-reset"), Some(&int(42)));
        assert_eq!(p.user_id(), &None);
    }

    #[test]
    fn dead_letter_carries_code_and_detail() {
        let invalid = parse(b"[]", 100).unwrap_err();
        assert_eq!(invalid.code, ErrorCode::NotAnObject);
        let p = dead_letter_properties(&full_properties(), &invalid);
        assert_eq!(
            header(p.headers(), "x-gate-error"),
            Some(&text("not_an_object"))
        );
        assert_eq!(
            header(p.headers(), "x-gate-error-detail"),
            Some(&text(&invalid.detail))
        );
        assert_eq!(p.user_id(), &None);
    }

    #[test]
    fn rejection_body_has_every_field() {
        let body = br#"{"tenant_id":"acme","channel":"slack","text":"hi","sender":{"u":"U1"},"thread_id":"t1"}"#;
        let envelope = parse(body, 1 << 20).unwrap();
        let props = full_properties();
        let id = message_id(&envelope, &props);
        assert_eq!(id, Some("amqp-id"));
        let (bytes, p) = rejection(&envelope, id, LIMITED, false);
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "type": "rate_limited", "message_id": "amqp-id", "tenant_id": "acme",
                "channel": "slack", "scope": "channel", "limit": 30, "window_seconds": 60,
                "retry_after_seconds": 42, "notify_user": true, "channel_metadata": null,
                "sender": {"u": "U1"}, "thread_id": "t1",
                "message": serde_json::from_slice::<serde_json::Value>(body).unwrap(),
            })
        );
        assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), "amqp-id");
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(p.delivery_mode(), &Some(2));
    }

    fn rule(shadow: bool) -> Rule {
        Rule {
            algorithm: crate::config::Algorithm::FixedWindow,
            requests: 30,
            window_seconds: 60,
            burst: 30,
            shadow,
            defer: false,
        }
    }

    const CLOCK: DeferClock = DeferClock {
        now_ms: 1_764_400_000_000,
        max_defer_seconds: 3600,
        can_park: true,
    };

    #[test]
    fn a_deferred_message_waits_in_the_longest_step_close_to_its_turn() {
        assert_eq!(defer_step(0, 3600), 1);
        assert_eq!(defer_step(1, 3600), 1);
        assert_eq!(defer_step(2, 3600), 2);
        assert_eq!(defer_step(3, 3600), 2, "then 1 s more");
        assert_eq!(
            defer_step(9, 3600),
            10,
            "a second late rather than three more steps"
        );
        assert_eq!(defer_step(10, 3600), 10);
        assert_eq!(defer_step(42, 3600), 30);
        assert_eq!(defer_step(50, 3600), 60);
        assert_eq!(defer_step(50, 57), 30, "but not past max_defer_seconds");
        assert_eq!(defer_step(600, 3600), 600);
        assert_eq!(
            defer_step(86_400, 86_400),
            600,
            "beyond the ladder: the longest step, again"
        );

        let inbound = full_properties();
        let (step, first) = deferral(&inbound, 4, CLOCK).unwrap();
        assert_eq!(step, 5);
        assert_eq!(times_deferred(&first), 1);
        assert_eq!(
            header(first.headers(), "x-trace"),
            Some(&text("abc")),
            "headers kept"
        );
        assert_eq!(
            first.correlation_id(),
            inbound.correlation_id(),
            "properties kept"
        );
        // Back from the ladder 5 s later and deferred again: the count grows, the first
        // arrival stays.
        let later = DeferClock {
            now_ms: CLOCK.now_ms + 5_000,
            ..CLOCK
        };
        let (_, second) = deferral(&first, 30, later).unwrap();
        assert_eq!(times_deferred(&second), 2);
        assert_eq!(
            header(second.headers(), FIRST_ARRIVAL),
            Some(&int(CLOCK.now_ms))
        );
    }

    #[test]
    fn a_deferred_message_waits_for_its_turn_not_only_for_its_window() {
        assert_eq!(turn_in(4, 0), 4, "no line: until the window frees");
        assert_eq!(
            turn_in(4, 2_500),
            4,
            "a turn before the window frees: the window"
        );
        assert_eq!(turn_in(4, 10_001), 11, "whole seconds, never early");
        assert_eq!(turn_in(4, u64::MAX), u64::MAX.div_ceil(1000));
    }

    #[test]
    fn a_parked_copy_has_no_ttl_of_its_own_and_the_ladders_headers_do_not_travel_on() {
        let inbound = full_properties().with_expiration("60000".into());
        let (_, parked) = deferral(&inbound, 4, CLOCK).unwrap();
        assert_eq!(
            parked.expiration(),
            &None,
            "no per-message TTL in a delay queue"
        );
        // Back from the ladder with the broker's dead-lettering headers.
        let mut headers = parked.headers().clone().unwrap();
        headers.insert("x-death".into(), text("[…]"));
        headers.insert(
            "x-first-death-queue".into(),
            text("konstruct.inbound.defer.5s"),
        );
        let back = parked.clone().with_headers(headers);
        let forwarded = allowed_properties(&back, 5, 4, 6, false);
        assert_eq!(
            forwarded.expiration().as_ref().map(ShortString::as_str),
            Some("60000"),
            "its own expiration is back"
        );
        assert_eq!(header(forwarded.headers(), PARKED_EXPIRATION), None);
        let (_, again) = deferral(&back, 4, CLOCK).unwrap();
        assert_eq!(again.expiration(), &None);
        assert_eq!(
            header(again.headers(), PARKED_EXPIRATION),
            Some(&text("60000")),
            "kept aside while parked again"
        );
        assert_eq!(header(forwarded.headers(), "x-death"), None);
        assert_eq!(header(forwarded.headers(), "x-first-death-queue"), None);
        assert_eq!(header(forwarded.headers(), DEFERRED), Some(&int(1)));
        // A future first arrival (forged, or a skewed clock) counts as now.
        let mut forged = FieldTable::default();
        forged.insert(FIRST_ARRIVAL.into(), int(CLOCK.now_ms + 86_400_000));
        let forged = BasicProperties::default().with_headers(forged);
        let (_, parked) = deferral(&forged, 4, CLOCK).unwrap();
        assert_eq!(
            header(parked.headers(), FIRST_ARRIVAL),
            Some(&int(CLOCK.now_ms))
        );
    }

    #[test]
    fn a_deferred_message_whose_parked_copy_was_confirmed_is_only_acknowledged() {
        let body = br#"{"id":"m1","tenant_id":"acme","channel":"whatsapp"}"#;
        let parsed = parse(body, 1 << 20);
        let replayed = checked(REJECTED, true);
        let deferring = Rule {
            defer: true,
            ..rule(false)
        };
        let o = output(
            body,
            &full_properties(),
            &parsed,
            Some((replayed, deferring)),
            CLOCK,
            u64::MAX,
        );
        assert_eq!((o.outcome, o.to), (Outcome::Duplicate, Destination::Done));
    }

    #[test]
    fn a_message_that_cannot_be_allowed_within_max_defer_seconds_is_rejected() {
        let short = DeferClock {
            max_defer_seconds: 5,
            ..CLOCK
        };
        assert!(
            deferral(&full_properties(), 5, short).is_some(),
            "allowed at 5 s: in time"
        );
        assert!(
            deferral(&full_properties(), 6, short).is_none(),
            "allowed at 6 s: too late"
        );
        // The first arrival counts, not this one.
        let (_, parked) = deferral(&full_properties(), 3, short).unwrap();
        let back = DeferClock {
            now_ms: CLOCK.now_ms + 3_000,
            ..short
        };
        assert!(deferral(&parked, 2, back).is_some());
        assert!(deferral(&parked, 3, back).is_none());
        // Back half a second before a turn right at the bound: parked for the second.
        let edge = |after_ms| DeferClock {
            now_ms: CLOCK.now_ms + after_ms,
            ..short
        };
        assert!(deferral(&parked, 1, edge(4_500)).is_some());
        assert!(deferral(&parked, 1, edge(5_000)).is_none());
        // A turn beyond the longest step is judged by the turn, not by the step.
        assert!(deferral(&full_properties(), 3_600, CLOCK).is_some());
        assert!(
            deferral(&full_properties(), 5_000, CLOCK).is_none(),
            "due in 5,000 s with at most 3,600: rejected at once"
        );
    }

    #[test]
    fn a_rule_that_defers_parks_what_it_would_reject() {
        let body = br#"{"id":"m1","tenant_id":"acme","channel":"whatsapp"}"#;
        let parsed = parse(body, 1 << 20);
        let props = full_properties();
        let rejected = checked(
            Decision::Rejected {
                limit: 5,
                window_seconds: 6,
                retry_after: 4,
                notify_user: true,
                turn_ms: 0,
                scope: Scope::Channel,
            },
            false,
        );
        let deferring = Rule {
            defer: true,
            ..rule(false)
        };
        let o = output(
            body,
            &props,
            &parsed,
            Some((rejected, deferring)),
            CLOCK,
            u64::MAX,
        );
        assert_eq!(
            (o.outcome, o.to),
            (Outcome::Deferred, Destination::Defer(5))
        );
        assert_eq!(&*o.body, body.as_slice(), "byte for byte");
        let o = output(
            body,
            &props,
            &parsed,
            Some((rejected, rule(false))),
            CLOCK,
            u64::MAX,
        );
        assert_eq!(o.outcome, Outcome::Rejected);
        let impatient = DeferClock {
            max_defer_seconds: 1,
            ..CLOCK
        };
        let o = output(
            body,
            &props,
            &parsed,
            Some((rejected, deferring)),
            impatient,
            u64::MAX,
        );
        assert_eq!(
            o.outcome,
            Outcome::Rejected,
            "past max_defer_seconds: rejected"
        );
    }

    fn checked(decision: Decision, forwarded_before: bool) -> Verdict {
        Verdict::Checked(Answer {
            decision,
            replayed: forwarded_before,
            forwarded_before,
            duplicate: false,
        })
    }

    const REJECTED: Decision = Decision::Rejected {
        limit: 30,
        window_seconds: 60,
        retry_after: 42,
        notify_user: true,
        turn_ms: 0,
        scope: Scope::Channel,
    };

    #[test]
    fn every_verdict_routes_to_its_one_output() {
        let body = br#"{"tenant_id":"acme","channel":"slack","id":"m1"}"#;
        let props = full_properties();
        let parsed = parse(body, 1 << 20);
        let allowed = Decision::Allowed {
            limit: 30,
            remaining: 29,
            reset_after: 60,
        };
        let route = |verdict, shadow| {
            output(
                body,
                &props,
                &parsed,
                Some((verdict, rule(shadow))),
                CLOCK,
                u64::MAX,
            )
        };

        let o = route(checked(allowed, false), false);
        assert_eq!(
            (o.outcome, o.to),
            (Outcome::Allowed, Destination::Orchestrator)
        );
        assert_eq!(&o.body[..], &body[..]);
        assert_eq!(header(o.properties.headers(), "x-ratelimit-replayed"), None);

        let o = route(checked(allowed, true), false);
        assert_eq!(
            header(o.properties.headers(), "x-ratelimit-replayed"),
            Some(&text("true"))
        );

        let o = route(checked(REJECTED, false), false);
        assert_eq!(
            (o.outcome, o.to),
            (Outcome::Rejected, Destination::Notifications)
        );
        let note: serde_json::Value = serde_json::from_slice(&o.body).unwrap();
        assert_eq!(
            (
                note["message_id"].as_str(),
                note["retry_after_seconds"].as_u64()
            ),
            (Some("m1"), Some(42))
        );

        let o = route(checked(REJECTED, true), true);
        assert_eq!(
            (o.outcome, o.to),
            (Outcome::Shadowed, Destination::Orchestrator)
        );
        assert_eq!(
            header(o.properties.headers(), "x-ratelimit-shadow"),
            Some(&text("rejected"))
        );
        assert_eq!(
            header(o.properties.headers(), "x-ratelimit-replayed"),
            Some(&text("true"))
        );

        let o = route(Verdict::Unchecked, false);
        assert_eq!(
            (o.outcome, o.to),
            (Outcome::Unchecked, Destination::Orchestrator)
        );
        assert_eq!(
            header(o.properties.headers(), "x-ratelimit-degraded"),
            Some(&text("true"))
        );

        let bad = parse(b"{}", 1 << 20);
        let o = output(b"{}", &props, &bad, None, CLOCK, u64::MAX);
        assert_eq!(
            (o.outcome, o.to),
            (Outcome::Invalid, Destination::DeadLetter)
        );
        assert_eq!(
            header(o.properties.headers(), "x-gate-error"),
            Some(&text("missing_tenant_id"))
        );
    }

    #[test]
    fn an_output_too_large_for_the_broker_ends_with_its_own_message() {
        let pad = "x".repeat(1000);
        let body = format!(r#"{{"tenant_id":"acme","channel":"slack","id":"m1","text":"{pad}"}}"#);
        let body = body.as_bytes();
        let props = full_properties();
        let parsed = parse(body, 1 << 20);
        let route = |verdict, max| {
            output(
                body,
                &props,
                &parsed,
                Some((verdict, rule(false))),
                CLOCK,
                max,
            )
        };

        // A notice embeds the message: at a limit between the two, the copy is left out.
        let max = body.len() as u64 + 10;
        let o = route(checked(REJECTED, false), max);
        assert_eq!(
            (o.outcome, o.to),
            (Outcome::Rejected, Destination::Notifications)
        );
        let note: serde_json::Value = serde_json::from_slice(&o.body).unwrap();
        assert_eq!(note["message"], serde_json::Value::Null);
        assert_eq!(note["message_omitted"], true);
        assert_eq!(note["retry_after_seconds"], 42);
        assert_eq!(note["message_id"], "m1");
        let whole = route(checked(REJECTED, false), u64::MAX);
        let note: serde_json::Value = serde_json::from_slice(&whole.body).unwrap();
        assert_eq!(note.get("message_omitted"), None, "only when left out");

        // A forward larger than the limit, and a notice that does not fit even without
        // the copy: dead-lettered once, as output_refused.
        let allowed = Decision::Allowed {
            limit: 30,
            remaining: 29,
            reset_after: 60,
        };
        for (verdict, max) in [
            (checked(allowed, false), body.len() as u64 - 1),
            (checked(REJECTED, false), 20),
        ] {
            let o = route(verdict, max);
            assert_eq!(
                (o.outcome, o.to),
                (Outcome::Invalid, Destination::DeadLetter)
            );
            assert_eq!(&o.body[..], body, "byte for byte");
            assert_eq!(
                header(o.properties.headers(), "x-gate-error"),
                Some(&text("output_refused"))
            );
        }
    }

    #[test]
    fn a_deferral_the_ladder_cannot_take_is_a_rejection() {
        let body = br#"{"id":"m1","tenant_id":"acme","channel":"whatsapp"}"#;
        let parsed = parse(body, 1 << 20);
        let deferring = Rule {
            defer: true,
            ..rule(false)
        };
        let no_ladder = DeferClock {
            can_park: false,
            ..CLOCK
        };
        let o = output(
            body,
            &full_properties(),
            &parsed,
            Some((checked(REJECTED, false), deferring)),
            no_ladder,
            u64::MAX,
        );
        assert_eq!(
            (o.outcome, o.to),
            (Outcome::Rejected, Destination::Notifications)
        );
    }

    #[test]
    fn what_a_publisher_writes_into_gate_headers_or_long_ids_never_breaks_an_output() {
        // A forged parked expiration on a fresh message, and a broken one on a parked copy:
        // neither reaches an output.
        let mut forged = FieldTable::default();
        forged.insert(PARKED_EXPIRATION.into(), text(&"9".repeat(300)));
        let fresh = BasicProperties::default().with_headers(forged.clone());
        assert_eq!(
            allowed_properties(&fresh, 5, 4, 6, false).expiration(),
            &None
        );
        forged.insert(DEFERRED.into(), int(1));
        for bad in ["abc", "-1", "99999999999"] {
            forged.insert(PARKED_EXPIRATION.into(), text(bad));
            let parked = BasicProperties::default().with_headers(forged.clone());
            assert_eq!(
                allowed_properties(&parked, 5, 4, 6, false).expiration(),
                &None,
                "{bad}"
            );
        }
        // A message id of 256 characters (the contract's longest) does not fit a
        // correlation id: the notice goes without one, the id stays in its body.
        let id = "i".repeat(256);
        let body = format!(r#"{{"tenant_id":"acme","channel":"slack","id":"{id}"}}"#);
        let envelope = parse(body.as_bytes(), 1 << 20).unwrap();
        let (bytes, p) = rejection(&envelope, Some(&id), LIMITED, false);
        assert_eq!(p.correlation_id(), &None);
        let note: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(note["message_id"], id.as_str());
    }
}
