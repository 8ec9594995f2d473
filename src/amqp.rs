//! RabbitMQ: connections, queue declaration, and a publisher that reports a message as
//! delivered only when the broker confirmed it and routed it to a queue.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

use lapin::tcp::{AsyncTcpStream, OwnedIdentity, OwnedTLSConfig};
use lapin::uri::{AMQPScheme, AMQPUri};

use crate::config::{AmqpConfig, ConfigError, QueueType, SecretUrl};
use crate::telemetry::Metrics;

/// Bounds how long opening a connection may take, so an unreachable broker is retried
/// instead of hanging start-up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one address of a broker's name may take to accept a connection, unless the
/// URL's `connection_timeout` (ms) says otherwise.
const CONNECT_PER_ADDRESS: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the broker refused the message (nack)")]
    Nacked,
    #[error("the message was returned as unroutable: {reply_code} {reply_text}")]
    Returned { reply_code: u16, reply_text: String },
    #[error("the publishing channel failed: {0}")]
    Channel(#[from] lapin::Error),
    #[error("the broker did not confirm the message within {0:?}")]
    ConfirmTimeout(Duration),
    #[error(
        "the message ({size} bytes) is larger than the broker's max_message_size ({max} bytes)"
    )]
    TooLarge { size: usize, max: u64 },
}

impl PublishError {
    /// True when the channel itself is gone: it must be opened again (or the session
    /// rebuilt) before the next publish.
    pub fn is_channel_lost(&self) -> bool {
        // A confirm that never comes means the channel is no longer trustworthy either.
        matches!(
            self,
            PublishError::Channel(_) | PublishError::ConfirmTimeout(_)
        )
    }
}

/// The broker's `max_message_size` when `error` is its refusal of a message for its size
/// (RabbitMQ closes the channel: "PRECONDITION_FAILED - message size N is larger than
/// configured max size M").
fn size_refusal(error: &lapin::Error) -> Option<u64> {
    let lapin::ErrorKind::ProtocolError(e) = error.kind() else {
        return None;
    };
    let text = e.get_message().as_str();
    let (_, max) = text.split_once("larger than configured max size ")?;
    max.trim().parse().ok()
}

/// True when `error` closed one channel, not its connection (a soft AMQP error such as
/// PRECONDITION_FAILED, NOT_FOUND or ACCESS_REFUSED).
pub fn is_channel_error(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e)
        if matches!(e.kind(), lapin::protocol::AMQPErrorKind::Soft(_)))
}

/// This instance in connection names and consumer tags: the host name (a pod's name in
/// Kubernetes, where every gate is PID 1) and the process id.
pub fn instance_name() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "unknown-host".into());
        format!("{host}-{}", std::process::id())
    })
}

/// A random number drawn once per process: with the host name and process id alone, a
/// container restarted in place (PID 1 again, same host name) would repeat the previous
/// process's names.
pub fn process_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static NONCE: OnceLock<u64> = OnceLock::new();
    *NONCE.get_or_init(|| {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        hasher.finish()
    })
}

/// The brokers a gate may connect to (the nodes of a RabbitMQ cluster, or one broker),
/// and the TLS settings for `amqps://`.
pub struct Brokers {
    addresses: Vec<SecretUrl>,
    tls: OwnedTLSConfig,
    /// `amqp.heartbeat_seconds`, offered where a URL names none.
    heartbeat: u16,
    /// Where the next session starts looking; random at first, so instances spread over
    /// the nodes.
    next: AtomicUsize,
}

impl Brokers {
    pub fn new(config: &AmqpConfig) -> Result<Self, ConfigError> {
        crate::limit::store::install_crypto_provider();
        let mut tls = OwnedTLSConfig::default();
        if let Some(files) = &config.tls {
            let pem = files.read("amqp.tls")?;
            if let Some(ca) = pem.ca {
                tls.cert_chain = Some(
                    String::from_utf8(ca)
                        .map_err(|_| ConfigError::new("amqp.tls.ca_file is not PEM text"))?,
                );
            }
            if let Some((cert, key)) = pem.identity {
                tls.identity = Some(OwnedIdentity::PKCS8 { pem: cert, key });
            }
        }
        let addresses: Vec<SecretUrl> = config
            .addresses()
            .into_iter()
            .map(|(_, u)| u.clone())
            .collect();
        let start = (process_nonce() % addresses.len() as u64) as usize;
        Ok(Self {
            addresses,
            tls,
            heartbeat: config.heartbeat_seconds,
            next: AtomicUsize::new(start),
        })
    }

    /// Connects to the next broker that answers, trying each once from where the last
    /// session left off. Returns the connection and which broker it reached.
    pub async fn connect_next(&self, role: &str) -> Result<(Connection, usize), lapin::Error> {
        let start = self.next.load(Ordering::Relaxed);
        let mut last_error = None;
        for offset in 0..self.addresses.len() {
            let index = (start + offset) % self.addresses.len();
            match self.connect_to(index, role).await {
                Ok(conn) => {
                    // The next session starts past this one: when this node goes down,
                    // its successor is tried first, not the node that just failed.
                    self.next.store(index + 1, Ordering::Relaxed);
                    return Ok((conn, index));
                }
                Err(e) => {
                    if self.addresses.len() > 1 {
                        let error = crate::config::scrub(&e.to_string(), &[&self.addresses[index]]);
                        tracing::debug!(broker = %self.addresses[index], %error, "broker did not answer; trying the next");
                    }
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.expect("there is at least one broker"))
    }

    /// The address of broker `index`, redacted.
    pub fn address(&self, index: usize) -> &SecretUrl {
        &self.addresses[index]
    }

    /// Opens one connection to broker `index`, named so operators can tell the gate's
    /// connections apart.
    pub async fn connect_to(&self, index: usize, role: &str) -> Result<Connection, lapin::Error> {
        let name = format!("konstruct-gate {role} {}", instance_name());
        let properties =
            ConnectionProperties::default().with_connection_name(LongString::from(name));
        let url = self.addresses[index].expose();
        let invalid = |e: String| lapin::Error::from(std::io::Error::other(e));
        let mut uri: AMQPUri = url.parse().map_err(invalid)?;
        uri.query.heartbeat.get_or_insert(self.heartbeat);
        // The host as written: lapin's URI parser knows only domain names, and would take
        // an IP address (`amqp://10.0.0.5`, `amqps://[2001:db8::1]`) for localhost.
        let host = match url::Url::parse(url)
            .map_err(|e| invalid(e.to_string()))?
            .host()
        {
            Some(url::Host::Domain(name)) => name.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => uri.authority.host.clone(),
        };
        let per_address = uri
            .query
            .connection_timeout
            .map_or(CONNECT_PER_ADDRESS, Duration::from_millis)
            .min(CONNECT_TIMEOUT);
        let tls = self.tls.clone();
        let connect = async {
            let runtime = lapin::runtime::default_runtime()?;
            // As lapin connects, plus TCP keepalive and a user timeout on the socket before
            // any TLS, and each address of the name tried in turn, each within its time.
            let open = async move |uri: AMQPUri, runtime| {
                let addresses = tokio::net::lookup_host((host.as_str(), uri.authority.port))
                    .await
                    .map_err(lapin::Error::from)?;
                let mut last_error = None;
                for address in addresses {
                    let attempt = tokio::time::timeout(
                        per_address,
                        AsyncTcpStream::connect(&runtime, address),
                    );
                    let stream: AsyncTcpStream<async_compat::Compat<tokio::net::TcpStream>> =
                        match attempt.await {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(e)) => {
                                last_error = Some(e);
                                continue;
                            }
                            Err(_) => {
                                last_error = Some(std::io::Error::new(
                                    std::io::ErrorKind::TimedOut,
                                    format!("connecting to {address} timed out"),
                                ));
                                continue;
                            }
                        };
                    if let AsyncTcpStream::Plain(plain) = &stream {
                        tune_socket(plain.get_ref());
                    }
                    return match uri.scheme {
                        AMQPScheme::AMQP => Ok(stream),
                        AMQPScheme::AMQPS => stream
                            .into_tls(&host, tls.as_ref())
                            .await
                            .map_err(lapin::Error::from),
                    };
                }
                Err(lapin::Error::from(last_error.unwrap_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("{host} has no address"),
                    )
                })))
            };
            Connection::connector(uri, runtime, open, properties).await
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(result) => result,
            Err(_) => Err(lapin::Error::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connecting to the broker timed out",
            ))),
        }
    }
}

/// TCP keepalive on a broker connection's socket, as on Redis's. No user timeout: the
/// broker stops reading a publishing connection during a memory alarm (a zero window for as
/// long as it lasts), which the gate must wait out; the heartbeat covers a dead peer.
fn tune_socket(socket: &tokio::net::TcpStream) {
    let keepalive = crate::limit::store::tcp_keepalive();
    if let Err(e) = crate::limit::store::SockRef::from(socket).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "could not turn on TCP keepalive");
    }
}

pub use crate::ladder::{DEFER_STEPS, defer_queue, step_queue};

/// Declares the inbound and the three output queues as durable. With quorum queues the
/// inbound queue also gets a delivery limit, past which the broker moves a message that
/// keeps coming back to the dead-letter queue instead of redelivering it forever.
///
/// A queue the broker will not declare as asked is used as it is when it exists, with one
/// warning: one that exists with other arguments (an operator added `x-max-length`, or
/// changed the delivery limit), or one a user without `configure` permission on it may
/// still use. Each queue is declared on a channel of its own (a refusal closes it) and
/// then checked passively.
pub async fn declare_queues(conn: &Connection, config: &AmqpConfig) -> Result<(), lapin::Error> {
    let mut outputs = FieldTable::default();
    let mut inbound = FieldTable::default();
    if config.queue_type == QueueType::Quorum {
        for args in [&mut outputs, &mut inbound] {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        inbound.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(config.delivery_limit)),
        );
        inbound.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        inbound.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(config.dead_letter_queue.as_str().into()),
        );
    }
    let queues = [
        (&config.inbound_queue, &inbound),
        (&config.orchestrator_queue, &outputs),
        (&config.notification_queue, &outputs),
        (&config.dead_letter_queue, &outputs),
    ];
    for (queue, arguments) in queues {
        declare_or_use(conn, queue, arguments).await?;
    }
    let shard_args =
        crate::shards::shard_arguments(&inbound, config.queue_type == QueueType::Quorum);
    for k in 0..config.inbound_shards {
        let queue = crate::shards::shard_queue(&config.inbound_queue, k);
        declare_or_use(conn, &queue, &shard_args).await?;
    }
    Ok(())
}

/// Declares one durable queue; when the broker refuses (other arguments, or no
/// `configure` permission) and the queue exists, uses it as it is, with a warning.
pub(crate) async fn declare_or_use(
    conn: &Connection,
    queue: &str,
    arguments: &FieldTable,
) -> Result<(), lapin::Error> {
    let declared =
        declare_on_own_channel(conn, queue, QueueDeclareOptions::durable(), arguments).await;
    let Err(refused) = declared else {
        return Ok(());
    };
    // Only a refusal by the broker (a soft error on the channel) can be worked around.
    if !is_channel_error(&refused) {
        return Err(refused);
    }
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    // Exists? Then use it; else the first error is the one to report.
    if declare_on_own_channel(conn, queue, passive, &FieldTable::default())
        .await
        .is_err()
    {
        return Err(refused);
    }
    if is_precondition_failed(&refused) {
        tracing::warn!(
            queue = %queue,
            reason = %refused,
            "the queue exists with other arguments than the gate would declare; using it as it is (a classic queue of the defer ladder dead-letters at most once)"
        );
    } else {
        tracing::warn!(
            queue = %queue,
            reason = %refused,
            "the broker refused to declare the queue; it exists, so the gate uses it as it is"
        );
    }
    Ok(())
}

/// NOT_FOUND: the queue or exchange named does not exist (the channel is closed).
pub fn is_not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e) if e.get_id() == 404)
}

fn is_precondition_failed(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e) if e.get_id() == 406)
}

async fn confirming_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

pub(crate) async fn declare_on_own_channel(
    conn: &Connection,
    queue: &str,
    options: QueueDeclareOptions,
    arguments: &FieldTable,
) -> Result<(), lapin::Error> {
    let channel = conn.create_channel().await?;
    let result = channel
        .queue_declare(ShortString::from(queue), options, arguments.clone())
        .await;
    if channel.status().connected() {
        let _ = channel.close(200, ShortString::from("declared")).await;
    }
    result.map(|_| ())
}

/// Publishes on one confirm-mode channel. Many messages may be awaiting their confirms at
/// once; each caller awaits only its own. A channel the broker closes for one message
/// (too large) is opened again on the same connection: one refusal never ends the session.
#[derive(Clone)]
pub struct Publisher {
    connection: Arc<Connection>,
    channel: Arc<Mutex<Channel>>,
    /// Held while a closed channel is replaced, so that it is replaced once.
    renewing: Arc<tokio::sync::Mutex<()>>,
    /// The broker's `max_message_size` once a refusal told it (`u64::MAX` before), shared
    /// by every session of the gate.
    max_body: Arc<AtomicU64>,
    metrics: Metrics,
    /// `amqp.confirm_timeout_ms`.
    confirm_timeout: Duration,
    /// False while the broker blocks publishing: confirms then wait for the broker, and
    /// the timeout waits with them.
    flow: tokio::sync::watch::Receiver<bool>,
}

impl Publisher {
    pub async fn new(
        connection: Arc<Connection>,
        max_body: Arc<AtomicU64>,
        metrics: Metrics,
        confirm_timeout: Duration,
        flow: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Self, lapin::Error> {
        let channel = confirming_channel(&connection).await?;
        Ok(Self {
            connection,
            channel: Arc::new(Mutex::new(channel)),
            renewing: Arc::default(),
            max_body,
            metrics,
            confirm_timeout,
            flow,
        })
    }

    /// The channel publishes go out on now.
    pub fn channel(&self) -> Channel {
        self.channel
            .lock()
            .expect("the channel lock is never poisoned")
            .clone()
    }

    /// The largest body the broker is known to accept.
    pub fn max_body(&self) -> u64 {
        self.max_body.load(Ordering::Relaxed)
    }

    /// Opens the publishing channel again when the broker closed it but not the
    /// connection. False when the connection is gone too (the session must end).
    pub async fn renew(&self) -> bool {
        let _renewing = self.renewing.lock().await;
        if self.channel().status().connected() {
            return true;
        }
        if !self.connection.status().connected() {
            return false;
        }
        match confirming_channel(&self.connection).await {
            Ok(channel) => {
                tracing::info!("the broker closed the publishing channel; publishing on a new one");
                *self
                    .channel
                    .lock()
                    .expect("the channel lock is never poisoned") = channel;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not open a new publishing channel");
                false
            }
        }
    }

    /// Publishes to `queue` through the default exchange and waits for the broker's
    /// confirm. `mandatory` makes a missing queue a returned message, not a silent drop.
    pub async fn publish(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        self.publish_via("", queue, body, properties).await
    }

    /// Publishes through `exchange` with `routing_key`, like [`Publisher::publish`].
    pub async fn publish_via(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let max = self.max_body();
        if body.len() as u64 > max {
            return Err(PublishError::TooLarge {
                size: body.len(),
                max,
            });
        }
        let started = Instant::now();
        let channel = self.channel();
        let publish = async {
            channel
                .basic_publish(
                    ShortString::from(exchange),
                    ShortString::from(routing_key),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    body,
                    properties,
                )
                .await?
                .await
        };
        tokio::pin!(publish);
        let timer = tokio::time::sleep(self.confirm_timeout);
        tokio::pin!(timer);
        let confirm = loop {
            tokio::select! {
                confirm = &mut publish => match confirm {
                    Ok(confirm) => break confirm,
                    Err(e) => {
                        // Refused for its size: the gate knows the broker's limit from now on.
                        if let Some(max) = size_refusal(&e) {
                            self.max_body.fetch_min(max, Ordering::Relaxed);
                            if body.len() as u64 > max {
                                return Err(PublishError::TooLarge { size: body.len(), max });
                            }
                        }
                        return Err(e.into());
                    }
                },
                _ = &mut timer => {
                    if *self.flow.borrow() {
                        return Err(PublishError::ConfirmTimeout(self.confirm_timeout));
                    }
                    // Blocked by the broker: wait on, the timeout starts again.
                    timer.as_mut().reset(tokio::time::Instant::now() + self.confirm_timeout);
                }
            }
        };
        self.metrics
            .publish_confirm_seconds
            .record(started.elapsed());
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                Err(PublishError::Returned {
                    reply_code: returned.reply_code,
                    reply_text: returned.reply_text.to_string(),
                })
            }
            Confirmation::Nack(None) => Err(PublishError::Nacked),
            // The channel is put in confirm mode before any publish; an unconfirmed
            // publish cannot be called delivered.
            Confirmation::NotRequested => Err(PublishError::Nacked),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_instance_name_carries_the_host_name_and_the_process_id() {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        let name = instance_name();
        assert_eq!(name, format!("{}-{}", host.trim(), std::process::id()));
    }
}
