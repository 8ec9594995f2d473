//! A sharded inbound (`amqp.inbound_shards`) on the real broker: gateways on the exchange
//! and on the plain queue are limited exactly alike, one tenant's flood never holds back
//! the tenants of the other shards, a parked message returns to its tenant's shard, a
//! smaller shard count strands nothing, and quiet rejections can cost no publish.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use konstruct_gate::config::{Config, OnLimit, QuietRejections};
use lapin::BasicProperties;
use lapin::types::ShortString;

const WAIT: Duration = Duration::from_secs(60);

fn sharded(names: &Names, shards: u16, requests: u64, window_seconds: u64) -> Config {
    let mut config = names.config(requests, window_seconds);
    config.amqp.inbound_shards = shards;
    config
}

/// The broker's side of a sharded inbound, declared as the gate would, so that a test can
/// publish before a gate runs.
async fn sharded_broker(names: &Names, config: &Config) -> Broker {
    let broker = Broker::with_queues(names, &config.amqp).await;
    konstruct_gate::shards::declare_exchange(&broker.conn, &config.amqp)
        .await
        .expect("the broker has the consistent-hash exchange (rabbitmq-plugins enable rabbitmq_consistent_hash_exchange)");
    broker
}

async fn shard_depths(broker: &Broker, shards: u16) -> Vec<u32> {
    let mut depths = Vec::new();
    for k in 0..shards {
        let queue = konstruct_gate::shards::shard_queue(&broker.names.inbound, k);
        depths.push(broker.depth(&queue).await);
    }
    depths
}

fn tenant_of(delivery: &lapin::message::Delivery) -> String {
    let v: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap();
    v["tenant_id"]
        .as_str()
        .or_else(|| v["message"]["tenant_id"].as_str())
        .unwrap()
        .to_owned()
}

fn count_by_tenant(deliveries: &[lapin::message::Delivery]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for d in deliveries {
        *counts.entry(tenant_of(d)).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn gateways_on_the_exchange_and_on_the_plain_queue_are_limited_exactly_alike() {
    let names = Names::new("shards-migrate");
    let config = sharded(&names, 4, 3, 600);
    let broker = sharded_broker(&names, &config).await;
    let gate = TestGate::start(config).await;
    // Eight tenants, five messages each: the even ones from a gateway that moved to the
    // exchange, the odd ones from one still on the plain queue; `both` from both at once.
    for t in 0..8 {
        let tenant = format!("t{t}");
        let bodies: Vec<Vec<u8>> = (0..5)
            .map(|i| message(&format!("{tenant}-{i}"), &tenant, "slack"))
            .collect();
        if t % 2 == 0 {
            broker
                .publish_to_exchange(bodies.into_iter().map(|b| (tenant.clone(), b)))
                .await;
        } else {
            broker.publish_many(bodies).await;
        }
    }
    for i in 0..3 {
        let via_exchange = message(&format!("both-x{i}"), "both", "slack");
        broker
            .publish_to_exchange([("both".to_owned(), via_exchange)])
            .await;
        broker
            .publish(
                &message(&format!("both-q{i}"), "both", "slack"),
                BasicProperties::default(),
            )
            .await;
    }
    let allowed = broker.collect(&names.orchestrator, 8 * 3 + 3, WAIT).await;
    let rejected = broker.collect(&names.notifications, 8 * 2 + 3, WAIT).await;
    let allowed = count_by_tenant(&allowed);
    let rejected = count_by_tenant(&rejected);
    for tenant in (0..8).map(|t| format!("t{t}")).chain(["both".to_owned()]) {
        assert_eq!(allowed[&tenant], 3, "{tenant}: exactly its limit");
    }
    assert_eq!(
        rejected["both"], 3,
        "one window across the exchange and the queue"
    );
    broker.assert_empty(&names.orchestrator).await;
    broker.assert_empty(&names.notifications).await;
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_shard_never_holds_back_the_others() {
    const SHARDS: u16 = 16;
    // Large enough that draining it takes seconds even with its rejections dropped: the
    // quiet tenants must be through long before, not by a hair (a 20,000-message flood
    // once drained before the test had read the quiet tenants' last message).
    const FLOOD: usize = 60_000;
    let names = Names::new("shards-flood");
    let mut config = sharded(&names, SHARDS, 30, 600);
    config.limits.quiet_rejections = QuietRejections::Drop;
    let broker = sharded_broker(&names, &config).await;
    // The flood is in its shard before the quiet tenants write: on one FIFO queue their
    // messages would wait behind all of it.
    broker
        .publish_to_exchange((0..FLOOD).map(|i| {
            (
                "flood".to_owned(),
                realistic_message(&format!("f{i}"), "flood", "slack"),
            )
        }))
        .await;
    let depths = shard_depths(&broker, SHARDS).await;
    let flood_shard = depths
        .iter()
        .position(|&d| d as usize == FLOOD)
        .expect("one shard holds the flood");
    let quiet: Vec<String> = (0..50).map(|t| format!("quiet{t}")).collect();
    broker
        .publish_to_exchange(quiet.iter().flat_map(|t| {
            (0..2).map(move |i| (t.clone(), message(&format!("{t}-{i}"), t, "slack")))
        }))
        .await;
    let after = shard_depths(&broker, SHARDS).await;
    let mates: usize = (after[flood_shard] as usize - FLOOD) / 2;
    let gate = TestGate::start(config).await;
    // Every quiet tenant outside the flood's shard is through while the flood still waits.
    let outside = quiet.len() - mates;
    let (channel, mut consumer) = broker.consume(&names.orchestrator).await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    let deadline = Instant::now() + WAIT;
    let mut backlog_when_through = None;
    let started = Instant::now();
    let mut total = 0;
    use futures::StreamExt;
    while total < quiet.len() * 2 + 30 {
        let next = tokio::time::timeout_at(deadline.into(), consumer.next()).await;
        let delivery = next
            .expect("every allowed message arrives")
            .unwrap()
            .unwrap();
        *seen.entry(tenant_of(&delivery)).or_default() += 1;
        total += 1;
        let through = quiet.iter().filter(|t| seen.get(*t) == Some(&2)).count();
        if backlog_when_through.is_none() && through >= outside {
            let shard = konstruct_gate::shards::shard_queue(&names.inbound, flood_shard as u16);
            backlog_when_through = Some((broker.depth(&shard).await, started.elapsed()));
        }
    }
    let _ = channel.close(200, ShortString::from("bye")).await;
    let (backlog, took) = backlog_when_through.unwrap();
    eprintln!(
        "{outside} quiet tenants outside the flood's shard were through after {took:?} with {backlog} of the flood's {FLOOD} messages still waiting; {mates} shared its shard"
    );
    assert!(
        backlog > 0,
        "the quiet tenants of other shards waited for the whole flood"
    );
    assert_eq!(
        seen["flood"], 30,
        "the flooding tenant gets exactly its limit"
    );
    for t in &quiet {
        assert_eq!(seen[t], 2, "{t}: every message within its limit");
    }
    // The operator's one command: which tenant fills which shard.
    let (_, top) = http_get(gate.http, "/shards/top").await.unwrap();
    let top: serde_json::Value = serde_json::from_str(&top).unwrap();
    let flood_queue = konstruct_gate::shards::shard_queue(&names.inbound, flood_shard as u16);
    assert_eq!(top[0]["queue"], flood_queue.as_str(), "{top}");
    assert_eq!(top[0]["tenants"][0]["tenant_id"], "flood", "{top}");
    // Nothing lost: the flood's rejections were told once and dropped quietly otherwise.
    let deadline = Instant::now() + WAIT;
    while metric_value(
        gate.http,
        "konstruct_gate_messages_total{outcome=\"rejected_quiet\"}",
    )
    .await
        + metric_value(
            gate.http,
            "konstruct_gate_messages_total{outcome=\"rejected\"}",
        )
        .await
        < (FLOOD - 30) as f64
    {
        assert!(Instant::now() < deadline, "every flood message was decided");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn a_parked_message_returns_to_its_tenants_shard() {
    const SHARDS: u16 = 4;
    let names = Names::new("shards-defer");
    // A 10 s window: the parked copy waits in a step long enough for the gate to stop.
    let mut config = sharded(&names, SHARDS, 1, 10);
    config.limits.on_limit = OnLimit::Defer;
    let broker = sharded_broker(&names, &config).await;
    let ids = ["d0", "d1"];
    broker
        .publish_to_exchange(
            ids.iter()
                .map(|id| ("acme".to_owned(), message(id, "acme", "slack"))),
        )
        .await;
    let home = shard_depths(&broker, SHARDS)
        .await
        .iter()
        .position(|&d| d == 2)
        .expect("one shard holds the tenant's messages");
    let gate = TestGate::start(config).await;
    broker.collect(&names.orchestrator, 1, WAIT).await;
    // The second is parked; the gate stops before it comes back.
    let step = konstruct_gate::amqp::step_queue(&names.inbound, true, 1);
    let deadline = Instant::now() + WAIT;
    let parked = loop {
        let mut parked = 0;
        for seconds in konstruct_gate::amqp::DEFER_STEPS {
            let step = konstruct_gate::amqp::step_queue(&names.inbound, true, seconds);
            parked += broker.depth(&step).await;
        }
        if parked == 1 {
            break parked;
        }
        assert!(
            Instant::now() < deadline,
            "the message was parked in the sharded ladder ({step}…)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    gate.stop().await;
    assert_eq!(parked, 1);
    // Back from its step: in its tenant's shard, and only there.
    let deadline = Instant::now() + WAIT;
    loop {
        let depths = shard_depths(&broker, SHARDS).await;
        if depths.iter().sum::<u32>() == 1 {
            assert_eq!(depths[home], 1, "back in shard {home}: {depths:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the parked message came back: {depths:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A gate forwards it once its window allows.
    let mut config = sharded(&names, SHARDS, 1, 10);
    config.limits.on_limit = OnLimit::Defer;
    let gate = TestGate::start(config).await;
    let forwarded = broker.collect(&names.orchestrator, 1, WAIT).await;
    assert_eq!(output_id(OutputKind::Allowed, &forwarded[0]), "d1");
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn shards_a_smaller_count_leaves_behind_are_drained_even_past_a_gap() {
    let names = Names::new("shards-shrink");
    let before = sharded(&names, 6, 1_000, 600);
    let broker = sharded_broker(&names, &before).await;
    let tenants: Vec<String> = (0..60).map(|t| format!("s{t}")).collect();
    broker
        .publish_to_exchange(
            tenants
                .iter()
                .map(|t| (t.clone(), message(&format!("{t}-a"), t, "slack"))),
        )
        .await;
    let depths = shard_depths(&broker, 6).await;
    assert!(depths[5] > 0, "some tenants hash to shard 5: {depths:?}");
    // An operator deleted shard 3 (its messages with it: here, by hand, out of order);
    // two shards now. Shards 2, 4 and 5 still hold messages: the gate drains them all.
    let lost = depths[3] as usize;
    let shard3 = konstruct_gate::shards::shard_queue(&names.inbound, 3);
    broker
        .channel
        .queue_delete(ShortString::from(shard3.as_str()), Default::default())
        .await
        .unwrap();
    let gate = TestGate::start(sharded(&names, 2, 1_000, 600)).await;
    broker
        .collect(&names.orchestrator, tenants.len() - lost, WAIT)
        .await;
    broker.assert_empty(&names.orchestrator).await;
    let reconnects = "konstruct_gate_amqp_reconnects_total";
    // Deleting an emptied retired shard while the gate consumes it ends nothing else.
    let shard5 = konstruct_gate::shards::shard_queue(&names.inbound, 5);
    broker
        .channel
        .queue_delete(ShortString::from(shard5.as_str()), Default::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(metric_value(gate.http, reconnects).await, 0.0);
    gate.wait_ready(WAIT).await;
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn quiet_rejections_can_cost_no_publish() {
    let names = Names::new("shards-quiet");
    let broker = Broker::new(&names).await;
    let mut config = names.config(1, 600);
    config.limits.quiet_rejections = QuietRejections::Drop;
    let gate = TestGate::start(config).await;
    // One sender (realistic_message's user is per tenant): one allowed, one told, eight
    // rejections the notifier would not reply to, acked without a publish.
    broker
        .publish_many((0..10).map(|i| realistic_message(&format!("q{i}"), "acme", "slack")))
        .await;
    broker.collect(&names.orchestrator, 1, WAIT).await;
    let told = broker.collect(&names.notifications, 1, WAIT).await;
    let notice: serde_json::Value = serde_json::from_slice(&told[0].data).unwrap();
    assert_eq!(notice["notify_user"], true);
    let deadline = Instant::now() + WAIT;
    let quiet = "konstruct_gate_messages_total{outcome=\"rejected_quiet\"}";
    while metric_value(gate.http, quiet).await < 8.0 {
        assert!(Instant::now() < deadline, "eight quiet rejections counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    broker.assert_empty(&names.notifications).await;
    broker.assert_empty(&names.orchestrator).await;
    gate.stop().await;
    broker.cleanup().await;
}
