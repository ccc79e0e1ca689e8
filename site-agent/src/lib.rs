//! The per-site agent's eyes: it discovers the service instances registered in etcd
//! (`/services/<service>/<site>/<instance>` → address), probes those of its own site (HTTP
//! `/readyz`, or grpc.health.v1 for gRPC services), probes the site's PostgreSQL (role, WAL
//! positions, replay lag, the wallet ledger's latest sequence, the fencing epoch, read-only),
//! and probes the peer site's instances (can this site reach the other one?). The witness
//! agent probes both sites the peer way.
//!
//! Each round gives a [`probe::Round`]: plain data, serialisable, with a strictly increasing
//! sequence number. [`session`] streams the latest round to the invoker leader over the agent
//! session, following the leader and reconnecting with capped, jittered backoff; probing
//! never waits for it.
//!
//! A site agent whose own site's database backs the strong service (`wallet`) also runs the
//! [`lease`] loop (it keeps the writer lease while its database is the primary, and fences
//! the database before the lease can run out) and answers the leader's [`commands`] (fence,
//! promote), through [`db`], its only SQL beside the probe.
//!
//! Probes never block each other: every probe has its own timeout and all of a round's
//! probes run concurrently, so one hung instance cannot delay the report.

pub mod commands;
pub mod config;
pub mod db;
pub mod discovery;
pub mod lease;
pub mod peer_lease;
pub mod probe;
pub mod session;

pub use config::AgentConfig;

/// Every failure of the agent's library.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Binaries exit with code 64 on this one.
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("etcd {endpoints}: {message}")]
    Etcd { endpoints: String, message: String },
    /// The database answered with an error (or the connection failed).
    #[error("database, {op}: {message}")]
    Database { op: &'static str, message: String },
    /// The database did not answer in time (frozen, cut off): the connection is dropped.
    #[error("database, {op}: no answer within {ms} ms")]
    DatabaseTimeout { op: &'static str, ms: u64 },
    /// The fencing row does not hold the epoch the agent acted for.
    #[error("the fencing row holds epoch {database}, not {expected}")]
    EpochMismatch { expected: u64, database: u64 },
    /// A promotion to an epoch below the one the database already holds as a primary.
    #[error(
        "the database is already the primary of epoch {database}, above {requested}: not promoted"
    )]
    HigherEpoch { requested: u64, database: u64 },
    /// The replica did not replay far enough in time; it was left a replica.
    #[error("replay reached {replayed} of {wanted} within {waited_ms} ms: not promoted")]
    CatchUpTimeout {
        wanted: u64,
        replayed: u64,
        waited_ms: u64,
    },
    /// `pg_promote` was called but recovery did not end in time.
    #[error("still in recovery {waited_ms} ms after pg_promote")]
    PromoteTimeout { waited_ms: u64 },
    /// A command this agent does not run.
    #[error("unsupported command: {0}")]
    Unsupported(String),
}

impl AgentError {
    /// The database did not answer or failed along the way: trying again may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            AgentError::Database { .. }
                | AgentError::DatabaseTimeout { .. }
                | AgentError::PromoteTimeout { .. }
        )
    }

    /// A short label per variant (logs, metrics).
    pub fn label(&self) -> &'static str {
        match self {
            AgentError::Config(_) => "config",
            AgentError::Etcd { .. } => "etcd",
            AgentError::Database { .. } => "database",
            AgentError::DatabaseTimeout { .. } => "database_timeout",
            AgentError::EpochMismatch { .. } => "epoch_mismatch",
            AgentError::HigherEpoch { .. } => "higher_epoch",
            AgentError::CatchUpTimeout { .. } => "catch_up_timeout",
            AgentError::PromoteTimeout { .. } => "promote_timeout",
            AgentError::Unsupported(_) => "unsupported",
        }
    }
}
