//! `gift-api`: the HTTP JSON API for sending gifts, with the outbox worker.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use gift_services::api::{self, ApiConfig};
use gift_services::GiftError;
use telemetry::service::{run_service, Failure};

#[derive(Parser)]
#[command(
    version,
    about = "gift-api: send gifts (an idempotent payment saga), read orders and balances"
)]
struct Args {
    /// TOML configuration file; every key can be overridden with GIFT_API_* variables.
    #[arg(long, short, env = "GIFT_API_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = ApiConfig::load(args.config.as_deref()).map_err(|e| match e {
        GiftError::Config(m) => m,
        other => other.to_string(),
    });
    run_service(
        "gift-api",
        |c: &ApiConfig| format!("gift-api-{}-{}", c.site, c.listen_addr.port()),
        config,
        |config, shutdown| async move {
            api::serve(config, shutdown).await.map_err(|e| match e {
                GiftError::Config(m) => Failure::Config(m),
                other => Failure::Runtime(other.to_string()),
            })
        },
    )
}
