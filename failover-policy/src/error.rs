/// Why the policy refused an input. A refused input leaves the policy's state untouched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("invalid policy config: {0}")]
    ConfigParse(String),
    #[error("invalid policy config: `{key}` {reason}")]
    InvalidConfig { key: String, reason: String },
    #[error("unknown observer {0:?}: only the agents of the configured sites and witness, and the edge, report")]
    UnknownObserver(String),
    #[error("report from {observer} names unknown site {site:?}")]
    UnknownSite { observer: String, site: String },
    #[error("report from {observer} names unknown service {service:?}")]
    UnknownService { observer: String, service: String },
    #[error(
        "stale report from {observer}: seq {seq} is not above the last accepted seq {last_seq}"
    )]
    StaleSequence {
        observer: String,
        seq: u64,
        last_seq: u64,
    },
    #[error("out-of-order report from {observer}: received at {received_at_ms} ms, before the last accepted one at {last_ms} ms")]
    OutOfOrder {
        observer: String,
        received_at_ms: u64,
        last_ms: u64,
    },
    #[error("invalid report from {observer}: {reason}")]
    InvalidObservation { observer: String, reason: String },
    #[error("tick at {now_ms} ms is before the previous tick at {last_ms} ms")]
    TimeWentBackwards { now_ms: u64, last_ms: u64 },
    #[error("invalid current state: {0}")]
    InvalidCurrent(String),
    #[error("unknown service {0:?}")]
    NoSuchService(String),
    #[error("failback of {service} refused: {reason}")]
    FailbackRefused { service: String, reason: String },
    #[error("a dry-run decision cannot have been applied")]
    DryRunApplied,
}
