//! Fault injection: killed instances, connections closed by the broker, a broker
//! `stop_app`/`start_app`, Redis restarts, and both `on_redis_error` policies.
//!
//! These tests disturb everything connected to the local RabbitMQ, so they live in their
//! own test binary (cargo runs test binaries one after another) and take a lock so that
//! they run one at a time. Redis faults use a private `redis-server` on a free port. Every
//! test leaves the shared services running as it found them.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use konstruct_gate::config::{OnRedisError, SecretUrl};
use lapin::BasicProperties;

const WAIT: Duration = Duration::from_secs(15);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Held for a whole test: one fault at a time.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

async fn rabbitmqctl(args: &[&str]) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let status = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            rabbitmqctl_status(&args)
        }),
    )
    .await
    .expect("rabbitmqctl finished within 120 s")
    .expect("rabbitmqctl ran");
    assert!(status.success(), "rabbitmqctl failed");
}

/// Restarts the broker application if a test stopped it and then failed.
struct BrokerAppGuard {
    stopped: bool,
}

impl Drop for BrokerAppGuard {
    fn drop(&mut self) {
        if self.stopped {
            let _ = rabbitmqctl_command().arg("start_app").status();
            let _ = rabbitmqctl_command()
                .args(["await_startup", "--timeout", "120"])
                .status();
        }
    }
}

fn gate_env(names: &Names, redis_url: &str, requests: u64) -> Vec<(String, String)> {
    let mut env = names.env(requests, 60);
    env.push(("KONSTRUCT_GATE__REDIS__URL".into(), redis_url.into()));
    env
}

fn spawn_gate(env: &[(String, String)]) -> (GateProcess, SocketAddr) {
    let addr = free_addr();
    let mut env = env.to_vec();
    env.push(("KONSTRUCT_GATE__HTTP__LISTEN".into(), addr.to_string()));
    (GateProcess::spawn(&env), addr)
}

async fn all_ready(addrs: &[SocketAddr], within: Duration) -> Duration {
    let started = Instant::now();
    for addr in addrs {
        wait_ready(*addr, within.saturating_sub(started.elapsed())).await;
    }
    started.elapsed()
}

/// Waits until the backlog has reached `fraction` drained; returns the backlog left.
async fn wait_progress(queue: &str, total: usize, fraction: f64, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        if let Some(left) = depth_fresh(queue).await {
            let left = left as usize;
            if (total - left.min(total)) as f64 >= fraction * total as f64 {
                return left;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no progress on {queue} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_drained(queue: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while depth_fresh(queue).await != Some(0) {
        assert!(
            Instant::now() < deadline,
            "{queue} did not drain within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    Kill(usize),
    CloseAllConnections,
    RestartRedis,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_three_instances_lose_nothing() {
    chaos("forward").await;
}

/// The same chaos with `limits.duplicates = "drop"`: nothing lost, and a redelivered message
/// whose output was confirmed (and marked) gets no second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_with_duplicates_dropped_loses_nothing() {
    chaos("drop").await;
}

/// Three gate processes drain a prefilled backlog while instances are killed, every broker
/// connection is closed twice and Redis restarts; returns the duplicates on the outputs.
async fn chaos(duplicates: &str) -> usize {
    let _serial = serial().await;
    let mut redis = PrivateRedis::start().await;
    let names = Names::new("chaos");
    let broker = Broker::new(&names).await;
    let (tenants, channels, per_key, limit) = (500, ["slack", "whatsapp"], 30, 5);
    let mut expected = HashSet::new();
    let mut bodies = Vec::new();
    for round in 0..per_key {
        for t in 0..tenants {
            for c in channels {
                let id = format!("c-{t}-{c}-{round}");
                bodies.push(realistic_message(&id, &format!("tenant-{t}"), c));
                expected.insert(id);
            }
        }
    }
    let total = bodies.len();
    broker.publish_many(bodies).await;
    // The broker closes this connection during the test anyway.
    let _ = broker.conn.close(200, "prefilled".into()).await;

    let mut env = gate_env(&names, &redis.url(), limit);
    // A modest prefetch keeps the drain long enough for every fault to land mid-drain.
    env.push(("KONSTRUCT_GATE__AMQP__PREFETCH".into(), "64".into()));
    env.push((
        "KONSTRUCT_GATE__LIMITS__DUPLICATES".into(),
        duplicates.into(),
    ));
    let mut gates: Vec<_> = (0..3).map(|_| spawn_gate(&env)).collect();
    let addrs: Vec<_> = gates.iter().map(|(_, a)| *a).collect();
    all_ready(&addrs, Duration::from_secs(30)).await;
    let started = Instant::now();

    // A forced close takes rabbitmqctl over a second, and after a Redis restart the
    // instances stay not ready for a few seconds (until no check failed for 3 s): the
    // schedule leaves the backlog room for both.
    let schedule = [
        (0.03, Fault::Kill(0)),
        (0.10, Fault::CloseAllConnections),
        (0.35, Fault::Kill(1)),
        (0.40, Fault::CloseAllConnections),
        (0.65, Fault::Kill(2)),
        (0.70, Fault::RestartRedis),
    ];
    let mut report = Vec::new();
    for (fraction, fault) in schedule {
        let left = wait_progress(&names.inbound, total, fraction, Duration::from_secs(120)).await;
        assert!(
            left > 0,
            "the backlog drained before {fault:?}: the test needs more messages"
        );
        let injected = Instant::now();
        match fault {
            Fault::Kill(i) => {
                let _ = gates[i].0.child.kill();
                let _ = gates[i].0.child.wait();
                gates[i] = spawn_gate(&env);
            }
            Fault::CloseAllConnections => {
                rabbitmqctl(&["close_all_connections", "chaos test"]).await
            }
            Fault::RestartRedis => {
                redis.shutdown().await;
                tokio::time::sleep(Duration::from_millis(500)).await;
                redis.start_again().await;
            }
        }
        let addrs: Vec<_> = gates.iter().map(|(_, a)| *a).collect();
        let recovered = all_ready(&addrs, Duration::from_secs(60)).await;
        report.push(format!(
            "{fault:?} at {left} left: injected in {:?}, all ready {recovered:?} later",
            injected.elapsed() - recovered
        ));
    }
    wait_drained(&names.inbound, Duration::from_secs(180)).await;
    let drain_time = started.elapsed();
    for (gate, _) in &mut gates {
        gate.signal("TERM");
        assert_eq!(gate.wait(Duration::from_secs(60)).await.code(), Some(0));
    }
    // Whatever was unacked when the gates stopped is back in the queue: drain it too.
    if depth_fresh(&names.inbound).await != Some(0) {
        let (mut gate, addr) = spawn_gate(&env);
        wait_ready(addr, Duration::from_secs(30)).await;
        wait_drained(&names.inbound, Duration::from_secs(60)).await;
        gate.signal("TERM");
        assert_eq!(gate.wait(Duration::from_secs(60)).await.code(), Some(0));
    }

    let broker = Broker::new(&names).await;
    let allowed_n = broker.depth(&names.orchestrator).await as usize;
    let rejected_n = broker.depth(&names.notifications).await as usize;
    let allowed = broker
        .collect(&names.orchestrator, allowed_n, Duration::from_secs(120))
        .await;
    let rejected = broker
        .collect(&names.notifications, rejected_n, Duration::from_secs(120))
        .await;
    let degraded = allowed
        .iter()
        .filter(|d| {
            konstruct_gate::route::header(d.properties.headers(), "x-ratelimit-degraded").is_some()
        })
        .count();
    let ids: Vec<String> = allowed
        .iter()
        .map(|d| output_id(OutputKind::Allowed, d))
        .chain(rejected.iter().map(|d| output_id(OutputKind::Rejected, d)))
        .collect();
    let seen: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let lost: Vec<_> = expected
        .iter()
        .filter(|id| !seen.contains(id.as_str()))
        .take(10)
        .collect();
    println!(
        "chaos (duplicates = {duplicates}): {total} messages, {} faults, drained in {drain_time:?}; outputs {} ({allowed_n} allowed, {rejected_n} rejected, {degraded} degraded); lost {}; duplicates {}",
        schedule.len(),
        ids.len(),
        expected.len() - seen.len(),
        ids.len() - seen.len()
    );
    for line in &report {
        println!("chaos: {line}");
    }
    assert!(lost.is_empty(), "lost messages, e.g. {lost:?}");
    assert_eq!(seen.len(), total);
    broker.assert_empty(&names.dead_letter).await;
    broker.cleanup().await;
    ids.len() - seen.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_stop_app_and_start_app_is_ridden_through() {
    let _serial = serial().await;
    let names = Names::new("stopapp");
    let broker = Broker::new(&names).await;
    let total = 8_000;
    let bodies: Vec<_> = (0..total)
        .map(|i| realistic_message(&format!("s{i}"), &format!("tenant-{}", i % 50), "slack"))
        .collect();
    broker.publish_many(bodies).await;
    let _ = broker.conn.close(200, "prefilled".into()).await;

    let env = gate_env(&names, &redis_url(), 10_000);
    let (mut gate, addr) = spawn_gate(&env);
    wait_ready(addr, Duration::from_secs(30)).await;
    wait_progress(&names.inbound, total, 0.05, Duration::from_secs(60)).await;

    let mut guard = BrokerAppGuard { stopped: true };
    rabbitmqctl(&["stop_app"]).await;
    let (status, _) = http_get(addr, "/readyz").await.unwrap();
    assert_eq!(status, 503, "not ready while the broker is down");
    let (status, _) = http_get(addr, "/healthz").await.unwrap();
    assert_eq!(status, 200, "alive while the broker is down");
    tokio::time::sleep(Duration::from_secs(2)).await;
    rabbitmqctl(&["start_app"]).await;
    rabbitmqctl(&["await_startup", "--timeout", "120"]).await;
    guard.stopped = false;
    let started = Instant::now();
    wait_ready(addr, Duration::from_secs(60)).await;
    println!(
        "stop_app/start_app: ready again {:?} after start_app",
        started.elapsed()
    );
    wait_drained(&names.inbound, Duration::from_secs(120)).await;
    gate.signal("TERM");
    assert_eq!(gate.wait(Duration::from_secs(60)).await.code(), Some(0));

    let broker = Broker::new(&names).await;
    let (n, ids) = broker.drain_allowed_ids(Duration::from_secs(60)).await;
    println!(
        "stop_app/start_app: {total} messages, {n} outputs, {} duplicates",
        n - ids.len()
    );
    assert_eq!(ids.len(), total, "every message came out");
    broker.cleanup().await;
}

#[tokio::test]
async fn redis_outage_with_allow_forwards_unchecked_and_marks_it() {
    let _serial = serial().await;
    let mut redis = PrivateRedis::start().await;
    let names = Names::new("redis-allow");
    let broker = Broker::new(&names).await;
    let mut config = names.config(1, 60);
    config.redis.url = SecretUrl::new(redis.url());
    config.limits.on_redis_error = OnRedisError::Allow;
    let gate = TestGate::start(config).await;

    redis.shutdown().await;
    for i in 0..3 {
        broker
            .publish(
                &message(&format!("d{i}"), "acme", "slack"),
                BasicProperties::default(),
            )
            .await;
    }
    let out = broker
        .collect(&names.orchestrator, 3, Duration::from_secs(20))
        .await;
    for d in &out {
        assert_eq!(text_header(d, "x-ratelimit-degraded"), "true");
        assert!(
            konstruct_gate::route::header(d.properties.headers(), "x-ratelimit-limit").is_none()
        );
    }
    broker.assert_empty(&names.notifications).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(gate.http, "/readyz").await.unwrap().0 != 503 {
        assert!(
            Instant::now() < deadline,
            "/readyz stayed 200 with Redis down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, metrics) = http_get(gate.http, "/metrics").await.unwrap();
    assert!(
        metrics.contains("konstruct_gate_degraded_total"),
        "{metrics}"
    );

    // Redis comes back: checks resume on their own, without a restart of the gate.
    redis.start_again().await;
    gate.wait_ready(Duration::from_secs(30)).await;
    for i in 0..2 {
        broker
            .publish(
                &message(&format!("r{i}"), "acme", "slack"),
                BasicProperties::default(),
            )
            .await;
    }
    let allowed = broker
        .collect(&names.orchestrator, 1, Duration::from_secs(20))
        .await;
    assert_eq!(int_header(&allowed[0], "x-ratelimit-limit"), 1);
    broker
        .collect(&names.notifications, 1, Duration::from_secs(20))
        .await;
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn redis_outage_with_hold_forwards_nothing_unchecked_and_resumes() {
    let _serial = serial().await;
    let mut redis = PrivateRedis::start().await;
    let names = Names::new("redis-hold");
    let broker = Broker::new(&names).await;
    let mut config = names.config(100, 60);
    config.redis.url = SecretUrl::new(redis.url());
    config.limits.on_redis_error = OnRedisError::Hold;
    config.amqp.prefetch = 4;
    let gate = TestGate::start(config).await;

    redis.shutdown().await;
    for i in 0..10 {
        broker
            .publish(
                &message(&format!("h{i}"), "acme", "slack"),
                BasicProperties::default(),
            )
            .await;
    }
    // The gate holds `prefetch` messages and takes no more while Redis is away.
    let deadline = Instant::now() + Duration::from_secs(10);
    while broker.depth(&names.inbound).await != 6 {
        assert!(
            Instant::now() < deadline,
            "the gate did not hold exactly its prefetch"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        broker.depth(&names.inbound).await,
        6,
        "no new deliveries while holding"
    );
    broker.assert_empty(&names.orchestrator).await;
    assert_eq!(http_get(gate.http, "/readyz").await.unwrap().0, 503);

    redis.start_again().await;
    let out = broker
        .collect(&names.orchestrator, 10, Duration::from_secs(30))
        .await;
    for d in &out {
        assert!(
            konstruct_gate::route::header(d.properties.headers(), "x-ratelimit-degraded").is_none()
        );
        assert_eq!(int_header(d, "x-ratelimit-limit"), 100);
    }
    gate.wait_ready(Duration::from_secs(30)).await;
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn quorum_inbound_dead_letters_a_message_past_its_delivery_limit() {
    use futures::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicNackOptions};
    let _serial = serial().await;
    let names = Names::new("quorum");
    let mut config = names.config(10, 60);
    config.amqp.queue_type = konstruct_gate::config::QueueType::Quorum;
    config.amqp.delivery_limit = 2;
    let broker = Broker::with_queues(&names, &config.amqp).await;

    // The gate runs on quorum queues like on classic ones.
    let gate = TestGate::start(config.clone()).await;
    broker
        .publish(&message("q1", "acme", "slack"), BasicProperties::default())
        .await;
    broker
        .collect(&names.orchestrator, 1, Duration::from_secs(20))
        .await;
    gate.stop().await;

    // A consumer that keeps failing on one message: the broker gives up after the limit and
    // moves the message to the dead-letter queue instead of redelivering it forever.
    let poison = br#"{"tenant_id":"acme","channel":"slack","id":"poison"}"#;
    broker.publish(poison, BasicProperties::default()).await;
    let channel = broker.conn.create_channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(
            names.inbound.as_str().into(),
            "crashing-consumer".into(),
            BasicConsumeOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let mut deliveries = 0;
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(2), consumer.next()).await
    {
        deliveries += 1;
        d.acker
            .nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await
            .unwrap();
        assert!(
            deliveries <= 10,
            "the delivery limit did not stop redeliveries"
        );
    }
    assert_eq!(
        deliveries, 3,
        "delivered once plus `delivery_limit` redeliveries"
    );
    let dead = broker
        .collect(&names.dead_letter, 1, Duration::from_secs(20))
        .await;
    assert_eq!(dead[0].data, poison);
    assert!(konstruct_gate::route::header(dead[0].properties.headers(), "x-death").is_some());
    broker.cleanup().await;
}

/// Restores the broker's memory watermark if a test lowered it and then failed.
struct WatermarkGuard(String);

impl Drop for WatermarkGuard {
    fn drop(&mut self) {
        let _ = rabbitmqctl_command()
            .args(["set_vm_memory_high_watermark", &self.0])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_pauses_new_deliveries_until_the_broker_unblocks() {
    let _serial = serial().await;
    let names = Names::new("blocked");
    let broker = Broker::new(&names).await;
    let total = 6_000;
    broker
        .publish_many(
            (0..total)
                .map(|i| realistic_message(&format!("b{i}"), &format!("t{}", i % 20), "slack")),
        )
        .await;

    let original = tokio::process::Command::from(rabbitmqctl_command())
        .args(["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."])
        .output()
        .await
        .unwrap();
    let original = String::from_utf8_lossy(&original.stdout).trim().to_owned();
    let original = if original.parse::<f64>().is_ok() {
        original
    } else {
        "0.4".into()
    };
    let guard = WatermarkGuard(original.clone());
    rabbitmqctl(&["set_vm_memory_high_watermark", "0.0000001"]).await;
    // The broker blocks a connection when it next publishes: the gate's first forwards.
    let mut env = gate_env(&names, &redis_url(), 1_000_000);
    // Messages wait for confirms that the broker withholds: that is the broker's alarm,
    // not a stuck gate, so liveness holds (a restart would not help).
    env.push(("KONSTRUCT_GATE__HTTP__STALL_SECONDS".into(), "3".into()));
    env.push((
        "KONSTRUCT_GATE__AMQP__CONFIRM_TIMEOUT_MS".into(),
        "500".into(),
    ));
    let (mut gate, addr) = spawn_gate(&env);
    wait_ready(addr, Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, metrics) = http_get(addr, "/metrics").await.unwrap();
        if metrics
            .lines()
            .any(|l| l == "konstruct_gate_publish_blocked 1")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the gate never saw connection.blocked"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = depth_fresh(&names.inbound).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = depth_fresh(&names.inbound).await.unwrap();
    assert_eq!(
        before, after,
        "no deliveries are taken while publishing is blocked"
    );
    assert!(after > 0);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let (status, body) = http_get(addr, "/healthz").await.unwrap();
    assert_eq!(status, 200, "a broker alarm is not a stuck gate: {body}");
    assert_eq!(
        metric_value(addr, "konstruct_gate_amqp_reconnects_total").await,
        0.0,
        "confirms the broker withholds do not time out while it blocks publishing"
    );

    rabbitmqctl(&["set_vm_memory_high_watermark", &original]).await;
    drop(guard);
    wait_drained(&names.inbound, Duration::from_secs(60)).await;
    let (status, _) = http_get(addr, "/healthz").await.unwrap();
    assert_eq!(status, 200, "alive again once messages settle");
    gate.signal("TERM");
    assert_eq!(gate.wait(Duration::from_secs(30)).await.code(), Some(0));
    let (_, ids) = broker.drain_allowed_ids(Duration::from_secs(60)).await;
    assert_eq!(ids.len(), total, "every message came out");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_broker_closes_every_connection_the_in_flight_gauge_returns_to_zero() {
    let _serial = serial().await;
    let names = Names::new("gauges");
    let broker = Broker::new(&names).await;
    let total = 8_000;
    broker
        .publish_many(
            (0..total)
                .map(|i| realistic_message(&format!("g{i}"), &format!("t{}", i % 40), "slack")),
        )
        .await;
    let _ = broker.conn.close(200, "prefilled".into()).await;

    let env = gate_env(&names, &redis_url(), 10_000);
    let (mut gate, addr) = spawn_gate(&env);
    wait_ready(addr, Duration::from_secs(30)).await;
    wait_progress(&names.inbound, total, 0.1, Duration::from_secs(60)).await;
    let in_flight = metric_value(addr, "konstruct_gate_messages_in_flight").await;
    rabbitmqctl(&["close_all_connections", "gauge test"]).await;
    wait_drained(&names.inbound, Duration::from_secs(120)).await;
    // Everything is settled: the gauge says 0, not what the lost session had in flight.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = metric_value(addr, "konstruct_gate_messages_in_flight").await;
        if now == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "in flight stays {now} (was {in_flight} mid-drain)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(metric_value(addr, "konstruct_gate_amqp_reconnects_total").await >= 1.0);
    gate.signal("TERM");
    assert_eq!(gate.wait(Duration::from_secs(60)).await.code(), Some(0));
    let broker = Broker::new(&names).await;
    let (_, ids) = broker.drain_allowed_ids(Duration::from_secs(60)).await;
    assert_eq!(ids.len(), total, "every message came out");
    broker.cleanup().await;
}

/// The broker's `max_message_size` lowered at runtime, and set back however the test ends.
/// A channel reads the setting when it opens: channels opened before keep the old limit.
struct MaxMessageSize {
    original: Option<u64>,
}

impl MaxMessageSize {
    fn lower_to(bytes: u64) -> Self {
        let now = rabbitmqctl_output(&["eval", "application:get_env(rabbit, max_message_size)."]);
        let original = now
            .trim()
            .strip_prefix("{ok,")
            .and_then(|v| v.strip_suffix('}'))
            .and_then(|v| v.parse().ok());
        let set = format!("application:set_env(rabbit, max_message_size, {bytes}).");
        assert!(
            rabbitmqctl_status(&["eval", &set]).success(),
            "rabbitmqctl eval failed"
        );
        Self { original }
    }
}

impl Drop for MaxMessageSize {
    fn drop(&mut self) {
        let restore = match self.original {
            Some(bytes) => format!("application:set_env(rabbit, max_message_size, {bytes})."),
            None => "application:unset_env(rabbit, max_message_size).".to_owned(),
        };
        let _ = rabbitmqctl_status(&["eval", &restore]);
    }
}

#[tokio::test]
async fn an_output_the_broker_refuses_for_its_size_ends_with_its_own_message() {
    let _serial = serial().await;
    const MAX: usize = 64 * 1024;
    let names = Names::new("refused");
    // Opened before the limit is lowered: this channel may still publish larger messages.
    let broker = Broker::new(&names).await;
    let _limit = MaxMessageSize::lower_to(MAX as u64);
    let gate = TestGate::start(names.config(1, 600)).await;
    let reconnects = metric_value(gate.http, "konstruct_gate_amqp_reconnects_total").await;
    // A notice copies channel_metadata twice (its own field, and in the message).
    let with_metadata = |id: &str, bytes: usize| {
        serde_json::to_vec(&serde_json::json!({
            "id": id, "tenant_id": "acme", "channel": "slack",
            "channel_metadata": {"pad": "x".repeat(bytes)},
        }))
        .unwrap()
    };
    broker
        .publish(&message("m1", "acme", "slack"), BasicProperties::default())
        .await;
    let allowed = broker.collect(&names.orchestrator, 1, WAIT).await;
    assert_eq!(output_id(OutputKind::Allowed, &allowed[0]), "m1");

    // Rejected: its notice would be about twice the limit. The broker closes the channel
    // for the first one; the gate learns the limit and sends the notice without the copy.
    broker
        .publish(
            &with_metadata("m2", MAX * 2 / 3),
            BasicProperties::default(),
        )
        .await;
    let first = broker.collect(&names.notifications, 1, WAIT).await;
    // The rest after that: one more too large a notice, an ordinary one, and one whose
    // notice does not fit even without the copy (its channel_metadata alone is near the
    // limit), which is dead-lettered as output_refused.
    let near_limit = with_metadata("m5", MAX - 200);
    assert!(near_limit.len() < MAX);
    broker
        .publish_many([
            with_metadata("m3", MAX * 2 / 3),
            message("m4", "acme", "slack"),
            near_limit.clone(),
        ])
        .await;
    let rest = broker.collect(&names.notifications, 2, WAIT).await;
    let dead = broker.collect(&names.dead_letter, 1, WAIT).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let notices: Vec<serde_json::Value> = first
        .iter()
        .chain(&rest)
        .map(|d| serde_json::from_slice(&d.data).unwrap())
        .collect();
    let by_id = |id: &str| {
        notices
            .iter()
            .find(|n| n["message_id"] == id)
            .unwrap_or_else(|| panic!("no notice for {id}"))
    };
    for id in ["m2", "m3"] {
        assert!(by_id(id)["message"].is_null(), "{id}: no copy");
        assert_eq!(by_id(id)["message_omitted"], true, "{id}");
        assert_eq!(
            by_id(id)["retry_after_seconds"].as_u64().map(|s| s > 0),
            Some(true)
        );
    }
    assert_eq!(
        by_id("m4")["message"]["id"],
        "m4",
        "a notice that fits keeps its copy"
    );
    assert_eq!(by_id("m4").get("message_omitted"), None);
    assert!(dead[0].data == near_limit, "dead-lettered byte for byte");
    assert_eq!(text_header(&dead[0], "x-gate-error"), "output_refused");
    // One output each, and the session never restarted for it.
    for queue in [
        &names.orchestrator,
        &names.notifications,
        &names.dead_letter,
    ] {
        broker.assert_empty(queue).await;
    }
    assert_eq!(
        metric_value(gate.http, "konstruct_gate_amqp_reconnects_total").await,
        reconnects,
        "no reconnect"
    );
    broker.wait_empty(&names.inbound, WAIT).await;
    assert_eq!(unacked(&names.inbound), 0);
    gate.stop().await;
    broker.cleanup().await;
}
