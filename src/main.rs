use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use konstruct_gate::admin::{Admin, AdminError, Target};
use konstruct_gate::config::{Algorithm, OnLimit};
use konstruct_gate::limit::live::RedisOverride;
use konstruct_gate::{Application, Config, shutdown, telemetry};
use tokio_util::sync::CancellationToken;

/// Rate-limits Konstruct's inbound chat messages per tenant and channel.
#[derive(Parser)]
#[command(name = "konstruct-gate", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct ConfigArg {
    /// TOML configuration file.
    #[arg(long, global = true, env = "KONSTRUCT_GATE_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gate until SIGTERM or SIGINT.
    Run(ConfigArg),
    /// Print the effective configuration (secrets redacted), or why it is invalid.
    CheckConfig(ConfigArg),
    /// See and change limits in the Redis the gates use (same configuration as `run`).
    Limits {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: LimitsCommand,
    },
}

#[derive(Subcommand)]
enum LimitsCommand {
    /// Every override, from the file and from Redis, and where each comes from.
    List,
    /// The rule in force for TENANT or TENANT:CHANNEL, and where each field comes from;
    /// TENANT@tenant is the tenant's budget, TENANT[:CHANNEL]@sender the sender limit.
    Get { target: String },
    /// Write an override to Redis; every gate applies it within redis_overrides_refresh_ms.
    /// TARGET as for `get` (`acme@tenant --requests 5000` sets acme's budget).
    Set {
        target: String,
        #[arg(long)]
        requests: Option<u64>,
        #[arg(long)]
        window_seconds: Option<u64>,
        #[arg(long, value_parser = parse_algorithm)]
        algorithm: Option<Algorithm>,
        #[arg(long)]
        burst: Option<u64>,
        #[arg(long)]
        shadow: Option<bool>,
        #[arg(long, value_parser = parse_on_limit)]
        on_limit: Option<OnLimit>,
    },
    /// Remove the Redis override of TENANT or TENANT:CHANNEL.
    Unset { target: String },
    /// The state of TENANT:CHANNEL's window, or of TENANT@tenant's budget, now (reads only).
    Usage { target: String },
    /// Start TENANT:CHANNEL's window (or TENANT@tenant's budget) afresh, on every running
    /// gate.
    Reset { target: String },
}

fn parse_algorithm(text: &str) -> Result<Algorithm, String> {
    serde_json::from_value(serde_json::Value::String(text.into()))
        .map_err(|_| "one of fixed_window, sliding_window, token_bucket".into())
}

fn parse_on_limit(text: &str) -> Result<OnLimit, String> {
    serde_json::from_value(serde_json::Value::String(text.into()))
        .map_err(|_| "one of reject, defer".into())
}

fn load(config: &ConfigArg) -> Result<Config, ExitCode> {
    Config::load(config.config.as_deref()).map_err(|e| {
        eprintln!("konstruct-gate: invalid configuration: {e}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("the tokio runtime starts")
    };
    match cli.command {
        Command::CheckConfig(arg) => match load(&arg) {
            Ok(config) => {
                print!("{}", config.to_redacted_toml());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Run(arg) => {
            let config = match load(&arg) {
                Ok(config) => config,
                Err(code) => return code,
            };
            telemetry::init_tracing(&config.log);
            runtime().block_on(run(config, arg.config))
        }
        Command::Limits {
            config,
            json,
            command,
        } => {
            let config = match load(&config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            match runtime().block_on(limits(config, command, json)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("konstruct-gate: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
    }
}

async fn run(config: Config, path: Option<PathBuf>) -> ExitCode {
    let stop = CancellationToken::new();
    if let Err(e) = shutdown::install(stop.clone()) {
        eprintln!("konstruct-gate: cannot install signal handlers: {e}");
        return ExitCode::FAILURE;
    }
    match Application::build(config).await {
        Ok(app) => {
            app.reload_from(path).run_until_stopped(stop).await;
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("konstruct-gate: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn limits(config: Config, command: LimitsCommand, json: bool) -> Result<(), AdminError> {
    // Arguments are checked before Redis is asked anything.
    let target = |text: &str, channel_required| Target::parse(text, channel_required);
    let print = |value: serde_json::Value, table: String| {
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&value).expect("JSON prints")
            );
        } else {
            print!("{table}");
        }
    };
    match command {
        LimitsCommand::List => {
            let listed = Admin::connect(config).await?.list().await?;
            let mut table = format!("{:<40} {:<6} {}\n", "TARGET", "SOURCE", "VALUES");
            for l in &listed {
                let values = serde_json::to_string(&l.values).expect("JSON prints");
                let note = l
                    .invalid
                    .as_deref()
                    .map(|e| format!("  (skipped: {e})"))
                    .unwrap_or_default();
                table.push_str(&format!(
                    "{:<40} {:<6} {values}{note}\n",
                    l.target, l.source
                ));
            }
            print(to_json(&listed), table);
        }
        LimitsCommand::Get { target: t } => {
            let t = target(&t, false)?;
            let r = Admin::connect(config).await?.get(&t).await?;
            let mut table = format!("{:<16} {:<16} {}\n", "FIELD", "VALUE", "FROM");
            let rows: [(&str, String, &str); 6] = [
                ("requests", r.requests.value.to_string(), &r.requests.source),
                (
                    "window_seconds",
                    r.window_seconds.value.to_string(),
                    &r.window_seconds.source,
                ),
                ("algorithm", name(&r.algorithm.value), &r.algorithm.source),
                ("burst", r.burst.value.to_string(), &r.burst.source),
                ("shadow", r.shadow.value.to_string(), &r.shadow.source),
                ("on_limit", name(&r.on_limit.value), &r.on_limit.source),
            ];
            for (field, value, source) in rows {
                table.push_str(&format!("{field:<16} {value:<16} {source}\n"));
            }
            print(to_json(&r), table);
        }
        LimitsCommand::Set {
            target: t,
            requests,
            window_seconds,
            algorithm,
            burst,
            shadow,
            on_limit,
        } => {
            let t = target(&t, false)?;
            let change = RedisOverride {
                requests,
                window_seconds,
                algorithm,
                burst,
                shadow,
                on_limit,
            };
            Admin::check_change(&config, &t, &change)?;
            Admin::check_writable(&config)?;
            let written = Admin::connect(config).await?.set(&t, change).await?;
            let text = serde_json::to_string(&written).expect("JSON prints");
            print(
                serde_json::json!({"target": t.field(), "override": written}),
                format!("{} = {text}\n", t.field()),
            );
        }
        LimitsCommand::Unset { target: t } => {
            let t = target(&t, false)?;
            Admin::check_writable(&config)?;
            let removed = Admin::connect(config).await?.unset(&t).await?;
            let text = if removed {
                "removed"
            } else {
                "had no Redis override"
            };
            print(
                serde_json::json!({"target": t.field(), "removed": removed}),
                format!("{}: {text}\n", t.field()),
            );
        }
        LimitsCommand::Usage { target: t } => {
            let t = target(&t, true)?;
            let u = Admin::connect(config).await?.usage(&t).await?;
            let table = format!(
                "{:<24} {:<16} {:>10} {:>10} {:>14}\n{:<24} {:<16} {:>10} {:>10} {:>14}\n",
                "TARGET",
                "ALGORITHM",
                "LIMIT",
                "REMAINING",
                "RESET_SECONDS",
                u.target,
                name(&u.algorithm),
                u.limit,
                u.remaining,
                u.reset_seconds
            );
            print(to_json(&u), table);
        }
        LimitsCommand::Reset { target: t } => {
            let t = target(&t, true)?;
            Admin::check_writable(&config)?;
            let deleted = Admin::connect(config).await?.reset(&t).await?;
            print(
                serde_json::json!({"target": t.field(), "keys_deleted": deleted}),
                format!("{}: window reset ({deleted} keys deleted)\n", t.field()),
            );
        }
    }
    Ok(())
}

/// The configuration name of a value (`token_bucket`, `reject`).
fn name(value: &impl serde::Serialize) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn to_json(value: &impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(value).expect("JSON prints")
}
