//! One tenant floods, the others write as usual: how long the others' messages wait with
//! one inbound queue and with a sharded inbound (`amqp.inbound_shards`), how fast the
//! flood itself drains with `limits.quiet_rejections` publish and drop, and a plain drain
//! over one shard and over many. One gate process, the local broker and Redis.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicGetOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;

use crate::support::*;

#[derive(clap::Args, Debug, Clone)]
pub struct FloodArgs {
    /// Messages the flooding tenant publishes, as fast as it can.
    #[arg(long, default_value_t = 150_000)]
    pub flood: u64,
    /// Quiet tenants writing meanwhile.
    #[arg(long, default_value_t = 50)]
    pub quiet_tenants: u64,
    /// Messages per second of all quiet tenants together.
    #[arg(long, default_value_t = 100)]
    pub quiet_rate: u64,
    /// Shards of the sharded runs.
    #[arg(long, default_value_t = 16)]
    pub shards: u16,
    /// Messages of the drain runs (the flood drain and the plain drain).
    #[arg(long, default_value_t = 100_000)]
    pub drain: u64,
    /// The gate's `amqp.prefetch` (per shard).
    #[arg(long, default_value_t = 256)]
    pub prefetch: u16,
}

/// Messages per tenant and window: quiet tenants stay within it, the flood does not.
const REQUESTS: u64 = 1_000;

#[derive(Serialize, Debug)]
struct Dwell {
    messages: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

#[derive(Serialize, Debug)]
struct Isolation {
    shards: u16,
    quiet_rejections: String,
    flood_published_in_s: f64,
    flood_drained_in_s: f64,
    /// Quiet tenants outside the flooding tenant's shard (all of them with one queue).
    others: Option<Dwell>,
    /// Quiet tenants hashed to the flooding tenant's shard.
    shard_mates: Option<Dwell>,
}

#[derive(Serialize, Debug)]
struct Drain {
    what: String,
    messages: u64,
    msgs_per_s: f64,
    gate_cpu_us_per_msg: f64,
    broker_cpu_us_per_msg: f64,
}

pub async fn run(args: FloodArgs, amqp_url: String, redis_url: String, json: bool) -> Result<()> {
    let conn = connect(&amqp_url).await?;
    let mut isolation = Vec::new();
    for (shards, quiet) in [
        (0, "publish"),
        (args.shards, "publish"),
        (args.shards, "drop"),
    ] {
        let run = isolation_run(&conn, &args, shards, quiet, &amqp_url, &redis_url).await?;
        if !json {
            print_isolation(&run);
        }
        isolation.push(run);
    }
    let mut drains = Vec::new();
    for quiet in ["publish", "drop"] {
        let run = flood_drain(&conn, &args, quiet, &amqp_url, &redis_url).await?;
        if !json {
            print_drain(&run);
        }
        drains.push(run);
    }
    for shards in [1, args.shards] {
        let run = plain_drain(&conn, &args, shards, &amqp_url, &redis_url).await?;
        if !json {
            print_drain(&run);
        }
        drains.push(run);
    }
    if json {
        let out = serde_json::json!({ "isolation": isolation, "drains": drains });
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

fn print_isolation(run: &Isolation) {
    let show = |d: &Option<Dwell>| {
        d.as_ref().map_or("-".to_owned(), |d| {
            format!(
                "{} msgs, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
                d.messages, d.p50_ms, d.p99_ms, d.max_ms
            )
        })
    };
    println!(
        "isolation, {}, quiet_rejections = {}: flood published in {:.1} s, drained in {:.1} s | other tenants: {} | shard-mates: {}",
        if run.shards == 0 {
            "one queue".to_owned()
        } else {
            format!("{} shards", run.shards)
        },
        run.quiet_rejections,
        run.flood_published_in_s,
        run.flood_drained_in_s,
        show(&run.others),
        show(&run.shard_mates),
    );
}

fn print_drain(run: &Drain) {
    println!(
        "{}: {} messages, {:.0} msg/s, gate {:.1} µs/msg, broker {:.1} µs/msg",
        run.what, run.messages, run.msgs_per_s, run.gate_cpu_us_per_msg, run.broker_cpu_us_per_msg
    );
}

fn amqp_config(queues: &Queues, shards: u16) -> konstruct_gate::config::AmqpConfig {
    konstruct_gate::config::AmqpConfig {
        inbound_queue: queues.inbound.clone(),
        orchestrator_queue: queues.orchestrator.clone(),
        notification_queue: queues.notifications.clone(),
        dead_letter_queue: queues.dead_letter.clone(),
        inbound_shards: shards,
        ..Default::default()
    }
}

/// Declares the queues (and with shards the exchange) as the gate would.
async fn declare_all(conn: &Connection, queues: &Queues, shards: u16) -> Result<()> {
    let amqp = amqp_config(queues, shards);
    konstruct_gate::amqp::declare_queues(conn, &amqp).await?;
    if shards > 0 {
        konstruct_gate::shards::declare_exchange(conn, &amqp)
            .await
            .context("rabbitmq-plugins enable rabbitmq_consistent_hash_exchange")?;
    }
    Ok(())
}

async fn delete_all(channel: &Channel, queues: &Queues, shards: u16) {
    delete(channel, queues).await;
    for k in 0..shards {
        let _ = channel
            .queue_delete(
                ShortString::from(konstruct_gate::shards::shard_queue(&queues.inbound, k)),
                Default::default(),
            )
            .await;
    }
    if shards > 0 {
        let _ = channel
            .exchange_delete(
                ShortString::from(queues.inbound.as_str()),
                Default::default(),
            )
            .await;
    }
}

fn inbound_queues(queues: &Queues, shards: u16) -> Vec<String> {
    let mut all = vec![queues.inbound.clone()];
    all.extend((0..shards).map(|k| konstruct_gate::shards::shard_queue(&queues.inbound, k)));
    all
}

/// Publishes to the inbound exchange (tenant as routing key) or, without shards, to the
/// inbound queue; up to 2,000 unconfirmed at once.
struct Gateway {
    publisher: FastPublisher,
    sharded: bool,
}

impl Gateway {
    async fn new(conn: &Connection, queues: &Queues, shards: u16) -> Result<Self> {
        let sharded = shards > 0;
        let exchange = if sharded { queues.inbound.as_str() } else { "" };
        Ok(Self {
            publisher: FastPublisher::via(conn, exchange, &queues.inbound, 2_000).await?,
            sharded,
        })
    }

    async fn publish(&mut self, tenant: u64, body: &[u8]) -> Result<()> {
        let properties = BasicProperties::default().with_delivery_mode(2);
        if self.sharded {
            let key = ShortString::from(format!("tenant-{tenant}"));
            self.publisher.publish_keyed(key, body, properties).await
        } else {
            self.publisher.publish(body, properties).await
        }
    }

    async fn finish(&mut self) -> Result<()> {
        self.publisher.finish().await
    }
}

/// The flooding tenant publishes `n` messages as fast as the broker confirms them.
async fn flood(conn: &Connection, queues: &Queues, shards: u16, n: u64) -> Result<()> {
    let mut gateway = Gateway::new(conn, queues, shards).await?;
    for i in 0..n {
        let body = realistic(i, FLOOD_TENANT, "slack", now_micros());
        gateway.publish(FLOOD_TENANT, &body).await?;
    }
    gateway.finish().await
}

/// The flooding tenant is tenant 0; quiet tenants are 1..=Q.
const FLOOD_TENANT: u64 = 0;

/// Which shard each tenant hashes to: one probe each, then read back from every shard.
async fn shard_of_tenants(
    conn: &Connection,
    queues: &Queues,
    shards: u16,
    tenants: u64,
) -> Result<HashMap<u64, u16>> {
    let mut gateway = Gateway::new(conn, queues, shards).await?;
    for tenant in 0..=tenants {
        gateway
            .publish(tenant, &realistic(tenant, tenant, "slack", 0))
            .await?;
    }
    gateway.finish().await?;
    let channel = conn.create_channel().await?;
    let mut map = HashMap::new();
    for k in 0..shards {
        let queue = konstruct_gate::shards::shard_queue(&queues.inbound, k);
        while let Some(message) = channel
            .basic_get(
                ShortString::from(queue.as_str()),
                BasicGetOptions { no_ack: true },
            )
            .await?
        {
            let v: serde_json::Value = serde_json::from_slice(&message.delivery.data)?;
            let tenant = v["tenant_id"]
                .as_str()
                .and_then(|t| t.strip_prefix("tenant-"))
                .and_then(|t| t.parse().ok())
                .context("a probe names its tenant")?;
            map.insert(tenant, k);
        }
    }
    if map.len() as u64 != tenants + 1 {
        bail!("only {} of {} probes came back", map.len(), tenants + 1);
    }
    Ok(map)
}

fn gate_settings(amqp_url: &str, redis_url: &str, prefetch: u16, port: u16) -> GateSettings {
    GateSettings {
        amqp_url: amqp_url.to_owned(),
        redis_url: redis_url.to_owned(),
        redis_nodes: Vec::new(),
        http_listen: format!("127.0.0.1:{port}"),
        requests: REQUESTS,
        window_seconds: 60,
        prefetch,
        count_once: true,
    }
}

fn outcomes(port: u16) -> f64 {
    ["allowed", "rejected", "rejected_quiet", "invalid"]
        .iter()
        .filter_map(|o| {
            scrape(
                port,
                &format!("konstruct_gate_messages_total{{outcome=\"{o}\"}}"),
            )
        })
        .sum()
}

async fn wait_ready(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while scrape(port, "konstruct_gate_ready") != Some(1.0) {
        if Instant::now() > deadline {
            bail!("the gate did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn dwell(mut ms: Vec<f64>) -> Option<Dwell> {
    if ms.is_empty() {
        return None;
    }
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    Some(Dwell {
        messages: ms.len(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        max_ms: ms[ms.len() - 1],
    })
}

async fn isolation_run(
    conn: &Connection,
    args: &FloodArgs,
    shards: u16,
    quiet: &str,
    amqp_url: &str,
    redis_url: &str,
) -> Result<Isolation> {
    let queues = Queues::unique("flood");
    declare_all(conn, &queues, shards).await?;
    let channel = conn.create_channel().await?;
    let home = if shards > 0 {
        shard_of_tenants(conn, &queues, shards, args.quiet_tenants).await?
    } else {
        HashMap::new()
    };
    let flood_shard = home.get(&FLOOD_TENANT).copied();
    let port = free_port()?;
    let gate = GateProcess::spawn_with(
        &gate_settings(amqp_url, redis_url, args.prefetch, port),
        &queues,
        &[
            ("KONSTRUCT_GATE__AMQP__INBOUND_SHARDS", shards.to_string()),
            ("KONSTRUCT_GATE__LIMITS__QUIET_REJECTIONS", quiet.to_owned()),
        ],
    )?;
    wait_ready(port).await?;
    // Every allowed message: a quiet tenant's dwell from its send time to the orchestrator.
    let collect_channel = conn.create_channel().await?;
    let mut consumer = collect_channel
        .basic_consume(
            ShortString::from(queues.orchestrator.as_str()),
            ShortString::from("flood-bench"),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let collector = tokio::spawn(async move {
        let mut seen: Vec<(u64, f64)> = Vec::new();
        while let Some(Ok(delivery)) = consumer.next().await {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&delivery.data) else {
                continue;
            };
            let tenant: u64 = v["tenant_id"]
                .as_str()
                .and_then(|t| t.strip_prefix("tenant-"))
                .and_then(|t| t.parse().ok())
                .unwrap_or(FLOOD_TENANT);
            if tenant != FLOOD_TENANT {
                let sent = v["sent_at_us"].as_u64().unwrap_or(0);
                seen.push((tenant, now_micros().saturating_sub(sent) as f64 / 1e3));
            }
        }
        seen
    });
    // The quiet tenants trickle along while the flood is published and drained.
    let stop_quiet = Arc::new(AtomicBool::new(false));
    let trickle = {
        let (url, queues, stop) = (amqp_url.to_owned(), queues.clone(), stop_quiet.clone());
        let (tenants, rate) = (args.quiet_tenants, args.quiet_rate);
        tokio::spawn(async move {
            let conn = connect(&url).await?;
            let mut gateway = Gateway::new(&conn, &queues, shards).await?;
            let mut sent = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let per_tick = (rate / 100).max(1);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                for _ in 0..per_tick {
                    let tenant = 1 + sent % tenants;
                    let body = realistic(1_000_000 + sent, tenant, "slack", now_micros());
                    gateway.publish(tenant, &body).await?;
                    sent += 1;
                }
            }
            gateway.finish().await?;
            anyhow::Ok(sent)
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    flood(conn, &queues, shards, args.flood).await?;
    let published = started.elapsed();
    // Drained: every inbound queue empty, and the gate decided at least the flood.
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let mut waiting = 0;
        for q in inbound_queues(&queues, shards) {
            waiting += depth(&channel, &q).await?;
        }
        if waiting == 0 && outcomes(port) >= args.flood as f64 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the flood did not drain within 15 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = started.elapsed();
    stop_quiet.store(true, Ordering::Relaxed);
    let quiet_sent = trickle.await??;
    // Every quiet message reaches the orchestrator (each tenant within its limit).
    let deadline = Instant::now() + Duration::from_secs(60);
    while depth(&channel, &queues.orchestrator).await.unwrap_or(0) > 0
        || outcomes(port) < (args.flood + quiet_sent) as f64
    {
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gate.stop()?;
    let _ = collect_channel.close(200, ShortString::from("done")).await;
    let seen = collector.await?;
    if seen.len() as u64 != quiet_sent {
        bail!(
            "{} of {quiet_sent} quiet messages reached the orchestrator",
            seen.len()
        );
    }
    let (mut mates, mut others) = (Vec::new(), Vec::new());
    for (tenant, ms) in seen {
        if flood_shard.is_some() && home.get(&tenant) == flood_shard.as_ref() {
            mates.push(ms);
        } else {
            others.push(ms);
        }
    }
    delete_all(&channel, &queues, shards).await;
    Ok(Isolation {
        shards,
        quiet_rejections: quiet.to_owned(),
        flood_published_in_s: published.as_secs_f64(),
        flood_drained_in_s: drained.as_secs_f64(),
        others: dwell(others),
        shard_mates: dwell(mates),
    })
}

/// A pre-filled flood of one tenant drained by one gate, with `quiet_rejections = quiet`.
async fn flood_drain(
    conn: &Connection,
    args: &FloodArgs,
    quiet: &str,
    amqp_url: &str,
    redis_url: &str,
) -> Result<Drain> {
    let queues = Queues::unique("flood-drain");
    declare_all(conn, &queues, 0).await?;
    let channel = conn.create_channel().await?;
    flood(conn, &queues, 0, args.drain).await?;
    let settings = gate_settings(amqp_url, redis_url, args.prefetch, free_port()?);
    let quiet = [("KONSTRUCT_GATE__LIMITS__QUIET_REJECTIONS", quiet.to_owned())];
    let what = format!("one tenant's flood, quiet_rejections = {}", quiet[0].1);
    measure_drain(&channel, &queues, 0, &settings, &quiet, args.drain, what).await
}

/// Starts one gate on the pre-filled `queues` and times it deciding `n` messages; then
/// deletes the queues.
async fn measure_drain(
    channel: &Channel,
    queues: &Queues,
    shards: u16,
    settings: &GateSettings,
    extra: &[(&str, String)],
    n: u64,
    what: String,
) -> Result<Drain> {
    let port: u16 = settings
        .http_listen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .context("http_listen names a port")?;
    let before = ServerCpu::now();
    let gate = GateProcess::spawn_with(settings, queues, extra)?;
    let elapsed = time_until_decided(port, n).await?;
    let cpu = gate.cpu_time();
    let broker = ServerCpu::now().since(before).broker;
    gate.stop()?;
    delete_all(channel, queues, shards).await;
    let per_msg = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    Ok(Drain {
        what,
        messages: n,
        msgs_per_s: n as f64 / elapsed.as_secs_f64(),
        gate_cpu_us_per_msg: per_msg(cpu),
        broker_cpu_us_per_msg: per_msg(broker),
    })
}

/// From the first decision to the last, so the gate's start-up is not counted.
async fn time_until_decided(port: u16, n: u64) -> Result<Duration> {
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut first = None;
    loop {
        let done = outcomes(port);
        let now = Instant::now();
        if done > 0.0 && first.is_none() {
            first = Some(now);
        }
        if done >= n as f64 {
            return Ok(now - first.unwrap_or(now));
        }
        if now > deadline {
            bail!("only {done} of {n} messages were decided");
        }
        // Each look renders the gate's /metrics: not so often that it shows in its CPU.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A pre-filled drain of messages over 1,000 tenants, all allowed, from `shards` shards.
async fn plain_drain(
    conn: &Connection,
    args: &FloodArgs,
    shards: u16,
    amqp_url: &str,
    redis_url: &str,
) -> Result<Drain> {
    let queues = Queues::unique("shard-drain");
    declare_all(conn, &queues, shards).await?;
    let channel = conn.create_channel().await?;
    let mut gateway = Gateway::new(conn, &queues, shards).await?;
    for i in 0..args.drain {
        let tenant = 1 + i % 1_000;
        gateway
            .publish(tenant, &realistic(i, tenant, "slack", now_micros()))
            .await?;
    }
    gateway.finish().await?;
    let mut settings = gate_settings(amqp_url, redis_url, args.prefetch, free_port()?);
    settings.requests = 1_000_000;
    let extra = [("KONSTRUCT_GATE__AMQP__INBOUND_SHARDS", shards.to_string())];
    let what = format!("drain over {shards} shard(s), all allowed");
    measure_drain(
        &channel, &queues, shards, &settings, &extra, args.drain, what,
    )
    .await
}
