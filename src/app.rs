//! The application: everything a `run` starts, built from one configuration, so tests
//! start exactly what the binary runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::amqp::Brokers;
use crate::config::{Config, RedisMode, SecretUrl};
use crate::health::Health;
use crate::limit::live::{MARKER_PREFIX, OVERRIDES_KEY, RESETS_CHANNEL, parse_overrides};
use crate::limit::{Limiter, LiveRules};
use crate::pipeline::Pipeline;
use crate::session::Gate;
use crate::telemetry::Metrics;

/// How often readiness asks Redis whether it answers.
const REDIS_PROBE_INTERVAL: Duration = Duration::from_secs(1);

pub struct Application {
    config: Arc<Config>,
    /// The file `[limits]` is reloaded from on SIGHUP or when it changes.
    config_path: Option<PathBuf>,
    listener: TcpListener,
    limiter: Limiter,
    brokers: Brokers,
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
    #[error("cannot set up the broker client: {0}")]
    Broker(#[from] crate::config::ConfigError),
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
        let brokers = Brokers::new(&config.amqp)?;
        let health = Arc::new(Health::default());
        health.set_stall(Duration::from_secs(config.http.stall_seconds));
        Ok(Self {
            config: Arc::new(config),
            config_path: None,
            listener,
            limiter,
            brokers,
            metrics,
            health,
        })
    }

    /// Reload `[limits]` from `path` on SIGHUP and whenever the file changes.
    pub fn reload_from(mut self, path: Option<PathBuf>) -> Self {
        self.config_path = path;
        self
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
            amqp = %join(self.config.amqp.addresses().into_iter().map(|(_, url)| url)),
            redis = %match self.config.redis.mode {
                RedisMode::Standalone => self.config.redis.url.to_string(),
                RedisMode::Cluster => format!("cluster {}", join(self.config.redis.nodes.iter())),
                RedisMode::Sentinel => format!("sentinel {}", join(self.config.redis.sentinels.iter())),
            },
            http = %self.http_addr(),
            "konstruct-gate starting"
        );
        tasks.spawn(crate::http::serve(
            self.listener,
            self.health.clone(),
            background.clone(),
        ));
        tasks.spawn(probe_redis(
            self.config.clone(),
            self.limiter.clone(),
            self.health.clone(),
            self.metrics.clone(),
            background.clone(),
        ));
        let rules = Arc::new(LiveRules::new(&self.config.limits));
        tasks.spawn(keep_limits_live(
            self.config.clone(),
            self.config_path.clone(),
            rules.clone(),
            self.limiter.clone(),
            background.clone(),
        ));
        tasks.spawn(hear_resets(
            self.config.clone(),
            rules.clone(),
            self.limiter.clone(),
            background.clone(),
        ));
        let pipeline = Pipeline::new(
            self.config.clone(),
            rules,
            self.limiter,
            self.metrics.clone(),
            self.health.clone(),
        );
        let gate = Gate::new(
            self.config,
            pipeline,
            self.metrics,
            self.health,
            self.brokers,
        );
        gate.run(shutdown).await;
        background.cancel();
        tasks.close();
        tasks.wait().await;
        info!("konstruct-gate stopped");
    }
}

/// How long a lost subscription waits before it subscribes again.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);

/// Listens for `limits reset` on Redis's resets channel and makes the gate forget its
/// cached rejections at once (the reset counter in the overrides hash is the fallback,
/// read with the overrides). Subscribes again after a lost connection.
async fn hear_resets(
    config: Arc<Config>,
    rules: Arc<LiveRules>,
    limiter: Limiter,
    stop: CancellationToken,
) {
    use futures::StreamExt;
    let channel = format!("{}{RESETS_CHANNEL}", config.redis.key_prefix);
    loop {
        let listen = async {
            let client = limiter.subscriber().await?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            let mut messages = pubsub.on_message();
            while messages.next().await.is_some() {
                info!("a window was reset: cached rejections forgotten");
                rules.forget_cached();
            }
            redis::RedisResult::Ok(())
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            ended = listen => {
                if let Err(e) = ended {
                    tracing::debug!(error = %config.scrub(&e.to_string()), "cannot hear resets; subscribing again");
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RESUBSCRIBE_AFTER) => {}
        }
    }
}

/// Redacted URLs, comma-separated.
fn join<'a>(urls: impl Iterator<Item = &'a SecretUrl>) -> String {
    urls.map(SecretUrl::to_string).collect::<Vec<_>>().join(",")
}

/// Asks Redis every second whether it answers, and publishes readiness as a gauge.
async fn probe_redis(
    config: Arc<Config>,
    limiter: Limiter,
    health: Arc<Health>,
    metrics: Metrics,
    stop: CancellationToken,
) {
    loop {
        let outcome = limiter.ping().await.map_err(|e| config.scrub(&e));
        let new_error = health.set_redis_probe(outcome.clone());
        if let Err(error) = outcome
            && new_error
        {
            warn!(%error, "redis does not answer; not ready until it does");
        }
        metrics.ready.set(if health.ready() { 1.0 } else { 0.0 });
        tokio::select! {
            _ = tokio::time::sleep(REDIS_PROBE_INTERVAL) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// How often the configuration file's modification time is looked at.
const FILE_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Reloads `[limits]` from the file on SIGHUP or when it changes, and reads the Redis
/// overrides hash every `limits.redis_overrides_refresh_ms`. Every key of `[limits]`
/// applies on reload; a changed key of another section is named in one warning, since it
/// needs a restart. A file that does not load is refused with one log line, and the
/// limits in force stay.
async fn keep_limits_live(
    config: Arc<Config>,
    path: Option<PathBuf>,
    rules: Arc<LiveRules>,
    limiter: Limiter,
    stop: CancellationToken,
) {
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => Some(hangup),
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGHUP; the file is still watched");
            None
        }
    };
    // The file as it is now. Kubernetes updates a mounted ConfigMap by swapping a symlink
    // (`..data`) to a new directory: the path stays, the file behind it is another one, so
    // its inode counts as much as its modification time.
    let modified = |p: &PathBuf| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.modified().ok(), m.ino(), m.dev(), m.len()))
    };
    let mut last_modified = path.as_ref().and_then(modified);
    let mut file_poll = tokio::time::interval(FILE_POLL_INTERVAL);
    let mut in_force = (*config).clone();
    let overrides_poll = |refresh_ms: u64| {
        let mut poll = tokio::time::interval(Duration::from_millis(refresh_ms.max(1)));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll
    };
    let mut redis_poll = overrides_poll(in_force.limits.redis_overrides_refresh_ms);
    let overrides_key = format!("{}{OVERRIDES_KEY}", config.redis.key_prefix);
    let mut last_redis_errors: Vec<String> = Vec::new();
    let mut last_resets: Option<Vec<String>> = None;
    loop {
        let refresh_ms = in_force.limits.redis_overrides_refresh_ms;
        let reload = tokio::select! {
            _ = stop.cancelled() => return,
            Some(()) = async { hangup.as_mut()?.recv().await } => {
                info!("SIGHUP: reloading limits");
                true
            }
            _ = file_poll.tick(), if path.is_some() => {
                let now = path.as_ref().and_then(modified);
                let changed = now != last_modified;
                last_modified = now;
                if changed {
                    info!("configuration file changed: reloading limits");
                }
                changed
            }
            _ = redis_poll.tick(), if refresh_ms > 0 => {
                match limiter.hash(&overrides_key).await {
                    Ok(entries) => {
                        let mut resets: Vec<String> = entries
                            .iter()
                            .filter(|(field, _)| field.starts_with(MARKER_PREFIX))
                            .map(|(field, value)| format!("{field}={value}"))
                            .collect();
                        resets.sort();
                        // A new reset marker (the first read at start-up aside): forget
                        // every cached rejection, so the fresh window shows at once.
                        if last_resets.as_ref().is_some_and(|last| *last != resets) {
                            info!("a window was reset: forgetting cached rejections");
                            rules.forget_cached();
                        }
                        last_resets = Some(resets);
                        let (overrides, errors) = parse_overrides(
                            entries,
                            &rules.redis_overrides(),
                            &rules.file_also(),
                        );
                        if errors != last_redis_errors {
                            for e in &errors {
                                warn!(key = %overrides_key, "{e}; skipped, the rule in force stays");
                            }
                            last_redis_errors = errors;
                        }
                        let count = overrides.len();
                        if rules.set_redis_overrides(overrides) {
                            info!(overrides = count, "live overrides from Redis applied");
                        }
                    }
                    Err(e) => {
                        let error = config.scrub(&e.to_string());
                        warn!(%error, "cannot read live overrides; keeping the current ones");
                    }
                }
                false
            }
        };
        if !reload {
            continue;
        }
        let Some(path) = &path else {
            warn!("no configuration file to reload: start with --config to use SIGHUP");
            continue;
        };
        let new = match Config::load(Some(path)) {
            Ok(new) => new,
            Err(e) => {
                error!(file = %path.display(), "configuration reload refused, the limits in force stay: {e}");
                continue;
            }
        };
        let changed = in_force.changed_keys(&new);
        let (limits, others): (Vec<String>, Vec<String>) =
            changed.into_iter().partition(|k| k.starts_with("limits."));
        if !others.is_empty() {
            warn!(keys = ?others, "configuration keys outside [limits] changed; they apply at the next start");
        }
        if limits.is_empty() {
            info!(file = %path.display(), "limits reloaded: nothing changed");
            continue;
        }
        if new.limits.redis_overrides_refresh_ms != refresh_ms {
            redis_poll = overrides_poll(new.limits.redis_overrides_refresh_ms);
        }
        rules.set_file_limits(new.limits.clone());
        in_force.limits = new.limits;
        info!(file = %path.display(), changed = ?limits, "limits reloaded");
    }
}
