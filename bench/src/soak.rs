//! Soak: a steady rate through one gate for a long time, its resident memory and open file
//! descriptors sampled every few seconds, printed and drawn. A leak shows as a slope in
//! bytes per message after the first minute (allocators and caches warm up in it).
//!
//! Scenarios exercise the long-lived paths: every message allowed, every message rejected
//! (the rejection cache and the notices), deferrals through the ladder, a Redis that goes
//! away and comes back under `on_redis_error = "hold"`, the broker closing the gate's
//! connections every few seconds, and the limits file rewritten every second.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use lapin::options::BasicConsumeOptions;
use lapin::types::{FieldTable, ShortString};
use plotters::prelude::*;
use serde::Serialize;

use crate::support::*;

/// `limits.max_defer_seconds` of the deferral scenario.
const DEFER_SECONDS: u64 = 30;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Limits high enough that every message is forwarded.
    Allowed,
    /// One message per key and hour: nearly every message is rejected.
    Rejected,
    /// `on_limit = "defer"`: over-limit messages park in the ladder and come back.
    Deferred,
    /// `on_redis_error = "hold"`, the gate's Redis killed and restarted every 20 s.
    RedisOutage,
    /// The broker closes the gate's connections every 5 s.
    Reconnects,
    /// The limits file rewritten (with a changed value) every second.
    Reload,
}

#[derive(clap::Args, Debug, Clone)]
pub struct SoakArgs {
    #[arg(long, value_enum, default_value = "allowed")]
    pub scenario: Scenario,
    /// Messages per second.
    #[arg(long, default_value_t = 3_000)]
    pub rate: u64,
    /// How long to publish.
    #[arg(long, default_value_t = 600)]
    pub seconds: u64,
    /// Seconds between samples of RSS and open file descriptors.
    #[arg(long, default_value_t = 5)]
    pub sample_every: u64,
    /// Distinct tenants (two channels each).
    #[arg(long, default_value_t = 500)]
    pub tenants: u64,
    /// The gate's `amqp.prefetch`.
    #[arg(long, default_value_t = 512)]
    pub prefetch: u16,
    /// Also read `/metrics` every this many seconds (as Prometheus would); never when 0.
    #[arg(long, default_value_t = 0)]
    pub scrape_every: u64,
    /// Where the chart (SVG) is written.
    #[arg(long)]
    pub chart: Option<PathBuf>,
}

#[derive(Serialize, Clone, Copy, Debug)]
struct Sample {
    seconds: f64,
    rss_mib: f64,
    open_fds: usize,
    published: u64,
    outputs: u64,
}

#[derive(Serialize, Debug)]
struct Report {
    scenario: Scenario,
    rate: u64,
    seconds: u64,
    published: u64,
    outputs: u64,
    rss_after_first_minute_mib: f64,
    rss_at_end_mib: f64,
    rss_max_mib: f64,
    growth_after_first_minute_mib: f64,
    /// Least-squares slope of RSS over messages published, after the first minute.
    slope_bytes_per_message: f64,
    open_fds_min: usize,
    open_fds_max: usize,
    /// Connections closed, Redis outages or reloads made, per the scenario.
    faults: usize,
    samples: Vec<Sample>,
}

pub async fn run(args: SoakArgs, amqp_url: String, redis_url: String, json: bool) -> Result<()> {
    if args.rate == 0 || args.sample_every == 0 {
        bail!("--rate and --sample-every must be at least 1");
    }
    let conn = connect(&amqp_url).await?;
    let channel = conn.create_channel().await?;
    let queues = Queues::unique("soak");
    declare(&channel, &queues).await?;

    let mut own_redis = match args.scenario {
        Scenario::RedisOutage => Some(RedisServers::standalone()?),
        _ => None,
    };
    let http_port = free_port()?;
    let requests = match args.scenario {
        Scenario::Rejected => 1,
        // A sixth of the messages is over the limit: it parks and comes back, and what
        // cannot fit within max_defer_seconds is rejected.
        Scenario::Deferred => (args.rate * 60 * 5 / (args.tenants * 2) / 6).max(1),
        _ => 1_000_000,
    };
    let settings = GateSettings {
        amqp_url: amqp_url.clone(),
        redis_url: own_redis
            .as_ref()
            .map_or(redis_url.clone(), |r| r.urls[0].clone()),
        redis_nodes: Vec::new(),
        http_listen: format!("127.0.0.1:{http_port}"),
        requests,
        window_seconds: if args.scenario == Scenario::Rejected {
            3_600
        } else {
            60
        },
        prefetch: args.prefetch,
        count_once: true,
    };
    let config_file = std::env::temp_dir().join(format!("{}.toml", queues.inbound));
    let mut extra: Vec<(&str, String)> = Vec::new();
    match args.scenario {
        Scenario::Deferred => {
            extra.push(("KONSTRUCT_GATE__LIMITS__ON_LIMIT", "defer".into()));
            extra.push((
                "KONSTRUCT_GATE__LIMITS__MAX_DEFER_SECONDS",
                DEFER_SECONDS.to_string(),
            ));
        }
        Scenario::RedisOutage => {
            extra.push(("KONSTRUCT_GATE__LIMITS__ON_REDIS_ERROR", "hold".into()));
        }
        Scenario::Reload => {
            write_limits(&config_file, requests)?;
            extra.push((
                "KONSTRUCT_GATE_CONFIG",
                config_file.to_string_lossy().into_owned(),
            ));
        }
        _ => {}
    }
    let gate = GateProcess::spawn_with(&settings, &queues, &extra)?;

    let outputs = Arc::new(AtomicU64::new(0));
    let mut consumers = Vec::new();
    for queue in queues.outputs() {
        let ch = conn.create_channel().await?;
        let mut consumer = ch
            .basic_consume(
                ShortString::from(queue),
                ShortString::from(format!("soak-{queue}")),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let outputs = outputs.clone();
        consumers.push(tokio::spawn(async move {
            while let Some(Ok(_)) = consumer.next().await {
                outputs.fetch_add(1, Ordering::Relaxed);
            }
        }));
        // The channel must outlive the consumer task.
        std::mem::forget(ch);
    }

    let published = Arc::new(AtomicU64::new(0));
    let publishing = {
        let conn = connect(&amqp_url).await?;
        let queue = queues.inbound.clone();
        let published = published.clone();
        let (rate, seconds, tenants) = (args.rate, args.seconds, args.tenants);
        tokio::spawn(async move {
            let mut publisher = FastPublisher::new(&conn, &queue, 2_000).await?;
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut i = 0u64;
            while started.elapsed() < Duration::from_secs(seconds) {
                tick.tick().await;
                let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
                while i < due {
                    let (tenant, channel) = key_of(i, tenants, &CHANNELS[..2]);
                    let sent = now_micros();
                    publisher
                        .publish(&realistic(i, tenant, channel, sent), properties(i, sent))
                        .await?;
                    i += 1;
                    published.store(i, Ordering::Relaxed);
                }
            }
            publisher.finish().await?;
            anyhow::Ok(conn)
        })
    };

    let started = Instant::now();
    let mut samples = Vec::new();
    let mut next_sample = Duration::ZERO;
    let mut next_scrape = Duration::ZERO;
    let mut next_fault = Duration::from_secs(20);
    let mut redis_down = false;
    let mut reloads = 0u64;
    // Broker connections of the gate closed (reconnects), Redis kills (outage).
    let mut closed = 0usize;
    let mut next_reload = Duration::from_secs(1);
    while started.elapsed() < Duration::from_secs(args.seconds) {
        let now = started.elapsed();
        if now >= next_sample {
            let sample = Sample {
                seconds: now.as_secs_f64(),
                rss_mib: gate.rss() as f64 / 1_048_576.0,
                open_fds: gate.open_fds(),
                published: published.load(Ordering::Relaxed),
                outputs: outputs.load(Ordering::Relaxed),
            };
            if !json {
                println!(
                    "{:>6.0} s  RSS {:>6.1} MiB  fds {:>3}  published {:>9}  outputs {:>9}",
                    sample.seconds,
                    sample.rss_mib,
                    sample.open_fds,
                    sample.published,
                    sample.outputs
                );
            }
            samples.push(sample);
            next_sample += Duration::from_secs(args.sample_every);
        }
        if args.scrape_every > 0 && now >= next_scrape {
            let _ = scrape(http_port, "konstruct_gate_ready");
            next_scrape += Duration::from_secs(args.scrape_every);
        }
        match args.scenario {
            Scenario::RedisOutage if now >= next_fault => {
                let redis = own_redis
                    .as_mut()
                    .expect("the outage scenario has its own Redis");
                if redis_down {
                    redis.restart(0)?;
                } else {
                    redis.kill(0);
                    closed += 1;
                }
                redis_down = !redis_down;
                next_fault += Duration::from_secs(20);
            }
            Scenario::Reconnects if now >= next_fault => {
                closed += close_connections_of(gate.pid()).await;
                next_fault += Duration::from_secs(5);
            }
            Scenario::Reload if now >= next_reload => {
                reloads += 1;
                write_limits(&config_file, requests - reloads % 2)?;
                next_reload += Duration::from_secs(1);
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if redis_down {
        own_redis.as_mut().expect("started above").restart(0)?;
    }
    let publisher_conn = publishing.await.context("the publisher panicked")??;
    let total = published.load(Ordering::Relaxed);
    // Whatever is still on its way gets a bounded moment (parked messages: their longest
    // wait more).
    let deadline = Instant::now() + Duration::from_secs(120 + DEFER_SECONDS);
    while outputs.load(Ordering::Relaxed) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut report = report(&args, total, outputs.load(Ordering::Relaxed), samples);
    report.faults = match args.scenario {
        Scenario::Reload => reloads as usize,
        _ => closed,
    };
    gate.stop()?;
    for c in consumers {
        c.abort();
    }
    delete(&channel, &queues).await;
    for seconds in [1, 2, 5, 10, 30, 60, 120, 300, 600] {
        let _ = channel
            .queue_delete(
                ShortString::from(format!("{}.defer.{seconds}s", queues.inbound)),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
    }
    let _ = std::fs::remove_file(&config_file);
    drop(publisher_conn);

    if let Some(path) = &args.chart {
        chart(&report, path)?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{:?}: {} published, {} outputs, {} faults; RSS {:.1} MiB after the first minute, {:.1} MiB at the end (max {:.1}), {:+.1} MiB, slope {:.2} bytes/message; open fds {}..{}",
            report.scenario,
            report.published,
            report.outputs,
            report.faults,
            report.rss_after_first_minute_mib,
            report.rss_at_end_mib,
            report.rss_max_mib,
            report.growth_after_first_minute_mib,
            report.slope_bytes_per_message,
            report.open_fds_min,
            report.open_fds_max,
        );
    }
    if report.outputs < report.published {
        bail!(
            "{} messages published, only {} outputs seen",
            report.published,
            report.outputs
        );
    }
    Ok(())
}

fn report(args: &SoakArgs, published: u64, outputs: u64, samples: Vec<Sample>) -> Report {
    let warm: Vec<&Sample> = samples.iter().filter(|s| s.seconds >= 60.0).collect();
    let first = warm.first().copied().or(samples.first());
    let last = samples.last();
    // Least squares of RSS (bytes) over messages published.
    let n = warm.len() as f64;
    let (mx, my) = warm.iter().fold((0.0, 0.0), |(x, y), s| {
        (x + s.published as f64 / n, y + s.rss_mib * 1_048_576.0 / n)
    });
    let (sxy, sxx) = warm.iter().fold((0.0, 0.0), |(sxy, sxx), s| {
        let dx = s.published as f64 - mx;
        (sxy + dx * (s.rss_mib * 1_048_576.0 - my), sxx + dx * dx)
    });
    Report {
        scenario: args.scenario,
        rate: args.rate,
        seconds: args.seconds,
        published,
        outputs,
        rss_after_first_minute_mib: first.map_or(0.0, |s| s.rss_mib),
        rss_at_end_mib: last.map_or(0.0, |s| s.rss_mib),
        rss_max_mib: samples.iter().map(|s| s.rss_mib).fold(0.0, f64::max),
        growth_after_first_minute_mib: match (first, last) {
            (Some(f), Some(l)) => l.rss_mib - f.rss_mib,
            _ => 0.0,
        },
        slope_bytes_per_message: if sxx > 0.0 { sxy / sxx } else { 0.0 },
        open_fds_min: samples.iter().map(|s| s.open_fds).min().unwrap_or(0),
        open_fds_max: samples.iter().map(|s| s.open_fds).max().unwrap_or(0),
        faults: 0,
        samples,
    }
}

/// The limits file of the reload scenario.
fn write_limits(path: &std::path::Path, requests: u64) -> Result<()> {
    // Written aside and renamed, as a ConfigMap update swaps its file. The environment
    // sets the defaults (and wins over a file), so what changes is an override.
    let aside = path.with_extension("toml.new");
    std::fs::write(
        &aside,
        format!("[limits]\noverrides = [{{ tenant = \"tenant-0\", requests = {requests} }}]\n"),
    )?;
    std::fs::rename(&aside, path)?;
    Ok(())
}

/// Closes the broker connections of the gate process `pid` (the name each gives in its
/// client properties ends with `<host>-<pid>`); returns how many.
async fn close_connections_of(pid: u32) -> usize {
    let named = format!("-{pid}\"");
    let listed = tokio::process::Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "--no-table-headers"])
        .args(["pid", "client_properties"])
        .output()
        .await;
    let Ok(listed) = listed else { return 0 };
    let mut closed = 0;
    for line in String::from_utf8_lossy(&listed.stdout).lines() {
        if !(line.contains("konstruct-gate") && line.contains(&named)) {
            continue;
        }
        let Some((conn_pid, _)) = line.split_once('\t') else {
            continue;
        };
        let done = tokio::process::Command::new("rabbitmqctl")
            .args(["close_connection", conn_pid, "soak: reconnect"])
            .output()
            .await;
        closed += usize::from(done.is_ok_and(|out| out.status.success()));
    }
    closed
}

/// A panel's title, its unit, and the figure it shows.
type Panel = (&'static str, &'static str, fn(&Sample) -> f64);

/// RSS (MiB) and open file descriptors over minutes, one panel each.
fn chart(report: &Report, path: &std::path::Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let root = SVGBackend::new(path, (900, 320)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 2));
    let minutes = report.seconds as f64 / 60.0;
    let series: [Panel; 2] = [
        ("Gate RSS", "MiB", |s| s.rss_mib),
        ("Open file descriptors", "fds", |s| s.open_fds as f64),
    ];
    for (panel, (title, unit, value)) in panels.iter().zip(series) {
        let top = report.samples.iter().map(value).fold(0.0, f64::max) * 1.25;
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("{title} ({:?}, {} msg/s)", report.scenario, report.rate),
                ("sans-serif", 16),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..minutes.max(0.1), 0.0..top.max(1.0))?;
        chart
            .configure_mesh()
            .x_desc("minutes")
            .y_desc(unit)
            .draw()?;
        chart.draw_series(LineSeries::new(
            report.samples.iter().map(|s| (s.seconds / 60.0, value(s))),
            BLUE.stroke_width(2),
        ))?;
    }
    root.present()?;
    Ok(())
}
