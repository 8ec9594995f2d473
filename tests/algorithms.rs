//! The rate-limit scripts on the real Redis, driven with a controlled clock and checked
//! decision by decision against reference models written from the algorithms'
//! definitions; then each algorithm end to end through a gate.

mod common;

use std::time::Duration;

use common::*;
use konstruct_gate::config::{Algorithm, Override};
use konstruct_gate::limit;
use proptest::prelude::*;

const FIXED: &str = konstruct_gate::limit::redis::FIXED_WINDOW;
const SLIDING: &str = konstruct_gate::limit::redis::SLIDING_WINDOW;
const BUCKET: &str = konstruct_gate::limit::redis::TOKEN_BUCKET;

/// {allowed, remaining, reset_ms, retry_after_ms}, as the scripts return it.
type Answer = (i64, i64, i64, i64);

fn redis_sync() -> redis::Connection {
    let client = redis::Client::open(redis_url()).unwrap();
    client.get_connection().unwrap_or_else(|_| {
        panic!("Redis is not reachable at 127.0.0.1:6379: start it with `redis-server --daemonize yes --port 6379 --save \"\" --appendonly no`.")
    })
}

/// The two-window weighted counter.
#[derive(Default)]
struct SlidingModel {
    /// Index of the current window, its count and the previous window's count.
    state: Option<(i64, u64, u64)>,
}

impl SlidingModel {
    fn check(&mut self, now_us: u64, limit: u64, window_ms: u64) -> Answer {
        let now = now_us as f64 / 1000.0;
        let window = window_ms as f64;
        let index = (now / window).floor() as i64;
        let (mut current, previous) = match self.state {
            Some((was, c, p)) if was == index => (c, p),
            Some((was, c, _)) if was == index - 1 => (0, c),
            _ => (0, 0),
        };
        let elapsed = now - index as f64 * window;
        let weight = (window - elapsed) / window;
        let mut estimate = previous as f64 * weight + current as f64;
        let limit_f = limit as f64;
        let (allowed, retry) = if estimate + 1.0 <= limit_f {
            current += 1;
            estimate += 1.0;
            self.state = Some((index, current, previous));
            (1, 0.0)
        } else if current as f64 + 1.0 <= limit_f && previous > 0 {
            let e = window * (1.0 - (limit_f - 1.0 - current as f64) / previous as f64);
            (0, e - elapsed)
        } else {
            let e = if current > 0 {
                window * (1.0 - (limit_f - 1.0) / current as f64)
            } else {
                0.0
            };
            (0, (window - elapsed) + e)
        };
        let remaining = (limit_f - estimate).floor().max(0.0) as i64;
        (
            allowed,
            remaining,
            (window - elapsed).ceil() as i64,
            retry.ceil() as i64,
        )
    }
}

/// GCRA: the theoretical arrival time of the next message.
#[derive(Default)]
struct BucketModel {
    tat: Option<f64>,
}

impl BucketModel {
    fn check(&mut self, now_us: u64, requests: u64, window_ms: u64, burst: u64) -> Answer {
        let now = now_us as f64;
        let interval = (window_ms * 1000) as f64 / requests as f64;
        let tat = self.tat.unwrap_or(now).max(now);
        let new_tat = tat + interval;
        let allow_at = new_tat - burst as f64 * interval;
        if now >= allow_at {
            self.tat = Some(new_tat.round());
            let remaining = ((now - allow_at) / interval).floor() as i64;
            (1, remaining, ((new_tat - now) / 1000.0).ceil() as i64, 0)
        } else {
            (
                0,
                0,
                ((tat - now) / 1000.0).ceil() as i64,
                ((allow_at - now) / 1000.0).ceil() as i64,
            )
        }
    }
}

/// The four keys a script takes for one check: the state key (`{counter}:sliding`,
/// `{counter}:bucket`, or the counter itself), its decision for `id`, `tag`'s
/// notification marker, and the id's confirmed-output marker (unused here: the state key
/// again), named as the gate names them.
fn keys(state: &str, id: &str, tag: &str) -> Vec<String> {
    let algorithm = if state.ends_with(":sliding") {
        Algorithm::SlidingWindow
    } else if state.ends_with(":bucket") {
        Algorithm::TokenBucket
    } else {
        Algorithm::FixedWindow
    };
    let base = limit::companion_base(algorithm, state);
    vec![
        state.to_owned(),
        limit::seen_key(algorithm, &base, id),
        limit::notified_key(&base, tag),
        // Duplicates forwarded: no confirmed-output marker to look at.
        state.to_owned(),
    ]
}

fn clock_start() -> u64 {
    // A fixed, realistic epoch in microseconds, so windows do not line up with the test's
    // own start.
    1_764_324_000_123_456
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn sliding_window_script_agrees_with_the_model(
        limit in 1u64..12,
        window_s in 10u64..120,
        steps in prop::collection::vec(prop_oneof![3 => 0u64..2_000, 1 => 0u64..150_000], 1..50),
    ) {
        let mut con = redis_sync();
        let script = redis::Script::new(SLIDING);
        let key = format!("{{{}}}:sliding", unique("prop"));
        let window_ms = window_s * 1000;
        let mut model = SlidingModel::default();
        let mut now = clock_start();
        for advance_ms in steps {
            now += advance_ms * 1000;
            let got: Vec<i64> = script.key(keys(&key, "", "")).arg(now).arg(limit).arg(window_ms).arg("").arg("").invoke(&mut con).unwrap();
            let want = model.check(now, limit, window_ms);
            prop_assert_eq!((got[0], got[1], got[2], got[3]), want, "at {} µs", now);
            if want.0 == 0 {
                prop_assert!(want.3 > 0, "a rejection always has a positive retry");
            }
        }
        let _: i64 = redis::cmd("DEL").arg(&key).query(&mut con).unwrap();
    }

    #[test]
    fn token_bucket_script_agrees_with_the_model(
        requests in 1u64..20,
        interval_ms in 100u64..3_000,
        burst in 1u64..10,
        steps in prop::collection::vec(prop_oneof![3 => 0u64..500, 1 => 0u64..20_000], 1..50),
    ) {
        let mut con = redis_sync();
        let script = redis::Script::new(BUCKET);
        let key = format!("{{{}}}:bucket", unique("prop"));
        let window_ms = interval_ms * requests;
        let mut model = BucketModel::default();
        let mut now = clock_start();
        for advance_ms in steps {
            now += advance_ms * 1000;
            let got: Vec<i64> = script.key(keys(&key, "", "")).arg(now).arg(requests).arg(window_ms).arg(burst).arg("").arg("").invoke(&mut con).unwrap();
            let want = model.check(now, requests, window_ms, burst);
            prop_assert_eq!((got[0], got[1], got[2], got[3]), want, "at {} µs", now);
        }
        let _: i64 = redis::cmd("DEL").arg(&key).query(&mut con).unwrap();
    }
}

#[test]
fn the_sliding_window_closes_the_fixed_windows_boundary_burst() {
    // 10 per minute. Ten messages at the end of one window and ten at the start of the
    // next: a fixed window lets all twenty through, the sliding window only the first ten.
    let mut con = redis_sync();
    let script = redis::Script::new(SLIDING);
    let key = format!("{{{}}}:sliding", unique("boundary"));
    let minute = 60_000_000u64;
    let end_of_window = (clock_start() / minute + 1) * minute - 1_000_000;
    let mut allowed = 0;
    for i in 0..20u64 {
        let now = end_of_window + i * 100_000; // 100 ms apart, crossing the boundary
        let answer: Vec<i64> = script
            .key(keys(&key, "", ""))
            .arg(now)
            .arg(10)
            .arg(60_000)
            .arg("")
            .arg("")
            .invoke(&mut con)
            .unwrap();
        allowed += answer[0];
    }
    assert_eq!(allowed, 10);
}

#[test]
fn a_token_bucket_allows_its_burst_then_one_per_interval() {
    let mut con = redis_sync();
    let script = redis::Script::new(BUCKET);
    let key = format!("{{{}}}:bucket", unique("burst"));
    let start = clock_start();
    let check = |con: &mut redis::Connection, at: u64| -> Vec<i64> {
        script
            .key(keys(&key, "", ""))
            .arg(at)
            .arg(60) // 60 per minute: one a second
            .arg(60_000)
            .arg(5)
            .arg("")
            .arg("")
            .invoke(con)
            .unwrap()
    };
    let burst: Vec<i64> = (0..6).map(|_| check(&mut con, start)[0]).collect();
    assert_eq!(burst, vec![1, 1, 1, 1, 1, 0], "five at once, then wait");
    let rejected = check(&mut con, start);
    assert_eq!(
        (rejected[0], rejected[3]),
        (0, 1000),
        "retry after one interval"
    );
    assert_eq!(check(&mut con, start + 999_000)[0], 0);
    assert_eq!(check(&mut con, start + 1_000_000)[0], 1);
}

async fn gate_run(
    algorithm: Algorithm,
    burst: Option<u64>,
    n: usize,
) -> (usize, Vec<serde_json::Value>) {
    let names = Names::new("algorithm");
    let broker = Broker::new(&names).await;
    let mut config = names.config(3, 60);
    config.limits.overrides = vec![Override {
        tenant: "acme".into(),
        algorithm: Some(algorithm),
        burst,
        ..Override::default()
    }];
    let gate = TestGate::start(config).await;
    broker
        .publish_many((0..n).map(|i| message(&format!("a{i}"), "acme", "slack")))
        .await;
    let rejected_n = n - burst.map_or(3, |b| b as usize);
    let allowed = broker
        .collect(&names.orchestrator, n - rejected_n, Duration::from_secs(20))
        .await;
    let rejected = broker
        .collect(&names.notifications, rejected_n, Duration::from_secs(20))
        .await;
    let notes = rejected
        .iter()
        .map(|d| serde_json::from_slice(&d.data).unwrap())
        .collect();
    gate.stop().await;
    broker.cleanup().await;
    (allowed.len(), notes)
}

#[tokio::test]
async fn a_tenant_on_the_sliding_window_gets_its_limit_through_the_gate() {
    let (allowed, rejected) = gate_run(Algorithm::SlidingWindow, None, 5).await;
    assert_eq!(allowed, 3);
    for n in &rejected {
        let retry = n["retry_after_seconds"].as_u64().unwrap();
        assert!((1..=120).contains(&retry), "{n}");
    }
}

#[tokio::test]
async fn a_tenant_on_a_token_bucket_gets_its_burst_through_the_gate() {
    let (allowed, rejected) = gate_run(Algorithm::TokenBucket, Some(4), 6).await;
    assert_eq!(allowed, 4);
    for n in &rejected {
        // 3 per minute: the next token comes within 20 s.
        let retry = n["retry_after_seconds"].as_u64().unwrap();
        assert!((1..=20).contains(&retry), "{n}");
    }
}

#[test]
fn every_script_counts_a_message_id_once_and_repeats_its_decision() {
    let mut con = redis_sync();
    let fixed = redis::Script::new(FIXED);
    let key = unique("once");
    let call = |con: &mut redis::Connection, id: &str| -> Vec<i64> {
        fixed
            .key(keys(&key, id, ""))
            .arg(60)
            .arg(1)
            .arg("")
            .arg(id)
            .invoke(con)
            .unwrap()
    };
    assert_eq!(call(&mut con, "m1")[0], 1);
    assert_eq!(
        call(&mut con, "m1")[0],
        1,
        "a redelivery is not counted again"
    );
    assert_eq!(call(&mut con, "m2")[0], 2, "another message is");
    assert_eq!(
        call(&mut con, "m2")[0],
        2,
        "and its rejection is repeated, not recounted"
    );
    let count: i64 = redis::cmd("GET").arg(&key).query(&mut con).unwrap();
    assert_eq!(count, 2);
    assert_eq!(call(&mut con, "m1")[3], 1, "a replay is marked");
    // The counter is gone (an operator deleted it): decided afresh, not replayed.
    let _: i64 = redis::cmd("DEL").arg(&key).query(&mut con).unwrap();
    assert_eq!(call(&mut con, "m2"), vec![1, 60_000, 1, 0]);

    for (script, suffix, args) in [
        (SLIDING, "sliding", vec!["1", "60000"]),
        (BUCKET, "bucket", vec!["1", "60000", "1"]),
    ] {
        let script = redis::Script::new(script);
        let key = format!("{{{}}}:{suffix}", unique("once"));
        let call_at = |con: &mut redis::Connection, id: &str, now: u64| -> Vec<i64> {
            let mut invocation = script.key(keys(&key, id, ""));
            invocation.arg(now);
            for a in &args {
                invocation.arg(*a);
            }
            invocation.arg("").arg(id).invoke(con).unwrap()
        };
        let call = |con: &mut redis::Connection, id: &str| call_at(con, id, clock_start());
        let first = call(&mut con, "m1");
        assert_eq!((first[0], first[5]), (1, 0), "allowed, fresh");
        let again = call(&mut con, "m1");
        assert_eq!(
            (&again[..5], again[5]),
            (&first[..5], 1),
            "the same decision again, nothing counted, marked replayed"
        );
        let rejected = call(&mut con, "m2");
        assert_eq!(rejected[0], 0, "the limit of 1 was used once");
        assert_eq!(call(&mut con, "m1")[..5], first[..5]);
        // Replayed 10 s later: the same decision, its waits told from now.
        let later = call_at(&mut con, "m2", clock_start() + 10_000_000);
        assert_eq!((later[0], later[5]), (0, 1), "{suffix}");
        assert!(rejected[3] > 10_000, "{suffix}: {rejected:?}");
        assert_eq!(
            later[3],
            rejected[3] - 10_000,
            "{suffix}: retry-after from now"
        );
        assert_eq!(
            later[2],
            (rejected[2] - 10_000).max(0),
            "{suffix}: reset from now"
        );
    }
}

/// The `limits` bounds of the configuration: the scripts must work anywhere inside them.
const MAX_REQUESTS: u64 = konstruct_gate::config::MAX_REQUESTS;
const MAX_WINDOW_S: u64 = konstruct_gate::config::MAX_WINDOW_SECONDS;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// At the extremes of every number (1 to 1e9 requests and burst, 1 s to 366 days, ids
    /// replayed), every script answers with integers, never an error, and a replay
    /// repeats the first decision exactly.
    #[test]
    fn every_script_answers_at_the_extremes_of_its_numbers(
        requests in prop_oneof![Just(1u64), Just(MAX_REQUESTS), 1u64..MAX_REQUESTS],
        window_s in prop_oneof![Just(1u64), Just(MAX_WINDOW_S), 1u64..MAX_WINDOW_S],
        burst in prop_oneof![Just(1u64), Just(MAX_REQUESTS), 1u64..MAX_REQUESTS],
        messages in 1usize..4,
    ) {
        let mut con = redis_sync();
        let fixed = redis::Script::new(FIXED);
        let sliding = redis::Script::new(SLIDING);
        let bucket = redis::Script::new(BUCKET);
        let base = unique("extreme");
        for m in 0..messages {
            let id = format!("m{m}");
            for round in 0..2 {
                let got: Vec<redis::Value> = fixed.key(keys(&base, &id, "tag")).arg(window_s).arg(requests).arg("tag").arg(&id).invoke(&mut con).unwrap();
                let ints: Vec<i64> = got.iter().map(|v| match v { redis::Value::Int(n) => *n, other => panic!("{other:?}") }).collect();
                prop_assert_eq!(ints[0], m as i64 + 1, "count");
                prop_assert!(ints[1] > 0 && ints[1] as u64 <= window_s * 1000);
                prop_assert_eq!(ints[3], round, "replayed on the second round");

                let window_ms = window_s * 1000;
                let got: Vec<redis::Value> = sliding.key(keys(&format!("{{{base}}}:sliding"), &id, "tag")).arg("").arg(requests).arg(window_ms).arg("tag").arg(&id).invoke(&mut con).unwrap();
                let ints: Vec<i64> = got.iter().map(|v| match v { redis::Value::Int(n) => *n, other => panic!("{other:?}") }).collect();
                prop_assert!(ints[0] == 0 || ints[0] == 1, "{:?}", ints);
                prop_assert!(ints[2] >= 0 && ints[2] as u64 <= window_ms, "{:?}", ints);
                prop_assert_eq!(ints[5], round);

                let got: Vec<redis::Value> = bucket.key(keys(&format!("{{{base}}}:bucket"), &id, "tag")).arg("").arg(requests).arg(window_ms).arg(burst).arg("tag").arg(&id).invoke(&mut con).unwrap();
                let ints: Vec<i64> = got.iter().map(|v| match v { redis::Value::Int(n) => *n, other => panic!("{other:?}") }).collect();
                prop_assert!(ints[0] == 0 || ints[0] == 1, "{:?}", ints);
                prop_assert!(ints[1] >= 0 && ints[3] >= 0, "{:?}", ints);
                prop_assert_eq!(ints[5], round);
            }
        }
        let keys: Vec<String> = redis::cmd("KEYS").arg(format!("*{base}*")).query(&mut con).unwrap();
        if !keys.is_empty() {
            let _: i64 = redis::cmd("DEL").arg(keys).query(&mut con).unwrap();
        }
    }
}

#[test]
fn a_key_redis_cannot_count_fails_alone_within_one_script_call() {
    let mut con = redis_sync();
    let fixed = redis::Script::new(FIXED);
    let (good, text, full) = (unique("good"), unique("text"), unique("full"));
    let _: () = redis::cmd("SET")
        .arg(&text)
        .arg("not a number")
        .query(&mut con)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&full)
        .arg(i64::MAX)
        .query(&mut con)
        .unwrap();
    let mut call = fixed.prepare_invoke();
    for key in [&text, &good, &full, &good] {
        call.key(keys(key, "", "")).arg(60).arg(10).arg("").arg("");
    }
    let got: Vec<redis::Value> = call.invoke(&mut con).unwrap();
    let int = |v: &redis::Value| match v {
        redis::Value::Int(n) => *n,
        other => panic!("{other:?}"),
    };
    let failed = |v: &redis::Value| matches!(v, redis::Value::BulkString(b) if b == b"err");
    assert!(failed(&got[0]), "text: failed");
    assert!(
        matches!(&got[1], redis::Value::BulkString(e) if String::from_utf8_lossy(e).contains("not an integer")),
        "{:?}",
        got[1]
    );
    assert_eq!(int(&got[4]), 1, "good: counted");
    assert!(failed(&got[8]), "full: out of range, failed");
    assert_eq!(int(&got[12]), 2, "good again: counted");
    let count: i64 = redis::cmd("GET").arg(&good).query(&mut con).unwrap();
    assert_eq!(count, 2);

    for (script, args) in [
        (SLIDING, vec!["10", "60000"]),
        (BUCKET, vec!["10", "60000", "5"]),
    ] {
        let script = redis::Script::new(script);
        let good = unique("good");
        let mut call = script.prepare_invoke();
        call.arg("");
        for key in [&text, &good] {
            call.key(keys(key, "", ""));
            for a in &args {
                call.arg(*a);
            }
            call.arg("").arg("");
        }
        let got: Vec<redis::Value> = call.invoke(&mut con).unwrap();
        assert!(failed(&got[0]), "{:?}", got);
        assert_eq!(int(&got[6]), 1, "the other key is allowed: {:?}", got);
        let _: i64 = redis::cmd("DEL").arg(&good).query(&mut con).unwrap();
    }
    let _: i64 = redis::cmd("DEL")
        .arg(&[&good, &text, &full])
        .query(&mut con)
        .unwrap();
}
