//! Limits that compose: a tenant's budget, a sender's limit and a message's cost, decided
//! all or none. The composing script against a model on the real Redis, then the issue's
//! cases end to end through gates on the real broker and Redis.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use konstruct_gate::config::{Algorithm, AlsoLimit, Config, Override, Scope};
use konstruct_gate::limit;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use proptest::prelude::*;

const COMPOSED: &str = konstruct_gate::limit::redis::COMPOSED;
const WITHIN: Duration = Duration::from_secs(20);

fn redis_sync() -> redis::Connection {
    let client = redis::Client::open(redis_url()).unwrap();
    client.get_connection().unwrap_or_else(|_| {
        panic!("Redis is not reachable at 127.0.0.1:6379: start it with `redis-server --daemonize yes --port 6379 --save \"\" --appendonly no`.")
    })
}

/// One limit of a property-test case: its algorithm and its capacity (requests, which is
/// also the burst).
#[derive(Debug, Clone, Copy)]
struct Case {
    algorithm: Algorithm,
    capacity: u64,
}

fn code(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::FixedWindow => "f",
        Algorithm::SlidingWindow => "s",
        Algorithm::TokenBucket => "b",
    }
}

fn algorithm() -> impl Strategy<Value = Algorithm> {
    prop_oneof![
        Just(Algorithm::FixedWindow),
        Just(Algorithm::SlidingWindow),
        Just(Algorithm::TokenBucket),
    ]
}

/// A message: which (channel, sender) pair of one tenant it comes from, and its cost.
type Message = (usize, usize, u64);

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// With the clock held still (hour-long windows), every algorithm is a counter with a
    /// capacity: a message passes exactly when every limit that applies has room for its
    /// cost, and then it is counted by each of them. The script must agree with that model
    /// message by message, so no limit ever goes over and a rejected message spends no
    /// limit's budget. Messages of two channels and two senders share one tenant budget;
    /// the calls are split at random into batches, as several gates would send them.
    #[test]
    fn the_composing_script_allows_exactly_what_fits_every_limit(
        channel in (algorithm(), 1u64..12),
        tenant in prop::option::of((algorithm(), 1u64..20)),
        sender in prop::option::of((algorithm(), 1u64..8)),
        messages in prop::collection::vec((0usize..2, 0usize..2, 0u64..5), 1..60),
        batch in 1usize..8,
    ) {
        let mut con = redis_sync();
        let prefix = unique("composed-model");
        let now_us: u64 = 1_800_000_000_000_000;
        let window_ms: u64 = 3_600_000;
        let channel = Case { algorithm: channel.0, capacity: channel.1 };
        let tenant = tenant.map(|(algorithm, capacity)| Case { algorithm, capacity });
        let sender = sender.map(|(algorithm, capacity)| Case { algorithm, capacity });
        // The model: units used per key.
        let mut used: HashMap<String, u64> = HashMap::new();
        let mut capacity: HashMap<String, u64> = HashMap::new();
        let limits_of = |(c, s, _): Message| {
            let channel_name = ["slack", "teams"][c];
            let tag = format!("sender-{s}");
            let mut out = vec![(
                limit::key_for(channel.algorithm, &prefix, "acme", channel_name),
                channel,
            )];
            if let Some(t) = tenant {
                out.push((limit::also_key(Scope::Tenant, t.algorithm, &prefix, "acme", channel_name, ""), t));
            }
            if let Some(s) = sender {
                out.push((limit::also_key(Scope::Sender, s.algorithm, &prefix, "acme", channel_name, &tag), s));
            }
            out
        };
        for chunk in messages.chunks(batch) {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(COMPOSED);
            let mut keys: Vec<String> = Vec::new();
            let mut args: Vec<String> = vec![now_us.to_string(), chunk.len().to_string()];
            for &m in chunk {
                let limits = limits_of(m);
                let first = limits[0].0.clone();
                keys.extend([first.clone(), first.clone(), first.clone(), first]);
                keys.extend(limits[1..].iter().map(|(k, _)| k.clone()));
                args.extend([limits.len().to_string(), m.2.to_string(), String::new(), String::new()]);
                for (_, case) in &limits {
                    args.extend([
                        code(case.algorithm).to_owned(),
                        case.capacity.to_string(),
                        window_ms.to_string(),
                        case.capacity.to_string(),
                    ]);
                }
            }
            cmd.arg(keys.len());
            for k in &keys { cmd.arg(k); }
            for a in &args { cmd.arg(a); }
            let got: Vec<redis::Value> = cmd.query(&mut con).unwrap();
            prop_assert_eq!(got.len(), chunk.len() * 7);
            for (i, &m) in chunk.iter().enumerate() {
                let v: Vec<i64> = got[i * 7..i * 7 + 7].iter().map(|v| match v {
                    redis::Value::Int(n) => *n,
                    other => panic!("not a number: {other:?}"),
                }).collect();
                let limits = limits_of(m);
                let fits = limits.iter().all(|(key, case)| {
                    used.get(key).copied().unwrap_or(0) + m.2 <= case.capacity
                });
                prop_assert_eq!(v[0] == 1, fits, "message {:?}, limits {:?}, used {:?}", m, limits, used);
                if fits {
                    for (key, case) in &limits {
                        *used.entry(key.clone()).or_default() += m.2;
                        capacity.insert(key.clone(), case.capacity);
                    }
                    // The headers describe the limit with the fewest units left.
                    let fewest = limits.iter().map(|(key, case)| case.capacity - used.get(key).copied().unwrap_or(0)).min().unwrap();
                    prop_assert_eq!(v[2] as u64, fewest);
                } else {
                    // The deciding limit is one that has no room.
                    let (key, case) = &limits[(v[1] - 1) as usize];
                    prop_assert!(used.get(key).copied().unwrap_or(0) + m.2 > case.capacity);
                    prop_assert!(v[4] > 0, "a rejection has a wait");
                }
            }
        }
        // No limit over its capacity, and Redis holds what the model counted.
        for (key, units) in &used {
            prop_assert!(*units <= capacity[key], "{} holds {} of {}", key, units, capacity[key]);
            let stored: Option<String> = if key.ends_with(":sliding") {
                redis::cmd("HGET").arg(key).arg("current").query(&mut con).unwrap()
            } else {
                redis::cmd("GET").arg(key).query(&mut con).unwrap()
            };
            if !key.ends_with(":bucket") {
                prop_assert_eq!(stored.map_or(0, |s| s.parse::<u64>().unwrap()), *units, "{}", key);
            }
        }
        let keys: Vec<String> = redis::cmd("KEYS").arg(format!("*{prefix}*")).query(&mut con).unwrap();
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL").arg(keys).query(&mut con).unwrap();
        }
    }
}

/// One composed check of cost `cost` against a fixed-window channel counter of limit 3
/// and a fixed-window tenant budget of limit 10, with no id: {allowed, decider, …}.
fn check_two(
    con: &mut redis::Connection,
    channel: &str,
    budget: &str,
    cost: u64,
) -> Vec<redis::Value> {
    redis::cmd("EVAL")
        .arg(COMPOSED)
        .arg(5)
        .arg(vec![channel, channel, channel, channel, budget])
        .arg(vec!["", "1", "2", &cost.to_string(), "", ""])
        .arg(vec!["f", "3", "60000", "3", "f", "10", "60000", "10"])
        .query(con)
        .unwrap()
}

/// acme's Slack counter and tenant budget (fixed windows), under a prefix of their own.
fn channel_and_budget(label: &str) -> (String, String) {
    let prefix = unique(label);
    let channel = limit::counter_key(&prefix, "acme", "slack");
    let budget = limit::also_key(
        Scope::Tenant,
        Algorithm::FixedWindow,
        &prefix,
        "acme",
        "",
        "",
    );
    (channel, budget)
}

#[test]
fn a_counter_written_by_hand_fails_its_check_before_any_limit_is_counted() {
    let mut con = redis_sync();
    let (channel, budget) = channel_and_budget("composed-bad");
    for bad in ["1.5", "1e3", " 5", "0x10", "abc"] {
        let _: () = redis::cmd("SET")
            .arg(&budget)
            .arg(bad)
            .query(&mut con)
            .unwrap();
        let got = check_two(&mut con, &channel, &budget, 1);
        assert_eq!(got[0], redis::Value::BulkString(b"err".to_vec()), "{bad}");
        let count: Option<i64> = redis::cmd("GET").arg(&channel).query(&mut con).unwrap();
        assert_eq!(
            count, None,
            "the channel was not counted beside a budget holding {bad:?}"
        );
    }
    let _: () = redis::cmd("DEL").arg(&budget).query(&mut con).unwrap();
}

#[test]
fn a_cost_of_zero_passes_a_counter_the_router_pushed_past_its_limit() {
    let mut con = redis_sync();
    let (channel, budget) = channel_and_budget("composed-zero");
    // The router (and the fixed window's own script) counts rejected attempts too.
    let _: () = redis::cmd("SET")
        .arg(&channel)
        .arg(7)
        .arg("EX")
        .arg(60)
        .query(&mut con)
        .unwrap();
    assert_eq!(
        check_two(&mut con, &channel, &budget, 1)[0],
        redis::Value::Int(0)
    );
    assert_eq!(
        check_two(&mut con, &channel, &budget, 0)[0],
        redis::Value::Int(1)
    );
    let count: i64 = redis::cmd("GET").arg(&channel).query(&mut con).unwrap();
    assert_eq!(count, 7, "neither message counted");
    let _: () = redis::cmd("DEL")
        .arg(&channel)
        .arg(&budget)
        .query(&mut con)
        .unwrap();
}

/// A message from `sender` (a Slack-like user id) in `channel` of `tenant`.
fn from(id: &str, tenant: &str, channel: &str, sender: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "id": id,
        "tenant_id": tenant,
        "channel": channel,
        "sender": {"user_id": sender, "display_name": "Ada"},
        "content": {"text": "hello"},
    }))
    .unwrap()
}

fn with_cost(cost: AMQPValue) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("x-gate-cost".into(), cost);
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers)
}

/// The ids forwarded, and the rejections' (id, scope, limit), read from the outputs.
async fn outputs(
    broker: &Broker,
    allowed: usize,
    rejected: usize,
) -> (Vec<String>, Vec<(String, String, u64)>) {
    let names = &broker.names;
    let forwarded = broker
        .collect(&names.orchestrator, allowed, WITHIN)
        .await
        .iter()
        .map(|d| output_id(OutputKind::Allowed, d))
        .collect();
    let notices = broker
        .collect(&names.notifications, rejected, WITHIN)
        .await
        .iter()
        .map(|d| {
            let v: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
            (
                v["message_id"].as_str().unwrap().to_owned(),
                v["scope"].as_str().unwrap().to_owned(),
                v["limit"].as_u64().unwrap(),
            )
        })
        .collect();
    (forwarded, notices)
}

/// Nothing more comes out than what was collected.
async fn nothing_more(names: &Names) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    for queue in names.outputs() {
        assert_eq!(depth_fresh(queue).await, Some(0), "nothing more on {queue}");
    }
}

fn also(scope: Scope, requests: u64) -> AlsoLimit {
    AlsoLimit {
        scope,
        requests,
        window_seconds: 60,
        algorithm: None,
        burst: None,
    }
}

fn composed_config(names: &Names, channel_limit: u64, also: Vec<AlsoLimit>) -> Config {
    let mut config = names.config(channel_limit, 60);
    config.limits.also = also;
    config
}

#[tokio::test]
async fn a_tenant_budget_holds_across_its_channels_and_three_gates() {
    let names = Names::new("composed-budget");
    let config = composed_config(&names, 3, vec![also(Scope::Tenant, 5)]);
    let broker = Broker::new(&names).await;
    let gates = [
        TestGate::start(config.clone()).await,
        TestGate::start(config.clone()).await,
        TestGate::start(config).await,
    ];
    for channel in ["slack", "whatsapp", "teams"] {
        for n in 0..3 {
            let id = format!("{channel}-{n}");
            broker
                .publish(
                    &from(&id, "acme", channel, "U1"),
                    BasicProperties::default(),
                )
                .await;
        }
    }
    let (allowed, rejected) = outputs(&broker, 5, 4).await;
    assert_eq!(allowed.len(), 5, "exactly the budget passes: {allowed:?}");
    assert!(
        rejected
            .iter()
            .all(|(_, scope, limit)| scope == "tenant" && *limit == 5),
        "every rejection names the tenant's budget: {rejected:?}"
    );
    nothing_more(&names).await;
    for gate in gates {
        gate.stop().await;
    }
}

#[tokio::test]
async fn a_message_a_channel_rejects_spends_none_of_the_tenant_budget() {
    let names = Names::new("composed-all-or-none");
    let mut config = composed_config(&names, 10, vec![also(Scope::Tenant, 4)]);
    config.limits.overrides = vec![Override {
        tenant: "acme".into(),
        channel: Some("slack".into()),
        requests: Some(2),
        ..Override::default()
    }];
    let broker = Broker::new(&names).await;
    let gate = TestGate::start(config).await;
    for n in 0..5 {
        let body = from(&format!("slack-{n}"), "acme", "slack", "U1");
        broker.publish(&body, BasicProperties::default()).await;
    }
    let (allowed, rejected) = outputs(&broker, 2, 3).await;
    assert_eq!(allowed, ["slack-0", "slack-1"]);
    assert!(
        rejected
            .iter()
            .all(|(_, scope, limit)| scope == "channel" && *limit == 2),
        "{rejected:?}"
    );
    // The three Slack rejections spent nothing: the tenant has 2 of its 4 left.
    for n in 0..3 {
        let body = from(&format!("whatsapp-{n}"), "acme", "whatsapp", "U1");
        broker.publish(&body, BasicProperties::default()).await;
    }
    let (allowed, rejected) = outputs(&broker, 2, 1).await;
    assert_eq!(allowed, ["whatsapp-0", "whatsapp-1"]);
    assert_eq!(rejected, [("whatsapp-2".into(), "tenant".into(), 4)]);
    nothing_more(&names).await;
    gate.stop().await;
}

#[tokio::test]
async fn a_sender_limit_stops_one_sender_and_not_the_next() {
    let names = Names::new("composed-sender");
    let config = composed_config(&names, 10, vec![also(Scope::Sender, 2)]);
    let broker = Broker::new(&names).await;
    let gate = TestGate::start(config).await;
    for (id, sender) in [
        ("u1-0", "U1"),
        ("u1-1", "U1"),
        ("u1-2", "U1"),
        ("u2-0", "U2"),
    ] {
        broker
            .publish(
                &from(id, "acme", "slack", sender),
                BasicProperties::default(),
            )
            .await;
    }
    let (allowed, rejected) = outputs(&broker, 3, 1).await;
    assert_eq!(allowed, ["u1-0", "u1-1", "u2-0"]);
    assert_eq!(rejected, [("u1-2".into(), "sender".into(), 2)]);
    nothing_more(&names).await;
    gate.stop().await;
}

#[tokio::test]
async fn a_message_counts_its_cost_and_a_bad_cost_is_dead_lettered() {
    let names = Names::new("composed-cost");
    let config = composed_config(&names, 10, Vec::new());
    let broker = Broker::new(&names).await;
    let gate = TestGate::start(config).await;
    let four = || with_cost(AMQPValue::LongLongInt(4));
    broker
        .publish(&from("c4-0", "acme", "slack", "U1"), four())
        .await;
    broker
        .publish(&from("c4-1", "acme", "slack", "U1"), four())
        .await;
    broker
        .publish(&from("c4-2", "acme", "slack", "U1"), four())
        .await;
    // As a string, as a gateway writing headers by hand might.
    let zero = with_cost(AMQPValue::LongString(LongString::from("0")));
    broker
        .publish(&from("c0", "acme", "slack", "U1"), zero)
        .await;
    let bad = with_cost(AMQPValue::LongString(LongString::from("abc")));
    broker
        .publish(&from("bad", "acme", "slack", "U1"), bad)
        .await;
    let huge = with_cost(AMQPValue::LongLongInt(1_000_001));
    broker
        .publish(&from("huge", "acme", "slack", "U1"), huge)
        .await;
    let (allowed, rejected) = outputs(&broker, 3, 1).await;
    assert_eq!(allowed, ["c4-0", "c4-1", "c0"]);
    assert_eq!(rejected, [("c4-2".into(), "channel".into(), 10)]);
    let dead = broker.collect(&names.dead_letter, 2, WITHIN).await;
    for d in &dead {
        let error = konstruct_gate::route::header(d.properties.headers(), "x-gate-error");
        assert_eq!(
            error,
            Some(&AMQPValue::LongString(LongString::from("invalid_cost")))
        );
    }
    nothing_more(&names).await;
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_tenant_budget_rejects_waits_for_that_budget_when_deferred() {
    let names = Names::new("composed-defer");
    let mut config = composed_config(&names, 10, Vec::new());
    config.limits.also = vec![AlsoLimit {
        scope: Scope::Tenant,
        requests: 2,
        window_seconds: 3,
        algorithm: None,
        burst: None,
    }];
    config.limits.on_limit = konstruct_gate::config::OnLimit::Defer;
    let broker = Broker::new(&names).await;
    let gate = TestGate::start(config).await;
    for (id, channel) in [
        ("a", "slack"),
        ("b", "whatsapp"),
        ("c", "slack"),
        ("d", "teams"),
    ] {
        broker
            .publish(&from(id, "acme", channel, "U1"), BasicProperties::default())
            .await;
    }
    // Two at once; the other two are parked for the budget's window (the channel's, a
    // minute, has room) and come through when it frees.
    let forwarded = broker.collect(&names.orchestrator, 4, WITHIN).await;
    let deferred: Vec<String> = forwarded
        .iter()
        .filter(|d| {
            konstruct_gate::route::header(d.properties.headers(), "x-gate-deferred").is_some()
        })
        .map(|d| output_id(OutputKind::Allowed, d))
        .collect();
    assert_eq!(deferred.len(), 2, "two waited for the budget: {deferred:?}");
    nothing_more(&names).await;
    gate.stop().await;
}

#[tokio::test]
async fn in_shadow_a_spent_tenant_budget_forwards_marked_and_counts_nothing_more() {
    let names = Names::new("composed-shadow");
    let mut config = composed_config(&names, 10, vec![also(Scope::Tenant, 1)]);
    config.limits.shadow = true;
    let broker = Broker::new(&names).await;
    let gate = TestGate::start(config).await;
    for id in ["a", "b", "c"] {
        broker
            .publish(&from(id, "acme", "slack", "U1"), BasicProperties::default())
            .await;
    }
    let forwarded = broker.collect(&names.orchestrator, 3, WITHIN).await;
    let shadowed = forwarded
        .iter()
        .filter(|d| {
            konstruct_gate::route::header(d.properties.headers(), "x-ratelimit-shadow").is_some()
        })
        .count();
    assert_eq!(shadowed, 2, "the budget of 1 would have rejected two");
    nothing_more(&names).await;
    let mut con = redis_sync();
    let budget = limit::also_key(
        Scope::Tenant,
        Algorithm::FixedWindow,
        &names.key_prefix,
        "acme",
        "",
        "",
    );
    let counted: i64 = redis::cmd("GET").arg(&budget).query(&mut con).unwrap();
    assert_eq!(counted, 1, "a message the budget rejects spends none of it");
    gate.stop().await;
}

const REFUND: &str = konstruct_gate::limit::redis::REFUND;

/// Reserves `cost` in a budget of `requests` per minute under reservation `id`, as a
/// cluster's first phase does; returns whether it fit.
fn reserve(
    con: &mut redis::Connection,
    algorithm: &str,
    key: &str,
    seen: &str,
    id: &str,
    cost: u64,
) -> bool {
    let got: Vec<redis::Value> = redis::cmd("EVAL")
        .arg(COMPOSED)
        .arg(4)
        .arg(vec![key, seen, key, key])
        .arg(vec!["", "1", "1", &cost.to_string(), "", id])
        .arg(vec![algorithm, "10", "60000", "10"])
        .query(con)
        .unwrap();
    got[0] == redis::Value::Int(1)
}

fn refund(
    con: &mut redis::Connection,
    algorithm: &str,
    key: &str,
    seen: &str,
    id: &str,
    cost: u64,
) -> i64 {
    redis::cmd("EVAL")
        .arg(REFUND)
        .arg(2)
        .arg(vec![key, seen])
        .arg(vec![algorithm, &cost.to_string(), "10", "60000", id])
        .query(con)
        .unwrap()
}

#[test]
fn a_reservation_goes_back_once_and_only_to_the_window_it_was_taken_from() {
    let mut con = redis_sync();
    let prefix = unique("composed-refund");
    let key = format!("{prefix}acme:budget");
    let seen = format!("{{{key}}}:all:seen");
    // The same window: given back, once.
    assert!(reserve(&mut con, "f", &key, &seen, "m1", 3));
    assert_eq!(refund(&mut con, "f", &key, &seen, "m1", 3), 1);
    assert_eq!(
        refund(&mut con, "f", &key, &seen, "m1", 3),
        0,
        "a second refund gives nothing"
    );
    let count: i64 = redis::cmd("GET").arg(&key).query(&mut con).unwrap();
    assert_eq!(count, 0);
    // A window that started since keeps its count.
    assert!(reserve(&mut con, "f", &key, &seen, "m2", 3));
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(5)
        .arg("PX")
        .arg(45_000)
        .query(&mut con)
        .unwrap();
    assert_eq!(refund(&mut con, "f", &key, &seen, "m2", 3), 0);
    let count: i64 = redis::cmd("GET").arg(&key).query(&mut con).unwrap();
    assert_eq!(count, 5, "the new window's count stays");
    // A token bucket another message moved since is left alone: giving the reservation back
    // then would credit time the full bucket never had.
    let bucket = format!("{{{key}}}:bucket");
    let bucket_seen = format!("{{{bucket}}}:all:seen");
    assert!(reserve(&mut con, "b", &bucket, &bucket_seen, "a", 3));
    assert!(reserve(&mut con, "b", &bucket, &bucket_seen, "b", 1));
    let tat: String = redis::cmd("GET").arg(&bucket).query(&mut con).unwrap();
    assert_eq!(refund(&mut con, "b", &bucket, &bucket_seen, "a", 3), 0);
    let after: String = redis::cmd("GET").arg(&bucket).query(&mut con).unwrap();
    assert_eq!(tat, after);
    // The last reservation is given back: the bucket is as if it had never been made.
    assert_eq!(refund(&mut con, "b", &bucket, &bucket_seen, "b", 1), 1);
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .arg(&seen)
        .arg(&bucket)
        .arg(&bucket_seen)
        .query(&mut con)
        .unwrap();
}
