//! Shared helpers for the integration tests: real RabbitMQ and Redis, unique queue names
//! and key prefixes per test, a gate started in-process or as a child process, and
//! publish/collect helpers whose every wait is bounded.

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use konstruct_gate::config::SecretUrl;
use konstruct_gate::{Application, Config};
use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub mod engines;
pub mod proxy;

pub fn amqp_url() -> String {
    std::env::var("KONSTRUCT_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn redis_url() -> String {
    std::env::var("KONSTRUCT_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// RabbitMQ's control command: `KONSTRUCT_TEST_RABBITMQCTL` split on whitespace (for a
/// broker in a container: `docker compose exec -T rabbitmq rabbitmqctl`), else the local
/// `rabbitmqctl`.
pub fn rabbitmqctl_command() -> Command {
    let line = std::env::var("KONSTRUCT_TEST_RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".into());
    let mut words = line.split_whitespace();
    let mut command = Command::new(words.next().unwrap_or("rabbitmqctl"));
    command.args(words);
    command
}

/// Runs the control command with `args` to the end; panics with how to set it up when it
/// cannot be started.
pub fn rabbitmqctl_status(args: &[&str]) -> std::process::ExitStatus {
    rabbitmqctl_command()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run rabbitmqctl ({e}): install RabbitMQ's tools or set KONSTRUCT_TEST_RABBITMQCTL, e.g. to `docker compose exec -T rabbitmq rabbitmqctl`."
            )
        })
}

/// A name no other test (or earlier run) uses.
pub fn unique(label: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "test-{label}-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Test logs stay quiet unless TEST_LOG is set.
pub fn init_test_log() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("konstruct_gate=debug,info")
            .with_test_writer()
            .try_init();
    }
}

pub async fn connect_amqp() -> Connection {
    let url = amqp_url();
    match tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(&url, ConnectionProperties::default()),
    )
    .await
    {
        Ok(Ok(conn)) => conn,
        _ => panic!(
            "RabbitMQ is not reachable at {}: start it with `rabbitmq-server -detached` (or `docker compose up -d rabbitmq`).",
            konstruct_gate::config::redact_url(&url)
        ),
    }
}

pub async fn connect_redis() -> redis::aio::MultiplexedConnection {
    let url = redis_url();
    let client = redis::Client::open(url.as_str()).expect("a valid Redis URL");
    match tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    {
        Ok(Ok(conn)) => conn,
        _ => panic!(
            "Redis is not reachable at {}: start it with `redis-server --daemonize yes --port 6379 --save \"\" --appendonly no` (or `docker compose up -d redis`).",
            konstruct_gate::config::redact_url(&url)
        ),
    }
}

/// Queue names and a Redis key prefix that belong to one test.
#[derive(Clone, Debug)]
pub struct Names {
    pub inbound: String,
    pub orchestrator: String,
    pub notifications: String,
    pub dead_letter: String,
    pub key_prefix: String,
}

impl Names {
    pub fn new(label: &str) -> Self {
        let base = unique(label);
        Self {
            inbound: format!("{base}.inbound"),
            orchestrator: format!("{base}.orchestrator"),
            notifications: format!("{base}.notifications"),
            dead_letter: format!("{base}.dead-letter"),
            key_prefix: format!("{base}:"),
        }
    }

    pub fn outputs(&self) -> [&str; 3] {
        [&self.orchestrator, &self.notifications, &self.dead_letter]
    }

    /// A configuration for these names, with the given limit, HTTP on a free port.
    pub fn config(&self, requests: u64, window_seconds: u64) -> Config {
        let mut config = Config::default();
        config.amqp.url = SecretUrl::new(amqp_url());
        config.amqp.inbound_queue = self.inbound.clone();
        config.amqp.orchestrator_queue = self.orchestrator.clone();
        config.amqp.notification_queue = self.notifications.clone();
        config.amqp.dead_letter_queue = self.dead_letter.clone();
        config.redis.url = SecretUrl::new(redis_url());
        config.redis.key_prefix = self.key_prefix.clone();
        config.limits.requests = requests;
        config.limits.window_seconds = window_seconds;
        config.http.listen = "127.0.0.1:0".parse().unwrap();
        config.amqp.shutdown_grace_seconds = 5;
        config
    }

    /// The same configuration as `KONSTRUCT_GATE__...` variables, for a child process.
    pub fn env(&self, requests: u64, window_seconds: u64) -> Vec<(String, String)> {
        [
            ("AMQP__URL", amqp_url()),
            ("AMQP__INBOUND_QUEUE", self.inbound.clone()),
            ("AMQP__ORCHESTRATOR_QUEUE", self.orchestrator.clone()),
            ("AMQP__NOTIFICATION_QUEUE", self.notifications.clone()),
            ("AMQP__DEAD_LETTER_QUEUE", self.dead_letter.clone()),
            ("AMQP__SHUTDOWN_GRACE_SECONDS", "10".into()),
            ("REDIS__URL", redis_url()),
            ("REDIS__KEY_PREFIX", self.key_prefix.clone()),
            ("LIMITS__REQUESTS", requests.to_string()),
            ("LIMITS__WINDOW_SECONDS", window_seconds.to_string()),
            ("HTTP__LISTEN", "127.0.0.1:0".into()),
        ]
        .into_iter()
        .map(|(k, v)| (format!("KONSTRUCT_GATE__{k}"), v))
        .collect()
    }
}

/// A broker client for the test side: publishes inbound messages, reads outputs.
pub struct Broker {
    pub conn: Connection,
    pub channel: Channel,
    pub names: Names,
}

impl Broker {
    pub async fn new(names: &Names) -> Self {
        let mut config = names.config(1, 1);
        config.amqp.declare_queues = true;
        Self::with_queues(names, &config.amqp).await
    }

    /// A client of the broker at `url` (a node a test started), with the queues declared
    /// as `amqp` says.
    pub async fn at(url: &str, names: &Names, amqp: &konstruct_gate::config::AmqpConfig) -> Self {
        let conn = Connection::connect(url, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("the test's RabbitMQ node does not answer: {e}"));
        let broker = Self::on(conn, names).await;
        konstruct_gate::amqp::declare_queues(&broker.conn, amqp)
            .await
            .unwrap();
        broker
    }

    /// A client that declares nothing: the gate (or the test) declares the queues.
    pub async fn new_without_declaring(names: &Names) -> Self {
        Self::on(connect_amqp().await, names).await
    }

    async fn on(conn: Connection, names: &Names) -> Self {
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Self {
            conn,
            channel,
            names: names.clone(),
        }
    }

    /// Declares the queues as `amqp` says (for instance as quorum queues).
    pub async fn with_queues(names: &Names, amqp: &konstruct_gate::config::AmqpConfig) -> Self {
        let broker = Self::new_without_declaring(names).await;
        // Declared up front (as the gate does) so publishing before the gate starts works.
        konstruct_gate::amqp::declare_queues(&broker.conn, amqp)
            .await
            .unwrap();
        broker
    }

    pub async fn publish(&self, body: &[u8], properties: BasicProperties) {
        let confirm = self
            .channel
            .basic_publish(
                ShortString::from(""),
                ShortString::from(self.names.inbound.as_str()),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "the broker refused a test message");
    }

    /// Publishes through the inbound exchange with each tenant as routing key, as a gateway
    /// of a sharded inbound does; every confirm awaited at the end, none returned.
    pub async fn publish_to_exchange(&self, messages: impl IntoIterator<Item = (String, Vec<u8>)>) {
        let exchange = self.names.inbound.clone();
        self.publish_all(&exchange, messages, true).await;
    }

    /// Publishes many without waiting for each confirm.
    pub async fn publish_many(&self, bodies: impl IntoIterator<Item = Vec<u8>>) {
        let queue = self.names.inbound.clone();
        let messages = bodies.into_iter().map(|body| (queue.clone(), body));
        self.publish_all("", messages, false).await;
    }

    /// Publishes each (routing key, body) through `exchange`, persistent; the confirms
    /// are collected at the end, all at once.
    async fn publish_all(
        &self,
        exchange: &str,
        messages: impl IntoIterator<Item = (String, Vec<u8>)>,
        mandatory: bool,
    ) {
        for (routing_key, body) in messages {
            let confirm = self
                .channel
                .basic_publish(
                    ShortString::from(exchange),
                    ShortString::from(routing_key),
                    BasicPublishOptions {
                        mandatory,
                        immediate: false,
                    },
                    &body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap();
            drop(confirm);
        }
        let returned = self.channel.wait_for_confirms().await.unwrap();
        assert!(returned.is_empty(), "every message was routed to a queue");
    }

    /// A consumer of `queue` (auto-ack) on a channel of its own; close the channel when
    /// done.
    pub async fn consume(&self, queue: &str) -> (Channel, lapin::Consumer) {
        let channel = self.conn.create_channel().await.unwrap();
        let consumer = channel
            .basic_consume(
                ShortString::from(queue),
                ShortString::from(unique("collector")),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        (channel, consumer)
    }

    /// Reads exactly `n` messages from `queue`, failing after `within`.
    pub async fn collect(&self, queue: &str, n: usize, within: Duration) -> Vec<Delivery> {
        let (channel, mut consumer) = self.consume(queue).await;
        let deadline = Instant::now() + within;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, consumer.next()).await {
                Ok(Some(Ok(d))) => out.push(d),
                _ => panic!(
                    "only {} of {n} messages arrived on {queue} within {within:?}",
                    out.len()
                ),
            }
        }
        let _ = channel.close(200, ShortString::from("done")).await;
        out
    }

    /// Messages waiting in `queue` (ready, not in flight).
    pub async fn depth(&self, queue: &str) -> u32 {
        passive_depth(&self.channel, queue).await.unwrap()
    }

    /// Takes every message now on the orchestrator queue: how many, and their distinct ids.
    pub async fn drain_allowed_ids(&self, within: Duration) -> (usize, HashSet<String>) {
        let queue = &self.names.orchestrator;
        let n = self.depth(queue).await as usize;
        let out = self.collect(queue, n, within).await;
        let ids = out
            .iter()
            .map(|d| output_id(OutputKind::Allowed, d))
            .collect();
        (n, ids)
    }

    /// Waits until `queue` has no ready messages, failing after `within`.
    pub async fn wait_empty(&self, queue: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if self.depth(queue).await == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{queue} did not drain within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asserts that nothing else arrives on `queue` (it stays empty).
    pub async fn assert_empty(&self, queue: &str) {
        assert_eq!(self.depth(queue).await, 0, "unexpected messages on {queue}");
    }

    pub async fn purge(&self, queue: &str) {
        let _ = self
            .channel
            .queue_purge(ShortString::from(queue), QueuePurgeOptions::default())
            .await;
    }

    /// Deletes the test's queues and Redis keys.
    pub async fn cleanup(self) {
        let inbound = &self.names.inbound;
        // Both ladders, and the shards of a sharded inbound (a test uses at most 16).
        let steps: Vec<(String, bool)> = konstruct_gate::amqp::DEFER_STEPS
            .iter()
            .flat_map(|&seconds| {
                [false, true].map(|sharded| {
                    let step = konstruct_gate::amqp::step_queue(inbound, sharded, seconds);
                    (step, sharded)
                })
            })
            .collect();
        let shards: Vec<String> = (0..16)
            .map(|k| konstruct_gate::shards::shard_queue(inbound, k))
            .collect();
        for queue in [
            &self.names.inbound,
            &self.names.orchestrator,
            &self.names.notifications,
            &self.names.dead_letter,
        ]
        .into_iter()
        .chain(steps.iter().map(|(step, _)| step))
        .chain(&shards)
        {
            let _ = self
                .channel
                .queue_delete(
                    ShortString::from(queue.as_str()),
                    QueueDeleteOptions::default(),
                )
                .await;
        }
        // The exchanges of a sharded inbound and its ladder, each on a channel of its own
        // (deleting a missing exchange may close the channel).
        for exchange in std::iter::once(inbound).chain(
            steps
                .iter()
                .filter(|(_, sharded)| *sharded)
                .map(|(step, _)| step),
        ) {
            if let Ok(channel) = self.conn.create_channel().await {
                let _ = channel
                    .exchange_delete(
                        ShortString::from(exchange.as_str()),
                        lapin::options::ExchangeDeleteOptions::default(),
                    )
                    .await;
                let _ = channel.close(200, ShortString::from("bye")).await;
            }
        }
        let mut redis = connect_redis().await;
        // Counters start with the prefix, their companions with `{` and then the prefix.
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("*{}*", self.names.key_prefix))
            .query_async(&mut redis)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL")
                .arg(keys)
                .query_async(&mut redis)
                .await
                .unwrap();
        }
        let _ = self.conn.close(200, ShortString::from("done")).await;
    }
}

/// A gate running in this process, as `konstruct-gate run` would run it.
pub struct TestGate {
    pub http: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl TestGate {
    pub async fn start(config: Config) -> Self {
        let gate = Self::start_without_waiting(config).await;
        gate.wait_ready(Duration::from_secs(15)).await;
        gate
    }

    /// Starts the gate and returns at once, ready or not.
    pub async fn start_without_waiting(config: Config) -> Self {
        init_test_log();
        let app = Application::build(config).await.expect("the gate starts");
        let http = app.http_addr();
        let stop = CancellationToken::new();
        let task = tokio::spawn(app.run_until_stopped(stop.clone()));
        Self { http, stop, task }
    }

    pub async fn wait_ready(&self, within: Duration) {
        wait_ready(self.http, within).await;
    }

    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the gate stops within 30 s")
            .unwrap();
    }
}

pub async fn wait_ready(http: SocketAddr, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let answer = http_get(http, "/readyz").await;
        if let Ok((200, _)) = answer {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the gate at {http} was not ready within {within:?}: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the gate consumes but `/readyz` answers 503 naming `reason`; returns its body.
pub async fn wait_consuming_but_not_ready(
    http: SocketAddr,
    reason: &str,
    within: Duration,
) -> String {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = http_get(http, "/readyz").await.unwrap();
        if body.contains("consuming: true") && body.contains(reason) {
            assert_eq!(status, 503, "{body}");
            return body;
        }
        assert!(Instant::now() < deadline, "never said why: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes `m1` and `m2` for acme's Slack under a limit of 1: `m1` must be forwarded and
/// `m2` rejected with a notification.
pub async fn one_allowed_one_rejected(broker: &Broker, within: Duration) {
    broker
        .publish_many([
            message("m1", "acme", "slack"),
            message("m2", "acme", "slack"),
        ])
        .await;
    let names = &broker.names;
    let allowed = broker.collect(&names.orchestrator, 1, within).await;
    assert_eq!(output_id(OutputKind::Allowed, &allowed[0]), "m1");
    let rejected = broker.collect(&names.notifications, 1, within).await;
    assert_eq!(output_id(OutputKind::Rejected, &rejected[0]), "m2");
}

/// A minimal HTTP/1.0 GET: status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await??;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response)).await??;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of an unlabelled metric on the gate's `/metrics`, 0 when absent.
pub async fn metric_value(http: SocketAddr, name: &str) -> f64 {
    let (_, text) = http_get(http, "/metrics").await.unwrap();
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A realistic normalized message.
pub fn message(id: &str, tenant: &str, channel: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "id": id,
        "tenant_id": tenant,
        "channel": channel,
        "thread_id": format!("thread-{tenant}"),
        "sender": {"user_id": format!("U-{id}"), "display_name": "Ada"},
        "channel_metadata": {"team_id": "T024BE7LD", "channel_id": "C2147483705"},
        "content": {"text": "Can you summarise yesterday's incident report?", "attachments": []},
        "timestamp": "2026-11-28T10:00:00Z",
    }))
    .unwrap()
}

/// The `id` of a forwarded body, or the `message_id` of a notification.
pub fn output_id(queue_kind: OutputKind, delivery: &Delivery) -> String {
    let v: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap();
    match queue_kind {
        OutputKind::Allowed => v["id"].as_str().unwrap().to_owned(),
        OutputKind::Rejected => v["message_id"].as_str().unwrap().to_owned(),
    }
}

#[derive(Clone, Copy, Debug)]
pub enum OutputKind {
    Allowed,
    Rejected,
}

/// The integer value of a header.
pub fn int_header(delivery: &Delivery, name: &str) -> i64 {
    match konstruct_gate::route::header(delivery.properties.headers(), name) {
        Some(lapin::types::AMQPValue::LongLongInt(v)) => *v,
        other => panic!("header {name} is {other:?}"),
    }
}

pub fn text_header(delivery: &Delivery, name: &str) -> String {
    match konstruct_gate::route::header(delivery.properties.headers(), name) {
        Some(lapin::types::AMQPValue::LongString(v)) => {
            String::from_utf8_lossy(v.as_bytes()).into()
        }
        other => panic!("header {name} is {other:?}"),
    }
}

/// An address on loopback that nothing listens on now.
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Reads the text output of the broker's control command.
pub fn rabbitmqctl_output(args: &[&str]) -> String {
    let out = rabbitmqctl_command()
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run rabbitmqctl ({e}): set KONSTRUCT_TEST_RABBITMQCTL.")
        });
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Messages the broker has delivered from `queue` and not yet seen settled.
pub fn unacked(queue: &str) -> u64 {
    rabbitmqctl_output(&[
        "list_queues",
        "-q",
        "--no-table-headers",
        "name",
        "messages_unacknowledged",
    ])
    .lines()
    .filter_map(|l| l.split_once('\t'))
    .find(|(name, _)| name.trim() == queue)
    .and_then(|(_, n)| n.trim().parse().ok())
    .unwrap_or_else(|| panic!("queue {queue} not listed by rabbitmqctl"))
}

/// A gate run as a separate `konstruct-gate run` process.
pub struct GateProcess {
    pub child: Child,
}

impl GateProcess {
    pub fn spawn(env: &[(String, String)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_konstruct-gate"));
        command.arg("run").env_remove("KONSTRUCT_GATE_CONFIG");
        for (k, v) in env {
            command.env(k, v);
        }
        command.env("KONSTRUCT_GATE__LOG__LEVEL", "warn");
        if std::env::var_os("TEST_LOG").is_none() {
            command.stdout(Stdio::null()).stderr(Stdio::null());
        }
        Self {
            child: command.spawn().expect("the gate binary starts"),
        }
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, failing after `within`.
    pub async fn wait(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the gate did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for GateProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Counts how often each id appears.
pub fn tally<'a>(ids: impl IntoIterator<Item = &'a String>) -> HashMap<&'a str, usize> {
    let mut counts = HashMap::new();
    for id in ids {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    counts
}

/// A Redis server of the test's own, on a free port, that the test may stop and start
/// without disturbing anything else on the machine.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = Self { port, child: None };
        redis.start_again().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub async fn start_again(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            // DEBUG SLEEP makes a server that answers nobody (from loopback only).
            .args(["--enable-debug-command", "local"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "redis-server is on PATH: install Redis 7 (e.g. `apt-get install redis-server`)",
            );
        self.child = Some(child);
        let client = redis::Client::open(self.url()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the private redis-server did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `SHUTDOWN NOSAVE`, as an operator would, then waits for the process to exit.
    pub async fn shutdown(&mut self) {
        let _ = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "shutdown", "nosave"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Ready-message count of `queue`, on a fresh connection (survives broker-side closes).
pub async fn depth_fresh(queue: &str) -> Option<u32> {
    let conn = tokio::time::timeout(
        Duration::from_secs(5),
        Connection::connect(&amqp_url(), ConnectionProperties::default()),
    )
    .await
    .ok()?
    .ok()?;
    let channel = conn.create_channel().await.ok()?;
    let depth = passive_depth(&channel, queue).await.ok();
    let _ = conn.close(200, ShortString::from("done")).await;
    depth
}

/// Ready messages in `queue`, by a passive declare.
async fn passive_depth(channel: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    let q = channel
        .queue_declare(
            ShortString::from(queue),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(q.message_count())
}

/// A realistic message of about 1 KB.
pub fn realistic_message(id: &str, tenant: &str, channel: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "id": id,
        "tenant_id": tenant,
        "channel": channel,
        "thread_id": format!("1764324000.{id}"),
        "sender": {"user_id": format!("U0{tenant}"), "display_name": "Ada Lovelace", "is_bot": false},
        "channel_metadata": {"team_id": "T024BE7LD", "channel_id": "C2147483705", "event_ts": "1764324000.000200"},
        "content": {
            "text": "Hi! Could you pull the last three incident reports for the payments service, summarise the root causes, and draft a short note for the on-call channel? Please keep it under two hundred words and link the runbooks you used. Thanks a lot, this is for tomorrow's review with the platform team.",
            "attachments": [{"type": "file", "name": "incident-2026-11-27.pdf", "size": 48213}],
            "mentions": ["U024BE7LH"],
        },
        "received_at": "2026-11-28T10:00:00.000Z",
        "gateway": {"version": "2.14.1", "region": "eu-west-1", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"},
    }))
    .unwrap()
}

/// Resident memory of process `pid` now, in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib / 1024.0
}
