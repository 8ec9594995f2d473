//! Load: publish N realistic messages (optionally some malformed) at full speed or at a
//! fixed rate through gates this tool starts, read all three outputs, and report
//! throughput, end-to-end latency and outcome counts against what the limits predict.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use futures::StreamExt;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use lapin::options::BasicConsumeOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use tokio::sync::mpsc;

use crate::support::*;

#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// Messages to publish.
    #[arg(long, default_value_t = 100_000)]
    pub messages: u64,
    /// Distinct tenants.
    #[arg(long, default_value_t = 1_000)]
    pub tenants: u64,
    /// Channels per tenant (slack, whatsapp, teams, telegram).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=4))]
    pub channels: u64,
    /// Share of malformed messages, 0.0 to 1.0.
    #[arg(long, default_value_t = 0.0)]
    pub invalid_share: f64,
    /// Messages per second to publish; full speed when absent.
    #[arg(long)]
    pub rate: Option<u64>,
    /// Gate instances to start.
    #[arg(long, default_value_t = 1)]
    pub instances: usize,
    /// The gates' `limits.requests`.
    #[arg(long, default_value_t = 30)]
    pub requests: u64,
    /// The gates' `limits.window_seconds`; the prediction assumes the run fits in one.
    #[arg(long, default_value_t = 600)]
    pub window_seconds: u64,
    /// The gates' `amqp.prefetch`.
    #[arg(long, default_value_t = 256)]
    pub prefetch: u16,
    /// Run the gates with `limits.count_once = false` (no decision kept per message id).
    #[arg(long)]
    pub no_count_once: bool,
    /// Give up waiting for outputs after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
enum Outcome {
    Allowed,
    Rejected,
    Invalid,
}

struct Received {
    outcome: Outcome,
    id: u64,
    latency_us: u64,
}

pub async fn run(args: LoadArgs, amqp_url: String, redis_url: String, json: bool) -> Result<()> {
    if !(0.0..=1.0).contains(&args.invalid_share) {
        bail!("--invalid-share must be between 0.0 and 1.0");
    }
    let conn = connect(&amqp_url).await?;
    let channel = conn.create_channel().await?;
    let queues = Queues::unique("load");
    declare(&channel, &queues).await?;
    let settings = GateSettings {
        amqp_url: amqp_url.clone(),
        redis_url: redis_url.clone(),
        redis_nodes: Vec::new(),
        http_listen: "127.0.0.1:0".into(),
        requests: args.requests,
        window_seconds: args.window_seconds,
        prefetch: args.prefetch,
        count_once: !args.no_count_once,
    };
    let result = measure(&args, &conn, &channel, &queues, &settings, &redis_url, json).await;
    delete(&channel, &queues).await;
    result
}

async fn measure(
    args: &LoadArgs,
    conn: &lapin::Connection,
    channel: &lapin::Channel,
    queues: &Queues,
    settings: &GateSettings,
    redis_url: &str,
    json: bool,
) -> Result<()> {
    let channels = &CHANNELS[..args.channels as usize];
    let gates = (0..args.instances)
        .map(|_| GateProcess::spawn(settings, queues))
        .collect::<Result<Vec<_>>>()?;
    wait_for_consumers(channel, &queues.inbound, args.instances).await?;
    let calls_before = redis_script_calls(redis_url).await?;

    let (tx, mut rx) = mpsc::unbounded_channel();
    for (queue, outcome) in [
        (&queues.orchestrator, Outcome::Allowed),
        (&queues.notifications, Outcome::Rejected),
        (&queues.dead_letter, Outcome::Invalid),
    ] {
        spawn_reader(conn, queue, outcome, tx.clone()).await?;
    }
    drop(tx);

    // Which messages are malformed, spread evenly: message i is bad when the running share
    // crosses a whole number.
    let is_invalid = |i: u64| {
        ((i + 1) as f64 * args.invalid_share).floor() > (i as f64 * args.invalid_share).floor()
    };
    let mut predicted: HashMap<Outcome, u64> = HashMap::new();
    let mut per_key: HashMap<(u64, &str), u64> = HashMap::new();

    let progress = (!json && std::io::stdout().is_terminal()).then(|| {
        let bar = ProgressBar::new(args.messages);
        bar.set_style(
            ProgressStyle::with_template("{prefix:>9} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix("received");
        bar
    });

    // Outputs taken off the channel while still publishing (to move the progress bar).
    let mut early = Vec::new();
    let mut publisher = FastPublisher::new(conn, &queues.inbound, 1_000).await?;
    let started = Instant::now();
    let interval = args
        .rate
        .map(|r| Duration::from_secs_f64(1.0 / r.max(1) as f64));
    for i in 0..args.messages {
        if let Some(interval) = interval {
            let due = started + interval.mul_f64(i as f64);
            let now = Instant::now();
            if due > now {
                tokio::time::sleep(due - now).await;
            }
        }
        let sent = now_micros();
        let body = if is_invalid(i) {
            *predicted.entry(Outcome::Invalid).or_default() += 1;
            malformed(i).0
        } else {
            let (tenant, channel) = key_of(i, args.tenants, channels);
            let seen = per_key.entry((tenant, channel)).or_default();
            *seen += 1;
            let outcome = if *seen <= args.requests {
                Outcome::Allowed
            } else {
                Outcome::Rejected
            };
            *predicted.entry(outcome).or_default() += 1;
            realistic(i, tenant, channel, sent)
        };
        publisher.publish(&body, properties(i, sent)).await?;
        if let Some(bar) = &progress {
            while let Ok(r) = rx.try_recv() {
                bar.inc(1);
                early.push(r);
            }
        }
    }
    publisher.finish().await?;
    let published_in = started.elapsed();

    let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut counts: HashMap<Outcome, u64> = HashMap::new();
    let mut seen = vec![0u8; args.messages as usize];
    let mut received = 0u64;
    let mut last = Instant::now();
    let mut absorb = |r: Received, received: &mut u64| {
        let _ = histogram.record(r.latency_us.max(1));
        *counts.entry(r.outcome).or_default() += 1;
        if let Some(slot) = seen.get_mut(r.id as usize) {
            *slot = slot.saturating_add(1);
        }
        *received += 1;
    };
    for r in early {
        absorb(r, &mut received);
    }
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    while received < args.messages {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(r)) => {
                absorb(r, &mut received);
                last = Instant::now();
                if let Some(bar) = &progress {
                    bar.set_position(received);
                }
            }
            _ => break,
        }
    }
    if let Some(bar) = &progress {
        bar.finish_and_clear();
    }
    let total_time = last.saturating_duration_since(started);
    let calls = redis_script_calls(redis_url).await? - calls_before;
    let peak_rss = gates.iter().map(GateProcess::peak_rss).max().unwrap_or(0);
    let cpu: Duration = gates.iter().map(GateProcess::cpu_time).sum();
    for gate in gates {
        gate.stop()?;
    }

    let missing = seen.iter().filter(|&&c| c == 0).count();
    let duplicates: u64 = seen.iter().map(|&c| u64::from(c.saturating_sub(1))).sum();
    let pct = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    let summary = serde_json::json!({
        "messages": args.messages,
        "rate_target": args.rate,
        "instances": args.instances,
        "publish_msgs_per_s": args.messages as f64 / published_in.as_secs_f64(),
        "end_to_end_msgs_per_s": received as f64 / total_time.as_secs_f64(),
        "latency_ms": {
            "p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "p99.9": pct(0.999),
            "max": histogram.max() as f64 / 1000.0,
        },
        "outcomes": {
            "allowed": counts.get(&Outcome::Allowed).copied().unwrap_or(0),
            "rejected": counts.get(&Outcome::Rejected).copied().unwrap_or(0),
            "invalid": counts.get(&Outcome::Invalid).copied().unwrap_or(0),
        },
        "predicted": {
            "allowed": predicted.get(&Outcome::Allowed).copied().unwrap_or(0),
            "rejected": predicted.get(&Outcome::Rejected).copied().unwrap_or(0),
            "invalid": predicted.get(&Outcome::Invalid).copied().unwrap_or(0),
        },
        "missing_ids": missing,
        "duplicates": duplicates,
        "redis_calls_per_msg": calls as f64 / args.messages as f64,
        "gate_cpu_us_per_msg": cpu.as_secs_f64() * 1e6 / args.messages as f64,
        "gate_peak_rss_mib": peak_rss as f64 / (1024.0 * 1024.0),
    });
    let matches = summary["outcomes"] == summary["predicted"] && missing == 0;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary, matches);
    }
    if !matches {
        bail!("the outputs do not match the prediction (see above)");
    }
    Ok(())
}

fn print_summary(s: &serde_json::Value, matches: bool) {
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    println!(
        "gate-bench: {} messages through {} gate instance(s)",
        s["messages"], s["instances"]
    );
    println!(
        "  throughput   publish {:.0} msg/s, end to end {:.0} msg/s{}",
        f(&s["publish_msgs_per_s"]),
        f(&s["end_to_end_msgs_per_s"]),
        s["rate_target"]
            .as_u64()
            .map_or(String::new(), |r| format!(" (target {r} msg/s)")),
    );
    let l = &s["latency_ms"];
    println!(
        "  latency ms   p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        f(&l["p50"]),
        f(&l["p90"]),
        f(&l["p99"]),
        f(&l["p99.9"]),
        f(&l["max"])
    );
    for outcome in ["allowed", "rejected", "invalid"] {
        println!(
            "  {outcome:<9}    {:>8} (predicted {})",
            s["outcomes"][outcome], s["predicted"][outcome]
        );
    }
    println!(
        "  ids          {} missing, {} duplicates",
        s["missing_ids"], s["duplicates"]
    );
    println!(
        "  gate         {:.1} µs CPU/msg, peak RSS {:.1} MiB, {:.2} Redis calls/msg",
        f(&s["gate_cpu_us_per_msg"]),
        f(&s["gate_peak_rss_mib"]),
        f(&s["redis_calls_per_msg"]),
    );
    println!(
        "  check        {}",
        if matches {
            "every message came out as predicted"
        } else {
            "MISMATCH"
        }
    );
}

async fn wait_for_consumers(channel: &lapin::Channel, queue: &str, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
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
        if q.consumer_count() as usize >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the gates did not start consuming within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn spawn_reader(
    conn: &lapin::Connection,
    queue: &str,
    outcome: Outcome,
    tx: mpsc::UnboundedSender<Received>,
) -> Result<()> {
    let channel = conn.create_channel().await?;
    let mut consumer = channel
        .basic_consume(
            ShortString::from(queue),
            ShortString::from(format!("gate-bench-{queue}")),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    tokio::spawn(async move {
        let _channel = channel;
        while let Some(Ok(d)) = consumer.next().await {
            let now = now_micros();
            let (id, sent) = match outcome {
                Outcome::Rejected => {
                    let v: serde_json::Value = serde_json::from_slice(&d.data).unwrap_or_default();
                    let id = v["message_id"].as_str().and_then(parse_id);
                    (id, v["message"]["sent_at_us"].as_u64())
                }
                Outcome::Allowed | Outcome::Invalid => {
                    let id = d
                        .properties
                        .message_id()
                        .as_ref()
                        .and_then(|m| parse_id(m.as_str()));
                    let sent = match konstruct_gate::route::header(
                        d.properties.headers(),
                        "x-bench-sent-at-us",
                    ) {
                        Some(AMQPValue::LongLongInt(v)) => Some(*v as u64),
                        _ => None,
                    };
                    (id, sent)
                }
            };
            if let (Some(id), Some(sent)) = (id, sent) {
                let _ = tx.send(Received {
                    outcome,
                    id,
                    latency_us: now.saturating_sub(sent),
                });
            }
        }
    });
    Ok(())
}

fn parse_id(s: &str) -> Option<u64> {
    s.strip_prefix("bench-")?.parse().ok()
}
