//! `invoker`: one node of the control plane.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use invoker::config::Config;
use invoker::InvokerError;

/// Exit code for a configuration error (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    version,
    about = "A node of the invoker control plane (raft over gRPC)"
)]
struct Args {
    /// TOML configuration file; every key can be overridden with INVOKER_* variables.
    #[arg(long, short, env = "INVOKER_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("invoker: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("invoker: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Run the node as a spawned task: what `block_on` polls runs on the main thread, outside
    // the worker pool, and the gRPC server polls its connections inside its serve future.
    let result = runtime.block_on(async {
        tokio::spawn(run(config))
            .await
            .unwrap_or_else(|e| Err(InvokerError::Serve(format!("node task failed: {e}"))))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(kind = e.kind(), "invoker failed: {e}");
            eprintln!("invoker: {e}");
            if matches!(e, InvokerError::Config(_)) {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn run(config: Config) -> Result<(), InvokerError> {
    let _telemetry = telemetry::init("invoker", &format!("invoker-{}", config.node_id))
        .map_err(|e| InvokerError::Config(e.to_string()))?;
    let node = invoker::Node::start(&config).await?;
    node.bootstrap(&config).await?;
    invoker::node::serve(node, &config, telemetry::shutdown_signal()).await?;
    tracing::info!("invoker stopped cleanly");
    Ok(())
}
