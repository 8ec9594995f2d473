//! gate-bench: load and drain benchmarks for konstruct-gate against a local RabbitMQ and
//! Redis. `gate-bench load` measures throughput, latency and outcomes through gates it
//! starts; `gate-bench drain` times RabbitMQ's Shovel and the gate side by side;
//! `gate-bench scale` measures a Redis Cluster and growing numbers of keys;
//! `gate-bench soak` watches one gate's memory and open files under a steady rate;
//! `gate-bench flood` measures one tenant's flood against the others, with and without a
//! sharded inbound.

mod drain;
mod flood;
mod load;
mod scale;
mod soak;
mod support;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "gate-bench", version, about)]
struct Cli {
    /// RabbitMQ URL (the broker must be on this machine for `drain`).
    #[arg(
        long,
        global = true,
        env = "GATE_BENCH_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// Redis URL.
    #[arg(
        long,
        global = true,
        env = "GATE_BENCH_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/0"
    )]
    redis_url: String,
    /// Print one JSON document instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Publish through freshly started gates and check every output.
    Load(load::LoadArgs),
    /// Time Shovel and the gate draining the same pre-filled queue, alternating.
    Drain(drain::DrainArgs),
    /// A Redis Cluster against one server, and 1,000 to 1,000,000 distinct keys, on
    /// Redis servers of its own.
    Scale(scale::ScaleArgs),
    /// A steady rate through one gate for a long time, its memory and open files sampled.
    Soak(soak::SoakArgs),
    /// One tenant floods: the other tenants' wait with one inbound queue and with a
    /// sharded inbound, the flood's drain with quiet rejections published or dropped, and
    /// a drain over one shard and many.
    Flood(flood::FloodArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Mode::Load(args) => load::run(args, cli.amqp_url, cli.redis_url, cli.json).await,
        Mode::Drain(args) => drain::run(args, cli.amqp_url, cli.redis_url, cli.json).await,
        Mode::Scale(args) => scale::run(args, cli.amqp_url, cli.json).await,
        Mode::Soak(args) => soak::run(args, cli.amqp_url, cli.redis_url, cli.json).await,
        Mode::Flood(args) => flood::run(args, cli.amqp_url, cli.redis_url, cli.json).await,
    }
}
