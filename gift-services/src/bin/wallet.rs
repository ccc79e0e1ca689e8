//! `wallet`: the wallet gRPC service (balances and the fenced, idempotent ledger).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use gift_services::wallet_service::{self, WalletConfig};
use gift_services::GiftError;

/// Exit code for a configuration error (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

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
    let config = match WalletConfig::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("wallet: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wallet: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let _telemetry = match telemetry::init("wallet", &format!("wallet-{}", config.site)) {
            Ok(guard) => guard,
            Err(e) => return Err(GiftError::Config(e.to_string())),
        };
        // On the worker pool, not block_on's thread (see the invoker's main).
        tokio::spawn(wallet_service::serve(config, telemetry::shutdown_signal()))
            .await
            .unwrap_or_else(|e| Err(GiftError::Serve(format!("service task failed: {e}"))))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wallet: {e}");
            if matches!(e, GiftError::Config(_)) {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
