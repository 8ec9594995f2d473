//! The gate as operators run it: separate `konstruct-gate run` processes sharing one queue
//! and one Redis, stopped with SIGTERM.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(60);

fn spawn_gate(names: &Names, requests: u64, window: u64) -> (GateProcess, SocketAddr) {
    let addr = free_addr();
    let mut env = names.env(requests, window);
    env.push(("KONSTRUCT_GATE__HTTP__LISTEN".into(), addr.to_string()));
    (GateProcess::spawn(&env), addr)
}

#[tokio::test]
async fn three_instances_together_allow_exactly_the_limit_per_tenant_and_channel() {
    let names = Names::new("three");
    let broker = Broker::new(&names).await;
    let (tenants, channels, per_key, limit) = (40, ["slack", "whatsapp"], 45, 30);

    // Pre-fill, so all three instances compete for the same backlog.
    let mut bodies = Vec::new();
    for round in 0..per_key {
        for t in 0..tenants {
            for c in channels {
                bodies.push(message(
                    &format!("t{t}-{c}-{round}"),
                    &format!("tenant-{t}"),
                    c,
                ));
            }
        }
    }
    let total = bodies.len();
    broker.publish_many(bodies).await;

    let gates: Vec<_> = (0..3).map(|_| spawn_gate(&names, limit, 60)).collect();
    for (_, addr) in &gates {
        wait_ready(*addr, Duration::from_secs(30)).await;
    }
    let expected_allowed = tenants * channels.len() * limit as usize;
    let allowed = broker
        .collect(&names.orchestrator, expected_allowed, WAIT)
        .await;
    let rejected = broker
        .collect(&names.notifications, total - expected_allowed, WAIT)
        .await;

    let mut per_key_allowed: HashMap<(String, String), usize> = HashMap::new();
    for d in &allowed {
        let v: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
        *per_key_allowed
            .entry((
                v["tenant_id"].as_str().unwrap().into(),
                v["channel"].as_str().unwrap().into(),
            ))
            .or_default() += 1;
    }
    assert_eq!(per_key_allowed.len(), tenants * channels.len());
    assert!(
        per_key_allowed.values().all(|&n| n == limit as usize),
        "some (tenant, channel) got other than {limit}: {per_key_allowed:?}"
    );
    let ids: HashSet<String> = allowed
        .iter()
        .map(|d| output_id(OutputKind::Allowed, d))
        .chain(rejected.iter().map(|d| output_id(OutputKind::Rejected, d)))
        .collect();
    assert_eq!(ids.len(), total, "every message came out exactly once");
    // Nothing beyond the expected counts arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.assert_empty(&names.orchestrator).await;
    broker.assert_empty(&names.notifications).await;

    for (mut gate, _) in gates {
        gate.signal("TERM");
        assert!(gate.wait(Duration::from_secs(30)).await.success());
    }
    broker.cleanup().await;
}

#[tokio::test]
async fn sigterm_while_messages_are_in_flight_loses_nothing_and_exits_zero() {
    let names = Names::new("sigterm");
    let broker = Broker::new(&names).await;
    let total = 6_000;
    let bodies: Vec<_> = (0..total)
        .map(|i| message(&format!("m{i}"), &format!("tenant-{}", i % 100), "slack"))
        .collect();
    broker.publish_many(bodies).await;

    let (mut gate, addr) = spawn_gate(&names, 1_000, 60);
    wait_ready(addr, Duration::from_secs(30)).await;
    // Stop it mid-drain: as soon as some output exists and the backlog is not gone.
    for _ in 0..2_000 {
        if broker.depth(&names.orchestrator).await > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gate.signal("TERM");
    let status = gate.wait(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "graceful stop exits 0");
    let left = broker.depth(&names.inbound).await as usize;
    let out = broker.depth(&names.orchestrator).await as usize;
    assert!(
        left > 0,
        "the test wanted a stop mid-drain, but the gate finished first"
    );
    assert!(
        out + left >= total,
        "lost: {out} out + {left} left < {total}"
    );

    // A new instance drains the rest; every id comes out.
    let (mut gate, addr) = spawn_gate(&names, 1_000, 60);
    wait_ready(addr, Duration::from_secs(30)).await;
    broker.wait_empty(&names.inbound, WAIT).await;
    let delivered = broker.collect(&names.orchestrator, out + left, WAIT).await;
    let ids: Vec<String> = delivered
        .iter()
        .map(|d| output_id(OutputKind::Allowed, d))
        .collect();
    let counts = tally(&ids);
    assert_eq!(counts.len(), total, "every message id came out");
    gate.signal("TERM");
    assert_eq!(gate.wait(Duration::from_secs(30)).await.code(), Some(0));
    broker.cleanup().await;
}

#[tokio::test]
async fn a_second_signal_exits_at_once_and_the_broker_still_requeues() {
    let names = Names::new("second-signal");
    let broker = Broker::new(&names).await;
    let total = 4_000;
    broker
        .publish_many(
            (0..total).map(|i| message(&format!("s{i}"), &format!("t{}", i % 10), "slack")),
        )
        .await;
    // A Redis that accepts connections and never answers keeps every batch waiting for
    // its check (5 s), so the graceful stop is still draining when the second signal comes.
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free_addr();
    let mut env = names.env(100_000, 60);
    env.push(("KONSTRUCT_GATE__HTTP__LISTEN".into(), addr.to_string()));
    env.push((
        "KONSTRUCT_GATE__REDIS__URL".into(),
        format!("redis://{}/0", black_hole.local_addr().unwrap()),
    ));
    env.push(("KONSTRUCT_GATE__REDIS__TIMEOUT_MS".into(), "5000".into()));
    let mut gate = GateProcess::spawn(&env);
    let deadline = std::time::Instant::now() + WAIT;
    while !http_get(addr, "/readyz")
        .await
        .is_ok_and(|(_, body)| body.contains("consuming: true"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the gate never consumed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    gate.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    gate.signal("TERM");
    let status = gate.wait(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(130), "the second signal exits at once");
    drop(black_hole);

    let (mut gate, addr) = spawn_gate(&names, 100_000, 60);
    wait_ready(addr, Duration::from_secs(30)).await;
    broker.wait_empty(&names.inbound, WAIT).await;
    gate.signal("TERM");
    assert_eq!(gate.wait(Duration::from_secs(30)).await.code(), Some(0));
    let (_, ids) = broker.drain_allowed_ids(WAIT).await;
    assert_eq!(ids.len(), total, "every message came out");
    broker.cleanup().await;
}

#[tokio::test]
async fn sighup_reloads_limits_and_an_invalid_file_keeps_the_old_ones() {
    let names = Names::new("sighup");
    let broker = Broker::new(&names).await;
    let dir = std::env::temp_dir().join(unique("sighup"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gate.toml");
    let write_limits = |requests: i64| {
        std::fs::write(
            &file,
            format!("[limits]\nrequests = {requests}\nwindow_seconds = 600\n"),
        )
        .unwrap();
    };
    write_limits(2);
    let addr = free_addr();
    let mut env = names.env(2, 600);
    env.retain(|(k, _)| !k.contains("LIMITS__"));
    env.push(("KONSTRUCT_GATE__HTTP__LISTEN".into(), addr.to_string()));
    env.push(("KONSTRUCT_GATE_CONFIG".into(), file.display().to_string()));
    let mut gate = GateProcess::spawn(&env);
    wait_ready(addr, Duration::from_secs(30)).await;

    let publish = |n: usize, tag: &'static str| {
        let broker = &broker;
        async move {
            for i in 0..n {
                broker
                    .publish(
                        &message(&format!("{tag}{i}"), "acme", "slack"),
                        Default::default(),
                    )
                    .await;
            }
        }
    };
    let limit_of_rejection = |d: &lapin::message::Delivery| {
        serde_json::from_slice::<serde_json::Value>(&d.data).unwrap()["limit"]
            .as_u64()
            .unwrap()
    };
    publish(3, "a").await;
    broker.collect(&names.orchestrator, 2, WAIT).await;
    let r = broker.collect(&names.notifications, 1, WAIT).await;
    assert_eq!(limit_of_rejection(&r[0]), 2);

    // An invalid file is refused: the limit in force stays 2.
    write_limits(0);
    gate.signal("HUP");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    publish(1, "b").await;
    let r = broker.collect(&names.notifications, 1, WAIT).await;
    assert_eq!(limit_of_rejection(&r[0]), 2);

    // A valid one applies: the counter is at 4, so with 6 two more pass.
    write_limits(6);
    gate.signal("HUP");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    publish(3, "c").await;
    broker.collect(&names.orchestrator, 2, WAIT).await;
    let r = broker.collect(&names.notifications, 1, WAIT).await;
    assert_eq!(limit_of_rejection(&r[0]), 6);

    gate.signal("TERM");
    assert_eq!(gate.wait(Duration::from_secs(30)).await.code(), Some(0));
    broker.cleanup().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_message_redelivered_after_its_decision_is_not_counted_again() {
    let names = Names::new("count-once");
    let broker = Broker::new(&names).await;
    // The orchestrator queue is missing and the gate may not declare it: every publish of
    // an allowed message is returned, so the gate decides, fails to publish, and hands the
    // message back, again and again: a crash between decision and ack, many times over.
    broker
        .channel
        .queue_delete(names.orchestrator.as_str().into(), Default::default())
        .await
        .unwrap();
    let mut env = names.env(2, 600);
    env.push((
        "KONSTRUCT_GATE__AMQP__DECLARE_QUEUES".into(),
        "false".into(),
    ));
    let addr = free_addr();
    env.push(("KONSTRUCT_GATE__HTTP__LISTEN".into(), addr.to_string()));
    let mut gate = GateProcess::spawn(&env);
    wait_ready(addr, Duration::from_secs(30)).await;
    broker
        .publish(&message("once-1", "acme", "slack"), Default::default())
        .await;
    let mut redis = connect_redis().await;
    let key = format!("{}acme:ratelimit:slack", names.key_prefix);
    // Several redeliveries happen (one every ~200 ms); then the gate is killed mid-retry.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let failures = metric_value(addr, "konstruct_gate_publish_failures_total").await;
    assert!(
        failures >= 3.0,
        "the message was retried ({failures} failed publishes)"
    );
    let _ = gate.child.kill();
    let _ = gate.child.wait();
    let count: i64 = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(count, 1, "decided {failures} times, counted once");

    // A new gate, with the queue in place, delivers it: still counted once.
    let mut declare = names.config(1, 1);
    declare.amqp.declare_queues = true;
    konstruct_gate::amqp::declare_queues(&broker.conn, &declare.amqp)
        .await
        .unwrap();
    let (mut gate, addr) = spawn_gate(&names, 2, 600);
    wait_ready(addr, Duration::from_secs(30)).await;
    let out = broker.collect(&names.orchestrator, 1, WAIT).await;
    assert_eq!(int_header(&out[0], "x-ratelimit-remaining"), 1);
    let count: i64 = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(count, 1);
    gate.signal("TERM");
    assert_eq!(gate.wait(Duration::from_secs(30)).await.code(), Some(0));
    broker.cleanup().await;
}

#[tokio::test]
async fn a_sighup_that_lowers_max_message_bytes_dead_letters_the_next_big_message() {
    let names = Names::new("sighup-bytes");
    let broker = Broker::new(&names).await;
    let dir = std::env::temp_dir().join(unique("sighup-bytes"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gate.toml");
    let write = |max_bytes: usize| {
        std::fs::write(
            &file,
            format!(
                "[limits]\nrequests = 100\nwindow_seconds = 600\nmax_message_bytes = {max_bytes}\n"
            ),
        )
        .unwrap();
    };
    write(100_000);
    let addr = free_addr();
    let mut env = names.env(100, 600);
    env.retain(|(k, _)| !k.contains("LIMITS__"));
    env.push(("KONSTRUCT_GATE__HTTP__LISTEN".into(), addr.to_string()));
    env.push(("KONSTRUCT_GATE_CONFIG".into(), file.display().to_string()));
    let mut gate = GateProcess::spawn(&env);
    wait_ready(addr, Duration::from_secs(30)).await;

    let big = |id: &str| {
        serde_json::to_vec(&serde_json::json!({
            "id": id, "tenant_id": "acme", "channel": "slack", "text": "x".repeat(5_000),
        }))
        .unwrap()
    };
    broker.publish(&big("before"), Default::default()).await;
    broker.collect(&names.orchestrator, 1, WAIT).await;

    write(1_000);
    gate.signal("HUP");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    broker.publish(&big("after"), Default::default()).await;
    let dead = broker.collect(&names.dead_letter, 1, WAIT).await;
    assert_eq!(text_header(&dead[0], "x-gate-error"), "too_large");
    broker.assert_empty(&names.orchestrator).await;

    gate.signal("TERM");
    assert_eq!(gate.wait(Duration::from_secs(30)).await.code(), Some(0));
    broker.cleanup().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_configmap_update_by_symlink_swap_reloads_the_limits() {
    // The kubelet's layout: gate.toml -> ..data/gate.toml, ..data -> ..<timestamp>/; an
    // update writes a new timestamped directory and swaps ..data in one rename.
    let names = Names::new("symlink");
    let broker = Broker::new(&names).await;
    let dir = std::env::temp_dir().join(unique("configmap"));
    std::fs::create_dir_all(&dir).unwrap();
    let version = |name: &str, requests: u64| {
        let path = dir.join(name);
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(
            path.join("gate.toml"),
            format!("[limits]\nrequests = {requests}\nwindow_seconds = 600\n"),
        )
        .unwrap();
    };
    version("..2026_11_29_10_00_00.1", 2);
    std::os::unix::fs::symlink("..2026_11_29_10_00_00.1", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/gate.toml", dir.join("gate.toml")).unwrap();

    let addr = free_addr();
    let mut env = names.env(2, 600);
    env.retain(|(k, _)| !k.contains("LIMITS__"));
    env.push(("KONSTRUCT_GATE__HTTP__LISTEN".into(), addr.to_string()));
    env.push((
        "KONSTRUCT_GATE_CONFIG".into(),
        dir.join("gate.toml").display().to_string(),
    ));
    let mut gate = GateProcess::spawn(&env);
    wait_ready(addr, Duration::from_secs(30)).await;
    let limit_of = |d: &lapin::message::Delivery| {
        serde_json::from_slice::<serde_json::Value>(&d.data).unwrap()["limit"]
            .as_u64()
            .unwrap()
    };
    for i in 0..3 {
        broker
            .publish(
                &message(&format!("a{i}"), "acme", "slack"),
                Default::default(),
            )
            .await;
    }
    broker.collect(&names.orchestrator, 2, WAIT).await;
    assert_eq!(
        limit_of(&broker.collect(&names.notifications, 1, WAIT).await[0]),
        2
    );

    version("..2026_11_29_10_05_00.2", 6);
    std::os::unix::fs::symlink("..2026_11_29_10_05_00.2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(dir.join("..2026_11_29_10_00_00.1")).unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;

    // The counter is at 3: with 6, three more pass and the fourth is rejected.
    for i in 0..4 {
        broker
            .publish(
                &message(&format!("b{i}"), "acme", "slack"),
                Default::default(),
            )
            .await;
    }
    broker.collect(&names.orchestrator, 3, WAIT).await;
    assert_eq!(
        limit_of(&broker.collect(&names.notifications, 1, WAIT).await[0]),
        6
    );

    gate.signal("TERM");
    assert_eq!(gate.wait(Duration::from_secs(30)).await.code(), Some(0));
    broker.cleanup().await;
    let _ = std::fs::remove_dir_all(&dir);
}
