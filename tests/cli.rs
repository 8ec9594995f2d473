//! The command line: `check-config` output, refusal messages, and the compose file's
//! environment checked against the gate's own configuration loader.

use std::process::{Command, Output};

fn gate(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_konstruct-gate"));
    command.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("KONSTRUCT_GATE") {
            command.env_remove(k);
        }
    }
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("the gate binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn check_config_prints_the_effective_configuration_with_secrets_redacted() {
    let out = gate(
        &["check-config"],
        &[
            (
                "KONSTRUCT_GATE__AMQP__URL",
                "amqp://gate:s3cr3t-pw@rabbit:5672/prod",
            ),
            (
                "KONSTRUCT_GATE__REDIS__URL",
                "redis://:redis-pw@cache:6379/2",
            ),
            ("KONSTRUCT_GATE__LIMITS__REQUESTS", "42"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        !stdout.contains("s3cr3t-pw") && !stdout.contains("redis-pw"),
        "{stdout}"
    );
    assert!(
        stdout.contains("amqp://gate:***@rabbit:5672/prod"),
        "{stdout}"
    );
    assert!(stdout.contains("requests = 42"), "{stdout}");
    // The printed configuration is itself a valid configuration file.
    let dir = std::env::temp_dir().join(format!("gate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("printed.toml");
    std::fs::write(&path, &stdout).unwrap();
    let again = gate(&["check-config", "--config", path.to_str().unwrap()], &[]);
    assert!(again.status.success(), "{}", text(&again.stderr));
}

#[test]
fn an_unknown_key_or_bad_value_is_refused_in_one_sentence_naming_it() {
    let dir = std::env::temp_dir().join(format!("gate-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[amqp]\nprefetch_count = 10\n").unwrap();
    let out = gate(&["check-config", "--config", path.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("prefetch_count"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    let out = gate(
        &["run"],
        &[("KONSTRUCT_GATE__LIMITS__WINDOW_SECONDS", "soon")],
    );
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("limits.window_seconds"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    let out = gate(&["check-config", "--config", "/no/such/gate.toml"], &[]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("/no/such/gate.toml"));

    let out = gate(
        &["check-config"],
        &[("KONSTRUCT_GATE__AMQP__URL", "amqp://u:leaky@host:notaport/")],
    );
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("amqp.url") && !stderr.contains("leaky"),
        "{stderr}"
    );
}

#[test]
fn the_config_file_can_come_from_the_environment() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml");
    let out = gate(&["check-config"], &[("KONSTRUCT_GATE_CONFIG", example)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("tenant = \"acme\""), "{stdout}");
    assert!(!stdout.contains("change-me"), "{stdout}");
}

#[test]
fn the_compose_file_configures_the_gate_only_with_keys_it_accepts() {
    use yaml_rust2::{Yaml, YamlLoader};
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml");
    let docs = YamlLoader::load_from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let services = &docs[0]["services"];
    for name in ["rabbitmq", "redis", "gate"] {
        assert!(
            !services[name].is_badvalue(),
            "compose lacks the {name} service"
        );
    }
    assert!(
        services["rabbitmq"]["image"]
            .as_str()
            .unwrap()
            .contains("management"),
        "RabbitMQ comes with its management UI"
    );
    let gate_service = &services["gate"];
    assert_eq!(gate_service["deploy"]["replicas"].as_i64(), Some(2));
    assert_eq!(gate_service["build"].as_str(), Some("."));
    let Yaml::Hash(environment) = &gate_service["environment"] else {
        panic!("the gate's environment is a map");
    };
    let env: Vec<(String, String)> = environment
        .iter()
        .map(|(k, v)| {
            let value = match v {
                Yaml::String(s) => s.clone(),
                Yaml::Integer(i) => i.to_string(),
                Yaml::Boolean(b) => b.to_string(),
                other => panic!("unexpected value {other:?}"),
            };
            (k.as_str().unwrap().to_owned(), value)
        })
        .collect();
    assert!(!env.is_empty());
    for (key, _) in &env {
        assert!(
            key.starts_with("KONSTRUCT_GATE__"),
            "{key} is not a gate variable"
        );
    }
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let out = gate(&["check-config"], &pairs);
    assert!(
        out.status.success(),
        "check-config refused the compose environment: {}",
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert!(stdout.contains("rabbitmq:5672"), "{stdout}");
    assert!(stdout.contains("redis://redis:6379/0"), "{stdout}");

    let dockerfile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    assert!(dockerfile.contains("AS build"), "multi-stage build");
    assert!(dockerfile.contains("USER 10001"), "runs as non-root");
}

/// Passwords with unencoded `@ / # ?`, whose every fragment is distinctive.
const TRICKY: [&str; 3] = ["Xq7@Zr9/Wm3", "Yh4#Lc8?Nv6", "Bd2/Fg5@Hk8#Qs1?Tu4"];

fn fragments(password: &str) -> impl Iterator<Item = &str> {
    password.split(['@', '/', '#', '?']).chain([password])
}

fn assert_no_fragment(output: &str, password: &str) {
    for fragment in fragments(password) {
        assert!(
            !output.contains(fragment),
            "{fragment:?} of a password shows in: {output}"
        );
    }
}

#[test]
fn a_password_with_unencoded_characters_never_shows_in_check_config_or_run() {
    for password in TRICKY {
        for (var, url) in [
            (
                "KONSTRUCT_GATE__AMQP__URL",
                format!("amqp://gate:{password}@127.0.0.1:5672/%2f"),
            ),
            (
                "KONSTRUCT_GATE__REDIS__URL",
                format!("redis://gate:{password}@127.0.0.1:6379/0"),
            ),
        ] {
            for command in ["check-config", "run"] {
                let out = gate(&[command], &[(var, url.as_str())]);
                assert_eq!(out.status.code(), Some(2), "{command} accepted {url}");
                let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
                assert!(all.contains("percent-encode"), "{all}");
                assert_no_fragment(&all, password);
            }
        }
    }
}

#[test]
fn a_wrong_password_never_shows_in_the_logs_of_run() {
    // Percent-encoded, so the URLs parse; RabbitMQ refuses the login and Redis (without
    // a password) refuses the AUTH: the gate logs both failures and keeps retrying.
    let password = "Xq7@Zr9/Wm3";
    let encoded = "Xq7%40Zr9%2FWm3";
    let amqp = format!("amqp://guest:{encoded}@127.0.0.1:5672/%2f");
    let redis = format!("redis://gate:{encoded}@127.0.0.1:6379/0");
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_konstruct-gate"));
    command.arg("run");
    for (k, _) in std::env::vars() {
        if k.starts_with("KONSTRUCT_GATE") {
            command.env_remove(k);
        }
    }
    let child = command
        .env("KONSTRUCT_GATE__AMQP__URL", &amqp)
        .env("KONSTRUCT_GATE__REDIS__URL", &redis)
        .env("KONSTRUCT_GATE__HTTP__LISTEN", listen.to_string())
        .env("KONSTRUCT_GATE__LOG__LEVEL", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let out = child.wait_with_output().unwrap();
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        all.contains("reconnecting") || all.contains("error"),
        "it logged the failures: {all}"
    );
    assert_no_fragment(&all, password);
    assert!(!all.contains(encoded), "{all}");
}

#[test]
fn a_number_out_of_range_is_refused_naming_the_key() {
    let out = gate(
        &["check-config"],
        &[("KONSTRUCT_GATE__LIMITS__REQUESTS", "100000000000000000")],
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("limits.requests") && stderr.contains("out of range"),
        "{stderr}"
    );
}

#[test]
fn the_kubernetes_config_file_is_accepted_with_its_password_files() {
    let dir = std::env::temp_dir().join(format!("gate-cli-k8s-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (amqp, redis) = (dir.join("amqp-password"), dir.join("redis-password"));
    std::fs::write(&amqp, "Kq4amqp-secret\n").unwrap();
    std::fs::write(&redis, "Kq4redis-secret\n").unwrap();
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes/gate.toml");
    let out = gate(
        &["check-config", "--config", file],
        &[
            (
                "KONSTRUCT_GATE__AMQP__PASSWORD_FILE",
                amqp.to_str().unwrap(),
            ),
            (
                "KONSTRUCT_GATE__REDIS__PASSWORD_FILE",
                redis.to_str().unwrap(),
            ),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("amqp://konstruct:***@rabbitmq:5672/%2f"),
        "{stdout}"
    );
    assert!(!stdout.contains("Kq4"), "{stdout}");
    // Without the mounted secret, start-up stops with one sentence.
    let out = gate(&["check-config", "--config", file], &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("amqp.password_file") && stderr.trim().lines().count() == 1,
        "{stderr}"
    );
}
