//! The invoker's configuration: a TOML file plus `INVOKER_*` environment overrides
//! (`INVOKER_NODE_ID=2`, nested keys with a double underscore: `INVOKER_RAFT__HEARTBEAT_INTERVAL_MS=50`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::InvokerError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's raft id: unique in the cluster, never reused for a wiped node.
    pub node_id: u64,
    /// The site this node runs in (`a`, `b`, `witness`).
    pub site: String,
    /// Address of the one gRPC server: raft transport, admin, routing watch, agent sessions,
    /// grpc.health.v1 and reflection.
    pub listen_addr: SocketAddr,
    /// Address other nodes and clients use to reach this node; defaults to `listen_addr`.
    #[serde(default)]
    pub advertise_addr: Option<String>,
    /// Prometheus `/metrics` over HTTP; absent disables it.
    #[serde(default)]
    pub metrics_addr: Option<SocketAddr>,
    /// Where the raft log, vote and snapshots live (created if missing).
    pub data_dir: PathBuf,
    #[serde(default)]
    pub raft: RaftConfig,
    /// The members a brand-new cluster starts with. Used only when this node's log is empty.
    #[serde(default)]
    pub initial_members: Vec<MemberConfig>,
    /// Where the leader publishes routing tables and writer records: each site's etcd.
    #[serde(default)]
    pub publication: PublicationConfig,
    /// Failover policy settings over the topology-derived defaults: the keys of
    /// failover-policy's `PolicyConfig` (`observer_silence_ms`, `edge_error_rate_threshold`,
    /// ...) and `[policy.services.<name>]` tables (`probe_interval_ms`, `failures_to_trip`,
    /// `successes_to_clear`, `hold_down_ms`, `failback`, `capacity_rps`). Sites, witness and
    /// each service's class come from the replicated topology and cannot be set here.
    #[serde(default)]
    pub policy: toml::Table,
    /// Who may approve strong-service failovers, and how many must.
    #[serde(default)]
    pub approvals: ApprovalsConfig,
    /// The strong services' writer lease and the execution of approved failovers.
    #[serde(default)]
    pub writer_lease: crate::executor::LeaseConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApprovalsConfig {
    /// Distinct approvers a failover needs (1 in the lab; 2 recommended in production).
    pub required: u32,
    pub operators: Vec<OperatorConfig>,
    /// How long a proposal waits for its approvals before it expires (payments stay paused
    /// meanwhile; an expired proposal lifts the pause and a new one may be opened).
    pub proposal_ttl_ms: u64,
}

impl Default for ApprovalsConfig {
    fn default() -> Self {
        ApprovalsConfig {
            required: 1,
            operators: Vec::new(),
            proposal_ttl_ms: 10 * 60 * 1000,
        }
    }
}

/// An operator who may approve: a name and the SHA-256 (hex) of their token. The token itself
/// never sits in a config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    pub name: String,
    pub token_sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublicationConfig {
    /// Pause between attempts at a site whose etcd failed or fell behind.
    pub retry_interval_ms: u64,
    /// Per etcd request.
    pub timeout_ms: u64,
    pub sites: Vec<PublishSite>,
}

impl Default for PublicationConfig {
    fn default() -> Self {
        PublicationConfig {
            retry_interval_ms: 200,
            timeout_ms: 1_000,
            sites: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishSite {
    pub site: String,
    pub etcd_endpoints: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many log entries since the last one.
    pub snapshot_logs_since_last: u64,
    /// Entries kept in the log behind the snapshot, so that a briefly lagging follower catches
    /// up from the log rather than by a snapshot.
    pub logs_kept_after_snapshot: u64,
    /// Deadline of one raft RPC to a peer.
    pub rpc_timeout_ms: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1_000,
            snapshot_logs_since_last: 5_000,
            logs_kept_after_snapshot: 1_000,
            rpc_timeout_ms: 1_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    pub id: u64,
    pub addr: String,
    pub site: String,
}

impl Config {
    /// Loads the file (if given) and the environment, then validates the result.
    pub fn load(path: Option<&Path>) -> Result<Config, InvokerError> {
        let config: Config =
            telemetry::service::load_config(path, "INVOKER_").map_err(InvokerError::Config)?;
        config.validate()?;
        Ok(config)
    }

    pub fn advertise_addr(&self) -> String {
        self.advertise_addr
            .clone()
            .unwrap_or_else(|| self.listen_addr.to_string())
    }

    pub fn validate(&self) -> Result<(), InvokerError> {
        let bad = |msg: String| Err(InvokerError::Config(msg));
        if self.node_id == 0 {
            return bad("node_id must be at least 1 (0 means \"no node\" in status)".into());
        }
        invoker_domain::validate_id("site", &self.site)
            .map_err(|e| InvokerError::Config(e.to_string()))?;
        let r = &self.raft;
        if r.heartbeat_interval_ms == 0 {
            return bad("raft.heartbeat_interval_ms must be above 0".into());
        }
        if r.election_timeout_min_ms < 3 * r.heartbeat_interval_ms {
            return bad(format!(
                "raft.election_timeout_min_ms ({}) must be at least 3 x raft.heartbeat_interval_ms ({})",
                r.election_timeout_min_ms, r.heartbeat_interval_ms
            ));
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return bad(format!(
                "raft.election_timeout_max_ms ({}) must be above raft.election_timeout_min_ms ({})",
                r.election_timeout_max_ms, r.election_timeout_min_ms
            ));
        }
        if r.snapshot_logs_since_last == 0 {
            return bad("raft.snapshot_logs_since_last must be above 0".into());
        }
        if r.rpc_timeout_ms == 0 {
            return bad("raft.rpc_timeout_ms must be above 0".into());
        }
        let mut ids = BTreeSet::new();
        for m in &self.initial_members {
            if m.id == 0 {
                return bad("initial_members: id 0 is not allowed".into());
            }
            if !ids.insert(m.id) {
                return bad(format!("initial_members: id {} appears twice", m.id));
            }
            if m.addr.trim().is_empty() {
                return bad(format!("initial_members: member {} has no addr", m.id));
            }
            invoker_domain::validate_id("site", &m.site)
                .map_err(|e| InvokerError::Config(format!("initial_members: {e}")))?;
        }
        let p = &self.publication;
        if p.retry_interval_ms == 0 || p.timeout_ms == 0 {
            return bad(
                "publication.retry_interval_ms and publication.timeout_ms must be above 0".into(),
            );
        }
        let mut published = BTreeSet::new();
        for site in &p.sites {
            invoker_domain::validate_id("site", &site.site)
                .map_err(|e| InvokerError::Config(format!("publication.sites: {e}")))?;
            if !published.insert(&site.site) {
                return bad(format!(
                    "publication.sites: site {:?} appears twice",
                    site.site
                ));
            }
            if site.etcd_endpoints.is_empty()
                || site.etcd_endpoints.iter().any(|e| e.trim().is_empty())
            {
                return bad(format!(
                    "publication.sites: site {:?} needs etcd_endpoints (host:port, none empty)",
                    site.site
                ));
            }
        }
        let a = &self.approvals;
        if a.required == 0 {
            return bad("approvals.required must be at least 1".into());
        }
        let mut names = BTreeSet::new();
        for op in &a.operators {
            invoker_domain::validate_id("operator name", &op.name)
                .map_err(|e| InvokerError::Config(format!("approvals.operators: {e}")))?;
            if !names.insert(&op.name) {
                return bad(format!("approvals.operators: {:?} appears twice", op.name));
            }
            if op.token_sha256.len() != 64
                || !op.token_sha256.chars().all(|c| c.is_ascii_hexdigit())
            {
                return bad(format!(
                    "approvals.operators: token_sha256 of {:?} must be 64 hex digits (sha256sum of the token)",
                    op.name
                ));
            }
        }
        if !a.operators.is_empty() && (a.operators.len() as u64) < u64::from(a.required) {
            return bad(format!(
                "approvals.required is {} but only {} operators are configured",
                a.required,
                a.operators.len()
            ));
        }
        self.writer_lease.validate().map_err(InvokerError::Config)?;
        crate::policy_loop::check_overrides(&self.policy)
            .map_err(|e| InvokerError::Config(format!("policy: {e}")))?;
        if !self.initial_members.is_empty() && !ids.contains(&self.node_id) {
            return bad(format!(
                "initial_members does not include this node (node_id {})",
                self.node_id
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        node_id = 1
        site = "a"
        listen_addr = "127.0.1.1:7001"
        data_dir = "/tmp/x"
        [[initial_members]]
        id = 1
        addr = "127.0.1.1:7001"
        site = "a"
    "#;

    use figment::providers::{Format, Toml};
    use figment::Figment;

    fn parse(text: &str) -> Result<Config, InvokerError> {
        let config: Config = Figment::from(Toml::string(text))
            .extract()
            .map_err(|e| InvokerError::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.raft.heartbeat_interval_ms, 100);
        assert_eq!(c.advertise_addr(), "127.0.1.1:7001");
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let cases = [
            (GOOD.replace("node_id = 1", "node_id = 0"), "node_id"),
            (
                GOOD.replace(
                    "site = \"a\"\n        listen",
                    "site = \"A B\"\n        listen",
                ),
                "site",
            ),
            (
                GOOD.replace("127.0.1.1:7001\"\n        data", "nowhere\"\n        data"),
                "listen_addr",
            ),
            (format!("{GOOD}\ncolour = 1\n"), "colour"),
            (
                format!(
                    "{GOOD}\n[raft]\nheartbeat_interval_ms = 100\nelection_timeout_min_ms = 100\n"
                ),
                "election_timeout_min_ms",
            ),
            (
                GOOD.replace("id = 1\n        addr", "id = 2\n        addr"),
                "does not include",
            ),
        ];
        for (text, needle) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle:?} not in {err:?}");
        }
    }

    #[test]
    fn publication_and_policy_sections_parse_and_are_checked() {
        let good = format!(
            "{GOOD}\n[publication]\nretry_interval_ms = 100\n[[publication.sites]]\nsite = \"a\"\netcd_endpoints = [\"127.0.1.2:2379\"]\n\n[policy]\nobserver_silence_ms = 2000\n[policy.services.gift-api]\nhold_down_ms = 5000\nfailback = {{ automatic = {{ stable_period_ms = 60000 }} }}\ncapacity_rps = {{ a = 100, b = 100 }}\n"
        );
        let c = parse(&good).unwrap();
        assert_eq!(c.publication.sites[0].etcd_endpoints, ["127.0.1.2:2379"]);
        assert_eq!(c.publication.timeout_ms, 1_000);
        let cases = [
            (format!("{GOOD}\n[policy]\nsites = [\"a\", \"b\"]\n"), "comes from the topology"),
            (
                format!("{GOOD}\n[policy.services.gift-api]\nclass = \"strong\"\n"),
                "class comes from the topology",
            ),
            (
                format!("{GOOD}\n[policy.services.gift-api]\nhold_down_ms = 0\n"),
                "hold_down_ms",
            ),
            (
                format!("{GOOD}\n[policy.services.gift-api]\nfailures_to_trip = \"three\"\n"),
                "failures_to_trip",
            ),
            (format!("{GOOD}\n[policy]\nedge_error_rate_threshold = 2.0\n"), "edge_error_rate_threshold"),
            (
                format!("{GOOD}\n[[publication.sites]]\nsite = \"a\"\netcd_endpoints = []\n"),
                "needs etcd_endpoints",
            ),
            (
                format!("{GOOD}\n[[publication.sites]]\nsite = \"a\"\netcd_endpoints = [\"x:1\"]\n[[publication.sites]]\nsite = \"a\"\netcd_endpoints = [\"x:1\"]\n"),
                "appears twice",
            ),
        ];
        for (text, needle) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle:?} not in {err:?}");
        }
    }
}
