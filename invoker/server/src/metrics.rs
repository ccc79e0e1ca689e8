//! Prometheus metrics of a node, served on `/metrics`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use openraft::ServerState;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::node::{Node, ProposeError};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub command: String,
    pub result: String,
}

pub struct Metrics {
    registry: Registry,
    pub writes: Family<WriteLabels, Counter>,
    pub write_seconds: Histogram,
    pub forwarded: Counter,
    pub term: Gauge,
    pub is_leader: Gauge,
    pub last_log_index: Gauge,
    pub last_applied: Gauge,
    pub snapshot_index: Gauge,
    /// Agent reports by site and result (accepted, or the reason for a rejection).
    pub agent_reports: Family<AgentLabels, Counter>,
    pub agent_sessions: Gauge,
    /// Per site: the domain revision its etcd acknowledged from this leader.
    pub publication_revision: Family<SiteLabels, Gauge>,
    pub publication_failures: Family<SiteLabels, Counter>,
    /// Policy decisions by kind and result (committed, failed, dry_run).
    pub policy_decisions: Family<DecisionLabels, Counter>,
    /// Writer lease renewals answered by this leader, by site and result.
    pub lease_renewals: Family<LeaseLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaseLabels {
    pub site: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteLabels {
    pub site: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub decision: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct AgentLabels {
    pub site: String,
    pub result: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("invoker");
        let writes = Family::<WriteLabels, Counter>::default();
        // 100 us .. ~3.3 s
        let write_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        let forwarded = Counter::default();
        let term = Gauge::default();
        let is_leader = Gauge::default();
        let last_log_index = Gauge::default();
        let last_applied = Gauge::default();
        let snapshot_index = Gauge::default();
        let agent_reports = Family::<AgentLabels, Counter>::default();
        let agent_sessions = Gauge::default();
        let publication_revision = Family::<SiteLabels, Gauge>::default();
        let publication_failures = Family::<SiteLabels, Counter>::default();
        let policy_decisions = Family::<DecisionLabels, Counter>::default();
        let lease_renewals = Family::<LeaseLabels, Counter>::default();
        registry.register(
            "lease_renewals",
            "Writer lease renewals answered by this leader, by site and result (granted, refused)",
            lease_renewals.clone(),
        );
        registry.register(
            "publication_revision",
            "Domain revision whose routing tables and writers the site's etcd acknowledged (leader only)",
            publication_revision.clone(),
        );
        registry.register(
            "publication_failures",
            "Failed publication passes to a site's etcd (each is retried)",
            publication_failures.clone(),
        );
        registry.register(
            "policy_decisions",
            "Failover policy decisions by kind and result (committed, failed, dry_run)",
            policy_decisions.clone(),
        );
        registry.register(
            "agent_reports",
            "Agent reports received by this node, by site and result (accepted: handed to the policy; dropped: valid but the policy loop was behind; stale_seq, invalid, not_leader)",
            agent_reports.clone(),
        );
        registry.register(
            "agent_sessions",
            "Agent sessions open on this node",
            agent_sessions.clone(),
        );
        registry.register(
            "writes",
            "Writes proposed on this node, by command and result",
            writes.clone(),
        );
        registry.register(
            "write_seconds",
            "Time from proposal to applied result on the leader",
            write_seconds.clone(),
        );
        registry.register(
            "forwarded_requests",
            "Requests forwarded to the leader",
            forwarded.clone(),
        );
        registry.register("raft_term", "Current raft term", term.clone());
        registry.register(
            "raft_is_leader",
            "1 when this node leads",
            is_leader.clone(),
        );
        registry.register(
            "raft_last_log_index",
            "Last log index on this node",
            last_log_index.clone(),
        );
        registry.register(
            "raft_last_applied_index",
            "Last applied log index",
            last_applied.clone(),
        );
        registry.register(
            "raft_snapshot_index",
            "Log index of the current snapshot",
            snapshot_index.clone(),
        );
        Metrics {
            registry,
            writes,
            write_seconds,
            forwarded,
            term,
            is_leader,
            last_log_index,
            last_applied,
            snapshot_index,
            agent_reports,
            agent_sessions,
            publication_revision,
            publication_failures,
            policy_decisions,
            lease_renewals,
        }
    }

    pub fn published_revision(&self, site: &str, revision: u64) {
        self.publication_revision
            .get_or_create(&SiteLabels { site: site.into() })
            .set(i64::try_from(revision).unwrap_or(i64::MAX));
    }

    pub fn lease_renewal(&self, site: &str, granted: bool) {
        self.lease_renewals
            .get_or_create(&LeaseLabels {
                site: site.into(),
                result: if granted { "granted" } else { "refused" },
            })
            .inc();
    }

    pub fn publication_failed(&self, site: &str) {
        self.publication_failures
            .get_or_create(&SiteLabels { site: site.into() })
            .inc();
    }

    pub fn policy_decision(&self, decision: &str, result: &'static str) {
        self.policy_decisions
            .get_or_create(&DecisionLabels {
                decision: decision.into(),
                result,
            })
            .inc();
    }

    pub fn record_write<T>(
        &self,
        command: &str,
        outcome: &Result<T, ProposeError>,
        elapsed: Duration,
    ) {
        let result = match outcome {
            Ok(_) => "committed",
            Err(ProposeError::Refused(_)) => "refused",
            Err(ProposeError::NotLeader(_)) => "not_leader",
            Err(ProposeError::Raft(_)) => "raft_error",
        };
        self.writes
            .get_or_create(&WriteLabels {
                command: command.to_string(),
                result: result.to_string(),
            })
            .inc();
        if outcome.is_ok() {
            self.write_seconds.observe(elapsed.as_secs_f64());
        }
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Keeps the raft gauges in step with openraft's metrics.
pub async fn follow_raft(node: Arc<Node>) {
    let mut rx = node.raft.metrics();
    loop {
        {
            let m = rx.borrow_and_update();
            let metrics = &node.metrics;
            metrics.term.set(m.current_term as i64);
            metrics
                .is_leader
                .set(i64::from(m.state == ServerState::Leader));
            metrics
                .last_log_index
                .set(m.last_log_index.unwrap_or(0) as i64);
            metrics
                .last_applied
                .set(m.last_applied.map(|l| l.index).unwrap_or(0) as i64);
            metrics
                .snapshot_index
                .set(m.snapshot.map(|l| l.index).unwrap_or(0) as i64);
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn metrics_handler(State(node): State<Arc<Node>>) -> impl IntoResponse {
    match node.metrics.encode() {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

pub async fn serve(
    listener: TcpListener,
    node: Arc<Node>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/metrics", get(metrics_handler))
        .with_state(node);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
