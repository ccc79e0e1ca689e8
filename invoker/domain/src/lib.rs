//! The invoker's replicated domain state and the commands that change it.
//!
//! Everything here is pure: no I/O, no clock reads, no randomness. The raft state machine
//! applies [`Request`]s in log order on every node, so [`State::apply`] must give the same
//! result on every node for the same sequence of requests. Time enters only as
//! [`Request::at_ms`], stamped by the node that accepted the request.
//!
//! Architecture invariant: domain types never derive protobuf traits; the conversions live in
//! `invoker-api`'s `convert` module.

mod error;
mod model;
mod routing;
mod state;
mod topology;

pub use error::DomainError;
pub use model::{
    Approval, AuditEntry, DataLossEstimate, Evidence, Proposal, ProposalStatus, Service,
    ServiceClass, Site, SiteRole, Writer,
};
pub use routing::{normalize_runs, runs_from_buckets, runs_len, BucketRun, RoutingTable, BUCKETS};
pub use state::{Change, Command, Outcome, Request, Response, State, AUDIT_RETAINED};
pub use topology::{ServiceSpec, SiteSpec, Topology, WriterSpec};

/// Longest accepted identifier (site id, service name, actor).
pub const MAX_ID_LEN: usize = 64;
/// Longest accepted free text (reason, DSN).
pub const MAX_TEXT_LEN: usize = 1024;

/// Checks an identifier: 1..=64 characters of `[a-z0-9_-]`, starting with a letter or digit.
pub fn validate_id(kind: &'static str, id: &str) -> Result<(), DomainError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && id.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(DomainError::InvalidId {
            kind: kind.to_string(),
            id: id.chars().take(MAX_ID_LEN + 8).collect(),
        })
    }
}

/// Checks free text (a reason, an actor, a DSN): bounded length, no control characters.
pub fn validate_text(field: &'static str, text: &str, required: bool) -> Result<(), DomainError> {
    if required && text.trim().is_empty() {
        return Err(DomainError::Missing {
            field: field.to_string(),
        });
    }
    if text.len() > MAX_TEXT_LEN || text.chars().any(|c| c.is_control()) {
        return Err(DomainError::InvalidText {
            field: field.to_string(),
        });
    }
    Ok(())
}
