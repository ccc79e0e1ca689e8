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

use tokio::sync::watch;

use crate::pb;
use crate::writer::{self, Current, WriterDoc, WriterMetrics};
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
    /// The writer's database (the current primary). With `writer_key`: used until the first
    /// writer document arrives, if given.
    #[serde(default)]
    pub database_url: Option<String>,
    /// The writer's fencing epoch (goes with `database_url`).
    #[serde(default)]
    pub epoch: Option<u64>,
    /// Follow the writer the invoker publishes in the site's etcd at this key (e.g.
    /// `/invoker/writers/wallet`; needs `etcd_endpoints`): a new (dsn, epoch) swaps the
    /// database this wallet writes to, and a pending wallet failover refuses every write.
    #[serde(default)]
    pub writer_key: Option<String>,
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
        validate_writer(
            self.database_url.as_deref(),
            self.epoch,
            self.writer_key.as_deref(),
            &self.etcd_endpoints,
        )?;
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

/// Checks how a service finds its writer: a fixed `database_url` + `epoch`, a `writer_key`
/// followed in etcd, or both (the fixed one until the first document). Shared with gift-api
/// (which has no epoch: pass `Some(1)`).
pub(crate) fn validate_writer(
    database_url: Option<&str>,
    epoch: Option<u64>,
    writer_key: Option<&str>,
    etcd_endpoints: &[String],
) -> Result<(), GiftError> {
    let bad = |m: &str| Err(GiftError::Config(m.to_string()));
    if let Some(url) = database_url {
        if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
            return bad("database_url must be a postgres:// URL");
        }
    }
    if epoch == Some(0) {
        return bad("epoch must be at least 1");
    }
    match writer_key {
        None => {
            if database_url.is_none() {
                return bad("database_url is required unless writer_key is set (the writer followed in etcd)");
            }
            if epoch.is_none() {
                return bad("epoch is required with database_url unless writer_key is set");
            }
        }
        Some(key) => {
            if !key.starts_with('/') || key.len() > 256 || key.chars().any(char::is_whitespace) {
                return bad("writer_key must be an etcd key starting with '/' (e.g. /invoker/writers/wallet), at most 256 characters, no spaces");
            }
            if etcd_endpoints.is_empty() {
                return bad("writer_key needs etcd_endpoints (the site's etcd where the writer is published)");
            }
            if database_url.is_some() != epoch.is_some() {
                return bad("database_url and epoch go together: give both (used until the first writer document) or neither");
            }
        }
    }
    Ok(())
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
    writer: WriterMetrics,
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
        let writer = WriterMetrics::default();
        writer.register(&mut registry);
        Metrics {
            registry,
            ops,
            seconds,
            writer,
        }
    }
}

/// The ledgers of one writer (one database, one epoch).
#[derive(Debug)]
struct WriterLedgers {
    real: Ledger,
    shadow: Ledger,
}

impl WriterLedgers {
    fn new(pool: sqlx::PgPool, epoch: u64) -> WriterLedgers {
        WriterLedgers {
            real: Ledger::new(pool.clone(), Traffic::Real, epoch),
            shadow: Ledger::new(pool, Traffic::Shadow, epoch),
        }
    }

    fn ledger(&self, shadow: bool) -> &Ledger {
        if shadow {
            &self.shadow
        } else {
            &self.real
        }
    }
}

pub struct WalletService {
    writer: Arc<Current<WriterLedgers>>,
    /// The followed writer document (`writer_key`), for the pending-failover refusal.
    docs: Option<watch::Receiver<Option<WriterDoc>>>,
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
    /// The writer a write goes through, or the refusal: a pending failover (nothing touched),
    /// or no writer known yet. Both are UNAVAILABLE without the unknown-outcome marker:
    /// nothing happened.
    fn writable(&self, op: &'static str) -> Result<Arc<WriterLedgers>, Status> {
        if let Some(refusal) = writer::refusal_now(self.docs.as_ref()) {
            self.metrics.writer.refused_pending.inc();
            self.count(op, "failover_pending");
            return Err(Status::unavailable(refusal));
        }
        self.writer.get().ok_or_else(|| {
            self.count(op, "no_writer");
            Status::unavailable(writer::NO_WRITER_MESSAGE)
        })
    }

    fn count(&self, op: &'static str, result: &'static str) {
        self.metrics
            .ops
            .get_or_create(&OpLabels { op, result })
            .inc();
    }

    /// A request may name the epoch it expects; it must be ours.
    fn check_request_epoch(ours: u64, epoch: u64) -> Option<pb::WalletResult> {
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
        epoch: u64,
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
        // Reads keep working while a failover is pending.
        let writer = self
            .writer
            .get()
            .ok_or_else(|| Status::unavailable(writer::NO_WRITER_MESSAGE))?;
        match writer.ledger(r.shadow).balance(r.user_id).await {
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
        let writer = self.writable("credit")?;
        let ledger = writer.ledger(r.shadow);
        if let Some(stale) = Self::check_request_epoch(ledger.epoch(), r.epoch) {
            return Ok(Response::new(stale));
        }
        self.run(
            "credit",
            ledger.epoch(),
            ledger.credit(r.user_id, r.amount, &r.idempotency_key),
        )
        .await
    }

    async fn debit(
        &self,
        request: Request<pb::DebitRequest>,
    ) -> Result<Response<pb::WalletResult>, Status> {
        let r = request.into_inner();
        let writer = self.writable("debit")?;
        let ledger = writer.ledger(r.shadow);
        if let Some(stale) = Self::check_request_epoch(ledger.epoch(), r.epoch) {
            return Ok(Response::new(stale));
        }
        self.run(
            "debit",
            ledger.epoch(),
            ledger.debit(&r.order_id, r.user_id, r.amount),
        )
        .await
    }

    async fn refund(
        &self,
        request: Request<pb::RefundRequest>,
    ) -> Result<Response<pb::WalletResult>, Status> {
        let r = request.into_inner();
        let writer = self.writable("refund")?;
        let ledger = writer.ledger(r.shadow);
        if let Some(stale) = Self::check_request_epoch(ledger.epoch(), r.epoch) {
            return Ok(Response::new(stale));
        }
        self.run("refund", ledger.epoch(), ledger.refund(&r.order_id))
            .await
    }
}

/// How long a replaced pool stays open for calls that took it just before the switch.
fn retire_after(config: &WalletConfig) -> Duration {
    Duration::from_millis(config.statement_timeout_ms + config.acquire_timeout_ms + 1_000)
}

/// Swaps the ledgers whenever the followed document names a new (dsn, epoch).
async fn follow_writer(
    mut docs: watch::Receiver<Option<WriterDoc>>,
    writer: Arc<Current<WriterLedgers>>,
    config: WalletConfig,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut current = config.database_url.clone().zip(config.epoch);
    loop {
        let doc = tokio::select! {
            doc = writer::next_writer(&mut docs, &mut current) => doc,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Some(doc) = doc else { return };
        let pool = match crate::pool(
            &doc.dsn,
            config.pool_size,
            config.statement_timeout_ms,
            config.acquire_timeout_ms,
        ) {
            Ok(pool) => pool,
            Err(e) => {
                tracing::error!(
                    epoch = doc.epoch,
                    "cannot use the published writer's dsn: {e}; keeping the previous writer"
                );
                continue;
            }
        };
        if config.migrate {
            let pool = pool.clone();
            tokio::spawn(async move {
                if let Err(e) = crate::migrate(&pool).await {
                    tracing::warn!("migrating the new writer's database: {e}");
                }
            });
        }
        let old = writer.set(WriterLedgers::new(pool, doc.epoch));
        metrics.writer.switches.inc();
        metrics.writer.set_epoch(doc.epoch);
        tracing::info!(site = %doc.site, epoch = doc.epoch, revision = doc.revision, "wallet writes to a new writer");
        if let Some(old) = old {
            let pool = old.real.pool().clone();
            let wait = retire_after(&config);
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                pool.close().await;
            });
        }
    }
}

/// Connects, optionally migrates, and serves until `shutdown` resolves.
pub async fn serve(
    config: WalletConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GiftError> {
    let metrics = Arc::new(Metrics::new());
    let initial = match (&config.database_url, config.epoch) {
        (Some(url), Some(epoch)) => {
            let pool = crate::pool(
                url,
                config.pool_size,
                config.statement_timeout_ms,
                config.acquire_timeout_ms,
            )?;
            if config.migrate {
                crate::migrate(&pool).await?;
            }
            metrics.writer.set_epoch(epoch);
            Some(WriterLedgers::new(pool, epoch))
        }
        _ => None,
    };
    let writer = Arc::new(Current::new(initial));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let docs = config
        .writer_key
        .as_ref()
        .map(|key| writer::follow(config.etcd_endpoints.clone(), key.clone(), stop_rx.clone()));
    if let Some(docs) = &docs {
        tokio::spawn(follow_writer(
            docs.clone(),
            writer.clone(),
            config.clone(),
            metrics.clone(),
            stop_rx.clone(),
        ));
    }
    let service = WalletService {
        writer,
        docs,
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
    tracing::info!(site = %config.site, grpc = %config.listen_addr, epoch = ?config.epoch, writer_key = ?config.writer_key, "wallet listening");
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
