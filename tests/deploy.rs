//! The deployment files, checked by the tools their users run: `kubectl kustomize` renders
//! the Kubernetes base and its configuration passes the gate's own `check-config`;
//! `promtool` checks and unit-tests the alerts; every metric the dashboard and the alerts
//! name is one a running gate exports.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use lapin::BasicProperties;
use yaml_rust2::{Yaml, YamlLoader};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn tool(program: &str, args: &[&str], install: &str) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(ROOT)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}): {install}"))
}

fn success(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn rendered() -> Vec<Yaml> {
    let out = tool(
        "kubectl",
        &["kustomize", "deploy/kubernetes"],
        "install kubectl (its built-in kustomize renders the base).",
    );
    YamlLoader::load_from_str(&success(&out)).unwrap()
}

#[test]
fn the_kustomize_base_renders_and_its_configuration_passes_check_config() {
    let docs = rendered();
    let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in [
        "Deployment",
        "ConfigMap",
        "PodDisruptionBudget",
        "ScaledObject",
        "TriggerAuthentication",
        "Service",
    ] {
        assert!(kinds.contains(kind), "{kind} missing from {kinds:?}");
    }
    let of = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"].as_str() == Some(kind))
            .unwrap()
    };
    let toml = of("ConfigMap")["data"]["gate.toml"]
        .as_str()
        .expect("gate.toml in the ConfigMap");
    let pod = &of("Deployment")["spec"]["template"]["spec"];
    let container = &pod["containers"][0];

    // The ConfigMap's file with the Deployment's environment, as the pod would start,
    // with the mounted secrets stood in for by files of the test's own.
    let dir = std::env::temp_dir().join(unique("deploy"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gate.toml");
    std::fs::write(&file, toml).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_konstruct-gate"));
    command.args(["check-config", "--config", file.to_str().unwrap()]);
    for (k, _) in std::env::vars() {
        if k.starts_with("KONSTRUCT_GATE") {
            command.env_remove(k);
        }
    }
    for var in container["env"].as_vec().unwrap() {
        if let (Some(name), Some(value)) = (var["name"].as_str(), var["value"].as_str()) {
            command.env(name, value);
        }
    }
    for (key, name) in [("AMQP", "amqp-password"), ("REDIS", "redis-password")] {
        let secret = dir.join(name);
        std::fs::write(&secret, "stand-in\n").unwrap();
        command.env(format!("KONSTRUCT_GATE__{key}__PASSWORD_FILE"), &secret);
    }
    let printed = success(&command.output().unwrap());
    let effective: toml::Table = printed.parse().unwrap();
    let listen = effective["http"]["listen"].as_str().unwrap();
    assert!(listen.starts_with("0.0.0.0:"), "probes reach {listen}");
    let port: i64 = listen.rsplit(':').next().unwrap().parse().unwrap();

    // Both probes hit that port (by number or by the container port's name).
    let named_port = |name: &str| {
        container["ports"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_i64())
    };
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let http = &container[probe]["httpGet"];
        assert_eq!(http["path"].as_str(), Some(path), "{probe}");
        let probe_port = http["port"]
            .as_i64()
            .or_else(|| named_port(http["port"].as_str().unwrap()));
        assert_eq!(probe_port, Some(port), "{probe} port");
    }
    // The pod gets longer to stop than the gate's grace plus its bounded closing steps.
    let grace = effective["amqp"]["shutdown_grace_seconds"]
        .as_integer()
        .unwrap();
    let pod_grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
    assert!(
        pod_grace >= grace + 10,
        "{pod_grace} s for a {grace} s drain"
    );
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(security["allowPrivilegeEscalation"].as_bool(), Some(false));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn promtool_checks_and_unit_tests_the_alerts() {
    let install =
        "install Debian's prometheus package (apt-get install prometheus), which brings promtool.";
    success(&tool(
        "promtool",
        &["check", "rules", "deploy/prometheus/alerts.yml"],
        install,
    ));
    let out = Command::new("promtool")
        .args(["test", "rules", "alerts_test.yml"])
        .current_dir(Path::new(ROOT).join("deploy/prometheus"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run promtool ({e}): {install}"));
    success(&out);
}

/// Every `konstruct_gate_*` metric named by the dashboard or the alerts, without the
/// histogram suffixes.
fn named_metrics() -> BTreeSet<String> {
    let mut text =
        std::fs::read_to_string(Path::new(ROOT).join("deploy/grafana/konstruct-gate.json"))
            .unwrap();
    text.push_str(
        &std::fs::read_to_string(Path::new(ROOT).join("deploy/prometheus/alerts.yml")).unwrap(),
    );
    let mut names = BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("konstruct_gate_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        names.insert(base.to_owned());
    }
    names
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_alerts_name_is_exported() {
    let names = Names::new("deploy-metrics");
    let broker = Broker::new(&names).await;
    let gate = TestGate::start(names.config(1, 60)).await;
    // Traffic of every kind, so that every histogram has samples.
    broker
        .publish(&message("m1", "acme", "slack"), BasicProperties::default())
        .await;
    broker
        .publish(&message("m2", "acme", "slack"), BasicProperties::default())
        .await;
    broker.publish(b"[]", BasicProperties::default()).await;
    broker
        .collect(&names.orchestrator, 1, Duration::from_secs(30))
        .await;
    broker
        .collect(&names.notifications, 1, Duration::from_secs(30))
        .await;
    broker
        .collect(&names.dead_letter, 1, Duration::from_secs(30))
        .await;
    let (_, text) = http_get(gate.http, "/metrics").await.unwrap();
    let exported: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|n| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(n)
                .to_owned()
        })
        .collect();
    let named = named_metrics();
    assert!(named.len() >= 8, "{named:?}");
    let missing: Vec<&String> = named.difference(&exported).collect();
    assert!(missing.is_empty(), "named but not exported: {missing:?}");
    gate.stop().await;
    broker.cleanup().await;
}

/// A Prometheus server of the test's own, on a free port, in a temporary directory.
struct Prometheus {
    child: std::process::Child,
    dir: std::path::PathBuf,
    port: u16,
}

impl Prometheus {
    async fn start(gate: std::net::SocketAddr) -> Self {
        let dir = std::env::temp_dir().join(unique("prometheus"));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_addr().port();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n\
             - job_name: konstruct-gate\n  static_configs:\n  - targets: ['{gate}']\n\
             - job_name: rabbitmq\n  metrics_path: /metrics/per-object\n  static_configs:\n  - targets: ['127.0.0.1:15692']\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start prometheus ({e}): install Debian's prometheus package (apt-get install prometheus)."));
        let server = Self { child, dir, port };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        while !matches!(http_get(addr, "/-/ready").await, Ok((200, _))) {
            assert!(
                std::time::Instant::now() < deadline,
                "prometheus did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        server
    }

    /// The number of series `expr` returns now.
    async fn series(&self, expr: &str) -> usize {
        let url = format!("http://127.0.0.1:{}/api/v1/query", self.port);
        let out = tokio::process::Command::new("curl")
            .args(["-s", "--data-urlencode", &format!("query={expr}"), &url])
            .output()
            .await
            .expect("curl runs");
        let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            panic!(
                "prometheus answered {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        assert_eq!(body["status"], "success", "{expr}: {body}");
        body["data"]["result"].as_array().map_or(0, Vec::len)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every query of the dashboard, and every series selector of the alerts, with the
/// dashboard's variables filled in and the production inbound queue's name replaced by
/// `inbound`.
fn expressions(inbound: &str) -> (Vec<String>, Vec<String>) {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(ROOT).join("deploy/grafana/konstruct-gate.json"))
            .unwrap(),
    )
    .unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                queries.push(
                    expr.replace("$__rate_interval", "1m")
                        .replace("$instance", ".*")
                        .replace("konstruct.inbound", inbound),
                );
            }
        }
    }
    let rules = YamlLoader::load_from_str(
        &std::fs::read_to_string(Path::new(ROOT).join("deploy/prometheus/alerts.yml")).unwrap(),
    )
    .unwrap();
    let alerts: String = rules[0]["groups"]
        .as_vec()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_vec().unwrap())
        .filter_map(|r| r["expr"].as_str())
        .collect::<Vec<_>>()
        .join("\n");
    let mut selectors = BTreeSet::new();
    let mut rest = alerts.as_str();
    while let Some(i) = rest.find(|c: char| c.is_ascii_alphabetic()) {
        rest = &rest[i..];
        let word: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[word.len()..];
        if word.starts_with("konstruct_gate_") || word.starts_with("rabbitmq_") || word == "up" {
            let labels = if rest.starts_with('{') && !rest.starts_with("{{") {
                &rest[..=rest.find('}').unwrap()]
            } else {
                ""
            };
            selectors.insert(format!("{word}{labels}").replace("konstruct.inbound", inbound));
        }
    }
    (queries, selectors.into_iter().collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scraping_a_gate_under_load_answers_every_dashboard_query_and_alert_selector()
 {
    let names = Names::new("prometheus");
    // Sharded, so the per-shard panel and alert have series to select.
    let mut config = names.config(5, 60);
    config.amqp.inbound_shards = 2;
    let broker = Broker::with_queues(&names, &config.amqp).await;
    let gate = TestGate::start(config).await;
    assert!(
        std::net::TcpStream::connect("127.0.0.1:15692").is_ok(),
        "RabbitMQ's metrics endpoint does not answer: enable it with `rabbitmq-plugins enable rabbitmq_prometheus`."
    );
    let prometheus = Prometheus::start(gate.http).await;
    // Load of every kind for a few seconds: allowed, rejected, invalid.
    let load = async {
        for round in 0..40u32 {
            let mut bodies: Vec<Vec<u8>> = (0..25)
                .map(|i| message(&format!("p{round}-{i}"), &format!("t{}", i % 8), "slack"))
                .collect();
            bodies.push(b"not json".to_vec());
            broker.publish_many(bodies).await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    load.await;
    let (queries, selectors) = expressions(&names.inbound);
    assert!(
        queries.len() >= 10 && selectors.len() >= 8,
        "{queries:?} {selectors:?}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut empty: Vec<String>;
    loop {
        empty = Vec::new();
        for expr in queries.iter().chain(&selectors) {
            if prometheus.series(expr).await == 0 {
                empty.push(expr.clone());
            }
        }
        if empty.is_empty() || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(empty.is_empty(), "no data for: {empty:#?}");
    drop(prometheus);
    gate.stop().await;
    broker.cleanup().await;
}
