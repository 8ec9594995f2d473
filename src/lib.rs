//! # konstruct-gate
//!
//! A horizontally scaled rate-limiting worker between Konstruct's channel gateway and its
//! orchestrator workers. It consumes normalized chat messages from RabbitMQ, checks each
//! against its (tenant, channel) window in Redis, and publishes it to exactly one of three
//! queues: the orchestrator (allowed), the notifier (rate limited) or the dead letters
//! (unreadable). An inbound message is acked only after that output is confirmed.
//!
//! # Layout
//!
//! - [`pipeline`]: what happens to one batch of messages, top to bottom: parse → decide →
//!   route → publish → confirm.
//! - [`session`]: one broker session after another: connect, watch, consume, settle, and
//!   reconnect with backoff.
//! - [`message`]: the inbound envelope: borrowing parse and validation, the error codes.
//! - [`limit`]: override resolution, decisions, the atomic Redis scripts, the rejection cache,
//!   and the way to Redis: one server, a Redis Cluster, or the primary Sentinel names.
//! - [`route`]: a verdict turned into the one outgoing message (a pure function).
//! - [`acks`]: settling out-of-order completions with in-order cumulative acks, and held
//!   messages without blocking the rest.
//! - [`health`]: readiness from the consumer, the Redis probe and the checks themselves.
//! - [`amqp`]: the brokers (one, or the nodes of a cluster, over TLS or not), queue
//!   declaration, the confirming publisher.
//! - [`ladder`]: the defer ladder's delay queues, declared only when a rule defers.
//! - [`admin`]: `konstruct-gate limits …`, the operators' commands on the limits in Redis.
//! - [`config`]: typed configuration, layered loading, validation, redaction.
//! - [`app`]: the application the binary and the tests start.
//! - [`http`]: `/healthz`, `/readyz`, `/metrics`.
//! - [`telemetry`]: the log subscriber and every metric name.
//! - [`shutdown`]: signals and the second-signal exit.

pub mod acks;
pub mod admin;
pub mod amqp;
pub mod app;
pub mod config;
pub mod health;
pub mod http;
pub mod ladder;
pub mod limit;
pub mod message;
pub mod pipeline;
pub mod route;
pub mod session;
pub mod shards;
pub mod shutdown;
pub mod telemetry;
pub mod top;

pub use app::Application;
pub use config::Config;
