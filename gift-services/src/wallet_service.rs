//! The wallet gRPC service: configuration, handlers, metrics, and the server.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::pb;
use crate::{GiftError, Ledger, Outcome, Traffic};

/// The wallet's configuration: a TOML file plus `WALLET_*` environment overrides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WalletConfig {
    /// The site this instance runs in.
    pub site: String,
    /// gRPC (wallet, health, reflection).
    pub listen_addr: SocketAddr,
    /// Prometheus `/metrics`; absent disables it.
    #[serde(default)]
    pub metrics_addr: Option<SocketAddr>,
    /// The writer's database (the current primary).
    pub database_url: String,
    /// The writer's fencing epoch (a later issue takes it from the control plane).
    pub epoch: u64,
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// Deadline of one database operation; past it the outcome is reported unknown.
    #[serde(default = "default_statement_timeout_ms")]
    pub statement_timeout_ms: u64,
    /// Longest wait for a database connection (the database gone: fail fast, not after a
    /// whole statement timeout).
    #[serde(default = "crate::default_acquire_timeout_ms")]
    pub acquire_timeout_ms: u64,
    /// Apply the schema migrations at start (the lab does; production runs them once).
    #[serde(default)]
    pub migrate: bool,
    /// The site's etcd (client URLs); empty: no registration.
    #[serde(default)]
    pub etcd_endpoints: Vec<String>,
    /// This instance's name in `/services/wallet/<site>/<instance>`; default `wallet-<port>`.
    #[serde(default)]
    pub instance: Option<String>,
    /// The address registered for clients; default `listen_addr`.
    #[serde(default)]
    pub advertise_addr: Option<String>,
    #[serde(default = "default_registration_ttl_secs")]
    pub registration_ttl_secs: i64,
}

fn default_registration_ttl_secs() -> i64 {
    5
}

fn default_pool_size() -> u32 {
    16
}

fn default_statement_timeout_ms() -> u64 {
    2_000
}

impl WalletConfig {
    pub fn load(path: Option<&Path>) -> Result<WalletConfig, GiftError> {
        let config: WalletConfig =
            telemetry::service::load_config(path, "WALLET_").map_err(GiftError::Config)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), GiftError> {
        let bad = |m: String| Err(GiftError::Config(m));
        if self.site.is_empty() || self.site.len() > 64 {
            return bad("site must be 1-64 characters".into());
        }
        if !self.database_url.starts_with("postgres://")
            && !self.database_url.starts_with("postgresql://")
        {
            return bad("database_url must be a postgres:// URL".into());
        }
        if self.epoch == 0 {
            return bad("epoch must be at least 1".into());
        }
        if self.pool_size == 0 || self.pool_size > 256 {
            return bad(format!(
                "pool_size {} is out of range (1..=256)",
                self.pool_size
            ));
        }
        if self.statement_timeout_ms == 0 || self.acquire_timeout_ms == 0 {
            return bad("statement_timeout_ms and acquire_timeout_ms must be above 0".into());
        }
        crate::registry::validate_settings(self.instance.as_deref(), self.registration_ttl_secs)
            .map_err(GiftError::Config)?;
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
    result: &'static str,
}

struct Metrics {
    registry: Registry,
    ops: Family<OpLabels, Counter>,
    seconds: Histogram,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("wallet");
        let ops = Family::<OpLabels, Counter>::default();
        let seconds = Histogram::new(exponential_buckets(0.0002, 2.0, 14));
        registry.register(
            "operations",
            "Wallet operations by kind and result (committed, duplicate, rejected code, unknown, invalid)",
            ops.clone(),
        );
        registry.register(
            "operation_seconds",
            "Wallet operation latency",
            seconds.clone(),
        );
        Metrics {
            registry,
            ops,
            seconds,
        }
    }
}

pub struct WalletService {
    real: Ledger,
    shadow: Ledger,
    metrics: Arc<Metrics>,
}

fn result_label(r: &Result<Outcome, GiftError>) -> &'static str {
    match r {
        Ok(Outcome::Committed {
            duplicate: false, ..
        }) => "committed",
        Ok(Outcome::Committed {
            duplicate: true, ..
        }) => "duplicate",
        Ok(Outcome::Rejected(r)) => r.code(),
        Err(GiftError::InvalidInput(_)) => "invalid",
        Err(_) => "unknown",
    }
}

impl WalletService {
    fn ledger(&self, shadow: bool) -> &Ledger {
        if shadow {
            &self.shadow
        } else {
            &self.real
        }
    }

    /// A request may name the epoch it expects; it must be ours.
    fn check_request_epoch(&self, epoch: u64) -> Option<pb::WalletResult> {
        let ours = self.real.epoch();
        (epoch != 0 && epoch != ours).then(|| pb::WalletResult {
            status: pb::ResultStatus::Rejected as i32,
            reason_code: "stale_epoch".into(),
            reason: format!(
                "the request names epoch {epoch}; this wallet writes with epoch {ours}"
            ),
            epoch: ours,
            ..Default::default()
        })
    }

    async fn run(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<Outcome, GiftError>>,
    ) -> Result<Response<pb::WalletResult>, Status> {
        let started = Instant::now();
        let result = fut.await;
        self.metrics
            .ops
            .get_or_create(&OpLabels {
                op,
                result: result_label(&result),
            })
            .inc();
        self.metrics
            .seconds
            .observe(started.elapsed().as_secs_f64());
        let epoch = self.real.epoch();
        match result {
            Ok(Outcome::Committed {
                seq,
                balance,
                duplicate,
            }) => Ok(Response::new(pb::WalletResult {
                status: pb::ResultStatus::Committed as i32,
                seq,
                balance,
                duplicate,
                epoch,
                ..Default::default()
            })),
            Ok(Outcome::Rejected(r)) => Ok(Response::new(pb::WalletResult {
                status: pb::ResultStatus::Rejected as i32,
                reason_code: r.code().into(),
                reason: r.to_string(),
                epoch,
                ..Default::default()
            })),
            Err(GiftError::InvalidInput(m)) => Err(Status::invalid_argument(m)),
            Err(e) => {
                tracing::warn!(op, "outcome unknown: {e}");
                let mut status = Status::unavailable(format!(
                    "outcome unknown ({e}); retry with the same order id or idempotency key"
                ));
                // Tells clients the request reached the wallet: unlike a connection failure,
                // it may have committed.
                status.metadata_mut().insert(
                    crate::wallet_client::OUTCOME_HEADER,
                    tonic::metadata::MetadataValue::from_static("unknown"),
                );
                Err(status)
            }
        }
    }
}

#[tonic::async_trait]
impl pb::wallet_server::Wallet for WalletService {
    async fn balance(
        &self,
        request: Request<pb::BalanceRequest>,
    ) -> Result<Response<pb::BalanceReply>, Status> {
        let r = request.into_inner();
        match self.ledger(r.shadow).balance(r.user_id).await {
            Ok(balance) => Ok(Response::new(pb::BalanceReply {
                user_id: r.user_id,
                exists: balance.is_some(),
                balance: balance.unwrap_or(0),
            })),
            Err(GiftError::InvalidInput(m)) => Err(Status::invalid_argument(m)),
            Err(e) => Err(Status::unavailable(format!("database: {e}"))),
        }
    }

    async fn credit(
        &self,
        request: Request<pb::CreditRequest>,
    ) -> Result<Response<pb::WalletResult>, Status> {
        let r = request.into_inner();
        if let Some(stale) = self.check_request_epoch(r.epoch) {
            return Ok(Response::new(stale));
        }
        let ledger = self.ledger(r.shadow);
        self.run(
            "credit",
            ledger.credit(r.user_id, r.amount, &r.idempotency_key),
        )
        .await
    }

    async fn debit(
        &self,
        request: Request<pb::DebitRequest>,
    ) -> Result<Response<pb::WalletResult>, Status> {
        let r = request.into_inner();
        if let Some(stale) = self.check_request_epoch(r.epoch) {
            return Ok(Response::new(stale));
        }
        let ledger = self.ledger(r.shadow);
        self.run("debit", ledger.debit(&r.order_id, r.user_id, r.amount))
            .await
    }

    async fn refund(
        &self,
        request: Request<pb::RefundRequest>,
    ) -> Result<Response<pb::WalletResult>, Status> {
        let r = request.into_inner();
        if let Some(stale) = self.check_request_epoch(r.epoch) {
            return Ok(Response::new(stale));
        }
        let ledger = self.ledger(r.shadow);
        self.run("refund", ledger.refund(&r.order_id)).await
    }
}

/// Connects, optionally migrates, and serves until `shutdown` resolves.
pub async fn serve(
    config: WalletConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GiftError> {
    let pool = crate::pool(
        &config.database_url,
        config.pool_size,
        config.statement_timeout_ms,
        config.acquire_timeout_ms,
    )?;
    if config.migrate {
        crate::migrate(&pool).await?;
    }
    let metrics = Arc::new(Metrics::new());
    let service = WalletService {
        real: Ledger::new(pool.clone(), Traffic::Real, config.epoch),
        shadow: Ledger::new(pool, Traffic::Shadow, config.epoch),
        metrics: metrics.clone(),
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::wallet_server::WalletServer<WalletService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| GiftError::Serve(format!("reflection: {e}")))?;
    let listener = tokio::net::TcpListener::bind(config.listen_addr)
        .await
        .map_err(|e| GiftError::Serve(format!("cannot listen on {}: {e}", config.listen_addr)))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    if let Some(addr) = config.metrics_addr {
        let metrics_listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| GiftError::Serve(format!("cannot listen on {addr}: {e}")))?;
        let metrics = metrics.clone();
        let mut stop = stop_rx.clone();
        let app = axum::Router::new().route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    let mut out = String::new();
                    match prometheus_client::encoding::text::encode(&mut out, &metrics.registry) {
                        Ok(()) => (axum::http::StatusCode::OK, out),
                        Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                    }
                }
            }),
        );
        tokio::spawn(async move {
            let served = axum::serve(metrics_listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!("metrics endpoint stopped: {e}");
            }
        });
    }
    let registration = crate::registry::Registration::from_config(
        "wallet",
        &config.site,
        &config.etcd_endpoints,
        config.instance.as_deref(),
        config.listen_addr.port(),
        config
            .advertise_addr
            .clone()
            .unwrap_or_else(|| config.listen_addr.to_string()),
        config.registration_ttl_secs,
    )
    .map(|r| tokio::spawn(r.run(stop_rx.clone())));
    tracing::info!(site = %config.site, grpc = %config.listen_addr, epoch = config.epoch, "wallet listening");
    let mut stop = stop_rx;
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(pb::wallet_server::WalletServer::new(service))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        )
        .await
        .map_err(|e| GiftError::Serve(e.to_string()))?;
    if let Some(registration) = registration {
        // Deregister before exiting; bounded so a dead etcd cannot hold the shutdown.
        let _ = tokio::time::timeout(Duration::from_secs(3), registration).await;
    }
    tracing::info!("wallet stopped cleanly");
    Ok(())
}
