use std::fmt;

use serde::{Deserialize, Serialize};

/// Who reports: the agent running in a site (serving site or witness), or the edge router.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Observer {
    Agent(String),
    Edge,
}

impl Observer {
    /// The site an agent runs in; empty for the edge.
    pub fn site(&self) -> &str {
        match self {
            Observer::Agent(site) => site,
            Observer::Edge => "",
        }
    }
}

impl fmt::Display for Observer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Observer::Agent(site) => write!(f, "agent-{site}"),
            Observer::Edge => f.write_str("edge"),
        }
    }
}

/// One report, as the invoker leader received it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Observation {
    Agent(AgentReport),
    Edge(EdgeReport),
}

impl Observation {
    pub fn observer(&self) -> Observer {
        match self {
            Observation::Agent(r) => Observer::Agent(r.agent_site.clone()),
            Observation::Edge(_) => Observer::Edge,
        }
    }

    pub fn seq(&self) -> u64 {
        match self {
            Observation::Agent(r) => r.seq,
            Observation::Edge(r) => r.seq,
        }
    }

    pub fn received_at_ms(&self) -> u64 {
        match self {
            Observation::Agent(r) => r.received_at_ms,
            Observation::Edge(r) => r.received_at_ms,
        }
    }
}

/// An agent's probes of each site it watches: its own site (the "local" view), and the other
/// serving site or sites (the peer's or witness's cross-site view).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReport {
    /// The site the agent runs in.
    pub agent_site: String,
    /// Strictly increasing per agent.
    pub seq: u64,
    /// On the leader's clock, so that silence is judged by one clock only; probe times are
    /// the agent's and serve only as evidence and to recognise a probe reported twice.
    pub received_at_ms: u64,
    pub targets: Vec<SiteProbes>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteProbes {
    pub site: String,
    /// The latest probe of each service instance in `site`.
    pub instances: Vec<InstanceProbe>,
    /// The latest probe of each strong service's database in `site`.
    pub databases: Vec<DatabaseProbe>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceProbe {
    pub service: String,
    pub instance: String,
    pub ok: bool,
    pub probed_at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatabaseRole {
    Primary,
    Replica,
    Unreachable,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseProbe {
    /// The strong service the database backs.
    pub service: String,
    pub role: DatabaseRole,
    /// Primary: `pg_current_wal_lsn()`.
    pub current_wal_lsn: u64,
    /// Replica: `pg_last_wal_receive_lsn()` and `pg_last_wal_replay_lsn()`.
    pub receive_lsn: u64,
    pub replay_lsn: u64,
    /// The wallet ledger's latest sequence number.
    pub ledger_sequence: u64,
    pub probed_at_ms: u64,
}

/// The edge router's request and error rates per site and service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeReport {
    pub seq: u64,
    /// On the leader's clock (see [`AgentReport::received_at_ms`]).
    pub received_at_ms: u64,
    pub samples: Vec<EdgeSample>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeSample {
    pub site: String,
    pub service: String,
    pub request_rps: u64,
    /// Of `request_rps`, how many failed (5xx, timeouts, resets).
    pub error_rps: u64,
}
