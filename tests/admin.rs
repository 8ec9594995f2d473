//! `konstruct-gate limits …` against the real Redis, with gates running: an override set
//! on the command line applies on every instance within seconds, `usage` reads the window,
//! `reset` starts it afresh everywhere, and invalid values write nothing.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use lapin::BasicProperties;

const WAIT: Duration = Duration::from_secs(30);

fn cli(names: &Names, args: &[&str], extra: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_konstruct-gate"));
    command.arg("limits").args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("KONSTRUCT_GATE") {
            command.env_remove(k);
        }
    }
    command
        .env("KONSTRUCT_GATE__REDIS__URL", redis_url())
        .env("KONSTRUCT_GATE__REDIS__KEY_PREFIX", &names.key_prefix);
    for (k, v) in extra {
        command.env(k, v);
    }
    command.output().expect("the gate binary runs")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--json prints JSON")
}

/// Removes the test's Redis overrides hash.
async fn delete_overrides(names: &Names) {
    let mut redis = connect_redis().await;
    let _: i64 = redis::cmd("DEL")
        .arg(format!("{}konstruct-gate:overrides", names.key_prefix))
        .query_async(&mut redis)
        .await
        .unwrap();
}

async fn publish(broker: &Broker, prefix: &str, n: usize) {
    for i in 0..n {
        broker
            .publish(
                &message(&format!("{prefix}{i}"), "acme", "slack"),
                BasicProperties::default(),
            )
            .await;
    }
}

#[tokio::test]
async fn set_usage_and_reset_act_on_every_running_gate() {
    let names = Names::new("admin");
    let broker = Broker::new(&names).await;
    let mut config = names.config(30, 600);
    config.limits.redis_overrides_refresh_ms = 200;
    let gates = [
        TestGate::start(config.clone()).await,
        TestGate::start(config).await,
    ];

    let out = json(&cli(
        &names,
        &["set", "acme:slack", "--requests", "3", "--json"],
        &[],
    ));
    assert_eq!(out["override"]["requests"], 3);
    tokio::time::sleep(Duration::from_millis(800)).await;
    publish(&broker, "a", 4).await;
    broker.collect(&names.orchestrator, 3, WAIT).await;
    let rejected = broker.collect(&names.notifications, 1, WAIT).await;
    let note: serde_json::Value = serde_json::from_slice(&rejected[0].data).unwrap();
    assert_eq!(
        note["limit"], 3,
        "the fourth message is rejected under the new limit"
    );

    let usage = json(&cli(&names, &["usage", "acme:slack", "--json"], &[]));
    assert_eq!(
        (
            usage["algorithm"].as_str(),
            usage["limit"].as_u64(),
            usage["remaining"].as_u64()
        ),
        (Some("fixed_window"), Some(3), Some(0))
    );
    assert!(usage["reset_seconds"].as_u64().unwrap() > 500, "{usage}");

    // A flood, so both instances answer from their rejection caches...
    publish(&broker, "b", 20).await;
    broker.collect(&names.notifications, 20, WAIT).await;
    // ...then a reset: three more pass at once, whichever instance takes them.
    let out = json(&cli(&names, &["reset", "acme:slack", "--json"], &[]));
    assert!(out["keys_deleted"].as_u64().unwrap() >= 1, "{out}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let usage = json(&cli(&names, &["usage", "acme:slack", "--json"], &[]));
    assert_eq!(usage["remaining"], 3, "{usage}");
    publish(&broker, "c", 3).await;
    let allowed = broker.collect(&names.orchestrator, 3, WAIT).await;
    assert!(
        allowed
            .iter()
            .all(|d| int_header(d, "x-ratelimit-limit") == 3)
    );
    broker.assert_empty(&names.notifications).await;

    // `get` names where each field comes from; `unset` brings the global limit back.
    let got = json(&cli(&names, &["get", "acme:slack", "--json"], &[]));
    assert_eq!(got["requests"]["value"], 3);
    assert_eq!(got["requests"]["source"], "redis acme:slack");
    assert_eq!(got["window_seconds"]["source"], "global");
    let out = json(&cli(&names, &["unset", "acme:slack", "--json"], &[]));
    assert_eq!(out["removed"], true);
    let got = json(&cli(&names, &["get", "acme:slack", "--json"], &[]));
    assert_eq!(got["requests"]["value"], 30);

    for gate in gates {
        gate.stop().await;
    }
    broker.cleanup().await;
}

#[tokio::test]
async fn invalid_values_exit_2_and_write_nothing() {
    let names = Names::new("admin-invalid");
    for args in [
        &["set", "acme", "--requests", "0"][..],
        &["set", "acme", "--requests", "100000000000000000"],
        &["set", "acme", "--window-seconds", "40000000"],
        &["set", "acme", "--algorithm", "leaky"],
        &["set", "acme"],
        &["set", "-acme", "--requests", "5"],
        &["usage", "acme"],
        &["reset", "acme:Slack"],
    ] {
        let out = cli(&names, args, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(!stderr.trim().is_empty(), "{args:?} says why");
    }
    let mut redis = connect_redis().await;
    let written: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", names.key_prefix))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(written.is_empty(), "nothing written: {written:?}");
}

#[tokio::test]
async fn an_unreachable_redis_exits_1() {
    let names = Names::new("admin-down");
    let started = Instant::now();
    let out = cli(
        &names,
        &["list"],
        &[("KONSTRUCT_GATE__REDIS__URL", "redis://127.0.0.1:1/0")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Redis cannot be reached"));
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn list_shows_the_file_and_the_redis_overrides_with_their_sources() {
    let names = Names::new("admin-list");
    let dir = std::env::temp_dir().join(unique("admin-list"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gate.toml");
    std::fs::write(
        &file,
        "[[limits.overrides]]\ntenant = \"acme\"\nrequests = 100\n",
    )
    .unwrap();
    let config = ("KONSTRUCT_GATE_CONFIG", file.to_str().unwrap());
    json(&cli(
        &names,
        &[
            "set",
            "globex:sms",
            "--burst",
            "4",
            "--algorithm",
            "token_bucket",
            "--json",
        ],
        &[config],
    ));
    let listed = json(&cli(&names, &["list", "--json"], &[config]));
    let rows: Vec<(String, String)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["target"].as_str().unwrap().to_owned(),
                r["source"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("acme".to_owned(), "file".to_owned()),
            ("globex:sms".to_owned(), "redis".to_owned())
        ]
    );
    let table = cli(&names, &["list"], &[config]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("globex:sms") && text.contains("token_bucket"),
        "{text}"
    );
    delete_overrides(&names).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn set_starts_from_the_files_override_and_refuses_what_no_gate_would_apply() {
    let names = Names::new("admin-seed");
    let dir = std::env::temp_dir().join(unique("admin-seed"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gate.toml");
    std::fs::write(
        &file,
        "[[limits.overrides]]\ntenant = \"acme\"\nrequests = 100\nalgorithm = \"token_bucket\"\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    // --config after the subcommand, like everywhere else.
    let out = json(&cli(
        &names,
        &[
            "set", "acme", "--shadow", "true", "--json", "--config", path,
        ],
        &[],
    ));
    assert_eq!(
        out["override"],
        serde_json::json!({"requests": 100, "algorithm": "token_bucket", "shadow": true}),
        "the file's fields are kept, since a Redis entry replaces the file's whole"
    );
    let got = json(&cli(
        &names,
        &["get", "acme:slack", "--json", "--config", path],
        &[],
    ));
    assert_eq!(got["algorithm"]["value"], "token_bucket");
    assert_eq!(got["shadow"]["source"], "redis acme");

    // Gates that never read the hash would never apply a change: refused.
    let out = cli(
        &names,
        &["set", "acme", "--requests", "5"],
        &[("KONSTRUCT_GATE__LIMITS__REDIS_OVERRIDES_REFRESH_MS", "0")],
    );
    assert_eq!(out.status.code(), Some(2));
    // An invalid value is exit 2 even when Redis cannot be reached.
    let out = cli(
        &names,
        &["set", "acme", "--requests", "0"],
        &[("KONSTRUCT_GATE__REDIS__URL", "redis://127.0.0.1:1/0")],
    );
    assert_eq!(out.status.code(), Some(2));
    delete_overrides(&names).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn set_on_limit_defer_parks_the_next_over_limit_message_on_every_gate() {
    let names = Names::new("admin-defer");
    let broker = Broker::new(&names).await;
    let mut config = names.config(2, 600);
    config.limits.redis_overrides_refresh_ms = 200;
    let gate = TestGate::start(config).await;

    let out = json(&cli(
        &names,
        &["set", "acme:whatsapp", "--on-limit", "defer", "--json"],
        &[],
    ));
    assert_eq!(out["override"]["on_limit"], "defer");
    let got = json(&cli(&names, &["get", "acme:whatsapp", "--json"], &[]));
    assert_eq!(got["on_limit"]["value"], "defer");
    assert_eq!(got["on_limit"]["source"], "redis acme:whatsapp");
    tokio::time::sleep(Duration::from_millis(800)).await;

    for i in 0..3 {
        broker
            .publish(
                &message(&format!("d{i}"), "acme", "whatsapp"),
                BasicProperties::default(),
            )
            .await;
    }
    broker.collect(&names.orchestrator, 2, WAIT).await;
    // The third waits out the 600 s window in the ladder's longest step, untold.
    let step = konstruct_gate::amqp::step_queue(&names.inbound, false, 600);
    let deadline = Instant::now() + WAIT;
    while broker.depth(&step).await < 1 {
        assert!(Instant::now() < deadline, "nothing was parked in {step}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    broker.assert_empty(&names.notifications).await;
    gate.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn a_reset_reaches_every_gates_cache_at_once() {
    let names = Names::new("admin-reset-now");
    let broker = Broker::new(&names).await;
    let mut config = names.config(1, 600);
    // Overrides are not read at all: only the reset's own message can tell the gates.
    config.limits.redis_overrides_refresh_ms = 0;
    // Every rejection told: the cache answers any sender of the key.
    config.limits.notify = konstruct_gate::config::Notify::Every;
    let gates = [
        TestGate::start(config.clone()).await,
        TestGate::start(config).await,
    ];
    publish(&broker, "a", 1).await;
    broker.collect(&names.orchestrator, 1, WAIT).await;
    // A flood: both instances answer it from their rejection caches.
    publish(&broker, "b", 20).await;
    broker.collect(&names.notifications, 20, WAIT).await;
    json(&cli(&names, &["reset", "acme:slack", "--json"], &[]));
    tokio::time::sleep(Duration::from_millis(200)).await;
    publish(&broker, "c", 1).await;
    let allowed = broker.collect(&names.orchestrator, 1, WAIT).await;
    assert_eq!(output_id(OutputKind::Allowed, &allowed[0]), "c0");
    for gate in gates {
        gate.stop().await;
    }
    broker.cleanup().await;
}

#[tokio::test]
async fn a_reset_lets_every_algorithm_tell_a_sender_again() {
    for algorithm in ["fixed_window", "sliding_window", "token_bucket"] {
        let names = Names::new(&format!("admin-reset-told-{algorithm}"));
        let broker = Broker::new(&names).await;
        let mut config = names.config(1, 600);
        config.limits.algorithm = serde_json::from_value(serde_json::json!(algorithm)).unwrap();
        config.limits.notify = konstruct_gate::config::Notify::OncePerWindow;
        let gate = TestGate::start(config).await;
        // One sender (realistic_message's user id is per tenant): told once in the window.
        let send = |prefix: &'static str, n: usize| {
            let broker = &broker;
            async move {
                for i in 0..n {
                    let id = format!("{prefix}{i}");
                    let body = realistic_message(&id, "acme", "slack");
                    broker.publish(&body, BasicProperties::default()).await;
                }
            }
        };
        let told = |notices: &[lapin::message::Delivery]| {
            notices
                .iter()
                .filter(|d| {
                    let n: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
                    n["notify_user"] == true
                })
                .count()
        };
        send("a", 3).await;
        broker.collect(&names.orchestrator, 1, WAIT).await;
        let notices = broker.collect(&names.notifications, 2, WAIT).await;
        assert_eq!(told(&notices), 1, "{algorithm}: the sender is told once");
        json(&cli(&names, &["reset", "acme:slack", "--json"], &[]));
        tokio::time::sleep(Duration::from_millis(300)).await;
        send("b", 3).await;
        let allowed = broker.collect(&names.orchestrator, 1, WAIT).await;
        assert_eq!(
            output_id(OutputKind::Allowed, &allowed[0]),
            "b0",
            "{algorithm}"
        );
        let notices = broker.collect(&names.notifications, 2, WAIT).await;
        assert_eq!(
            told(&notices),
            1,
            "{algorithm}: after a reset the sender is told again, once"
        );
        broker.assert_empty(&names.orchestrator).await;
        gate.stop().await;
        broker.cleanup().await;
    }
}

/// A message of acme's on `channel` from `sender`.
fn from(id: &str, channel: &str, sender: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "id": id, "tenant_id": "acme", "channel": channel,
        "sender": {"user_id": sender},
    }))
    .unwrap()
}

#[tokio::test]
async fn a_tenant_budget_set_live_holds_on_every_gate_and_usage_and_reset_show_it() {
    let names = Names::new("admin-budget");
    let broker = Broker::new(&names).await;
    let mut config = names.config(30, 600);
    config.limits.redis_overrides_refresh_ms = 200;
    // A sender limit from the file that lets the test's messages through.
    config.limits.also = vec![konstruct_gate::config::AlsoLimit {
        scope: konstruct_gate::config::Scope::Sender,
        requests: 100,
        window_seconds: 600,
        algorithm: None,
        burst: None,
    }];
    let gates = [
        TestGate::start(config.clone()).await,
        TestGate::start(config).await,
    ];
    // No `[[limits.also]]` of scope tenant: the override gives the whole limit.
    let refused = cli(&names, &["set", "acme@tenant", "--requests", "4"], &[]);
    assert_eq!(
        refused.status.code(),
        Some(2),
        "a budget needs its window too"
    );
    let out = json(&cli(
        &names,
        &[
            "set",
            "acme@tenant",
            "--requests",
            "4",
            "--window-seconds",
            "600",
            "--json",
        ],
        &[],
    ));
    assert_eq!(
        (out["target"].as_str(), out["override"]["requests"].as_u64()),
        (Some("acme@tenant"), Some(4))
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    for (i, channel) in [
        "slack", "slack", "slack", "whatsapp", "whatsapp", "whatsapp",
    ]
    .iter()
    .enumerate()
    {
        broker
            .publish(
                &from(&format!("m{i}"), channel, "U1"),
                BasicProperties::default(),
            )
            .await;
    }
    broker.collect(&names.orchestrator, 4, WAIT).await;
    for d in broker.collect(&names.notifications, 2, WAIT).await {
        let note: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
        assert_eq!(
            (note["scope"].as_str(), note["limit"].as_u64()),
            (Some("tenant"), Some(4))
        );
    }
    let usage = json(&cli(&names, &["usage", "acme@tenant", "--json"], &[]));
    assert_eq!(
        (usage["limit"].as_u64(), usage["remaining"].as_u64()),
        (Some(4), Some(0)),
        "{usage}"
    );
    let got = json(&cli(&names, &["get", "acme@tenant", "--json"], &[]));
    assert_eq!(got["requests"]["source"], "redis acme@tenant", "{got}");

    // A reset of the budget lets four more through; a reset of acme:slack also removes
    // its senders' limits.
    let out = json(&cli(&names, &["reset", "acme@tenant", "--json"], &[]));
    assert!(out["keys_deleted"].as_u64().unwrap() >= 1, "{out}");
    let usage = json(&cli(&names, &["usage", "acme@tenant", "--json"], &[]));
    assert_eq!(usage["remaining"], 4, "{usage}");
    let mut redis = connect_redis().await;
    let senders = format!("{{{}acme:ratelimit:slack}}:sender:*", names.key_prefix);
    let before: Vec<String> = redis::cmd("KEYS")
        .arg(&senders)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(!before.is_empty(), "the sender limit has a key");
    let out = json(&cli(&names, &["reset", "acme:slack", "--json"], &[]));
    assert!(out["keys_deleted"].as_u64().unwrap() >= 2, "{out}");
    let after: Vec<String> = redis::cmd("KEYS")
        .arg(&senders)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(after, Vec::<String>::new());

    broker.assert_empty(&names.notifications).await;
    for gate in gates {
        gate.stop().await;
    }
    delete_overrides(&names).await;
    broker.cleanup().await;
}
