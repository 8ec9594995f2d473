//! `on_limit = "defer"` against the real broker and Redis: over-limit messages are parked in
//! the broker's delay ladder and come back when their window frees; nothing is lost when
//! the gate dies meanwhile; past `limits.max_defer_seconds` a message is rejected as
//! before. And a property test: however deferred messages return, no window lets more than
//! its limit through.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;
use konstruct_gate::amqp::{DEFER_STEPS, step_queue};
use konstruct_gate::config::{OnLimit, Override};
use konstruct_gate::route::{self, DeferClock, FIRST_ARRIVAL};
use lapin::BasicProperties;
use lapin::message::Delivery;
use proptest::prelude::*;

const WAIT: Duration = Duration::from_secs(60);

fn deferred_times(d: &Delivery) -> u64 {
    route::times_deferred(&d.properties)
}

fn channel_of(d: &Delivery) -> String {
    let v: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
    v["channel"].as_str().unwrap().to_owned()
}

async fn parked(broker: &Broker) -> u32 {
    let mut total = 0;
    for seconds in DEFER_STEPS {
        total += broker
            .depth(&step_queue(&broker.names.inbound, false, seconds))
            .await;
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_burst_reaches_the_orchestrator_over_the_next_windows_while_slack_is_rejected() {
    let names = Names::new("defer-burst");
    let broker = Broker::new(&names).await;
    // 5 per 6 s everywhere; acme's WhatsApp defers, its Slack rejects as before. The ten
    // over the limit are parked for their turns, a share of the window (1.2 s) apart from
    // the moment the window frees.
    let mut config = names.config(5, 6);
    config.limits.overrides.push(Override {
        tenant: "acme".into(),
        channel: Some("whatsapp".into()),
        on_limit: Some(OnLimit::Defer),
        ..Override::default()
    });
    let gate = TestGate::start(config).await;
    let whatsapp: Vec<Vec<u8>> = (0..15)
        .map(|i| message(&format!("w{i}"), "acme", "whatsapp"))
        .collect();
    let slack: Vec<Vec<u8>> = (0..7)
        .map(|i| message(&format!("s{i}"), "acme", "slack"))
        .collect();
    broker.publish_many(whatsapp.into_iter().chain(slack)).await;

    let forwarded = broker.collect(&names.orchestrator, 20, WAIT).await;
    let rejected = broker.collect(&names.notifications, 2, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.assert_empty(&names.orchestrator).await;
    broker.assert_empty(&names.notifications).await;
    assert_eq!(parked(&broker).await, 0, "nothing left in the ladder");

    let (whatsapp, slack): (Vec<&Delivery>, Vec<&Delivery>) =
        forwarded.iter().partition(|d| channel_of(d) == "whatsapp");
    assert_eq!(slack.len(), 5, "slack: its limit, and the rest rejected");
    for note in &rejected {
        let v: serde_json::Value = serde_json::from_slice(&note.data).unwrap();
        assert_eq!(v["channel"], "slack");
    }
    let ids: HashSet<String> = whatsapp
        .iter()
        .map(|d| output_id(OutputKind::Allowed, d))
        .collect();
    assert_eq!(
        ids.len(),
        15,
        "every WhatsApp message reached the orchestrator, once"
    );
    let at_once = whatsapp.iter().filter(|d| deferred_times(d) == 0).count();
    assert_eq!(at_once, 5, "the first window lets 5 through at once");
    for d in whatsapp.iter().filter(|d| deferred_times(d) > 0) {
        assert!(
            route::header(d.properties.headers(), FIRST_ARRIVAL).is_some(),
            "a deferred message carries its first arrival"
        );
    }
    // Each parked message waited for its turn (its share of the window after the one
    // before), so the ten came back over the next two windows, or three when one back
    // late lost its window: x-ratelimit-remaining counts down from 4 once per
    // window.
    let windows = whatsapp
        .iter()
        .filter(|d| int_header(d, "x-ratelimit-remaining") == 4)
        .count();
    assert!(
        (3..=4).contains(&windows),
        "15 messages at 5 per window took {windows} windows"
    );
    assert!(
        metric_value(
            gate.http,
            "konstruct_gate_messages_total{outcome=\"deferred\"}"
        )
        .await
            >= 10.0
    );
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_gate_while_messages_are_parked_loses_none() {
    let names = Names::new("defer-kill");
    let broker = Broker::new(&names).await;
    let mut env = names.env(5, 6);
    env.push(("KONSTRUCT_GATE__LIMITS__ON_LIMIT".into(), "defer".into()));
    let mut process = GateProcess::spawn(&env);
    broker
        .publish_many((0..15).map(|i| message(&format!("k{i}"), "acme", "whatsapp")))
        .await;
    broker.collect(&names.orchestrator, 5, WAIT).await;
    let deadline = std::time::Instant::now() + WAIT;
    while parked(&broker).await < 10 {
        assert!(
            std::time::Instant::now() < deadline,
            "ten messages were never parked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    process.signal("KILL");
    process.wait(Duration::from_secs(10)).await;

    let mut config = names.config(5, 6);
    config.limits.on_limit = OnLimit::Defer;
    let gate = TestGate::start(config).await;
    let rest = broker.collect(&names.orchestrator, 10, WAIT).await;
    let ids: HashSet<String> = rest
        .iter()
        .map(|d| output_id(OutputKind::Allowed, d))
        .collect();
    assert_eq!(ids.len(), 10, "the ten parked messages all came through");
    broker.assert_empty(&names.notifications).await;
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_cannot_be_allowed_within_max_defer_seconds_is_rejected_with_a_notification()
{
    let names = Names::new("defer-max");
    let broker = Broker::new(&names).await;
    let mut config = names.config(5, 60);
    config.limits.on_limit = OnLimit::Defer;
    config.limits.max_defer_seconds = 5;
    let gate = TestGate::start(config).await;
    broker
        .publish_many((0..8).map(|i| message(&format!("x{i}"), "acme", "whatsapp")))
        .await;
    broker.collect(&names.orchestrator, 5, WAIT).await;
    let notes = broker.collect(&names.notifications, 3, WAIT).await;
    let told: Vec<bool> = notes
        .iter()
        .map(|n| {
            let v: serde_json::Value = serde_json::from_slice(&n.data).unwrap();
            assert_eq!(v["type"], "rate_limited");
            v["notify_user"].as_bool().unwrap()
        })
        .collect();
    assert!(told.contains(&true), "the sender is told");
    assert_eq!(parked(&broker).await, 0, "nothing was parked");
    gate.stop().await;
    broker.cleanup().await;
}

/// A fixed window of `limit` per `window_ms`, as the script keeps it (windows start at the
/// first message after the last one expired).
#[derive(Default)]
struct Window {
    started_ms: Option<u64>,
    count: u64,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Messages of one key arrive at random; each is decided by a model of the fixed
    /// window and of a deferring rule's line (`take_turn` in `src/limit/notice.lua`: a
    /// fresh over-limit message, or one back at its turn and over again, takes the next
    /// turn, `window / limit` after the last and not before the window frees; a fresh one
    /// that finds the next turn ahead joins the line uncounted), parked for its turn
    /// (`route::turn_in`) in the ladder step `route::deferral` picks, and comes back 20 ms
    /// after that step's TTL has passed (parked again for the rest when that is more than
    /// 100 ms before its turn, as the gate does without asking Redis). Each return
    /// counts one more deferral and keeps the first arrival, every message is let through
    /// exactly once, no window lets more than its limit through, and no message is parked
    /// more than a few times beyond the longest steps its wait needs. (The Redis scripts'
    /// own windows are tested in tests/algorithms.rs.)
    #[test]
    fn no_window_lets_more_than_its_limit_through_when_deferred_messages_return(
        limit in 1u64..8,
        window_s in 1u64..90,
        arrivals in prop::collection::vec(0u64..120_000, 1..60),
    ) {
        let window_ms = window_s * 1000;
        let longest = *DEFER_STEPS.last().unwrap();
        // (time it is offered, id, its properties)
        let mut queue: Vec<(u64, usize, BasicProperties)> = arrivals
            .iter()
            .enumerate()
            .map(|(id, &at)| (at, id, BasicProperties::default()))
            .collect();
        let mut window = Window::default();
        let mut last_turn_ms = 0u64;
        let share = window_ms.div_ceil(limit);
        let mut allowed_at: HashMap<usize, u64> = HashMap::new();
        let mut per_window: HashMap<u64, u64> = HashMap::new();
        let mut parkings: HashMap<usize, u64> = HashMap::new();
        let mut longest_wait: HashMap<usize, u64> = HashMap::new();
        let mut steps = 0;
        while !queue.is_empty() {
            steps += 1;
            prop_assert!(steps < 100_000, "the simulation ends");
            queue.sort_by_key(|(at, id, _)| (*at, *id));
            let (now, id, properties) = queue.remove(0);
            let clock = DeferClock { now_ms: now, max_defer_seconds: 86_400, can_park: true };
            let early = route::wait_for_turn(&properties, now);
            let turn = if early >= 100 {
                early.div_ceil(1000)
            } else {
                let fresh = route::times_deferred(&properties) == 0;
                let behind = fresh && last_turn_ms + share > now;
                let mut take_turn = |now: u64, free_in: u64| {
                    let turn = (now + free_in).max(last_turn_ms + share);
                    last_turn_ms = turn;
                    turn - now
                };
                if behind {
                    // Others wait for their turns: behind them, uncounted.
                    let turn = route::turn_in(1, take_turn(now, 0));
                    let (step, parked) = route::deferral(&properties, turn, clock).expect("within a day");
                    *parkings.entry(id).or_default() += 1;
                    let wait = longest_wait.entry(id).or_default();
                    *wait = (*wait).max(turn);
                    queue.push((now + step * 1000 + 20, id, parked));
                    continue;
                }
                if window.started_ms.is_none_or(|s| now >= s + window_ms) {
                    window = Window { started_ms: Some(now), count: 0 };
                }
                let start = window.started_ms.unwrap();
                window.count += 1;
                if window.count <= limit {
                    prop_assert!(allowed_at.insert(id, now).is_none(), "let through once");
                    *per_window.entry(start).or_default() += 1;
                    continue;
                }
                let free_in = start + window_ms - now;
                let turn_ms = take_turn(now, free_in);
                route::turn_in(free_in.div_ceil(1000).max(1), turn_ms)
            };
            let wait = longest_wait.entry(id).or_default();
            *wait = (*wait).max(turn);
            let (step, parked) = route::deferral(&properties, turn, clock).expect("within a day");
            prop_assert!(step <= turn + turn / 4 || step == DEFER_STEPS[0], "{} for {}", step, turn);
            prop_assert_eq!(
                route::times_deferred(&parked),
                route::times_deferred(&properties) + 1
            );
            let first = |p: &BasicProperties| match route::header(p.headers(), FIRST_ARRIVAL) {
                Some(lapin::types::AMQPValue::LongLongInt(v)) => Some(*v as u64),
                _ => None,
            };
            prop_assert_eq!(first(&parked), Some(first(&properties).unwrap_or(arrivals[id])));
            *parkings.entry(id).or_default() += 1;
            queue.push((now + step * 1000 + 20, id, parked));
        }
        prop_assert_eq!(allowed_at.len(), arrivals.len(), "every message came through");
        for (start, n) in &per_window {
            prop_assert!(*n <= limit, "window at {} let {} through (limit {})", start, n, limit);
        }
        // Parkings beyond the longest steps a message's wait needs: the steps nearer its
        // turn, and a return that found its place taken by one back late.
        let extra = |id: &usize| parkings[id].saturating_sub(longest_wait[id] / longest);
        let total: u64 = parkings.keys().map(extra).sum();
        prop_assert!(total as f64 / arrivals.len() as f64 <= 6.0, "{} extra parkings for {} messages", total, arrivals.len());
        for id in parkings.keys() {
            prop_assert!(extra(id) <= 24, "message {} parked {} times (wait {} s)", id, parkings[id], longest_wait[id]);
        }
    }
}

#[test]
fn the_ladder_steps_grow_and_end_at_ten_minutes() {
    assert!(DEFER_STEPS.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(DEFER_STEPS[0], 1);
    assert_eq!(*DEFER_STEPS.last().unwrap(), 600);
}

#[tokio::test]
async fn a_deferral_with_no_ladder_to_park_in_is_rejected_not_handed_back() {
    let names = Names::new("defer-no-ladder");
    // The four queues exist; nobody declared the ladder, and the gate may not.
    let broker = Broker::new(&names).await;
    let mut config = names.config(1, 60);
    config.amqp.declare_queues = false;
    config.limits.on_limit = OnLimit::Defer;
    let gate = TestGate::start_without_waiting(config).await;
    wait_consuming_but_not_ready(gate.http, "defer_ladder_error", WAIT).await;
    one_allowed_one_rejected(&broker, WAIT).await;
    broker.wait_empty(&names.inbound, WAIT).await;
    assert_eq!(
        metric_value(gate.http, "konstruct_gate_publish_failures_total").await,
        0.0,
        "nothing handed back"
    );
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn a_deferred_message_keeps_its_expiration_and_its_final_rejections_tell_a_sender_once() {
    let names = Names::new("defer-contract");
    let broker = Broker::new(&names).await;
    // 1 per 2 s, deferring.
    let mut config = names.config(1, 2);
    config.limits.on_limit = OnLimit::Defer;
    let gate = TestGate::start(config).await;
    let ttl = BasicProperties::default().with_expiration("600000".into());
    broker
        .publish(&message("e1", "acme", "whatsapp"), ttl.clone())
        .await;
    broker
        .publish(&message("e2", "acme", "whatsapp"), ttl)
        .await;
    let out = broker.collect(&names.orchestrator, 2, WAIT).await;
    let e2 = out
        .iter()
        .find(|d| output_id(OutputKind::Allowed, d) == "e2")
        .expect("e2 forwarded after its wait");
    // Parked at least once (a step's TTL and the window's may end a hair apart).
    assert!(deferred_times(e2) >= 1);
    assert_eq!(
        e2.properties.expiration().as_ref().map(|e| e.as_str()),
        Some("600000"),
        "its own expiration, restored"
    );
    assert!(route::header(e2.properties.headers(), route::PARKED_EXPIRATION).is_none());
    gate.stop().await;

    // A window of 60 s cannot be waited out within 5 s: rejected at once, and one sender
    // is told once, however many of its messages are rejected.
    let mut config = names.config(1, 60);
    config.limits.on_limit = OnLimit::Defer;
    config.limits.max_defer_seconds = 5;
    let gate = TestGate::start(config).await;
    broker
        .publish_many((1..=4).map(|i| {
            serde_json::to_vec(&serde_json::json!({
                "id": format!("f{i}"), "tenant_id": "beta", "channel": "whatsapp",
                "sender": {"user_id": "U1"}, "text": "hello",
            }))
            .unwrap()
        }))
        .await;
    broker.collect(&names.orchestrator, 1, WAIT).await;
    let notices = broker.collect(&names.notifications, 3, WAIT).await;
    let told: Vec<bool> = notices
        .iter()
        .map(|d| {
            let v: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
            v["notify_user"].as_bool().unwrap()
        })
        .collect();
    assert_eq!(told.iter().filter(|&&t| t).count(), 1, "{told:?}");
    gate.stop().await;
    broker.cleanup().await;
}

/// Parks a burst of `n` messages for one key at `requests` per `window` seconds under
/// `algorithm`, waits until every one is forwarded, and returns the parkings per message
/// (the sum of their `x-gate-deferred`).
async fn parkings_per_message(
    algorithm: konstruct_gate::config::Algorithm,
    n: usize,
    requests: u64,
    window: u64,
) -> f64 {
    let names = Names::new("defer-line");
    let broker = Broker::new(&names).await;
    let mut config = names.config(requests, window);
    config.limits.algorithm = algorithm;
    config.limits.on_limit = OnLimit::Defer;
    // Long enough for the whole burst: every message is forwarded in the end.
    config.limits.max_defer_seconds = konstruct_gate::config::MAX_DEFER_SECONDS;
    let gate = TestGate::start(config).await;
    broker
        .publish_many((0..n).map(|i| message(&format!("b{i}"), "acme", "whatsapp")))
        .await;
    let started = std::time::Instant::now();
    let within = Duration::from_secs(window * (n as u64 / requests + 1) * 3 + 60);
    let out = broker.collect(&names.orchestrator, n, within).await;
    let parkings: u64 = out.iter().map(deferred_times).sum();
    let most = out.iter().map(deferred_times).max().unwrap_or(0);
    println!(
        "{algorithm:?}: {n} at {requests} per {window} s through in {:.0} s (at the limit's pace {} s), at most {most} parkings for one message",
        started.elapsed().as_secs_f64(),
        (n as u64).div_ceil(requests).saturating_sub(1) * window,
    );
    gate.stop().await;
    broker.assert_empty(&names.notifications).await;
    broker.cleanup().await;
    parkings as f64 / n as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_burst_waits_for_its_turn_with_every_algorithm() {
    use konstruct_gate::config::Algorithm;
    // 60 messages at 10 per 6 s: 50 wait, for up to five more windows.
    let (fixed, sliding, bucket) = tokio::join!(
        parkings_per_message(Algorithm::FixedWindow, 60, 10, 6),
        parkings_per_message(Algorithm::SlidingWindow, 60, 10, 6),
        parkings_per_message(Algorithm::TokenBucket, 60, 10, 6),
    );
    println!(
        "parkings per message, 60 at 10 per 6 s: fixed window {fixed:.2}, sliding window {sliding:.2}, token bucket {bucket:.2}"
    );
    // Before every algorithm had a place in line, the sliding window and the token bucket
    // brought the whole burst back every window: 14.2 and 13.1 parkings per message here.
    for (name, per_message) in [("fixed", fixed), ("sliding", sliding), ("bucket", bucket)] {
        assert!(
            per_message <= 3.0,
            "{name}: {per_message:.2} parkings per message"
        );
    }
}

/// A 500-message burst at 10 per 6 s: 50 windows, about 5 minutes (the three algorithms
/// at once). Run with `cargo test --release --test defer -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "takes about 5 minutes"]
async fn a_500_message_burst_at_10_per_6_seconds_parks_each_message_a_few_times() {
    use konstruct_gate::config::Algorithm;
    let (fixed, sliding, bucket) = tokio::join!(
        parkings_per_message(Algorithm::FixedWindow, 500, 10, 6),
        parkings_per_message(Algorithm::SlidingWindow, 500, 10, 6),
        parkings_per_message(Algorithm::TokenBucket, 500, 10, 6),
    );
    println!(
        "parkings per message, 500 at 10 per 6 s: fixed window {fixed:.2}, sliding window {sliding:.2}, token bucket {bucket:.2}"
    );
    for (name, per_message) in [("fixed", fixed), ("sliding", sliding), ("bucket", bucket)] {
        assert!(
            per_message <= 8.0,
            "{name}: {per_message:.2} parkings per message"
        );
    }
}

/// The burst of the issue that brought in the line, at full size: 500 messages at 10 per
/// minute span 50 windows, so it takes about 50 minutes (the three algorithms at once).
/// Run with `cargo test --release --test defer -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "takes about 50 minutes"]
async fn a_500_message_burst_at_10_per_minute_parks_each_message_a_few_times() {
    use konstruct_gate::config::Algorithm;
    let (fixed, sliding, bucket) = tokio::join!(
        parkings_per_message(Algorithm::FixedWindow, 500, 10, 60),
        parkings_per_message(Algorithm::SlidingWindow, 500, 10, 60),
        parkings_per_message(Algorithm::TokenBucket, 500, 10, 60),
    );
    println!(
        "parkings per message, 500 at 10 per minute: fixed window {fixed:.2}, sliding window {sliding:.2}, token bucket {bucket:.2}"
    );
    // Without a place in line the burst came back every window: about 60 per message.
    for (name, per_message) in [("fixed", fixed), ("sliding", sliding), ("bucket", bucket)] {
        assert!(
            per_message <= 8.0,
            "{name}: {per_message:.2} parkings per message"
        );
    }
}
