//! gift-api: the HTTP JSON front of the gift services.
//!
//! Routes (every error is `{"error": {"code", "message"}}` with a 4xx/5xx status):
//! - `POST /v1/gifts`: send a gift (the saga in [`crate::saga`]); the idempotency key comes in
//!   the body (`idempotency_key`) or the `Idempotency-Key` header.
//! - `GET /v1/orders/{order_id}`, `GET /v1/catalog`.
//! - `GET /v1/wallet/{user_id}`: the balance, from the site's replica when configured (the
//!   answer says how stale), from the writer with `?consistency=strong`.
//! - `POST /v1/wallet/{user_id}/topup`: credit the wallet (idempotent).
//! - `/healthz` (the process runs), `/readyz` (its site's database answers), `/metrics`.
//!
//! `x-shadow: 1` sends a request to the shadow tables, end to end.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path as UrlPath, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Row};
use tokio::sync::watch;

use crate::orders::{NewOrder, OrderStore};
use crate::outbox::{Worker, WorkerConfig, WorkerMetrics};
use crate::saga::{EffectSink, Saga, SendOutcome};
use crate::settlement::Settlement;
use crate::wallet_client::{WalletCall, WalletClient};
use crate::writer::{self, Current, WriterDoc, WriterMetrics};
use crate::{GiftError, Traffic, MAX_AMOUNT};

/// gift-api's configuration: a TOML file plus `GIFT_API_*` environment overrides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    pub site: String,
    /// HTTP: the API, health, readiness and `/metrics`.
    pub listen_addr: SocketAddr,
    /// The primary (orders, settlement, outbox). With `writer_key`: used until the first
    /// writer document arrives, if given.
    #[serde(default)]
    pub database_url: Option<String>,
    /// Follow the wallet's writer published in the site's etcd at this key (e.g.
    /// `/invoker/writers/wallet`; needs `etcd_endpoints`): the primary pool (orders,
    /// settlement, outbox) moves with it, and while a wallet failover is pending payments
    /// answer 503 `payments_unavailable` before any order is created.
    #[serde(default)]
    pub writer_key: Option<String>,
    /// The site's replica for reads that tolerate staleness (wallet balance, catalog).
    #[serde(default)]
    pub replica_url: Option<String>,
    /// Wallet gRPC instances, the local site's first.
    pub wallet_endpoints: Vec<String>,
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    #[serde(default = "default_statement_timeout_ms")]
    pub statement_timeout_ms: u64,
    /// Longest wait for a database connection: with the database gone, a request fails
    /// after this rather than after a whole statement timeout.
    #[serde(default = "crate::default_acquire_timeout_ms")]
    pub acquire_timeout_ms: u64,
    /// Deadline of one wallet call; past it the payment outcome is reported unknown.
    #[serde(default = "default_wallet_timeout_ms")]
    pub wallet_timeout_ms: u64,
    /// Connecting to a wallet instance; past it the wallet counts as unavailable (fail fast).
    #[serde(default = "default_wallet_connect_timeout_ms")]
    pub wallet_connect_timeout_ms: u64,
    /// The room effect service; absent: effects are logged and count as delivered.
    #[serde(default)]
    pub effect_url: Option<String>,
    /// A weak dependency: short.
    #[serde(default = "default_effect_timeout_ms")]
    pub effect_timeout_ms: u64,
    /// Attempts at an effect (and at the activity update) before giving up.
    #[serde(default = "default_effect_max_attempts")]
    pub effect_max_attempts: i32,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Run the outbox worker in this process (both sites may: they share the queue).
    #[serde(default = "default_true")]
    pub outbox_worker: bool,
    /// Orders left `created` this long by a request that gave up are finished by the worker.
    #[serde(default = "default_abandon_after_secs")]
    pub abandon_after_secs: u64,
    /// Apply the schema migrations at start (the lab does).
    #[serde(default)]
    pub migrate: bool,
    /// The site's etcd; empty: no registration.
    #[serde(default)]
    pub etcd_endpoints: Vec<String>,
    /// Name in `/services/gift-api/<site>/<instance>`; default `gift-api-<port>`.
    #[serde(default)]
    pub instance: Option<String>,
    /// The URL registered for clients; default `http://<listen_addr>`.
    #[serde(default)]
    pub advertise_addr: Option<String>,
    #[serde(default = "default_registration_ttl_secs")]
    pub registration_ttl_secs: i64,
}

fn default_pool_size() -> u32 {
    32
}
fn default_statement_timeout_ms() -> u64 {
    2_000
}
fn default_wallet_timeout_ms() -> u64 {
    1_000
}
fn default_wallet_connect_timeout_ms() -> u64 {
    300
}
fn default_effect_timeout_ms() -> u64 {
    200
}
fn default_effect_max_attempts() -> i32 {
    5
}
fn default_max_body_bytes() -> usize {
    16 * 1024
}
fn default_true() -> bool {
    true
}
fn default_abandon_after_secs() -> u64 {
    30
}
fn default_registration_ttl_secs() -> i64 {
    5
}

fn check_url(name: &str, url: &str) -> Result<(), GiftError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(())
    } else {
        Err(GiftError::Config(format!(
            "{name} must be a postgres:// URL"
        )))
    }
}

impl ApiConfig {
    pub fn load(path: Option<&Path>) -> Result<ApiConfig, GiftError> {
        let config: ApiConfig =
            telemetry::service::load_config(path, "GIFT_API_").map_err(GiftError::Config)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), GiftError> {
        let bad = |m: String| Err(GiftError::Config(m));
        if self.site.is_empty() || self.site.len() > 64 {
            return bad("site must be 1-64 characters".into());
        }
        crate::wallet_service::validate_writer(
            self.database_url.as_deref(),
            self.database_url.as_ref().map(|_| 1),
            self.writer_key.as_deref(),
            &self.etcd_endpoints,
        )?;
        if let Some(replica) = &self.replica_url {
            check_url("replica_url", replica)?;
        }
        if self.wallet_endpoints.is_empty() {
            return bad("wallet_endpoints must list at least one wallet".into());
        }
        if self.pool_size == 0 || self.pool_size > 256 {
            return bad(format!(
                "pool_size {} is out of range (1..=256)",
                self.pool_size
            ));
        }
        for (name, ms) in [
            ("statement_timeout_ms", self.statement_timeout_ms),
            ("acquire_timeout_ms", self.acquire_timeout_ms),
            ("wallet_timeout_ms", self.wallet_timeout_ms),
            ("wallet_connect_timeout_ms", self.wallet_connect_timeout_ms),
            ("effect_timeout_ms", self.effect_timeout_ms),
        ] {
            if ms == 0 || ms > 60_000 {
                return bad(format!("{name} {ms} is out of range (1..=60000)"));
            }
        }
        if !(1..=100).contains(&self.effect_max_attempts) {
            return bad(format!(
                "effect_max_attempts {} is out of range (1..=100)",
                self.effect_max_attempts
            ));
        }
        if !(256..=1024 * 1024).contains(&self.max_body_bytes) {
            return bad(format!(
                "max_body_bytes {} is out of range (256..=1048576)",
                self.max_body_bytes
            ));
        }
        if self.abandon_after_secs < 5 {
            return bad(
                "abandon_after_secs must be at least 5 (above any request's deadline)".into(),
            );
        }
        crate::registry::validate_settings(self.instance.as_deref(), self.registration_ttl_secs)
            .map_err(GiftError::Config)?;
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SendLabels {
    traffic: &'static str,
    outcome: String,
}

struct Metrics {
    registry: Registry,
    requests: Family<RouteLabels, Counter>,
    seconds: Family<RouteLabels, Histogram>,
    sends: Family<SendLabels, Counter>,
    writer: WriterMetrics,
}

impl Metrics {
    fn new(worker: &WorkerMetrics) -> Metrics {
        let mut registry = Registry::with_prefix("gift_api");
        let requests = Family::<RouteLabels, Counter>::default();
        let seconds = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 14))
        });
        let sends = Family::<SendLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        registry.register(
            "http_request_seconds",
            "HTTP latency by route and status",
            seconds.clone(),
        );
        registry.register(
            "gift_sends",
            "Gift sends by traffic and outcome (paid, duplicate, rejected code, payments_unavailable, outcome_unknown, ...)",
            sends.clone(),
        );
        worker.register(&mut registry);
        let writer = WriterMetrics::default();
        writer.register(&mut registry);
        Metrics {
            registry,
            requests,
            seconds,
            sends,
            writer,
        }
    }
}

/// What the current primary serves: the sagas (orders, settlement, outbox) on its pool.
#[derive(Debug)]
struct Primary {
    real: Saga,
    shadow: Saga,
    pool: PgPool,
}

impl Primary {
    fn saga(&self, traffic: Traffic) -> &Saga {
        match traffic {
            Traffic::Real => &self.real,
            Traffic::Shadow => &self.shadow,
        }
    }
}

struct AppState {
    /// Swapped when the followed writer moves; `None` until one is known.
    primary: Current<Primary>,
    /// The followed writer document (`writer_key`).
    docs: Option<watch::Receiver<Option<WriterDoc>>>,
    wallet: WalletClient,
    replica: Option<PgPool>,
    metrics: Metrics,
}

type Shared = Arc<AppState>;

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = serde_json::json!({"error": {"code": code, "message": message.into()}});
    (status, axum::Json(body)).into_response()
}

fn json(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

/// A refusal before any work is done (bad header, body, path).
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.status, self.code, self.message)
    }
}

fn database_error(e: &GiftError) -> Response {
    match e {
        GiftError::InvalidInput(m) => error(StatusCode::BAD_REQUEST, "invalid_request", m.clone()),
        other => {
            tracing::warn!("database error: {other}");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unavailable",
                format!("the order database failed; retry with the same idempotency key ({other})"),
            )
        }
    }
}

/// `x-shadow: 1` (or `true`) marks load-test traffic; absent or `0` is real.
fn traffic(headers: &HeaderMap) -> Result<Traffic, ApiError> {
    match headers.get("x-shadow").map(HeaderValue::to_str) {
        None => Ok(Traffic::Real),
        Some(Ok("1" | "true")) => Ok(Traffic::Shadow),
        Some(Ok("0" | "false")) => Ok(Traffic::Real),
        Some(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_header",
            "x-shadow must be 1, true, 0 or false",
        )),
    }
}

fn traffic_label(traffic: Traffic) -> &'static str {
    match traffic {
        Traffic::Real => "real",
        Traffic::Shadow => "shadow",
    }
}

fn payments_unavailable(message: String) -> Response {
    let mut r = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "payments_unavailable",
        message,
    );
    r.headers_mut()
        .insert("retry-after", HeaderValue::from_static("1"));
    r
}

impl AppState {
    /// The refusal of a payment while a wallet failover is pending (counted), before any
    /// order or wallet call: nobody is charged.
    fn refuse_if_pending(&self) -> Option<Response> {
        let refusal = writer::refusal_now(self.docs.as_ref())?;
        self.metrics.writer.refused_pending.inc();
        Some(payments_unavailable(refusal))
    }

    fn no_primary(&self) -> Response {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            writer::NO_WRITER_MESSAGE,
        )
    }
}

fn body_rejection(r: &BytesRejection) -> ApiError {
    let status = r.status();
    let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
        "body_too_large"
    } else {
        "invalid_body"
    };
    ApiError::new(status, code, r.body_text())
}

/// Parses a JSON body into `T`, with a message that names the problem.
fn parse_body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|r| body_rejection(&r))?;
    if let Some(ct) = headers.get(axum::http::header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("");
        if !ct.starts_with("application/json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("expected content-type application/json, got {ct:?}"),
            ));
        }
    }
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("invalid JSON body: {e}"),
        )
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendGiftBody {
    user_id: i64,
    streamer_id: i64,
    /// Defaults to the streamer's own room.
    #[serde(default)]
    room_id: Option<i64>,
    gift_id: String,
    /// Wide so that a huge count is a clear range error rather than a parse error.
    count: i64,
    #[serde(default)]
    idempotency_key: Option<String>,
}

fn idempotency_key(headers: &HeaderMap, body: Option<String>) -> Result<String, ApiError> {
    let header = match headers.get("idempotency-key").map(HeaderValue::to_str) {
        None => None,
        Some(Ok(v)) => Some(v.to_string()),
        Some(Err(_)) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_header",
                "Idempotency-Key must be visible ASCII",
            ))
        }
    };
    match (header, body) {
        (None, None) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "missing_idempotency_key",
            "an idempotency key is required (body field idempotency_key or header Idempotency-Key): it is what makes a retry safe",
        )),
        (Some(h), Some(b)) if h != b => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "conflicting_idempotency_key",
            "the Idempotency-Key header and the body's idempotency_key differ",
        )),
        (Some(k), _) | (None, Some(k)) => Ok(k),
    }
}

async fn send_gift(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let traffic = match traffic(&headers) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    let body: SendGiftBody = match parse_body(&headers, body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let key = match idempotency_key(&headers, body.idempotency_key) {
        Ok(k) => k,
        Err(r) => return r.into_response(),
    };
    let count = match i32::try_from(body.count) {
        Ok(c) => c,
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!(
                    "count must be between 1 and {}, got {}",
                    crate::orders::MAX_COUNT,
                    body.count
                ),
            )
        }
    };
    let new = NewOrder {
        idempotency_key: key,
        user_id: body.user_id,
        streamer_id: body.streamer_id,
        room_id: body.room_id.unwrap_or(body.streamer_id),
        gift_id: body.gift_id,
        count,
    };
    if let Err(GiftError::InvalidInput(m)) = new.validate() {
        return error(StatusCode::BAD_REQUEST, "invalid_request", m);
    }
    // A pending wallet failover, or no writer known yet: refused before any order exists.
    let primary = match (state.refuse_if_pending(), state.primary.get()) {
        (None, Some(primary)) => primary,
        (refused, _) => {
            let (response, label) = match refused {
                Some(response) => (response, "failover_pending"),
                None => (
                    payments_unavailable(writer::NO_WRITER_MESSAGE.to_string()),
                    "no_writer",
                ),
            };
            state
                .metrics
                .sends
                .get_or_create(&SendLabels {
                    traffic: traffic_label(traffic),
                    outcome: label.to_string(),
                })
                .inc();
            return response;
        }
    };
    let outcome = primary.saga(traffic).send(&new).await;
    let label = match &outcome {
        Ok(SendOutcome::Done {
            duplicate: true, ..
        }) => "duplicate".to_string(),
        Ok(SendOutcome::Done { .. }) => "paid".to_string(),
        Ok(SendOutcome::Rejected { code, .. }) => code.clone(),
        Ok(SendOutcome::KeyReused(_)) => "idempotency_key_reused".to_string(),
        Ok(SendOutcome::PaymentsUnavailable { .. }) => "payments_unavailable".to_string(),
        Ok(SendOutcome::OutcomeUnknown { .. }) => "outcome_unknown".to_string(),
        Err(e) => e.kind().to_string(),
    };
    state
        .metrics
        .sends
        .get_or_create(&SendLabels {
            traffic: traffic_label(traffic),
            outcome: label,
        })
        .inc();
    match outcome {
        Ok(SendOutcome::Done {
            order,
            balance,
            duplicate,
        }) => json(
            StatusCode::OK,
            serde_json::json!({
                "order_id": order.order_id,
                "status": order.status,
                "amount": order.amount,
                "balance": balance,
                "duplicate": duplicate,
            }),
        ),
        Ok(SendOutcome::Rejected {
            order,
            code,
            message,
        }) => {
            let mut body = serde_json::json!({"error": {"code": code, "message": message}});
            if let Some(order) = order {
                body["order_id"] = order.order_id.into();
                body["status"] = order.status.into();
            }
            json(StatusCode::UNPROCESSABLE_ENTITY, body)
        }
        Ok(SendOutcome::KeyReused(order)) => {
            let mut r = error(
                StatusCode::CONFLICT,
                "idempotency_key_reused",
                format!(
                    "this idempotency key was used for another gift (order {}); use a new key for a new gift",
                    order.order_id
                ),
            );
            r.headers_mut().insert(
                "x-order-id",
                HeaderValue::from_str(&order.order_id).unwrap_or(HeaderValue::from_static("")),
            );
            r
        }
        Ok(SendOutcome::PaymentsUnavailable { order, message }) => {
            let mut body = serde_json::json!({
                "error": {"code": "payments_unavailable", "message": message},
            });
            if let Some(order) = order {
                body["order_id"] = order.order_id.into();
                body["status"] = order.status.into();
            }
            let mut r = json(StatusCode::SERVICE_UNAVAILABLE, body);
            r.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
            r
        }
        Ok(SendOutcome::OutcomeUnknown { order, message }) => json(
            StatusCode::GATEWAY_TIMEOUT,
            serde_json::json!({
                "error": {"code": "outcome_unknown", "message": message},
                "order_id": order.order_id,
                "status": order.status,
            }),
        ),
        Err(e) => database_error(&e),
    }
}

async fn get_order(
    State(state): State<Shared>,
    headers: HeaderMap,
    UrlPath(order_id): UrlPath<String>,
) -> Response {
    let traffic = match traffic(&headers) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    let Some(primary) = state.primary.get() else {
        return state.no_primary();
    };
    match primary.saga(traffic).orders.get(&order_id).await {
        Ok(Some(order)) => json(
            StatusCode::OK,
            serde_json::to_value(&order).unwrap_or_default(),
        ),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "order_not_found",
            format!("no order {order_id:?}"),
        ),
        Err(e) => database_error(&e),
    }
}

fn parse_user(raw: &str) -> Result<i64, ApiError> {
    match raw.parse::<i64>() {
        Ok(u) if u > 0 => Ok(u),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("user id must be a positive integer, got {raw:?}"),
        )),
    }
}

#[derive(Deserialize)]
struct BalanceQuery {
    #[serde(default)]
    consistency: Option<String>,
}

/// Balance from the replica with its staleness: 0 when it has replayed all the WAL it has
/// received (what it has not received yet is invisible from the replica alone).
async fn replica_balance(
    pool: &PgPool,
    traffic: Traffic,
    user_id: i64,
) -> Result<(Option<i64>, Option<i64>), sqlx::Error> {
    let sql = format!(
        "SELECT (SELECT balance FROM {}.accounts WHERE user_id = $1) AS balance, \
           CASE WHEN NOT pg_is_in_recovery() THEN 0::bigint \
                WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0::bigint \
                ELSE (extract(epoch FROM now() - pg_last_xact_replay_timestamp()) * 1000)::bigint \
           END AS staleness_ms",
        traffic.wallet_schema()
    );
    let row = sqlx::query(&sql).bind(user_id).fetch_one(pool).await?;
    Ok((row.get("balance"), row.get("staleness_ms")))
}

async fn get_balance(
    State(state): State<Shared>,
    headers: HeaderMap,
    UrlPath(user): UrlPath<String>,
    query: Result<Query<BalanceQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let traffic = match traffic(&headers) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    let user_id = match parse_user(&user) {
        Ok(u) => u,
        Err(r) => return r.into_response(),
    };
    let strong = match query.as_ref().map(|q| q.consistency.as_deref()) {
        Ok(None | Some("eventual")) => false,
        Ok(Some("strong")) => true,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "consistency must be strong or eventual",
            )
        }
    };
    if let (false, Some(replica)) = (strong, &state.replica) {
        match replica_balance(replica, traffic, user_id).await {
            Ok((balance, staleness_ms)) => {
                return json(
                    StatusCode::OK,
                    serde_json::json!({
                        "user_id": user_id,
                        "exists": balance.is_some(),
                        "balance": balance.unwrap_or(0),
                        "source": "replica",
                        "staleness_ms": staleness_ms,
                    }),
                )
            }
            Err(e) => tracing::info!("replica read failed, reading from the writer: {e}"),
        }
    }
    match state
        .wallet
        .balance(user_id, traffic == Traffic::Shadow)
        .await
    {
        Ok(balance) => json(
            StatusCode::OK,
            serde_json::json!({
                "user_id": user_id,
                "exists": balance.is_some(),
                "balance": balance.unwrap_or(0),
                "source": "primary",
                "staleness_ms": 0,
            }),
        ),
        Err(call) => wallet_failure(call),
    }
}

fn wallet_failure(call: WalletCall) -> Response {
    match call {
        WalletCall::Invalid(m) => error(StatusCode::BAD_REQUEST, "invalid_request", m),
        WalletCall::Unknown(m) => error(
            StatusCode::GATEWAY_TIMEOUT,
            "outcome_unknown",
            format!("wallet outcome unknown ({m}); retry with the same idempotency key"),
        ),
        WalletCall::Rejected { code, reason } => {
            error(StatusCode::UNPROCESSABLE_ENTITY, &code, reason)
        }
        WalletCall::Unavailable(m) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "payments_unavailable",
            format!("the wallet is unavailable: {m}"),
        ),
        WalletCall::Committed { .. } => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "unexpected wallet answer",
        ),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopUpBody {
    amount: i64,
    #[serde(default)]
    idempotency_key: Option<String>,
}

async fn top_up(
    State(state): State<Shared>,
    headers: HeaderMap,
    UrlPath(user): UrlPath<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let traffic = match traffic(&headers) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    let user_id = match parse_user(&user) {
        Ok(u) => u,
        Err(r) => return r.into_response(),
    };
    let body: TopUpBody = match parse_body(&headers, body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let key = match idempotency_key(&headers, body.idempotency_key) {
        Ok(k) => k,
        Err(r) => return r.into_response(),
    };
    if body.amount <= 0 || body.amount > MAX_AMOUNT {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "amount must be 1..={MAX_AMOUNT} minor units, got {}",
                body.amount
            ),
        );
    }
    if let Some(refused) = state.refuse_if_pending() {
        return refused;
    }
    match state
        .wallet
        .credit(user_id, body.amount, &key, traffic == Traffic::Shadow)
        .await
    {
        WalletCall::Committed {
            seq,
            balance,
            duplicate,
        } => json(
            StatusCode::OK,
            serde_json::json!({"user_id": user_id, "balance": balance, "seq": seq, "duplicate": duplicate}),
        ),
        WalletCall::Rejected { code, reason } if code == "conflict" => {
            error(StatusCode::CONFLICT, "idempotency_key_reused", reason)
        }
        other => wallet_failure(other),
    }
}

async fn catalog(State(state): State<Shared>, headers: HeaderMap) -> Response {
    let traffic = match traffic(&headers) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    // The catalog tolerates staleness: the replica first, the primary if it fails.
    if let Some(replica) = &state.replica {
        match OrderStore::catalog(replica, traffic).await {
            Ok(gifts) => return json(StatusCode::OK, serde_json::json!({"gifts": gifts})),
            Err(e) => tracing::info!("catalog from the replica failed, using the primary: {e}"),
        }
    }
    let Some(primary) = state.primary.get() else {
        return state.no_primary();
    };
    match OrderStore::catalog(&primary.pool, traffic).await {
        Ok(gifts) => json(StatusCode::OK, serde_json::json!({"gifts": gifts})),
        Err(e) => database_error(&e),
    }
}

async fn healthz() -> Response {
    json(StatusCode::OK, serde_json::json!({"status": "alive"}))
}

/// Ready when this instance's own database answers: the site's replica where it has one,
/// else the primary. The primary in another site being down is a dependency failure (sends
/// answer 503 payments_unavailable), not this instance's: it still serves reads and the
/// catalog, and the failover policy must not count it as failed with the site that is.
///
/// A pending wallet failover does not make it unready: it is about payments, not this instance.
async fn readyz(State(state): State<Shared>) -> Response {
    let primary = state.primary.get();
    let Some(local) = state.replica.as_ref().or(primary.as_ref().map(|p| &p.pool)) else {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"ready": false, "database": "no database known yet (waiting for the writer document)"}),
        );
    };
    let check = tokio::time::timeout(
        Duration::from_millis(500),
        sqlx::query("SELECT 1").execute(local),
    )
    .await;
    match check {
        Ok(Ok(_)) => json(StatusCode::OK, serde_json::json!({"ready": true})),
        Ok(Err(e)) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"ready": false, "database": e.to_string()}),
        ),
        Err(_) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"ready": false, "database": "no answer within 500 ms"}),
        ),
    }
}

async fn metrics(State(state): State<Shared>) -> Response {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &state.metrics.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        )
            .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "metrics", e.to_string()),
    }
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn observe(
    State(state): State<Shared>,
    path: Option<MatchedPath>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = Instant::now();
    let response = next.run(request).await;
    let labels = RouteLabels {
        route: path.map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string()),
        code: response.status().as_u16(),
    };
    state.metrics.requests.get_or_create(&labels).inc();
    state
        .metrics
        .seconds
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}

/// Builds what a primary serves (lazy pool: nothing waits on the database).
fn primary(
    config: &ApiConfig,
    url: &str,
    wallet: &WalletClient,
    effects: &EffectSink,
) -> Result<Primary, GiftError> {
    let pool = crate::pool(
        url,
        config.pool_size,
        config.statement_timeout_ms,
        config.acquire_timeout_ms,
    )?;
    let saga = |traffic| Saga {
        orders: OrderStore::new(pool.clone(), traffic),
        settlement: Settlement::new(pool.clone(), traffic),
        wallet: wallet.clone(),
        effects: effects.clone(),
    };
    Ok(Primary {
        real: saga(Traffic::Real),
        shadow: saga(Traffic::Shadow),
        pool,
    })
}

/// Everything that moves with the writer: follows the document (if any), swaps the primary,
/// and runs the outbox workers on the current one (a switch stops the old generation after
/// its batch and starts a new one). Returns at shutdown, after the workers stopped.
async fn run_primary(
    state: Shared,
    config: ApiConfig,
    effects: EffectSink,
    worker_metrics: WorkerMetrics,
    mut stop: watch::Receiver<bool>,
) {
    let worker_config = WorkerConfig {
        max_attempts: config.effect_max_attempts,
        abandon_after_secs: config.abandon_after_secs,
        ..WorkerConfig::default()
    };
    let start_workers = |primary: &Primary| {
        let (gen_tx, gen_rx) = watch::channel(false);
        let mut handles = Vec::new();
        if config.outbox_worker {
            for traffic in [Traffic::Real, Traffic::Shadow] {
                let worker = Arc::new(Worker::new(
                    primary.saga(traffic).clone(),
                    worker_config.clone(),
                    worker_metrics.clone(),
                ));
                handles.push(tokio::spawn(worker.run(gen_rx.clone())));
            }
        }
        (gen_tx, handles)
    };
    let mut generation = state.primary.get().map(|p| start_workers(&p));
    let mut current = config.database_url.clone().map(|url| (url, 1));
    let mut docs = state.docs.clone();
    loop {
        let next = async {
            match docs.as_mut() {
                Some(docs) => writer::next_writer(docs, &mut current).await,
                None => std::future::pending().await,
            }
        };
        let doc = tokio::select! {
            doc = next => doc,
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some(doc) = doc else { break };
        let wallet = state.wallet.clone();
        match primary(&config, &doc.dsn, &wallet, &effects) {
            Ok(next) => {
                if config.migrate {
                    let pool = next.pool.clone();
                    tokio::spawn(async move {
                        if let Err(e) = crate::migrate(&pool).await {
                            tracing::warn!("migrating the new primary: {e}");
                        }
                    });
                }
                let workers = start_workers(&next);
                let old = state.primary.set(next);
                state.metrics.writer.switches.inc();
                state.metrics.writer.set_epoch(doc.epoch);
                tracing::info!(site = %doc.site, epoch = doc.epoch, revision = doc.revision, "gift-api uses a new primary");
                if let Some((old_stop, handles)) = generation.replace(workers) {
                    let _ = old_stop.send(true);
                    let retire = Duration::from_millis(
                        config.statement_timeout_ms + config.acquire_timeout_ms + 1_000,
                    );
                    tokio::spawn(async move {
                        let _ = futures::future::join_all(handles).await;
                        tokio::time::sleep(retire).await;
                        if let Some(old) = old {
                            old.pool.close().await;
                        }
                    });
                }
            }
            Err(e) => {
                tracing::error!(
                    epoch = doc.epoch,
                    "cannot use the published writer's dsn: {e}; keeping the previous primary"
                );
            }
        }
    }
    if let Some((gen_stop, handles)) = generation {
        let _ = gen_stop.send(true);
        let _ = futures::future::join_all(handles).await;
    }
}

/// Connects, optionally migrates, starts the outbox worker, and serves until `shutdown`.
pub async fn serve(
    config: ApiConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GiftError> {
    let replica = config
        .replica_url
        .as_deref()
        .map(|url| {
            crate::pool(
                url,
                config.pool_size.min(16),
                config.statement_timeout_ms,
                config.acquire_timeout_ms,
            )
        })
        .transpose()?;
    let wallet = WalletClient::new(
        &config.wallet_endpoints,
        Duration::from_millis(config.wallet_connect_timeout_ms),
        Duration::from_millis(config.wallet_timeout_ms),
    )?;
    let effects = EffectSink::new(
        config.effect_url.clone(),
        Duration::from_millis(config.effect_timeout_ms),
    )?;
    let initial = config
        .database_url
        .as_deref()
        .map(|url| primary(&config, url, &wallet, &effects))
        .transpose()?;
    if let (true, Some(initial)) = (config.migrate, &initial) {
        crate::migrate(&initial.pool).await?;
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let docs = config
        .writer_key
        .as_ref()
        .map(|key| writer::follow(config.etcd_endpoints.clone(), key.clone(), stop_rx.clone()));

    let worker_metrics = WorkerMetrics::default();
    let api_metrics = Metrics::new(&worker_metrics);
    if initial.is_some() {
        api_metrics.writer.set_epoch(1);
    }
    let state = Arc::new(AppState {
        primary: Current::new(initial),
        docs,
        wallet,
        replica,
        metrics: api_metrics,
    });

    let mut background = vec![tokio::spawn(run_primary(
        state.clone(),
        config.clone(),
        effects,
        worker_metrics,
        stop_rx.clone(),
    ))];

    let app = Router::new()
        .route("/v1/gifts", post(send_gift))
        .route("/v1/orders/{order_id}", get(get_order))
        .route("/v1/wallet/{user_id}", get(get_balance))
        .route("/v1/wallet/{user_id}/topup", post(top_up))
        .route("/v1/catalog", get(catalog))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .with_state(state);

    let listener = tokio::net::TcpListener::bind(config.listen_addr)
        .await
        .map_err(|e| GiftError::Serve(format!("cannot listen on {}: {e}", config.listen_addr)))?;
    match crate::registry::Registration::from_config(
        "gift-api",
        &config.site,
        &config.etcd_endpoints,
        config.instance.as_deref(),
        config.listen_addr.port(),
        config
            .advertise_addr
            .clone()
            .unwrap_or_else(|| format!("http://{}", config.listen_addr)),
        config.registration_ttl_secs,
    ) {
        Some(registration) => background.push(tokio::spawn(registration.run(stop_rx.clone()))),
        None => tracing::info!("no etcd_endpoints: not registering"),
    }
    tracing::info!(site = %config.site, http = %config.listen_addr, "gift-api listening");
    let mut stop = stop_rx;
    // Without TCP_NODELAY small responses wait for the client's delayed ACK (~40 ms).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY: {e}");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
        .map_err(|e| GiftError::Serve(e.to_string()))?;
    // Deregister and let the worker finish its batch; bounded so a dead etcd or database
    // cannot hold the shutdown.
    let _ = tokio::time::timeout(
        Duration::from_secs(3),
        futures::future::join_all(background),
    )
    .await;
    tracing::info!("gift-api stopped cleanly");
    Ok(())
}
