//! The leader's failover loop: accepted agent reports become policy observations; every
//! tick the policy classifies the sites and decides; each decision is committed to raft
//! (with its evidence in the reason) before it counts as applied.
//!
//! The policy's state is soft: it lives only on the leader, starts empty when a node becomes
//! leader (the agents reconnect to it and fill it within a few report intervals) and is
//! dropped when the node stops leading. Its configuration is derived from the topology
//! (every service with its class, the policy's defaults otherwise).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
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

/// The policy configuration for a topology: its serving sites, its witness, its services,
/// with the invoker config's `[policy]` settings over the policy's defaults.
pub fn config_for(state: &State, overrides: &toml::Table) -> Result<PolicyConfig, String> {
    let serving: Vec<String> = state
        .sites
        .values()
        .filter(|s| s.role == SiteRole::Site)
        .map(|s| s.id.clone())
        .collect();
    let witness = state
        .sites
        .values()
        .find(|s| s.role == SiteRole::Witness)
        .map(|s| s.id.clone())
        .ok_or("the topology has no witness site")?;
    let services = state.services.iter().map(|(name, service)| {
        let class = match service.class {
            ServiceClass::Stateless => "stateless",
            ServiceClass::Strong => "strong",
        };
        (name.clone(), class)
    });
    merged_config(serving, witness, services, overrides)
}

fn merged_config(
    sites: Vec<String>,
    witness: String,
    services: impl Iterator<Item = (String, &'static str)>,
    overrides: &toml::Table,
) -> Result<PolicyConfig, String> {
    let mut table = overrides.clone();
    let service_overrides = match table.remove("services") {
        None => toml::Table::new(),
        Some(toml::Value::Table(t)) => t,
        Some(_) => return Err("services must be a table of [services.<name>] tables".into()),
    };
    table.insert("sites".into(), toml::Value::from(sites));
    table.insert("witness".into(), toml::Value::from(witness));
    let mut declared = toml::Table::new();
    for (name, class) in services {
        let mut service = match service_overrides.get(&name) {
            Some(toml::Value::Table(t)) => t.clone(),
            Some(_) => return Err(format!("services.{name} must be a table")),
            None => toml::Table::new(),
        };
        service.insert("class".into(), toml::Value::from(class));
        declared.insert(name, toml::Value::Table(service));
    }
    table.insert("services".into(), toml::Value::Table(declared));
    let text = toml::to_string(&table).map_err(|e| e.to_string())?;
    PolicyConfig::from_toml_str(&text).map_err(|e| e.to_string())
}

/// Checks the invoker config's `[policy]` table on its own, before any topology exists: the
/// keys the topology owns are refused, every other key must parse and validate.
pub fn check_overrides(overrides: &toml::Table) -> Result<(), String> {
    for owned in ["sites", "witness"] {
        if overrides.contains_key(owned) {
            return Err(format!(
                "{owned} comes from the topology and cannot be set here"
            ));
        }
    }
    let mut names = Vec::new();
    let mut capacity_sites = std::collections::BTreeSet::new();
    match overrides.get("services") {
        None => {}
        Some(toml::Value::Table(services)) => {
            for (name, service) in services {
                let toml::Value::Table(service) = service else {
                    return Err(format!("services.{name} must be a table"));
                };
                if service.contains_key("class") {
                    return Err(format!(
                        "services.{name}.class comes from the topology and cannot be set here"
                    ));
                }
                if let Some(toml::Value::Table(capacity)) = service.get("capacity_rps") {
                    capacity_sites.extend(capacity.keys().cloned());
                }
                names.push(name.clone());
            }
        }
        Some(_) => return Err("services must be a table of [services.<name>] tables".into()),
    }
    if names.is_empty() {
        names.push("any-service".into());
    }
    // The real sites are not known yet: stand-ins, named after the capacity keys if any.
    let mut sites: Vec<String> = capacity_sites.into_iter().collect();
    for stand_in in ["site-1", "site-2"] {
        if sites.len() < 2 {
            sites.push(stand_in.into());
        }
    }
    if sites.len() > 2 {
        return Err(format!(
            "capacity_rps names {} sites; there are two serving sites",
            sites.len()
        ));
    }
    merged_config(
        sites,
        "witness-site".into(),
        names.into_iter().map(|n| (n, "stateless")),
        overrides,
    )
    .map(|_| ())
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

/// What to commit for a decision: the routing change, the throttle, the failover proposal,
/// or an audit record of the notice. `term` is the proposing leader's; a proposal stays open
/// for `ttl_ms`.
fn command(decision: &Decision, state: &State, term: u64, ttl_ms: u64) -> Command {
    match &decision.action {
        Action::ProposeFailover {
            from_site,
            to_site,
            writer_epoch,
            data_loss,
        } if !decision.dry_run => Command::ProposeFailover {
            service: decision.service.clone(),
            from_site: from_site.clone(),
            to_site: to_site.clone(),
            writer_epoch: *writer_epoch,
            // Bounded like every text of the log; the rest stays in the leader's view.
            evidence: decision
                .evidence
                .iter()
                .take(16)
                .cloned()
                .map(|mut e| {
                    e.detail = e
                        .detail
                        .chars()
                        .take(invoker_domain::MAX_TEXT_LEN)
                        .collect();
                    e
                })
                .collect(),
            data_loss: data_loss.clone(),
            term,
            ttl_ms,
            planned: false,
        },
        Action::ShiftBuckets { new_runs, .. } | Action::Failback { new_runs, .. }
            if !decision.dry_run =>
        {
            Command::SetRouting {
                service: decision.service.clone(),
                runs: new_runs.clone(),
                expected_version: state.routing.get(&decision.service).map(|t| t.version),
            }
        }
        Action::EnableThrottle { site, max_rps, .. } if !decision.dry_run => Command::SetThrottle {
            service: decision.service.clone(),
            site: site.clone(),
            max_rps: Some((*max_rps).max(1)),
        },
        Action::DisableThrottle { site } if !decision.dry_run => Command::SetThrottle {
            service: decision.service.clone(),
            site: site.clone(),
            max_rps: None,
        },
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

/// One decision as the admin API shows it.
#[derive(Debug, Clone)]
pub struct DecisionRecord {
    pub service: String,
    pub label: String,
    pub classification: String,
    pub decided_at_ms: u64,
    pub detail: String,
    /// `committing`, `committed`, `dry-run`, or `failed: <why>`.
    pub status: String,
    pub log_index: u64,
    pub evidence: Vec<invoker_domain::Evidence>,
}

impl DecisionRecord {
    fn new(decision: &Decision, status: &str) -> DecisionRecord {
        DecisionRecord {
            service: decision.service.clone(),
            label: decision.label(),
            classification: decision.classification.as_str().to_string(),
            decided_at_ms: decision.decided_at_ms,
            detail: format!("{:?}", decision.action),
            status: status.to_string(),
            log_index: 0,
            evidence: decision.evidence.clone(),
        }
    }
}

/// The leader's policy as the admin API shows it: written by the loop, read by GetPolicyView.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub running: bool,
    pub paused: bool,
    pub evaluated_at_ms: u64,
    pub sites: BTreeMap<String, failover_policy::SiteAssessment>,
    /// Decisions being committed, and while paused the latest "would ..." decisions.
    pub pending: Vec<DecisionRecord>,
    /// Newest first, at most [`RECENT_DECISIONS`].
    pub recent: VecDeque<DecisionRecord>,
    pub observers_last_seen_ms: BTreeMap<String, u64>,
}

/// Decisions kept for `invokerctl policy`.
pub const RECENT_DECISIONS: usize = 50;

#[derive(Debug, Default)]
pub struct ViewCell(Mutex<View>);

impl ViewCell {
    pub fn get(&self) -> View {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn update(&self, f: impl FnOnce(&mut View)) {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

/// Gives the policy one ordered stream per observer although several agents may report for
/// the same site (each checked against its own sequence by the session): the loop numbers
/// observations itself and stamps them with a clock that never goes back.
#[derive(Debug, Default)]
struct Sequencer {
    next: BTreeMap<failover_policy::Observer, u64>,
    last_ms: u64,
}

impl Sequencer {
    fn stamp(&mut self, mut observation: Observation, now_ms: u64) -> Observation {
        self.last_ms = self.last_ms.max(now_ms);
        let seq = self.next.entry(observation.observer()).or_insert(0);
        *seq += 1;
        match &mut observation {
            Observation::Agent(r) => {
                r.seq = *seq;
                r.received_at_ms = self.last_ms;
            }
            Observation::Edge(r) => {
                r.seq = *seq;
                r.received_at_ms = self.last_ms;
            }
        }
        observation
    }
}

/// An edge router's report as the policy sees it.
pub fn edge_observation(report: &pb::AgentReport, received_at_ms: u64) -> Observation {
    Observation::Edge(failover_policy::EdgeReport {
        seq: report.seq,
        received_at_ms,
        samples: report
            .edge
            .iter()
            .map(|e| failover_policy::EdgeSample {
                site: e.site.clone(),
                service: e.service.clone(),
                request_rps: e.request_rps,
                error_rps: e.error_rps,
            })
            .collect(),
    })
}

/// Runs for the life of the node.
pub async fn run(node: Arc<Node>, mut inbox: mpsc::Receiver<Observation>) {
    let mut policy: Option<Policy> = None;
    let mut sequencer = Sequencer::default();
    let mut ticker = tokio::time::interval(Duration::from_millis(TICK_MS));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            received = inbox.recv() => {
                let Some(observation) = received else { return };
                if let Some(p) = policy.as_mut() {
                    let observation = sequencer.stamp(observation, now_ms());
                    let observer = observation.observer().to_string();
                    match p.observe(&observation) {
                        Ok(()) => node.policy_view.update(|v| {
                            v.observers_last_seen_ms.insert(observer, observation.received_at_ms());
                        }),
                        Err(e) => tracing::warn!("observation refused by the policy: {e}"),
                    }
                }
            }
            _ = ticker.tick() => {
                if !node.is_leader() {
                    if policy.take().is_some() {
                        node.policy_view.update(|v| *v = View::default());
                    }
                    continue;
                }
                let state = node.sm.read().await.state.clone();
                if policy.is_none() {
                    match config_for(&state, &node.policy_overrides)
                        .and_then(|c| Policy::new(c).map_err(|e| e.to_string()))
                    {
                        Ok(p) => {
                            tracing::info!("failover policy running on this leader");
                            policy = Some(p);
                            sequencer = Sequencer::default();
                        }
                        Err(e) => {
                            tracing::debug!("no failover policy yet: {e}");
                            continue;
                        }
                    }
                }
                let Some(p) = policy.as_mut() else { continue };
                if state.policy_paused != p.is_paused() {
                    if state.policy_paused {
                        tracing::warn!("failover policy paused: dry-run, nothing is acted on");
                        p.pause();
                    } else {
                        tracing::warn!("failover policy resumed");
                        p.resume();
                    }
                }
                let current = Current {
                    routing: state.routing.clone(),
                    writers: state
                        .writers
                        .iter()
                        .map(|(s, w)| {
                            // The positions that came with the writer's last lease renewal.
                            let lease = state
                                .leases
                                .get(s)
                                .filter(|l| l.site == w.site && l.epoch == w.epoch);
                            let writer = CurrentWriter {
                                site: w.site.clone(),
                                epoch: w.epoch,
                                primary_lsn: lease.map_or(0, |l| l.primary_lsn),
                                ledger_sequence: lease.map_or(0, |l| l.ledger_sequence),
                                positions_at_ms: lease.map_or(0, |l| l.positions_at_ms),
                            };
                            (s.clone(), writer)
                        })
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
                node.policy_view.update(|v| {
                    v.running = true;
                    v.paused = output.paused;
                    v.evaluated_at_ms = now;
                    v.sites = output.sites.clone();
                    if output.paused {
                        // The "would ..." decisions stay on show while paused.
                        for d in &output.decisions {
                            v.pending.retain(|r| !(r.service == d.service && r.label == d.label()));
                            v.pending.push(DecisionRecord::new(d, "dry-run"));
                        }
                    } else {
                        v.pending.retain(|r| r.status != "dry-run");
                    }
                });
                for decision in output.decisions {
                    commit(&node, p, &state, decision, now).await;
                }
            }
        }
    }
}

/// Commits one decision; the policy counts it as applied only once it is committed.
async fn commit(node: &Node, policy: &mut Policy, state: &State, decision: Decision, now: u64) {
    let request = Request {
        actor: "policy".into(),
        reason: reason(&decision),
        at_ms: i64::try_from(now).unwrap_or(i64::MAX),
        command: command(
            &decision,
            state,
            node.raft_metrics().current_term,
            node.proposal_ttl_ms,
        ),
    };
    let label = decision.label();
    tracing::warn!(service = %decision.service, decision = %label, "failover policy decided");
    let mut record = DecisionRecord::new(&decision, "committing");
    if !decision.dry_run {
        node.policy_view.update(|v| v.pending.push(record.clone()));
    }
    let result = node.propose(request).await;
    match &result {
        Ok((index, response)) => {
            record.log_index = *index;
            record.status = match response {
                invoker_domain::Response::Refused(e) => format!("refused: {e}"),
                _ if decision.dry_run => "dry-run".into(),
                _ => "committed".into(),
            };
            tracing::info!(service = %decision.service, log_index = index, status = %record.status, "decision committed");
            if !decision.dry_run && !matches!(response, invoker_domain::Response::Refused(_)) {
                if let Err(e) = policy.record_applied(&decision, now_ms()) {
                    tracing::warn!("policy: {e}");
                }
            }
        }
        Err(e) => {
            record.status = format!("failed: {e:?}");
            tracing::warn!(service = %decision.service, "decision not committed: {e:?}");
        }
    }
    let result_label = if decision.dry_run {
        "dry_run"
    } else if record.status == "committed" {
        "committed"
    } else {
        "failed"
    };
    node.metrics.policy_decision(&label, result_label);
    node.policy_view.update(|v| {
        v.pending.retain(|r| {
            !(r.status == "committing" && r.service == record.service && r.label == record.label)
        });
        v.recent.push_front(record);
        v.recent.truncate(RECENT_DECISIONS);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use invoker_domain::{ServiceSpec, SiteSpec, Topology};

    fn state() -> State {
        let topology = Topology {
            sites: vec![
                SiteSpec {
                    id: "a".into(),
                    role: SiteRole::Site,
                },
                SiteSpec {
                    id: "b".into(),
                    role: SiteRole::Site,
                },
                SiteSpec {
                    id: "w".into(),
                    role: SiteRole::Witness,
                },
            ],
            services: vec![ServiceSpec {
                name: "gift-api".into(),
                class: ServiceClass::Stateless,
                routing: [("a".to_string(), 1), ("b".to_string(), 1)].into(),
                writer: None,
            }],
        };
        let mut state = State::default();
        let request = Request {
            actor: "t".into(),
            reason: "t".into(),
            at_ms: 0,
            command: Command::ApplyTopology(topology),
        };
        state.apply(1, &request);
        state
    }

    #[test]
    fn overrides_apply_over_the_topology_defaults() {
        let overrides: toml::Table = toml::from_str(
            "[services.gift-api]\nhold_down_ms = 1234\n[services.unknown]\nhold_down_ms = 1\n",
        )
        .unwrap();
        let config = config_for(&state(), &overrides).unwrap();
        assert_eq!(config.sites, ["a", "b"]);
        assert_eq!(config.witness, "w");
        assert_eq!(config.services["gift-api"].hold_down_ms, 1234);
        // A service the topology does not have is not invented.
        assert!(!config.services.contains_key("unknown"));
        let defaults = config_for(&state(), &toml::Table::new()).unwrap();
        assert_eq!(defaults.services["gift-api"].failures_to_trip, 3);
    }

    #[test]
    fn the_sequencer_orders_several_agents_of_one_site() {
        let report = |seq, at| {
            Observation::Agent(AgentReport {
                agent_site: "a".into(),
                seq,
                received_at_ms: at,
                targets: Vec::new(),
            })
        };
        let mut sequencer = Sequencer::default();
        // Two agents of site a with unrelated sequence numbers, and a clock that stepped back.
        let first = sequencer.stamp(report(9_000, 100), 100);
        let second = sequencer.stamp(report(5, 99), 99);
        assert_eq!((first.seq(), second.seq()), (1, 2));
        assert_eq!(second.received_at_ms(), 100);
        let mut policy = Policy::new(config_for(&state(), &toml::Table::new()).unwrap()).unwrap();
        policy.observe(&first).unwrap();
        policy.observe(&second).unwrap();
    }
}
