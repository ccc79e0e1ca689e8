//! `wallet`: the wallet gRPC service (balances and the fenced, idempotent ledger).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use gift_services::wallet_service::{self, WalletConfig};
use gift_services::GiftError;
use telemetry::service::{run_service, Failure};

#[derive(Parser)]
#[command(
    version,
    about = "The wallet service: balances and the fenced, idempotent ledger"
)]
struct Args {
    /// TOML configuration file; every key can be overridden with WALLET_* variables.
    #[arg(long, short, env = "WALLET_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = WalletConfig::load(args.config.as_deref()).map_err(|e| match e {
        GiftError::Config(m) => m,
        other => other.to_string(),
    });
    run_service(
        "wallet",
        |c: &WalletConfig| format!("wallet-{}-{}", c.site, c.listen_addr.port()),
        config,
        |config, shutdown| async move {
            wallet_service::serve(config, shutdown)
                .await
                .map_err(|e| match e {
                    GiftError::Config(m) => Failure::Config(m),
                    other => Failure::Runtime(other.to_string()),
                })
        },
    )
}
