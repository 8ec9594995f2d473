//! From a decision to the one outgoing message: forward to the orchestrator, a rejection
//! to the notifier, or the unread body to the dead-letter queue.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::message::{Envelope, Invalid};

/// AMQP delivery mode for messages that survive a broker restart.
pub const PERSISTENT: u8 = 2;

/// The inbound properties minus `user_id` (the broker refuses a `user_id` that is not the
/// publishing user), with persistent delivery and `extra` headers added.
pub fn copy_properties(inbound: &BasicProperties, extra: &[(&str, AMQPValue)]) -> BasicProperties {
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
    if let Some(v) = inbound.expiration() {
        out = out.with_expiration(v.clone());
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
pub fn allowed_properties(
    inbound: &BasicProperties,
    limit: u64,
    remaining: u64,
    reset_after: u64,
) -> BasicProperties {
    let headers = [
        ("x-ratelimit-limit", int(limit)),
        ("x-ratelimit-remaining", int(remaining)),
        ("x-ratelimit-reset", int(reset_after)),
        ("x-ratelimit-near-limit", text("true")),
    ];
    // The near-limit signal only when at most a fifth of the limit is left.
    let n = if near_limit(limit, remaining) { 4 } else { 3 };
    copy_properties(inbound, &headers[..n])
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
) -> BasicProperties {
    copy_properties(
        inbound,
        &[
            ("x-ratelimit-limit", int(limit)),
            ("x-ratelimit-remaining", int(0)),
            ("x-ratelimit-reset", int(retry_after)),
            ("x-ratelimit-shadow", text("rejected")),
        ],
    )
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

/// The notification body, field for field as the contract gives it.
#[derive(Serialize)]
struct Rejection<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message_id: Option<&'a str>,
    tenant_id: &'a str,
    channel: &'a str,
    limit: u64,
    window_seconds: u64,
    retry_after_seconds: u64,
    /// False for the repeats of one sender's rejections within a window, so the notifier
    /// replies once.
    notify_user: bool,
    channel_metadata: Option<&'a RawValue>,
    sender: Option<&'a RawValue>,
    thread_id: Option<&'a RawValue>,
    message: &'a RawValue,
}

/// The body and properties of a `rate_limited` notification.
pub fn rejection(
    envelope: &Envelope<'_>,
    message_id: Option<&str>,
    limit: u64,
    window_seconds: u64,
    retry_after: u64,
    notify_user: bool,
) -> (Vec<u8>, BasicProperties) {
    let message: &RawValue =
        serde_json::from_slice(envelope.raw).expect("the envelope's body was parsed as JSON");
    let body = Rejection {
        kind: "rate_limited",
        message_id,
        tenant_id: &envelope.tenant_id,
        channel: &envelope.channel,
        limit,
        window_seconds,
        retry_after_seconds: retry_after,
        notify_user,
        channel_metadata: envelope.channel_metadata,
        sender: envelope.sender,
        thread_id: envelope.thread_id,
        message,
    };
    let bytes = serde_json::to_vec(&body).expect("a struct of strings and numbers serializes");
    let mut properties = BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_delivery_mode(PERSISTENT)
        .with_type(ShortString::from("rate_limited"));
    if let Some(id) = message_id {
        properties = properties.with_correlation_id(ShortString::from(id));
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
        let p = allowed_properties(&full_properties(), 30, 29, 60);
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
        let p = allowed_properties(&BasicProperties::default(), 30, 6, 60);
        assert_eq!(
            header(p.headers(), "x-ratelimit-near-limit"),
            Some(&text("true"))
        );
        let p = allowed_properties(&BasicProperties::default(), 30, 7, 60);
        assert_eq!(header(p.headers(), "x-ratelimit-near-limit"), None);
        assert!(near_limit(1, 0) && !near_limit(10, 3) && near_limit(10, 2));
    }

    #[test]
    fn shadow_rejections_are_marked() {
        let p = shadow_properties(&full_properties(), 30, 42);
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
        let (bytes, p) = rejection(&envelope, id, 30, 60, 42, true);
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "type": "rate_limited", "message_id": "amqp-id", "tenant_id": "acme",
                "channel": "slack", "limit": 30, "window_seconds": 60,
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
}
