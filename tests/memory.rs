//! Memory under steady load: a gate process forwards a few hundred thousand messages, and
//! its resident memory after warm-up must stay flat. A leak of a few bytes per message (a
//! metric sample, a confirm, an ack kept for good) shows here as megabytes. In a test
//! binary of its own, so the gate's memory is measured while nothing else of the tests'
//! runs beside it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;

/// Messages before the first reading: allocator arenas, caches and buffers fill up here.
const WARM_UP: u64 = 100_000;
/// Messages in all.
const TOTAL: u64 = 400_000;
/// Growth allowed over the 300,000 messages after warm-up. The leak this guards against
/// (about 23 bytes per message) would add 6.6 MiB.
const MAX_GROWTH_MIB: f64 = 3.0;

#[tokio::test]
async fn resident_memory_stays_flat_over_hundreds_of_thousands_of_messages() {
    let names = Names::new("memory");
    let broker = Broker::new(&names).await;
    let mut env = names.env(1_000_000_000, 3_600);
    env.push(("KONSTRUCT_GATE__AMQP__PREFETCH".into(), "512".into()));
    let mut gate = GateProcess::spawn(&env);
    let pid = gate.child.id();

    let forwarded = Arc::new(AtomicU64::new(0));
    let counting = {
        let (channel, mut consumer) = broker.consume(&names.orchestrator).await;
        let forwarded = forwarded.clone();
        tokio::spawn(async move {
            while let Some(Ok(_)) = consumer.next().await {
                forwarded.fetch_add(1, Ordering::Relaxed);
            }
            drop(channel);
        })
    };
    // 1,000 (tenant, channel) keys, published in chunks so the queue never holds them all.
    let publishing = {
        let publisher = Broker::new_without_declaring(&names).await;
        tokio::spawn(async move {
            for chunk in 0..TOTAL / 10_000 {
                let bodies = (chunk * 10_000..(chunk + 1) * 10_000).map(|i| {
                    message(
                        &format!("m{i}"),
                        &format!("tenant-{}", i % 500),
                        ["slack", "whatsapp"][(i % 2) as usize],
                    )
                });
                publisher.publish_many(bodies).await;
            }
            publisher
        })
    };

    let wait_for = |n: u64, within: Duration| {
        let forwarded = forwarded.clone();
        async move {
            let deadline = Instant::now() + within;
            while forwarded.load(Ordering::Relaxed) < n {
                assert!(
                    Instant::now() < deadline,
                    "only {} of {n} messages forwarded within {within:?}",
                    forwarded.load(Ordering::Relaxed)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_for(WARM_UP, Duration::from_secs(120)).await;
    let warm = rss_mib(pid);
    wait_for(TOTAL, Duration::from_secs(300)).await;
    // Whatever was released at the end of the run shows after a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let end = rss_mib(pid);
    println!(
        "gate RSS: {warm:.1} MiB after {WARM_UP} messages, {end:.1} MiB after {TOTAL} ({:+.2} MiB, {:.1} bytes/message)",
        end - warm,
        (end - warm) * 1_048_576.0 / (TOTAL - WARM_UP) as f64
    );
    let publisher = publishing.await.unwrap();
    gate.signal("TERM");
    let status = gate.wait(Duration::from_secs(30)).await;
    assert!(status.success(), "the gate exited with {status}");
    counting.abort();
    publisher.cleanup().await;
    broker.cleanup().await;
    assert!(
        end - warm <= MAX_GROWTH_MIB,
        "the gate grew by {:.1} MiB over {} messages after warm-up",
        end - warm,
        TOTAL - WARM_UP
    );
}
