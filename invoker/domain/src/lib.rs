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
mod failover;
mod model;
mod routing;
mod state;
mod topology;

pub use error::DomainError;
pub use failover::{Execution, FailoverPlan, FailoverStep, Lease, StepResult, SyncReplication};
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

/// Formats milliseconds since the Unix epoch as RFC 3339 UTC, to the second
/// (`2026-11-18T11:06:40Z`). Pure: the caller supplies the time.
pub fn format_utc_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_unix_ms_as_rfc3339_utc() {
        assert_eq!(format_utc_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc_ms(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc_ms(1_700_000_000_999), "2023-11-14T22:13:20Z");
        assert_eq!(format_utc_ms(1_795_000_000_000), "2026-11-18T11:06:40Z");
    }
}
