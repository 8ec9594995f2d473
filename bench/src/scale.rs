//! How the gate's cost grows, each figure from one run on this machine:
//!
//! - a Redis Cluster of three primaries against one Redis server, alternating drains of the
//!   same messages (msgs/s, script calls per message and per batch, Redis CPU per message);
//! - 1,000 to 1,000,000 distinct (tenant, channel) keys on one server (msgs/s, gate RSS,
//!   Redis memory per key), drawn as a chart.
//!
//! The Redis servers are the benchmark's own (free ports, a temporary directory, stopped
//! however it ends), so their CPU, memory and script calls are the gate's alone.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use lapin::Channel;
use plotters::prelude::*;
use serde::Serialize;

use crate::drain::time_until_delivered;
use crate::support::*;

#[derive(clap::Args, Debug, Clone)]
pub struct ScaleArgs {
    /// Messages per drain when comparing the cluster with one server.
    #[arg(long, default_value_t = 100_000)]
    pub messages: u64,
    /// Distinct (tenant, channel) keys when comparing the cluster with one server.
    #[arg(long, default_value_t = 1_000)]
    pub tenants: u64,
    /// Standalone/cluster pairs to alternate.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Distinct keys for the growth runs, each drained with at least one message per key.
    #[arg(long, value_delimiter = ',', default_value = "1000,100000,1000000")]
    pub keys: Vec<u64>,
    /// Fewest messages of a growth run (runs with fewer keys repeat them).
    #[arg(long, default_value_t = 100_000)]
    pub min_messages: u64,
    /// The gates' `amqp.prefetch`.
    #[arg(long, default_value_t = 1000)]
    pub prefetch: u16,
    /// Where the growth chart (SVG) is written.
    #[arg(long, default_value = "docs/key-growth.svg")]
    pub chart: PathBuf,
    /// Skip the cluster comparison.
    #[arg(long)]
    pub no_cluster: bool,
    /// Skip the growth runs.
    #[arg(long)]
    pub no_growth: bool,
}

#[derive(Serialize, Debug)]
struct Drain {
    redis: &'static str,
    keys: u64,
    messages: u64,
    msgs_per_s: f64,
    gate_cpu_us_per_msg: f64,
    gate_peak_rss_mib: f64,
    redis_cpu_us_per_msg: f64,
    script_calls_per_msg: f64,
    script_calls_per_batch: f64,
    redis_bytes_per_key: f64,
}

pub async fn run(args: ScaleArgs, amqp_url: String, json: bool) -> Result<()> {
    let conn = connect(&amqp_url).await?;
    let channel = conn.create_channel().await?;
    let mut drains = Vec::new();
    if !args.no_cluster {
        let single = RedisServers::standalone()?;
        let cluster = RedisServers::cluster(3)?;
        for round in 0..args.rounds {
            for servers in [&single, &cluster] {
                let d = drain(
                    &conn,
                    &channel,
                    &amqp_url,
                    servers,
                    args.messages,
                    args.tenants,
                    args.prefetch,
                )
                .await?;
                if !json {
                    print_drain(&format!("round {}", round + 1), &d);
                }
                drains.push(d);
            }
        }
    }
    let mut growth = Vec::new();
    if !args.no_growth {
        for &keys in &args.keys {
            // A fresh server for each size: its memory is the keys' alone.
            let servers = RedisServers::standalone()?;
            let messages = keys.max(args.min_messages);
            let d = drain(
                &conn,
                &channel,
                &amqp_url,
                &servers,
                messages,
                keys,
                args.prefetch,
            )
            .await?;
            if !json {
                print_drain("growth", &d);
            }
            growth.push(d);
        }
        if !growth.is_empty() {
            chart(&growth, &args.chart)?;
            if !json {
                println!("chart: {}", args.chart.display());
            }
        }
    }
    if json {
        let summary = serde_json::json!({ "cluster_vs_standalone": drains, "growth": growth });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(())
}

fn print_drain(label: &str, d: &Drain) {
    println!(
        "{label}: {:<10} {:>9} keys {:>9} msgs | {:>6.0} msg/s | gate {:>5.1} µs/msg, RSS {:>5.1} MiB | redis {:>5.1} µs/msg, {:>6.1} B/key | script calls {:.3}/msg {:.1}/batch",
        d.redis,
        d.keys,
        d.messages,
        d.msgs_per_s,
        d.gate_cpu_us_per_msg,
        d.gate_peak_rss_mib,
        d.redis_cpu_us_per_msg,
        d.redis_bytes_per_key,
        d.script_calls_per_msg,
        d.script_calls_per_batch,
    );
}

/// Fills a fresh inbound queue with `messages` over `keys` (tenant, channel) keys, then
/// times one gate draining it against `servers`.
async fn drain(
    conn: &lapin::Connection,
    channel: &Channel,
    amqp_url: &str,
    servers: &RedisServers,
    messages: u64,
    keys: u64,
    prefetch: u16,
) -> Result<Drain> {
    let queues = Queues::unique("scale");
    declare(channel, &queues).await?;
    let result = async {
        fill(conn, &queues.inbound, messages, keys, &CHANNELS[..1]).await?;
        let before = servers.stats()?;
        let http = free_port()?;
        let settings = GateSettings {
            amqp_url: amqp_url.to_owned(),
            redis_url: servers.urls[0].clone(),
            redis_nodes: if servers.cluster {
                servers.urls.clone()
            } else {
                Vec::new()
            },
            http_listen: format!("127.0.0.1:{http}"),
            requests: 1_000_000,
            window_seconds: 600,
            prefetch,
            count_once: true,
        };
        let gate = GateProcess::spawn(&settings, &queues)?;
        let elapsed = time_until_delivered(
            channel,
            &queues.outputs(),
            messages,
            Duration::from_secs(900),
        )
        .await?;
        let batches = scrape(http, "konstruct_gate_redis_check_seconds_count").unwrap_or(0.0);
        let cpu = gate.cpu_time();
        let rss = gate.peak_rss();
        gate.stop()?;
        let after = servers.stats()?;
        let per_msg = |d: Duration| d.as_secs_f64() * 1e6 / messages as f64;
        let calls = after.script_calls.saturating_sub(before.script_calls) as f64;
        Ok(Drain {
            redis: if servers.cluster {
                "cluster-3"
            } else {
                "standalone"
            },
            keys,
            messages,
            msgs_per_s: messages as f64 / elapsed.as_secs_f64(),
            gate_cpu_us_per_msg: per_msg(cpu),
            gate_peak_rss_mib: rss as f64 / (1024.0 * 1024.0),
            redis_cpu_us_per_msg: per_msg(after.cpu.saturating_sub(before.cpu)),
            script_calls_per_msg: calls / messages as f64,
            script_calls_per_batch: if batches > 0.0 {
                calls / batches
            } else {
                f64::NAN
            },
            redis_bytes_per_key: (after.used_memory as f64 - before.used_memory as f64)
                / keys as f64,
        })
    }
    .await;
    delete(channel, &queues).await;
    result
}

/// A panel's title, its unit, and the figure it shows.
type Panel = (&'static str, &'static str, fn(&Drain) -> f64);

/// Three panels over the number of keys (log scale): msgs/s, gate RSS, Redis bytes per key.
fn chart(growth: &[Drain], path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let root = SVGBackend::new(path, (1200, 380)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 3));
    let min_keys = growth.iter().map(|d| d.keys).min().unwrap_or(1) as f64;
    let max_keys = growth.iter().map(|d| d.keys).max().unwrap_or(1) as f64;
    let series: [Panel; 3] = [
        ("Throughput", "msg/s", |d| d.msgs_per_s),
        ("Gate peak RSS", "MiB", |d| d.gate_peak_rss_mib),
        ("Redis memory per key", "bytes", |d| d.redis_bytes_per_key),
    ];
    for (panel, (title, unit, value)) in panels.iter().zip(series) {
        let top = growth.iter().map(value).fold(0.0, f64::max) * 1.2;
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(
                (min_keys / 2.0..max_keys * 2.0).log_scale(),
                0.0..top.max(1.0),
            )?;
        chart
            .configure_mesh()
            .x_desc("distinct (tenant, channel) keys")
            .y_desc(unit)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        let points: Vec<(f64, f64)> = growth.iter().map(|d| (d.keys as f64, value(d))).collect();
        chart.draw_series(LineSeries::new(points.clone(), BLUE.stroke_width(2)))?;
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, BLUE.filled())))?;
    }
    root.present()?;
    Ok(())
}
