//! Edges, against the real RabbitMQ and Redis: one key Redis cannot count fails only its
//! own messages (under both `on_redis_error` policies), replays are marked, a queue that
//! exists with other arguments is used as it is, a Redis override out of range keeps the
//! rule in force, and quiet rejections know a sender by its `user_id`.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use konstruct_gate::config::OnRedisError;
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};

const WAIT: Duration = Duration::from_secs(30);

fn header(d: &Delivery, name: &str) -> Option<String> {
    match konstruct_gate::route::header(d.properties.headers(), name)? {
        AMQPValue::LongString(v) => Some(String::from_utf8_lossy(v.as_bytes()).into()),
        other => Some(format!("{other:?}")),
    }
}

fn tenant_of(d: &Delivery) -> String {
    let v: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
    v["tenant_id"].as_str().unwrap().to_owned()
}

/// 10 healthy tenants × 5 messages and 4 messages of a tenant whose counter holds text,
/// interleaved so that every batch mixes them.
fn mixed_backlog() -> Vec<Vec<u8>> {
    let mut bodies = Vec::new();
    for round in 0..5 {
        for t in 0..10 {
            bodies.push(message(
                &format!("t{t}-{round}"),
                &format!("tenant-{t}"),
                "slack",
            ));
        }
        if round < 4 {
            bodies.push(message(&format!("p-{round}"), "poisoned", "slack"));
        }
    }
    bodies
}

async fn poison(names: &Names) -> String {
    let key = format!("{}poisoned:ratelimit:slack", names.key_prefix);
    let mut redis = connect_redis().await;
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("not a number")
        .query_async(&mut redis)
        .await
        .unwrap();
    key
}

#[tokio::test]
async fn a_poisoned_key_under_allow_leaves_every_other_tenant_checked_exactly() {
    let names = Names::new("poison-allow");
    let broker = Broker::new(&names).await;
    poison(&names).await;
    broker.publish_many(mixed_backlog()).await;
    let mut config = names.config(3, 60);
    config.limits.on_redis_error = OnRedisError::Allow;
    let gate = TestGate::start(config).await;

    // 10 tenants × 3 allowed + 4 poisoned forwarded unchecked; 10 × 2 rejected.
    let forwarded = broker.collect(&names.orchestrator, 34, WAIT).await;
    let rejected = broker.collect(&names.notifications, 20, WAIT).await;
    let mut allowed_per_tenant: HashMap<String, usize> = HashMap::new();
    for d in &forwarded {
        let tenant = tenant_of(d);
        let degraded = header(d, "x-ratelimit-degraded").is_some();
        assert_eq!(
            degraded,
            tenant == "poisoned",
            "{tenant}: degraded = {degraded}"
        );
        if tenant != "poisoned" {
            assert_eq!(int_header(d, "x-ratelimit-limit"), 3);
            *allowed_per_tenant.entry(tenant).or_default() += 1;
        }
    }
    assert_eq!(allowed_per_tenant.len(), 10);
    assert!(
        allowed_per_tenant.values().all(|&n| n == 3),
        "{allowed_per_tenant:?}"
    );
    assert!(rejected.iter().all(|d| tenant_of(d) != "poisoned"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.assert_empty(&names.orchestrator).await;
    broker.assert_empty(&names.inbound).await;
    // A key at fault says nothing about Redis: the instance stays ready.
    assert_eq!(http_get(gate.http, "/readyz").await.unwrap().0, 200);
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn a_poisoned_key_under_hold_stops_nothing_else_and_goes_through_once_repaired() {
    let names = Names::new("poison-hold");
    let broker = Broker::new(&names).await;
    let key = poison(&names).await;
    broker.publish_many(mixed_backlog()).await;
    let addr = free_addr();
    let mut env = names.env(3, 60);
    env.push(("KONSTRUCT_GATE__HTTP__LISTEN".into(), addr.to_string()));
    env.push((
        "KONSTRUCT_GATE__LIMITS__ON_REDIS_ERROR".into(),
        "hold".into(),
    ));
    // Without count-once, a retried check would count again: the counters below show
    // that the healthy checks sharing script calls with the failing key never are.
    env.push(("KONSTRUCT_GATE__LIMITS__COUNT_ONCE".into(), "false".into()));
    let _gate = GateProcess::spawn(&env);

    let forwarded = broker.collect(&names.orchestrator, 30, WAIT).await;
    broker.collect(&names.notifications, 20, WAIT).await;
    assert!(forwarded.iter().all(|d| tenant_of(d) != "poisoned"));
    assert!(
        forwarded
            .iter()
            .all(|d| header(d, "x-ratelimit-degraded").is_none())
    );

    // The four held messages are the only ones the broker still waits for: the 50 settled
    // after them were acked one by one, not stuck behind them.
    let deadline = Instant::now() + WAIT;
    loop {
        let held = metric_value(addr, "konstruct_gate_messages_held").await;
        let in_flight = metric_value(addr, "konstruct_gate_messages_in_flight").await;
        if held == 4.0 && in_flight == 4.0 && unacked(&names.inbound) == 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "held {held}, in flight {in_flight}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every healthy counter counted each of its 5 messages once, although the poisoned key
    // failed in the same script calls again and again.
    let mut redis = connect_redis().await;
    for t in 0..10 {
        let count: Option<i64> = redis::cmd("GET")
            .arg(format!("{}tenant-{t}:ratelimit:slack", names.key_prefix))
            .query_async(&mut redis)
            .await
            .unwrap();
        assert_eq!(count, Some(5), "tenant-{t}");
    }

    // Repaired: the held messages go through, checked.
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    let released = broker.collect(&names.orchestrator, 3, WAIT).await;
    assert!(released.iter().all(|d| tenant_of(d) == "poisoned"));
    assert!(
        released
            .iter()
            .all(|d| header(d, "x-ratelimit-degraded").is_none())
    );
    broker.collect(&names.notifications, 1, WAIT).await;
    let deadline = Instant::now() + WAIT;
    while metric_value(addr, "konstruct_gate_messages_held").await != 0.0
        || metric_value(addr, "konstruct_gate_messages_in_flight").await != 0.0
    {
        assert!(Instant::now() < deadline, "the gauges did not return to 0");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(unacked(&names.inbound), 0);
    broker.cleanup().await;
}

#[tokio::test]
async fn a_second_forward_of_one_id_is_marked_replayed() {
    let names = Names::new("replayed");
    let broker = Broker::new(&names).await;
    let gate = TestGate::start(names.config(10, 60)).await;
    let body = message("same-id", "acme", "slack");
    broker.publish(&body, BasicProperties::default()).await;
    let first = broker.collect(&names.orchestrator, 1, WAIT).await;
    assert_eq!(header(&first[0], "x-ratelimit-replayed"), None);
    // The gate notes the confirmed forward before it acks: wait for that note.
    let seen = format!("{{{}acme:ratelimit:slack}}:seen", names.key_prefix);
    let mut redis = connect_redis().await;
    let deadline = Instant::now() + WAIT;
    loop {
        let note: Option<String> = redis::cmd("HGET")
            .arg(&seen)
            .arg("same-id")
            .query_async(&mut redis)
            .await
            .unwrap();
        if note.is_some_and(|n| n.ends_with(":f")) {
            break;
        }
        assert!(Instant::now() < deadline, "the forward was never noted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    broker.publish(&body, BasicProperties::default()).await;
    let second = broker.collect(&names.orchestrator, 1, WAIT).await;
    assert_eq!(
        header(&second[0], "x-ratelimit-replayed").as_deref(),
        Some("true")
    );
    assert_eq!(
        int_header(&second[0], "x-ratelimit-remaining"),
        9,
        "counted once"
    );
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn an_output_queue_declared_with_other_arguments_is_used_as_it_is() {
    let names = Names::new("predeclared");
    let conn = connect_amqp().await;
    let channel = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(10_000));
    channel
        .queue_declare(
            ShortString::from(names.orchestrator.as_str()),
            QueueDeclareOptions::durable(),
            args,
        )
        .await
        .unwrap();
    let broker = Broker::new_without_declaring(&names).await;
    let gate = TestGate::start(names.config(5, 60)).await;
    broker
        .publish(&message("m1", "acme", "slack"), BasicProperties::default())
        .await;
    let out = broker.collect(&names.orchestrator, 1, WAIT).await;
    assert_eq!(output_id(OutputKind::Allowed, &out[0]), "m1");
    gate.stop().await;
    broker.cleanup().await;
    let _ = conn.close(200, ShortString::from("done")).await;
}

#[tokio::test]
async fn a_redis_override_out_of_range_is_skipped_and_the_rule_in_force_stays() {
    let names = Names::new("override-range");
    let broker = Broker::new(&names).await;
    let mut config = names.config(30, 600);
    config.limits.redis_overrides_refresh_ms = 100;
    let gate = TestGate::start(config).await;
    let hash = format!("{}konstruct-gate:overrides", names.key_prefix);
    let mut redis = connect_redis().await;
    let set = |value: &'static str| {
        redis::cmd("HSET")
            .arg(&hash)
            .arg("acme")
            .arg(value)
            .to_owned()
    };
    let _: () = set(r#"{"requests": 2}"#)
        .query_async(&mut redis)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    for i in 0..3 {
        broker
            .publish(
                &message(&format!("a{i}"), "acme", "slack"),
                BasicProperties::default(),
            )
            .await;
    }
    broker.collect(&names.orchestrator, 2, WAIT).await;
    broker.collect(&names.notifications, 1, WAIT).await;

    let _: () = set(r#"{"requests": 100000000000000000}"#)
        .query_async(&mut redis)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    for i in 0..3 {
        broker
            .publish(
                &message(&format!("b{i}"), "acme", "slack"),
                BasicProperties::default(),
            )
            .await;
    }
    let rejected = broker.collect(&names.notifications, 3, WAIT).await;
    for d in rejected {
        let v: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
        assert_eq!(v["limit"], 2, "the rule in force stays");
    }
    broker.assert_empty(&names.orchestrator).await;
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn a_sender_whose_display_name_changes_is_told_once() {
    let names = Names::new("sender-id");
    let broker = Broker::new(&names).await;
    let gate = TestGate::start(names.config(1, 60)).await;
    let body = |id: &str, name: &str| {
        serde_json::to_vec(&serde_json::json!({
            "id": id, "tenant_id": "acme", "channel": "slack",
            "sender": {"user_id": "U1", "display_name": name, "avatar": format!("{name}.png")},
        }))
        .unwrap()
    };
    broker
        .publish(&body("m0", "Ada"), BasicProperties::default())
        .await;
    broker.collect(&names.orchestrator, 1, WAIT).await;
    for (i, name) in ["Ada", "Ada L.", "Ada Lovelace", "ada"].iter().enumerate() {
        broker
            .publish(
                &body(&format!("m{}", i + 1), name),
                BasicProperties::default(),
            )
            .await;
    }
    let notes = broker.collect(&names.notifications, 4, WAIT).await;
    let told: Vec<bool> = notes
        .iter()
        .map(|d| {
            let v: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
            v["notify_user"].as_bool().unwrap()
        })
        .collect();
    assert_eq!(told.iter().filter(|t| **t).count(), 1, "{told:?}");
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn a_redis_that_refuses_every_write_is_not_ready_not_a_bad_key() {
    let names = Names::new("redis-oom");
    let broker = Broker::new(&names).await;
    let redis = PrivateRedis::start().await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    // Out of memory for every write: scripts fail on their first write, for every key.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1")
        .query_async(&mut con)
        .await
        .unwrap();
    let mut config = names.config(5, 60);
    config.redis.url = konstruct_gate::config::SecretUrl::new(redis.url());
    config.limits.on_redis_error = OnRedisError::Allow;
    let gate = TestGate::start(config).await;
    for i in 0..3 {
        broker
            .publish(
                &message(&format!("o{i}"), &format!("t{i}"), "slack"),
                BasicProperties::default(),
            )
            .await;
    }
    let out = broker.collect(&names.orchestrator, 3, WAIT).await;
    assert!(
        out.iter()
            .all(|d| header(d, "x-ratelimit-degraded").is_some())
    );
    let (status, body) = http_get(gate.http, "/readyz").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("redis_checks_failing: true"), "{body}");
    gate.stop().await;
    broker.cleanup().await;
}

/// A broker user allowed only what a gate without a deferring rule needs: `configure` on
/// the four queues, `write` on the default exchange, `read` on the inbound queue. Deleted
/// however the test ends.
struct FourQueuesUser {
    name: String,
}

impl FourQueuesUser {
    /// Rights on the four queues only.
    fn create(names: &Names) -> Self {
        let q = |q: &str| q.replace('.', r"\.");
        let (inbound, outputs) = (q(&names.inbound), Self::outputs(names));
        Self::with_rights(
            &format!("^({inbound}|{outputs})$"),
            r"^amq\.default$",
            &format!("^{inbound}$"),
        )
    }

    /// The README's rights for a sharded inbound whose rules only reject.
    fn sharded(names: &Names) -> Self {
        let q = |q: &str| q.replace('.', r"\.");
        let (inbound, outputs) = (q(&names.inbound), Self::outputs(names));
        Self::with_rights(
            &format!(r"^({inbound}(\.[0-9]+)?|{outputs})$"),
            &format!(r"^(amq\.default|{inbound}\.[0-9]+)$"),
            &format!(r"^{inbound}(\.[0-9]+)?$"),
        )
    }

    fn outputs(names: &Names) -> String {
        [
            &names.orchestrator,
            &names.notifications,
            &names.dead_letter,
        ]
        .map(|q| q.replace('.', r"\."))
        .join("|")
    }

    fn with_rights(configure: &str, write: &str, read: &str) -> Self {
        let user = Self {
            name: unique("four-queues"),
        };
        let name = user.name.as_str();
        assert!(
            rabbitmqctl_status(&["add_user", name, "secret"]).success(),
            "rabbitmqctl add_user failed"
        );
        let set = ["set_permissions", "-p", "/", name, configure, write, read];
        assert!(
            rabbitmqctl_status(&set).success(),
            "rabbitmqctl set_permissions failed"
        );
        user
    }

    fn url(&self) -> String {
        format!("amqp://{}:secret@127.0.0.1:5672/%2f", self.name)
    }
}

impl Drop for FourQueuesUser {
    fn drop(&mut self) {
        let _ = rabbitmqctl_status(&["delete_user", &self.name]);
    }
}

#[tokio::test]
async fn a_user_allowed_only_the_four_queues_runs_a_gate_that_rejects() {
    let names = Names::new("least-privilege");
    let user = FourQueuesUser::create(&names);
    let broker = Broker::new_without_declaring(&names).await;
    let mut config = names.config(1, 60);
    config.amqp.url = konstruct_gate::config::SecretUrl::new(user.url());
    // The gate declares its four queues itself, as that user.
    let gate = TestGate::start(config).await;
    one_allowed_one_rejected(&broker, WAIT).await;
    let (status, body) = http_get(gate.http, "/readyz").await.unwrap();
    assert_eq!(status, 200, "{body}");
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn a_user_with_the_readmes_sharded_rights_runs_a_sharded_gate() {
    let names = Names::new("least-privilege-sharded");
    let user = FourQueuesUser::sharded(&names);
    let broker = Broker::new_without_declaring(&names).await;
    let mut config = names.config(1, 60);
    config.amqp.url = konstruct_gate::config::SecretUrl::new(user.url());
    config.amqp.inbound_shards = 2;
    // Ready means every queue, the exchange and its bindings were declared as that user.
    let gate = TestGate::start(config).await;
    let bodies = ["m1", "m2"].map(|id| ("acme".to_owned(), message(id, "acme", "slack")));
    broker.publish_to_exchange(bodies).await;
    let allowed = broker.collect(&names.orchestrator, 1, WAIT).await;
    assert_eq!(output_id(OutputKind::Allowed, &allowed[0]), "m1");
    let rejected = broker.collect(&names.notifications, 1, WAIT).await;
    assert_eq!(output_id(OutputKind::Rejected, &rejected[0]), "m2");
    let (status, body) = http_get(gate.http, "/readyz").await.unwrap();
    assert_eq!(status, 200, "{body}");
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn a_deferring_rule_the_broker_will_not_give_a_ladder_rejects_and_says_why() {
    let names = Names::new("least-privilege-defer");
    let user = FourQueuesUser::create(&names);
    let broker = Broker::new_without_declaring(&names).await;
    let mut config = names.config(1, 60);
    config.amqp.url = konstruct_gate::config::SecretUrl::new(user.url());
    config.limits.on_limit = konstruct_gate::config::OnLimit::Defer;
    let gate = TestGate::start_without_waiting(config).await;
    // Not ready, with the broker's reason, but consuming (no reconnect loop).
    let body = wait_consuming_but_not_ready(gate.http, "defer_ladder_error", WAIT).await;
    assert!(body.contains("ACCESS_REFUSED"), "{body}");
    // Over the limit and nowhere to park: rejected, with a notification.
    one_allowed_one_rejected(&broker, WAIT).await;
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn with_duplicates_dropped_an_id_gets_one_output() {
    let names = Names::new("duplicates-drop");
    let broker = Broker::new(&names).await;
    let mut config = names.config(1, 60);
    config.limits.duplicates = konstruct_gate::config::Duplicates::Drop;
    let gate = TestGate::start(config).await;
    let (first, second) = (
        message("d1", "acme", "slack"),
        message("d2", "acme", "slack"),
    );
    broker.publish_many([first.clone(), second.clone()]).await;
    let allowed = broker.collect(&names.orchestrator, 1, WAIT).await;
    assert_eq!(output_id(OutputKind::Allowed, &allowed[0]), "d1");
    let rejected = broker.collect(&names.notifications, 1, WAIT).await;
    assert_eq!(output_id(OutputKind::Rejected, &rejected[0]), "d2");
    broker.wait_empty(&names.inbound, WAIT).await;
    // The gateway publishes both again: acked, no second output of either.
    broker.publish_many([first, second]).await;
    broker.wait_empty(&names.inbound, WAIT).await;
    let deadline = Instant::now() + WAIT;
    while unacked(&names.inbound) > 0 {
        assert!(Instant::now() < deadline, "never acked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.assert_empty(&names.orchestrator).await;
    broker.assert_empty(&names.notifications).await;
    // A new id still gets its output.
    broker
        .publish(&message("d3", "acme", "slack"), BasicProperties::default())
        .await;
    let rejected = broker.collect(&names.notifications, 1, WAIT).await;
    assert_eq!(output_id(OutputKind::Rejected, &rejected[0]), "d3");
    gate.stop().await;
    broker.cleanup().await;
}
