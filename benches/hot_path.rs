//! The per-message path without the network: parse and validate, resolve the rule, build
//! the counter key, decide, and build each kind of output.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use konstruct_gate::config::{Algorithm, LimitsConfig, Override};
use konstruct_gate::limit::{Decision, Rule, Rules, counter_key};
use konstruct_gate::message::parse;
use konstruct_gate::route;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};

const MAX: usize = 1024 * 1024;

fn body() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "id": "bench-123456",
        "tenant_id": "tenant-42",
        "channel": "slack",
        "thread_id": "1764324000.123456",
        "sender": {"user_id": "U042", "display_name": "Ada Lovelace", "is_bot": false},
        "channel_metadata": {"team_id": "T024BE7LD", "channel_id": "C2147483705", "event_ts": "1764324000.000200"},
        "content": {
            "text": "Hi! Could you pull the last three incident reports for the payments service, summarise the root causes, and draft a short note for the on-call channel? Please keep it under two hundred words and link the runbooks you used. Thanks a lot, this is for tomorrow's review with the platform team.",
            "attachments": [{"type": "file", "name": "incident-2026-11-27.pdf", "size": 48213}],
            "mentions": ["U024BE7LH"],
        },
        "received_at": "2026-11-28T10:00:00.000Z",
        "gateway": {"version": "2.14.1", "region": "eu-west-1", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"},
    }))
    .unwrap()
}

fn properties() -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "x-trace".into(),
        AMQPValue::LongString(LongString::from("abc")),
    );
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id("bench-123456".into())
        .with_delivery_mode(2)
        .with_headers(headers)
}

fn rules() -> Rules {
    let overrides = (0..1000)
        .map(|i| Override {
            tenant: format!("tenant-{i}"),
            channel: (i % 2 == 0).then(|| "slack".to_owned()),
            requests: Some(100),
            ..Override::default()
        })
        .collect();
    Rules::from_config(&LimitsConfig {
        overrides,
        ..LimitsConfig::default()
    })
}

fn hot_path(c: &mut Criterion) {
    let body = body();
    let props = properties();
    let rules = rules();
    let mut group = c.benchmark_group("per_message");
    group.throughput(Throughput::Elements(1));

    group.bench_function("parse_and_validate", |b| {
        b.iter(|| parse(black_box(&body), MAX).unwrap())
    });
    group.bench_function("rule_and_key", |b| {
        let env = parse(&body, MAX).unwrap();
        b.iter(|| {
            let rule = rules.rule_for(black_box(&env.tenant_id), black_box(&env.channel));
            (rule, counter_key("", &env.tenant_id, &env.channel))
        })
    });
    group.bench_function("decision", |b| {
        let rule = Rule {
            algorithm: Algorithm::FixedWindow,
            requests: 30,
            window_seconds: 60,
            burst: 30,
            shadow: false,
            defer: false,
        };
        b.iter(|| Decision::fixed_window(black_box(rule), black_box(17), black_box(41_500), true))
    });
    group.bench_function("allowed_output", |b| {
        b.iter(|| route::allowed_properties(black_box(&props), 30, 12, 42, false))
    });
    group.bench_function("rejection_output", |b| {
        let env = parse(&body, MAX).unwrap();
        b.iter(|| {
            let id = route::message_id(&env, &props);
            route::rejection(
                black_box(&env),
                id,
                route::Limited {
                    limit: 30,
                    window_seconds: 60,
                    retry_after: 42,
                    notify_user: true,
                    scope: konstruct_gate::limit::Scope::Channel,
                },
                false,
            )
        })
    });
    group.bench_function("dead_letter_output", |b| {
        let invalid = parse(br#"{"channel":"slack"}"#, MAX).unwrap_err();
        b.iter(|| route::dead_letter_properties(black_box(&props), black_box(&invalid)))
    });
    group.bench_function("whole_path_allowed", |b| {
        b.iter(|| {
            let env = parse(black_box(&body), MAX).unwrap();
            let rule = rules.rule_for(&env.tenant_id, &env.channel);
            let _key = counter_key("", &env.tenant_id, &env.channel);
            match Decision::fixed_window(rule, 3, 59_000, true) {
                Decision::Allowed {
                    limit,
                    remaining,
                    reset_after,
                } => route::allowed_properties(&props, limit, remaining, reset_after, false),
                Decision::Rejected { .. } => unreachable!("3 of 30 is allowed"),
            }
        })
    });
    group.finish();
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
