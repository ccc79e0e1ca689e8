//! The invoker: one node of the control plane's raft cluster.
//!
//! - [`store`]: the raft log (redb, fsync'd before acknowledging) and the state machine that
//!   applies domain requests, with snapshots persisted in the same redb file.
//! - [`network`]: openraft's transport over gRPC.
//! - [`grpc`]: the gRPC services (raft transport, admin, routing watch, agent sessions).
//! - [`policy_loop`]: the leader's failover loop (agent reports → policy → committed decisions).
//! - [`publisher`]: the leader's publication of routing and writers to each site's etcd.
//! - [`node`]: assembles a node from its [`config::Config`], bootstraps, serves, shuts down.

pub mod auth;
pub mod config;
pub mod executor;
pub mod grpc;
pub mod metrics;
pub mod network;
pub mod node;
pub mod policy_loop;
pub mod publisher;
pub mod replication;
pub mod store;
pub mod types;

pub use node::Node;

/// Every failure the invoker library reports. Binaries map [`InvokerError::Config`] to exit
/// code 64 (EX_USAGE).
#[derive(Debug, thiserror::Error)]
pub enum InvokerError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("raft: {0}")]
    Raft(String),
    #[error("serving gRPC: {0}")]
    Serve(String),
}

impl InvokerError {
    /// A label per variant, for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            InvokerError::Config(_) => "config",
            InvokerError::Storage(_) => "storage",
            InvokerError::Listen { .. } => "listen",
            InvokerError::Raft(_) => "raft",
            InvokerError::Serve(_) => "serve",
        }
    }
}

/// Milliseconds since the Unix epoch, for stamping requests. Only the node accepting a request
/// reads the clock; the state machine never does.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
