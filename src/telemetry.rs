//! Logs and metrics: the tracing subscriber, and every metric name in one place.

use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

pub const MESSAGES_TOTAL: &str = "konstruct_gate_messages_total";
pub const REDIS_CHECK_SECONDS: &str = "konstruct_gate_redis_check_seconds";
pub const PUBLISH_CONFIRM_SECONDS: &str = "konstruct_gate_publish_confirm_seconds";
pub const IN_FLIGHT: &str = "konstruct_gate_messages_in_flight";
pub const HELD: &str = "konstruct_gate_messages_held";
pub const READY: &str = "konstruct_gate_ready";
pub const REDIS_ERRORS_TOTAL: &str = "konstruct_gate_redis_errors_total";
pub const DEGRADED_TOTAL: &str = "konstruct_gate_degraded_total";
pub const PUBLISH_FAILURES_TOTAL: &str = "konstruct_gate_publish_failures_total";
pub const AMQP_RECONNECTS_TOTAL: &str = "konstruct_gate_amqp_reconnects_total";
pub const FLOW_BLOCKED: &str = "konstruct_gate_publish_blocked";
pub const BATCH_SIZE: &str = "konstruct_gate_batch_size";
pub const SHADOW_REJECTIONS_TOTAL: &str = "konstruct_gate_shadow_rejections_total";
pub const NEAR_LIMIT_TOTAL: &str = "konstruct_gate_near_limit_total";
pub const LOCAL_REJECTIONS_TOTAL: &str = "konstruct_gate_local_rejections_total";
/// Units reserved in a Redis Cluster's tenant budgets and given back (the message was
/// not let through).
pub const BUDGET_REFUNDS_TOTAL: &str = "konstruct_gate_budget_refunds_total";
/// Messages waiting in each step of the defer ladder (label `step`, e.g. `5s`).
pub const PARKED: &str = "konstruct_gate_messages_parked";

/// How often histogram samples are folded into their buckets when nobody scrapes.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the log subscriber once per process; later calls are no-ops.
pub fn init_tracing(config: &LogConfig) {
    let filter = EnvFilter::try_new(&config.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match config.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// The process-wide Prometheus recorder. Installed on first use, so tests that start
/// several gates in one process share it.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let latency_buckets = [
            0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ];
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(REDIS_CHECK_SECONDS.into()), &latency_buckets)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(PUBLISH_CONFIRM_SECONDS.into()),
                    &latency_buckets,
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(BATCH_SIZE.into()),
                    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
                )
            })
            .expect("bucket lists are not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Histogram samples wait in the recorder until they are folded into the buckets,
        // which only a scrape or an upkeep does: unscraped, every message would leave a
        // few bytes behind for good. One thread folds them in every few seconds.
        let upkeep = handle.clone();
        let _ = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP_INTERVAL);
                    upkeep.run_upkeep();
                }
            });
        // Another recorder may already be installed (an embedding application): then the
        // gate's metrics go there and /metrics renders an empty page.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Handles to every metric the hot path touches, resolved once so that recording is an
/// atomic add rather than a registry lookup.
#[derive(Clone)]
pub struct Metrics {
    pub allowed: Counter,
    pub rejected: Counter,
    /// Rejections nobody is told about, acked without a notice (`quiet_rejections = "drop"`).
    pub rejected_quiet: Counter,
    pub deferred: Counter,
    /// Acked without an output: a redelivery whose output was already confirmed.
    pub duplicate: Counter,
    pub invalid: Counter,
    pub redis_check_seconds: Histogram,
    pub publish_confirm_seconds: Histogram,
    /// Deliveries received and not yet settled with the broker, from the ack tracker.
    pub in_flight: Gauge,
    /// Deliveries whose checks wait for Redis (`on_redis_error = hold`).
    pub held: Gauge,
    /// 1 while `/readyz` would answer 200.
    pub ready: Gauge,
    pub redis_errors: Counter,
    pub degraded: Counter,
    pub publish_failures: Counter,
    pub amqp_reconnects: Counter,
    pub publish_blocked: Gauge,
    pub batch_size: Histogram,
    pub shadow_rejections: Counter,
    pub near_limit: Counter,
    pub local_rejections: Counter,
    pub budget_refunds: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        prometheus();
        let metrics = Self {
            allowed: counter!(MESSAGES_TOTAL, "outcome" => "allowed"),
            rejected: counter!(MESSAGES_TOTAL, "outcome" => "rejected"),
            rejected_quiet: counter!(MESSAGES_TOTAL, "outcome" => "rejected_quiet"),
            deferred: counter!(MESSAGES_TOTAL, "outcome" => "deferred"),
            duplicate: counter!(MESSAGES_TOTAL, "outcome" => "duplicate"),
            invalid: counter!(MESSAGES_TOTAL, "outcome" => "invalid"),
            redis_check_seconds: histogram!(REDIS_CHECK_SECONDS),
            publish_confirm_seconds: histogram!(PUBLISH_CONFIRM_SECONDS),
            in_flight: gauge!(IN_FLIGHT),
            held: gauge!(HELD),
            ready: gauge!(READY),
            redis_errors: counter!(REDIS_ERRORS_TOTAL),
            degraded: counter!(DEGRADED_TOTAL),
            publish_failures: counter!(PUBLISH_FAILURES_TOTAL),
            amqp_reconnects: counter!(AMQP_RECONNECTS_TOTAL),
            publish_blocked: gauge!(FLOW_BLOCKED),
            batch_size: histogram!(BATCH_SIZE),
            shadow_rejections: counter!(SHADOW_REJECTIONS_TOTAL),
            near_limit: counter!(NEAR_LIMIT_TOTAL),
            local_rejections: counter!(LOCAL_REJECTIONS_TOTAL),
            budget_refunds: counter!(BUDGET_REFUNDS_TOTAL),
        };
        // Make every series visible from the first scrape, before any traffic.
        for c in [
            &metrics.allowed,
            &metrics.rejected,
            &metrics.rejected_quiet,
            &metrics.deferred,
            &metrics.duplicate,
            &metrics.invalid,
            &metrics.redis_errors,
            &metrics.degraded,
            &metrics.publish_failures,
            &metrics.amqp_reconnects,
            &metrics.shadow_rejections,
            &metrics.near_limit,
            &metrics.local_rejections,
        ] {
            c.increment(0);
        }
        metrics.in_flight.increment(0.0);
        metrics.held.increment(0.0);
        metrics.ready.increment(0.0);
        metrics.publish_blocked.set(0.0);
        metrics
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
