//! The invoker nodes: their config files and the topology the lab applies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use invoker_domain::{ServiceClass, ServiceSpec, SiteRole, SiteSpec, Topology, WriterSpec};
use serde::Serialize;

use super::{LabError, RaftOverrides};

/// One invoker node of the lab.
#[derive(Debug, Clone)]
pub(crate) struct InvokerPlan {
    pub id: u64,
    pub site: String,
    pub grpc: String,
    pub metrics: String,
}

impl InvokerPlan {
    pub fn name(&self) -> String {
        format!("invoker-{}", self.id)
    }
}

/// Mirrors the invoker's `Config` (invoker/server/src/config.rs), which denies unknown fields.
#[derive(Serialize)]
struct InvokerToml<'a> {
    node_id: u64,
    site: &'a str,
    listen_addr: &'a str,
    metrics_addr: &'a str,
    data_dir: &'a Path,
    raft: &'a RaftOverrides,
    initial_members: Vec<MemberToml<'a>>,
    publication: PublicationToml<'a>,
    policy: &'a toml::Table,
    approvals: ApprovalsToml<'a>,
}

#[derive(Serialize)]
struct ApprovalsToml<'a> {
    required: u32,
    operators: Vec<OperatorToml<'a>>,
}

#[derive(Serialize)]
struct OperatorToml<'a> {
    name: &'a str,
    token_sha256: &'a str,
}

#[derive(Serialize)]
struct PublicationToml<'a> {
    sites: Vec<PublishSiteToml<'a>>,
}

#[derive(Serialize)]
struct PublishSiteToml<'a> {
    site: &'a str,
    etcd_endpoints: Vec<&'a str>,
}

/// What every invoker node of a lab is configured with beyond its own identity.
pub(crate) struct InvokerShared<'a> {
    pub all: &'a [InvokerPlan],
    pub raft: &'a RaftOverrides,
    /// (site, etcd client endpoint) where the leader publishes routing and writers.
    pub publish_to: &'a [(String, String)],
    pub policy: &'a toml::Table,
    /// (operator name, SHA-256 hex of their token) allowed to approve failovers.
    pub oncall: Option<(&'a str, &'a str)>,
}

#[derive(Serialize)]
struct MemberToml<'a> {
    id: u64,
    addr: &'a str,
    site: &'a str,
}

/// Writes `DIR/invoker-<id>/invoker.toml` and returns its path and the node's data dir.
pub(crate) fn write_config(
    dir: &Path,
    node: &InvokerPlan,
    shared: &InvokerShared<'_>,
) -> Result<(PathBuf, PathBuf), LabError> {
    let home = dir.join(node.name());
    let data_dir = home.join("data");
    std::fs::create_dir_all(&data_dir)
        .map_err(|e| LabError::io(format!("creating {}", data_dir.display()), e))?;
    let config = InvokerToml {
        node_id: node.id,
        site: &node.site,
        listen_addr: &node.grpc,
        metrics_addr: &node.metrics,
        data_dir: &data_dir,
        raft: shared.raft,
        initial_members: shared
            .all
            .iter()
            .map(|m| MemberToml {
                id: m.id,
                addr: &m.grpc,
                site: &m.site,
            })
            .collect(),
        publication: PublicationToml {
            sites: shared
                .publish_to
                .iter()
                .map(|(site, endpoint)| PublishSiteToml {
                    site,
                    etcd_endpoints: vec![endpoint.as_str()],
                })
                .collect(),
        },
        policy: shared.policy,
        approvals: ApprovalsToml {
            required: 1,
            operators: shared
                .oncall
                .iter()
                .map(|(name, token_sha256)| OperatorToml { name, token_sha256 })
                .collect(),
        },
    };
    let path = home.join("invoker.toml");
    let text = toml::to_string(&config)?;
    std::fs::write(&path, text)
        .map_err(|e| LabError::io(format!("writing {}", path.display()), e))?;
    Ok((path, data_dir))
}

/// The lab's sites: `a` and `b` serving, `witness` voting and probing.
pub fn lab_sites() -> Vec<SiteSpec> {
    vec![
        SiteSpec {
            id: "a".into(),
            role: SiteRole::Site,
        },
        SiteSpec {
            id: "b".into(),
            role: SiteRole::Site,
        },
        SiteSpec {
            id: "witness".into(),
            role: SiteRole::Witness,
        },
    ]
}

/// The lab's topology: sites `a` and `b`, a witness, the stateless `gift-api` and the strong
/// `wallet` written in site a (`wallet_dsn` is site a's PostgreSQL; `replica_dsn` site b's
/// streaming replica, where a failover moves the writer).
pub fn lab_topology(wallet_dsn: &str, replica_dsn: &str) -> Topology {
    let even = BTreeMap::from([("a".to_string(), 50), ("b".to_string(), 50)]);
    Topology {
        sites: lab_sites(),
        services: vec![
            ServiceSpec {
                name: "gift-api".into(),
                class: ServiceClass::Stateless,
                routing: even.clone(),
                writer: None,
            },
            ServiceSpec {
                name: "wallet".into(),
                class: ServiceClass::Strong,
                routing: even,
                writer: Some(WriterSpec {
                    site: "a".into(),
                    dsn: wallet_dsn.to_string(),
                    replicas: BTreeMap::from([("b".to_string(), replica_dsn.to_string())]),
                }),
            },
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_is_valid_and_round_trips_through_toml() {
        let t = lab_topology(
            "postgres://postgres@127.0.1.3:5555/gift",
            "postgres://postgres@127.0.2.3:5556/gift",
        );
        t.validate().unwrap();
        let text = toml::to_string(&t).unwrap();
        assert_eq!(Topology::from_toml(&text).unwrap(), t);
    }

    #[test]
    fn config_lists_every_member_and_only_the_overridden_raft_keys() {
        let dir = tempfile::tempdir().unwrap();
        let nodes: Vec<InvokerPlan> = (1..=3)
            .map(|id| InvokerPlan {
                id,
                site: ["a", "b", "witness"][usize::try_from(id - 1).unwrap()].into(),
                grpc: format!("127.0.{id}.1:700{id}"),
                metrics: format!("127.0.{id}.1:800{id}"),
            })
            .collect();
        let raft = RaftOverrides {
            snapshot_logs_since_last: Some(10),
            ..RaftOverrides::default()
        };
        let publish_to = vec![("a".to_string(), "http://127.0.1.2:2379".to_string())];
        let policy: toml::Table =
            toml::from_str("[services.gift-api]\nhold_down_ms = 5000").unwrap();
        let shared = InvokerShared {
            all: &nodes,
            raft: &raft,
            publish_to: &publish_to,
            policy: &policy,
            oncall: Some(("oncall", "ab")),
        };
        let (path, data) = write_config(dir.path(), &nodes[1], &shared).unwrap();
        assert!(data.is_dir());
        let value: toml::Value = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(value["node_id"].as_integer(), Some(2));
        assert_eq!(value["site"].as_str(), Some("b"));
        assert_eq!(value["initial_members"].as_array().unwrap().len(), 3);
        let raft = value["raft"].as_table().unwrap();
        assert_eq!(raft.len(), 1);
        assert_eq!(raft["snapshot_logs_since_last"].as_integer(), Some(10));
        let sites = value["publication"]["sites"].as_array().unwrap();
        assert_eq!(sites[0]["site"].as_str(), Some("a"));
        assert_eq!(
            value["policy"]["services"]["gift-api"]["hold_down_ms"].as_integer(),
            Some(5000)
        );
        assert_eq!(
            value["approvals"]["operators"][0]["name"].as_str(),
            Some("oncall")
        );
    }
}
