//! The way to Redis in each of its shapes: one server, a Redis Cluster, or the primary that
//! Sentinel names. The checks see one connection type; the store knows which node to ask.
//!
//! - Standalone: one multiplexed connection that re-establishes itself.
//! - Cluster: the redis crate's cluster connection, which follows MOVED, ASK and TRYAGAIN
//!   while slots move, and learns a new primary after a failover.
//! - Sentinel: a standalone connection to the primary the sentinels name. The redis crate
//!   does not follow a failover by itself, so every failed call asks the sentinels again
//!   (at most twice a second), and a new primary gets a new connection.
//!
//! A connection can die silently (a NAT entry expires, a node behind a virtual IP goes
//! away): nothing errors, calls just time out, and the redis crate keeps the connection
//! forever. So a call that goes unanswered (a timeout, a broken connection) has the
//! connection replaced by a fresh one, at most once per `REPLACE_PAUSE`, in every mode;
//! an error that Redis answers (OOM, TRYAGAIN, READONLY) says the connection works, and
//! keeps it. Every socket has TCP keepalive and no Nagle delay.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
pub use redis::io::tcp::socket2::SockRef;
use redis::io::tcp::{TcpSettings, socket2};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    Client, ClientTlsConfig, Cmd, IntoConnectionInfo, Pipeline, RedisError, RedisFuture,
    RedisResult, TlsCertificates, TlsMode, Value,
};

use crate::config::{ConfigError, RedisConfig, RedisMode, TlsPem};

/// How long the sentinels are left alone after they were asked.
const RESOLVE_PAUSE: Duration = Duration::from_millis(500);
/// How long the reason Redis cannot be reached is reused before it is asked again.
const DIAGNOSE_PAUSE: Duration = Duration::from_secs(10);
/// How long a connection is kept after it was replaced for going unanswered.
const REPLACE_PAUSE: Duration = Duration::from_secs(1);
/// The same for a cluster connection.
const CLUSTER_REPLACE_PAUSE: Duration = Duration::from_secs(2);
/// How often a call waiting for its connection to be replaced looks.
const REPLACED_POLL: Duration = Duration::from_millis(20);

/// How a call failed, which decides what the store does about its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No answer in time: the connection may be silently dead while a fresh one would
    /// answer, so it is replaced (in a cluster, once calls have gone unanswered for
    /// [`CLUSTER_UNANSWERED_GRACE`]: one slow node or a slot on the move is not a dead
    /// connection).
    Unanswered,
    /// The connection broke or was refused: replaced.
    Broken,
    /// Redis answered with an error (OOM, READONLY, TRYAGAIN): the connection works.
    Refused,
}

impl Failure {
    pub fn of(error: &RedisError) -> Self {
        // Not `is_unrecoverable_error`: a refused password is an answer, and a new
        // connection would be refused the same way.
        if error.is_timeout() {
            Failure::Unanswered
        } else if error.is_io_error()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
        {
            Failure::Broken
        } else {
            Failure::Refused
        }
    }
}

/// How long one call to a cluster may take in all while its slot moves (redirects, a new
/// slot map, TRYAGAIN): each node still answers within `redis.timeout_ms`.
pub const CLUSTER_CALL_BUDGET: Duration = Duration::from_secs(5);
/// How long one try of such a call may take (the client's own redirects and retries): a
/// try caught behind a new slot map is made again, within the budget.
pub const CLUSTER_CALL_TRY: Duration = Duration::from_secs(1);

/// How long calls to a cluster go unanswered before its connection is replaced.
const CLUSTER_UNANSWERED_GRACE: Duration = Duration::from_secs(1);

/// Keepalive probes for every socket to Redis and to the broker: an idle connection whose
/// peer vanished without a word is noticed by the kernel within about 25 s.
pub fn tcp_keepalive() -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5))
        .with_retries(3)
}

/// How long sent data may stay unacknowledged before the kernel gives the connection up
/// (`TCP_USER_TIMEOUT`): keepalive covers an idle connection, this one a busy one, so a
/// replaced connection still waiting for its answers is closed rather than kept for the
/// ~15 minutes of TCP's retransmissions.
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// TCP settings of every connection to Redis: no Nagle delay (Redis answers each request
/// at once), keepalive and the user timeout.
fn tcp_settings() -> TcpSettings {
    TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(tcp_keepalive())
        .set_user_timeout(TCP_USER_TIMEOUT)
}

/// A connection to whichever node a command belongs to. Cheap to clone.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Redis, as the configuration describes it. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
    /// Set while an unanswered connection is being replaced, and for `REPLACE_PAUSE`
    /// after, so a burst of timeouts replaces it once.
    replacing: Arc<AtomicBool>,
    /// When a connection was last replaced: a call sent before then failed on the old
    /// one, and says nothing about the new.
    replaced_at: Arc<std::sync::Mutex<Option<Instant>>>,
    /// Replacements since a call was last answered: spaces out the next one.
    unanswered_replacements: Arc<std::sync::atomic::AtomicU32>,
    /// Milliseconds after `created` (plus one) of the first call unanswered since one was
    /// last answered; 0 while calls are answered.
    unanswered_since: Arc<std::sync::atomic::AtomicU64>,
    created: Instant,
    /// Longest a fresh connection may take: a connect per node (two in a cluster, seeds
    /// then the slot map) and a margin.
    replace_budget: Duration,
    /// When Redis was last asked why it cannot be reached, and its answer.
    last_diagnosis: Arc<std::sync::Mutex<Option<Diagnosis>>>,
}

/// When Redis was asked why it cannot be reached, and what it said (`None`: it can).
type Diagnosis = (Instant, Option<String>);

enum Inner {
    Standalone(Standalone),
    /// Connected on first use, so the gate starts while the cluster is down.
    Cluster(Cluster),
    Sentinel(Sentinel),
}

struct Standalone {
    /// To connect afresh, and to learn why connecting fails (the manager only times out).
    client: Client,
    manager: ArcSwap<ConnectionManager>,
    config: ConnectionManagerConfig,
}

struct Cluster {
    client: redis::cluster::ClusterClient,
    /// One seed node on its own, for subscriptions (a classic PUBLISH reaches every node).
    seed: Box<Client>,
    conn: ArcSwapOption<ClusterConnection>,
    /// Serializes connecting, so a burst of calls makes one connection.
    connecting: tokio::sync::Mutex<()>,
}

struct Sentinel {
    client: tokio::sync::Mutex<SentinelClient>,
    primary: ArcSwapOption<(String, ConnectionManager)>,
    /// Set while the sentinels are being asked, so failing calls do not queue up behind it.
    resolving: AtomicBool,
    manager: ConnectionManagerConfig,
}

impl Store {
    /// Builds the clients without connecting: the gate starts (and reports not ready)
    /// while Redis is down, and connects on first use.
    pub fn new(config: &RedisConfig) -> Result<Self, ConfigError> {
        install_crypto_provider();
        let bad = |e: RedisError| {
            ConfigError::new(format!(
                "redis: {}",
                crate::config::redact_urls_in(&e.to_string())
            ))
        };
        let timeout = Duration::from_millis(config.timeout_ms);
        let connect_timeout = timeout.max(Duration::from_secs(1));
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let tls = match &config.tls {
            Some(files) => Some(certificates(files.read("redis.tls")?)),
            None => None,
        };
        let inner = match config.mode {
            RedisMode::Standalone => {
                let info = config
                    .url
                    .expose()
                    .into_connection_info()
                    .map_err(bad)?
                    .set_tcp_settings(tcp_settings());
                let client = match tls {
                    Some(certs) => Client::build_with_tls(info, certs),
                    None => Client::open(info),
                }
                .map_err(bad)?;
                let lazy = ConnectionManager::new_lazy_with_config(client.clone(), manager.clone())
                    .map_err(bad)?;
                Inner::Standalone(Standalone {
                    client,
                    manager: ArcSwap::from_pointee(lazy),
                    config: manager,
                })
            }
            RedisMode::Cluster => {
                let nodes: Vec<&str> = config.nodes.iter().map(|u| u.expose()).collect();
                // Redirects (MOVED, ASK) are followed and TRYAGAIN (a multi-key call during
                // a slot migration) retried a few times at once, well within the check's
                // timeout; what is still moving after that comes back to the limiter,
                // which waits it out within a budget of its own (`Limiter::timed`).
                let mut builder = ClusterClientBuilder::new(nodes)
                    .tcp_settings(tcp_settings())
                    .connection_timeout(connect_timeout)
                    .response_timeout(timeout)
                    // Each node answers within the timeout; a call may take longer as a
                    // whole while the client follows a moved slot and learns the new map
                    // (which holds every call back meanwhile).
                    .overall_response_timeout(Some(CLUSTER_CALL_TRY))
                    .retries(3)
                    .min_retry_wait(2)
                    .max_retry_wait(20)
                    .retry_wait_formula(4, 2);
                let seed_info = config.nodes[0]
                    .expose()
                    .into_connection_info()
                    .map_err(bad)?
                    .set_tcp_settings(tcp_settings());
                let seed = match &tls {
                    Some(certs) => Client::build_with_tls(seed_info, certs.clone()),
                    None => Client::open(seed_info),
                }
                .map_err(bad)?;
                if let Some(certs) = tls {
                    builder = builder.certs(certs);
                }
                Inner::Cluster(Cluster {
                    seed: Box::new(seed),
                    client: builder.build().map_err(bad)?,
                    conn: ArcSwapOption::empty(),
                    connecting: tokio::sync::Mutex::new(()),
                })
            }
            RedisMode::Sentinel => {
                let primary = config.url.expose().into_connection_info().map_err(bad)?;
                let settings = primary.redis_settings();
                let mut addresses = Vec::new();
                // The sentinels' own credentials (`requirepass` on the sentinels), from
                // the first of their URLs that has some.
                let mut sentinel_auth: Option<(Option<String>, String)> = None;
                for url in &config.sentinels {
                    let info = url.expose().into_connection_info().map_err(bad)?;
                    let auth = info.redis_settings();
                    if sentinel_auth.is_none()
                        && let Some(password) = auth.password()
                    {
                        sentinel_auth =
                            Some((auth.username().map(str::to_owned), password.to_owned()));
                    }
                    addresses.push(info.addr().clone());
                }
                let sentinels_tls = addresses
                    .iter()
                    .any(|a| matches!(a, redis::ConnectionAddr::TcpTls { .. }));
                let name = config.master_name.clone().unwrap_or_default();
                let mut builder =
                    SentinelClientBuilder::new(addresses, name, SentinelServerType::Master)
                        .map_err(bad)?
                        .set_client_to_redis_db(settings.db())
                        .set_client_to_redis_tcp_settings(tcp_settings())
                        .set_client_to_sentinel_tcp_settings(tcp_settings());
                if let Some(user) = settings.username() {
                    builder = builder.set_client_to_redis_username(user);
                }
                if let Some(password) = settings.password() {
                    builder = builder.set_client_to_redis_password(password);
                }
                if let Some((user, password)) = sentinel_auth {
                    if let Some(user) = user {
                        builder = builder.set_client_to_sentinel_username(user);
                    }
                    builder = builder.set_client_to_sentinel_password(password);
                }
                if matches!(primary.addr(), redis::ConnectionAddr::TcpTls { .. }) {
                    builder = builder.set_client_to_redis_tls_mode(TlsMode::Secure);
                }
                if let Some(certs) = tls {
                    builder = builder.set_client_to_redis_certificates(certs.clone());
                    if sentinels_tls {
                        builder = builder.set_client_to_sentinel_certificates(certs);
                    }
                }
                Inner::Sentinel(Sentinel {
                    client: tokio::sync::Mutex::new(builder.build().map_err(bad)?),
                    primary: ArcSwapOption::empty(),
                    resolving: AtomicBool::new(false),
                    manager,
                })
            }
        };
        Ok(Self {
            inner: Arc::new(inner),
            replacing: Arc::default(),
            replaced_at: Arc::default(),
            unanswered_replacements: Arc::default(),
            unanswered_since: Arc::default(),
            created: Instant::now(),
            replace_budget: connect_timeout * 2 + REPLACE_PAUSE,
            last_diagnosis: Arc::default(),
        })
    }

    /// True for a Redis Cluster: every call must keep to one slot.
    pub fn is_cluster(&self) -> bool {
        matches!(*self.inner, Inner::Cluster(_))
    }

    /// A connection for the next call.
    pub async fn conn(&self) -> RedisResult<Conn> {
        match &*self.inner {
            Inner::Standalone(standalone) => {
                Ok(Conn::Single((**standalone.manager.load()).clone()))
            }
            Inner::Cluster(cluster) => Ok(Conn::Cluster(cluster.conn().await?)),
            Inner::Sentinel(sentinel) => {
                if let Some(primary) = sentinel.primary.load_full() {
                    return Ok(Conn::Single(primary.1.clone()));
                }
                sentinel.resolve(false).await?;
                match sentinel.primary.load_full() {
                    Some(primary) => Ok(Conn::Single(primary.1.clone())),
                    None => Err(RedisError::from((
                        redis::ErrorKind::Io,
                        "the sentinels named no primary",
                    ))),
                }
            }
        }
    }

    /// A call failed as a whole. An unanswered call has its connection replaced by a
    /// fresh one in the background, at most once per `REPLACE_PAUSE` (a silently dead
    /// connection only ever times out). With Sentinel, any failure may also mean the
    /// primary changed (a refused connection, or READONLY from a primary that became a
    /// replica), so the sentinels are asked again, at most once per `RESOLVE_PAUSE`.
    pub fn call_failed(&self, failure: Failure, sent_at: Instant) {
        let replaced_at = *self.replaced_at.lock().unwrap_or_else(|e| e.into_inner());
        if replaced_at.is_some_and(|replaced| sent_at < replaced) {
            return;
        }
        if let Inner::Sentinel(sentinel) = &*self.inner {
            // One task both asks the sentinels and reconnects, so a failover's new primary
            // is never overwritten by a reconnect to the old one.
            if !sentinel.resolving.swap(true, Ordering::AcqRel) {
                let store = self.clone();
                tokio::spawn(async move {
                    let Inner::Sentinel(sentinel) = &*store.inner else {
                        return;
                    };
                    let _clear = ClearOnDrop(&sentinel.resolving);
                    let fresh = failure == Failure::Unanswered;
                    match sentinel.resolve(fresh).await {
                        Ok(()) if fresh => store.note_replaced(),
                        Ok(()) => {}
                        Err(e) => {
                            tracing::debug!(error = %e, "the sentinels could not name the primary")
                        }
                    }
                    let pause = if fresh {
                        RESOLVE_PAUSE.max(REPLACE_PAUSE)
                    } else {
                        RESOLVE_PAUSE
                    };
                    tokio::time::sleep(pause).await;
                });
            }
            return;
        }
        let replace = match failure {
            Failure::Broken => true,
            Failure::Refused => false,
            Failure::Unanswered if !self.is_cluster() => true,
            // A cluster: only once calls have gone unanswered for a while (a half-open
            // node), not for one slow call during a reshard.
            Failure::Unanswered => {
                let now = self.created.elapsed().as_millis() as u64 + 1;
                let since = match self.unanswered_since.compare_exchange(
                    0,
                    now,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => now,
                    Err(since) => since,
                };
                // Another failing call may have stored a later moment first.
                now.saturating_sub(since) >= CLUSTER_UNANSWERED_GRACE.as_millis() as u64
            }
        };
        if replace {
            self.replace_soon();
        }
    }

    /// Replaces the connection in the background, unless a replacement is under way or
    /// one was made too recently (see below).
    pub fn replace_soon(&self) {
        if !self.replacing.swap(true, Ordering::AcqRel) {
            let store = self.clone();
            tokio::spawn(async move {
                let _clear = ClearOnDrop(&store.replacing);
                store.replace().await;
                // A fresh connection that goes unanswered too (a stalled server, a dead
                // primary's slots) is replaced ever less often: 1, 2, 4, then every 8 s
                // (twice that in a cluster, where a replacement reconnects to every node).
                let unanswered = store.unanswered_replacements.load(Ordering::Relaxed);
                let base = if store.is_cluster() {
                    CLUSTER_REPLACE_PAUSE
                } else {
                    REPLACE_PAUSE
                };
                tokio::time::sleep(base * (1 << unanswered.min(4).saturating_sub(1))).await;
            });
        }
    }

    /// A call was answered: the connection works, and the next unanswered one is replaced
    /// at once again.
    pub fn call_answered(&self) {
        // Read first: every batch lands here, and a store would dirty a shared cache line.
        if self.unanswered_replacements.load(Ordering::Relaxed) != 0 {
            self.unanswered_replacements.store(0, Ordering::Relaxed);
        }
        if self.unanswered_since.load(Ordering::Relaxed) != 0 {
            self.unanswered_since.store(0, Ordering::Relaxed);
        }
    }

    /// Waits until the connection has been replaced after `since`, at most until
    /// `deadline`; true when it has.
    pub async fn replaced_after(&self, since: Instant, deadline: Instant) -> bool {
        loop {
            let replaced_at = *self.replaced_at.lock().unwrap_or_else(|e| e.into_inner());
            if replaced_at.is_some_and(|replaced| replaced > since) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            tokio::time::sleep((deadline - now).min(REPLACED_POLL)).await;
        }
    }

    fn note_replaced(&self) {
        *self.replaced_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        // Told once per outage; the replacements that follow are the same story.
        if self.unanswered_replacements.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::info!(
                "a call to Redis went unanswered: replaced its connection with a fresh one"
            );
        } else {
            tracing::debug!("replaced the Redis connection again");
        }
    }

    /// Forgets why Redis could not be reached: it can.
    pub fn forget_diagnosis(&self) {
        *self
            .last_diagnosis
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Connects afresh and swaps the new connection in; the old one closes once the calls
    /// that hold it are done. A connection that cannot be made leaves the old one in place
    /// (it reconnects by itself after a refusal).
    async fn replace(&self) {
        let fresh = async {
            match &*self.inner {
                Inner::Standalone(standalone) => {
                    let manager = ConnectionManager::new_with_config(
                        standalone.client.clone(),
                        standalone.config.clone(),
                    )
                    .await?;
                    standalone.manager.store(Arc::new(manager));
                }
                Inner::Cluster(cluster) => {
                    let conn = cluster.client.get_async_connection().await?;
                    cluster.conn.store(Some(Arc::new(conn)));
                }
                // Replaced where the sentinels are asked (`Sentinel::resolve`).
                Inner::Sentinel(_) => {}
            }
            RedisResult::Ok(())
        };
        match tokio::time::timeout(self.replace_budget, fresh).await {
            Ok(Ok(())) => self.note_replaced(),
            Ok(Err(e)) => tracing::debug!(error = %e, "could not open a fresh Redis connection"),
            Err(_) => tracing::debug!("opening a fresh Redis connection timed out"),
        }
    }

    /// Why Redis cannot be reached, as one fresh connection attempt found (a refused TLS
    /// certificate, a wrong password), or `None` when it could or nobody knows yet: the
    /// shared connection only says that it timed out. Never waits: an attempt (at most one
    /// per `DIAGNOSE_PAUSE`) runs in the background, and the next call has its answer.
    pub fn diagnosis(&self) -> Option<String> {
        let mut last = self
            .last_diagnosis
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((at, why)) = &*last
            && at.elapsed() < DIAGNOSE_PAUSE
        {
            return why.clone();
        }
        let known = last.as_ref().and_then(|(_, why)| why.clone());
        *last = Some((Instant::now(), known.clone()));
        let store = self.clone();
        tokio::spawn(async move {
            let why = store.diagnose_now().await;
            *store
                .last_diagnosis
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), why));
        });
        known
    }

    async fn diagnose_now(&self) -> Option<String> {
        let attempt = async {
            match &*self.inner {
                Inner::Standalone(Standalone { client, .. }) => {
                    let mut conn = client.get_multiplexed_async_connection().await?;
                    redis::cmd("PING").query_async::<()>(&mut conn).await
                }
                Inner::Cluster(Cluster { client, .. }) => {
                    let mut conn = client.get_async_connection().await?;
                    redis::cmd("PING").query_async::<()>(&mut conn).await
                }
                Inner::Sentinel(sentinel) => {
                    let client = sentinel.client.lock().await.async_get_client().await?;
                    let mut conn = client.get_multiplexed_async_connection().await?;
                    redis::cmd("PING").query_async::<()>(&mut conn).await
                }
            }
        };
        match tokio::time::timeout(Duration::from_secs(3), attempt).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("no answer within 3 s".into()),
        }
    }

    /// PING, to one node: in a cluster the primary of slot 0 (a PING without a key would go
    /// to every primary, and one primary down would make every gate not ready while the
    /// other slots work; failing checks of that primary's slots count on their own).
    /// A client of one server for subscriptions: the server itself, the primary the
    /// sentinels name, or a cluster's first seed node.
    pub async fn subscriber(&self) -> RedisResult<Client> {
        match &*self.inner {
            Inner::Standalone(standalone) => Ok(standalone.client.clone()),
            Inner::Cluster(cluster) => Ok((*cluster.seed).clone()),
            Inner::Sentinel(sentinel) => sentinel.client.lock().await.async_get_client().await,
        }
    }

    /// Redis's clock (`TIME`), in milliseconds since the Unix epoch: an answer is a ping.
    pub async fn time(&self) -> RedisResult<u64> {
        let value = self
            .query_at(Route::new(0, SlotAddr::Master), redis::cmd("TIME"))
            .await?;
        let (seconds, micros): (u64, u64) = redis::from_redis_value(value)?;
        Ok(seconds.saturating_mul(1000) + micros / 1000)
    }

    /// Sends `cmd` to the primary that owns `key`'s slot (any node outside a cluster).
    pub async fn query_at_key(&self, key: &str, cmd: Cmd) -> RedisResult<Value> {
        self.query_at(Route::with_key(key, SlotAddr::Master), cmd)
            .await
    }

    /// Sends `cmd` to the node of `route` in a cluster, to the one server otherwise.
    async fn query_at(&self, route: Route, cmd: Cmd) -> RedisResult<Value> {
        match self.conn().await? {
            Conn::Single(mut conn) => cmd.query_async(&mut conn).await,
            Conn::Cluster(mut conn) => {
                let node = SingleNodeRoutingInfo::SpecificNode(route);
                conn.route_command(cmd, RoutingInfo::SingleNode(node)).await
            }
        }
    }
}

impl Cluster {
    async fn conn(&self) -> RedisResult<ClusterConnection> {
        if let Some(conn) = self.conn.load_full() {
            return Ok((*conn).clone());
        }
        let _one = self.connecting.lock().await;
        if let Some(conn) = self.conn.load_full() {
            return Ok((*conn).clone());
        }
        let conn = self.client.get_async_connection().await?;
        self.conn.store(Some(Arc::new(conn.clone())));
        Ok(conn)
    }
}

impl Sentinel {
    /// Asks the sentinels for the primary, and connects to it when it moved, or afresh
    /// anyway when `fresh` (the connection went unanswered). The sentinels' lock is held
    /// throughout, so two answers never cross.
    async fn resolve(&self, fresh: bool) -> RedisResult<()> {
        let mut sentinels = self.client.lock().await;
        let client = sentinels.async_get_client().await?;
        let address = client.get_connection_info().addr().to_string();
        let current = self.primary.load_full();
        if fresh || current.as_ref().is_none_or(|c| c.0 != address) {
            let manager = ConnectionManager::new_lazy_with_config(client, self.manager.clone())?;
            if let Some(previous) = current.as_ref().filter(|c| c.0 != address) {
                tracing::warn!(from = %previous.0, to = %address, "the sentinels name a new Redis primary; switching to it");
            }
            self.primary.store(Some(Arc::new((address, manager))));
        }
        Ok(())
    }
}

/// Makes aws-lc-rs the process's TLS crypto: the broker's client (lapin) and Redis's both
/// use rustls, and rustls refuses to guess when a build enables more than one provider.
pub fn install_crypto_provider() {
    // Err only when a provider is already installed, which is as good.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Clears a flag when dropped, so a background task that ends any way (a panic too) never
/// leaves it set.
struct ClearOnDrop<'a>(&'a AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// The redis crate's TLS settings from the files' contents.
fn certificates(pem: TlsPem) -> TlsCertificates {
    TlsCertificates {
        client_tls: pem
            .identity
            .map(|(client_cert, client_key)| ClientTlsConfig {
                client_cert,
                client_key,
            }),
        root_cert: pem.ca,
    }
}

/// A Lua script: its text, and the SHA1 that EVALSHA names it by.
#[derive(Clone)]
pub struct Lua {
    source: &'static str,
    sha: String,
}

impl Lua {
    pub fn new(source: &'static str) -> Self {
        Self {
            source,
            sha: redis::Script::new(source).get_hash().to_owned(),
        }
    }

    /// Runs the script with the keys and arguments `fill` appends (key count first):
    /// EVALSHA, and EVAL when the node answering does not know the script yet (a restart,
    /// a new primary after a failover, a node that just joined). NOSCRIPT means nothing
    /// ran, so nothing is counted twice. EVAL goes to the keys' node like EVALSHA, where
    /// `SCRIPT LOAD` would go to every node of a cluster and fail while any is down.
    pub async fn run<T: redis::FromRedisValue>(
        &self,
        conn: &mut Conn,
        fill: impl Fn(&mut Cmd),
    ) -> RedisResult<T> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.sha);
        fill(&mut cmd);
        match cmd.query_async(conn).await {
            Err(e) if e.code() == Some("NOSCRIPT") => {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(self.source);
                fill(&mut cmd);
                cmd.query_async(conn).await
            }
            other => other,
        }
    }
}
