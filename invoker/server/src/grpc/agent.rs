//! The agent session: agents stream reports to the leader; a follower answers `NotLeader`
//! with the leader's address so the agent moves there. The leader checks and counts every
//! report, remembers each agent's last sequence number (soft state: a new leader starts
//! from the sessions that reconnect to it) and hands accepted reports to the failover loop
//! ([`crate::policy_loop`]).
//!
//! Every report is checked before it touches the view: the agent must have said hello with a
//! known site of the right role, sequence numbers must grow strictly per agent (a replayed or
//! old report is refused), and every probe must name a known site. A refused report is logged
//! and counted; the view is unchanged and the session goes on.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use futures::Stream;
use invoker_api::pb;
use invoker_domain::{validate_id, SiteRole};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::metrics::AgentLabels;
use crate::node::Node;

/// Largest agent message accepted: a report of a few hundred probes is a few tens of kB.
pub const MAX_AGENT_MESSAGE_BYTES: usize = 1024 * 1024;

/// How often agents are asked to report.
const REPORT_INTERVAL_MS: u32 = 250;

/// The last accepted sequence number of every agent (never replicated).
#[derive(Debug, Default)]
pub struct AgentViews {
    last_seq: Mutex<BTreeMap<String, u64>>,
}

impl AgentViews {
    fn last_seq(&self, agent_id: &str) -> u64 {
        self.last_seq
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(agent_id)
            .copied()
            .unwrap_or(0)
    }

    fn accept(&self, agent_id: &str, seq: u64) {
        self.last_seq
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(agent_id.to_string(), seq);
    }
}

pub struct AgentService {
    node: Arc<Node>,
    views: Arc<AgentViews>,
    observations: tokio::sync::mpsc::Sender<failover_policy::Observation>,
}

impl AgentService {
    pub fn new(
        node: Arc<Node>,
        observations: tokio::sync::mpsc::Sender<failover_policy::Observation>,
    ) -> AgentService {
        AgentService {
            node,
            views: Arc::new(AgentViews::default()),
            observations,
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Why a report is refused (also the metric's `result` label).
fn check_report(
    report: &pb::AgentReport,
    last_seq: u64,
    sites: &BTreeMap<String, SiteRole>,
) -> Result<(), (&'static str, String)> {
    if report.seq <= last_seq {
        return Err((
            "stale_seq",
            format!(
                "report seq {} is not above the last accepted {last_seq}",
                report.seq
            ),
        ));
    }
    let serving = |site: &str| matches!(sites.get(site), Some(SiteRole::Site));
    for i in &report.instances {
        if !serving(&i.site) || validate_id("service", &i.service).is_err() {
            return Err((
                "invalid",
                format!(
                    "instance probe of {:?} in unknown site {:?}",
                    i.service, i.site
                ),
            ));
        }
    }
    for d in &report.databases {
        if !serving(&d.site) {
            return Err((
                "invalid",
                format!("database probe of unknown site {:?}", d.site),
            ));
        }
    }
    for e in &report.edge {
        if !serving(&e.site) || validate_id("service", &e.service).is_err() {
            return Err((
                "invalid",
                format!(
                    "edge sample of {:?} in unknown site {:?}",
                    e.service, e.site
                ),
            ));
        }
        if e.error_rps > e.request_rps {
            return Err((
                "invalid",
                format!(
                    "edge sample of {:?} in {:?} has more errors ({}/s) than requests ({}/s)",
                    e.service, e.site, e.error_rps, e.request_rps
                ),
            ));
        }
    }
    for p in &report.peers {
        if !serving(&p.target_site) {
            return Err((
                "invalid",
                format!("peer probe of unknown site {:?}", p.target_site),
            ));
        }
    }
    Ok(())
}

type SessionStream =
    Pin<Box<dyn Stream<Item = Result<pb::ControllerMessage, Status>> + Send + 'static>>;

fn not_leader(node: &Node) -> pb::ControllerMessage {
    let (leader_id, leader_addr) = node.leader().unwrap_or((0, String::new()));
    pb::ControllerMessage {
        body: Some(pb::controller_message::Body::NotLeader(pb::NotLeader {
            leader_id,
            leader_addr,
        })),
    }
}

#[tonic::async_trait]
impl pb::agent_session_server::AgentSession for AgentService {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(pb::AgentMessage {
                body: Some(pb::agent_message::Body::Hello(hello)),
            }) => hello,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a session must be AgentHello",
                ))
            }
        };
        validate_id("agent_id", &hello.agent_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let sites: BTreeMap<String, SiteRole> = {
            let data = self.node.sm.read().await;
            data.state
                .sites
                .iter()
                .map(|(id, s)| (id.clone(), s.role))
                .collect()
        };
        // The edge runs at any location; an agent's role must match its site's.
        let (role, edge) = match pb::AgentRole::try_from(hello.role) {
            Ok(pb::AgentRole::Site) => (SiteRole::Site, false),
            Ok(pb::AgentRole::Witness) => (SiteRole::Witness, false),
            Ok(pb::AgentRole::Edge) => (SiteRole::Site, true),
            _ => {
                return Err(Status::invalid_argument(
                    "agent role must be SITE, WITNESS or EDGE",
                ))
            }
        };
        match sites.get(&hello.site) {
            Some(_) if edge => {}
            Some(r) if *r == role => {}
            Some(r) => {
                return Err(Status::invalid_argument(format!(
                    "site {:?} is a {r} site; this agent says it is a {role} agent",
                    hello.site
                )))
            }
            None => {
                tracing::warn!(agent = %hello.agent_id, site = %hello.site, "session refused: unknown site");
                return Err(Status::invalid_argument(format!(
                    "unknown site {:?} (known: {:?})",
                    hello.site,
                    sites.keys().collect::<Vec<_>>()
                )));
            }
        }
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        if !self.node.is_leader() {
            let _ = tx.send(Ok(not_leader(&self.node))).await;
            return Ok(Response::new(Box::pin(ReceiverStream::new(rx))));
        }
        let term = self.node.raft_metrics().current_term;
        let accepted = pb::ControllerMessage {
            body: Some(pb::controller_message::Body::Accepted(
                pb::SessionAccepted {
                    leader_id: self.node.id,
                    term,
                    report_interval_ms: REPORT_INTERVAL_MS,
                },
            )),
        };
        let _ = tx.send(Ok(accepted)).await;
        tracing::info!(agent = %hello.agent_id, site = %hello.site, last_seq = hello.last_seq, "agent session accepted");
        let node = self.node.clone();
        let views = self.views.clone();
        let observations = self.observations.clone();
        node.metrics.agent_sessions.inc();
        // Site agents take failover commands; the newest session of a site gets them.
        let generation = (!edge && role == SiteRole::Site)
            .then(|| node.directory.register(&hello.site, tx.clone()));
        tokio::spawn(async move {
            let agent = hello.agent_id;
            let count = |result: &'static str| {
                node.metrics
                    .agent_reports
                    .get_or_create(&AgentLabels {
                        site: hello.site.clone(),
                        result,
                    })
                    .inc();
            };
            loop {
                let message = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(%agent, "agent session ended: {e}");
                        break;
                    }
                };
                let report = match message.body {
                    Some(pb::agent_message::Body::Report(report)) => report,
                    Some(pb::agent_message::Body::CommandResult(result)) => {
                        node.directory.deliver(result);
                        continue;
                    }
                    Some(pb::agent_message::Body::LeaseRequest(lease)) => {
                        // Site agents renew their own site's writer lease; the witness agent
                        // renews the writer's database from outside (it has none of its own).
                        let site = if lease.site.is_empty() {
                            hello.site.clone()
                        } else {
                            lease.site.clone()
                        };
                        let own_or_peer = !edge
                            && ((role == SiteRole::Site && site == hello.site)
                                || (role == SiteRole::Witness && site != hello.site));
                        if own_or_peer {
                            // Committing takes a raft round trip: never hold the reports up.
                            tokio::spawn(grant_lease(
                                node.clone(),
                                site,
                                agent.clone(),
                                lease,
                                tx.clone(),
                            ));
                        } else {
                            tracing::warn!(%agent, %site, "lease request ignored: a site agent renews its own site's lease, the witness another site's");
                        }
                        continue;
                    }
                    _ => continue,
                };
                if !node.is_leader() {
                    count("not_leader");
                    let _ = tx.send(Ok(not_leader(&node))).await;
                    break;
                }
                let shape = if edge {
                    (report.instances.is_empty()
                        && report.databases.is_empty()
                        && report.peers.is_empty())
                    .then_some(())
                    .ok_or(("invalid", "an edge reports edge samples only".to_string()))
                } else {
                    report
                        .edge
                        .is_empty()
                        .then_some(())
                        .ok_or(("invalid", "only the edge reports edge samples".to_string()))
                };
                match shape.and_then(|()| check_report(&report, views.last_seq(&agent), &sites)) {
                    Ok(()) => {
                        views.accept(&agent, report.seq);
                        let observation = if edge {
                            crate::policy_loop::edge_observation(&report, now_ms())
                        } else {
                            crate::policy_loop::observation(&hello.site, &report, now_ms())
                        };
                        // Valid either way; `dropped` when the loop is behind (the next report
                        // supersedes this one), so that accepted + dropped = valid reports.
                        if observations.try_send(observation).is_ok() {
                            count("accepted");
                        } else {
                            count("dropped");
                        }
                    }
                    Err((result, why)) => {
                        count(result);
                        tracing::warn!(%agent, site = %hello.site, "agent report refused: {why}");
                    }
                }
            }
            if let Some(generation) = generation {
                node.directory.unregister(&hello.site, generation);
            }
            node.metrics.agent_sessions.dec();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Commits a site agent's lease renewal and answers it. Refused (or not committed: no
/// quorum, not the leader) means not granted; the agent then lets its lease run out.
async fn grant_lease(
    node: Arc<Node>,
    site: String,
    agent: String,
    lease: pb::LeaseRequest,
    tx: tokio::sync::mpsc::Sender<Result<pb::ControllerMessage, Status>>,
) {
    let duration_ms = node.writer_lease.duration_ms;
    let request = invoker_domain::Request {
        actor: agent.clone(),
        reason: "writer lease renewal".into(),
        at_ms: crate::now_ms(),
        command: invoker_domain::Command::RenewLease {
            service: lease.service.clone(),
            site: site.clone(),
            epoch: lease.epoch,
            duration_ms,
            primary_lsn: lease.primary_lsn,
            ledger_sequence: lease.ledger_sequence,
        },
    };
    let result = node.propose(request).await;
    // The writer to tell the agent about: once a failover is approved, the one it moves to,
    // so that the old site fences at once instead of letting its lease run out.
    let writer = {
        let data = node.sm.read().await;
        let state = &data.state;
        state
            .failover_in_progress(&lease.service)
            .and_then(|id| state.proposals.get(&id))
            .and_then(|p| p.plan.as_ref())
            .map(|plan| invoker_domain::Writer {
                site: plan.to_site.clone(),
                epoch: plan.new_epoch,
                dsn: plan.to_dsn.clone(),
            })
            .or_else(|| state.writers.get(&lease.service).cloned())
    };
    let (granted, error) = match result {
        Ok((_, invoker_domain::Response::Applied(_))) => (true, String::new()),
        Ok((_, other)) => (false, format!("unexpected result {other:?}")),
        Err(crate::node::ProposeError::Refused(e)) => (false, e.to_string()),
        Err(e) => (false, format!("not committed: {e:?}")),
    };
    if !granted {
        tracing::info!(%agent, %site, epoch = lease.epoch, "writer lease not granted: {error}");
    }
    node.metrics.lease_renewal(&site, granted);
    // The writer site's own agent tells how many standbys stream (for zero-loss mode).
    if granted && lease.site.is_empty() {
        node.standbys
            .observe(&lease.service, lease.streaming_standbys);
    }
    let synchronous_standby = node
        .sm
        .read()
        .await
        .state
        .synchronous_standby(&lease.service);
    let grant = pb::LeaseGrant {
        synchronous_standby,
        service: lease.service,
        epoch: lease.epoch,
        request_id: lease.request_id,
        granted,
        duration_ms: if granted {
            u32::try_from(duration_ms).unwrap_or(u32::MAX)
        } else {
            0
        },
        error,
        writer_site: writer.as_ref().map(|w| w.site.clone()).unwrap_or_default(),
        writer_epoch: writer.as_ref().map_or(0, |w| w.epoch),
    };
    let _ = tx
        .send(Ok(pb::ControllerMessage {
            body: Some(pb::controller_message::Body::LeaseGrant(grant)),
        }))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sites() -> BTreeMap<String, SiteRole> {
        BTreeMap::from([
            ("a".to_string(), SiteRole::Site),
            ("b".to_string(), SiteRole::Site),
            ("witness".to_string(), SiteRole::Witness),
        ])
    }

    #[test]
    fn reports_are_checked_before_they_count() {
        let good = pb::AgentReport {
            seq: 5,
            instances: vec![pb::InstanceProbe {
                service: "gift-api".into(),
                site: "a".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(check_report(&good, 4, &sites()).is_ok());
        assert_eq!(check_report(&good, 5, &sites()).unwrap_err().0, "stale_seq");
        let mut bad = good.clone();
        bad.instances[0].site = "z".into();
        assert_eq!(check_report(&bad, 0, &sites()).unwrap_err().0, "invalid");
        let mut bad = good.clone();
        bad.peers.push(pb::PeerProbe {
            target_site: "witness".into(),
            ..Default::default()
        });
        assert_eq!(check_report(&bad, 0, &sites()).unwrap_err().0, "invalid");
    }
}
