//! Side by side, in one run: RabbitMQ's Shovel relaying a pre-filled queue (ack-mode
//! on-confirm, no rate limiting) and konstruct-gate draining the same number of messages
//! with a rate-limit check on every one, alternating, so that both see the same machine.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lapin::Channel;
use serde::Serialize;

use crate::support::*;

#[derive(clap::Args, Debug, Clone)]
pub struct DrainArgs {
    /// Messages pre-filled for each timed drain.
    #[arg(long, default_value_t = 100_000)]
    pub messages: u64,
    /// Distinct tenants (each with every channel).
    #[arg(long, default_value_t = 1_000)]
    pub tenants: u64,
    /// Channels per tenant (slack, whatsapp, teams, telegram).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=4))]
    pub channels: u64,
    /// Shovel/gate pairs to alternate.
    #[arg(long, default_value_t = 3)]
    pub pairs: usize,
    /// Gate instances draining together.
    #[arg(long, default_value_t = 1)]
    pub instances: usize,
    /// The gates' `amqp.prefetch`.
    #[arg(long, default_value_t = 256)]
    pub prefetch: u16,
    /// The gates' `limits.requests` (the default lets every message through, like Shovel,
    /// while still counting each one in Redis).
    #[arg(long, default_value_t = 1_000_000)]
    pub requests: u64,
    /// Run the gates with `limits.count_once = false` (no decision kept per message id).
    #[arg(long)]
    pub no_count_once: bool,
    /// Skip Shovel and time the gate alone.
    #[arg(long)]
    pub gate_only: bool,
    /// Extra limits (`[[limits.also]]`: 1 a tenant budget, 2 also a sender limit, each
    /// letting every message through) per gate run; several, comma-separated, are timed
    /// in turn within each pair (`--also 0,1,2`), so they see the same machine.
    #[arg(long, value_delimiter = ',', default_value = "0", value_parser = clap::value_parser!(u8).range(0..=2))]
    pub also: Vec<u8>,
}

/// A configuration file with `extra` limits of `[[limits.also]]`, each letting every
/// message through; `None` for none.
fn also_config(extra: u8, requests: u64) -> Result<Option<tempfile_path::Path>> {
    if extra == 0 {
        return Ok(None);
    }
    let mut text = String::new();
    for scope in ["tenant", "sender"].iter().take(extra as usize) {
        text.push_str(&format!(
            "[[limits.also]]\nscope = \"{scope}\"\nrequests = {requests}\nwindow_seconds = 600\n\n"
        ));
    }
    let path = std::env::temp_dir().join(format!(
        "gate-bench-also-{}-{extra}.toml",
        std::process::id()
    ));
    std::fs::write(&path, text).context("writing the extra limits' configuration")?;
    Ok(Some(tempfile_path::Path(path)))
}

/// A file removed when dropped.
mod tempfile_path {
    pub struct Path(pub std::path::PathBuf);

    impl Drop for Path {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[derive(Serialize, Debug)]
struct Pair {
    shovel_msgs_per_s: Option<f64>,
    shovel_broker_cpu_us_per_msg: Option<f64>,
    gate_broker_cpu_us_per_msg: f64,
    gate_redis_cpu_us_per_msg: f64,
    gate_msgs_per_s: f64,
    ratio: Option<f64>,
    gate_cpu_us_per_msg: f64,
    gate_peak_rss_mib: f64,
    redis_calls_per_msg: f64,
    /// Extra limits the gate checked each message against.
    also: u8,
}

pub async fn run(args: DrainArgs, amqp_url: String, redis_url: String, json: bool) -> Result<()> {
    if !args.gate_only {
        enable_shovel()?;
    }
    let conn = connect(&amqp_url).await?;
    let channel = conn.create_channel().await?;
    let channels = &CHANNELS[..args.channels as usize];
    let queues = Queues::unique("drain");
    declare(&channel, &queues).await?;
    let settings = GateSettings {
        amqp_url: amqp_url.clone(),
        redis_url: redis_url.clone(),
        redis_nodes: Vec::new(),
        http_listen: "127.0.0.1:0".into(),
        requests: args.requests,
        window_seconds: 600,
        prefetch: args.prefetch,
        count_once: !args.no_count_once,
    };
    if !json {
        println!(
            "drain: {} messages × {} pairs, {} tenants × {} channels, {} gate instance(s), prefetch {}",
            args.messages, args.pairs, args.tenants, args.channels, args.instances, args.prefetch
        );
    }
    let mut pairs = Vec::new();
    let result: Result<()> = async {
        for i in 0..args.pairs {
            let shovel = if args.gate_only {
                None
            } else {
                fill(&conn, &queues.inbound, args.messages, args.tenants, channels).await?;
                let before = ServerCpu::now();
                let rate = time_shovel(&channel, &queues, &amqp_url, args.messages, i).await?;
                let cpu = ServerCpu::now().since(before);
                purge(&channel, &queues.orchestrator).await?;
                Some((rate, cpu))
            };
            for &also in &args.also {
            fill(&conn, &queues.inbound, args.messages, args.tenants, channels).await?;
            let mut run_queues = queues.clone();
            run_queues.key_prefix = format!("{}{i}-{also}:", queues.key_prefix);
            let config = also_config(also, args.requests)?;
            let extra: Vec<(&str, String)> = config
                .iter()
                .map(|p| ("KONSTRUCT_GATE_CONFIG", p.0.display().to_string()))
                .collect();
            let before = ServerCpu::now();
            let gate = time_gate(&channel, &run_queues, &settings, args.messages, args.instances, &extra).await?;
            let servers = ServerCpu::now().since(before);
            let per_msg = |d: Duration| d.as_secs_f64() * 1e6 / args.messages as f64;
            for q in queues.outputs() {
                purge(&channel, q).await?;
            }
            let pair = Pair {
                shovel_msgs_per_s: shovel.map(|(rate, _)| rate),
                shovel_broker_cpu_us_per_msg: shovel.map(|(_, cpu)| per_msg(cpu.broker)),
                gate_broker_cpu_us_per_msg: per_msg(servers.broker),
                gate_redis_cpu_us_per_msg: per_msg(servers.redis),
                gate_msgs_per_s: gate.rate,
                ratio: shovel.map(|(rate, _)| gate.rate / rate),
                gate_cpu_us_per_msg: gate.cpu.as_secs_f64() * 1e6 / args.messages as f64,
                gate_peak_rss_mib: gate.peak_rss as f64 / (1024.0 * 1024.0),
                redis_calls_per_msg: gate.redis_calls as f64 / args.messages as f64,
                also,
            };
            if !json {
                println!(
                    "pair {}, {also} extra limit(s): shovel {:>6} msg/s (broker {:>5} µs/msg) | gate {:>6.0} msg/s (gate {:>5.1}, broker {:>5.1}, redis {:>4.1} µs/msg) | ratio {:>5} | peak RSS {:>5.1} MiB | Redis calls/msg {:.2}",
                    i + 1,
                    pair.shovel_msgs_per_s.map_or("-".into(), |s| format!("{s:.0}")),
                    pair.shovel_broker_cpu_us_per_msg.map_or("-".into(), |c| format!("{c:.1}")),
                    pair.gate_msgs_per_s,
                    pair.gate_cpu_us_per_msg,
                    pair.gate_broker_cpu_us_per_msg,
                    pair.gate_redis_cpu_us_per_msg,
                    pair.ratio.map_or("-".into(), |r| format!("{r:.2}")),
                    pair.gate_peak_rss_mib,
                    pair.redis_calls_per_msg,
                );
            }
            pairs.push(pair);
            }
        }
        Ok(())
    }
    .await;
    delete(&channel, &queues).await;
    result?;

    let mut ratios: Vec<f64> = pairs.iter().filter_map(|p| p.ratio).collect();
    let mut gate_rates: Vec<f64> = pairs.iter().map(|p| p.gate_msgs_per_s).collect();
    let mut shovel_rates: Vec<f64> = pairs.iter().filter_map(|p| p.shovel_msgs_per_s).collect();
    let mut cpu: Vec<f64> = pairs.iter().map(|p| p.gate_cpu_us_per_msg).collect();
    let peak_rss = pairs
        .iter()
        .map(|p| p.gate_peak_rss_mib)
        .fold(0.0, f64::max);
    let by_also: Vec<serde_json::Value> = args
        .also
        .iter()
        .map(|&also| {
            let runs: Vec<&Pair> = pairs.iter().filter(|p| p.also == also).collect();
            let mut rate: Vec<f64> = runs.iter().map(|p| p.gate_msgs_per_s).collect();
            let mut gate: Vec<f64> = runs.iter().map(|p| p.gate_cpu_us_per_msg).collect();
            let mut redis: Vec<f64> = runs.iter().map(|p| p.gate_redis_cpu_us_per_msg).collect();
            let mut broker: Vec<f64> = runs.iter().map(|p| p.gate_broker_cpu_us_per_msg).collect();
            serde_json::json!({
                "also": also,
                "median_gate_msgs_per_s": median(&mut rate),
                "median_gate_cpu_us_per_msg": median(&mut gate),
                "median_redis_cpu_us_per_msg": median(&mut redis),
                "median_broker_cpu_us_per_msg": median(&mut broker),
            })
        })
        .collect();
    let summary = serde_json::json!({
        "by_extra_limits": by_also,
        "messages": args.messages,
        "tenants": args.tenants,
        "channels": args.channels,
        "instances": args.instances,
        "prefetch": args.prefetch,
        "median_ratio_gate_over_shovel": if ratios.is_empty() { None } else { Some(median(&mut ratios)) },
        "median_gate_msgs_per_s": median(&mut gate_rates),
        "median_shovel_msgs_per_s": if shovel_rates.is_empty() { None } else { Some(median(&mut shovel_rates)) },
        "median_gate_cpu_us_per_msg": median(&mut cpu),
        "max_gate_peak_rss_mib": peak_rss,
        "pairs": pairs,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "median: gate {:.0} msg/s, shovel {}, gate/shovel {}, gate CPU {:.1} µs/msg, peak RSS {:.1} MiB",
            summary["median_gate_msgs_per_s"]
                .as_f64()
                .unwrap_or(f64::NAN),
            summary["median_shovel_msgs_per_s"]
                .as_f64()
                .map_or("-".into(), |v| format!("{v:.0} msg/s")),
            summary["median_ratio_gate_over_shovel"]
                .as_f64()
                .map_or("-".into(), |v| format!("{v:.2}")),
            summary["median_gate_cpu_us_per_msg"]
                .as_f64()
                .unwrap_or(f64::NAN),
            peak_rss,
        );
        if args.also.len() > 1 {
            for row in &by_also {
                println!(
                    "median with {} extra limit(s): {:.0} msg/s, gate {:.1} µs/msg, Redis {:.1} µs/msg, broker {:.1} µs/msg",
                    row["also"],
                    row["median_gate_msgs_per_s"].as_f64().unwrap_or(f64::NAN),
                    row["median_gate_cpu_us_per_msg"]
                        .as_f64()
                        .unwrap_or(f64::NAN),
                    row["median_redis_cpu_us_per_msg"]
                        .as_f64()
                        .unwrap_or(f64::NAN),
                    row["median_broker_cpu_us_per_msg"]
                        .as_f64()
                        .unwrap_or(f64::NAN),
                );
            }
        }
    }
    Ok(())
}

fn enable_shovel() -> Result<()> {
    let status = Command::new("rabbitmq-plugins")
        .args(["enable", "--quiet", "rabbitmq_shovel"])
        .stdout(std::process::Stdio::null())
        .status()
        .context(
            "running rabbitmq-plugins (the drain benchmark needs the broker on this machine)",
        )?;
    if !status.success() {
        bail!("`rabbitmq-plugins enable rabbitmq_shovel` failed");
    }
    Ok(())
}

fn rabbitmqctl(args: &[&str]) -> Result<()> {
    let status = Command::new("rabbitmqctl")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .context("running rabbitmqctl")?;
    if !status.success() {
        bail!("rabbitmqctl {args:?} failed");
    }
    Ok(())
}

/// Polls until `n` messages sit in the output queues; returns the time from the first
/// output to the last, so that neither side pays for its start-up.
pub async fn time_until_delivered(
    channel: &Channel,
    queues: &[&str],
    n: u64,
    limit: Duration,
) -> Result<Duration> {
    let deadline = Instant::now() + limit;
    let mut first: Option<Instant> = None;
    loop {
        let mut total = 0;
        for q in queues {
            total += depth(channel, q).await?;
        }
        let now = Instant::now();
        if total > 0 && first.is_none() {
            first = Some(now);
        }
        if total >= n {
            return Ok(now - first.unwrap_or(now));
        }
        if now > deadline {
            bail!("only {total} of {n} messages were delivered within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn time_shovel(
    channel: &Channel,
    queues: &Queues,
    amqp_url: &str,
    n: u64,
    i: usize,
) -> Result<f64> {
    let name = format!("{}-shovel-{i}", queues.inbound);
    let uri = amqp_url.split('?').next().unwrap_or(amqp_url);
    let definition = serde_json::json!({
        "src-protocol": "amqp091",
        "src-uri": uri,
        "src-queue": queues.inbound,
        "dest-protocol": "amqp091",
        "dest-uri": uri,
        "dest-queue": queues.orchestrator,
        "ack-mode": "on-confirm",
        "src-delete-after": "queue-length",
    })
    .to_string();
    rabbitmqctl(&["set_parameter", "shovel", &name, &definition])?;
    let elapsed = time_until_delivered(
        channel,
        &[&queues.orchestrator],
        n,
        Duration::from_secs(600),
    )
    .await;
    let _ = Command::new("rabbitmqctl")
        .args(["clear_parameter", "shovel", &name])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    let elapsed = elapsed?;
    Ok(n as f64 / elapsed.as_secs_f64())
}

struct GateRun {
    rate: f64,
    cpu: Duration,
    peak_rss: u64,
    redis_calls: u64,
}

async fn time_gate(
    channel: &Channel,
    queues: &Queues,
    settings: &GateSettings,
    n: u64,
    instances: usize,
    extra: &[(&str, String)],
) -> Result<GateRun> {
    let calls_before = redis_script_calls(&settings.redis_url).await?;
    let gates = (0..instances)
        .map(|_| GateProcess::spawn_with(settings, queues, extra))
        .collect::<Result<Vec<_>>>()?;
    let elapsed =
        time_until_delivered(channel, &queues.outputs(), n, Duration::from_secs(600)).await?;
    let cpu = gates.iter().map(GateProcess::cpu_time).sum();
    let peak_rss = gates.iter().map(GateProcess::peak_rss).max().unwrap_or(0);
    for gate in gates {
        gate.stop()?;
    }
    let calls = redis_script_calls(&settings.redis_url).await? - calls_before;
    Ok(GateRun {
        rate: n as f64 / elapsed.as_secs_f64(),
        cpu,
        peak_rss,
        redis_calls: calls,
    })
}
