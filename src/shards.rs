//! A sharded inbound (`amqp.inbound_shards = N`): an exchange of type `x-consistent-hash`
//! named like the inbound queue, and N queues `{inbound_queue}.{k}` bound to it with equal
//! weights. The gateway publishes with the tenant as routing key, so one tenant's backlog
//! fills one shard and never delays the tenants of the others; every gate consumes every
//! shard (and the plain queue, for gateways that have not moved over yet).
//!
//! Shrinking N leaves shards past the new N behind: a gate goes on consuming every one that
//! still exists, so no message is stranded. Bindings are only ever added: during a rolling
//! change of N, gates of the old and the new N run side by side, and neither may take a
//! shard off the exchange that the other still fills; an operator unbinds a retired shard
//! once the rollout is over, and deletes it once it is empty.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Connection, ExchangeKind};

use crate::config::AmqpConfig;

/// The exchange type of the sharded inbound (RabbitMQ's `rabbitmq_consistent_hash_exchange`).
pub const EXCHANGE_TYPE: &str = "x-consistent-hash";

/// The binding key of every shard: its weight on the hash ring, equal for all.
const WEIGHT: &str = "1";

/// The most shards; with the plain queue, every one is consumed by every gate.
pub const MAX_SHARDS: u16 = 1024;

/// Shard `k` of `inbound`.
pub fn shard_queue(inbound: &str, k: u16) -> String {
    format!("{inbound}.{k}")
}

/// The sharded inbound could not be set up, in one sentence.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error(
        "the broker has no x-consistent-hash exchange type, so the sharded inbound cannot be \
         set up: enable it with `rabbitmq-plugins enable rabbitmq_consistent_hash_exchange`"
    )]
    NoPlugin,
    #[error("the sharded inbound cannot be set up: {0}")]
    Broker(#[from] lapin::Error),
}

/// True when `error` is the broker not knowing an exchange type (it closes the connection
/// with COMMAND_INVALID).
fn is_unknown_exchange_type(error: &lapin::Error) -> bool {
    error.to_string().contains("unknown exchange type")
}

/// The arguments of a shard queue: those of the inbound queue, and for quorum queues
/// leaders spread over the cluster's nodes.
pub fn shard_arguments(inbound: &FieldTable, quorum: bool) -> FieldTable {
    let mut args = inbound.clone();
    if quorum {
        args.insert(
            "x-queue-leader-locator".into(),
            AMQPValue::LongString("balanced".into()),
        );
    }
    args
}

/// Declares the inbound exchange and binds shards `0..N` to it. Runs on a connection of its
/// own: a broker without the plugin answers the declare by closing the whole connection.
pub async fn declare_exchange(conn: &Connection, config: &AmqpConfig) -> Result<(), ShardError> {
    let channel = conn.create_channel().await?;
    let declared = channel
        .exchange_declare(
            ShortString::from(config.inbound_queue.as_str()),
            ExchangeKind::Custom(EXCHANGE_TYPE.into()),
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    if let Err(e) = declared {
        return Err(if is_unknown_exchange_type(&e) {
            ShardError::NoPlugin
        } else {
            e.into()
        });
    }
    for k in 0..config.inbound_shards {
        channel
            .queue_bind(
                ShortString::from(shard_queue(&config.inbound_queue, k)),
                ShortString::from(config.inbound_queue.as_str()),
                ShortString::from(WEIGHT),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    let _ = channel.close(200, ShortString::from("declared")).await;
    Ok(())
}

/// Whether `queue` exists (a passive declare, on a channel of its own: a missing queue
/// closes it). False when the broker cannot be asked either.
pub async fn exists(conn: &Connection, queue: &str) -> bool {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    crate::amqp::declare_on_own_channel(conn, queue, passive, &FieldTable::default())
        .await
        .is_ok()
}

/// How many missing shards in a row end the search for retired ones: an operator deletes
/// them from the highest down, but may have deleted a few out of order.
const RETIRED_GAP: u16 = 8;

/// The shards past `amqp.inbound_shards` that still exist (a smaller N than before, or
/// none at all now): found one by one from shard N on, until [`RETIRED_GAP`] in a row are
/// missing.
pub async fn retired_shards(conn: &Connection, config: &AmqpConfig) -> Vec<String> {
    let mut found = Vec::new();
    let mut missing = 0;
    for k in config.inbound_shards..MAX_SHARDS {
        let queue = shard_queue(&config.inbound_queue, k);
        if exists(conn, &queue).await {
            missing = 0;
            found.push(queue);
        } else {
            missing += 1;
            if missing == RETIRED_GAP {
                break;
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_named_after_the_inbound_queue() {
        assert_eq!(shard_queue("konstruct.inbound", 0), "konstruct.inbound.0");
        assert_eq!(shard_queue("konstruct.inbound", 15), "konstruct.inbound.15");
    }

    #[test]
    fn quorum_shards_spread_their_leaders() {
        let mut inbound = FieldTable::default();
        inbound.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        let args = shard_arguments(&inbound, true);
        assert_eq!(
            args.inner().get("x-queue-leader-locator"),
            Some(&AMQPValue::LongString("balanced".into()))
        );
        assert!(
            shard_arguments(&FieldTable::default(), false)
                .inner()
                .is_empty()
        );
    }
}
