use std::fmt;

use serde::{Deserialize, Serialize};

/// What a site is for: a `site` runs services; a `witness` only breaks ties (raft votes and
/// probes) and never receives traffic or a writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteRole {
    Site,
    Witness,
}

impl fmt::Display for SiteRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SiteRole::Site => "site",
            SiteRole::Witness => "witness",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Site {
    pub id: String,
    pub role: SiteRole,
}

/// `stateless` services are shifted automatically; `strong` ones (the wallet) have one writer
/// site and move only by an approved failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceClass {
    Stateless,
    Strong,
}

impl fmt::Display for ServiceClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServiceClass::Stateless => "stateless",
            ServiceClass::Strong => "strong",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    pub class: ServiceClass,
}

/// The one site allowed to write for a strong service. `epoch` grows by one at every change of
/// writer; every database write checks it (fencing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Writer {
    pub site: String,
    pub epoch: u64,
    pub dsn: String,
}

/// One observation that supports a decision: who saw what, when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    pub observer: String,
    pub probe: String,
    pub detail: String,
    pub observed_at_ms: i64,
}

/// How much a failover could lose, as far as the observers know.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataLossEstimate {
    pub primary_last_lsn: u64,
    pub replica_receive_lsn: u64,
    pub replica_replay_lsn: u64,
    pub gap_bytes: u64,
    pub primary_last_seen_ms: i64,
    pub ledger_sequence_gap: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProposalStatus {
    Pending,
    Approved,
    Rejected,
    Expired,
    Executing,
    Executed,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub approver: String,
    pub at_ms: i64,
    pub term: u64,
}

/// A change the controller will not make on its own (a strong-service failover or a planned
/// switchover): it waits for human approval, then the leader executes its plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub id: u64,
    pub kind: String,
    pub service: String,
    pub status: ProposalStatus,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub evidence: Vec<Evidence>,
    pub data_loss: Option<DataLossEstimate>,
    pub approvals: Vec<Approval>,
    pub digest: String,
    pub term: u64,
    pub actor: String,
    pub reason: String,
    /// What approval will execute (failover proposals).
    #[serde(default)]
    pub plan: Option<crate::FailoverPlan>,
    /// Where the execution stands, once begun.
    #[serde(default)]
    pub execution: Option<crate::Execution>,
}

/// One line of the audit log: who changed what, why, when, and the value before and after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub log_index: u64,
    pub at_ms: i64,
    pub actor: String,
    pub reason: String,
    pub action: String,
    pub before: String,
    pub after: String,
}
