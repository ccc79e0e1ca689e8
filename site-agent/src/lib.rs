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
//! never waits for it. Commands from the leader (fence, promote) come with wallet failover.
//!
//! Probes never block each other: every probe has its own timeout and all of a round's
//! probes run concurrently, so one hung instance cannot delay the report.

pub mod config;
pub mod discovery;
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
}
