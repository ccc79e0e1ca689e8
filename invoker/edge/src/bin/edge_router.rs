//! `edge-router`: the HTTP reverse proxy in front of both sites' gift-api (see the crate docs).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use edge_router::{EdgeConfig, EdgeError};
use telemetry::service::{run_service, Failure};

#[derive(Parser)]
#[command(
    version,
    about = "The edge router: sends each request to the site its uid bucket is routed to"
)]
struct Args {
    /// TOML configuration; every key can be overridden with EDGE_ROUTER_* variables.
    #[arg(long, short, env = "EDGE_ROUTER_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = EdgeConfig::load(args.config.as_deref()).map_err(|e| match e {
        EdgeError::Config(m) => m,
        other => other.to_string(),
    });
    run_service(
        "edge-router",
        |c: &EdgeConfig| c.agent_id.clone(),
        config,
        |config, shutdown| async move {
            edge_router::server::serve(config, shutdown)
                .await
                .map_err(|e| match e {
                    EdgeError::Config(m) => Failure::Config(m),
                    other => Failure::Runtime(other.to_string()),
                })
        },
    )
}
