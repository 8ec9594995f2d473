//! The rejection cache under a flood of distinct keys: a million keys, each over its
//! limit, stay within the cache's documented bound in entries and in memory. In a test
//! binary of its own, so the process's resident memory is the cache's alone.

mod common;

use std::time::{Duration, Instant};

use common::rss_mib;

use konstruct_gate::config::Algorithm;
use konstruct_gate::limit::cache::{MAX_ENTRIES, MAX_TOLD};
use konstruct_gate::limit::{Answer, Check, Decision, RejectionCache, Rule, Scope};

/// What the README promises for the cache at its bound.
const DOCUMENTED_BOUND_MIB: f64 = 64.0;

#[test]
fn a_million_flooding_keys_stay_within_the_bound() {
    let cache = RejectionCache::default();
    let rule = Rule {
        algorithm: Algorithm::FixedWindow,
        requests: 30,
        window_seconds: 3_600,
        burst: 30,
        shadow: false,
        defer: false,
    };
    let rejected = Answer::fresh(Decision::Rejected {
        limit: 30,
        window_seconds: 3_600,
        retry_after: 3_000,
        notify_user: true,
        turn_ms: 0,
        scope: Scope::Channel,
    });
    let before = rss_mib(std::process::id());
    let t0 = Instant::now();
    for i in 0..1_000_000u32 {
        // Realistic key lengths, and a few told senders per key (up to the bound).
        let check = Check {
            key: format!("tenant-{i:07}.example:ratelimit:whatsapp"),
            rule,
            notify_tag: format!("{:016x}", u64::from(i) * 2_654_435_761),
            message_id: String::new(),
            redelivered: false,
            done_key: String::new(),
            wait_ms: 0,
            cost: 1,
            also: Vec::new(),
        };
        cache.learn(
            &check,
            &rejected,
            1,
            t0 + Duration::from_micros(u64::from(i)),
        );
        if i % 10 == 0 {
            for s in 0..MAX_TOLD + 4 {
                let sender = Check {
                    notify_tag: format!("{s:016x}"),
                    ..check.clone()
                };
                cache.learn(&sender, &rejected, 1, t0);
            }
        }
    }
    let grown = rss_mib(std::process::id()) - before;
    println!(
        "rejection cache: {} entries after 1,000,000 keys, RSS grew {grown:.1} MiB",
        cache.len()
    );
    assert_eq!(cache.len(), MAX_ENTRIES);
    assert!(
        grown < DOCUMENTED_BOUND_MIB,
        "the cache grew the process by {grown:.1} MiB"
    );
}
