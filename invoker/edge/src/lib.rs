//! The edge router: the stand-in for the CDN / load balancer in front of both sites.
//!
//! Every request is proxied to a `gift-api` instance of the site that serves its uid's bucket
//! (`uid % 1024`) in the invoker's routing table. The uid comes from the `x-uid` header, the
//! path (`/v1/wallet/{uid}...`) or the JSON body's `user_id`; requests without one (catalog,
//! order lookups) go by a hash of their path, so the table's split still holds.
//!
//! - [`routing`]: the table in use, swapped atomically (a request keeps the table it started
//!   with), never replaced by an older version, persisted to a state file so that a restarted
//!   edge serves while the control plane is unreachable (static stability).
//! - [`watch`]: the invoker's `RoutingWatch`, from any node, with capped jittered backoff.
//! - [`upstreams`]: each site's instances from its etcd registry (last known list kept when
//!   etcd is unreachable), round-robin, an instance whose connection just failed skipped.
//! - [`pick`]: uid, bucket and whether a request may be re-sent.
//! - [`throttle`]: per-site token buckets from the table's `throttle_max_rps`.
//! - [`proxy`]: the request path: buffer the body, pick, throttle, forward, retry once on the
//!   other site after a connection failure when that is safe.
//! - [`report`]: request and error rates per site, reported to the invoker leader over the
//!   agent session (role edge), as one more observer for the failover policy.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`, `/routing` on their own port, since the
//!   proxy port forwards every path.

pub mod admin;
pub mod config;
pub mod metrics;
pub mod pick;
pub mod proxy;
pub mod report;
pub mod routing;
pub mod server;
pub mod throttle;
pub mod upstreams;
pub mod watch;

use std::path::PathBuf;

pub use config::EdgeConfig;

/// Every failure of the edge router's library.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// Binaries exit with code 64 on this one.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A routing table that cannot be used (wrong service, buckets not covered).
    #[error("invalid routing table: {0}")]
    InvalidTable(String),
    #[error("state file {}: {message}", path.display())]
    StateFile { path: PathBuf, message: String },
    #[error("cannot listen on {addr}: {message}")]
    Listen { addr: String, message: String },
    #[error("serving: {0}")]
    Serve(String),
}
