use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use konstruct_gate::{Application, Config, shutdown, telemetry};
use tokio_util::sync::CancellationToken;

/// Rate-limits Konstruct's inbound chat messages per tenant and channel.
#[derive(Parser)]
#[command(name = "konstruct-gate", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gate until SIGTERM or SIGINT.
    Run {
        /// TOML configuration file.
        #[arg(long, env = "KONSTRUCT_GATE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Print the effective configuration (secrets redacted), or why it is invalid.
    CheckConfig {
        /// TOML configuration file.
        #[arg(long, env = "KONSTRUCT_GATE_CONFIG")]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (path, run) = match cli.command {
        Command::Run { config } => (config, true),
        Command::CheckConfig { config } => (config, false),
    };
    let config = match Config::load(path.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("konstruct-gate: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if !run {
        print!("{}", config.to_redacted_toml());
        return ExitCode::SUCCESS;
    }
    telemetry::init_tracing(&config.log);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    runtime.block_on(async move {
        let stop = CancellationToken::new();
        if let Err(e) = shutdown::install(stop.clone()) {
            eprintln!("konstruct-gate: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
        match Application::build(config).await {
            Ok(app) => {
                let app = app.reload_from(path);
                app.run_until_stopped(stop).await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("konstruct-gate: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
