//! The gate on the engines users run beyond one plain Redis and one broker: a Redis Cluster
//! (resharded and failed over mid-drain), Sentinel (failed over mid-drain), TLS on both
//! sides (mutual TLS too, and the certificates that must be refused), and a three-node
//! RabbitMQ cluster with quorum queues that loses the node a gate consumes from.
//!
//! Every engine is started by the test itself (free ports, its own temporary directory,
//! stopped however the test ends); the machine's own RabbitMQ and Redis stay untouched.
//! The tests run one at a time: each starts several servers on two cores.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::engines::*;
use common::*;
use futures::StreamExt;
use konstruct_gate::config::{
    Algorithm, AlsoLimit, QueueType, RedisMode, Scope, SecretUrl, TlsFiles,
};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Held for a whole test: one set of engines at a time.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

fn urls(list: Vec<String>) -> Vec<SecretUrl> {
    list.into_iter().map(SecretUrl::new).collect()
}

fn cluster_config(
    names: &Names,
    cluster: &RedisCluster,
    requests: u64,
) -> konstruct_gate::config::Config {
    let mut config = names.config(requests, 600);
    config.redis.mode = RedisMode::Cluster;
    config.redis.nodes = urls(cluster.seed_urls());
    // The default `redis.timeout_ms` (250): a slot on the move is waited out within a
    // budget of its own, not within the timeout.
    config
}

/// Publishes 100 messages every 50 ms (tenants `t0`…, channel slack, ids `m0`…) until
/// `stop`; returns how many it published.
fn publish_steadily(
    broker: Broker,
    tenants: usize,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<usize> {
    publish_steadily_to(broker, tenants, false, stop)
}

/// Like [`publish_steadily`]; `to_exchange`: through the inbound exchange, the tenant as
/// routing key, as a gateway of a sharded inbound does.
fn publish_steadily_to(
    broker: Broker,
    tenants: usize,
    to_exchange: bool,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut sent = 0;
        while !stop.is_cancelled() {
            let messages: Vec<(String, Vec<u8>)> = (sent..sent + 100)
                .map(|n| {
                    let tenant = format!("t{}", n % tenants);
                    let body = message(&format!("m{n}"), &tenant, "slack");
                    (tenant, body)
                })
                .collect();
            if to_exchange {
                broker.publish_to_exchange(messages).await;
            } else {
                broker
                    .publish_many(messages.into_iter().map(|(_, body)| body))
                    .await;
            }
            sent += 100;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = broker.conn.close(200, ShortString::from("done")).await;
        sent
    })
}

/// What reached the orchestrator queue: distinct ids, copies, and how many went through
/// unchecked (`x-ratelimit-degraded`).
#[derive(Debug, Default)]
struct Forwarded {
    ids: HashSet<String>,
    copies: usize,
    degraded: usize,
    /// Ids that went through unchecked.
    degraded_ids: HashSet<String>,
}

/// Reads the orchestrator queue until `n` distinct ids arrived, then 300 ms more for
/// stragglers. Each delivery is acked once counted, so a consumer of the test's that the
/// broker ends (a quorum queue's leader on a stopped node) loses nothing: it is opened
/// again, and what it had not acked comes back. On a timeout, says where the rest are.
async fn gather(broker: &Broker, n: usize, within: Duration) -> Forwarded {
    let deadline = Instant::now() + within;
    let mut out = Forwarded::default();
    let mut done_at: Option<Instant> = None;
    let mut reopened = 0;
    'consume: loop {
        let opened = broker.conn.create_channel().await;
        let consumer = match opened {
            Ok(channel) => channel
                .basic_consume(
                    ShortString::from(broker.names.orchestrator.as_str()),
                    ShortString::from(format!("gather-{reopened}")),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map(|consumer| (channel, consumer)),
            Err(e) => Err(e),
        };
        let (channel, mut consumer) = match consumer {
            Ok(pair) => pair,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "could not consume the orchestrator queue: {e}"
                );
                eprintln!("gather: could not consume the orchestrator queue ({e}); trying again");
                reopened += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue 'consume;
            }
        };
        loop {
            let until = done_at.unwrap_or(deadline);
            let left = until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, consumer.next()).await {
                Ok(Some(Ok(d))) => {
                    let id = output_id(OutputKind::Allowed, &d);
                    out.copies += 1;
                    let degraded = konstruct_gate::route::header(
                        d.properties.headers(),
                        "x-ratelimit-degraded",
                    )
                    .is_some();
                    if degraded {
                        out.degraded += 1;
                        out.degraded_ids.insert(id.clone());
                    }
                    out.ids.insert(id);
                    let _ = d.acker.ack(BasicAckOptions::default()).await;
                    if out.ids.len() >= n && done_at.is_none() {
                        done_at = Some(Instant::now() + Duration::from_millis(300));
                    }
                }
                _ if done_at.is_some() => {
                    let _ = channel.close(200, ShortString::from("done")).await;
                    return out;
                }
                Ok(ended) if Instant::now() < deadline => {
                    let why = match ended {
                        Some(Err(e)) => e.to_string(),
                        _ => "the broker ended it".to_owned(),
                    };
                    eprintln!(
                        "gather: the test's consumer ended after {} of {n} ({why}); consuming again",
                        out.ids.len()
                    );
                    reopened += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue 'consume;
                }
                _ => {
                    let mut waiting = Vec::new();
                    for queue in [&broker.names.orchestrator, &broker.names.inbound] {
                        let depth = match broker.conn.create_channel().await {
                            Ok(c) => c
                                .queue_declare(
                                    ShortString::from(queue.as_str()),
                                    QueueDeclareOptions {
                                        passive: true,
                                        ..QueueDeclareOptions::default()
                                    },
                                    FieldTable::default(),
                                )
                                .await
                                .map(|q| q.message_count().to_string())
                                .unwrap_or_else(|e| e.to_string()),
                            Err(e) => e.to_string(),
                        };
                        waiting.push(format!("{queue}: {depth}"));
                    }
                    panic!(
                        "only {} of {n} messages reached the orchestrator queue within {within:?} (consumer opened again {reopened} times; ready now: {})",
                        out.ids.len(),
                        waiting.join(", ")
                    );
                }
            }
        }
    }
}

/// Publishes a steady stream over `tenants` keys while `fault` runs (from two seconds after
/// the stream starts to `after` past the fault's end), then reads the orchestrator queue
/// until every message arrived, and checks that every one did and none was dead-lettered.
/// Returns what `fault` returned, how many messages were sent, and what was forwarded.
async fn drain_through<T>(
    broker: &Broker,
    tenants: usize,
    after: Duration,
    fault: impl Future<Output = T>,
) -> (T, usize, Forwarded) {
    let stop = CancellationToken::new();
    let publishing = publish_steadily(
        Broker::new_without_declaring(&broker.names).await,
        tenants,
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let outcome = fault.await;
    tokio::time::sleep(after).await;
    stop.cancel();
    let sent = publishing.await.unwrap();
    let forwarded = gather(broker, sent, WAIT).await;
    assert_eq!(
        forwarded.ids.len(),
        sent,
        "every message reached the orchestrator"
    );
    broker.assert_empty(&broker.names.dead_letter).await;
    (outcome, sent, forwarded)
}

/// Publishes one message of `tenant` and checks that the gate checked it (no
/// `x-ratelimit-degraded`): checks resumed after a fault.
async fn assert_checked_again(broker: &Broker, tenant: &str) {
    let last = format!("last-{}", unique("after"));
    broker
        .publish(&message(&last, tenant, "slack"), Default::default())
        .await;
    let after = broker.collect(&broker.names.orchestrator, 1, WAIT).await;
    assert_eq!(output_id(OutputKind::Allowed, &after[0]), last);
    assert!(
        konstruct_gate::route::header(after[0].properties.headers(), "x-ratelimit-degraded")
            .is_none(),
        "a message after the failover is checked again"
    );
}

/// The fixed-window counter of (`tenant`, slack) on the Redis server at `port`.
async fn count_at(port: u16, names: &Names, tenant: &str) -> i64 {
    let server = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).unwrap();
    let mut conn = server.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("GET")
        .arg(format!("{}{tenant}:ratelimit:slack", names.key_prefix))
        .query_async(&mut conn)
        .await
        .unwrap()
}

fn sentinel_config(names: &Names, sentinel: &RedisSentinel) -> konstruct_gate::config::Config {
    let mut config = names.config(1_000_000, 600);
    config.redis.mode = RedisMode::Sentinel;
    config.redis.sentinels = urls(sentinel.sentinel_urls());
    config.redis.master_name = Some(MASTER_NAME.to_owned());
    config.redis.timeout_ms = 1_000;
    config
}

async fn cluster_connection(cluster: &RedisCluster) -> redis::cluster_async::ClusterConnection {
    redis::cluster::ClusterClient::new(cluster.seed_urls())
        .unwrap()
        .get_async_connection()
        .await
        .expect("the test's Redis Cluster answers")
}

/// The sum of the fixed-window counters of tenants `t0`… on the cluster.
async fn counted(cluster: &RedisCluster, prefix: &str, tenants: usize) -> i64 {
    let mut conn = cluster_connection(cluster).await;
    let mut sum = 0;
    for t in 0..tenants {
        let key = format!("{prefix}t{t}:ratelimit:slack");
        let count: Option<i64> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        sum += count.unwrap_or(0);
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gates_on_a_redis_cluster_keep_every_limit_exact_with_every_algorithm() {
    let _serial = serial().await;
    let cluster = RedisCluster::start(3, 1).await;
    const TENANTS: usize = 300;
    const PER_TENANT: usize = 5;
    const LIMIT: u64 = 3;
    // The keys land on every primary.
    let mut owners = HashSet::new();
    for t in 0..TENANTS {
        owners.insert(
            cluster
                .owner_of_key(&format!("t{t}:ratelimit:slack"))
                .await
                .port,
        );
    }
    assert_eq!(
        owners.len(),
        3,
        "the tenants' counters spread over all three primaries"
    );

    for algorithm in [
        Algorithm::FixedWindow,
        Algorithm::SlidingWindow,
        Algorithm::TokenBucket,
    ] {
        let names = Names::new("cluster-exact");
        let broker = Broker::new(&names).await;
        let mut config = cluster_config(&names, &cluster, LIMIT);
        config.limits.algorithm = algorithm;
        let gates = futures::join!(
            TestGate::start(config.clone()),
            TestGate::start(config.clone()),
            TestGate::start(config),
        );
        let bodies: Vec<Vec<u8>> = (0..PER_TENANT)
            .flat_map(|round| {
                (0..TENANTS)
                    .map(move |t| message(&format!("m{t}-{round}"), &format!("t{t}"), "slack"))
            })
            .collect();
        broker.publish_many(bodies).await;
        let allowed = broker
            .collect(&names.orchestrator, TENANTS * LIMIT as usize, WAIT)
            .await;
        let rejected = broker
            .collect(
                &names.notifications,
                TENANTS * (PER_TENANT - LIMIT as usize),
                WAIT,
            )
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        broker.assert_empty(&names.orchestrator).await;
        broker.assert_empty(&names.notifications).await;
        broker.assert_empty(&names.dead_letter).await;
        let tenant_of = |d: &lapin::message::Delivery| -> String {
            let v: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
            v["tenant_id"].as_str().unwrap().to_owned()
        };
        let allowed_tenants: Vec<String> = allowed.iter().map(tenant_of).collect();
        for (tenant, n) in tally(&allowed_tenants) {
            assert_eq!(n, LIMIT as usize, "{algorithm:?}: {tenant} got {n} through");
        }
        assert!(
            allowed.iter().all(|d| konstruct_gate::route::header(
                d.properties.headers(),
                "x-ratelimit-degraded"
            )
            .is_none()),
            "{algorithm:?}: every message was checked"
        );
        assert_eq!(rejected.len(), TENANTS * 2);

        if algorithm == Algorithm::FixedWindow {
            // The router's own key, on the cluster, with its count and expiry.
            let mut conn = cluster_connection(&cluster).await;
            let key = format!("{}t0:ratelimit:slack", names.key_prefix);
            let count: i64 = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            let ttl: i64 = redis::cmd("TTL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(count, PER_TENANT as i64);
            assert!(ttl > 0 && ttl <= 600, "ttl {ttl}");
        }
        for gate in [gates.0, gates.1, gates.2] {
            gate.stop().await;
        }
        broker.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reshard_mid_drain_loses_nothing_and_leaves_the_counts_exact() {
    let _serial = serial().await;
    let cluster = RedisCluster::start(3, 1).await;
    const TENANTS: usize = 500;
    let names = Names::new("cluster-reshard");
    let broker = Broker::new(&names).await;
    let config = cluster_config(&names, &cluster, 1_000_000);
    let gates = [
        TestGate::start(config.clone()).await,
        TestGate::start(config).await,
    ];
    let nodes = cluster.nodes().await;
    let primaries: Vec<&ClusterNode> = nodes.iter().filter(|n| n.primary && !n.failed).collect();
    let reshard = async {
        let started = Instant::now();
        cluster
            .reshard(Some(&primaries[0].id), &primaries[1].id, 1500)
            .await;
        started.elapsed()
    };
    let (took, sent, forwarded) =
        drain_through(&broker, TENANTS, Duration::from_secs(1), reshard).await;
    for gate in gates {
        gate.stop().await;
    }
    eprintln!(
        "reshard of 1500 slots took {took:?}; {sent} messages, {} copies, {} forwarded unchecked",
        forwarded.copies, forwarded.degraded
    );
    assert_eq!(
        forwarded.degraded, 0,
        "none went through unchecked at the default settings ({sent} sent)"
    );
    // Every checked message was counted once: the counters hold the checked messages,
    // plus at most those a timed-out call counted before the gate gave up on it.
    let counted = counted(&cluster, &names.key_prefix, TENANTS).await;
    let checked = (sent - forwarded.degraded_ids.len()) as i64;
    assert!(
        counted >= checked && counted <= sent as i64,
        "counted {counted}, checked {checked}, sent {sent}"
    );
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_cluster_primary_loses_nothing_and_checks_resume_on_its_replica() {
    let _serial = serial().await;
    let mut cluster = RedisCluster::start(3, 1).await;
    const TENANTS: usize = 300;
    let names = Names::new("cluster-failover");
    let broker = Broker::new(&names).await;
    let config = cluster_config(&names, &cluster, 1_000_000);
    let gate = TestGate::start(config).await;
    let key = format!("{}t0:ratelimit:slack", names.key_prefix);
    let fault = async {
        let killed = cluster.kill_primary_owning(&key).await;
        let started = Instant::now();
        cluster.wait_ok(Duration::from_secs(30)).await;
        let failover = started.elapsed();
        // Checks resume by themselves: the gate is ready again, and a message to a key of
        // the failed-over slots is checked.
        gate.wait_ready(Duration::from_secs(20)).await;
        (killed, failover)
    };
    let ((killed, failover), sent, forwarded) =
        drain_through(&broker, TENANTS, Duration::from_secs(2), fault).await;
    eprintln!(
        "primary on port {} killed; cluster ok after {failover:?}; {sent} messages, {} copies, {} unchecked",
        killed.port, forwarded.copies, forwarded.degraded
    );
    assert_checked_again(&broker, "t0").await;
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_mid_drain_loses_nothing_and_checks_resume_on_the_new_primary() {
    let _serial = serial().await;
    let sentinel = RedisSentinel::start().await;
    const TENANTS: usize = 100;
    let names = Names::new("sentinel");
    let broker = Broker::new(&names).await;
    let gate = TestGate::start(sentinel_config(&names, &sentinel)).await;
    let first = sentinel.primary_port().await;
    let fault = async {
        let started = Instant::now();
        let second = sentinel.failover().await;
        assert_ne!(first, second, "SENTINEL FAILOVER named a new primary");
        sentinel.wait_settled(Duration::from_secs(30)).await;
        gate.wait_ready(Duration::from_secs(20)).await;
        (second, started.elapsed())
    };
    let ((second, failover), sent, forwarded) =
        drain_through(&broker, TENANTS, Duration::from_secs(2), fault).await;
    eprintln!(
        "failover {first} -> {second} in {failover:?}; {sent} messages, {} copies, {} unchecked",
        forwarded.copies, forwarded.degraded
    );
    // Checks run on the new primary: a fresh message is checked, and counted there.
    assert_checked_again(&broker, "fresh").await;
    assert_eq!(
        count_at(second, &names, "fresh").await,
        1,
        "counted on the new primary"
    );
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_sentinel_primary_loses_nothing_and_checks_resume_on_its_replica() {
    let _serial = serial().await;
    let mut sentinel = RedisSentinel::start().await;
    let names = Names::new("sentinel-kill");
    let broker = Broker::new(&names).await;
    let gate = TestGate::start(sentinel_config(&names, &sentinel)).await;
    let fault = async {
        let started = Instant::now();
        let promoted = sentinel.kill_primary().await;
        gate.wait_ready(Duration::from_secs(30)).await;
        (promoted, started.elapsed())
    };
    let ((promoted, recovered), sent, forwarded) =
        drain_through(&broker, 100, Duration::from_secs(2), fault).await;
    eprintln!(
        "primary killed, {promoted} promoted; ready again after {recovered:?}; {sent} messages, {} copies, {} unchecked",
        forwarded.copies, forwarded.degraded
    );
    assert_checked_again(&broker, "fresh").await;
    assert_eq!(
        count_at(promoted, &names, "fresh").await,
        1,
        "counted on the promoted replica"
    );
    gate.stop().await;
    broker.cleanup().await;
}

fn tls(ca: &std::path::Path, client: Option<(&std::path::Path, &std::path::Path)>) -> TlsFiles {
    TlsFiles {
        ca_file: Some(ca.to_owned()),
        cert_file: client.map(|(cert, _)| cert.to_owned()),
        key_file: client.map(|(_, key)| key.to_owned()),
    }
}

/// Polls `/readyz` until it says `reason` (503 all along); returns the body.
async fn not_ready_because(gate: &TestGate, reason: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = http_get(gate.http, "/readyz").await.unwrap();
        assert_eq!(
            status, 503,
            "ready with a certificate that must be refused: {body}"
        );
        if body.contains(reason) {
            return body;
        }
        assert!(Instant::now() < deadline, "/readyz never said why: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_and_mutual_tls_work_and_bad_certificates_are_refused() {
    let _serial = serial().await;
    // Server-side TLS only: the private CA is enough, and the limit holds.
    let redis = TlsRedis::start(false).await;
    let names = Names::new("rediss");
    let broker = Broker::new(&names).await;
    let mut config = names.config(3, 60);
    config.redis.url = SecretUrl::new(redis.url());
    config.redis.tls = Some(tls(&redis.certs.ca, None));
    let gate = TestGate::start(config.clone()).await;
    broker
        .publish_many((0..4).map(|i| message(&format!("m{i}"), "acme", "slack")))
        .await;
    broker.collect(&names.orchestrator, 3, WAIT).await;
    broker.collect(&names.notifications, 1, WAIT).await;
    gate.stop().await;

    // A CA that did not sign the server's certificate: running, not ready, and says why.
    config.redis.tls = Some(tls(&redis.certs.other_ca, None));
    let gate = TestGate::start_without_waiting(config.clone()).await;
    let body = not_ready_because(&gate, "UnknownIssuer", Duration::from_secs(15)).await;
    eprintln!("wrong CA: {body}");
    gate.stop().await;
    drop(redis);

    // Mutual TLS: with the client certificate it works; without one, or with an expired
    // one, the server refuses the gate, which stays up and not ready.
    let redis = TlsRedis::start(true).await;
    config.redis.url = SecretUrl::new(redis.url());
    let c = &redis.certs;
    config.redis.tls = Some(tls(&c.ca, Some((&c.client_cert, &c.client_key))));
    let gate = TestGate::start(config.clone()).await;
    broker
        .publish(&message("mtls", "globex", "slack"), Default::default())
        .await;
    broker.collect(&names.orchestrator, 1, WAIT).await;
    gate.stop().await;
    for (case, files, reason) in [
        (
            "no client certificate",
            tls(&c.ca, None),
            "CertificateRequired",
        ),
        (
            "an expired client certificate",
            tls(&c.ca, Some((&c.expired_client_cert, &c.expired_client_key))),
            "CertificateExpired",
        ),
    ] {
        config.redis.tls = Some(files);
        let gate = TestGate::start_without_waiting(config.clone()).await;
        let body = not_ready_because(&gate, reason, Duration::from_secs(15)).await;
        eprintln!("{case}: {body}");
        gate.stop().await;
    }
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_private_ca_and_a_client_certificate_works_and_a_wrong_ca_is_refused() {
    let _serial = serial().await;
    let node = RabbitNode::start_tls(true).await;
    let certs = node.certs.as_ref().expect("a TLS node has certificates");
    let names = Names::new("amqps");
    let mut config = names.config(3, 60);
    // The test publishes and reads over the node's plain listener; the gate over TLS.
    let broker = Broker::at(&node.amqp_url(), &names, &config.amqp).await;
    config.amqp.url = SecretUrl::new(node.amqps_url());
    config.amqp.tls = Some(tls(
        &certs.ca,
        Some((&certs.client_cert, &certs.client_key)),
    ));
    let gate = TestGate::start(config.clone()).await;
    broker
        .publish_many((0..4).map(|i| message(&format!("m{i}"), "acme", "slack")))
        .await;
    broker.collect(&names.orchestrator, 3, WAIT).await;
    broker.collect(&names.notifications, 1, WAIT).await;
    gate.stop().await;

    for (case, files, reason) in [
        (
            "a CA that did not sign the node's certificate",
            tls(
                &certs.other_ca,
                Some((&certs.client_cert, &certs.client_key)),
            ),
            "UnknownIssuer",
        ),
        (
            "no client certificate",
            tls(&certs.ca, None),
            "CertificateRequired",
        ),
    ] {
        config.amqp.tls = Some(files);
        let gate = TestGate::start_without_waiting(config.clone()).await;
        let body = not_ready_because(&gate, reason, Duration::from_secs(20)).await;
        assert!(body.contains("broker_error"), "{body}");
        eprintln!("{case}: {body}");
        gate.stop().await;
    }
    let _ = broker.conn.close(200, ShortString::from("done")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_on_a_three_node_rabbitmq_cluster_survives_the_loss_of_its_node() {
    let _serial = serial().await;
    let mut cluster = RabbitCluster::start(3).await;
    let names = Names::new("rabbit-cluster");
    let mut config = names.config(1_000_000, 600);
    config.amqp.queue_type = QueueType::Quorum;
    config.amqp.urls = urls(cluster.amqp_urls());
    // The gate declares the quorum queues on whichever node it reaches first.
    let gate = TestGate::start(config.clone()).await;
    // `list_connections` lists the whole cluster's; the pid names the node of each.
    let deadline = Instant::now() + Duration::from_secs(30);
    let consuming_from = loop {
        let out = cluster.nodes[0]
            .ctl(&["list_connections", "pid", "client_properties"])
            .await
            .unwrap_or_default();
        let line = out.lines().find(|l| l.contains("konstruct-gate consume"));
        let node = line.and_then(|l| {
            cluster
                .nodes
                .iter()
                .position(|n| l.contains(&format!("<{}.", n.name)))
        });
        if let Some(i) = node {
            break i;
        }
        assert!(
            Instant::now() < deadline,
            "no node lists the gate's consuming connection: {out}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The test's own clients stay on another node.
    let test_node = cluster.nodes[(consuming_from + 1) % 3].amqp_url();
    let broker = Broker::at(&test_node, &names, &config.amqp).await;
    let stop = CancellationToken::new();
    let publishing = publish_steadily(
        Broker::at(&test_node, &names, &config.amqp).await,
        50,
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reconnects = "konstruct_gate_amqp_reconnects_total";
    let before = metric_value(gate.http, reconnects).await;
    let stopped_at = Instant::now();
    cluster.nodes[consuming_from].stop().await;
    // The gate noticed (a new session), then consumes again from another node (ready).
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric_value(gate.http, reconnects).await <= before {
        assert!(
            Instant::now() < deadline,
            "the gate never noticed its node stopped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gate.wait_ready(Duration::from_secs(30)).await;
    let resumed = stopped_at.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let sent = publishing.await.unwrap();
    let forwarded = gather(&broker, sent, WAIT).await;
    eprintln!(
        "node {} (the gate's) stopped; the gate was ready again after {resumed:?}; {sent} messages, {} copies",
        consuming_from + 1,
        forwarded.copies
    );
    assert_eq!(
        forwarded.ids.len(),
        sent,
        "every message reached the orchestrator"
    );
    gate.stop().await;
    let _ = broker.conn.close(200, ShortString::from("done")).await;
}

#[tokio::test]
async fn without_the_consistent_hash_plugin_a_sharded_gate_stays_up_not_ready_and_says_why() {
    let _serial = serial().await;
    // A node of the test's own, with no plugins at all.
    let node = RabbitNode::start().await;
    let names = Names::new("shards-no-plugin");
    let mut config = names.config(1, 600);
    config.amqp.url = SecretUrl::new(node.amqp_url());
    config.amqp.inbound_shards = 4;
    let broker = Broker::at(&node.amqp_url(), &names, &config.amqp).await;
    let gate = TestGate::start_without_waiting(config).await;
    let body = wait_consuming_but_not_ready(
        gate.http,
        "rabbitmq-plugins enable rabbitmq_consistent_hash_exchange",
        WAIT,
    )
    .await;
    assert!(body.contains("inbound_shards_error"), "{body}");
    // No reconnect storm, and the queues it has are still served.
    let reconnects = "konstruct_gate_amqp_reconnects_total";
    let before = metric_value(gate.http, reconnects).await;
    one_allowed_one_rejected(&broker, WAIT).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(metric_value(gate.http, reconnects).await, before);
    gate.stop().await;
    let _ = broker.conn.close(200, ShortString::from("done")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_shards_lead_on_every_node_and_lose_nothing_when_one_stops() {
    let _serial = serial().await;
    let mut cluster =
        RabbitCluster::start_with_plugins(3, &["rabbitmq_consistent_hash_exchange"]).await;
    let names = Names::new("shards-cluster");
    let mut config = names.config(1_000_000, 600);
    config.amqp.queue_type = QueueType::Quorum;
    config.amqp.urls = urls(cluster.amqp_urls());
    // 12 shards: the gate's four other queues lead on the node it declared them from, and
    // the balanced locator fills the other nodes first.
    config.amqp.inbound_shards = 12;
    let gate = TestGate::start(config.clone()).await;
    // The leaders of the shards are spread over the three nodes.
    let listed = cluster.nodes[0]
        .ctl(&["list_queues", "name", "leader", "--formatter", "json"])
        .await
        .unwrap();
    let queues: Vec<serde_json::Value> = serde_json::from_str(&listed).unwrap();
    let leaders: HashSet<String> = queues
        .iter()
        .filter(|q| {
            q["name"].as_str().is_some_and(|n| {
                n.starts_with(&format!("{}.", names.inbound)) && !n.contains("defer")
            })
        })
        .map(|q| q["leader"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(leaders.len(), 3, "shard leaders on every node: {listed}");
    // Publishing to the exchange through node 3 while node 1 stops mid-drain.
    let test_node = cluster.nodes[2].amqp_url();
    let broker = Broker::at(&test_node, &names, &config.amqp).await;
    let stop = CancellationToken::new();
    let publisher = Broker::at(&test_node, &names, &config.amqp).await;
    let publishing = publish_steadily_to(publisher, 60, true, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.nodes[0].stop().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.cancel();
    let sent = publishing.await.unwrap();
    let forwarded = gather(&broker, sent, WAIT).await;
    eprintln!(
        "{sent} messages over 12 quorum shards, node 1 stopped mid-drain: {} distinct forwarded, {} copies",
        forwarded.ids.len(),
        forwarded.copies
    );
    assert_eq!(
        forwarded.ids.len(),
        sent,
        "every message reached the orchestrator"
    );
    gate.stop().await;
    let _ = broker.conn.close(200, ShortString::from("done")).await;
}

/// A tenant budget in a Redis Cluster is decided in its own slot first (the message's cost
/// reserved) and given back when the message's other limits reject it. Three gates, a
/// reshard of the budgets' slots mid-drain: no tenant is ever over its budget; how far
/// each falls short of the exact all-or-none count (a reservation held while another
/// message found the budget full) is measured and printed, and the budgets hold exactly
/// what was let through, plus the refunds that did not land (printed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_budget_in_a_redis_cluster_is_never_overspent_by_three_gates_and_a_reshard() {
    let _serial = serial().await;
    let cluster = RedisCluster::start(3, 1).await;
    const TENANTS: usize = 60;
    const SENDERS: usize = 12;
    const PER_SENDER: usize = 5;
    const BUDGET: u64 = 20;
    const SENDER_LIMIT: u64 = 2;
    let names = Names::new("cluster-budget");
    let broker = Broker::new(&names).await;
    let mut config = cluster_config(&names, &cluster, 1_000_000);
    config.limits.also = [(Scope::Tenant, BUDGET), (Scope::Sender, SENDER_LIMIT)]
        .map(|(scope, requests)| AlsoLimit {
            scope,
            requests,
            window_seconds: 600,
            algorithm: None,
            burst: None,
        })
        .to_vec();
    let gates = [
        TestGate::start(config.clone()).await,
        TestGate::start(config.clone()).await,
        TestGate::start(config).await,
    ];
    // Every sender of every tenant writes PER_SENDER times in a row: its later messages
    // reserve budget units that its own limit then makes the gate give back, while the
    // tenant's other senders compete for the same budget.
    let bodies: Vec<Vec<u8>> = (0..TENANTS)
        .flat_map(|t| {
            (0..SENDERS).flat_map(move |s| {
                (0..PER_SENDER).map(move |n| {
                    serde_json::to_vec(&serde_json::json!({
                        "id": format!("t{t}-s{s}-{n}"), "tenant_id": format!("t{t}"),
                        "channel": if s % 2 == 0 { "slack" } else { "whatsapp" },
                        "sender": {"user_id": format!("U{s}")},
                    }))
                    .unwrap()
                })
            })
        })
        .collect();
    let total = bodies.len();
    let nodes = cluster.nodes().await;
    let primaries: Vec<&ClusterNode> = nodes.iter().filter(|n| n.primary && !n.failed).collect();
    let publishing = async {
        for chunk in bodies.chunks(200) {
            broker.publish_many(chunk.to_vec()).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let reshard = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster
            .reshard(Some(&primaries[0].id), &primaries[1].id, 1500)
            .await;
    };
    tokio::join!(publishing, reshard);
    // Every message gets one output: forwarded or rejected.
    let deadline = Instant::now() + WAIT;
    loop {
        let out = depth_fresh(&names.orchestrator).await.unwrap_or(0)
            + depth_fresh(&names.notifications).await.unwrap_or(0);
        if out as usize >= total {
            break;
        }
        assert!(Instant::now() < deadline, "only {out} of {total} outputs");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for gate in gates {
        gate.stop().await;
    }
    let allowed_n = depth_fresh(&names.orchestrator).await.unwrap() as usize;
    let allowed = broker.collect(&names.orchestrator, allowed_n, WAIT).await;
    let mut per_tenant: HashMap<String, u64> = HashMap::new();
    for d in &allowed {
        let v: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
        assert!(
            konstruct_gate::route::header(d.properties.headers(), "x-ratelimit-degraded").is_none(),
            "nothing went through unchecked"
        );
        *per_tenant
            .entry(v["tenant_id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    // Exact all or none: each sender passes up to its limit until the budget is spent.
    let exact = BUDGET.min(SENDERS as u64 * SENDER_LIMIT.min(PER_SENDER as u64));
    let mut conn = cluster_connection(&cluster).await;
    let (mut short, mut worst, mut off) = (0, 0, 0);
    for t in 0..TENANTS {
        let tenant = format!("t{t}");
        let got = per_tenant.get(&tenant).copied().unwrap_or(0);
        assert!(
            got <= BUDGET,
            "{tenant} let {got} through, over its budget of {BUDGET}"
        );
        short += exact - got;
        worst = worst.max(exact - got);
        let key = konstruct_gate::limit::also_key(
            Scope::Tenant,
            Algorithm::FixedWindow,
            &names.key_prefix,
            &tenant,
            "",
            "",
        );
        let counted: Option<u64> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let counted = counted.unwrap_or(0);
        assert!(
            counted >= got,
            "{tenant}'s budget holds {counted}, under the {got} it let through"
        );
        off += counted - got;
    }
    eprintln!(
        "{total} messages, {TENANTS} tenants, budget {BUDGET}, three gates, a reshard of 1500 slots: \
         {} let through of {} exact; {short} short in all, {worst} at most for one tenant, 0 over; \
         {off} units counted but not let through (refunds that did not land)",
        allowed.len(),
        exact * TENANTS as u64
    );
    broker.cleanup().await;
}
