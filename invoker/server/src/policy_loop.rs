//! The leader's failover loop: accepted agent reports become policy observations; every
//! tick the policy classifies the sites and decides; each decision is committed to raft
//! (with its evidence in the reason) before it counts as applied.
//!
//! The policy's state is soft: it lives only on the leader, starts empty when a node becomes
//! leader (the agents reconnect to it and fill it within a few report intervals) and is
//! dropped when the node stops leading. Its configuration is derived from the topology
//! (every service with its class, the policy's defaults otherwise).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use failover_policy::{
    Action, AgentReport, Current, CurrentWriter, DatabaseProbe, DatabaseRole, Decision,
    InstanceProbe, Observation, Policy, PolicyConfig, SiteProbes,
};
use invoker_api::pb;
use invoker_domain::{Command, Request, ServiceClass, SiteRole, State};
use tokio::sync::mpsc;

use crate::node::Node;

/// How often the policy decides.
pub const TICK_MS: u64 = 100;

/// Observations waiting for the loop; beyond this, reports are dropped (the next one
/// supersedes them anyway).
pub const INBOX: usize = 1024;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// An accepted agent report as the policy sees it: probes grouped by the site they are about;
/// cross-site probes (`<service>/<instance>` targets) become instance probes of that site,
/// which the policy uses for reachability only.
pub fn observation(agent_site: &str, report: &pb::AgentReport, received_at_ms: u64) -> Observation {
    let probed_at_ms = u64::try_from(report.observed_at_ms).unwrap_or(received_at_ms);
    let mut targets: std::collections::BTreeMap<String, SiteProbes> = Default::default();
    fn target<'t>(
        targets: &'t mut std::collections::BTreeMap<String, SiteProbes>,
        site: &str,
    ) -> &'t mut SiteProbes {
        targets
            .entry(site.to_string())
            .or_insert_with(|| SiteProbes {
                site: site.to_string(),
                instances: Vec::new(),
                databases: Vec::new(),
            })
    }
    for i in &report.instances {
        target(&mut targets, &i.site).instances.push(InstanceProbe {
            service: i.service.clone(),
            instance: i.instance.clone(),
            ok: i.healthy,
            probed_at_ms,
        });
    }
    for p in &report.peers {
        let (service, instance) = p.target.split_once('/').unwrap_or((p.target.as_str(), ""));
        target(&mut targets, &p.target_site)
            .instances
            .push(InstanceProbe {
                service: service.to_string(),
                instance: instance.to_string(),
                ok: p.reachable,
                probed_at_ms,
            });
    }
    for d in &report.databases {
        target(&mut targets, &d.site).databases.push(DatabaseProbe {
            service: d.service.clone(),
            role: match pb::DatabaseRole::try_from(d.role) {
                Ok(pb::DatabaseRole::Primary) => DatabaseRole::Primary,
                Ok(pb::DatabaseRole::Replica) => DatabaseRole::Replica,
                _ => DatabaseRole::Unreachable,
            },
            current_wal_lsn: d.current_wal_lsn,
            receive_lsn: d.receive_lsn,
            replay_lsn: d.replay_lsn,
            ledger_sequence: d.ledger_sequence,
            probed_at_ms,
        });
    }
    Observation::Agent(AgentReport {
        agent_site: agent_site.to_string(),
        seq: report.seq,
        received_at_ms,
        targets: targets.into_values().collect(),
    })
}

/// The policy configuration for a topology: its serving sites, its witness, its services.
pub fn config_for(state: &State) -> Result<PolicyConfig, String> {
    let serving: Vec<&String> = state
        .sites
        .values()
        .filter(|s| s.role == SiteRole::Site)
        .map(|s| &s.id)
        .collect();
    let witness = state
        .sites
        .values()
        .find(|s| s.role == SiteRole::Witness)
        .map(|s| s.id.clone())
        .ok_or("the topology has no witness site")?;
    let mut text = format!("sites = {serving:?}\nwitness = {witness:?}\n");
    for (name, service) in &state.services {
        let class = match service.class {
            ServiceClass::Stateless => "stateless",
            ServiceClass::Strong => "strong",
        };
        text.push_str(&format!("[services.{name:?}]\nclass = {class:?}\n"));
    }
    PolicyConfig::from_toml_str(&text).map_err(|e| e.to_string())
}

fn reason(decision: &Decision) -> String {
    let evidence: Vec<String> = decision
        .evidence
        .iter()
        .take(8)
        .map(|e| format!("{} {}: {}", e.observer, e.probe, e.detail))
        .collect();
    let text = format!(
        "policy: {} ({:?}); evidence: {}",
        decision.label(),
        decision.classification,
        evidence.join("; ")
    );
    // The domain bounds reasons; evidence beyond it stays in the leader's log.
    text.chars().take(invoker_domain::MAX_TEXT_LEN).collect()
}

/// What to commit for a decision: the routing change, or an audit record of the notice.
fn command(decision: &Decision, state: &State) -> Command {
    match &decision.action {
        Action::ShiftBuckets { new_runs, .. } | Action::Failback { new_runs, .. }
            if !decision.dry_run =>
        {
            Command::SetRouting {
                service: decision.service.clone(),
                runs: new_runs.clone(),
                expected_version: state.routing.get(&decision.service).map(|t| t.version),
            }
        }
        other => Command::RecordAudit {
            action: decision.label(),
            before: decision.service.clone(),
            after: format!("{other:?}")
                .chars()
                .take(invoker_domain::MAX_TEXT_LEN)
                .collect(),
        },
    }
}

/// Runs for the life of the node.
pub async fn run(node: Arc<Node>, mut inbox: mpsc::Receiver<Observation>) {
    let mut policy: Option<Policy> = None;
    let mut ticker = tokio::time::interval(Duration::from_millis(TICK_MS));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            received = inbox.recv() => {
                let Some(observation) = received else { return };
                if let Some(p) = policy.as_mut() {
                    if let Err(e) = p.observe(&observation) {
                        tracing::warn!("observation refused by the policy: {e}");
                    }
                }
            }
            _ = ticker.tick() => {
                if !node.is_leader() {
                    policy = None;
                    continue;
                }
                let state = node.sm.read().await.state.clone();
                if policy.is_none() {
                    match config_for(&state).and_then(|c| Policy::new(c).map_err(|e| e.to_string())) {
                        Ok(p) => {
                            tracing::info!("failover policy running on this leader");
                            policy = Some(p);
                        }
                        Err(e) => {
                            tracing::debug!("no failover policy yet: {e}");
                            continue;
                        }
                    }
                }
                let Some(p) = policy.as_mut() else { continue };
                let current = Current {
                    routing: state.routing.clone(),
                    writers: state
                        .writers
                        .iter()
                        .map(|(s, w)| (s.clone(), CurrentWriter { site: w.site.clone(), epoch: w.epoch }))
                        .collect(),
                };
                let now = now_ms();
                let output = match p.tick(now, &current) {
                    Ok(o) => o,
                    Err(e) => {
                        tracing::warn!("policy tick: {e}");
                        continue;
                    }
                };
                for decision in output.decisions {
                    let request = Request {
                        actor: "policy".into(),
                        reason: reason(&decision),
                        at_ms: i64::try_from(now).unwrap_or(i64::MAX),
                        command: command(&decision, &state),
                    };
                    tracing::warn!(service = %decision.service, decision = %decision.label(), "failover policy decided");
                    match node.propose(request).await {
                        Ok((index, _)) => {
                            tracing::info!(service = %decision.service, log_index = index, "decision committed");
                            if !decision.dry_run {
                                if let Err(e) = p.record_applied(&decision, now_ms()) {
                                    tracing::warn!("policy: {e}");
                                }
                            }
                        }
                        Err(e) => tracing::warn!(service = %decision.service, "decision not committed: {e:?}"),
                    }
                }
            }
        }
    }
}
