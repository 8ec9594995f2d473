//! The application: everything a `run` starts, built from one configuration, so tests
//! start exactly what the binary runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::config::Config;
use crate::gate::{Gate, Health};
use crate::limit::Limiter;
use crate::telemetry::Metrics;

/// How often readiness asks Redis whether it answers.
const REDIS_PROBE_INTERVAL: Duration = Duration::from_secs(1);

pub struct Application {
    config: Arc<Config>,
    listener: TcpListener,
    limiter: Limiter,
    metrics: Metrics,
    health: Arc<Health>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot set up the Redis client: {0}")]
    Redis(#[from] crate::limit::LimitError),
}

impl Application {
    /// Binds the HTTP listener and prepares the Redis client; connects to nothing yet.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let metrics = Metrics::new();
        let listener = TcpListener::bind(config.http.listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: config.http.listen,
                source,
            })?;
        let limiter = Limiter::new(&config.redis, metrics.clone())?;
        Ok(Self {
            config: Arc::new(config),
            listener,
            limiter,
            metrics,
            health: Arc::new(Health::default()),
        })
    }

    /// The address `/healthz`, `/readyz` and `/metrics` are served on.
    pub fn http_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Runs until `shutdown` is cancelled and every in-flight message is finished or
    /// handed back.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) {
        let tasks = TaskTracker::new();
        let background = CancellationToken::new();
        info!(
            amqp = %self.config.amqp.url,
            redis = %self.config.redis.url,
            http = %self.http_addr(),
            "konstruct-gate starting"
        );
        tasks.spawn(crate::http::serve(
            self.listener,
            self.health.clone(),
            background.clone(),
        ));
        tasks.spawn(probe_redis(
            self.limiter.clone(),
            self.health.clone(),
            background.clone(),
        ));
        let gate = Gate::new(self.config, self.limiter, self.metrics, self.health);
        gate.run(shutdown).await;
        background.cancel();
        tasks.close();
        tasks.wait().await;
        info!("konstruct-gate stopped");
    }
}

async fn probe_redis(limiter: Limiter, health: Arc<Health>, stop: CancellationToken) {
    loop {
        let ok = limiter.ping().await;
        health.redis_ok.store(ok, Ordering::Relaxed);
        tokio::select! {
            _ = tokio::time::sleep(REDIS_PROBE_INTERVAL) => {}
            _ = stop.cancelled() => return,
        }
    }
}
