//! The external contract, end to end against the real RabbitMQ and Redis: every route with
//! its exact body, properties and headers.

mod common;

use std::time::Duration;

use common::*;
use konstruct_gate::config::Override;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};

const WAIT: Duration = Duration::from_secs(20);

fn full_properties(message_id: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "x-gateway-trace".into(),
        AMQPValue::LongString(LongString::from("trace-1")),
    );
    headers.insert("x-attempt".into(), AMQPValue::LongInt(1));
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_message_id(message_id.into())
        .with_correlation_id("corr-1".into())
        .with_timestamp(1_764_324_000)
        .with_app_id("channel-gateway".into())
        .with_reply_to("gateway.replies".into())
        .with_priority(5)
        .with_type("slack.message".into())
        .with_expiration("600000".into())
        .with_user_id("guest".into())
        .with_delivery_mode(1)
        .with_headers(headers)
}

#[tokio::test]
async fn allowed_messages_are_forwarded_byte_for_byte_with_their_properties() {
    let names = Names::new("allowed");
    let broker = Broker::new(&names).await;
    let gate = TestGate::start(names.config(3, 60)).await;

    // Unusual but valid formatting must survive untouched.
    let body = b" {\"tenant_id\" : \"acme\",\n \"channel\":\"slack\", \"id\":\"m-1\", \"text\":\"caf\\u00e9 \xe2\x98\x95\", \"n\": 1.50e3 }\n".to_vec();
    broker.publish(&body, full_properties("amqp-1")).await;

    let out = broker.collect(&names.orchestrator, 1, WAIT).await;
    let d = &out[0];
    assert_eq!(d.data, body, "the body must be byte-identical");
    let p = &d.properties;
    assert_eq!(
        p.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(p.content_encoding().as_ref().unwrap().as_str(), "utf-8");
    assert_eq!(p.message_id().as_ref().unwrap().as_str(), "amqp-1");
    assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), "corr-1");
    assert_eq!(p.timestamp(), &Some(1_764_324_000));
    assert_eq!(p.app_id().as_ref().unwrap().as_str(), "channel-gateway");
    assert_eq!(p.reply_to().as_ref().unwrap().as_str(), "gateway.replies");
    assert_eq!(p.priority(), &Some(5));
    assert_eq!(p.kind().as_ref().unwrap().as_str(), "slack.message");
    assert_eq!(p.expiration().as_ref().unwrap().as_str(), "600000");
    assert_eq!(p.user_id(), &None, "user_id is not copied");
    assert_eq!(
        p.delivery_mode(),
        &Some(2),
        "forwarded messages are persistent"
    );
    assert_eq!(text_header(d, "x-gateway-trace"), "trace-1");
    assert_eq!(
        konstruct_gate::route::header(p.headers(), "x-attempt"),
        Some(&AMQPValue::LongInt(1))
    );
    assert_eq!(int_header(d, "x-ratelimit-limit"), 3);
    assert_eq!(int_header(d, "x-ratelimit-remaining"), 2);
    let reset = int_header(d, "x-ratelimit-reset");
    assert!((1..=60).contains(&reset), "reset {reset}");

    broker.assert_empty(&names.notifications).await;
    broker.assert_empty(&names.dead_letter).await;
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn an_escaped_lone_surrogate_is_grammatical_and_passes_through_both_routes() {
    let names = Names::new("surrogate");
    let broker = Broker::new(&names).await;
    let gate = TestGate::start(names.config(1, 60)).await;

    // What Python's json.dumps("\udc00") writes: allowed, then rejected with the message
    // embedded as it came.
    let body = |id: &str| {
        format!(
            r#"{{"tenant_id":"acme","channel":"slack","id":"{id}","sender":{{"user_id":"U1","display_name":"\udc00"}},"content":{{"text":"a \ud800 b"}}}}"#
        )
        .into_bytes()
    };
    broker
        .publish(&body("s-1"), BasicProperties::default())
        .await;
    broker
        .publish(&body("s-2"), BasicProperties::default())
        .await;
    let allowed = broker.collect(&names.orchestrator, 1, WAIT).await;
    assert_eq!(allowed[0].data, body("s-1"), "forwarded byte for byte");
    let rejected = broker.collect(&names.notifications, 1, WAIT).await;
    let notice = String::from_utf8(rejected[0].data.clone()).unwrap();
    assert!(notice.contains(r#""text":"a \ud800 b""#), "{notice}");
    broker.assert_empty(&names.dead_letter).await;
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn over_the_limit_a_rate_limited_notification_is_published() {
    let names = Names::new("rejected");
    let broker = Broker::new(&names).await;
    let gate = TestGate::start(names.config(2, 60)).await;

    for i in 0..2 {
        broker
            .publish(
                &message(&format!("ok-{i}"), "acme", "slack"),
                BasicProperties::default(),
            )
            .await;
    }
    let allowed = broker.collect(&names.orchestrator, 2, WAIT).await;
    let mut remaining: Vec<_> = allowed
        .iter()
        .map(|d| int_header(d, "x-ratelimit-remaining"))
        .collect();
    remaining.sort_unstable();
    assert_eq!(remaining, vec![0, 1]);

    let body = message("over-1", "acme", "slack");
    broker.publish(&body, BasicProperties::default()).await;
    let rejected = broker.collect(&names.notifications, 1, WAIT).await;
    let d = &rejected[0];
    let n: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
    let inbound: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let retry = n["retry_after_seconds"].as_u64().unwrap();
    assert!((1..=60).contains(&retry), "retry_after_seconds {retry}");
    assert_eq!(
        n,
        serde_json::json!({
            "type": "rate_limited",
            "message_id": "over-1",
            "tenant_id": "acme",
            "channel": "slack",
            "scope": "channel",
            "limit": 2,
            "window_seconds": 60,
            "retry_after_seconds": retry,
            "notify_user": true,
            "channel_metadata": inbound["channel_metadata"],
            "sender": inbound["sender"],
            "thread_id": inbound["thread_id"],
            "message": inbound,
        })
    );
    let p = &d.properties;
    assert_eq!(
        p.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), "over-1");
    assert_eq!(p.delivery_mode(), &Some(2));

    // Other channels and tenants have their own windows.
    broker
        .publish(
            &message("other-channel", "acme", "whatsapp"),
            BasicProperties::default(),
        )
        .await;
    broker
        .publish(
            &message("other-tenant", "globex", "slack"),
            BasicProperties::default(),
        )
        .await;
    let more = broker.collect(&names.orchestrator, 2, WAIT).await;
    assert_eq!(more.len(), 2);
    broker.assert_empty(&names.dead_letter).await;
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn without_an_id_the_amqp_message_id_names_the_message() {
    let names = Names::new("amqp-id");
    let broker = Broker::new(&names).await;
    let gate = TestGate::start(names.config(1, 60)).await;
    let body = br#"{"tenant_id":"acme","channel":"slack","text":"hi"}"#;
    let props = |id: &str| BasicProperties::default().with_message_id(id.into());
    broker.publish(body, props("from-amqp-0")).await;
    broker.collect(&names.orchestrator, 1, WAIT).await;
    broker.publish(body, props("from-amqp")).await;
    let rejected = broker.collect(&names.notifications, 1, WAIT).await;
    let n: serde_json::Value = serde_json::from_slice(&rejected[0].data).unwrap();
    assert_eq!(n["message_id"], "from-amqp");
    assert_eq!(n["channel_metadata"], serde_json::Value::Null);
    assert_eq!(n["sender"], serde_json::Value::Null);
    assert_eq!(n["thread_id"], serde_json::Value::Null);
    assert_eq!(
        rejected[0]
            .properties
            .correlation_id()
            .as_ref()
            .unwrap()
            .as_str(),
        "from-amqp"
    );
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn every_malformed_case_is_dead_lettered_with_its_code_and_never_reaches_redis() {
    let names = Names::new("invalid");
    let broker = Broker::new(&names).await;
    let mut config = names.config(5, 60);
    config.limits.max_message_bytes = 2048;
    let gate = TestGate::start(config).await;

    let deep = format!(
        r#"{{"tenant_id":"deep","channel":"slack","x":{}{}}}"#,
        "[".repeat(1000),
        "]".repeat(1000)
    );
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            format!(
                r#"{{"tenant_id":"big","channel":"slack","pad":"{}"}}"#,
                "x".repeat(3000)
            )
            .into_bytes(),
            "too_large",
        ),
        (
            b"{\"tenant_id\": \"acme\", \"channel\": ".to_vec(),
            "invalid_json",
        ),
        (b"\xff\xfe not utf-8".to_vec(), "invalid_json"),
        (deep.into_bytes(), "invalid_json"),
        (br#"["tenant_id","acme"]"#.to_vec(), "not_an_object"),
        (br#"{"channel":"slack"}"#.to_vec(), "missing_tenant_id"),
        (
            br#"{"tenant_id":null,"channel":"slack"}"#.to_vec(),
            "missing_tenant_id",
        ),
        (
            br#"{"tenant_id":"bad tenant","channel":"slack"}"#.to_vec(),
            "invalid_tenant_id",
        ),
        (
            br#"{"tenant_id":42,"channel":"slack"}"#.to_vec(),
            "invalid_tenant_id",
        ),
        (br#"{"tenant_id":"acme"}"#.to_vec(), "missing_channel"),
        (
            br#"{"tenant_id":"acme","channel":"SLACK"}"#.to_vec(),
            "invalid_channel",
        ),
        (
            br#"{"tenant_id":"acme","channel":"slack","id":{"n":1}}"#.to_vec(),
            "invalid_id",
        ),
    ];
    for (i, (body, _)) in cases.iter().enumerate() {
        let props = BasicProperties::default()
            .with_message_id(format!("case-{i}").into())
            .with_app_id("gateway".into());
        broker.publish(body, props).await;
    }
    let out = broker.collect(&names.dead_letter, cases.len(), WAIT).await;
    for d in &out {
        let i: usize = d.properties.message_id().as_ref().unwrap().as_str()[5..]
            .parse()
            .unwrap();
        let (body, code) = &cases[i];
        assert_eq!(&d.data, body, "case {i}: the body must be byte-identical");
        assert_eq!(text_header(d, "x-gate-error"), *code, "case {i}");
        let detail = text_header(d, "x-gate-error-detail");
        assert!(
            detail.len() > 10 && detail.ends_with('.'),
            "case {i}: {detail}"
        );
        assert_eq!(d.properties.app_id().as_ref().unwrap().as_str(), "gateway");
        assert_eq!(d.properties.delivery_mode(), &Some(2));
    }
    broker.assert_empty(&names.orchestrator).await;
    broker.assert_empty(&names.notifications).await;
    let mut redis = connect_redis().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", names.key_prefix))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(keys.is_empty(), "invalid messages touched Redis: {keys:?}");

    // The gate is still working after all of that.
    broker
        .publish(
            &message("after", "acme", "slack"),
            BasicProperties::default(),
        )
        .await;
    broker.collect(&names.orchestrator, 1, WAIT).await;
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn overrides_apply_most_specific_first() {
    let names = Names::new("overrides");
    let broker = Broker::new(&names).await;
    let mut config = names.config(1, 60);
    config.limits.overrides = vec![
        Override {
            tenant: "acme".into(),
            channel: None,
            requests: Some(2),
            window_seconds: None,
            ..Override::default()
        },
        Override {
            tenant: "acme".into(),
            channel: Some("slack".into()),
            requests: Some(3),
            window_seconds: Some(120),
            ..Override::default()
        },
    ];
    let gate = TestGate::start(config).await;
    let mut bodies = Vec::new();
    for (tenant, channel, n) in [
        ("acme", "slack", 4),
        ("acme", "whatsapp", 3),
        ("other", "slack", 2),
    ] {
        for i in 0..n {
            bodies.push(message(&format!("{tenant}-{channel}-{i}"), tenant, channel));
        }
    }
    broker.publish_many(bodies).await;
    let allowed = broker.collect(&names.orchestrator, 3 + 2 + 1, WAIT).await;
    let rejected = broker.collect(&names.notifications, 1 + 1 + 1, WAIT).await;
    let limit_of = |tenant: &str, channel: &str| {
        allowed
            .iter()
            .find(|d| {
                let v: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
                v["tenant_id"] == tenant && v["channel"] == channel
            })
            .map(|d| int_header(d, "x-ratelimit-limit"))
            .unwrap()
    };
    assert_eq!(limit_of("acme", "slack"), 3);
    assert_eq!(limit_of("acme", "whatsapp"), 2);
    assert_eq!(limit_of("other", "slack"), 1);
    let window_of = |tenant: &str, channel: &str| {
        rejected
            .iter()
            .map(|d| serde_json::from_slice::<serde_json::Value>(&d.data).unwrap())
            .find(|v| v["tenant_id"] == tenant && v["channel"] == channel)
            .map(|v| v["window_seconds"].as_u64().unwrap())
            .unwrap()
    };
    assert_eq!(window_of("acme", "slack"), 120);
    assert_eq!(window_of("acme", "whatsapp"), 60);
    assert_eq!(window_of("other", "slack"), 60);
    gate.stop().await;
    broker.cleanup().await;
}

/// The Python router's check: pipeline INCR + TTL, then EXPIRE when the TTL is -1 or the
/// count is 1. Returns whether it allowed the message.
async fn python_router_check(
    redis: &mut redis::aio::MultiplexedConnection,
    key: &str,
    limit: i64,
    window: i64,
) -> bool {
    let (count, ttl): (i64, i64) = redis::pipe()
        .cmd("INCR")
        .arg(key)
        .cmd("TTL")
        .arg(key)
        .query_async(redis)
        .await
        .unwrap();
    if ttl == -1 || count == 1 {
        let _: i64 = redis::cmd("EXPIRE")
            .arg(key)
            .arg(window)
            .query_async(redis)
            .await
            .unwrap();
    }
    count <= limit
}

#[tokio::test]
async fn the_gate_and_the_python_router_share_one_counter() {
    let names = Names::new("python");
    let broker = Broker::new(&names).await;
    let gate = TestGate::start(names.config(10, 60)).await;
    let mut redis = connect_redis().await;
    let key = format!("{}acme:ratelimit:slack", names.key_prefix);

    // Interleave: 4 through the router, 6 through the gate, 3 more through the router, then
    // 2 more through the gate. Exactly 10 of the 15 may pass, whoever checks them.
    let mut router_allowed = 0;
    for _ in 0..4 {
        router_allowed += usize::from(python_router_check(&mut redis, &key, 10, 60).await);
    }
    let gate_bodies: Vec<_> = (0..6)
        .map(|i| message(&format!("g{i}"), "acme", "slack"))
        .collect();
    broker.publish_many(gate_bodies).await;
    let first = broker.collect(&names.orchestrator, 6, WAIT).await;
    let least = first
        .iter()
        .map(|d| int_header(d, "x-ratelimit-remaining"))
        .min();
    assert_eq!(
        least,
        Some(0),
        "4 router + 6 gate messages used the whole limit"
    );
    for _ in 0..3 {
        router_allowed += usize::from(python_router_check(&mut redis, &key, 10, 60).await);
    }
    assert_eq!(router_allowed, 4, "the router saw the gate's six messages");
    broker
        .publish_many((6..8).map(|i| message(&format!("g{i}"), "acme", "slack")))
        .await;
    broker.collect(&names.notifications, 2, WAIT).await;

    let count: i64 = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(count, 15);
    let ttl: i64 = redis::cmd("TTL")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!((1..=60).contains(&ttl), "ttl {ttl}");

    // A counter the router left without a TTL (a crash between INCR and EXPIRE) gets one.
    let orphan = format!("{}orphan:ratelimit:slack", names.key_prefix);
    let _: () = redis::cmd("SET")
        .arg(&orphan)
        .arg(3)
        .query_async(&mut redis)
        .await
        .unwrap();
    broker
        .publish(
            &message("orphan-1", "orphan", "slack"),
            BasicProperties::default(),
        )
        .await;
    broker.collect(&names.orchestrator, 1, WAIT).await;
    let ttl: i64 = redis::cmd("TTL")
        .arg(&orphan)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!((1..=60).contains(&ttl), "orphan ttl {ttl}");
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn a_window_resets_when_its_key_expires() {
    let names = Names::new("window");
    let broker = Broker::new(&names).await;
    let gate = TestGate::start(names.config(1, 1)).await;
    broker
        .publish(&message("w1", "acme", "slack"), BasicProperties::default())
        .await;
    broker
        .publish(&message("w2", "acme", "slack"), BasicProperties::default())
        .await;
    broker.collect(&names.orchestrator, 1, WAIT).await;
    let rejected = broker.collect(&names.notifications, 1, WAIT).await;
    let n: serde_json::Value = serde_json::from_slice(&rejected[0].data).unwrap();
    assert_eq!(n["retry_after_seconds"], 1);
    // Bounded wait for the key to expire, then the next message passes.
    let mut redis = connect_redis().await;
    let key = format!("{}acme:ratelimit:slack", names.key_prefix);
    for _ in 0..40 {
        let exists: bool = redis::cmd("EXISTS")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .unwrap();
        if !exists {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    broker
        .publish(&message("w3", "acme", "slack"), BasicProperties::default())
        .await;
    let out = broker.collect(&names.orchestrator, 1, WAIT).await;
    assert_eq!(output_id(OutputKind::Allowed, &out[0]), "w3");
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn health_readiness_and_metrics_are_served() {
    let names = Names::new("http");
    let broker = Broker::new(&names).await;
    let gate = TestGate::start(names.config(1, 60)).await;
    let (status, body) = http_get(gate.http, "/healthz").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_get(gate.http, "/readyz").await.unwrap();
    assert_eq!(status, 200, "{body}");

    broker
        .publish(&message("h1", "acme", "slack"), BasicProperties::default())
        .await;
    broker
        .publish(&message("h2", "acme", "slack"), BasicProperties::default())
        .await;
    broker
        .publish(b"not json", BasicProperties::default())
        .await;
    broker.collect(&names.orchestrator, 1, WAIT).await;
    broker.collect(&names.notifications, 1, WAIT).await;
    broker.collect(&names.dead_letter, 1, WAIT).await;

    let (status, text) = http_get(gate.http, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    for needle in [
        "konstruct_gate_messages_total{outcome=\"allowed\"}",
        "konstruct_gate_messages_total{outcome=\"rejected\"}",
        "konstruct_gate_messages_total{outcome=\"invalid\"}",
        "konstruct_gate_redis_check_seconds_bucket",
        "konstruct_gate_publish_confirm_seconds_bucket",
        "konstruct_gate_messages_in_flight",
    ] {
        assert!(text.contains(needle), "/metrics lacks {needle}:\n{text}");
    }
    let addr = gate.http;
    gate.stop().await;
    assert!(
        http_get(addr, "/healthz").await.is_err(),
        "the server stopped"
    );
    broker.cleanup().await;
}

#[tokio::test]
async fn an_unroutable_output_is_not_acked_and_is_retried_until_it_can_be_delivered() {
    let names = Names::new("unroutable");
    let broker = Broker::new(&names).await;
    // The orchestrator queue is missing and the gate may not declare it.
    broker
        .channel
        .queue_delete(names.orchestrator.as_str().into(), Default::default())
        .await
        .unwrap();
    let mut config = names.config(10, 60);
    config.amqp.declare_queues = false;
    let gate = TestGate::start(config).await;
    broker
        .publish(&message("u1", "acme", "slack"), BasicProperties::default())
        .await;
    // The publish is returned as unroutable: the gate counts it and hands the message back.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if metric_value(gate.http, "konstruct_gate_publish_failures_total").await >= 1.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no publish failure was counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Once the queue exists, the retried message arrives.
    let mut declare = names.config(1, 1);
    declare.amqp.declare_queues = true;
    konstruct_gate::amqp::declare_queues(&broker.conn, &declare.amqp)
        .await
        .unwrap();
    let out = broker.collect(&names.orchestrator, 1, WAIT).await;
    assert_eq!(output_id(OutputKind::Allowed, &out[0]), "u1");
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn shadow_mode_forwards_what_it_would_reject_and_near_limit_is_flagged() {
    let names = Names::new("shadow");
    let broker = Broker::new(&names).await;
    let mut config = names.config(5, 60);
    config.limits.overrides = vec![Override {
        tenant: "trial".into(),
        shadow: Some(true),
        ..Override::default()
    }];
    let gate = TestGate::start(config).await;
    broker
        .publish_many((0..7).map(|i| message(&format!("s{i}"), "trial", "slack")))
        .await;
    let out = broker.collect(&names.orchestrator, 7, WAIT).await;
    let shadowed = out
        .iter()
        .filter(|d| {
            konstruct_gate::route::header(d.properties.headers(), "x-ratelimit-shadow").is_some()
        })
        .inspect(|d| assert_eq!(text_header(d, "x-ratelimit-shadow"), "rejected"))
        .count();
    assert_eq!(shadowed, 2, "the two over the limit are forwarded, marked");
    let near: Vec<i64> = out
        .iter()
        .filter(|d| {
            konstruct_gate::route::header(d.properties.headers(), "x-ratelimit-near-limit")
                .is_some()
        })
        .map(|d| int_header(d, "x-ratelimit-remaining"))
        .collect();
    let mut near = near;
    near.sort_unstable();
    assert_eq!(near, vec![0, 1], "remaining ≤ 20 % of 5 is flagged");
    broker.assert_empty(&names.notifications).await;
    let (_, metrics) = http_get(gate.http, "/metrics").await.unwrap();
    assert!(metrics.contains("konstruct_gate_shadow_rejections_total"));
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn repeated_rejections_of_one_sender_notify_the_user_once() {
    let names = Names::new("notify");
    let broker = Broker::new(&names).await;
    let gate = TestGate::start(names.config(1, 60)).await;
    let body = |id: &str, user: &str| {
        serde_json::to_vec(&serde_json::json!({
            "id": id, "tenant_id": "acme", "channel": "slack",
            "sender": {"user_id": user},
        }))
        .unwrap()
    };
    broker
        .publish(&body("first", "U1"), BasicProperties::default())
        .await;
    broker.collect(&names.orchestrator, 1, WAIT).await;
    for i in 0..4 {
        broker
            .publish(&body(&format!("u1-{i}"), "U1"), BasicProperties::default())
            .await;
    }
    broker
        .publish(&body("u2-0", "U2"), BasicProperties::default())
        .await;
    let rejected = broker.collect(&names.notifications, 5, WAIT).await;
    let mut told: Vec<(String, bool)> = rejected
        .iter()
        .map(|d| serde_json::from_slice::<serde_json::Value>(&d.data).unwrap())
        .map(|n| {
            (
                n["sender"]["user_id"].as_str().unwrap().to_owned(),
                n["notify_user"].as_bool().unwrap(),
            )
        })
        .collect();
    told.sort();
    assert_eq!(
        told,
        vec![
            ("U1".into(), false),
            ("U1".into(), false),
            ("U1".into(), false),
            ("U1".into(), true),
            ("U2".into(), true),
        ],
        "one reply per sender, every rejection still published"
    );
    gate.stop().await;

    // With notify = "every", every rejection asks for a reply.
    let mut config = names.config(1, 60);
    config.limits.notify = konstruct_gate::config::Notify::Every;
    let gate = TestGate::start(config).await;
    for i in 0..2 {
        broker
            .publish(&body(&format!("e{i}"), "U1"), BasicProperties::default())
            .await;
    }
    let rejected = broker.collect(&names.notifications, 2, WAIT).await;
    for d in &rejected {
        let n: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
        assert_eq!(n["notify_user"], true);
    }
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn overrides_written_to_redis_apply_within_seconds() {
    let names = Names::new("redis-overrides");
    let broker = Broker::new(&names).await;
    let mut config = names.config(10, 60);
    config.limits.redis_overrides_refresh_ms = 100;
    let gate = TestGate::start(config).await;
    let mut redis = connect_redis().await;
    let hash = format!("{}konstruct-gate:overrides", names.key_prefix);
    let _: i64 = redis::cmd("HSET")
        .arg(&hash)
        .arg("acme:slack")
        .arg(r#"{"requests": 1, "window_seconds": 30}"#)
        .query_async(&mut redis)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    broker
        .publish_many((0..2).map(|i| message(&format!("r{i}"), "acme", "slack")))
        .await;
    let allowed = broker.collect(&names.orchestrator, 1, WAIT).await;
    assert_eq!(int_header(&allowed[0], "x-ratelimit-limit"), 1);
    let rejected = broker.collect(&names.notifications, 1, WAIT).await;
    let n: serde_json::Value = serde_json::from_slice(&rejected[0].data).unwrap();
    assert_eq!(
        (n["limit"].as_u64(), n["window_seconds"].as_u64()),
        (Some(1), Some(30))
    );
    // Other channels keep the file's limit.
    broker
        .publish(
            &message("w", "acme", "whatsapp"),
            BasicProperties::default(),
        )
        .await;
    let other = broker.collect(&names.orchestrator, 1, WAIT).await;
    assert_eq!(int_header(&other[0], "x-ratelimit-limit"), 10);
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn a_flood_from_one_tenant_is_answered_locally_once_it_is_over_its_limit() {
    let names = Names::new("flood");
    let broker = Broker::new(&names).await;
    let gate = TestGate::start(names.config(3, 60)).await;
    let before = metric_value(gate.http, "konstruct_gate_local_rejections_total").await;
    let flood = |from: usize, to: usize| {
        (from..to).map(|i| {
            serde_json::to_vec(&serde_json::json!({
                "id": format!("f{i}"), "tenant_id": "flooder", "channel": "slack",
                "sender": {"user_id": "U1"},
            }))
            .unwrap()
        })
    };
    broker.publish_many(flood(0, 10)).await;
    broker.collect(&names.orchestrator, 3, WAIT).await;
    broker.collect(&names.notifications, 7, WAIT).await;
    broker.publish_many(flood(10, 200)).await;
    let rejected = broker.collect(&names.notifications, 190, WAIT).await;
    for d in &rejected {
        let n: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
        assert_eq!(
            n["notify_user"], false,
            "the sender was told in the first phase"
        );
        assert_eq!(n["limit"], 3);
        let retry = n["retry_after_seconds"].as_u64().unwrap();
        assert!((1..=61).contains(&retry), "{n}");
    }
    let mut redis = connect_redis().await;
    let key = format!("{}flooder:ratelimit:slack", names.key_prefix);
    let count: i64 = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        count <= 10,
        "Redis counted {count} of 200: the second phase was answered locally"
    );
    let local = metric_value(gate.http, "konstruct_gate_local_rejections_total").await - before;
    assert!(local >= 190.0, "{local} local answers");
    broker.assert_empty(&names.orchestrator).await;
    gate.stop().await;
    broker.cleanup().await;
}
