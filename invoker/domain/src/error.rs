use serde::{Deserialize, Serialize};

/// Why a command was refused. A refused command leaves the state untouched.
///
/// It is serialisable because refusals travel through the raft log's responses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum DomainError {
    #[error("invalid {kind} {id:?}: use 1-64 characters of a-z, 0-9, '-' or '_', starting with a letter or digit")]
    InvalidId { kind: String, id: String },
    #[error("{field} is required")]
    Missing { field: String },
    #[error("{field} is too long (max 1024 bytes) or contains control characters")]
    InvalidText { field: String },
    #[error("unknown site {0:?}")]
    UnknownSite(String),
    #[error("unknown service {0:?}")]
    UnknownService(String),
    #[error("site {0:?} is a witness: it runs no services and can receive no traffic or writer")]
    WitnessSite(String),
    #[error("routing table has {got} buckets; it must have exactly {expected}")]
    WrongBucketCount { got: u64, expected: usize },
    #[error("routing table of {service:?} is at version {actual}, not the expected {expected}")]
    VersionConflict {
        service: String,
        expected: u64,
        actual: u64,
    },
    #[error("routing weights for {0:?} must name at least one site with a weight above zero")]
    EmptyWeights(String),
    #[error("weight {weight} for site {site:?} is out of range (0..=1024)")]
    WeightOutOfRange { site: String, weight: u32 },
    #[error("{kind} {id:?} is declared twice")]
    Duplicate { kind: String, id: String },
    #[error("site {site:?} is already declared with role {existing}; a site's role cannot change")]
    SiteRoleChange { site: String, existing: String },
    #[error("service {service:?} is already of class {existing}; a service's class cannot change")]
    ServiceClassChange { service: String, existing: String },
    #[error("service {0:?} is strong and needs a writer (site and dsn)")]
    StrongWithoutWriter(String),
    #[error("service {0:?} is stateless and cannot have a writer")]
    StatelessWithWriter(String),
    #[error("a throttle of 0 requests per second would refuse every request of site {site:?}; lift it instead")]
    ZeroThrottle { site: String },
    #[error(
        "service {0:?} is not strong: only a strong service's writer is proposed for failover"
    )]
    NotStrong(String),
    #[error("no proposal #{0}")]
    UnknownProposal(u64),
    #[error("approval refused: {0}")]
    ApprovalRefused(String),
    #[error("stale or invalid failover proposal: {0}")]
    StaleProposal(String),
    #[error("writer lease refused: {0}")]
    LeaseRefused(String),
    #[error("failover execution refused: {0}")]
    ExecutionRefused(String),
    #[error("invalid topology file: {0}")]
    TopologyParse(String),
}
