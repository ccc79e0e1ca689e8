//! `invoker`: one node of the control plane.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use invoker::config::Config;
use invoker::InvokerError;
use telemetry::service::{run_service, Failure};

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
    let config = Config::load(args.config.as_deref()).map_err(|e| match e {
        InvokerError::Config(m) => m,
        other => other.to_string(),
    });
    run_service(
        "invoker",
        |c: &Config| format!("invoker-{}", c.node_id),
        config,
        |config, shutdown| async move {
            let failure = |e: InvokerError| match e {
                InvokerError::Config(m) => Failure::Config(m),
                other => Failure::Runtime(other.to_string()),
            };
            let node = invoker::Node::start(&config).await.map_err(failure)?;
            node.bootstrap(&config).await.map_err(failure)?;
            invoker::node::serve(node, &config, shutdown)
                .await
                .map_err(failure)?;
            tracing::info!("invoker stopped cleanly");
            Ok(())
        },
    )
}
