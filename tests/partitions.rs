//! Half-open connections: the gate reaches Redis or the broker through a proxy that, mid
//! run, stops forwarding on the connections it already has without closing them (as an
//! expired NAT entry or a frozen VM would), while new connections pass. The gate must
//! notice on its own and carry on over fresh connections, losing nothing.
//!
//! Each test has its own proxy, queues and key prefix, and leaves the machine's services
//! alone; they run one at a time so that their timings are the gate's, not the machine's.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::proxy::FreezingProxy;
use common::*;
use futures::StreamExt;
use konstruct_gate::config::{OnRedisError, SecretUrl};
use lapin::BasicProperties;
use tokio::sync::Mutex;

/// Messages per second the tests publish, as in a steady trickle of chat.
const RATE: u64 = 200;

async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::const_new(());
    LOCK.lock().await
}

fn socket_of(url: &str) -> SocketAddr {
    let parsed = url::Url::parse(url).expect("a service URL");
    let host = parsed.host_str().unwrap_or("127.0.0.1");
    let port = parsed
        .port_or_known_default()
        .unwrap_or(match parsed.scheme() {
            "redis" => 6379,
            _ => 5672,
        });
    format!("{host}:{port}")
        .parse()
        .expect("a loopback address")
}

/// The same URL with its host and port replaced by `addr`.
fn through(url: &str, addr: SocketAddr) -> String {
    let mut parsed = url::Url::parse(url).unwrap();
    parsed.set_host(Some(&addr.ip().to_string())).unwrap();
    parsed.set_port(Some(addr.port())).unwrap();
    parsed.to_string()
}

/// One forwarded message, as the orchestrator saw it.
#[derive(Clone, Copy, Debug)]
struct Seen {
    published: Instant,
    received: Instant,
    degraded: bool,
}

/// Publishes `RATE` messages per second for `seconds`, numbered in order, noting when each
/// was sent.
async fn publish_steadily(broker: &Broker, seconds: u64, sent: &Mutex<HashMap<String, Instant>>) {
    let total = RATE * seconds;
    let started = Instant::now();
    for i in 0..total {
        let due = started + Duration::from_micros(i * 1_000_000 / RATE);
        tokio::time::sleep_until(due.into()).await;
        let id = format!("m{i}");
        sent.lock().await.insert(id.clone(), Instant::now());
        broker
            .publish(
                &message(&id, &format!("tenant-{}", i % 20), "slack"),
                BasicProperties::default().with_message_id(id.as_str().into()),
            )
            .await;
    }
}

/// Reads the orchestrator queue until `total` distinct ids came out or `within` passed.
async fn watch_orchestrator(
    broker: &Broker,
    total: usize,
    within: Duration,
    sent: Arc<Mutex<HashMap<String, Instant>>>,
) -> HashMap<String, Seen> {
    let (channel, mut consumer) = broker.consume(&broker.names.orchestrator).await;
    let mut seen = HashMap::new();
    let deadline = Instant::now() + within;
    while seen.len() < total && Instant::now() < deadline {
        let Ok(Some(Ok(delivery))) =
            tokio::time::timeout(Duration::from_millis(200), consumer.next()).await
        else {
            continue;
        };
        let id = output_id(OutputKind::Allowed, &delivery);
        let degraded =
            konstruct_gate::route::header(delivery.properties.headers(), "x-ratelimit-degraded")
                .is_some();
        let published = sent
            .lock()
            .await
            .get(&id)
            .copied()
            .expect("a message of the test's");
        seen.entry(id).or_insert(Seen {
            published,
            received: Instant::now(),
            degraded,
        });
    }
    let _ = channel.close(200, "done".into()).await;
    seen
}

/// What came out of a run with a freeze in it.
struct Run {
    seen: HashMap<String, Seen>,
    frozen_at: Instant,
    /// Connections the proxy had made when it froze them.
    frozen_connections: u64,
    total: usize,
}

/// Publishes `seconds` of steady traffic, freezing `proxy` 3 s in, and returns what the
/// orchestrator saw of it within `within`.
async fn through_a_freeze(
    broker: &Broker,
    proxy: &FreezingProxy,
    seconds: u64,
    within: Duration,
) -> Run {
    let total = (RATE * seconds) as usize;
    let sent = Arc::new(Mutex::new(HashMap::new()));
    let watching = {
        let watcher = Broker::new_without_declaring(&broker.names).await;
        let sent = sent.clone();
        tokio::spawn(async move { watch_orchestrator(&watcher, total, within, sent).await })
    };
    let freezing = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        proxy.freeze();
        (Instant::now(), proxy.connections())
    };
    let ((), (frozen_at, frozen_connections)) =
        tokio::join!(publish_steadily(broker, seconds, &sent), freezing);
    Run {
        seen: watching.await.unwrap(),
        frozen_at,
        frozen_connections,
        total,
    }
}

/// What a half-open fault cost: how long after the freeze the first message published
/// after it came out checked, and how many came out unchecked.
struct Cost {
    resumed_after: Duration,
    unchecked: usize,
    total: usize,
}

fn cost(seen: &HashMap<String, Seen>, frozen_at: Instant) -> Cost {
    let resumed = seen
        .values()
        .filter(|s| s.published > frozen_at && !s.degraded)
        .map(|s| s.received)
        .min()
        .expect("a checked message came out after the freeze");
    Cost {
        resumed_after: resumed.saturating_duration_since(frozen_at),
        unchecked: seen.values().filter(|s| s.degraded).count(),
        total: seen.len(),
    }
}

/// Runs `seconds` of steady traffic through a gate whose Redis connections go silent
/// after `freeze_after`; returns what came out and when the freeze happened.
async fn redis_half_open(policy: OnRedisError) -> (HashMap<String, Seen>, Instant, usize) {
    let proxy = FreezingProxy::start(socket_of(&redis_url())).await;
    let names = Names::new("half-open-redis");
    let broker = Broker::new(&names).await;
    let mut config = names.config(1_000_000, 60);
    config.redis.url = SecretUrl::new(through(&redis_url(), proxy.addr));
    config.limits.on_redis_error = policy;
    let gate = TestGate::start(config).await;

    let run = through_a_freeze(&broker, &proxy, 8, Duration::from_secs(60)).await;
    assert!(
        proxy.connections() > run.frozen_connections,
        "the gate never opened a new Redis connection"
    );
    gate.stop().await;
    broker.cleanup().await;
    (run.seen, run.frozen_at, run.total)
}

#[tokio::test]
async fn redis_half_open_under_allow_resumes_checks_within_two_seconds() {
    let _serial = serial().await;
    let (seen, frozen_at, total) = redis_half_open(OnRedisError::Allow).await;
    assert_eq!(seen.len(), total, "every message came out");
    let cost = cost(&seen, frozen_at);
    println!(
        "redis half-open, allow: checks resumed {} ms after the freeze; {} of {} messages unchecked",
        cost.resumed_after.as_millis(),
        cost.unchecked,
        cost.total
    );
    assert!(
        cost.resumed_after <= Duration::from_secs(2),
        "checks resumed only after {:?}",
        cost.resumed_after
    );
    // At most the traffic of those two seconds went unchecked.
    assert!(
        cost.unchecked <= (2 * RATE) as usize,
        "{} messages unchecked",
        cost.unchecked
    );
    // And after them, every message was checked.
    let late_unchecked = seen
        .values()
        .filter(|s| s.degraded && s.published > frozen_at + Duration::from_secs(2))
        .count();
    assert_eq!(late_unchecked, 0, "unchecked messages after the recovery");
}

#[tokio::test]
async fn redis_half_open_under_hold_forwards_nothing_unchecked_and_resumes() {
    let _serial = serial().await;
    let (seen, frozen_at, total) = redis_half_open(OnRedisError::Hold).await;
    assert_eq!(seen.len(), total, "every message came out");
    let cost = cost(&seen, frozen_at);
    println!(
        "redis half-open, hold: checks resumed {} ms after the freeze; {} unchecked; longest wait {} ms",
        cost.resumed_after.as_millis(),
        cost.unchecked,
        seen.values()
            .map(|s| s.received.saturating_duration_since(s.published))
            .max()
            .unwrap_or_default()
            .as_millis()
    );
    assert_eq!(cost.unchecked, 0, "hold forwarded messages unchecked");
    assert!(
        cost.resumed_after <= Duration::from_secs(2),
        "checks resumed only after {:?}",
        cost.resumed_after
    );
}

#[tokio::test]
async fn broker_half_open_resumes_deliveries_within_fifteen_seconds() {
    let _serial = serial().await;
    let proxy = FreezingProxy::start(socket_of(&amqp_url())).await;
    let names = Names::new("half-open-broker");
    let broker = Broker::new(&names).await;
    // The default heartbeat: what a new user gets.
    let mut config = names.config(1_000_000, 60);
    config.amqp.url = SecretUrl::new(through(&amqp_url(), proxy.addr));
    let gate = TestGate::start(config).await;

    let Run {
        seen,
        frozen_at,
        frozen_connections,
        total,
    } = through_a_freeze(&broker, &proxy, 25, Duration::from_secs(90)).await;
    let missing = total - seen.len();
    let resumed_after = seen
        .values()
        .filter(|s| s.published > frozen_at)
        .map(|s| s.received)
        .min()
        .expect("a message published after the freeze came out")
        .saturating_duration_since(frozen_at);
    println!(
        "broker half-open: deliveries resumed {} ms after the freeze; {} of {} messages came out",
        resumed_after.as_millis(),
        seen.len(),
        total
    );
    assert_eq!(missing, 0, "messages were lost");
    assert!(
        resumed_after <= Duration::from_secs(15),
        "deliveries resumed only after {resumed_after:?}"
    );
    assert!(
        proxy.connections() >= frozen_connections + 2,
        "the gate never opened new broker connections"
    );
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn a_stuck_redis_is_ridden_through_per_policy_and_readyz_says_why() {
    let _serial = serial().await;
    let redis = PrivateRedis::start().await;
    let names = Names::new("stuck-redis");
    let broker = Broker::new(&names).await;
    let mut config = names.config(1_000_000, 60);
    config.redis.url = SecretUrl::new(redis.url());
    let gate = TestGate::start(config).await;

    // The server answers nobody for 5 s, on every connection, new ones too.
    let sleeping = tokio::task::spawn_blocking({
        let port = redis.port.to_string();
        move || {
            std::process::Command::new("redis-cli")
                .args(["-p", &port, "DEBUG", "SLEEP", "5"])
                .output()
                .expect("redis-cli is on PATH")
        }
    });
    // The readiness probe asks every second, and gives up on an answer after 250 ms.
    let deadline = Instant::now() + Duration::from_secs(3);
    let body = loop {
        let (status, body) = http_get(gate.http, "/readyz").await.unwrap();
        if status == 503 {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "still ready while Redis answers nobody: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        body.contains("redis_error"),
        "/readyz does not say why: {body}"
    );
    broker
        .publish(
            &message("during", "acme", "slack"),
            BasicProperties::default(),
        )
        .await;
    let during = broker
        .collect(&names.orchestrator, 1, Duration::from_secs(10))
        .await;
    assert_eq!(text_header(&during[0], "x-ratelimit-degraded"), "true");

    let slept = sleeping.await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&slept.stdout).trim(),
        "OK",
        "DEBUG SLEEP was refused"
    );
    gate.wait_ready(Duration::from_secs(10)).await;
    broker
        .publish(
            &message("after", "acme", "slack"),
            BasicProperties::default(),
        )
        .await;
    let after = broker
        .collect(&names.orchestrator, 1, Duration::from_secs(10))
        .await;
    assert!(
        konstruct_gate::route::header(after[0].properties.headers(), "x-ratelimit-degraded")
            .is_none(),
        "still unchecked after Redis woke up"
    );
    assert_eq!(int_header(&after[0], "x-ratelimit-limit"), 1_000_000);
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn a_broker_addressed_by_ip_is_reached_at_that_address() {
    // Only 127.0.0.2 listens on the proxy's port: taken for `localhost`, the address
    // would be refused.
    let proxy = FreezingProxy::start_at("127.0.0.2", socket_of(&amqp_url())).await;
    let names = Names::new("broker-ip");
    let broker = Broker::new(&names).await;
    let mut config = names.config(10, 60);
    config.amqp.url = SecretUrl::new(through(&amqp_url(), proxy.addr));
    let gate = TestGate::start(config).await;
    broker
        .publish(
            &message("by-ip", "acme", "slack"),
            BasicProperties::default(),
        )
        .await;
    let out = broker
        .collect(&names.orchestrator, 1, Duration::from_secs(10))
        .await;
    assert_eq!(output_id(OutputKind::Allowed, &out[0]), "by-ip");
    assert!(
        proxy.connections() >= 2,
        "the gate did not connect through 127.0.0.2"
    );
    gate.stop().await;
    broker.cleanup().await;
}
