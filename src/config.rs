//! Typed configuration, loaded in layers: built-in defaults, then a TOML file, then
//! `KONSTRUCT_GATE__SECTION__KEY` environment variables. Every struct denies unknown keys,
//! so a typo stops start-up instead of being silently ignored.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Serialize};

use crate::message::{valid_channel, valid_tenant_id};

/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "KONSTRUCT_GATE__";

/// Most requests (and burst) a limit may allow per window.
pub const MAX_REQUESTS: u64 = 1_000_000_000;
/// Longest window: 366 days.
pub const MAX_WINDOW_SECONDS: u64 = 366 * 24 * 60 * 60;
/// RabbitMQ's own ceiling on a message body: 128 MiB.
pub const MAX_MESSAGE_BYTES: usize = 128 * 1024 * 1024;
pub const MAX_SHUTDOWN_GRACE_SECONDS: u64 = 3_600;
pub const MAX_REDIS_TIMEOUT_MS: u64 = 60_000;
/// The overrides hash is read at least once an hour.
pub const MAX_OVERRIDES_REFRESH_MS: u64 = 3_600_000;
pub const MAX_DELIVERY_LIMIT: u32 = 1_000_000;
pub const MAX_DEFER_SECONDS: u64 = 24 * 60 * 60;
/// The longest `limits.duplicate_window_seconds`: a week.
pub const MAX_DUPLICATE_WINDOW_SECONDS: u64 = 7 * 24 * 60 * 60;
pub const MAX_CONFIRM_TIMEOUT_MS: u64 = 600_000;
/// RabbitMQ's own upper bound for a negotiated heartbeat is far higher; past ten minutes a
/// dead connection is found too late to matter.
pub const MAX_HEARTBEAT_SECONDS: u16 = 600;
pub const MAX_STALL_SECONDS: u64 = 86_400;

/// Checks the numbers one limit sets (the file's global limit, a file override, a Redis
/// override, the admin command line), so every source accepts exactly the same values.
/// `key` names where the values come from, e.g. `limits.overrides[2]`.
pub fn check_limit_numbers(
    key: &str,
    requests: Option<u64>,
    window_seconds: Option<u64>,
    burst: Option<u64>,
) -> Result<(), String> {
    for (field, value, max) in [
        ("requests", requests, MAX_REQUESTS),
        ("window_seconds", window_seconds, MAX_WINDOW_SECONDS),
        ("burst", burst, MAX_REQUESTS),
    ] {
        match value {
            Some(0) => return Err(format!("{key}.{field} must be at least 1")),
            Some(v) if v > max => {
                return Err(format!(
                    "{key}.{field} = {v} is out of range (at most {max})"
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// A configuration that cannot be used, described in one sentence naming the key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    pub fn new(sentence: impl Into<String>) -> Self {
        Self(sentence.into())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub amqp: AmqpConfig,
    pub redis: RedisConfig,
    pub limits: LimitsConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    pub url: SecretUrl,
    /// The nodes of a RabbitMQ cluster, used instead of `url` when set: each session
    /// connects to the next one that answers, starting from a random one so that
    /// instances spread over the nodes.
    #[serde(
        default,
        deserialize_with = "list_or_commas",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub urls: Vec<SecretUrl>,
    /// A private CA and a client certificate for `amqps://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFiles>,
    /// A file holding the password (a mounted Kubernetes secret): it replaces the URL's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    pub inbound_queue: String,
    pub orchestrator_queue: String,
    pub notification_queue: String,
    pub dead_letter_queue: String,
    /// Unacknowledged deliveries the broker may push to one consumer; also the number of
    /// messages processed concurrently.
    pub prefetch: u16,
    /// Declare all four queues as durable at start-up (and after every reconnect), so a
    /// fresh broker works without a separate provisioning step.
    pub declare_queues: bool,
    /// Queue type used when declaring queues.
    pub queue_type: QueueType,
    /// With quorum queues: deliveries after which a message that keeps failing is
    /// dead-lettered by the broker instead of looping forever.
    pub delivery_limit: u32,
    /// Seconds in-flight messages get to finish after SIGTERM before they are handed back.
    pub shutdown_grace_seconds: u64,
    /// How long a publish may wait for the broker's confirm; then the message is handed
    /// back and the session starts over.
    pub confirm_timeout_ms: u64,
    /// The AMQP heartbeat offered to the broker (it may negotiate lower). A connection
    /// silent for two intervals is given up and the session starts over, so a silently
    /// dead connection (a half-open TCP path) costs about twice this. 0 takes the
    /// broker's value.
    pub heartbeat_seconds: u16,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: SecretUrl("amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            urls: Vec::new(),
            tls: None,
            password_file: None,
            inbound_queue: "konstruct.inbound".into(),
            orchestrator_queue: "konstruct.orchestrator".into(),
            notification_queue: "konstruct.notifications".into(),
            dead_letter_queue: "konstruct.dead-letter".into(),
            prefetch: 256,
            declare_queues: true,
            queue_type: QueueType::Classic,
            delivery_limit: 20,
            shutdown_grace_seconds: 15,
            confirm_timeout_ms: 30_000,
            heartbeat_seconds: 5,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueType {
    Classic,
    Quorum,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    pub mode: RedisMode,
    /// `standalone`: the server. `sentinel`: the primary's user, password, database and
    /// scheme (`rediss://` for TLS); its host is ignored.
    pub url: SecretUrl,
    /// `cluster`: seed nodes; the gate learns the rest of the cluster from them.
    #[serde(
        default,
        deserialize_with = "list_or_commas",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub nodes: Vec<SecretUrl>,
    /// `sentinel`: the sentinels that know the primary.
    #[serde(
        default,
        deserialize_with = "list_or_commas",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub sentinels: Vec<SecretUrl>,
    /// `sentinel`: the name the sentinels monitor the primary under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_name: Option<String>,
    /// A private CA and a client certificate for `rediss://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFiles>,
    /// A file holding the password (a mounted Kubernetes secret): it replaces the URL's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Prepended to every key, so several deployments (or tests) can share one Redis.
    pub key_prefix: String,
    /// Upper bound on one rate-limit check, so a slow Redis cannot stall the pipeline.
    pub timeout_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            mode: RedisMode::Standalone,
            url: SecretUrl("redis://127.0.0.1:6379/0".into()),
            nodes: Vec::new(),
            sentinels: Vec::new(),
            master_name: None,
            tls: None,
            password_file: None,
            key_prefix: String::new(),
            timeout_ms: 250,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisMode {
    /// One server at `url`.
    Standalone,
    /// A Redis Cluster reached through `nodes`.
    Cluster,
    /// The primary the `sentinels` name `master_name`, followed across failovers.
    Sentinel,
}

/// Files for TLS (`[amqp.tls]`, `[redis.tls]`), all PEM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The CA that signed the server's certificate. For Redis it replaces the system's
    /// roots; for the broker, lapin's verifier trusts it besides the platform's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// A client certificate (with `key_file`), for servers that require mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

/// The contents of the files of a `TlsFiles`.
#[derive(Clone, Default)]
pub struct TlsPem {
    pub ca: Option<Vec<u8>>,
    /// The client certificate and its key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl TlsFiles {
    /// Checks the table on its own: a certificate needs its key, and every file must be
    /// readable.
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(ConfigError(format!(
                "{key}.cert_file and {key}.key_file go together: set both for a client certificate, or neither"
            )));
        }
        self.read(key).map(|_| ())
    }

    /// Reads the files, naming the first that cannot be read.
    pub fn read(&self, key: &str) -> Result<TlsPem, ConfigError> {
        let read = |field: &str, path: &Option<PathBuf>| -> Result<Option<Vec<u8>>, ConfigError> {
            path.as_ref()
                .map(|path| {
                    std::fs::read(path).map_err(|e| {
                        ConfigError(format!(
                            "{key}.{field} {} cannot be read: {e}",
                            path.display()
                        ))
                    })
                })
                .transpose()
        };
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certificates = |field: &str, pem: &Option<Vec<u8>>| -> Result<(), ConfigError> {
            let Some(pem) = pem else { return Ok(()) };
            let parsed: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
            match parsed {
                Ok(certs) if !certs.is_empty() => Ok(()),
                _ => Err(ConfigError(format!(
                    "{key}.{field} holds no PEM certificate that can be read"
                ))),
            }
        };
        let ca = read("ca_file", &self.ca_file)?;
        certificates("ca_file", &ca)?;
        let cert = read("cert_file", &self.cert_file)?;
        certificates("cert_file", &cert)?;
        let private_key = read("key_file", &self.key_file)?;
        if let Some(pem) = &private_key
            && PrivateKeyDer::from_pem_slice(pem).is_err()
        {
            return Err(ConfigError(format!(
                "{key}.key_file holds no PEM private key that can be read"
            )));
        }
        Ok(TlsPem {
            ca,
            identity: cert.zip(private_key),
        })
    }
}

/// Refuses a list whose URLs do not all use TLS or all not: a plaintext one would carry the
/// password in clear, and the clients cannot mix them.
fn same_scheme(key: &str, urls: &[SecretUrl]) -> Result<(), ConfigError> {
    let secure = |url: &SecretUrl| {
        let scheme = url.expose().split("://").next().unwrap_or_default();
        matches!(scheme, "amqps" | "rediss" | "valkeys")
    };
    if urls.iter().any(secure) && !urls.iter().all(secure) {
        return Err(ConfigError(format!(
            "{key} mixes TLS and plaintext URLs; use amqps:// or rediss:// for all of them, or for none"
        )));
    }
    Ok(())
}

/// A list, from a TOML array or from one comma-separated string (an environment variable).
fn list_or_commas<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<SecretUrl>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        Many(Vec<String>),
        One(String),
    }
    let items = match OneOrMany::deserialize(d)? {
        OneOrMany::Many(items) => items,
        OneOrMany::One(text) => text.split(',').map(str::to_owned).collect(),
    };
    Ok(items
        .into_iter()
        .map(|item| item.trim().to_owned())
        .filter(|item| !item.is_empty())
        .map(SecretUrl)
        .collect())
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub algorithm: Algorithm,
    pub requests: u64,
    pub window_seconds: u64,
    /// `token_bucket` only: messages allowed at once; `requests` when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
    /// Decide and report, but forward what would be rejected (header
    /// `x-ratelimit-shadow: rejected`): the safe way to roll out a new limit.
    pub shadow: bool,
    /// Which rejections ask the notifier to tell the user (`notify_user` in the body).
    pub notify: Notify,
    /// How often every instance reads the live overrides hash in Redis; 0 turns it off.
    pub redis_overrides_refresh_ms: u64,
    /// Count a message once: a redelivery (same message id) within the window gets the
    /// first decision back instead of using up another unit of the limit.
    pub count_once: bool,
    pub max_message_bytes: usize,
    /// What to do with a message whose check failed because Redis did not answer in time.
    pub on_redis_error: OnRedisError,
    /// What happens to a message over its limit.
    pub on_limit: OnLimit,
    /// With `on_limit = "defer"`: the longest a message may wait, from its first arrival,
    /// before it is rejected after all.
    pub max_defer_seconds: u64,
    /// What happens to a message whose id already had a confirmed output.
    pub duplicates: Duplicates,
    /// With `duplicates = "drop"`: how long an id's confirmed output is remembered.
    pub duplicate_window_seconds: u64,
    pub overrides: Vec<Override>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Duplicates {
    /// Forwarded again, marked `x-ratelimit-replayed: true`.
    Forward,
    /// Acked with no second output (outcome `duplicate`).
    Drop,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::FixedWindow,
            requests: 30,
            window_seconds: 60,
            burst: None,
            shadow: false,
            notify: Notify::OncePerWindow,
            redis_overrides_refresh_ms: 2000,
            count_once: true,
            max_message_bytes: 1024 * 1024,
            on_redis_error: OnRedisError::Allow,
            on_limit: OnLimit::Reject,
            max_defer_seconds: 3600,
            duplicates: Duplicates::Forward,
            duplicate_window_seconds: 600,
            overrides: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// The Python router's window: INCR + EXPIRE on its key; up to twice the limit can
    /// pass across a window boundary.
    FixedWindow,
    /// The rolling two-window weighted counter: no boundary burst, O(1) memory.
    SlidingWindow,
    /// GCRA: `requests` per window on average, up to `burst` at once.
    TokenBucket,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Notify {
    /// Every rejection carries `notify_user: true`.
    Every,
    /// Only the first rejection per (tenant, channel, sender) until the sender may write
    /// again carries `notify_user: true`; the rest carry `false`.
    OncePerWindow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnLimit {
    /// Publish a `rate_limited` notification.
    Reject,
    /// Park the message in the broker until its window can allow it.
    Defer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnRedisError {
    /// Forward unchecked, marked with `x-ratelimit-degraded: true`.
    Allow,
    /// Keep the message unacknowledged and retry until Redis answers.
    Hold,
}

/// A limit for one tenant, or for one (tenant, channel). Fields left out fall back to the
/// tenant-wide override, then to the global limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    pub tenant: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<Algorithm>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_limit: Option<OnLimit>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// `/healthz` fails when messages are in flight and none was settled for this long:
    /// the pipeline is stuck, and a restart is the cure.
    pub stall_seconds: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            stall_seconds: 120,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Json,
    Text,
}

/// A connection URL that may carry a password. It prints (Debug, Display, Serialize) with
/// the password replaced, so it can appear in logs and `check-config` output.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The real URL, for connecting only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

/// Where the user information of `url` lies: between `://` (or the start, for a string
/// that is not a URL at all) and the last `@`. The last one, not the first: a password
/// with an unencoded `@`, `/`, `#` or `?` must still be hidden whole, whatever a URL
/// parser would make of it.
fn userinfo_span(url: &str) -> Option<(usize, usize)> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let at = url[start..].rfind('@')? + start;
    Some((start, at))
}

/// Query parameters that carry a password (the Redis client reads `pass` and `password`).
const PASSWORD_PARAMS: [&str; 2] = ["password", "pass"];

/// Replaces the password of `scheme://user:password@host/...` (and of a `password` or
/// `pass` query parameter) with `***`. Everything up to the last `@` counts as user
/// information, so no fragment of a malformed password is ever printed.
pub fn redact_url(url: &str) -> String {
    let mut out = match userinfo_span(url) {
        None => url.to_owned(),
        Some((start, at)) => match url[start..at].split_once(':') {
            Some((user, _)) if start > 0 && !user.contains(['/', '?', '#', '@']) => {
                format!("{}{user}:***{}", &url[..start], &url[at..])
            }
            Some(_) => format!("{}***{}", &url[..start], &url[at..]),
            // A user name alone is no secret, in a well-formed URL.
            None if start > 0 => url.to_owned(),
            None => format!("***{}", &url[at..]),
        },
    };
    for (_, value) in query_secrets(&out.clone()) {
        out = out.replace(&format!("={value}"), "=***");
    }
    out
}

/// The values of the password parameters of `url`'s query.
fn query_secrets(url: &str) -> Vec<(String, String)> {
    let Some((_, query)) = url.split_once('?') else {
        return Vec::new();
    };
    query
        .split(['&', '#'])
        .filter_map(|pair| pair.split_once('='))
        .filter(|(name, value)| {
            PASSWORD_PARAMS.contains(&percent_decode(name).to_ascii_lowercase().as_str())
                && !value.is_empty()
                && *value != "***"
        })
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect()
}

/// Redacts every URL found in `text` (an error message that quotes a configuration value
/// or a line of the file): each run of characters around a `://` up to a space or quote.
pub fn redact_urls_in(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let boundary = |c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '>');
    while let Some(i) = rest.find("://") {
        let start = rest[..i]
            .char_indices()
            .rev()
            .find(|&(_, c)| boundary(c))
            .map_or(0, |(b, c)| b + c.len_utf8());
        let end = rest[i..].find(boundary).map_or(rest.len(), |e| i + e);
        out.push_str(&rest[..start]);
        out.push_str(&redact_url(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// The secrets of a URL, as written (percent-encoded or not): its password and the values
/// of its password query parameters.
fn secrets_of(url: &str) -> Vec<String> {
    let mut secrets: Vec<String> = query_secrets(url).into_iter().map(|(_, v)| v).collect();
    if let Some((start, at)) = userinfo_span(url)
        && let Some((_, password)) = url[start..at].split_once(':')
        && !password.is_empty()
    {
        secrets.push(password.to_owned());
    }
    secrets
}

/// Refuses what a URL parser would read differently than its author meant: no `://`, or
/// an unencoded `@ / # ?` in the user name or password. The message never quotes the URL
/// beyond its redacted form.
fn check_url_shape(key: &str, url: &SecretUrl) -> Result<(), ConfigError> {
    let Some(scheme_end) = url.expose().find("://") else {
        return Err(ConfigError(format!(
            "{key} must look like scheme://user:password@host:port/..., and it has no `://`"
        )));
    };
    let Some((start, at)) = userinfo_span(url.expose()) else {
        return Ok(());
    };
    if start == scheme_end + 3 && url.expose()[start..at].contains(['@', '/', '?', '#']) {
        return Err(ConfigError(format!(
            "{key} ({url}) has an unencoded @, /, # or ? in its user name or password; \
             percent-encode them (%40, %2F, %23, %3F)"
        )));
    }
    Ok(())
}

/// Removes every secret of `urls` from `text` (an error message a client library wrote,
/// which may quote its URL): each password as written and percent-decoded, and any URL
/// left in the text.
pub fn scrub(text: &str, urls: &[&SecretUrl]) -> String {
    let mut out = redact_urls_in(text);
    for url in urls {
        for secret in secrets_of(url.expose()) {
            let decoded = percent_decode(&secret);
            for secret in [secret.as_str(), decoded.as_str()] {
                if !secret.is_empty() {
                    out = out.replace(secret, "***");
                }
            }
        }
    }
    out
}

/// `url` with its password replaced by `password` (percent-encoded), keeping the user name.
fn with_password(url: &str, password: &str) -> Option<String> {
    let start = url.find("://")? + 3;
    let encoded: String = password
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (user, host_start) = match url[start..].rfind('@') {
        Some(at) => {
            let userinfo = &url[start..start + at];
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            (user, start + at + 1)
        }
        None => ("", start),
    };
    Some(format!(
        "{}{user}:{encoded}@{}",
        &url[..start],
        &url[host_start..]
    ))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Config {
    /// Loads defaults, then `path` (which must exist when given), then the environment,
    /// and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(path, Env::prefixed(ENV_PREFIX).split("__"))
    }

    fn load_with_env(path: Option<&Path>, env: Env) -> Result<Self, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = path {
            if !path.is_file() {
                return Err(ConfigError(format!(
                    "configuration file {} does not exist or is not a file",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        let mut config: Config = figment
            .merge(env)
            .extract()
            .map_err(|error| ConfigError(redact_urls_in(&describe_figment_error(error))))?;
        config.read_password_files()?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a TOML document on its own (no environment), for tests and reloads.
    pub fn from_toml_str(toml: &str) -> Result<Self, ConfigError> {
        let config: Config = Figment::new()
            .merge(Toml::string(toml))
            .extract()
            .map_err(|error| ConfigError(redact_urls_in(&describe_figment_error(error))))?;
        config.validate()?;
        Ok(config)
    }

    /// Puts the password of each `password_file` into its URLs.
    fn read_password_files(&mut self) -> Result<(), ConfigError> {
        let amqp = &mut self.amqp;
        let redis = &mut self.redis;
        for (key, file, urls) in [
            (
                "amqp.password_file",
                &amqp.password_file,
                std::iter::once(&mut amqp.url)
                    .chain(&mut amqp.urls)
                    .collect::<Vec<_>>(),
            ),
            (
                "redis.password_file",
                &redis.password_file,
                std::iter::once(&mut redis.url)
                    .chain(&mut redis.nodes)
                    .collect(),
            ),
        ] {
            let Some(path) = file else { continue };
            let password = std::fs::read_to_string(path).map_err(|e| {
                ConfigError(format!("{key} {} cannot be read: {e}", path.display()))
            })?;
            // A mounted secret often ends with a newline that is not part of it.
            let password = password.trim_end_matches(['\n', '\r']);
            for url in urls {
                *url = SecretUrl(with_password(url.expose(), password).ok_or_else(|| {
                    ConfigError(format!(
                        "{key} is set, but a URL it belongs to has no `scheme://host`"
                    ))
                })?);
            }
        }
        Ok(())
    }

    /// Every URL of the configuration, for scrubbing what a client library wrote.
    pub fn urls(&self) -> Vec<&SecretUrl> {
        let (amqp, redis) = (&self.amqp, &self.redis);
        std::iter::once(&amqp.url)
            .chain(&amqp.urls)
            .chain(std::iter::once(&redis.url))
            .chain(&redis.nodes)
            .chain(&redis.sentinels)
            .collect()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(ConfigError(msg));
        let amqp = &self.amqp;
        for (key, url) in amqp.addresses() {
            check_url_shape(&key, url)?;
            if let Err(e) = url.expose().parse::<lapin::uri::AMQPUri>() {
                return fail(format!(
                    "{key} is not a valid AMQP URL ({url}): {}",
                    scrub(&e.to_string(), &[url])
                ));
            }
        }
        same_scheme("amqp.urls", &amqp.urls)?;
        if let Some(tls) = &amqp.tls {
            tls.validate("amqp.tls")?;
            if !amqp
                .addresses()
                .iter()
                .any(|(_, url)| url.expose().starts_with("amqps://"))
            {
                return fail(
                    "amqp.tls is set, but no broker URL is amqps://; use amqps:// for TLS".into(),
                );
            }
        }
        self.redis.validate()?;
        for (key, name) in [
            ("amqp.inbound_queue", &amqp.inbound_queue),
            ("amqp.orchestrator_queue", &amqp.orchestrator_queue),
            ("amqp.notification_queue", &amqp.notification_queue),
            ("amqp.dead_letter_queue", &amqp.dead_letter_queue),
        ] {
            if name.is_empty() || name.len() > 255 {
                return fail(format!("{key} must be a queue name of 1 to 255 bytes"));
            }
        }
        // The defer ladder's queues are named after the inbound queue.
        let ladder_suffix = ".defer.600s".len();
        if amqp.inbound_queue.len() > 255 - ladder_suffix {
            return fail(format!(
                "amqp.inbound_queue must be at most {} bytes, so that its defer queues (<inbound_queue>.defer.600s) stay within 255",
                255 - ladder_suffix
            ));
        }
        if [
            &amqp.orchestrator_queue,
            &amqp.notification_queue,
            &amqp.dead_letter_queue,
        ]
        .contains(&&amqp.inbound_queue)
        {
            return fail(
                "amqp.inbound_queue must differ from the output queues, or messages would loop"
                    .into(),
            );
        }
        if amqp.prefetch == 0 {
            return fail("amqp.prefetch must be at least 1".into());
        }
        if amqp.delivery_limit == 0 {
            return fail("amqp.delivery_limit must be at least 1".into());
        }
        if amqp.delivery_limit > MAX_DELIVERY_LIMIT {
            return fail(format!(
                "amqp.delivery_limit = {} is out of range (at most {MAX_DELIVERY_LIMIT})",
                amqp.delivery_limit
            ));
        }
        if amqp.shutdown_grace_seconds > MAX_SHUTDOWN_GRACE_SECONDS {
            return fail(format!(
                "amqp.shutdown_grace_seconds = {} is out of range (at most {MAX_SHUTDOWN_GRACE_SECONDS})",
                amqp.shutdown_grace_seconds
            ));
        }
        if !(100..=MAX_CONFIRM_TIMEOUT_MS).contains(&amqp.confirm_timeout_ms) {
            return fail(format!(
                "amqp.confirm_timeout_ms = {} is out of range (100 to {MAX_CONFIRM_TIMEOUT_MS})",
                amqp.confirm_timeout_ms
            ));
        }
        if amqp.heartbeat_seconds > MAX_HEARTBEAT_SECONDS {
            return fail(format!(
                "amqp.heartbeat_seconds = {} is out of range (0 to {MAX_HEARTBEAT_SECONDS})",
                amqp.heartbeat_seconds
            ));
        }
        if !(1..=MAX_STALL_SECONDS).contains(&self.http.stall_seconds) {
            return fail(format!(
                "http.stall_seconds = {} is out of range (1 to {MAX_STALL_SECONDS})",
                self.http.stall_seconds
            ));
        }
        // A slow but working pipeline settles within a confirm timeout, a Redis timeout
        // and a hand-back pause: liveness must wait longer than that.
        let slowest_ms = amqp
            .confirm_timeout_ms
            .saturating_add(self.redis.timeout_ms)
            .saturating_add(2_000);
        if self.http.stall_seconds.saturating_mul(1000) <= slowest_ms {
            return fail(format!(
                "http.stall_seconds = {} must exceed amqp.confirm_timeout_ms + redis.timeout_ms + 2 s ({} ms), or a slow but working gate would be restarted",
                self.http.stall_seconds, slowest_ms
            ));
        }
        if !(1..=MAX_REDIS_TIMEOUT_MS).contains(&self.redis.timeout_ms) {
            return fail(format!(
                "redis.timeout_ms = {} is out of range (1 to {MAX_REDIS_TIMEOUT_MS})",
                self.redis.timeout_ms
            ));
        }
        self.limits.validate().map_err(ConfigError)?;
        if let Err(e) = self.log.level.parse::<tracing_subscriber::EnvFilter>() {
            return fail(format!(
                "log.level {:?} is not a valid filter: {e}",
                self.log.level
            ));
        }
        Ok(())
    }

    /// The effective configuration as TOML, with secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the configuration always serializes")
    }

    /// The keys (`section.key`) whose values differ between `self` and `other`.
    pub fn changed_keys(&self, other: &Config) -> Vec<String> {
        let table = |c: &Config| match toml::Value::try_from(c) {
            Ok(toml::Value::Table(t)) => t,
            _ => toml::Table::new(),
        };
        let (old, new) = (table(self), table(other));
        let mut changed = Vec::new();
        for (section, old_section) in &old {
            let empty = toml::Table::new();
            let old_keys = old_section.as_table().unwrap_or(&empty);
            let new_keys = new
                .get(section)
                .and_then(|v| v.as_table())
                .unwrap_or(&empty);
            let mut names: Vec<&String> = old_keys.keys().chain(new_keys.keys()).collect();
            names.sort();
            names.dedup();
            for name in names {
                if old_keys.get(name) != new_keys.get(name) {
                    changed.push(format!("{section}.{name}"));
                }
            }
        }
        // URLs print redacted: a new password alone must still count as a change.
        for (key, a, b) in [
            ("amqp.url", &self.amqp.url, &other.amqp.url),
            ("redis.url", &self.redis.url, &other.redis.url),
        ] {
            if a != b && !changed.iter().any(|c| c == key) {
                changed.push(key.to_owned());
            }
        }
        for (key, a, b) in [
            ("amqp.urls", &self.amqp.urls, &other.amqp.urls),
            ("redis.nodes", &self.redis.nodes, &other.redis.nodes),
            (
                "redis.sentinels",
                &self.redis.sentinels,
                &other.redis.sentinels,
            ),
        ] {
            if a != b && !changed.iter().any(|c| c == key) {
                changed.push(key.to_owned());
            }
        }
        changed
    }

    /// `text` with every password of the configured URLs removed.
    pub fn scrub(&self, text: &str) -> String {
        scrub(text, &self.urls())
    }
}

impl AmqpConfig {
    /// The brokers to connect to, each with the key that names it: `urls`, else `url`.
    pub fn addresses(&self) -> Vec<(String, &SecretUrl)> {
        if self.urls.is_empty() {
            vec![("amqp.url".to_owned(), &self.url)]
        } else {
            self.urls
                .iter()
                .enumerate()
                .map(|(i, url)| (format!("amqp.urls[{i}]"), url))
                .collect()
        }
    }
}

impl RedisConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(ConfigError(msg));
        let check = |key: &str, url: &SecretUrl| -> Result<(), ConfigError> {
            check_url_shape(key, url)?;
            match redis::Client::open(url.expose()) {
                Ok(_) => Ok(()),
                Err(e) => fail(format!(
                    "{key} is not a valid Redis URL ({url}): {}",
                    scrub(&e.to_string(), &[url])
                )),
            }
        };
        check("redis.url", &self.url)?;
        let mode = match self.mode {
            RedisMode::Standalone => "standalone",
            RedisMode::Cluster => "cluster",
            RedisMode::Sentinel => "sentinel",
        };
        for (key, set, wants) in [
            ("redis.nodes", !self.nodes.is_empty(), RedisMode::Cluster),
            (
                "redis.sentinels",
                !self.sentinels.is_empty(),
                RedisMode::Sentinel,
            ),
            (
                "redis.master_name",
                self.master_name.is_some(),
                RedisMode::Sentinel,
            ),
        ] {
            if set && self.mode != wants {
                return fail(format!(
                    "{key} is set, but redis.mode is \"{mode}\", which does not use it"
                ));
            }
        }
        for (key, list) in [
            ("redis.nodes", &self.nodes),
            ("redis.sentinels", &self.sentinels),
        ] {
            same_scheme(key, list)?;
        }
        match self.mode {
            RedisMode::Standalone => {}
            RedisMode::Cluster => {
                if self.nodes.is_empty() {
                    return fail(
                        "redis.mode = \"cluster\" needs redis.nodes, the URLs of one or more seed nodes".into(),
                    );
                }
                for (i, url) in self.nodes.iter().enumerate() {
                    check(&format!("redis.nodes[{i}]"), url)?;
                }
                // Companion keys are tagged with their whole counter key: a brace in the
                // prefix would move one of them into another slot.
                if self.key_prefix.contains(['{', '}']) {
                    return fail(
                        "redis.key_prefix must not contain { or } in cluster mode: the gate tags each key itself so that a counter and its companions share a slot".into(),
                    );
                }
            }
            RedisMode::Sentinel => {
                if self.sentinels.is_empty() {
                    return fail(
                        "redis.mode = \"sentinel\" needs redis.sentinels, the URLs of the sentinels".into(),
                    );
                }
                for (i, url) in self.sentinels.iter().enumerate() {
                    check(&format!("redis.sentinels[{i}]"), url)?;
                }
                if self.master_name.as_deref().is_none_or(str::is_empty) {
                    return fail(
                        "redis.mode = \"sentinel\" needs redis.master_name, the name the sentinels monitor the primary under".into(),
                    );
                }
            }
        }
        if let Some(tls) = &self.tls {
            tls.validate("redis.tls")?;
            let in_use: Vec<&SecretUrl> = match self.mode {
                RedisMode::Standalone | RedisMode::Sentinel => vec![&self.url],
                RedisMode::Cluster => self.nodes.iter().collect(),
            };
            if !in_use
                .iter()
                .any(|url| url.expose().starts_with("rediss://"))
            {
                return fail(
                    "redis.tls is set, but the Redis URL is not rediss://; use rediss:// for TLS"
                        .into(),
                );
            }
        }
        Ok(())
    }
}

impl LimitsConfig {
    /// Checks `[limits]` alone (what a reload applies), naming the first bad key.
    pub fn validate(&self) -> Result<(), String> {
        let limits = self;
        let fail = |msg: String| Err(msg);
        check_limit_numbers(
            "limits",
            Some(limits.requests),
            Some(limits.window_seconds),
            limits.burst,
        )?;
        if !(1..=MAX_MESSAGE_BYTES).contains(&limits.max_message_bytes) {
            return fail(format!(
                "limits.max_message_bytes = {} is out of range (1 to {MAX_MESSAGE_BYTES})",
                limits.max_message_bytes
            ));
        }
        if !(1..=MAX_DEFER_SECONDS).contains(&limits.max_defer_seconds) {
            return fail(format!(
                "limits.max_defer_seconds = {} is out of range (1 to {MAX_DEFER_SECONDS})",
                limits.max_defer_seconds
            ));
        }
        if !(1..=MAX_DUPLICATE_WINDOW_SECONDS).contains(&limits.duplicate_window_seconds) {
            return fail(format!(
                "limits.duplicate_window_seconds = {} is out of range (1 to {MAX_DUPLICATE_WINDOW_SECONDS})",
                limits.duplicate_window_seconds
            ));
        }
        if limits.redis_overrides_refresh_ms > MAX_OVERRIDES_REFRESH_MS {
            return fail(format!(
                "limits.redis_overrides_refresh_ms = {} is out of range (at most {MAX_OVERRIDES_REFRESH_MS})",
                limits.redis_overrides_refresh_ms
            ));
        }
        for (i, o) in limits.overrides.iter().enumerate() {
            let key = format!("limits.overrides[{i}]");
            if !valid_tenant_id(&o.tenant) {
                return fail(format!(
                    "{key}.tenant {:?} is not a valid tenant_id (1-128 of A-Z a-z 0-9 . _ -, first alphanumeric)",
                    o.tenant
                ));
            }
            if let Some(channel) = &o.channel
                && !valid_channel(channel)
            {
                return fail(format!(
                    "{key}.channel {channel:?} is not a valid channel (1-32 of a-z 0-9 _ -)"
                ));
            }
            check_limit_numbers(&key, o.requests, o.window_seconds, o.burst)?;
            let duplicate = limits.overrides[..i]
                .iter()
                .any(|p| p.tenant == o.tenant && p.channel == o.channel);
            if duplicate {
                return fail(format!(
                    "{key} repeats an earlier override for the same tenant and channel"
                ));
            }
        }
        Ok(())
    }
}

/// `text` without the quoted source lines of a parser's error (`12 | url = "…"` and the
/// `|   ^` markers below them).
fn without_source_lines(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|line| {
            let digits = line.trim_start_matches(|c: char| c.is_ascii_digit());
            !line.is_empty() && !digits.trim_start().starts_with('|')
        })
        .collect::<Vec<_>>()
        .join(": ")
}

fn describe_figment_error(error: figment::Error) -> String {
    // figment chains one error per failing key; the first is the one to fix first.
    let first = error.into_iter().next();
    match first {
        Some(e) => {
            let key = e.path.join(".");
            let mut text = match &e.kind {
                figment::error::Kind::UnknownField(field, expected) => format!(
                    "unknown key `{field}`; this section accepts {}",
                    expected.join(", ")
                ),
                figment::error::Kind::UnknownVariant(found, expected) => {
                    format!("`{found}` is not one of {}", expected.join(", "))
                }
                // A parse error quotes the offending line of the file, which may hold a
                // password no URL parser can delimit (a stray quote in it): keep only
                // where the error is and what it is.
                kind => without_source_lines(&kind.to_string()),
            };
            if !key.is_empty() {
                text = format!("configuration key `{key}`: {text}");
            }
            let from_env = e
                .metadata
                .as_ref()
                .is_some_and(|m| m.name.contains("environment"));
            if from_env {
                let var: Vec<String> = e.path.iter().map(|p| p.to_uppercase()).collect();
                text.push_str(&format!(
                    " (from environment variable {ENV_PREFIX}{})",
                    var.join("__")
                ));
            } else if let Some(source) = e.metadata.as_ref().and_then(|m| m.source.as_ref()) {
                text.push_str(&format!(" (from {source})"));
            }
            text
        }
        None => "the configuration is invalid".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> Env {
        Env::prefixed("KONSTRUCT_GATE_TEST_UNSET_PREFIX__").split("__")
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::load_with_env(None, no_env()).unwrap();
        assert_eq!(c.amqp.inbound_queue, "konstruct.inbound");
        assert_eq!(c.amqp.orchestrator_queue, "konstruct.orchestrator");
        assert_eq!(c.amqp.notification_queue, "konstruct.notifications");
        assert_eq!(c.amqp.dead_letter_queue, "konstruct.dead-letter");
        assert_eq!(c.amqp.prefetch, 256);
        assert!(c.amqp.declare_queues);
        assert_eq!(c.redis.key_prefix, "");
        assert_eq!(c.limits.requests, 30);
        assert_eq!(c.limits.window_seconds, 60);
        assert_eq!(c.limits.max_message_bytes, 1_048_576);
        assert_eq!(c.http.listen.to_string(), "127.0.0.1:9464");
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn the_shipped_default_file_equals_the_built_in_defaults() {
        let shipped = Config::from_toml_str(include_str!("../config/default.toml")).unwrap();
        assert_eq!(
            shipped.to_redacted_toml(),
            Config::default().to_redacted_toml()
        );
    }

    #[test]
    fn the_example_file_is_valid() {
        let example = Config::from_toml_str(include_str!("../config/example.toml")).unwrap();
        assert!(!example.limits.overrides.is_empty());
    }

    #[test]
    fn unknown_key_is_refused_by_name() {
        let err = Config::from_toml_str("[amqp]\nprefech = 10\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("prefech"), "{text}");
    }

    #[test]
    fn bad_value_is_refused_by_name() {
        let err = Config::from_toml_str("[limits]\nrequests = \"many\"\n").unwrap_err();
        assert!(err.to_string().contains("limits.requests"), "{err}");
        let err = Config::from_toml_str("[limits]\nrequests = 0\n").unwrap_err();
        assert!(err.to_string().contains("limits.requests"), "{err}");
        let err = Config::from_toml_str("[log]\nformat = \"xml\"\n").unwrap_err();
        assert!(err.to_string().contains("log.format"), "{err}");
        let err = Config::from_toml_str("[[limits.overrides]]\ntenant = \"-bad\"\n").unwrap_err();
        assert!(
            err.to_string().contains("limits.overrides[0].tenant"),
            "{err}"
        );
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure returns figment::Error
    fn environment_overrides_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("gate.toml", "[limits]\nrequests = 5\nwindow_seconds = 7\n")?;
            jail.set_env("KONSTRUCT_GATE__LIMITS__REQUESTS", "9");
            jail.set_env(
                "KONSTRUCT_GATE__AMQP__URL",
                "amqp://u:hunter2@rabbit:5672/%2f",
            );
            let c = Config::load(Some(Path::new("gate.toml"))).unwrap();
            assert_eq!(c.limits.requests, 9);
            assert_eq!(c.limits.window_seconds, 7);
            assert_eq!(c.amqp.url.expose(), "amqp://u:hunter2@rabbit:5672/%2f");
            let printed = c.to_redacted_toml();
            assert!(!printed.contains("hunter2"), "{printed}");
            assert!(
                printed.contains("amqp://u:***@rabbit:5672/%2f"),
                "{printed}"
            );
            Ok(())
        });
    }

    #[test]
    fn changed_keys_name_each_difference() {
        let a = Config::default();
        let mut b = a.clone();
        b.limits.max_message_bytes = 10;
        b.limits.notify = Notify::Every;
        b.amqp.prefetch = 10;
        b.redis.url = SecretUrl::new("redis://:other@127.0.0.1:6379/0");
        assert_eq!(
            a.changed_keys(&b),
            vec![
                "amqp.prefetch",
                "limits.max_message_bytes",
                "limits.notify",
                "redis.url"
            ]
        );
        assert!(a.changed_keys(&a.clone()).is_empty());
    }

    #[test]
    fn a_missing_file_is_an_error() {
        let err =
            Config::load_with_env(Some(Path::new("/nonexistent/gate.toml")), no_env()).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/gate.toml"));
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redact_url("redis://h:6379/0"), "redis://h:6379/0");
        assert_eq!(redact_url("redis://user@h"), "redis://user@h");
        assert_eq!(redact_url("amqp://a:b:c@h/v"), "amqp://a:***@h/v");
        let secret = SecretUrl::new("amqp://a:topsecret@h");
        assert!(!format!("{secret:?} {secret}").contains("topsecret"));
    }

    /// Passwords with unencoded `@ / # ?`: no fragment of them in any message.
    const TRICKY: [&str; 3] = ["Xq7@Zr9/Wm3", "Yh4#Lc8?Nv6", "Bd2/Fg5@Hk8#Qs1?Tu4"];

    #[test]
    fn a_malformed_password_is_hidden_whole_and_refused_by_name() {
        for password in TRICKY {
            for (key, url) in [
                (
                    "amqp.url",
                    format!("amqp://gate:{password}@rabbit:5672/%2f"),
                ),
                ("redis.url", format!("redis://gate:{password}@redis:6379/0")),
            ] {
                let redacted = redact_url(&url);
                for fragment in password.split(['@', '/', '#', '?']) {
                    assert!(!redacted.contains(fragment), "{redacted} shows {fragment}");
                }
                let toml = format!("[{}]\nurl = {url:?}\n", &key[..key.len() - 4]);
                let err = Config::from_toml_str(&toml).unwrap_err().to_string();
                assert!(err.contains(key) && err.contains("percent-encode"), "{err}");
                for fragment in password.split(['@', '/', '#', '?']) {
                    assert!(!err.contains(fragment), "{err} shows {fragment}");
                }
            }
        }
    }

    #[test]
    fn no_password_shows_from_a_url_without_scheme_slashes_a_query_or_a_toml_error() {
        for (toml, secret) in [
            (
                "[amqp]\nurl = \"amqp:/gate:Pq9secret@rabbit/\"\n",
                "Pq9secret",
            ),
            (
                "[amqp]\nurl = \"amqp:gate:Pq9secret@rabbit\"\n",
                "Pq9secret",
            ),
            (
                "[redis]\nurl = \"redis+unix:///run/redis.sock?pass=Pq9secret\"\n",
                "Pq9secret",
            ),
            (
                "[amqp]\nurl = \"amqp://gate:ab\\qPq9secret@rabbit\"\n",
                "Pq9secret",
            ),
            (
                "[amqp]\nurl = [\"amqp://gate:Pq9secret@rabbit\"]\n",
                "Pq9secret",
            ),
            (
                "[amqp]\nurl = \"amqp://gate:Pq9\"secret@rabbit\"\n",
                "secret",
            ),
            (
                "[redis]\nurl = \"redis://h/0?PASS=Pq9secret\"\n",
                "Pq9secret",
            ),
            (
                "[redis]\nurl = \"redis://h/0?p%61ss=Pq9secret\"\n",
                "Pq9secret",
            ),
        ] {
            let shown = match Config::from_toml_str(toml) {
                Ok(c) => c.to_redacted_toml(),
                Err(e) => e.to_string(),
            };
            assert!(!shown.contains(secret), "{toml} shows: {shown}");
        }
        assert_eq!(
            redact_url("redis://h:6379/0?protocol=resp3&password=hunter2"),
            "redis://h:6379/0?protocol=resp3&password=***"
        );
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure returns figment::Error
    fn a_password_file_replaces_the_urls_password_and_never_prints() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("amqp-password", "s3cr@t/pw\n")?;
            jail.create_file("redis-password", "r3dis-pw")?;
            jail.create_file(
                "gate.toml",
                "[amqp]\nurl = \"amqp://gate@rabbit:5672/%2f\"\npassword_file = \"amqp-password\"\n\
                 [redis]\nurl = \"redis://:old@cache:6379/0\"\npassword_file = \"redis-password\"\n",
            )?;
            let c = Config::load(Some(Path::new("gate.toml"))).unwrap();
            assert_eq!(
                c.amqp.url.expose(),
                "amqp://gate:s3cr%40t%2Fpw@rabbit:5672/%2f"
            );
            assert_eq!(c.redis.url.expose(), "redis://:r3dis-pw@cache:6379/0");
            let printed = c.to_redacted_toml();
            assert!(
                !printed.contains("s3cr") && !printed.contains("r3dis"),
                "{printed}"
            );
            jail.set_env("KONSTRUCT_GATE__REDIS__PASSWORD_FILE", "/no/such/secret");
            let err = Config::load(Some(Path::new("gate.toml")))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("redis.password_file") && err.contains("/no/such/secret"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure returns figment::Error
    fn lists_come_comma_separated_from_the_environment_and_take_the_password_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("redis-password", "n0des-pw\n")?;
            jail.create_file(
                "gate.toml",
                "[redis]\nmode = \"cluster\"\npassword_file = \"redis-password\"\n",
            )?;
            jail.set_env(
                "KONSTRUCT_GATE__REDIS__NODES",
                "redis://10.0.0.1:6379, redis://10.0.0.2:6379",
            );
            jail.set_env(
                "KONSTRUCT_GATE__AMQP__URLS",
                "amqp://u:pw1@a:5672/%2f,amqp://u:pw2@b:5672/%2f",
            );
            let c = Config::load(Some(Path::new("gate.toml"))).unwrap();
            let nodes: Vec<&str> = c.redis.nodes.iter().map(SecretUrl::expose).collect();
            assert_eq!(
                nodes,
                [
                    "redis://:n0des-pw@10.0.0.1:6379",
                    "redis://:n0des-pw@10.0.0.2:6379"
                ]
            );
            assert_eq!(c.amqp.addresses().len(), 2);
            assert_eq!(c.amqp.addresses()[1].0, "amqp.urls[1]");
            let printed = c.to_redacted_toml();
            for secret in ["n0des", "pw1", "pw2"] {
                assert!(!printed.contains(secret), "{printed}");
            }
            Ok(())
        });
    }

    #[test]
    fn an_inbound_queue_leaves_room_for_its_defer_queues() {
        let toml = |n: usize| format!("[amqp]\ninbound_queue = \"{}\"\n", "q".repeat(n));
        Config::from_toml_str(&toml(244)).unwrap();
        let err = Config::from_toml_str(&toml(245)).unwrap_err().to_string();
        assert!(
            err.contains("amqp.inbound_queue must be at most 244 bytes"),
            "{err}"
        );
    }

    #[test]
    fn each_redis_mode_names_what_it_is_missing() {
        let err = |toml: &str| Config::from_toml_str(toml).unwrap_err().to_string();
        assert!(
            err("[redis]\nnodes = [\"redis://n:6379\"]\n")
                .contains("redis.nodes is set, but redis.mode is \"standalone\""),
            "nodes without mode = cluster"
        );
        assert!(
            err("[redis]\nmode = \"cluster\"\nnodes = [\"rediss://a:6379\", \"redis://b:6379\"]\n")
                .contains("redis.nodes mixes TLS and plaintext"),
        );
        assert!(
            err("[amqp]\nurls = [\"amqps://a:5671\", \"amqp://b:5672\"]\n")
                .contains("amqp.urls mixes TLS and plaintext"),
        );
        assert!(err("[redis]\nmode = \"cluster\"\n").contains("redis.nodes"));
        assert!(err("[redis]\nmode = \"sentinel\"\n").contains("redis.sentinels"));
        assert!(
            err("[redis]\nmode = \"sentinel\"\nsentinels = [\"redis://s:26379\"]\n")
                .contains("redis.master_name")
        );
        assert!(
            err("[redis]\nmode = \"cluster\"\nnodes = [\"redis://n:6379\"]\nkey_prefix = \"{gate}:\"\n")
                .contains("redis.key_prefix")
        );
        assert!(
            err("[redis]\nmode = \"cluster\"\nnodes = [\"redis//n:6379\"]\n")
                .contains("redis.nodes[0]")
        );
        assert!(err("[redis]\nmode = \"ring\"\n").contains("redis.mode"));
        Config::from_toml_str(
            "[redis]\nmode = \"sentinel\"\nsentinels = [\"redis://s:26379\"]\nmaster_name = \"mymaster\"\n",
        )
        .unwrap();
    }

    #[test]
    fn a_tls_table_needs_a_tls_url_and_both_halves_of_a_client_certificate() {
        let err = |toml: &str| Config::from_toml_str(toml).unwrap_err().to_string();
        let dir = std::env::temp_dir().join(format!("gate-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, made.cert.pem()).unwrap();
        let broken = dir.join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
        let key = dir.join("key.pem");
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        let (ca, broken, key) = (ca.display(), broken.display(), key.display());
        assert!(
            err(&format!(
                "[redis]\nurl = \"rediss://h:6380\"\n[redis.tls]\nca_file = \"{broken}\"\n"
            ))
            .contains("redis.tls.ca_file holds no PEM certificate"),
            "a CA file that is not PEM"
        );
        assert!(
            err(&format!(
                "[amqp]\nurl = \"amqps://h:5671\"\n[amqp.tls]\ncert_file = \"{ca}\"\nkey_file = \"{ca}\"\n"
            ))
            .contains("amqp.tls.key_file holds no PEM private key"),
            "a certificate given as the key"
        );
        Config::from_toml_str(&format!(
            "[amqp]\nurl = \"amqps://h:5671\"\n[amqp.tls]\ncert_file = \"{ca}\"\nkey_file = \"{key}\"\n"
        ))
        .unwrap();
        assert!(
            err(&format!("[redis.tls]\nca_file = \"{ca}\"\n")).contains("rediss://"),
            "a TLS table on a plaintext URL"
        );
        assert!(
            err(&format!("[amqp.tls]\nca_file = \"{ca}\"\n")).contains("amqps://"),
            "a TLS table on a plaintext URL"
        );
        assert!(
            err(&format!(
                "[redis]\nurl = \"rediss://h:6380\"\n[redis.tls]\ncert_file = \"{ca}\"\n"
            ))
            .contains("redis.tls.key_file"),
            "a certificate without its key"
        );
        assert!(
            err("[redis]\nurl = \"rediss://h:6380\"\n[redis.tls]\nca_file = \"/no/such/ca.pem\"\n")
                .contains("redis.tls.ca_file /no/such/ca.pem cannot be read"),
        );
        Config::from_toml_str(&format!(
            "[redis]\nurl = \"rediss://h:6380\"\n[redis.tls]\nca_file = \"{ca}\"\n"
        ))
        .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn redaction_never_panics_on_multibyte_text() {
        let text = "x\u{a0}amqp://u:pw@h and \u{3000}redis://:pw2@h \u{2028}";
        let out = redact_urls_in(text);
        assert!(!out.contains("pw"), "{out}");
    }

    #[test]
    fn scrub_removes_a_password_as_written_and_decoded() {
        let url = SecretUrl::new("redis://u:s%40cret%2Fpw@h:6379/0");
        let text = "failed: redis://u:s%40cret%2Fpw@h:6379/0 said s@cret/pw";
        let clean = scrub(text, &[&url]);
        assert!(!clean.contains("cret"), "{clean}");
    }

    #[test]
    fn numbers_out_of_range_are_refused_by_name() {
        for (toml, key) in [
            (
                "[limits]\nrequests = 100000000000000000\n",
                "limits.requests",
            ),
            (
                "[limits]\nwindow_seconds = 31622401\n",
                "limits.window_seconds",
            ),
            ("[limits]\nburst = 1000000001\n", "limits.burst"),
            (
                "[limits]\nmax_message_bytes = 134217729\n",
                "limits.max_message_bytes",
            ),
            (
                "[amqp]\nshutdown_grace_seconds = 9223372036854775807\n",
                "amqp.shutdown_grace_seconds",
            ),
            ("[amqp]\nprefetch = 65536\n", "amqp.prefetch"),
            ("[redis]\ntimeout_ms = 60001\n", "redis.timeout_ms"),
            (
                "[[limits.overrides]]\ntenant = \"acme\"\nrequests = 1000000001\n",
                "limits.overrides[0].requests",
            ),
        ] {
            let err = Config::from_toml_str(toml).unwrap_err().to_string();
            assert!(err.contains(key), "{toml}: {err}");
        }
        let edge = "[limits]\nrequests = 1000000000\nwindow_seconds = 31622400\n\
                    max_message_bytes = 134217728\n[amqp]\nshutdown_grace_seconds = 3600\n";
        Config::from_toml_str(edge).expect("the bounds themselves are accepted");
    }
}
