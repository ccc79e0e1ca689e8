//! The skeleton every long-running binary shares: load the configuration (TOML file plus
//! environment overrides), exit 64 with a clear message when it is invalid, start the async
//! runtime and telemetry, run the service on the worker pool, map the result to an exit code.

use std::future::Future;
use std::path::Path;
use std::process::ExitCode;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::de::DeserializeOwned;

/// Exit code for a configuration error (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

/// How a service run ended badly.
#[derive(Debug)]
pub enum Failure {
    /// Invalid configuration: exit code 64.
    Config(String),
    /// Anything else: exit code 1.
    Runtime(String),
}

/// Reads `path` (if given) and then `<env_prefix>*` variables (`__` separates sections:
/// `INVOKER_RAFT__HEARTBEAT_INTERVAL_MS`). Unknown keys are the type's business
/// (`deny_unknown_fields`). The error says which file or key is wrong.
pub fn load_config<T: DeserializeOwned>(
    path: Option<&Path>,
    env_prefix: &str,
) -> Result<T, String> {
    let mut figment = Figment::new();
    if let Some(path) = path {
        if !path.is_file() {
            return Err(format!(
                "config file {} does not exist or is not a file",
                path.display()
            ));
        }
        figment = figment.merge(Toml::file(path));
    }
    figment
        .merge(Env::prefixed(env_prefix).split("__").ignore(&["config"]))
        .extract()
        .map_err(|e| e.to_string())
}

/// Runs a service to completion and returns the process exit code.
///
/// `config` is the already-loaded configuration, or the reason it could not be loaded (exit
/// 64). `run` gets the configuration and a future that resolves on SIGTERM/SIGINT; it runs as
/// a spawned task, on the worker pool: a future polled by `block_on` runs on the main thread
/// beside the pool, and a gRPC server polls its connections inside its serve future.
pub fn run_service<C, F, Fut>(
    binary: &str,
    instance: impl FnOnce(&C) -> String,
    config: Result<C, String>,
    run: F,
) -> ExitCode
where
    C: Send + 'static,
    F: FnOnce(C, std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), Failure>> + Send + 'static,
{
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{binary}: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{binary}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let instance = instance(&config);
    let binary_name = binary.to_string();
    let result = runtime.block_on(async move {
        let _telemetry =
            crate::init(&binary_name, &instance).map_err(|e| Failure::Config(e.to_string()))?;
        tokio::spawn(run(config, Box::pin(crate::shutdown_signal())))
            .await
            .unwrap_or_else(|e| Err(Failure::Runtime(format!("service task failed: {e}"))))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            eprintln!("{binary}: invalid configuration: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Failure::Runtime(e)) => {
            tracing::error!("{binary} failed: {e}");
            eprintln!("{binary}: {e}");
            ExitCode::FAILURE
        }
    }
}
