//! Failure scenarios under steady traffic, shared by the end-to-end tests and the failover
//! benchmark: kill a set of lab processes while the load generator sends through the edge,
//! then read the recovery time off the availability timeline and the shift off the invoker.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use invoker_api::{pb, InvokerClient};

use crate::lab::{Lab, LabError, ProcessKind};
use crate::loadgen::timeline::Recovery;
use crate::loadgen::{self, LoadReport, LoadgenConfig, LoadgenError};

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error(transparent)]
    Lab(#[from] LabError),
    #[error(transparent)]
    Loadgen(#[from] LoadgenError),
    #[error("invoker: {0}")]
    Invoker(String),
    #[error("{0}")]
    Failed(String),
}

impl From<tonic::Status> for ScenarioError {
    fn from(s: tonic::Status) -> Self {
        ScenarioError::Invoker(format!("{:?}: {}", s.code(), s.message()))
    }
}

impl From<invoker_api::ClientError> for ScenarioError {
    fn from(e: invoker_api::ClientError) -> Self {
        ScenarioError::Invoker(e.to_string())
    }
}

/// Success threshold of a 200 ms window for the RTO (the definition).
pub const RTO_THRESHOLD: f64 = 0.99;

/// Every site-`a` process except its PostgreSQL: "site A's application tier hard down"
/// (its invoker node and etcd included).
pub fn site_a_application_tier(lab: &Lab) -> Vec<String> {
    site_processes(lab, "a", |kind| kind != ProcessKind::Postgres)
}

/// Every site-`a` process, PostgreSQL primary included.
pub fn site_a_entirely(lab: &Lab) -> Vec<String> {
    site_processes(lab, "a", |_| true)
}

fn site_processes(lab: &Lab, site: &str, keep: impl Fn(ProcessKind) -> bool) -> Vec<String> {
    lab.describe()
        .processes
        .iter()
        .filter(|p| p.site == site && keep(p.kind))
        .map(|p| p.name.clone())
        .collect()
}

/// The edge router's URL, which the scenarios send through.
pub fn edge_url(lab: &Lab) -> Result<String, ScenarioError> {
    lab.describe()
        .endpoints
        .edge
        .clone()
        .ok_or_else(|| ScenarioError::Failed("the lab has no edge router".into()))
}

/// Steady traffic with a kill in the middle.
#[derive(Debug, Clone)]
pub struct KillUnderLoad {
    pub load: LoadgenConfig,
    /// From the start of the timed run to the kill.
    pub kill_after: Duration,
    pub victims: Vec<String>,
    /// SIGSTOP the victims instead of SIGKILL (a hang: connections are accepted and never
    /// answered, so nothing fails fast and the edge has nothing to re-send). The caller
    /// resumes them (`Lab::resume`) when it is done.
    pub freeze: bool,
    /// How long to watch for gift-api's buckets all moving away from site a.
    pub shift_within: Duration,
}

#[derive(Debug, Clone)]
pub struct KillOutcome {
    pub recovery: Recovery,
    pub report: LoadReport,
    /// Kill → every gift-api bucket on site b, as committed by the invoker.
    pub shift_after: Option<Duration>,
    pub killed_at_unix_ms: u64,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Gives every user of `load` a balance through `load.targets` (a short run of its own), so
/// that the timed run that follows starts at once and its kill lands where it is meant to.
pub async fn fund_users(load: &LoadgenConfig) -> Result<(), ScenarioError> {
    let mut setup = load.clone();
    setup.duration_secs = 1;
    setup.rate_per_sec = 1;
    setup.readback = false;
    loadgen::run(&setup).await?;
    Ok(())
}

/// Runs `plan.load` (its set-up must already be done: `initial_balance = 0`), kills the
/// victims `kill_after` into it, watches for the shift, and returns the recovery.
pub async fn kill_under_load(
    lab: &mut Lab,
    plan: &KillUnderLoad,
) -> Result<KillOutcome, ScenarioError> {
    let load = plan.load.clone();
    let traffic = tokio::spawn(async move { loadgen::run(&load).await });
    tokio::time::sleep(plan.kill_after).await;
    let killed_at_unix_ms = unix_ms();
    let killed = Instant::now();
    for victim in &plan.victims {
        if plan.freeze {
            lab.pause(victim)?;
        } else {
            lab.kill(victim)?;
        }
    }
    tracing::info!(victims = ?plan.victims, freeze = plan.freeze, "scenario: victims down");
    let shift_after = wait_for_routing(lab, "gift-api", "b", killed, plan.shift_within).await;
    let report = traffic
        .await
        .map_err(|e| ScenarioError::Failed(format!("the load generator task failed: {e}")))??;
    let recovery = report
        .timeline
        .recovery_after(killed_at_unix_ms, RTO_THRESHOLD);
    Ok(KillOutcome {
        recovery,
        report,
        shift_after,
        killed_at_unix_ms,
    })
}

/// A service's routing as (site, buckets) runs, from the leader.
pub async fn routing(lab: &Lab, service: &str) -> Result<Vec<(String, u32)>, ScenarioError> {
    let client = InvokerClient::connect_leader(&lab.invoker_endpoints()).await?;
    let table = client
        .admin()
        .get_routing(pb::GetRoutingRequest {
            service: service.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(table.runs.into_iter().map(|r| (r.site, r.count)).collect())
}

/// Waits until every bucket of `service` is on `site`; how long after `since`, or None.
pub async fn wait_for_routing(
    lab: &Lab,
    service: &str,
    site: &str,
    since: Instant,
    within: Duration,
) -> Option<Duration> {
    let want = vec![(site.to_string(), invoker_domain::BUCKETS as u32)];
    loop {
        if let Ok(runs) = routing(lab, service).await {
            if runs == want {
                return Some(since.elapsed());
            }
        }
        if since.elapsed() > within {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Routing changes the policy committed (audit entries by actor `policy`), by service.
pub async fn policy_shifts(lab: &Lab) -> Result<BTreeMap<String, usize>, ScenarioError> {
    let client = InvokerClient::connect_leader(&lab.invoker_endpoints()).await?;
    let audit = client
        .admin()
        .list_audit(pb::ListAuditRequest {
            limit: 1000,
            before_seq: 0,
        })
        .await?
        .into_inner();
    let mut shifts = BTreeMap::new();
    for entry in audit.entries {
        if entry.actor == "policy" {
            if let Some(service) = entry.action.strip_prefix("routing.set ") {
                *shifts.entry(service.to_string()).or_default() += 1;
            }
        }
    }
    Ok(shifts)
}

/// Drops traffic between sites a and b (both directions, by source and destination range)
/// in an nft table of its own, deleted on drop so that a failure never leaves it behind.
/// Needs root.
pub struct Partition {
    table: String,
}

impl Partition {
    pub fn between_a_and_b() -> Result<Partition, ScenarioError> {
        Partition::cut(&[("127.0.1.0/24", "127.0.2.0/24")])
    }

    /// Site a cut off from b and from the witness (the invoker quorum and the edge), alive
    /// and reachable only from the host itself (127.0.0.1): "A isolated".
    pub fn isolate_site_a() -> Result<Partition, ScenarioError> {
        Partition::cut(&[
            ("127.0.1.0/24", "127.0.2.0/24"),
            ("127.0.1.0/24", "127.0.3.0/24"),
        ])
    }

    /// Drops one TCP connection's packets from `server_port` to `client_port` (both on
    /// loopback): e.g. a primary's WAL stream to its replica (`pg_stat_replication`'s
    /// `client_port`), so that what the primary commits meanwhile never reaches the replica.
    pub fn tcp_stream(server_port: u16, client_port: u16) -> Result<Partition, ScenarioError> {
        Partition::apply(&format!(
            "tcp sport {server_port} tcp dport {client_port} drop\n"
        ))
    }

    /// Drops traffic both ways between each pair of ranges.
    fn cut(pairs: &[(&str, &str)]) -> Result<Partition, ScenarioError> {
        let mut rules = String::new();
        for (x, y) in pairs {
            rules.push_str(&format!(
                "ip saddr {x} ip daddr {y} drop\nip saddr {y} ip daddr {x} drop\n"
            ));
        }
        Partition::apply(&rules)
    }

    /// One nft table of its own with `rules` (one per line) on the output hook.
    fn apply(rules: &str) -> Result<Partition, ScenarioError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let table = format!("lab_partition_{}_{n}", std::process::id());
        let mut script = format!(
            "add table inet {table}\n\
             add chain inet {table} out {{ type filter hook output priority 0; }}\n"
        );
        for rule in rules.lines() {
            script.push_str(&format!("add rule inet {table} out {rule}\n"));
        }
        let path = std::env::temp_dir().join(format!("{table}.nft"));
        std::fs::write(&path, script)
            .map_err(|e| ScenarioError::Failed(format!("writing {}: {e}", path.display())))?;
        let status = std::process::Command::new("nft")
            .arg("-f")
            .arg(&path)
            .status()
            .map_err(|e| ScenarioError::Failed(format!("running nft: {e}")))?;
        if !status.success() {
            return Err(ScenarioError::Failed(format!(
                "nft -f {} failed ({status}); partitions need root and nftables",
                path.display()
            )));
        }
        Ok(Partition { table })
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .status();
    }
}

/// Freezes and thaws a process: `cycles` times down for `down`, then up for `up`.
pub async fn flap(
    lab: &Lab,
    name: &str,
    cycles: u32,
    down: Duration,
    up: Duration,
) -> Result<(), ScenarioError> {
    for _ in 0..cycles {
        lab.pause(name)?;
        tokio::time::sleep(down).await;
        lab.resume(name)?;
        tokio::time::sleep(up).await;
    }
    Ok(())
}
