//! The workload the platform protects: gifts are payments.
//!
//! This version holds the database layer every service shares: the schema (sqlx migrations in
//! `migrations/`, applied with [`migrate`]) and the wallet's ledger operations
//! ([`wallet::Ledger`]): idempotent credit, debit and refund, each checking the fencing epoch
//! inside its transaction. The wallet gRPC service, the gift API, the outbox worker,
//! reconciliation and the load generator are built on it next (issue #3, in progress).
//! [`wallet_service`] serves the ledger over gRPC (binary `wallet`).
//!
//! Architecture invariants:
//! - money is `i64` minor units ([`Amount`]); no floats near money;
//! - every wallet write checks the fencing epoch against the database row, in the same
//!   transaction, before it changes anything;
//! - the database enforces the money rules (non-negative balances, unique idempotency keys,
//!   one debit and at most one refund per order); the code relies on it rather than on
//!   check-then-act.

pub mod api;
pub mod lost;
pub mod orders;
pub mod outbox;
pub mod reconcile;
pub mod registry;
pub mod saga;
pub mod settlement;
pub mod wallet;
pub mod wallet_client;
pub mod wallet_service;
pub mod writer;

pub use wallet::{Ledger, Outcome, Rejection};

/// Generated protobuf types and gRPC stubs (package `gift.v1`).
pub mod pb {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("gift.v1");

    /// Encoded descriptors of the gift protos, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("gift_descriptor");
}

/// Every failure the gift services' library reports.
#[derive(Debug, thiserror::Error)]
pub enum GiftError {
    /// The database could not be reached or failed mid-way: the outcome of a write is
    /// unknown (indeterminate) and the caller retries with the same idempotency key.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// Binaries exit with code 64 on this one.
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("serving: {0}")]
    Serve(String),
    /// An operator's request refused with a reason (nothing was changed): a compensation
    /// that conflicts with an earlier one, insufficient funds, a stale epoch, ...
    #[error("refused: {0}")]
    Refused(String),
}

impl GiftError {
    /// A label per variant, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            GiftError::Database(_) => "database",
            GiftError::Migrate(_) => "migrate",
            GiftError::InvalidInput(_) => "invalid_input",
            GiftError::Config(_) => "config",
            GiftError::Serve(_) => "serve",
            GiftError::Refused(_) => "refused",
        }
    }
}

/// Money in integer minor units (cents, coins). Always positive where it moves.
pub type Amount = i64;

/// Largest single amount accepted (a sanity bound far above any gift: 10^12 minor units).
pub const MAX_AMOUNT: Amount = 1_000_000_000_000;

/// Real money or load-test traffic. Shadow traffic touches only the `shadow_*` schemas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Traffic {
    Real,
    Shadow,
}

impl Traffic {
    pub fn wallet_schema(self) -> &'static str {
        match self {
            Traffic::Real => "wallet",
            Traffic::Shadow => "shadow_wallet",
        }
    }

    pub fn orders_schema(self) -> &'static str {
        match self {
            Traffic::Real => "orders",
            Traffic::Shadow => "shadow_orders",
        }
    }

    pub fn settlement_schema(self) -> &'static str {
        match self {
            Traffic::Real => "settlement",
            Traffic::Shadow => "shadow_settlement",
        }
    }
}

/// Default longest wait for a pooled connection. Far above a healthy acquire (microseconds
/// to a few milliseconds) and far below a statement timeout: with the database gone, sqlx
/// retries connecting until this passes, and callers should hear so quickly.
pub fn default_acquire_timeout_ms() -> u64 {
    500
}

/// A lazily connected pool whose sessions give up on a statement after
/// `statement_timeout_ms` (the server stops work the client has given up on), and whose
/// callers wait at most `acquire_timeout_ms` for a connection. Lazy: a service starts, not
/// ready, while the database is down, and recovers by itself when it returns.
pub fn pool(
    url: &str,
    size: u32,
    statement_timeout_ms: u64,
    acquire_timeout_ms: u64,
) -> Result<sqlx::PgPool, GiftError> {
    Ok(sqlx::postgres::PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(std::time::Duration::from_millis(acquire_timeout_ms))
        .after_connect(move |conn, _| {
            Box::pin(async move {
                sqlx::query(&format!("SET statement_timeout = {statement_timeout_ms}"))
                    .execute(conn)
                    .await
                    .map(|_| ())
            })
        })
        .connect_lazy(url)?)
}

/// Applies the schema migrations (idempotent; sqlx records what ran).
pub async fn migrate(pool: &sqlx::PgPool) -> Result<(), GiftError> {
    sqlx::migrate!("./migrations").run(pool).await?;
    Ok(())
}
