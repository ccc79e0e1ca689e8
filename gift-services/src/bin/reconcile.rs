//! `reconcile`: proves from the database that no money was created or lost.
//!
//! Batch (default): checks the whole history once, prints the report, and exits 0 when clean,
//! 2 when it found only safe mismatches and repaired every one (`--repair`), 1 when any
//! mismatch remains, 64 on bad configuration.
//!
//! `--watch`: near-real-time; every `interval_secs` checks the orders updated in the last
//! `window_secs`, prints one JSON report per run, exports Prometheus metrics, and stops on
//! SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use gift_services::orders::OrderStore;
use gift_services::reconcile::{self, Report};
use gift_services::saga::{EffectSink, Saga};
use gift_services::settlement::Settlement;
use gift_services::wallet_client::WalletClient;
use gift_services::{GiftError, Traffic};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use telemetry::service::{run_service, Failure, EXIT_CONFIG};

#[derive(Parser)]
#[command(
    version,
    about = "Reconcile orders, wallet and settlement: batch (exit 1 on mismatch) or --watch"
)]
struct Args {
    /// TOML configuration; keys can be overridden with RECONCILE_* variables, and flags
    /// override both.
    #[arg(long, short, env = "RECONCILE_CONFIG")]
    config: Option<PathBuf>,
    /// The primary's URL (postgres://...).
    #[arg(long)]
    database_url: Option<String>,
    /// Wallet gRPC endpoints for repairs (repeatable).
    #[arg(long = "wallet")]
    wallet_endpoints: Vec<String>,
    /// Check the shadow (load-test) tables instead of the real ones.
    #[arg(long)]
    shadow: bool,
    /// Repair safe mismatches (refund failed orders, finish abandoned ones, settle).
    #[arg(long)]
    repair: bool,
    /// Near-real-time: run every interval over a sliding window until SIGTERM.
    #[arg(long)]
    watch: bool,
    #[arg(long)]
    interval_secs: Option<u64>,
    #[arg(long)]
    window_secs: Option<u64>,
    #[arg(long)]
    grace_secs: Option<u64>,
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Batch: print the report as JSON (watch mode always prints JSON lines).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    database_url: Option<String>,
    #[serde(default)]
    wallet_endpoints: Vec<String>,
    #[serde(default)]
    shadow: bool,
    #[serde(default)]
    repair: bool,
    #[serde(default = "default_interval_secs")]
    interval_secs: u64,
    #[serde(default = "default_window_secs")]
    window_secs: u64,
    #[serde(default = "default_grace_secs")]
    grace_secs: u64,
    #[serde(default)]
    metrics_addr: Option<SocketAddr>,
}

fn default_interval_secs() -> u64 {
    5
}
fn default_window_secs() -> u64 {
    600
}
fn default_grace_secs() -> u64 {
    60
}

fn load(args: &Args) -> Result<Config, String> {
    let mut c: Config = telemetry::service::load_config(args.config.as_deref(), "RECONCILE_")?;
    if let Some(url) = &args.database_url {
        c.database_url = Some(url.clone());
    }
    if !args.wallet_endpoints.is_empty() {
        c.wallet_endpoints = args.wallet_endpoints.clone();
    }
    c.shadow |= args.shadow;
    c.repair |= args.repair;
    c.interval_secs = args.interval_secs.unwrap_or(c.interval_secs);
    c.window_secs = args.window_secs.unwrap_or(c.window_secs);
    c.grace_secs = args.grace_secs.unwrap_or(c.grace_secs);
    c.metrics_addr = args.metrics_addr.or(c.metrics_addr);
    match &c.database_url {
        None => {
            return Err(
                "database_url is required (--database-url or RECONCILE_DATABASE_URL)".into(),
            )
        }
        Some(u) if !u.starts_with("postgres://") && !u.starts_with("postgresql://") => {
            return Err("database_url must be a postgres:// URL".into())
        }
        Some(_) => {}
    }
    if c.repair && c.wallet_endpoints.is_empty() {
        return Err("repair needs the wallet: give --wallet host:port".into());
    }
    if c.interval_secs == 0 || c.window_secs <= c.grace_secs {
        return Err(format!(
            "need interval_secs > 0 and window_secs ({}) > grace_secs ({})",
            c.window_secs, c.grace_secs
        ));
    }
    Ok(c)
}

struct Checker {
    pool: sqlx::PgPool,
    traffic: Traffic,
    saga: Option<Saga>,
    grace_secs: u64,
}

impl Checker {
    fn new(c: &Config) -> Result<Checker, GiftError> {
        let url = c.database_url.clone().unwrap_or_default();
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy(&url)?;
        let traffic = if c.shadow {
            Traffic::Shadow
        } else {
            Traffic::Real
        };
        let saga = if c.repair {
            Some(Saga {
                orders: OrderStore::new(pool.clone(), traffic),
                settlement: Settlement::new(pool.clone(), traffic),
                wallet: WalletClient::new(
                    &c.wallet_endpoints,
                    Duration::from_millis(500),
                    Duration::from_secs(2),
                )?,
                // Repairs never deliver effects.
                effects: EffectSink::new(None, Duration::from_millis(200))?,
            })
        } else {
            None
        };
        Ok(Checker {
            pool,
            traffic,
            saga,
            grace_secs: c.grace_secs,
        })
    }

    async fn check(&self, window_secs: Option<u64>) -> Result<Report, GiftError> {
        reconcile::run(
            &self.pool,
            self.traffic,
            window_secs,
            self.grace_secs,
            self.saga.as_ref(),
        )
        .await
    }
}

fn print_human(r: &Report) {
    println!(
        "reconciliation ({} traffic, {}): {} orders checked, {} pending",
        r.scope.traffic,
        r.scope
            .window_secs
            .map_or("all history".to_string(), |w| format!("last {w} s")),
        r.orders_checked,
        r.orders_pending
    );
    let c = &r.conservation;
    println!(
        "money: top-ups {} = balances {} + streamer income {} + in transit {} -> {}",
        c.top_ups,
        c.balances,
        c.streamer_income,
        c.in_transit,
        if c.conserved {
            "conserved"
        } else {
            "NOT CONSERVED"
        }
    );
    println!(
        "wallet: {} accounts, {} ledger entries, {} mismatches",
        r.wallet.accounts, r.wallet.ledger_entries, r.wallet.mismatch_count
    );
    println!("orders/settlement: {} mismatches", r.mismatch_count);
    for m in r.mismatches.iter().chain(&r.wallet.mismatches) {
        println!(
            "  {:<32} {:<30} {}{}",
            m.check,
            m.subject,
            m.detail,
            if m.repairable { " (repairable)" } else { "" }
        );
    }
    for repair in &r.repairs {
        println!(
            "  repaired {} {} ({}): {}",
            repair.action, repair.order_id, repair.check, repair.result
        );
    }
}

fn batch(config: Config, json: bool) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("reconcile: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = runtime.block_on(async {
        let checker = Checker::new(&config)?;
        checker.check(None).await
    });
    match report {
        Ok(report) => {
            if json {
                match serde_json::to_string_pretty(&report) {
                    Ok(text) => println!("{text}"),
                    Err(e) => eprintln!("reconcile: {e}"),
                }
            } else {
                print_human(&report);
            }
            if report.is_clean() {
                ExitCode::SUCCESS
            } else if report.is_clean_after_repair() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
        Err(GiftError::Config(m)) => {
            eprintln!("reconcile: invalid configuration: {m}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("reconcile: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    check: String,
}

async fn watch(
    config: Config,
    shutdown: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
) -> Result<(), Failure> {
    let checker = Checker::new(&config).map_err(|e| Failure::Config(e.to_string()))?;
    let mut registry = Registry::with_prefix("reconcile");
    let mismatches = Family::<CheckLabels, Gauge>::default();
    let runs = Family::<CheckLabels, Counter>::default();
    let conserved = Gauge::<i64>::default();
    let pending = Gauge::<i64>::default();
    let repairs = Counter::<u64>::default();
    registry.register(
        "mismatches",
        "Mismatches found by the last run, per check",
        mismatches.clone(),
    );
    registry.register(
        "runs",
        "Runs by result (clean, mismatch, error)",
        runs.clone(),
    );
    registry.register(
        "money_conserved",
        "1 when the last run found money conserved",
        conserved.clone(),
    );
    registry.register(
        "orders_pending",
        "Orders still within the grace period",
        pending.clone(),
    );
    registry.register("repairs", "Repairs made", repairs.clone());
    let registry = Arc::new(registry);
    if let Some(addr) = config.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Failure::Config(format!("metrics_addr {addr}: {e}")))?;
        let registry = registry.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let registry = registry.clone();
                async move {
                    let mut out = String::new();
                    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
                    out
                }
            }),
        );
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!("metrics endpoint stopped: {e}");
            }
        });
    }
    let mut shutdown = shutdown;
    let mut ticker = tokio::time::interval(Duration::from_secs(config.interval_secs));
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = ticker.tick() => {}
        }
        match checker.check(Some(config.window_secs)).await {
            Ok(report) => {
                mismatches.clear();
                for (check, n) in report.counts_by_check() {
                    mismatches
                        .get_or_create(&CheckLabels {
                            check: check.to_string(),
                        })
                        .set(n);
                }
                conserved.set(i64::from(report.conservation.conserved));
                pending.set(report.orders_pending);
                repairs.inc_by(report.repairs.len() as u64);
                let result = if report.is_clean() {
                    "clean"
                } else {
                    "mismatch"
                };
                runs.get_or_create(&CheckLabels {
                    check: result.into(),
                })
                .inc();
                if !report.is_clean() {
                    tracing::warn!(
                        mismatches = report.mismatch_count,
                        wallet = report.wallet.mismatch_count,
                        conserved = report.conservation.conserved,
                        "reconciliation found mismatches"
                    );
                }
                match serde_json::to_string(&report) {
                    Ok(line) => println!("{line}"),
                    Err(e) => tracing::error!("report: {e}"),
                }
            }
            Err(e) => {
                runs.get_or_create(&CheckLabels {
                    check: "error".into(),
                })
                .inc();
                tracing::warn!("reconciliation run failed: {e}");
            }
        }
    }
    tracing::info!("reconcile stopped cleanly");
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = load(&args);
    if !args.watch {
        return match config {
            Ok(config) => batch(config, args.json),
            Err(e) => {
                eprintln!("reconcile: invalid configuration: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        };
    }
    run_service(
        "reconcile",
        |c: &Config| {
            if c.shadow {
                "shadow".into()
            } else {
                "real".into()
            }
        },
        config,
        watch,
    )
}
