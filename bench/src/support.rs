//! What both benchmark modes share: queue names, realistic messages, a fast confirming
//! publisher, gate processes and their CPU and memory.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use futures::stream::{FuturesUnordered, StreamExt};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

/// One benchmark's queues and Redis key prefix, unique per run.
#[derive(Clone, Debug)]
pub struct Queues {
    pub inbound: String,
    pub orchestrator: String,
    pub notifications: String,
    pub dead_letter: String,
    pub key_prefix: String,
}

impl Queues {
    pub fn unique(label: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let base = format!("gate-bench-{label}-{}-{nanos}", std::process::id());
        Self {
            inbound: format!("{base}.inbound"),
            orchestrator: format!("{base}.orchestrator"),
            notifications: format!("{base}.notifications"),
            dead_letter: format!("{base}.dead-letter"),
            key_prefix: format!("{base}:"),
        }
    }

    pub fn all(&self) -> [&str; 4] {
        [
            &self.inbound,
            &self.orchestrator,
            &self.notifications,
            &self.dead_letter,
        ]
    }

    pub fn outputs(&self) -> [&str; 3] {
        [&self.orchestrator, &self.notifications, &self.dead_letter]
    }
}

pub async fn connect(url: &str) -> Result<Connection> {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .with_context(|| {
            format!(
                "RabbitMQ is not reachable at {}: start it with `rabbitmq-server -detached` (or `docker compose up -d rabbitmq`)",
                konstruct_gate::config::redact_url(url)
            )
        })
}

pub async fn declare(channel: &Channel, queues: &Queues) -> Result<()> {
    for q in queues.all() {
        channel
            .queue_declare(
                ShortString::from(q),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

pub async fn delete(channel: &Channel, queues: &Queues) {
    for q in queues.all() {
        let _ = channel
            .queue_delete(ShortString::from(q), QueueDeleteOptions::default())
            .await;
    }
}

pub async fn purge(channel: &Channel, queue: &str) -> Result<()> {
    channel
        .queue_purge(ShortString::from(queue), QueuePurgeOptions::default())
        .await?;
    Ok(())
}

/// Ready messages in `queue`.
pub async fn depth(channel: &Channel, queue: &str) -> Result<u64> {
    let q = channel
        .queue_declare(
            ShortString::from(queue),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(u64::from(q.message_count()))
}

pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// The tenant and channel of message `i`: round-robin, so every key gets its share.
pub fn key_of(i: u64, tenants: u64, channels: &[&'static str]) -> (u64, &'static str) {
    let pairs = tenants * channels.len() as u64;
    let pair = i % pairs;
    (
        pair / channels.len() as u64,
        channels[(pair % channels.len() as u64) as usize],
    )
}

pub const CHANNELS: [&str; 4] = ["slack", "whatsapp", "teams", "telegram"];

/// A realistic normalized message of about 1 KB; `sent_at_us` travels inside it so that
/// every output (notifications embed the whole message) carries its send time.
pub fn realistic(id: u64, tenant: u64, channel: &str, sent_at_us: u64) -> Vec<u8> {
    format!(
        concat!(
            r#"{{"id":"bench-{id}","tenant_id":"tenant-{tenant}","channel":"{channel}","#,
            r#""thread_id":"1764324000.{id:06}","sent_at_us":{sent},"#,
            r#""sender":{{"user_id":"U0{tenant:06}","display_name":"Ada Lovelace","is_bot":false}},"#,
            r#""channel_metadata":{{"team_id":"T024BE7LD","channel_id":"C2147483705","event_ts":"1764324000.000200"}},"#,
            r#""content":{{"text":"Hi! Could you pull the last three incident reports for the payments service, summarise the root causes, and draft a short note for the on-call channel? Please keep it under two hundred words and link the runbooks you used. Thanks a lot, this is for tomorrow's review with the platform team.","#,
            r#""attachments":[{{"type":"file","name":"incident-2026-11-27.pdf","size":48213}}],"mentions":["U024BE7LH"]}},"#,
            r#""received_at":"2026-11-28T10:00:00.000Z","#,
            r#""gateway":{{"version":"2.14.1","region":"eu-west-1","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736"}}}}"#
        ),
        id = id,
        tenant = tenant,
        channel = channel,
        sent = sent_at_us,
    )
    .into_bytes()
}

/// A malformed message (its error code is what the gate should report).
pub fn malformed(id: u64) -> (Vec<u8>, &'static str) {
    match id % 4 {
        0 => (
            b"{\"tenant_id\": \"acme\", \"channel\": ".to_vec(),
            "invalid_json",
        ),
        1 => (
            br#"{"channel":"slack","text":"hi"}"#.to_vec(),
            "missing_tenant_id",
        ),
        2 => (
            br#"{"tenant_id":"acme","channel":"Not A Channel"}"#.to_vec(),
            "invalid_channel",
        ),
        _ => (br#"["not","an","object"]"#.to_vec(), "not_an_object"),
    }
}

pub fn properties(id: u64, sent_at_us: u64) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "x-bench-sent-at-us".into(),
        AMQPValue::LongLongInt(sent_at_us as i64),
    );
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(format!("bench-{id}").into())
        .with_headers(headers)
}

/// Publishes with confirms, keeping up to `window` unconfirmed at once: to a queue through
/// the default exchange, or through an exchange with a routing key per message.
pub struct FastPublisher {
    channel: Channel,
    exchange: ShortString,
    queue: ShortString,
    pending: FuturesUnordered<lapin::PublisherConfirm>,
    window: usize,
}

impl FastPublisher {
    pub async fn new(conn: &Connection, queue: &str, window: usize) -> Result<Self> {
        Self::via(conn, "", queue, window).await
    }

    /// Publishes through `exchange`; `queue` is the routing key of [`Self::publish`].
    pub async fn via(
        conn: &Connection,
        exchange: &str,
        queue: &str,
        window: usize,
    ) -> Result<Self> {
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self {
            channel,
            exchange: ShortString::from(exchange),
            queue: ShortString::from(queue),
            pending: FuturesUnordered::new(),
            window,
        })
    }

    pub async fn publish(&mut self, body: &[u8], properties: BasicProperties) -> Result<()> {
        self.publish_keyed(self.queue.clone(), body, properties)
            .await
    }

    /// Publishes with `routing_key` (through the exchange this publisher was made for).
    pub async fn publish_keyed(
        &mut self,
        routing_key: ShortString,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<()> {
        while self.pending.len() >= self.window {
            self.settle_one().await?;
        }
        let confirm = self
            .channel
            .basic_publish(
                self.exchange.clone(),
                routing_key,
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await?;
        self.pending.push(confirm);
        Ok(())
    }

    async fn settle_one(&mut self) -> Result<()> {
        if let Some(confirm) = self.pending.next().await
            && !confirm?.is_ack()
        {
            bail!("the broker refused a benchmark message");
        }
        Ok(())
    }

    pub async fn finish(&mut self) -> Result<()> {
        while !self.pending.is_empty() {
            self.settle_one().await?;
        }
        Ok(())
    }
}

/// Fills `queue` with `n` realistic messages across `tenants` × `channels`.
pub async fn fill(
    conn: &Connection,
    queue: &str,
    n: u64,
    tenants: u64,
    channels: &[&'static str],
) -> Result<()> {
    let mut publisher = FastPublisher::new(conn, queue, 2_000).await?;
    for i in 0..n {
        let (tenant, channel) = key_of(i, tenants, channels);
        let sent = now_micros();
        publisher
            .publish(&realistic(i, tenant, channel, sent), properties(i, sent))
            .await?;
    }
    publisher.finish().await
}

/// The `konstruct-gate` binary next to this one.
pub fn gate_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name("konstruct-gate");
    if !path.exists() {
        bail!(
            "{} does not exist: build it with `cargo build --release`",
            path.display()
        );
    }
    Ok(path)
}

/// How a benchmark starts the gates it measures.
#[derive(Clone, Debug)]
pub struct GateSettings {
    pub amqp_url: String,
    pub redis_url: String,
    /// Seed nodes of a Redis Cluster (`redis.mode = "cluster"`); empty for one server.
    pub redis_nodes: Vec<String>,
    /// `http.listen`, so the benchmark can read `/metrics`.
    pub http_listen: String,
    pub requests: u64,
    pub window_seconds: u64,
    pub prefetch: u16,
    /// `limits.count_once` (a decision kept per message id).
    pub count_once: bool,
}

/// A gate process, with its resource use read from /proc.
pub struct GateProcess {
    child: Child,
}

impl GateProcess {
    pub fn spawn(settings: &GateSettings, queues: &Queues) -> Result<Self> {
        Self::spawn_with(settings, queues, &[])
    }

    /// Like [`Self::spawn`], with more environment variables (full names, e.g.
    /// `KONSTRUCT_GATE__LIMITS__ON_LIMIT` or `KONSTRUCT_GATE_CONFIG`).
    pub fn spawn_with(
        settings: &GateSettings,
        queues: &Queues,
        extra: &[(&str, String)],
    ) -> Result<Self> {
        let mut command = Command::new(gate_binary()?);
        command
            .arg("run")
            .env_remove("KONSTRUCT_GATE_CONFIG")
            .stderr(Stdio::inherit());
        // The gate logs to standard output; shown only when a log level was asked for.
        if std::env::var_os("GATE_BENCH_GATE_LOG").is_some() {
            command.stdout(Stdio::inherit());
        } else {
            command.stdout(Stdio::null());
        }
        let vars = [
            ("AMQP__URL", settings.amqp_url.clone()),
            ("AMQP__INBOUND_QUEUE", queues.inbound.clone()),
            ("AMQP__ORCHESTRATOR_QUEUE", queues.orchestrator.clone()),
            ("AMQP__NOTIFICATION_QUEUE", queues.notifications.clone()),
            ("AMQP__DEAD_LETTER_QUEUE", queues.dead_letter.clone()),
            ("AMQP__PREFETCH", settings.prefetch.to_string()),
            ("REDIS__URL", settings.redis_url.clone()),
            ("REDIS__KEY_PREFIX", queues.key_prefix.clone()),
            ("LIMITS__REQUESTS", settings.requests.to_string()),
            (
                "LIMITS__WINDOW_SECONDS",
                settings.window_seconds.to_string(),
            ),
            ("LIMITS__COUNT_ONCE", settings.count_once.to_string()),
            ("HTTP__LISTEN", settings.http_listen.clone()),
            (
                "LOG__LEVEL",
                std::env::var("GATE_BENCH_GATE_LOG").unwrap_or_else(|_| "warn".into()),
            ),
        ];
        for (k, v) in vars {
            command.env(format!("KONSTRUCT_GATE__{k}"), v);
        }
        if !settings.redis_nodes.is_empty() {
            command.env("KONSTRUCT_GATE__REDIS__MODE", "cluster").env(
                "KONSTRUCT_GATE__REDIS__NODES",
                settings.redis_nodes.join(","),
            );
        }
        for (k, v) in extra {
            command.env(k, v);
        }
        let child = command.spawn().context("starting konstruct-gate")?;
        Ok(Self { child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size now, in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// Open file descriptors now.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|dir| dir.count())
            .unwrap_or(0)
    }

    /// User + system CPU time so far.
    pub fn cpu_time(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are 14 and 15.
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 = [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<u64>().ok()))
            .sum();
        // The kernel reports clock ticks; Linux user space uses 100 per second.
        Duration::from_millis(ticks * 10)
    }

    /// Peak resident set size in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// SIGTERM, then waits (bounded) for a graceful exit.
    pub fn stop(mut self) -> Result<()> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("konstruct-gate exited with {status}");
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        bail!("konstruct-gate did not stop within 30 s")
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

/// Redis `EVALSHA`+`EVAL` calls so far, from `INFO commandstats`.
pub async fn redis_script_calls(redis_url: &str) -> Result<u64> {
    let client = redis::Client::open(redis_url)?;
    let mut conn = client.get_multiplexed_async_connection().await.with_context(|| {
        format!(
            "Redis is not reachable at {}: start it with `redis-server` (or `docker compose up -d redis`)",
            konstruct_gate::config::redact_url(redis_url)
        )
    })?;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await?;
    Ok(info
        .lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            l.split(['=', ','])
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum())
}

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// User + system CPU time of a process so far, from /proc (zero if it is gone).
pub fn process_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    // The kernel reports clock ticks; Linux user space uses 100 per second.
    Duration::from_millis(ticks * 10)
}

/// The process id of a local server (`beam.smp` for RabbitMQ, `redis-server`), to measure
/// its CPU; `None` when it does not run on this machine.
pub fn local_pid(name: &str) -> Option<u32> {
    let out = Command::new("pgrep")
        .args(["-o", "-x", name])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// CPU used by the broker and Redis between two points.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerCpu {
    pub broker: Duration,
    pub redis: Duration,
}

impl ServerCpu {
    pub fn now() -> Self {
        Self {
            broker: local_pid("beam.smp").map(process_cpu).unwrap_or_default(),
            redis: local_pid("redis-server")
                .map(process_cpu)
                .unwrap_or_default(),
        }
    }

    pub fn since(self, start: ServerCpu) -> ServerCpu {
        ServerCpu {
            broker: self.broker.saturating_sub(start.broker),
            redis: self.redis.saturating_sub(start.redis),
        }
    }
}

/// One value of the gate's `/metrics`.
pub fn scrape(port: u16, name: &str) -> Option<f64> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.lines()
        .find(|line| line.starts_with(name))
        .and_then(|line| line.split_whitespace().last())
        .and_then(|value| value.parse().ok())
}

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Redis servers of the benchmark's own: one server, or the primaries of a cluster.
pub struct RedisServers {
    children: Vec<Child>,
    pub urls: Vec<String>,
    pub cluster: bool,
    dir: PathBuf,
}

/// What the servers did so far, summed over them.
pub struct ServerStats {
    pub cpu: Duration,
    pub script_calls: u64,
    pub used_memory: u64,
}

impl RedisServers {
    pub fn standalone() -> Result<Self> {
        Self::start(1, false)
    }

    /// `primaries` cluster nodes without replicas, every slot assigned.
    pub fn cluster(primaries: usize) -> Result<Self> {
        let servers = Self::start(primaries, true)?;
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for url in &servers.urls {
            create.arg(url.trim_start_matches("redis://"));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .context("running redis-cli --cluster create")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while servers
            .urls
            .iter()
            .any(|url| !redis_cli(url, &["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        {
            if Instant::now() > deadline {
                bail!("the benchmark's Redis Cluster did not become ok within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(servers)
    }

    fn start(n: usize, cluster: bool) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "gate-bench-redis-{}-{}",
            std::process::id(),
            now_micros()
        ));
        std::fs::create_dir_all(&dir)?;
        let mut servers = Self {
            children: Vec::new(),
            urls: Vec::new(),
            cluster,
            dir,
        };
        for _ in 0..n {
            let port = free_port()?;
            let child = servers.spawn_server(port)?;
            servers.children.push(child);
            servers.urls.push(format!("redis://127.0.0.1:{port}"));
        }
        Ok(servers)
    }

    /// Starts one server on `port` and waits until it answers.
    fn spawn_server(&self, port: u16) -> Result<Child> {
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null());
        if self.cluster {
            command
                .args(["--cluster-enabled", "yes", "--cluster-config-file"])
                .arg(self.dir.join(format!("nodes-{port}.conf")));
        }
        let mut child = command
            .spawn()
            .context("starting redis-server (is it on PATH?)")?;
        let url = format!("redis://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !redis_cli(&url, &["INFO", "server"]).contains("redis_version") {
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("redis-server on port {port} did not answer within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(child)
    }

    /// Kills server `i` (an outage: connections are refused until [`Self::restart`]).
    pub fn kill(&mut self, i: usize) {
        let _ = self.children[i].kill();
        let _ = self.children[i].wait();
    }

    /// Starts server `i` again on its port, empty.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        let port: u16 = self.urls[i]
            .rsplit(':')
            .next()
            .unwrap_or_default()
            .parse()?;
        self.children[i] = self.spawn_server(port)?;
        Ok(())
    }

    pub fn stats(&self) -> Result<ServerStats> {
        let mut stats = ServerStats {
            cpu: Duration::ZERO,
            script_calls: 0,
            used_memory: 0,
        };
        for (child, url) in self.children.iter().zip(&self.urls) {
            stats.cpu += process_cpu(child.id());
            let text = redis_cli(url, &["INFO", "all"]);
            stats.script_calls += text
                .lines()
                .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
                .filter_map(|l| l.split(['=', ',']).nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
            stats.used_memory += text
                .lines()
                .find_map(|l| l.strip_prefix("used_memory:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .context("INFO gave no used_memory")?;
        }
        Ok(stats)
    }
}

impl Drop for RedisServers {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What `redis-cli` prints for `command` on the server at `url`, or "" when it does not
/// answer.
pub fn redis_cli(url: &str, command: &[&str]) -> String {
    let port = url.rsplit(':').next().unwrap_or_default();
    Command::new("redis-cli")
        .args(["-p", port])
        .args(command)
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default()
}
